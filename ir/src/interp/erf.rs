//! The error function and its complement to full double precision.
//!
//! A transcription of FreeBSD's `s_erf.c` (Sun fdlibm), whose notice follows; the method and the
//! error bounds (below one ulp) are described there. It is written out here rather than taken
//! from a crate so that every backend can be checked against one known algorithm.
//!
//! ```text
//! Copyright (C) 1993 by Sun Microsystems, Inc. All rights reserved.
//!
//! Developed at SunPro, a Sun Microsystems, Inc. business.
//! Permission to use, copy, modify, and distribute this
//! software is freely granted, provided that this notice
//! is preserved.
//! ```
//!
//! Method, for `|x|` in
//! - `[0, 0.84375]`: `erf(x) = x + x·R(x²)` with a rational `R`;
//! - `[0.84375, 1.25]`: `erf(x) = c + P1(s)/Q1(s)` with `s = |x| - 1`, `c = 0.84506291151`;
//! - `[1.25, 28]`: `erfc(x) = exp(-x² - 0.5625 + R(1/x²)/S(1/x²)) / x` with two rational fits;
//! - beyond: `erf = ±1`, `erfc = 0` or `2`.

// The coefficients are fdlibm's, digit for digit.
#![allow(clippy::excessive_precision)]

const ERX: f64 = 8.45062911510467529297e-01;
const EFX8: f64 = 1.02703333676410069053e+00;
const PP: [f64; 5] = [
    1.28379167095512558561e-01,
    -3.25042107247001499370e-01,
    -2.84817495755985104766e-02,
    -5.77027029648944159157e-03,
    -2.37630166566501626084e-05,
];
const QQ: [f64; 5] = [
    3.97917223959155352819e-01,
    6.50222499887672944485e-02,
    5.08130628187576562776e-03,
    1.32494738004321644526e-04,
    -3.96022827877536812320e-06,
];
const PA: [f64; 7] = [
    -2.36211856075265944077e-03,
    4.14856118683748331666e-01,
    -3.72207876035701323847e-01,
    3.18346619901161753674e-01,
    -1.10894694282396677476e-01,
    3.54783043256182359371e-02,
    -2.16637559486879084300e-03,
];
const QA: [f64; 6] = [
    1.06420880400844228286e-01,
    5.40397917702171048937e-01,
    7.18286544141962662868e-02,
    1.26171219808761642112e-01,
    1.36370839120290507362e-02,
    1.19844998467991074170e-02,
];
const RA: [f64; 8] = [
    -9.86494403484714822705e-03,
    -6.93858572707181764372e-01,
    -1.05586262253232909814e+01,
    -6.23753324503260060396e+01,
    -1.62396669462573470355e+02,
    -1.84605092906711035994e+02,
    -8.12874355063065934246e+01,
    -9.81432934416914548592e+00,
];
const SA: [f64; 8] = [
    1.96512716674392571292e+01,
    1.37657754143519042600e+02,
    4.34565877475229228821e+02,
    6.45387271733267880336e+02,
    4.29008140027567833386e+02,
    1.08635005541779435134e+02,
    6.57024977031928170135e+00,
    -6.04244152148580987438e-02,
];
const RB: [f64; 7] = [
    -9.86494292470009928597e-03,
    -7.99283237680523006574e-01,
    -1.77579549177547519889e+01,
    -1.60636384855821916062e+02,
    -6.37566443368389627722e+02,
    -1.02509513161107724954e+03,
    -4.83519191608651397019e+02,
];
const SB: [f64; 7] = [
    3.03380607434824582924e+01,
    3.25792512996573918826e+02,
    1.53672958608443695994e+03,
    3.19985821950859553908e+03,
    2.55305040643316442583e+03,
    4.74528541206955367215e+02,
    -2.24409524465858183362e+01,
];

/// `c[0] + z·c[1] + z²·c[2] + …` (Horner).
fn poly(c: &[f64], z: f64) -> f64 {
    c.iter().rev().fold(0.0, |acc, &k| acc * z + k)
}

/// `1 + z·c[0] + z²·c[1] + …`.
fn poly1(c: &[f64], z: f64) -> f64 {
    1.0 + z * poly(c, z)
}

/// `|x| < 0.84375`: `erf(x) - x` divided by `x`.
fn small_ratio(x: f64) -> f64 {
    let z = x * x;
    poly(&PP, z) / poly1(&QQ, z)
}

/// `0.84375 <= |x| < 1.25`: `erf(|x|) - ERX`.
fn mid_part(ax: f64) -> f64 {
    let s = ax - 1.0;
    poly(&PA, s) / poly1(&QA, s)
}

