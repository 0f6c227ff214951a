//! The op kernels: each computes result elements (in f64 / i64, unrounded) from operand tensors.
//!
//! Operand and result types have been checked against the shape rules before a kernel runs, so
//! the kernels index freely. Data-dependent problems (an index out of range, an integer division
//! by zero) come back as `Err(message)`; the caller adds the node.

use super::erf::{erf, erfc};
use super::tensor::{Tensor, TensorData};
use crate::op::{
    dropout_keep, BinaryOp, CompareOp, Literal, Op, PoolKind, ReduceKind, SteOp, UnaryOp,
};
use crate::types::{strides, DType, TensorType};

type KResult<T> = Result<T, String>;

/// Applies generic code to the element vector of any storage kind, keeping the kind.
macro_rules! map_data {
    ($data:expr, $v:ident => $body:expr) => {
        match $data {
            TensorData::Float($v) => TensorData::Float($body),
            TensorData::Int($v) => TensorData::Int($body),
            TensorData::Bool($v) => TensorData::Bool($body),
        }
    };
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Formats a flat row-major index as a multi-index of `shape`.
fn multi_index(mut flat: usize, shape: &[usize]) -> String {
    let mut idx = vec![0; shape.len()];
    for d in (0..shape.len()).rev() {
        if shape[d] > 0 {
            idx[d] = flat % shape[d];
            flat /= shape[d];
        }
    }
    format!("{idx:?}")
}

/// Calls `f(i, j)` for every position of `shape` in row-major order, where `i` is the flat
/// row-major position and `j = offset + Σ index[d]·strides[d]`.
fn for_each_strided(
    shape: &[usize],
    strides: &[usize],
    offset: usize,
    mut f: impl FnMut(usize, usize),
) {
    let n = numel(shape);
    if n == 0 {
        return;
    }
    let rank = shape.len();
    let mut idx = vec![0usize; rank];
    let mut j = offset;
    for i in 0..n {
        f(i, j);
        for d in (0..rank).rev() {
            idx[d] += 1;
            j += strides[d];
            if idx[d] < shape[d] {
                break;
            }
            j -= strides[d] * shape[d];
            idx[d] = 0;
        }
    }
}

/// The source positions of a strided view: `out[i] = src[j]` for every `(i, j)` of
/// [`for_each_strided`].
fn strided_positions(shape: &[usize], strides: &[usize], offset: usize) -> Vec<usize> {
    let mut pos = Vec::with_capacity(numel(shape));
    for_each_strided(shape, strides, offset, |_, j| pos.push(j));
    pos
}

fn take<T: Copy>(src: &[T], positions: &[usize]) -> Vec<T> {
    positions.iter().map(|&j| src[j]).collect()
}

/// `(outer, extent, inner)` of `shape` around `axis`.
fn split_at_axis(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (
        numel(&shape[..axis]),
        shape[axis],
        numel(&shape[axis + 1..]),
    )
}

fn floats<'a>(t: &'a Tensor, what: &str) -> KResult<&'a [f64]> {
    t.as_f64()
        .ok_or_else(|| format!("{what} must be a float tensor, got {}", t.dtype))
}

fn ints<'a>(t: &'a Tensor, what: &str) -> KResult<&'a [i64]> {
    t.as_i64()
        .ok_or_else(|| format!("{what} must be an int tensor, got {}", t.dtype))
}

