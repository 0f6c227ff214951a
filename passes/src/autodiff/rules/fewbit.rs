//! Few-bit backward for GELU and SiLU (`autodiff{compress=fewbit,bits=B}`, `--compress fewbit`):
//! Novikov et al., "Few-Bit Backward: Quantized Gradients of Activation Functions for Memory
//! Footprint Reduction" (ICML 2023).
//!
//! The derivative `f'(x)` is replaced by a piecewise-constant function with `2^B` intervals:
//! thresholds `t_1 < … < t_{2^B−1}` on `x` and one level `c_k` per interval, chosen to minimise
//! `∫ (f'(x) − c(x))² φ(x) dx` with `φ` the standard normal density (the paper's criterion).
//! [`fit`] finds the optimum exactly on a grid by dynamic programming.
//!
//! # The rewrite (a quantize/dequantize pair on the stash edge)
//!
//! - **Forward** (phase `forward`, the activation's stage): the interval index `k` of `x` as `B`
//!   boolean tensors, bit `B−1` first: bit `j` compares `x` with the middle threshold of the
//!   interval range the higher bits select (`select` over comparisons). Only these reach the
//!   backward, so the stash holds `B` bytes per element (the runtime stores a `bool` as one byte;
//!   bits are not packed) instead of the 4 bytes of `x`.
//! - **Backward**: `dx = dy · c_k`, `c_k` picked by `select`s on the bits.
//!
//! It is lossy and opt-in: the gradient is that of the approximation, and every other op keeps
//! its exact rule. A function with no GELU or SiLU is an error (`autodiff` checks), not a silent
//! no-op.

use std::f64::consts::PI;

use cleave_ir::tracer::{TraceError, Tracer};
use cleave_ir::{CompareOp, NodeData, Phase, UnaryOp, Value};

use super::{cmp, mul, select, splat, RuleResult};

/// The activations the rewrite applies to.
pub fn applies(u: UnaryOp) -> bool {
    matches!(u, UnaryOp::Gelu | UnaryOp::GeluTanh | UnaryOp::Silu)
}

/// `f'(x)` of an activation [`applies`] accepts.
fn derivative(u: UnaryOp, x: f64) -> f64 {
    let pdf = (-0.5 * x * x).exp() / (2.0 * PI).sqrt();
    match u {
        UnaryOp::Gelu => 0.5 * (1.0 + erf(x / 2f64.sqrt())) + x * pdf,
        UnaryOp::GeluTanh => {
            let c = (2.0 / PI).sqrt();
            let th = (c * (x + 0.044715 * x * x * x)).tanh();
            0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * c * (1.0 + 3.0 * 0.044715 * x * x)
        }
        UnaryOp::Silu => {
            let s = 1.0 / (1.0 + (-x).exp());
            s * (1.0 + x * (1.0 - s))
        }
        _ => unreachable!("checked by `applies`"),
    }
}

/// erf by Abramowitz–Stegun 7.1.26 (absolute error below 1.5e-7: plenty for choosing
/// thresholds; the step's own `erf` op is untouched).
fn erf(x: f64) -> f64 {
    let s = x.signum();
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.3275911 * a);
    let poly = t
        * (0.254829592
            + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
    s * (1.0 - poly * (-a * a).exp())
}

/// Thresholds (`2^bits − 1`, increasing) and levels (`2^bits`) minimising the normal-weighted
/// squared error of the piecewise-constant derivative, on a grid of 1,200 points over
/// `[−6, 6]` (dynamic programming over interval ends; a threshold is a midpoint between grid
/// points).
pub fn fit(u: UnaryOp, bits: u32) -> (Vec<f64>, Vec<f64>) {
    const N: usize = 1200;
    let (lo, hi) = (-6.0, 6.0);
    let h = (hi - lo) / N as f64;
    let xs: Vec<f64> = (0..N).map(|i| lo + (i as f64 + 0.5) * h).collect();
    let w: Vec<f64> = xs.iter().map(|&x| (-0.5 * x * x).exp()).collect();
    let f: Vec<f64> = xs.iter().map(|&x| derivative(u, x)).collect();
    // Prefix sums of w, w·f, w·f²: the cost of one interval [a, b) in O(1).
    let mut pw = vec![0.0; N + 1];
    let mut pf = vec![0.0; N + 1];
    let mut pff = vec![0.0; N + 1];
    for i in 0..N {
        pw[i + 1] = pw[i] + w[i];
        pf[i + 1] = pf[i] + w[i] * f[i];
        pff[i + 1] = pff[i] + w[i] * f[i] * f[i];
    }
    let cost = |a: usize, b: usize| {
        let sw = pw[b] - pw[a];
        let sf = pf[b] - pf[a];
        (pff[b] - pff[a]) - if sw > 0.0 { sf * sf / sw } else { 0.0 }
    };
    let level = |a: usize, b: usize| {
        let sw = pw[b] - pw[a];
        if sw > 0.0 {
            (pf[b] - pf[a]) / sw
        } else {
            f[a]
        }
    };
    let k = 1usize << bits;
    // best[j][b]: the least cost of covering [0, b) with j intervals; from[j][b] its last start.
    let mut best = vec![vec![f64::INFINITY; N + 1]; k + 1];
    let mut from = vec![vec![0usize; N + 1]; k + 1];
    best[0][0] = 0.0;
    for j in 1..=k {
        for b in j..=N {
            for a in (j - 1)..b {
                let c = best[j - 1][a] + cost(a, b);
                if c < best[j][b] {
                    best[j][b] = c;
                    from[j][b] = a;
                }
            }
        }
    }
    let mut ends = vec![N];
    let mut b = N;
    for j in (1..=k).rev() {
        b = from[j][b];
        ends.push(b);
    }
    ends.reverse(); // 0 = e_0 < e_1 < … < e_k = N
    let thresholds = ends[1..k].iter().map(|&e| lo + e as f64 * h).collect();
    let levels = ends.windows(2).map(|p| level(p[0], p[1])).collect();
    (thresholds, levels)
}

