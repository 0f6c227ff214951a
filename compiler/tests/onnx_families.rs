//! Model families exported from PyTorch (`tests/onnx/families/`, made by
//! `tests/onnx/families/export_families.py` from transformers' and torchvision's configuration
//! classes, randomly initialised): cleave's import, `--loss cross-entropy` and `autodiff` give
//! PyTorch's loss and every `named_parameters()` gradient within 1e-5 relative (float32), and 20
//! plain SGD steps on the interpreter follow PyTorch's losses within 1e-4.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use cleave_compiler::load::{load_model_quiet, LoadOptions, LoadedModel};
use cleave_compiler::loss::LossKind;
use cleave_compiler::tensors::read_tensors;
use cleave_ir::interp::{run_function_named, Precision, Tensor};
use cleave_passes::{PassContext, PassManager};
use common::rel_err;

const TOL: f64 = 1e-5;
const SGD_TOL: f64 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/onnx/families")
        .join(name)
}

fn load(name: &str) -> LoadedModel {
    let opts = LoadOptions {
        loss: Some(LossKind::CrossEntropy),
        labels: Some("labels".into()),
        ..LoadOptions::default()
    };
    load_model_quiet(&fixture(&format!("{name}.onnx")), &opts)
        .unwrap_or_else(|e| panic!("{name}: {e:#}"))
}

/// Loss and gradients against PyTorch's, then 20 SGD steps (see the module docs). A
/// `<m>_legacy` export (the TorchScript exporter's) of the same model has `<m>`'s reference.
fn check(name: &str) {
    let mut loaded = load(name);
    let family = name.strip_suffix("_legacy").unwrap_or(name);
    let reference = read_tensors(&fixture(&format!("{family}.ref.safetensors"))).unwrap();
    let lr = reference["sgd_lr"].to_f32_vec()[0];
    PassManager::from_pipeline("autodiff")
        .unwrap()
        .run(&mut loaded.module, &mut PassContext::default(), &mut |_| {})
        .unwrap();
    let func = &loaded.module.functions[0];
    let mut args = loaded.params.clone();
    for input in func.data_inputs() {
        let t = reference
            .get(&format!("in.{}", input.name))
            .or_else(|| reference.get(input.name))
            .unwrap_or_else(|| panic!("{name}: no reference for input `{}`", input.name));
        args.insert(input.name.to_string(), t.clone());
    }
    cleave_compiler::cli::coerce_indices(func, &mut args).unwrap();
    let run = |args: &BTreeMap<String, Tensor>| -> BTreeMap<String, Tensor> {
        let out = run_function_named(func, args, Precision::F32)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        func.outputs
            .iter()
            .map(|o| o.name.clone())
            .zip(out)
            .collect()
    };
    let out = run(&args);
    let loss_err = rel_err(&out["loss"], &reference["loss"]);
    assert!(loss_err <= TOL, "{name}: loss off by {loss_err:e}");
    let mut grad_err = 0.0f64;
    let torch: BTreeSet<&str> = reference
        .keys()
        .filter_map(|k| k.strip_prefix("grad."))
        .collect();
    let ours: BTreeSet<&str> = out.keys().filter_map(|k| k.strip_prefix("grad.")).collect();
    assert_eq!(
        ours, torch,
        "{name}: gradients by name vs PyTorch's named_parameters()"
    );
    for p in &torch {
        let err = rel_err(&out[&format!("grad.{p}")], &reference[&format!("grad.{p}")]);
        assert!(err <= TOL, "{name}: grad.{p} off by {err:e}");
        grad_err = grad_err.max(err);
    }
    // Plain SGD on the same batch, in f32 like PyTorch's.
    let want = reference["sgd_losses"].to_f64_vec();
    let mut sgd_err = 0.0f64;
    for (step, &w) in want.iter().enumerate() {
        let out = run(&args);
        let got = out["loss"].to_f64_vec()[0];
        let err = (got - w).abs() / w.abs().max(1.0);
        assert!(
            err <= SGD_TOL,
            "{name}: step {step}: loss {got} vs PyTorch's {w}"
        );
        sgd_err = sgd_err.max(err);
        for p in &torch {
            let g = out[&format!("grad.{p}")].to_f32_vec();
            let x = args.get_mut(*p).unwrap();
            let new: Vec<f32> = x
                .to_f32_vec()
                .iter()
                .zip(&g)
                .map(|(a, b)| a - lr * b)
                .collect();
            *x = Tensor::from_f32(x.shape.clone(), new);
        }
    }
    eprintln!(
        "{name}: loss {loss_err:.1e}, worst gradient {grad_err:.1e}, SGD losses {sgd_err:.1e}"
    );
}

