//! VJP rules of indexing ops: gather and scatter-add.

use cleave_ir::tracer::Tracer;
use cleave_ir::{NodeData, Op, Value};

use super::{emit, splat_ty, RuleResult};

/// `y = gather(table, idx, axis)`; `d table = scatter_add(0, idx, dy, axis)` — an embedding
/// table's gradient is a scatter-add of the rows' gradients (repeated indices accumulate).
pub(super) fn gather(t: &mut Tracer, node: &NodeData, axis: usize, dy: Value) -> RuleResult {
    let (table, idx) = (node.operands[0], node.operands[1]);
    let ty = t.ty(table).clone();
    let zero = splat_ty(t, &ty, 0.0)?;
    emit(t, Op::ScatterAdd { axis }, &[zero, idx, dy])
}

/// `y = scatter_add(base, idx, upd, axis)`; `d base = dy`, `d upd = gather(dy, idx, axis)`.
pub(super) fn scatter_add(
    t: &mut Tracer,
    node: &NodeData,
    axis: usize,
    dy: Value,
    i: usize,
) -> RuleResult {
    if i == 0 {
        Ok(dy)
    } else {
        emit(t, Op::Gather { axis }, &[dy, node.operands[1]])
    }
}
