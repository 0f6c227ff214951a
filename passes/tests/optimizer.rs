//! The optimizer updates against hand-derived values, two steps each.

use std::collections::BTreeMap;

use cleave_ir::tracer::Tracer;
use cleave_ir::{run_function_named, DType, Module, Precision, Tensor};
use cleave_passes::{PassContext, PassManager};

/// `loss = sum(w · x)`, so `grad.w = x`.
fn step_function(optimizer: &str) -> cleave_ir::Function {
    let mut t = Tracer::new("step");
    let x = t.input("x", DType::F64, vec![3]).unwrap();
    let w = t.param("w", DType::F64, vec![3]).unwrap();
    let p = t.mul(w, x).unwrap();
    let l = t.reduce_sum(p, vec![0]).unwrap();
    t.output("loss", l).unwrap();
    let mut m = Module::with_function(t.finish());
    let pm = PassManager::from_pipeline(&format!("autodiff,{optimizer}")).unwrap();
    pm.run(&mut m, &mut PassContext::default(), &mut |_| {})
        .unwrap();
    cleave_ir::verify_module(&m).unwrap();
    m.functions.remove(0)
}

fn run(f: &cleave_ir::Function, args: &BTreeMap<String, Tensor>) -> BTreeMap<String, Vec<f64>> {
    let outs = run_function_named(f, args, Precision::F64).unwrap();
    f.outputs
        .iter()
        .zip(outs)
        .map(|(o, t)| (o.name.clone(), t.as_f64().unwrap().to_vec()))
        .collect()
}

const X: [f64; 3] = [0.5, -2.0, 1.5];
const W: [f64; 3] = [1.0, 0.25, -0.5];

fn close(a: &[f64], b: &[f64]) {
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= 1e-12 * (1.0 + y.abs()), "{a:?} vs {b:?}");
    }
}

#[test]
fn sgd() {
    let f = step_function("optimizer{kind=sgd,lr=0.1}");
    let mut args = BTreeMap::new();
    args.insert("x".to_string(), Tensor::from_f64(vec![3], X.to_vec()));
    args.insert("w".to_string(), Tensor::from_f64(vec![3], W.to_vec()));
    let out = run(&f, &args);
    let want: Vec<f64> = (0..3).map(|i| W[i] - 0.1 * X[i]).collect();
    close(&out["w"], &want);
    assert!(
        !out.contains_key("grad.w"),
        "grads are dropped unless keep_grads"
    );
}

#[test]
fn momentum_two_steps() {
    let f = step_function("optimizer{kind=momentum,lr=0.1,momentum=0.9}");
    let mut args = BTreeMap::new();
    args.insert("x".to_string(), Tensor::from_f64(vec![3], X.to_vec()));
    args.insert("w".to_string(), Tensor::from_f64(vec![3], W.to_vec()));
    args.insert(
        "opt.momentum.w".to_string(),
        Tensor::from_f64(vec![3], vec![0.0; 3]),
    );
    let out1 = run(&f, &args);
    // b1 = g, w1 = w − lr·g; b2 = 0.9·g + g, w2 = w1 − lr·b2.
    let w1: Vec<f64> = (0..3).map(|i| W[i] - 0.1 * X[i]).collect();
    close(&out1["w"], &w1);
    close(&out1["opt.momentum.w"], &X);
    args.insert(
        "w".to_string(),
        Tensor::from_f64(vec![3], out1["w"].clone()),
    );
    args.insert(
        "opt.momentum.w".to_string(),
        Tensor::from_f64(vec![3], out1["opt.momentum.w"].clone()),
    );
    let out2 = run(&f, &args);
    let w2: Vec<f64> = (0..3).map(|i| w1[i] - 0.1 * 1.9 * X[i]).collect();
    close(&out2["w"], &w2);
}

#[test]
fn adamw_two_steps_with_bias_correction_and_decoupled_decay() {
    let (lr, b1, b2, eps, wd) = (0.01, 0.9, 0.999, 1e-8, 0.1);
    let f = step_function(&format!(
        "optimizer{{kind=adamw,lr={lr},beta1={b1},beta2={b2},eps={eps},weight_decay={wd},keep_grads}}"
    ));
    let mut w = W.to_vec();
    let mut m = vec![0.0; 3];
    let mut v = vec![0.0; 3];
    let mut args = BTreeMap::new();
    args.insert("x".to_string(), Tensor::from_f64(vec![3], X.to_vec()));
    for step in 1..=2 {
        args.insert("w".to_string(), Tensor::from_f64(vec![3], w.clone()));
        args.insert("opt.m.w".to_string(), Tensor::from_f64(vec![3], m.clone()));
        args.insert("opt.v.w".to_string(), Tensor::from_f64(vec![3], v.clone()));
        args.insert(
            "opt.step".to_string(),
            Tensor::scalar_f(DType::F32, step as f64),
        );
        let out = run(&f, &args);
        close(&out["grad.w"], &X);
        // PyTorch AdamW: w ← w − lr·λ·w, then w ← w − lr·m̂/(√v̂ + ε).
        for i in 0..3 {
            let g = X[i];
            m[i] = b1 * m[i] + (1.0 - b1) * g;
            v[i] = b2 * v[i] + (1.0 - b2) * g * g;
            let mh = m[i] / (1.0 - f64::powi(b1, step));
            let vh = v[i] / (1.0 - f64::powi(b2, step));
            w[i] -= lr * (mh / (vh.sqrt() + eps) + wd * w[i]);
        }
        close(&out["w"], &w);
        close(&out["opt.m.w"], &m);
        close(&out["opt.v.w"], &v);
        assert_eq!(out["opt.step"], vec![step as f64 + 1.0]);
    }
}
