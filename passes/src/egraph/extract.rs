//! Extraction: choosing one e-node per needed e-class, for several roots at once.
//!
//! # Cost model
//!
//! [`node_cost`] weighs each e-node like [`cleave_ir::cost::node_flops`]: matmul and convolutions
//! count `2·multiply-adds`, elementwise ops their per-element FLOPs. Data movement is cheap but not
//! free (a quarter per element for `transpose`, `broadcast`, `slice`, …; 1 for a `reshape`, which
//! is a view), and every node costs 1 more, so absorbing a transpose into a matmul flag and
//! dropping an identity always win. Leaves cost nothing.
//!
//! # DAG cost, several roots: an ILP
//!
//! A tree-cost extractor (egg's `Extractor`) counts a shared subterm once per use, so it can
//! prefer two private copies of cheap-looking work over one shared node. [`extract_ilp`] counts
//! each chosen node once, for all roots together (every output of the region, incl. every
//! `grad.*`), with one binary variable `x_n` per e-node and `y_c` per e-class:
//!
//! - `y_root = 1` for every root; `Σ_{n∈c} x_n = y_c` (a used class picks exactly one node);
//! - `x_n ≤ y_c'` for every child class `c'` of `n` (a picked node's operands are computed);
//! - acyclicity: a level `l_c ∈ [0, |C|]` per class and `l_c ≥ l_c' + 1 − (|C|+1)(1 − x_n)` for
//!   each node `n ∈ c` with child `c'` in the same strongly connected component of the class
//!   graph (edges between components can never close a cycle);
//! - minimise `Σ cost(n)·x_n`.
//!
//! Only nodes whose children can all be extracted are candidates, and only classes reachable from
//! the roots through candidates are variables. The solver is good_lp's pure-Rust `microlp`.
//!
//! # Size limit, measured
//!
//! microlp's solve time grows about quadratically with the number of e-nodes. Measured with
//! `CLEAVE_ILP_SWEEP=1 cargo bench -p cleave-passes --bench simplify` (release, development
//! machine, 2 cores): the 32-layer GPT training step (6,202 nodes) cut into regions of growing
//! size, ILP for every region versus greedy for every region (whole `simplify` time):
//!
//! | region nodes | largest e-graph | ILP total | ILP per region | greedy total |
//! |---|---|---|---|---|
//! | 100 | 192 e-nodes | 149 ms | 2.4 ms | 50 ms |
//! | 400 | 612 | 410 ms | 26 ms | 33 ms |
//! | 800 | 1,169 | 529 ms | 66 ms | 24 ms |
//! | 1,600 | 2,291 | 847 ms | 212 ms | 15 ms |
//! | 3,200 | 4,261 | 1,811 ms | 906 ms | 37 ms |
//! | 6,400 (whole function) | 6,527 | 2,123 ms | 2,123 ms | 33 ms |
//!
//! [`ILP_NODE_LIMIT`] is therefore 2,000 candidate e-nodes (≈ 0.2 s per ILP): above it one solve
//! alone would take most of a second. Above the limit [`extract`] falls back to
//! [`extract_greedy`] (tree cost with egg's `Extractor`, shared when emitted), and the pass warns.
//! Saturating per region keeps regions under the limit (the default 400-node regions give ~600
//! e-node graphs). These e-graphs have few alternatives per class; with `reassociate` the
//! candidate count grows faster than the region, and the limit takes effect sooner.

use std::collections::{HashMap, HashSet};

use cleave_ir::cost::unary_flops_per_element;
use cleave_ir::{Op, TensorType};
use egg::{CostFunction, Extractor, Id, Language};
use good_lp::{constraint, microlp, variable, variables, Expression, Solution, SolverModel};

use super::analysis::{view, CirGraph, IrView};
use super::language::CirLang;

/// Candidate e-nodes above which [`extract`] uses the greedy extractor instead of the ILP (see
/// the module docs for the measurement).
pub const ILP_NODE_LIMIT: usize = 2_000;

/// How to extract.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ExtractMethod {
    /// DAG-cost ILP, with the greedy fallback above [`ILP_NODE_LIMIT`] candidate nodes.
    #[default]
    Ilp,
    /// Tree-cost greedy extraction.
    Greedy,
}

impl std::str::FromStr for ExtractMethod {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ilp" => Ok(ExtractMethod::Ilp),
            "greedy" => Ok(ExtractMethod::Greedy),
            _ => Err("expected `ilp` or `greedy`".into()),
        }
    }
}

