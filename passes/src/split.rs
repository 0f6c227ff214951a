//! `split-bw`: cut a training step into per-stage forward (F), input-gradient (B) and
//! weight-gradient (W) functions with explicit, named stash sets.
//!
//! # Entry
//!
//! A verified module whose functions are training steps made by `autodiff` (forward nodes, then
//! `dgrad`/`wgrad` nodes, `grad.*` outputs), optionally stage-annotated (`stage(k)`; a node without
//! a stage belongs to stage 0; argument and constant nodes belong to whoever uses them). Optimizer,
//! offload and reload nodes are rejected: run `optimizer` on the result instead.
//!
//! # The cut, per stage `s`
//!
//! - **F_s** = the forward nodes of stage `s`.
//! - **B_s** = the backward nodes of stage `s` in the ancestor cone of the stage's *outgoing*
//!   gradients: the activation gradients (values born `dgrad`) read by backward nodes of other
//!   (earlier) stages, and the gradients of data inputs that the function returns
//!   (`grad.<input>`). This is the critical
//!   path toward the previous stage: every node of B lies on a path to an outgoing gradient.
//! - **W_s** = every other backward node of stage `s`: weight-gradient products, bias and
//!   norm-scale reductions, embedding scatter-adds, and activation gradients that only feed them
//!   (in the first stage that is every backward node: B_0 is empty). Nodes keep their order; W
//!   nodes are tagged `wgrad`, B nodes `dgrad`.
//!
//! B ∪ W is exactly the stage's backward, each node appears once, and no node is duplicated except
//! operand-free constants (`constant`, `iota`), which each function re-creates instead of receiving
//! them, and the widening of a narrow stash value that both B and W read (the `cast` of a bf16
//! value, `autodiff{compress=bf16}`; `cast(q) · broadcast(scale)` of int8 codes,
//! `compress=int8`), which W re-creates from the narrow F→W values instead of receiving the wide
//! one.
//!
//! # Interfaces (names are the contract between the functions)
//!
//! Values crossing functions are named after the value's print number `N` in the input function:
//!
//! | name | from → to |
//! |---|---|
//! | `act.N` | forward value of one stage → F (or B/W) of another stage |
//! | `stash.N` | F_s → B_s / W_s (forward values and data inputs the backward of the stage reads), and B_s → W_s (values of B, or gradients B received, that W reads) |
//! | `dgrad.N` | gradient from B (or a seed) of a later stage → B_s |
//! | `wgrad.N` | partial parameter gradient of one stage's W → another's W (tied weights across stages) |
//! | `grad.<p>` | W_s output: the gradient of parameter `p`; with `accumulate` (the default), W_s also takes an input `grad.<p>` and returns input + new, so microbatches accumulate |
//!
//! Parameters keep their names and are inputs of every function that reads them. Original
//! outputs stay under their names in the function that computes them (`loss` in the last F,
//! `grad.<input>` in B). Functions are named `@<name>.s<k>.F`, `.B`, `.W`.
//!
//! # Stash sets and memory
//!
//! - `F_to_B`: F values read by B only; freed after B.
//! - `F_to_W`: F values read by W (B may read them too); kept until W.
//! - `B_to_W`: values of B (or received by B) read by W; kept until W.
//!
//! So after F a microbatch holds `M_B = F_to_B + F_to_W` bytes, and between B and W it holds
//! `M_W = F_to_W + B_to_W` bytes: after B nothing else of the microbatch needs to stay alive.
//! [`stash_report`] computes the sets from a split module.
//!
//! # Exit
//!
//! A verified module of `3·stages` functions per input function, computing exactly the same
//! values: running every F in stage order, every B in reverse stage order and every W gives
//! bit-identical gradients to the unsplit function (the same nodes in the same order).

use std::collections::{BTreeMap, BTreeSet};

use cleave_ir::printer::print_numbering;
use cleave_ir::{Function, Module, Node, Op, Output, Phase, TensorType, Value};
use cranelift_entity::SecondaryMap;

use crate::autodiff::GRAD_PREFIX;
use crate::pass::{Pass, PassContext, PassError, PassOptions};

/// The `split-bw` pass (options `accumulate`, default true, and `batch_w=K`).
#[derive(Clone, Debug)]
pub struct SplitBw {
    /// W functions take and return gradient accumulators (`grad.<p>` in and out).
    pub accumulate: bool,
    /// Also emit, per stage, `@<name>.s<k>.W<K>`: the weight gradients of K microbatches at once
    /// (see [`batch_w`]).
    pub batch_w: Option<usize>,
}

