//! `cleave train --stages P --microbatches M --schedule NAME`: pipeline-parallel training on the
//! stage-partitioned executor ([`cleave_runtime::pipeline`]).
//!
//! **Build.** The forward model is cut with `partition{stages=S},autodiff,split-bw` (S = the
//! schedule's number of stages: P for one chunk per device, 2P for `interleaved` and `zb-v`; with
//! S = 1, `autodiff,split-bw`), and every stage's F, B and W functions are compiled for the CPU
//! runtime. The schedule comes from the schedule library: `gpipe`, `1f1b`, `zb-h1`, `zb-h2`,
//! `interleaved[-v]`, `zb-v`, or `auto` (the automatic zero-bubble scheduler with equal unit
//! costs and memory per stage, no memory limit and no ILP, so it is fast and deterministic).
//! `auto` with `--memory-limit` is the planner's joint search instead: schedule and
//! recomputation/offload chosen together on the CPU profile's estimates ([`pipeline_plan`]).
//! SEND/RECV actions of a schedule are implicit: values travel when produced.
//!
//! **Batch.** The model is traced at the *microbatch* size `b`; a step reads `M·b` examples
//! (examples `k·M·b … (k+1)·M·b − 1` of the sequence `cleave train` defines) and microbatch `j`
//! is examples `j·b … j·b+b−1` of them. `--batch`, if given, must equal `b`.
//!
//! **Loss and gradients.** The model's loss is a mean over its microbatch. The step's loss is the
//! mean of the M microbatch losses (summed in microbatch order, in f64), and the gradient is the
//! sum of the microbatch gradients (accumulated by each stage's W in its schedule's W order)
//! scaled by `1/M`, so the update is that of the mean loss over the whole batch.
//!
//! **Optimizer.** SGD is applied by each device to its stages' parameters after the stage's
//! last W: `p ← p − lr·((1/M)·g)` in f32, with no barrier. Momentum and AdamW run after the
//! step, over every parameter, as one compiled program of the `optimizer` pass's IR (the same
//! update as the one-stage step's: [`Updater`]), their state kept beside the parameters.
//! `--grad-clip` validates the step after the fact ([`finish_step`]).
//!
//! **Checkpoints** (`--checkpoint DIR`, `--resume DIR`): every parameter by name with the step,
//! in the one-stage format (SGD keeps no other state); a resumed run continues bit for bit, and
//! runs with threads and with one process per device (MPI, rank 0 writes) read each other's.
//!
//! **Reference.** `--stages 1 --microbatches M` runs the same code with one stage; pipelined runs
//! with the same M give the same losses and weights (bit-identical when every stage accumulates
//! its W in microbatch order, which all supported generators do).
//!
//! **Timeline** (`--timeline FILE.json|FILE.svg`): JSON is `{"summary": {"measured_bubble_rate",
//! "simulated_bubble_rate", "steps_used", "stage_costs_s"}, "steps": [{"step": k, "actions":
//! [{"device", "action", "start_s", "end_s"}…]}…]}`, times in seconds since the step began; SVG is
//! the median step drawn like the simulator's pictures, memory in stashed bytes. The summary
//! compares the measured bubble rate (median over steps, the first left out) with the simulator's
//! for the same schedule under the measured mean per-stage costs ([`timeline_report`]).
//!
//! **Failures.** A failing stage ends the run with an error naming the step, the stage, the
//! action and the cause (`--fail-action 1B3`, hidden, injects one for tests).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use cleave_ir::{ArgRole, BinaryOp, DType, Function, Module};
use cleave_passes::autodiff::methods::{GradMethod, FG_TANGENT_PREFIX};
use cleave_passes::autodiff::{Compress, Selection};
use cleave_passes::compress::{autodiff_pass, selection_of};
use cleave_passes::partition::{Cut, DeviceProfile};
use cleave_passes::plan::{joint, split_staged, stage_forward, Planned, Split};
use cleave_passes::precision::Precision;
use cleave_passes::remat::{
    named_smallest, parse_bytes, plan_stages_reserved, ChoiceGraph, InFlight, Policy, StageMemory,
    SMALLEST_FEASIBLE,
};
use cleave_passes::schedule::{Action, ActionKind, Costs, Memory, Schedule, Simulation, StageCost};
use cleave_passes::split::{split_stages, stash_report};
use cleave_passes::{PassContext, PassManager};
use cleave_runtime::pipeline::{
    ActionTiming, Pipeline, PipelineAction, PipelineKind, PipelineOptions, StagePlans,
};
use cleave_runtime::remote::Remote;
use cleave_runtime::{compile_with, Codegen, CompileOptions, HostData, HostSlice};

use crate::device_memory::{per_device, stage_resident, workspace_of, DeviceAccount};
use crate::init::init_params;
use crate::train::{
    eval_plan, evaluate, gather_batch, load_data, set_args, Metrics, OptimizerArg, Order,
    TrainArgs, TrainSummary,
};

/// What a pipelined run produced.
#[derive(Clone, Debug)]
pub struct PipelineRun {
    /// The summary `cleave train` prints.
    pub summary: TrainSummary,
    /// Each step's loss.
    pub losses: Vec<f64>,
    /// The final parameters.
    pub params: BTreeMap<String, HostData>,
    /// The recomputation/offload plan of each stage (empty without --remat/--memory-limit).
    pub memory: Vec<StageMemory>,
    /// Per device, the most bytes of saved values held in device memory at once, over all steps
    /// (the executor's accounting).
    pub peak_saved_bytes: Vec<u64>,
    /// Per device, bytes copied to the host pool in the last step.
    pub offloaded_bytes: Vec<u64>,
    /// Per device, the plan's accounting of what it holds ([`crate::device_memory`]).
    pub planned_devices: Vec<DeviceAccount>,
    /// Per device, the instrumented allocator's peak over all steps (empty when not measured).
    pub measured_peak_bytes: Vec<u64>,
    /// Per device, the allocator's peak of its host pool over all steps.
    pub measured_host_peak_bytes: Vec<u64>,
    /// Per device, the offload/reload copies of the last step and their overlap with actions.
    pub transfers: Vec<TransferOverlap>,
    /// The joint planner's result, when it chose the schedule (`--schedule auto
    /// --memory-limit`).
    pub planned: Option<Box<Planned>>,
    /// With `--compress chunked[:K]`: the row chunks of the output layer the plan took (`None`:
    /// whole).
    pub chunked: Option<usize>,
}

/// Offload and reload copies of one device in one step, against its actions.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TransferOverlap {
    /// The device.
    pub device: usize,
    /// Copies made.
    pub copies: usize,
    /// Bytes copied.
    pub bytes: u64,
    /// Seconds the copy thread spent copying.
    pub transfer_s: f64,
    /// Of those, seconds during which the device ran an action (the copy was hidden).
    pub overlapped_s: f64,
}

/// Measures how much of each device's copy time fell inside its actions.
pub fn overlap_report(
    timeline: &[ActionTiming],
    transfers: &[cleave_runtime::pipeline::TransferTiming],
) -> Vec<TransferOverlap> {
    let mut out: BTreeMap<usize, TransferOverlap> = BTreeMap::new();
    for t in transfers {
        let o = out.entry(t.device).or_insert_with(|| TransferOverlap {
            device: t.device,
            ..TransferOverlap::default()
        });
        o.copies += 1;
        o.bytes += t.bytes;
        o.transfer_s += t.end_s - t.start_s;
        o.overlapped_s += timeline
            .iter()
            .filter(|x| x.device == t.device)
            .map(|x| (x.end_s.min(t.end_s) - x.start_s.max(t.start_s)).max(0.0))
            .sum::<f64>();
    }
    out.into_values().collect()
}

/// The `--memory-report` table.
pub fn memory_report_text(
    planned: &[DeviceAccount],
    measured: &[u64],
    host: &[u64],
    limit: Option<u64>,
) -> String {
    let mut out = format!(
        "{:<6} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>11} {:>11} {:>11} {:>11}\n",
        "device",
        "params",
        "grads",
        "updated",
        "optimizer",
        "workspace",
        "scratch",
        "boundary",
        "saved",
        "planned",
        "measured",
        "host pool",
        "limit"
    );
    for (d, p) in planned.iter().enumerate() {
        let r = &p.resident;
        out.push_str(&format!(
            "{:<6} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>11} {:>11} {:>11} {:>11}\n",
            d,
            r.params,
            r.grads,
            r.updated,
            r.optimizer,
            r.workspace,
            r.scratch,
            r.boundary,
            p.saved,
            p.total(),
            measured.get(d).map_or("-".into(), |x| x.to_string()),
            host.get(d).map_or("-".into(), |x| x.to_string()),
            limit.map_or("-".into(), |x| x.to_string()),
        ));
    }
    out
}

/// The saved values' need of every stage under `none` (no rewrite).
fn saved_need(
    split: &[cleave_passes::split::SplitStage<'_>],
    flights: &[InFlight],
    profile: &DeviceProfile,
) -> Result<Vec<u64>> {
    split
        .iter()
        .zip(flights)
        .map(|(s, k)| {
            let g = ChoiceGraph::new(s.f, s.b, s.w, profile);
            let p = g.plan(Policy::None, None, k).map_err(anyhow::Error::msg)?;
            Ok(g.summary(&p, k).need_bytes)
        })
        .collect()
}

/// Rounds of [`plan_rounds`].
const MEMORY_ROUNDS: usize = 4;

/// Limits [`plan_within`] tries when it looks for a feasible one, and bisection steps after.
const SMALLEST_TRIES: usize = 8;
const SMALLEST_BISECTIONS: usize = 6;

/// One planning attempt: the split module with every stage's recomputation and offload, the
/// stages' plans, and the schedule they were made for.
#[derive(Clone)]
struct Attempt {
    module: Module,
    memory: Vec<StageMemory>,
    schedule: Schedule,
    /// The joint planner's whole result (with `--schedule auto --memory-limit`).
    planned: Option<Box<Planned>>,
}

/// The simulated step of a planned module under a profile: its stages' F/B/W seconds
/// (recomputation, exposed transfers and any compression's nodes included) through the
/// schedule. What the memory plan's choices are compared by.
fn simulated_step(
    module: &Module,
    memory: &[StageMemory],
    schedule: &Schedule,
    profile: &DeviceProfile,
) -> Result<f64> {
    let (costs, mem) = cleave_passes::plan::costs_of(module, profile, memory, None);
    Ok(schedule
        .simulate(&costs, &mem)
        .map_err(|e| anyhow::anyhow!("simulating the plan: {e}"))?
        .makespan)
}

/// What [`plan_within`] plans with: `plan(limit, reserved)` makes one attempt (each device's
/// saved values share `limit − reserved[d]`), on a stage cut whose unrewritten split module is
/// `base` and whose stages sit on the devices `placement` names (the same for every attempt).
struct Planner<'a> {
    base: &'a Module,
    forward: &'a cleave_ir::Function,
    placement: Vec<usize>,
    n_dev: usize,
    m: usize,
    /// The optimizer's state per parameter.
    state_copies: u64,
    /// How errors start (`--remat auto`, `--schedule auto`).
    what: String,
    #[allow(clippy::type_complexity)]
    plan: Box<dyn Fn(Option<u64>, &[u64]) -> Result<Attempt> + 'a>,
}

