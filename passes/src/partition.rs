//! `partition`: cut a forward function into pipeline stages that balance a cost model.
//!
//! # Cost model
//!
//! A [`DeviceProfile`] gives a device's rates (matmul FLOP/s, other FLOP/s, memory bytes/s, host
//! link bytes/s) and memory size; profiles are small `key = value` text files
//! (`examples/profiles/`: one measured on the development CPU, one for an H100 from its published
//! peaks) and the built-in names `cpu-epyc-2core` and `h100-sxm`. The time of a forward node is
//! `max(matmul/matmul_rate + other/other_rate, bytes touched/memory_rate)`; its training cost
//! counts the backward too: matrix products and convolutions cost 3× their forward (one forward
//! product, two backward products), every other op 2×. FLOPs come from `cleave_ir::cost`.
//!
//! # The cut
//!
//! Stages are contiguous runs of the forward nodes in body order (a topological order, so every
//! value flows to the same or a later stage, which the verifier requires). The pass minimises the
//! largest stage cost exactly over such cuts (binary search on the bottleneck with a greedy
//! feasibility test, O(n log(total))). Embedding and LM-head stages are handled by the same
//! costs: a heavy head simply ends up in a shorter stage. Each stage's parameters must fit the
//! device's memory (`memory_bytes`); a stage that does not fit is an error naming it. Argument
//! and constant nodes stay unstaged: every stage that reads them gets them.
//!
//! Entry: a verified forward function (not yet differentiated). Exit: the same function with a
//! `stage(k)` on every compute node, `k` in `0..stages`; `autodiff` then gives every backward node
//! the stage of the forward node it differentiates.

use cleave_ir::cost::node_flops;
use cleave_ir::{Function, Module, Op};

use crate::pass::{Pass, PassContext, PassError, PassOptions};

/// Rates and capacity of one device.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceProfile {
    /// A short name.
    pub name: String,
    /// FLOP/s of matrix products and convolutions.
    pub matmul_flops_per_s: f64,
    /// FLOP/s of everything else.
    pub other_flops_per_s: f64,
    /// Device memory bandwidth, bytes/s.
    pub memory_bytes_per_s: f64,
    /// Host link bandwidth (offload), bytes/s.
    pub host_bytes_per_s: f64,
    /// Device memory, bytes.
    pub memory_bytes: f64,
}

const BUILTIN: [(&str, &str); 2] = [
    (
        "cpu-epyc-2core",
        include_str!("../../examples/profiles/cpu-epyc-2core.profile"),
    ),
    (
        "h100-sxm",
        include_str!("../../examples/profiles/h100-sxm.profile"),
    ),
];

