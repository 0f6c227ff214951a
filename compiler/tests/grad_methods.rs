//! `--grad-method` end to end: every method trains the digits MLP and writes `loss` metrics,
//! FA resumes bit for bit (its random matrices are rebuilt from the seed, not checkpointed), a
//! model with straight-through and gradient-reversal ops trains, and `inspect`/`schedule` report
//! per method.

mod common;

use std::process::{Command, Output};

use cleave_compiler::train::{read_checkpoint, train, OptimizerArg, TrainArgs};
use common::{args, root, tmp};
use serde_json::Value;

fn cleave(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cleave"))
        .args(args)
        .output()
        .expect("run cleave")
}

fn losses(path: &std::path::Path) -> Vec<f64> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).unwrap()["loss"].as_f64())
        .collect()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// Every method lowers the training loss of the digits MLP in 120 SGD steps and writes a `loss`
/// line per step. Forward gradients (4 tangents) learn much more slowly, as their variance
/// predicts: they are held to a smaller drop and to beating chance (10%) clearly.
#[test]
fn every_method_trains_and_writes_loss_metrics() {
    let dir = tmp("grad-methods");
    for (method, lr, drop, acc) in [
        ("bp", 0.1, 0.8, 0.5),
        ("fa", 0.1, 0.8, 0.5),
        ("dfa", 0.1, 0.8, 0.5),
        ("local{blocks=2}", 0.1, 0.8, 0.5),
        ("forward-gradient", 0.02, 0.95, 0.3),
    ] {
        let metrics = dir.join(format!("{}.jsonl", method.replace(['{', '}', '='], "_")));
        let s = train(&TrainArgs {
            optimizer: OptimizerArg::Sgd,
            lr: Some(lr),
            metrics: Some(metrics.clone()),
            grad_method: method.into(),
            tangents: if method == "forward-gradient" { 4 } else { 1 },
            ..args(120)
        })
        .unwrap_or_else(|e| panic!("{method}: {e:#}"));
        let l = losses(&metrics);
        assert_eq!(l.len(), 120, "{method}: one loss line per step");
        let (first, last) = (mean(&l[..10]), mean(&l[110..]));
        assert!(
            last < drop * first,
            "{method}: loss {first:.3} -> {last:.3} did not fall"
        );
        assert!(
            s.accuracy.unwrap() > acc,
            "{method}: accuracy {:?}",
            s.accuracy
        );
    }
}

