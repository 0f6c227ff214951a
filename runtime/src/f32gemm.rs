//! f32 GEMM on AVX-512F: the single-threaded product under `gemm.rs`'s splits, with its packing
//! buffers kept between calls so that a step allocates nothing after its first run.
//!
//! The `gemm` crate (still the path on machines without AVX-512) allocates its packed panels
//! and a bookkeeping vector on every call: three allocations per product, dozens per training
//! step. This kernel packs into buffers kept between calls (see "Scratch" below).
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
//! - 16-bit operands ([`gemm_half`]: f16, or bf16 without AVX-512 BF16) are widened to f32 as
//!   they are packed, `a` [`MC`] rows at a time, so no widened copy of either operand exists
//!   and the sums are those of the f32 GEMM of the widened operands.
//! - The micro-kernel holds an 8×(16·NV) tile of f32 sums in 8·NV registers, NV = 3, 2 or 1.
//!
//! Summation order: each element of `a·b` is the sum over the `k` blocks, in order, of each
//! block's sum, which runs `p` in order through one FMA chain. It depends on `k` and [`KC`]
//! only, never on the panel an element falls in or on how the caller splits `m` or `n`, so
//! results do not depend on the thread count. `c ← (accumulate ? c : 0) + scale·(a·b)` is
//! applied per block, as the `gemm` crate does: the first block's sums go to `c` as given,
//! later blocks' (times `scale`, 1 skipping the multiply) add to it.
//!
//! Scratch: packing buffers come from a shared free list whose every buffer is as long as the
//! largest call so far needed; a caller that splits a product across the pool first makes sure
//! there is one per pool thread ([`reserve`]). So once every product of a plan has run, a run
//! takes buffers and never allocates (`tests/alloc_steady.rs`). Buffers are kept for the
//! process's life, as the pool's threads are. A thread whose allocations are measured (an
//! allocator tag: the memory plan's scratch estimate, `--memory-limit` runs) packs into
//! buffers of its own, freed after each call, so the plan's kernel scratch stays what the
//! kernels allocate while they run; the arithmetic, so the bits, are the same.

use std::sync::Mutex;

/// Rows of `a` per micro-panel.
pub(crate) const MR: usize = 8;
/// Columns of `b` per micro-panel (three zmm registers of 16 lanes).
pub(crate) const NR: usize = 48;
/// `k` per block: a packed `b` panel (`KC·NR` f32, 24 KiB) stays in L1.
pub(crate) const KC: usize = 128;
/// Rows of a 16-bit `a` widened per block (`MC·KC` f32, 256 KiB, in L2).
const MC: usize = 512;

/// A 16-bit float format of GEMM operands ([`gemm_half`]), widened to f32 as they are packed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Half {
    /// IEEE binary16.
    F16,
    /// bfloat16.
    Bf16,
}

impl Half {
    /// `x` widened to f32 (exact).
    #[inline(always)]
    fn widen(self, x: u16) -> f32 {
        match self {
            Half::F16 => crate::fused::f16_to_f32(x),
            Half::Bf16 => crate::fused::bf16_to_f32(x),
        }
    }
}

/// Where a GEMM operand's elements are: f32 (read in place where it can be), or 16-bit floats
/// of a format (always packed, widening).
#[derive(Clone, Copy)]
enum Src {
    F32(*const f32),
    Half(*const u16, Half),
}

impl Src {
    unsafe fn add(self, i: usize) -> Src {
        match self {
            Src::F32(p) => Src::F32(p.add(i)),
            Src::Half(p, h) => Src::Half(p.add(i), h),
        }
    }

    unsafe fn get(self, i: usize) -> f32 {
        match self {
            Src::F32(p) => *p.add(i),
            Src::Half(p, h) => h.widen(*p.add(i)),
        }
    }
}

/// Whether the CPU has AVX-512F and `CLEAVE_GEMM=library` does not ask for the `gemm` crate
/// instead (checked once).
///
/// The memory plan needs nothing of its own for this kernel: it measures kernel scratch as what
/// kernels allocate on a measured thread (`runner::device_memory::kernel_scratch`), where this
/// kernel packs into per-call buffers (see `Scratch::take`), 8 times less than the crate on
/// GPT-tiny's stages.
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

