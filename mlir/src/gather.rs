//! The ops that are not elementwise: one thread per output element computes its indices in the
//! body of a `linalg.generic`, reads operands with `tensor.extract` and reduces with `scf.for`
//! (see `emit.rs`); `scatter_add` instead builds per-row chains of its updates first, so that no
//! output element loops over all updates, and long rows are reduced by several threads each
//! (`row_reduce`). Each function documents the formula it implements; the reference interpreter's
//! kernels (`cleave_ir::interp`) are the specification.

use cleave_ir::{DType, Node, Op, PoolKind, ReduceKind, SteOp};

use crate::body::{elem_ty, is_float, strides, Body};
use crate::emit::{cast, reduce_init, EmitError, Emitter};

/// A read of an operand: tensor name, element count, element type.
#[derive(Clone)]
struct Src {
    t: String,
    n: usize,
    ty: String,
}

impl Src {
    fn at(&self, b: &mut Body, i: &str) -> String {
        b.extract(&self.t, i, self.n, &self.ty)
    }
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product::<usize>().max(1)
}

/// `combine(acc, x)` of a reduction.
fn combine(b: &mut Body, kind: ReduceKind, acc: &str, x: &str, ty: &str) -> String {
    let f = is_float(ty);
    let op = match kind {
        ReduceKind::Sum | ReduceKind::Mean => ["arith.addf", "arith.addi"],
        ReduceKind::Max => ["arith.maximumf", "arith.maxsi"],
        ReduceKind::Min => ["arith.minimumf", "arith.minsi"],
    };
    b.bin(op[if f { 0 } else { 1 }], acc, x, ty)
}

/// `in-bounds ? index : 0` and the in-bounds flag, for a signed coordinate `c` against `[0, hi)`.
fn in_range(b: &mut Body, c: &str, hi: usize) -> String {
    let z = b.idx(0);
    let h = b.idx(hi as i64);
    let ge = b.cmpi("sge", c, &z, "index");
    let lt = b.cmpi("slt", c, &h, "index");
    b.bin("arith.andi", &ge, &lt, "i1")
}

fn and(b: &mut Body, x: &str, y: &str) -> String {
    b.bin("arith.andi", x, y, "i1")
}

