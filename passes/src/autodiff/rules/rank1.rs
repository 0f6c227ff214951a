//! Rank-1 sub-token compression of the linear layers' weight-gradient input
//! (`autodiff{compress=rank1,group=G}`, `--compress rank1[:G]`), after VeLoRA (Miles et al.,
//! "VeLoRA: Memory Efficient Training using Rank-1 Sub-Token Projections", NeurIPS 2024).
//!
//! A linear layer `y = x·W` (a 2-D `matmul` whose data operand is `x: [N, D]` and whose other
//! operand is computed from parameters only) needs `x` in its weight gradient `dW = xᵀ·dy`. Each
//! row of `x` is cut into `D/G` sub-tokens of `G` features; each sub-token is projected onto one
//! fixed unit vector `v` and only the coefficients `[N, D/G]` reach the backward, where
//! `x̂ = c ⊗ v` stands in for `x` in `dW`. The stash of `x` shrinks `G`-fold.
//!
//! **The vector.** Two choices (`autodiff{compress=rank1,vector=V}`, `--compress rank1:G:V`):
//! - `mean` (the default): `v` is the constant `1/√G`, so `x̂` is each sub-token's mean,
//!   repeated. It needs no data and no state.
//! - `batch`: `v` is the direction of the batch's average sub-token (the mean over every row and
//!   group of `x`), made again from each (micro)batch in the forward and stashed with the
//!   coefficients (`G` values). VeLoRA initialises `v` from the first batch's sub-tokens and keeps
//!   it fixed, which needs state across steps; PEFT's VeLoRA offers both (`batch_average_once`
//!   and `batch_average`, per forward pass), and this is the second. A vanishing average falls
//!   back to the `mean` direction: `v` is normalised from `m + 10⁻¹²/√G`, so it is finite for
//!   every input.
//!
//! **What stays exact.** The data gradient `dx = dy·Wᵀ` does not read `x` and is unchanged, so
//! only weight gradients are approximate; one `x` read by several layers (Q, K and V projections)
//! is compressed once. A layer whose `D` is not a multiple of `G` keeps its exact rule (a
//! warning names it); a function with no eligible layer is an error.

use cleave_ir::tracer::{TraceError, Tracer};
use cleave_ir::{DType, Phase, Value};

use super::RuleResult;

/// The rank-1 projection of one layer input: its coefficients `c` (`[N, D/G]`) and, with the
/// `batch` vector, the unit vector `v` (`[G]`). Without it `c` is each sub-token's mean, which
/// the reconstruction repeats (`v = 1/√G` with its constants folded).
#[derive(Clone, Copy, Debug)]
pub struct Projection {
    pub c: Value,
    pub v: Option<Value>,
}

/// The projection of `x: [N, D]` onto sub-tokens of `group` features, made in phase `forward`
/// in the current stage; `batch` picks the batch's average direction as the vector.
pub fn coefficients(
    t: &mut Tracer,
    x: Value,
    group: usize,
    batch: bool,
) -> Result<Projection, TraceError> {
    let shape = t.shape(x).to_vec();
    let (n, d) = (shape[0], shape[1]);
    let k = d / group;
    let phase = t.phase();
    t.set_phase(Phase::Forward);
    let p = (|| {
        let r = t.reshape(x, vec![n, k, group])?;
        if !batch {
            return Ok(Projection {
                c: t.reduce_mean(r, vec![2])?,
                v: None,
            });
        }
        // The direction in f32 whatever `x`'s type (the floor underflows in f16).
        let dtype = t.ty(x).dtype;
        let mut m = t.reduce_mean(r, vec![0, 1])?;
        if dtype != DType::F32 {
            m = t.cast(m, DType::F32)?;
        }
        let floor = t.constant_f(DType::F32, vec![group], 1e-12 / (group as f64).sqrt())?;
        let u = t.add(m, floor)?;
        let sq = t.mul(u, u)?;
        let norm2 = t.reduce_sum(sq, vec![0])?;
        let inv = t.rsqrt(norm2)?;
        let inv = t.broadcast(inv, vec![group], vec![])?;
        let mut v = t.mul(u, inv)?;
        if dtype != DType::F32 {
            v = t.cast(v, dtype)?;
        }
        let vb = t.broadcast(v, vec![n, k, group], vec![2])?;
        let prod = t.mul(r, vb)?;
        Ok(Projection {
            c: t.reduce_sum(prod, vec![2])?,
            v: Some(v),
        })
    })();
    t.set_phase(phase);
    p
}

/// `x̂ = c ⊗ v`, `[N, D]`, from the projection (in the backward).
pub fn reconstruct(t: &mut Tracer, p: Projection, group: usize) -> RuleResult {
    let shape = t.shape(p.c).to_vec();
    let (n, k) = (shape[0], shape[1]);
    let b = t.broadcast(p.c, vec![n, k, group], vec![0, 1])?;
    let b = match p.v {
        Some(v) => {
            let vb = t.broadcast(v, vec![n, k, group], vec![2])?;
            t.mul(b, vb)?
        }
        None => b,
    };
    t.reshape(b, vec![n, k * group])
}
