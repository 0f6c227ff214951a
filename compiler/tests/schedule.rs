//! `cleave schedule`: the reference cases R1–R5 through `--json`, files written, errors.

use std::process::{Command, Output};

use serde_json::Value;

fn cleave(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cleave"))
        .args(args)
        .output()
        .expect("run cleave")
}

fn schedule_json(name: &str, p: usize, m: usize, memory: &str) -> Value {
    schedule_json_with(name, p, m, memory, &[])
}

/// `schedule_json` with more arguments (e.g. `--memory-limit`).
fn schedule_json_with(name: &str, p: usize, m: usize, memory: &str, extra: &[&str]) -> Value {
    let (p, m) = (p.to_string(), m.to_string());
    let mut args = vec![
        "schedule",
        "--stages",
        &p,
        "--microbatches",
        &m,
        "--schedule",
        name,
        "--costs",
        "1,1,1,0",
        "--memory",
        memory,
        "--json",
    ];
    args.extend(extra);
    let o = cleave(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("JSON")
}

fn f(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("no {key} in {v}"))
}

fn per_device(v: &Value, key: &str) -> Vec<f64> {
    v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s[key].as_f64().unwrap())
        .collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[test]
fn r1_to_r3() {
    let v = schedule_json("1f1b", 4, 8, "1,0.5");
    assert!(close(f(&v, "bubble_rate"), 3.0 / 11.0));
    assert!(close(f(&v, "makespan_bubble_rate"), 3.0 / 11.0));
    assert_eq!(per_device(&v, "peak_memory"), [4.0, 3.0, 2.0, 1.0]);
    assert_eq!(v["actions"][0][0], "0F0");
    assert_eq!(v["actions"].as_array().unwrap().len(), 4);

    let v = schedule_json("zb-h1", 4, 8, "1,0.5");
    assert!(close(f(&v, "bubble_rate"), 3.0 / 27.0));
    assert_eq!(per_device(&v, "peak_memory"), [4.0, 3.5, 3.0, 2.5]);

    let v = schedule_json("zb-h2", 4, 8, "1,0.5");
    assert!(close(f(&v, "bubble_rate"), 0.0));
    assert!(close(f(&v, "makespan_bubble_rate"), 3.0 / 27.0));
    assert_eq!(per_device(&v, "peak_memory"), [7.0, 6.0, 5.0, 4.0]);
    let v = schedule_json("zb-h2", 4, 8, "1,0");
    assert_eq!(per_device(&v, "peak_memory"), [7.0, 5.0, 3.0, 1.0]);
}

#[test]
fn r4_and_r5() {
    assert!(close(
        f(&schedule_json("zb-h2", 4, 7, "1,0.5"), "bubble_rate"),
        0.0
    ));
    assert!(close(
        f(&schedule_json("zb-h2", 4, 6, "1,0.5"), "bubble_rate"),
        1.0 / 19.0
    ));
    let span = |v: &Value| per_device(v, "span").into_iter().fold(0.0, f64::max);
    for (p, m, unsplit, split) in [(4, 2, 15.0, 11.0), (8, 4, 33.0, 23.0)] {
        assert!(close(span(&schedule_json("1f1b", p, m, "1,0.5")), unsplit));
        assert!(close(span(&schedule_json("zb-h1", p, m, "1,0.5")), split));
    }
}

#[test]
fn auto_meets_the_memory_limit_and_writes_files() {
    let dir = std::env::temp_dir().join(format!("cleave-schedule-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (svg, csv) = (dir.join("t.svg"), dir.join("t.csv"));
    let o = cleave(&[
        "schedule",
        "--stages",
        "4",
        "--microbatches",
        "8",
        "--schedule",
        "auto",
        "--costs",
        "1,1,1",
        "--memory",
        "1,0.5",
        "--memory-limit",
        "8",
        "--json",
        "--svg",
        svg.to_str().unwrap(),
        "--csv",
        csv.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(close(f(&v, "bubble_rate"), 0.0));
    assert!(per_device(&v, "peak_memory").iter().all(|&x| x <= 8.0));
    assert!(v["auto"]["chosen"].is_string());
    let svg_text = std::fs::read_to_string(&svg).unwrap();
    assert!(svg_text.starts_with("<svg") && svg_text.trim_end().ends_with("</svg>"));
    let csv_text = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(csv_text.lines().count(), 4);
    let rows: Vec<Vec<String>> = serde_json::from_value(v["actions"].clone()).unwrap();
    assert_eq!(csv_text.lines().next().unwrap(), rows[0].join(","));
}

#[test]
fn model_costs_come_from_the_split() {
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/mlp.cir");
    let o = cleave(&[
        "schedule",
        "--stages",
        "2",
        "--microbatches",
        "4",
        "--schedule",
        "1f1b",
        "--model",
        model,
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    // The forward model is partitioned into two stages first. Their shares differ, so the
    // bubble is at least 1F1B's equal-cost closed form (p−1)/(m+p−1) = 1/5.
    let bubble = f(&v, "bubble_rate");
    assert!((1.0 / 5.0 - 1e-9..1.0).contains(&bubble), "{v}");
    let peaks = per_device(&v, "peak_memory");
    assert_eq!(peaks.len(), 2);
    // The first stage holds more microbatches in flight under 1F1B.
    assert!(peaks[0] > peaks[1] && peaks[1] > 0.0, "{peaks:?}");
}

#[test]
fn bad_arguments_are_rejected() {
    let o = cleave(&[
        "schedule",
        "--stages",
        "4",
        "--microbatches",
        "8",
        "--schedule",
        "zb-h3",
        "--costs",
        "1,1,1",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("valid schedules"));
    let o = cleave(&[
        "schedule",
        "--stages",
        "4",
        "--microbatches",
        "8",
        "--schedule",
        "1f1b",
        "--costs",
        "1,1",
    ]);
    assert!(!o.status.success());
    let o = cleave(&[
        "schedule",
        "--stages",
        "4",
        "--microbatches",
        "8",
        "--schedule",
        "1f1b",
    ]);
    assert!(!o.status.success());
}

/// `auto` judges the fixed schedules with several chunks per device beside its own: with
/// M_W = M_B and T_F = T_B = T_W at P=4, M=8, a limit of 2 microbatches is V-Min's (bubble 5.5
/// of 29.5), 3 is V-Half's (2.5 of 26.5), 4 is ZB-V's (no bubble by the paper's definition).
#[test]
fn auto_picks_the_controllable_memory_v_schedules_under_tight_limits() {
    for (limit, name, bubble) in [
        ("2", "v-min", 5.5 / 29.5),
        ("3", "v-half", 2.5 / 26.5),
        ("4", "zb-v", 0.0),
    ] {
        let v = schedule_json_with("auto", 4, 8, "1,1", &["--memory-limit", limit]);
        assert_eq!(v["auto"]["chosen"], name, "limit {limit}");
        assert!(close(f(&v, "bubble_rate"), bubble), "limit {limit}: {v}");
        let cap: f64 = limit.parse().unwrap();
        assert!(per_device(&v, "peak_memory")
            .iter()
            .all(|&x| x <= cap + 1e-9));
    }
}
