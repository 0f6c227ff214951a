//! `remat`: recomputation and activation offload of the stash sets that `split-bw` made, under a
//! memory budget.
//!
//! # Entry and exit
//!
//! Entry: a verified module made by `split-bw` (per stage `@<name>.s<k>.F/.B/.W`). Exit: the same
//! functions, computing bit-identical values, where every **saved value** of F (an F value that
//! B or W reads through a `stash.*` interface) is, per stage, one of:
//!
//! - **keep**: F returns it as `stash.*` and it stays in device memory until B (or W);
//! - **recompute**: F no longer returns it; B and W re-emit the forward nodes that make it, in
//!   phase `recompute`, at their beginning, from kept or offloaded values, parameters and
//!   constants (forward values that only a recomputation reads become new kept or offloaded
//!   values, named `stash.r<N>` with `N` the value's print number in F);
//! - **offload**: F returns `stop_gradient v` in phase `offload` under the name
//!   `stash.offload.<suffix>`; B and W take it and copy it back with a `stop_gradient` in phase
//!   `reload` before anything else. The runtime keeps `stash.offload.*` values in a host pool.
//! - **hand-off** (a value W needs): F no longer returns it; B recomputes it, in phase
//!   `recompute`, and returns it under the name `stash.h.<suffix>`, a B→W value that W takes in
//!   place of the saved one. It is held only from B to W, not from F to W: under zero-bubble
//!   schedules, whose W runs long after F, that is the shorter interval.
//!
//! Recomputation is deterministic (dropout masks are functions of seed and index), so a
//! recomputed value is bit-identical to the one F computed.
//!
//! # Choice graph and the ILP (why not the e-graph)
//!
//! A plan is a choice per forward value `v` of F. The ILP's binary variables per value: `keep_v`
//! (kept from F), `off_v` (offloaded) and `rc_v` (recomputed in B), at most one of the three;
//! `kw_v ≤ keep_v` (kept until W); `rw_v` (recomputed in W); `hw_v ≤ rc_v` (recomputed in B and
//! handed to W). Every saved value B reads needs `keep_v + off_v + rc_v = 1`, every saved value W
//! reads `kw_v + off_v + rw_v + hw_v ≥ 1`, and a value recomputed in B (in W) needs each of its
//! forward operands available in B (in W) the same way (parameters and constants are always
//! available; F's inputs cannot be recomputed). A value recomputed for several saved values is
//! counted once per function (shared work, several roots). The cost is the added time:
//!
//! `Σ (rc_v + rw_v) · t_fwd(v) + 2 · max(0, Σ off_v · bytes_v / host_bandwidth − min(T_F, T_B))`
//!
//! (`t_fwd` as the `partition` cost model: `max(flops/rate, bytes/memory_bandwidth)`; the copies
//! run on a background thread, and the part of each one-way copy that one action of the stage —
//! at least the shorter of its F and B — does not hide is charged there and back, as
//! [`exposed_transfer`] and the simulator do). The memory model of a stage, `k` microbatches in
//! flight between their F and their W, `k_B` between their F and their B and `k_W` between their
//! B and their W ([`InFlight`]; each at least 1):
//!
//! `need = max over moments t of [Σ keep_v · k_v(t) · bytes_v + Σ hw_v · k_W(t) · bytes_v
//!        + k_W(t) · (B→W stash)] + 3 · Σ off_v · bytes_v`
//!
//! with `k_v(t) = k(t)` for a kept value W needs (`kw_v`: W reads it, or W's recomputation does)
//! and `k_B(t)` otherwise. The
//! moments are the counts after each action of the stage's device (one memory constraint per
//! moment; without a schedule, one moment with the largest counts). The runtime frees a saved
//! value after its last planned use, so this is the simulator's memory model with `M_B`/`M_W`
//! split per value. Offloaded values count three times ([`OFFLOAD_COPIES`]): the runtime reloads
//! them for the running action and prefetches them for the next one, and the device copies of
//! the previous action's offloads may still be waiting for the copy thread (an action starts only
//! when the offloads of the actions before its predecessor are done). `auto` minimises the cost
//! subject to `need ≤ memory-limit` with microlp's branch and bound ([`ILP_NODES`], [`ILP_GAP`]:
//! a node budget, not a time limit, so the plan is the same on every machine); when the solver
//! finds no plan within its budget, or a worse one, a greedy plan is used (start from the
//! smallest plan, turn values back to kept while they fit). Recomputation's transient memory
//! inside B or W (the recomputed values are live while that function runs) is not part of
//! `need`, like every other temporary of B and W; views (`reshape`) are re-created rather than
//! saved and cost nothing.
//!
//! The choice is made directly on this graph rather than in the e-graph of `egraph/`: the graph
//! has no rewrites to explore (an e-class would hold exactly one forward node), so an e-graph adds
//! nothing but a translation; the ILP over the forward DAG is the same extraction problem
//! (several roots, shared nodes counted once) with the memory constraint that egg's extractors
//! lack.
//!
//! # Policies
//!
//! - `none`: keep every saved value.
//! - `full`: keep only the stage's inputs and each layer's input (for parameters named
//!   `…layers.<i>.…`, the nearest common dominator in F of the nodes reading layer `i`'s
//!   parameters); recompute the rest.
//! - `selective` (Korthikanti et al. 2022, as Megatron-LM runs it): re-run the checkpointed core
//!   attention from its inputs — the values around each `softmax` between matrix products (scale,
//!   mask, softmax, dropout), the products on both sides of it (`q·kᵀ` and `probs·v`) and the
//!   layout ops after the second (the context's transpose and reshape) — and keep every other
//!   saved value (matrix-product inputs, the MLP). Megatron's checkpoint recomputes the context
//!   and still keeps it for the output projection; here the recomputed context is handed from B to
//!   W instead of being kept from F, so the same FLOPs buy a shorter lifetime (where B recomputes
//!   the core; a first stage's B reads nothing, and its W recomputes the core itself). Keeping
//!   the context from F and recomputing only `q·kᵀ` and the elementwise core is cheaper in FLOPs
//!   and costs more memory under zero-bubble schedules; `auto` weighs the two.
//! - `offload-all`: offload every saved value.
//! - `auto` (the default when `memory-limit` is given): the ILP above. Without a limit it keeps
//!   everything. An infeasible limit is an error naming the smallest feasible limit found (the
//!   ILP minimising memory, or the greedy's smallest plan).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use cleave_ir::cost::node_flops;
use cleave_ir::printer::print_numbering;
use cleave_ir::{Function, Module, Node, Op, Output, Phase, TensorType, Value};
use cranelift_entity::SecondaryMap;
use microlp::{ComparisonOp, OptimizationDirection, Problem, SolveOptions, Variable as LpVar};

use crate::partition::DeviceProfile;
use crate::pass::{Pass, PassContext, PassError, PassOptions};
use crate::split::{split_stages, stash_report};

/// A named recomputation/offload policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Policy {
    /// Keep every saved value.
    None,
    /// Keep only the stage's inputs.
    Full,
    /// Recompute the attention core (Korthikanti et al.).
    Selective,
    /// Offload every saved value.
    OffloadAll,
    /// The cheapest plan under the memory limit (ILP).
    Auto,
}

impl Policy {
    /// The policy names, for messages.
    pub const NAMES: &'static str = "none, full, selective, offload-all, auto";

    /// Parses a policy name.
    pub fn parse(name: &str) -> Option<Policy> {
        Some(match name {
            "none" => Policy::None,
            "full" => Policy::Full,
            "selective" => Policy::Selective,
            "offload-all" => Policy::OffloadAll,
            "auto" => Policy::Auto,
            _ => return None,
        })
    }

    /// The policy's name.
    pub fn name(self) -> &'static str {
        match self {
            Policy::None => "none",
            Policy::Full => "full",
            Policy::Selective => "selective",
            Policy::OffloadAll => "offload-all",
            Policy::Auto => "auto",
        }
    }
}

/// What happens to one forward value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Choice {
    /// Saved on the device.
    Keep,
    /// Saved in host memory.
    Offload,
    /// Recomputed in B and W.
    Recompute,
    /// Recomputed in B, which hands it to W (a B→W value).
    Handoff,
}

impl Choice {
    /// Whether B re-emits the value (recomputed, or recomputed and handed to W).
    pub fn recomputed(self) -> bool {
        matches!(self, Choice::Recompute | Choice::Handoff)
    }

    /// The choice's name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Choice::Keep => "keep",
            Choice::Offload => "offload",
            Choice::Recompute => "recompute",
            Choice::Handoff => "handoff",
        }
    }
}

/// A plan for one stage: the choice of every forward value of F that is saved or recomputed
/// (values of F not listed are neither).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StagePlan {
    /// Choice per value of F.
    pub choices: BTreeMap<Value, Choice>,
}

/// Microbatches in flight on a stage (see the module docs): the largest counts, and the counts
/// at every moment of the schedule.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct InFlight {
    /// Between F and W, at most.
    pub saved: u64,
    /// Between B and W, at most.
    pub b_to_w: u64,
    /// Between F and B, at most.
    pub f_to_b: u64,
    /// The distinct `(F→B, F→W, B→W)` counts after each action of the stage's device (empty:
    /// the largest counts at once).
    pub points: Vec<[u64; 3]>,
}

impl InFlight {
    /// The moments the memory constraint is checked at.
    pub fn moments(&self) -> Vec<[u64; 3]> {
        if self.points.is_empty() {
            vec![[self.f_to_b.min(self.saved), self.saved, self.b_to_w]]
        } else {
            self.points.clone()
        }
    }
}

impl From<u64> for InFlight {
    fn from(k: u64) -> Self {
        InFlight {
            saved: k.max(1),
            b_to_w: k.max(1),
            f_to_b: k.max(1),
            points: Vec::new(),
        }
    }
}

