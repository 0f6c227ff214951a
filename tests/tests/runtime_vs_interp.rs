//! The CPU runtime against the reference interpreter: every example (forward, and as a training
//! step after `autodiff,optimizer` with each optimizer, over several steps fed back through
//! `Plan::carry`) and one function per op family give the same outputs, with and without fusion.
//!
//! Tolerance: the normwise relative error of every float output is at most 1e-5,
//! `max_i |a_i - b_i| <= 1e-5 · max_i |b_i|` (runtime `a`, interpreter `b`). An elementwise bound
//! cannot hold in f32: the interpreter accumulates in f64, and where a sum cancels (a logit of
//! 6e-4 made of terms of 0.05) the f32 rounding error is relative to the terms, not the result.
//! An absolute floor of 1e-7 (about one f32 ulp of 1) covers tensors that are exactly zero in
//! exact arithmetic and pure rounding noise in both engines (the attention key bias's gradient is
//! such a tensor). NaNs must match; ints and bools must be equal.

use std::collections::BTreeMap;
use std::path::Path;

use cleave_compiler::init::{init_params, SplitMix64};
use cleave_ir::{parse_function, run_function_named, DType, Function, Module, Precision, Tensor};
use cleave_passes::{PassContext, PassManager};
use cleave_runtime::{
    compile_with, host_from_tensor, tensor_from_host, Codegen, CompileOptions, HostData,
};

const RTOL: f64 = 1e-5;

fn random_args(func: &Function, seed: u64) -> BTreeMap<String, Tensor> {
    let mut rng = SplitMix64::new(seed);
    let mut args = init_params(func, seed);
    for a in func.args() {
        let n = a.ty.num_elements();
        let t = if a.name == "opt.step" {
            Tensor::scalar_f(DType::F32, 1.0)
        } else if a.name.starts_with("opt.") {
            Tensor::zeros(a.ty)
        } else if a.role == cleave_ir::ArgRole::Param && args.contains_key(a.name) {
            continue;
        } else {
            match a.ty.dtype {
                DType::F32 => Tensor::from_f32(
                    a.ty.shape.clone(),
                    (0..n).map(|_| rng.normal() as f32).collect(),
                ),
                DType::I32 => Tensor::from_i32(
                    a.ty.shape.clone(),
                    (0..n).map(|_| (rng.next_u64() % 10) as i32).collect(),
                ),
                _ => Tensor::from_bool(
                    a.ty.shape.clone(),
                    (0..n).map(|_| rng.next_u64().is_multiple_of(2)).collect(),
                ),
            }
        };
        args.insert(a.name.to_string(), t);
    }
    args
}

fn assert_close(got: &HostData, want: &Tensor, what: &str, rtol: f64) {
    let want_h = host_from_tensor(want).expect("runtime dtype");
    match (got, &want_h) {
        (HostData::F32(a), HostData::F32(b)) => {
            assert_eq!(a.len(), b.len(), "{what}: length");
            let max = b.iter().fold(0f64, |m, &x| m.max((x as f64).abs()));
            for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
                let (x, y) = (x as f64, y as f64);
                if x.is_nan() && y.is_nan() || x == y {
                    continue;
                }
                let tol = rtol * max + 1e-7;
                assert!(
                    (x - y).abs() <= tol,
                    "{what}: element {i}: runtime {x}, interpreter {y} (|diff| {} > {tol})",
                    (x - y).abs()
                );
            }
        }
        (a, b) => assert_eq!(a, b, "{what}"),
    }
}

/// Runs `func` for `steps` steps in both engines (feeding outputs named like arguments back) and
/// compares every output of every step.
fn check_steps(func: &Function, seed: u64, steps: usize, what: &str) {
    check_steps_tol(func, seed, steps, what, RTOL)
}

