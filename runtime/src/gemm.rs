//! Single-precision GEMM through the `gemm` crate.
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
        if !accumulate {
            for i in 0..m {
                std::slice::from_raw_parts_mut(c.add(i * ldc), n).fill(0.0);
            }
        }
        return;
    }
    if 2 * m * k * n >= PAR_MIN_FLOPS && crate::pool::Pool::global().threads() > 1 {
        let pool = crate::pool::Pool::global();
        let threads = pool.threads();
        let split_m = m >= n;
        let extent = if split_m { m } else { n };
        let chunk = extent.div_ceil(threads).next_multiple_of(16);
        if chunk < extent {
            let parts = extent.div_ceil(chunk);
            let (a, b, c) = (SendPtr(a as *mut f32), SendPtr(b as *mut f32), SendPtr(c));
            pool.run(parts, &|p| {
                let lo = p * chunk;
                let len = chunk.min(extent - lo);
                // SAFETY: each part reads within the caller's operands and writes its own rows
                // (or columns) of `c`.
                unsafe {
                    if split_m {
                        gemm_1(
                            (len, k, n),
                            a.get().add(lo * ars),
                            (ars, acs),
                            b.get(),
                            (brs, bcs),
                            c.get().add(lo * ldc),
                            ldc,
                            accumulate,
                            1.0,
                        );
                    } else {
                        gemm_1(
                            (m, k, len),
                            a.get(),
                            (ars, acs),
                            b.get().add(lo * bcs),
                            (brs, bcs),
                            c.get().add(lo),
                            ldc,
                            accumulate,
                            1.0,
                        );
                    }
                }
            });
            return;
        }
    }
    gemm_1(
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

/// Products of at least this many FLOPs are split across the pool's threads.
pub(crate) const PAR_MIN_FLOPS: usize = 1 << 23;

/// A raw pointer that parts of one pool job share (they touch disjoint elements).
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}

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

/// `c ← c + scale·a·b` (strides as in [`sgemm`]; single-threaded): gemm's
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
    gemm_1((m, k, n), a, (ars, acs), b, (brs, bcs), c, ldc, true, scale);
}
