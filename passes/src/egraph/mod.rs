//! E-graph rewriting: the one module that uses egg.
//!
//! - [`language`]: the e-node language ([`CirLang`]) and the table of interned ops and outside
//!   values that makes conversion back exact.
//! - [`analysis`]: per-class dtype, shape, byte size, "requires grad" and constant splats; merge
//!   asserts that types agree.
//! - [`rules`]: the rulesets (`algebra`, `reassociate`) and their schedule.
//! - [`extract`]: the cost model, DAG-cost ILP extraction over all roots, and the greedy fallback.
//! - [`convert`]: function region ↔ e-graph, with argument, output and annotation rules.
//!
//! # Regions
//!
//! [`simplify_function`] saturates one *region* at a time: a contiguous range of the body of at
//! most `region_nodes` nodes (default [`DEFAULT_REGION_NODES`]), cut at node boundaries in body
//! order, which for a traced model is roughly per layer (forward layers, then backward layers).
//! Values crossing a region boundary are leaves of the later region and roots of the earlier one,
//! so rewriting never crosses a boundary; what is lost is CSE and absorption across boundaries.
//! This is how saturation scales to whole models (an e-graph per layer or per stage rather than
//! per model): time and memory grow linearly with the number of regions, and the limits
//! (`node_limit`, `iter_limit`, `time_limit_ms`) apply to each region.
//!
//! # Limits
//!
//! The runner is configured completely (node, iteration and time limits, scheduler) before
//! `run()`. Its [`egg::StopReason`] is recorded per region in [`SimplifyReport`]. When a limit is
//! hit, the e-graph is still a set of proven equalities over the original terms, so extraction
//! still gives an equivalent function, only possibly a less simplified one; the pass warns, naming
//! the limit.

pub mod analysis;
pub mod convert;
pub mod extract;
pub mod language;
pub mod rules;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::time::Duration;

use cleave_ir::{ArgRole, Function, Output, Phase, Value};

pub use analysis::{CirAnalysis, CirGraph, ClassData, TensorInfo};
pub use extract::{ExtractMethod, Extraction, ILP_NODE_LIMIT};
pub use language::CirLang;

/// Default node limit per region e-graph.
pub const DEFAULT_NODE_LIMIT: usize = 10_000;
/// Default iteration limit per ruleset and region.
pub const DEFAULT_ITER_LIMIT: usize = 30;
/// Default time limit per ruleset and region, in milliseconds.
pub const DEFAULT_TIME_LIMIT_MS: u64 = 5_000;
/// Default region size, in body nodes.
pub const DEFAULT_REGION_NODES: usize = 400;

/// Settings of [`simplify_function`].
#[derive(Clone, Debug)]
pub struct SimplifyOptions {
    /// Also run the `reassociate` ruleset (not exact for floats).
    pub reassociate: bool,
    /// E-node limit of a region's e-graph.
    pub node_limit: usize,
    /// Iteration limit per ruleset.
    pub iter_limit: usize,
    /// Time limit per ruleset, in milliseconds.
    pub time_limit_ms: u64,
    /// Extraction method.
    pub extract: ExtractMethod,
    /// Region size in body nodes.
    pub region_nodes: usize,
    /// Candidate e-nodes above which the ILP gives way to greedy extraction.
    pub ilp_node_limit: usize,
}

impl Default for SimplifyOptions {
    fn default() -> Self {
        SimplifyOptions {
            reassociate: false,
            node_limit: DEFAULT_NODE_LIMIT,
            iter_limit: DEFAULT_ITER_LIMIT,
            time_limit_ms: DEFAULT_TIME_LIMIT_MS,
            extract: ExtractMethod::Ilp,
            region_nodes: DEFAULT_REGION_NODES,
            ilp_node_limit: ILP_NODE_LIMIT,
        }
    }
}

/// What happened in one region.
#[derive(Clone, Debug)]
pub struct RegionReport {
    /// Body range of the region.
    pub range: std::ops::Range<usize>,
    /// Stop reason of each ruleset run, with the ruleset name.
    pub stops: Vec<(&'static str, egg::StopReason)>,
    /// E-nodes after saturation.
    pub n_enodes: usize,
    /// Which extractor was used.
    pub method: ExtractMethod,
}

/// What [`simplify_function`] did.
#[derive(Clone, Debug, Default)]
pub struct SimplifyReport {
    /// One entry per region.
    pub regions: Vec<RegionReport>,
}

impl SimplifyReport {
    /// A one-line summary: regions, the stop reason of every ruleset run (counted), and the
    /// extraction methods. `--print-ir-after=simplify` prints it with the IR.
    pub fn summary(&self, func: &str) -> String {
        let mut stops: std::collections::BTreeMap<String, usize> = Default::default();
        let (mut ilp, mut greedy) = (0, 0);
        for r in &self.regions {
            for (set, stop) in &r.stops {
                let reason = match stop {
                    egg::StopReason::Saturated => "saturated".to_string(),
                    egg::StopReason::NodeLimit(n) => format!("node limit ({n})"),
                    egg::StopReason::IterationLimit(n) => format!("iteration limit ({n})"),
                    egg::StopReason::TimeLimit(t) => format!("time limit ({t:.1} s)"),
                    egg::StopReason::Other(o) => o.clone(),
                };
                *stops.entry(format!("{set}: {reason}")).or_default() += 1;
            }
            match r.method {
                ExtractMethod::Ilp => ilp += 1,
                ExtractMethod::Greedy => greedy += 1,
            }
        }
        let stops: Vec<String> = stops.iter().map(|(k, n)| format!("{k} ×{n}")).collect();
        format!(
            "@{func}: {} region(s); stop reasons: {}; extraction: ILP ×{ilp}, greedy ×{greedy}",
            self.regions.len(),
            if stops.is_empty() {
                "none".to_string()
            } else {
                stops.join(", ")
            }
        )
    }

