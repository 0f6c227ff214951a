//! VJP rules, one op family per file.
//!
//! A rule is called once per operand that needs a gradient: `vjp(t, node, cotangents, i)` emits
//! the nodes computing the contribution of the node's result cotangents to operand `i`, and
//! returns it. The input-gradient part and the parameter-gradient part of an op are therefore
//! separate by construction, and each reads only the forward values it needs (matmul's `dA` reads
//! `B`, its `dB` reads `A`). The caller sets the phase (dgrad or wgrad) and the stage before the
//! call.
//!
//! Each rule states `f` and its derivative in comments. Helpers in this file build small
//! expressions with explicit broadcasting.

mod custom;
mod elementwise;
pub(crate) mod fewbit;
mod index;
mod linalg;
pub(crate) mod narrow;
mod nn;
pub(crate) mod rank1;
mod shape;

use cleave_ir::tracer::{TraceError, Tracer};
use cleave_ir::{
    BinaryOp, CompareOp, Literal, NodeData, Op, ReduceKind, TensorType, UnaryOp, Value,
};

/// The result type of a rule: the contribution to one operand's cotangent.
pub type RuleResult = Result<Value, TraceError>;

/// Emits the contribution of `node`'s result cotangents to its operand `i`.
///
/// `cots[k]` is the cotangent of result `k`, or `None` when nothing flows back into it (only
/// multi-result ops see `None`).
pub fn vjp(t: &mut Tracer, node: &NodeData, cots: &[Option<Value>], i: usize) -> RuleResult {
    let dy = || cots[0].expect("single-result ops are only differentiated with a cotangent");
    match &node.op {
        Op::Unary(u) => elementwise::unary(t, *u, node, dy()),
        Op::Binary(b) => elementwise::binary(t, *b, node, dy(), i),
        Op::Select => elementwise::select(t, node, dy(), i),
        Op::Cast { .. } => elementwise::cast(t, node, dy()),
        Op::Broadcast { .. } => shape::broadcast(t, node, dy()),
        Op::Reduce { kind, axes } => shape::reduce(t, *kind, axes, node, dy()),
        Op::Reshape { .. } => shape::reshape(t, node, dy()),
        Op::Transpose { perm } => shape::transpose(t, perm, dy()),
        Op::Slice {
            start,
            limit,
            stride,
        } => shape::slice(t, node, start, limit, stride, dy()),
        Op::Concat { axis } => shape::concat(t, node, *axis, dy(), i),
        Op::Split { axis, .. } => shape::split(t, node, *axis, cots),
        Op::Pad { low, .. } => shape::pad(t, node, low, dy()),
        Op::MatMul {
            transpose_lhs,
            transpose_rhs,
        } => linalg::matmul(t, node, *transpose_lhs, *transpose_rhs, dy(), i),
        Op::Conv2d { .. } => linalg::conv2d(t, node, dy(), i),
        Op::Pool2d { .. } => linalg::pool2d(t, node, dy()),
        Op::Gather { axis } => index::gather(t, node, *axis, dy()),
        Op::ScatterAdd { axis } => index::scatter_add(t, node, *axis, dy(), i),
        Op::Softmax { axis } => nn::softmax(t, node, *axis, dy()),
        Op::LogSoftmax { axis } => nn::log_softmax(t, node, *axis, dy()),
        Op::LayerNorm { eps } => nn::layer_norm(t, node, *eps, dy()),
        Op::RmsNorm { eps } => nn::rms_norm(t, node, *eps, dy()),
        Op::CrossEntropy => nn::cross_entropy(t, node, dy()),
        Op::Dropout { rate, seed } => nn::dropout(t, *rate, *seed, dy()),
        Op::Ste(_) => custom::straight_through(dy()),
        Op::GradReverse { lambda } => custom::grad_reverse(t, *lambda, dy()),
        Op::Conv2dGradInput { .. }
        | Op::Conv2dGradWeight { .. }
        | Op::MaxPool2dGrad { .. }
        | Op::AvgPool2dGrad { .. } => Err(unsupported(t, &node.op)),
        Op::Input { .. }
        | Op::Param { .. }
        | Op::Constant { .. }
        | Op::Iota { .. }
        | Op::Compare(_)
        | Op::OneHot { .. }
        | Op::StopGradient => unreachable!("`{}` has no differentiable operand", node.op.name()),
    }
}

