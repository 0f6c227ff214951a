//! bf16 storage (the `--compress bf16` stash): `cast` to bf16 rounds to nearest even exactly as
//! the interpreter does (ties, subnormals, overflow to infinity, NaN), in Cranelift's and LLVM's loops
//! as in the interpreted ones, a bf16 value passes
//! through plan outputs and arguments as its 16-bit patterns, and any op other than `cast`,
//! `reshape` or an argument on a bf16 value is refused with the op and value named.

use cleave_ir::interp::round_to_dtype;
use cleave_ir::{parse_function, run_function_named, DType, Precision, Tensor};
use cleave_runtime::{compile, compile_with, Codegen, CompileOptions, HostData};

/// f32 bit patterns: a stride through all of them plus the edge cases.
fn sweep() -> Vec<f32> {
    let mut v: Vec<f32> = (0..=u32::MAX)
        .step_by(65_521)
        .map(f32::from_bits)
        .filter(|x| !x.is_nan())
        .collect();
    for bits in [
        0x3f80_8000u32, // a tie, even below: stays
        0x3f81_8000,    // a tie, odd below: rounds up
        0x3f80_8001,    // just above a tie
        0x7f7f_ffff,    // f32::MAX: rounds to infinity
        0x7f7f_7fff,    // stays finite
        0x0000_8000,    // a subnormal tie
        0x0001_8000,
        0x8000_0001,
        0x7f80_0000,
        0xff80_0000,
    ] {
        v.push(f32::from_bits(bits));
    }
    v
}

#[test]
fn bf16_casts_round_as_the_interpreter_does() {
    let xs = sweep();
    let n = xs.len();
    let f = parse_function(&format!(
        r#"func @f {{
  %x = input {{name = "x"}} : f32[{n}]
  %h = cast %x : bf16[{n}]
  %r = reshape %h : bf16[1,{n}]
  %w = cast %r : f32[1,{n}]
  return %h as "h", %w as "w"
}}"#
    ))
    .unwrap();
    // Compiled (Cranelift, and LLVM where built: vectors, a scalar tail, one range per pool
    // thread) and interpreted: the same bits.
    let run = |jit: bool, codegen: Codegen| {
        let opts = CompileOptions {
            jit,
            codegen,
            ..CompileOptions::default()
        };
        let mut plan = compile_with(&f, &opts).unwrap();
        assert_eq!(plan.jit_kernels() > 0, jit, "jit {jit}");
        plan.set_input_named("x", HostData::F32(xs.clone()).as_slice())
            .unwrap();
        plan.run().unwrap();
        let HostData::BF16(h) = plan.output(0) else {
            panic!("output h is not bf16")
        };
        (h, plan.output_f32(1).unwrap().to_vec())
    };
    let (h, w) = run(false, Codegen::Cranelift);
    for c in Codegen::ALL.into_iter().filter(|c| c.available()) {
        assert_eq!((h.clone(), w.clone()), run(true, c), "{}", c.name());
    }
    let args: std::collections::BTreeMap<String, Tensor> =
        [("x".to_string(), Tensor::from_f32(vec![n], xs.clone()))]
            .into_iter()
            .collect();
    let want = run_function_named(&f, &args, Precision::F32).unwrap();
    let want_w = want[1].to_f64_vec();
    for (i, &x) in xs.iter().enumerate() {
        let r = round_to_dtype(x as f64, DType::BF16) as f32;
        assert_eq!(w[i].to_bits(), r.to_bits(), "{x:e} ({:#x})", x.to_bits());
        assert_eq!(w[i].to_bits(), (want_w[i] as f32).to_bits(), "{x:e}");
        assert_eq!((h[i] as u32) << 16, r.to_bits(), "{x:e}");
    }
    // NaN stays NaN.
    let mut plan = compile(&f).unwrap();
    let nan = vec![f32::NAN; n];
    plan.set_input_named("x", HostData::F32(nan).as_slice())
        .unwrap();
    plan.run().unwrap();
    assert!(plan.output_f32(1).unwrap().iter().all(|x| x.is_nan()));
}

#[test]
fn bf16_values_cross_plans_as_arguments() {
    let f = parse_function(
        r#"func @g {
  %s = input {name = "s"} : bf16[3]
  %x = cast %s : f32[3]
  %y = add %x, %x : f32[3]
  return %y as "y"
}"#,
    )
    .unwrap();
    let mut plan = compile(&f).unwrap();
    // 1.5, -2, 0.0078125 as bf16 bit patterns.
    plan.set_input_named("s", HostData::BF16(vec![0x3fc0, 0xc000, 0x3c00]).as_slice())
        .unwrap();
    plan.run().unwrap();
    assert_eq!(plan.output_f32(0).unwrap(), [3.0, -4.0, 0.015625]);
    let e = plan
        .set_input_named("s", HostData::F32(vec![0.0; 3]).as_slice())
        .unwrap_err()
        .to_string();
    assert!(e.contains("bf16"), "{e}");
}