/// Kernel scratch for one call: the packed last panel of `a`'s rows and the packed `b` block.
#[derive(Default)]
struct Scratch {
    a: Vec<f32>,
    b: Vec<f32>,
}

/// The scratch not in use, every one at least [`Buffers::need`] long, so that a call that
/// takes one never grows it once the largest product has run (a call that needs more raises
/// the mark and grows every free buffer). Shared rather than per thread: which pool thread
/// runs which part of a split product changes from run to run.
struct Buffers {
    /// Elements of `a` and of `b` the largest call so far packed.
    need: (usize, usize),
    free: Vec<Scratch>,
}

static BUFFERS: Mutex<Buffers> = Mutex::new(Buffers {
    need: (0, 0),
    free: Vec::new(),
});

impl Buffers {
    fn lock() -> std::sync::MutexGuard<'static, Buffers> {
        BUFFERS.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Raises the mark to `need` and grows the free buffers to it.
    fn raise(&mut self, need: (usize, usize)) {
        if need.0 > self.need.0 || need.1 > self.need.1 {
            self.need = (self.need.0.max(need.0), self.need.1.max(need.1));
            let mark = self.need;
            for s in &mut self.free {
                s.fit(mark);
            }
        }
    }
}

impl Scratch {
    fn fit(&mut self, (a, b): (usize, usize)) {
        for (v, n) in [(&mut self.a, a), (&mut self.b, b)] {
            if v.len() < n {
                v.resize(n, 0.0);
            }
        }
    }

    /// A buffer for a call of shape `(m, k, n)` (see [`Buffers`]). On a thread whose
    /// allocations are being measured (an allocator tag is set: the memory plan's scratch
    /// estimate, a run under `--memory-limit`) a buffer of its own instead, freed after the
    /// call: the plan accounts kernel scratch as what a kernel allocates while it runs.
    fn take(shape: (usize, usize, usize), half: bool) -> Scratch {
        let need = needs(shape, half);
        if crate::alloc::current_tag() != 0 {
            let mut s = Scratch::default();
            s.fit(need);
            return s;
        }
        let mut g = Buffers::lock();
        g.raise(need);
        let mut s = g.free.pop().unwrap_or_default();
        s.fit(g.need);
        s
    }

    fn give(mut self) {
        if crate::alloc::current_tag() != 0 {
            return;
        }
        let mut g = Buffers::lock();
        let mark = g.need;
        self.fit(mark);
        g.free.push(self);
    }
}

/// Elements of packed `a` and `b` a call of shape `(m, k, n)` needs (`half`: 16-bit operands,
/// whose `a` is packed [`MC`] rows at a time).
fn needs((m, k, n): (usize, usize, usize), half: bool) -> (usize, usize) {
    let kc = KC.min(k);
    let rows = if half {
        MC.min(m.next_multiple_of(MR))
    } else {
        MR
    };
    (kc * rows, n.div_ceil(NR) * kc * NR)
}

/// Makes `threads` free buffers, each large enough for products of shape `(m, k, n)`: called
/// by a caller that splits a product across the pool (each part's shape at most `(m, k, n)`),
/// so that every thread that may run a part finds one (`half`: for [`gemm_half`]). A no-op
/// unless [`available`].
pub(crate) fn reserve(threads: usize, shape: (usize, usize, usize), half: bool) {
    // Nothing to reserve when the `gemm` crate runs the products, or on a measured thread,
    // which runs every part itself on buffers of its own (see `take`).
    if !available() || crate::alloc::current_tag() != 0 {
        return;
    }
    let mut g = Buffers::lock();
    g.raise(needs(shape, half));
    let mark = g.need;
    while g.free.len() < threads {
        let mut s = Scratch::default();
        s.fit(mark);
        g.free.push(s);
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
    gemm_src(
        (m, k, n),
        Src::F32(a),
        (ars, acs),
        Src::F32(b),
        (brs, bcs),
        c,
        ldc,
        accumulate,
        scale,
    );
}

/// [`gemm_f32`] for 16-bit float operands of format `half` (`c` f32, overwritten): widened as
/// they are packed, so the product's f32 sums are those of the widened operands' f32 GEMM,
/// bit for bit, without widened copies.
///
/// # Safety
/// As [`gemm_f32`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_half(
    half: Half,
    (m, k, n): (usize, usize, usize),
    a: *const u16,
    ast: (usize, usize),
    b: *const u16,
    bst: (usize, usize),
    c: *mut f32,
    ldc: usize,
) {
    gemm_src(
        (m, k, n),
        Src::Half(a, half),
        ast,
        Src::Half(b, half),
        bst,
        c,
        ldc,
        false,
        1.0,
    );
}

