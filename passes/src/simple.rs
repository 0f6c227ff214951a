//! Small utility passes: `verify` and `dce`.

use cleave_ir::{Function, Module};
use cranelift_entity::SecondaryMap;

use crate::pass::{Pass, PassContext, PassError};

/// `verify`: fails unless the module satisfies the verifier's invariants.
///
/// Entry: any module. Exit: unchanged.
pub struct Verify;

impl Pass for Verify {
    fn name(&self) -> &'static str {
        "verify"
    }

    fn run(&self, module: &mut Module, _ctx: &mut PassContext) -> Result<(), PassError> {
        cleave_ir::verify_module(module).map_err(|errors| PassError::Failed {
            pass: "verify",
            message: errors
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n  "),
        })
    }
}

/// `dce`: removes nodes none of whose results reaches an output. Argument nodes (`input`,
/// `param`) always stay, so a function's interface never changes.
///
/// Entry: a verified module. Exit: a verified module computing the same outputs.
pub struct Dce;

/// Removes dead nodes from one function's body (see [`Dce`]).
pub fn eliminate_dead_nodes(func: &mut Function) {
    let mut live: SecondaryMap<cleave_ir::Value, bool> = SecondaryMap::with_default(false);
    for o in &func.outputs {
        live[o.value] = true;
    }
    let mut keep = vec![false; func.body.len()];
    for (idx, &node) in func.body.iter().enumerate().rev() {
        let data = &func.nodes[node];
        if data.op.arg_role().is_some() || data.results.iter().any(|&v| live[v]) {
            keep[idx] = true;
            for &v in &data.operands {
                live[v] = true;
            }
        }
    }
    let mut idx = 0;
    func.body.retain(|_| {
        idx += 1;
        keep[idx - 1]
    });
}

impl Pass for Dce {
    fn name(&self) -> &'static str {
        "dce"
    }

    fn run(&self, module: &mut Module, _ctx: &mut PassContext) -> Result<(), PassError> {
        for func in &mut module.functions {
            eliminate_dead_nodes(func);
        }
        Ok(())
    }
}