#[test]
fn arithmetic_on_bf16_is_refused_naming_the_op() {
    let f = parse_function(
        r#"func @h {
  %s = input {name = "s"} : bf16[3]
  %y = add %s, %s : bf16[3]
  return %y as "y"
}"#,
    )
    .unwrap();
    let e = compile(&f).unwrap_err().to_string();
    assert!(e.contains("add") && e.contains("bf16"), "{e}");
}

/// `--precision bf16`'s GEMM: bf16 operands (plain, transposed, batched) give the product
/// accumulated in f32 and rounded to bf16 once; the interpreter rounds the exact product, so
/// the two agree within one bf16 step (and exactly where the f32 sum is exact).
#[test]
fn bf16_gemms_round_the_f32_product_once() {
    let f = parse_function(
        r#"func @g {
  %a = input {name = "a"} : f32[2,5,7]
  %b = input {name = "b"} : f32[2,7,3]
  %c = input {name = "c"} : f32[7,5]
  %a16 = cast %a : bf16[2,5,7]
  %b16 = cast %b : bf16[2,7,3]
  %c16 = cast %c : bf16[7,5]
  %y = matmul %a16, %b16 : bf16[2,5,3]
  %z = matmul %c16, %c16 {transpose_lhs = true} : bf16[5,5]
  %y32 = cast %y : f32[2,5,3]
  %z32 = cast %z : f32[5,5]
  return %y32 as "y", %z32 as "z"
}"#,
    )
    .unwrap();
    gemms_match_the_interpreter(
        &f,
        &[
            ("a", vec![2, 5, 7], 0.31),
            ("b", vec![2, 7, 3], 0.17),
            ("c", vec![7, 5], 0.23),
        ],
    );
}

/// The same with products large enough to split across the pool by rows, by columns, and a
/// batch shared out whole, with a transposed right operand and an odd `k` past one block.
#[test]
fn large_bf16_gemms_split_across_threads_round_once() {
    let f = parse_function(
        r#"func @g {
  %a = input {name = "a"} : f32[96,301]
  %b = input {name = "b"} : f32[301,200]
  %w = input {name = "w"} : f32[40,301]
  %h = input {name = "h"} : f32[4,64,33]
  %a16 = cast %a : bf16[96,301]
  %b16 = cast %b : bf16[301,200]
  %w16 = cast %w : bf16[40,301]
  %h16 = cast %h : bf16[4,64,33]
  %y = matmul %a16, %b16 : bf16[96,200]
  %z = matmul %a16, %w16 {transpose_rhs = true} : bf16[96,40]
  %t = matmul %b16, %a16 {transpose_lhs = true, transpose_rhs = true} : bf16[200,96]
  %q = matmul %h16, %h16 {transpose_rhs = true} : bf16[4,64,64]
  %y32 = cast %y : f32[96,200]
  %z32 = cast %z : f32[96,40]
  %t32 = cast %t : f32[200,96]
  %q32 = cast %q : f32[4,64,64]
  return %y32 as "y", %z32 as "z", %t32 as "t", %q32 as "q"
}"#,
    )
    .unwrap();
    gemms_match_the_interpreter(
        &f,
        &[
            ("a", vec![96, 301], 0.031),
            ("b", vec![301, 200], 0.017),
            ("w", vec![40, 301], 0.023),
            ("h", vec![4, 64, 33], 0.05),
        ],
    );
}

/// Runs `f` on the CPU runtime and the interpreter with inputs `(name, shape, scale)`: every
/// output within one bf16 step of the interpreter's (which rounds the exact product once), a
/// bf16 value, and fewer than a quarter of them different.
fn gemms_match_the_interpreter(f: &cleave_ir::Function, inputs: &[(&str, Vec<usize>, f32)]) {
    let vals = |n: usize, s: f32| -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * s + 0.013 * (i % 97) as f32)
            .collect()
    };
    let data: Vec<Vec<f32>> = inputs
        .iter()
        .map(|(_, shape, s)| vals(shape.iter().product(), *s))
        .collect();
    let mut plan = compile(f).unwrap();
    for ((name, _, _), v) in inputs.iter().zip(&data) {
        plan.set_input_named(name, HostData::F32(v.clone()).as_slice())
            .unwrap();
    }
    plan.run().unwrap();
    let args: std::collections::BTreeMap<String, Tensor> = inputs
        .iter()
        .zip(&data)
        .map(|((n, s, _), v)| (n.to_string(), Tensor::from_f32(s.clone(), v.clone())))
        .collect();
    let want = run_function_named(f, &args, Precision::F32).unwrap();
    for (i, w) in want.iter().enumerate() {
        let got = plan.output_f32(i).unwrap();
        let mut differ = 0;
        for (g, w) in got.iter().zip(w.to_f64_vec()) {
            let w = w as f32;
            // One bf16 step at w's magnitude.
            let step = f32::from_bits((w.abs().to_bits() & 0x7f80_0000) - (7 << 23)).max(1e-30);
            assert!((g - w).abs() <= step, "{g} vs {w}");
            differ += (g != &w) as usize;
            assert_eq!(g.to_bits() & 0xffff, 0, "{g} is not a bf16 value");
        }
        assert!(
            differ * 4 < got.len(),
            "output {i}: {differ} of {} differ",
            got.len()
        );
    }
}
