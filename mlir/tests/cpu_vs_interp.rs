//! The MLIR kernels, lowered through MLIR's LLVM path and run with the ExecutionEngine, against
//! the reference interpreter (f32): every op family, and the MLP and GPT-tiny training steps
//! (`autodiff,optimizer`), whose kernel groups are the fused kernels the GPU runs.
//!
//! Tolerance: normwise relative 1e-5 (`common::assert_close`, the runtime's criterion).
#![cfg(feature = "mlir")]

mod common;

use cleave_ir::{run_function_named, Function, Module, Precision};
use cleave_mlir::cpu::compile_cpu;
use cleave_passes::{PassContext, PassManager};

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

fn training_step(example: &str, optimizer: &str) -> Function {
    let mut module = Module::with_function(common::example(example));
    PassManager::from_pipeline(&format!("autodiff,{optimizer}"))
        .unwrap()
        .run(&mut module, &mut PassContext::default(), &mut |_| {})
        .unwrap();
    module.functions.remove(0)
}

#[test]
fn mlp_training_step() {
    let f = training_step("mlp.cir", "optimizer{kind=momentum,lr=0.05}");
    check(&f, 7, "mlp.cir training step");
}

#[test]
fn gpt_tiny_training_step() {
    let f = training_step("gpt-tiny.cir", "optimizer{kind=sgd,lr=0.05}");
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
