//! Gradient checks: every differentiable op's VJP (the `autodiff` pass) and JVP (the `jvp` pass)
//! against central finite differences, everything evaluated by the interpreter in
//! [`Precision::F64`] (no rounding to the declared dtypes).
//!
//! # The harness
//!
//! A [`Case`] is a tiny forward function built with the tracer. Its float arguments (inputs and
//! parameters) get random values from a fixed-seed SplitMix64 ([`Init`] chooses the distribution,
//! e.g. positive values for `log`, well separated values for `max`); integer and bool arguments
//! (labels, indices, conditions) are fixed by the case.
//!
//! - **VJP.** The loss is `L = Σₒ reduce_sum(yₒ · Rₒ)` over the forward outputs `yₒ`, with `Rₒ` a
//!   random constant (so the cotangent of every output is random, not all-ones). The loss function
//!   goes through `autodiff` in loss mode with `wrt` = every float data input (parameters are
//!   always differentiated); every element of every `grad.<arg>` is compared with the finite
//!   difference of `L` along that element.
//! - **JVP.** The forward function (without the loss) goes through `jvp`; with random tangents `v`
//!   for every float argument, every element of every `tangent.<output>` is compared with the
//!   finite-difference directional derivative of the output along `v`. The two modes are also
//!   checked against each other: `⟨grad, v⟩ = ⟨R, tangent⟩` (both exact up to rounding).
//!
//! # Finite differences
//!
//! Central differences, Richardson-extrapolated: with `D(h) = (f(x+h) − f(x−h)) / 2h`, the
//! reference is `(4·D(h) − D(2h)) / 3`, whose truncation error is `O(h⁴)` instead of `O(h²)`. That
//! allows a step `h = 1e-3` (scaled by `max(1, |x|)` for the per-element VJP check; the JVP
//! tangents are `O(1)`) where rounding noise in `f` is only `~1e-13·|f|`, so the reference is
//! accurate to ~1e-10 relative. Inputs are kept at least `4h` away from every kink (see [`Init`]).
//!
//! # Tolerance
//!
//! For an analytic tensor `a` and its finite-difference reference `b`, the error of element `i`
//! is `|aᵢ − bᵢ| / max(|aᵢ|, |bᵢ|, FLOOR · maxⱼ|bⱼ|)` with [`FLOOR`] = 1e-8: an elementwise
//! relative error (the floor only keeps elements eight orders of magnitude below the tensor's
//! largest from dividing by ~0). Elements equal on both sides (in particular exact zeros: dropped,
//! padded, unused, non-maximal positions) count as error 0. Every element of every gradient and
//! tangent must satisfy error ≤ [`TOL`] = 1e-6; the worst observed is about 5e-9 (run with
//! `--nocapture` to see every tensor's worst element). A reference that is all zeros is a
//! failure (the check would be vacuous). The adjoint identity `⟨R, J·v⟩ = ⟨Jᵀ·R, v⟩` must hold to
//! 1e-12 relative to `Σ|terms|`.

use std::collections::{BTreeMap, BTreeSet};

use cleave_ir::tracer::{TraceError, Tracer};
use cleave_ir::{
    run_function_named, verify_function, ArgRole, BinaryOp, DType, Function, Literal, Op, Phase,
    Precision, SteOp, Tensor, TensorType, UnaryOp, Value,
};
use cleave_passes::autodiff::{differentiate, Mode};
use cleave_passes::jvp::linearize;

type Res<T> = Result<T, TraceError>;

/// Largest accepted error (see the module docs for the definition).
const TOL: f64 = 1e-6;
/// Relative floor of the error's denominator, as a fraction of the reference's max-abs.
const FLOOR: f64 = 1e-8;
/// Finite-difference step (relative to `max(1, |x|)` for the VJP check).
const H: f64 = 1e-3;

// ----- random numbers -----

/// SplitMix64.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    fn vec(&mut self, n: usize, init: Init) -> Vec<f64> {
        match init {
            Init::Uniform(lo, hi) => (0..n).map(|_| self.uniform(lo, hi)).collect(),
            Init::AwayFromZero(lo, hi) => (0..n)
                .map(|_| {
                    let m = self.uniform(lo, hi);
                    if self.next_u64() & 1 == 0 {
                        m
                    } else {
                        -m
                    }
                })
                .collect(),
            Init::Grid(offset) => {
                let mut perm: Vec<usize> = (0..n).collect();
                for i in (1..n).rev() {
                    perm.swap(i, self.below(i + 1));
                }
                perm.into_iter()
                    .map(|k| offset + 0.1 * (k as f64 - n as f64 / 2.0))
                    .collect()
            }
        }
    }
}

/// How a float argument is filled.
#[derive(Clone, Copy, Debug)]
enum Init {
    /// Uniform in `[lo, hi)`.
    Uniform(f64, f64),
    /// A random sign times a magnitude uniform in `[lo, hi)` (away from a kink at 0).
    AwayFromZero(f64, f64),
    /// A random permutation of `offset + 0.1·k`, centred on 0: the elements are 0.1 apart (no
    /// ties or near-ties for `max`/`min`), and 0.05 away from every element of a grid whose
    /// offset differs by 0.05.
    Grid(f64),
}

// ----- cases -----

/// What a mode is expected to do with a case.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    /// Agree with finite differences.
    Check,
    /// Fail with an error containing this text (a documented limitation).
    Fails(&'static str),
}

type Build = Box<dyn Fn(&mut Tracer) -> Res<()>>;

