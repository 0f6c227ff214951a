//! SVG pictures of a simulated schedule, like the Zero Bubble paper's figures: one row per
//! device, a box per action coloured by kind (F, B, W, BW) and numbered by microbatch, idle time
//! left blank; below, each device's activation memory over time as a step line.

use std::fmt::Write;

use super::action::ActionKind;
use super::simulate::Simulation;

const ROW: f64 = 28.0;
const LEFT: f64 = 80.0;
const WIDTH: f64 = 1200.0;
const MEM_ROW: f64 = 48.0;

fn fill(kind: ActionKind) -> &'static str {
    match kind {
        ActionKind::F => "#8ab4f8",
        ActionKind::B => "#81c995",
        ActionKind::W => "#c58af9",
        ActionKind::BW => "#fdd663",
        _ => "#dadce0",
    }
}

/// Renders the timeline and memory picture of a simulation.
pub fn render(sim: &Simulation, title: &str) -> String {
    let p = sim.devices.len();
    let t0 = sim
        .devices
        .iter()
        .filter_map(|d| d.actions.first().map(|a| a.start))
        .fold(f64::INFINITY, f64::min);
    let t0 = if t0.is_finite() { t0 } else { 0.0 };
    let span = sim.makespan.max(1e-12);
    let x = |t: f64| LEFT + (t - t0) / span * WIDTH;
    let timeline_h = 40.0 + p as f64 * ROW;
    let height = timeline_h + 30.0 + p as f64 * MEM_ROW + 20.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{height}" font-family="monospace" font-size="11">"#,
        LEFT + WIDTH + 20.0
    );
    let _ = writeln!(
        out,
        r#"<rect width="100%" height="100%" fill="white"/><text x="4" y="16" font-size="13">{} — makespan {:.4}, bubble {:.4} (makespan {:.4})</text>"#,
        escape(title),
        sim.makespan,
        sim.bubble_rate,
        sim.makespan_bubble_rate
    );
    for (d, run) in sim.devices.iter().enumerate() {
        let y = 30.0 + d as f64 * ROW;
        let _ = writeln!(
            out,
            r##"<text x="4" y="{:.1}">device {d}</text><rect x="{LEFT}" y="{y:.1}" width="{WIDTH}" height="{:.1}" fill="#f1f3f4"/>"##,
            y + ROW * 0.6,
            ROW - 4.0
        );
        for a in run.actions.iter().filter(|a| a.end > a.start) {
            let (x0, x1) = (x(a.start), x(a.end));
            let _ = writeln!(
                out,
                r#"<g><title>{} [{:.4}, {:.4}]</title><rect x="{x0:.2}" y="{y:.1}" width="{:.2}" height="{:.1}" fill="{}" stroke="black" stroke-width="0.4"/>"#,
                a.action,
                a.start,
                a.end,
                (x1 - x0).max(0.5),
                ROW - 4.0,
                fill(a.action.kind)
            );
            if x1 - x0 >= 12.0 {
                let _ = write!(
                    out,
                    r#"<text x="{:.2}" y="{:.1}" text-anchor="middle">{}</text>"#,
                    (x0 + x1) / 2.0,
                    y + ROW * 0.6,
                    a.action.microbatch
                );
            }
            let _ = writeln!(out, "</g>");
        }
    }
    let peak = sim
        .devices
        .iter()
        .map(|d| d.peak_memory)
        .fold(0.0f64, f64::max)
        .max(1e-12);
    let _ = writeln!(
        out,
        r#"<text x="4" y="{:.1}">activation memory (peak {peak:.4})</text>"#,
        timeline_h + 16.0
    );
    for (d, run) in sim.devices.iter().enumerate() {
        let base = timeline_h + 30.0 + (d + 1) as f64 * MEM_ROW - 6.0;
        let y = |mem: f64| base - mem / peak * (MEM_ROW - 10.0);
        let mut points = format!("{:.2},{:.2}", x(t0), y(0.0));
        let mut level = 0.0;
        for a in &run.actions {
            let _ = write!(points, " {:.2},{:.2}", x(a.end), y(level));
            level = a.memory;
            let _ = write!(points, " {:.2},{:.2}", x(a.end), y(level));
        }
        let _ = writeln!(
            out,
            r##"<text x="4" y="{base:.1}">device {d}</text><polyline points="{points}" fill="none" stroke="#1a73e8" stroke-width="1"/>"##
        );
    }
    let _ = writeln!(out, "</svg>");
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
