//! `cleave train` and `cleave bench`: training loops on the CPU runtime.
//!
//! # Training
//!
//! The model file holds a forward function with a scalar `loss` output. `train` initialises the
//! parameters ([`crate::init`], seed `--seed`, default 0), builds one training-step function with
//! the passes `autodiff,optimizer{kind=…,lr=…}`, compiles it with [`cleave_runtime`] and runs it
//! `--steps` times, feeding each step's parameters and optimizer state into the next.
//!
//! **Data.** `--data` is a safetensors file with one tensor per data input of the model, named
//! like the input (`x`, `labels` for the MLP; `tokens`, `targets` for GPT). The first dimension
//! counts examples; the others must equal the input's. The last tenth of the examples (at least
//! one batch, when there are at least two batches) is held out for evaluation; training uses
//! the rest.
//!
//! **Order.** Without `--seed` the training examples are visited in file order, wrapping around
//! at the end. With `--seed S` every epoch visits them in a fresh permutation drawn from
//! SplitMix64 seeded by `S` and the epoch number (and `S` also seeds the parameter
//! initialisation). Step `k` always reads examples `k·B … k·B+B−1` of this endless sequence, so
//! the data cursor is a function of the step and a resumed run reads exactly what an
//! uninterrupted one would.
//!
//! **Batch.** Models are traced at a fixed batch (the first dimension of the data inputs).
//! `--batch` must equal it: a different value is an error that says how to regenerate the model.
//!
//! **Evaluation** (`--eval-every K`, and after the last step when the model has a `logits`
//! output): the forward function runs over the held-out batches; accuracy is the fraction of
//! positions where the argmax of `logits` over its last dimension equals the label (the data
//! input `labels`, or `targets`).
//!
//! **Checkpoints** (`--checkpoint DIR`, every `--checkpoint-every` steps and at the end):
//! `DIR/checkpoint.safetensors` holds every parameter and optimizer-state tensor, with the step,
//! the data cursor, the seed, the optimizer and the learning rate in its metadata. It is written
//! to a temporary file, synced and renamed over the old one, so an interrupted write leaves the
//! previous checkpoint intact (the environment variable `CLEAVE_FAIL_CHECKPOINT_WRITE=1` makes the
//! write fail after the temporary file is half written, for tests). `--resume DIR` continues from
//! such a checkpoint bit for bit like an uninterrupted run (`--steps` counts from step 0).
//!
//! **Non-finite loss.** Training stops with an error naming the step; the last checkpoint stays
//! as it was. With `--debug-nan` the step is compiled without fusion and every stored value is
//! checked, so the error also names the first node (`%N = op`) that produced a NaN or infinity.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use cleave_ir::{ArgRole, DType, Function, Module, TensorData};
use cleave_passes::{PassContext, PassManager};
use cleave_runtime::{compile_with, Codegen, CompileOptions, HostData, Plan};
use safetensors::tensor::TensorView;

use cleave_passes::autodiff::methods::{GradMethod, FG_TANGENT_PREFIX};
use cleave_passes::autodiff::Compress;
use cleave_passes::precision::Precision;

use crate::init::{init_params, SplitMix64};
use crate::load::load_model;

/// Optimizers of `cleave train`.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum OptimizerArg {
    /// Plain SGD (default lr 0.1).
    Sgd,
    /// SGD with momentum 0.9 (default lr 0.05).
    Momentum,
    /// AdamW, β = (0.9, 0.999), weight decay 0.01 (default lr 0.003).
    Adamw,
}

impl OptimizerArg {
    pub fn name(self) -> &'static str {
        match self {
            OptimizerArg::Sgd => "sgd",
            OptimizerArg::Momentum => "momentum",
            OptimizerArg::Adamw => "adamw",
        }
    }

    /// Copies of each parameter the optimizer keeps as state (momentum: the velocity; AdamW: the
    /// two moments).
    pub fn state_copies(self) -> u64 {
        match self {
            OptimizerArg::Sgd => 0,
            OptimizerArg::Momentum => 1,
            OptimizerArg::Adamw => 2,
        }
    }

    pub fn default_lr(self) -> f64 {
        match self {
            OptimizerArg::Sgd => 0.1,
            OptimizerArg::Momentum => 0.05,
            OptimizerArg::Adamw => 0.003,
        }
    }
}

/// The executor of a pipelined run on the CPU (`--executor`).
#[derive(Clone, Copy, Debug, Default, ValueEnum, PartialEq, Eq)]
pub enum Executor {
    /// A worker thread per device (a process per device under mpirun).
    #[default]
    Threads,
    /// One host thread over every device's action list (the `--target cuda --stages` executor).
    List,
}

