//! The JIT's inline `exp`, `erf` and GELU (f32x4 polynomial code) against the interpreted fused
//! loop's scalar versions of the same approximations: bit-identical results on a sweep over every
//! binade of `f32` (denormals, ±0, ±∞, NaN, both signs), through the vector body and the scalar
//! tail of the loop. The accuracy of the approximations themselves is tested in `vmath.rs`.

use cleave_ir::parse_function;
use cleave_runtime::{compile_with, CompileOptions, HostData, Plan};

/// Inputs: every 499,979th bit pattern of both signs plus the edge cases, an odd count so the
/// last elements run through the JIT's scalar tail.
fn inputs() -> Vec<f32> {
    let mut v: Vec<f32> = (0..(0x7f80_0000u32 / 499_979))
        .map(|i| f32::from_bits(i * 499_979))
        .flat_map(|x| [x, -x])
        .collect();
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
    if v.len() % 4 == 0 {
        v.push(0.75);
    }
    v
}

fn run(n: usize, xs: &[f32], jit: bool) -> (Vec<Vec<f32>>, usize) {
    let text = format!(
        r#"func @f {{
  %x = input {{name = "x"}} : f32[{n}]
  %e = exp %x : f32[{n}]
  %r = erf %x : f32[{n}]
  %g = gelu %x : f32[{n}]
  return %e as "exp", %r as "erf", %g as "gelu"
}}"#
    );
    let f = parse_function(&text).unwrap();
    let opts = CompileOptions {
        jit,
        ..CompileOptions::default()
    };
    let mut plan: Plan = compile_with(&f, &opts).unwrap();
    plan.set_input(0, HostData::F32(xs.to_vec()).as_slice())
        .unwrap();
    plan.run().unwrap();
    let outs = (0..3)
        .map(|i| plan.output_f32(i).unwrap().to_vec())
        .collect();
    (outs, plan.jit_kernels())
}

#[test]
fn jit_transcendentals_match_the_interpreted_loop_bit_for_bit() {
    let xs = inputs();
    let (jit, n_jit) = run(xs.len(), &xs, true);
    let (interp, n_interp) = run(xs.len(), &xs, false);
    assert!(n_jit > 0, "the loop was not JIT-compiled");
    assert_eq!(n_interp, 0);
    for (name, (a, b)) in ["exp", "erf", "gelu"].iter().zip(jit.iter().zip(&interp)) {
        for (i, (&p, &q)) in a.iter().zip(b).enumerate() {
            let same = p.to_bits() == q.to_bits() || (p.is_nan() && q.is_nan());
            assert!(same, "{name}({:e}): JIT {p:e}, interpreted {q:e}", xs[i]);
        }
    }
    // Spot checks that both compute the function, not merely the same thing.
    let at = |x: f32| xs.iter().position(|&v| v.to_bits() == x.to_bits()).unwrap();
    assert_eq!(jit[0][at(0.0)], 1.0);
    assert_eq!(jit[1][at(f32::INFINITY)], 1.0);
    assert!((jit[2][at(1.0)] - 0.841_344_7).abs() < 1e-6);
    assert!((jit[1][at(0.5)] - 0.520_499_9).abs() < 1e-6);
}
