//! The reference interpreter: the oracle for every pass and backend.
//!
//! [`run_function`] evaluates a [`Function`] on host [`Tensor`]s, node by node in `body` order,
//! exactly as each op's documentation in [`crate::op`] states. Clarity beats speed: kernels are
//! plain loops (with the few obvious precautions — contiguous inner loops in `matmul` — that keep
//! a small MLP or GPT well under a second in a debug build).
//!
//! ## Precision
//!
//! Every float computation is done in `f64` (integer ones in `i64`, wrapped to `i32` where the
//! value is `i32`). What happens to each float *result* depends on [`Precision`]:
//!
//! - [`Precision::F32`] (the faithful mode): every float op's result is rounded to the value's
//!   declared dtype — `f32` as by `as f32`, `f16`/`bf16` correctly rounded (ties to even),
//!   `f64` unchanged. Intermediate steps inside one op (the accumulation of a `matmul`, the sum of
//!   a softmax, …) stay in `f64` and are rounded once. Arguments must have exactly the declared
//!   types. Constants and `iota` values are rounded to their dtype too.
//! - [`Precision::F64`] (the gradient-check mode): no rounding at all. Every float value, whatever
//!   its declared float dtype, is computed and kept in `f64`, and is represented by a tensor of
//!   dtype `f64` (arguments, intermediates and results): a float argument of any float dtype is
//!   accepted as long as its shape matches, and float results come back as `f64` tensors.
//!   Conversions between float types (`cast`) are then identities.
//!
//! ## Choices where the op docs leave room (PyTorch's behaviour unless noted)
//!
//! - `sign(NaN)` is 0 (PyTorch computes `(0 < x) - (x < 0)`); `sign(±0)` is `+0`.
//!   `relu(NaN)` is NaN. `max`/`min` (binary, `reduce_*` and `max_pool2d`) propagate NaN.
//! - `gelu` is `x·Φ(x)` computed as `x·erfc(-x/√2)/2` (equal to PyTorch's
//!   `x·(1+erf(x/√2))/2` but without cancellation for very negative `x`); `erf`/`erfc` are
//!   fdlibm's (see `erf.rs`), accurate to an ulp.
//! - `sigmoid` is evaluated as `1/(1+e^-x)` for `x >= 0` and `e^x/(1+e^x)` otherwise (no overflow).
//! - Integer `div` truncates toward zero; `i32::MIN / -1` wraps to `i32::MIN` (likewise for
//!   `i64`). A zero divisor is an error naming the node and the element.
//! - `cast` float→int truncates toward zero, saturating at the target type's bounds, NaN→0
//!   (Rust's `as`); int→int wraps (two's complement, like PyTorch's `.to(torch.int32)`);
//!   float→bool is `x != 0` (so NaN→true); bool→number is 0 or 1.
//! - `pad` on an int tensor converts the fill value like a float→int `cast`.
//! - `reduce_max`/`reduce_min` over an empty set of elements is an error (as in PyTorch);
//!   `reduce_mean` over nothing is NaN (0/0) and `reduce_sum` over nothing is 0.
//! - `avg_pool2d` without `count_include_pad` over a window that holds no input element gives
//!   NaN (0/0); PyTorch rejects such paddings. `max_pool2d` windows always hold an element (the
//!   shape rule requires every padding to be smaller than the window).
//! - `gather` and `scatter_add` with an index outside `[0, extent)` (negative included) are
//!   errors naming the node, the index, its position and the extent; `cross_entropy` with a label
//!   outside `[0, C)` likewise. `one_hot` gives a zero row for such an index (as documented).
//! - `dropout` keeps element `i` (row-major flat index) iff
//!   [`dropout_keep(seed, i, rate)`](crate::dropout_keep) and multiplies kept elements by
//!   `1/(1-rate)`.
//!
//! ## Memory
//!
//! Each value is freed right after its last use (a use count per value, outputs counting as
//! uses), so memory stays bounded by the live set of the schedule given by `body`.

mod erf;
mod kernels;
mod tensor;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use cranelift_entity::EntityRef;

pub use erf::{erf, erfc};
pub use tensor::{round_to_dtype, wrap_to_dtype, Tensor, TensorData};

use crate::function::{Function, Node};
use crate::infer::infer;
use crate::op::Op;
use crate::printer::print_numbering;
use crate::types::{DType, TensorType};

/// How float results are rounded; see the [module docs](self).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Precision {
    /// Compute in f64, round every float op's result to its declared dtype.
    F32,
    /// Compute and keep every float value in f64 (no rounding at all).
    F64,
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::F64 => "f64",
        })
    }
}

/// An interpreter failure.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum InterpError {
    /// The arguments do not match the function's signature.
    #[error("bad arguments for @{function}: {problem}; expected arguments: {expected}")]
    Arguments {
        /// The function's name.
        function: String,
        /// What is wrong.
        problem: String,
        /// The expected arguments in order, as `input x: f32[2,3], param w: f32[3,4]`.
        expected: String,
    },
    /// A node failed (bad data such as an out-of-range index, or an ill-formed node).
    #[error("`{op}` at {value}: {message}")]
    Node {
        /// The op's text-format name.
        op: &'static str,
        /// The node's result value(s) as printed (`%7`, or `%3, %4`).
        value: String,
        /// What went wrong.
        message: String,
    },
    /// Malformed tensor data (byte counts, storage kinds).
    #[error("{0}")]
    Data(String),
    /// An output names a value that no node in `body` defines.
    #[error("output `{0}` is not defined by any node of the body")]
    UndefinedOutput(String),
}