impl SplitBw {
    /// Builds the pass from options (`accumulate`, default true).
    pub fn from_options(mut o: PassOptions) -> Result<Self, PassError> {
        let accumulate = o.take_parsed("accumulate", true)?;
        let k: usize = o.take_parsed("batch_w", 0)?;
        o.finish()?;
        Ok(SplitBw {
            accumulate,
            batch_w: (k > 1).then_some(k),
        })
    }
}

impl Pass for SplitBw {
    fn name(&self) -> &'static str {
        "split-bw"
    }

    fn run(&self, module: &mut Module, _ctx: &mut PassContext) -> Result<(), PassError> {
        let mut out = Vec::new();
        for func in &module.functions {
            let parts =
                split_function(func, self.accumulate).map_err(|message| PassError::Failed {
                    pass: "split-bw",
                    message,
                })?;
            for part in parts {
                let batched = match self.batch_w {
                    Some(k) if part.name.ends_with(".W") => {
                        Some(batch_w(&part, k).map_err(|message| PassError::Failed {
                            pass: "split-bw",
                            message,
                        })?)
                    }
                    _ => None,
                };
                out.push(part);
                out.extend(batched);
            }
        }
        module.functions = out;
        Ok(())
    }
}

/// Which of a stage's three functions a node goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Part {
    /// Forward.
    F,
    /// Input gradient (dgrad).
    B,
    /// Weight gradient (wgrad).
    W,
}

impl Part {
    fn suffix(self) -> &'static str {
        match self {
            Part::F => "F",
            Part::B => "B",
            Part::W => "W",
        }
    }
}

/// A function being assembled: the new function and the mapping of old values into it.
struct Piece {
    func: Function,
    map: SecondaryMap<Value, Option<Value>>,
    /// Input names already declared (an input may be needed by several nodes).
    inputs: BTreeMap<String, Value>,
    /// Output names already declared.
    outputs: BTreeSet<String>,
}

impl Piece {
    fn new(name: String) -> Self {
        Piece {
            func: Function::new(name),
            map: SecondaryMap::with_default(None),
            inputs: BTreeMap::new(),
            outputs: BTreeSet::new(),
        }
    }

    /// Declares (once) an input or param named `name` of type `ty` standing for old value `old`.
    fn bind_arg(&mut self, old: Value, name: &str, ty: &TensorType, param: bool, phase: Phase) {
        let v = match self.inputs.get(name) {
            Some(&v) => v,
            None => {
                let op = if param {
                    Op::Param {
                        name: name.to_string(),
                        ty: ty.clone(),
                    }
                } else {
                    Op::Input {
                        name: name.to_string(),
                        ty: ty.clone(),
                    }
                };
                let node = self.func.push_node(op, vec![], vec![ty.clone()]);
                self.func.nodes[node].phase = phase;
                let v = self.func.result(node);
                self.inputs.insert(name.to_string(), v);
                v
            }
        };
        self.map[old] = Some(v);
    }

    fn output(&mut self, name: &str, old: Value) {
        if self.outputs.insert(name.to_string()) {
            let value = self.map[old].expect("output value is mapped");
            self.func.outputs.push(Output {
                name: name.to_string(),
                value,
            });
        }
    }
}

