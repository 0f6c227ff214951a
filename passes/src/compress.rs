//! Stash compression as a planner choice, per value (issue 17): what each named method
//! (`--compress fewbit,rank1,bf16`) would do to each saved value, priced in bytes and seconds
//! ([`candidates`]), and the choice of which to apply under a memory limit together with
//! recomputation and offload ([`choose`]).
//!
//! # Candidates
//!
//! The forward function (stage-annotated, before `autodiff`) is differentiated once exactly and
//! once per named method, each applied everywhere it can. A value the exact backward reads is a
//! candidate for a method when that method's forward made nodes compressing it (their chain of
//! operands leads back to the value). Its bytes are those of the values the backward then reads
//! in its place (the compressed forms, and the value itself if something else still reads it);
//! its seconds are the profile's estimate for those forward nodes and for the backward nodes that
//! read the compressed forms (widening casts, level selects, sub-token reconstruction). The few
//! FLOPs a rewrite removes (few-bit's exact derivative) are not credited.
//!
//! # The choice ([`choose`])
//!
//! A greedy search over the candidates in order of bytes saved per added second:
//!
//! 1. The exact step is planned first; if it meets the limit with nothing added (no
//!    recomputation, no exposed transfer), it is the plan: lossy methods are never used for
//!    nothing.
//! 2. Otherwise the prefix of every candidate is planned; the shortest feasible prefix is found by
//!    bisection, and the prefixes from there (`k_f`, `k_f + 1`, `k_f + 2`, `k_f + 4`, …, all)
//!    are planned; the plan with the least objective wins, the exact step included, fewer
//!    compressions on ties. The callers' objective is the simulated step under the profile (the
//!    joint search's makespan, or a named schedule's plan simulated): recomputation, exposed
//!    transfers and the compressions' own nodes are all in the stages' F/B/W seconds.
//!
//! Each step is a real plan of the step differentiated with the selection (`autodiff{only=…}`),
//! so bytes and times in the result are measured on the rewritten functions, not on the
//! estimates that ordered the search.

use std::collections::HashMap;

use cleave_ir::printer::print_numbering;
use cleave_ir::{Function, Phase, Value};
use cranelift_entity::EntityRef;

use crate::autodiff::methods::{differentiate_method, GradMethod};
use crate::autodiff::{Compress, Method, Mode, Selection};
use crate::partition::DeviceProfile;
use crate::remat::forward_seconds;

/// One method applied to one saved value.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    /// The value's print number in the forward function (`%N`).
    pub value: u32,
    /// The stage that makes the value.
    pub stage: u32,
    /// The method.
    pub method: Method,
    /// Bytes the exact backward keeps of the value (per microbatch).
    pub bytes_exact: u64,
    /// Bytes kept in their place with the method.
    pub bytes: u64,
    /// Estimated seconds the method adds per microbatch (its forward and backward nodes).
    pub added_seconds: f64,
}

impl Candidate {
    /// Bytes saved per microbatch.
    pub fn saved(&self) -> u64 {
        self.bytes_exact.saturating_sub(self.bytes)
    }

    /// The report's JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "value": format!("%{}", self.value),
            "stage": self.stage,
            "method": self.method.name(),
            "bytes_exact": self.bytes_exact,
            "bytes": self.bytes,
            "added_seconds": self.added_seconds,
        })
    }
}

/// The selection of the candidates `cands`.
pub fn selection_of(cands: &[Candidate]) -> Selection {
    Selection(cands.iter().map(|c| (c.value, c.method)).collect())
}

/// The `autodiff` pass's text for the candidates `chosen` of `compress`: plain `autodiff` for
/// none (the exact step), else `autodiff{compress=…,only=…}`.
pub fn autodiff_pass(compress: Compress, chosen: &[Candidate]) -> Result<String, String> {
    if chosen.is_empty() {
        return Ok("autodiff".into());
    }
    crate::autodiff::methods::with_compress_only("autodiff", compress, Some(&selection_of(chosen)))
}

