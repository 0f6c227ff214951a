//! Whole models agree with reference gradients computed by JAX in f32.
//!
//! Each fixture `tests/reference/<model>.safetensors` (made by `tests/reference/make_fixtures.py`)
//! holds parameters `param.<name>`, data inputs `input.<name>`, the JAX loss `loss` and the JAX
//! gradients `grad.<name>`; its metadata `new_model_args` is the `cleave new-model` argument list
//! that builds the model. The test rebuilds the model with those arguments, runs the `autodiff`
//! pass (loss mode) and the reference interpreter in [`Precision::F32`], and compares.
//!
//! # The error measure
//!
//! For a tensor with cleave values `a` and JAX values `b`, the relative error is
//! `max_i |a_i − b_i| / max_i |b_i|`: the largest elementwise difference measured against the
//! tensor's own scale (so elements much smaller than their neighbours, whose f32 rounding noise is
//! set by the larger terms they were computed from, do not dominate). It must be ≤ 1e-5 for the
//! loss and for every gradient.
//!
//! The one exception are gradients that are *exactly zero in exact arithmetic*: the key bias of
//! attention (`attn.wk.bias`) adds `q·b` to every score of a softmax row, which the softmax
//! ignores. Both JAX and cleave produce pure rounding noise there (~1e-9), so a relative error is
//! meaningless; instead both sides must be ≤ 1e-6 × the largest gradient element of the model.
//! The test checks that exactly these tensors are (near) zero, so no other tensor can slip into
//! this weaker check.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cleave_compiler::load::load_module;
use cleave_compiler::tensors::read_tensors;
use cleave_ir::interp::{run_function_named, Precision, Tensor};
use cleave_passes::autodiff::GRAD_PREFIX;
use cleave_passes::{PassContext, PassManager};

const TOLERANCE: f64 = 1e-5;
/// Bound on structurally zero gradients, relative to the model's largest gradient element.
const ZERO_TOLERANCE: f64 = 1e-6;

fn reference_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("reference")
}

/// The `__metadata__` of a safetensors file.
fn metadata(path: &Path) -> BTreeMap<String, String> {
    let bytes = std::fs::read(path).unwrap();
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    let meta = header
        .get("__metadata__")
        .and_then(|m| m.as_object())
        .unwrap_or_else(|| panic!("{}: no __metadata__", path.display()));
    meta.iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect()
}

/// `max|a − b| / max|b|` (see the module docs).
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.shape, b.shape);
    let (a, b) = (a.to_f64_vec(), b.to_f64_vec());
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    let scale = b.iter().map(|y| y.abs()).fold(0.0, f64::max);
    if scale == 0.0 {
        diff
    } else {
        diff / scale
    }
}

fn max_abs(t: &Tensor) -> f64 {
    t.to_f64_vec().iter().map(|x| x.abs()).fold(0.0, f64::max)
}

/// Gradients that are exactly zero in exact arithmetic (see the module docs).
fn structurally_zero(name: &str) -> bool {
    name.ends_with("attn.wk.bias")
}

/// The errors of one fixture: the loss's and each gradient's.
struct Report {
    loss: f64,
    grads: BTreeMap<String, f64>,
}

