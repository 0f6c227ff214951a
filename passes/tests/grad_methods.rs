//! Gradient methods (`autodiff{method=…}`): forward gradients are unbiased, feedback alignment
//! and local learning have the documented structure, and the simulator sees their dependencies.

use std::collections::BTreeMap;

use cleave_ir::models::mlp::{mlp, MlpConfig};
use cleave_ir::{run_function_named, DType, Function, Module, Phase, Precision, Tensor, UnaryOp};
use cleave_passes::autodiff::methods::{GradMethod, SplitMix64, FG_TANGENT_PREFIX};
use cleave_passes::schedule::generators::Generator;
use cleave_passes::schedule::simulate::BackwardDependency;
use cleave_passes::schedule::{Costs, Memory};
use cleave_passes::{PassContext, PassManager};

fn tiny_mlp(sizes: Vec<usize>) -> Function {
    mlp(&MlpConfig {
        batch: 4,
        sizes,
        activation: UnaryOp::Tanh,
        bias: true,
        dtype: DType::F32,
    })
    .unwrap()
}

fn run_pipeline(f: &Function, pipeline: &str) -> Function {
    let mut m = Module::with_function(f.clone());
    let pm = PassManager::from_pipeline(pipeline).unwrap();
    let mut ctx = PassContext::default();
    pm.run(&mut m, &mut ctx, &mut |_| {}).unwrap();
    cleave_ir::verify_module(&m).unwrap();
    m.functions.remove(0)
}

/// Parameters and data of a function's forward arguments, seeded.
fn forward_args(f: &Function, seed: u64) -> BTreeMap<String, Tensor> {
    let mut rng = SplitMix64::new(seed);
    let mut args = BTreeMap::new();
    for a in f.args() {
        let n = a.ty.num_elements();
        let t = if a.ty.dtype == DType::I32 {
            Tensor::from_i32(a.ty.shape.clone(), (0..n).map(|i| (i % 3) as i32).collect())
        } else {
            Tensor::from_f64(
                a.ty.shape.clone(),
                (0..n).map(|_| 0.7 * rng.normal()).collect(),
            )
        };
        args.insert(a.name.to_string(), t);
    }
    args
}

fn outputs(f: &Function, args: &BTreeMap<String, Tensor>) -> BTreeMap<String, Vec<f64>> {
    outputs_at(f, args, Precision::F64)
}

fn outputs_at(
    f: &Function,
    args: &BTreeMap<String, Tensor>,
    precision: Precision,
) -> BTreeMap<String, Vec<f64>> {
    let outs = run_function_named(f, args, precision).unwrap();
    f.outputs
        .iter()
        .zip(outs)
        .map(|(o, t)| (o.name.clone(), t.to_f64_vec()))
        .collect()
}