/// `dy · c(x)` for `node` (a unary activation [`applies`] accepts), with the interval bits of
/// `x` computed in the forward (see the module docs); `(thr, lev)` is the activation's [`fit`]
/// at `bits` bits.
pub fn vjp(
    t: &mut Tracer,
    node: &NodeData,
    dy: Value,
    bits: u32,
    (thr, lev): &(Vec<f64>, Vec<f64>),
) -> RuleResult {
    let x = node.operands[0];
    // The bits are forward work (they replace `x` in the stash).
    let phase = t.phase();
    t.set_phase(Phase::Forward);
    let codes = interval_bits(t, x, thr, bits);
    t.set_phase(phase);
    let codes = codes?;
    // The level of the interval the bits name.
    let d = choose(t, &codes, &mut |t, k| splat(t, x, lev[k]))?;
    mul(t, dy, d)
}

/// The interval index of each element of `x` among the thresholds `thr`, as `bits` boolean
/// values, most significant first: bit `j` is the comparison with the middle threshold of the
/// interval range the higher bits chose.
fn interval_bits(
    t: &mut Tracer,
    x: Value,
    thr: &[f64],
    bits: u32,
) -> Result<Vec<Value>, TraceError> {
    // One comparison per threshold, made once.
    let mut gt = Vec::with_capacity(thr.len());
    for &c in thr {
        let s = splat(t, x, c)?;
        gt.push(cmp(t, CompareOp::Gt, x, s)?);
    }
    let mut codes: Vec<Value> = Vec::new();
    for j in (0..bits).rev() {
        // Over the 2^(B−1−j) prefixes of the higher bits: the comparison with threshold
        // (prefix·2^(j+1) + 2^j) − 1.
        let bit = choose(t, &codes, &mut |_, prefix| {
            Ok(gt[(prefix << (j + 1)) + (1 << j) - 1])
        })?;
        codes.push(bit);
    }
    Ok(codes)
}

/// `pick(prefix)` for the prefix (as an integer, first bit most significant) that the boolean
/// values `bits` hold, as nested `select`s.
fn choose(
    t: &mut Tracer,
    bits: &[Value],
    pick: &mut dyn FnMut(&mut Tracer, usize) -> RuleResult,
) -> RuleResult {
    fn go(
        t: &mut Tracer,
        bits: &[Value],
        prefix: usize,
        pick: &mut dyn FnMut(&mut Tracer, usize) -> RuleResult,
    ) -> RuleResult {
        match bits.split_first() {
            None => pick(t, prefix),
            Some((&b, rest)) => {
                let one = go(t, rest, prefix << 1 | 1, pick)?;
                let zero = go(t, rest, prefix << 1, pick)?;
                select(t, b, one, zero)
            }
        }
    }
    go(t, bits, 0, pick)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fits_are_ordered_and_close_to_the_derivative() {
        for u in [UnaryOp::Gelu, UnaryOp::GeluTanh, UnaryOp::Silu] {
            let mut last_err = f64::INFINITY;
            for bits in 1..=3 {
                let (thr, lev) = fit(u, bits);
                assert_eq!(thr.len(), (1 << bits) - 1);
                assert_eq!(lev.len(), 1 << bits);
                assert!(thr.windows(2).all(|p| p[0] < p[1]), "{thr:?}");
                // The normal-weighted RMS error falls with every bit.
                let mut num = 0.0;
                let mut den = 0.0;
                for i in 0..4000 {
                    let x = -5.0 + 10.0 * (i as f64 + 0.5) / 4000.0;
                    let k = thr.iter().filter(|&&c| x > c).count();
                    let w = (-0.5 * x * x).exp();
                    num += w * (derivative(u, x) - lev[k]).powi(2);
                    den += w;
                }
                let err = (num / den).sqrt();
                assert!(err < last_err, "{u:?} {bits}: {err} vs {last_err}");
                last_err = err;
            }
            assert!(last_err < 0.05, "{u:?}: 3 bits leave {last_err}");
        }
    }
}
