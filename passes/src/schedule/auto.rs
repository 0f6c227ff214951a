//! `auto`: a zero-bubble schedule under a memory limit, for one stage per device.
//!
//! In the spirit of the Zero Bubble paper's automatic scheduler (§3, App. B and G; reference
//! document, "Heuristic"):
//!
//! 1. **Greedy list scheduling** ([`greedy`]). Devices advance in time order (always the device
//!    that is free earliest). A device runs, by priority: a B that is ready (it is on the critical
//!    path toward the previous stage); an F that is ready and fits in memory (warm-up fills memory
//!    with F as the paper's does); a W when the gap until the next B or F is at least T_W, or when
//!    memory blocks the next F (a W frees M_W); otherwise it idles until something is ready.
//!    After F and B run out, the remaining W drain. Three booleans change the policy:
//!    - `prioritize_f`: when both an F and a B are ready, run the F first (more warm-up);
//!    - `strict_warmup`: before the first B, do not start an F that would delay a B becoming ready
//!      within T_F (the paper's "one more F may leave a bubble smaller than T_F" flag, negated);
//!    - `fill_small_gaps`: also run W in a gap shorter than T_W.
//!
//!    All 8 combinations run (the paper's `initial_solution` grid) and the best is kept.
//! 2. **Round-based greedy with lookahead** ([`super::rounds`]): the Zero Bubble scheduler's own
//!    policy (warm-up F counts from the estimated arrival of the first gradient, one microbatch
//!    per round, W filling the waits for inputs), its 8 flag combinations. On the paper's Table 5
//!    rows it gives exactly the published ZB-1p / ZB-2p bubble rates
//!    (`passes/tests/zero_bubble_table5.rs`).
//! 3. **Hand-written seeds**: ZB-H1, ZB-H2, 1F1B and GPipe, kept when their simulated peak fits the limit.
//! 4. **Local search** ([`super::search`]) on the best candidate so far: moves that close its
//!    idle gaps, kept when the simulated result fits and is shorter, within
//!    [`AutoOptions::search_work`] simulated actions.
//! 5. **Exact ILP** ([`ilp`]) for small p·m (App. G with the pure-Rust microlp solver): binary
//!    order variables between the actions of a device, continuous end times, big-M ordering,
//!    the dependency constraints with T_comm, a memory constraint after every action, and the
//!    objective `min max_i (span of device i)`. Warm-started from the best candidate so far;
//!    stopped after [`AutoOptions::ilp_nodes`] branch-and-bound nodes (deterministic).
//!
//! Every candidate is simulated with the real simulator; the result is the one with the lowest
//! bubble rate (then makespan) whose peaks fit the limit. So `auto` is never worse than any seed
//! that fits, by construction; [`AutoReport`] says which candidate won.

use super::action::{Action, ActionKind};
use super::generators::Generator;
use super::simulate::{Costs, Memory, Simulation};
use super::{Schedule, ScheduleError};

/// Options of the automatic scheduler.
#[derive(Clone, Debug, PartialEq)]
pub struct AutoOptions {
    /// Per-device activation memory limit (same units as M_B and M_W); `None` = unlimited.
    pub memory_limit: Option<f64>,
    /// Run the ILP when p·m is at most this (0 disables it).
    pub ilp_max_pm: usize,
    /// Branch-and-bound nodes of the ILP (a budget, not a time limit, so that `auto` gives the
    /// same schedule on every machine).
    pub ilp_nodes: u64,
    /// What B waits for (the gradient method's dependency mode): candidates are judged by the
    /// simulator under it, and the `eager` order joins them when B does not wait for the next
    /// stage. The greedy and ILP candidates are still built under backprop's dependencies.
    pub backward: super::simulate::BackwardDependency,
    /// Work budget of the local search that polishes the best candidate, in simulated actions
    /// (each trial simulates every action once, so it allows about `search_work / (3·p·m)`
    /// trials); 0 disables it. Deterministic: no clock is read.
    pub search_work: usize,
}

impl Default for AutoOptions {
    fn default() -> Self {
        AutoOptions {
            memory_limit: None,
            ilp_max_pm: 8,
            ilp_nodes: 2000,
            backward: super::simulate::BackwardDependency::NextStage,
            search_work: 4_000_000,
        }
    }
}