/// Arguments of `cleave train`.
#[derive(clap::Args, Debug, Clone)]
pub struct TrainArgs {
    /// Model file (`.cir`) with a scalar `loss` output.
    pub model: PathBuf,
    /// Training data (safetensors), one tensor per data input.
    #[arg(long)]
    pub data: PathBuf,
    /// Total number of steps (a resumed run counts from step 0).
    #[arg(long, default_value_t = 100)]
    pub steps: usize,
    /// Batch size: must equal a `.cir` model's traced batch; binds an `.onnx` model's symbolic
    /// batch dimension.
    #[arg(long)]
    pub batch: Option<usize>,
    /// Add a loss to a model exported without one (needs --labels).
    #[arg(long, value_enum)]
    pub loss: Option<crate::loss::LossKind>,
    /// The labels input of --loss.
    #[arg(long)]
    pub labels: Option<String>,
    /// The scalar output that is the loss, for a model with several (see `cleave grad
    /// --loss-output`).
    #[arg(long)]
    pub loss_output: Option<String>,
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
    /// Check every value for NaN/Inf and name the first op that produced one (slower).
    #[arg(long)]
    pub debug_nan: bool,
    /// No progress line on stderr.
    #[arg(long)]
    pub quiet: bool,
    /// Code generator of the fused loops: cranelift (needs only Rust) or llvm (the `llvm`
    /// cargo feature).
    #[arg(long, default_value_t = Codegen::default())]
    pub codegen: Codegen,
    /// Pipeline stages (devices); with more than one stage or microbatch, training runs on the
    /// pipeline executor (see [`crate::pipeline_train`]).
    #[arg(long, default_value_t = 1)]
    pub stages: usize,
    /// The pipeline's executor on the CPU: `threads` (a worker thread per device, or a process
    /// per device under mpirun), or `list` (one host thread walks the devices' action lists: the
    /// executor of `--target cuda --stages`, on CPU plans, for checking it).
    #[arg(long, value_enum, default_value_t = Executor::Threads, hide = true)]
    pub executor: Executor,
    /// Microbatches per step: the model's traced batch is the microbatch, a step reads M of them.
    #[arg(long, default_value_t = 1)]
    pub microbatches: usize,
    /// Pipeline schedule: gpipe, 1f1b, zb-h1, zb-h2, interleaved, zb-v, v-min, v-half,
    /// dualpipev, hanayo (or `hanayo-<waves>`), auto.
    #[arg(long, default_value = "1f1b")]
    pub schedule: String,
    /// Write each action's measured start and end per device (JSON).
    #[arg(long)]
    pub timeline: Option<PathBuf>,
    /// Make this pipeline action (e.g. `1B3`) fail at its first run (for tests).
    #[arg(long, hide = true)]
    pub fail_action: Option<String>,
    /// End this process with SIGKILL when this pipeline action (e.g. `1F2`) starts, at step
    /// STEP (`STEP:ACTION`; step 0 without it), for fault tests of `mpirun` runs.
    #[arg(long, hide = true)]
    pub kill_action: Option<String>,
    /// Recomputation/offload policy of saved activations: none, full, selective, offload-all,
    /// auto (the default with --memory-limit); runs on the pipeline executor.
    #[arg(long)]
    pub remat: Option<String>,
    /// Bytes each device may hold: parameters, gradients, the plans' buffers and scratch, values
    /// crossing devices and saved activations (suffix K, M, G allowed).
    #[arg(long)]
    pub memory_limit: Option<String>,
    /// Clip the gradient's global L2 norm (of the mean loss's gradient, over every parameter) to
    /// this value. Runs on the pipeline executor with post-update validation: each stage steps
    /// its optimizer as soon as its gradients are complete, and a step whose norm exceeds the
    /// limit is redone from the previous weights with the clipped gradient (a non-finite norm
    /// rolls the step back).
    #[arg(long, value_name = "NORM")]
    pub grad_clip: Option<f64>,
    /// Run the output layer and its cross-entropy in K row chunks (the pass
    /// `chunk{ops=lm-head,k=K}`; runs on the pipeline executor): the training step leaves out
    /// the `logits` output and no [rows, vocab] value exists; exact, with the output layer's
    /// weight gradient summed over the chunks (another summation order: within 1e-6).
    #[arg(long, value_name = "K")]
    pub chunk_lm_head: Option<usize>,
    /// Gradient method: bp, forward-gradient, fa, dfa, local{blocks=K} (see
    /// `cleave_passes::autodiff::methods`).
    #[arg(long, default_value = "bp")]
    pub grad_method: String,
    /// Random tangents averaged per step by `--grad-method forward-gradient`.
    #[arg(long, default_value_t = 1)]
    pub tangents: usize,
    /// Lossy stash compression, opt-in, comma-separated: `fewbit[:BITS]` (few-bit backward of
    /// GELU/SiLU, 1 to 4 bits, default 2), `rank1[:GROUP][:VECTOR]` (rank-1 sub-token
    /// projection of linear layers' inputs for their weight gradients, default 8; the vector
    /// `mean`, the default, or `batch`, the batch's average sub-token), `bf16` (saved
    /// activations in bfloat16) and `int8` (saved activations as 8-bit codes with a scale per
    /// row). Under --memory-limit the plan chooses among them per value;
    /// there `chunked[:K]` also lets it run the output layer in K row chunks (exact; without K
    /// it tries 2, 4, 8 and 16).
    #[arg(long, value_name = "METHOD")]
    pub compress: Option<String>,
    /// Compute precision: `f32` (the default), `bf16` (mixed precision: every GEMM in
    /// bfloat16 with f32 master weights, the rest in f32, as autocast does; the `precision`
    /// pass) or `f16` (the GEMMs in IEEE half precision with a dynamic loss scale: the backward
    /// is seeded with the scale, a step whose gradients overflow is skipped and the scale
    /// halved, and it doubles after --loss-scale-window finite steps; runs on the pipeline
    /// executor). CPU only.
    #[arg(long, value_name = "DTYPE")]
    pub precision: Option<String>,
    /// `--precision f16`: the initial loss scale (a power of two keeps the scaling exact).
    #[arg(long, value_name = "S", default_value_t = 65536.0)]
    pub loss_scale: f64,
    /// `--precision f16`: finite steps after which the loss scale doubles (0: it never grows).
    #[arg(long, value_name = "STEPS", default_value_t = 2000)]
    pub loss_scale_window: usize,
    /// Print each device's planned memory (parameters, gradients, workspace, values crossing
    /// devices, saved values) beside the instrumented allocator's measured peak (pipeline
    /// executor).
    #[arg(long)]
    pub memory_report: bool,
}

/// Parses `--grad-method` and `--tangents`.
pub fn parse_grad_method(text: &str, tangents: usize) -> Result<GradMethod> {
    GradMethod::parse(text, tangents).map_err(|e| anyhow::anyhow!("--grad-method {e}"))
}

/// Arguments of `cleave bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Model file (`.cir`) with a scalar `loss` output.
    pub model: PathBuf,
    /// Batch size: must equal a `.cir` model's traced batch; binds an `.onnx` model's symbolic
    /// batch dimension.
    #[arg(long)]
    pub batch: Option<usize>,
    /// Add a loss to a model exported without one (needs --labels).
    #[arg(long, value_enum)]
    pub loss: Option<crate::loss::LossKind>,
    /// The labels input of --loss.
    #[arg(long)]
    pub labels: Option<String>,
    /// The scalar output that is the loss, for a model with several.
    #[arg(long)]
    pub loss_output: Option<String>,
    /// Untimed steps first.
    #[arg(long, default_value_t = 20)]
    pub warmup: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 200)]
    pub iters: usize,
    /// Print `{"median_ms": X, ...}`.
    #[arg(long)]
    pub json: bool,
    /// Optimizer.
    #[arg(long, value_enum, default_value = "sgd")]
    pub optimizer: OptimizerArg,
    /// Time the reference interpreter instead of the runtime.
    #[arg(long)]
    pub interp: bool,
    /// Interpret every fused loop instead of compiling it.
    #[arg(long)]
    pub no_jit: bool,
    /// Code generator of the fused loops: cranelift (needs only Rust) or llvm (the `llvm`
    /// cargo feature).
    #[arg(long, default_value_t = Codegen::default())]
    pub codegen: Codegen,
    /// Gradient method: bp, forward-gradient, fa, dfa, local{blocks=K}.
    #[arg(long, default_value = "bp")]
    pub grad_method: String,
    /// Random tangents averaged per step by `--grad-method forward-gradient`.
    #[arg(long, default_value_t = 1)]
    pub tangents: usize,
    /// Time the step of `cleave train --precision bf16` (the GEMMs in bf16; `f32`, the
    /// default, changes nothing; `f16` needs the loss-scaling trainer and is refused).
    #[arg(long)]
    pub precision: Option<String>,
}

/// What a training run ended with.
#[derive(Clone, Debug, Default)]
pub struct TrainSummary {
    /// Steps run in this invocation.
    pub steps_run: usize,
    /// The last step's loss.
    pub final_loss: Option<f64>,
    /// The last evaluation's accuracy.
    pub accuracy: Option<f64>,
    /// Wall-clock training throughput.
    pub steps_per_s: f64,
    /// This process's rank when each pipeline device is a process (MPI); only rank 0 reports.
    pub process_rank: usize,
}

const CKPT_FILE: &str = "checkpoint.safetensors";

/// The forward function and the training step built from it.
pub struct Built {
    /// The forward function.
    pub forward: Function,
    /// The training step.
    pub step: Function,
    /// The traced batch size.
    pub batch: usize,
    /// Parameter values stored in the model file (an `.onnx` model's initializers): training
    /// starts from them instead of a fresh initialisation.
    pub file_params: BTreeMap<String, cleave_ir::Tensor>,
}

/// Loads a model and builds its training step (backprop).
pub fn build_step(
    model: &Path,
    batch: Option<usize>,
    loss: (
        Option<crate::loss::LossKind>,
        Option<String>,
        Option<String>,
    ),
    opt: OptimizerArg,
    lr: f64,
) -> Result<Built> {
    build_step_with(model, batch, loss, opt, lr, &GradMethod::Bp)
}

