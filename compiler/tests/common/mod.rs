//! Helpers shared by the `cleave train` tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use cleave_compiler::train::{OptimizerArg, TrainArgs};
use cleave_ir::Tensor;

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A fresh temporary directory for one test.
pub fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cleave-train-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Quiet AdamW training of the digits MLP for `steps` steps, seed 3, no checkpoints.
pub fn args(steps: usize) -> TrainArgs {
    TrainArgs {
        model: root().join("examples/mlp-digits.cir"),
        data: root().join("examples/data/digits.safetensors"),
        steps,
        batch: None,
        loss: None,
        labels: None,
        optimizer: OptimizerArg::Adamw,
        lr: None,
        seed: Some(3),
        eval_every: None,
        checkpoint: None,
        checkpoint_every: 100,
        resume: None,
        metrics: None,
        debug_nan: false,
        quiet: true,
        stages: 1,
        microbatches: 1,
        schedule: "1f1b".into(),
        timeline: None,
        fail_action: None,
        remat: None,
        memory_limit: None,
        grad_method: "bp".into(),
        tangents: 1,
    }
}

/// `max |a - b| / max |b|`: the error relative to the reference's magnitude.
pub fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.shape, want.shape, "shapes differ");
    let (g, w) = (got.to_f64_vec(), want.to_f64_vec());
    let scale = w.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-30);
    g.iter()
        .zip(&w)
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()))
        / scale
}
