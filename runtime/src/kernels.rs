//! The kernels that are not fused loops: GEMMs, convolutions, pools, reductions, normalisations,
//! indexing and copies. Each reads contiguous row-major buffers and writes one that overlaps none
//! of them (the planner guarantees it).

use cleave_ir::{DType, PoolKind, ReduceKind};

use crate::f32gemm::{widen_row, Half};
use crate::gemm::{sgemm, sgemm_batched, sgemm_scaled};
use crate::plan::{BufRef, Mem};
use crate::vmath::exp_f32;

/// Maximum that propagates NaN.
pub(crate) fn nan_max(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else {
        a.max(b)
    }
}

/// Minimum that propagates NaN.
pub(crate) fn nan_min(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else {
        a.min(b)
    }
}

/// The geometry of a convolution.
#[derive(Clone, Debug)]
pub(crate) struct ConvGeo {
    pub x: [usize; 4],
    pub w: [usize; 4],
    pub out: [usize; 2],
    pub stride: [usize; 2],
    pub padding: [usize; 4],
    pub dilation: [usize; 2],
    pub groups: usize,
}

/// The geometry of a pool.
#[derive(Clone, Debug)]
pub(crate) struct PoolGeo {
    pub x: [usize; 4],
    pub out: [usize; 2],
    pub window: [usize; 2],
    pub stride: [usize; 2],
    pub padding: [usize; 4],
}

#[derive(Debug)]
pub(crate) enum OpKernel {
    MatMul {
        a: BufRef,
        b: BufRef,
        out: BufRef,
        batch: usize,
        mkn: (usize, usize, usize),
        tl: bool,
        tr: bool,
        /// `Some(s)`: `out ← out + s·a·b` (a folded SGD update, `s = −lr`), else `out ← a·b`.
        update: Option<f32>,
    },
    Conv2d {
        x: BufRef,
        w: BufRef,
        out: BufRef,
        geo: ConvGeo,
        cols: Vec<f32>,
    },
    Conv2dGradInput {
        dy: BufRef,
        w: BufRef,
        out: BufRef,
        geo: ConvGeo,
        cols: Vec<f32>,
    },
    Conv2dGradWeight {
        x: BufRef,
        dy: BufRef,
        out: BufRef,
        geo: ConvGeo,
        cols: Vec<f32>,
    },
    Pool {
        x: BufRef,
        out: BufRef,
        kind: PoolKind,
        geo: PoolGeo,
        count_include_pad: bool,
    },
    MaxPoolGrad {
        x: BufRef,
        dy: BufRef,
        out: BufRef,
        geo: PoolGeo,
    },
    AvgPoolGrad {
        dy: BufRef,
        out: BufRef,
        geo: PoolGeo,
        count_include_pad: bool,
    },
    Reduce {
        x: BufRef,
        out: BufRef,
        kind: ReduceKind,
        shape: Vec<usize>,
        axes: Vec<usize>,
        /// The output's stride per input dimension (0 on reduced axes), for the general path.
        out_strides: Vec<usize>,
        /// The general path's f64 accumulators, kept between runs (sized at the first).
        acc: Vec<f64>,
    },
    Softmax {
        x: BufRef,
        out: BufRef,
        dims: (usize, usize, usize),
        log: bool,
    },
    Norm {
        x: BufRef,
        out: BufRef,
        n: usize,
        eps: f64,
        layer: bool,
    },
    CrossEntropy {
        logits: BufRef,
        labels: BufRef,
        out: BufRef,
        c: usize,
    },
    Gather {
        table: BufRef,
        idx: BufRef,
        out: BufRef,
        dims: (usize, usize, usize),
    },
    ScatterAdd {
        base: BufRef,
        idx: BufRef,
        upd: BufRef,
        out: BufRef,
        dims: (usize, usize, usize),
    },
    /// Concatenation: per outer index, each input contributes `chunks[k]` elements.
    Concat {
        ins: Vec<BufRef>,
        out: BufRef,
        outer: usize,
        chunks: Vec<usize>,
    },
    /// Split: per outer index, each output takes `chunks[k]` elements.
    Split {
        x: BufRef,
        outs: Vec<BufRef>,
        outer: usize,
        chunks: Vec<usize>,
    },
    Pad {
        x: BufRef,
        out: BufRef,
        in_shape: Vec<usize>,
        out_shape: Vec<usize>,
        low: Vec<usize>,
        value: f64,
    },
    OneHot {
        idx: BufRef,
        out: BufRef,
        depth: usize,
    },
    /// `ste_argmax_one_hot` (f32): 1 at the first maximum along the axis, 0 elsewhere.
    ArgmaxOneHot {
        x: BufRef,
        out: BufRef,
        /// (outer, axis length, inner).
        dims: (usize, usize, usize),
    },
}

