//! Conversion between a region of a [`Function`] and an e-graph, and back.
//!
//! # Into the e-graph
//!
//! A *region* is a contiguous range of the function's body. Each non-argument node of the region
//! becomes an e-node (one per result for multi-result ops); every operand defined outside the
//! region (an argument, or a value of an earlier region) becomes a leaf `(op #ref)` naming the
//! value. The *roots* are the region's live-out values: those used by a later region or returned.
//!
//! # Back to a function
//!
//! The rebuilt function is emitted region by region, in body order: an argument node is copied
//! where it stood (arguments keep their order, names and types), and at each original node whose
//! result is a root the extracted term of that root's class is emitted, operands first, each class
//! once. Outputs keep their names and order.
//!
//! # Annotations
//!
//! Every class that an original node's result belongs to after saturation takes that node's phase
//! and stage; when several original nodes ended up in one class, the one with the **smallest
//! phase** (`forward` < `dgrad` < `wgrad` < …) wins, ties going to the earliest node in the body.
//! A class created by a rule alone takes the annotation of the class whose term first uses it. A
//! final sweep in reverse order then restores the verifier's phase and stage rules where a choice
//! made a node feed an earlier phase: the producer of an operand of a `forward` node becomes
//! `forward`, a `wgrad` producer of a `dgrad` operand becomes `dgrad` (so a `dgrad` node never
//! consumes a `wgrad` value), and stages are lowered/raised the same way. The result is checked
//! with `cleave_ir::verify_function`.

use std::collections::HashMap;

use cleave_ir::{BinaryOp, Function, Node, Op, Phase, UnaryOp, Value};
use egg::Id;

use super::analysis::{view, CirAnalysis, CirGraph, IrView};
use super::extract::Extraction;
use super::language::{CirLang, Ints, Kind, Leaf, LeafRef};

/// Phase and stage of an original node, with its body position for tie-breaking.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Annotation {
    /// The node's phase (compared first: forward-most wins).
    pub phase: Phase,
    /// Position in the original body.
    pub order: usize,
    /// Pipeline stage.
    pub stage: Option<u32>,
}

/// One region as an e-graph.
pub struct RegionGraph {
    /// The e-graph (not yet saturated when built).
    pub egraph: CirGraph,
    /// Live-out values of the region with their classes, in body order.
    pub roots: Vec<(Value, Id)>,
    /// The class of each result of each original node of the region, with its annotation.
    pub origins: Vec<(Id, Annotation)>,
}

/// Builds the e-graph of `func.body[range]`. `live_out[v]` says whether a value is used after the
/// region or returned; `requires_grad[v]` whether it depends on a parameter.
pub fn build_region(
    func: &Function,
    range: std::ops::Range<usize>,
    live_out: &HashMap<Value, bool>,
    requires_grad: &HashMap<Value, bool>,
) -> RegionGraph {
    let mut egraph = CirGraph::new(CirAnalysis::default());
    let mut class_of: HashMap<Value, Id> = HashMap::new();
    let mut roots = Vec::new();
    let mut origins = Vec::new();
    for idx in range {
        let node = func.body[idx];
        let data = func.node(node);
        if data.op.arg_role().is_some() {
            continue;
        }
        let operands: Vec<Id> = data
            .operands
            .iter()
            .map(|&v| match class_of.get(&v) {
                Some(&c) => c,
                None => {
                    let r = egraph.analysis.leaves.value(
                        v,
                        func.ty(v),
                        requires_grad.get(&v).copied().unwrap_or(false),
                    );
                    let r = egraph.add(CirLang::Ref(r));
                    let c = egraph.add(CirLang::Other(vec![r].into_boxed_slice()));
                    class_of.insert(v, c);
                    c
                }
            })
            .collect();
        let annotation = Annotation {
            phase: data.phase,
            order: idx,
            stage: data.stage,
        };
        for (k, &result) in data.results.iter().enumerate() {
            let c = add_op(&mut egraph, &data.op, k as u32, &operands);
            class_of.insert(result, c);
            origins.push((c, annotation));
            if live_out.get(&result).copied().unwrap_or(false) {
                roots.push((result, c));
            }
        }
    }
    RegionGraph {
        egraph,
        roots,
        origins,
    }
}

