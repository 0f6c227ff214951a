//! `cleave compile MODEL -o EXE`: standalone training executables.
//!
//! # What the executable is
//!
//! `cleave compile` writes one native executable that trains one model with the same flags,
//! the same code and so the same losses as `cleave train`. It is a copy of the `cleave-runner`
//! program (built with the workspace, next to `cleave`) with a **payload** appended after the end
//! of the ELF image, which the loader ignores:
//!
//! ```text
//! [cleave-runner executable] [payload: JSON] [payload length: u64 LE] [magic: "CLEAVEX1"]
//! ```
//!
//! The payload ([`Payload`]) holds the verified forward function as `.cir` text (an `.onnx`
//! model is imported, and `--loss` added, at compile time), the traced batch, and the pipeline
//! configuration (`--stages`, `--microbatches`, `--schedule`), all checked at compile time, and
//! the parameters stored in the model file (an `.onnx` model's initializers), which training
//! starts from as in `cleave train`.
//! At start-up `cleave-runner` reads the trailer of its own file, parses the flags (`--data`,
//! `--steps`, `--batch`, `--optimizer`, `--lr`, `--seed`, `--eval-every`, `--checkpoint`,
//! `--checkpoint-every`, `--resume`, `--metrics`, `--quiet`) and runs [`crate::train::train`]
//! on the embedded model ([`crate::load::register_embedded_model`]).
//!
//! The executable links only the Rust standard library's usual system libraries (libc, libm,
//! libgcc_s); it needs no cleave, Rust, LLVM or C toolchain at run time.
//!
//! **Locating the runner.** `cleave compile` takes `cleave-runner` from the environment variable
//! `CLEAVE_RUNNER` if set, else from the directory of the running `cleave` executable (a plain
//! `cargo build` puts both in `target/<profile>/`). A missing runner is an error saying how to
//! build it.
//!
//! **Limits (this version).** The training step is built (autodiff, optimizer) and its fused loops
//! are compiled with the Cranelift JIT when the executable starts, exactly as in `cleave train`;
//! ahead-of-time kernels (cranelift-object) are not implemented yet. `--remat`, `--memory-limit`
//! and `--grad-method` travel in the payload and reach `cleave train`'s code unchanged;
//! `--target cuda` is `cleave compile`'s other mode (kernels as MLIR and PTX, `compile_gpu`).

use std::ffi::OsString;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, FromArgMatches};
use serde::{Deserialize, Serialize};

use cleave_ir::{DType, Tensor};

use crate::train::{OptimizerArg, TrainArgs};

/// The trailer's magic bytes (the last 8 bytes of a compiled executable).
pub const MAGIC: &[u8; 8] = b"CLEAVEX1";

/// The format version of [`Payload`].
pub const PAYLOAD_VERSION: u32 = 1;

/// Targets of `cleave compile`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// The CPU runtime.
    Cpu,
    /// NVIDIA GPUs (not supported by standalone executables yet).
    Cuda,
}

/// What `cleave compile` builds.
#[derive(Clone, Debug)]
pub struct CompileArgs {
    /// The model file (`.cir` or `.onnx`) with a scalar `loss` output.
    pub model: PathBuf,
    /// The executable to write.
    pub output: PathBuf,
    /// The target.
    pub target: Target,
    /// Batch size (must equal a `.cir` model's traced batch; binds an `.onnx` model's batch).
    pub batch: Option<usize>,
    /// Add a loss to a model exported without one (with `labels`).
    pub loss: Option<crate::loss::LossKind>,
    /// The labels input of `loss`.
    pub labels: Option<String>,
    /// Pipeline stages.
    pub stages: usize,
    /// Microbatches per step.
    pub microbatches: usize,
    /// Pipeline schedule name.
    pub schedule: String,
    /// Recomputation/offload policy (`cleave train --remat`).
    pub remat: Option<String>,
    /// Bytes of saved activations per device (`cleave train --memory-limit`).
    pub memory_limit: Option<String>,
    /// Gradient method (`cleave train --grad-method`).
    pub grad_method: String,
    /// Random tangents of `--grad-method forward-gradient`.
    pub tangents: usize,
}

