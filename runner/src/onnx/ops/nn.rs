//! Neural-network ops: `Gemm` and `MatMul`, convolution and pooling, batch and layer
//! normalisation, softmax, reductions, `SoftmaxCrossEntropyLoss` and `Attention`.
//!
//! `BatchNormalization` in its inference form takes the running mean and variance as constants
//! (initializers or constants, so they are not trained), while the scale and bias stay
//! parameters. In training form (`training_mode`, or a PyTorch module exported in `train()`
//! mode, whose node the exporter writes without it) it normalises with the batch's statistics;
//! the running statistics are not updated (their outputs are errors where read).

use cleave_ir::interp::Tensor;
use cleave_ir::{BinaryOp, CompareOp, DType, ReduceKind, Value};

use super::shape::reshape;
use super::{axis, bcast, broadcast_shapes, input, optional};
use crate::onnx::graph::{Importer, NResult, NodeCtx, Val};

/// Lowers the node if it is a neural-network op; `None` otherwise.
pub fn lower(imp: &mut Importer, n: &NodeCtx, ins: &[Option<Val>]) -> NResult<Option<Vec<Val>>> {
    let out = match n.op {
        "Gemm" => vec![gemm(imp, n, ins)?],
        "MatMul" => vec![matmul(imp, input(ins, 0)?, input(ins, 1)?)?],
        "Conv" => vec![conv(imp, n, ins)?],
        "MaxPool" | "AveragePool" => {
            if n.output_used(1) {
                return Err("the `Indices` output is not supported".into());
            }
            vec![pool(imp, n, ins)?]
        }
        "GlobalAveragePool" | "GlobalMaxPool" => {
            let x = input(ins, 0)?;
            let s = imp.shape(x)?;
            if s.len() < 3 {
                return Err("the input needs rank >= 3".into());
            }
            let kind = if n.op == "GlobalMaxPool" {
                ReduceKind::Max
            } else {
                ReduceKind::Mean
            };
            let xv = imp.ir(x)?;
            let r = imp.t.reduce(kind, xv, (2..s.len()).collect::<Vec<_>>())?;
            let mut keep = s[..2].to_vec();
            keep.resize(s.len(), 1);
            vec![reshape(imp, &Val::Ir(r), keep)?]
        }
        "BatchNormalization" => {
            // The running statistics' outputs (a training-mode node of the TorchScript
            // exporter declares them, unread): an error only where something reads them.
            let mut out = vec![batch_norm(imp, n, ins)?];
            out.extend(n.node.output.iter().skip(1).map(|o| {
                Val::Unavailable(format!(
                    "`{o}` is BatchNorm's updated running statistics, which cleave does not \
                     carry from step to step (training normalises with the batch's statistics)"
                ))
            }));
            out
        }
        "LayerNormalization" => vec![layer_norm(imp, n, ins)?],
        "Softmax" | "LogSoftmax" => {
            let x = input(ins, 0)?;
            let a = axis(n.int("axis", -1)?, imp.shape(x)?.len())?;
            let xv = imp.ir(x)?;
            let y = if n.op == "Softmax" {
                imp.t.softmax(xv, a)?
            } else {
                imp.t.log_softmax(xv, a)?
            };
            vec![Val::Ir(y)]
        }
        "ReduceMean" | "ReduceSum" | "ReduceMax" | "ReduceMin" => vec![reduce(imp, n, ins)?],
        "SoftmaxCrossEntropyLoss" => softmax_cross_entropy(imp, n, ins)?,
        "Attention" => attention(imp, n, ins)?,
        _ => return Ok(None),
    };
    Ok(Some(out))
}

fn scale(imp: &mut Importer, x: Value, factor: f64) -> NResult<Value> {
    if factor == 1.0 {
        return Ok(x);
    }
    let ty = imp.t.ty(x).clone();
    let c = imp.t.constant_f(ty.dtype, ty.shape, factor)?;
    Ok(imp.t.mul(x, c)?)
}