/// `1.25 <= ax < 28`: `erfc(ax)`.
fn tail(ax: f64) -> f64 {
    let s = 1.0 / (ax * ax);
    let (r, big_s) = if ax < 1.0 / 0.35 {
        (poly(&RA, s), poly1(&SA, s))
    } else {
        (poly(&RB, s), poly1(&SB, s))
    };
    // `z` is `ax` with the low 32 bits cleared, so that `z·z` is exact.
    let z = f64::from_bits(ax.to_bits() & 0xffff_ffff_0000_0000);
    (-z * z - 0.5625).exp() * ((z - ax) * (z + ax) + r / big_s).exp() / ax
}

/// The error function, `2/√π ∫₀ˣ e^{-t²} dt`, to within one ulp.
pub fn erf(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    let ax = x.abs();
    if ax < 0.84375 {
        if ax < f64::from_bits(0x3e30_0000_0000_0000) {
            // |x| < 2^-28: erf(x) = x·2/√π, written to avoid underflow.
            return 0.125 * (8.0 * x + EFX8 * x);
        }
        return x + x * small_ratio(x);
    }
    let y = if ax < 1.25 {
        ERX + mid_part(ax)
    } else if ax < 6.0 {
        1.0 - tail(ax)
    } else {
        1.0
    };
    y.copysign(x)
}

/// The complementary error function `1 - erf(x)`, accurate also where it is tiny.
pub fn erfc(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    let ax = x.abs();
    if ax < 0.84375 {
        if ax < f64::from_bits(0x3c70_0000_0000_0000) {
            return 1.0 - x;
        }
        let y = small_ratio(x);
        if x < 0.25 {
            return 1.0 - (x + x * y);
        }
        return 0.5 - (x - 0.5 + x * y);
    }
    if ax < 1.25 {
        let p = mid_part(ax);
        return if x > 0.0 {
            1.0 - ERX - p
        } else {
            1.0 + (ERX + p)
        };
    }
    if ax < 28.0 {
        let t = tail(ax);
        return if x > 0.0 { t } else { 2.0 - t };
    }
    if x > 0.0 {
        0.0
    } else {
        2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `erf` by its Maclaurin series, accurate for `|x| <= 1` (terms alternate and shrink fast).
    fn erf_series(x: f64) -> f64 {
        let mut sum = 0.0;
        let mut term = x; // (-1)^n x^(2n+1) / n!
        for n in 0..60 {
            sum += term / (2 * n + 1) as f64;
            term *= -x * x / (n + 1) as f64;
        }
        sum * std::f64::consts::FRAC_2_SQRT_PI
    }

    fn rel(a: f64, b: f64) -> f64 {
        ((a - b) / b).abs()
    }

    #[test]
    fn known_values() {
        let cases = [
            (0.1, 0.112_462_916_018_284_892_203_275_071_744),
            (0.5, 0.520_499_877_813_046_537_682_746_653_892),
            (1.0, 0.842_700_792_949_714_869_341_220_635_083),
            (1.5, 0.966_105_146_475_310_727_066_976_261_646),
            (2.0, 0.995_322_265_018_952_734_162_069_256_367),
            (3.0, 0.999_977_909_503_001_414_558_627_223_870),
        ];
        for (x, want) in cases {
            assert!(
                rel(erf(x), want) < 2e-16,
                "erf({x}) = {} want {want}",
                erf(x)
            );
            assert!(rel(erf(-x), -want) < 2e-16);
        }
        // erfc in the tail, where 1 - erf would lose everything.
        let tails = [
            (3.0, 2.209_049_699_858_544_137_277_612_958_232e-5),
            (5.0, 1.537_459_794_428_034_850_188_343_485_383e-12),
            (10.0, 2.088_487_583_762_544_757_000_786_294_957e-45),
        ];
        for (x, want) in tails {
            assert!(
                rel(erfc(x), want) < 1e-15,
                "erfc({x}) = {} want {want}",
                erfc(x)
            );
        }
        assert_eq!(erf(0.0), 0.0);
        assert_eq!(erf(f64::INFINITY), 1.0);
        assert_eq!(erf(f64::NEG_INFINITY), -1.0);
        assert_eq!(erfc(f64::NEG_INFINITY), 2.0);
        assert!(erf(f64::NAN).is_nan());
    }

    #[test]
    fn matches_series_on_a_grid() {
        for i in -1000..=1000 {
            let x = i as f64 / 1000.0;
            if x == 0.0 {
                continue;
            }
            let want = erf_series(x);
            assert!(
                rel(erf(x), want) < 1e-15,
                "erf({x}) = {} series {want}",
                erf(x)
            );
            assert!((erfc(x) - (1.0 - want)).abs() < 1e-15, "erfc({x})");
        }
    }
}
