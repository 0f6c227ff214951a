//! `cleave train --chunk-lm-head K`: the step's output layer and cross-entropy in row chunks
//! (`chunk{ops=lm-head,k=K}`), on the pipeline executor: losses within 1e-6 of the unchunked
//! run, the same chunked step bit for bit whatever the stage count, and less memory where the
//! vocabulary is large (the logits never exist whole; with recomputation, one chunk at a time).

mod common;

use cleave_compiler::pipeline_train::{train, PipelineRun};
use cleave_compiler::train::{OptimizerArg, TrainArgs};
use common::root;

fn run(
    model: &std::path::Path,
    data: &std::path::Path,
    stages: usize,
    chunk: Option<usize>,
    remat: Option<&str>,
) -> PipelineRun {
    run_with(model, data, stages, chunk, remat, None, None)
        .unwrap_or_else(|e| panic!("stages {stages} chunk {chunk:?}: {e:#}"))
}

fn run_with(
    model: &std::path::Path,
    data: &std::path::Path,
    stages: usize,
    chunk: Option<usize>,
    remat: Option<&str>,
    limit: Option<&str>,
    compress: Option<&str>,
) -> anyhow::Result<PipelineRun> {
    train(&TrainArgs {
        model: model.to_path_buf(),
        data: data.to_path_buf(),
        optimizer: OptimizerArg::Sgd,
        seed: Some(1),
        stages,
        microbatches: 4,
        schedule: if stages > 1 { "zb-h1" } else { "1f1b" }.into(),
        chunk_lm_head: chunk,
        remat: remat.map(str::to_string),
        memory_limit: limit.map(str::to_string),
        compress: compress.map(str::to_string),
        ..common::args(3)
    })
}

#[test]
fn chunked_steps_match_unchunked_and_each_other() {
    let (model, data) = (
        root().join("examples/gpt-tiny.cir"),
        root().join("examples/data/modadd.safetensors"),
    );
    let plain = run(&model, &data, 2, None, None);
    let chunked = run(&model, &data, 2, Some(4), None);
    for (a, b) in plain.losses.iter().zip(&chunked.losses) {
        assert!((a - b).abs() <= 1e-6 * a.abs(), "{a} vs {b}");
    }
    let one = run(&model, &data, 1, Some(4), None);
    common::assert_same("chunked, 1 stage vs 2", &one, &chunked);
}

/// A GPT with a 4096-token vocabulary and its data, in `dir`.
fn large_vocabulary(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (model, data) = (dir.join("gpt.cir"), dir.join("gpt.safetensors"));
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_cleave"))
        .args([
            "new-model",
            "gpt",
            "--layers",
            "1",
            "--d-model",
            "32",
            "--heads",
            "2",
            "--seq",
            "32",
            "--vocab",
            "4096",
            "--batch",
            "4",
            "--examples",
            "64",
        ])
        .arg("-o")
        .arg(&model)
        .arg("--data-out")
        .arg(&data)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    (model, data)
}

