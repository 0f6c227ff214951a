//! A Rust builder API for cleave IR, with shape inference at every step.
//!
//! A [`Tracer`] owns the [`Function`] being built. Every op method checks its operands with
//! [`infer()`](crate::infer::infer) before it adds a node, so a model that traces without error is well typed, and
//! a shape mistake is reported where it is made, with the model scope it was made in:
//!
//! ```
//! use cleave_ir::tracer::Tracer;
//! use cleave_ir::DType;
//!
//! let mut t = Tracer::new("demo");
//! let x = t.input("x", DType::F32, [8, 64]).unwrap();
//! t.push_scope("layers.3.attn");
//! let w = t.param("wq", DType::F32, [32, 64]).unwrap();
//! let err = t.matmul(x, w).unwrap_err();
//! assert_eq!(
//!     err.to_string(),
//!     "layers.3.attn: `matmul`: contraction extents differ: lhs has K = 64, rhs has K = 32 \
//!      (operands: f32[8,64], f32[32,64])"
//! );
//! ```
//!
//! Values are plain [`Value`] handles into the function being built; [`Tracer::ty`] gives their
//! types. Nodes get the tracer's current [`Phase`] ([`Tracer::set_phase`]) and pipeline stage
//! ([`Tracer::set_stage`]). Parameter names get the current scope as a prefix
//! (`push_scope("layers.0")`, `push_scope("attn")`, `param("wq", …)` names `layers.0.attn.wq`);
//! data input and output names do not. Argument names and output names must be unique.
//!
//! Besides one method per op, the tracer has a few conveniences that expand to several nodes:
//! numpy-style [`Tracer::broadcast_to`] and [`Tracer::binary_bcast`], and the model building blocks
//! [`Tracer::linear`], [`Tracer::layer_norm_affine`] and [`Tracer::rms_norm_affine`].

use std::collections::HashSet;
use std::fmt;

use crate::function::{Function, Phase, Value};
use crate::infer::{infer, TypeError};
use crate::op::{BinaryOp, CompareOp, Literal, Op, PoolKind, ReduceKind, UnaryOp};
use crate::types::{DType, Shape, TensorType};

/// The `eps` used by [`Tracer::layer_norm_affine`] and [`Tracer::rms_norm_affine`].
pub const DEFAULT_NORM_EPS: f64 = 1e-5;

/// An error while tracing: a violated shape rule, or a name clash.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TraceError {
    /// An op's shape or type rule failed (the [`TypeError`] names the op and operand types).
    #[error("{}{source}", ScopePrefix(scope))]
    Op {
        /// The model scope the op was traced in (`layers.3.attn`), empty at top level.
        scope: String,
        /// The violated rule.
        source: TypeError,
    },
    /// Two arguments (`input`s or `param`s) got the same name.
    #[error("{}duplicate argument name `{name}`", ScopePrefix(scope))]
    DuplicateArg {
        /// The model scope.
        scope: String,
        /// The full (scoped) argument name.
        name: String,
    },
    /// Two outputs got the same name.
    #[error("{}duplicate output name `{name}`", ScopePrefix(scope))]
    DuplicateOutput {
        /// The model scope.
        scope: String,
        /// The output name.
        name: String,
    },
}

struct ScopePrefix<'a>(&'a String);

impl fmt::Display for ScopePrefix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            Ok(())
        } else {
            write!(f, "{}: ", self.0)
        }
    }
}