impl From<&InFlight> for InFlight {
    fn from(k: &InFlight) -> Self {
        k.clone()
    }
}

impl std::fmt::Display for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} microbatch(es) in flight, {} between F and B, {} between B and W",
            self.saved, self.f_to_b, self.b_to_w
        )
    }
}

/// How an infeasible limit's error names the smallest feasible one: this text, the byte count,
/// ` bytes` ([`named_smallest`] reads it back).
pub const SMALLEST_FEASIBLE: &str = "the smallest feasible limit is ";

/// The smallest feasible limit an error message names (the last one, if several).
pub fn named_smallest(message: &str) -> Option<u64> {
    let (_, rest) = message.rsplit_once(SMALLEST_FEASIBLE)?;
    rest.split_whitespace().next()?.parse().ok()
}

/// Device copies of one microbatch's offloaded values the runtime may hold at once (see the
/// module docs).
pub const OFFLOAD_COPIES: u64 = 3;

/// The `remat` pass.
#[derive(Clone, Debug)]
pub struct Remat {
    /// The policy.
    pub policy: Policy,
    /// Per-stage memory limit for saved values, bytes (see the module docs).
    pub memory_limit: Option<u64>,
    /// Microbatches in flight per stage (1 by default; the pipeline driver passes the schedule's).
    pub in_flight: u64,
    /// Device profile for time costs.
    pub profile: DeviceProfile,
}

impl Remat {
    /// Builds the pass from options `policy`, `memory-limit`, `in-flight`, `profile`.
    pub fn from_options(mut o: PassOptions) -> Result<Self, PassError> {
        let limit: Option<u64> = match o.take("memory-limit") {
            None => None,
            Some(t) => Some(parse_bytes(&t).map_err(|message| PassError::BadOption {
                pass: "remat".into(),
                key: "memory-limit".into(),
                message,
            })?),
        };
        let policy = match o.take("policy") {
            None if limit.is_some() => Policy::Auto,
            None => Policy::None,
            Some(p) => Policy::parse(&p).ok_or_else(|| PassError::BadOption {
                pass: "remat".into(),
                key: "policy".into(),
                message: format!("`{p}`; valid policies: {}", Policy::NAMES),
            })?,
        };
        let in_flight = o.take_parsed("in-flight", 1u64)?;
        let profile = match o.take("profile") {
            None => DeviceProfile::load("cpu-epyc-2core"),
            Some(p) => DeviceProfile::load(&p),
        }
        .map_err(|message| PassError::BadOption {
            pass: "remat".into(),
            key: "profile".into(),
            message,
        })?;
        o.finish()?;
        Ok(Remat {
            policy,
            memory_limit: limit,
            in_flight: in_flight.max(1),
            profile,
        })
    }
}

/// Parses a byte count: an integer with an optional `K`, `M`, `G` (powers of 1024) suffix.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (num, mul) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mul = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => return Err(format!("`{text}`: unknown suffix `{c}` (K, M or G)")),
            };
            (&t[..i], mul)
        }
        _ => (t, 1),
    };
    num.parse::<u64>()
        .map(|n| n * mul)
        .map_err(|e| format!("`{text}` is not a byte count: {e}"))
}

impl Pass for Remat {
    fn name(&self) -> &'static str {
        "remat"
    }

    fn run(&self, module: &mut Module, ctx: &mut PassContext) -> Result<(), PassError> {
        let fail = |message: String| PassError::Failed {
            pass: "remat",
            message,
        };
        let stages: Vec<(String, String, String)> = split_stages(module)
            .iter()
            .map(|s| (s.f.name.clone(), s.b.name.clone(), s.w.name.clone()))
            .collect();
        if stages.is_empty() {
            return Err(fail(
                "no split stages (@<name>.s<k>.F/B/W); run `split-bw` before `remat`".into(),
            ));
        }
        for (f, b, w) in stages {
            let g = ChoiceGraph::new(
                module.function(&f).expect("F"),
                module.function(&b).expect("B"),
                module.function(&w).expect("W"),
                &self.profile,
            );
            let plan = g
                .plan(self.policy, self.memory_limit, self.in_flight)
                .map_err(|e| fail(format!("@{f}: {e}")))?;
            let (nf, nb, nw) = g.apply(&plan);
            let summary = g.summary(&plan, self.in_flight);
            ctx.note(
                "remat",
                format!(
                    "@{f}: {} kept {} B, offloaded {} B, handed from B to W {} B, recomputed {} \
                     values ({} FLOPs)",
                    self.policy.name(),
                    summary.kept_bytes,
                    summary.offloaded_bytes,
                    summary.handed_bytes,
                    summary.recomputed_values,
                    summary.recompute_flops
                ),
            );
            *module.function_mut(&f).expect("F") = nf;
            *module.function_mut(&b).expect("B") = nb;
            *module.function_mut(&w).expect("W") = nw;
        }
        Ok(())
    }
}

/// The branch-and-bound nodes one ILP solve may take; at the limit the best plan found so far is
/// used (microlp proves optimality quickly on chains, but on a GPT stage's ~65 values it can
/// stop with a plan within a few percent). A node budget rather than a time limit keeps plans
/// the same on every machine and every run.
pub const ILP_NODES: u64 = 2000;

/// The stage size (candidate values) a node budget is stated for: a stage with more candidates
/// gets proportionally fewer branch-and-bound nodes ([`ChoiceGraph`]'s scaled budget). Four
/// layers of the d 4096 GPT make about 230 candidates; twelve make about 700, whose nodes each
/// cost three times as much.
pub const NODE_BUDGET_CANDIDATES: u64 = 240;

/// The relative optimality gap at which an ILP solve stops.
pub const ILP_GAP: f64 = 0.01;

/// Totals of a plan.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PlanSummary {
    /// Bytes kept on the device per microbatch.
    pub kept_bytes: u64,
    /// Bytes offloaded per microbatch.
    pub offloaded_bytes: u64,
    /// Bytes recomputed in B and handed to W per microbatch.
    pub handed_bytes: u64,
    /// Values recomputed.
    pub recomputed_values: usize,
    /// Forward FLOPs recomputed, in B and in W (a value both recompute counts twice; a value
    /// several others need, once per function).
    pub recompute_flops: u64,
    /// Added seconds (the ILP's objective).
    pub added_seconds: f64,
    /// `need` of the module docs.
    pub need_bytes: u64,
}

/// The choice graph of one stage (see the module docs).
pub struct ChoiceGraph<'a> {
    f: &'a Function,
    b: &'a Function,
    w: &'a Function,
    /// Forward values of F that are candidates, in body order, with their byte size and
    /// whether they can be recomputed (not F inputs).
    cands: Vec<Value>,
    /// F values saved today (F outputs named `stash.*`), with their names.
    saved: BTreeMap<Value, String>,
    /// Forward seconds of the node defining each candidate.
    secs: BTreeMap<Value, f64>,
    host_bytes_per_s: f64,
    /// Seconds of copying one action hides: the shorter of F and B (see
    /// [`exposed_transfer`]).
    hide_seconds: f64,
    /// Bytes B hands to W.
    b_to_w: u64,
    /// Saved values W reads.
    w_reads: BTreeSet<Value>,
    /// Saved values B reads.
    b_reads: BTreeSet<Value>,
    /// Branch-and-bound nodes per ILP solve ([`ILP_NODES`] unless set).
    node_budget: u64,
    /// A plan for the same problem to start the ILP's search from (its first incumbent).
    hint: Option<StagePlan>,
    /// Set when an ILP solve stopped at its node budget (rather than proving its plan optimal
    /// or within the gap): a larger budget could find a better plan.
    budget_cut: std::cell::Cell<bool>,
}

/// Where a plan's values are needed, as [`ChoiceGraph::apply`] rewrites B and W.
#[derive(Debug, Default)]
struct Uses {
    /// Kept values W reads, directly or through its recomputation (held from F until W).
    held_w: BTreeSet<Value>,
    /// Values B recomputes.
    rc_b: BTreeSet<Value>,
    /// Values W recomputes.
    rc_w: BTreeSet<Value>,
    /// Hand-offs W takes from B.
    handed: BTreeSet<Value>,
}

/// A stage's plan as a vector over the candidates (`None`: not in the plan), for the greedy's
/// many trial plans: [`DenseChoices::prune`] and [`DenseChoices::need`] are
/// [`ChoiceGraph::prune`] and the `need_bytes` of [`ChoiceGraph::summary`] for plans without
/// hand-offs, over indices instead of maps.
struct DenseChoices {
    /// Candidate → index (body order).
    index: HashMap<Value, usize>,
    values: Vec<Value>,
    bytes: Vec<u64>,
    /// Indices of the non-free forward operands of each candidate.
    operands: Vec<Vec<usize>>,
    /// Whether each candidate is a saved value (F output `stash.*`).
    saved: Vec<bool>,
    /// Indices of the saved values W reads.
    w_reads: Vec<usize>,
    moments: Vec<[u64; 3]>,
    b_to_w: u64,
}

impl DenseChoices {
    fn new(g: &ChoiceGraph<'_>, in_flight: &InFlight) -> Self {
        let index: HashMap<Value, usize> =
            g.cands.iter().enumerate().map(|(i, &v)| (v, i)).collect();
        DenseChoices {
            values: g.cands.clone(),
            bytes: g.cands.iter().map(|&v| g.bytes(v)).collect(),
            operands: g
                .cands
                .iter()
                .map(|&v| g.forward_operands(v).iter().map(|u| index[u]).collect())
                .collect(),
            saved: g.cands.iter().map(|v| g.saved.contains_key(v)).collect(),
            w_reads: g.w_reads.iter().map(|v| index[v]).collect(),
            moments: in_flight.moments(),
            b_to_w: g.b_to_w,
            index,
        }
    }

