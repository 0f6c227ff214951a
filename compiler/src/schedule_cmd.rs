//! `cleave schedule`: generate a pipeline schedule, simulate it, and report or draw it.
//!
//! # Costs
//!
//! - `--costs TF,TB,TW[,TCOMM]`: one device's whole share of the model (any time unit; TCOMM
//!   defaults to 0). For interleaved and ZB-V schedules the share is split evenly between the
//!   device's chunks.
//! - `--model FILE.cir`: a forward model without stage annotations is cut into P balanced stages
//!   (`partition{stages=P}`), then differentiated (`autodiff`, unless it already is) and split
//!   (`split-bw`); each split stage's F/B/W FLOPs (all classes, from `inspect::split_report`)
//!   divided by `--device-flops` (a nominal device rate, default 1e14 FLOP/s) give T_F, T_B, T_W
//!   in seconds, and its stash bytes give M_B = F_to_B + F_to_W and M_W = F_to_W + B_to_W (so
//!   `--memory-limit` is then in bytes). An already split or differentiated module with one stage
//!   gives every device the same share; a module with P stages gives device d stage d; any other
//!   count is an error. `--comm` sets T_COMM (default 0).
//!
//! # Gradient methods
//!
//! `--grad-method METHOD` sets the dependency mode; with `--model` it also differentiates with
//! that method
//! (`autodiff{method=…}`) and simulates under its dependency mode: with `dfa`, B of a stage
//! waits for the last stage's F (the output error) instead of the next stage's B; with
//! `forward-gradient` likewise (its W needs the last stage's directional derivative; its forward
//! and tangent FLOPs are T_F, T_B is 0, T_W the estimate `(∇f·v)·v`, and the stash is the
//! parameters' tangents); with `local` it waits for nothing but its own F. The `eager` schedule
//! (F, B, W of each microbatch in turn) is the order that uses this;
//! `auto` judges its candidates under the method's dependencies (and adds `eager` to them when
//! B does not wait for the next stage); its greedy and ILP candidates are still built under
//! backprop's. The JSON report adds `"grad_method"` and
//! `"backward_dependency"`.
//!
//! # Memory
//!
//! `--memory MB,MW` (default `1,0.5`, or the model's stash bytes) per device share;
//! `--memory-limit X` in the same units (default unlimited) bounds `auto` and is reported for the
//! other schedules (`fits_memory_limit`). `auto` builds one stage per device itself and judges the
//! fixed schedules with several chunks per device beside its choice (ZB-V, V-Min, V-Half,
//! DualPipeV, interleaved, Hanayo with one and two waves; each gets per-chunk costs from the same
//! device shares), by its own rule: the smallest bubble rate, then makespan, among those that fit.
//! So under a tight limit it picks V-Min or V-Half where nothing else fits as well.
//!
//! # JSON
//!
//! `{"schedule", "bubble_rate", "makespan_bubble_rate", "makespan", "stages": [{"peak_memory",
//! "busy", "span"}] (one entry per device), "actions": [["0F0", …], …], "fits_memory_limit"}`,
//! plus `"auto": {"chosen", "candidates"}` for `auto`.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use cleave_passes::autodiff::GRAD_PREFIX;
use cleave_passes::schedule::auto::{auto_schedule, AutoOptions, AutoReport};
use cleave_passes::schedule::generators::Generator;
use cleave_passes::schedule::{svg, Costs, Memory, Schedule, StageCost, StageMemory};
use cleave_passes::PassManager;

use cleave_passes::autodiff::methods::GradMethod;
use cleave_passes::schedule::simulate::BackwardDependency;

use crate::inspect::split_report;
use crate::load::load_module;