fn grads(out: &BTreeMap<String, Vec<f64>>) -> Vec<(String, Vec<f64>)> {
    out.iter()
        .filter(|(k, _)| k.starts_with("grad."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The mean of N forward-gradient estimates lies within 5·σ/√N of the true gradient in every
/// coordinate (σ: the sample standard deviation of that coordinate), and a wrongly scaled
/// estimator (twice the estimate) does not.
#[test]
fn forward_gradient_is_unbiased() {
    let f = tiny_mlp(vec![3, 4, 3]);
    let args = forward_args(&f, 11);
    let exact = grads(&outputs(&run_pipeline(&f, "autodiff"), &args));
    let fg = run_pipeline(&f, "autodiff{method=forward-gradient}");
    // No backward: no input-gradient node, and the weight-gradient nodes are only the estimate
    // (broadcast of the directional derivative, times the tangent) of each parameter.
    assert!(fg.body.iter().all(|&n| fg.nodes[n].phase != Phase::Dgrad));
    let w: Vec<&str> = fg
        .body
        .iter()
        .filter(|&&n| fg.nodes[n].phase == Phase::Wgrad)
        .map(|&n| fg.nodes[n].op.name())
        .collect();
    assert_eq!(w.len(), 8, "{w:?}");
    assert!(w.iter().all(|o| ["broadcast", "mul"].contains(o)), "{w:?}");
    let tangents: Vec<(String, Vec<usize>)> = fg
        .args()
        .filter(|a| a.name.starts_with(FG_TANGENT_PREFIX))
        .map(|a| (a.name.to_string(), a.ty.shape.clone()))
        .collect();
    assert_eq!(tangents.len(), 4, "one tangent per parameter");
    let n = 4000usize;
    let mut rng = SplitMix64::new(2024);
    let mut sum: Vec<Vec<f64>> = exact.iter().map(|(_, g)| vec![0.0; g.len()]).collect();
    let mut sum_sq = sum.clone();
    let mut a = args.clone();
    for _ in 0..n {
        for (name, shape) in &tangents {
            let k: usize = shape.iter().product();
            a.insert(
                name.clone(),
                Tensor::from_f64(shape.clone(), (0..k).map(|_| rng.normal()).collect()),
            );
        }
        let est = grads(&outputs(&fg, &a));
        for (p, (_, g)) in est.iter().enumerate() {
            for (i, &x) in g.iter().enumerate() {
                sum[p][i] += x;
                sum_sq[p][i] += x * x;
            }
        }
    }
    let mut worst_true: f64 = 0.0;
    let mut worst_doubled: f64 = 0.0;
    for (p, (name, g)) in exact.iter().enumerate() {
        for (i, &gi) in g.iter().enumerate() {
            let mean = sum[p][i] / n as f64;
            let var = (sum_sq[p][i] / n as f64 - mean * mean).max(0.0) * n as f64 / (n - 1) as f64;
            let bound = 5.0 * (var / n as f64).sqrt();
            let z = (mean - gi).abs() / bound.max(1e-300) * 5.0;
            assert!(
                (mean - gi).abs() <= bound,
                "{name}[{i}]: mean of {n} estimates {mean} vs exact {gi}, bound {bound} ({z:.2}σ)"
            );
            worst_true = worst_true.max(z);
            worst_doubled = worst_doubled.max((2.0 * mean - gi).abs() / bound * 5.0);
        }
    }
    // The test can tell a biased estimator apart.
    assert!(
        worst_doubled > 5.0,
        "a doubled estimator would pass too (worst {worst_doubled:.2}σ)"
    );
    assert!(worst_true < 5.0);
}

/// `tangents=K` averages K estimates: with the same tangents fed in, the K-tangent estimate is the
/// mean of the K one-tangent estimates.
#[test]
fn forward_gradient_averages_tangents() {
    let f = tiny_mlp(vec![3, 4, 3]);
    let args = forward_args(&f, 5);
    let one = run_pipeline(&f, "autodiff{method=forward-gradient}");
    let three = run_pipeline(&f, "autodiff{method=forward-gradient,tangents=3}");
    let mut rng = SplitMix64::new(9);
    let mut a3 = args.clone();
    let mut singles = Vec::new();
    for k in 0..3 {
        let mut a1 = args.clone();
        for arg in one.args().filter(|a| a.name.starts_with(FG_TANGENT_PREFIX)) {
            let n = arg.ty.num_elements();
            let t = Tensor::from_f64(arg.ty.shape.clone(), (0..n).map(|_| rng.normal()).collect());
            let param = arg.name.strip_prefix("fg.tangent.0.").unwrap();
            a3.insert(format!("fg.tangent.{k}.{param}"), t.clone());
            a1.insert(arg.name.to_string(), t);
        }
        singles.push(grads(&outputs(&one, &a1)));
    }
    // Each tangent linearizes the forward body once: the step grows linearly in K (walking the
    // grown body would differentiate the earlier tangents again, exponentially).
    let size = |k: usize| {
        run_pipeline(
            &f,
            &format!("autodiff{{method=forward-gradient,tangents={k}}}"),
        )
        .body
        .len()
    };
    let (s2, s3, s5) = (size(2), size(3), size(5));
    assert_eq!(s5 - s2, 3 * (s3 - s2), "sizes {s2}, {s3}, {s5}");
    let avg = grads(&outputs(&three, &a3));
    for (p, (name, g)) in avg.iter().enumerate() {
        for (i, &x) in g.iter().enumerate() {
            let want = (0..3).map(|k| singles[k][p].1[i]).sum::<f64>() / 3.0;
            assert!(
                (x - want).abs() <= 1e-12 * (1.0 + want.abs()),
                "{name}[{i}]"
            );
        }
    }
}

/// Which parameters' values the backward (dgrad/wgrad) nodes read.
fn backward_reads(f: &Function, param: &str) -> usize {
    let v = f.args().find(|a| a.name == param).unwrap().value;
    f.body
        .iter()
        .filter(|&&n| matches!(f.nodes[n].phase, Phase::Dgrad | Phase::Wgrad))
        .filter(|&&n| f.nodes[n].operands.contains(&v))
        .count()
}

/// FA: no backward node reads a weight (the fixed random matrices stand in for them), the last
/// layer's gradients equal backprop's, the earlier layers' do not, and the matrices are the same
/// for the same seed and differ for another.
#[test]
fn feedback_alignment_structure() {
    let f = tiny_mlp(vec![3, 5, 4, 3]);
    let args = forward_args(&f, 3);
    let bp = run_pipeline(&f, "autodiff");
    let fa = run_pipeline(&f, "autodiff{method=fa}");
    for w in ["fc2.weight", "fc3.weight"] {
        assert!(backward_reads(&bp, w) > 0, "bp reads {w}");
        assert_eq!(backward_reads(&fa, w), 0, "fa reads {w}");
    }
    let (gb, gf) = (outputs(&bp, &args), outputs(&fa, &args));
    for k in ["grad.fc3.weight", "grad.fc3.bias"] {
        assert_eq!(gb[k], gf[k], "{k}: the last layer sees the true error");
    }
    assert_ne!(gb["grad.fc1.weight"], gf["grad.fc1.weight"]);
    let again = run_pipeline(&f, "autodiff{method=fa}");
    assert_eq!(
        outputs(&again, &args)["grad.fc1.weight"],
        gf["grad.fc1.weight"]
    );
    let other = run_pipeline(&f, "autodiff{method=fa,seed=7}");
    assert_ne!(
        outputs(&other, &args)["grad.fc1.weight"],
        gf["grad.fc1.weight"]
    );
}

/// For a function partitioned into stages: `(s, t)` pairs where a node of stage `s` in one of
/// `phases` reads a backward value of another stage `t`.
fn cross_stage_backward_reads(f: &Function, phases: &[Phase]) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    for &n in &f.body {
        let d = &f.nodes[n];
        if !phases.contains(&d.phase) {
            continue;
        }
        for &v in &d.operands {
            let def = &f.nodes[f.values[v].def];
            if matches!(def.phase, Phase::Dgrad | Phase::Wgrad) && def.stage != d.stage {
                let pair = (d.stage.unwrap(), def.stage.unwrap());
                if !out.contains(&pair) {
                    out.push(pair);
                }
            }
        }
    }
    out.sort();
    out
}

/// The backward dependencies between pipeline stages: bp chains every stage's dgrad to the next
/// one, DFA only to the last stage (the output error), local learning has none at all (dgrad or
/// wgrad); split-bw accepts all.
#[test]
fn dfa_and_local_have_no_chained_stage_backward() {
    let f = tiny_mlp(vec![6, 8, 8, 8, 3]);
    let staged = |m: &str| run_pipeline(&f, &format!("partition{{stages=3}},autodiff{m}"));
    let bp = cross_stage_backward_reads(&staged(""), &[Phase::Dgrad]);
    assert!(bp.contains(&(0, 1)) && bp.contains(&(1, 2)), "bp: {bp:?}");
    let dfa = cross_stage_backward_reads(&staged("{method=dfa}"), &[Phase::Dgrad]);
    assert!(
        !dfa.is_empty() && dfa.iter().all(|&(_, from)| from == 2),
        "dfa: {dfa:?}"
    );
    let local = staged("{method=local}");
    assert_eq!(
        cross_stage_backward_reads(&local, &[Phase::Dgrad, Phase::Wgrad]),
        vec![],
        "local"
    );
    // One auxiliary head per stage boundary.
    let heads: Vec<&str> = local
        .outputs
        .iter()
        .map(|o| o.name.as_str())
        .filter(|n| n.starts_with("local.loss"))
        .collect();
    assert_eq!(heads, ["local.loss1", "local.loss2"]);
    for m in ["", "{method=fa}", "{method=dfa}", "{method=local}"] {
        run_pipeline(&f, &format!("partition{{stages=3}},autodiff{m},split-bw"));
    }
}

/// local{blocks=2}: the last block's gradients are backprop's; the first block's are the
/// gradients of its auxiliary loss alone (no gradient crosses the cut).
#[test]
fn local_learning_gradients() {
    let f = tiny_mlp(vec![3, 5, 4, 3]);
    let args = forward_args(&f, 8);
    let local = run_pipeline(&f, "autodiff{method=local,blocks=2}");
    let mut a = args.clone();
    for p in local.params().filter(|p| p.name.starts_with("local.")) {
        let n = p.ty.num_elements();
        a.insert(
            p.name.to_string(),
            Tensor::from_f64(
                p.ty.shape.clone(),
                (0..n).map(|i| 0.1 * i as f64 - 0.3).collect(),
            ),
        );
    }
    let gl = outputs(&local, &a);
    let gb = outputs(&run_pipeline(&f, "autodiff"), &args);
    // Layers: fc1, fc2, fc3; blocks {fc1}, {fc2, fc3}.
    for k in ["grad.fc2.weight", "grad.fc3.weight", "grad.fc3.bias"] {
        assert_eq!(gl[k], gb[k], "{k}");
    }
    assert_ne!(gl["grad.fc1.weight"], gb["grad.fc1.weight"]);
    // The first block against local.loss1 only: rebuild it as a model of its own.
    let mut aux = local.clone();
    aux.outputs.retain(|o| o.name == "local.loss1");
    aux.outputs[0].name = "loss".into();
    let aux_fwd = run_pipeline(&aux, "dce");
    let ga = outputs(&run_pipeline(&aux_fwd, "autodiff"), &a);
    for k in [
        "grad.fc1.weight",
        "grad.fc1.bias",
        "grad.local.head1.weight",
    ] {
        let (x, y) = (&gl[k], &ga[k]);
        for (p, q) in x.iter().zip(y) {
            assert!((p - q).abs() <= 1e-12 * (1.0 + q.abs()), "{k}: {p} vs {q}");
        }
    }
}

#[test]
fn method_names_and_errors() {
    assert_eq!(
        GradMethod::parse("local{blocks=3}", 1).unwrap(),
        GradMethod::Local { blocks: 3 }
    );
    assert_eq!(
        GradMethod::parse("forward-gradient", 4).unwrap(),
        GradMethod::ForwardGradient { tangents: 4 }
    );
    let e = GradMethod::parse("backprop", 1).unwrap_err();
    assert!(
        e.contains("unknown gradient method `backprop`") && e.contains("dfa"),
        "{e}"
    );
    let e = GradMethod::parse("local{blocks=1}", 1).unwrap_err();
    assert!(e.contains("at least 2 blocks"), "{e}");
    let e = GradMethod::parse("fa{blocks=2}", 1).unwrap_err();
    assert!(e.contains("unknown option"), "{e}");
    use cleave_passes::autodiff::methods::with_grad_method;
    assert_eq!(
        with_grad_method("autodiff,split-bw", &GradMethod::Local { blocks: 3 }).unwrap(),
        "autodiff{blocks=3,method=local},split-bw"
    );
    let e = with_grad_method("dce", &GradMethod::Fa).unwrap_err();
    assert!(e.contains("no `autodiff` pass"), "{e}");
    let e = with_grad_method("autodiff{method=dfa}", &GradMethod::Fa).unwrap_err();
    assert!(e.contains("conflicts with --grad-method fa"), "{e}");
    let e = PassManager::from_pipeline("autodiff{method=sgd}")
        .err()
        .unwrap();
    assert!(
        e.to_string().contains("unknown gradient method `sgd`"),
        "{e}"
    );
    // A model without a loss.
    let mut f = tiny_mlp(vec![3, 3]);
    f.outputs.retain(|o| o.name != "loss");
    let mut m = Module::with_function(f);
    let e = PassManager::from_pipeline("autodiff{method=dfa}")
        .unwrap()
        .run(&mut m, &mut PassContext::default(), &mut |_| {})
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("needs a scalar float output named `loss`"),
        "{e}"
    );
}

/// Uniform costs T_F = T_B = T_W = 1, 4 stages, 8 microbatches: backprop's 1F1B has a bubble
/// rate of 9/33 (3 idle steps of the 3-stage ramp on each side); DFA's backward no longer waits
/// for the next stage, so the same 1F1B order idles only in the forward ramp (1/9); with local
/// learning the eager order (F, B, W of each microbatch in turn) has no bubble at all while
/// holding one microbatch of activations.
#[test]
fn simulator_sees_the_methods_dependencies() {
    let (p, m) = (4, 8);
    let costs = Costs::uniform(p, 1.0, 1.0, 1.0, 0.0);
    let memory = Memory::uniform(p, 1.0, 0.5);
    let rate = |g: Generator, dep: BackwardDependency| {
        let s = g.generate(p, m).unwrap();
        s.simulate_with(&costs, &memory, dep).unwrap()
    };
    let bp = rate(Generator::OneFOneB, BackwardDependency::NextStage);
    let dfa = rate(Generator::OneFOneB, BackwardDependency::LastStageForward);
    let local = rate(Generator::Eager, BackwardDependency::None);
    let bp_eager = rate(Generator::Eager, BackwardDependency::NextStage);
    assert!(
        (bp.bubble_rate - 9.0 / 33.0).abs() < 1e-12,
        "{}",
        bp.bubble_rate
    );
    assert!(
        (dfa.bubble_rate - 3.0 / 27.0).abs() < 1e-12,
        "{}",
        dfa.bubble_rate
    );
    assert_eq!(local.bubble_rate, 0.0);
    assert!(local.devices.iter().all(|d| d.peak_memory == 1.0));
    // The eager order is useless under backprop's dependencies.
    assert!(bp_eager.bubble_rate > bp.bubble_rate);
    assert_eq!(
        GradMethod::Dfa.stage_dependency(),
        BackwardDependency::LastStageForward
    );
    assert_eq!(
        GradMethod::Local { blocks: 2 }.stage_dependency(),
        BackwardDependency::None
    );
    // Every generator's schedule still validates and runs under every mode.
    for g in [
        Generator::GPipe,
        Generator::ZbH1,
        Generator::ZbH2,
        Generator::Eager,
    ] {
        let s = g.generate(p, m).unwrap();
        s.validate().unwrap();
        for dep in [
            BackwardDependency::NextStage,
            BackwardDependency::LastStageForward,
            BackwardDependency::None,
        ] {
            s.simulate_with(&costs, &memory, dep).unwrap();
        }
    }
}

/// Local learning on a transformer partitioned into 4 stages: the residual stream crosses every
/// stage boundary, and still no backward value crosses a stage (every edge into an earlier block
/// is cut); every value leaving a stage gets a head, so every parameter gets a gradient; and the
/// step runs in the interpreter.
#[test]
fn local_learning_cuts_residual_paths() {
    use cleave_ir::models::gpt::{gpt, GptConfig};
    let f = gpt(&GptConfig {
        vocab: 11,
        d_model: 8,
        heads: 2,
        layers: 2,
        seq: 4,
        batch: 2,
        // A weight shared by two stages sums its gradient across them whatever the method.
        tied_embeddings: false,
        ..GptConfig::default()
    })
    .unwrap();
    let mut m = Module::with_function(f.clone());
    let pm = PassManager::from_pipeline("partition{stages=4},autodiff{method=local}").unwrap();
    let mut ctx = PassContext::default();
    pm.run(&mut m, &mut ctx, &mut |_| {}).unwrap();
    assert!(ctx.warnings.is_empty(), "{:?}", ctx.warnings);
    cleave_ir::verify_module(&m).unwrap();
    let g = &m.functions[0];
    assert_eq!(
        cross_stage_backward_reads(g, &[Phase::Dgrad, Phase::Wgrad]),
        vec![]
    );
    assert!(g.outputs.iter().any(|o| o.name.starts_with("local.loss1")));
    assert!(g.outputs.iter().any(|o| o.name.starts_with("local.loss3")));
    let mut args = forward_args(g, 4);
    for a in g.args().filter(|a| a.ty.dtype == DType::I32) {
        let n = a.ty.num_elements();
        args.insert(
            a.name.to_string(),
            Tensor::from_i32(
                a.ty.shape.clone(),
                (0..n).map(|i| (i % 11) as i32).collect(),
            ),
        );
    }
    let out = outputs(g, &args);
    assert!(out["loss"][0].is_finite());
    let bp_grads: Vec<String> = run_pipeline(&f, "autodiff")
        .outputs
        .iter()
        .map(|o| o.name.clone())
        .filter(|n| n.starts_with("grad."))
        .collect();
    for name in bp_grads {
        assert!(out.contains_key(&name), "{name}");
    }
}

/// `auto` judges its candidates under the method's dependencies: with local learning and room
/// for one microbatch of activations it finds a zero-bubble schedule; backprop under the same
/// limit cannot avoid bubbles.
#[test]
fn auto_schedules_under_the_methods_dependencies() {
    use cleave_passes::schedule::auto::{auto_schedule, AutoOptions};
    let (p, m) = (4, 8);
    let costs = Costs::uniform(p, 1.0, 1.0, 1.0, 0.0);
    let memory = Memory::uniform(p, 1.0, 0.5);
    let run = |backward| {
        let options = AutoOptions {
            memory_limit: Some(1.0),
            ilp_max_pm: 0,
            backward,
            ..AutoOptions::default()
        };
        let (s, report) = auto_schedule(p, m, &costs, &memory, &options).unwrap();
        (s.simulate_with(&costs, &memory, backward).unwrap(), report)
    };
    let (local, report) = run(BackwardDependency::None);
    assert_eq!(local.bubble_rate, 0.0, "chose {}", report.chosen);
    assert!(report.candidates.iter().any(|c| c.0 == "eager"));
    let (bp, report) = run(BackwardDependency::NextStage);
    assert!(
        bp.bubble_rate > 0.3,
        "chose {}: {}",
        report.chosen,
        bp.bubble_rate
    );
    assert!(report.candidates.iter().all(|c| c.0 != "eager"));
}

/// Few-bit backward (`autodiff{compress=fewbit,bits=B}`): the input gradient of `Σ v·f(x)` is
/// `v·c_k(x)` exactly, `c_k` the fitted level of the interval of `x`, for GELU, tanh-GELU and
/// SiLU at 1 to 3 bits; the pre-activation leaves the stash for B one-byte bit tensors; a
/// function without GELU/SiLU is an error.
#[test]
fn fewbit_backward_reads_the_fitted_levels() {
    use cleave_ir::tracer::Tracer;
    for u in [UnaryOp::Gelu, UnaryOp::GeluTanh, UnaryOp::Silu] {
        let mut t = Tracer::new("f");
        let x = t.input("x", DType::F32, vec![8, 16]).unwrap();
        let v = t.input("v", DType::F32, vec![8, 16]).unwrap();
        let w = t.param("w", DType::F32, vec![16, 16]).unwrap();
        let h = t.matmul(x, w).unwrap();
        let a = t.push_op(cleave_ir::Op::Unary(u), &[h]).unwrap()[0];
        let p = t.mul(a, v).unwrap();
        let l = t.reduce_sum(p, vec![0, 1]).unwrap();
        t.output("loss", l).unwrap();
        let f = t.finish();
        let mut args = forward_args(&f, 5);
        args.insert(
            "x".into(),
            Tensor::from_f64(
                vec![8, 16],
                (0..128).map(|i| (i as f64 - 64.0) / 11.0).collect(),
            ),
        );
        for bits in 1..=3u32 {
            let g = run_pipeline(
                &f,
                &format!("autodiff{{compress=fewbit,bits={bits},wrt=x}}"),
            );
            let out = outputs(&g, &args);
            // dL/dh = v·c_k(h), and dL/dx = (v·c_k(h))·wᵀ.
            let (thr, lev) = cleave_passes::autodiff::fewbit_fit(u, bits);
            let xs = args["x"].to_f64_vec();
            let ws = args["w"].to_f64_vec();
            let vs = args["v"].to_f64_vec();
            let mut want = vec![0.0; 128];
            for r in 0..8 {
                let hr: Vec<f64> = (0..16)
                    .map(|c| (0..16).map(|k| xs[r * 16 + k] * ws[k * 16 + c]).sum())
                    .collect();
                for k in 0..16 {
                    want[r * 16 + k] = (0..16)
                        .map(|c| {
                            let lvl = lev[thr.iter().filter(|&&q| hr[c] > q).count()];
                            vs[r * 16 + c] * lvl * ws[k * 16 + c]
                        })
                        .sum();
                }
            }
            let have = &out["grad.x"];
            for (i, (a, b)) in have.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-9 * (1.0 + b.abs()),
                    "{u:?} {bits}: [{i}] {a} vs {b}"
                );
            }
            // The stash: B bool tensors [8,16] replace the f32 pre-activation.
            let mut m = Module::with_function(g.clone());
            PassManager::from_pipeline("split-bw")
                .unwrap()
                .run(&mut m, &mut PassContext::default(), &mut |_| {})
                .unwrap();
            let fw = &m.functions[0];
            let stashed: Vec<DType> = fw
                .outputs
                .iter()
                .filter(|o| o.name.starts_with("stash."))
                .map(|o| fw.ty(o.value).dtype)
                .collect();
            assert_eq!(
                stashed.iter().filter(|d| **d == DType::Bool).count(),
                bits as usize,
                "{u:?} {bits}: {stashed:?}"
            );
        }
    }
    // Nothing to compress: an error naming the function.
    let mut m = Module::with_function(tiny_mlp(vec![3, 4, 2]));
    let e = PassManager::from_pipeline("autodiff{compress=fewbit}")
        .unwrap()
        .run(&mut m, &mut PassContext::default(), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("has neither"), "{e}");
}