/// `Gemm`: `alpha · A' · B' + beta · C` with `A'`, `B'` optionally transposed (the transposes
/// become flags of `matmul`, so a PyTorch `Linear` weight `[out, in]` stays one parameter).
fn gemm(imp: &mut Importer, n: &NodeCtx, ins: &[Option<Val>]) -> NResult<Val> {
    let a = imp.ir(input(ins, 0)?)?;
    let b = imp.ir(input(ins, 1)?)?;
    let ta = n.int("transA", 0)? != 0;
    let tb = n.int("transB", 0)? != 0;
    let y = imp.t.matmul_t(a, b, ta, tb)?;
    let mut y = scale(imp, y, n.float("alpha", 1.0)? as f64)?;
    if let Some(c) = optional(ins, 2) {
        let beta = n.float("beta", 1.0)? as f64;
        if beta != 0.0 {
            let shape = imp.t.shape(y).to_vec();
            let cv = imp.ir(c)?;
            let cv = imp.t.broadcast_to(cv, shape)?;
            let cv = scale(imp, cv, beta)?;
            y = imp.t.add(y, cv)?;
        }
    }
    Ok(Val::Ir(y))
}

/// `MatMul` with numpy semantics: rank-1 operands gain and lose a unit dimension, a rank-2
/// right operand against a batched left one is one flat matrix product (so a weight stays
/// rank 2), and other batch dimensions are broadcast.
pub fn matmul(imp: &mut Importer, a: &Val, b: &Val) -> NResult<Val> {
    let (sa, sb) = (imp.shape(a)?, imp.shape(b)?);
    if sa.is_empty() || sb.is_empty() {
        return Err("operands must have rank >= 1".into());
    }
    let mut a = imp.ir(a)?;
    let mut b = imp.ir(b)?;
    let (mut sa2, mut sb2) = (sa.clone(), sb.clone());
    if sa.len() == 1 {
        sa2 = vec![1, sa[0]];
        a = imp.t.reshape(a, sa2.clone())?;
    }
    if sb.len() == 1 {
        sb2 = vec![sb[0], 1];
        b = imp.t.reshape(b, sb2.clone())?;
    }
    let (ra, rb) = (sa2.len(), sb2.len());
    let (m, k) = (sa2[ra - 2], sa2[ra - 1]);
    let nn = sb2[rb - 1];
    let mut out_shape;
    let y = if ra == 2 && rb == 2 {
        out_shape = vec![m, nn];
        imp.t.matmul(a, b)?
    } else if rb == 2 {
        // [B…, M, K] · [K, N]: one [B…·M, K] · [K, N] product.
        let rows: usize = sa2[..ra - 1].iter().product();
        let flat = imp.t.reshape(a, [rows, k])?;
        let y = imp.t.matmul(flat, b)?;
        out_shape = sa2[..ra - 1].to_vec();
        out_shape.push(nn);
        imp.t.reshape(y, out_shape.clone())?
    } else {
        let batch = broadcast_shapes(&[sa2[..ra - 2].to_vec(), sb2[..rb - 2].to_vec()])?;
        let mut ta = batch.clone();
        ta.extend([m, k]);
        let mut tb = batch.clone();
        tb.extend(&sb2[rb - 2..]);
        let a = imp.t.broadcast_to(a, ta)?;
        let b = imp.t.broadcast_to(b, tb)?;
        out_shape = batch;
        out_shape.extend([m, nn]);
        imp.t.matmul(a, b)?
    };
    // Drop the unit dimensions that rank-1 operands gained.
    let mut final_shape = out_shape.clone();
    if sb.len() == 1 {
        final_shape.pop();
    }
    if sa.len() == 1 {
        let l = final_shape.len();
        final_shape.remove(l - if sb.len() == 1 { 1 } else { 2 });
    }
    reshape(imp, &Val::Ir(y), final_shape)
}

/// Two spatial values of an attribute (`[1, 1]`-style defaults).
fn pair(n: &NodeCtx, name: &str, default: usize) -> NResult<[usize; 2]> {
    match n.ints(name) {
        None => Ok([default; 2]),
        Some(v) if v.len() == 2 && v.iter().all(|&x| x >= 0) => Ok([v[0] as usize, v[1] as usize]),
        Some(v) => {
            Err(format!("`{name}` must be two non-negative values for 2-D, got {v:?}").into())
        }
    }
}