/// Forward gradients are seeded: two runs with the same seed give the same losses, another seed
/// other losses.
#[test]
fn forward_gradient_runs_are_deterministic() {
    let run = |seed: u64| {
        let dir = tmp(&format!("fg-{seed}-{}", rand_suffix()));
        let metrics = dir.join("m.jsonl");
        train(&TrainArgs {
            optimizer: OptimizerArg::Sgd,
            lr: Some(0.01),
            seed: Some(seed),
            metrics: Some(metrics.clone()),
            grad_method: "forward-gradient".into(),
            ..args(15)
        })
        .unwrap();
        losses(&metrics)
    };
    assert_eq!(run(1), run(1));
    assert_ne!(run(1), run(2));
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// FA's fixed random matrices are constants of the step, rebuilt from the seed: a checkpoint
/// holds only the parameters and optimizer state, and a resumed run equals an uninterrupted one.
#[test]
fn fa_resumes_exactly_without_checkpointing_its_matrices() {
    let (a, b) = (tmp("fa-a"), tmp("fa-b"));
    let with = |ckpt: &std::path::Path, steps: usize, resume: bool| TrainArgs {
        checkpoint: Some(ckpt.to_path_buf()),
        resume: resume.then(|| ckpt.to_path_buf()),
        grad_method: "fa".into(),
        ..args(steps)
    };
    train(&with(&a, 20, false)).unwrap();
    train(&with(&b, 10, false)).unwrap();
    train(&with(&b, 20, true)).unwrap();
    let (ta, meta) = read_checkpoint(&a).unwrap();
    let (tb, _) = read_checkpoint(&b).unwrap();
    assert_eq!(meta["grad_method"], "fa");
    assert!(ta.keys().all(|k| !k.contains("fa")), "{:?}", ta.keys());
    for (k, t) in &ta {
        assert_eq!(t.data, tb[k].data, "{k}");
    }
}

/// A classifier whose hidden activations are quantised by `ste_round` and that trains an
/// adversarial head through `grad_reverse` (the features learn to defeat it) still learns the
/// digits.
#[test]
fn a_model_with_custom_gradient_ops_trains() {
    let dir = tmp("ste-model");
    let model = dir.join("ste.cir");
    std::fs::write(
        &model,
        r#"func @ste_mlp {
  %x = input {name = "x"} : f32[32,64]
  %labels = input {name = "labels"} : i32[32]
  %w1 = param {name = "fc1.weight"} : f32[64,128]
  %h = matmul %x, %w1 : f32[32,128]
  %b1 = param {name = "fc1.bias"} : f32[128]
  %bb1 = broadcast %b1 {dims = [1]} : f32[32,128]
  %hb = add %h, %bb1 : f32[32,128]
  %a = relu %hb : f32[32,128]
  %four = constant {value = 4.0} : f32[32,128]
  %a4 = mul %a, %four : f32[32,128]
  %q4 = ste_round %a4 : f32[32,128]
  %quarter = constant {value = 0.25} : f32[32,128]
  %q = mul %q4, %quarter : f32[32,128]
  %w2 = param {name = "fc2.weight"} : f32[128,10]
  %z = matmul %q, %w2 : f32[32,10]
  %b2 = param {name = "fc2.bias"} : f32[10]
  %bb2 = broadcast %b2 {dims = [1]} : f32[32,10]
  %logits = add %z, %bb2 : f32[32,10]
  %ce = cross_entropy %logits, %labels : f32[32]
  %main = reduce_mean %ce {axes = [0]} : f32[]
  %r = grad_reverse %a {lambda = 0.05} : f32[32,128]
  %wa = param {name = "adv.weight"} : f32[128,10]
  %za = matmul %r, %wa : f32[32,10]
  %cea = cross_entropy %za, %labels : f32[32]
  %adv = reduce_mean %cea {axes = [0]} : f32[]
  %loss = add %main, %adv : f32[]
  return %loss as "loss", %logits as "logits"
}
"#,
    )
    .unwrap();
    let metrics = dir.join("m.jsonl");
    let s = train(&TrainArgs {
        model: model.clone(),
        data: root().join("examples/data/digits.safetensors"),
        optimizer: OptimizerArg::Sgd,
        lr: Some(0.1),
        metrics: Some(metrics.clone()),
        ..args(150)
    })
    .unwrap();
    let l = losses(&metrics);
    assert!(mean(&l[140..]) < 0.7 * mean(&l[..10]), "{l:?}");
    assert!(s.accuracy.unwrap() > 0.8, "accuracy {:?}", s.accuracy);
}

