//! `jvp`: forward-mode differentiation (Jacobian-vector products).
//!
//! For a function `f(args) → outputs`, the pass appends the tangent computation: every float
//! argument `a` gets a tangent input `tangent.<a>`, and every float output `o` gets a tangent
//! output `tangent.<o>` = J_f(args)·(tangents). Tangent nodes are ordinary forward nodes (phase
//! `forward`), emitted right after the forward nodes, in body order. Values that do not depend on
//! a tangent have no tangent node (a zero tangent is never materialised unless an output needs
//! it).
//!
//! Each rule below states `f` and its linearisation. Elementwise ops reuse the per-operand
//! derivative of the VJP rules (for an elementwise op, `∂y/∂xᵢ · ẋᵢ` and `dy · ∂y/∂xᵢ` are the
//! same expression with the roles of `ẋᵢ` and `dy` swapped); everything else is written here.
//!
//! Limitations: `max_pool2d` with overlapping windows (stride smaller than the window) has no
//! tangent rule yet and is reported as an error.
//!
//! Entry: a verified module. Exit: a verified module; arguments and outputs are extended.

use cleave_ir::tracer::{TraceError, Tracer};
use cleave_ir::{
    CompareOp, Function, Literal, Module, NodeData, Op, PoolKind, ReduceKind, UnaryOp, Value,
};
use cranelift_entity::SecondaryMap;

use crate::autodiff::is_differentiable_operand;
use crate::pass::{Pass, PassContext, PassError, PassOptions};

/// The prefix of tangent inputs and outputs.
pub const TANGENT_PREFIX: &str = "tangent.";

/// The `jvp` pass.
#[derive(Clone, Debug, Default)]
pub struct Jvp {
    /// The function to transform (default: every function).
    pub function: Option<String>,
}

impl Jvp {
    /// Builds the pass from options (`function`).
    pub fn from_options(mut o: PassOptions) -> Result<Self, PassError> {
        let function = o.take("function");
        o.finish()?;
        Ok(Jvp { function })
    }
}

impl Pass for Jvp {
    fn name(&self) -> &'static str {
        "jvp"
    }

    fn run(&self, module: &mut Module, _ctx: &mut PassContext) -> Result<(), PassError> {
        for func in &mut module.functions {
            if self.function.as_ref().is_some_and(|n| *n != func.name) {
                continue;
            }
            let taken = std::mem::take(func);
            *func = linearize(taken).map_err(|message| PassError::Failed {
                pass: "jvp",
                message,
            })?;
        }
        Ok(())
    }
}

/// Appends the tangent computation to a function (see the module docs).
pub fn linearize(func: Function) -> Result<Function, String> {
    let fname = func.name.clone();
    let args: Vec<(Value, String)> = func
        .args()
        .filter(|a| a.ty.dtype.is_float())
        .map(|a| (a.value, a.name.to_string()))
        .collect();
    let outputs = func.outputs.clone();
    let mut t = Tracer::from_function(func);
    let err = |e: TraceError| format!("@{fname}: {e}");
    let body = t.func().body.clone();
    let tan =
        tangents_of(&mut t, &body, &args, TANGENT_PREFIX).map_err(|e| format!("@{fname}: {e}"))?;
    for o in outputs {
        if !t.ty(o.value).dtype.is_float() {
            continue;
        }
        let v = match tan[o.value] {
            Some(v) => v,
            None => {
                let ty = t.ty(o.value).clone();
                t.push_op(
                    Op::Constant {
                        ty,
                        value: Literal::Float(vec![0.0]),
                    },
                    &[],
                )
                .map_err(err)?[0]
            }
        };
        t.output(&format!("{TANGENT_PREFIX}{}", o.name), v)
            .map_err(err)?;
    }
    Ok(t.finish())
}