fn strides(shape: &[usize]) -> Vec<usize> {
    cleave_ir::types::strides(shape)
}

/// Calls `f(i, j)` for every position of `shape` in row-major order, `i` the flat position and
/// `j = Σ index[d]·st[d]`.
fn for_each_strided(shape: &[usize], st: &[usize], mut f: impl FnMut(usize, usize)) {
    let n: usize = shape.iter().product();
    if n == 0 {
        return;
    }
    let rank = shape.len();
    debug_assert!(rank <= cleave_ir::MAX_RANK);
    let mut idx = [0usize; cleave_ir::MAX_RANK];
    let mut j = 0;
    for i in 0..n {
        f(i, j);
        for d in (0..rank).rev() {
            idx[d] += 1;
            j += st[d];
            if idx[d] < shape[d] {
                break;
            }
            j -= st[d] * shape[d];
            idx[d] = 0;
        }
    }
}

fn tap(o: usize, stride: usize, pad: usize, t: usize, dil: usize, size: usize) -> Option<usize> {
    (o * stride + t * dil)
        .checked_sub(pad)
        .filter(|&i| i < size)
}

impl ConvGeo {
    fn im2col(&self, x: &[f32], n: usize, g: usize, cols: &mut [f32]) {
        let [_, c, h, wd] = self.x;
        let [_, cg, kh, kw] = self.w;
        let [ho, wo] = self.out;
        let howo = ho * wo;
        for ci in 0..cg {
            let plane = &x[((n * c) + g * cg + ci) * h * wd..][..h * wd];
            for ky in 0..kh {
                for kx in 0..kw {
                    let row = &mut cols[((ci * kh + ky) * kw + kx) * howo..][..howo];
                    for y in 0..ho {
                        let iy = tap(y, self.stride[0], self.padding[0], ky, self.dilation[0], h);
                        for xo in 0..wo {
                            let ix = tap(
                                xo,
                                self.stride[1],
                                self.padding[1],
                                kx,
                                self.dilation[1],
                                wd,
                            );
                            row[y * wo + xo] = match (iy, ix) {
                                (Some(iy), Some(ix)) => plane[iy * wd + ix],
                                _ => 0.0,
                            };
                        }
                    }
                }
            }
        }
    }

    fn col2im(&self, cols: &[f32], n: usize, g: usize, dx: &mut [f32]) {
        let [_, c, h, wd] = self.x;
        let [_, cg, kh, kw] = self.w;
        let [ho, wo] = self.out;
        let howo = ho * wo;
        for ci in 0..cg {
            let plane = &mut dx[((n * c) + g * cg + ci) * h * wd..][..h * wd];
            for ky in 0..kh {
                for kx in 0..kw {
                    let row = &cols[((ci * kh + ky) * kw + kx) * howo..][..howo];
                    for y in 0..ho {
                        let Some(iy) =
                            tap(y, self.stride[0], self.padding[0], ky, self.dilation[0], h)
                        else {
                            continue;
                        };
                        for xo in 0..wo {
                            if let Some(ix) = tap(
                                xo,
                                self.stride[1],
                                self.padding[1],
                                kx,
                                self.dilation[1],
                                wd,
                            ) {
                                plane[iy * wd + ix] += row[y * wo + xo];
                            }
                        }
                    }
                }
            }
        }
    }

    fn cols_len(&self) -> usize {
        self.w[1] * self.w[2] * self.w[3] * self.out[0] * self.out[1]
    }
}

pub(crate) fn conv_scratch(geo: &ConvGeo) -> Vec<f32> {
    vec![0.0; geo.cols_len()]
}

impl PoolGeo {
    /// Calls `f(window_index, positions)` with the in-bounds input positions of every window.
    fn for_each_window(&self, mut f: impl FnMut(usize, &[usize])) {
        let [n, c, h, wd] = self.x;
        let mut pos = Vec::with_capacity(self.window[0] * self.window[1]);
        let mut at = 0;
        for plane in 0..n * c {
            for y in 0..self.out[0] {
                for xo in 0..self.out[1] {
                    pos.clear();
                    for ky in 0..self.window[0] {
                        let Some(iy) = tap(y, self.stride[0], self.padding[0], ky, 1, h) else {
                            continue;
                        };
                        for kx in 0..self.window[1] {
                            if let Some(ix) = tap(xo, self.stride[1], self.padding[1], kx, 1, wd) {
                                pos.push((plane * h + iy) * wd + ix);
                            }
                        }
                    }
                    f(at, &pos);
                    at += 1;
                }
            }
        }
    }
}

