//! Benchmark: `simplify`, and `autodiff,simplify,split-bw`, on a 32-layer GPT with d_model 4096.
//!
//! Run with `cargo bench -p cleave-passes --bench simplify` (`CLEAVE_BENCH_ITERS=N`, default 7).
//! Traces the forward function and differentiates it once (not timed), then times
//! `simplify_function` with the default options on that training step N times after one warm-up,
//! and the whole `autodiff,simplify,split-bw` pipeline on the forward function as many times,
//! and prints the median, minimum and maximum, the node counts and how many regions used the ILP.
//! The second figure is that whole pipeline, from the forward function.
//!
//! `CLEAVE_ILP_SWEEP=1` instead prints the ILP extraction time on growing regions (the
//! measurement behind `ILP_NODE_LIMIT` in `passes/src/egraph/extract.rs`).

use std::time::Instant;

use cleave_ir::models::{gpt, GptConfig};
use cleave_passes::autodiff::{differentiate, Mode};
use cleave_passes::egraph::{simplify_function, ExtractMethod, SimplifyOptions};
use cleave_passes::split::split_function;

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn main() {
    let iters: usize = std::env::var("CLEAVE_BENCH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let config = GptConfig {
        vocab: 50257,
        d_model: 4096,
        heads: 32,
        layers: 32,
        seq: 2048,
        batch: 1,
        ..GptConfig::default()
    };
    let forward = gpt(&config).expect("GPT builds");
    let (step, _) = differentiate(forward.clone(), Mode::Loss, &[]).expect("differentiates");
    if std::env::var("CLEAVE_ILP_SWEEP").is_ok() {
        for region_nodes in [100, 200, 400, 800, 1600, 3200, 6400] {
            for extract in [ExtractMethod::Greedy, ExtractMethod::Ilp] {
                let opts = SimplifyOptions {
                    region_nodes,
                    extract,
                    ilp_node_limit: usize::MAX,
                    ..SimplifyOptions::default()
                };
                let t0 = Instant::now();
                let (_, report) = simplify_function(&step, &opts).expect("simplifies");
                let ms = t0.elapsed().as_secs_f64() * 1e3;
                let ilp = report
                    .regions
                    .iter()
                    .filter(|r| r.method == ExtractMethod::Ilp)
                    .count();
                let max_enodes = report.regions.iter().map(|r| r.n_enodes).max().unwrap_or(0);
                println!(
                    "region_nodes {region_nodes:5} {extract:?}: {ms:9.1} ms, {} regions ({ilp} by ILP), largest e-graph {max_enodes} e-nodes",
                    report.regions.len()
                );
            }
        }
        return;
    }
    let opts = SimplifyOptions::default();
    let (warm, report) = simplify_function(&step, &opts).expect("simplifies");
    let n_ilp = report
        .regions
        .iter()
        .filter(|r| r.method == ExtractMethod::Ilp)
        .count();
    let mut simplify_ms = Vec::new();
    let mut total_ms = Vec::new();
    for _ in 0..iters {
        let t0 = Instant::now();
        let out = simplify_function(&step, &opts).expect("simplifies");
        simplify_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        std::hint::black_box(out);
        let f = forward.clone();
        let t0 = Instant::now();
        let (s, _) = differentiate(f, Mode::Loss, &[]).expect("differentiates");
        let (out, _) = simplify_function(&s, &opts).expect("simplifies");
        let parts = split_function(&out, true).expect("splits");
        total_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        std::hint::black_box(parts);
    }
    println!(
        "32-layer GPT (d_model 4096, 32 heads, seq 2048, vocab 50257): {} forward nodes -> {} after autodiff -> {} after simplify; {} regions, {n_ilp} extracted by ILP",
        forward.body.len(),
        step.body.len(),
        warm.body.len(),
        report.regions.len()
    );
    let (m, lo, hi) = median(simplify_ms);
    println!("simplify median {m:.1} ms (min {lo:.1}, max {hi:.1}) over {iters} runs");
    let (m, lo, hi) = median(total_ms);
    println!(
        "autodiff + simplify + split-bw median {m:.1} ms (min {lo:.1}, max {hi:.1}) over {iters} runs"
    );
}