fn check_steps_tol(func: &Function, seed: u64, steps: usize, what: &str, rtol: f64) {
    // Fused with the JIT, fused interpreted, and unfused (each node its own loop) with the JIT;
    // with the `llvm` feature, fused and unfused with LLVM's code too.
    let mut configs = vec![
        (true, true, Codegen::Cranelift),
        (true, false, Codegen::Cranelift),
        (false, true, Codegen::Cranelift),
    ];
    if Codegen::Llvm.available() {
        configs.extend([(true, true, Codegen::Llvm), (false, true, Codegen::Llvm)]);
    }
    for (fuse, jit, codegen) in configs {
        let mut args = random_args(func, seed);
        let mut plan = compile_with(
            func,
            &CompileOptions {
                fuse,
                preserve_args: false,
                jit,
                codegen,
            },
        )
        .unwrap_or_else(|e| panic!("{what}: compile: {e}"));
        for (i, a) in plan.args().to_vec().iter().enumerate() {
            let h = host_from_tensor(&args[&a.name]).unwrap();
            plan.set_input(i, h.as_slice()).unwrap();
        }
        for step in 0..steps {
            let want = run_function_named(func, &args, Precision::F32)
                .unwrap_or_else(|e| panic!("{what}: interpreter: {e}"));
            plan.run()
                .unwrap_or_else(|e| panic!("{what}: runtime: {e}"));
            for (j, o) in func.outputs.iter().enumerate() {
                assert_close(
                    &plan.output(j),
                    &want[j],
                    &format!(
                        "{what} (fuse={fuse}, jit={jit}, {codegen}) step {step} output `{}`",
                        o.name
                    ),
                    rtol,
                );
            }
            // Next step: outputs named like arguments replace them (from the interpreter, so
            // errors do not compound); data inputs stay.
            for (j, o) in func.outputs.iter().enumerate() {
                if args.contains_key(&o.name) {
                    args.insert(o.name.clone(), want[j].clone());
                }
            }
            plan.carry();
            for (i, a) in plan.args().to_vec().iter().enumerate() {
                let h = host_from_tensor(&args[&a.name]).unwrap();
                plan.set_input(i, h.as_slice()).unwrap();
            }
        }
    }
}

fn examples() -> Vec<(String, Function)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut out = Vec::new();
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cir"))
        .collect();
    paths.sort();
    for p in paths {
        let m = cleave_compiler::load::load_module(&p, &Default::default()).unwrap();
        // The benchmark-sized models (the 4-layer GPT: 7 GFLOP forward) would take the debug
        // interpreter many minutes; the small ones cover the same ops.
        if cleave_ir::cost::function_cost(&m.functions[0])
            .total()
            .total()
            > 1_000_000_000
        {
            continue;
        }
        out.push((
            p.file_name().unwrap().to_string_lossy().into_owned(),
            m.functions[0].clone(),
        ));
    }
    out
}

#[test]
fn examples_forward() {
    let ex = examples();
    assert!(ex.len() >= 3);
    for (name, f) in ex {
        check_steps(&f, 1, 1, &name);
    }
}

#[test]
fn examples_training_steps() {
    for (name, f) in examples() {
        for opt in [
            "optimizer{kind=sgd,lr=0.05}",
            "optimizer{kind=momentum,lr=0.05}",
            "optimizer{kind=adamw,lr=0.01,eps=1e-4}",
        ] {
            let mut module = Module::with_function(f.clone());
            let pm = PassManager::from_pipeline(&format!("autodiff,{opt}")).unwrap();
            pm.run(&mut module, &mut PassContext::default(), &mut |_| {})
                .unwrap();
            // AdamW moves every weight by about lr·g/(|g|+eps), so an update carries the
            // *elementwise* relative error of its gradient element, and gradients that cancel
            // (bias gradients summed over the batch, the tied embedding, the attention key bias
            // whose exact gradient is 0) have f32 rounding errors of 1e-4 relative to themselves.
            // Its steps are checked at 1e-3, with eps = 1e-4 so that pure noise (about 1e-12) is
            // not normalised to lr-sized steps; SGD and momentum at 1e-5.
            let rtol = if opt.contains("adamw") { 1e-3 } else { RTOL };
            check_steps_tol(&module.functions[0], 2, 3, &format!("{name} + {opt}"), rtol);
        }
    }
}

