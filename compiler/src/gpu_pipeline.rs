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
//! [`update_step`] (the thread pipeline's): SGD `p − lr·(scale·g)`, or the momentum/AdamW
//! updater, with `--grad-clip`. Under `--precision f16` the CPU pipeline's [`LossScaler`] runs the step: every
//! microbatch gets the `precision.loss_scale` input, the gradient sums are scaled back by
//! `1/(M·S)`, a step whose gradients are not finite is rolled back and the scale halved, and
//! checkpoints keep the scale.
//!
//! Values cross stages through the host (the backend's `output`, then `set` on the consumer):
//! with one stream per stage a stage's kernels run in order on its stream, and a download waits
//! for them. Overlap between stages (device-to-device copies behind events) is not built yet.
//! `stash.*` values belong to the stage that made them (two stages may stash one value under
//! one name) and never leave it.
//!
//! # Processes
//!
//! Under `mpirun` (feature `mpi`) each process runs one device's list and builds only that
//! device's stages. A value a stage on another device reads leaves through a `StageTransport`
//! (send, receive, wait): host tensors over MPI, or device buffers over NCCL (feature `nccl`);
//! a process that waits for a value receives the next one sent to it. After the step every
//! process all-gathers the losses and gradient sums, so that all of them apply the same update;
//! rank 0 prints, writes metrics and checkpoints.
//!
//! # What it checks
//!
//! `compiler/tests/stage_pipeline.rs` runs this executor on the CPU runtime's compiled plans (bit
//! for bit the losses and weights of the thread pipeline under 1F1B, ZB-H1 and ZB-V) and, with
//! the `mlir` feature, on MLIR's CPU lowering of the kernels the GPU path compiles (losses within
//! 1e-4). `cleave train --executor list` runs it on CPU plans, under `mpirun` too
//! (`compiler/tests/mpi_pipeline.rs`). `scripts/gpu-check.sh` compares `--target cuda --stages 2`
//! with the CPU pipeline on a GPU; the GPU and NCCL paths have not run yet.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use cleave_ir::{Function, Tensor};
use cleave_passes::split::split_stages;
use cleave_runtime::pipeline::{PipelineKind, PipelineOptions, StepResult};
use cleave_runtime::remote::Remote;
use cleave_runtime::{host_from_tensor, tensor_from_host, HostData};

use crate::gpu_train::StepBackend;
use crate::pipeline_train::{
    final_eval, microbatches, pipeline_plan, step_data, step_options, tangent_inputs, update_step,
    with_shapes, LossScaler, PipelineState,
};
use crate::train::{
    checkpoint_meta, parse_grad_method, write_checkpoint, Metrics, Order, Progress, TrainArgs,
    TrainSummary,
};

/// One stage function on its backend (`None` for a function with no outputs).
struct Part<B> {
    func: Function,
    backend: Option<B>,
    /// The step whose parameters the backend holds (they change only between steps, so each
    /// backend receives them once per step).
    params_of: Option<u64>,
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
    /// Per value name, the devices whose stage functions read it (`stash.*` values never leave
    /// their stage and are not listed).
    readers: HashMap<String, Vec<usize>>,
    /// Steps run (the generation of the parameters the backends hold).
    steps: u64,
}

