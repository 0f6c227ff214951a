//! Local search on a schedule's lists: the polish `auto` applies to its best candidate.
//!
//! A schedule's quality is decided by its idle gaps. The search reads the gaps off a simulation
//! and tries, for each gap (on the device with the longest span first, then by size), the moves
//! that could close it:
//!
//! - **fill**: bring the nearest later W whose B has already run into the gap;
//! - **pull**: run the nearest earlier W in the gap instead (it holds its memory longer);
//! - **hoist**: run the nearest later F (or B) of the same device in the gap instead;
//! - **feed**: on the device that produces the waiting action's input, run that input one slot
//!   earlier.
//!
//! A move is kept when the simulated result fits the memory limit and is strictly better by
//! [`Score`] (longest device span, then the sum of spans, then the makespan); the gaps are then
//! read again. The search stops when no move of any gap helps or after `budget` simulations,
//! so it is deterministic and bounded: the same input gives the same output on every machine.

use super::action::{Action, ActionKind};
use super::simulate::{self, BackwardDependency, Costs, Memory, Simulation};
use super::Schedule;

const EPS: f64 = 1e-9;

/// How good a schedule is, lexicographically (smaller is better).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Score {
    /// The longest device span (what the bubble rate is measured on).
    pub max_span: f64,
    /// The sum of the devices' spans (progress on non-critical devices).
    pub sum_span: f64,
    /// First start to last end anywhere.
    pub makespan: f64,
}

impl Score {
    /// The score of a simulation.
    pub fn of(sim: &Simulation) -> Score {
        Score {
            max_span: sim.devices.iter().map(|d| d.span).fold(0.0, f64::max),
            sum_span: sim.devices.iter().map(|d| d.span).sum(),
            makespan: sim.makespan,
        }
    }

    /// Strictly better than `other` (beyond rounding).
    pub fn better_than(&self, other: &Score) -> bool {
        let tol = |x: f64| EPS * x.abs().max(1.0);
        let pairs = [
            (self.max_span, other.max_span),
            (self.sum_span, other.sum_span),
            (self.makespan, other.makespan),
        ];
        for (a, b) in pairs {
            if a < b - tol(b) {
                return true;
            }
            if a > b + tol(b) {
                return false;
            }
        }
        false
    }
}

/// What the search needs to judge a candidate.
pub struct Problem<'a> {
    /// Per-stage costs.
    pub costs: &'a Costs,
    /// Per-stage memory.
    pub memory: &'a Memory,
    /// Per-device memory limit.
    pub limit: f64,
    /// The dependency mode candidates are simulated under.
    pub backward: BackwardDependency,
}

impl Problem<'_> {
    /// The simulation of `s` when it runs and fits the limit.
    fn judge(&self, s: &Schedule) -> Option<Simulation> {
        let sim = simulate::run(s, self.costs, self.memory, self.backward).ok()?;
        sim.devices
            .iter()
            .all(|d| d.peak_memory <= self.limit + EPS * self.limit.abs().max(1.0))
            .then_some(sim)
    }
}

/// What the search did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SearchReport {
    /// Simulations run.
    pub evaluations: usize,
    /// Moves kept.
    pub improvements: usize,
}

/// One idle gap: `device` waits before its action at `position`.
struct Gap {
    device: usize,
    position: usize,
    size: f64,
}

/// Polishes `start` (which must be valid and fit the limit) by local search with at most
/// `budget` simulations; returns the best schedule found and what the search did.
pub fn polish(start: &Schedule, problem: &Problem, budget: usize) -> (Schedule, SearchReport) {
    let mut report = SearchReport::default();
    let mut best = start.clone();
    let Some(mut sim) = problem.judge(&best) else {
        return (best, report);
    };
    report.evaluations += 1;
    let mut score = Score::of(&sim);
    'outer: while report.evaluations < budget {
        for gap in gaps(&sim) {
            for candidate in moves(&best, &gap, problem.backward) {
                if report.evaluations >= budget {
                    break 'outer;
                }
                report.evaluations += 1;
                let Some(s) = problem.judge(&candidate) else {
                    continue;
                };
                let sc = Score::of(&s);
                if sc.better_than(&score) {
                    best = candidate;
                    sim = s;
                    score = sc;
                    report.improvements += 1;
                    continue 'outer;
                }
            }
        }
        break;
    }
    (best, report)
}

