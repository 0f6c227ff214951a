//! Op attributes as they appear in the text format, and the two-way mapping between an [`Op`] and
//! its spelling `name {key = value, …}`.
//!
//! The printer and the parser share this mapping, which is what makes print → parse → print the
//! identity: [`op_attrs`] lists exactly the attributes that [`op_from_parts`] reads back, and every
//! attribute derivable from the declared result type is left out of both.

use std::fmt;

use crate::op::{BinaryOp, CompareOp, Literal, Op, PoolKind, ReduceKind, SteOp, UnaryOp};
use crate::types::{DType, TensorType};

/// An attribute value.
#[derive(Clone, Debug, PartialEq)]
pub enum Attr {
    /// An integer, e.g. `axis = 1`.
    Int(i64),
    /// A float, e.g. `eps = 1e-5` (always printed with a `.`, an exponent, `inf` or `nan`).
    Float(f64),
    /// `true` or `false`.
    Bool(bool),
    /// A double-quoted string.
    Str(String),
    /// A list of integers, e.g. `[0, 2, 1]`.
    Ints(Vec<i64>),
    /// A list of floats, e.g. `[1.0, 2.5]`.
    Floats(Vec<f64>),
    /// A list of booleans.
    Bools(Vec<bool>),
}

/// Formats a float so that it reads back as the same float and never as an integer.
pub fn fmt_float(x: f64) -> String {
    if x.is_nan() {
        "nan".to_string()
    } else if x.is_infinite() {
        if x > 0.0 { "inf" } else { "-inf" }.to_string()
    } else {
        // `{:?}` is the shortest representation that round-trips and always has `.` or `e`.
        format!("{x:?}")
    }
}

/// Escapes a string for the text format (`"` and `\` escaped, control characters as `\u{..}`).
pub fn fmt_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn join<T>(items: &[T], f: impl Fn(&T) -> String) -> String {
    items.iter().map(f).collect::<Vec<_>>().join(", ")
}

impl fmt::Display for Attr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Attr::Int(i) => write!(f, "{i}"),
            Attr::Float(x) => f.write_str(&fmt_float(*x)),
            Attr::Bool(b) => write!(f, "{b}"),
            Attr::Str(s) => f.write_str(&fmt_string(s)),
            Attr::Ints(v) => write!(f, "[{}]", join(v, |i| i.to_string())),
            Attr::Floats(v) => write!(f, "[{}]", join(v, |x| fmt_float(*x))),
            Attr::Bools(v) => write!(f, "[{}]", join(v, |b| b.to_string())),
        }
    }
}

fn ints(v: &[usize]) -> Attr {
    Attr::Ints(v.iter().map(|&i| i as i64).collect())
}

