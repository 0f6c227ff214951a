//! Lowering a function to a plan: classification, fusion, liveness and buffer assignment.

use std::collections::{HashMap, HashSet};

use cleave_ir::printer::print_numbering;
use cleave_ir::types::strides;
use cleave_ir::{BinaryOp, DType, Function, Literal, Node, Op, SteOp, UnaryOp, Value};

use crate::fused::{FusedKernel, Ins, Source, View};
use crate::fusion;
use crate::kernels::{conv_scratch, ConvGeo, OpKernel, PoolGeo};
use crate::plan::{ArgInfo, BufRef, Kernel, OutputInfo, Plan, Step};
use crate::CompileError;

/// Options of [`compile_with`].
#[derive(Clone, Debug)]
pub struct CompileOptions {
    /// Fuse consecutive elementwise nodes into one loop. Without fusion every node's result is
    /// stored, so [`Plan::run_checked`] names the exact node that produced a non-finite value.
    pub fuse: bool,
    /// Keep every argument's buffer intact through a run (no reuse, no in-place updates), so
    /// arguments set once serve many runs (an evaluation loop that sets only the data).
    pub preserve_args: bool,
    /// Compile fused loops to native code with Cranelift (those whose ops the JIT supports; the
    /// others stay interpreted). Off: every fused loop is interpreted.
    pub jit: bool,
    /// Which code generator compiles the fused loops when [`CompileOptions::jit`] is on.
    pub codegen: Codegen,
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions {
            fuse: true,
            preserve_args: false,
            jit: true,
            codegen: Codegen::default(),
        }
    }
}

/// The code generator of the fused loops (`--codegen`). The default is LLVM where the `llvm`
/// feature is built (it measured faster: BENCHMARKS.md), else Cranelift.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Codegen {
    /// Cranelift (`jit.rs`): needs nothing but Rust; 128-bit SIMD.
    Cranelift,
    /// LLVM through inkwell (`llvm.rs`, cargo feature `llvm`): the host's full vector width
    /// and CPU features, LLVM's optimisation pipeline.
    Llvm,
}

impl Default for Codegen {
    fn default() -> Self {
        if cfg!(feature = "llvm") {
            Codegen::Llvm
        } else {
            Codegen::Cranelift
        }
    }
}

impl Codegen {
    /// Every code generator, in `--codegen`'s order.
    pub const ALL: [Codegen; 2] = [Codegen::Cranelift, Codegen::Llvm];

    /// The name `--codegen` takes.
    pub fn name(self) -> &'static str {
        match self {
            Codegen::Cranelift => "cranelift",
            Codegen::Llvm => "llvm",
        }
    }

    /// True if this build has the code generator (LLVM needs the `llvm` feature).
    pub fn available(self) -> bool {
        match self {
            Codegen::Cranelift => true,
            Codegen::Llvm => cfg!(feature = "llvm"),
        }
    }

    /// An error naming how to get the code generator if this build lacks it.
    pub fn check_available(self) -> Result<(), CompileError> {
        if self.available() {
            return Ok(());
        }
        Err(CompileError::Codegen(format!(
            "--codegen {}: this cleave was built without the `{}` cargo feature; install LLVM 22 \
             with scripts/install-llvm.sh and rebuild with `cargo build --release --features {}`",
            self.name(),
            self.name(),
            self.name()
        )))
    }
}

impl std::fmt::Display for Codegen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Codegen {
    type Err = String;
    fn from_str(s: &str) -> Result<Codegen, String> {
        Codegen::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| format!("unknown code generator `{s}` (expected cranelift or llvm)"))
    }
}

/// Compiles with the default options.
pub fn compile(func: &Function) -> Result<Plan, CompileError> {
    compile_with(func, &CompileOptions::default())
}

/// The most nodes one fused loop takes.
const MAX_GROUP: usize = 48;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Scalar {
    F(f32),
    I(i32),
    B(bool),
}

#[derive(Clone, Debug, PartialEq)]
enum Src {
    Arg,
    Splat(Scalar),
    Pinned,
    Computed,
    InlineView,
}

fn is_ew(op: &Op) -> bool {
    matches!(
        op,
        Op::Unary(_)
            | Op::Binary(_)
            | Op::Compare(_)
            | Op::Select
            | Op::Cast { .. }
            | Op::Dropout { .. }
            | Op::Ste(SteOp::Round | SteOp::Sign)
    )
}

fn is_view(op: &Op) -> bool {
    matches!(
        op,
        Op::Broadcast { .. } | Op::Transpose { .. } | Op::Slice { .. }
    )
}

fn is_alias(op: &Op) -> bool {
    matches!(
        op,
        Op::Reshape { .. } | Op::StopGradient | Op::GradReverse { .. }
    )
}

fn split_at_axis(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (
        shape[..axis].iter().product(),
        shape[axis],
        shape[axis + 1..].iter().product(),
    )
}

fn rank4(s: &[usize]) -> [usize; 4] {
    [s[0], s[1], s[2], s[3]]
}

fn words(len: usize, dtype: DType) -> usize {
    (len * dtype.size_bytes()).div_ceil(4).max(1)
}

enum Item {
    Group(Vec<Node>),
    Single(Node),
    /// `sub(w, mul(matmul(a, b), splat lr))` with `w` a dying argument: one GEMM that updates
    /// `w` in place (`w ← w − lr·a·b`), see [`find_sgd_folds`].
    SgdFold {
        matmul: Node,
        sub: Node,
        lr: f32,
    },
}

