//! Elementwise ops: unary math, binary math and comparisons with numpy broadcasting, `Where`,
//! casts, and the identities (`Identity`, inference-mode `Dropout`).

use cleave_ir::{BinaryOp, CompareOp, UnaryOp};

use super::{bcast, input, optional};
use crate::onnx::graph::{attr_dtype, Importer, NResult, NodeCtx, Val};

fn unary_op(op: &str) -> Option<UnaryOp> {
    Some(match op {
        "Neg" => UnaryOp::Neg,
        "Abs" => UnaryOp::Abs,
        "Exp" => UnaryOp::Exp,
        "Log" => UnaryOp::Log,
        "Sqrt" => UnaryOp::Sqrt,
        "Tanh" => UnaryOp::Tanh,
        "Sigmoid" => UnaryOp::Sigmoid,
        "Relu" => UnaryOp::Relu,
        "Erf" => UnaryOp::Erf,
        "Reciprocal" => UnaryOp::Reciprocal,
        "Sin" => UnaryOp::Sin,
        "Cos" => UnaryOp::Cos,
        "Floor" => UnaryOp::Floor,
        "Round" => UnaryOp::Round,
        "Sign" => UnaryOp::Sign,
        "Not" => UnaryOp::Not,
        _ => return None,
    })
}

fn binary_op(op: &str) -> Option<BinaryOp> {
    Some(match op {
        "Add" => BinaryOp::Add,
        "Sub" => BinaryOp::Sub,
        "Mul" => BinaryOp::Mul,
        "Div" => BinaryOp::Div,
        "Pow" => BinaryOp::Pow,
        "Max" => BinaryOp::Max,
        "Min" => BinaryOp::Min,
        "And" => BinaryOp::And,
        "Or" => BinaryOp::Or,
        _ => return None,
    })
}

fn compare_op(op: &str) -> Option<CompareOp> {
    Some(match op {
        "Equal" => CompareOp::Eq,
        "Less" => CompareOp::Lt,
        "LessOrEqual" => CompareOp::Le,
        "Greater" => CompareOp::Gt,
        "GreaterOrEqual" => CompareOp::Ge,
        _ => return None,
    })
}

/// Lowers the node if it is elementwise; `None` otherwise.
pub fn lower(imp: &mut Importer, n: &NodeCtx, ins: &[Option<Val>]) -> NResult<Option<Vec<Val>>> {
    if let Some(u) = unary_op(n.op) {
        let x = imp.ir(input(ins, 0)?)?;
        return Ok(Some(vec![Val::Ir(imp.t.unary(u, x)?)]));
    }
    if let Some(b) = binary_op(n.op) {
        return binary(imp, b, ins).map(Some);
    }
    if let Some(c) = compare_op(n.op) {
        let v = bcast(imp, &[input(ins, 0)?, input(ins, 1)?])?;
        return Ok(Some(vec![Val::Ir(imp.t.compare(c, v[0], v[1])?)]));
    }
    let out = match n.op {
        "Gelu" => {
            let x = imp.ir(input(ins, 0)?)?;
            let y = match n.string("approximate", "none")?.as_str() {
                "none" => imp.t.gelu(x)?,
                "tanh" => imp.t.gelu_tanh(x)?,
                other => return Err(format!("unknown `approximate` mode `{other}`").into()),
            };
            vec![Val::Ir(y)]
        }
        "Where" => {
            let v = bcast(imp, &[input(ins, 0)?, input(ins, 1)?, input(ins, 2)?])?;
            vec![Val::Ir(imp.t.select(v[0], v[1], v[2])?)]
        }
        "Cast" => {
            let to = attr_dtype(n.int("to", 0)?)?;
            vec![cast(imp, input(ins, 0)?, to)?]
        }
        "CastLike" => {
            let to = imp.ty(input(ins, 1)?)?.dtype;
            vec![cast(imp, input(ins, 0)?, to)?]
        }
        "Identity" => vec![input(ins, 0)?.clone()],
        "IsNaN" => {
            // NaN is the one value not equal to itself.
            let x = imp.ir(input(ins, 0)?)?;
            let ne = imp.t.compare(CompareOp::Ne, x, x)?;
            vec![Val::Ir(ne)]
        }
        "Dropout" => dropout(imp, n, ins)?,
        _ => return Ok(None),
    };
    Ok(Some(out))
}

fn cast(imp: &mut Importer, v: &Val, to: cleave_ir::DType) -> NResult<Val> {
    if imp.ty(v)?.dtype == to {
        return Ok(v.clone());
    }
    // In the function, int64 is int32 (see `Importer::constant`).
    let to = if to == cleave_ir::DType::I64 && !imp.folding() {
        cleave_ir::DType::I32
    } else {
        to
    };
    if imp.ty(v)?.dtype == to {
        return Ok(v.clone());
    }
    let x = imp.ir(v)?;
    Ok(Val::Ir(imp.t.cast(x, to)?))
}

/// Binary math; `Max`/`Min` are variadic in ONNX and fold left.
fn binary(imp: &mut Importer, op: BinaryOp, ins: &[Option<Val>]) -> NResult<Vec<Val>> {
    let first = input(ins, 0)?.clone();
    if matches!(op, BinaryOp::Max | BinaryOp::Min) && ins.len() == 1 {
        return Ok(vec![first]);
    }
    let mut acc = first;
    for i in 1..ins.len().max(2) {
        let mut rhs = input(ins, i)?.clone();
        if op == BinaryOp::Pow {
            // ONNX allows an exponent of another type (often an integer constant).
            let base = imp.ty(&acc)?.dtype;
            rhs = cast(imp, &rhs, base)?;
        }
        let v = bcast(imp, &[&acc, &rhs])?;
        acc = Val::Ir(imp.t.binary(op, v[0], v[1])?);
        if !matches!(op, BinaryOp::Max | BinaryOp::Min) {
            break;
        }
    }
    Ok(vec![acc])
}

/// `Dropout`: the identity unless `training_mode` is a constant true, in which case it is a
/// cleave `dropout` with the node's `seed` (0 when absent). The mask output is not supported.
fn dropout(imp: &mut Importer, n: &NodeCtx, ins: &[Option<Val>]) -> NResult<Vec<Val>> {
    if n.output_used(1) {
        return Err("the `mask` output is not supported".into());
    }
    let x = input(ins, 0)?;
    let training = match optional(ins, 2) {
        Some(t) => imp.const_ints(t, "training_mode")?.first().copied() == Some(1),
        None => false,
    };
    if !training {
        return Ok(vec![x.clone()]);
    }
    let ratio = match optional(ins, 1) {
        Some(r) => imp
            .const_floats(r, "ratio")?
            .first()
            .copied()
            .unwrap_or(0.5),
        None => 0.5,
    };
    let seed = n.int("seed", 0)? as u64;
    let xv = imp.ir(x)?;
    Ok(vec![Val::Ir(imp.t.dropout(xv, ratio, seed)?)])
}