#[allow(clippy::too_many_arguments)]
unsafe fn gemm_src(
    (m, k, n): (usize, usize, usize),
    a: Src,
    (ars, acs): (usize, usize),
    b: Src,
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
        crate::gemm::empty_product((m, n), c, ldc, accumulate);
        return;
    }
    // An f32 `a` is read in place; a 16-bit one is widened into panels, MC rows at a time.
    let in_place = matches!(a, Src::F32(_));
    let mut s = Scratch::take((m, k, n), !in_place);
    let np = n.div_ceil(NR);
    let mut tile = [0f32; MR * NR];
    let mut p0 = 0;
    while p0 < k {
        let kc = KC.min(k - p0);
        // The epilogue on each block's sums: the first block's on `c` as given, every later
        // block's adds to what `c` holds.
        let out = Out {
            accumulate: accumulate || p0 > 0,
            scale,
        };
        let ab = a.add(p0 * acs);
        pack_b(&mut s.b, (kc, n), b.add(p0 * brs), (brs, bcs));
        let mut i0 = 0;
        while i0 < m {
            let mc = if in_place { m - i0 } else { MC.min(m - i0) };
            let ai = ab.add(i0 * ars);
            // Where the micro-kernel reads a 16-bit `a`'s widened block: rows and columns
            // `wst` apart in `s.a`.
            let mut wst = (0, 0);
            if let Src::Half(ai, h) = ai {
                wst = widen_a(&mut s.a, (mc, kc), ai, h, (ars, acs));
            } else if let (Src::F32(ai), true) = (ai, mc % MR != 0) {
                // The last panel of rows, zero past `m`; the whole panels read `a` in place.
                let last = mc - mc % MR;
                pack_a(&mut s.a, (mc % MR, kc), ai.add(last * ars), (ars, acs));
            }
            for jp in 0..np {
                let (j0, nr) = (jp * NR, NR.min(n - jp * NR));
                let nv = nr.div_ceil(16);
                let bpanel = s.b.as_ptr().add(jp * kc * NR);
                for ip in 0..mc.div_ceil(MR) {
                    let (r0, mr) = (ip * MR, MR.min(mc - ip * MR));
                    let i = i0 + r0;
                    // Row `i`, column `p` of the panel at `ap[i·rs + p·cs]`.
                    let (ap, rs, cs) = match ai {
                        Src::F32(a) if mr == MR => (a.add(r0 * ars), ars, acs),
                        Src::F32(_) => (s.a.as_ptr(), 1, MR),
                        Src::Half(..) => (s.a.as_ptr().add(r0 * wst.0), wst.0, wst.1),
                    };
                    let whole = mr == MR && nr == 16 * nv;
                    let (t, ld) = if whole {
                        (c.add(i * ldc + j0), ldc)
                    } else {
                        (tile.as_mut_ptr(), NR)
                    };
                    if !whole {
                        // The edge tile goes through `tile`: load what it adds to.
                        for r in 0..mr {
                            let row = std::slice::from_raw_parts(c.add((i + r) * ldc + j0), nr);
                            tile[r * NR..r * NR + nr].copy_from_slice(row);
                        }
                    }
                    match nv {
                        3 => micro::<3>(kc, (ap, rs, cs), bpanel, t, ld, out),
                        2 => micro::<2>(kc, (ap, rs, cs), bpanel, t, ld, out),
                        _ => micro::<1>(kc, (ap, rs, cs), bpanel, t, ld, out),
                    }
                    if !whole {
                        for r in 0..mr {
                            let row = std::slice::from_raw_parts_mut(c.add((i + r) * ldc + j0), nr);
                            row.copy_from_slice(&tile[r * NR..r * NR + nr]);
                        }
                    }
                }
            }
            i0 += mc;
        }
        p0 += kc;
    }
    s.give();
}