/// What travels inside a compiled executable.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Payload {
    /// [`PAYLOAD_VERSION`].
    pub version: u32,
    /// The model's name as errors show it (`<stem>.cir`).
    pub model_name: String,
    /// The verified forward function (and any other functions of the module) as `.cir` text.
    pub model_text: String,
    /// The traced batch (the microbatch when pipelined).
    pub batch: usize,
    /// Pipeline stages.
    pub stages: usize,
    /// Microbatches per step.
    pub microbatches: usize,
    /// Pipeline schedule.
    pub schedule: String,
    /// Parameters stored in the model file (an `.onnx` model's initializers): training starts
    /// from them, as in `cleave train`.
    #[serde(default)]
    pub params: Vec<EmbeddedTensor>,
    /// `--remat` (recomputation/offload policy), as `cleave train` takes it.
    #[serde(default)]
    pub remat: Option<String>,
    /// `--memory-limit` (bytes of saved activations per device), as `cleave train` takes it.
    #[serde(default)]
    pub memory_limit: Option<String>,
    /// `--grad-method` and `--tangents`, as `cleave train` takes them.
    #[serde(default = "default_grad_method")]
    pub grad_method: String,
    /// Random tangents of `forward-gradient`.
    #[serde(default = "one")]
    pub tangents: usize,
}

fn default_grad_method() -> String {
    "bp".into()
}

fn one() -> usize {
    1
}

/// One stored parameter in a [`Payload`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EmbeddedTensor {
    /// The parameter's name.
    pub name: String,
    /// Element type, as the IR prints it (`f32`, `i32`, …).
    pub dtype: String,
    /// Extents.
    pub shape: Vec<usize>,
    /// The little-endian bytes, in hexadecimal.
    pub hex: String,
}

impl EmbeddedTensor {
    fn new((name, t): (&String, &Tensor)) -> Self {
        let hex = t.to_le_bytes().iter().map(|b| format!("{b:02x}")).collect();
        EmbeddedTensor {
            name: name.clone(),
            dtype: t.dtype.to_string(),
            shape: t.shape.clone(),
            hex,
        }
    }

    fn decode(&self) -> Result<Tensor> {
        let dtype = [
            DType::F32,
            DType::F64,
            DType::F16,
            DType::BF16,
            DType::I32,
            DType::I64,
            DType::Bool,
        ]
        .into_iter()
        .find(|d| d.to_string() == self.dtype)
        .with_context(|| format!("parameter {}: unknown dtype {}", self.name, self.dtype))?;
        if !self.hex.len().is_multiple_of(2) || !self.hex.is_ascii() {
            bail!("parameter {}: corrupt data", self.name);
        }
        let bytes = (0..self.hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&self.hex[i..i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .with_context(|| format!("parameter {}: corrupt data", self.name))?;
        Tensor::from_le_bytes(dtype, &self.shape, &bytes)
            .map_err(|e| anyhow::anyhow!("parameter {}: {e}", self.name))
    }
}

/// What `cleave compile` wrote.
#[derive(Clone, Debug)]
pub struct CompileReport {
    /// The executable.
    pub output: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// The embedded configuration.
    pub payload: Payload,
}

/// Finds `cleave-runner`: `$CLEAVE_RUNNER`, else next to the running executable.
pub fn find_runner() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("CLEAVE_RUNNER") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!(
                "CLEAVE_RUNNER={}: no such file (it must name the `cleave-runner` executable)",
                p.display()
            );
        }
        return Ok(p);
    }
    let exe = std::env::current_exe().context("cannot locate the running cleave executable")?;
    let dir = exe
        .parent()
        .context("the cleave executable has no directory")?;
    let name = format!("cleave-runner{}", std::env::consts::EXE_SUFFIX);
    let p = dir.join(&name);
    if !p.is_file() {
        bail!(
            "{name} not found next to {} (standalone executables are built from it): build it \
             with `cargo build -p cleave-compiler --bin cleave-runner` (add `--release` for a \
             release cleave), or set CLEAVE_RUNNER to its path",
            exe.display()
        );
    }
    Ok(p)
}

