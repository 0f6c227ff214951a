//! Pipeline stages on one accelerator: `cleave train --target cuda --stages P` (and
//! `--microbatches M`) with every stage in this process, each stage's F, B and W functions on
//! backends of their own ([`StepBackend`]; on CUDA one stream per stage).
//!
//! # What runs
//!
//! The CPU pipeline's plan ([`crate::pipeline_train::pipeline_plan`]: `partition`, `autodiff`
//! with `--grad-method`, `split-bw`, the schedule named by `--schedule`) and its state
//! ([`PipelineState`]: parameters, optimizer state, the updater). Each stage function is built
//! once by the caller's `make(function, stage)`; an empty function (stage 0's B under backprop)
//! is skipped.
//!
//! # One step ([`StagePipeline::step`])
//!
//! The device lists of the schedule are run in one order that respects them: round-robin over
//! the devices, each device runs its next actions while every argument they read is available
//! (a data input of the microbatch, a parameter, a gradient accumulator of its stage, or a value
//! of the microbatch another action produced: `act.*`, `stash.*`, `dgrad.*`, `wgrad.*`). This is
//! the thread executor's dataflow ([`cleave_runtime::pipeline`]) with the devices taking turns
//! on one host thread; a list that can never run (a value nothing produces) is an error naming
//! the device, the action and the value. W's `grad.*` arguments are the stage's accumulators,
//! zero at the start of the step. After the last action the gradients (by parameter) go through
//! [`finish_step`]: SGD `p − lr·(scale·g)`, or the momentum/AdamW updater, with `--grad-clip`.
//!
//! Values cross stages through the host (the backend's `output`, then `set` on the consumer):
//! with one stream per stage a stage's kernels run in order on its stream, and a download waits
//! for them. Overlap between stages (device-to-device copies behind events) is not built yet.
//!
//! # What it checks
//!
//! `compiler/tests/stage_pipeline.rs` runs this executor on the CPU runtime's compiled plans (bit
//! for bit the losses and weights of the thread pipeline under 1F1B, ZB-H1 and ZB-V) and, with
//! the `mlir` feature, on MLIR's CPU lowering of the kernels the GPU path compiles (losses within
//! 1e-4). `scripts/gpu-check.sh` compares `--target cuda --stages 2` with the CPU pipeline on a
//! GPU.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use cleave_ir::{Function, Tensor};
use cleave_passes::schedule::ActionKind;
use cleave_passes::split::split_stages;
use cleave_runtime::pipeline::{PipelineOptions, StepResult};
use cleave_runtime::{host_from_tensor, tensor_from_host, HostData};

use crate::gpu_train::StepBackend;
use crate::pipeline_train::{
    finish_step, pipeline_plan, step_options, tangent_inputs, with_shapes, PipelineState,
};
use crate::train::{
    checkpoint_meta, eval_plan, evaluate, gather_batch, load_data, parse_grad_method,
    restore_checkpoint, set_args, write_checkpoint, Metrics, Order, Progress, TrainArgs,
    TrainSummary,
};

/// One stage function on its backend (`None` for a function with no outputs).
struct Part<B> {
    func: Function,
    backend: Option<B>,
}

/// What a run of [`train_stages_on`] returns.
pub struct StageRun {
    /// The summary `cleave train` prints.
    pub summary: TrainSummary,
    /// Each step's loss (the mean over the microbatches).
    pub losses: Vec<f64>,
    /// The final parameters (and optimizer state), by name.
    pub params: BTreeMap<String, HostData>,
}

/// Which of F, B, W an action runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    F,
    B,
    W,
}

/// One action of a device list: stage, what it runs (BW is B then W), microbatch.
#[derive(Clone, Copy, Debug)]
struct Step {
    stage: usize,
    kinds: &'static [Kind],
    microbatch: usize,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let k = match self.kinds {
            [Kind::F] => "F",
            [Kind::B] => "B",
            [Kind::W] => "W",
            _ => "BW",
        };
        write!(f, "{}{k}{}", self.stage, self.microbatch)
    }
}

/// The stages of a pipeline on backends `B`, and the device lists that drive them.
pub struct StagePipeline<B> {
    /// Per stage: F, B, W.
    parts: Vec<[Part<B>; 3]>,
    /// Per device, its actions in order.
    lists: Vec<Vec<Step>>,
    microbatches: usize,
}

