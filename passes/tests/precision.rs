//! `precision{bf16}`: every forward f32 GEMM runs in bf16 between casts, one cast per operand
//! value; parameters and outputs stay f32 (master weights); the backward GEMMs run in bf16 and
//! read the bf16 operands (the stash of a GEMM input halves); the loss stays close to f32's; a
//! function without a GEMM is an error; and `f16` adds the loss scale that seeds the backward.

use cleave_ir::models::mlp::{mlp, MlpConfig};
use std::collections::BTreeMap;

use cleave_ir::{run_function_named, DType, Module, Op, Phase, Precision, Tensor, UnaryOp};
use cleave_passes::{PassContext, PassManager};

fn run(m: &mut Module, pipeline: &str) -> Result<(), String> {
    PassManager::from_pipeline(pipeline)
        .and_then(|pm| pm.run(m, &mut PassContext::default(), &mut |_| {}))
        .map_err(|e| e.to_string())
}

#[test]
fn gemms_run_in_bf16_with_f32_master_weights() {
    let f = mlp(&MlpConfig {
        batch: 4,
        sizes: vec![3, 8, 8, 2],
        activation: UnaryOp::Tanh,
        bias: true,
        dtype: DType::F32,
    })
    .unwrap();
    let gemms = f
        .body
        .iter()
        .filter(|&&n| matches!(f.nodes[n].op, Op::MatMul { .. }))
        .count();
    let mut m = Module::with_function(f.clone());
    run(&mut m, "precision{bf16},autodiff").unwrap();
    cleave_ir::verify_module(&m).unwrap();
    let g = &m.functions[0];
    let mut forward = 0;
    let mut backward = 0;
    for &n in &g.body {
        let d = &g.nodes[n];
        if !matches!(d.op, Op::MatMul { .. }) {
            continue;
        }
        for &v in d.operands.iter().chain(&d.results) {
            assert_eq!(g.ty(v).dtype, DType::BF16, "a GEMM on {}", g.ty(v));
        }
        if d.phase.is_backward() {
            backward += 1;
        } else {
            assert_eq!(d.phase, Phase::Forward);
            forward += 1;
        }
    }
    assert_eq!(forward, gemms);
    assert!(backward >= gemms, "{backward} backward GEMMs");
    // Master weights: parameters, their gradients and the loss stay f32.
    for a in g.params() {
        assert_eq!(a.ty.dtype, DType::F32, "{}", a.name);
    }
    for o in &g.outputs {
        assert_eq!(g.ty(o.value).dtype, DType::F32, "{}", o.name);
    }
    // One narrowing cast per operand value (the layers' inputs and weights), not per use; the
    // backward narrows each GEMM's output gradient once more.
    let casts = g
        .body
        .iter()
        .filter(|&&n| {
            matches!(g.nodes[n].op, Op::Cast { to: DType::BF16 })
                && g.nodes[n].phase == Phase::Forward
        })
        .count();
    assert_eq!(casts, 2 * gemms);
    // The split step's stash: F hands B/W the GEMM inputs in bf16.
    let mut s = Module::with_function(f.clone());
    run(&mut s, "precision{bf16},autodiff,split-bw").unwrap();
    let mut narrow = 0;
    for func in s.functions.iter().filter(|f| f.name.ends_with(".F")) {
        for o in func.outputs.iter().filter(|o| o.name.starts_with("stash.")) {
            narrow += (func.ty(o.value).dtype == DType::BF16) as usize;
        }
    }
    assert!(narrow >= gemms, "{narrow} bf16 stash values");
    // f32 is a no-op; f16 and a GEMM-less function are errors.
    let mut same = Module::with_function(f.clone());
    run(&mut same, "precision{f32}").unwrap();
    assert_eq!(same.functions[0].body.len(), f.body.len());

    let plain = cleave_ir::parse_function(
        r#"func @p {
  %x = input {name = "x"} : f32[4]
  %y = tanh %x : f32[4]
  return %y as "y"
}"#,
    )
    .unwrap();
    let e = run(&mut Module::with_function(plain), "precision{bf16}").unwrap_err();
    assert!(e.contains("no f32 matmul"), "{e}");
}

/// A value read by two GEMMs (one bf16 cast shared by both): its two cotangent terms are
/// summed in f32 and rounded to bf16 once, so the step computes on bf16 only in casts and
/// GEMMs (what the CPU runtime accepts), and the input gradient is f32.
#[test]
fn a_value_read_by_two_gemms_sums_its_gradient_in_f32() {
    let f = cleave_ir::parse_function(
        r#"func @two {
  %x = input {name = "x"} : f32[4,3]
  %w1 = param {name = "w1"} : f32[3,5]
  %w2 = param {name = "w2"} : f32[3,5]
  %a = matmul %x, %w1 : f32[4,5]
  %b = matmul %x, %w2 : f32[4,5]
  %p = mul %a, %b : f32[4,5]
  %l = reduce_sum %p {axes = [0, 1]} : f32[]
  return %l as "loss"
}"#,
    )
    .unwrap();
    let mut m = Module::with_function(f);
    run(&mut m, "precision{bf16},autodiff{wrt=x}").unwrap();
    cleave_ir::verify_module(&m).unwrap();
    let g = &m.functions[0];
    for &n in &g.body {
        let d = &g.nodes[n];
        let narrow = d
            .operands
            .iter()
            .chain(&d.results)
            .any(|&v| g.ty(v).dtype == DType::BF16);
        assert!(
            !narrow || matches!(d.op, Op::Cast { .. } | Op::MatMul { .. }),
            "`{}` computes on bf16",
            d.op.name()
        );
    }
    let gx = g.outputs.iter().find(|o| o.name == "grad.x").unwrap();
    assert_eq!(g.ty(gx.value).dtype, DType::F32);
}

