//! The `cleave` command-line interface.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use cleave_ir::interp::{run_function_named, Precision, Tensor};
use cleave_ir::{DType, Function, Module};

use cleave_passes::autodiff::GRAD_PREFIX;
use cleave_passes::{PassContext, PassManager};

use crate::init::init_params;
use crate::inspect::{inspect, render_split_table, render_table, split_report};
use crate::load::{load_model, load_module, LoadOptions};
use crate::loss::LossKind;
use crate::tensors::{read_tensors, write_tensors};

/// cleave: an autodiff compiler for pipeline-parallel training.
#[derive(Parser, Debug)]
#[command(name = "cleave", version, about, long_about = None)]
pub struct Cli {
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print a module with its parameters, FLOPs per function and phase, and activation bytes.
    Inspect(InspectArgs),
    /// Run a function with the reference interpreter.
    Run(RunArgs),
    /// Write a model built with the tracer (mlp, gpt, gpt-layer, cnn) as IR text.
    NewModel(NewModelArgs),
    /// Run a pipeline of passes over a module and print the result.
    Opt(OptArgs),
    /// Differentiate a model and write the gradient of every parameter.
    Grad(GradArgs),
    /// Generate a pipeline schedule, simulate it, and report or draw it.
    Schedule(crate::schedule_cmd::ScheduleArgs),
    /// Train a model on a safetensors dataset with the CPU runtime.
    Train(TrainCmd),
    /// Time one training step (forward, backward, optimizer update) with the CPU runtime.
    Bench(BenchCmd),
    /// Compile a model: a standalone training executable (`-o EXE`, target cpu), or with
    /// `--target cuda` the MLIR and PTX of every kernel (`-o DIR`).
    Compile(CompileCmd),
    /// Write a checkpoint's trained parameters to a safetensors file by name, as PyTorch's
    /// `model.load_state_dict(safetensors.torch.load_file(...))` reads them.
    ExportWeights(ExportWeightsArgs),
}

/// Arguments of `cleave export-weights`.
#[derive(clap::Args, Debug)]
pub struct ExportWeightsArgs {
    /// The checkpoint directory (`cleave train --checkpoint DIR`).
    pub checkpoint: PathBuf,
    /// The safetensors file to write.
    #[arg(long)]
    pub safetensors: PathBuf,
    /// The `.onnx` model that was trained: adds the rest of the PyTorch module's `state_dict()`
    /// (persistent buffers such as BatchNorm's running statistics, and tied aliases such as
    /// GPT-2's `lm_head.weight`), so that `load_state_dict` can be strict.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// How the model file is read.
    #[command(flatten)]
    pub model_args: ModelArgs,
}

/// Arguments of `cleave compile` (see [`crate::aot`]).
#[derive(clap::Args, Debug)]
pub struct CompileCmd {
    /// Model file (`.cir` or `.onnx`) with a scalar `loss` output.
    pub model: PathBuf,
    /// The executable to write (target cpu), or the kernel directory (target cuda).
    #[arg(short = 'o', long = "output")]
    pub output: PathBuf,
    /// Target: cpu (standalone executable) or cuda.
    #[arg(long, value_enum, default_value = "cpu")]
    pub target: crate::aot::Target,
    /// How the model file is read (`--batch` must equal a `.cir` model's traced batch).
    #[command(flatten)]
    pub model_args: ModelArgs,
    /// Pipeline stages.
    #[arg(long, default_value_t = 1)]
    pub stages: usize,
    /// Microbatches per step.
    #[arg(long, default_value_t = 1)]
    pub microbatches: usize,
    /// Pipeline schedule: gpipe, 1f1b, zb-h1, zb-h2, interleaved, zb-v, v-min, v-half,
    /// dualpipev, hanayo (or `hanayo-<waves>`), auto.
    #[arg(long, default_value = "1f1b")]
    pub schedule: String,
    /// Recomputation/offload policy of saved activations: none, full, selective, offload-all,
    /// auto (the default with --memory-limit), as `cleave train --remat`.
    #[arg(long)]
    pub remat: Option<String>,
    /// Bytes each device may hold, as `cleave train --memory-limit` (suffix K, M, G allowed).
    #[arg(long)]
    pub memory_limit: Option<String>,
    /// Gradient method: bp, forward-gradient, fa, dfa, local{blocks=K}.
    #[arg(long, default_value = "bp")]
    pub grad_method: String,
    /// Random tangents averaged per step by `--grad-method forward-gradient`.
    #[arg(long, default_value_t = 1)]
    pub tangents: usize,
    /// With `--target cuda`: write only the MLIR or only the PTX (default both; repeatable).
    #[arg(long, value_enum)]
    pub emit: Vec<crate::compile_gpu::Emit>,
    /// With `--target cuda`: the MLIR pass pipeline to use instead of the default.
    #[arg(long)]
    pub mlir_pipeline: Option<String>,
    /// Also compile ahead of time the optimizer loops for this learning rate (repeatable); the
    /// optimizers' defaults are always compiled, other rates are JIT-compiled at start-up.
    #[arg(long = "lr", value_name = "LR")]
    pub lrs: Vec<f64>,
}

/// Where training runs.
#[derive(ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Target {
    /// The CPU runtime.
    #[default]
    Cpu,
    /// An NVIDIA GPU through the CUDA runtime (needs a build with `--features cuda`).
    Cuda,
}

/// `cleave train` with its target.
#[derive(clap::Args, Debug)]
pub struct TrainCmd {
    #[command(flatten)]
    pub args: crate::train::TrainArgs,
    /// Where to run: cpu, or cuda (needs `--features mlir,cuda` and a CUDA driver).
    #[arg(long, value_enum, default_value = "cpu")]
    pub target: Target,
    /// With `--target cuda`: run GEMMs on cuBLAS (default) or as the MLIR kernels.
    #[arg(long, value_enum, default_value = "cublas")]
    pub gemm: crate::gpu_train::GemmArg,
}

/// `cleave bench` with its target.
#[derive(clap::Args, Debug)]
pub struct BenchCmd {
    #[command(flatten)]
    pub args: crate::train::BenchArgs,
    /// Where to run: cpu, or cuda (needs `--features mlir,cuda` and a CUDA driver).
    #[arg(long, value_enum, default_value = "cpu")]
    pub target: Target,
    /// With `--target cuda`: run GEMMs on cuBLAS (default) or as the MLIR kernels.
    #[arg(long, value_enum, default_value = "cublas")]
    pub gemm: crate::gpu_train::GemmArg,
    /// Time every kernel of a few more steps on its own and report the time per kernel kind and
    /// the N slowest kernels (on the CPU: kernels; with `--target cuda`: kernel groups of one step).
    #[arg(long)]
    pub profile: Option<usize>,
}

