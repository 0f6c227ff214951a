//! The ONNX importer against models exported from PyTorch (`tests/onnx/torch/`, made by
//! `tests/onnx/torch/export_fixtures.py` with `torch.onnx.export(dynamo=True, optimize=False)`):
//! forward outputs, the loss and every parameter gradient agree with PyTorch's own (float32,
//! `torch.autograd`) within 1e-5 relative.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use cleave_compiler::load::{load_model_quiet, LoadOptions, LoadedModel};
use cleave_compiler::loss::LossKind;
use cleave_compiler::tensors::read_tensors;
use cleave_ir::interp::{run_function_named, Precision, Tensor};
use cleave_passes::{PassContext, PassManager};
use common::rel_err;

/// The batch the references were computed with (the exports have a symbolic batch dimension).
const BATCH: usize = 2;
const TOL: f64 = 1e-5;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/onnx/torch")
        .join(name)
}

/// A fixture: its file stem, the loss its references were computed with, and the labels name.
struct Case {
    name: &'static str,
    loss: LossKind,
    labels: &'static str,
}

const MLP: Case = Case {
    name: "mlp",
    loss: LossKind::CrossEntropy,
    labels: "labels",
};
const CNN: Case = Case {
    name: "cnn",
    loss: LossKind::CrossEntropy,
    labels: "labels",
};
const GPT: Case = Case {
    name: "gpt",
    loss: LossKind::Mse,
    labels: "target",
};

fn load(case: &Case, with_loss: bool) -> LoadedModel {
    let opts = LoadOptions {
        batch: Some(BATCH),
        loss: with_loss.then_some(case.loss),
        labels: with_loss.then(|| case.labels.to_string()),
        ..LoadOptions::default()
    };
    let loaded = load_model_quiet(&fixture(&format!("{}.onnx", case.name)), &opts)
        .unwrap_or_else(|e| panic!("{}: {e:#}", case.name));
    assert!(
        loaded.warnings.is_empty(),
        "{}: an optimize=False export warns: {:?}",
        case.name,
        loaded.warnings
    );
    loaded
}

fn reference(case: &Case) -> BTreeMap<String, Tensor> {
    read_tensors(&fixture(&format!("{}.ref.safetensors", case.name))).unwrap()
}

/// The parameters from the file, the data inputs (`in.<name>`) and the labels from the
/// reference.
fn args(loaded: &LoadedModel, reference: &BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    let mut args = loaded.params.clone();
    for input in loaded.module.functions[0].data_inputs() {
        let key = format!("in.{}", input.name);
        let t = reference
            .get(&key)
            .or_else(|| reference.get(input.name))
            .unwrap_or_else(|| panic!("no reference value for input `{}`", input.name));
        args.insert(input.name.to_string(), t.clone());
    }
    // PyTorch's labels are i64; the cross-entropy cleave appends takes i32 (as `cleave train` does).
    cleave_compiler::cli::coerce_indices(&loaded.module.functions[0], &mut args).unwrap();
    args
}

/// The worst relative error of the forward outputs against PyTorch's.
fn check_forward(case: &Case) -> f64 {
    let loaded = load(case, false);
    let reference = reference(case);
    let func = &loaded.module.functions[0];
    let out = run_function_named(func, &args(&loaded, &reference), Precision::F32).unwrap();
    assert_eq!(out.len(), func.outputs.len());
    let mut worst = 0.0f64;
    for (o, got) in func.outputs.iter().zip(&out) {
        let err = rel_err(got, &reference[&format!("out.{}", o.name)]);
        eprintln!("{}: out.{} rel err {err:e}", case.name, o.name);
        assert!(
            err <= TOL,
            "{}: output {} off by {err:e}",
            case.name,
            o.name
        );
        worst = worst.max(err);
    }
    worst
}

