//! `precision{bf16}` (`cleave train --precision bf16`): mixed-precision training as autocast
//! does it for GEMMs. Every `f32` `matmul` of a forward function runs in bfloat16:
//!
//! ```text
//! %y = matmul %a, %b : f32[M, N]
//! ```
//!
//! becomes
//!
//! ```text
//! %a16 = cast %a : bf16[…]     %b16 = cast %b : bf16[…]      (one cast per value, shared)
//! %y16 = matmul %a16, %b16 : bf16[M, N]
//! %y   = cast %y16 : f32[M, N]
//! ```
//!
//! Parameters stay `f32` (the master weights, which the optimizer updates) and are cast each
//! step; everything that is not a GEMM (elementwise ops, reductions, softmax, norms, the loss)
//! stays `f32`, as autocast keeps them. `autodiff` then differentiates through the casts: the
//! backward GEMMs run in bf16 too (`dA = dY16·B16ᵀ`), and what they read of the forward, the
//! bf16 operands, is what the stash keeps: its GEMM inputs halve, which the memory planner sees
//! in the values' types. The runtime's bf16 GEMM widens its operands to f32, accumulates in f32
//! and rounds the result to bf16 once (the interpreter computes the exact product in f64 and
//! rounds once, so the two can differ by one bf16 step where the f32 sum rounds differently).
//!
//! `precision{f16}` does the same in IEEE binary16, whose range (6·10⁻⁸ to 65504) is far
//! narrower than f32's: the gradients of the backward GEMMs would underflow. So the pass also
//! adds an `f32[]` data input `precision.loss_scale`, which `autodiff` takes as the loss's seed: the whole
//! backward carries the scale `S`, and the trainer divides `S` out of the parameter gradients,
//! skips a step whose gradients are not finite (halving `S`) and doubles `S` after a window of
//! finite steps (dynamic loss scaling, as in Micikevicius et al., "Mixed Precision Training",
//! and PyTorch's `GradScaler`). The f16 GEMM is the bf16 one with f16 rounding.
//!
//! `precision{f32}` changes nothing. A function without an `f32` matmul is an error, never a
//! silent no-op.

use std::collections::HashMap;

use cleave_ir::{DType, Function, Module, Node, Op, Value};

use crate::pass::{Pass, PassContext, PassError, PassOptions};

/// The compute precision of a training step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// Everything in f32 (the default).
    #[default]
    F32,
    /// GEMMs in bf16 with f32 master weights (see the module docs).
    Bf16,
    /// GEMMs in f16 with f32 master weights and a dynamic loss scale (see the module docs).
    F16,
}

impl Precision {
    /// Parses `f32`, `bf16` or `f16`.
    pub fn parse(name: &str) -> Result<Precision, String> {
        match name {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            "f16" => Ok(Precision::F16),
            other => Err(format!("`{other}`: unknown precision; f32, bf16 or f16")),
        }
    }

    /// The element type of the GEMMs.
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
            Precision::F16 => DType::F16,
        }
    }

    /// The name `parse` reads.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        }
    }
}

/// The `precision` pass (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrecisionPass {
    /// The precision of the GEMMs.
    pub precision: Precision,
}

impl PrecisionPass {
    /// Parses the positional option (`precision{bf16}`) or `dtype=…`.
    pub fn from_options(mut o: PassOptions) -> Result<Self, PassError> {
        let flag = ["bf16", "f32", "f16"]
            .into_iter()
            .find(|k| o.take(k).is_some())
            .map(str::to_string);
        let name = flag
            .or_else(|| o.take("dtype"))
            .unwrap_or_else(|| "bf16".into());
        let precision = Precision::parse(&name).map_err(|message| PassError::BadOption {
            pass: "precision".into(),
            key: "dtype".into(),
            message,
        })?;
        o.finish()?;
        Ok(PrecisionPass { precision })
    }
}

