//! cleave IR: the data structures every other crate works on.
//!
//! - [`types`]: element types and static tensor types.
//! - [`op`]: the closed op enum, with each op's operand signature and shape rule.
//! - [`function`]: values and nodes in typed arenas, functions, modules, phases and stages.
//! - [`mod@infer`]: the shape rules as code.
//! - [`attrs`], [`printer`], [`parser`]: the text format (`Display` prints what the parser reads).
//! - [`verifier`]: the invariants every pass must preserve.
//! - [`interp`]: the reference interpreter, the oracle for every pass and backend.
//! - [`tracer`] and [`models`]: a Rust builder API with shape inference, and model builders on it.
//! - [`cost`]: FLOP and byte accounting.
#![warn(missing_docs)]

pub mod attrs;
pub mod cost;
pub mod function;
pub mod infer;
pub mod interp;
pub mod models;
pub mod op;
pub mod parser;
pub mod printer;
pub mod tracer;
pub mod types;
pub mod verifier;

pub use function::{Arg, Function, Module, Node, NodeData, Output, Phase, Value, ValueData};
pub use infer::{infer, TypeError};
pub use interp::{run_function, run_function_named, InterpError, Precision, Tensor, TensorData};
pub use op::{
    dropout_keep, ArgRole, Arity, BinaryOp, CompareOp, Literal, Op, PoolKind, ReduceKind, SteOp,
    UnaryOp,
};
pub use parser::{parse_function, parse_module, ParseError};
pub use types::{DType, Shape, TensorType, MAX_RANK};
pub use verifier::{verify_function, verify_module, VerifyError};