/// Which candidate `auto` chose, and how every candidate fared.
#[derive(Clone, Debug, PartialEq)]
pub struct AutoReport {
    /// Name of the chosen candidate (`greedy[fTF]`, `zb-h1`, `ilp`, …).
    pub chosen: String,
    /// (name, bubble rate, makespan, fits the limit) of every candidate tried.
    pub candidates: Vec<(String, f64, f64, bool)>,
}

/// The greedy policy's switches (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GreedyFlags {
    /// Run a ready F before a ready B.
    pub prioritize_f: bool,
    /// Before the first B, don't start an F that would delay a B about to become ready.
    pub strict_warmup: bool,
    /// Run W in gaps shorter than T_W too.
    pub fill_small_gaps: bool,
}

impl GreedyFlags {
    fn tag(self) -> String {
        let b = |x: bool| if x { 'T' } else { 'F' };
        format!(
            "greedy[{}{}{}]",
            b(self.prioritize_f),
            b(self.strict_warmup),
            b(self.fill_small_gaps)
        )
    }
}

const EPS: f64 = 1e-9;

/// Builds the best schedule found for `p` devices (one stage each) and `m` microbatches.
pub fn auto_schedule(
    p: usize,
    m: usize,
    costs: &Costs,
    memory: &Memory,
    options: &AutoOptions,
) -> Result<(Schedule, AutoReport), ScheduleError> {
    if p == 0 || m == 0 {
        return Err(ScheduleError::Malformed(
            "a schedule needs at least one device and one microbatch".into(),
        ));
    }
    if costs.stages.len() != p || memory.stages.len() != p {
        return Err(ScheduleError::Malformed(format!(
            "auto places one stage per device: expected costs and memory for {p} stages"
        )));
    }
    let limit = options.memory_limit.unwrap_or(f64::INFINITY);
    let mut candidates: Vec<(String, Schedule)> = Vec::new();
    for bits in 0..8u8 {
        let flags = GreedyFlags {
            prioritize_f: bits & 1 != 0,
            strict_warmup: bits & 2 != 0,
            fill_small_gaps: bits & 4 != 0,
        };
        if let Some(s) = greedy(p, m, costs, memory, limit, flags) {
            candidates.push((flags.tag(), s));
        }
    }
    for flags in super::rounds::RoundFlags::all() {
        if let Some(s) = super::rounds::rounds(p, m, costs, memory, limit, flags) {
            candidates.push((flags.tag(), s));
        }
    }
    for (name, g) in [
        ("zb-h1", Generator::ZbH1),
        ("zb-h2", Generator::ZbH2),
        ("1f1b", Generator::OneFOneB),
        ("gpipe", Generator::GPipe),
    ] {
        candidates.push((name.to_string(), g.generate(p, m)?));
    }
    if options.backward != super::simulate::BackwardDependency::NextStage {
        candidates.push(("eager".to_string(), Generator::Eager.generate(p, m)?));
    }
    let mut report = AutoReport {
        chosen: String::new(),
        candidates: Vec::new(),
    };
    let mut best: Option<(Schedule, Simulation)> = None;
    let ctx = Judge {
        costs,
        memory,
        limit,
        backward: options.backward,
    };
    for (name, s) in candidates {
        ctx.consider(name, s, &mut best, &mut report);
    }
    if let (Some((s, _)), true) = (&best, options.search_work > 0) {
        let problem = super::search::Problem {
            costs,
            memory,
            limit,
            backward: options.backward,
        };
        let budget = (options.search_work / (3 * p * m)).max(1);
        let (polished, _) = super::search::polish(s, &problem, budget);
        let from = report.chosen.clone();
        ctx.consider(format!("search({from})"), polished, &mut best, &mut report);
    }
    if p * m <= options.ilp_max_pm {
        let warm = best.as_ref().map(|(s, _)| s.clone());
        if let Some(s) = ilp(p, m, costs, memory, limit, warm.as_ref(), options.ilp_nodes) {
            ctx.consider("ilp".to_string(), s, &mut best, &mut report);
        }
    }
    match best {
        Some((s, _)) => Ok((s, report)),
        None => Err(ScheduleError::Malformed(format!(
            "auto: no schedule fits the memory limit {limit} (one microbatch per stage needs at least M_B)"
        ))),
    }
}

/// The later of two times; NaN (not scheduled yet) wins, unlike `f64::max`.
fn later(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

/// Simulates candidates and keeps the best that fits.
struct Judge<'a> {
    costs: &'a Costs,
    memory: &'a Memory,
    limit: f64,
    backward: super::simulate::BackwardDependency,
}

