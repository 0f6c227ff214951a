//! `cleave train --target cuda` and `cleave bench --target cuda`: the CPU path's training step
//! (the same [`crate::train::build_step_with`], initialisation, data order, metrics and
//! checkpoints) compiled through cleave-mlir to PTX and run with the CUDA runtime's
//! `cleave_runtime::cuda::GpuRunner`.
//!
//! The training loop is written once, over the [`StepBackend`] trait: the CUDA backend keeps
//! parameters and optimizer state **resident on the device** (uploaded once; each step uploads
//! its batch, runs every kernel group, downloads the loss and carries the updated state into the
//! arguments on the device); state is downloaded only for checkpoints, evaluations (which run
//! the forward function on the CPU runtime with the downloaded parameters) and at the end. The
//! MLIR-on-CPU backend (`MlirCpuBackend`, feature `mlir`) runs the same loop through MLIR's LLVM
//! lowering, so CI checks the loop against the CPU runtime's losses without a GPU.
//!
//! GEMM groups (one `matmul` each, with a `GemmSpec`) run on cuBLAS by default; `--gemm mlir`
//! runs their MLIR kernels instead. With `--stages`/`--microbatches` > 1, `train_cuda` runs the
//! pipeline of [`crate::gpu_pipeline`]: every stage in this process, each on a stream of its own
//! (`Device::fork`); so does `--precision f16`, whose dynamic loss scale the stage pipeline
//! applies (this one-function loop has none). Not supported on cuda (each a clear error): `--remat`, `--memory-limit`,
//! `--timeline`, `--debug-nan`.

#[cfg(feature = "mlir")]
use std::collections::BTreeMap;
#[cfg(all(feature = "mlir", feature = "cuda"))]
use std::time::Instant;

use anyhow::Result;
#[cfg(feature = "mlir")]
use anyhow::{bail, Context};
use cleave_ir::Tensor;

#[cfg(feature = "mlir")]
use crate::train::{TrainArgs, TrainSummary};

/// How `--target cuda` runs GEMM groups.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum GemmArg {
    /// cuBLAS SGEMM (default).
    #[default]
    Cublas,
    /// The MLIR-generated GEMM kernels.
    Mlir,
}

/// One compiled training step that keeps its arguments between runs.
pub trait StepBackend {
    /// Sets argument `name` (uploads it).
    fn set(&mut self, name: &str, t: &Tensor) -> Result<()>;
    /// Runs the step on the current arguments.
    fn run(&mut self) -> Result<()>;
    /// Reads output `name` of the last run.
    fn output(&mut self, name: &str) -> Result<Tensor>;
    /// Makes every output named like an argument that argument's value.
    fn carry(&mut self) -> Result<()>;
    /// Reads argument `name`'s current value.
    fn arg(&mut self, name: &str) -> Result<Tensor>;
}

/// The MLIR CPU path ([`cleave_mlir::cpu`]) as a [`StepBackend`]: arguments held on the host.
#[cfg(feature = "mlir")]
pub struct MlirCpuBackend {
    prog: cleave_mlir::cpu::CpuProgram,
    names: Vec<String>,
    args: BTreeMap<String, Tensor>,
    outputs: BTreeMap<String, Tensor>,
}

#[cfg(feature = "mlir")]
impl MlirCpuBackend {
    /// Compiles `step` with MLIR's CPU pipeline.
    pub fn new(step: &cleave_ir::Function) -> Result<MlirCpuBackend> {
        Ok(MlirCpuBackend {
            prog: cleave_mlir::cpu::compile_cpu(step)?,
            names: step.outputs.iter().map(|o| o.name.clone()).collect(),
            args: BTreeMap::new(),
            outputs: BTreeMap::new(),
        })
    }
}

