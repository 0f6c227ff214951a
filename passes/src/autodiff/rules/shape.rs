//! VJP rules of shape ops: broadcast, reduce, reshape, transpose, slice, concat, split, pad.

use cleave_ir::tracer::Tracer;
use cleave_ir::{CompareOp, NodeData, Op, ReduceKind, Value};

use super::{broadcast_back, cmp, div, emit, reduce_sum, scale, select, splat_ty, RuleResult};

/// `y = broadcast(x)`; `dx` sums `dy` over the new dimensions and over the size-1 dimensions of x
/// that were expanded, then restores x's shape.
pub(super) fn broadcast(t: &mut Tracer, node: &NodeData, dy: Value) -> RuleResult {
    let Op::Broadcast { shape, dims } = &node.op else {
        unreachable!()
    };
    let x_shape = t.ty(node.operands[0]).shape.clone();
    let mut axes: Vec<usize> = (0..shape.len()).filter(|d| !dims.contains(d)).collect();
    for (i, &d) in dims.iter().enumerate() {
        if x_shape[i] == 1 && shape[d] != 1 {
            axes.push(d);
        }
    }
    axes.sort_unstable();
    let summed = if axes.is_empty() {
        dy
    } else {
        reduce_sum(t, dy, axes)?
    };
    if t.ty(summed).shape == x_shape {
        Ok(summed)
    } else {
        emit(t, Op::Reshape { shape: x_shape }, &[summed])
    }
}

/// `y = reduce(x, axes)`.
/// - sum: `dx = broadcast(dy)`;
/// - mean: `dx = broadcast(dy) / n` with n the number of reduced elements;
/// - max/min: the gradient goes to the elements equal to the result, split evenly among ties
///   (as PyTorch's `amax`/`amin`).
pub(super) fn reduce(
    t: &mut Tracer,
    kind: ReduceKind,
    axes: &[usize],
    node: &NodeData,
    dy: Value,
) -> RuleResult {
    let x = node.operands[0];
    let x_ty = t.ty(x).clone();
    let g = broadcast_back(t, dy, &x_ty.shape, axes)?;
    match kind {
        ReduceKind::Sum => Ok(g),
        ReduceKind::Mean => {
            let n: usize = axes.iter().map(|&a| x_ty.shape[a]).product();
            scale(t, g, 1.0 / n as f64)
        }
        ReduceKind::Max | ReduceKind::Min => {
            let y = node.results[0];
            let yb = broadcast_back(t, y, &x_ty.shape, axes)?;
            let hit = cmp(t, CompareOp::Eq, x, yb)?;
            let one = splat_ty(t, &x_ty, 1.0)?;
            let zero = splat_ty(t, &x_ty, 0.0)?;
            let ind = select(t, hit, one, zero)?;
            let count = reduce_sum(t, ind, axes.to_vec())?;
            let count_b = broadcast_back(t, count, &x_ty.shape, axes)?;
            let share = div(t, g, count_b)?;
            select(t, hit, share, zero)
        }
    }
}

/// `y = reshape(x)`; `dx = reshape(dy)` to x's shape.
pub(super) fn reshape(t: &mut Tracer, node: &NodeData, dy: Value) -> RuleResult {
    let shape = t.ty(node.operands[0]).shape.clone();
    emit(t, Op::Reshape { shape }, &[dy])
}

/// `y = transpose(x, perm)`; `dx = transpose(dy, perm⁻¹)`.
pub(super) fn transpose(t: &mut Tracer, perm: &[usize], dy: Value) -> RuleResult {
    let mut inv = vec![0; perm.len()];
    for (i, &p) in perm.iter().enumerate() {
        inv[p] = i;
    }
    emit(t, Op::Transpose { perm: inv }, &[dy])
}