/// SGD updates that fold into their weight-gradient GEMM: `sub` nodes computing
/// `w − mul(g, lr)` (or `mul(lr, g)`) where `g` is an unbatched f32 `matmul` read only by that
/// `mul`, the `mul` is read only by the `sub`, none of them is an output, `w` is an argument that
/// no node reads after the `sub` and that is not itself an output. Returns `sub → (matmul, mul,
/// lr)`. The GEMM then runs at the `sub`'s place with gemm's `dst = dst − lr·a·b`, so the
/// gradient is never stored. Rounding: the unfused path rounds `g`, then `lr·g`, then the
/// difference; the fold rounds the accumulated product scaled by `lr` and the sum (at most an
/// ulp or so of `w` apart).
fn find_sgd_folds(
    func: &Function,
    live_nodes: &HashSet<Node>,
    consumers: &HashMap<Value, Vec<Node>>,
    src: &HashMap<Value, Src>,
    is_output: &HashSet<Value>,
) -> HashMap<Node, (Node, Node, f32)> {
    let mut out = HashMap::new();
    let pos: HashMap<Node, usize> = func.body.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let only = |v: Value| -> Option<Node> {
        match consumers.get(&v).map(Vec::as_slice) {
            Some([c]) if !is_output.contains(&v) => Some(*c),
            _ => None,
        }
    };
    for &sub in &func.body {
        if !live_nodes.contains(&sub) {
            continue;
        }
        let sd = func.node(sub);
        if sd.op != Op::Binary(BinaryOp::Sub) || func.ty(sd.results[0]).dtype != DType::F32 {
            continue;
        }
        let (w, u) = (sd.operands[0], sd.operands[1]);
        if src.get(&w) != Some(&Src::Arg) || is_output.contains(&w) || only(u) != Some(sub) {
            continue;
        }
        let w_last = consumers
            .get(&w)
            .is_some_and(|cs| cs.iter().all(|c| *c == sub || pos[c] < pos[&sub]));
        if !w_last || consumers[&w].iter().filter(|c| **c == sub).count() != 1 {
            continue;
        }
        let mul = func.values[u].def;
        let md = func.node(mul);
        if md.op != Op::Binary(BinaryOp::Mul) {
            continue;
        }
        let splat = |v: Value| match src.get(&v) {
            Some(Src::Splat(Scalar::F(x))) => Some(*x),
            _ => None,
        };
        let (g, lr) = match (splat(md.operands[0]), splat(md.operands[1])) {
            (None, Some(lr)) => (md.operands[0], lr),
            (Some(lr), None) => (md.operands[1], lr),
            _ => continue,
        };
        if only(g) != Some(mul) {
            continue;
        }
        let mm = func.values[g].def;
        let gd = func.node(mm);
        if !matches!(gd.op, Op::MatMul { .. }) || func.ty(g).rank() != 2 || gd.results.len() != 1 {
            continue;
        }
        if func.ty(g) != func.ty(w) || gd.operands.contains(&w) {
            continue;
        }
        out.insert(sub, (mm, mul, lr));
    }
    // A folded GEMM runs at its update's place, not its own: a weight that another fold's GEMM
    // reads must not be updated in place before that GEMM has run. (Dropping a fold only moves
    // its GEMM back to its own place, before every update of what it reads, so one pass
    // suffices.)
    let late_readers: Vec<(Node, Value)> = out
        .iter()
        .flat_map(|(&sub, &(mm, _, _))| {
            func.node(mm)
                .operands
                .iter()
                .map(move |&v| (sub, v))
                .collect::<Vec<_>>()
        })
        .collect();
    out.retain(|&sub, _| {
        let w = func.node(sub).operands[0];
        !late_readers
            .iter()
            .any(|&(other, v)| other != sub && v == w && pos[&other] > pos[&sub])
    });
    out
}

