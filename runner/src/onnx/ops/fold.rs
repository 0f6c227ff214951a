//! Ops the importer evaluates at import time only: `CumSum`, `GatherND` and `Mod` on values
//! known then (PyTorch's exports build attention masks, position ids and head counts with them
//! from static shapes). On a value computed from the model's inputs they are refused with the reason.

use cleave_ir::interp::{Tensor, TensorData};

use super::super::graph::{Importer, NResult, NodeCtx, Val};
use super::{axis, input};

/// Lowers the node if it is one of this module's; `None` otherwise.
pub fn lower(imp: &mut Importer, n: &NodeCtx, ins: &[Option<Val>]) -> NResult<Option<Vec<Val>>> {
    let out = match n.op {
        "CumSum" => {
            let x = known(imp, input(ins, 0)?, "CumSum")?;
            let a = imp.const_ints(input(ins, 1)?, "axis")?;
            let a = *a.first().ok_or("empty `axis`")?;
            let exclusive = n.int("exclusive", 0)? != 0;
            let reverse = n.int("reverse", 0)? != 0;
            vec![Val::Const(cumsum(
                &x,
                axis(a, x.shape.len())?,
                exclusive,
                reverse,
            )?)]
        }
        "GatherND" => {
            let data = known(imp, input(ins, 0)?, "GatherND")?;
            let idx = known(imp, input(ins, 1)?, "GatherND")?;
            let b = n.int("batch_dims", 0)?;
            vec![Val::Const(gather_nd(&data, &idx, b)?)]
        }
        "Mod" => {
            let a = known(imp, input(ins, 0)?, "Mod")?;
            let b = known(imp, input(ins, 1)?, "Mod")?;
            vec![Val::Const(modulo(&a, &b, n.int("fmod", 0)? != 0)?)]
        }
        _ => return Ok(None),
    };
    Ok(Some(out))
}

fn known(imp: &Importer, v: &Val, op: &str) -> NResult<Tensor> {
    imp.known(v).cloned().ok_or_else(|| {
        format!(
            "{op} is evaluated at import time only, and this input is computed from the model's \
             inputs (PyTorch's exports use it on masks and positions built from static shapes; \
             export with static shapes, or pass --batch)"
        )
        .into()
    })
}

/// Strides of a row-major shape.
fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// ONNX `CumSum` along `axis` (`exclusive`: each sum leaves its own element out; `reverse`:
/// from the end).
fn cumsum(x: &Tensor, axis: usize, exclusive: bool, reverse: bool) -> NResult<Tensor> {
    let n = x.shape[axis];
    let st = strides(&x.shape)[axis];
    let outer = x.numel() / (n * st).max(1);
    let run = |get: &dyn Fn(usize) -> f64, set: &mut dyn FnMut(usize, f64)| {
        for o in 0..outer {
            for i in 0..st {
                let mut acc = 0.0;
                for k in 0..n {
                    let k = if reverse { n - 1 - k } else { k };
                    let at = o * n * st + k * st + i;
                    let v = get(at);
                    if exclusive {
                        set(at, acc);
                        acc += v;
                    } else {
                        acc += v;
                        set(at, acc);
                    }
                }
            }
        }
    };
    let data = match &x.data {
        TensorData::Float(v) => {
            let mut out = vec![0.0; v.len()];
            run(&|i| v[i], &mut |i, s| out[i] = s);
            TensorData::Float(out)
        }
        TensorData::Int(v) => {
            let mut out = vec![0i64; v.len()];
            // Integer sums stay exact: accumulate in i64.
            for o in 0..outer {
                for i in 0..st {
                    let mut acc = 0i64;
                    for k in 0..n {
                        let k = if reverse { n - 1 - k } else { k };
                        let at = o * n * st + k * st + i;
                        if exclusive {
                            out[at] = acc;
                            acc = acc.wrapping_add(v[at]);
                        } else {
                            acc = acc.wrapping_add(v[at]);
                            out[at] = acc;
                        }
                    }
                }
            }
            TensorData::Int(out)
        }
        TensorData::Bool(_) => return Err("CumSum of a boolean tensor".into()),
    };
    Tensor::new(x.dtype, x.shape.clone(), data).map_err(|e| e.to_string().into())
}

