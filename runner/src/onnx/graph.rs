//! The import driver: opset check, initializers, graph inputs, the node walk with constant
//! folding, outputs, and the export-pitfall warnings.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::Path;

use cleave_ir::interp::{run_function, Precision, Tensor, TensorData};
use cleave_ir::tracer::{TraceError, Tracer};
use cleave_ir::{DType, Literal, Module, TensorType, Value};

use super::error::{OnnxError, Result};
use super::ops;
use super::proto::{
    attribute_proto::AttributeType, tensor_shape_proto::dimension, type_proto, AttributeProto,
    GraphProto, ModelProto, NodeProto, TensorProto, ValueInfoProto,
};
use super::tensor::{
    checked_numel, decode_tensor, ExternalFiles, MAX_CONST_ELEMENTS, MAX_ELEMENTS,
};
use super::{ImportOptions, Imported, MAX_OPSET, MIN_OPSET};

/// An ONNX value during the import.
#[derive(Clone, Debug)]
pub enum Val {
    /// A value of the function being built.
    Ir(Value),
    /// A value known at import time (a constant, an integer initializer, a folded shape).
    Const(Tensor),
    /// A float initializer: becomes a `param` when first used as data.
    Param(String),
    /// An ONNX sequence (from `SplitToSequence`).
    Seq(Vec<Val>),
    /// An output cleave does not compute (why): an error where a node or the graph reads it.
    Unavailable(String),
}

/// An error inside one node's lowering; the driver adds the node's name and op type.
#[derive(Debug)]
pub struct NodeErr(pub String);

impl fmt::Display for NodeErr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<String> for NodeErr {
    fn from(s: String) -> Self {
        NodeErr(s)
    }
}

impl From<&str> for NodeErr {
    fn from(s: &str) -> Self {
        NodeErr(s.to_string())
    }
}

impl From<TraceError> for NodeErr {
    fn from(e: TraceError) -> Self {
        NodeErr(e.to_string())
    }
}

/// The result type of lowerings.
pub type NResult<T> = std::result::Result<T, NodeErr>;

/// One node, with typed access to its attributes.
pub struct NodeCtx<'a> {
    /// The node.
    pub node: &'a NodeProto,
    /// Its op type.
    pub op: &'a str,
    /// The model's default-domain opset.
    pub opset: i64,
}

impl NodeCtx<'_> {
    fn attr(&self, name: &str) -> Option<&AttributeProto> {
        self.node
            .attribute
            .iter()
            .find(|a| a.name.as_deref() == Some(name))
    }

    fn attr_kind(a: &AttributeProto) -> Option<AttributeType> {
        a.r#type.and_then(|t| AttributeType::try_from(t).ok())
    }

    /// An integer attribute.
    pub fn int(&self, name: &str, default: i64) -> NResult<i64> {
        match self.attr(name) {
            None => Ok(default),
            Some(a) => {
                a.i.ok_or_else(|| format!("attribute `{name}` is not an integer").into())
            }
        }
    }

    /// A float attribute.
    pub fn float(&self, name: &str, default: f32) -> NResult<f32> {
        match self.attr(name) {
            None => Ok(default),
            Some(a) => {
                a.f.ok_or_else(|| format!("attribute `{name}` is not a float").into())
            }
        }
    }

    /// An integer-list attribute (`None` when absent).
    pub fn ints(&self, name: &str) -> Option<Vec<i64>> {
        self.attr(name).map(|a| a.ints.clone())
    }

    /// A float-list attribute (`None` when absent).
    pub fn floats(&self, name: &str) -> Option<Vec<f32>> {
        self.attr(name).map(|a| a.floats.clone())
    }

    /// A string attribute.
    pub fn string(&self, name: &str, default: &str) -> NResult<String> {
        match self.attr(name) {
            None => Ok(default.to_string()),
            Some(a) => match &a.s {
                Some(s) => Ok(String::from_utf8_lossy(s).into_owned()),
                None => Err(format!("attribute `{name}` is not a string").into()),
            },
        }
    }

    /// A tensor attribute.
    pub fn tensor(&self, name: &str) -> Option<&TensorProto> {
        self.attr(name).and_then(|a| a.t.as_ref())
    }

    /// The names of the attributes present (for `Constant`).
    pub fn attr_names(&self) -> Vec<(&str, Option<AttributeType>)> {
        self.node
            .attribute
            .iter()
            .map(|a| (a.name.as_deref().unwrap_or(""), Self::attr_kind(a)))
            .collect()
    }

    /// The number of declared outputs.
    pub fn n_outputs(&self) -> usize {
        self.node.output.len()
    }

    /// Whether output `i` is declared and used (has a non-empty name).
    pub fn output_used(&self, i: usize) -> bool {
        self.node.output.get(i).is_some_and(|o| !o.is_empty())
    }
}

