//! Issue 21, acceptance 1: `auto` against the Zero Bubble paper's own automatic scheduler.
//!
//! Rows: Table 5 of Qi et al., "Zero Bubble Pipeline Parallelism" (arXiv 2401.10241), with the
//! profiled costs of its Table 9 and the memory of its Table 1 (M_B = sb(34h+5as),
//! M_W = 32sbh; only the ratio matters, so the common factor sb is dropped). ZB-1p is its
//! scheduler under a limit of p·M_B, ZB-2p under 2p·M_B. See docs/reference/zero-bubble-tables.md.
//! cleave's `auto` must reach the published bubble rate (+0.002) on every row.

use cleave_passes::schedule::auto::{auto_schedule, AutoOptions};
use cleave_passes::schedule::{Costs, Memory};

/// (model, p, m, T_F, T_B, T_W, T_comm, ZB-1p, ZB-2p).
type Row = (&'static str, usize, usize, f64, f64, f64, f64, f64, f64);

const ROWS: [Row; 12] = [
    ("1.5B", 8, 24, 18.522, 18.086, 9.337, 0.601, 0.1585, 0.0433),
    ("1.5B", 8, 32, 18.513, 18.086, 9.331, 0.626, 0.1242, 0.0039),
    ("1.5B", 8, 64, 18.546, 18.097, 9.321, 0.762, 0.0674, 0.0026),
    ("6.2B", 8, 24, 29.718, 29.444, 19.927, 0.527, 0.1323, 0.0029),
    ("6.2B", 8, 32, 29.802, 29.428, 19.530, 0.577, 0.1045, 0.0022),
    ("6.2B", 8, 64, 29.935, 29.621, 19.388, 0.535, 0.0554, 0.0010),
    (
        "14.6B", 16, 48, 11.347, 11.248, 8.132, 0.377, 0.1397, 0.0066,
    ),
    (
        "14.6B", 16, 64, 11.307, 11.254, 8.101, 0.379, 0.1088, 0.0054,
    ),
    (
        "14.6B", 16, 128, 11.325, 11.308, 8.109, 0.378, 0.0576, 0.0028,
    ),
    (
        "28.3B", 32, 96, 10.419, 10.207, 7.715, 0.408, 0.1421, 0.0038,
    ),
    (
        "28.3B", 32, 128, 10.408, 10.204, 7.703, 0.408, 0.1106, 0.0029,
    ),
    (
        "28.3B", 32, 256, 10.402, 10.248, 7.698, 0.460, 0.0594, 0.0018,
    ),
];

/// (h, a, s) of a model (Table 3).
fn shape(model: &str) -> (f64, f64, f64) {
    match model {
        "1.5B" => (2304.0, 24.0, 1024.0),
        "6.2B" => (4096.0, 32.0, 1024.0),
        "14.6B" => (5120.0, 40.0, 1024.0),
        "28.3B" => (6144.0, 48.0, 1024.0),
        other => panic!("no such model {other}"),
    }
}

/// cleave's bubble rate on a row at `k`·p·M_B.
fn auto_rate(row: &Row, k: f64) -> (f64, String) {
    let &(model, p, m, f, b, w, comm, _, _) = row;
    let (h, a, s) = shape(model);
    let m_b = 34.0 * h + 5.0 * a * s;
    let m_w = 32.0 * h;
    let costs = Costs::uniform(p, f, b, w, comm);
    let memory = Memory::uniform(p, m_b, m_w);
    let limit = k * p as f64 * m_b;
    let options = AutoOptions {
        memory_limit: Some(limit),
        ..AutoOptions::default()
    };
    let (schedule, report) = auto_schedule(p, m, &costs, &memory, &options).unwrap();
    let sim = schedule.simulate(&costs, &memory).unwrap();
    let peak = sim
        .devices
        .iter()
        .map(|d| d.peak_memory)
        .fold(0.0, f64::max);
    assert!(
        peak <= limit * (1.0 + 1e-12),
        "{model} p{p} m{m}: peak {peak} over {limit}"
    );
    (sim.bubble_rate, report.chosen)
}

fn check(k: f64, published: impl Fn(&Row) -> f64) {
    let mut failures = Vec::new();
    for row in &ROWS {
        let (rate, chosen) = auto_rate(row, k);
        let zb = published(row);
        eprintln!(
            "{:>5} p{:<2} m{:<3} {k}p·M_B: auto {rate:.4} ({chosen}), ZB {zb:.4}",
            row.0, row.1, row.2
        );
        if rate > zb + 0.002 {
            failures.push(format!(
                "{} p{} m{}: {rate:.4} > {zb:.4}",
                row.0, row.1, row.2
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "auto above Zero Bubble's scheduler: {failures:?}"
    );
}

#[test]
fn auto_reaches_zb_2p_at_2p_mb() {
    check(2.0, |r| r.8);
}

#[test]
fn auto_reaches_zb_1p_at_p_mb() {
    check(1.0, |r| r.7);
}

mod never_worse {
    //! Acceptance 4 of issue 21 at the scheduler's level: on random per-stage costs, memory and
    //! limits, `auto` is never worse than the best fixed one-stage-per-device schedule that fits.
    use cleave_passes::schedule::auto::{auto_schedule, AutoOptions};
    use cleave_passes::schedule::generators::Generator;
    use cleave_passes::schedule::simulate::BackwardDependency;
    use cleave_passes::schedule::{Costs, Memory, StageCost, StageMemory};
    use proptest::prelude::*;
    use proptest::test_runner::RngSeed;

    fn stage() -> impl Strategy<Value = (StageCost, StageMemory)> {
        (
            0.2f64..2.0,
            0.2f64..2.0,
            0.05f64..1.5,
            0.1f64..2.0,
            0.0f64..1.0,
        )
            .prop_map(|(f, b, w, m_b, share)| {
                (
                    StageCost { f, b, w },
                    StageMemory {
                        m_b,
                        m_w: m_b * share,
                    },
                )
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, rng_seed: RngSeed::Fixed(0x5eed_0004), ..ProptestConfig::default() })]
        #[test]
        fn auto_never_worse_than_a_fixed_schedule_that_fits(
            stages in prop::collection::vec(stage(), 2..6),
            extra_m in 0usize..12,
            comm in 0.0f64..0.3,
            slack in 0.0f64..1.0,
            mode in 0usize..3,
        ) {
            let p = stages.len();
            let m = 1 + extra_m;
            let costs = Costs { stages: stages.iter().map(|s| s.0).collect(), comm };
            let memory = Memory { stages: stages.iter().map(|s| s.1).collect() };
            let backward = [
                BackwardDependency::NextStage,
                BackwardDependency::LastStageForward,
                BackwardDependency::None,
            ][mode];
            let fixed: Vec<_> = [Generator::GPipe, Generator::OneFOneB, Generator::ZbH1, Generator::ZbH2]
                .into_iter()
                .map(|g| {
                    let sim = g.generate(p, m).unwrap().simulate_with(&costs, &memory, backward).unwrap();
                    let peak = sim.devices.iter().map(|d| d.peak_memory).fold(0.0, f64::max);
                    (g, sim.bubble_rate, peak)
                })
                .collect();
            // A limit between the smallest and the largest fixed peak.
            let lo = fixed.iter().map(|f| f.2).fold(f64::INFINITY, f64::min);
            let hi = fixed.iter().map(|f| f.2).fold(0.0, f64::max);
            let limit = lo + slack * (hi - lo);
            let options = AutoOptions {
                memory_limit: Some(limit),
                backward,
                ilp_max_pm: 0,
                ..AutoOptions::default()
            };
            let (s, report) = auto_schedule(p, m, &costs, &memory, &options).unwrap();
            let sim = s.simulate_with(&costs, &memory, backward).unwrap();
            let peak = sim.devices.iter().map(|d| d.peak_memory).fold(0.0, f64::max);
            prop_assert!(peak <= limit + 1e-9, "peak {} over {}", peak, limit);
            for (g, rate, fixed_peak) in &fixed {
                if *fixed_peak <= limit + 1e-9 {
                    prop_assert!(
                        sim.bubble_rate <= rate + 1e-9,
                        "auto ({}) {} worse than {:?} {}", report.chosen, sim.bubble_rate, g, rate
                    );
                }
            }
        }
    }
}
