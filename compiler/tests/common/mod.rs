//! Helpers shared by the `cleave train` tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use cleave_compiler::pipeline_train::PipelineRun;
use cleave_compiler::train::{OptimizerArg, TrainArgs};
use cleave_ir::Tensor;
use cleave_runtime::HostData;

/// Every schedule the pipeline driver supports (interleaved and zb-v place two stages per
/// device).
pub const SCHEDULES: [&str; 7] = [
    "gpipe",
    "1f1b",
    "zb-h1",
    "zb-h2",
    "auto",
    "interleaved",
    "zb-v",
];

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

/// Quiet SGD training of GPT-tiny on the modular-addition data, seed 1, over `stages` stages
/// with 4 microbatches a step under `schedule`, for `steps` steps.
pub fn gpt_tiny(stages: usize, schedule: &str, steps: usize) -> TrainArgs {
    TrainArgs {
        model: root().join("examples/gpt-tiny.cir"),
        data: root().join("examples/data/modadd.safetensors"),
        optimizer: OptimizerArg::Sgd,
        seed: Some(1),
        stages,
        microbatches: 4,
        schedule: schedule.into(),
        ..args(steps)
    }
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
        loss_output: None,
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
        codegen: Default::default(),
        stages: 1,
        microbatches: 1,
        schedule: "1f1b".into(),
        timeline: None,
        fail_action: None,
        kill_action: None,
        chunk_lm_head: None,
        executor: Default::default(),
        grad_clip: None,
        remat: None,
        memory_limit: None,
        grad_method: "bp".into(),
        tangents: 1,
        compress: None,
        precision: None,
        loss_scale: 65536.0,
        loss_scale_window: 2000,
        memory_report: false,
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

/// The bit patterns of a host buffer.
pub fn bits(d: &HostData) -> Vec<u32> {
    match d {
        HostData::F32(v) => v.iter().map(|x| x.to_bits()).collect(),
        HostData::I32(v) => v.iter().map(|&x| x as u32).collect(),
        HostData::Bool(v) => v.iter().map(|&x| x as u32).collect(),
        HostData::BF16(v) | HostData::F16(v) => v.iter().map(|&x| x as u32).collect(),
        HostData::I8(v) => v.iter().map(|&x| x as u8 as u32).collect(),
    }
}

/// The smallest feasible limit an infeasible `--memory-limit` run's error names.
pub fn smallest_feasible(e: &anyhow::Error) -> u64 {
    let e = format!("{e:#}");
    e.rsplit(cleave_passes::remat::SMALLEST_FEASIBLE)
        .next()
        .filter(|_| e.contains(cleave_passes::remat::SMALLEST_FEASIBLE))
        .and_then(|t| t.split_whitespace().next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no smallest feasible limit in: {e}"))
}

/// Two pipelined runs have bit-identical losses and final parameters.
pub fn assert_same(what: &str, want: &PipelineRun, have: &PipelineRun) {
    let lw: Vec<u64> = want.losses.iter().map(|x| x.to_bits()).collect();
    let lh: Vec<u64> = have.losses.iter().map(|x| x.to_bits()).collect();
    assert_eq!(
        lh, lw,
        "{what}: losses differ: {:?} vs {:?}",
        have.losses, want.losses
    );
    assert_eq!(
        want.params.keys().collect::<Vec<_>>(),
        have.params.keys().collect::<Vec<_>>(),
        "{what}"
    );
    for (name, w) in &want.params {
        assert!(
            bits(&have.params[name]) == bits(w),
            "{what}: parameter {name} differs"
        );
    }
}

/// The numeric rows of a `--memory-report` table in `stderr` (one per device, every column that
/// parses as a number).
pub fn memory_report_rows(stderr: &str) -> Vec<Vec<u64>> {
    stderr
        .lines()
        .skip_while(|l| !l.starts_with("device "))
        .skip(1)
        .take_while(|l| l.starts_with(|c: char| c.is_ascii_digit()))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect()
        })
        .collect()
}
