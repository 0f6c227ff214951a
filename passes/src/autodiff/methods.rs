//! Gradient methods: rewrites of the backward graph beyond exact backprop.
//!
//! `autodiff{method=…}` (the CLI's `--grad-method`) picks how the `grad.<param>` outputs are
//! computed. Every method keeps the interface of backprop — the same arguments and a
//! `grad.<param>` output for every float parameter — so the optimizer pass, `split-bw`, the
//! runtime and `cleave train` work unchanged. All need loss mode (a scalar `loss`).
//!
//! - **`bp`** (default): exact reverse mode.
//! - **`forward-gradient`** (Baydin et al., "Gradients without Backpropagation"): for each of
//!   `tangents=K` (default 1) random tangents `v` (standard normal, one tensor per parameter),
//!   one forward-mode pass computes the directional derivative `∇f·v`; the estimate is
//!   `(1/K)·Σ (∇f·v)·v`, unbiased because `E[v vᵀ] = I`. There is no backward pass: the primal
//!   and tangent computations are phase `forward`, in the stage of the node they differentiate,
//!   and only the estimate `(∇f·v)·v` of each parameter is phase `wgrad`, in the earliest stage
//!   that reads the parameter. On a pipeline that W waits for the directional derivative from
//!   the last stage's forward (sent like DFA's output error) and keeps the parameter's tangents
//!   from F until then, which is the method's whole stash. The tangents are data inputs named
//!   `fg.tangent.<k>.<param>`; `cleave train` draws them from a normal distribution seeded by
//!   `--seed` and the step (so runs are deterministic; every microbatch of a step gets the same
//!   tangents, so a pipelined step estimates along the same direction as the whole batch),
//!   `cleave bench` draws them once.
//! - **`fa`** (feedback alignment, Lillicrap et al.): a *layer* is a `matmul` or `conv2d` with one
//!   data-dependent operand and one weight operand (computed from parameters and constants only).
//!   The data gradient of a layer is computed with a fixed random matrix of the weight's shape in
//!   place of the weight; weight gradients are unchanged.
//! - **`dfa`** (direct feedback alignment, Nøkland): the output error `e` (the cotangent of the
//!   last layer's result) is sent to the data input of every layer through that layer's own fixed
//!   random matrix `B` (`e·B`, `B: [C, D]`), and no gradient flows through any layer into its
//!   input. Each layer's backward therefore needs `e` only, never a later layer's backward.
//! - **`local{blocks=K}`**: the layers are cut into `K` contiguous blocks of about equal count
//!   (on a function partitioned into pipeline stages the blocks are the stages, and `K` is not
//!   used). Every edge from a node of a later block into a value computed in an earlier block is
//!   cut (residual paths included), so no gradient flows from block `b` back into block `b−1`.
//!   Every float value that leaves block `b−1` gets an auxiliary head — a linear classifier with
//!   parameters `local.head<b>.weight: [D, C]` and `local.head<b>.bias: [C]` (`local.head<b>_<j>.*`
//!   when several values leave the block) applied per position, or to the flattened example when
//!   the logits are `[B, C]`, with the model's cross-entropy labels — and a loss output
//!   `local.loss<b>` seeded like the main loss. Backprop runs inside each block.
//!
//! # Where the random matrices live
//!
//! FA and DFA matrices are `constant` nodes of the training step (phase `dgrad`), drawn from a
//! normal distribution with a SplitMix64 generator seeded by the pass option `seed` (default 0)
//! and the name of the weight (FA) or the layer index (DFA). They are not parameters: the
//! optimizer never sees them and checkpoints do not store them; rebuilding the step with the same
//! seed gives the same matrices bit for bit. The auxiliary heads of `local` *are* parameters
//! (trained, initialised by name like any weight, stored in checkpoints).

use std::collections::HashMap;

use cleave_ir::tracer::{TraceError, Tracer};
use cleave_ir::{ArgRole, Function, Literal, Node, NodeData, Op, Phase, TensorType, Value};
use cranelift_entity::SecondaryMap;

use crate::schedule::simulate::BackwardDependency;

use super::{differentiate_with, Mode, Rewrite, GRAD_PREFIX};

