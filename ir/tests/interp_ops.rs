//! Per-op tests of the reference interpreter with hand-computed expected values.

#![allow(clippy::cloned_ref_to_slice_refs)]

use std::collections::{BTreeMap, HashMap};

use cleave_ir::interp::{erf, round_to_dtype};
use cleave_ir::{
    dropout_keep, infer, run_function, run_function_named, BinaryOp, CompareOp, DType, Function,
    InterpError, Literal, Op, Output, PoolKind, Precision, ReduceKind, Tensor, TensorType, UnaryOp,
};

use DType::*;

// ---------------------------------------------------------------------------------------------
// Helpers

fn ty(d: DType, s: &[usize]) -> TensorType {
    TensorType::new(d, s.to_vec())
}

/// A function with one input per type (`x0`, `x1`, …), one `op` node on them, and every result
/// of that node as an output (`y0`, `y1`, …).
fn one_op(op: Op, inputs: &[TensorType]) -> Function {
    let mut f = Function::new("t");
    let mut vals = Vec::new();
    for (i, t) in inputs.iter().enumerate() {
        let op = Op::Input {
            name: format!("x{i}"),
            ty: t.clone(),
        };
        let n = f.push_node(op, vec![], vec![t.clone()]);
        vals.push(f.result(n));
    }
    let types: Vec<&TensorType> = inputs.iter().collect();
    let out = infer(&op, &types).unwrap_or_else(|e| panic!("{e}"));
    let n = f.push_node(op, vals, out);
    for (i, &v) in f.nodes[n].results.clone().iter().enumerate() {
        f.outputs.push(Output {
            name: format!("y{i}"),
            value: v,
        });
    }
    f
}

fn try_run_p(op: Op, args: &[Tensor], p: Precision) -> Result<Vec<Tensor>, InterpError> {
    let types: Vec<TensorType> = args.iter().map(|a| a.ty()).collect();
    run_function(&one_op(op, &types), args, p)
}

fn try_run(op: Op, args: &[Tensor]) -> Result<Vec<Tensor>, InterpError> {
    try_run_p(op, args, Precision::F32)
}

/// Runs a one-op function in f32 precision and returns its single result.
fn run1(op: Op, args: &[Tensor]) -> Tensor {
    let mut r = try_run(op, args).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.len(), 1);
    r.pop().unwrap()
}

fn f64t(shape: &[usize], v: &[f64]) -> Tensor {
    Tensor::from_f64(shape, v.to_vec())
}

fn f32t(shape: &[usize], v: &[f32]) -> Tensor {
    Tensor::from_f32(shape, v.to_vec())
}

fn i64t(shape: &[usize], v: &[i64]) -> Tensor {
    Tensor::from_i64(I64, shape, v.to_vec())
}

fn i32t(shape: &[usize], v: &[i32]) -> Tensor {
    Tensor::from_i32(shape, v.to_vec())
}

fn bt(shape: &[usize], v: &[bool]) -> Tensor {
    Tensor::from_bool(shape, v.to_vec())
}

fn fl(t: &Tensor) -> &[f64] {
    t.as_f64().expect("float tensor")
}

fn assert_close(got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "lengths differ: {got:?} vs {want:?}");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = (g.is_nan() && w.is_nan()) || g == w || (g - w).abs() <= tol * (1.0 + w.abs());
        assert!(
            ok,
            "element {i}: got {g}, want {w}\n got {got:?}\nwant {want:?}"
        );
    }
}

fn unary(u: UnaryOp, x: Tensor) -> Tensor {
    run1(Op::Unary(u), &[x])
}

fn binary(b: BinaryOp, x: Tensor, y: Tensor) -> Tensor {
    run1(Op::Binary(b), &[x, y])
}

// ---------------------------------------------------------------------------------------------
// Arguments and precision

#[test]
fn arguments_interleave_in_body_order_and_outputs_follow_outputs_order() {
    let mut f = Function::new("f");
    let t = ty(F64, &[2]);
    let x = f.push_node(
        Op::Input {
            name: "x".into(),
            ty: t.clone(),
        },
        vec![],
        vec![t.clone()],
    );
    let w = f.push_node(
        Op::Param {
            name: "w".into(),
            ty: t.clone(),
        },
        vec![],
        vec![t.clone()],
    );
    let y = f.push_node(
        Op::Input {
            name: "y".into(),
            ty: t.clone(),
        },
        vec![],
        vec![t.clone()],
    );
    let (x, w, y) = (f.result(x), f.result(w), f.result(y));
    let s = f.push_node(Op::Binary(BinaryOp::Sub), vec![x, w], vec![t.clone()]);
    let s = f.result(s);
    let m = f.push_node(Op::Binary(BinaryOp::Mul), vec![s, y], vec![t.clone()]);
    let m = f.result(m);
    f.outputs.push(Output {
        name: "prod".into(),
        value: m,
    });
    f.outputs.push(Output {
        name: "diff".into(),
        value: s,
    });
    f.outputs.push(Output {
        name: "w_again".into(),
        value: w,
    });
    let args = [
        f64t(&[2], &[10.0, 20.0]),
        f64t(&[2], &[1.0, 2.0]),
        f64t(&[2], &[3.0, 4.0]),
    ];
    let r = run_function(&f, &args, Precision::F32).unwrap();
    assert_eq!(fl(&r[0]), &[27.0, 72.0]);
    assert_eq!(fl(&r[1]), &[9.0, 18.0]);
    assert_eq!(fl(&r[2]), &[1.0, 2.0]);

    // By name, from a HashMap and from a BTreeMap.
    let named: HashMap<String, Tensor> = ["x", "w", "y"]
        .iter()
        .map(|n| n.to_string())
        .zip(args.iter().cloned())
        .collect();
    assert_eq!(run_function_named(&f, &named, Precision::F32).unwrap(), r);
    let named: BTreeMap<&str, Tensor> = ["x", "w", "y"].into_iter().zip(args.clone()).collect();
    assert_eq!(run_function_named(&f, &named, Precision::F32).unwrap(), r);

    // Mismatches list the expected names and types.
    let mut bad: BTreeMap<&str, Tensor> = BTreeMap::new();
    bad.insert("x", args[0].clone());
    bad.insert("w", f32t(&[2], &[1.0, 2.0]));
    bad.insert("z", args[2].clone());
    let e = run_function_named(&f, &bad, Precision::F32)
        .unwrap_err()
        .to_string();
    for part in [
        "missing `y`",
        "unknown `z`",
        "`w`: expected f64[2], got f32[2]",
        "input x: f64[2], param w: f64[2], input y: f64[2]",
    ] {
        assert!(e.contains(part), "{part:?} not in {e}");
    }
    let e = run_function(&f, &args[..2], Precision::F32)
        .unwrap_err()
        .to_string();
    assert!(e.contains("expected 3 arguments, got 2"), "{e}");
    assert!(e.contains("param w: f64[2]"), "{e}");
    let e = run_function(
        &f,
        &[args[0].clone(), f64t(&[1], &[1.0]), args[2].clone()],
        Precision::F32,
    )
    .unwrap_err();
    assert!(matches!(e, InterpError::Arguments { .. }));
    assert!(e.to_string().contains("`w`"), "{e}");
}

#[test]
fn f32_precision_rounds_every_result_and_f64_precision_does_not() {
    let a = f32t(&[], &[0.1]);
    let b = f32t(&[], &[0.2]);
    let r = binary(BinaryOp::Add, a.clone(), b.clone());
    assert_eq!(r.dtype, F32);
    assert_eq!(fl(&r)[0], (0.1f32 + 0.2f32) as f64);

    // F64 precision: f32-typed arguments of any float dtype, no rounding, f64 results.
    let types = [ty(F32, &[]), ty(F32, &[])];
    let f = one_op(Op::Binary(BinaryOp::Add), &types);
    let r = run_function(&f, &[f64t(&[], &[0.1]), f64t(&[], &[0.2])], Precision::F64).unwrap();
    assert_eq!(r[0].dtype, F64);
    assert_eq!(fl(&r[0])[0], 0.1 + 0.2);
    // …and f32 tensors are accepted too.
    let r = run_function(&f, &[a, b], Precision::F64).unwrap();
    assert_eq!(fl(&r[0])[0], 0.1f32 as f64 + 0.2f32 as f64);
    // In F32 precision the dtype must match exactly.
    assert!(run_function(&f, &[f64t(&[], &[0.1]), f64t(&[], &[0.2])], Precision::F32).is_err());

    // Rounding happens once per op: 1/3 in f32 is the f32 nearest to the f64 quotient.
    let r = binary(BinaryOp::Div, f32t(&[], &[1.0]), f32t(&[], &[3.0]));
    assert_eq!(fl(&r)[0], (1.0f64 / 3.0) as f32 as f64);
}