/// Copies with an element type of 4 bytes (`f32`, `i32`) or 1 byte (`bool`).
macro_rules! by_size {
    ($dtype:expr, $mem:expr, $T:ident, $get:ident, $get_mut:ident => $body:block) => {
        if $dtype == DType::Bool {
            type $T = u8;
            let $get = |b: BufRef| $mem.b(b);
            let $get_mut = |b: BufRef| $mem.b_mut(b);
            $body
        } else {
            type $T = f32;
            let $get = |b: BufRef| $mem.f(b);
            let $get_mut = |b: BufRef| $mem.f_mut(b);
            $body
        }
    };
}

/// `iv` as positions once every index is checked to be within `extent` (the first one out of
/// range is the error): without a copy, so a run allocates nothing.
fn checked_indices(
    iv: &[i32],
    extent: usize,
) -> Result<impl Iterator<Item = usize> + Clone + '_, String> {
    if let Some((p, &i)) = iv
        .iter()
        .enumerate()
        .find(|&(_, &i)| i < 0 || i as usize >= extent)
    {
        return Err(format!(
            "index {i} at flat position {p} of the indices is out of range for extent {extent}"
        ));
    }
    Ok(iv.iter().map(|&i| i as usize))
}

impl OpKernel {
    /// The kernel's kind and sizes, for profiles.
    pub(crate) fn describe(&self) -> (&'static str, String) {
        match self {
            OpKernel::MatMul {
                batch,
                mkn: (m, k, n),
                tl,
                tr,
                update,
                out,
                ..
            } => (
                if update.is_some() {
                    "matmul (update)"
                } else {
                    "matmul"
                },
                format!(
                    "{batch}x{m}x{k}x{n}{}{} {:?}",
                    if *tl { " Aᵀ" } else { "" },
                    if *tr { " Bᵀ" } else { "" },
                    out.dtype
                ),
            ),
            OpKernel::Conv2d { geo, .. } => ("conv2d", format!("x {:?} w {:?}", geo.x, geo.w)),
            OpKernel::Conv2dGradInput { geo, .. } => {
                ("conv2d_grad_input", format!("x {:?} w {:?}", geo.x, geo.w))
            }
            OpKernel::Conv2dGradWeight { geo, .. } => {
                ("conv2d_grad_weight", format!("x {:?} w {:?}", geo.x, geo.w))
            }
            OpKernel::Pool { geo, .. } => ("pool", format!("x {:?}", geo.x)),
            OpKernel::MaxPoolGrad { geo, .. } => ("max_pool_grad", format!("x {:?}", geo.x)),
            OpKernel::AvgPoolGrad { geo, .. } => ("avg_pool_grad", format!("x {:?}", geo.x)),
            OpKernel::Reduce { shape, axes, .. } => ("reduce", format!("{shape:?} over {axes:?}")),
            OpKernel::Softmax { dims, .. } => ("softmax", format!("{dims:?}")),
            OpKernel::Norm { x, n, .. } => ("norm", format!("{} rows of {n}", x.len / (*n).max(1))),
            OpKernel::CrossEntropy { logits, c, .. } => (
                "cross_entropy",
                format!("{} rows of {c}", logits.len / (*c).max(1)),
            ),
            OpKernel::Gather { dims, .. } => ("gather", format!("{dims:?}")),
            OpKernel::ScatterAdd { dims, .. } => ("scatter_add", format!("{dims:?}")),
            OpKernel::Concat { out, .. } => ("concat", format!("{} elements", out.len)),
            OpKernel::Split { x, .. } => ("split", format!("{} elements", x.len)),
            OpKernel::Pad { out_shape, .. } => ("pad", format!("{out_shape:?}")),
            OpKernel::OneHot { out, .. } => ("one_hot", format!("{} elements", out.len)),
            OpKernel::ArgmaxOneHot { dims, .. } => ("argmax_one_hot", format!("{dims:?}")),
        }
    }

