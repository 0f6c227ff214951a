//! f32 GEMM on AVX-512F: the single-threaded product under `gemm.rs`'s splits, with its packing
//! buffers kept per thread so that a step allocates nothing after its first run.
//!
//! The `gemm` crate (still the path on machines without AVX-512) allocates its packed panels
//! and a bookkeeping vector on every call: three allocations per product, dozens per training
//! step. This kernel packs into per-thread buffers that grow to the largest block the thread
//! has packed and are then reused.
//!
//! Layout (BLIS-style, as `bf16gemm.rs`):
//! - `k` in blocks of [`KC`].
//! - `b`'s block is packed into panels of up to [`NR`] = 48 columns (the last one 16 or 32 wide
//!   where fewer columns remain): for each `p`, the panel's row of `b`. A row-major `b` is copied
//!   row by row; a transposed one (the input gradients' `dy·Wᵀ`) with 16×16 AVX-512 block
//!   transposes (`gemm::transpose`); other strides element by element.
//! - `a` is read in place, 8 rows ([`MR`]) at a time, each element broadcast by the
//!   micro-kernel (row-major or transposed alike: 8 streams through the block). Only a last
//!   panel of fewer than 8 rows is packed, with zero rows past `m`.
//! - The micro-kernel holds an 8×(16·NV) tile of f32 sums in 8·NV registers, NV = 3, 2 or 1.
//!
//! Summation order: each element of `a·b` is the sum over the `k` blocks, in order, of each
//! block's sum, which runs `p` in order through one FMA chain. It depends on `k` and [`KC`]
//! only, never on the panel an element falls in or on how the caller splits `m` or `n`, so
//! results do not depend on the thread count. `c ← (accumulate ? c : 0) + scale·(a·b)` is
//! applied once to the whole sum (`scale` 1 skips the multiply).

use std::cell::RefCell;

/// Rows of `a` per micro-panel.
pub(crate) const MR: usize = 8;
/// Columns of `b` per micro-panel (three zmm registers of 16 lanes).
pub(crate) const NR: usize = 48;
/// `k` per block: a packed `b` panel (`KC·NR` f32, 24 KiB) stays in L1.
pub(crate) const KC: usize = 128;

/// Whether this CPU has AVX-512F (checked once) and `CLEAVE_GEMM=library` does not ask for the
/// `gemm` crate instead (the baseline of BENCHMARKS.md's comparison).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::env::var("CLEAVE_GEMM").as_deref() != Ok("library")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Per-thread kernel scratch, reused across calls.
#[derive(Default)]
struct Scratch {
    /// The packed last panel of `a`'s rows.
    a: Vec<f32>,
    /// Packed `b` block.
    b: Vec<f32>,
    /// The product `a·b` (row-major `m×n`) while `k` spans several blocks and `c` cannot hold
    /// the partial sums (`accumulate`, or a scale other than 1).
    sum: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Grows `v` to at least `n` elements (never shrinks: the thread's largest block stays).
fn at_least(v: &mut Vec<f32>, n: usize) {
    if v.len() < n {
        v.resize(n, 0.0);
    }
}

/// `c ← (accumulate ? c : 0) + scale·(a·b)` for `a` (`m×k`, element `(i, p)` at
/// `a[i·ars + p·acs]`) and `b` (`k×n`, `(p, j)` at `b[p·brs + j·bcs]`), `c` row-major with row
/// stride `ldc`, on this thread.
///
/// # Safety
/// [`available`] must be true; the pointers must be valid for every position the strides reach
/// and `c` must not overlap `a` or `b`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_f32(
    (m, k, n): (usize, usize, usize),
    a: *const f32,
    (ars, acs): (usize, usize),
    b: *const f32,
    (brs, bcs): (usize, usize),
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    scale: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                std::slice::from_raw_parts_mut(c.add(i * ldc), n).fill(0.0);
            }
        }
        return;
    }
    let mut s = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    let (mp, np) = (m.div_ceil(MR), n.div_ceil(NR));
    let kc_max = KC.min(k);
    at_least(&mut s.a, kc_max * MR);
    at_least(&mut s.b, np * kc_max * NR);
    // One block: the epilogue applies to the finished sums in registers. Several: the partial
    // sums go to `c` itself when it takes the plain product, else to the scratch product.
    let direct = !accumulate && scale == 1.0;
    let blocks = k.div_ceil(KC);
    let (dst, ldd) = if blocks == 1 || direct {
        (c, ldc)
    } else {
        at_least(&mut s.sum, m * n);
        (s.sum.as_mut_ptr(), n)
    };
    let mut tile = [0f32; MR * NR];
    let mut p0 = 0;
    while p0 < k {
        let kc = KC.min(k - p0);
        let last = p0 + kc == k;
        let ab = a.add(p0 * acs);
        if m % MR != 0 {
            // The last panel of rows, zero past `m`; the whole panels read `a` in place.
            pack_a(
                &mut s.a,
                (m % MR, kc),
                ab.add((m - m % MR) * ars),
                (ars, acs),
            );
        }
        pack_b(&mut s.b, (kc, n), b.add(p0 * brs), (brs, bcs));
        // What the micro-kernel does with its sums: the epilogue on a single block, else
        // store on the first and add on the others.
        let out = if blocks == 1 {
            Out::Epilogue { accumulate, scale }
        } else if p0 == 0 {
            Out::Store
        } else {
            Out::Add
        };
        for jp in 0..np {
            let (j0, nr) = (jp * NR, NR.min(n - jp * NR));
            let nv = nr.div_ceil(16);
            let bpanel = s.b.as_ptr().add(jp * kc * NR);
            for ip in 0..mp {
                let (i0, mr) = (ip * MR, MR.min(m - ip * MR));
                // Row `i`, column `p` of the panel at `ap[i·rs + p·cs]`.
                let (ap, rs, cs) = if mr == MR {
                    (ab.add(i0 * ars), ars, acs)
                } else {
                    (s.a.as_ptr(), 1, MR)
                };
                let whole = mr == MR && nr == 16 * nv;
                let (t, ld) = if whole {
                    (dst.add(i0 * ldd + j0), ldd)
                } else {
                    (tile.as_mut_ptr(), NR)
                };
                if !whole {
                    // The edge tile goes through `tile`: load what it adds to.
                    for i in 0..mr {
                        let row = std::slice::from_raw_parts(dst.add((i0 + i) * ldd + j0), nr);
                        tile[i * NR..i * NR + nr].copy_from_slice(row);
                    }
                }
                match nv {
                    3 => micro::<3>(kc, (ap, rs, cs), bpanel, t, ld, out),
                    2 => micro::<2>(kc, (ap, rs, cs), bpanel, t, ld, out),
                    _ => micro::<1>(kc, (ap, rs, cs), bpanel, t, ld, out),
                }
                if !whole {
                    for i in 0..mr {
                        let row = std::slice::from_raw_parts_mut(dst.add((i0 + i) * ldd + j0), nr);
                        row.copy_from_slice(&tile[i * NR..i * NR + nr]);
                    }
                }
            }
        }
        if last && blocks > 1 && !direct {
            // The whole product is in the scratch: the epilogue, once per element.
            for i in 0..m {
                let (row, sum) = (
                    std::slice::from_raw_parts_mut(c.add(i * ldc), n),
                    &s.sum[i * n..(i + 1) * n],
                );
                for (x, &y) in row.iter_mut().zip(sum) {
                    let y = if scale == 1.0 { y } else { scale * y };
                    *x = if accumulate { *x + y } else { y };
                }
            }
        }
        p0 += kc;
    }
    SCRATCH.with(|x| *x.borrow_mut() = s);
}