/// `y = slice(x, start, limit, stride)`; `dx` is `dy` placed back at the sliced positions, zeros
/// elsewhere. A stride `s > 1` spreads `dy` out first: `[.., n, ..]` is reshaped to
/// `[.., n, 1, ..]`, padded to `[.., n, s, ..]` and flattened to `[.., n·s, ..]`.
pub(super) fn slice(
    t: &mut Tracer,
    node: &NodeData,
    start: &[usize],
    limit: &[usize],
    stride: &[usize],
    dy: Value,
) -> RuleResult {
    let x_shape = t.ty(node.operands[0]).shape.clone();
    let mut g = dy;
    for d in 0..x_shape.len() {
        if stride[d] == 1 {
            continue;
        }
        let shape = t.ty(g).shape.clone();
        let n = shape[d];
        let mut expanded = shape.clone();
        expanded.insert(d + 1, 1);
        let r = emit(
            t,
            Op::Reshape {
                shape: expanded.clone(),
            },
            &[g],
        )?;
        let mut high = vec![0; expanded.len()];
        high[d + 1] = stride[d] - 1;
        let p = emit(
            t,
            Op::Pad {
                low: vec![0; expanded.len()],
                high,
                value: 0.0,
            },
            &[r],
        )?;
        let mut flat = shape.clone();
        flat[d] = n * stride[d];
        let f = emit(
            t,
            Op::Reshape {
                shape: flat.clone(),
            },
            &[p],
        )?;
        // Keep exactly limit - start positions along d.
        let mut lim = flat.clone();
        lim[d] = limit[d] - start[d];
        g = emit(
            t,
            Op::Slice {
                start: vec![0; flat.len()],
                limit: lim,
                stride: vec![1; flat.len()],
            },
            &[f],
        )?;
    }
    let high: Vec<usize> = (0..x_shape.len()).map(|d| x_shape[d] - limit[d]).collect();
    if start.iter().all(|&s| s == 0) && high.iter().all(|&h| h == 0) {
        return Ok(g);
    }
    emit(
        t,
        Op::Pad {
            low: start.to_vec(),
            high,
            value: 0.0,
        },
        &[g],
    )
}

/// `y = concat(x0, x1, …, axis)`; `dx_i` is the slice of `dy` that came from `x_i`.
pub(super) fn concat(
    t: &mut Tracer,
    node: &NodeData,
    axis: usize,
    dy: Value,
    i: usize,
) -> RuleResult {
    let offset: usize = node.operands[..i]
        .iter()
        .map(|&v| t.ty(v).shape[axis])
        .sum();
    let shape = t.ty(dy).shape.clone();
    let mut start = vec![0; shape.len()];
    let mut limit = shape.clone();
    start[axis] = offset;
    limit[axis] = offset + t.ty(node.operands[i]).shape[axis];
    emit(
        t,
        Op::Slice {
            start,
            limit,
            stride: vec![1; shape.len()],
        },
        &[dy],
    )
}

/// `(y0, y1, …) = split(x, axis)`; `dx = concat(dy0, dy1, …)`, zeros for pieces without a
/// cotangent.
pub(super) fn split(
    t: &mut Tracer,
    node: &NodeData,
    axis: usize,
    cots: &[Option<Value>],
) -> RuleResult {
    let mut parts = Vec::with_capacity(cots.len());
    for (k, c) in cots.iter().enumerate() {
        parts.push(match c {
            Some(v) => *v,
            None => {
                let ty = t.ty(node.results[k]).clone();
                splat_ty(t, &ty, 0.0)?
            }
        });
    }
    if parts.len() == 1 {
        return Ok(parts[0]);
    }
    emit(t, Op::Concat { axis }, &parts)
}

/// `y = pad(x, low, high)`; `dx` is the interior slice of `dy`.
pub(super) fn pad(t: &mut Tracer, node: &NodeData, low: &[usize], dy: Value) -> RuleResult {
    let x_shape = t.ty(node.operands[0]).shape.clone();
    let limit = (0..x_shape.len()).map(|d| low[d] + x_shape[d]).collect();
    emit(
        t,
        Op::Slice {
            start: low.to_vec(),
            limit,
            stride: vec![1; x_shape.len()],
        },
        &[dy],
    )
}
