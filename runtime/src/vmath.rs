//! Branch-free `f32` approximations of `exp`, `erf`, `erfc` and the exact-erf GELU, written once
//! over [`Lanes`] and run two ways: as scalar Rust ([`Scalar`]: the interpreted fused loop and the
//! op kernels, where LLVM vectorises the loops that call them) and as Cranelift IR (the JIT emits
//! the same sequence of operations on `f32x4` registers). Both run the same IEEE operations in the
//! same order (no fused multiply-add, no reassociation), so their results are bit-identical; the
//! JIT no longer calls libm once per lane, which was about 40% of a GPT block's training step.
//!
//! Why each is accurate (the measured errors are in the tests below, against `f64` references):
//!
//! - `exp(x)`: `x` is clamped to [-104, 89] (beyond it the result is 0 or ∞ anyway; NaN passes
//!   the clamp because it compares false), `k = round(x·log₂e)` by the 1.5·2²³ trick, `r = x − k·ln2`
//!   in two parts (Cody–Waite: `k·LN2_HI` is exact), `exp(r) = 1 + r + r²·P(r)` with a degree-4
//!   near-minimax `P` on |r| ≤ ln2/2 (relative error 3e-9 before rounding), and the result is
//!   scaled by 2^⌊k/2⌋ and then 2^(k−⌊k/2⌋), so both factors are normal numbers and overflow to ∞
//!   and gradual underflow happen in the last multiply.
//! - `erf(x)`: `x·P(x²)` (degree 5 in x², relative 4e-8) for |x| < 1; else `±(1 − erfc(|x|))`.
//! - `erfc(a)` for a ≥ 1: `t·exp(−a² + R(t))`, `t = 1/(1 + a/2)`, `R` of degree 8 fitted on
//!   t ∈ (0, 2/3] (the form of Numerical Recipes' `erfcc`, with our own coefficients). `a²` is
//!   rounded to f32 before `exp`, so the relative error grows like `a²·2⁻²⁴` where erfc is tiny
//!   (1e-6 at a = 4, where erfc = 1.5e-8). For a < 1: `1 − x·P(x²)`, which cancels as erfc falls
//!   towards 0.16 (up to 5 ulp near a = 0.87); negative arguments use `erfc(−a) = 2 − erfc(a)`.
//!   Bound tested: 6 ulp plus `a²/2` ulp.
//! - `gelu(x) = 0.5·x·erfc(−x/√2)`, the formula of the interpreted op. Bound tested: 8 ulp plus
//!   `x²/4` ulp (the erfc bound at a = x/√2, and two roundings).
//! - erf: 3 ulp (measured 2.2); exp: 2 ulp (measured 0.92).
//!
//! The coefficients come from `scripts/fit_vmath.py` (Lawson's iteration against mpmath).

/// The operations the approximations are written in: one implementation per execution model.
///
/// `F` holds floats (one or several lanes), `I` their bit patterns as `i32`, `M` a per-lane
/// truth value. Every method is one IEEE operation or one bitwise/integer operation per lane.
pub(crate) trait Lanes {
    type F: Copy;
    type I: Copy;
    type M: Copy;
    fn splat(&mut self, v: f32) -> Self::F;
    fn isplat(&mut self, v: i32) -> Self::I;
    fn add(&mut self, a: Self::F, b: Self::F) -> Self::F;
    fn sub(&mut self, a: Self::F, b: Self::F) -> Self::F;
    fn mul(&mut self, a: Self::F, b: Self::F) -> Self::F;
    fn div(&mut self, a: Self::F, b: Self::F) -> Self::F;
    /// `a·b + c`, rounded once where the implementation fuses it (see [`has_fma`]).
    fn mul_add(&mut self, a: Self::F, b: Self::F, c: Self::F) -> Self::F;
    fn abs(&mut self, a: Self::F) -> Self::F;
    /// `a < b` (false if either is NaN).
    fn lt(&mut self, a: Self::F, b: Self::F) -> Self::M;
    /// `m ? a : b`.
    fn select(&mut self, m: Self::M, a: Self::F, b: Self::F) -> Self::F;
    fn to_bits(&mut self, a: Self::F) -> Self::I;
    fn of_bits(&mut self, a: Self::I) -> Self::F;
    /// Wrapping addition.
    fn iadd(&mut self, a: Self::I, b: Self::I) -> Self::I;
    /// Wrapping subtraction.
    fn isub(&mut self, a: Self::I, b: Self::I) -> Self::I;
    fn iand(&mut self, a: Self::I, b: Self::I) -> Self::I;
    fn ior(&mut self, a: Self::I, b: Self::I) -> Self::I;
    /// Arithmetic shift right.
    fn sshr(&mut self, a: Self::I, n: u8) -> Self::I;
    fn shl(&mut self, a: Self::I, n: u8) -> Self::I;
}