/// Compiles `func` into a plan.
pub fn compile_with(func: &Function, opts: &CompileOptions) -> Result<Plan, CompileError> {
    let numbering = print_numbering(func);
    let pv = |v: Value| match numbering[v] {
        Some(n) => format!("%{n}"),
        None => format!("{v}"),
    };
    // 1. Element types.
    for &node in &func.body {
        let data = func.node(node);
        // bf16, f16 and i8 are storage types (the stashes of `--compress bf16` and `int8`, the
        // GEMM operands of `--precision bf16|f16`): made by a `cast` from f32, read by a `cast`
        // to f32, and passed through arguments and reshapes; the one op computing on bf16 or
        // f16 is a GEMM (`--precision`).
        let moves_narrow = match data.op {
            Op::Cast { to } => {
                let from = func.ty(data.operands[0]).dtype;
                from == DType::F32 || to == DType::F32 || from == to
            }
            Op::Input { .. } | Op::Reshape { .. } | Op::StopGradient => true,
            // `--precision bf16|f16`: a GEMM of bf16 (or f16) operands (widened, accumulated
            // in f32, its result rounded once).
            Op::MatMul { .. } => {
                let dt = func.ty(data.results[0]).dtype;
                matches!(dt, DType::BF16 | DType::F16)
                    && data.operands.iter().all(|&v| func.ty(v).dtype == dt)
            }
            _ => false,
        };
        for &v in data.results.iter().chain(&data.operands) {
            let dt = func.ty(v).dtype;
            let ok = match dt {
                DType::F32 | DType::I32 | DType::Bool => true,
                DType::BF16 | DType::F16 | DType::I8 => moves_narrow,
                _ => false,
            };
            if !ok {
                return Err(CompileError::UnsupportedDType {
                    op: data.op.name(),
                    value: pv(v),
                    dtype: dt,
                });
            }
        }
    }
    // 2. Roots (aliases share their operand's storage) and sources.
    let mut root: HashMap<Value, Value> = HashMap::new();
    let mut src: HashMap<Value, Src> = HashMap::new();
    let rt = |root: &HashMap<Value, Value>, v: Value| -> Result<Value, CompileError> {
        root.get(&v).copied().ok_or_else(|| {
            CompileError::Malformed(format!("{} is used before it is defined", pv(v)))
        })
    };
    for &node in &func.body {
        let data = func.node(node);
        let r0 = data.results[0];
        match &data.op {
            Op::Input { .. } | Op::Param { .. } => {
                root.insert(r0, r0);
                src.insert(r0, Src::Arg);
            }
            Op::Constant { ty, value } if value.len() == 1 => {
                let s = match value {
                    Literal::Float(v) => Scalar::F(v[0] as f32),
                    Literal::Int(v) => Scalar::I(v[0] as i32),
                    Literal::Bool(v) => Scalar::B(v[0]),
                };
                let s = match (s, ty.dtype) {
                    (Scalar::I(i), DType::F32) => Scalar::F(i as f32),
                    (Scalar::F(f), DType::I32) => Scalar::I(f as i32),
                    (s, _) => s,
                };
                root.insert(r0, r0);
                src.insert(r0, Src::Splat(s));
            }
            Op::Constant { .. } | Op::Iota { .. } => {
                root.insert(r0, r0);
                src.insert(r0, Src::Pinned);
            }
            op if is_alias(op) => {
                let r = rt(&root, data.operands[0])?;
                root.insert(r0, r);
            }
            op if is_view(op) => {
                let r = rt(&root, data.operands[0])?;
                root.insert(r0, r0);
                match src[&r] {
                    Src::Splat(s) => src.insert(r0, Src::Splat(s)),
                    _ => src.insert(r0, Src::Computed),
                };
            }
            _ => {
                for &v in &data.operands {
                    rt(&root, v)?;
                }
                for &v in &data.results {
                    root.insert(v, v);
                    src.insert(v, Src::Computed);
                }
            }
        }
    }
    let mut is_output: HashSet<Value> = HashSet::new();
    for o in &func.outputs {
        is_output.insert(rt(&root, o.value).map_err(|_| {
            CompileError::Malformed(format!("output `{}` is not computed by the body", o.name))
        })?);
    }
    // 3. Liveness of nodes (dead code is skipped) and consumers of each root.
    let mut live_roots: HashSet<Value> = is_output.clone();
    let mut live_nodes: HashSet<Node> = HashSet::new();
    for &node in func.body.iter().rev() {
        let data = func.node(node);
        if data.results.iter().any(|v| live_roots.contains(&root[v])) {
            live_nodes.insert(node);
            for &v in &data.operands {
                live_roots.insert(root[&v]);
            }
        }
    }
    let mut consumers: HashMap<Value, Vec<Node>> = HashMap::new();
    for &node in &func.body {
        let data = func.node(node);
        if live_nodes.contains(&node) && !is_alias(&data.op) {
            for &v in &data.operands {
                consumers.entry(root[&v]).or_default().push(node);
            }
        }
    }
    // 4. Views read in place by all their (elementwise) consumers.
    for &node in &func.body {
        let data = func.node(node);
        let r = data.results[0];
        if live_nodes.contains(&node) && is_view(&data.op) && src[&r] == Src::Computed {
            let cons = consumers.get(&r).map(Vec::as_slice).unwrap_or(&[]);
            if !is_output.contains(&r)
                && !cons.is_empty()
                && cons.iter().all(|&c| is_ew(&func.node(c).op))
            {
                src.insert(r, Src::InlineView);
            }
        }
    }
    // The buffer root an inline view reads.
    let underlying = |r: Value| -> Value { root[&func.node(func.values[r].def).operands[0]] };
    // 5. Kernels: fusion groups and their order (`fusion.rs`).
    let folds = if opts.fuse && !opts.preserve_args {
        find_sgd_folds(func, &live_nodes, &consumers, &src, &is_output)
    } else {
        HashMap::new()
    };
    let folded: HashSet<Node> = folds.values().flat_map(|&(mm, mul, _)| [mm, mul]).collect();
    // The storage root a read of `v` depends on: an inline view's underlying buffer.
    let read_root = |v: Value| -> Value {
        let r = root[&v];
        if src[&r] == Src::InlineView {
            underlying(r)
        } else {
            r
        }
    };
    let mut cands: Vec<fusion::Cand> = Vec::new();
    let mut cand_items: Vec<Item> = Vec::new();
    let mut producer: HashMap<Value, usize> = HashMap::new();
    let mut readers: HashMap<Value, Vec<usize>> = HashMap::new();
    for (pos, &node) in func.body.iter().enumerate() {
        let data = func.node(node);
        if !live_nodes.contains(&node) || folded.contains(&node) {
            continue;
        }
        let r0 = data.results[0];
        let fusible = is_ew(&data.op) || (is_view(&data.op) && src[&r0] == Src::Computed);
        let (reads, item, fusible_n, avoid): (Vec<Value>, Item, Option<usize>, Vec<Value>) =
            if let Some(&(matmul, _, lr)) = folds.get(&node) {
                let w = data.operands[0];
                let reads = func.node(matmul).operands.iter().copied().chain([w]);
                let item = Item::SgdFold {
                    matmul,
                    sub: node,
                    lr,
                };
                (reads.collect(), item, None, Vec::new())
            } else if fusible {
                let avoid = if is_view(&data.op) {
                    vec![root[&data.operands[0]]]
                } else {
                    data.operands
                        .iter()
                        .map(|v| root[v])
                        .filter(|r| src[r] == Src::InlineView)
                        .map(underlying)
                        .collect()
                };
                let n = func.ty(r0).num_elements();
                (
                    data.operands.clone(),
                    Item::Group(vec![node]),
                    Some(n),
                    avoid,
                )
            } else if matches!(src.get(&r0), Some(Src::Computed)) && !is_alias(&data.op) {
                (data.operands.clone(), Item::Single(node), None, Vec::new())
            } else {
                continue;
            };
        let idx = cands.len();
        let mut deps: Vec<usize> = reads
            .iter()
            .filter_map(|&v| producer.get(&read_root(v)).copied())
            .collect();
        if let Item::SgdFold { .. } = item {
            // The update overwrites the weight: every other reader of it runs first.
            deps.extend(readers.get(&root[&data.operands[0]]).into_iter().flatten());
        }
        deps.sort_unstable();
        deps.dedup();
        for &v in &reads {
            readers.entry(read_root(v)).or_default().push(idx);
        }
        for &v in &data.results {
            producer.insert(root[&v], idx);
        }
        cands.push(fusion::Cand {
            pos,
            fusible: fusible_n,
            deps,
            result: fusible_n.map(|_| r0),
            avoid,
        });
        cand_items.push(item);
    }
    let items: Vec<Item> = fusion::kernels(&cands, opts.fuse, MAX_GROUP)
        .into_iter()
        .map(|members| match &cand_items[members[0]] {
            Item::Group(_) => Item::Group(
                members
                    .iter()
                    .map(|&c| match &cand_items[c] {
                        Item::Group(n) => n[0],
                        _ => unreachable!("groups hold elementwise nodes only"),
                    })
                    .collect(),
            ),
            Item::Single(n) => Item::Single(*n),
            Item::SgdFold { matmul, sub, lr } => Item::SgdFold {
                matmul: *matmul,
                sub: *sub,
                lr: *lr,
            },
        })
        .collect();

    // 6. Per kernel: roots read through buffers (with in-place eligibility) and roots written.
    struct Pre {
        reads: Vec<(Value, bool)>,
        writes: Vec<Value>,
    }
    let mut pinned_needed: HashSet<Value> = HashSet::new();
    let mut stored: HashSet<Value> = HashSet::new();
    let mut pres: Vec<Pre> = Vec::new();
    for item in &items {
        let mut reads: Vec<(Value, bool)> = Vec::new();
        let mut writes = Vec::new();
        match item {
            Item::Group(members) => {
                let mset: HashSet<Node> = members.iter().copied().collect();
                let computed: HashSet<Value> =
                    members.iter().map(|&m| func.node(m).results[0]).collect();
                for &m in members {
                    let data = func.node(m);
                    if is_view(&data.op) {
                        reads.push((root[&data.operands[0]], false));
                    } else {
                        for &v in &data.operands {
                            let r = root[&v];
                            if computed.contains(&r) {
                                continue;
                            }
                            match src[&r] {
                                Src::Splat(_) => {}
                                Src::InlineView => reads.push((underlying(r), false)),
                                _ => reads.push((r, true)),
                            }
                        }
                    }
                    let r = data.results[0];
                    let outside = consumers
                        .get(&r)
                        .is_some_and(|c| c.iter().any(|n| !mset.contains(n)));
                    if is_output.contains(&r) || outside {
                        stored.insert(r);
                        writes.push(r);
                    }
                }
            }
            Item::Single(node) => {
                let data = func.node(*node);
                for &v in &data.operands {
                    let r = root[&v];
                    if let Src::Splat(_) = src[&r] {
                        pinned_needed.insert(r);
                    }
                    reads.push((r, false));
                }
                writes.extend(data.results.iter().copied());
            }
            Item::SgdFold { matmul, sub, .. } => {
                for &v in &func.node(*matmul).operands {
                    let r = root[&v];
                    if let Src::Splat(_) = src[&r] {
                        pinned_needed.insert(r);
                    }
                    reads.push((r, false));
                }
                // The weight: its buffer becomes the result's (see step 7).
                reads.push((func.node(*sub).operands[0], false));
                writes.push(func.node(*sub).results[0]);
            }
        }
        pres.push(Pre { reads, writes });
    }
    // A root read contiguously and through a view in one kernel cannot be overwritten in place.
    for p in &mut pres {
        let viewed: HashSet<Value> = p.reads.iter().filter(|r| !r.1).map(|r| r.0).collect();
        for r in &mut p.reads {
            if viewed.contains(&r.0) {
                r.1 = false;
            }
        }
    }
    for r in &is_output {
        if let Src::Splat(_) = src[r] {
            pinned_needed.insert(*r);
        }
    }
    // 7. Liveness and buffer assignment.
    let is_pinned = |r: &Value| matches!(src[r], Src::Pinned | Src::Splat(_));
    let mut last_use: HashMap<Value, usize> = HashMap::new();
    for (k, p) in pres.iter().enumerate() {
        for &(r, _) in &p.reads {
            last_use.insert(r, k);
        }
    }
    for r in &is_output {
        last_use.insert(*r, usize::MAX);
    }
    if opts.preserve_args {
        for a in func.args() {
            last_use.insert(a.value, usize::MAX);
        }
    }
    let mut caps: Vec<usize> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut buf_of: HashMap<Value, usize> = HashMap::new();
    let ty_words = |r: Value| {
        let t = func.ty(r);
        words(t.num_elements(), t.dtype)
    };
    let mut arg_values: HashSet<Value> = HashSet::new();
    for a in func.args() {
        caps.push(ty_words(a.value));
        buf_of.insert(a.value, caps.len() - 1);
        arg_values.insert(a.value);
    }
    for (k, p) in pres.iter().enumerate() {
        let mut dying: Vec<(Value, bool)> = Vec::new();
        for &(r, ok) in &p.reads {
            if !is_pinned(&r) && last_use.get(&r) == Some(&k) {
                match dying.iter_mut().find(|d| d.0 == r) {
                    Some(d) => d.1 &= ok,
                    None => dying.push((r, ok)),
                }
            }
        }
        let mut taken: HashSet<Value> = HashSet::new();
        let is_group = matches!(items[k], Item::Group(_));
        if let Item::SgdFold { sub, .. } = items[k] {
            // The update is written into the weight, which dies here (checked by the fold).
            let w = func.node(sub).operands[0];
            taken.insert(w);
            buf_of.insert(p.writes[0], buf_of[&w]);
        }
        for &w in &p.writes {
            if buf_of.contains_key(&w) {
                continue;
            }
            let need = ty_words(w);
            let esize = func.ty(w).dtype.size_bytes();
            let inplace = if is_group {
                let fits = |(c, ok): &&(Value, bool)| {
                    *ok && !taken.contains(c)
                        && func.ty(*c).dtype.size_bytes() == esize
                        && caps[buf_of[c]] >= need
                };
                // An argument's buffer first: a training step's parameter update then lands in
                // the parameter's own buffer, so `Plan::carry` has nothing to copy.
                dying
                    .iter()
                    .filter(fits)
                    .find(|(c, _)| arg_values.contains(c))
                    .or_else(|| dying.iter().find(fits))
            } else {
                None
            };
            let id = if let Some(&(c, _)) = inplace {
                taken.insert(c);
                buf_of[&c]
            } else if let Some(pos) = free
                .iter()
                .enumerate()
                .filter(|(_, &b)| caps[b] >= need)
                .min_by_key(|(_, &b)| caps[b])
                .map(|(i, _)| i)
            {
                free.swap_remove(pos)
            } else {
                caps.push(need);
                caps.len() - 1
            };
            buf_of.insert(w, id);
        }
        for (r, _) in &dying {
            if !taken.contains(r) {
                free.push(buf_of[r]);
            }
        }
        for &w in &p.writes {
            if !last_use.contains_key(&w) {
                free.push(buf_of[&w]);
            }
        }
    }
    let planned_bytes: usize = caps.iter().sum::<usize>() * 4;
    let mut bufs: Vec<Vec<f32>> = caps.iter().map(|&c| vec![0.0f32; c]).collect();
    // Pinned constants, filled once.
    let mut pinned_bytes = 0;
    for &node in &func.body {
        let data = func.node(node);
        let r = data.results[0];
        let wanted = match src.get(&r) {
            Some(Src::Pinned) => live_roots.contains(&r),
            Some(Src::Splat(_)) => pinned_needed.contains(&r),
            _ => false,
        };
        if !wanted || buf_of.contains_key(&r) {
            continue;
        }
        let ty = func.ty(r);
        let n = ty.num_elements();
        let mut store = vec![0.0f32; words(n, ty.dtype)];
        {
            let put = |store: &mut Vec<f32>, i: usize, s: Scalar| match s {
                Scalar::F(x) => store[i] = x,
                Scalar::I(x) => store[i] = f32::from_bits(x as u32),
                Scalar::B(x) => {
                    let bytes: &mut [u8] = bytemuck_bytes(store);
                    bytes[i] = x as u8;
                }
            };
            match (&data.op, &src[&r]) {
                (_, Src::Splat(s)) => (0..n).for_each(|i| put(&mut store, i, *s)),
                (Op::Constant { value, .. }, _) => {
                    for i in 0..n {
                        let s = match value {
                            Literal::Float(v) if ty.dtype == DType::I32 => Scalar::I(v[i] as i32),
                            Literal::Float(v) => Scalar::F(v[i] as f32),
                            Literal::Int(v) if ty.dtype == DType::F32 => Scalar::F(v[i] as f32),
                            Literal::Int(v) => Scalar::I(v[i] as i32),
                            Literal::Bool(v) => Scalar::B(v[i]),
                        };
                        put(&mut store, i, s);
                    }
                }
                (Op::Iota { dim, .. }, _) => {
                    let st = strides(&ty.shape);
                    for i in 0..n {
                        let k = (i / st[*dim]) % ty.shape[*dim];
                        let s = if ty.dtype == DType::F32 {
                            Scalar::F(k as f32)
                        } else {
                            Scalar::I(k as i32)
                        };
                        put(&mut store, i, s);
                    }
                }
                _ => unreachable!("pinned values are constants, iotas and splats"),
            }
        }
        pinned_bytes += store.len() * 4;
        bufs.push(store);
        buf_of.insert(r, bufs.len() - 1);
    }
    let bref = |r: Value| -> BufRef {
        let t = func.ty(r);
        BufRef {
            id: buf_of[&r],
            len: t.num_elements(),
            dtype: t.dtype,
        }
    };
    // 8. Kernels.
    let mut steps = Vec::new();
    for item in &items {
        match item {
            Item::Group(members) => {
                let last = *members.last().expect("groups are not empty");
                let n = func.ty(func.node(last).results[0]).num_elements();
                let mut b = ProgBuilder::default();
                let mut store_info = Vec::new();
                for &m in members {
                    let data = func.node(m);
                    let r = data.results[0];
                    let dt = func.ty(r).dtype;
                    let dst = if is_view(&data.op) {
                        let u = root[&data.operands[0]];
                        let view = view_of(func, m);
                        let dst = b.fresh(dt);
                        b.loads.push(Ins::Load {
                            dtype: dt,
                            dst,
                            src: Source {
                                buf: bref(u),
                                view: (!view.is_contiguous()).then_some(view),
                            },
                        });
                        dst
                    } else {
                        let mut ops = Vec::new();
                        for &v in &data.operands {
                            let r = root[&v];
                            let reg = if let Some(&reg) = b.reg_of.get(&r) {
                                reg
                            } else {
                                let dtv = func.ty(r).dtype;
                                let dst = b.fresh(dtv);
                                let ins = match src[&r] {
                                    Src::Splat(Scalar::F(x)) => Ins::SplatF { dst, v: x },
                                    Src::Splat(Scalar::I(x)) => Ins::SplatI { dst, v: x },
                                    Src::Splat(Scalar::B(x)) => Ins::SplatB { dst, v: x },
                                    Src::InlineView => {
                                        let def = func.values[r].def;
                                        let view = view_of(func, def);
                                        Ins::Load {
                                            dtype: dtv,
                                            dst,
                                            src: Source {
                                                buf: bref(underlying(r)),
                                                view: (!view.is_contiguous()).then_some(view),
                                            },
                                        }
                                    }
                                    _ => Ins::Load {
                                        dtype: dtv,
                                        dst,
                                        src: Source {
                                            buf: bref(r),
                                            view: None,
                                        },
                                    },
                                };
                                b.loads.push(ins);
                                b.reg_of.insert(r, dst);
                                dst
                            };
                            ops.push(reg);
                        }
                        let dst = b.fresh(dt);
                        let in_dt = func.ty(data.operands[0]).dtype;
                        let ins = match &data.op {
                            Op::Unary(UnaryOp::Not) => Ins::NotB { dst, a: ops[0] },
                            // Straight-through estimators compute their forward function.
                            Op::Ste(SteOp::Round) => Ins::UnF {
                                op: UnaryOp::Round,
                                dst,
                                a: ops[0],
                            },
                            Op::Ste(SteOp::Sign) => Ins::UnF {
                                op: UnaryOp::Sign,
                                dst,
                                a: ops[0],
                            },
                            Op::Unary(u) if in_dt == DType::F32 => Ins::UnF {
                                op: *u,
                                dst,
                                a: ops[0],
                            },
                            Op::Unary(u) => Ins::UnI {
                                op: *u,
                                dst,
                                a: ops[0],
                            },
                            Op::Binary(o) => match in_dt {
                                DType::F32 => Ins::BinF {
                                    op: *o,
                                    dst,
                                    a: ops[0],
                                    b: ops[1],
                                },
                                DType::I32 => Ins::BinI {
                                    op: *o,
                                    dst,
                                    a: ops[0],
                                    b: ops[1],
                                },
                                _ => Ins::BinB {
                                    op: *o,
                                    dst,
                                    a: ops[0],
                                    b: ops[1],
                                },
                            },
                            Op::Compare(c) => Ins::Cmp {
                                dtype: in_dt,
                                op: *c,
                                dst,
                                a: ops[0],
                                b: ops[1],
                            },
                            Op::Select => Ins::Sel {
                                dtype: dt,
                                dst,
                                c: ops[0],
                                a: ops[1],
                                b: ops[2],
                            },
                            Op::Cast { to } => Ins::Cast {
                                from: in_dt,
                                to: *to,
                                dst,
                                a: ops[0],
                            },
                            Op::Dropout { rate, seed } => Ins::Dropout {
                                dst,
                                a: ops[0],
                                rate: *rate,
                                seed: *seed,
                                scale: (1.0 / (1.0 - rate)) as f32,
                            },
                            other => unreachable!("`{}` is not elementwise", other.name()),
                        };
                        b.ops.push(ins);
                        dst
                    };
                    b.reg_of.insert(r, dst);
                    if stored.contains(&r) {
                        b.stores.push(Ins::Store {
                            dtype: dt,
                            src: dst,
                            buf: bref(r),
                        });
                        store_info.push((data.op.name(), pv(r), bref(r)));
                    }
                }
                let mut prog = b.loads;
                prog.extend(b.ops);
                prog.extend(b.stores);
                steps.push(Step {
                    kernel: Kernel::Fused(FusedKernel {
                        n,
                        split_from: crate::fused::split_from(&prog),
                        prog,
                        nf: b.nf,
                        ni: b.ni,
                        nb: b.nb,
                        jit: None,
                        vector_math: false,
                    }),
                    op: func.node(last).op.name(),
                    value: pv(func.node(last).results[0]),
                    stores: store_info,
                });
            }
            Item::SgdFold { matmul, sub, lr } => {
                let data = func.node(*matmul);
                let ins: Vec<BufRef> = data.operands.iter().map(|v| bref(root[v])).collect();
                let r = func.node(*sub).results[0];
                let mut kernel = single_kernel(func, *matmul, &ins, &[bref(r)]);
                if let OpKernel::MatMul { update, .. } = &mut kernel {
                    *update = Some(-*lr);
                }
                steps.push(Step {
                    kernel: Kernel::Op(kernel),
                    op: "sub",
                    value: pv(r),
                    stores: vec![("sub", pv(r), bref(r))],
                });
            }
            Item::Single(node) => {
                let data = func.node(*node);
                let ins: Vec<BufRef> = data.operands.iter().map(|v| bref(root[v])).collect();
                let outs: Vec<BufRef> = data.results.iter().map(|&v| bref(v)).collect();
                let kernel = single_kernel(func, *node, &ins, &outs);
                steps.push(Step {
                    kernel: Kernel::Op(kernel),
                    op: data.op.name(),
                    value: data
                        .results
                        .iter()
                        .map(|&v| pv(v))
                        .collect::<Vec<_>>()
                        .join(", "),
                    stores: data
                        .results
                        .iter()
                        .map(|&v| (data.op.name(), pv(v), bref(v)))
                        .collect(),
                });
            }
        }
    }
    let fused = steps.iter_mut().filter_map(|s| match &mut s.kernel {
        Kernel::Fused(k) => Some(k),
        Kernel::Op(_) => None,
    });
    let mut jit_code = None;
    #[cfg(feature = "llvm")]
    let mut llvm_code = None;
    match (opts.jit, opts.codegen) {
        (false, _) => {}
        (true, Codegen::Cranelift) => jit_code = crate::jit::compile_all(fused),
        #[cfg(feature = "llvm")]
        (true, Codegen::Llvm) => {
            llvm_code = crate::llvm::compile_all(fused).map_err(CompileError::Codegen)?
        }
        #[cfg(not(feature = "llvm"))]
        (true, c @ Codegen::Llvm) => {
            drop(fused);
            c.check_available()?
        }
    }
    let args = func
        .args()
        .map(|a| ArgInfo {
            name: a.name.to_string(),
            role: a.role,
            ty: a.ty.clone(),
            buf: bref(a.value),
        })
        .collect();
    let outputs = func
        .outputs
        .iter()
        .map(|o| OutputInfo {
            name: o.name.clone(),
            ty: func.ty(o.value).clone(),
            buf: bref(root[&o.value]),
        })
        .collect();
    let mut plan = Plan::new(bufs, steps, args, outputs, planned_bytes, pinned_bytes);
    plan.jit_code = jit_code;
    #[cfg(feature = "llvm")]
    {
        plan.llvm_code = llvm_code;
    }
    plan.codegen = opts.jit.then_some(opts.codegen);
    Ok(plan)
}