/// How a model file is read (shared by every command that takes one).
#[derive(clap::Args, Debug, Default)]
pub struct ModelArgs {
    /// Extent of symbolic (batch) dimensions of an `.onnx` model's inputs.
    #[arg(long)]
    pub batch: Option<usize>,
    /// Add a loss to a model exported without one (needs --labels).
    #[arg(long, value_enum)]
    pub loss: Option<LossKind>,
    /// The labels input of --loss (class indices for cross-entropy, targets for mse).
    #[arg(long)]
    pub labels: Option<String>,
    /// The scalar output that is the loss, for a model with several (renamed `loss`; an `.onnx`
    /// model with a single scalar float output has it taken as the loss without this flag).
    #[arg(long)]
    pub loss_output: Option<String>,
}

impl ModelArgs {
    /// The load options these flags give.
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            batch: self.batch,
            loss: self.loss,
            labels: self.labels.clone(),
            loss_output: self.loss_output.clone(),
        }
    }
}

/// Arguments of `cleave opt`.
#[derive(clap::Args, Debug)]
pub struct OptArgs {
    /// Model file (`.cir` or `.onnx`).
    pub file: Option<PathBuf>,
    /// How the model file is read.
    #[command(flatten)]
    pub model: ModelArgs,
    /// The pipeline: `a,b{key=value},c`.
    #[arg(long, default_value = "")]
    pub passes: String,
    /// Write the result here instead of stdout.
    #[arg(short = 'o', long = "output")]
    pub output: Option<PathBuf>,
    /// Print the IR after every pass (to stderr).
    #[arg(long)]
    pub print_ir_after_all: bool,
    /// Print the IR after the named pass (repeatable).
    #[arg(long)]
    pub print_ir_after: Vec<String>,
    /// Print the IR as a failing pass left it.
    #[arg(long)]
    pub print_ir_after_failure: bool,
    /// Verify the module after every pass.
    #[arg(long)]
    pub verify_each: bool,
    /// Print the pipeline in canonical form and exit.
    #[arg(long)]
    pub dump_pass_pipeline: bool,
    /// List the registered passes and exit.
    #[arg(long)]
    pub list_passes: bool,
    /// Gradient method of every `autodiff` in the pipeline: bp, forward-gradient, fa, dfa,
    /// local{blocks=K}.
    #[arg(long)]
    pub grad_method: Option<String>,
    /// Random tangents of `--grad-method forward-gradient`.
    #[arg(long, default_value_t = 1)]
    pub tangents: usize,
}

/// Arguments of `cleave grad`.
#[derive(clap::Args, Debug)]
pub struct GradArgs {
    /// Model file (`.cir` or `.onnx`) with a scalar `loss` output (or one added by --loss), or
    /// an already differentiated module.
    pub file: PathBuf,
    /// How the model file is read.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Data inputs, by name (safetensors); not needed by a model without data inputs.
    #[arg(long)]
    pub inputs: Option<PathBuf>,
    /// Parameters, by name (safetensors); default: the values stored in an `.onnx` model.
    #[arg(long)]
    pub params: Option<PathBuf>,
    /// Where to write one gradient per parameter, named as the parameter (safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Interpreter precision.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DtypeArg,
    /// Function to differentiate (default: the module's first function).
    #[arg(long)]
    pub function: Option<String>,
}

/// Arguments of `cleave inspect`.
#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// Model file (`.cir` or `.onnx`).
    pub file: PathBuf,
    /// How the model file is read.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Print the report as JSON instead of the IR and the table.
    #[arg(long)]
    pub json: bool,
    /// Print only the table, not the IR.
    #[arg(long)]
    pub summary: bool,
    /// Run this pass pipeline first (e.g. `autodiff`).
    #[arg(long)]
    pub passes: Option<String>,
    /// Report per pipeline stage: F/B/W FLOPs and stash bytes (runs `autodiff` and `split-bw`
    /// first when the module is not split yet).
    #[arg(long)]
    pub split: bool,
    /// Report per pipeline stage the recomputation/offload plan under a schedule: saved bytes by
    /// value, recomputed FLOPs, offloaded bytes and transfer time, peak bytes.
    #[arg(long)]
    pub memory: bool,
    /// With --memory: pipeline devices.
    #[arg(long, default_value_t = 1, requires = "memory")]
    pub stages: usize,
    /// With --memory: microbatches per step.
    #[arg(long, default_value_t = 1, requires = "memory")]
    pub microbatches: usize,
    /// With --memory: the schedule (`auto` with --memory-limit chooses schedule and plan jointly).
    #[arg(long, default_value = "1f1b", requires = "memory")]
    pub schedule: String,
    /// With --memory: none, full, selective, offload-all, auto (default with --memory-limit).
    #[arg(long, requires = "memory")]
    pub remat: Option<String>,
    /// With --memory: bytes of saved activations per device (suffix K, M, G allowed).
    #[arg(long, requires = "memory")]
    pub memory_limit: Option<String>,
    /// With --memory: device profile (built-in name or file) for times and transfers.
    #[arg(long, default_value = "cpu-epyc-2core", requires = "memory")]
    pub profile: String,
    /// With --memory: what the stage cut balances: `estimate` (each forward node's training
    /// time from its forward, 3× for products, 2× otherwise), `split` (each forward node's
    /// F + B + W time in the differentiated program), or `best` (with `--schedule auto` and a
    /// limit: the joint plan of both cuts, the shorter kept).
    #[arg(long, default_value = "estimate", requires = "memory")]
    pub balance: String,
    /// With --memory: spread the output layer (the last product reading a parameter, and the
    /// loss) over every stage, as vocabulary parallelism does; planned and simulated only
    /// (`cleave train` runs the layer on the last stage).
    #[arg(long, requires = "memory")]
    pub vocab_parallel: bool,
    /// With --memory, `--schedule auto` and a limit: also plan the V family (ZB-V, V-Half,
    /// V-Min, DualPipeV: two stages per device) with recomputation chosen per stage, and keep
    /// it when its step is shorter (more planning time).
    #[arg(long, requires = "memory")]
    pub v_family: bool,
    /// With --memory: write the timeline and memory over time (SVG) here.
    #[arg(long, requires = "memory")]
    pub svg: Option<PathBuf>,
    /// With --memory: the stash compressions of `cleave train --compress` (`fewbit[:BITS]`,
    /// `rank1[:GROUP][:VECTOR]`, `bf16`, `int8`): every saved value each applies to, with its bytes before and
    /// after and the seconds it adds, and per stage the saved bytes with all of them applied
    /// (JSON key `compress`). With --memory-limit the plan chooses among them per value (the
    /// chosen ones are marked, and the plans the search tried are listed).
    #[arg(long, requires = "memory", value_name = "METHODS")]
    pub compress: Option<String>,
    /// With --memory: plan the step of `cleave train --precision DTYPE` (`bf16` or `f16`: the
    /// GEMMs in that type, so what they stash of the forward is 16-bit; the `precision` pass
    /// before `autodiff`).
    #[arg(long, requires = "memory", value_name = "DTYPE")]
    pub precision: Option<String>,
    /// Differentiate with this gradient method (bp, forward-gradient, fa, dfa, local{blocks=K}):
    /// every `autodiff` of `--passes` takes it, and without `--passes` the report is of
    /// `autodiff,split-bw` (so FLOPs per phase and stash bytes are the method's).
    #[arg(long)]
    pub grad_method: Option<String>,
    /// Random tangents of `--grad-method forward-gradient`.
    #[arg(long, default_value_t = 1)]
    pub tangents: usize,
}

