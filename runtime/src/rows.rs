//! Row-wise kernels: softmax over contiguous rows, layer and RMS norm, cross-entropy and sums
//! over trailing axes.
//!
//! Two things make them fast without changing a bit of their results:
//!
//! - **Rows across the pool.** Each row's result depends on that row alone, so rows are split
//!   into one contiguous range per pool thread once a kernel covers [`PAR_MIN_ELEMENTS`]
//!   elements, as the compiled loops are.
//! - **Eight sums at once.** A row's f64 sum is one in-order chain of additions, as
//!   `Iterator::sum` computes it (from `-0.0`). Such a chain waits on each addition, so
//!   [`block_sums`] runs the chains of eight rows side by side: every chain still adds its row's
//!   terms in order, and the additions of different rows overlap.

use crate::fused::PAR_MIN_ELEMENTS;
use crate::kernels::row_extreme;
use crate::pool::SharedPtr;
use crate::vmath::exp_in_place;

/// Rows summed side by side in [`block_sums`].
const BLOCK: usize = 8;

/// Runs `f(lo, hi)` over contiguous ranges of rows covering `0..rows` (rows of `len`
/// elements): in one call, or in one range per pool thread from [`PAR_MIN_ELEMENTS`] elements.
pub(crate) fn par_rows(rows: usize, len: usize, f: &(dyn Fn(usize, usize) + Sync)) {
    // Small kernels never touch the pool (its first use starts its threads).
    if rows < 2 || rows * len < PAR_MIN_ELEMENTS {
        f(0, rows);
        return;
    }
    let pool = crate::pool::Pool::global();
    let parts = pool.threads().min(rows);
    if parts < 2 {
        f(0, rows);
        return;
    }
    let per = rows.div_ceil(parts);
    pool.run(parts, &|p| {
        let (lo, hi) = ((p * per).min(rows), ((p + 1) * per).min(rows));
        if lo < hi {
            f(lo, hi);
        }
    });
}

/// The f64 sums of `g(i, x)` over each of the `B` rows `r0..r0 + B` of `v` (rows of `len`; `i`
/// counts from 0 within the block): each row's terms added in order, starting from `-0.0`, so
/// each sum has the bits of `row.iter().map(..).sum::<f64>()`.
#[inline(always)]
fn block_sums<const B: usize>(
    v: &[f32],
    len: usize,
    r0: usize,
    g: impl Fn(usize, f32) -> f64,
) -> [f64; B] {
    let rows = &v[r0 * len..(r0 + B) * len];
    let mut acc = [-0.0f64; B];
    for k in 0..len {
        for (i, a) in acc.iter_mut().enumerate() {
            *a += g(i, rows[i * len + k]);
        }
    }
    acc
}

/// The f64 sums of `g(i, x)` over the `b ≤ BLOCK` rows `r0..r0 + b` of `v` (see
/// [`block_sums`]), in the first `b` entries.
#[inline(always)]
fn sums(v: &[f32], len: usize, r0: usize, b: usize, g: impl Fn(usize, f32) -> f64) -> [f64; BLOCK] {
    if b == BLOCK {
        return block_sums::<BLOCK>(v, len, r0, g);
    }
    let mut out = [0.0; BLOCK];
    for (i, o) in out.iter_mut().enumerate().take(b) {
        *o = block_sums::<1>(v, len, r0 + i, |_, x| g(i, x))[0];
    }
    out
}

