//! Training stepped from memory ([`cleave_compiler::session`], what the Python package runs):
//! the same losses and weights as `cleave train` on the same examples in the same order, bit for
//! bit, on the one-stage path and the pipeline; gradients equal to the interpreter's `autodiff`;
//! checkpoints that resume either way; errors that name the input and the shapes.

mod common;

use cleave_compiler::pipeline_train;
use cleave_compiler::session::{Input, Session};
use cleave_compiler::train::{gather_batch, read_checkpoint, split_data, Column, Order, TrainArgs};
use cleave_runtime::HostData;
use common::bits;

/// The batch of `step` as `cleave train` reads it: per data input, its rows in order.
fn batch_of(
    s: &Session,
    order: &mut Order,
    cols: &[Column],
    step: usize,
) -> Vec<(String, Vec<usize>, HostData)> {
    let rows = order.rows(step, s.batch());
    let inputs = s.data_inputs();
    cols.iter()
        .map(|c| {
            let shape = inputs
                .iter()
                .find(|x| x.name == c.name)
                .unwrap()
                .shape
                .clone();
            (c.name.clone(), shape, gather_batch(c, &rows))
        })
        .collect()
}

fn inputs(batch: &[(String, Vec<usize>, HostData)]) -> Vec<Input<'_>> {
    batch
        .iter()
        .map(|(n, s, d)| Input {
            name: n,
            shape: s,
            data: d.as_slice(),
        })
        .collect()
}

/// Steps a session `steps` times on `cleave train`'s batches; returns its losses.
fn drive(a: &TrainArgs, s: &mut Session, steps: std::ops::Range<usize>) -> Vec<f64> {
    let (cols, _, n_train) = split_data(&a.data, s.forward(), s.batch()).unwrap();
    let mut order = Order::new(n_train, a.seed);
    steps
        .map(|k| {
            let b = batch_of(s, &mut order, &cols, k);
            s.step(&inputs(&b)).unwrap()
        })
        .collect()
}

#[test]
fn a_session_steps_like_the_pipeline() {
    let a = common::gpt_tiny(2, "zb-h1", 3);
    let run = pipeline_train::train(&a).unwrap();
    let mut s = Session::new(&a).unwrap();
    let losses = drive(&a, &mut s, 0..3);
    assert_eq!(losses, run.losses);
    let params = s.params();
    for (name, w) in &run.params {
        assert!(bits(&params[name].1) == bits(w), "{name} differs");
    }
}