/// Rank-1 sub-token compression (`autodiff{compress=rank1,group=G}`): a linear layer's weight
/// gradient is `x̂ᵀ·dy` with `x̂` the sub-token means of its input, its data gradient stays
/// exact, one input read by two layers is compressed once (`[N, D/G]` stashed instead of
/// `[N, D]`), and a function with no eligible layer is an error.
#[test]
fn rank1_compresses_the_weight_gradient_input() {
    use cleave_ir::tracer::Tracer;
    let (n, d, g) = (6usize, 16usize, 4usize);
    let mut t = Tracer::new("f");
    let x0 = t.input("x", DType::F32, vec![n, d]).unwrap();
    let v = t.input("v", DType::F32, vec![n, 8]).unwrap();
    let w0 = t.param("w0", DType::F32, vec![d, d]).unwrap();
    let x = t.matmul(x0, w0).unwrap(); // a computed activation, read by two layers
    let w1 = t.param("w1", DType::F32, vec![d, 8]).unwrap();
    let w2 = t.param("w2", DType::F32, vec![d, 8]).unwrap();
    let y1 = t.matmul(x, w1).unwrap();
    let y2 = t.matmul(x, w2).unwrap();
    let y = t.add(y1, y2).unwrap();
    let p = t.mul(y, v).unwrap();
    let l = t.reduce_sum(p, vec![0, 1]).unwrap();
    t.output("loss", l).unwrap();
    let f = t.finish();
    let args = forward_args(&f, 9);
    let exact = outputs(&run_pipeline(&f, "autodiff"), &args);
    let comp = run_pipeline(&f, &format!("autodiff{{compress=rank1,group={g}}}"));
    let out = outputs(&comp, &args);
    // dW1 = x̂ᵀ·v with x̂ the group means of x = x0·w0.
    let (x0s, w0s, vs) = (
        args["x"].to_f64_vec(),
        args["w0"].to_f64_vec(),
        args["v"].to_f64_vec(),
    );
    let xs: Vec<f64> = (0..n * d)
        .map(|e| {
            (0..d)
                .map(|k| x0s[e / d * d + k] * w0s[k * d + e % d])
                .sum()
        })
        .collect();
    let xh: Vec<f64> = (0..n * d)
        .map(|e| {
            let base = e / g * g;
            (base..base + g).map(|q| xs[q]).sum::<f64>() / g as f64
        })
        .collect();
    for name in ["grad.w1", "grad.w2"] {
        let want: Vec<f64> = (0..d * 8)
            .map(|e| (0..n).map(|r| xh[r * d + e / 8] * vs[r * 8 + e % 8]).sum())
            .collect();
        for (a, b) in out[name].iter().zip(&want) {
            assert!(
                (a - b).abs() <= 1e-9 * (1.0 + b.abs()),
                "{name}: {a} vs {b}"
            );
        }
        assert_ne!(out[name], exact[name], "{name} is approximate");
    }
    // Data gradients never read a layer's compressed input: the gradient of the input is exact.
    let dx_exact = outputs(&run_pipeline(&f, "autodiff{wrt=x}"), &args);
    let dx_comp = outputs(
        &run_pipeline(&f, "autodiff{compress=rank1,group=4,wrt=x}"),
        &args,
    );
    assert_eq!(
        dx_exact["grad.x"], dx_comp["grad.x"],
        "the data gradient stays exact"
    );
    // One compression of x: a single [N, D/G] mean in the forward.
    let means = comp
        .body
        .iter()
        .filter(|&&b| {
            matches!(comp.nodes[b].op, cleave_ir::Op::Reduce { .. })
                && comp.nodes[b].phase == Phase::Forward
                && comp.ty(comp.nodes[b].results[0]).shape == [n, d / g]
        })
        .count();
    assert_eq!(means, 2, "x0 and x, once each");
    // No linear layer: an error.
    let mut t = Tracer::new("h");
    let a = t.input("a", DType::F32, vec![4]).unwrap();
    let q = t.param("q", DType::F32, vec![4]).unwrap();
    let m = t.mul(a, q).unwrap();
    let s = t.reduce_sum(m, vec![0]).unwrap();
    t.output("loss", s).unwrap();
    let mut module = Module::with_function(t.finish());
    let e = PassManager::from_pipeline("autodiff{compress=rank1}")
        .unwrap()
        .run(&mut module, &mut PassContext::default(), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("has none"), "{e}");
}