/// `cleave compile` for the CPU target: checks the model and configuration, then writes the
/// executable.
pub fn compile(a: &CompileArgs) -> Result<CompileReport> {
    if a.target == Target::Cuda {
        bail!(
            "--target cuda: standalone executables are not supported for CUDA yet; use --target cpu"
        );
    }
    crate::train::parse_grad_method(&a.grad_method, a.tangents)?;
    if let Some(p) = &a.remat {
        if cleave_passes::remat::Policy::parse(p).is_none() {
            bail!(
                "--remat {p}: unknown policy; valid policies: {}",
                cleave_passes::remat::Policy::NAMES
            );
        }
    }
    if let Some(l) = &a.memory_limit {
        cleave_passes::remat::parse_bytes(l).map_err(|e| anyhow::anyhow!("--memory-limit {e}"))?;
    }
    if a.stages == 0 || a.microbatches == 0 {
        bail!("--stages and --microbatches must be at least 1");
    }
    let crate::train::TrainingModel { loaded, traced, .. } =
        crate::train::load_training_model(&a.model, a.batch, a.loss, a.labels.clone())?;
    if let Some(b) = a.batch {
        if b != traced {
            bail!(
                "--batch {b}: {} was traced at batch {traced}; models have static shapes, so \
                 regenerate it at batch {b} (e.g. `cleave new-model … --batch {b}`)",
                a.model.display()
            );
        }
    }
    let pipelined = a.stages > 1 || a.microbatches > 1;
    let n_stages = if pipelined {
        crate::pipeline_train::build_schedule(&a.schedule, a.stages, a.microbatches)?.n_stages()
    } else {
        1
    };
    let stem = a
        .model
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("model");
    let payload = Payload {
        version: PAYLOAD_VERSION,
        model_name: format!("{stem}.cir"),
        model_text: loaded.module.to_string(),
        batch: traced,
        stages: a.stages,
        microbatches: a.microbatches,
        schedule: a.schedule.clone(),
        params: loaded.params.iter().map(EmbeddedTensor::new).collect(),
        remat: a.remat.clone(),
        memory_limit: a.memory_limit.clone(),
        grad_method: a.grad_method.clone(),
        tangents: a.tangents,
    };
    // The embedded text must load back to the same module and build a training step.
    let back = crate::load::parse_and_verify(&payload.model_text, &payload.model_name)
        .context("internal error: the printed model does not parse back")?;
    let mut m = cleave_ir::Module::with_function(back.functions[0].clone());
    let passes = if n_stages > 1 {
        format!("partition{{stages={n_stages}}},autodiff,split-bw")
    } else {
        "autodiff,optimizer{kind=sgd,lr=0.1}".to_string()
    };
    cleave_passes::PassManager::from_pipeline(&passes)?
        .run(
            &mut m,
            &mut cleave_passes::PassContext::default(),
            &mut |_| {},
        )
        .map_err(|e| anyhow::anyhow!("{}: {e}", a.model.display()))?;

    let runner = find_runner()?;
    write_executable(&runner, &a.output, &payload)?;
    let bytes = std::fs::metadata(&a.output)?.len();
    Ok(CompileReport {
        output: a.output.clone(),
        bytes,
        payload,
    })
}

/// Copies `runner` to `output` and appends the payload and trailer; the result is executable.
fn write_executable(runner: &Path, output: &Path, payload: &Payload) -> Result<()> {
    let mut image =
        std::fs::read(runner).with_context(|| format!("cannot read {}", runner.display()))?;
    if image.ends_with(MAGIC) {
        bail!(
            "{}: already carries a payload; point CLEAVE_RUNNER at a plain cleave-runner",
            runner.display()
        );
    }
    let json = serde_json::to_vec(payload)?;
    image.extend_from_slice(&json);
    image.extend_from_slice(&(json.len() as u64).to_le_bytes());
    image.extend_from_slice(MAGIC);
    // Write beside the target and rename, so a running copy of an older executable is not
    // overwritten in place.
    let dir = match output.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = output
        .file_name()
        .with_context(|| format!("-o {}: not a file name", output.display()))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    {
        let mut f = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(&image)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.sync_all()?;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    }
    std::fs::rename(&tmp, output).with_context(|| format!("cannot write {}", output.display()))?;
    Ok(())
}

/// Reads the payload at the end of `exe`; `None` when it has no trailer.
pub fn read_payload(exe: &Path) -> Result<Option<Payload>> {
    let mut f =
        std::fs::File::open(exe).with_context(|| format!("cannot open {}", exe.display()))?;
    let len = f.metadata()?.len();
    if len < 16 {
        return Ok(None);
    }
    let mut trailer = [0u8; 16];
    f.seek(SeekFrom::Start(len - 16))?;
    f.read_exact(&mut trailer)?;
    if &trailer[8..] != MAGIC {
        return Ok(None);
    }
    let n = u64::from_le_bytes(trailer[..8].try_into().expect("8 bytes"));
    if n > len - 16 {
        bail!("{}: corrupt payload (length {n})", exe.display());
    }
    let mut json = vec![0u8; n as usize];
    f.seek(SeekFrom::Start(len - 16 - n))?;
    f.read_exact(&mut json)?;
    let p: Payload = serde_json::from_slice(&json)
        .with_context(|| format!("{}: corrupt payload", exe.display()))?;
    if p.version != PAYLOAD_VERSION {
        bail!(
            "{}: payload version {} (this runner reads version {PAYLOAD_VERSION}); recompile it",
            exe.display(),
            p.version
        );
    }
    Ok(Some(p))
}

