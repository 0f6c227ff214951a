//! FLOP and byte accounting for functions.
//!
//! [`node_flops`] estimates the floating-point work of one node in two classes: **matmul** (the
//! tensor-core work: `matmul` and `conv2d`, counted exactly as `2·multiply-adds`) and **other**
//! (everything else, a per-element estimate). The paper's FLOP figures (Zero Bubble, Table 1) are
//! matmul FLOPs only, so [`Flops::matmul`] is the number to compare with them.
//!
//! | op | matmul | other |
//! |----|--------|-------|
//! | `matmul` `[B…,M,K]·[B…,K,N]` | `2·B·M·N·K` (B = product of the batch dims) | 0 |
//! | `conv2d` | `2·N·O·HO·WO·(C/g)·KH·KW` | 0 |
//! | `conv2d_grad_input`, `conv2d_grad_weight` | as the forward `conv2d` | 0 |
//! | unary: `neg abs relu sign floor round not exp log sqrt rsqrt reciprocal sin cos erf tanh` | 0 | 1 per element |
//! | unary: `sigmoid` | 0 | 3 per element (exp, add, divide) |
//! | unary: `silu` | 0 | 4 per element (sigmoid, multiply) |
//! | unary: `gelu` | 0 | 5 per element (scale, erf, add, two multiplies) |
//! | unary: `gelu_tanh` | 0 | 8 per element (cube, fma, scale, tanh, add, two multiplies) |
//! | binary ops, comparisons, `select` | 0 | 1 per output element |
//! | `reduce_*` | 0 | 1 per **input** element |
//! | `softmax`, `log_softmax` | 0 | 5 per element (max, subtract, exp, sum, scale) |
//! | `layer_norm` | 0 | 8 per element (mean, subtract, square, mean, rsqrt, multiply, …) |
//! | `rms_norm` | 0 | 5 per element (square, mean, rsqrt, multiply, …) |
//! | `cross_entropy` | 0 | 5 per logits element (log-softmax) + 1 per result element |
//! | `max_pool2d`, `avg_pool2d` | 0 | `KH·KW` per output element |
//! | `max_pool2d_grad`, `avg_pool2d_grad` | 0 | `KH·KW` per incoming-gradient element |
//! | `scatter_add` | 0 | 1 per update element |
//! | `dropout` | 0 | 2 per element (mask test, scale) |
//! | `input param constant iota cast broadcast reshape transpose slice concat split pad gather one_hot stop_gradient` | 0 | 0 (data movement) |
//!
//! [`function_cost`] sums the live nodes of a function by [`Phase`] and adds memory figures; see
//! [`FunctionCost`] for their definitions.

use std::collections::BTreeMap;
use std::ops::{Add, AddAssign};

use crate::function::{Function, Node, Phase};
use crate::op::{Op, SteOp, UnaryOp};

/// Floating-point operation counts of a node or a set of nodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Flops {
    /// FLOPs of `matmul` and `conv2d` (2 per multiply-add).
    pub matmul: u64,
    /// Estimated FLOPs of everything else (see the module docs).
    pub other: u64,
}

impl Flops {
    /// `matmul + other`.
    pub fn total(&self) -> u64 {
        self.matmul + self.other
    }
}

impl Add for Flops {
    type Output = Flops;
    fn add(self, rhs: Flops) -> Flops {
        Flops {
            matmul: self.matmul + rhs.matmul,
            other: self.other + rhs.other,
        }
    }
}

impl AddAssign for Flops {
    fn add_assign(&mut self, rhs: Flops) {
        *self = *self + rhs;
    }
}

/// FLOPs per element of a unary op (see the module docs).
pub fn unary_flops_per_element(op: UnaryOp) -> u64 {
    match op {
        UnaryOp::Sigmoid => 3,
        UnaryOp::Silu => 4,
        UnaryOp::Gelu => 5,
        UnaryOp::GeluTanh => 8,
        UnaryOp::Neg
        | UnaryOp::Abs
        | UnaryOp::Exp
        | UnaryOp::Log
        | UnaryOp::Sqrt
        | UnaryOp::Rsqrt
        | UnaryOp::Tanh
        | UnaryOp::Relu
        | UnaryOp::Sin
        | UnaryOp::Cos
        | UnaryOp::Erf
        | UnaryOp::Reciprocal
        | UnaryOp::Sign
        | UnaryOp::Floor
        | UnaryOp::Round
        | UnaryOp::Not => 1,
    }
}