fn bytemuck_bytes(v: &mut [f32]) -> &mut [u8] {
    // SAFETY: f32 has no invalid bit patterns and u8 has alignment 1.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, v.len() * 4) }
}

#[derive(Default)]
struct ProgBuilder {
    loads: Vec<Ins>,
    ops: Vec<Ins>,
    stores: Vec<Ins>,
    reg_of: HashMap<Value, usize>,
    nf: usize,
    ni: usize,
    nb: usize,
}

impl ProgBuilder {
    fn fresh(&mut self, dt: DType) -> usize {
        let c = match dt {
            // bf16 and i8 values are held widened, in f32 registers.
            DType::F32 | DType::BF16 | DType::F16 | DType::I8 => &mut self.nf,
            DType::I32 => &mut self.ni,
            _ => &mut self.nb,
        };
        *c += 1;
        *c - 1
    }
}

/// The strided view a broadcast, transpose or slice node reads its operand through.
fn view_of(func: &Function, node: Node) -> View {
    let data = func.node(node);
    let in_shape = &func.ty(data.operands[0]).shape;
    let out_shape = &func.ty(data.results[0]).shape;
    let sst = strides(in_shape);
    match &data.op {
        Op::Broadcast { shape, dims } => {
            let mut st = vec![0; shape.len()];
            for (i, &d) in dims.iter().enumerate() {
                if in_shape[i] != 1 {
                    st[d] = sst[i];
                }
            }
            View::new(shape, &st, 0)
        }
        Op::Transpose { perm } => {
            let st: Vec<usize> = perm.iter().map(|&p| sst[p]).collect();
            View::new(out_shape, &st, 0)
        }
        Op::Slice { start, stride, .. } => {
            let offset = start.iter().zip(&sst).map(|(a, b)| a * b).sum();
            let st: Vec<usize> = stride.iter().zip(&sst).map(|(a, b)| a * b).collect();
            View::new(out_shape, &st, offset)
        }
        other => unreachable!("`{}` is not a view", other.name()),
    }
}

