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
//! costs: a heavy head simply ends up in a shorter stage.
//!
//! **What is balanced** (`balance=`): `estimate` (the default) weighs each forward node by the
//! 3×/2× rule above. `split` weighs it by its F + B + W seconds in the differentiated program
//! ([`split_node_seconds`]: the function is differentiated once with every compute node as its
//! own stage, so each backward node names the forward node it belongs to). The two differ where
//! a backward is not 2× or 3× its forward: an embedding gather's scatter-add, the loss and its
//! gradient, softmax and norms (whose backward reads more than their forward), and the
//! parameter-gradient reductions of biases. With `split` the stages' F + B + W after `split-bw`
//! are what the cut balanced (BENCHMARKS.md, "Stage balance"). Each stage's parameters must fit the
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

/// What the cut balances (the pass option `balance`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Balance {
    /// Each forward node's training time estimated from its forward alone: 3× for matrix
    /// products and convolutions, 2× for everything else (`balance=estimate`).
    #[default]
    Estimate,
    /// Each forward node's F + B + W time in the differentiated program: the node itself, and
    /// the dgrad and wgrad nodes that `autodiff` emits for it (`balance=split`). This is what
    /// the stages' F, B and W functions will cost after `split-bw`, so heads whose backward is
    /// not 2× their forward (embedding scatter-adds, the loss, reductions) weigh what they cost.
    Split,
}

impl std::str::FromStr for Balance {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "estimate" => Ok(Balance::Estimate),
            "split" => Ok(Balance::Split),
            _ => Err("expected `estimate` or `split`".into()),
        }
    }
}

impl Balance {
    /// The option's spelling.
    pub fn name(self) -> &'static str {
        match self {
            Balance::Estimate => "estimate",
            Balance::Split => "split",
        }
    }
}

/// The `partition` pass.
#[derive(Clone, Debug)]
pub struct Partition {
    /// Number of stages.
    pub stages: u32,
    /// The device every stage runs on.
    pub profile: DeviceProfile,
    /// What the cut balances.
    pub balance: Balance,
    /// Leave the output layer ([`output_layer_start`]) out of the balance: its work is spread
    /// over every device (vocabulary parallelism), so the other nodes are cut as if it weighed
    /// nothing. In the IR it stays on the last stage; the planner moves its cost.
    pub vocab_parallel: bool,
}

impl Partition {
    /// Builds the pass from options `stages` (required), `profile` (name or file; default
    /// `cpu-epyc-2core`) and `balance` (`estimate`, the default, or `split`).
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
        let balance = o.take_parsed("balance", Balance::Estimate)?;
        let vocab_parallel = o.take_parsed("vocab-parallel", false)?;
        o.finish()?;
        Ok(Partition {
            stages,
            profile,
            balance,
            vocab_parallel,
        })
    }
}

