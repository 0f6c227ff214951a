//! The planner: partition, split, recomputation/offload and schedule chosen together, as one pass
//! (`plan{…}`) with one result type ([`Planned`]: the per-stage programs' plans, the schedule's
//! action lists, the costs, the memory plan and the simulation) that `cleave inspect --memory`,
//! `cleave opt --passes 'plan{…}'` and the library's users consume.
//!
//! It plans the recomputation/offload of every pipeline stage under a schedule, its costs and the
//! simulated memory over time; and the joint choice of schedule and plan under a per-device memory
//! limit.
//!
//! # Build
//!
//! The forward model is cut like `cleave train --stages P` does (`partition{stages=S,profile}`,
//! `autodiff`, `split-bw`), the schedule is generated, each stage's microbatches in flight are
//! read off its device's action list ([`in_flight`]), and
//! [`crate::remat::plan_stages`] picks every stage's plan (a device's limit is shared
//! among its stages).
//!
//! # Costs and memory handed to the simulator
//!
//! Per stage, under the device profile: `T_F`, `T_B`, `T_W` are the sums of
//! [`crate::remat::forward_seconds`] over the nodes of F, B and W after the rewrite (views — `reshape`,
//! `stop_gradient` — cost nothing: the runtime aliases them) (so recomputation is in B
//! and W), plus the part of the offload and reload copies that compute does not hide
//! ([`exposed_transfer`]). `M_B` and `M_W` are `split-bw`'s stash sets of the rewritten functions
//! without the `stash.offload.*` values.
//!
//! **Offload overlap.** The runtime copies on a background thread per device: F's offloaded
//! values go to the host pool while the device runs its next action, and the reloads of an
//! action are requested when the action before it starts. A one-way copy takes
//! `t = offloaded bytes / host bandwidth` (the profile's `host_bytes_per_s`); it is hidden by
//! the action it runs beside, which lasts at least `min(T_F, T_B)` of the stage, so F and B are
//! each charged `max(0, t − min(T_F, T_B))` (a copy no action hides, e.g. after the device's
//! last action, is bounded by the same; the remat ILP's objective charges the same exposed
//! part). `cleave train --timeline` measures the real overlap: the
//! summary's `transfers` give, per device, the seconds copied and the seconds of them during
//! which the device ran an action.
//!
//! # Joint choice (`--schedule auto` with a limit)
//!
//! Seeds: the schedules 1F1B, ZB-H1, ZB-H2 and `auto` without a limit, each planned for its
//! in-flight counts under the limit (a seed whose smallest plan does not fit is dropped). Each
//! seed's plan gives new per-stage `T_F, T_B, T_W, M_B, M_W`; the `auto` scheduler, bounded by the
//! limit, then picks a schedule for those costs, whose in-flight counts give a new plan, and so
//! on. **The loop ends** when the in-flight counts repeat one already planned (a fixed point when
//! they repeat the last one, a cycle otherwise), when a round does not shorten the step, or after
//! [`MAX_ROUNDS`] rounds; in-flight counts take finitely many values, so it always ends. Every
//! consistent pair (a schedule and the plan made for its in-flight counts) met on the way is
//! simulated.
//!
//! **Two budgets.** While exploring, each stage's ILP stops after [`EXPLORE_NODES`]
//! branch-and-bound nodes; the [`FINAL_CANDIDATES`] best pairs are then planned again with
//! [`FINAL_NODES`] (the same search run longer, so the plan is at least as good), and the pair
//! with the smallest makespan is chosen. Stage problems repeat across schedules (the same
//! stage, limit share and in-flight counts): a [`PlanCache`] solves each once, and the solves
//! of one schedule's stages run on all cores. Budgets are stated for a stage of up to
//! [`crate::remat::NODE_BUDGET_CANDIDATES`] candidates and shrink in proportion beyond; a stage
//! problem whose solve ended before its budget keeps its plan in the final round. On the 32- and
//! 96-layer GPTs at P=8, M=16 the joint plan takes under 2 s and 5 s (BENCHMARKS.md, "Joint
//! plan time").
//!
//! # Cuts and schedule families
//!
//! [`joint_over_cuts`] runs the joint search on each stage cut asked for ([`Cut`]: what the
//! partition balances, whether the output layer is spread over the stages, see
//! [`split_module_by`]) and keeps the shortest step. The automatic scheduler builds one stage per
//! device; [`joint_v_family`] adds the fixed V schedules (ZB-V, V-Half, V-Min, DualPipeV) on a
//! cut of 2p stages, each with its recomputation planned, and skips a member whose step without
//! recomputation already reaches a known makespan (a fixed order's makespan never shrinks when an
//! action grows, and recomputation only makes actions longer). The `plan` pass ([`PlanPass`])
//! puts these together under its options.

use std::collections::BTreeSet;

use crate::partition::{
    compute_nodes, output_layer_start, partition_function_by, split_node_seconds, Cut,
    DeviceProfile,
};
use crate::pass::{Pass, PassError, PassOptions};
use crate::remat::{
    exposed_transfer, function_seconds, plan_stages_cached, InFlight, PlanCache, Policy,
    StageMemory,
};
use crate::schedule::auto::{auto_schedule, AutoOptions};
use crate::schedule::generators::Generator;
use crate::schedule::ActionKind;
use crate::schedule::{Costs, Memory, Schedule, Simulation, StageCost};
use crate::split::{split_stages, stash_report};
use crate::{PassContext, PassManager};
use cleave_ir::{Function, Module};
use serde_json::{json, Value};

/// A candidate of the joint loop: its origin, makespan and effective bubble rate.
pub type Candidate = (String, f64, f64);

/// Rounds of the joint loop per seed.
pub const MAX_ROUNDS: usize = 6;

/// Branch-and-bound nodes per stage ILP while the joint loop explores.
pub const EXPLORE_NODES: u64 = 50;

/// How many of the best explored candidates are planned again with [`FINAL_NODES`].
pub const FINAL_CANDIDATES: usize = 1;

/// Branch-and-bound nodes per stage ILP of the final candidates.
pub const FINAL_NODES: u64 = 500;

/// A schedule with its plan, costs and simulation.
#[derive(Clone, Debug)]
pub struct Planned {
    /// Where it came from (`zb-h1`, `auto←zb-h2`, …).
    pub origin: String,
    /// The schedule.
    pub schedule: Schedule,
    /// Per stage.
    pub stages: Vec<StageMemory>,
    /// Per-stage costs after the rewrite.
    pub costs: Costs,
    /// Per-stage memory after the rewrite.
    pub memory: Memory,
    /// The costs without recomputation or offload (for the useful work).
    pub base_costs: Costs,
    /// The simulation.
    pub sim: Simulation,
    /// The split module with every stage's plan applied (`F`, `B`, `W` per stage, recomputation
    /// and offload rewritten in).
    pub module: Module,
    /// With named stash compressions (`plan{compress=…}`, `inspect --compress`): the per-value
    /// choice ([`crate::compress`]).
    pub compression: Option<Compression>,
}

