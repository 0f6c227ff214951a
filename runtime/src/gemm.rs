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
        if !accumulate {
            for i in 0..m {
                std::slice::from_raw_parts_mut(c.add(i * ldc), n).fill(0.0);
            }
        }
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

/// `c ← (accumulate ? c : 0) + scale·a·b`, split across the pool when the product is large
/// enough (see the module's notes on threads).
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
    if 2 * m * k * n >= PAR_MIN_FLOPS && crate::pool::Pool::global().threads() > 1 {
        let pool = crate::pool::Pool::global();
        let threads = pool.threads();
        let split_m = m >= n;
        let extent = if split_m { m } else { n };
        let chunk = extent.div_ceil(threads).next_multiple_of(16);
        if chunk < extent {
            let parts = extent.div_ceil(chunk);
            let (a, b, c) = (
                SharedPtr(a as *mut f32),
                SharedPtr(b as *mut f32),
                SharedPtr(c),
            );
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
                            scale,
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
                            scale,
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
        scale,
    );
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
    let one = 2 * m * k * n;
    // Small products never touch the pool (its first use starts its threads).
    let pool = (batch > 1 && k > 0 && one < PAR_MIN_FLOPS && batch * one >= PAR_MIN_FLOPS)
        .then(crate::pool::Pool::global)
        .filter(|p| p.threads() > 1);
    if let Some(pool) = pool {
        let chunk = batch.div_ceil(pool.threads());
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
                    gemm_1(
                        (m, k, n),
                        a.get().add(bi * m * k),
                        ast,
                        b.get().add(bi * k * n),
                        bst,
                        c.get().add(bi * m * n),
                        n,
                        false,
                        1.0,
                    );
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

/// Products of at least this many FLOPs are split across the pool's threads.
pub(crate) const PAR_MIN_FLOPS: usize = 1 << 23;

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
        // 32 items of 2·128·64·128 FLOPs: each below the split, together above it.
        let (batch, m, k, n) = (32, 128, 64, 128);
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
                    gemm_1(
                        (m, k, n),
                        a.as_ptr().add(i * m * k),
                        ast,
                        b.as_ptr().add(i * k * n),
                        bst,
                        want.as_mut_ptr().add(i * m * n),
                        n,
                        false,
                        1.0,
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
}
