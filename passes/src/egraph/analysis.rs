//! The e-class analysis: dtype, shape, byte size, "requires grad" and constant splats.
//!
//! `make` computes a class's type with [`cleave_ir::infer()`], the same shape rules the verifier
//! uses, so a rule that built an ill-typed term fails loudly at once. `merge` asserts that the
//! two classes have the same type (a rewrite never changes a type or shape) and reports a change
//! only when "requires grad" or the splat value becomes known, which is rare: most merges change
//! nothing, so egg does not re-examine the parents.

use cleave_ir::{infer, BinaryOp, Literal, Op, TensorType, UnaryOp, Value};
use egg::{DidMerge, Id};

use super::language::{CirLang, Leaf, LeafTable};

/// The e-graph type used throughout [`super`].
pub type CirGraph = egg::EGraph<CirLang, CirAnalysis>;

/// The analysis: it owns the [`LeafTable`] so that `make` can read interned ops.
#[derive(Debug, Default)]
pub struct CirAnalysis {
    /// Interned ops and outside values.
    pub leaves: LeafTable,
}

/// What the analysis knows about a tensor class.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    /// Element type and shape.
    pub ty: TensorType,
    /// Bytes of a dense buffer of `ty`.
    pub bytes: usize,
    /// Whether the value depends on a parameter (so a gradient may flow through it).
    pub requires_grad: bool,
    /// `Some(c)` when every element is the constant `c` (a splat constant, possibly broadcast,
    /// reshaped or transposed).
    pub splat: Option<f64>,
}

/// The data of an e-class.
#[derive(Clone, Debug, PartialEq)]
pub enum ClassData {
    /// An attribute leaf (no tensor type).
    Attr,
    /// A tensor.
    Tensor(TensorInfo),
}

impl ClassData {
    /// The tensor facts; panics on an attribute class (a rule bound a variable wrongly).
    pub fn tensor(&self) -> &TensorInfo {
        match self {
            ClassData::Tensor(t) => t,
            ClassData::Attr => panic!("an attribute leaf where a tensor was expected"),
        }
    }
}

/// A node seen as cleave IR.
pub enum IrView {
    /// An op and the classes of its tensor operands; the node is result `result` of the op.
    Op {
        /// The op.
        op: Op,
        /// Which result.
        result: u32,
        /// Operand classes.
        operands: Vec<Id>,
    },
    /// An outside value.
    Value(Value),
    /// An attribute leaf.
    Attr,
}

/// The single node of an attribute leaf class.
pub fn leaf(egraph: &CirGraph, id: Id) -> &CirLang {
    &egraph[id].nodes[0]
}

/// The integer list of an `Ints` leaf class.
pub fn ints(egraph: &CirGraph, id: Id) -> Vec<usize> {
    match leaf(egraph, id) {
        CirLang::Ints(v) => v.0.clone(),
        other => panic!("expected an integer list leaf, found {other:?}"),
    }
}

/// The value of a `Flag` leaf class.
pub fn flag(egraph: &CirGraph, id: Id) -> bool {
    match leaf(egraph, id) {
        CirLang::Flag(b) => *b,
        other => panic!("expected a flag leaf, found {other:?}"),
    }
}

/// Reads a node as a cleave op (attributes taken from its leaf children).
pub fn view(egraph: &CirGraph, node: &CirLang) -> IrView {
    let op = |op: Op, operands: &[Id]| IrView::Op {
        op,
        result: 0,
        operands: operands.to_vec(),
    };
    match node {
        CirLang::Neg([x]) => op(Op::Unary(UnaryOp::Neg), &[*x]),
        CirLang::Add([a, b]) => op(Op::Binary(BinaryOp::Add), &[*a, *b]),
        CirLang::Mul([a, b]) => op(Op::Binary(BinaryOp::Mul), &[*a, *b]),
        CirLang::Transpose([p, x]) => op(
            Op::Transpose {
                perm: ints(egraph, *p),
            },
            &[*x],
        ),
        CirLang::Reshape([s, x]) => op(
            Op::Reshape {
                shape: ints(egraph, *s),
            },
            &[*x],
        ),
        CirLang::Broadcast([s, d, x]) => op(
            Op::Broadcast {
                shape: ints(egraph, *s),
                dims: ints(egraph, *d),
            },
            &[*x],
        ),
        CirLang::Reduce([k, a, x]) => {
            let kind = match leaf(egraph, *k) {
                CirLang::Kind(k) => k.kind(),
                other => panic!("expected a reduction kind leaf, found {other:?}"),
            };
            op(
                Op::Reduce {
                    kind,
                    axes: ints(egraph, *a),
                },
                &[*x],
            )
        }
        CirLang::MatMul([tl, tr, a, b]) => op(
            Op::MatMul {
                transpose_lhs: flag(egraph, *tl),
                transpose_rhs: flag(egraph, *tr),
            },
            &[*a, *b],
        ),
        CirLang::Other(children) => {
            let r = match leaf(egraph, children[0]) {
                CirLang::Ref(r) => *r,
                other => panic!("`op` node without a leaf reference: {other:?}"),
            };
            match egraph.analysis.leaves.get(r) {
                Leaf::Op { op, result } => IrView::Op {
                    op: op.clone(),
                    result: *result,
                    operands: children[1..].to_vec(),
                },
                Leaf::Value { value, .. } => IrView::Value(*value),
            }
        }
        CirLang::Flag(_) | CirLang::Ints(_) | CirLang::Kind(_) | CirLang::Ref(_) => IrView::Attr,
    }
}

