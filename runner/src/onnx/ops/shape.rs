//! Shape and indexing ops, and the ops that produce constants.
//!
//! Shape arguments (`Reshape`'s shape, `Slice`'s starts and ends, axes given as inputs, …) must be
//! known at import time; PyTorch computes them with `Shape → Gather → Concat` chains, which the
//! driver folds to constants.

use cleave_ir::interp::{Tensor, TensorData};
use cleave_ir::{CompareOp, DType, TensorType};

use super::{axis, broadcast_shapes, input, optional};
use crate::onnx::graph::{check_shape, Importer, NResult, NodeCtx, Val};
use crate::onnx::proto::attribute_proto::AttributeType;
use crate::onnx::tensor::{checked_numel, decode_tensor, MAX_CONST_ELEMENTS};

/// Lowers the node if it is a shape op; `None` otherwise.
pub fn lower(imp: &mut Importer, n: &NodeCtx, ins: &[Option<Val>]) -> NResult<Option<Vec<Val>>> {
    let out = match n.op {
        "Constant" => vec![constant(imp, n)?],
        "ConstantOfShape" => vec![constant_of_shape(imp, n, ins)?],
        "Shape" => {
            let shape = imp.shape(input(ins, 0)?)?;
            let r = shape.len() as i64;
            let clamp = |x: i64| (if x < 0 { x + r } else { x }).clamp(0, r) as usize;
            let start = clamp(n.int("start", 0)?);
            let end = clamp(n.int("end", r)?).max(start);
            let dims: Vec<i64> = shape[start..end].iter().map(|&d| d as i64).collect();
            vec![Val::Const(Tensor::from_i64(DType::I64, [dims.len()], dims))]
        }
        "Size" => {
            let numel = imp.ty(input(ins, 0)?)?.num_elements() as i64;
            vec![Val::Const(Tensor::from_i64(DType::I64, [], vec![numel]))]
        }
        "Range" => vec![range(imp, ins)?],
        "Reshape" => {
            let x = input(ins, 0)?;
            let target = imp.const_ints(input(ins, 1)?, "shape")?;
            let shape = reshape_target(&imp.shape(x)?, &target, n.int("allowzero", 0)? != 0)?;
            vec![reshape(imp, x, shape)?]
        }
        "Flatten" => {
            let x = input(ins, 0)?;
            let s = imp.shape(x)?;
            let a = n.int("axis", 1)?;
            let a = if a == s.len() as i64 {
                s.len()
            } else {
                axis(a, s.len())?
            };
            let rows: usize = s[..a].iter().product();
            let cols: usize = s[a..].iter().product();
            vec![reshape(imp, x, vec![rows, cols])?]
        }
        "Unsqueeze" => {
            let x = input(ins, 0)?;
            let axes = axes_of(imp, n, ins, 1)?.ok_or("`axes` is required")?;
            let s = imp.shape(x)?;
            let rank = s.len() + axes.len();
            let mut axes = axes
                .iter()
                .map(|&a| axis(a, rank))
                .collect::<NResult<Vec<_>>>()?;
            axes.sort_unstable();
            axes.dedup();
            let mut out = Vec::with_capacity(rank);
            let mut it = s.iter();
            for i in 0..rank {
                if axes.contains(&i) {
                    out.push(1);
                } else {
                    out.push(*it.next().ok_or("repeated axes")?);
                }
            }
            vec![reshape(imp, x, out)?]
        }
        "Squeeze" => {
            let x = input(ins, 0)?;
            let s = imp.shape(x)?;
            let out: Vec<usize> = match axes_of(imp, n, ins, 1)? {
                None => s.iter().copied().filter(|&d| d != 1).collect(),
                Some(axes) => {
                    let axes = axes
                        .iter()
                        .map(|&a| axis(a, s.len()))
                        .collect::<NResult<Vec<_>>>()?;
                    if let Some(&a) = axes.iter().find(|&&a| s[a] != 1) {
                        return Err(
                            format!("cannot squeeze dimension {a} of extent {}", s[a]).into()
                        );
                    }
                    (0..s.len())
                        .filter(|i| !axes.contains(i))
                        .map(|i| s[i])
                        .collect()
                }
            };
            vec![reshape(imp, x, out)?]
        }
        "Expand" => {
            let x = input(ins, 0)?;
            let target = imp.const_ints(input(ins, 1)?, "shape")?;
            let target = dims_of(&target, "shape")?;
            let shape = broadcast_shapes(&[imp.shape(x)?, target])?;
            let xv = imp.ir(x)?;
            vec![Val::Ir(imp.t.broadcast_to(xv, shape)?)]
        }
        "Transpose" => {
            let x = input(ins, 0)?;
            let rank = imp.shape(x)?.len();
            let perm = match n.ints("perm") {
                Some(p) => p
                    .iter()
                    .map(|&a| axis(a, rank))
                    .collect::<NResult<Vec<_>>>()?,
                None => (0..rank).rev().collect(),
            };
            let xv = imp.ir(x)?;
            vec![Val::Ir(imp.t.transpose(xv, perm)?)]
        }
        "Concat" => {
            let vals: Vec<&Val> = ins.iter().flatten().collect();
            let first = vals.first().ok_or("no inputs")?;
            let rank = imp.shape(first)?.len();
            let a = axis(n.int("axis", 0)?, rank)?;
            let mut xs = Vec::new();
            for v in vals {
                xs.push(imp.ir(v)?);
            }
            vec![Val::Ir(imp.t.concat(&xs, a)?)]
        }
        "Split" => {
            let x = input(ins, 0)?;
            let s = imp.shape(x)?;
            let a = axis(n.int("axis", 0)?, s.len())?;
            let sizes = split_sizes(imp, n, ins, s[a])?;
            let xv = imp.ir(x)?;
            imp.t
                .split(xv, a, sizes)?
                .into_iter()
                .map(Val::Ir)
                .collect()
        }
        "SplitToSequence" => {
            let x = input(ins, 0)?;
            let s = imp.shape(x)?;
            let a = axis(n.int("axis", 0)?, s.len())?;
            let xv = imp.ir(x)?;
            let keep = n.int("keepdims", 1)? != 0;
            let parts = match optional(ins, 1) {
                Some(sp) => {
                    let sizes = imp.const_ints(sp, "split")?;
                    let sizes = if imp.shape(sp)?.is_empty() {
                        let chunk = *sizes.first().ok_or("empty `split`")?;
                        chunks(s[a], chunk)?
                    } else {
                        dims_of(&sizes, "split")?
                    };
                    imp.t.split(xv, a, sizes)?
                }
                None => {
                    let parts = imp.t.split(xv, a, vec![1; s[a]])?;
                    if keep {
                        parts
                    } else {
                        let mut out_shape = s.clone();
                        out_shape.remove(a);
                        let mut squeezed = Vec::new();
                        for p in parts {
                            squeezed.push(imp.t.reshape(p, out_shape.clone())?);
                        }
                        squeezed
                    }
                }
            };
            vec![Val::Seq(parts.into_iter().map(Val::Ir).collect())]
        }
        "SequenceAt" => {
            let Val::Seq(items) = input(ins, 0)? else {
                return Err("input 0 is not a sequence".into());
            };
            let pos = imp.const_ints(input(ins, 1)?, "position")?;
            let p = *pos.first().ok_or("empty `position`")?;
            vec![items[axis(p, items.len())?].clone()]
        }
        "Slice" => vec![slice(imp, ins)?],
        "Gather" => vec![gather(imp, n, ins)?],
        "Trilu" => vec![trilu(imp, n, ins)?],
        _ => return Ok(None),
    };
    Ok(Some(out))
}

