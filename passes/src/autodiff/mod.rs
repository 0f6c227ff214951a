//! `autodiff`: reverse-mode differentiation into a joint forward + backward function.
//!
//! # What it builds
//!
//! From a forward function, the pass builds the training step in place: the forward nodes stay,
//! backward nodes are appended after them, and gradient outputs are added.
//!
//! - **Loss mode** (`mode=loss`): the function returns a scalar float loss (the output named
//!   `loss`, or its only scalar float output). The seed is the constant 1, or, when the function
//!   has an `f32[]` data input named `precision.loss_scale` (added by `precision{f16}`), that
//!   input: the whole backward then carries the loss scale (dynamic loss scaling; the trainer
//!   divides it back out of the gradients). Auxiliary losses (`local`) are seeded with it too. Outputs `grad.<param>` are added for every float parameter, and
//!   `grad.<input>` for the data inputs named in `wrt`.
//! - **Stage mode** (`mode=stage`, what a pipeline stage needs): there is no scalar loss. Every
//!   float output `o` gets an incoming-gradient input `grad.<o>` (phase `dgrad`), and every float
//!   data input gets a gradient output `grad.<input>` besides the parameters'.
//! - `mode=auto` (the default) picks loss mode when there is an output named `loss` that is a float
//!   scalar, and stage mode otherwise.
//!
//! # Which nodes are differentiated
//!
//! Only nodes that both depend on a differentiated argument (a parameter or a chosen input) through
//! differentiable operands *and* reach a seeded output are differentiated. Integer and bool values
//! never carry gradients; `stop_gradient`, comparison, `floor`/`round`/`sign`, index operands and
//! casts to non-float types cut the flow. A parameter that does not reach the loss gets a zero
//! gradient and a warning.
//!
//! # dgrad or wgrad, at birth
//!
//! Every backward node computes (part of) the gradient of one forward value `v`. A forward value
//! is *data-dependent* if it depends on any data input; otherwise it is computed from parameters
//! and constants only. A node computing the gradient of a data-dependent value is tagged `dgrad`
//! (activation and input gradients: the critical path toward the previous stage); a node computing
//! the gradient of a parameter-only value (a parameter, its transpose, a broadcast bias, …) is
//! tagged `wgrad`. A `dgrad` node therefore never consumes a `wgrad` value: the cotangent of a
//! data-dependent value is built only from cotangents of data-dependent values.
//!
//! Each VJP rule is split per operand (see `rules.rs`): the part for operand `i` is emitted only if
//! operand `i` needs a gradient, and it reads only what that part needs.
//!
//! # Accumulation order
//!
//! Nodes are visited in reverse body order; contributions to a value's cotangent are summed with
//! `add` in that order. A sum takes the lower stage of its two terms (a stage-annotated module's
//! gradients flow from later stages to earlier ones). The order is a function of the input text only, so gradients are
//! reproducible bit for bit.
//!
//! # Gradient methods
//!
//! `method=` (`fa`, `dfa`, `local`, `forward-gradient`) replaces exact backprop by a rewrite of
//! the backward graph with the same interface; see [`methods`]. The emission loop below takes
//! their hooks (extra seeds, cut edges, feedback matrices) through a `Rewrite`.
//!
//! Entry: a verified module. Exit: a verified module; the differentiated function keeps its name,
//! its arguments (plus `grad.<output>` inputs in stage mode) and its outputs (plus `grad.*`).

pub mod methods;
pub(crate) mod rules;
/// Few-bit backward of GELU/SiLU (`compress=fewbit`): the fitted thresholds and levels.
pub use rules::fewbit::fit as fewbit_fit;

use std::collections::{HashMap, HashSet};

use cleave_ir::tracer::Tracer;
use cleave_ir::{ArgRole, Function, Literal, Module, Node, Op, Phase, Value};
use cranelift_entity::{EntityRef, SecondaryMap};

use crate::pass::{Pass, PassContext, PassError, PassOptions};

/// How seeds are chosen (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Loss mode if there is a scalar float output named `loss`, stage mode otherwise.
    Auto,
    /// Differentiate a scalar loss.
    Loss,
    /// Differentiate every float output against incoming gradients.
    Stage,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Mode::Auto),
            "loss" => Ok(Mode::Loss),
            "stage" => Ok(Mode::Stage),
            _ => Err("expected `auto`, `loss` or `stage`".into()),
        }
    }
}

/// The prefix of gradient inputs and outputs: `grad.<name>`.
pub const GRAD_PREFIX: &str = "grad.";

