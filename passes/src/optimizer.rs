//! `optimizer`: appends the parameter update to a differentiated function, so that one function
//! is a whole training step `(params, optimizer state, batch) → (loss, params', state')`.
//!
//! # Interface
//!
//! Entry: a function with `grad.<p>` outputs (after `autodiff`). Exit: for every parameter `p`
//! with a `grad.<p>` output, an output named `p` holds the updated parameter; optimizer state is
//! carried in inputs and outputs of the same name, so step `k+1` is fed the outputs of step `k`:
//!
//! | kind | state (input and output) |
//! |---|---|
//! | `sgd` | none |
//! | `momentum` | `opt.momentum.<p>` |
//! | `adamw` | `opt.m.<p>`, `opt.v.<p>`, and the scalar step count `opt.step` (1 on the first step) |
//!
//! The `grad.<p>` outputs are removed unless `keep_grads` is set. All new nodes have phase
//! `optimizer` and the stage of the node that produced the gradient.
//!
//! # Updates (as PyTorch's `SGD` and `AdamW`)
//!
//! - `sgd`: `p' = p − lr·g`
//! - `momentum`: `b' = μ·b + g`, `p' = p − lr·b'`
//! - `adamw`: `m' = β₁m + (1−β₁)g`, `v' = β₂v + (1−β₂)g²`, `m̂ = m'/(1−β₁ᵗ)`, `v̂ = v'/(1−β₂ᵗ)`,
//!   `p' = p − lr·(m̂/(√v̂ + ε) + λ·p)` (decoupled weight decay), `t' = t + 1`.

use cleave_ir::tracer::{TraceError, Tracer};
use cleave_ir::{
    BinaryOp, DType, Function, Literal, Module, Op, Phase, TensorType, UnaryOp, Value,
};

use crate::autodiff::GRAD_PREFIX;
use crate::pass::{Pass, PassContext, PassError, PassOptions};

/// Which update rule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OptimizerKind {
    /// Plain stochastic gradient descent.
    Sgd,
    /// SGD with (heavy-ball) momentum.
    Momentum {
        /// The momentum coefficient μ.
        momentum: f64,
    },
    /// Adam with decoupled weight decay.
    AdamW {
        /// β₁.
        beta1: f64,
        /// β₂.
        beta2: f64,
        /// ε.
        eps: f64,
        /// λ (decoupled).
        weight_decay: f64,
    },
}

/// The `optimizer` pass.
#[derive(Clone, Debug)]
pub struct Optimizer {
    /// The update rule and its hyper-parameters.
    pub kind: OptimizerKind,
    /// Learning rate.
    pub lr: f64,
    /// Keep the `grad.*` outputs.
    pub keep_grads: bool,
}

impl Optimizer {
    /// Builds the pass from options `kind=sgd|momentum|adamw`, `lr`, `momentum`, `beta1`,
    /// `beta2`, `eps`, `weight_decay`, `keep_grads`.
    pub fn from_options(mut o: PassOptions) -> Result<Self, PassError> {
        let kind_name = o.take("kind").unwrap_or_else(|| "sgd".into());
        let lr = o.take_parsed("lr", 0.01)?;
        let keep_grads = o.take_parsed("keep_grads", false)?;
        let kind = match kind_name.as_str() {
            "sgd" => OptimizerKind::Sgd,
            "momentum" => OptimizerKind::Momentum {
                momentum: o.take_parsed("momentum", 0.9)?,
            },
            "adamw" => OptimizerKind::AdamW {
                beta1: o.take_parsed("beta1", 0.9)?,
                beta2: o.take_parsed("beta2", 0.999)?,
                eps: o.take_parsed("eps", 1e-8)?,
                weight_decay: o.take_parsed("weight_decay", 0.01)?,
            },
            other => {
                return Err(PassError::BadOption {
                    pass: "optimizer".into(),
                    key: "kind".into(),
                    message: format!("`{other}`: expected `sgd`, `momentum` or `adamw`"),
                })
            }
        };
        o.finish()?;
        Ok(Optimizer {
            kind,
            lr,
            keep_grads,
        })
    }
}

impl Pass for Optimizer {
    fn name(&self) -> &'static str {
        "optimizer"
    }

    fn run(&self, module: &mut Module, _ctx: &mut PassContext) -> Result<(), PassError> {
        for func in &mut module.functions {
            let taken = std::mem::take(func);
            *func = self.apply(taken).map_err(|message| PassError::Failed {
                pass: "optimizer",
                message,
            })?;
        }
        Ok(())
    }
}

fn scalar(t: &mut Tracer, dtype: DType, x: f64) -> Result<Value, TraceError> {
    Ok(t.push_op(
        Op::Constant {
            ty: TensorType::scalar(dtype),
            value: Literal::Float(vec![x]),
        },
        &[],
    )?[0])
}

fn splat(t: &mut Tracer, like: Value, x: f64) -> Result<Value, TraceError> {
    let ty = t.ty(like).clone();
    Ok(t.push_op(
        Op::Constant {
            ty,
            value: Literal::Float(vec![x]),
        },
        &[],
    )?[0])
}

fn bin(t: &mut Tracer, b: BinaryOp, x: Value, y: Value) -> Result<Value, TraceError> {
    Ok(t.push_op(Op::Binary(b), &[x, y])?[0])
}

/// `x·c` for a constant c.
fn scale(t: &mut Tracer, x: Value, c: f64) -> Result<Value, TraceError> {
    let k = splat(t, x, c)?;
    bin(t, BinaryOp::Mul, x, k)
}