fn check_model(model: &str) -> Report {
    let fixture = reference_dir().join(format!("{model}.safetensors"));
    let meta = metadata(&fixture);
    assert_eq!(meta["model"], model);
    let args: Vec<String> = serde_json::from_str(&meta["new_model_args"]).unwrap();

    // Rebuild the model exactly as the fixture script did.
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("reference_grads");
    std::fs::create_dir_all(&dir).unwrap();
    let cir = dir.join(format!("{model}.cir"));
    let mut argv = vec!["cleave".to_string(), "new-model".to_string()];
    argv.extend(args.iter().cloned());
    argv.extend(["-o".to_string(), cir.display().to_string()]);
    cleave_compiler::cli::main_with_args(argv).unwrap();
    let mut module = load_module(&cir, &Default::default()).unwrap();

    let mut pm = PassManager::from_pipeline("autodiff{mode=loss}").unwrap();
    pm.verify_each = true;
    let mut ctx = PassContext::default();
    pm.run(&mut module, &mut ctx, &mut |_| {}).unwrap();
    assert!(ctx.warnings.is_empty(), "{model}: {:?}", ctx.warnings);
    let func = &module.functions[0];

    // Split the fixture.
    let mut args: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut want_grads: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut want_loss = None;
    for (name, t) in read_tensors(&fixture).unwrap() {
        if let Some(n) = name.strip_prefix("param.") {
            args.insert(n.to_string(), t);
        } else if let Some(n) = name.strip_prefix("input.") {
            args.insert(n.to_string(), t);
        } else if let Some(n) = name.strip_prefix("grad.") {
            want_grads.insert(n.to_string(), t);
        } else if name == "loss" {
            want_loss = Some(t);
        } else {
            panic!("{model}: unexpected fixture tensor {name}");
        }
    }
    let want_loss = want_loss.expect("fixture has a loss");

    // Every parameter of the model has a fixture gradient, and nothing else does.
    let params: Vec<String> = func.params().map(|p| p.name.to_string()).collect();
    let fixture_names: Vec<String> = want_grads.keys().cloned().collect();
    let mut sorted = params.clone();
    sorted.sort();
    assert_eq!(
        sorted, fixture_names,
        "{model}: model parameters vs fixture gradients"
    );

    let results = run_function_named(func, &args, Precision::F32).unwrap();
    let mut got: BTreeMap<&str, &Tensor> = BTreeMap::new();
    for (o, t) in func.outputs.iter().zip(&results) {
        got.insert(o.name.as_str(), t);
    }
    let loss = rel_err(got["loss"], &want_loss);

    let scale = want_grads.values().map(max_abs).fold(0.0, f64::max);
    assert!(scale > 0.0, "{model}: all reference gradients are zero");
    let mut grads = BTreeMap::new();
    for p in &params {
        let name = format!("{GRAD_PREFIX}{p}");
        let have = got
            .get(name.as_str())
            .unwrap_or_else(|| panic!("{model}: no output {name}"));
        let want = &want_grads[p];
        assert_eq!(have.shape, want.shape, "{model}: {p}");
        let near_zero = max_abs(want) <= ZERO_TOLERANCE * scale;
        assert_eq!(
            near_zero,
            structurally_zero(p),
            "{model}: {p}: reference gradient max {:e} vs model scale {scale:e}",
            max_abs(want)
        );
        let err = if near_zero {
            max_abs(have).max(max_abs(want)) / scale
        } else {
            rel_err(have, want)
        };
        grads.insert(p.clone(), err);
    }
    std::fs::remove_file(&cir).ok();
    Report { loss, grads }
}

fn assert_report(model: &str, r: &Report) {
    let (worst, worst_err) = r
        .grads
        .iter()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(k, v)| (k.clone(), *v))
        .unwrap();
    eprintln!(
        "{model}: loss rel err {:.2e}, max grad rel err {worst_err:.2e} ({worst})",
        r.loss
    );
    assert!(r.loss <= TOLERANCE, "{model}: loss rel err {:e}", r.loss);
    let bad: Vec<String> = r
        .grads
        .iter()
        .filter(|(p, &e)| {
            e > if structurally_zero(p) {
                ZERO_TOLERANCE
            } else {
                TOLERANCE
            }
        })
        .map(|(p, e)| format!("{p}: {e:e}"))
        .collect();
    assert!(bad.is_empty(), "{model}: gradients off: {bad:?}");
}

#[test]
fn mlp_matches_jax() {
    let r = check_model("mlp");
    assert_eq!(r.grads.len(), 6);
    assert_report("mlp", &r);
}

#[test]
fn cnn_matches_jax() {
    let r = check_model("cnn");
    assert_eq!(r.grads.len(), 6);
    assert_report("cnn", &r);
}

#[test]
fn gpt_tiny_matches_jax() {
    let r = check_model("gpt");
    // wte, wpe, 16 per layer × 2, ln_f weight and bias.
    assert_eq!(r.grads.len(), 36);
    assert_report("gpt", &r);
}