/// One function per op family (text IR), each run through both engines.
const OPS: &[&str] = &[
    // Float unary ops, in one fused loop with several outputs; a length over one chunk.
    r#"func @unary {
  %x = input {name = "x"} : f32[3,700]
  %a = abs %x : f32[3,700]
  %e = constant {value = 0.001} : f32[3,700]
  %p = add %a, %e : f32[3,700]
  %0 = neg %x : f32[3,700]
  %1 = exp %x : f32[3,700]
  %2 = log %p : f32[3,700]
  %3 = sqrt %p : f32[3,700]
  %4 = rsqrt %p : f32[3,700]
  %5 = tanh %x : f32[3,700]
  %6 = sigmoid %x : f32[3,700]
  %7 = relu %x : f32[3,700]
  %8 = gelu %x : f32[3,700]
  %9 = gelu_tanh %x : f32[3,700]
  %10 = silu %x : f32[3,700]
  %11 = sin %x : f32[3,700]
  %12 = cos %x : f32[3,700]
  %13 = erf %x : f32[3,700]
  %14 = reciprocal %p : f32[3,700]
  %15 = sign %x : f32[3,700]
  %16 = floor %x : f32[3,700]
  %17 = round %x : f32[3,700]
  return %0 as "neg", %1 as "exp", %2 as "log", %3 as "sqrt", %4 as "rsqrt", %5 as "tanh", %6 as "sigmoid", %7 as "relu", %8 as "gelu", %9 as "gelu_tanh", %10 as "silu", %11 as "sin", %12 as "cos", %13 as "erf", %14 as "reciprocal", %15 as "sign", %16 as "floor", %17 as "round"
}"#,
    r#"func @binary {
  %x = input {name = "x"} : f32[6,40]
  %y = input {name = "y"} : f32[6,40]
  %a = abs %x : f32[6,40]
  %0 = add %x, %y : f32[6,40]
  %1 = sub %x, %y : f32[6,40]
  %2 = mul %x, %y : f32[6,40]
  %3 = div %x, %y : f32[6,40]
  %4 = max %x, %y : f32[6,40]
  %5 = min %x, %y : f32[6,40]
  %6 = pow %a, %y : f32[6,40]
  %7 = lt %x, %y : bool[6,40]
  %8 = ge %x, %y : bool[6,40]
  %9 = select %7, %x, %y : f32[6,40]
  return %0 as "add", %1 as "sub", %2 as "mul", %3 as "div", %4 as "max", %5 as "min", %6 as "pow", %7 as "lt", %8 as "ge", %9 as "select"
}"#,
    r#"func @ints_and_bools {
  %i = input {name = "i"} : i32[4,9]
  %j = input {name = "j"} : i32[4,9]
  %b = input {name = "b"} : bool[4,9]
  %c = input {name = "c"} : bool[4,9]
  %x = input {name = "x"} : f32[4,9]
  %one = constant {value = 1} : i32[4,9]
  %d = sub %i, %j : i32[4,9]
  %nz = add %j, %one : i32[4,9]
  %0 = neg %d : i32[4,9]
  %1 = abs %d : i32[4,9]
  %2 = relu %d : i32[4,9]
  %3 = sign %d : i32[4,9]
  %4 = mul %d, %i : i32[4,9]
  %5 = div %d, %nz : i32[4,9]
  %6 = max %d, %i : i32[4,9]
  %7 = min %d, %i : i32[4,9]
  %8 = eq %i, %j : bool[4,9]
  %9 = ne %b, %c : bool[4,9]
  %10 = and %b, %c : bool[4,9]
  %11 = or %b, %c : bool[4,9]
  %12 = not %b : bool[4,9]
  %13 = select %b, %i, %j : i32[4,9]
  %14 = select %b, %c, %12 : bool[4,9]
  %15 = cast %x : i32[4,9]
  %16 = cast %x : bool[4,9]
  %17 = cast %d : f32[4,9]
  %18 = cast %d : bool[4,9]
  %19 = cast %b : f32[4,9]
  %20 = cast %b : i32[4,9]
  %21 = le %d, %i : bool[4,9]
  %22 = gt %x, %17 : bool[4,9]
  return %0 as "neg", %1 as "abs", %2 as "relu", %3 as "sign", %4 as "mul", %5 as "div", %6 as "max", %7 as "min", %8 as "eq", %9 as "ne", %10 as "and", %11 as "or", %12 as "not", %13 as "sel_i", %14 as "sel_b", %15 as "f2i", %16 as "f2b", %17 as "i2f", %18 as "i2b", %19 as "b2f", %20 as "b2i", %21 as "le", %22 as "gt"
}"#,
    r#"func @views {
  %x = input {name = "x"} : f32[2,3,4]
  %v = input {name = "v"} : f32[3]
  %c = input {name = "c"} : f32[4,1]
  %s = input {name = "s"} : f32[]
  %m = input {name = "m"} : f32[6,8]
  %u = input {name = "u"} : f32[4,2,3]
  %t = transpose %x {perm = [2, 0, 1]} : f32[4,2,3]
  %tu = add %t, %u : f32[4,2,3]
  %b1 = broadcast %v {dims = [1]} : f32[4,3]
  %b2 = broadcast %c {dims = [0, 1]} : f32[4,3]
  %b3 = broadcast %s {dims = []} : f32[4,3]
  %b12 = mul %b1, %b2 : f32[4,3]
  %b123 = sub %b12, %b3 : f32[4,3]
  %sl = slice %m {start = [1, 2], limit = [6, 8], stride = [2, 3]} : f32[3,2]
  %slr = reshape %sl : f32[6]
  %e = exp %slr : f32[6]
  %r = reshape %x : f32[6,4]
  %rr = add %r, %r : f32[6,4]
  %sg = stop_gradient %rr : f32[6,4]
  %tt = transpose %t {perm = [1, 2, 0]} : f32[2,3,4]
  %bb = broadcast %b1 {dims = [1, 2]} : f32[2,4,3]
  return %t as "t", %tu as "tu", %b123 as "b", %sl as "sl", %e as "e", %sg as "sg", %tt as "tt", %bb as "bb", %b3 as "b3"
}"#,
    // JIT lane handling: element counts that leave a scalar tail (35), broadcasts whose inner
    // dimension is a multiple of 4 (one vector load; one splat per row) or not (per-lane loads).
    r#"func @jit_lanes {
  %x = input {name = "x"} : f32[5,7]
  %y = input {name = "y"} : f32[5,7]
  %i = input {name = "i"} : i32[5,7]
  %b = input {name = "b"} : bool[5,7]
  %r = input {name = "r"} : f32[8]
  %col = input {name = "col"} : f32[3]
  %z = constant {value = 0} : f32[5,7]
  %gt = gt %x, %z : bool[5,7]
  %bo = and %gt, %b : bool[5,7]
  %sel = select %bo, %x, %y : f32[5,7]
  %rl = relu %sel : f32[5,7]
  %xi = cast %x : i32[5,7]
  %s = add %xi, %i : i32[5,7]
  %mx = max %x, %y : f32[5,7]
  %br = broadcast %r {dims = [1]} : f32[3,8]
  %bc = broadcast %col {dims = [0]} : f32[3,8]
  %p = mul %br, %bc : f32[3,8]
  %q = exp %p : f32[3,8]
  %bt = broadcast %col {dims = [1]} : f32[7,3]
  %bt2 = tanh %bt : f32[7,3]
  return %rl as "relu", %s as "s", %bo as "bo", %mx as "mx", %q as "q", %bt2 as "bt"
}"#,
    r#"func @constants_and_copies {
  %x = input {name = "x"} : f32[2,3]
  %y = input {name = "y"} : f32[2,1]
  %i = input {name = "i"} : i32[2,3]
  %z = input {name = "z"} : f32[2,9]
  %k = iota {dim = 1} : i32[2,3]
  %kf = iota {dim = 0} : f32[2,3]
  %c = constant {value = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]} : f32[2,3]
  %ci = constant {value = [1, -2, 3, -4, 5, -6]} : i32[2,3]
  %s = constant {value = 2.5} : f32[2,3]
  %0 = add %k, %ci : i32[2,3]
  %1 = mul %kf, %c : f32[2,3]
  %2 = concat %x, %y {axis = 1} : f32[2,4]
  %3 = concat %x, %x, %x {axis = 0} : f32[6,3]
  %p0, %p1, %p2 = split %z {axis = 1, sizes = [2, 3, 4]} : f32[2,2], f32[2,3], f32[2,4]
  %4 = pad %x {low = [1, 0], high = [0, 2], value = -1} : f32[3,5]
  %5 = pad %i {low = [0, 1], high = [1, 1], value = 7} : i32[3,5]
  %6 = matmul %s, %c {transpose_rhs = true} : f32[2,2]
  return %0 as "iota_i", %1 as "iota_f", %2 as "concat1", %3 as "concat0", %p0 as "p0", %p1 as "p1", %p2 as "p2", %4 as "pad_f", %5 as "pad_i", %6 as "splat_to_matmul", %s as "splat_out", %c as "const_out"
}"#,
    r#"func @reductions {
  %x = input {name = "x"} : f32[4,5,6]
  %i = input {name = "i"} : i32[4,5,6]
  %0 = reduce_sum %x {axes = [0]} : f32[5,6]
  %1 = reduce_sum %x {axes = [1]} : f32[4,6]
  %2 = reduce_sum %x {axes = [2]} : f32[4,5]
  %3 = reduce_mean %x {axes = [0, 2]} : f32[5]
  %4 = reduce_mean %x {axes = [0, 1, 2]} : f32[]
  %5 = reduce_max %x {axes = [1, 2]} : f32[4]
  %6 = reduce_min %x {axes = [0, 1]} : f32[6]
  %7 = reduce_max %x {axes = [1]} : f32[4,6]
  %8 = reduce_sum %i {axes = [1]} : i32[4,6]
  %9 = reduce_max %i {axes = [0, 2]} : i32[5]
  return %0 as "s0", %1 as "s1", %2 as "s2", %3 as "m02", %4 as "mall", %5 as "max12", %6 as "min01", %7 as "max1", %8 as "isum", %9 as "imax"
}"#,
    r#"func @matmuls {
  %a = input {name = "a"} : f32[5,7]
  %at = input {name = "at"} : f32[7,5]
  %b = input {name = "b"} : f32[7,3]
  %bt = input {name = "bt"} : f32[3,7]
  %q = input {name = "q"} : f32[2,4,5,7]
  %k = input {name = "k"} : f32[2,4,3,7]
  %ia = input {name = "ia"} : i32[3,4]
  %ib = input {name = "ib"} : i32[2,4]
  %0 = matmul %a, %b : f32[5,3]
  %1 = matmul %at, %b {transpose_lhs = true} : f32[5,3]
  %2 = matmul %a, %bt {transpose_rhs = true} : f32[5,3]
  %3 = matmul %at, %bt {transpose_lhs = true, transpose_rhs = true} : f32[5,3]
  %4 = matmul %q, %k {transpose_rhs = true} : f32[2,4,5,3]
  %5 = matmul %ia, %ib {transpose_rhs = true} : i32[3,2]
  return %0 as "nn", %1 as "tn", %2 as "nt", %3 as "tt", %4 as "batched", %5 as "int"
}"#,
    r#"func @convolutions {
  %x = input {name = "x"} : f32[2,4,7,6]
  %w = input {name = "w"} : f32[6,2,3,3]
  %dy = input {name = "dy"} : f32[2,6,4,2]
  %x2 = input {name = "x2"} : f32[2,3,6,5]
  %w2 = input {name = "w2"} : f32[4,3,3,2]
  %0 = conv2d %x, %w {stride = [2, 2], padding = [1, 0, 1, 0], dilation = [1, 1], groups = 2} : f32[2,6,4,2]
  %1 = conv2d_grad_input %dy, %w {stride = [2, 2], padding = [1, 0, 1, 0], dilation = [1, 1], groups = 2} : f32[2,4,7,6]
  %2 = conv2d_grad_weight %x, %dy {stride = [2, 2], padding = [1, 0, 1, 0], dilation = [1, 1], groups = 2} : f32[6,2,3,3]
  %3 = conv2d %x2, %w2 {stride = [1, 1], padding = [2, 1, 2, 1], dilation = [2, 1], groups = 1} : f32[2,4,6,6]
  return %0 as "conv", %1 as "dx", %2 as "dw", %3 as "dilated"
}"#,
    r#"func @pools {
  %x = input {name = "x"} : f32[2,3,7,6]
  %dy = input {name = "dy"} : f32[2,3,4,3]
  %0 = max_pool2d %x {window = [3, 3], stride = [2, 2], padding = [1, 1, 1, 1]} : f32[2,3,4,3]
  %1 = avg_pool2d %x {window = [3, 3], stride = [2, 2], padding = [1, 1, 1, 1], count_include_pad = false} : f32[2,3,4,3]
  %2 = avg_pool2d %x {window = [3, 3], stride = [2, 2], padding = [1, 1, 1, 1], count_include_pad = true} : f32[2,3,4,3]
  %3 = max_pool2d_grad %x, %dy {window = [3, 3], stride = [2, 2], padding = [1, 1, 1, 1]} : f32[2,3,7,6]
  %4 = avg_pool2d_grad %dy {window = [3, 3], stride = [2, 2], padding = [1, 1, 1, 1], count_include_pad = false} : f32[2,3,7,6]
  %5 = avg_pool2d_grad %dy {window = [3, 3], stride = [2, 2], padding = [1, 1, 1, 1], count_include_pad = true} : f32[2,3,7,6]
  return %0 as "max", %1 as "avg", %2 as "avg_pad", %3 as "dmax", %4 as "davg", %5 as "davg_pad"
}"#,
    r#"func @indexing_and_norms {
  %t = input {name = "t"} : f32[12,5]
  %t1 = input {name = "t1"} : f32[5,12]
  %idx = input {name = "idx"} : i32[3,4]
  %upd = input {name = "upd"} : f32[3,4,5]
  %it = input {name = "it"} : i32[12,5]
  %iu = input {name = "iu"} : i32[3,4,5]
  %x = input {name = "x"} : f32[4,5,6]
  %lg = input {name = "lg"} : f32[4,10]
  %lb = input {name = "lb"} : i32[4]
  %0 = gather %t, %idx {axis = 0} : f32[3,4,5]
  %1 = gather %t1, %idx {axis = 1} : f32[5,3,4]
  %2 = scatter_add %t, %idx, %upd {axis = 0} : f32[12,5]
  %3 = scatter_add %it, %idx, %iu {axis = 0} : i32[12,5]
  %4 = softmax %x {axis = 1} : f32[4,5,6]
  %5 = log_softmax %x {axis = 2} : f32[4,5,6]
  %6 = layer_norm %x {eps = 1e-5} : f32[4,5,6]
  %7 = rms_norm %x {eps = 1e-6} : f32[4,5,6]
  %8 = cross_entropy %lg, %lb : f32[4]
  %9 = one_hot %lb {depth = 11} : f32[4,11]
  %10 = one_hot %lb {depth = 11} : i32[4,11]
  %12 = dropout %x {seed = 7, rate = 0.3} : f32[4,5,6]
  %13 = softmax %x {axis = 0} : f32[4,5,6]
  return %0 as "gather0", %1 as "gather1", %2 as "scatter", %3 as "scatter_i", %4 as "softmax", %5 as "log_softmax", %6 as "layer_norm", %7 as "rms_norm", %8 as "ce", %9 as "oh_f", %10 as "oh_i", %12 as "dropout", %13 as "softmax0"
}"#,
    // Custom-gradient ops: straight-through estimators (fused: round and sign; a kernel: the
    // argmax one-hot along either axis) and gradient reversal (an alias).
    r#"func @custom_gradient {
  %x = input {name = "x"} : f32[6,9]
  %k = constant {value = 2.5} : f32[6,9]
  %s = mul %x, %k : f32[6,9]
  %0 = ste_round %s : f32[6,9]
  %1 = ste_sign %x : f32[6,9]
  %2 = ste_argmax_one_hot %x {axis = 1} : f32[6,9]
  %3 = ste_argmax_one_hot %x {axis = 0} : f32[6,9]
  %4 = grad_reverse %x {lambda = 0.5} : f32[6,9]
  %5 = add %4, %0 : f32[6,9]
  return %0 as "round", %1 as "sign", %2 as "argmax1", %3 as "argmax0", %5 as "reversed"
}"#,
];

