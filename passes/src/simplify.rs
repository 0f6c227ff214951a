//! `simplify`: exact algebraic simplification by equality saturation (see [`crate::egraph`]).
//!
//! Each function is saturated region by region with the `algebra` ruleset (and `reassociate` when
//! asked for), then every output (incl. every `grad.*`) is extracted together with DAG cost.
//!
//! Options: `reassociate` (default off; float re-association is not exact), `node_limit`
//! (default 10000), `iter_limit` (30), `time_limit_ms` (5000), `extract=ilp|greedy` (`ilp`),
//! `region_nodes` (400).
//!
//! **Entry:** a verified module whose functions hold no `recompute`, `offload` or `reload` node
//! (merging a recomputation with its original would undo it); such functions are left alone with a
//! warning.
//!
//! **Exit:** a verified module. Every function keeps its name, its arguments (same names, types,
//! roles and order) and its outputs (same names and order). With the default rules every output is
//! bit-identical to before on every input (up to the sign of a zero produced by a `reduce` over no
//! axes, see [`crate::egraph::rules::algebra`]); with `reassociate` equal up to float rounding.
//! Nodes keep the phase and stage of the original node their e-class came from (rules in
//! [`crate::egraph::convert`]); a `dgrad` node never consumes a `wgrad` value. Dead nodes are
//! removed. A limit that stops saturation early gives a warning naming the option.

use cleave_ir::Module;

use crate::egraph::{simplify_function, ExtractMethod, SimplifyOptions};
use crate::pass::{Pass, PassContext, PassError, PassOptions};

/// The `simplify` pass.
#[derive(Clone, Debug, Default)]
pub struct Simplify {
    /// Saturation and extraction settings.
    pub options: SimplifyOptions,
}

impl Simplify {
    /// Builds the pass from pipeline options (see the module docs).
    pub fn from_options(mut o: PassOptions) -> Result<Self, PassError> {
        let d = SimplifyOptions::default();
        let options = SimplifyOptions {
            reassociate: o.take_parsed("reassociate", d.reassociate)?,
            node_limit: o.take_parsed("node_limit", d.node_limit)?,
            iter_limit: o.take_parsed("iter_limit", d.iter_limit)?,
            time_limit_ms: o.take_parsed("time_limit_ms", d.time_limit_ms)?,
            extract: o.take_parsed::<ExtractMethod>("extract", d.extract)?,
            region_nodes: o.take_parsed("region_nodes", d.region_nodes)?,
            ilp_node_limit: d.ilp_node_limit,
        };
        o.finish()?;
        Ok(Simplify { options })
    }
}

impl Pass for Simplify {
    fn name(&self) -> &'static str {
        "simplify"
    }

    fn run(&self, module: &mut Module, ctx: &mut PassContext) -> Result<(), PassError> {
        for func in &mut module.functions {
            if let Err(message) = crate::egraph::check_entry(func) {
                ctx.warn("simplify", format!("{message}; left unchanged"));
                continue;
            }
            let (new, report) =
                simplify_function(func, &self.options).map_err(|message| PassError::Failed {
                    pass: "simplify",
                    message,
                })?;
            for w in report.warnings(&func.name, &self.options) {
                ctx.warn("simplify", w);
            }
            ctx.note("simplify", report.summary(&func.name));
            *func = new;
        }
        Ok(())
    }
}