/// A model loaded for training: the loaded module (with any parameters stored in the file), a copy
/// of its forward function, checked to have a scalar `loss` output and a batched data input, and
/// the batch it was traced at. `batch` binds an `.onnx` model's symbolic batch; a `.cir` model's
/// shapes are fixed (callers check `--batch` against `traced` with their own wording).
pub struct TrainingModel {
    /// The module and its stored parameters.
    pub loaded: crate::load::LoadedModel,
    /// The forward function (the module's first).
    pub forward: cleave_ir::Function,
    /// The leading extent of the first data input.
    pub traced: usize,
}

/// Loads `model` for training (see [`TrainingModel`]).
pub fn load_training_model(
    model: &Path,
    batch: Option<usize>,
    loss: Option<crate::loss::LossKind>,
    labels: Option<String>,
    loss_output: Option<String>,
) -> Result<TrainingModel> {
    let onnx = model.extension().is_some_and(|e| e == "onnx");
    let loaded = load_model(
        model,
        &crate::load::LoadOptions {
            batch: if onnx { batch } else { None },
            loss,
            labels,
            loss_output,
        },
    )?;
    loaded.check_trainable(model)?;
    let forward = crate::load::forward_of(&loaded.module)?;
    if forward.output("loss").is_none() {
        bail!(
            "@{}: training needs a scalar output named `loss`",
            forward.name
        );
    }
    let traced = forward
        .data_inputs()
        .next()
        .and_then(|a| a.ty.shape.first().copied())
        .context("the model has no data input with a batch dimension")?;
    Ok(TrainingModel {
        loaded,
        forward,
        traced,
    })
}

/// The function a training step differentiates: `forward` itself, or with `chunk = Some(K)`
/// its output layer and cross-entropy in K row chunks (`chunk{ops=lm-head,k=K}`), without the
/// `logits` output, which a step does not need (evaluation runs `forward`).
pub fn training_forward(forward: &Function, chunk: Option<usize>) -> Result<Function> {
    let Some(k) = chunk else {
        return Ok(forward.clone());
    };
    cleave_passes::plan::chunked_forward(forward, k)
        .map_err(|e| anyhow::anyhow!("--chunk-lm-head {k}: {}", e.0))
}

/// [`load_training_model`] with the model flags of `a` (`--batch`, `--loss`, `--labels`,
/// `--loss-output`).
pub fn load_training_model_for(a: &TrainArgs) -> Result<TrainingModel> {
    let mut tm = load_training_model(
        &a.model,
        a.batch,
        a.loss,
        a.labels.clone(),
        a.loss_output.clone(),
    )?;
    narrow_forward(
        &mut tm.forward,
        &a.model,
        parse_precision(a.precision.as_deref())?,
    )?;
    Ok(tm)
}

/// `--precision bf16|f16`: the forward's GEMMs in the narrow type, with f16's loss-scale input
/// ([`cleave_passes::precision`]); a model without a GEMM is an error naming `model`. `f32`
/// changes nothing.
pub fn narrow_forward(forward: &mut Function, model: &Path, precision: Precision) -> Result<()> {
    if precision == Precision::F32 {
        return Ok(());
    }
    let name = precision.name();
    let done = cleave_passes::precision::narrow_gemms(forward, precision)
        .map_err(|e| anyhow::anyhow!("--precision {name}: {}: {e}", model.display()))?;
    if done == 0 {
        bail!(
            "--precision {name} runs the GEMMs in {name}, and {} has no f32 matmul",
            model.display()
        );
    }
    cleave_ir::verify_function(forward).map_err(|e| {
        let e: Vec<String> = e.iter().map(|x| x.to_string()).collect();
        anyhow::anyhow!("--precision {name}: {}", e.join("; "))
    })
}

/// `--precision` (default f32).
pub fn parse_precision(text: Option<&str>) -> Result<Precision> {
    text.map_or(Ok(Precision::F32), Precision::parse)
        .map_err(|e| anyhow::anyhow!("--precision {e}"))
}

/// Loads a model and builds its training step with a gradient method.
pub fn build_step_with(
    model: &Path,
    batch: Option<usize>,
    loss: (
        Option<crate::loss::LossKind>,
        Option<String>,
        Option<String>,
    ),
    opt: OptimizerArg,
    lr: f64,
    method: &GradMethod,
) -> Result<Built> {
    build_step_compressed(
        model,
        batch,
        loss,
        opt,
        lr,
        method,
        (Compress::default(), Precision::F32),
    )
}

/// `--compress`: the stash compression methods named, comma-separated: `fewbit` or
/// `fewbit:B` (few-bit backward of GELU/SiLU, B bits, default 2) and `rank1` or `rank1:G`
/// (rank-1 sub-token projection of linear layers' inputs, groups of G features, default 8), with
/// `:batch` or `:mean` after it for the vector (`rank1:8:batch`, `rank1:batch`).
/// Methods of the precision issue that are not built yet are named as such. `chunked[:K]` is
/// the plan's choice of the chunked output layer, which only the pipeline planner makes
/// ([`parse_compress_planned`]): here it is an error.
pub fn parse_compress(text: Option<&str>) -> Result<Compress> {
    let (c, chunk) = parse_compress_planned(text)?;
    if let Some(&k) = chunk.first() {
        bail!(
            "--compress chunked: the chunked output layer is a choice of the memory plan \
             under --memory-limit (`cleave train`, `cleave inspect --memory`); to always chunk \
             it in training use --chunk-lm-head K (e.g. --chunk-lm-head {k})"
        );
    }
    Ok(c)
}

/// [`parse_compress`], and the numbers of chunks the plan may try for the output layer and its
/// loss (`chunk{ops=lm-head,k=K}`): `chunked:K` names one, `chunked` lets the plan search
/// [`cleave_passes::plan::CHUNK_CHOICES`]; empty when `chunked` is not named.
pub fn parse_compress_planned(text: Option<&str>) -> Result<(Compress, Vec<usize>)> {
    let mut c = Compress::default();
    let mut chunk = Vec::new();
    for item in text.into_iter().flat_map(|t| t.split(',')) {
        let (name, arg) = match item.split_once(':') {
            Some((n, a)) => (n, Some(a)),
            None => (item, None),
        };
        // The number `text` (the item's argument, or part of it) within `lo..=hi`.
        let number = |text: Option<&str>, lo: usize, hi: usize, what: &str| {
            text.map(|a| {
                a.parse::<usize>()
                    .ok()
                    .filter(|x| (lo..=hi).contains(x))
                    .with_context(|| format!("--compress {item}: {what} must be {lo} to {hi}"))
            })
            .transpose()
        };
        let num = |lo, hi, what| number(arg, lo, hi, what);
        match name {
            "fewbit" => {
                let (lo, hi, default) = Compress::BITS;
                let bits = num(lo as usize, hi as usize, "bits")?;
                c.fewbit = Some(bits.map_or(default, |b| b as u32));
            }
            "rank1" => {
                // `rank1[:G][:mean|batch]`: the group, the vector, or both.
                let (lo, default) = Compress::GROUP;
                let (group, vector) = match arg.map(|a| a.split_once(':').unwrap_or((a, ""))) {
                    Some((g, v)) if Compress::parse_vector(g).is_ok() && v.is_empty() => (None, g),
                    Some((g, v)) => (Some(g), v),
                    None => (None, ""),
                };
                c.rank1 = Some(number(group, lo, 4096, "the group")?.unwrap_or(default));
                if !vector.is_empty() {
                    c.rank1_batch = Compress::parse_vector(vector)
                        .map_err(|e| anyhow::anyhow!("--compress {item}: {e}"))?;
                }
            }
            "chunked" => {
                chunk = match num(2, 1 << 20, "the number of chunks")? {
                    Some(k) => vec![k],
                    None => cleave_passes::plan::CHUNK_CHOICES.to_vec(),
                }
            }
            "bf16" if arg.is_none() => c.bf16 = true,
            "bf16" => bail!("--compress {item}: bf16 takes no parameter"),
            "int8" if arg.is_none() => c.int8 = true,
            "int8" => bail!("--compress {item}: int8 takes no parameter (one scale per row)"),
            _ => bail!(
                "--compress {item}: unknown method; methods: fewbit[:BITS] (1 to 4), \
                 rank1[:GROUP][:mean|batch], bf16, int8, chunked[:K], comma-separated"
            ),
        }
    }
    Ok((c, chunk))
}

