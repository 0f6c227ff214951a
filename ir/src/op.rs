//! The closed set of operations.
//!
//! Ops are a closed `enum` (not trait objects) so that every pass, the verifier, the interpreter
//! and every backend must say what it does with each op: adding an op is a compile error everywhere
//! it is not handled yet. Attributes live in the op; operands and results live in the node.
//!
//! Broadcasting is explicit, as in XLA HLO: elementwise ops take operands of equal shape, and
//! [`Op::Broadcast`] and [`Op::Reduce`] are ops of their own. This keeps shape rules and VJP rules
//! small.
//!
//! Ops whose result type is not determined by their operands ([`Op::Input`], [`Op::Param`],
//! [`Op::Constant`], [`Op::Iota`], [`Op::Cast`], [`Op::Broadcast`], [`Op::Reshape`],
//! [`Op::OneHot`]) carry the result type (or the part of it they fix) as an attribute. The text
//! format does not repeat it: the printer omits it and the parser takes it from the declared result
//! type, so the in-memory op is self-contained and [`crate::infer()`] is a pure function of the op
//! and the operand types.
//!
//! ## Composite ops
//!
//! `softmax`, `log_softmax`, `layer_norm`, `rms_norm` and `cross_entropy` are **primitive** ops, not
//! decompositions: each gets its own VJP rule, which is both cheaper (one saved value instead of
//! several) and numerically better (max-subtraction and log-sum-exp stay inside the op). The norms
//! carry no affine parameters: the scale and shift are explicit `broadcast` + `mul`/`add` nodes, so
//! that their gradients are ordinary weight-gradient reductions that the dgrad/wgrad split sees.
//! `gelu`, `gelu_tanh` and `silu` are primitive unary ops for the same reasons.

use crate::types::{DType, Shape, TensorType};

/// An elementwise function of one operand. The result has the operand's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnaryOp {
    /// `-x`. Numeric types.
    Neg,
    /// `|x|`. Numeric types.
    Abs,
    /// `e^x`. Float types.
    Exp,
    /// Natural logarithm. Float types.
    Log,
    /// Square root. Float types.
    Sqrt,
    /// `1/sqrt(x)`. Float types.
    Rsqrt,
    /// Hyperbolic tangent. Float types.
    Tanh,
    /// `1/(1+e^-x)`. Float types.
    Sigmoid,
    /// `max(x, 0)`. Numeric types.
    Relu,
    /// `x·Φ(x)` with the exact (erf) normal CDF. Float types.
    Gelu,
    /// `0.5·x·(1+tanh(√(2/π)·(x+0.044715·x³)))`. Float types.
    GeluTanh,
    /// `x·sigmoid(x)`. Float types.
    Silu,
    /// Sine. Float types.
    Sin,
    /// Cosine. Float types.
    Cos,
    /// The error function. Float types.
    Erf,
    /// `1/x`. Float types.
    Reciprocal,
    /// `-1`, `0` or `1`. Numeric types.
    Sign,
    /// Round toward negative infinity. Float types.
    Floor,
    /// Round to nearest, ties to even. Float types.
    Round,
    /// Logical not. `bool` only.
    Not,
}

impl UnaryOp {
    /// Every unary op, in a fixed order.
    pub const ALL: [UnaryOp; 20] = [
        UnaryOp::Neg,
        UnaryOp::Abs,
        UnaryOp::Exp,
        UnaryOp::Log,
        UnaryOp::Sqrt,
        UnaryOp::Rsqrt,
        UnaryOp::Tanh,
        UnaryOp::Sigmoid,
        UnaryOp::Relu,
        UnaryOp::Gelu,
        UnaryOp::GeluTanh,
        UnaryOp::Silu,
        UnaryOp::Sin,
        UnaryOp::Cos,
        UnaryOp::Erf,
        UnaryOp::Reciprocal,
        UnaryOp::Sign,
        UnaryOp::Floor,
        UnaryOp::Round,
        UnaryOp::Not,
    ];

