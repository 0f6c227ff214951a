//! The text format's printer: `Display` for [`Function`] and [`Module`].
//!
//! ```text
//! func @mlp {
//!   %0 = input {name = "x"} : f32[64,784]
//!   %1 = param {name = "fc1.weight"} : f32[784,256]
//!   %2 = matmul %0, %1 : f32[64,256]
//!   %3 = relu %2 : f32[64,256] phase(dgrad) stage(1)
//!   return %3 as "h"
//! }
//! ```
//!
//! Each node prints as `results = op operands {attrs} : result types annotations`. Values are
//! renumbered `%0, %1, …` in definition order, so the output does not depend on arena history and
//! print → parse → print is the identity. The `forward` phase and an absent stage are not printed.
//! Attributes come from [`crate::attrs::op_attrs`], which the parser inverts.

use std::fmt::{self, Write};

use cranelift_entity::SecondaryMap;

use crate::attrs::{fmt_string, op_attrs};
use crate::function::{Function, Module, Phase, Value};

/// Maps each value defined in `body` to its print number, in definition order.
pub fn print_numbering(func: &Function) -> SecondaryMap<Value, Option<u32>> {
    let mut numbering = SecondaryMap::with_default(None);
    let mut next = 0u32;
    for &node in &func.body {
        for &v in &func.nodes[node].results {
            numbering[v] = Some(next);
            next += 1;
        }
    }
    numbering
}

fn value_name(numbering: &SecondaryMap<Value, Option<u32>>, v: Value) -> String {
    match numbering[v] {
        Some(n) => format!("%{n}"),
        // Only an invalid function (a use outside `body`) gets here; print something a reader
        // can recognise, which the parser will reject as undefined.
        None => format!("%undefined{}", v.as_u32()),
    }
}

impl fmt::Display for Function {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let numbering = print_numbering(self);
        writeln!(f, "func @{} {{", self.name)?;
        let mut line = String::new();
        for &node in &self.body {
            let data = &self.nodes[node];
            line.clear();
            line.push_str("  ");
            let results: Vec<String> = data
                .results
                .iter()
                .map(|&v| value_name(&numbering, v))
                .collect();
            line.push_str(&results.join(", "));
            line.push_str(" = ");
            line.push_str(data.op.name());
            let operands: Vec<String> = data
                .operands
                .iter()
                .map(|&v| value_name(&numbering, v))
                .collect();
            if !operands.is_empty() {
                line.push(' ');
                line.push_str(&operands.join(", "));
            }
            let attrs = op_attrs(&data.op);
            if !attrs.is_empty() {
                line.push_str(" {");
                for (i, (k, a)) in attrs.iter().enumerate() {
                    if i > 0 {
                        line.push_str(", ");
                    }
                    let _ = write!(line, "{k} = {a}");
                }
                line.push('}');
            }
            line.push_str(" : ");
            let types: Vec<String> = data
                .results
                .iter()
                .map(|&v| self.values[v].ty.to_string())
                .collect();
            line.push_str(&types.join(", "));
            if data.phase != Phase::Forward {
                let _ = write!(line, " phase({})", data.phase.name());
            }
            if let Some(s) = data.stage {
                let _ = write!(line, " stage({s})");
            }
            writeln!(f, "{line}")?;
        }
        write!(f, "  return")?;
        for (i, o) in self.outputs.iter().enumerate() {
            let sep = if i == 0 { " " } else { ", " };
            write!(
                f,
                "{sep}{} as {}",
                value_name(&numbering, o.value),
                fmt_string(&o.name)
            )?;
        }
        writeln!(f)?;
        writeln!(f, "}}")
    }
}

impl fmt::Display for Module {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, func) in self.functions.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{func}")?;
        }
        Ok(())
    }
}
