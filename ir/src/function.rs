//! Functions and modules: arenas of values and nodes, plus a topological order.
//!
//! A [`Function`] owns two typed arenas: [`Value`]s (each with a type and the node that defines
//! it) and [`Node`]s (each with an op, operand values, result values and annotations). The
//! function's `body` lists the live nodes in a topological order: every operand is defined by an
//! earlier node in `body`. Nodes dropped from `body` stay in the arena (ids are never reused), so
//! ids held by a pass stay valid; the printer renumbers values in print order, so dropped entries
//! never show up in text.
//!
//! Function arguments are nodes too (`input` and `param` ops): every value has exactly one defining
//! node, and the argument order of the function is the order of its argument nodes in `body`.

use cranelift_entity::{entity_impl, PrimaryMap};

use crate::op::{ArgRole, Op};
use crate::types::TensorType;

/// A value: one result of one node.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Value(u32);
entity_impl!(Value, "%");

/// A node: one op applied to operand values.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Node(u32);
entity_impl!(Node, "node");

/// Which part of a training step a node belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Phase {
    /// The forward computation (the default).
    #[default]
    Forward,
    /// Backward work on the path to an input/activation gradient ("B").
    Dgrad,
    /// Backward work that only serves parameter gradients ("W").
    Wgrad,
    /// A forward op re-run in the backward pass instead of being stashed.
    Recompute,
    /// A copy of a stashed value to host memory.
    Offload,
    /// A copy of an offloaded value back to the device.
    Reload,
    /// The optimizer update.
    Optimizer,
}

impl Phase {
    /// All phases, in a fixed order.
    pub const ALL: [Phase; 7] = [
        Phase::Forward,
        Phase::Dgrad,
        Phase::Wgrad,
        Phase::Recompute,
        Phase::Offload,
        Phase::Reload,
        Phase::Optimizer,
    ];

    /// The text-format spelling.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Forward => "forward",
            Phase::Dgrad => "dgrad",
            Phase::Wgrad => "wgrad",
            Phase::Recompute => "recompute",
            Phase::Offload => "offload",
            Phase::Reload => "reload",
            Phase::Optimizer => "optimizer",
        }
    }

    /// Parses the text-format spelling.
    pub fn from_name(name: &str) -> Option<Phase> {
        Phase::ALL.into_iter().find(|p| p.name() == name)
    }

    /// True for the phases that make up the backward pass.
    pub fn is_backward(self) -> bool {
        matches!(self, Phase::Dgrad | Phase::Wgrad)
    }
}

/// What the arena stores for a value.
#[derive(Clone, Debug, PartialEq)]
pub struct ValueData {
    /// The value's type.
    pub ty: TensorType,
    /// The node that defines it.
    pub def: Node,
    /// Which result of that node it is.
    pub result_index: u32,
}

/// What the arena stores for a node.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeData {
    /// The operation.
    pub op: Op,
    /// Operand values, in op order.
    pub operands: Vec<Value>,
    /// Result values, in op order.
    pub results: Vec<Value>,
    /// Which part of the training step the node belongs to.
    pub phase: Phase,
    /// Pipeline stage, when assigned.
    pub stage: Option<u32>,
}

/// A named result of a function.
#[derive(Clone, Debug, PartialEq)]
pub struct Output {
    /// Name of the output (unique within the function).
    pub name: String,
    /// The returned value.
    pub value: Value,
}

/// A function argument, as seen through [`Function::args`].
#[derive(Clone, Copy, Debug)]
pub struct Arg<'a> {
    /// The defining `input`/`param` node.
    pub node: Node,
    /// The argument's value.
    pub value: Value,
    /// Data input or parameter.
    pub role: ArgRole,
    /// Its name.
    pub name: &'a str,
    /// Its type.
    pub ty: &'a TensorType,
}

/// A function: arenas of values and nodes, a topological order, and named outputs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Function {
    /// The function's name (printed as `@name`).
    pub name: String,
    /// Every value ever created in this function.
    pub values: PrimaryMap<Value, ValueData>,
    /// Every node ever created in this function.
    pub nodes: PrimaryMap<Node, NodeData>,
    /// The live nodes in topological order.
    pub body: Vec<Node>,
    /// The function's results.
    pub outputs: Vec<Output>,
}

impl Function {
    /// An empty function.
    pub fn new(name: impl Into<String>) -> Self {
        Function {
            name: name.into(),
            ..Function::default()
        }
    }