impl TraceError {
    /// The underlying shape-rule violation, if this is one.
    pub fn type_error(&self) -> Option<&TypeError> {
        match self {
            TraceError::Op { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Builds a [`Function`] op by op, checking every op's shape rule as it goes.
#[derive(Clone, Debug)]
pub struct Tracer {
    func: Function,
    phase: Phase,
    stage: Option<u32>,
    scope: Vec<String>,
    arg_names: HashSet<String>,
}

macro_rules! unary_methods {
    ($($(#[$doc:meta])* $name:ident => $op:ident;)*) => {
        $(
            $(#[$doc])*
            pub fn $name(&mut self, x: Value) -> Result<Value, TraceError> {
                self.unary(UnaryOp::$op, x)
            }
        )*
    };
}

macro_rules! binary_methods {
    ($($(#[$doc:meta])* $name:ident => $op:ident;)*) => {
        $(
            $(#[$doc])*
            pub fn $name(&mut self, a: Value, b: Value) -> Result<Value, TraceError> {
                self.binary(BinaryOp::$op, a, b)
            }
        )*
    };
}

impl Tracer {
    /// A tracer for an empty function called `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Tracer {
            func: Function::new(name),
            phase: Phase::Forward,
            stage: None,
            scope: Vec::new(),
            arg_names: HashSet::new(),
        }
    }

    /// A tracer that appends to an existing function (passes use it to emit new nodes with the
    /// same shape checks). Its argument names are taken, so new arguments cannot clash with them.
    pub fn from_function(func: Function) -> Self {
        let arg_names = func.args().map(|a| a.name.to_string()).collect();
        Tracer {
            func,
            phase: Phase::Forward,
            stage: None,
            scope: Vec::new(),
            arg_names,
        }
    }

    /// The finished function.
    pub fn finish(self) -> Function {
        self.func
    }

    /// The function built so far.
    pub fn func(&self) -> &Function {
        &self.func
    }

    /// The type of a value.
    pub fn ty(&self, v: Value) -> &TensorType {
        self.func.ty(v)
    }

    /// The shape of a value.
    pub fn shape(&self, v: Value) -> &[usize] {
        &self.func.ty(v).shape
    }

    /// The phase given to nodes traced from now on.
    pub fn set_phase(&mut self, phase: Phase) {
        self.phase = phase;
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The pipeline stage given to nodes traced from now on (`None`: unassigned).
    pub fn set_stage(&mut self, stage: Option<u32>) {
        self.stage = stage;
    }

    /// The current pipeline stage.
    pub fn stage(&self) -> Option<u32> {
        self.stage
    }

    /// Enters a name scope; `name` may itself be dotted (`"layers.0"`).
    pub fn push_scope(&mut self, name: impl Into<String>) {
        self.scope.push(name.into());
    }

    /// Leaves the innermost name scope (no-op at top level).
    pub fn pop_scope(&mut self) {
        self.scope.pop();
    }

    /// Runs `f` inside the name scope `name`, leaving it again even when `f` fails.
    pub fn scoped<R>(
        &mut self,
        name: impl Into<String>,
        f: impl FnOnce(&mut Self) -> Result<R, TraceError>,
    ) -> Result<R, TraceError> {
        self.push_scope(name);
        let r = f(self);
        self.pop_scope();
        r
    }

    /// The current scope, dotted (`"layers.0.attn"`); empty at top level.
    pub fn scope(&self) -> String {
        self.scope.join(".")
    }

    /// `name` with the current scope as prefix (`layers.0.attn.wq`).
    pub fn scoped_name(&self, name: &str) -> String {
        if self.scope.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.scope())
        }
    }

    fn op_error(&self, source: TypeError) -> TraceError {
        TraceError::Op {
            scope: self.scope(),
            source,
        }
    }

    /// A rule violation found by the tracer or a model builder rather than by [`infer()`], in the
    /// same format: `scope: `op`: message (operands: …)`.
    pub fn error(&self, op: &'static str, operands: &[Value], message: String) -> TraceError {
        self.op_error(TypeError {
            op,
            operands: operands
                .iter()
                .map(|&v| {
                    if self.func.values.is_valid(v) {
                        self.ty(v).to_string()
                    } else {
                        format!("{v}?")
                    }
                })
                .collect(),
            message,
        })
    }

    /// Adds a node for `op` after checking it with [`infer()`]; returns all its results.
    pub fn push_op(&mut self, op: Op, operands: &[Value]) -> Result<Vec<Value>, TraceError> {
        if let Some(&bad) = operands.iter().find(|&&v| !self.func.values.is_valid(v)) {
            return Err(self.error(
                op.name(),
                operands,
                format!("operand {bad} does not belong to this tracer"),
            ));
        }
        let types: Vec<&TensorType> = operands.iter().map(|&v| self.func.ty(v)).collect();
        let result_types = infer(&op, &types).map_err(|e| self.op_error(e))?;
        let node = self.func.push_node(op, operands.to_vec(), result_types);
        let data = &mut self.func.nodes[node];
        data.phase = self.phase;
        data.stage = self.stage;
        Ok(data.results.clone())
    }

    fn push1(&mut self, op: Op, operands: &[Value]) -> Result<Value, TraceError> {
        Ok(self.push_op(op, operands)?[0])
    }

    fn claim_arg_name(&mut self, name: String) -> Result<String, TraceError> {
        if !self.arg_names.insert(name.clone()) {
            return Err(TraceError::DuplicateArg {
                scope: self.scope(),
                name,
            });
        }
        Ok(name)
    }

    // ----- arguments, constants, outputs -----

    /// A data input `name` (not scoped).
    pub fn input(
        &mut self,
        name: &str,
        dtype: DType,
        shape: impl Into<Shape>,
    ) -> Result<Value, TraceError> {
        let name = self.claim_arg_name(name.to_string())?;
        let ty = TensorType::new(dtype, shape);
        self.push1(Op::Input { name, ty }, &[])
    }

    /// A parameter named `name` inside the current scope.
    pub fn param(
        &mut self,
        name: &str,
        dtype: DType,
        shape: impl Into<Shape>,
    ) -> Result<Value, TraceError> {
        let name = self.claim_arg_name(self.scoped_name(name))?;
        let ty = TensorType::new(dtype, shape);
        self.push1(Op::Param { name, ty }, &[])
    }

    /// A constant tensor.
    pub fn constant(&mut self, ty: TensorType, value: Literal) -> Result<Value, TraceError> {
        self.push1(Op::Constant { ty, value }, &[])
    }

    /// A splat constant with every element `x`: a float literal for float types, `x` truncated
    /// for integer types, `x != 0` for `bool`.
    pub fn constant_f(
        &mut self,
        dtype: DType,
        shape: impl Into<Shape>,
        x: f64,
    ) -> Result<Value, TraceError> {
        let value = if dtype.is_float() {
            Literal::Float(vec![x])
        } else if dtype.is_int() {
            Literal::Int(vec![x as i64])
        } else {
            Literal::Bool(vec![x != 0.0])
        };
        self.constant(TensorType::new(dtype, shape), value)
    }

    /// A scalar (rank-0) constant; see [`Tracer::constant_f`].
    pub fn scalar(&mut self, dtype: DType, x: f64) -> Result<Value, TraceError> {
        self.constant_f(dtype, Shape::new(), x)
    }

    /// `iota`: the element at index `i` is `i[dim]`.
    pub fn iota(
        &mut self,
        dtype: DType,
        shape: impl Into<Shape>,
        dim: usize,
    ) -> Result<Value, TraceError> {
        let ty = TensorType::new(dtype, shape);
        self.push1(Op::Iota { ty, dim }, &[])
    }

    /// Returns `v` from the function as `name`.
    pub fn output(&mut self, name: &str, v: Value) -> Result<(), TraceError> {
        if !self.func.values.is_valid(v) {
            return Err(self.error(
                "output",
                &[],
                format!("value {v} does not belong to this tracer"),
            ));
        }
        if self.func.outputs.iter().any(|o| o.name == name) {
            return Err(TraceError::DuplicateOutput {
                scope: self.scope(),
                name: name.to_string(),
            });
        }
        self.func.outputs.push(crate::function::Output {
            name: name.to_string(),
            value: v,
        });
        Ok(())
    }

    // ----- elementwise -----

    /// An elementwise unary op.
    pub fn unary(&mut self, op: UnaryOp, x: Value) -> Result<Value, TraceError> {
        self.push1(Op::Unary(op), &[x])
    }

    unary_methods! {
        /// `-x`.
        neg => Neg;
        /// `|x|`.
        abs => Abs;
        /// `e^x`.
        exp => Exp;
        /// Natural logarithm.
        log => Log;
        /// Square root.
        sqrt => Sqrt;
        /// `1/sqrt(x)`.
        rsqrt => Rsqrt;
        /// Hyperbolic tangent.
        tanh => Tanh;
        /// Logistic sigmoid.
        sigmoid => Sigmoid;
        /// `max(x, 0)`.
        relu => Relu;
        /// GELU with the exact (erf) normal CDF.
        gelu => Gelu;
        /// GELU, tanh approximation.
        gelu_tanh => GeluTanh;
        /// `x·sigmoid(x)`.
        silu => Silu;
        /// Sine.
        sin => Sin;
        /// Cosine.
        cos => Cos;
        /// The error function.
        erf => Erf;
        /// `1/x`.
        reciprocal => Reciprocal;
        /// `-1`, `0` or `1`.
        sign => Sign;
        /// Round toward negative infinity.
        floor => Floor;
        /// Round to nearest, ties to even.
        round => Round;
        /// Logical not.
        not => Not;
    }

    /// An elementwise binary op on operands of equal type.
    pub fn binary(&mut self, op: BinaryOp, a: Value, b: Value) -> Result<Value, TraceError> {
        self.push1(Op::Binary(op), &[a, b])
    }

    binary_methods! {
        /// `a + b`.
        add => Add;
        /// `a - b`.
        sub => Sub;
        /// `a · b`.
        mul => Mul;
        /// `a / b`.
        div => Div;
        /// Elementwise maximum.
        max => Max;
        /// Elementwise minimum.
        min => Min;
        /// `a^b`.
        pow => Pow;
        /// Logical and.
        and => And;
        /// Logical or.
        or => Or;
    }

    /// A binary op after numpy-style broadcasting of both operands to their common shape
    /// (see [`Tracer::broadcast_shape`]).
    pub fn binary_bcast(&mut self, op: BinaryOp, a: Value, b: Value) -> Result<Value, TraceError> {
        let shape = self.broadcast_shape(op.name(), a, b)?;
        let a = self.broadcast_to(a, shape.clone())?;
        let b = self.broadcast_to(b, shape)?;
        self.binary(op, a, b)
    }

    /// An elementwise comparison; the result is `bool`.
    pub fn compare(&mut self, op: CompareOp, a: Value, b: Value) -> Result<Value, TraceError> {
        self.push1(Op::Compare(op), &[a, b])
    }

    /// `cond ? a : b`, elementwise.
    pub fn select(&mut self, cond: Value, a: Value, b: Value) -> Result<Value, TraceError> {
        self.push1(Op::Select, &[cond, a, b])
    }

    /// Element type conversion.
    pub fn cast(&mut self, x: Value, to: DType) -> Result<Value, TraceError> {
        self.push1(Op::Cast { to }, &[x])
    }

    // ----- shapes -----

    /// `broadcast`: operand dimension `i` becomes result dimension `dims[i]`.
    pub fn broadcast(
        &mut self,
        x: Value,
        shape: impl Into<Shape>,
        dims: impl Into<Vec<usize>>,
    ) -> Result<Value, TraceError> {
        self.push1(
            Op::Broadcast {
                shape: shape.into(),
                dims: dims.into(),
            },
            &[x],
        )
    }

    /// Numpy-style broadcast: the operand's dimensions align with the trailing dimensions of
    /// `shape`, and each must equal its result extent or be 1. Returns `x` itself (no node) when
    /// it already has the shape.
    pub fn broadcast_to(&mut self, x: Value, shape: impl Into<Shape>) -> Result<Value, TraceError> {
        let shape = shape.into();
        let xs = self.shape(x);
        if xs == shape.as_slice() {
            return Ok(x);
        }
        if xs.len() > shape.len() {
            return Err(self.error(
                "broadcast_to",
                &[x],
                format!(
                    "cannot broadcast rank {} to the lower rank of {}",
                    xs.len(),
                    crate::types::fmt_shape(&shape)
                ),
            ));
        }
        let offset = shape.len() - xs.len();
        let dims: Vec<usize> = (offset..shape.len()).collect();
        self.broadcast(x, shape, dims)
    }

    /// The numpy broadcast of two values' shapes (trailing dimensions aligned; extents equal or 1).
    pub fn broadcast_shape(
        &self,
        op: &'static str,
        a: Value,
        b: Value,
    ) -> Result<Shape, TraceError> {
        let (sa, sb) = (self.shape(a), self.shape(b));
        let r = sa.len().max(sb.len());
        let mut out = vec![0; r];
        for (i, o) in out.iter_mut().enumerate() {
            let da = (i + sa.len()).checked_sub(r).map_or(1, |j| sa[j]);
            let db = (i + sb.len()).checked_sub(r).map_or(1, |j| sb[j]);
            *o = match (da, db) {
                (x, y) if x == y => x,
                (1, y) => y,
                (x, 1) => x,
                _ => {
                    return Err(self.error(
                        op,
                        &[a, b],
                        format!("shapes do not broadcast: dimension {i} has extents {da} and {db}"),
                    ))
                }
            };
        }
        Ok(out)
    }

    /// A reduction over `axes` (which are removed from the shape).
    pub fn reduce(
        &mut self,
        kind: ReduceKind,
        x: Value,
        axes: impl Into<Vec<usize>>,
    ) -> Result<Value, TraceError> {
        self.push1(
            Op::Reduce {
                kind,
                axes: axes.into(),
            },
            &[x],
        )
    }

    /// Sum over `axes`.
    pub fn reduce_sum(
        &mut self,
        x: Value,
        axes: impl Into<Vec<usize>>,
    ) -> Result<Value, TraceError> {
        self.reduce(ReduceKind::Sum, x, axes)
    }

    /// Mean over `axes`.
    pub fn reduce_mean(
        &mut self,
        x: Value,
        axes: impl Into<Vec<usize>>,
    ) -> Result<Value, TraceError> {
        self.reduce(ReduceKind::Mean, x, axes)
    }

    /// Maximum over `axes`.
    pub fn reduce_max(
        &mut self,
        x: Value,
        axes: impl Into<Vec<usize>>,
    ) -> Result<Value, TraceError> {
        self.reduce(ReduceKind::Max, x, axes)
    }

    /// Mean over every axis, giving a scalar.
    pub fn mean_all(&mut self, x: Value) -> Result<Value, TraceError> {
        let axes: Vec<usize> = (0..self.ty(x).rank()).collect();
        self.reduce_mean(x, axes)
    }

    /// Same elements, new shape.
    pub fn reshape(&mut self, x: Value, shape: impl Into<Shape>) -> Result<Value, TraceError> {
        self.push1(
            Op::Reshape {
                shape: shape.into(),
            },
            &[x],
        )
    }

    /// Result dimension `i` is operand dimension `perm[i]`.
    pub fn transpose(
        &mut self,
        x: Value,
        perm: impl Into<Vec<usize>>,
    ) -> Result<Value, TraceError> {
        self.push1(Op::Transpose { perm: perm.into() }, &[x])
    }

    /// A strided slice.
    pub fn slice(
        &mut self,
        x: Value,
        start: impl Into<Vec<usize>>,
        limit: impl Into<Vec<usize>>,
        stride: impl Into<Vec<usize>>,
    ) -> Result<Value, TraceError> {
        self.push1(
            Op::Slice {
                start: start.into(),
                limit: limit.into(),
                stride: stride.into(),
            },
            &[x],
        )
    }

    /// Joins `xs` along `axis`.
    pub fn concat(&mut self, xs: &[Value], axis: usize) -> Result<Value, TraceError> {
        self.push1(Op::Concat { axis }, xs)
    }

    /// Cuts `x` along `axis` into pieces of the given sizes.
    pub fn split(
        &mut self,
        x: Value,
        axis: usize,
        sizes: impl Into<Vec<usize>>,
    ) -> Result<Vec<Value>, TraceError> {
        self.push_op(
            Op::Split {
                axis,
                sizes: sizes.into(),
            },
            &[x],
        )
    }

    /// Pads with `value`: `low[i]` elements before and `high[i]` after dimension `i`.
    pub fn pad(
        &mut self,
        x: Value,
        low: impl Into<Vec<usize>>,
        high: impl Into<Vec<usize>>,
        value: f64,
    ) -> Result<Value, TraceError> {
        self.push1(
            Op::Pad {
                low: low.into(),
                high: high.into(),
                value,
            },
            &[x],
        )
    }

    // ----- contractions, windows, indexing -----

    /// Batched matrix product `a · b`.
    pub fn matmul(&mut self, a: Value, b: Value) -> Result<Value, TraceError> {
        self.matmul_t(a, b, false, false)
    }

    /// Batched matrix product with optional transposes of the last two dimensions.
    pub fn matmul_t(
        &mut self,
        a: Value,
        b: Value,
        transpose_lhs: bool,
        transpose_rhs: bool,
    ) -> Result<Value, TraceError> {
        self.push1(
            Op::MatMul {
                transpose_lhs,
                transpose_rhs,
            },
            &[a, b],
        )
    }

    /// 2-D cross-correlation of `x` `[N,C,H,W]` with `w` `[O,C/groups,KH,KW]`; `padding` is
    /// `[top, left, bottom, right]`.
    pub fn conv2d(
        &mut self,
        x: Value,
        w: Value,
        stride: [usize; 2],
        padding: [usize; 4],
        dilation: [usize; 2],
        groups: usize,
    ) -> Result<Value, TraceError> {
        self.push1(
            Op::Conv2d {
                stride,
                padding,
                dilation,
                groups,
            },
            &[x, w],
        )
    }

    /// Max pooling over `[N,C,H,W]`.
    pub fn max_pool2d(
        &mut self,
        x: Value,
        window: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 4],
    ) -> Result<Value, TraceError> {
        self.push1(
            Op::Pool2d {
                kind: PoolKind::Max,
                window,
                stride,
                padding,
                count_include_pad: false,
            },
            &[x],
        )
    }

    /// Average pooling over `[N,C,H,W]`.
    pub fn avg_pool2d(
        &mut self,
        x: Value,
        window: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 4],
        count_include_pad: bool,
    ) -> Result<Value, TraceError> {
        self.push1(
            Op::Pool2d {
                kind: PoolKind::Avg,
                window,
                stride,
                padding,
                count_include_pad,
            },
            &[x],
        )
    }

    /// Picks slices of `table` along `axis` (an embedding lookup for `axis = 0`).
    pub fn gather(&mut self, table: Value, idx: Value, axis: usize) -> Result<Value, TraceError> {
        self.push1(Op::Gather { axis }, &[table, idx])
    }

    /// `base` with the slices of `upd` added at the indices along `axis`.
    pub fn scatter_add(
        &mut self,
        base: Value,
        idx: Value,
        upd: Value,
        axis: usize,
    ) -> Result<Value, TraceError> {
        self.push1(Op::ScatterAdd { axis }, &[base, idx, upd])
    }

    // ----- composite primitives -----

    /// Softmax along `axis`.
    pub fn softmax(&mut self, x: Value, axis: usize) -> Result<Value, TraceError> {
        self.push1(Op::Softmax { axis }, &[x])
    }

    /// Log-softmax along `axis`.
    pub fn log_softmax(&mut self, x: Value, axis: usize) -> Result<Value, TraceError> {
        self.push1(Op::LogSoftmax { axis }, &[x])
    }

    /// Layer normalisation over the last dimension (no affine part).
    pub fn layer_norm(&mut self, x: Value, eps: f64) -> Result<Value, TraceError> {
        self.push1(Op::LayerNorm { eps }, &[x])
    }

    /// RMS normalisation over the last dimension (no scale).
    pub fn rms_norm(&mut self, x: Value, eps: f64) -> Result<Value, TraceError> {
        self.push1(Op::RmsNorm { eps }, &[x])
    }

    /// Per-position cross-entropy of `logits` `[B…,C]` against `labels` `[B…]`.
    pub fn cross_entropy(&mut self, logits: Value, labels: Value) -> Result<Value, TraceError> {
        self.push1(Op::CrossEntropy, &[logits, labels])
    }

    /// One-hot encoding with `depth` classes.
    pub fn one_hot(&mut self, idx: Value, depth: usize, dtype: DType) -> Result<Value, TraceError> {
        self.push1(Op::OneHot { depth, dtype }, &[idx])
    }

    /// Dropout with a seeded mask.
    pub fn dropout(&mut self, x: Value, rate: f64, seed: u64) -> Result<Value, TraceError> {
        self.push1(Op::Dropout { rate, seed }, &[x])
    }

    /// Identity forward, no gradient.
    pub fn stop_gradient(&mut self, x: Value) -> Result<Value, TraceError> {
        self.push1(Op::StopGradient, &[x])
    }

    // ----- model building blocks -----

    /// A dense layer on the last dimension of `x` (rank ≥ 2, last extent `in_features`): the
    /// leading dimensions are flattened to `[N, in]`, multiplied by the parameter
    /// `{name}.weight` `[in, out]`, the parameter `{name}.bias` `[out]` is broadcast-added when
    /// `bias`, and the result is reshaped back to `[…, out]`.
    pub fn linear(
        &mut self,
        x: Value,
        in_features: usize,
        out_features: usize,
        bias: bool,
        name: &str,
    ) -> Result<Value, TraceError> {
        let ty = self.ty(x).clone();
        if ty.rank() < 2 || ty.shape[ty.rank() - 1] != in_features {
            return Err(self.error(
                "linear",
                &[x],
                format!(
                    "`{}` needs an input of rank >= 2 with last extent {in_features}",
                    self.scoped_name(name)
                ),
            ));
        }
        let lead = &ty.shape[..ty.rank() - 1];
        let n: usize = lead.iter().product();
        let flat = if ty.rank() == 2 {
            x
        } else {
            self.reshape(x, [n, in_features])?
        };
        let w = self.param(
            &format!("{name}.weight"),
            ty.dtype,
            [in_features, out_features],
        )?;
        let mut y = self.matmul(flat, w)?;
        if bias {
            let b = self.param(&format!("{name}.bias"), ty.dtype, [out_features])?;
            let bb = self.broadcast(b, [n, out_features], [1])?;
            y = self.add(y, bb)?;
        }
        if ty.rank() == 2 {
            Ok(y)
        } else {
            let mut shape = lead.to_vec();
            shape.push(out_features);
            self.reshape(y, shape)
        }
    }

    /// Multiplies by the broadcast parameter `{name}.weight` `[last]` and, when `bias`, adds
    /// `{name}.bias` `[last]`, where `last` is the last extent of `x`.
    fn affine(&mut self, x: Value, name: &str, bias: bool) -> Result<Value, TraceError> {
        let ty = self.ty(x).clone();
        let last = ty.shape.last().copied().unwrap_or(1);
        let dims = [ty.rank().saturating_sub(1)];
        let w = self.param(&format!("{name}.weight"), ty.dtype, [last])?;
        let wb = self.broadcast(w, ty.shape.clone(), dims)?;
        let mut y = self.mul(x, wb)?;
        if bias {
            let b = self.param(&format!("{name}.bias"), ty.dtype, [last])?;
            let bb = self.broadcast(b, ty.shape.clone(), dims)?;
            y = self.add(y, bb)?;
        }
        Ok(y)
    }

    /// `layer_norm` (eps [`DEFAULT_NORM_EPS`]) followed by the affine parameters
    /// `{name}.weight` and `{name}.bias`, each of the last extent of `x`.
    pub fn layer_norm_affine(&mut self, x: Value, name: &str) -> Result<Value, TraceError> {
        let y = self.layer_norm(x, DEFAULT_NORM_EPS)?;
        self.affine(y, name, true)
    }

    /// `rms_norm` (eps [`DEFAULT_NORM_EPS`]) followed by the scale parameter `{name}.weight`.
    pub fn rms_norm_affine(&mut self, x: Value, name: &str) -> Result<Value, TraceError> {
        let y = self.rms_norm(x, DEFAULT_NORM_EPS)?;
        self.affine(y, name, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_error_names_scope_op_and_shapes() {
        let mut t = Tracer::new("f");
        let x = t.input("x", DType::F32, [8, 64]).unwrap();
        t.push_scope("layers.3");
        t.push_scope("attn");
        let w = t.param("wq", DType::F32, [32, 64]).unwrap();
        assert_eq!(t.func().params().next().unwrap().name, "layers.3.attn.wq");
        let err = t.matmul(x, w).unwrap_err();
        assert_eq!(
            err.to_string(),
            "layers.3.attn: `matmul`: contraction extents differ: lhs has K = 64, rhs has K = 32 \
             (operands: f32[8,64], f32[32,64])"
        );
        assert_eq!(err.type_error().unwrap().op, "matmul");
        // The failed op added nothing.
        assert_eq!(t.func().body.len(), 2);
    }

    #[test]
    fn unscoped_error_has_no_prefix() {
        let mut t = Tracer::new("f");
        let a = t.input("a", DType::F32, [2, 3]).unwrap();
        let b = t.input("b", DType::F32, [3]).unwrap();
        assert_eq!(
            t.add(a, b).unwrap_err().to_string(),
            "`add`: operand types differ: f32[2,3] vs f32[3] (broadcasting is explicit: use \
             `broadcast`) (operands: f32[2,3], f32[3])"
        );
        let i = t.input("i", DType::I32, [2, 3]).unwrap();
        assert_eq!(
            t.exp(i).unwrap_err().to_string(),
            "`exp`: does not accept element type i32 (operands: i32[2,3])"
        );
        assert_eq!(
            t.reshape(a, [4]).unwrap_err().to_string(),
            "`reshape`: cannot reshape f32[2,3] (6 elements) to f32[4] (4 elements) \
             (operands: f32[2,3])"
        );
    }

    #[test]
    fn duplicate_names_are_errors() {
        let mut t = Tracer::new("f");
        t.push_scope("layers.0");
        t.param("w", DType::F32, [2]).unwrap();
        let err = t.param("w", DType::F32, [2]).unwrap_err();
        assert_eq!(
            err,
            TraceError::DuplicateArg {
                scope: "layers.0".into(),
                name: "layers.0.w".into()
            }
        );
        assert_eq!(
            err.to_string(),
            "layers.0: duplicate argument name `layers.0.w`"
        );
        t.pop_scope();
        // Same leaf name in another scope is fine; an input may not reuse a parameter's name.
        let w = t.param("w", DType::F32, [2]).unwrap();
        assert!(t.input("layers.0.w", DType::F32, [2]).is_err());
        t.output("y", w).unwrap();
        assert_eq!(
            t.output("y", w).unwrap_err().to_string(),
            "duplicate output name `y`"
        );
        let f = t.finish();
        assert_eq!(f.args().count(), 2);
        assert_eq!(f.outputs.len(), 1);
    }

    #[test]
    fn phase_stage_and_scoped() {
        let mut t = Tracer::new("f");
        let x = t.input("x", DType::F32, [4]).unwrap();
        t.set_phase(Phase::Dgrad);
        t.set_stage(Some(2));
        let y = t.neg(x).unwrap();
        let r = t.scoped("blk", |t| {
            t.param("p", DType::F32, [3])?;
            t.param("p", DType::F32, [3])
        });
        assert!(r.is_err());
        assert_eq!(t.scope(), "");
        let f = t.finish();
        let node = f.values[y].def;
        assert_eq!(f.nodes[node].phase, Phase::Dgrad);
        assert_eq!(f.nodes[node].stage, Some(2));
        assert_eq!(f.nodes[f.values[x].def].phase, Phase::Forward);
        assert!(f
            .to_string()
            .contains("neg %0 : f32[4] phase(dgrad) stage(2)"));
    }

    #[test]
    fn broadcast_to_and_binary_bcast() {
        let mut t = Tracer::new("f");
        let a = t.input("a", DType::F32, [2, 1, 4]).unwrap();
        let b = t.input("b", DType::F32, [3, 1]).unwrap();
        let c = t.binary_bcast(BinaryOp::Mul, a, b).unwrap();
        assert_eq!(t.shape(c), &[2, 3, 4]);
        assert_eq!(t.broadcast_to(c, [2, 3, 4]).unwrap(), c);
        let e = t.broadcast_to(b, [3, 5, 2]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "`broadcast`: operand dimension 0 (extent 3) cannot broadcast to result dimension 1 \
             (extent 5) (operands: f32[3,1])"
        );
        let e = t.broadcast_to(a, [4]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "`broadcast_to`: cannot broadcast rank 3 to the lower rank of [4] (operands: f32[2,1,4])"
        );
        let d = t.input("d", DType::F32, [5]).unwrap();
        let e = t.binary_bcast(BinaryOp::Add, a, d).unwrap_err();
        assert_eq!(
            e.to_string(),
            "`add`: shapes do not broadcast: dimension 2 has extents 4 and 5 \
             (operands: f32[2,1,4], f32[5])"
        );
    }

    #[test]
    fn linear_shapes_and_names() {
        let mut t = Tracer::new("f");
        let x = t.input("x", DType::F32, [2, 3, 8]).unwrap();
        t.push_scope("blk");
        let y = t.linear(x, 8, 5, true, "proj").unwrap();
        assert_eq!(t.shape(y), &[2, 3, 5]);
        let names: Vec<String> = t.func().params().map(|p| p.name.to_string()).collect();
        assert_eq!(names, ["blk.proj.weight", "blk.proj.bias"]);
        let e = t.linear(x, 7, 5, false, "bad").unwrap_err();
        assert_eq!(
            e.to_string(),
            "blk: `linear`: `blk.bad` needs an input of rank >= 2 with last extent 7 \
             (operands: f32[2,3,8])"
        );
        let z = t.layer_norm_affine(y, "ln").unwrap();
        let r = t.rms_norm_affine(z, "rms").unwrap();
        assert_eq!(t.shape(r), &[2, 3, 5]);
        assert_eq!(t.func().params().count(), 5);
    }

    #[test]
    fn every_op_method_traces() {
        let mut t = Tracer::new("all");
        let x = t.input("x", DType::F32, [2, 3, 4, 4]).unwrap();
        let idx = t.input("idx", DType::I32, [5]).unwrap();
        let c = t.constant_f(DType::F32, [2, 3, 4, 4], 0.5).unwrap();
        let i = t.iota(DType::I32, [5], 0).unwrap();
        let k = t.constant_f(DType::I32, [5], 2.0).unwrap();
        let lit = t
            .constant(
                TensorType::new(DType::F32, [2]),
                Literal::Float(vec![1.0, 2.0]),
            )
            .unwrap();
        assert_eq!(t.shape(lit), &[2]);
        let m = t.compare(CompareOp::Lt, i, k).unwrap();
        assert_eq!(t.ty(m).dtype, DType::Bool);
        let y = t.add(x, c).unwrap();
        let y = t.gelu(y).unwrap();
        let z = t.select_like(y, c).unwrap();
        let s = t.cast(z, DType::F64).unwrap();
        assert_eq!(t.ty(s).dtype, DType::F64);
        let r = t.reduce_sum(z, [2, 3]).unwrap();
        assert_eq!(t.shape(r), &[2, 3]);
        let tr = t.transpose(z, [0, 2, 3, 1]).unwrap();
        assert_eq!(t.shape(tr), &[2, 4, 4, 3]);
        let sl = t
            .slice(z, [0, 0, 0, 0], [2, 3, 4, 4], [1, 1, 2, 2])
            .unwrap();
        assert_eq!(t.shape(sl), &[2, 3, 2, 2]);
        let cat = t.concat(&[z, z], 1).unwrap();
        assert_eq!(t.shape(cat), &[2, 6, 4, 4]);
        let parts = t.split(cat, 1, [1, 5]).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(t.shape(parts[1]), &[2, 5, 4, 4]);
        let p = t.pad(z, [0, 0, 1, 1], [0, 0, 1, 1], 0.0).unwrap();
        assert_eq!(t.shape(p), &[2, 3, 6, 6]);
        let w = t.param("w", DType::F32, [6, 3, 3, 3]).unwrap();
        let conv = t.conv2d(z, w, [1, 1], [1, 1, 1, 1], [1, 1], 1).unwrap();
        assert_eq!(t.shape(conv), &[2, 6, 4, 4]);
        let mp = t.max_pool2d(conv, [2, 2], [2, 2], [0; 4]).unwrap();
        let ap = t.avg_pool2d(conv, [2, 2], [2, 2], [0; 4], true).unwrap();
        assert_eq!(t.shape(mp), t.shape(ap));
        let flat = t.reshape(mp, [2, 24]).unwrap();
        let emb = t.param("emb", DType::F32, [10, 24]).unwrap();
        let g = t.gather(emb, idx, 0).unwrap();
        assert_eq!(t.shape(g), &[5, 24]);
        let sa = t.scatter_add(emb, idx, g, 0).unwrap();
        assert_eq!(t.shape(sa), &[10, 24]);
        let mm = t.matmul_t(flat, emb, false, true).unwrap();
        assert_eq!(t.shape(mm), &[2, 10]);
        let sm = t.softmax(mm, 1).unwrap();
        let lsm = t.log_softmax(sm, 1).unwrap();
        let ln = t.layer_norm(lsm, 1e-5).unwrap();
        let rn = t.rms_norm(ln, 1e-5).unwrap();
        let dr = t.dropout(rn, 0.1, 7).unwrap();
        let sg = t.stop_gradient(dr).unwrap();
        let labels = t.slice(idx, [0], [2], [1]).unwrap();
        let ce = t.cross_entropy(sg, labels).unwrap();
        assert_eq!(t.shape(ce), &[2]);
        let oh = t.one_hot(labels, 10, DType::F32).unwrap();
        assert_eq!(t.shape(oh), &[2, 10]);
        let loss = t.mean_all(ce).unwrap();
        assert_eq!(t.shape(loss), &[] as &[usize]);
        t.output("loss", loss).unwrap();
        let f = t.finish();
        let text = f.to_string();
        assert!(text.contains("conv2d"), "{text}");
    }

    impl Tracer {
        fn select_like(&mut self, a: Value, b: Value) -> Result<Value, TraceError> {
            let c = self.compare(CompareOp::Gt, a, b)?;
            self.select(c, a, b)
        }
    }
}
