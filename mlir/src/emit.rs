//! Kernel groups → MLIR text: `func.func`s on flat memrefs whose bodies are `linalg.generic`s on
//! tensors.
//!
//! Conventions (the same for the GPU and the CPU pipelines):
//!
//! - Every buffer is a flat `memref<N x T>` (a rank-0 value is `memref<1 x T>`): the kernel's
//!   parameters are one pointer each under the bare-pointer calling convention, and reshapes cost
//!   nothing. Inputs come first, then outputs, in [`KernelGroup`] order.
//! - Inputs enter tensor land through `bufferization.to_tensor … restrict`; outputs leave through
//!   `bufferization.materialize_in_destination … restrict writable`, so that after
//!   `eliminate-empty-tensors` and `one-shot-bufferize` each generic writes its output buffer in
//!   place.
//! - Every op is one `linalg.generic` per result, with a single parallel loop over the result's
//!   flat index `d0`. Elementwise and data-movement ops read their operands through affine
//!   indexing maps (`broadcast`, `transpose`, `slice`, `split` are maps such as
//!   `(d0) -> ((d0 floordiv 4) * 12 + d0 mod 4)`), so `linalg-fuse-elementwise-ops` fuses whole
//!   chains. Ops that gather (reductions, GEMMs, convolutions, pools, norms, gather/scatter,
//!   concat, pad) compute indices in the body, read with `tensor.extract` and reduce with
//!   `scf.for`: one thread per output element on the GPU. Softmax-like ops use two generics (row
//!   statistics, then the elementwise result).
//! - Transcendentals come from `crate::mathlib` (no libdevice).

use std::collections::HashMap;
use std::fmt::Write as _;

use cleave_ir::{
    BinaryOp, CompareOp, DType, Function, Literal, Op, ReduceKind, SteOp, UnaryOp, Value,
};

use crate::body::{elem_ty, float_lit, is_float, strides, Body};
use crate::mathlib;
use crate::partition::KernelGroup;

/// Why a node cannot be emitted.
#[derive(Debug, thiserror::Error)]
#[error("kernel {kernel}: op `{op}` (result {ty}): {reason}")]
pub struct EmitError {
    /// The kernel group.
    pub kernel: String,
    /// The op's name.
    pub op: String,
    /// The op's first result type.
    pub ty: String,
    /// What is not supported.
    pub reason: String,
}

/// One emitted kernel group: a `func.func @name` (without the surrounding module).
#[derive(Clone, Debug)]
pub struct EmittedKernel {
    /// The group.
    pub group: KernelGroup,
    /// Dense (non-splat) constants of the group, passed as parameters after the outputs; the
    /// runtime uploads their data ([`constant_data`]).
    pub constants: Vec<Value>,
    /// The `func.func` text.
    pub func: String,
}

/// The elements of a dense constant (its literal, as f64; bools as 0 or 1).
pub fn constant_data(func: &Function, v: Value) -> Vec<f64> {
    match &func.node(func.values[v].def).op {
        Op::Constant { value, .. } => match value {
            Literal::Float(x) => x.clone(),
            Literal::Int(x) => x.iter().map(|&i| i as f64).collect(),
            Literal::Bool(x) => x.iter().map(|&b| b as u8 as f64).collect(),
        },
        _ => Vec::new(),
    }
}

/// Wraps functions into a module.
pub fn module_text(funcs: &[&str]) -> String {
    let mut s = String::from("module {\n");
    for f in funcs {
        s.push_str(f);
    }
    s.push_str("}\n");
    s
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product::<usize>().max(1)
}

/// `tensor<N x T>` of a value.
fn tensor_ty(func: &Function, v: Value) -> String {
    let ty = func.ty(v);
    format!("tensor<{}x{}>", numel(&ty.shape), elem_ty(ty.dtype))
}

fn memref_ty(func: &Function, v: Value) -> String {
    let ty = func.ty(v);
    format!("memref<{}x{}>", numel(&ty.shape), elem_ty(ty.dtype))
}

