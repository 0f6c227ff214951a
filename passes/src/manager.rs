//! The pass registry and the pass manager.

use std::collections::BTreeSet;

use cleave_ir::Module;

use crate::pass::{Pass, PassContext, PassError, PassOptions};
use crate::pipeline::{parse_pipeline, PipelineEntry};

/// A registered pass: its name, a one-line description, and how to build it from options.
pub struct PassInfo {
    /// Kebab-case name.
    pub name: &'static str,
    /// One line for `--help` and error messages.
    pub description: &'static str,
    /// Builds the pass; must reject unknown options (`PassOptions::finish`).
    pub build: fn(PassOptions) -> Result<Box<dyn Pass>, PassError>,
}

/// Every pass, in a fixed order.
pub fn registry() -> Vec<PassInfo> {
    vec![
        PassInfo {
            name: "verify",
            description: "check the verifier's invariants (fails on the first broken module)",
            build: |o| {
                o.finish()?;
                Ok(Box::new(crate::simple::Verify))
            },
        },
        PassInfo {
            name: "partition",
            description: "assign pipeline stages to a forward function, balancing a device cost model (options: stages=P, profile=NAME|FILE)",
            build: |o| Ok(Box::new(crate::partition::Partition::from_options(o)?)),
        },
        PassInfo {
            name: "autodiff",
            description: "reverse-mode differentiation: append a backward pass tagged dgrad/wgrad and grad.* outputs (options: mode=auto|loss|stage, function=NAME, wrt=IN1;IN2)",
            build: |o| Ok(Box::new(crate::autodiff::Autodiff::from_options(o)?)),
        },
        PassInfo {
            name: "jvp",
            description: "forward-mode differentiation: tangent.* inputs for float arguments, tangent.* outputs (option: function=NAME)",
            build: |o| Ok(Box::new(crate::jvp::Jvp::from_options(o)?)),
        },
        PassInfo {
            name: "precision",
            description: "mixed precision: every f32 matmul runs in bf16 with f32 master weights and the rest in f32, as autocast does (option: bf16|f32)",
            build: |o| Ok(Box::new(crate::precision::PrecisionPass::from_options(o)?)),
        },
        PassInfo {
            name: "chunk",
            description: "the output layer and its cross-entropy in K row chunks, exactly (StreamBP), so no [rows, vocab] logits exist (options: ops=lm-head, k=K)",
            build: |o| Ok(Box::new(crate::chunk::Chunk::from_options(o)?)),
        },
        PassInfo {
            name: "split-bw",
            description: "cut a training step into per-stage F, B (dgrad) and W (wgrad) functions with named stash sets (option: accumulate)",
            build: |o| Ok(Box::new(crate::split::SplitBw::from_options(o)?)),
        },
        PassInfo {
            name: "remat",
            description: "recompute or offload the stash sets of split-bw under a memory budget (options: policy=none|full|selective|offload-all|auto, memory-limit=BYTES, in-flight=K, profile=NAME|FILE)",
            build: |o| Ok(Box::new(crate::remat::Remat::from_options(o)?)),
        },
        PassInfo {
            name: "plan",
            description: "partition, split-bw, remat/offload and the schedule chosen together on a forward function; the result (schedule, per-stage plans, simulation) in the pass context (options: stages=P, microbatches=M, memory-limit=BYTES, profile=NAME|FILE, schedule=NAME|auto, remat=POLICY, balance=estimate|split|best, vocab-parallel)",
            build: |o| Ok(Box::new(crate::plan::PlanPass::from_options(o)?)),
        },
        PassInfo {
            name: "optimizer",
            description: "append the parameter update (options: kind=sgd|momentum|adamw, lr, momentum, beta1, beta2, eps, weight_decay, keep_grads)",
            build: |o| Ok(Box::new(crate::optimizer::Optimizer::from_options(o)?)),
        },
        PassInfo {
            name: "simplify",
            description: "exact algebraic simplification by equality saturation with DAG-cost extraction (options: reassociate, node_limit, iter_limit, time_limit_ms, extract=ilp|greedy, region_nodes)",
            build: |o| Ok(Box::new(crate::simplify::Simplify::from_options(o)?)),
        },
        PassInfo {
            name: "dce",
            description: "remove nodes whose results reach no output (arguments are kept)",
            build: |o| {
                o.finish()?;
                Ok(Box::new(crate::simple::Dce))
            },
        },
    ]
}

/// The registered pass names, comma separated (for error messages).
pub fn valid_pass_names() -> String {
    registry()
        .iter()
        .map(|p| p.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Builds one pass from a pipeline entry.
pub fn build_pass(entry: &PipelineEntry) -> Result<Box<dyn Pass>, PassError> {
    let info = registry()
        .into_iter()
        .find(|p| p.name == entry.name)
        .ok_or_else(|| PassError::UnknownPass {
            name: entry.name.clone(),
            valid: valid_pass_names(),
        })?;
    (info.build)(entry.options.clone())
}

/// When to print the IR.
#[derive(Clone, Debug, Default)]
pub struct PrintOptions {
    /// After every pass.
    pub after_all: bool,
    /// After the passes with these names.
    pub after: BTreeSet<String>,
    /// After a pass that fails (the IR as the pass left it).
    pub after_failure: bool,
}

/// Runs a pipeline of passes over a module.
pub struct PassManager {
    passes: Vec<(PipelineEntry, Box<dyn Pass>)>,
    /// Verify the module after every pass.
    pub verify_each: bool,
    /// IR printing.
    pub print: PrintOptions,
}

impl PassManager {
    /// Builds the passes of a textual pipeline; unknown names and options are errors.
    pub fn from_pipeline(text: &str) -> Result<Self, PassError> {
        let entries = parse_pipeline(text)?;
        let mut passes = Vec::with_capacity(entries.len());
        for e in entries {
            let pass = build_pass(&e)?;
            passes.push((e, pass));
        }
        Ok(PassManager {
            passes,
            verify_each: false,
            print: PrintOptions::default(),
        })
    }

    /// The pipeline in canonical text form.
    pub fn pipeline_text(&self) -> String {
        self.passes
            .iter()
            .map(|(e, _)| e.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Runs every pass in order. `dump` receives each IR dump (banner included).
    pub fn run(
        &self,
        module: &mut Module,
        ctx: &mut PassContext,
        dump: &mut dyn FnMut(String),
    ) -> Result<(), PassError> {
        for (entry, pass) in &self.passes {
            let name = pass.name();
            ctx.notes.clear();
            if let Err(e) = pass.run(module, ctx) {
                if self.print.after_failure {
                    dump(format!(
                        "// -----// IR Dump After {name} Failed ({entry}) //----- //\n{module}"
                    ));
                }
                return Err(e);
            }
            if self.print.after_all || self.print.after.contains(name) {
                let notes: String = ctx.notes.iter().map(|n| format!("// {n}\n")).collect();
                dump(format!(
                    "// -----// IR Dump After {name} ({entry}) //----- //\n{notes}{module}"
                ));
            }
            if self.verify_each {
                if let Err(errors) = cleave_ir::verify_module(module) {
                    return Err(PassError::VerifyFailed {
                        pass: name.to_string(),
                        errors: errors.iter().map(|e| e.to_string()).collect(),
                    });
                }
            }
        }
        Ok(())
    }
}
