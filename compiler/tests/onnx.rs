//! The ONNX importer against its fixtures (`tests/onnx/*.onnx`, made by
//! `tests/onnx/make_fixtures.py`), on small graphs built here, and on malformed files.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cleave_compiler::load::{load_model_quiet, LoadOptions, LoadedModel};
use cleave_compiler::loss::LossKind;
use cleave_compiler::onnx::proto::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto,
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};
use cleave_compiler::onnx::{import_bytes, ImportOptions, OnnxError};
use cleave_compiler::tensors::read_tensors;
use cleave_ir::interp::{run_function_named, Precision, Tensor};
use cleave_passes::{PassContext, PassManager};
use common::rel_err;
use proptest::prelude::*;
use proptest::test_runner::RngSeed;
use prost::Message;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/onnx")
        .join(name)
}

fn load(name: &str, loss: bool) -> LoadedModel {
    let opts = LoadOptions {
        batch: Some(4),
        loss: loss.then_some(LossKind::CrossEntropy),
        labels: loss.then(|| "labels".to_string()),
        ..LoadOptions::default()
    };
    load_model_quiet(&fixture(&format!("{name}.onnx")), &opts).unwrap_or_else(|e| panic!("{e:#}"))
}

fn args(loaded: &LoadedModel, reference: &BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    let mut args = loaded.params.clone();
    let func = &loaded.module.functions[0];
    for input in func.data_inputs() {
        args.insert(input.name.to_string(), reference[input.name].clone());
    }
    // int64 inputs are imported as int32 (cleave's index type), as `cleave run` converts them.
    cleave_compiler::cli::coerce_indices(func, &mut args).unwrap();
    args
}

fn check_forward(name: &str) {
    let loaded = load(name, false);
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let reference = read_tensors(&fixture(&format!("{name}.ref.safetensors"))).unwrap();
    let func = &loaded.module.functions[0];
    let out = run_function_named(func, &args(&loaded, &reference), Precision::F32).unwrap();
    for (o, got) in func.outputs.iter().zip(&out) {
        let want = &reference[&format!("out.{}", o.name)];
        let err = rel_err(got, want);
        assert!(err <= 1e-5, "{name}: output {} off by {err:e}", o.name);
    }
}

fn check_gradients(name: &str) {
    let mut loaded = load(name, true);
    let reference = read_tensors(&fixture(&format!("{name}.ref.safetensors"))).unwrap();
    let pm = PassManager::from_pipeline("autodiff").unwrap();
    pm.run(&mut loaded.module, &mut PassContext::default(), &mut |_| {})
        .unwrap();
    cleave_ir::verify_module(&loaded.module).unwrap();
    let func = &loaded.module.functions[0];
    // The reference labels are PyTorch's int64; the added loss takes i32 (converted, as the CLI
    // does).
    let mut call = args(&loaded, &reference);
    cleave_compiler::cli::coerce_indices(func, &mut call).unwrap();
    let out = run_function_named(func, &call, Precision::F32).unwrap();
    let mut n_grads = 0;
    for (o, got) in func.outputs.iter().zip(&out) {
        let key = if o.name == "loss" {
            "loss".to_string()
        } else if o.name.starts_with("grad.") {
            n_grads += 1;
            o.name.clone()
        } else {
            format!("out.{}", o.name)
        };
        let err = rel_err(got, &reference[&key]);
        assert!(err <= 1e-5, "{name}: {key} off by {err:e}");
    }
    assert_eq!(
        n_grads,
        loaded.params.len(),
        "{name}: one gradient per parameter"
    );
}

#[test]
fn mlp_forward_matches_reference() {
    check_forward("mlp");
}

#[test]
fn cnn_forward_matches_reference() {
    check_forward("cnn");
}

#[test]
fn gpt_forward_matches_reference() {
    check_forward("gpt");
}

#[test]
fn mlp_gradients_match_reference() {
    check_gradients("mlp");
}

#[test]
fn cnn_gradients_match_reference() {
    check_gradients("cnn");
}

#[test]
fn gpt_gradients_match_reference() {
    check_gradients("gpt");
}