/// The data input that, when present, seeds the loss's cotangent in loss mode (see the module
/// docs): `--precision f16`'s loss scale.
pub const LOSS_SCALE_INPUT: &str = "precision.loss_scale";

/// The `autodiff` pass.
#[derive(Clone, Debug)]
pub struct Autodiff {
    /// Seed selection.
    pub mode: Mode,
    /// The function to differentiate (default: every function of the module).
    pub function: Option<String>,
    /// Data inputs whose gradients are wanted in loss mode.
    pub wrt: Vec<String>,
    /// The gradient method (see [`methods`]).
    pub method: methods::GradMethod,
    /// Seed of the fixed random matrices of `fa` and `dfa`.
    pub seed: u64,
    /// `compress=…`: stash compression of the backward ([`Compress`]).
    pub compress: Compress,
    /// `only=…`: the values the compression applies to ([`Selection`]; none: every value).
    pub only: Option<Selection>,
}

/// One stash compression method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Method {
    /// Few-bit backward of GELU/SiLU (the activation's input).
    Fewbit,
    /// Rank-1 sub-tokens (a linear layer's data input).
    Rank1,
    /// The value itself in bfloat16.
    Bf16,
    /// The value as 8-bit codes with a scale per row.
    Int8,
}

impl Method {
    /// The method's name (`--compress`, `only=`, reports).
    pub fn name(self) -> &'static str {
        match self {
            Method::Fewbit => "fewbit",
            Method::Rank1 => "rank1",
            Method::Bf16 => "bf16",
            Method::Int8 => "int8",
        }
    }

    /// Every method, in the order `autodiff` applies them.
    pub const ALL: [Method; 4] = [Method::Fewbit, Method::Rank1, Method::Int8, Method::Bf16];

    /// Parses a method name.
    pub fn parse(name: &str) -> Option<Method> {
        Method::ALL.into_iter().find(|m| m.name() == name)
    }
}

/// The (value, method) pairs a named compression is restricted to: the planner's per-value
/// choice (the `autodiff` option `only=METHOD:N;…`). `N` is the value's print number (`%N`) in
/// the function `autodiff` differentiates: a GELU/SiLU input for `fewbit`, a linear layer's data
/// input for `rank1`, a value the backward reads for `bf16` and `int8` (with `rank1`, the bf16
/// choice of a layer input also covers its sub-token coefficients; with `int8`, its scales).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection(pub std::collections::BTreeSet<(u32, Method)>);

impl Selection {
    /// Parses `METHOD:N;METHOD:N…` (`none` or empty: nothing selected; the inverse of
    /// [`Selection::text`]).
    pub fn parse(text: &str) -> Result<Selection, String> {
        let mut s = std::collections::BTreeSet::new();
        if text == "none" {
            return Ok(Selection(s));
        }
        for item in text.split([';', ' ']).filter(|s| !s.is_empty()) {
            let (m, n) = item
                .split_once(':')
                .ok_or_else(|| format!("`{item}`: expected METHOD:N (e.g. bf16:12)"))?;
            let m = Method::parse(m)
                .ok_or_else(|| format!("`{item}`: unknown method; fewbit, rank1, int8 or bf16"))?;
            let n = n
                .trim_start_matches('%')
                .parse()
                .map_err(|_| format!("`{item}`: N is a value's print number"))?;
            s.insert((n, m));
        }
        Ok(Selection(s))
    }

    /// The option's text (`METHOD:N;…`, or `none` when empty).
    pub fn text(&self) -> String {
        if self.0.is_empty() {
            return "none".into();
        }
        self.0
            .iter()
            .map(|(n, m)| format!("{}:{n}", m.name()))
            .collect::<Vec<_>>()
            .join(";")
    }
}

/// Lossy compression of what the backward stashes (the `autodiff` option `compress`, the CLI's
/// `--compress`): each method is opt-in and applies only where it is named.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Compress {
    /// Few-bit backward of GELU/SiLU with this many bits (`compress=fewbit,bits=B`).
    pub fewbit: Option<u32>,
    /// Rank-1 sub-token projection of linear layers' inputs with this group size
    /// (`compress=rank1,group=G`).
    pub rank1: Option<usize>,
    /// Rank-1's vector from each batch's average sub-token (`vector=batch`), else the constant
    /// `1/√G` (`vector=mean`, the default; see `rules::rank1`).
    pub rank1_batch: bool,
    /// The stash in bfloat16 (`compress=bf16`, `rules::narrow`).
    pub bf16: bool,
    /// The stash as 8-bit codes with a scale per row (`compress=int8`, `rules::narrow`).
    pub int8: bool,
}