/// Padding `[top, left, bottom, right]` from `pads` (ONNX's `[x1_begin, x2_begin, x1_end,
/// x2_end]` is the same order) or `auto_pad`.
fn padding(
    n: &NodeCtx,
    input: [usize; 2],
    kernel: [usize; 2],
    stride: [usize; 2],
    dilation: [usize; 2],
) -> NResult<[usize; 4]> {
    match n.string("auto_pad", "NOTSET")?.as_str() {
        "NOTSET" => match n.ints("pads") {
            None => Ok([0; 4]),
            Some(p) if p.len() == 4 && p.iter().all(|&x| x >= 0) => {
                Ok([p[0] as usize, p[1] as usize, p[2] as usize, p[3] as usize])
            }
            Some(p) => {
                Err(format!("`pads` must be four non-negative values for 2-D, got {p:?}").into())
            }
        },
        "VALID" => Ok([0; 4]),
        mode @ ("SAME_UPPER" | "SAME_LOWER") => {
            let mut pads = [0; 4];
            for i in 0..2 {
                if stride[i] == 0 {
                    return Err("zero stride".into());
                }
                let out = input[i].div_ceil(stride[i]);
                let need = (out.saturating_sub(1) * stride[i]
                    + kernel[i].saturating_sub(1) * dilation[i]
                    + 1)
                .saturating_sub(input[i]);
                let small = need / 2;
                let (lo, hi) = if mode == "SAME_UPPER" {
                    (small, need - small)
                } else {
                    (need - small, small)
                };
                pads[i] = lo;
                pads[i + 2] = hi;
            }
            Ok(pads)
        }
        other => Err(format!("unknown `auto_pad` `{other}`").into()),
    }
}

fn spatial(imp: &Importer, x: &Val) -> NResult<[usize; 2]> {
    let s = imp.shape(x)?;
    if s.len() != 4 {
        return Err(
            format!("only 2-D (rank-4 [N,C,H,W]) inputs are supported, got shape {s:?}").into(),
        );
    }
    Ok([s[2], s[3]])
}

fn conv(imp: &mut Importer, n: &NodeCtx, ins: &[Option<Val>]) -> NResult<Val> {
    let x = input(ins, 0)?;
    let w = input(ins, 1)?;
    let hw = spatial(imp, x)?;
    let ws = imp.shape(w)?;
    if ws.len() != 4 {
        return Err(format!("the weight must have rank 4, got {ws:?}").into());
    }
    let stride = pair(n, "strides", 1)?;
    let dilation = pair(n, "dilations", 1)?;
    let pads = padding(n, hw, [ws[2], ws[3]], stride, dilation)?;
    let groups = n.int("group", 1)?;
    if groups < 1 {
        return Err(format!("invalid `group` {groups}").into());
    }
    let xv = imp.ir(x)?;
    let wv = imp.ir(w)?;
    let mut y = imp
        .t
        .conv2d(xv, wv, stride, pads, dilation, groups as usize)?;
    if let Some(b) = optional(ins, 2) {
        let shape = imp.t.shape(y).to_vec();
        let bv = imp.ir(b)?;
        let bb = imp.t.broadcast(bv, shape, [1])?;
        y = imp.t.add(y, bb)?;
    }
    Ok(Val::Ir(y))
}

fn pool(imp: &mut Importer, n: &NodeCtx, ins: &[Option<Val>]) -> NResult<Val> {
    let x = input(ins, 0)?;
    let hw = spatial(imp, x)?;
    let window = match n.ints("kernel_shape") {
        Some(k) if k.len() == 2 && k.iter().all(|&v| v > 0) => [k[0] as usize, k[1] as usize],
        other => {
            return Err(format!("`kernel_shape` must be two positive values, got {other:?}").into())
        }
    };
    let stride = pair(n, "strides", 1)?;
    if pair(n, "dilations", 1)? != [1, 1] {
        return Err("dilated pooling is not supported".into());
    }
    let pads = padding(n, hw, window, stride, [1, 1])?;
    if n.int("ceil_mode", 0)? != 0 {
        for i in 0..2 {
            let span = (hw[i] + pads[i] + pads[i + 2]).saturating_sub(window[i]);
            if stride[i] == 0 || span % stride[i] != 0 {
                return Err(
                    "`ceil_mode=1` changes the output size here; it is not supported".into(),
                );
            }
        }
    }
    let xv = imp.ir(x)?;
    let y = if n.op == "MaxPool" {
        imp.t.max_pool2d(xv, window, stride, pads)?
    } else {
        let include = n.int("count_include_pad", 0)? != 0;
        imp.t.avg_pool2d(xv, window, stride, pads, include)?
    };
    Ok(Val::Ir(y))
}

/// A per-channel vector `[C]` broadcast along dimension 1 of `shape`.
fn per_channel(imp: &mut Importer, v: Value, shape: &[usize]) -> NResult<Value> {
    Ok(imp.t.broadcast(v, shape.to_vec(), [1])?)
}

