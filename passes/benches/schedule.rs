//! Benchmark: simulating P = 64 devices and M = 512 microbatches (1F1B and ZB-H1).
//!
//! Run with `cargo bench -p cleave-passes --bench schedule`. Generates each schedule once, then
//! times `Schedule::simulate` (validation included) N times after one warm-up, and prints the
//! median, minimum and maximum. The acceptance bound is 1 s.

use std::time::Instant;

use cleave_passes::schedule::generators::Generator;
use cleave_passes::schedule::{Costs, Memory};

fn main() {
    let iters: usize = std::env::var("CLEAVE_BENCH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(11);
    let (p, m) = (64, 512);
    for (name, g) in [("1f1b", Generator::OneFOneB), ("zb-h1", Generator::ZbH1)] {
        let t = Instant::now();
        let schedule = g.generate(p, m).expect("generates");
        let generate = t.elapsed();
        let costs = Costs::uniform(p, 1.0, 1.0, 1.0, 0.0);
        let memory = Memory::uniform(p, 1.0, 0.5);
        let n_actions: usize = schedule.devices.iter().map(Vec::len).sum();
        let warm = schedule.simulate(&costs, &memory).expect("simulates");
        let mut times = Vec::with_capacity(iters);
        for _ in 0..iters {
            let t = Instant::now();
            let sim = schedule.simulate(&costs, &memory).expect("simulates");
            times.push(t.elapsed().as_secs_f64());
            assert_eq!(sim.makespan, warm.makespan);
        }
        times.sort_by(f64::total_cmp);
        println!(
            "{name}: P={p} M={m}, {n_actions} actions, generate {:.2} ms; simulate median {:.2} ms (min {:.2}, max {:.2}, n={iters}); bubble {:.6}",
            generate.as_secs_f64() * 1e3,
            times[iters / 2] * 1e3,
            times[0] * 1e3,
            times[iters - 1] * 1e3,
            warm.bubble_rate
        );
    }
}
