//! The MLIR kernels, lowered through MLIR's LLVM path and run with the ExecutionEngine, against
//! the reference interpreter (f32): every op family, and the MLP and GPT-tiny training steps
//! (`autodiff,optimizer`), whose kernel groups are the fused kernels the GPU runs.
//!
//! Tolerance: normwise relative 1e-5 (`common::assert_close`, the runtime's criterion).
#![cfg(feature = "mlir")]

mod common;

use cleave_ir::{run_function_named, Function, Precision};
use cleave_mlir::cpu::compile_cpu;

const RTOL: f64 = 1e-5;

fn check(func: &Function, seed: u64, what: &str) {
    let args = common::random_args(func, seed);
    let want = run_function_named(func, &args, Precision::F32)
        .unwrap_or_else(|e| panic!("{what}: interpreter: {e}"));
    let prog = compile_cpu(func).unwrap_or_else(|e| panic!("{what}: {e}"));
    let got = prog.run(&args).unwrap_or_else(|e| panic!("{what}: {e}"));
    for (i, o) in func.outputs.iter().enumerate() {
        common::assert_close(
            &got[i],
            &want[i],
            RTOL,
            &format!("{what}: output `{}`", o.name),
        );
    }
}

#[test]
fn every_op_family() {
    for (i, (name, func)) in common::op_cases().into_iter().enumerate() {
        check(&func, 100 + i as u64, &name);
    }
}

#[test]
fn mlp_training_step() {
    let f = common::training_step("mlp.cir", "optimizer{kind=momentum,lr=0.05}");
    check(&f, 7, "mlp.cir training step");
}

#[test]
fn gpt_tiny_training_step() {
    let f = common::training_step("gpt-tiny.cir", "optimizer{kind=sgd,lr=0.05}");
    check(&f, 8, "gpt-tiny.cir training step");
}

#[test]
fn cnn_tiny_forward() {
    check(&common::example("cnn-tiny.cir"), 9, "cnn-tiny.cir");
}

#[test]
fn missing_arguments_are_errors() {
    let (_, func) = common::op_cases().remove(0);
    let prog = compile_cpu(&func).unwrap();
    let e = prog.run(&Default::default()).unwrap_err();
    assert!(e.to_string().contains("missing argument"), "{e}");
}

/// The expanded transcendentals (`mathlib.rs`) over wide ranges, element by element, against
/// Rust's f64 functions: relative error 2e-6, plus an absolute floor of 1e-6 for the functions
/// with zeros in range (log, sin, cos, tanh, erf, gelu).
#[test]
fn math_functions_over_wide_ranges() {
    let n = 2001;
    let cases: [MathCase; 8] = [
        ("exp", -87.0, 88.0, f64::exp),
        ("log", 1e-30, 1e30, f64::ln),
        ("tanh", -12.0, 12.0, f64::tanh),
        ("erf", -6.0, 6.0, erf_ref),
        ("sin", -100.0, 100.0, f64::sin),
        ("cos", -100.0, 100.0, f64::cos),
        ("sigmoid", -40.0, 40.0, |x| 1.0 / (1.0 + (-x).exp())),
        ("gelu", -8.0, 8.0, |x| {
            0.5 * x * (1.0 + erf_ref(x / std::f64::consts::SQRT_2))
        }),
    ];
    for (op, lo, hi, f) in cases {
        let text = format!(
            "func @m {{\n  %x = input {{name = \"x\"}} : f32[{n}]\n  %y = {op} %x : f32[{n}]\n  return %y as \"y\"\n}}"
        );
        let func = cleave_ir::parse_function(&text).unwrap();
        // log spaced for log, linear otherwise.
        let xs: Vec<f32> = (0..n)
            .map(|i| {
                let t = i as f64 / (n - 1) as f64;
                if op == "log" {
                    (lo.ln() + t * (hi.ln() - lo.ln())).exp() as f32
                } else {
                    (lo + t * (hi - lo)) as f32
                }
            })
            .collect();
        let mut args = std::collections::BTreeMap::new();
        args.insert(
            "x".to_string(),
            cleave_ir::Tensor::from_f32(vec![n], xs.clone()),
        );
        let got = compile_cpu(&func).unwrap().run(&args).unwrap()[0].to_f64_vec();
        for (i, (&x, &y)) in xs.iter().zip(&got).enumerate() {
            let want = f(x as f64);
            // Relative only where the function has no zero in range; sigmoid's tail is
            // exp's relative error.
            let floor = if matches!(op, "exp" | "sigmoid") {
                0.0
            } else {
                1e-6
            };
            let tol = 2e-6 * want.abs() + floor;
            assert!(
                (y - want).abs() <= tol,
                "{op}({x}) [{i}]: MLIR {y}, f64 {want} (|diff| {} > {tol})",
                (y - want).abs()
            );
        }
    }
    // Special values.
    let text = "func @s {\n  %x = input {name = \"x\"} : f32[5]\n  %e = exp %x : f32[5]\n  %l = log %x : f32[5]\n  return %e as \"e\", %l as \"l\"\n}";
    let func = cleave_ir::parse_function(text).unwrap();
    let xs = vec![0.0f32, -1.0, f32::INFINITY, f32::NAN, 100.0];
    let mut args = std::collections::BTreeMap::new();
    args.insert("x".to_string(), cleave_ir::Tensor::from_f32(vec![5], xs));
    let out = compile_cpu(&func).unwrap().run(&args).unwrap();
    let (e, l) = (out[0].to_f64_vec(), out[1].to_f64_vec());
    assert_eq!(&e[..3], &[1.0, (-1.0f32).exp() as f64, f64::INFINITY]);
    assert!(e[3].is_nan() && e[4] == f64::INFINITY);
    assert_eq!(l[0], f64::NEG_INFINITY);
    assert!(l[1].is_nan() && l[2] == f64::INFINITY && l[3].is_nan());
}