/// `rank1` with the batch's vector (`vector=batch`): the weight gradient reads `x̂ = (x_g·v)·v`
/// with `v` the unit direction of the average sub-token; sub-tokens all along one direction are
/// reconstructed exactly; an all-zero input gives zero, finite gradients; the vector's option is
/// checked.
#[test]
fn rank1_batch_vector_projects_onto_the_average_sub_token() {
    use cleave_ir::tracer::Tracer;
    let (n, d, g, o) = (6usize, 16usize, 4usize, 5usize);
    let mut t = Tracer::new("f");
    let x = t.input("x", DType::F32, vec![n, d]).unwrap();
    let v = t.input("v", DType::F32, vec![n, o]).unwrap();
    let w = t.param("w", DType::F32, vec![d, o]).unwrap();
    let y = t.matmul(x, w).unwrap();
    let p = t.mul(y, v).unwrap();
    let l = t.reduce_sum(p, vec![0, 1]).unwrap();
    t.output("loss", l).unwrap();
    let f = t.finish();
    let comp = run_pipeline(
        &f,
        &format!("autodiff{{compress=rank1,group={g},vector=batch}}"),
    );
    let exact = run_pipeline(&f, "autodiff");
    // dW = x̂ᵀ·v, from the formula in f64.
    let want = |xs: &[f64], vs: &[f64]| -> Vec<f64> {
        let mut m = vec![0.0; g];
        for (e, x) in xs.iter().enumerate() {
            m[e % g] += x / (n * d / g) as f64;
        }
        let norm = m.iter().map(|a| a * a).sum::<f64>().sqrt();
        let u: Vec<f64> = m.iter().map(|a| a / norm).collect();
        let xh: Vec<f64> = (0..n * d)
            .map(|e| {
                let base = e / g * g;
                let c: f64 = (0..g).map(|q| xs[base + q] * u[q]).sum();
                c * u[e % g]
            })
            .collect();
        (0..d * o)
            .map(|e| (0..n).map(|r| xh[r * d + e / o] * vs[r * o + e % o]).sum())
            .collect()
    };
    let close = |a: &[f64], b: &[f64], what: &str| {
        for (x, y) in a.iter().zip(b) {
            assert!(
                (x - y).abs() <= 1e-6 * (1.0 + y.abs()),
                "{what}: {x} vs {y}"
            );
        }
    };
    let mut args = forward_args(&f, 5);
    let out = outputs(&comp, &args);
    close(
        &out["grad.w"],
        &want(&args["x"].to_f64_vec(), &args["v"].to_f64_vec()),
        "random x",
    );
    assert_ne!(
        out["grad.w"],
        outputs(&exact, &args)["grad.w"],
        "approximate"
    );
    // Every sub-token a multiple of one direction: the projection loses nothing.
    let dir = [0.5, -1.0, 2.0, 0.25];
    let xs: Vec<f64> = (0..n * d)
        .map(|e| (1.0 + (e / g) as f64 * 0.3) * dir[e % g])
        .collect();
    args.insert("x".into(), Tensor::from_f64(vec![n, d], xs));
    close(
        &outputs(&comp, &args)["grad.w"],
        &outputs(&exact, &args)["grad.w"],
        "one direction",
    );
    // An all-zero input: no division by zero.
    args.insert("x".into(), Tensor::from_f64(vec![n, d], vec![0.0; n * d]));
    let zero = outputs(&comp, &args);
    assert!(
        zero["grad.w"].iter().all(|&a| a == 0.0),
        "{:?}",
        zero["grad.w"]
    );
    // The option: a bad name, or a vector without rank1.
    for (pipeline, want) in [
        ("autodiff{compress=rank1,vector=first}", "vector=first"),
        (
            "autodiff{compress=fewbit,vector=batch}",
            "does not name rank1",
        ),
    ] {
        let mut module = Module::with_function(f.clone());
        let e = PassManager::from_pipeline(pipeline)
            .and_then(|pm| {
                pm.run(&mut module, &mut PassContext::default(), &mut |_| {})
                    .map(|_| ())
            })
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{pipeline}: {e}");
    }
}