    fn of_plan(&self, plan: &StagePlan) -> Vec<Option<Choice>> {
        self.values
            .iter()
            .map(|v| plan.choices.get(v).copied())
            .collect()
    }

    fn to_plan(&self, choices: &[Option<Choice>]) -> StagePlan {
        StagePlan {
            choices: self
                .values
                .iter()
                .zip(choices)
                .filter_map(|(&v, c)| c.map(|c| (v, c)))
                .collect(),
        }
    }

    /// [`ChoiceGraph::prune`] in place: keeps the choices of the saved values and of what their
    /// recomputation reads, drops the rest.
    fn prune(&self, choices: &mut [Option<Choice>]) {
        let mut needed = self.saved.clone();
        for i in (0..choices.len()).rev() {
            if !needed[i] {
                choices[i] = None;
                continue;
            }
            if choices[i].is_some_and(|c| c.recomputed()) {
                for &u in &self.operands[i] {
                    needed[u] = true;
                }
            }
        }
    }

    /// `need_bytes` of [`ChoiceGraph::summary`] for a plan without hand-offs.
    fn need(&self, choices: &[Option<Choice>]) -> u64 {
        // Kept values W reads directly or through its recomputation.
        let mut held_w = vec![false; choices.len()];
        let mut seen = vec![false; choices.len()];
        let mut stack = self.w_reads.clone();
        while let Some(i) = stack.pop() {
            if std::mem::replace(&mut seen[i], true) {
                continue;
            }
            match choices[i] {
                Some(Choice::Keep) => held_w[i] = true,
                Some(Choice::Recompute) => stack.extend(&self.operands[i]),
                _ => {}
            }
        }
        let (mut to_b, mut to_w, mut offloaded) = (0u64, 0u64, 0u64);
        for (i, c) in choices.iter().enumerate() {
            match c {
                Some(Choice::Keep) if held_w[i] => to_w += self.bytes[i],
                Some(Choice::Keep) => to_b += self.bytes[i],
                Some(Choice::Offload) => offloaded += self.bytes[i],
                _ => {}
            }
        }
        self.moments
            .iter()
            .map(|p| p[0] * to_b + p[1] * to_w + p[2] * self.b_to_w)
            .max()
            .unwrap_or(0)
            + OFFLOAD_COPIES * offloaded
    }
}

fn is_free(op: &Op) -> bool {
    matches!(op, Op::Param { .. } | Op::Constant { .. } | Op::Iota { .. })
}

impl<'a> ChoiceGraph<'a> {
    /// Builds the graph of a stage's F, B, W.
    pub fn new(f: &'a Function, b: &'a Function, w: &'a Function, profile: &DeviceProfile) -> Self {
        let saved: BTreeMap<Value, String> = f
            .outputs
            .iter()
            .filter(|o| o.name.starts_with("stash."))
            .map(|o| (o.value, o.name.clone()))
            .collect();
        // Candidates: ancestors of saved values through non-free nodes.
        let mut need: BTreeSet<Value> = saved.keys().copied().collect();
        let mut cands = Vec::new();
        for &n in f.body.iter().rev() {
            let d = &f.nodes[n];
            if is_free(&d.op) || !d.results.iter().any(|r| need.contains(r)) {
                continue;
            }
            for &u in &d.operands {
                need.insert(u);
            }
        }
        for &n in &f.body {
            let d = &f.nodes[n];
            if is_free(&d.op) {
                continue;
            }
            cands.extend(d.results.iter().copied().filter(|r| need.contains(r)));
        }
        let mut secs = BTreeMap::new();
        for &v in &cands {
            let n = f.values[v].def;
            // Views (reshape) cost nothing: the runtime shares the operand's buffer.
            let view = matches!(f.nodes[n].op, Op::Reshape { .. } | Op::StopGradient);
            secs.insert(
                v,
                if view {
                    0.0
                } else {
                    forward_seconds(profile, f, n)
                },
            );
        }
        let st = crate::split::SplitStage {
            base: String::new(),
            stage: 0,
            f,
            b,
            w,
        };
        let reads = |g: &Function| -> BTreeSet<Value> {
            let names: BTreeSet<&str> = g.data_inputs().map(|a| a.name).collect();
            saved
                .iter()
                .filter(|(_, n)| names.contains(n.as_str()))
                .map(|(&v, _)| v)
                .collect()
        };
        ChoiceGraph {
            w_reads: reads(w),
            b_reads: reads(b),
            f,
            b,
            w,
            cands,
            saved,
            secs,
            host_bytes_per_s: profile.host_bytes_per_s,
            hide_seconds: function_seconds(profile, f).min(function_seconds(profile, b)),
            b_to_w: stash_report(&st).b_to_w,
            node_budget: ILP_NODES,
            hint: None,
            budget_cut: std::cell::Cell::new(false),
        }
    }

    /// The same graph whose ILP solves stop after `nodes` branch-and-bound nodes (a smaller
    /// budget plans faster and at most as well: the search is the same, cut earlier).
    pub fn with_node_budget(mut self, nodes: u64) -> Self {
        self.node_budget = nodes.max(1);
        self
    }

    /// The same graph whose `auto` ILP starts from `plan` (a plan of the same problem made
    /// with a smaller node budget): the search prunes against it from the first node, so it
    /// ends sooner and never worse than `plan`.
    pub fn with_hint(mut self, plan: Option<StagePlan>) -> Self {
        self.hint = plan;
        self
    }

    /// The node budget of one solve: [`ChoiceGraph::with_node_budget`]'s figure for a stage of
    /// up to [`NODE_BUDGET_CANDIDATES`] candidates, proportionally fewer nodes for a larger
    /// one (at least one), so that a solve's work grows with the stage no faster than its root
    /// LP's. Deterministic, like the budget itself.
    fn scaled_node_budget(&self) -> u64 {
        let n = self.cands.len().max(1) as u64;
        (self.node_budget * NODE_BUDGET_CANDIDATES / n).clamp(1, self.node_budget)
    }

    /// Whether an ILP solve of this graph stopped at its node budget.
    pub fn budget_cut(&self) -> bool {
        self.budget_cut.get()
    }

    fn bytes(&self, v: Value) -> u64 {
        self.f.ty(v).size_bytes() as u64
    }

    fn recomputable(&self, v: Value) -> bool {
        self.f.nodes[self.f.values[v].def].op.arg_role().is_none()
    }

    fn forward_operands(&self, v: Value) -> Vec<Value> {
        let d = &self.f.nodes[self.f.values[v].def];
        d.operands
            .iter()
            .copied()
            .filter(|&u| !is_free(&self.f.nodes[self.f.values[u].def].op))
            .collect()
    }

    /// Microbatches a kept value is held for at moment `p`: until W (`held_w`) or until B.
    fn multiplier(held_w: bool, p: [u64; 3]) -> u64 {
        if held_w {
            p[1]
        } else {
            p[0]
        }
    }

    /// What B and W recompute, what W takes from B, and the kept values held until W: from
    /// what W reads, through W's recomputation (hand-offs are W's inputs), then from what B
    /// reads and the hand-offs, through B's.
    fn uses(&self, plan: &StagePlan) -> Uses {
        let mut u = Uses::default();
        let mut seen = BTreeSet::new();
        let mut stack: Vec<Value> = self.w_reads.iter().copied().collect();
        while let Some(v) = stack.pop() {
            if !seen.insert(v) {
                continue;
            }
            match plan.choices.get(&v) {
                Some(Choice::Keep) => {
                    u.held_w.insert(v);
                }
                Some(Choice::Recompute) => {
                    u.rc_w.insert(v);
                    stack.extend(self.forward_operands(v));
                }
                Some(Choice::Handoff) => {
                    u.handed.insert(v);
                }
                _ => {}
            }
        }
        let mut stack: Vec<Value> = self.b_reads.iter().chain(&u.handed).copied().collect();
        while let Some(v) = stack.pop() {
            if plan.choices.get(&v).is_some_and(|c| c.recomputed()) && u.rc_b.insert(v) {
                stack.extend(self.forward_operands(v));
            }
        }
        u
    }

    /// Hand-offs W does not take become plain recomputations.
    fn settle(&self, mut plan: StagePlan) -> StagePlan {
        let handed = self.uses(&plan).handed;
        for (v, c) in plan.choices.iter_mut() {
            if *c == Choice::Handoff && !handed.contains(v) {
                *c = Choice::Recompute;
            }
        }
        plan
    }

    /// The saved values (F outputs named `stash.*`) with their names.
    pub fn saved(&self) -> &BTreeMap<Value, String> {
        &self.saved
    }

    /// Completes a plan whose recomputed set is given: every operand of a recomputed value that
    /// is not recomputed is kept (unless offloaded), and every saved value not recomputed is kept
    /// unless offloaded.
    fn close(&self, mut choices: BTreeMap<Value, Choice>) -> StagePlan {
        for &v in self.saved.keys() {
            choices.entry(v).or_insert(Choice::Keep);
        }
        // A reshape is a view of its operand's buffer: save the operand, re-create the view.
        for &v in &self.cands {
            if self.is_view(v) && choices.get(&v) == Some(&Choice::Keep) {
                choices.insert(v, Choice::Recompute);
            }
        }
        for &v in self.cands.iter().rev() {
            if choices.get(&v).is_some_and(|c| c.recomputed()) {
                for u in self.forward_operands(v) {
                    choices.entry(u).or_insert(Choice::Keep);
                }
            }
        }
        // Inputs cannot be recomputed.
        for (v, c) in choices.iter_mut() {
            if c.recomputed() && !self.recomputable(*v) {
                *c = Choice::Keep;
            }
        }
        StagePlan { choices }
    }