/// Whether a `BatchNormalization` node normalises with the batch's statistics: its
/// `training_mode`, or, for PyTorch's dynamo exporter (which writes a module exported in
/// training mode as an inference node), the exported program's call
/// `_native_batch_norm_legit_functional(x, w, b, running_mean, running_var, training=True, …)`
/// recorded in the node's `pkg.torch.onnx.fx_node`.
fn batch_norm_training(n: &NodeCtx) -> NResult<bool> {
    if n.int("training_mode", 0)? != 0 {
        return Ok(true);
    }
    let fx = n
        .node
        .metadata_props
        .iter()
        .find(|p| p.key.as_deref() == Some("pkg.torch.onnx.fx_node"))
        .and_then(|p| p.value.as_deref())
        .unwrap_or("");
    if !fx.contains("_native_batch_norm_legit") {
        return Ok(false);
    }
    let args = fx
        .split_once("args = (")
        .map(|(_, rest)| rest.split(')').next().unwrap_or(""))
        .unwrap_or("");
    Ok(args.split(',').map(str::trim).nth(5) == Some("True"))
}

fn batch_norm(imp: &mut Importer, n: &NodeCtx, ins: &[Option<Val>]) -> NResult<Val> {
    let x = input(ins, 0)?;
    let ty = imp.ty(x)?;
    if ty.rank() < 2 {
        return Err("the input needs rank >= 2".into());
    }
    let eps = n.float("epsilon", 1e-5)? as f64;
    let xv = imp.ir(x)?;
    let y = if batch_norm_training(n)? {
        // Training form: the batch's mean and (biased) variance per channel, as PyTorch
        // normalises in `train()` mode; gradients flow through both.
        let axes: Vec<usize> = (0..ty.rank()).filter(|&a| a != 1).collect();
        let mean = imp.t.reduce(ReduceKind::Mean, xv, axes.clone())?;
        let mean = per_channel(imp, mean, &ty.shape)?;
        let d = imp.t.binary(BinaryOp::Sub, xv, mean)?;
        let sq = imp.t.mul(d, d)?;
        let var = imp.t.reduce(ReduceKind::Mean, sq, axes)?;
        let e = imp.t.constant_f(ty.dtype, vec![ty.shape[1]], eps)?;
        let var = imp.t.add(var, e)?;
        let inv = imp.t.unary(cleave_ir::UnaryOp::Rsqrt, var)?;
        let inv = per_channel(imp, inv, &ty.shape)?;
        imp.t.mul(d, inv)?
    } else {
        let c = ty.shape[1];
        let mean = imp.const_floats(input(ins, 3)?, "input_mean")?;
        let var = imp.const_floats(input(ins, 4)?, "input_var")?;
        if mean.len() != c || var.len() != c {
            return Err(format!("running statistics must have {c} elements").into());
        }
        let inv: Vec<f64> = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
        let shift: Vec<f64> = mean.iter().zip(&inv).map(|(m, i)| -m * i).collect();
        let inv = imp.constant(&Tensor::from_float(ty.dtype, [c], inv))?;
        let shift = imp.constant(&Tensor::from_float(ty.dtype, [c], shift))?;
        let inv = per_channel(imp, inv, &ty.shape)?;
        let shift = per_channel(imp, shift, &ty.shape)?;
        let y = imp.t.mul(xv, inv)?;
        imp.t.add(y, shift)?
    };
    // Both forms: the per-channel scale and shift.
    let s = imp.ir(input(ins, 1)?)?;
    let s = per_channel(imp, s, &ty.shape)?;
    let y = imp.t.mul(y, s)?;
    let b = imp.ir(input(ins, 2)?)?;
    let b = per_channel(imp, b, &ty.shape)?;
    Ok(Val::Ir(imp.t.add(y, b)?))
}

