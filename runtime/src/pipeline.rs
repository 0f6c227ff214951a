//! A stage-partitioned pipeline executor: one worker thread per device runs its action list.
//!
//! The input is the output of `split-bw` compiled per stage (a [`StagePlans`] of F, B and W plans
//! for every stage), the placement of stages on devices, and one action list per device (plain
//! data: [`PipelineAction`]; the schedule library lives in `cleave-passes`, which this crate does
//! not depend on).
//!
//! # Semantics of one [`Pipeline::step`]
//!
//! - **F(s, j)** runs stage `s`'s F plan on microbatch `j`. Every argument is resolved by name:
//!   a parameter (the stage's own copy), a data input of microbatch `j`, or a value the stage
//!   received or produced for microbatch `j` (`act.*`, `stash.*`, `dgrad.*`, `wgrad.*`), waiting
//!   for it on the device's channel if it has not arrived yet.
//! - Every output is routed by name: to each *other* stage whose F, B or W takes an argument of
//!   that name (through the consumer device's bounded channel, tagged with the consumer stage,
//!   the microbatch and the name; a consumer on the same device gets it directly), and kept by
//!   the producing stage if one of its own functions reads it. `stash.*` values never leave
//!   their stage. `loss` is recorded.
//! - **B(s, j)** runs B the same way (its `dgrad.*` come from the next stage, its outputs go on).
//! - **W(s, j)** runs W with the stage's gradient accumulators: every W argument named `grad.*`
//!   is an accumulator, zero at the start of the step, replaced by the W output of the same
//!   name. After W the microbatch's values held by the stage are freed. **BW** = B then W.
//! - After the stage's last W the device applies the optimizer to the parameters whose
//!   accumulators the stage owns: plain SGD, `p ← p − lr · (scale · g)` in `f32` (`scale` is
//!   [`PipelineOptions::grad_scale`], `1/M` for a per-microbatch mean loss). The updated
//!   parameters come back in [`StepResult::params`]; parameters read by several stages (tied
//!   weights) are updated by the stage that owns the gradient, and the caller hands the new value
//!   to every stage in the next step.
//!
//! # Saved values, offload and accounting
//!
//! `stash.*` values a stage keeps for its own B and W are counted: each is read exactly as often
//! as the stage's B and W take it (planned uses) and freed after its last use; a value left at the
//! end of its microbatch's W with uses left, or read more often, is an error naming it. `stash.offload.*` values (made by the `remat` pass) go to a
//! separate host pool: a background thread per device copies them there after F and back before
//! the B or W that reads them (the device's next action's reloads are requested when the current
//! action starts, so copies overlap compute). [`StepResult::peak_saved_bytes`] is, per device,
//! the largest number of bytes of saved values held in device memory at once (kept `stash.*`
//! values plus reloaded copies waiting for their function), measured by this accounting;
//! [`StepResult::offloaded_bytes`] counts the bytes copied to the host pool.
//!
//! # Failures
//!
//! A worker that fails (a run error, a missing value, an injected failure) records a
//! [`PipelineError`] naming the stage, the action and the cause, and raises a shared abort flag;
//! every other worker polls the flag while it waits to receive or to send (channels are polled
//! with timeouts), so the whole step ends with the first error and never hangs. A value that
//! does not arrive within [`PipelineOptions::timeout`] is an error too. A panicking worker is
//! reported as a failure of its device.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::remote::{put_data, put_str, put_u64, Reader};
use crate::{HostData, HostSlice, Plan};

/// What an action runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PipelineKind {
    /// Forward.
    F,
    /// Input gradient.
    B,
    /// Weight gradient.
    W,
    /// B then W.
    BW,
}

/// One action of a device's list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PipelineAction {
    /// The stage.
    pub stage: usize,
    /// F, B, W or BW.
    pub kind: PipelineKind,
    /// The microbatch.
    pub microbatch: usize,
}

impl fmt::Display for PipelineAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let k = match self.kind {
            PipelineKind::F => "F",
            PipelineKind::B => "B",
            PipelineKind::W => "W",
            PipelineKind::BW => "BW",
        };
        write!(f, "{}{k}{}", self.stage, self.microbatch)
    }
}

/// The compiled F, B and W functions of one stage.
pub struct StagePlans {
    /// Forward.
    pub f: Plan,
    /// Input gradient.
    pub b: Plan,
    /// Weight gradient (with `grad.*` accumulators in and out).
    pub w: Plan,
}

/// The action a device of this process started last (device, action): what a process that is
/// ended from outside (an MPI launcher's SIGTERM after another rank died) reports.
static CURRENT_ACTION: std::sync::Mutex<Option<(usize, PipelineAction)>> =
    std::sync::Mutex::new(None);

/// The action a device of this process started last (see [`PipelineOptions::kill_at`] and
/// `cleave-runner`'s handling of a rank ended by its launcher).
pub fn current_action() -> Option<(usize, PipelineAction)> {
    *CURRENT_ACTION.lock().unwrap_or_else(|e| e.into_inner())
}

/// Options of one step.
#[derive(Clone, Debug)]
pub struct PipelineOptions {
    /// SGD learning rate.
    pub lr: f32,
    /// Gradients are multiplied by this before the update (`1/M` for a mean over microbatches).
    pub grad_scale: f32,
    /// The longest a worker waits for one value (or for room in a channel).
    pub timeout: Duration,
    /// Fail with an injected error when this action starts (for tests).
    pub fail_at: Option<PipelineAction>,
    /// End this process with SIGKILL when this action starts (for fault tests of processes).
    pub kill_at: Option<PipelineAction>,
    /// Apply SGD in each stage after its last W (the default). Without it the step only
    /// accumulates: [`StepResult::grads`] holds the sums and [`StepResult::params`] is empty, for
    /// a caller that runs another optimizer.
    pub update: bool,
    /// Capacity of each device's bounded input channel (messages).
    pub channel_capacity: usize,
    /// Measure each device's tensor memory with the instrumented allocator ([`crate::alloc`];
    /// the process must have installed it): fills [`StepResult::measured_peak_bytes`].
    pub measure_memory: bool,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        PipelineOptions {
            lr: 0.1,
            grad_scale: 1.0,
            timeout: Duration::from_secs(120),
            fail_at: None,
            kill_at: None,
            update: true,
            channel_capacity: 64,
            measure_memory: false,
        }
    }
}

/// The measured start and end of one action, in seconds since the step began.
#[derive(Clone, Debug)]
pub struct ActionTiming {
    /// The device.
    pub device: usize,
    /// The action.
    pub action: PipelineAction,
    /// Start: when the action began with every input at hand (time spent waiting for a value
    /// from another device is idle time, not part of the action).
    pub start_s: f64,
    /// End.
    pub end_s: f64,
}