struct Case {
    name: String,
    /// The ops this case is about (each must appear in the built function).
    ops: Vec<&'static str>,
    build: Build,
    default_init: Init,
    inits: Vec<(&'static str, Init)>,
    fixed: Vec<(&'static str, Tensor)>,
    vjp: Expect,
    jvp: Expect,
    /// Some gradient must have both exact zeros and non-zeros (a kink or mask is exercised on
    /// both sides).
    mixed: bool,
}

fn case(
    name: impl Into<String>,
    ops: &[&'static str],
    build: impl Fn(&mut Tracer) -> Res<()> + 'static,
) -> Case {
    Case {
        name: name.into(),
        ops: ops.to_vec(),
        build: Box::new(build),
        default_init: Init::Uniform(-1.0, 1.0),
        inits: Vec::new(),
        fixed: Vec::new(),
        vjp: Expect::Check,
        jvp: Expect::Check,
        mixed: false,
    }
}

impl Case {
    fn all(mut self, init: Init) -> Self {
        self.default_init = init;
        self
    }

    fn init(mut self, arg: &'static str, init: Init) -> Self {
        self.inits.push((arg, init));
        self
    }

    fn fixed(mut self, arg: &'static str, value: Tensor) -> Self {
        self.fixed.push((arg, value));
        self
    }

    fn mixed(mut self) -> Self {
        self.mixed = true;
        self
    }

    fn vjp_fails(mut self, msg: &'static str) -> Self {
        self.vjp = Expect::Fails(msg);
        self
    }

    fn jvp_fails(mut self, msg: &'static str) -> Self {
        self.jvp = Expect::Fails(msg);
        self
    }

    fn forward(&self) -> Function {
        let mut t = Tracer::new(self.name.replace(|c: char| !c.is_alphanumeric(), "_"));
        (self.build)(&mut t).unwrap_or_else(|e| panic!("{}: building: {e}", self.name));
        let f = t.finish();
        if let Err(errors) = verify_function(&f) {
            panic!(
                "{}: forward function does not verify: {errors:?}",
                self.name
            );
        }
        f
    }
}

const F64: DType = DType::F64;

fn ints(shape: &[usize], data: &[i64]) -> Tensor {
    Tensor::from_i64(DType::I64, shape.to_vec(), data.to_vec())
}

fn ints32(shape: &[usize], data: &[i64]) -> Tensor {
    Tensor::from_i64(DType::I32, shape.to_vec(), data.to_vec())
}

fn out(t: &mut Tracer, v: Value) -> Res<()> {
    t.output("y", v)
}

fn elementwise_cases() -> Vec<Case> {
    use UnaryOp as U;
    let mut cases = Vec::new();
    let unary = [
        (U::Neg, Init::Uniform(-1.0, 1.0)),
        (U::Abs, Init::AwayFromZero(0.2, 1.5)),
        (U::Exp, Init::Uniform(-1.5, 1.5)),
        (U::Log, Init::Uniform(0.3, 2.0)),
        (U::Sqrt, Init::Uniform(0.3, 2.0)),
        (U::Rsqrt, Init::Uniform(0.3, 2.0)),
        (U::Tanh, Init::Uniform(-2.0, 2.0)),
        (U::Sigmoid, Init::Uniform(-3.0, 3.0)),
        (U::Relu, Init::AwayFromZero(0.2, 1.5)),
        (U::Gelu, Init::Uniform(-3.0, 3.0)),
        (U::GeluTanh, Init::Uniform(-3.0, 3.0)),
        (U::Silu, Init::Uniform(-3.0, 3.0)),
        (U::Sin, Init::Uniform(-3.0, 3.0)),
        (U::Cos, Init::Uniform(-3.0, 3.0)),
        (U::Erf, Init::Uniform(-2.0, 2.0)),
        (U::Reciprocal, Init::AwayFromZero(0.3, 2.0)),
    ];
    for (u, init) in unary {
        cases.push(
            case(u.name(), &[u.name()], move |t| {
                let x = t.input("x", F64, [2, 4])?;
                let y = t.unary(u, x)?;
                out(t, y)
            })
            .all(init),
        );
    }
    // relu and dropout must see both branches.
    for c in cases.iter_mut().filter(|c| c.name == "relu") {
        c.mixed = true;
    }
    let binary = [
        (
            BinaryOp::Add,
            Init::Uniform(-1.0, 1.0),
            Init::Uniform(-1.0, 1.0),
        ),
        (
            BinaryOp::Sub,
            Init::Uniform(-1.0, 1.0),
            Init::Uniform(-1.0, 1.0),
        ),
        (
            BinaryOp::Mul,
            Init::Uniform(-1.0, 1.0),
            Init::Uniform(-1.0, 1.0),
        ),
        (
            BinaryOp::Div,
            Init::Uniform(-1.0, 1.0),
            Init::AwayFromZero(0.5, 1.5),
        ),
        (BinaryOp::Max, Init::Grid(0.0), Init::Grid(0.05)),
        (BinaryOp::Min, Init::Grid(0.0), Init::Grid(0.05)),
        (
            BinaryOp::Pow,
            Init::Uniform(0.5, 2.0),
            Init::Uniform(-1.5, 1.5),
        ),
    ];
    for (b, ia, ib) in binary {
        // `a` is a data input (dgrad), `b` a parameter (wgrad).
        cases.push(
            case(b.name(), &[b.name()], move |t| {
                let a = t.input("a", F64, [2, 3])?;
                let w = t.param("b", F64, [2, 3])?;
                let y = t.binary(b, a, w)?;
                out(t, y)
            })
            .init("a", ia)
            .init("b", ib),
        );
    }
    // Both operands the same value: the two contributions accumulate.
    cases.push(case("mul_same_operand", &["mul"], |t| {
        let x = t.input("x", F64, [3])?;
        let y = t.mul(x, x)?;
        out(t, y)
    }));
    cases.push(
        case("div_same_operand_pow", &["div", "pow"], |t| {
            let x = t.input("x", F64, [4])?;
            let p = t.pow(x, x)?;
            let y = t.div(p, x)?;
            out(t, y)
        })
        .all(Init::Uniform(0.5, 2.0)),
    );
    // A zero base: `∂y/∂b = y·ln a` is 0·(−∞) there, which the rule maps to 0 (as does the
    // finite difference: 0^b = 0 for every b > 0).
    cases.push(
        case("pow_zero_base", &["pow"], |t| {
            let a = t.constant(
                TensorType::new(F64, vec![4]),
                Literal::Float(vec![0.0, 0.5, 0.0, 1.5]),
            )?;
            let b = t.param("b", F64, [4])?;
            let y = t.pow(a, b)?;
            out(t, y)
        })
        .all(Init::Uniform(1.5, 2.5))
        .mixed(),
    );
    cases.push(
        case("select", &["select"], |t| {
            let c = t.input("c", DType::Bool, [2, 3])?;
            let a = t.input("a", F64, [2, 3])?;
            let b = t.param("b", F64, [2, 3])?;
            let y = t.select(c, a, b)?;
            out(t, y)
        })
        .mixed()
        .fixed(
            "c",
            Tensor::from_bool([2, 3], vec![true, false, false, true, true, false]),
        ),
    );
    // `select` on a computed condition (the comparison cuts the flow into the condition).
    cases.push(
        case("select_computed_condition", &["select"], |t| {
            let a = t.input("a", F64, [5])?;
            let b = t.input("b", F64, [5])?;
            let c = t.compare(cleave_ir::CompareOp::Gt, a, b)?;
            let y = t.select(c, a, b)?;
            out(t, y)
        })
        .init("a", Init::Grid(0.0))
        .init("b", Init::Grid(0.05)),
    );
    cases.push(case("cast_f32_to_f64", &["cast"], |t| {
        let x = t.input("x", DType::F32, [2, 3])?;
        let c = t.cast(x, F64)?;
        let y = t.tanh(c)?;
        out(t, y)
    }));
    cases.push(case("cast_f64_to_f32", &["cast"], |t| {
        let x = t.param("x", F64, [3])?;
        let y = t.cast(x, DType::F32)?;
        out(t, y)
    }));
    cases.push(
        case("dropout", &["dropout"], |t| {
            let x = t.input("x", F64, [4, 5])?;
            let y = t.dropout(x, 0.4, 7)?;
            out(t, y)
        })
        .mixed(),
    );
    cases
}

fn shape_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    // Broadcasting.
    cases.push(case(
        "broadcast_size1_expansion",
        &["broadcast", "add"],
        |t| {
            let a = t.input("a", F64, [2, 3])?;
            let b = t.param("b", F64, [2, 1])?;
            let bb = t.broadcast(b, [2, 3], [0, 1])?;
            let y = t.add(a, bb)?;
            out(t, y)
        },
    ));
    cases.push(case("broadcast_rank0", &["broadcast", "mul"], |t| {
        let a = t.input("a", F64, [2, 3])?;
        let s = t.param("s", F64, [])?;
        let sb = t.broadcast(s, [2, 3], [])?;
        let y = t.mul(a, sb)?;
        out(t, y)
    }));
    cases.push(case("broadcast_new_dims", &["broadcast"], |t| {
        let a = t.input("a", F64, [2, 3, 4])?;
        let b = t.param("b", F64, [3])?;
        let bb = t.broadcast(b, [2, 3, 4], [1])?;
        let y = t.mul(a, bb)?;
        out(t, y)
    }));
    cases.push(case("broadcast_size1_and_new_dim", &["broadcast"], |t| {
        let x = t.input("x", F64, [1, 3])?;
        let y = t.broadcast(x, [2, 4, 3], [0, 2])?;
        out(t, y)
    }));
    cases.push(case("broadcast_all_size1", &["broadcast"], |t| {
        let x = t.input("x", F64, [1, 1])?;
        let y = t.broadcast(x, [3, 2], [0, 1])?;
        out(t, y)
    }));
    cases.push(case(
        "broadcast_numpy_both_sides",
        &["broadcast", "sub"],
        |t| {
            let a = t.input("a", F64, [2, 1, 3])?;
            let b = t.input("b", F64, [4, 1])?;
            let y = t.binary_bcast(BinaryOp::Sub, a, b)?;
            out(t, y)
        },
    ));
    // Reductions: some axes and all axes.
    let reductions: [(&str, cleave_ir::ReduceKind, &[usize]); 10] = [
        ("reduce_sum", cleave_ir::ReduceKind::Sum, &[1]),
        ("reduce_sum", cleave_ir::ReduceKind::Sum, &[0, 2]),
        ("reduce_sum", cleave_ir::ReduceKind::Sum, &[0, 1, 2]),
        ("reduce_mean", cleave_ir::ReduceKind::Mean, &[2]),
        ("reduce_mean", cleave_ir::ReduceKind::Mean, &[0, 1, 2]),
        ("reduce_max", cleave_ir::ReduceKind::Max, &[1]),
        ("reduce_max", cleave_ir::ReduceKind::Max, &[0, 1, 2]),
        ("reduce_min", cleave_ir::ReduceKind::Min, &[0, 2]),
        ("reduce_min", cleave_ir::ReduceKind::Min, &[0, 1, 2]),
        ("reduce_mean", cleave_ir::ReduceKind::Mean, &[0, 1]),
    ];
    for (name, kind, axes) in reductions {
        let mut c = case(format!("{name}_{axes:?}"), &[name], move |t| {
            let x = t.input("x", F64, [2, 3, 4])?;
            let y = t.reduce(kind, x, axes.to_vec())?;
            out(t, y)
        })
        .all(Init::Grid(0.0));
        c.mixed = matches!(
            kind,
            cleave_ir::ReduceKind::Max | cleave_ir::ReduceKind::Min
        );
        cases.push(c);
    }
    cases.push(case("reduce_sum_no_axes", &["reduce_sum"], |t| {
        let x = t.input("x", F64, [2, 3])?;
        let y = t.reduce_sum(x, Vec::new())?;
        out(t, y)
    }));
    cases.push(case("reshape", &["reshape"], |t| {
        let x = t.input("x", F64, [2, 3, 4])?;
        let y = t.reshape(x, [4, 6])?;
        out(t, y)
    }));
    cases.push(case("reshape_to_scalar", &["reshape"], |t| {
        let x = t.input("x", F64, [1, 1])?;
        let y = t.reshape(x, [])?;
        out(t, y)
    }));
    cases.push(case("transpose_3d", &["transpose"], |t| {
        let x = t.input("x", F64, [2, 3, 4])?;
        let y = t.transpose(x, [2, 0, 1])?;
        out(t, y)
    }));
    cases.push(case("transpose_2d", &["transpose"], |t| {
        let x = t.param("x", F64, [2, 3])?;
        let y = t.transpose(x, [1, 0])?;
        out(t, y)
    }));
    cases.push(case("slice_unit_stride", &["slice"], |t| {
        let x = t.input("x", F64, [4, 5])?;
        let y = t.slice(x, [1, 0], [3, 4], [1, 1])?;
        out(t, y)
    }));
    cases.push(case("slice_stride_2_3_offset", &["slice"], |t| {
        let x = t.input("x", F64, [6, 8])?;
        let y = t.slice(x, [1, 2], [6, 8], [2, 3])?;
        out(t, y)
    }));
    cases.push(case("slice_3d_strides_partial", &["slice"], |t| {
        let x = t.input("x", F64, [3, 5, 7])?;
        let y = t.slice(x, [0, 1, 1], [3, 5, 6], [2, 1, 3])?;
        out(t, y)
    }));
    cases.push(case("concat_3_axis1", &["concat"], |t| {
        let a = t.input("a", F64, [2, 1])?;
        let b = t.param("b", F64, [2, 3])?;
        let c = t.input("c", F64, [2, 2])?;
        let y = t.concat(&[a, b, c], 1)?;
        out(t, y)
    }));
    cases.push(case("concat_3_axis0_repeated", &["concat"], |t| {
        let a = t.input("a", F64, [1, 3])?;
        let b = t.input("b", F64, [2, 3])?;
        let y = t.concat(&[a, b, a], 0)?;
        out(t, y)
    }));
    cases.push(
        case("split_unused_piece", &["split"], |t| {
            let x = t.input("x", F64, [2, 7])?;
            let p = t.split(x, 1, [2, 3, 2])?;
            t.output("y0", p[0])?;
            t.output("y2", p[2])
        })
        .mixed(),
    );
    cases.push(case("concat_with_constant", &["concat"], |t| {
        let a = t.input("a", F64, [2, 2])?;
        let k = t.constant_f(F64, [2, 1], 0.25)?;
        let y = t.concat(&[k, a, k], 1)?;
        out(t, y)
    }));
    cases.push(case("split_piece_used_twice", &["split"], |t| {
        let x = t.input("x", F64, [5, 2])?;
        let p = t.split(x, 0, [2, 3])?;
        let q = t.mul(p[0], p[0])?;
        t.output("q", q)?;
        t.output("p1", p[1])?;
        t.output("p0", p[0])
    }));
    cases.push(case("pad", &["pad"], |t| {
        let x = t.input("x", F64, [2, 3])?;
        let y = t.pad(x, [1, 0], [2, 3], 0.5)?;
        out(t, y)
    }));
    cases.push(case("pad_3d", &["pad"], |t| {
        let x = t.param("x", F64, [2, 2, 3])?;
        let y = t.pad(x, [0, 2, 1], [1, 0, 1], 0.0)?;
        out(t, y)
    }));
    cases
}

fn linalg_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    // Y[2,4] = op(A)·op(B) with M = 2, K = 3, N = 4.
    for (tl, tr) in [(false, false), (false, true), (true, false), (true, true)] {
        cases.push(case(
            format!("matmul_tl{tl}_tr{tr}"),
            &["matmul"],
            move |t| {
                let a_shape = if tl { [3, 2] } else { [2, 3] };
                let b_shape = if tr { [4, 3] } else { [3, 4] };
                let a = t.input("a", F64, a_shape)?;
                let b = t.param("b", F64, b_shape)?;
                let y = t.matmul_t(a, b, tl, tr)?;
                out(t, y)
            },
        ));
    }
    cases.push(case("matmul_batched", &["matmul"], |t| {
        let a = t.input("a", F64, [2, 2, 3])?;
        let b = t.input("b", F64, [2, 3, 4])?;
        let y = t.matmul(a, b)?;
        out(t, y)
    }));
    cases.push(case("matmul_batched_transposed", &["matmul"], |t| {
        let a = t.input("a", F64, [2, 3, 2])?;
        let b = t.param("b", F64, [2, 4, 3])?;
        let y = t.matmul_t(a, b, true, true)?;
        out(t, y)
    }));
    // conv2d: (name, x shape, w shape, stride, padding, dilation, groups).
    type Conv = (
        &'static str,
        [usize; 4],
        [usize; 4],
        [usize; 2],
        [usize; 4],
        [usize; 2],
        usize,
    );
    let convs: [Conv; 6] = [
        (
            "conv2d_basic",
            [2, 2, 4, 4],
            [3, 2, 3, 3],
            [1, 1],
            [0; 4],
            [1, 1],
            1,
        ),
        (
            "conv2d_stride2",
            [1, 2, 6, 5],
            [2, 2, 3, 3],
            [2, 2],
            [0; 4],
            [1, 1],
            1,
        ),
        (
            "conv2d_pad_asym",
            [1, 2, 4, 5],
            [2, 2, 3, 2],
            [1, 2],
            [1, 0, 2, 1],
            [1, 1],
            1,
        ),
        (
            "conv2d_dilation2",
            [1, 1, 6, 6],
            [2, 1, 2, 2],
            [1, 1],
            [1, 1, 1, 1],
            [2, 2],
            1,
        ),
        (
            "conv2d_groups2",
            [1, 4, 4, 4],
            [4, 2, 2, 3],
            [1, 1],
            [0; 4],
            [1, 1],
            2,
        ),
        (
            "conv2d_all",
            [2, 4, 7, 6],
            [2, 2, 2, 3],
            [2, 1],
            [1, 2, 0, 1],
            [2, 1],
            2,
        ),
    ];
    for (name, xs, ws, stride, padding, dilation, groups) in convs {
        cases.push(case(name, &["conv2d"], move |t| {
            let x = t.input("x", F64, xs)?;
            let w = t.param("w", F64, ws)?;
            let y = t.conv2d(x, w, stride, padding, dilation, groups)?;
            out(t, y)
        }));
    }
    cases.push(
        case("max_pool2d_tiles", &["max_pool2d"], |t| {
            let x = t.input("x", F64, [1, 2, 4, 6])?;
            let y = t.max_pool2d(x, [2, 3], [2, 3], [0; 4])?;
            out(t, y)
        })
        .all(Init::Grid(0.0))
        .mixed(),
    );
    cases.push(
        case("max_pool2d_overlap_padded", &["max_pool2d"], |t| {
            let x = t.input("x", F64, [1, 2, 5, 5])?;
            let y = t.max_pool2d(x, [3, 3], [2, 2], [1, 1, 1, 0])?;
            out(t, y)
        })
        .all(Init::Grid(0.0))
        .mixed()
        .jvp_fails("non-overlapping windows"),
    );
    for include in [true, false] {
        cases.push(case(
            format!("avg_pool2d_padded_include{include}"),
            &["avg_pool2d"],
            move |t| {
                let x = t.input("x", F64, [1, 2, 4, 5])?;
                let y = t.avg_pool2d(x, [2, 3], [1, 2], [1, 1, 0, 1], include)?;
                out(t, y)
            },
        ));
    }
    cases.push(case("avg_pool2d_tiles", &["avg_pool2d"], |t| {
        let x = t.param("x", F64, [2, 1, 4, 4])?;
        let y = t.avg_pool2d(x, [2, 2], [2, 2], [0; 4], false)?;
        out(t, y)
    }));
    cases
}

fn index_and_nn_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    cases.push(
        case("gather_axis0_repeated", &["gather"], |t| {
            let table = t.param("table", F64, [4, 3])?;
            let idx = t.input("idx", DType::I64, [5])?;
            let y = t.gather(table, idx, 0)?;
            out(t, y)
        })
        .fixed("idx", ints(&[5], &[3, 1, 3, 0, 3])),
    );
    cases.push(
        case("gather_axis1_2d_index", &["gather"], |t| {
            let table = t.input("table", F64, [2, 4, 3])?;
            let idx = t.input("idx", DType::I32, [2, 2])?;
            let y = t.gather(table, idx, 1)?;
            out(t, y)
        })
        .fixed("idx", ints32(&[2, 2], &[1, 1, 3, 0])),
    );
    cases.push(
        case("scatter_add_repeated", &["scatter_add"], |t| {
            let base = t.input("base", F64, [4, 3])?;
            let idx = t.input("idx", DType::I64, [4])?;
            let upd = t.param("upd", F64, [4, 3])?;
            let y = t.scatter_add(base, idx, upd, 0)?;
            out(t, y)
        })
        .fixed("idx", ints(&[4], &[0, 2, 0, 0])),
    );
    cases.push(
        case("scatter_add_constant_base", &["scatter_add"], |t| {
            let base = t.constant_f(F64, [3, 2], 1.0)?;
            let idx = t.input("idx", DType::I64, [2])?;
            let upd = t.input("upd", F64, [2, 2])?;
            let y = t.scatter_add(base, idx, upd, 0)?;
            out(t, y)
        })
        .fixed("idx", ints(&[2], &[2, 2])),
    );
    cases.push(
        case("gather_scalar_index", &["gather"], |t| {
            let table = t.input("table", F64, [3, 4])?;
            let idx = t.input("idx", DType::I64, [])?;
            let y = t.gather(table, idx, 1)?;
            out(t, y)
        })
        .fixed("idx", ints(&[], &[2])),
    );
    cases.push(
        case("scatter_add_axis1", &["scatter_add"], |t| {
            let base = t.param("base", F64, [2, 5])?;
            let idx = t.input("idx", DType::I32, [3])?;
            let upd = t.input("upd", F64, [2, 3])?;
            let y = t.scatter_add(base, idx, upd, 1)?;
            out(t, y)
        })
        .fixed("idx", ints32(&[3], &[4, 1, 4])),
    );
    cases.push(
        case("softmax_middle_axis", &["softmax"], |t| {
            let x = t.input("x", F64, [2, 4, 3])?;
            let y = t.softmax(x, 1)?;
            out(t, y)
        })
        .all(Init::Uniform(-2.0, 2.0)),
    );
    cases.push(case("softmax_last_axis", &["softmax"], |t| {
        let x = t.input("x", F64, [3, 4])?;
        let y = t.softmax(x, 1)?;
        out(t, y)
    }));
    cases.push(
        case("log_softmax_middle_axis", &["log_softmax"], |t| {
            let x = t.input("x", F64, [2, 4, 3])?;
            let y = t.log_softmax(x, 1)?;
            out(t, y)
        })
        .all(Init::Uniform(-2.0, 2.0)),
    );
    cases.push(case("log_softmax_first_axis", &["log_softmax"], |t| {
        let x = t.input("x", F64, [3, 2])?;
        let y = t.log_softmax(x, 0)?;
        out(t, y)
    }));
    cases.push(case("layer_norm", &["layer_norm"], |t| {
        let x = t.input("x", F64, [3, 5])?;
        let y = t.layer_norm(x, 1e-5)?;
        out(t, y)
    }));
    cases.push(case("layer_norm_3d_large_eps", &["layer_norm"], |t| {
        let x = t.input("x", F64, [2, 2, 4])?;
        let y = t.layer_norm(x, 0.5)?;
        out(t, y)
    }));
    cases.push(case("layer_norm_rank1", &["layer_norm"], |t| {
        let x = t.input("x", F64, [5])?;
        let y = t.layer_norm(x, 1e-5)?;
        out(t, y)
    }));
    cases.push(case("rms_norm_rank1", &["rms_norm"], |t| {
        let x = t.input("x", F64, [4])?;
        let y = t.rms_norm(x, 1e-5)?;
        out(t, y)
    }));
    cases.push(case("rms_norm", &["rms_norm"], |t| {
        let x = t.input("x", F64, [3, 5])?;
        let y = t.rms_norm(x, 1e-5)?;
        out(t, y)
    }));
    cases.push(case("rms_norm_3d_large_eps", &["rms_norm"], |t| {
        let x = t.param("x", F64, [2, 2, 4])?;
        let y = t.rms_norm(x, 0.5)?;
        out(t, y)
    }));
    cases.push(
        case("cross_entropy", &["cross_entropy"], |t| {
            let z = t.input("z", F64, [3, 5])?;
            let l = t.input("labels", DType::I64, [3])?;
            let y = t.cross_entropy(z, l)?;
            out(t, y)
        })
        .all(Init::Uniform(-2.0, 2.0))
        .fixed("labels", ints(&[3], &[4, 0, 2])),
    );
    cases.push(
        case("cross_entropy_3d_mean", &["cross_entropy"], |t| {
            let z = t.input("z", F64, [2, 2, 4])?;
            let l = t.input("labels", DType::I32, [2, 2])?;
            let ce = t.cross_entropy(z, l)?;
            let y = t.mean_all(ce)?;
            out(t, y)
        })
        .fixed("labels", ints32(&[2, 2], &[3, 3, 0, 1])),
    );
    cases.push(
        case("cross_entropy_unbatched", &["cross_entropy"], |t| {
            let z = t.input("z", F64, [4])?;
            let l = t.input("labels", DType::I64, [])?;
            let y = t.cross_entropy(z, l)?;
            out(t, y)
        })
        .fixed("labels", ints(&[], &[1])),
    );
    // A two-layer MLP: many rules composed, parameters and input gradients together.
    cases.push(case("mlp2", &["matmul", "broadcast", "tanh"], |t| {
        let x = t.input("x", F64, [4, 3])?;
        let h = t.linear(x, 3, 5, true, "fc1")?;
        let h = t.tanh(h)?;
        let y = t.linear(h, 5, 2, true, "fc2")?;
        out(t, y)
    }));
    cases
}