/// A chosen node per canonical e-class needed by the roots.
#[derive(Debug, Default)]
pub struct Extraction {
    /// Canonical class → chosen node (children not canonicalised).
    pub choice: HashMap<Id, CirLang>,
    /// Which extractor produced it.
    pub method: ExtractMethod,
    /// The DAG cost of the choice (each chosen node counted once).
    pub dag_cost: f64,
}

/// The cost of one e-node (see the module docs).
pub fn node_cost(egraph: &CirGraph, node: &CirLang) -> f64 {
    match view(egraph, node) {
        IrView::Attr | IrView::Value(_) => 0.0,
        IrView::Op { op, operands, .. } => {
            let tys: Vec<&TensorType> = operands
                .iter()
                .map(|&c| &egraph[c].data.tensor().ty)
                .collect();
            1.0 + op_cost(&op, &tys, node_numel(egraph, node))
        }
    }
}

fn node_numel(egraph: &CirGraph, node: &CirLang) -> u64 {
    // The node's result size, recomputed from the op so that the cost needs no class id.
    match view(egraph, node) {
        IrView::Op {
            op,
            result,
            operands,
        } => {
            let tys: Vec<&TensorType> = operands
                .iter()
                .map(|&c| &egraph[c].data.tensor().ty)
                .collect();
            cleave_ir::infer(&op, &tys)
                .map(|r| r[result as usize].num_elements() as u64)
                .unwrap_or(0)
        }
        _ => 0,
    }
}

/// FLOP-like cost of an op with the given operand types and result size.
fn op_cost(op: &Op, tys: &[&TensorType], out: u64) -> f64 {
    let numel = |i: usize| tys[i].num_elements() as u64;
    let movement = out as f64 / 4.0;
    let flops: u64 = match op {
        Op::Input { .. } | Op::Param { .. } | Op::Iota { .. } => 0,
        Op::Constant { value, .. } => return value.len() as f64 / 4.0,
        Op::Reshape { .. } | Op::StopGradient | Op::GradReverse { .. } => return 0.0,
        Op::Ste(cleave_ir::SteOp::ArgmaxOneHot { .. }) => 2 * out,
        Op::Ste(_) => out,
        Op::Cast { .. }
        | Op::Broadcast { .. }
        | Op::Transpose { .. }
        | Op::Slice { .. }
        | Op::Concat { .. }
        | Op::Split { .. }
        | Op::Pad { .. }
        | Op::Gather { .. }
        | Op::OneHot { .. } => return movement,
        Op::Unary(u) => unary_flops_per_element(*u) * out,
        Op::Binary(_) | Op::Compare(_) | Op::Select => out,
        Op::Reduce { .. } => numel(0),
        Op::MatMul { transpose_lhs, .. } => {
            let a = &tys[0].shape;
            let r = a.len();
            let k = if *transpose_lhs { a[r - 2] } else { a[r - 1] } as u64;
            2 * out * k
        }
        Op::Conv2d { .. } => {
            let w = &tys[1].shape;
            2 * out * (w[1] * w[2] * w[3]) as u64
        }
        Op::Conv2dGradInput { .. } => {
            let w = &tys[1].shape;
            2 * numel(0) * (w[1] * w[2] * w[3]) as u64
        }
        Op::Conv2dGradWeight { shape, .. } => {
            2 * numel(1) * (shape[1] * shape[2] * shape[3]) as u64
        }
        Op::Pool2d { window, .. } => (window[0] * window[1]) as u64 * out,
        Op::MaxPool2dGrad { window, .. } => (window[0] * window[1]) as u64 * numel(1),
        Op::AvgPool2dGrad { window, .. } => (window[0] * window[1]) as u64 * numel(0),
        Op::ScatterAdd { .. } => numel(2),
        Op::Softmax { .. } | Op::LogSoftmax { .. } | Op::RmsNorm { .. } => 5 * out,
        Op::LayerNorm { .. } => 8 * out,
        Op::CrossEntropy => 5 * numel(0) + out,
        Op::Dropout { .. } => 2 * out,
    };
    flops as f64
}

struct TreeCost<'a> {
    egraph: &'a CirGraph,
}