/// What one step produced.
#[derive(Clone, Debug, Default)]
pub struct StepResult {
    /// The `loss` output of each microbatch, in microbatch order.
    pub losses: Vec<f32>,
    /// Parameters after the update (those that have a gradient).
    pub params: BTreeMap<String, HostData>,
    /// The accumulated gradients (sum over microbatches, before `grad_scale`), by parameter.
    pub grads: BTreeMap<String, HostData>,
    /// Every action's measured start and end.
    pub timeline: Vec<ActionTiming>,
    /// Per device, the most bytes of saved values held in device memory at once (see the module
    /// docs).
    pub peak_saved_bytes: Vec<u64>,
    /// Per device, the bytes copied to the host pool.
    pub offloaded_bytes: Vec<u64>,
    /// Per device, the allocator-measured peak of the tensor memory the device held during the
    /// step (empty unless [`PipelineOptions::measure_memory`] and the allocator is installed).
    pub measured_peak_bytes: Vec<u64>,
    /// Per device, the allocator-measured peak of its host pool (same condition).
    pub measured_host_peak_bytes: Vec<u64>,
    /// Every offload and reload copy the host pools' threads made.
    pub transfers: Vec<TransferTiming>,
}

/// One copy between a device and its host pool, timed on the pool's background thread.
#[derive(Clone, Debug)]
pub struct TransferTiming {
    /// The device.
    pub device: usize,
    /// True for an offload (device to host), false for a reload.
    pub offload: bool,
    /// The value's stage, microbatch and name.
    pub stage: usize,
    /// The microbatch.
    pub microbatch: usize,
    /// Bytes copied.
    pub bytes: u64,
    /// Start, in seconds since the step began.
    pub start_s: f64,
    /// End.
    pub end_s: f64,
}

/// A failed step: the stage, the action and the cause.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PipelineError {
    /// The device.
    pub device: usize,
    /// The stage (None for failures outside an action).
    pub stage: Option<usize>,
    /// The action as printed (`1B3`).
    pub action: Option<String>,
    /// The cause.
    pub message: String,
}

impl fmt::Display for PipelineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.stage, &self.action) {
            (Some(s), Some(a)) => write!(
                f,
                "stage {s} failed in action {a} (device {}): {}",
                self.device, self.message
            ),
            _ => write!(f, "device {} failed: {}", self.device, self.message),
        }
    }
}

impl std::error::Error for PipelineError {}

/// A value travelling between devices.
struct Msg {
    stage: usize,
    microbatch: usize,
    name: String,
    data: HostData,
}

/// The executor: compiled stages, their placement and the per-device action lists.
pub struct Pipeline {
    stages: Vec<StagePlans>,
    placement: Vec<usize>,
    devices: Vec<Vec<PipelineAction>>,
    microbatches: usize,
    /// For each name some function takes as an argument: the stages that take it.
    consumers: HashMap<String, BTreeSet<usize>>,
    /// A bidirectional schedule's second direction ([`Pipeline::with_replicas`]).
    reverse: Option<Replicas>,
}

/// The replicated stages of a bidirectional schedule (BitPipe): microbatch `j` with
/// `microbatches[j]` runs stage `s` on `placement[s]`, with the plans `plans[s]` (a second
/// compilation of the stage, holding a copy of its weights) where that device differs from the
/// stage's own.
struct Replicas {
    placement: Vec<usize>,
    microbatches: Vec<bool>,
    plans: BTreeMap<usize, StagePlans>,
}

impl Pipeline {
    /// Checks that every microbatch of every stage has one F and one B and W (or one BW), on the
    /// stage's device.
    pub fn new(
        stages: Vec<StagePlans>,
        placement: Vec<usize>,
        devices: Vec<Vec<PipelineAction>>,
        microbatches: usize,
    ) -> Result<Pipeline, String> {
        Pipeline::build(stages, placement, devices, microbatches, None)
    }

    /// [`Pipeline::new`] for a bidirectional schedule: microbatch `j` with
    /// `reverse_microbatches[j]` runs stage `s` on device `reverse_placement[s]`; every stage
    /// whose two devices differ is replicated, and `replicas` holds its second compilation.
    /// Each replica accumulates the weight gradients of its own microbatches; after both have
    /// run their last W the two sums are added (the stage's own first) and the update applied
    /// once, so both copies hold the same new weights. The sum's order differs from one
    /// device's, so gradients agree with a one-direction run to rounding, not bit for bit.
    pub fn with_replicas(
        stages: Vec<StagePlans>,
        placement: Vec<usize>,
        reverse_placement: Vec<usize>,
        reverse_microbatches: Vec<bool>,
        mut replicas: BTreeMap<usize, StagePlans>,
        devices: Vec<Vec<PipelineAction>>,
        microbatches: usize,
    ) -> Result<Pipeline, String> {
        if reverse_placement.len() != stages.len() || reverse_microbatches.len() != microbatches {
            return Err(format!(
                "the reverse direction places {} stages and marks {} microbatches; the \
                 pipeline has {} stages and {microbatches} microbatches",
                reverse_placement.len(),
                reverse_microbatches.len(),
                stages.len()
            ));
        }
        for (s, &there) in reverse_placement.iter().enumerate() {
            let replicated = there != placement.get(s).copied().unwrap_or(there);
            if replicated != replicas.contains_key(&s) {
                return Err(format!(
                    "stage {s}: {}",
                    if replicated {
                        "replicated on two devices, but no replica plans were given"
                    } else {
                        "replica plans given for a stage that is not replicated"
                    }
                ));
            }
        }
        replicas.retain(|&s, _| s < stages.len());
        Pipeline::build(
            stages,
            placement,
            devices,
            microbatches,
            Some(Replicas {
                placement: reverse_placement,
                microbatches: reverse_microbatches,
                plans: replicas,
            }),
        )
    }