#[test]
fn chunking_a_large_vocabulary_saves_memory() {
    let dir = common::tmp("chunk-vocab");
    let (model, data) = large_vocabulary(&dir);
    // Logits of one microbatch: 4·32 rows × 4096 × 4 bytes = 2 MiB.
    let logits = 4 * 32 * 4096 * 4;
    let plain = run(&model, &data, 1, None, Some("full"));
    let chunked = run(&model, &data, 1, Some(8), Some("full"));
    let total = |r: &PipelineRun| r.planned_devices[0].total();
    assert!(
        total(&chunked) + logits <= total(&plain),
        "planned {} chunked vs {} unchunked",
        total(&chunked),
        total(&plain)
    );
    for (a, b) in plain.losses.iter().zip(&chunked.losses) {
        assert!((a - b).abs() <= 1e-6 * a.abs(), "{a} vs {b}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--compress chunked:K` under `--memory-limit`: the plan chunks the output layer only where
/// that gives the shorter simulated step. The limits are placed around the smallest one the
/// whole layer fits (the infeasible run's error names it; it moves with the kernels' scratch,
/// so with the GEMM kernel in use): with room, and half a MiB above it where the whole layer
/// fits with recomputation, the run is the unchunked one bit for bit; half a MiB below it
/// (the logits are 2 MiB) it is the `--chunk-lm-head K` run bit for bit. `chunked` without K
/// searches the chunk counts. Without a limit, or with `--chunk-lm-head`, it is an error that
/// says so.
#[test]
fn the_plan_chooses_the_chunked_layer_under_a_limit() {
    let dir = common::tmp("chunk-choice");
    let (model, data) = large_vocabulary(&dir);
    let go = |chunk, limit: &str, compress| {
        run_with(&model, &data, 1, chunk, None, Some(limit), compress)
            .unwrap_or_else(|e| panic!("{chunk:?} {limit} {compress:?}: {e:#}"))
    };
    let named = Some("chunked:8");
    common::assert_same("roomy", &go(None, "40M", None), &go(None, "40M", named));
    let e = run_with(&model, &data, 1, None, None, Some("1"), None).unwrap_err();
    let whole = common::smallest_feasible(&e);
    let (above, below) = (
        (whole + 512 * 1024).to_string(),
        (whole - 512 * 1024).to_string(),
    );
    let recomputing = go(None, &above, None);
    assert!(
        recomputing
            .memory
            .iter()
            .any(|s| s.summary.added_seconds > 0.0),
        "the whole layer fits {above} bytes without recomputation; the test needs a tighter limit"
    );
    common::assert_same("above", &recomputing, &go(None, &above, named));
    let e = run_with(&model, &data, 1, None, None, Some(&below), None).unwrap_err();
    assert!(format!("{e:#}").contains("infeasible"), "{e:#}");
    let chunked = go(None, &below, named);
    assert_eq!(chunked.chunked, Some(8));
    common::assert_same("below", &go(Some(8), &below, None), &chunked);
    // Without K the plan searches the chunk counts: below it chunks, and the run is the
    // `--chunk-lm-head K` run of the K it took; with room the layer stays whole.
    let searched = go(None, &below, Some("chunked"));
    let k = searched.chunked.expect("the whole layer does not fit");
    assert!(cleave_passes::plan::CHUNK_CHOICES.contains(&k), "{k}");
    common::assert_same("below searched", &go(Some(k), &below, None), &searched);
    assert_eq!(go(None, "40M", Some("chunked")).chunked, None);
    for (chunk, limit, want) in [
        (None, None, "give --memory-limit"),
        (Some(8), Some("12M"), "chunked already"),
    ] {
        let e = run_with(&model, &data, 1, chunk, None, limit, named).unwrap_err();
        assert!(format!("{e:#}").contains(want), "{e:#}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `inspect --memory --compress chunked:K --memory-limit L`: the chunked layer is listed as a
/// candidate with the whole logits' bytes and one chunk's, and whether the plan took it.
#[test]
fn inspect_lists_the_chunked_candidate() {
    let dir = common::tmp("chunk-inspect");
    let (model, _) = large_vocabulary(&dir);
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_cleave"))
        .arg("inspect")
        .arg(&model)
        .args(["--memory", "--json", "--stages", "1", "--microbatches", "4"])
        .args([
            "--schedule",
            "1f1b",
            "--memory-limit",
            "3M",
            "--compress",
            "chunked:8",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let values = v["compress"]["values"].as_array().unwrap();
    let c = values
        .iter()
        .find(|x| x["method"] == "chunked:8")
        .unwrap_or_else(|| panic!("no chunked candidate: {v}"));
    // Logits of one microbatch: 4·32 rows × 4096 × 4 bytes, and an eighth of the rows.
    assert_eq!(c["bytes_exact"], 4 * 32 * 4096 * 4);
    assert_eq!(c["bytes"], 4 * 32 * 4096 * 4 / 8);
    assert!(c["chosen"].is_boolean(), "{c}");
    let _ = std::fs::remove_dir_all(&dir);
}
