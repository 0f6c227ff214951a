//! Deterministic parameter initialisation for `cleave new-model --params-out`.
//!
//! The rule is chosen from the parameter's name and shape, following the conventions of the model
//! builders in `cleave_ir::models` (and PyTorch's defaults for the same layers):
//!
//! | parameter | rule |
//! |---|---|
//! | `*.bias` | zeros |
//! | norm scales (`*ln*.weight`, `*norm*.weight`) | ones |
//! | embeddings (`wte`, `wpe`, `*embed*`) | normal(0, 0.02) |
//! | anything else of rank ≥ 2 | uniform(−1/√fan_in, 1/√fan_in), fan_in = all dims but the output dim |
//! | anything else of rank < 2 | zeros |
//!
//! Linear weights are stored `[in, out]` (fan_in = first dim); convolution weights
//! `[O, C/g, KH, KW]` (fan_in = C/g·KH·KW). The generator is SplitMix64 seeded by the user's seed
//! and the parameter's position, so adding a parameter does not change the others' values.

use std::collections::BTreeMap;

use cleave_ir::interp::Tensor;
use cleave_ir::{Function, TensorType};

/// A small deterministic generator (SplitMix64).
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator with the given seed.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform sample in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A standard normal sample (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// How a parameter is initialised.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum InitRule {
    /// All zeros.
    Zeros,
    /// All ones.
    Ones,
    /// Normal with mean 0 and this standard deviation.
    Normal(f64),
    /// Uniform in `[-bound, bound]`.
    Uniform(f64),
}

/// The rule for a parameter (see the module docs).
pub fn init_rule(name: &str, ty: &TensorType) -> InitRule {
    let last = name.rsplit('.').next().unwrap_or(name);
    let lower = name.to_ascii_lowercase();
    if last == "bias" {
        InitRule::Zeros
    } else if last == "weight" && (lower.contains("ln") || lower.contains("norm")) && ty.rank() == 1
    {
        InitRule::Ones
    } else if lower == "wte" || lower == "wpe" || lower.contains("embed") {
        InitRule::Normal(0.02)
    } else if ty.rank() >= 2 {
        let fan_in: usize = if ty.rank() == 4 {
            ty.shape[1..].iter().product()
        } else {
            ty.shape[ty.rank() - 2]
        };
        InitRule::Uniform(1.0 / (fan_in.max(1) as f64).sqrt())
    } else {
        InitRule::Zeros
    }
}

/// Initial values for every parameter of a function, by name.
pub fn init_params(func: &Function, seed: u64) -> BTreeMap<String, Tensor> {
    let mut out = BTreeMap::new();
    for (i, arg) in func.params().enumerate() {
        let mut rng = SplitMix64::new(seed ^ (i as u64).wrapping_mul(0xA24B_AED4_963E_E407));
        let n = arg.ty.num_elements();
        let values: Vec<f64> = match init_rule(arg.name, arg.ty) {
            InitRule::Zeros => vec![0.0; n],
            InitRule::Ones => vec![1.0; n],
            InitRule::Normal(std) => (0..n).map(|_| std * rng.normal()).collect(),
            InitRule::Uniform(b) => (0..n).map(|_| b * (2.0 * rng.uniform() - 1.0)).collect(),
        };
        out.insert(
            arg.name.to_string(),
            Tensor::from_float(arg.ty.dtype, arg.ty.shape.clone(), values),
        );
    }
    out
}