    fn build(
        stages: Vec<StagePlans>,
        placement: Vec<usize>,
        devices: Vec<Vec<PipelineAction>>,
        microbatches: usize,
        reverse: Option<Replicas>,
    ) -> Result<Pipeline, String> {
        if placement.len() != stages.len() {
            return Err(format!(
                "{} stages but a placement for {}",
                stages.len(),
                placement.len()
            ));
        }
        let device_of = |stage: usize, j: usize| match &reverse {
            Some(r) if r.microbatches[j] => r.placement[stage],
            _ => placement[stage],
        };
        let mut seen: HashMap<(usize, usize), [usize; 3]> = HashMap::new();
        for (d, list) in devices.iter().enumerate() {
            for a in list {
                if a.stage >= stages.len() || a.microbatch >= microbatches {
                    return Err(format!(
                        "action {a} on device {d}: no such stage or microbatch"
                    ));
                }
                let home = device_of(a.stage, a.microbatch);
                if home != d {
                    return Err(format!(
                        "action {a} is on device {d}, but stage {} is placed on device {home}{}",
                        a.stage,
                        if reverse.is_some() {
                            format!(" for microbatch {}", a.microbatch)
                        } else {
                            String::new()
                        }
                    ));
                }
                let c = seen.entry((a.stage, a.microbatch)).or_default();
                match a.kind {
                    PipelineKind::F => c[0] += 1,
                    PipelineKind::B => c[1] += 1,
                    PipelineKind::W => c[2] += 1,
                    PipelineKind::BW => {
                        c[1] += 1;
                        c[2] += 1
                    }
                }
            }
        }
        for s in 0..stages.len() {
            for j in 0..microbatches {
                if seen.get(&(s, j)) != Some(&[1, 1, 1]) {
                    return Err(format!(
                        "stage {s}, microbatch {j}: the schedule must run F, B and W (or BW) \
                         exactly once each"
                    ));
                }
            }
        }
        let mut consumers: HashMap<String, BTreeSet<usize>> = HashMap::new();
        for (s, st) in stages.iter().enumerate() {
            for p in [&st.f, &st.b, &st.w] {
                for a in p.args() {
                    consumers.entry(a.name.clone()).or_default().insert(s);
                }
            }
        }
        Ok(Pipeline {
            stages,
            placement,
            devices,
            microbatches,
            consumers,
            reverse,
        })
    }

    /// Number of devices.
    pub fn num_devices(&self) -> usize {
        self.devices.len()
    }

