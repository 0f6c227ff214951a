//! The ONNX frontend: `.onnx` files (as `torch.onnx.export` writes them) → cleave IR.
//!
//! # What is imported, and how
//!
//! - **Decoding**: the protobuf types in [`proto`] are generated once from `runner/onnx/onnx.proto`
//!   by `runner/onnx/regenerate.sh` (prost-build with protox, so no `protoc`) and committed; the
//!   runtime dependency is `prost` alone.
//! - **Initializers** that are float tensors become `param` nodes under their own names, created
//!   when first used as data (so an initializer used only as a shape or index input never becomes
//!   a parameter). Integer and bool initializers are constants. Weights may live in an external
//!   file (`model.onnx.data`, which PyTorch writes even for small models); see [`tensor`].
//! - **Graph inputs** that are not initializers become `input` nodes. A symbolic dimension
//!   (`dim_param`, or a dimension with no value) is the batch dimension and is bound by
//!   [`ImportOptions::batch`]; without it the import fails naming the input and the dimension.
//! - **Opsets** 17 to 23 of the default domain are accepted ([`MIN_OPSET`], [`MAX_OPSET`]).
//! - **Ops** map to cleave's closed op set in [`ops`]. ONNX broadcasts implicitly (numpy rules);
//!   cleave does not, so every implicit broadcast becomes an explicit `broadcast` node. An
//!   unsupported op fails the import with one error listing every unsupported node.
//! - **Constant folding**: a node whose inputs are all constants is evaluated at import time with
//!   the reference interpreter, and `Shape` of a value is its static shape. The
//!   `Shape → Gather → Concat → Reshape` chains of PyTorch exports thus become constant shapes.
//! - **Export pitfalls** are reported as warnings: unnamed initializers (`onnx::MatMul_123` from
//!   the TorchScript exporter, `val_123` from the dynamo exporter's optimizer: a weight PyTorch
//!   pre-transposed into a new tensor, or a folded constant) and initializers shared by several
//!   layers of the same kind (PyTorch merges parameters with equal values), with how to
//!   re-export.
//!
//! Reading never panics on malformed input: every problem is an [`OnnxError`] that names it.

pub mod error;
mod graph;
pub mod ops;
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto;
pub mod tensor;

use std::collections::BTreeMap;
use std::path::Path;

use cleave_ir::interp::Tensor;
use cleave_ir::Module;
use prost::Message;

pub use error::{OnnxError, Result};

/// The oldest default-domain opset the importer accepts.
pub const MIN_OPSET: i64 = 17;
/// The newest default-domain opset the importer accepts.
pub const MAX_OPSET: i64 = 23;

/// Options of an import.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportOptions {
    /// The extent of a symbolic batch dimension (dimension 0) of the graph inputs; other
    /// symbolic dimensions are refused.
    pub batch: Option<usize>,
}

/// An imported model: one function named after the graph, and the warnings of the import.
#[derive(Clone, Debug)]
pub struct Imported {
    /// The module (not yet verified).
    pub module: Module,
    /// Export pitfalls found in the model (see the module docs).
    pub warnings: Vec<String>,
    /// The initializer values of the parameters, by name: the model's trained or initial
    /// weights.
    pub params: BTreeMap<String, Tensor>,
    /// What else the PyTorch module's `state_dict()` holds (from the dynamo exporter's
    /// signature): the persistent buffers' values, and each tied alias with the parameter it
    /// names (`lm_head.weight` → `transformer.wte.weight`).
    pub state: StateDictExtras,
}

/// See [`Imported::state`].
#[derive(Clone, Debug, Default)]
pub struct StateDictExtras {
    /// Persistent buffers (BatchNorm running statistics, …) by name.
    pub buffers: BTreeMap<String, Tensor>,
    /// (alias, parameter) pairs.
    pub aliases: Vec<(String, String)>,
    /// Persistent buffers the signature lists whose values the file does not hold (the graph
    /// never reads them).
    pub missing: Vec<String>,
    /// Parameters of the exported program that an optimized export no longer holds as
    /// parameters (merged into an equal tensor, or folded into constants); training such a file
    /// would train the wrong tensors, so `cleave train` and `cleave grad` refuse it.
    pub lost: Vec<String>,
}

/// Imports the model at `path`; external data is looked up next to it.
pub fn import_file(path: &Path, opts: &ImportOptions) -> Result<Imported> {
    let bytes = std::fs::read(path).map_err(|source| OnnxError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    import_bytes(&bytes, Some(base), opts)
}

/// Imports a model from its bytes. External data is resolved against `base_dir`; without one, a
/// model with external data is an error.
pub fn import_bytes(
    bytes: &[u8],
    base_dir: Option<&Path>,
    opts: &ImportOptions,
) -> Result<Imported> {
    let model = proto::ModelProto::decode(bytes).map_err(|e| OnnxError::Decode(e.to_string()))?;
    graph::import_model(&model, base_dir, opts)
}