    /// Warnings for the user: each limit hit (named as the pass option) and each ILP fallback.
    pub fn warnings(&self, func: &str, opts: &SimplifyOptions) -> Vec<String> {
        let mut hits: Vec<String> = Vec::new();
        for r in &self.regions {
            for (set, stop) in &r.stops {
                let what = match stop {
                    egg::StopReason::NodeLimit(_) => format!("node_limit={}", opts.node_limit),
                    egg::StopReason::IterationLimit(_) => {
                        format!("iter_limit={}", opts.iter_limit)
                    }
                    egg::StopReason::TimeLimit(_) => {
                        format!("time_limit_ms={}", opts.time_limit_ms)
                    }
                    egg::StopReason::Saturated | egg::StopReason::Other(_) => continue,
                };
                hits.push(format!(
                    "@{func}: ruleset `{set}` stopped at the limit {what} (nodes {}..{}); the result is equivalent but may be less simplified",
                    r.range.start, r.range.end
                ));
            }
            if opts.extract == ExtractMethod::Ilp && r.method == ExtractMethod::Greedy {
                hits.push(format!(
                    "@{func}: nodes {}..{}: the ILP extraction was skipped (over {} candidate e-nodes or the solver failed); used greedy extraction",
                    r.range.start, r.range.end, opts.ilp_node_limit
                ));
            }
        }
        hits
    }
}

/// Whether a function may be simplified: it must hold no `recompute`, `offload` or `reload` node
/// (merging a recomputation with its forward original would undo it).
pub fn check_entry(func: &Function) -> Result<(), String> {
    match func
        .body
        .iter()
        .map(|&n| func.node(n).phase)
        .find(|p| matches!(p, Phase::Recompute | Phase::Offload | Phase::Reload))
    {
        Some(p) => Err(format!(
            "@{}: holds `{}` nodes; run `simplify` before recompute/offload planning",
            func.name,
            p.name()
        )),
        None => Ok(()),
    }
}

/// Saturates and extracts `func` region by region, returning the rebuilt function (same
/// arguments and outputs, verified) and a report. Fails if the rebuilt function does not verify
/// (a bug); callers keep the original then.
pub fn simplify_function(
    func: &Function,
    opts: &SimplifyOptions,
) -> Result<(Function, SimplifyReport), String> {
    check_entry(func)?;
    let region_nodes = opts.region_nodes.max(1);
    let n = func.body.len();
    let region_of = |idx: usize| idx / region_nodes;
    // Live-out values: used in a later region, or returned.
    let mut def_region: HashMap<Value, usize> = HashMap::new();
    let mut requires_grad: HashMap<Value, bool> = HashMap::new();
    let mut live_out: HashMap<Value, bool> = HashMap::new();
    for (idx, &node) in func.body.iter().enumerate() {
        let data = func.node(node);
        let rg = data.op.arg_role() == Some(ArgRole::Param)
            || data
                .operands
                .iter()
                .any(|v| requires_grad.get(v).copied().unwrap_or(false));
        for &v in &data.operands {
            if def_region[&v] != region_of(idx) {
                live_out.insert(v, true);
            }
        }
        for &r in &data.results {
            def_region.insert(r, region_of(idx));
            requires_grad.insert(r, rg);
        }
    }
    for o in &func.outputs {
        live_out.insert(o.value, true);
    }

    let mut out = Function::new(func.name.clone());
    let mut remap: HashMap<Value, Value> = HashMap::new();
    let mut order_of = HashMap::new();
    let mut report = SimplifyReport::default();
    let mut start = 0;
    while start < n {
        let range = start..(start + region_nodes).min(n);
        start = range.end;
        let mut region = convert::build_region(func, range.clone(), &live_out, &requires_grad);
        let mut stops = Vec::new();
        for set in rules::schedule(opts.reassociate) {
            let runner = egg::Runner::<CirLang, CirAnalysis, ()>::new(CirAnalysis::default())
                .with_node_limit(opts.node_limit)
                .with_iter_limit(opts.iter_limit)
                .with_time_limit(Duration::from_millis(opts.time_limit_ms))
                .with_scheduler(egg::BackoffScheduler::default())
                .with_egraph(std::mem::replace(
                    &mut region.egraph,
                    CirGraph::new(CirAnalysis::default()),
                ))
                .run(&set.rules);
            stops.push((set.name, runner.stop_reason.clone().expect("run sets it")));
            region.egraph = runner.egraph;
        }
        let roots: Vec<_> = region.roots.iter().map(|&(_, c)| c).collect();
        let extraction =
            extract::extract(&region.egraph, &roots, opts.extract, opts.ilp_node_limit);
        convert::emit_region(
            func,
            range.clone(),
            &region,
            &extraction,
            &mut out,
            &mut remap,
            &mut order_of,
        );
        report.regions.push(RegionReport {
            range,
            stops,
            n_enodes: region.egraph.total_number_of_nodes(),
            method: extraction.method,
        });
    }
    out.outputs = func
        .outputs
        .iter()
        .map(|o| Output {
            name: o.name.clone(),
            value: remap[&o.value],
        })
        .collect();
    convert::sort_by_original_order(&mut out, &order_of);
    convert::repair_annotations(&mut out);
    cleave_ir::verify_function(&out).map_err(|errors| {
        format!(
            "@{}: the simplified function does not verify: {}",
            func.name,
            errors
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        )
    })?;
    Ok((out, report))
}