/// Evaluates `op` on `x` (the operands); `out` holds the result types as represented (f64 for
/// every float in f64 precision).
pub(super) fn eval(op: &Op, x: &[&Tensor], out: &[TensorType]) -> KResult<Vec<TensorData>> {
    let ty = &out[0];
    let one = |d: TensorData| Ok(vec![d]);
    match op {
        Op::Input { .. } | Op::Param { .. } => Err("arguments are bound, not evaluated".into()),
        Op::Constant { value, .. } => {
            let n = ty.num_elements();
            one(match value {
                Literal::Float(v) if v.len() == 1 => TensorData::Float(vec![v[0]; n]),
                Literal::Float(v) => TensorData::Float(v.clone()),
                Literal::Int(v) if v.len() == 1 => TensorData::Int(vec![v[0]; n]),
                Literal::Int(v) => TensorData::Int(v.clone()),
                Literal::Bool(v) if v.len() == 1 => TensorData::Bool(vec![v[0]; n]),
                Literal::Bool(v) => TensorData::Bool(v.clone()),
            })
        }
        Op::Iota { dim, .. } => {
            let st = strides(&ty.shape);
            let idx = (0..ty.num_elements()).map(|i| (i / st[*dim]) % ty.shape[*dim]);
            one(if ty.dtype.is_float() {
                TensorData::Float(idx.map(|i| i as f64).collect())
            } else {
                TensorData::Int(idx.map(|i| i as i64).collect())
            })
        }
        Op::Unary(u) => one(unary(*u, &x[0].data)?),
        Op::Binary(b) => one(binary(*b, x[0], x[1])?),
        Op::Compare(c) => one(compare(*c, &x[0].data, &x[1].data)?),
        Op::Select => {
            let c = x[0].as_bool().ok_or("condition must be bool")?;
            let pick = |i: usize| c[i];
            one(match (&x[1].data, &x[2].data) {
                (TensorData::Float(a), TensorData::Float(b)) => TensorData::Float(
                    (0..c.len())
                        .map(|i| if pick(i) { a[i] } else { b[i] })
                        .collect(),
                ),
                (TensorData::Int(a), TensorData::Int(b)) => TensorData::Int(
                    (0..c.len())
                        .map(|i| if pick(i) { a[i] } else { b[i] })
                        .collect(),
                ),
                (TensorData::Bool(a), TensorData::Bool(b)) => TensorData::Bool(
                    (0..c.len())
                        .map(|i| if pick(i) { a[i] } else { b[i] })
                        .collect(),
                ),
                _ => return Err("branches hold different kinds of elements".into()),
            })
        }
        Op::Cast { .. } => one(cast(&x[0].data, ty.dtype)),
        Op::Broadcast { shape, dims } => {
            let src = &x[0].shape;
            let src_st = strides(src);
            let mut st = vec![0; shape.len()];
            for (i, &d) in dims.iter().enumerate() {
                if src[i] != 1 {
                    st[d] = src_st[i];
                }
            }
            let pos = strided_positions(shape, &st, 0);
            one(map_data!(&x[0].data, v => take(v, &pos)))
        }
        Op::Reduce { kind, axes } => one(reduce(*kind, axes, x[0])?),
        Op::Reshape { .. } | Op::StopGradient | Op::GradReverse { .. } => one(x[0].data.clone()),
        Op::Ste(SteOp::Round) => one(unary(UnaryOp::Round, &x[0].data)?),
        Op::Ste(SteOp::Sign) => one(unary(UnaryOp::Sign, &x[0].data)?),
        Op::Ste(SteOp::ArgmaxOneHot { axis }) => {
            let v = floats(x[0], "the operand")?;
            let (outer, n, inner) = split_at_axis(&x[0].shape, *axis);
            let mut out = vec![0.0; v.len()];
            for o in 0..outer {
                for i in 0..inner {
                    let at = |k: usize| (o * n + k) * inner + i;
                    let mut best = 0;
                    for k in 1..n {
                        if v[at(k)] > v[at(best)] {
                            best = k;
                        }
                    }
                    if n > 0 {
                        out[at(best)] = 1.0;
                    }
                }
            }
            one(TensorData::Float(out))
        }
        Op::Transpose { perm } => {
            let src_st = strides(&x[0].shape);
            let st: Vec<usize> = perm.iter().map(|&p| src_st[p]).collect();
            let pos = strided_positions(&ty.shape, &st, 0);
            one(map_data!(&x[0].data, v => take(v, &pos)))
        }
        Op::Slice { start, stride, .. } => {
            let src_st = strides(&x[0].shape);
            let offset: usize = start.iter().zip(&src_st).map(|(a, b)| a * b).sum();
            let st: Vec<usize> = stride.iter().zip(&src_st).map(|(a, b)| a * b).collect();
            let pos = strided_positions(&ty.shape, &st, offset);
            one(map_data!(&x[0].data, v => take(v, &pos)))
        }
        Op::Concat { axis } => {
            let (outer, _, inner) = split_at_axis(&ty.shape, *axis);
            let mut pos: Vec<(usize, usize)> = Vec::with_capacity(ty.num_elements());
            for o in 0..outer {
                for (k, t) in x.iter().enumerate() {
                    let chunk = t.shape[*axis] * inner;
                    pos.extend((0..chunk).map(|j| (k, o * chunk + j)));
                }
            }
            one(match &x[0].data {
                TensorData::Float(_) => TensorData::Float(
                    pos.iter()
                        .map(|&(k, j)| x[k].as_f64().unwrap()[j])
                        .collect(),
                ),
                TensorData::Int(_) => TensorData::Int(
                    pos.iter()
                        .map(|&(k, j)| x[k].as_i64().unwrap()[j])
                        .collect(),
                ),
                TensorData::Bool(_) => TensorData::Bool(
                    pos.iter()
                        .map(|&(k, j)| x[k].as_bool().unwrap()[j])
                        .collect(),
                ),
            })
        }
        Op::Split { axis, sizes } => {
            let src_st = strides(&x[0].shape);
            let mut start = 0;
            let mut results = Vec::with_capacity(sizes.len());
            for (piece, &size) in out.iter().zip(sizes) {
                let pos = strided_positions(&piece.shape, &src_st, start * src_st[*axis]);
                results.push(map_data!(&x[0].data, v => take(v, &pos)));
                start += size;
            }
            Ok(results)
        }
        Op::Pad { low, value, .. } => {
            // Every result position starts as the fill value; the operand is then written into
            // the window starting at `low`.
            let out_st = strides(&ty.shape);
            let offset: usize = low.iter().zip(&out_st).map(|(a, b)| a * b).sum();
            let pos = strided_positions(&x[0].shape, &out_st, offset);
            let n = ty.num_elements();
            one(match &x[0].data {
                TensorData::Float(v) => {
                    let mut r = vec![*value; n];
                    pos.iter().zip(v).for_each(|(&j, &e)| r[j] = e);
                    TensorData::Float(r)
                }
                TensorData::Int(v) => {
                    let fill = match cast(&TensorData::Float(vec![*value]), ty.dtype) {
                        TensorData::Int(f) => f[0],
                        _ => unreachable!("cast to an int dtype gives ints"),
                    };
                    let mut r = vec![fill; n];
                    pos.iter().zip(v).for_each(|(&j, &e)| r[j] = e);
                    TensorData::Int(r)
                }
                TensorData::Bool(_) => return Err("pad needs a numeric operand".into()),
            })
        }
        Op::MatMul {
            transpose_lhs,
            transpose_rhs,
        } => one(matmul(
            x[0],
            x[1],
            *transpose_lhs,
            *transpose_rhs,
            &ty.shape,
        )?),
        Op::Conv2d {
            stride,
            padding,
            dilation,
            groups,
        } => {
            let geo = ConvGeometry {
                x: rank4(&x[0].shape),
                w: rank4(&x[1].shape),
                out: [ty.shape[2], ty.shape[3]],
                stride: *stride,
                padding: *padding,
                dilation: *dilation,
                groups: *groups,
            };
            one(TensorData::Float(conv2d(x[0], x[1], geo)?))
        }
        Op::Conv2dGradInput {
            stride,
            padding,
            dilation,
            groups,
            shape,
        } => {
            let geo = ConvGeometry {
                x: rank4(shape),
                w: rank4(&x[1].shape),
                out: [x[0].shape[2], x[0].shape[3]],
                stride: *stride,
                padding: *padding,
                dilation: *dilation,
                groups: *groups,
            };
            one(TensorData::Float(conv2d_grad_input(x[0], x[1], geo)?))
        }
        Op::Conv2dGradWeight {
            stride,
            padding,
            dilation,
            groups,
            shape,
        } => {
            let geo = ConvGeometry {
                x: rank4(&x[0].shape),
                w: rank4(shape),
                out: [x[1].shape[2], x[1].shape[3]],
                stride: *stride,
                padding: *padding,
                dilation: *dilation,
                groups: *groups,
            };
            one(TensorData::Float(conv2d_grad_weight(x[0], x[1], geo)?))
        }
        Op::MaxPool2dGrad {
            window,
            stride,
            padding,
        } => one(TensorData::Float(max_pool2d_grad(
            x[0], x[1], *window, *stride, *padding,
        )?)),
        Op::AvgPool2dGrad {
            window,
            stride,
            padding,
            count_include_pad,
            shape,
        } => one(TensorData::Float(avg_pool2d_grad(
            x[0],
            *window,
            *stride,
            *padding,
            *count_include_pad,
            shape,
        )?)),
        Op::Pool2d {
            kind,
            window,
            stride,
            padding,
            count_include_pad,
        } => one(TensorData::Float(pool2d(
            x[0],
            *kind,
            *window,
            *stride,
            *padding,
            *count_include_pad,
            &ty.shape,
        )?)),
        Op::Gather { axis } => {
            let idx = ints(x[1], "indices")?;
            let (outer, extent, inner) = split_at_axis(&x[0].shape, *axis);
            check_indices(idx, extent, *axis, &x[1].shape)?;
            let mut pos = Vec::with_capacity(ty.num_elements());
            for o in 0..outer {
                for &i in idx {
                    let base = (o * extent + i as usize) * inner;
                    pos.extend(base..base + inner);
                }
            }
            one(map_data!(&x[0].data, v => take(v, &pos)))
        }
        Op::ScatterAdd { axis } => {
            let idx = ints(x[1], "indices")?;
            let (outer, extent, inner) = split_at_axis(&x[0].shape, *axis);
            check_indices(idx, extent, *axis, &x[1].shape)?;
            // Position in `base` of each element of `upd`, in `upd`'s row-major order.
            let mut pos = Vec::with_capacity(x[2].numel());
            for o in 0..outer {
                for &i in idx {
                    let base = (o * extent + i as usize) * inner;
                    pos.extend(base..base + inner);
                }
            }
            one(match (&x[0].data, &x[2].data) {
                (TensorData::Float(b), TensorData::Float(u)) => {
                    let mut r = b.clone();
                    pos.iter().zip(u).for_each(|(&j, &e)| r[j] += e);
                    TensorData::Float(r)
                }
                (TensorData::Int(b), TensorData::Int(u)) => {
                    let mut r = b.clone();
                    pos.iter()
                        .zip(u)
                        .for_each(|(&j, &e)| r[j] = r[j].wrapping_add(e));
                    TensorData::Int(r)
                }
                _ => return Err("scatter_add needs numeric base and updates of one kind".into()),
            })
        }
        Op::Softmax { axis } | Op::LogSoftmax { axis } => {
            let v = floats(x[0], "the operand")?;
            let log = matches!(op, Op::LogSoftmax { .. });
            let (outer, extent, inner) = split_at_axis(&x[0].shape, *axis);
            let mut r = vec![0.0; v.len()];
            for o in 0..outer {
                for i in 0..inner {
                    let at = |k: usize| (o * extent + k) * inner + i;
                    let m = (0..extent)
                        .map(|k| v[at(k)])
                        .fold(f64::NEG_INFINITY, nan_max);
                    let s: f64 = (0..extent).map(|k| (v[at(k)] - m).exp()).sum();
                    for k in 0..extent {
                        r[at(k)] = if log {
                            v[at(k)] - m - s.ln()
                        } else {
                            (v[at(k)] - m).exp() / s
                        };
                    }
                }
            }
            one(TensorData::Float(r))
        }
        Op::LayerNorm { eps } | Op::RmsNorm { eps } => {
            let v = floats(x[0], "the operand")?;
            let n = *x[0].shape.last().expect("rank >= 1");
            let mut r = vec![0.0; v.len()];
            if n > 0 {
                for (row, out_row) in v.chunks_exact(n).zip(r.chunks_exact_mut(n)) {
                    if let Op::LayerNorm { .. } = op {
                        let mean = row.iter().sum::<f64>() / n as f64;
                        let var =
                            row.iter().map(|&a| (a - mean) * (a - mean)).sum::<f64>() / n as f64;
                        let d = (var + eps).sqrt();
                        for (o, &a) in out_row.iter_mut().zip(row) {
                            *o = (a - mean) / d;
                        }
                    } else {
                        let ms = row.iter().map(|&a| a * a).sum::<f64>() / n as f64;
                        let d = (ms + eps).sqrt();
                        for (o, &a) in out_row.iter_mut().zip(row) {
                            *o = a / d;
                        }
                    }
                }
            }
            one(TensorData::Float(r))
        }
        Op::CrossEntropy => {
            let v = floats(x[0], "logits")?;
            let labels = ints(x[1], "labels")?;
            let c = *x[0].shape.last().expect("rank >= 1");
            let mut r = Vec::with_capacity(labels.len());
            for (p, &l) in labels.iter().enumerate() {
                if l < 0 || l as usize >= c {
                    return Err(format!(
                        "label {l} at position {} is out of range for {c} classes",
                        multi_index(p, &x[1].shape)
                    ));
                }
                let row = &v[p * c..(p + 1) * c];
                let m = row.iter().copied().fold(f64::NEG_INFINITY, nan_max);
                let s: f64 = row.iter().map(|&a| (a - m).exp()).sum();
                // Exactly the log_softmax kernel's expression, negated.
                r.push(-(row[l as usize] - m - s.ln()));
            }
            one(TensorData::Float(r))
        }
        Op::OneHot { depth, .. } => {
            let idx = ints(x[0], "indices")?;
            let mut hot = vec![false; idx.len() * depth];
            for (p, &i) in idx.iter().enumerate() {
                if i >= 0 && (i as usize) < *depth {
                    hot[p * depth + i as usize] = true;
                }
            }
            one(cast(&TensorData::Bool(hot), ty.dtype))
        }
        Op::Dropout { rate, seed } => {
            let v = floats(x[0], "the operand")?;
            let scale = 1.0 / (1.0 - rate);
            one(TensorData::Float(
                v.iter()
                    .enumerate()
                    .map(|(i, &a)| {
                        if dropout_keep(*seed, i as u64, *rate) {
                            a * scale
                        } else {
                            0.0
                        }
                    })
                    .collect(),
            ))
        }
    }
}

