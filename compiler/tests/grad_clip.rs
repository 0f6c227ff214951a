//! `--grad-clip NORM` with post-update validation: stages step their optimizer without waiting
//! for the global norm, and a step above the limit is redone from the previous weights with
//! the clipped gradient. The result does not depend on the stage count or schedule, a limit
//! that is never reached changes nothing, and every step's norm goes to the metrics.

mod common;

use cleave_compiler::pipeline_train::{train, PipelineRun};
use cleave_compiler::train::{OptimizerArg, TrainArgs};
use common::{assert_same, root};

fn run(
    stages: usize,
    schedule: &str,
    clip: Option<f64>,
    metrics: Option<&std::path::Path>,
) -> PipelineRun {
    train(&TrainArgs {
        model: root().join("examples/gpt-tiny.cir"),
        data: root().join("examples/data/modadd.safetensors"),
        optimizer: OptimizerArg::Sgd,
        seed: Some(1),
        stages,
        microbatches: 4,
        schedule: schedule.into(),
        grad_clip: clip,
        metrics: metrics.map(|p| p.to_path_buf()),
        ..common::args(4)
    })
    .unwrap_or_else(|e| panic!("{stages} {schedule} {clip:?}: {e:#}"))
}

#[test]
fn clipping_is_exact_across_stage_counts_and_reported() {
    let dir = common::tmp("grad-clip");
    let metrics = dir.join("m.jsonl");
    let one = run(1, "1f1b", Some(0.05), Some(&metrics));
    let norms: Vec<f64> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["grad_norm"].as_f64())
        .collect();
    assert_eq!(norms.len(), 4);
    assert!(
        norms.iter().all(|&n| n > 0.05),
        "the limit binds: {norms:?}"
    );
    for schedule in ["1f1b", "zb-h1", "zb-v"] {
        assert_same(
            &format!("clipped, 2 stages {schedule}"),
            &one,
            &run(2, schedule, Some(0.05), None),
        );
    }
    // Clipping changed the run; a limit above every norm changes nothing.
    let plain = run(2, "zb-h1", None, None);
    assert_ne!(plain.losses[1..], one.losses[1..]);
    assert_same(
        "an unreached limit",
        &plain,
        &run(2, "zb-h1", Some(1e9), None),
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn grad_clip_needs_sgd() {
    let e = cleave_compiler::train::train(&TrainArgs {
        grad_clip: Some(1.0),
        ..common::args(2)
    })
    .unwrap_err();
    assert!(
        format!("{e:#}").contains("--grad-clip) supports --optimizer sgd only"),
        "{e:#}"
    );
}