impl Pass for PrecisionPass {
    fn name(&self) -> &'static str {
        "precision"
    }

    fn run(&self, module: &mut Module, _ctx: &mut PassContext) -> Result<(), PassError> {
        if self.precision == Precision::F32 {
            return Ok(());
        }
        let mut done = 0;
        for func in &mut module.functions {
            done += narrow_gemms(func, self.precision).map_err(|message| PassError::Failed {
                pass: "precision",
                message,
            })?;
        }
        if done == 0 {
            return Err(PassError::Failed {
                pass: "precision",
                message: format!(
                    "{} runs the GEMMs in {}, and the module has no f32 matmul",
                    self.precision.name(),
                    self.precision.name()
                ),
            });
        }
        Ok(())
    }
}

/// Rewrites every forward `f32` matmul of `func` to `precision`'s type, and for f16 adds the
/// `precision.loss_scale` input (see the module docs); returns how many GEMMs. A function that
/// already has an argument of that name is an error under f16.
pub fn narrow_gemms(func: &mut Function, precision: Precision) -> Result<usize, String> {
    if precision == Precision::F32 {
        return Ok(0);
    }
    let done = narrow_gemms_to(func, precision.dtype());
    if precision == Precision::F16 && done > 0 {
        let name = crate::autodiff::LOSS_SCALE_INPUT;
        if func.args().any(|a| a.name == name) {
            return Err(format!(
                "@{}: f16 adds the loss-scale input `{name}`, and the function already has an \
                 argument of that name",
                func.name
            ));
        }
        let ty = cleave_ir::TensorType::new(DType::F32, Vec::<usize>::new());
        let n = func
            .create_inferred(
                Op::Input {
                    name: name.into(),
                    ty,
                },
                Vec::new(),
                (cleave_ir::Phase::Forward, None),
            )
            .map_err(|e| format!("@{}: {e}", func.name))?;
        func.body.insert(0, n);
    }
    Ok(done)
}

/// Rewrites every forward `f32` matmul of `func` to run in `dt` between casts.
fn narrow_gemms_to(func: &mut Function, dt: DType) -> usize {
    let mut narrow: HashMap<Value, Value> = HashMap::new();
    let mut rename: HashMap<Value, Value> = HashMap::new();
    let old_body = std::mem::take(&mut func.body);
    let mut body: Vec<Node> = Vec::with_capacity(old_body.len());
    let mut done = 0;
    let push = |func: &mut Function, body: &mut Vec<Node>, op: Op, x: Value, at: Node| {
        let place = (func.nodes[at].phase, func.nodes[at].stage);
        let n = func
            .create_inferred(op, vec![x], place)
            .expect("a cast is well typed");
        body.push(n);
        func.result(n)
    };
    for n in old_body {
        for i in 0..func.nodes[n].operands.len() {
            if let Some(&r) = rename.get(&func.nodes[n].operands[i]) {
                func.nodes[n].operands[i] = r;
            }
        }
        let d = &func.nodes[n];
        let gemm = matches!(d.op, Op::MatMul { .. })
            && !d.phase.is_backward()
            && d.operands.iter().all(|&o| func.ty(o).dtype == DType::F32);
        if !gemm {
            body.push(n);
            continue;
        }
        for i in 0..2 {
            let x = func.nodes[n].operands[i];
            let x16 = match narrow.get(&x) {
                Some(&x16) => x16,
                None => {
                    let x16 = push(func, &mut body, Op::Cast { to: dt }, x, n);
                    narrow.insert(x, x16);
                    x16
                }
            };
            func.nodes[n].operands[i] = x16;
        }
        let y = func.nodes[n].results[0];
        func.values[y].ty.dtype = dt;
        body.push(n);
        let y32 = push(func, &mut body, Op::Cast { to: DType::F32 }, y, n);
        rename.insert(y, y32);
        done += 1;
    }
    func.body = body;
    for o in &mut func.outputs {
        if let Some(&r) = rename.get(&o.value) {
            o.value = r;
        }
    }
    done
}
