"""Fits the polynomial coefficients of `runtime/src/vmath.rs` (exp, erf, erfc in f32).

Each fit is a near-minimax polynomial found by Lawson's iteration (iteratively reweighted least
squares) on Chebyshev-spaced points, against references computed with mpmath at 30 digits. The
printed coefficients are rounded to f32 (shortest round-trip form, as Rust literals); the
runtime's property test (`runtime/tests/vmath.rs`) measures the error of the f32 evaluation.

    pip install numpy mpmath && python scripts/fit_vmath.py
"""

import mpmath as mp
import numpy as np

mp.mp.dps = 30


def lawson(xs, target, basis, weight, iters=200):
    """Coefficients of `basis` minimising max |weight·(Σ c_k·basis_k - target)| over xs."""
    a = np.stack([b(xs) for b in basis], axis=1) * weight[:, None]
    y = target * weight
    w = np.ones_like(xs)
    for _ in range(iters):
        sw = np.sqrt(w)
        c, *_ = np.linalg.lstsq(a * sw[:, None], y * sw, rcond=None)
        e = np.abs(a @ c - y)
        w = w * e
        w /= w.sum()
    return c, np.max(np.abs(a @ c - y))


def show(name, c, err, what):
    lits = ", ".join(repr(np.float32(v)).removeprefix("np.float32(").removesuffix(")") for v in c)
    print(f"{name}: [{lits}]  ({what} {err:.2e})")


# exp(r) = 1 + r + r²·(c2 + c3·r + … + c6·r⁴) on |r| ≤ ln2/2, relative error.
h = float(mp.log(2)) / 2
r = np.cos(np.linspace(0, np.pi, 4000)) * h
ex = np.array([float(mp.exp(v)) for v in r])
c, err = lawson(r, ex - 1 - r, [lambda x, k=k: x ** (k + 2) for k in range(5)], 1 / ex)
show("EXP_P", c, err, "relative error")

# erf(x) = x·P(x²) on |x| < 1, relative error.
x = np.cos(np.linspace(0, np.pi / 2, 4000))
x = x[x > 1e-6]
t = np.array([float(mp.erf(v) / v) for v in x])
c, err = lawson(x, t, [lambda x, k=k: x ** (2 * k) for k in range(6)], 1 / t)
show("ERF_P", c, err, "relative error")

# erfc(a) = t·exp(-a² + R(t)), t = 1/(1 + a/2), a ≥ 1 (t in (0, 2/3]); the error of R is the
# relative error of erfc.
tt = (np.cos(np.linspace(0, np.pi, 4000)) + 1) / 2 * (2 / 3)
tt = tt[tt > 1e-4]
a = 2 * (1 / tt - 1)
big_r = np.array([float(mp.log(mp.erfc(av) / tv) + av * av) for av, tv in zip(a, tt)])
c, err = lawson(tt, big_r, [lambda x, k=k: x ** k for k in range(9)], np.ones_like(tt))
show("ERFC_R", c, err, "error in the exponent")
