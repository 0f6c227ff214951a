//! Narrow stashes: what the backward reads of the forward is kept in a narrower type between
//! the two, as a quantize/dequantize pair on the stash edge.
//!
//! - **bf16** (`autodiff{compress=bf16}`, `--compress bf16`): the value in bfloat16, the usual
//!   storage of mixed-precision training. Two bytes per element.
//! - **int8** (`autodiff{compress=int8}`, `--compress int8`), after Mesa (Pan et al., "Mesa: A
//!   Memory-saving Training Framework for Transformers", 2021): the value as 8-bit codes with one
//!   `f32` scale per row of its last axis, `scale = max|x| / 127`, `q = cast(round(x / scale))`,
//!   and `x̂ = q · scale` in the backward. One byte per element plus four per row. Mesa learns one
//!   scale per attention head with a running estimate; here the scale is computed from each row
//!   of the microbatch itself (finer than per head, no state, no calibration), a stated
//!   difference from the paper. A row holding an infinity gets an infinite scale and widens to
//!   NaN (`0 · ∞`), as the exact backward of such an activation would give infinities or NaN.
//!
//! # The rewrite
//!
//! For every `f32` value that a forward node makes (or a data input) and a backward node reads:
//!
//! - **Forward** (phase `forward`, right after the value's definition, once per stage whose
//!   backward reads it, in that stage): the narrowing nodes. A value made in one stage and read
//!   by a later stage's backward thus crosses the boundary once, as the f32 value that stage's
//!   forward receives anyway, and is narrowed there.
//! - **Backward** (before the first reader in each stage that reads it): the widening nodes,
//!   whose result every backward reader of that stage reads instead of `x`.
//!   bf16: one `cast → f32`; int8: `cast(q) → f32` times the broadcast scale. They are in phase
//!   `dgrad` (W may read them too), and `split-bw` re-creates a widening that both B and W read
//!   in W from the narrow F→W values, so B never hands W a wide copy and a one-function step
//!   widens once.
//!
//! Only the narrow values are live between F and B/W. The forward itself is untouched (it still
//! computes in `f32`), so the loss is exact; the gradients are those of the backward evaluated
//! at the rounded activations. Parameters, constants, scalars and the function's outputs are
//! left alone: the first are not part of the stash or too small to matter, and an output's f32
//! value stays live whatever the backward reads, so a narrow copy would add bytes.

use std::collections::{BTreeSet, HashMap};

use cleave_ir::{
    BinaryOp, DType, Function, Literal, Node, Op, Phase, ReduceKind, TensorType, UnaryOp, Value,
};

/// A narrow stash format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// bfloat16.
    Bf16,
    /// 8-bit codes with an `f32` scale per row of the last axis.
    Int8,
}

/// Whether `v` is a stash value `codec` may narrow (before any other check).
pub fn candidate(func: &Function, v: Value, codec: Codec) -> bool {
    let ty = func.ty(v);
    let def = &func.nodes[func.values[v].def];
    ty.dtype == DType::F32
        && ty.rank() > 0
        && def.phase == Phase::Forward
        && !matches!(
            def.op,
            Op::Param { .. } | Op::Constant { .. } | Op::Iota { .. }
        )
        && !func.outputs.iter().any(|o| o.value == v)
        // A row of one element would store more (one byte and a four-byte scale) than it saves.
        && (codec != Codec::Int8 || ty.shape[ty.rank() - 1] >= 2)
}

/// Appends a node (stage `stage`, phase `phase`) to `body`; its result type is inferred.
fn push(
    func: &mut Function,
    body: &mut Vec<Node>,
    op: Op,
    operands: Vec<Value>,
    (stage, phase): (Option<u32>, Phase),
) -> Value {
    let n = func
        .create_inferred(op, operands, (phase, stage))
        .expect("the narrowing nodes are well typed by construction");
    body.push(n);
    func.result(n)
}

/// An `f32` constant of `shape`, every element `x`.
fn splat(
    func: &mut Function,
    body: &mut Vec<Node>,
    shape: &[usize],
    x: f64,
    at: (Option<u32>, Phase),
) -> Value {
    let ty = TensorType::new(DType::F32, shape.to_vec());
    let op = Op::Constant {
        ty,
        value: Literal::Float(vec![x]),
    };
    push(func, body, op, vec![], at)
}

/// The scale of each row broadcast back to `shape`.
fn per_row(
    func: &mut Function,
    body: &mut Vec<Node>,
    scale: Value,
    shape: &[usize],
    at: (Option<u32>, Phase),
) -> Value {
    let op = Op::Broadcast {
        shape: shape.to_vec(),
        dims: (0..shape.len() - 1).collect(),
    };
    push(func, body, op, vec![scale], at)
}