impl CostFunction<CirLang> for TreeCost<'_> {
    type Cost = f64;
    fn cost<C>(&mut self, enode: &CirLang, mut costs: C) -> f64
    where
        C: FnMut(Id) -> f64,
    {
        node_cost(self.egraph, enode) + enode.children().iter().map(|&c| costs(c)).sum::<f64>()
    }
}

/// Extracts the roots with `method` (the ILP falls back to greedy above [`ILP_NODE_LIMIT`]
/// candidate nodes, or if the solver fails).
pub fn extract(
    egraph: &CirGraph,
    roots: &[Id],
    method: ExtractMethod,
    ilp_node_limit: usize,
) -> Extraction {
    match method {
        ExtractMethod::Greedy => extract_greedy(egraph, roots),
        ExtractMethod::Ilp => extract_ilp(egraph, roots, ilp_node_limit)
            .unwrap_or_else(|| extract_greedy(egraph, roots)),
    }
}

/// Tree-cost extraction with egg's `Extractor`; the chosen nodes are then shared when emitted.
pub fn extract_greedy(egraph: &CirGraph, roots: &[Id]) -> Extraction {
    let extractor = Extractor::new(egraph, TreeCost { egraph });
    let mut choice = HashMap::new();
    let mut stack: Vec<Id> = roots.iter().map(|&r| egraph.find(r)).collect();
    while let Some(c) = stack.pop() {
        if choice.contains_key(&c) {
            continue;
        }
        let node = extractor.find_best_node(c).clone();
        stack.extend(node.children().iter().map(|&k| egraph.find(k)));
        choice.insert(c, node);
    }
    finish(egraph, choice, ExtractMethod::Greedy)
}

fn finish(egraph: &CirGraph, choice: HashMap<Id, CirLang>, method: ExtractMethod) -> Extraction {
    let dag_cost = choice.values().map(|n| node_cost(egraph, n)).sum();
    Extraction {
        choice,
        method,
        dag_cost,
    }
}

/// DAG-cost extraction by an ILP (see the module docs). `None` when the candidate set is larger
/// than `node_limit` or the solver fails.
pub fn extract_ilp(egraph: &CirGraph, roots: &[Id], node_limit: usize) -> Option<Extraction> {
    // Classes with a finite tree cost: those whose nodes can be candidates.
    let extractor = Extractor::new(egraph, TreeCost { egraph });
    let extractable = |c: Id| extractor.find_best_cost(c).is_finite();
    let roots: Vec<Id> = roots.iter().map(|&r| egraph.find(r)).collect();
    // Reachable classes and their candidate nodes; attribute leaves stay out of the ILP.
    let is_attr = |c: Id| matches!(egraph[c].data, super::analysis::ClassData::Attr);
    let mut classes: Vec<Id> = Vec::new();
    let mut seen = HashSet::new();
    let mut stack = roots.clone();
    let mut candidates: HashMap<Id, Vec<&CirLang>> = HashMap::new();
    let mut n_candidates = 0;
    while let Some(c) = stack.pop() {
        if !seen.insert(c) {
            continue;
        }
        classes.push(c);
        let nodes: Vec<&CirLang> = egraph[c]
            .nodes
            .iter()
            .filter(|n| n.children().iter().all(|&k| extractable(egraph.find(k))))
            .collect();
        for n in &nodes {
            for &k in n.children() {
                let k = egraph.find(k);
                if !is_attr(k) {
                    stack.push(k);
                }
            }
        }
        n_candidates += nodes.len();
        if n_candidates > node_limit {
            return None;
        }
        candidates.insert(c, nodes);
    }
    classes.sort();
    let class_idx: HashMap<Id, usize> = classes.iter().enumerate().map(|(i, &c)| (c, i)).collect();
    let scc = strongly_connected(&classes, &class_idx, &candidates, egraph, &is_attr);

    let mut vars = variables!();
    let y: Vec<_> = classes
        .iter()
        .map(|_| vars.add(variable().binary()))
        .collect();
    let big_m = classes.len() as f64 + 1.0;
    let mut x = Vec::new(); // (class index, node, variable)
    let mut objective = Expression::from(0.0);
    for (ci, c) in classes.iter().enumerate() {
        for n in &candidates[c] {
            let v = vars.add(variable().binary());
            objective += node_cost(egraph, n) * v;
            x.push((ci, *n, v));
        }
    }
    let need_levels: Vec<bool> = {
        let mut size = HashMap::new();
        for &s in &scc {
            *size.entry(s).or_insert(0usize) += 1;
        }
        scc.iter().map(|s| size[s] > 1).collect()
    };
    let levels: Vec<_> = classes
        .iter()
        .enumerate()
        .map(|(i, _)| need_levels[i].then(|| vars.add(variable().min(0.0).max(big_m - 1.0))))
        .collect();
    let mut model = vars.minimise(objective.clone()).using(microlp);
    for r in &roots {
        model.add_constraint(constraint!(y[class_idx[r]] == 1));
    }
    let mut sums: Vec<Expression> = classes.iter().map(|_| Expression::from(0.0)).collect();
    for (ci, n, v) in &x {
        sums[*ci] += *v;
        for &k in n.children() {
            let k = egraph.find(k);
            if is_attr(k) {
                continue;
            }
            let ki = class_idx[&k];
            model.add_constraint(constraint!(*v <= y[ki]));
            if ki == *ci {
                // A node that is its own operand can never be chosen.
                model.add_constraint(constraint!(*v == 0));
            } else if scc[ki] == scc[*ci] {
                let (lc, lk) = (levels[*ci].unwrap(), levels[ki].unwrap());
                model.add_constraint(constraint!(lc - lk + big_m - big_m * *v >= 1));
            }
        }
    }
    for (ci, s) in sums.into_iter().enumerate() {
        model.add_constraint(constraint!(s == y[ci]));
    }
    let solution = model.solve().ok()?;
    let mut choice = HashMap::new();
    for (ci, n, v) in &x {
        if solution.value(*v) > 0.5 {
            choice.insert(classes[*ci], (*n).clone());
        }
    }
    // Attribute leaves are their own (single) choice.
    let mut stack: Vec<Id> = roots.clone();
    let mut visited = HashSet::new();
    while let Some(c) = stack.pop() {
        if !visited.insert(c) {
            continue;
        }
        let node = match choice.get(&c) {
            Some(n) => n.clone(),
            None if is_attr(c) => {
                let n = egraph[c].nodes[0].clone();
                choice.insert(c, n.clone());
                n
            }
            None => return None,
        };
        stack.extend(node.children().iter().map(|&k| egraph.find(k)));
    }
    choice.retain(|c, _| visited.contains(c));
    Some(finish(egraph, choice, ExtractMethod::Ilp))
}