    /// The text-format name.
    pub fn name(self) -> &'static str {
        match self {
            UnaryOp::Neg => "neg",
            UnaryOp::Abs => "abs",
            UnaryOp::Exp => "exp",
            UnaryOp::Log => "log",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Rsqrt => "rsqrt",
            UnaryOp::Tanh => "tanh",
            UnaryOp::Sigmoid => "sigmoid",
            UnaryOp::Relu => "relu",
            UnaryOp::Gelu => "gelu",
            UnaryOp::GeluTanh => "gelu_tanh",
            UnaryOp::Silu => "silu",
            UnaryOp::Sin => "sin",
            UnaryOp::Cos => "cos",
            UnaryOp::Erf => "erf",
            UnaryOp::Reciprocal => "reciprocal",
            UnaryOp::Sign => "sign",
            UnaryOp::Floor => "floor",
            UnaryOp::Round => "round",
            UnaryOp::Not => "not",
        }
    }

    /// Which element types the op accepts.
    pub fn accepts(self, dtype: DType) -> bool {
        match self {
            UnaryOp::Not => dtype == DType::Bool,
            UnaryOp::Neg | UnaryOp::Abs | UnaryOp::Relu | UnaryOp::Sign => dtype != DType::Bool,
            _ => dtype.is_float(),
        }
    }
}

/// An elementwise function of two operands of equal type. The result has that type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    /// `a + b`. Numeric types.
    Add,
    /// `a - b`. Numeric types.
    Sub,
    /// `a · b`. Numeric types.
    Mul,
    /// `a / b`; integer division truncates toward zero and fails on a zero divisor. Numeric types.
    Div,
    /// Elementwise maximum (NaN wins). Numeric types.
    Max,
    /// Elementwise minimum (NaN wins). Numeric types.
    Min,
    /// `a^b`. Float types.
    Pow,
    /// Logical and. `bool` only.
    And,
    /// Logical or. `bool` only.
    Or,
}

impl BinaryOp {
    /// Every binary op, in a fixed order.
    pub const ALL: [BinaryOp; 9] = [
        BinaryOp::Add,
        BinaryOp::Sub,
        BinaryOp::Mul,
        BinaryOp::Div,
        BinaryOp::Max,
        BinaryOp::Min,
        BinaryOp::Pow,
        BinaryOp::And,
        BinaryOp::Or,
    ];

    /// The text-format name.
    pub fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
            BinaryOp::Max => "max",
            BinaryOp::Min => "min",
            BinaryOp::Pow => "pow",
            BinaryOp::And => "and",
            BinaryOp::Or => "or",
        }
    }

    /// Which element types the op accepts.
    pub fn accepts(self, dtype: DType) -> bool {
        match self {
            BinaryOp::And | BinaryOp::Or => dtype == DType::Bool,
            BinaryOp::Pow => dtype.is_float(),
            _ => dtype != DType::Bool,
        }
    }
}

/// An elementwise comparison of two operands of equal type; the result is `bool` of that shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CompareOp {
    /// `a == b`. Any type.
    Eq,
    /// `a != b`. Any type.
    Ne,
    /// `a < b`. Numeric types.
    Lt,
    /// `a <= b`. Numeric types.
    Le,
    /// `a > b`. Numeric types.
    Gt,
    /// `a >= b`. Numeric types.
    Ge,
}

impl CompareOp {
    /// Every comparison, in a fixed order.
    pub const ALL: [CompareOp; 6] = [
        CompareOp::Eq,
        CompareOp::Ne,
        CompareOp::Lt,
        CompareOp::Le,
        CompareOp::Gt,
        CompareOp::Ge,
    ];

    /// The text-format name.
    pub fn name(self) -> &'static str {
        match self {
            CompareOp::Eq => "eq",
            CompareOp::Ne => "ne",
            CompareOp::Lt => "lt",
            CompareOp::Le => "le",
            CompareOp::Gt => "gt",
            CompareOp::Ge => "ge",
        }
    }

    /// Which element types the comparison accepts.
    pub fn accepts(self, dtype: DType) -> bool {
        matches!(self, CompareOp::Eq | CompareOp::Ne) || dtype != DType::Bool
    }
}

/// The combining function of a reduction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceKind {
    /// Sum. Numeric types.
    Sum,
    /// Maximum. Numeric types.
    Max,
    /// Minimum. Numeric types.
    Min,
    /// Arithmetic mean. Float types.
    Mean,
}

impl ReduceKind {
    /// Every reduction, in a fixed order.
    pub const ALL: [ReduceKind; 4] = [
        ReduceKind::Sum,
        ReduceKind::Max,
        ReduceKind::Min,
        ReduceKind::Mean,
    ];