/// ONNX `Mod`, broadcasting: the remainder takes the divisor's sign (Python's `%`), or with
/// `fmod` the dividend's (C's `fmod`, the only form ONNX allows for floats).
fn modulo(a: &Tensor, b: &Tensor, fmod: bool) -> NResult<Tensor> {
    if a.dtype != b.dtype {
        return Err(format!("Mod of {} and {}", a.dtype, b.dtype).into());
    }
    let shape = super::broadcast_shapes(&[a.shape.clone(), b.shape.clone()])?;
    let strides_of = |s: &[usize]| {
        let own = strides(s);
        let pad = shape.len() - s.len();
        (0..shape.len())
            .map(|d| {
                if d < pad || s[d - pad] == 1 {
                    0
                } else {
                    own[d - pad]
                }
            })
            .collect::<Vec<_>>()
    };
    let (sa, sb) = (strides_of(&a.shape), strides_of(&b.shape));
    let n: usize = shape.iter().product();
    let index = |mut i: usize, st: &[usize]| {
        let mut at = 0;
        for d in (0..shape.len()).rev() {
            at += (i % shape[d]) * st[d];
            i /= shape[d];
        }
        at
    };
    let data = match (&a.data, &b.data) {
        (TensorData::Int(x), TensorData::Int(y)) => {
            let mut out = Vec::with_capacity(n);
            for i in 0..n {
                let (p, q) = (x[index(i, &sa)], y[index(i, &sb)]);
                if q == 0 {
                    return Err("Mod by zero".into());
                }
                let r = p.wrapping_rem(q);
                out.push(if !fmod && r != 0 && (r < 0) != (q < 0) {
                    r + q
                } else {
                    r
                });
            }
            TensorData::Int(out)
        }
        (TensorData::Float(x), TensorData::Float(y)) if fmod => TensorData::Float(
            (0..n)
                .map(|i| x[index(i, &sa)] % y[index(i, &sb)])
                .collect(),
        ),
        (TensorData::Float(_), TensorData::Float(_)) => {
            return Err("Mod of floats needs `fmod=1` (the ONNX spec)".into())
        }
        _ => return Err(format!("Mod of {} tensors", a.dtype).into()),
    };
    Tensor::new(a.dtype, shape, data).map_err(|e| e.to_string().into())
}