impl Judge<'_> {
    fn consider(
        &self,
        name: String,
        s: Schedule,
        best: &mut Option<(Schedule, Simulation)>,
        report: &mut AutoReport,
    ) {
        let Ok(sim) = s.simulate_with(self.costs, self.memory, self.backward) else {
            return;
        };
        let fits = sim
            .devices
            .iter()
            .all(|d| d.peak_memory <= self.limit + EPS);
        report
            .candidates
            .push((name.clone(), sim.bubble_rate, sim.makespan, fits));
        let better = match best {
            None => true,
            Some((_, b)) => {
                sim.bubble_rate < b.bubble_rate - EPS
                    || (sim.bubble_rate <= b.bubble_rate + EPS && sim.makespan < b.makespan - EPS)
            }
        };
        if fits && better {
            report.chosen = name;
            *best = Some((s, sim));
        }
    }
}

/// The greedy list scheduler; `None` when it gets stuck (memory limit too small).
pub fn greedy(
    p: usize,
    m: usize,
    costs: &Costs,
    memory: &Memory,
    limit: f64,
    flags: GreedyFlags,
) -> Option<Schedule> {
    let comm = costs.comm;
    let mut end_f = vec![vec![f64::NAN; m]; p];
    let mut end_b = vec![vec![f64::NAN; m]; p];
    let (mut nf, mut nb, mut nw) = (vec![0usize; p], vec![0usize; p], vec![0usize; p]);
    let mut t = vec![0.0f64; p];
    let mut mem = vec![0.0f64; p];
    let mut stalled = vec![false; p];
    let mut lists: Vec<Vec<Action>> = vec![Vec::with_capacity(3 * m); p];
    let done = |d: usize, nw: &[usize]| nw[d] == m;
    loop {
        // The unfinished, non-stalled device that is free earliest.
        let pick = (0..p)
            .filter(|&d| !done(d, &nw) && !stalled[d])
            .min_by(|&a, &b| t[a].total_cmp(&t[b]));
        let Some(d) = pick else {
            if (0..p).all(|d| done(d, &nw)) {
                break;
            }
            // Everyone left is stalled: advance the earliest stalled devices to the next time.
            let waiting: Vec<usize> = (0..p).filter(|&d| !done(d, &nw)).collect();
            let now = waiting.iter().map(|&d| t[d]).fold(f64::INFINITY, f64::min);
            let next = waiting
                .iter()
                .map(|&d| t[d])
                .filter(|&x| x > now + EPS)
                .fold(f64::INFINITY, f64::min);
            if !next.is_finite() {
                return None;
            }
            for &d in &waiting {
                if t[d] <= now + EPS {
                    t[d] = next;
                }
                stalled[d] = false;
            }
            continue;
        };
        let now = t[d];
        let c = costs.stages[d];
        let sm = memory.stages[d];
        let cross = |x: f64| x + comm;
        // When the next F / B could start (NaN: a dependency is not scheduled yet).
        let f_mem_ok = mem[d] + sm.m_b <= limit + EPS;
        let ready_f = if nf[d] < m {
            if d == 0 {
                now
            } else {
                later(cross(end_f[d - 1][nf[d]]), now)
            }
        } else {
            f64::INFINITY
        };
        let ready_b = if nb[d] < nf[d] {
            let own = end_f[d][nb[d]];
            let next = if d + 1 == p {
                0.0
            } else {
                cross(end_b[d + 1][nb[d]])
            };
            later(later(own, next), now)
        } else {
            f64::INFINITY
        };
        let has_w = nw[d] < nb[d];
        let b_now = ready_b <= now + EPS;
        let f_now = f_mem_ok && ready_f <= now + EPS;
        let choice = if b_now && f_now {
            if flags.prioritize_f {
                ActionKind::F
            } else {
                ActionKind::B
            }
        } else if b_now {
            ActionKind::B
        } else if f_now
            && !(flags.strict_warmup
                && nb[d] == 0
                && ready_b.is_finite()
                && ready_b < now + c.f - EPS)
        {
            ActionKind::F
        } else {
            let next_f = if f_mem_ok { ready_f } else { f64::INFINITY };
            // NaN (unknown) means "not before some other device's next step".
            let next = [ready_b, next_f]
                .into_iter()
                .filter(|x| !x.is_nan())
                .fold(f64::INFINITY, f64::min);
            let unknown = ready_b.is_nan() || (f_mem_ok && ready_f.is_nan());
            let gap = next - now;
            let memory_blocked = nf[d] < m && !f_mem_ok;
            if has_w
                && (memory_blocked
                    || gap >= c.w - EPS
                    || (unknown && !next.is_finite())
                    || (flags.fill_small_gaps && gap > EPS))
            {
                ActionKind::W
            } else if next.is_finite() && next > now + EPS {
                t[d] = next;
                continue;
            } else if has_w && !unknown && !next.is_finite() {
                ActionKind::W
            } else {
                stalled[d] = true;
                continue;
            }
        };
        let (start, dur, mb) = match choice {
            ActionKind::F => (ready_f, c.f, nf[d]),
            ActionKind::B => (ready_b, c.b, nb[d]),
            _ => (now, c.w, nw[d]),
        };
        let finish = start + dur;
        match choice {
            ActionKind::F => {
                end_f[d][mb] = finish;
                nf[d] += 1;
                mem[d] += sm.m_b;
            }
            ActionKind::B => {
                end_b[d][mb] = finish;
                nb[d] += 1;
                mem[d] += sm.m_w - sm.m_b;
            }
            _ => {
                nw[d] += 1;
                mem[d] -= sm.m_w;
            }
        }
        lists[d].push(Action::new(d as u32, choice, mb as u32));
        t[d] = finish;
        stalled.iter_mut().for_each(|s| *s = false);
    }
    Some(Schedule {
        devices: lists,
        placement: (0..p as u32).collect(),
        microbatches: m,
        reverse: None,
    })
}

