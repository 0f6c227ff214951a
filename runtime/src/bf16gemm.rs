//! bf16 GEMM on AVX-512 BF16 (`vdpbf16ps`): `c = a·b` with bf16 operands read as stored and an
//! f32 product, for `--precision bf16` and any bf16 `matmul`.
//!
//! Without it the bf16 GEMM widens both operands to f32 copies and runs the f32 GEMM: two extra
//! passes over the operands, and the f32 rate. `vdpbf16ps` multiplies 16 pairs of bf16 values
//! into 16 f32 sums per instruction, `acc[j] += a[2j]·b[2j] + a[2j+1]·b[2j+1]`, twice the
//! multiply-adds of an f32 FMA, on the bf16 operands themselves.
//!
//! Layout (BLIS-style; one thread per call, the caller splits by rows or columns):
//! - `k` in blocks of [`KC`]; within a block, pairs of `k` (an odd block's last pair has a zero
//!   second half).
//! - `b`'s block is packed into panels of [`NR`] = 48 columns: for each pair `q`, 48 `u32`s, the
//!   `k` pair of one column each (low half `b[2q][j]`, high half `b[2q+1][j]`): three zmm loads.
//! - `a`'s block into panels of [`MR`] = 8 rows: for each pair, 8 `u32`s, row `i`'s pair, each
//!   broadcast to all lanes.
//! - The micro-kernel holds an 8×48 tile of f32 sums in 24 registers.
//!
//! Summation order: each element of `c` is the sum over the `k` blocks, in order, of each
//! block's sum, which adds its pairs in order into one lane. It depends on `k` and [`KC`] only,
//! never on how the caller splits `m` or `n`, so results do not depend on the thread count. The
//! sums differ from the f32 GEMM's (another order, and `vdpbf16ps` flushes bf16 subnormals to
//! zero); the bf16 result, rounded once from them, is within one bf16 rounding of the exact
//! product like every other bf16 GEMM here.

use std::cell::RefCell;

/// Rows of `a` per micro-panel.
pub(crate) const MR: usize = 8;
/// Columns of `b` per micro-panel (three zmm registers of 16 lanes).
pub(crate) const NR: usize = 48;
/// `k` per block: a packed `b` panel (`KC·NR` bf16, 24 KiB) stays in L1.
pub(crate) const KC: usize = 256;

/// Whether this CPU has AVX-512 BF16 (checked once).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

thread_local! {
    /// Packed panels of `a` and `b`, reused across calls (kernel scratch: as large as the
    /// largest block this thread packed).
    static PACKS: RefCell<(Vec<u32>, Vec<u32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// `c = a·b` for bf16 bit patterns `a` (`m×k`, element `(i, p)` at `a[i·ars + p·acs]`) and `b`
/// (`k×n`, `(p, j)` at `b[p·brs + j·bcs]`), `c` row-major f32 with row stride `ldc`, on this
/// thread.
///
/// # Safety
/// [`available`] must be true; the pointers must be valid for every position the strides reach
/// and `c` must not overlap `a` or `b`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_bf16(
    (m, k, n): (usize, usize, usize),
    a: *const u16,
    (ars, acs): (usize, usize),
    b: *const u16,
    (brs, bcs): (usize, usize),
    c: *mut f32,
    ldc: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for i in 0..m {
            std::slice::from_raw_parts_mut(c.add(i * ldc), n).fill(0.0);
        }
        return;
    }
    let (mut pa, mut pb) = PACKS.with(|p| std::mem::take(&mut *p.borrow_mut()));
    let (mp, np) = (m.div_ceil(MR), n.div_ceil(NR));
    let kq_max = KC.min(k).div_ceil(2);
    if pa.len() < mp * kq_max * MR {
        pa.resize(mp * kq_max * MR, 0);
    }
    if pb.len() < np * kq_max * NR {
        pb.resize(np * kq_max * NR, 0);
    }
    let mut tile = [0f32; MR * NR];
    let mut p0 = 0;
    while p0 < k {
        let kc = KC.min(k - p0);
        let kq = kc.div_ceil(2);
        pack_a(&mut pa, (m, kc), a.add(p0 * acs), (ars, acs));
        pack_b(&mut pb, (kc, n), b.add(p0 * brs), (brs, bcs));
        for jp in 0..np {
            let (j0, nr) = (jp * NR, NR.min(n - jp * NR));
            let bpanel = pb.as_ptr().add(jp * kq * NR);
            for ip in 0..mp {
                let (i0, mr) = (ip * MR, MR.min(m - ip * MR));
                let apanel = pa.as_ptr().add(ip * kq * MR);
                if mr == MR && nr == NR {
                    // A whole tile: straight into `c`.
                    micro(kq, apanel, bpanel, c.add(i0 * ldc + j0), ldc, p0 > 0);
                    continue;
                }
                micro(kq, apanel, bpanel, tile.as_mut_ptr(), NR, false);
                for i in 0..mr {
                    let row = std::slice::from_raw_parts_mut(c.add((i0 + i) * ldc + j0), nr);
                    let t = &tile[i * NR..i * NR + nr];
                    if p0 == 0 {
                        row.copy_from_slice(t);
                    } else {
                        for (x, y) in row.iter_mut().zip(t) {
                            *x += y;
                        }
                    }
                }
            }
        }
        p0 += kc;
    }
    PACKS.with(|p| *p.borrow_mut() = (pa, pb));
}