/// Interpreter precision.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DtypeArg {
    /// Round every float result to its declared type (f32 for f32 values).
    F32,
    /// Compute every float value in f64 (for gradient checks).
    F64,
}

/// Arguments of `cleave run`.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Model file (`.cir` or `.onnx`).
    pub file: PathBuf,
    /// How the model file is read.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Data inputs, by name (safetensors).
    #[arg(long)]
    pub inputs: PathBuf,
    /// Parameters, by name (safetensors); default: the values stored in an `.onnx` model.
    #[arg(long)]
    pub params: Option<PathBuf>,
    /// Where to write the outputs (safetensors); without it they are summarised on stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Interpreter precision.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DtypeArg,
    /// Function to run (default: the module's first function).
    #[arg(long)]
    pub function: Option<String>,
}

/// Model families of `cleave new-model`.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum ModelKind {
    /// Multi-layer perceptron with a cross-entropy loss.
    Mlp,
    /// GPT-style decoder-only transformer with a language-model loss.
    Gpt,
    /// One GPT layer (attention + MLP, no embedding or head), for stage-mode differentiation.
    GptLayer,
    /// A small convolutional classifier.
    Cnn,
}

/// Normalisation layer of GPT models.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum NormArg {
    /// LayerNorm (GPT-2).
    Layernorm,
    /// RMSNorm (LLaMA).
    Rmsnorm,
}

/// MLP activation of GPT models.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum ActArg {
    /// GELU, exact (erf) form.
    Gelu,
    /// SiLU.
    Silu,
}

/// Arguments of `cleave new-model`.
#[derive(clap::Args, Debug)]
pub struct NewModelArgs {
    /// Model family.
    #[arg(value_enum)]
    pub kind: ModelKind,
    /// Output file (IR text); stdout when absent.
    #[arg(short = 'o', long = "output")]
    pub output: Option<PathBuf>,
    /// Write initial parameters here (safetensors).
    #[arg(long)]
    pub params_out: Option<PathBuf>,
    /// Seed of the parameter initialisation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Batch size.
    #[arg(long)]
    pub batch: Option<usize>,
    /// MLP layer sizes, input first (mlp).
    #[arg(long, value_delimiter = ',')]
    pub sizes: Option<Vec<usize>>,
    /// Vocabulary size (gpt).
    #[arg(long)]
    pub vocab: Option<usize>,
    /// Model width (gpt, gpt-layer).
    #[arg(long)]
    pub d_model: Option<usize>,
    /// Attention heads (gpt, gpt-layer).
    #[arg(long)]
    pub heads: Option<usize>,
    /// Number of layers (gpt).
    #[arg(long)]
    pub layers: Option<usize>,
    /// Sequence length (gpt, gpt-layer).
    #[arg(long)]
    pub seq: Option<usize>,
    /// Normalisation (gpt, gpt-layer).
    #[arg(long, value_enum)]
    pub norm: Option<NormArg>,
    /// MLP activation (gpt, gpt-layer).
    #[arg(long, value_enum)]
    pub act: Option<ActArg>,
    /// Untie the LM head from the token embedding (gpt).
    #[arg(long)]
    pub untied: bool,
    /// Input channels (cnn).
    #[arg(long)]
    pub in_channels: Option<usize>,
    /// Image height and width (cnn).
    #[arg(long)]
    pub image: Option<usize>,
    /// Number of classes (cnn).
    #[arg(long)]
    pub classes: Option<usize>,
    /// Add a training loss on the model's first output (e.g. `gpt-layer --loss mse` for the
    /// GPT-block benchmark model).
    #[arg(long, value_enum)]
    pub loss: Option<LossKind>,
    /// The labels (targets) input of --loss.
    #[arg(long, default_value = "target")]
    pub labels: String,
    /// Also write synthetic training data for the model here (safetensors, one tensor per data
    /// input; see `synthetic_data`), e.g. for `cleave train` of GPT-small.
    #[arg(long)]
    pub data_out: Option<PathBuf>,
    /// Examples in --data-out.
    #[arg(long, default_value_t = 256)]
    pub examples: usize,
}

/// Parses arguments and runs the command.
pub fn main_with_args<I, T>(args: I) -> Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout with success; usage errors are printed by clap.
            e.print()?;
            if e.use_stderr() {
                std::process::exit(2);
            }
            return Ok(());
        }
    };
    match cli.command {
        Command::Inspect(a) => cmd_inspect(a),
        Command::Run(a) => cmd_run(a),
        Command::NewModel(a) => cmd_new_model(a),
        Command::Opt(a) => cmd_opt(a),
        Command::Grad(a) => cmd_grad(a),
        Command::Schedule(a) => crate::schedule_cmd::cmd_schedule(a),
        Command::Train(a) => match a.target {
            Target::Cpu => cmd_train(a.args),
            Target::Cuda => {
                let s = crate::gpu_train::train_cuda(&a.args, a.gemm)?;
                println!("{}", crate::aot::summary_line(&s));
                Ok(())
            }
        },
        Command::Bench(a) => match a.target {
            Target::Cpu => cmd_bench(a.args, a.profile),
            Target::Cuda => cmd_bench_cuda(a.args, a.gemm, a.profile),
        },
        Command::Compile(a) => cmd_compile(a),
        Command::ExportWeights(a) => cmd_export_weights(a),
    }
}

fn cmd_train(a: crate::train::TrainArgs) -> Result<()> {
    let s = if a.executor == crate::train::Executor::List {
        crate::gpu_pipeline::train_stages_on(&a, "cpu", None, |f, _| {
            crate::gpu_pipeline::CpuPlanBackend::new(f, a.codegen)
        })?
        .summary
    } else {
        crate::train::train(&a)?
    };
    if s.process_rank == 0 {
        println!("{}", crate::aot::summary_line(&s));
    }
    Ok(())
}