/// The state of one import.
pub struct Importer<'a> {
    /// The function being built.
    pub t: Tracer,
    params: HashMap<String, Value>,
    inits: &'a HashMap<String, Tensor>,
    /// True while a node is lowered into a scratch tracer for constant folding.
    folding: bool,
    /// External tensors (for `Constant` nodes that store their value externally).
    pub external: &'a mut ExternalFiles,
}

impl Importer<'_> {
    /// The IR value of `v`, materialising constants and parameters.
    pub fn ir(&mut self, v: &Val) -> NResult<Value> {
        match v {
            Val::Ir(x) => Ok(*x),
            Val::Const(t) => Ok(self.constant(t)?),
            Val::Param(name) => {
                if self.folding {
                    return Err("internal error: a parameter reached constant folding".into());
                }
                if let Some(&p) = self.params.get(name) {
                    return Ok(p);
                }
                let init = &self.inits[name];
                let p = self.t.param(name, init.dtype, init.shape.clone())?;
                self.params.insert(name.clone(), p);
                Ok(p)
            }
            Val::Seq(_) => Err("a sequence cannot be used as a tensor".into()),
            Val::Unavailable(why) => Err(why.clone().into()),
        }
    }

    /// A constant node holding `t`. Outside constant folding, int64 becomes cleave's index
    /// type int32 (the runtimes have no int64; PyTorch's exports make positions, masks and
    /// indices int64), which must hold every value.
    pub fn constant(&mut self, t: &Tensor) -> NResult<Value> {
        if t.dtype == DType::I64 && !self.folding {
            let v = t.as_i64().unwrap_or_default();
            if let Some(bad) = v.iter().find(|&&x| i32::try_from(x).is_err()) {
                return Err(format!(
                    "an int64 constant holds {bad}, which does not fit cleave's int32 index type"
                )
                .into());
            }
            let narrow = Tensor::from_i64(DType::I32, t.shape.clone(), v.to_vec());
            return Ok(self.t.constant(narrow.ty(), literal_of(&narrow))?);
        }
        let value = literal_of(t);
        Ok(self.t.constant(t.ty(), value)?)
    }

    /// Whether the importer is evaluating constants (where int64 stays int64).
    pub fn folding(&self) -> bool {
        self.folding
    }

    /// The value of `v` if it is known at import time (constants and initializers).
    pub fn known<'v>(&'v self, v: &'v Val) -> Option<&'v Tensor> {
        match v {
            Val::Const(t) => Some(t),
            Val::Param(name) => self.inits.get(name),
            _ => None,
        }
    }

    /// The type of a tensor value.
    pub fn ty(&self, v: &Val) -> NResult<TensorType> {
        match v {
            Val::Ir(x) => Ok(self.t.ty(*x).clone()),
            Val::Const(t) => Ok(t.ty()),
            Val::Param(name) => Ok(self.inits[name].ty()),
            Val::Seq(_) => Err("a sequence cannot be used as a tensor".into()),
            Val::Unavailable(why) => Err(why.clone().into()),
        }
    }

    /// The shape of a tensor value.
    pub fn shape(&self, v: &Val) -> NResult<Vec<usize>> {
        Ok(self.ty(v)?.shape)
    }

    /// The elements of a value known at import time as integers; `what` names it in the error.
    pub fn const_ints(&self, v: &Val, what: &str) -> NResult<Vec<i64>> {
        let t = self.known(v).ok_or_else(|| {
            format!("`{what}` must be known at import time (a constant, an initializer or computed from static shapes)")
        })?;
        match &t.data {
            TensorData::Int(v) => Ok(v.clone()),
            TensorData::Bool(v) => Ok(v.iter().map(|&b| b as i64).collect()),
            TensorData::Float(v) => Ok(v.iter().map(|&x| x as i64).collect()),
        }
    }

    /// The elements of a value known at import time as floats.
    pub fn const_floats(&self, v: &Val, what: &str) -> NResult<Vec<f64>> {
        let t = self
            .known(v)
            .ok_or_else(|| format!("`{what}` must be known at import time"))?;
        Ok(t.to_f64_vec())
    }
}

/// A literal holding a tensor's elements.
pub fn literal_of(t: &Tensor) -> Literal {
    match &t.data {
        TensorData::Float(v) => Literal::Float(v.clone()),
        TensorData::Int(v) => Literal::Int(v.clone()),
        TensorData::Bool(v) => Literal::Bool(v.clone()),
    }
}

/// Checks a shape computed from model data against the importer's limits.
pub fn check_shape(shape: &[usize]) -> NResult<()> {
    if shape.len() > cleave_ir::MAX_RANK {
        return Err(format!(
            "rank {} exceeds the maximum {}",
            shape.len(),
            cleave_ir::MAX_RANK
        )
        .into());
    }
    if checked_numel(shape, MAX_ELEMENTS).is_none() {
        return Err(format!("shape {shape:?} has too many elements").into());
    }
    Ok(())
}

