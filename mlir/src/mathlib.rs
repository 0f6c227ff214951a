//! Transcendental functions written out in `arith` ops and the LLVM intrinsics every target
//! lowers natively (`fabs`, `floor`, `roundeven`, `sqrt`).
//!
//! Why not the `math` dialect: `convert-gpu-to-nvvm` turns `math.exp` (and even `math.sqrt` and
//! `math.absf`) into calls of CUDA's libdevice (`__nv_expf`, …), which is bitcode shipped with the
//! CUDA toolkit; without it, `gpu-module-to-binary` leaves `.extern .func` declarations in the PTX
//! and the driver cannot load the module. Expanding the functions here keeps the PTX
//! self-contained, and the CPU path runs exactly the same arithmetic, so the ExecutionEngine
//! tests check the numbers of the GPU kernels.
//!
//! Everything is computed in f32 (f64, f16 and bf16 operands are converted), with Cephes-style
//! range reductions and polynomials: relative errors of a few f32 ulps, far inside the 1e-5 the
//! backend promises. `exp` and `log` handle ±inf, NaN, overflow and zero; denormal inputs to `log`
//! are treated as their normalised neighbours would be.

use crate::body::Body;

const F: &str = "f32";

fn poly(b: &mut Body, x: &str, coeffs: &[f64]) -> String {
    // Horner: coeffs[0]·x^(n-1) + … + coeffs[n-1].
    let mut acc = b.fc(coeffs[0], F);
    for &c in &coeffs[1..] {
        let m = b.bin("arith.mulf", &acc, x, F);
        let cc = b.fc(c, F);
        acc = b.bin("arith.addf", &m, &cc, F);
    }
    acc
}

/// `2^n` for an integer-valued f32 `n` in [-127, 128] as two exact power-of-two factors.
fn ldexp(b: &mut Body, p: &str, n: &str) -> String {
    let ni = b.op(format!("arith.fptosi {n} : f32 to i32"));
    let one = b.ic(1, "i32");
    let h1 = b.bin("arith.shrsi", &ni, &one, "i32");
    let h2 = b.bin("arith.subi", &ni, &h1, "i32");
    let mut out = p.to_string();
    for h in [h1, h2] {
        let bias = b.ic(127, "i32");
        let e = b.bin("arith.addi", &h, &bias, "i32");
        let sh = b.ic(23, "i32");
        let bits = b.bin("arith.shli", &e, &sh, "i32");
        let scale = b.op(format!("arith.bitcast {bits} : i32 to f32"));
        out = b.bin("arith.mulf", &out, &scale, F);
    }
    out
}

/// `e^x` (f32).
pub fn exp(b: &mut Body, x: &str) -> String {
    let hi = b.fc(88.72283935546875, F);
    let lo = b.fc(-103.972_084_045_410_16, F);
    let xc = b.bin("arith.minimumf", x, &hi, F);
    let xc = b.bin("arith.maximumf", &xc, &lo, F);
    let log2e = b.fc(std::f64::consts::LOG2_E, F);
    let t = b.bin("arith.mulf", &xc, &log2e, F);
    let n = b.un("llvm.intr.roundeven", &t, F);
    let c1 = b.fc(0.693359375, F);
    let c2 = b.fc(-2.12194440e-4, F);
    let a = b.bin("arith.mulf", &n, &c1, F);
    let r = b.bin("arith.subf", &xc, &a, F);
    let a2 = b.bin("arith.mulf", &n, &c2, F);
    let r = b.bin("arith.subf", &r, &a2, F);
    let p = poly(
        b,
        &r,
        &[
            1.9875691500e-4,
            1.3981999507e-3,
            8.3334519073e-3,
            4.1665795894e-2,
            1.6666665459e-1,
            5.0000001201e-1,
        ],
    );
    let r2 = b.bin("arith.mulf", &r, &r, F);
    let p = b.bin("arith.mulf", &p, &r2, F);
    let p = b.bin("arith.addf", &p, &r, F);
    let one = b.fc(1.0, F);
    let p = b.bin("arith.addf", &p, &one, F);
    let y = ldexp(b, &p, &n);
    // Overflow to +inf; NaN stays NaN (the clamps above would hide it).
    let inf = b.fc(f64::INFINITY, F);
    let over = b.cmpf("ogt", x, &hi, F);
    let y = b.select(&over, &inf, &y, F);
    let nan = b.cmpf("uno", x, x, F);
    b.select(&nan, x, &y, F)
}

