//! Time of the joint plan (`--schedule auto --memory-limit L`: schedule and recomputation /
//! offload chosen together) on the GPT of issue 21: 32 and 96 layers, d 4096, seq 2048, P = 8,
//! M = 16, H100 profile, at ZB-H2's and 1F1B's peak memory (simulations only, nothing runs).
//!
//! `cargo bench -p cleave-compiler --bench joint_plan` prints, per case, the median wall time of
//! `memory::joint` over `JOINT_RUNS` runs (default 3) and the plan's makespan. With
//! `JOINT_BASELINE=path/to/an/older/cleave`, each run also times that binary's
//! `cleave inspect … --json` on the same case, interleaved with the in-process runs, so both
//! medians come from the same run on the same machine (the older figure includes loading and
//! differentiating the model, about 0.1 s; `JOINT_LAYERS=32` limits the cases). The last column
//! is Zero Bubble's approach at the same memory: the automatic scheduler under the limit with
//! the costs and memory of no recomputation. With `JOINT_V=1`, stderr also gives the time and
//! result of `plan::joint_v_family` (the V family, bounded by the joint plan's makespan).
//! Method and figures: BENCHMARKS.md, "Joint plan time".

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use cleave_compiler::cli::main_with_args;
use cleave_compiler::load::{forward_of, load_module};
use cleave_compiler::memory::{joint, plan_for, split_module};
use cleave_compiler::pipeline_train::build_schedule;
use cleave_passes::partition::DeviceProfile;
use cleave_passes::remat::{PlanCache, Policy};
use cleave_passes::schedule::auto::{auto_schedule, AutoOptions};

const PROFILE: &str = "h100-sxm";
const P: usize = 8;
const M: usize = 16;

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let runs: usize = std::env::var("JOINT_RUNS")
        .ok()
        .and_then(|x| x.parse().ok())
        .unwrap_or(3);
    let baseline = std::env::var("JOINT_BASELINE").ok();
    let layers: Vec<usize> = match std::env::var("JOINT_LAYERS") {
        Ok(x) => x
            .split(',')
            .map(|l| l.trim().parse())
            .collect::<Result<_, _>>()?,
        Err(_) => vec![32, 96],
    };
    let dir = std::env::temp_dir().join(format!("cleave-joint-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let profile = DeviceProfile::load(PROFILE).map_err(anyhow::Error::msg)?;
    println!("| layers | limit | joint (median of {runs}) | makespan | baseline (median) | baseline makespan | auto without recomputation |");
    println!("|---|---|---|---|---|---|---|");
    for n in layers {
        let file = dir.join(format!("gpt{n}.cir"));
        main_with_args([
            "cleave",
            "new-model",
            "gpt",
            "--layers",
            &n.to_string(),
            "--d-model",
            "4096",
            "--heads",
            "32",
            "--seq",
            "2048",
            "--batch",
            "1",
            "--vocab",
            "50304",
            "-o",
            file.to_str().expect("a UTF-8 temporary path"),
        ])?;
        let module = load_module(&file, &Default::default())?;
        let forward = forward_of(&module)?;
        let base = split_module(&forward, P, PROFILE)?;
        for peak_of in ["zb-h2", "1f1b"] {
            let none = plan_for(
                &forward,
                &base,
                build_schedule(peak_of, P, M)?,
                peak_of,
                Policy::None,
                None,
                &profile,
                &mut PlanCache::default(),
            )?;
            let limit = none
                .sim
                .devices
                .iter()
                .map(|d| d.peak_memory)
                .fold(0.0, f64::max) as u64;
            // Zero Bubble's way at the same memory: the automatic schedule under the limit with
            // the costs and memory of no recomputation (ZB-1p at 1F1B's peak).
            let options = AutoOptions {
                memory_limit: Some(limit as f64),
                ilp_max_pm: 0,
                ..AutoOptions::default()
            };
            let zb = auto_schedule(P, M, &none.costs, &none.memory, &options)
                .ok()
                .and_then(|(s, _)| s.simulate(&none.costs, &none.memory).ok())
                .map_or("none fits".to_string(), |sim| {
                    format!("{:.6} s", sim.makespan)
                });
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            let (mut makespan, mut their_makespan) = (0.0, f64::NAN);
            for _ in 0..runs {
                let t = Instant::now();
                let (best, _) = joint(&forward, &base, P, M, limit, &profile)?;
                ours.push(t.elapsed().as_secs_f64());
                makespan = best.sim.makespan;
                if let Some(old) = &baseline {
                    let (secs, ms) = run_baseline(Path::new(old), &file, limit)?;
                    theirs.push(secs);
                    their_makespan = ms;
                }
            }
            let old = if theirs.is_empty() {
                "–".to_string()
            } else {
                format!("{:.2} s", median(theirs))
            };
            if std::env::var("JOINT_V").is_ok() {
                let t = Instant::now();
                let v = cleave_passes::plan::joint_v_family(
                    &forward,
                    P,
                    M,
                    limit,
                    PROFILE,
                    Default::default(),
                    Some(makespan),
                )?;
                let secs = t.elapsed().as_secs_f64();
                match v {
                    Some((b, _)) => eprintln!(
                        "{n} layers, {peak_of} peak: V family {secs:.2} s more, best {} {:.6} s",
                        b.origin, b.sim.makespan
                    ),
                    None => eprintln!(
                        "{n} layers, {peak_of} peak: V family {secs:.2} s more, none shorter"
                    ),
                }
            }
            println!(
                "| {n} | {peak_of} peak, {limit} B | {:.2} s | {makespan:.6} s | {old} | {their_makespan:.6} s | {zb} |",
                median(ours)
            );
        }
    }
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}

/// Wall time and plan makespan of `old inspect FILE --memory … --json`.
fn run_baseline(old: &Path, file: &Path, limit: u64) -> anyhow::Result<(f64, f64)> {
    let t = Instant::now();
    let out = Command::new(old)
        .arg("inspect")
        .arg(file)
        .args([
            "--memory",
            "--stages",
            &P.to_string(),
            "--microbatches",
            &M.to_string(),
        ])
        .args(["--schedule", "auto", "--memory-limit", &limit.to_string()])
        .args(["--profile", PROFILE, "--json"])
        .output()?;
    let secs = t.elapsed().as_secs_f64();
    anyhow::ensure!(
        out.status.success(),
        "{}: {}",
        old.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok((secs, json["makespan_s"].as_f64().unwrap_or(f64::NAN)))
}