/// The expected arguments of `func`, for error messages.
fn signature(func: &Function) -> String {
    let parts: Vec<String> = func
        .args()
        .map(|a| {
            let role = match a.role {
                crate::op::ArgRole::Data => "input",
                crate::op::ArgRole::Param => "param",
            };
            format!("{role} {}: {}", a.name, a.ty)
        })
        .collect();
    if parts.is_empty() {
        "(none)".into()
    } else {
        parts.join(", ")
    }
}

/// The type a value is represented with under `precision`.
fn effective(ty: &TensorType, precision: Precision) -> TensorType {
    if precision == Precision::F64 && ty.dtype.is_float() {
        TensorType::new(DType::F64, ty.shape.clone())
    } else {
        ty.clone()
    }
}

/// Checks one argument against its declared type and converts it to its representation.
fn bind_arg(declared: &TensorType, t: &Tensor, precision: Precision) -> Result<Tensor, String> {
    let dtype_ok = t.dtype == declared.dtype
        || (precision == Precision::F64 && declared.dtype.is_float() && t.dtype.is_float());
    if !dtype_ok || t.shape != declared.shape {
        let also = if precision == Precision::F64 && declared.dtype.is_float() {
            " (any float dtype with that shape, in f64 precision)"
        } else {
            ""
        };
        return Err(format!("expected {declared}{also}, got {}", t.ty()));
    }
    if !t.data.fits(t.dtype) || t.data.len() != t.numel() {
        return Err(format!(
            "tensor of type {} holds {} elements of the wrong kind or count",
            t.ty(),
            t.data.len()
        ));
    }
    let mut bound = t.clone();
    bound.dtype = effective(declared, precision).dtype;
    bound.normalize();
    Ok(bound)
}

/// Runs `func` on `args`, given in the order of [`Function::args`] (inputs and params
/// interleaved as they appear in `body`), and returns the results in `func.outputs` order.
pub fn run_function(
    func: &Function,
    args: &[Tensor],
    precision: Precision,
) -> Result<Vec<Tensor>, InterpError> {
    let bad = |problem: String| InterpError::Arguments {
        function: func.name.clone(),
        problem,
        expected: signature(func),
    };
    let declared: Vec<_> = func.args().collect();
    if declared.len() != args.len() {
        return Err(bad(format!(
            "expected {} arguments, got {}",
            declared.len(),
            args.len()
        )));
    }
    let mut bound = Vec::with_capacity(args.len());
    for (i, (a, t)) in declared.iter().zip(args).enumerate() {
        bound.push(
            bind_arg(a.ty, t, precision)
                .map_err(|e| bad(format!("argument {i} (`{}`): {e}", a.name)))?,
        );
    }
    execute(func, bound, precision)
}

/// Like [`run_function`], with the arguments given by name (e.g. a `&HashMap<String, Tensor>` or
/// a `&BTreeMap<String, Tensor>`). Missing, unknown, repeated or mis-typed arguments are an
/// [`InterpError::Arguments`] listing the expected names and types.
pub fn run_function_named<'a, K>(
    func: &Function,
    args: impl IntoIterator<Item = (&'a K, &'a Tensor)>,
    precision: Precision,
) -> Result<Vec<Tensor>, InterpError>
where
    K: AsRef<str> + ?Sized + 'a,
{
    let bad = |problem: String| InterpError::Arguments {
        function: func.name.clone(),
        problem,
        expected: signature(func),
    };
    let mut given: BTreeMap<&str, &Tensor> = BTreeMap::new();
    for (k, t) in args {
        if given.insert(k.as_ref(), t).is_some() {
            return Err(bad(format!("argument `{}` is given twice", k.as_ref())));
        }
    }
    let declared: Vec<_> = func.args().collect();
    let names: BTreeSet<&str> = declared.iter().map(|a| a.name).collect();
    let missing: Vec<&str> = declared
        .iter()
        .map(|a| a.name)
        .filter(|n| !given.contains_key(n))
        .collect();
    let unknown: Vec<&str> = given
        .keys()
        .copied()
        .filter(|n| !names.contains(n))
        .collect();
    let mut problems = Vec::new();
    if !missing.is_empty() {
        problems.push(format!("missing {}", quote_list(&missing)));
    }
    if !unknown.is_empty() {
        problems.push(format!("unknown {}", quote_list(&unknown)));
    }
    let mut bound = Vec::with_capacity(declared.len());
    for a in &declared {
        if let Some(t) = given.get(a.name) {
            match bind_arg(a.ty, t, precision) {
                Ok(b) => bound.push(b),
                Err(e) => problems.push(format!("`{}`: {e}", a.name)),
            }
        }
    }
    if !problems.is_empty() {
        return Err(bad(problems.join("; ")));
    }
    execute(func, bound, precision)
}