/// `batch` products `c_i = a_i·b_i` (items `i·(m·k)`, `i·(k·n)`, `i·(m·n)` elements apart; `c`
/// row-major), across the pool as the f32 GEMM splits (`gemm.rs`): a product of at least
/// [`PAR_MIN_FLOPS`](crate::gemm::PAR_MIN_FLOPS) by its longer side into one range per thread
/// (multiples of [`MR`] rows or [`NR`] columns), smaller items shared out whole. Each element's
/// sum is the same whatever the split (see the module docs).
///
/// # Safety
/// As [`gemm_bf16`], for every item.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_bf16_batched(
    batch: usize,
    (m, k, n): (usize, usize, usize),
    a: *const u16,
    ast: (usize, usize),
    b: *const u16,
    bst: (usize, usize),
    c: *mut f32,
) {
    crate::gemm::batched_16(
        batch,
        (m, k, n),
        (a, ast),
        (b, bst),
        c,
        (MR, NR),
        &|_, _| {},
        // SAFETY: `batched_16` passes operands within the caller's, as `gemm_bf16` needs.
        &|shape, a, b, c| unsafe { gemm_bf16(shape, a, ast, b, bst, c, n) },
    );
}

/// Packs `a`'s `m×kc` block into panels of [`MR`] rows: panel `ip`, pair `q`, row `i` at
/// `(ip·kq + q)·MR + i`, rows past `m` and the half past `kc` zero.
unsafe fn pack_a(
    dst: &mut [u32],
    (m, kc): (usize, usize),
    a: *const u16,
    (ars, acs): (usize, usize),
) {
    let kq = kc.div_ceil(2);
    for ip in 0..m.div_ceil(MR) {
        let panel = &mut dst[ip * kq * MR..(ip + 1) * kq * MR];
        for i in 0..MR {
            let r = ip * MR + i;
            if r >= m {
                for q in 0..kq {
                    panel[q * MR + i] = 0;
                }
                continue;
            }
            let row = a.add(r * ars);
            for q in 0..kq {
                panel[q * MR + i] = pair(row.add(2 * q * acs), acs, 2 * q + 1 < kc);
            }
        }
    }
}

/// Packs `b`'s `kc×n` block into panels of [`NR`] columns: panel `jp`, pair `q`, column `j` at
/// `(jp·kq + q)·NR + j`, columns past `n` and the half past `kc` zero.
unsafe fn pack_b(
    dst: &mut [u32],
    (kc, n): (usize, usize),
    b: *const u16,
    (brs, bcs): (usize, usize),
) {
    let kq = kc.div_ceil(2);
    for jp in 0..n.div_ceil(NR) {
        let panel = &mut dst[jp * kq * NR..(jp + 1) * kq * NR];
        let (j0, nr) = (jp * NR, NR.min(n - jp * NR));
        for q in 0..kq {
            let out = &mut panel[q * NR..(q + 1) * NR];
            let r0 = b.add(2 * q * brs + j0 * bcs);
            let has_hi = 2 * q + 1 < kc;
            if bcs == 1 && nr == NR && has_hi {
                pack_rows(out, r0, r0.add(brs));
                continue;
            }
            for (j, o) in out.iter_mut().enumerate() {
                *o = if j < nr {
                    pair(r0.add(j * bcs), brs, has_hi)
                } else {
                    0
                };
            }
        }
    }
}

/// The `k` pair at `lo` as one word: `lo[0]` in the low half, `lo[step]` (zero without
/// `has_hi`, past an odd block's end) in the high half.
#[inline]
unsafe fn pair(lo: *const u16, step: usize, has_hi: bool) -> u32 {
    let hi = if has_hi { *lo.add(step) as u32 } else { 0 };
    *lo as u32 | hi << 16
}

