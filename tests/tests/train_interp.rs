//! Training the MLP with the reference interpreter lowers the loss: the `autodiff` and
//! `optimizer` passes together make one function that is a whole training step, and feeding its
//! outputs back as the next step's arguments trains the model.

use std::collections::BTreeMap;
use std::path::Path;

use cleave_compiler::init::init_params;
use cleave_compiler::tensors::read_tensors;
use cleave_ir::models::{mlp, MlpConfig};
use cleave_ir::{run_function_named, Module, Precision, Tensor};
use cleave_passes::{PassContext, PassManager};

/// Trains an MLP 64-32-10 on the bundled digits for `steps` steps with the given optimizer
/// pipeline entry; returns the loss of every step.
fn train(optimizer: &str, steps: usize) -> Vec<f64> {
    let data = read_tensors(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/data/digits.safetensors"),
    )
    .unwrap();
    let (x, labels) = (&data["x"], &data["labels"]);
    let (n, features) = (x.shape[0], x.shape[1]);
    let batch = 32;

    let config = MlpConfig {
        batch,
        sizes: vec![features, 32, 10],
        ..MlpConfig::default()
    };
    let forward = mlp(&config).unwrap();
    let mut state: BTreeMap<String, Tensor> = init_params(&forward, 7);
    let mut module = Module::with_function(forward);
    let pm = PassManager::from_pipeline(&format!("autodiff,{optimizer}")).unwrap();
    let mut ctx = PassContext::default();
    pm.run(&mut module, &mut ctx, &mut |_| {}).unwrap();
    assert!(ctx.warnings.is_empty(), "{:?}", ctx.warnings);
    let step = &module.functions[0];
    for arg in step.args() {
        if arg.name == "opt.step" {
            state.insert(
                arg.name.to_string(),
                Tensor::scalar_f(cleave_ir::DType::F32, 1.0),
            );
        } else if arg.name.starts_with("opt.") {
            state.insert(arg.name.to_string(), Tensor::zeros(arg.ty));
        }
    }

    let xs = x.as_f64().unwrap();
    let ls = labels.as_i64().unwrap();
    let mut losses = Vec::new();
    for k in 0..steps {
        let start = (k * batch) % (n - batch);
        let mut args = state.clone();
        args.insert(
            "x".into(),
            Tensor::from_float(
                cleave_ir::DType::F32,
                vec![batch, features],
                xs[start * features..(start + batch) * features].to_vec(),
            ),
        );
        args.insert(
            "labels".into(),
            Tensor::from_i64(
                cleave_ir::DType::I32,
                vec![batch],
                ls[start..start + batch].to_vec(),
            ),
        );
        let outs = run_function_named(step, &args, Precision::F32).unwrap();
        for (o, t) in step.outputs.iter().zip(outs) {
            if o.name == "loss" {
                losses.push(t.as_f64().unwrap()[0]);
            } else if state.contains_key(&o.name) {
                state.insert(o.name.clone(), t);
            }
        }
    }
    losses
}

fn mean(s: &[f64]) -> f64 {
    s.iter().sum::<f64>() / s.len() as f64
}

#[test]
fn sgd_with_momentum_on_digits_lowers_the_loss() {
    let losses = train("optimizer{kind=momentum,lr=0.05,momentum=0.9}", 300);
    let (first, last) = (mean(&losses[..15]), mean(&losses[losses.len() - 15..]));
    assert!(
        last < 0.2 * first,
        "loss did not fall enough: first 15 steps {first:.4}, last 15 steps {last:.4}"
    );
}

#[test]
fn adamw_on_digits_lowers_the_loss() {
    let losses = train("optimizer{kind=adamw,lr=0.01,weight_decay=0.01}", 200);
    let (first, last) = (mean(&losses[..15]), mean(&losses[losses.len() - 15..]));
    assert!(
        last < 0.2 * first,
        "loss did not fall enough: first 15 steps {first:.4}, last 15 steps {last:.4}"
    );
}