impl Optimizer {
    fn apply(&self, func: Function) -> Result<Function, String> {
        let fname = func.name.clone();
        // (parameter value, name, gradient value, index of the grad output)
        let mut updates = Vec::new();
        for arg in func.params() {
            let gname = format!("{GRAD_PREFIX}{}", arg.name);
            if let Some(g) = func.output(&gname) {
                if func.outputs.iter().any(|o| o.name == arg.name) {
                    return Err(format!(
                        "@{fname}: an output is already named \"{}\"; was the optimizer applied already?",
                        arg.name
                    ));
                }
                updates.push((arg.value, arg.name.to_string(), g, arg.ty.clone()));
            }
        }
        if updates.is_empty() {
            return Ok(func);
        }
        let mut t = Tracer::from_function(func);
        let err = |e: TraceError| format!("@{fname}: {e}");
        t.set_phase(Phase::Optimizer);
        let step = match self.kind {
            OptimizerKind::AdamW { .. } => {
                t.set_stage(None);
                let s = t.input("opt.step", DType::F32, []).map_err(err)?;
                let one = scalar(&mut t, DType::F32, 1.0).map_err(err)?;
                let next = bin(&mut t, BinaryOp::Add, s, one).map_err(err)?;
                t.output("opt.step", next).map_err(err)?;
                Some(s)
            }
            _ => None,
        };
        for (p, name, g, ty) in updates {
            let stage = t.func().nodes[t.func().values[g].def].stage;
            t.set_stage(stage);
            let new_p = match self.kind {
                OptimizerKind::Sgd => {
                    let d = scale(&mut t, g, self.lr).map_err(err)?;
                    bin(&mut t, BinaryOp::Sub, p, d).map_err(err)?
                }
                OptimizerKind::Momentum { momentum } => {
                    let sname = format!("opt.momentum.{name}");
                    let b = t.input(&sname, ty.dtype, ty.shape.clone()).map_err(err)?;
                    let mb = scale(&mut t, b, momentum).map_err(err)?;
                    let nb = bin(&mut t, BinaryOp::Add, mb, g).map_err(err)?;
                    t.output(&sname, nb).map_err(err)?;
                    let d = scale(&mut t, nb, self.lr).map_err(err)?;
                    bin(&mut t, BinaryOp::Sub, p, d).map_err(err)?
                }
                OptimizerKind::AdamW {
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                } => self
                    .adamw(
                        &mut t,
                        p,
                        g,
                        &name,
                        &ty,
                        step.expect("step input"),
                        beta1,
                        beta2,
                        eps,
                        weight_decay,
                    )
                    .map_err(err)?,
            };
            t.output(&name, new_p).map_err(err)?;
        }
        let mut func = t.finish();
        if !self.keep_grads {
            func.outputs.retain(|o| !o.name.starts_with(GRAD_PREFIX));
        }
        Ok(func)
    }

    #[allow(clippy::too_many_arguments)]
    fn adamw(
        &self,
        t: &mut Tracer,
        p: Value,
        g: Value,
        name: &str,
        ty: &TensorType,
        step: Value,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    ) -> Result<Value, TraceError> {
        let mname = format!("opt.m.{name}");
        let vname = format!("opt.v.{name}");
        let m = t.input(&mname, ty.dtype, ty.shape.clone())?;
        let v = t.input(&vname, ty.dtype, ty.shape.clone())?;
        // m' = β₁m + (1−β₁)g
        let a = scale(t, m, beta1)?;
        let b = scale(t, g, 1.0 - beta1)?;
        let m2 = bin(t, BinaryOp::Add, a, b)?;
        // v' = β₂v + (1−β₂)g²
        let gg = bin(t, BinaryOp::Mul, g, g)?;
        let c = scale(t, v, beta2)?;
        let d = scale(t, gg, 1.0 - beta2)?;
        let v2 = bin(t, BinaryOp::Add, c, d)?;
        t.output(&mname, m2)?;
        t.output(&vname, v2)?;
        // Bias corrections 1 − βᵗ, computed once per parameter from the step input.
        let step_ty = t.ty(step).clone();
        let bc = |t: &mut Tracer, beta: f64| -> Result<Value, TraceError> {
            let bb = scalar(t, step_ty.dtype, beta)?;
            let pw = bin(t, BinaryOp::Pow, bb, step)?;
            let one = scalar(t, step_ty.dtype, 1.0)?;
            let c = bin(t, BinaryOp::Sub, one, pw)?;
            let c = if ty.dtype == step_ty.dtype {
                c
            } else {
                t.push_op(Op::Cast { to: ty.dtype }, &[c])?[0]
            };
            Ok(t.push_op(
                Op::Broadcast {
                    shape: ty.shape.clone(),
                    dims: vec![],
                },
                &[c],
            )?[0])
        };
        let c1 = bc(t, beta1)?;
        let c2 = bc(t, beta2)?;
        let mhat = bin(t, BinaryOp::Div, m2, c1)?;
        let vhat = bin(t, BinaryOp::Div, v2, c2)?;
        let sq = t.push_op(Op::Unary(UnaryOp::Sqrt), &[vhat])?[0];
        let e = splat(t, sq, eps)?;
        let den = bin(t, BinaryOp::Add, sq, e)?;
        let upd = bin(t, BinaryOp::Div, mhat, den)?;
        let wd = scale(t, p, weight_decay)?;
        let total = bin(t, BinaryOp::Add, upd, wd)?;
        let step_p = scale(t, total, self.lr)?;
        bin(t, BinaryOp::Sub, p, step_p)
    }
}
