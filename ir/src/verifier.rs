//! The verifier: the invariants every cleave function satisfies between passes.
//!
//! Passes may break these only internally; tests run the verifier after every pass, and the CLI does
//! so under `--verify-each`. Every error names the function, the node (by its printed `%N` and op
//! name) and the broken rule; [`verify_module`] reports all errors it finds, not only the first.
//!
//! # Invariants
//!
//! **Structure**
//! 1. Function names are non-empty, use only `[A-Za-z0-9_.$-]` (so they print as `@name`), and
//!    are unique within a module.
//! 2. Every node in `body` exists in the arena and appears in `body` once.
//! 3. Each result value of a node records that node as its definition, with its result index.
//! 4. *SSA, definition before use*: every operand of a node in `body`, and every output, is a result
//!    of a node that appears earlier in `body` (an output: anywhere in `body`).
//!
//! **Types**
//! 5. The number of operands matches the op's arity, and the declared result types are exactly
//!    what [`crate::infer()`] computes from the op and the operand types (this covers every op's
//!    shape rule, the maximum rank, literal sizes and element-type restrictions).
//!
//! **Interface**
//! 6. Argument (`input`/`param`) names are unique within a function; so are output names.
//!
//! **Annotations**
//! 7. Phases respect the order of a training step. A `forward` node consumes only `forward`
//!    values; `dgrad` consumes no `wgrad` value; nothing but `optimizer` consumes an `optimizer`
//!    value. (`recompute`, `offload` and `reload` values feed the backward pass; they are not
//!    consumed by `forward` nodes either.)
//! 8. Stages respect the pipeline direction. A staged `forward` node consumes no value of a node
//!    with a higher stage; a staged `dgrad` node consumes no `dgrad` value of a lower stage
//!    (gradients flow from the last stage to the first). Unstaged values (arguments and constants
//!    are often unstaged) are visible to every stage.

use std::collections::HashSet;
use std::fmt;

use cranelift_entity::SecondaryMap;

use crate::function::{Function, Module, Node, Phase};
use crate::infer::infer;
use crate::printer::print_numbering;

/// One broken invariant.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct VerifyError {
    /// The function it was found in.
    pub function: String,
    /// The offending node, if the error is about one.
    pub node: Option<Node>,
    /// How the node prints: `%N = op` (empty when no node).
    pub location: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.location.is_empty() {
            write!(f, "@{}: {}", self.function, self.message)
        } else {
            write!(f, "@{}: {}: {}", self.function, self.location, self.message)
        }
    }
}

