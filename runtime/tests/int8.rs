//! i8 storage (the `--compress int8` stash): `cast` f32 → i8 truncates toward zero and
//! saturates (NaN is 0), exactly as the interpreter does, in Cranelift's and LLVM's loops as in
//! the interpreted ones, through contiguous and strided (transposed) reads; an i8 value passes
//! through plan outputs and arguments as its bytes; and any op other than `cast` to or from f32,
//! `reshape` or an argument on an i8 value is refused with the op and value named.

use cleave_ir::{parse_function, run_function_named, Precision, Tensor};
use cleave_runtime::{compile, compile_with, Codegen, CompileOptions, HostData};

/// Values around every rounding and saturation edge, plus a spread of magnitudes.
fn sweep() -> Vec<f32> {
    let mut v = vec![
        0.0,
        -0.0,
        0.49,
        0.5,
        0.51,
        1.5,
        2.5,
        -0.5,
        -1.5,
        -2.5,
        126.6,
        127.0,
        127.4,
        127.5,
        128.0,
        129.0,
        -127.5,
        -128.0,
        -128.4,
        -128.5,
        -129.0,
        1e9,
        -1e9,
        f32::MAX,
        f32::MIN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        1e-40,
    ];
    v.extend((0..227).map(|i| (i as f32 - 113.0) * 1.37));
    v
}

#[test]
fn int8_quantization_matches_the_interpreter() {
    let xs = sweep();
    let n = xs.len();
    assert_eq!(n % 4, 0, "a whole number of rows of 4");
    let rows = n / 4;
    // The int8 stash's quantizer, `cast(round(x)) : i8`, a reshape of the codes and the
    // widening cast back, then a transpose of the widened codes.
    let f = parse_function(&format!(
        r#"func @f {{
  %x = input {{name = "x"}} : f32[{n}]
  %r = round %x : f32[{n}]
  %q = cast %r : i8[{n}]
  %t = cast %x : i8[{n}]
  %m = reshape %q : i8[{rows},4]
  %k = cast %m : f32[{rows},4]
  %w = transpose %k {{perm = [1, 0]}} : f32[4,{rows}]
  %u = cast %t : f32[{n}]
  return %q as "q", %w as "w", %u as "u"
}}"#
    ))
    .unwrap();
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
        let HostData::I8(q) = plan.output(0) else {
            panic!("output q is not i8")
        };
        (
            q,
            plan.output_f32(1).unwrap().to_vec(),
            plan.output_f32(2).unwrap().to_vec(),
        )
    };
    let got = run(false, Codegen::Cranelift);
    for c in Codegen::ALL.into_iter().filter(|c| c.available()) {
        assert_eq!(got, run(true, c), "{}", c.name());
    }
    let (q, w, u) = got;
    let args: std::collections::BTreeMap<String, Tensor> =
        [("x".to_string(), Tensor::from_f32(vec![n], xs.clone()))]
            .into_iter()
            .collect();
    let want = run_function_named(&f, &args, Precision::F32).unwrap();
    let (want_w, want_u) = (want[1].to_f64_vec(), want[2].to_f64_vec());
    for (i, &x) in xs.iter().enumerate() {
        let r = x.round_ties_even() as i8;
        assert_eq!(q[i], r, "{x:e}");
        assert_eq!(u[i], x as i8 as f32, "{x:e}");
        assert_eq!(u[i] as f64, want_u[i], "{x:e}");
        // Element (row i/4, column i%4) of the codes sits at [i%4, i/4] of the transpose.
        let t = (i % 4) * rows + i / 4;
        assert_eq!(w[t], r as f32, "{x:e}");
        assert_eq!(w[t] as f64, want_w[t], "{x:e}");
    }
    // The ends of the range and NaN, spelled out.
    let at = |x: f32| q[xs.iter().position(|&y| y.to_bits() == x.to_bits()).unwrap()];
    assert_eq!(
        [
            at(127.5),
            at(-128.5),
            at(1e9),
            at(f32::NAN),
            at(2.5),
            at(-2.5)
        ],
        [127, -128, 127, 0, 2, -2]
    );
}

#[test]
fn int8_values_cross_plans_as_arguments() {
    let f = parse_function(
        r#"func @g {
  %s = input {name = "s"} : i8[3]
  %t = cast %s : i8[3]
  %x = cast %t : f32[3]
  %y = add %x, %x : f32[3]
  return %y as "y", %s as "s"
}"#,
    )
    .unwrap();
    // Compiled loops and interpreted ones (an i8 → i8 cast included).
    for jit in [true, false] {
        let opts = CompileOptions {
            jit,
            ..CompileOptions::default()
        };
        let mut plan = compile_with(&f, &opts).unwrap();
        plan.set_input_named("s", HostData::I8(vec![-128, 7, 127]).as_slice())
            .unwrap();
        plan.run().unwrap();
        assert_eq!(
            plan.output_f32(0).unwrap(),
            [-256.0, 14.0, 254.0],
            "jit {jit}"
        );
    }
    let mut plan = compile(&f).unwrap();
    plan.set_input_named("s", HostData::I8(vec![-128, 7, 127]).as_slice())
        .unwrap();
    plan.run().unwrap();
    assert_eq!(plan.output(1), HostData::I8(vec![-128, 7, 127]));
    let e = plan
        .set_input_named("s", HostData::F32(vec![0.0; 3]).as_slice())
        .unwrap_err()
        .to_string();
    assert!(e.contains("i8"), "{e}");
}

#[test]
fn arithmetic_on_int8_is_refused_naming_the_op() {
    for (body, op) in [
        ("%y = add %s, %s : i8[3]", "add"),
        ("%y = cast %s : i32[3]", "cast"),
    ] {
        let f = parse_function(&format!(
            "func @h {{\n  %s = input {{name = \"s\"}} : i8[3]\n  {body}\n  return %y as \"y\"\n}}"
        ))
        .unwrap();
        let e = compile(&f).unwrap_err().to_string();
        assert!(e.contains(op) && e.contains("i8"), "{e}");
    }
}