/// Adds result `result` of `op` over operand classes.
fn add_op(egraph: &mut CirGraph, op: &Op, result: u32, operands: &[Id]) -> Id {
    let ints = |egraph: &mut CirGraph, v: &[usize]| egraph.add(CirLang::Ints(Ints(v.to_vec())));
    let node = match op {
        Op::Unary(UnaryOp::Neg) => CirLang::Neg([operands[0]]),
        Op::Binary(BinaryOp::Add) => CirLang::Add([operands[0], operands[1]]),
        Op::Binary(BinaryOp::Mul) => CirLang::Mul([operands[0], operands[1]]),
        Op::Transpose { perm } => CirLang::Transpose([ints(egraph, perm), operands[0]]),
        Op::Reshape { shape } => CirLang::Reshape([ints(egraph, shape), operands[0]]),
        Op::Broadcast { shape, dims } => {
            CirLang::Broadcast([ints(egraph, shape), ints(egraph, dims), operands[0]])
        }
        Op::Reduce { kind, axes } => {
            let k = egraph.add(CirLang::Kind(Kind::of(*kind)));
            CirLang::Reduce([k, ints(egraph, axes), operands[0]])
        }
        Op::MatMul {
            transpose_lhs,
            transpose_rhs,
        } => {
            let tl = egraph.add(CirLang::Flag(*transpose_lhs));
            let tr = egraph.add(CirLang::Flag(*transpose_rhs));
            CirLang::MatMul([tl, tr, operands[0], operands[1]])
        }
        other => {
            let r = egraph.analysis.leaves.op(other, result);
            let r = egraph.add(CirLang::Ref(r));
            let mut children = vec![r];
            children.extend_from_slice(operands);
            CirLang::Other(children.into_boxed_slice())
        }
    };
    egraph.add(node)
}

/// The best annotation of every canonical class that an original node ended up in.
pub fn class_annotations(region: &RegionGraph) -> HashMap<Id, Annotation> {
    let mut best: HashMap<Id, Annotation> = HashMap::new();
    for &(c, a) in &region.origins {
        let c = region.egraph.find(c);
        best.entry(c)
            .and_modify(|b| {
                if a < *b {
                    *b = a
                }
            })
            .or_insert(a);
    }
    best
}

/// Emits the region's extracted terms into `out`. `remap` maps original values to values of
/// `out`; it is extended with every root. `func` is the original function, `range` the region.
pub fn emit_region(
    func: &Function,
    range: std::ops::Range<usize>,
    region: &RegionGraph,
    extraction: &Extraction,
    out: &mut Function,
    remap: &mut HashMap<Value, Value>,
    order_of: &mut HashMap<Node, usize>,
) {
    let egraph = &region.egraph;
    let annotations = class_annotations(region);
    let root_of: HashMap<Value, Id> = region.roots.iter().copied().collect();
    let mut emitted: HashMap<Id, Value> = HashMap::new();
    // Multi-result ops (`split`) are emitted once per (op, operands).
    let mut multi: HashMap<(LeafRef, Vec<Value>), Node> = HashMap::new();
    for idx in range {
        let node = func.body[idx];
        let data = func.node(node);
        if data.op.arg_role().is_some() {
            if !remap.contains_key(&data.results[0]) {
                copy_arg(func, node, out, remap, order_of);
            }
            continue;
        }
        for &result in &data.results {
            let Some(&root) = root_of.get(&result) else {
                continue;
            };
            let fallback = Annotation {
                phase: data.phase,
                order: idx,
                stage: data.stage,
            };
            let v = emit_class(
                func,
                egraph,
                extraction,
                &annotations,
                root,
                fallback,
                out,
                remap,
                &mut emitted,
                &mut multi,
                order_of,
            );
            remap.insert(result, v);
        }
    }
}

fn copy_arg(
    func: &Function,
    node: Node,
    out: &mut Function,
    remap: &mut HashMap<Value, Value>,
    order_of: &mut HashMap<Node, usize>,
) {
    let data = func.node(node);
    let ty = func.ty(data.results[0]).clone();
    let new = out.push_node(data.op.clone(), vec![], vec![ty]);
    out.nodes[new].phase = data.phase;
    out.nodes[new].stage = data.stage;
    remap.insert(data.results[0], out.result(new));
    let idx = func.body.iter().position(|&n| n == node).unwrap_or(0);
    order_of.insert(new, idx);
}