/// The gradient ops: JVP only (their VJP, second-order differentiation, is documented as
/// unsupported, and checked to say so).
fn gradient_op_cases() -> Vec<Case> {
    const SECOND_ORDER: &str = "second-order differentiation";
    // The forward conv: x [1,2,5,4], w [2,1,2,2], stride 2, padding [1,0,0,1], groups 2
    // -> y [1,2,3,2].
    let (stride, padding, dilation, groups) = ([2, 2], [1, 0, 0, 1], [1, 1], 2);
    vec![
        case("conv2d_grad_input", &["conv2d_grad_input"], move |t| {
            let dy = t.input("dy", F64, [1, 2, 3, 2])?;
            let w = t.param("w", F64, [2, 1, 2, 2])?;
            let op = Op::Conv2dGradInput {
                stride,
                padding,
                dilation,
                groups,
                shape: vec![1, 2, 5, 4],
            };
            let y = t.push_op(op, &[dy, w])?[0];
            out(t, y)
        })
        .vjp_fails(SECOND_ORDER),
        case("conv2d_grad_weight", &["conv2d_grad_weight"], move |t| {
            let x = t.input("x", F64, [1, 2, 5, 4])?;
            let dy = t.input("dy", F64, [1, 2, 3, 2])?;
            let op = Op::Conv2dGradWeight {
                stride,
                padding,
                dilation,
                groups,
                shape: vec![2, 1, 2, 2],
            };
            let y = t.push_op(op, &[x, dy])?[0];
            out(t, y)
        })
        .vjp_fails(SECOND_ORDER),
        case("max_pool2d_grad", &["max_pool2d_grad"], |t| {
            let x = t.input("x", F64, [1, 2, 5, 5])?;
            let dy = t.input("dy", F64, [1, 2, 3, 3])?;
            let op = Op::MaxPool2dGrad {
                window: [3, 3],
                stride: [2, 2],
                padding: [1, 1, 1, 1],
            };
            let y = t.push_op(op, &[x, dy])?[0];
            out(t, y)
        })
        .init("x", Init::Grid(0.0))
        .vjp_fails(SECOND_ORDER),
        case("avg_pool2d_grad", &["avg_pool2d_grad"], |t| {
            let dy = t.input("dy", F64, [1, 2, 3, 3])?;
            let op = Op::AvgPool2dGrad {
                window: [2, 2],
                stride: [2, 2],
                padding: [1, 1, 1, 1],
                count_include_pad: false,
                shape: vec![1, 2, 4, 4],
            };
            let y = t.push_op(op, &[dy])?[0];
            out(t, y)
        })
        .vjp_fails(SECOND_ORDER),
    ]
}