/// `r = softmax(v)` over contiguous rows of `len`: per row, `exp(x − max)` scaled by the
/// reciprocal of its f64 sum.
///
/// # Safety
/// `v` and `r` must hold the same whole number of rows and not overlap.
pub(crate) unsafe fn softmax(v: &[f32], r: &mut [f32], len: usize) {
    let rows = v.len() / len;
    let (vp, rp) = (SharedPtr(v.as_ptr() as *mut f32), SharedPtr(r.as_mut_ptr()));
    par_rows(rows, len, &|lo, hi| {
        // SAFETY: this range's rows, read from the input and written to the output.
        let (v, r) = unsafe { (vp.rows(len, lo, hi), rp.rows_mut(len, lo, hi)) };
        for (row, orow) in v.chunks_exact(len).zip(r.chunks_exact_mut(len)) {
            let m = row_extreme(row, true);
            for (o, &a) in orow.iter_mut().zip(row) {
                *o = a - m;
            }
        }
        exp_in_place(r);
        let mut r0 = 0;
        while r0 < hi - lo {
            let b = (hi - lo - r0).min(BLOCK);
            let s = sums(r, len, r0, b, |_, e| e as f64);
            for (i, orow) in r[r0 * len..(r0 + b) * len]
                .chunks_exact_mut(len)
                .enumerate()
            {
                let inv = (1.0 / s[i]) as f32;
                for o in orow.iter_mut() {
                    *o *= inv;
                }
            }
            r0 += b;
        }
    });
}

/// `r = norm(v)` over contiguous rows of `len`: layer norm `(x − mean)/√(var + eps)` or RMS
/// norm `x/√(mean(x²) + eps)`, moments in f64.
///
/// # Safety
/// As [`softmax`].
pub(crate) unsafe fn norm(v: &[f32], r: &mut [f32], len: usize, eps: f64, layer: bool) {
    let rows = v.len() / len;
    let (vp, rp) = (SharedPtr(v.as_ptr() as *mut f32), SharedPtr(r.as_mut_ptr()));
    let nf = len as f64;
    par_rows(rows, len, &|lo, hi| {
        // SAFETY: as in `softmax`.
        let (v, r) = unsafe { (vp.rows(len, lo, hi), rp.rows_mut(len, lo, hi)) };
        let mut r0 = 0;
        while r0 < hi - lo {
            let b = (hi - lo - r0).min(BLOCK);
            let (ins, outs) = (
                v[r0 * len..(r0 + b) * len].chunks_exact(len),
                r[r0 * len..(r0 + b) * len].chunks_exact_mut(len),
            );
            if layer {
                let mut mean = sums(v, len, r0, b, |_, a| a as f64);
                mean.iter_mut().for_each(|m| *m /= nf);
                let var = sums(v, len, r0, b, |i, a| {
                    (a as f64 - mean[i]) * (a as f64 - mean[i])
                });
                for (i, (row, orow)) in ins.zip(outs).enumerate() {
                    let inv = 1.0 / (var[i] / nf + eps).sqrt();
                    for (o, &a) in orow.iter_mut().zip(row) {
                        *o = ((a as f64 - mean[i]) * inv) as f32;
                    }
                }
            } else {
                let ms = sums(v, len, r0, b, |_, a| a as f64 * a as f64);
                for (i, (row, orow)) in ins.zip(outs).enumerate() {
                    let inv = 1.0 / (ms[i] / nf + eps).sqrt();
                    for (o, &a) in orow.iter_mut().zip(row) {
                        *o = (a as f64 * inv) as f32;
                    }
                }
            }
            r0 += b;
        }
    });
}

/// Columns of cross-entropy's exponentials per row in its stack buffer.
const CE_CHUNK: usize = 64;