    /// Runs one training step over `microbatches` (data inputs by name, one map per microbatch,
    /// borrowed: each is copied once, into the plan of the F that reads it)
    /// with the parameters `params` (by name; each stage takes those its functions read).
    pub fn step(
        &mut self,
        params: &BTreeMap<String, HostData>,
        microbatches: &[BTreeMap<String, HostSlice<'_>>],
        opts: &PipelineOptions,
    ) -> Result<StepResult, PipelineError> {
        self.step_with(params, microbatches, opts, None)
    }

    /// [`Pipeline::step`] with the devices in separate processes ([`crate::remote`]): this
    /// process runs `remote.device()` only; values for the others leave through `remote`, and
    /// the step's losses, parameters and gradients are exchanged at its end, so every process
    /// returns the whole result (timelines and memory figures are this device's alone).
    pub fn step_remote(
        &mut self,
        params: &BTreeMap<String, HostData>,
        microbatches: &[BTreeMap<String, HostSlice<'_>>],
        opts: &PipelineOptions,
        remote: &dyn crate::remote::Remote,
    ) -> Result<StepResult, PipelineError> {
        if remote.devices() != self.devices.len() {
            return Err(PipelineError {
                device: remote.device(),
                stage: None,
                action: None,
                message: format!(
                    "{} processes, but the schedule has {} devices (run one process per device)",
                    remote.devices(),
                    self.devices.len()
                ),
            });
        }
        self.step_with(params, microbatches, opts, Some(remote))
    }

    fn step_with(
        &mut self,
        params: &BTreeMap<String, HostData>,
        microbatches: &[BTreeMap<String, HostSlice<'_>>],
        opts: &PipelineOptions,
        remote: Option<&dyn crate::remote::Remote>,
    ) -> Result<StepResult, PipelineError> {
        if microbatches.len() != self.microbatches {
            return Err(PipelineError {
                device: 0,
                stage: None,
                action: None,
                message: format!(
                    "{} microbatches given, the schedule has {}",
                    microbatches.len(),
                    self.microbatches
                ),
            });
        }
        let n_dev = self.devices.len();
        // Declared first so that it is released last, after every tagged buffer of the step is
        // freed or handed back untagged.
        let tags = if opts.measure_memory {
            crate::alloc::TagBlock::reserve(2 * n_dev)
        } else {
            None
        };
        let tag_of = |i: usize| tags.as_ref().map_or(0, |t| t.tag(i));
        let mut senders = Vec::new();
        let mut receivers = Vec::new();
        for _ in 0..n_dev {
            let (tx, rx) = sync_channel::<Msg>(opts.channel_capacity.max(1));
            senders.push(tx);
            receivers.push(Some(rx));
        }
        let abort = AtomicBool::new(false);
        let first_error: Mutex<Option<PipelineError>> = Mutex::new(None);
        // With one process per device, the step's clocks start together (timelines merge).
        if let Some(r) = remote {
            r.barrier();
        }
        let t0 = Instant::now();
        // Hand each device mutable access to its stages.
        let mut per_dev: Vec<Vec<(usize, &mut StagePlans)>> = (0..n_dev).map(|_| vec![]).collect();
        for (s, st) in self.stages.iter_mut().enumerate() {
            per_dev[self.placement[s]].push((s, st));
        }
        let replicated: BTreeSet<usize> = self
            .reverse
            .as_ref()
            .map(|r| r.plans.keys().copied().collect())
            .unwrap_or_default();
        let (reverse_placement, reverse_mbs) = match &mut self.reverse {
            Some(r) => {
                for (&s, st) in r.plans.iter_mut() {
                    per_dev[r.placement[s]].push((s, st));
                }
                (Some(&r.placement[..]), Some(&r.microbatches[..]))
            }
            None => (None, None),
        };
        let shared = Shared {
            placement: &self.placement,
            reverse_placement,
            reverse_microbatches: reverse_mbs,
            replicated: &replicated,
            consumers: &self.consumers,
            params,
            data: microbatches,
            opts,
            abort: &abort,
            t0,
        };
        let local: Vec<usize> = match remote {
            Some(r) => vec![r.device()],
            None => (0..n_dev).collect(),
        };
        let outcomes: Vec<Result<DeviceOut, ()>> = std::thread::scope(|scope| {
            let mut handles = Vec::new();
            for (d, stages) in per_dev.into_iter().enumerate() {
                if !local.contains(&d) {
                    continue;
                }
                let mut worker = Worker {
                    device: d,
                    rx: receivers[d].take().expect("one receiver per device"),
                    tx: senders.clone(),
                    store: HashMap::new(),
                    shared: &shared,
                    ready_at: 0.0,
                    uses: HashMap::new(),
                    pool: HostPool::start(d, tag_of(d), tag_of(n_dev + d), t0),
                    tag: tag_of(d),
                    submitted: 0,
                    submitted_before: [0, 0],
                };
                let actions = &self.devices[d];
                let first_error = &first_error;
                let abort = &abort;
                handles.push(scope.spawn(move || {
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        worker.run(stages, actions)
                    }));
                    let r = match r {
                        Ok(r) => r,
                        Err(p) => {
                            let msg = p
                                .downcast_ref::<String>()
                                .cloned()
                                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                                .unwrap_or_else(|| "panic".into());
                            Err(Some(PipelineError {
                                device: d,
                                stage: None,
                                action: None,
                                message: format!("worker panicked: {msg}"),
                            }))
                        }
                    };
                    // The worker (and so its receiver) lives until the error is recorded and the
                    // abort flag is up: a peer that then finds the channel closed sees the flag
                    // and stands down, so the first error reported is the cause, not an echo.
                    let r = match r {
                        Ok(out) => Ok(out),
                        Err(e) => {
                            if let Some(e) = e {
                                let mut slot =
                                    first_error.lock().unwrap_or_else(|p| p.into_inner());
                                if slot.is_none() {
                                    *slot = Some(e);
                                }
                            }
                            abort.store(true, Ordering::SeqCst);
                            Err(())
                        }
                    };
                    drop(worker);
                    r
                }));
            }
            let mut bridges = Vec::new();
            if let Some(r) = remote {
                let me = r.device();
                let abort = &abort;
                // Values for the other processes: one forwarding thread per destination, in the
                // order the worker sends them.
                for (d, rx) in receivers.iter_mut().enumerate() {
                    let Some(rx) = rx.take().filter(|_| d != me) else {
                        continue;
                    };
                    bridges.push(scope.spawn(move || {
                        while let Ok(msg) = rx.recv() {
                            if let Err(e) = r.send(d, encode(&msg)) {
                                abort.store(true, Ordering::SeqCst);
                                return Err(format!("sending to device {d}: {e}"));
                            }
                        }
                        Ok(())
                    }));
                }
                // Values from them, into the worker's own channel, until the end marker.
                let tx = senders[me].clone();
                bridges.push(scope.spawn(move || loop {
                    match r.recv() {
                        Ok(Some(bytes)) => {
                            let msg = decode(&bytes)?;
                            if tx.send(msg).is_err() {
                                // The worker has ended (or failed): drain until the marker.
                                continue;
                            }
                        }
                        Ok(None) => return Ok(()),
                        Err(e) => {
                            abort.store(true, Ordering::SeqCst);
                            return Err(format!("receiving: {e}"));
                        }
                    }
                }));
            }
            drop(senders);
            let outcomes: Vec<Result<DeviceOut, ()>> = handles
                .into_iter()
                .map(|h| h.join().unwrap_or(Err(())))
                .collect();
            if let Some(r) = remote {
                let _ = r.end();
            }
            for b in bridges {
                if let Ok(Err(e)) = b.join() {
                    let mut slot = first_error.lock().unwrap_or_else(|p| p.into_inner());
                    if slot.is_none() {
                        *slot = Some(PipelineError {
                            device: local[0],
                            stage: None,
                            action: None,
                            message: e,
                        });
                    }
                }
            }
            outcomes
        });
        // The plans' buffers go back to being uncounted (they were charged to their device
        // for the step).
        if tags.is_some() {
            for st in &self.stages {
                for p in [&st.f, &st.b, &st.w] {
                    p.retag_buffers(0);
                }
            }
        }
        if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
        let mut result = StepResult::default();
        let mut losses: BTreeMap<usize, f32> = BTreeMap::new();
        let mut partial: BTreeMap<(String, bool), HostData> = BTreeMap::new();
        for (&d, o) in local.iter().zip(outcomes) {
            let Ok(o) = o else {
                return Err(PipelineError {
                    device: d,
                    stage: None,
                    action: None,
                    message: "aborted without a recorded cause".into(),
                });
            };
            losses.extend(o.losses);
            result.peak_saved_bytes.push(o.peak_saved_bytes);
            result.offloaded_bytes.push(o.offloaded_bytes);
            if tags.is_some() {
                result
                    .measured_peak_bytes
                    .push(crate::alloc::peak(tag_of(d)));
                result
                    .measured_host_peak_bytes
                    .push(crate::alloc::peak(tag_of(n_dev + d)));
            }
            for v in o
                .params
                .values()
                .chain(o.grads.values())
                .chain(o.partial_grads.values())
            {
                v.retag(0);
            }
            partial.extend(o.partial_grads);
            result.transfers.extend(o.transfers);
            result.params.extend(o.params);
            result.grads.extend(o.grads);
            result.timeline.extend(o.timeline);
        }
        // Every process's losses, parameters and gradients, for all of them.
        if let Some(r) = remote {
            let me = r.device();
            let fail = |message: String| PipelineError {
                device: me,
                stage: None,
                action: None,
                message,
            };
            let mut out = Vec::new();
            put_u64(&mut out, losses.len() as u64);
            for (&j, &l) in &losses {
                put_u64(&mut out, j as u64);
                put_u64(&mut out, u64::from(l.to_bits()));
            }
            for map in [&result.params, &result.grads] {
                put_u64(&mut out, map.len() as u64);
                for (k, v) in map {
                    put_str(&mut out, k);
                    put_data(&mut out, v);
                }
            }
            put_u64(&mut out, partial.len() as u64);
            for ((k, rev), v) in &partial {
                put_str(&mut out, k);
                put_u64(&mut out, u64::from(*rev));
                put_data(&mut out, v);
            }
            put_u64(&mut out, result.timeline.len() as u64);
            for t in &result.timeline {
                put_u64(&mut out, t.action.stage as u64);
                put_u64(&mut out, t.action.kind as u64);
                put_u64(&mut out, t.action.microbatch as u64);
                put_u64(&mut out, t.start_s.to_bits());
                put_u64(&mut out, t.end_s.to_bits());
            }
            let all = r
                .all_gather(out)
                .map_err(|e| fail(format!("exchanging results: {e}")))?;
            for (d, bytes) in all.iter().enumerate() {
                if d == me {
                    continue;
                }
                let bad = |e: String| fail(format!("results of device {d}: {e}"));
                let mut rd = Reader::new(bytes);
                for _ in 0..rd.u64().map_err(bad)? {
                    let j = rd.u64().map_err(bad)? as usize;
                    let l = f32::from_bits(rd.u64().map_err(bad)? as u32);
                    losses.insert(j, l);
                }
                for map in [&mut result.params, &mut result.grads] {
                    for _ in 0..rd.u64().map_err(bad)? {
                        let k = rd.str().map_err(bad)?;
                        map.insert(k, rd.data().map_err(bad)?);
                    }
                }
                for _ in 0..rd.u64().map_err(bad)? {
                    let k = rd.str().map_err(bad)?;
                    let rev = rd.u64().map_err(bad)? != 0;
                    partial.insert((k, rev), rd.data().map_err(bad)?);
                }
                for _ in 0..rd.u64().map_err(bad)? {
                    let stage = rd.u64().map_err(bad)? as usize;
                    let kind = match rd.u64().map_err(bad)? {
                        0 => PipelineKind::F,
                        1 => PipelineKind::B,
                        2 => PipelineKind::W,
                        3 => PipelineKind::BW,
                        k => return Err(bad(format!("unknown action kind {k}"))),
                    };
                    let microbatch = rd.u64().map_err(bad)? as usize;
                    result.timeline.push(ActionTiming {
                        device: d,
                        action: PipelineAction {
                            stage,
                            kind,
                            microbatch,
                        },
                        start_s: f64::from_bits(rd.u64().map_err(bad)?),
                        end_s: f64::from_bits(rd.u64().map_err(bad)?),
                    });
                }
            }
        }
        // Replicated stages: the two directions' sums added (the stage's own first), then one
        // SGD update.
        let names: BTreeSet<String> = partial.keys().map(|(p, _)| p.clone()).collect();
        for p in names {
            let sum = match (
                partial.remove(&(p.clone(), false)),
                partial.remove(&(p.clone(), true)),
            ) {
                (Some(HostData::F32(a)), Some(HostData::F32(b))) if a.len() == b.len() => {
                    HostData::F32(a.iter().zip(&b).map(|(x, y)| x + y).collect())
                }
                (Some(one), None) | (None, Some(one)) => one,
                _ => {
                    return Err(PipelineError {
                        device: 0,
                        stage: None,
                        action: None,
                        message: format!(
                            "the replicas' gradients of `{p}` do not match (types or sizes)"
                        ),
                    })
                }
            };
            if let (true, Some(HostData::F32(pv)), HostData::F32(gv)) =
                (opts.update, params.get(&p), &sum)
            {
                let new = sgd(pv, gv, opts);
                result.params.insert(p.clone(), HostData::F32(new));
            }
            result.grads.insert(p, sum);
        }
        result.losses = losses.into_values().collect();
        Ok(result)
    }
}

