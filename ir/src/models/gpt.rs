//! A GPT-style decoder-only transformer, and one layer of it as a pipeline stage body.

use crate::op::CompareOp;
use crate::tracer::{TraceError, Tracer};
use crate::types::DType;
use crate::{Function, Value};

/// The normalisation used by a transformer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Norm {
    /// `layer_norm` with weight and bias (GPT-2).
    #[default]
    LayerNorm,
    /// `rms_norm` with a weight (LLaMA).
    RmsNorm,
}

/// The activation of a transformer's MLP (always `d → 4d → d`, no gating).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MlpAct {
    /// GELU with the exact (erf) normal CDF.
    #[default]
    Gelu,
    /// `x·sigmoid(x)`.
    Silu,
}

/// The sizes and options of [`gpt`].
#[derive(Clone, Debug, PartialEq)]
pub struct GptConfig {
    /// Vocabulary size.
    pub vocab: usize,
    /// Model width `d`.
    pub d_model: usize,
    /// Attention heads (dividing `d_model`).
    pub heads: usize,
    /// Number of transformer layers.
    pub layers: usize,
    /// Sequence length `S` (also the number of learned positions).
    pub seq: usize,
    /// Batch size `B`.
    pub batch: usize,
    /// Normalisation kind.
    pub norm: Norm,
    /// MLP activation.
    pub mlp_act: MlpAct,
    /// LM head is `wte` transposed (true) or a separate `lm_head` `[d, vocab]` (false).
    pub tied_embeddings: bool,
    /// Whether the linear layers have biases.
    pub bias: bool,
    /// Element type of parameters and activations.
    pub dtype: DType,
}

impl Default for GptConfig {
    /// A tiny model: vocab 128, d 64, 4 heads, 2 layers, seq 16, batch 2, layer norm, GELU, tied
    /// embeddings, biases, f32.
    fn default() -> Self {
        GptConfig {
            vocab: 128,
            d_model: 64,
            heads: 4,
            layers: 2,
            seq: 16,
            batch: 2,
            norm: Norm::LayerNorm,
            mlp_act: MlpAct::Gelu,
            tied_embeddings: true,
            bias: true,
            dtype: DType::F32,
        }
    }
}

impl GptConfig {
    /// The configuration of one of this model's layers.
    pub fn layer_config(&self) -> GptLayerConfig {
        GptLayerConfig {
            d_model: self.d_model,
            heads: self.heads,
            seq: self.seq,
            batch: self.batch,
            norm: self.norm,
            mlp_act: self.mlp_act,
            bias: self.bias,
            dtype: self.dtype,
        }
    }
}

/// The sizes and options of [`gpt_layer`].
#[derive(Clone, Debug, PartialEq)]
pub struct GptLayerConfig {
    /// Model width `d`.
    pub d_model: usize,
    /// Attention heads (dividing `d_model`).
    pub heads: usize,
    /// Sequence length `S`.
    pub seq: usize,
    /// Batch size `B`.
    pub batch: usize,
    /// Normalisation kind.
    pub norm: Norm,
    /// MLP activation.
    pub mlp_act: MlpAct,
    /// Whether the linear layers have biases.
    pub bias: bool,
    /// Element type of parameters and activations.
    pub dtype: DType,
}

impl Default for GptLayerConfig {
    /// One layer of [`GptConfig::default`]: d 64, 4 heads, seq 16, batch 2.
    fn default() -> Self {
        GptConfig::default().layer_config()
    }
}

impl GptLayerConfig {
    /// The layer of the Zero Bubble paper's Table 1: d 4096, 32 heads, seq 1024, batch 1 (f32,
    /// layer norm, GELU, biases).
    pub fn table1() -> Self {
        GptLayerConfig {
            d_model: 4096,
            heads: 32,
            seq: 1024,
            batch: 1,
            ..GptLayerConfig::default()
        }
    }
}

/// A large negative number that `dtype` can hold, for masking scores before softmax.
fn mask_value(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => -3.0e4,
        _ => -1.0e9,
    }
}

fn norm_affine(t: &mut Tracer, x: Value, norm: Norm, name: &str) -> Result<Value, TraceError> {
    match norm {
        Norm::LayerNorm => t.layer_norm_affine(x, name),
        Norm::RmsNorm => t.rms_norm_affine(x, name),
    }
}

/// Causal multi-head self-attention on `x` `[B,S,d]` in scope `attn`: projections `wq, wk, wv`,
/// heads `[B,H,S,Dh]`, scaled masked scores, softmax, `·v`, merged heads, projection `wo`.
fn attention(t: &mut Tracer, x: Value, cfg: &GptLayerConfig) -> Result<Value, TraceError> {
    let (b, s, d, h) = (cfg.batch, cfg.seq, cfg.d_model, cfg.heads);
    let dh = d / h;
    let dt = cfg.dtype;
    t.scoped("attn", |t| {
        let heads = |t: &mut Tracer, name: &str| -> Result<Value, TraceError> {
            let p = t.linear(x, d, d, cfg.bias, name)?;
            let p = t.reshape(p, [b, s, h, dh])?;
            t.transpose(p, [0, 2, 1, 3])
        };
        let q = heads(t, "wq")?;
        let k = heads(t, "wk")?;
        let v = heads(t, "wv")?;
        let scores = t.matmul_t(q, k, false, true)?;
        let full = [b, h, s, s];
        let scale = t.constant_f(dt, full, 1.0 / (dh as f64).sqrt())?;
        let scores = t.mul(scores, scale)?;
        let row = t.iota(DType::I32, [s, s], 0)?;
        let col = t.iota(DType::I32, [s, s], 1)?;
        let causal = t.compare(CompareOp::Ge, row, col)?;
        let causal = t.broadcast(causal, full, [2, 3])?;
        let neg = t.constant_f(dt, full, mask_value(dt))?;
        let scores = t.select(causal, scores, neg)?;
        let probs = t.softmax(scores, 3)?;
        let o = t.matmul(probs, v)?;
        let o = t.transpose(o, [0, 2, 1, 3])?;
        let o = t.reshape(o, [b, s, d])?;
        t.linear(o, d, d, cfg.bias, "wo")
    })
}