fn node_label(node: &NodeProto, index: usize) -> String {
    match node.name.as_deref() {
        Some(n) if !n.is_empty() => n.to_string(),
        _ => format!("#{index}"),
    }
}

fn is_default_domain(node: &NodeProto) -> bool {
    matches!(node.domain.as_deref(), None | Some("") | Some("ai.onnx"))
}

fn function_name(graph: &GraphProto) -> String {
    let name: String = graph
        .name
        .as_deref()
        .unwrap_or("")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() {
        "main".to_string()
    } else {
        name
    }
}

fn opset_of(model: &ModelProto) -> Result<i64> {
    let version = model
        .opset_import
        .iter()
        .find(|o| matches!(o.domain.as_deref(), None | Some("") | Some("ai.onnx")))
        .and_then(|o| o.version);
    match version {
        Some(v) if (MIN_OPSET..=MAX_OPSET).contains(&v) => Ok(v),
        Some(v) => Err(OnnxError::Opset {
            found: v.to_string(),
        }),
        None => Err(OnnxError::Opset {
            found: "none (no default-domain opset_import)".into(),
        }),
    }
}

/// The type of a graph input, with symbolic dimensions bound to the batch size.
fn input_type(vi: &ValueInfoProto, opts: &ImportOptions) -> Result<TensorType> {
    let name = vi.name.as_deref().unwrap_or("");
    let bad = |m: String| OnnxError::Model(format!("graph input `{name}`: {m}"));
    let tt = match vi.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(type_proto::Value::TensorType(tt)) => tt,
        _ => return Err(bad("is not a tensor".into())),
    };
    let code = tt.elem_type.unwrap_or(0);
    let dtype = super::tensor::dtype_of(code).ok_or_else(|| {
        bad(format!(
            "element type {} is not supported",
            super::tensor::dtype_code_name(code)
        ))
    })?;
    let dims = tt
        .shape
        .as_ref()
        .ok_or_else(|| bad("has no shape (cleave needs static shapes)".into()))?;
    let mut shape = Vec::new();
    for (i, d) in dims.dim.iter().enumerate() {
        let extent = match &d.value {
            Some(dimension::Value::DimValue(v)) if *v >= 0 => *v as usize,
            Some(dimension::Value::DimValue(v)) => {
                return Err(bad(format!("dimension {i} is negative ({v})")))
            }
            other => {
                let what = match other {
                    Some(dimension::Value::DimParam(p)) => format!("symbolic (`{p}`)"),
                    _ => "unknown".to_string(),
                };
                match (i, opts.batch) {
                    (0, Some(b)) => b,
                    (0, None) => {
                        return Err(bad(format!(
                            "dimension 0 is {what}; bind it with `--batch N`"
                        )))
                    }
                    _ => {
                        return Err(bad(format!(
                            "dimension {i} is {what}: cleave needs static shapes beyond the \
                             batch (`--batch` binds dimension 0 only); export with this \
                             dimension fixed (leave it out of `dynamic_shapes`)"
                        )))
                    }
                }
            }
        };
        shape.push(extent);
    }
    check_shape(&shape).map_err(|e| bad(e.0))?;
    // int64 inputs (PyTorch's token ids and class indices) are read as cleave's index type,
    // int32, which every backend supports; data given as int64 is narrowed when it fits.
    let dtype = if dtype == DType::I64 {
        DType::I32
    } else {
        dtype
    };
    Ok(TensorType::new(dtype, shape))
}