/// A gradient method (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum GradMethod {
    /// Exact reverse mode.
    #[default]
    Bp,
    /// Forward gradient with `tangents` random tangents.
    ForwardGradient {
        /// Tangents averaged per step.
        tangents: usize,
    },
    /// Feedback alignment.
    Fa,
    /// Direct feedback alignment.
    Dfa,
    /// Block-local learning with auxiliary heads.
    Local {
        /// Number of blocks.
        blocks: usize,
    },
}

impl GradMethod {
    /// The method's name: `bp`, `forward-gradient`, `fa`, `dfa`, `local`.
    pub fn name(&self) -> &'static str {
        match self {
            GradMethod::Bp => "bp",
            GradMethod::ForwardGradient { .. } => "forward-gradient",
            GradMethod::Fa => "fa",
            GradMethod::Dfa => "dfa",
            GradMethod::Local { .. } => "local",
        }
    }

    /// The options of the `autodiff` pass that select this method, e.g. `method=local,blocks=2`
    /// (empty for `bp`).
    pub fn pass_options(&self) -> String {
        match self {
            GradMethod::Bp => String::new(),
            GradMethod::ForwardGradient { tangents } => {
                format!("method=forward-gradient,tangents={tangents}")
            }
            GradMethod::Fa => "method=fa".into(),
            GradMethod::Dfa => "method=dfa".into(),
            GradMethod::Local { blocks } => format!("method=local,blocks={blocks}"),
        }
    }

    /// The `autodiff` pass with this method, as pipeline text.
    pub fn autodiff_pass(&self) -> String {
        match self {
            GradMethod::Bp => "autodiff".into(),
            m => format!("autodiff{{{}}}", m.pass_options()),
        }
    }

    /// Whether the backward of a pipeline stage waits for the backward of the next stage
    /// (`bp`, `fa`); `dfa` needs only the last stage's output error, `forward-gradient` only the
    /// last stage's directional derivative (both computed by the last stage's forward), `local`
    /// nothing at all.
    pub fn stage_dependency(&self) -> BackwardDependency {
        match self {
            GradMethod::Bp | GradMethod::Fa => BackwardDependency::NextStage,
            GradMethod::Dfa | GradMethod::ForwardGradient { .. } => {
                BackwardDependency::LastStageForward
            }
            GradMethod::Local { .. } => BackwardDependency::None,
        }
    }

    /// Parses the CLI form: `bp`, `forward-gradient`, `fa`, `dfa`, `local`, `local{blocks=K}`;
    /// `tangents` is forward-gradient's tangent count.
    pub fn parse(text: &str, tangents: usize) -> Result<GradMethod, String> {
        let (name, opts) = match text.split_once('{') {
            Some((n, rest)) => {
                let Some(inner) = rest.strip_suffix('}') else {
                    return Err(format!("`{text}`: missing `}}`"));
                };
                (n.trim(), Some(inner))
            }
            None => (text.trim(), None),
        };
        let mut blocks = 2usize;
        if let Some(inner) = opts {
            for kv in inner.split(',').filter(|s| !s.trim().is_empty()) {
                match kv.split_once('=').map(|(k, v)| (k.trim(), v.trim())) {
                    Some(("blocks", v)) if name == "local" => {
                        blocks = v
                            .parse()
                            .map_err(|_| format!("`{text}`: blocks must be a count, got `{v}`"))?;
                    }
                    _ if name == "local" => {
                        return Err(format!(
                            "`{text}`: unknown option `{kv}`; `local` takes `blocks=K`"
                        ))
                    }
                    _ => {
                        return Err(format!(
                            "`{text}`: unknown option `{kv}`; only `local` takes an option (`blocks=K`)"
                        ))
                    }
                }
            }
        }
        GradMethod::from_parts(name, tangents, blocks)
    }

    fn from_parts(name: &str, tangents: usize, blocks: usize) -> Result<GradMethod, String> {
        let m = match name {
            "bp" => GradMethod::Bp,
            "forward-gradient" => {
                if tangents == 0 {
                    return Err("forward-gradient needs at least one tangent".into());
                }
                GradMethod::ForwardGradient { tangents }
            }
            "fa" => GradMethod::Fa,
            "dfa" => GradMethod::Dfa,
            "local" => {
                if blocks < 2 {
                    return Err(format!(
                        "local{{blocks={blocks}}}: local learning needs at least 2 blocks"
                    ));
                }
                GradMethod::Local { blocks }
            }
            _ => {
                return Err(format!(
                    "unknown gradient method `{name}`; methods are bp, forward-gradient, fa, dfa, local{{blocks=K}}"
                ))
            }
        };
        Ok(m)
    }

    /// Builds the method from `autodiff` pass options (`method`, `tangents`, `blocks`).
    pub fn from_pass_options(
        method: Option<&str>,
        tangents: usize,
        blocks: usize,
    ) -> Result<GradMethod, String> {
        GradMethod::from_parts(method.unwrap_or("bp"), tangents, blocks)
    }
}

