//! VJP rules of elementwise ops: unary, binary, select, cast.

use std::f64::consts::PI;

use cleave_ir::tracer::Tracer;
use cleave_ir::{BinaryOp, CompareOp, NodeData, Op, UnaryOp, Value};

use super::{add, cmp, div, emit, mul, neg, scale, select as sel, splat, sub, un, RuleResult};

/// `y = f(x)`; returns `dy · f'(x)`.
pub(super) fn unary(t: &mut Tracer, u: UnaryOp, node: &NodeData, dy: Value) -> RuleResult {
    let x = node.operands[0];
    let y = node.results[0];
    match u {
        // f(x) = -x; f' = -1
        UnaryOp::Neg => neg(t, dy),
        // f(x) = |x|; f' = sign(x)
        UnaryOp::Abs => {
            let s = un(t, UnaryOp::Sign, x)?;
            mul(t, dy, s)
        }
        // f(x) = e^x; f' = e^x = y
        UnaryOp::Exp => mul(t, dy, y),
        // f(x) = ln x; f' = 1/x
        UnaryOp::Log => div(t, dy, x),
        // f(x) = √x; f' = 1/(2√x) = 0.5/y
        UnaryOp::Sqrt => {
            let h = scale(t, dy, 0.5)?;
            div(t, h, y)
        }
        // f(x) = x^-1/2; f' = -1/2 · x^-3/2 = -0.5 · y³
        UnaryOp::Rsqrt => {
            let y2 = mul(t, y, y)?;
            let y3 = mul(t, y2, y)?;
            let g = mul(t, dy, y3)?;
            scale(t, g, -0.5)
        }
        // f(x) = tanh x; f' = 1 - y²
        UnaryOp::Tanh => {
            let y2 = mul(t, y, y)?;
            let one = splat(t, y, 1.0)?;
            let d = sub(t, one, y2)?;
            mul(t, dy, d)
        }
        // f(x) = σ(x); f' = y(1 - y)
        UnaryOp::Sigmoid => {
            let one = splat(t, y, 1.0)?;
            let c = sub(t, one, y)?;
            let d = mul(t, y, c)?;
            mul(t, dy, d)
        }
        // f(x) = max(x, 0); f' = [x > 0]
        UnaryOp::Relu => {
            let zero = splat(t, x, 0.0)?;
            let pos = cmp(t, CompareOp::Gt, x, zero)?;
            sel(t, pos, dy, zero)
        }
        // f(x) = x·Φ(x); f' = Φ(x) + x·φ(x), Φ(x) = (1 + erf(x/√2))/2, φ(x) = e^(-x²/2)/√(2π)
        UnaryOp::Gelu => {
            let xs = scale(t, x, std::f64::consts::FRAC_1_SQRT_2)?;
            let e = un(t, UnaryOp::Erf, xs)?;
            let one = splat(t, x, 1.0)?;
            let e1 = add(t, e, one)?;
            let cdf = scale(t, e1, 0.5)?;
            let x2 = mul(t, x, x)?;
            let m = scale(t, x2, -0.5)?;
            let g = un(t, UnaryOp::Exp, m)?;
            let pdf = scale(t, g, 1.0 / (2.0 * PI).sqrt())?;
            let xpdf = mul(t, x, pdf)?;
            let d = add(t, cdf, xpdf)?;
            mul(t, dy, d)
        }
        // f(x) = x/2·(1 + tanh u), u = c(x + 0.044715x³), c = √(2/π);
        // f' = (1 + tanh u)/2 + x/2·(1 - tanh²u)·c(1 + 3·0.044715x²)
        UnaryOp::GeluTanh => {
            let c = (2.0 / PI).sqrt();
            let x2 = mul(t, x, x)?;
            let x3 = mul(t, x2, x)?;
            let k = scale(t, x3, 0.044715)?;
            let inner = add(t, x, k)?;
            let u = scale(t, inner, c)?;
            let th = un(t, UnaryOp::Tanh, u)?;
            let one = splat(t, x, 1.0)?;
            let a = add(t, one, th)?;
            let left = scale(t, a, 0.5)?;
            let th2 = mul(t, th, th)?;
            let sech2 = sub(t, one, th2)?;
            let q = scale(t, x2, 3.0 * 0.044715)?;
            let q1 = add(t, one, q)?;
            let du = scale(t, q1, c)?;
            let r = mul(t, sech2, du)?;
            let xr = mul(t, x, r)?;
            let right = scale(t, xr, 0.5)?;
            let d = add(t, left, right)?;
            mul(t, dy, d)
        }
        // f(x) = x·σ(x); f' = σ(x)·(1 + x·(1 - σ(x)))
        UnaryOp::Silu => {
            let s = un(t, UnaryOp::Sigmoid, x)?;
            let one = splat(t, x, 1.0)?;
            let c = sub(t, one, s)?;
            let xc = mul(t, x, c)?;
            let q = add(t, one, xc)?;
            let d = mul(t, s, q)?;
            mul(t, dy, d)
        }
        // f(x) = sin x; f' = cos x
        UnaryOp::Sin => {
            let c = un(t, UnaryOp::Cos, x)?;
            mul(t, dy, c)
        }
        // f(x) = cos x; f' = -sin x
        UnaryOp::Cos => {
            let s = un(t, UnaryOp::Sin, x)?;
            let g = mul(t, dy, s)?;
            neg(t, g)
        }
        // f(x) = erf x; f' = 2/√π · e^(-x²)
        UnaryOp::Erf => {
            let x2 = mul(t, x, x)?;
            let m = neg(t, x2)?;
            let e = un(t, UnaryOp::Exp, m)?;
            let d = scale(t, e, 2.0 / PI.sqrt())?;
            mul(t, dy, d)
        }
        // f(x) = 1/x; f' = -1/x² = -y²
        UnaryOp::Reciprocal => {
            let y2 = mul(t, y, y)?;
            let g = mul(t, dy, y2)?;
            neg(t, g)
        }
        UnaryOp::Sign | UnaryOp::Floor | UnaryOp::Round | UnaryOp::Not => {
            unreachable!("`{}` is not differentiable", u.name())
        }
    }
}

