//! Pipelined training (`--stages P --microbatches M --schedule NAME`) gives the same losses and
//! weights as one-stage training with the same microbatching, bit for bit; a failing stage ends
//! the run with an error naming the stage and the action.

use cleave_runtime::HostData;
use std::time::{Duration, Instant};

mod common;

use cleave_compiler::pipeline_train::train;
use cleave_compiler::train::{OptimizerArg, TrainArgs};
use common::{assert_same, root, SCHEDULES};

fn args(model: &str, data: &str, p: usize, m: usize, schedule: &str, steps: usize) -> TrainArgs {
    TrainArgs {
        model: root().join(model),
        data: root().join(data),
        optimizer: OptimizerArg::Sgd,
        seed: Some(5),
        stages: p,
        microbatches: m,
        schedule: schedule.into(),
        ..common::args(steps)
    }
}

fn check_model(model: &str, data: &str, p: usize) {
    let steps = 20;
    let m = 4;
    let reference = train(&args(model, data, 1, m, "1f1b", steps)).unwrap();
    assert_eq!(reference.losses.len(), steps);
    assert!(
        reference.losses[steps - 1] < reference.losses[0],
        "{model}: training makes progress: {:?}",
        reference.losses
    );
    for s in SCHEDULES {
        let run = train(&args(model, data, p, m, s, steps))
            .unwrap_or_else(|e| panic!("{model} {s} P={p}: {e:#}"));
        assert_same(&format!("{model} {s} P={p} M={m}"), &reference, &run);
    }
}

#[test]
fn mlp_p2_every_schedule_matches_one_stage() {
    check_model(
        "examples/mlp-digits.cir",
        "examples/data/digits.safetensors",
        2,
    );
}

#[test]
fn mlp_p4_every_schedule_matches_one_stage() {
    check_model(
        "examples/mlp-digits.cir",
        "examples/data/digits.safetensors",
        4,
    );
}

#[test]
fn gpt_p2_every_schedule_matches_one_stage() {
    check_model(
        "examples/gpt-tiny.cir",
        "examples/data/modadd.safetensors",
        2,
    );
}

#[test]
fn gpt_p4_every_schedule_matches_one_stage() {
    check_model(
        "examples/gpt-tiny.cir",
        "examples/data/modadd.safetensors",
        4,
    );
}

#[test]
fn zb_h2_with_more_microbatches_matches_one_stage() {
    // m ≥ 2p − 1: ZB-H2's steady state at P = 4.
    let (model, data) = (
        "examples/mlp-digits.cir",
        "examples/data/digits.safetensors",
    );
    let reference = train(&args(model, data, 1, 8, "1f1b", 10)).unwrap();
    let run = train(&args(model, data, 4, 8, "zb-h2", 10)).unwrap();
    assert_same("mlp zb-h2 P=4 M=8", &reference, &run);
}

#[test]
fn injected_stage_failure_names_stage_and_action() {
    let (model, data) = (
        "examples/mlp-digits.cir",
        "examples/data/digits.safetensors",
    );
    for (p, s, action) in [
        (2, "1f1b", "1BW2"),
        (4, "zb-h1", "0F1"),
        (4, "zb-h1", "2B1"),
        (4, "zb-h2", "3W3"),
    ] {
        let mut a = args(model, data, p, 4, s, 3);
        a.fail_action = Some(action.into());
        let t = Instant::now();
        let err = format!("{:#}", train(&a).unwrap_err());
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the failure ends the run promptly"
        );
        let stage = &action[..1];
        assert!(
            err.contains(&format!("stage {stage}"))
                && err.contains(action)
                && err.contains("injected failure")
                && err.contains("step 0"),
            "{err}"
        );
    }
}