/// `LayerNormalization` over the dimensions from `axis` on: cleave's `layer_norm` (which
/// normalises the last dimension) on a view that merges them, then the affine part as explicit
/// `broadcast` + `mul`/`add`.
fn layer_norm(imp: &mut Importer, n: &NodeCtx, ins: &[Option<Val>]) -> NResult<Val> {
    if n.output_used(1) || n.output_used(2) {
        return Err("the `Mean` and `InvStdDev` outputs are not supported".into());
    }
    let x = input(ins, 0)?;
    let shape = imp.shape(x)?;
    let a = axis(n.int("axis", -1)?, shape.len())?;
    let eps = n.float("epsilon", 1e-5)? as f64;
    let mut y = if a + 1 == shape.len() {
        let xv = imp.ir(x)?;
        imp.t.layer_norm(xv, eps)?
    } else {
        let mut flat = shape[..a].to_vec();
        flat.push(shape[a..].iter().product());
        let xf = reshape(imp, x, flat)?;
        let xv = imp.ir(&xf)?;
        let ln = imp.t.layer_norm(xv, eps)?;
        imp.t.reshape(ln, shape.clone())?
    };
    let scale = imp.ir(input(ins, 1)?)?;
    let scale = imp.t.broadcast_to(scale, shape.clone())?;
    y = imp.t.mul(y, scale)?;
    if let Some(b) = optional(ins, 2) {
        let bv = imp.ir(b)?;
        let bv = imp.t.broadcast_to(bv, shape)?;
        y = imp.t.add(y, bv)?;
    }
    Ok(Val::Ir(y))
}

fn reduce(imp: &mut Importer, n: &NodeCtx, ins: &[Option<Val>]) -> NResult<Val> {
    let x = input(ins, 0)?;
    let shape = imp.shape(x)?;
    let kind = match n.op {
        "ReduceMean" => ReduceKind::Mean,
        "ReduceSum" => ReduceKind::Sum,
        "ReduceMax" => ReduceKind::Max,
        _ => ReduceKind::Min,
    };
    let axes = match optional(ins, 1) {
        Some(v) => imp.const_ints(v, "axes")?,
        None => n.ints("axes").unwrap_or_default(),
    };
    let mut axes = axes
        .iter()
        .map(|&a| axis(a, shape.len()))
        .collect::<NResult<Vec<_>>>()?;
    if axes.is_empty() {
        if n.int("noop_with_empty_axes", 0)? != 0 {
            return Ok(x.clone());
        }
        axes = (0..shape.len()).collect();
    }
    axes.sort_unstable();
    axes.dedup();
    let xv = imp.ir(x)?;
    let r = imp.t.reduce(kind, xv, axes.clone())?;
    if n.int("keepdims", 1)? != 0 {
        let kept: Vec<usize> = (0..shape.len())
            .map(|i| if axes.contains(&i) { 1 } else { shape[i] })
            .collect();
        return reshape(imp, &Val::Ir(r), kept);
    }
    Ok(Val::Ir(r))
}

/// `SoftmaxCrossEntropyLoss`: scores `[N, C, D…]`, labels `[N, D…]`; classes are moved last for
/// cleave's `cross_entropy`. `ignore_index` masks positions out of the loss and of the mean's
/// denominator; class weights are not supported.
fn softmax_cross_entropy(
    imp: &mut Importer,
    n: &NodeCtx,
    ins: &[Option<Val>],
) -> NResult<Vec<Val>> {
    if optional(ins, 2).is_some() {
        return Err("class weights are not supported".into());
    }
    let scores = input(ins, 0)?;
    let labels = input(ins, 1)?;
    let ty = imp.ty(scores)?;
    let r = ty.rank();
    if r < 2 {
        return Err("scores need rank >= 2".into());
    }
    let mut perm: Vec<usize> = vec![0];
    perm.extend(2..r);
    perm.push(1);
    let sv = imp.ir(scores)?;
    let logits = if r == 2 {
        sv
    } else {
        imp.t.transpose(sv, perm.clone())?
    };
    let mut lv = imp.ir(labels)?;
    let lty = imp.t.ty(lv).clone();
    let ignore = n
        .node
        .attribute
        .iter()
        .any(|a| a.name.as_deref() == Some("ignore_index"))
        .then(|| n.int("ignore_index", -100))
        .transpose()?;
    let mut keep = None;
    if let Some(ii) = ignore {
        let iic = imp.t.constant_f(lty.dtype, lty.shape.clone(), ii as f64)?;
        let is_ignored = imp.t.compare(CompareOp::Eq, lv, iic)?;
        let zero = imp.t.constant_f(lty.dtype, lty.shape.clone(), 0.0)?;
        lv = imp.t.select(is_ignored, zero, lv)?;
        let kept = imp.t.not(is_ignored)?;
        keep = Some(imp.t.cast(kept, ty.dtype)?);
    }
    let mut ce = imp.t.cross_entropy(logits, lv)?;
    if let Some(k) = keep {
        ce = imp.t.mul(ce, k)?;
    }
    let all: Vec<usize> = (0..lty.rank()).collect();
    let loss = match n.string("reduction", "mean")?.as_str() {
        "none" => ce,
        "sum" => imp.t.reduce_sum(ce, all)?,
        "mean" => match keep {
            None => imp.t.reduce_mean(ce, all)?,
            Some(k) => {
                let total = imp.t.reduce_sum(ce, all.clone())?;
                let count = imp.t.reduce_sum(k, all)?;
                imp.t.div(total, count)?
            }
        },
        other => return Err(format!("unknown `reduction` `{other}`").into()),
    };
    let mut outs = vec![Val::Ir(loss)];
    if n.output_used(1) {
        let ls = imp.t.log_softmax(logits, r - 1)?;
        let ls = if r == 2 {
            ls
        } else {
            let mut inverse = vec![0; r];
            for (i, &p) in perm.iter().enumerate() {
                inverse[p] = i;
            }
            imp.t.transpose(ls, inverse)?
        };
        outs.push(Val::Ir(ls));
    }
    Ok(outs)
}