/// bf16 stash (`autodiff{compress=bf16}`): the backward reads every saved activation through a
/// bf16 round trip, so a weight gradient that is the activation itself is the activation rounded
/// to bfloat16; after `split-bw` F saves only bf16 values and B hands W no widened copy (W widens
/// the F→W value itself); `only=bf16:N` casts that value alone; a bad `only` is an error.
#[test]
fn bf16_stash_rounds_what_the_backward_reads() {
    use cleave_ir::tracer::Tracer;
    let (f, a, args) = tanh_step(3);
    // Rounded as the runtime rounds: every value to its dtype.
    let outputs =
        |f: &Function, args: &BTreeMap<String, Tensor>| outputs_at(f, args, Precision::F32);
    let exact = outputs(&run_pipeline(&f, "autodiff"), &args);
    let g = run_pipeline(&f, "autodiff{compress=bf16}");
    let out = outputs(&g, &args);
    assert_eq!(out["loss"], exact["loss"], "the forward is untouched");
    let want: Vec<f64> = exact["grad.w2"]
        .iter()
        .map(|&v| cleave_ir::interp::round_to_dtype(v, DType::BF16))
        .collect();
    assert_eq!(out["grad.w2"], want);
    assert_ne!(
        out["grad.w1"], exact["grad.w1"],
        "the stash was not rounded"
    );
    // Every forward f32 activation the backward reads goes through a widening cast.
    for &n in &g.body {
        let d = &g.nodes[n];
        if d.phase == Phase::Forward {
            continue;
        }
        for &v in &d.operands {
            let def = &g.nodes[g.values[v].def];
            let activation = def.phase == Phase::Forward
                && g.ty(v).dtype == DType::F32
                && g.ty(v).rank() > 0
                && !matches!(
                    def.op,
                    cleave_ir::Op::Param { .. } | cleave_ir::Op::Constant { .. }
                );
            assert!(!activation, "{} reads an f32 activation", d.op.name());
        }
    }
    // Split: F saves bf16 only; B hands W nothing widened.
    let mut m = Module::with_function(g);
    PassManager::from_pipeline("split-bw")
        .unwrap()
        .run(&mut m, &mut PassContext::default(), &mut |_| {})
        .unwrap();
    cleave_ir::verify_module(&m).unwrap();
    for func in &m.functions {
        for o in func.outputs.iter().filter(|o| o.name.starts_with("stash.")) {
            let def = &func.nodes[func.values[o.value].def];
            if func.name.ends_with(".F") {
                assert_eq!(
                    func.ty(o.value).dtype,
                    DType::BF16,
                    "{}: {}",
                    func.name,
                    o.name
                );
            } else {
                assert!(
                    !matches!(def.op, cleave_ir::Op::Cast { .. }),
                    "{}: B hands W a widened {}",
                    func.name,
                    o.name
                );
            }
        }
    }
    // Two stages: stage 1's B and W both read its saved activations; W widens them itself, and
    // nothing crosses the stage boundary narrow.
    let mut m = Module::with_function(tiny_mlp(vec![3, 4, 4, 2]));
    PassManager::from_pipeline("partition{stages=2},autodiff{compress=bf16},split-bw")
        .unwrap()
        .run(&mut m, &mut PassContext::default(), &mut |_| {})
        .unwrap();
    cleave_ir::verify_module(&m).unwrap();
    let mut widened_in_w = 0;
    for func in &m.functions {
        // A value crossing stages goes once, as f32: the reading stage narrows it.
        for o in func.outputs.iter().filter(|o| o.name.starts_with("act.")) {
            assert_eq!(
                func.ty(o.value).dtype,
                DType::F32,
                "{}: {}",
                func.name,
                o.name
            );
        }
        for o in func.outputs.iter().filter(|o| o.name.starts_with("stash.")) {
            let def = &func.nodes[func.values[o.value].def];
            let wide = matches!(def.op, cleave_ir::Op::Cast { to: DType::F32 });
            assert!(!wide, "{}: hands W a widened {}", func.name, o.name);
        }
        if func.name.ends_with(".W") {
            widened_in_w += func
                .body
                .iter()
                .filter(|&&n| {
                    let d = &func.nodes[n];
                    matches!(d.op, cleave_ir::Op::Cast { to: DType::F32 })
                        && func.ty(d.operands[0]).dtype == DType::BF16
                })
                .count();
        }
    }
    assert!(widened_in_w > 0, "no W widens a bf16 stash value");
    // A stage boundary right before a layer: stage 1's weight gradient reads stage 0's `a`.
    // It crosses once, as f32, and stage 1 narrows it.
    let mut t = Tracer::new("g");
    t.set_stage(Some(0));
    let gx = t.input("x", DType::F32, vec![4, 8]).unwrap();
    let gw1 = t.param("w1", DType::F32, vec![8, 8]).unwrap();
    let gh = t.matmul(gx, gw1).unwrap();
    let ga = t.tanh(gh).unwrap();
    t.set_stage(Some(1));
    let gw2 = t.param("w2", DType::F32, vec![8, 2]).unwrap();
    let gz = t.matmul(ga, gw2).unwrap();
    let gl = t.reduce_sum(gz, vec![0, 1]).unwrap();
    t.output("loss", gl).unwrap();
    let mut m = Module::with_function(t.finish());
    PassManager::from_pipeline("autodiff{compress=bf16},split-bw")
        .unwrap()
        .run(&mut m, &mut PassContext::default(), &mut |_| {})
        .unwrap();
    cleave_ir::verify_module(&m).unwrap();
    let acts: Vec<(String, DType)> = m
        .functions
        .iter()
        .flat_map(|f| {
            f.outputs
                .iter()
                .filter(|o| o.name.starts_with("act."))
                .map(|o| (o.name.clone(), f.ty(o.value).dtype))
        })
        .collect();
    assert!(!acts.is_empty());
    assert!(acts.iter().all(|(_, d)| *d == DType::F32), "{acts:?}");
    let f1 = m.functions.iter().find(|f| f.name == "g.s1.F").unwrap();
    assert!(
        f1.body
            .iter()
            .any(|&n| matches!(f1.nodes[n].op, cleave_ir::Op::Cast { to: DType::BF16 })),
        "stage 1 does not narrow what it saves"
    );
    // One value only: %N of the forward function.
    let numbering = cleave_ir::printer::print_numbering(&f);
    let n = numbering[a].unwrap();
    let one = run_pipeline(&f, &format!("autodiff{{compress=bf16,only=bf16:{n}}}"));
    let casts = |g: &Function| {
        g.body
            .iter()
            .filter(|&&b| matches!(g.nodes[b].op, cleave_ir::Op::Cast { to: DType::BF16 }))
            .count()
    };
    assert_eq!(casts(&one), 1);
    assert!(casts(&run_pipeline(&f, "autodiff{compress=bf16}")) > 1);
    assert_eq!(outputs(&one, &args)["grad.w2"], want);
    for (only, want) in [
        ("bf16:999", "not a value"),
        ("fp4:1", "unknown method"),
        ("bf16", "METHOD:N"),
    ] {
        let e = PassManager::from_pipeline(&format!("autodiff{{compress=bf16,only={only}}}"))
            .and_then(|pm| {
                pm.run(
                    &mut Module::with_function(f.clone()),
                    &mut PassContext::default(),
                    &mut |_| {},
                )
            })
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{only}: {e}");
    }
}