/// What the micro-kernel does with its tile of sums `t`: `c = (accumulate ? c : 0) + scale·t`
/// (`scale` 1 skips the multiply).
#[derive(Clone, Copy)]
struct Out {
    accumulate: bool,
    scale: f32,
}

/// Packs the last `mr < MR` rows of an f32 `a`'s block (`mr×kc`) into one panel of [`MR`] rows:
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

/// Widens a 16-bit `a`'s `mc×kc` block into `dst` in the block's own orientation (so each
/// pass runs along contiguous elements and vectorises), with zero rows past `mc` up to a
/// multiple of [`MR`]. Returns the copy's (row, column) strides.
unsafe fn widen_a(
    dst: &mut [f32],
    (mc, kc): (usize, usize),
    a: *const u16,
    half: Half,
    (ars, acs): (usize, usize),
) -> (usize, usize) {
    let rows = mc.next_multiple_of(MR);
    if ars == 1 && acs != 1 {
        // A transposed `a`: each column's rows are contiguous.
        for p in 0..kc {
            let col = &mut dst[p * rows..(p + 1) * rows];
            widen_row(
                &mut col[..mc],
                std::slice::from_raw_parts(a.add(p * acs), mc),
                half,
            );
            col[mc..].fill(0.0);
        }
        return (1, rows);
    }
    for i in 0..rows {
        let row = &mut dst[i * kc..(i + 1) * kc];
        if i >= mc {
            row.fill(0.0);
        } else if acs == 1 {
            widen_row(row, std::slice::from_raw_parts(a.add(i * ars), kc), half);
        } else {
            for (p, x) in row.iter_mut().enumerate() {
                *x = half.widen(*a.add(i * ars + p * acs));
            }
        }
    }
    (kc, 1)
}