#[cfg(feature = "mlir")]
impl StepBackend for MlirCpuBackend {
    fn set(&mut self, name: &str, t: &Tensor) -> Result<()> {
        self.args.insert(name.to_string(), t.clone());
        Ok(())
    }
    fn run(&mut self) -> Result<()> {
        let out = self.prog.run(&self.args)?;
        self.outputs = self.names.iter().cloned().zip(out).collect();
        Ok(())
    }
    fn output(&mut self, name: &str) -> Result<Tensor> {
        self.outputs
            .get(name)
            .cloned()
            .with_context(|| format!("no output `{name}`"))
    }
    fn carry(&mut self) -> Result<()> {
        for (k, v) in &self.outputs {
            if let Some(a) = self.args.get_mut(k) {
                *a = v.clone();
            }
        }
        Ok(())
    }
    fn arg(&mut self, name: &str) -> Result<Tensor> {
        self.args
            .get(name)
            .cloned()
            .with_context(|| format!("no argument `{name}`"))
    }
}

/// The CUDA runtime as a [`StepBackend`]: everything resident on the device.
#[cfg(all(feature = "mlir", feature = "cuda"))]
pub struct CudaBackend<'d> {
    runner: cleave_runtime::cuda::GpuRunner<'d>,
}

#[cfg(all(feature = "mlir", feature = "cuda"))]
impl<'d> CudaBackend<'d> {
    /// Compiles `step` to PTX with the default GPU pipeline and loads it on `dev`.
    pub fn new(
        dev: &'d cleave_runtime::cuda::Device,
        step: &cleave_ir::Function,
        gemm: GemmArg,
    ) -> Result<CudaBackend<'d>> {
        let prog =
            cleave_mlir::gpu::compile_gpu(step, &cleave_mlir::pipeline::default_gpu_pipeline())
                .with_context(|| format!("compiling @{} for CUDA", step.name))?;
        let mode = match gemm {
            GemmArg::Cublas => cleave_runtime::cuda::GemmMode::Cublas,
            GemmArg::Mlir => cleave_runtime::cuda::GemmMode::Mlir,
        };
        let runner = cleave_runtime::cuda::GpuRunner::with_gemm(dev, prog.descriptor(), mode)?;
        Ok(CudaBackend { runner })
    }

    /// The runner.
    pub fn runner(&mut self) -> &mut cleave_runtime::cuda::GpuRunner<'d> {
        &mut self.runner
    }
}

#[cfg(all(feature = "mlir", feature = "cuda"))]
impl StepBackend for CudaBackend<'_> {
    fn set(&mut self, name: &str, t: &Tensor) -> Result<()> {
        Ok(self.runner.set_arg(name, t)?)
    }
    fn run(&mut self) -> Result<()> {
        Ok(self.runner.run_resident()?)
    }
    fn output(&mut self, name: &str) -> Result<Tensor> {
        Ok(self.runner.output(name)?)
    }
    fn carry(&mut self) -> Result<()> {
        Ok(self.runner.carry()?)
    }
    fn arg(&mut self, name: &str) -> Result<Tensor> {
        Ok(self.runner.arg(name)?)
    }
}

/// Rejects the training options the single-device backends do not have.
#[cfg(feature = "mlir")]
fn check_supported(a: &TrainArgs, target: &str) -> Result<()> {
    if crate::train::parse_precision(a.precision.as_deref())?
        == cleave_passes::precision::Precision::F16
    {
        bail!(
            "--target {target}: --precision f16 trains with a dynamic loss scale, which the \
             stage pipeline applies (`cleave train --target cuda` runs f16 there, as \
             `--target cpu` runs it on the CPU pipeline); this one-function step has no loss \
             scale"
        );
    }
    let unsupported = [
        (a.stages > 1, "--stages > 1"),
        (a.microbatches > 1, "--microbatches > 1"),
        (a.remat.is_some(), "--remat"),
        (a.memory_limit.is_some(), "--memory-limit"),
        (a.timeline.is_some(), "--timeline"),
        (a.fail_action.is_some(), "--fail-action"),
        (a.kill_action.is_some(), "--kill-action"),
        (a.chunk_lm_head.is_some(), "--chunk-lm-head"),
        (a.grad_clip.is_some(), "--grad-clip"),
        (a.debug_nan, "--debug-nan"),
    ];
    for (bad, what) in unsupported {
        if bad {
            bail!(
                "--target {target}: {what} is not supported (training on {target} runs one \
                 device without pipeline stages, recomputation or NaN tracing); use --target cpu"
            );
        }
    }
    Ok(())
}