/// Plans recomputation/offload so that every device's whole accounting fits `limit` (see
/// [`crate::device_memory`] and [`plan_rounds`]).
///
/// Recomputation adds buffers to B and W and frees some of F's, so the reserved bytes of the
/// plans without recomputation, which the first round starts from, can make a limit look
/// infeasible that a recomputing plan meets. So when that attempt fails, the limits its error
/// names are tried in turn (at most [`SMALLEST_TRIES`]) until one fits, and `limit` is tried
/// again starting from that plan's reserved bytes. This procedure depends on `limit` alone, so a
/// limit it accepts once it always accepts.
///
/// The search below can end at a limit under `limit` (see there); then `limit` is met with
/// that plan's reserved bytes, so every limit at or above the smallest feasible one the search
/// from it finds is accepted.
///
/// When `limit` is infeasible, the error names the smallest feasible limit, found with the same
/// procedure: the named figures until one fits, a bisection down to within 0.2 % (at most
/// [`SMALLEST_BISECTIONS`] steps), then, while a fitting plan accounts less than its limit,
/// that smaller total. The limit named has been planned and fits.
fn plan_within(planner: &Planner<'_>, limit: Option<u64>) -> Result<Attempt> {
    let Some(l) = limit else {
        return Ok(plan_rounds(planner, None, None)?.0);
    };
    let attempt = |l: u64, start: Option<&[u64]>| {
        plan_rounds(planner, Some(l), start).map_err(|e| e.to_string())
    };
    // Attempts from the unrewritten plans' reserved bytes, remembered: the search below meets
    // the same limits again (each attempt compiles and measures every stage's plans).
    let probes = RefCell::new(BTreeMap::<u64, Result<Fitted, String>>::new());
    let probe = |n: u64| -> Result<Fitted, String> {
        if let Some(r) = probes.borrow().get(&n) {
            return r.clone();
        }
        let r = attempt(n, None).map(|(_, fitted)| fitted);
        probes.borrow_mut().insert(n, r.clone());
        r
    };
    // The reserved bytes to retry `l` from: those of the first limit named from `said` on that
    // fits.
    let start_for = |l: u64, said: &str| -> Option<Vec<u64>> {
        let mut next = named_smallest(said).filter(|&n| n > l);
        for _ in 0..SMALLEST_TRIES {
            let n = next?;
            match probe(n) {
                Ok(fitted) => return Some(fitted.reserved),
                Err(e) => next = named_smallest(&e).filter(|&x| x > n),
            }
        }
        None
    };
    // The whole procedure for one limit (see above); the error is the first attempt's.
    let fits = |l: u64| -> Result<Fitted, String> {
        let said = match probe(l) {
            Ok(fitted) => return Ok(fitted),
            Err(e) => e,
        };
        let start = start_for(l, &said).ok_or_else(|| said.clone())?;
        attempt(l, Some(&start))
            .map(|(_, fitted)| fitted)
            .map_err(|_| said)
    };
    let said = match attempt(l, None) {
        Ok((planned, _)) => return Ok(planned),
        Err(e) => e,
    };
    probes.borrow_mut().insert(l, Err(said.clone()));
    if let Some(start) = start_for(l, &said) {
        if let Ok((planned, _)) = attempt(l, Some(&start)) {
            return Ok(planned);
        }
    }
    let Some(first) = named_smallest(&said).filter(|&n| n > l) else {
        bail!("{said}");
    };
    // A feasible limit (and what its plan accounts), from the figures the attempts name.
    let (mut lo, mut hi) = (None, None);
    let mut next = first;
    for _ in 0..SMALLEST_TRIES {
        match fits(next) {
            Ok(fitted) => {
                hi = Some((next, fitted));
                break;
            }
            Err(e) => {
                lo = Some(next);
                match named_smallest(&e).filter(|&n| n > next) {
                    Some(n) => next = n,
                    None => break,
                }
            }
        }
    }
    let Some((mut hi, mut fitted)) = hi else {
        bail!("{said}");
    };
    if let Some(mut lo) = lo {
        for _ in 0..SMALLEST_BISECTIONS {
            if hi - lo <= hi / 500 {
                break;
            }
            let mid = lo + (hi - lo) / 2;
            match fits(mid) {
                Ok(f) => (hi, fitted) = (mid, f),
                Err(_) => lo = mid,
            }
        }
    }
    for _ in 0..SMALLEST_TRIES {
        if fitted.worst >= hi {
            break;
        }
        match fits(fitted.worst) {
            Ok(f) => (hi, fitted) = (fitted.worst, f),
            Err(_) => break,
        }
    }
    // The search can end below `l`: a fitting plan accounting less than its limit is tried at
    // that total, and the plans it meets recompute more and reserve less than the first
    // attempt's at `l`. A limit at or above a limit that fits fits too: `l` again from that
    // plan's reserved bytes, else that plan itself (planned under the smaller limit).
    if hi <= l {
        for at in [l, hi] {
            if let Ok((planned, _)) = attempt(at, Some(&fitted.reserved)) {
                return Ok(planned);
            }
        }
    }
    let (was, now) = (
        format!("; {SMALLEST_FEASIBLE}{first} bytes"),
        format!("; {SMALLEST_FEASIBLE}{hi} bytes, planned and measured"),
    );
    bail!(
        "{}",
        if said.contains(&format!("{was} (")) {
            said.replace(&format!("{was} ("), &format!("{now} (at {l} bytes: "))
        } else {
            said.replace(&was, &now)
        }
    )
}

/// What [`plan_rounds`] measured of the plan it returns.
#[derive(Clone, Debug, Default)]
struct Fitted {
    /// The largest device total of the accounting.
    worst: u64,
    /// Each device's reserved bytes (everything but saved values).
    reserved: Vec<u64>,
}

/// Plans with the reserved bytes of the current plans, compiles, measures, adds any excess to
/// the reserved bytes and plans again, for up to [`MEMORY_ROUNDS`] rounds; the first round
/// reserves `start` (by device) if given, else the bytes of the plans without recomputation.
/// Returns the attempt and what was measured of it (nothing without a limit).
fn plan_rounds(
    planner: &Planner<'_>,
    limit: Option<u64>,
    start: Option<&[u64]>,
) -> Result<(Attempt, Fitted)> {
    let account = |module: &Module, saved: &[u64]| -> Result<Vec<DeviceAccount>> {
        let split = split_stages(module);
        let ws = workspace_of(&split)?;
        let resident = stage_resident(
            &split,
            &ws,
            planner.forward,
            planner.m,
            planner.state_copies,
        );
        Ok(per_device(
            &resident,
            saved,
            &planner.placement,
            planner.n_dev,
        ))
    };
    let mut reserved: Vec<u64> = match start {
        Some(r) => r.to_vec(),
        None => account(planner.base, &[])?
            .iter()
            .map(|d| d.resident.total())
            .collect(),
    };
    let mut last = Vec::new();
    for _ in 0..MEMORY_ROUNDS {
        let planned = (planner.plan)(limit, &reserved)?;
        let Some(l) = limit else {
            return Ok((planned, Fitted::default()));
        };
        let saved: Vec<u64> = planned
            .memory
            .iter()
            .map(|s| s.summary.need_bytes)
            .collect();
        let devices = account(&planned.module, &saved)?;
        if devices.iter().all(|d| d.total() <= l) {
            let fitted = Fitted {
                worst: devices.iter().map(|d| d.total()).max().unwrap_or(0),
                reserved: devices.iter().map(|d| d.resident.total()).collect(),
            };
            return Ok((planned, fitted));
        }
        for (d, x) in devices.iter().enumerate() {
            if x.total() > l {
                reserved[d] += x.total() - l;
            }
        }
        last = devices;
    }
    let (d, worst) = last
        .iter()
        .enumerate()
        .max_by_key(|(_, x)| x.total())
        .map(|(d, x)| (d, x.total()))
        .unwrap_or((0, 0));
    bail!(
        "{}: device {d}: no plan within the memory limit {} bytes once the plans' \
         workspace is counted (after {MEMORY_ROUNDS} rounds the device needs {worst} bytes); \
         {SMALLEST_FEASIBLE}{worst} bytes",
        planner.what,
        limit.unwrap_or(0)
    )
}

/// Microbatches in flight per stage under a schedule (the planner's, re-exported).
pub use cleave_passes::plan::in_flight;

/// A measured timeline set against the simulator.
#[derive(Clone, Debug)]
pub struct TimelineReport {
    /// Median over the steps used of each step's bubble rate (the simulator's definition).
    pub measured_bubble_rate: f64,
    /// The schedule simulated with `costs`.
    pub simulated_bubble_rate: f64,
    /// Mean measured seconds of F, B and W per stage (an unsplit BW counts as B, with W = 0).
    pub costs: Costs,
    /// Steps the figures come from (the first step is left out when there are more: it pays for
    /// first-touch page faults and cold caches).
    pub steps_used: usize,
    /// The step whose bubble rate is the median, as a simulation of measured times.
    pub median_step: Simulation,
}