/// Imports a decoded model.
pub fn import_model(
    model: &ModelProto,
    base_dir: Option<&Path>,
    opts: &ImportOptions,
) -> Result<Imported> {
    let opset = opset_of(model)?;
    let graph = model
        .graph
        .as_ref()
        .ok_or_else(|| OnnxError::Model("the model has no graph".into()))?;

    // Every unsupported node, before anything else.
    let unsupported: Vec<(String, String)> = graph
        .node
        .iter()
        .enumerate()
        .filter(|(_, n)| {
            !is_default_domain(n)
                || !ops::SUPPORTED_OPS.contains(&n.op_type.as_deref().unwrap_or(""))
        })
        .map(|(i, n)| {
            let op = n.op_type.clone().unwrap_or_default();
            let op = match n.domain.as_deref() {
                Some(d) if !is_default_domain(n) => format!("{d}::{op}"),
                _ => op,
            };
            (node_label(n, i), op)
        })
        .collect();
    if !unsupported.is_empty() {
        return Err(OnnxError::UnsupportedOps { nodes: unsupported });
    }

    let mut external = ExternalFiles::new(base_dir);
    let mut vals: HashMap<String, Val> = HashMap::new();
    let mut inits: HashMap<String, Tensor> = HashMap::new();
    // PyTorch's dynamo exporter records each graph input's kind from the exported program's
    // signature; a buffer (rotary `inv_freq`, a mask) is state, not a parameter to train.
    let spec = |vi: &&crate::onnx::proto::ValueInfoProto, key: &str, value: &str| {
        vi.metadata_props.iter().any(|p| {
            p.key.as_deref() == Some(&format!("pkg.torch.export.graph_signature.InputSpec.{key}"))
                && p.value.as_deref() == Some(value)
        })
    };
    let buffers: HashSet<&str> = graph
        .value_info
        .iter()
        .chain(&graph.input)
        .filter(|vi| spec(vi, "kind", "BUFFER"))
        .filter_map(|vi| vi.name.as_deref())
        .collect();
    let persistent: HashSet<&str> = graph
        .value_info
        .iter()
        .chain(&graph.input)
        .filter(|vi| spec(vi, "kind", "BUFFER") && spec(vi, "persistent", "True"))
        .filter_map(|vi| vi.name.as_deref())
        .collect();
    let mut state = super::StateDictExtras::default();
    for init in &graph.initializer {
        let name = init.name.clone().unwrap_or_default();
        if name.is_empty() {
            return Err(OnnxError::Model("an initializer has no name".into()));
        }
        let t = decode_tensor(init, &mut external)?;
        if persistent.contains(name.as_str()) {
            state.buffers.insert(name.clone(), t.clone());
        }
        if t.dtype.is_float() && !buffers.contains(name.as_str()) {
            inits.insert(name.clone(), t);
            vals.insert(name.clone(), Val::Param(name));
        } else {
            vals.insert(name, Val::Const(t));
        }
    }
    // Persistent buffers the exported program lists but the graph never reads have no
    // initializer: BatchNorm's `num_batches_tracked` counter is 0 (cleave does not update the
    // running statistics), any other is reported missing.
    let signature = Signature::of(graph);
    for &target in &signature.persistent_buffers {
        if state.buffers.contains_key(target) {
            continue;
        }
        if target.ends_with("num_batches_tracked") {
            state.buffers.insert(
                target.to_string(),
                Tensor::from_i64(DType::I64, vec![], vec![0]),
            );
        } else {
            state.missing.push(target.to_string());
        }
    }
    // Every node's module (the dynamo exporter's scopes), read once for the analyses below.
    let scopes: Vec<Option<String>> = graph.node.iter().map(module_scope).collect();
    let mut notes = Vec::new();
    // The TorchScript exporter deduplicates parameters with equal values (freshly initialised
    // norms and zero biases) and keeps each dropped one's name as an `Identity` of the one it
    // kept: each is its own parameter again, starting from that value.
    let mut split_nodes = HashSet::new();
    if !signature.present {
        let mut split = Vec::new();
        for (i, node) in graph.node.iter().enumerate() {
            let (Some("Identity"), [src], [dst]) = (
                node.op_type.as_deref(),
                node.input.as_slice(),
                node.output.as_slice(),
            ) else {
                continue;
            };
            if is_generated_name(dst) || inits.contains_key(dst) || vals.contains_key(dst) {
                continue;
            }
            let Some(t) = inits.get(src).filter(|_| !is_generated_name(src)) else {
                continue;
            };
            inits.insert(dst.clone(), t.clone());
            vals.insert(dst.clone(), Val::Param(dst.clone()));
            split_nodes.insert(i);
            split.push(format!("`{dst}` (stored as `{src}`)"));
        }
        if !split.is_empty() {
            notes.push(format!(
                "note: {} parameter(s) the TorchScript exporter deduplicated because their \
                 values were equal are separate parameters again: {}",
                split.len(),
                split.join(", ")
            ));
        }
    }
    let (pitfall_warnings, merged) = pitfalls(graph, &scopes, &inits);
    let generated: Vec<String> = inits
        .keys()
        .filter(|n| is_generated_name(n))
        .cloned()
        .collect();
    // Tied weights take the name PyTorch's `named_parameters()` gives them.
    for (from, to) in tied_names(graph, &scopes, &inits) {
        notes.push(format!(
            "note: `{from}` is tied to `{to}` (one tensor used by both modules): it is one \
             parameter, named `{to}` as PyTorch's named_parameters() lists it"
        ));
        let t = inits.remove(&from).expect("an initializer");
        inits.insert(to.clone(), t);
        vals.insert(from.clone(), Val::Param(to.clone()));
        state.aliases.push((from, to));
    }
    // An optimized export (the optimizer's folded constants have generated names) that no
    // longer holds some of the exported program's parameters under their names has merged or
    // folded them. Without the program's signature (the legacy exporter, hand-made files), the
    // generated-name and the merged initializers are what is lost.
    if !signature.present {
        state.lost.extend(generated.iter().cloned());
        state.lost.extend(merged);
    } else if !generated.is_empty() {
        for &target in &signature.params {
            let aliased = state.aliases.iter().any(|(from, _)| from == target);
            if !inits.contains_key(target) && !aliased {
                state.lost.push(target.to_string());
            }
        }
    }
    // Put the lost parameters back where the file says where each one was: every one found.
    let mut overrides: HashMap<(usize, usize), Override> = HashMap::new();
    let mut recovered = false;
    if !state.lost.is_empty() && signature.present {
        if let Some(found) = recover(graph, &scopes, &inits, &state.lost) {
            for r in found {
                let t = &inits[&r.from];
                let value = if r.transposed {
                    transpose2(t)
                        .ok_or_else(|| OnnxError::Model(format!("`{}` is not a matrix", r.from)))?
                } else {
                    t.clone()
                };
                notes.push(format!(
                    "note: `{}` recovered from `{}` ({}) for the nodes of module `{}`",
                    r.to,
                    r.from,
                    if r.transposed {
                        "the exporter's optimizer stored it transposed"
                    } else {
                        "the exporter's optimizer merged the two equal tensors"
                    },
                    r.scope
                ));
                inits.insert(r.to.clone(), value);
                for at in r.uses {
                    overrides.insert(
                        at,
                        if r.transposed {
                            Override::Transposed(r.to.clone())
                        } else {
                            Override::Param(r.to.clone())
                        },
                    );
                }
            }
            state.lost.clear();
            recovered = true;
        }
    }
    // The pitfalls recovered are no longer worth a warning; the notes say what was done.
    let warnings: Vec<String> = if recovered {
        notes
    } else {
        pitfall_warnings.into_iter().chain(notes).collect()
    };

    // With the program's signature, the parameters are the ones it lists: any other float
    // initializer (a constant the optimizer folded, e.g. a position embedding already looked
    // up) is a constant, not something to train.
    let listed: HashSet<&str> = signature.params.iter().copied().collect();
    if !listed.is_empty() {
        for (name, v) in vals.iter_mut() {
            if let Val::Param(p) = v {
                if !listed.contains(p.as_str()) && !listed.contains(name.as_str()) {
                    *v = Val::Const(inits[p.as_str()].clone());
                }
            }
        }
    }

    let mut imp = Importer {
        t: Tracer::new(function_name(graph)),
        params: HashMap::new(),
        inits: &inits,
        folding: false,
        external: &mut external,
    };
    for vi in &graph.input {
        let name = vi.name.clone().unwrap_or_default();
        if vals.contains_key(&name) {
            continue; // An initializer listed as an input too (IR version < 4).
        }
        let ty = input_type(vi, opts)?;
        let v = imp
            .t
            .input(&name, ty.dtype, ty.shape)
            .map_err(|e| OnnxError::Model(format!("graph input `{name}`: {e}")))?;
        vals.insert(name, Val::Ir(v));
    }

    for (index, node) in graph.node.iter().enumerate() {
        if split_nodes.contains(&index) {
            continue; // Its output is a parameter of its own (above).
        }
        let ctx = NodeCtx {
            node,
            op: node.op_type.as_deref().unwrap_or(""),
            opset,
        };
        let node_err = |message: String| OnnxError::Node {
            node: node_label(node, index),
            op_type: ctx.op.to_string(),
            message,
        };
        let mut inputs = Vec::with_capacity(node.input.len());
        for (pos, name) in node.input.iter().enumerate() {
            if name.is_empty() {
                inputs.push(None);
                continue;
            }
            match overrides.get(&(index, pos)) {
                Some(Override::Param(p)) => {
                    inputs.push(Some(Val::Param(p.clone())));
                    continue;
                }
                Some(Override::Transposed(p)) => {
                    let w = imp.ir(&Val::Param(p.clone())).map_err(|e| node_err(e.0))?;
                    let wt = imp
                        .t
                        .transpose(w, vec![1, 0])
                        .map_err(|e| node_err(e.to_string()))?;
                    inputs.push(Some(Val::Ir(wt)));
                    continue;
                }
                None => {}
            }
            let v = vals.get(name).ok_or_else(|| {
                node_err(format!("input `{name}` is not defined before the node"))
            })?;
            inputs.push(Some(v.clone()));
        }
        let outputs = lower_node(&mut imp, &ctx, &inputs).map_err(|e| node_err(e.0))?;
        if outputs.len() < node.output.iter().filter(|o| !o.is_empty()).count() {
            return Err(node_err(format!(
                "declares {} outputs; cleave computes {}",
                node.output.len(),
                outputs.len()
            )));
        }
        for (name, v) in node.output.iter().zip(outputs) {
            if !name.is_empty() {
                vals.insert(name.clone(), v);
            }
        }
    }

    for out in &graph.output {
        let name = out.name.clone().unwrap_or_default();
        let v = vals
            .get(&name)
            .ok_or_else(|| OnnxError::Model(format!("graph output `{name}` is never computed")))?
            .clone();
        let value = imp
            .ir(&v)
            .map_err(|e| OnnxError::Model(format!("graph output `{name}`: {e}")))?;
        imp.t
            .output(&name, value)
            .map_err(|e| OnnxError::Model(format!("graph output `{name}`: {e}")))?;
    }
    let func = imp.t.finish();
    let params = func
        .params()
        .filter_map(|p| inits.get(p.name).map(|t| (p.name.to_string(), t.clone())))
        .collect();
    Ok(Imported {
        module: Module::with_function(func),
        warnings,
        params,
        state,
    })
}

