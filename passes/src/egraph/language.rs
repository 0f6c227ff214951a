//! The e-graph language of cleave ops.
//!
//! Ops that rewrite rules look into have a node of their own, with their attributes as leaf
//! children (so that rules are ordinary egg patterns such as `(reshape ?s2 (reshape ?s1 ?x))`).
//! Every other op is carried opaquely as `(op <ref> operands…)`, where `<ref>` is a leaf naming an
//! entry of the [`LeafTable`]: an interned `cleave_ir::Op` with the index of the result the node
//! stands for, or a value defined outside the saturated region (function arguments, values of
//! earlier regions). Interning is by exact content (floats by bit pattern), so equal constants and
//! equal opaque ops over equal operands hash-cons to one e-class: common subexpressions merge for
//! free. Conversion back is exact because the table holds the original `Op`.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use cleave_ir::{Op, ReduceKind, TensorType, Value};
use egg::{define_language, Id};

define_language! {
    /// One e-node. Operand signatures (`T` a tensor class; `<…>` an attribute leaf class):
    ///
    /// | node | cleave op |
    /// |------|-----------|
    /// | `(neg x)` | `neg x : T -> T` |
    /// | `(add a b)` | `add a, b : T, T -> T` |
    /// | `(mul a b)` | `mul a, b : T, T -> T` |
    /// | `(transpose <perm> x)` | `transpose x {perm}` |
    /// | `(reshape <shape> x)` | `reshape x : T[S] -> T[shape]` |
    /// | `(broadcast <shape> <dims> x)` | `broadcast x {dims} : T[S] -> T[shape]` |
    /// | `(reduce <kind> <axes> x)` | `reduce_<kind> x {axes}` |
    /// | `(matmul <transpose_lhs> <transpose_rhs> a b)` | `matmul a, b {flags}` |
    /// | `(op <ref> x0 x1 …)` | the op (or outside value) interned as `<ref>`, over tensor operands (none for constants and outside values) |
    /// | `true`, `false` | leaf `Flag`: a boolean attribute |
    /// | `[1,0]`, `[]` | leaf `Ints`: a permutation, shape, dims or axes |
    /// | `sum`, `max`, `min`, `mean` | leaf `Kind`: a reduction kind |
    /// | `#3` | leaf `Ref`: an entry of the [`LeafTable`] |
    #[allow(missing_docs)]
    pub enum CirLang {
        "neg" = Neg([Id; 1]),
        "add" = Add([Id; 2]),
        "mul" = Mul([Id; 2]),
        "transpose" = Transpose([Id; 2]),
        "reshape" = Reshape([Id; 2]),
        "broadcast" = Broadcast([Id; 3]),
        "reduce" = Reduce([Id; 3]),
        "matmul" = MatMul([Id; 4]),
        "op" = Other(Box<[Id]>),
        Flag(bool),
        Ints(Ints),
        Kind(Kind),
        Ref(LeafRef),
    }
}

/// A list of integers, printed without spaces (`[1,0]`) so that it is one s-expression atom.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ints(pub Vec<usize>);

impl fmt::Display for Ints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", cleave_ir::types::fmt_shape(&self.0))
    }
}

impl FromStr for Ints {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let inner = s
            .strip_prefix('[')
            .and_then(|s| s.strip_suffix(']'))
            .ok_or_else(|| format!("`{s}` is not an integer list"))?;
        if inner.is_empty() {
            return Ok(Ints(Vec::new()));
        }
        inner
            .split(',')
            .map(|d| d.parse::<usize>().map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()
            .map(Ints)
    }
}

/// A reduction kind as a leaf.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Kind(pub u8);

impl Kind {
    /// The leaf for a reduction kind.
    pub fn of(kind: ReduceKind) -> Kind {
        Kind(ReduceKind::ALL.iter().position(|k| *k == kind).unwrap() as u8)
    }

    /// The reduction kind.
    pub fn kind(self) -> ReduceKind {
        ReduceKind::ALL[self.0 as usize]
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.kind().name()["reduce_".len()..])
    }
}

impl FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ReduceKind::ALL
            .iter()
            .find(|k| &k.name()["reduce_".len()..] == s)
            .map(|k| Kind::of(*k))
            .ok_or_else(|| format!("`{s}` is not a reduction kind"))
    }
}

/// An index into the [`LeafTable`], printed `#N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeafRef(pub u32);

impl fmt::Display for LeafRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

impl FromStr for LeafRef {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.strip_prefix('#')
            .and_then(|n| n.parse().ok())
            .map(LeafRef)
            .ok_or_else(|| format!("`{s}` is not a leaf reference"))
    }
}

/// What a [`LeafRef`] names.
#[derive(Clone, Debug, PartialEq)]
pub enum Leaf {
    /// An op applied by `(op <ref> operands…)`; the node stands for result `result` of it.
    Op {
        /// The op, with its attributes.
        op: Op,
        /// Which result of the op (non-zero only for `split`).
        result: u32,
    },
    /// A value defined outside the region: a function argument or a value of an earlier region.
    Value {
        /// The value in the function being rebuilt.
        value: Value,
        /// Its type.
        ty: TensorType,
        /// Whether it depends on a parameter.
        requires_grad: bool,
    },
}

/// The interned leaves of one e-graph. Keys compare floats by bit pattern, so `0.0` and `-0.0`
/// are different constants and equal constants are one entry.
#[derive(Debug, Default)]
pub struct LeafTable {
    entries: Vec<Leaf>,
    index: HashMap<String, u32>,
}

impl LeafTable {
    /// Interns an op result.
    pub fn op(&mut self, op: &Op, result: u32) -> LeafRef {
        let key = format!("{result}:{}", op_key(op));
        self.intern(key, || Leaf::Op {
            op: op.clone(),
            result,
        })
    }

    /// Interns an outside value.
    pub fn value(&mut self, value: Value, ty: &TensorType, requires_grad: bool) -> LeafRef {
        self.intern(format!("v{}", value.as_u32()), || Leaf::Value {
            value,
            ty: ty.clone(),
            requires_grad,
        })
    }

    fn intern(&mut self, key: String, leaf: impl FnOnce() -> Leaf) -> LeafRef {
        let next = self.entries.len() as u32;
        let idx = *self.index.entry(key).or_insert(next);
        if idx == next {
            self.entries.push(leaf());
        }
        LeafRef(idx)
    }

    /// The leaf behind a reference.
    pub fn get(&self, r: LeafRef) -> &Leaf {
        &self.entries[r.0 as usize]
    }
}

/// An exact, hashable key of an op: its `Debug` text with every float replaced by its bit
/// pattern (so `-0.0`/`0.0` and NaN payloads stay apart).
fn op_key(op: &Op) -> String {
    use cleave_ir::Literal;
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    match op {
        Op::Constant {
            ty,
            value: Literal::Float(v),
        } => format!("constant {ty} {:?}", bits(v)),
        Op::Pad { low, high, value } => format!("pad {low:?} {high:?} {}", value.to_bits()),
        Op::LayerNorm { eps } => format!("layer_norm {}", eps.to_bits()),
        Op::RmsNorm { eps } => format!("rms_norm {}", eps.to_bits()),
        Op::Dropout { rate, seed } => format!("dropout {} {seed}", rate.to_bits()),
        Op::GradReverse { lambda } => format!("grad_reverse {}", lambda.to_bits()),
        other => format!("{other:?}"),
    }
}