fn check_indices(idx: &[i64], extent: usize, axis: usize, idx_shape: &[usize]) -> KResult<()> {
    for (p, &i) in idx.iter().enumerate() {
        if i < 0 || i as usize >= extent {
            return Err(format!(
                "index {i} at position {} of the indices is out of range for axis {axis} with extent {extent}",
                multi_index(p, idx_shape)
            ));
        }
    }
    Ok(())
}

/// Maximum that propagates NaN.
fn nan_max(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

/// Minimum that propagates NaN.
fn nan_min(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.min(b)
    }
}

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

fn unary_f(u: UnaryOp, x: f64) -> f64 {
    match u {
        UnaryOp::Neg => -x,
        UnaryOp::Abs => x.abs(),
        UnaryOp::Exp => x.exp(),
        UnaryOp::Log => x.ln(),
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::Rsqrt => 1.0 / x.sqrt(),
        UnaryOp::Tanh => x.tanh(),
        UnaryOp::Sigmoid => sigmoid(x),
        UnaryOp::Relu => {
            if x.is_nan() || x > 0.0 {
                x
            } else {
                0.0
            }
        }
        UnaryOp::Gelu => 0.5 * x * erfc(-x * std::f64::consts::FRAC_1_SQRT_2),
        UnaryOp::GeluTanh => {
            let k = (2.0 / std::f64::consts::PI).sqrt();
            0.5 * x * (1.0 + (k * (x + 0.044715 * x * x * x)).tanh())
        }
        UnaryOp::Silu => x * sigmoid(x),
        UnaryOp::Sin => x.sin(),
        UnaryOp::Cos => x.cos(),
        UnaryOp::Erf => erf(x),
        UnaryOp::Reciprocal => 1.0 / x,
        UnaryOp::Sign => {
            if x > 0.0 {
                1.0
            } else if x < 0.0 {
                -1.0
            } else {
                0.0
            }
        }
        UnaryOp::Floor => x.floor(),
        UnaryOp::Round => x.round_ties_even(),
        UnaryOp::Not => unreachable!("`not` on floats is rejected by the shape rule"),
    }
}