struct Shared<'a> {
    placement: &'a [usize],
    /// A bidirectional schedule's replica placement and the microbatches that run through it.
    reverse_placement: Option<&'a [usize]>,
    reverse_microbatches: Option<&'a [bool]>,
    /// Stages with a replica: their devices hand back gradient sums instead of updating.
    replicated: &'a BTreeSet<usize>,
    consumers: &'a HashMap<String, BTreeSet<usize>>,
    params: &'a BTreeMap<String, HostData>,
    data: &'a [BTreeMap<String, HostSlice<'a>>],
    opts: &'a PipelineOptions,
    abort: &'a AtomicBool,
    t0: Instant,
}

impl Shared<'_> {
    /// The device that runs stage `stage` for microbatch `j`.
    fn device_of(&self, stage: usize, j: usize) -> usize {
        match (self.reverse_placement, self.reverse_microbatches) {
            (Some(p), Some(r)) if r[j] => p[stage],
            _ => self.placement[stage],
        }
    }
}

#[derive(Default)]
struct DeviceOut {
    /// Gradient sums of replicated stages' parameters, by (parameter, whether this is the
    /// replica of the reverse direction).
    partial_grads: BTreeMap<(String, bool), HostData>,
    losses: BTreeMap<usize, f32>,
    params: BTreeMap<String, HostData>,
    grads: BTreeMap<String, HostData>,
    timeline: Vec<ActionTiming>,
    peak_saved_bytes: u64,
    offloaded_bytes: u64,
    transfers: Vec<TransferTiming>,
}

/// Per-stage state on its device.
struct StageState<'p> {
    plans: &'p mut StagePlans,
    /// The stage's parameter copies.
    params: BTreeMap<String, HostData>,
    /// Gradient accumulators by argument name (`grad.<p>`).
    acc: BTreeMap<String, HostData>,
    w_done: usize,
    /// W actions the stage runs on this device (all microbatches, or one direction's).
    w_total: usize,
}

struct Worker<'a> {
    device: usize,
    rx: Receiver<Msg>,
    tx: Vec<SyncSender<Msg>>,
    /// Values held for (stage, microbatch, name).
    store: HashMap<(usize, usize, String), HostData>,
    shared: &'a Shared<'a>,
    /// When the last wait for a value from another device ended (seconds since the step began):
    /// an action's measured start is after its inputs arrived, so waiting counts as idle time.
    ready_at: f64,
    /// Planned uses left of each saved value (kept or offloaded) of (stage, microbatch, name).
    uses: HashMap<Key, usize>,
    /// The host pool and its copy thread.
    pool: HostPool,
    /// The allocator tag of the device's tensors (0: not measuring).
    tag: u32,
    /// Offload copies requested so far, and the count at the end of each of the last two
    /// actions (an action waits for the offloads of the actions before its predecessor).
    submitted: u64,
    submitted_before: [u64; 2],
}

type Key = (usize, usize, String);

fn data_bytes(d: &HostData) -> u64 {
    (d.len() * d.dtype().size_bytes()) as u64
}

fn is_offloaded(name: &str) -> bool {
    name.starts_with("stash.offload.")
}

enum Job {
    Offload(Key, HostData, usize),
    Reload(Key),
}

#[derive(Default)]
struct PoolState {
    /// Host copies with their reloads left.
    host: HashMap<Key, (HostData, usize)>,
    /// Reloaded device copies waiting for their function.
    staged: HashMap<Key, HostData>,
    /// Reloads requested and not yet taken.
    requested: BTreeSet<Key>,
}

