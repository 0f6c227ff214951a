//! `chunk{ops=lm-head,k=K}`: the output layer and its cross-entropy in `K` row chunks, exactly
//! (StreamBP, "Memory-Efficient Exact Backpropagation for Long Sequence Training").
//!
//! The pattern is the loss head of a language model or classifier:
//!
//! ```text
//! %z = matmul %h, %w {…}        : f32[N, V]     (h of rank 2: rows are positions)
//! %c = cross_entropy %z, %y     : f32[N]
//! ```
//!
//! with `%z` used by the cross-entropy alone. It becomes, for the row ranges `r_0 … r_{K-1}` of
//! `N` (sizes differing by at most one, in order):
//!
//! ```text
//! %h_k = slice %h {rows r_k}    %y_k = slice %y {rows r_k}
//! %z_k = matmul %h_k, %w {…}    %c_k = cross_entropy %z_k, %y_k
//! %c   = concat %c_0, …, %c_{K-1} {axis = 0}
//! ```
//!
//! so no `[N, V]` value exists: `autodiff` then differentiates chunk by chunk, and with the
//! chunks' logits recomputed in B (the remat planner's choice) the backward holds one chunk's
//! `[N/K, V]` at a time. The rows of each chunk are computed by the same ops as before, so the
//! loss and the input gradient are the unchunked ones; the weight gradient is a sum of `K`
//! per-chunk products, which changes its summation order (within 1e-6 relative, checked by the
//! gradient tests).
//!
//! Nothing to chunk is an error that says why (no such head; logits used elsewhere, such as a
//! `logits` output, which training steps do not need; fewer rows than chunks), never a silent
//! no-op.

use cleave_ir::{Function, Module, Node, Op, Phase, Value};

use crate::pass::{Pass, PassContext, PassError, PassOptions};

/// The `chunk` pass (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// Number of row chunks.
    pub k: usize,
}

impl Chunk {
    /// Parses `ops=lm-head` (the only pattern so far) and `k=K` (default 4).
    pub fn from_options(mut o: PassOptions) -> Result<Self, PassError> {
        let bad = |key: &str, message: String| PassError::BadOption {
            pass: "chunk".into(),
            key: key.into(),
            message,
        };
        let ops = o.take("ops").unwrap_or_else(|| "lm-head".into());
        if ops != "lm-head" {
            return Err(bad("ops", format!("`{ops}`; the ops chunk knows: lm-head")));
        }
        let k: usize = o.take_parsed("k", 4)?;
        if k < 2 {
            return Err(bad("k", format!("`{k}`: at least 2 chunks")));
        }
        o.finish()?;
        Ok(Chunk { k })
    }
}

impl Pass for Chunk {
    fn name(&self) -> &'static str {
        "chunk"
    }

    fn run(&self, module: &mut Module, _ctx: &mut PassContext) -> Result<(), PassError> {
        let mut reasons = Vec::new();
        let mut done = 0;
        for func in &mut module.functions {
            match chunk_lm_head(func, self.k) {
                Ok(n) => done += n,
                Err(why) => reasons.push(format!("@{}: {why}", func.name)),
            }
        }
        if done == 0 {
            return Err(PassError::Failed {
                pass: "chunk",
                message: format!(
                    "nothing to chunk: {}",
                    if reasons.is_empty() {
                        "the module has no functions".to_string()
                    } else {
                        reasons.join("; ")
                    }
                ),
            });
        }
        Ok(())
    }
}

