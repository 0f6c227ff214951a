//! Schedules: the reference cases R1–R5, the validator, CSV/JSON round trips, every generator on
//! a grid of (p, m), and `auto` against the acceptance bounds.

use cleave_passes::schedule::auto::{auto_schedule, greedy, AutoOptions, GreedyFlags};
use cleave_passes::schedule::generators::Generator;
use cleave_passes::schedule::{Action, Costs, Memory, Schedule, ScheduleError, Simulation};

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

fn sim_uniform(g: Generator, p: usize, m: usize, m_b: f64, m_w: f64) -> Simulation {
    let s = g.generate(p, m).unwrap();
    let n = s.n_stages();
    s.simulate(
        &Costs::uniform(n, 1.0, 1.0, 1.0, 0.0),
        &Memory::uniform(n, m_b, m_w),
    )
    .unwrap()
}

fn peaks(sim: &Simulation) -> Vec<f64> {
    sim.devices.iter().map(|d| d.peak_memory).collect()
}

fn max_span(sim: &Simulation) -> f64 {
    sim.devices.iter().map(|d| d.span).fold(0.0, f64::max)
}

#[test]
fn r1_one_f_one_b() {
    let sim = sim_uniform(Generator::OneFOneB, 4, 8, 1.0, 0.5);
    assert!(close(sim.bubble_rate, 3.0 / 11.0), "{}", sim.bubble_rate);
    assert!(close(sim.makespan_bubble_rate, 3.0 / 11.0));
    assert_eq!(peaks(&sim), [4.0, 3.0, 2.0, 1.0]);
}

#[test]
fn r2_zb_h1() {
    let sim = sim_uniform(Generator::ZbH1, 4, 8, 1.0, 0.5);
    assert!(close(sim.bubble_rate, 3.0 / 27.0), "{}", sim.bubble_rate);
    assert_eq!(peaks(&sim), [4.0, 3.5, 3.0, 2.5]);
}

#[test]
fn r3_zb_h2() {
    let sim = sim_uniform(Generator::ZbH2, 4, 8, 1.0, 0.5);
    assert!(close(sim.bubble_rate, 0.0), "{}", sim.bubble_rate);
    assert!(
        close(sim.makespan_bubble_rate, 3.0 / 27.0),
        "{}",
        sim.makespan_bubble_rate
    );
    assert_eq!(peaks(&sim), [7.0, 6.0, 5.0, 4.0]);
    let sim = sim_uniform(Generator::ZbH2, 4, 8, 1.0, 0.0);
    assert_eq!(peaks(&sim), [7.0, 5.0, 3.0, 1.0]);
}

#[test]
fn r4_zb_h2_needs_2p_minus_1_microbatches() {
    let sim = sim_uniform(Generator::ZbH2, 4, 7, 1.0, 0.5);
    assert!(close(sim.bubble_rate, 0.0), "{}", sim.bubble_rate);
    let sim = sim_uniform(Generator::ZbH2, 4, 6, 1.0, 0.5);
    assert!(close(sim.bubble_rate, 1.0 / 19.0), "{}", sim.bubble_rate);
}

#[test]
fn r5_split_backward_shortens_few_microbatch_runs() {
    for (p, m, unsplit, split) in [(4, 2, 15.0, 11.0), (8, 4, 33.0, 23.0)] {
        let a = sim_uniform(Generator::OneFOneB, p, m, 1.0, 0.5);
        let b = sim_uniform(Generator::ZbH1, p, m, 1.0, 0.5);
        assert!(
            close(max_span(&a), unsplit),
            "p={p} m={m}: {}",
            max_span(&a)
        );
        assert!(close(max_span(&b), split), "p={p} m={m}: {}", max_span(&b));
    }
}