/// Emits the node and returns the tensor of each result.
pub(crate) fn emit(e: &mut Emitter, node: Node) -> Result<Vec<String>, EmitError> {
    let (func, tensors) = e.parts();
    let data = func.node(node);
    let op = data.op.clone();
    let rty = func.ty(data.results[0]).clone();
    let rshape = rty.shape.clone();
    let n = numel(&rshape);
    let ety = elem_ty(rty.dtype).to_string();
    let srcs: Vec<Src> = data
        .operands
        .iter()
        .map(|&v| Src {
            t: tensors[&v].clone(),
            n: numel(&func.ty(v).shape),
            ty: elem_ty(func.ty(v).dtype).to_string(),
        })
        .collect();
    let shapes: Vec<Vec<usize>> = data
        .operands
        .iter()
        .map(|&v| func.ty(v).shape.clone())
        .collect();
    let float_only = |e: &Emitter| -> Result<(), EmitError> {
        if is_float(&ety) {
            Ok(())
        } else {
            Err(e.error(&op, &rty.to_string(), "needs a float type"))
        }
    };
    let t = &ety;
    Ok(match &op {
        Op::Reduce { kind, axes } => {
            let kind = *kind;
            if kind == ReduceKind::Mean {
                float_only(e)?;
            }
            let xs = shapes[0].clone();
            let kept: Vec<usize> = (0..xs.len()).filter(|d| !axes.contains(d)).collect();
            let red_shape: Vec<usize> = axes.iter().map(|&a| xs[a]).collect();
            let count = numel(&red_shape);
            let xst = strides(&xs);
            let x = srcs[0].clone();
            vec![e.gen_out(n, t, |b, _| {
                let p = b.op("linalg.index 0 : index");
                let oi = b.decompose(&p, &rshape);
                let mut base: Option<String> = None;
                for (j, &d) in kept.iter().enumerate() {
                    base = Some(b.mul_add(&oi[j], xst[d], base.as_deref()));
                }
                let base = base.unwrap_or_else(|| b.idx(0));
                // 16-bit sums and means accumulate in f32 and round once (max and min are
                // exact in any type).
                let d = rty.dtype;
                let acc_d = match (d, kind) {
                    (DType::BF16 | DType::F16, ReduceKind::Sum | ReduceKind::Mean) => DType::F32,
                    _ => d,
                };
                let acc_t = elem_ty(acc_d);
                let init = b.constant(reduce_init(kind, acc_t), acc_t);
                let r = b.for_loop(count, &[(init, acc_t.to_string())], |b, k, acc| {
                    let ri = b.decompose(k, &red_shape);
                    let mut off = base.clone();
                    for (j, &a) in axes.iter().enumerate() {
                        off = b.mul_add(&ri[j], xst[a], Some(&off));
                    }
                    let v = x.at(b, &off);
                    let v = cast(b, &v, d, acc_d);
                    vec![combine(b, kind, &acc[0], &v, acc_t)]
                });
                let r = if kind == ReduceKind::Mean {
                    let c = b.fc(count as f64, acc_t);
                    b.bin("arith.divf", &r[0], &c, acc_t)
                } else {
                    r[0].clone()
                };
                cast(b, &r, acc_d, d)
            })]
        }
        // A GEMM as one thread per output element with a `k` loop, consecutive threads on
        // consecutive columns (coalesced `rhs` and `out`, broadcast `lhs`). This is the optional
        // MLIR GEMM; the default on a GPU is cuBLAS (`GemmSpec` in the descriptors). Named
        // `linalg.matmul`/`batch_matmul` would go through the same generic parallel-loop mapping,
        // which puts threads along rows (uncoalesced); a tiled MLIR GEMM is future work.
        Op::MatMul {
            transpose_lhs,
            transpose_rhs,
        } => {
            let (tl, tr) = (*transpose_lhs, *transpose_rhs);
            let r = rshape.len();
            let (m, nn) = (rshape[r - 2], rshape[r - 1]);
            let k = if tl {
                shapes[0][r - 2]
            } else {
                shapes[0][r - 1]
            };
            let batch = numel(&rshape[..r - 2]);
            let (a, bsrc) = (srcs[0].clone(), srcs[1].clone());
            let f = is_float(t);
            // 16-bit floats accumulate in f32 and round once, as the CPU runtime's 16-bit GEMM
            // does (`--precision bf16|f16`): a 16-bit running sum would lose the small terms.
            let d = rty.dtype;
            let acc_d = match d {
                DType::BF16 | DType::F16 => DType::F32,
                _ => d,
            };
            let acc_t = elem_ty(acc_d);
            vec![e.gen_out(n, t, |b, _| {
                let p = b.op("linalg.index 0 : index");
                let j = b.remc(&p, nn);
                let q = b.divc(&p, nn);
                let i = b.remc(&q, m);
                let bi = b.divc(&q, m);
                let _ = batch;
                let abase = b.mul_add(&bi, m * k, None);
                let bbase = b.mul_add(&bi, k * nn, None);
                let init = b.constant(0.0, acc_t);
                let acc = b.for_loop(k, &[(init, acc_t.to_string())], |b, kk, acc| {
                    let ai = if tl {
                        let x = b.mul_add(kk, m, Some(&i));
                        b.add(&abase, &x)
                    } else {
                        let x = b.mul_add(&i, k, Some(kk));
                        b.add(&abase, &x)
                    };
                    let bix = if tr {
                        let x = b.mul_add(&j, k, Some(kk));
                        b.add(&bbase, &x)
                    } else {
                        let x = b.mul_add(kk, nn, Some(&j));
                        b.add(&bbase, &x)
                    };
                    let (av, bv) = (a.at(b, &ai), bsrc.at(b, &bix));
                    let (av, bv) = (cast(b, &av, d, acc_d), cast(b, &bv, d, acc_d));
                    let mul = if f { "arith.mulf" } else { "arith.muli" };
                    let prod = b.bin(mul, &av, &bv, acc_t);
                    let add = if f { "arith.addf" } else { "arith.addi" };
                    vec![b.bin(add, &acc[0], &prod, acc_t)]
                });
                cast(b, &acc[0], acc_d, d)
            })]
        }
        Op::Conv2d {
            stride,
            padding,
            dilation,
            groups,
        } => {
            float_only(e)?;
            let (xs, ws) = (shapes[0].clone(), shapes[1].clone());
            let (stride, padding, dilation, groups) = (*stride, *padding, *dilation, *groups);
            let (x, w) = (srcs[0].clone(), srcs[1].clone());
            let og = ws[0] / groups;
            let cg = ws[1];
            vec![e.gen_out(n, t, |b, _| {
                let p = b.op("linalg.index 0 : index");
                let oi = b.decompose(&p, &rshape);
                let g = b.divc(&oi[1], og);
                let cbase = b.mul_add(&g, cg, None);
                let init = b.fc(0.0, t);
                let red = [cg, ws[2], ws[3]];
                let acc = b.for_loop(numel(&red), &[(init, t.clone())], |b, k, acc| {
                    let ri = b.decompose(k, &red);
                    let c = b.add(&cbase, &ri[0]);
                    let taps = [0, 1].map(|d| {
                        let a = b.mul_add(&oi[2 + d], stride[d], None);
                        let tap = b.mul_add(&ri[1 + d], dilation[d], Some(&a));
                        let pad = b.idx(padding[d] as i64);
                        let pos = b.sub(&tap, &pad);
                        let v = in_range(b, &pos, xs[2 + d]);
                        (pos, v)
                    });
                    let (ok, hh, ww) = clamp_tap(b, taps);
                    let xi = b.compose(&[oi[0].clone(), c, hh, ww], &xs);
                    let wi = b.compose(
                        &[oi[1].clone(), ri[0].clone(), ri[1].clone(), ri[2].clone()],
                        &ws,
                    );
                    let xv = x.at(b, &xi);
                    let wv = w.at(b, &wi);
                    vec![masked_mac(b, &acc[0], &ok, &xv, &wv, t)]
                });
                acc[0].clone()
            })]
        }
        Op::Conv2dGradInput {
            stride,
            padding,
            dilation,
            groups,
            ..
        } => {
            float_only(e)?;
            let (ds, ws) = (shapes[0].clone(), shapes[1].clone());
            let (stride, padding, dilation, groups) = (*stride, *padding, *dilation, *groups);
            let (dy, w) = (srcs[0].clone(), srcs[1].clone());
            let og = ws[0] / groups;
            let cg = ws[1];
            vec![e.gen_out(n, t, |b, _| {
                // dx[n,c,h,w] = Σ_{o in group, kh, kw} dy[n,o,ho,wo] · w[o,c mod Cg,kh,kw] where
                // ho·s + kh·d - pad = h.
                let p = b.op("linalg.index 0 : index");
                let oi = b.decompose(&p, &rshape);
                let g = b.divc(&oi[1], cg);
                let cl = b.remc(&oi[1], cg);
                let obase = b.mul_add(&g, og, None);
                let init = b.fc(0.0, t);
                let red = [og, ws[2], ws[3]];
                let acc = b.for_loop(numel(&red), &[(init, t.clone())], |b, k, acc| {
                    let ri = b.decompose(k, &red);
                    let o = b.add(&obase, &ri[0]);
                    let taps = [0, 1].map(|d| {
                        // num = h + pad - kh·d must be ≥ 0, divisible by s, and num/s < HO.
                        let pad = b.idx(padding[d] as i64);
                        let hp = b.add(&oi[2 + d], &pad);
                        let kd = b.mul_add(&ri[1 + d], dilation[d], None);
                        let num = b.sub(&hp, &kd);
                        let z = b.idx(0);
                        let nonneg = b.cmpi("sge", &num, &z, "index");
                        let numc = b.select(&nonneg, &num, &z, "index");
                        let rem = b.remc(&numc, stride[d]);
                        let div = b.cmpi("eq", &rem, &z, "index");
                        let q = b.divc(&numc, stride[d]);
                        let inr = in_range(b, &q, ds[2 + d]);
                        let v = and(b, &nonneg, &div);
                        let v = and(b, &v, &inr);
                        (q, v)
                    });
                    let (ok, hh, ww) = clamp_tap(b, taps);
                    let di = b.compose(&[oi[0].clone(), o.clone(), hh, ww], &ds);
                    let wi = b.compose(&[o, cl.clone(), ri[1].clone(), ri[2].clone()], &ws);
                    let dv = dy.at(b, &di);
                    let wv = w.at(b, &wi);
                    vec![masked_mac(b, &acc[0], &ok, &dv, &wv, t)]
                });
                acc[0].clone()
            })]
        }
        Op::Conv2dGradWeight {
            stride,
            padding,
            dilation,
            groups,
            ..
        } => {
            float_only(e)?;
            let (xs, ds) = (shapes[0].clone(), shapes[1].clone());
            let (stride, padding, dilation, groups) = (*stride, *padding, *dilation, *groups);
            let (x, dy) = (srcs[0].clone(), srcs[1].clone());
            let og = rshape[0] / groups;
            let cg = rshape[1];
            vec![e.gen_out(n, t, |b, _| {
                // dw[o,c,kh,kw] = Σ_{n,ho,wo} x[n, g·Cg + c, ho·s + kh·d - pad, …] · dy[n,o,ho,wo].
                let p = b.op("linalg.index 0 : index");
                let oi = b.decompose(&p, &rshape);
                let g = b.divc(&oi[0], og);
                let c = b.mul_add(&g, cg, Some(&oi[1]));
                let init = b.fc(0.0, t);
                let red = [ds[0], ds[2], ds[3]];
                let acc = b.for_loop(numel(&red), &[(init, t.clone())], |b, k, acc| {
                    let ri = b.decompose(k, &red);
                    let taps = [0, 1].map(|d| {
                        let a = b.mul_add(&ri[1 + d], stride[d], None);
                        let tap = b.mul_add(&oi[2 + d], dilation[d], Some(&a));
                        let pad = b.idx(padding[d] as i64);
                        let pos = b.sub(&tap, &pad);
                        let v = in_range(b, &pos, xs[2 + d]);
                        (pos, v)
                    });
                    let (ok, hh, ww) = clamp_tap(b, taps);
                    let xi = b.compose(&[ri[0].clone(), c.clone(), hh, ww], &xs);
                    let di = b.compose(
                        &[ri[0].clone(), oi[0].clone(), ri[1].clone(), ri[2].clone()],
                        &ds,
                    );
                    let xv = x.at(b, &xi);
                    let dv = dy.at(b, &di);
                    vec![masked_mac(b, &acc[0], &ok, &xv, &dv, t)]
                });
                acc[0].clone()
            })]
        }
        Op::Pool2d {
            kind,
            window,
            stride,
            padding,
            count_include_pad,
        } => {
            float_only(e)?;
            let xs = shapes[0].clone();
            let (kind, window, stride, padding, cip) =
                (*kind, *window, *stride, *padding, *count_include_pad);
            let x = srcs[0].clone();
            vec![e.gen_out(n, t, |b, _| {
                let p = b.op("linalg.index 0 : index");
                let oi = b.decompose(&p, &rshape);
                let (init, cnt0) = match kind {
                    PoolKind::Max => (b.fc(f64::NEG_INFINITY, t), b.fc(0.0, t)),
                    PoolKind::Avg => (b.fc(0.0, t), b.fc(0.0, t)),
                };
                let tys = [(init, t.clone()), (cnt0, t.clone())];
                let r = b.for_loop(window[0] * window[1], &tys, |b, k, acc| {
                    let ri = b.decompose(k, &window);
                    let (ok, hh, ww) = window_tap(b, &oi, &ri, stride, padding, &xs);
                    let xi = b.compose(&[oi[0].clone(), oi[1].clone(), hh, ww], &xs);
                    let v = x.at(b, &xi);
                    let next = match kind {
                        PoolKind::Max => b.bin("arith.maximumf", &acc[0], &v, t),
                        PoolKind::Avg => b.bin("arith.addf", &acc[0], &v, t),
                    };
                    let next = b.select(&ok, &next, &acc[0], t);
                    let one = b.fc(1.0, t);
                    let c1 = b.bin("arith.addf", &acc[1], &one, t);
                    let cnt = b.select(&ok, &c1, &acc[1], t);
                    vec![next, cnt]
                });
                match kind {
                    PoolKind::Max => r[0].clone(),
                    PoolKind::Avg => {
                        let div = if cip {
                            b.fc((window[0] * window[1]) as f64, t)
                        } else {
                            r[1].clone()
                        };
                        b.bin("arith.divf", &r[0], &div, t)
                    }
                }
            })]
        }
        Op::AvgPool2dGrad {
            window,
            stride,
            padding,
            count_include_pad,
            ..
        } => {
            float_only(e)?;
            let ds = shapes[0].clone();
            let (window, stride, padding, cip) = (*window, *stride, *padding, *count_include_pad);
            let dy = srcs[0].clone();
            vec![e.gen_out(n, t, |b, _| {
                // dx[h,w] = Σ over windows (ho,wo) covering (h,w): dy[ho,wo] / divisor(ho,wo).
                let p = b.op("linalg.index 0 : index");
                let oi = b.decompose(&p, &rshape);
                let init = b.fc(0.0, t);
                let r = b.for_loop(window[0] * window[1], &[(init, t.clone())], |b, k, acc| {
                    let ri = b.decompose(k, &window);
                    let (ok, wo) = covering_window(b, &oi, &ri, stride, padding, &ds);
                    let di = b.compose(
                        &[oi[0].clone(), oi[1].clone(), wo[0].clone(), wo[1].clone()],
                        &ds,
                    );
                    let v = dy.at(b, &di);
                    let div = if cip {
                        b.fc((window[0] * window[1]) as f64, t)
                    } else {
                        // In-bounds taps of window (ho, wo): a product of per-axis counts.
                        let mut cnt: Option<String> = None;
                        for d in 0..2 {
                            let start = b.mul_add(&wo[d], stride[d], None);
                            let pad = b.idx(padding[d] as i64);
                            let lo = b.sub(&start, &pad);
                            let z = b.idx(0);
                            let lo_c = b.bin("arith.maxsi", &lo, &z, "index");
                            let win = b.idx(window[d] as i64);
                            let hi = b.add(&lo, &win);
                            let lim = b.idx(rshape[2 + d] as i64);
                            let hi_c = b.bin("arith.minsi", &hi, &lim, "index");
                            let c = b.sub(&hi_c, &lo_c);
                            cnt = Some(match cnt {
                                Some(x) => b.mul(&x, &c),
                                None => c,
                            });
                        }
                        let c = b.index_to(&cnt.expect("two dims"), "i64");
                        b.op(format!("arith.sitofp {c} : i64 to {t}"))
                    };
                    let q = b.bin("arith.divf", &v, &div, t);
                    let zero = b.fc(0.0, t);
                    let q = b.select(&ok, &q, &zero, t);
                    vec![b.bin("arith.addf", &acc[0], &q, t)]
                });
                r[0].clone()
            })]
        }
        Op::MaxPool2dGrad {
            window,
            stride,
            padding,
        } => {
            float_only(e)?;
            let (xs, ds) = (shapes[0].clone(), shapes[1].clone());
            let (window, stride, padding) = (*window, *stride, *padding);
            let (x, dy) = (srcs[0].clone(), srcs[1].clone());
            vec![e.gen_out(n, t, |b, _| {
                // dx[h,w] = Σ over windows covering (h,w) whose first maximum is at (h,w).
                let p = b.op("linalg.index 0 : index");
                let oi = b.decompose(&p, &rshape);
                let init = b.fc(0.0, t);
                let r = b.for_loop(window[0] * window[1], &[(init, t.clone())], |b, k, acc| {
                    let ri = b.decompose(k, &window);
                    let (ok, wo) = covering_window(b, &oi, &ri, stride, padding, &ds);
                    // The window's first maximum (flat tap index in x).
                    let ninf = b.fc(f64::NEG_INFINITY, t);
                    let none = b.idx(-1);
                    let best = b.for_loop(
                        window[0] * window[1],
                        &[(ninf, t.clone()), (none, "index".into())],
                        |b, k2, acc2| {
                            let r2 = b.decompose(k2, &window);
                            let (ok2, hh, ww) =
                                window_tap(b, &wo_full(&oi, &wo), &r2, stride, padding, &xs);
                            let xi = b.compose(&[oi[0].clone(), oi[1].clone(), hh, ww], &xs);
                            let v = x.at(b, &xi);
                            let gt = b.cmpf("ogt", &v, &acc2[0], t);
                            let none = none_idx(b);
                            let first = b.cmpi("eq", &acc2[1], &none, "index");
                            let better = b.bin("arith.ori", &gt, &first, "i1");
                            let take = and(b, &ok2, &better);
                            let nv = b.select(&take, &v, &acc2[0], t);
                            let ni = b.select(&take, &xi, &acc2[1], "index");
                            vec![nv, ni]
                        },
                    );
                    let me = b.compose(&oi, &xs);
                    let hit = b.cmpi("eq", &best[1], &me, "index");
                    let ok = and(b, &ok, &hit);
                    let di = b.compose(
                        &[oi[0].clone(), oi[1].clone(), wo[0].clone(), wo[1].clone()],
                        &ds,
                    );
                    let v = dy.at(b, &di);
                    let zero = b.fc(0.0, t);
                    let v = b.select(&ok, &v, &zero, t);
                    vec![b.bin("arith.addf", &acc[0], &v, t)]
                });
                r[0].clone()
            })]
        }
        Op::Gather { axis } => {
            let ts = shapes[0].clone();
            let outer = numel(&ts[..*axis]);
            let extent = ts[*axis];
            let inner = numel(&ts[axis + 1..]);
            let jn = srcs[1].n;
            let (table, idx) = (srcs[0].clone(), srcs[1].clone());
            let _ = outer;
            vec![e.gen_out(n, t, |b, _| {
                let p = b.op("linalg.index 0 : index");
                let ii = b.remc(&p, inner);
                let q = b.divc(&p, inner);
                let j = b.remc(&q, jn);
                let o = b.divc(&q, jn);
                let iv = idx.at(b, &j);
                let ivx = b.to_index(&iv, &idx.ty);
                let row = b.mul_add(&o, extent, Some(&ivx));
                let ti = b.mul_add(&row, inner, Some(&ii));
                table.at(b, &ti)
            })]
        }
        Op::ScatterAdd { axis } => {
            // out[o,k,i] = base[o,k,i] + Σ_j [idx[j] = k] upd[o,j,i], in j order.
            //
            // Three launches, so that no output element loops over every update: `head[k]` is the
            // first j with idx[j] = k and `next[j]` the next j' > j with idx[j'] = idx[j] (jn:
            // none), each found by one thread per k or j; then each output element walks its own
            // chain, adding only the updates that hit it, in increasing j (the interpreter's
            // order, so the sums are the same to the bit, with no atomics). An index outside
            // [0, extent) (which the interpreter rejects) is in no output's chain.
            let bs = shapes[0].clone();
            let extent = bs[*axis];
            let inner = numel(&bs[axis + 1..]);
            let jn = srcs[1].n;
            let (base, idx, upd) = (srcs[0].clone(), srcs[1].clone(), srcs[2].clone());
            let f = is_float(t);
            let lty = if jn < i32::MAX as usize { "i32" } else { "i64" };
            let head = e.gen_out(extent, lty, |b, _| {
                let k = b.op("linalg.index 0 : index");
                let none = b.ic(jn as i64, lty);
                let r = b.for_loop(jn, &[(none.clone(), lty.to_string())], |b, j, acc| {
                    let iv = idx.at(b, j);
                    let ivx = b.to_index(&iv, &idx.ty);
                    let hit = b.cmpi("eq", &ivx, &k, "index");
                    let first = b.cmpi("eq", &acc[0], &none, lty);
                    let take = and(b, &hit, &first);
                    let jv = b.index_to(j, lty);
                    vec![b.select(&take, &jv, &acc[0], lty)]
                });
                r[0].clone()
            });
            let next = e.gen_out(jn, lty, |b, _| {
                let me = b.op("linalg.index 0 : index");
                let mv = idx.at(b, &me);
                let none = b.ic(jn as i64, lty);
                let r = b.for_loop(jn, &[(none.clone(), lty.to_string())], |b, j, acc| {
                    let iv = idx.at(b, j);
                    let same = b.cmpi("eq", &iv, &mv, &idx.ty);
                    let later = b.cmpi("sgt", j, &me, "index");
                    let first = b.cmpi("eq", &acc[0], &none, lty);
                    let take = and(b, &same, &later);
                    let take = and(b, &take, &first);
                    let jv = b.index_to(j, lty);
                    vec![b.select(&take, &jv, &acc[0], lty)]
                });
                r[0].clone()
            });
            vec![e.gen_out(n, t, |b, _| {
                let p = b.op("linalg.index 0 : index");
                let ii = b.remc(&p, inner);
                let q = b.divc(&p, inner);
                let kk = b.remc(&q, extent);
                let o = b.divc(&q, extent);
                let b0 = base.at(b, &p);
                let h = b.extract(&head, &kk, extent, lty);
                let j0 = b.to_index(&h, lty);
                let r = b.while_loop(
                    &[(j0, "index".into()), (b0, t.clone())],
                    |b, c| {
                        let cn = b.idx(jn as i64);
                        b.cmpi("slt", &c[0], &cn, "index")
                    },
                    |b, c| {
                        let row = b.mul_add(&o, jn, Some(&c[0]));
                        let ui = b.mul_add(&row, inner, Some(&ii));
                        let u = upd.at(b, &ui);
                        let s = b.bin(if f { "arith.addf" } else { "arith.addi" }, &c[1], &u, t);
                        let nj = b.extract(&next, &c[0], jn, lty);
                        vec![b.to_index(&nj, lty), s]
                    },
                );
                r[1].clone()
            })]
        }
        Op::Concat { axis } => {
            let inner = numel(&rshape[axis + 1..]);
            let total = rshape[*axis];
            let sizes: Vec<usize> = shapes.iter().map(|s| s[*axis]).collect();
            let srcs = srcs.clone();
            vec![e.gen_out(n, t, |b, _| {
                let p = b.op("linalg.index 0 : index");
                let ii = b.remc(&p, inner);
                let q = b.divc(&p, inner);
                let a = b.remc(&q, total);
                let o = b.divc(&q, total);
                let mut result: Option<String> = None;
                let mut off = 0usize;
                for (s, &size) in srcs.iter().zip(&sizes) {
                    // Clamped position inside this piece; selected where a ≥ its offset.
                    let offc = b.idx(off as i64);
                    let local = b.sub(&a, &offc);
                    let z = b.idx(0);
                    let top = b.idx(size as i64 - 1);
                    let l = b.bin("arith.maxsi", &local, &z, "index");
                    let l = b.bin("arith.minsi", &l, &top, "index");
                    let row = b.mul_add(&o, size, Some(&l));
                    let si = b.mul_add(&row, inner, Some(&ii));
                    let v = s.at(b, &si);
                    result = Some(match result {
                        None => v,
                        Some(prev) => {
                            let ge = b.cmpi("sge", &a, &offc, "index");
                            b.select(&ge, &v, &prev, t)
                        }
                    });
                    off += size;
                }
                result.expect("at least one operand")
            })]
        }
        Op::Pad { low, value, .. } => {
            let xs = shapes[0].clone();
            let low = low.clone();
            let value = *value;
            let x = srcs[0].clone();
            vec![e.gen_out(n, t, |b, _| {
                let p = b.op("linalg.index 0 : index");
                let oi = b.decompose(&p, &rshape);
                let mut ok: Option<String> = None;
                let mut idx = Vec::new();
                for d in 0..xs.len() {
                    let l = b.idx(low[d] as i64);
                    let c = b.sub(&oi[d], &l);
                    let v = in_range(b, &c, xs[d]);
                    let z = b.idx(0);
                    idx.push(b.select(&v, &c, &z, "index"));
                    ok = Some(match ok {
                        Some(o) => and(b, &o, &v),
                        None => v,
                    });
                }
                let xi = b.compose(&idx, &xs);
                let v = x.at(b, &xi);
                let fill = b.constant(value, t);
                match ok {
                    Some(ok) => b.select(&ok, &v, &fill, t),
                    None => v,
                }
            })]
        }
        Op::Softmax { axis } | Op::LogSoftmax { axis } => {
            float_only(e)?;
            let log = matches!(op, Op::LogSoftmax { .. });
            let (m, s, row) = row_stats(e, &srcs[0], &rshape, *axis, t, RowKind::MaxSumExp);
            let x = srcs[0].clone();
            let ms = [m, s];
            vec![e.gen_out(n, t, |b, _| {
                let p = b.op("linalg.index 0 : index");
                let r = row.row_of(b, &p);
                let mx = b.extract(&ms[0].t, &r, ms[0].n, t);
                let sm = b.extract(&ms[1].t, &r, ms[1].n, t);
                let xv = x.at(b, &p);
                let d = b.bin("arith.subf", &xv, &mx, t);
                if log {
                    let l = unary_f32(b, &sm, t, mathlib_log);
                    b.bin("arith.subf", &d, &l, t)
                } else {
                    let ex = unary_f32(b, &d, t, mathlib_exp);
                    b.bin("arith.divf", &ex, &sm, t)
                }
            })]
        }
        Op::LayerNorm { eps } | Op::RmsNorm { eps } => {
            float_only(e)?;
            let layer = matches!(op, Op::LayerNorm { .. });
            let axis = rshape.len() - 1;
            let kind = if layer {
                RowKind::MeanVar
            } else {
                RowKind::MeanSquare
            };
            let (m, v, row) = row_stats(e, &srcs[0], &rshape, axis, t, kind);
            let x = srcs[0].clone();
            let eps = *eps;
            let mv = [m, v];
            vec![e.gen_out(n, t, |b, _| {
                let p = b.op("linalg.index 0 : index");
                let r = row.row_of(b, &p);
                let mean = b.extract(&mv[0].t, &r, mv[0].n, t);
                let var = b.extract(&mv[1].t, &r, mv[1].n, t);
                let xv = x.at(b, &p);
                let c = if layer {
                    b.bin("arith.subf", &xv, &mean, t)
                } else {
                    xv
                };
                let ep = b.fc(eps, t);
                let d = b.bin("arith.addf", &var, &ep, t);
                let sq = b.un("llvm.intr.sqrt", &d, t);
                b.bin("arith.divf", &c, &sq, t)
            })]
        }
        Op::CrossEntropy => {
            float_only(e)?;
            let ls = shapes[0].clone();
            let axis = ls.len() - 1;
            let (m, s, _) = row_stats(e, &srcs[0], &ls, axis, t, RowKind::MaxSumExp);
            let (x, lab) = (srcs[0].clone(), srcs[1].clone());
            let c = ls[axis];
            vec![e.gen_out(n, t, |b, _| {
                // -log_softmax(x)[label] = log(Σ exp(x - max)) + max - x[label].
                let p = b.op("linalg.index 0 : index");
                let mx = b.extract(&m.t, &p, m.n, t);
                let sm = b.extract(&s.t, &p, s.n, t);
                let lv = lab.at(b, &p);
                let li = b.to_index(&lv, &lab.ty);
                let xi = b.mul_add(&p, c, Some(&li));
                let xv = x.at(b, &xi);
                let l = unary_f32(b, &sm, t, mathlib_log);
                let a = b.bin("arith.addf", &l, &mx, t);
                b.bin("arith.subf", &a, &xv, t)
            })]
        }
        Op::Ste(SteOp::ArgmaxOneHot { axis }) => {
            float_only(e)?;
            // Rows along `axis`: the index of the first maximum (as a float, exact below 2^24
            // elements), then 1 where the element's position along the axis is that index.
            let axis = *axis;
            let n_axis = rshape[axis];
            let inner = numel(&rshape[axis + 1..]);
            let rows = n / n_axis.max(1);
            let row = RowMap { n_axis, inner };
            let x = srcs[0].clone();
            let tt = t.to_string();
            let best = e.gen_out(rows, t, |b, _| {
                let r = b.op("linalg.index 0 : index");
                let ii = b.remc(&r, inner);
                let o = b.divc(&r, inner);
                let base = b.mul_add(&o, n_axis * inner, Some(&ii));
                let init_v = b.fc(f64::NEG_INFINITY, &tt);
                let init_i = b.fc(0.0, &tt);
                let acc = b.for_loop(
                    n_axis,
                    &[(init_v, tt.clone()), (init_i, tt.clone())],
                    |b, k, acc| {
                        let i = b.mul_add(k, inner, Some(&base));
                        let v = x.at(b, &i);
                        let ki = b.index_to(k, "i64");
                        let kf = b.op(format!("arith.sitofp {ki} : i64 to {tt}"));
                        // Strictly greater: the first maximum wins.
                        let gt = b.cmpf("ogt", &v, &acc[0], &tt);
                        vec![
                            b.select(&gt, &v, &acc[0], &tt),
                            b.select(&gt, &kf, &acc[1], &tt),
                        ]
                    },
                );
                acc[1].clone()
            });
            let best = Src {
                t: best,
                n: rows,
                ty: t.to_string(),
            };
            vec![e.gen_out(n, t, |b, _| {
                let p = b.op("linalg.index 0 : index");
                let r = row.row_of(b, &p);
                let bi = b.extract(&best.t, &r, best.n, &tt);
                let q = b.divc(&p, inner);
                let k = b.remc(&q, n_axis);
                let ki = b.index_to(&k, "i64");
                let kf = b.op(format!("arith.sitofp {ki} : i64 to {tt}"));
                let hit = b.cmpf("oeq", &kf, &bi, &tt);
                let one = b.fc(1.0, &tt);
                let zero = b.fc(0.0, &tt);
                b.select(&hit, &one, &zero, &tt)
            })]
        }
        other => {
            return Err(e.error(
                other,
                &rty.to_string(),
                "no MLIR lowering for this op (internal: not routed)",
            ))
        }
    })
}