/// The opset-23 `Attention` op on 4-D `[B, H, S, D]` inputs: `softmax(Q·Kᵀ·scale + mask) · V`,
/// with an optional boolean or additive mask and `is_causal`. Grouped K/V heads are repeated.
/// Past key/value caches and the 3-D form are not supported.
fn attention(imp: &mut Importer, n: &NodeCtx, ins: &[Option<Val>]) -> NResult<Vec<Val>> {
    if ins.len() > 4 || (1..4).any(|i| n.output_used(i)) {
        return Err("past key/value inputs and extra outputs are not supported".into());
    }
    if n.int("softcap", 0)? != 0 || n.float("softcap", 0.0)? != 0.0 {
        return Err("`softcap` is not supported".into());
    }
    let (q, k, v) = (input(ins, 0)?, input(ins, 1)?, input(ins, 2)?);
    let (qs, ks) = (imp.shape(q)?, imp.shape(k)?);
    if qs.len() != 4 || ks.len() != 4 || imp.shape(v)?.len() != 4 {
        return Err("only 4-D [batch, heads, seq, head_dim] inputs are supported".into());
    }
    let dtype = imp.ty(q)?.dtype;
    let (b, hq, sq, d) = (qs[0], qs[1], qs[2], qs[3]);
    let (hk, skv) = (ks[1], ks[2]);
    if hk == 0 || hq % hk != 0 {
        return Err(format!("{hq} query heads cannot share {hk} key/value heads").into());
    }
    let mut kv = Vec::new();
    for x in [k, v] {
        let mut xv = imp.ir(x)?;
        if hk != hq {
            let xs = imp.t.shape(xv).to_vec();
            let rep = hq / hk;
            let e = imp
                .t
                .broadcast(xv, [xs[0], xs[1], rep, xs[2], xs[3]], [0, 1, 3, 4])?;
            xv = imp.t.reshape(e, [xs[0], hq, xs[2], xs[3]])?;
        }
        kv.push(xv);
    }
    let qv = imp.ir(q)?;
    let default_scale = 1.0 / (d as f64).sqrt();
    let sc = match n.float("scale", 0.0)? {
        0.0 => default_scale,
        s => s as f64,
    };
    let scores = imp.t.matmul_t(qv, kv[0], false, true)?;
    let mut scores = scale(imp, scores, sc)?;
    let shape = vec![b, hq, sq, skv];
    if let Some(m) = optional(ins, 3) {
        let mv = bcast(imp, &[m, &Val::Ir(scores)])?;
        scores = if imp.t.ty(mv[0]).dtype == DType::Bool {
            let neg = imp.t.constant_f(dtype, shape.clone(), f64::NEG_INFINITY)?;
            imp.t.select(mv[0], scores, neg)?
        } else {
            imp.t.binary(BinaryOp::Add, mv[1], mv[0])?
        };
    }
    if n.int("is_causal", 0)? != 0 {
        let row = imp.t.iota(DType::I64, [sq, skv], 0)?;
        let col = imp.t.iota(DType::I64, [sq, skv], 1)?;
        let keep = imp.t.compare(CompareOp::Le, col, row)?;
        let keep = imp.t.broadcast(keep, shape.clone(), [2, 3])?;
        let neg = imp.t.constant_f(dtype, shape.clone(), f64::NEG_INFINITY)?;
        scores = imp.t.select(keep, scores, neg)?;
    }
    let p = imp.t.softmax(scores, 3)?;
    Ok(vec![Val::Ir(imp.t.matmul(p, kv[1])?)])
}