/// The attributes of an op, in printing order. Attributes that the declared result type fixes
/// (shapes of `reshape`/`broadcast`, the target of `cast`, …) are not listed.
pub fn op_attrs(op: &Op) -> Vec<(&'static str, Attr)> {
    match op {
        Op::Input { name, .. } | Op::Param { name, .. } => vec![("name", Attr::Str(name.clone()))],
        Op::Constant { value, .. } => {
            let attr = match value {
                Literal::Float(v) if v.len() == 1 => Attr::Float(v[0]),
                Literal::Float(v) => Attr::Floats(v.clone()),
                Literal::Int(v) if v.len() == 1 => Attr::Int(v[0]),
                Literal::Int(v) => Attr::Ints(v.clone()),
                Literal::Bool(v) if v.len() == 1 => Attr::Bool(v[0]),
                Literal::Bool(v) => Attr::Bools(v.clone()),
            };
            vec![("value", attr)]
        }
        Op::Iota { dim, .. } => vec![("dim", Attr::Int(*dim as i64))],
        Op::Unary(_)
        | Op::Binary(_)
        | Op::Compare(_)
        | Op::Select
        | Op::Cast { .. }
        | Op::Reshape { .. }
        | Op::CrossEntropy
        | Op::StopGradient
        | Op::Ste(SteOp::Round | SteOp::Sign) => vec![],
        Op::Ste(SteOp::ArgmaxOneHot { axis }) => vec![("axis", Attr::Int(*axis as i64))],
        Op::GradReverse { lambda } => vec![("lambda", Attr::Float(*lambda))],
        Op::Broadcast { dims, .. } => vec![("dims", ints(dims))],
        Op::Reduce { axes, .. } => vec![("axes", ints(axes))],
        Op::Transpose { perm } => vec![("perm", ints(perm))],
        Op::Slice {
            start,
            limit,
            stride,
        } => vec![
            ("start", ints(start)),
            ("limit", ints(limit)),
            ("stride", ints(stride)),
        ],
        Op::Concat { axis } => vec![("axis", Attr::Int(*axis as i64))],
        Op::Split { axis, sizes } => {
            vec![("axis", Attr::Int(*axis as i64)), ("sizes", ints(sizes))]
        }
        Op::Pad { low, high, value } => vec![
            ("low", ints(low)),
            ("high", ints(high)),
            ("value", Attr::Float(*value)),
        ],
        Op::MatMul {
            transpose_lhs,
            transpose_rhs,
        } => {
            let mut v = vec![];
            if *transpose_lhs {
                v.push(("transpose_lhs", Attr::Bool(true)));
            }
            if *transpose_rhs {
                v.push(("transpose_rhs", Attr::Bool(true)));
            }
            v
        }
        Op::Pool2d {
            kind,
            window,
            stride,
            padding,
            count_include_pad,
        } => {
            let mut v = vec![
                ("window", ints(window)),
                ("stride", ints(stride)),
                ("padding", ints(padding)),
            ];
            if *kind == PoolKind::Avg {
                v.push(("count_include_pad", Attr::Bool(*count_include_pad)));
            }
            v
        }
        Op::Conv2d {
            stride,
            padding,
            dilation,
            groups,
        }
        | Op::Conv2dGradInput {
            stride,
            padding,
            dilation,
            groups,
            ..
        }
        | Op::Conv2dGradWeight {
            stride,
            padding,
            dilation,
            groups,
            ..
        } => vec![
            ("stride", ints(stride)),
            ("padding", ints(padding)),
            ("dilation", ints(dilation)),
            ("groups", Attr::Int(*groups as i64)),
        ],
        Op::MaxPool2dGrad {
            window,
            stride,
            padding,
        } => vec![
            ("window", ints(window)),
            ("stride", ints(stride)),
            ("padding", ints(padding)),
        ],
        Op::AvgPool2dGrad {
            window,
            stride,
            padding,
            count_include_pad,
            ..
        } => vec![
            ("window", ints(window)),
            ("stride", ints(stride)),
            ("padding", ints(padding)),
            ("count_include_pad", Attr::Bool(*count_include_pad)),
        ],
        Op::Gather { axis } | Op::ScatterAdd { axis } => vec![("axis", Attr::Int(*axis as i64))],
        Op::Softmax { axis } | Op::LogSoftmax { axis } => {
            vec![("axis", Attr::Int(*axis as i64))]
        }
        Op::LayerNorm { eps } | Op::RmsNorm { eps } => vec![("eps", Attr::Float(*eps))],
        Op::OneHot { depth, .. } => vec![("depth", Attr::Int(*depth as i64))],
        Op::Dropout { rate, seed } => vec![
            ("rate", Attr::Float(*rate)),
            ("seed", Attr::Int(*seed as i64)),
        ],
    }
}

/// Attributes being read by [`op_from_parts`]: each read removes the entry, and whatever is left
/// at the end is reported as unknown.
struct AttrReader<'a> {
    op: &'a str,
    attrs: Vec<(String, Attr)>,
}

impl AttrReader<'_> {
    fn take(&mut self, key: &str) -> Option<Attr> {
        let pos = self.attrs.iter().position(|(k, _)| k == key)?;
        Some(self.attrs.remove(pos).1)
    }

    fn required(&mut self, key: &str) -> Result<Attr, String> {
        self.take(key)
            .ok_or_else(|| format!("`{}` needs attribute `{key}`", self.op))
    }

    fn uint(&mut self, key: &str) -> Result<usize, String> {
        match self.required(key)? {
            Attr::Int(i) if i >= 0 => Ok(i as usize),
            other => Err(format!(
                "attribute `{key}` of `{}` must be a non-negative integer, found `{other}`",
                self.op
            )),
        }
    }

    fn uints(&mut self, key: &str) -> Result<Vec<usize>, String> {
        match self.required(key)? {
            Attr::Ints(v) if v.iter().all(|&i| i >= 0) => Ok(v.iter().map(|&i| i as usize).collect()),
            other => Err(format!(
                "attribute `{key}` of `{}` must be a list of non-negative integers, found `{other}`",
                self.op
            )),
        }
    }

    fn pair(&mut self, key: &str) -> Result<[usize; 2], String> {
        let v = self.uints(key)?;
        <[usize; 2]>::try_from(v.as_slice())
            .map_err(|_| format!("attribute `{key}` of `{}` must have 2 entries", self.op))
    }

    fn quad(&mut self, key: &str) -> Result<[usize; 4], String> {
        let v = self.uints(key)?;
        <[usize; 4]>::try_from(v.as_slice()).map_err(|_| {
            format!(
                "attribute `{key}` of `{}` must have 4 entries [top, left, bottom, right]",
                self.op
            )
        })
    }

    fn float(&mut self, key: &str) -> Result<f64, String> {
        match self.required(key)? {
            Attr::Float(x) => Ok(x),
            Attr::Int(i) => Ok(i as f64),
            other => Err(format!(
                "attribute `{key}` of `{}` must be a number, found `{other}`",
                self.op
            )),
        }
    }

    fn flag(&mut self, key: &str) -> Result<bool, String> {
        match self.take(key) {
            None => Ok(false),
            Some(Attr::Bool(b)) => Ok(b),
            Some(other) => Err(format!(
                "attribute `{key}` of `{}` must be `true` or `false`, found `{other}`",
                self.op
            )),
        }
    }

    fn string(&mut self, key: &str) -> Result<String, String> {
        match self.required(key)? {
            Attr::Str(s) => Ok(s),
            other => Err(format!(
                "attribute `{key}` of `{}` must be a string, found `{other}`",
                self.op
            )),
        }
    }

    fn finish(self) -> Result<(), String> {
        match self.attrs.first() {
            None => Ok(()),
            Some((k, _)) => Err(format!("`{}` has no attribute `{k}`", self.op)),
        }
    }
}

