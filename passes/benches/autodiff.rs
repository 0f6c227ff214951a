//! Benchmark: the `autodiff` pass on a 32-layer GPT with d_model 4096.
//!
//! Run with `cargo bench -p cleave-passes --bench autodiff`. Traces the forward function once,
//! then times `differentiate` (activity analysis, VJP emission, tagging) on a fresh clone N times
//! after one warm-up, and prints the median, minimum and maximum. Method and results are in
//! BENCHMARKS.md.

use std::time::Instant;

use cleave_ir::models::{gpt, GptConfig};
use cleave_ir::Module;
use cleave_passes::autodiff::{differentiate, Mode};
use cleave_passes::split::split_function;

fn main() {
    let iters: usize = std::env::var("CLEAVE_BENCH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(11);
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
    let n_forward = forward.body.len();
    let (warm, _) = differentiate(forward.clone(), Mode::Loss, &[]).expect("differentiates");
    let n_total = warm.body.len();
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let f = forward.clone();
        let t0 = Instant::now();
        let (out, _) = differentiate(f, Mode::Loss, &[]).expect("differentiates");
        times.push(t0.elapsed().as_secs_f64() * 1e3);
        std::hint::black_box(out);
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mut split_times = Vec::with_capacity(iters);
    let mut n_split = 0;
    for _ in 0..iters {
        let t0 = Instant::now();
        let parts = split_function(&warm, true).expect("splits");
        split_times.push(t0.elapsed().as_secs_f64() * 1e3);
        n_split = parts.iter().map(|f| f.body.len()).sum();
        std::hint::black_box(Module { functions: parts });
    }
    split_times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "32-layer GPT (d_model 4096, 32 heads, seq 2048, vocab 50257): {n_forward} forward nodes -> {n_total} nodes after autodiff"
    );
    println!(
        "autodiff median {:.2} ms (min {:.2}, max {:.2}) over {iters} runs",
        times[iters / 2],
        times[0],
        times[iters - 1]
    );
    println!(
        "split-bw median {:.2} ms (min {:.2}, max {:.2}) over {iters} runs ({n_split} nodes in F, B and W)",
        split_times[iters / 2],
        split_times[0],
        split_times[iters - 1]
    );
}