/// FA, DFA and local learning on the pipeline executor: FA and DFA give the losses and weights of
/// one stage (the same microbatches) bit for bit under 1F1B and ZB-H1 (DFA's output error goes
/// from the last stage to every stage); local learning's blocks are the stages, so its two
/// schedules agree with each other and its auxiliary heads are trained parameters. A forward
/// gradient (its W waits for the last stage's directional derivative; every microbatch of a step
/// has the same tangents) gives the losses and weights of one stage bit for bit too, under a
/// one-direction and a V schedule.
#[test]
fn pipelined_gradient_methods() {
    let run = |method: &str, stages: usize, schedule: &str| {
        cleave_compiler::pipeline_train::train(&TrainArgs {
            grad_method: method.into(),
            ..common::gpt_tiny(stages, schedule, 3)
        })
        .unwrap_or_else(|e| panic!("{method} {stages} {schedule}: {e:#}"))
    };
    for method in ["fa", "dfa"] {
        let one = run(method, 1, "1f1b");
        for schedule in ["1f1b", "zb-h1"] {
            let two = run(method, 2, schedule);
            common::assert_same(&format!("{method} {schedule}"), &one, &two);
        }
    }
    let a = run("local", 2, "1f1b");
    let b = run("local", 2, "zb-h1");
    common::assert_same("local", &a, &b);
    assert!(a.params.keys().any(|k| k.starts_with("local.head")));
    let fg = |stages: usize, schedule: &str| {
        cleave_compiler::pipeline_train::train(&TrainArgs {
            grad_method: "forward-gradient".into(),
            tangents: 2,
            lr: Some(1e-3),
            ..common::gpt_tiny(stages, schedule, 3)
        })
        .unwrap_or_else(|e| panic!("forward-gradient {stages} {schedule}: {e:#}"))
    };
    let one = fg(1, "1f1b");
    for (stages, schedule) in [(2, "zb-h1"), (2, "zb-v"), (3, "1f1b")] {
        let other = fg(stages, schedule);
        common::assert_same(&format!("forward-gradient {schedule}"), &one, &other);
    }
    // Steps 2 and 3 moved every weight of every stage: each stage's W got its estimate.
    let first = cleave_compiler::pipeline_train::train(&TrainArgs {
        grad_method: "forward-gradient".into(),
        tangents: 2,
        lr: Some(1e-3),
        ..common::gpt_tiny(3, "1f1b", 1)
    })
    .unwrap();
    for (name, w) in &one.params {
        assert!(
            common::bits(w) != common::bits(&first.params[name]),
            "forward-gradient: {name} did not move"
        );
    }
    let e = train(&TrainArgs {
        grad_method: "nope".into(),
        ..args(2)
    })
    .unwrap_err();
    assert!(
        format!("{e:#}").contains("unknown gradient method `nope`"),
        "{e:#}"
    );
}

