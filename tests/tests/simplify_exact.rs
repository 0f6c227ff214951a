//! `simplify` is exact: on the bundled examples after `autodiff`, the interpreter gives
//! bit-identical outputs before and after, on random inputs; the interface is unchanged and the
//! result verifies.

use std::path::Path;

use cleave_compiler::load::load_module;
use cleave_ir::{run_function, Function, Precision, Tensor};
use cleave_passes::{PassContext, PassManager};

fn random_args(func: &Function, seed: u64) -> Vec<Tensor> {
    let mut state = seed;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        state >> 33
    };
    func.args()
        .map(|a| {
            let n = a.ty.num_elements();
            if a.ty.dtype.is_float() {
                let data = (0..n)
                    .map(|_| (next() as f64 / (1u64 << 31) as f64) * 2.0 - 1.0)
                    .collect();
                Tensor::from_float(a.ty.dtype, a.ty.shape.clone(), data)
            } else {
                // Integer inputs are class labels or token ids: keep them small.
                let data = (0..n).map(|_| (next() % 10) as i64).collect();
                Tensor::from_i64(a.ty.dtype, a.ty.shape.clone(), data)
            }
        })
        .collect()
}

fn check(example: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(example);
    let mut module = load_module(&path, &Default::default()).unwrap();
    let mut ctx = PassContext::default();
    let mut pm = PassManager::from_pipeline("autodiff").unwrap();
    pm.verify_each = true;
    pm.run(&mut module, &mut ctx, &mut |_| {}).unwrap();
    let before = module.clone();
    let mut pm = PassManager::from_pipeline("simplify").unwrap();
    pm.verify_each = true;
    pm.run(&mut module, &mut ctx, &mut |_| {}).unwrap();
    assert!(
        ctx.warnings.iter().all(|w| !w.starts_with("simplify")),
        "{:?}",
        ctx.warnings
    );
    for (f0, f1) in before.functions.iter().zip(&module.functions) {
        let sig = |f: &Function| {
            f.args()
                .map(|a| (a.name.to_string(), a.role, a.ty.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(sig(f0), sig(f1), "{example}: arguments changed");
        let outs = |f: &Function| {
            f.outputs
                .iter()
                .map(|o| (o.name.clone(), f.ty(o.value).clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(outs(f0), outs(f1), "{example}: outputs changed");
        let args = random_args(f0, 42);
        let r0 = run_function(f0, &args, Precision::F32).unwrap();
        let r1 = run_function(f1, &args, Precision::F32).unwrap();
        for ((t0, t1), o) in r0.iter().zip(&r1).zip(&f0.outputs) {
            let bits = |t: &Tensor| {
                t.to_f64_vec()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect::<Vec<_>>()
            };
            assert!(
                bits(t0) == bits(t1),
                "{example}: output `{}` differs",
                o.name
            );
        }
        assert!(
            f1.body.len() <= f0.body.len(),
            "{example}: simplify grew the function"
        );
    }
}

#[test]
fn mlp_is_bit_identical() {
    check("mlp.cir");
}

#[test]
fn gpt_tiny_is_bit_identical() {
    check("gpt-tiny.cir");
}

#[test]
fn cnn_tiny_is_bit_identical() {
    check("cnn-tiny.cir");
}
