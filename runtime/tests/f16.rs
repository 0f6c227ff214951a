//! f16 storage (the GEMM operands of `--precision f16`): `cast` to f16 rounds to nearest even
//! exactly as the interpreter does (ties, overflow to infinity, gradual underflow into the
//! subnormals), every one of the 65,536 f16 bit patterns widens exactly, in Cranelift's and
//! LLVM's loops as in the interpreted ones (contiguous and transposed reads); the f16 GEMM
//! rounds the f32 product once; and arithmetic on f16 is refused with the op named.

use cleave_ir::interp::round_to_dtype;
use cleave_ir::{parse_function, run_function_named, DType, Precision, Tensor};
use cleave_runtime::{compile, compile_with, Codegen, CompileOptions, HostData, Plan};

/// f32 values around every f16 rounding edge: a stride through all f32 bit patterns, every f16
/// value, the midpoints between neighbouring f16 values and their neighbours, and the ends.
fn sweep() -> Vec<f32> {
    let mut v: Vec<f32> = (0..=u32::MAX)
        .step_by(65_521)
        .map(f32::from_bits)
        .filter(|x| !x.is_nan())
        .collect();
    for h in 0..0x7bffu32 {
        let lo = widen(h);
        let hi = widen(h + 1);
        let mid = ((lo as f64 + hi as f64) / 2.0) as f32;
        for x in [lo, mid, f32::from_bits(mid.to_bits() + 1), mid.next_down()] {
            v.push(x);
            v.push(-x);
        }
    }
    v.extend([
        65504.0,
        65519.99,
        65520.0,
        1e-8,
        2.9e-8,
        3.0e-8,
        1e30,
        f32::INFINITY,
    ]);
    v.extend([f32::NEG_INFINITY, f32::MIN_POSITIVE, 1e-40, -1e-40]);
    while !v.len().is_multiple_of(4) {
        v.push(0.0);
    }
    v
}

/// An f16 bit pattern's value (reference: exponent and mantissa by hand).
fn widen(h: u32) -> f32 {
    let (e, m) = ((h >> 10) & 0x1f, (h & 0x3ff) as f64);
    let mag = match e {
        0 => m * 2f64.powi(-24),
        31 if m == 0.0 => f64::INFINITY,
        31 => f64::NAN,
        _ => (1.0 + m / 1024.0) * 2f64.powi(e as i32 - 15),
    };
    (if h & 0x8000 != 0 { -mag } else { mag }) as f32
}

fn plan(f: &cleave_ir::Function, jit: bool, codegen: Codegen) -> Plan {
    let opts = CompileOptions {
        jit,
        codegen,
        ..CompileOptions::default()
    };
    let plan = compile_with(f, &opts).unwrap();
    assert_eq!(plan.jit_kernels() > 0, jit, "jit {jit}");
    plan
}