/// Forward gradients in a session draw `cleave train`'s tangents: the same losses and weights
/// on the pipeline and on the one-stage path.
#[test]
fn forward_gradient_sessions_step_like_cleave_train() {
    let a = TrainArgs {
        grad_method: "forward-gradient".into(),
        tangents: 2,
        lr: Some(1e-3),
        ..common::gpt_tiny(2, "1f1b", 2)
    };
    let run = pipeline_train::train(&a).unwrap();
    let mut s = Session::new(&a).unwrap();
    assert_eq!(drive(&a, &mut s, 0..2), run.losses);
    let params = s.params();
    for (name, w) in &run.params {
        assert!(bits(&params[name].1) == bits(w), "{name} differs");
    }
    let dir = common::tmp("session-fg");
    let a = TrainArgs {
        grad_method: "forward-gradient".into(),
        optimizer: cleave_compiler::train::OptimizerArg::Sgd,
        lr: Some(1e-3),
        checkpoint: Some(dir.join("cli")),
        ..common::args(3)
    };
    cleave_compiler::train::train(&a).unwrap();
    let (want, _) = read_checkpoint(&dir.join("cli")).unwrap();
    let mut s = Session::new(&a).unwrap();
    drive(&a, &mut s, 0..3);
    let have = s.params();
    assert!(!have.is_empty());
    for (name, (_, d)) in &have {
        assert!(
            bits(d)
                == want[name]
                    .to_f32_vec()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect::<Vec<_>>(),
            "{name} differs"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_session_steps_like_cleave_train_and_resumes() {
    let dir = common::tmp("session-one");
    let a = TrainArgs {
        seed: Some(5),
        checkpoint: Some(dir.join("cli")),
        ..common::args(4)
    };
    cleave_compiler::train::train(&a).unwrap();
    let (want, meta) = read_checkpoint(&dir.join("cli")).unwrap();
    assert_eq!(meta["step"], "4");
    // Two steps, a checkpoint, a fresh session from it, two more.
    let mut s = Session::new(&a).unwrap();
    drive(&a, &mut s, 0..2);
    s.save(&dir.join("half")).unwrap();
    let mut s = Session::new(&a).unwrap();
    s.load(&dir.join("half")).unwrap();
    assert_eq!(s.steps_done(), 2);
    drive(&a, &mut s, 2..4);
    s.save(&dir.join("session")).unwrap();
    let (have, _) = read_checkpoint(&dir.join("session")).unwrap();
    assert_eq!(
        have.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (name, t) in &want {
        assert!(
            have[name]
                .to_f32_vec()
                .iter()
                .map(|x| x.to_bits())
                .eq(t.to_f32_vec().iter().map(|x| x.to_bits())),
            "{name} differs"
        );
    }
    // The parameters set back and read out again.
    let params = s.params();
    let values: Vec<(String, Vec<usize>, HostData)> = params
        .iter()
        .map(|(n, (sh, d))| (n.clone(), sh.clone(), d.clone()))
        .collect();
    let mut fresh = Session::new(&a).unwrap();
    fresh.set_params(&inputs(&values)).unwrap();
    for (name, (_, d)) in fresh.params() {
        assert!(
            bits(&d) == bits(&params[&name].1),
            "{name} after set_params"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn session_gradients_match_the_interpreter() {
    let a = common::args(1);
    let mut s = Session::new(&a).unwrap();
    let (cols, _, n_train) = split_data(&a.data, s.forward(), s.batch()).unwrap();
    let mut order = Order::new(n_train, a.seed);
    let b = batch_of(&s, &mut order, &cols, 0);
    let grads = s.grad(&inputs(&b)).unwrap();
    // The interpreter on the differentiated module, same parameters and batch.
    let mut module = cleave_compiler::load::load_module(&a.model, &Default::default()).unwrap();
    cleave_passes::PassManager::from_pipeline("autodiff")
        .unwrap()
        .run(
            &mut module,
            &mut cleave_passes::PassContext::default(),
            &mut |_| {},
        )
        .unwrap();
    let func = &module.functions[0];
    let mut args = std::collections::BTreeMap::new();
    for (name, (shape, d)) in s.params().into_iter().chain(
        b.iter()
            .map(|(n, sh, d)| (n.clone(), (sh.clone(), d.clone()))),
    ) {
        args.insert(name, cleave_runtime::tensor_from_host(&shape, &d));
    }
    let out = cleave_ir::interp::run_function_named(func, &args, cleave_ir::interp::Precision::F32)
        .unwrap();
    let mut n = 0;
    for (o, t) in func.outputs.iter().zip(&out) {
        if let Some(p) = o.name.strip_prefix("grad.") {
            let (shape, d) = &grads[p];
            let got = cleave_runtime::tensor_from_host(shape, d);
            let err = common::rel_err(&got, t);
            assert!(err <= 1e-5, "grad.{p} off by {err:e}");
            n += 1;
        }
    }
    assert_eq!(n, grads.len());
    // The forward outputs under the same parameters.
    let out = s.run(&inputs(&b)).unwrap();
    assert!(out.contains_key("loss") && out.contains_key("logits"));
}

#[test]
fn bad_batches_are_errors_naming_the_input() {
    let a = common::args(1);
    let mut s = Session::new(&a).unwrap();
    let x = vec![0.0f32; 10];
    let e = s
        .step(&[Input {
            name: "x",
            shape: &[2, 5],
            data: cleave_runtime::HostSlice::F32(&x),
        }])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("input `x` is f32[2, 5]; the model needs f32[32, 64]"),
        "{e}"
    );
    let e = s
        .step(&[Input {
            name: "pixels",
            shape: &[2, 5],
            data: cleave_runtime::HostSlice::F32(&x),
        }])
        .unwrap_err()
        .to_string();
    assert!(e.contains("`pixels` is not a data input of @mlp"), "{e}");
    let e = s
        .set_params(&[Input {
            name: "fc9.weight",
            shape: &[2, 5],
            data: cleave_runtime::HostSlice::F32(&x),
        }])
        .unwrap_err()
        .to_string();
    assert!(e.contains("`fc9.weight` is not a parameter"), "{e}");
}

/// `--precision f16` in a session: `cleave train`'s dynamic loss scale (the same losses, weights,
/// halvings and skipped steps), fed by the session rather than the caller, and carried through a
/// checkpoint.
#[test]
fn f16_sessions_scale_the_loss_like_cleave_train() {
    let dir = common::tmp("session-f16");
    let a = TrainArgs {
        precision: Some("f16".into()),
        // 2²⁴ overflows the backward's f16 GEMMs: the first steps are rolled back.
        loss_scale: (1u64 << 24) as f64,
        loss_scale_window: 2,
        ..common::gpt_tiny(1, "1f1b", 8)
    };
    let run = pipeline_train::train(&a).unwrap();
    let mut s = Session::new(&a).unwrap();
    assert!(s
        .data_inputs()
        .iter()
        .all(|x| x.name != cleave_passes::autodiff::LOSS_SCALE_INPUT));
    let head = drive(&a, &mut s, 0..4);
    let (scale, skipped) = s.loss_scale().expect("an f16 session has a scale");
    assert!(
        skipped > 0 && scale < (1u64 << 24) as f32,
        "{scale} {skipped}"
    );
    s.save(&dir.join("half")).unwrap();
    let (_, meta) = read_checkpoint(&dir.join("half")).unwrap();
    assert_eq!(meta["loss_scale"], scale.to_string());
    let mut s = Session::new(&a).unwrap();
    s.load(&dir.join("half")).unwrap();
    assert_eq!(s.loss_scale().unwrap().0, scale);
    let tail = drive(&a, &mut s, 4..8);
    assert_eq!([head, tail].concat(), run.losses);
    let params = s.params();
    for (name, w) in &run.params {
        assert!(bits(&params[name].1) == bits(w), "{name} differs");
    }
    // The forward runs unscaled without the caller naming the scale.
    let (cols, _, n_train) = split_data(&a.data, s.forward(), s.batch()).unwrap();
    let mut order = Order::new(n_train, a.seed);
    let rows = order.rows(0, s.microbatch());
    let one: Vec<(String, Vec<usize>, HostData)> = cols
        .iter()
        .map(|c| {
            let x = s
                .forward()
                .data_inputs()
                .find(|x| x.name == c.name)
                .unwrap();
            (c.name.clone(), x.ty.shape.clone(), gather_batch(c, &rows))
        })
        .collect();
    let out = s.run(&inputs(&one)).unwrap();
    assert!(out.contains_key("loss"));
    let _ = std::fs::remove_dir_all(&dir);
}