/// The estimated FLOPs of one node (see the table in the module docs).
pub fn node_flops(func: &Function, node: Node) -> Flops {
    let data = func.node(node);
    let numel = |v| func.ty(v).num_elements() as u64;
    let out = data.results.iter().map(|&v| numel(v)).sum::<u64>();
    let operand = |i: usize| numel(data.operands[i]);
    let other = |n: u64| Flops {
        matmul: 0,
        other: n,
    };
    match &data.op {
        Op::Input { .. }
        | Op::Param { .. }
        | Op::Constant { .. }
        | Op::Iota { .. }
        | Op::Cast { .. }
        | Op::Broadcast { .. }
        | Op::Reshape { .. }
        | Op::Transpose { .. }
        | Op::Slice { .. }
        | Op::Concat { .. }
        | Op::Split { .. }
        | Op::Pad { .. }
        | Op::Gather { .. }
        | Op::OneHot { .. }
        | Op::StopGradient => Flops::default(),
        Op::Ste(SteOp::Round | SteOp::Sign) => other(out),
        Op::Ste(SteOp::ArgmaxOneHot { .. }) => other(2 * out),
        Op::GradReverse { .. } => Flops::default(),
        Op::Unary(u) => other(unary_flops_per_element(*u) * out),
        Op::Binary(_) | Op::Compare(_) | Op::Select => other(out),
        Op::Reduce { .. } => other(operand(0)),
        Op::MatMul { transpose_lhs, .. } => {
            // The result is [B…, M, N]; K is the contracted extent of the lhs.
            let a = &func.ty(data.operands[0]).shape;
            let r = a.len();
            let k = if *transpose_lhs { a[r - 2] } else { a[r - 1] } as u64;
            Flops {
                matmul: 2 * out * k,
                other: 0,
            }
        }
        Op::Conv2d { .. } => {
            // Each output element [n, o, ho, wo] takes (C/g)·KH·KW multiply-adds; the weight is
            // [O, C/g, KH, KW].
            let w = &func.ty(data.operands[1]).shape;
            let per_output = (w[1] * w[2] * w[3]) as u64;
            Flops {
                matmul: 2 * out * per_output,
                other: 0,
            }
        }
        Op::Conv2dGradInput { .. } => {
            // The forward convolution's multiply-adds, run backwards: one per tap of every
            // incoming-gradient element.
            let w = &func.ty(data.operands[1]).shape;
            Flops {
                matmul: 2 * operand(0) * (w[1] * w[2] * w[3]) as u64,
                other: 0,
            }
        }
        Op::Conv2dGradWeight { shape, .. } => {
            let per_output = (shape[1] * shape[2] * shape[3]) as u64;
            Flops {
                matmul: 2 * operand(1) * per_output,
                other: 0,
            }
        }
        Op::Pool2d { window, .. } => other((window[0] * window[1]) as u64 * out),
        Op::MaxPool2dGrad { window, .. } => other((window[0] * window[1]) as u64 * operand(1)),
        Op::AvgPool2dGrad { window, .. } => other((window[0] * window[1]) as u64 * operand(0)),
        Op::ScatterAdd { .. } => other(operand(2)),
        Op::Softmax { .. } | Op::LogSoftmax { .. } => other(5 * out),
        Op::LayerNorm { .. } => other(8 * out),
        Op::RmsNorm { .. } => other(5 * out),
        Op::CrossEntropy => other(5 * operand(0) + out),
        Op::Dropout { .. } => other(2 * out),
    }
}

/// Costs of a whole function.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FunctionCost {
    /// FLOPs of the live nodes, summed per phase (phases without nodes are absent).
    pub by_phase: BTreeMap<Phase, Flops>,
    /// Number of parameter elements.
    pub param_count: u64,
    /// Bytes of all parameters.
    pub param_bytes: u64,
    /// Bytes of all data inputs.
    pub input_bytes: u64,
    /// Bytes of all constants (splat constants counted at their full size).
    pub constant_bytes: u64,
    /// Bytes of every result of every live **forward-phase** node other than `input`, `param` and
    /// `constant`, each counted once at its full dense size. This is the footprint of keeping
    /// every forward intermediate: no liveness, no aliasing (a `reshape` counts like a copy), and
    /// no distinction between values a backward pass would stash and those it would not.
    pub activation_bytes: u64,
    /// Number of live nodes.
    pub node_count: usize,
}

impl FunctionCost {
    /// The FLOPs of one phase (zero if it has no nodes).
    pub fn phase(&self, phase: Phase) -> Flops {
        self.by_phase.get(&phase).copied().unwrap_or_default()
    }

    /// The FLOPs of the forward phase.
    pub fn forward(&self) -> Flops {
        self.phase(Phase::Forward)
    }

    /// The FLOPs of all phases together.
    pub fn total(&self) -> Flops {
        self.by_phase.values().fold(Flops::default(), |a, &b| a + b)
    }
}

