//! `partition`: what the cut balances (`balance=estimate|split`) and the output layer left out of
//! the balance (`vocab-parallel`), on a GPT whose vocabulary makes its first and last stages
//! heavy.

use cleave_ir::models::{gpt, GptConfig};
use cleave_ir::{Function, Module, Op};
use cleave_passes::autodiff::{differentiate, Mode};
use cleave_passes::partition::{
    compute_nodes, output_layer_start, partition_function_by, split_node_seconds, Balance, Cut,
    DeviceProfile,
};
use cleave_passes::remat::{forward_seconds, function_seconds};
use cleave_passes::split::split_stages;
use cleave_passes::{PassContext, PassManager};

/// A GPT whose head over the vocabulary costs several layers.
fn big_vocab_gpt() -> Function {
    gpt(&GptConfig {
        vocab: 8192,
        d_model: 64,
        heads: 4,
        layers: 6,
        seq: 32,
        batch: 2,
        ..GptConfig::default()
    })
    .unwrap()
}

/// Each stage's F + B + W seconds after `autodiff,split-bw` of a cut forward function.
fn stage_seconds(cut: Function, profile: &DeviceProfile) -> Vec<f64> {
    let mut m = Module::with_function(cut);
    PassManager::from_pipeline("autodiff,split-bw")
        .unwrap()
        .run(&mut m, &mut PassContext::default(), &mut |_| {})
        .unwrap();
    split_stages(&m)
        .iter()
        .map(|s| {
            function_seconds(profile, s.f)
                + function_seconds(profile, s.b)
                + function_seconds(profile, s.w)
        })
        .collect()
}

fn cut_with(f: &Function, stages: u32, cut: Cut, profile: &DeviceProfile) -> Function {
    let mut f = f.clone();
    partition_function_by(&mut f, stages, profile, cut).unwrap();
    f
}

fn largest(xs: &[f64]) -> f64 {
    xs.iter().cloned().fold(0.0, f64::max)
}

#[test]
fn split_balance_evens_the_stages_f_b_w() {
    let f = big_vocab_gpt();
    let profile = DeviceProfile::load("h100-sxm").unwrap();
    for stages in [2u32, 4] {
        let est = stage_seconds(cut_with(&f, stages, Cut::default(), &profile), &profile);
        let split = Cut {
            balance: Balance::Split,
            vocab_parallel: false,
        };
        let bal = stage_seconds(cut_with(&f, stages, split, &profile), &profile);
        assert_eq!(bal.len(), stages as usize);
        // Balancing what the split program costs never leaves a heavier bottleneck.
        assert!(
            largest(&bal) <= largest(&est) * (1.0 + 1e-9),
            "{stages} stages: split {bal:?}, estimate {est:?}"
        );
    }
}

#[test]
fn node_seconds_add_up_to_the_differentiated_program() {
    let f = big_vocab_gpt();
    let profile = DeviceProfile::load("h100-sxm").unwrap();
    let compute = compute_nodes(&f);
    let per_node = split_node_seconds(&f, &compute, &profile).unwrap();
    let total: f64 = per_node.iter().map(|(f, b, w)| f + b + w).sum();
    // The whole differentiated program, less the forward's constants (which belong to no
    // compute node; constants autodiff emits belong to the node whose gradient uses them).
    let (g, _) = differentiate(f.clone(), Mode::Auto, &[]).unwrap();
    let constants: f64 = f
        .body
        .iter()
        .filter(|&&n| matches!(f.nodes[n].op, Op::Constant { .. } | Op::Iota { .. }))
        .map(|&n| forward_seconds(&profile, &f, n))
        .sum();
    let program = function_seconds(&profile, &g) - constants;
    let rel = (total - program).abs() / program;
    assert!(rel < 1e-9, "per-node {total} vs program {program}");
    // The forward part is the forward function's own time.
    let forward: f64 = per_node.iter().map(|x| x.0).sum();
    assert!((forward - (function_seconds(&profile, &f) - constants)).abs() <= 1e-9 * forward);
}

#[test]
fn vocab_parallel_leaves_the_output_layer_on_the_last_stage_out_of_the_balance() {
    let f = big_vocab_gpt();
    let profile = DeviceProfile::load("h100-sxm").unwrap();
    let compute = compute_nodes(&f);
    let start = output_layer_start(&f, &compute).expect("an LM head");
    let cut = Cut {
        balance: Balance::Split,
        vocab_parallel: true,
    };
    let g = cut_with(&f, 4, cut, &profile);
    for &n in &compute[start..] {
        assert_eq!(g.nodes[n].stage, Some(3), "{:?}", g.nodes[n].op.name());
    }
    // Without the head in the balance, the rest of the model is spread over all four stages:
    // the heaviest stage, not counting the head, is lighter than when the head is counted
    // (which here takes a stage to itself).
    let plain = cut_with(
        &f,
        4,
        Cut {
            balance: Balance::Split,
            vocab_parallel: false,
        },
        &profile,
    );
    let per_node = split_node_seconds(&f, &compute, &profile).unwrap();
    let without_head = |h: &Function| {
        let mut by_stage = [0.0f64; 4];
        for (i, &n) in compute[..start].iter().enumerate() {
            let (a, b, c) = per_node[i];
            by_stage[h.nodes[n].stage.unwrap() as usize] += a + b + c;
        }
        largest(&by_stage)
    };
    assert!(
        without_head(&g) < without_head(&plain),
        "{} vs {}",
        without_head(&g),
        without_head(&plain)
    );
}

#[test]
fn bad_balance_option_is_named() {
    let mut m = Module::with_function(big_vocab_gpt());
    let err = PassManager::from_pipeline("partition{stages=2,balance=flops}")
        .map(|pm| {
            pm.run(&mut m, &mut PassContext::default(), &mut |_| {})
                .map(|_| ())
        })
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("balance") && err.contains("`estimate` or `split`"),
        "{err}"
    );
}