impl<B: StepBackend> StagePipeline<B> {
    /// Builds the backends of every stage function of the split `module` with `make(function,
    /// stage)`, and the device lists of `schedule`.
    pub fn new(
        module: &cleave_ir::Module,
        schedule: &cleave_passes::schedule::Schedule,
        microbatches: usize,
        mut make: impl FnMut(&Function, usize) -> Result<B>,
    ) -> Result<Self> {
        if schedule.reverse.is_some() {
            bail!(
                "bidirectional schedules (replicated stages) do not run on the single-device \
                 pipeline yet; pick a one-direction schedule"
            );
        }
        let split = split_stages(module);
        if split.len() != schedule.n_stages() {
            bail!(
                "the split module has {} stages, the schedule needs {}",
                split.len(),
                schedule.n_stages()
            );
        }
        let mut parts = Vec::new();
        for (s, st) in split.iter().enumerate() {
            let mut part = |f: &Function| -> Result<Part<B>> {
                let backend = if f.outputs.is_empty() {
                    None
                } else {
                    Some(make(f, s).with_context(|| format!("building @{}", f.name))?)
                };
                Ok(Part {
                    func: f.clone(),
                    backend,
                })
            };
            parts.push([part(st.f)?, part(st.b)?, part(st.w)?]);
        }
        let lists = schedule
            .devices
            .iter()
            .map(|list| {
                list.iter()
                    .filter_map(|x| {
                        let kinds: &'static [Kind] = match x.kind {
                            ActionKind::F => &[Kind::F],
                            ActionKind::B => &[Kind::B],
                            ActionKind::W => &[Kind::W],
                            ActionKind::BW => &[Kind::B, Kind::W],
                            _ => return None,
                        };
                        Some(Step {
                            stage: x.stage as usize,
                            kinds,
                            microbatch: x.microbatch as usize,
                        })
                    })
                    .collect()
            })
            .collect();
        Ok(StagePipeline {
            parts,
            lists,
            microbatches,
        })
    }

    /// The name of the first argument of `func` that is not available yet (see the module docs).
    fn missing<'f>(func: &'f Function, kind: Kind, have: &Held<'_>, j: usize) -> Option<&'f str> {
        func.args()
            .map(|x| x.name)
            .find(|&n| !(is_accumulator(func, kind, n) || have.value(j, n).is_some()))
            .map(|n| n as &str)
    }

    /// Runs `k` of action `x` on device `d` (see the module docs).
    fn run(&mut self, d: usize, x: Step, k: Kind, have: &mut Held<'_>) -> Result<()> {
        let j = x.microbatch;
        let part = &mut self.parts[x.stage][k as usize];
        let Some(backend) = part.backend.as_mut() else {
            return Ok(());
        };
        let func = &part.func;
        for arg in func.args() {
            let n = arg.name;
            let t = if is_accumulator(func, k, n) {
                have.acc[x.stage]
                    .get(n)
                    .cloned()
                    .unwrap_or_else(|| Tensor::zeros(arg.ty))
            } else if let Some(v) = have.value(j, n) {
                // The same elements under the argument's shape (a tangent is drawn flat).
                let mut v = v.clone();
                if v.numel() == arg.ty.num_elements() {
                    v.shape.clone_from(&arg.ty.shape);
                }
                v
            } else {
                bail!("device {d}, action {x}: no value `{n}` for @{}", func.name);
            };
            backend
                .set(n, &t)
                .with_context(|| format!("device {d}, action {x}: `{n}`"))?;
        }
        backend
            .run()
            .with_context(|| format!("device {d}, action {x}: @{}", func.name))?;
        for o in &func.outputs {
            let t = backend
                .output(&o.name)
                .with_context(|| format!("device {d}, action {x}"))?;
            if o.name == "loss" {
                have.losses[j] = t.to_f64_vec().first().copied().unwrap_or(f64::NAN) as f32;
            } else if k == Kind::W && o.name.starts_with("grad.") {
                have.acc[x.stage].insert(o.name.clone(), t);
            } else {
                have.values[j].insert(o.name.clone(), t);
            }
        }
        Ok(())
    }

    /// Runs one step on `micro` (per microbatch, every data input by name) with `params`; the
    /// result carries the losses, the gradient sums by parameter and, under SGD
    /// (`opts.update`), the updated parameters. See the module docs.
    pub fn step(
        &mut self,
        params: &BTreeMap<String, HostData>,
        shapes: &BTreeMap<String, Vec<usize>>,
        micro: &[BTreeMap<String, Tensor>],
        opts: &PipelineOptions,
    ) -> Result<StepResult> {
        let m = self.microbatches;
        if micro.len() != m {
            bail!("{} microbatches given, the pipeline runs {m}", micro.len());
        }
        let mut have = Held {
            params: params
                .iter()
                .filter_map(|(k, d)| Some((k.as_str(), tensor_from_host(shapes.get(k)?, d))))
                .collect(),
            micro,
            values: vec![HashMap::new(); m],
            acc: vec![BTreeMap::new(); self.parts.len()],
            losses: vec![f32::NAN; m],
        };
        let mut pos = vec![0usize; self.lists.len()];
        loop {
            let mut progressed = false;
            for (d, at) in pos.iter_mut().enumerate() {
                while let Some(&x) = self.lists[d].get(*at) {
                    // W of a BW reads what its B makes: B's arguments gate the action.
                    let k = x.kinds[0];
                    let f = &self.parts[x.stage][k as usize].func;
                    if Self::missing(f, k, &have, x.microbatch).is_some() {
                        break;
                    }
                    for &k in x.kinds {
                        self.run(d, x, k, &mut have)?;
                    }
                    *at += 1;
                    progressed = true;
                }
            }
            if pos.iter().zip(&self.lists).all(|(&p, l)| p == l.len()) {
                break;
            }
            if !progressed {
                let waits: Vec<String> = (0..self.lists.len())
                    .filter_map(|d| {
                        let x = self.lists[d].get(pos[d])?;
                        let k = x.kinds[0];
                        let f = &self.parts[x.stage][k as usize].func;
                        let n = Self::missing(f, k, &have, x.microbatch)?;
                        Some(format!("device {d} at {x} waits for `{n}`"))
                    })
                    .collect();
                bail!(
                    "the schedule cannot go on: {} (no action makes these values)",
                    waits.join("; ")
                );
            }
        }
        let mut r = StepResult {
            losses: have.losses,
            ..StepResult::default()
        };
        for stage in have.acc {
            for (name, t) in stage {
                let p = name.strip_prefix("grad.").expect("accumulators are grad.*");
                if !params.contains_key(p) {
                    continue;
                }
                let g = host_from_tensor(&t).context("gradients are f32")?;
                if let (true, HostData::F32(x), HostData::F32(gv)) = (opts.update, &params[p], &g) {
                    r.params.insert(
                        p.to_string(),
                        HostData::F32(cleave_runtime::pipeline::sgd(x, gv, opts)),
                    );
                }
                r.grads.insert(p.to_string(), g);
            }
        }
        Ok(r)
    }
}