impl Pass for Partition {
    fn name(&self) -> &'static str {
        "partition"
    }

    fn run(&self, module: &mut Module, _ctx: &mut PassContext) -> Result<(), PassError> {
        for func in &mut module.functions {
            let cut = Cut {
                balance: self.balance,
                vocab_parallel: self.vocab_parallel,
            };
            partition_function_by(func, self.stages, &self.profile, cut).map_err(|message| {
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

/// Annotates the compute nodes of a forward function with stages (see the module docs),
/// balancing the estimated training time.
pub fn partition_function(
    func: &mut Function,
    stages: u32,
    profile: &DeviceProfile,
) -> Result<(), String> {
    partition_function_by(func, stages, profile, Cut::default())
}

/// How [`partition_function_by`] cuts: what it balances and whether the output layer is left out
/// of the balance.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cut {
    /// What the cut balances.
    pub balance: Balance,
    /// See [`Partition::vocab_parallel`].
    pub vocab_parallel: bool,
}

/// Where the output layer starts among `compute` (a forward function's compute nodes in body
/// order): at the last matrix product that reads a parameter (a language model's head over the
/// vocabulary, a classifier's last linear layer); the layer is that product and every compute
/// node after it (the loss). `None` when no product reads a parameter.
pub fn output_layer_start(func: &Function, compute: &[cleave_ir::Node]) -> Option<usize> {
    compute.iter().rposition(|&n| {
        let d = &func.nodes[n];
        node_flops(func, n).matmul > 0
            && d.operands
                .iter()
                .any(|&v| matches!(func.nodes[func.values[v].def].op, Op::Param { .. }))
    })
}

/// The compute nodes of a forward function, in body order (what [`partition_function`] cuts).
pub fn compute_nodes(func: &Function) -> Vec<cleave_ir::Node> {
    func.body
        .iter()
        .copied()
        .filter(|&n| is_compute(&func.nodes[n].op))
        .collect()
}

/// The F + B + W seconds of each compute node of a forward function (in `compute`'s order) in
/// its differentiated program: the function is differentiated with every compute node as its
/// own stage, so `autodiff` labels each backward node with the forward node it belongs to.
/// Views (`reshape`, `stop_gradient`) cost nothing, as in the stages' cost model.
pub fn split_node_seconds(
    func: &Function,
    compute: &[cleave_ir::Node],
    profile: &DeviceProfile,
) -> Result<Vec<(f64, f64, f64)>, String> {
    let mut labelled = func.clone();
    for (i, &n) in compute.iter().enumerate() {
        labelled.nodes[n].stage = Some(i as u32);
    }
    let (grad, _) = crate::autodiff::differentiate(labelled, crate::autodiff::Mode::Auto, &[])
        .map_err(|e| format!("@{}: balance=split needs the gradient: {e}", func.name))?;
    let mut out = vec![(0.0, 0.0, 0.0); compute.len()];
    for &n in &grad.body {
        let d = &grad.nodes[n];
        let Some(i) = d.stage else { continue };
        if d.op.arg_role().is_some() || matches!(d.op, Op::Reshape { .. } | Op::StopGradient) {
            continue;
        }
        let t = crate::remat::forward_seconds(profile, &grad, n);
        let slot = &mut out[i as usize];
        match d.phase {
            cleave_ir::Phase::Dgrad => slot.1 += t,
            cleave_ir::Phase::Wgrad => slot.2 += t,
            _ => slot.0 += t,
        }
    }
    Ok(out)
}

/// [`partition_function`] balancing what `cut` says.
pub fn partition_function_by(
    func: &mut Function,
    stages: u32,
    profile: &DeviceProfile,
    cut: Cut,
) -> Result<(), String> {
    if func.body.iter().any(|&n| func.nodes[n].phase.is_backward()) {
        return Err(format!(
            "@{}: partition a forward function, before `autodiff`",
            func.name
        ));
    }
    let compute = compute_nodes(func);
    if compute.len() < stages as usize {
        return Err(format!(
            "@{}: {} compute nodes cannot fill {stages} stages",
            func.name,
            compute.len()
        ));
    }
    let mut costs: Vec<f64> = match cut.balance {
        Balance::Estimate => compute
            .iter()
            .map(|&n| profile.node_training_seconds(func, n))
            .collect(),
        Balance::Split => split_node_seconds(func, &compute, profile)?
            .into_iter()
            .map(|(f, b, w)| f + b + w)
            .collect(),
    };
    if cut.vocab_parallel {
        let start = output_layer_start(func, &compute).ok_or_else(|| {
            format!(
                "@{}: vocab-parallel needs an output layer (a matrix product reading a parameter)",
                func.name
            )
        })?;
        if start < stages as usize - 1 {
            return Err(format!(
                "@{}: vocab-parallel: only {start} compute nodes before the output layer for {stages} stages",
                func.name
            ));
        }
        for c in &mut costs[start..] {
            *c = 0.0;
        }
    }
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