/// The [`Compress`] of one method of `compress`.
fn only_method(compress: Compress, m: Method) -> Compress {
    Compress {
        fewbit: compress.fewbit.filter(|_| m == Method::Fewbit),
        rank1: compress.rank1.filter(|_| m == Method::Rank1),
        rank1_batch: compress.rank1_batch && m == Method::Rank1,
        bf16: compress.bf16 && m == Method::Bf16,
        int8: compress.int8 && m == Method::Int8,
    }
}

/// Whether a value of `f` (made by a node that existed before differentiation) is read by the
/// backward.
fn read_back(f: &Function) -> Vec<bool> {
    let mut r = vec![false; f.values.len()];
    for &n in &f.body {
        if f.nodes[n].phase != Phase::Forward {
            for &v in &f.nodes[n].operands {
                r[v.index()] = true;
            }
        }
    }
    r
}

/// The candidates of `forward` (stage-annotated, before `autodiff`) for the methods of
/// `compress`, ordered by bytes saved per added second (the most first). Only candidates that
/// save bytes are listed.
pub fn candidates(
    forward: &Function,
    compress: Compress,
    profile: &DeviceProfile,
) -> Result<Vec<Candidate>, String> {
    let numbering = print_numbering(forward);
    let original = forward.nodes.len();
    let diff = |c: Compress| {
        differentiate_method(
            forward.clone(),
            Mode::Auto,
            &[],
            &GradMethod::Bp,
            (0, c, None),
        )
        .map(|(f, _)| f)
    };
    let exact = diff(Compress::default())?;
    let exact_read = read_back(&exact);
    let mut out = Vec::new();
    for m in Method::ALL {
        let c = only_method(compress, m);
        if c.is_none() {
            continue;
        }
        let f = diff(c)?;
        let read = read_back(&f);
        let root = |v: Value| crate::autodiff::compressed_root(&f, v, original);
        // Per compressed value: bytes read back in its place, and added seconds.
        let mut bytes: HashMap<Value, u64> = HashMap::new();
        let mut seconds: HashMap<Value, f64> = HashMap::new();
        for &n in &f.body {
            let d = &f.nodes[n];
            if n.index() < original {
                continue;
            }
            if d.phase == Phase::Forward {
                let r = root(d.results[0]);
                *seconds.entry(r).or_default() += forward_seconds(profile, &f, n);
                for &v in &d.results {
                    if read[v.index()] {
                        *bytes.entry(r).or_default() += f.ty(v).size_bytes() as u64;
                    }
                }
            } else if let Some(&v) = d.operands.iter().find(|&&v| {
                let def = f.values[v].def;
                def.index() >= original && f.nodes[def].phase == Phase::Forward
            }) {
                *seconds.entry(root(v)).or_default() += forward_seconds(profile, &f, n);
            }
        }
        for (&v, &compressed) in &bytes {
            if v.index() >= exact_read.len() || !exact_read[v.index()] {
                continue;
            }
            let Some(number) = numbering.get(v).copied().flatten() else {
                continue;
            };
            let size = exact.ty(v).size_bytes() as u64;
            let kept = if read[v.index()] { size } else { 0 };
            let cand = Candidate {
                value: number,
                stage: exact.nodes[exact.values[v].def].stage.unwrap_or(0),
                method: m,
                bytes_exact: size,
                bytes: kept + compressed,
                added_seconds: seconds.get(&v).copied().unwrap_or(0.0),
            };
            if cand.saved() > 0 {
                out.push(cand);
            }
        }
    }
    let rate = |c: &Candidate| c.saved() as f64 / c.added_seconds.max(1e-12);
    out.sort_by(|a, b| {
        rate(b)
            .total_cmp(&rate(a))
            .then(a.value.cmp(&b.value))
            .then(a.method.cmp(&b.method))
    });
    Ok(out)
}

/// One plan the search tried: how many candidates (0: the exact step), its objective (the
/// callers': the simulated step), or why it failed.
#[derive(Clone, Debug)]
pub struct Tried {
    /// Candidates applied (a prefix of the ordered list).
    pub prefix: usize,
    /// The objective, or the error.
    pub outcome: Result<f64, String>,
}