/// The per-value compression choice of a plan.
#[derive(Clone, Debug)]
pub struct Compression {
    /// The named methods (`compress=…` pass options).
    pub methods: String,
    /// Every candidate, in the search's order.
    pub candidates: Vec<crate::compress::Candidate>,
    /// What the plan applies (`None`: the exact step).
    pub chosen: Option<crate::autodiff::Selection>,
    /// The plans the search tried.
    pub tried: Vec<crate::compress::Tried>,
    /// With `chunked=K` (or several K): the output layer in K row chunks, each weighed as one
    /// more candidate.
    pub chunked: Vec<ChunkedChoice>,
}

/// The chunked output layer as a candidate of the plan (`plan{chunked=K}`, `inspect --compress
/// chunked:K`): the logits `[rows, vocab]` of one microbatch against one chunk's.
#[derive(Clone, Debug)]
pub struct ChunkedChoice {
    /// Row chunks.
    pub k: usize,
    /// The stage of the output layer (the last).
    pub stage: u32,
    /// Bytes of the whole logits.
    pub bytes_exact: u64,
    /// Bytes of one chunk's logits.
    pub bytes: u64,
    /// Whether the plan chunks the layer.
    pub chosen: bool,
}

impl Compression {
    /// The report's JSON object (`compress` in `inspect --memory --json`).
    pub fn to_json(&self) -> Value {
        let chosen = |c: &crate::compress::Candidate| {
            self.chosen
                .as_ref()
                .is_some_and(|s| s.0.contains(&(c.value, c.method)))
        };
        let mut values: Vec<Value> = self
            .candidates
            .iter()
            .map(|c| {
                let mut v = c.to_json();
                v["chosen"] = json!(chosen(c));
                v
            })
            .collect();
        for c in &self.chunked {
            values.push(json!({
                "value": "logits",
                "stage": c.stage,
                "method": format!("chunked:{}", c.k),
                "bytes_exact": c.bytes_exact,
                "bytes": c.bytes,
                "added_seconds": 0.0,
                "chosen": c.chosen,
            }));
        }
        json!({
            "methods": self.methods,
            "values": values,
            "chosen": self.chosen.as_ref().map_or(0, |s| s.0.len())
                + self.chunked.iter().filter(|c| c.chosen).count(),
            "tried": self.tried.iter().map(|t| match &t.outcome {
                Ok(s) => json!({"values": t.prefix, "objective": s}),
                Err(e) => json!({"values": t.prefix, "error": e}),
            }).collect::<Vec<_>>(),
        })
    }
}

impl Planned {
    /// Measures this (compressed) plan's effective bubble against the exact step's plan-free
    /// F/B/W costs (`forward` cut into `n_stages` as the plan cut it, differentiated without
    /// compression), so the compressions' own nodes count as overhead, as recomputation does,
    /// and rates are comparable across the methods.
    pub fn against_exact_step(
        &mut self,
        forward: &Function,
        staged: Function,
        (n_stages, profile_name, cut): (usize, &str, Cut),
        profile: &DeviceProfile,
    ) -> Result<(), PlanError> {
        let exact = split_staged(forward, staged, n_stages, profile_name, cut, "autodiff")?;
        let (costs, _) = costs_of(&exact.module, profile, &[], exact.vocab.as_ref());
        if costs.stages.len() == self.base_costs.stages.len() {
            self.base_costs = costs;
        }
        Ok(())
    }

    /// The bubble rate counting recomputation and transfers as idle time: the simulator's
    /// `(longest span − mean work) / longest span` with the work of the plan-free costs (of the
    /// exact step, for a compressed plan: [`Planned::against_exact_step`]).
    pub fn effective_bubble_rate(&self) -> f64 {
        let mut busy = vec![0.0; self.schedule.p()];
        for (s, &d) in self.schedule.placement.iter().enumerate() {
            let c = self.base_costs.stages[s];
            busy[d as usize] += (c.f + c.b + c.w) * self.schedule.m() as f64;
        }
        let span = self.sim.devices.iter().map(|d| d.span).fold(0.0, f64::max);
        let useful = busy.iter().sum::<f64>() / busy.len().max(1) as f64;
        if span > 0.0 {
            1.0 - useful / span
        } else {
            0.0
        }
    }

    /// The JSON report (see the README).
    pub fn to_json(&self, policy: Policy, limit: Option<u64>) -> Value {
        let stages: Vec<Value> = self
            .stages
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let values: Vec<Value> = s
                    .values
                    .iter()
                    .map(|(name, bytes, c)| {
                        json!({"name": name, "bytes": bytes, "choice": c.name()})
                    })
                    .collect();
                let d = self.schedule.placement[i] as usize;
                let replica = self
                    .schedule
                    .reverse
                    .as_ref()
                    .map(|r| r.placement[i] as usize)
                    .filter(|&r| r != d);
                json!({
                    "stage": i,
                    "device": d,
                    "replica_device": replica,
                    "function": s.function,
                    "in_flight": s.in_flight.saved,
                    "in_flight_b_to_w": s.in_flight.b_to_w,
                    "limit_bytes": s.limit,
                    "saved_bytes": s.summary.kept_bytes,
                    "values": values,
                    "recomputed_values": s.summary.recomputed_values,
                    "recomputed_flops": s.summary.recompute_flops,
                    "offloaded_bytes": s.summary.offloaded_bytes,
                    "handed_bytes": s.summary.handed_bytes,
                    "transfer_s": s.transfer_seconds,
                    "need_bytes": s.summary.need_bytes,
                    "t_f": self.costs.stages[i].f,
                    "t_b": self.costs.stages[i].b,
                    "t_w": self.costs.stages[i].w,
                    "m_b": self.memory.stages[i].m_b,
                    "m_w": self.memory.stages[i].m_w,
                    "peak_bytes": self.sim.devices[d].peak_memory,
                })
            })
            .collect();
        json!({
            "policy": policy.name(),
            "memory_limit": limit,
            "schedule": self.origin,
            "bubble_rate": self.sim.bubble_rate,
            "effective_bubble_rate": self.effective_bubble_rate(),
            "makespan_s": self.sim.makespan,
            "peak_bytes": self.sim.devices.iter().map(|d| d.peak_memory).collect::<Vec<_>>(),
            "stages": stages,
        })
    }

    /// A text table.
    pub fn render(&self) -> String {
        let mut out = format!(
            "schedule {}: makespan {:.6} s, bubble rate {:.4} (recomputation counted as idle: {:.4})\n",
            self.origin,
            self.sim.makespan,
            self.sim.bubble_rate,
            self.effective_bubble_rate()
        );
        out.push_str(&format!(
            "{:<6} {:>6} {:>9} {:>12} {:>12} {:>14} {:>12} {:>12} {:>12} {:>12}\n",
            "stage",
            "device",
            "in flight",
            "saved B",
            "recomputed",
            "recompute FLOP",
            "offloaded B",
            "handed B",
            "transfer s",
            "peak B"
        ));
        for (i, s) in self.stages.iter().enumerate() {
            let d = self.schedule.placement[i] as usize;
            // A replicated stage (bidirectional schedules) shows both of its devices.
            let devices = match &self.schedule.reverse {
                Some(r) if r.placement[i] as usize != d => format!("{d}/{}", r.placement[i]),
                _ => d.to_string(),
            };
            out.push_str(&format!(
                "{:<6} {:>6} {:>9} {:>12} {:>12} {:>14} {:>12} {:>12} {:>12.3e} {:>12.0}\n",
                i,
                devices,
                s.in_flight.saved,
                s.summary.kept_bytes,
                s.summary.recomputed_values,
                s.summary.recompute_flops,
                s.summary.offloaded_bytes,
                s.summary.handed_bytes,
                s.transfer_seconds,
                self.sim.devices[d].peak_memory
            ));
            for (name, bytes, c) in &s.values {
                out.push_str(&format!("    {name:<20} {bytes:>12} {}\n", c.name()));
            }
        }
        out
    }
}