#[test]
fn f16_casts_round_as_the_interpreter_does() {
    let xs = sweep();
    let n = xs.len();
    let rows = n / 4;
    let f = parse_function(&format!(
        r#"func @f {{
  %x = input {{name = "x"}} : f32[{n}]
  %h = cast %x : f16[{n}]
  %r = reshape %h : f16[{rows},4]
  %w = cast %r : f32[{rows},4]
  %t = transpose %w {{perm = [1, 0]}} : f32[4,{rows}]
  return %h as "h", %w as "w", %t as "t"
}}"#
    ))
    .unwrap();
    let run = |jit: bool, codegen: Codegen| {
        let mut plan = plan(&f, jit, codegen);
        plan.set_input_named("x", HostData::F32(xs.clone()).as_slice())
            .unwrap();
        plan.run().unwrap();
        let HostData::F16(h) = plan.output(0) else {
            panic!("output h is not f16")
        };
        let bits = |i: usize| -> Vec<u32> {
            plan.output_f32(i)
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        };
        (h, bits(1), bits(2))
    };
    let (h, w, t) = run(false, Codegen::Cranelift);
    for c in Codegen::ALL.into_iter().filter(|c| c.available()) {
        assert!(
            (h.clone(), w.clone(), t.clone()) == run(true, c),
            "{}",
            c.name()
        );
    }
    let args: std::collections::BTreeMap<String, Tensor> =
        [("x".to_string(), Tensor::from_f32(vec![n], xs.clone()))]
            .into_iter()
            .collect();
    let want = run_function_named(&f, &args, Precision::F32).unwrap();
    let want_w = want[1].to_f64_vec();
    for (i, &x) in xs.iter().enumerate() {
        let r = round_to_dtype(x as f64, DType::F16) as f32;
        assert_eq!(w[i], r.to_bits(), "{x:e} ({:#x})", x.to_bits());
        assert_eq!(w[i], (want_w[i] as f32).to_bits(), "{x:e}");
        assert_eq!(widen(h[i] as u32).to_bits(), r.to_bits(), "{x:e}");
        assert_eq!(t[(i % 4) * rows + i / 4], w[i], "{x:e}");
    }
    // The edges spelled out: the largest finite value, the tie above it (to ∞), the smallest
    // subnormal and the tie below it (to zero), and NaN (the quiet NaN, its sign kept).
    let mut p = compile(&f).unwrap();
    let edges = vec![
        65504.0,
        65520.0,
        2f32.powi(-24),
        2f32.powi(-25),
        f32::NAN,
        -f32::NAN,
        1.0,
        -0.0,
    ];
    // Thirteen elements: vectors and a scalar tail in the generated loops.
    let edges: Vec<f32> = edges
        .into_iter()
        .chain([0.0, 0.0, 0.0, f32::INFINITY, -1e9])
        .collect();
    let g = parse_function(
        r#"func @g {
  %x = input {name = "x"} : f32[13]
  %h = cast %x : f16[13]
  %w = cast %h : f32[13]
  return %h as "h", %w as "w"
}"#,
    )
    .unwrap();
    let runs = [(false, Codegen::Cranelift)].into_iter().chain(
        Codegen::ALL
            .into_iter()
            .filter(|c| c.available())
            .map(|c| (true, c)),
    );
    for (jit, codegen) in runs {
        let mut p = plan(&g, jit, codegen);
        p.set_input_named("x", HostData::F32(edges.clone()).as_slice())
            .unwrap();
        p.run().unwrap();
        assert_eq!(
            p.output(0),
            HostData::F16(vec![
                0x7bff, 0x7c00, 0x0001, 0x0000, 0x7e00, 0xfe00, 0x3c00, 0x8000, 0, 0, 0, 0x7c00,
                0xfc00
            ]),
            "jit {jit} {}",
            codegen.name()
        );
        let w = p.output_f32(1).unwrap();
        assert_eq!(w[..4], [65504.0, f32::INFINITY, 2f32.powi(-24), 0.0]);
        assert!(w[4].is_nan() && w[5].is_nan());
        assert_eq!(w[11..], [f32::INFINITY, f32::NEG_INFINITY]);
    }
    p.set_input_named("x", HostData::F32(vec![f32::NAN; n]).as_slice())
        .unwrap();
    p.run().unwrap();
    assert!(p.output_f32(1).unwrap().iter().all(|x| x.is_nan()));
}