/// loss = Σ tanh(x·w1)·w2 (`x: [4, 8]`): grad.w2 = tanh(x·w1) (through the stash), and tanh's
/// VJP reads its result. Returns the function, `a = tanh(x·w1)` and f32 arguments from `seed`.
fn tanh_step(seed: u64) -> (Function, cleave_ir::Value, BTreeMap<String, Tensor>) {
    use cleave_ir::tracer::Tracer;
    let mut t = Tracer::new("f");
    let x = t.input("x", DType::F32, vec![4, 8]).unwrap();
    let w1 = t.param("w1", DType::F32, vec![8, 8]).unwrap();
    let w2 = t.param("w2", DType::F32, vec![4, 8]).unwrap();
    let h = t.matmul(x, w1).unwrap();
    let a = t.tanh(h).unwrap();
    let p = t.mul(a, w2).unwrap();
    let l = t.reduce_sum(p, vec![0, 1]).unwrap();
    t.output("loss", l).unwrap();
    let f = t.finish();
    let args = forward_args(&f, seed)
        .into_iter()
        .map(|(k, t)| {
            let v: Vec<f32> = t.to_f64_vec().iter().map(|&x| x as f32).collect();
            (k, Tensor::from_f32(t.shape.clone(), v))
        })
        .collect();
    (f, a, args)
}