/// The forward model cut into stages, differentiated and split: the base every plan of the
/// joint search starts from.
#[derive(Clone, Debug)]
pub struct Split {
    /// The split module (`F`, `B`, `W` per stage).
    pub module: Module,
    /// With vocabulary parallelism, the output layer's F, B and W seconds per microbatch on one
    /// device, which the planner spreads evenly over the stages ([`costs_of`]).
    pub vocab: Option<StageCost>,
    /// Per device (the stage of the same index under one stage per device), bytes of its limit
    /// taken by what is not a saved value: parameters, gradients, the programs' workspace,
    /// values crossing devices (`cleave train` measures them; missing entries are 0). The
    /// saved values of a device share the limit less these bytes.
    pub reserved: Vec<u64>,
}

/// The forward model cut into `n_stages` stages (balancing the estimated training time),
/// differentiated and split.
pub fn split_module(
    forward: &Function,
    n_stages: usize,
    profile: &str,
) -> Result<Split, PlanError> {
    split_module_by(forward, n_stages, profile, Cut::default())
}

/// [`split_module`] with the partition's cut options (`balance`, `vocab-parallel`).
///
/// **Vocabulary parallelism** ("Balancing Pipeline Parallelism with Vocabulary Parallelism",
/// Yeung et al., arXiv 2411.05288) is modelled in the planner only: the partition leaves the
/// output layer out of its balance, and [`costs_of`] moves the layer's F, B and W from the last
/// stage to every stage in equal shares (the paper's S and T passes at ideal scaling; its
/// measured efficiency is 76–93 %). The collectives between the shares (the broadcast of the
/// last hidden state, the all-reduces of the softmax statistics and of the input gradient) and
/// the extra microbatch the barrier keeps in flight are not in the figures, and `cleave train`
/// still runs the whole layer on the last stage.
pub fn split_module_by(
    forward: &Function,
    n_stages: usize,
    profile: &str,
    cut: Cut,
) -> Result<Split, PlanError> {
    let staged = stage_forward(forward, n_stages, profile, cut)?;
    split_staged(forward, staged, n_stages, profile, cut, "autodiff")
}

/// The forward model cut into `n_stages` stages (stage-annotated, the function `autodiff`
/// differentiates in [`split_module_by`]; the compression candidates name its values).
pub fn stage_forward(
    forward: &Function,
    n_stages: usize,
    profile: &str,
    cut: Cut,
) -> Result<Function, PlanError> {
    let device = DeviceProfile::load(profile).map_err(PlanError)?;
    let mut cut_forward = forward.clone();
    if n_stages > 1 {
        partition_function_by(&mut cut_forward, n_stages as u32, &device, cut)
            .map_err(|e| PlanError(format!("partition: {e}")))?;
    }
    Ok(cut_forward)
}

/// [`split_module_by`] of a function [`stage_forward`] cut, differentiated by `autodiff` (the
/// pass's text: `autodiff`, or with a compression, `autodiff{compress=…,only=…}`).
pub fn split_staged(
    forward: &Function,
    staged: Function,
    n_stages: usize,
    profile: &str,
    cut: Cut,
    autodiff: &str,
) -> Result<Split, PlanError> {
    let device = DeviceProfile::load(profile).map_err(PlanError)?;
    let mut module = Module::with_function(staged);
    let passes = format!("{autodiff},split-bw");
    PassManager::from_pipeline(&passes)
        .and_then(|pm| pm.run(&mut module, &mut PassContext::default(), &mut |_| {}))
        .map_err(|e| PlanError(format!("{passes}: {e}")))?;
    let vocab = if cut.vocab_parallel && n_stages > 1 {
        let compute = compute_nodes(forward);
        let start = output_layer_start(forward, &compute)
            .ok_or_else(|| PlanError("vocab-parallel: the model has no output layer".into()))?;
        let times = split_node_seconds(forward, &compute, &device).map_err(PlanError)?;
        let mut share = StageCost {
            f: 0.0,
            b: 0.0,
            w: 0.0,
        };
        for (f, b, w) in &times[start..] {
            share.f += f;
            share.b += b;
            share.w += w;
        }
        Some(share)
    } else {
        None
    };
    Ok(Split {
        module,
        vocab,
        reserved: Vec::new(),
    })
}