/// Sums [`node_flops`] over the live nodes of `func` by phase, and measures its parameters,
/// inputs, constants and forward activations (see [`FunctionCost`]).
pub fn function_cost(func: &Function) -> FunctionCost {
    let mut cost = FunctionCost {
        node_count: func.body.len(),
        ..FunctionCost::default()
    };
    for &node in &func.body {
        let data = func.node(node);
        *cost.by_phase.entry(data.phase).or_default() += node_flops(func, node);
        let bytes: u64 = data
            .results
            .iter()
            .map(|&v| func.ty(v).size_bytes() as u64)
            .sum();
        match &data.op {
            Op::Param { ty, .. } => {
                cost.param_count += ty.num_elements() as u64;
                cost.param_bytes += bytes;
            }
            Op::Input { .. } => cost.input_bytes += bytes,
            Op::Constant { .. } => cost.constant_bytes += bytes,
            _ if data.phase == Phase::Forward => cost.activation_bytes += bytes,
            _ => {}
        }
    }
    cost
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::{self, GptLayerConfig, MlpConfig};
    use crate::tracer::Tracer;
    use crate::DType;

    #[test]
    fn gpt_layer_table1_forward_matmul_flops() {
        let cfg = GptLayerConfig::table1();
        let f = models::gpt_layer(&cfg).unwrap();
        let cost = function_cost(&f);
        let (s, b, h) = (1024u64, 1u64, 4096u64);
        assert_eq!(24 * s * b * h * h + 4 * b * s * s * h, 429_496_729_600);
        assert_eq!(cost.forward().matmul, 429_496_729_600);
        assert_eq!(cost.by_phase.len(), 1);
        assert_eq!(cost.total(), cost.forward());
        // 4 projections (h² + h each), 2 norms (2h each), MLP 8h² + 5h.
        assert_eq!(cost.param_count, 12 * h * h + 13 * h);
        assert_eq!(cost.param_bytes, 4 * cost.param_count);
        assert_eq!(cost.input_bytes, 4 * s * b * h);
    }

    #[test]
    fn mlp_forward_matmul_flops_and_params() {
        let f = models::mlp(&MlpConfig::default()).unwrap();
        let cost = function_cost(&f);
        assert_eq!(
            cost.forward().matmul,
            2 * 64 * (784 * 256 + 256 * 256 + 256 * 10)
        );
        assert_eq!(cost.param_count, 269_322);
        assert_eq!(cost.param_bytes, 4 * 269_322);
        assert_eq!(cost.input_bytes, 64 * 784 * 4 + 64 * 4);
        // Per layer: matmul, broadcast bias, add; ReLU after the first two; then
        // cross_entropy [64] and the scalar mean.
        let acts = 4 * (2 * 3 * 64 * 256 + 2 * 64 * 256 + 3 * 64 * 10 + 64 + 1);
        assert_eq!(cost.activation_bytes, acts as u64);
        // bias adds + relus, cross-entropy (5 per logit + 1 per row), mean over 64.
        let other = 64 * (256 + 256 + 10) + 2 * 64 * 256 + (5 * 640 + 64) + 64;
        assert_eq!(cost.forward().other, other as u64);
    }

    #[test]
    fn conv_and_pool_flops() {
        let mut t = Tracer::new("c");
        let x = t.input("x", DType::F32, [2, 4, 8, 8]).unwrap();
        let w = t.param("w", DType::F32, [6, 2, 3, 3]).unwrap();
        let y = t.conv2d(x, w, [2, 2], [1, 1, 1, 1], [1, 1], 2).unwrap();
        assert_eq!(t.shape(y), &[2, 6, 4, 4]);
        let p = t.avg_pool2d(y, [2, 2], [2, 2], [0; 4], false).unwrap();
        let f = t.finish();
        let conv = f.values[y].def;
        assert_eq!(
            node_flops(&f, conv),
            Flops {
                matmul: 2 * 2 * 6 * 4 * 4 * 2 * 3 * 3,
                other: 0
            }
        );
        assert_eq!(node_flops(&f, f.values[p].def).other, 4 * 2 * 6 * 2 * 2);
    }

    #[test]
    fn phases_are_separated() {
        let mut t = Tracer::new("p");
        let a = t.input("a", DType::F32, [3, 5]).unwrap();
        let b = t.param("b", DType::F32, [5, 7]).unwrap();
        let c = t.matmul(a, b).unwrap();
        t.set_phase(Phase::Wgrad);
        let d = t.matmul_t(a, c, true, false).unwrap();
        assert_eq!(t.shape(d), &[5, 7]);
        t.set_phase(Phase::Dgrad);
        t.gelu_tanh(c).unwrap();
        let f = t.finish();
        let cost = function_cost(&f);
        assert_eq!(cost.forward().matmul, 2 * 3 * 5 * 7);
        assert_eq!(cost.phase(Phase::Wgrad).matmul, 2 * 5 * 7 * 3);
        assert_eq!(
            cost.phase(Phase::Dgrad),
            Flops {
                matmul: 0,
                other: 8 * 21
            }
        );
        assert_eq!(cost.phase(Phase::Optimizer), Flops::default());
        assert_eq!(cost.total().matmul, 420);
        // Only the forward matmul result is an activation.
        assert_eq!(cost.activation_bytes, 4 * 21);
    }

    #[test]
    fn every_model_has_costs() {
        for f in models::tests::all_models() {
            let cost = function_cost(&f);
            assert!(cost.forward().matmul > 0, "{}", f.name);
            assert!(cost.forward().other > 0, "{}", f.name);
            assert!(cost.activation_bytes > 0, "{}", f.name);
            assert_eq!(cost.node_count, f.body.len());
        }
    }
}
