//! VJP rules of matrix products, convolutions and pooling.

use cleave_ir::tracer::Tracer;
use cleave_ir::{NodeData, Op, PoolKind, Value};

use super::{emit, RuleResult};

fn mm(t: &mut Tracer, a: Value, b: Value, transpose_lhs: bool, transpose_rhs: bool) -> RuleResult {
    emit(
        t,
        Op::MatMul {
            transpose_lhs,
            transpose_rhs,
        },
        &[a, b],
    )
}

/// `Y = op(A)·op(B)` where `op` transposes the last two dimensions when the flag is set.
///
/// With `A' = op(A)`, `B' = op(B)`: `dA' = dY·B'ᵀ` and `dB' = A'ᵀ·dY`; then `dA = op(dA')`,
/// `dB = op(dB')`. Each case is one product whose flags absorb every transpose. `dA` reads only
/// `B` and `dB` reads only `A`, so the input gradient never waits for the weight's operand.
pub(super) fn matmul(
    t: &mut Tracer,
    node: &NodeData,
    tl: bool,
    tr: bool,
    dy: Value,
    i: usize,
) -> RuleResult {
    let (a, b) = (node.operands[0], node.operands[1]);
    if i == 0 {
        match (tl, tr) {
            (false, false) => mm(t, dy, b, false, true), // dA = dY·Bᵀ
            (false, true) => mm(t, dy, b, false, false), // dA = dY·B
            (true, false) => mm(t, b, dy, false, true),  // dA = B·dYᵀ
            (true, true) => mm(t, b, dy, true, true),    // dA = Bᵀ·dYᵀ
        }
    } else {
        match (tl, tr) {
            (false, false) => mm(t, a, dy, true, false), // dB = Aᵀ·dY
            (true, false) => mm(t, a, dy, false, false), // dB = A·dY
            (false, true) => mm(t, dy, a, true, false),  // dB = dYᵀ·A
            (true, true) => mm(t, dy, a, true, true),    // dB = dYᵀ·Aᵀ
        }
    }
}

/// `y = conv2d(x, w)`: `dx = conv2d_grad_input(dy, w)` (reads only `w`) and
/// `dw = conv2d_grad_weight(x, dy)` (reads only `x`).
pub(super) fn conv2d(t: &mut Tracer, node: &NodeData, dy: Value, i: usize) -> RuleResult {
    let Op::Conv2d {
        stride,
        padding,
        dilation,
        groups,
    } = node.op
    else {
        unreachable!()
    };
    let (x, w) = (node.operands[0], node.operands[1]);
    if i == 0 {
        let shape = t.ty(x).shape.clone();
        emit(
            t,
            Op::Conv2dGradInput {
                stride,
                padding,
                dilation,
                groups,
                shape,
            },
            &[dy, w],
        )
    } else {
        let shape = t.ty(w).shape.clone();
        emit(
            t,
            Op::Conv2dGradWeight {
                stride,
                padding,
                dilation,
                groups,
                shape,
            },
            &[x, dy],
        )
    }
}

/// `y = pool2d(x)`: max pooling routes each window's gradient to its (first) maximum and needs
/// `x`; average pooling spreads it evenly and needs only shapes.
pub(super) fn pool2d(t: &mut Tracer, node: &NodeData, dy: Value) -> RuleResult {
    let Op::Pool2d {
        kind,
        window,
        stride,
        padding,
        count_include_pad,
    } = node.op
    else {
        unreachable!()
    };
    let x = node.operands[0];
    match kind {
        PoolKind::Max => emit(
            t,
            Op::MaxPool2dGrad {
                window,
                stride,
                padding,
            },
            &[x, dy],
        ),
        PoolKind::Avg => {
            let shape = t.ty(x).shape.clone();
            emit(
                t,
                Op::AvgPool2dGrad {
                    window,
                    stride,
                    padding,
                    count_include_pad,
                    shape,
                },
                &[dy],
            )
        }
    }
}