/// ONNX `GatherND` with `batch_dims` leading batch dimensions shared by data and indices.
fn gather_nd(data: &Tensor, idx: &Tensor, batch_dims: i64) -> NResult<Tensor> {
    let b = usize::try_from(batch_dims).map_err(|_| "negative `batch_dims`")?;
    let ind = match &idx.data {
        TensorData::Int(v) => v,
        _ => return Err("GatherND indices must be integers".into()),
    };
    let (r, q) = (data.shape.len(), idx.shape.len());
    if q == 0 || b >= q || b >= r {
        return Err(format!(
            "GatherND: batch_dims {b} with data of rank {r} and indices of rank {q}"
        )
        .into());
    }
    let k = idx.shape[q - 1];
    if b + k > r {
        return Err(format!(
            "GatherND: index tuples of length {k} after {b} batch dims exceed data rank {r}"
        )
        .into());
    }
    if data.shape[..b] != idx.shape[..b] {
        return Err(format!(
            "GatherND: batch dims {:?} of data and {:?} of indices differ",
            &data.shape[..b],
            &idx.shape[..b]
        )
        .into());
    }
    let batch: usize = data.shape[..b].iter().product();
    let tuples: usize = idx.shape[b..q - 1].iter().product();
    let slice: usize = data.shape[b + k..].iter().product();
    let dst = strides(&data.shape);
    let per_batch: usize = data.shape[b..].iter().product();
    let mut picks = Vec::with_capacity(batch * tuples * slice);
    for bi in 0..batch {
        for t in 0..tuples {
            let tuple = &ind[(bi * tuples + t) * k..(bi * tuples + t + 1) * k];
            let mut off = bi * per_batch;
            for (j, &x) in tuple.iter().enumerate() {
                let dim = data.shape[b + j] as i64;
                let x = if x < 0 { x + dim } else { x };
                if !(0..dim).contains(&x) {
                    return Err(format!(
                        "GatherND: index {x} out of range for a dimension of {dim}"
                    )
                    .into());
                }
                off += x as usize * dst[b + j];
            }
            picks.extend(off..off + slice);
        }
    }
    let mut shape = idx.shape[..q - 1].to_vec();
    shape.extend_from_slice(&data.shape[b + k..]);
    let out = match &data.data {
        TensorData::Float(v) => TensorData::Float(picks.iter().map(|&i| v[i]).collect()),
        TensorData::Int(v) => TensorData::Int(picks.iter().map(|&i| v[i]).collect()),
        TensorData::Bool(v) => TensorData::Bool(picks.iter().map(|&i| v[i]).collect()),
    };
    Tensor::new(data.dtype, shape, out).map_err(|e| e.to_string().into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cleave_ir::DType;

    #[test]
    fn cumsum_modes() {
        let x = Tensor::from_i64(DType::I64, vec![2, 3], vec![1, 2, 3, 4, 5, 6]);
        let get = |e, r| match cumsum(&x, 1, e, r).unwrap().data {
            TensorData::Int(v) => v,
            _ => unreachable!(),
        };
        assert_eq!(get(false, false), [1, 3, 6, 4, 9, 15]);
        assert_eq!(get(true, false), [0, 1, 3, 0, 4, 9]);
        assert_eq!(get(false, true), [6, 5, 3, 15, 11, 6]);
        assert_eq!(get(true, true), [5, 3, 0, 11, 6, 0]);
        let f = Tensor::from_f64(vec![3], vec![0.5, 0.25, 1.0]);
        assert_eq!(
            cumsum(&f, 0, false, false).unwrap().to_f64_vec(),
            [0.5, 0.75, 1.75]
        );
    }

    #[test]
    fn gather_nd_examples() {
        // The ONNX operator docs' examples 1, 3 and 5.
        let d = Tensor::from_i64(DType::I64, vec![2, 2], vec![0, 1, 2, 3]);
        let i = Tensor::from_i64(DType::I64, vec![2, 2], vec![0, 0, 1, 1]);
        assert_eq!(gather_nd(&d, &i, 0).unwrap().as_i64().unwrap(), [0, 3]);
        let d = Tensor::from_i64(DType::I64, vec![2, 2, 2], (0..8).collect());
        let i = Tensor::from_i64(DType::I64, vec![2, 1, 2], vec![0, 1, 1, 0]);
        let g = gather_nd(&d, &i, 0).unwrap();
        assert_eq!(g.shape, [2, 1, 2]);
        assert_eq!(g.as_i64().unwrap(), [2, 3, 4, 5]);
        let i = Tensor::from_i64(DType::I64, vec![2, 1], vec![1, 0]);
        let g = gather_nd(&d, &i, 1).unwrap();
        assert_eq!(g.shape, [2, 2]);
        assert_eq!(g.as_i64().unwrap(), [2, 3, 4, 5]);
        assert!(gather_nd(&d, &Tensor::from_i64(DType::I64, vec![1, 1], vec![5]), 0).is_err());
    }

    #[test]
    fn mod_signs_and_broadcast() {
        // The ONNX operator docs: `fmod=0` takes the divisor's sign, `fmod=1` the dividend's.
        let a = Tensor::from_i64(DType::I64, vec![6], vec![-4, 7, 5, 4, -7, 8]);
        let b = Tensor::from_i64(DType::I64, vec![6], vec![2, -3, 8, -2, 3, 5]);
        assert_eq!(
            modulo(&a, &b, false).unwrap().as_i64().unwrap(),
            [0, -2, 5, 0, 2, 3]
        );
        assert_eq!(
            modulo(&a, &b, true).unwrap().as_i64().unwrap(),
            [0, 1, 5, 0, -1, 3]
        );
        let col = Tensor::from_i64(DType::I64, vec![2, 1], vec![7, -7]);
        let row = Tensor::from_i64(DType::I64, vec![3], vec![2, 3, 4]);
        let m = modulo(&col, &row, false).unwrap();
        assert_eq!(m.shape, [2, 3]);
        assert_eq!(m.as_i64().unwrap(), [1, 1, 3, 1, 2, 1]);
        let f = Tensor::from_f64(vec![2], vec![-4.3, 5.5]);
        let g = Tensor::from_f64(vec![1], vec![2.0]);
        assert!(modulo(&f, &g, false).is_err());
        let r = modulo(&f, &g, true).unwrap().to_f64_vec();
        assert!((r[0] + 0.3).abs() < 1e-12 && (r[1] - 1.5).abs() < 1e-12);
        assert!(modulo(&a, &Tensor::from_i64(DType::I64, vec![1], vec![0]), false).is_err());
    }
}