impl<B: StepBackend> StagePipeline<B> {
    /// Builds the backends of the stage functions of the split `module` with `make(function,
    /// stage)` (only the stages placed on `only_device` when it is given: a process that runs one
    /// device), and the device lists of `schedule`.
    pub fn new(
        module: &cleave_ir::Module,
        schedule: &cleave_passes::schedule::Schedule,
        microbatches: usize,
        only_device: Option<usize>,
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
        let placement: Vec<usize> = schedule.placement.iter().map(|&d| d as usize).collect();
        let mut readers: HashMap<String, Vec<usize>> = HashMap::new();
        let mut parts = Vec::new();
        for (s, st) in split.iter().enumerate() {
            for f in [st.f, st.b, st.w] {
                for x in f.args().filter(|x| !x.name.starts_with("stash.")) {
                    let r = readers.entry(x.name.to_string()).or_default();
                    if !r.contains(&placement[s]) {
                        r.push(placement[s]);
                    }
                }
            }
            let here = only_device.is_none_or(|d| d == placement[s]);
            let mut part = |f: &Function| -> Result<Part<B>> {
                let backend = if f.outputs.is_empty() || !here {
                    None
                } else {
                    Some(make(f, s).with_context(|| format!("building @{}", f.name))?)
                };
                Ok(Part {
                    func: f.clone(),
                    backend,
                    params_of: None,
                })
            };
            parts.push([part(st.f)?, part(st.b)?, part(st.w)?]);
        }
        let lists = crate::pipeline_train::device_actions(schedule)
            .into_iter()
            .map(|list| {
                list.into_iter()
                    .map(|x| Step {
                        stage: x.stage,
                        kinds: match x.kind {
                            PipelineKind::F => &[Kind::F],
                            PipelineKind::B => &[Kind::B],
                            PipelineKind::W => &[Kind::W],
                            PipelineKind::BW => &[Kind::B, Kind::W],
                        },
                        microbatch: x.microbatch,
                    })
                    .collect()
            })
            .collect();
        Ok(StagePipeline {
            parts,
            lists,
            microbatches,
            readers,
            steps: 0,
        })
    }

    /// The name of the first argument of `func` that is not available yet (see the module docs).
    fn missing<'f>(func: &'f Function, kind: Kind, have: &Held<'_>, x: Step) -> Option<&'f str> {
        func.args()
            .map(|a| a.name)
            .find(|&n| {
                !(is_accumulator(func, kind, n) || have.value(x.stage, x.microbatch, n).is_some())
            })
            .map(|n| n as &str)
    }

