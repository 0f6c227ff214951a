//! The simulator: exactly the semantics of `shared/reference/schedules.md`.
//!
//! - Each device runs its list **in order**; an action starts at
//!   `max(device free, max over deps (dep end + comm if the dep ran on another device))`.
//! - Dependencies: F(s,j) after F(s−1,j); B or BW(s,j) after F(s,j) and after B or BW(s+1,j) when
//!   s is not the last stage; W(s,j) after B(s,j). Stages are global (chunks included), so in a V
//!   placement F(p,j) follows F(p−1,j) on the same device with no communication.
//! - With a [`BackwardDependency`] other than `NextStage` (gradient methods whose backward does
//!   not wait for a later stage's backward, see `autodiff::methods`), "after B or BW(s+1,j)"
//!   becomes "after F(last,j)" (DFA: the output error is broadcast from the last stage) or
//!   nothing (local learning, forward gradients); `RECV_B` waits for the same.
//! - Communication actions cost nothing: `SEND_F`/`SEND_B` wait for the local F/B they send,
//!   `RECV_F`/`RECV_B` for the remote F/B they receive (plus T_comm). `OFFLOAD`, `RELOAD` and
//!   `OPT` cost nothing and wait for nothing.
//! - Memory per device, in list order: F adds M_B; B adds M_W − M_B; W subtracts M_W; BW subtracts
//!   M_B. The peak includes the empty start (0).
//!
//! # Figures
//!
//! - **Bubble rate** (the Zero Bubble paper's definition): `(C − work) / C`, with C the longest
//!   device span (first start to last end on that device). With heterogeneous costs the devices'
//!   work differs; `work` is then the mean busy time over devices, so that imbalance counts as
//!   bubble. With equal per-device work this is exactly `(C − m·(T_F+T_B+T_W)) / C`.
//! - **Makespan bubble rate**: the same with C = global makespan.
//!
//! # Complexity
//!
//! Event-driven over the lists: a device that waits on a missing dependency parks on that
//! dependency's slot and is woken when it completes, so the run is O(actions) (plus the stages ×
//! microbatches table of end times).

use super::action::{Action, ActionKind};
use super::{Schedule, ScheduleError};

/// Compute costs of one stage (one chunk when a device holds several).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StageCost {
    /// Forward time T_F.
    pub f: f64,
    /// Input-gradient time T_B.
    pub b: f64,
    /// Weight-gradient time T_W.
    pub w: f64,
}

/// Per-stage costs and the communication latency.
#[derive(Clone, Debug, PartialEq)]
pub struct Costs {
    /// Costs per global stage.
    pub stages: Vec<StageCost>,
    /// T_comm: added to every dependency that crosses devices.
    pub comm: f64,
}

impl Costs {
    /// The same costs for every one of `n_stages` stages.
    pub fn uniform(n_stages: usize, f: f64, b: f64, w: f64, comm: f64) -> Costs {
        Costs {
            stages: vec![StageCost { f, b, w }; n_stages],
            comm,
        }
    }

    /// Costs of a placement from each device's whole share (`shares[d]`): a device's share is
    /// split evenly between the stages (chunks) placed on it.
    pub fn from_device_shares(placement: &[u32], shares: &[StageCost], comm: f64) -> Costs {
        let per_device = chunks_per_device(placement, shares.len());
        let stages = placement
            .iter()
            .map(|&d| {
                let s = shares[d as usize];
                let n = per_device[d as usize] as f64;
                StageCost {
                    f: s.f / n,
                    b: s.b / n,
                    w: s.w / n,
                }
            })
            .collect();
        Costs { stages, comm }
    }
}

/// Activation memory of one stage per microbatch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StageMemory {
    /// Held after F until B (`F_to_B + F_to_W` in split-bw's terms).
    pub m_b: f64,
    /// Held between B and W (`F_to_W + B_to_W`).
    pub m_w: f64,
}

/// Per-stage activation memory.
#[derive(Clone, Debug, PartialEq)]
pub struct Memory {
    /// Memory per global stage.
    pub stages: Vec<StageMemory>,
}

impl Memory {
    /// The same memory for every one of `n_stages` stages.
    pub fn uniform(n_stages: usize, m_b: f64, m_w: f64) -> Memory {
        Memory {
            stages: vec![StageMemory { m_b, m_w }; n_stages],
        }
    }

    /// Memory of a placement from each device's whole share, split evenly between its chunks.
    pub fn from_device_shares(placement: &[u32], shares: &[StageMemory]) -> Memory {
        let per_device = chunks_per_device(placement, shares.len());
        let stages = placement
            .iter()
            .map(|&d| {
                let s = shares[d as usize];
                let n = per_device[d as usize] as f64;
                StageMemory {
                    m_b: s.m_b / n,
                    m_w: s.m_w / n,
                }
            })
            .collect();
        Memory { stages }
    }
}

fn chunks_per_device(placement: &[u32], n_devices: usize) -> Vec<usize> {
    let mut n = vec![0usize; n_devices];
    for &d in placement {
        n[d as usize] += 1;
    }
    n
}

