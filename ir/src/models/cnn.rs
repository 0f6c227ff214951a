//! A small convolutional classifier.

use crate::op::PoolKind;
use crate::tracer::{TraceError, Tracer};
use crate::types::DType;
use crate::{Function, Value};

/// The sizes and options of [`cnn`].
#[derive(Clone, Debug, PartialEq)]
pub struct CnnConfig {
    /// Batch size `N`.
    pub batch: usize,
    /// Input channels `C`.
    pub in_channels: usize,
    /// Image height and width.
    pub image_hw: [usize; 2],
    /// Output channels of the two 3×3 convolutions.
    pub channels: [usize; 2],
    /// Number of classes.
    pub classes: usize,
    /// The pooling after the second convolution (the first is always max).
    pub second_pool: PoolKind,
    /// Element type of the input, parameters and activations.
    pub dtype: DType,
}

impl Default for CnnConfig {
    /// Batch 8 of 1×28×28 images, channels `[8, 16]`, 10 classes, average second pool, f32.
    fn default() -> Self {
        CnnConfig {
            batch: 8,
            in_channels: 1,
            image_hw: [28, 28],
            channels: [8, 16],
            classes: 10,
            second_pool: PoolKind::Avg,
            dtype: DType::F32,
        }
    }
}

/// A 3×3 convolution (stride 1, padding 1) with weight `{name}.weight` `[O, C, 3, 3]` and bias
/// `{name}.bias` `[O]` (broadcast over `N, H, W`).
fn conv3x3(t: &mut Tracer, x: Value, out: usize, name: &str) -> Result<Value, TraceError> {
    let ty = t.ty(x).clone();
    let c = ty.shape.get(1).copied().unwrap_or(0);
    let w = t.param(&format!("{name}.weight"), ty.dtype, [out, c, 3, 3])?;
    let y = t.conv2d(x, w, [1, 1], [1, 1, 1, 1], [1, 1], 1)?;
    let b = t.param(&format!("{name}.bias"), ty.dtype, [out])?;
    let shape = t.shape(y).to_vec();
    let bb = t.broadcast(b, shape, [1])?;
    t.add(y, bb)
}

/// The forward function `@cnn`: `conv1` 3×3 → relu → max_pool 2 → `conv2` 3×3 → relu → pool 2 →
/// flatten → linear `fc` → cross-entropy.
///
/// Inputs `x` `dtype[N, C, H, W]` and `labels` `i32[N]`; outputs `loss` (scalar mean
/// cross-entropy) and `logits` `dtype[N, classes]`.
pub fn cnn(cfg: &CnnConfig) -> Result<Function, TraceError> {
    let mut t = Tracer::new("cnn");
    let [h, w] = cfg.image_hw;
    let x = t.input("x", cfg.dtype, [cfg.batch, cfg.in_channels, h, w])?;
    let labels = t.input("labels", DType::I32, [cfg.batch])?;
    let y = conv3x3(&mut t, x, cfg.channels[0], "conv1")?;
    let y = t.relu(y)?;
    let y = t.max_pool2d(y, [2, 2], [2, 2], [0; 4])?;
    let y = conv3x3(&mut t, y, cfg.channels[1], "conv2")?;
    let y = t.relu(y)?;
    let y = match cfg.second_pool {
        PoolKind::Max => t.max_pool2d(y, [2, 2], [2, 2], [0; 4])?,
        PoolKind::Avg => t.avg_pool2d(y, [2, 2], [2, 2], [0; 4], true)?,
    };
    let features: usize = t.shape(y)[1..].iter().product();
    let y = t.reshape(y, [cfg.batch, features])?;
    let logits = t.linear(y, features, cfg.classes, true, "fc")?;
    let ce = t.cross_entropy(logits, labels)?;
    let loss = t.mean_all(ce)?;
    t.output("loss", loss)?;
    t.output("logits", logits)?;
    Ok(t.finish())
}