fn cmd_compile(a: CompileCmd) -> Result<()> {
    if a.target == crate::aot::Target::Cuda {
        let r = crate::compile_gpu::compile_gpu(&crate::compile_gpu::CompileGpuArgs {
            model: a.model,
            output: a.output.clone(),
            emit: a.emit,
            mlir_pipeline: a.mlir_pipeline,
            batch: a.model_args.batch,
        })?;
        println!(
            "{} kernel groups, {} PTX launches: {} files in {}",
            r.groups,
            r.launches,
            r.files.len(),
            a.output.display()
        );
        return Ok(());
    }
    let r = crate::aot::compile(&crate::aot::CompileArgs {
        model: a.model,
        output: a.output,
        target: a.target,
        batch: a.model_args.batch,
        loss: a.model_args.loss,
        labels: a.model_args.labels,
        stages: a.stages,
        microbatches: a.microbatches,
        schedule: a.schedule,
        remat: a.remat,
        memory_limit: a.memory_limit,
        grad_method: a.grad_method,
        tangents: a.tangents,
        lrs: a.lrs,
    })?;
    println!(
        "wrote {} ({:.1} MiB, {} fused loops compiled ahead of time): {} at batch {}",
        r.output.display(),
        r.bytes as f64 / (1024.0 * 1024.0),
        r.kernels,
        r.payload.model_name,
        r.payload.batch
    );
    Ok(())
}

fn cmd_bench(a: crate::train::BenchArgs, profile: Option<usize>) -> Result<()> {
    let r = crate::train::bench_with(&a, profile)?;
    let engine = if a.interp { "interpreter" } else { "runtime" };
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "median_ms": r.median_ms,
                "engine": engine,
                "iters": a.iters,
                "compile_ms": r.compile_ms,
                "peak_bytes": r.peak_bytes,
                "fused_kernels": r.fused_kernels,
                "jit_kernels": r.jit_kernels,
                "codegen": (!a.interp && !a.no_jit).then(|| a.codegen.name()),
                "flops": r.flops,
                "matmul_flops": r.matmul_flops,
                "gflops": r.gflops(),
                "allocations_per_step": r.allocations_per_step,
                "profile": r.profile,
            })
        );
    } else {
        println!(
            "{}: median {:.4} ms per training step ({engine}, {} iterations; compiled in {:.1} ms, \
             {} planned bytes; {} of {} fused loops compiled by {})",
            a.model.display(),
            r.median_ms,
            a.iters,
            r.compile_ms,
            r.peak_bytes,
            r.jit_kernels,
            r.fused_kernels,
            a.codegen
        );
        println!(
            "{:.3} MFLOP per step ({:.3} in matmuls), {:.1} GFLOP/s{}",
            r.flops as f64 / 1e6,
            r.matmul_flops as f64 / 1e6,
            r.gflops(),
            r.allocations_per_step
                .map(|n| format!(", {n:.1} heap allocations per step"))
                .unwrap_or_default()
        );
        if let Some(p) = &r.profile {
            print_cpu_profile(p);
        }
    }
    Ok(())
}

/// The text form of `cleave bench --profile N` on the CPU.
fn print_cpu_profile(p: &serde_json::Value) {
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(0.0);
    println!(
        "profile: {:.3} ms of kernels per step (each kernel timed alone, mean of {} steps)",
        f(p, "total_ms"),
        p["runs"]
    );
    for k in p["by_kind"].as_array().into_iter().flatten() {
        println!(
            "  {:<22} {:>4} kernels {:>10.3} ms {:>5.1}%",
            k["kind"].as_str().unwrap_or(""),
            k["kernels"],
            f(k, "ms"),
            100.0 * f(k, "share")
        );
    }
    println!("slowest kernels:");
    for k in p["slowest"].as_array().into_iter().flatten() {
        println!(
            "  {:>9.3} ms  {:<18} {:<36} {} {}",
            f(k, "ms"),
            k["kind"].as_str().unwrap_or(""),
            k["detail"].as_str().unwrap_or(""),
            k["op"].as_str().unwrap_or(""),
            k["value"].as_str().unwrap_or("")
        );
    }
}

fn cmd_bench_cuda(
    a: crate::train::BenchArgs,
    gemm: crate::gpu_train::GemmArg,
    profile: Option<usize>,
) -> Result<()> {
    let r = crate::gpu_train::bench_cuda(&a, gemm, profile)?;
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        v["engine"] = "cuda".into();
        v["gflops"] = (r.flops as f64 / (r.median_ms * 1e-3) / 1e9).into();
        println!("{v}");
    } else {
        println!(
            "{}: median {:.4} ms per training step (cuda, {}, {} iterations; compiled to PTX in \
             {:.1} ms: {} kernel groups, {} on cuBLAS, {} PTX launches; {} device bytes)",
            a.model.display(),
            r.median_ms,
            r.device,
            r.iters,
            r.compile_ms,
            r.groups,
            r.cublas_groups,
            r.launches,
            r.device_bytes
        );
        println!(
            "{:.3} MFLOP per step ({:.3} in matmuls), {:.1} GFLOP/s",
            r.flops as f64 / 1e6,
            r.matmul_flops as f64 / 1e6,
            r.flops as f64 / (r.median_ms * 1e-3) / 1e9
        );
        if let Some(p) = &r.profile {
            println!("{p:#}");
        }
    }
    Ok(())
}

/// Runs a pipeline over a module, printing warnings to stderr, and a `plan` pass's result (the
/// schedule's figures, each stage's plan, each device's actions) to stderr after the pipeline.
fn run_pipeline(module: &mut Module, pm: &PassManager) -> Result<()> {
    let mut ctx = PassContext::default();
    let result = pm.run(module, &mut ctx, &mut |dump| eprint!("{dump}"));
    for w in &ctx.warnings {
        eprintln!("warning: {w}");
    }
    if let Some(planned) = &ctx.planned {
        eprint!("{}", planned.render());
        for (d, actions) in planned.schedule.action_strings().iter().enumerate() {
            eprintln!("device {d}: {}", actions.join(" "));
        }
    }
    result.map_err(|e| anyhow::anyhow!("{e}"))
}