/// Non-negative extents from integers.
pub fn dims_of(v: &[i64], what: &str) -> NResult<Vec<usize>> {
    let dims = v
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| format!("`{what}` has a negative extent {d}")))
        .collect::<Result<Vec<_>, _>>()?;
    check_shape(&dims)?;
    Ok(dims)
}

/// A reshape, or the value itself when the shape is already right.
pub fn reshape(imp: &mut Importer, x: &Val, shape: Vec<usize>) -> NResult<Val> {
    if imp.shape(x)? == shape {
        return Ok(x.clone());
    }
    check_shape(&shape)?;
    let xv = imp.ir(x)?;
    Ok(Val::Ir(imp.t.reshape(xv, shape)?))
}

/// ONNX `Reshape` target: `0` copies the input extent (unless `allowzero`), `-1` is inferred.
fn reshape_target(input: &[usize], target: &[i64], allowzero: bool) -> NResult<Vec<usize>> {
    let mut out = Vec::with_capacity(target.len());
    let mut infer = None;
    for (i, &d) in target.iter().enumerate() {
        out.push(match d {
            0 if !allowzero => *input.get(i).ok_or_else(|| {
                format!(
                    "shape entry {i} is 0 but the input has rank {}",
                    input.len()
                )
            })?,
            -1 if infer.is_none() => {
                infer = Some(i);
                1
            }
            d if d >= 0 => d as usize,
            d => return Err(format!("invalid shape entry {d}").into()),
        });
    }
    let numel: usize = input.iter().product();
    if let Some(i) = infer {
        let known = checked_numel(&out, usize::MAX).ok_or("shape overflows")?;
        if known == 0 || !numel.is_multiple_of(known) {
            return Err(
                format!("cannot infer the -1 in {target:?} from input shape {input:?}").into(),
            );
        }
        out[i] = numel / known;
    }
    check_shape(&out)?;
    Ok(out)
}