/// Compares measured step timelines with the simulator: the measured bubble rate of each step
/// (by [`Simulation::from_timings`], the simulator's own definition), and the simulated bubble
/// rate of the same schedule under the measured mean per-stage costs, with no communication cost
/// (values move between threads by handing over a buffer).
pub fn timeline_report(
    schedule: &Schedule,
    steps: &[Vec<ActionTiming>],
    memory: &Memory,
) -> Result<TimelineReport> {
    let used = if steps.len() > 1 { &steps[1..] } else { steps };
    if used.is_empty() {
        bail!("no steps were run, so there is no timeline");
    }
    let n = schedule.n_stages();
    let mut sums = vec![[0.0f64; 3]; n];
    let mut counts = vec![[0usize; 3]; n];
    let mut sims = Vec::new();
    for step in used {
        let mut devices: Vec<Vec<(Action, f64, f64)>> = vec![Vec::new(); schedule.devices.len()];
        for t in step {
            let (kind, slot) = match t.action.kind {
                PipelineKind::F => (ActionKind::F, 0),
                PipelineKind::B => (ActionKind::B, 1),
                PipelineKind::BW => (ActionKind::BW, 1),
                PipelineKind::W => (ActionKind::W, 2),
            };
            sums[t.action.stage][slot] += t.end_s - t.start_s;
            counts[t.action.stage][slot] += 1;
            let action = Action::new(t.action.stage as u32, kind, t.action.microbatch as u32);
            devices[t.device].push((action, t.start_s, t.end_s));
        }
        for list in &mut devices {
            list.sort_by(|x, y| x.1.total_cmp(&y.1));
        }
        sims.push(Simulation::from_timings(&devices, memory));
    }
    let mean = |s: usize, k: usize| {
        if counts[s][k] == 0 {
            0.0
        } else {
            sums[s][k] / counts[s][k] as f64
        }
    };
    let costs = Costs {
        stages: (0..n)
            .map(|s| StageCost {
                f: mean(s, 0),
                b: mean(s, 1),
                w: mean(s, 2),
            })
            .collect(),
        comm: 0.0,
    };
    let simulated = schedule.simulate(&costs, memory)?;
    sims.sort_by(|x, y| x.bubble_rate.total_cmp(&y.bubble_rate));
    let median_step = sims.swap_remove(sims.len() / 2);
    Ok(TimelineReport {
        measured_bubble_rate: median_step.bubble_rate,
        simulated_bubble_rate: simulated.bubble_rate,
        costs,
        steps_used: used.len(),
        median_step,
    })
}

/// Builds the schedule named `name` for `p` devices and `m` microbatches (the planner's
/// [`cleave_passes::plan::build_schedule`]).
pub fn build_schedule(name: &str, p: usize, m: usize) -> Result<Schedule> {
    Ok(cleave_passes::plan::build_schedule(name, p, m)?)
}

fn parse_fail_action(text: &str) -> Result<PipelineAction> {
    let a = cleave_passes::schedule::Action::parse(text)
        .map_err(|e| anyhow::anyhow!("--fail-action {text}: {}", e.reason))?;
    Ok(PipelineAction {
        stage: a.stage as usize,
        kind: match a.kind {
            ActionKind::F => PipelineKind::F,
            ActionKind::B => PipelineKind::B,
            ActionKind::W => PipelineKind::W,
            ActionKind::BW => PipelineKind::BW,
            _ => bail!("--fail-action {text}: only F, B, W and BW actions run"),
        },
        microbatch: a.microbatch as usize,
    })
}

/// The plan pipelined training runs: the schedule, the split module (per stage `F`, `B`, `W`,
/// with recomputation and offload rewritten in) and each stage's recomputation/offload plan.
/// `cleave train`, `cleave compile` and the AOT executables build it with [`pipeline_plan`].
#[derive(Clone, Debug)]
pub struct PipelinePlan {
    /// The schedule: its action lists drive the executor.
    pub schedule: Schedule,
    /// The split module.
    pub module: Module,
    /// Per stage, the recomputation/offload plan (empty without `--remat`/`--memory-limit`).
    pub memory: Vec<StageMemory>,
    /// With `--schedule auto --memory-limit` (policy `auto`): the joint planner's result
    /// ([`cleave_passes::plan::joint`]: where the schedule came from, the simulated makespan and
    /// effective bubble under the CPU profile's cost estimates).
    pub planned: Option<Box<Planned>>,
    /// The `--compress` methods the step was differentiated with (under `--memory-limit`, those
    /// the plan chose: none when the exact step fits at no more added time).
    pub compress: Compress,
    /// Under `--memory-limit`: the values the plan compresses, and with which method
    /// ([`cleave_passes::compress::choose`]); `None`: every value the methods apply to.
    pub selection: Option<cleave_passes::autodiff::Selection>,
    /// Under `--memory-limit` with `--compress chunked[:K]`: `Some(K)` when the plan runs the
    /// output layer in K row chunks (it plans the step both ways and keeps the faster).
    pub chunked: Option<usize>,
}

/// The stage functions and schedule of pipelined training (see the module docs).
///
/// `--schedule NAME` builds the named schedule; `forward` is partitioned into its stages,
/// differentiated and split into F, B and W (`split-bw`), and recomputation and offload are
/// planned under `--remat`/`--memory-limit` for the schedule's microbatches in flight.
///
/// `--schedule auto` with `--memory-limit` (and `--remat auto` or none) runs the planner's
/// joint search instead ([`cleave_passes::plan::joint`], the same as `cleave inspect --memory
/// --schedule auto` and the `plan` pass): schedule and recomputation are chosen together, on the
/// CPU profile's cost estimates, one stage per device. Either way the limit covers everything a
/// device holds ([`crate::device_memory`]): the bytes that are not saved values are measured on
/// the compiled stage programs and handed to the planner as each device's reserved bytes, in
/// rounds until the accounting fits (`plan_rounds`).
///
/// With `--compress chunked[:K]` (and a limit) the step is planned as given and with its output
/// layer in K row chunks (`chunk{ops=lm-head,k=K}`; without K, for each K of
/// [`cleave_passes::plan::CHUNK_CHOICES`]), each with the rest of the plan's choices; the
/// fastest is kept (the joint plan's simulated step, or the named schedule's plan simulated),
/// the whole layer on ties, then the fewest chunks.
pub fn pipeline_plan(a: &TrainArgs, forward: &cleave_ir::Function) -> Result<PipelinePlan> {
    let (_, chunks) = crate::train::parse_compress_planned(a.compress.as_deref())?;
    if chunks.is_empty() {
        return plan_forward(a, forward);
    }
    if memory_limit(a)?.is_none() {
        bail!(
            "--compress chunked: the chunked output layer is a choice of the memory plan: give \
             --memory-limit, or use --chunk-lm-head K to always chunk it"
        );
    }
    if a.chunk_lm_head.is_some() {
        bail!("--compress chunked with --chunk-lm-head: the output layer is chunked already");
    }
    let profile = cpu_profile()?;
    // A plan whose simulation fails counts as the slower one.
    let objective = |x: &PipelinePlan| match &x.planned {
        Some(p) => p.sim.makespan,
        None => {
            simulated_step(&x.module, &x.memory, &x.schedule, &profile).unwrap_or(f64::INFINITY)
        }
    };
    let plans = std::iter::once(plan_forward(a, forward)).chain(chunks.iter().map(|&k| {
        let chunked = crate::train::training_forward(forward, Some(k))
            .with_context(|| format!("--compress chunked:{k}"))?;
        Ok(PipelinePlan {
            chunked: Some(k),
            ..plan_forward(a, &chunked)?
        })
    }));
    let tries = plans.map(|plan| {
        let scored = plan.map(|p| {
            let o = objective(&p);
            (p, o)
        });
        ((), scored)
    });
    cleave_passes::plan::fastest(tries).map(|(p, ())| p)
}