#[test]
fn f16_and_bf16_rounding() {
    // Constants are rounded to their dtype.
    let c = run1(
        Op::Constant {
            ty: ty(F16, &[3]),
            value: Literal::Float(vec![0.1, 65520.0, 1e-8]),
        },
        &[],
    );
    assert_eq!(
        fl(&c),
        &[half::f16::from_f32(0.1).to_f64(), f64::INFINITY, 0.0]
    );
    // Ties go to even; anything above a tie goes up (half's own f64 conversion gets this wrong).
    let one_ulp = 2f64.powi(-10);
    assert_eq!(round_to_dtype(1.0 + one_ulp / 2.0, F16), 1.0);
    assert_eq!(
        round_to_dtype(1.0 + 3.0 * one_ulp / 2.0, F16),
        1.0 + 2.0 * one_ulp
    );
    assert_eq!(
        round_to_dtype(1.0 + one_ulp / 2.0 + 2f64.powi(-40), F16),
        1.0 + one_ulp
    );
    assert_eq!(round_to_dtype(65504.0 + 15.9, F16), 65504.0);
    assert_eq!(round_to_dtype(2f64.powi(-24) * 0.75, F16), 2f64.powi(-24)); // subnormal
    assert_eq!(round_to_dtype(1.0 + 2f64.powi(-8), BF16), 1.0);
    assert_eq!(
        round_to_dtype(1.0 + 3.0 * 2f64.powi(-8), BF16),
        1.0 + 2f64.powi(-6)
    );
    assert_eq!(
        round_to_dtype(1.0 + 2f64.powi(-8) + 2f64.powi(-45), BF16),
        1.0 + 2f64.powi(-7)
    );
    assert_eq!(round_to_dtype(1e39, BF16), f64::INFINITY);
    // An op result in f16: 1 + 2^-11 (a tie) rounds to 1.
    let r = binary(
        BinaryOp::Add,
        Tensor::from_float(F16, [], vec![1.0]),
        Tensor::from_float(F16, [], vec![2f64.powi(-11)]),
    );
    assert_eq!(r.dtype, F16);
    assert_eq!(fl(&r), &[1.0]);
    let r = binary(
        BinaryOp::Add,
        Tensor::from_float(BF16, [], vec![256.0]),
        Tensor::from_float(BF16, [], vec![1.0]),
    );
    assert_eq!(fl(&r), &[256.0]);
}

#[test]
fn bytes_round_trip_in_every_dtype() {
    let cases = [
        Tensor::from_f32([2], vec![1.5, -0.1]),
        f64t(&[2], &[0.1, -3.0]),
        Tensor::from_float(F16, [2], vec![0.1, -2.0]),
        Tensor::from_float(BF16, [2], vec![0.1, 3.0e38]),
        i32t(&[2], &[-5, i32::MAX]),
        i64t(&[2], &[-5, i64::MIN]),
        bt(&[3], &[true, false, true]),
    ];
    for t in cases {
        let bytes = t.to_le_bytes();
        assert_eq!(bytes.len(), t.numel() * t.dtype.size_bytes());
        let back = Tensor::from_le_bytes(t.dtype, &t.shape, &bytes).unwrap();
        assert_eq!(back, t);
    }
    assert_eq!(f32t(&[1], &[1.0]).to_le_bytes(), 1.0f32.to_le_bytes());
    assert_eq!(
        Tensor::from_float(F16, [1], vec![1.0]).to_le_bytes(),
        [0x00, 0x3c]
    );
    assert_eq!(bt(&[2], &[true, false]).to_le_bytes(), [1, 0]);
    let e = Tensor::from_le_bytes(F32, &[2, 2], &[0; 15]).unwrap_err();
    assert!(e.to_string().contains("15 bytes"), "{e}");
    assert_eq!(Tensor::zeros(&ty(I32, &[2])), i32t(&[2], &[0, 0]));
    assert_eq!(
        Tensor::scalar_f(F32, 0.1).as_f64().unwrap(),
        &[0.1f32 as f64]
    );
    assert_eq!(
        Tensor::from_i64(I32, [1], vec![1 << 32 | 7])
            .as_i64()
            .unwrap(),
        &[7]
    );
    assert_eq!(f32t(&[2], &[0.5, 2.0]).to_f32_vec(), vec![0.5, 2.0]);
}

// ---------------------------------------------------------------------------------------------
// Sources

#[test]
fn constant_splat_and_elements() {
    let c = run1(
        Op::Constant {
            ty: ty(F32, &[2, 2]),
            value: Literal::float(0.1),
        },
        &[],
    );
    assert_eq!(fl(&c), &[0.1f32 as f64; 4]);
    let c = run1(
        Op::Constant {
            ty: ty(I32, &[3]),
            value: Literal::Int(vec![1, -2, 1 << 31]),
        },
        &[],
    );
    assert_eq!(c.as_i64().unwrap(), &[1, -2, i32::MIN as i64]);
    let c = run1(
        Op::Constant {
            ty: ty(Bool, &[2]),
            value: Literal::Bool(vec![true]),
        },
        &[],
    );
    assert_eq!(c.as_bool().unwrap(), &[true, true]);
}