impl DeviceProfile {
    /// Parses the `key = value` profile format (`#` starts a comment). Every key is required.
    pub fn parse(text: &str, origin: &str) -> Result<Self, String> {
        let mut name = None;
        let mut nums = std::collections::BTreeMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let Some((k, v)) = line.split_once('=') else {
                return Err(format!(
                    "{origin}:{}: expected `key = value`, found `{line}`",
                    i + 1
                ));
            };
            let (k, v) = (k.trim(), v.trim());
            if k == "name" {
                name = Some(v.to_string());
                continue;
            }
            let x: f64 = v
                .parse()
                .map_err(|_| format!("{origin}:{}: `{k}` needs a number, found `{v}`", i + 1))?;
            if !(x.is_finite() && x > 0.0) {
                return Err(format!(
                    "{origin}:{}: `{k}` must be positive, found `{v}`",
                    i + 1
                ));
            }
            nums.insert(k.to_string(), x);
        }
        let mut get = |k: &str| {
            nums.remove(k)
                .ok_or_else(|| format!("{origin}: missing `{k}`"))
        };
        let profile = DeviceProfile {
            name: name.ok_or_else(|| format!("{origin}: missing `name`"))?,
            matmul_flops_per_s: get("matmul_flops_per_s")?,
            other_flops_per_s: get("other_flops_per_s")?,
            memory_bytes_per_s: get("memory_bytes_per_s")?,
            host_bytes_per_s: get("host_bytes_per_s")?,
            memory_bytes: get("memory_bytes")?,
        };
        if let Some(k) = nums.keys().next() {
            return Err(format!("{origin}: unknown key `{k}`"));
        }
        Ok(profile)
    }

    /// A built-in profile by name, or a profile file by path.
    pub fn load(name_or_path: &str) -> Result<Self, String> {
        if let Some((_, text)) = BUILTIN.iter().find(|(n, _)| *n == name_or_path) {
            return Self::parse(text, name_or_path);
        }
        let text = std::fs::read_to_string(name_or_path).map_err(|e| {
            format!(
                "no built-in profile `{name_or_path}` (built-ins: {}) and cannot read it as a file: {e}",
                BUILTIN.map(|(n, _)| n).join(", ")
            )
        })?;
        Self::parse(&text, name_or_path)
    }

    /// Seconds to run one node forward and backward (see the module docs).
    pub fn node_training_seconds(&self, func: &Function, node: cleave_ir::Node) -> f64 {
        let f = node_flops(func, node);
        let data = func.node(node);
        let bytes: usize = data
            .operands
            .iter()
            .chain(&data.results)
            .map(|&v| func.ty(v).size_bytes())
            .sum();
        let compute =
            f.matmul as f64 / self.matmul_flops_per_s + f.other as f64 / self.other_flops_per_s;
        let forward = compute.max(bytes as f64 / self.memory_bytes_per_s);
        let factor = if f.matmul > 0 { 3.0 } else { 2.0 };
        forward * factor
    }
}

/// The `partition` pass.
#[derive(Clone, Debug)]
pub struct Partition {
    /// Number of stages.
    pub stages: u32,
    /// The device every stage runs on.
    pub profile: DeviceProfile,
}

impl Partition {
    /// Builds the pass from options `stages` (required) and `profile` (name or file; default
    /// `cpu-epyc-2core`).
    pub fn from_options(mut o: PassOptions) -> Result<Self, PassError> {
        let stages: u32 = o.take_parsed("stages", 0)?;
        if stages == 0 {
            return Err(PassError::BadOption {
                pass: "partition".into(),
                key: "stages".into(),
                message: "give the number of stages, e.g. `partition{stages=4}`".into(),
            });
        }
        let name = o.take("profile").unwrap_or_else(|| "cpu-epyc-2core".into());
        let profile = DeviceProfile::load(&name).map_err(|message| PassError::BadOption {
            pass: "partition".into(),
            key: "profile".into(),
            message,
        })?;
        o.finish()?;
        Ok(Partition { stages, profile })
    }
}

impl Pass for Partition {
    fn name(&self) -> &'static str {
        "partition"
    }

    fn run(&self, module: &mut Module, _ctx: &mut PassContext) -> Result<(), PassError> {
        for func in &mut module.functions {
            partition_function(func, self.stages, &self.profile).map_err(|message| {
                PassError::Failed {
                    pass: "partition",
                    message,
                }
            })?;
        }
        Ok(())
    }
}

fn is_compute(op: &Op) -> bool {
    op.arg_role().is_none() && !matches!(op, Op::Constant { .. } | Op::Iota { .. })
}

/// Splits `costs` (in order) into at most `parts` contiguous runs minimising the largest run's
/// sum; returns the index where each run starts.
pub fn balanced_cuts(costs: &[f64], parts: usize) -> Vec<usize> {
    let fits = |limit: f64| -> Option<Vec<usize>> {
        let mut starts = vec![0];
        let mut acc = 0.0;
        for (i, &c) in costs.iter().enumerate() {
            if c > limit {
                return None;
            }
            if acc + c > limit {
                starts.push(i);
                acc = 0.0;
                if starts.len() > parts {
                    return None;
                }
            }
            acc += c;
        }
        Some(starts)
    };
    let total: f64 = costs.iter().sum();
    let max = costs.iter().cloned().fold(0.0, f64::max);
    let (mut lo, mut hi) = (max.max(total / parts as f64), total.max(max));
    let mut best = fits(hi).unwrap_or_else(|| vec![0]);
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        match fits(mid) {
            Some(s) => {
                best = s;
                hi = mid;
            }
            None => lo = mid,
        }
        if hi - lo <= 1e-12 * total.max(1e-30) {
            break;
        }
    }
    best
}