/// One pre-norm transformer block on `x` `[B,S,d]` in the current scope: `ln1`, `attn`,
/// residual, `ln2`, `mlp` (`fc` d→4d, activation, `proj` 4d→d), residual.
fn block(t: &mut Tracer, x: Value, cfg: &GptLayerConfig) -> Result<Value, TraceError> {
    let d = cfg.d_model;
    if cfg.heads == 0 || !d.is_multiple_of(cfg.heads) {
        return Err(t.error(
            "gpt_layer",
            &[x],
            format!("heads = {} must divide d_model = {d}", cfg.heads),
        ));
    }
    let a = norm_affine(t, x, cfg.norm, "ln1")?;
    let a = attention(t, a, cfg)?;
    let x = t.add(x, a)?;
    let m = norm_affine(t, x, cfg.norm, "ln2")?;
    let m = t.scoped("mlp", |t| {
        let m = t.linear(m, d, 4 * d, cfg.bias, "fc")?;
        let m = match cfg.mlp_act {
            MlpAct::Gelu => t.gelu(m)?,
            MlpAct::Silu => t.silu(m)?,
        };
        t.linear(m, 4 * d, d, cfg.bias, "proj")
    })?;
    t.add(x, m)
}

/// The forward function `@gpt_layer` of one transformer layer, a pipeline stage body.
///
/// Input `x` `dtype[B,S,d]`, output `y` of the same type; parameters `ln1.*`,
/// `attn.{wq,wk,wv,wo}.*`, `ln2.*`, `mlp.{fc,proj}.*`. Its matmuls are exactly the four attention
/// projections (`4·2·B·S·d²` FLOPs), `q·kᵀ` and `probs·v` (`2·2·B·S²·d`) and the MLP
/// (`2·2·B·S·d·4d`): `24·B·S·d² + 4·B·S²·d` in all.
pub fn gpt_layer(cfg: &GptLayerConfig) -> Result<Function, TraceError> {
    let mut t = Tracer::new("gpt_layer");
    let x = t.input("x", cfg.dtype, [cfg.batch, cfg.seq, cfg.d_model])?;
    let y = block(&mut t, x, cfg)?;
    t.output("y", y)?;
    Ok(t.finish())
}

/// The forward function `@gpt` of a decoder-only transformer language model.
///
/// Inputs `tokens` and `targets` `i32[B,S]`; parameters `wte` `[vocab,d]` (token embedding,
/// gathered on axis 0), `wpe` `[S,d]` (learned positions, broadcast-added), `layers.{i}.*` (see
/// [`gpt_layer`]), `ln_f.*`, and `lm_head.weight` `[d,vocab]` unless the embeddings are tied (then
/// the head is `matmul(h, wte, transpose_rhs)`). Outputs `loss` (scalar mean cross-entropy over
/// the `B·S` positions) and `logits` `dtype[B,S,vocab]`.
pub fn gpt(cfg: &GptConfig) -> Result<Function, TraceError> {
    let mut t = Tracer::new("gpt");
    let (b, s, d, v) = (cfg.batch, cfg.seq, cfg.d_model, cfg.vocab);
    let dt = cfg.dtype;
    let tokens = t.input("tokens", DType::I32, [b, s])?;
    let targets = t.input("targets", DType::I32, [b, s])?;
    let wte = t.param("wte", dt, [v, d])?;
    let wpe = t.param("wpe", dt, [s, d])?;
    let tok = t.gather(wte, tokens, 0)?;
    let pos = t.broadcast(wpe, [b, s, d], [1, 2])?;
    let mut x = t.add(tok, pos)?;
    let layer = cfg.layer_config();
    for i in 0..cfg.layers {
        x = t.scoped(format!("layers.{i}"), |t| block(t, x, &layer))?;
    }
    let x = norm_affine(&mut t, x, cfg.norm, "ln_f")?;
    let flat = t.reshape(x, [b * s, d])?;
    let logits = if cfg.tied_embeddings {
        t.matmul_t(flat, wte, false, true)?
    } else {
        let head = t.param("lm_head.weight", dt, [d, v])?;
        t.matmul(flat, head)?
    };
    let labels = t.reshape(targets, [b * s])?;
    let ce = t.cross_entropy(logits, labels)?;
    let loss = t.mean_all(ce)?;
    let logits = t.reshape(logits, [b, s, v])?;
    t.output("loss", loss)?;
    t.output("logits", logits)?;
    Ok(t.finish())
}