/// [`build_step_with`] with the stash compression `compress` (`--compress`).
pub fn build_step_compressed(
    model: &Path,
    batch: Option<usize>,
    loss: (
        Option<crate::loss::LossKind>,
        Option<String>,
        Option<String>,
    ),
    opt: OptimizerArg,
    lr: f64,
    method: &GradMethod,
    (compress, precision): (Compress, Precision),
) -> Result<Built> {
    let TrainingModel {
        loaded,
        mut forward,
        traced,
    } = load_training_model(model, batch, loss.0, loss.1, loss.2)?;
    if precision == Precision::F16 {
        bail!(
            "--precision f16 trains with a dynamic loss scale, which the pipeline executor \
             applies (`cleave train` runs f16 there); this one-function step has no loss scale"
        );
    }
    narrow_forward(&mut forward, model, precision)?;
    let file_params = loaded.params;
    if let Some(b) = batch {
        if b != traced {
            bail!(
                "--batch {b}: {} was traced at batch {traced}; models have static shapes, so \
                 regenerate it at batch {b} (e.g. `cleave new-model … --batch {b}`)",
                model.display()
            );
        }
    }
    let mut m = Module::with_function(forward.clone());
    let autodiff =
        cleave_passes::autodiff::methods::with_compress(&method.autodiff_pass(), compress)
            .map_err(|e| anyhow::anyhow!("--compress: {e}"))?;
    let pipeline = format!("{autodiff},optimizer{{kind={},lr={lr}}}", opt.name());
    let pm = PassManager::from_pipeline(&pipeline)?;
    let mut ctx = PassContext::default();
    pm.run(&mut m, &mut ctx, &mut |_| {})
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Built {
        forward,
        step: m.functions.remove(0),
        batch: traced,
        file_params,
    })
}

/// Training state by name: parameters and optimizer state, each with its shape and host data.
pub type State = BTreeMap<String, (Vec<usize>, HostData)>;

/// The state to start from and the step to start at: a fresh initialisation (seed `seed`;
/// parameters stored in the model file win) at step 0, or the checkpoint in `resume` at its step
/// (refused by name when it was written with another batch or another optimizer than
/// `optimizer`). Shared by every target's training loop.
pub fn initial_state(
    built: &Built,
    seed: Option<u64>,
    resume: Option<&Path>,
    optimizer: &OptimizerArg,
) -> Result<(State, usize)> {
    let step_fn = &built.step;
    let mut state: State = BTreeMap::new();
    // Parameters that only the training step has (local learning's auxiliary heads) are
    // initialised by name like the model's.
    let mut init = init_params(step_fn, seed.unwrap_or(0));
    init.extend(init_params(&built.forward, seed.unwrap_or(0)));
    init.extend(built.file_params.clone());
    for arg in step_fn.args() {
        let n = arg.ty.num_elements();
        let d = if let Some(t) = init.get(arg.name) {
            cleave_runtime::host_from_tensor(t).context("parameters must be f32")?
        } else if arg.name == "opt.step" {
            HostData::F32(vec![1.0])
        } else if arg.role == ArgRole::Param || arg.name.starts_with("opt.") {
            HostData::F32(vec![0.0; n])
        } else {
            continue;
        };
        state.insert(arg.name.to_string(), (arg.ty.shape.clone(), d));
    }
    let mut start = 0usize;
    if let Some(dir) = resume {
        start = restore_checkpoint(
            dir,
            &mut state,
            (built.batch, " (the model's batch)"),
            optimizer,
            "this run",
        )?
        .0;
    }
    Ok((state, start))
}

/// Fills every entry of `state` from the checkpoint in `dir` (each tensor must be there, with
/// the entry's shape); returns the checkpoint's step and its metadata. The run's batch
/// (examples per step) and optimizer must be the checkpoint's: another batch or optimizer is
/// refused by name before any tensor is read into `state` (another optimizer's state tensors
/// would otherwise be reported missing). `this` names the resuming side in the message ("this
/// run", "this session"), `batch_is` says where its batch comes from.
pub fn restore_checkpoint(
    dir: &Path,
    state: &mut State,
    (batch, batch_is): (usize, &str),
    optimizer: &OptimizerArg,
    this: &str,
) -> Result<(usize, HashMap<String, String>)> {
    let (tensors, meta) = read_checkpoint(dir)?;
    for (key, want, from) in [
        ("batch", batch.to_string(), batch_is),
        ("optimizer", optimizer.name().to_string(), ""),
    ] {
        if let Some(have) = meta.get(key).filter(|h| **h != want) {
            bail!(
                "{}: the checkpoint was written with {key} {have}; {this} has {want}{from}",
                dir.display()
            );
        }
    }
    for (name, (shape, d)) in state.iter_mut() {
        let t = tensors
            .get(name)
            .with_context(|| format!("checkpoint in {} has no tensor \"{name}\"", dir.display()))?;
        if &t.shape != shape {
            bail!(
                "checkpoint tensor \"{name}\" is {}, the model needs shape {shape:?}",
                t.ty()
            );
        }
        *d = cleave_runtime::host_from_tensor(t).context("checkpoint tensors are f32")?;
    }
    let step = meta
        .get("step")
        .and_then(|s| s.parse().ok())
        .context("checkpoint metadata has no step")?;
    Ok((step, meta))
}

/// A checkpoint's metadata after `step` steps.
pub fn checkpoint_meta(
    a: &TrainArgs,
    step: usize,
    batch: usize,
    lr: f64,
    method: &GradMethod,
) -> HashMap<String, String> {
    HashMap::from([
        ("step".into(), step.to_string()),
        ("data_cursor".into(), (step * batch).to_string()),
        (
            "seed".into(),
            a.seed.map(|s| s.to_string()).unwrap_or("none".into()),
        ),
        ("optimizer".into(), a.optimizer.name().into()),
        ("lr".into(), lr.to_string()),
        ("batch".into(), batch.to_string()),
        ("grad_method".into(), method.to_string()),
    ])
}

/// How many of `n` examples are held out for evaluation with steps of `batch` examples: a
/// tenth, at least one batch, and none when there are fewer than two batches.
pub fn held_out(n: usize, batch: usize) -> usize {
    if n >= 2 * batch {
        (n / 10).max(batch)
    } else {
        0
    }
}

/// Loads `--data` for `forward` and splits off the held-out tail (see the module docs): the
/// columns, the number of examples and the number used for training.
pub fn split_data(
    path: &Path,
    forward: &Function,
    batch: usize,
) -> Result<(Vec<Column>, usize, usize)> {
    let (cols, n) = load_data(path, forward)?;
    let n_train = n - held_out(n, batch);
    if n_train < batch {
        bail!(
            "{}: {n} examples leave {n_train} for training, fewer than one batch of {batch}",
            path.display()
        );
    }
    Ok((cols, n, n_train))
}