fn unary(u: UnaryOp, x: &TensorData) -> KResult<TensorData> {
    Ok(match x {
        TensorData::Float(v) if u != UnaryOp::Not => {
            TensorData::Float(v.iter().map(|&a| unary_f(u, a)).collect())
        }
        TensorData::Int(v) => {
            let f: fn(i64) -> i64 = match u {
                UnaryOp::Neg => i64::wrapping_neg,
                UnaryOp::Abs => i64::wrapping_abs,
                UnaryOp::Relu => |a| a.max(0),
                UnaryOp::Sign => i64::signum,
                _ => return Err(format!("`{}` does not accept integers", u.name())),
            };
            TensorData::Int(v.iter().map(|&a| f(a)).collect())
        }
        TensorData::Bool(v) if u == UnaryOp::Not => {
            TensorData::Bool(v.iter().map(|b| !b).collect())
        }
        _ => return Err(format!("`{}` does not accept this element type", u.name())),
    })
}

fn binary(b: BinaryOp, x: &Tensor, y: &Tensor) -> KResult<TensorData> {
    Ok(match (&x.data, &y.data) {
        (TensorData::Float(p), TensorData::Float(q)) => {
            let f: fn(f64, f64) -> f64 = match b {
                BinaryOp::Add => |a, c| a + c,
                BinaryOp::Sub => |a, c| a - c,
                BinaryOp::Mul => |a, c| a * c,
                BinaryOp::Div => |a, c| a / c,
                BinaryOp::Max => nan_max,
                BinaryOp::Min => nan_min,
                BinaryOp::Pow => f64::powf,
                BinaryOp::And | BinaryOp::Or => {
                    return Err(format!("`{}` does not accept floats", b.name()))
                }
            };
            TensorData::Float(p.iter().zip(q).map(|(&a, &c)| f(a, c)).collect())
        }
        (TensorData::Int(p), TensorData::Int(q)) => {
            if b == BinaryOp::Div {
                if let Some(at) = q.iter().position(|&c| c == 0) {
                    return Err(format!(
                        "integer division by zero at element {}",
                        multi_index(at, &y.shape)
                    ));
                }
            }
            let f: fn(i64, i64) -> i64 = match b {
                BinaryOp::Add => i64::wrapping_add,
                BinaryOp::Sub => i64::wrapping_sub,
                BinaryOp::Mul => i64::wrapping_mul,
                // Truncates toward zero; i64::MIN / -1 wraps.
                BinaryOp::Div => i64::wrapping_div,
                BinaryOp::Max => i64::max,
                BinaryOp::Min => i64::min,
                BinaryOp::Pow | BinaryOp::And | BinaryOp::Or => {
                    return Err(format!("`{}` does not accept integers", b.name()))
                }
            };
            TensorData::Int(p.iter().zip(q).map(|(&a, &c)| f(a, c)).collect())
        }
        (TensorData::Bool(p), TensorData::Bool(q)) => {
            let f: fn(bool, bool) -> bool = match b {
                BinaryOp::And => |a, c| a && c,
                BinaryOp::Or => |a, c| a || c,
                _ => return Err(format!("`{}` does not accept bool", b.name())),
            };
            TensorData::Bool(p.iter().zip(q).map(|(&a, &c)| f(a, c)).collect())
        }
        _ => return Err("operands hold different kinds of elements".into()),
    })
}