impl std::fmt::Display for GradMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GradMethod::Local { blocks } => write!(f, "local{{blocks={blocks}}}"),
            GradMethod::ForwardGradient { tangents } if *tangents != 1 => {
                write!(f, "forward-gradient (tangents={tangents})")
            }
            m => f.write_str(m.name()),
        }
    }
}

/// The prefix of forward-gradient tangent inputs: `fg.tangent.<k>.<param>`.
pub const FG_TANGENT_PREFIX: &str = "fg.tangent.";

/// How layers send the error to their data operand (see the module docs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Feedback {
    /// Through the transposed weights (backprop).
    #[default]
    Backprop,
    /// Through fixed random matrices of the weights' shapes.
    Fa {
        /// Seed of the random matrices.
        seed: u64,
    },
    /// The output error through one fixed random matrix per layer.
    Dfa {
        /// Seed of the random matrices.
        seed: u64,
    },
}

/// A layer: `(node, data operand index, weight operand index)`.
pub(crate) type Layer = (Node, usize, usize);

/// Whether `node` is a layer: a `matmul` or `conv2d` with exactly one data-dependent operand.
pub(crate) fn layer_of(
    func: &Function,
    node: Node,
    data_dep: &SecondaryMap<Value, bool>,
) -> Option<Layer> {
    let data = &func.nodes[node];
    if !matches!(data.op, Op::MatMul { .. } | Op::Conv2d { .. }) {
        return None;
    }
    match (data_dep[data.operands[0]], data_dep[data.operands[1]]) {
        (true, false) => Some((node, 0, 1)),
        (false, true) => Some((node, 1, 0)),
        _ => None,
    }
}

/// The per-function state of the feedback rewrite, used by the emission loop of
/// [`differentiate_with`](super::differentiate_with).
pub(crate) struct FeedbackState {
    feedback: Feedback,
    /// FA: the random stand-in of each weight value.
    fa_cache: HashMap<Value, Value>,
    /// DFA: every layer on the loss's backward path, and the output layer (the last one).
    layers: Vec<Layer>,
    output_layer: Option<Node>,
    data_dep: SecondaryMap<Value, bool>,
}

impl FeedbackState {
    /// `active_nodes` in reverse body order, as the emission loop visits them.
    pub(crate) fn new(
        feedback: &Feedback,
        func: &Function,
        data_dep: &SecondaryMap<Value, bool>,
        active_nodes: &[Node],
    ) -> FeedbackState {
        let layers: Vec<Layer> = if matches!(feedback, Feedback::Dfa { .. }) {
            active_nodes
                .iter()
                .filter_map(|&n| layer_of(func, n, data_dep))
                .collect()
        } else {
            Vec::new()
        };
        FeedbackState {
            feedback: feedback.clone(),
            fa_cache: HashMap::new(),
            output_layer: layers.first().map(|l| l.0),
            layers,
            data_dep: data_dep.clone(),
        }
    }

    /// DFA: no gradient flows through a layer into its data operand.
    pub(crate) fn cuts(&self, node: Node, i: usize) -> bool {
        self.layers.iter().any(|&(n, d, _)| n == node && d == i)
    }

