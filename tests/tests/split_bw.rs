//! `split-bw`: running F, then B, then W per stage gives exactly the unsplit gradients, B and W
//! partition the backward, and the interfaces connect.

use std::collections::BTreeMap;
use std::path::Path;

use cleave_compiler::init::init_params;
use cleave_compiler::load::load_module;
use cleave_ir::{run_function_named, Function, Module, Phase, Precision, Tensor, TensorData};
use cleave_passes::split::{split_stages, stash_report};
use cleave_passes::{PassContext, PassManager};

fn run_passes(module: &mut Module, pipeline: &str) {
    let mut pm = PassManager::from_pipeline(pipeline).unwrap();
    pm.verify_each = true;
    pm.run(module, &mut PassContext::default(), &mut |_| {})
        .unwrap_or_else(|e| panic!("{pipeline}: {e}"));
}

/// Deterministic inputs for every data input of a forward function.
fn inputs_for(func: &Function, seed: u64) -> BTreeMap<String, Tensor> {
    let mut state = seed;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as f64 / (1u64 << 31) as f64
    };
    let mut out = BTreeMap::new();
    for a in func.data_inputs() {
        let n = a.ty.num_elements();
        let t = if a.ty.dtype.is_float() {
            Tensor::from_float(
                a.ty.dtype,
                a.ty.shape.clone(),
                (0..n).map(|_| next() * 2.0 - 1.0).collect(),
            )
        } else {
            // Labels and tokens: small non-negative integers, valid for every bundled model.
            Tensor::from_i64(
                a.ty.dtype,
                a.ty.shape.clone(),
                (0..n).map(|_| (next() * 4.0) as i64).collect(),
            )
        };
        out.insert(a.name.to_string(), t);
    }
    out
}

/// Assigns contiguous runs of forward nodes (in body order) to `stages` stages.
fn annotate_stages(func: &mut Function, stages: u32) {
    let compute: Vec<_> = func
        .body
        .iter()
        .copied()
        .filter(|&n| {
            let op = &func.nodes[n].op;
            op.arg_role().is_none()
                && !matches!(
                    op,
                    cleave_ir::Op::Constant { .. } | cleave_ir::Op::Iota { .. }
                )
        })
        .collect();
    let per = compute.len().div_ceil(stages as usize);
    for (i, n) in compute.into_iter().enumerate() {
        func.nodes[n].stage = Some((i / per) as u32);
    }
}

/// Runs a split module: every F in stage order, every B in reverse, every W in reverse; values
/// cross functions by name.
fn run_split(module: &Module, args: &BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    let stages = split_stages(module);
    let mut bus: BTreeMap<String, Tensor> = args.clone();
    let mut results = BTreeMap::new();
    let mut order: Vec<&Function> = stages.iter().map(|s| s.f).collect();
    order.extend(stages.iter().rev().map(|s| s.b));
    order.extend(stages.iter().rev().map(|s| s.w));
    for f in order {
        let mut call = BTreeMap::new();
        for a in f.args() {
            let t = bus
                .get(a.name)
                .or_else(|| results.get(a.name))
                .unwrap_or_else(|| panic!("@{}: nothing provides \"{}\"", f.name, a.name));
            call.insert(a.name.to_string(), t.clone());
        }
        let outs = run_function_named(f, &call, Precision::F32).unwrap();
        for (o, t) in f.outputs.iter().zip(outs) {
            if o.name.starts_with("grad.") || o.name == "loss" || o.name == "logits" {
                results.insert(o.name.clone(), t.clone());
            }
            bus.insert(o.name.clone(), t);
        }
    }
    results
}

fn bits(t: &Tensor) -> Vec<u64> {
    match &t.data {
        TensorData::Float(v) => v.iter().map(|x| x.to_bits()).collect(),
        TensorData::Int(v) => v.iter().map(|&x| x as u64).collect(),
        TensorData::Bool(v) => v.iter().map(|&x| x as u64).collect(),
    }
}

fn check_model(path: &str, stages: u32) {
    check_model_with(path, stages, false, "");
}