/// Emits the chosen term of `root` (iteratively, operands first) and returns its value.
#[allow(clippy::too_many_arguments)]
fn emit_class(
    func: &Function,
    egraph: &CirGraph,
    extraction: &Extraction,
    annotations: &HashMap<Id, Annotation>,
    root: Id,
    fallback: Annotation,
    out: &mut Function,
    remap: &mut HashMap<Value, Value>,
    emitted: &mut HashMap<Id, Value>,
    multi: &mut HashMap<(LeafRef, Vec<Value>), Node>,
    order_of: &mut HashMap<Node, usize>,
) -> Value {
    let root = egraph.find(root);
    // Work items: (class, inherited annotation, operands pushed?).
    let mut work = vec![(root, fallback, false)];
    while let Some((c, inherited, expanded)) = work.pop() {
        if emitted.contains_key(&c) {
            continue;
        }
        let node = &extraction.choice[&c];
        let ann = annotations.get(&c).copied().unwrap_or(inherited);
        let view = view(egraph, node);
        let IrView::Op {
            op,
            result,
            operands,
        } = view
        else {
            if let IrView::Value(v) = view {
                let new = match remap.get(&v) {
                    Some(&n) => n,
                    None => {
                        // An argument needed before its original position.
                        let def = func.values[v].def;
                        copy_arg(func, def, out, remap, order_of);
                        remap[&v]
                    }
                };
                emitted.insert(c, new);
            }
            continue;
        };
        let operands: Vec<Id> = operands.iter().map(|&k| egraph.find(k)).collect();
        if !expanded {
            work.push((c, inherited, true));
            for &k in operands.iter().rev() {
                if !emitted.contains_key(&k) {
                    work.push((k, ann, false));
                }
            }
            continue;
        }
        let values: Vec<Value> = operands.iter().map(|k| emitted[k]).collect();
        let tys: Vec<_> = values.iter().map(|&v| out.ty(v)).collect();
        let result_types = cleave_ir::infer(&op, &tys).expect("extracted terms are well typed");
        let n_results = result_types.len();
        let new = if n_results > 1 {
            let CirLang::Other(children) = node else {
                unreachable!("only opaque ops have several results")
            };
            let CirLang::Ref(r) = egraph[children[0]].nodes[0] else {
                unreachable!()
            };
            let base = match egraph.analysis.leaves.get(r) {
                Leaf::Op { op, .. } => op.clone(),
                Leaf::Value { .. } => unreachable!(),
            };
            // Key on result 0's leaf so that every result of one op shares the node.
            let key_leaf = find_leaf(egraph, &base);
            *multi
                .entry((key_leaf, values.clone()))
                .or_insert_with(|| out.push_node(base, values.clone(), result_types))
        } else {
            out.push_node(op, values, result_types)
        };
        out.nodes[new].phase = ann.phase;
        out.nodes[new].stage = ann.stage;
        order_of.entry(new).or_insert(ann.order);
        emitted.insert(c, out.nodes[new].results[result as usize]);
    }
    emitted[&root]
}

/// The leaf reference of result 0 of `op` (every multi-result op is interned with result 0).
fn find_leaf(egraph: &CirGraph, op: &Op) -> LeafRef {
    let mut i = 0;
    loop {
        match egraph.analysis.leaves.get(LeafRef(i)) {
            Leaf::Op { op: o, result: 0 } if o == op => return LeafRef(i),
            _ => i += 1,
        }
    }
}

/// Reorders `func.body` topologically, taking among the ready nodes the one with the smallest
/// original position (`order_of`; a node created by a rule has that of the class using it first).
/// An unchanged function therefore prints exactly as before, and arguments keep their order.
pub fn sort_by_original_order(func: &mut Function, order_of: &HashMap<Node, usize>) {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let position: HashMap<Node, usize> =
        func.body.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let mut producer: HashMap<Value, Node> = HashMap::new();
    for &n in &func.body {
        for &v in &func.nodes[n].results {
            producer.insert(v, n);
        }
    }
    let mut pending: HashMap<Node, usize> = HashMap::new();
    let mut users: HashMap<Node, Vec<Node>> = HashMap::new();
    for &n in &func.body {
        let mut deps: Vec<Node> = func.nodes[n].operands.iter().map(|v| producer[v]).collect();
        deps.sort();
        deps.dedup();
        pending.insert(n, deps.len());
        for d in deps {
            users.entry(d).or_default().push(n);
        }
    }
    let key = |n: Node| {
        (
            order_of.get(&n).copied().unwrap_or(usize::MAX),
            position[&n],
        )
    };
    let mut ready: BinaryHeap<Reverse<((usize, usize), Node)>> = func
        .body
        .iter()
        .filter(|n| pending[n] == 0)
        .map(|&n| Reverse((key(n), n)))
        .collect();
    let mut body = Vec::with_capacity(func.body.len());
    while let Some(Reverse((_, n))) = ready.pop() {
        body.push(n);
        for &u in users.get(&n).map(Vec::as_slice).unwrap_or(&[]) {
            let p = pending.get_mut(&u).unwrap();
            *p -= 1;
            if *p == 0 {
                ready.push(Reverse((key(u), u)));
            }
        }
    }
    func.body = body;
}

/// Restores the verifier's phase and stage rules after extraction (see the module docs).
pub fn repair_annotations(func: &mut Function) {
    let mut producer: HashMap<Value, Node> = HashMap::new();
    for &n in &func.body {
        for &v in &func.nodes[n].results {
            producer.insert(v, n);
        }
    }
    for idx in (0..func.body.len()).rev() {
        let n = func.body[idx];
        let (phase, stage) = (func.nodes[n].phase, func.nodes[n].stage);
        for k in 0..func.nodes[n].operands.len() {
            let v = func.nodes[n].operands[k];
            let p = producer[&v];
            if func.nodes[p].op.arg_role().is_some() {
                continue;
            }
            let pd = &mut func.nodes[p];
            match (phase, pd.phase) {
                (Phase::Forward, q) if q != Phase::Forward => pd.phase = Phase::Forward,
                (Phase::Dgrad, Phase::Wgrad) => pd.phase = Phase::Dgrad,
                _ => {}
            }
            match (phase, pd.phase, stage, pd.stage) {
                (Phase::Forward, Phase::Forward, Some(s), Some(t)) if t > s => pd.stage = Some(s),
                (Phase::Dgrad, Phase::Dgrad, Some(s), Some(t)) if t < s => pd.stage = Some(s),
                _ => {}
            }
        }
    }
}