#[test]
fn timeline_records_every_action() {
    let (model, data) = (
        "examples/mlp-digits.cir",
        "examples/data/digits.safetensors",
    );
    let path = std::env::temp_dir().join(format!("cleave-timeline-{}.json", std::process::id()));
    let mut a = args(model, data, 2, 4, "zb-h1", 2);
    a.timeline = Some(path.clone());
    train(&a).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let steps = v["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2);
    for st in steps {
        let actions = st["actions"].as_array().unwrap();
        // 2 stages × 4 microbatches × (F, B, W).
        assert_eq!(actions.len(), 24);
        for x in actions {
            assert!(x["end_s"].as_f64().unwrap() >= x["start_s"].as_f64().unwrap());
        }
    }
    // The summary sets the measured bubble rate (one step used: the first is left out) beside
    // the simulator's under the measured costs; both are rates.
    let summary = &v["summary"];
    assert_eq!(summary["steps_used"], 1);
    for key in ["measured_bubble_rate", "simulated_bubble_rate"] {
        let r = summary[key].as_f64().unwrap();
        assert!((0.0..1.0).contains(&r), "{key} = {r}");
    }
    let costs = summary["stage_costs_s"].as_array().unwrap();
    assert_eq!(costs.len(), 2);
    assert!(costs.iter().all(|c| c["f"].as_f64().unwrap() > 0.0));
    let _ = std::fs::remove_file(path);

    // `.svg`: the median step drawn as a picture.
    let svg = std::env::temp_dir().join(format!("cleave-timeline-{}.svg", std::process::id()));
    a.timeline = Some(svg.clone());
    train(&a).unwrap();
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(
        text.starts_with("<svg") && text.contains("measured"),
        "{text:.200}"
    );
    for action in ["0F0", "1B3", "0W3"] {
        assert!(
            text.contains(&format!("<title>{action} [")),
            "{action} is drawn"
        );
    }
    let _ = std::fs::remove_file(svg);
}

#[test]
fn unknown_schedules_and_actions_are_errors() {
    let (model, data) = (
        "examples/mlp-digits.cir",
        "examples/data/digits.safetensors",
    );
    let err = format!(
        "{:#}",
        train(&args(model, data, 2, 4, "nope", 1)).unwrap_err()
    );
    assert!(err.contains("unknown schedule `nope`"), "{err}");
    let mut a = args(model, data, 2, 4, "1f1b", 1);
    a.fail_action = Some("1B2".into());
    let err = format!("{:#}", train(&a).unwrap_err());
    assert!(err.contains("has no such action"), "{err}");
}

/// BitPipe's two directions on the thread pipeline: every stage runs on two devices, each
/// replica accumulates its own microbatches' weight gradients and the two sums are added before
/// the one update, so losses and weights equal one stage's to rounding (the summation order
/// differs); recomputation is refused with a clear error, and so is an odd device count.
#[test]
fn bitpipe_replicas_match_one_stage() {
    for (model, data, p, m) in [
        (
            "examples/gpt-tiny.cir",
            "examples/data/modadd.safetensors",
            2,
            4,
        ),
        (
            "examples/mlp-digits.cir",
            "examples/data/digits.safetensors",
            4,
            8,
        ),
    ] {
        let steps = 5;
        let reference = train(&args(model, data, 1, m, "1f1b", steps)).unwrap();
        let run = train(&args(model, data, p, m, "bitpipe", steps))
            .unwrap_or_else(|e| panic!("{model} bitpipe P={p}: {e:#}"));
        for (a, b) in reference.losses.iter().zip(&run.losses) {
            assert!(
                (a - b).abs() <= 1e-5 * a.abs().max(1.0),
                "{model}: loss {b} vs {a}"
            );
        }
        assert_eq!(
            reference.params.keys().collect::<Vec<_>>(),
            run.params.keys().collect::<Vec<_>>()
        );
        for (name, want) in &reference.params {
            let (HostData::F32(w), HostData::F32(h)) = (want, &run.params[name]) else {
                panic!("{name}: f32 parameters");
            };
            let scale = w.iter().fold(0f32, |x, v| x.max(v.abs())).max(1e-3);
            for (x, y) in w.iter().zip(h) {
                assert!((x - y).abs() <= 1e-5 * scale, "{model} {name}: {y} vs {x}");
            }
        }
        // Every device holds its stages twice over: the accounting counts the replicas.
        assert_eq!(run.planned_devices.len(), p);
    }
    let mut a = args(
        "examples/gpt-tiny.cir",
        "examples/data/modadd.safetensors",
        2,
        4,
        "bitpipe",
        1,
    );
    a.remat = Some("full".into());
    let e = train(&a).unwrap_err().to_string();
    assert!(e.contains("bidirectional"), "{e}");
    a.remat = None;
    a.stages = 3;
    a.microbatches = 6;
    let e = train(&a).unwrap_err().to_string();
    assert!(e.contains("even number of devices"), "{e}");
}

/// The schedules from recent papers (`passes/src/schedule/papers.rs`: V-Min, V-Half, DualPipeV,
/// Hanayo) run on the thread pipeline and give one stage's losses and weights.
#[test]
fn paper_schedules_match_one_stage() {
    // The MLP has 9 compute nodes: too few for hanayo-2's 16 stages at P=4.
    let all = ["v-min", "v-half", "dualpipev", "hanayo", "hanayo-2"];
    for (model, data, p, m, schedules) in [
        (
            "examples/gpt-tiny.cir",
            "examples/data/modadd.safetensors",
            2,
            4,
            &all[..],
        ),
        (
            "examples/mlp-digits.cir",
            "examples/data/digits.safetensors",
            4,
            8,
            &all[..4],
        ),
    ] {
        let steps = 5;
        let reference = train(&args(model, data, 1, m, "1f1b", steps)).unwrap();
        for &s in schedules {
            let run = train(&args(model, data, p, m, s, steps))
                .unwrap_or_else(|e| panic!("{model} {s} P={p}: {e:#}"));
            assert_same(&format!("{model} {s} P={p} M={m}"), &reference, &run);
        }
    }
}

/// Launched by `mpirun` on several ranks without the `mpi` feature, `cleave train` says how to
/// rebuild instead of training the model once per rank.
#[cfg(not(feature = "mpi"))]
#[test]
fn several_mpi_ranks_without_the_feature_say_how_to_rebuild() {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_cleave"))
        .args([
            "train",
            "examples/mlp-digits.cir",
            "--data",
            "examples/data/digits.safetensors",
            "--stages",
            "2",
            "--steps",
            "1",
        ])
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .current_dir(root())
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--features mpi") && err.contains("scripts/install-mpi.sh"),
        "{err}"
    );
}