/// The exact ILP (App. G), solved with microlp under a branch-and-bound node budget (so the
/// result is the same on every machine); `None` when no solution is found within it. Only for
/// small p·m: it has O(p·m²) binaries.
pub fn ilp(
    p: usize,
    m: usize,
    costs: &Costs,
    memory: &Memory,
    limit: f64,
    warm: Option<&Schedule>,
    nodes: u64,
) -> Option<Schedule> {
    use microlp::{ComparisonOp, OptimizationDirection, Problem, SolveOptions, Variable as Var};
    // Action (kind k ∈ {F=0,B=1,W=2}, microbatch j) of device i has index (k·m + j).
    let n = 3 * m;
    let kind_of = |a: usize| [ActionKind::F, ActionKind::B, ActionKind::W][a / m];
    let dur = |i: usize, a: usize| {
        let c = costs.stages[i];
        [c.f, c.b, c.w][a / m]
    };
    let delta = |i: usize, a: usize| {
        let s = memory.stages[i];
        [s.m_b, s.m_w - s.m_b, -s.m_w][a / m]
    };
    // `fixed(a, b)`: Some(true) if a must precede b (same-kind order, F → B → W per microbatch,
    // and what follows from them), Some(false) if b must precede a, None if free.
    let fixed = |a: usize, b: usize| -> Option<bool> {
        let (ka, ja, kb, jb) = (a / m, a % m, b / m, b % m);
        if ka == kb {
            return Some(ja < jb);
        }
        // The earlier kind precedes when its microbatch is not later.
        if ka < kb && ja <= jb {
            return Some(true);
        }
        if kb < ka && jb <= ja {
            return Some(false);
        }
        None
    };
    let big_m: f64 = (0..p)
        .flat_map(|i| (0..n).map(move |a| (i, a)))
        .map(|(i, a)| dur(i, a))
        .sum::<f64>()
        + 2.0 * (p * m) as f64 * costs.comm
        + 1.0;
    if warm.is_some_and(|s| s.devices.iter().flatten().any(|a| a.kind == ActionKind::BW)) {
        return None;
    }

    let mut lp = Problem::new(OptimizationDirection::Minimize);
    let end: Vec<Vec<Var>> = (0..p)
        .map(|i| {
            (0..n)
                .map(|a| lp.add_var(0.0, (dur(i, a), big_m)))
                .collect()
        })
        .collect();
    let first: Vec<Var> = (0..p).map(|_| lp.add_var(0.0, (0.0, big_m))).collect();
    let span = lp.add_var(1.0, (0.0, big_m));
    // order[i][(a, b)] for a < b with a free order: 1 if a precedes b.
    let mut order: Vec<std::collections::BTreeMap<(usize, usize), Var>> =
        vec![Default::default(); p];
    for ord in order.iter_mut() {
        for a in 0..n {
            for b in a + 1..n {
                if fixed(a, b).is_none() {
                    ord.insert((a, b), lp.add_binary_var(0.0));
                }
            }
        }
    }
    let ge = ComparisonOp::Ge;
    for i in 0..p {
        for a in 0..n {
            let (k, j) = (a / m, a % m);
            // Dependencies.
            match k {
                0 if i > 0 => lp.add_constraint(
                    [(end[i][a], 1.0), (end[i - 1][a], -1.0)],
                    ge,
                    costs.comm + dur(i, a),
                ),
                1 => {
                    lp.add_constraint([(end[i][a], 1.0), (end[i][j], -1.0)], ge, dur(i, a));
                    if i + 1 < p {
                        lp.add_constraint(
                            [(end[i][a], 1.0), (end[i + 1][a], -1.0)],
                            ge,
                            costs.comm + dur(i, a),
                        );
                    }
                }
                2 => lp.add_constraint([(end[i][a], 1.0), (end[i][m + j], -1.0)], ge, dur(i, a)),
                _ => {}
            }
            // Span: first ≤ start of every action, span ≥ end − first.
            lp.add_constraint([(end[i][a], 1.0), (first[i], -1.0)], ge, dur(i, a));
            lp.add_constraint([(span, 1.0), (end[i][a], -1.0), (first[i], 1.0)], ge, 0.0);
            // Mutual exclusion on the device.
            for b in a + 1..n {
                match fixed(a, b) {
                    Some(true) => {
                        lp.add_constraint([(end[i][b], 1.0), (end[i][a], -1.0)], ge, dur(i, b))
                    }
                    Some(false) => {
                        lp.add_constraint([(end[i][a], 1.0), (end[i][b], -1.0)], ge, dur(i, a))
                    }
                    None => {
                        let o = order[i][&(a, b)];
                        // a before b (o = 1): end_b ≥ end_a + dur_b; else end_a ≥ end_b + dur_a.
                        lp.add_constraint(
                            [(end[i][b], 1.0), (end[i][a], -1.0), (o, -big_m)],
                            ge,
                            dur(i, b) - big_m,
                        );
                        lp.add_constraint(
                            [(end[i][a], 1.0), (end[i][b], -1.0), (o, big_m)],
                            ge,
                            dur(i, a),
                        );
                    }
                }
            }
            // Memory just after a: its own delta plus those of the actions before it.
            if limit.is_finite() {
                let mut terms = Vec::new();
                let mut constant = delta(i, a);
                for b in (0..n).filter(|&b| b != a) {
                    let d = delta(i, b);
                    match fixed(b, a) {
                        Some(true) => constant += d,
                        Some(false) => {}
                        None if b < a => terms.push((order[i][&(b, a)], d)),
                        None => {
                            // b before a is 1 − order(a, b).
                            constant += d;
                            terms.push((order[i][&(a, b)], -d));
                        }
                    }
                }
                lp.add_constraint(terms, ComparisonOp::Le, limit - constant);
            }
        }
    }
    let mut options = SolveOptions::default();
    options.node_limit = Some(nodes.max(1));
    if let Some(w) = warm {
        // The warm schedule's order, with its simulated times (without T_comm the times of a
        // valid order are feasible; with it the solver repairs the continuous part).
        let mut start = Vec::new();
        for (i, list) in w.devices.iter().enumerate() {
            let mut pos = vec![0; n];
            for (k, act) in list.iter().enumerate() {
                let kind = match act.kind {
                    ActionKind::F => 0,
                    ActionKind::B => 1,
                    _ => 2,
                };
                pos[kind * m + act.microbatch as usize] = k;
            }
            for (&(a, b), &v) in &order[i] {
                start.push((v, if pos[a] < pos[b] { 1.0 } else { 0.0 }));
            }
        }
        options.warm_start = Some(start);
    }
    let sol = lp.solve_with(options).ok()?.into_solution().ok()?;
    let devices = (0..p)
        .map(|i| {
            let mut acts: Vec<(f64, usize)> =
                (0..n).map(|a| (sol.var_value(end[i][a]), a)).collect();
            acts.sort_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)));
            acts.into_iter()
                .map(|(_, a)| Action::new(i as u32, kind_of(a), (a % m) as u32))
                .collect()
        })
        .collect();
    Some(Schedule {
        devices,
        placement: (0..p as u32).collect(),
        microbatches: m,
        reverse: None,
    })
}