/// Splits one training-step function (see the module docs).
pub fn split_function(func: &Function, accumulate: bool) -> Result<Vec<Function>, String> {
    let fname = &func.name;
    let numbering = print_numbering(func);
    let num = |v: Value| numbering[v].expect("value defined in the body");

    // Classify nodes.
    let mut part_of: SecondaryMap<Node, Option<(u32, Part)>> = SecondaryMap::with_default(None);
    let mut stages = BTreeSet::new();
    let is_free = |op: &Op| matches!(op, Op::Constant { .. } | Op::Iota { .. });
    for &node in &func.body {
        let data = &func.nodes[node];
        let stage = data.stage.unwrap_or(0);
        match data.phase {
            Phase::Forward | Phase::Recompute | Phase::Dgrad | Phase::Wgrad => {}
            other => {
                return Err(format!(
                    "@{fname}: node %{} = {} has phase {}; split-bw handles forward and backward nodes only (run `optimizer` after `split-bw`)",
                    num(data.results[0]),
                    data.op.name(),
                    other.name()
                ))
            }
        }
        let backward = data.phase.is_backward();
        if data.op.arg_role().is_some() && !backward {
            continue; // Bound wherever used.
        }
        if is_free(&data.op) && !backward {
            continue; // Re-created wherever used.
        }
        stages.insert(stage);
        part_of[node] = Some((stage, if backward { Part::W } else { Part::F }));
    }
    if !func.body.iter().any(|&n| func.nodes[n].phase.is_backward()) {
        return Err(format!(
            "@{fname}: no backward nodes; run `autodiff` before `split-bw`"
        ));
    }

    // Outgoing gradients of each stage: values of its backward nodes read by dgrad nodes of
    // other stages, or returned as the gradient of a data input.
    let data_input_grads: BTreeSet<String> = func
        .data_inputs()
        .map(|a| format!("{GRAD_PREFIX}{}", a.name))
        .collect();
    let mut outgoing: SecondaryMap<Value, bool> = SecondaryMap::with_default(false);
    for &node in &func.body {
        let data = &func.nodes[node];
        if !data.phase.is_backward() {
            continue;
        }
        let stage = data.stage.unwrap_or(0);
        for &v in &data.operands {
            let def = func.values[v].def;
            if let Some((s, Part::W)) = part_of[def] {
                // An activation gradient (born dgrad) leaving its stage, whoever reads it there.
                if s != stage && func.nodes[def].phase == Phase::Dgrad {
                    outgoing[v] = true;
                }
            }
        }
    }
    for o in &func.outputs {
        if data_input_grads.contains(&o.name) {
            outgoing[o.value] = true;
        }
    }
    // B = backward ancestors (within the stage) of outgoing gradients.
    let mut in_b: SecondaryMap<Value, bool> = outgoing.clone();
    for &node in func.body.iter().rev() {
        let Some((stage, Part::W)) = part_of[node] else {
            continue;
        };
        let data = &func.nodes[node];
        if data.results.iter().any(|&r| in_b[r]) {
            part_of[node] = Some((stage, Part::B));
            for &v in &data.operands {
                if part_of[func.values[v].def] == Some((stage, Part::W)) {
                    in_b[v] = true;
                }
            }
        }
    }
    // Seeds of stage mode (backward `input` nodes) are B-side inputs of their stage.
    let seed_stage = |node: Node| -> Option<u32> {
        let data = &func.nodes[node];
        (data.op.arg_role().is_some() && data.phase.is_backward()).then(|| data.stage.unwrap_or(0))
    };

    let mut pieces: BTreeMap<(u32, Part), Piece> = BTreeMap::new();
    for &s in &stages {
        for part in [Part::F, Part::B, Part::W] {
            pieces.insert(
                (s, part),
                Piece::new(format!("{fname}.s{s}.{}", part.suffix())),
            );
        }
    }

    // Where each old value becomes available: (stage, part) of its producer.
    let home = |v: Value| -> Option<(u32, Part)> { part_of[func.values[v].def] };

    // Requests: (consumer piece, old value). Resolved by declaring an input in the consumer and an
    // output in the producer (and a pass-through in B when W needs another stage's gradient).
    let name_for = |v: Value, from: (u32, Part), to: (u32, Part)| -> String {
        let n = num(v);
        match (from.1, to.1) {
            (Part::F, _) if from.0 != to.0 => format!("act.{n}"),
            (Part::F, _) => format!("stash.{n}"),
            (Part::B, Part::W) if from.0 == to.0 => format!("stash.{n}"),
            (Part::B, _) => format!("dgrad.{n}"),
            (Part::W, _) => format!("wgrad.{n}"),
        }
    };

    // Emit nodes in body order.
    let mut needs_output: Vec<((u32, Part), String, Value)> = Vec::new();
    for &node in &func.body {
        let Some(key) = part_of[node] else { continue };
        let data = &func.nodes[node];
        for &v in &data.operands {
            bind_operand(
                func,
                &mut pieces,
                key,
                v,
                &home,
                &name_for,
                &seed_stage,
                &mut needs_output,
            );
        }
        let piece = pieces.get_mut(&key).expect("piece");
        let operands: Vec<Value> = data
            .operands
            .iter()
            .map(|&v| piece.map[v].expect("operand bound"))
            .collect();
        let types = data.results.iter().map(|&r| func.ty(r).clone()).collect();
        let new = piece.func.push_node(data.op.clone(), operands, types);
        let nd = &mut piece.func.nodes[new];
        nd.phase = match key.1 {
            Part::F => data.phase,
            Part::B => Phase::Dgrad,
            Part::W => Phase::Wgrad,
        };
        nd.stage = data.stage;
        let results = nd.results.clone();
        for (&old, new) in data.results.iter().zip(results) {
            piece.map[old] = Some(new);
        }
    }

    // Original outputs.
    for o in &func.outputs {
        let v = o.value;
        let key = match home(v) {
            Some(k) => k,
            None => {
                let def = func.values[v].def;
                match seed_stage(def) {
                    Some(s) => (s, Part::B),
                    None => (*stages.iter().next().expect("a stage"), Part::F),
                }
            }
        };
        bind_operand(
            func,
            &mut pieces,
            key,
            v,
            &home,
            &name_for,
            &seed_stage,
            &mut needs_output,
        );
        let piece = pieces.get_mut(&key).expect("piece");
        let is_param_grad = o.name.starts_with(GRAD_PREFIX)
            && func
                .params()
                .any(|a| o.name[GRAD_PREFIX.len()..] == *a.name);
        if accumulate && is_param_grad {
            let ty = func.ty(v).clone();
            let acc_node = piece.func.push_node(
                Op::Input {
                    name: o.name.clone(),
                    ty: ty.clone(),
                },
                vec![],
                vec![ty.clone()],
            );
            piece.func.nodes[acc_node].phase = Phase::Wgrad;
            let acc = piece.func.result(acc_node);
            let g = piece.map[v].expect("bound");
            let sum =
                piece
                    .func
                    .push_node(Op::Binary(cleave_ir::BinaryOp::Add), vec![acc, g], vec![ty]);
            piece.func.nodes[sum].phase = Phase::Wgrad;
            piece.func.nodes[sum].stage = func.nodes[func.values[v].def].stage;
            let value = piece.func.result(sum);
            piece.outputs.insert(o.name.clone());
            piece.func.outputs.push(Output {
                name: o.name.clone(),
                value,
            });
        } else {
            piece.output(&o.name, v);
        }
    }

    // Producer-side outputs for every crossing value.
    for (key, name, v) in needs_output {
        let piece = pieces.get_mut(&key).expect("producer piece");
        piece.output(&name, v);
    }

    Ok(pieces.into_values().map(|p| p.func).collect())
}

