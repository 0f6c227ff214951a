//! Single-precision GEMM: the splits across the pool, over a single-threaded product that runs
//! cleave's own kernel on an AVX-512F CPU (`f32gemm.rs`: packing into reused buffers, so a
//! step allocates nothing after its first), else, or with `CLEAVE_GEMM=library`, the `gemm`
//! crate. What follows is why the crate was the library, and how the splits work.
//!
//! Why `gemm` (0.19, feature `x86-v4`) and not `matrixmultiply` (0.3): measured here (2 cores,
//! AVX-512, release, one thread, median of 300 calls on warm buffers), for the MLP
//! 784-256-256-10 batch-64 products:
//!
//! | m×k×n (transposes) | matrixmultiply | gemm x86-v4 |
//! |---|---|---|
//! | 64×784×256 | 142 µs | 114 µs |
//! | 64×256×256 | 43 µs | 36 µs |
//! | 64×256×784 (Bᵀ) | 164 µs | 155 µs |
//! | 784×64×256 (Aᵀ) | 112 µs | 105 µs |
//! | 256×64×256 (Aᵀ) | 37 µs | 35 µs |
//! | 64×256×10 | 6.9 µs | 4.7 µs |
//!
//! `gemm` is 5–30% faster on every shape. Without `x86-v4` it does not use AVX-512 (about 2.5×
//! slower). Both take arbitrary row and column strides, so transposed operands cost nothing.
//!
//! Threads: at these sizes the libraries' own threading does not pay (it starts its threads per
//! call). Instead, with more than one thread in the pool (`CLEAVE_THREADS`, by default the
//! machine's cores; see `pool.rs` for the measurements), a product of at least [`PAR_MIN_FLOPS`] is split by hand into one block per
//! thread of the persistent [`Pool`](crate::pool::Pool): the larger of `m` and `n` is cut into
//! contiguous ranges (multiples of 16, the AVX-512 lane count), each range one single-threaded
//! `gemm` call on its own rows or columns of `c`. Every element of `c` is still one dot product
//! over all of `k`, computed by the same micro-kernel, so results do not depend on the split.
//!
//! Transposed right operands: "arbitrary strides" is not free for `b`. `gemm` packs its panels
//! of `b` (after swapping the operands to write `c` column-major) with a gather when `b`'s
//! columns, rather than its rows, are contiguous: the input gradients `dy·Wᵀ`. Measured here (one
//! thread, median of warm calls), 64×256×256 takes 221 µs with `Wᵀ` read in place against 78 µs
//! for a row-major `b`. So a product whose `b` is transposed (and at least 16×32×32) first copies
//! `b` into a row-major scratch with 16×16 AVX-512 block transposes (0.25 ns an element; operands
//! of at most [`TRANSPOSE_MAX`] elements), then runs as usual: 95 µs
//! in all for that shape; see BENCHMARKS.md. The choice depends only on the shape and the
//! strides, never on the thread count, so results still do not depend on the split.

use crate::pool::SharedPtr;

/// `c = a·b` (or `c += a·b` with `accumulate`), where element `(i, p)` of `a` is at
/// `a[i·ars + p·acs]`, `(p, j)` of `b` at `b[p·brs + j·bcs]`, and `c` is row-major `m×n`
/// with row stride `ldc`.
///
/// # Safety
/// The pointers must be valid for every position the strides reach, and `c` must not overlap
/// `a` or `b`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm(
    (m, k, n): (usize, usize, usize),
    a: *const f32,
    (ars, acs): (usize, usize),
    b: *const f32,
    (brs, bcs): (usize, usize),
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        empty_product((m, n), c, ldc, accumulate);
        return;
    }
    gemm_par(
        (m, k, n),
        a,
        (ars, acs),
        b,
        (brs, bcs),
        c,
        ldc,
        accumulate,
        1.0,
    );
}

/// A product over `k = 0`: `c` zero, or unchanged with `accumulate`.
///
/// # Safety
/// `c` must be valid for `m` rows of `n` elements `ldc` apart.
pub(crate) unsafe fn empty_product(
    (m, n): (usize, usize),
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    if !accumulate {
        for i in 0..m {
            std::slice::from_raw_parts_mut(c.add(i * ldc), n).fill(0.0);
        }
    }
}