fn none_idx(b: &mut Body) -> String {
    b.idx(-1)
}

/// The multi-index `[n, c, ho, wo]` of a window from an element's `[n, c, …]` and `wo`.
fn wo_full(oi: &[String], wo: &[String]) -> Vec<String> {
    vec![oi[0].clone(), oi[1].clone(), wo[0].clone(), wo[1].clone()]
}

/// The input tap `(ok, h, w)` of tap `ri` of the window at `oi[2..4]` (clamped to 0 when out of
/// bounds).
fn window_tap(
    b: &mut Body,
    oi: &[String],
    ri: &[String],
    stride: [usize; 2],
    padding: [usize; 4],
    xs: &[usize],
) -> (String, String, String) {
    let taps = [0, 1].map(|d| {
        let a = b.mul_add(&oi[2 + d], stride[d], Some(&ri[d]));
        let pad = b.idx(padding[d] as i64);
        let pos = b.sub(&a, &pad);
        let v = in_range(b, &pos, xs[2 + d]);
        (pos, v)
    });
    clamp_tap(b, taps)
}

/// A 2-D tap from its per-dimension `(coordinate, in-bounds flag)`: the flag of both, and both
/// coordinates clamped to 0 where the tap is outside, so the read stays in bounds (its value is
/// masked out by the flag).
fn clamp_tap(b: &mut Body, taps: [(String, String); 2]) -> (String, String, String) {
    let ok = and(b, &taps[0].1, &taps[1].1);
    let z = b.idx(0);
    let hh = b.select(&ok, &taps[0].0, &z, "index");
    let ww = b.select(&ok, &taps[1].0, &z, "index");
    (ok, hh, ww)
}