/// Makes old value `v` available in piece `key`: binds an argument, re-creates a constant, or
/// declares an input that its producer will return.
#[allow(clippy::too_many_arguments)]
fn bind_operand(
    func: &Function,
    pieces: &mut BTreeMap<(u32, Part), Piece>,
    key: (u32, Part),
    v: Value,
    home: &dyn Fn(Value) -> Option<(u32, Part)>,
    name_for: &dyn Fn(Value, (u32, Part), (u32, Part)) -> String,
    seed_stage: &dyn Fn(Node) -> Option<u32>,
    needs_output: &mut Vec<((u32, Part), String, Value)>,
) {
    if pieces[&key].map[v].is_some() {
        return;
    }
    let def = func.values[v].def;
    let data = &func.nodes[def];
    let ty = func.ty(v);
    match home(v) {
        Some(from) if from == key => unreachable!("values of a piece are mapped when emitted"),
        Some(from) if key.1 == Part::W && from == (key.0, Part::B) && is_dequantize(func, def) => {
            // A compressed stash value widened in B: W widens it again from the F→W stash
            // instead of receiving the wide copy from B (same bits, a quarter or half the bytes).
            let mut operands = Vec::with_capacity(data.operands.len());
            for &o in &data.operands {
                let od = func.values[o].def;
                let row_scale = matches!(func.nodes[od].op, Op::Broadcast { .. })
                    && home(o) == Some(from)
                    && pieces[&key].map[o].is_none();
                // The operands' own widening cast binds through this branch; the scale of each
                // row (int8) is broadcast again here.
                let bound = if row_scale {
                    func.nodes[od].operands[0]
                } else {
                    o
                };
                bind_operand(
                    func,
                    pieces,
                    key,
                    bound,
                    home,
                    name_for,
                    seed_stage,
                    needs_output,
                );
                let piece = pieces.get_mut(&key).unwrap();
                if row_scale {
                    let s = piece.map[bound].expect("operand bound");
                    let node = piece.func.push_node(
                        func.nodes[od].op.clone(),
                        vec![s],
                        vec![func.ty(o).clone()],
                    );
                    piece.func.nodes[node].phase = Phase::Wgrad;
                    piece.func.nodes[node].stage = data.stage;
                    piece.map[o] = Some(piece.func.result(node));
                }
                operands.push(piece.map[o].expect("operand bound"));
            }
            let piece = pieces.get_mut(&key).unwrap();
            let node = piece
                .func
                .push_node(data.op.clone(), operands, vec![ty.clone()]);
            piece.func.nodes[node].phase = Phase::Wgrad;
            piece.func.nodes[node].stage = data.stage;
            piece.map[v] = Some(piece.func.result(node));
        }
        Some(from) => {
            // W reading another stage's B value goes through this stage's B (a pass-through), so
            // that W's inputs come only from its own F and B.
            if key.1 == Part::W && from.1 == Part::B && from.0 != key.0 {
                let b = (key.0, Part::B);
                bind_operand(func, pieces, b, v, home, name_for, seed_stage, needs_output);
                let name = name_for(v, b, key);
                needs_output.push((b, name.clone(), v));
                let phase = Phase::Wgrad;
                pieces
                    .get_mut(&key)
                    .unwrap()
                    .bind_arg(v, &name, ty, false, phase);
                return;
            }
            let name = name_for(v, from, key);
            needs_output.push((from, name.clone(), v));
            let phase = match key.1 {
                Part::F => Phase::Forward,
                Part::B => Phase::Dgrad,
                Part::W => Phase::Wgrad,
            };
            pieces
                .get_mut(&key)
                .unwrap()
                .bind_arg(v, &name, ty, false, phase);
        }
        None => match &data.op {
            Op::Param { name, .. } => {
                let phase = pieces[&key].func_phase(key.1);
                pieces
                    .get_mut(&key)
                    .unwrap()
                    .bind_arg(v, name, ty, true, phase);
            }
            Op::Input { name, .. } => {
                if let Some(s) = seed_stage(def) {
                    // A stage-mode seed: an input of its stage's B; other pieces receive it from there.
                    let b = (s, Part::B);
                    if key == b {
                        pieces
                            .get_mut(&key)
                            .unwrap()
                            .bind_arg(v, name, ty, false, Phase::Dgrad);
                    } else {
                        bind_operand(func, pieces, b, v, home, name_for, seed_stage, needs_output);
                        let n = name_for(v, b, key);
                        needs_output.push((b, n.clone(), v));
                        pieces
                            .get_mut(&key)
                            .unwrap()
                            .bind_arg(v, &n, ty, false, Phase::Wgrad);
                    }
                } else if key.1 == Part::F {
                    pieces
                        .get_mut(&key)
                        .unwrap()
                        .bind_arg(v, name, ty, false, Phase::Forward);
                } else {
                    // A data input read by the backward: part of the stash, returned by F.
                    let f = (key.0, Part::F);
                    bind_operand(func, pieces, f, v, home, name_for, seed_stage, needs_output);
                    let n = name_for(v, f, f);
                    needs_output.push((f, n.clone(), v));
                    let phase = pieces[&key].func_phase(key.1);
                    pieces
                        .get_mut(&key)
                        .unwrap()
                        .bind_arg(v, &n, ty, false, phase);
                }
            }
            Op::Constant { .. } | Op::Iota { .. } => {
                let piece = pieces.get_mut(&key).unwrap();
                let node = piece
                    .func
                    .push_node(data.op.clone(), vec![], vec![ty.clone()]);
                piece.func.nodes[node].phase = match key.1 {
                    Part::F => data.phase,
                    Part::B => Phase::Dgrad,
                    Part::W => Phase::Wgrad,
                };
                piece.func.nodes[node].stage = data.stage;
                let nv = piece.func.result(node);
                piece.map[v] = Some(nv);
            }
            other => unreachable!("`{}` always has a home piece", other.name()),
        },
    }
}