/// Axes given as input `index` (newer opsets) or as the `axes` attribute (older ones).
fn axes_of(
    imp: &Importer,
    n: &NodeCtx,
    ins: &[Option<Val>],
    index: usize,
) -> NResult<Option<Vec<i64>>> {
    match optional(ins, index) {
        Some(v) => Ok(Some(imp.const_ints(v, "axes")?)),
        None => Ok(n.ints("axes")),
    }
}

/// Equal chunks of `chunk` along an extent, the last one possibly smaller.
fn chunks(extent: usize, chunk: i64) -> NResult<Vec<usize>> {
    if chunk <= 0 {
        return Err(format!("invalid chunk size {chunk}").into());
    }
    let chunk = chunk as usize;
    let mut sizes = vec![chunk; extent / chunk];
    if !extent.is_multiple_of(chunk) {
        sizes.push(extent % chunk);
    }
    if sizes.len() > 4096 {
        return Err("too many pieces".into());
    }
    Ok(sizes)
}

fn split_sizes(
    imp: &Importer,
    n: &NodeCtx,
    ins: &[Option<Val>],
    extent: usize,
) -> NResult<Vec<usize>> {
    if let Some(v) = optional(ins, 1) {
        return dims_of(&imp.const_ints(v, "split")?, "split");
    }
    if let Some(s) = n.ints("split") {
        return dims_of(&s, "split");
    }
    let pieces = match n.int("num_outputs", 0)? {
        0 => n.n_outputs() as i64,
        k => k,
    };
    if pieces <= 0 || pieces as usize > extent.max(1) {
        return Err(format!("cannot split extent {extent} into {pieces} pieces").into());
    }
    let chunk = extent.div_ceil(pieces as usize);
    let mut sizes = chunks(extent, chunk as i64)?;
    sizes.resize(pieces as usize, 0);
    Ok(sizes)
}