/// Pipelined runs checkpoint and resume bit for bit: 2 steps, a checkpoint, then a resumed run
/// to step 4 give the uninterrupted run's losses and weights (the checkpoint is the one-stage
/// format: every parameter by name, the step in the metadata).
#[test]
fn pipelined_checkpoint_resumes_bit_for_bit() {
    let (model, data) = ("examples/gpt-tiny.cir", "examples/data/modadd.safetensors");
    let straight = train(&args(model, data, 2, 4, "zb-h1", 4)).unwrap();
    let dir = common::tmp("pipe-ckpt");
    let first = train(&TrainArgs {
        checkpoint: Some(dir.clone()),
        checkpoint_every: 2,
        ..args(model, data, 2, 4, "zb-h1", 2)
    })
    .unwrap();
    assert_eq!(first.losses[..], straight.losses[..2]);
    let resumed = train(&TrainArgs {
        resume: Some(dir.clone()),
        ..args(model, data, 2, 4, "zb-h1", 4)
    })
    .unwrap();
    assert_eq!(resumed.summary.steps_run, 2);
    let tail: Vec<u64> = resumed.losses.iter().map(|x| x.to_bits()).collect();
    let want: Vec<u64> = straight.losses[2..].iter().map(|x| x.to_bits()).collect();
    assert_eq!(tail, want);
    for (name, w) in &straight.params {
        assert!(
            common::bits(&resumed.params[name]) == common::bits(w),
            "{name} differs after resuming"
        );
    }
    // A checkpoint made with another batch is refused by name.
    let e = train(&TrainArgs {
        resume: Some(dir.clone()),
        ..args(model, data, 2, 2, "zb-h1", 4)
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("batch"), "{e}");
    // So is it by the stage pipeline (`--executor list`, `--target cuda --stages`), and one
    // made with another optimizer by both.
    let stages = |a: &TrainArgs| {
        cleave_compiler::gpu_pipeline::train_stages_on(a, "cpu", None, |f, _| {
            cleave_compiler::gpu_pipeline::CpuPlanBackend::new(f, a.codegen)
        })
        .map(|_| ())
        .unwrap_err()
        .to_string()
    };
    let other_batch = TrainArgs {
        resume: Some(dir.clone()),
        ..args(model, data, 2, 2, "zb-h1", 4)
    };
    let e = stages(&other_batch);
    assert!(e.contains("written with batch"), "{e}");
    let other_optimizer = TrainArgs {
        resume: Some(dir.clone()),
        optimizer: OptimizerArg::Adamw,
        ..args(model, data, 2, 4, "zb-h1", 4)
    };
    let e = stages(&other_optimizer);
    assert!(e.contains("written with optimizer sgd"), "{e}");
    let e = train(&other_optimizer).unwrap_err().to_string();
    assert!(e.contains("written with optimizer sgd"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