/// 48 pairs from two contiguous rows: `out[j] = r0[j] | r1[j] << 16`.
#[inline]
unsafe fn pack_rows(out: &mut [u32], r0: *const u16, r1: *const u16) {
    #[cfg(target_arch = "x86_64")]
    {
        pack_rows_avx512(out, r0, r1)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        for (j, o) in out.iter_mut().enumerate() {
            *o = *r0.add(j) as u32 | (*r1.add(j) as u32) << 16;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_rows_avx512(out: &mut [u32], r0: *const u16, r1: *const u16) {
    use std::arch::x86_64::*;
    for s in 0..NR / 16 {
        let lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(r0.add(16 * s) as *const __m256i));
        let hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256(r1.add(16 * s) as *const __m256i));
        let v = _mm512_or_si512(lo, _mm512_slli_epi32::<16>(hi));
        _mm512_storeu_si512(out.as_mut_ptr().add(16 * s) as *mut _, v);
    }
}

/// The 8×48 tile `Σ_q a_q ⊗ b_q` over `kq` pairs, stored to `t` (row stride `ld`), or added to
/// it with `add`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn micro(kq: usize, a: *const u32, b: *const u32, t: *mut f32, ld: usize, add: bool) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 3]; MR];
    for q in 0..kq {
        let bq = b.add(q * NR);
        let bv: [__m512bh; 3] = [
            std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bq as *const _)),
            std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bq.add(16) as *const _)),
            std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bq.add(32) as *const _)),
        ];
        let aq = a.add(q * MR);
        for (i, row) in acc.iter_mut().enumerate() {
            let av = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(*aq.add(i) as i32));
            row[0] = _mm512_dpbf16_ps(row[0], av, bv[0]);
            row[1] = _mm512_dpbf16_ps(row[1], av, bv[1]);
            row[2] = _mm512_dpbf16_ps(row[2], av, bv[2]);
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (s, v) in row.iter().enumerate() {
            let p = t.add(i * ld + 16 * s);
            let v = if add {
                _mm512_add_ps(_mm512_loadu_ps(p), *v)
            } else {
                *v
            };
            _mm512_storeu_ps(p, v);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn micro(_: usize, _: *const u32, _: *const u32, _: *mut f32, _: usize, _: bool) {
    unreachable!("gemm_bf16 needs AVX-512 BF16 (`available`)")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf16(x: f32) -> u16 {
        (crate::fused::round_bf16(x).to_bits() >> 16) as u16
    }

    fn widen(x: u16) -> f64 {
        f32::from_bits((x as u32) << 16) as f64
    }

    /// Every shape class (edges of MR, NR, KC; odd k; transposed operands) against the exact
    /// product of the bf16 operands: each f32 sum within the f32 roundings of its additions.
    #[test]
    fn products_match_the_exact_sum_for_edges_strides_and_blocks() {
        if !available() {
            eprintln!("SKIPPED: no AVX-512 BF16 on this CPU");
            return;
        }
        for &(m, k, n) in &[
            (1, 1, 1),
            (8, 2, 48),
            (9, 3, 49),
            (17, 255, 97),
            (5, 257, 10),
            (33, 600, 50),
        ] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let a: Vec<u16> = (0..m * k)
                    .map(|i| bf16(((i * 37 % 101) as f32 - 50.0) / 32.0))
                    .collect();
                let b: Vec<u16> = (0..k * n)
                    .map(|i| bf16(((i * 53 % 97) as f32 - 48.0) / 16.0))
                    .collect();
                let ast = if ta { (1, m) } else { (k, 1) };
                let bst = if tb { (1, k) } else { (n, 1) };
                let ldc = n + 3;
                let mut c = vec![f32::NAN; m * ldc];
                unsafe {
                    gemm_bf16(
                        (m, k, n),
                        a.as_ptr(),
                        ast,
                        b.as_ptr(),
                        bst,
                        c.as_mut_ptr(),
                        ldc,
                    );
                }
                for i in 0..m {
                    for j in 0..n {
                        let (mut s, mut mag) = (0f64, 0f64);
                        for p in 0..k {
                            let x =
                                widen(a[i * ast.0 + p * ast.1]) * widen(b[p * bst.0 + j * bst.1]);
                            s += x;
                            mag += x.abs();
                        }
                        let got = c[i * ldc + j] as f64;
                        // Each of the k additions rounds at most once (any CPU's order).
                        assert!(
                            (got - s).abs() <= mag * k as f64 * 2f64.powi(-24),
                            "{m}×{k}×{n} ta={ta} tb={tb} [{i},{j}]: {got} vs {s}"
                        );
                    }
                    // The row stride's gap is untouched.
                    assert!(c[i * ldc + n..(i + 1) * ldc].iter().all(|x| x.is_nan()));
                }
            }
        }
    }
}
