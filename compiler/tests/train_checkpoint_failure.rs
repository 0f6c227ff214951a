//! `cleave train`: a failure injected while a checkpoint is written (`CLEAVE_FAIL_CHECKPOINT_WRITE`)
//! leaves the previous checkpoint intact and loadable. One test per process: the variable is
//! process-wide.

use std::path::{Path, PathBuf};

use cleave_compiler::train::{read_checkpoint, train, OptimizerArg, TrainArgs};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cleave-train-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn args(steps: usize) -> TrainArgs {
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
    }
}

#[test]
fn failed_checkpoint_write_keeps_the_previous_one() {
    let d = tmp("fail");
    train(&TrainArgs {
        checkpoint: Some(d.clone()),
        ..args(5)
    })
    .unwrap();
    let before = std::fs::read(d.join("checkpoint.safetensors")).unwrap();
    // The variable is read only by the checkpoint writer; this file is its own test binary (its
    // own process) with this one test, so no other training run sees it.
    std::env::set_var("CLEAVE_FAIL_CHECKPOINT_WRITE", "1");
    let e = train(&TrainArgs {
        checkpoint: Some(d.clone()),
        resume: Some(d.clone()),
        ..args(10)
    });
    std::env::remove_var("CLEAVE_FAIL_CHECKPOINT_WRITE");
    let e = e.unwrap_err().to_string();
    assert!(e.contains("injected failure"), "{e}");
    assert_eq!(
        std::fs::read(d.join("checkpoint.safetensors")).unwrap(),
        before
    );
    let (_, meta) = read_checkpoint(&d).unwrap();
    assert_eq!(meta["step"], "5");
}