/// [`pipeline_plan`] of one forward function (the output layer's chunking decided).
fn plan_forward(a: &TrainArgs, forward: &cleave_ir::Function) -> Result<PipelinePlan> {
    let (p, m) = (a.stages, a.microbatches);
    let limit = memory_limit(a)?;
    let planning = a.remat.is_some() || limit.is_some();
    let policy = match a.remat.as_deref() {
        None => Policy::Auto,
        Some(name) => Policy::parse(name).with_context(|| {
            format!(
                "--remat {name}: unknown policy; valid policies: {}",
                Policy::NAMES
            )
        })?,
    };
    let profile = cpu_profile()?;
    if a.schedule.eq_ignore_ascii_case("auto") && limit.is_some() && policy == Policy::Auto {
        // The joint planner differentiates with backprop; other methods are refused rather than
        // silently dropped. Named compressions are chosen per value around the joint search.
        let method = crate::train::parse_grad_method(&a.grad_method, a.tangents)?;
        if method != GradMethod::Bp {
            bail!(
                "--schedule auto --memory-limit: the joint planner plans backprop's stash; \
                 --grad-method {method} is not planned jointly yet: pick a fixed schedule \
                 (e.g. --schedule zb-h1) or drop the option"
            );
        }
        let compress = crate::train::parse_compress_planned(a.compress.as_deref())?.0;
        let staged = stage_forward(forward, p, CPU_PROFILE, Cut::default())
            .map_err(|e| anyhow::anyhow!("--schedule auto: {e}"))?;
        let cands = if compress.is_none() {
            Vec::new()
        } else {
            cleave_passes::compress::candidates(&staged, compress, &profile)
                .map_err(|e| anyhow::anyhow!("--compress: {e}"))?
        };
        let (mut x, chosen, _) = cleave_passes::compress::choose(&cands, |chosen| {
            let autodiff = autodiff_pass(compress, chosen).map_err(anyhow::Error::msg)?;
            let split = split_staged(
                forward,
                staged.clone(),
                p,
                CPU_PROFILE,
                Cut::default(),
                &autodiff,
            )
            .map_err(|e| anyhow::anyhow!("--schedule auto: {e}"))?;
            let planner = Planner {
                base: &split.module,
                forward,
                placement: (0..p).collect(),
                n_dev: p,
                m,
                state_copies: a.optimizer.state_copies(),
                what: "--schedule auto".into(),
                plan: Box::new(|l, reserved| {
                    let base = Split {
                        reserved: reserved.to_vec(),
                        ..split.clone()
                    };
                    let (planned, _) = joint(forward, &base, p, m, l.unwrap_or(u64::MAX), &profile)
                        .map_err(|e| anyhow::anyhow!("--schedule auto: {e}"))?;
                    Ok(Attempt {
                        module: planned.module.clone(),
                        memory: planned.stages.clone(),
                        schedule: planned.schedule.clone(),
                        planned: Some(Box::new(planned)),
                    })
                }),
            };
            let x = plan_within(&planner, limit)?;
            let makespan = x.planned.as_ref().map_or(0.0, |p| p.sim.makespan);
            let clean = x.memory.iter().all(|s| s.summary.added_seconds <= 0.0);
            Ok::<_, anyhow::Error>((x, makespan, clean))
        })?;
        // A compressed plan's bubble is measured against the exact step's work.
        if let (Some(planned), true) = (
            x.planned.as_mut(),
            chosen.as_ref().is_some_and(|c| !c.0.is_empty()),
        ) {
            planned
                .against_exact_step(forward, staged, (p, CPU_PROFILE, Cut::default()), &profile)
                .map_err(|e| anyhow::anyhow!("--schedule auto: {e}"))?;
        }
        return Ok(PipelinePlan {
            schedule: x.schedule,
            module: x.module,
            memory: x.memory,
            planned: x.planned,
            compress: if chosen.is_some() {
                compress
            } else {
                Compress::default()
            },
            selection: chosen,
            chunked: None,
        });
    }
    let schedule = build_schedule(&a.schedule, p, m)?;
    let n_stages = schedule.n_stages();
    // The forward cut into stages, as `autodiff` sees it (the compression candidates name its
    // values).
    let staged = stage_forward(forward, n_stages, CPU_PROFILE, Cut::default())
        .map_err(|e| anyhow::anyhow!("--stages {n_stages}: {e}"))?;
    let method = crate::train::parse_grad_method(&a.grad_method, a.tangents)?;
    let passes = cleave_passes::autodiff::methods::with_grad_method("autodiff,split-bw", &method)
        .map_err(|e| anyhow::anyhow!("--grad-method: {e}"))?;
    let compress = crate::train::parse_compress_planned(a.compress.as_deref())?.0;
    let differentiate = |compress: Compress, only: Option<&Selection>| -> Result<Module> {
        let passes = cleave_passes::autodiff::methods::with_compress_only(&passes, compress, only)
            .map_err(|e| anyhow::anyhow!("--compress: {e}"))?;
        let mut module = Module::with_function(staged.clone());
        PassManager::from_pipeline(&passes)?
            .run(&mut module, &mut PassContext::default(), &mut |_| {})
            .map_err(|e| anyhow::anyhow!("{passes}: {e}"))?;
        Ok(module)
    };
    let module = differentiate(compress, None)?;
    if schedule.reverse.is_some() && planning {
        bail!(
            "--schedule {}: recomputation and memory limits are not planned for bidirectional \
             schedules yet (each replicated stage would need its plan on both of its devices); \
             drop --remat/--memory-limit or pick a one-direction schedule",
            a.schedule
        );
    }
    if !planning {
        return Ok(PipelinePlan {
            schedule,
            module,
            memory: Vec::new(),
            planned: None,
            compress,
            selection: None,
            chunked: None,
        });
    }
    // Recomputation and offload of the saved values, per stage, under the schedule and the
    // memory limit.
    let flights = in_flight(&schedule);
    let placement = placement_of(&schedule);
    let plan_module = |module: &Module| -> Result<Attempt> {
        let planner = Planner {
            base: module,
            forward,
            placement: placement.clone(),
            n_dev: schedule.p(),
            m,
            state_copies: a.optimizer.state_copies(),
            what: format!("--remat {}", policy.name()),
            plan: Box::new(|l, reserved| {
                let mut planned = module.clone();
                let memory = plan_stages_reserved(
                    &mut planned,
                    policy,
                    l,
                    reserved,
                    &flights,
                    &placement,
                    &profile,
                )
                .map_err(|e| anyhow::anyhow!("--remat {}: {e}", policy.name()))?;
                Ok(Attempt {
                    module: planned,
                    memory,
                    schedule: schedule.clone(),
                    planned: None,
                })
            }),
        };
        plan_within(&planner, limit)
    };
    // Under a memory limit the named compressions are a choice of the plan, per value, not a
    // given: they are lossy, so the exact step is kept when it fits with nothing added, and
    // otherwise the values to compress are chosen with recomputation and offload
    // (`cleave_passes::compress::choose`).
    let added = |x: &Attempt| {
        x.memory
            .iter()
            .map(|s| s.summary.added_seconds)
            .sum::<f64>()
    };
    let (x, compress, selection) = match (compress.is_none(), limit) {
        (false, Some(_)) => {
            let cands = cleave_passes::compress::candidates(&staged, compress, &profile)
                .map_err(|e| anyhow::anyhow!("--compress: {e}"))?;
            let (x, chosen, _) = cleave_passes::compress::choose(&cands, |chosen| {
                let module = match chosen {
                    [] => differentiate(Compress::default(), None)?,
                    c => differentiate(compress, Some(&selection_of(c)))?,
                };
                let x = plan_module(&module)?;
                let step = simulated_step(&x.module, &x.memory, &x.schedule, &profile)?;
                let clean = added(&x) <= 0.0;
                Ok::<_, anyhow::Error>((x, step, clean))
            })?;
            match chosen {
                None => (x, Compress::default(), None),
                Some(sel) => (x, compress, Some(sel)),
            }
        }
        _ => (plan_module(&module)?, compress, None),
    };
    Ok(PipelinePlan {
        schedule: x.schedule,
        module: x.module,
        memory: x.memory,
        planned: None,
        compress,
        selection,
        chunked: None,
    })
}

/// The microbatches of step `step`, whose examples are `rows` (`mb` per microbatch): every data
/// column's rows and, for a forward gradient, the step's `tangents` (name, elements), the same
/// for every microbatch of the step.
pub fn microbatches(
    cols: &[crate::train::Column],
    rows: &[usize],
    mb: usize,
    tangents: &[(String, usize)],
    seed: Option<u64>,
    step: usize,
) -> Vec<BTreeMap<String, HostData>> {
    let sizes: Vec<usize> = tangents.iter().map(|(_, n)| *n).collect();
    let drawn = crate::train::draw_tangents(seed, step, &sizes);
    rows.chunks(mb)
        .map(|rows| {
            cols.iter()
                .map(|c| (c.name.clone(), gather_batch(c, rows)))
                .chain(
                    tangents
                        .iter()
                        .map(|(n, _)| n.clone())
                        .zip(drawn.iter().cloned()),
                )
                .collect()
        })
        .collect()
}

/// The examples of a pipelined run: the data columns, their count, and the split into training
/// examples and the held-out tail.
pub struct StepData {
    /// The data inputs' columns.
    pub cols: Vec<crate::train::Column>,
    /// Examples.
    pub n: usize,
    /// Training examples (the first ones).
    pub n_train: usize,
    /// Held-out examples (the tail).
    pub n_eval: usize,
}

/// Loads `--data` for a pipelined run of `forward` (microbatch `mb`, `--microbatches` of them
/// per step) and holds out its tail; too few training examples for one step is an error.
pub fn step_data(a: &TrainArgs, forward: &Function, mb: usize) -> Result<StepData> {
    let m = a.microbatches;
    let batch = m * mb;
    let (cols, n) = load_data(&a.data, forward)?;
    let n_eval = crate::train::held_out(n, batch);
    let n_train = n - n_eval;
    if n_train < batch {
        bail!(
            "{}: {n} examples leave {n_train} for training, fewer than one step's {m} \
             microbatches of {mb}",
            a.data.display()
        );
    }
    Ok(StepData {
        cols,
        n,
        n_train,
        n_eval,
    })
}

/// The final evaluation of a pipelined run on the held-out tail, as single-stage training does
/// it (when the model has `logits` and the data labels): accuracy into `summary`, a metrics line.
pub fn final_eval(
    a: &TrainArgs,
    forward: &Function,
    data: &StepData,
    mb: usize,
    params: &BTreeMap<String, HostData>,
    summary: &mut TrainSummary,
    metrics: &mut Metrics,
) -> Result<()> {
    let labels = ["labels", "targets"]
        .into_iter()
        .find(|x| data.cols.iter().any(|c| c.name == *x));
    if let (true, Some(labels)) = (
        data.n_eval >= mb && forward.output("logits").is_some(),
        labels,
    ) {
        let mut slot = None;
        let plan = eval_plan(&mut slot, forward, a.codegen)?;
        set_args(plan, params)?;
        let (acc, eval_loss) = evaluate(plan, &data.cols, labels, data.n_train, data.n, mb)?;
        summary.accuracy = Some(acc);
        metrics
            .line(serde_json::json!({"step": a.steps, "eval_loss": eval_loss, "accuracy": acc}))?;
    }
    Ok(())
}

/// The compute actions (F, B, W, BW) of each device's list in `schedule`, as the executors run
/// them (communication and offload actions are the executors' own business).
pub fn device_actions(schedule: &Schedule) -> Vec<Vec<PipelineAction>> {
    schedule
        .devices
        .iter()
        .map(|list| {
            list.iter()
                .filter_map(|x| {
                    let kind = match x.kind {
                        ActionKind::F => PipelineKind::F,
                        ActionKind::B => PipelineKind::B,
                        ActionKind::W => PipelineKind::W,
                        ActionKind::BW => PipelineKind::BW,
                        _ => return None,
                    };
                    Some(PipelineAction {
                        stage: x.stage as usize,
                        kind,
                        microbatch: x.microbatch as usize,
                    })
                })
                .collect()
        })
        .collect()
}

/// `--memory-limit` in bytes.
fn memory_limit(a: &TrainArgs) -> Result<Option<u64>> {
    a.memory_limit
        .as_deref()
        .map(parse_bytes)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--memory-limit {e}"))
}

/// The device profile of the CPU runtime (transfer and compute rates for the remat costs).
const CPU_PROFILE: &str = "cpu-epyc-2core";

fn cpu_profile() -> Result<DeviceProfile> {
    DeviceProfile::load(CPU_PROFILE).map_err(anyhow::Error::msg)
}

/// The device of each stage.
fn placement_of(schedule: &Schedule) -> Vec<usize> {
    schedule.placement.iter().map(|&d| d as usize).collect()
}

/// A pipeline built for training: the stages compiled and placed under their schedule, with the
/// plan's accounting (what [`train`] and [`crate::session`] run).
pub struct BuiltPipeline {
    /// The executor.
    pub pipe: Pipeline,
    /// Its schedule.
    pub schedule: Schedule,
    /// The split module it was compiled from.
    pub module: Module,
    /// Per stage, the recomputation/offload plan.
    pub memory: Vec<StageMemory>,
    /// The joint planner's result, when it chose.
    pub planned: Option<Box<Planned>>,
    /// Bytes each stage keeps per microbatch in flight (M_B after F, M_W after B).
    pub stash_memory: Memory,
    /// The plan's accounting of every device.
    pub planned_devices: Vec<DeviceAccount>,
    /// `--memory-limit` in bytes.
    pub limit: Option<u64>,
    /// The schedule's number of stages.
    pub n_stages: usize,
    /// The output layer's row chunks the plan took (`--compress chunked[:K]`; `None`: whole).
    pub chunked: Option<usize>,
}

