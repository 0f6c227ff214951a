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