/// Verifies every function of a module and the module-level rules.
pub fn verify_module(module: &Module) -> Result<(), Vec<VerifyError>> {
    let mut errors = Vec::new();
    let mut names = HashSet::new();
    for func in &module.functions {
        if !names.insert(func.name.as_str()) {
            errors.push(VerifyError {
                function: func.name.clone(),
                node: None,
                location: String::new(),
                message: format!("function @{} is defined more than once", func.name),
            });
        }
        if let Err(mut e) = verify_function(func) {
            errors.append(&mut e);
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// Verifies one function.
pub fn verify_function(func: &Function) -> Result<(), Vec<VerifyError>> {
    let mut errors = Vec::new();
    let numbering = print_numbering(func);
    let located = |node: Node| -> String {
        let data = &func.nodes[node];
        let name = data
            .results
            .first()
            .and_then(|&v| func.values.get(v).and(numbering[v]))
            .map(|n| format!("%{n}"))
            .unwrap_or_else(|| "<no result>".into());
        format!("{name} = {}", data.op.name())
    };
    let mut err = |node: Option<Node>, location: String, message: String| {
        errors.push(VerifyError {
            function: func.name.clone(),
            node,
            location,
            message,
        })
    };
    if func.name.is_empty()
        || !func
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '$' | '-'))
    {
        err(
            None,
            String::new(),
            format!(
                "function name \"{}\" must be non-empty and use only letters, digits, `_`, `.`, `$` and `-`",
                func.name
            ),
        );
    }

    // Structure: body entries, result bookkeeping, and position of each defining node.
    let mut position: SecondaryMap<Node, Option<usize>> = SecondaryMap::with_default(None);
    let mut structure_ok = true;
    for (idx, &node) in func.body.iter().enumerate() {
        if func.nodes.get(node).is_none() {
            err(
                None,
                String::new(),
                format!("body lists {node}, which does not exist"),
            );
            structure_ok = false;
            continue;
        }
        if position[node].is_some() {
            err(
                Some(node),
                located(node),
                "node appears twice in the body".into(),
            );
            structure_ok = false;
            continue;
        }
        position[node] = Some(idx);
        for (i, &v) in func.nodes[node].results.iter().enumerate() {
            match func.values.get(v) {
                Some(vd) if vd.def == node && vd.result_index as usize == i => {}
                _ => {
                    structure_ok = false;
                    err(
                        Some(node),
                        located(node),
                        format!("result {i} is not recorded as defined by this node"),
                    )
                }
            }
        }
    }
    if !structure_ok {
        return Err(errors);
    }

    let def_position =
        |v: crate::Value| -> Option<usize> { func.values.get(v).and_then(|vd| position[vd.def]) };
    let show = |v: crate::Value| -> String {
        match func.values.get(v).and_then(|_| numbering[v]) {
            Some(n) => format!("%{n}"),
            None => format!("{v} (not defined in the body)"),
        }
    };

    let mut arg_names = HashSet::new();
    for (idx, &node) in func.body.iter().enumerate() {
        let data = &func.nodes[node];
        let mut operands_ok = true;
        for &v in &data.operands {
            match def_position(v) {
                Some(p) if p < idx => {}
                Some(_) => {
                    operands_ok = false;
                    err(
                        Some(node),
                        located(node),
                        format!("operand {} is used before its definition", show(v)),
                    );
                }
                None => {
                    operands_ok = false;
                    err(
                        Some(node),
                        located(node),
                        format!("operand {} is not defined", show(v)),
                    );
                }
            }
        }
        if let Some(name) = data.op.arg_name() {
            if !arg_names.insert(name) {
                err(
                    Some(node),
                    located(node),
                    format!("argument name \"{name}\" is used more than once"),
                );
            }
        }
        if !operands_ok {
            continue;
        }

        // Types.
        let operand_types: Vec<_> = data.operands.iter().map(|&v| func.ty(v)).collect();
        match infer(&data.op, &operand_types) {
            Err(e) => err(Some(node), located(node), e.to_string()),
            Ok(expected) => {
                let declared: Vec<_> = data.results.iter().map(|&v| func.ty(v)).collect();
                if expected.len() != declared.len() {
                    err(
                        Some(node),
                        located(node),
                        format!(
                            "declares {} result(s), but `{}` produces {}",
                            declared.len(),
                            data.op.name(),
                            expected.len()
                        ),
                    );
                } else {
                    for (i, (e, d)) in expected.iter().zip(&declared).enumerate() {
                        if e != *d {
                            err(
                                Some(node),
                                located(node),
                                format!("result {i} is declared {d}, but the operands give {e}"),
                            );
                        }
                    }
                }
            }
        }

        // Annotations.
        for &v in &data.operands {
            let producer = &func.nodes[func.values[v].def];
            let (pp, cp) = (producer.phase, data.phase);
            let bad_phase = match cp {
                Phase::Forward => pp != Phase::Forward,
                Phase::Dgrad => matches!(pp, Phase::Wgrad | Phase::Optimizer),
                Phase::Optimizer => false,
                _ => pp == Phase::Optimizer,
            };
            if bad_phase {
                err(
                    Some(node),
                    located(node),
                    format!(
                        "a {} node cannot consume {}, which is a {} value",
                        cp.name(),
                        show(v),
                        pp.name()
                    ),
                );
            }
            if let (Some(cs), Some(ps)) = (data.stage, producer.stage) {
                if cp == Phase::Forward && ps > cs {
                    err(
                        Some(node),
                        located(node),
                        format!(
                            "a forward node of stage {cs} cannot consume {} from stage {ps}",
                            show(v)
                        ),
                    );
                }
                if cp == Phase::Dgrad && pp == Phase::Dgrad && ps < cs {
                    err(
                        Some(node),
                        located(node),
                        format!(
                            "a dgrad node of stage {cs} cannot consume the dgrad value {} of stage {ps}",
                            show(v)
                        ),
                    );
                }
            }
        }
    }

    let mut out_names = HashSet::new();
    for o in &func.outputs {
        if def_position(o.value).is_none() {
            err(
                None,
                String::new(),
                format!(
                    "output \"{}\" returns {}, which is not defined",
                    o.name,
                    show(o.value)
                ),
            );
        }
        if !out_names.insert(o.name.as_str()) {
            err(
                None,
                String::new(),
                format!("output name \"{}\" is used more than once", o.name),
            );
        }
    }

    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}