fn all_cases() -> Vec<Case> {
    let mut all = elementwise_cases();
    all.extend(shape_cases());
    all.extend(linalg_cases());
    all.extend(index_and_nn_cases());
    all.extend(gradient_op_cases());
    all
}

/// Ops without a derivative to check: arguments and constants, comparisons and boolean ops,
/// piecewise-constant ops, and ops that cut the gradient flow by definition.
const NON_DIFFERENTIABLE: &[&str] = &[
    "input",
    "param",
    "constant",
    "iota",
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "and",
    "or",
    "not",
    "sign",
    "floor",
    "round",
    "one_hot",
    "stop_gradient",
];

/// Ops whose gradient is deliberately not their derivative (straight-through estimators,
/// gradient reversal): finite differences would contradict them by design. They are checked
/// against their specified VJP and JVP exactly by `custom_gradient_ops_are_exact`, which builds
/// every op of this list.
const CUSTOM_GRADIENT: &[&str] = &[
    "ste_round",
    "ste_sign",
    "ste_argmax_one_hot",
    "grad_reverse",
];

/// Gradient ops: the VJP (second-order differentiation) is documented as unsupported.
const VJP_UNSUPPORTED: &[&str] = &[
    "conv2d_grad_input",
    "conv2d_grad_weight",
    "max_pool2d_grad",
    "avg_pool2d_grad",
];