    /// FA: the node with its weight operand replaced by a fixed random matrix, when operand `i`
    /// is a layer's data operand.
    pub(crate) fn substitute(
        &mut self,
        t: &mut Tracer,
        node: &NodeData,
        i: usize,
    ) -> Result<Option<NodeData>, TraceError> {
        let Feedback::Fa { seed } = self.feedback else {
            return Ok(None);
        };
        if !matches!(node.op, Op::MatMul { .. } | Op::Conv2d { .. }) {
            return Ok(None);
        }
        let w_idx = 1 - i;
        let (x, w) = (node.operands[i], node.operands[w_idx]);
        if !self.data_dep[x] || self.data_dep[w] {
            return Ok(None);
        }
        let b = match self.fa_cache.get(&w) {
            Some(&b) => b,
            None => {
                let ty = t.ty(w).clone();
                let fan_in = match node.op {
                    Op::Conv2d { .. } => ty.num_elements() / ty.shape[0].max(1),
                    _ => ty.shape[ty.rank() - 2],
                };
                let key = weight_key(t.func(), w);
                let b = random_constant(t, &ty, seed, &key, 1.0 / (fan_in.max(1) as f64).sqrt())?;
                self.fa_cache.insert(w, b);
                b
            }
        };
        let mut fed = node.clone();
        fed.operands[w_idx] = b;
        Ok(Some(fed))
    }

    /// DFA: when `node` is the output layer, the error `e` (its result's cotangent) sent to every
    /// layer's data operand through that layer's random matrix: `(operand, e·Bₗ)` pairs.
    pub(crate) fn inject(
        &mut self,
        t: &mut Tracer,
        node: Node,
        cots: &[Option<Value>],
        wants: &dyn Fn(Value) -> bool,
    ) -> Result<Vec<(Value, Value)>, TraceError> {
        let Feedback::Dfa { seed } = self.feedback else {
            return Ok(Vec::new());
        };
        if self.output_layer != Some(node) {
            return Ok(Vec::new());
        }
        let Some(e) = cots[0] else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for (k, &(layer, d, _)) in self.layers.iter().enumerate() {
            let x = t.func().nodes[layer].operands[d];
            if !self.data_dep[x] || !t.ty(x).dtype.is_float() || !wants(x) {
                continue;
            }
            // The projection lives with the layer's input, so the only value crossing stages
            // is the output error itself.
            let stage = t.func().nodes[t.func().values[x].def].stage;
            t.set_stage(stage);
            t.set_phase(Phase::Dgrad);
            let c = project_error(t, e, x, seed, &format!("dfa.{}", self.layers.len() - 1 - k))?;
            out.push((x, c));
        }
        Ok(out)
    }
}

/// `e·B` reshaped like `x`, with `B` a fixed random matrix: per position when `e` and `x` share
/// every dimension but the last, per example (flattened) when they share only the first.
fn project_error(
    t: &mut Tracer,
    e: Value,
    x: Value,
    seed: u64,
    key: &str,
) -> Result<Value, TraceError> {
    let (es, xs) = (t.shape(e).to_vec(), t.shape(x).to_vec());
    let dtype = t.ty(x).dtype;
    let (n, c, d) =
        if es.len() == xs.len() && es.len() >= 2 && es[..es.len() - 1] == xs[..xs.len() - 1] {
            let n: usize = es[..es.len() - 1].iter().product();
            (n, es[es.len() - 1], xs[xs.len() - 1])
        } else if !es.is_empty() && !xs.is_empty() && es[0] == xs[0] {
            (es[0], es[1..].iter().product(), xs[1..].iter().product())
        } else {
            return Err(t.error(
                "matmul",
                &[e, x],
                "dfa: the output error and this layer's input share no batch dimension".into(),
            ));
        };
    let b = random_constant(
        t,
        &TensorType::new(dtype, vec![c, d]),
        seed,
        key,
        1.0 / (c.max(1) as f64).sqrt(),
    )?;
    let e2 = if es == [n, c] {
        e
    } else {
        t.reshape(e, vec![n, c])?
    };
    let y = t.matmul(e2, b)?;
    if xs == [n, d] {
        Ok(y)
    } else {
        t.reshape(y, xs)
    }
}

/// A stable name for a weight value: its parameter's name, or `%<value>` of an expression.
fn weight_key(func: &Function, w: Value) -> String {
    match &func.nodes[func.values[w].def].op {
        Op::Param { name, .. } => name.clone(),
        Op::Transpose { .. } | Op::Reshape { .. } | Op::Cast { .. } => {
            let inner = func.nodes[func.values[w].def].operands[0];
            format!("{}'", weight_key(func, inner))
        }
        _ => format!("%{}", w.as_u32()),
    }
}

