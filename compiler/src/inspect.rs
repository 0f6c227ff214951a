//! `cleave inspect`: parameters, FLOPs per function and phase, activation bytes.

use std::collections::BTreeMap;
use std::fmt::Write;

use cleave_ir::cost::function_cost;
use cleave_ir::{Module, Phase};
use serde::Serialize;

/// FLOPs split into matrix products (2·M·N·K per product, batch included; convolutions count
/// here too) and everything else.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FlopSplit {
    /// FLOPs of matrix products and convolutions.
    pub matmul: u64,
    /// FLOPs of every other op (see `cleave_ir::cost` for the per-op table).
    pub other: u64,
}

/// Parameter totals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ParamSummary {
    /// Number of scalar parameters.
    pub count: u64,
    /// Their size in bytes.
    pub bytes: u64,
}

/// The report of one function.
#[derive(Clone, Debug, Serialize)]
pub struct FunctionReport {
    /// Function name.
    pub name: String,
    /// Number of live nodes.
    pub nodes: usize,
    /// Parameters the function takes.
    pub parameters: ParamSummary,
    /// FLOPs per phase.
    pub flops: BTreeMap<String, FlopSplit>,
    /// Bytes of all forward-phase results (what a training step would keep without
    /// recomputation), arguments and constants excluded.
    pub activation_bytes: u64,
}

/// The report of a module: per-function figures and module totals. Parameters shared by several
/// functions (the same name) are counted once.
#[derive(Clone, Debug, Serialize)]
pub struct InspectReport {
    /// Distinct parameters of the module.
    pub parameters: ParamSummary,
    /// FLOPs per phase, summed over functions.
    pub flops: BTreeMap<String, FlopSplit>,
    /// Activation bytes, summed over functions.
    pub activation_bytes: u64,
    /// Per-function figures.
    pub functions: Vec<FunctionReport>,
    /// Per pipeline stage of a split module (`inspect --split`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stages: Option<Vec<StageReport>>,
    /// The gradient method of `inspect --grad-method`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_method: Option<String>,
    /// With `--grad-method`: the bytes stashed per microbatch for the backward, summed over
    /// stages (`F_to_B + F_to_W + B_to_W`); 0 for `forward-gradient`, which has no backward.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stash_bytes: Option<u64>,
}

/// FLOPs of the three functions of a stage.
#[derive(Clone, Debug, Serialize)]
#[allow(non_snake_case)]
pub struct PartFlops {
    /// Forward.
    pub F: FlopSplit,
    /// Input gradient.
    pub B: FlopSplit,
    /// Weight gradient.
    pub W: FlopSplit,
}

/// Stash sets of a stage, in bytes.
#[derive(Clone, Debug, Serialize)]
#[allow(non_snake_case)]
pub struct StashReport {
    /// F values read by B only.
    pub F_to_B: u64,
    /// F values read by W.
    pub F_to_W: u64,
    /// B values read by W.
    pub B_to_W: u64,
}

/// One pipeline stage of a split module.
#[derive(Clone, Debug, Serialize)]
pub struct StageReport {
    /// The split function's base name.
    pub function: String,
    /// Stage number.
    pub stage: u32,
    /// FLOPs of F, B and W.
    pub flops: PartFlops,
    /// Stash sets.
    pub stash_bytes: StashReport,
    /// Bytes held per microbatch after F (`F_to_B + F_to_W`).
    pub m_b_bytes: u64,
    /// Bytes held per microbatch between B and W (`F_to_W + B_to_W`).
    pub m_w_bytes: u64,
    /// FLOPs on the critical path through this stage (F + B, all classes).
    pub critical_path_flops: u64,
}

fn flops_of(func: &cleave_ir::Function) -> FlopSplit {
    let total = function_cost(func).total();
    FlopSplit {
        matmul: total.matmul,
        other: total.other,
    }
}

/// The per-stage report of a split module (empty if the module is not split).
pub fn split_report(module: &Module) -> Vec<StageReport> {
    cleave_passes::split::split_stages(module)
        .iter()
        .map(|st| {
            let stash = cleave_passes::split::stash_report(st);
            let (f, b, w) = (flops_of(st.f), flops_of(st.b), flops_of(st.w));
            StageReport {
                function: st.base.clone(),
                stage: st.stage,
                flops: PartFlops { F: f, B: b, W: w },
                stash_bytes: StashReport {
                    F_to_B: stash.f_to_b,
                    F_to_W: stash.f_to_w,
                    B_to_W: stash.b_to_w,
                },
                m_b_bytes: stash.m_b(),
                m_w_bytes: stash.m_w(),
                critical_path_flops: f.matmul + f.other + b.matmul + b.other,
            }
        })
        .collect()
}