/// `acc + (ok ? x·y : 0)` in the float type `t`.
fn masked_mac(b: &mut Body, acc: &str, ok: &str, x: &str, y: &str, t: &str) -> String {
    let prod = b.bin("arith.mulf", x, y, t);
    let zero = b.fc(0.0, t);
    let prod = b.select(ok, &prod, &zero, t);
    b.bin("arith.addf", acc, &prod, t)
}

/// The window `(ho, wo)` whose tap `ri` lands on input position `oi[2..4]`, and whether it
/// exists (window indices clamped to 0 when not).
fn covering_window(
    b: &mut Body,
    oi: &[String],
    ri: &[String],
    stride: [usize; 2],
    padding: [usize; 4],
    ds: &[usize],
) -> (String, Vec<String>) {
    let mut wo = Vec::new();
    let mut ok: Option<String> = None;
    for d in 0..2 {
        let pad = b.idx(padding[d] as i64);
        let hp = b.add(&oi[2 + d], &pad);
        let num = b.sub(&hp, &ri[d]);
        let z = b.idx(0);
        let nonneg = b.cmpi("sge", &num, &z, "index");
        let numc = b.select(&nonneg, &num, &z, "index");
        let rem = b.remc(&numc, stride[d]);
        let div = b.cmpi("eq", &rem, &z, "index");
        let q = b.divc(&numc, stride[d]);
        let inr = in_range(b, &q, ds[2 + d]);
        let v = and(b, &nonneg, &div);
        let v = and(b, &v, &inr);
        ok = Some(match ok {
            Some(o) => and(b, &o, &v),
            None => v,
        });
        wo.push(q);
    }
    let ok = ok.expect("two dims");
    let z = b.idx(0);
    let wo = wo
        .into_iter()
        .map(|q| b.select(&ok, &q, &z, "index"))
        .collect();
    (ok, wo)
}