fn unsupported(t: &Tracer, op: &Op) -> TraceError {
    t.error(
        op.name(),
        &[],
        "second-order differentiation through gradient ops is not supported".into(),
    )
}

// Small expression helpers. Every one goes through the tracer, so shapes are checked.

pub(crate) fn emit(t: &mut Tracer, op: Op, operands: &[Value]) -> RuleResult {
    Ok(t.push_op(op, operands)?[0])
}

pub(crate) fn un(t: &mut Tracer, u: UnaryOp, x: Value) -> RuleResult {
    emit(t, Op::Unary(u), &[x])
}

pub(crate) fn bin(t: &mut Tracer, b: BinaryOp, x: Value, y: Value) -> RuleResult {
    emit(t, Op::Binary(b), &[x, y])
}

pub(crate) fn add(t: &mut Tracer, x: Value, y: Value) -> RuleResult {
    bin(t, BinaryOp::Add, x, y)
}

pub(crate) fn sub(t: &mut Tracer, x: Value, y: Value) -> RuleResult {
    bin(t, BinaryOp::Sub, x, y)
}

pub(crate) fn mul(t: &mut Tracer, x: Value, y: Value) -> RuleResult {
    bin(t, BinaryOp::Mul, x, y)
}

pub(crate) fn div(t: &mut Tracer, x: Value, y: Value) -> RuleResult {
    bin(t, BinaryOp::Div, x, y)
}

pub(crate) fn neg(t: &mut Tracer, x: Value) -> RuleResult {
    un(t, UnaryOp::Neg, x)
}

pub(crate) fn cmp(t: &mut Tracer, c: CompareOp, x: Value, y: Value) -> RuleResult {
    emit(t, Op::Compare(c), &[x, y])
}

pub(crate) fn select(t: &mut Tracer, c: Value, x: Value, y: Value) -> RuleResult {
    emit(t, Op::Select, &[c, x, y])
}

/// A constant splat with the type of `like`.
pub(crate) fn splat(t: &mut Tracer, like: Value, x: f64) -> RuleResult {
    let ty = t.ty(like).clone();
    splat_ty(t, &ty, x)
}

/// A constant splat of a float type.
pub(crate) fn splat_ty(t: &mut Tracer, ty: &TensorType, x: f64) -> RuleResult {
    emit(
        t,
        Op::Constant {
            ty: ty.clone(),
            value: Literal::Float(vec![x]),
        },
        &[],
    )
}

/// `x * c` for a float constant `c`.
pub(crate) fn scale(t: &mut Tracer, x: Value, c: f64) -> RuleResult {
    let k = splat(t, x, c)?;
    mul(t, x, k)
}

/// Sum over `axes` (sorted), removing them.
pub(crate) fn reduce_sum(t: &mut Tracer, x: Value, axes: Vec<usize>) -> RuleResult {
    emit(
        t,
        Op::Reduce {
            kind: ReduceKind::Sum,
            axes,
        },
        &[x],
    )
}

/// Broadcasts `x` (the result of reducing `axis` away from `shape`) back to `shape`.
pub(crate) fn broadcast_back(
    t: &mut Tracer,
    x: Value,
    shape: &[usize],
    axes: &[usize],
) -> RuleResult {
    let dims = (0..shape.len()).filter(|d| !axes.contains(d)).collect();
    emit(
        t,
        Op::Broadcast {
            shape: shape.to_vec(),
            dims,
        },
        &[x],
    )
}

/// `sum(x, axis)` broadcast back to `x`'s shape (a "keep-dims" sum).
pub(crate) fn sum_keep(t: &mut Tracer, x: Value, axis: usize) -> RuleResult {
    let shape = t.ty(x).shape.clone();
    let s = reduce_sum(t, x, vec![axis])?;
    broadcast_back(t, s, &shape, &[axis])
}

/// `mean(x, axis)` broadcast back to `x`'s shape.
pub(crate) fn mean_keep(t: &mut Tracer, x: Value, axis: usize) -> RuleResult {
    let shape = t.ty(x).shape.clone();
    let s = emit(
        t,
        Op::Reduce {
            kind: ReduceKind::Mean,
            axes: vec![axis],
        },
        &[x],
    )?;
    broadcast_back(t, s, &shape, &[axis])
}
