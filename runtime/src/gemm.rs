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
//! Calls are single-threaded: at these sizes the libraries' own threading does not pay.

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
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}