    /// The plan of a policy (see the module docs).
    pub fn plan(
        &self,
        policy: Policy,
        limit: Option<u64>,
        in_flight: impl Into<InFlight>,
    ) -> Result<StagePlan, String> {
        let in_flight = &in_flight.into();
        let plan = match policy {
            Policy::None => self.close(BTreeMap::new()),
            Policy::Full => {
                let layers = self.layer_inputs();
                let ch = self
                    .cands
                    .iter()
                    .map(|&v| {
                        let c = if self.recomputable(v) && !layers.contains(&v) {
                            Choice::Recompute
                        } else {
                            Choice::Keep
                        };
                        (v, c)
                    })
                    .collect();
                self.prune(self.close(ch))
            }
            Policy::Selective => {
                let region = self.attention_region();
                let mut ch = self
                    .saved
                    .keys()
                    .filter(|v| region.contains(v))
                    .map(|&v| (v, Choice::Recompute))
                    .collect::<BTreeMap<_, _>>();
                // Re-run the region from its inputs: recompute back through the region, and
                // through the products that feed it and were not saved (q·kᵀ).
                for &v in self.cands.iter().rev() {
                    if ch.get(&v) == Some(&Choice::Recompute) {
                        for u in self.forward_operands(v) {
                            if !self.recomputable(u) {
                                continue;
                            }
                            if region.contains(&u)
                                || (self.is_matmul(u) && !self.saved.contains_key(&u))
                            {
                                ch.entry(u).or_insert(Choice::Recompute);
                            }
                        }
                    }
                }
                self.hand_to_w(self.close(ch))
            }
            Policy::OffloadAll => {
                self.close(self.saved.keys().map(|&v| (v, Choice::Offload)).collect())
            }
            Policy::Auto => match limit {
                None => self.close(BTreeMap::new()),
                Some(limit) => self.ilp(limit, in_flight)?,
            },
        };
        if let Some(limit) = limit {
            let need = self.summary(&plan, in_flight).need_bytes;
            if need > limit {
                let min = self.min_need(in_flight)?;
                return Err(format!(
                    "policy `{}` needs {need} bytes for saved values ({in_flight}), over the memory limit {limit}; {SMALLEST_FEASIBLE}{min} bytes",
                    policy.name()
                ));
            }
        }
        Ok(plan)
    }

    /// Drops kept values that no recomputation and no consumer needs (after `full`).
    fn prune(&self, plan: StagePlan) -> StagePlan {
        let mut needed: BTreeSet<Value> = self.saved.keys().copied().collect();
        let mut out = BTreeMap::new();
        for &v in self.cands.iter().rev() {
            if !needed.contains(&v) {
                continue;
            }
            let Some(&c) = plan.choices.get(&v) else {
                continue;
            };
            out.insert(v, c);
            if c.recomputed() {
                needed.extend(self.forward_operands(v));
            }
        }
        StagePlan { choices: out }
    }

    /// The input of every layer of the stage: for each `layers.<i>.` parameter prefix, the
    /// nearest common dominator (in F, from its inputs) of the nodes that read those parameters,
    /// not itself one of them.
    pub fn layer_inputs(&self) -> BTreeSet<Value> {
        let f = self.f;
        let layer_of = |name: &str| -> Option<String> {
            let i = name.find("layers.")?;
            let rest = &name[i + "layers.".len()..];
            let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
            (!digits.is_empty()).then(|| format!("{}{digits}", &name[..i + "layers.".len()]))
        };
        // Dominator tree over F's compute and input nodes (a virtual root above the inputs),
        // by intersecting predecessors' dominators in body order (a DAG needs one pass).
        let mut idom: BTreeMap<Node, Option<Node>> = BTreeMap::new();
        let mut depth: BTreeMap<Node, usize> = BTreeMap::new();
        let lca = |mut a: Option<Node>,
                   mut b: Option<Node>,
                   idom: &BTreeMap<Node, Option<Node>>,
                   depth: &BTreeMap<Node, usize>|
         -> Option<Node> {
            let d = |n: Option<Node>| n.map_or(0, |n| depth[&n]);
            while a != b {
                if d(a) >= d(b) {
                    a = a.and_then(|n| idom[&n]);
                } else {
                    b = b.and_then(|n| idom[&n]);
                }
            }
            a
        };
        let mut groups: BTreeMap<String, Vec<Node>> = BTreeMap::new();
        for &n in &f.body {
            let d = &f.nodes[n];
            if matches!(
                d.op,
                Op::Param { .. } | Op::Constant { .. } | Op::Iota { .. }
            ) {
                continue;
            }
            let preds: Vec<Node> = d
                .operands
                .iter()
                .map(|&u| f.values[u].def)
                .filter(|p| idom.contains_key(p))
                .collect();
            if preds.is_empty() && d.op.arg_role().is_none() {
                // Computed from parameters and constants only: not on any data path.
                continue;
            }
            let mut dom = None;
            for (i, &p) in preds.iter().enumerate() {
                dom = if i == 0 {
                    Some(p)
                } else {
                    lca(dom, Some(p), &idom, &depth)
                };
            }
            idom.insert(n, dom);
            depth.insert(n, dom.map_or(1, |x| depth[&x] + 1));
            for &u in &d.operands {
                if let Op::Param { name, .. } = &f.nodes[f.values[u].def].op {
                    if let Some(k) = layer_of(name) {
                        groups.entry(k).or_default().push(n);
                    }
                }
            }
        }
        let mut out = BTreeSet::new();
        for nodes in groups.values() {
            let mut d = Some(nodes[0]);
            for &n in &nodes[1..] {
                d = lca(d, Some(n), &idom, &depth);
            }
            while let Some(x) = d.filter(|x| nodes.contains(x)) {
                d = idom[&x];
            }
            if let Some(x) = d {
                out.insert(f.result(x));
            }
        }
        out
    }

    fn is_view(&self, v: Value) -> bool {
        matches!(
            self.f.nodes[self.f.values[v].def].op,
            Op::Reshape { .. } | Op::StopGradient
        )
    }

    fn is_matmul(&self, v: Value) -> bool {
        matches!(
            self.f.nodes[self.f.values[v].def].op,
            Op::MatMul { .. } | Op::Conv2d { .. }
        )
    }

    /// The values each value of F is an operand of.
    fn consumers(&self) -> BTreeMap<Value, Vec<Value>> {
        let mut consumers: BTreeMap<Value, Vec<Value>> = BTreeMap::new();
        for &n in &self.f.body {
            let d = &self.f.nodes[n];
            for &u in &d.operands {
                consumers.entry(u).or_default().extend(d.results.clone());
            }
        }
        consumers
    }

    /// The attention core: forward values connected to a `softmax` without crossing a matrix
    /// product (its operands' producers up to the products, its consumers up to the next product,
    /// and what those read that is not a product output).
    fn attention_core(&self) -> BTreeSet<Value> {
        let f = self.f;
        let mut core: BTreeSet<Value> = BTreeSet::new();
        let consumers = self.consumers();
        let mut stack: Vec<Value> = f
            .body
            .iter()
            .filter(|&&n| matches!(f.nodes[n].op, Op::Softmax { .. }))
            .map(|&n| f.result(n))
            .collect();
        while let Some(v) = stack.pop() {
            if !core.insert(v) {
                continue;
            }
            let d = &f.nodes[f.values[v].def];
            // Backward through non-products.
            for &u in &d.operands {
                let ud = &f.nodes[f.values[u].def];
                if !is_free(&ud.op) && ud.op.arg_role().is_none() && !self.is_matmul(u) {
                    stack.push(u);
                }
            }
            // Forward through non-products.
            for &c in consumers.get(&v).into_iter().flatten() {
                if !self.is_matmul(c) {
                    stack.push(c);
                }
            }
        }
        core
    }

    /// The checkpointed core attention of `selective`: the attention core, the matrix products
    /// that read it (`probs·v`), and the layout ops (transpose, reshape) after those products,
    /// up to the next product (the context the output projection reads).
    fn attention_region(&self) -> BTreeSet<Value> {
        let f = self.f;
        let mut region = self.attention_core();
        let consumers = self.consumers();
        let mut stack: Vec<Value> = region
            .iter()
            .flat_map(|v| consumers.get(v).into_iter().flatten())
            .copied()
            .filter(|&c| self.is_matmul(c))
            .collect();
        while let Some(v) = stack.pop() {
            if !region.insert(v) {
                continue;
            }
            for &c in consumers.get(&v).into_iter().flatten() {
                let layout = matches!(
                    f.nodes[f.values[c].def].op,
                    Op::Transpose { .. } | Op::Reshape { .. }
                );
                if layout {
                    stack.push(c);
                }
            }
        }
        region
    }

    /// Turns recomputed values W would re-create into values B hands to W, where that saves W
    /// work B does anyway: from what W reads, through recomputed views, a recomputed value whose
    /// recomputation in W would repeat some of B's becomes a hand-off (B finishes it from what
    /// it recomputes). Where B recomputes none of it (a first stage, whose B has no input
    /// gradient to make and reads nothing), W keeps recomputing it: a hand-off would only hold
    /// it from B to W.
    fn hand_to_w(&self, mut plan: StagePlan) -> StagePlan {
        let rc_b = self.uses(&plan).rc_b;
        // Whether recomputing `v` in W would repeat a recomputation of B.
        let repeats_b = |plan: &StagePlan, v: Value| {
            let mut seen = BTreeSet::new();
            let mut stack = vec![v];
            while let Some(x) = stack.pop() {
                if rc_b.contains(&x) {
                    return true;
                }
                if seen.insert(x) && plan.choices.get(&x) == Some(&Choice::Recompute) {
                    stack.extend(self.forward_operands(x));
                }
            }
            false
        };
        let mut seen = BTreeSet::new();
        let mut stack: Vec<Value> = self.w_reads.iter().copied().collect();
        while let Some(v) = stack.pop() {
            if !seen.insert(v) || plan.choices.get(&v) != Some(&Choice::Recompute) {
                continue;
            }
            if self.is_view(v) {
                stack.extend(self.forward_operands(v));
            } else if repeats_b(&plan, v) {
                plan.choices.insert(v, Choice::Handoff);
            }
        }
        plan
    }