#[test]
fn gpt2_matches_pytorch() {
    check("gpt2");
}

#[test]
fn llama_matches_pytorch() {
    check("llama");
}

#[test]
fn vit_matches_pytorch() {
    check("vit");
}

#[test]
fn resnet18_with_batch_statistics_matches_pytorch() {
    check("resnet18");
}

#[test]
fn tied_embedding_and_reused_block_match_pytorch() {
    check("tied");
}

/// The TorchScript exporter's ViT: its deduplicated norms and zero biases are one parameter per
/// layer again (`Identity` aliases split), so every `named_parameters()` gradient is there.
#[test]
fn vit_from_the_legacy_exporter_matches_pytorch() {
    let loaded = load("vit_legacy");
    assert!(
        loaded
            .warnings
            .iter()
            .any(|w| w.contains("12 parameter(s) the TorchScript exporter deduplicated")),
        "{:?}",
        loaded.warnings
    );
    check("vit_legacy");
}

/// The TorchScript exporter's training-mode ResNet: `BatchNormalization` with
/// `training_mode=1` and its (unread) running-statistics outputs.
#[test]
fn resnet18_from_the_legacy_exporter_matches_pytorch() {
    check("resnet18_legacy");
}

/// Runs `cleave ARGS`, which must succeed (`what` names the case in the failure).
fn cleave_ok(what: &str, args: &[&str]) {
    let o = cleave(args);
    assert!(
        o.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn cleave(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_cleave"))
        .args(args)
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .output()
        .unwrap()
}

/// A model exported with its loss inside: its single scalar output (`cross_entropy_loss`) is
/// the loss without any flag (with a note), and `cleave grad` gives PyTorch's gradients; with
/// two scalar outputs, `--loss-output` picks one, and without it the error lists the outputs
/// and names the flag.
#[test]
fn loss_inside_the_export_is_found_or_named() {
    let opts = LoadOptions::default();
    let loaded = load_model_quiet(&fixture("loss_inside.onnx"), &opts).unwrap();
    let f = &loaded.module.functions[0];
    assert!(f.output("loss").is_some());
    assert!(
        loaded
            .warnings
            .iter()
            .any(|w| w.contains("`cross_entropy_loss` is taken as the loss")),
        "{:?}",
        loaded.warnings
    );
    let dir = std::env::temp_dir().join(format!("cleave-loss-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let reference = read_tensors(&fixture("loss_inside.ref.safetensors")).unwrap();
    let inputs: BTreeMap<String, Tensor> = reference
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("in.").map(|n| (n.to_string(), v.clone())))
        .collect();
    let inputs_path = dir.join("inputs.safetensors");
    cleave_compiler::tensors::write_tensors(&inputs_path, &inputs).unwrap();
    let out = dir.join("grads.safetensors");
    for model in ["loss_inside", "two_scalars"] {
        let path = format!("tests/onnx/families/{model}.onnx");
        let mut args = vec![
            "grad",
            &path,
            "--inputs",
            inputs_path.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        if model == "two_scalars" {
            let o = cleave(&args);
            assert!(!o.status.success());
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(
                err.contains("--loss-output")
                    && err.contains("`cross_entropy_loss`")
                    && err.contains("`mean`"),
                "{err}"
            );
            args.extend(["--loss-output", "cross_entropy_loss"]);
        }
        cleave_ok(model, &args);
        let grads = read_tensors(&out).unwrap();
        for (k, want) in &reference {
            if let Some(p) = k.strip_prefix("grad.") {
                let err = rel_err(&grads[p], want);
                assert!(err <= TOL, "{model}: {p} off by {err:e}");
            }
        }
    }
    // A bad --loss-output names the outputs.
    let o = cleave(&[
        "grad",
        "tests/onnx/families/two_scalars.onnx",
        "--inputs",
        inputs_path.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--loss-output",
        "nope",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("no such output"),
        "{err}"
    );
    // Without --inputs, the data inputs the model needs are named.
    let o = cleave(&[
        "grad",
        "tests/onnx/families/loss_inside.onnx",
        "--out",
        out.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("x, labels") && err.contains("--inputs"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `cleave train` on an exported family: pipelined over 2 devices under ZB-H1, and with
/// recomputation under `--memory-limit` (its smallest feasible limit, which the error for a
/// one-byte limit names), the losses and weights equal one stage's bit for bit; parameters
/// keep their PyTorch names.
fn trains_pipelined(name: &str) {
    use cleave_compiler::pipeline_train::train;
    use cleave_compiler::train::{OptimizerArg, TrainArgs};
    let args = |p: usize, schedule: &str, limit: Option<u64>| TrainArgs {
        model: fixture(&format!("{name}.onnx")),
        data: fixture(&format!("{name}.data.safetensors")),
        loss: Some(LossKind::CrossEntropy),
        labels: Some("labels".into()),
        optimizer: OptimizerArg::Sgd,
        lr: Some(0.01),
        seed: Some(1),
        stages: p,
        microbatches: 2,
        schedule: schedule.into(),
        remat: limit.map(|_| "auto".to_string()),
        memory_limit: limit.map(|l| l.to_string()),
        ..common::args(2)
    };
    let base = train(&args(1, "1f1b", None)).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    let torch: BTreeSet<String> = read_tensors(&fixture(&format!("{name}.ref.safetensors")))
        .unwrap()
        .keys()
        .filter_map(|k| k.strip_prefix("grad.").map(String::from))
        .collect();
    let trained: BTreeSet<String> = base.params.keys().cloned().collect();
    assert_eq!(
        trained, torch,
        "{name}: trained parameters vs named_parameters()"
    );
    let zb = train(&args(2, "zb-h1", None)).unwrap_or_else(|e| panic!("{name} zb-h1: {e:#}"));
    common::assert_same(&format!("{name} P=2 zb-h1"), &base, &zb);
    let Err(e) = train(&args(2, "zb-h1", Some(1))) else {
        panic!("{name}: a one-byte limit is infeasible");
    };
    let limit = cleave_passes::remat::named_smallest(&e.to_string())
        .unwrap_or_else(|| panic!("{name}: no limit named in: {e}"));
    let remat = train(&args(2, "zb-h1", Some(limit)))
        .unwrap_or_else(|e| panic!("{name} at its smallest limit {limit}: {e:#}"));
    common::assert_same(&format!("{name} P=2 zb-h1 remat auto"), &base, &remat);
    assert!(
        remat.planned_devices.iter().all(|d| d.total() <= limit),
        "{name}: over {limit}"
    );
    eprintln!("{name}: trains pipelined and under its smallest limit {limit} bytes");
}

#[test]
fn families_train_pipelined_and_under_a_memory_limit() {
    for name in ["gpt2", "llama", "vit", "tied", "resnet18"] {
        trains_pipelined(name);
    }
}

/// Parameters keep their PyTorch names through training: a checkpoint of `cleave train`, written
/// out by `cleave export-weights --model`, has exactly the keys of the module's `state_dict()`
/// (parameters, persistent buffers, tied aliases: what `load_state_dict(strict=True)` wants),
/// with the trained values (`export_families.py --check-weights` loads it into PyTorch).
#[test]
fn export_weights_gives_the_state_dict_keys() {
    let dir = std::env::temp_dir().join(format!("cleave-export-{}", std::process::id()));
    for name in ["gpt2", "resnet18", "llama"] {
        let ckpt = dir.join(name);
        let _ = std::fs::remove_dir_all(&ckpt);
        let model = format!("tests/onnx/families/{name}.onnx");
        let data = format!("tests/onnx/families/{name}.data.safetensors");
        cleave_ok(
            name,
            &[
                "train",
                &model,
                "--data",
                &data,
                "--loss",
                "cross-entropy",
                "--labels",
                "labels",
                "--optimizer",
                "sgd",
                "--steps",
                "2",
                "--quiet",
                "--checkpoint",
                ckpt.to_str().unwrap(),
            ],
        );
        let out = dir.join(format!("{name}.safetensors"));
        cleave_ok(
            name,
            &[
                "export-weights",
                ckpt.to_str().unwrap(),
                "--model",
                &model,
                "--safetensors",
                out.to_str().unwrap(),
            ],
        );
        let weights = read_tensors(&out).unwrap();
        let text = std::fs::read_to_string(fixture(&format!("{name}.state_dict.json"))).unwrap();
        let want: BTreeSet<String> = serde_json::from_str::<Vec<String>>(&text)
            .unwrap()
            .into_iter()
            .collect();
        let have: BTreeSet<String> = weights.keys().cloned().collect();
        assert_eq!(have, want, "{name}: exported keys vs state_dict()");
        // Trained: every parameter moved from the file's initial value.
        let initial = load(name).params;
        let moved = initial
            .iter()
            .filter(|(k, v)| weights[*k].to_f64_vec() != v.to_f64_vec())
            .count();
        assert!(
            moved > initial.len() / 2,
            "{name}: {moved} of {} moved",
            initial.len()
        );
        if name == "gpt2" {
            assert_eq!(
                weights["lm.lm_head.weight"].to_f64_vec(),
                weights["lm.transformer.wte.weight"].to_f64_vec()
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Exports with the default `optimize=True`: where the exported program's signature and the
/// nodes' scopes show where every parameter went (merged equal LayerNorm tensors, weights stored
/// transposed), cleave puts them back and gives PyTorch's gradients under `named_parameters()`
/// names; where a parameter was folded into a constant (a position embedding read at constant
/// positions), `cleave grad` and `cleave train` refuse the file, naming it.
#[test]
fn optimized_exports_are_recovered_or_refused() {
    let opts = LoadOptions {
        loss: Some(LossKind::Mse),
        labels: Some("target".into()),
        ..LoadOptions::default()
    };
    let path = fixture("merged_opt.onnx");
    let mut loaded = load_model_quiet(&path, &opts).unwrap();
    loaded.check_trainable(&path).unwrap();
    assert_eq!(
        loaded
            .warnings
            .iter()
            .filter(|w| w.contains("recovered"))
            .count(),
        4,
        "{:?}",
        loaded.warnings
    );
    let reference = read_tensors(&fixture("merged_opt.ref.safetensors")).unwrap();
    PassManager::from_pipeline("autodiff")
        .unwrap()
        .run(&mut loaded.module, &mut PassContext::default(), &mut |_| {})
        .unwrap();
    let func = &loaded.module.functions[0];
    let mut args = loaded.params.clone();
    args.insert("x".into(), reference["in.x"].clone());
    args.insert("target".into(), reference["target"].clone());
    let out = run_function_named(func, &args, Precision::F32).unwrap();
    let out: BTreeMap<&str, &Tensor> = func
        .outputs
        .iter()
        .map(|o| o.name.as_str())
        .zip(&out)
        .collect();
    let mut n = 0;
    for (k, want) in &reference {
        if let Some(p) = k.strip_prefix("grad.") {
            let got = out[format!("grad.{p}").as_str()];
            let err = rel_err(got, want);
            assert!(err <= TOL, "merged_opt: {p} off by {err:e}");
            n += 1;
        }
    }
    assert_eq!(n, 8);
    let path = fixture("folded_opt.onnx");
    let loaded = load_model_quiet(&path, &opts).unwrap();
    let e = loaded.check_trainable(&path).unwrap_err().to_string();
    assert!(
        e.contains("pos.weight") && e.contains("optimize=False"),
        "{e}"
    );
    // The TorchScript exporter's default constant folding stores the weights transposed under
    // generated names, with no signature to say whose: refused, naming them.
    let path = fixture("legacy_folded.onnx");
    let opts = LoadOptions {
        loss: Some(LossKind::Mse),
        labels: Some("y".into()),
        ..LoadOptions::default()
    };
    let loaded = load_model_quiet(&path, &opts).unwrap();
    let e = loaded.check_trainable(&path).unwrap_err().to_string();
    assert!(
        e.contains("onnx::MatMul_18") && e.contains("do_constant_folding=False"),
        "{e}"
    );
}