/// What the micro-kernel does with its tile of sums `t`.
#[derive(Clone, Copy)]
enum Out {
    /// `c = t`.
    Store,
    /// `c += t`.
    Add,
    /// `c = (accumulate ? c : 0) + scale·t`.
    Epilogue { accumulate: bool, scale: f32 },
}

/// Packs the last `mr < MR` rows of `a`'s block (`mr×kc`) into one panel of [`MR`] rows:
/// column `p`, row `i` at `p·MR + i`, rows past `mr` zero (whole panels are read in place).
unsafe fn pack_a(
    panel: &mut [f32],
    (mr, kc): (usize, usize),
    a: *const f32,
    (ars, acs): (usize, usize),
) {
    for i in 0..MR {
        for p in 0..kc {
            panel[p * MR + i] = if i < mr {
                *a.add(i * ars + p * acs)
            } else {
                0.0
            };
        }
    }
}

/// Packs `b`'s `kc×n` block into panels of [`NR`] columns (the last one `16·⌈nr/16⌉` wide):
/// panel `jp`, row `p`, column `j` at `jp·kc·NR + p·w + j` for the panel's width `w`, columns
/// past `n` zero.
unsafe fn pack_b(
    dst: &mut [f32],
    (kc, n): (usize, usize),
    b: *const f32,
    (brs, bcs): (usize, usize),
) {
    for jp in 0..n.div_ceil(NR) {
        let (j0, nr) = (jp * NR, NR.min(n - jp * NR));
        let w = nr.next_multiple_of(16);
        let panel = &mut dst[jp * kc * NR..jp * kc * NR + kc * w];
        let src = b.add(j0 * bcs);
        if bcs == 1 {
            for p in 0..kc {
                let row = std::slice::from_raw_parts(src.add(p * brs), nr);
                panel[p * w..p * w + nr].copy_from_slice(row);
            }
        } else if brs == 1 {
            // A transposed `b`: its columns are contiguous rows of length `kc`.
            crate::gemm::transpose(src, (nr, kc), bcs, panel.as_mut_ptr(), w);
        } else {
            for p in 0..kc {
                for j in 0..nr {
                    panel[p * w + j] = *src.add(p * brs + j * bcs);
                }
            }
        }
        if nr < w {
            for p in 0..kc {
                panel[p * w + nr..(p + 1) * w].fill(0.0);
            }
        }
    }
}

