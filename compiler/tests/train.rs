//! `cleave train`: resuming is bit-exact, checkpoints survive a failed write, bad data and
//! non-finite losses get errors that name the tensor, the step and the op.

use std::collections::BTreeMap;

mod common;

use cleave_compiler::tensors::{read_tensors, write_tensors};
use cleave_compiler::train::{read_checkpoint, train, OptimizerArg, TrainArgs};
use cleave_ir::Tensor;
use common::{args, root, tmp};

#[test]
fn resume_continues_bit_exactly() {
    let (a, b) = (tmp("full"), tmp("half"));
    train(&TrainArgs {
        checkpoint: Some(a.clone()),
        ..args(20)
    })
    .unwrap();
    train(&TrainArgs {
        checkpoint: Some(b.clone()),
        ..args(10)
    })
    .unwrap();
    let metrics = b.join("metrics.jsonl");
    train(&TrainArgs {
        checkpoint: Some(b.clone()),
        resume: Some(b.clone()),
        metrics: Some(metrics.clone()),
        ..args(20)
    })
    .unwrap();
    let (ta, ma) = read_checkpoint(&a).unwrap();
    let (tb, mb) = read_checkpoint(&b).unwrap();
    assert_eq!(ma["step"], "20");
    assert_eq!(mb["step"], "20");
    assert_eq!(mb["data_cursor"], (20 * 32).to_string());
    assert!(ta.contains_key("opt.m.fc1.weight") && ta.contains_key("opt.step"));
    assert_eq!(ta, tb, "20 steps and 10 + resumed 10 steps differ");
    // A checkpoint of another optimizer is refused by name (not as a missing tensor).
    let e = train(&TrainArgs {
        resume: Some(b.clone()),
        optimizer: OptimizerArg::Sgd,
        ..args(30)
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("written with optimizer adamw; this run has sgd"),
        "{e}"
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("steps_per_s").is_some())
        .collect();
    assert_eq!(lines.len(), 10);
    assert_eq!(lines[0]["step"], 11);
    assert!(lines[0]["loss"].as_f64().unwrap() > 0.0);
    assert!(lines[0]["steps_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn training_reaches_the_stated_accuracy() {
    let s = train(&TrainArgs {
        seed: Some(1),
        ..args(300)
    })
    .unwrap();
    let acc = s.accuracy.unwrap();
    assert!(acc >= 0.85, "held-out accuracy {acc}");
}

#[test]
fn data_errors_name_the_tensor() {
    let d = tmp("data");
    let data = read_tensors(&root().join("examples/data/digits.safetensors")).unwrap();
    let mut missing: BTreeMap<String, Tensor> = data.clone();
    missing.remove("labels");
    write_tensors(&d.join("missing.safetensors"), &missing).unwrap();
    let e = train(&TrainArgs {
        data: d.join("missing.safetensors"),
        ..args(1)
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("no tensor named \"labels\""), "{e}");

    let mut wrong = data.clone();
    wrong.insert("x".into(), Tensor::from_f32([10, 3], vec![0.0; 30]));
    write_tensors(&d.join("wrong.safetensors"), &wrong).unwrap();
    let e = train(&TrainArgs {
        data: d.join("wrong.safetensors"),
        ..args(1)
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("\"x\" is f32[10,3]") && e.contains("f32[N,64]"),
        "{e}"
    );

    let e = train(&TrainArgs {
        batch: Some(7),
        ..args(1)
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("traced at batch 32"), "{e}");
}

#[test]
fn nan_loss_stops_with_the_step_and_the_op() {
    let d = tmp("nan");
    train(&TrainArgs {
        checkpoint: Some(d.clone()),
        optimizer: OptimizerArg::Sgd,
        ..args(2)
    })
    .unwrap();
    let before = std::fs::read(d.join("checkpoint.safetensors")).unwrap();
    for debug in [false, true] {
        let e = train(&TrainArgs {
            checkpoint: Some(d.clone()),
            resume: Some(d.clone()),
            optimizer: OptimizerArg::Sgd,
            lr: Some(1e30),
            debug_nan: debug,
            ..args(50)
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("at step"), "{e}");
        assert!(e.contains("last checkpoint"), "{e}");
        if debug {
            assert!(
                e.contains("first non-finite value") && e.contains(" = "),
                "{e}"
            );
        } else {
            assert!(e.contains("--debug-nan"), "{e}");
        }
    }
    assert_eq!(
        std::fs::read(d.join("checkpoint.safetensors")).unwrap(),
        before
    );
}

#[test]
fn bench_reports_a_median() {
    use cleave_compiler::train::{bench_with, BenchArgs};
    let r = bench_with(
        &BenchArgs {
            model: root().join("examples/mlp-digits.cir"),
            batch: None,
            loss: None,
            labels: None,
            loss_output: None,
            warmup: 2,
            iters: 5,
            json: true,
            optimizer: OptimizerArg::Sgd,
            interp: false,
            no_jit: false,
            codegen: Default::default(),
            grad_method: "bp".into(),
            tangents: 1,
            precision: None,
        },
        Some(3),
    )
    .unwrap();
    assert!(r.median_ms > 0.0 && r.median_ms.is_finite());
    // `--profile 3`: the kinds' times add up to the total, the matmuls are among them (two
    // forward products, one input gradient, the two weight gradients folded into the update),
    // and the three slowest kernels are listed slowest first.
    let p = r.profile.as_ref().expect("profile");
    let kinds = p["by_kind"].as_array().unwrap();
    let sum: f64 = kinds.iter().map(|k| k["ms"].as_f64().unwrap()).sum();
    assert!((sum - p["total_ms"].as_f64().unwrap()).abs() < 1e-9 * sum.max(1.0));
    let count = |kind: &str| {
        kinds
            .iter()
            .find(|k| k["kind"] == kind)
            .map_or(0, |k| k["kernels"].as_u64().unwrap())
    };
    assert_eq!(count("matmul") + count("matmul (update)"), 5, "{p}");
    let slowest: Vec<f64> = p["slowest"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["ms"].as_f64().unwrap())
        .collect();
    assert_eq!(slowest.len(), 3);
    assert!(slowest.windows(2).all(|w| w[0] >= w[1]));
    assert!(r.peak_bytes > 0);
    // MLP 64-128-10 at batch 32: forward 2·32·(64·128 + 128·10) matmul FLOPs, backward the two
    // weight gradients and one input gradient (the data input gets none).
    let fwd = 2 * 32 * (64 * 128 + 128 * 10);
    let bwd = 2 * 32 * (64 * 128 + 128 * 10) + 2 * 32 * 128 * 10;
    assert_eq!(r.matmul_flops, (fwd + bwd) as u64);
    assert!(r.flops > r.matmul_flops);
    assert!((r.gflops() - r.flops as f64 / (r.median_ms * 1e6)).abs() < 1e-9 * r.gflops());
    // Every fused loop of the MLP step is in the JIT's op set.
    assert!(r.fused_kernels > 0);
    assert_eq!(r.jit_kernels, r.fused_kernels);
}