/// The chunkable heads of `func`: `(matmul node, cross-entropy node)`, or why there are none.
fn heads(func: &Function, k: usize) -> Result<Vec<(Node, Node)>, String> {
    let uses = func.use_counts();
    let mut found = Vec::new();
    let mut why = None;
    for &n in &func.body {
        let d = func.node(n);
        if !matches!(d.op, Op::CrossEntropy) || d.phase != Phase::Forward {
            continue;
        }
        let z = d.operands[0];
        let m = func.values[z].def;
        let md = func.node(m);
        if !matches!(md.op, Op::MatMul { .. }) {
            why = Some(format!(
                "the cross-entropy's logits come from `{}`, not a matmul",
                md.op.name()
            ));
            continue;
        }
        let h = func.ty(md.operands[0]);
        if h.rank() != 2 {
            why = Some(format!(
                "the output layer's input is {h}; chunking needs rows of rank 2 (reshape to \
                 [positions, features] first, as exported and traced language models do)"
            ));
            continue;
        }
        if let Op::MatMul {
            transpose_lhs: true,
            ..
        } = md.op
        {
            why = Some("the output layer's matmul transposes its input".into());
            continue;
        }
        let outputs: Vec<&str> = func
            .outputs
            .iter()
            .filter(|o| o.value == z)
            .map(|o| o.name.as_str())
            .collect();
        // Uses by nodes besides the cross-entropy (`use_counts` counts outputs too).
        let extra = uses[z] as usize - 1 - outputs.len();
        if extra > 0 || !outputs.is_empty() {
            why = Some(format!(
                "the logits {} are used besides the cross-entropy ({} more use(s){}); chunking \
                 needs them used by the loss alone (a training step does not need a `logits` \
                 output: leave it out)",
                func.ty(z),
                extra,
                if outputs.is_empty() {
                    String::new()
                } else {
                    format!(", output(s) {}", outputs.join(", "))
                }
            ));
            continue;
        }
        let rows = h.shape[0];
        if rows < k {
            why = Some(format!("{rows} rows cannot make {k} chunks"));
            continue;
        }
        found.push((m, n));
    }
    if found.is_empty() {
        return Err(why.unwrap_or_else(|| "no cross_entropy of a matmul's logits".into()));
    }
    Ok(found)
}

/// Rewrites every chunkable head of `func` (see the module docs); returns how many.
fn chunk_lm_head(func: &mut Function, k: usize) -> Result<usize, String> {
    let found = heads(func, k)?;
    for &(m, c) in &found {
        let md = func.node(m).clone();
        let cd = func.node(c).clone();
        let (h, w, y) = (md.operands[0], md.operands[1], cd.operands[1]);
        let rows = func.ty(h).shape[0];
        let mut new_nodes = Vec::new();
        let mut parts = Vec::new();
        let mut start = 0;
        for i in 0..k {
            let len = rows / k + usize::from(i < rows % k);
            let hk = slice_rows(func, h, (start, start + len), &cd, &mut new_nodes)?;
            let yk = slice_rows(func, y, (start, start + len), &cd, &mut new_nodes)?;
            let zk = add(func, md.op.clone(), vec![hk, w], &md, &mut new_nodes)?;
            let ck = add(func, Op::CrossEntropy, vec![zk, yk], &cd, &mut new_nodes)?;
            parts.push(ck);
            start += len;
        }
        let joined = add(func, Op::Concat { axis: 0 }, parts, &cd, &mut new_nodes)?;
        let old = func.result(c);
        replace_uses(func, old, joined);
        // The chunks take the cross-entropy's place; the old matmul and cross-entropy go.
        let at = func
            .body
            .iter()
            .position(|&n| n == c)
            .expect("the cross-entropy is in the body");
        func.body.splice(at..at + 1, new_nodes);
        func.body.retain(|&n| n != m);
    }
    Ok(found.len())
}

/// A new node like `like` (phase and stage), typed by inference, recorded in `out`.
fn add(
    func: &mut Function,
    op: Op,
    operands: Vec<Value>,
    like: &cleave_ir::NodeData,
    out: &mut Vec<Node>,
) -> Result<Value, String> {
    let name = op.name();
    let n = func
        .create_inferred(op, operands, (like.phase, like.stage))
        .map_err(|e| format!("{name}: {e}"))?;
    out.push(n);
    Ok(func.result(n))
}

/// Rows `start..limit` of `v` (its first dimension), as a `slice` node placed like `like`.
fn slice_rows(
    func: &mut Function,
    v: Value,
    (start, limit): (usize, usize),
    like: &cleave_ir::NodeData,
    out: &mut Vec<Node>,
) -> Result<Value, String> {
    let shape = func.ty(v).shape.clone();
    let mut lo = vec![0; shape.len()];
    let mut hi = shape.to_vec();
    lo[0] = start;
    hi[0] = limit;
    let op = Op::Slice {
        start: lo,
        limit: hi,
        stride: vec![1; shape.len()],
    };
    add(func, op, vec![v], like, out)
}

/// Points every use of `old` (operands and outputs) at `new`.
fn replace_uses(func: &mut Function, old: Value, new: Value) {
    for &n in &func.body {
        for v in func.nodes[n].operands.iter_mut() {
            if *v == old {
                *v = new;
            }
        }
    }
    for o in &mut func.outputs {
        if o.value == old {
            o.value = new;
        }
    }
}
