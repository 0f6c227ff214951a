//! `cleave inspect --memory`: the recomputation/offload plan of every pipeline stage under a
//! schedule, its costs, and the simulated memory over time; and the joint choice of schedule and
//! plan under a per-device memory limit.
//!
//! # Build
//!
//! The forward model is cut like `cleave train --stages P` does (`partition{stages=S,profile}`,
//! `autodiff`, `split-bw`), the schedule is generated, each stage's microbatches in flight are
//! read off its device's action list ([`crate::pipeline_train::in_flight`]), and
//! [`cleave_passes::remat::plan_stages`] picks every stage's plan (a device's limit is shared
//! among its stages).
//!
//! # Costs and memory handed to the simulator
//!
//! Per stage, under the device profile: `T_F`, `T_B`, `T_W` are the sums of
//! [`cleave_passes::remat::forward_seconds`] over the nodes of F, B and W after the rewrite (views — `reshape`,
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
//! of one schedule's stages run on all cores. On the 32-layer GPT at P=8, M=16 this brought
//! the joint plan from 8.7 s / 53 s to under 2 s (BENCHMARKS.md, "Joint plan time").

use std::collections::BTreeSet;

use anyhow::{Context, Result};
use cleave_ir::{Function, Module};
use cleave_passes::partition::{
    compute_nodes, output_layer_start, partition_function_by, split_node_seconds, Cut,
    DeviceProfile,
};
use cleave_passes::remat::{
    exposed_transfer, function_seconds, plan_stages_cached, InFlight, PlanCache, Policy,
    StageMemory,
};
use cleave_passes::schedule::auto::{auto_schedule, AutoOptions};
use cleave_passes::schedule::{Costs, Memory, Schedule, Simulation, StageCost};
use cleave_passes::split::{split_stages, stash_report};
use cleave_passes::{PassContext, PassManager};
use serde_json::{json, Value};

use crate::pipeline_train::{build_schedule, in_flight};

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
}

impl Planned {
    /// The bubble rate counting recomputation and transfers as idle time: the simulator's
    /// `(longest span − mean work) / longest span` with the work of the plan-free costs.
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
                json!({
                    "stage": i,
                    "device": d,
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
            out.push_str(&format!(
                "{:<6} {:>6} {:>9} {:>12} {:>12} {:>14} {:>12} {:>12} {:>12.3e} {:>12.0}\n",
                i,
                d,
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
}

/// The forward model cut into `n_stages` stages (balancing the estimated training time),
/// differentiated and split.
pub fn split_module(forward: &Function, n_stages: usize, profile: &str) -> Result<Split> {
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
) -> Result<Split> {
    let device = DeviceProfile::load(profile).map_err(anyhow::Error::msg)?;
    let mut cut_forward = forward.clone();
    if n_stages > 1 {
        partition_function_by(&mut cut_forward, n_stages as u32, &device, cut)
            .map_err(|e| anyhow::anyhow!("partition: {e}"))?;
    }
    let mut module = Module::with_function(cut_forward);
    let passes = "autodiff,split-bw";
    PassManager::from_pipeline(passes)?
        .run(&mut module, &mut PassContext::default(), &mut |_| {})
        .map_err(|e| anyhow::anyhow!("{passes}: {e}"))?;
    let vocab = if cut.vocab_parallel && n_stages > 1 {
        let compute = compute_nodes(forward);
        let start = output_layer_start(forward, &compute)
            .context("vocab-parallel: the model has no output layer")?;
        let times = split_node_seconds(forward, &compute, &device).map_err(anyhow::Error::msg)?;
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
    Ok(Split { module, vocab })
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
) -> Result<(Planned, Vec<Candidate>)> {
    let device = DeviceProfile::load(profile).map_err(anyhow::Error::msg)?;
    let mut best: Option<Planned> = None;
    let mut tried = Vec::new();
    let mut first_error = None;
    for cut in cuts {
        let base = split_module_by(forward, n_stages, profile, *cut)?;
        match joint(forward, &base, p, m, limit, &device) {
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
        (None, None) => anyhow::bail!("no stage cut to plan"),
    }
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
        m.push(cleave_passes::schedule::StageMemory {
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
fn device_stash(s: &cleave_passes::split::SplitStage<'_>) -> cleave_passes::split::StashBytes {
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
) -> Result<Planned> {
    let mut module = base.module.clone();
    let placement: Vec<usize> = schedule.placement.iter().map(|&d| d as usize).collect();
    let stages = plan_stages_cached(
        &mut module,
        policy,
        limit,
        &[],
        &in_flight(&schedule),
        &placement,
        profile,
        cache,
    )
    .map_err(|e| anyhow::anyhow!("{}: {origin}: {e}", forward.name))?;
    let (costs, memory) = costs_of(&module, profile, &stages, base.vocab.as_ref());
    let (base_costs, _) = costs_of(&base.module, profile, &[], base.vocab.as_ref());
    let sim = schedule
        .simulate(&costs, &memory)
        .map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
    Ok(Planned {
        origin: origin.to_string(),
        schedule,
        stages,
        costs,
        memory,
        base_costs,
        sim,
    })
}

/// The joint choice of schedule and plan under `limit` (see the module docs).
pub fn joint(
    forward: &Function,
    base: &Split,
    p: usize,
    m: usize,
    limit: u64,
    profile: &DeviceProfile,
) -> Result<(Planned, Vec<Candidate>)> {
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
        let Ok(mut cur) = plan_for(
            forward,
            base,
            schedule,
            seed,
            Policy::Auto,
            Some(limit),
            profile,
            &mut cache,
        ) else {
            progress(&cache, shortest(&pool).map(|i| pool[i].sim.makespan));
            continue;
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
            let options = AutoOptions {
                memory_limit: Some(limit as f64),
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
        let x = &pool[i];
        if let Ok(y) = plan_for(
            forward,
            base,
            x.schedule.clone(),
            &x.origin,
            Policy::Auto,
            Some(limit),
            profile,
            &mut cache,
        ) {
            tried.push((
                format!("{}+full", y.origin),
                y.sim.makespan,
                y.effective_bubble_rate(),
            ));
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
    let best = best.context("no schedule has a plan within the memory limit")?;
    Ok((best, tried))
}