fn compare_with<T: PartialOrd>(c: CompareOp, p: &[T], q: &[T]) -> Vec<bool> {
    p.iter()
        .zip(q)
        .map(|(a, b)| match c {
            CompareOp::Eq => a == b,
            CompareOp::Ne => a != b,
            CompareOp::Lt => a < b,
            CompareOp::Le => a <= b,
            CompareOp::Gt => a > b,
            CompareOp::Ge => a >= b,
        })
        .collect()
}

fn compare(c: CompareOp, x: &TensorData, y: &TensorData) -> KResult<TensorData> {
    Ok(TensorData::Bool(match (x, y) {
        (TensorData::Float(p), TensorData::Float(q)) => compare_with(c, p, q),
        (TensorData::Int(p), TensorData::Int(q)) => compare_with(c, p, q),
        (TensorData::Bool(p), TensorData::Bool(q))
            if matches!(c, CompareOp::Eq | CompareOp::Ne) =>
        {
            compare_with(c, p, q)
        }
        _ => return Err(format!("`{}` does not accept these operands", c.name())),
    }))
}

/// Converts elements to the storage of `to` (rounding to a float `to` happens when the result is
/// normalised).
fn cast(x: &TensorData, to: DType) -> TensorData {
    match x {
        TensorData::Float(v) => {
            if to.is_float() {
                TensorData::Float(v.clone())
            } else if to == DType::I32 {
                TensorData::Int(v.iter().map(|&a| a as i32 as i64).collect())
            } else if to == DType::I8 {
                // Truncation toward zero, saturating (NaN is 0): Rust's `as`, as for `i32`.
                TensorData::Int(v.iter().map(|&a| a as i8 as i64).collect())
            } else if to == DType::I64 {
                TensorData::Int(v.iter().map(|&a| a as i64).collect())
            } else {
                TensorData::Bool(v.iter().map(|&a| a != 0.0).collect())
            }
        }
        TensorData::Int(v) => {
            if to == DType::F32 {
                // Rust's i64 → f32 is correctly rounded (i64 → f64 → f32 could round twice).
                TensorData::Float(v.iter().map(|&a| a as f32 as f64).collect())
            } else if to.is_float() {
                TensorData::Float(v.iter().map(|&a| a as f64).collect())
            } else if to.is_int() {
                TensorData::Int(v.clone())
            } else {
                TensorData::Bool(v.iter().map(|&a| a != 0).collect())
            }
        }
        TensorData::Bool(v) => {
            if to.is_float() {
                TensorData::Float(v.iter().map(|&b| b as u8 as f64).collect())
            } else if to.is_int() {
                TensorData::Int(v.iter().map(|&b| b as i64).collect())
            } else {
                TensorData::Bool(v.clone())
            }
        }
    }
}