fn mathlib_exp(b: &mut Body, x: &str) -> String {
    crate::mathlib::exp(b, x)
}

fn mathlib_log(b: &mut Body, x: &str) -> String {
    crate::mathlib::log(b, x)
}

/// Applies an f32 math function to a value of float type `ty`.
fn unary_f32(b: &mut Body, x: &str, ty: &str, f: fn(&mut Body, &str) -> String) -> String {
    if ty == "f32" {
        return f(b, x);
    }
    let (to, back) = if ty == "f64" {
        ("arith.truncf", "arith.extf")
    } else {
        ("arith.extf", "arith.truncf")
    };
    let e = b.op(format!("{to} {x} : {ty} to f32"));
    let r = f(b, &e);
    b.op(format!("{back} {r} : f32 to {ty}"))
}

#[derive(Clone, Copy, PartialEq)]
enum RowKind {
    /// `max` and `Σ exp(x - max)`.
    MaxSumExp,
    /// `mean` and the biased variance.
    MeanVar,
    /// 0 and `mean(x²)`.
    MeanSquare,
}

/// How an element's flat index maps to its row (the shape without `axis`).
struct RowMap {
    n_axis: usize,
    inner: usize,
}

impl RowMap {
    fn row_of(&self, b: &mut Body, p: &str) -> String {
        let ii = b.remc(p, self.inner);
        let q = b.divc(p, self.inner * self.n_axis);
        b.mul_add(&q, self.inner, Some(&ii))
    }
}