/// An affine expression (in `d0`, the result's flat index) for the result's multi-index, one per
/// dimension.
fn out_index_exprs(shape: &[usize]) -> Vec<String> {
    let st = strides(shape);
    (0..shape.len())
        .map(|i| {
            let q = if st[i] == 1 {
                "d0".to_string()
            } else {
                format!("(d0 floordiv {})", st[i])
            };
            if i == 0 {
                q
            } else {
                format!("({q} mod {})", shape[i])
            }
        })
        .collect()
}

/// The flat index of multi-index `idx` (affine expressions) in `shape`.
fn flat_expr(idx: &[String], shape: &[usize]) -> String {
    let st = strides(shape);
    let terms: Vec<String> = idx
        .iter()
        .zip(&st)
        .filter(|(e, _)| e.as_str() != "0")
        .map(|(e, &s)| {
            if s == 1 {
                e.clone()
            } else {
                format!("{e} * {s}")
            }
        })
        .collect();
    if terms.is_empty() {
        "0".into()
    } else {
        terms.join(" + ")
    }
}

pub(crate) struct Emitter<'f> {
    func: &'f Function,
    group: String,
    out: String,
    counter: usize,
    /// The tensor SSA name of each value available in the kernel.
    tensors: HashMap<Value, String>,
    /// Dense constants, passed as parameters after the outputs.
    constants: Vec<Value>,
}

/// An operand of a generic: tensor SSA name, tensor type, element type, indexing expression.
pub(crate) struct In {
    t: String,
    tty: String,
    ety: String,
    expr: String,
}

impl<'f> Emitter<'f> {
    fn err(&self, op: &Op, ty: &str, reason: impl Into<String>) -> EmitError {
        EmitError {
            kernel: self.group.clone(),
            op: op.name().to_string(),
            ty: ty.to_string(),
            reason: reason.into(),
        }
    }

    fn fresh(&mut self) -> String {
        let n = format!("%t{}", self.counter);
        self.counter += 1;
        n
    }

