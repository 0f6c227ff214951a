//! Gradients of a tied weight and of a split product against closed forms derived by hand.

use std::collections::BTreeMap;

use cleave_ir::tracer::Tracer;
use cleave_ir::{run_function_named, DType, Function, Precision, Tensor};
use cleave_passes::autodiff::{differentiate, Mode};

const X: [[f64; 3]; 2] = [[0.5, -1.0, 2.0], [1.5, 0.25, -0.5]];

fn run(f: &Function, args: &BTreeMap<String, Tensor>) -> BTreeMap<String, Vec<f64>> {
    let outs = run_function_named(f, args, Precision::F64).unwrap();
    f.outputs
        .iter()
        .zip(outs)
        .map(|(o, t)| (o.name.clone(), t.as_f64().unwrap().to_vec()))
        .collect()
}

fn matmul(a: &[Vec<f64>], b: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let (n, k, m) = (a.len(), b.len(), b[0].len());
    (0..n)
        .map(|i| {
            (0..m)
                .map(|j| (0..k).map(|l| a[i][l] * b[l][j]).sum())
                .collect()
        })
        .collect()
}

fn transpose(a: &[Vec<f64>]) -> Vec<Vec<f64>> {
    (0..a[0].len())
        .map(|j| a.iter().map(|row| row[j]).collect())
        .collect()
}

fn flat(a: &[Vec<f64>]) -> Vec<f64> {
    a.iter().flatten().copied().collect()
}

fn close(a: &[f64], b: &[f64]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= 1e-12 * (1.0 + y.abs()), "{a:?}\n{b:?}");
    }
}

/// `L = Σ (X·W·W)`: with `G = 1` (all ones), `dL/dW = Xᵀ·G·Wᵀ + (X·W)ᵀ·G` — one term per use.
#[test]
fn tied_weight_used_twice_in_a_chain() {
    let w: Vec<Vec<f64>> = vec![
        vec![1.0, -0.5, 0.25],
        vec![0.0, 2.0, -1.0],
        vec![0.5, 0.5, 1.5],
    ];
    let mut t = Tracer::new("tied");
    let x = t.input("x", DType::F64, vec![2, 3]).unwrap();
    let wv = t.param("w", DType::F64, vec![3, 3]).unwrap();
    let h = t.matmul(x, wv).unwrap();
    let y = t.matmul(h, wv).unwrap();
    let l = t.reduce_sum(y, vec![0, 1]).unwrap();
    t.output("loss", l).unwrap();
    let (f, warnings) = differentiate(t.finish(), Mode::Loss, &[]).unwrap();
    assert!(warnings.is_empty());
    let mut args = BTreeMap::new();
    args.insert(
        "x".to_string(),
        Tensor::from_f64(vec![2, 3], X.iter().flatten().copied().collect()),
    );
    args.insert("w".to_string(), Tensor::from_f64(vec![3, 3], flat(&w)));
    let out = run(&f, &args);

    let xm: Vec<Vec<f64>> = X.iter().map(|r| r.to_vec()).collect();
    let g = vec![vec![1.0; 3]; 2];
    let first = matmul(&matmul(&transpose(&xm), &g), &transpose(&w));
    let second = matmul(&transpose(&matmul(&xm, &w)), &g);
    let want: Vec<f64> = flat(&first)
        .iter()
        .zip(flat(&second))
        .map(|(a, b)| a + b)
        .collect();
    close(&out["grad.w"], &want);
}

/// `H = X·W` split into `[A | B | C]` (2 columns each); `L = Σ A² + Σ B`. So
/// `dH = [2A | 1 | 0]` and `dW = Xᵀ·dH`: the unused piece contributes exact zeros.
#[test]
fn split_product_feeding_two_loss_terms() {
    let w: Vec<Vec<f64>> = (0..3)
        .map(|i| (0..6).map(|j| ((i * 6 + j) as f64 - 8.0) / 7.0).collect())
        .collect();
    let mut t = Tracer::new("split");
    let x = t.input("x", DType::F64, vec![2, 3]).unwrap();
    let wv = t.param("w", DType::F64, vec![3, 6]).unwrap();
    let h = t.matmul(x, wv).unwrap();
    let parts = t.split(h, 1, vec![2, 2, 2]).unwrap();
    let a2 = t.mul(parts[0], parts[0]).unwrap();
    let sa = t.reduce_sum(a2, vec![0, 1]).unwrap();
    let sb = t.reduce_sum(parts[1], vec![0, 1]).unwrap();
    let l = t.add(sa, sb).unwrap();
    t.output("loss", l).unwrap();
    let (f, _) = differentiate(t.finish(), Mode::Loss, &["x".to_string()]).unwrap();
    let mut args = BTreeMap::new();
    args.insert(
        "x".to_string(),
        Tensor::from_f64(vec![2, 3], X.iter().flatten().copied().collect()),
    );
    args.insert("w".to_string(), Tensor::from_f64(vec![3, 6], flat(&w)));
    let out = run(&f, &args);

    let xm: Vec<Vec<f64>> = X.iter().map(|r| r.to_vec()).collect();
    let hm = matmul(&xm, &w);
    let dh: Vec<Vec<f64>> = hm
        .iter()
        .map(|row| {
            (0..6)
                .map(|j| match j {
                    0 | 1 => 2.0 * row[j],
                    2 | 3 => 1.0,
                    _ => 0.0,
                })
                .collect()
        })
        .collect();
    close(&out["grad.w"], &flat(&matmul(&transpose(&xm), &dh)));
    close(&out["grad.x"], &flat(&matmul(&dh, &transpose(&w))));
}