/// The joint plan over several stage cuts: [`joint`] on each cut's split, the shortest step
/// kept (the first on ties), with the candidates of every cut (origins prefixed by the cut's
/// balance when there are several). The joint search is a local one, so a better balanced cut does not always give a
/// shorter planned step under a limit; trying both is how `--balance best` is never worse than
/// either.
pub fn joint_over_cuts(
    forward: &Function,
    n_stages: usize,
    p: usize,
    m: usize,
    limit: u64,
    profile: &str,
    cuts: &[Cut],
) -> Result<(Planned, Vec<Candidate>), PlanError> {
    let device = DeviceProfile::load(profile).map_err(PlanError)?;
    let mut best: Option<Planned> = None;
    let mut tried = Vec::new();
    let mut first_error = None;
    for cut in cuts {
        let base = split_module_by(forward, n_stages, profile, *cut)?;
        match joint(forward, &base, p, m, limit, &device) {
            Ok((planned, t)) if cuts.len() == 1 => {
                tried.extend(t);
                best = Some(planned);
            }
            Ok((planned, t)) => {
                let tag = cut.balance.name();
                tried.extend(
                    t.into_iter()
                        .map(|(o, ms, b)| (format!("{tag}:{o}"), ms, b)),
                );
                if best
                    .as_ref()
                    .is_none_or(|b| planned.sim.makespan < b.sim.makespan)
                {
                    best = Some(planned);
                }
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    match (best, first_error) {
        (Some(b), _) => Ok((b, tried)),
        (None, Some(e)) => Err(e),
        (None, None) => Err(PlanError("no stage cut to plan".into())),
    }
}

/// The fixed schedules with two chunks per device in a V that [`joint_v_family`] plans.
pub const V_FAMILY: [&str; 4] = ["zb-v", "v-half", "v-min", "dualpipev"];

/// The V family under `limit`: the forward cut into 2p stages (two per device, in a V), and
/// each of [`V_FAMILY`] planned for its in-flight counts (recomputation and offload chosen per
/// stage, [`EXPLORE_NODES`] per stage problem), the shortest planned again with
/// [`FINAL_NODES`]. The automatic scheduler builds one stage per device, so these are fixed
/// orders; the planner's choice is their recomputation. A member whose step without any
/// recomputation is already no shorter than `bound` (a makespan found elsewhere) is not planned:
/// recomputation and exposed copies only lengthen actions, and a fixed order's makespan never
/// shrinks when an action grows. `None` when no member has a plan.
pub fn joint_v_family(
    forward: &Function,
    p: usize,
    m: usize,
    limit: u64,
    profile: &str,
    cut: Cut,
    bound: Option<f64>,
) -> Result<Option<(Planned, Vec<Candidate>)>, PlanError> {
    let device = DeviceProfile::load(profile).map_err(PlanError)?;
    let base = split_module_by(forward, 2 * p, profile, cut)?;
    let mut cache = PlanCache::default();
    cache.node_budget = EXPLORE_NODES;
    let mut tried = Vec::new();
    let mut best: Option<Planned> = None;
    let (base_costs, base_memory) = costs_of(&base.module, &device, &[], base.vocab.as_ref());
    for name in V_FAMILY {
        let Ok(schedule) = build_schedule(name, p, m) else {
            continue;
        };
        let floor = schedule
            .simulate(&base_costs, &base_memory)
            .map(|sim| sim.makespan)
            .unwrap_or(f64::INFINITY);
        let mut known = best
            .as_ref()
            .map(|b| b.sim.makespan)
            .into_iter()
            .chain(bound);
        if known.any(|b| floor >= b) {
            continue;
        }
        let Ok(x) = plan_for(
            forward,
            &base,
            schedule,
            name,
            Policy::Auto,
            Some(limit),
            &device,
            &mut cache,
        ) else {
            continue;
        };
        tried.push((x.origin.clone(), x.sim.makespan, x.effective_bubble_rate()));
        if best
            .as_ref()
            .is_none_or(|b| x.sim.makespan < b.sim.makespan)
        {
            best = Some(x);
        }
    }
    let Some(explored) = best else {
        return Ok(None);
    };
    cache.node_budget = FINAL_NODES;
    let mut best = explored;
    if let Some(y) = replan(
        forward, &base, &best, limit, &device, &mut cache, &mut tried,
    ) {
        if y.sim.makespan <= best.sim.makespan {
            best = y;
        }
    }
    Ok(Some((best, tried)))
}

/// `x`'s schedule planned again under `cache`'s node budget (the final round of a search), its
/// candidate recorded in `tried` as `<origin>+full`; `None` if it has no plan.
fn replan(
    forward: &Function,
    base: &Split,
    x: &Planned,
    limit: u64,
    profile: &DeviceProfile,
    cache: &mut PlanCache,
    tried: &mut Vec<Candidate>,
) -> Option<Planned> {
    let y = plan_for(
        forward,
        base,
        x.schedule.clone(),
        &x.origin,
        Policy::Auto,
        Some(limit),
        profile,
        cache,
    )
    .ok()?;
    tried.push((
        format!("{}+full", y.origin),
        y.sim.makespan,
        y.effective_bubble_rate(),
    ));
    Some(y)
}

/// Per-stage costs and memory of a split module (after `remat`, if it ran). With `vocab` (the
/// output layer's seconds, see [`split_module_by`]), the last stage gives the layer up and every
/// stage takes an equal share of it.
pub fn costs_of(
    module: &Module,
    profile: &DeviceProfile,
    stages: &[StageMemory],
    vocab: Option<&StageCost>,
) -> (Costs, Memory) {
    let mut c = Vec::new();
    let mut m = Vec::new();
    for (i, s) in split_stages(module).iter().enumerate() {
        let transfer = stages.get(i).map(|x| x.transfer_seconds).unwrap_or(0.0);
        let (f, b, w) = (
            function_seconds(profile, s.f),
            function_seconds(profile, s.b),
            function_seconds(profile, s.w),
        );
        let exposed = exposed_transfer(transfer / 2.0, f, b);
        c.push(StageCost {
            f: f + exposed,
            b: b + exposed,
            w,
        });
        let r = device_stash(s);
        m.push(crate::schedule::StageMemory {
            m_b: (r.f_to_b + r.f_to_w) as f64,
            m_w: (r.f_to_w + r.b_to_w) as f64,
        });
    }
    if let (Some(v), Some(n)) = (vocab, c.len().checked_sub(1)) {
        let share = 1.0 / c.len() as f64;
        let last = &mut c[n];
        // The layer's own nodes are never recomputed, so its times are those of the base.
        last.f = (last.f - v.f).max(0.0);
        last.b = (last.b - v.b).max(0.0);
        last.w = (last.w - v.w).max(0.0);
        for x in &mut c {
            x.f += v.f * share;
            x.b += v.b * share;
            x.w += v.w * share;
        }
    }
    (
        Costs {
            stages: c,
            comm: 0.0,
        },
        Memory { stages: m },
    )
}

/// `stash_report` without the offloaded values.
fn device_stash(s: &crate::split::SplitStage<'_>) -> crate::split::StashBytes {
    let mut r = stash_report(s);
    for o in &s.f.outputs {
        if o.name.starts_with("stash.offload.") {
            let bytes = s.f.ty(o.value).size_bytes() as u64;
            // Offloaded values are read by B, W or both; stash_report put them in one set.
            let reads_w = s.w.data_inputs().any(|a| a.name == o.name);
            if reads_w {
                r.f_to_w -= bytes;
            } else {
                r.f_to_b -= bytes;
            }
        }
    }
    r
}

/// Plans `policy` for `schedule` and simulates it; `cache` holds the stage plans already made
/// for `base` (give every call on the same `base` the same cache).
#[allow(clippy::too_many_arguments)]
pub fn plan_for(
    forward: &Function,
    base: &Split,
    schedule: Schedule,
    origin: &str,
    policy: Policy,
    limit: Option<u64>,
    profile: &DeviceProfile,
    cache: &mut PlanCache,
) -> Result<Planned, PlanError> {
    if schedule.reverse.is_some() && limit.is_some() {
        return Err(PlanError(format!(
            "{origin}: recomputation under a memory limit is not planned for bidirectional \
             schedules yet (each replicated stage would need its plan on both of its devices)"
        )));
    }
    let mut module = base.module.clone();
    let placement: Vec<usize> = schedule.placement.iter().map(|&d| d as usize).collect();
    let stages = plan_stages_cached(
        &mut module,
        policy,
        limit,
        &base.reserved,
        &in_flight(&schedule),
        &placement,
        profile,
        cache,
    )
    .map_err(|e| PlanError(format!("{}: {origin}: {e}", forward.name)))?;
    let (costs, memory) = costs_of(&module, profile, &stages, base.vocab.as_ref());
    let (base_costs, _) = costs_of(&base.module, profile, &[], base.vocab.as_ref());
    let sim = schedule
        .simulate(&costs, &memory)
        .map_err(|e| PlanError(format!("{origin}: {e}")))?;
    Ok(Planned {
        origin: origin.to_string(),
        schedule,
        stages,
        costs,
        memory,
        base_costs,
        sim,
        module,
        compression: None,
    })
}

/// A named schedule planned alone under `limit` with policy `auto` by the joint search's own
/// procedure ([`EXPLORE_NODES`], then [`FINAL_NODES`] from that plan, the shorter kept), so
/// that the joint plan of a schedule is the plan of that schedule alone (the ILP stops at a
/// node budget, and a search started from another incumbent can end elsewhere). Other policies,
/// or no limit, plan as [`plan_for`] does.
pub fn plan_alone(
    forward: &Function,
    base: &Split,
    schedule: Schedule,
    origin: &str,
    policy: Policy,
    limit: Option<u64>,
    profile: &DeviceProfile,
) -> Result<Planned, PlanError> {
    let mut cache = PlanCache::default();
    let plan = |cache: &mut PlanCache| {
        plan_for(
            forward,
            base,
            schedule.clone(),
            origin,
            policy,
            limit,
            profile,
            cache,
        )
    };
    if policy != Policy::Auto || limit.is_none() {
        return plan(&mut cache);
    }
    cache.node_budget = EXPLORE_NODES;
    let explored = plan(&mut cache)?;
    cache.node_budget = FINAL_NODES;
    match plan(&mut cache) {
        Ok(y) if y.sim.makespan <= explored.sim.makespan => Ok(y),
        _ => Ok(explored),
    }
}

/// The joint choice of schedule and plan under `limit` (see the module docs).
pub fn joint(
    forward: &Function,
    base: &Split,
    p: usize,
    m: usize,
    limit: u64,
    profile: &DeviceProfile,
) -> Result<(Planned, Vec<Candidate>), PlanError> {
    let mut tried: Vec<(String, f64, f64)> = Vec::new();
    // Every consistent pair met, in the order met.
    let mut pool: Vec<Planned> = Vec::new();
    let consider = |x: Planned, tried: &mut Vec<Candidate>, pool: &mut Vec<Planned>| {
        tried.push((x.origin.clone(), x.sim.makespan, x.effective_bubble_rate()));
        pool.push(x);
    };
    // The first of the shortest pairs.
    let shortest = |pool: &[Planned]| -> Option<usize> {
        (0..pool.len()).min_by(|&a, &b| pool[a].sim.makespan.total_cmp(&pool[b].sim.makespan))
    };
    let mut cache = PlanCache::default();
    cache.node_budget = EXPLORE_NODES;
    let most_reserved = base.reserved.iter().copied().max().unwrap_or(0);
    // Why seeds had no plan: when none has, the error naming the smallest feasible limit.
    let mut seed_errors: Vec<String> = Vec::new();
    let started = std::time::Instant::now();
    for seed in ["1f1b", "zb-h1", "zb-h2", "auto"] {
        // A line per seed family once the search has run for more than a second.
        let progress = |cache: &PlanCache, best: Option<f64>| {
            let t = started.elapsed().as_secs_f64();
            if t > 1.0 {
                eprintln!(
                    "joint: seed {seed} done at {t:.1} s ({} stage plans solved, {} reused; best makespan so far {})",
                    cache.misses,
                    cache.hits,
                    best.map_or("none".to_string(), |b| format!("{b:.6} s"))
                );
            }
        };
        let schedule = build_schedule(seed, p, m)?;
        let mut cur = match plan_for(
            forward,
            base,
            schedule,
            seed,
            Policy::Auto,
            Some(limit),
            profile,
            &mut cache,
        ) {
            Ok(x) => x,
            Err(e) => {
                seed_errors.push(e.0);
                progress(&cache, shortest(&pool).map(|i| pool[i].sim.makespan));
                continue;
            }
        };
        let mut seen: BTreeSet<Vec<(u64, u64)>> = BTreeSet::new();
        let key = |s: &Schedule| -> Vec<(u64, u64)> {
            in_flight(s)
                .iter()
                .map(|k: &InFlight| (k.saved, k.b_to_w))
                .collect()
        };
        seen.insert(key(&cur.schedule));
        let mut seed_best = cur.sim.makespan;
        for round in 0..MAX_ROUNDS {
            // The scheduler bounds every device by one figure: the tightest device's share
            // for saved values (the stage plans then use each device's own share).
            let options = AutoOptions {
                memory_limit: Some(limit.saturating_sub(most_reserved) as f64),
                ilp_max_pm: 0,
                ..AutoOptions::default()
            };
            let next = auto_schedule(p, m, &cur.costs, &cur.memory, &options)
                .ok()
                .map(|x| x.0);
            consider(cur, &mut tried, &mut pool);
            let Some(next) = next else { break };
            if !seen.insert(key(&next)) {
                break;
            }
            let origin = format!("auto[{round}]<-{seed}");
            match plan_for(
                forward,
                base,
                next,
                &origin,
                Policy::Auto,
                Some(limit),
                profile,
                &mut cache,
            ) {
                Ok(x) => cur = x,
                Err(_) => break,
            }
            // A round that does not shorten the step ends the seed's descent.
            if cur.sim.makespan >= seed_best || round + 1 == MAX_ROUNDS {
                consider(cur, &mut tried, &mut pool);
                break;
            }
            seed_best = cur.sim.makespan;
        }
        progress(&cache, shortest(&pool).map(|i| pool[i].sim.makespan));
    }
    // The best explored schedules, planned again with the final node budget (the same search
    // run longer: the plan is at least as good).
    let mut order: Vec<usize> = (0..pool.len()).collect();
    order.sort_by(|&a, &b| {
        let (x, y) = (&pool[a], &pool[b]);
        x.sim
            .makespan
            .total_cmp(&y.sim.makespan)
            .then(x.origin.cmp(&y.origin))
    });
    cache.node_budget = FINAL_NODES;
    let mut best = shortest(&pool).map(|i| pool[i].clone());
    for &i in order.iter().take(FINAL_CANDIDATES) {
        if let Some(y) = replan(
            forward, base, &pool[i], limit, profile, &mut cache, &mut tried,
        ) {
            if best
                .as_ref()
                .is_none_or(|b| y.sim.makespan <= b.sim.makespan)
            {
                best = Some(y);
            }
        }
    }
    if started.elapsed().as_secs_f64() > 1.0 {
        eprintln!(
            "joint: done at {:.1} s ({} stage plans solved, {} reused)",
            started.elapsed().as_secs_f64(),
            cache.misses,
            cache.hits
        );
    }
    let best = best.ok_or_else(|| {
        let why = seed_errors
            .iter()
            .min_by_key(|e| crate::remat::named_smallest(e).unwrap_or(u64::MAX))
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        PlanError(format!(
            "no schedule has a plan within the memory limit of {limit} bytes{why}"
        ))
    })?;
    Ok((best, tried))
}

/// Microbatches in flight per stage under a schedule: the most microbatches whose F has run and
/// whose W (or BW) has not, whose F has run and whose B (or BW) has not, and whose B has run and
/// whose W has not (a BW counts as one while it runs), over the stage's device's action list.
pub fn in_flight(schedule: &Schedule) -> Vec<InFlight> {
    let n = schedule.n_stages();
    let mut out = vec![InFlight::from(1); n];
    let mut points = vec![std::collections::BTreeSet::new(); n];
    for list in &schedule.devices {
        let (mut f, mut fb, mut b) = (vec![0u64; n], vec![0u64; n], vec![0u64; n]);
        for x in list {
            let s = x.stage as usize;
            match x.kind {
                ActionKind::F => {
                    f[s] += 1;
                    fb[s] += 1;
                }
                ActionKind::B => {
                    b[s] += 1;
                    fb[s] = fb[s].saturating_sub(1);
                }
                ActionKind::W => {
                    f[s] = f[s].saturating_sub(1);
                    b[s] = b[s].saturating_sub(1);
                }
                // Within a BW, once B has run: its B-only values are freed, W's are not yet.
                ActionKind::BW => fb[s] = fb[s].saturating_sub(1),
                _ => {}
            }
            out[s].saved = out[s].saved.max(f[s]);
            out[s].f_to_b = out[s].f_to_b.max(fb[s]);
            out[s].b_to_w = out[s].b_to_w.max(b[s]);
            // A BW holds its B→W values while it runs.
            let bw = u64::from(x.kind == ActionKind::BW);
            points[s].insert([fb[s], f[s], b[s] + bw]);
            if x.kind == ActionKind::BW {
                f[s] = f[s].saturating_sub(1);
            }
        }
    }
    for (o, p) in out.iter_mut().zip(points) {
        // Only the moments no other moment dominates matter.
        let all: Vec<[u64; 3]> = p.into_iter().collect();
        o.points = all
            .iter()
            .copied()
            .filter(|a| {
                !all.iter()
                    .any(|b| b != a && b[0] >= a[0] && b[1] >= a[1] && b[2] >= a[2])
            })
            .collect();
    }
    out
}

/// Builds the schedule named `name` for `p` devices and `m` microbatches.
pub fn build_schedule(name: &str, p: usize, m: usize) -> Result<Schedule, PlanError> {
    let n = name.to_ascii_lowercase();
    let s = if n == "auto" {
        let options = AutoOptions {
            ilp_max_pm: 0,
            ..AutoOptions::default()
        };
        auto_schedule(
            p,
            m,
            &Costs::uniform(p, 1.0, 1.0, 1.0, 0.0),
            &Memory::uniform(p, 1.0, 1.0),
            &options,
        )
        .map_err(|e| PlanError(e.to_string()))?
        .0
    } else {
        let Some(g) = Generator::parse(&n) else {
            return Err(PlanError(format!(
                "unknown schedule `{name}`; valid schedules: {}, auto",
                Generator::NAMES
            )));
        };
        g.generate(p, m).map_err(|e| PlanError(e.to_string()))?
    };
    s.validate()
        .map_err(|e| PlanError(format!("schedule `{name}` is invalid: {e}")))?;
    Ok(s)
}

/// Why planning failed: the message names the stage, schedule or option (an infeasible limit
/// names the smallest feasible one).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PlanError(pub String);

/// The stage cuts a `balance` option names: `estimate`, `split`, or `best` (both, for the joint
/// search to compare), each with `vocab_parallel`.
pub fn cuts_of(balance: &str, vocab_parallel: bool) -> Result<Vec<Cut>, String> {
    use crate::partition::Balance;
    let balances = match balance {
        "best" => vec![Balance::Estimate, Balance::Split],
        one => vec![one
            .parse()
            .map_err(|e| format!("`{one}`: {e} (or `best`)"))?],
    };
    Ok(balances
        .into_iter()
        .map(|balance| Cut {
            balance,
            vocab_parallel,
        })
        .collect())
}

/// The `plan` pass: `plan{stages=P,microbatches=M,memory-limit=BYTES,profile=NAME|FILE,
/// schedule=NAME|auto,remat=POLICY,balance=estimate|split|best,vocab-parallel,v-family}`.
///
/// Entry: a module of one verified forward function (not differentiated). Exit: the split module
/// of the plan (per stage `F`, `B`, `W`, with its recomputation and offload rewritten in), and
/// the whole [`Planned`] result in [`PassContext::planned`] (schedule and action lists, per-stage
/// plans, costs, memory, simulation); the pass's notes name the schedule, its makespan and
/// bubble, and each stage's plan. `schedule=auto` with a `memory-limit` and policy `auto` (the
/// default with a limit) is the joint search ([`joint_over_cuts`]); any other combination
/// plans the named schedule ([`plan_for`]). Defaults: `schedule=auto`, `profile=cpu-epyc-2core`,
/// `balance=estimate`, `microbatches=1`, no limit (policy `none`).
#[derive(Clone, Debug)]
pub struct PlanPass {
    /// Pipeline devices.
    pub stages: usize,
    /// Microbatches per step.
    pub microbatches: usize,
    /// Per-device bytes of saved values.
    pub memory_limit: Option<u64>,
    /// The device profile's name or file.
    pub profile: String,
    /// A schedule name or `auto`.
    pub schedule: String,
    /// The recomputation/offload policy.
    pub policy: Policy,
    /// The stage cuts to plan (several: the shortest step is kept).
    pub cuts: Vec<Cut>,
    /// With the joint search, also plan the V family ([`joint_v_family`]: two stages per device;
    /// about 40 % more planning time).
    pub v_family: bool,
    /// Stash compressions the plan may choose per value under the limit (`compress=…`, `bits`,
    /// `group`; [`crate::compress`]).
    pub compress: crate::autodiff::Compress,
    /// `chunked=K` (several joined by `+`; `auto`: [`CHUNK_CHOICES`]): the plan may run the
    /// output layer in K row chunks (planned whole and with each K, the fastest kept). Empty:
    /// the layer stays whole.
    pub chunk: Vec<usize>,
}

/// ` chunked=K+K…` of the chunk counts `ks` (empty for none).
fn chunk_text(ks: &[usize]) -> String {
    if ks.is_empty() {
        return String::new();
    }
    let ks: Vec<String> = ks.iter().map(|k| k.to_string()).collect();
    format!(" chunked={}", ks.join("+"))
}

/// The row chunk counts `chunked=auto` (`--compress chunked` without K) tries.
pub const CHUNK_CHOICES: [usize; 4] = [2, 4, 8, 16];

/// Parses the chunk counts of `chunked=…`: `K`, `K+K…`, or `auto`.
pub fn parse_chunks(text: &str) -> Result<Vec<usize>, String> {
    if text == "auto" {
        return Ok(CHUNK_CHOICES.to_vec());
    }
    let mut ks: Vec<usize> = text
        .split('+')
        .map(|t| {
            t.parse()
                .ok()
                .filter(|&k: &usize| k >= 2)
                .ok_or_else(|| format!("`{t}`: at least 2 row chunks (or `auto`)"))
        })
        .collect::<Result<_, _>>()?;
    ks.sort_unstable();
    ks.dedup();
    Ok(ks)
}

impl PlanPass {
    /// Builds the pass from its pipeline options (see the type's docs).
    pub fn from_options(mut o: PassOptions) -> Result<Self, PassError> {
        let bad = |key: &str, message: String| PassError::BadOption {
            pass: "plan".into(),
            key: key.into(),
            message,
        };
        let stages: usize = o.take_parsed("stages", 0)?;
        if stages == 0 {
            return Err(bad(
                "stages",
                "give the number of pipeline devices, e.g. `plan{stages=4,microbatches=8}`".into(),
            ));
        }
        let microbatches: usize = o.take_parsed("microbatches", 1)?;
        if microbatches == 0 {
            return Err(bad("microbatches", "at least one microbatch".into()));
        }
        let memory_limit = o
            .take("memory-limit")
            .map(|t| crate::remat::parse_bytes(&t).map_err(|e| bad("memory-limit", e)))
            .transpose()?;
        let profile = o.take("profile").unwrap_or_else(|| "cpu-epyc-2core".into());
        DeviceProfile::load(&profile).map_err(|e| bad("profile", e))?;
        let schedule = o.take("schedule").unwrap_or_else(|| "auto".into());
        let policy = match o.take("remat") {
            None if memory_limit.is_some() => Policy::Auto,
            None => Policy::None,
            Some(name) => Policy::parse(&name).ok_or_else(|| {
                bad(
                    "remat",
                    format!("`{name}`: valid policies: {}", Policy::NAMES),
                )
            })?,
        };
        let vocab_parallel = o.take_parsed("vocab-parallel", false)?;
        let v_family = o.take_parsed("v-family", false)?;
        let balance = o.take("balance").unwrap_or_else(|| "estimate".into());
        let cuts = cuts_of(&balance, vocab_parallel).map_err(|e| bad("balance", e))?;
        let compress = crate::autodiff::Compress::take_options(&mut o, "plan")?;
        let chunk: Vec<usize> = match o.take("chunked") {
            Some(t) => parse_chunks(&t).map_err(|e| bad("chunked", e))?,
            None => Vec::new(),
        };
        o.finish()?;
        let pass = PlanPass {
            stages,
            microbatches,
            memory_limit,
            profile,
            schedule,
            policy,
            cuts,
            v_family,
            compress,
            chunk,
        };
        if pass.v_family && !pass.is_joint() {
            return Err(bad(
                "v-family",
                "the V family joins the joint search: it needs schedule=auto and a memory-limit"
                    .into(),
            ));
        }
        if pass.cuts.len() > 1 && !pass.is_joint() {
            return Err(bad(
                "balance",
                "`best` compares joint plans: it needs schedule=auto and a memory-limit".into(),
            ));
        }
        Ok(pass)
    }

    /// Whether the pass runs the joint search (`schedule=auto` with a limit and policy `auto`).
    pub fn is_joint(&self) -> bool {
        self.schedule == "auto" && self.memory_limit.is_some() && self.policy == Policy::Auto
    }

    /// Plans `forward` (see the type's docs).
    pub fn plan(&self, forward: &Function) -> Result<(Planned, Vec<Candidate>), PlanError> {
        let (p, m) = (self.stages, self.microbatches);
        let profile = DeviceProfile::load(&self.profile).map_err(PlanError)?;
        if !self.compress.is_none() || !self.chunk.is_empty() {
            return self.plan_compressed(forward, &profile);
        }
        if self.is_joint() {
            let n_stages = build_schedule("1f1b", p, m)?.n_stages();
            let limit = self.memory_limit.unwrap_or(0);
            let (mut best, mut tried) =
                joint_over_cuts(forward, n_stages, p, m, limit, &self.profile, &self.cuts)?;
            if self.v_family {
                for cut in &self.cuts {
                    let bound = Some(best.sim.makespan);
                    let v = joint_v_family(forward, p, m, limit, &self.profile, *cut, bound)?;
                    if let Some((x, t)) = v {
                        tried.extend(t.into_iter().map(|(o, ms, b)| (format!("v:{o}"), ms, b)));
                        if x.sim.makespan < best.sim.makespan {
                            best = x;
                        }
                    }
                }
            }
            return Ok((best, tried));
        }
        let schedule = build_schedule(&self.schedule, p, m)?;
        let base = split_module_by(forward, schedule.n_stages(), &self.profile, self.cuts[0])?;
        let planned = plan_alone(
            forward,
            &base,
            schedule,
            &self.schedule,
            self.policy,
            self.memory_limit,
            &profile,
        )?;
        Ok((planned, Vec::new()))
    }

    /// [`PlanPass::plan`] with named compressions: the per-value choice of [`crate::compress`]
    /// around the joint search (objective: the simulated step) or a named schedule's plan
    /// (objective: the seconds the plan and the compressions add); with `chunked=K`, made for
    /// the forward as given and with its output layer in K row chunks, the better kept.
    fn plan_compressed(
        &self,
        forward: &Function,
        profile: &DeviceProfile,
    ) -> Result<(Planned, Vec<Candidate>), PlanError> {
        let Some(limit) = self.memory_limit else {
            return Err(PlanError(format!(
                "{}{}: stash compression is a choice under a memory limit: give one (`inspect \
                 --memory --memory-limit BYTES`, `plan{{memory-limit=…}}`)",
                self.compress.pass_options(),
                chunk_text(&self.chunk)
            )));
        };
        if self.cuts.len() > 1 || self.v_family {
            return Err(PlanError(
                "stash compression is not planned with balance=best or the V family yet".into(),
            ));
        }
        let whole = self.plan_one(forward, limit, profile);
        if self.chunk.is_empty() {
            return whole.map(|(x, _)| x);
        }
        let head = lm_head_of(forward).ok_or_else(|| {
            PlanError(format!(
                "{}: @{} has no output layer to chunk (a matmul's logits read only by a \
                 cross_entropy)",
                chunk_text(&self.chunk).trim(),
                forward.name
            ))
        })?;
        // The layer whole, then in each K row chunks (in increasing K).
        let tries = std::iter::once((None, whole)).chain(self.chunk.iter().map(|&k| {
            let plan = chunked_forward(forward, k)
                .map_err(|e| PlanError(format!("chunked={k}: {}", e.0)))
                .and_then(|f| self.plan_one(&f, limit, profile));
            (Some(k), plan)
        }));
        let (mut best, chosen) = fastest(tries)?;
        // The chunked layers as more candidates of the report.
        let n_stages = best.0.stages.len() as u32;
        let (rows, vocab) = head;
        let compression = best.0.compression.get_or_insert_with(|| Compression {
            methods: self.compress.pass_options(),
            candidates: Vec::new(),
            chosen: None,
            tried: Vec::new(),
            chunked: Vec::new(),
        });
        compression.chunked = self
            .chunk
            .iter()
            .map(|&k| ChunkedChoice {
                k,
                stage: n_stages.saturating_sub(1),
                bytes_exact: (rows * vocab * 4) as u64,
                bytes: (rows.div_ceil(k) * vocab * 4) as u64,
                chosen: chosen == Some(k),
            })
            .collect();
        Ok(best)
    }

    /// The per-value choice for one forward function `f` (`forward` itself, or it with its
    /// output layer chunked): the plan and its objective.
    fn plan_one(
        &self,
        f: &Function,
        limit: u64,
        profile: &DeviceProfile,
    ) -> Result<((Planned, Vec<Candidate>), f64), PlanError> {
        use crate::compress::{autodiff_pass, candidates, choose};
        let (p, m) = (self.stages, self.microbatches);
        let cut = self.cuts[0];
        let n_stages = if self.is_joint() {
            build_schedule("1f1b", p, m)?.n_stages()
        } else {
            build_schedule(&self.schedule, p, m)?.n_stages()
        };
        let staged = stage_forward(f, n_stages, &self.profile, cut)?;
        let cands = if self.compress.is_none() {
            Vec::new()
        } else {
            candidates(&staged, self.compress, profile).map_err(PlanError)?
        };
        let (((mut planned, joint_tried), objective), chosen, tried) = choose(&cands, |chosen| {
            let autodiff = autodiff_pass(self.compress, chosen).map_err(PlanError)?;
            let base = split_staged(f, staged.clone(), n_stages, &self.profile, cut, &autodiff)?;
            let (x, tried) = if self.is_joint() {
                joint(f, &base, p, m, limit, profile)?
            } else {
                let schedule = build_schedule(&self.schedule, p, m)?;
                let x = plan_alone(
                    f,
                    &base,
                    schedule,
                    &self.schedule,
                    self.policy,
                    Some(limit),
                    profile,
                )?;
                (x, Vec::new())
            };
            let clean = x.stages.iter().all(|s| s.summary.added_seconds <= 0.0);
            let makespan = x.sim.makespan;
            Ok((((x, tried), makespan), makespan, clean))
        })?;
        if chosen.as_ref().is_some_and(|c| !c.0.is_empty()) {
            planned.against_exact_step(f, staged, (n_stages, &self.profile, cut), profile)?;
        }
        if !self.compress.is_none() {
            planned.compression = Some(Compression {
                methods: self.compress.pass_options(),
                candidates: cands,
                chosen,
                tried,
                chunked: Vec::new(),
            });
        }
        Ok(((planned, joint_tried), objective))
    }
}

/// The fastest of the plans `tries`, each labelled and with its objective: the least objective
/// wins, the earliest on ties; when every one fails, the first error. (The chunk search tries
/// the whole output layer first, then increasing chunk counts: ties go to the whole layer, then
/// to the fewest chunks, and the whole layer's error is the one reported.)
pub fn fastest<T, L, E>(
    tries: impl IntoIterator<Item = (L, Result<(T, f64), E>)>,
) -> Result<(T, L), E> {
    let mut best: Option<(T, f64, L)> = None;
    let mut first_err = None;
    for (label, plan) in tries {
        match plan {
            Ok((p, objective)) if best.as_ref().is_none_or(|b| objective < b.1) => {
                best = Some((p, objective, label));
            }
            Ok(_) => {}
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    match best {
        Some((p, _, label)) => Ok((p, label)),
        None => Err(first_err.expect("at least one plan was tried")),
    }
}

/// `(rows, vocabulary)` of `forward`'s output layer: the logits `[rows, vocab]` of a `matmul`
/// that a `cross_entropy` reads.
fn lm_head_of(forward: &Function) -> Option<(usize, usize)> {
    forward.body.iter().find_map(|&n| {
        let d = &forward.nodes[n];
        if !matches!(d.op, cleave_ir::Op::CrossEntropy) {
            return None;
        }
        let z = d.operands[0];
        let def = &forward.nodes[forward.values[z].def];
        let shape = &forward.ty(z).shape;
        (matches!(def.op, cleave_ir::Op::MatMul { .. }) && shape.len() == 2)
            .then(|| (shape[0], shape[1]))
    })
}

/// `forward` with its output layer in `k` row chunks (`chunk{ops=lm-head,k=K}`, after dropping a
/// `logits` output, which a training step does not need); the error is the passes' own.
pub fn chunked_forward(forward: &Function, k: usize) -> Result<Function, PlanError> {
    let mut f = forward.clone();
    f.outputs.retain(|o| o.name != "logits");
    let mut m = Module::with_function(f);
    PassManager::from_pipeline(&format!("dce,chunk{{ops=lm-head,k={k}}}"))
        .and_then(|pm| pm.run(&mut m, &mut PassContext::default(), &mut |_| {}))
        .map_err(|e| PlanError(e.to_string()))?;
    Ok(m.functions.remove(0))
}

impl Pass for PlanPass {
    fn name(&self) -> &'static str {
        "plan"
    }

    fn run(&self, module: &mut Module, ctx: &mut PassContext) -> Result<(), PassError> {
        let fail = |message: String| PassError::Failed {
            pass: "plan",
            message,
        };
        let [forward] = &module.functions[..] else {
            return Err(fail(format!(
                "plan a module of one forward function; this one has {}",
                module.functions.len()
            )));
        };
        if forward
            .body
            .iter()
            .any(|&n| forward.nodes[n].phase.is_backward())
        {
            return Err(fail(format!(
                "@{}: plan a forward function, before `autodiff`",
                forward.name
            )));
        }
        let (planned, tried) = self.plan(forward).map_err(|e| fail(e.0))?;
        for (origin, makespan, bubble) in &tried {
            ctx.note(
                "plan",
                format!("candidate {origin}: makespan {makespan:.6} s, effective bubble rate {bubble:.4}"),
            );
        }
        for line in planned.render().lines() {
            ctx.note("plan", line.to_string());
        }
        for (d, actions) in planned.schedule.action_strings().iter().enumerate() {
            ctx.note("plan", format!("device {d}: {}", actions.join(" ")));
        }
        *module = planned.module.clone();
        ctx.planned = Some(Box::new(planned));
        Ok(())
    }
}