/// `compress=int8`: what the backward reads is stored as 8-bit codes with one scale per row
/// (`max|x| / 127`) and widened to `q · scale`; the gradient equals the backward at exactly
/// those values, within half a step of the exact activation; after `split-bw` F saves codes and
/// scales, and B and W each widen for themselves (B hands W nothing wide).
#[test]
fn int8_stash_quantizes_per_row() {
    let (f, a, args) = tanh_step(5);
    let outputs =
        |f: &Function, args: &BTreeMap<String, Tensor>| outputs_at(f, args, Precision::F32);
    let exact = outputs(&run_pipeline(&f, "autodiff"), &args);
    let g = run_pipeline(&f, "autodiff{compress=int8}");
    cleave_ir::verify_function(&g).unwrap();
    let out = outputs(&g, &args);
    assert_eq!(out["loss"], exact["loss"], "the forward is untouched");
    // grad.w2 = a, quantized per row of 8 in f32 arithmetic.
    let act: Vec<f32> = exact["grad.w2"].iter().map(|&v| v as f32).collect();
    let mut want = Vec::new();
    for row in act.chunks(8) {
        let m = row
            .iter()
            .fold(0f32, |m, x| m.max(x.abs()))
            .max(f32::MIN_POSITIVE);
        let scale = m / 127.0;
        for &v in row {
            let q = (v / scale).round_ties_even() as i8;
            let r = q as f32 * scale;
            assert!((r - v).abs() <= scale * 0.5 + 1e-7, "{v} → {r}");
            want.push(r as f64);
        }
    }
    assert_eq!(out["grad.w2"], want);
    assert_ne!(out["grad.w2"], exact["grad.w2"], "nothing was quantized");
    // Every forward f32 activation the backward reads is widened from codes.
    for &n in &g.body {
        let d = &g.nodes[n];
        if d.phase == Phase::Forward {
            continue;
        }
        for &v in &d.operands {
            let def = &g.nodes[g.values[v].def];
            let activation = def.phase == Phase::Forward
                && g.ty(v).dtype == DType::F32
                && g.ty(v).shape.len() == 2
                && !matches!(
                    def.op,
                    cleave_ir::Op::Param { .. } | cleave_ir::Op::Constant { .. }
                );
            assert!(!activation, "{} reads an f32 activation", d.op.name());
        }
    }
    // Split: F saves codes and per-row scales; B hands W nothing wide; W widens its own.
    let mut m = Module::with_function(g);
    PassManager::from_pipeline("split-bw")
        .unwrap()
        .run(&mut m, &mut PassContext::default(), &mut |_| {})
        .unwrap();
    cleave_ir::verify_module(&m).unwrap();
    let widens = |func: &Function| {
        func.body.iter().any(|&n| {
            let d = &func.nodes[n];
            matches!(d.op, cleave_ir::Op::Cast { to: DType::F32 })
                && func.ty(d.operands[0]).dtype == DType::I8
        })
    };
    for func in &m.functions {
        for o in func.outputs.iter().filter(|o| o.name.starts_with("stash.")) {
            let ty = func.ty(o.value);
            if func.name.ends_with(".F") {
                assert!(
                    ty.dtype == DType::I8 || ty.shape.len() < 2,
                    "{}: F saves {} as {ty}",
                    func.name,
                    o.name
                );
            } else {
                assert!(
                    ty.shape.len() < 2,
                    "{}: B hands W {} ({ty})",
                    func.name,
                    o.name
                );
            }
        }
        if func.name.ends_with(".W") {
            assert!(widens(func), "W does not widen its codes");
        }
    }
    // Two stages: stage 1's B and W both read its codes; W widens them itself (the cast and
    // the broadcast scale re-created), B hands W nothing wide. With bf16 on as well, the row
    // scales are narrowed too (their widening cast is re-created in W as well).
    for methods in ["int8", "int8+bf16"] {
        let mut m = Module::with_function(tiny_mlp(vec![3, 4, 4, 2]));
        PassManager::from_pipeline(&format!(
            "partition{{stages=2}},autodiff{{compress={methods}}},split-bw"
        ))
        .unwrap()
        .run(&mut m, &mut PassContext::default(), &mut |_| {})
        .unwrap();
        cleave_ir::verify_module(&m).unwrap();
        let piece = |suffix: &str| {
            m.functions
                .iter()
                .find(|f| f.name.ends_with(suffix))
                .unwrap()
        };
        assert!(
            widens(piece("s1.B")),
            "{methods}: stage 1's B reads no codes: the test needs a B that widens"
        );
        for func in &m.functions {
            for o in func.outputs.iter().filter(|o| o.name.starts_with("stash.")) {
                let def = &func.nodes[func.values[o.value].def];
                let wide = matches!(def.op, cleave_ir::Op::Binary(cleave_ir::BinaryOp::Mul))
                    && func.ty(o.value).dtype == DType::F32
                    && !func.name.ends_with(".F");
                let scaled = wide
                    && def.operands.iter().any(|&x| {
                        let d = &func.nodes[func.values[x].def];
                        matches!(d.op, cleave_ir::Op::Cast { .. })
                            && func.ty(d.operands[0]).dtype == DType::I8
                    });
                assert!(
                    !scaled,
                    "{methods}: {} hands W a widened {}",
                    func.name, o.name
                );
            }
        }
        assert!(
            widens(piece("s1.W")),
            "{methods}: stage 1's W does not widen its codes"
        );
    }
    // Named values only; bad input.
    let numbering = cleave_ir::printer::print_numbering(&f);
    let n = numbering[a].unwrap();
    let one = run_pipeline(&f, &format!("autodiff{{compress=int8,only=int8:{n}}}"));
    assert_eq!(outputs(&one, &args)["grad.w2"], want);
    let codes = |g: &Function| {
        g.body
            .iter()
            .filter(|&&b| matches!(g.nodes[b].op, cleave_ir::Op::Cast { to: DType::I8 }))
            .count()
    };
    assert_eq!(codes(&one), 1);
    assert!(codes(&run_pipeline(&f, "autodiff{compress=int8}")) > 1);
}