/// Whether `node` widens a forward value stored narrow: `split-bw` re-creates it in W rather
/// than stashing its wide result B→W. That is a `cast` to `f32` of a `bf16` or `i8` value made
/// by the forward, or (int8) the product of such a cast with a broadcast of a forward value (the
/// scale of each row).
fn is_dequantize(func: &Function, node: Node) -> bool {
    use cleave_ir::{BinaryOp, DType};
    let d = &func.nodes[node];
    let forward = |v: Value| !func.nodes[func.values[v].def].phase.is_backward();
    match d.op {
        Op::Cast { to: DType::F32 } => {
            d.operands.len() == 1
                && matches!(
                    func.ty(d.operands[0]).dtype,
                    DType::BF16 | DType::F16 | DType::I8
                )
                && forward(d.operands[0])
        }
        Op::Binary(BinaryOp::Mul) => {
            let def = |i: usize| func.values[d.operands[i]].def;
            let cast = func.ty(d.operands[0]).dtype == DType::F32
                && matches!(func.nodes[def(0)].op, Op::Cast { .. })
                && func.ty(func.nodes[def(0)].operands[0]).dtype == DType::I8
                && is_dequantize(func, def(0));
            // The scale is a forward value, or (with bf16 on as well) its own widening cast.
            let scale = matches!(func.nodes[def(1)].op, Op::Broadcast { .. }) && {
                let s = func.nodes[def(1)].operands[0];
                forward(s) || is_dequantize(func, func.values[s].def)
            };
            cast && scale
        }
        _ => false,
    }
}