/// Arguments of `cleave schedule`.
#[derive(clap::Args, Debug)]
pub struct ScheduleArgs {
    /// Number of devices P (pipeline ranks).
    #[arg(long)]
    pub stages: usize,
    /// Number of microbatches M.
    #[arg(long)]
    pub microbatches: usize,
    /// gpipe, 1f1b, interleaved (2 chunks) or `interleaved-<v>`, zb-h1, zb-h2, zb-v, v-min,
    /// v-half, dualpipev, hanayo (or `hanayo-<waves>`), auto.
    #[arg(long)]
    pub schedule: String,
    /// `TF,TB,TW[,TCOMM]`: one device's share of the model.
    #[arg(
        long,
        value_delimiter = ',',
        conflicts_with = "model",
        required_unless_present = "model"
    )]
    pub costs: Option<Vec<f64>>,
    /// A `.cir` model whose split-bw stages give the costs and memory.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Nominal device rate for `--model`, FLOP/s.
    #[arg(long, default_value_t = 1e14)]
    pub device_flops: f64,
    /// T_COMM for `--model`.
    #[arg(long, default_value_t = 0.0, requires = "model")]
    pub comm: f64,
    /// MB,MW: activation memory per microbatch of one device's share.
    #[arg(long, value_delimiter = ',')]
    pub memory: Option<Vec<f64>>,
    /// Per-device memory limit, in the units of `--memory`.
    #[arg(long)]
    pub memory_limit: Option<f64>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Write the timeline and memory picture here.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Write the action lists here (one row per device).
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Gradient method of `--model`: bp, forward-gradient, fa, dfa, local{blocks=K}.
    #[arg(long, default_value = "bp")]
    pub grad_method: String,
    /// Random tangents of `--grad-method forward-gradient`.
    #[arg(long, default_value_t = 1)]
    pub tangents: usize,
}

/// Per-device shares of cost and memory, and T_COMM.
struct Shares {
    costs: Vec<StageCost>,
    memory: Vec<StageMemory>,
    comm: f64,
}

fn shares(a: &ScheduleArgs) -> Result<Shares> {
    let p = a.stages;
    let mut out = if let Some(path) = &a.model {
        let method = crate::train::parse_grad_method(&a.grad_method, a.tangents)?;
        model_shares(path, p, a.device_flops, &method)?
    } else {
        let c = a.costs.as_deref().unwrap_or_default();
        if !(3..=4).contains(&c.len()) {
            bail!("--costs takes TF,TB,TW[,TCOMM], got {} value(s)", c.len());
        }
        Shares {
            costs: vec![
                StageCost {
                    f: c[0],
                    b: c[1],
                    w: c[2]
                };
                p
            ],
            memory: vec![StageMemory { m_b: 1.0, m_w: 0.5 }; p],
            comm: c.get(3).copied().unwrap_or(0.0),
        }
    };
    if a.model.is_some() {
        out.comm = a.comm;
    }
    if let Some(m) = &a.memory {
        let [m_b, m_w] = m[..] else {
            bail!("--memory takes MB,MW, got {} value(s)", m.len());
        };
        out.memory = vec![StageMemory { m_b, m_w }; p];
    }
    let bad = out
        .costs
        .iter()
        .any(|c| [c.f, c.b, c.w].iter().any(|x| !x.is_finite() || *x < 0.0));
    if bad || !out.comm.is_finite() || out.comm < 0.0 {
        bail!("costs must be finite and non-negative");
    }
    Ok(out)
}