/// One data input: its per-example elements.
pub struct Column {
    pub name: String,
    pub per_example: usize,
    pub data: HostData,
}

pub fn load_data(path: &Path, forward: &Function) -> Result<(Vec<Column>, usize)> {
    let tensors = crate::tensors::read_tensors(path)?;
    let mut cols = Vec::new();
    let mut n_examples: Option<(usize, String)> = None;
    for a in forward.data_inputs() {
        // `--precision f16`'s loss scale is fed by the trainer, not read from the data.
        if a.name == cleave_passes::autodiff::LOSS_SCALE_INPUT && !tensors.contains_key(a.name) {
            continue;
        }
        let Some(t) = tensors.get(a.name) else {
            bail!(
                "{}: no tensor named \"{}\" (the model's data input `{}`: {}); the file has {}",
                path.display(),
                a.name,
                a.name,
                a.ty,
                tensors
                    .iter()
                    .map(|(n, t)| format!("\"{n}\": {}", t.ty()))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        };
        if t.dtype != a.ty.dtype
            || t.shape.len() != a.ty.shape.len()
            || t.shape[1..] != a.ty.shape[1..]
        {
            bail!(
                "{}: tensor \"{}\" is {}, but the model's input `{}` needs {}[N,{}] (N examples)",
                path.display(),
                a.name,
                t.ty(),
                a.name,
                a.ty.dtype,
                a.ty.shape[1..]
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            );
        }
        let n = t.shape[0];
        match &n_examples {
            Some((m, other)) if *m != n => bail!(
                "{}: tensor \"{}\" has {n} examples but \"{other}\" has {m}",
                path.display(),
                a.name
            ),
            _ => n_examples = Some((n, a.name.to_string())),
        }
        let data = match &t.data {
            TensorData::Float(v) => HostData::F32(v.iter().map(|&x| x as f32).collect()),
            TensorData::Int(v) => HostData::I32(v.iter().map(|&x| x as i32).collect()),
            TensorData::Bool(v) => HostData::Bool(v.clone()),
        };
        cols.push(Column {
            name: a.name.to_string(),
            per_example: a.ty.shape[1..].iter().product(),
            data,
        });
    }
    let n = n_examples.map(|p| p.0).unwrap_or(0);
    Ok((cols, n))
}

pub fn gather_batch(col: &Column, rows: &[usize]) -> HostData {
    fn gather<T: Copy>(v: &[T], k: usize, rows: &[usize]) -> Vec<T> {
        rows.iter()
            .flat_map(|&r| v[r * k..(r + 1) * k].iter().copied())
            .collect()
    }
    let k = col.per_example;
    match &col.data {
        HostData::F32(v) => HostData::F32(gather(v, k, rows)),
        HostData::I32(v) => HostData::I32(gather(v, k, rows)),
        HostData::Bool(v) => HostData::Bool(gather(v, k, rows)),
        HostData::BF16(v) => HostData::BF16(gather(v, k, rows)),
        HostData::I8(v) => HostData::I8(gather(v, k, rows)),
        HostData::F16(v) => HostData::F16(gather(v, k, rows)),
    }
}

/// The training examples of step `step` (see the module docs).
pub struct Order {
    pub n_train: usize,
    pub seed: Option<u64>,
    pub cache: Option<(usize, Vec<usize>)>,
}

impl Order {
    /// The order of `n_train` examples: shuffled per epoch with `seed`, in file order without.
    pub fn new(n_train: usize, seed: Option<u64>) -> Self {
        Order {
            n_train,
            seed,
            cache: None,
        }
    }

    fn perm(&mut self, epoch: usize) -> &[usize] {
        if self.cache.as_ref().map(|c| c.0) != Some(epoch) {
            let mut p: Vec<usize> = (0..self.n_train).collect();
            if let Some(seed) = self.seed {
                let mut rng =
                    SplitMix64::new(seed ^ (epoch as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03));
                for i in (1..p.len()).rev() {
                    let j = (rng.next_u64() % (i as u64 + 1)) as usize;
                    p.swap(i, j);
                }
            }
            self.cache = Some((epoch, p));
        }
        &self.cache.as_ref().expect("set above").1
    }

    pub fn rows(&mut self, step: usize, batch: usize) -> Vec<usize> {
        (step * batch..(step + 1) * batch)
            .map(|pos| {
                let n = self.n_train;
                self.perm(pos / n)[pos % n]
            })
            .collect()
    }
}

pub fn set_host(plan: &mut Plan, index: usize, data: &HostData) -> Result<()> {
    plan.set_input(index, data.as_slice())
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// Sets every named value the plan takes as an argument (the others are skipped): the trained
/// parameters, before an evaluation.
pub fn set_args<N: AsRef<str>, D: std::borrow::Borrow<HostData>>(
    plan: &mut Plan,
    values: impl IntoIterator<Item = (N, D)>,
) -> Result<()> {
    for (name, d) in values {
        if let Some(i) = plan.arg_index(name.as_ref()) {
            set_host(plan, i, d.borrow())?;
        }
    }
    Ok(())
}

fn to_bytes(d: &HostData) -> (safetensors::Dtype, Vec<u8>) {
    match d {
        HostData::F32(v) => (
            safetensors::Dtype::F32,
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ),
        HostData::I32(v) => (
            safetensors::Dtype::I32,
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ),
        HostData::Bool(v) => (
            safetensors::Dtype::BOOL,
            v.iter().map(|&b| b as u8).collect(),
        ),
        HostData::BF16(v) => (
            safetensors::Dtype::BF16,
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ),
        HostData::I8(v) => (safetensors::Dtype::I8, v.iter().map(|&x| x as u8).collect()),
        HostData::F16(v) => (
            safetensors::Dtype::F16,
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ),
    }
}

/// Writes a checkpoint atomically: temporary file, fsync, rename.
pub fn write_checkpoint(
    dir: &Path,
    state: &BTreeMap<String, (Vec<usize>, HostData)>,
    meta: HashMap<String, String>,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let bufs: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = state
        .iter()
        .map(|(n, (shape, d))| {
            let (dt, b) = to_bytes(d);
            (n.clone(), dt, shape.clone(), b)
        })
        .collect();
    let views = bufs
        .iter()
        .map(|(n, dt, s, b)| {
            TensorView::new(*dt, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| anyhow::anyhow!("tensor \"{n}\": {e}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(views, Some(meta))
        .map_err(|e| anyhow::anyhow!("cannot serialize the checkpoint: {e}"))?;
    let path = dir.join(CKPT_FILE);
    let tmp = dir.join(format!("{CKPT_FILE}.tmp"));
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    if std::env::var("CLEAVE_FAIL_CHECKPOINT_WRITE").is_ok_and(|v| v == "1") {
        f.write_all(&bytes[..bytes.len() / 2])?;
        bail!(
            "injected failure while writing {} (CLEAVE_FAIL_CHECKPOINT_WRITE=1)",
            tmp.display()
        );
    }
    f.write_all(&bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, &path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// Reads a checkpoint: its tensors and metadata.
pub fn read_checkpoint(
    dir: &Path,
) -> Result<(BTreeMap<String, cleave_ir::Tensor>, HashMap<String, String>)> {
    let path = dir.join(CKPT_FILE);
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a valid checkpoint: {e}", path.display()))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    let tensors = crate::tensors::read_tensors(&path)?;
    Ok((tensors, meta))
}

pub struct Metrics(pub Option<std::fs::File>);

/// The per-step bookkeeping every training loop shares: the summary's loss and step count,
/// steps per second over a window of at least half a second, the JSON-lines metrics record and
/// the progress line (at most ten times a second, and after the last step).
pub struct Progress {
    t0: Instant,
    last_print: Instant,
    window: (Instant, usize),
    sps: f64,
}

impl Progress {
    /// Progress of a run that starts at step `start` (after a resume, its checkpoint's step).
    pub fn new(start: usize) -> Self {
        let now = Instant::now();
        Progress {
            t0: now,
            last_print: now,
            window: (now, start),
            sps: 0.0,
        }
    }

    /// Records the finished step `done` (1-based) with its loss.
    pub fn step(
        &mut self,
        a: &TrainArgs,
        summary: &mut TrainSummary,
        metrics: &mut Metrics,
        done: usize,
        loss: f64,
    ) -> Result<()> {
        self.step_with(a, summary, metrics, (done, loss), serde_json::Map::new())
    }

    /// [`Progress::step`] with more keys in the step's metrics line (`grad_norm`, `loss_scale`,
    /// `skipped`).
    pub fn step_with(
        &mut self,
        a: &TrainArgs,
        summary: &mut TrainSummary,
        metrics: &mut Metrics,
        (done, loss): (usize, f64),
        extra: serde_json::Map<String, serde_json::Value>,
    ) -> Result<()> {
        summary.final_loss = Some(loss);
        summary.steps_run += 1;
        let elapsed = self.window.0.elapsed().as_secs_f64();
        if elapsed > 0.5 {
            self.sps = (done - self.window.1) as f64 / elapsed;
            self.window = (Instant::now(), done);
        } else if self.sps == 0.0 {
            self.sps = self.overall(summary);
        }
        let sps = self.sps;
        let mut line = serde_json::json!({"step": done, "loss": loss, "steps_per_s": sps});
        line.as_object_mut().expect("an object").extend(extra);
        metrics.line(line)?;
        if !a.quiet && (self.last_print.elapsed().as_millis() > 100 || done == a.steps) {
            eprint!(
                "\rstep {done}/{}  loss {loss:.4}  {sps:.0} steps/s   ",
                a.steps
            );
            self.last_print = Instant::now();
        }
        Ok(())
    }

    /// What is due after step `done`: a checkpoint, and (where the run can evaluate) an
    /// evaluation on the held-out tail. Both are due after the last step.
    pub fn due(a: &TrainArgs, done: usize, can_eval: bool) -> (bool, bool) {
        let last = done == a.steps;
        let ckpt =
            a.checkpoint.is_some() && (done.is_multiple_of(a.checkpoint_every.max(1)) || last);
        let eval = can_eval
            && (a
                .eval_every
                .is_some_and(|k| k > 0 && done.is_multiple_of(k))
                || last);
        (ckpt, eval)
    }

    /// Records an evaluation after step `done` (whose training loss was `loss`).
    pub fn eval(
        &self,
        a: &TrainArgs,
        summary: &mut TrainSummary,
        metrics: &mut Metrics,
        (done, loss): (usize, f64),
        (acc, eval_loss): (f64, f64),
    ) -> Result<()> {
        summary.accuracy = Some(acc);
        metrics.line(serde_json::json!({"step": done, "eval_loss": eval_loss, "accuracy": acc}))?;
        if !a.quiet {
            eprintln!(
                "\rstep {done}/{}  loss {loss:.4}  eval loss {eval_loss:.4}  accuracy {:.2}%",
                a.steps,
                acc * 100.0
            );
        }
        Ok(())
    }

    /// Steps per second over the whole run so far.
    pub fn overall(&self, summary: &TrainSummary) -> f64 {
        summary.steps_run as f64 / self.t0.elapsed().as_secs_f64().max(1e-9)
    }
}

impl Metrics {
    /// Metrics appended to `path`, or none.
    pub fn open(path: Option<&Path>) -> Result<Self> {
        Ok(Metrics(match path {
            Some(p) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .with_context(|| format!("cannot open {}", p.display()))?,
            ),
            None => None,
        }))
    }

    pub fn line(&mut self, v: serde_json::Value) -> Result<()> {
        if let Some(f) = &mut self.0 {
            writeln!(f, "{v}")?;
        }
        Ok(())
    }
}

/// The number of processes an MPI launcher started this one among (1 when not launched so).
pub fn launched_ranks() -> usize {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
        .unwrap_or(1)
}

/// The forward-gradient tangents of `step`: standard normals, one tensor of each size in
/// `sizes` (the `fg.tangent.*` inputs in the order the step function declares them), from a
/// generator seeded by `--seed` and the step. One-stage and pipelined training draw the same.
pub fn draw_tangents(seed: Option<u64>, step: usize, sizes: &[usize]) -> Vec<HostData> {
    let mut rng =
        SplitMix64::new(seed.unwrap_or(0) ^ (step as u64 + 1).wrapping_mul(0x9E6C_63D0_676A_9A99));
    sizes
        .iter()
        .map(|&n| HostData::F32((0..n).map(|_| rng.normal() as f32).collect()))
        .collect()
}

/// Runs `cleave train`.
pub fn train(a: &TrainArgs) -> Result<TrainSummary> {
    let ranks = launched_ranks();
    if ranks > 1 && !cfg!(feature = "mpi") {
        bail!(
            "launched as {ranks} MPI processes, but this cleave was built without the `mpi` \
             feature: install Open MPI (scripts/install-mpi.sh) and rebuild with `cargo build \
             --release --features mpi`"
        );
    }
    if ranks > 1 && a.stages != ranks {
        bail!(
            "launched as {ranks} MPI processes for --stages {}: run one process per pipeline \
             device (`mpirun -np P cleave train … --stages P`)",
            a.stages
        );
    }
    let method = parse_grad_method(&a.grad_method, a.tangents)?;
    if a.stages > 1
        || a.microbatches > 1
        || a.fail_action.is_some()
        || a.kill_action.is_some()
        || a.chunk_lm_head.is_some()
        || a.grad_clip.is_some()
        || a.remat.is_some()
        || a.memory_limit.is_some()
        || a.memory_report
        || parse_precision(a.precision.as_deref())? == Precision::F16
    {
        return crate::pipeline_train::train(a).map(|r| r.summary);
    }
    let lr = a.lr.unwrap_or(a.optimizer.default_lr());
    let built = build_step_compressed(
        &a.model,
        a.batch,
        (a.loss, a.labels.clone(), a.loss_output.clone()),
        a.optimizer,
        lr,
        &method,
        (
            parse_compress(a.compress.as_deref())?,
            parse_precision(a.precision.as_deref())?,
        ),
    )?;
    let batch = built.batch;
    let (cols, n, n_train) = split_data(&a.data, &built.forward, batch)?;
    let n_eval = n - n_train;
    let step_fn = &built.step;
    let mut plan = compile_with(
        step_fn,
        &CompileOptions {
            fuse: !a.debug_nan,
            preserve_args: false,
            jit: true,
            codegen: a.codegen,
        },
    )?;
    // The evaluation plan is compiled at the first evaluation, so start-up to the first step
    // pays for the training step only.
    let mut eval_plans: Option<Plan> = None;

    let (mut state, start) = initial_state(&built, a.seed, a.resume.as_deref(), &a.optimizer)?;
    for (name, (_, d)) in &state {
        let i = plan.arg_index(name).expect("state names are arguments");
        set_host(&mut plan, i, d)?;
    }
    let data_idx: Vec<usize> = cols
        .iter()
        .map(|c| plan.arg_index(&c.name).expect("data input of the step"))
        .collect();
    let loss_idx = plan.output_index("loss").expect("loss output");
    // Forward-gradient tangents: fresh standard normals every step, seeded by --seed and the step.
    let tangent_idx: Vec<(usize, usize)> = step_fn
        .args()
        .filter(|x| x.name.starts_with(FG_TANGENT_PREFIX))
        .map(|x| {
            (
                plan.arg_index(x.name).expect("tangent input"),
                x.ty.num_elements(),
            )
        })
        .collect();
    let state_outputs: Vec<(String, usize)> = state
        .keys()
        .filter_map(|n| plan.output_index(n).map(|i| (n.clone(), i)))
        .collect();

    let mut metrics = Metrics::open(a.metrics.as_deref())?;
    let mut order = Order::new(n_train, a.seed);
    let labels_name = ["labels", "targets"]
        .into_iter()
        .find(|n| cols.iter().any(|c| c.name == *n));
    let can_eval = n_eval > 0 && built.forward.output("logits").is_some() && labels_name.is_some();
    let mut summary = TrainSummary::default();
    let mut progress = Progress::new(start);
    let ckpt_meta = |step: usize| checkpoint_meta(a, step, batch, lr, &method);
    for step in start..a.steps {
        let rows = order.rows(step, batch);
        for (c, &i) in cols.iter().zip(&data_idx) {
            set_host(&mut plan, i, &gather_batch(c, &rows))?;
        }
        if !tangent_idx.is_empty() {
            let sizes: Vec<usize> = tangent_idx.iter().map(|&(_, n)| n).collect();
            for (&(i, _), v) in tangent_idx.iter().zip(draw_tangents(a.seed, step, &sizes)) {
                set_host(&mut plan, i, &v)?;
            }
        }
        let nan = if a.debug_nan {
            plan.run_checked()?
        } else {
            plan.run()?;
            None
        };
        let loss = plan.output_f32(loss_idx).map(|v| v[0]).unwrap_or(f32::NAN) as f64;
        if !loss.is_finite() {
            let mut msg = format!("loss is {loss} at step {step}; training stopped");
            if let Some(r) = &nan {
                msg.push_str(&format!(
                    "; the first non-finite value is element {} ({}) of {} = {} in the training \
                     step (print it with `cleave opt --passes 'autodiff,optimizer{{kind={}}}'`)",
                    r.index,
                    r.element,
                    r.value,
                    r.op,
                    a.optimizer.name()
                ));
            } else if !a.debug_nan {
                msg.push_str("; rerun with --debug-nan to find the op that produced it");
            }
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
        // Carry the state; keep host copies only when a checkpoint is due.
        let (ckpt_due, eval_due) = Progress::due(a, done, can_eval);
        if ckpt_due {
            for (name, oi) in &state_outputs {
                state.get_mut(name).expect("state").1 = plan.output(*oi);
            }
        }
        plan.carry();
        if eval_due {
            let eval_plan = eval_plan(&mut eval_plans, &built.forward, a.codegen)?;
            set_args(
                eval_plan,
                state_outputs
                    .iter()
                    .map(|(name, oi)| (name, plan.output(*oi))),
            )?;
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
            let dir = a.checkpoint.as_ref().expect("checked");
            write_checkpoint(dir, &state, ckpt_meta(done))?;
        }
    }
    if !a.quiet {
        eprintln!();
    }
    summary.steps_per_s = progress.overall(&summary);
    Ok(summary)
}

/// The plan of evaluations (the forward function, arguments preserved), compiled at the first
/// evaluation and kept in `slot`.
pub fn eval_plan<'p>(
    slot: &'p mut Option<Plan>,
    forward: &Function,
    codegen: Codegen,
) -> Result<&'p mut Plan> {
    Ok(match slot {
        Some(p) => p,
        None => slot.insert(compile_with(
            forward,
            &CompileOptions {
                fuse: true,
                preserve_args: true,
                jit: true,
                codegen,
            },
        )?),
    })
}

/// Accuracy and mean loss of the forward plan over the held-out examples `from..to`.
pub fn evaluate(
    plan: &mut Plan,
    cols: &[Column],
    labels: &str,
    from: usize,
    to: usize,
    batch: usize,
) -> Result<(f64, f64)> {
    let logits_idx = plan.output_index("logits").expect("checked");
    let loss_idx = plan.output_index("loss").expect("checked");
    let c = *plan.outputs()[logits_idx].ty.shape.last().unwrap_or(&1);
    let label_col = cols.iter().find(|c| c.name == labels).expect("checked");
    let (mut correct, mut total, mut loss_sum, mut batches) = (0usize, 0usize, 0.0, 0);
    let mut s = from;
    while s + batch <= to {
        let rows: Vec<usize> = (s..s + batch).collect();
        for col in cols {
            let i = plan.arg_index(&col.name).expect("data input");
            set_host(plan, i, &gather_batch(col, &rows))?;
        }
        plan.run()?;
        let logits = plan.output_f32(logits_idx).expect("f32 logits");
        let HostData::I32(lab) = gather_batch(label_col, &rows) else {
            bail!("labels must be i32");
        };
        for (p, &l) in lab.iter().enumerate() {
            let row = &logits[p * c..(p + 1) * c];
            let mut best = 0;
            for (k, &v) in row.iter().enumerate() {
                if v > row[best] {
                    best = k;
                }
            }
            correct += (best as i32 == l) as usize;
            total += 1;
        }
        loss_sum += plan.output_f32(loss_idx).expect("f32 loss")[0] as f64;
        batches += 1;
        s += batch;
    }
    Ok((
        correct as f64 / total.max(1) as f64,
        loss_sum / batches.max(1) as f64,
    ))
}

/// What `cleave bench` measured.
#[derive(Clone, Debug)]
pub struct BenchResult {
    /// Median milliseconds of one training step.
    pub median_ms: f64,
    /// Milliseconds to compile the step into a plan (0 for the interpreter).
    pub compile_ms: f64,
    /// The plan's planned buffer bytes (0 for the interpreter).
    pub peak_bytes: usize,
    /// Fused elementwise loops in the plan, and how many of them were compiled to native code.
    pub fused_kernels: usize,
    /// See `fused_kernels`.
    pub jit_kernels: usize,
    /// FLOPs of one training step by cleave-ir's cost model (`ir/src/cost.rs`), all phases.
    pub flops: u64,
    /// The matmul and convolution part of `flops`.
    pub matmul_flops: u64,
    /// Heap allocations per timed step, all threads (the instrumented allocator's count; `None`
    /// for the interpreter or where that allocator is not installed).
    pub allocations_per_step: Option<f64>,
    /// With `--profile N`: every kernel of the plan timed on its own over [`PROFILE_RUNS`] more
    /// steps (`{"total_ms", "by_kind": [...], "slowest": [...]}`).
    pub profile: Option<serde_json::Value>,
}

/// Steps that `cleave bench --profile` times kernel by kernel (each kernel's mean is reported).
pub const PROFILE_RUNS: usize = 5;

/// The per-kernel profile of `cleave bench --profile top`: totals per kernel kind (largest
/// first, with their share) and the `top` slowest kernels.
fn profile_json(times: &[cleave_runtime::KernelTime], top: usize) -> serde_json::Value {
    let total: f64 = times.iter().map(|t| t.ms).sum();
    let mut kinds: BTreeMap<&str, (f64, usize)> = BTreeMap::new();
    for t in times {
        let e = kinds.entry(t.kind).or_default();
        e.0 += t.ms;
        e.1 += 1;
    }
    let mut kinds: Vec<_> = kinds.into_iter().collect();
    kinds.sort_by(|x, y| y.1 .0.total_cmp(&x.1 .0));
    let by_kind: Vec<serde_json::Value> = kinds
        .iter()
        .map(|(k, (ms, n))| {
            serde_json::json!({"kind": k, "kernels": n, "ms": ms,
                "share": if total > 0.0 { ms / total } else { 0.0 }})
        })
        .collect();
    let mut order: Vec<&cleave_runtime::KernelTime> = times.iter().collect();
    order.sort_by(|x, y| y.ms.total_cmp(&x.ms));
    let slowest: Vec<serde_json::Value> = order
        .iter()
        .take(top)
        .map(|t| {
            let value: String = t.value.chars().take(80).collect();
            serde_json::json!({"kind": t.kind, "detail": t.detail, "op": t.op,
                "value": value, "ms": t.ms})
        })
        .collect();
    serde_json::json!({"total_ms": total, "runs": PROFILE_RUNS, "by_kind": by_kind,
        "slowest": slowest})
}

impl BenchResult {
    /// Achieved GFLOP/s: the step's FLOPs over its median time.
    pub fn gflops(&self) -> f64 {
        self.flops as f64 / (self.median_ms * 1e-3) / 1e9
    }
}

/// Runs `cleave bench`: the median time of one training step.
pub fn bench(a: &BenchArgs) -> Result<BenchResult> {
    bench_with(a, None)
}

/// [`bench()`], and with `profile: Some(top)` a per-kernel profile of [`PROFILE_RUNS`] more steps
/// after the timed ones (the runtime only; the interpreter has no kernels to time).
pub fn bench_with(a: &BenchArgs, profile: Option<usize>) -> Result<BenchResult> {
    if profile.is_some() && a.interp {
        bail!("--profile times the runtime's kernels: it cannot be used with --interp");
    }
    let mut profiled = None;
    let (mut compile_ms, mut peak_bytes, mut fused_kernels, mut jit_kernels) = (0.0, 0, 0, 0);
    let method = parse_grad_method(&a.grad_method, a.tangents)?;
    let built = build_step_compressed(
        &a.model,
        a.batch,
        (a.loss, a.labels.clone(), a.loss_output.clone()),
        a.optimizer,
        a.optimizer.default_lr() * 0.01,
        &method,
        (
            Compress::default(),
            parse_precision(a.precision.as_deref())?,
        ),
    )?;
    let step = &built.step;
    let cost = cleave_ir::cost::function_cost(step).total();
    let args = bench_inputs(&built);
    let mut times = Vec::with_capacity(a.iters);
    let mut allocations_per_step = None;
    if a.interp {
        for i in 0..a.warmup.min(2) + a.iters {
            let t = Instant::now();
            cleave_ir::run_function_named(step, &args, cleave_ir::Precision::F32)?;
            if i >= a.warmup.min(2) {
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
    } else {
        let t = Instant::now();
        let mut plan = compile_with(
            step,
            &CompileOptions {
                jit: !a.no_jit,
                codegen: a.codegen,
                ..CompileOptions::default()
            },
        )?;
        compile_ms = t.elapsed().as_secs_f64() * 1e3;
        peak_bytes = plan.peak_bytes();
        fused_kernels = plan.fused_kernels();
        jit_kernels = plan.jit_kernels();
        let host: Vec<HostData> = plan
            .args()
            .iter()
            .map(|x| cleave_runtime::host_from_tensor(&args[&x.name]).expect("runtime dtype"))
            .collect();
        for (i, h) in host.iter().enumerate() {
            set_host(&mut plan, i, h)?;
        }
        let data: Vec<usize> = plan
            .args()
            .iter()
            .enumerate()
            .filter(|(_, x)| x.role == ArgRole::Data && !x.name.starts_with("opt."))
            .map(|(i, _)| i)
            .collect();
        for i in 0..a.warmup + a.iters {
            if i == a.warmup {
                cleave_runtime::alloc::start_counting();
            }
            let t = Instant::now();
            for &d in &data {
                set_host(&mut plan, d, &host[d])?;
            }
            plan.run()?;
            plan.carry();
            if i >= a.warmup {
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        let n = cleave_runtime::alloc::stop_counting();
        if cleave_runtime::alloc::installed() && a.iters > 0 {
            allocations_per_step = Some(n as f64 / a.iters as f64);
        }
        if let Some(top) = profile {
            let mut times: Vec<cleave_runtime::KernelTime> = Vec::new();
            for _ in 0..PROFILE_RUNS {
                for &d in &data {
                    set_host(&mut plan, d, &host[d])?;
                }
                let run = plan.run_profiled()?;
                plan.carry();
                if times.is_empty() {
                    times = run;
                } else {
                    for (t, r) in times.iter_mut().zip(run) {
                        t.ms += r.ms;
                    }
                }
            }
            for t in &mut times {
                t.ms /= PROFILE_RUNS as f64;
            }
            profiled = Some(profile_json(&times, top));
        }
    }
    times.sort_by(|x, y| x.total_cmp(y));
    let median_ms = times.get(times.len() / 2).copied().unwrap_or(f64::NAN);
    Ok(BenchResult {
        median_ms,
        compile_ms,
        peak_bytes,
        fused_kernels,
        jit_kernels,
        flops: cost.total(),
        matmul_flops: cost.matmul,
        allocations_per_step,
        profile: profiled,
    })
}

/// The arguments `cleave bench` times a step on: the initial parameters (seed 0), fresh optimizer
/// state, standard normal float data and alternating 0/1 integer data (in range of every class
/// count). Shared by every target's `bench`.
pub fn bench_inputs(built: &Built) -> BTreeMap<String, cleave_ir::Tensor> {
    let step = &built.step;
    let mut rng = SplitMix64::new(1);
    let mut init = init_params(step, 0);
    init.extend(init_params(&built.forward, 0));
    init.extend(built.file_params.clone());
    let mut args: BTreeMap<String, cleave_ir::Tensor> = BTreeMap::new();
    for arg in step.args() {
        let n = arg.ty.num_elements();
        let t = if let Some(t) = init.get(arg.name) {
            t.clone()
        } else if arg.name == "opt.step" {
            cleave_ir::Tensor::scalar_f(DType::F32, 1.0)
        } else if arg.name.starts_with("opt.") {
            cleave_ir::Tensor::zeros(arg.ty)
        } else if arg.ty.dtype == DType::F32 {
            cleave_ir::Tensor::from_f32(
                arg.ty.shape.clone(),
                (0..n).map(|_| rng.normal() as f32).collect(),
            )
        } else if arg.ty.dtype == DType::I32 {
            // Index-like inputs (labels, tokens) stay in range of every class count.
            cleave_ir::Tensor::from_i32(
                arg.ty.shape.clone(),
                (0..n).map(|i| (i % 2) as i32).collect(),
            )
        } else {
            cleave_ir::Tensor::zeros(arg.ty)
        };
        args.insert(arg.name.to_string(), t);
    }
    args
}