    /// Memory and time figures of a plan. Recomputation is counted where it runs: a value B
    /// and W both recompute counts twice.
    pub fn summary(&self, plan: &StagePlan, in_flight: impl Into<InFlight>) -> PlanSummary {
        let in_flight = &in_flight.into();
        let mut s = PlanSummary::default();
        let moments = in_flight.moments();
        let uses = self.uses(plan);
        let mut weighted = vec![0u64; moments.len()];
        for (&v, &c) in &plan.choices {
            match c {
                Choice::Keep => {
                    s.kept_bytes += self.bytes(v);
                    for (w, &p) in weighted.iter_mut().zip(&moments) {
                        *w += Self::multiplier(uses.held_w.contains(&v), p) * self.bytes(v);
                    }
                }
                Choice::Offload => s.offloaded_bytes += self.bytes(v),
                Choice::Recompute | Choice::Handoff => {}
            }
        }
        for &v in &uses.handed {
            s.handed_bytes += self.bytes(v);
            for (w, &p) in weighted.iter_mut().zip(&moments) {
                *w += p[2] * self.bytes(v);
            }
        }
        let one_way = s.offloaded_bytes as f64 / self.host_bytes_per_s;
        s.added_seconds += 2.0 * exposed_transfer(one_way, self.hide_seconds, self.hide_seconds);
        s.recomputed_values = uses.rc_b.union(&uses.rc_w).count();
        for &v in uses.rc_b.iter().chain(&uses.rc_w) {
            s.recompute_flops += node_flops(self.f, self.f.values[v].def).total();
            s.added_seconds += self.secs.get(&v).copied().unwrap_or(0.0);
        }
        s.need_bytes = weighted
            .iter()
            .zip(&moments)
            .map(|(w, p)| w + p[2] * self.b_to_w)
            .max()
            .unwrap_or(0)
            + OFFLOAD_COPIES * s.offloaded_bytes;
        s
    }

    /// The ILP of the module docs. `objective_memory` minimises `need` instead of time; `hint`
    /// is a plan to start from (the branch and bound's first incumbent, if it fits).
    fn solve(
        &self,
        limit: Option<u64>,
        in_flight: &InFlight,
        objective_memory: bool,
        hint: Option<&StagePlan>,
    ) -> Result<Option<StagePlan>, String> {
        // Bytes in MiB and seconds in milliseconds keep the solver's numbers tame.
        let scale = 1.0 / (1u64 << 20) as f64;
        let moments = in_flight.moments();
        let most = |i: usize| moments.iter().map(|p| p[i]).max().unwrap_or(1) as f64;
        // Objective weights: the added time, or the memory (with the time as a tie-breaker).
        let (w_time, w_mem) = if objective_memory {
            (1e-9, 1.0)
        } else {
            (1.0, 0.0)
        };
        let mut lp = Problem::new(OptimizationDirection::Minimize);
        // A tiny per-value charge breaks ties toward fewer recomputed and offloaded values.
        const TIE: f64 = 1e-9;
        #[derive(Clone, Copy)]
        struct Vars {
            /// Kept from F (until B at least).
            k: LpVar,
            /// Offloaded.
            o: LpVar,
            /// Kept until W.
            kw: LpVar,
            /// Recomputed in B, recomputed in W, recomputed in B and handed to W.
            rc: Option<(LpVar, LpVar, LpVar)>,
        }
        let mut x: BTreeMap<Value, Vars> = BTreeMap::new();
        // One-way copy time of the offloaded values beyond what one action hides.
        let exposed = lp.add_var(2.0 * w_time, (0.0, f64::INFINITY));
        let mut copy_ms: Vec<(LpVar, f64)> = Vec::new();
        for &v in &self.cands {
            let bytes = self.bytes(v) as f64 * scale;
            let k = lp.add_binary_var(w_mem * most(0) * bytes);
            let kw = lp.add_binary_var(w_mem * (most(1) - most(0)).max(0.0) * bytes);
            let o = lp.add_binary_var(w_mem * OFFLOAD_COPIES as f64 * bytes + TIE);
            copy_ms.push((o, self.bytes(v) as f64 / self.host_bytes_per_s * 1e3));
            let rc = self.recomputable(v).then(|| {
                let t = w_time * (self.secs[&v] * 1e3 + TIE);
                (
                    lp.add_binary_var(t),
                    lp.add_binary_var(t),
                    lp.add_binary_var(w_mem * most(2) * bytes),
                )
            });
            x.insert(v, Vars { k, o, kw, rc });
        }
        copy_ms.push((exposed, -1.0));
        lp.add_constraint(copy_ms, ComparisonOp::Le, self.hide_seconds * 1e3);
        // Available in B: kept, offloaded or recomputed in B; in W: kept until W, offloaded,
        // recomputed in W or handed from B.
        let avail_b = |u: &Vars| -> Vec<(LpVar, f64)> {
            let mut e = vec![(u.k, 1.0), (u.o, 1.0)];
            if let Some((r, _, _)) = u.rc {
                e.push((r, 1.0));
            }
            e
        };
        let avail_w = |u: &Vars| -> Vec<(LpVar, f64)> {
            let mut e = vec![(u.kw, 1.0), (u.o, 1.0)];
            if let Some((_, rw, hw)) = u.rc {
                e.extend([(rw, 1.0), (hw, 1.0)]);
            }
            e
        };
        for &v in &self.cands {
            let xv = x[&v];
            lp.add_constraint(avail_b(&xv), ComparisonOp::Le, 1.0);
            if self.b_reads.contains(&v) {
                lp.add_constraint(avail_b(&xv), ComparisonOp::Ge, 1.0);
            }
            if self.w_reads.contains(&v) {
                lp.add_constraint(avail_w(&xv), ComparisonOp::Ge, 1.0);
            }
            lp.add_constraint([(xv.kw, 1.0), (xv.k, -1.0)], ComparisonOp::Le, 0.0);
            if let Some((r, rw, hw)) = xv.rc {
                lp.add_constraint([(hw, 1.0), (r, -1.0)], ComparisonOp::Le, 0.0);
                for u in self.forward_operands(v) {
                    let mut e = avail_b(&x[&u]);
                    e.push((r, -1.0));
                    lp.add_constraint(e, ComparisonOp::Ge, 0.0);
                    let mut e = avail_w(&x[&u]);
                    e.push((rw, -1.0));
                    lp.add_constraint(e, ComparisonOp::Ge, 0.0);
                }
            }
        }
        if let Some(limit) = limit {
            for p in &moments {
                let mut e = Vec::new();
                for &v in &self.cands {
                    let xv = x[&v];
                    let bytes = self.bytes(v) as f64 * scale;
                    e.push((xv.k, p[0] as f64 * bytes));
                    e.push((xv.kw, (p[1] - p[0].min(p[1])) as f64 * bytes));
                    e.push((xv.o, OFFLOAD_COPIES as f64 * bytes));
                    if let Some((_, _, hw)) = xv.rc {
                        e.push((hw, p[2] as f64 * bytes));
                    }
                }
                let fixed = (p[2] * self.b_to_w) as f64 * scale;
                lp.add_constraint(e, ComparisonOp::Le, limit as f64 * scale - fixed + 1e-9);
            }
        }
        let mut options = SolveOptions::default();
        options.node_limit = Some(self.scaled_node_budget());
        options.mip_gap = ILP_GAP;
        if let Some(plan) = hint {
            let uses = self.uses(plan);
            let mut start = Vec::new();
            let mut one_way_ms = 0.0;
            for (&v, xv) in &x {
                let c = plan.choices.get(&v).copied();
                let mut set = |var: LpVar, on: bool| start.push((var, if on { 1.0 } else { 0.0 }));
                set(xv.k, c == Some(Choice::Keep));
                set(xv.kw, c == Some(Choice::Keep) && uses.held_w.contains(&v));
                set(xv.o, c == Some(Choice::Offload));
                if c == Some(Choice::Offload) {
                    one_way_ms += self.bytes(v) as f64 / self.host_bytes_per_s * 1e3;
                }
                if let Some((r, rw, hw)) = xv.rc {
                    set(r, uses.rc_b.contains(&v));
                    set(rw, uses.rc_w.contains(&v));
                    set(hw, uses.handed.contains(&v));
                }
            }
            start.push((exposed, (one_way_ms - self.hide_seconds * 1e3).max(0.0)));
            options.warm_start = Some(start);
        }
        let outcome = lp.solve_with(options);
        if let Ok(o) = &outcome {
            if o.termination_reason() == microlp::TerminationReason::NodeLimit {
                self.budget_cut.set(true);
            }
        }
        let sol = match outcome {
            Ok(outcome) => match outcome.into_solution() {
                Ok(sol) => sol,
                // No feasible plan within the node budget: the callers fall back to the greedy.
                Err(_) => return Ok(None),
            },
            Err(microlp::Error::Infeasible) => return Ok(None),
            Err(e) => return Err(format!("the recomputation ILP failed: {e}")),
        };
        let on = |v: LpVar| sol.var_value(v) > 0.5;
        let mut choices = BTreeMap::new();
        for (&v, xv) in &x {
            let c = match xv.rc {
                _ if on(xv.k) => Choice::Keep,
                _ if on(xv.o) => Choice::Offload,
                Some((r, _, hw)) if on(r) && on(hw) => Choice::Handoff,
                Some((r, rw, _)) if on(r) || on(rw) => Choice::Recompute,
                _ => continue,
            };
            choices.insert(v, c);
        }
        Ok(Some(self.settle(self.prune(self.close(choices)))))
    }