fn model_shares(
    path: &std::path::Path,
    p: usize,
    rate: f64,
    method: &GradMethod,
) -> Result<Shares> {
    let mut module = load_module(path, &Default::default())?;
    if cleave_passes::split::split_stages(&module).is_empty() {
        let differentiated = module
            .functions
            .iter()
            .any(|f| f.outputs.iter().any(|o| o.name.starts_with(GRAD_PREFIX)));
        let staged = module
            .functions
            .iter()
            .any(|f| f.body.iter().any(|&n| f.nodes[n].stage.is_some()));
        // A forward model without stages is partitioned into P balanced stages first.
        let ad = method.autodiff_pass();
        let pipeline = match (differentiated, staged) {
            (true, _) if *method != GradMethod::Bp => bail!(
                "{}: --grad-method {method} needs a forward model; this one is differentiated already",
                path.display()
            ),
            (true, _) => "split-bw".to_string(),
            (false, true) => format!("{ad},split-bw"),
            (false, false) => format!("partition{{stages={p}}},{ad},split-bw"),
        };
        let mut pm = PassManager::from_pipeline(&pipeline)?;
        pm.verify_each = true;
        let mut ctx = cleave_passes::PassContext::default();
        pm.run(&mut module, &mut ctx, &mut |dump| eprint!("{dump}"))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let stages = split_report(&module);
    let stages: Vec<_> = match stages.len() {
        0 => bail!("{}: split-bw produced no stages", path.display()),
        1 => vec![stages[0].clone(); p],
        n if n == p => stages,
        n => bail!(
            "{}: the model has {n} stages but --stages is {p}; give a one-stage model or one with {p} stages",
            path.display()
        ),
    };
    let t = |f: &crate::inspect::FlopSplit| (f.matmul + f.other) as f64 / rate;
    Ok(Shares {
        costs: stages
            .iter()
            .map(|s| StageCost {
                f: t(&s.flops.F),
                b: t(&s.flops.B),
                w: t(&s.flops.W),
            })
            .collect(),
        memory: stages
            .iter()
            .map(|s| StageMemory {
                m_b: s.m_b_bytes as f64,
                m_w: s.m_w_bytes as f64,
            })
            .collect(),
        comm: 0.0,
    })
}

/// The fixed schedules with several chunks per device (ZB-V, V-Min, V-Half, DualPipeV,
/// interleaved, Hanayo with one and two waves, BitPipe: its replicas' weights are not in the
/// activation memory judged here, the output says how many stages it replicates), which `auto_schedule` (one stage per device)
/// cannot build, judged beside `auto`'s choice by the same rule: the smallest bubble rate, then
/// the smallest makespan, among the schedules whose peaks fit the limit. The device shares give
/// each placement its per-chunk costs, so every candidate runs the same work.
fn with_multi_chunk(
    p: usize,
    m: usize,
    chosen: Schedule,
    mut report: AutoReport,
    sh: &Shares,
    backward: cleave_passes::schedule::simulate::BackwardDependency,
    limit: Option<f64>,
) -> (Schedule, AutoReport) {
    const EPS: f64 = 1e-12;
    let limit = limit.unwrap_or(f64::INFINITY);
    let judge = |s: &Schedule| -> Option<(f64, f64, bool)> {
        let costs = Costs::from_device_shares(&s.placement, &sh.costs, sh.comm);
        let memory = Memory::from_device_shares(&s.placement, &sh.memory);
        let sim = s.simulate_with(&costs, &memory, backward).ok()?;
        let fits = sim.devices.iter().all(|d| d.peak_memory <= limit + 1e-9);
        Some((sim.bubble_rate, sim.makespan, fits))
    };
    let Some(mut best) = judge(&chosen) else {
        return (chosen, report);
    };
    let mut best_schedule = chosen;
    for name in [
        "zb-v",
        "v-min",
        "v-half",
        "dualpipev",
        "interleaved",
        "hanayo",
        "hanayo-2",
        "bitpipe",
    ] {
        let Some(Ok(s)) = Generator::parse(name).map(|g| g.generate(p, m)) else {
            continue;
        };
        let Some((bubble, makespan, fits)) = judge(&s) else {
            continue;
        };
        let name = name.to_string();
        report
            .candidates
            .push((name.clone(), bubble, makespan, fits));
        let better = bubble < best.0 - EPS || (bubble <= best.0 + EPS && makespan < best.1 - EPS);
        if fits && (!best.2 || better) {
            best = (bubble, makespan, fits);
            best_schedule = s;
            report.chosen = name;
        }
    }
    (best_schedule, report)
}

/// Runs `cleave schedule`.
pub fn cmd_schedule(a: ScheduleArgs) -> Result<()> {
    let out = schedule_text(&a)?;
    if let Some(path) = &a.svg {
        std::fs::write(path, &out.svg)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    print!("{}", out.text);
    if !out.fits {
        eprintln!(
            "warning: a device's peak memory exceeds --memory-limit {}",
            a.memory_limit.unwrap_or(f64::INFINITY)
        );
    }
    Ok(())
}

/// What `cleave schedule` prints, and its picture.
#[derive(Clone, Debug)]
pub struct ScheduleOutput {
    /// The text (or JSON with `--json`) printed on stdout.
    pub text: String,
    /// The simulated timeline as SVG (what `--svg` writes).
    pub svg: String,
    /// Whether every device's simulated peak fits `--memory-limit`.
    pub fits: bool,
}

/// Builds and simulates the schedule `a` names (`cleave schedule` without the file writes
/// other than `--csv`; the Python package's `cleave.schedule`).
pub fn schedule_text(a: &ScheduleArgs) -> Result<ScheduleOutput> {
    let mut out = String::new();
    let (p, m) = (a.stages, a.microbatches);
    if p == 0 || m == 0 {
        bail!("--stages and --microbatches must be at least 1");
    }
    let sh = shares(a)?;
    let name = a.schedule.to_ascii_lowercase();
    let (schedule, auto_report): (Schedule, Option<AutoReport>) = if name == "auto" {
        let costs = Costs {
            stages: sh.costs.clone(),
            comm: sh.comm,
        };
        let memory = Memory {
            stages: sh.memory.clone(),
        };
        let options = AutoOptions {
            memory_limit: a.memory_limit,
            backward: crate::train::parse_grad_method(&a.grad_method, a.tangents)?
                .stage_dependency(),
            ..AutoOptions::default()
        };
        let (s, r) = auto_schedule(p, m, &costs, &memory, &options)?;
        let (s, r) = with_multi_chunk(p, m, s, r, &sh, options.backward, a.memory_limit);
        (s, Some(r))
    } else {
        let Some(g) = Generator::parse(&name) else {
            bail!(
                "unknown schedule `{}`; valid schedules: {}, auto",
                a.schedule,
                Generator::NAMES
            );
        };
        (g.generate(p, m)?, None)
    };
    let costs = Costs::from_device_shares(&schedule.placement, &sh.costs, sh.comm);
    let memory = Memory::from_device_shares(&schedule.placement, &sh.memory);
    let method = crate::train::parse_grad_method(&a.grad_method, a.tangents)?;
    let backward = method.stage_dependency();
    let sim = schedule
        .simulate_with(&costs, &memory, backward)
        .with_context(|| format!("schedule `{name}` is invalid"))?;
    let limit = a.memory_limit.unwrap_or(f64::INFINITY);
    let fits = sim.devices.iter().all(|d| d.peak_memory <= limit + 1e-9);
    let replicated = schedule.reverse.as_ref().map_or(0, |r| {
        (0..schedule.n_stages())
            .filter(|&s| r.placement[s] != schedule.placement[s])
            .count()
    });
    let picture = svg::render(&sim, &format!("{name}, P={p}, M={m}"));
    if let Some(path) = &a.csv {
        std::fs::write(path, schedule.to_csv())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if a.json {
        let mut v = serde_json::json!({
            "schedule": name,
            "bubble_rate": sim.bubble_rate,
            "makespan_bubble_rate": sim.makespan_bubble_rate,
            "makespan": sim.makespan,
            "stages": sim.devices.iter().map(|d| serde_json::json!({
                "peak_memory": d.peak_memory,
                "busy": d.busy,
                "span": d.span,
            })).collect::<Vec<_>>(),
            "actions": schedule.action_strings(),
            "fits_memory_limit": fits,
            "grad_method": method.to_string(),
            "backward_dependency": backward.name(),
            "replicated_stages": replicated,
        });
        if let Some(r) = &auto_report {
            v["auto"] = serde_json::json!({
                "chosen": r.chosen,
                "candidates": r.candidates.iter().map(|(n, b, mk, f)| serde_json::json!({
                    "name": n, "bubble_rate": b, "makespan": mk, "fits": f,
                })).collect::<Vec<_>>(),
            });
        }
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        writeln!(out, "schedule {name}: P={p} M={m}")?;
        if method != GradMethod::Bp {
            writeln!(
                out,
                "grad method {method}: B waits for {}",
                match backward {
                    BackwardDependency::NextStage => "the next stage's B",
                    BackwardDependency::LastStageForward => "the last stage's F (output error)",
                    BackwardDependency::None => "nothing but its own F",
                }
            )?;
        }
        if let Some(r) = &auto_report {
            writeln!(out, "auto chose {}", r.chosen)?;
        }
        if replicated > 0 {
            writeln!(
                out,
                "bidirectional: {replicated} stages replicated on two devices (their weights, \
                 gradients and optimizer state are held twice; memory below is activations only)"
            )?;
        }
        writeln!(
            out,
            "makespan {:.6}  bubble rate {:.6}  makespan bubble rate {:.6}",
            sim.makespan, sim.bubble_rate, sim.makespan_bubble_rate
        )?;
        for (d, run) in sim.devices.iter().enumerate() {
            writeln!(
                out,
                "device {d}: busy {:.6} span {:.6} peak memory {:.6}",
                run.busy, run.span, run.peak_memory
            )?;
        }
        for (d, row) in schedule.action_strings().iter().enumerate() {
            writeln!(out, "{d}: {}", row.join(" "))?;
        }
    }
    Ok(ScheduleOutput {
        text: out,
        svg: picture,
        fits,
    })
}