/// Plain `f32` arithmetic, one lane; `FMA`: `mul_add` is one fused operation (only inside
/// functions compiled with the `fma` target feature, else it would be a libm call).
pub(crate) struct Scalar<const FMA: bool>;

impl<const FMA: bool> Lanes for Scalar<FMA> {
    type F = f32;
    type I = i32;
    type M = bool;
    #[inline(always)]
    fn splat(&mut self, v: f32) -> f32 {
        v
    }
    #[inline(always)]
    fn isplat(&mut self, v: i32) -> i32 {
        v
    }
    #[inline(always)]
    fn add(&mut self, a: f32, b: f32) -> f32 {
        a + b
    }
    #[inline(always)]
    fn sub(&mut self, a: f32, b: f32) -> f32 {
        a - b
    }
    #[inline(always)]
    fn mul(&mut self, a: f32, b: f32) -> f32 {
        a * b
    }
    #[inline(always)]
    fn div(&mut self, a: f32, b: f32) -> f32 {
        a / b
    }
    #[inline(always)]
    fn mul_add(&mut self, a: f32, b: f32, c: f32) -> f32 {
        if FMA {
            a.mul_add(b, c)
        } else {
            a * b + c
        }
    }
    #[inline(always)]
    fn abs(&mut self, a: f32) -> f32 {
        a.abs()
    }
    #[inline(always)]
    fn lt(&mut self, a: f32, b: f32) -> bool {
        a < b
    }
    #[inline(always)]
    fn select(&mut self, m: bool, a: f32, b: f32) -> f32 {
        if m {
            a
        } else {
            b
        }
    }
    #[inline(always)]
    fn to_bits(&mut self, a: f32) -> i32 {
        a.to_bits() as i32
    }
    #[inline(always)]
    fn of_bits(&mut self, a: i32) -> f32 {
        f32::from_bits(a as u32)
    }
    #[inline(always)]
    fn iadd(&mut self, a: i32, b: i32) -> i32 {
        a.wrapping_add(b)
    }
    #[inline(always)]
    fn isub(&mut self, a: i32, b: i32) -> i32 {
        a.wrapping_sub(b)
    }
    #[inline(always)]
    fn iand(&mut self, a: i32, b: i32) -> i32 {
        a & b
    }
    #[inline(always)]
    fn ior(&mut self, a: i32, b: i32) -> i32 {
        a | b
    }
    #[inline(always)]
    fn sshr(&mut self, a: i32, n: u8) -> i32 {
        a >> n
    }
    #[inline(always)]
    fn shl(&mut self, a: i32, n: u8) -> i32 {
        a.wrapping_shl(n as u32)
    }
}

/// `exp(r) − 1 − r = r²·(c₀ + c₁r + …)` on |r| ≤ ln2/2.
const EXP_P: [f32; 5] = [0.49999994, 0.16666521, 0.04166839, 0.00836871, 0.0013814613];
/// `erf(x)/x` as a polynomial in x² on |x| < 1. The first coefficient is the fitted value (close
/// to 2/√π, which the Taylor series would have), not the constant.
#[allow(clippy::approx_constant)]
const ERF_P: [f32; 6] = [
    1.1283791,
    -0.37612325,
    0.1128018,
    -0.02671131,
    0.0049175504,
    -0.0005631418,
];
/// `ln(erfc(a)/t) + a²` as a polynomial in `t = 1/(1 + a/2)` for a ≥ 1.
const ERFC_R: [f32; 9] = [
    -1.2655121,
    1.000004,
    0.37479562,
    0.08702481,
    -0.11857787,
    0.015439756,
    -0.53398114,
    0.6894668,
    -0.2497002,
];
/// 1.5·2²³: adding it rounds a float of magnitude below 2²² to an integer, kept in the low bits.
const ROUND_MAGIC: f32 = 12582912.0;
/// The bit pattern of [`ROUND_MAGIC`].
const ROUND_MAGIC_BITS: i32 = 0x4B40_0000;
/// ln 2 in two parts: the high part has 15 significant bits, so `k·LN2_HI` is exact for |k| < 2⁹.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;