/// A SplitMix64 stream (the same generator as parameter initialisation).
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator seeded by `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// A standard normal sample (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let u2 = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// FNV-1a of a name, to derive a per-matrix seed.
pub fn name_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A constant of type `ty` with normal entries of standard deviation `std`, seeded by `seed` and
/// `key`.
fn random_constant(
    t: &mut Tracer,
    ty: &TensorType,
    seed: u64,
    key: &str,
    std: f64,
) -> Result<Value, TraceError> {
    let mut rng = SplitMix64::new(seed ^ name_hash(key));
    let values = (0..ty.num_elements())
        .map(|_| (rng.normal() * std) as f32 as f64)
        .collect();
    t.constant(ty.clone(), Literal::Float(values))
}

/// The data-dependence analysis of [`differentiate_with`](super::differentiate_with).
fn data_dependence(func: &Function) -> SecondaryMap<Value, bool> {
    let mut data_dep: SecondaryMap<Value, bool> = SecondaryMap::with_default(false);
    for &node in &func.body {
        let data = &func.nodes[node];
        let is_data =
            matches!(data.op, Op::Input { .. }) || data.operands.iter().any(|&v| data_dep[v]);
        for &r in &data.results {
            data_dep[r] = is_data;
        }
    }
    data_dep
}

/// Differentiates `func` with `method` (loss mode only for methods other than `bp`).
pub fn differentiate_method(
    func: Function,
    mode: Mode,
    wrt: &[String],
    method: &GradMethod,
    (seed, compress, only): (u64, super::Compress, Option<&super::Selection>),
) -> Result<(Function, Vec<String>), String> {
    let fname = func.name.clone();
    if let (false, GradMethod::ForwardGradient { .. }) = (compress.is_none(), method) {
        return Err(format!(
            "@{fname}: {} compresses what the backward stashes; a forward gradient has no \
             backward",
            compress.pass_options()
        ));
    }
    if *method != GradMethod::Bp {
        let has_loss = func.outputs.iter().any(|o| {
            let t = func.ty(o.value);
            o.name == "loss" && t.rank() == 0 && t.dtype.is_float()
        });
        if mode == Mode::Stage || !has_loss {
            return Err(format!(
                "@{fname}: method {} needs a scalar float output named `loss` (loss mode)",
                method.name()
            ));
        }
        if !wrt.is_empty() {
            return Err(format!(
                "@{fname}: method {} computes parameter gradients only; `wrt` is for bp",
                method.name()
            ));
        }
    }
    match method {
        GradMethod::Bp => differentiate_with(
            func,
            mode,
            wrt,
            &Rewrite {
                compress,
                only: only.cloned(),
                ..Rewrite::default()
            },
        ),
        GradMethod::Fa => differentiate_with(
            func,
            Mode::Loss,
            wrt,
            &Rewrite {
                feedback: Feedback::Fa { seed },
                compress,
                only: only.cloned(),
                ..Rewrite::default()
            },
        ),
        GradMethod::Dfa => differentiate_with(
            func,
            Mode::Loss,
            wrt,
            &Rewrite {
                feedback: Feedback::Dfa { seed },
                compress,
                only: only.cloned(),
                ..Rewrite::default()
            },
        ),
        GradMethod::Local { blocks } => {
            let (func, rewrite, mut warnings) =
                local_heads(func, *blocks).map_err(|e| format!("@{fname}: {e}"))?;
            let rewrite = Rewrite {
                compress,
                only: only.cloned(),
                ..rewrite
            };
            let (f, w) = differentiate_with(func, Mode::Loss, wrt, &rewrite)?;
            warnings = warnings
                .into_iter()
                .map(|w| format!("@{fname}: {w}"))
                .chain(w)
                .collect();
            Ok((f, warnings))
        }
        GradMethod::ForwardGradient { tangents } => forward_gradient(func, *tangents),
    }
}

/// Adds the auxiliary heads and losses of `local{blocks=K}` to a forward function; returns it
/// with the seeds and cuts for [`differentiate_with`].
#[allow(clippy::type_complexity)]
fn local_heads(
    mut func: Function,
    blocks: usize,
) -> Result<(Function, Rewrite, Vec<String>), String> {
    let data_dep = data_dependence(&func);
    let layers: Vec<Layer> = func
        .body
        .iter()
        .filter_map(|&n| layer_of(&func, n, &data_dep))
        .collect();
    let staged = func.body.iter().any(|&n| func.nodes[n].stage.is_some());
    // The block of every node.
    let mut block: SecondaryMap<Node, usize> = SecondaryMap::with_default(0);
    if staged {
        // A partitioned function: the blocks are its pipeline stages.
        for &n in &func.body {
            block[n] = func.nodes[n].stage.unwrap_or(0) as usize;
        }
    } else {
        if layers.len() < blocks {
            return Err(format!(
                "local{{blocks={blocks}}} needs at least {blocks} layers (matmul or conv2d with a weight), the function has {}",
                layers.len()
            ));
        }
        // The first layer of each block after the first.
        let starts: Vec<Layer> = (1..blocks)
            .map(|b| layers[b * layers.len() / blocks])
            .collect();
        let mut b = 0usize;
        for &n in &func.body {
            if b < starts.len() && starts[b].0 == n {
                b += 1;
            }
            block[n] = b;
        }
    }
    // A parameter-only value (a transposed or broadcast weight) computed in an earlier block
    // than all its consumers moves to the first of them, so that its weight's gradient stays in
    // the block that uses it instead of being cut off.
    let mut consumers: SecondaryMap<Node, Vec<Node>> = SecondaryMap::new();
    for &n in &func.body {
        for &v in &func.nodes[n].operands {
            consumers[func.values[v].def].push(n);
        }
    }
    for &n in func.body.clone().iter().rev() {
        let d = &func.nodes[n];
        if d.op.arg_role().is_some() || d.results.iter().any(|&r| data_dep[r]) {
            continue;
        }
        if let Some(first) = consumers[n].iter().map(|&c| block[c]).min() {
            if first > block[n] {
                block[n] = first;
                if staged {
                    func.nodes[n].stage = Some(first as u32);
                }
            }
        }
    }
    // Every edge from a later block into an earlier one is cut, so no gradient crosses blocks
    // (residual paths included).
    let mut cuts = Vec::new();
    let mut crossing: Vec<Value> = Vec::new();
    for &n in &func.body {
        for (i, &v) in func.nodes[n].operands.iter().enumerate() {
            let def = func.values[v].def;
            if func.nodes[def].op.arg_role().is_none() && block[def] < block[n] {
                cuts.push((n, i));
                if data_dep[v] && func.ty(v).dtype.is_float() && !crossing.contains(&v) {
                    crossing.push(v);
                }
            }
        }
    }
    // Heads in the order their values are defined.
    let position: HashMap<Node, usize> =
        func.body.iter().enumerate().map(|(k, &n)| (n, k)).collect();
    crossing.sort_by_key(|&v| position[&func.values[v].def]);
    let block_of_value: Vec<usize> = crossing
        .iter()
        .map(|&v| block[func.values[v].def])
        .collect();
    let Some(ce) = func
        .body
        .iter()
        .map(|&n| &func.nodes[n])
        .find(|d| matches!(d.op, Op::CrossEntropy))
    else {
        return Err(
            "local learning trains each block against a cross_entropy loss through an auxiliary head; the function has no cross_entropy".into(),
        );
    };
    let (logits, labels) = (ce.operands[0], ce.operands[1]);
    let lshape = func.ty(logits).shape.clone();
    let c = *lshape.last().expect("cross_entropy logits have rank ≥ 1");
    let mut t = Tracer::from_function(func);
    let mut rewrite = Rewrite {
        cuts,
        ..Rewrite::default()
    };
    let mut warnings = Vec::new();
    for (k, &x) in crossing.iter().enumerate() {
        // Heads are numbered by the block they end (1-based), with `_<j>` when a block sends
        // several values on.
        let b = block_of_value[k] + 1;
        let same: Vec<usize> = (0..crossing.len())
            .filter(|&q| block_of_value[q] == block_of_value[k])
            .collect();
        let name = if same.len() == 1 {
            format!("{b}")
        } else {
            format!("{b}_{}", same.iter().position(|&q| q == k).unwrap_or(0))
        };
        let stage = t.func().nodes[t.func().values[x].def].stage;
        t.set_stage(stage);
        t.set_phase(Phase::Forward);
        let xs = t.shape(x).to_vec();
        let dtype = t.ty(x).dtype;
        let lead = &lshape[..lshape.len() - 1];
        let n_lead: usize = lead.iter().product();
        let (n, dim) = if !xs.is_empty() && xs[..xs.len() - 1].iter().product::<usize>() == n_lead {
            // Per position: the logits' leading dimensions hold as many positions as `x`'s.
            (n_lead, xs[xs.len() - 1])
        } else if lshape.len() == 2 && xs.first() == lshape.first() {
            (xs[0], xs[1..].iter().product())
        } else {
            warnings.push(format!(
                "local: %{} (shape {xs:?}) leaves block {} but no linear head maps it to the logits' shape {lshape:?}; the nodes computing it get no local gradient",
                x.as_u32(),
                b - 1
            ));
            continue;
        };
        let e = |e: TraceError| e.to_string();
        let w = t
            .param(&format!("local.head{name}.weight"), dtype, vec![dim, c])
            .map_err(e)?;
        let bias = t
            .param(&format!("local.head{name}.bias"), dtype, vec![c])
            .map_err(e)?;
        let x2 = if xs == [n, dim] {
            x
        } else {
            t.reshape(x, vec![n, dim]).map_err(e)?
        };
        let z = t.matmul(x2, w).map_err(e)?;
        let bb = t.broadcast(bias, vec![n, c], vec![1]).map_err(e)?;
        let z = t.add(z, bb).map_err(e)?;
        let z = if lshape == [n, c] {
            z
        } else {
            t.reshape(z, lshape.clone()).map_err(e)?
        };
        let labels_here = value_in_stage(&mut t, labels, stage).map_err(e)?;
        let l = t.cross_entropy(z, labels_here).map_err(e)?;
        let l = t.mean_all(l).map_err(e)?;
        t.output(&format!("local.loss{name}"), l).map_err(e)?;
        rewrite.extra_seeds.push(l);
    }
    Ok((t.finish(), rewrite, warnings))
}

/// `v`, or a copy of the nodes computing it (from arguments) in `stage` when `v` is computed in a
/// later stage than `stage` (the labels of an auxiliary head in an early pipeline stage).
fn value_in_stage(t: &mut Tracer, v: Value, stage: Option<u32>) -> Result<Value, TraceError> {
    let def = t.func().values[v].def;
    let data = t.func().nodes[def].clone();
    let later = match (data.stage, stage) {
        (Some(a), Some(b)) => a > b,
        (Some(_), None) => true,
        _ => false,
    };
    if data.op.arg_role().is_some() || !later {
        return Ok(v);
    }
    let mut operands = Vec::with_capacity(data.operands.len());
    for &o in &data.operands {
        operands.push(value_in_stage(t, o, stage)?);
    }
    let k = data.results.iter().position(|&r| r == v).unwrap_or(0);
    let saved = (t.stage(), t.phase());
    t.set_stage(stage);
    let out = t.push_op(data.op.clone(), &operands)?[k];
    t.set_stage(saved.0);
    t.set_phase(saved.1);
    Ok(out)
}

/// The forward-gradient estimate (see the module docs).
fn forward_gradient(func: Function, k: usize) -> Result<(Function, Vec<String>), String> {
    let fname = func.name.clone();
    let mut warnings = Vec::new();
    let loss = func.output("loss").expect("checked by the caller");
    let params: Vec<(Value, String)> = func
        .args()
        .filter(|a| a.role == ArgRole::Param && a.ty.dtype.is_float())
        .map(|a| (a.value, a.name.to_string()))
        .collect();
    let mut t = Tracer::from_function(func);
    let err = |e: TraceError| format!("@{fname}: {e}");
    let mut acc: Vec<Option<Value>> = vec![None; params.len()];
    let body = t.func().body.clone();
    // The stage that owns a parameter's gradient: the earliest stage that reads it (its tangent
    // enters the forward there). `None` on an unpartitioned function.
    let mut owner: HashMap<Value, Option<u32>> = HashMap::new();
    for &n in &body {
        let data = &t.func().nodes[n];
        for o in &data.operands {
            if params.iter().any(|(v, _)| v == o) {
                let e = owner.entry(*o).or_insert(data.stage);
                *e = match (*e, data.stage) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
        }
    }
    for j in 0..k {
        let prefix = format!("{FG_TANGENT_PREFIX}{j}.");
        t.set_phase(Phase::Forward);
        let tan = crate::jvp::tangents_of(&mut t, &body, &params, &prefix)
            .map_err(|e| format!("@{fname}: {e}"))?;
        let Some(dd) = tan[loss] else {
            warnings.push(format!(
                "@{fname}: the loss does not depend on any parameter; every gradient is zero"
            ));
            break;
        };
        // The estimate `dd·v` waits for the directional derivative, which the last stage's
        // forward computes: weight-gradient work of the parameter's stage.
        t.set_phase(Phase::Wgrad);
        for (p, (v, _)) in params.iter().enumerate() {
            let vp = tan[*v].expect("tangent inputs of every parameter");
            t.set_stage(owner.get(v).copied().flatten());
            let shape = t.shape(*v).to_vec();
            let b = t.broadcast(dd, shape, vec![]).map_err(err)?;
            let c = t.mul(b, vp).map_err(err)?;
            acc[p] = Some(match acc[p] {
                None => c,
                Some(prev) => t.add(prev, c).map_err(err)?,
            });
        }
    }
    t.set_phase(Phase::Wgrad);
    for (p, (v, name)) in params.iter().enumerate() {
        let ty = t.ty(*v).clone();
        t.set_stage(owner.get(v).copied().flatten());
        let g = match acc[p] {
            Some(g) if k == 1 => g,
            Some(g) => {
                let s = t
                    .constant(ty.clone(), Literal::Float(vec![1.0 / k as f64]))
                    .map_err(err)?;
                t.mul(g, s).map_err(err)?
            }
            None => t.constant(ty, Literal::Float(vec![0.0])).map_err(err)?,
        };
        t.output(&format!("{GRAD_PREFIX}{name}"), g).map_err(err)?;
    }
    Ok((t.finish(), warnings))
}

/// Gives every `autodiff` pass of a textual pipeline the stash compression `compress`
/// (`compress=…` with its parameters; the CLI's `--compress`); unchanged for none.
pub fn with_compress(pipeline: &str, compress: super::Compress) -> Result<String, String> {
    with_compress_only(pipeline, compress, None)
}

/// [`with_compress`] restricted to `only` (the planner's per-value choice; `None`: everywhere).
pub fn with_compress_only(
    pipeline: &str,
    compress: super::Compress,
    only: Option<&super::Selection>,
) -> Result<String, String> {
    if compress.is_none() {
        return Ok(pipeline.to_string());
    }
    let mut options = compress.pass_options();
    if let Some(sel) = only {
        options = format!("{options},only={}", sel.text());
    }
    with_autodiff_options(pipeline, &options, &options, |_| None)
}

/// Gives every `autodiff` pass of a textual pipeline the options of `method` (the CLI's
/// `--grad-method` on `cleave opt` and `cleave inspect`). An `autodiff` that already names a
/// `method` is an error when it differs.
pub fn with_grad_method(pipeline: &str, method: &GradMethod) -> Result<String, String> {
    with_autodiff_options(
        pipeline,
        &format!("the method {method}"),
        &method.pass_options(),
        |e| {
            e.options
                .values
                .get("method")
                .filter(|m| *m != method.name())
                .map(|_| format!("the pipeline's `{e}` conflicts with --grad-method {method}"))
        },
    )
}

/// Sets `options` (`key=value,…`) on every `autodiff` pass of a textual pipeline (`what` names
/// them in the error when there is none); `conflict` may refuse an entry with a message.
fn with_autodiff_options(
    pipeline: &str,
    what: &str,
    options: &str,
    conflict: impl Fn(&crate::pipeline::PipelineEntry) -> Option<String>,
) -> Result<String, String> {
    let mut entries = crate::pipeline::parse_pipeline(pipeline).map_err(|e| e.to_string())?;
    if !entries.iter().any(|e| e.name == "autodiff") {
        return Err(format!(
            "the pipeline `{pipeline}` has no `autodiff` pass to give {what}"
        ));
    }
    for e in entries.iter_mut().filter(|e| e.name == "autodiff") {
        if let Some(message) = conflict(e) {
            return Err(message);
        }
        for kv in options.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').expect("pass options are key=value");
            e.options.values.insert(k.into(), v.into());
        }
    }
    Ok(entries
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(","))
}