/// Rows at least this long, and contiguous (`axis` last), are reduced by several threads each
/// ([`row_parts`]).
const SPLIT_ROW_MIN: usize = 2048;

/// How many threads reduce one row of `n_axis` elements `inner` apart: 1 for short or strided
/// rows; for long contiguous ones (GPT's vocabulary-wide softmax and cross-entropy: 2048 rows of
/// 50257) up to 64, each taking every `parts`-th element so that a warp's reads are contiguous.
fn row_parts(n_axis: usize, inner: usize) -> usize {
    if inner == 1 && n_axis >= SPLIT_ROW_MIN {
        (n_axis / 256).clamp(2, 64)
    } else {
        1
    }
}

/// The value of position k of row r, given the row's prelude values: `term(b, r, pre, k)`.
type RowTerm<'a> = dyn Fn(&mut Body, &str, &[String], &str) -> String + 'a;

/// A reduction over each of `rows` rows: `prelude(b, r)` computes per-row values once,
/// `term(b, r, pre, k)` the value of position k, combined with `op` from `init`; `finish(b, acc)`
/// gives the row's result. With `parts` > 1, `parts` threads per row each reduce the positions
/// `lane, lane + parts, …` (the identity past the end) into a temporary, and one thread per row
/// combines those partial results in lane order before `finish`.
#[allow(clippy::too_many_arguments)]
fn row_reduce(
    e: &mut Emitter,
    rows: usize,
    n_axis: usize,
    parts: usize,
    t: &str,
    init: f64,
    op: &str,
    prelude: &dyn Fn(&mut Body, &str) -> Vec<String>,
    term: &RowTerm,
    finish: &dyn Fn(&mut Body, &str) -> String,
) -> String {
    let tt = t.to_string();
    if parts == 1 {
        return e.gen_out(rows, t, |b, _| {
            let r = b.op("linalg.index 0 : index");
            let pre = prelude(b, &r);
            let i0 = b.fc(init, &tt);
            let acc = b.for_loop(n_axis, &[(i0, tt.clone())], |b, k, acc| {
                let v = term(b, &r, &pre, k);
                vec![b.bin(op, &acc[0], &v, &tt)]
            });
            finish(b, &acc[0])
        });
    }
    let chunks = n_axis.div_ceil(parts);
    let partial = e.gen_out(rows * parts, t, |b, _| {
        let p = b.op("linalg.index 0 : index");
        let lane = b.remc(&p, parts);
        let r = b.divc(&p, parts);
        let pre = prelude(b, &r);
        let i0 = b.fc(init, &tt);
        let last = b.idx(n_axis as i64 - 1);
        let acc = b.for_loop(chunks, &[(i0.clone(), tt.clone())], |b, c, acc| {
            let k = b.mul_add(c, parts, Some(&lane));
            let ok = b.cmpi("ule", &k, &last, "index");
            let kc = b.bin("arith.minui", &k, &last, "index");
            let v = term(b, &r, &pre, &kc);
            let v = b.select(&ok, &v, &i0, &tt);
            vec![b.bin(op, &acc[0], &v, &tt)]
        });
        acc[0].clone()
    });
    e.gen_out(rows, t, |b, _| {
        let r = b.op("linalg.index 0 : index");
        let i0 = b.fc(init, &tt);
        let acc = b.for_loop(parts, &[(i0, tt.clone())], |b, l, acc| {
            let i = b.mul_add(&r, parts, Some(l));
            let v = b.extract(&partial, &i, rows * parts, &tt);
            vec![b.bin(op, &acc[0], &v, &tt)]
        });
        finish(b, &acc[0])
    })
}