/// `c ← (accumulate ? c : 0) + scale·a·b`, split across the pool when the product is large
/// enough (see the module's notes on threads), a transposed `b` copied row-major first
/// ([`RightOperand`]): by each part for its own columns when the split is by columns, once
/// before it otherwise.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_par(
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
    let copy = copies_b((m, k, n), (brs, bcs));
    if let Some(split) = Split::of((m, k, n), (16, 16)) {
        // Scratch for every thread that may run a part (the first part is the largest).
        let part = if split.split_m {
            (split.chunk, k, n)
        } else {
            (m, k, split.chunk)
        };
        crate::f32gemm::reserve(split.pool.threads(), part, false);
        let (a, c) = (SharedPtr(a as *mut f32), SharedPtr(c));
        // Split by rows, every part reads all of `b`: copy it once, here.
        let whole = split
            .split_m
            .then(|| RightOperand::new((k, n), b, (brs, bcs), copy));
        let whole_b = whole.as_ref().map(|w| (SharedPtr(w.ptr as *mut f32), w.st));
        let b = SharedPtr(b as *mut f32);
        split.pool.run(split.parts, &|p| {
            let (lo, len) = split.range(p);
            // SAFETY: each part reads within the caller's operands (and `b`'s copy) and
            // writes its own rows (or columns) of `c`.
            unsafe {
                if let Some((bp, bst)) = whole_b {
                    gemm_1(
                        (len, k, n),
                        a.get().add(lo * ars),
                        (ars, acs),
                        bp.get(),
                        bst,
                        c.get().add(lo * ldc),
                        ldc,
                        accumulate,
                        scale,
                    );
                } else {
                    // Split by columns, each part copies only its own.
                    let own = RightOperand::new((k, len), b.get().add(lo * bcs), (brs, bcs), copy);
                    gemm_1(
                        (m, k, len),
                        a.get(),
                        (ars, acs),
                        own.ptr,
                        own.st,
                        c.get().add(lo),
                        ldc,
                        accumulate,
                        scale,
                    );
                }
            }
        });
        return;
    }
    let rb = RightOperand::new((k, n), b, (brs, bcs), copy);
    gemm_1(
        (m, k, n),
        a,
        (ars, acs),
        rb.ptr,
        rb.st,
        c,
        ldc,
        accumulate,
        scale,
    );
}

/// How one product splits across the pool: its longer side (`m` when `split_m`, else `n`) cut
/// into `parts` contiguous ranges of `chunk` (a multiple of the kernel's row or column unit).
pub(crate) struct Split {
    pub pool: &'static crate::pool::Pool,
    pub split_m: bool,
    pub extent: usize,
    pub chunk: usize,
    pub parts: usize,
}

impl Split {
    /// The split of a product of at least [`PAR_MIN_FLOPS`] with more than one pool thread and
    /// more than one part (ranges in multiples of `units.0` rows or `units.1` columns); `None`
    /// otherwise. Small products never touch the pool (its first use starts its threads).
    pub(crate) fn of((m, k, n): (usize, usize, usize), units: (usize, usize)) -> Option<Split> {
        if 2 * m * k * n < PAR_MIN_FLOPS {
            return None;
        }
        let pool = crate::pool::Pool::global();
        let split_m = m >= n;
        let (extent, unit) = if split_m { (m, units.0) } else { (n, units.1) };
        let chunk = extent.div_ceil(pool.threads()).next_multiple_of(unit);
        (pool.threads() > 1 && chunk < extent).then(|| Split {
            pool,
            split_m,
            extent,
            chunk,
            parts: extent.div_ceil(chunk),
        })
    }

    /// Part `p`'s range of the split side: (first row or column, count).
    pub(crate) fn range(&self, p: usize) -> (usize, usize) {
        let lo = p * self.chunk;
        (lo, self.chunk.min(self.extent - lo))
    }
}

/// For `batch` products each too small to split ([`Split::of`]) but together worth
/// [`PAR_MIN_FLOPS`]: the pool and the items per part, to share them out whole (attention's
/// per-head products). `None` otherwise, without touching the pool.
pub(crate) fn item_chunks(
    batch: usize,
    (m, k, n): (usize, usize, usize),
) -> Option<(&'static crate::pool::Pool, usize)> {
    let one = 2 * m * k * n;
    (batch > 1 && k > 0 && one < PAR_MIN_FLOPS && batch * one >= PAR_MIN_FLOPS)
        .then(crate::pool::Pool::global)
        .filter(|p| p.threads() > 1)
        .map(|p| (p, batch.div_ceil(p.threads())))
}