/// Appends tangent inputs `<prefix><name>` for the given float arguments and the tangent
/// computation of every node of `body` (the nodes to linearize, in order) that depends on them.
/// Returns the tangent of every value (`None`: the value does not depend on the chosen
/// tangents). Used by [`linearize`] and by the `forward-gradient` method of `autodiff`, which
/// calls it once per random tangent with its own prefix, always over the original forward body
/// (walking the grown body would differentiate the earlier tangents again).
pub fn tangents_of(
    t: &mut Tracer,
    body: &[cleave_ir::Node],
    args: &[(Value, String)],
    prefix: &str,
) -> Result<SecondaryMap<Value, Option<Value>>, String> {
    let mut tan: SecondaryMap<Value, Option<Value>> = SecondaryMap::with_default(None);
    for (v, name) in args {
        let ty = t.ty(*v).clone();
        let d = t
            .input(&format!("{prefix}{name}"), ty.dtype, ty.shape.clone())
            .map_err(|e| e.to_string())?;
        tan[*v] = Some(d);
    }
    for &node in body {
        let data = t.func().nodes[node].clone();
        if data.op.arg_role().is_some() {
            continue;
        }
        let any = data
            .operands
            .iter()
            .enumerate()
            .any(|(i, &v)| tan[v].is_some() && is_differentiable_operand(&data.op, i));
        if !any {
            continue;
        }
        t.set_stage(data.stage);
        let tangents: Vec<Option<Value>> = data
            .operands
            .iter()
            .enumerate()
            .map(|(i, &v)| tan[v].filter(|_| is_differentiable_operand(&data.op, i)))
            .collect();
        let outs = rule(t, &data, &tangents)
            .map_err(|e| format!("tangent of `{}`: {e}", data.op.name()))?;
        for (r, o) in data.results.iter().zip(outs) {
            if t.ty(*r).dtype.is_float() {
                tan[*r] = o;
            }
        }
    }
    Ok(tan)
}

fn emit1(t: &mut Tracer, op: Op, operands: &[Value]) -> Result<Value, TraceError> {
    Ok(t.push_op(op, operands)?[0])
}

fn zeros_like(t: &mut Tracer, v: Value) -> Result<Value, TraceError> {
    let ty = t.ty(v).clone();
    emit1(
        t,
        Op::Constant {
            ty,
            value: Literal::Float(vec![0.0]),
        },
        &[],
    )
}

/// The tangent of operand `i`, or zeros of its type.
fn tangent_or_zero(
    t: &mut Tracer,
    node: &NodeData,
    tans: &[Option<Value>],
    i: usize,
) -> Result<Value, TraceError> {
    match tans[i] {
        Some(v) => Ok(v),
        None => zeros_like(t, node.operands[i]),
    }
}

/// Sums the terms that exist.
fn sum_terms(t: &mut Tracer, terms: Vec<Value>) -> Result<Option<Value>, TraceError> {
    let mut acc: Option<Value> = None;
    for v in terms {
        acc = Some(match acc {
            None => v,
            Some(a) => crate::autodiff::rules::add(t, a, v)?,
        });
    }
    Ok(acc)
}

/// Applies a linear op (the same op, other operands unchanged) to the tangent of operand `i`.
fn same_op(t: &mut Tracer, node: &NodeData, i: usize, tangent: Value) -> Result<Value, TraceError> {
    let mut operands = node.operands.clone();
    operands[i] = tangent;
    emit1(t, node.op.clone(), &operands)
}

