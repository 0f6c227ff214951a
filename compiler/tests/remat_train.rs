//! `cleave train --remat POLICY --memory-limit BYTES`: recomputation and offload change neither
//! the losses nor the weights (bit for bit, one stage and pipelined), and every device's peak
//! memory measured by the instrumented allocator stays within the limit for every schedule.

mod common;

// The counting allocator is cleave-runner's global allocator, so this test binary has it too.

use cleave_compiler::pipeline_train::{train, PipelineRun};
use cleave_compiler::train::{OptimizerArg, TrainArgs};
use cleave_passes::remat::Choice;
use common::{assert_same, root, SCHEDULES};

const MLP: (&str, &str) = (
    "examples/mlp-digits.cir",
    "examples/data/digits.safetensors",
);
const GPT: (&str, &str) = ("examples/gpt-tiny.cir", "examples/data/modadd.safetensors");

#[allow(clippy::too_many_arguments)]
fn args(
    (model, data): (&str, &str),
    p: usize,
    m: usize,
    schedule: &str,
    steps: usize,
    remat: Option<&str>,
    limit: Option<u64>,
) -> TrainArgs {
    TrainArgs {
        model: root().join(model),
        data: root().join(data),
        optimizer: OptimizerArg::Sgd,
        seed: Some(5),
        stages: p,
        microbatches: m,
        schedule: schedule.into(),
        remat: remat.map(String::from),
        memory_limit: limit.map(|l| l.to_string()),
        ..common::args(steps)
    }
}

fn count(run: &PipelineRun, c: Choice) -> usize {
    run.memory
        .iter()
        .flat_map(|s| &s.values)
        .filter(|v| v.2 == c)
        .count()
}

#[test]
fn policies_are_bit_identical_one_stage_and_pipelined() {
    for model in [MLP, GPT] {
        for p in [1, 2] {
            let m = 2;
            let base = train(&args(model, p, m, "1f1b", 4, None, None)).unwrap();
            for policy in ["none", "full", "selective", "offload-all"] {
                let run = train(&args(model, p, m, "1f1b", 4, Some(policy), None))
                    .unwrap_or_else(|e| panic!("{} {policy} P={p}: {e:#}", model.0));
                assert_same(&format!("{} {policy} P={p}", model.0), &base, &run);
                match policy {
                    "full" => assert!(count(&run, Choice::Recompute) > 0),
                    // The recomputed attention context goes from B to W where B recomputes
                    // the attention core (not in a first stage: its B reads nothing).
                    "selective" if model == GPT && p == 2 => {
                        assert!(count(&run, Choice::Handoff) > 0)
                    }
                    "offload-all" => {
                        assert!(count(&run, Choice::Offload) > 0);
                        assert!(run.offloaded_bytes.iter().all(|&b| b > 0));
                    }
                    _ => {}
                }
            }
        }
    }
}

/// The smallest feasible limit the error names.
fn smallest_limit(model: (&str, &str), p: usize, m: usize, s: &str) -> u64 {
    let Err(e) = train(&args(model, p, m, s, 1, Some("auto"), Some(1))) else {
        panic!("a one-byte limit is infeasible");
    };
    common::smallest_feasible(&e)
}

/// Trains with `auto` under `limit` and checks the allocator-measured peak of every device, and
/// the plan's own accounting, against it; losses and weights equal `base`'s.
fn check_within(model: (&str, &str), p: usize, s: &str, limit: u64, base: &PipelineRun) {
    let run = train(&args(model, p, 4, s, 1, Some("auto"), Some(limit)))
        .unwrap_or_else(|e| panic!("{} P={p} {s} limit {limit}: {e:#}", model.0));
    assert_eq!(run.measured_peak_bytes.len(), run.planned_devices.len());
    for (d, (&peak, plan)) in run
        .measured_peak_bytes
        .iter()
        .zip(&run.planned_devices)
        .enumerate()
    {
        eprintln!(
            "{} P={p} {s}: device {d}: limit {limit}, planned {}, measured {peak}",
            model.0,
            plan.total()
        );
        assert!(peak > 0, "{} P={p} {s}: nothing measured", model.0);
        assert!(
            plan.total() <= limit,
            "{} P={p} {s} device {d}: planned {} over the limit {limit}",
            model.0,
            plan.total()
        );
        assert!(
            peak <= limit,
            "{} P={p} {s} device {d}: allocator-measured peak {peak} over the limit {limit} \
             (planned {})",
            model.0,
            plan.total()
        );
    }
    assert_same(&format!("{} P={p} {s} auto", model.0), base, &run);
}