/// `precision{f16}`: the GEMMs run in f16 and the function gains the `f32[]` input
/// `precision.loss_scale`, which seeds the backward: every gradient is the f32 step's times the scale
/// (exactly, for a power of two, where nothing rounds), and a scale of the wrong type or a
/// clashing argument name is an error naming it.
#[test]
fn f16_seeds_the_backward_with_the_loss_scale() {
    let src = r#"func @lin {
  %x = input {name = "x"} : f32[2,2]
  %w = param {name = "w"} : f32[2,2]
  %y = matmul %x, %w : f32[2,2]
  %l = reduce_sum %y {axes = [0, 1]} : f32[]
  return %l as "loss"
}"#;
    let f = cleave_ir::parse_function(src).unwrap();
    let mut m = Module::with_function(f.clone());
    run(&mut m, "precision{f16},autodiff").unwrap();
    cleave_ir::verify_module(&m).unwrap();
    let g = &m.functions[0];
    let scale = g
        .args()
        .find(|a| a.name == "precision.loss_scale")
        .expect("the loss scale");
    assert_eq!(scale.ty.to_string(), "f32[]");
    for &n in &g.body {
        let d = &g.nodes[n];
        if matches!(d.op, Op::MatMul { .. }) {
            assert_eq!(g.ty(d.results[0]).dtype, DType::F16, "a GEMM in f16");
        }
    }
    // d loss / d w = xᵀ·1, times the scale: small integers are exact in f16.
    let x = Tensor::from_f32(vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]);
    let w = Tensor::from_f32(vec![2, 2], vec![0.5, -1.0, 2.0, 0.25]);
    let args = |s: f32| -> BTreeMap<String, Tensor> {
        [
            ("x".to_string(), x.clone()),
            ("w".to_string(), w.clone()),
            (
                "precision.loss_scale".to_string(),
                Tensor::from_f32(vec![], vec![s]),
            ),
        ]
        .into_iter()
        .collect()
    };
    let out = run_function_named(g, &args(8.0), Precision::F32).unwrap();
    let grad = g.outputs.iter().position(|o| o.name == "grad.w").unwrap();
    assert_eq!(out[grad].to_f64_vec(), [32.0, 32.0, 48.0, 48.0]);
    let loss = g.outputs.iter().position(|o| o.name == "loss").unwrap();
    assert_eq!(out[loss].to_f64_vec(), [11.5], "the loss is not scaled");
    // A loss scale of another type, or an argument already named so.
    let bad = src.replace(
        "%w = param",
        "%s = input {name = \"precision.loss_scale\"} : f32[2]\n  %w = param",
    );
    let mut m = Module::with_function(cleave_ir::parse_function(&bad).unwrap());
    let e = run(&mut m, "autodiff").unwrap_err();
    assert!(e.contains("loss_scale") && e.contains("f32[2]"), "{e}");
    let mut m = Module::with_function(cleave_ir::parse_function(&bad).unwrap());
    let e = run(&mut m, "precision{f16}").unwrap_err();
    assert!(e.contains("already has an argument"), "{e}");
}

/// Under `local` learning every block's auxiliary loss is a seed too: each is scaled, so no
/// block's gradient escapes the division by the scale.
#[test]
fn f16_scales_every_local_loss() {
    let f = mlp(&MlpConfig {
        batch: 4,
        sizes: vec![3, 8, 8, 8, 2],
        activation: UnaryOp::Tanh,
        bias: true,
        dtype: DType::F32,
    })
    .unwrap();
    let count_seeds = |pipeline: &str| -> (usize, usize) {
        let mut m = Module::with_function(f.clone());
        run(&mut m, pipeline).unwrap();
        let g = &m.functions[0];
        let scale = g
            .args()
            .find(|a| a.name == "precision.loss_scale")
            .map(|a| a.value);
        let uses = scale.map_or(0, |s| {
            g.body
                .iter()
                .filter(|&&n| g.nodes[n].operands.contains(&s))
                .count()
        });
        let ones = g
            .body
            .iter()
            .filter(|&&n| {
                g.nodes[n].phase.is_backward()
                    && matches!(&g.nodes[n].op, Op::Constant { .. })
                    && g.ty(g.nodes[n].results[0]).shape.is_empty()
            })
            .count();
        (uses, ones)
    };
    let (uses, _) = count_seeds("precision{f16},autodiff{method=local,blocks=2}");
    let (_, ones) = count_seeds("precision{bf16},autodiff{method=local,blocks=2}");
    // bf16 seeds the main loss and each auxiliary one with a constant 1; f16 reads the scale
    // once per seed instead.
    assert!(ones >= 2, "{ones} scalar seeds under bf16");
    assert!(uses >= ones, "the scale seeds {uses} losses of {ones}");
}
