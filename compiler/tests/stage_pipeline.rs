//! The single-device stage pipeline (`compiler/src/gpu_pipeline.rs`, what `--target cuda
//! --stages P` runs) without a GPU: on backends that run each stage function with the CPU
//! runtime it gives the thread pipeline's losses and weights bit for bit; with the `mlir`
//! feature, on MLIR's CPU lowering of the kernels the GPU compiles, within 1e-4.

mod common;

use cleave_compiler::gpu_pipeline::{train_stages_on, CpuPlanBackend, StageRun};
use cleave_compiler::pipeline_train;
use cleave_compiler::train::{OptimizerArg, TrainArgs};

fn same(what: &str, want: &pipeline_train::PipelineRun, have: &StageRun) {
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(&have.losses),
        bits(&want.losses),
        "{what}: {:?} vs {:?}",
        have.losses,
        want.losses
    );
    assert_eq!(
        have.params.keys().collect::<Vec<_>>(),
        want.params.keys().collect::<Vec<_>>()
    );
    for (k, w) in &want.params {
        assert!(
            common::bits(&have.params[k]) == common::bits(w),
            "{what}: `{k}` differs"
        );
    }
}

/// The executor's order, routing, accumulation and update: the thread pipeline's results bit
/// for bit, for one-direction and V schedules, SGD and AdamW, backprop and DFA.
#[test]
fn stages_on_one_device_match_the_thread_pipeline() {
    for (stages, schedule, optimizer, method) in [
        (2, "1f1b", OptimizerArg::Sgd, "bp"),
        (2, "zb-h1", OptimizerArg::Adamw, "bp"),
        (2, "zb-v", OptimizerArg::Sgd, "bp"),
        (3, "zb-h2", OptimizerArg::Sgd, "dfa"),
        (1, "1f1b", OptimizerArg::Momentum, "bp"),
    ] {
        let a = TrainArgs {
            optimizer,
            grad_method: method.into(),
            ..common::gpt_tiny(stages, schedule, 3)
        };
        let what = format!("{stages} stages {schedule} {optimizer:?} {method}");
        let want = pipeline_train::train(&a).unwrap_or_else(|e| panic!("{what}: {e:#}"));
        let have = train_stages_on(&a, "test", None, |f, _| {
            CpuPlanBackend::new(f, Default::default())
        })
        .unwrap_or_else(|e| panic!("{what}: {e:#}"));
        same(&what, &want, &have);
        assert_eq!(have.summary.accuracy, want.summary.accuracy, "{what}");
    }
}

/// What the single-device pipeline does not run is refused by name.
#[test]
fn unsupported_options_are_named() {
    let a = TrainArgs {
        remat: Some("full".into()),
        ..common::gpt_tiny(2, "1f1b", 1)
    };
    let e = train_stages_on(&a, "cuda", None, |f, _| {
        CpuPlanBackend::new(f, Default::default())
    })
    .err()
    .unwrap();
    assert!(
        format!("{e:#}").contains("--remat is not supported"),
        "{e:#}"
    );
}

/// The kernels the GPU path compiles, through MLIR's CPU lowering, in the stage pipeline: the
/// CPU pipeline's losses within 1e-4.
#[cfg(feature = "mlir")]
#[test]
fn mlir_stages_match_the_cpu_pipeline() {
    use cleave_compiler::gpu_train::MlirCpuBackend;
    let a = common::gpt_tiny(2, "zb-h1", 3);
    let want = pipeline_train::train(&a).unwrap();
    let have = train_stages_on(&a, "mlir-cpu", None, |f, _| MlirCpuBackend::new(f)).unwrap();
    assert_eq!(have.losses.len(), 3);
    for (g, w) in have.losses.iter().zip(&want.losses) {
        assert!(((g - w) / w).abs() <= 1e-4, "{g} vs {w}");
    }
}

/// The `loss_scale` and `skipped` keys of each step's metrics line.
fn scale_lines(path: &std::path::Path) -> Vec<(f64, bool)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("loss_scale").is_some())
        .map(|v| (v["loss_scale"].as_f64().unwrap(), v["skipped"] == true))
        .collect()
}