#[test]
fn closed_forms_with_unequal_costs() {
    // 1F1B bubble per device (p−1)(T_F+T_B+T_W); ZB-H1 (p−1)(T_F+T_B−T_W).
    let (p, m) = (4usize, 12usize);
    let (tf, tb, tw) = (1.0, 1.5, 0.75);
    for (g, bubble) in [
        (Generator::OneFOneB, (p - 1) as f64 * (tf + tb + tw)),
        (Generator::ZbH1, (p - 1) as f64 * (tf + tb - tw)),
    ] {
        let s = g.generate(p, m).unwrap();
        let sim = s
            .simulate(
                &Costs::uniform(p, tf, tb, tw, 0.0),
                &Memory::uniform(p, 1.0, 0.5),
            )
            .unwrap();
        let work = m as f64 * (tf + tb + tw);
        assert!(
            close(max_span(&sim), work + bubble),
            "{g:?}: {}",
            max_span(&sim)
        );
    }
}

fn lists(rows: &[&[&str]]) -> Vec<Vec<Action>> {
    rows.iter()
        .map(|r| r.iter().map(|s| Action::parse(s).unwrap()).collect())
        .collect()
}

fn check_rejects(rows: &[&[&str]], expected: &str) {
    let err = Schedule::from_lists(lists(rows))
        .and_then(|s| s.validate())
        .unwrap_err();
    assert!(
        err.to_string().contains(expected),
        "expected `{expected}` in `{err}`"
    );
}

#[test]
fn validator_rejects_w_before_b() {
    check_rejects(
        &[
            &["0F0", "0F1", "0B0", "0W0", "0B1", "0W1"],
            &["1F0", "1B0", "1W0", "1F1", "1W1", "1B1"],
        ],
        "device 1, position 4: 1W1 before 1B1",
    );
}

#[test]
fn validator_rejects_b_before_f_and_missing_actions() {
    check_rejects(
        &[&["0B0", "0F0", "0W0"], &["1F0", "1B0", "1W0"]],
        "device 0, position 0: 0B0 before 0F0",
    );
    check_rejects(
        &[
            &["0F0", "0F1", "0B0", "0W0", "0B1"],
            &["1F0", "1B0", "1W0", "1F1", "1B1", "1W1"],
        ],
        "stage 0: 1 W action(s), expected 2: 0W1 is missing",
    );
    check_rejects(
        &[&["0F0", "0BW0", "0W0"], &["1F0", "1BW0"]],
        "device 0, position 2: 0W0 after 0BW0",
    );
}

#[test]
fn validator_rejects_duplicates_and_misplaced_stages() {
    check_rejects(
        &[&["0F0", "0F0", "0BW0"], &["1F0", "1BW0"]],
        "device 0, position 1: 0F0 appears twice",
    );
    check_rejects(
        &[&["0F0", "0BW0", "1F1"], &["1F0", "1BW0", "1BW1"]],
        // Stage 1 runs on two devices, so it reads as replicated (a bidirectional schedule) with
        // microbatch 1 through the replica; 1BW1 is then on the wrong device.
        "device 1, position 2: 1BW1 runs on device 1, but stage 1 is placed on device 0 for microbatch 1",
    );
    let mut s = Generator::OneFOneB.generate(2, 2).unwrap();
    s.placement = vec![0, 0];
    assert_eq!(
        s.validate().unwrap_err().to_string(),
        "device 1, position 0: 1F0 runs on device 1, but stage 1 is placed on device 0"
    );
    let mut s = Generator::OneFOneB.generate(2, 2).unwrap();
    s.microbatches = 1;
    assert!(s
        .validate()
        .unwrap_err()
        .to_string()
        .contains("names microbatch 1, but m = 1"));
}

