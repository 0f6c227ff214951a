//! Writes the GPU check cases (`scripts/gpu-check.sh build`): every op case of
//! `mlir/tests/ops/*.cir` and the MLP and GPT-tiny training steps, compiled to PTX with the
//! default GPU pipeline, with random inputs and the reference interpreter's outputs; plus GPT-tiny
//! trained for 50 SGD steps in the interpreter (its losses), for the GPU to repeat.
//!
//! `cargo run --features mlir -p cleave-mlir --example gpu_cases -- OUT_DIR`; the device side is
//! `runtime/examples/gpu_cases.rs`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;

use cleave_ir::{run_function_named, Function, Precision, Tensor};
use cleave_mlir::gpu::compile_gpu;
use cleave_mlir::pipeline::default_gpu_pipeline;

use cleave_runtime::gpu_kernel::{GpuCase, PlainTensor};

fn plain(m: &BTreeMap<String, Tensor>) -> BTreeMap<String, PlainTensor> {
    m.iter()
        .map(|(k, t)| (k.clone(), PlainTensor::from_tensor(t)))
        .collect()
}

fn case(name: &str, func: &Function, seed: u64, steps: usize) -> GpuCase {
    let prog = compile_gpu(func, &default_gpu_pipeline()).unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut args = common::random_args(func, seed);
    let names: Vec<String> = func.outputs.iter().map(|o| o.name.clone()).collect();
    let run = |args: &BTreeMap<String, Tensor>| -> BTreeMap<String, Tensor> {
        let out = run_function_named(func, args, Precision::F32).unwrap();
        names.iter().cloned().zip(out).collect()
    };
    let first = run(&args);
    let carry: Vec<String> = if steps > 1 {
        names
            .iter()
            .filter(|n| args.contains_key(*n))
            .cloned()
            .collect()
    } else {
        Vec::new()
    };
    let inputs = plain(&args);
    let mut losses = Vec::new();
    let mut out = first.clone();
    for step in 0..steps {
        if step > 0 {
            out = run(&args);
        }
        if let Some(l) = out.get("loss") {
            losses.push(l.to_f64_vec()[0]);
        }
        for c in &carry {
            args.insert(c.clone(), out[c].clone());
        }
    }
    GpuCase {
        name: name.to_string(),
        function: prog.descriptor(),
        inputs,
        expected: plain(&first),
        steps,
        carry,
        losses,
    }
}

fn main() {
    let out = std::env::args().nth(1).expect("usage: gpu_cases OUT_DIR");
    std::fs::create_dir_all(&out).unwrap();
    let mut cases = Vec::new();
    for (i, (name, func)) in common::op_cases().into_iter().enumerate() {
        cases.push(case(&format!("op/{name}"), &func, 100 + i as u64, 1));
    }
    cases.push(case(
        "mlp training step (momentum)",
        &common::training_step("mlp.cir", "optimizer{kind=momentum,lr=0.05}"),
        7,
        1,
    ));
    // Small parameters (±0.2) and lr 0.05, as the CPU check uses: 50 steps of SGD.
    cases.push(case(
        "gpt-tiny 50 SGD steps",
        &common::training_step("gpt-tiny.cir", "optimizer{kind=sgd,lr=0.05}"),
        8,
        50,
    ));
    for (i, c) in cases.iter().enumerate() {
        let path = std::path::Path::new(&out).join(format!("case{i:02}.json"));
        std::fs::write(&path, serde_json::to_string(c).unwrap()).unwrap();
        println!("{}: {}", path.display(), c.name);
    }
}
