//! bf16 stash (`autodiff{compress=bf16}`, `--compress bf16`): what the backward reads of the
//! forward is kept in bfloat16 between the two, the usual storage of mixed-precision training.
//!
//! # The rewrite (a quantize/dequantize pair on the stash edge)
//!
//! For every `f32` value that a forward node makes (or a data input) and a backward node reads:
//!
//! - **Forward** (phase `forward`, right after the value's definition, once per stage whose
//!   backward reads it, in that stage): `s = cast x : f32 -> bf16` (round to nearest even). A
//!   value made in one stage and read by a later stage's backward thus crosses the boundary once,
//!   as the f32 value that stage's forward receives anyway, and is narrowed there.
//! - **Backward** (before the first reader in each stage that reads it):
//!   `x̂ = cast s : bf16 -> f32`, which every backward reader of that stage reads instead of `x`.
//!
//! Only `s` is live between F and B/W, so the value's stash halves. The forward itself is
//! untouched (it still computes in `f32`), so the loss is exact; the gradients are those of the
//! backward evaluated at the bf16-rounded activations. Parameters, constants and scalars are left
//! alone (they are not part of the stash or are too small to matter).

use std::collections::HashMap;

use cleave_ir::{DType, Function, Node, Op, Phase, TensorType, Value};

/// Whether `v` is a stash value the rewrite may cast (before any other check).
pub fn candidate(func: &Function, v: Value) -> bool {
    let ty = func.ty(v);
    let def = &func.nodes[func.values[v].def];
    ty.dtype == DType::F32
        && ty.rank() > 0
        && def.phase == Phase::Forward
        && !matches!(
            def.op,
            Op::Param { .. } | Op::Constant { .. } | Op::Iota { .. }
        )
}

/// Rewrites `func`'s stash edges to bf16 for every [`candidate`] value that a backward node reads
/// and `wanted` accepts. Returns the values it cast, in body order.
pub fn stash(func: &mut Function, wanted: impl Fn(&Function, Value) -> bool) -> Vec<Value> {
    // The values to cast: read by a backward node; and the stages whose backward reads each.
    let mut read_back: Vec<Value> = Vec::new();
    let mut readers: HashMap<Value, std::collections::BTreeSet<Option<u32>>> = HashMap::new();
    for &n in &func.body {
        let d = &func.nodes[n];
        if d.phase == Phase::Forward {
            continue;
        }
        for &v in &d.operands {
            let known = readers.contains_key(&v);
            if !(known || candidate(func, v) && wanted(func, v)) {
                continue;
            }
            let stages = readers.entry(v).or_insert_with(|| {
                read_back.push(v);
                Default::default()
            });
            stages.insert(d.stage);
        }
    }
    if read_back.is_empty() {
        return read_back;
    }
    let mut low: HashMap<(Value, Option<u32>), Value> = HashMap::new();
    let mut high: HashMap<(Value, Option<u32>), Value> = HashMap::new();
    let old_body = std::mem::take(&mut func.body);
    let mut body: Vec<Node> = Vec::with_capacity(old_body.len() + 2 * read_back.len());
    for n in old_body {
        let (phase, stage) = (func.nodes[n].phase, func.nodes[n].stage);
        if phase != Phase::Forward {
            for i in 0..func.nodes[n].operands.len() {
                let v = func.nodes[n].operands[i];
                let Some(&s) = low.get(&(v, stage)) else {
                    continue;
                };
                let x = match high.get(&(v, stage)) {
                    Some(&x) => x,
                    None => {
                        let ty = TensorType::new(DType::F32, func.ty(v).shape.clone());
                        let c = func.create_node(Op::Cast { to: DType::F32 }, vec![s], vec![ty]);
                        // dgrad: W may read it too (a dgrad value), B may not read wgrad ones.
                        func.nodes[c].phase = Phase::Dgrad;
                        func.nodes[c].stage = stage;
                        body.push(c);
                        let x = func.result(c);
                        high.insert((v, stage), x);
                        x
                    }
                };
                func.nodes[n].operands[i] = x;
            }
        }
        body.push(n);
        let results = func.nodes[n].results.clone();
        for v in results {
            let Some(stages) = readers.get(&v) else {
                continue;
            };
            for &rs in stages {
                let ty = TensorType::new(DType::BF16, func.ty(v).shape.clone());
                let c = func.create_node(Op::Cast { to: DType::BF16 }, vec![v], vec![ty]);
                func.nodes[c].phase = Phase::Forward;
                func.nodes[c].stage = rs;
                body.push(c);
                low.insert((v, rs), func.result(c));
            }
        }
    }
    func.body = body;
    read_back
}