/// Natural logarithm (f32).
pub fn log(b: &mut Body, x: &str) -> String {
    let bits = b.op(format!("arith.bitcast {x} : f32 to i32"));
    let sh = b.ic(23, "i32");
    let e = b.bin("arith.shrui", &bits, &sh, "i32");
    let m255 = b.ic(255, "i32");
    let e = b.bin("arith.andi", &e, &m255, "i32");
    let bias = b.ic(126, "i32");
    let e = b.bin("arith.subi", &e, &bias, "i32");
    let mmask = b.ic(0x807f_ffff_u32 as i32 as i64, "i32");
    let mb = b.bin("arith.andi", &bits, &mmask, "i32");
    let half_bits = b.ic(0x3f00_0000, "i32");
    let mb = b.bin("arith.ori", &mb, &half_bits, "i32");
    let m = b.op(format!("arith.bitcast {mb} : i32 to f32"));
    let ef = b.op(format!("arith.sitofp {e} : i32 to f32"));
    // m in [0.5, 1): below sqrt(1/2) use 2m - 1 and e - 1, else m - 1.
    let sqrthf = b.fc(std::f64::consts::FRAC_1_SQRT_2, F);
    let small = b.cmpf("olt", &m, &sqrthf, F);
    let one = b.fc(1.0, F);
    let m2 = b.bin("arith.addf", &m, &m, F);
    let m_small = b.bin("arith.subf", &m2, &one, F);
    let m_big = b.bin("arith.subf", &m, &one, F);
    let m = b.select(&small, &m_small, &m_big, F);
    let ef1 = b.bin("arith.subf", &ef, &one, F);
    let ef = b.select(&small, &ef1, &ef, F);
    let z = b.bin("arith.mulf", &m, &m, F);
    let p = poly(
        b,
        &m,
        &[
            7.0376836292e-2,
            -1.1514610310e-1,
            1.1676998740e-1,
            -1.2420140846e-1,
            1.4249322787e-1,
            -1.6668057665e-1,
            2.0000714765e-1,
            -2.4999993993e-1,
            3.3333331174e-1,
        ],
    );
    let y = b.bin("arith.mulf", &p, &m, F);
    let y = b.bin("arith.mulf", &y, &z, F);
    let q1 = b.fc(-2.12194440e-4, F);
    let t = b.bin("arith.mulf", &ef, &q1, F);
    let y = b.bin("arith.addf", &y, &t, F);
    let mh = b.fc(-0.5, F);
    let t = b.bin("arith.mulf", &z, &mh, F);
    let y = b.bin("arith.addf", &y, &t, F);
    let y = b.bin("arith.addf", &m, &y, F);
    let q2 = b.fc(0.693359375, F);
    let t = b.bin("arith.mulf", &ef, &q2, F);
    let y = b.bin("arith.addf", &y, &t, F);
    // Special cases: 0 → -inf, negative → NaN, +inf → +inf, NaN → NaN.
    let zero = b.fc(0.0, F);
    let ninf = b.fc(f64::NEG_INFINITY, F);
    let nan = b.fc(f64::NAN, F);
    let inf = b.fc(f64::INFINITY, F);
    let is_zero = b.cmpf("oeq", x, &zero, F);
    let y = b.select(&is_zero, &ninf, &y, F);
    let neg = b.cmpf("olt", x, &zero, F);
    let y = b.select(&neg, &nan, &y, F);
    let is_inf = b.cmpf("oeq", x, &inf, F);
    let y = b.select(&is_inf, &inf, &y, F);
    let is_nan = b.cmpf("uno", x, x, F);
    b.select(&is_nan, x, &y, F)
}

/// Hyperbolic tangent (f32).
pub fn tanh(b: &mut Body, x: &str) -> String {
    let ax = b.un("llvm.intr.fabs", x, F);
    // Large |x|: 1 - 2/(e^(2|x|) + 1), with the sign of x.
    let two = b.fc(2.0, F);
    let one = b.fc(1.0, F);
    let t = b.bin("arith.mulf", &ax, &two, F);
    let e = exp(b, &t);
    let d = b.bin("arith.addf", &e, &one, F);
    let q = b.bin("arith.divf", &two, &d, F);
    let big = b.bin("arith.subf", &one, &q, F);
    let big = b.op(format!(
        "llvm.call_intrinsic \"llvm.copysign.f32\"({big}, {x}) : (f32, f32) -> f32"
    ));
    // Small |x|: an odd polynomial.
    let z = b.bin("arith.mulf", x, x, F);
    let p = poly(
        b,
        &z,
        &[
            -5.70498872745e-3,
            2.06390887954e-2,
            -5.37397155531e-2,
            1.33314422036e-1,
            -3.33332819422e-1,
        ],
    );
    let p = b.bin("arith.mulf", &p, &z, F);
    let p = b.bin("arith.mulf", &p, x, F);
    let small = b.bin("arith.addf", &p, x, F);
    let cut = b.fc(0.625, F);
    let is_small = b.cmpf("olt", &ax, &cut, F);
    let y = b.select(&is_small, &small, &big, F);
    let is_nan = b.cmpf("uno", x, x, F);
    b.select(&is_nan, x, &y, F)
}