/// Products whose `b` is transposed and at least this large (m, k, n) copy it first.
const TRANSPOSE_MIN: (usize, usize, usize) = (16, 32, 32);
/// The most elements of `b` copied (256 KiB). The copy is kernel scratch, which the memory plan
/// measures: larger operands (an output layer's `vocabulary × d` weight, whose copy would be as
/// large as the weight) stay in place, where `gemm`'s gather also costs least against the
/// product (1024×256×1024 measured the same either way).
const TRANSPOSE_MAX: usize = 1 << 16;

/// Whether the product copies its `b` row-major first: `b` is transposed (`brs == 1`), the
/// product is at least [`TRANSPOSE_MIN`] and `b` at most [`TRANSPOSE_MAX`] elements. A
/// function of the whole product's shape and strides only, decided before any split.
fn copies_b((m, k, n): (usize, usize, usize), (brs, bcs): (usize, usize)) -> bool {
    let (m0, k0, n0) = TRANSPOSE_MIN;
    // The AVX-512 kernel transposes `b` as it packs it.
    !crate::f32gemm::available()
        && brs == 1
        && bcs != 1
        && m >= m0
        && k >= k0
        && n >= n0
        && k * n <= TRANSPOSE_MAX
}

/// The right operand as a product reads it: `b` itself, or with `copy` (see [`copies_b`]) a
/// row-major copy of it, owned here.
struct RightOperand {
    ptr: *const f32,
    st: (usize, usize),
    _copy: Vec<f32>,
}

impl RightOperand {
    /// # Safety
    /// `b` must be valid for every position its strides reach over `k×n`.
    unsafe fn new(
        (k, n): (usize, usize),
        b: *const f32,
        st: (usize, usize),
        copy: bool,
    ) -> RightOperand {
        if !copy {
            return RightOperand {
                ptr: b,
                st,
                _copy: Vec::new(),
            };
        }
        // The columns of `b` are rows of length k, `st.1` apart: transpose them into a k×n
        // row-major block. The transpose writes every element, so the block starts
        // uninitialised.
        let mut rows = Vec::with_capacity(k * n);
        transpose(b, (n, k), st.1, rows.as_mut_ptr(), n);
        rows.set_len(k * n);
        RightOperand {
            ptr: rows.as_ptr(),
            st: (n, 1),
            _copy: rows,
        }
    }
}

/// `dst[c·ld + r] = src[r·ls + c]` for the `rows×cols` matrix at `src` (row stride `ls`):
/// 16×16 blocks through AVX-512 registers where the machine has it, the edges (and every
/// element elsewhere) one at a time.
///
/// # Safety
/// `src` must be valid for `rows` rows of `cols` elements `ls` apart, `dst` for `cols` rows of
/// `rows` elements `ld` apart, and the two must not overlap.
pub(crate) unsafe fn transpose(
    src: *const f32,
    (rows, cols): (usize, usize),
    ls: usize,
    dst: *mut f32,
    ld: usize,
) {
    let (mut r16, mut c16) = (0, 0);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        (r16, c16) = (rows / 16 * 16, cols / 16 * 16);
        for r in (0..r16).step_by(16) {
            for c in (0..c16).step_by(16) {
                transpose16(src.add(r * ls + c), ls, dst.add(c * ld + r), ld);
            }
        }
    }
    for r in 0..rows {
        // Within the blocks' rows only the columns right of them remain.
        let from = if r < r16 { c16 } else { 0 };
        for c in from..cols {
            *dst.add(c * ld + r) = *src.add(r * ls + c);
        }
    }
}