/// The host pool of one device and its background copy thread (see the module docs).
struct HostPool {
    jobs: Option<Sender<Job>>,
    state: Arc<(Mutex<PoolState>, Condvar)>,
    /// Device bytes of kept saved values (the worker's) and of staged reloads (the thread's).
    kept_bytes: Arc<AtomicU64>,
    staged_bytes: Arc<AtomicU64>,
    peak: Arc<AtomicU64>,
    offloaded: Arc<AtomicU64>,
    /// Offload jobs the thread has finished.
    offloads_done: Arc<AtomicU64>,
    transfers: Arc<Mutex<Vec<TransferTiming>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HostPool {
    /// `tag`, `host_tag`: the allocator tags of the device's tensors and of its host pool (0:
    /// not measuring); `t0`: when the step began.
    fn start(device: usize, tag: u32, host_tag: u32, t0: Instant) -> HostPool {
        let (tx, rx) = channel::<Job>();
        let state: Arc<(Mutex<PoolState>, Condvar)> = Arc::default();
        let kept_bytes = Arc::new(AtomicU64::new(0));
        let staged_bytes = Arc::new(AtomicU64::new(0));
        let peak = Arc::new(AtomicU64::new(0));
        let offloaded = Arc::new(AtomicU64::new(0));
        let offloads_done = Arc::new(AtomicU64::new(0));
        let transfers: Arc<Mutex<Vec<TransferTiming>>> = Arc::default();
        let (st, sb, kb, pk, off, done, log) = (
            state.clone(),
            staged_bytes.clone(),
            kept_bytes.clone(),
            peak.clone(),
            offloaded.clone(),
            offloads_done.clone(),
            transfers.clone(),
        );
        let thread = std::thread::spawn(move || {
            let record = |offload: bool, key: &Key, bytes: u64, start: f64| {
                let t = TransferTiming {
                    device,
                    offload,
                    stage: key.0,
                    microbatch: key.1,
                    bytes,
                    start_s: start,
                    end_s: t0.elapsed().as_secs_f64(),
                };
                log.lock().unwrap_or_else(|p| p.into_inner()).push(t);
            };
            let (lock, cv) = &*st;
            // Reloads requested (prefetched) before their value was offloaded.
            let mut early: Vec<Key> = Vec::new();
            for job in rx {
                let keys = match job {
                    Job::Offload(key, data, uses) => {
                        // The copy to host memory (a fresh buffer, charged to the host pool); the
                        // device copy is dropped.
                        let start = t0.elapsed().as_secs_f64();
                        let host = {
                            let _g = crate::alloc::TagGuard::new(host_tag);
                            data.clone()
                        };
                        drop(data);
                        off.fetch_add(data_bytes(&host), Ordering::SeqCst);
                        record(true, &key, data_bytes(&host), start);
                        let mut g = lock.lock().unwrap_or_else(|p| p.into_inner());
                        let mut due = Vec::new();
                        early.retain(|k| {
                            if *k == key {
                                due.push(k.clone());
                                false
                            } else {
                                true
                            }
                        });
                        g.host.insert(key, (host, uses));
                        done.fetch_add(1, Ordering::SeqCst);
                        cv.notify_all();
                        due
                    }
                    Job::Reload(key) => vec![key],
                };
                for key in keys {
                    {
                        let mut g = lock.lock().unwrap_or_else(|p| p.into_inner());
                        let Some((data, left)) = g.host.get_mut(&key) else {
                            early.push(key);
                            continue;
                        };
                        let start = t0.elapsed().as_secs_f64();
                        let copy = {
                            let _g = crate::alloc::TagGuard::new(tag);
                            data.clone()
                        };
                        record(false, &key, data_bytes(&copy), start);
                        *left -= 1;
                        if *left == 0 {
                            g.host.remove(&key);
                        }
                        let b = data_bytes(&copy);
                        let now = sb.fetch_add(b, Ordering::SeqCst) + b;
                        pk.fetch_max(now + kb.load(Ordering::SeqCst), Ordering::SeqCst);
                        g.staged.insert(key, copy);
                        cv.notify_all();
                    }
                }
            }
        });
        HostPool {
            jobs: Some(tx),
            state,
            kept_bytes,
            staged_bytes,
            peak,
            offloaded,
            offloads_done,
            transfers,
            thread: Some(thread),
        }
    }

    /// Waits until the thread has finished `n` offload copies.
    fn wait_offloads(
        &self,
        n: u64,
        abort: &AtomicBool,
        deadline: Instant,
    ) -> Result<(), Option<String>> {
        let (lock, cv) = &*self.state;
        let mut g = lock.lock().unwrap_or_else(|p| p.into_inner());
        while self.offloads_done.load(Ordering::SeqCst) < n {
            if abort.load(Ordering::SeqCst) {
                return Err(None);
            }
            if Instant::now() > deadline {
                return Err(Some("timed out waiting for offload copies".into()));
            }
            g = cv
                .wait_timeout(g, Duration::from_millis(20))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    fn offload(&self, key: Key, data: HostData, uses: usize) {
        if let Some(tx) = &self.jobs {
            let _ = tx.send(Job::Offload(key, data, uses));
        }
    }

    /// Requests a reload unless one is already under way.
    fn prefetch(&self, key: &Key) {
        let (lock, _) = &*self.state;
        let mut g = lock.lock().unwrap_or_else(|p| p.into_inner());
        if g.requested.insert(key.clone()) {
            if let Some(tx) = &self.jobs {
                let _ = tx.send(Job::Reload(key.clone()));
            }
        }
    }

    /// Waits for a reloaded copy.
    fn take(
        &self,
        key: &Key,
        abort: &AtomicBool,
        deadline: Instant,
    ) -> Result<HostData, Option<String>> {
        self.prefetch(key);
        let (lock, cv) = &*self.state;
        let mut g = lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(d) = g.staged.remove(key) {
                g.requested.remove(key);
                self.staged_bytes
                    .fetch_sub(data_bytes(&d), Ordering::SeqCst);
                return Ok(d);
            }
            if abort.load(Ordering::SeqCst) {
                return Err(None);
            }
            if Instant::now() > deadline {
                return Err(Some(format!(
                    "timed out reloading `{}` of microbatch {}",
                    key.2, key.1
                )));
            }
            g = cv
                .wait_timeout(g, Duration::from_millis(20))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn note_kept(&self, delta: i64) {
        let now = if delta >= 0 {
            self.kept_bytes.fetch_add(delta as u64, Ordering::SeqCst) + delta as u64
        } else {
            self.kept_bytes.fetch_sub((-delta) as u64, Ordering::SeqCst) - (-delta) as u64
        };
        self.peak.fetch_max(
            now + self.staged_bytes.load(Ordering::SeqCst),
            Ordering::SeqCst,
        );
    }

    fn finish(&mut self) -> (u64, u64, Vec<TransferTiming>) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        (
            self.peak.load(Ordering::SeqCst),
            self.offloaded.load(Ordering::SeqCst),
            std::mem::take(&mut *self.transfers.lock().unwrap_or_else(|p| p.into_inner())),
        )
    }
}

impl Drop for HostPool {
    fn drop(&mut self) {
        self.finish();
    }
}

/// `None`: aborted because another worker failed.
type WorkerResult<T> = Result<T, Option<PipelineError>>;

#[derive(Clone, Copy)]
enum Which {
    F,
    B,
    W,
}

impl<'a> Worker<'a> {
    fn run(
        &mut self,
        stages: Vec<(usize, &mut StagePlans)>,
        actions: &[PipelineAction],
    ) -> WorkerResult<DeviceOut> {
        let sh = self.shared;
        let mut states: BTreeMap<usize, StageState<'_>> = BTreeMap::new();
        // The stage's copies of its parameters, its accumulators and its plans' buffers are
        // the device's.
        let tag_guard = crate::alloc::TagGuard::new(self.tag);
        for (s, plans) in stages {
            if self.tag != 0 {
                for p in [&plans.f, &plans.b, &plans.w] {
                    p.retag_buffers(self.tag);
                }
            }
            let mut params = BTreeMap::new();
            let mut acc = BTreeMap::new();
            for p in [&plans.f, &plans.b, &plans.w] {
                for a in p.args() {
                    if let Some(v) = sh.params.get(&a.name) {
                        params.insert(a.name.clone(), v.clone());
                    }
                }
            }
            for a in plans.w.args() {
                if a.name.starts_with("grad.") && !sh.params.contains_key(&a.name) {
                    acc.insert(
                        a.name.clone(),
                        HostData::F32(vec![0.0; a.ty.num_elements()]),
                    );
                }
            }
            let w_total = actions
                .iter()
                .filter(|a| a.stage == s && matches!(a.kind, PipelineKind::W | PipelineKind::BW))
                .count();
            states.insert(
                s,
                StageState {
                    plans,
                    params,
                    acc,
                    w_done: 0,
                    w_total,
                },
            );
        }
        drop(tag_guard);
        let mut out = DeviceOut::default();
        for &a in actions {
            if sh.abort.load(Ordering::SeqCst) {
                return Err(None);
            }
            // At most the previous action's offload copies may still be on the device.
            self.pool
                .wait_offloads(
                    self.submitted_before[0],
                    sh.abort,
                    Instant::now() + sh.opts.timeout,
                )
                .map_err(|e| {
                    e.map(|message| PipelineError {
                        device: self.device,
                        stage: Some(a.stage),
                        action: Some(a.to_string()),
                        message,
                    })
                })?;
            let start = sh.t0.elapsed().as_secs_f64();
            self.ready_at = start;
            let device = self.device;
            let fail = |message: String| {
                Some(PipelineError {
                    device,
                    stage: Some(a.stage),
                    action: Some(a.to_string()),
                    message,
                })
            };
            *CURRENT_ACTION.lock().unwrap_or_else(|e| e.into_inner()) = Some((device, a));
            if sh.opts.fail_at == Some(a) {
                return Err(fail("injected failure".into()));
            }
            if sh.opts.kill_at == Some(a) {
                // SAFETY: kill(2) on this process's own id; nothing is touched afterwards.
                unsafe {
                    libc::kill(libc::getpid(), libc::SIGKILL);
                }
            }
            let j = a.microbatch;
            let whiches: &[Which] = match a.kind {
                PipelineKind::F => &[Which::F],
                PipelineKind::B => &[Which::B],
                PipelineKind::W => &[Which::W],
                PipelineKind::BW => &[Which::B, Which::W],
            };
            // Request the reloads of this action and of the device's next one.
            let idx = out.timeline.len();
            for b in actions[idx..].iter().take(2) {
                let Some(bst) = states.get(&b.stage) else {
                    continue;
                };
                let plans: &[&Plan] = match b.kind {
                    PipelineKind::F => &[],
                    PipelineKind::B => &[&bst.plans.b],
                    PipelineKind::W => &[&bst.plans.w],
                    PipelineKind::BW => &[&bst.plans.b, &bst.plans.w],
                };
                for p in plans {
                    for x in p.args() {
                        if is_offloaded(&x.name) {
                            self.pool.prefetch(&(b.stage, b.microbatch, x.name.clone()));
                        }
                    }
                }
            }
            let st = states.get_mut(&a.stage).expect("validated placement");
            for &w in whiches {
                self.run_fn(a.stage, st, w, j, &mut out)
                    .map_err(|e| e.map(|m| fail(m).expect("some")))?;
                if let Which::W = w {
                    let mut freed = 0u64;
                    let mut unused = None;
                    for (k, d) in &self.store {
                        if k.0 == a.stage && k.1 == j && k.2.starts_with("stash.") {
                            freed += data_bytes(d);
                            if self.uses.get(k).copied().unwrap_or(0) != 0 {
                                unused = Some(k.2.clone());
                            }
                        }
                    }
                    for (k, &left) in &self.uses {
                        if k.0 == a.stage && k.1 == j && left != 0 {
                            unused = Some(k.2.clone());
                        }
                    }
                    if let Some(name) = unused {
                        return Err(fail(format!(
                            "saved value `{name}` of microbatch {j} is freed with planned uses left"
                        )));
                    }
                    self.uses.retain(|k, _| !(k.0 == a.stage && k.1 == j));
                    self.pool.note_kept(-(freed as i64));
                    self.store.retain(|k, _| !(k.0 == a.stage && k.1 == j));
                    st.w_done += 1;
                    if st.w_done == st.w_total && sh.replicated.contains(&a.stage) {
                        // A replica's sums: the step adds the two and updates once.
                        let reverse = sh.placement[a.stage] != self.device;
                        for (g, v) in std::mem::take(&mut st.acc) {
                            let p = g["grad.".len()..].to_string();
                            out.partial_grads.insert((p, reverse), v);
                        }
                    } else if st.w_done == st.w_total {
                        // The stage's optimizer step: SGD on the parameters it owns gradients of.
                        let _g = crate::alloc::TagGuard::new(self.tag);
                        for (g, v) in std::mem::take(&mut st.acc) {
                            let p = &g["grad.".len()..];
                            if let (true, Some(HostData::F32(pv)), HostData::F32(gv)) =
                                (sh.opts.update, st.params.get(p), &v)
                            {
                                let new = sgd(pv, gv, sh.opts);
                                out.params.insert(p.to_string(), HostData::F32(new));
                            }
                            out.grads.insert(p.to_string(), v);
                        }
                    }
                }
            }
            out.timeline.push(ActionTiming {
                device: self.device,
                action: a,
                start_s: self.ready_at,
                end_s: sh.t0.elapsed().as_secs_f64(),
            });
            self.submitted_before = [self.submitted_before[1], self.submitted];
        }
        let (peak, off, transfers) = self.pool.finish();
        out.peak_saved_bytes = peak;
        out.offloaded_bytes = off;
        out.transfers = transfers;
        Ok(out)
    }

    /// Errors: `Some(cause)` or `None` (aborted).
    fn run_fn(
        &mut self,
        s: usize,
        st: &mut StageState<'_>,
        which: Which,
        j: usize,
        out: &mut DeviceOut,
    ) -> Result<(), Option<String>> {
        let sh = self.shared;
        let names: Vec<String> = {
            let plan = match which {
                Which::F => &st.plans.f,
                Which::B => &st.plans.b,
                Which::W => &st.plans.w,
            };
            plan.args().iter().map(|a| a.name.clone()).collect()
        };
        for (i, name) in names.iter().enumerate() {
            let key = (s, j, name.clone());
            let reloaded;
            let value: HostSlice<'_> = if let (Which::W, Some(v)) = (which, st.acc.get(name)) {
                v.as_slice()
            } else if let Some(v) = st.params.get(name) {
                v.as_slice()
            } else if let Some(v) = sh.data[j].get(name) {
                *v
            } else if is_offloaded(name) {
                self.use_saved(&key)?;
                reloaded = self
                    .pool
                    .take(&key, sh.abort, Instant::now() + sh.opts.timeout)?;
                reloaded.as_slice()
            } else {
                if !self.store.contains_key(&key) {
                    self.wait_for(&key)?;
                    self.ready_at = sh.t0.elapsed().as_secs_f64();
                }
                if name.starts_with("stash.") {
                    self.use_saved(&key)?;
                }
                self.store[&key].as_slice()
            };
            let plan = match which {
                Which::F => &mut st.plans.f,
                Which::B => &mut st.plans.b,
                Which::W => &mut st.plans.w,
            };
            plan.set_input(i, value)
                .map_err(|e| Some(format!("argument `{name}`: {e}")))?;
            // A kept saved value is freed after its last planned use.
            if name.starts_with("stash.") && !is_offloaded(name) && self.uses.get(&key) == Some(&0)
            {
                if let Some(d) = self.store.remove(&key) {
                    self.pool.note_kept(-(data_bytes(&d) as i64));
                }
            }
        }
        let plan = match which {
            Which::F => &mut st.plans.f,
            Which::B => &mut st.plans.b,
            Which::W => &mut st.plans.w,
        };
        {
            // Whatever a kernel allocates while it runs is the device's.
            let _g = crate::alloc::TagGuard::new(self.tag);
            plan.run().map_err(|e| Some(e.to_string()))?;
        }
        let outputs: Vec<String> = plan.outputs().iter().map(|o| o.name.clone()).collect();
        for (oi, name) in outputs.iter().enumerate() {
            let plan = match which {
                Which::F => &st.plans.f,
                Which::B => &st.plans.b,
                Which::W => &st.plans.w,
            };
            if name == "loss" {
                if let Some(v) = plan.output_f32(oi) {
                    out.losses.insert(j, v[0]);
                }
                continue;
            }
            if let (Which::W, true) = (which, st.acc.contains_key(name)) {
                // The accumulator is updated in place (no second copy on the device).
                match (st.acc.get_mut(name), plan.output_f32(oi)) {
                    (Some(HostData::F32(acc)), Some(v)) if acc.len() == v.len() => {
                        acc.copy_from_slice(v)
                    }
                    _ => {
                        let _g = crate::alloc::TagGuard::new(self.tag);
                        st.acc.insert(name.clone(), plan.output(oi));
                    }
                }
                continue;
            }
            let Some(cons) = sh.consumers.get(name) else {
                continue;
            };
            for &t in cons {
                // A stash stays with the stage that made it (several stages may stash a value
                // of the same number).
                if t != s && name.starts_with("stash.") {
                    continue;
                }
                let data = {
                    let _g = crate::alloc::TagGuard::new(self.tag);
                    plan.output(oi)
                };
                let dev = sh.device_of(t, j);
                if t == s && name.starts_with("stash.") {
                    // A saved value: planned uses = the stage's B and W that take it.
                    let uses = [&st.plans.b, &st.plans.w]
                        .iter()
                        .filter(|p| p.args().iter().any(|x| x.name == *name))
                        .count();
                    let key = (t, j, name.clone());
                    self.uses.insert(key.clone(), uses);
                    if is_offloaded(name) {
                        self.submitted += 1;
                        self.pool.offload(key, data, uses);
                    } else {
                        self.pool.note_kept(data_bytes(&data) as i64);
                        self.store.insert(key, data);
                    }
                } else if dev == self.device {
                    self.store.insert((t, j, name.clone()), data);
                } else {
                    self.send(
                        dev,
                        Msg {
                            stage: t,
                            microbatch: j,
                            name: name.clone(),
                            data,
                        },
                    )?;
                }
            }
        }
        Ok(())
    }

    /// Counts one use of a saved value against its plan.
    fn use_saved(&mut self, key: &Key) -> Result<(), Option<String>> {
        match self.uses.get_mut(key) {
            Some(n) if *n > 0 => {
                *n -= 1;
                Ok(())
            }
            Some(_) => Err(Some(format!(
                "saved value `{}` of microbatch {} is used more often than planned",
                key.2, key.1
            ))),
            None => Err(Some(format!(
                "saved value `{}` of microbatch {} was never saved",
                key.2, key.1
            ))),
        }
    }

    fn wait_for(&mut self, key: &(usize, usize, String)) -> Result<(), Option<String>> {
        let sh = self.shared;
        let deadline = Instant::now() + sh.opts.timeout;
        while !self.store.contains_key(key) {
            if sh.abort.load(Ordering::SeqCst) {
                return Err(None);
            }
            match self.rx.recv_timeout(Duration::from_millis(20)) {
                Ok(m) => {
                    // A received value is the receiving device's.
                    m.data.retag(self.tag);
                    self.store.insert((m.stage, m.microbatch, m.name), m.data);
                }
                Err(RecvTimeoutError::Timeout) => {
                    if Instant::now() > deadline {
                        return Err(Some(format!(
                            "timed out after {:?} waiting for `{}` of microbatch {}",
                            sh.opts.timeout, key.2, key.1
                        )));
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    if sh.abort.load(Ordering::SeqCst) {
                        return Err(None);
                    }
                    return Err(Some(format!(
                        "`{}` of microbatch {} never arrives: every other device has finished",
                        key.2, key.1
                    )));
                }
            }
        }
        Ok(())
    }

    fn send(&mut self, dev: usize, mut msg: Msg) -> Result<(), Option<String>> {
        let sh = self.shared;
        let deadline = Instant::now() + sh.opts.timeout;
        loop {
            match self.tx[dev].try_send(msg) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Full(m)) => {
                    msg = m;
                    if sh.abort.load(Ordering::SeqCst) {
                        return Err(None);
                    }
                    if Instant::now() > deadline {
                        return Err(Some(format!(
                            "timed out sending `{}` to device {dev}: its channel stays full",
                            msg.name
                        )));
                    }
                    // Drain our own channel meanwhile, so two devices sending to each other
                    // cannot block each other.
                    while let Ok(m) = self.rx.try_recv() {
                        m.data.retag(self.tag);
                        self.store.insert((m.stage, m.microbatch, m.name), m.data);
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err(TrySendError::Disconnected(m)) => {
                    if sh.abort.load(Ordering::SeqCst) {
                        return Err(None);
                    }
                    return Err(Some(format!(
                        "cannot send `{}` to device {dev}: it has ended",
                        m.name
                    )));
                }
            }
        }
    }
}

/// A value's wire form for another process: its stage, microbatch, name and data.
fn encode(msg: &Msg) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + data_bytes(&msg.data) as usize);
    put_u64(&mut out, msg.stage as u64);
    put_u64(&mut out, msg.microbatch as u64);
    put_str(&mut out, &msg.name);
    put_data(&mut out, &msg.data);
    out
}

/// [`encode`]'s inverse.
fn decode(bytes: &[u8]) -> Result<Msg, String> {
    let mut r = Reader::new(bytes);
    let msg = Msg {
        stage: r.u64()? as usize,
        microbatch: r.u64()? as usize,
        name: r.str()?,
        data: r.data()?,
    };
    if !r.done() {
        return Err("a value message has trailing bytes".into());
    }
    Ok(msg)
}

/// The SGD update of the step: `p − lr·(scale·g)` in f32.
pub fn sgd(p: &[f32], g: &[f32], opts: &PipelineOptions) -> Vec<f32> {
    let (lr, scale) = (opts.lr, opts.grad_scale);
    p.iter()
        .zip(g)
        .map(|(&x, &g)| x - lr * (scale * g))
        .collect()
}
