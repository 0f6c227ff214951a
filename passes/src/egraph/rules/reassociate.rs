//! Re-association and commutation of `add` and `mul`: only under the `simplify` option
//! `reassociate` (off by default).
//!
//! Float addition and multiplication are commutative but not associative: `(a+b)+c` and
//! `a+(b+c)` round differently, so a module rewritten with these rules computes results equal
//! only within rounding, not bit for bit. The rules are also the classic e-graph blow-up (a chain
//! of `n` adds has exponentially many bracketings), so they are guarded three ways: they are off by
//! default, they run in a ruleset of their own after `algebra` has saturated (so the cheap exact
//! rewrites are never starved), and egg's `BackoffScheduler` bans them for a while each time they
//! match too often. The runner's node, iteration and time limits bound the rest; hitting one is
//! reported as a warning.

use egg::rewrite;

use super::Rule;

/// The re-association rules.
pub fn rules() -> Vec<Rule> {
    vec![
        rewrite!("add-assoc"; "(add (add ?a ?b) ?c)" => "(add ?a (add ?b ?c))"),
        rewrite!("add-comm"; "(add ?a ?b)" => "(add ?b ?a)"),
        rewrite!("mul-assoc"; "(mul (mul ?a ?b) ?c)" => "(mul ?a (mul ?b ?c))"),
        rewrite!("mul-comm"; "(mul ?a ?b)" => "(mul ?b ?a)"),
    ]
}