/// One 16×16 block of [`transpose`]: rows `ls` apart at `src`, written as columns `ld` apart
/// at `dst`. Three rounds of shuffles: pairs of rows (`unpack`), pairs of pairs within 128-bit
/// lanes (`shuffle_ps`), then lanes across registers (`shuffle_f32x4`, twice).
///
/// # Safety
/// As [`transpose`], for a 16×16 block; the machine must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(src: *const f32, ls: usize, dst: *mut f32, ld: usize) {
    use std::arch::x86_64::*;
    let r: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(src.add(i * ls)));
    // t[2i], t[2i+1]: rows 2i and 2i+1 interleaved (low, high halves of each lane).
    let t: [__m512; 16] = std::array::from_fn(|i| {
        let (x, y) = (r[i & !1], r[i | 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_ps(x, y)
        } else {
            _mm512_unpackhi_ps(x, y)
        }
    });
    // u[4q+c]: element c of each 4-column group of every lane, rows 4q..4q+4.
    let u: [__m512; 16] = std::array::from_fn(|i| {
        let (q, c) = (i / 4, i % 4);
        let (x, y) = (t[4 * q + c / 2], t[4 * q + 2 + c / 2]);
        if c % 2 == 0 {
            _mm512_shuffle_ps::<0x44>(x, y)
        } else {
            _mm512_shuffle_ps::<0xEE>(x, y)
        }
    });
    // v[c], v[4+c] from rows 0..8; v[8+c], v[12+c] from rows 8..16.
    let v: [__m512; 16] = std::array::from_fn(|i| {
        let (h, c) = (i / 4, i % 4);
        let base = if h < 2 { 0 } else { 8 };
        let (x, y) = (u[base + c], u[base + 4 + c]);
        if h % 2 == 0 {
            _mm512_shuffle_f32x4::<0x88>(x, y)
        } else {
            _mm512_shuffle_f32x4::<0xDD>(x, y)
        }
    });
    for c in 0..4 {
        let (x, y) = (v[c], v[8 + c]);
        let (z, w) = (v[4 + c], v[12 + c]);
        _mm512_storeu_ps(dst.add(c * ld), _mm512_shuffle_f32x4::<0x88>(x, y));
        _mm512_storeu_ps(dst.add((8 + c) * ld), _mm512_shuffle_f32x4::<0xDD>(x, y));
        _mm512_storeu_ps(dst.add((4 + c) * ld), _mm512_shuffle_f32x4::<0x88>(z, w));
        _mm512_storeu_ps(dst.add((12 + c) * ld), _mm512_shuffle_f32x4::<0xDD>(z, w));
    }
}

/// `batch` products `c_i = a_i·b_i`, item `i`'s operands `i·(m·k)`, `i·(k·n)` and `i·(m·n)`
/// elements on (strides within an item as in [`sgemm`], `c` row-major). Items too small to
/// split on their own but together worth [`PAR_MIN_FLOPS`] are shared out across the pool in
/// contiguous ranges (attention's per-head products); each item is the same single-threaded
/// call either way, so results do not depend on the split.
///
/// # Safety
/// As [`sgemm`], for every item.
pub(crate) unsafe fn sgemm_batched(
    batch: usize,
    (m, k, n): (usize, usize, usize),
    a: *const f32,
    ast: (usize, usize),
    b: *const f32,
    bst: (usize, usize),
    c: *mut f32,
) {
    if let Some((pool, chunk)) = item_chunks(batch, (m, k, n)) {
        crate::f32gemm::reserve(pool.threads(), (m, k, n), false);
        let parts = batch.div_ceil(chunk);
        let (a, b, c) = (
            SharedPtr(a as *mut f32),
            SharedPtr(b as *mut f32),
            SharedPtr(c),
        );
        pool.run(parts, &|p| {
            for bi in p * chunk..((p + 1) * chunk).min(batch) {
                // SAFETY: each part reads its own items and writes its own items of `c`.
                unsafe {
                    let (a, c) = (a.get().add(bi * m * k), c.get().add(bi * m * n));
                    // As `sgemm` would, but on this thread.
                    let rb = RightOperand::new(
                        (k, n),
                        b.get().add(bi * k * n),
                        bst,
                        copies_b((m, k, n), bst),
                    );
                    gemm_1((m, k, n), a, ast, rb.ptr, rb.st, c, n, false, 1.0);
                }
            }
        });
        return;
    }
    for bi in 0..batch {
        sgemm(
            (m, k, n),
            a.add(bi * m * k),
            ast,
            b.add(bi * k * n),
            bst,
            c.add(bi * m * n),
            n,
            false,
        );
    }
}

