//! Runs the GPU check cases that `mlir/examples/gpu_cases.rs` wrote (`scripts/gpu-check.sh`):
//! each compiled function on the GPU against the reference interpreter's outputs (normwise
//! relative error, as `tests/tests/runtime_vs_interp.rs` measures it), and the multi-step
//! training case's losses against the interpreter's. Prints one JSON line per case and exits
//! non-zero if any case is off.
//!
//! `cargo run --release -p cleave-runtime --features cuda --example gpu_cases -- CASE_DIR [RTOL]`

use std::collections::BTreeMap;

use cleave_ir::Tensor;
use cleave_runtime::cuda::{Device, GpuRunner};
use cleave_runtime::gpu_kernel::GpuCase;

/// `max |a − b| / max |b|` over finite elements (0 when equal); ints and bools exactly.
fn normwise(got: &Tensor, want: &Tensor) -> f64 {
    let (a, b) = (got.to_f64_vec(), want.to_f64_vec());
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let scale = b
        .iter()
        .filter(|x| x.is_finite())
        .fold(0.0f64, |m, x| m.max(x.abs()));
    let mut worst = 0.0f64;
    for (x, y) in a.iter().zip(&b) {
        if x.is_nan() != y.is_nan() || (!y.is_finite() && x != y) {
            return f64::INFINITY;
        }
        if y.is_finite() {
            worst = worst.max((x - y).abs());
        }
    }
    worst / (scale + 1e-30)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args.next().expect("usage: gpu_cases CASE_DIR [RTOL]");
    let rtol: f64 = args.next().map(|s| s.parse().unwrap()).unwrap_or(1e-5);
    let dev = match Device::new(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("gpu_cases: {e}");
            std::process::exit(2);
        }
    };
    println!(
        "{}",
        serde_json::json!({"device": dev.name().unwrap_or_default()})
    );
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    let mut failed = 0;
    for p in &paths {
        let text = std::fs::read_to_string(p).unwrap();
        let case: GpuCase = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{p:?}: {e}"));
        let launches: usize = case.function.groups.iter().map(|g| g.launches.len()).sum();
        let t0 = std::time::Instant::now();
        let result = (|| -> Result<serde_json::Value, String> {
            let mut runner =
                GpuRunner::new(&dev, case.function.clone()).map_err(|e| e.to_string())?;
            let mut inputs: BTreeMap<String, Tensor> = case
                .inputs
                .iter()
                .map(|(k, v)| (k.clone(), v.to_tensor().expect("known dtype")))
                .collect();
            let first = runner.run(&inputs).map_err(|e| e.to_string())?;
            let mut worst = 0.0f64;
            let mut worst_name = String::new();
            for (name, want) in &case.expected {
                let got = first
                    .get(name)
                    .ok_or_else(|| format!("no output `{name}`"))?;
                let e = normwise(got, &want.to_tensor().expect("known dtype"));
                if e > worst || worst_name.is_empty() {
                    worst = worst.max(e);
                    worst_name = name.clone();
                }
            }
            let mut losses = Vec::new();
            let mut out = first;
            for step in 0..case.steps {
                if step > 0 {
                    out = runner.run(&inputs).map_err(|e| e.to_string())?;
                }
                if let Some(l) = out.get("loss") {
                    losses.push(l.to_f64_vec()[0]);
                }
                for c in &case.carry {
                    inputs.insert(c.clone(), out[c].clone());
                }
            }
            let loss_err = losses
                .iter()
                .zip(&case.losses)
                .map(|(a, b)| ((a - b) / b.abs().max(1e-30)).abs())
                .fold(0.0f64, f64::max);
            let ok = worst <= rtol && (case.steps <= 1 || loss_err <= 1e-4);
            Ok(serde_json::json!({
                "case": case.name, "ok": ok, "launches": launches,
                "worst_rel_err": worst, "worst_output": worst_name,
                "steps": case.steps, "max_loss_rel_err": loss_err,
                "first_loss": losses.first(), "last_loss": losses.last(),
                "reference_last_loss": case.losses.last(),
                "seconds": t0.elapsed().as_secs_f64(),
            }))
        })();
        match result {
            Ok(v) => {
                if v["ok"] != true {
                    failed += 1;
                }
                println!("{v}");
            }
            Err(e) => {
                failed += 1;
                println!(
                    "{}",
                    serde_json::json!({"case": case.name, "ok": false, "error": e})
                );
            }
        }
    }
    println!(
        "{}",
        serde_json::json!({"cases": paths.len(), "failed": failed, "rtol": rtol})
    );
    if failed > 0 {
        std::process::exit(1);
    }
}
