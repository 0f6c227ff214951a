//! A multilayer perceptron classifier.

use crate::op::UnaryOp;
use crate::tracer::{TraceError, Tracer};
use crate::types::DType;
use crate::Function;

/// The sizes and options of [`mlp`].
#[derive(Clone, Debug, PartialEq)]
pub struct MlpConfig {
    /// Batch size `B`.
    pub batch: usize,
    /// Layer widths, input first and class count last (`[784, 256, 256, 10]`); at least two.
    pub sizes: Vec<usize>,
    /// The activation between layers (not after the last).
    pub activation: UnaryOp,
    /// Whether each layer has a bias.
    pub bias: bool,
    /// Element type of the input, parameters and activations.
    pub dtype: DType,
}

impl Default for MlpConfig {
    /// Batch 64, sizes `[784, 256, 256, 10]`, ReLU, biases, f32.
    fn default() -> Self {
        MlpConfig {
            batch: 64,
            sizes: vec![784, 256, 256, 10],
            activation: UnaryOp::Relu,
            bias: true,
            dtype: DType::F32,
        }
    }
}

/// The forward function `@mlp` of an MLP classifier.
///
/// Inputs `x` `dtype[B, sizes[0]]` and `labels` `i32[B]`; layers `fc1`, `fc2`, … (parameters
/// `fc{i}.weight` `[sizes[i-1], sizes[i]]` and `fc{i}.bias` `[sizes[i]]`, numbered from 1);
/// outputs `loss` (scalar mean cross-entropy) and `logits` `dtype[B, classes]`.
pub fn mlp(cfg: &MlpConfig) -> Result<Function, TraceError> {
    let mut t = Tracer::new("mlp");
    let sizes = &cfg.sizes;
    let x = t.input(
        "x",
        cfg.dtype,
        [cfg.batch, sizes.first().copied().unwrap_or(0)],
    )?;
    let labels = t.input("labels", DType::I32, [cfg.batch])?;
    let mut h = x;
    let layers = sizes.len().saturating_sub(1);
    for i in 0..layers {
        h = t.linear(h, sizes[i], sizes[i + 1], cfg.bias, &format!("fc{}", i + 1))?;
        if i + 1 < layers {
            h = t.unary(cfg.activation, h)?;
        }
    }
    let ce = t.cross_entropy(h, labels)?;
    let loss = t.mean_all(ce)?;
    t.output("loss", loss)?;
    t.output("logits", h)?;
    Ok(t.finish())
}