/// Estimated seconds the candidates add (their own nodes), for an objective of added seconds.
pub fn own_seconds(cands: &[Candidate]) -> f64 {
    cands.iter().map(|c| c.added_seconds).sum()
}

/// What a plan of the search returns: the plan, the objective to minimise, and whether the plan
/// adds nothing (no recomputation, no exposed transfer) so that nothing better can be had.
pub type Outcome<T> = (T, f64, bool);

/// Plans the first `k` candidates (`k = 0`: the exact step) and records the outcome.
fn eval<T, E: std::fmt::Display>(
    plan: &mut impl FnMut(&[Candidate]) -> Result<Outcome<T>, E>,
    cands: &[Candidate],
    k: usize,
    tried: &mut Vec<Tried>,
) -> Result<Outcome<T>, E> {
    let r = plan(&cands[..k]);
    tried.push(Tried {
        prefix: k,
        outcome: match &r {
            Ok((_, s, _)) => Ok(*s),
            Err(e) => Err(e.to_string()),
        },
    });
    r
}

/// The per-value choice (see the module docs). `plan(chosen)` plans the step differentiated
/// with the candidates `chosen` (empty: the exact step; [`selection_of`] gives the `only=`
/// selection) under the limit and returns the plan, the objective to minimise (the callers give
/// the simulated step, which includes the compressions' own nodes; an objective of added seconds
/// would add [`own_seconds`]) and whether the plan adds nothing, or an error where the limit is
/// not met. Returns the chosen
/// plan, its selection (`None`: the exact step) and every plan tried.
#[allow(clippy::type_complexity)]
pub fn choose<T, E: std::fmt::Display>(
    cands: &[Candidate],
    mut plan: impl FnMut(&[Candidate]) -> Result<Outcome<T>, E>,
) -> Result<(T, Option<Selection>, Vec<Tried>), E> {
    let mut tried = Vec::new();
    let exact = eval(&mut plan, cands, 0, &mut tried);
    let exact_objective = exact.as_ref().ok().map(|(_, s, _)| *s);
    if cands.is_empty() || exact.as_ref().is_ok_and(|(_, _, clean)| *clean) {
        return exact.map(|(t, _, _)| (t, None, tried));
    }
    let n = cands.len();
    // The best compressed plan so far: (objective, prefix, plan).
    let consider = |k: usize, r: Result<Outcome<T>, E>, best: &mut Option<(f64, usize, T)>| {
        let ok = r.is_ok();
        if let Ok((t, s, _)) = r {
            // Fewer compressions on ties (prefix n is tried first).
            if best
                .as_ref()
                .is_none_or(|(b, bk, _)| s < *b || (s == *b && k < *bk))
            {
                *best = Some((s, k, t));
            }
        }
        ok
    };
    let mut best = None;
    let all = eval(&mut plan, cands, n, &mut tried);
    if let Err(e) = all {
        // Not even every compression fits: the exact step's plan if it has one, else the
        // all-compressed step's error (whose smallest feasible limit is the lower one).
        return match exact {
            Ok((t, _, _)) => Ok((t, None, tried)),
            Err(_) => Err(e),
        };
    }
    consider(n, all, &mut best);
    // The shortest feasible prefix, by bisection (prefix n is feasible).
    let (mut lo, mut hi) = (0usize, n);
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        let r = eval(&mut plan, cands, mid, &mut tried);
        if consider(mid, r, &mut best) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    let mut step = 1;
    let mut k = hi;
    while k < n {
        if !tried.iter().any(|t| t.prefix == k) {
            let r = eval(&mut plan, cands, k, &mut tried);
            consider(k, r, &mut best);
        }
        k = hi + step;
        step *= 2;
    }
    let (objective, k, t) = best.expect("prefix n is feasible");
    if exact_objective.is_some_and(|s| s <= objective) {
        return exact.map(|(t, _, _)| (t, None, tried));
    }
    Ok((t, Some(selection_of(&cands[..k])), tried))
}