/// Two reductions over the rows of `x` along `axis`: the statistics of `kind`.
fn row_stats(
    e: &mut Emitter,
    x: &Src,
    shape: &[usize],
    axis: usize,
    t: &str,
    kind: RowKind,
) -> (Src, Src, RowMap) {
    let n_axis = shape[axis];
    let inner = numel(&shape[axis + 1..]);
    let rows = numel(shape) / n_axis.max(1);
    let row = RowMap { n_axis, inner };
    let parts = row_parts(n_axis, inner);
    let at = |b: &mut Body, r: &str, k: &str| -> String {
        // Element k of row r: (r / inner)·n·inner + k·inner + r mod inner.
        let ii = b.remc(r, inner);
        let o = b.divc(r, inner);
        let base = b.mul_add(&o, n_axis * inner, Some(&ii));
        let i = b.mul_add(k, inner, Some(&base));
        x.at(b, &i)
    };
    let tt = t.to_string();
    let mean = |b: &mut Body, acc: &str| -> String {
        let c = b.fc(n_axis as f64, &tt);
        b.bin("arith.divf", acc, &c, &tt)
    };
    let (init, op) = match kind {
        RowKind::MaxSumExp => (f64::NEG_INFINITY, "arith.maximumf"),
        _ => (0.0, "arith.addf"),
    };
    let first = row_reduce(
        e,
        rows,
        n_axis,
        parts,
        t,
        init,
        op,
        &|_, _| Vec::new(),
        &|b, r, _, k| {
            let v = at(b, r, k);
            if kind == RowKind::MeanSquare {
                b.bin("arith.mulf", &v, &v, &tt)
            } else {
                v
            }
        },
        &|b, acc| {
            if kind == RowKind::MaxSumExp {
                acc.to_string()
            } else {
                mean(b, acc)
            }
        },
    );
    let first_src = Src {
        t: first.clone(),
        n: rows,
        ty: t.to_string(),
    };
    let second = if kind == RowKind::MeanSquare {
        // mean(x²) is the statistic itself; the first output is unused by rms_norm.
        first.clone()
    } else {
        let fs = first_src.clone();
        row_reduce(
            e,
            rows,
            n_axis,
            parts,
            t,
            0.0,
            "arith.addf",
            &|b, r| vec![b.extract(&fs.t, r, fs.n, &tt)],
            &|b, r, pre, k| {
                let v = at(b, r, k);
                let d = b.bin("arith.subf", &v, &pre[0], &tt);
                if kind == RowKind::MaxSumExp {
                    unary_f32(b, &d, &tt, mathlib_exp)
                } else {
                    b.bin("arith.mulf", &d, &d, &tt)
                }
            },
            &|b, acc| {
                if kind == RowKind::MaxSumExp {
                    acc.to_string()
                } else {
                    mean(b, acc)
                }
            },
        )
    };
    (
        first_src,
        Src {
            t: second,
            n: rows,
            ty: t.to_string(),
        },
        row,
    )
}