// ----- the harness -----

type Args = BTreeMap<String, Tensor>;

fn run(f: &Function, args: &Args) -> Vec<Tensor> {
    run_function_named(f, args.iter(), Precision::F64)
        .unwrap_or_else(|e| panic!("@{}: interpreter: {e}", f.name))
}

fn output(f: &Function, results: &[Tensor], name: &str) -> Vec<f64> {
    let i = f
        .outputs
        .iter()
        .position(|o| o.name == name)
        .unwrap_or_else(|| panic!("@{}: no output `{name}`", f.name));
    results[i].to_f64_vec()
}

/// The float arguments' names, in argument order.
fn float_args(f: &Function) -> Vec<String> {
    f.args()
        .filter(|a| a.ty.dtype.is_float())
        .map(|a| a.name.to_string())
        .collect()
}

fn float_outputs(f: &Function) -> Vec<String> {
    f.outputs
        .iter()
        .filter(|o| f.ty(o.value).dtype.is_float())
        .map(|o| o.name.clone())
        .collect()
}

/// Random values for the float arguments, the case's fixed values for the others.
fn make_args(c: &Case, f: &Function, rng: &mut Rng) -> Args {
    let mut args = Args::new();
    for a in f.args() {
        let t = if a.ty.dtype.is_float() {
            let init = c
                .inits
                .iter()
                .find(|(n, _)| *n == a.name)
                .map_or(c.default_init, |&(_, i)| i);
            Tensor::from_f64(a.ty.shape.clone(), rng.vec(a.ty.num_elements(), init))
        } else {
            c.fixed
                .iter()
                .find(|(n, _)| *n == a.name)
                .unwrap_or_else(|| panic!("{}: no fixed value for `{}`", c.name, a.name))
                .1
                .clone()
        };
        args.insert(a.name.to_string(), t);
    }
    args
}