#[test]
fn every_f16_pattern_widens_exactly() {
    let n = 1 << 16;
    let f = parse_function(&format!(
        r#"func @g {{
  %s = input {{name = "s"}} : f16[{n}]
  %x = cast %s : f32[{n}]
  %t = cast %s : f16[{n}]
  return %x as "x", %t as "t"
}}"#
    ))
    .unwrap();
    let all: Vec<u16> = (0..=u16::MAX).collect();
    for (jit, codegen) in [(false, Codegen::Cranelift)].into_iter().chain(
        Codegen::ALL
            .into_iter()
            .filter(|c| c.available())
            .map(|c| (true, c)),
    ) {
        let mut p = plan(&f, jit, codegen);
        p.set_input_named("s", HostData::F16(all.clone()).as_slice())
            .unwrap();
        p.run().unwrap();
        let x = p.output_f32(0).unwrap();
        for (h, x) in all.iter().zip(x) {
            let want = widen(*h as u32);
            if want.is_nan() {
                assert!(x.is_nan(), "{h:#06x}");
            } else {
                assert_eq!(x.to_bits(), want.to_bits(), "{h:#06x} ({})", codegen.name());
            }
        }
        // An f16 → f16 cast keeps every pattern but NaN payloads (a NaN stays a NaN).
        let HostData::F16(t) = p.output(1) else {
            panic!("output t is not f16")
        };
        for (h, t) in all.iter().zip(&t) {
            if widen(*h as u32).is_nan() {
                assert!(widen(*t as u32).is_nan(), "{h:#06x}");
            } else {
                assert_eq!(h, t, "{}", codegen.name());
            }
        }
    }
    // Not an f32 argument.
    let mut p = compile(&f).unwrap();
    let e = p
        .set_input_named("s", HostData::F32(vec![0.0; n]).as_slice())
        .unwrap_err()
        .to_string();
    assert!(e.contains("f16"), "{e}");
}

#[test]
fn arithmetic_on_f16_is_refused_naming_the_op() {
    let f = parse_function(
        r#"func @h {
  %s = input {name = "s"} : f16[3]
  %y = add %s, %s : f16[3]
  return %y as "y"
}"#,
    )
    .unwrap();
    let e = compile(&f).unwrap_err().to_string();
    assert!(e.contains("add") && e.contains("f16"), "{e}");
}

/// `--precision f16`'s GEMM: f16 operands give the product accumulated in f32 and rounded to
/// f16 once (within one f16 step of the interpreter's exact product rounded once).
#[test]
fn f16_gemms_round_the_f32_product_once() {
    let f = parse_function(
        r#"func @g {
  %a = input {name = "a"} : f32[2,5,7]
  %b = input {name = "b"} : f32[2,7,3]
  %a16 = cast %a : f16[2,5,7]
  %b16 = cast %b : f16[2,7,3]
  %y = matmul %a16, %b16 : f16[2,5,3]
  %z = matmul %b16, %b16 {transpose_rhs = true} : f16[2,7,7]
  %y32 = cast %y : f32[2,5,3]
  %z32 = cast %z : f32[2,7,7]
  return %y32 as "y", %z32 as "z"
}"#,
    )
    .unwrap();
    let vals = |n: usize, s: f32| -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * s + 0.013 * i as f32)
            .collect()
    };
    let (a, b) = (vals(70, 0.31), vals(42, 0.17));
    let mut plan = compile(&f).unwrap();
    plan.set_input_named("a", HostData::F32(a.clone()).as_slice())
        .unwrap();
    plan.set_input_named("b", HostData::F32(b.clone()).as_slice())
        .unwrap();
    plan.run().unwrap();
    let args: std::collections::BTreeMap<String, Tensor> = [
        ("a".to_string(), Tensor::from_f32(vec![2, 5, 7], a)),
        ("b".to_string(), Tensor::from_f32(vec![2, 7, 3], b)),
    ]
    .into_iter()
    .collect();
    let want = run_function_named(&f, &args, Precision::F32).unwrap();
    for (i, w) in want.iter().enumerate() {
        for (g, w) in plan.output_f32(i).unwrap().iter().zip(w.to_f64_vec()) {
            let w = w as f32;
            // One f16 step at w's magnitude (2⁻²⁴ among the subnormals).
            let step = f32::from_bits((w.abs().to_bits() & 0x7f80_0000).saturating_sub(10 << 23))
                .max(2f32.powi(-24));
            assert!((g - w).abs() <= step, "{g} vs {w}");
            assert_eq!(
                round_to_dtype(*g as f64, DType::F16) as f32,
                *g,
                "{g} is not an f16 value"
            );
        }
    }
}