/// The tangents of a node's results, given its operands' tangents.
fn rule(
    t: &mut Tracer,
    node: &NodeData,
    tans: &[Option<Value>],
) -> Result<Vec<Option<Value>>, TraceError> {
    use crate::autodiff::rules as r;
    let one = |v: Result<Value, TraceError>| v.map(|v| vec![Some(v)]);
    let one_opt = |v: Result<Option<Value>, TraceError>| v.map(|v| vec![v]);
    match &node.op {
        // Elementwise: ẏ = Σᵢ ∂y/∂xᵢ · ẋᵢ, the VJP rule's per-operand derivative applied to ẋᵢ.
        Op::Unary(_) => one(r::vjp(t, node, &[tans[0]], 0)),
        Op::Binary(_) | Op::Select => {
            let mut terms = Vec::new();
            for (i, tan) in tans.iter().enumerate() {
                if let Some(d) = tan {
                    terms.push(r::vjp(t, node, &[Some(*d)], i)?);
                }
            }
            one_opt(sum_terms(t, terms))
        }
        // Custom-VJP ops: the tangent rule is the transpose of the VJP rule (both are diagonal:
        // `ẏ = ẋ` for straight-through estimators, `ẏ = −λ·ẋ` for gradient reversal), so forward
        // gradients estimate the same rewritten gradient as reverse mode.
        Op::Ste(_) | Op::GradReverse { .. } => one(r::vjp(t, node, &[tans[0]], 0)),
        // Linear ops in their differentiable operands: apply the op to the tangent.
        Op::Broadcast { .. }
        | Op::Reshape { .. }
        | Op::Transpose { .. }
        | Op::Slice { .. }
        | Op::Dropout { .. }
        | Op::Cast { .. }
        | Op::AvgPool2dGrad { .. }
        | Op::Reduce {
            kind: ReduceKind::Sum | ReduceKind::Mean,
            ..
        } => one(same_op(t, node, 0, tans[0].expect("tangent"))),
        Op::Pool2d {
            kind: PoolKind::Avg,
            ..
        } => one(same_op(t, node, 0, tans[0].expect("tangent"))),
        // f(x) = pad(x, low, high, value); ẏ = pad(ẋ, low, high, 0): the fill is a constant.
        Op::Pad { low, high, .. } => one(emit1(
            t,
            Op::Pad {
                low: low.clone(),
                high: high.clone(),
                value: 0.0,
            },
            &[tans[0].expect("tangent")],
        )),
        Op::Split { .. } => {
            let d = tans[0].expect("tangent");
            Ok(t.push_op(node.op.clone(), &[d])?
                .into_iter()
                .map(Some)
                .collect())
        }
        Op::Concat { .. } => {
            let mut parts = Vec::new();
            for i in 0..node.operands.len() {
                parts.push(tangent_or_zero(t, node, tans, i)?);
            }
            one(emit1(t, node.op.clone(), &parts))
        }
        // ẏ = Σ(ẋ·mask)/count over the reduced axes: the tangent of the (evenly shared) extremum.
        Op::Reduce { axes, .. } => {
            let x = node.operands[0];
            let xt = t.ty(x).clone();
            let y = node.results[0];
            let yb = r::broadcast_back(t, y, &xt.shape, axes)?;
            let hit = r::cmp(t, CompareOp::Eq, x, yb)?;
            let onev = r::splat_ty(t, &xt, 1.0)?;
            let zero = r::splat_ty(t, &xt, 0.0)?;
            let ind = r::select(t, hit, onev, zero)?;
            let count = r::reduce_sum(t, ind, axes.clone())?;
            let picked = r::mul(t, ind, tans[0].expect("tangent"))?;
            let s = r::reduce_sum(t, picked, axes.clone())?;
            one(r::div(t, s, count))
        }
        // Bilinear ops: ẏ = f(ȧ, b) + f(a, ḃ).
        Op::MatMul { .. }
        | Op::Conv2d { .. }
        | Op::Conv2dGradInput { .. }
        | Op::Conv2dGradWeight { .. } => {
            let mut terms = Vec::new();
            for (i, tan) in tans.iter().enumerate() {
                if let Some(d) = tan {
                    terms.push(same_op(t, node, i, *d)?);
                }
            }
            one_opt(sum_terms(t, terms))
        }
        // Linear in dy; piecewise constant in x.
        Op::MaxPool2dGrad { .. } => match tans[1] {
            Some(d) => one(same_op(t, node, 1, d)),
            None => Ok(vec![None]),
        },
        Op::Pool2d {
            kind: PoolKind::Max,
            window,
            stride,
            padding,
            ..
        } => {
            let x = node.operands[0];
            let shape = t.ty(x).shape.clone();
            let tiles = stride == window
                && padding.iter().all(|&p| p == 0)
                && shape[2].is_multiple_of(window[0])
                && shape[3].is_multiple_of(window[1]);
            if !tiles {
                return Err(t.error(
                    "max_pool2d",
                    &[x],
                    "forward-mode differentiation needs non-overlapping windows (stride = window, no padding)".into(),
                ));
            }
            // Tile view [N,C,HO,KH,WO,KW]; the tangent at each window's maximum.
            let (ho, wo) = (shape[2] / window[0], shape[3] / window[1]);
            let tiled = vec![shape[0], shape[1], ho, window[0], wo, window[1]];
            let xv = emit1(
                t,
                Op::Reshape {
                    shape: tiled.clone(),
                },
                &[x],
            )?;
            let dv = emit1(
                t,
                Op::Reshape {
                    shape: tiled.clone(),
                },
                &[tans[0].expect("tangent")],
            )?;
            let out = emit1(
                t,
                Op::Reduce {
                    kind: ReduceKind::Max,
                    axes: vec![3, 5],
                },
                &[xv],
            )?;
            let pseudo = NodeData {
                op: Op::Reduce {
                    kind: ReduceKind::Max,
                    axes: vec![3, 5],
                },
                operands: vec![xv],
                results: vec![out],
                phase: node.phase,
                stage: node.stage,
            };
            rule(t, &pseudo, &[Some(dv)])
        }
        Op::Gather { .. } => one(same_op(t, node, 0, tans[0].expect("tangent"))),
        Op::ScatterAdd { .. } => {
            let base = tangent_or_zero(t, node, tans, 0)?;
            let upd = tangent_or_zero(t, node, tans, 2)?;
            one(emit1(t, node.op.clone(), &[base, node.operands[1], upd]))
        }
        // ẏ = y·(ẋ − Σ(ẋ·y))
        Op::Softmax { axis } => {
            let y = node.results[0];
            let d = tans[0].expect("tangent");
            let dy = r::mul(t, d, y)?;
            let s = r::sum_keep(t, dy, *axis)?;
            let c = r::sub(t, d, s)?;
            one(r::mul(t, y, c))
        }
        // ẏ = ẋ − Σ(exp(y)·ẋ)
        Op::LogSoftmax { axis } => {
            let y = node.results[0];
            let d = tans[0].expect("tangent");
            let p = r::un(t, UnaryOp::Exp, y)?;
            let pd = r::mul(t, p, d)?;
            let s = r::sum_keep(t, pd, *axis)?;
            one(r::sub(t, d, s))
        }
        // ẏ = r·(ẋc − y·mean(y·ẋc)), ẋc = ẋ − mean(ẋ); with ẋc = ẋ for RMS norm.
        Op::LayerNorm { eps } | Op::RmsNorm { eps } => {
            let (x, y) = (node.operands[0], node.results[0]);
            let last = t.ty(x).rank() - 1;
            let d = tans[0].expect("tangent");
            let (xc, dc) = if matches!(node.op, Op::LayerNorm { .. }) {
                let mu = r::mean_keep(t, x, last)?;
                let xc = r::sub(t, x, mu)?;
                let md = r::mean_keep(t, d, last)?;
                (xc, r::sub(t, d, md)?)
            } else {
                (x, d)
            };
            let x2 = r::mul(t, xc, xc)?;
            let m = r::mean_keep(t, x2, last)?;
            let e = r::splat(t, m, *eps)?;
            let v = r::add(t, m, e)?;
            let inv = r::un(t, UnaryOp::Rsqrt, v)?;
            let yd = r::mul(t, y, dc)?;
            let m2 = r::mean_keep(t, yd, last)?;
            let ym = r::mul(t, y, m2)?;
            let c = r::sub(t, dc, ym)?;
            one(r::mul(t, inv, c))
        }
        // l̇ = Σ_c (softmax(z) − onehot(label))·ż over the class dimension.
        Op::CrossEntropy => {
            let (z, labels) = (node.operands[0], node.operands[1]);
            let zt = t.ty(z).clone();
            let last = zt.rank() - 1;
            let p = emit1(t, Op::Softmax { axis: last }, &[z])?;
            let oh = emit1(
                t,
                Op::OneHot {
                    depth: zt.shape[last],
                    dtype: zt.dtype,
                },
                &[labels],
            )?;
            let g = r::sub(t, p, oh)?;
            let gd = r::mul(t, g, tans[0].expect("tangent"))?;
            one(r::reduce_sum(t, gd, vec![last]))
        }
        Op::Input { .. }
        | Op::Param { .. }
        | Op::Constant { .. }
        | Op::Iota { .. }
        | Op::Compare(_)
        | Op::OneHot { .. }
        | Op::StopGradient => Ok(vec![None; node.results.len()]),
    }
}
