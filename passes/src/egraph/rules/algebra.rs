//! The default ruleset: identities that hold bit for bit in IEEE arithmetic.
//!
//! | rule | rewrite | condition |
//! |------|---------|-----------|
//! | `transpose-transpose` | `(transpose q (transpose p x)) => (transpose p∘q x)` | — |
//! | `transpose-identity` | `(transpose p x) => x` | `p` is the identity |
//! | `matmul-absorb-transpose-lhs` | `(matmul tl tr (transpose p a) b) => (matmul !tl tr a b)` | `p` swaps the last two dims only |
//! | `matmul-absorb-transpose-rhs` | `(matmul tl tr a (transpose p b)) => (matmul tl !tr a b)` | as above |
//! | `reshape-reshape` | `(reshape s2 (reshape s1 x)) => (reshape s2 x)` | — |
//! | `reshape-identity` | `(reshape s x) => x` | `s` is the shape of `x` |
//! | `broadcast-identity` | `(broadcast s d x) => x` | `s` is the shape of `x` |
//! | `reduce-empty-axes` | `(reduce k [] x) => x` | — |
//! | `mul-one`, `one-mul` | `(mul x c) => x`, `(mul c x) => x` | `c` is a splat of 1 |
//! | `add-zero`, `zero-add` | `(add x c) => x`, `(add c x) => x` | `c` is a splat of `-0.0` (floats) or `0` (integers) |
//! | `neg-neg` | `(neg (neg x)) => x` | — |
//!
//! Common subexpressions need no rule: hash-consing merges equal nodes over equal classes, and
//! equal constants are one interned leaf.
//!
//! **Left out on purpose, because they are not exact for floats:** `x * 0 => 0` (NaN·0 and ∞·0
//! are NaN, and `-x·0` is `-0`), `x - x => 0` (NaN, ∞), and `x + 0.0 => x` with a *positive* zero
//! (`-0.0 + 0.0` is `+0.0`). Only `-0.0` is an exact additive identity.
//!
//! `reduce-empty-axes`: a reduction over no axes combines one element; every kind returns it
//! (`mean` divides by 1). The reference interpreter starts sums at `+0.0`, so there it turns a
//! `-0.0` element into `+0.0`; the rewrite keeps `-0.0`, which is the IEEE result.

use egg::{rewrite, Applier, Id, PatternAst, Subst, Symbol, Var};

use super::Rule;
use crate::egraph::analysis::{flag, ints, CirGraph};
use crate::egraph::language::{CirLang, Ints};

/// The rules of the default ruleset.
pub fn rules() -> Vec<Rule> {
    vec![
        rewrite!("transpose-transpose"; "(transpose ?q (transpose ?p ?x))" => { ComposePerm }),
        rewrite!("transpose-identity"; "(transpose ?p ?x)" => "?x" if is_identity_perm("?p")),
        rewrite!("matmul-absorb-transpose-lhs";
            "(matmul ?tl ?tr (transpose ?p ?a) ?b)" => { AbsorbTranspose { lhs: true } }
            if swaps_last_two("?p")),
        rewrite!("matmul-absorb-transpose-rhs";
            "(matmul ?tl ?tr ?a (transpose ?p ?b))" => { AbsorbTranspose { lhs: false } }
            if swaps_last_two("?p")),
        rewrite!("reshape-reshape"; "(reshape ?s2 (reshape ?s1 ?x))" => "(reshape ?s2 ?x)"),
        rewrite!("reshape-identity"; "(reshape ?s ?x)" => "?x" if shape_is("?s", "?x")),
        rewrite!("broadcast-identity"; "(broadcast ?s ?d ?x)" => "?x" if shape_is("?s", "?x")),
        rewrite!("reduce-empty-axes"; "(reduce ?k [] ?x)" => "?x"),
        rewrite!("mul-one"; "(mul ?x ?c)" => "?x" if is_splat("?c", Splat::One)),
        rewrite!("one-mul"; "(mul ?c ?x)" => "?x" if is_splat("?c", Splat::One)),
        rewrite!("add-zero"; "(add ?x ?c)" => "?x" if is_splat("?c", Splat::AdditiveZero)),
        rewrite!("zero-add"; "(add ?c ?x)" => "?x" if is_splat("?c", Splat::AdditiveZero)),
        rewrite!("neg-neg"; "(neg (neg ?x))" => "?x"),
    ]
}