/// Annotates the compute nodes of a forward function with stages (see the module docs).
pub fn partition_function(
    func: &mut Function,
    stages: u32,
    profile: &DeviceProfile,
) -> Result<(), String> {
    if func.body.iter().any(|&n| func.nodes[n].phase.is_backward()) {
        return Err(format!(
            "@{}: partition a forward function, before `autodiff`",
            func.name
        ));
    }
    let compute: Vec<_> = func
        .body
        .iter()
        .copied()
        .filter(|&n| is_compute(&func.nodes[n].op))
        .collect();
    if compute.len() < stages as usize {
        return Err(format!(
            "@{}: {} compute nodes cannot fill {stages} stages",
            func.name,
            compute.len()
        ));
    }
    let costs: Vec<f64> = compute
        .iter()
        .map(|&n| profile.node_training_seconds(func, n))
        .collect();
    let mut starts = balanced_cuts(&costs, stages as usize);
    // Use every stage: split the largest runs further if the balance left some empty.
    while starts.len() < stages as usize {
        let bounds: Vec<(usize, usize)> = starts
            .iter()
            .enumerate()
            .map(|(i, &s)| (s, starts.get(i + 1).copied().unwrap_or(compute.len())))
            .collect();
        let (s, e) = *bounds.iter().max_by_key(|(s, e)| e - s).expect("a run");
        if e - s < 2 {
            break;
        }
        starts.push(s + (e - s) / 2);
        starts.sort_unstable();
    }
    for (i, &n) in compute.iter().enumerate() {
        let stage = starts.iter().rposition(|&s| s <= i).unwrap_or(0) as u32;
        func.nodes[n].stage = Some(stage);
    }
    // Memory: each stage's parameters must fit its device.
    let mut param_bytes = vec![0usize; stages as usize];
    for arg in func.params() {
        let mut used_by = std::collections::BTreeSet::new();
        for &n in &func.body {
            if func.nodes[n].operands.contains(&arg.value) {
                if let Some(s) = func.nodes[n].stage {
                    used_by.insert(s);
                }
            }
        }
        for s in used_by {
            param_bytes[s as usize] += arg.ty.size_bytes();
        }
    }
    for (s, &b) in param_bytes.iter().enumerate() {
        if b as f64 > profile.memory_bytes {
            return Err(format!(
                "@{}: stage {s} needs {b} bytes of parameters, more than the {} bytes of `{}`",
                func.name, profile.memory_bytes, profile.name
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balanced_cuts_minimise_the_bottleneck() {
        assert_eq!(balanced_cuts(&[1.0, 1.0, 1.0, 1.0], 2), vec![0, 2]);
        assert_eq!(
            balanced_cuts(&[5.0, 1.0, 1.0, 1.0, 1.0, 1.0], 2),
            vec![0, 1]
        );
        assert_eq!(balanced_cuts(&[1.0, 2.0, 3.0, 4.0, 5.0], 3), vec![0, 3, 4]);
    }

    #[test]
    fn builtin_profiles_parse_and_bad_ones_are_located() {
        let p = DeviceProfile::load("h100-sxm").unwrap();
        assert_eq!(p.matmul_flops_per_s, 494.7e12);
        assert!(DeviceProfile::load("cpu-epyc-2core").is_ok());
        let e =
            DeviceProfile::parse("name = x\nmatmul_flops_per_s = fast\n", "p.profile").unwrap_err();
        assert_eq!(
            e,
            "p.profile:2: `matmul_flops_per_s` needs a number, found `fast`"
        );
        let e = DeviceProfile::load("nonexistent-device").unwrap_err();
        assert!(e.contains("built-ins: cpu-epyc-2core, h100-sxm"), "{e}");
    }
}