    /// The text-format name (`reduce_sum`, …).
    pub fn name(self) -> &'static str {
        match self {
            ReduceKind::Sum => "reduce_sum",
            ReduceKind::Max => "reduce_max",
            ReduceKind::Min => "reduce_min",
            ReduceKind::Mean => "reduce_mean",
        }
    }
}

/// The window function of a 2-D pooling op.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PoolKind {
    /// Maximum over the window; padding never wins.
    Max,
    /// Average over the window.
    Avg,
}

/// The elements of a constant: either one element (a splat over the whole shape) or exactly one
/// element per position, row-major.
#[derive(Clone, Debug, PartialEq)]
pub enum Literal {
    /// Elements of a float constant (stored in f64, rounded to the value's dtype when used).
    Float(Vec<f64>),
    /// Elements of an integer constant.
    Int(Vec<i64>),
    /// Elements of a boolean constant.
    Bool(Vec<bool>),
}

impl Literal {
    /// Number of stored elements (1 for a splat).
    pub fn len(&self) -> usize {
        match self {
            Literal::Float(v) => v.len(),
            Literal::Int(v) => v.len(),
            Literal::Bool(v) => v.len(),
        }
    }

    /// True if no element is stored (never valid in a verified function).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A single-element float literal.
    pub fn float(x: f64) -> Literal {
        Literal::Float(vec![x])
    }
}

/// Which interface a function argument belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ArgRole {
    /// A data input: fed per step (a batch, labels, an incoming gradient).
    Data,
    /// A trainable parameter, named as in the model file.
    Param,
}