/// The idle gaps of a simulation: the longest-span device's first, then the others by span;
/// within a device, the largest gap first.
fn gaps(sim: &Simulation) -> Vec<Gap> {
    let mut order: Vec<usize> = (0..sim.devices.len()).collect();
    order.sort_by(|&a, &b| sim.devices[b].span.total_cmp(&sim.devices[a].span));
    let mut out = Vec::new();
    for d in order {
        let acts = &sim.devices[d].actions;
        let mut here: Vec<Gap> = acts
            .windows(2)
            .enumerate()
            .filter_map(|(i, w)| {
                let size = w[1].start - w[0].end;
                (size > EPS * w[1].start.abs().max(1.0)).then_some(Gap {
                    device: d,
                    position: i + 1,
                    size,
                })
            })
            .collect();
        here.sort_by(|a, b| b.size.total_cmp(&a.size).then(a.position.cmp(&b.position)));
        out.extend(here);
    }
    out
}

/// Moves `list[from]` to index `to` (in the list after removal).
fn moved(s: &Schedule, device: usize, from: usize, to: usize) -> Schedule {
    let mut c = s.clone();
    let a = c.devices[device].remove(from);
    c.devices[device].insert(to, a);
    c
}

/// The candidate schedules that might close `gap`.
fn moves(s: &Schedule, gap: &Gap, backward: BackwardDependency) -> Vec<Schedule> {
    let (d, k) = (gap.device, gap.position);
    let list = &s.devices[d];
    let waiting = list[k];
    let mut out = Vec::new();
    let ran_before = |kind: ActionKind, a: &Action| {
        list[..k]
            .iter()
            .any(|x| x.kind == kind && x.stage == a.stage && x.microbatch == a.microbatch)
    };
    // fill: the nearest later W whose B already ran.
    if let Some(i) = (k + 1..list.len())
        .find(|&i| list[i].kind == ActionKind::W && ran_before(ActionKind::B, &list[i]))
    {
        out.push(moved(s, d, i, k));
    }
    // pull: the nearest earlier W (its memory held longer) runs in the gap instead.
    if let Some(i) = (0..k).rev().find(|&i| list[i].kind == ActionKind::W) {
        if i + 1 < k {
            out.push(moved(s, d, i, k - 1));
        }
    }
    // hoist: the nearest later F, and the nearest later B, of another microbatch.
    for kind in [ActionKind::F, ActionKind::B] {
        if waiting.kind == kind {
            continue;
        }
        if let Some(i) = (k + 1..list.len()).find(|&i| list[i].kind == kind) {
            out.push(moved(s, d, i, k));
        }
    }
    // feed: the producer of the waiting action's input, one slot earlier on its device.
    let producer = match waiting.kind {
        ActionKind::F if waiting.stage > 0 => Some(Action::new(
            waiting.stage - 1,
            ActionKind::F,
            waiting.microbatch,
        )),
        ActionKind::B | ActionKind::BW
            if backward == BackwardDependency::NextStage
                && (waiting.stage as usize) + 1 < s.placement.len() =>
        {
            let next = Action::new(waiting.stage + 1, ActionKind::B, waiting.microbatch);
            let on = s.device_of(next.stage, next.microbatch) as usize;
            let kind = if s.devices[on].contains(&next) {
                ActionKind::B
            } else {
                ActionKind::BW
            };
            Some(Action::new(waiting.stage + 1, kind, waiting.microbatch))
        }
        _ => None,
    };
    if let Some(a) = producer {
        let on = s.device_of(a.stage, a.microbatch) as usize;
        if let Some(i) = s.devices[on].iter().position(|x| *x == a) {
            if i > 0 {
                out.push(moved(s, on, i, i - 1));
            }
        }
    }
    out
}
