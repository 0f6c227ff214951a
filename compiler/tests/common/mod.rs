//! Helpers shared by the `cleave train` tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use cleave_compiler::train::{OptimizerArg, TrainArgs};

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
        grad_method: "bp".into(),
        tangents: 1,
    }
}