/// The flags of a compiled executable (the training flags of `cleave train`).
#[derive(clap::Parser, Debug)]
pub struct RunnerArgs {
    /// Training data (safetensors), one tensor per data input.
    #[arg(long)]
    pub data: PathBuf,
    /// Total number of steps (a resumed run counts from step 0).
    #[arg(long, default_value_t = 100)]
    pub steps: usize,
    /// Batch size: must equal the compiled batch.
    #[arg(long)]
    pub batch: Option<usize>,
    /// Optimizer.
    #[arg(long, value_enum, default_value = "sgd")]
    pub optimizer: OptimizerArg,
    /// Learning rate (default depends on the optimizer).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Shuffle with this seed (also seeds the initialisation); in file order without it.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Evaluate on the held-out tail every K steps.
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Write checkpoints into this directory.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Steps between checkpoints (and one after the last step).
    #[arg(long, default_value_t = 100)]
    pub checkpoint_every: usize,
    /// Continue from the checkpoint in this directory.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Append JSON-lines metrics to this file.
    #[arg(long)]
    pub metrics: Option<PathBuf>,
    /// No progress line on stderr.
    #[arg(long)]
    pub quiet: bool,
}

/// The line `cleave train` and compiled executables print at the end.
pub fn summary_line(s: &crate::train::TrainSummary) -> String {
    let mut line = format!(
        "trained {} step(s), {:.0} steps/s",
        s.steps_run, s.steps_per_s
    );
    if let Some(l) = s.final_loss {
        line.push_str(&format!(", final loss {l:.4}"));
    }
    if let Some(acc) = s.accuracy {
        line.push_str(&format!(", held-out accuracy {:.2}%", acc * 100.0));
    }
    line
}

/// The `main` of `cleave-runner`: reads the payload of the running executable, parses `args`
/// and trains.
pub fn runner_main(args: impl IntoIterator<Item = OsString>) -> Result<()> {
    let exe = std::env::current_exe().context("cannot locate the running executable")?;
    let payload = read_payload(&exe)?.with_context(|| {
        format!(
            "{}: no embedded model; this is the bare runner that `cleave compile MODEL -o EXE` \
             copies, run the executable it writes",
            exe.display()
        )
    })?;
    let pipeline = if payload.stages > 1 || payload.microbatches > 1 {
        format!(
            ", {} stage(s), {} microbatch(es), schedule {}",
            payload.stages, payload.microbatches, payload.schedule
        )
    } else {
        String::new()
    };
    let about = format!(
        "Trains {} (batch {}{pipeline}); built by `cleave compile`.",
        payload.model_name, payload.batch
    );
    let name = exe
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "train".into());
    let matches = RunnerArgs::command()
        .bin_name(name)
        .about(about)
        .try_get_matches_from(args)
        .unwrap_or_else(|e| e.exit());
    let r = RunnerArgs::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let Some(b) = r.batch {
        if b != payload.batch {
            bail!(
                "--batch {b}: this executable was compiled for batch {}; recompile it with \
                 `cleave compile … --batch {b}` (the model must be traced at that batch)",
                payload.batch
            );
        }
    }
    let model = PathBuf::from(&payload.model_name);
    let params = payload
        .params
        .iter()
        .map(|t| Ok((t.name.clone(), t.decode()?)))
        .collect::<Result<_>>()
        .with_context(|| format!("{}: corrupt payload", exe.display()))?;
    crate::load::register_embedded_model(&model, payload.model_text.clone(), params);
    let args = TrainArgs {
        model,
        data: r.data,
        steps: r.steps,
        batch: None,
        loss: None,
        labels: None,
        optimizer: r.optimizer,
        lr: r.lr,
        seed: r.seed,
        eval_every: r.eval_every,
        checkpoint: r.checkpoint,
        checkpoint_every: r.checkpoint_every,
        resume: r.resume,
        metrics: r.metrics,
        debug_nan: false,
        quiet: r.quiet,
        stages: payload.stages,
        microbatches: payload.microbatches,
        schedule: payload.schedule.clone(),
        timeline: None,
        fail_action: None,
        remat: payload.remat.clone(),
        memory_limit: payload.memory_limit.clone(),
        grad_method: payload.grad_method.clone(),
        tangents: payload.tangents,
        memory_report: false,
    };
    let s = crate::train::train(&args)?;
    println!("{}", summary_line(&s));
    Ok(())
}