/// One simulated action.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Timed {
    /// The action.
    pub action: Action,
    /// Start time.
    pub start: f64,
    /// End time.
    pub end: f64,
    /// The device's activation memory after the action.
    pub memory: f64,
}

/// The simulated run of one device.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceRun {
    /// Its actions in list order, with times.
    pub actions: Vec<Timed>,
    /// Sum of its actions' costs.
    pub busy: f64,
    /// End of its last action minus start of its first (0 when it has none).
    pub span: f64,
    /// Peak activation memory (at least 0).
    pub peak_memory: f64,
}

/// The result of a simulation.
#[derive(Clone, Debug, PartialEq)]
pub struct Simulation {
    /// Per device.
    pub devices: Vec<DeviceRun>,
    /// Start of the first action anywhere to the end of the last action anywhere.
    pub makespan: f64,
    /// The paper's bubble rate (longest device span).
    pub bubble_rate: f64,
    /// The bubble rate over the global makespan.
    pub makespan_bubble_rate: f64,
}

/// What B (or BW) of stage `s` waits for besides F of `s` (the simulator's dependency mode).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackwardDependency {
    /// B of stage `s+1`: backprop (and feedback alignment).
    #[default]
    NextStage,
    /// F of the last stage: direct feedback alignment sends the output error to every stage.
    LastStageForward,
    /// Nothing: block-local learning, forward gradients.
    None,
}

impl BackwardDependency {
    /// `next-stage`, `last-stage-forward`, `none`.
    pub fn name(self) -> &'static str {
        match self {
            BackwardDependency::NextStage => "next-stage",
            BackwardDependency::LastStageForward => "last-stage-forward",
            BackwardDependency::None => "none",
        }
    }
}

/// Dependency classes: the key of "stage s has finished F / B / W of microbatch j".
const CLASS_F: usize = 0;
const CLASS_B: usize = 1;
const CLASS_W: usize = 2;

/// Static facts about the schedule the engine needs.
struct Shape {
    n_stages: usize,
    m: usize,
    backward: BackwardDependency,
}

impl Shape {
    fn key(&self, stage: u32, class: usize, mb: u32) -> usize {
        (stage as usize * 3 + class) * self.m + mb as usize
    }

    /// The dependencies of an action: (stage, class, microbatch), up to two.
    fn deps(&self, a: Action) -> [Option<(u32, usize)>; 2] {
        let last = a.stage as usize + 1 == self.n_stages;
        let prev = (a.stage > 0).then(|| (a.stage - 1, CLASS_F));
        let next = match self.backward {
            _ if last => None,
            BackwardDependency::NextStage => Some((a.stage + 1, CLASS_B)),
            BackwardDependency::LastStageForward => Some((self.n_stages as u32 - 1, CLASS_F)),
            BackwardDependency::None => None,
        };
        match a.kind {
            ActionKind::F | ActionKind::RecvF => [prev, None],
            ActionKind::B | ActionKind::BW => [Some((a.stage, CLASS_F)), next],
            ActionKind::W => [Some((a.stage, CLASS_B)), None],
            ActionKind::SendF => [Some((a.stage, CLASS_F)), None],
            ActionKind::SendB => [Some((a.stage, CLASS_B)), None],
            ActionKind::RecvB => [next, None],
            ActionKind::Offload | ActionKind::Reload | ActionKind::Opt => [None, None],
        }
    }
}

fn produced(kind: ActionKind) -> &'static [usize] {
    match kind {
        ActionKind::F => &[CLASS_F],
        ActionKind::B => &[CLASS_B],
        ActionKind::W => &[CLASS_W],
        ActionKind::BW => &[CLASS_B, CLASS_W],
        _ => &[],
    }
}

fn cost_of(a: Action, costs: &Costs) -> f64 {
    let c = costs.stages[a.stage as usize];
    match a.kind {
        ActionKind::F => c.f,
        ActionKind::B => c.b,
        ActionKind::W => c.w,
        ActionKind::BW => c.b + c.w,
        _ => 0.0,
    }
}

fn memory_delta(a: Action, memory: &Memory) -> f64 {
    let s = memory.stages[a.stage as usize];
    match a.kind {
        ActionKind::F => s.m_b,
        ActionKind::B => s.m_w - s.m_b,
        ActionKind::W => -s.m_w,
        ActionKind::BW => -s.m_b,
        _ => 0.0,
    }
}