fn var(name: &str) -> Var {
    name.parse().expect("a pattern variable")
}

/// `p` is `[0, 1, …, n-1]`.
fn is_identity_perm(p: &str) -> impl Fn(&mut CirGraph, Id, &Subst) -> bool {
    let p = var(p);
    move |egraph, _, subst| {
        ints(egraph, subst[p])
            .iter()
            .enumerate()
            .all(|(i, &d)| i == d)
    }
}

/// `p` keeps every dim but the last two in place and swaps those two.
fn swaps_last_two(p: &str) -> impl Fn(&mut CirGraph, Id, &Subst) -> bool {
    let p = var(p);
    move |egraph, _, subst| {
        let perm = ints(egraph, subst[p]);
        let r = perm.len();
        r >= 2
            && perm[..r - 2].iter().enumerate().all(|(i, &d)| i == d)
            && perm[r - 2] == r - 1
            && perm[r - 1] == r - 2
    }
}

/// The shape leaf `s` equals the shape of the class `x`.
fn shape_is(s: &str, x: &str) -> impl Fn(&mut CirGraph, Id, &Subst) -> bool {
    let (s, x) = (var(s), var(x));
    move |egraph, _, subst| ints(egraph, subst[s]) == egraph[subst[x]].data.tensor().ty.shape
}

/// Which constant an identity rule needs.
#[derive(Clone, Copy)]
enum Splat {
    /// `1` (exact multiplicative identity for every numeric type).
    One,
    /// `-0.0` for floats, `0` for integers (the exact additive identities).
    AdditiveZero,
}

fn is_splat(c: &str, want: Splat) -> impl Fn(&mut CirGraph, Id, &Subst) -> bool {
    let c = var(c);
    move |egraph, _, subst| {
        let info = egraph[subst[c]].data.tensor();
        let Some(v) = info.splat else {
            return false;
        };
        match want {
            Splat::One => v == 1.0,
            Splat::AdditiveZero if info.ty.dtype.is_float() => v.to_bits() == (-0.0f64).to_bits(),
            Splat::AdditiveZero => v == 0.0,
        }
    }
}

/// `(transpose q (transpose p x)) => (transpose r x)` with `r[j] = p[q[j]]`: result dim `j` of
/// the outer transpose is dim `q[j]` of the inner one, which is dim `p[q[j]]` of `x`.
struct ComposePerm;

impl Applier<CirLang, crate::egraph::analysis::CirAnalysis> for ComposePerm {
    fn apply_one(
        &self,
        egraph: &mut CirGraph,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<CirLang>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let p = ints(egraph, subst[var("?p")]);
        let q = ints(egraph, subst[var("?q")]);
        let r: Vec<usize> = q.iter().map(|&j| p[j]).collect();
        let r = egraph.add(CirLang::Ints(Ints(r)));
        let t = egraph.add(CirLang::Transpose([r, subst[var("?x")]]));
        if egraph.union(eclass, t) {
            vec![eclass]
        } else {
            vec![]
        }
    }
}

/// Flips the transpose flag of one matmul operand and drops the operand's transpose.
struct AbsorbTranspose {
    lhs: bool,
}

impl Applier<CirLang, crate::egraph::analysis::CirAnalysis> for AbsorbTranspose {
    fn apply_one(
        &self,
        egraph: &mut CirGraph,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<CirLang>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let (mut tl, mut tr) = (
            flag(egraph, subst[var("?tl")]),
            flag(egraph, subst[var("?tr")]),
        );
        if self.lhs {
            tl = !tl;
        } else {
            tr = !tr;
        }
        let tl = egraph.add(CirLang::Flag(tl));
        let tr = egraph.add(CirLang::Flag(tr));
        let m = egraph.add(CirLang::MatMul([
            tl,
            tr,
            subst[var("?a")],
            subst[var("?b")],
        ]));
        if egraph.union(eclass, m) {
            vec![eclass]
        } else {
            vec![]
        }
    }
}