fn reduce(kind: ReduceKind, axes: &[usize], x: &Tensor) -> KResult<TensorData> {
    let shape = &x.shape;
    let kept: Vec<usize> = (0..shape.len()).filter(|d| !axes.contains(d)).collect();
    let out_shape: Vec<usize> = kept.iter().map(|&d| shape[d]).collect();
    let out_st = strides(&out_shape);
    // Stride in the result of each operand dimension (0 for reduced ones).
    let mut st = vec![0; shape.len()];
    for (k, &d) in kept.iter().enumerate() {
        st[d] = out_st[k];
    }
    let n_out = numel(&out_shape);
    let count: usize = axes.iter().map(|&a| shape[a]).product();
    if count == 0 && n_out > 0 && matches!(kind, ReduceKind::Max | ReduceKind::Min) {
        return Err(format!(
            "`{}` over axes {axes:?} of an empty extent has no identity",
            kind.name()
        ));
    }
    Ok(match &x.data {
        TensorData::Float(v) => {
            let (init, f): (f64, fn(f64, f64) -> f64) = match kind {
                ReduceKind::Sum | ReduceKind::Mean => (0.0, |a, b| a + b),
                ReduceKind::Max => (f64::NEG_INFINITY, nan_max),
                ReduceKind::Min => (f64::INFINITY, nan_min),
            };
            let mut acc = vec![init; n_out];
            for_each_strided(shape, &st, 0, |i, j| acc[j] = f(acc[j], v[i]));
            if kind == ReduceKind::Mean {
                acc.iter_mut().for_each(|a| *a /= count as f64);
            }
            TensorData::Float(acc)
        }
        TensorData::Int(v) => {
            let (init, f): (i64, fn(i64, i64) -> i64) = match kind {
                ReduceKind::Sum => (0, i64::wrapping_add),
                ReduceKind::Max => (i64::MIN, i64::max),
                ReduceKind::Min => (i64::MAX, i64::min),
                ReduceKind::Mean => return Err("`reduce_mean` needs a float operand".into()),
            };
            let mut acc = vec![init; n_out];
            for_each_strided(shape, &st, 0, |i, j| acc[j] = f(acc[j], v[i]));
            TensorData::Int(acc)
        }
        TensorData::Bool(_) => return Err("reductions need a numeric operand".into()),
    })
}

/// Copies the last two dimensions of a `[batch, r, c]` buffer into `[batch, c, r]` order.
fn transpose_last2<T: Copy>(v: &[T], batch: usize, r: usize, c: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(v.len());
    for b in 0..batch {
        let m = &v[b * r * c..(b + 1) * r * c];
        for j in 0..c {
            out.extend((0..r).map(|i| m[i * c + j]));
        }
    }
    out
}