#[test]
fn every_op_family() {
    for (i, text) in OPS.iter().enumerate() {
        let f = parse_function(text).unwrap_or_else(|e| panic!("case {i}: {e}"));
        cleave_ir::verify_function(&f).unwrap_or_else(|e| panic!("case {i}: {e:?}"));
        check_steps(&f, 10 + i as u64, 1, &format!("@{}", f.name));
    }
}

#[test]
fn memory_is_reused() {
    let (_, f) = examples()
        .into_iter()
        .find(|(n, _)| n == "mlp.cir")
        .unwrap();
    let mut module = Module::with_function(f);
    PassManager::from_pipeline("autodiff,optimizer{kind=sgd}")
        .unwrap()
        .run(&mut module, &mut PassContext::default(), &mut |_| {})
        .unwrap();
    let step = &module.functions[0];
    let plan = cleave_runtime::compile(step).unwrap();
    let naive: usize = step
        .body
        .iter()
        .flat_map(|&n| step.node(n).results.iter())
        .map(|&v| step.ty(v).size_bytes())
        .sum();
    assert!(
        plan.peak_bytes() * 2 < naive,
        "planned {} bytes, one buffer per value would be {naive}",
        plan.peak_bytes()
    );
    let _ = tensor_from_host(&[1], &HostData::F32(vec![0.0]));
}