    /// Creates a node with fresh result values of the given types, appended at the end of `body`.
    ///
    /// No type checking happens here: builders check with [`crate::infer()`] first, and the
    /// verifier checks whole functions.
    pub fn push_node(
        &mut self,
        op: Op,
        operands: Vec<Value>,
        result_types: Vec<TensorType>,
    ) -> Node {
        let node = self.create_node(op, operands, result_types);
        self.body.push(node);
        node
    }

    /// Creates a node whose result types are inferred from its operands ([`crate::infer()`]),
    /// tagged with `phase` and `stage`, without placing it in `body` (rewrites that rebuild the
    /// body place it themselves).
    pub fn create_inferred(
        &mut self,
        op: Op,
        operands: Vec<Value>,
        (phase, stage): (Phase, Option<u32>),
    ) -> Result<Node, crate::TypeError> {
        let types: Vec<&TensorType> = operands.iter().map(|&v| self.ty(v)).collect();
        let results = crate::infer(&op, &types)?;
        let node = self.create_node(op, operands, results);
        self.nodes[node].phase = phase;
        self.nodes[node].stage = stage;
        Ok(node)
    }

    /// Creates a node with fresh result values, without placing it in `body`.
    pub fn create_node(
        &mut self,
        op: Op,
        operands: Vec<Value>,
        result_types: Vec<TensorType>,
    ) -> Node {
        let node = self.nodes.next_key();
        let results = result_types
            .into_iter()
            .enumerate()
            .map(|(i, ty)| {
                self.values.push(ValueData {
                    ty,
                    def: node,
                    result_index: i as u32,
                })
            })
            .collect();
        self.nodes.push(NodeData {
            op,
            operands,
            results,
            phase: Phase::Forward,
            stage: None,
        })
    }

    /// The type of a value.
    pub fn ty(&self, value: Value) -> &TensorType {
        &self.values[value].ty
    }

    /// The node data of a node.
    pub fn node(&self, node: Node) -> &NodeData {
        &self.nodes[node]
    }

    /// The first result of a node (every op has at least one).
    pub fn result(&self, node: Node) -> Value {
        self.nodes[node].results[0]
    }

    /// The arguments (`input` and `param` nodes) in order.
    pub fn args(&self) -> impl Iterator<Item = Arg<'_>> + '_ {
        self.body.iter().filter_map(move |&node| {
            let data = &self.nodes[node];
            match &data.op {
                Op::Input { name, ty } | Op::Param { name, ty } => Some(Arg {
                    node,
                    value: data.results[0],
                    role: data.op.arg_role().expect("argument op"),
                    name,
                    ty,
                }),
                _ => None,
            }
        })
    }

    /// The data inputs, in order.
    pub fn data_inputs(&self) -> impl Iterator<Item = Arg<'_>> + '_ {
        self.args().filter(|a| a.role == ArgRole::Data)
    }

    /// The parameters, in order.
    pub fn params(&self) -> impl Iterator<Item = Arg<'_>> + '_ {
        self.args().filter(|a| a.role == ArgRole::Param)
    }

    /// Looks up an output by name.
    pub fn output(&self, name: &str) -> Option<Value> {
        self.outputs
            .iter()
            .find(|o| o.name == name)
            .map(|o| o.value)
    }

    /// Number of uses of each value by live nodes and outputs.
    pub fn use_counts(&self) -> cranelift_entity::SecondaryMap<Value, u32> {
        let mut counts = cranelift_entity::SecondaryMap::with_default(0);
        for &node in &self.body {
            for &v in &self.nodes[node].operands {
                counts[v] += 1;
            }
        }
        for o in &self.outputs {
            counts[o.value] += 1;
        }
        counts
    }
}

/// A module: several functions with distinct names.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Module {
    /// The functions, in text order.
    pub functions: Vec<Function>,
}

impl Module {
    /// An empty module.
    pub fn new() -> Self {
        Module::default()
    }

    /// A module holding one function.
    pub fn with_function(function: Function) -> Self {
        Module {
            functions: vec![function],
        }
    }

    /// Looks up a function by name.
    pub fn function(&self, name: &str) -> Option<&Function> {
        self.functions.iter().find(|f| f.name == name)
    }

    /// Looks up a function by name, mutably.
    pub fn function_mut(&mut self, name: &str) -> Option<&mut Function> {
        self.functions.iter_mut().find(|f| f.name == name)
    }
}