/// Strongly connected components of the class graph (class → child classes through candidate
/// nodes), as a component number per class index (iterative Tarjan).
fn strongly_connected(
    classes: &[Id],
    class_idx: &HashMap<Id, usize>,
    candidates: &HashMap<Id, Vec<&CirLang>>,
    egraph: &CirGraph,
    is_attr: &dyn Fn(Id) -> bool,
) -> Vec<usize> {
    let succ: Vec<Vec<usize>> = classes
        .iter()
        .map(|c| {
            let mut s: Vec<usize> = candidates[c]
                .iter()
                .flat_map(|n| n.children().iter())
                .map(|&k| egraph.find(k))
                .filter(|&k| !is_attr(k))
                .map(|k| class_idx[&k])
                .collect();
            s.sort_unstable();
            s.dedup();
            s
        })
        .collect();
    let n = classes.len();
    let (mut index, mut low, mut on_stack) = (vec![usize::MAX; n], vec![0; n], vec![false; n]);
    let mut comp = vec![usize::MAX; n];
    let (mut next, mut n_comp) = (0, 0);
    let mut stack = Vec::new();
    for start in 0..n {
        if index[start] != usize::MAX {
            continue;
        }
        let mut work = vec![(start, 0usize)];
        while let Some(&mut (v, ref mut i)) = work.last_mut() {
            if *i == 0 && index[v] == usize::MAX {
                index[v] = next;
                low[v] = next;
                next += 1;
                stack.push(v);
                on_stack[v] = true;
            }
            if *i < succ[v].len() {
                let w = succ[v][*i];
                *i += 1;
                if index[w] == usize::MAX {
                    work.push((w, 0));
                } else if on_stack[w] {
                    low[v] = low[v].min(index[w]);
                }
                continue;
            }
            work.pop();
            if let Some(&(parent, _)) = work.last() {
                low[parent] = low[parent].min(low[v]);
            }
            if low[v] == index[v] {
                loop {
                    let w = stack.pop().unwrap();
                    on_stack[w] = false;
                    comp[w] = n_comp;
                    if w == v {
                        break;
                    }
                }
                n_comp += 1;
            }
        }
    }
    comp
}
