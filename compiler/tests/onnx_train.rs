//! `cleave train` on an imported `.onnx` model: the model's own weights are the starting point,
//! `--loss cross-entropy --labels labels` adds the loss, and training lowers it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cleave_compiler::tensors::write_tensors;
use cleave_compiler::train::{train, OptimizerArg, TrainArgs};
use cleave_ir::{DType, Tensor};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn train_the_onnx_mlp_with_an_added_loss() {
    // A learnable task: the label is the index of the largest of the first 3 features (so of
    // the model's classes, only 0..3 occur).
    let (n, features) = (256, 8);
    let mut state = 12345u64;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as f64 / (1u64 << 31) as f64) * 2.0 - 1.0
    };
    let x: Vec<f32> = (0..n * features).map(|_| next() as f32).collect();
    let labels: Vec<i64> = (0..n)
        .map(|i| {
            let row = &x[i * features..i * features + 3];
            (0..3).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap() as i64
        })
        .collect();
    let dir = std::env::temp_dir().join(format!("cleave-onnx-train-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("data.safetensors");
    let mut t = BTreeMap::new();
    t.insert("x".to_string(), Tensor::from_f32(vec![n, features], x));
    t.insert(
        "labels".to_string(),
        Tensor::from_i64(DType::I32, vec![n], labels),
    );
    write_tensors(&data, &t).unwrap();
    let metrics = dir.join("metrics.jsonl");
    let summary = train(&TrainArgs {
        model: root().join("tests/onnx/mlp.onnx"),
        data,
        steps: 300,
        batch: Some(4),
        loss: Some(cleave_compiler::loss::LossKind::CrossEntropy),
        labels: Some("labels".into()),
        loss_output: None,
        optimizer: OptimizerArg::Sgd,
        lr: Some(0.1),
        seed: Some(3),
        eval_every: None,
        checkpoint: None,
        checkpoint_every: 100,
        resume: None,
        metrics: Some(metrics.clone()),
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
    })
    .unwrap();
    let text = std::fs::read_to_string(&metrics).unwrap();
    let losses: Vec<f64> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["loss"].as_f64())
        .collect();
    assert!(losses.len() >= 50, "{}", losses.len());
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    let (first, last) = (mean(&losses[..20]), mean(&losses[losses.len() - 20..]));
    assert!(
        last < 0.6 * first,
        "loss {first:.4} -> {last:.4} ({summary:?})"
    );
    std::fs::remove_dir_all(dir).ok();
}