/// One operation. See the module docs for conventions; every variant states its operand signature
/// and shape rule. `T` is any element type unless restricted; shapes are written `[d0,…]`.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// `input {name} : T` — a data input of the function. No operands.
    Input {
        /// Name of the input (unique among the function's arguments).
        name: String,
        /// Its type.
        ty: TensorType,
    },
    /// `param {name} : T` — a trainable parameter. No operands.
    Param {
        /// Name of the parameter, as in the model file (unique among the function's arguments).
        name: String,
        /// Its type.
        ty: TensorType,
    },
    /// `constant {value} : T` — a literal tensor. No operands; the literal holds one element (splat)
    /// or `numel(T)` elements, of T's kind (float, int or bool).
    Constant {
        /// Result type.
        ty: TensorType,
        /// The elements.
        value: Literal,
    },
    /// `iota {dim} : T` — element at index `i` is `i[dim]`. No operands; T numeric, `dim < rank`.
    Iota {
        /// Result type.
        ty: TensorType,
        /// The dimension whose index is written.
        dim: usize,
    },
    /// `op x : T -> T` — elementwise unary function.
    Unary(UnaryOp),
    /// `op a, b : T, T -> T` — elementwise binary function on equal types.
    Binary(BinaryOp),
    /// `op a, b : T, T -> bool[shape(T)]` — elementwise comparison on equal types.
    Compare(CompareOp),
    /// `select c, a, b : bool[S], T[S], T[S] -> T[S]` — `c ? a : b` elementwise.
    Select,
    /// `cast x : T[S] -> U[S]` — element type conversion. Float→int truncates toward zero
    /// (saturating); to bool is `x != 0`; from bool gives 0 or 1.
    Cast {
        /// Target element type.
        to: DType,
    },
    /// `broadcast x {dims} : T[S] -> T[R]` — operand dimension `i` becomes result dimension
    /// `dims[i]`; `dims` is strictly increasing, `len(dims) = rank(S)`, and `S[i]` is `R[dims[i]]`
    /// or 1. Other result dimensions repeat the operand.
    Broadcast {
        /// Result shape.
        shape: Shape,
        /// Where each operand dimension goes.
        dims: Vec<usize>,
    },
    /// `reduce_* x {axes} : T[S] -> T[S without axes]` — combines elements over `axes`
    /// (strictly increasing, each `< rank`); the reduced dimensions are removed.
    Reduce {
        /// The combining function.
        kind: ReduceKind,
        /// Dimensions to reduce.
        axes: Vec<usize>,
    },
    /// `reshape x : T[S] -> T[R]` — same elements in row-major order; `numel(S) = numel(R)`.
    Reshape {
        /// Result shape.
        shape: Shape,
    },
    /// `transpose x {perm} : T[S] -> T[R]` with `R[i] = S[perm[i]]`; `perm` is a permutation.
    Transpose {
        /// Result dimension `i` is operand dimension `perm[i]`.
        perm: Vec<usize>,
    },
    /// `slice x {start, limit, stride} : T[S] -> T[R]` with
    /// `R[i] = ceil((limit[i] - start[i]) / stride[i])`; `start <= limit <= S`, `stride >= 1`.
    Slice {
        /// First index per dimension.
        start: Vec<usize>,
        /// One past the last index per dimension.
        limit: Vec<usize>,
        /// Step per dimension.
        stride: Vec<usize>,
    },
    /// `concat x0, x1, … {axis} : T[S0], T[S1], … -> T[R]` — one or more operands equal except on
    /// `axis`; `R[axis]` is the sum.
    Concat {
        /// The joined dimension.
        axis: usize,
    },
    /// `split x {axis, sizes} : T[S] -> T[S0], T[S1], …` — several results, consecutive pieces of
    /// `axis` with the given sizes (summing to `S[axis]`).
    Split {
        /// The cut dimension.
        axis: usize,
        /// Extent of each piece along `axis`.
        sizes: Vec<usize>,
    },
    /// `pad x {low, high, value} : T[S] -> T[R]` with `R[i] = low[i] + S[i] + high[i]`, new
    /// positions filled with `value`. Numeric T.
    Pad {
        /// Elements added before each dimension.
        low: Vec<usize>,
        /// Elements added after each dimension.
        high: Vec<usize>,
        /// Fill value.
        value: f64,
    },
    /// `matmul a, b {transpose_lhs, transpose_rhs} : T[B…,M,K], T[B…,K,N] -> T[B…,M,N]` — batched
    /// matrix product; both operands have the same rank ≥ 2 and the same batch dimensions `B…`.
    /// The flags transpose the last two dimensions of an operand before the product. Numeric T.
    MatMul {
        /// Use the transpose of the last two dimensions of `a`.
        transpose_lhs: bool,
        /// Use the transpose of the last two dimensions of `b`.
        transpose_rhs: bool,
    },
    /// `conv2d x, w {stride, padding, dilation, groups} : T[N,C,H,W], T[O,C/g,KH,KW] -> T[N,O,HO,WO]`
    /// — cross-correlation (as in PyTorch). `padding` is `[top, left, bottom, right]`;
    /// `HO = (H + top + bottom - dilation[0]·(KH-1) - 1) / stride[0] + 1`, likewise `WO`. `C` and
    /// `O` are divisible by `groups`. Float T. No bias: add one with `broadcast` + `add`.
    Conv2d {
        /// Step of the window, `[h, w]`.
        stride: [usize; 2],
        /// Zero padding, `[top, left, bottom, right]`.
        padding: [usize; 4],
        /// Spacing of kernel taps, `[h, w]`.
        dilation: [usize; 2],
        /// Number of channel groups.
        groups: usize,
    },
    /// `max_pool2d x` / `avg_pool2d x {window, stride, padding, count_include_pad}` :
    /// `T[N,C,H,W] -> T[N,C,HO,WO]` with `HO = (H + top + bottom - window[0]) / stride[0] + 1`.
    /// Float T. For `avg`, the divisor is the window size if `count_include_pad`, else the number
    /// of in-bounds elements.
    Pool2d {
        /// Maximum or average.
        kind: PoolKind,
        /// Window extent, `[h, w]`.
        window: [usize; 2],
        /// Step, `[h, w]`.
        stride: [usize; 2],
        /// Padding, `[top, left, bottom, right]`.
        padding: [usize; 4],
        /// For averages: divide by the full window even where it covers padding.
        count_include_pad: bool,
    },
    /// `conv2d_grad_input dy, w {stride, padding, dilation, groups} : T[N,O,HO,WO], T[O,C/g,KH,KW]
    /// -> T[N,C,H,W]` — the gradient of `conv2d` with respect to its input (a transposed
    /// convolution). `H` and `W` come from the declared result type (several input sizes give the
    /// same output size); `conv2d` of a `T[N,C,H,W]` input with these attributes must give
    /// `T[N,O,HO,WO]`. Float T.
    Conv2dGradInput {
        /// As in the forward `conv2d`.
        stride: [usize; 2],
        /// As in the forward `conv2d`.
        padding: [usize; 4],
        /// As in the forward `conv2d`.
        dilation: [usize; 2],
        /// As in the forward `conv2d`.
        groups: usize,
        /// The input shape `[N,C,H,W]`.
        shape: Shape,
    },
    /// `conv2d_grad_weight x, dy {stride, padding, dilation, groups} : T[N,C,H,W], T[N,O,HO,WO]
    /// -> T[O,C/g,KH,KW]` — the gradient of `conv2d` with respect to its weight. `KH` and `KW`
    /// come from the declared result type; `conv2d` of `x` with a weight of that shape must give
    /// `T[N,O,HO,WO]`. Float T.
    Conv2dGradWeight {
        /// As in the forward `conv2d`.
        stride: [usize; 2],
        /// As in the forward `conv2d`.
        padding: [usize; 4],
        /// As in the forward `conv2d`.
        dilation: [usize; 2],
        /// As in the forward `conv2d`.
        groups: usize,
        /// The weight shape `[O,C/g,KH,KW]`.
        shape: Shape,
    },
    /// `max_pool2d_grad x, dy {window, stride, padding} : T[N,C,H,W], T[N,C,HO,WO] -> T[N,C,H,W]` —
    /// the gradient of `max_pool2d`: each window's incoming gradient goes to the first position
    /// (row-major within the window) holding the window's maximum, as in PyTorch. Float T.
    MaxPool2dGrad {
        /// As in the forward pool.
        window: [usize; 2],
        /// As in the forward pool.
        stride: [usize; 2],
        /// As in the forward pool.
        padding: [usize; 4],
    },
    /// `avg_pool2d_grad dy {window, stride, padding, count_include_pad} : T[N,C,HO,WO] ->
    /// T[N,C,H,W]` — the gradient of `avg_pool2d`: each window's incoming gradient, divided by the
    /// forward divisor, is added to every in-bounds position of the window. `H` and `W` come from
    /// the declared result type. Float T.
    AvgPool2dGrad {
        /// As in the forward pool.
        window: [usize; 2],
        /// As in the forward pool.
        stride: [usize; 2],
        /// As in the forward pool.
        padding: [usize; 4],
        /// As in the forward pool.
        count_include_pad: bool,
        /// The input shape `[N,C,H,W]`.
        shape: Shape,
    },
    /// `gather table, idx {axis} : T[S], I[J…] -> T[S[..axis] ++ J… ++ S[axis+1..]]` — picks slices
    /// of `table` along `axis` (numpy `take`); I is i32 or i64 and every index is in range. With
    /// `axis = 0` it is an embedding lookup.
    Gather {
        /// The indexed dimension.
        axis: usize,
    },
    /// `scatter_add base, idx, upd {axis} : T[S], I[J…], T[S[..axis] ++ J… ++ S[axis+1..]] -> T[S]`
    /// — `base` with every slice of `upd` added at its index along `axis`; repeated indices
    /// accumulate. The adjoint of `gather`. Numeric T.
    ScatterAdd {
        /// The indexed dimension.
        axis: usize,
    },
    /// `softmax x {axis} : T[S] -> T[S]` — `exp(x - max) / sum(exp(x - max))` along `axis`. Float T.
    Softmax {
        /// Normalised dimension.
        axis: usize,
    },
    /// `log_softmax x {axis} : T[S] -> T[S]` — `x - max - log(sum(exp(x - max)))`. Float T.
    LogSoftmax {
        /// Normalised dimension.
        axis: usize,
    },
    /// `layer_norm x {eps} : T[S] -> T[S]` — `(x - mean) / sqrt(var + eps)` over the last
    /// dimension (biased variance). No affine part. Float T, rank ≥ 1.
    LayerNorm {
        /// Added to the variance.
        eps: f64,
    },
    /// `rms_norm x {eps} : T[S] -> T[S]` — `x / sqrt(mean(x²) + eps)` over the last dimension.
    /// No scale. Float T, rank ≥ 1.
    RmsNorm {
        /// Added to the mean square.
        eps: f64,
    },
    /// `cross_entropy logits, labels : T[B…,C], I[B…] -> T[B…]` — per-position
    /// `-log_softmax(logits)[label]`; no reduction (follow with `reduce_mean`). Float T, I i32/i64,
    /// labels in `[0, C)`.
    CrossEntropy,
    /// `one_hot idx {depth} : I[S] -> T[S ++ [depth]]` — 1 at the index, 0 elsewhere (an index
    /// outside `[0, depth)` gives a zero row). I i32/i64; T numeric.
    OneHot {
        /// Number of classes.
        depth: usize,
        /// Result element type.
        dtype: DType,
    },
    /// `dropout x {rate, seed} : T[S] -> T[S]` — zeroes each element with probability `rate` and
    /// scales the rest by `1/(1-rate)`. The mask is a pure function of `seed` and the element's
    /// flat index ([`crate::dropout_keep`]), so recomputation and the backward pass see the same
    /// mask. Float T, `0 <= rate < 1`.
    Dropout {
        /// Probability of zeroing an element.
        rate: f64,
        /// Seed of the mask.
        seed: u64,
    },
    /// `stop_gradient x : T -> T` — identity forward; no gradient flows through it.
    StopGradient,
    /// `ste_round x`, `ste_sign x`, `ste_argmax_one_hot x {axis}` : `T[S] -> T[S]`, float T —
    /// straight-through estimators: the forward is `round` (ties to even), `sign`, or the one-hot
    /// of the argmax along `axis` (the first maximum wins); the backward passes the incoming
    /// gradient through unchanged (`dx = dy`), deliberately not the true derivative (which is
    /// zero almost everywhere). The tangent rule is the transpose of that VJP (`ẏ = ẋ`).
    Ste(SteOp),
    /// `grad_reverse x {lambda} : T -> T`, float T — gradient reversal (Ganin & Lempitsky):
    /// identity forward, `dx = −λ·dy` backward (tangent `ẏ = −λ·ẋ`, the transpose).
    GradReverse {
        /// The scale λ of the reversed gradient.
        lambda: f64,
    },
}