/// `out[b] += a[b] · w[b]` for `[batch, m, k]` · `[batch, k, n]`, row by row (contiguous inner
/// loop).
fn matmul_kernel<T: Copy>(
    a: &[T],
    w: &[T],
    batch: usize,
    (m, k, n): (usize, usize, usize),
    zero: T,
    fma: impl Fn(T, T, T) -> T,
) -> Vec<T> {
    let mut out = vec![zero; batch * m * n];
    if n == 0 {
        return out;
    }
    for b in 0..batch {
        for i in 0..m {
            let row = &mut out[(b * m + i) * n..(b * m + i + 1) * n];
            for p in 0..k {
                let av = a[(b * m + i) * k + p];
                let wrow = &w[(b * k + p) * n..(b * k + p + 1) * n];
                for (o, &wv) in row.iter_mut().zip(wrow) {
                    *o = fma(*o, av, wv);
                }
            }
        }
    }
    out
}

fn matmul(x: &Tensor, y: &Tensor, tl: bool, tr: bool, out_shape: &[usize]) -> KResult<TensorData> {
    let r = x.shape.len();
    let batch = numel(&x.shape[..r - 2]);
    let (m, n) = (out_shape[r - 2], out_shape[r - 1]);
    let k = if tl { x.shape[r - 2] } else { x.shape[r - 1] };
    // Bring both operands to [batch, m, k] and [batch, k, n] row-major.
    Ok(match (&x.data, &y.data) {
        (TensorData::Float(a), TensorData::Float(b)) => {
            let a = if tl {
                transpose_last2(a, batch, k, m)
            } else {
                a.clone()
            };
            let b = if tr {
                transpose_last2(b, batch, n, k)
            } else {
                b.clone()
            };
            TensorData::Float(matmul_kernel(&a, &b, batch, (m, k, n), 0.0, |o, p, q| {
                o + p * q
            }))
        }
        (TensorData::Int(a), TensorData::Int(b)) => {
            let a = if tl {
                transpose_last2(a, batch, k, m)
            } else {
                a.clone()
            };
            let b = if tr {
                transpose_last2(b, batch, n, k)
            } else {
                b.clone()
            };
            TensorData::Int(matmul_kernel(&a, &b, batch, (m, k, n), 0, |o, p, q| {
                o.wrapping_add(p.wrapping_mul(q))
            }))
        }
        _ => return Err("matmul needs numeric operands of one kind".into()),
    })
}

/// Input coordinate of output coordinate `o`, tap `t`: `o·stride - pad + t·dilation`, or `None`
/// in the padding.
fn tap(
    o: usize,
    stride: usize,
    pad: usize,
    t: usize,
    dilation: usize,
    size: usize,
) -> Option<usize> {
    (o * stride + t * dilation)
        .checked_sub(pad)
        .filter(|&i| i < size)
}

/// The geometry of a 2-D convolution, shared by `conv2d` and its two gradient ops.
struct ConvGeometry {
    /// Input `[N, C, H, W]`.
    x: [usize; 4],
    /// Weight `[O, C/g, KH, KW]`.
    w: [usize; 4],
    /// Output spatial extents `[HO, WO]`.
    out: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 4],
    dilation: [usize; 2],
    groups: usize,
}

impl ConvGeometry {
    /// Calls `f(x_index, w_index, y_index)` for every multiply-add of the convolution, in the
    /// forward op's accumulation order (per output element: channel, then kernel row and column).
    fn for_each_tap(&self, mut f: impl FnMut(usize, usize, usize)) {
        let [n, c, h, wd] = self.x;
        let [o_ch, cg, kh, kw] = self.w;
        let [ho, wo] = self.out;
        let og = o_ch / self.groups;
        let mut at = 0;
        for b in 0..n {
            for o in 0..o_ch {
                let g = o / og;
                for y in 0..ho {
                    for xo in 0..wo {
                        for ci in 0..cg {
                            let ch = g * cg + ci;
                            for ky in 0..kh {
                                let Some(iy) = tap(
                                    y,
                                    self.stride[0],
                                    self.padding[0],
                                    ky,
                                    self.dilation[0],
                                    h,
                                ) else {
                                    continue;
                                };
                                for kx in 0..kw {
                                    let Some(ix) = tap(
                                        xo,
                                        self.stride[1],
                                        self.padding[1],
                                        kx,
                                        self.dilation[1],
                                        wd,
                                    ) else {
                                        continue;
                                    };
                                    f(
                                        ((b * c + ch) * h + iy) * wd + ix,
                                        ((o * cg + ci) * kh + ky) * kw + kx,
                                        at,
                                    );
                                }
                            }
                        }
                        at += 1;
                    }
                }
            }
        }
    }
}

fn rank4(shape: &[usize]) -> [usize; 4] {
    <[usize; 4]>::try_from(shape).expect("rank 4 (checked by infer)")
}

/// `y = conv2d(x, w)`.
fn conv2d(x: &Tensor, w: &Tensor, geo: ConvGeometry) -> KResult<Vec<f64>> {
    let (xv, wv) = (floats(x, "the input")?, floats(w, "the weight")?);
    let mut out = vec![0.0; geo.x[0] * geo.w[0] * geo.out[0] * geo.out[1]];
    geo.for_each_tap(|xi, wi, yi| out[yi] += xv[xi] * wv[wi]);
    Ok(out)
}