/// Trains like [`crate::train::train`], running each step on the backend `make` builds from the
/// training step (see the module docs). `target` names the backend in messages.
#[cfg(feature = "mlir")]
pub fn train_on<B: StepBackend>(
    a: &TrainArgs,
    target: &str,
    make: impl FnOnce(&cleave_ir::Function) -> Result<B>,
) -> Result<TrainSummary> {
    use cleave_passes::autodiff::methods::FG_TANGENT_PREFIX;
    use cleave_runtime::{tensor_from_host, HostData, Plan};

    use crate::train::{
        build_step_compressed, checkpoint_meta, eval_plan, evaluate, gather_batch, initial_state,
        parse_grad_method, set_args, split_data, write_checkpoint, Metrics, Order, Progress,
    };

    check_supported(a, target)?;
    let method = parse_grad_method(&a.grad_method, a.tangents)?;
    let lr = a.lr.unwrap_or(a.optimizer.default_lr());
    let built = build_step_compressed(
        &a.model,
        a.batch,
        (a.loss, a.labels.clone(), a.loss_output.clone()),
        a.optimizer,
        lr,
        &method,
        (
            crate::train::parse_compress(a.compress.as_deref())?,
            crate::train::parse_precision(a.precision.as_deref())?,
        ),
    )?;
    let batch = built.batch;
    let (cols, n, n_train) = split_data(&a.data, &built.forward, batch)?;
    let n_eval = n - n_train;
    let step_fn = &built.step;
    let mut exec = make(step_fn)?;
    let mut eval_plans: Option<Plan> = None;

    let (mut state, start) = initial_state(&built, a.seed, a.resume.as_deref(), &a.optimizer)?;
    // Upload the state once; it stays with the backend.
    for (name, (shape, d)) in &state {
        exec.set(name, &tensor_from_host(shape, d))?;
    }
    let data_shapes: Vec<Vec<usize>> = cols
        .iter()
        .map(|c| {
            step_fn
                .args()
                .find(|x| x.name == c.name)
                .map(|x| x.ty.shape.clone())
                .with_context(|| format!("the training step has no input `{}`", c.name))
        })
        .collect::<Result<_>>()?;
    let tangents: Vec<(String, Vec<usize>)> = step_fn
        .args()
        .filter(|x| x.name.starts_with(FG_TANGENT_PREFIX))
        .map(|x| (x.name.to_string(), x.ty.shape.clone()))
        .collect();
    let state_names: Vec<String> = state
        .keys()
        .filter(|n| step_fn.output(n).is_some())
        .cloned()
        .collect();

    let mut metrics = Metrics::open(a.metrics.as_deref())?;
    let mut order = Order::new(n_train, a.seed);
    let labels_name = ["labels", "targets"]
        .into_iter()
        .find(|n| cols.iter().any(|c| c.name == *n));
    let can_eval = n_eval > 0 && built.forward.output("logits").is_some() && labels_name.is_some();
    let mut summary = TrainSummary::default();
    let mut progress = Progress::new(start);
    for step in start..a.steps {
        let rows = order.rows(step, batch);
        for (c, shape) in cols.iter().zip(&data_shapes) {
            exec.set(&c.name, &tensor_from_host(shape, &gather_batch(c, &rows)))?;
        }
        if !tangents.is_empty() {
            let sizes: Vec<usize> = tangents.iter().map(|(_, s)| s.iter().product()).collect();
            let drawn = crate::train::draw_tangents(a.seed, step, &sizes);
            for ((name, shape), d) in tangents.iter().zip(&drawn) {
                exec.set(name, &tensor_from_host(shape, d))?;
            }
        }
        exec.run()?;
        let loss = exec
            .output("loss")?
            .to_f64_vec()
            .first()
            .copied()
            .unwrap_or(f64::NAN);
        if !loss.is_finite() {
            let mut msg = format!("loss is {loss} at step {step}; training stopped");
            msg.push_str("; rerun with --target cpu --debug-nan to find the op that produced it");
            if let Some(dir) = &a.checkpoint {
                msg.push_str(&format!(
                    "; the last checkpoint in {} is kept",
                    dir.display()
                ));
            }
            if !a.quiet {
                eprintln!();
            }
            bail!(msg);
        }
        let done = step + 1;
        progress.step(a, &mut summary, &mut metrics, done, loss)?;
        exec.carry()?;
        let (ckpt_due, eval_due) = Progress::due(a, done, can_eval);
        // Download the state only when something needs it.
        let mut host: BTreeMap<String, HostData> = BTreeMap::new();
        if ckpt_due || eval_due {
            for name in &state_names {
                if ckpt_due || built.forward.args().any(|x| x.name == name.as_str()) {
                    let t = exec.arg(name)?;
                    host.insert(
                        name.clone(),
                        cleave_runtime::host_from_tensor(&t).context("state tensors are f32")?,
                    );
                }
            }
        }
        if eval_due {
            let eval_plan = eval_plan(&mut eval_plans, &built.forward, a.codegen)?;
            set_args(eval_plan, &host)?;
            let (acc, eval_loss) = evaluate(
                eval_plan,
                &cols,
                labels_name.expect("checked"),
                n_train,
                n,
                batch,
            )?;
            progress.eval(
                a,
                &mut summary,
                &mut metrics,
                (done, loss),
                (acc, eval_loss),
            )?;
        }
        if ckpt_due {
            for (name, d) in host {
                state.get_mut(&name).expect("state").1 = d;
            }
            let dir = a.checkpoint.as_ref().expect("checked");
            write_checkpoint(dir, &state, checkpoint_meta(a, done, batch, lr, &method))?;
        }
    }
    if !a.quiet {
        eprintln!();
    }
    summary.steps_per_s = progress.overall(&summary);
    Ok(summary)
}

