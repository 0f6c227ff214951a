//! VJP rules of the ops whose gradient is deliberately not their derivative: straight-through
//! estimators and gradient reversal. Each rule is usable with every gradient method (the JVP
//! rules in `jvp.rs` are their transposes).

use cleave_ir::tracer::Tracer;
use cleave_ir::Value;

use super::{scale, RuleResult};

/// `y = ste_round(x)`, `ste_sign(x)`, `ste_argmax_one_hot(x)`: the true derivative is zero almost
/// everywhere; the straight-through estimator uses `dx = dy` (the gradient of the identity).
pub(super) fn straight_through(dy: Value) -> RuleResult {
    Ok(dy)
}

/// `y = grad_reverse(x) = x`; `dx = −λ·dy` (gradient reversal, Ganin & Lempitsky 2015).
pub(super) fn grad_reverse(t: &mut Tracer, lambda: f64, dy: Value) -> RuleResult {
    scale(t, dy, -lambda)
}