/// The 8×(16·NV) tile `Σ_p a_p ⊗ b_p` over `kc` columns of the packed panels (`b`'s rows
/// `16·NV` apart), written to `t` (row stride `ld`) as `out` says.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn micro<const NV: usize>(
    kc: usize,
    (a, rs, cs): (*const f32, usize, usize),
    b: *const f32,
    t: *mut f32,
    ld: usize,
    out: Out,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    let rows: [*const f32; MR] = std::array::from_fn(|i| a.add(i * rs));
    for p in 0..kc {
        let bp = b.add(p * 16 * NV);
        let mut bv = [_mm512_setzero_ps(); NV];
        for (s, v) in bv.iter_mut().enumerate() {
            *v = _mm512_loadu_ps(bp.add(16 * s));
        }
        for (row, r) in acc.iter_mut().zip(&rows) {
            let av = _mm512_set1_ps(*r.add(p * cs));
            for s in 0..NV {
                row[s] = _mm512_fmadd_ps(av, bv[s], row[s]);
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (s, &v) in row.iter().enumerate() {
            let q = t.add(i * ld + 16 * s);
            let v = match out {
                Out::Store => v,
                Out::Add => _mm512_add_ps(_mm512_loadu_ps(q), v),
                Out::Epilogue { accumulate, scale } => {
                    let v = if scale == 1.0 {
                        v
                    } else {
                        _mm512_mul_ps(_mm512_set1_ps(scale), v)
                    };
                    if accumulate {
                        _mm512_add_ps(_mm512_loadu_ps(q), v)
                    } else {
                        v
                    }
                }
            };
            _mm512_storeu_ps(q, v);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn micro<const NV: usize>(
    _: usize,
    _: (*const f32, usize, usize),
    _: *const f32,
    _: *mut f32,
    _: usize,
    _: Out,
) {
    unreachable!("gemm_f32 needs AVX-512F (`available`)")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    /// Every shape edge (rows past a panel of 8, columns past 48, 32 and 16, `k` past a block),
    /// all four transposes, a row stride in `c`, accumulation and a scale: within the rounding
    /// of `k` f32 additions of the exact (f64) product, and bit for bit the same whether the
    /// columns are computed whole or in two halves (the split `gemm.rs` makes).
    #[test]
    fn products_match_the_exact_sum_and_do_not_depend_on_the_split() {
        if !available() {
            return;
        }
        for &(m, k, n) in &[
            (1, 1, 1),
            (8, 128, 48),
            (9, 129, 49),
            (13, 300, 70),
            (64, 256, 10),
            (17, 5, 100),
            (3, 257, 33),
        ] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                for (accumulate, scale) in [(false, 1.0), (true, 1.0), (true, -0.25), (false, 3.0)]
                {
                    let (a, b) = (data(m * k, 1), data(k * n, 2));
                    let ast = if ta { (1, m) } else { (k, 1) };
                    let bst = if tb { (1, k) } else { (n, 1) };
                    let ldc = n + 3;
                    let c0 = data(m * ldc, 3);
                    let mut c = c0.clone();
                    unsafe {
                        gemm_f32(
                            (m, k, n),
                            a.as_ptr(),
                            ast,
                            b.as_ptr(),
                            bst,
                            c.as_mut_ptr(),
                            ldc,
                            accumulate,
                            scale,
                        );
                    }
                    for i in 0..m {
                        for j in 0..n {
                            let (mut exact, mut mag) = (0f64, 0f64);
                            for p in 0..k {
                                let x = a[i * ast.0 + p * ast.1] as f64
                                    * b[p * bst.0 + j * bst.1] as f64;
                                exact += x;
                                mag += x.abs();
                            }
                            let base = if accumulate {
                                c0[i * ldc + j] as f64
                            } else {
                                0.0
                            };
                            let want = base + scale as f64 * exact;
                            let got = c[i * ldc + j] as f64;
                            let tol = (k as f64 + 2.0)
                                * f32::EPSILON as f64
                                * (scale.abs() as f64 * mag + base.abs());
                            assert!(
                                (got - want).abs() <= tol,
                                "{m}×{k}×{n} ta {ta} tb {tb} acc {accumulate} scale {scale} \
                                 ({i}, {j}): {got} vs {want}"
                            );
                        }
                        // Columns past `n` in the row stride are untouched.
                        for j in n..ldc {
                            assert_eq!(c[i * ldc + j].to_bits(), c0[i * ldc + j].to_bits());
                        }
                    }
                    // The same columns as two calls, split at a multiple of 16.
                    if n > 16 {
                        let h = (n / 2).next_multiple_of(16).min(n - 1);
                        let mut d = c0.clone();
                        unsafe {
                            for (lo, len) in [(0, h), (h, n - h)] {
                                gemm_f32(
                                    (m, k, len),
                                    a.as_ptr(),
                                    ast,
                                    b.as_ptr().add(lo * bst.1),
                                    bst,
                                    d.as_mut_ptr().add(lo),
                                    ldc,
                                    accumulate,
                                    scale,
                                );
                            }
                        }
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&d), bits(&c), "{m}×{k}×{n} split at {h}");
                    }
                }
            }
        }
    }
}