/// `cleave train --target cuda`: opens GPU 0 (a missing driver is a clear error), then trains
/// with `train_on` on the CUDA backend.
pub fn train_cuda(
    a: &crate::train::TrainArgs,
    gemm: GemmArg,
) -> Result<crate::train::TrainSummary> {
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (a, gemm);
        anyhow::bail!(
            "--target cuda: this cleave binary was built without CUDA support; rebuild it with \
             `cargo build --release --features mlir,cuda` (--features cuda adds the CUDA \
             runtime, mlir the compiler to PTX; a CUDA driver, libcuda.so, is needed to run)"
        )
    }
    #[cfg(feature = "cuda")]
    {
        // Under mpirun every rank runs one pipeline device on GPU `rank mod count`.
        let ranks = crate::train::launched_ranks();
        if ranks > 1 && !cfg!(feature = "nccl") {
            anyhow::bail!(
                "--target cuda launched as {ranks} MPI processes: GPU pipeline stages as \
                 processes need the `nccl` feature; rebuild with `cargo build --release \
                 --features gpu,nccl` (Open MPI: scripts/install-mpi.sh), or run every stage \
                 on one GPU without mpirun"
            );
        }
        let ordinal = if ranks > 1 {
            let count = cleave_runtime::cuda::device_count()
                .map_err(|e| anyhow::anyhow!("--target cuda: {e}"))?;
            launched_rank() % count.max(1)
        } else {
            0
        };
        let dev = cleave_runtime::cuda::Device::new(ordinal)
            .map_err(|e| anyhow::anyhow!("--target cuda: {e}"))?;
        #[cfg(not(feature = "mlir"))]
        {
            let _ = (a, gemm, dev);
            anyhow::bail!(
                "--target cuda: training compiles the step through MLIR, and this cleave was \
                 built without it: rebuild with `cargo build --release --features mlir,cuda` \
                 after installing LLVM/MLIR 22 with scripts/install-llvm.sh"
            )
        }
        #[cfg(feature = "mlir")]
        // `--precision f16`'s dynamic loss scale runs on the stage pipeline only (one stage and
        // one microbatch too).
        if a.stages > 1
            || a.microbatches > 1
            || crate::pipeline_train::LossScaler::for_args(a)?.is_some()
        {
            // Every stage on a stream of its own (only this rank's stages under mpirun).
            let n = crate::pipeline_train::build_schedule(&a.schedule, a.stages, a.microbatches)?
                .n_stages();
            let streams = (0..n)
                .map(|_| dev.fork())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| anyhow::anyhow!("--target cuda: {e}"))?;
            #[cfg(feature = "nccl")]
            let nccl = crate::gpu_pipeline::NcclConnect { dev: &dev };
            #[cfg(feature = "nccl")]
            let connect: Option<&dyn crate::gpu_pipeline::Connect> = Some(&nccl);
            #[cfg(not(feature = "nccl"))]
            let connect: Option<&dyn crate::gpu_pipeline::Connect> = None;
            crate::gpu_pipeline::train_stages_on(a, "cuda", connect, |f, s| {
                CudaBackend::new(&streams[s], f, gemm)
            })
            .map(|r| r.summary)
        } else {
            train_on(a, "cuda", |f| CudaBackend::new(&dev, f, gemm))
        }
    }
}