    fn ilp(&self, limit: u64, in_flight: &InFlight) -> Result<StagePlan, String> {
        let fits = |p: &StagePlan| self.summary(p, in_flight).need_bytes <= limit;
        // A hint that fits and adds no time is already optimal.
        if let Some(h) = self.hint.as_ref().filter(|h| fits(h)) {
            if self.summary(h, in_flight).added_seconds == 0.0 {
                return Ok(h.clone());
            }
        }
        // No hint: started from the greedy plan, the node-limited search ends no better here.
        let exact = self
            .solve(Some(limit), in_flight, false, self.hint.as_ref())?
            .filter(fits);
        let greedy = self.greedy(Some(limit), in_flight).filter(fits);
        let cost = |p: &StagePlan| self.summary(p, in_flight).added_seconds;
        match (exact, greedy) {
            (Some(a), Some(b)) => Ok(if cost(&b) < cost(&a) { b } else { a }),
            (Some(a), None) | (None, Some(a)) => Ok(a),
            // At a limit near the smallest need: the plan minimising memory.
            (None, None) if let Some(p) = self.solve(None, in_flight, true, None)?.filter(fits) => {
                Ok(p)
            }
            (None, None) => {
                let min = self.min_need(in_flight)?;
                Err(format!(
                    "no recomputation/offload plan fits the memory limit {limit} bytes ({in_flight}); {SMALLEST_FEASIBLE}{min} bytes"
                ))
            }
        }
    }

    /// The smallest `need` found: the smaller of the greedy's smallest plan and the ILP's plan
    /// minimising memory (whose objective weighs each kept value by its largest count, so with
    /// several moments the figure can be above the true minimum).
    pub fn min_need(&self, in_flight: impl Into<InFlight>) -> Result<u64, String> {
        let in_flight = &in_flight.into();
        let smallest = self.greedy(None, in_flight);
        let mut best = smallest
            .as_ref()
            .map(|p| self.summary(p, in_flight).need_bytes)
            .unwrap_or(u64::MAX);
        if let Some(p) = self.solve(None, in_flight, true, smallest.as_ref())? {
            best = best.min(self.summary(&p, in_flight).need_bytes);
        }
        Ok(best)
    }

    /// The greedy fallback: the smallest plan (recompute everything that can be, offload what
    /// is kept when that takes less memory), then values turned back to kept, the most
    /// recomputation time saved per byte first, while `need` stays within `limit`. With no
    /// limit it returns the smallest plan.
    ///
    /// The loop tries one value at a time, so it runs on [`DenseChoices`] (choices in a vector
    /// over the candidates, `need` without maps): the same decisions as pruning and summarising
    /// each trial plan, in O(candidates) per trial.
    fn greedy(&self, limit: Option<u64>, in_flight: &InFlight) -> Option<StagePlan> {
        let all = self
            .cands
            .iter()
            .map(|&v| {
                let c = if self.recomputable(v) {
                    Choice::Recompute
                } else {
                    Choice::Keep
                };
                (v, c)
            })
            .collect();
        let mut plan = self.prune(self.close(all));
        if in_flight.saved > OFFLOAD_COPIES {
            for c in plan.choices.values_mut() {
                if *c == Choice::Keep {
                    *c = Choice::Offload;
                }
            }
        }
        let limit = match limit {
            None => return Some(plan),
            Some(l) => l,
        };
        let dense = DenseChoices::new(self, in_flight);
        let mut choices = dense.of_plan(&plan);
        if dense.need(&choices) > limit {
            return None;
        }
        let mut order: Vec<Value> = plan
            .choices
            .iter()
            .filter(|(_, &c)| c == Choice::Recompute)
            .map(|(&v, _)| v)
            .collect();
        order.sort_by(|&a, &b| {
            let r = |v: Value| self.secs[&v] / self.bytes(v).max(1) as f64;
            r(b).total_cmp(&r(a))
        });
        let mut trial = choices.clone();
        for v in order {
            let i = dense.index[&v];
            if choices[i] != Some(Choice::Recompute) {
                continue;
            }
            trial.copy_from_slice(&choices);
            trial[i] = Some(Choice::Keep);
            dense.prune(&mut trial);
            if dense.need(&trial) <= limit {
                std::mem::swap(&mut choices, &mut trial);
            }
        }
        plan = dense.to_plan(&choices);
        debug_assert_eq!(
            self.summary(&plan, in_flight).need_bytes,
            dense.need(&choices)
        );
        Some(plan)
    }

    /// Rewrites F, B and W for a plan (see the module docs).
    pub fn apply(&self, plan: &StagePlan) -> (Function, Function, Function) {
        let numbering = print_numbering(self.f);
        let name_of = |v: Value, c: Choice| -> String {
            let base = self
                .saved
                .get(&v)
                .cloned()
                .unwrap_or_else(|| format!("stash.r{}", numbering[v].expect("defined")));
            match c {
                Choice::Offload => format!("stash.offload.{}", &base["stash.".len()..]),
                Choice::Handoff => format!("stash.h.{}", &base["stash.".len()..]),
                _ => base,
            }
        };
        // F: drop outputs of values no longer saved under their name; add new ones.
        let mut f = self.f.clone();
        let old_outputs = std::mem::take(&mut f.outputs);
        let mut new_outputs: Vec<Output> = Vec::new();
        for o in old_outputs {
            let keep = match self.saved.get(&o.value) {
                Some(name) if *name == o.name => plan.choices.get(&o.value) == Some(&Choice::Keep),
                _ => true,
            };
            if keep {
                new_outputs.push(o);
            }
        }
        let mut have: BTreeSet<String> = new_outputs.iter().map(|o| o.name.clone()).collect();
        for (&v, &c) in &plan.choices {
            let name = name_of(v, c);
            if c.recomputed() || have.contains(&name) {
                continue;
            }
            let value = if c == Choice::Offload {
                let n = f.push_node(Op::StopGradient, vec![v], vec![f.ty(v).clone()]);
                f.nodes[n].phase = Phase::Offload;
                f.nodes[n].stage = self.f.nodes[self.f.values[v].def].stage;
                f.result(n)
            } else {
                v
            };
            have.insert(name.clone());
            new_outputs.push(Output { name, value });
        }
        f.outputs = new_outputs;
        let (w, handed) = self.rewrite_consumer(self.w, plan, &name_of, Phase::Wgrad, None);
        let (b, _) = self.rewrite_consumer(self.b, plan, &name_of, Phase::Dgrad, Some(&handed));
        (f, b, w)
    }

