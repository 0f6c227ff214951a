//! ONNX ops → cleave ops, one family per file.
//!
//! - [`elementwise`]: unary and binary math, comparisons, `Where`, casts, identities.
//! - [`shape`]: reshapes, transposes, slicing, joining, indexing, and the ops that make
//!   constants (`Constant`, `ConstantOfShape`, `Shape`, `Range`, `Trilu`, sequences).
//! - [`fold`]: `CumSum` and `GatherND`, evaluated at import time only.
//! - [`nn`]: contractions, convolution and pooling, normalisation, softmax, reductions, losses
//!   and attention.
//!
//! Each lowering gets the node and its inputs (`None` for an omitted optional input) and returns
//! one value per output. ONNX's implicit numpy broadcasting becomes explicit `broadcast` nodes
//! ([`bcast`]).

pub mod elementwise;
pub mod fold;
pub mod nn;
pub mod shape;

use cleave_ir::Value;

use super::graph::{check_shape, Importer, NResult, NodeCtx, Val};

/// Every ONNX op type the importer maps, sorted.
pub const SUPPORTED_OPS: &[&str] = &[
    "Abs",
    "Add",
    "And",
    "Attention",
    "AveragePool",
    "BatchNormalization",
    "Cast",
    "CastLike",
    "Concat",
    "Constant",
    "ConstantOfShape",
    "Conv",
    "Cos",
    "CumSum",
    "Div",
    "Dropout",
    "Equal",
    "Erf",
    "Exp",
    "Expand",
    "Flatten",
    "Floor",
    "Gather",
    "GatherND",
    "Gelu",
    "Gemm",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "Greater",
    "GreaterOrEqual",
    "Identity",
    "IsNaN",
    "LayerNormalization",
    "Less",
    "LessOrEqual",
    "Log",
    "LogSoftmax",
    "MatMul",
    "Max",
    "MaxPool",
    "Min",
    "Mod",
    "Mul",
    "Neg",
    "Not",
    "Or",
    "Pow",
    "Range",
    "Reciprocal",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceSum",
    "Relu",
    "Reshape",
    "Round",
    "SequenceAt",
    "Shape",
    "Sigmoid",
    "Sign",
    "Sin",
    "Size",
    "Slice",
    "Softmax",
    "SoftmaxCrossEntropyLoss",
    "Split",
    "SplitToSequence",
    "Sqrt",
    "Squeeze",
    "Sub",
    "Tanh",
    "Transpose",
    "Trilu",
    "Unsqueeze",
    "Where",
];

/// Whether a node whose inputs are all constants may be evaluated at import time.
pub fn foldable(op: &str) -> bool {
    // Sequences hold values of the function being built, not constants.
    op != "SplitToSequence"
}

/// Lowers one node.
pub fn lower(imp: &mut Importer, n: &NodeCtx, ins: &[Option<Val>]) -> NResult<Vec<Val>> {
    if let Some(out) = elementwise::lower(imp, n, ins)? {
        return Ok(out);
    }
    if let Some(out) = shape::lower(imp, n, ins)? {
        return Ok(out);
    }
    if let Some(out) = nn::lower(imp, n, ins)? {
        return Ok(out);
    }
    if let Some(out) = fold::lower(imp, n, ins)? {
        return Ok(out);
    }
    Err(format!("internal error: no lowering for `{}`", n.op).into())
}

/// The required input `i`.
pub fn input(ins: &[Option<Val>], i: usize) -> NResult<&Val> {
    ins.get(i)
        .and_then(Option::as_ref)
        .ok_or_else(|| format!("input {i} is missing").into())
}

/// The optional input `i`.
pub fn optional(ins: &[Option<Val>], i: usize) -> Option<&Val> {
    ins.get(i).and_then(Option::as_ref)
}

/// A possibly negative ONNX axis as an index below `rank`.
pub fn axis(a: i64, rank: usize) -> NResult<usize> {
    let r = rank as i64;
    let norm = if a < 0 { a + r } else { a };
    if (0..r).contains(&norm) {
        Ok(norm as usize)
    } else {
        Err(format!("axis {a} is out of range for rank {rank}").into())
    }
}

/// The numpy broadcast of several shapes.
pub fn broadcast_shapes(shapes: &[Vec<usize>]) -> NResult<Vec<usize>> {
    let rank = shapes.iter().map(Vec::len).max().unwrap_or(0);
    let mut out = vec![1usize; rank];
    for s in shapes {
        for (j, &d) in s.iter().enumerate() {
            let o = &mut out[rank - s.len() + j];
            if *o == 1 {
                *o = d;
            } else if d != 1 && d != *o {
                return Err(format!("shapes {shapes:?} do not broadcast").into());
            }
        }
    }
    check_shape(&out)?;
    Ok(out)
}

/// The IR values of `vals`, each broadcast (numpy rules) to their common shape.
pub fn bcast(imp: &mut Importer, vals: &[&Val]) -> NResult<Vec<Value>> {
    let shapes = vals
        .iter()
        .map(|v| imp.shape(v))
        .collect::<NResult<Vec<_>>>()?;
    let shape = broadcast_shapes(&shapes)?;
    let mut out = Vec::with_capacity(vals.len());
    for v in vals {
        let x = imp.ir(v)?;
        out.push(imp.t.broadcast_to(x, shape.clone())?);
    }
    Ok(out)
}