/// Runs the dependency engine on a structurally checked schedule (stages, placement, microbatch
/// range and uniqueness already validated). Fails with [`ScheduleError::Deadlock`] naming where
/// every stuck device waits.
pub(crate) fn run(
    schedule: &Schedule,
    costs: &Costs,
    memory: &Memory,
    backward: BackwardDependency,
) -> Result<Simulation, ScheduleError> {
    let shape = Shape {
        n_stages: schedule.placement.len(),
        m: schedule.microbatches,
        backward,
    };
    let n_devices = schedule.devices.len();
    let n_keys = shape.n_stages * 3 * shape.m;
    let mut end = vec![f64::NAN; n_keys];
    // A device parks on at most one key; `waiting[key]` heads a linked list through `next_waiter`.
    let mut waiting = vec![u32::MAX; n_keys];
    let mut next_waiter = vec![u32::MAX; n_devices];
    let mut pos = vec![0usize; n_devices];
    let mut free = vec![0.0f64; n_devices];
    let mut mem = vec![0.0f64; n_devices];
    let mut runs: Vec<DeviceRun> = schedule
        .devices
        .iter()
        .map(|list| DeviceRun {
            actions: Vec::with_capacity(list.len()),
            busy: 0.0,
            span: 0.0,
            peak_memory: 0.0,
        })
        .collect();
    let mut ready: Vec<usize> = (0..n_devices).rev().collect();
    while let Some(d) = ready.pop() {
        let list = &schedule.devices[d];
        'device: while pos[d] < list.len() {
            let a = list[pos[d]];
            let mut start = free[d];
            for (stage, class) in shape.deps(a).into_iter().flatten() {
                let key = shape.key(stage, class, a.microbatch);
                let e = end[key];
                if e.is_nan() {
                    next_waiter[d] = waiting[key];
                    waiting[key] = d as u32;
                    break 'device;
                }
                let cross = schedule.device_of(stage, a.microbatch) as usize != d;
                start = start.max(if cross { e + costs.comm } else { e });
            }
            let finish = start + cost_of(a, costs);
            mem[d] += memory_delta(a, memory);
            let run = &mut runs[d];
            run.busy += finish - start;
            run.peak_memory = run.peak_memory.max(mem[d]);
            run.actions.push(Timed {
                action: a,
                start,
                end: finish,
                memory: mem[d],
            });
            free[d] = finish;
            pos[d] += 1;
            for &class in produced(a.kind) {
                let key = shape.key(a.stage, class, a.microbatch);
                end[key] = finish;
                let mut w = std::mem::replace(&mut waiting[key], u32::MAX);
                while w != u32::MAX {
                    ready.push(w as usize);
                    w = std::mem::replace(&mut next_waiter[w as usize], u32::MAX);
                }
            }
        }
    }
    let stuck: Vec<String> = (0..n_devices)
        .filter(|&d| pos[d] < schedule.devices[d].len())
        .map(|d| {
            let a = schedule.devices[d][pos[d]];
            let missing = shape
                .deps(a)
                .into_iter()
                .flatten()
                .find(|&(stage, class)| end[shape.key(stage, class, a.microbatch)].is_nan())
                .map(|(stage, class)| {
                    let kind = [ActionKind::F, ActionKind::B, ActionKind::W][class];
                    Action::new(stage, kind, a.microbatch).to_string()
                })
                .unwrap_or_default();
            format!("device {d}, position {}: {a} waits for {missing}", pos[d])
        })
        .collect();
    if !stuck.is_empty() {
        return Err(ScheduleError::Deadlock {
            waits: stuck.join("; "),
        });
    }
    Ok(figures(runs))
}

impl Simulation {
    /// The figures of a *measured* run: each device's actions in list order with their start and
    /// end times (seconds or any unit), memory counted by the same rules as the simulator. The
    /// bubble rates use exactly the simulator's definitions, so a measured timeline and a
    /// simulation of the same schedule can be compared side by side.
    pub fn from_timings(devices: &[Vec<(Action, f64, f64)>], memory: &Memory) -> Simulation {
        let runs = devices
            .iter()
            .map(|list| {
                let mut run = DeviceRun {
                    actions: Vec::with_capacity(list.len()),
                    busy: 0.0,
                    span: 0.0,
                    peak_memory: 0.0,
                };
                let mut mem = 0.0;
                for &(action, start, end) in list {
                    mem += memory_delta(action, memory);
                    run.busy += end - start;
                    run.peak_memory = run.peak_memory.max(mem);
                    run.actions.push(Timed {
                        action,
                        start,
                        end,
                        memory: mem,
                    });
                }
                run
            })
            .collect();
        figures(runs)
    }
}

fn figures(mut runs: Vec<DeviceRun>) -> Simulation {
    let (mut first, mut last) = (f64::INFINITY, f64::NEG_INFINITY);
    let mut max_span: f64 = 0.0;
    let mut total_busy = 0.0;
    for run in &mut runs {
        if let (Some(a), Some(b)) = (run.actions.first(), run.actions.last()) {
            run.span = b.end - a.start;
            first = first.min(a.start);
            last = last.max(b.end);
        }
        max_span = max_span.max(run.span);
        total_busy += run.busy;
    }
    let makespan = if last >= first { last - first } else { 0.0 };
    let work = if runs.is_empty() {
        0.0
    } else {
        total_busy / runs.len() as f64
    };
    let rate = |c: f64| if c > 0.0 { (c - work) / c } else { 0.0 };
    Simulation {
        bubble_rate: rate(max_span),
        makespan_bubble_rate: rate(makespan),
        makespan,
        devices: runs,
    }
}