fn inspect_memory_text(a: &InspectArgs) -> Result<String> {
    let mut out = String::new();
    use cleave_passes::remat::{parse_bytes, Policy};
    let module = load_module(&a.file, &a.model.load_options())?;
    let mut forward = crate::load::forward_of(&module)?;
    crate::train::narrow_forward(
        &mut forward,
        &a.file,
        crate::train::parse_precision(a.precision.as_deref())?,
    )?;
    let limit = a
        .memory_limit
        .as_deref()
        .map(parse_bytes)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--memory-limit {e}"))?;
    let policy = match a.remat.as_deref() {
        None if limit.is_some() => Policy::Auto,
        None => Policy::None,
        Some(p) => Policy::parse(p).with_context(|| {
            format!(
                "--remat {p}: unknown policy; valid policies: {}",
                Policy::NAMES
            )
        })?,
    };
    cleave_passes::partition::DeviceProfile::load(&a.profile).map_err(anyhow::Error::msg)?;
    let cuts = cleave_passes::plan::cuts_of(&a.balance, a.vocab_parallel)
        .map_err(|e| anyhow::anyhow!("--balance {e}"))?;
    // Named compressions are the plan's choice under a limit; without one they are reported.
    let chosen_methods = match (&a.compress, limit) {
        (Some(c), Some(_)) => crate::train::parse_compress_planned(Some(c))?,
        _ => Default::default(),
    };
    // The planner as the `plan` pass runs it, with the command line's spelling of its options.
    let pass = cleave_passes::plan::PlanPass {
        stages: a.stages,
        microbatches: a.microbatches,
        memory_limit: limit,
        profile: a.profile.clone(),
        schedule: a.schedule.clone(),
        policy,
        cuts,
        v_family: a.v_family,
        compress: chosen_methods.0,
        chunk: chosen_methods.1,
    };
    anyhow::ensure!(
        pass.cuts.len() == 1 || pass.is_joint(),
        "--balance best compares joint plans: it needs --schedule auto and --memory-limit"
    );
    anyhow::ensure!(
        !a.v_family || pass.is_joint(),
        "--v-family joins the joint search: it needs --schedule auto and --memory-limit"
    );
    let (planned, tried) = pass.plan(&forward)?;
    if let Some(path) = &a.svg {
        let title = format!(
            "{} — {} / remat {}",
            a.file.display(),
            planned.origin,
            policy.name()
        );
        std::fs::write(
            path,
            cleave_passes::schedule::svg::render(&planned.sim, &title),
        )
        .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let compressed = match (&a.compress, &planned.compression) {
        (_, Some(c)) => Some(c.to_json()),
        (Some(c), None) => Some(compress_report(&forward, a.stages, c, &a.profile)?),
        (None, None) => None,
    };
    if a.json {
        let mut v = planned.to_json(policy, limit);
        if let Some(c) = compressed {
            v["compress"] = c;
        }
        if !tried.is_empty() {
            v["joint"] = tried
                .iter()
                .map(|(o, mk, b)| serde_json::json!({"schedule": o, "makespan_s": mk, "effective_bubble_rate": b}))
                .collect();
        }
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        out.push_str(&planned.render());
        if let Some(c) = &compressed {
            let methods = c["methods"].as_str().unwrap_or("");
            for st in c["stages"].as_array().into_iter().flatten() {
                writeln!(
                    out,
                    "stash compression ({methods}) everywhere: stage {}: saved bytes {} -> {} (+{} forward FLOPs)",
                    st["stage"], st["saved_bytes_exact"], st["saved_bytes"], st["added_forward_flops"],
                )?;
            }
            for v in c["values"].as_array().into_iter().flatten() {
                writeln!(
                    out,
                    "    {:<8} stage {} {:<7} {:>12} -> {:>12} B  +{:.3e} s{}",
                    v["value"].as_str().unwrap_or(""),
                    v["stage"],
                    v["method"].as_str().unwrap_or(""),
                    v["bytes_exact"],
                    v["bytes"],
                    v["added_seconds"].as_f64().unwrap_or(0.0),
                    if v["chosen"] == true { "  chosen" } else { "" }
                )?;
            }
            if c.get("tried").is_some() {
                writeln!(
                    out,
                    "stash compression ({methods}) chosen for {} value(s) under the limit",
                    c["chosen"]
                )?;
            }
        }
        for (o, mk, b) in &tried {
            writeln!(
                out,
                "joint candidate {o}: makespan {mk:.6} s, effective bubble rate {b:.4}"
            )?;
        }
    }
    Ok(out)
}

/// What `--compress` methods do (`inspect --memory --compress` without a limit): every saved
/// value each method applies to, with bytes and seconds ([`cleave_passes::compress::candidates`]),
/// and per stage the saved bytes (F's stash and B's hand-over to W) and F's FLOPs of the step
/// differentiated without and with every method applied everywhere.
fn compress_report(
    forward: &Function,
    stages: usize,
    methods: &str,
    profile: &str,
) -> Result<serde_json::Value> {
    use cleave_passes::autodiff::Compress;
    use cleave_passes::plan::{split_staged, stage_forward};
    let compress = crate::train::parse_compress(Some(methods))?;
    let device =
        cleave_passes::partition::DeviceProfile::load(profile).map_err(anyhow::Error::msg)?;
    let cut = Default::default();
    let staged =
        stage_forward(forward, stages, profile, cut).map_err(|e| anyhow::anyhow!("{e}"))?;
    let values = cleave_passes::compress::candidates(&staged, compress, &device)
        .map_err(|e| anyhow::anyhow!("--compress {methods}: {e}"))?;
    let split = |c: Compress| -> Result<Module> {
        let autodiff = cleave_passes::autodiff::methods::with_compress("autodiff", c)
            .map_err(anyhow::Error::msg)?;
        split_staged(forward, staged.clone(), stages, profile, cut, &autodiff)
            .map(|s| s.module)
            .map_err(|e| anyhow::anyhow!("--compress {methods}: {e}"))
    };
    let (exact, packed) = (split(Compress::default())?, split(compress)?);
    // Per stage: F→B/W and B→W bytes, and F's FLOPs.
    let of = |m: &Module| -> Vec<(u64, u64, u64)> {
        cleave_passes::split::split_stages(m)
            .iter()
            .map(|st| {
                let stashed = |f: &Function| -> u64 {
                    f.outputs
                        .iter()
                        .filter(|o| o.name.starts_with("stash."))
                        .map(|o| f.ty(o.value).size_bytes() as u64)
                        .sum()
                };
                let flops =
                    st.f.body
                        .iter()
                        .map(|&n| cleave_ir::cost::node_flops(st.f, n).total())
                        .sum();
                (stashed(st.f), stashed(st.b), flops)
            })
            .collect()
    };
    let stages: Vec<serde_json::Value> = of(&exact)
        .iter()
        .zip(of(&packed).iter())
        .enumerate()
        .map(|(s, ((e, ew, fe), (p, pw, fp)))| {
            serde_json::json!({
                "stage": s,
                "saved_bytes_exact": e + ew,
                "saved_bytes": p + pw,
                "b_to_w_bytes_exact": ew,
                "b_to_w_bytes": pw,
                "added_forward_flops": fp.saturating_sub(*fe),
            })
        })
        .collect();
    Ok(serde_json::json!({
        "methods": compress.pass_options(),
        "values": values.iter().map(|c| c.to_json()).collect::<Vec<_>>(),
        "stages": stages,
    }))
}

/// `pipeline` with `--grad-method` applied to its `autodiff` passes.
fn pipeline_with_method(pipeline: &str, method: Option<&str>, tangents: usize) -> Result<String> {
    let Some(m) = method else {
        return Ok(pipeline.to_string());
    };
    let m = crate::train::parse_grad_method(m, tangents)?;
    cleave_passes::autodiff::methods::with_grad_method(pipeline, &m)
        .map_err(|e| anyhow::anyhow!("--grad-method: {e}"))
}

fn cmd_inspect(a: InspectArgs) -> Result<()> {
    print!("{}", inspect_text(&a)?);
    Ok(())
}

/// What `cleave inspect` prints for these arguments (the Python package's `Plan.inspect`).
pub fn inspect_text(a: &InspectArgs) -> Result<String> {
    if a.memory {
        return inspect_memory_text(a);
    }
    let mut out = String::new();
    let mut module = load_module(&a.file, &a.model.load_options())?;
    let method = a
        .grad_method
        .as_deref()
        .map(|m| crate::train::parse_grad_method(m, a.tangents))
        .transpose()?;
    let passes = match (&a.passes, &a.grad_method) {
        (Some(p), _) => Some(pipeline_with_method(
            p,
            a.grad_method.as_deref(),
            a.tangents,
        )?),
        (None, Some(_)) => Some(pipeline_with_method(
            "autodiff",
            a.grad_method.as_deref(),
            a.tangents,
        )?),
        (None, None) => None,
    };
    if let Some(p) = &passes {
        let mut pm = PassManager::from_pipeline(p)?;
        pm.verify_each = true;
        run_pipeline(&mut module, &pm)?;
    }
    // `--grad-method` alone: FLOPs per phase of the differentiated step (dgrad and wgrad as
    // autodiff tagged them), stash bytes from its split (for forward gradients: the parameters'
    // tangents, which W reads).
    let method_only = method.is_some() && a.passes.is_none() && !a.split;
    let mut report;
    if method_only {
        report = inspect(&module);
        let mut split = module.clone();
        let mut pm = PassManager::from_pipeline("split-bw")?;
        pm.verify_each = true;
        run_pipeline(&mut split, &pm)?;
        report.stages = Some(split_report(&split));
    } else {
        if a.split && cleave_passes::split::split_stages(&module).is_empty() {
            let differentiated = module
                .functions
                .iter()
                .any(|f| f.outputs.iter().any(|o| o.name.starts_with(GRAD_PREFIX)));
            let pipeline = if differentiated {
                "split-bw"
            } else {
                "autodiff,split-bw"
            };
            let mut pm = PassManager::from_pipeline(pipeline)?;
            pm.verify_each = true;
            run_pipeline(&mut module, &pm)?;
        }
        report = inspect(&module);
        if a.split {
            report.stages = Some(split_report(&module));
        }
    }
    if let Some(m) = &method {
        report.grad_method = Some(m.to_string());
        // Known when the step was split.
        report.stash_bytes = report.stages.as_ref().map(|stages| {
            stages
                .iter()
                .map(|s| s.stash_bytes.F_to_B + s.stash_bytes.F_to_W + s.stash_bytes.B_to_W)
                .sum()
        });
    }
    if a.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        if !a.summary {
            writeln!(out, "{module}")?;
        }
        out.push_str(&render_table(&report));
        if let Some(stages) = &report.stages {
            out.push_str(&render_split_table(stages));
        }
    }
    Ok(out)
}