#[test]
fn data_errors_name_the_node() {
    let f = parse_function(
        r#"func @g {
  %t = input {name = "t"} : f32[4,2]
  %i = input {name = "i"} : i32[3]
  %0 = gather %t, %i {axis = 0} : f32[3,2]
  return %0 as "y"
}"#,
    )
    .unwrap();
    let mut plan = cleave_runtime::compile(&f).unwrap();
    plan.set_input(0, HostData::F32(vec![0.0; 8]).as_slice())
        .unwrap();
    plan.set_input(1, HostData::I32(vec![0, 9, 1]).as_slice())
        .unwrap();
    let e = plan.run().unwrap_err().to_string();
    assert!(
        e.contains("gather") && e.contains("%2") && e.contains("index 9"),
        "{e}"
    );
}

#[test]
fn fused_loops_are_jit_compiled() {
    for (name, f) in examples() {
        let mut module = Module::with_function(f);
        PassManager::from_pipeline("autodiff,optimizer{kind=adamw}")
            .unwrap()
            .run(&mut module, &mut PassContext::default(), &mut |_| {})
            .unwrap();
        let step = &module.functions[0];
        let plan = cleave_runtime::compile(step).unwrap();
        assert!(plan.fused_kernels() > 0, "{name}");
        // Loops with exp/erf/GELU stay interpreted on CPUs with FMA (their ops run 8–16 lanes
        // wide there); every other loop is compiled.
        assert!(plan.jit_kernels() > 0, "{name}");
        assert_eq!(
            plan.jit_kernels() + plan.vector_math_kernels(),
            plan.fused_kernels(),
            "{name}"
        );
        let off = compile_with(
            step,
            &CompileOptions {
                jit: false,
                ..CompileOptions::default()
            },
        )
        .unwrap();
        assert_eq!(off.jit_kernels() + off.vector_math_kernels(), 0, "{name}");
    }
}

