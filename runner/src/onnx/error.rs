//! The importer's error type: every way an ONNX file can be rejected, with what is wrong and where.

use std::path::PathBuf;

/// Why an ONNX model could not be imported.
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    /// The model file or one of its external data files could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// The bytes are not a valid `ModelProto`.
    #[error("not a valid ONNX model (protobuf decoding failed: {0})")]
    Decode(String),
    /// The model's default-domain opset is outside the supported range.
    #[error(
        "the model uses ONNX opset {found}; cleave imports opsets {}..={} \
         (re-export with `opset_version` in that range)",
        super::MIN_OPSET,
        super::MAX_OPSET
    )]
    Opset {
        /// The opset the model imports (`None`: it imports no default-domain opset).
        found: String,
    },
    /// Nodes whose op the importer does not know; all of them are listed at once.
    #[error(
        "{} unsupported node(s): {}\nsupported ONNX ops: {}",
        nodes.len(),
        nodes.iter().map(|(n, o)| format!("{n} ({o})")).collect::<Vec<_>>().join(", "),
        super::ops::SUPPORTED_OPS.join(", ")
    )]
    UnsupportedOps {
        /// `(node name, op type)` of every unsupported node, in graph order.
        nodes: Vec<(String, String)>,
    },
    /// A node that cannot be imported: a bad attribute, a non-constant shape input, a shape rule
    /// that fails.
    #[error("node `{node}` ({op_type}): {message}")]
    Node {
        /// The node's name (or `#index` when unnamed).
        node: String,
        /// Its ONNX op type.
        op_type: String,
        /// What is wrong.
        message: String,
    },
    /// A problem with the model as a whole: a tensor, an input, an output, a missing value.
    #[error("{0}")]
    Model(String),
}

/// Shorthand for results of the importer.
pub type Result<T, E = OnnxError> = std::result::Result<T, E>;