/// Stage annotations come from contiguous runs of equal node counts, or from the `partition`
/// pass (cost-balanced). A non-empty `prelude` (e.g. `chunk{k=4}`) runs on the forward first,
/// without its `logits` output (as a training step has it).
fn check_model_with(path: &str, stages: u32, use_partition: bool, prelude: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut forward = load_module(&root.join(path), &Default::default()).unwrap();
    if !prelude.is_empty() {
        forward.functions[0].outputs.retain(|o| o.name != "logits");
        run_passes(&mut forward, &format!("dce,{prelude}"));
    }
    if use_partition {
        run_passes(&mut forward, &format!("partition{{stages={stages}}}"));
    } else {
        annotate_stages(&mut forward.functions[0], stages);
    }
    let mut args = init_params(&forward.functions[0], 3);
    args.extend(inputs_for(&forward.functions[0], 11));

    let mut unsplit = forward.clone();
    run_passes(&mut unsplit, "autodiff");
    let joint = &unsplit.functions[0];
    let want: BTreeMap<String, Tensor> = joint
        .outputs
        .iter()
        .map(|o| o.name.clone())
        .zip(run_function_named(joint, &args, Precision::F32).unwrap())
        .collect();

    let mut split = unsplit.clone();
    run_passes(&mut split, "split-bw{accumulate=false}");
    let st = split_stages(&split);
    assert_eq!(st.len(), stages as usize, "{path}");
    let have = run_split(&split, &args);
    for (name, t) in &want {
        let h = have
            .get(name)
            .unwrap_or_else(|| panic!("{path}: split run lacks {name}"));
        assert_eq!(
            bits(h),
            bits(t),
            "{path}: {name} differs from the unsplit run"
        );
    }

    // Every backward node of the joint function is in exactly one B or W, and B ∪ W holds no
    // other compute (constants aside).
    let count = |f: &Function, pred: &dyn Fn(&cleave_ir::NodeData) -> bool| {
        f.body.iter().filter(|&&n| pred(&f.nodes[n])).count()
    };
    let is_compute = |d: &cleave_ir::NodeData| {
        d.op.arg_role().is_none()
            && !matches!(
                d.op,
                cleave_ir::Op::Constant { .. } | cleave_ir::Op::Iota { .. }
            )
    };
    let backward = count(joint, &|d| d.phase.is_backward() && is_compute(d));
    let forward_n = count(joint, &|d| d.phase == Phase::Forward && is_compute(d));
    let mut in_b = 0;
    let mut in_w = 0;
    let mut in_f = 0;
    for s in &st {
        in_f += count(s.f, &is_compute);
        in_b += count(s.b, &is_compute);
        in_w += count(s.w, &is_compute);
        // No node of B has only W consumers: every B value reaches a B output that is not
        // stash-only, or another B node.
        let uses = s.b.use_counts();
        for &n in &s.b.body {
            let d = &s.b.nodes[n];
            if !is_compute(d) {
                continue;
            }
            let feeds_b = d.results.iter().any(|&r| {
                s.b.outputs
                    .iter()
                    .any(|o| o.value == r && !o.name.starts_with("stash."))
                    || s.b.body.iter().any(|&m| s.b.nodes[m].operands.contains(&r))
            });
            assert!(
                feeds_b || uses[d.results[0]] == 0,
                "{path}: a node of @{} only feeds W",
                s.b.name
            );
        }
        let stash = stash_report(s);
        assert!(stash.m_w() <= stash.m_b() + stash.b_to_w);
    }
    assert_eq!(in_f, forward_n, "{path}: F holds the forward once");
    assert_eq!(
        in_b + in_w,
        backward,
        "{path}: B and W partition the backward"
    );
}

#[test]
fn mlp_one_stage() {
    check_model("examples/mlp.cir", 1);
}

#[test]
fn mlp_three_stages() {
    check_model("examples/mlp.cir", 3);
}

#[test]
fn cnn_two_stages() {
    check_model("examples/cnn-tiny.cir", 2);
}

#[test]
fn gpt_tiny_three_stages() {
    check_model("examples/gpt-tiny.cir", 3);
}

#[test]
fn gpt_tiny_one_stage() {
    check_model("examples/gpt-tiny.cir", 1);
}

#[test]
fn gpt_tiny_partitioned_into_four_stages() {
    check_model_with("examples/gpt-tiny.cir", 4, true, "");
}

#[test]
fn cnn_partitioned_into_two_stages_on_an_h100_profile() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut m = load_module(&root.join("examples/cnn-tiny.cir"), &Default::default()).unwrap();
    run_passes(
        &mut m,
        "partition{stages=2,profile=h100-sxm},autodiff,split-bw",
    );
    assert_eq!(split_stages(&m).len(), 2);
    check_model_with("examples/cnn-tiny.cir", 2, true, "");
}