/// Per-row cross-entropy `−(x[label] − max − ln Σ exp(x − max))` of `logits` (rows of `c`)
/// against `labels`, each already checked to be in `0..c`. The exponentials go through a
/// buffer on the stack, never the heap (whose scratch the memory plan would have to count).
///
/// # Safety
/// `labels` and `r` must hold one entry per row of `logits`; `r` must not overlap the others.
pub(crate) unsafe fn cross_entropy(logits: &[f32], labels: &[i32], r: &mut [f32], c: usize) {
    let rows = labels.len();
    let (vp, rp) = (
        SharedPtr(logits.as_ptr() as *mut f32),
        SharedPtr(r.as_mut_ptr()),
    );
    par_rows(rows, c, &|lo, hi| {
        // SAFETY: as in `softmax` (one output per row).
        let (v, r) = unsafe { (vp.rows(c, lo, hi), rp.rows_mut(1, lo, hi)) };
        let mut r0 = 0;
        while r0 < hi - lo {
            let b = (hi - lo - r0).min(BLOCK);
            let mut m = [0.0f32; BLOCK];
            for (i, row) in v[r0 * c..(r0 + b) * c].chunks_exact(c).enumerate() {
                m[i] = row_extreme(row, true);
            }
            // Σ exp(x − max) per row, in order from -0.0, the exponentials a stack chunk
            // at a time (vectorised) and the rows' sums side by side.
            let mut s = [-0.0f64; BLOCK];
            let mut e = [0.0f32; BLOCK * CE_CHUNK];
            let mut k0 = 0;
            while k0 < c {
                let w = CE_CHUNK.min(c - k0);
                for i in 0..b {
                    let row = &v[(r0 + i) * c + k0..(r0 + i) * c + k0 + w];
                    for (d, &x) in e[i * CE_CHUNK..i * CE_CHUNK + w].iter_mut().zip(row) {
                        *d = x - m[i];
                    }
                }
                exp_in_place(&mut e[..b * CE_CHUNK]);
                for k in 0..w {
                    for (i, a) in s.iter_mut().enumerate().take(b) {
                        *a += e[i * CE_CHUNK + k] as f64;
                    }
                }
                k0 += w;
            }
            for i in 0..b {
                let p = r0 + i;
                let lab = labels[lo + p] as usize;
                r[p] = -(((v[p * c + lab] - m[i]) as f64) - s[i].ln()) as f32;
            }
            r0 += b;
        }
    });
}

/// `r[i] = Σ_k v[i·len + k]` in f64 (in order), rounded to f32: a sum over trailing axes.
///
/// # Safety
/// `r` must hold one entry per row of `v` and not overlap it.
pub(crate) unsafe fn row_sums(v: &[f32], r: &mut [f32], len: usize) {
    let (vp, rp) = (SharedPtr(v.as_ptr() as *mut f32), SharedPtr(r.as_mut_ptr()));
    par_rows(r.len(), len, &|lo, hi| {
        // SAFETY: as in `cross_entropy`.
        let (v, r) = unsafe { (vp.rows(len, lo, hi), rp.rows_mut(1, lo, hi)) };
        let mut r0 = 0;
        while r0 < hi - lo {
            let b = (hi - lo - r0).min(BLOCK);
            let s = sums(v, len, r0, b, |_, x| x as f64);
            for i in 0..b {
                r[r0 + i] = s[i] as f32;
            }
            r0 += b;
        }
    });
}