/// The worst relative errors of the loss and of the gradients against PyTorch's.
fn check_gradients(case: &Case) -> (f64, f64) {
    let mut loaded = load(case, true);
    let reference = reference(case);
    let pm = PassManager::from_pipeline("autodiff").unwrap();
    pm.run(&mut loaded.module, &mut PassContext::default(), &mut |_| {})
        .unwrap();
    cleave_ir::verify_module(&loaded.module).unwrap();
    let func = &loaded.module.functions[0];
    let out = run_function_named(func, &args(&loaded, &reference), Precision::F32).unwrap();
    let (mut loss_err, mut grad_err) = (0.0f64, 0.0f64);
    let mut grads = BTreeSet::new();
    for (o, got) in func.outputs.iter().zip(&out) {
        let key = if o.name == "loss" || o.name.starts_with("grad.") {
            o.name.clone()
        } else {
            format!("out.{}", o.name)
        };
        let want = reference
            .get(&key)
            .unwrap_or_else(|| panic!("{}: no PyTorch reference for `{key}`", case.name));
        let err = rel_err(got, want);
        eprintln!("{}: {key} rel err {err:e}", case.name);
        assert!(err <= TOL, "{}: {key} off by {err:e}", case.name);
        if o.name == "loss" {
            loss_err = err;
        } else if o.name.starts_with("grad.") {
            grad_err = grad_err.max(err);
            grads.insert(o.name.clone());
        }
    }
    // Every tensor PyTorch trains (`named_parameters()`) is a parameter with a gradient, and
    // nothing else is.
    let torch_params: BTreeSet<String> = reference
        .keys()
        .filter(|k| k.starts_with("grad."))
        .cloned()
        .collect();
    assert!(!torch_params.is_empty());
    assert_eq!(grads, torch_params, "{}: gradients vs PyTorch's", case.name);
    let params: BTreeSet<String> = loaded.params.keys().map(|k| format!("grad.{k}")).collect();
    assert_eq!(
        params, torch_params,
        "{}: parameters vs PyTorch's",
        case.name
    );
    (loss_err, grad_err)
}

#[test]
fn mlp_forward_matches_pytorch() {
    check_forward(&MLP);
}

#[test]
fn cnn_forward_matches_pytorch() {
    check_forward(&CNN);
}

#[test]
fn gpt_block_forward_matches_pytorch() {
    check_forward(&GPT);
}

#[test]
fn mlp_gradients_match_pytorch() {
    check_gradients(&MLP);
}

#[test]
fn cnn_gradients_match_pytorch() {
    check_gradients(&CNN);
}

#[test]
fn gpt_block_gradients_match_pytorch() {
    check_gradients(&GPT);
}

#[test]
fn gpt_block_weights_are_external() {
    // PyTorch wrote the large weights to `gpt.onnx.data`; they are read from there.
    assert!(fixture("gpt.onnx.data").exists());
    let loaded = load(&GPT, false);
    let w = &loaded.params["qkv.weight"];
    assert_eq!(w.shape, [48, 16]);
    assert!(w.to_f64_vec().iter().any(|x| *x != 0.0));
}

#[test]
fn optimized_export_is_recovered_from_its_signature() {
    // `ln_pitfall.onnx`: LayerNorm, Linear, LayerNorm on a 3-d input, exported with the default
    // `optimize=True`, which merged the freshly initialised `ln2.weight`/`ln2.bias` into
    // `ln1.weight`/`ln1.bias` and pre-transposed `fc.weight` into the unnamed `val_2`. The
    // exported program's signature and the nodes' module scopes say where each went: every
    // parameter is back under its name (`fc.weight` in PyTorch's [out, in] layout), with a note
    // each instead of the warnings.
    let opts = LoadOptions {
        batch: Some(BATCH),
        ..LoadOptions::default()
    };
    let loaded = load_model_quiet(&fixture("ln_pitfall.onnx"), &opts).unwrap();
    loaded.check_trainable(&fixture("ln_pitfall.onnx")).unwrap();
    let names: Vec<&str> = loaded.params.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "fc.bias",
            "fc.weight",
            "ln1.bias",
            "ln1.weight",
            "ln2.bias",
            "ln2.weight"
        ]
    );
    assert_eq!(loaded.params["fc.weight"].shape, [8, 8]);
    let w = &loaded.warnings;
    assert_eq!(w.len(), 3, "{w:?}");
    assert!(w.iter().all(|w| w.starts_with("note: `")), "{w:?}");
    assert!(
        w.iter()
            .any(|w| w.contains("`fc.weight` recovered from `val_2`")),
        "{w:?}"
    );
    assert!(
        w.iter()
            .any(|w| w.contains("`ln2.weight` recovered from `ln1.weight`")),
        "{w:?}"
    );
}