/// This process's rank under an MPI launcher (0 without one).
#[cfg(feature = "cuda")]
fn launched_rank() -> usize {
    ["OMPI_COMM_WORLD_RANK", "PMI_RANK"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
        .unwrap_or(0)
}

/// What `cleave bench --target cuda` measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CudaBenchResult {
    /// The GPU's name.
    pub device: String,
    /// Median milliseconds of one training step (CUDA events around the step's kernels and
    /// GEMMs, the state carried on the device; the batch is already resident, as in PyTorch's
    /// loop).
    pub median_ms: f64,
    /// Timed steps.
    pub iters: usize,
    /// Milliseconds to compile the step to PTX through MLIR.
    pub compile_ms: f64,
    /// Kernel groups of the step.
    pub groups: usize,
    /// PTX launches per step (of the groups not on cuBLAS).
    pub launches: usize,
    /// Groups run as cuBLAS GEMMs.
    pub cublas_groups: usize,
    /// `cublas` or `mlir`.
    pub gemm: String,
    /// Bytes of device buffers.
    pub device_bytes: usize,
    /// FLOPs of one step by cleave-ir's cost model.
    pub flops: u64,
    /// The matmul part of `flops`.
    pub matmul_flops: u64,
    /// The last timed step's loss.
    pub loss: f64,
    /// With `--profile N`: one more step with every group timed on its own (events between
    /// groups): milliseconds on cuBLAS and in MLIR kernels, and the N slowest groups.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<serde_json::Value>,
}