/// The forward functions of the straight-through estimator ops ([`Op::Ste`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SteOp {
    /// `round` (to nearest, ties to even).
    Round,
    /// `sign` (−1, 0 or 1).
    Sign,
    /// One-hot of the argmax along `axis` (the first maximum wins), in the operand's type.
    ArgmaxOneHot {
        /// The axis the argmax runs along.
        axis: usize,
    },
}

impl SteOp {
    /// The text-format name.
    pub fn name(self) -> &'static str {
        match self {
            SteOp::Round => "ste_round",
            SteOp::Sign => "ste_sign",
            SteOp::ArgmaxOneHot { .. } => "ste_argmax_one_hot",
        }
    }
}

/// How many operands an op takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arity {
    /// Exactly this many.
    Fixed(usize),
    /// At least this many.
    AtLeast(usize),
}

impl Op {
    /// The text-format name of the op.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input { .. } => "input",
            Op::Param { .. } => "param",
            Op::Constant { .. } => "constant",
            Op::Iota { .. } => "iota",
            Op::Unary(u) => u.name(),
            Op::Binary(b) => b.name(),
            Op::Compare(c) => c.name(),
            Op::Select => "select",
            Op::Cast { .. } => "cast",
            Op::Broadcast { .. } => "broadcast",
            Op::Reduce { kind, .. } => kind.name(),
            Op::Reshape { .. } => "reshape",
            Op::Transpose { .. } => "transpose",
            Op::Slice { .. } => "slice",
            Op::Concat { .. } => "concat",
            Op::Split { .. } => "split",
            Op::Pad { .. } => "pad",
            Op::MatMul { .. } => "matmul",
            Op::Conv2d { .. } => "conv2d",
            Op::Pool2d {
                kind: PoolKind::Max,
                ..
            } => "max_pool2d",
            Op::Pool2d {
                kind: PoolKind::Avg,
                ..
            } => "avg_pool2d",
            Op::Conv2dGradInput { .. } => "conv2d_grad_input",
            Op::Conv2dGradWeight { .. } => "conv2d_grad_weight",
            Op::MaxPool2dGrad { .. } => "max_pool2d_grad",
            Op::AvgPool2dGrad { .. } => "avg_pool2d_grad",
            Op::Gather { .. } => "gather",
            Op::ScatterAdd { .. } => "scatter_add",
            Op::Softmax { .. } => "softmax",
            Op::LogSoftmax { .. } => "log_softmax",
            Op::LayerNorm { .. } => "layer_norm",
            Op::RmsNorm { .. } => "rms_norm",
            Op::CrossEntropy => "cross_entropy",
            Op::OneHot { .. } => "one_hot",
            Op::Dropout { .. } => "dropout",
            Op::StopGradient => "stop_gradient",
            Op::Ste(s) => s.name(),
            Op::GradReverse { .. } => "grad_reverse",
        }
    }

    /// The number of operands the op takes.
    pub fn arity(&self) -> Arity {
        match self {
            Op::Input { .. } | Op::Param { .. } | Op::Constant { .. } | Op::Iota { .. } => {
                Arity::Fixed(0)
            }
            Op::Unary(_)
            | Op::Cast { .. }
            | Op::Broadcast { .. }
            | Op::Reduce { .. }
            | Op::Reshape { .. }
            | Op::Transpose { .. }
            | Op::Slice { .. }
            | Op::Split { .. }
            | Op::Pad { .. }
            | Op::Pool2d { .. }
            | Op::Softmax { .. }
            | Op::LogSoftmax { .. }
            | Op::LayerNorm { .. }
            | Op::RmsNorm { .. }
            | Op::OneHot { .. }
            | Op::Dropout { .. }
            | Op::AvgPool2dGrad { .. }
            | Op::StopGradient
            | Op::Ste(_)
            | Op::GradReverse { .. } => Arity::Fixed(1),
            Op::Binary(_)
            | Op::Compare(_)
            | Op::MatMul { .. }
            | Op::Conv2d { .. }
            | Op::Conv2dGradInput { .. }
            | Op::Conv2dGradWeight { .. }
            | Op::MaxPool2dGrad { .. }
            | Op::Gather { .. }
            | Op::CrossEntropy => Arity::Fixed(2),
            Op::Select | Op::ScatterAdd { .. } => Arity::Fixed(3),
            Op::Concat { .. } => Arity::AtLeast(1),
        }
    }

    /// The argument role, for `input` and `param`.
    pub fn arg_role(&self) -> Option<ArgRole> {
        match self {
            Op::Input { .. } => Some(ArgRole::Data),
            Op::Param { .. } => Some(ArgRole::Param),
            _ => None,
        }
    }

    /// The argument name, for `input` and `param`.
    pub fn arg_name(&self) -> Option<&str> {
        match self {
            Op::Input { name, .. } | Op::Param { name, .. } => Some(name),
            _ => None,
        }
    }

    /// Every op name the text format knows, sorted (for error messages).
    pub fn all_names() -> Vec<&'static str> {
        let mut names = vec![
            "input",
            "param",
            "constant",
            "iota",
            "select",
            "cast",
            "broadcast",
            "reshape",
            "transpose",
            "slice",
            "concat",
            "split",
            "pad",
            "matmul",
            "conv2d",
            "max_pool2d",
            "avg_pool2d",
            "conv2d_grad_input",
            "conv2d_grad_weight",
            "max_pool2d_grad",
            "avg_pool2d_grad",
            "gather",
            "scatter_add",
            "softmax",
            "log_softmax",
            "layer_norm",
            "rms_norm",
            "cross_entropy",
            "one_hot",
            "dropout",
            "stop_gradient",
            "ste_round",
            "ste_sign",
            "ste_argmax_one_hot",
            "grad_reverse",
        ];
        names.extend(UnaryOp::ALL.iter().map(|u| u.name()));
        names.extend(BinaryOp::ALL.iter().map(|b| b.name()));
        names.extend(CompareOp::ALL.iter().map(|c| c.name()));
        names.extend(ReduceKind::ALL.iter().map(|r| r.name()));
        names.sort_unstable();
        names
    }
}

/// Whether the dropout mask keeps the element at flat index `index` (probability `1 - rate`).
///
/// The mask is a pure function of `(seed, index)`: a SplitMix64 hash mapped to `[0, 1)`. Every
/// consumer (interpreter, backends, the backward rule) uses this one definition.
pub fn dropout_keep(seed: u64, index: u64, rate: f64) -> bool {
    let mut z = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(index)
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let u = (z >> 11) as f64 / (1u64 << 53) as f64;
    u >= rate
}