/// Renders the per-stage table of a split module.
pub fn render_split_table(stages: &[StageReport]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n{:<16} {:>5} {:>20} {:>20} {:>20} {:>14} {:>14} {:>14}",
        "function",
        "stage",
        "F matmul FLOPs",
        "B matmul FLOPs",
        "W matmul FLOPs",
        "F->B bytes",
        "F->W bytes",
        "B->W bytes"
    );
    for s in stages {
        let _ = writeln!(
            out,
            "{:<16} {:>5} {:>20} {:>20} {:>20} {:>14} {:>14} {:>14}",
            s.function,
            s.stage,
            group_digits(s.flops.F.matmul),
            group_digits(s.flops.B.matmul),
            group_digits(s.flops.W.matmul),
            group_digits(s.stash_bytes.F_to_B),
            group_digits(s.stash_bytes.F_to_W),
            group_digits(s.stash_bytes.B_to_W),
        );
    }
    out
}

/// Computes the report of a module.
pub fn inspect(module: &Module) -> InspectReport {
    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
    let mut seen_bytes: BTreeMap<String, u64> = BTreeMap::new();
    let mut total_flops: BTreeMap<String, FlopSplit> = BTreeMap::new();
    let mut activation_bytes = 0;
    let mut functions = Vec::new();
    for func in &module.functions {
        let cost = function_cost(func);
        let mut params = ParamSummary::default();
        for arg in func.params() {
            let count = arg.ty.num_elements() as u64;
            let bytes = arg.ty.size_bytes() as u64;
            params.count += count;
            params.bytes += bytes;
            seen.insert(arg.name.to_string(), count);
            seen_bytes.insert(arg.name.to_string(), bytes);
        }
        let mut flops = BTreeMap::new();
        for phase in Phase::ALL {
            if let Some(f) = cost.by_phase.get(&phase) {
                let split = FlopSplit {
                    matmul: f.matmul,
                    other: f.other,
                };
                flops.insert(phase.name().to_string(), split);
                let t = total_flops.entry(phase.name().to_string()).or_default();
                t.matmul += split.matmul;
                t.other += split.other;
            }
        }
        activation_bytes += cost.activation_bytes;
        functions.push(FunctionReport {
            name: func.name.clone(),
            nodes: func.body.len(),
            parameters: params,
            flops,
            activation_bytes: cost.activation_bytes,
        });
    }
    InspectReport {
        parameters: ParamSummary {
            count: seen.values().sum(),
            bytes: seen_bytes.values().sum(),
        },
        flops: total_flops,
        activation_bytes,
        grad_method: None,
        stash_bytes: None,
        functions,
        stages: None,
    }
}

/// Formats an integer with thousands separators: `429,496,729,600`.
pub fn group_digits(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Formats a byte count with a binary unit: `1.03 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = n as f64;
    let mut unit = 0;
    while x >= 1024.0 && unit + 1 < UNITS.len() {
        x /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{x:.2} {}", UNITS[unit])
    }
}

/// Renders the report as the human-readable table.
pub fn render_table(report: &InspectReport) -> String {
    let mut out = String::new();
    let p = &report.parameters;
    let _ = writeln!(
        out,
        "parameters: {} ({} bytes, {})",
        group_digits(p.count),
        group_digits(p.bytes),
        human_bytes(p.bytes)
    );
    let rows = |out: &mut String, flops: &BTreeMap<String, FlopSplit>| {
        let _ = writeln!(
            out,
            "  {:<10} {:>22} {:>22} {:>22}",
            "phase", "matmul FLOPs", "other FLOPs", "total FLOPs"
        );
        for phase in Phase::ALL {
            if let Some(f) = flops.get(phase.name()) {
                let _ = writeln!(
                    out,
                    "  {:<10} {:>22} {:>22} {:>22}",
                    phase.name(),
                    group_digits(f.matmul),
                    group_digits(f.other),
                    group_digits(f.matmul + f.other)
                );
            }
        }
    };
    for f in &report.functions {
        let _ = writeln!(
            out,
            "\nfunction @{}: {} nodes, {} parameters ({}), activations {} ({} bytes)",
            f.name,
            f.nodes,
            group_digits(f.parameters.count),
            human_bytes(f.parameters.bytes),
            human_bytes(f.activation_bytes),
            group_digits(f.activation_bytes)
        );
        rows(&mut out, &f.flops);
    }
    if report.functions.len() > 1 {
        let _ = writeln!(out, "\nmodule total:");
        rows(&mut out, &report.flops);
    }
    out
}