impl Piece {
    fn func_phase(&self, part: Part) -> Phase {
        match part {
            Part::F => Phase::Forward,
            Part::B => Phase::Dgrad,
            Part::W => Phase::Wgrad,
        }
    }
}

/// The stash sets of one stage of a split module, in bytes (see the module docs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StashBytes {
    /// F values read by B only.
    pub f_to_b: u64,
    /// F values read by W.
    pub f_to_w: u64,
    /// B values (or gradients B received) read by W.
    pub b_to_w: u64,
}

impl StashBytes {
    /// Bytes a microbatch holds after F: `F_to_B + F_to_W`.
    pub fn m_b(&self) -> u64 {
        self.f_to_b + self.f_to_w
    }

    /// Bytes a microbatch holds between B and W: `F_to_W + B_to_W`.
    pub fn m_w(&self) -> u64 {
        self.f_to_w + self.b_to_w
    }
}

/// One stage of a split module.
#[derive(Clone, Debug)]
pub struct SplitStage<'m> {
    /// The base name of the split function.
    pub base: String,
    /// The stage number.
    pub stage: u32,
    /// Its forward function.
    pub f: &'m Function,
    /// Its input-gradient function.
    pub b: &'m Function,
    /// Its weight-gradient function.
    pub w: &'m Function,
}

/// Finds the `@<base>.s<k>.F/B/W` triples of a split module, in module order.
pub fn split_stages(module: &Module) -> Vec<SplitStage<'_>> {
    let mut out = Vec::new();
    for f in &module.functions {
        let Some(prefix) = f.name.strip_suffix(".F") else {
            continue;
        };
        let Some((base, stage)) = prefix.rsplit_once(".s") else {
            continue;
        };
        let Ok(stage) = stage.parse() else { continue };
        let (Some(b), Some(w)) = (
            module.function(&format!("{prefix}.B")),
            module.function(&format!("{prefix}.W")),
        ) else {
            continue;
        };
        out.push(SplitStage {
            base: base.to_string(),
            stage,
            f,
            b,
            w,
        });
    }
    out
}

/// The stash sets of a stage, from the names of its functions' inputs and outputs.
pub fn stash_report(stage: &SplitStage<'_>) -> StashBytes {
    let inputs = |f: &Function| -> BTreeMap<String, u64> {
        f.data_inputs()
            .filter(|a| a.name.starts_with("stash."))
            .map(|a| (a.name.to_string(), a.ty.size_bytes() as u64))
            .collect()
    };
    let outputs = |f: &Function| -> BTreeSet<String> {
        f.outputs
            .iter()
            .filter(|o| o.name.starts_with("stash."))
            .map(|o| o.name.clone())
            .collect()
    };
    let (b_in, w_in) = (inputs(stage.b), inputs(stage.w));
    let (f_out, b_out) = (outputs(stage.f), outputs(stage.b));
    let mut r = StashBytes::default();
    for name in &f_out {
        if let Some(&bytes) = w_in.get(name) {
            r.f_to_w += bytes;
        } else if let Some(&bytes) = b_in.get(name) {
            r.f_to_b += bytes;
        }
    }
    for name in &b_out {
        if let Some(&bytes) = w_in.get(name) {
            r.b_to_w += bytes;
        }
    }
    r
}