/// Whether [`hgemm_batched`] can run 16-bit products of format `half` on this CPU: bf16 with
/// `vdpbf16ps` where there is AVX-512 BF16, either format on cleave's own f32 kernel (AVX-512F),
/// which widens the operands as it packs them. Otherwise the caller widens them into copies.
pub(crate) fn hgemm_available(half: crate::f32gemm::Half) -> bool {
    (half == crate::f32gemm::Half::Bf16 && crate::bf16gemm::available())
        || crate::f32gemm::available()
}

/// `c = a·b` (f32 sums) for each of `batch` items of 16-bit float operands of format `half`
/// (strides as in [`sgemm`], items `m·k`, `k·n` and `m·n` apart, `c` f32 row-major), read as
/// stored: bf16 by `vdpbf16ps` where the CPU has it ([`crate::bf16gemm`]), else through cleave's
/// own kernel, which widens the operands as it packs them ([`crate::f32gemm::gemm_half`]: the
/// bits of the f32 GEMM of the widened operands). Shared across the pool by [`batched_16`], so
/// the sums do not depend on the split.
///
/// # Safety
/// [`hgemm_available`] must be true; otherwise as [`sgemm`], for every item.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn hgemm_batched(
    half: crate::f32gemm::Half,
    batch: usize,
    (m, k, n): (usize, usize, usize),
    a: *const u16,
    ast: (usize, usize),
    b: *const u16,
    bst: (usize, usize),
    c: *mut f32,
) {
    if half == crate::f32gemm::Half::Bf16 && crate::bf16gemm::available() {
        crate::bf16gemm::gemm_bf16_batched(batch, (m, k, n), a, ast, b, bst, c);
    } else {
        widening_batched(half, batch, (m, k, n), a, ast, b, bst, c);
    }
}

/// [`hgemm_batched`] on cleave's own kernel, whatever the format: the bits of the f32 GEMM of
/// the widened operands.
///
/// # Safety
/// [`crate::f32gemm::available`] must be true; otherwise as [`sgemm`], for every item.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn widening_batched(
    half: crate::f32gemm::Half,
    batch: usize,
    (m, k, n): (usize, usize, usize),
    a: *const u16,
    ast: (usize, usize),
    b: *const u16,
    bst: (usize, usize),
    c: *mut f32,
) {
    use crate::f32gemm::{gemm_half, reserve};
    batched_16(
        batch,
        (m, k, n),
        (a, ast),
        (b, bst),
        c,
        (16, 16),
        &|threads, part| reserve(threads, part, true),
        // SAFETY: `batched_16` passes operands within the caller's, as `gemm_half` needs.
        &|shape, a, b, c| unsafe { gemm_half(half, shape, a, ast, b, bst, c, n) },
    );
}

/// One single-threaded product of 16-bit operands: `(shape, a, b, c)`, `c`'s row stride the
/// whole product's `n`.
pub(crate) type Product16<'a> =
    dyn Fn((usize, usize, usize), *const u16, *const u16, *mut f32) + Sync + 'a;