#[test]
fn initializers_become_named_params_and_stats_constants() {
    let gpt = load("gpt", false);
    let names: Vec<String> = gpt.module.functions[0]
        .params()
        .map(|p| p.name.to_string())
        .collect();
    assert!(names.contains(&"wte.weight".to_string()), "{names:?}");
    assert!(
        names.contains(&"attn.c_attn.weight".to_string()),
        "{names:?}"
    );
    // The running statistics of the inference-form batch norm are constants, not parameters.
    let cnn = load("cnn", false);
    let names: Vec<String> = cnn.module.functions[0]
        .params()
        .map(|p| p.name.to_string())
        .collect();
    assert_eq!(
        names,
        [
            "conv.weight",
            "conv.bias",
            "bn.weight",
            "bn.bias",
            "fc.weight",
            "fc.bias"
        ]
    );
}

// ----- small graphs built in Rust -----

fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}

fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    NodeProto {
        op_type: Some(op.into()),
        name: Some(name.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn value_info(name: &str, dtype: DataType, dims: &[Result<i64, &str>]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| tensor_shape_proto::Dimension {
            value: Some(match d {
                Ok(v) => tensor_shape_proto::dimension::Value::DimValue(*v),
                Err(p) => tensor_shape_proto::dimension::Value::DimParam(p.to_string()),
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(dtype as i32),
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn float_init(name: &str, dims: &[i64], data: Vec<f32>) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(DataType::Float as i32),
        float_data: data,
        ..Default::default()
    }
}

fn int_init(name: &str, data: Vec<i64>) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: vec![data.len() as i64],
        data_type: Some(DataType::Int64 as i32),
        int64_data: data,
        ..Default::default()
    }
}

fn model(
    opset: i64,
    nodes: Vec<NodeProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: &[&str],
    inits: Vec<TensorProto>,
) -> Vec<u8> {
    ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(opset),
        }],
        graph: Some(GraphProto {
            name: Some("g".into()),
            node: nodes,
            input: inputs,
            output: outputs
                .iter()
                .map(|o| ValueInfoProto {
                    name: Some(o.to_string()),
                    ..Default::default()
                })
                .collect(),
            initializer: inits,
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

fn import(bytes: &[u8]) -> Result<cleave_compiler::onnx::Imported, OnnxError> {
    import_bytes(bytes, None, &ImportOptions { batch: Some(2) })
}

/// Runs a one-output imported graph on `x`.
fn run1(bytes: &[u8], x: Tensor) -> Tensor {
    let imported = import(bytes).unwrap_or_else(|e| panic!("{e}"));
    let func = &imported.module.functions[0];
    cleave_ir::verify_function(func).unwrap();
    let mut args = imported.params.clone();
    args.insert("x".into(), x);
    run_function_named(func, &args, Precision::F64)
        .unwrap()
        .remove(0)
}

#[test]
fn three_unsupported_ops_are_listed_in_one_error() {
    let x = value_info("x", DataType::Float, &[Ok(2), Ok(3)]);
    let mut fused = node("FusedMatMul", "fused", &["x", "x"], &["c"]);
    fused.domain = Some("com.microsoft".into());
    let bytes = model(
        18,
        vec![
            node("Relu", "ok", &["x"], &["a"]),
            node("LSTM", "lstm_1", &["a"], &["b"]),
            fused,
            node("NonMaxSuppression", "nms", &["c"], &["y"]),
        ],
        vec![x],
        &["y"],
        vec![],
    );
    let err = import(&bytes).unwrap_err();
    let OnnxError::UnsupportedOps { nodes } = &err else {
        panic!("{err}");
    };
    assert_eq!(nodes.len(), 3);
    let msg = err.to_string();
    for part in [
        "3 unsupported node(s)",
        "lstm_1 (LSTM)",
        "fused (com.microsoft::FusedMatMul)",
        "nms (NonMaxSuppression)",
        "supported ONNX ops: Abs, Add",
        "SoftmaxCrossEntropyLoss",
    ] {
        assert!(msg.contains(part), "{part:?} missing from: {msg}");
    }
}

#[test]
fn opset_outside_17_to_23_is_rejected() {
    for opset in [16, 24] {
        let bytes = model(opset, vec![], vec![], &[], vec![]);
        let msg = import(&bytes).unwrap_err().to_string();
        assert!(
            msg.contains(&format!("opset {opset}")) && msg.contains("17..=23"),
            "{msg}"
        );
    }
}

#[test]
fn unbound_symbolic_dimension_names_input_and_dim() {
    let x = value_info("x", DataType::Float, &[Err("batch_size"), Ok(3)]);
    let bytes = model(
        18,
        vec![node("Relu", "r", &["x"], &["y"])],
        vec![x],
        &["y"],
        vec![],
    );
    let msg = import_bytes(&bytes, None, &ImportOptions::default())
        .unwrap_err()
        .to_string();
    assert_eq!(
        msg,
        "graph input `x`: dimension 0 is symbolic (`batch_size`); bind it with `--batch N`"
    );
    let f = import(&bytes).unwrap().module.functions.remove(0);
    assert_eq!(f.data_inputs().next().unwrap().ty.shape, [2, 3]);
    // `--batch` binds dimension 0 only: a symbolic sequence length is refused by name.
    let x = value_info("x", DataType::Float, &[Err("batch"), Err("seq")]);
    let bytes = model(
        18,
        vec![node("Relu", "r", &["x"], &["y"])],
        vec![x],
        &["y"],
        vec![],
    );
    let msg = import(&bytes).unwrap_err().to_string();
    assert!(
        msg.starts_with("graph input `x`: dimension 1 is symbolic (`seq`): cleave needs static"),
        "{msg}"
    );
}

#[test]
fn reshape_zero_and_minus_one_from_folded_shape_chain() {
    // y = Reshape(x, Concat(Gather(Shape(x), [0]), [-1])): [2,3,4] -> [2,12].
    let x = value_info("x", DataType::Float, &[Ok(2), Ok(3), Ok(4)]);
    let bytes = model(
        18,
        vec![
            node("Shape", "s", &["x"], &["shape"]),
            node("Gather", "g", &["shape", "i0"], &["b"]),
            node("Concat", "c", &["b", "m1"], &["target"]),
            node("Reshape", "r", &["x", "target"], &["r0"]),
            node("Reshape", "r2", &["r0", "zero_m1"], &["y"]),
        ],
        vec![x],
        &["y"],
        vec![
            int_init("i0", vec![0]),
            int_init("m1", vec![-1]),
            int_init("zero_m1", vec![0, -1]),
        ],
    )
    .into_iter()
    .collect::<Vec<u8>>();
    let mut bytes_with_axis = ModelProto::decode(bytes.as_slice()).unwrap();
    bytes_with_axis.graph.as_mut().unwrap().node[2]
        .attribute
        .push(attr_int("axis", 0));
    let bytes = bytes_with_axis.encode_to_vec();
    let xs: Vec<f64> = (0..24).map(f64::from).collect();
    let y = run1(
        &bytes,
        Tensor::from_float(cleave_ir::DType::F32, [2, 3, 4], xs.clone()),
    );
    assert_eq!(y.shape, [2, 12]);
    assert_eq!(y.to_f64_vec(), xs);
    // Only the data reshapes remain: the shape chain was folded.
    let f = import(&bytes).unwrap().module.functions.remove(0);
    assert!(!f.to_string().contains("concat"), "{f}");
}

#[test]
fn broadcasting_add_becomes_explicit_broadcast() {
    let x = value_info("x", DataType::Float, &[Ok(2), Ok(3)]);
    let bytes = model(
        18,
        vec![node("Add", "a", &["x", "b"], &["y"])],
        vec![x],
        &["y"],
        vec![float_init("b", &[3], vec![10.0, 20.0, 30.0])],
    );
    let f = import(&bytes).unwrap().module.functions.remove(0);
    let text = f.to_string();
    assert!(text.contains("broadcast"), "{text}");
    assert!(text.contains("param {name = \"b\"}"), "{text}");
    let y = run1(
        &bytes,
        Tensor::from_f32([2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
    );
    assert_eq!(y.to_f64_vec(), [11.0, 22.0, 33.0, 14.0, 25.0, 36.0]);
}

#[test]
fn slice_with_negative_indices_and_reduce_keepdims() {
    // Slice(x, starts=[-2], ends=[i64::MAX], axes=[1]) then ReduceSum(axes=[1], keepdims=1).
    let x = value_info("x", DataType::Float, &[Ok(2), Ok(4)]);
    let bytes = model(
        18,
        vec![
            node("Slice", "s", &["x", "st", "en", "ax"], &["sl"]),
            node("ReduceSum", "r", &["sl", "ax"], &["y"]),
        ],
        vec![x],
        &["y"],
        vec![
            int_init("st", vec![-2]),
            int_init("en", vec![i64::MAX]),
            int_init("ax", vec![1]),
        ],
    );
    let y = run1(
        &bytes,
        Tensor::from_f32([2, 4], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]),
    );
    assert_eq!(y.shape, [2, 1]);
    assert_eq!(y.to_f64_vec(), [7.0, 15.0]);
}

#[test]
fn export_pitfalls_are_warned_with_the_reexport_flag() {
    let x = value_info("x", DataType::Float, &[Ok(2), Ok(3)]);
    let mut ln1 = node("LayerNormalization", "ln1", &["x", "shared.weight"], &["a"]);
    ln1.attribute.push(attr_int("axis", -1));
    let ln2 = node("LayerNormalization", "ln2", &["a", "shared.weight"], &["b"]);
    let bytes = model(
        18,
        vec![
            ln1,
            ln2,
            node("MatMul", "mm", &["b", "onnx::MatMul_7"], &["y"]),
        ],
        vec![x],
        &["y"],
        vec![
            float_init("shared.weight", &[3], vec![1.0; 3]),
            float_init("onnx::MatMul_7", &[3, 2], vec![0.5; 6]),
        ],
    );
    let w = import(&bytes).unwrap().warnings;
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(
        w[0].contains("`onnx::MatMul_7`") && w[0].contains("optimize=False"),
        "{}",
        w[0]
    );
    assert!(
        w[1].contains("`shared.weight` is shared by 2 LayerNormalization nodes (ln1, ln2)")
            && w[1].contains("do_constant_folding=False"),
        "{}",
        w[1]
    );
}

#[test]
fn mse_loss_is_added_on_the_first_output() {
    let opts = LoadOptions {
        batch: Some(4),
        loss: Some(LossKind::Mse),
        labels: Some("target".into()),
        ..LoadOptions::default()
    };
    let loaded = load_model_quiet(&fixture("mlp.onnx"), &opts).unwrap();
    let f = &loaded.module.functions[0];
    assert_eq!(f.outputs[0].name, "loss");
    let target = f.data_inputs().find(|a| a.name == "target").unwrap();
    assert_eq!(target.ty.to_string(), "f32[4,3]");
}

#[test]
fn external_data_outside_the_model_directory_is_refused() {
    let mut m = ModelProto::decode(std::fs::read(fixture("gpt.onnx")).unwrap().as_slice()).unwrap();
    let init = &mut m.graph.as_mut().unwrap().initializer[0];
    for e in &mut init.external_data {
        if e.key.as_deref() == Some("location") {
            e.value = Some("../../etc/passwd".into());
        }
    }
    let err = import_bytes(
        &m.encode_to_vec(),
        Some(&fixture("")),
        &ImportOptions { batch: Some(4) },
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("must be a relative path inside the model's directory"),
        "{err}"
    );
}

// ----- malformed files -----

fn mutate(bytes: &[u8], edits: &[(usize, u8, u8)], cut: Option<usize>) -> Vec<u8> {
    let mut b = bytes.to_vec();
    for &(pos, kind, val) in edits {
        if b.is_empty() {
            break;
        }
        let i = pos % b.len();
        match kind % 3 {
            0 => b[i] = val,
            1 => b.insert(i, val),
            _ => {
                b.remove(i);
            }
        }
    }
    if let Some(c) = cut {
        b.truncate(c % (b.len() + 1));
    }
    b
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, failure_persistence: None, rng_seed: RngSeed::Fixed(0x5eed_0006), ..ProptestConfig::default() })]

    /// Mutated and truncated fixtures give a module or an error, never a panic; errors say
    /// something.
    #[test]
    fn mutated_files_never_panic(
        which in 0usize..3,
        edits in proptest::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..6),
        cut in proptest::option::of(any::<usize>()),
    ) {
        let name = ["mlp.onnx", "cnn.onnx", "gpt.onnx"][which];
        let bytes = std::fs::read(fixture(name)).unwrap();
        let bad = mutate(&bytes, &edits, cut);
        match import_bytes(&bad, Some(&fixture("")), &ImportOptions { batch: Some(2) }) {
            Ok(imported) => {
                let _ = cleave_ir::verify_module(&imported.module);
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }
}