#[test]
fn iota_ints_and_floats() {
    let t = run1(
        Op::Iota {
            ty: ty(I32, &[2, 3]),
            dim: 1,
        },
        &[],
    );
    assert_eq!(t.as_i64().unwrap(), &[0, 1, 2, 0, 1, 2]);
    let t = run1(
        Op::Iota {
            ty: ty(F32, &[2, 3]),
            dim: 0,
        },
        &[],
    );
    assert_eq!(fl(&t), &[0.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
    // f16 cannot hold 2049.
    let t = run1(
        Op::Iota {
            ty: ty(F16, &[2050]),
            dim: 0,
        },
        &[],
    );
    assert_eq!(fl(&t)[2049], 2048.0);
}

// ---------------------------------------------------------------------------------------------
// Elementwise

#[test]
fn unary_float_ops() {
    use std::f64::consts::{E, FRAC_1_SQRT_2, PI};
    let x = |v: &[f64]| f64t(&[v.len()], v);
    let cases: Vec<(UnaryOp, Vec<f64>, Vec<f64>)> = vec![
        (UnaryOp::Neg, vec![1.5, -2.0], vec![-1.5, 2.0]),
        (UnaryOp::Abs, vec![-1.5, 2.0], vec![1.5, 2.0]),
        (UnaryOp::Exp, vec![0.0, 1.0], vec![1.0, E]),
        (
            UnaryOp::Log,
            vec![1.0, E, 0.0],
            vec![0.0, 1.0, f64::NEG_INFINITY],
        ),
        (UnaryOp::Sqrt, vec![4.0, 2.0], vec![2.0, 2f64.sqrt()]),
        (UnaryOp::Rsqrt, vec![4.0, 0.25], vec![0.5, 2.0]),
        (
            UnaryOp::Tanh,
            vec![0.0, 1.0],
            vec![0.0, 0.761_594_155_955_764_9],
        ),
        (
            UnaryOp::Sigmoid,
            vec![0.0, 2.0, -1000.0, 1000.0],
            vec![0.5, 0.880_797_077_977_882_3, 0.0, 1.0],
        ),
        (
            UnaryOp::Relu,
            vec![-1.0, 0.0, 3.0, f64::NAN],
            vec![0.0, 0.0, 3.0, f64::NAN],
        ),
        // x·Φ(x): Φ(1) = 0.841344746068542948585232545632.
        (
            UnaryOp::Gelu,
            vec![1.0, 0.0, -1.0, -40.0],
            vec![0.841_344_746_068_543, 0.0, -0.158_655_253_931_457_05, -0.0],
        ),
        (
            UnaryOp::GeluTanh,
            vec![1.0],
            vec![0.5 * (1.0 + ((2.0 / PI).sqrt() * 1.044715).tanh())],
        ),
        (
            UnaryOp::Silu,
            vec![2.0, -1000.0],
            vec![2.0 * 0.880_797_077_977_882_3, -0.0],
        ),
        (UnaryOp::Sin, vec![PI / 2.0], vec![1.0]),
        (UnaryOp::Cos, vec![0.0, PI], vec![1.0, -1.0]),
        (
            UnaryOp::Erf,
            vec![1.0, -0.5],
            vec![0.842_700_792_949_714_9, -0.520_499_877_813_046_5],
        ),
        (
            UnaryOp::Reciprocal,
            vec![4.0, 0.0],
            vec![0.25, f64::INFINITY],
        ),
        (
            UnaryOp::Sign,
            vec![-3.0, 0.0, 2.5, f64::NAN],
            vec![-1.0, 0.0, 1.0, 0.0],
        ),
        (UnaryOp::Floor, vec![-1.5, 1.5, 2.0], vec![-2.0, 1.0, 2.0]),
        (
            UnaryOp::Round,
            vec![0.5, 1.5, 2.5, -0.5, -1.5, 2.6],
            vec![0.0, 2.0, 2.0, -0.0, -2.0, 3.0],
        ),
    ];
    for (u, input, want) in cases {
        let got = unary(u, x(&input));
        assert_close(fl(&got), &want, 1e-15);
    }
    let g = unary(UnaryOp::Gelu, x(&[FRAC_1_SQRT_2]));
    assert_close(fl(&g), &[FRAC_1_SQRT_2 * 0.5 * (1.0 + erf(0.5))], 1e-16);
    // x·Φ(x) for very negative x, where 1 + erf(x/√2) would cancel to 0: Φ(-10) = 7.6198530241605e-24.
    let g = unary(UnaryOp::Gelu, x(&[-10.0]));
    assert_close(fl(&g), &[-7.619_853_024_160_527e-23], 1e-13);
}

#[test]
fn unary_int_and_bool_ops() {
    let x = i64t(&[3], &[-3, 0, 5]);
    assert_eq!(
        unary(UnaryOp::Neg, x.clone()).as_i64().unwrap(),
        &[3, 0, -5]
    );
    assert_eq!(unary(UnaryOp::Abs, x.clone()).as_i64().unwrap(), &[3, 0, 5]);
    assert_eq!(
        unary(UnaryOp::Relu, x.clone()).as_i64().unwrap(),
        &[0, 0, 5]
    );
    assert_eq!(unary(UnaryOp::Sign, x).as_i64().unwrap(), &[-1, 0, 1]);
    // i32 wraps: -MIN and |MIN| are MIN.
    let m = i32t(&[1], &[i32::MIN]);
    assert_eq!(
        unary(UnaryOp::Neg, m.clone()).as_i64().unwrap(),
        &[i32::MIN as i64]
    );
    assert_eq!(unary(UnaryOp::Abs, m).as_i64().unwrap(), &[i32::MIN as i64]);
    let b = unary(UnaryOp::Not, bt(&[2], &[true, false]));
    assert_eq!(b.as_bool().unwrap(), &[false, true]);
}

#[test]
fn binary_float_ops() {
    let a = f64t(&[4], &[1.0, -2.0, 3.0, f64::NAN]);
    let b = f64t(&[4], &[4.0, 0.5, f64::NAN, 1.0]);
    let cases = [
        (BinaryOp::Add, vec![5.0, -1.5, f64::NAN, f64::NAN]),
        (BinaryOp::Sub, vec![-3.0, -2.5, f64::NAN, f64::NAN]),
        (BinaryOp::Mul, vec![4.0, -1.0, f64::NAN, f64::NAN]),
        (BinaryOp::Div, vec![0.25, -4.0, f64::NAN, f64::NAN]),
        // NaN wins in max and min.
        (BinaryOp::Max, vec![4.0, 0.5, f64::NAN, f64::NAN]),
        (BinaryOp::Min, vec![1.0, -2.0, f64::NAN, f64::NAN]),
    ];
    for (op, want) in cases {
        assert_close(fl(&binary(op, a.clone(), b.clone())), &want, 0.0);
    }
    let p = binary(
        BinaryOp::Pow,
        f64t(&[3], &[2.0, 9.0, -8.0]),
        f64t(&[3], &[10.0, 0.5, 2.0]),
    );
    assert_close(fl(&p), &[1024.0, 3.0, 64.0], 1e-15);
    let d = binary(BinaryOp::Div, f64t(&[1], &[1.0]), f64t(&[1], &[0.0]));
    assert_eq!(fl(&d), &[f64::INFINITY]);
}

#[test]
fn binary_int_ops_wrap_truncate_and_reject_zero_divisors() {
    let a = i64t(&[4], &[7, -7, 7, -7]);
    let b = i64t(&[4], &[2, 2, -2, -2]);
    assert_eq!(
        binary(BinaryOp::Div, a.clone(), b.clone())
            .as_i64()
            .unwrap(),
        &[3, -3, -3, 3]
    );
    assert_eq!(
        binary(BinaryOp::Add, a.clone(), b.clone())
            .as_i64()
            .unwrap(),
        &[9, -5, 5, -9]
    );
    assert_eq!(
        binary(BinaryOp::Sub, a.clone(), b.clone())
            .as_i64()
            .unwrap(),
        &[5, -9, 9, -5]
    );
    assert_eq!(
        binary(BinaryOp::Mul, a.clone(), b.clone())
            .as_i64()
            .unwrap(),
        &[14, -14, -14, 14]
    );
    assert_eq!(
        binary(BinaryOp::Max, a.clone(), b.clone())
            .as_i64()
            .unwrap(),
        &[7, 2, 7, -2]
    );
    assert_eq!(
        binary(BinaryOp::Min, a, b).as_i64().unwrap(),
        &[2, -7, -2, -7]
    );

    // i32 arithmetic wraps like two's complement.
    let r = binary(
        BinaryOp::Add,
        i32t(&[2], &[i32::MAX, i32::MIN]),
        i32t(&[2], &[1, -1]),
    );
    assert_eq!(r.as_i64().unwrap(), &[i32::MIN as i64, i32::MAX as i64]);
    let r = binary(BinaryOp::Mul, i32t(&[1], &[65536]), i32t(&[1], &[65536]));
    assert_eq!(r.as_i64().unwrap(), &[0]);
    let r = binary(BinaryOp::Div, i32t(&[1], &[i32::MIN]), i32t(&[1], &[-1]));
    assert_eq!(r.as_i64().unwrap(), &[i32::MIN as i64]);
    let r = binary(BinaryOp::Add, i64t(&[1], &[i64::MAX]), i64t(&[1], &[1]));
    assert_eq!(r.as_i64().unwrap(), &[i64::MIN]);

    let e = try_run(
        Op::Binary(BinaryOp::Div),
        &[i32t(&[2, 2], &[1, 2, 3, 4]), i32t(&[2, 2], &[1, 1, 0, 1])],
    )
    .unwrap_err();
    match &e {
        InterpError::Node { op, value, message } => {
            assert_eq!(*op, "div");
            assert_eq!(value, "%2");
            assert!(
                message.contains("division by zero") && message.contains("[1, 0]"),
                "{e}"
            );
        }
        _ => panic!("{e:?}"),
    }
    assert!(e.to_string().contains("`div` at %2"), "{e}");
}

#[test]
fn binary_bool_ops() {
    let a = bt(&[4], &[true, true, false, false]);
    let b = bt(&[4], &[true, false, true, false]);
    assert_eq!(
        binary(BinaryOp::And, a.clone(), b.clone())
            .as_bool()
            .unwrap(),
        &[true, false, false, false]
    );
    assert_eq!(
        binary(BinaryOp::Or, a, b).as_bool().unwrap(),
        &[true, true, true, false]
    );
}

#[test]
fn compare_floats_ints_and_bools() {
    let a = f64t(&[3], &[1.0, 2.0, f64::NAN]);
    let b = f64t(&[3], &[2.0, 2.0, f64::NAN]);
    let want = [
        (CompareOp::Eq, [false, true, false]),
        (CompareOp::Ne, [true, false, true]),
        (CompareOp::Lt, [true, false, false]),
        (CompareOp::Le, [true, true, false]),
        (CompareOp::Gt, [false, false, false]),
        (CompareOp::Ge, [false, true, false]),
    ];
    for (c, w) in want {
        let r = run1(Op::Compare(c), &[a.clone(), b.clone()]);
        assert_eq!(r.dtype, Bool);
        assert_eq!(r.as_bool().unwrap(), &w, "{c:?}");
    }
    let r = run1(
        Op::Compare(CompareOp::Gt),
        &[i32t(&[2], &[-1, 5]), i32t(&[2], &[0, 4])],
    );
    assert_eq!(r.as_bool().unwrap(), &[false, true]);
    let r = run1(
        Op::Compare(CompareOp::Eq),
        &[bt(&[2], &[true, false]), bt(&[2], &[true, true])],
    );
    assert_eq!(r.as_bool().unwrap(), &[true, false]);
}

#[test]
fn select_picks_elementwise() {
    let r = run1(
        Op::Select,
        &[
            bt(&[3], &[true, false, true]),
            i64t(&[3], &[1, 2, 3]),
            i64t(&[3], &[10, 20, 30]),
        ],
    );
    assert_eq!(r.as_i64().unwrap(), &[1, 20, 3]);
    let r = run1(
        Op::Select,
        &[
            bt(&[2], &[false, true]),
            f64t(&[2], &[1.0, 2.0]),
            f64t(&[2], &[-1.0, -2.0]),
        ],
    );
    assert_eq!(fl(&r), &[-1.0, 2.0]);
}

#[test]
fn cast_conversions() {
    let x = f64t(&[6], &[2.7, -2.7, 1e20, -1e20, f64::NAN, 0.0]);
    let r = run1(Op::Cast { to: I32 }, &[x.clone()]);
    assert_eq!(
        r.as_i64().unwrap(),
        &[2, -2, i32::MAX as i64, i32::MIN as i64, 0, 0]
    );
    let r = run1(Op::Cast { to: I64 }, &[x.clone()]);
    assert_eq!(r.as_i64().unwrap(), &[2, -2, i64::MAX, i64::MIN, 0, 0]);
    let r = run1(Op::Cast { to: Bool }, &[x]);
    assert_eq!(r.as_bool().unwrap(), &[true, true, true, true, true, false]);
    let r = run1(Op::Cast { to: F32 }, &[bt(&[2], &[true, false])]);
    assert_eq!(fl(&r), &[1.0, 0.0]);
    let r = run1(Op::Cast { to: I32 }, &[bt(&[2], &[true, false])]);
    assert_eq!(r.as_i64().unwrap(), &[1, 0]);
    let r = run1(Op::Cast { to: Bool }, &[i64t(&[2], &[0, -3])]);
    assert_eq!(r.as_bool().unwrap(), &[false, true]);
    // int → int wraps.
    let r = run1(
        Op::Cast { to: I32 },
        &[i64t(&[2], &[1 << 32 | 5, (1 << 31) + 1])],
    );
    assert_eq!(r.as_i64().unwrap(), &[5, i32::MIN as i64 + 1]);
    // int → float rounds; float → f16/bf16 rounds.
    let r = run1(Op::Cast { to: F32 }, &[i64t(&[1], &[(1 << 24) + 1])]);
    assert_eq!(fl(&r), &[(1 << 24) as f64]);
    let r = run1(Op::Cast { to: F16 }, &[f64t(&[2], &[0.1, 1e6])]);
    assert_eq!(r.dtype, F16);
    assert_eq!(fl(&r), &[half::f16::from_f32(0.1).to_f64(), f64::INFINITY]);
    let r = run1(Op::Cast { to: BF16 }, &[f32t(&[1], &[3.3])]);
    assert_eq!(fl(&r), &[3.296875]);
    let r = run1(Op::Cast { to: F64 }, &[f32t(&[1], &[0.1])]);
    assert_eq!(fl(&r), &[0.1f32 as f64]);
    // In f64 precision casts between float types are identities.
    let r = try_run_p(Op::Cast { to: F16 }, &[f64t(&[1], &[0.1])], Precision::F64).unwrap();
    assert_eq!(fl(&r[0]), &[0.1]);
}

// ---------------------------------------------------------------------------------------------
// Shapes

fn broadcast(x: Tensor, shape: &[usize], dims: &[usize]) -> Tensor {
    run1(
        Op::Broadcast {
            shape: shape.to_vec(),
            dims: dims.to_vec(),
        },
        &[x],
    )
}

#[test]
fn broadcast_rank0_size1_and_new_dims() {
    let r = broadcast(f64t(&[], &[7.0]), &[2, 3], &[]);
    assert_eq!(r.shape, vec![2, 3]);
    assert_eq!(fl(&r), &[7.0; 6]);
    let r = broadcast(f64t(&[1, 3], &[1.0, 2.0, 3.0]), &[2, 3], &[0, 1]);
    assert_eq!(fl(&r), &[1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
    let r = broadcast(f64t(&[3], &[1.0, 2.0, 3.0]), &[2, 3], &[1]);
    assert_eq!(fl(&r), &[1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
    let r = broadcast(i64t(&[2], &[1, 2]), &[2, 3], &[0]);
    assert_eq!(r.as_i64().unwrap(), &[1, 1, 1, 2, 2, 2]);
    let r = broadcast(bt(&[2, 1], &[true, false]), &[2, 2, 2], &[0, 2]);
    assert_eq!(
        r.as_bool().unwrap(),
        &[true, true, true, true, false, false, false, false]
    );
    // A size-1 dim that stays size 1, in a rank-0 → rank-0 broadcast.
    let r = broadcast(f64t(&[], &[3.0]), &[], &[]);
    assert_eq!(fl(&r), &[3.0]);
}

fn reduce(kind: ReduceKind, axes: &[usize], x: Tensor) -> Tensor {
    run1(
        Op::Reduce {
            kind,
            axes: axes.to_vec(),
        },
        &[x],
    )
}

#[test]
fn reductions() {
    // [[1,2,3],[4,5,6]]
    let x = f64t(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    assert_eq!(fl(&reduce(ReduceKind::Sum, &[1], x.clone())), &[6.0, 15.0]);
    assert_eq!(
        fl(&reduce(ReduceKind::Sum, &[0], x.clone())),
        &[5.0, 7.0, 9.0]
    );
    let all = reduce(ReduceKind::Sum, &[0, 1], x.clone());
    assert_eq!(all.shape, Vec::<usize>::new());
    assert_eq!(fl(&all), &[21.0]);
    let none = reduce(ReduceKind::Sum, &[], x.clone());
    assert_eq!(none, x);
    assert_eq!(fl(&reduce(ReduceKind::Mean, &[0, 1], x.clone())), &[3.5]);
    assert_eq!(
        fl(&reduce(ReduceKind::Mean, &[0], x.clone())),
        &[2.5, 3.5, 4.5]
    );
    assert_eq!(fl(&reduce(ReduceKind::Max, &[1], x.clone())), &[3.0, 6.0]);
    assert_eq!(fl(&reduce(ReduceKind::Min, &[0], x)), &[1.0, 2.0, 3.0]);
    // Rank 3, middle axis.
    let x = f64t(&[2, 2, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
    assert_eq!(
        fl(&reduce(ReduceKind::Sum, &[1], x.clone())),
        &[4.0, 6.0, 12.0, 14.0]
    );
    assert_eq!(fl(&reduce(ReduceKind::Sum, &[0, 2], x)), &[14.0, 22.0]);
    // NaN propagates through max and min.
    let x = f64t(&[3], &[1.0, f64::NAN, 3.0]);
    assert!(fl(&reduce(ReduceKind::Max, &[0], x.clone()))[0].is_nan());
    assert!(fl(&reduce(ReduceKind::Min, &[0], x))[0].is_nan());
    // Ints.
    let x = i32t(&[2, 2], &[i32::MAX, 1, -3, 4]);
    assert_eq!(
        reduce(ReduceKind::Sum, &[1], x.clone()).as_i64().unwrap(),
        &[i32::MIN as i64, 1]
    );
    assert_eq!(
        reduce(ReduceKind::Max, &[0], x.clone()).as_i64().unwrap(),
        &[i32::MAX as i64, 4]
    );
    assert_eq!(reduce(ReduceKind::Min, &[0, 1], x).as_i64().unwrap(), &[-3]);
    // Over nothing: sum 0, mean NaN, max an error.
    let e = f64t(&[2, 0], &[]);
    assert_eq!(fl(&reduce(ReduceKind::Sum, &[1], e.clone())), &[0.0, 0.0]);
    assert!(fl(&reduce(ReduceKind::Mean, &[1], e.clone()))[0].is_nan());
    assert!(try_run(
        Op::Reduce {
            kind: ReduceKind::Max,
            axes: vec![1]
        },
        &[e]
    )
    .is_err());
}

#[test]
fn reshape_and_transpose() {
    let x = f64t(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let r = run1(
        Op::Reshape {
            shape: vec![3, 1, 2],
        },
        &[x.clone()],
    );
    assert_eq!(r.shape, vec![3, 1, 2]);
    assert_eq!(fl(&r), fl(&x));
    let r = run1(Op::Transpose { perm: vec![1, 0] }, &[x]);
    assert_eq!(r.shape, vec![3, 2]);
    assert_eq!(fl(&r), &[1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
    // [2,3,4] with perm [2,0,1]: r[k,i,j] = x[i,j,k].
    let v: Vec<i64> = (0..24).collect();
    let r = run1(
        Op::Transpose {
            perm: vec![2, 0, 1],
        },
        &[i64t(&[2, 3, 4], &v)],
    );
    assert_eq!(r.shape, vec![4, 2, 3]);
    let rv = r.as_i64().unwrap();
    for i in 0..2 {
        for j in 0..3 {
            for k in 0..4 {
                assert_eq!(rv[k * 6 + i * 3 + j], (i * 12 + j * 4 + k) as i64);
            }
        }
    }
}

#[test]
fn slice_with_strides() {
    let v: Vec<i64> = (0..20).collect();
    let x = i64t(&[4, 5], &v);
    let r = run1(
        Op::Slice {
            start: vec![1, 0],
            limit: vec![4, 5],
            stride: vec![2, 2],
        },
        &[x.clone()],
    );
    assert_eq!(r.shape, vec![2, 3]);
    assert_eq!(r.as_i64().unwrap(), &[5, 7, 9, 15, 17, 19]);
    let r = run1(
        Op::Slice {
            start: vec![2, 1],
            limit: vec![3, 4],
            stride: vec![1, 3],
        },
        &[x.clone()],
    );
    assert_eq!(r.as_i64().unwrap(), &[11]);
    let r = run1(
        Op::Slice {
            start: vec![2, 2],
            limit: vec![2, 4],
            stride: vec![1, 1],
        },
        &[x],
    );
    assert_eq!(r.shape, vec![0, 2]);
}

#[test]
fn concat_and_split() {
    let a = f64t(&[2, 1], &[1.0, 2.0]);
    let b = f64t(&[2, 2], &[3.0, 4.0, 5.0, 6.0]);
    let c = f64t(&[2, 1], &[7.0, 8.0]);
    let r = run1(Op::Concat { axis: 1 }, &[a.clone(), b, c]);
    assert_eq!(r.shape, vec![2, 4]);
    assert_eq!(fl(&r), &[1.0, 3.0, 4.0, 7.0, 2.0, 5.0, 6.0, 8.0]);
    let r = run1(Op::Concat { axis: 0 }, &[a.clone(), a]);
    assert_eq!(fl(&r), &[1.0, 2.0, 1.0, 2.0]);
    let r = run1(
        Op::Concat { axis: 0 },
        &[bt(&[1], &[true]), bt(&[2], &[false, true])],
    );
    assert_eq!(r.as_bool().unwrap(), &[true, false, true]);

    let v: Vec<i64> = (0..12).collect();
    let parts = try_run(
        Op::Split {
            axis: 1,
            sizes: vec![1, 3, 0, 2],
        },
        &[i64t(&[2, 6], &v)],
    )
    .unwrap();
    assert_eq!(parts.len(), 4);
    assert_eq!(parts[0].as_i64().unwrap(), &[0, 6]);
    assert_eq!(parts[1].as_i64().unwrap(), &[1, 2, 3, 7, 8, 9]);
    assert_eq!(parts[2].shape, vec![2, 0]);
    assert_eq!(parts[3].as_i64().unwrap(), &[4, 5, 10, 11]);
    // A node with several results is named by all of them.
    let e = try_run(
        Op::Split {
            axis: 0,
            sizes: vec![1, 1],
        },
        &[i64t(&[2], &[1, 2])],
    );
    assert!(e.is_ok());
}

#[test]
fn pad_floats_and_ints() {
    let r = run1(
        Op::Pad {
            low: vec![1, 0],
            high: vec![0, 2],
            value: -1.0,
        },
        &[f64t(&[1, 2], &[5.0, 6.0])],
    );
    assert_eq!(r.shape, vec![2, 4]);
    assert_eq!(fl(&r), &[-1.0, -1.0, -1.0, -1.0, 5.0, 6.0, -1.0, -1.0]);
    let r = run1(
        Op::Pad {
            low: vec![2],
            high: vec![1],
            value: 7.9,
        },
        &[i32t(&[1], &[3])],
    );
    assert_eq!(r.as_i64().unwrap(), &[7, 7, 3, 7]);
    let r = run1(
        Op::Pad {
            low: vec![],
            high: vec![],
            value: 0.0,
        },
        &[f32t(&[], &[2.0])],
    );
    assert_eq!(fl(&r), &[2.0]);
}

// ---------------------------------------------------------------------------------------------
// Linear algebra and convolutions

/// Deterministic pseudo-random values in [-1, 1) with a few exact bits.
fn pseudo(n: usize, seed: u64) -> Vec<f64> {
    (0..n)
        .map(|i| {
            let h = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add((i as u64).wrapping_mul(1442695040888963407));
            ((h >> 40) % 256) as f64 / 128.0 - 1.0
        })
        .collect()
}

#[test]
fn matmul_plain_and_by_hand() {
    // [[1,2],[3,4]] · [[5,6],[7,8]] = [[19,22],[43,50]]
    let a = f64t(&[2, 2], &[1.0, 2.0, 3.0, 4.0]);
    let b = f64t(&[2, 2], &[5.0, 6.0, 7.0, 8.0]);
    let mm = |tl, tr| Op::MatMul {
        transpose_lhs: tl,
        transpose_rhs: tr,
    };
    assert_eq!(
        fl(&run1(mm(false, false), &[a.clone(), b.clone()])),
        &[19.0, 22.0, 43.0, 50.0]
    );
    // aᵀ·b = [[1,3],[2,4]]·b = [[26,30],[38,44]]
    assert_eq!(
        fl(&run1(mm(true, false), &[a.clone(), b.clone()])),
        &[26.0, 30.0, 38.0, 44.0]
    );
    // a·bᵀ = [[17,23],[39,53]]
    assert_eq!(
        fl(&run1(mm(false, true), &[a.clone(), b.clone()])),
        &[17.0, 23.0, 39.0, 53.0]
    );
    // aᵀ·bᵀ = (b·a)ᵀ; b·a = [[23,34],[31,46]]
    assert_eq!(
        fl(&run1(mm(true, true), &[a, b])),
        &[23.0, 31.0, 34.0, 46.0]
    );
    // Ints, i32 wrapping.
    let r = run1(
        mm(false, false),
        &[i32t(&[1, 2], &[65536, 1]), i32t(&[2, 1], &[65536, 5])],
    );
    assert_eq!(r.as_i64().unwrap(), &[5]);
}

#[test]
fn matmul_batched_with_transpose_flags_matches_naive() {
    let (bt_, m, k, n) = (3, 4, 5, 2);
    for tl in [false, true] {
        for tr in [false, true] {
            let a_shape = if tl { [2, bt_, k, m] } else { [2, bt_, m, k] };
            let b_shape = if tr { [2, bt_, n, k] } else { [2, bt_, k, n] };
            let av = pseudo(2 * bt_ * m * k, 1);
            let bv = pseudo(2 * bt_ * k * n, 2);
            let r = run1(
                Op::MatMul {
                    transpose_lhs: tl,
                    transpose_rhs: tr,
                },
                &[f64t(&a_shape, &av), f64t(&b_shape, &bv)],
            );
            assert_eq!(r.shape, vec![2, bt_, m, n]);
            let aget = |b: usize, i: usize, p: usize| {
                if tl {
                    av[(b * k + p) * m + i]
                } else {
                    av[(b * m + i) * k + p]
                }
            };
            let bget = |b: usize, p: usize, j: usize| {
                if tr {
                    bv[(b * n + j) * k + p]
                } else {
                    bv[(b * k + p) * n + j]
                }
            };
            let mut want = vec![];
            for b in 0..2 * bt_ {
                for i in 0..m {
                    for j in 0..n {
                        want.push((0..k).map(|p| aget(b, i, p) * bget(b, p, j)).sum::<f64>());
                    }
                }
            }
            assert_close(fl(&r), &want, 1e-15);
        }
    }
}

/// Independent naive conv2d: materialises the zero-padded input, then correlates.
#[allow(clippy::too_many_arguments)]
fn naive_conv(
    x: &[f64],
    [n, c, h, w]: [usize; 4],
    wt: &[f64],
    [o, cg, kh, kw]: [usize; 4],
    stride: [usize; 2],
    pad: [usize; 4],
    dil: [usize; 2],
    groups: usize,
) -> (Vec<f64>, [usize; 4]) {
    let (hp, wp) = (h + pad[0] + pad[2], w + pad[1] + pad[3]);
    let mut xp = vec![0.0; n * c * hp * wp];
    for b in 0..n {
        for ch in 0..c {
            for i in 0..h {
                for j in 0..w {
                    xp[((b * c + ch) * hp + i + pad[0]) * wp + j + pad[1]] =
                        x[((b * c + ch) * h + i) * w + j];
                }
            }
        }
    }
    let ho = (hp - dil[0] * (kh - 1) - 1) / stride[0] + 1;
    let wo = (wp - dil[1] * (kw - 1) - 1) / stride[1] + 1;
    let opg = o / groups;
    let mut out = vec![];
    for b in 0..n {
        for oc in 0..o {
            for i in 0..ho {
                for j in 0..wo {
                    let mut s = 0.0;
                    for ci in 0..cg {
                        let ch = (oc / opg) * cg + ci;
                        for u in 0..kh {
                            for v in 0..kw {
                                s += xp[((b * c + ch) * hp + i * stride[0] + u * dil[0]) * wp
                                    + j * stride[1]
                                    + v * dil[1]]
                                    * wt[((oc * cg + ci) * kh + u) * kw + v];
                            }
                        }
                    }
                    out.push(s);
                }
            }
        }
    }
    (out, [n, o, ho, wo])
}

fn conv_op(stride: [usize; 2], padding: [usize; 4], dilation: [usize; 2], groups: usize) -> Op {
    Op::Conv2d {
        stride,
        padding,
        dilation,
        groups,
    }
}

#[test]
fn conv2d_by_hand() {
    // x = [[1,2,3],[4,5,6],[7,8,9]], w = [[1,0],[0,1]]: out[i,j] = x[i,j] + x[i+1,j+1].
    let x = f64t(
        &[1, 1, 3, 3],
        &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0],
    );
    let w = f64t(&[1, 1, 2, 2], &[1.0, 0.0, 0.0, 1.0]);
    let r = run1(conv_op([1, 1], [0; 4], [1, 1], 1), &[x.clone(), w.clone()]);
    assert_eq!(r.shape, vec![1, 1, 2, 2]);
    assert_eq!(fl(&r), &[6.0, 8.0, 12.0, 14.0]);
    // One row of padding on top only: the first row sees only x[0, j+1].
    let r = run1(
        conv_op([1, 1], [1, 0, 0, 0], [1, 1], 1),
        &[x.clone(), w.clone()],
    );
    assert_eq!(r.shape, vec![1, 1, 3, 2]);
    assert_eq!(fl(&r), &[2.0, 3.0, 6.0, 8.0, 12.0, 14.0]);
    // Dilation 2: out = x[0,0] + x[2,2] = 10.
    let r = run1(conv_op([1, 1], [0; 4], [2, 2], 1), &[x.clone(), w.clone()]);
    assert_eq!(fl(&r), &[10.0]);
    // Stride 2 with one column of right padding: windows at (0,0), (0,2), (2,0)…
    let r = run1(conv_op([2, 2], [0, 0, 1, 1], [1, 1], 1), &[x, w]);
    assert_eq!(r.shape, vec![1, 1, 2, 2]);
    assert_eq!(fl(&r), &[6.0, 3.0, 7.0, 9.0]);
    // Groups: two channels, each with its own 1x1 filter.
    let r = run1(
        conv_op([1, 1], [0; 4], [1, 1], 2),
        &[
            f64t(&[1, 2, 1, 1], &[2.0, 3.0]),
            f64t(&[2, 1, 1, 1], &[10.0, 100.0]),
        ],
    );
    assert_eq!(fl(&r), &[20.0, 300.0]);
}

type ConvCase = (
    [usize; 4],
    [usize; 4],
    [usize; 2],
    [usize; 4],
    [usize; 2],
    usize,
);

#[test]
fn conv2d_matches_naive_with_groups_stride_dilation_and_asymmetric_padding() {
    // (input shape, weight shape, stride, padding, dilation, groups)
    let configs: [ConvCase; 4] = [
        ([2, 4, 7, 6], [6, 2, 3, 2], [2, 1], [1, 0, 2, 1], [2, 2], 2),
        ([1, 3, 5, 5], [2, 3, 3, 3], [1, 1], [1, 1, 1, 1], [1, 1], 1),
        ([1, 4, 8, 9], [4, 1, 2, 3], [2, 3], [0, 2, 1, 0], [1, 2], 4),
        ([2, 2, 6, 6], [4, 2, 1, 1], [2, 2], [0, 0, 0, 0], [1, 1], 1),
    ];
    for (xs, ws, stride, pad, dil, groups) in configs {
        let xv = pseudo(xs.iter().product(), 3);
        let wv = pseudo(ws.iter().product(), 4);
        let (want, shape) = naive_conv(&xv, xs, &wv, ws, stride, pad, dil, groups);
        let r = run1(
            conv_op(stride, pad, dil, groups),
            &[f64t(&xs, &xv), f64t(&ws, &wv)],
        );
        assert_eq!(r.shape, shape.to_vec());
        assert_close(fl(&r), &want, 1e-14);
    }
}

fn pool(
    kind: PoolKind,
    window: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 4],
    cip: bool,
) -> Op {
    Op::Pool2d {
        kind,
        window,
        stride,
        padding,
        count_include_pad: cip,
    }
}

#[test]
fn max_pool_ignores_padding() {
    let x = f64t(&[1, 1, 2, 2], &[-1.0, -2.0, -3.0, -4.0]);
    let r = run1(
        pool(PoolKind::Max, [2, 2], [1, 1], [1, 1, 0, 0], false),
        &[x],
    );
    assert_eq!(r.shape, vec![1, 1, 2, 2]);
    assert_eq!(fl(&r), &[-1.0, -1.0, -1.0, -1.0]);
    // 4x4, window 2 stride 2 on two channels.
    let v: Vec<f64> = (0..32).map(|i| i as f64).collect();
    let r = run1(
        pool(PoolKind::Max, [2, 2], [2, 2], [0; 4], false),
        &[f64t(&[1, 2, 4, 4], &v)],
    );
    assert_eq!(fl(&r), &[5.0, 7.0, 13.0, 15.0, 21.0, 23.0, 29.0, 31.0]);
    let r = run1(
        pool(PoolKind::Max, [1, 2], [1, 1], [0; 4], false),
        &[f64t(&[1, 1, 1, 3], &[1.0, f64::NAN, 0.0])],
    );
    assert!(fl(&r).iter().all(|x| x.is_nan()));
    // A bottom or right padding as large as the window would leave all-padding windows.
    let t = ty(F32, &[1, 1, 1, 1]);
    for padding in [[0, 0, 1, 0], [0, 0, 0, 1]] {
        assert!(infer(&pool(PoolKind::Max, [1, 1], [1, 1], padding, false), &[&t]).is_err());
    }
}

#[test]
fn avg_pool_with_and_without_padding_counts() {
    let x = f64t(&[1, 1, 2, 2], &[1.0, 2.0, 3.0, 4.0]);
    let r = run1(
        pool(PoolKind::Avg, [2, 2], [1, 1], [1, 1, 0, 0], true),
        &[x.clone()],
    );
    assert_eq!(fl(&r), &[0.25, 0.75, 1.0, 2.5]);
    let r = run1(
        pool(PoolKind::Avg, [2, 2], [1, 1], [1, 1, 0, 0], false),
        &[x.clone()],
    );
    assert_eq!(fl(&r), &[1.0, 1.5, 2.0, 2.5]);
    let r = run1(pool(PoolKind::Avg, [2, 2], [2, 2], [0; 4], false), &[x]);
    assert_eq!(fl(&r), &[2.5]);
}

// ---------------------------------------------------------------------------------------------
// Indexing

#[test]
fn gather_along_axes() {
    let table = f64t(&[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let r = run1(
        Op::Gather { axis: 0 },
        &[table.clone(), i32t(&[2, 2], &[2, 0, 1, 2])],
    );
    assert_eq!(r.shape, vec![2, 2, 2]);
    assert_eq!(fl(&r), &[5.0, 6.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let r = run1(
        Op::Gather { axis: 1 },
        &[table.clone(), i64t(&[3], &[1, 1, 0])],
    );
    assert_eq!(r.shape, vec![3, 3]);
    assert_eq!(fl(&r), &[2.0, 2.0, 1.0, 4.0, 4.0, 3.0, 6.0, 6.0, 5.0]);
    let r = run1(Op::Gather { axis: 0 }, &[table.clone(), i64t(&[], &[1])]);
    assert_eq!(r.shape, vec![2]);
    assert_eq!(fl(&r), &[3.0, 4.0]);

    for bad in [3, -1] {
        let e = try_run(
            Op::Gather { axis: 0 },
            &[table.clone(), i64t(&[2], &[0, bad])],
        )
        .unwrap_err()
        .to_string();
        for part in ["`gather` at %2", &format!("index {bad}"), "[1]", "extent 3"] {
            assert!(e.contains(part), "{part:?} not in {e}");
        }
    }
}

#[test]
fn scatter_add_accumulates_repeated_indices() {
    let base = f64t(&[3, 2], &[0.0, 0.0, 1.0, 1.0, 0.0, 0.0]);
    let upd = f64t(&[3, 2], &[1.0, 2.0, 10.0, 20.0, 100.0, 200.0]);
    let r = run1(
        Op::ScatterAdd { axis: 0 },
        &[base.clone(), i64t(&[3], &[1, 1, 0]), upd],
    );
    assert_eq!(fl(&r), &[100.0, 200.0, 12.0, 23.0, 0.0, 0.0]);
    // Along axis 1, ints.
    let r = run1(
        Op::ScatterAdd { axis: 1 },
        &[
            i32t(&[2, 2], &[0, 0, 0, 0]),
            i32t(&[3], &[0, 0, 1]),
            i32t(&[2, 3], &[1, 2, 3, 4, 5, 6]),
        ],
    );
    assert_eq!(r.as_i64().unwrap(), &[3, 3, 9, 6]);
    let e = try_run(
        Op::ScatterAdd { axis: 0 },
        &[base, i64t(&[1], &[5]), f64t(&[1, 2], &[1.0, 1.0])],
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("scatter_add") && e.contains("index 5") && e.contains("extent 3"),
        "{e}"
    );
}

#[test]
fn one_hot_with_out_of_range_rows() {
    let r = run1(
        Op::OneHot {
            depth: 3,
            dtype: F32,
        },
        &[i64t(&[4], &[0, 2, 3, -1])],
    );
    assert_eq!(r.shape, vec![4, 3]);
    assert_eq!(
        fl(&r),
        &[1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    );
    let r = run1(
        Op::OneHot {
            depth: 2,
            dtype: I32,
        },
        &[i32t(&[], &[1])],
    );
    assert_eq!(r.as_i64().unwrap(), &[0, 1]);
}

// ---------------------------------------------------------------------------------------------
// Normalisation and losses

#[test]
fn softmax_and_log_softmax() {
    let x = f64t(&[2, 3], &[1.0, 2.0, 3.0, 1000.0, 1000.0, 1000.0]);
    let e = [1f64.exp(), 2f64.exp(), 3f64.exp()];
    let s: f64 = e.iter().sum();
    let r = run1(Op::Softmax { axis: 1 }, &[x.clone()]);
    let third = 1.0 / 3.0;
    assert_close(
        fl(&r),
        &[e[0] / s, e[1] / s, e[2] / s, third, third, third],
        1e-15,
    );
    let r = run1(Op::LogSoftmax { axis: 1 }, &[x.clone()]);
    let ls = s.ln();
    let l3 = -(3f64.ln());
    assert_close(fl(&r), &[1.0 - ls, 2.0 - ls, 3.0 - ls, l3, l3, l3], 1e-15);
    // Along axis 0: [1 vs 1000] etc.
    let r = run1(Op::Softmax { axis: 0 }, &[x]);
    let tiny = (-999f64).exp();
    assert_close(&fl(&r)[..1], &[tiny / (1.0 + tiny)], 1e-12);
    assert_eq!(fl(&r)[3], 1.0);
    // Large values do not overflow, in f32 too.
    let r = run1(Op::Softmax { axis: 0 }, &[f32t(&[2], &[3.0e38, 3.0e38])]);
    assert_eq!(fl(&r), &[0.5, 0.5]);
}

#[test]
fn layer_norm_and_rms_norm() {
    // Row [1,2,3,4]: mean 2.5, biased var 1.25.
    let x = f64t(&[2, 4], &[1.0, 2.0, 3.0, 4.0, 2.0, 2.0, 2.0, 2.0]);
    let r = run1(Op::LayerNorm { eps: 0.0 }, &[x.clone()]);
    let d = 1.25f64.sqrt();
    assert_close(
        fl(&r),
        // A constant row with eps 0 is 0/0, as in PyTorch.
        &[
            -1.5 / d,
            -0.5 / d,
            0.5 / d,
            1.5 / d,
            f64::NAN,
            f64::NAN,
            f64::NAN,
            f64::NAN,
        ],
        1e-15,
    );
    let r = run1(Op::LayerNorm { eps: 0.75 }, &[x.clone()]);
    assert_close(
        &fl(&r)[..2],
        &[-1.5 / 2f64.sqrt(), -0.5 / 2f64.sqrt()],
        1e-15,
    );
    // mean of squares 7.5 and 4.
    let r = run1(Op::RmsNorm { eps: 0.5 }, &[x]);
    let (a, b) = (8f64.sqrt(), 4.5f64.sqrt());
    assert_close(
        fl(&r),
        &[
            1.0 / a,
            2.0 / a,
            3.0 / a,
            4.0 / a,
            2.0 / b,
            2.0 / b,
            2.0 / b,
            2.0 / b,
        ],
        1e-15,
    );
}

#[test]
fn cross_entropy_is_negated_log_softmax_at_the_label() {
    let logits = f64t(&[2, 2, 3], &pseudo(12, 7));
    let labels = i64t(&[2, 2], &[0, 2, 1, 2]);
    let ce = run1(Op::CrossEntropy, &[logits.clone(), labels]);
    assert_eq!(ce.shape, vec![2, 2]);
    let ls = run1(Op::LogSoftmax { axis: 2 }, &[logits.clone()]);
    let lsv = fl(&ls);
    let want = [-lsv[0], -lsv[5], -lsv[7], -lsv[11]];
    assert_eq!(fl(&ce), &want);
    // By hand: logits [0, ln 3] with label 1: -log(3/4).
    let r = run1(
        Op::CrossEntropy,
        &[f64t(&[2], &[0.0, 3f64.ln()]), i32t(&[], &[1])],
    );
    assert_close(fl(&r), &[-(0.75f64.ln())], 1e-15);
    let e = try_run(Op::CrossEntropy, &[logits, i64t(&[2, 2], &[0, 3, 0, 0])])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cross_entropy") && e.contains("label 3") && e.contains("3 classes"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------------
// Dropout and stop_gradient

#[test]
fn dropout_mask_is_deterministic_and_scaled() {
    let n = 10_000;
    let x = f64t(&[100, 100], &vec![1.0; n]);
    let op = |rate, seed| Op::Dropout { rate, seed };
    let a = run1(op(0.3, 42), &[x.clone()]);
    let b = run1(op(0.3, 42), &[x.clone()]);
    assert_eq!(a, b);
    let c = run1(op(0.3, 43), &[x.clone()]);
    assert_ne!(a, c);
    let scale = 1.0 / 0.7;
    let kept = fl(&a).iter().filter(|&&v| v != 0.0).count();
    assert!(fl(&a).iter().all(|&v| v == 0.0 || v == scale));
    let frac = kept as f64 / n as f64;
    assert!((frac - 0.7).abs() < 0.02, "kept fraction {frac}");
    for (i, &v) in fl(&a).iter().enumerate() {
        assert_eq!(v != 0.0, dropout_keep(42, i as u64, 0.3));
    }
    assert_eq!(run1(op(0.0, 9), &[x.clone()]), x);
}

#[test]
fn stop_gradient_is_identity() {
    let x = f32t(&[2], &[1.5, -2.0]);
    assert_eq!(run1(Op::StopGradient, &[x.clone()]), x);
}

// ---------------------------------------------------------------------------------------------
// Whole functions

#[test]
fn ill_typed_nodes_and_undefined_operands_are_errors() {
    let mut f = one_op(Op::Unary(UnaryOp::Neg), &[ty(F32, &[2])]);
    // Corrupt the declared result type.
    let v = f.outputs[0].value;
    f.values[v].ty = ty(F32, &[3]);
    let e = run_function(&f, &[f32t(&[2], &[1.0, 2.0])], Precision::F32).unwrap_err();
    assert!(
        e.to_string().contains("`neg` at %1") && e.to_string().contains("f32[3]"),
        "{e}"
    );
}

/// An MLP 784-256-256-10 at batch 64 with a mean cross-entropy loss: checks that a realistic
/// function runs quickly and that intermediates are freed as they die.
#[test]
fn mlp_forward_runs_quickly() {
    let (b, dims) = (64usize, [784usize, 256, 256, 10]);
    let mut f = Function::new("mlp");
    let push = |f: &mut Function, op: Op, operands: Vec<cleave_ir::Value>| {
        let types: Vec<TensorType> = operands.iter().map(|&v| f.ty(v).clone()).collect();
        let refs: Vec<&TensorType> = types.iter().collect();
        let out = infer(&op, &refs).unwrap();
        let n = f.push_node(op, operands, out);
        f.result(n)
    };
    let x = push(
        &mut f,
        Op::Input {
            name: "x".into(),
            ty: ty(F32, &[b, dims[0]]),
        },
        vec![],
    );
    let labels = push(
        &mut f,
        Op::Input {
            name: "labels".into(),
            ty: ty(I32, &[b]),
        },
        vec![],
    );
    let mut h = x;
    let mut args = vec![
        f32t(
            &[b, dims[0]],
            &pseudo(b * dims[0], 11)
                .iter()
                .map(|&v| v as f32)
                .collect::<Vec<_>>(),
        ),
        i32t(&[b], &(0..b as i32).map(|i| i % 10).collect::<Vec<_>>()),
    ];
    for l in 0..3 {
        let (i, o) = (dims[l], dims[l + 1]);
        let w = push(
            &mut f,
            Op::Param {
                name: format!("w{l}"),
                ty: ty(F32, &[i, o]),
            },
            vec![],
        );
        let bias = push(
            &mut f,
            Op::Param {
                name: format!("b{l}"),
                ty: ty(F32, &[o]),
            },
            vec![],
        );
        let scale = 1.0 / (i as f64).sqrt();
        args.push(f32t(
            &[i, o],
            &pseudo(i * o, 20 + l as u64)
                .iter()
                .map(|&v| (v * scale) as f32)
                .collect::<Vec<_>>(),
        ));
        args.push(f32t(&[o], &vec![0.01; o]));
        let mm = push(
            &mut f,
            Op::MatMul {
                transpose_lhs: false,
                transpose_rhs: false,
            },
            vec![h, w],
        );
        let bb = push(
            &mut f,
            Op::Broadcast {
                shape: vec![b, o],
                dims: vec![1],
            },
            vec![bias],
        );
        h = push(&mut f, Op::Binary(BinaryOp::Add), vec![mm, bb]);
        if l < 2 {
            h = push(&mut f, Op::Unary(UnaryOp::Relu), vec![h]);
        }
    }
    let ce = push(&mut f, Op::CrossEntropy, vec![h, labels]);
    let loss = push(
        &mut f,
        Op::Reduce {
            kind: ReduceKind::Mean,
            axes: vec![0],
        },
        vec![ce],
    );
    f.outputs.push(Output {
        name: "loss".into(),
        value: loss,
    });
    f.outputs.push(Output {
        name: "logits".into(),
        value: h,
    });
    let start = std::time::Instant::now();
    let r = run_function(&f, &args, Precision::F32).unwrap();
    let elapsed = start.elapsed();
    eprintln!("mlp forward: {elapsed:?}");
    assert!(elapsed.as_secs_f64() < 5.0, "too slow: {elapsed:?}");
    let loss = fl(&r[0])[0];
    assert!(loss.is_finite() && loss > 0.0, "loss {loss}");
    assert_eq!(r[1].shape, vec![b, 10]);
    // The loss is the mean of per-row cross-entropies of the returned logits.
    let logits = fl(&r[1]);
    let mut want = 0.0;
    for (row, i) in logits.chunks(10).zip(0..) {
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = row.iter().map(|v| (v - m).exp()).sum();
        want += m + s.ln() - row[i % 10];
    }
    assert_close(&[loss], &[want / b as f64], 1e-6);
}

#[test]
fn repeated_operands_unused_values_and_argument_outputs() {
    let t = ty(F64, &[2]);
    let mut f = one_op(
        Op::Split {
            axis: 0,
            sizes: vec![1, 1],
        },
        &[t.clone()],
    );
    // Keep only the second piece of the split, then add it to itself; also return the input.
    let x = f.args().next().unwrap().value;
    let second = f.outputs[1].value;
    f.outputs.clear();
    let n = f.push_node(
        Op::Binary(BinaryOp::Add),
        vec![second, second],
        vec![ty(F64, &[1])],
    );
    let unused = f.push_node(
        Op::Input {
            name: "unused".into(),
            ty: t.clone(),
        },
        vec![],
        vec![t.clone()],
    );
    let _ = unused;
    f.outputs.push(Output {
        name: "double".into(),
        value: f.result(n),
    });
    f.outputs.push(Output {
        name: "x".into(),
        value: x,
    });
    f.outputs.push(Output {
        name: "double_again".into(),
        value: f.result(n),
    });
    let r = run_function(
        &f,
        &[f64t(&[2], &[1.0, 2.5]), f64t(&[2], &[0.0, 0.0])],
        Precision::F32,
    )
    .unwrap();
    assert_eq!(fl(&r[0]), &[5.0]);
    assert_eq!(fl(&r[1]), &[1.0, 2.5]);
    assert_eq!(r[2], r[0]);
}