/// `inspect --json --grad-method` reports FLOPs per phase and stash bytes for every method.
#[test]
fn inspect_reports_every_method() {
    let model = root().join("examples/mlp-digits.cir");
    let mut stash = Vec::new();
    let mut params = 0;
    for m in ["bp", "forward-gradient", "fa", "dfa", "local{blocks=2}"] {
        let o = cleave(&[
            "inspect",
            model.to_str().unwrap(),
            "--json",
            "--grad-method",
            m,
        ]);
        assert!(
            o.status.success(),
            "{m}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["grad_method"], m);
        assert!(v["flops"]["forward"]["matmul"].as_u64().unwrap() > 0, "{m}");
        stash.push(v["stash_bytes"].as_u64().unwrap());
        if m == "forward-gradient" {
            // No input-gradient phase: the forward (with tangents) and the estimate `dd·v`.
            let phases: Vec<&String> = v["flops"].as_object().unwrap().keys().collect();
            assert_eq!(phases, ["forward", "wgrad"], "{m}");
            assert_eq!(
                v["flops"]["wgrad"]["matmul"].as_u64().unwrap_or(0),
                0,
                "{m}"
            );
            params = v["parameters"]["bytes"].as_u64().unwrap();
        }
    }
    // A forward gradient keeps the parameters' tangents (and the directional derivative) from
    // F until W.
    assert_eq!(
        stash[1],
        params + 4,
        "forward gradients stash their tangents"
    );
    assert!(stash[0] > 0 && stash[4] > stash[0], "{stash:?}");
}

/// `schedule --grad-method` simulates under the method's dependencies.
#[test]
fn schedule_reports_the_dependency_mode() {
    let run = |m: &str, s: &str| -> Value {
        let o = cleave(&[
            "schedule",
            "--costs",
            "1,1,1",
            "--stages",
            "4",
            "--microbatches",
            "8",
            "--schedule",
            s,
            "--grad-method",
            m,
            "--json",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let bp = run("bp", "1f1b");
    let local = run("local", "eager");
    assert_eq!(bp["backward_dependency"], "next-stage");
    assert_eq!(local["backward_dependency"], "none");
    assert!(bp["bubble_rate"].as_f64().unwrap() > 0.2);
    assert_eq!(local["bubble_rate"].as_f64().unwrap(), 0.0);
    let model = root().join("examples/mlp.cir");
    let o = cleave(&[
        "schedule",
        "--model",
        model.to_str().unwrap(),
        "--stages",
        "3",
        "--microbatches",
        "4",
        "--schedule",
        "1f1b",
        "--grad-method",
        "dfa",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// `--compress fewbit` (few-bit backward of GELU), `rank1` (rank-1 sub-tokens of linear
/// layers' inputs, with either vector), `bf16` (the stash in bfloat16) and `int8` (8-bit codes, a scale per row):
/// the pipeline gives one stage's losses and weights bit for bit, GPT-tiny still learns as exact
/// backprop does with fewbit, bf16 and int8
/// (losses within 2% over 12 steps), the joint planner leaves the step exact where it fits
/// without them, and a model without GELU/SiLU or a method that is not built is an error naming
/// it.
#[test]
fn fewbit_compression_trains_on_the_pipeline() {
    let run = |stages: usize, schedule: &str, compress: Option<&str>| {
        cleave_compiler::pipeline_train::train(&TrainArgs {
            compress: compress.map(str::to_string),
            ..common::gpt_tiny(stages, schedule, 12)
        })
        .unwrap_or_else(|e| panic!("{compress:?} {stages} {schedule}: {e:#}"))
    };
    let one = run(1, "1f1b", Some("fewbit"));
    for schedule in ["1f1b", "zb-h1"] {
        common::assert_same(
            &format!("fewbit {schedule}"),
            &one,
            &run(2, schedule, Some("fewbit")),
        );
    }
    // Both methods together, on one stage and two.
    let both = run(1, "1f1b", Some("fewbit:1,rank1:4"));
    common::assert_same(
        "fewbit+rank1",
        &both,
        &run(2, "zb-h1", Some("fewbit:1,rank1:4")),
    );
    assert_ne!(both.losses, one.losses, "rank1 changed nothing");
    // The batch's vector: stashed with the coefficients, across the stage boundary too.
    let batch = run(1, "1f1b", Some("rank1:4:batch"));
    common::assert_same(
        "rank1 batch",
        &batch,
        &run(2, "zb-h1", Some("rank1:4:batch")),
    );
    assert_ne!(
        batch.losses,
        run(1, "1f1b", Some("rank1:4")).losses,
        "the vector changed nothing"
    );
    let half = run(1, "1f1b", Some("bf16"));
    common::assert_same("bf16 zb-h1", &half, &run(2, "zb-h1", Some("bf16")));
    common::assert_same("bf16 zb-v", &half, &run(2, "zb-v", Some("bf16")));
    let codes = run(1, "1f1b", Some("int8"));
    common::assert_same("int8 zb-h1", &codes, &run(2, "zb-h1", Some("int8")));
    let exact = run(1, "1f1b", None);
    for lossy in [&one, &half, &codes] {
        assert_ne!(
            exact.losses, lossy.losses,
            "the compression changed nothing"
        );
        for (a, b) in lossy.losses.iter().zip(&exact.losses) {
            assert!(
                (a - b).abs() <= 0.02 * b.abs(),
                "{:?} vs {:?}",
                lossy.losses,
                exact.losses
            );
        }
    }
    // The joint planner chooses compression per value; with room for the exact step it is the
    // exact step, bit for bit.
    let joint = |compress: Option<&str>| {
        cleave_compiler::pipeline_train::train(&TrainArgs {
            compress: compress.map(str::to_string),
            memory_limit: Some("64M".into()),
            ..common::gpt_tiny(2, "auto", 2)
        })
        .unwrap_or_else(|e| panic!("joint {compress:?}: {e:#}"))
    };
    common::assert_same("joint, roomy", &joint(None), &joint(Some("fewbit,bf16")));
    // Other gradient methods are not planned jointly: refused, not dropped.
    let e = cleave_compiler::pipeline_train::train(&TrainArgs {
        grad_method: "dfa".into(),
        memory_limit: Some("64M".into()),
        ..common::gpt_tiny(2, "auto", 1)
    })
    .unwrap_err();
    assert!(format!("{e:#}").contains("not planned jointly"), "{e:#}");
    for (compress, want) in [
        ("fewbit", "has neither"),
        ("int8:3", "int8 takes no parameter"),
        ("fewbit:9", "bits must be 1 to 4"),
        ("rank1:1", "the group must be 2 to 4096"),
        ("rank1:8:first", "vector=first"),
    ] {
        let e = train(&TrainArgs {
            compress: Some(compress.into()),
            ..args(2)
        })
        .unwrap_err();
        assert!(format!("{e:#}").contains(want), "{compress}: {e:#}");
    }
}

/// Under `--memory-limit`, `--compress` names what the plan may use, per value: with room for
/// the exact step it is not used (the run equals the uncompressed one bit for bit); under a limit
/// the exact step meets only with recomputation (640 KiB above the smallest feasible one, which
/// the infeasible run's error names: it moves with the kernels' scratch), some values are
/// compressed and the plan recomputes less.
#[test]
fn the_plan_chooses_compression_under_a_limit() {
    let train = |limit: &str, compress: Option<&str>| {
        cleave_compiler::pipeline_train::train(&TrainArgs {
            memory_limit: Some(limit.into()),
            compress: compress.map(str::to_string),
            ..common::gpt_tiny(2, "1f1b", 2)
        })
    };
    let run = |limit: &str, compress: Option<&str>| {
        train(limit, compress).unwrap_or_else(|e| panic!("{limit} {compress:?}: {e:#}"))
    };
    let named = Some("fewbit:1,rank1:8,bf16");
    common::assert_same("roomy", &run("8M", None), &run("8M", named));
    let smallest = common::smallest_feasible(&train("1", None).unwrap_err());
    let limit = smallest + 640 * 1024;
    let exact = run(&limit.to_string(), None);
    let chosen = run(&limit.to_string(), named);
    let added = |r: &cleave_compiler::pipeline_train::PipelineRun| -> f64 {
        r.memory.iter().map(|s| s.summary.added_seconds).sum()
    };
    assert!(
        added(&exact) > 0.0,
        "the exact step fits {limit} bytes without recomputation; the test needs a tighter limit"
    );
    assert!(
        added(&chosen) < added(&exact),
        "{} vs {}",
        added(&chosen),
        added(&exact)
    );
    // The allocator-measured peak of every device stays under the limit with the compression.
    assert!(!chosen.measured_peak_bytes.is_empty());
    for (d, &peak) in chosen.measured_peak_bytes.iter().enumerate() {
        assert!(peak <= limit, "device {d}: measured {peak} over {limit}");
    }
    assert_ne!(
        exact.losses, chosen.losses,
        "the compression was not chosen"
    );
}

/// `inspect --memory --compress`: every value each method applies to, with bytes before and
/// after and added seconds, and per stage the saved bytes with every method applied. Few-bit at
/// 2 bits halves each GELU input it lists, bf16 halves every value, int8 keeps a quarter and a
/// scale per row, rank-1 at 8 keeps an eighth;
/// with `--memory-limit` the plan marks the values it chose and lists the plans it tried.
#[test]
fn inspect_lists_what_compression_replaces() {
    let model = root().join("examples/gpt-tiny.cir");
    let report = |methods: &str, limit: Option<&str>| -> Value {
        let mut args = vec![
            "inspect",
            model.to_str().unwrap(),
            "--memory",
            "--json",
            "--stages",
            "2",
            "--compress",
            methods,
        ];
        if let Some(l) = limit {
            args.extend([
                "--microbatches",
                "4",
                "--schedule",
                "1f1b",
                "--memory-limit",
                l,
            ]);
        }
        let o = cleave(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        v["compress"].clone()
    };
    let c = report("fewbit:2,rank1:8,bf16,int8", None);
    assert_eq!(
        c["methods"],
        "compress=fewbit+rank1+int8+bf16,bits=2,group=8"
    );
    let values = c["values"].as_array().unwrap();
    for method in ["fewbit", "rank1", "bf16", "int8"] {
        let of: Vec<&Value> = values.iter().filter(|v| v["method"] == method).collect();
        assert!(!of.is_empty(), "no {method} value: {c}");
        for v in of {
            let (e, b) = (
                v["bytes_exact"].as_u64().unwrap(),
                v["bytes"].as_u64().unwrap(),
            );
            let want = match method {
                "rank1" => e / 8,
                // A quarter, plus one f32 scale per row (rows of at least 16 here).
                "int8" => {
                    assert!(b > e / 4 && b <= e / 4 + e / 16, "{v}");
                    b
                }
                _ => e / 2,
            };
            assert_eq!(b, want, "{v}");
            assert!(v["added_seconds"].as_f64().unwrap() > 0.0, "{v}");
            assert!(v["value"].as_str().unwrap().starts_with('%'), "{v}");
        }
    }
    let stages = c["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 2);
    for st in stages {
        // F's stash at least halves (B's hand-over to W holds gradients, never compressed).
        let f = |k: &str, w: &str| st[k].as_u64().unwrap() - st[w].as_u64().unwrap();
        assert!(
            f("saved_bytes", "b_to_w_bytes") * 2 <= f("saved_bytes_exact", "b_to_w_bytes_exact"),
            "{st}"
        );
        assert!(st["added_forward_flops"].as_u64().unwrap() > 0, "{st}");
    }
    // Under a limit the exact step meets only with recomputation at: some values are chosen.
    let c = report("fewbit:2,rank1:8,bf16", Some("450000"));
    let chosen = c["values"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["chosen"] == true)
        .count();
    assert!(chosen > 0, "{c}");
    assert_eq!(c["chosen"].as_u64().unwrap() as usize, chosen);
    let tried = c["tried"].as_array().unwrap();
    assert!(
        tried[0]["error"].is_string(),
        "the exact step fits 450000: {c}"
    );
    assert!(tried.len() < 20, "{} plans tried", tried.len());
}

/// `--precision bf16` (GEMMs in bf16, f32 master weights): the pipeline gives one stage's losses
/// and weights bit for bit, the single-function step trains as f32 does (losses within 1% over
/// 12 steps, and not identical).
#[test]
fn bf16_precision_trains_on_the_pipeline() {
    let run = |stages: usize, schedule: &str, precision: Option<&str>| {
        cleave_compiler::pipeline_train::train(&TrainArgs {
            precision: precision.map(str::to_string),
            ..common::gpt_tiny(stages, schedule, 12)
        })
        .unwrap_or_else(|e| panic!("{precision:?} {stages} {schedule}: {e:#}"))
    };
    let half = run(1, "1f1b", Some("bf16"));
    common::assert_same("bf16 zb-h1", &half, &run(2, "zb-h1", Some("bf16")));
    let exact = run(1, "1f1b", None);
    assert_ne!(exact.losses, half.losses, "bf16 changed nothing");
    for (a, b) in half.losses.iter().zip(&exact.losses) {
        assert!((a - b).abs() <= 0.01 * b.abs(), "{a} vs {b}");
    }
    // The single-function step (no pipeline) takes the flag too.
    let single = |precision: Option<&str>| {
        cleave_compiler::train::train(&TrainArgs {
            precision: precision.map(str::to_string),
            microbatches: 1,
            ..common::gpt_tiny(1, "1f1b", 12)
        })
        .unwrap_or_else(|e| panic!("{precision:?}: {e:#}"))
        .final_loss
        .unwrap()
    };
    let (s32, s16) = (single(None), single(Some("bf16")));
    assert_ne!(s32, s16);
    assert!((s32 - s16).abs() <= 0.01 * s32.abs(), "{s16} vs {s32}");
}

/// `--precision f16` (GEMMs in f16 under a dynamic loss scale): the pipeline gives one stage's
/// losses and weights bit for bit; losses stay within 1% of f32's; with AdamW too (whose update
/// divides the scale out); a scale that overflows f16 skips steps (the weights stay as they
/// were) and halves until the gradients are finite, then doubles after each window of finite
/// steps; and the one-function trainer routes f16 to the pipeline executor.
#[test]
fn f16_precision_scales_the_loss_dynamically() {
    let run = |stages: usize, schedule: &str, precision: Option<&str>| {
        cleave_compiler::pipeline_train::train(&TrainArgs {
            precision: precision.map(str::to_string),
            ..common::gpt_tiny(stages, schedule, 12)
        })
        .unwrap_or_else(|e| panic!("{precision:?} {stages} {schedule}: {e:#}"))
    };
    let half = run(1, "1f1b", Some("f16"));
    common::assert_same("f16 zb-h1", &half, &run(2, "zb-h1", Some("f16")));
    let exact = run(1, "1f1b", None);
    assert_ne!(exact.losses, half.losses, "f16 changed nothing");
    for (a, b) in half.losses.iter().zip(&exact.losses) {
        assert!((a - b).abs() <= 0.01 * b.abs(), "{a} vs {b}");
    }
    // An overflowing scale: 2²⁴ makes the backward GEMMs' f16 results infinite.
    let metrics = tmp("f16-scale").join("m.jsonl");
    // Momentum (an update the stages do not apply, whose step size follows the gradient's
    // size, unlike AdamW's): the updater divides the scale out.
    let momentum = |scale: f64, window: usize, metrics: Option<&std::path::Path>| {
        cleave_compiler::train::train(&TrainArgs {
            precision: Some("f16".into()),
            loss_scale: scale,
            loss_scale_window: window,
            optimizer: OptimizerArg::Momentum,
            microbatches: 1,
            metrics: metrics.map(std::path::Path::to_path_buf),
            ..common::gpt_tiny(1, "1f1b", 12)
        })
        .unwrap_or_else(|e| panic!("f16 momentum {scale}: {e:#}"))
        .final_loss
        .unwrap()
    };
    let f32_momentum = cleave_compiler::train::train(&TrainArgs {
        optimizer: OptimizerArg::Momentum,
        microbatches: 1,
        ..common::gpt_tiny(1, "1f1b", 12)
    })
    .unwrap()
    .final_loss
    .unwrap();
    let good = momentum(65536.0, 2000, None);
    assert!(
        (good - f32_momentum).abs() <= 0.01 * f32_momentum,
        "{good} vs {f32_momentum}"
    );
    momentum((1u64 << 24) as f64, 3, Some(&metrics));
    let lines: Vec<Value> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &Value| v.get("loss_scale").is_some())
        .collect();
    assert_eq!(lines.len(), 12);
    let skipped: Vec<bool> = lines.iter().map(|v| v["skipped"] == true).collect();
    let scales: Vec<f64> = lines
        .iter()
        .map(|v| v["loss_scale"].as_f64().unwrap())
        .collect();
    assert!(skipped[0], "2^24 overflows: {lines:?}");
    let first_kept = skipped.iter().position(|s| !s).expect("a finite step");
    for (i, w) in scales.windows(2).enumerate() {
        // Halved after a skipped step; kept or doubled after a finite one.
        if skipped[i] {
            assert_eq!(w[1], w[0] / 2.0, "step {i}: {scales:?}");
        } else {
            assert!(w[1] == w[0] || w[1] == 2.0 * w[0], "step {i}: {scales:?}");
        }
    }
    assert!(first_kept + 3 < scales.len(), "{scales:?}");
    assert!(
        scales[first_kept + 3] == 2.0 * scales[first_kept]
            || skipped[first_kept..first_kept + 3].contains(&true),
        "no growth after a window of 3: {scales:?}"
    );
    // Skipped steps leave the weights as they were (as SGD at lr 0 does), on the pipeline.
    let pipe_metrics = tmp("f16-skip").join("m.jsonl");
    let skipped = cleave_compiler::pipeline_train::train(&TrainArgs {
        precision: Some("f16".into()),
        loss_scale: (1u64 << 24) as f64,
        metrics: Some(pipe_metrics.clone()),
        ..common::gpt_tiny(2, "zb-h1", 3)
    })
    .unwrap();
    let text = std::fs::read_to_string(&pipe_metrics).unwrap();
    let kept = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v.get("skipped").is_some_and(|s| s == false))
        .count();
    assert_eq!(kept, 0, "{text}");
    assert_eq!(text.matches("\"skipped\":true").count(), 3, "{text}");
    let still = cleave_compiler::pipeline_train::train(&TrainArgs {
        lr: Some(0.0),
        ..common::gpt_tiny(2, "zb-h1", 3)
    })
    .unwrap();
    assert_eq!(skipped.params, still.params);
    let e = cleave_compiler::train::train(&TrainArgs {
        precision: Some("f16".into()),
        loss_scale: 0.0,
        ..common::gpt_tiny(1, "1f1b", 1)
    })
    .unwrap_err();
    assert!(format!("{e:#}").contains("--loss-scale 0"), "{e:#}");
    let e = cleave_compiler::train::train(&TrainArgs {
        precision: Some("f16".into()),
        grad_method: "forward-gradient".into(),
        ..common::gpt_tiny(1, "1f1b", 1)
    })
    .unwrap_err();
    assert!(format!("{e:#}").contains("forward-gradient"), "{e:#}");
}

/// `inspect --memory --precision bf16` plans the bf16 step: its GEMM operands are stashed in
/// bf16, so every stage saves fewer bytes; `f16` saves the same bytes.
#[test]
fn inspect_plans_the_bf16_step() {
    let model = root().join("examples/gpt-tiny.cir");
    let saved = |precision: Option<&str>| -> Vec<u64> {
        let mut args = vec![
            "inspect",
            model.to_str().unwrap(),
            "--memory",
            "--json",
            "--stages",
            "2",
            "--microbatches",
            "4",
        ];
        if let Some(p) = precision {
            args.extend(["--precision", p]);
        }
        let o = cleave(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        v["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["saved_bytes"].as_u64().unwrap())
            .collect()
    };
    let (f32_saved, bf16_saved) = (saved(None), saved(Some("bf16")));
    for (a, b) in bf16_saved.iter().zip(&f32_saved) {
        assert!(a < b, "{bf16_saved:?} vs {f32_saved:?}");
    }
    // f16 stashes what bf16 does, and the last stage holds each microbatch's loss scale (an
    // f32 scalar) from its F to its B.
    let f16_saved = saved(Some("f16"));
    let last = f16_saved.len() - 1;
    for (i, (a, b)) in f16_saved.iter().zip(&bf16_saved).enumerate() {
        assert_eq!(
            *a,
            b + if i == last { 4 } else { 0 },
            "{f16_saved:?} vs {bf16_saved:?}"
        );
    }
}