/// `batch_w=K`: one W over K microbatches equals K accumulating runs of W (weight products up to
/// summation order, everything else bit for bit).
fn check_batch_w(path: &str, stages: u32, k: usize) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut m = load_module(&root.join(path), &Default::default()).unwrap();
    annotate_stages(&mut m.functions[0], stages);
    let params = init_params(&m.functions[0], 5);
    let forward = m.functions[0].clone();
    run_passes(&mut m, &format!("autodiff,split-bw{{batch_w={k}}}"));
    let st = split_stages(&m);
    // Per microbatch: run every F and B, keep the bus.
    let mut buses = Vec::new();
    for j in 0..k {
        let mut bus = params.clone();
        bus.extend(inputs_for(&forward, 100 + j as u64));
        let mut order: Vec<&Function> = st.iter().map(|s| s.f).collect();
        order.extend(st.iter().rev().map(|s| s.b));
        for f in order {
            let call: BTreeMap<String, Tensor> = f
                .args()
                .map(|a| {
                    (
                        a.name.to_string(),
                        bus.get(a.name)
                            .unwrap_or_else(|| panic!("@{}: no {}", f.name, a.name))
                            .clone(),
                    )
                })
                .collect();
            let outs = run_function_named(f, &call, Precision::F32).unwrap();
            for (o, t) in f.outputs.iter().zip(outs) {
                bus.insert(o.name.clone(), t);
            }
        }
        buses.push(bus);
    }
    for s in st.iter().rev() {
        let wk = m.function(&format!("{}{k}", s.w.name)).expect("batched W");
        // K accumulating runs of W.
        let mut acc: BTreeMap<String, Tensor> = BTreeMap::new();
        for a in s.w.args() {
            if a.name.starts_with("grad.") {
                acc.insert(a.name.to_string(), Tensor::zeros(a.ty));
            }
        }
        for bus in buses.iter_mut() {
            let call: BTreeMap<String, Tensor> =
                s.w.args()
                    .map(|a| {
                        let t = acc.get(a.name).unwrap_or_else(|| &bus[a.name]).clone();
                        (a.name.to_string(), t)
                    })
                    .collect();
            let outs = run_function_named(s.w, &call, Precision::F32).unwrap();
            for (o, t) in s.w.outputs.iter().zip(outs) {
                if o.name.starts_with("grad.") {
                    acc.insert(o.name.clone(), t);
                } else {
                    // Partial gradients for another stage's W (tied weights), per microbatch.
                    bus.insert(o.name.clone(), t);
                }
            }
        }
        // One run of W_K.
        let call: BTreeMap<String, Tensor> = wk
            .args()
            .map(|a| {
                let t = if let Some((base, j)) = a.name.rsplit_once('@') {
                    buses[j.parse::<usize>().unwrap()][base].clone()
                } else if a.name.starts_with("grad.") {
                    Tensor::zeros(a.ty)
                } else {
                    buses[0][a.name].clone()
                };
                (a.name.to_string(), t)
            })
            .collect();
        let outs = run_function_named(wk, &call, Precision::F32).unwrap();
        for (o, t) in wk.outputs.iter().zip(outs) {
            let Some(want) = acc.get(&o.name) else {
                continue;
            };
            let (a, b) = (t.as_f64().unwrap(), want.as_f64().unwrap());
            let scale = b.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-30);
            for (x, y) in a.iter().zip(b) {
                assert!(
                    (x - y).abs() <= 1e-5 * scale,
                    "{path} @{}: {} differs: {x} vs {y}",
                    wk.name,
                    o.name
                );
            }
        }
    }
}

#[test]
fn batched_w_over_three_microbatches_mlp() {
    check_batch_w("examples/mlp.cir", 2, 3);
}

#[test]
fn batched_w_over_two_microbatches_gpt_tiny() {
    check_batch_w("examples/gpt-tiny.cir", 2, 2);
}

/// `chunk{ops=lm-head,k=4}` before `autodiff`: the split of the chunked step runs to the
/// unsplit chunked gradients bit for bit, on one stage and on three; and the chunked gradients
/// are the unchunked ones: the loss and every gradient but the output layer's weight bit for bit,
/// that weight (a sum of four per-chunk products) within 1e-6 relative.
#[test]
fn gpt_tiny_chunked_head_splits_exactly_and_matches_unchunked() {
    check_model_with("examples/gpt-tiny.cir", 1, false, "chunk{k=4}");
    check_model_with("examples/gpt-tiny.cir", 3, false, "chunk{k=4}");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut forward =
        load_module(&root.join("examples/gpt-tiny.cir"), &Default::default()).unwrap();
    forward.functions[0].outputs.retain(|o| o.name != "logits");
    run_passes(&mut forward, "dce");
    let mut args = init_params(&forward.functions[0], 3);
    args.extend(inputs_for(&forward.functions[0], 11));
    let grads = |pipeline: &str| -> BTreeMap<String, Tensor> {
        let mut m = forward.clone();
        run_passes(&mut m, pipeline);
        let f = &m.functions[0];
        f.outputs
            .iter()
            .map(|o| o.name.clone())
            .zip(run_function_named(f, &args, Precision::F32).unwrap())
            .collect()
    };
    let plain = grads("autodiff");
    let chunked = grads("chunk{k=4},autodiff");
    assert_eq!(
        plain.keys().collect::<Vec<_>>(),
        chunked.keys().collect::<Vec<_>>()
    );
    let mut inexact = Vec::new();
    for (name, want) in &plain {
        let have = &chunked[name];
        if bits(have) == bits(want) {
            continue;
        }
        let (h, w) = (have.to_f64_vec(), want.to_f64_vec());
        let scale = w.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let err = h
            .iter()
            .zip(&w)
            .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()))
            / scale;
        assert!(err <= 1e-6, "{name}: {err:e}");
        inexact.push(name.as_str());
    }
    // gpt-tiny ties its output layer to the token embedding (`%2`): its gradient is the one
    // summed over chunks.
    assert!(
        inexact.iter().all(|n| n.starts_with("grad.")),
        "{inexact:?}"
    );
    assert!(inexact.len() <= 1, "{inexact:?}");
}