/// An SGD update of a weight gradient folds into its GEMM (`w ← w − lr·xᵀ·dy`, one kernel, no
/// stored gradient) and matches the interpreter over several carried steps; an update whose
/// weight is read after it, or whose gradient is also an output, is left unfused.
#[test]
fn sgd_update_folds_into_the_wgrad_gemm() {
    let folded = parse_function(
        r#"func @f {
  %x = input {name = "x"} : f32[6,3]
  %dy = input {name = "dy"} : f32[6,5]
  %w = param {name = "w"} : f32[3,5]
  %g = matmul %x, %dy {transpose_lhs = true} : f32[3,5]
  %lr = constant {value = 0.1} : f32[3,5]
  %u = mul %g, %lr : f32[3,5]
  %n = sub %w, %u : f32[3,5]
  return %n as "w"
}"#,
    )
    .unwrap();
    let plan = cleave_runtime::compile(&folded).unwrap();
    assert_eq!(plan.num_kernels(), 1, "one GEMM, no elementwise update");
    check_steps(&folded, 5, 3, "folded sgd");
    let kept = parse_function(
        r#"func @f {
  %x = input {name = "x"} : f32[6,3]
  %dy = input {name = "dy"} : f32[6,5]
  %w = param {name = "w"} : f32[3,5]
  %g = matmul %x, %dy {transpose_lhs = true} : f32[3,5]
  %lr = constant {value = 0.1} : f32[3,5]
  %u = mul %g, %lr : f32[3,5]
  %n = sub %w, %u : f32[3,5]
  return %n as "w", %g as "grad"
}"#,
    )
    .unwrap();
    let plan = cleave_runtime::compile(&kept).unwrap();
    assert_eq!(
        plan.num_kernels(),
        2,
        "the gradient is an output, so it is stored"
    );
    check_steps(&kept, 5, 3, "sgd with gradient output");
}

/// A folded update runs its GEMM at the update's place: a weight that a later fold's GEMM reads
/// (`g2 = w1·e`, folded into `w2`'s update after `w1`'s) is not updated in place before it.
#[test]
fn a_fold_never_overwrites_a_weight_another_fold_reads() {
    let f = parse_function(
        r#"func @f {
  %x = input {name = "x"} : f32[6,4]
  %dy = input {name = "dy"} : f32[6,5]
  %e = input {name = "e"} : f32[5,5]
  %w1 = param {name = "w1"} : f32[4,5]
  %w2 = param {name = "w2"} : f32[4,5]
  %g1 = matmul %x, %dy {transpose_lhs = true} : f32[4,5]
  %g2 = matmul %w1, %e : f32[4,5]
  %lr = constant {value = 0.1} : f32[4,5]
  %u1 = mul %g1, %lr : f32[4,5]
  %n1 = sub %w1, %u1 : f32[4,5]
  %u2 = mul %g2, %lr : f32[4,5]
  %n2 = sub %w2, %u2 : f32[4,5]
  return %n1 as "w1", %n2 as "w2"
}"#,
    )
    .unwrap();
    check_steps(&f, 7, 3, "two folds, one reading the other's weight");
}
