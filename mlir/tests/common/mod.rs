//! Shared helpers of the MLIR backend tests: the op cases, random arguments, the comparison.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cleave_ir::{DType, Function, Tensor};

/// `mlir/tests/ops/*.cir`: one function per op family (the runtime's op cases), sorted.
pub fn op_cases() -> Vec<(String, Function)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ops");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cir"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let m = cleave_ir::parse_module(&text).unwrap_or_else(|e| panic!("{p:?}: {e}"));
            cleave_ir::verify_module(&m).unwrap_or_else(|e| panic!("{p:?}: {e:?}"));
            (
                p.file_stem().unwrap().to_string_lossy().into_owned(),
                m.functions[0].clone(),
            )
        })
        .collect()
}

/// An example model's forward function (`examples/NAME`).
pub fn example(name: &str) -> Function {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name);
    let text = std::fs::read_to_string(&p).unwrap();
    cleave_ir::parse_module(&text).unwrap().functions[0].clone()
}

/// The training step (`autodiff,<optimizer>`) of an example model.
pub fn training_step(example: &str, optimizer: &str) -> Function {
    training_step_after(example, "", optimizer)
}

/// [`training_step`] with the passes `before` (e.g. `precision{bf16},`) ahead of `autodiff`.
pub fn training_step_after(example: &str, before: &str, optimizer: &str) -> Function {
    let mut module = cleave_ir::Module::with_function(self::example(example));
    cleave_passes::PassManager::from_pipeline(&format!("{before}autodiff,{optimizer}"))
        .unwrap()
        .run(
            &mut module,
            &mut cleave_passes::PassContext::default(),
            &mut |_| {},
        )
        .unwrap();
    module.functions.remove(0)
}

/// Deterministic pseudo-random numbers (SplitMix64).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
}

/// Random arguments: floats uniform in [-2, 2) (parameters and optimizer state scaled to
/// ±0.2, `opt.step` = 1), integers in [0, 10), bools at random.
pub fn random_args(func: &Function, seed: u64) -> BTreeMap<String, Tensor> {
    let mut rng = Rng::new(seed);
    let mut args = BTreeMap::new();
    for a in func.args() {
        let n = a.ty.num_elements();
        let shape = a.ty.shape.clone();
        let t = match a.ty.dtype {
            d if d.is_float() => {
                let scale = if a.name == "opt.step" {
                    0.0
                } else if a.role == cleave_ir::ArgRole::Param || a.name.starts_with("opt.") {
                    0.2
                } else {
                    2.0
                };
                let v: Vec<f64> = (0..n)
                    .map(|_| {
                        if a.name == "opt.step" {
                            1.0
                        } else {
                            rng.uniform() * scale
                        }
                    })
                    .collect();
                Tensor::from_float(d, shape, v)
            }
            DType::Bool => Tensor::from_bool(
                shape,
                (0..n)
                    .map(|_| rng.next_u64().is_multiple_of(2))
                    .collect::<Vec<_>>(),
            ),
            d => Tensor::from_i64(
                d,
                shape,
                (0..n)
                    .map(|_| (rng.next_u64() % 10) as i64)
                    .collect::<Vec<_>>(),
            ),
        };
        args.insert(a.name.to_string(), t);
    }
    args
}

/// Normwise relative comparison (as `tests/tests/runtime_vs_interp.rs`):
/// `|a_i - b_i| <= rtol · max_j |b_j| + 1e-7`; NaNs must match; ints and bools must be equal.
pub fn assert_close(got: &Tensor, want: &Tensor, rtol: f64, what: &str) {
    assert_eq!(got.dtype, want.dtype, "{what}: dtype");
    assert_eq!(got.shape, want.shape, "{what}: shape");
    if want.dtype.is_float() {
        let (a, b) = (got.to_f64_vec(), want.to_f64_vec());
        let max = b
            .iter()
            .filter(|x| x.is_finite())
            .fold(0f64, |m, &x| m.max(x.abs()));
        for (i, (&x, &y)) in a.iter().zip(&b).enumerate() {
            if (x.is_nan() && y.is_nan()) || x == y {
                continue;
            }
            let tol = rtol * max + 1e-7;
            assert!(
                (x - y).abs() <= tol,
                "{what}: element {i}: MLIR {x}, interpreter {y} (|diff| {} > {tol})",
                (x - y).abs()
            );
        }
    } else {
        assert_eq!(got.data, want.data, "{what}");
    }
}