/// `c[0] + x·(c[1] + x·(c[2] + …))`.
#[inline(always)]
fn horner<L: Lanes>(l: &mut L, x: L::F, c: &[f32]) -> L::F {
    let mut acc = l.splat(c[c.len() - 1]);
    for &k in c.iter().rev().skip(1) {
        let k = l.splat(k);
        acc = l.mul_add(acc, x, k);
    }
    acc
}

/// eˣ; see the module docs.
#[inline(always)]
pub(crate) fn exp<L: Lanes>(l: &mut L, x: L::F) -> L::F {
    let hi = l.splat(89.0);
    let lo = l.splat(-104.0);
    let over = l.lt(hi, x);
    let x = l.select(over, hi, x);
    let under = l.lt(x, lo);
    let x = l.select(under, lo, x);
    let log2e = l.splat(std::f32::consts::LOG2_E);
    let magic = l.splat(ROUND_MAGIC);
    let j = l.mul(x, log2e);
    let j = l.add(j, magic);
    let k = l.sub(j, magic);
    let ln2_hi = l.splat(LN2_HI);
    let ln2_lo = l.splat(LN2_LO);
    let t = l.mul(k, ln2_hi);
    let r = l.sub(x, t);
    let t = l.mul(k, ln2_lo);
    let r = l.sub(r, t);
    let q = horner(l, r, &EXP_P);
    let r2 = l.mul(r, r);
    let p = l.mul_add(r2, q, r);
    let one = l.splat(1.0);
    let p = l.add(p, one);
    // 2^k in two normal factors.
    let jb = l.to_bits(j);
    let mb = l.isplat(ROUND_MAGIC_BITS);
    let ki = l.isub(jb, mb);
    let k1 = l.sshr(ki, 1);
    let k2 = l.isub(ki, k1);
    let bias = l.isplat(127);
    let e1 = l.iadd(k1, bias);
    let e1 = l.shl(e1, 23);
    let s1 = l.of_bits(e1);
    let e2 = l.iadd(k2, bias);
    let e2 = l.shl(e2, 23);
    let s2 = l.of_bits(e2);
    let y = l.mul(p, s1);
    l.mul(y, s2)
}

/// erf(x) for |x| < 1 (evaluates anywhere).
#[inline(always)]
fn erf_small<L: Lanes>(l: &mut L, x: L::F) -> L::F {
    let x2 = l.mul(x, x);
    let p = horner(l, x2, &ERF_P);
    l.mul(x, p)
}

/// erfc(a) for a ≥ 1 (evaluates for every a ≥ 0, +∞ and NaN).
#[inline(always)]
fn erfc_big<L: Lanes>(l: &mut L, a: L::F) -> L::F {
    let half = l.splat(0.5);
    let one = l.splat(1.0);
    let d = l.mul_add(a, half, one);
    let t = l.div(one, d);
    let r = horner(l, t, &ERFC_R);
    let a2 = l.mul(a, a);
    let z = l.sub(r, a2);
    let e = exp(l, z);
    l.mul(t, e)
}

/// erf(x); see the module docs.
#[inline(always)]
pub(crate) fn erf<L: Lanes>(l: &mut L, x: L::F) -> L::F {
    let a = l.abs(x);
    let small = erf_small(l, x);
    let c = erfc_big(l, a);
    let one = l.splat(1.0);
    let big = l.sub(one, c);
    // `big` is in [0, 1]: give it the sign of x.
    let xb = l.to_bits(x);
    let sign = l.isplat(i32::MIN);
    let s = l.iand(xb, sign);
    let bb = l.to_bits(big);
    let bb = l.ior(bb, s);
    let big = l.of_bits(bb);
    let m = l.lt(a, one);
    l.select(m, small, big)
}