/// `y = a ∘ b`; returns the contribution to operand `i` (0 = a, 1 = b).
pub(super) fn binary(
    t: &mut Tracer,
    b: BinaryOp,
    node: &NodeData,
    dy: Value,
    i: usize,
) -> RuleResult {
    let (a, c) = (node.operands[0], node.operands[1]);
    let y = node.results[0];
    match (b, i) {
        // y = a + b; ∂y/∂a = ∂y/∂b = 1
        (BinaryOp::Add, _) => Ok(dy),
        // y = a - b; ∂y/∂a = 1, ∂y/∂b = -1
        (BinaryOp::Sub, 0) => Ok(dy),
        (BinaryOp::Sub, _) => neg(t, dy),
        // y = a·b; ∂y/∂a = b, ∂y/∂b = a
        (BinaryOp::Mul, 0) => mul(t, dy, c),
        (BinaryOp::Mul, _) => mul(t, dy, a),
        // y = a/b; ∂y/∂a = 1/b, ∂y/∂b = -a/b² = -y/b
        (BinaryOp::Div, 0) => div(t, dy, c),
        (BinaryOp::Div, _) => {
            let g = mul(t, dy, y)?;
            let q = div(t, g, c)?;
            neg(t, q)
        }
        // y = max(a, b): the gradient goes to the larger operand; ties split it evenly (as
        // PyTorch's `maximum`).
        (BinaryOp::Max | BinaryOp::Min, _) => {
            let (mine, other) = if i == 0 { (a, c) } else { (c, a) };
            let wins = if b == BinaryOp::Max {
                CompareOp::Gt
            } else {
                CompareOp::Lt
            };
            let zero = splat(t, dy, 0.0)?;
            let half = scale(t, dy, 0.5)?;
            let tie = cmp(t, CompareOp::Eq, mine, other)?;
            let on_tie = sel(t, tie, half, zero)?;
            let win = cmp(t, wins, mine, other)?;
            sel(t, win, dy, on_tie)
        }
        // y = a^b; ∂y/∂a = b·a^(b-1)
        (BinaryOp::Pow, 0) => {
            let one = splat(t, c, 1.0)?;
            let bm1 = sub(t, c, one)?;
            let p = emit(t, Op::Binary(BinaryOp::Pow), &[a, bm1])?;
            let d = mul(t, c, p)?;
            mul(t, dy, d)
        }
        // ∂y/∂b = y·ln a (0 where a = 0, as in PyTorch)
        (BinaryOp::Pow, _) => {
            let l = un(t, UnaryOp::Log, a)?;
            let d = mul(t, y, l)?;
            let g = mul(t, dy, d)?;
            let zero = splat(t, a, 0.0)?;
            let at_zero = cmp(t, CompareOp::Eq, a, zero)?;
            sel(t, at_zero, zero, g)
        }
        (BinaryOp::And | BinaryOp::Or, _) => unreachable!("bool ops carry no gradient"),
    }
}

/// `y = c ? a : b`; operand 1 gets `c ? dy : 0`, operand 2 gets `c ? 0 : dy`.
pub(super) fn select(t: &mut Tracer, node: &NodeData, dy: Value, i: usize) -> RuleResult {
    let c = node.operands[0];
    let zero = splat(t, dy, 0.0)?;
    if i == 1 {
        sel(t, c, dy, zero)
    } else {
        sel(t, c, zero, dy)
    }
}

/// `y = cast(x)` between float types; `dx = cast(dy)` back to x's type.
pub(super) fn cast(t: &mut Tracer, node: &NodeData, dy: Value) -> RuleResult {
    let to = t.ty(node.operands[0]).dtype;
    emit(t, Op::Cast { to }, &[dy])
}