impl Codec {
    /// The method's name.
    pub fn name(self) -> &'static str {
        match self {
            Codec::Bf16 => "bf16",
            Codec::Int8 => "int8",
        }
    }

    /// The forward nodes storing `x` narrow, appended to `body`; returns what is stored.
    fn narrow(
        self,
        func: &mut Function,
        body: &mut Vec<Node>,
        x: Value,
        at: (Option<u32>, Phase),
    ) -> Vec<Value> {
        let shape = func.ty(x).shape.to_vec();
        match self {
            Codec::Bf16 => vec![push(func, body, Op::Cast { to: DType::BF16 }, vec![x], at)],
            Codec::Int8 => {
                let r = shape.len();
                let rows = &shape[..r - 1];
                // max|x| = max(max x, −min x): two row reductions of `x` itself, with no
                // `|x|` of the value's size alive beside it.
                let reduce = |kind| Op::Reduce {
                    kind,
                    axes: vec![r - 1],
                };
                let hi = push(func, body, reduce(ReduceKind::Max), vec![x], at);
                let lo = push(func, body, reduce(ReduceKind::Min), vec![x], at);
                let lo = push(func, body, Op::Unary(UnaryOp::Neg), vec![lo], at);
                let m = push(func, body, Op::Binary(BinaryOp::Max), vec![hi, lo], at);
                // An all-zero row gets a tiny scale (its codes are all 0) instead of 0/0.
                let tiny = splat(func, body, rows, f32::MIN_POSITIVE as f64, at);
                let m = push(func, body, Op::Binary(BinaryOp::Max), vec![m, tiny], at);
                let k = splat(func, body, rows, 127.0, at);
                let scale = push(func, body, Op::Binary(BinaryOp::Div), vec![m, k], at);
                let s = per_row(func, body, scale, &shape, at);
                let y = push(func, body, Op::Binary(BinaryOp::Div), vec![x, s], at);
                let y = push(func, body, Op::Unary(UnaryOp::Round), vec![y], at);
                let q = push(func, body, Op::Cast { to: DType::I8 }, vec![y], at);
                vec![q, scale]
            }
        }
    }

    /// The backward nodes widening what [`Codec::narrow`] stored, appended to `body`.
    fn widen(
        self,
        func: &mut Function,
        body: &mut Vec<Node>,
        stored: &[Value],
        at: (Option<u32>, Phase),
    ) -> Value {
        let x = push(func, body, Op::Cast { to: DType::F32 }, vec![stored[0]], at);
        match self {
            Codec::Bf16 => x,
            Codec::Int8 => {
                let shape = func.ty(x).shape.to_vec();
                let s = per_row(func, body, stored[1], &shape, at);
                push(func, body, Op::Binary(BinaryOp::Mul), vec![x, s], at)
            }
        }
    }
}

/// Rewrites `func`'s stash edges to `codec` for every [`candidate`] value that a backward node
/// reads and `wanted` accepts. Returns the values it narrowed, in body order.
pub fn stash(
    func: &mut Function,
    codec: Codec,
    wanted: impl Fn(&Function, Value) -> bool,
) -> Vec<Value> {
    // The values to narrow (read by a backward node), and the stages whose backward reads each.
    let mut read_back: Vec<Value> = Vec::new();
    let mut readers: HashMap<Value, BTreeSet<Option<u32>>> = HashMap::new();
    for &n in &func.body {
        let d = &func.nodes[n];
        if d.phase == Phase::Forward {
            continue;
        }
        for &v in &d.operands {
            let known = readers.contains_key(&v);
            if !(known || candidate(func, v, codec) && wanted(func, v)) {
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
    let mut low: HashMap<(Value, Option<u32>), Vec<Value>> = HashMap::new();
    let mut high: HashMap<(Value, Option<u32>), Value> = HashMap::new();
    let old_body = std::mem::take(&mut func.body);
    let mut body: Vec<Node> = Vec::with_capacity(old_body.len() + 2 * read_back.len());
    for n in old_body {
        if func.nodes[n].phase != Phase::Forward {
            let stage = func.nodes[n].stage;
            for i in 0..func.nodes[n].operands.len() {
                let v = func.nodes[n].operands[i];
                let Some(stored) = low.get(&(v, stage)) else {
                    continue;
                };
                let x = match high.get(&(v, stage)) {
                    Some(&x) => x,
                    None => {
                        let stored = stored.clone();
                        let x = codec.widen(func, &mut body, &stored, (stage, Phase::Dgrad));
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
                let stored = codec.narrow(func, &mut body, v, (rs, Phase::Forward));
                low.insert((v, rs), stored);
            }
        }
    }
    func.body = body;
    read_back
}