/// Runs `batch` products of 16-bit operands (items `m·k`, `k·n` and `m·n` apart, `c` f32
/// row-major) through `one`, across the pool as f32 products are: a product of at least
/// [`PAR_MIN_FLOPS`] by its longer side into one range per thread (multiples of `units.0` rows
/// or `units.1` columns), smaller items shared out whole ([`item_chunks`]). `prepare(threads,
/// part)` runs first when the pool is used (the kernel's scratch for each thread). Each element
/// is still one call's sum, so results do not depend on the split.
///
/// # Safety
/// As [`sgemm`], for every item; `one` must be safe to call with any part of them.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn batched_16(
    batch: usize,
    (m, k, n): (usize, usize, usize),
    (a, (ars, _)): (*const u16, (usize, usize)),
    (b, (_, bcs)): (*const u16, (usize, usize)),
    c: *mut f32,
    units: (usize, usize),
    prepare: &dyn Fn(usize, (usize, usize, usize)),
    one: &Product16<'_>,
) {
    let (a, b, c) = (
        SharedPtr(a as *mut u16),
        SharedPtr(b as *mut u16),
        SharedPtr(c),
    );
    let item = |bi: usize| {
        (
            a.get().add(bi * m * k) as *const u16,
            b.get().add(bi * k * n) as *const u16,
            c.get().add(bi * m * n),
        )
    };
    if let Some(split) = Split::of((m, k, n), units) {
        prepare(
            split.pool.threads(),
            if split.split_m {
                (split.chunk, k, n)
            } else {
                (m, k, split.chunk)
            },
        );
        for bi in 0..batch {
            let (a, b, c) = item(bi);
            let (a, b, c) = (
                SharedPtr(a as *mut u16),
                SharedPtr(b as *mut u16),
                SharedPtr(c),
            );
            split.pool.run(split.parts, &|p| {
                let (lo, len) = split.range(p);
                // Each part reads within the operands and writes its own rows (or columns).
                if split.split_m {
                    let (a, c) = (a.get().add(lo * ars), c.get().add(lo * n));
                    one((len, k, n), a, b.get(), c);
                } else {
                    let (b, c) = (b.get().add(lo * bcs), c.get().add(lo));
                    one((m, k, len), a.get(), b, c);
                }
            });
        }
    } else if let Some((pool, chunk)) = item_chunks(batch, (m, k, n)) {
        prepare(pool.threads(), (m, k, n));
        pool.run(batch.div_ceil(chunk), &|p| {
            for bi in p * chunk..((p + 1) * chunk).min(batch) {
                // Each part reads and writes its own items.
                let (a, b, c) = item(bi);
                one((m, k, n), a, b, c);
            }
        });
    } else {
        for bi in 0..batch {
            let (a, b, c) = item(bi);
            one((m, k, n), a, b, c);
        }
    }
}

/// Products of at least this many FLOPs (about 10 µs on one core) are split across the pool's
/// threads. It was 2²³ until the GPT block's 128×64×256 and 128×64×64 products were measured to
/// gain from the split too: the block's step took 0.59 ms with 2²³, 0.51 with 2²¹ and 0.49
/// with 2²⁰ (medians of six runs alternated in one session, BENCHMARKS.md).
pub(crate) const PAR_MIN_FLOPS: usize = 1 << 20;