    /// Emits a one-loop `linalg.generic` producing a flat tensor of `n` elements of `ety`.
    /// `body` gets the builder and the block arguments of the inputs and returns the yielded value.
    fn generic(
        &mut self,
        n: usize,
        ety: &str,
        ins: &[In],
        body: impl FnOnce(&mut Body, &[String]) -> String,
    ) -> String {
        let empty = self.fresh();
        let res = self.fresh();
        let _ = writeln!(self.out, "    {empty} = tensor.empty() : tensor<{n}x{ety}>");
        let mut maps: Vec<String> = ins
            .iter()
            .map(|i| format!("affine_map<(d0) -> ({})>", i.expr))
            .collect();
        maps.push("affine_map<(d0) -> (d0)>".into());
        let ins_clause = if ins.is_empty() {
            String::new()
        } else {
            format!(
                "ins({} : {}) ",
                ins.iter()
                    .map(|i| i.t.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                ins.iter()
                    .map(|i| i.tty.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        let _ = writeln!(
            self.out,
            "    {res} = linalg.generic {{indexing_maps = [{}], iterator_types = [\"parallel\"]}} {ins_clause}outs({empty} : tensor<{n}x{ety}>) {{",
            maps.join(", ")
        );
        let args: Vec<String> = ins.iter().map(|_| self.fresh()).collect();
        let outarg = self.fresh();
        let mut params: Vec<String> = args
            .iter()
            .zip(ins)
            .map(|(a, i)| format!("{a}: {}", i.ety))
            .collect();
        params.push(format!("{outarg}: {ety}"));
        let _ = writeln!(self.out, "    ^bb0({}):", params.join(", "));
        let mut b = Body::new(&mut self.counter, 3);
        let y = body(&mut b, &args);
        b.line(format!("linalg.yield {y} : {ety}"));
        for l in b.lines {
            let _ = writeln!(self.out, "{l}");
        }
        let _ = writeln!(self.out, "    }} -> tensor<{n}x{ety}>");
        res
    }

    fn input(&self, v: Value, expr: String) -> In {
        let ty = self.func.ty(v);
        In {
            t: self.tensors[&v].clone(),
            tty: tensor_ty(self.func, v),
            ety: elem_ty(ty.dtype).to_string(),
            expr,
        }
    }

    /// Operand `v` read at the same flat index.
    fn same(&self, v: Value) -> In {
        self.input(v, "d0".into())
    }

    fn node(&mut self, node: cleave_ir::Node) -> Result<(), EmitError> {
        let func = self.func;
        let data = func.node(node);
        let op = &data.op;
        let ops = &data.operands;
        let rty = func.ty(data.results[0]).clone();
        let n = numel(&rty.shape);
        let ety = elem_ty(rty.dtype);
        let rname = rty.to_string();
        let result: String = match op {
            Op::Input { .. } | Op::Param { .. } => return Ok(()),
            Op::Constant { value, .. } if value.len() > 1 => {
                // A kernel parameter (after the outputs) whose data the runtime uploads once:
                // dense constants in the kernel body would become host-memory globals.
                let i = self.constants.len();
                self.constants.push(data.results[0]);
                let t = format!("%c{i}");
                let inp = In {
                    t,
                    tty: format!("tensor<{n}x{ety}>"),
                    ety: ety.to_string(),
                    expr: "d0".into(),
                };
                self.generic(n, ety, &[inp], |_, a| a[0].clone())
            }
            Op::Constant { value, .. } => {
                let lit = match value {
                    Literal::Float(v) => float_lit(v[0], ety),
                    Literal::Int(v) => v[0].to_string(),
                    Literal::Bool(v) => v[0].to_string(),
                };
                let ety2 = ety.to_string();
                self.generic(n, ety, &[], |b, _| {
                    let v = b.fresh();
                    let text = if ety2 == "i1" {
                        format!("{v} = arith.constant {lit}")
                    } else {
                        format!("{v} = arith.constant {lit} : {ety2}")
                    };
                    b.line(text);
                    v
                })
            }
            Op::Iota { dim, .. } => {
                let shape = rty.shape.clone();
                let dim = *dim;
                self.generic(n, ety, &[], |b, _| {
                    let p = b.op("linalg.index 0 : index");
                    let idx = b.decompose(&p, &shape);
                    let i = b.index_to(&idx[dim], "i64");
                    if is_float(ety) {
                        b.op(format!("arith.sitofp {i} : i64 to {ety}"))
                    } else if ety == "i64" {
                        i
                    } else {
                        b.op(format!("arith.trunci {i} : i64 to {ety}"))
                    }
                })
            }
            Op::Unary(u) => {
                let u = *u;
                let x = self.same(ops[0]);
                let mut failure = None;
                let r = self.generic(n, ety, &[x], |b, a| match unary(b, u, &a[0], ety) {
                    Ok(v) => v,
                    Err(e) => {
                        failure = Some(e);
                        a[0].clone()
                    }
                });
                if let Some(e) = failure {
                    return Err(self.err(op, &rname, e));
                }
                r
            }
            // Straight-through estimators and gradient reversal: their forward is an ordinary
            // unary op or the identity (only their gradients differ).
            Op::Ste(SteOp::Round) | Op::Ste(SteOp::Sign) => {
                let u = if matches!(op, Op::Ste(SteOp::Round)) {
                    UnaryOp::Round
                } else {
                    UnaryOp::Sign
                };
                let x = self.same(ops[0]);
                let mut failure = None;
                let r = self.generic(n, ety, &[x], |b, a| match unary(b, u, &a[0], ety) {
                    Ok(v) => v,
                    Err(e) => {
                        failure = Some(e);
                        a[0].clone()
                    }
                });
                if let Some(e) = failure {
                    return Err(self.err(op, &rname, e));
                }
                r
            }
            Op::GradReverse { .. } => {
                let x = self.same(ops[0]);
                self.generic(n, ety, &[x], |_, a| a[0].clone())
            }
            Op::Binary(bop) => {
                let bop = *bop;
                let ins = [self.same(ops[0]), self.same(ops[1])];
                self.generic(n, ety, &ins, |b, a| binary(b, bop, &a[0], &a[1], ety))
            }
            Op::Compare(c) => {
                let c = *c;
                let ins = [self.same(ops[0]), self.same(ops[1])];
                let oty = ins[0].ety.clone();
                self.generic(n, ety, &ins, |b, a| compare(b, c, &a[0], &a[1], &oty))
            }
            Op::Select => {
                let ins = [self.same(ops[0]), self.same(ops[1]), self.same(ops[2])];
                self.generic(n, ety, &ins, |b, a| b.select(&a[0], &a[1], &a[2], ety))
            }
            Op::Cast { to } => {
                let from = func.ty(ops[0]).dtype;
                let to = *to;
                let x = self.same(ops[0]);
                self.generic(n, ety, &[x], |b, a| cast(b, &a[0], from, to))
            }
            Op::StopGradient | Op::Reshape { .. } => {
                let x = self.same(ops[0]);
                self.generic(n, ety, &[x], |_, a| a[0].clone())
            }
            Op::Dropout { rate, seed } => {
                let (rate, seed) = (*rate, *seed);
                let x = self.same(ops[0]);
                self.generic(n, ety, &[x], |b, a| dropout(b, &a[0], ety, rate, seed))
            }
            Op::Broadcast { dims, .. } => {
                let sshape = func.ty(ops[0]).shape.clone();
                let oidx = out_index_exprs(&rty.shape);
                let idx: Vec<String> = dims
                    .iter()
                    .enumerate()
                    .map(|(i, &d)| {
                        if sshape[i] == 1 {
                            "0".to_string()
                        } else {
                            oidx[d].clone()
                        }
                    })
                    .collect();
                let x = self.input(ops[0], flat_expr(&idx, &sshape));
                self.generic(n, ety, &[x], |_, a| a[0].clone())
            }
            Op::Transpose { perm } => {
                let sshape = func.ty(ops[0]).shape.clone();
                let oidx = out_index_exprs(&rty.shape);
                let mut idx = vec![String::new(); sshape.len()];
                for (i, &p) in perm.iter().enumerate() {
                    idx[p] = oidx[i].clone();
                }
                let x = self.input(ops[0], flat_expr(&idx, &sshape));
                self.generic(n, ety, &[x], |_, a| a[0].clone())
            }
            Op::Slice { start, stride, .. } => {
                let sshape = func.ty(ops[0]).shape.clone();
                let oidx = out_index_exprs(&rty.shape);
                let idx: Vec<String> = oidx
                    .iter()
                    .enumerate()
                    .map(|(i, e)| {
                        let scaled = if stride[i] == 1 {
                            e.clone()
                        } else {
                            format!("{e} * {}", stride[i])
                        };
                        if start[i] == 0 {
                            scaled
                        } else {
                            format!("({scaled} + {})", start[i])
                        }
                    })
                    .collect();
                let x = self.input(ops[0], flat_expr(&idx, &sshape));
                self.generic(n, ety, &[x], |_, a| a[0].clone())
            }
            Op::Split { axis, sizes } => {
                let sshape = func.ty(ops[0]).shape.clone();
                let mut off = 0;
                for (k, &r) in data.results.iter().enumerate() {
                    let pshape = func.ty(r).shape.clone();
                    let mut idx = out_index_exprs(&pshape);
                    if off > 0 {
                        idx[*axis] = format!("({} + {off})", idx[*axis]);
                    }
                    let x = self.input(ops[0], flat_expr(&idx, &sshape));
                    let t = self.generic(numel(&pshape), ety, &[x], |_, a| a[0].clone());
                    self.tensors.insert(r, t);
                    off += sizes[k];
                }
                return Ok(());
            }
            Op::OneHot { depth, .. } => {
                let depth = *depth;
                let ity = elem_ty(func.ty(ops[0]).dtype).to_string();
                let x = self.input(ops[0], format!("d0 floordiv {depth}"));
                self.generic(n, ety, &[x], |b, a| {
                    let p = b.op("linalg.index 0 : index");
                    let c = b.remc(&p, depth);
                    let ci = b.index_to(&c, &ity);
                    let hit = b.cmpi("eq", &a[0], &ci, &ity);
                    let one = b.constant(1.0, ety);
                    let zero = b.constant(0.0, ety);
                    b.select(&hit, &one, &zero, ety)
                })
            }
            _ => {
                let r = crate::gather::emit(self, node)?;
                for (k, t) in r.into_iter().enumerate() {
                    self.tensors.insert(data.results[k], t);
                }
                return Ok(());
            }
        };
        self.tensors.insert(data.results[0], result);
        Ok(())
    }
}

impl<'f> Emitter<'f> {
    /// Access for the gather-style ops (`gather.rs`).
    pub(crate) fn parts(&mut self) -> (&'f Function, &HashMap<Value, String>) {
        (self.func, &self.tensors)
    }

    /// Emits a generic with no inputs over `n` elements (gather style).
    pub(crate) fn gen_out(
        &mut self,
        n: usize,
        ety: &str,
        body: impl FnOnce(&mut Body, &[String]) -> String,
    ) -> String {
        self.generic(n, ety, &[], body)
    }

    pub(crate) fn error(&self, op: &Op, ty: &str, reason: impl Into<String>) -> EmitError {
        self.err(op, ty, reason)
    }
}

fn unary(b: &mut Body, u: UnaryOp, x: &str, ty: &str) -> Result<String, String> {
    let float = is_float(ty);
    // Transcendentals in f32.
    let in_f32 = |b: &mut Body, f: &dyn Fn(&mut Body, &str) -> String| -> String {
        if ty == "f32" {
            f(b, x)
        } else {
            let e = if ty == "f64" {
                b.op(format!("arith.truncf {x} : f64 to f32"))
            } else {
                b.op(format!("arith.extf {x} : {ty} to f32"))
            };
            let r = f(b, &e);
            if ty == "f64" {
                b.op(format!("arith.extf {r} : f32 to f64"))
            } else {
                b.op(format!("arith.truncf {r} : f32 to {ty}"))
            }
        }
    };
    Ok(match u {
        UnaryOp::Neg if float => b.un("arith.negf", x, ty),
        UnaryOp::Neg => {
            let z = b.ic(0, ty);
            b.bin("arith.subi", &z, x, ty)
        }
        UnaryOp::Abs if float => b.un("llvm.intr.fabs", x, ty),
        UnaryOp::Abs => {
            let z = b.ic(0, ty);
            let nx = b.bin("arith.subi", &z, x, ty);
            let neg = b.cmpi("slt", x, &z, ty);
            b.select(&neg, &nx, x, ty)
        }
        UnaryOp::Relu if float => {
            // max(x, 0) with NaN propagated.
            let z = b.fc(0.0, ty);
            b.bin("arith.maximumf", x, &z, ty)
        }
        UnaryOp::Relu => {
            let z = b.ic(0, ty);
            b.bin("arith.maxsi", x, &z, ty)
        }
        UnaryOp::Sign if float => {
            let z = b.fc(0.0, ty);
            let one = b.fc(1.0, ty);
            let m1 = b.fc(-1.0, ty);
            let pos = b.cmpf("ogt", x, &z, ty);
            let neg = b.cmpf("olt", x, &z, ty);
            let s = b.select(&neg, &m1, x, ty);
            b.select(&pos, &one, &s, ty)
        }
        UnaryOp::Sign => {
            let z = b.ic(0, ty);
            let one = b.ic(1, ty);
            let m1 = b.ic(-1, ty);
            let pos = b.cmpi("sgt", x, &z, ty);
            let neg = b.cmpi("slt", x, &z, ty);
            let s = b.select(&neg, &m1, &z, ty);
            b.select(&pos, &one, &s, ty)
        }
        UnaryOp::Not => {
            let t = b.ic(1, "i1");
            b.bin("arith.xori", x, &t, "i1")
        }
        _ if !float => return Err(format!("`{}` needs a float type", u.name())),
        UnaryOp::Sqrt => b.un("llvm.intr.sqrt", x, ty),
        UnaryOp::Rsqrt => {
            let s = b.un("llvm.intr.sqrt", x, ty);
            let one = b.fc(1.0, ty);
            b.bin("arith.divf", &one, &s, ty)
        }
        UnaryOp::Reciprocal => {
            let one = b.fc(1.0, ty);
            b.bin("arith.divf", &one, x, ty)
        }
        UnaryOp::Floor => b.un("llvm.intr.floor", x, ty),
        UnaryOp::Round => b.un("llvm.intr.roundeven", x, ty),
        UnaryOp::Exp => in_f32(b, &mathlib::exp),
        UnaryOp::Log => in_f32(b, &mathlib::log),
        UnaryOp::Tanh => in_f32(b, &mathlib::tanh),
        UnaryOp::Erf => in_f32(b, &mathlib::erf),
        UnaryOp::Sin => in_f32(b, &|b, x| mathlib::sin_cos(b, x, false)),
        UnaryOp::Cos => in_f32(b, &|b, x| mathlib::sin_cos(b, x, true)),
        UnaryOp::Sigmoid => in_f32(b, &|b, x| {
            let nx = b.un("arith.negf", x, "f32");
            let e = mathlib::exp(b, &nx);
            let one = b.fc(1.0, "f32");
            let d = b.bin("arith.addf", &one, &e, "f32");
            b.bin("arith.divf", &one, &d, "f32")
        }),
        UnaryOp::Silu => in_f32(b, &|b, x| {
            let nx = b.un("arith.negf", x, "f32");
            let e = mathlib::exp(b, &nx);
            let one = b.fc(1.0, "f32");
            let d = b.bin("arith.addf", &one, &e, "f32");
            b.bin("arith.divf", x, &d, "f32")
        }),
        UnaryOp::Gelu => in_f32(b, &|b, x| {
            let c = b.fc(std::f64::consts::FRAC_1_SQRT_2, "f32");
            let s = b.bin("arith.mulf", x, &c, "f32");
            let e = mathlib::erf(b, &s);
            let one = b.fc(1.0, "f32");
            let h = b.fc(0.5, "f32");
            let t = b.bin("arith.addf", &one, &e, "f32");
            let t = b.bin("arith.mulf", &t, &h, "f32");
            b.bin("arith.mulf", x, &t, "f32")
        }),
        UnaryOp::GeluTanh => in_f32(b, &|b, x| {
            let k = b.fc((2.0 / std::f64::consts::PI).sqrt(), "f32");
            let c = b.fc(0.044715, "f32");
            let x2 = b.bin("arith.mulf", x, x, "f32");
            let x3 = b.bin("arith.mulf", &x2, x, "f32");
            let t = b.bin("arith.mulf", &x3, &c, "f32");
            let t = b.bin("arith.addf", x, &t, "f32");
            let t = b.bin("arith.mulf", &t, &k, "f32");
            let th = mathlib::tanh(b, &t);
            let one = b.fc(1.0, "f32");
            let h = b.fc(0.5, "f32");
            let t = b.bin("arith.addf", &one, &th, "f32");
            let t = b.bin("arith.mulf", &t, &h, "f32");
            b.bin("arith.mulf", x, &t, "f32")
        }),
    })
}

fn binary(b: &mut Body, op: BinaryOp, x: &str, y: &str, ty: &str) -> String {
    let f = is_float(ty);
    let name = match op {
        BinaryOp::Add => ["arith.addf", "arith.addi"],
        BinaryOp::Sub => ["arith.subf", "arith.subi"],
        BinaryOp::Mul => ["arith.mulf", "arith.muli"],
        BinaryOp::Div => ["arith.divf", "arith.divsi"],
        BinaryOp::Max => ["arith.maximumf", "arith.maxsi"],
        BinaryOp::Min => ["arith.minimumf", "arith.minsi"],
        BinaryOp::And => ["arith.andi", "arith.andi"],
        BinaryOp::Or => ["arith.ori", "arith.ori"],
        BinaryOp::Pow => {
            // x^y = 2^(y·log2 x), in f32; x = 0 gives 0 for y > 0, 1 for y = 0.
            let conv_in = |b: &mut Body, v: &str| {
                if ty == "f32" {
                    v.to_string()
                } else if ty == "f64" {
                    b.op(format!("arith.truncf {v} : f64 to f32"))
                } else {
                    b.op(format!("arith.extf {v} : {ty} to f32"))
                }
            };
            let (xf, yf) = (conv_in(b, x), conv_in(b, y));
            let l = mathlib::log(b, &xf);
            let t = b.bin("arith.mulf", &l, &yf, "f32");
            let r = mathlib::exp(b, &t);
            let z = b.fc(0.0, "f32");
            let one = b.fc(1.0, "f32");
            let y0 = b.cmpf("oeq", &yf, &z, "f32");
            let r = b.select(&y0, &one, &r, "f32");
            return if ty == "f32" {
                r
            } else if ty == "f64" {
                b.op(format!("arith.extf {r} : f32 to f64"))
            } else {
                b.op(format!("arith.truncf {r} : f32 to {ty}"))
            };
        }
    };
    b.bin(name[if f { 0 } else { 1 }], x, y, ty)
}

fn compare(b: &mut Body, c: CompareOp, x: &str, y: &str, ty: &str) -> String {
    if is_float(ty) {
        let pred = match c {
            CompareOp::Eq => "oeq",
            CompareOp::Ne => "une",
            CompareOp::Lt => "olt",
            CompareOp::Le => "ole",
            CompareOp::Gt => "ogt",
            CompareOp::Ge => "oge",
        };
        b.cmpf(pred, x, y, ty)
    } else {
        let pred = match c {
            CompareOp::Eq => "eq",
            CompareOp::Ne => "ne",
            CompareOp::Lt => "slt",
            CompareOp::Le => "sle",
            CompareOp::Gt => "sgt",
            CompareOp::Ge => "sge",
        };
        b.cmpi(pred, x, y, ty)
    }
}

pub(crate) fn cast(b: &mut Body, x: &str, from: DType, to: DType) -> String {
    let (fty, tty) = (elem_ty(from), elem_ty(to));
    if from == to {
        return x.to_string();
    }
    match (
        from.is_float(),
        from == DType::Bool,
        to.is_float(),
        to == DType::Bool,
    ) {
        // float → float
        (true, _, true, _) => {
            if to.size_bytes() > from.size_bytes() {
                b.op(format!("arith.extf {x} : {fty} to {tty}"))
            } else if to.size_bytes() < from.size_bytes() {
                b.op(format!("arith.truncf {x} : {fty} to {tty}"))
            } else {
                // f16 ↔ bf16 through f32.
                let e = b.op(format!("arith.extf {x} : {fty} to f32"));
                b.op(format!("arith.truncf {e} : f32 to {tty}"))
            }
        }
        // float → bool: x != 0
        (true, _, _, true) => {
            let z = b.fc(0.0, fty);
            b.cmpf("une", x, &z, fty)
        }
        // float → int: truncate toward zero, saturating, NaN → 0.
        (true, _, _, _) => b.op(format!(
            "llvm.call_intrinsic \"llvm.fptosi.sat.{tty}.{fty}\"({x}) : ({fty}) -> {tty}"
        )),
        // bool → anything
        (_, true, true, _) => b.op(format!("arith.uitofp {x} : i1 to {tty}")),
        (_, true, _, _) => b.op(format!("arith.extui {x} : i1 to {tty}")),
        // int → bool
        (_, _, _, true) => {
            let z = b.ic(0, fty);
            b.cmpi("ne", x, &z, fty)
        }
        // int → float
        (_, _, true, _) => b.op(format!("arith.sitofp {x} : {fty} to {tty}")),
        // int → int
        _ => {
            if to.size_bytes() > from.size_bytes() {
                b.op(format!("arith.extsi {x} : {fty} to {tty}"))
            } else {
                b.op(format!("arith.trunci {x} : {fty} to {tty}"))
            }
        }
    }
}

/// `keep(seed, i) ? x / (1 - rate) : 0` with `cleave_ir::dropout_keep`'s hash written in i64.
fn dropout(b: &mut Body, x: &str, ty: &str, rate: f64, seed: u64) -> String {
    let p = b.op("linalg.index 0 : index");
    let i = b.index_to(&p, "i64");
    let c1 = 0x9E37_79B9_7F4A_7C15u64;
    let s = b.ic(seed.wrapping_mul(c1).wrapping_add(c1) as i64, "i64");
    let mut z = b.bin("arith.addi", &s, &i, "i64");
    for (shift, mul) in [(30, 0xBF58_476D_1CE4_E5B9u64), (27, 0x94D0_49BB_1331_11EB)] {
        let sh = b.ic(shift, "i64");
        let t = b.bin("arith.shrui", &z, &sh, "i64");
        let t = b.bin("arith.xori", &z, &t, "i64");
        let m = b.ic(mul as i64, "i64");
        z = b.bin("arith.muli", &t, &m, "i64");
    }
    let sh = b.ic(31, "i64");
    let t = b.bin("arith.shrui", &z, &sh, "i64");
    z = b.bin("arith.xori", &z, &t, "i64");
    let sh = b.ic(11, "i64");
    let top = b.bin("arith.shrui", &z, &sh, "i64");
    let u = b.op(format!("arith.uitofp {top} : i64 to f64"));
    let denom = b.fc((1u64 << 53) as f64, "f64");
    let u = b.bin("arith.divf", &u, &denom, "f64");
    let r = b.fc(rate, "f64");
    let keep = b.cmpf("oge", &u, &r, "f64");
    let scale = b.fc(1.0 / (1.0 - rate), ty);
    let kept = b.bin("arith.mulf", x, &scale, ty);
    let zero = b.fc(0.0, ty);
    b.select(&keep, &kept, &zero, ty)
}

/// Emits the `func.func` of one kernel group.
pub fn emit_kernel(func: &Function, group: &KernelGroup) -> Result<EmittedKernel, EmitError> {
    let mut e = Emitter {
        func,
        group: group.name.clone(),
        out: String::new(),
        counter: 0,
        tensors: HashMap::new(),
        constants: Vec::new(),
    };
    let mut params = Vec::new();
    let mut pre = String::new();
    for (i, &v) in group.inputs.iter().enumerate() {
        let (m, t) = (memref_ty(func, v), tensor_ty(func, v));
        params.push(format!("%in{i}: {m}"));
        let name = format!("%a{i}");
        let _ = writeln!(
            pre,
            "    {name} = bufferization.to_tensor %in{i} restrict : {m} to {t}"
        );
        e.tensors.insert(v, name);
    }
    for (i, &v) in group.outputs.iter().enumerate() {
        params.push(format!("%out{i}: {}", memref_ty(func, v)));
    }
    for &node in &group.nodes {
        e.node(node)?;
    }
    let mut pre_consts = String::new();
    for (i, &v) in e.constants.iter().enumerate() {
        let (m, t) = (memref_ty(func, v), tensor_ty(func, v));
        params.push(format!("%const{i}: {m}"));
        let _ = writeln!(
            pre_consts,
            "    %c{i} = bufferization.to_tensor %const{i} restrict : {m} to {t}"
        );
    }
    let pre = pre + &pre_consts;
    let mut text = format!(
        "  func.func @{}({}) {{\n{pre}{}",
        group.name,
        params.join(", "),
        e.out
    );
    for (i, &v) in group.outputs.iter().enumerate() {
        let _ = writeln!(
            text,
            "    bufferization.materialize_in_destination {} in restrict writable %out{i} : ({}, {}) -> ()",
            e.tensors[&v],
            tensor_ty(func, v),
            memref_ty(func, v)
        );
    }
    text.push_str("    return\n  }\n");
    Ok(EmittedKernel {
        group: group.clone(),
        constants: e.constants,
        func: text,
    })
}

/// Partitions `func` and emits every kernel group.
pub fn emit_function(func: &Function) -> Result<Vec<EmittedKernel>, EmitError> {
    crate::partition::partition(func)
        .iter()
        .map(|g| emit_kernel(func, g))
        .collect()
}

/// Whether an op's reduction variant is supported for `dtype` (mean needs a float type).
pub(crate) fn reduce_init(kind: ReduceKind, ty: &str) -> f64 {
    match kind {
        ReduceKind::Sum | ReduceKind::Mean => 0.0,
        ReduceKind::Max => {
            if is_float(ty) {
                f64::NEG_INFINITY
            } else if ty == "i32" {
                i32::MIN as f64
            } else {
                i64::MIN as f64
            }
        }
        ReduceKind::Min => {
            if is_float(ty) {
                f64::INFINITY
            } else if ty == "i32" {
                i32::MAX as f64
            } else {
                i64::MAX as f64
            }
        }
    }
}
