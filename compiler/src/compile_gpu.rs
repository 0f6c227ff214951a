//! `cleave compile MODEL --target cuda`: the model's training step (autodiff + SGD; or, for a
//! model without a `loss` output, its forward function) cut into kernel groups, emitted as linalg MLIR and lowered to PTX with the MLIR GPU pipeline
//! (`cleave-mlir`). Writes into the output directory:
//!
//! - `kN.mlir` — the linalg-on-tensors module of kernel group N (with `--emit mlir`, the default
//!   writes both);
//! - `kN_I.ptx` — the PTX of launch I of group N (with `--emit ptx`);
//! - `kernels.json` — a `GpuFunction`: the step's arguments, its outputs' buffers and the
//!   `GpuKernelGroup` descriptors (entry, grid, block, buffers, PTX) for the CUDA runtime, in
//!   execution order;
//! - `pipeline.txt` — the MLIR pass pipeline used (replace it with `--mlir-pipeline`);
//! - `failed.mlir` — on an MLIR failure, the kernel group's MLIR that failed.
//!
//! Without the `mlir` cargo feature, [`compile_gpu`] is an error saying how to rebuild.

use std::path::PathBuf;

use anyhow::Result;

/// What to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Emit {
    /// The linalg MLIR of every kernel group.
    Mlir,
    /// The PTX of every launch and `kernels.json`.
    Ptx,
}

/// Arguments of [`compile_gpu`].
#[derive(Clone, Debug)]
pub struct CompileGpuArgs {
    /// The model file (`.cir` or `.onnx`).
    pub model: PathBuf,
    /// The output directory (created if missing).
    pub output: PathBuf,
    /// What to write; empty means everything.
    pub emit: Vec<Emit>,
    /// A replacement for the default MLIR GPU pipeline.
    pub mlir_pipeline: Option<String>,
    /// Batch size of an `.onnx` model's symbolic dimensions.
    pub batch: Option<usize>,
}

/// What [`compile_gpu`] wrote.
#[derive(Clone, Debug, Default)]
pub struct CompileGpuReport {
    /// Kernel groups compiled.
    pub groups: usize,
    /// PTX launches.
    pub launches: usize,
    /// Files written.
    pub files: Vec<PathBuf>,
}

/// Compiles `args.model`'s training step for CUDA (see the module docs).
#[cfg(feature = "mlir")]
pub fn compile_gpu(args: &CompileGpuArgs) -> Result<CompileGpuReport> {
    use anyhow::Context;

    use crate::train::{build_step, OptimizerArg};

    // The training step (autodiff + SGD) of a model with a `loss` output; the forward function of
    // one without (inference kernels).
    let onnx = args.model.extension().is_some_and(|e| e == "onnx");
    let opts = crate::load::LoadOptions {
        batch: if onnx { args.batch } else { None },
        ..Default::default()
    };
    let loaded = crate::load::load_model(&args.model, &opts)?;
    let forward = crate::load::forward_of(&loaded.module)?;
    let func = if forward.output("loss").is_some() {
        let opt = OptimizerArg::Sgd;
        build_step(
            &args.model,
            args.batch,
            (None, None, None),
            opt,
            opt.default_lr(),
        )?
        .step
    } else {
        forward
    };
    let pipeline = args
        .mlir_pipeline
        .clone()
        .unwrap_or_else(cleave_mlir::pipeline::default_gpu_pipeline);
    let dir = &args.output;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let prog = match cleave_mlir::gpu::compile_gpu(&func, &pipeline) {
        Ok(p) => p,
        Err(e) => {
            // Dump the MLIR that failed next to the error (never only a message).
            let mut err = anyhow::Error::new(e);
            if let Some(source) = err
                .downcast_ref::<cleave_mlir::gpu::GpuError>()
                .and_then(|g| match g {
                    cleave_mlir::gpu::GpuError::Mlir(m) => m.source(),
                    _ => None,
                })
                .map(str::to_string)
            {
                let p = dir.join("failed.mlir");
                if std::fs::write(&p, source).is_ok() {
                    err = err.context(format!("the failing MLIR is in {}", p.display()));
                }
            }
            return Err(err.context(format!("compiling {} for CUDA", args.model.display())));
        }
    };
    let all = args.emit.is_empty();
    let mut report = CompileGpuReport {
        groups: prog.groups.len(),
        launches: prog.groups.iter().map(|g| g.launches.len()).sum(),
        files: Vec::new(),
    };
    let mut write = |name: String, text: &str| -> Result<()> {
        let p = dir.join(name);
        std::fs::write(&p, text).with_context(|| format!("cannot write {}", p.display()))?;
        report.files.push(p);
        Ok(())
    };
    write("pipeline.txt".into(), &format!("{pipeline}\n"))?;
    if all || args.emit.contains(&Emit::Mlir) {
        for (name, text) in &prog.mlir {
            write(format!("{name}.mlir"), text)?;
        }
    }
    if all || args.emit.contains(&Emit::Ptx) {
        for g in &prog.groups {
            for k in &g.launches {
                write(format!("{}.ptx", k.name), &k.ptx)?;
            }
        }
        write(
            "kernels.json".into(),
            &serde_json::to_string_pretty(&prog.descriptor())?,
        )?;
    }
    Ok(report)
}

/// Without the `mlir` feature: an error that says how to get it.
#[cfg(not(feature = "mlir"))]
pub fn compile_gpu(_args: &CompileGpuArgs) -> Result<CompileGpuReport> {
    anyhow::bail!(
        "--target cuda needs the MLIR backend, and this cleave was built without it: rebuild with \
         `cargo build --release --features mlir` after installing LLVM/MLIR 22 with \
         scripts/install-llvm.sh"
    )
}