/// Packs `b`'s `kc×n` block (widened where it is 16-bit) into panels of [`NR`] columns (the
/// last one `16·⌈nr/16⌉` wide): panel `jp`, row `p`, column `j` at `jp·kc·NR + p·w + j` for the
/// panel's width `w`, columns past `n` zero.
unsafe fn pack_b(dst: &mut [f32], (kc, n): (usize, usize), b: Src, (brs, bcs): (usize, usize)) {
    for jp in 0..n.div_ceil(NR) {
        let (j0, nr) = (jp * NR, NR.min(n - jp * NR));
        let w = nr.next_multiple_of(16);
        let panel = &mut dst[jp * kc * NR..jp * kc * NR + kc * w];
        let src = b.add(j0 * bcs);
        match src {
            Src::F32(src) if bcs == 1 => {
                for p in 0..kc {
                    let row = std::slice::from_raw_parts(src.add(p * brs), nr);
                    panel[p * w..p * w + nr].copy_from_slice(row);
                }
            }
            // A transposed `b`: its columns are contiguous rows of length `kc`.
            Src::F32(src) if brs == 1 => {
                crate::gemm::transpose(src, (nr, kc), bcs, panel.as_mut_ptr(), w)
            }
            Src::Half(src, h) if bcs == 1 => {
                for p in 0..kc {
                    let row = std::slice::from_raw_parts(src.add(p * brs), nr);
                    widen_row(&mut panel[p * w..p * w + nr], row, h);
                }
            }
            Src::Half(src, h) if brs == 1 => {
                // A transposed `b`: its columns widened as contiguous rows, then transposed.
                let mut cols = [0f32; NR * KC];
                for j in 0..nr {
                    let col = std::slice::from_raw_parts(src.add(j * bcs), kc);
                    widen_row(&mut cols[j * kc..(j + 1) * kc], col, h);
                }
                crate::gemm::transpose(cols.as_ptr(), (nr, kc), kc, panel.as_mut_ptr(), w);
            }
            src => {
                for p in 0..kc {
                    for j in 0..nr {
                        panel[p * w + j] = src.get(p * brs + j * bcs);
                    }
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

/// `src` widened into `dst` (the same length), one loop per format so that each vectorises.
pub(crate) fn widen_row(dst: &mut [f32], src: &[u16], half: Half) {
    match half {
        Half::F16 => {
            for (d, &x) in dst.iter_mut().zip(src) {
                *d = crate::fused::f16_to_f32(x);
            }
        }
        Half::Bf16 => {
            for (d, &x) in dst.iter_mut().zip(src) {
                *d = crate::fused::bf16_to_f32(x);
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
            let v = if out.scale == 1.0 {
                v
            } else {
                _mm512_mul_ps(_mm512_set1_ps(out.scale), v)
            };
            let v = if out.accumulate {
                _mm512_add_ps(_mm512_loadu_ps(q), v)
            } else {
                v
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
        #[cfg(target_arch = "x86_64")]
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        #[cfg(not(target_arch = "x86_64"))]
        return;
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

    /// 16-bit operands widened as they are packed (f16 and bf16; rows past [`MC`], every
    /// transpose, strided operands): the bits of the f32 kernel on widened copies, and the same
    /// bits when `gemm.rs` shares the product (or a batch of items) across the pool.
    #[test]
    fn half_operands_give_the_bits_of_the_widened_f32_product() {
        if !available() {
            return;
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for half in [Half::F16, Half::Bf16] {
            let narrow = |v: Vec<f32>| -> Vec<u16> {
                v.iter()
                    .map(|&x| match half {
                        Half::F16 => crate::fused::round_f16(x * 3.0),
                        Half::Bf16 => (crate::fused::round_bf16(x * 3.0).to_bits() >> 16) as u16,
                    })
                    .collect()
            };
            for &(batch, m, k, n) in &[
                (1, 9, 129, 49),
                (1, 300, 40, 70),
                (2, 13, 300, 33),
                (1, 257, 130, 260),
                (6, 64, 64, 64),
            ] {
                for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                    let (a, b) = (
                        narrow(data(batch * m * k, 4)),
                        narrow(data(batch * k * n, 5)),
                    );
                    let ast = if ta { (1, m) } else { (k, 1) };
                    let bst = if tb { (1, k) } else { (n, 1) };
                    let wa: Vec<f32> = a.iter().map(|&x| half.widen(x)).collect();
                    let wb: Vec<f32> = b.iter().map(|&x| half.widen(x)).collect();
                    let mut want = vec![0f32; batch * m * n];
                    let mut one = vec![1f32; batch * m * n];
                    let mut shared = vec![2f32; batch * m * n];
                    unsafe {
                        for i in 0..batch {
                            let (ao, bo, co) = (i * m * k, i * k * n, i * m * n);
                            gemm_f32(
                                (m, k, n),
                                wa.as_ptr().add(ao),
                                ast,
                                wb.as_ptr().add(bo),
                                bst,
                                want.as_mut_ptr().add(co),
                                n,
                                false,
                                1.0,
                            );
                            gemm_half(
                                half,
                                (m, k, n),
                                a.as_ptr().add(ao),
                                ast,
                                b.as_ptr().add(bo),
                                bst,
                                one.as_mut_ptr().add(co),
                                n,
                            );
                        }
                        crate::gemm::widening_batched(
                            half,
                            batch,
                            (m, k, n),
                            a.as_ptr(),
                            ast,
                            b.as_ptr(),
                            bst,
                            shared.as_mut_ptr(),
                        );
                    }
                    let case = format!("{half:?} {batch}×{m}×{k}×{n} ta {ta} tb {tb}");
                    assert_eq!(bits(&one), bits(&want), "{case}");
                    assert_eq!(bits(&shared), bits(&want), "{case}, shared");
                }
            }
        }
    }
}