/// Whether argument `n` of `func` (run as `kind`) is a gradient accumulator: a `grad.*` argument
/// of W that W also returns.
fn is_accumulator(func: &Function, kind: Kind, n: &str) -> bool {
    kind == Kind::W && n.starts_with("grad.") && func.output(n).is_some()
}

/// What a step holds: the parameters as tensors, the microbatches' data, the values actions
/// made (per microbatch, by name), each stage's accumulators and the losses.
struct Held<'a> {
    params: BTreeMap<&'a str, Tensor>,
    micro: &'a [BTreeMap<String, Tensor>],
    values: Vec<HashMap<String, Tensor>>,
    acc: Vec<BTreeMap<String, Tensor>>,
    losses: Vec<f32>,
}

impl Held<'_> {
    /// A parameter, a data input of microbatch `j`, or a value made for it.
    fn value(&self, j: usize, n: &str) -> Option<&Tensor> {
        self.params
            .get(n)
            .or_else(|| self.micro[j].get(n))
            .or_else(|| self.values[j].get(n))
    }
}

/// Rejects what the single-device pipeline does not run.
fn check_supported(a: &TrainArgs, target: &str) -> Result<()> {
    let unsupported = [
        (a.remat.is_some(), "--remat"),
        (a.memory_limit.is_some(), "--memory-limit"),
        (a.memory_report, "--memory-report"),
        (a.timeline.is_some(), "--timeline"),
        (a.fail_action.is_some(), "--fail-action"),
        (a.kill_action.is_some(), "--kill-action"),
        (a.debug_nan, "--debug-nan"),
    ];
    for (bad, what) in unsupported {
        if bad {
            bail!(
                "--target {target} --stages/--microbatches: {what} is not supported on the \
                 single-device pipeline yet; use --target cpu"
            );
        }
    }
    Ok(())
}