/// `f` with the single output `loss = Σₒ reduce_sum(yₒ · Rₒ)`; returns it and the `Rₒ`.
fn with_loss(f: &Function, rng: &mut Rng) -> (Function, BTreeMap<String, Vec<f64>>) {
    let mut t = Tracer::from_function(f.clone());
    let mut rs = BTreeMap::new();
    let mut loss: Option<Value> = None;
    for name in float_outputs(f) {
        let y = f.output(&name).expect("output");
        let ty = f.ty(y).clone();
        let r = rng.vec(ty.num_elements(), Init::Uniform(-1.0, 1.0));
        let rc = t
            .constant(ty.clone(), Literal::Float(r.clone()))
            .expect("R constant");
        let m = t.mul(y, rc).expect("y * R");
        let axes: Vec<usize> = (0..ty.rank()).collect();
        let s = t.reduce_sum(m, axes).expect("sum");
        loss = Some(match loss {
            None => s,
            Some(l) => t.add(l, s).expect("add"),
        });
        rs.insert(name, r);
    }
    t.output("loss", loss.expect("a float output"))
        .expect("loss output");
    let mut lf = t.finish();
    lf.outputs.retain(|o| o.name == "loss");
    (lf, rs)
}

/// The Richardson-extrapolated central difference `(4·D(h) − D(2h)) / 3` of `eval` at `x`
/// along its perturbation.
fn richardson(mut eval: impl FnMut(f64) -> Vec<f64>, h: f64) -> Vec<f64> {
    let p1 = eval(h);
    let m1 = eval(-h);
    let p2 = eval(2.0 * h);
    let m2 = eval(-2.0 * h);
    (0..p1.len())
        .map(|i| {
            let d1 = (p1[i] - m1[i]) / (2.0 * h);
            let d2 = (p2[i] - m2[i]) / (4.0 * h);
            (4.0 * d1 - d2) / 3.0
        })
        .collect()
}

/// The largest error of `analytic` against `reference` (definition in the module docs), and the
/// element where it occurs.
fn max_error(analytic: &[f64], reference: &[f64]) -> (f64, usize) {
    assert_eq!(analytic.len(), reference.len());
    let scale = reference.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let mut worst = (0.0, 0);
    for (i, (&a, &b)) in analytic.iter().zip(reference).enumerate() {
        let diff = (a - b).abs();
        let err = if diff == 0.0 {
            0.0
        } else if !diff.is_finite() {
            f64::INFINITY
        } else {
            diff / a.abs().max(b.abs()).max(FLOOR * scale)
        };
        if err > worst.0 || err.is_nan() {
            worst = (err, i);
        }
    }
    worst
}

/// Results of one case: worst errors, and failures.
#[derive(Default)]
struct Report {
    lines: Vec<String>,
    failures: Vec<String>,
}

impl Report {
    fn check(&mut self, case: &str, what: &str, analytic: &[f64], reference: &[f64]) {
        let (err, i) = max_error(analytic, reference);
        let line = format!(
            "{case}: {what}: max error {err:.2e} (element {i}: analytic {:.12e}, reference {:.12e})",
            analytic[i], reference[i]
        );
        if err.is_nan() || err > TOL {
            self.failures.push(line.clone());
        }
        if reference.iter().all(|&x| x == 0.0) {
            self.failures
                .push(format!("{case}: {what}: the reference is all zeros"));
        }
        self.lines.push(line);
    }
}

fn contains_op(f: &Function, name: &str) -> bool {
    f.body.iter().any(|&n| f.nodes[n].op.name() == name)
}

fn check_case(c: &Case, seed: u64, report: &mut Report) {
    let f = c.forward();
    for op in &c.ops {
        assert!(
            contains_op(&f, op),
            "{}: the case is about `{op}` but does not use it",
            c.name
        );
    }
    let mut rng = Rng(seed);
    let args = make_args(c, &f, &mut rng);
    let (lf, rs) = with_loss(&f, &mut rng);
    let floats = float_args(&f);
    let data_inputs: Vec<String> = f
        .data_inputs()
        .filter(|a| a.ty.dtype.is_float())
        .map(|a| a.name.to_string())
        .collect();

    // ----- VJP -----
    let mut grads: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    match (c.vjp, differentiate(lf.clone(), Mode::Loss, &data_inputs)) {
        (Expect::Check, Ok((g, warnings))) => {
            assert!(warnings.is_empty(), "{}: warnings {warnings:?}", c.name);
            if let Err(errors) = verify_function(&g) {
                panic!("{}: differentiated function: {errors:?}", c.name);
            }
            let results = run(&g, &args);
            for name in &floats {
                let analytic = output(&g, &results, &format!("grad.{name}"));
                let x0 = args[name].to_f64_vec();
                let shape = args[name].shape.clone();
                let mut reference = Vec::with_capacity(x0.len());
                for i in 0..x0.len() {
                    let h = H * x0[i].abs().max(1.0);
                    let fd = richardson(
                        |d| {
                            let mut x = x0.clone();
                            x[i] += d;
                            let mut a = args.clone();
                            a.insert(name.clone(), Tensor::from_f64(shape.clone(), x));
                            run(&lf, &a)[0].to_f64_vec()
                        },
                        h,
                    );
                    reference.push(fd[0]);
                }
                report.check(&c.name, &format!("vjp grad.{name}"), &analytic, &reference);
                grads.insert(name.clone(), analytic);
            }
            if c.mixed {
                let mixed = grads
                    .values()
                    .any(|g| g.contains(&0.0) && g.iter().any(|&x| x != 0.0));
                if !mixed {
                    report.failures.push(format!(
                        "{}: no gradient has both zero and non-zero elements",
                        c.name
                    ));
                }
            }
        }
        (Expect::Fails(msg), Err(e)) => assert!(
            e.contains(msg),
            "{}: VJP failed with `{e}`, expected `{msg}`",
            c.name
        ),
        (Expect::Check, Err(e)) => report.failures.push(format!("{}: VJP failed: {e}", c.name)),
        (Expect::Fails(msg), Ok(_)) => report.failures.push(format!(
            "{}: VJP was expected to fail with `{msg}` but succeeded",
            c.name
        )),
    }

    // ----- JVP -----
    match (c.jvp, linearize(f.clone())) {
        (Expect::Check, Ok(jf)) => {
            if let Err(errors) = verify_function(&jf) {
                panic!("{}: linearized function: {errors:?}", c.name);
            }
            let mut tangents: BTreeMap<String, Vec<f64>> = BTreeMap::new();
            let mut jargs = args.clone();
            for name in &floats {
                let n = args[name].numel();
                let v = rng.vec(n, Init::Uniform(-1.0, 1.0));
                jargs.insert(
                    format!("tangent.{name}"),
                    Tensor::from_f64(args[name].shape.clone(), v.clone()),
                );
                tangents.insert(name.clone(), v);
            }
            let results = run(&jf, &jargs);
            let outs = float_outputs(&f);
            let mut lhs_terms = Vec::new();
            for o in &outs {
                let analytic = output(&jf, &results, &format!("tangent.{o}"));
                let reference = richardson(
                    |d| {
                        let mut a = args.clone();
                        for name in &floats {
                            let x: Vec<f64> = args[name]
                                .to_f64_vec()
                                .iter()
                                .zip(&tangents[name])
                                .map(|(x, v)| x + d * v)
                                .collect();
                            a.insert(name.clone(), Tensor::from_f64(args[name].shape.clone(), x));
                        }
                        output(&f, &run(&f, &a), o)
                    },
                    H,
                );
                report.check(&c.name, &format!("jvp tangent.{o}"), &analytic, &reference);
                lhs_terms.extend(analytic.iter().zip(&rs[o]).map(|(t, r)| t * r));
            }
            // ⟨R, J·v⟩ = ⟨Jᵀ·R, v⟩.
            if c.vjp == Expect::Check {
                let rhs_terms: Vec<f64> = floats
                    .iter()
                    .flat_map(|n| grads[n].iter().zip(&tangents[n]).map(|(g, v)| g * v))
                    .collect();
                let lhs: f64 = lhs_terms.iter().sum();
                let rhs: f64 = rhs_terms.iter().sum();
                let mag: f64 = lhs_terms
                    .iter()
                    .chain(&rhs_terms)
                    .map(|x| x.abs())
                    .sum::<f64>()
                    .max(1e-300);
                let err = (lhs - rhs).abs() / mag;
                let line = format!(
                    "{}: <R, jvp(v)> = {lhs:.15e}, <vjp(R), v> = {rhs:.15e}, error {err:.2e}",
                    c.name
                );
                if err > 1e-12 {
                    report.failures.push(line.clone());
                }
                report.lines.push(line);
            }
        }
        (Expect::Fails(msg), Err(e)) => assert!(
            e.contains(msg),
            "{}: JVP failed with `{e}`, expected `{msg}`",
            c.name
        ),
        (Expect::Check, Err(e)) => report.failures.push(format!("{}: JVP failed: {e}", c.name)),
        (Expect::Fails(msg), Ok(_)) => report.failures.push(format!(
            "{}: JVP was expected to fail with `{msg}` but succeeded",
            c.name
        )),
    }
}

