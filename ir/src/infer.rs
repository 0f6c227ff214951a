//! Type and shape rules: the result types of an op, given its operand types.
//!
//! [`infer`] is the single statement of every op's shape rule. The tracer calls it to build nodes,
//! and the verifier calls it to check that every node's declared result types are exactly what its
//! op and operands imply.

use std::fmt;

use crate::op::{Arity, Literal, Op, PoolKind, ReduceKind, SteOp};
use crate::types::{DType, TensorType, MAX_RANK};

/// A violated shape or type rule. It names the op and the operand types involved.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct TypeError {
    /// The op's text-format name.
    pub op: &'static str,
    /// The operand types, as printed.
    pub operands: Vec<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for TypeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`: {}", self.op, self.message)?;
        if !self.operands.is_empty() {
            write!(f, " (operands: {})", self.operands.join(", "))?;
        }
        Ok(())
    }
}

fn conv_out(size: usize, lo: usize, hi: usize, extent: usize, stride: usize) -> Option<usize> {
    let padded = size + lo + hi;
    if stride == 0 || padded < extent {
        None
    } else {
        Some((padded - extent) / stride + 1)
    }
}

fn is_increasing(v: &[usize]) -> bool {
    v.windows(2).all(|w| w[0] < w[1])
}

/// Computes the result types of `op` applied to operands of the given types.
pub fn infer(op: &Op, operands: &[&TensorType]) -> Result<Vec<TensorType>, TypeError> {
    let fail = |message: String| TypeError {
        op: op.name(),
        operands: operands.iter().map(|t| t.to_string()).collect(),
        message,
    };
    match op.arity() {
        Arity::Fixed(n) if operands.len() != n => {
            return Err(fail(format!(
                "expects {n} operand{}, got {}",
                if n == 1 { "" } else { "s" },
                operands.len()
            )))
        }
        Arity::AtLeast(n) if operands.len() < n => {
            return Err(fail(format!(
                "expects at least {n} operand(s), got {}",
                operands.len()
            )))
        }
        _ => {}
    }
    let check_rank = |t: &TensorType| -> Result<(), TypeError> {
        if t.rank() > MAX_RANK {
            Err(fail(format!(
                "rank {} exceeds the maximum rank {MAX_RANK}",
                t.rank()
            )))
        } else {
            Ok(())
        }
    };
    let need_float = |t: &TensorType| -> Result<(), TypeError> {
        if t.dtype.is_float() {
            Ok(())
        } else {
            Err(fail(format!("needs a float operand, got {}", t.dtype)))
        }
    };
    let need_numeric = |t: &TensorType| -> Result<(), TypeError> {
        if t.dtype != DType::Bool {
            Ok(())
        } else {
            Err(fail("needs a numeric operand, got bool".into()))
        }
    };
    let need_index = |t: &TensorType| -> Result<(), TypeError> {
        if matches!(t.dtype, DType::I32 | DType::I64) {
            Ok(())
        } else {
            Err(fail(format!("indices must be i32 or i64, got {}", t.dtype)))
        }
    };
    let axis_ok = |axis: usize, t: &TensorType| -> Result<(), TypeError> {
        if axis < t.rank() {
            Ok(())
        } else {
            Err(fail(format!(
                "axis {axis} is out of range for rank {}",
                t.rank()
            )))
        }
    };
    for t in operands {
        check_rank(t)?;
    }
    let ty = match op {
        Op::Input { ty, .. } | Op::Param { ty, .. } => {
            check_rank(ty)?;
            ty.clone()
        }
        Op::Constant { ty, value } => {
            check_rank(ty)?;
            let kind_ok = match value {
                Literal::Float(_) => ty.dtype.is_float(),
                Literal::Int(_) => ty.dtype.is_int(),
                Literal::Bool(_) => ty.dtype == DType::Bool,
            };
            if !kind_ok {
                return Err(fail(format!(
                    "literal does not match element type {}",
                    ty.dtype
                )));
            }
            let n = value.len();
            if n != 1 && n != ty.num_elements() {
                return Err(fail(format!(
                    "literal has {n} elements; {ty} needs 1 (a splat) or {}",
                    ty.num_elements()
                )));
            }
            ty.clone()
        }
        Op::Iota { ty, dim } => {
            check_rank(ty)?;
            need_numeric(ty)?;
            axis_ok(*dim, ty)?;
            ty.clone()
        }
        Op::Unary(u) => {
            let t = operands[0];
            if !u.accepts(t.dtype) {
                return Err(fail(format!("does not accept element type {}", t.dtype)));
            }
            t.clone()
        }
        Op::Binary(b) => {
            let (a, c) = (operands[0], operands[1]);
            if a != c {
                return Err(fail(format!(
                    "operand types differ: {a} vs {c} (broadcasting is explicit: use `broadcast`)"
                )));
            }
            if !b.accepts(a.dtype) {
                return Err(fail(format!("does not accept element type {}", a.dtype)));
            }
            a.clone()
        }
        Op::Compare(c) => {
            let (a, b) = (operands[0], operands[1]);
            if a != b {
                return Err(fail(format!("operand types differ: {a} vs {b}")));
            }
            if !c.accepts(a.dtype) {
                return Err(fail(format!("does not accept element type {}", a.dtype)));
            }
            TensorType::new(DType::Bool, a.shape.clone())
        }
        Op::Select => {
            let (c, a, b) = (operands[0], operands[1], operands[2]);
            if c.dtype != DType::Bool {
                return Err(fail(format!("condition must be bool, got {}", c.dtype)));
            }
            if a != b {
                return Err(fail(format!("branch types differ: {a} vs {b}")));
            }
            if c.shape != a.shape {
                return Err(fail(format!(
                    "condition shape {c} differs from branch shape {a}"
                )));
            }
            a.clone()
        }
        Op::Cast { to } => TensorType::new(*to, operands[0].shape.clone()),
        Op::Broadcast { shape, dims } => {
            let x = operands[0];
            let out = TensorType::new(x.dtype, shape.clone());
            check_rank(&out)?;
            if dims.len() != x.rank() {
                return Err(fail(format!(
                    "dims has {} entries but the operand has rank {}",
                    dims.len(),
                    x.rank()
                )));
            }
            if !is_increasing(dims) || dims.last().is_some_and(|&d| d >= shape.len()) {
                return Err(fail(format!(
                    "dims {dims:?} must be strictly increasing and below the result rank {}",
                    shape.len()
                )));
            }
            for (i, &d) in dims.iter().enumerate() {
                if x.shape[i] != shape[d] && x.shape[i] != 1 {
                    return Err(fail(format!(
                        "operand dimension {i} (extent {}) cannot broadcast to result dimension {d} (extent {})",
                        x.shape[i], shape[d]
                    )));
                }
            }
            out
        }
        Op::Reduce { kind, axes } => {
            let x = operands[0];
            need_numeric(x)?;
            if *kind == ReduceKind::Mean {
                need_float(x)?;
            }
            if !is_increasing(axes) || axes.last().is_some_and(|&a| a >= x.rank()) {
                return Err(fail(format!(
                    "axes {axes:?} must be strictly increasing and below rank {}",
                    x.rank()
                )));
            }
            let shape = (0..x.rank())
                .filter(|i| !axes.contains(i))
                .map(|i| x.shape[i])
                .collect::<Vec<_>>();
            TensorType::new(x.dtype, shape)
        }
        Op::Reshape { shape } => {
            let x = operands[0];
            let out = TensorType::new(x.dtype, shape.clone());
            check_rank(&out)?;
            if out.num_elements() != x.num_elements() {
                return Err(fail(format!(
                    "cannot reshape {x} ({} elements) to {out} ({} elements)",
                    x.num_elements(),
                    out.num_elements()
                )));
            }
            out
        }
        Op::Transpose { perm } => {
            let x = operands[0];
            let mut seen = vec![false; x.rank()];
            let valid = perm.len() == x.rank()
                && perm
                    .iter()
                    .all(|&p| p < x.rank() && !std::mem::replace(&mut seen[p], true));
            if !valid {
                return Err(fail(format!(
                    "perm {perm:?} is not a permutation of 0..{}",
                    x.rank()
                )));
            }
            TensorType::new(
                x.dtype,
                perm.iter().map(|&p| x.shape[p]).collect::<Vec<_>>(),
            )
        }
        Op::Slice {
            start,
            limit,
            stride,
        } => {
            let x = operands[0];
            let r = x.rank();
            if start.len() != r || limit.len() != r || stride.len() != r {
                return Err(fail(format!(
                    "start, limit and stride need {r} entries each (got {}, {}, {})",
                    start.len(),
                    limit.len(),
                    stride.len()
                )));
            }
            let mut shape = Vec::with_capacity(r);
            for i in 0..r {
                if start[i] > limit[i] || limit[i] > x.shape[i] || stride[i] == 0 {
                    return Err(fail(format!(
                        "dimension {i}: need start <= limit <= {} and stride >= 1, got start {}, limit {}, stride {}",
                        x.shape[i], start[i], limit[i], stride[i]
                    )));
                }
                shape.push((limit[i] - start[i]).div_ceil(stride[i]));
            }
            TensorType::new(x.dtype, shape)
        }
        Op::Concat { axis } => {
            let first = operands[0];
            axis_ok(*axis, first)?;
            let mut shape = first.shape.clone();
            for (k, t) in operands.iter().enumerate().skip(1) {
                let same = t.dtype == first.dtype
                    && t.rank() == first.rank()
                    && (0..t.rank()).all(|i| i == *axis || t.shape[i] == first.shape[i]);
                if !same {
                    return Err(fail(format!(
                        "operand {k} ({t}) does not match operand 0 ({first}) outside axis {axis}"
                    )));
                }
                shape[*axis] += t.shape[*axis];
            }
            TensorType::new(first.dtype, shape)
        }
        Op::Split { axis, sizes } => {
            let x = operands[0];
            axis_ok(*axis, x)?;
            if sizes.is_empty() || sizes.iter().sum::<usize>() != x.shape[*axis] {
                return Err(fail(format!(
                    "sizes {sizes:?} must be non-empty and sum to the extent {} of axis {axis}",
                    x.shape[*axis]
                )));
            }
            return Ok(sizes
                .iter()
                .map(|&s| {
                    let mut shape = x.shape.clone();
                    shape[*axis] = s;
                    TensorType::new(x.dtype, shape)
                })
                .collect());
        }
        Op::Pad { low, high, .. } => {
            let x = operands[0];
            need_numeric(x)?;
            if low.len() != x.rank() || high.len() != x.rank() {
                return Err(fail(format!(
                    "low and high need {} entries each (got {}, {})",
                    x.rank(),
                    low.len(),
                    high.len()
                )));
            }
            let shape = (0..x.rank())
                .map(|i| low[i] + x.shape[i] + high[i])
                .collect::<Vec<_>>();
            TensorType::new(x.dtype, shape)
        }
        Op::MatMul {
            transpose_lhs,
            transpose_rhs,
        } => {
            let (a, b) = (operands[0], operands[1]);
            need_numeric(a)?;
            if a.dtype != b.dtype {
                return Err(fail(format!("element types differ: {a} vs {b}")));
            }
            if a.rank() < 2 || a.rank() != b.rank() {
                return Err(fail(format!(
                    "operands need the same rank >= 2 (batch dimensions are explicit), got {a} and {b}"
                )));
            }
            let r = a.rank();
            if a.shape[..r - 2] != b.shape[..r - 2] {
                return Err(fail(format!("batch dimensions differ: {a} vs {b}")));
            }
            let (m, ka) = if *transpose_lhs {
                (a.shape[r - 1], a.shape[r - 2])
            } else {
                (a.shape[r - 2], a.shape[r - 1])
            };
            let (kb, n) = if *transpose_rhs {
                (b.shape[r - 1], b.shape[r - 2])
            } else {
                (b.shape[r - 2], b.shape[r - 1])
            };
            if ka != kb {
                return Err(fail(format!(
                    "contraction extents differ: lhs has K = {ka}, rhs has K = {kb}"
                )));
            }
            let mut shape = a.shape[..r - 2].to_vec();
            shape.push(m);
            shape.push(n);
            TensorType::new(a.dtype, shape)
        }
        Op::Conv2d {
            stride,
            padding,
            dilation,
            groups,
        } => {
            let (x, w) = (operands[0], operands[1]);
            need_float(x)?;
            if x.dtype != w.dtype || x.rank() != 4 || w.rank() != 4 {
                return Err(fail(format!(
                    "needs input T[N,C,H,W] and weight T[O,C/groups,KH,KW] of one float type, got {x} and {w}"
                )));
            }
            let g = *groups;
            if g == 0 || x.shape[1] % g != 0 || w.shape[0] % g != 0 || w.shape[1] * g != x.shape[1]
            {
                return Err(fail(format!(
                    "channels do not fit groups = {g}: input has C = {}, weight has O = {} and C/groups = {}",
                    x.shape[1], w.shape[0], w.shape[1]
                )));
            }
            if dilation.contains(&0) || w.shape[2] == 0 || w.shape[3] == 0 {
                return Err(fail("dilation and kernel extents must be >= 1".into()));
            }
            let kh = dilation[0] * (w.shape[2] - 1) + 1;
            let kw = dilation[1] * (w.shape[3] - 1) + 1;
            let ho = conv_out(x.shape[2], padding[0], padding[2], kh, stride[0]);
            let wo = conv_out(x.shape[3], padding[1], padding[3], kw, stride[1]);
            match (ho, wo) {
                (Some(ho), Some(wo)) => {
                    TensorType::new(x.dtype, vec![x.shape[0], w.shape[0], ho, wo])
                }
                _ => {
                    return Err(fail(format!(
                        "kernel ({kh}x{kw} with dilation) does not fit the padded input, or a stride is 0"
                    )))
                }
            }
        }
        Op::Pool2d {
            kind,
            window,
            stride,
            padding,
            count_include_pad,
        } => {
            let x = operands[0];
            need_float(x)?;
            if x.rank() != 4 {
                return Err(fail(format!("needs input T[N,C,H,W], got {x}")));
            }
            if window.contains(&0) {
                return Err(fail("window extents must be >= 1".into()));
            }
            if *kind == PoolKind::Max && *count_include_pad {
                return Err(fail(
                    "count_include_pad applies to average pooling only".into(),
                ));
            }
            // Every side: a bottom/right padding as large as the window would leave windows
            // that cover padding only, whose maximum would be the padding.
            if *kind == PoolKind::Max
                && (padding[0] >= window[0]
                    || padding[1] >= window[1]
                    || padding[2] >= window[0]
                    || padding[3] >= window[1])
            {
                return Err(fail("padding must be smaller than the window".into()));
            }
            let ho = conv_out(x.shape[2], padding[0], padding[2], window[0], stride[0]);
            let wo = conv_out(x.shape[3], padding[1], padding[3], window[1], stride[1]);
            match (ho, wo) {
                (Some(ho), Some(wo)) => {
                    TensorType::new(x.dtype, vec![x.shape[0], x.shape[1], ho, wo])
                }
                _ => {
                    return Err(fail(
                        "window does not fit the padded input, or a stride is 0".into(),
                    ))
                }
            }
        }
        Op::Conv2dGradInput {
            stride,
            padding,
            dilation,
            groups,
            shape,
        } => {
            let (dy, w) = (operands[0], operands[1]);
            let x = TensorType::new(dy.dtype, shape.clone());
            let fwd = Op::Conv2d {
                stride: *stride,
                padding: *padding,
                dilation: *dilation,
                groups: *groups,
            };
            check_adjoint(&fwd, &[&x, w], dy).map_err(fail)?;
            x
        }
        Op::Conv2dGradWeight {
            stride,
            padding,
            dilation,
            groups,
            shape,
        } => {
            let (x, dy) = (operands[0], operands[1]);
            let w = TensorType::new(dy.dtype, shape.clone());
            let fwd = Op::Conv2d {
                stride: *stride,
                padding: *padding,
                dilation: *dilation,
                groups: *groups,
            };
            check_adjoint(&fwd, &[x, &w], dy).map_err(fail)?;
            w
        }
        Op::MaxPool2dGrad {
            window,
            stride,
            padding,
        } => {
            let (x, dy) = (operands[0], operands[1]);
            let fwd = Op::Pool2d {
                kind: PoolKind::Max,
                window: *window,
                stride: *stride,
                padding: *padding,
                count_include_pad: false,
            };
            check_adjoint(&fwd, &[x], dy).map_err(fail)?;
            x.clone()
        }
        Op::AvgPool2dGrad {
            window,
            stride,
            padding,
            count_include_pad,
            shape,
        } => {
            let dy = operands[0];
            let x = TensorType::new(dy.dtype, shape.clone());
            let fwd = Op::Pool2d {
                kind: PoolKind::Avg,
                window: *window,
                stride: *stride,
                padding: *padding,
                count_include_pad: *count_include_pad,
            };
            check_adjoint(&fwd, &[&x], dy).map_err(fail)?;
            x
        }
        Op::Gather { axis } => {
            let (t, idx) = (operands[0], operands[1]);
            need_index(idx)?;
            axis_ok(*axis, t)?;
            let mut shape = t.shape[..*axis].to_vec();
            shape.extend_from_slice(&idx.shape);
            shape.extend_from_slice(&t.shape[axis + 1..]);
            let out = TensorType::new(t.dtype, shape);
            check_rank(&out)?;
            out
        }
        Op::ScatterAdd { axis } => {
            let (base, idx, upd) = (operands[0], operands[1], operands[2]);
            need_numeric(base)?;
            need_index(idx)?;
            axis_ok(*axis, base)?;
            let mut shape = base.shape[..*axis].to_vec();
            shape.extend_from_slice(&idx.shape);
            shape.extend_from_slice(&base.shape[axis + 1..]);
            let expected = TensorType::new(base.dtype, shape);
            if *upd != expected {
                return Err(fail(format!("updates must be {expected}, got {upd}")));
            }
            base.clone()
        }
        Op::Softmax { axis } | Op::LogSoftmax { axis } => {
            let x = operands[0];
            need_float(x)?;
            axis_ok(*axis, x)?;
            x.clone()
        }
        Op::LayerNorm { .. } | Op::RmsNorm { .. } => {
            let x = operands[0];
            need_float(x)?;
            if x.rank() == 0 {
                return Err(fail(
                    "needs rank >= 1 (it normalises the last dimension)".into(),
                ));
            }
            x.clone()
        }
        Op::CrossEntropy => {
            let (logits, labels) = (operands[0], operands[1]);
            need_float(logits)?;
            need_index(labels)?;
            let r = logits.rank();
            if r == 0 || labels.shape[..] != logits.shape[..r - 1] {
                return Err(fail(format!(
                    "needs logits T[B…,C] and labels I[B…], got {logits} and {labels}"
                )));
            }
            TensorType::new(logits.dtype, labels.shape.clone())
        }
        Op::OneHot { depth, dtype } => {
            let idx = operands[0];
            need_index(idx)?;
            if *dtype == DType::Bool {
                return Err(fail("result must be numeric".into()));
            }
            let mut shape = idx.shape.clone();
            shape.push(*depth);
            let out = TensorType::new(*dtype, shape);
            check_rank(&out)?;
            out
        }
        Op::Dropout { rate, .. } => {
            let x = operands[0];
            need_float(x)?;
            if !(0.0..1.0).contains(rate) {
                return Err(fail(format!("rate must be in [0, 1), got {rate}")));
            }
            x.clone()
        }
        Op::StopGradient => operands[0].clone(),
        Op::Ste(s) => {
            let x = operands[0];
            need_float(x)?;
            if let SteOp::ArgmaxOneHot { axis } = s {
                if *axis >= x.rank() {
                    return Err(fail(format!(
                        "axis {axis} is out of range for {x} (rank {})",
                        x.rank()
                    )));
                }
            }
            x.clone()
        }
        Op::GradReverse { lambda } => {
            let x = operands[0];
            need_float(x)?;
            if !lambda.is_finite() {
                return Err(fail(format!("lambda must be finite, got {lambda}")));
            }
            x.clone()
        }
    };
    Ok(vec![ty])
}

/// Checks that the forward op applied to `inputs` gives `expected` (for the gradient ops, whose
/// shapes are defined through their forward op). Returns the message to report otherwise.
fn check_adjoint(fwd: &Op, inputs: &[&TensorType], expected: &TensorType) -> Result<(), String> {
    match infer(fwd, inputs) {
        Ok(out) if out.len() == 1 && out[0] == *expected => Ok(()),
        Ok(out) => Err(format!(
            "the forward `{}` of {} gives {}, not the incoming gradient's {expected}",
            fwd.name(),
            inputs
                .iter()
                .map(|t| t.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            out[0]
        )),
        Err(e) => Err(format!(
            "the forward `{}` is invalid: {}",
            fwd.name(),
            e.message
        )),
    }
}