#[test]
fn validator_rejects_deadlocks_naming_the_waiting_actions() {
    // Device 0 wants the gradient of microbatch 0 before sending the forward of microbatch 1,
    // which device 1 wants first: each waits for the other.
    let err = Schedule::from_lists(lists(&[
        &["0F0", "0BW0", "0F1", "0BW1"],
        &["1F1", "1F0", "1BW0", "1BW1"],
    ]))
    .unwrap()
    .validate()
    .unwrap_err();
    assert!(matches!(err, ScheduleError::Deadlock { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("device 0, position 1: 0BW0 waits for 1B0"),
        "{msg}"
    );
    assert!(
        msg.contains("device 1, position 0: 1F1 waits for 0F1"),
        "{msg}"
    );
}

#[test]
fn validator_rejects_bad_strings_with_their_place() {
    let err = Schedule::from_csv("0F0,0B0,0W0\n1F0,1X0\n").unwrap_err();
    assert!(
        err.to_string()
            .starts_with("device 1, position 1: bad action `1X0`"),
        "{err}"
    );
}

#[test]
fn csv_and_json_round_trip() {
    for g in [
        Generator::GPipe,
        Generator::OneFOneB,
        Generator::Interleaved(2),
        Generator::ZbH1,
        Generator::ZbH2,
        Generator::ZbV,
        Generator::VMin,
        Generator::VHalf,
        Generator::DualPipeV,
        Generator::Hanayo(2),
    ] {
        let s = g.generate(3, 6).unwrap();
        let csv = s.to_csv();
        assert_eq!(Schedule::from_csv(&csv).unwrap(), s, "{g:?}");
        assert_eq!(Schedule::from_csv(&csv).unwrap().to_csv(), csv);
        let json = s.to_json();
        assert_eq!(Schedule::from_json(&json).unwrap(), s, "{g:?}");
    }
}

#[test]
fn pytorch_csv_reads_i_as_input_gradient() {
    let s = Schedule::from_csv("0F0,0I0,0W0\n").unwrap();
    assert_eq!(s.to_csv(), "0F0,0B0,0W0\n");
    s.validate().unwrap();
}

const GENERATORS: [Generator; 13] = [
    Generator::GPipe,
    Generator::OneFOneB,
    Generator::Interleaved(2),
    Generator::Interleaved(3),
    Generator::ZbH1,
    Generator::ZbH2,
    Generator::ZbV,
    Generator::Interleaved(1),
    Generator::VMin,
    Generator::VHalf,
    Generator::DualPipeV,
    Generator::Hanayo(1),
    Generator::Hanayo(2),
];

#[test]
fn every_generator_validates_on_a_grid() {
    for g in GENERATORS {
        for p in 1..=8 {
            for m in 1..=20 {
                let s = match g.generate(p, m) {
                    Ok(s) => s,
                    // DualPipeV's documented requirement; everything else builds for any p, m.
                    Err(ScheduleError::Malformed(msg))
                        if g == Generator::DualPipeV && m < 2 * p =>
                    {
                        assert!(msg.contains("m ≥ 2p"), "{msg}");
                        continue;
                    }
                    Err(e) => panic!("{g:?} p={p} m={m}: {e}"),
                };
                assert_eq!(s.p(), p);
                if let Err(e) = s.validate() {
                    panic!("{g:?} p={p} m={m}: {e}\n{}", s.to_csv());
                }
            }
        }
    }
}

#[test]
fn v_schedules_take_a_devices_share_split_between_chunks() {
    // ZB-V with p = 4, m = 8 and equal costs: each chunk costs half a stage.
    let p = 4;
    let s = Generator::ZbV.generate(p, 8).unwrap();
    let shares = vec![
        cleave_passes::schedule::StageCost {
            f: 1.0,
            b: 1.0,
            w: 1.0
        };
        p
    ];
    let costs = Costs::from_device_shares(&s.placement, &shares, 0.0);
    assert_eq!(costs.stages.len(), 2 * p);
    assert!(costs.stages.iter().all(|c| c.f == 0.5));
    let sim = s
        .simulate(&costs, &Memory::uniform(2 * p, 0.5, 0.25))
        .unwrap();
    for d in &sim.devices {
        assert!(close(d.busy, 24.0));
    }
    assert!(sim.bubble_rate < 0.12, "{}", sim.bubble_rate);
}

fn auto_figures(p: usize, m: usize, limit: f64) -> (Simulation, String) {
    let costs = Costs::uniform(p, 1.0, 1.0, 1.0, 0.0);
    let memory = Memory::uniform(p, 1.0, 0.5);
    let options = AutoOptions {
        memory_limit: Some(limit),
        ilp_max_pm: 0,
        ..AutoOptions::default()
    };
    let (s, report) = auto_schedule(p, m, &costs, &memory, &options).unwrap();
    s.validate().unwrap();
    let sim = s.simulate(&costs, &memory).unwrap();
    for d in &sim.devices {
        assert!(d.peak_memory <= limit + 1e-9);
    }
    (sim, report.chosen)
}

#[test]
fn auto_reaches_zero_bubble_at_2p_mb() {
    for p in 2..=6 {
        for m in (2 * p - 1)..=(2 * p + 6) {
            let (sim, chosen) = auto_figures(p, m, 2.0 * p as f64);
            assert!(
                close(sim.bubble_rate, 0.0),
                "p={p} m={m}: {} ({chosen})",
                sim.bubble_rate
            );
        }
    }
}

#[test]
fn auto_is_never_worse_than_zb_h1_at_p_mb() {
    for p in 1..=6 {
        for m in 1..=16 {
            let (sim, chosen) = auto_figures(p, m, p as f64);
            let h1 = sim_uniform(Generator::ZbH1, p, m, 1.0, 0.5);
            assert!(
                sim.bubble_rate <= h1.bubble_rate + 1e-9,
                "p={p} m={m}: auto {} ({chosen}) vs zb-h1 {}",
                sim.bubble_rate,
                h1.bubble_rate
            );
        }
    }
}

#[test]
fn greedy_alone_is_valid_and_respects_the_limit() {
    let costs_of = |p| Costs::uniform(p, 1.0, 2.0, 1.0, 0.25);
    for p in 1..=6 {
        for m in 1..=12 {
            for bits in 0..8u8 {
                let flags = GreedyFlags {
                    prioritize_f: bits & 1 != 0,
                    strict_warmup: bits & 2 != 0,
                    fill_small_gaps: bits & 4 != 0,
                };
                let memory = Memory::uniform(p, 1.0, 0.5);
                let limit = p as f64;
                let s = greedy(p, m, &costs_of(p), &memory, limit, flags)
                    .unwrap_or_else(|| panic!("p={p} m={m} {flags:?}: stuck"));
                let sim = s.simulate(&costs_of(p), &memory).unwrap();
                for d in &sim.devices {
                    assert!(d.peak_memory <= limit + 1e-9, "p={p} m={m} {flags:?}");
                }
            }
        }
    }
}

#[test]
fn ilp_matches_or_beats_the_heuristics_on_a_tiny_case() {
    let (p, m) = (2, 3);
    let costs = Costs::uniform(p, 1.0, 2.0, 1.0, 0.0);
    let memory = Memory::uniform(p, 1.0, 0.5);
    let options = AutoOptions {
        memory_limit: Some(2.0),
        ilp_max_pm: 6,
        ilp_nodes: 20_000,
        ..AutoOptions::default()
    };
    let (_, report) = auto_schedule(p, m, &costs, &memory, &options).unwrap();
    let ilp = report
        .candidates
        .iter()
        .find(|c| c.0 == "ilp")
        .unwrap_or_else(|| panic!("no ILP candidate: {report:?}"));
    assert!(ilp.3, "the ILP schedule must fit the limit");
    let best_other = report
        .candidates
        .iter()
        .filter(|c| c.0 != "ilp" && c.3)
        .map(|c| c.1)
        .fold(f64::INFINITY, f64::min);
    assert!(ilp.1 <= best_other + 1e-9, "{report:?}");
}

#[test]
fn measured_timings_give_the_simulators_figures() {
    // A simulation's own timings, read back as a "measured" run, give the same figures; a gap
    // inserted on one device shows up as bubble.
    for g in [Generator::OneFOneB, Generator::ZbH1, Generator::ZbV] {
        let sim = sim_uniform(g, 4, 8, 1.0, 0.5);
        let timings: Vec<Vec<(Action, f64, f64)>> = sim
            .devices
            .iter()
            .map(|d| {
                d.actions
                    .iter()
                    .map(|t| (t.action, t.start, t.end))
                    .collect()
            })
            .collect();
        let n = g.generate(4, 8).unwrap().n_stages();
        let back = Simulation::from_timings(&timings, &Memory::uniform(n, 1.0, 0.5));
        assert_eq!(back, sim, "{g:?}");
        let mut delayed = timings.clone();
        for t in &mut delayed[0][1..] {
            t.1 += 5.0;
            t.2 += 5.0;
        }
        let slow = Simulation::from_timings(&delayed, &Memory::uniform(n, 1.0, 0.5));
        assert!(slow.bubble_rate > sim.bubble_rate + 0.05, "{g:?}");
    }
}