    /// Runs `k` of action `x` on device `d` (see the module docs); values that stages on other
    /// devices read go through `link`.
    fn run(
        &mut self,
        d: usize,
        x: Step,
        k: Kind,
        have: &mut Held<'_>,
        mut link: Option<&mut (dyn StageTransport + '_)>,
    ) -> Result<()> {
        let j = x.microbatch;
        let part = &mut self.parts[x.stage][k as usize];
        let Some(backend) = part.backend.as_mut() else {
            return Ok(());
        };
        let func = &part.func;
        let fresh = part.params_of == Some(self.steps);
        for arg in func.args() {
            let n = arg.name;
            if fresh && have.params.contains_key(n) {
                continue;
            }
            let t = if is_accumulator(func, k, n) {
                have.acc[x.stage]
                    .get(n)
                    .cloned()
                    .unwrap_or_else(|| Tensor::zeros(arg.ty))
            } else if let Some(v) = have.value(x.stage, j, n) {
                // The same elements under the argument's shape (data and tangents come flat).
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
        part.params_of = Some(self.steps);
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
                if let Some(link) = link.as_deref_mut() {
                    for &to in self.readers.get(&o.name).into_iter().flatten() {
                        if to != d {
                            link.send(to, j, &o.name, &t).with_context(|| {
                                format!(
                                    "device {d}, action {x}: sending `{}` to device {to}",
                                    o.name
                                )
                            })?;
                        }
                    }
                }
                have.values[j].insert(value_key(x.stage, &o.name).into_owned(), t);
            }
        }
        Ok(())
    }

    /// Runs one step on `micro` (per microbatch, every data input by name) with `params`; the
    /// result carries the losses, the gradient sums by parameter and, under SGD
    /// (`opts.update`), the updated parameters. See the module docs. With a `link` this process
    /// runs only the link's device: values for other devices leave through it, missing values
    /// arrive through it, and after the step every process gets every loss and gradient.
    pub fn step(
        &mut self,
        params: &BTreeMap<String, HostData>,
        shapes: &BTreeMap<String, Vec<usize>>,
        micro: &[BTreeMap<String, Tensor>],
        opts: &PipelineOptions,
        mut link: Option<&mut (dyn StageTransport + '_)>,
    ) -> Result<StepResult> {
        let m = self.microbatches;
        if micro.len() != m {
            bail!("{} microbatches given, the pipeline runs {m}", micro.len());
        }
        self.steps += 1;
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
        let mine = link.as_ref().map(|l| l.device());
        let mut pos: Vec<usize> = (0..self.lists.len())
            .map(|d| match mine {
                Some(m) if m != d => self.lists[d].len(),
                _ => 0,
            })
            .collect();
        loop {
            let mut progressed = false;
            for (d, at) in pos.iter_mut().enumerate() {
                while let Some(&x) = self.lists[d].get(*at) {
                    // W of a BW reads what its B makes: B's arguments gate the action.
                    let k = x.kinds[0];
                    let f = &self.parts[x.stage][k as usize].func;
                    if Self::missing(f, k, &have, x).is_some() {
                        break;
                    }
                    for &k in x.kinds {
                        self.run(d, x, k, &mut have, link.as_deref_mut())?;
                    }
                    *at += 1;
                    progressed = true;
                }
            }
            if pos.iter().zip(&self.lists).all(|(&p, l)| p == l.len()) {
                break;
            }
            if let (false, Some(l)) = (progressed, link.as_deref_mut()) {
                // This process waits for a value another device makes.
                let (j, name, t) = l.receive().with_context(|| {
                    let d = l.device();
                    format!("device {d} waiting at {}", self.lists[d][pos[d]])
                })?;
                if j >= m {
                    bail!(
                        "device {} received `{name}` for microbatch {j} of {m}",
                        l.device()
                    );
                }
                have.values[j].insert(name, t);
                continue;
            }
            if !progressed {
                let waits: Vec<String> = (0..self.lists.len())
                    .filter_map(|d| {
                        let x = self.lists[d].get(pos[d])?;
                        let k = x.kinds[0];
                        let f = &self.parts[x.stage][k as usize].func;
                        let n = Self::missing(f, k, &have, *x)?;
                        Some(format!("device {d} at {x} waits for `{n}`"))
                    })
                    .collect();
                bail!(
                    "the schedule cannot go on: {} (no action makes these values)",
                    waits.join("; ")
                );
            }
        }
        let (losses, acc): (Vec<f32>, Vec<(String, Tensor)>) = match link {
            None => (have.losses, have.acc.into_iter().flatten().collect()),
            Some(l) => gather_results(l, &have.losses, have.acc)?,
        };
        let mut r = StepResult {
            losses,
            ..StepResult::default()
        };
        for (name, t) in acc {
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
        Ok(r)
    }
}

/// How the devices of a stage pipeline exchange values when each device is its own process. The
/// action-list executor knows only this interface: send, receive, wait (and the collective that
/// ends a step). [`RemoteTransport`] moves host tensors over MPI (`cleave-runtime`'s
/// [`Remote`]); `NcclTransport` (feature `nccl`) moves device buffers over NCCL with headers
/// over MPI. With every device in one process there is no transport: values stay in the
/// executor (the thread pipeline's channels are the same contract, in
/// `cleave_runtime::pipeline`).
pub trait StageTransport {
    /// The device this process runs.
    fn device(&self) -> usize;
    /// Sends value `name` of microbatch `microbatch` to `device`'s process; may return before it
    /// has arrived.
    fn send(&mut self, device: usize, microbatch: usize, name: &str, t: &Tensor) -> Result<()>;
    /// Blocks for the next value another process sent this one: microbatch, name, tensor.
    fn receive(&mut self) -> Result<(usize, String, Tensor)>;
    /// Waits until every value this process sent has left it.
    fn wait(&mut self) -> Result<()>;
    /// Every process's `bytes`, by device (a collective: every process calls it).
    fn all_gather(&mut self, bytes: Vec<u8>) -> Result<Vec<Vec<u8>>>;
}

/// After a step on processes: every process's losses (those its last stage computed) and
/// gradient accumulators, gathered so that each process holds the whole step's.
#[allow(clippy::type_complexity)]
fn gather_results(
    link: &mut (dyn StageTransport + '_),
    losses: &[f32],
    acc: Vec<BTreeMap<String, Tensor>>,
) -> Result<(Vec<f32>, Vec<(String, Tensor)>)> {
    link.wait()?;
    let mut out = Vec::new();
    let mine: Vec<(usize, f32)> = losses
        .iter()
        .enumerate()
        .filter(|(_, x)| !x.is_nan())
        .map(|(j, &x)| (j, x))
        .collect();
    put_u64(&mut out, mine.len() as u64);
    for (j, x) in &mine {
        put_u64(&mut out, *j as u64);
        out.extend_from_slice(&x.to_le_bytes());
    }
    let acc: Vec<(String, Tensor)> = acc.into_iter().flatten().collect();
    put_u64(&mut out, acc.len() as u64);
    for (name, t) in &acc {
        put_tensor(&mut out, name, t);
    }
    let mut all_losses = vec![f32::NAN; losses.len()];
    let mut all_acc = Vec::new();
    for (d, bytes) in link.all_gather(out)?.into_iter().enumerate() {
        let what = || format!("the step results of device {d}");
        let mut r = Bytes(&bytes);
        for _ in 0..r.u64().with_context(what)? {
            let j = r.u64().with_context(what)? as usize;
            let x = f32::from_le_bytes(r.take(4).with_context(what)?.try_into().expect("4"));
            *all_losses
                .get_mut(j)
                .with_context(|| format!("{}: microbatch {j}", what()))? = x;
        }
        for _ in 0..r.u64().with_context(what)? {
            all_acc.push(r.tensor().with_context(what)?);
        }
    }
    Ok((all_losses, all_acc))
}

fn put_u64(out: &mut Vec<u8>, x: u64) {
    out.extend_from_slice(&x.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u64(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// A named tensor: name, element type, shape, little-endian elements.
fn put_tensor(out: &mut Vec<u8>, name: &str, t: &Tensor) {
    put_str(out, name);
    put_tensor_header(out, t);
    out.extend_from_slice(&t.to_le_bytes());
}

/// A tensor's element type and shape.
fn put_tensor_header(out: &mut Vec<u8>, t: &Tensor) {
    put_str(out, t.dtype.name());
    put_u64(out, t.shape.len() as u64);
    for &e in &t.shape {
        put_u64(out, e as u64);
    }
}

/// Reads what the `put_*` functions wrote.
struct Bytes<'a>(&'a [u8]);

impl<'a> Bytes<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            bail!("a message ends early");
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn str(&mut self) -> Result<String> {
        let n = self.u64()? as usize;
        Ok(String::from_utf8(self.take(n)?.to_vec())?)
    }

    /// An element type and a shape.
    fn header(&mut self) -> Result<(cleave_ir::DType, Vec<usize>)> {
        let d = self.str()?;
        let dtype = cleave_ir::DType::from_name(&d)
            .with_context(|| format!("unknown element type `{d}`"))?;
        let rank = self.u64()? as usize;
        let shape = (0..rank)
            .map(|_| self.u64().map(|e| e as usize))
            .collect::<Result<Vec<_>>>()?;
        Ok((dtype, shape))
    }

    fn tensor(&mut self) -> Result<(String, Tensor)> {
        let name = self.str()?;
        let (dtype, shape) = self.header()?;
        let n = shape.iter().product::<usize>() * dtype.size_bytes();
        let t = Tensor::from_le_bytes(dtype, &shape, self.take(n)?)
            .map_err(|e| anyhow::anyhow!("`{name}`: {e}"))?;
        Ok((name, t))
    }
}

/// The next message another process sent this one over `remote`.
fn next_message(remote: &dyn Remote) -> Result<Vec<u8>> {
    remote
        .recv()
        .map_err(anyhow::Error::msg)?
        .context("the transport was ended")
}

/// [`StageTransport`] over a [`Remote`] (MPI): each value is one message (microbatch, name,
/// tensor), sent by a forwarding thread per destination so that a send never waits for a
/// process that is itself sending.
pub struct RemoteTransport<'a> {
    remote: &'a dyn Remote,
    queues: Vec<Option<std::sync::mpsc::Sender<Vec<u8>>>>,
    /// Messages handed to the forwarding threads and not sent yet.
    pending: std::sync::Arc<(std::sync::Mutex<usize>, std::sync::Condvar)>,
}

impl<'a> RemoteTransport<'a> {
    /// Starts a forwarding thread per other device in `scope`.
    pub fn new<'s>(remote: &'a dyn Remote, scope: &'s std::thread::Scope<'s, '_>) -> Self
    where
        'a: 's,
    {
        let pending =
            std::sync::Arc::new((std::sync::Mutex::new(0usize), std::sync::Condvar::new()));
        let me = remote.device();
        let queues = (0..remote.devices())
            .map(|to| {
                (to != me).then(|| {
                    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
                    let pending = pending.clone();
                    scope.spawn(move || {
                        for bytes in rx {
                            if let Err(e) = remote.send(to, bytes) {
                                eprintln!("error: device {me}: sending to device {to}: {e}");
                                remote.abort(1);
                            }
                            let (n, cv) = &*pending;
                            *n.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
                            cv.notify_all();
                        }
                    });
                    tx
                })
            })
            .collect();
        RemoteTransport {
            remote,
            queues,
            pending,
        }
    }
}

impl StageTransport for RemoteTransport<'_> {
    fn device(&self) -> usize {
        self.remote.device()
    }

    fn send(&mut self, device: usize, microbatch: usize, name: &str, t: &Tensor) -> Result<()> {
        let mut out = Vec::new();
        put_u64(&mut out, microbatch as u64);
        put_tensor(&mut out, name, t);
        let q = self
            .queues
            .get(device)
            .and_then(|q| q.as_ref())
            .with_context(|| format!("no device {device} to send `{name}` to"))?;
        *self.pending.0.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        q.send(out)
            .map_err(|_| anyhow::anyhow!("the forwarding thread to device {device} has stopped"))
    }

    fn receive(&mut self) -> Result<(usize, String, Tensor)> {
        let bytes = next_message(self.remote)?;
        let mut r = Bytes(&bytes);
        let j = r.u64()? as usize;
        let (name, t) = r.tensor()?;
        Ok((j, name, t))
    }

    fn wait(&mut self) -> Result<()> {
        let (n, cv) = &*self.pending;
        let mut left = n.lock().unwrap_or_else(|e| e.into_inner());
        while *left > 0 {
            left = cv.wait(left).unwrap_or_else(|e| e.into_inner());
        }
        Ok(())
    }

    fn all_gather(&mut self, bytes: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        self.remote.all_gather(bytes).map_err(anyhow::Error::msg)
    }
}

/// The key of value `name` made by `stage` among a microbatch's values: `stash.*` values are
/// the stage's own (two stages may stash the same value under one name), others are global.
fn value_key(stage: usize, name: &str) -> std::borrow::Cow<'_, str> {
    if name.starts_with("stash.") {
        format!("{stage}/{name}").into()
    } else {
        name.into()
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
    /// A parameter, a data input of microbatch `j`, or a value made for it (a `stash.*` value
    /// only by stage `stage`).
    fn value(&self, stage: usize, j: usize, n: &str) -> Option<&Tensor> {
        self.params
            .get(n)
            .or_else(|| self.micro[j].get(n))
            .or_else(|| self.values[j].get(value_key(stage, n).as_ref()))
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
    // One stage and one microbatch come here for `--precision f16` (its loss scale runs on
    // this pipeline only): the message names what the user asked for.
    let asked = if a.stages == 1 && a.microbatches == 1 && LossScaler::for_args(a)?.is_some() {
        "--precision f16 (which runs on the stage pipeline)"
    } else {
        "--stages/--microbatches"
    };
    for (bad, what) in unsupported {
        if bad {
            bail!(
                "--target {target} {asked}: {what} is not supported on the single-device \
                 pipeline yet; use --target cpu"
            );
        }
    }
    Ok(())
}

/// Makes the [`StageTransport`] of one process from the MPI world it was launched in (the
/// NCCL transport; without one, [`train_stages_on`] moves host tensors over MPI).
pub trait Connect {
    /// The transport of this process.
    fn connect<'r>(&'r self, remote: &'r dyn Remote) -> Result<Box<dyn StageTransport + 'r>>;
}

/// Trains `a` (with `--stages`/`--microbatches`) on a [`StagePipeline`] whose backends `make`
/// builds: the data order, initialisation, optimizer, checkpoints and final evaluation of the
/// CPU pipeline (`cleave train --stages`). `target` names the backend in messages.
///
/// Launched as P processes by `mpirun` (feature `mpi`), each process runs one device's list and
/// builds only its stages; values cross through `connect`'s transport, or host tensors over MPI
/// without one. Rank 0 prints, writes metrics and checkpoints.
pub fn train_stages_on<B: StepBackend>(
    a: &TrainArgs,
    target: &str,
    connect: Option<&dyn Connect>,
    make: impl FnMut(&Function, usize) -> Result<B>,
) -> Result<StageRun> {
    check_supported(a, target)?;
    #[cfg(feature = "mpi")]
    let world = cleave_runtime::mpi_remote::init().map_err(|e| anyhow::anyhow!("MPI: {e}"))?;
    #[cfg(feature = "mpi")]
    let remote: Option<&dyn Remote> = world.as_ref().map(|w| w as &dyn Remote);
    #[cfg(not(feature = "mpi"))]
    let remote: Option<&dyn Remote> = None;
    if let Some(r) = remote {
        if r.devices() != a.stages {
            bail!(
                "{} MPI processes for --stages {}: launch one process per device \
                 (`mpirun -np {} …`)",
                r.devices(),
                a.stages,
                a.stages
            );
        }
    }
    std::thread::scope(|scope| {
        let mut link: Option<Box<dyn StageTransport + '_>> = match (remote, connect) {
            (None, _) => None,
            (Some(r), Some(c)) => Some(c.connect(r)?),
            (Some(r), None) => Some(Box::new(RemoteTransport::new(r, scope))),
        };
        train_loop(a, target, link.as_deref_mut(), make)
    })
}

fn train_loop<B: StepBackend>(
    a: &TrainArgs,
    target: &str,
    mut link: Option<&mut (dyn StageTransport + '_)>,
    make: impl FnMut(&Function, usize) -> Result<B>,
) -> Result<StageRun> {
    let (p, m) = (a.stages, a.microbatches);
    if p == 0 || m == 0 {
        bail!("--stages and --microbatches must be at least 1");
    }
    let rank = link.as_ref().map_or(0, |l| l.device());
    let quiet = a.quiet || rank != 0;
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
    let only = link.as_ref().map(|l| l.device());
    let mut pipe = StagePipeline::new(&plan.module, &plan.schedule, m, only, make)?;
    let PipelineState {
        mut params,
        shapes,
        mut updater,
    } = PipelineState::new(a, lr, &forward, &loaded, &plan.module)?;
    let batch = m * mb;
    let data = step_data(a, &forward, mb)?;
    let mut start = 0;
    // `--precision f16`: the dynamic loss scale, as the CPU pipeline applies it.
    let mut scaler = LossScaler::for_args(a)?;
    if let Some(dir) = &a.resume {
        let mut state = with_shapes(&shapes, &params);
        let (step, meta) = crate::train::restore_checkpoint(
            dir,
            &mut state,
            (batch, crate::pipeline_train::RESUMED_BATCH),
            &a.optimizer,
            "this run",
        )?;
        if let Some(s) = scaler.as_mut() {
            s.restore(&meta, dir)?;
        }
        params.extend(state.into_iter().map(|(name, (_, d))| (name, d)));
        start = step;
    }
    let opts = step_options(a, lr);
    let shown = TrainArgs { quiet, ..a.clone() };
    let mut metrics = Metrics::open(if rank == 0 {
        a.metrics.as_deref()
    } else {
        None
    })?;
    let mut order = Order::new(data.n_train, a.seed);
    let mut summary = TrainSummary {
        process_rank: rank,
        ..TrainSummary::default()
    };
    let mut progress = Progress::new(start);
    let mut losses = Vec::new();
    let t0 = Instant::now();
    for step in start..a.steps {
        let rows = order.rows(step, batch);
        // Flat tensors: each value takes its argument's shape where a stage reads it.
        let mut micro: Vec<BTreeMap<String, Tensor>> =
            microbatches(&data.cols, &rows, mb, &tangents, a.seed, step)
                .into_iter()
                .map(|x| {
                    x.into_iter()
                        .map(|(k, d)| (k, tensor_from_host(&[d.len()], &d)))
                        .collect()
                })
                .collect();
        let scaled;
        let sopts = match &scaler {
            Some(s) => {
                for x in &mut micro {
                    x.insert(
                        cleave_passes::autodiff::LOSS_SCALE_INPUT.into(),
                        tensor_from_host(&[], &s.input()),
                    );
                }
                // The gradient sums carry the scale: the stages' SGD divides it out.
                scaled = s.options(&opts, m);
                &scaled
            }
            None => &opts,
        };
        let mut r = pipe
            .step(&params, &shapes, &micro, sopts, link.as_deref_mut())
            .with_context(|| format!("--target {target}: rank {rank}: step {step}"))?;
        let loss = r.losses.iter().map(|&x| x as f64).sum::<f64>() / m as f64;
        // A step whose gradients were not finite was rolled back; the scale halves.
        let update = update_step(
            (step, loss),
            &mut r,
            &mut params,
            updater.as_mut(),
            a.grad_clip,
            sopts,
            scaler.as_mut(),
            quiet,
        )?;
        losses.push(loss);
        let done = step + 1;
        progress.step_with(
            &shown,
            &mut summary,
            &mut metrics,
            (done, loss),
            update.metrics(),
        )?;
        if let (Some(dir), 0) = (&a.checkpoint, rank) {
            if done.is_multiple_of(a.checkpoint_every.max(1)) || done == a.steps {
                let mut meta = checkpoint_meta(a, done, batch, lr, &method);
                meta.insert("microbatches".into(), m.to_string());
                if let Some(s) = &scaler {
                    s.save(&mut meta);
                }
                write_checkpoint(dir, &with_shapes(&shapes, &params), meta)?;
            }
        }
    }
    if !quiet {
        eprintln!();
        if let Some(s) = &scaler {
            eprintln!(
                "loss scale {} at the end; {} step(s) skipped for non-finite gradients",
                s.scale, s.skipped
            );
        }
    }
    summary.steps_per_s = summary.steps_run as f64 / t0.elapsed().as_secs_f64().max(1e-9);
    // Final evaluation on the held-out tail, on the CPU runtime, as the CPU pipeline does.
    final_eval(a, &forward, &data, mb, &params, &mut summary, &mut metrics)?;
    Ok(StageRun {
        summary,
        losses,
        params,
    })
}

/// The NCCL transport's [`Connect`] (feature `nccl`): this process's GPU.
#[cfg(feature = "nccl")]
pub struct NcclConnect<'d> {
    /// The GPU this process runs (its device of the pipeline).
    pub dev: &'d cleave_runtime::cuda::Device,
}

#[cfg(feature = "nccl")]
impl Connect for NcclConnect<'_> {
    fn connect<'r>(&'r self, remote: &'r dyn Remote) -> Result<Box<dyn StageTransport + 'r>> {
        let me = remote.device();
        let links =
            cleave_runtime::cuda::nccl::PairLinks::connect(self.dev, me, remote.devices(), |b| {
                Ok(remote.all_gather(b)?.into_iter().next().unwrap_or_default())
            })
            .map_err(|e| anyhow::anyhow!("device {me}: {e}"))?;
        Ok(Box::new(NcclTransport {
            remote,
            dev: self.dev,
            links,
            sent: Vec::new(),
        }))
    }
}

/// [`StageTransport`] over NCCL: a value is uploaded to this GPU and sent on its direction's
/// communicator (`cleave_runtime::cuda::nccl`); a header (sender, microbatch, name, element
/// type, shape) follows over MPI, and the receiver posts the matching receive when the header
/// arrives, so both sides of a direction post in the same order. Sent buffers stay alive until
/// [`StageTransport::wait`].
#[cfg(feature = "nccl")]
struct NcclTransport<'r> {
    remote: &'r dyn Remote,
    dev: &'r cleave_runtime::cuda::Device,
    links: cleave_runtime::cuda::nccl::PairLinks,
    sent: Vec<cleave_runtime::cuda::DeviceTensor>,
}

#[cfg(feature = "nccl")]
impl StageTransport for NcclTransport<'_> {
    fn device(&self) -> usize {
        self.remote.device()
    }