/// `r[j] = Σ_i v[i·n + j]` in f32, rows added in order: a sum over leading axes, its columns
/// split across the pool.
///
/// # Safety
/// `r` must hold `n` entries and not overlap `v`.
pub(crate) unsafe fn col_sums(v: &[f32], r: &mut [f32], n: usize) {
    let count = v.len() / n;
    let (vp, rp) = (SharedPtr(v.as_ptr() as *mut f32), SharedPtr(r.as_mut_ptr()));
    par_rows(n, count, &|lo, hi| {
        // SAFETY: this range's columns of the output; the input is only read.
        let (v, r) = unsafe { (vp.rows(1, 0, count * n), rp.rows_mut(1, lo, hi)) };
        r.fill(0.0);
        for row in v.chunks_exact(n) {
            for (a, &b) in r.iter_mut().zip(&row[lo..hi]) {
                *a += b;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::nan_max;
    use crate::vmath::exp_f32;

    /// Values with ties, zeros of both signs, large and small magnitudes.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (s >> 40) as f32 / (1u64 << 24) as f32;
                match i % 17 {
                    0 => 0.0,
                    1 => -0.0,
                    2 => 3.0,
                    _ => (u - 0.5) * 20.0 * if i % 5 == 0 { 1e3 } else { 1.0 },
                }
            })
            .collect()
    }

    fn same(a: &[f32], b: &[f32], what: &str) {
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()),
                "{what}: element {i}: {x:e} against {y:e}"
            );
        }
    }

    /// Row counts below a block, with a tail, and large enough to split across the pool.
    const SHAPES: [(usize, usize); 5] = [(3, 7), (8, 16), (29, 33), (1000, 128), (517, 256)];

    #[test]
    fn softmax_has_the_bits_of_one_row_at_a_time() {
        for (rows, len) in SHAPES {
            let v = values(rows * len, rows as u64);
            let mut r = vec![0.0; v.len()];
            unsafe { softmax(&v, &mut r, len) };
            let mut want = vec![0.0; v.len()];
            for (row, orow) in v.chunks_exact(len).zip(want.chunks_exact_mut(len)) {
                let m = row.iter().copied().fold(f32::NEG_INFINITY, nan_max);
                let s: f64 = row.iter().map(|&a| exp_f32(a - m) as f64).sum();
                for (o, &a) in orow.iter_mut().zip(row) {
                    *o = exp_f32(a - m) * (1.0 / s) as f32;
                }
            }
            same(&r, &want, &format!("softmax {rows}x{len}"));
        }
    }

    #[test]
    fn norms_have_the_bits_of_one_row_at_a_time() {
        for (rows, len) in SHAPES {
            let v = values(rows * len, 3 + rows as u64);
            for layer in [true, false] {
                let mut r = vec![0.0; v.len()];
                unsafe { norm(&v, &mut r, len, 1e-5, layer) };
                let mut want = vec![0.0; v.len()];
                let n = len as f64;
                for (row, orow) in v.chunks_exact(len).zip(want.chunks_exact_mut(len)) {
                    if layer {
                        let mean = row.iter().map(|&a| a as f64).sum::<f64>() / n;
                        let var = row
                            .iter()
                            .map(|&a| (a as f64 - mean) * (a as f64 - mean))
                            .sum::<f64>()
                            / n;
                        let inv = 1.0 / (var + 1e-5).sqrt();
                        for (o, &a) in orow.iter_mut().zip(row) {
                            *o = ((a as f64 - mean) * inv) as f32;
                        }
                    } else {
                        let ms = row.iter().map(|&a| a as f64 * a as f64).sum::<f64>() / n;
                        let inv = 1.0 / (ms + 1e-5).sqrt();
                        for (o, &a) in orow.iter_mut().zip(row) {
                            *o = (a as f64 * inv) as f32;
                        }
                    }
                }
                same(&r, &want, &format!("norm {rows}x{len} layer {layer}"));
            }
        }
    }

    #[test]
    fn cross_entropy_and_sums_have_the_bits_of_one_row_at_a_time() {
        for (rows, len) in SHAPES {
            let v = values(rows * len, 7 + rows as u64);
            let labels: Vec<i32> = (0..rows).map(|i| ((i * 7) % len) as i32).collect();
            let mut r = vec![0.0; rows];
            unsafe { cross_entropy(&v, &labels, &mut r, len) };
            let want: Vec<f32> = v
                .chunks_exact(len)
                .zip(&labels)
                .map(|(row, &l)| {
                    let m = row.iter().copied().fold(f32::NEG_INFINITY, nan_max);
                    let s: f64 = row.iter().map(|&a| exp_f32(a - m) as f64).sum();
                    -(((row[l as usize] - m) as f64) - s.ln()) as f32
                })
                .collect();
            same(&r, &want, &format!("cross-entropy {rows}x{len}"));

            let mut r = vec![0.0; rows];
            unsafe { row_sums(&v, &mut r, len) };
            let want: Vec<f32> = v
                .chunks_exact(len)
                .map(|row| row.iter().map(|&b| b as f64).sum::<f64>() as f32)
                .collect();
            same(&r, &want, &format!("row sums {rows}x{len}"));

            let mut r = vec![0.0; len];
            unsafe { col_sums(&v, &mut r, len) };
            let mut want = vec![0.0f32; len];
            for row in v.chunks_exact(len) {
                for (a, &b) in want.iter_mut().zip(row) {
                    *a += b;
                }
            }
            same(&r, &want, &format!("column sums {rows}x{len}"));
        }
        // A row of negative zeros sums to -0.0, as `Iterator::sum` does.
        let mut r = [1.0f32; 8];
        unsafe { row_sums(&[-0.0; 64], &mut r, 8) };
        assert!(r.iter().all(|x| x.to_bits() == (-0.0f32).to_bits()));
    }
}