/// Plans, splits and compiles `forward` for the pipeline `a` names ([`pipeline_plan`]); prints
/// the planner's choice unless `quiet`; `fail_at` is `--fail-action`.
pub fn build_pipeline(
    a: &TrainArgs,
    forward: &cleave_ir::Function,
    quiet: bool,
    fail_at: Option<PipelineAction>,
) -> Result<BuiltPipeline> {
    let m = a.microbatches;
    let PipelinePlan {
        schedule,
        module,
        memory,
        planned,
        compress,
        selection,
        chunked,
    } = pipeline_plan(a, forward)?;
    let n_stages = schedule.n_stages();
    if let (Some(_), Some(_), false) = (&a.compress, &a.memory_limit, quiet) {
        let added: f64 = memory.iter().map(|s| s.summary.added_seconds).sum();
        eprintln!(
            "plan: {} under --memory-limit (added {added:.6} s of recomputation and transfers)",
            match (&selection, compress.is_none()) {
                (_, true) => "the exact backward fits, no lossy --compress method used".to_string(),
                (Some(sel), false) => {
                    let mut per: BTreeMap<&str, usize> = BTreeMap::new();
                    for (_, m) in &sel.0 {
                        *per.entry(m.name()).or_default() += 1;
                    }
                    format!(
                        "--compress chosen for {} value(s) ({}; `cleave inspect --memory \
                         --compress` lists them)",
                        sel.0.len(),
                        per.iter()
                            .map(|(m, n)| format!("{m} ×{n}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }
                (None, false) => format!("--compress chosen ({})", compress.pass_options()),
            }
        );
        if !crate::train::parse_compress_planned(a.compress.as_deref())?
            .1
            .is_empty()
        {
            eprintln!(
                "plan: {}",
                match chunked {
                    Some(k) => format!("the output layer runs in {k} row chunks (chunked chosen)"),
                    None => "the output layer runs whole (chunked not needed)".to_string(),
                }
            );
        }
    }
    if let (Some(x), false) = (&planned, quiet) {
        eprintln!(
            "plan: schedule {} chosen with recomputation/offload (simulated on the {CPU_PROFILE} \
             profile: makespan {:.6} s, effective bubble rate {:.4})",
            x.origin,
            x.sim.makespan,
            x.effective_bubble_rate()
        );
    }
    let split = split_stages(&module);
    if split.len() != n_stages {
        bail!(
            "{}: partitioning gave {} stages, the schedule `{}` needs {n_stages}",
            a.model.display(),
            split.len(),
            a.schedule
        );
    }
    // Bytes each stage keeps per microbatch in flight: M_B after F, M_W after B.
    let stash_memory = Memory {
        stages: split
            .iter()
            .map(|s| {
                let r = stash_report(s);
                cleave_passes::schedule::StageMemory {
                    m_b: (r.f_to_b + r.f_to_w) as f64,
                    m_w: (r.f_to_w + r.b_to_w) as f64,
                }
            })
            .collect(),
    };
    let opts = CompileOptions {
        fuse: true,
        preserve_args: false,
        jit: true,
        codegen: a.codegen,
    };
    let compile_stage = |s: &cleave_passes::split::SplitStage<'_>| -> Result<StagePlans> {
        Ok(StagePlans {
            f: compile_with(s.f, &opts)?,
            b: compile_with(s.b, &opts)?,
            w: compile_with(s.w, &opts)?,
        })
    };
    let mut plans = Vec::new();
    for s in &split {
        plans.push(compile_stage(s)?);
    }
    // A bidirectional schedule's replicated stages: a second compilation each, on the
    // replica's device.
    let mut replicas = BTreeMap::new();
    if let Some(r) = &schedule.reverse {
        for (i, s) in split.iter().enumerate() {
            if r.placement[i] != schedule.placement[i] {
                replicas.insert(i, compile_stage(s)?);
            }
        }
    }
    // The plan's accounting of every device, with the compiled plans' workspace.
    let limit = memory_limit(a)?;
    let placement_v = placement_of(&schedule);
    let n_dev = schedule.p();
    let planned_devices = {
        let ws = workspace_of(&split)?;
        let resident = stage_resident(&split, &ws, forward, m, a.optimizer.state_copies());
        let saved: Vec<u64> = if memory.is_empty() {
            saved_need(&split, &in_flight(&schedule), &cpu_profile()?)?
        } else {
            memory.iter().map(|s| s.summary.need_bytes).collect()
        };
        // A bidirectional schedule's replicas hold their stage's weights, accumulators,
        // buffers and saved values again, on their own devices.
        let (mut resident, mut saved, mut at) = (resident, saved, placement_v.clone());
        if let Some(r) = &schedule.reverse {
            for i in 0..n_stages {
                if r.placement[i] != schedule.placement[i] {
                    resident.push(resident[i]);
                    saved.push(saved.get(i).copied().unwrap_or(0));
                    at.push(r.placement[i] as usize);
                }
            }
        }
        per_device(&resident, &saved, &at, n_dev)
    };
    let actions = device_actions(&schedule);
    if let Some(f) = fail_at {
        if !actions.iter().flatten().any(|x| *x == f) {
            bail!(
                "--fail-action {f}: the schedule `{}` has no such action",
                a.schedule
            );
        }
    }
    let placement = schedule.placement.iter().map(|&d| d as usize).collect();
    let pipe = match &schedule.reverse {
        None => Pipeline::new(plans, placement, actions, m),
        Some(r) => Pipeline::with_replicas(
            plans,
            placement,
            r.placement.iter().map(|&d| d as usize).collect(),
            r.microbatches.clone(),
            replicas,
            actions,
            m,
        ),
    }
    .map_err(|e| anyhow::anyhow!("schedule `{}`: {e}", a.schedule))?;
    Ok(BuiltPipeline {
        pipe,
        schedule,
        module,
        memory,
        planned,
        stash_memory,
        planned_devices,
        limit,
        n_stages,
        chunked,
    })
}

/// The initial parameters of `forward` with their shapes: initialised by name from `seed`, then
/// the values stored in the model file; then those only the split stage functions of `module`
/// have (a gradient method's auxiliary heads, `local.head*`), initialised by name from `seed`
/// function by function.
pub fn initial_params(
    forward: &cleave_ir::Function,
    loaded: &crate::load::LoadedModel,
    seed: Option<u64>,
    module: &Module,
) -> Result<crate::train::State> {
    let mut init = init_params(forward, seed.unwrap_or(0));
    init.extend(loaded.params.clone());
    let mut params = crate::train::State::new();
    for x in forward.params() {
        let t = init
            .get(x.name)
            .with_context(|| format!("no initial value for parameter `{}`", x.name))?;
        params.insert(
            x.name.to_string(),
            (
                x.ty.shape.clone(),
                cleave_runtime::host_from_tensor(t).context("parameters must be f32")?,
            ),
        );
    }
    for f in &module.functions {
        if f.params().all(|x| params.contains_key(x.name)) {
            continue;
        }
        let init = init_params(f, seed.unwrap_or(0));
        for x in f.params() {
            if !params.contains_key(x.name) {
                let d = cleave_runtime::host_from_tensor(&init[x.name])
                    .context("parameters must be f32")?;
                params.insert(x.name.to_string(), (x.ty.shape.clone(), d));
            }
        }
    }
    Ok(params)
}

/// Post-update validation of a step (`--grad-clip`; the Zero Bubble paper's way of stepping
/// the optimizer without a global barrier): every stage has already applied `p − lr·(s·g)`
/// (`s` the step's `grad_scale`) as soon as its own gradients were complete; only now, with all
/// of them, is the global norm `‖s·g‖` known. Above the limit, each updated parameter is
/// recomputed from its previous value `old` with the clipped gradient, `p − lr·((s·c)·g)`; a
/// rolled-back step (`factor` `None`) puts every parameter back to `old`.
fn validate_update(
    updated: &mut BTreeMap<String, HostData>,
    grads: &BTreeMap<String, HostData>,
    old: &BTreeMap<String, HostData>,
    factor: Option<f32>,
    opts: &PipelineOptions,
) {
    if factor == Some(1.0) {
        return;
    }
    let s = opts.grad_scale as f64;
    for (name, p) in updated.iter_mut() {
        let (Some(HostData::F32(x)), Some(HostData::F32(g))) = (old.get(name), grads.get(name))
        else {
            continue;
        };
        *p = HostData::F32(match factor {
            Some(c) => {
                let f = (s * c as f64) as f32;
                x.iter()
                    .zip(g)
                    .map(|(&x, &g)| x - opts.lr * (f * g))
                    .collect()
            }
            None => x.clone(),
        });
    }
}

/// Finishes a pipeline step: with `clip` (`--grad-clip`), the step's global gradient norm
/// decides the clip factor ([`clip_factor`]); SGD's stage updates are then validated, or another
/// optimizer's update applied ([`Updater`]), and the new values moved into `params`. Returns the
/// norm when there is a limit (it is computed only then).
pub fn finish_step(
    r: &mut cleave_runtime::pipeline::StepResult,
    params: &mut BTreeMap<String, HostData>,
    updater: Option<&mut Updater>,
    clip: Option<f64>,
    opts: &PipelineOptions,
) -> Result<Option<f64>> {
    finish_scaled_step(r, params, updater, clip, opts, None)
}

/// [`finish_step`] of a step whose gradients carry the loss scale `loss_scale`
/// (`--precision f16`): `opts.grad_scale` already divides it out of the stages' SGD, an
/// [`Updater`] divides it out here, and a non-finite gradient rolls the step back even without
/// a clip (the norm is then always computed and returned).
pub fn finish_scaled_step(
    r: &mut cleave_runtime::pipeline::StepResult,
    params: &mut BTreeMap<String, HostData>,
    updater: Option<&mut Updater>,
    clip: Option<f64>,
    opts: &PipelineOptions,
    loss_scale: Option<f32>,
) -> Result<Option<f64>> {
    let clip = match (clip, loss_scale) {
        (None, Some(_)) => Some(f64::INFINITY),
        (c, _) => c,
    };
    let (norm, factor) = match clip {
        None => (None, Some(1.0)),
        Some(c) => {
            let (norm, factor) = clip_factor(&r.grads, c, opts);
            (Some(norm), factor)
        }
    };
    match updater {
        None => validate_update(&mut r.params, &r.grads, params, factor, opts),
        Some(u) => {
            let factor = factor.map(|c| c / loss_scale.unwrap_or(1.0));
            u.apply(params, &r.grads, factor)?
        }
    }
    params.extend(std::mem::take(&mut r.params));
    Ok(norm)
}

/// What [`update_step`] did to one step: the gradient norm where one was computed, and under
/// `--precision f16` the loss scale the step ran with and whether the step was kept.
#[derive(Clone, Copy, Debug)]
pub struct StepUpdate {
    /// [`finish_scaled_step`]'s norm.
    pub norm: Option<f64>,
    /// (scale used, whether the step was kept).
    pub scaled: Option<(f32, bool)>,
}

impl StepUpdate {
    /// Its keys of the step's metrics line: `grad_norm`, `loss_scale` and `skipped`.
    pub fn metrics(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        if let Some(n) = self.norm {
            m.insert("grad_norm".into(), n.into());
        }
        if let Some((used, kept)) = self.scaled {
            m.insert("loss_scale".into(), used.into());
            m.insert("skipped".into(), (!kept).into());
        }
        m
    }
}

/// The end of pipelined step `step` of mean loss `loss`, shared by the thread and the stage
/// pipelines: the loss checks (a forward overflow under a loss scale, then any loss that is not
/// finite), the update ([`finish_scaled_step`]), the loss scale's record of it, and (unless
/// `quiet`) a warning for a step rolled back without a loss scale.
#[allow(clippy::too_many_arguments)]
pub fn update_step(
    (step, loss): (usize, f64),
    r: &mut cleave_runtime::pipeline::StepResult,
    params: &mut BTreeMap<String, HostData>,
    updater: Option<&mut Updater>,
    clip: Option<f64>,
    opts: &PipelineOptions,
    scaler: Option<&mut LossScaler>,
    quiet: bool,
) -> Result<StepUpdate> {
    if scaler.is_some() {
        LossScaler::check_loss(step, loss)?;
    }
    if !loss.is_finite() {
        bail!("loss is {loss} at step {step}; training stopped");
    }
    let scale = scaler.as_ref().map(|s| s.scale);
    let norm = finish_scaled_step(r, params, updater, clip, opts, scale)?;
    let scaled = match scaler {
        Some(s) => Some((s.scale, s.record(step, norm)?)),
        None => None,
    };
    if let (Some(n), false, None) = (norm.filter(|n| !n.is_finite()), quiet, scaled) {
        eprintln!("\nwarning: step {step}: the gradient norm is {n}; the update was rolled back");
    }
    Ok(StepUpdate { norm, scaled })
}

/// The global norm of a step's mean-loss gradient `‖s·g‖` (summed in f64 over the parameters in
/// name order, so every rank and stage count computes the same) and the factor its gradient
/// sums take under the limit `clip`: 1 within it, `clip/‖s·g‖` above it, and `None` (roll the
/// step back) when the norm is not finite.
pub fn clip_factor(
    grads: &BTreeMap<String, HostData>,
    clip: f64,
    opts: &PipelineOptions,
) -> (f64, Option<f32>) {
    let s = opts.grad_scale as f64;
    let mut sq = 0.0f64;
    for g in grads.values() {
        if let HostData::F32(g) = g {
            sq += g.iter().map(|&x| (s * x as f64).powi(2)).sum::<f64>();
        }
    }
    let norm = sq.sqrt();
    let factor = if !norm.is_finite() {
        None
    } else if norm > clip {
        Some((clip / norm) as f32)
    } else {
        Some(1.0)
    };
    (norm, factor)
}

/// The dynamic loss scale of `--precision f16` (Micikevicius et al., "Mixed Precision
/// Training"; PyTorch's `GradScaler` defaults): the step's backward is seeded with `scale`; a
/// step whose gradients are not finite is rolled back and the scale halved; after `window`
/// finite steps in a row it doubles (never past 2²⁴, nor below 2⁻²⁴).
#[derive(Clone, Debug, PartialEq)]
pub struct LossScaler {
    /// The scale of the next step.
    pub scale: f32,
    /// Finite steps in a row after which the scale doubles (0: never).
    pub window: usize,
    /// Finite steps since the scale last changed.
    pub good: usize,
    /// Steps rolled back so far.
    pub skipped: usize,
}

impl LossScaler {
    /// The smallest scale (2⁻²⁴); a step that overflows there is an error.
    pub const MIN: f32 = 1.0 / 16_777_216.0;
    /// The largest scale (2²⁴).
    pub const MAX: f32 = 16_777_216.0;

    /// `--loss-scale` and `--loss-scale-window`; the scale must be a positive finite number.
    pub fn new(scale: f64, window: usize) -> Result<Self> {
        if !(scale.is_finite() && scale > 0.0) {
            bail!("--loss-scale {scale}: the loss scale must be a positive finite number");
        }
        Ok(LossScaler {
            scale: scale as f32,
            window,
            good: 0,
            skipped: 0,
        })
    }

    /// The scaler of `a`'s `--precision f16` (`None` under any other precision).
    pub fn for_args(a: &TrainArgs) -> Result<Option<Self>> {
        (crate::train::parse_precision(a.precision.as_deref())?
            == cleave_passes::precision::Precision::F16)
            .then(|| LossScaler::new(a.loss_scale, a.loss_scale_window))
            .transpose()
    }

    /// The scale as the data input `precision.loss_scale` of every microbatch.
    pub fn input(&self) -> HostData {
        HostData::F32(vec![self.scale])
    }

    /// `popts` for a step under this scale: the gradient sums carry it, so the stages' SGD
    /// scales them by `1/(M·S)` (exact for a power of two).
    pub fn options(&self, popts: &PipelineOptions, microbatches: usize) -> PipelineOptions {
        PipelineOptions {
            grad_scale: (1.0 / (microbatches as f64 * self.scale as f64)) as f32,
            ..popts.clone()
        }
    }

    /// An error for a step's loss that is not finite: under f16 the forward overflowed, which
    /// no loss scale changes.
    pub fn check_loss(step: usize, loss: f64) -> Result<()> {
        if !loss.is_finite() {
            bail!(
                "loss is {loss} at step {step}; training stopped: the forward overflowed f16 \
                 (a GEMM result beyond ±65504, which no loss scale changes); use --precision \
                 bf16, whose range is f32's"
            );
        }
        Ok(())
    }

    /// Records step `step` from its gradient norm (`finish_scaled_step`'s result; a norm that
    /// is not finite means the step was rolled back) and returns whether it was kept. Gradients
    /// not finite at the smallest scale are an error.
    pub fn record(&mut self, step: usize, norm: Option<f64>) -> Result<bool> {
        let finite = norm.is_none_or(f64::is_finite);
        if !finite && self.scale <= Self::MIN {
            bail!(
                "step {step}: the gradients are not finite even at the smallest loss scale \
                 ({:e}): not an f16 range problem (check the model and --lr, or train in f32 \
                 with --debug-nan)",
                self.scale
            );
        }
        self.update(finite);
        Ok(finite)
    }

    /// The scale and its count of finite steps, for a checkpoint's metadata.
    pub fn save(&self, meta: &mut HashMap<String, String>) {
        meta.insert("loss_scale".into(), self.scale.to_string());
        meta.insert("loss_scale_good".into(), self.good.to_string());
    }

    /// Continues from a checkpoint's metadata (read from `dir`), where it has the keys.
    pub fn restore(&mut self, meta: &HashMap<String, String>, dir: &Path) -> Result<()> {
        let bad = |key: &str, v: &str| {
            anyhow::anyhow!("{}: bad {key} `{v}` in the checkpoint", dir.display())
        };
        if let Some(v) = meta.get("loss_scale") {
            let scale: f64 = v.parse().map_err(|_| bad("loss_scale", v))?;
            self.scale = LossScaler::new(scale, self.window)
                .map_err(|_| bad("loss_scale", v))?
                .scale;
        }
        if let Some(v) = meta.get("loss_scale_good") {
            self.good = v.parse().map_err(|_| bad("loss_scale_good", v))?;
        }
        Ok(())
    }

    /// Records a step: `finite` is whether its gradients were finite (it was kept).
    pub fn update(&mut self, finite: bool) {
        if finite {
            self.good += 1;
            if self.window > 0 && self.good >= self.window {
                self.scale = (self.scale * 2.0).min(Self::MAX);
                self.good = 0;
            }
        } else {
            self.skipped += 1;
            self.scale = (self.scale * 0.5).max(Self::MIN);
            self.good = 0;
        }
    }
}

/// The options of a training step on the pipeline: SGD at `lr` applied by the stages (off for
/// the optimizers an [`Updater`] applies), gradients scaled by `1/M`.
pub fn step_options(a: &TrainArgs, lr: f64) -> PipelineOptions {
    PipelineOptions {
        lr: lr as f32,
        grad_scale: 1.0 / a.microbatches as f32,
        update: a.optimizer == OptimizerArg::Sgd,
        ..PipelineOptions::default()
    }
}

/// What pipelined training keeps between steps: every parameter and optimizer-state tensor by
/// name, their shapes (what a checkpoint holds), and the updater of an optimizer other than
/// SGD.
pub struct PipelineState {
    /// Parameters, and the optimizer's `opt.*` state.
    pub params: BTreeMap<String, HostData>,
    /// The shape of each entry of `params`.
    pub shapes: BTreeMap<String, Vec<usize>>,
    /// Momentum's or AdamW's update (`None` for SGD, which the stages apply themselves).
    pub updater: Option<Updater>,
}

impl PipelineState {
    /// The initial state: [`initial_params`], and `a`'s optimizer's state and updater.
    pub fn new(
        a: &TrainArgs,
        lr: f64,
        forward: &cleave_ir::Function,
        loaded: &crate::load::LoadedModel,
        module: &Module,
    ) -> Result<PipelineState> {
        let mut state = initial_params(forward, loaded, a.seed, module)?;
        let mut updater = None;
        if a.optimizer != OptimizerArg::Sgd {
            let shapes = state
                .iter()
                .map(|(k, (s, _))| (k.clone(), s.clone()))
                .collect();
            let (u, opt_state) = Updater::new(
                &shapes,
                a.optimizer,
                lr,
                1.0 / a.microbatches as f32,
                a.codegen,
            )?;
            state.extend(opt_state);
            updater = Some(u);
        }
        let shapes = state
            .iter()
            .map(|(k, (s, _))| (k.clone(), s.clone()))
            .collect();
        let params = state.into_iter().map(|(k, (_, d))| (k, d)).collect();
        Ok(PipelineState {
            params,
            shapes,
            updater,
        })
    }
}

/// `params` with their `shapes`: the state a checkpoint holds.
pub fn with_shapes(
    shapes: &BTreeMap<String, Vec<usize>>,
    params: &BTreeMap<String, HostData>,
) -> crate::train::State {
    shapes
        .iter()
        .map(|(k, shape)| (k.clone(), (shape.clone(), params[k].clone())))
        .collect()
}

/// Momentum and AdamW on the pipeline executor: the stages only accumulate
/// ([`PipelineOptions::update`] off) and, after the step, one compiled program applies the
/// update to every parameter: the `optimizer` pass (the same IR as the one-stage step's update)
/// over `grad.<p> = (1/M)·Σ g`, with the optimizer's state (`opt.m.<p>`, `opt.v.<p>`,
/// `opt.step`, `opt.momentum.<p>`) kept beside the parameters, so that checkpoints hold it in
/// the one-stage format. Unlike SGD, the update waits for the whole step.
pub struct Updater {
    plan: cleave_runtime::Plan,
    /// The parameters it updates, by name.
    names: Vec<String>,
}

impl Updater {
    /// The update program for `params` (name → shape) under `opt` at `lr`, with gradient sums
    /// scaled by `scale`; returns it and the optimizer state's initial values with their shapes
    /// (zeros; `opt.step` 1).
    pub fn new(
        params: &BTreeMap<String, Vec<usize>>,
        opt: OptimizerArg,
        lr: f64,
        scale: f32,
        codegen: Codegen,
    ) -> Result<(Updater, crate::train::State)> {
        let mut t = cleave_ir::tracer::Tracer::new("update");
        let trace = |e: cleave_ir::tracer::TraceError| anyhow::anyhow!("the update program: {e}");
        for (name, shape) in params {
            t.param(name, DType::F32, shape.clone()).map_err(trace)?;
            let sum = t
                .input(&format!("sum.{name}"), DType::F32, shape.clone())
                .map_err(trace)?;
            let s = t
                .constant_f(DType::F32, shape.clone(), scale as f64)
                .map_err(trace)?;
            let g = t.binary(BinaryOp::Mul, sum, s).map_err(trace)?;
            t.output(&format!("grad.{name}"), g).map_err(trace)?;
        }
        let mut module = Module::with_function(t.finish());
        let pipeline = format!("optimizer{{kind={},lr={lr}}}", opt.name());
        PassManager::from_pipeline(&pipeline)?
            .run(&mut module, &mut PassContext::default(), &mut |_| {})
            .map_err(|e| anyhow::anyhow!("{pipeline}: {e}"))?;
        let f = &module.functions[0];
        let mut state = crate::train::State::new();
        for arg in f.args().filter(|x| x.name.starts_with("opt.")) {
            let n = arg.ty.num_elements();
            let v = if arg.name == "opt.step" { 1.0 } else { 0.0 };
            state.insert(
                arg.name.to_string(),
                (arg.ty.shape.clone(), HostData::F32(vec![v; n])),
            );
        }
        let plan = compile_with(
            f,
            &CompileOptions {
                fuse: true,
                preserve_args: true,
                jit: true,
                codegen,
            },
        )?;
        let names = params.keys().cloned().collect();
        Ok((Updater { plan, names }, state))
    }

    /// Updates `params` (which holds the optimizer state too) from the step's gradient sums
    /// scaled by `factor` (see [`clip_factor`]; `None` leaves everything as it was: the step is
    /// rolled back).
    pub fn apply(
        &mut self,
        params: &mut BTreeMap<String, HostData>,
        grads: &BTreeMap<String, HostData>,
        factor: Option<f32>,
    ) -> Result<()> {
        let Some(c) = factor else {
            return Ok(());
        };
        for name in &self.names {
            let p = &params[name];
            crate::train::set_args(&mut self.plan, [(name.as_str(), p)])?;
            let sum = format!("sum.{name}");
            match (grads.get(name), p) {
                (Some(HostData::F32(g)), _) if c != 1.0 => {
                    let clipped = HostData::F32(g.iter().map(|&x| c * x).collect());
                    crate::train::set_args(&mut self.plan, [(sum, clipped)])?;
                }
                (Some(g), _) => crate::train::set_args(&mut self.plan, [(sum, g)])?,
                // A parameter the step gives no gradient (unused by the loss).
                (None, p) => {
                    let zeros = HostData::F32(vec![0.0; p.len()]);
                    crate::train::set_args(&mut self.plan, [(sum, zeros)])?;
                }
            }
        }
        crate::train::set_args(
            &mut self.plan,
            params.iter().filter(|(k, _)| k.starts_with("opt.")),
        )?;
        self.plan
            .run()
            .map_err(|e| anyhow::anyhow!("the optimizer update: {e}"))?;
        for (i, o) in self.plan.outputs().iter().enumerate() {
            params.insert(o.name.clone(), self.plan.output(i));
        }
        Ok(())
    }
}

/// The step pipelined training is at (what a rank ended from outside reports).
static STEP: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Under an MPI launcher: when another rank dies, `mpirun` ends the others with SIGTERM (after
/// SIGCONT). This rank then says where it was (the step, and the stage and action its device
/// started last) before it exits, so the job's output names every rank's position; the
/// launcher's own message names the rank that died. Checkpoints are written atomically, so the
/// last one stays valid.
#[cfg(feature = "mpi")]
fn report_termination(rank: usize) -> Result<()> {
    use signal_hook::consts::SIGTERM;
    let mut signals =
        signal_hook::iterator::Signals::new([SIGTERM]).context("installing the SIGTERM handler")?;
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            let step = STEP.load(std::sync::atomic::Ordering::Relaxed);
            let at = match cleave_runtime::pipeline::current_action() {
                Some((_, x)) => format!("stage {}, action {x}", x.stage),
                None => "before its first action".to_string(),
            };
            eprintln!(
                "error: rank {rank}: ended by the MPI launcher (SIGTERM) in step {step}, at \
                 {at}: another rank of the job ended first (the launcher names it)"
            );
            std::process::exit(143);
        }
    });
    Ok(())
}

/// The forward-gradient tangent inputs of a step built from `forward` with `method` (name and
/// element count), in the order the one-stage trainer draws them; empty for other methods.
pub fn tangent_inputs(forward: &Function, method: &GradMethod) -> Vec<(String, usize)> {
    let GradMethod::ForwardGradient { tangents } = *method else {
        return Vec::new();
    };
    (0..tangents)
        .flat_map(|k| {
            forward
                .args()
                .filter(|x| x.role == ArgRole::Param && x.ty.dtype.is_float())
                .map(move |x| {
                    (
                        format!("{FG_TANGENT_PREFIX}{k}.{}", x.name),
                        x.ty.num_elements(),
                    )
                })
        })
        .collect()
}

/// Where a pipelined run's batch comes from, in [`crate::train::restore_checkpoint`]'s
/// message.
pub const RESUMED_BATCH: &str = " (--microbatches × the model's batch)";

/// Runs pipelined training (see the module docs).
pub fn train(a: &TrainArgs) -> Result<PipelineRun> {
    let (p, m) = (a.stages, a.microbatches);
    if p == 0 || m == 0 {
        bail!("--stages and --microbatches must be at least 1");
    }
    if a.debug_nan {
        bail!("pipelined training (--stages/--microbatches) does not support --debug-nan yet");
    }
    // One process per device under an MPI launcher (`mpirun -np P`, the `mpi` feature):
    // this process runs device `rank`; only rank 0 prints and writes metrics.
    #[cfg(feature = "mpi")]
    let world = cleave_runtime::mpi_remote::init().map_err(|e| anyhow::anyhow!("MPI: {e}"))?;
    #[cfg(feature = "mpi")]
    let remote: Option<&dyn Remote> = world.as_ref().map(|w| w as &dyn Remote);
    #[cfg(not(feature = "mpi"))]
    let remote: Option<&dyn Remote> = None;
    let rank = remote.map_or(0, |r| r.device());
    let quiet = a.quiet || rank != 0;
    #[cfg(feature = "mpi")]
    if remote.is_some() {
        report_termination(rank)?;
    }
    if let Some(r) = remote {
        if r.devices() != p {
            bail!(
                "{} MPI processes for --stages {p}: launch one process per device \
                 (`mpirun -np {p} …`)",
                r.devices()
            );
        }
    }
    let lr = a.lr.unwrap_or(a.optimizer.default_lr());
    let fail_at = a
        .fail_action
        .as_deref()
        .map(parse_fail_action)
        .transpose()?;
    let kill_at = a
        .kill_action
        .as_deref()
        .map(|text| -> Result<(usize, PipelineAction)> {
            let (step, action) = match text.split_once(':') {
                Some((s, x)) => (
                    s.parse()
                        .with_context(|| format!("--kill-action {text}: bad step `{s}`"))?,
                    x,
                ),
                None => (0, text),
            };
            Ok((step, parse_fail_action(action)?))
        })
        .transpose()?;
    if let (Precision::F16, GradMethod::ForwardGradient { .. }) = (
        crate::train::parse_precision(a.precision.as_deref())?,
        crate::train::parse_grad_method(&a.grad_method, a.tangents)?,
    ) {
        bail!(
            "--precision f16 scales the backward's seed, and --grad-method forward-gradient has \
             no backward: use bp, fa, dfa or local with f16, or bf16 with forward-gradient"
        );
    }
    let crate::train::TrainingModel {
        loaded,
        forward,
        traced: mb,
    } = crate::train::load_training_model_for(a)?;
    if let Some(b) = a.batch {
        if b != mb {
            bail!(
                "--batch {b}: {} was traced at batch {mb}, which is the microbatch of pipelined \
                 training (a step reads --microbatches × {mb} examples)",
                a.model.display()
            );
        }
    }
    let step_forward = crate::train::training_forward(&forward, a.chunk_lm_head)?;
    let tangents = tangent_inputs(
        &step_forward,
        &crate::train::parse_grad_method(&a.grad_method, a.tangents)?,
    );
    let BuiltPipeline {
        mut pipe,
        schedule,
        module,
        memory,
        planned,
        stash_memory,
        planned_devices,
        limit,
        n_stages,
        chunked,
    } = build_pipeline(a, &step_forward, quiet, fail_at)?;
    // Every rank must run the same plan: its fingerprint (the stage programs, the schedule and
    // the step's settings) is compared across ranks before the first step.
    if let Some(r) = remote {
        let text = format!(
            "{module}\n{}\n{m} {} {lr} {:?} {:?} {:?} {} {}",
            schedule.to_json(),
            a.steps,
            a.seed,
            a.data,
            a.precision,
            a.loss_scale,
            a.loss_scale_window
        );
        let mut h: u64 = 0xcbf29ce484222325;
        for b in text.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x100000001b3);
        }
        let all = r
            .all_gather(h.to_le_bytes().to_vec())
            .map_err(|e| anyhow::anyhow!("MPI: comparing the ranks' plans: {e}"))?;
        if let Some(other) = all.iter().position(|x| x[..] != h.to_le_bytes()[..]) {
            bail!(
                "rank {rank}: the plan of rank {other} differs from this rank's (a different \
                 model file, flags or build): launch every rank with the same command"
            );
        }
    }
    let PipelineState {
        mut params,
        shapes,
        mut updater,
    } = PipelineState::new(a, lr, &forward, &loaded, &module)?;

    // Data.
    let batch = m * mb;
    let StepData {
        cols,
        n,
        n_train,
        n_eval,
    } = step_data(a, &forward, mb)?;
    let mut order = Order::new(n_train, a.seed);
    // Checkpoints: every parameter by name with the step (SGD keeps no other state), the format
    // of one-stage checkpoints; a run with threads and one with a process per device read each
    // other's (rank 0 writes them).
    let method = crate::train::parse_grad_method(&a.grad_method, a.tangents)?;
    // The parameters with their shapes: what a checkpoint holds.
    let state_of = |params: &BTreeMap<String, HostData>| with_shapes(&shapes, params);
    let mut start = 0usize;
    // `--precision f16`: the dynamic loss scale.
    let mut scaler = LossScaler::for_args(a)?;
    if let Some(dir) = &a.resume {
        let mut state = state_of(&params);
        let (step, meta) = crate::train::restore_checkpoint(
            dir,
            &mut state,
            (batch, RESUMED_BATCH),
            &a.optimizer,
            "this run",
        )?;
        if let Some(s) = scaler.as_mut() {
            // The scale and its count of finite steps continue where the run stopped.
            s.restore(&meta, dir)?;
        }
        params.extend(state.into_iter().map(|(name, (_, d))| (name, d)));
        start = step;
    }
    let write_ckpt = |done: usize,
                      params: &BTreeMap<String, HostData>,
                      scaler: Option<&LossScaler>|
     -> Result<()> {
        let (Some(dir), 0) = (&a.checkpoint, rank) else {
            return Ok(());
        };
        if !(done.is_multiple_of(a.checkpoint_every.max(1)) || done == a.steps) {
            return Ok(());
        }
        let state = state_of(params);
        let mut meta = crate::train::checkpoint_meta(a, done, batch, lr, &method);
        meta.insert("microbatches".into(), m.to_string());
        if let Some(s) = scaler {
            s.save(&mut meta);
        }
        crate::train::write_checkpoint(dir, &state, meta)
    };
    let mut metrics = Metrics::open(if rank == 0 {
        a.metrics.as_deref()
    } else {
        None
    })?;
    // --memory-limit and --timeline measure when the allocator is installed (it is this crate's
    // global allocator, so in `cleave` and the compiled executables); --memory-report needs it.
    let installed = cleave_runtime::alloc::installed();
    if a.memory_report && !installed {
        bail!(
            "--memory-report measures memory with the instrumented allocator, which this \
             program has not installed (cleave_runtime::alloc::CountingAlloc)"
        );
    }
    let measure =
        installed && (a.memory_report || a.memory_limit.is_some() || a.timeline.is_some());
    let popts = PipelineOptions {
        fail_at,
        measure_memory: measure,
        ..step_options(a, lr)
    };
    let mut measured_peak: Vec<u64> = Vec::new();
    let mut measured_host: Vec<u64> = Vec::new();
    let mut transfers = Vec::new();
    let mut summary = TrainSummary::default();
    let mut losses = Vec::new();
    let mut timeline = Vec::new();
    let mut measured = Vec::new();
    let mut peak: Vec<u64> = Vec::new();
    let mut offloaded: Vec<u64> = Vec::new();
    let t0 = Instant::now();
    for step in start..a.steps {
        let rows = order.rows(step, batch);
        let mut micro = microbatches(&cols, &rows, mb, &tangents, a.seed, step);
        if let Some(s) = &scaler {
            for x in &mut micro {
                x.insert(cleave_passes::autodiff::LOSS_SCALE_INPUT.into(), s.input());
            }
        }
        let micro: Vec<BTreeMap<String, HostSlice<'_>>> = micro
            .iter()
            .map(|mb| mb.iter().map(|(k, d)| (k.clone(), d.as_slice())).collect())
            .collect();
        STEP.store(step, std::sync::atomic::Ordering::Relaxed);
        let scaled;
        let popts = match &scaler {
            Some(s) => {
                scaled = s.options(&popts, m);
                &scaled
            }
            None => &popts,
        };
        let killing;
        let popts = match kill_at {
            Some((s, x)) if s == step => {
                killing = PipelineOptions {
                    kill_at: Some(x),
                    ..popts.clone()
                };
                &killing
            }
            _ => popts,
        };
        let mut r = match remote {
            Some(remote) => match pipe.step_remote(&params, &micro, popts, remote) {
                Ok(r) => Ok(r),
                Err(e) => {
                    // The other ranks may wait for this one's values: end the whole job.
                    eprintln!("error: rank {rank}: step {step}: {e}");
                    remote.abort(1)
                }
            },
            None => pipe.step(&params, &micro, popts),
        }
        .map_err(|e| anyhow::anyhow!("step {step}: {e}"))?;
        let loss = r.losses.iter().map(|&x| x as f64).sum::<f64>() / m as f64;
        let update = update_step(
            (step, loss),
            &mut r,
            &mut params,
            updater.as_mut(),
            a.grad_clip,
            popts,
            scaler.as_mut(),
            quiet,
        )?;
        peak.resize(r.peak_saved_bytes.len(), 0);
        for (p, &x) in peak.iter_mut().zip(&r.peak_saved_bytes) {
            *p = (*p).max(x);
        }
        offloaded = r.offloaded_bytes.clone();
        for (acc, now) in [
            (&mut measured_peak, &r.measured_peak_bytes),
            (&mut measured_host, &r.measured_host_peak_bytes),
        ] {
            acc.resize(now.len(), 0);
            for (p, &x) in acc.iter_mut().zip(now) {
                *p = (*p).max(x);
            }
        }
        if step + 1 == a.steps {
            transfers = overlap_report(&r.timeline, &r.transfers);
        }
        if a.timeline.is_some() {
            measured.push(r.timeline.clone());
            timeline.push(serde_json::json!({
                "step": step,
                "actions": r.timeline.iter().map(|t| serde_json::json!({
                    "device": t.device,
                    "action": t.action.to_string(),
                    "start_s": t.start_s,
                    "end_s": t.end_s,
                })).collect::<Vec<_>>(),
            }));
        }
        losses.push(loss);
        summary.final_loss = Some(loss);
        summary.steps_run += 1;
        let sps = summary.steps_run as f64 / t0.elapsed().as_secs_f64().max(1e-9);
        let mut line = serde_json::json!({"step": step + 1, "loss": loss, "steps_per_s": sps});
        line.as_object_mut()
            .expect("an object")
            .extend(update.metrics());
        metrics.line(line)?;
        write_ckpt(step + 1, &params, scaler.as_ref())?;
        if !quiet {
            eprint!(
                "\rstep {}/{}  loss {loss:.4}  {sps:.0} steps/s   ",
                step + 1,
                a.steps
            );
        }
    }
    if !quiet {
        eprintln!();
        if let (Some(s), 0) = (&scaler, rank) {
            eprintln!(
                "loss scale {} at the end; {} step(s) skipped for non-finite gradients",
                s.scale, s.skipped
            );
        }
    }
    summary.steps_per_s = summary.steps_run as f64 / t0.elapsed().as_secs_f64().max(1e-9);
    // With one process per device the step results carry every rank's actions (their clocks
    // start together at a barrier), and rank 0 writes the merged timeline.
    // With one process per device each measured its own device: every rank's peaks, by device.
    if let (Some(r), true) = (remote, measure) {
        let mut mine = Vec::new();
        for v in [&measured_peak, &measured_host] {
            mine.extend_from_slice(&v.first().copied().unwrap_or(0).to_le_bytes());
        }
        let all = r
            .all_gather(mine)
            .map_err(|e| anyhow::anyhow!("MPI: gathering the measured peaks: {e}"))?;
        let word = |b: &[u8], i: usize| {
            u64::from_le_bytes(b[8 * i..8 * i + 8].try_into().expect("8 bytes"))
        };
        measured_peak = all.iter().map(|b| word(b, 0)).collect();
        measured_host = all.iter().map(|b| word(b, 1)).collect();
    }
    if let (Some(path), 0) = (&a.timeline, rank) {
        let report = timeline_report(&schedule, &measured, &stash_memory)?;
        if !quiet {
            eprintln!(
                "timeline: measured bubble rate {:.4} (median of {} steps), simulated with the \
                 measured per-stage costs {:.4}",
                report.measured_bubble_rate, report.steps_used, report.simulated_bubble_rate
            );
        }
        let svg = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("svg"));
        let text = if svg {
            cleave_passes::schedule::svg::render(
                &report.median_step,
                &format!(
                    "{} measured, P={}, M={m}: bubble {:.3} (simulated {:.3})",
                    a.schedule,
                    pipe.num_devices(),
                    report.measured_bubble_rate,
                    report.simulated_bubble_rate
                ),
            )
        } else {
            let v = serde_json::json!({
                "schedule": a.schedule,
                "stages": n_stages,
                "devices": pipe.num_devices(),
                "microbatches": m,
                "summary": {
                    "memory_limit": limit,
                    "planned_device_bytes": planned_devices.iter().map(|d| d.total()).collect::<Vec<_>>(),
                    "measured_peak_bytes": measured_peak,
                    "measured_host_peak_bytes": measured_host,
                    "transfers": transfers.iter().map(|t| serde_json::json!({
                        "device": t.device,
                        "copies": t.copies,
                        "bytes": t.bytes,
                        "transfer_s": t.transfer_s,
                        "overlapped_s": t.overlapped_s,
                    })).collect::<Vec<_>>(),
                    "measured_bubble_rate": report.measured_bubble_rate,
                    "simulated_bubble_rate": report.simulated_bubble_rate,
                    "steps_used": report.steps_used,
                    "stage_costs_s": report.costs.stages.iter().map(|c| serde_json::json!({
                        "f": c.f, "b": c.b, "w": c.w,
                    })).collect::<Vec<_>>(),
                },
                "steps": timeline,
            });
            serde_json::to_string_pretty(&v)?
        };
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    if a.memory_report && rank == 0 {
        eprint!(
            "{}",
            memory_report_text(&planned_devices, &measured_peak, &measured_host, limit)
        );
        for t in &transfers {
            eprintln!(
                "device {}: {} offload/reload copies, {} B, {:.6} s copying, {:.6} s of it overlapped with actions",
                t.device, t.copies, t.bytes, t.transfer_s, t.overlapped_s
            );
        }
    }
    if let (Some(l), 0) = (limit, rank) {
        if let Some((d, &x)) = measured_peak.iter().enumerate().find(|(_, &x)| x > l) {
            eprintln!(
                "warning: device {d} measured a peak of {x} bytes, over --memory-limit {l} \
                 (planned {} bytes)",
                planned_devices[d].total()
            );
        }
    }
    // Final evaluation on the held-out tail, like single-stage training.
    let data = StepData {
        cols,
        n,
        n_train,
        n_eval,
    };
    final_eval(a, &forward, &data, mb, &params, &mut summary, &mut metrics)?;
    summary.process_rank = rank;
    Ok(PipelineRun {
        summary,
        losses,
        params,
        memory,
        peak_saved_bytes: peak,
        offloaded_bytes: offloaded,
        planned_devices,
        measured_peak_bytes: measured_peak,
        measured_host_peak_bytes: measured_host,
        transfers,
        planned,
        chunked,
    })
}
