//! `--grad-clip NORM` with post-update validation: stages step their optimizer without waiting
//! for the global norm, and a step above the limit is redone from the previous weights with
//! the clipped gradient. The result does not depend on the stage count or schedule, a limit
//! that is never reached changes nothing, and every step's norm goes to the metrics. Momentum
//! and AdamW run on the pipeline too (clipped or not).

mod common;

use cleave_compiler::pipeline_train::{train, PipelineRun};
use cleave_compiler::train::{OptimizerArg, TrainArgs};
use common::assert_same;

fn run(
    stages: usize,
    schedule: &str,
    clip: Option<f64>,
    metrics: Option<&std::path::Path>,
) -> PipelineRun {
    train(&TrainArgs {
        grad_clip: clip,
        metrics: metrics.map(|p| p.to_path_buf()),
        ..common::gpt_tiny(stages, schedule, 4)
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

/// Momentum and AdamW on the pipeline: the stages accumulate and one compiled update (the
/// `optimizer` pass's IR) runs after the step, so every stage count and schedule gives the same
/// losses and weights bit for bit, with or without clipping; the result follows the one-stage
/// compiled step within float tolerance; and a checkpoint (with the optimizer's state) resumes
/// bit for bit.
#[test]
fn momentum_and_adamw_run_on_the_pipeline() {
    let run_with = |opt: OptimizerArg,
                    stages: usize,
                    m: usize,
                    schedule: &str,
                    clip: Option<f64>,
                    steps: usize,
                    ckpt: Option<&std::path::Path>,
                    resume: Option<&std::path::Path>| {
        train(&TrainArgs {
            optimizer: opt,
            microbatches: m,
            grad_clip: clip,
            checkpoint: ckpt.map(|p| p.to_path_buf()),
            checkpoint_every: 2,
            resume: resume.map(|p| p.to_path_buf()),
            ..common::gpt_tiny(stages, schedule, steps)
        })
        .unwrap_or_else(|e| panic!("{opt:?} {stages} {schedule}: {e:#}"))
    };
    for opt in [OptimizerArg::Momentum, OptimizerArg::Adamw] {
        for clip in [None, Some(0.05)] {
            let one = run_with(opt, 1, 4, "1f1b", clip, 4, None, None);
            for schedule in ["zb-h1", "zb-v"] {
                assert_same(
                    &format!("{opt:?} {clip:?} {schedule}"),
                    &one,
                    &run_with(opt, 2, 4, schedule, clip, 4, None, None),
                );
            }
        }
    }
    // Against the one-stage step (its optimizer compiled into the step), one microbatch a step.
    let dir = common::tmp("pipeline-adamw");
    let metrics = dir.join("one.jsonl");
    cleave_compiler::train::train(&TrainArgs {
        optimizer: OptimizerArg::Adamw,
        microbatches: 1,
        metrics: Some(metrics.clone()),
        ..common::gpt_tiny(1, "1f1b", 4)
    })
    .unwrap();
    let want: Vec<f64> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64())
        .collect();
    let have = run_with(OptimizerArg::Adamw, 2, 1, "1f1b", None, 4, None, None).losses;
    assert_eq!(want.len(), 4);
    for (a, b) in want.iter().zip(&have) {
        assert!((a - b).abs() <= 1e-5 * a.abs(), "{want:?} vs {have:?}");
    }
    // Checkpoint after 2 steps, resume to 4: the straight run's last two steps, bit for bit.
    let ck = dir.join("ck");
    let straight = run_with(OptimizerArg::Adamw, 2, 4, "zb-h1", None, 4, None, None);
    run_with(OptimizerArg::Adamw, 2, 4, "zb-h1", None, 2, Some(&ck), None);
    let (tensors, _) = cleave_compiler::train::read_checkpoint(&ck).unwrap();
    assert!(tensors.contains_key("opt.step") && tensors.keys().any(|k| k.starts_with("opt.m.")));
    let resumed = run_with(OptimizerArg::Adamw, 2, 4, "zb-h1", None, 4, None, Some(&ck));
    assert_eq!(resumed.losses[..], straight.losses[2..]);
    for (name, w) in &straight.params {
        assert!(
            common::bits(&resumed.params[name]) == common::bits(w),
            "{name} after resuming"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