fn slice(imp: &mut Importer, ins: &[Option<Val>]) -> NResult<Val> {
    let x = input(ins, 0)?;
    let s = imp.shape(x)?;
    let starts = imp.const_ints(input(ins, 1)?, "starts")?;
    let ends = imp.const_ints(input(ins, 2)?, "ends")?;
    let axes = match optional(ins, 3) {
        Some(v) => imp.const_ints(v, "axes")?,
        None => (0..starts.len() as i64).collect(),
    };
    let steps = match optional(ins, 4) {
        Some(v) => imp.const_ints(v, "steps")?,
        None => vec![1; starts.len()],
    };
    if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
        return Err("`starts`, `ends`, `axes` and `steps` differ in length".into());
    }
    let mut start = vec![0; s.len()];
    let mut limit = s.clone();
    let mut stride = vec![1; s.len()];
    for i in 0..starts.len() {
        let a = axis(axes[i], s.len())?;
        let d = s[a] as i64;
        if steps[i] <= 0 {
            return Err(format!("step {} is not supported (only positive steps)", steps[i]).into());
        }
        let clamp = |x: i64| (if x < 0 { x.saturating_add(d) } else { x }).clamp(0, d) as usize;
        start[a] = clamp(starts[i]);
        limit[a] = clamp(ends[i]).max(start[a]);
        stride[a] = steps[i] as usize;
    }
    if start.iter().all(|&x| x == 0) && limit == s && stride.iter().all(|&x| x == 1) {
        return Ok(x.clone());
    }
    let xv = imp.ir(x)?;
    Ok(Val::Ir(imp.t.slice(xv, start, limit, stride)?))
}

/// `Gather`: constant indices are normalised (negative ones count from the end) and checked;
/// indices computed by the model must be in range.
fn gather(imp: &mut Importer, n: &NodeCtx, ins: &[Option<Val>]) -> NResult<Val> {
    let data = input(ins, 0)?;
    let idx = input(ins, 1)?;
    let s = imp.shape(data)?;
    let a = axis(n.int("axis", 0)?, s.len())?;
    let iv = match idx {
        Val::Const(t) => {
            let d = s[a] as i64;
            let fixed = imp
                .const_ints(idx, "indices")?
                .into_iter()
                .map(|i| {
                    let j = if i < 0 { i + d } else { i };
                    if (0..d).contains(&j) {
                        Ok(j)
                    } else {
                        Err(format!("index {i} is out of range for extent {d}"))
                    }
                })
                .collect::<Result<Vec<_>, _>>()?;
            let ti = Tensor::from_i64(DType::I64, t.shape.clone(), fixed);
            imp.constant(&ti)?
        }
        _ => imp.ir(idx)?,
    };
    let dv = imp.ir(data)?;
    Ok(Val::Ir(imp.t.gather(dv, iv, a)?))
}

/// `Trilu`: keeps the upper (`upper=1`) or lower triangle of the last two dimensions, shifted by
/// the diagonal offset `k`, and zeroes the rest.
fn trilu(imp: &mut Importer, n: &NodeCtx, ins: &[Option<Val>]) -> NResult<Val> {
    let x = input(ins, 0)?;
    let ty = imp.ty(x)?;
    let r = ty.rank();
    if r < 2 {
        return Err("the input needs rank >= 2".into());
    }
    let k = match optional(ins, 1) {
        Some(v) => *imp.const_ints(v, "k")?.first().ok_or("empty `k`")?,
        None => 0,
    };
    let (rows, cols) = (ty.shape[r - 2], ty.shape[r - 1]);
    let row = imp.t.iota(DType::I64, [rows, cols], 0)?;
    let col = imp.t.iota(DType::I64, [rows, cols], 1)?;
    let diff = imp.t.sub(col, row)?;
    let kc = imp.t.constant_f(DType::I64, [rows, cols], k as f64)?;
    let cmp = if n.int("upper", 1)? != 0 {
        CompareOp::Ge
    } else {
        CompareOp::Le
    };
    let mask = imp.t.compare(cmp, diff, kc)?;
    let mask = imp.t.broadcast(mask, ty.shape.clone(), [r - 2, r - 1])?;
    let zero = imp.t.constant_f(ty.dtype, ty.shape.clone(), 0.0)?;
    let xv = imp.ir(x)?;
    Ok(Val::Ir(imp.t.select(mask, xv, zero)?))
}