/// Builds an op from its text-format parts: the op name, its attributes and its declared result
/// types. Errors are messages meant to be located by the caller (the parser) at the op.
pub fn op_from_parts(
    name: &str,
    attrs: Vec<(String, Attr)>,
    result_types: &[TensorType],
) -> Result<Op, String> {
    let mut r = AttrReader { op: name, attrs };
    let single = |what: &str| -> Result<TensorType, String> {
        match result_types {
            [t] => Ok(t.clone()),
            _ => Err(format!(
                "`{name}` has one result ({what}), but {} types are declared",
                result_types.len()
            )),
        }
    };
    let op = if let Some(u) = UnaryOp::ALL.into_iter().find(|u| u.name() == name) {
        Op::Unary(u)
    } else if let Some(b) = BinaryOp::ALL.into_iter().find(|b| b.name() == name) {
        Op::Binary(b)
    } else if let Some(c) = CompareOp::ALL.into_iter().find(|c| c.name() == name) {
        Op::Compare(c)
    } else if let Some(kind) = ReduceKind::ALL.into_iter().find(|k| k.name() == name) {
        Op::Reduce {
            kind,
            axes: r.uints("axes")?,
        }
    } else {
        match name {
            "input" => Op::Input {
                name: r.string("name")?,
                ty: single("the input")?,
            },
            "param" => Op::Param {
                name: r.string("name")?,
                ty: single("the parameter")?,
            },
            "constant" => {
                let ty = single("the constant")?;
                let value = match r.required("value")? {
                    Attr::Float(x) => Literal::Float(vec![x]),
                    Attr::Floats(v) => Literal::Float(v),
                    Attr::Int(i) if ty.dtype.is_float() => Literal::Float(vec![i as f64]),
                    Attr::Ints(v) if ty.dtype.is_float() => {
                        Literal::Float(v.into_iter().map(|i| i as f64).collect())
                    }
                    // `[]` reads as an empty int list: give an empty bool constant its kind back.
                    Attr::Ints(v) if v.is_empty() && ty.dtype == DType::Bool => {
                        Literal::Bool(vec![])
                    }
                    Attr::Int(i) => Literal::Int(vec![i]),
                    Attr::Ints(v) => Literal::Int(v),
                    Attr::Bool(b) => Literal::Bool(vec![b]),
                    Attr::Bools(v) => Literal::Bool(v),
                    Attr::Str(_) => return Err("a constant's value cannot be a string".into()),
                };
                Op::Constant { ty, value }
            }
            "iota" => Op::Iota {
                dim: r.uint("dim")?,
                ty: single("the iota")?,
            },
            "select" => Op::Select,
            "cast" => Op::Cast {
                to: single("the converted tensor")?.dtype,
            },
            "broadcast" => Op::Broadcast {
                dims: r.uints("dims")?,
                shape: single("the broadcast tensor")?.shape,
            },
            "reshape" => Op::Reshape {
                shape: single("the reshaped tensor")?.shape,
            },
            "transpose" => Op::Transpose {
                perm: r.uints("perm")?,
            },
            "slice" => Op::Slice {
                start: r.uints("start")?,
                limit: r.uints("limit")?,
                stride: r.uints("stride")?,
            },
            "concat" => Op::Concat {
                axis: r.uint("axis")?,
            },
            "split" => Op::Split {
                axis: r.uint("axis")?,
                sizes: r.uints("sizes")?,
            },
            "pad" => Op::Pad {
                low: r.uints("low")?,
                high: r.uints("high")?,
                value: r.float("value")?,
            },
            "matmul" => Op::MatMul {
                transpose_lhs: r.flag("transpose_lhs")?,
                transpose_rhs: r.flag("transpose_rhs")?,
            },
            "conv2d" => Op::Conv2d {
                stride: r.pair("stride")?,
                padding: r.quad("padding")?,
                dilation: r.pair("dilation")?,
                groups: r.uint("groups")?,
            },
            "max_pool2d" | "avg_pool2d" => Op::Pool2d {
                kind: if name == "max_pool2d" {
                    PoolKind::Max
                } else {
                    PoolKind::Avg
                },
                window: r.pair("window")?,
                stride: r.pair("stride")?,
                padding: r.quad("padding")?,
                count_include_pad: if name == "avg_pool2d" {
                    r.flag("count_include_pad")?
                } else {
                    false
                },
            },
            "conv2d_grad_input" => Op::Conv2dGradInput {
                stride: r.pair("stride")?,
                padding: r.quad("padding")?,
                dilation: r.pair("dilation")?,
                groups: r.uint("groups")?,
                shape: single("the input gradient")?.shape,
            },
            "conv2d_grad_weight" => Op::Conv2dGradWeight {
                stride: r.pair("stride")?,
                padding: r.quad("padding")?,
                dilation: r.pair("dilation")?,
                groups: r.uint("groups")?,
                shape: single("the weight gradient")?.shape,
            },
            "max_pool2d_grad" => Op::MaxPool2dGrad {
                window: r.pair("window")?,
                stride: r.pair("stride")?,
                padding: r.quad("padding")?,
            },
            "avg_pool2d_grad" => Op::AvgPool2dGrad {
                window: r.pair("window")?,
                stride: r.pair("stride")?,
                padding: r.quad("padding")?,
                count_include_pad: r.flag("count_include_pad")?,
                shape: single("the input gradient")?.shape,
            },
            "gather" => Op::Gather {
                axis: r.uint("axis")?,
            },
            "scatter_add" => Op::ScatterAdd {
                axis: r.uint("axis")?,
            },
            "softmax" => Op::Softmax {
                axis: r.uint("axis")?,
            },
            "log_softmax" => Op::LogSoftmax {
                axis: r.uint("axis")?,
            },
            "layer_norm" => Op::LayerNorm {
                eps: r.float("eps")?,
            },
            "rms_norm" => Op::RmsNorm {
                eps: r.float("eps")?,
            },
            "cross_entropy" => Op::CrossEntropy,
            "one_hot" => Op::OneHot {
                depth: r.uint("depth")?,
                dtype: single("the one-hot tensor")?.dtype,
            },
            "dropout" => Op::Dropout {
                rate: r.float("rate")?,
                // `op_attrs` prints the u64 seed as an i64, so seeds >= 2^63 print negative:
                // read any integer back with the same two's-complement reinterpretation.
                seed: match r.required("seed")? {
                    Attr::Int(i) => i as u64,
                    other => {
                        return Err(format!(
                            "attribute `seed` of `dropout` must be an integer, found `{other}`"
                        ))
                    }
                },
            },
            "stop_gradient" => Op::StopGradient,
            "ste_round" => Op::Ste(SteOp::Round),
            "ste_sign" => Op::Ste(SteOp::Sign),
            "ste_argmax_one_hot" => Op::Ste(SteOp::ArgmaxOneHot {
                axis: r.uint("axis")?,
            }),
            "grad_reverse" => Op::GradReverse {
                lambda: r.float("lambda")?,
            },
            _ => {
                return Err(format!(
                    "unknown op `{name}`; known ops: {}",
                    Op::all_names().join(", ")
                ))
            }
        }
    };
    r.finish()?;
    Ok(op)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropout_seeds_round_trip_through_attributes() {
        for seed in [0, 42, u64::MAX, 1 << 63] {
            let op = Op::Dropout { rate: 0.5, seed };
            let attrs = op_attrs(&op)
                .into_iter()
                .map(|(k, a)| (k.to_string(), a))
                .collect();
            let t = TensorType::new(crate::types::DType::F32, vec![2]);
            assert_eq!(op_from_parts("dropout", attrs, &[t]).unwrap(), op);
        }
    }
}