/// The `none` need of the worst device (the plan's whole accounting).
fn none_need(run: &PipelineRun) -> u64 {
    run.planned_devices.iter().map(|d| d.total()).max().unwrap()
}

#[test]
fn allocator_measured_peak_stays_within_the_limit_for_every_schedule() {
    for model in [MLP, GPT] {
        for (p, schedules) in [(2, &SCHEDULES[..]), (1, &["1f1b", "interleaved"][..])] {
            for &s in schedules {
                let base = train(&args(model, p, 4, s, 1, Some("none"), None)).unwrap();
                let none = none_need(&base);
                // The measured peak without a limit is within the accounting too.
                for (&x, d) in base.measured_peak_bytes.iter().zip(&base.planned_devices) {
                    assert!(x <= d.total(), "{} P={p} {s}: {x} > {}", model.0, d.total());
                }
                let smallest = smallest_limit(model, p, 4, s);
                assert!(
                    smallest <= none,
                    "{} P={p} {s}: {smallest} > {none}",
                    model.0
                );
                // The smallest feasible limit the error names is feasible, and so is a
                // fraction of the `none` need between it and the `none` need.
                check_within(model, p, s, smallest, &base);
                let limit = smallest + (none - smallest) * 2 / 5;
                check_within(model, p, s, limit, &base);
            }
        }
    }
}

#[test]
fn a_named_policy_gets_its_own_smallest_feasible_limit() {
    // The limit named for `selective` is the one `selective` needs (not `auto`'s smaller one):
    // it trains, and one byte less does not.
    let run = |limit| train(&args(GPT, 2, 4, "1f1b", 1, Some("selective"), Some(limit)));
    let Err(e) = run(1) else {
        panic!("a one-byte limit is infeasible");
    };
    let e = e.to_string();
    let named = cleave_passes::remat::named_smallest(&e).unwrap_or_else(|| panic!("{e}"));
    assert!(named > smallest_limit(GPT, 2, 4, "1f1b"), "{e}");
    run(named).unwrap_or_else(|e| panic!("selective at its named limit {named}: {e:#}"));
    assert!(run(named - 1).is_err());
}

#[test]
fn an_infeasible_limit_names_the_smallest_feasible_one() {
    let Err(e) = train(&args(MLP, 2, 4, "1f1b", 1, None, Some(16))) else {
        panic!("a 16-byte limit is infeasible");
    };
    let e = e.to_string();
    assert!(e.contains("smallest feasible limit is"), "{e}");
    assert!(e.contains("device "), "{e}");
}

#[test]
fn joint_choice_fits_the_one_f_one_b_peak() {
    use cleave_compiler::memory::{joint, plan_for, split_module};
    use cleave_compiler::pipeline_train::build_schedule;
    use cleave_passes::partition::DeviceProfile;
    use cleave_passes::remat::Policy;
    let module = cleave_compiler::load::load_module(
        &root().join(GPT.0),
        &cleave_compiler::load::LoadOptions::default(),
    )
    .unwrap();
    let forward = module.functions[0].clone();
    let profile = DeviceProfile::load("cpu-epyc-2core").unwrap();
    let (p, m) = (2, 4);
    let base = split_module(&forward, p, "cpu-epyc-2core").unwrap();
    let one_f_one_b = build_schedule("1f1b", p, m).unwrap();
    let none = plan_for(
        &forward,
        &base,
        one_f_one_b,
        "1f1b",
        Policy::None,
        None,
        &profile,
        &mut cleave_passes::remat::PlanCache::default(),
    )
    .unwrap();
    let limit = none
        .sim
        .devices
        .iter()
        .map(|d| d.peak_memory)
        .fold(0.0, f64::max) as u64;
    let (best, tried) = joint(&forward, &base, p, m, limit, &profile).unwrap();
    assert!(tried.len() >= 2, "{tried:?}");
    for d in &best.sim.devices {
        assert!(
            d.peak_memory <= limit as f64,
            "{} over {limit}",
            d.peak_memory
        );
    }
    // Never worse than 1F1B without recomputation, which fits by construction.
    assert!(best.sim.makespan <= none.sim.makespan + 1e-12);
    let json = best.to_json(Policy::Auto, Some(limit));
    for key in [
        "saved_bytes",
        "values",
        "recomputed_flops",
        "offloaded_bytes",
        "transfer_s",
        "peak_bytes",
    ] {
        assert!(json["stages"][0].get(key).is_some(), "{key}");
    }
}