fn constant(imp: &mut Importer, n: &NodeCtx) -> NResult<Val> {
    let attrs = n.attr_names();
    let (name, kind) = *attrs.first().ok_or("no value attribute")?;
    let t = match (name, kind) {
        ("value", _) => {
            let proto = n.tensor("value").ok_or("`value` is not a tensor")?;
            decode_tensor(proto, imp.external).map_err(|e| e.to_string())?
        }
        ("value_float", _) => Tensor::from_f32([], vec![n.float("value_float", 0.0)?]),
        ("value_floats", Some(AttributeType::Floats)) => {
            let v = n.floats("value_floats").unwrap_or_default();
            Tensor::from_f32([v.len()], v)
        }
        ("value_int", _) => Tensor::from_i64(DType::I64, [], vec![n.int("value_int", 0)?]),
        ("value_ints", Some(AttributeType::Ints)) => {
            let v = n.ints("value_ints").unwrap_or_default();
            Tensor::from_i64(DType::I64, [v.len()], v)
        }
        (other, _) => return Err(format!("constant attribute `{other}` is not supported").into()),
    };
    Ok(Val::Const(t))
}

fn constant_of_shape(imp: &mut Importer, n: &NodeCtx, ins: &[Option<Val>]) -> NResult<Val> {
    let shape = dims_of(&imp.const_ints(input(ins, 0)?, "input")?, "input")?;
    let fill = match n.tensor("value") {
        Some(p) => decode_tensor(p, imp.external).map_err(|e| e.to_string())?,
        None => Tensor::from_f32([], vec![0.0]),
    };
    if fill.numel() != 1 {
        return Err("`value` must hold one element".into());
    }
    let ty = TensorType::new(fill.dtype, shape);
    let n_elems = ty.num_elements();
    if n_elems > MAX_CONST_ELEMENTS {
        // Too big to hold at import time: a splat constant in the function.
        let lit = crate::onnx::graph::literal_of(&fill);
        return Ok(Val::Ir(imp.t.constant(ty, lit)?));
    }
    let data = match &fill.data {
        TensorData::Float(v) => TensorData::Float(vec![v[0]; n_elems]),
        TensorData::Int(v) => TensorData::Int(vec![v[0]; n_elems]),
        TensorData::Bool(v) => TensorData::Bool(vec![v[0]; n_elems]),
    };
    Ok(Val::Const(
        Tensor::new(ty.dtype, ty.shape, data).map_err(|e| e.to_string())?,
    ))
}

fn range(imp: &mut Importer, ins: &[Option<Val>]) -> NResult<Val> {
    let start_v = input(ins, 0)?;
    let dtype = imp.ty(start_v)?.dtype;
    let start = *imp
        .const_floats(start_v, "start")?
        .first()
        .ok_or("empty `start`")?;
    let limit = *imp
        .const_floats(input(ins, 1)?, "limit")?
        .first()
        .ok_or("empty `limit`")?;
    let delta = *imp
        .const_floats(input(ins, 2)?, "delta")?
        .first()
        .ok_or("empty `delta`")?;
    if delta == 0.0 || !delta.is_finite() || !start.is_finite() || !limit.is_finite() {
        return Err("`delta` must be finite and non-zero".into());
    }
    let count = ((limit - start) / delta).ceil().max(0.0);
    if count > MAX_CONST_ELEMENTS as f64 {
        return Err(format!("range of {count} elements is too long").into());
    }
    let count = count as usize;
    let values: Vec<f64> = (0..count).map(|i| start + i as f64 * delta).collect();
    let data = if dtype.is_float() {
        TensorData::Float(values)
    } else if dtype.is_int() {
        TensorData::Int(values.iter().map(|&x| x as i64).collect())
    } else {
        return Err("`Range` of bool".into());
    };
    Ok(Val::Const(
        Tensor::new(dtype, vec![count], data).map_err(|e| e.to_string())?,
    ))
}