fn cmd_opt(a: OptArgs) -> Result<()> {
    if a.list_passes {
        for p in cleave_passes::registry() {
            println!("{:<12} {}", p.name, p.description);
        }
        return Ok(());
    }
    let mut pm = if a.passes.trim().is_empty() {
        PassManager::from_pipeline("verify")?
    } else {
        PassManager::from_pipeline(&pipeline_with_method(
            &a.passes,
            a.grad_method.as_deref(),
            a.tangents,
        )?)?
    };
    if a.dump_pass_pipeline {
        println!("{}", pm.pipeline_text());
        return Ok(());
    }
    let Some(file) = &a.file else {
        bail!("`cleave opt` needs a model file (or --list-passes)");
    };
    let mut module = load_module(file, &a.model.load_options())?;
    pm.verify_each = a.verify_each;
    pm.print.after_all = a.print_ir_after_all;
    pm.print.after = a.print_ir_after.iter().cloned().collect();
    pm.print.after_failure = a.print_ir_after_failure;
    for name in &pm.print.after {
        if !cleave_passes::registry().iter().any(|p| p.name == name) {
            bail!(
                "--print-ir-after: unknown pass `{name}`; valid passes: {}",
                cleave_passes::valid_pass_names()
            );
        }
    }
    run_pipeline(&mut module, &pm)?;
    let text = module.to_string();
    match &a.output {
        Some(path) => write_atomically(path, &text)?,
        None => print!("{text}"),
    }
    Ok(())
}

fn cmd_grad(a: GradArgs) -> Result<()> {
    let loaded = load_model(&a.file, &a.model.load_options())?;
    loaded.check_trainable(&a.file)?;
    let mut module = loaded.module;
    let fname = pick_function(&module, a.function.as_deref())?.name.clone();
    let already = module
        .function(&fname)
        .is_some_and(|f| f.outputs.iter().any(|o| o.name.starts_with(GRAD_PREFIX)));
    if !already {
        let pm = PassManager::from_pipeline(&format!("autodiff{{function={fname}}}"))?;
        run_pipeline(&mut module, &pm)?;
    }
    let func = module.function(&fname).expect("function exists");
    let mut args = read_args(a.inputs.as_deref(), a.params.as_deref(), loaded.params)?;
    coerce_indices(func, &mut args)?;
    let missing: Vec<&str> = func
        .args()
        .map(|x| x.name)
        .filter(|n| !args.contains_key(*n))
        .collect();
    if !missing.is_empty() {
        let seeds: Vec<&str> = missing
            .iter()
            .copied()
            .filter(|n| n.starts_with(GRAD_PREFIX))
            .collect();
        let hint = if !seeds.is_empty() && func.output("loss").is_none() {
            let outputs: Vec<String> = func
                .outputs
                .iter()
                .filter(|o| !o.name.starts_with(GRAD_PREFIX))
                .map(|o| format!("`{}`", o.name))
                .collect();
            format!(
                "; @{} has no output named `loss` (its outputs: {}): name the loss with \
                 --loss-output NAME, add one with --loss/--labels, or give the upstream \
                 gradients {} in --inputs",
                func.name,
                outputs.join(", "),
                seeds.join(", ")
            )
        } else if a.inputs.is_none() {
            "; give the data inputs with --inputs FILE.safetensors".to_string()
        } else {
            String::new()
        };
        bail!(
            "@{} needs {} that {} not given{hint}",
            func.name,
            missing.join(", "),
            if missing.len() == 1 { "was" } else { "were" }
        );
    }
    let results = run_function_named(func, &args, precision_of(a.dtype))
        .with_context(|| format!("running @{}", func.name))?;
    let grads: BTreeMap<String, Tensor> = func
        .outputs
        .iter()
        .zip(results)
        .filter_map(|(o, t)| o.name.strip_prefix(GRAD_PREFIX).map(|n| (n.to_string(), t)))
        .collect();
    write_tensors(&a.out, &grads)?;
    eprintln!("wrote {} gradient(s) to {}", grads.len(), a.out.display());
    Ok(())
}