/// `cleave bench --target cuda`: the median step time on GPU 0 with CUDA events.
pub fn bench_cuda(
    a: &crate::train::BenchArgs,
    gemm: GemmArg,
    profile: Option<usize>,
) -> Result<CudaBenchResult> {
    #[cfg(not(all(feature = "cuda", feature = "mlir")))]
    {
        let _ = (a, gemm, profile);
        #[cfg(feature = "cuda")]
        {
            cleave_runtime::cuda::Device::new(0)
                .map_err(|e| anyhow::anyhow!("--target cuda: {e}"))?;
            anyhow::bail!(
                "--target cuda: the step is compiled through MLIR, and this cleave was built \
                 without it: rebuild with `cargo build --release --features mlir,cuda`"
            )
        }
        #[cfg(not(feature = "cuda"))]
        anyhow::bail!(
            "--target cuda: this cleave binary was built without CUDA support; rebuild it with \
             `cargo build --release --features mlir,cuda` (--features cuda adds the CUDA \
             runtime, mlir the compiler to PTX; a CUDA driver, libcuda.so, is needed to run)"
        )
    }
    #[cfg(all(feature = "cuda", feature = "mlir"))]
    {
        use crate::train::{bench_inputs, build_step_with, parse_grad_method};
        let dev = cleave_runtime::cuda::Device::new(0)
            .map_err(|e| anyhow::anyhow!("--target cuda: {e}"))?;
        if a.interp || a.no_jit {
            bail!("--target cuda: --interp and --no-jit are CPU options");
        }
        let method = parse_grad_method(&a.grad_method, a.tangents)?;
        let built = build_step_with(
            &a.model,
            a.batch,
            (a.loss, a.labels.clone(), a.loss_output.clone()),
            a.optimizer,
            a.optimizer.default_lr() * 0.01,
            &method,
        )?;
        let step = &built.step;
        let cost = cleave_ir::cost::function_cost(step).total();
        let args = bench_inputs(&built);
        let t = Instant::now();
        let mut be = CudaBackend::new(&dev, step, gemm)?;
        let compile_ms = t.elapsed().as_secs_f64() * 1e3;
        for (name, v) in &args {
            be.set(name, v)?;
        }
        let (start, end) = (dev.event()?, dev.event()?);
        let mut times = Vec::with_capacity(a.iters);
        for i in 0..a.warmup + a.iters {
            dev.record(&start)?;
            be.run()?;
            be.carry()?;
            dev.record(&end)?;
            let ms = dev.elapsed_ms(&start, &end)? as f64;
            if i >= a.warmup {
                times.push(ms);
            }
        }
        let loss = be
            .output("loss")?
            .to_f64_vec()
            .first()
            .copied()
            .unwrap_or(f64::NAN);
        times.sort_by(|x, y| x.total_cmp(y));
        let r = be.runner();
        let profile = match profile {
            None => None,
            Some(top) => {
                let mut groups = r.run_profiled()?;
                let on = |blas: bool| -> f64 {
                    groups
                        .iter()
                        .filter(|g| g.3 == blas)
                        .map(|g| g.2 as f64)
                        .sum()
                };
                let (blas_ms, mlir_ms) = (on(true), on(false));
                groups.sort_by(|x, y| y.2.total_cmp(&x.2));
                let slowest: Vec<serde_json::Value> = groups
                    .iter()
                    .take(top)
                    .map(|(name, ops, ms, blas)| {
                        let ops: String = ops.chars().take(120).collect();
                        serde_json::json!({"group": name, "ops": ops, "ms": ms, "cublas": blas})
                    })
                    .collect();
                Some(
                    serde_json::json!({"cublas_ms": blas_ms, "mlir_kernels_ms": mlir_ms,
                    "slowest": slowest}),
                )
            }
        };
        let cublas_groups = r.cublas_groups();
        let device_bytes = r.device_bytes();
        let (groups, launches) = r.counts();
        Ok(CudaBenchResult {
            device: dev.name().unwrap_or_default(),
            median_ms: times.get(times.len() / 2).copied().unwrap_or(f64::NAN),
            iters: a.iters,
            compile_ms,
            groups,
            launches,
            cublas_groups,
            gemm: format!("{gemm:?}").to_lowercase(),
            device_bytes,
            flops: cost.total(),
            matmul_flops: cost.matmul,
            loss,
            profile,
        })
    }
}