/// The error function (f32): the Maclaurin series below |x| = 1, Abramowitz–Stegun 7.1.26
/// (absolute error 1.5e-7) above.
pub fn erf(b: &mut Body, x: &str) -> String {
    // 2/√π · Σ (-1)^n x^(2n+1) / (n! (2n+1)), n = 0..=10, as a polynomial in z = x².
    let mut coeffs = Vec::new();
    let mut fact = 1.0f64;
    for n in 0..=10u32 {
        if n > 0 {
            fact *= n as f64;
        }
        let sign = if n % 2 == 0 { 1.0 } else { -1.0 };
        coeffs.push(sign * std::f64::consts::FRAC_2_SQRT_PI / (fact * (2 * n + 1) as f64));
    }
    coeffs.reverse();
    let z = b.bin("arith.mulf", x, x, F);
    let p = poly(b, &z, &coeffs);
    let small = b.bin("arith.mulf", &p, x, F);
    let ax = b.un("llvm.intr.fabs", x, F);
    let one = b.fc(1.0, F);
    let pc = b.fc(0.3275911, F);
    let t = b.bin("arith.mulf", &ax, &pc, F);
    let t = b.bin("arith.addf", &t, &one, F);
    let t = b.bin("arith.divf", &one, &t, F);
    let q = poly(
        b,
        &t,
        &[
            1.061405429,
            -1.453152027,
            1.421413741,
            -0.284496736,
            0.254829592,
        ],
    );
    let q = b.bin("arith.mulf", &q, &t, F);
    let nz = b.op(format!("arith.negf {z} : f32"));
    let e = exp(b, &nz);
    let q = b.bin("arith.mulf", &q, &e, F);
    let big = b.bin("arith.subf", &one, &q, F);
    let big = b.op(format!(
        "llvm.call_intrinsic \"llvm.copysign.f32\"({big}, {x}) : (f32, f32) -> f32"
    ));
    let is_small = b.cmpf("olt", &ax, &one, F);
    let y = b.select(&is_small, &small, &big, F);
    let is_nan = b.cmpf("uno", x, x, F);
    b.select(&is_nan, x, &y, F)
}

/// Sine (`cos = false`) or cosine (`cos = true`), f32: `x = kπ + r` with |r| ≤ π/2 (π in three
/// parts), then a Maclaurin polynomial of `r` and the sign `(-1)^k`.
pub fn sin_cos(b: &mut Body, x: &str, cos: bool) -> String {
    let inv_pi = b.fc(std::f64::consts::FRAC_1_PI, F);
    let t = b.bin("arith.mulf", x, &inv_pi, F);
    let k = b.un("llvm.intr.roundeven", &t, F);
    let mut r = x.to_string();
    for part in [
        3.140625,
        9.675_025_939_941_406e-4,
        1.509_957_990_978_376_4e-7,
    ] {
        let c = b.fc(part, F);
        let a = b.bin("arith.mulf", &k, &c, F);
        r = b.bin("arith.subf", &r, &a, F);
    }
    let z = b.bin("arith.mulf", &r, &r, F);
    // Coefficients of sin(r)/r or cos(r) as polynomials in z = r².
    let mut coeffs = Vec::new();
    let mut fact = 1.0f64;
    let start = if cos { 0 } else { 1 };
    for n in 0..=8u32 {
        let deg = 2 * n + start;
        fact = (1..=deg).map(|i| i as f64).product::<f64>().max(1.0);
        let sign = if n % 2 == 0 { 1.0 } else { -1.0 };
        coeffs.push(sign / fact);
    }
    let _ = fact;
    coeffs.reverse();
    let p = poly(b, &z, &coeffs);
    let y = if cos {
        p
    } else {
        b.bin("arith.mulf", &p, &r, F)
    };
    // (-1)^k: k's parity from its integer value.
    let ki = b.op(format!("arith.fptosi {k} : f32 to i32"));
    let one_i = b.ic(1, "i32");
    let odd = b.bin("arith.andi", &ki, &one_i, "i32");
    let odd = b.op(format!("arith.trunci {odd} : i32 to i1"));
    let ny = b.op(format!("arith.negf {y} : f32"));
    b.select(&odd, &ny, &y, F)
}