/// The per-value choice (`cleave_passes::compress::choose`) on a made-up planner: the exact
/// step is kept when it adds nothing; otherwise the shortest feasible prefix of candidates, or a
/// longer one when it adds less, or the exact step when it is cheaper than any; where nothing
/// fits, the error.
#[test]
fn compression_choice_searches_prefixes() {
    use cleave_passes::autodiff::Method;
    use cleave_passes::compress::{choose, Candidate};
    let cands: Vec<Candidate> = (0..20)
        .map(|i| Candidate {
            value: i,
            stage: 0,
            method: Method::Bf16,
            bytes_exact: 8,
            bytes: 4,
            added_seconds: 1.0,
        })
        .collect();
    // Feasible from 7 compressions on; the objective is the count plus a recompute cost that
    // falls to 0 at 11 (a prefix the scan after the bisection visits: 7, 8, 9, 11, 15).
    let planner = |exact: Option<f64>| {
        move |c: &[Candidate]| -> Result<(usize, f64, bool), String> {
            let k = c.len();
            if k == 0 {
                return exact
                    .map(|s| (0, s, s == 0.0))
                    .ok_or("exact infeasible".into());
            }
            if k < 7 {
                return Err(format!("{k} too few"));
            }
            let recompute = if k < 11 { 10.0 } else { 0.0 };
            Ok((k, k as f64 + recompute, false))
        }
    };
    let (k, sel, tried) = choose(&cands, planner(None)).unwrap();
    assert_eq!(k, 11, "{tried:?}");
    assert_eq!(sel.unwrap().0.len(), 11);
    assert!(tried.len() < 12, "{} plans for 20 candidates", tried.len());
    let (k, sel, tried) = choose(&cands, planner(Some(0.0))).unwrap();
    assert_eq!(
        (k, sel.is_none(), tried.len()),
        (0, true, 1),
        "a clean exact plan is kept"
    );
    let (k, sel, _) = choose(&cands, planner(Some(5.0))).unwrap();
    assert_eq!((k, sel.is_none()), (0, true), "the exact plan adds less");
    // Equal objectives from the shortest feasible prefix on: the fewest compressions win.
    let flat = |c: &[Candidate]| -> Result<(usize, f64, bool), String> {
        match c.len() {
            0 => Err("exact infeasible".into()),
            k if k < 7 => Err(format!("{k} too few")),
            k => Ok((k, 1.0, false)),
        }
    };
    let (k, _, _) = choose(&cands, flat).unwrap();
    assert_eq!(k, 7, "ties go to the fewest compressions");
    let e = choose(
        &cands,
        |c: &[Candidate]| -> Result<(usize, f64, bool), String> {
            Err(format!("{} do not fit", c.len()))
        },
    )
    .unwrap_err();
    assert_eq!(e, "20 do not fit");
}
