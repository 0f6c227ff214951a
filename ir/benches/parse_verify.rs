//! Benchmark: parse and verify the IR text of a 96-layer GPT (GPT-3 175B shapes).
//!
//! Run with `cargo bench -p cleave-ir --bench parse_verify`. Prints the text size and the median,
//! minimum and maximum of N timed runs of `parse_module` + `verify_module` (after one warm-up);
//! method and results are in BENCHMARKS.md.

use std::time::Instant;

use cleave_ir::models::{gpt, GptConfig};
use cleave_ir::parser::parse_module;
use cleave_ir::{verify_module, Module};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let iters: usize = std::env::var("CLEAVE_BENCH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(11);
    let config = GptConfig {
        vocab: 50257,
        d_model: 12288,
        heads: 96,
        layers: 96,
        seq: 2048,
        batch: 1,
        ..GptConfig::default()
    };
    let build = Instant::now();
    let func = gpt(&config).expect("GPT builds");
    let build_s = build.elapsed().as_secs_f64();
    let text = Module::with_function(func).to_string();
    let lines = text.lines().count();
    println!(
        "96-layer GPT (d_model 12288, 96 heads, seq 2048, vocab 50257): {lines} lines, {:.1} MiB of text; traced in {:.3} s",
        text.len() as f64 / (1 << 20) as f64,
        build_s
    );
    // Warm-up.
    let m = parse_module(&text).expect("parses");
    verify_module(&m).expect("verifies");
    let mut parse = Vec::new();
    let mut verify = Vec::new();
    let mut total = Vec::new();
    for _ in 0..iters {
        let t0 = Instant::now();
        let m = parse_module(&text).expect("parses");
        let t1 = Instant::now();
        verify_module(&m).expect("verifies");
        let t2 = Instant::now();
        parse.push((t1 - t0).as_secs_f64() * 1e3);
        verify.push((t2 - t1).as_secs_f64() * 1e3);
        total.push((t2 - t0).as_secs_f64() * 1e3);
    }
    let (lo, hi) = (
        total.iter().cloned().fold(f64::INFINITY, f64::min),
        total.iter().cloned().fold(0.0, f64::max),
    );
    println!(
        "parse {:.1} ms, verify {:.1} ms, parse+verify median {:.1} ms (min {:.1}, max {:.1}) over {iters} runs",
        median(parse),
        median(verify),
        median(total),
        lo,
        hi
    );
}