/// `dx = conv2d_grad_input(dy, w)`: every tap's product is sent back to its input position.
fn conv2d_grad_input(dy: &Tensor, w: &Tensor, geo: ConvGeometry) -> KResult<Vec<f64>> {
    let (dv, wv) = (floats(dy, "the gradient")?, floats(w, "the weight")?);
    let mut out = vec![0.0; geo.x.iter().product()];
    geo.for_each_tap(|xi, wi, yi| out[xi] += dv[yi] * wv[wi]);
    Ok(out)
}

/// `dw = conv2d_grad_weight(x, dy)`: every tap's product is sent back to its weight position.
fn conv2d_grad_weight(x: &Tensor, dy: &Tensor, geo: ConvGeometry) -> KResult<Vec<f64>> {
    let (xv, dv) = (floats(x, "the input")?, floats(dy, "the gradient")?);
    let mut out = vec![0.0; geo.w.iter().product()];
    geo.for_each_tap(|xi, wi, yi| out[wi] += xv[xi] * dv[yi]);
    Ok(out)
}

fn pool2d(
    x: &Tensor,
    kind: PoolKind,
    window: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 4],
    count_include_pad: bool,
    out_shape: &[usize],
) -> KResult<Vec<f64>> {
    let xv = floats(x, "the input")?;
    let mut out = vec![0.0; out_shape.iter().product()];
    let o = [out_shape[2], out_shape[3]];
    for_each_window(rank4(&x.shape), o, window, stride, padding, |wi, pos| {
        out[wi] = match kind {
            PoolKind::Max => pos.iter().map(|&p| xv[p]).fold(f64::NEG_INFINITY, nan_max),
            PoolKind::Avg => {
                let sum: f64 = pos.iter().map(|&p| xv[p]).sum();
                let div = if count_include_pad {
                    window[0] * window[1]
                } else {
                    pos.len()
                };
                sum / div as f64
            }
        };
    });
    Ok(out)
}

/// Calls `f(window_index, input_positions)` for every pooling window, with the in-bounds input
/// positions of the window in row-major order.
fn for_each_window(
    shape: [usize; 4],
    out: [usize; 2],
    window: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 4],
    mut f: impl FnMut(usize, &[usize]),
) {
    let [n, c, h, wd] = shape;
    let mut positions = Vec::with_capacity(window[0] * window[1]);
    let mut at = 0;
    for plane in 0..n * c {
        for y in 0..out[0] {
            for xo in 0..out[1] {
                positions.clear();
                for ky in 0..window[0] {
                    let Some(iy) = tap(y, stride[0], padding[0], ky, 1, h) else {
                        continue;
                    };
                    for kx in 0..window[1] {
                        if let Some(ix) = tap(xo, stride[1], padding[1], kx, 1, wd) {
                            positions.push((plane * h + iy) * wd + ix);
                        }
                    }
                }
                f(at, &positions);
                at += 1;
            }
        }
    }
}

/// `dx = max_pool2d_grad(x, dy)`: each window's gradient goes to the first position holding the
/// window's maximum (a NaN, if any, is the maximum).
fn max_pool2d_grad(
    x: &Tensor,
    dy: &Tensor,
    window: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 4],
) -> KResult<Vec<f64>> {
    let (xv, dv) = (floats(x, "the input")?, floats(dy, "the gradient")?);
    let shape = rank4(&x.shape);
    let mut out = vec![0.0; xv.len()];
    let o = [dy.shape[2], dy.shape[3]];
    for_each_window(shape, o, window, stride, padding, |wi, pos| {
        let max = pos.iter().map(|&p| xv[p]).fold(f64::NEG_INFINITY, nan_max);
        let first = pos
            .iter()
            .copied()
            .find(|&p| xv[p] == max || (max.is_nan() && xv[p].is_nan()));
        if let Some(p) = first {
            out[p] += dv[wi];
        }
    });
    Ok(out)
}

/// `dx = avg_pool2d_grad(dy)`: each window's gradient, divided by the forward divisor, is added
/// to every in-bounds position of the window.
fn avg_pool2d_grad(
    dy: &Tensor,
    window: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 4],
    count_include_pad: bool,
    in_shape: &[usize],
) -> KResult<Vec<f64>> {
    let dv = floats(dy, "the gradient")?;
    let shape = rank4(in_shape);
    let mut out = vec![0.0; shape.iter().product()];
    let o = [dy.shape[2], dy.shape[3]];
    for_each_window(shape, o, window, stride, padding, |wi, pos| {
        let div = if count_include_pad {
            (window[0] * window[1]) as f64
        } else {
            pos.len() as f64
        };
        for &p in pos {
            out[p] += dv[wi] / div;
        }
    });
    Ok(out)
}