fn precision_of(d: DtypeArg) -> Precision {
    match d {
        DtypeArg::F32 => Precision::F32,
        DtypeArg::F64 => Precision::F64,
    }
}

/// Reads data inputs and parameters into one map; a name in both files is an error. Without a
/// parameters file, the parameter values stored in the model file (`file_params`) are used.
/// Converts integer data given as i64 (PyTorch's index type) for an i32 input of the function,
/// when every value fits; an out-of-range value is an error naming the tensor.
pub fn coerce_indices(func: &Function, args: &mut BTreeMap<String, Tensor>) -> Result<()> {
    for arg in func.args() {
        let Some(t) = args.get(arg.name) else {
            continue;
        };
        if arg.ty.dtype == DType::I32 && t.dtype == DType::I64 && t.shape == arg.ty.shape {
            let values = t.as_i64().expect("int tensor");
            if let Some(bad) = values.iter().find(|&&v| i32::try_from(v).is_err()) {
                bail!(
                    "tensor \"{}\": the model takes i32 and the value {bad} does not fit",
                    arg.name
                );
            }
            let converted = Tensor::from_i64(DType::I32, t.shape.clone(), values.to_vec());
            args.insert(arg.name.to_string(), converted);
        }
    }
    Ok(())
}

fn read_args(
    inputs: Option<&std::path::Path>,
    params: Option<&std::path::Path>,
    file_params: BTreeMap<String, Tensor>,
) -> Result<BTreeMap<String, Tensor>> {
    let mut args: BTreeMap<String, Tensor> = match inputs {
        Some(path) => read_tensors(path)?,
        None => BTreeMap::new(),
    };
    if params.is_none() {
        for (name, t) in file_params {
            args.entry(name).or_insert(t);
        }
    }
    if let Some(p) = params {
        for (name, t) in read_tensors(p)? {
            if args.contains_key(&name) {
                bail!(
                    "tensor \"{name}\" is in both {} and {}",
                    inputs.map_or("the inputs".into(), |i| i.display().to_string()),
                    p.display()
                );
            }
            args.insert(name, t);
        }
    }
    Ok(args)
}

/// Writes text through a temporary file and a rename.
fn write_atomically(path: &std::path::Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

fn pick_function<'m>(module: &'m Module, name: Option<&str>) -> Result<&'m Function> {
    match name {
        Some(n) => module.function(n).with_context(|| {
            let names: Vec<_> = module
                .functions
                .iter()
                .map(|f| format!("@{}", f.name))
                .collect();
            format!("no function @{n}; the module has {}", names.join(", "))
        }),
        None => module
            .functions
            .first()
            .context("the module has no functions"),
    }
}

fn cmd_export_weights(a: ExportWeightsArgs) -> Result<()> {
    let (tensors, _) = crate::train::read_checkpoint(&a.checkpoint)?;
    // Everything but the optimizer's state (`opt.*`) is a parameter, under its model name.
    let mut out: BTreeMap<String, Tensor> = tensors
        .into_iter()
        .filter(|(name, _)| !name.starts_with("opt."))
        .collect();
    if out.is_empty() {
        bail!(
            "{}: the checkpoint holds no parameters",
            a.checkpoint.display()
        );
    }
    let (mut buffers, mut aliases) = (0, 0);
    if let Some(model) = &a.model {
        let loaded = crate::load::load_model_quiet(model, &a.model_args.load_options())?;
        for (name, t) in loaded.state.buffers {
            if out.insert(name.clone(), t).is_some() {
                bail!(
                    "{}: `{name}` is both a buffer and a parameter",
                    model.display()
                );
            }
            buffers += 1;
        }
        if !loaded.state.missing.is_empty() {
            eprintln!(
                "warning: {}: the export does not hold the buffer(s) {} (the graph never reads \
                 them): load with `strict=False`, or keep PyTorch's own values",
                model.display(),
                loaded.state.missing.join(", ")
            );
        }
        for (alias, param) in loaded.state.aliases {
            let t = out.get(&param).cloned().with_context(|| {
                format!(
                    "{}: `{alias}` is tied to `{param}`, which the checkpoint does not hold",
                    model.display()
                )
            })?;
            out.insert(alias, t);
            aliases += 1;
        }
    }
    write_tensors(&a.safetensors, &out)?;
    eprintln!(
        "wrote {} tensor(s) to {} ({} buffer(s), {} tied alias(es))",
        out.len(),
        a.safetensors.display(),
        buffers,
        aliases
    );
    Ok(())
}

fn cmd_run(a: RunArgs) -> Result<()> {
    let loaded = load_model(&a.file, &a.model.load_options())?;
    let module = loaded.module;
    let func = pick_function(&module, a.function.as_deref())?;
    let mut args = read_args(Some(&a.inputs), a.params.as_deref(), loaded.params)?;
    coerce_indices(func, &mut args)?;
    let results = run_function_named(func, &args, precision_of(a.dtype))
        .with_context(|| format!("running @{}", func.name))?;
    let named: BTreeMap<String, Tensor> = func
        .outputs
        .iter()
        .map(|o| o.name.clone())
        .zip(results)
        .collect();
    match &a.out {
        Some(path) => {
            write_tensors(path, &named)?;
            eprintln!("wrote {} output(s) to {}", named.len(), path.display());
        }
        None => {
            for o in &func.outputs {
                let t = &named[&o.name];
                println!("{}: {}", o.name, summarize(t));
            }
        }
    }
    Ok(())
}

/// A one-line summary of a tensor: its type and its first elements.
fn summarize(t: &Tensor) -> String {
    let ty = t.ty();
    let n = ty.num_elements();
    let shown = show_elements(t, 8);
    if n <= 8 {
        format!("{ty} = {shown}")
    } else {
        format!("{ty} = {shown} ({n} elements)")
    }
}

/// The first `limit` elements of a tensor as `[a, b, …]`.
fn show_elements(t: &Tensor, limit: usize) -> String {
    use cleave_ir::TensorData;
    let items: Vec<String> = match &t.data {
        TensorData::Float(v) => v.iter().take(limit).map(|x| format!("{x}")).collect(),
        TensorData::Int(v) => v.iter().take(limit).map(|x| x.to_string()).collect(),
        TensorData::Bool(v) => v.iter().take(limit).map(|x| x.to_string()).collect(),
    };
    let more = if t.data.len() > limit { ", …" } else { "" };
    if t.shape.is_empty() {
        items.join("")
    } else {
        format!("[{}{more}]", items.join(", "))
    }
}