/// erfc(x); see the module docs.
#[inline(always)]
pub(crate) fn erfc<L: Lanes>(l: &mut L, x: L::F) -> L::F {
    let a = l.abs(x);
    let one = l.splat(1.0);
    let s = erf_small(l, x);
    let small = l.sub(one, s);
    let c = erfc_big(l, a);
    let two = l.splat(2.0);
    let reflected = l.sub(two, c);
    let zero = l.splat(0.0);
    let neg = l.lt(x, zero);
    let big = l.select(neg, reflected, c);
    let m = l.lt(a, one);
    l.select(m, small, big)
}

/// `0.5·x·erfc(−x/√2)`, the exact-erf GELU.
#[inline(always)]
pub(crate) fn gelu<L: Lanes>(l: &mut L, x: L::F) -> L::F {
    let k = l.splat(-std::f32::consts::FRAC_1_SQRT_2);
    let u = l.mul(x, k);
    let c = erfc(l, u);
    let half = l.splat(0.5);
    let h = l.mul(half, x);
    l.mul(h, c)
}

/// True if this CPU has fused multiply-add: then the JIT and the scalar versions below both fuse
/// the polynomials' multiply-adds (and so stay bit-identical to each other); else neither does.
pub(crate) fn has_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("fma") && std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// True if this CPU has AVX-512F (the slice functions then run 16 lanes wide).
#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