/// Lowers one node, folding it to constants when all its inputs are known.
fn lower_node(imp: &mut Importer, ctx: &NodeCtx, inputs: &[Option<Val>]) -> NResult<Vec<Val>> {
    let all_const = inputs.iter().flatten().all(|v| matches!(v, Val::Const(_)))
        && inputs.iter().any(Option::is_some)
        && !imp.folding
        && ops::foldable(ctx.op);
    if !all_const {
        return ops::lower(imp, ctx, inputs);
    }
    // Lower into a scratch function, then evaluate it with the interpreter.
    let main = std::mem::replace(&mut imp.t, Tracer::new("fold"));
    imp.folding = true;
    let lowered = ops::lower(imp, ctx, inputs);
    imp.folding = false;
    let scratch = std::mem::replace(&mut imp.t, main);
    let outs = lowered?;
    let func = scratch.func();
    let scratch_elements = func
        .values
        .values()
        .try_fold(0usize, |acc, v| acc.checked_add(v.ty.num_elements()));
    if scratch_elements.is_none_or(|n| n > MAX_CONST_ELEMENTS) {
        // Too big to evaluate at import time: keep the computation in the function.
        return ops::lower(imp, ctx, inputs);
    }
    let mut func = scratch.finish();
    let mut ir_outs = Vec::new();
    for (i, v) in outs.iter().enumerate() {
        if let Val::Ir(x) = v {
            func.outputs.push(cleave_ir::Output {
                name: format!("o{i}"),
                value: *x,
            });
            ir_outs.push(i);
        }
    }
    let results = run_function(&func, &[], Precision::F32)
        .map_err(|e| format!("evaluating the constant node at import time: {e}"))?;
    let mut outs = outs;
    for (i, t) in ir_outs.into_iter().zip(results) {
        outs[i] = Val::Const(t);
    }
    Ok(outs)
}