    fn send(&mut self, device: usize, microbatch: usize, name: &str, t: &Tensor) -> Result<()> {
        let buf = self.dev.upload(t)?;
        self.links.send(device, &buf)?;
        self.sent.push(buf);
        let mut out = Vec::new();
        put_u64(&mut out, self.device() as u64);
        put_u64(&mut out, microbatch as u64);
        put_str(&mut out, name);
        put_tensor_header(&mut out, t);
        self.remote.send(device, out).map_err(anyhow::Error::msg)
    }

    fn receive(&mut self) -> Result<(usize, String, Tensor)> {
        let bytes = next_message(self.remote)?;
        let mut r = Bytes(&bytes);
        let from = r.u64()? as usize;
        let j = r.u64()? as usize;
        let name = r.str()?;
        let (dtype, shape) = r.header()?;
        let mut buf = self.dev.zeros(dtype, &shape)?;
        self.links
            .recv(from, &mut buf)
            .with_context(|| format!("`{name}` of microbatch {j} from device {from}"))?;
        Ok((j, name, self.dev.download(&buf)?))
    }

    fn wait(&mut self) -> Result<()> {
        self.links.wait_sends()?;
        self.sent.clear();
        Ok(())
    }

    fn all_gather(&mut self, bytes: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        self.remote.all_gather(bytes).map_err(anyhow::Error::msg)
    }
}

