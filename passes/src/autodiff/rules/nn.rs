//! VJP rules of the composite neural-network ops: softmax, log-softmax, layer and RMS norm,
//! cross-entropy, dropout.

use cleave_ir::tracer::Tracer;
use cleave_ir::{BinaryOp, NodeData, Op, UnaryOp, Value};

use super::{add, broadcast_back, emit, mean_keep, mul, splat, sub, sum_keep, un, RuleResult};

/// `y = softmax(x)` along `axis`; `dx = y·(dy - Σ(dy·y))`. Reads only `y`.
pub(super) fn softmax(t: &mut Tracer, node: &NodeData, axis: usize, dy: Value) -> RuleResult {
    let y = node.results[0];
    let dyy = mul(t, dy, y)?;
    let s = sum_keep(t, dyy, axis)?;
    let d = sub(t, dy, s)?;
    mul(t, y, d)
}

/// `y = log_softmax(x)` along `axis`; `dx = dy - exp(y)·Σdy`. Reads only `y`.
pub(super) fn log_softmax(t: &mut Tracer, node: &NodeData, axis: usize, dy: Value) -> RuleResult {
    let y = node.results[0];
    let p = un(t, UnaryOp::Exp, y)?;
    let s = sum_keep(t, dy, axis)?;
    let ps = mul(t, p, s)?;
    sub(t, dy, ps)
}

/// `r = 1/√(mean(x²) + eps)` (or of the centred `x` for layer norm), broadcast over the last
/// dimension. Recomputed from `x` in the backward pass instead of being stashed (one value per
/// row).
fn inv_rms(t: &mut Tracer, x: Value, eps: f64) -> RuleResult {
    let last = t.ty(x).rank() - 1;
    let x2 = mul(t, x, x)?;
    let m = mean_keep(t, x2, last)?;
    let e = splat(t, m, eps)?;
    let v = add(t, m, e)?;
    un(t, UnaryOp::Rsqrt, v)
}

/// `y = (x - μ)·r` over the last dimension, `r = 1/√(var + eps)`;
/// `dx = r·(dy - mean(dy) - y·mean(dy·y))`. Reads `x` (for `r`) and `y`.
pub(super) fn layer_norm(t: &mut Tracer, node: &NodeData, eps: f64, dy: Value) -> RuleResult {
    let (x, y) = (node.operands[0], node.results[0]);
    let last = t.ty(x).rank() - 1;
    let mu = mean_keep(t, x, last)?;
    let xc = sub(t, x, mu)?;
    let r = inv_rms(t, xc, eps)?;
    let m1 = mean_keep(t, dy, last)?;
    let dyy = mul(t, dy, y)?;
    let m2 = mean_keep(t, dyy, last)?;
    let ym2 = mul(t, y, m2)?;
    let a = sub(t, dy, m1)?;
    let b = sub(t, a, ym2)?;
    mul(t, r, b)
}

/// `y = x·r` over the last dimension, `r = 1/√(mean(x²) + eps)`; `dx = r·(dy - y·mean(dy·y))`.
pub(super) fn rms_norm(t: &mut Tracer, node: &NodeData, eps: f64, dy: Value) -> RuleResult {
    let (x, y) = (node.operands[0], node.results[0]);
    let last = t.ty(x).rank() - 1;
    let r = inv_rms(t, x, eps)?;
    let dyy = mul(t, dy, y)?;
    let m = mean_keep(t, dyy, last)?;
    let ym = mul(t, y, m)?;
    let d = sub(t, dy, ym)?;
    mul(t, r, d)
}

/// `l = -log_softmax(z)[label]` per position;
/// `dz = (softmax(z) - onehot(label))·dl` (dl broadcast over classes).
pub(super) fn cross_entropy(t: &mut Tracer, node: &NodeData, dl: Value) -> RuleResult {
    let (z, labels) = (node.operands[0], node.operands[1]);
    let z_ty = t.ty(z).clone();
    let last = z_ty.rank() - 1;
    let p = emit(t, Op::Softmax { axis: last }, &[z])?;
    let oh = emit(
        t,
        Op::OneHot {
            depth: z_ty.shape[last],
            dtype: z_ty.dtype,
        },
        &[labels],
    )?;
    let d = emit(t, Op::Binary(BinaryOp::Sub), &[p, oh])?;
    let dlb = broadcast_back(t, dl, &z_ty.shape, &[last])?;
    mul(t, d, dlb)
}

/// `y = dropout(x)`; `dx = dropout(dy)` with the same seed: the same mask and scale, because the
/// mask is a function of the seed and the element index only.
pub(super) fn dropout(t: &mut Tracer, rate: f64, seed: u64, dy: Value) -> RuleResult {
    emit(t, Op::Dropout { rate, seed }, &[dy])
}