fn build_model(a: &NewModelArgs) -> Result<Function> {
    use cleave_ir::models;
    let dtype = DType::F32;
    let norm = match a.norm.unwrap_or(NormArg::Layernorm) {
        NormArg::Layernorm => models::Norm::LayerNorm,
        NormArg::Rmsnorm => models::Norm::RmsNorm,
    };
    let act = match a.act.unwrap_or(ActArg::Gelu) {
        ActArg::Gelu => models::MlpAct::Gelu,
        ActArg::Silu => models::MlpAct::Silu,
    };
    let mut gpt_config = models::GptConfig::default();
    let overrides = [
        (a.batch, &mut gpt_config.batch),
        (a.vocab, &mut gpt_config.vocab),
        (a.d_model, &mut gpt_config.d_model),
        (a.heads, &mut gpt_config.heads),
        (a.layers, &mut gpt_config.layers),
        (a.seq, &mut gpt_config.seq),
    ];
    for (value, field) in overrides {
        if let Some(v) = value {
            *field = v;
        }
    }
    gpt_config.norm = norm;
    gpt_config.mlp_act = act;
    gpt_config.tied_embeddings = !a.untied;
    gpt_config.dtype = dtype;
    let func = match a.kind {
        ModelKind::Mlp => {
            let mut c = models::MlpConfig::default();
            if let Some(b) = a.batch {
                c.batch = b;
            }
            if let Some(s) = &a.sizes {
                c.sizes = s.clone();
            }
            c.dtype = dtype;
            models::mlp(&c)?
        }
        ModelKind::Gpt => models::gpt(&gpt_config)?,
        // One layer of the GPT the same options describe.
        ModelKind::GptLayer => models::gpt_layer(&gpt_config.layer_config())?,
        ModelKind::Cnn => {
            let mut c = models::CnnConfig::default();
            if let Some(v) = a.batch {
                c.batch = v;
            }
            if let Some(v) = a.in_channels {
                c.in_channels = v;
            }
            if let Some(v) = a.image {
                c.image_hw = [v, v];
            }
            if let Some(v) = a.classes {
                c.classes = v;
            }
            c.dtype = dtype;
            models::cnn(&c)?
        }
    };
    match a.loss {
        Some(kind) => {
            crate::loss::add_loss(func, kind, &a.labels).map_err(|e| anyhow::anyhow!("--loss: {e}"))
        }
        None => Ok(func),
    }
}

fn cmd_new_model(a: NewModelArgs) -> Result<()> {
    let func = build_model(&a)?;
    if let Err(errors) = cleave_ir::verify_function(&func) {
        let msgs: Vec<_> = errors.iter().map(|e| e.to_string()).collect();
        bail!(
            "internal error: the built model does not verify:\n  {}",
            msgs.join("\n  ")
        );
    }
    let params = a.params_out.as_ref().map(|_| init_params(&func, a.seed));
    let module = Module::with_function(func);
    let text = module.to_string();
    match &a.output {
        Some(path) => {
            let tmp = path.with_extension("cir.tmp");
            std::fs::write(&tmp, &text)
                .with_context(|| format!("cannot write {}", tmp.display()))?;
            std::fs::rename(&tmp, path)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        None => print!("{text}"),
    }
    if let (Some(path), Some(params)) = (&a.params_out, params) {
        write_tensors(path, &params)?;
    }
    if let Some(path) = &a.data_out {
        let func = module.functions.first().expect("one function");
        write_tensors(path, &synthetic_data(func, a.examples, a.seed)?)?;
    }
    Ok(())
}

/// Synthetic training data for `func`'s data inputs, `n` examples, seeded: float inputs are
/// standard normal; integer inputs are class indices below the last extent of the `logits`
/// output (the vocabulary or class count), except that a `tokens`/`targets` pair (GPT) is a
/// learnable sequence task: each example is an arithmetic progression `s, s+d, s+2d, …` modulo the
/// vocabulary (random `s` and `d`), and `targets` is `tokens` shifted by one (the next term).
fn synthetic_data(func: &Function, n: usize, seed: u64) -> Result<BTreeMap<String, Tensor>> {
    let classes = func
        .output("logits")
        .and_then(|v| func.ty(v).shape.last().copied())
        .unwrap_or(2)
        .max(1);
    let mut rng = crate::init::SplitMix64::new(seed ^ 0x5EED_DA7A);
    let mut out = BTreeMap::new();
    let inputs: Vec<_> = func.data_inputs().collect();
    let names: Vec<&str> = inputs.iter().map(|a| a.name).collect();
    let lm = names.contains(&"tokens") && names.contains(&"targets");
    for a in &inputs {
        if a.ty.shape.is_empty() {
            bail!("--data-out: data input `{}` has no batch dimension", a.name);
        }
        let mut shape = a.ty.shape.clone();
        shape[0] = n;
        let per: usize = a.ty.shape[1..].iter().product();
        let total = n * per;
        let t = match a.ty.dtype {
            DType::F32 => {
                Tensor::from_f32(shape, (0..total).map(|_| rng.normal() as f32).collect())
            }
            DType::I32 if lm && (a.name == "tokens" || a.name == "targets") => continue,
            DType::I32 => Tensor::from_i32(
                shape,
                (0..total)
                    .map(|_| (rng.next_u64() % classes as u64) as i32)
                    .collect(),
            ),
            d => bail!(
                "--data-out: data input `{}` is {d}; synthetic data covers f32 and i32 inputs",
                a.name
            ),
        };
        out.insert(a.name.to_string(), t);
    }
    if lm {
        let tok = inputs.iter().find(|a| a.name == "tokens").expect("checked");
        let mut shape = tok.ty.shape.clone();
        shape[0] = n;
        let per: usize = tok.ty.shape[1..].iter().product();
        let v = classes as u64;
        let (mut tokens, mut targets) = (Vec::with_capacity(n * per), Vec::with_capacity(n * per));
        for _ in 0..n {
            let (s, d) = (
                rng.next_u64() % v,
                1 + rng.next_u64() % v.saturating_sub(1).max(1),
            );
            for t in 0..per as u64 {
                tokens.push(((s + t * d) % v) as i32);
                targets.push(((s + (t + 1) * d) % v) as i32);
            }
        }
        out.insert("tokens".into(), Tensor::from_i32(shape.clone(), tokens));
        out.insert("targets".into(), Tensor::from_i32(shape, targets));
    }
    Ok(out)
}