fn check_all(cases: Vec<Case>) {
    let mut report = Report::default();
    for (k, c) in cases.iter().enumerate() {
        check_case(c, 0x5EED_0000 + k as u64, &mut report);
    }
    for l in &report.lines {
        println!("{l}");
    }
    assert!(
        report.failures.is_empty(),
        "{} gradient check(s) failed:\n{}",
        report.failures.len(),
        report.failures.join("\n")
    );
}

#[test]
fn elementwise_ops_match_finite_differences() {
    check_all(elementwise_cases());
}

#[test]
fn shape_ops_match_finite_differences() {
    check_all(shape_cases());
}

#[test]
fn linalg_and_pool_ops_match_finite_differences() {
    check_all(linalg_cases());
}

#[test]
fn index_and_nn_ops_match_finite_differences() {
    check_all(index_and_nn_cases());
}

#[test]
fn gradient_ops_jvp_matches_finite_differences() {
    check_all(gradient_op_cases());
}

/// Every op is covered by a gradient check of both modes, or listed as not differentiable (or,
/// for the VJP, as documented unsupported).
#[test]
fn every_op_is_covered() {
    let mut vjp = BTreeSet::new();
    let mut jvp = BTreeSet::new();
    for c in all_cases() {
        let f = c.forward();
        for op in &c.ops {
            assert!(contains_op(&f, op), "{}: does not use `{op}`", c.name);
            if c.vjp == Expect::Check {
                vjp.insert(*op);
            }
            if c.jvp == Expect::Check {
                jvp.insert(*op);
            }
        }
    }
    let mut missing = Vec::new();
    for name in Op::all_names() {
        if CUSTOM_GRADIENT.contains(&name) {
            continue;
        }
        let skip = NON_DIFFERENTIABLE.contains(&name);
        if !skip && !vjp.contains(name) && !VJP_UNSUPPORTED.contains(&name) {
            missing.push(format!("{name} (vjp)"));
        }
        if !skip && !jvp.contains(name) {
            missing.push(format!("{name} (jvp)"));
        }
        if skip && (vjp.contains(name) || jvp.contains(name)) {
            missing.push(format!(
                "{name} is listed as non-differentiable but checked"
            ));
        }
    }
    for name in NON_DIFFERENTIABLE
        .iter()
        .chain(VJP_UNSUPPORTED)
        .chain(CUSTOM_GRADIENT)
    {
        assert!(
            Op::all_names().contains(name),
            "`{name}` is not an op name any more"
        );
    }
    assert!(
        missing.is_empty(),
        "ops without a gradient check: {missing:?}"
    );
}

/// Stage mode: the incoming gradients `grad.<output>` are inputs; feeding `grad.y = R` gives the
/// gradient of `Σ y·R`.
#[test]
fn stage_mode_matches_finite_differences() {
    let c = case("stage", &["matmul"], |t| {
        let x = t.input("x", F64, [3, 4])?;
        let h = t.linear(x, 4, 3, true, "fc")?;
        let h = t.tanh(h)?;
        let s = t.softmax(h, 1)?;
        t.output("y", h)?;
        t.output("z", s)
    });
    let f = c.forward();
    let mut rng = Rng(0x57A6E);
    let args = make_args(&c, &f, &mut rng);
    let (lf, rs) = with_loss(&f, &mut rng);
    let (g, warnings) = differentiate(f.clone(), Mode::Stage, &[]).expect("stage autodiff");
    assert!(warnings.is_empty(), "{warnings:?}");
    verify_function(&g).expect("verifies");
    for o in ["y", "z"] {
        let gi = g
            .data_inputs()
            .find(|a| a.name == format!("grad.{o}"))
            .unwrap_or_else(|| panic!("no input grad.{o}"));
        assert_eq!(gi.ty, f.ty(f.output(o).unwrap()));
    }
    let mut gargs = args.clone();
    for (o, r) in &rs {
        let shape = f.ty(f.output(o).unwrap()).shape.clone();
        gargs.insert(format!("grad.{o}"), Tensor::from_f64(shape, r.clone()));
    }
    let results = run(&g, &gargs);
    let mut report = Report::default();
    for name in float_args(&f) {
        let analytic = output(&g, &results, &format!("grad.{name}"));
        let x0 = args[&name].to_f64_vec();
        let reference: Vec<f64> = (0..x0.len())
            .map(|i| {
                richardson(
                    |d| {
                        let mut x = x0.clone();
                        x[i] += d;
                        let mut a = args.clone();
                        a.insert(name.clone(), Tensor::from_f64(args[&name].shape.clone(), x));
                        run(&lf, &a)[0].to_f64_vec()
                    },
                    H * x0[i].abs().max(1.0),
                )[0]
            })
            .collect();
        report.check("stage", &format!("grad.{name}"), &analytic, &reference);
    }
    for l in &report.lines {
        println!("{l}");
    }
    assert!(report.failures.is_empty(), "{:?}", report.failures);
}

/// dgrad/wgrad tagging on a two-layer MLP: no dgrad node consumes a wgrad value, parameter
/// gradients come from wgrad nodes and the input gradient from a dgrad node.
#[test]
fn mlp_dgrad_wgrad_tagging() {
    let mut t = Tracer::new("mlp");
    let x = t.input("x", F64, [4, 3]).unwrap();
    let labels = t.input("labels", DType::I64, [4]).unwrap();
    let h = t.linear(x, 3, 5, true, "fc1").unwrap();
    let h = t.relu(h).unwrap();
    let logits = t.linear(h, 5, 2, true, "fc2").unwrap();
    let ce = t.cross_entropy(logits, labels).unwrap();
    let loss = t.mean_all(ce).unwrap();
    t.output("loss", loss).unwrap();
    let f = t.finish();
    let (g, warnings) = differentiate(f, Mode::Loss, &["x".to_string()]).expect("autodiff");
    assert!(warnings.is_empty(), "{warnings:?}");
    verify_function(&g).expect("verifies");

    let phase_of = |v: Value| g.nodes[g.values[v].def].phase;
    let mut dgrad_nodes = 0;
    let mut wgrad_nodes = 0;
    for &n in &g.body {
        let node = &g.nodes[n];
        match node.phase {
            Phase::Dgrad => {
                dgrad_nodes += 1;
                for &v in &node.operands {
                    assert_ne!(
                        phase_of(v),
                        Phase::Wgrad,
                        "dgrad node `{}` consumes a wgrad value",
                        node.op.name()
                    );
                }
            }
            Phase::Wgrad => wgrad_nodes += 1,
            _ => {}
        }
    }
    assert!(dgrad_nodes > 0 && wgrad_nodes > 0);
    let params: Vec<String> = g
        .args()
        .filter(|a| a.role == ArgRole::Param)
        .map(|a| a.name.to_string())
        .collect();
    assert_eq!(
        params,
        ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"].map(String::from)
    );
    for p in &params {
        let v = g.output(&format!("grad.{p}")).expect("param gradient");
        assert_eq!(phase_of(v), Phase::Wgrad, "grad.{p}");
        assert_eq!(g.ty(v), g.ty(g.args().find(|a| a.name == p).unwrap().value));
    }
    let gx = g.output("grad.x").expect("input gradient");
    assert_eq!(phase_of(gx), Phase::Dgrad, "grad.x");
    assert_eq!(g.ty(gx), &TensorType::new(F64, vec![4, 3]));
}