/// The splat value of a constant literal, if all its elements are equal (bit for bit).
fn literal_splat(value: &Literal) -> Option<f64> {
    let all_same = |v: &[f64]| v.iter().all(|x| x.to_bits() == v[0].to_bits());
    match value {
        Literal::Float(v) if all_same(v) => Some(v[0]),
        Literal::Int(v) if v.iter().all(|x| *x == v[0]) => Some(v[0] as f64),
        _ => None,
    }
}

impl egg::Analysis<CirLang> for CirAnalysis {
    type Data = ClassData;

    fn make(egraph: &mut CirGraph, enode: &CirLang, _id: Id) -> ClassData {
        let (op, result, operands) = match view(egraph, enode) {
            IrView::Attr => return ClassData::Attr,
            IrView::Value(_) => {
                let CirLang::Other(children) = enode else {
                    unreachable!()
                };
                let CirLang::Ref(r) = leaf(egraph, children[0]) else {
                    unreachable!()
                };
                let Leaf::Value {
                    ty, requires_grad, ..
                } = egraph.analysis.leaves.get(*r)
                else {
                    unreachable!()
                };
                return ClassData::Tensor(TensorInfo {
                    bytes: ty.size_bytes(),
                    ty: ty.clone(),
                    requires_grad: *requires_grad,
                    splat: None,
                });
            }
            IrView::Op {
                op,
                result,
                operands,
            } => (op, result, operands),
        };
        let infos: Vec<&TensorInfo> = operands.iter().map(|&c| egraph[c].data.tensor()).collect();
        let tys: Vec<&TensorType> = infos.iter().map(|t| &t.ty).collect();
        let ty = infer(&op, &tys)
            .unwrap_or_else(|e| panic!("an e-node is ill-typed (a rule is wrong): {e}"))
            .swap_remove(result as usize);
        let splat = match &op {
            Op::Constant { value, .. } => literal_splat(value),
            Op::Broadcast { .. } | Op::Reshape { .. } | Op::Transpose { .. } => infos[0].splat,
            _ => None,
        };
        let requires_grad = matches!(op, Op::Param { .. }) || infos.iter().any(|t| t.requires_grad);
        ClassData::Tensor(TensorInfo {
            bytes: ty.size_bytes(),
            ty,
            requires_grad,
            splat,
        })
    }

    fn merge(&mut self, a: &mut ClassData, b: ClassData) -> DidMerge {
        match (a, b) {
            (ClassData::Attr, ClassData::Attr) => DidMerge(false, false),
            (ClassData::Tensor(a), ClassData::Tensor(b)) => {
                assert_eq!(
                    a.ty, b.ty,
                    "merged e-classes of different types (a rewrite changed a shape)"
                );
                let mut changed = DidMerge(false, false);
                if a.requires_grad != b.requires_grad {
                    changed = DidMerge(!a.requires_grad, !b.requires_grad);
                    a.requires_grad = true;
                }
                match (a.splat, b.splat) {
                    (None, Some(_)) => {
                        a.splat = b.splat;
                        changed.0 = true;
                    }
                    (Some(_), None) => changed.1 = true,
                    _ => {}
                }
                changed
            }
            _ => panic!("merged an attribute leaf with a tensor class"),
        }
    }
}