/// An op name, its input range and the f64 reference.
type MathCase = (&'static str, f64, f64, fn(f64) -> f64);

/// erf in f64 (Abramowitz–Stegun 7.1.26 is not accurate enough for a reference): the Maclaurin
/// series below 3, the continued fraction of erfc above.
fn erf_ref(x: f64) -> f64 {
    let a = x.abs();
    let r = if a < 3.0 {
        let mut term = a;
        let mut sum = a;
        for n in 1..200 {
            term *= -a * a / n as f64;
            let t = term / (2 * n + 1) as f64;
            sum += t;
            if t.abs() < 1e-17 {
                break;
            }
        }
        sum * std::f64::consts::FRAC_2_SQRT_PI
    } else {
        // erfc(a) = exp(-a²)/√π · 1/(a + 1/2/(a + 1/(a + 3/2/(a + …)))).
        let mut f = 0.0;
        for k in (1..60).rev() {
            f = (k as f64 / 2.0) / (a + f);
        }
        1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / (a + f)
    };
    r.copysign(x)
}

/// The elementwise, reduction and matmul families in f64 (interpreter in f64; transcendentals go
/// through f32, so 1e-6 is the bound), and in f16 and bf16 (interpreter in f32, which rounds each
/// op's result to the type; the kernels compute each op in the type or in f32 and round, so
/// results differ by about one ulp: 2e-3 normwise for f16 (ulp 2^-10), 1.6e-2 for bf16 (2^-7)); all
/// compile to PTX.
#[test]
fn f64_f16_bf16_kernels() {
    let cases = [
        ("f64", Precision::F64, 1e-6),
        ("f16", Precision::F32, 2e-3),
        ("bf16", Precision::F32, 1.6e-2),
    ];
    for (dtype, precision, rtol) in cases {
        for name in [
            "unary",
            "binary",
            "reductions",
            "matmuls",
            "indexing_and_norms",
        ] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/ops")
                .join(format!("{name}.cir"));
            let text = std::fs::read_to_string(path).unwrap().replace("f32", dtype);
            let func = cleave_ir::parse_function(&text).unwrap();
            let what = format!("{name} {dtype}");
            let args = common::random_args(&func, 5);
            let want = run_function_named(&func, &args, precision).unwrap();
            let got = compile_cpu(&func)
                .unwrap_or_else(|e| panic!("{what}: {e}"))
                .run(&args)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            for (i, o) in func.outputs.iter().enumerate() {
                common::assert_close(&got[i], &want[i], rtol, &format!("{what}: `{}`", o.name));
            }
            let pipeline = cleave_mlir::pipeline::default_gpu_pipeline();
            cleave_mlir::gpu::compile_gpu(&func, &pipeline)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
        }
    }
}