    /// Rewrites B (`hand` is the hand-offs W takes: B recomputes them and returns them) or W
    /// (`hand` is `None`: hand-offs are inputs). Returns the function and the hand-offs it takes.
    fn rewrite_consumer(
        &self,
        g: &Function,
        plan: &StagePlan,
        name_of: &dyn Fn(Value, Choice) -> String,
        arg_phase: Phase,
        hand: Option<&BTreeSet<Value>>,
    ) -> (Function, BTreeSet<Value>) {
        // Whether g re-creates a value of F: recomputed values, and in B the hand-offs.
        let remade = |v: &Value| match plan.choices.get(v) {
            Some(Choice::Recompute) => true,
            Some(Choice::Handoff) => hand.is_some(),
            _ => false,
        };
        let by_name: BTreeMap<&str, Value> =
            self.saved.iter().map(|(&v, n)| (n.as_str(), v)).collect();
        // Stash inputs of g that stand for F values not kept under that name.
        let mut replaced: BTreeMap<Value, Value> = BTreeMap::new(); // g input value -> F value
        for a in g.data_inputs() {
            if let Some(&fv) = by_name.get(a.name) {
                if plan.choices.get(&fv) != Some(&Choice::Keep) {
                    replaced.insert(a.value, fv);
                }
            }
        }
        // F values to re-create in g: the closure of recomputed values under recomputed operands.
        let mut need_rc: BTreeSet<Value> = BTreeSet::new();
        let mut stack: Vec<Value> = replaced.values().copied().filter(remade).collect();
        stack.extend(hand.into_iter().flatten().copied());
        while let Some(v) = stack.pop() {
            if !need_rc.insert(v) {
                continue;
            }
            for u in self.forward_operands(v) {
                if remade(&u) {
                    stack.push(u);
                }
            }
        }
        let mut out = Function::new(g.name.clone());
        let mut gmap: SecondaryMap<Value, Option<Value>> = SecondaryMap::with_default(None);
        let mut fmap: BTreeMap<Value, Value> = BTreeMap::new(); // F value -> value in out
        let mut args: BTreeMap<String, Value> = BTreeMap::new();
        let copy = |out: &mut Function, d: &cleave_ir::NodeData, ops: Vec<Value>, tys| {
            let n = out.push_node(d.op.clone(), ops, tys);
            out.nodes[n].phase = d.phase;
            out.nodes[n].stage = d.stage;
            n
        };
        // Arguments of g first (except replaced stash inputs).
        for &n in &g.body {
            let d = &g.nodes[n];
            if d.op.arg_role().is_none() || replaced.contains_key(&d.results[0]) {
                continue;
            }
            let nn = copy(&mut out, d, vec![], vec![g.ty(d.results[0]).clone()]);
            let v = out.result(nn);
            gmap[d.results[0]] = Some(v);
            if let Op::Input { name, .. } | Op::Param { name, .. } = &d.op {
                args.insert(name.clone(), v);
            }
        }
        let stage = g.body.iter().find_map(|&n| g.nodes[n].stage);
        // Values available from F: kept and offloaded values read by g or its recomputation.
        let mut wanted: BTreeSet<Value> =
            replaced.values().copied().filter(|v| !remade(v)).collect();
        for &v in &need_rc {
            for u in self.forward_operands(v) {
                if !remade(&u) {
                    wanted.insert(u);
                }
            }
        }
        let taken: BTreeSet<Value> = wanted
            .iter()
            .copied()
            .filter(|v| plan.choices.get(v) == Some(&Choice::Handoff))
            .collect();
        let mut reloads = Vec::new();
        for &fv in &wanted {
            let c = plan.choices.get(&fv).copied().unwrap_or(Choice::Keep);
            let name = name_of(fv, c);
            let ty = self.f.ty(fv).clone();
            let v = match args.get(&name) {
                Some(&v) => v,
                None => {
                    let n = out.push_node(
                        Op::Input {
                            name: name.clone(),
                            ty: ty.clone(),
                        },
                        vec![],
                        vec![ty.clone()],
                    );
                    out.nodes[n].phase = arg_phase;
                    let v = out.result(n);
                    args.insert(name, v);
                    v
                }
            };
            if c == Choice::Offload {
                reloads.push((fv, v, ty));
            } else {
                fmap.insert(fv, v);
            }
        }
        for (fv, v, ty) in reloads {
            let n = out.push_node(Op::StopGradient, vec![v], vec![ty]);
            out.nodes[n].phase = Phase::Reload;
            out.nodes[n].stage = stage;
            fmap.insert(fv, out.result(n));
        }
        // Recomputation, in F's order.
        for &n in &self.f.body {
            let d = &self.f.nodes[n];
            if !d.results.iter().any(|r| need_rc.contains(r)) {
                continue;
            }
            let mut ops = Vec::new();
            for &u in &d.operands {
                if let Some(&x) = fmap.get(&u) {
                    ops.push(x);
                    continue;
                }
                let ud = &self.f.nodes[self.f.values[u].def];
                let x = match &ud.op {
                    Op::Param { name, ty } => match args.get(name) {
                        Some(&x) => x,
                        None => {
                            let pn = out.push_node(ud.op.clone(), vec![], vec![ty.clone()]);
                            out.nodes[pn].phase = arg_phase;
                            let x = out.result(pn);
                            args.insert(name.clone(), x);
                            x
                        }
                    },
                    _ => {
                        // A constant or iota: re-created.
                        let cn = out.push_node(ud.op.clone(), vec![], vec![self.f.ty(u).clone()]);
                        out.nodes[cn].phase = Phase::Recompute;
                        out.nodes[cn].stage = ud.stage;
                        out.result(cn)
                    }
                };
                fmap.insert(u, x);
                ops.push(x);
            }
            let tys = d.results.iter().map(|&r| self.f.ty(r).clone()).collect();
            let nn = out.push_node(d.op.clone(), ops, tys);
            out.nodes[nn].phase = Phase::Recompute;
            out.nodes[nn].stage = d.stage;
            for (&r, &nr) in d.results.iter().zip(&out.nodes[nn].results.clone()) {
                fmap.insert(r, nr);
            }
        }
        for (&gv, fv) in &replaced {
            gmap[gv] = Some(fmap[fv]);
        }
        // The rest of g.
        for &n in &g.body {
            let d = &g.nodes[n];
            if d.op.arg_role().is_some() {
                continue;
            }
            let ops = d
                .operands
                .iter()
                .map(|&u| gmap[u].expect("operand mapped"))
                .collect();
            let tys = d.results.iter().map(|&r| g.ty(r).clone()).collect();
            let nn = copy(&mut out, d, ops, tys);
            for (&r, &nr) in d.results.iter().zip(&out.nodes[nn].results.clone()) {
                gmap[r] = Some(nr);
            }
        }
        out.outputs = g
            .outputs
            .iter()
            .map(|o| Output {
                name: o.name.clone(),
                value: gmap[o.value].expect("output mapped"),
            })
            .collect();
        for &v in hand.into_iter().flatten() {
            out.outputs.push(Output {
                name: name_of(v, Choice::Handoff),
                value: fmap[&v],
            });
        }
        (out, taken)
    }
}

/// Seconds of a function under a profile: [`forward_seconds`] of its nodes; arguments cost
/// nothing, and neither do views (the runtime aliases a reshape).
pub fn function_seconds(p: &DeviceProfile, f: &Function) -> f64 {
    f.body
        .iter()
        .filter(|&&n| {
            let op = &f.nodes[n].op;
            op.arg_role().is_none() && !matches!(op, Op::Reshape { .. } | Op::StopGradient)
        })
        .map(|&n| forward_seconds(p, f, n))
        .sum()
}

/// The part of a one-way copy of `one_way` seconds that compute does not hide: the runtime's
/// copy thread offloads F's values while the device runs its next action and reloads them while
/// it runs the action before the B (or W) that reads them, so a copy is hidden up to the length
/// of one action, at least the stage's shorter of `t_f` and `t_b`.
pub fn exposed_transfer(one_way: f64, t_f: f64, t_b: f64) -> f64 {
    (one_way - t_f.min(t_b)).max(0.0)
}

/// Forward seconds of a node under a profile (the `partition` model without the backward factor).
pub fn forward_seconds(p: &DeviceProfile, f: &Function, n: Node) -> f64 {
    let fl = node_flops(f, n);
    let d = f.node(n);
    let bytes: usize = d
        .operands
        .iter()
        .chain(&d.results)
        .map(|&v| f.ty(v).size_bytes())
        .sum();
    let compute = fl.matmul as f64 / p.matmul_flops_per_s + fl.other as f64 / p.other_flops_per_s;
    compute.max(bytes as f64 / p.memory_bytes_per_s)
}

/// The type of a value (re-exported for reports).
pub fn value_type(f: &Function, v: Value) -> &TensorType {
    f.ty(v)
}

/// What [`plan_stages`] chose for one stage.
#[derive(Clone, Debug, PartialEq)]
pub struct StageMemory {
    /// The F function's name.
    pub function: String,
    /// Microbatches in flight.
    pub in_flight: InFlight,
    /// The stage's share of its device's limit, if any.
    pub limit: Option<u64>,
    /// Saved values by name: bytes and choice.
    pub values: Vec<(String, u64, Choice)>,
    /// Totals.
    pub summary: PlanSummary,
    /// Transfer seconds of the offloaded values (there and back) under the profile.
    pub transfer_seconds: f64,
}

/// Plans and applies `policy` to every stage of a split module. `in_flight[s]` is stage `s`'s
/// microbatches in flight and `placement[s]` its device; a device's `limit` is shared among its
/// stages in proportion to their needs under `none`.
pub fn plan_stages(
    module: &mut Module,
    policy: Policy,
    limit: Option<u64>,
    in_flight: &[InFlight],
    placement: &[usize],
    profile: &DeviceProfile,
) -> Result<Vec<StageMemory>, String> {
    plan_stages_reserved(module, policy, limit, &[], in_flight, placement, profile)
}

/// [`plan_stages`] with `reserved[d]` bytes of device `d`'s limit taken by what is not a saved
/// value (parameters, gradients, optimizer state, the programs' workspace, values crossing
/// devices, …; missing entries are 0): the saved values of the device's stages share
/// `limit − reserved[d]`, and an infeasible limit's error names `reserved[d]` plus the smallest
/// need of the saved values.
pub fn plan_stages_reserved(
    module: &mut Module,
    policy: Policy,
    limit: Option<u64>,
    reserved: &[u64],
    in_flight: &[InFlight],
    placement: &[usize],
    profile: &DeviceProfile,
) -> Result<Vec<StageMemory>, String> {
    plan_stages_cached(
        module,
        policy,
        limit,
        reserved,
        in_flight,
        placement,
        profile,
        &mut PlanCache::default(),
    )
}

/// The plans [`plan_stages_cached`] has made for the stages of **one** split module, by what
/// decides them (stage, policy, limit share, in-flight counts), so that a search that plans the
/// same module for many schedules (the joint choice) solves each distinct stage problem once.
/// Plans are deterministic (the ILP stops after a node budget), so a cached plan is the plan
/// that would be made again.
#[derive(Debug)]
pub struct PlanCache {
    /// (stage, in-flight, policy, limited?) → (need under `none`, smallest need if looked up).
    needs: HashMap<NeedKey, (u64, Option<u64>)>,
    /// (stage, policy, share, in-flight, node budget) → the plan or why there is none.
    plans: HashMap<PlanKey, Result<StagePlan, String>>,
    /// The plans whose solves ended before their node budget: a larger budget runs the same
    /// search to the same end, so its plan is this one.
    complete: std::collections::HashSet<PlanKey>,
    /// Branch-and-bound nodes per ILP solve of the plans made from now on.
    pub node_budget: u64,
    /// Stage problems answered from the cache.
    pub hits: usize,
    /// Stage problems solved.
    pub misses: usize,
}

type PlanKey = (usize, Policy, Option<u64>, InFlight, u64);
type NeedKey = (usize, InFlight, Policy, bool);

impl Default for PlanCache {
    fn default() -> Self {
        PlanCache {
            needs: HashMap::new(),
            plans: HashMap::new(),
            complete: std::collections::HashSet::new(),
            node_budget: ILP_NODES,
            hits: 0,
            misses: 0,
        }
    }
}