/// Export pitfalls: unnamed initializers and initializers shared by layers of one kind; the
/// warnings, and the names of the shared (merged) initializers.
fn pitfalls(
    graph: &GraphProto,
    scopes: &[Option<String>],
    inits: &HashMap<String, Tensor>,
) -> (Vec<String>, Vec<String>) {
    const HOW: &str = "re-export with `torch.onnx.export(..., dynamo=True, optimize=False)` \
                       (or, with the TorchScript exporter, `dynamo=False, \
                       do_constant_folding=False`) so that parameters keep their names";
    let mut warnings = Vec::new();
    let mut merged = Vec::new();
    let mut unnamed: Vec<&str> = inits
        .keys()
        .map(String::as_str)
        .filter(|n| is_generated_name(n))
        .collect();
    unnamed.sort_unstable();
    if !unnamed.is_empty() {
        warnings.push(format!(
            "unnamed initializer(s) {}: PyTorch's default export pre-transposes or folds weights \
             into new tensors, so these parameters will not match the model's; {HOW}",
            unnamed
                .iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    // Merged parameters may be reached through `Identity` aliases.
    let alias = identity_aliases(graph, inits);
    // (initializer, op type, input position) -> (node, module scope) of each use.
    type Uses<'g> = BTreeMap<(&'g str, &'g str, usize), Vec<(String, Option<String>)>>;
    let mut uses: Uses = BTreeMap::new();
    for (i, node) in graph.node.iter().enumerate() {
        if node.op_type.as_deref() == Some("Identity") {
            continue;
        }
        for (pos, input) in node.input.iter().enumerate() {
            let input = alias.get(input.as_str()).copied().unwrap_or(input);
            // A generated name is a folded constant, already reported above, not a merged
            // parameter.
            if inits.contains_key(input) && !is_generated_name(input) {
                uses.entry((input, node.op_type.as_deref().unwrap_or(""), pos))
                    .or_default()
                    .push((node_label(node, i), scopes[i].clone()));
            }
        }
    }
    for ((init, op, _), users) in uses {
        // One module called several times (the dynamo exporter's scopes say so) reuses its
        // own parameter: not a merge.
        let one_module = users
            .first()
            .and_then(|u| u.1.as_ref())
            .is_some_and(|s| users.iter().all(|u| u.1.as_ref() == Some(s)));
        let nodes: Vec<String> = users.into_iter().map(|u| u.0).collect();
        if nodes.len() > 1 && !one_module {
            merged.push(init.to_string());
            warnings.push(format!(
                "initializer `{init}` is shared by {} {op} nodes ({}): PyTorch's export merges \
                 parameters with equal values (two freshly initialised layers become one), so \
                 these layers will train one tensor; {HOW}",
                nodes.len(),
                nodes.join(", ")
            ));
        }
    }
    merged.sort_unstable();
    merged.dedup();
    (warnings, merged)
}

/// The exported program's signature, which PyTorch's dynamo exporter stores as graph metadata
/// (`pkg.torch.export.ExportedProgram.graph_signature`, lines like
/// `p_fc_weight: PARAMETER target='fc.weight'`): the names of its parameters and of its
/// persistent buffers.
struct Signature<'g> {
    /// Whether the file has one (the legacy exporter and hand-made files do not).
    present: bool,
    params: Vec<&'g str>,
    persistent_buffers: Vec<&'g str>,
}

impl<'g> Signature<'g> {
    fn of(graph: &'g GraphProto) -> Self {
        let text = graph
            .metadata_props
            .iter()
            .find(|p| p.key.as_deref() == Some("pkg.torch.export.ExportedProgram.graph_signature"))
            .and_then(|p| p.value.as_deref())
            .unwrap_or("");
        let mut sig = Signature {
            present: !text.is_empty(),
            params: Vec::new(),
            persistent_buffers: Vec::new(),
        };
        for line in text.lines() {
            let Some(target) = line
                .split("target='")
                .nth(1)
                .and_then(|t| t.split('\'').next())
            else {
                continue;
            };
            if line.contains(": PARAMETER ") {
                sig.params.push(target);
            } else if line.contains(": BUFFER ") && line.contains("persistent=True") {
                sig.persistent_buffers.push(target);
            }
        }
        sig
    }
}

/// The TorchScript exporter aliases initializers through `Identity` nodes
/// (`ln2.weight = Identity(ln1.weight)`): each alias with the initializer it names.
fn identity_aliases<'g>(
    graph: &'g GraphProto,
    inits: &HashMap<String, Tensor>,
) -> HashMap<&'g str, &'g str> {
    let mut alias = HashMap::new();
    for node in &graph.node {
        if node.op_type.as_deref() == Some("Identity") {
            if let (Some(src), Some(dst)) = (node.input.first(), node.output.first()) {
                // A deduplicated parameter split again has an initializer of its own.
                if inits.contains_key(src) && !inits.contains_key(dst) {
                    alias.insert(dst.as_str(), src.as_str());
                }
            }
        }
    }
    alias
}

/// How a node reads a recovered parameter instead of the initializer the file gives it.
enum Override {
    /// The parameter as it is.
    Param(String),
    /// The parameter transposed (the file held its transpose).
    Transposed(String),
}

/// A lost parameter found: `to` is read by the nodes `uses` (node index, input position) of
/// module `scope`, where the file gives them `from` (merged, or its transpose).
struct Recovered {
    from: String,
    to: String,
    scope: String,
    transposed: bool,
    uses: Vec<(usize, usize)>,
}

/// A matrix's transpose.
fn transpose2(t: &Tensor) -> Option<Tensor> {
    let [r, c] = t.shape[..] else {
        return None;
    };
    let v = t.to_f64_vec();
    let out: Vec<f64> = (0..c)
        .flat_map(|j| (0..r).map(move |i| (i, j)))
        .map(|(i, j)| v[i * c + j])
        .collect();
    Some(Tensor::from_float(t.dtype, [c, r], out))
}

/// Where the exported program's lost parameters went, if every one is found: a parameter
/// `M.attr` whose module `M`'s nodes read another module's initializer ending in `.attr` (two
/// equal tensors merged), or, for `M.weight` of a `Linear`, read a generated initializer as a
/// `MatMul`'s right operand (the weight stored transposed). `None` when any is not found (a
/// parameter folded into constants cannot be put back).
fn recover(
    graph: &GraphProto,
    scopes: &[Option<String>],
    inits: &HashMap<String, Tensor>,
    lost: &[String],
) -> Option<Vec<Recovered>> {
    let mut out = Vec::new();
    for target in lost {
        let (scope, attr) = target.rsplit_once('.')?;
        let mut found: Option<Recovered> = None;
        for (i, node) in graph.node.iter().enumerate() {
            if scopes[i].as_deref() != Some(scope) {
                continue;
            }
            let linear = node.metadata_props.iter().any(|p| {
                p.key.as_deref() == Some("pkg.torch.onnx.class_hierarchy")
                    && p.value
                        .as_deref()
                        .is_some_and(|v| v.contains("nn.modules.linear.Linear"))
            });
            for (pos, input) in node.input.iter().enumerate() {
                if !inits.contains_key(input) {
                    continue;
                }
                let merged = !is_generated_name(input)
                    && input.ends_with(&format!(".{attr}"))
                    && input.rsplit_once('.').map(|(m, _)| m) != Some(scope);
                let transposed = is_generated_name(input)
                    && attr == "weight"
                    && linear
                    && node.op_type.as_deref() == Some("MatMul")
                    && pos == 1
                    && inits[input].shape.len() == 2;
                if !(merged || transposed) {
                    continue;
                }
                match &mut found {
                    Some(r) if r.from == *input => r.uses.push((i, pos)),
                    Some(_) => return None,
                    None => {
                        found = Some(Recovered {
                            from: input.clone(),
                            to: target.clone(),
                            scope: scope.to_string(),
                            transposed,
                            uses: vec![(i, pos)],
                        })
                    }
                }
            }
        }
        out.push(found?);
    }
    Some(out)
}

/// The module path of a node, from the dynamo exporter's `pkg.torch.onnx.name_scopes` (a list
/// like `['', 'm', 'm.transformer', 'm.transformer.wte', 'embedding']`: the module chain, then
/// the op); `None` without that metadata.
fn module_scope(node: &NodeProto) -> Option<String> {
    let text = node
        .metadata_props
        .iter()
        .find(|p| p.key.as_deref() == Some("pkg.torch.onnx.name_scopes"))?
        .value
        .as_deref()?;
    let items: Vec<&str> = text
        .trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .map(|s| s.trim().trim_matches('\'').trim_matches('"'))
        .collect();
    let mut scope = "";
    for item in items {
        if item.is_empty() {
            continue;
        }
        let extends =
            scope.is_empty() || item.strip_prefix(scope).is_some_and(|r| r.starts_with('.'));
        if !extends {
            break;
        }
        scope = item;
    }
    Some(scope.to_string())
}

/// Initializers used by several modules (a tied weight such as GPT-2's `lm_head.weight`, which
/// is `transformer.wte.weight`): the name the exporter gave (`<module>.<attr>` of one user),
/// and the name of the same attribute under the first module that uses it in graph order,
/// which is the name `named_parameters()` lists (the first registration; models register the
/// embedding before the head that reuses it). Needs the dynamo exporter's scopes.
fn tied_names(
    graph: &GraphProto,
    scopes: &[Option<String>],
    inits: &HashMap<String, Tensor>,
) -> Vec<(String, String)> {
    let alias = identity_aliases(graph, inits);
    // Per initializer, the modules that use it, in graph order.
    let mut users: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (node, scope) in graph.node.iter().zip(scopes) {
        if node.op_type.as_deref() == Some("Identity") {
            continue;
        }
        let Some(scope) = scope.clone() else {
            continue;
        };
        for input in &node.input {
            let input = alias.get(input.as_str()).copied().unwrap_or(input);
            if inits.contains_key(input) {
                let list = users.entry(input).or_default();
                if !list.contains(&scope) {
                    list.push(scope.clone());
                }
            }
        }
    }
    let mut out = Vec::new();
    for (name, scopes) in users {
        let Some(first) = scopes.first().filter(|s| !s.is_empty()) else {
            continue;
        };
        // The attribute: what follows the scope of the user the exporter named it after.
        let attr = scopes.iter().find_map(|s| {
            name.strip_prefix(s.as_str())
                .and_then(|r| r.strip_prefix('.'))
                .filter(|r| !r.is_empty() && !s.is_empty())
        });
        if let Some(attr) = attr {
            let to = format!("{first}.{attr}");
            if to != name && !inits.contains_key(&to) {
                out.push((name.to_string(), to));
            }
        }
    }
    out
}

/// Whether an initializer name was made up by the exporter rather than taken from the model's
/// parameters: `onnx::MatMul_123` or `123` (the TorchScript exporter), `val_123` (the dynamo
/// exporter's optimizer, for a pre-transposed weight or a folded constant).
fn is_generated_name(name: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
    name.starts_with("onnx::") || digits(name) || name.strip_prefix("val_").is_some_and(digits)
}

/// The dtype of an ONNX `to`-style attribute.
pub fn attr_dtype(code: i64) -> NResult<DType> {
    i32::try_from(code)
        .ok()
        .and_then(super::tensor::dtype_of)
        .ok_or_else(|| {
            format!(
                "element type {} is not supported",
                super::tensor::dtype_code_name(code as i32)
            )
            .into()
        })
}