impl Compress {
    /// Bits of the few-bit backward: the fewest, the most, and the default.
    pub const BITS: (u32, u32, u32) = (1, 4, 2);
    /// Features per rank-1 sub-token: the fewest, and the default.
    pub const GROUP: (usize, usize) = (2, 8);

    /// Whether no method is named.
    pub fn is_none(&self) -> bool {
        *self == Compress::default()
    }

    /// Takes the pass options of `pass` (`autodiff`, `plan`) that name a compression:
    /// `compress` (`fewbit`, `rank1`, `int8`, `bf16`, several joined by `+`) and its parameters
    /// `bits`, `group` and `vector` (`mean` or `batch`).
    pub fn take_options(o: &mut PassOptions, pass: &str) -> Result<Self, PassError> {
        let methods = o.take("compress");
        let bits = o.take_parsed("bits", Self::BITS.2)?;
        let group = o.take_parsed("group", Self::GROUP.1)?;
        let vector = o.take("vector");
        Self::from_options(methods.as_deref(), bits, group, vector.as_deref()).map_err(|message| {
            PassError::BadOption {
                pass: pass.into(),
                key: "compress".into(),
                message,
            }
        })
    }

    fn from_options(
        methods: Option<&str>,
        bits: u32,
        group: usize,
        vector: Option<&str>,
    ) -> Result<Self, String> {
        let mut c = Compress {
            rank1_batch: Self::parse_vector(vector.unwrap_or("mean"))?,
            ..Compress::default()
        };
        for m in methods.into_iter().flat_map(|m| m.split('+')) {
            match m {
                "fewbit" if (Self::BITS.0..=Self::BITS.1).contains(&bits) => c.fewbit = Some(bits),
                "fewbit" => {
                    return Err(format!("bits={bits}: few-bit backward stores 1 to 4 bits"))
                }
                "rank1" if group >= Self::GROUP.0 => c.rank1 = Some(group),
                "rank1" => {
                    return Err(format!(
                        "group={group}: rank-1 sub-tokens need at least 2 features"
                    ))
                }
                "bf16" => c.bf16 = true,
                "int8" => c.int8 = true,
                other => {
                    return Err(format!(
                        "unknown method `{other}`; autodiff compresses with fewbit, rank1, int8 \
                         and bf16"
                    ))
                }
            }
        }
        if c.rank1_batch && c.rank1.is_none() {
            return Err("vector=batch is rank1's vector, and compress does not name rank1".into());
        }
        Ok(c)
    }

    /// Rank-1's vector by name: `batch` (true) or `mean`.
    pub fn parse_vector(name: &str) -> Result<bool, String> {
        match name {
            "mean" => Ok(false),
            "batch" => Ok(true),
            other => Err(format!(
                "vector={other}: rank-1's vector is `mean` (the constant 1/√G) or `batch` (the \
                 batch's average sub-token)"
            )),
        }
    }