/// A stage's need under `none` and (when `with_min`) its smallest need under `policy`,
/// remembered in `cache`.
#[allow(clippy::too_many_arguments)]
fn stage_needs(
    module: &Module,
    (f, b, w): &(String, String, String),
    policy: Policy,
    limit: Option<u64>,
    in_flight: &InFlight,
    profile: &DeviceProfile,
    cache: &mut PlanCache,
    stage: usize,
    with_min: bool,
) -> Result<(u64, Option<u64>), String> {
    let key = (stage, in_flight.clone(), policy, limit.is_some());
    let known = cache.needs.get(&key).copied();
    if let Some((need, smallest)) = known {
        if smallest.is_some() || !with_min {
            return Ok((need, smallest));
        }
    }
    let g = ChoiceGraph::new(
        module.function(f).expect("F"),
        module.function(b).expect("B"),
        module.function(w).expect("W"),
        profile,
    );
    let need = match known {
        Some((need, _)) => need,
        None => {
            let p = g.plan(Policy::None, None, in_flight)?;
            g.summary(&p, in_flight).need_bytes
        }
    };
    let smallest = if !with_min {
        None
    } else {
        Some(match (limit, policy) {
            (None, _) => 0,
            // `auto` can go down to the smallest plan; a named policy needs its own plan.
            (Some(_), Policy::Auto) => g.min_need(in_flight)?.min(need),
            (Some(_), _) => {
                let own = g.plan(policy, None, in_flight)?;
                g.summary(&own, in_flight).need_bytes
            }
        })
    };
    cache.needs.insert(key, (need, smallest));
    Ok((need, smallest))
}

/// The error of the device whose smallest needs (those known) plus reserved bytes exceed `l`,
/// the largest such first. `groups` maps each device to its stages.
fn feasible_or_error(
    l: u64,
    groups: &BTreeMap<usize, Vec<usize>>,
    min: &[Option<u64>],
    reserved_on: &dyn Fn(usize) -> u64,
    in_flight: &[InFlight],
) -> Result<(), String> {
    let floor_of =
        |d: usize| reserved_on(d) + groups[&d].iter().map(|&t| min[t].unwrap_or(0)).sum::<u64>();
    let worst = groups
        .iter()
        .filter(|(_, on)| on.iter().all(|&t| min[t].is_some()))
        .map(|(&d, _)| d)
        .max_by_key(|&d| floor_of(d));
    if let Some(d) = worst.filter(|&d| floor_of(d) > l) {
        let on = &groups[&d];
        return Err(format!(
            "device {d}: the memory limit {l} bytes is infeasible; {SMALLEST_FEASIBLE}{} bytes ({} bytes reserved for parameters, gradients, workspace and values crossing devices; saved values of stages {on:?}: {})",
            floor_of(d),
            reserved_on(d),
            on.iter()
                .map(|&t| in_flight[t].to_string())
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    Ok(())
}

/// [`plan_stages_reserved`] answering repeated stage problems from `cache`, which must only
/// ever see `module`'s un-rewritten stages (the same base module each call; callers clone it).
#[allow(clippy::too_many_arguments)]
pub fn plan_stages_cached(
    module: &mut Module,
    policy: Policy,
    limit: Option<u64>,
    reserved: &[u64],
    in_flight: &[InFlight],
    placement: &[usize],
    profile: &DeviceProfile,
    cache: &mut PlanCache,
) -> Result<Vec<StageMemory>, String> {
    let reserved_on = |d: usize| reserved.get(d).copied().unwrap_or(0);
    let names: Vec<(String, String, String)> = split_stages(module)
        .iter()
        .map(|s| (s.f.name.clone(), s.b.name.clone(), s.w.name.clone()))
        .collect();
    if names.len() != in_flight.len() || names.len() != placement.len() {
        return Err(format!(
            "{} stages, but in-flight counts for {} and a placement for {}",
            names.len(),
            in_flight.len(),
            placement.len()
        ));
    }
    // Needs under `none` and smallest needs (the policy's own need for a named policy), for
    // sharing a device's limit: every stage gets its smallest need, the rest is shared in
    // proportion to what keeping everything would add. A stage alone on its device under
    // `auto` gets the device's whole limit whatever its smallest need, so that need (an ILP of
    // its own) is only found when the stage's plan fails, for the error.
    let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (t, &d) in placement.iter().enumerate() {
        groups.entry(d).or_default().push(t);
    }
    let lazy =
        |i: usize| limit.is_some() && policy == Policy::Auto && groups[&placement[i]].len() == 1;
    let mut base = Vec::new();
    let mut min: Vec<Option<u64>> = Vec::new();
    for i in 0..names.len() {
        let (need, smallest) = stage_needs(
            module,
            &names[i],
            policy,
            limit,
            &in_flight[i],
            profile,
            cache,
            i,
            !lazy(i),
        )?;
        base.push(need);
        min.push(smallest);
    }
    let mut shares = vec![None; names.len()];
    if let Some(l) = limit {
        feasible_or_error(l, &groups, &min, &reserved_on, in_flight)?;
        for (&d, on) in &groups {
            if let [t] = on[..] {
                if min[t].is_none() {
                    shares[t] = Some(l.saturating_sub(reserved_on(d)));
                    continue;
                }
            }
            let min_of = |t: usize| min[t].expect("smallest need of a shared device");
            let floor = reserved_on(d) + on.iter().map(|&t| min_of(t)).sum::<u64>();
            let extra: u64 = on.iter().map(|&t| base[t].saturating_sub(min_of(t))).sum();
            for &t in on {
                let add = if extra == 0 {
                    0
                } else {
                    ((l - floor) as u128 * base[t].saturating_sub(min_of(t)) as u128
                        / extra as u128) as u64
                };
                shares[t] = Some(min_of(t) + add);
            }
        }
    }
    // The stage problems not in the cache, solved on as many threads as there are cores (each
    // solve is deterministic, so the plans do not depend on the thread count).
    let budget = cache.node_budget;
    let key_of = |i: usize| (i, policy, shares[i], in_flight[i].clone(), budget);
    // A problem solved to its end under a smaller budget has the same plan under this one.
    for i in 0..names.len() {
        let key = key_of(i);
        if cache.plans.contains_key(&key) {
            continue;
        }
        let done = cache
            .complete
            .iter()
            .find(|k| k.0 == i && k.1 == policy && k.2 == shares[i] && k.3 == in_flight[i])
            .cloned();
        if let Some(k) = done {
            let plan = cache.plans[&k].clone();
            cache.plans.insert(key.clone(), plan);
            cache.complete.insert(key);
        }
    }
    let missing: Vec<usize> = (0..names.len())
        .filter(|&i| !cache.plans.contains_key(&key_of(i)))
        .collect();
    cache.hits += names.len() - missing.len();
    cache.misses += missing.len();
    let solve = |i: usize| {
        let (f, b, w) = &names[i];
        // The plan of the same problem under the largest smaller budget, if one was made.
        let hint = cache
            .plans
            .iter()
            .filter(|(k, made)| {
                k.0 == i
                    && k.1 == policy
                    && k.2 == shares[i]
                    && k.3 == in_flight[i]
                    && k.4 < budget
                    && made.is_ok()
            })
            .max_by_key(|(k, _)| k.4)
            .and_then(|(_, made)| made.clone().ok());
        let g = ChoiceGraph::new(
            module.function(f).expect("F"),
            module.function(b).expect("B"),
            module.function(w).expect("W"),
            profile,
        )
        .with_node_budget(budget)
        .with_hint(hint);
        let made = g.plan(policy, shares[i], &in_flight[i]);
        (made, !g.budget_cut())
    };
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(missing.len());
    type Solved = (usize, (Result<StagePlan, String>, bool));
    let solved: Vec<Solved> = if threads <= 1 {
        missing.iter().map(|&i| (i, solve(i))).collect()
    } else {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let mut all: Vec<Solved> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    scope.spawn(|| {
                        let mut mine = Vec::new();
                        loop {
                            let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(&i) = missing.get(k) else { break };
                            mine.push((i, solve(i)));
                        }
                        mine
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|h| h.join().expect("a remat planning thread panicked"))
                .collect()
        });
        all.sort_by_key(|x| x.0);
        all
    };
    for (i, (made, complete)) in solved {
        if complete {
            cache.complete.insert(key_of(i));
        }
        cache.plans.insert(key_of(i), made);
    }
    // A failed stage whose smallest need was not looked up: the device-level error, as when the
    // need is known up front.
    if let Some(l) = limit {
        let failed_lazy =
            (0..names.len()).any(|i| min[i].is_none() && cache.plans[&key_of(i)].is_err());
        if failed_lazy {
            for i in 0..names.len() {
                if min[i].is_none() {
                    min[i] = stage_needs(
                        module,
                        &names[i],
                        policy,
                        limit,
                        &in_flight[i],
                        profile,
                        cache,
                        i,
                        true,
                    )?
                    .1;
                }
            }
            feasible_or_error(l, &groups, &min, &reserved_on, in_flight)?;
        }
    }
    let mut out = Vec::new();
    for (i, (f, b, w)) in names.iter().enumerate() {
        let share = shares[i];
        let (fun, bun, wun) = (
            module.function(f).expect("F"),
            module.function(b).expect("B"),
            module.function(w).expect("W"),
        );
        let g = ChoiceGraph::new(fun, bun, wun, profile);
        let plan = cache.plans[&key_of(i)].clone();
        let plan = plan.map_err(|e| {
            format!(
                "stage {i} (@{f}, device {}, limit share {} of {} bytes): {e}",
                placement[i],
                share.unwrap_or(0),
                limit.unwrap_or(0)
            )
        })?;
        let summary = g.summary(&plan, &in_flight[i]);
        let numbering = print_numbering(fun);
        let values =
            plan.choices
                .iter()
                .map(|(&v, &c)| {
                    let name =
                        g.saved.get(&v).cloned().unwrap_or_else(|| {
                            format!("stash.r{}", numbering[v].expect("defined"))
                        });
                    (name, g.bytes(v), c)
                })
                .collect();
        let transfer_seconds = 2.0 * summary.offloaded_bytes as f64 / profile.host_bytes_per_s;
        let (nf, nb, nw) = g.apply(&plan);
        out.push(StageMemory {
            function: f.clone(),
            in_flight: in_flight[i].clone(),
            limit: share,
            values,
            summary,
            transfer_seconds,
        });
        *module.function_mut(f).expect("F") = nf;
        *module.function_mut(b).expect("B") = nb;
        *module.function_mut(w).expect("W") = nw;
    }
    Ok(out)
}