/// Trains `a` (with `--stages`/`--microbatches`) on a [`StagePipeline`] whose backends `make`
/// builds: the data order, initialisation, optimizer, checkpoints and final evaluation of the
/// CPU pipeline (`cleave train --stages`). `target` names the backend in messages.
pub fn train_stages_on<B: StepBackend>(
    a: &TrainArgs,
    target: &str,
    make: impl FnMut(&Function, usize) -> Result<B>,
) -> Result<StageRun> {
    check_supported(a, target)?;
    let (p, m) = (a.stages, a.microbatches);
    if p == 0 || m == 0 {
        bail!("--stages and --microbatches must be at least 1");
    }
    let lr = a.lr.unwrap_or(a.optimizer.default_lr());
    let method = parse_grad_method(&a.grad_method, a.tangents)?;
    let crate::train::TrainingModel {
        loaded,
        forward,
        traced: mb,
    } = crate::train::load_training_model_for(a)?;
    let step_forward = crate::train::training_forward(&forward, a.chunk_lm_head)?;
    let tangents = tangent_inputs(&step_forward, &method);
    let plan = pipeline_plan(a, &step_forward)?;
    let mut pipe = StagePipeline::new(&plan.module, &plan.schedule, m, make)?;
    let PipelineState {
        mut params,
        shapes,
        mut updater,
    } = PipelineState::new(a, lr, &forward, &loaded, &plan.module)?;
    let batch = m * mb;
    let (cols, n) = load_data(&a.data, &forward)?;
    let n_eval = crate::train::held_out(n, batch);
    let n_train = n - n_eval;
    if n_train < batch {
        bail!(
            "{}: {n} examples leave {n_train} for training, fewer than one step's {m} \
             microbatches of {mb}",
            a.data.display()
        );
    }
    let data_shapes: BTreeMap<&str, Vec<usize>> = forward
        .data_inputs()
        .map(|x| (x.name, x.ty.shape.clone()))
        .collect();
    let mut start = 0;
    if let Some(dir) = &a.resume {
        let mut state = with_shapes(&shapes, &params);
        let (step, _) = restore_checkpoint(dir, &mut state)?;
        params.extend(state.into_iter().map(|(name, (_, d))| (name, d)));
        start = step;
    }
    let opts = step_options(a, lr);
    let mut metrics = Metrics::open(a.metrics.as_deref())?;
    let mut order = Order::new(n_train, a.seed);
    let mut summary = TrainSummary::default();
    let mut progress = Progress::new(start);
    let mut losses = Vec::new();
    let t0 = Instant::now();
    for step in start..a.steps {
        let rows = order.rows(step, batch);
        let sizes: Vec<usize> = tangents.iter().map(|(_, n)| *n).collect();
        let drawn = crate::train::draw_tangents(a.seed, step, &sizes);
        let micro: Vec<BTreeMap<String, Tensor>> = (0..m)
            .map(|j| {
                let mut x: BTreeMap<String, Tensor> = cols
                    .iter()
                    .map(|c| {
                        let d = gather_batch(c, &rows[j * mb..(j + 1) * mb]);
                        (
                            c.name.clone(),
                            tensor_from_host(&data_shapes[c.name.as_str()], &d),
                        )
                    })
                    .collect();
                for ((name, n), d) in tangents.iter().zip(&drawn) {
                    x.insert(name.clone(), tensor_from_host(&[*n], d));
                }
                x
            })
            .collect();
        let mut r = pipe
            .step(&params, &shapes, &micro, &opts)
            .with_context(|| format!("--target {target}: step {step}"))?;
        let loss = r.losses.iter().map(|&x| x as f64).sum::<f64>() / m as f64;
        if !loss.is_finite() {
            bail!("loss is {loss} at step {step}; training stopped");
        }
        finish_step(&mut r, &mut params, updater.as_mut(), a.grad_clip, &opts)?;
        losses.push(loss);
        let done = step + 1;
        progress.step(a, &mut summary, &mut metrics, done, loss)?;
        if let Some(dir) = &a.checkpoint {
            if done.is_multiple_of(a.checkpoint_every.max(1)) || done == a.steps {
                let mut meta = checkpoint_meta(a, done, batch, lr, &method);
                meta.insert("microbatches".into(), m.to_string());
                write_checkpoint(dir, &with_shapes(&shapes, &params), meta)?;
            }
        }
    }
    if !a.quiet {
        eprintln!();
    }
    summary.steps_per_s = summary.steps_run as f64 / t0.elapsed().as_secs_f64().max(1e-9);
    // Final evaluation on the held-out tail, on the CPU runtime, as the CPU pipeline does.
    let labels = ["labels", "targets"]
        .into_iter()
        .find(|x| cols.iter().any(|c| c.name == *x));
    if let (true, Some(labels)) = (n_eval >= mb && forward.output("logits").is_some(), labels) {
        let mut slot = None;
        let plan = eval_plan(&mut slot, &forward, a.codegen)?;
        set_args(plan, &params)?;
        let (acc, eval_loss) = evaluate(plan, &cols, labels, n_train, n, mb)?;
        summary.accuracy = Some(acc);
        metrics
            .line(serde_json::json!({"step": a.steps, "eval_loss": eval_loss, "accuracy": acc}))?;
    }
    Ok(StageRun {
        summary,
        losses,
        params,
    })
}
