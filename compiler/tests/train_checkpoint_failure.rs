//! `cleave train`: a failure injected while a checkpoint is written (`CLEAVE_FAIL_CHECKPOINT_WRITE`)
//! leaves the previous checkpoint intact and loadable. One test per process: the variable is
//! process-wide.

mod common;

use cleave_compiler::train::{read_checkpoint, train, TrainArgs};
use common::{args, tmp};

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