/// The pipeline route (`autodiff{mode=loss,wrt=…}`) builds the same function as
/// [`differentiate`], so the checks above cover it.
#[test]
fn pipeline_route_matches_direct_call() {
    let c = case("pipeline", &["matmul"], |t| {
        let a = t.input("a", F64, [2, 3])?;
        let b = t.input("b", F64, [3, 2])?;
        let w = t.param("w", F64, [2, 2])?;
        let y = t.matmul(a, b)?;
        let y = t.matmul(y, w)?;
        out(t, y)
    });
    let (lf, _) = with_loss(&c.forward(), &mut Rng(1));
    let wrt = ["a".to_string(), "b".to_string()];
    let (direct, _) = differentiate(lf.clone(), Mode::Loss, &wrt).expect("autodiff");
    let pm =
        cleave_passes::PassManager::from_pipeline("autodiff{mode=loss,wrt=a;b}").expect("pipeline");
    let mut module = cleave_ir::Module::with_function(lf);
    let mut ctx = cleave_passes::PassContext::default();
    pm.run(&mut module, &mut ctx, &mut |_| {}).expect("runs");
    assert!(ctx.warnings.is_empty(), "{:?}", ctx.warnings);
    assert_eq!(module.functions[0].to_string(), direct.to_string());
}

/// The custom-gradient ops, one per entry of `CUSTOM_GRADIENT`: the op applied to `x`.
fn custom_op(name: &str) -> Op {
    match name {
        "ste_round" => Op::Ste(SteOp::Round),
        "ste_sign" => Op::Ste(SteOp::Sign),
        "ste_argmax_one_hot" => Op::Ste(SteOp::ArgmaxOneHot { axis: 1 }),
        "grad_reverse" => Op::GradReverse { lambda: 0.75 },
        other => panic!("no custom-gradient case for `{other}`"),
    }
}

/// Straight-through estimators and gradient reversal, exactly as specified, for both modes:
/// `L = Σ (op(x·a) · r)` has `dL/dx = a·r·s` with `s = 1` (straight-through) or `s = −λ`
/// (reversal), bit for bit, and the tangent of `y = op(x·a)` along `ẋ` is `s·a·ẋ`. The forward
/// is the op's forward function. For the straight-through estimators the true derivative is zero
/// almost everywhere, so finite differences of `L` (away from the jumps) are zero while the
/// estimator's gradient is not: the test checks that too, so a rule returning the true
/// derivative would fail.
#[test]
fn custom_gradient_ops_are_exact() {
    let (n, m) = (3usize, 4usize);
    let xs: Vec<f64> = (0..n * m)
        .map(|i| (i as f64 * 0.37).sin() * 2.3 + 0.1)
        .collect();
    let a: Vec<f64> = (0..n * m).map(|i| 0.5 + 0.25 * (i % 3) as f64).collect();
    let r: Vec<f64> = (0..n * m).map(|i| 1.0 - 0.3 * (i % 5) as f64).collect();
    for &name in CUSTOM_GRADIENT {
        let op = custom_op(name);
        let mut t = Tracer::new("custom");
        let build = |t: &mut Tracer| -> Res<()> {
            let x = t.param("x", DType::F64, [n, m])?;
            let av = t.constant(
                TensorType::new(DType::F64, vec![n, m]),
                Literal::Float(a.clone()),
            )?;
            let rv = t.constant(
                TensorType::new(DType::F64, vec![n, m]),
                Literal::Float(r.clone()),
            )?;
            let xa = t.mul(x, av)?;
            let y = t.push_op(op.clone(), &[xa])?[0];
            let yr = t.mul(y, rv)?;
            let l = t.reduce_sum(yr, vec![0, 1])?;
            t.output("loss", l)?;
            t.output("y", y)
        };
        build(&mut t).unwrap();
        let f = t.finish();
        verify_function(&f).unwrap();
        let s = match op {
            Op::GradReverse { lambda } => -lambda,
            _ => 1.0,
        };
        let args: Args = [("x".to_string(), Tensor::from_f64(vec![n, m], xs.clone()))].into();
        // Forward.
        let y = run(&f, &args)[1].to_f64_vec();
        let xa: Vec<f64> = xs.iter().zip(&a).map(|(x, a)| x * a).collect();
        let want_y: Vec<f64> = match op {
            Op::Ste(SteOp::Round) => xa.iter().map(|v| v.round_ties_even()).collect(),
            Op::Ste(SteOp::Sign) => xa.iter().map(|v| v.signum()).collect(),
            Op::Ste(SteOp::ArgmaxOneHot { .. }) => (0..n * m)
                .map(|k| {
                    let row = &xa[k / m * m..k / m * m + m];
                    let best = (0..m).fold(0, |b, j| if row[j] > row[b] { j } else { b });
                    f64::from(k % m == best)
                })
                .collect(),
            _ => xa.clone(),
        };
        assert_eq!(y, want_y, "{name}: forward");
        // Reverse mode.
        let (g, _) = differentiate(f.clone(), Mode::Loss, &[]).unwrap();
        verify_function(&g).unwrap();
        let gi = g.outputs.iter().position(|o| o.name == "grad.x").unwrap();
        let dx = run(&g, &args)[gi].to_f64_vec();
        for k in 0..n * m {
            assert_eq!(dx[k], a[k] * (r[k] * s), "{name}: dL/dx[{k}]");
        }
        // Forward mode: the transpose of the VJP.
        let lin = linearize(f.clone()).unwrap();
        let mut targs = args.clone();
        let xdot: Vec<f64> = (0..n * m).map(|k| 0.1 * k as f64 - 0.4).collect();
        targs.insert(
            "tangent.x".into(),
            Tensor::from_f64(vec![n, m], xdot.clone()),
        );
        let ti = lin
            .outputs
            .iter()
            .position(|o| o.name == "tangent.y")
            .unwrap();
        let ydot = run(&lin, &targs)[ti].to_f64_vec();
        for k in 0..n * m {
            let want = if s == 1.0 {
                xdot[k] * a[k]
            } else {
                s * (xdot[k] * a[k])
            };
            assert!(
                (ydot[k] - want).abs() <= 1e-15,
                "{name}: tangent[{k}] {} vs {want}",
                ydot[k]
            );
        }
        // The straight-through gradient is not the derivative: the forward is locally constant.
        if s == 1.0 {
            let mut bumped = xs.clone();
            bumped[5] += 1e-7;
            let args2: Args = [("x".to_string(), Tensor::from_f64(vec![n, m], bumped))].into();
            let (l0, l1) = (
                run(&f, &args)[0].to_f64_vec()[0],
                run(&f, &args2)[0].to_f64_vec()[0],
            );
            assert_eq!(l0, l1, "{name}: locally constant forward");
            assert_ne!(
                dx[5], 0.0,
                "{name}: the estimator passes the gradient through"
            );
        }
    }
}