fn single_kernel(func: &Function, node: Node, ins: &[BufRef], outs: &[BufRef]) -> OpKernel {
    let data = func.node(node);
    let shape = |i: usize| func.ty(data.operands[i]).shape.clone();
    let oshape = func.ty(data.results[0]).shape.clone();
    let out = outs[0];
    match &data.op {
        Op::MatMul {
            transpose_lhs,
            transpose_rhs,
        } => {
            let a = shape(0);
            let r = a.len();
            let batch = a[..r - 2].iter().product();
            let (m, n) = (oshape[r - 2], oshape[r - 1]);
            let k = if *transpose_lhs { a[r - 2] } else { a[r - 1] };
            OpKernel::MatMul {
                a: ins[0],
                b: ins[1],
                out,
                batch,
                mkn: (m, k, n),
                tl: *transpose_lhs,
                tr: *transpose_rhs,
                update: None,
            }
        }
        Op::Conv2d {
            stride,
            padding,
            dilation,
            groups,
        } => {
            let geo = ConvGeo {
                x: rank4(&shape(0)),
                w: rank4(&shape(1)),
                out: [oshape[2], oshape[3]],
                stride: *stride,
                padding: *padding,
                dilation: *dilation,
                groups: *groups,
            };
            OpKernel::Conv2d {
                x: ins[0],
                w: ins[1],
                out,
                cols: conv_scratch(&geo),
                geo,
            }
        }
        Op::Conv2dGradInput {
            stride,
            padding,
            dilation,
            groups,
            shape: s,
        } => {
            let dy = shape(0);
            let geo = ConvGeo {
                x: rank4(s),
                w: rank4(&shape(1)),
                out: [dy[2], dy[3]],
                stride: *stride,
                padding: *padding,
                dilation: *dilation,
                groups: *groups,
            };
            OpKernel::Conv2dGradInput {
                dy: ins[0],
                w: ins[1],
                out,
                cols: conv_scratch(&geo),
                geo,
            }
        }
        Op::Conv2dGradWeight {
            stride,
            padding,
            dilation,
            groups,
            shape: s,
        } => {
            let dy = shape(1);
            let geo = ConvGeo {
                x: rank4(&shape(0)),
                w: rank4(s),
                out: [dy[2], dy[3]],
                stride: *stride,
                padding: *padding,
                dilation: *dilation,
                groups: *groups,
            };
            OpKernel::Conv2dGradWeight {
                x: ins[0],
                dy: ins[1],
                out,
                cols: conv_scratch(&geo),
                geo,
            }
        }
        Op::Pool2d {
            kind,
            window,
            stride,
            padding,
            count_include_pad,
        } => OpKernel::Pool {
            x: ins[0],
            out,
            kind: *kind,
            geo: PoolGeo {
                x: rank4(&shape(0)),
                out: [oshape[2], oshape[3]],
                window: *window,
                stride: *stride,
                padding: *padding,
            },
            count_include_pad: *count_include_pad,
        },
        Op::MaxPool2dGrad {
            window,
            stride,
            padding,
        } => {
            let dy = shape(1);
            OpKernel::MaxPoolGrad {
                x: ins[0],
                dy: ins[1],
                out,
                geo: PoolGeo {
                    x: rank4(&shape(0)),
                    out: [dy[2], dy[3]],
                    window: *window,
                    stride: *stride,
                    padding: *padding,
                },
            }
        }
        Op::AvgPool2dGrad {
            window,
            stride,
            padding,
            count_include_pad,
            shape: s,
        } => {
            let dy = shape(0);
            OpKernel::AvgPoolGrad {
                dy: ins[0],
                out,
                geo: PoolGeo {
                    x: rank4(s),
                    out: [dy[2], dy[3]],
                    window: *window,
                    stride: *stride,
                    padding: *padding,
                },
                count_include_pad: *count_include_pad,
            }
        }
        Op::Reduce { kind, axes } => OpKernel::Reduce {
            x: ins[0],
            out,
            kind: *kind,
            shape: shape(0),
            axes: axes.clone(),
            out_strides: crate::kernels::reduce_out_strides(&shape(0), axes),
            acc: Vec::new(),
        },
        Op::Softmax { axis } | Op::LogSoftmax { axis } => OpKernel::Softmax {
            x: ins[0],
            out,
            dims: split_at_axis(&shape(0), *axis),
            log: matches!(data.op, Op::LogSoftmax { .. }),
        },
        Op::LayerNorm { eps } | Op::RmsNorm { eps } => OpKernel::Norm {
            x: ins[0],
            out,
            n: *shape(0).last().expect("rank >= 1"),
            eps: *eps,
            layer: matches!(data.op, Op::LayerNorm { .. }),
        },
        Op::CrossEntropy => OpKernel::CrossEntropy {
            logits: ins[0],
            labels: ins[1],
            out,
            c: *shape(0).last().expect("rank >= 1"),
        },
        Op::Gather { axis } => OpKernel::Gather {
            table: ins[0],
            idx: ins[1],
            out,
            dims: split_at_axis(&shape(0), *axis),
        },
        Op::ScatterAdd { axis } => OpKernel::ScatterAdd {
            base: ins[0],
            idx: ins[1],
            upd: ins[2],
            out,
            dims: split_at_axis(&shape(0), *axis),
        },
        Op::Concat { axis } => {
            let inner: usize = oshape[axis + 1..].iter().product();
            OpKernel::Concat {
                ins: ins.to_vec(),
                out,
                outer: oshape[..*axis].iter().product(),
                chunks: (0..ins.len()).map(|i| shape(i)[*axis] * inner).collect(),
            }
        }
        Op::Split { axis, sizes } => {
            let s = shape(0);
            let inner: usize = s[axis + 1..].iter().product();
            OpKernel::Split {
                x: ins[0],
                outs: outs.to_vec(),
                outer: s[..*axis].iter().product(),
                chunks: sizes.iter().map(|&k| k * inner).collect(),
            }
        }
        Op::Pad { low, value, .. } => OpKernel::Pad {
            x: ins[0],
            out,
            in_shape: shape(0),
            out_shape: oshape,
            low: low.clone(),
            value: *value,
        },
        Op::OneHot { depth, .. } => OpKernel::OneHot {
            idx: ins[0],
            out,
            depth: *depth,
        },
        Op::Ste(SteOp::ArgmaxOneHot { axis }) => OpKernel::ArgmaxOneHot {
            x: ins[0],
            out,
            dims: split_at_axis(&shape(0), *axis),
        },
        other => unreachable!("`{}` is not a single kernel", other.name()),
    }
}