/// One stage function compiled by the CPU runtime, as a [`StepBackend`]: what `cleave train
/// --executor list` runs (the executor of `--target cuda --stages`, checked on the CPU).
pub struct CpuPlanBackend {
    plan: cleave_runtime::Plan,
    shapes: BTreeMap<String, Vec<usize>>,
}

impl CpuPlanBackend {
    /// Compiles `f` with `codegen`.
    pub fn new(f: &Function, codegen: cleave_runtime::Codegen) -> Result<CpuPlanBackend> {
        let plan = cleave_runtime::compile_with(
            f,
            &cleave_runtime::CompileOptions {
                fuse: true,
                // The executor sets parameters once per step: the plan must not reuse their
                // buffers.
                preserve_args: true,
                jit: true,
                codegen,
            },
        )?;
        let shapes = f
            .outputs
            .iter()
            .map(|o| (o.name.clone(), f.ty(o.value).shape.clone()))
            .collect();
        Ok(CpuPlanBackend { plan, shapes })
    }
}

impl StepBackend for CpuPlanBackend {
    fn set(&mut self, name: &str, t: &Tensor) -> Result<()> {
        let d = host_from_tensor(t).context("f32, i32 or bool")?;
        Ok(self.plan.set_input_named(name, d.as_slice())?)
    }
    fn run(&mut self) -> Result<()> {
        Ok(self.plan.run()?)
    }
    fn output(&mut self, name: &str) -> Result<Tensor> {
        let i = self
            .plan
            .output_index(name)
            .with_context(|| format!("no output `{name}`"))?;
        Ok(tensor_from_host(&self.shapes[name], &self.plan.output(i)))
    }
    fn carry(&mut self) -> Result<()> {
        bail!("the stage pipeline does not carry outputs into arguments")
    }
    fn arg(&mut self, name: &str) -> Result<Tensor> {
        bail!("the stage pipeline does not read back argument `{name}`")
    }
}
