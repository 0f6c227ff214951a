//! Kernel groups: how a function's nodes are cut into the kernels the MLIR backend emits.
//!
//! A maximal run of consecutive *elementwise* nodes (unary, binary, compare, select, cast,
//! dropout, constants, iota, one-hot, and the data-movement ops broadcast, transpose, slice,
//! reshape, split and stop-gradient) is one group; every other node (reductions, matmul,
//! convolutions, pools, norms, softmax, gather/scatter, concat, pad, cross-entropy) is a group of
//! its own. This is the CPU backend's fusion rule (`cleave-runtime`'s `compile.rs`), except that
//! the CPU backend also cuts a run where the element count changes; here MLIR's
//! `linalg-fuse-elementwise-ops` decides what fuses inside a group. It fuses a producer into its
//! consumers, so a chain becomes one launch and broadcasts/transposes/slices cost no pass over
//! memory; each value the group writes out stays its own launch (GPT-tiny's training step: 179
//! groups, 269 launches).
//!
//! A group's buffer parameters are the values it reads that other groups (or the function's
//! arguments) define, then the values it defines that later groups or the function's outputs read.

use cleave_ir::{Function, Node, Op, Value};
use std::collections::{BTreeSet, HashMap};

/// One kernel group.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelGroup {
    /// `k0`, `k1`, … in execution order.
    pub name: String,
    /// The nodes, in body order.
    pub nodes: Vec<Node>,
    /// Values read but defined elsewhere, in first-use order.
    pub inputs: Vec<Value>,
    /// Values defined here and read by later groups or returned, in definition order.
    pub outputs: Vec<Value>,
}

/// Whether the op is computed elementwise over its result (so it joins a fused group).
pub fn is_elementwise(op: &Op) -> bool {
    matches!(
        op,
        Op::Unary(_)
            | Op::Binary(_)
            | Op::Compare(_)
            | Op::Select
            | Op::Cast { .. }
            | Op::Dropout { .. }
            | Op::Constant { .. }
            | Op::Iota { .. }
            | Op::OneHot { .. }
            | Op::Broadcast { .. }
            | Op::Transpose { .. }
            | Op::Slice { .. }
            | Op::Reshape { .. }
            | Op::Split { .. }
            | Op::StopGradient
    )
}

/// Cuts `func` into kernel groups (see the module docs). Argument nodes belong to no group.
pub fn partition(func: &Function) -> Vec<KernelGroup> {
    let mut runs: Vec<Vec<Node>> = Vec::new();
    let mut open = false;
    for &node in &func.body {
        let op = &func.node(node).op;
        if op.arg_role().is_some() {
            continue;
        }
        if is_elementwise(op) {
            if !open {
                runs.push(Vec::new());
                open = true;
            }
            runs.last_mut().expect("a run is open").push(node);
        } else {
            runs.push(vec![node]);
            open = false;
        }
    }
    // Which group defines each value.
    let mut group_of: HashMap<Value, usize> = HashMap::new();
    for (g, run) in runs.iter().enumerate() {
        for &n in run {
            for &r in &func.node(n).results {
                group_of.insert(r, g);
            }
        }
    }
    // Values read by a group other than their definer, or returned.
    let mut escapes: BTreeSet<Value> = func.outputs.iter().map(|o| o.value).collect();
    for (g, run) in runs.iter().enumerate() {
        for &n in run {
            for &v in &func.node(n).operands {
                if group_of.get(&v) != Some(&g) {
                    escapes.insert(v);
                }
            }
        }
    }
    runs.into_iter()
        .enumerate()
        .map(|(g, nodes)| {
            let mut inputs = Vec::new();
            let mut outputs = Vec::new();
            for &n in &nodes {
                for &v in &func.node(n).operands {
                    if group_of.get(&v) != Some(&g) && !inputs.contains(&v) {
                        inputs.push(v);
                    }
                }
                for &r in &func.node(n).results {
                    if escapes.contains(&r) {
                        outputs.push(r);
                    }
                }
            }
            KernelGroup {
                name: format!("k{g}"),
                nodes,
                inputs,
                outputs,
            }
        })
        .collect()
}

/// The buffer name of a value: the argument's name for `input`/`param` values, else `%N` with
/// `N` the value's position in definition order (as the text printer numbers values).
pub fn value_names(func: &Function) -> HashMap<Value, String> {
    let mut names = HashMap::new();
    let mut n = 0usize;
    for &node in &func.body {
        let data = func.node(node);
        if let Some(name) = data.op.arg_name() {
            names.insert(data.results[0], name.to_string());
            continue;
        }
        for &r in &data.results {
            names.insert(r, format!("%{n}"));
            n += 1;
        }
    }
    names
}