    /// Runs the kernel.
    ///
    /// # Safety
    /// The buffers must be live in `mem` with their declared lengths, and the output must not
    /// overlap an input.
    pub unsafe fn run(&mut self, mem: &Mem) -> Result<(), String> {
        match self {
            OpKernel::MatMul {
                a,
                b,
                out,
                batch,
                mkn: (m, k, n),
                tl,
                tr,
                update,
            } => {
                let (m, k, n) = (*m, *k, *n);
                if let Some(scale) = *update {
                    let (ap, bp, cp) = (mem.ptr_f(*a), mem.ptr_f(*b), mem.ptr_f(*out));
                    let ast = if *tl { (1, m) } else { (k, 1) };
                    let bst = if *tr { (1, k) } else { (n, 1) };
                    sgemm_scaled((m, k, n), ap, ast, bp, bst, cp, n, scale);
                } else if out.dtype == DType::F32 {
                    let (ap, bp, cp) = (mem.ptr_f(*a), mem.ptr_f(*b), mem.ptr_f(*out));
                    let ast = if *tl { (1, m) } else { (k, 1) };
                    let bst = if *tr { (1, k) } else { (n, 1) };
                    sgemm_batched(*batch, (m, k, n), ap, ast, bp, bst, cp);
                } else if matches!(out.dtype, DType::BF16 | DType::F16) {
                    // bf16 (f16) GEMM: the product accumulated in f32, each element rounded to
                    // bf16 (f16) once. `gemm::hgemm_batched` reads the operands as stored where
                    // it can (`vdpbf16ps`, or cleave's own kernel widening as it packs);
                    // otherwise both are widened (exact) into copies for the f32 GEMM.
                    let half = if out.dtype == DType::F16 {
                        Half::F16
                    } else {
                        Half::Bf16
                    };
                    let direct = crate::gemm::hgemm_available(half);
                    let (na, nb, nc) = if direct {
                        (0, 0, *batch * m * n)
                    } else {
                        (*batch * m * k, *batch * k * n, *batch * m * n)
                    };
                    let mut wide = WIDE.with(|w| std::mem::take(&mut *w.borrow_mut()));
                    if wide.len() < na + nb + nc {
                        wide.resize(na + nb + nc, 0.0);
                    }
                    let (wa, rest) = wide.split_at_mut(na);
                    let (wb, wc) = rest.split_at_mut(nb);
                    let ast = if *tl { (1, m) } else { (k, 1) };
                    let bst = if *tr { (1, k) } else { (n, 1) };
                    let (pa, pb) = (mem.ptr_b(*a) as *const u16, mem.ptr_b(*b) as *const u16);
                    if direct {
                        crate::gemm::hgemm_batched(
                            half,
                            *batch,
                            (m, k, n),
                            pa,
                            ast,
                            pb,
                            bst,
                            wc.as_mut_ptr(),
                        );
                    } else {
                        widen_row(wa, std::slice::from_raw_parts(pa, na), half);
                        widen_row(wb, std::slice::from_raw_parts(pb, nb), half);
                        sgemm_batched(
                            *batch,
                            (m, k, n),
                            wa.as_ptr(),
                            ast,
                            wb.as_ptr(),
                            bst,
                            wc.as_mut_ptr(),
                        );
                    }
                    let c = std::slice::from_raw_parts_mut(mem.ptr_b(*out) as *mut u16, nc);
                    round_16(c, &wc[..nc], half);
                    WIDE.with(|w| *w.borrow_mut() = wide);
                } else {
                    let (av, bv, cv) = (mem.i(*a), mem.i(*b), mem.i_mut(*out));
                    for bi in 0..*batch {
                        for i in 0..m {
                            for j in 0..n {
                                let mut s = 0i32;
                                for p in 0..k {
                                    let x = if *tl {
                                        av[bi * m * k + p * m + i]
                                    } else {
                                        av[bi * m * k + i * k + p]
                                    };
                                    let y = if *tr {
                                        bv[bi * k * n + j * k + p]
                                    } else {
                                        bv[bi * k * n + p * n + j]
                                    };
                                    s = s.wrapping_add(x.wrapping_mul(y));
                                }
                                cv[bi * m * n + i * n + j] = s;
                            }
                        }
                    }
                }
            }
            OpKernel::Conv2d {
                x,
                w,
                out,
                geo,
                cols,
            } => {
                let (xv, wp, yp) = (mem.f(*x), mem.ptr_f(*w), mem.ptr_f(*out));
                let [n, _, _, _] = geo.x;
                let [o, cg, kh, kw] = geo.w;
                let og = o / geo.groups;
                let ckk = cg * kh * kw;
                let howo = geo.out[0] * geo.out[1];
                for ni in 0..n {
                    for g in 0..geo.groups {
                        geo.im2col(xv, ni, g, cols);
                        sgemm(
                            (og, ckk, howo),
                            wp.add(g * og * ckk),
                            (ckk, 1),
                            cols.as_ptr(),
                            (howo, 1),
                            yp.add((ni * o + g * og) * howo),
                            howo,
                            false,
                        );
                    }
                }
            }
            OpKernel::Conv2dGradInput {
                dy,
                w,
                out,
                geo,
                cols,
            } => {
                let (dyp, wp, dx) = (mem.ptr_f(*dy), mem.ptr_f(*w), mem.f_mut(*out));
                dx.fill(0.0);
                let [n, _, _, _] = geo.x;
                let [o, cg, kh, kw] = geo.w;
                let og = o / geo.groups;
                let ckk = cg * kh * kw;
                let howo = geo.out[0] * geo.out[1];
                for ni in 0..n {
                    for g in 0..geo.groups {
                        sgemm(
                            (ckk, og, howo),
                            wp.add(g * og * ckk),
                            (1, ckk),
                            dyp.add((ni * o + g * og) * howo),
                            (howo, 1),
                            cols.as_mut_ptr(),
                            howo,
                            false,
                        );
                        geo.col2im(cols, ni, g, dx);
                    }
                }
            }
            OpKernel::Conv2dGradWeight {
                x,
                dy,
                out,
                geo,
                cols,
            } => {
                let (xv, dyp, dw) = (mem.f(*x), mem.ptr_f(*dy), mem.ptr_f(*out));
                let [n, _, _, _] = geo.x;
                let [o, cg, kh, kw] = geo.w;
                let og = o / geo.groups;
                let ckk = cg * kh * kw;
                let howo = geo.out[0] * geo.out[1];
                mem.f_mut(*out).fill(0.0);
                for ni in 0..n {
                    for g in 0..geo.groups {
                        geo.im2col(xv, ni, g, cols);
                        sgemm(
                            (og, howo, ckk),
                            dyp.add((ni * o + g * og) * howo),
                            (howo, 1),
                            cols.as_ptr(),
                            (1, howo),
                            dw.add(g * og * ckk),
                            ckk,
                            true,
                        );
                    }
                }
            }
            OpKernel::Pool {
                x,
                out,
                kind,
                geo,
                count_include_pad,
            } => {
                let (xv, yv) = (mem.f(*x), mem.f_mut(*out));
                let full = (geo.window[0] * geo.window[1]) as f32;
                geo.for_each_window(|wi, pos| {
                    yv[wi] = match kind {
                        PoolKind::Max => {
                            pos.iter().map(|&p| xv[p]).fold(f32::NEG_INFINITY, nan_max)
                        }
                        PoolKind::Avg => {
                            let s: f32 = pos.iter().map(|&p| xv[p]).sum();
                            s / if *count_include_pad {
                                full
                            } else {
                                pos.len() as f32
                            }
                        }
                    }
                });
            }
            OpKernel::MaxPoolGrad { x, dy, out, geo } => {
                let (xv, dv, dx) = (mem.f(*x), mem.f(*dy), mem.f_mut(*out));
                dx.fill(0.0);
                geo.for_each_window(|wi, pos| {
                    let max = pos.iter().map(|&p| xv[p]).fold(f32::NEG_INFINITY, nan_max);
                    if let Some(p) = pos
                        .iter()
                        .copied()
                        .find(|&p| xv[p] == max || (max.is_nan() && xv[p].is_nan()))
                    {
                        dx[p] += dv[wi];
                    }
                });
            }
            OpKernel::AvgPoolGrad {
                dy,
                out,
                geo,
                count_include_pad,
            } => {
                let (dv, dx) = (mem.f(*dy), mem.f_mut(*out));
                dx.fill(0.0);
                let full = (geo.window[0] * geo.window[1]) as f32;
                geo.for_each_window(|wi, pos| {
                    let div = if *count_include_pad {
                        full
                    } else {
                        pos.len() as f32
                    };
                    for &p in pos {
                        dx[p] += dv[wi] / div;
                    }
                });
            }
            OpKernel::Reduce {
                x,
                out,
                kind,
                shape,
                axes,
                out_strides,
                acc,
            } => reduce(mem, *x, *out, *kind, (shape, axes, out_strides), acc)?,
            OpKernel::Softmax {
                x,
                out,
                dims: (outer, extent, inner),
                log,
            } => {
                let (v, r) = (mem.f(*x), mem.f_mut(*out));
                let (extent, inner) = (*extent, *inner);
                if inner == 1 && !*log && extent > 0 {
                    crate::rows::softmax(v, r, extent);
                } else {
                    for o in 0..*outer {
                        for i in 0..inner {
                            let at = |k: usize| (o * extent + k) * inner + i;
                            let m = (0..extent)
                                .map(|k| v[at(k)])
                                .fold(f32::NEG_INFINITY, nan_max);
                            let s: f64 = (0..extent).map(|k| exp_f32(v[at(k)] - m) as f64).sum();
                            if *log {
                                let ls = s.ln();
                                for k in 0..extent {
                                    r[at(k)] = ((v[at(k)] - m) as f64 - ls) as f32;
                                }
                            } else {
                                let inv = (1.0 / s) as f32;
                                for k in 0..extent {
                                    r[at(k)] = exp_f32(v[at(k)] - m) * inv;
                                }
                            }
                        }
                    }
                }
            }
            OpKernel::Norm {
                x,
                out,
                n,
                eps,
                layer,
            } => {
                let (v, r) = (mem.f(*x), mem.f_mut(*out));
                let n = *n;
                if n > 0 {
                    crate::rows::norm(v, r, n, *eps, *layer);
                }
            }
            OpKernel::CrossEntropy {
                logits,
                labels,
                out,
                c,
            } => {
                let (v, l, r) = (mem.f(*logits), mem.i(*labels), mem.f_mut(*out));
                let c = *c;
                for (p, &lab) in l.iter().enumerate() {
                    if lab < 0 || lab as usize >= c {
                        return Err(format!(
                            "label {lab} at flat position {p} is out of range for {c} classes"
                        ));
                    }
                }
                crate::rows::cross_entropy(v, l, r, c);
            }
            OpKernel::Gather {
                table,
                idx,
                out,
                dims: (outer, extent, inner),
            } => {
                let iv = mem.i(*idx);
                let (extent, inner) = (*extent, *inner);
                let checked = checked_indices(iv, extent)?;
                by_size!(out.dtype, mem, T, get, get_mut => {
                    let (t, r): (&[T], &mut [T]) = (get(*table), get_mut(*out));
                    let mut at = 0;
                    for o in 0..*outer {
                        for i in checked.clone() {
                            let base = (o * extent + i) * inner;
                            r[at..at + inner].copy_from_slice(&t[base..base + inner]);
                            at += inner;
                        }
                    }
                });
            }
            OpKernel::ScatterAdd {
                base,
                idx,
                upd,
                out,
                dims: (outer, extent, inner),
            } => {
                let iv = mem.i(*idx);
                let (extent, inner) = (*extent, *inner);
                let checked = checked_indices(iv, extent)?;
                if out.dtype == DType::F32 {
                    let (b, u, r) = (mem.f(*base), mem.f(*upd), mem.f_mut(*out));
                    r.copy_from_slice(b);
                    let mut at = 0;
                    for o in 0..*outer {
                        for i in checked.clone() {
                            let dst = &mut r[(o * extent + i) * inner..][..inner];
                            for (d, &s) in dst.iter_mut().zip(&u[at..at + inner]) {
                                *d += s;
                            }
                            at += inner;
                        }
                    }
                } else {
                    let (b, u, r) = (mem.i(*base), mem.i(*upd), mem.i_mut(*out));
                    r.copy_from_slice(b);
                    let mut at = 0;
                    for o in 0..*outer {
                        for i in checked.clone() {
                            let dst = &mut r[(o * extent + i) * inner..][..inner];
                            for (d, &s) in dst.iter_mut().zip(&u[at..at + inner]) {
                                *d = d.wrapping_add(s);
                            }
                            at += inner;
                        }
                    }
                }
            }
            OpKernel::Concat {
                ins,
                out,
                outer,
                chunks,
            } => {
                by_size!(out.dtype, mem, T, get, get_mut => {
                    let r: &mut [T] = get_mut(*out);
                    let mut at = 0;
                    for o in 0..*outer {
                        for (b, &c) in ins.iter().zip(chunks.iter()) {
                            let src: &[T] = get(*b);
                            r[at..at + c].copy_from_slice(&src[o * c..(o + 1) * c]);
                            at += c;
                        }
                    }
                });
            }
            OpKernel::Split {
                x,
                outs,
                outer,
                chunks,
            } => {
                by_size!(x.dtype, mem, T, get, get_mut => {
                    let src: &[T] = get(*x);
                    let mut at = 0;
                    for o in 0..*outer {
                        for (b, &c) in outs.iter().zip(chunks.iter()) {
                            let r: &mut [T] = get_mut(*b);
                            r[o * c..(o + 1) * c].copy_from_slice(&src[at..at + c]);
                            at += c;
                        }
                    }
                });
            }
            OpKernel::Pad {
                x,
                out,
                in_shape,
                out_shape,
                low,
                value,
            } => {
                let ost = strides(out_shape);
                let offset: usize = low.iter().zip(&ost).map(|(a, b)| a * b).sum();
                if out.dtype == DType::F32 {
                    let (s, r) = (mem.f(*x), mem.f_mut(*out));
                    r.fill(*value as f32);
                    for_each_strided(in_shape, &ost, |i, j| r[offset + j] = s[i]);
                } else {
                    let (s, r) = (mem.i(*x), mem.i_mut(*out));
                    r.fill(*value as i32);
                    for_each_strided(in_shape, &ost, |i, j| r[offset + j] = s[i]);
                }
            }
            OpKernel::ArgmaxOneHot { x, out, dims } => {
                let (outer, n, inner) = *dims;
                let (s, r) = (mem.f(*x), mem.f_mut(*out));
                r.fill(0.0);
                for o in 0..outer {
                    for i in 0..inner {
                        let at = |k: usize| (o * n + k) * inner + i;
                        let mut best = 0;
                        for k in 1..n {
                            if s[at(k)] > s[at(best)] {
                                best = k;
                            }
                        }
                        if n > 0 {
                            r[at(best)] = 1.0;
                        }
                    }
                }
            }
            OpKernel::OneHot { idx, out, depth } => {
                let iv = mem.i(*idx);
                let d = *depth;
                let hot = |p: usize| -> Option<usize> {
                    let i = iv[p];
                    (i >= 0 && (i as usize) < d).then_some(i as usize)
                };
                match out.dtype {
                    DType::F32 => {
                        let r = mem.f_mut(*out);
                        r.fill(0.0);
                        for p in 0..iv.len() {
                            if let Some(i) = hot(p) {
                                r[p * d + i] = 1.0;
                            }
                        }
                    }
                    DType::I32 => {
                        let r = mem.i_mut(*out);
                        r.fill(0);
                        for p in 0..iv.len() {
                            if let Some(i) = hot(p) {
                                r[p * d + i] = 1;
                            }
                        }
                    }
                    _ => {
                        let r = mem.b_mut(*out);
                        r.fill(0);
                        for p in 0..iv.len() {
                            if let Some(i) = hot(p) {
                                r[p * d + i] = 1;
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

thread_local! {
    /// The bf16 GEMM's widened operands and f32 product: one buffer per thread, as large as
    /// the largest bf16 GEMM it ran (kernel scratch, not one copy per kernel).
    static WIDE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The output's stride per input dimension of a reduction over `axes` (0 on reduced axes).
pub(crate) fn reduce_out_strides(shape: &[usize], axes: &[usize]) -> Vec<usize> {
    let rank = shape.len();
    let kept: Vec<usize> = (0..rank).filter(|d| !axes.contains(d)).collect();
    let out_shape: Vec<usize> = kept.iter().map(|&d| shape[d]).collect();
    let ost = strides(&out_shape);
    let mut st = vec![0; rank];
    for (k, &d) in kept.iter().enumerate() {
        st[d] = ost[k];
    }
    st
}

/// The maximum (`max`) or minimum of a contiguous row, as the sequential fold with
/// [`nan_max`]/[`nan_min`] gives it, bit for bit, but in 16 independent lanes. Max and min are
/// order-independent except for the sign of a zero result (NaN propagates either way), so a
/// zero result is recomputed by the fold.
pub(crate) fn row_extreme(row: &[f32], max: bool) -> f32 {
    const L: usize = 16;
    let init = if max {
        f32::NEG_INFINITY
    } else {
        f32::INFINITY
    };
    let mut m = [init; L];
    let mut nan = false;
    let mut chunks = row.chunks_exact(L);
    for c in &mut chunks {
        for l in 0..L {
            let b = c[l];
            nan |= b.is_nan();
            m[l] = if (b > m[l]) == max && b != m[l] {
                b
            } else {
                m[l]
            };
        }
    }
    for &b in chunks.remainder() {
        nan |= b.is_nan();
        m[0] = if (b > m[0]) == max && b != m[0] {
            b
        } else {
            m[0]
        };
    }
    if nan {
        return f32::NAN;
    }
    let fold = |a: f32, b: f32| if max { a.max(b) } else { a.min(b) };
    let r = m.into_iter().fold(init, fold);
    if r == 0.0 {
        let f = if max { nan_max } else { nan_min };
        return row.iter().copied().fold(init, f);
    }
    r
}

unsafe fn reduce(
    mem: &Mem,
    x: BufRef,
    out: BufRef,
    kind: ReduceKind,
    (shape, axes, st): (&[usize], &[usize], &[usize]),
    acc: &mut Vec<f64>,
) -> Result<(), String> {
    let rank = shape.len();
    let n_out: usize = (0..rank)
        .filter(|d| !axes.contains(d))
        .map(|d| shape[d])
        .product();
    let count: usize = axes.iter().map(|&a| shape[a]).product();
    if count == 0 && n_out > 0 && matches!(kind, ReduceKind::Max | ReduceKind::Min) {
        return Err(format!(
            "`{}` over axes {axes:?} of an empty extent has no identity",
            kind.name()
        ));
    }
    let leading = axes.iter().enumerate().all(|(i, &a)| a == i);
    let trailing = axes
        .iter()
        .enumerate()
        .all(|(i, &a)| a == rank - axes.len() + i);
    if x.dtype == DType::F32 {
        let (v, r) = (mem.f(x), mem.f_mut(out));
        let sumlike = matches!(kind, ReduceKind::Sum | ReduceKind::Mean);
        if trailing && count > 0 && sumlike {
            crate::rows::row_sums(v, r, count);
        } else if trailing && count > 0 {
            for (a, row) in r.iter_mut().zip(v.chunks_exact(count)) {
                *a = row_extreme(row, kind == ReduceKind::Max);
            }
        } else if sumlike && leading && n_out > 0 {
            // Sum of `count` rows of length n_out.
            crate::rows::col_sums(v, r, n_out);
        } else {
            acc.clear();
            acc.resize(
                n_out,
                match kind {
                    ReduceKind::Sum | ReduceKind::Mean => 0.0f64,
                    ReduceKind::Max => f64::NEG_INFINITY,
                    ReduceKind::Min => f64::INFINITY,
                },
            );
            for_each_strided(shape, st, |i, j| {
                let b = v[i] as f64;
                acc[j] = match kind {
                    ReduceKind::Sum | ReduceKind::Mean => acc[j] + b,
                    ReduceKind::Max => {
                        if acc[j].is_nan() || b.is_nan() {
                            f64::NAN
                        } else {
                            acc[j].max(b)
                        }
                    }
                    ReduceKind::Min => {
                        if acc[j].is_nan() || b.is_nan() {
                            f64::NAN
                        } else {
                            acc[j].min(b)
                        }
                    }
                }
            });
            for (a, &b) in r.iter_mut().zip(acc.iter()) {
                *a = b as f32;
            }
        }
        if kind == ReduceKind::Mean {
            let c = count as f32;
            r.iter_mut().for_each(|a| *a /= c);
        }
    } else {
        let (v, r) = (mem.i(x), mem.i_mut(out));
        let (init, f): (i32, fn(i32, i32) -> i32) = match kind {
            ReduceKind::Sum => (0, i32::wrapping_add),
            ReduceKind::Max => (i32::MIN, i32::max),
            ReduceKind::Min => (i32::MAX, i32::min),
            ReduceKind::Mean => return Err("`reduce_mean` needs a float operand".into()),
        };
        r.fill(init);
        for_each_strided(shape, st, |i, j| r[j] = f(r[j], v[i]));
    }
    Ok(())
}

/// `src` rounded to 16-bit float patterns of format `half`, to nearest even.
fn round_16(dst: &mut [u16], src: &[f32], half: Half) {
    if half == Half::F16 {
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = crate::fused::round_f16(x);
        }
    } else {
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = (crate::fused::round_bf16(x).to_bits() >> 16) as u16;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Gathers' and scatter-adds' indices: every one checked, the first out of range named with
    /// its flat position.
    #[test]
    fn indices_out_of_range_are_named() {
        let ok: Vec<usize> = checked_indices(&[0, 4, 2], 5).unwrap().collect();
        assert_eq!(ok, [0, 4, 2]);
        for (iv, bad) in [
            (&[1, 5, -1][..], "index 5 at flat position 1"),
            (&[-1], "index -1 at flat position 0"),
        ] {
            let e = checked_indices(iv, 5).err().unwrap();
            assert!(e.starts_with(bad) && e.ends_with("extent 5"), "{e}");
        }
    }

    /// The 16-lane row maximum and minimum give the sequential fold's bits: signed zeros (the
    /// one case where order matters), NaN anywhere, infinities, rows shorter than a lane set.
    #[test]
    fn row_extremes_match_the_fold() {
        let mut seed = 7u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as u32
        };
        let special = [
            0.0f32,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            1e-45,
            -3.5,
        ];
        for len in [1usize, 5, 16, 17, 40, 100] {
            for trial in 0..200 {
                let row: Vec<f32> = (0..len)
                    .map(|_| match next() % 8 {
                        0 | 1 => special[(next() as usize) % special.len()],
                        // Zeros only, of both signs, in some rows.
                        _ if trial % 5 == 0 => [0.0, -0.0][(next() % 2) as usize],
                        _ => (next() as f32 / u32::MAX as f32 - 0.5) * 100.0,
                    })
                    .collect();
                let want_max = row.iter().copied().fold(f32::NEG_INFINITY, nan_max);
                let want_min = row.iter().copied().fold(f32::INFINITY, nan_min);
                let (got_max, got_min) = (row_extreme(&row, true), row_extreme(&row, false));
                for (got, want) in [(got_max, want_max), (got_min, want_min)] {
                    assert!(
                        got.to_bits() == want.to_bits() || got.is_nan() && want.is_nan(),
                        "{row:?}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