fn cleave(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_cleave"))
        .args(args)
        .current_dir(root())
        .output()
        .unwrap()
}

#[test]
fn inspect_memory_json_svg_and_errors() {
    let svg = std::env::temp_dir().join(format!("cleave-remat-{}.svg", std::process::id()));
    let o = cleave(&[
        "inspect",
        GPT.0,
        "--memory",
        "--stages",
        "2",
        "--microbatches",
        "4",
        "--schedule",
        "zb-h1",
        "--remat",
        "selective",
        "--json",
        "--svg",
        svg.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["policy"], "selective");
    assert_eq!(v["stages"].as_array().unwrap().len(), 2);
    assert!(v["stages"][0]["recomputed_flops"].as_u64().unwrap() > 0);
    assert!(v["peak_bytes"][0].as_f64().unwrap() > 0.0);
    let picture = std::fs::read_to_string(&svg).unwrap();
    assert!(picture.starts_with("<svg"));
    let _ = std::fs::remove_file(&svg);

    let o = cleave(&["inspect", GPT.0, "--memory", "--remat", "most"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("valid policies: none, full, selective, offload-all, auto"),
        "{err}"
    );
    let o = cleave(&["inspect", GPT.0, "--memory", "--memory-limit", "12Q"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--memory-limit") && err.contains("12Q"),
        "{err}"
    );
}

/// `inspect --memory` with the planner's cut and family options: `--balance best` plans both
/// cuts, `--vocab-parallel` spreads the output layer, `--v-family` adds the V schedules; the
/// joint plan is never longer than with the default options, and the options that need the
/// joint search say so.
#[test]
fn inspect_memory_balance_vocab_and_v_family() {
    let base = [
        "inspect",
        GPT.0,
        "--memory",
        "--stages",
        "2",
        "--microbatches",
        "4",
        "--schedule",
        "auto",
        "--memory-limit",
        "1590272",
        "--profile",
        "h100-sxm",
        "--json",
    ];
    let run = |extra: &[&str]| -> serde_json::Value {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        let o = cleave(&args);
        assert!(
            o.status.success(),
            "{extra:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let plain = run(&[])["makespan_s"].as_f64().unwrap();
    let best = run(&["--balance", "best", "--v-family"]);
    assert!(best["makespan_s"].as_f64().unwrap() <= plain * (1.0 + 1e-12));
    let vocab = run(&["--balance", "split", "--vocab-parallel"]);
    assert_eq!(vocab["stages"].as_array().unwrap().len(), 2);

    let o = cleave(&[
        "inspect",
        GPT.0,
        "--memory",
        "--stages",
        "2",
        "--balance",
        "best",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--balance best") && err.contains("--schedule auto"),
        "{err}"
    );
    let o = cleave(&["inspect", GPT.0, "--memory", "--v-family"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--v-family"), "{err}");
    let o = cleave(&["inspect", GPT.0, "--memory", "--balance", "flops"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("`estimate` or `split`"), "{err}");
}

/// `--schedule auto --memory-limit` trains the joint planner's plan (schedule and recomputation
/// chosen together): its smallest feasible limit is no larger than that of any schedule the
/// search starts from (1F1B, ZB-H1, ZB-H2, each with its own recomputation plan), and at that
/// limit it trains with the losses and weights of 1F1B without recomputation.
#[test]
fn auto_with_a_limit_trains_the_joint_plan() {
    let (p, m) = (2, 4);
    let joint = smallest_limit(GPT, p, m, "auto");
    for s in ["1f1b", "zb-h1", "zb-h2"] {
        let fixed = smallest_limit(GPT, p, m, s);
        assert!(joint <= fixed, "auto {joint} > {s} {fixed}");
    }
    let base = train(&args(GPT, p, m, "1f1b", 1, Some("none"), None)).unwrap();
    let run = train(&args(GPT, p, m, "auto", 1, None, Some(joint))).unwrap();
    let planned = run.planned.as_ref().expect("the joint plan");
    assert_eq!(planned.schedule.p(), p);
    assert!(planned.sim.makespan > 0.0);
    for (d, x) in run.planned_devices.iter().enumerate() {
        assert!(x.total() <= joint, "device {d}: {} > {joint}", x.total());
    }
    assert_same("GPT P=2 joint", &base, &run);
    // A named schedule does not run the joint search.
    let fixed = train(&args(GPT, p, m, "1f1b", 1, None, Some(joint * 2))).unwrap();
    assert!(fixed.planned.is_none());
}
