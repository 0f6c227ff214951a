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
//! **The vector.** VeLoRA initialises `v` from the first batch's sub-tokens; here `v` is the
//! constant `1/√G` (so `x̂` is each sub-token's mean, repeated), which needs no data and no state.
//! That is a stated difference from the paper.
//!
//! **What stays exact.** The data gradient `dx = dy·Wᵀ` does not read `x` and is unchanged, so
//! only weight gradients are approximate; one `x` read by several layers (Q, K and V projections)
//! is compressed once. A layer whose `D` is not a multiple of `G` keeps its exact rule (a
//! warning names it); a function with no eligible layer is an error.

use cleave_ir::tracer::Tracer;
use cleave_ir::{Phase, Value};

use super::RuleResult;

/// The coefficients `c = mean over each sub-token` of `x: [N, D]` (`[N, D/G]`), made in phase
/// `forward` in the current stage.
pub fn coefficients(t: &mut Tracer, x: Value, group: usize) -> RuleResult {
    let shape = t.shape(x).to_vec();
    let (n, d) = (shape[0], shape[1]);
    let phase = t.phase();
    t.set_phase(Phase::Forward);
    let c = (|| {
        let r = t.reshape(x, vec![n, d / group, group])?;
        t.reduce_mean(r, vec![2])
    })();
    t.set_phase(phase);
    c
}

/// `x̂ = c ⊗ v`, `[N, D]`, from the coefficients (in the backward).
pub fn reconstruct(t: &mut Tracer, c: Value, group: usize) -> RuleResult {
    let shape = t.shape(c).to_vec();
    let (n, k) = (shape[0], shape[1]);
    let b = t.broadcast(c, vec![n, k, group], vec![0, 1])?;
    t.reshape(b, vec![n, k * group])
}