/// Builds the weight-gradient function of a stage for `k` microbatches at once (`W_K`), from its
/// one-microbatch W.
///
/// Every input of W except parameters and gradient accumulators is taken once per microbatch,
/// named `<name>@<j>`. Weight products of the form `Xᵀ·dY` (a rank-2 `matmul` with
/// `transpose_lhs`) and bias sums (`reduce_sum` over axis 0 of a rank-2 value) whose result only
/// feeds a `grad.<p>` output (directly or through its accumulation) become **one** product over
/// the microbatches concatenated along the contracted axis: `concat(X_0…X_{K−1})ᵀ·concat(dY_0…)`.
/// That is exact up to the order of summation inside the product. Every other gradient is
/// computed per microbatch and accumulated in microbatch order, exactly as `K` runs of W would.
/// Other outputs (`wgrad.N` partials for another stage) are returned per microbatch as
/// `wgrad.N@<j>`.
pub fn batch_w(w: &Function, k: usize) -> Result<Function, String> {
    if k == 0 {
        return Err("batch_w needs at least one microbatch".into());
    }
    let uses = w.use_counts();
    let output_of = |v: Value| {
        w.outputs
            .iter()
            .find(|o| o.value == v)
            .map(|o| o.name.clone())
    };
    let is_acc_input = |v: Value| matches!(&w.nodes[w.values[v].def].op, Op::Input { name, .. } if name.starts_with(GRAD_PREFIX));
    // Batchable nodes, each with the output it feeds and its accumulation node, if any.
    let mut batchable: BTreeMap<Node, (String, Option<Node>)> = BTreeMap::new();
    for &n in &w.body {
        let d = &w.nodes[n];
        let shape_ok = d.operands.iter().all(|&v| w.ty(v).rank() == 2);
        let kind_ok = match &d.op {
            Op::MatMul {
                transpose_lhs: true,
                transpose_rhs: false,
            } => true,
            Op::Reduce {
                kind: cleave_ir::ReduceKind::Sum,
                axes,
            } => axes == &[0],
            _ => false,
        };
        if !(shape_ok && kind_ok) || uses[d.results[0]] != 1 {
            continue;
        }
        let r = d.results[0];
        if let Some(name) = output_of(r).filter(|n| n.starts_with(GRAD_PREFIX)) {
            batchable.insert(n, (name, None));
            continue;
        }
        // Through an accumulation `add(acc, r)` that is itself a `grad.*` output.
        let consumer = w
            .body
            .iter()
            .copied()
            .find(|&m| w.nodes[m].operands.contains(&r));
        if let Some(m) = consumer {
            let md = &w.nodes[m];
            if md.op == Op::Binary(cleave_ir::BinaryOp::Add)
                && md.operands.len() == 2
                && is_acc_input(md.operands[0])
                && md.operands[1] == r
            {
                if let Some(name) = output_of(md.results[0]).filter(|n| n.starts_with(GRAD_PREFIX))
                {
                    batchable.insert(n, (name, Some(m)));
                }
            }
        }
    }
    let skipped: BTreeSet<Node> = batchable
        .iter()
        .flat_map(|(&n, (_, acc))| std::iter::once(n).chain(*acc))
        .collect();

    let mut out = Function::new(format!("{}{k}", w.name));
    let mut shared: SecondaryMap<Value, Option<Value>> = SecondaryMap::with_default(None);
    let mut clones: Vec<SecondaryMap<Value, Option<Value>>> = Vec::with_capacity(k);
    let copy_node = |out: &mut Function, d: &cleave_ir::NodeData, operands: Vec<Value>, op: Op| {
        let types = d.results.iter().map(|&r| w.ty(r).clone()).collect();
        let n = out.push_node(op, operands, types);
        out.nodes[n].phase = d.phase;
        out.nodes[n].stage = d.stage;
        n
    };
    // Shared arguments first: parameters and accumulators.
    for &n in &w.body {
        let d = &w.nodes[n];
        let shared_arg = matches!(d.op, Op::Param { .. })
            || is_acc_input(d.results[0]) && d.op.arg_role().is_some();
        if shared_arg {
            let nn = copy_node(&mut out, d, vec![], d.op.clone());
            shared[d.results[0]] = Some(out.result(nn));
        }
    }
    for j in 0..k {
        let mut map = shared.clone();
        for &n in &w.body {
            let d = &w.nodes[n];
            if skipped.contains(&n) || map[d.results[0]].is_some() {
                continue;
            }
            let op = match &d.op {
                Op::Input { name, ty } => Op::Input {
                    name: format!("{name}@{j}"),
                    ty: ty.clone(),
                },
                other => other.clone(),
            };
            let operands = d
                .operands
                .iter()
                .map(|&v| {
                    map[v].ok_or_else(|| {
                        format!(
                            "@{}: operand of a batched product is used elsewhere",
                            w.name
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let nn = copy_node(&mut out, d, operands, op);
            for (&old, &new) in d.results.iter().zip(&out.nodes[nn].results.clone()) {
                map[old] = Some(new);
            }
        }
        clones.push(map);
    }
    // Outputs: batched products once; everything else per microbatch, grads accumulated.
    let mut results: BTreeMap<String, Value> = BTreeMap::new();
    // One concatenation per value, shared by every product that reads it.
    let mut joined_of: BTreeMap<Value, Value> = BTreeMap::new();
    for (&n, (name, acc)) in &batchable {
        let d = &w.nodes[n];
        let mut operands = Vec::new();
        for &v in &d.operands {
            if let Some(&j) = joined_of.get(&v) {
                operands.push(j);
                continue;
            }
            let parts: Vec<Value> = clones.iter().map(|m| m[v].expect("cloned")).collect();
            let joined = if parts.len() == 1 {
                parts[0]
            } else {
                let mut shape = w.ty(v).shape.clone();
                shape[0] *= k;
                let ty = TensorType::new(w.ty(v).dtype, shape);
                let c = out.push_node(Op::Concat { axis: 0 }, parts, vec![ty]);
                out.nodes[c].phase = Phase::Wgrad;
                out.nodes[c].stage = d.stage;
                out.result(c)
            };
            joined_of.insert(v, joined);
            operands.push(joined);
        }
        let nn = copy_node(&mut out, d, operands, d.op.clone());
        let mut value = out.result(nn);
        if let Some(m) = acc {
            let md = &w.nodes[*m];
            let acc_v = shared[md.operands[0]].expect("accumulator is shared");
            let a = copy_node(&mut out, md, vec![acc_v, value], md.op.clone());
            value = out.result(a);
        }
        results.insert(name.clone(), value);
    }
    for o in &w.outputs {
        if results.contains_key(&o.name) {
            continue;
        }
        if o.name.starts_with(GRAD_PREFIX) {
            // Accumulate in microbatch order: the j-th clone's output already includes the
            // accumulator when W accumulates; chain the clones through it.
            let def = &w.nodes[w.values[o.value].def];
            let accumulates =
                def.op == Op::Binary(cleave_ir::BinaryOp::Add) && is_acc_input(def.operands[0]);
            let mut total = if accumulates {
                shared[def.operands[0]].expect("shared accumulator")
            } else {
                clones[0][o.value].expect("cloned")
            };
            let start = if accumulates { 0 } else { 1 };
            for m in clones.iter().skip(start) {
                let term = if accumulates {
                    m[def.operands[1]].expect("cloned")
                } else {
                    m[o.value].expect("cloned")
                };
                let ty = w.ty(o.value).clone();
                let a = out.push_node(
                    Op::Binary(cleave_ir::BinaryOp::Add),
                    vec![total, term],
                    vec![ty],
                );
                out.nodes[a].phase = Phase::Wgrad;
                out.nodes[a].stage = def.stage;
                total = out.result(a);
            }
            results.insert(o.name.clone(), total);
        } else {
            for (j, m) in clones.iter().enumerate() {
                results.insert(format!("{}@{j}", o.name), m[o.value].expect("cloned"));
            }
        }
    }
    for o in &w.outputs {
        let names: Vec<String> = if results.contains_key(&o.name) {
            vec![o.name.clone()]
        } else {
            (0..k).map(|j| format!("{}@{j}", o.name)).collect()
        };
        for name in names {
            let value = results[&name];
            out.outputs.push(Output { name, value });
        }
    }
    // The clones' own accumulation adds were replaced by the chain above.
    crate::simple::eliminate_dead_nodes(&mut out);
    Ok(out)
}