/// `--precision f16` on the stage pipeline (what `--target cuda --precision f16` runs): the
/// loss scale fed to every microbatch, the scaled gradient sums, the rolled-back steps and the
/// scale's halving and doubling are the CPU pipeline's, bit for bit, with the stages' SGD and
/// with AdamW (whose updater divides the scale out); a checkpoint carries the scale.
#[test]
fn f16_loss_scaling_matches_the_thread_pipeline() {
    let dir = common::tmp("stage-f16");
    for (i, (optimizer, scale, window)) in [
        (OptimizerArg::Sgd, (1u64 << 19) as f64, 2),
        (OptimizerArg::Adamw, 65536.0, 2000),
    ]
    .into_iter()
    .enumerate()
    {
        let what = format!("f16 {optimizer:?} scale {scale}");
        let (cpu, list) = (
            dir.join(format!("cpu{i}.jsonl")),
            dir.join(format!("list{i}.jsonl")),
        );
        let mut a = TrainArgs {
            optimizer,
            precision: Some("f16".into()),
            loss_scale: scale,
            loss_scale_window: window,
            metrics: Some(cpu.clone()),
            checkpoint: Some(dir.join(format!("ckpt{i}"))),
            ..common::gpt_tiny(2, "zb-h1", 8)
        };
        let want = pipeline_train::train(&a).unwrap_or_else(|e| panic!("{what}: {e:#}"));
        a.metrics = Some(list.clone());
        // The stage pipeline writes its own checkpoint (with the scale) after step 8.
        a.checkpoint = Some(dir.join(format!("list-ckpt{i}")));
        let have = train_stages_on(&a, "test", None, |f, _| {
            CpuPlanBackend::new(f, Default::default())
        })
        .unwrap_or_else(|e| panic!("{what}: {e:#}"));
        same(&what, &want, &have);
        let (w, h) = (scale_lines(&cpu), scale_lines(&list));
        assert_eq!(h.len(), 8, "{what}: {h:?}");
        assert_eq!(h, w, "{what}");
        if i == 0 {
            // 2¹⁹ overflows f16 in the backward: the first steps are rolled back, the scale
            // halves until one is finite, and doubles after two finite steps in a row.
            assert!(h[0].1 && h.iter().any(|x| !x.1), "{what}: {h:?}");
            assert!(
                h.windows(2).any(|p| !p[0].1 && p[1].0 == 2.0 * p[0].0),
                "{h:?}"
            );
            // Resumed from its checkpoint after step 8, the stage pipeline's steps 9 and 10 are
            // the uninterrupted CPU pipeline's: the checkpoint carries the scale and
            // its count of finite steps.
            let ten = TrainArgs {
                steps: 10,
                checkpoint: None,
                metrics: Some(dir.join("ten.jsonl")),
                ..a.clone()
            };
            let want = pipeline_train::train(&ten).unwrap();
            let resumed = TrainArgs {
                resume: Some(dir.join("list-ckpt0")),
                metrics: Some(dir.join("resumed.jsonl")),
                ..ten
            };
            let have = train_stages_on(&resumed, "test", None, |f, _| {
                CpuPlanBackend::new(f, Default::default())
            })
            .unwrap();
            assert!(
                have.params == want.params,
                "{what}: resumed, the weights differ"
            );
            assert_eq!(
                scale_lines(&dir.join("resumed.jsonl")),
                scale_lines(&dir.join("ten.jsonl"))[8..],
                "{what}: resumed"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--precision f16` on MLIR's CPU lowering of the GPU kernels (f16 GEMMs accumulated in f32)
/// in the stage pipeline: the CPU pipeline's losses within 1e-5 (8e-7 measured over 6 steps)
/// and its loss-scale decisions.
#[cfg(feature = "mlir")]
#[test]
fn mlir_stages_train_in_f16_like_the_cpu_pipeline() {
    use cleave_compiler::gpu_train::MlirCpuBackend;
    let dir = common::tmp("stage-f16-mlir");
    let a = TrainArgs {
        precision: Some("f16".into()),
        loss_scale: (1u64 << 24) as f64,
        loss_scale_window: 2,
        metrics: Some(dir.join("cpu.jsonl")),
        ..common::gpt_tiny(2, "zb-h1", 6)
    };
    let want = pipeline_train::train(&a).unwrap();
    let b = TrainArgs {
        metrics: Some(dir.join("mlir.jsonl")),
        ..a.clone()
    };
    let have = train_stages_on(&b, "mlir-cpu", None, |f, _| MlirCpuBackend::new(f)).unwrap();
    for (g, w) in have.losses.iter().zip(&want.losses) {
        assert!(
            ((g - w) / w).abs() <= 1e-5,
            "{:?} vs {:?}",
            have.losses,
            want.losses
        );
    }
    let (w, h) = (
        scale_lines(&dir.join("cpu.jsonl")),
        scale_lines(&dir.join("mlir.jsonl")),
    );
    assert_eq!(h, w);
    assert!(h[0].1, "2^24 overflows f16: {h:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