/// Scalar and slice entry points for one function: without FMA plain Rust (vectorised by LLVM
/// for the baseline target), with FMA the same code compiled for AVX2 + FMA (8 lanes).
macro_rules! entry_points {
    ($f:ident, $one:ident, $slice:ident, $one_fma:ident, $slice_fma:ident, $slice_512:ident) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        fn $one_fma(x: f32) -> f32 {
            $f(&mut Scalar::<true>, x)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        fn $slice_fma(d: &mut [f32]) {
            for v in d.iter_mut() {
                *v = $f(&mut Scalar::<true>, *v);
            }
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx2,fma")]
        fn $slice_512(d: &mut [f32]) {
            for v in d.iter_mut() {
                *v = $f(&mut Scalar::<true>, *v);
            }
        }

        #[doc = concat!("Scalar `", stringify!($f), "`.")]
        #[inline]
        pub(crate) fn $one(x: f32) -> f32 {
            #[cfg(target_arch = "x86_64")]
            if has_fma() {
                // SAFETY: the CPU has the features the function is compiled for.
                return unsafe { $one_fma(x) };
            }
            $f(&mut Scalar::<false>, x)
        }

        #[doc = concat!("`", stringify!($f), "` of every element, in place.")]
        pub(crate) fn $slice(d: &mut [f32]) {
            #[cfg(target_arch = "x86_64")]
            if has_fma() {
                // SAFETY: the CPU has the features the functions are compiled for.
                return unsafe {
                    if has_avx512() {
                        $slice_512(d)
                    } else {
                        $slice_fma(d)
                    }
                };
            }
            for v in d.iter_mut() {
                *v = $f(&mut Scalar::<false>, *v);
            }
        }
    };
}

entry_points!(
    exp,
    exp_f32,
    exp_in_place,
    exp_f32_fma,
    exp_in_place_fma,
    exp_in_place_512
);
entry_points!(
    erf,
    erf_f32,
    erf_in_place,
    erf_f32_fma,
    erf_in_place_fma,
    erf_in_place_512
);
entry_points!(
    gelu,
    gelu_f32,
    gelu_in_place,
    gelu_f32_fma,
    gelu_in_place_fma,
    gelu_in_place_512
);

/// Test inputs for the code generators' bit-for-bit tests: every `stride`-th bit pattern of `f32`
/// with both signs, then the edge cases (±0, ±∞, NaN, the smallest denormals, ±MAX, `exp`'s
/// overflow and underflow thresholds, a few ordinary values), padded with 0.75 until the count is
/// `rem` modulo `modulus` (so that elements reach a kernel's scalar tail).
#[cfg(test)]
pub(crate) fn sweep(stride: u32, modulus: usize, rem: usize) -> Vec<f32> {
    let mut v = strided(stride);
    v.extend([
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::from_bits(1),
        -f32::from_bits(1),
        f32::MAX,
        f32::MIN,
        88.72283,
        -103.97208,
        1.0,
        -1.0,
        0.5,
        -3.25,
    ]);
    while v.len() % modulus != rem {
        v.push(0.75);
    }
    v
}

/// Every `stride`-th finite bit pattern of `f32`, each with both signs.
#[cfg(test)]
fn strided(stride: u32) -> Vec<f32> {
    (0..(0x7f80_0000u32 / stride))
        .map(|i| f32::from_bits(i * stride))
        .flat_map(|x| [x, -x])
        .collect()
}

/// Runs `text` (a function of one input) on `xs` under `opts`; returns its first `outputs`
/// outputs and the plan (the code generators' bit-for-bit tests).
#[cfg(test)]
pub(crate) fn run_sweep(
    text: &str,
    xs: &[f32],
    opts: &crate::CompileOptions,
    outputs: usize,
) -> (Vec<Vec<f32>>, crate::Plan) {
    let f = cleave_ir::parse_function(text).unwrap();
    let mut plan = crate::compile_with(&f, opts).unwrap();
    plan.set_input(0, crate::HostData::F32(xs.to_vec()).as_slice())
        .unwrap();
    plan.run().unwrap();
    let outs = (0..outputs)
        .map(|i| plan.output_f32(i).unwrap().to_vec())
        .collect();
    (outs, plan)
}

#[cfg(test)]
mod tests {
    //! Property tests of the approximations against `f64` references over every binade of
    //! `f32`: a sweep through all bit patterns with a fixed stride (about 700,000 inputs of both
    //! signs, denormals included), plus the edge cases (±0, ±∞, NaN, the overflow and underflow
    //! thresholds). The bound for a result of magnitude at least `f32::MIN_POSITIVE` is in units
    //! in the last place of the reference (rounded to f32); a denormal or zero result must be
    //! within a few denormal steps (absolute).

    use super::*;

    /// ulp of `y` in f32 (for |y| ≥ MIN_POSITIVE).
    fn ulp(y: f64) -> f64 {
        let e = (y.abs() as f32).to_bits() >> 23 & 0xff;
        2f64.powi(e as i32 - 127 - 23)
    }

    /// Inputs: every `stride`-th bit pattern of both signs, plus the edge cases.
    fn inputs() -> Vec<f32> {
        let mut v = strided(6121);
        v.extend([
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MIN_POSITIVE,
            f32::from_bits(1),
            -f32::from_bits(1),
            f32::MAX,
            f32::MIN,
            88.72283,
            88.72284,
            -87.33654,
            -103.27893,
            -103.97208,
            -104.0,
            89.0,
            1.0,
            -1.0,
            0.99999994,
            1.0000001,
        ]);
        v
    }

    /// Largest error in ulp (normal results) and largest absolute error of denormal results.
    /// `rel_slack(x)` widens the ulp bound for inputs where the method is known to lose accuracy.
    fn check(
        name: &str,
        f: fn(f32) -> f32,
        reference: fn(f64) -> f64,
        max_ulp: f64,
        slack: fn(f64) -> f64,
    ) {
        let mut worst = (0.0f64, 0.0f32);
        for x in inputs() {
            let got = f(x);
            let want = reference(x as f64);
            if want.is_nan() {
                assert!(got.is_nan(), "{name}({x:e}) = {got:e}, want NaN");
                continue;
            }
            if (want as f32).is_infinite() {
                assert_eq!(got as f64, want.signum() * f64::INFINITY, "{name}({x:e})");
                continue;
            }
            let err = (got as f64 - want).abs();
            if err == 0.0 {
                continue;
            }
            if want.abs() < f32::MIN_POSITIVE as f64 {
                let denormal = f32::from_bits(1) as f64;
                let rel = max_ulp * slack(x as f64) * 2f64.powi(-23);
                assert!(
                    err <= 2.0 * denormal * (x as f64).abs().max(1.0) + rel * want.abs(),
                    "{name}({x:e}) = {got:e}, want {want:e}"
                );
                continue;
            }
            let u = err / ulp(want) / slack(x as f64);
            assert!(
                u <= max_ulp,
                "{name}({x:e}) = {got:e}, want {want:e}: {u:.2} ulp"
            );
            if u > worst.0 {
                worst = (u, x);
            }
        }
        eprintln!("{name}: worst {:.2} ulp at {:e}", worst.0, worst.1);
    }

    fn none(_: f64) -> f64 {
        1.0
    }

    /// The rounding of `a²` (a = |x|/√2 for GELU, |x| for erfc) to f32 before `exp`: its absolute
    /// error, up to a²·2⁻²⁴, is the relative error it adds.
    fn square_rounding(a: f64) -> f64 {
        1.0 + a * a / 2.0
    }

    // Each bound is checked for the entry points (fused multiply-adds on a CPU with FMA) and for
    // the unfused scalar code.
    fn exp_plain(x: f32) -> f32 {
        exp(&mut Scalar::<false>, x)
    }
    fn erf_plain(x: f32) -> f32 {
        erf(&mut Scalar::<false>, x)
    }
    fn erfc_plain(x: f32) -> f32 {
        erfc(&mut Scalar::<false>, x)
    }
    fn erfc_entry(x: f32) -> f32 {
        let mut d = [x];
        if has_fma() {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                fn f(x: f32) -> f32 {
                    erfc(&mut Scalar::<true>, x)
                }
                // SAFETY: the CPU has the features.
                d[0] = unsafe { f(x) };
            }
        } else {
            d[0] = erfc_plain(x);
        }
        d[0]
    }
    fn gelu_plain(x: f32) -> f32 {
        gelu(&mut Scalar::<false>, x)
    }
    fn gelu_ref(x: f64) -> f64 {
        0.5 * x * libm::erfc(-x * std::f64::consts::FRAC_1_SQRT_2)
    }
    fn gelu_slack(x: f64) -> f64 {
        square_rounding(x * std::f64::consts::FRAC_1_SQRT_2)
    }

    #[test]
    fn exp_is_within_2_ulp() {
        check("exp", exp_f32, f64::exp, 2.0, none);
        check("exp (unfused)", exp_plain, f64::exp, 2.0, none);
    }

    #[test]
    fn erf_is_within_3_ulp() {
        check("erf", erf_f32, libm::erf, 3.0, none);
        check("erf (unfused)", erf_plain, libm::erf, 3.0, none);
    }

    #[test]
    fn erfc_is_within_6_ulp_plus_square_rounding() {
        check("erfc", erfc_entry, libm::erfc, 6.0, square_rounding);
        check(
            "erfc (unfused)",
            erfc_plain,
            libm::erfc,
            6.0,
            square_rounding,
        );
    }

    #[test]
    fn gelu_is_within_8_ulp_plus_square_rounding() {
        check("gelu", gelu_f32, gelu_ref, 8.0, gelu_slack);
        check("gelu (unfused)", gelu_plain, gelu_ref, 8.0, gelu_slack);
    }

    #[test]
    fn slices_match_the_scalar_entry_points() {
        let xs = inputs();
        for (f, one) in [
            (exp_in_place as fn(&mut [f32]), exp_f32 as fn(f32) -> f32),
            (erf_in_place, erf_f32),
            (gelu_in_place, gelu_f32),
        ] {
            let mut d = xs.clone();
            f(&mut d);
            for (&x, &y) in xs.iter().zip(&d) {
                let z = one(x);
                assert!(
                    y.to_bits() == z.to_bits() || (y.is_nan() && z.is_nan()),
                    "{x:e}"
                );
            }
        }
    }

    #[test]
    fn edge_cases_are_exact() {
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp_f32(100.0), f32::INFINITY);
        assert_eq!(exp_f32(-200.0), 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(erf_f32(0.0).to_bits(), 0.0f32.to_bits());
        assert_eq!(erf_f32(-0.0).to_bits(), (-0.0f32).to_bits());
        assert_eq!(erf_f32(f32::INFINITY), 1.0);
        assert_eq!(erf_f32(f32::NEG_INFINITY), -1.0);
        assert_eq!(erf_f32(12.0), 1.0);
        assert!(erf_f32(f32::NAN).is_nan());
        assert_eq!(gelu_f32(0.0), 0.0);
        assert_eq!(gelu_f32(f32::INFINITY), f32::INFINITY);
        assert_eq!(gelu_f32(100.0), 100.0);
        assert_eq!(gelu_f32(-100.0), 0.0);
        assert!(gelu_f32(f32::NAN).is_nan());
    }
}