fn quote_list(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Names a node for error messages: its op and its result values as printed.
fn node_error(func: &Function, node: Node, message: String) -> InterpError {
    let numbering = print_numbering(func);
    let data = &func.nodes[node];
    let value = data
        .results
        .iter()
        .map(|&v| match numbering[v] {
            Some(n) => format!("%{n}"),
            None => format!("%undefined{}", v.as_u32()),
        })
        .collect::<Vec<_>>()
        .join(", ");
    InterpError::Node {
        op: data.op.name(),
        value,
        message,
    }
}

/// Evaluates the body with the bound arguments (in argument order).
fn execute(
    func: &Function,
    args: Vec<Tensor>,
    precision: Precision,
) -> Result<Vec<Tensor>, InterpError> {
    let mut uses = func.use_counts();
    let mut env: Vec<Option<Tensor>> = vec![None; func.values.len()];
    let mut args = args.into_iter();
    for &node in &func.body {
        let data = &func.nodes[node];
        let fail = |message: String| node_error(func, node, message);
        // The declared result types must be what the op and the operands imply; this makes the
        // kernels' indexing safe on unverified input.
        let operand_types: Vec<&TensorType> = data.operands.iter().map(|&v| func.ty(v)).collect();
        let declared: Vec<TensorType> = data.results.iter().map(|&v| func.ty(v).clone()).collect();
        match infer(&data.op, &operand_types) {
            Ok(inferred) if inferred == declared => {}
            Ok(inferred) => {
                return Err(fail(format!(
                    "declared result types {} differ from the inferred {}",
                    list_types(&declared),
                    list_types(&inferred)
                )))
            }
            Err(e) => return Err(fail(format!("ill-typed node: {e}"))),
        }
        let out_types: Vec<TensorType> = declared.iter().map(|t| effective(t, precision)).collect();
        let results: Vec<Tensor> = if matches!(data.op, Op::Input { .. } | Op::Param { .. }) {
            vec![args.next().expect("one bound tensor per argument")]
        } else {
            let mut operands = Vec::with_capacity(data.operands.len());
            for &v in &data.operands {
                match env.get(v.index()).and_then(Option::as_ref) {
                    Some(t) => operands.push(t),
                    None => {
                        return Err(fail(format!(
                            "operand {v} is not defined by an earlier node (or was freed)"
                        )))
                    }
                }
            }
            let datas = kernels::eval(&data.op, &operands, &out_types).map_err(&fail)?;
            let mut results = Vec::with_capacity(datas.len());
            for (d, ty) in datas.into_iter().zip(&out_types) {
                if !d.fits(ty.dtype) || d.len() != ty.num_elements() {
                    return Err(fail(format!(
                        "internal error: kernel produced {} elements of the wrong kind for {ty}",
                        d.len()
                    )));
                }
                let mut t = Tensor {
                    dtype: ty.dtype,
                    shape: ty.shape.clone(),
                    data: d,
                };
                t.normalize();
                results.push(t);
            }
            results
        };
        for &v in &data.operands {
            uses[v] -= 1;
            if uses[v] == 0 {
                env[v.index()] = None;
            }
        }
        for (&v, t) in data.results.iter().zip(results) {
            if uses[v] > 0 {
                env[v.index()] = Some(t);
            }
        }
        #[cfg(test)]
        tests::record_live(env.iter().filter(|t| t.is_some()).count());
    }
    func.outputs
        .iter()
        .map(|o| {
            env.get(o.value.index())
                .and_then(Option::clone)
                .ok_or_else(|| InterpError::UndefinedOutput(o.name.clone()))
        })
        .collect()
}

fn list_types(types: &[TensorType]) -> String {
    types
        .iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;
    use crate::op::UnaryOp;

    thread_local! {
        static PEAK_LIVE: Cell<usize> = const { Cell::new(0) };
    }

    pub(super) fn record_live(n: usize) {
        PEAK_LIVE.with(|p| p.set(p.get().max(n)));
    }

    #[test]
    fn values_are_freed_after_their_last_use() {
        let t = TensorType::new(DType::F32, vec![4]);
        let mut f = Function::new("chain");
        let x = f.push_node(
            Op::Input {
                name: "x".into(),
                ty: t.clone(),
            },
            vec![],
            vec![t.clone()],
        );
        let mut v = f.result(x);
        for _ in 0..50 {
            let n = f.push_node(Op::Unary(UnaryOp::Neg), vec![v], vec![t.clone()]);
            v = f.result(n);
        }
        f.outputs.push(crate::function::Output {
            name: "y".into(),
            value: v,
        });
        PEAK_LIVE.with(|p| p.set(0));
        let x = Tensor::from_f32([4], vec![1.0, 2.0, 3.0, 4.0]);
        let r = run_function(&f, std::slice::from_ref(&x), Precision::F32).unwrap();
        assert_eq!(r[0], x);
        assert_eq!(PEAK_LIVE.with(|p| p.get()), 1);
    }
}