/// One single-threaded `gemm` call: `c ← (accumulate ? c : 0) + scale·a·b` (see [`sgemm`]).
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_1(
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
    if crate::f32gemm::available() {
        crate::f32gemm::gemm_f32(
            (m, k, n),
            a,
            (ars, acs),
            b,
            (brs, bcs),
            c,
            ldc,
            accumulate,
            scale,
        );
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        c,
        1,
        ldc as isize,
        accumulate,
        a,
        acs as isize,
        ars as isize,
        b,
        bcs as isize,
        brs as isize,
        if accumulate { 1.0 } else { 0.0 },
        scale,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// `c ← c + scale·a·b` (strides as in [`sgemm`], split across the pool as it is): gemm's
/// `dst = α·dst + β·lhs·rhs` with `α = 1`, `β = scale`. A folded SGD update.
///
/// # Safety
/// As [`sgemm`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm_scaled(
    (m, k, n): (usize, usize, usize),
    a: *const f32,
    (ars, acs): (usize, usize),
    b: *const f32,
    (brs, bcs): (usize, usize),
    c: *mut f32,
    ldc: usize,
    scale: f32,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    gemm_par((m, k, n), a, (ars, acs), b, (brs, bcs), c, ldc, true, scale);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / 65536.0)
            .map(|x| x.sin())
            .collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn batched_items_shared_across_the_pool_give_the_one_thread_bits() {
        // 32 items of 2·64·32·64 FLOPs: each below the split, together above it.
        let (batch, m, k, n) = (32, 64, 32, 64);
        assert!(2 * m * k * n < PAR_MIN_FLOPS && batch * 2 * m * k * n >= PAR_MIN_FLOPS);
        let (a, b) = (data(batch * m * k, 1), data(batch * k * n, 2));
        for (ast, bst) in [((k, 1), (n, 1)), ((1, m), (1, k))] {
            let mut c = vec![0.0; batch * m * n];
            let mut want = vec![0.0; batch * m * n];
            unsafe {
                sgemm_batched(
                    batch,
                    (m, k, n),
                    a.as_ptr(),
                    ast,
                    b.as_ptr(),
                    bst,
                    c.as_mut_ptr(),
                );
                for i in 0..batch {
                    sgemm(
                        (m, k, n),
                        a.as_ptr().add(i * m * k),
                        ast,
                        b.as_ptr().add(i * k * n),
                        bst,
                        want.as_mut_ptr().add(i * m * n),
                        n,
                        false,
                    );
                }
            }
            assert_eq!(bits(&c), bits(&want));
        }
    }

    #[test]
    fn a_split_update_gives_the_one_thread_bits() {
        // A folded SGD update `c += s·aᵀ·b`, large enough to split (rows, then columns).
        for (m, k, n) in [(256, 1024, 96), (96, 1024, 256)] {
            assert!(2 * m * k * n >= PAR_MIN_FLOPS);
            let (a, b, c0) = (data(k * m, 3), data(k * n, 4), data(m * n, 5));
            let (mut c, mut want) = (c0.clone(), c0);
            unsafe {
                sgemm_scaled(
                    (m, k, n),
                    a.as_ptr(),
                    (1, m),
                    b.as_ptr(),
                    (n, 1),
                    c.as_mut_ptr(),
                    n,
                    -0.01,
                );
                gemm_1(
                    (m, k, n),
                    a.as_ptr(),
                    (1, m),
                    b.as_ptr(),
                    (n, 1),
                    want.as_mut_ptr(),
                    n,
                    true,
                    -0.01,
                );
            }
            assert_eq!(bits(&c), bits(&want), "{m}x{k}x{n}");
        }
    }

    #[test]
    fn the_block_transpose_moves_every_element() {
        for (rows, cols, ls) in [
            (16, 16, 16),
            (32, 48, 48),
            (37, 53, 60),
            (5, 40, 40),
            (40, 7, 9),
        ] {
            let src = data(rows * ls, 6);
            let ld = rows + 3;
            let mut dst = vec![f32::NAN; cols * ld];
            unsafe { transpose(src.as_ptr(), (rows, cols), ls, dst.as_mut_ptr(), ld) };
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        dst[c * ld + r].to_bits(),
                        src[r * ls + c].to_bits(),
                        "{r},{c}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_transposed_b_gives_the_bits_of_its_row_major_copy() {
        // `dy·Wᵀ` with W row-major n×k, against the same product with W transposed by hand:
        // small (no copy), one thread, and split across the pool by columns and by rows. (Run
        // with CLEAVE_GEMM=library for the `gemm` crate.)
        for (m, k, n) in [
            (8, 64, 64),
            (64, 256, 256),
            (64, 200, 100),
            (256, 128, 300),
            (512, 256, 64),
        ] {
            let (a, w, c0) = (data(m * k, 7), data(n * k, 8), data(m * n, 9));
            let mut bt = vec![0.0; k * n];
            for j in 0..n {
                for p in 0..k {
                    bt[p * n + j] = w[j * k + p];
                }
            }
            for accumulate in [false, true] {
                let (mut c, mut want) = (c0.clone(), c0.clone());
                unsafe {
                    sgemm(
                        (m, k, n),
                        a.as_ptr(),
                        (k, 1),
                        w.as_ptr(),
                        (1, k),
                        c.as_mut_ptr(),
                        n,
                        accumulate,
                    );
                    // The AVX-512 kernel transposes as it packs; the library path copies.
                    let copy = !crate::f32gemm::available() && m >= TRANSPOSE_MIN.0;
                    assert!(copies_b((m, k, n), (1, k)) == copy);
                    gemm_1(
                        (m, k, n),
                        a.as_ptr(),
                        (k, 1),
                        bt.as_ptr(),
                        (n, 1),
                        want.as_mut_ptr(),
                        n,
                        accumulate,
                        1.0,
                    );
                }
                assert_eq!(bits(&c), bits(&want), "{m}x{k}x{n} accumulate {accumulate}");
                let exact: f64 = (0..k).map(|p| a[p] as f64 * w[p] as f64).sum::<f64>()
                    + if accumulate { c0[0] as f64 } else { 0.0 };
                assert!(
                    (c[0] as f64 - exact).abs() < 1e-6 * exact.abs().max(1.0),
                    "{m}x{k}x{n}: {} vs {exact}",
                    c[0]
                );
            }
        }
    }
}