    /// The pass options (`compress=…,bits=…,group=…`), empty for none.
    pub fn pass_options(&self) -> String {
        let mut methods = Vec::new();
        let mut opts = Vec::new();
        if let Some(b) = self.fewbit {
            methods.push("fewbit");
            opts.push(format!("bits={b}"));
        }
        if let Some(g) = self.rank1 {
            methods.push("rank1");
            opts.push(format!("group={g}"));
            if self.rank1_batch {
                opts.push("vector=batch".into());
            }
        }
        if self.int8 {
            methods.push("int8");
        }
        if self.bf16 {
            methods.push("bf16");
        }
        if methods.is_empty() {
            return String::new();
        }
        std::iter::once(format!("compress={}", methods.join("+")))
            .chain(opts)
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl Autodiff {
    /// Builds the pass from pipeline options `mode`, `function`, `wrt` (names separated by `;`
    /// or spaces), and the gradient method: `method` (`bp`, `forward-gradient`, `fa`, `dfa`,
    /// `local`), `tangents` (forward-gradient, default 1), `blocks` (local, default 2), `seed`
    /// (fa/dfa random matrices, default 0).
    pub fn from_options(mut o: PassOptions) -> Result<Self, PassError> {
        let mode = o.take_parsed("mode", Mode::Auto)?;
        let method_name = o.take("method");
        let tangents = o.take_parsed("tangents", 1usize)?;
        let blocks = o.take_parsed("blocks", 2usize)?;
        let seed = o.take_parsed("seed", 0u64)?;
        let method =
            methods::GradMethod::from_pass_options(method_name.as_deref(), tangents, blocks)
                .map_err(|message| PassError::BadOption {
                    pass: "autodiff".into(),
                    key: "method".into(),
                    message,
                })?;
        let compress = Compress::take_options(&mut o, "autodiff")?;
        let only = o
            .take("only")
            .map(|t| {
                Selection::parse(&t).map_err(|message| PassError::BadOption {
                    pass: "autodiff".into(),
                    key: "only".into(),
                    message,
                })
            })
            .transpose()?;
        let function = o.take("function");
        let wrt = o
            .take("wrt")
            .map(|w| {
                w.split([';', ' '])
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        o.finish()?;
        Ok(Autodiff {
            mode,
            function,
            wrt,
            method,
            seed,
            compress,
            only,
        })
    }
}

impl Pass for Autodiff {
    fn name(&self) -> &'static str {
        "autodiff"
    }

    fn run(&self, module: &mut Module, ctx: &mut PassContext) -> Result<(), PassError> {
        if let Some(name) = &self.function {
            if module.function(name).is_none() {
                return Err(PassError::Failed {
                    pass: "autodiff",
                    message: format!("the module has no function @{name}"),
                });
            }
        }
        for func in &mut module.functions {
            if self.function.as_ref().is_some_and(|n| *n != func.name) {
                continue;
            }
            let taken = std::mem::take(func);
            let (new, warnings) = methods::differentiate_method(
                taken,
                self.mode,
                &self.wrt,
                &self.method,
                (self.seed, self.compress, self.only.as_ref()),
            )
            .map_err(|message| PassError::Failed {
                pass: "autodiff",
                message,
            })?;
            *func = new;
            for w in warnings {
                ctx.warn("autodiff", w);
            }
        }
        Ok(())
    }
}

/// Whether a gradient can flow from the result of `op` into operand `i`.
pub fn is_differentiable_operand(op: &Op, i: usize) -> bool {
    use cleave_ir::UnaryOp as U;
    match op {
        Op::Input { .. }
        | Op::Param { .. }
        | Op::Constant { .. }
        | Op::Iota { .. }
        | Op::Compare(_)
        | Op::StopGradient
        | Op::OneHot { .. } => false,
        Op::Unary(U::Floor | U::Round | U::Sign | U::Not) => false,
        Op::Select => i > 0,
        Op::Gather { .. } => i == 0,
        Op::ScatterAdd { .. } => i != 1,
        Op::CrossEntropy => i == 0,
        _ => true,
    }
}

fn is_float(func: &Function, v: Value) -> bool {
    func.ty(v).dtype.is_float()
}

/// Differentiates one function (see the module docs). Returns the new function and warnings.
pub fn differentiate(
    func: Function,
    mode: Mode,
    wrt: &[String],
) -> Result<(Function, Vec<String>), String> {
    differentiate_with(func, mode, wrt, &Rewrite::default())
}

/// Changes to plain reverse mode that the gradient methods of [`methods`] make (all empty for
/// backprop).
#[derive(Clone, Debug, Default)]
pub(crate) struct Rewrite {
    /// Extra scalar losses seeded with 1 besides the loss (local learning's auxiliary losses).
    pub extra_seeds: Vec<Value>,
    /// `(node, operand)` pairs whose VJP is not emitted: no gradient flows from the node's result
    /// into that operand (local learning's block boundaries).
    pub cuts: Vec<(Node, usize)>,
    /// How layers send the error to their data operand (feedback alignment).
    pub feedback: methods::Feedback,
    /// Stash compression (`rules::fewbit`, `rules::rank1`, `rules::narrow`).
    pub compress: Compress,
    /// Where the compression applies (none: everywhere it can).
    pub only: Option<Selection>,
}

/// [`differentiate`] with a [`Rewrite`].
pub(crate) fn differentiate_with(
    func: Function,
    mode: Mode,
    wrt: &[String],
    rewrite: &Rewrite,
) -> Result<(Function, Vec<String>), String> {
    let mut warnings = Vec::new();
    let fname = func.name.clone();
    // The per-value choice: (value, method) pairs of this function, `None` for everywhere.
    let allowed: Option<HashSet<(Value, Method)>> = match &rewrite.only {
        None => None,
        Some(sel) => {
            let numbering = cleave_ir::printer::print_numbering(&func);
            let by_number: HashMap<u32, Value> = numbering
                .iter()
                .filter_map(|(v, n)| n.map(|n| (n, v)))
                .collect();
            let mut set = HashSet::new();
            for &(n, m) in &sel.0 {
                let v = by_number.get(&n).ok_or_else(|| {
                    format!(
                        "@{fname}: only={}:{n} names %{n}, which is not a value of the function",
                        m.name()
                    )
                })?;
                set.insert((*v, m));
            }
            Some(set)
        }
    };
    let allows = |v: Value, m: Method| allowed.as_ref().is_none_or(|s| s.contains(&(v, m)));
    let original_nodes = func.nodes.len();
    if let Some(bits) = rewrite.compress.fewbit {
        let any = func
            .body
            .iter()
            .any(|&n| matches!(func.nodes[n].op, Op::Unary(u) if rules::fewbit::applies(u)));
        if !any {
            return Err(format!(
                "@{fname}: compress=fewbit (bits={bits}) compresses the backward of GELU and \
                 SiLU, and this function has neither"
            ));
        }
    }

    // Seeds.
    let loss_output = func
        .outputs
        .iter()
        .find(|o| o.name == "loss")
        .filter(|o| {
            let t = func.ty(o.value);
            t.rank() == 0 && t.dtype.is_float()
        })
        .cloned();
    let mode = match mode {
        Mode::Auto if loss_output.is_some() => Mode::Loss,
        Mode::Auto => Mode::Stage,
        m => m,
    };
    let loss_output = if mode == Mode::Loss {
        let scalar_floats: Vec<_> = func
            .outputs
            .iter()
            .filter(|o| {
                let t = func.ty(o.value);
                t.rank() == 0 && t.dtype.is_float()
            })
            .collect();
        match (&loss_output, scalar_floats.as_slice()) {
            (Some(l), _) => Some(l.clone()),
            (None, [only]) => Some((*only).clone()),
            _ => {
                return Err(format!(
                    "@{fname}: loss mode needs a scalar float output named `loss` (or exactly one scalar float output); outputs are {}",
                    describe_outputs(&func)
                ))
            }
        }
    } else {
        None
    };

    // Differentiated arguments.
    let mut targets: Vec<(Value, String)> = Vec::new();
    for arg in func.args() {
        let wanted = match arg.role {
            ArgRole::Param => true,
            ArgRole::Data => match mode {
                Mode::Stage => true,
                _ => wrt.iter().any(|w| w == arg.name),
            },
        };
        if wanted && !arg.ty.dtype.is_float() {
            if arg.role == ArgRole::Param || wrt.iter().any(|w| w == arg.name) {
                warnings.push(format!(
                    "@{fname}: {} \"{}\" has element type {} and gets no gradient",
                    if arg.role == ArgRole::Param {
                        "parameter"
                    } else {
                        "input"
                    },
                    arg.name,
                    arg.ty.dtype
                ));
            }
            continue;
        }
        if wanted {
            targets.push((arg.value, arg.name.to_string()));
        }
    }
    for w in wrt {
        if !func.data_inputs().any(|a| a.name == w) {
            return Err(format!(
                "@{fname}: `wrt` names \"{w}\", which is not a data input; inputs are {}",
                func.data_inputs()
                    .map(|a| format!("\"{}\"", a.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    for (_, name) in &targets {
        let gname = format!("{GRAD_PREFIX}{name}");
        if func.outputs.iter().any(|o| o.name == gname) || func.args().any(|a| a.name == gname) {
            return Err(format!(
                "@{fname}: the name \"{gname}\" is already taken; was the function differentiated already?"
            ));
        }
    }

    // Forward analyses over the body: varied (depends on a target through differentiable
    // operands) and data-dependent (depends on any data input).
    let mut varied: SecondaryMap<Value, bool> = SecondaryMap::with_default(false);
    let mut data_dep: SecondaryMap<Value, bool> = SecondaryMap::with_default(false);
    for &(v, _) in &targets {
        varied[v] = true;
    }
    for &node in &func.body {
        let data = &func.nodes[node];
        let is_varied = data
            .operands
            .iter()
            .enumerate()
            .any(|(i, &v)| varied[v] && is_differentiable_operand(&data.op, i));
        let is_data =
            matches!(data.op, Op::Input { .. }) || data.operands.iter().any(|&v| data_dep[v]);
        for &r in &data.results {
            if is_varied && is_float(&func, r) {
                varied[r] = true;
            }
            data_dep[r] = is_data;
        }
    }

    // Seed values and backward reachability (useful = a gradient is wanted for it).
    let seeds: Vec<(Value, String)> = match &loss_output {
        Some(l) => std::iter::once((l.value, l.name.clone()))
            .chain(rewrite.extra_seeds.iter().map(|&v| (v, String::new())))
            .collect(),
        None => func
            .outputs
            .iter()
            .filter(|o| is_float(&func, o.value))
            .map(|o| (o.value, o.name.clone()))
            .collect(),
    };
    let mut useful: SecondaryMap<Value, bool> = SecondaryMap::with_default(false);
    for (v, _) in &seeds {
        useful[*v] = varied[*v];
    }
    let mut active_nodes: Vec<Node> = Vec::new();
    for &node in func.body.iter().rev() {
        let data = &func.nodes[node];
        if data.op.arg_role().is_some() {
            continue;
        }
        if data.results.iter().any(|&r| useful[r] && varied[r]) {
            active_nodes.push(node);
            for (i, &v) in data.operands.iter().enumerate() {
                if varied[v] && is_differentiable_operand(&data.op, i) {
                    useful[v] = true;
                }
            }
        }
    }

    let loss_scale = func
        .args()
        .find(|a| a.name == LOSS_SCALE_INPUT && a.role == cleave_ir::ArgRole::Data)
        .map(|a| a.value);
    if let (Some(s), true) = (loss_scale, mode == Mode::Loss) {
        for (v, name) in &seeds {
            let (st, lt) = (func.ty(s), func.ty(*v));
            // A narrow-float loss (an auxiliary head on an f16 value) gets the scale cast.
            if st.shape != lt.shape || !lt.dtype.is_float() {
                let name = if name.is_empty() {
                    "an auxiliary loss"
                } else {
                    name
                };
                return Err(format!(
                    "@{fname}: the loss scale `{LOSS_SCALE_INPUT}` is {st}; it seeds the loss \
                     `{name}`, which is {lt}"
                ));
            }
        }
    }
    // Emit the backward pass.
    let mut t = Tracer::from_function(func);
    let mut cot: SecondaryMap<Value, Option<Value>> = SecondaryMap::with_default(None);
    let phase_of = |data_dep: &SecondaryMap<Value, bool>, v: Value| {
        if data_dep[v] {
            Phase::Dgrad
        } else {
            Phase::Wgrad
        }
    };
    let err = |e: cleave_ir::tracer::TraceError| format!("@{fname}: {e}");
    for (v, name) in &seeds {
        if !useful[*v] {
            continue;
        }
        let ty = t.ty(*v).clone();
        let stage = t.func().nodes[t.func().values[*v].def].stage;
        t.set_stage(stage);
        t.set_phase(phase_of(&data_dep, *v));
        let seed = match (mode, loss_scale) {
            (Mode::Loss, Some(s)) if t.ty(s).dtype == ty.dtype => s,
            (Mode::Loss, Some(s)) => t.cast(s, ty.dtype).map_err(err)?,
            (Mode::Loss, _) => t.constant(ty, Literal::Float(vec![1.0])).map_err(err)?,
            _ => t
                .input(&format!("{GRAD_PREFIX}{name}"), ty.dtype, ty.shape.clone())
                .map_err(err)?,
        };
        cot[*v] = Some(seed);
    }
    let mut fb = methods::FeedbackState::new(&rewrite.feedback, t.func(), &data_dep, &active_nodes);
    // Rank-1 compression: the coefficients of each compressed layer input, made once. Few-bit
    // backward: each activation's fit, found once.
    let mut rank1_cache: HashMap<Value, rules::rank1::Projection> = HashMap::new();
    let mut fits: HashMap<cleave_ir::UnaryOp, (Vec<f64>, Vec<f64>)> = HashMap::new();
    if let Some(group) = rewrite.compress.rank1 {
        let eligible = active_nodes.iter().any(|&n| {
            let d = &t.func().nodes[n];
            (0..2).any(|i| rank1_layer(&t, d, n, i, &data_dep, Some(group)).is_some())
        });
        if !eligible {
            return Err(format!(
                "@{fname}: compress=rank1 (group={group}) compresses the input of linear layers \
                 (a 2-D matmul of data by weights, features a multiple of {group}), and this \
                 function has none"
            ));
        }
    }
    for node in active_nodes {
        let data = t.func().nodes[node].clone();
        if data.results.iter().all(|&r| cot[r].is_none()) {
            continue;
        }
        let mut cots: Vec<Option<Value>> = Vec::with_capacity(data.results.len());
        for &r in &data.results {
            cots.push(match cot[r] {
                Some(c) => Some(settle(&mut t, c, r, phase_of(&data_dep, r)).map_err(err)?),
                None => None,
            });
        }
        t.set_stage(data.stage);
        // Direct feedback alignment: the output layer's error goes to every layer's input.
        let wants = |x: Value| useful[x] && varied[x];
        for (x, contribution) in fb.inject(&mut t, node, &cots, &wants).map_err(err)? {
            {
                let stage = t.func().nodes[t.func().values[x].def].stage;
                t.set_stage(stage);
                cot[x] = Some(match cot[x] {
                    None => contribution,
                    Some(prev) => accumulate(&mut t, prev, contribution).map_err(err)?,
                });
            }
        }
        t.set_stage(data.stage);
        for (i, &operand) in data.operands.iter().enumerate() {
            if !(useful[operand] && varied[operand] && is_differentiable_operand(&data.op, i)) {
                continue;
            }
            if rewrite.cuts.contains(&(node, i)) || fb.cuts(node, i) {
                continue;
            }
            t.set_phase(phase_of(&data_dep, operand));
            let fed = fb.substitute(&mut t, &data, i).map_err(err)?;
            let rank1_input = rank1_layer(&t, &data, node, i, &data_dep, rewrite.compress.rank1)
                .filter(|&(x, _)| allows(x, Method::Rank1));
            let contribution = match (&data.op, rewrite.compress.fewbit, rank1_input) {
                (Op::Unary(u), Some(bits), _)
                    if rules::fewbit::applies(*u) && allows(data.operands[0], Method::Fewbit) =>
                {
                    let dy = cots[0].expect("a unary op is differentiated with a cotangent");
                    let fitted = fits
                        .entry(*u)
                        .or_insert_with(|| rules::fewbit::fit(*u, bits));
                    rules::fewbit::vjp(&mut t, &data, dy, bits, fitted)
                }
                (_, _, Some((x, group))) => (|| {
                    let p = match rank1_cache.get(&x) {
                        Some(&p) => p,
                        None => {
                            let batch = rewrite.compress.rank1_batch;
                            let p = rules::rank1::coefficients(&mut t, x, group, batch)?;
                            rank1_cache.insert(x, p);
                            p
                        }
                    };
                    let mut approx = data.clone();
                    approx.operands[0] = rules::rank1::reconstruct(&mut t, p, group)?;
                    rules::vjp(&mut t, &approx, &cots, i)
                })(),
                _ => rules::vjp(&mut t, fed.as_ref().unwrap_or(&data), &cots, i),
            }
            .map_err(|e| {
                format!(
                    "@{fname}: differentiating `{}` (operand {i}): {e}",
                    data.op.name()
                )
            })?;
            let total = match cot[operand] {
                None => contribution,
                Some(prev) => {
                    // The sum lives in the lowest stage of its two terms: gradients flow from
                    // later stages to earlier ones, never back.
                    let stage_of =
                        |t: &Tracer, v: Value| t.func().nodes[t.func().values[v].def].stage;
                    let stage = match (stage_of(&t, prev), stage_of(&t, contribution)) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    t.set_stage(stage);
                    let sum = accumulate(&mut t, prev, contribution).map_err(err)?;
                    t.set_stage(data.stage);
                    sum
                }
            };
            cot[operand] = Some(total);
        }
    }

    // Gradient outputs.
    for (v, name) in &targets {
        let g = match cot[*v] {
            Some(g) => settle(&mut t, g, *v, phase_of(&data_dep, *v)).map_err(err)?,
            None => {
                let is_param =
                    t.func().nodes[t.func().values[*v].def].op.arg_role() == Some(ArgRole::Param);
                warnings.push(format!(
                    "@{fname}: {} \"{name}\" has no differentiable path to {}; its gradient is zero",
                    if is_param { "parameter" } else { "input" },
                    if mode == Mode::Loss {
                        "the loss"
                    } else {
                        "any output"
                    }
                ));
                let ty = t.ty(*v).clone();
                t.set_stage(t.func().nodes[t.func().values[*v].def].stage);
                t.set_phase(phase_of(&data_dep, *v));
                t.constant(ty, Literal::Float(vec![0.0])).map_err(err)?
            }
        };
        t.output(&format!("{GRAD_PREFIX}{name}"), g).map_err(err)?;
    }
    let mut func = t.finish();
    if rewrite.compress.fewbit.is_some() || rewrite.compress.rank1.is_some() {
        // The compressions made forward nodes while emitting the backward: run them with the
        // forward (a stable partition keeps every order), so that what they compress dies there.
        let (fw, bw): (Vec<Node>, Vec<Node>) = func
            .body
            .iter()
            .partition(|&&n| func.nodes[n].phase == Phase::Forward);
        func.body = fw.into_iter().chain(bw).collect();
    }
    // int8, then bf16: a value of the function by its own choice, a value the compressions made
    // by the choice of the value they compress.
    use rules::narrow::Codec;
    for (on, codec, method) in [
        (rewrite.compress.int8, Codec::Int8, Method::Int8),
        (rewrite.compress.bf16, Codec::Bf16, Method::Bf16),
    ] {
        let wanted = |f: &Function, v: Value| allows(compressed_root(f, v, original_nodes), method);
        if on && rules::narrow::stash(&mut func, codec, wanted).is_empty() && rewrite.only.is_none()
        {
            return Err(format!(
                "@{fname}: compress={} keeps the f32 activations the backward reads in a narrower \
                 type, and the backward of this function reads none (outputs, parameters and \
                 scalars are left alone)",
                codec.name()
            ));
        }
    }
    Ok((func, warnings))
}

/// `prev + contribution`, two cotangent terms of one value. Terms of a narrow float type
/// (`bf16`, `f16`: a GEMM operand under `--precision bf16` read by several GEMMs) are summed in
/// f32, as mixed-precision training accumulates gradients; the sum stays f32 and is rounded to
/// the value's type once, when the cotangent is read.
fn accumulate(
    t: &mut Tracer,
    prev: Value,
    contribution: Value,
) -> Result<Value, cleave_ir::tracer::TraceError> {
    use cleave_ir::DType;
    let narrow = |t: &Tracer, v: Value| matches!(t.ty(v).dtype, DType::BF16 | DType::F16);
    if !narrow(t, prev) && !narrow(t, contribution) {
        return t.add(prev, contribution);
    }
    let wide = |t: &mut Tracer, v: Value| {
        if narrow(t, v) {
            t.cast(v, DType::F32)
        } else {
            Ok(v)
        }
    };
    let (a, b) = (wide(t, prev)?, wide(t, contribution)?);
    t.add(a, b)
}

/// The cotangent `c` of `v` in `v`'s type: a narrow float's cotangent summed in f32
/// ([`accumulate`]) is rounded once, here, in `c`'s stage and the phase `phase`.
fn settle(
    t: &mut Tracer,
    c: Value,
    v: Value,
    phase: Phase,
) -> Result<Value, cleave_ir::tracer::TraceError> {
    let to = t.ty(v).dtype;
    if t.ty(c).dtype == to {
        return Ok(c);
    }
    t.set_stage(t.func().nodes[t.func().values[c].def].stage);
    t.set_phase(phase);
    t.cast(c, to)
}

/// The value of the differentiated function that `v` stands for: `v` itself when its node
/// existed before differentiation (index below `original_nodes`), else the first such value up
/// its chain of first non-constant operands (what a compression's forward nodes compress).
pub(crate) fn compressed_root(f: &Function, v: Value, original_nodes: usize) -> Value {
    let mut v = v;
    loop {
        let def = f.values[v].def;
        if def.index() < original_nodes {
            return v;
        }
        let next = f.nodes[def].operands.iter().copied().find(|&o| {
            !matches!(
                f.nodes[f.values[o].def].op,
                Op::Constant { .. } | Op::Iota { .. }
            )
        });
        match next {
            Some(o) => v = o,
            None => return v,
        }
    }
}

/// With rank-1 compression of group `group`: `(x, group)` when operand `i` of `data` (node
/// `node`) is the weight of a linear layer whose data operand `x` is a 2-D lhs with features a
/// multiple of `group` (see `rules::rank1`).
fn rank1_layer(
    t: &Tracer,
    data: &cleave_ir::NodeData,
    node: Node,
    i: usize,
    data_dep: &SecondaryMap<Value, bool>,
    group: Option<usize>,
) -> Option<(Value, usize)> {
    let group = group?;
    let Op::MatMul {
        transpose_lhs: false,
        ..
    } = data.op
    else {
        return None;
    };
    let (_, di, wi) = methods::layer_of(t.func(), node, data_dep)?;
    let x = data.operands[0];
    let shape = t.shape(x);
    (di == 0 && wi == i && shape.len() == 2 && shape[1].is_multiple_of(group) && shape[1] > group)
        .then_some((x, group))
}

fn describe_outputs(func: &Function) -> String {
    if func.outputs.is_empty() {
        return "none".into();
    }
    func.outputs
        .iter()
        .map(|o| format!("\"{}\": {}", o.name, func.ty(o.value)))
        .collect::<Vec<_>>()
        .join(", ")
}
