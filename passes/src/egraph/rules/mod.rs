//! Rulesets, kept apart and run in an explicit schedule (see [`schedule`]).
//!
//! - [`algebra`]: exact identities (the default).
//! - [`reassociate`]: float re-association and commutation, only under the `reassociate` option.
//!
//! Every rule has a kebab-case name and an `A => B` test plus a "must not rewrite" test in
//! `passes/src/egraph/tests.rs`; a tidy test checks that every name returned by
//! [`all_rule_names`] is covered.

pub mod algebra;
pub mod reassociate;

use super::analysis::CirAnalysis;
use super::language::CirLang;

/// A rewrite rule over the cleave language.
pub type Rule = egg::Rewrite<CirLang, CirAnalysis>;

/// A named group of rules.
pub struct Ruleset {
    /// Kebab-case name of the group.
    pub name: &'static str,
    /// The rules.
    pub rules: Vec<Rule>,
}

/// The rulesets to run, in order: `algebra`, then `reassociate` when asked for. Each ruleset
/// saturates (or hits a limit) before the next starts; the later one runs with the earlier rules
/// included, so that it cannot undo their work.
pub fn schedule(reassociate: bool) -> Vec<Ruleset> {
    let mut sets = vec![Ruleset {
        name: "algebra",
        rules: algebra::rules(),
    }];
    if reassociate {
        let mut rules = algebra::rules();
        rules.extend(reassociate::rules());
        sets.push(Ruleset {
            name: "reassociate",
            rules,
        });
    }
    sets
}

/// The names of every rule of every ruleset.
pub fn all_rule_names() -> Vec<String> {
    algebra::rules()
        .iter()
        .chain(reassociate::rules().iter())
        .map(|r| r.name.to_string())
        .collect()
}
