//! End-to-end tests of the `cleave` binary.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output};

use cleave_compiler::tensors::{read_tensors, write_tensors};
use cleave_ir::interp::Tensor;

fn cleave(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cleave"))
        .args(args)
        .output()
        .expect("run cleave")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cleave-cli-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn every_command_has_help() {
    let commands: [&[&str]; 7] = [
        &["--help"],
        &["inspect", "--help"],
        &["run", "--help"],
        &["new-model", "--help"],
        &["opt", "--help"],
        &["grad", "--help"],
        &["schedule", "--help"],
    ];
    for cmd in commands {
        let o = cleave(cmd);
        assert!(o.status.success(), "{cmd:?}: {}", stderr(&o));
        assert!(stdout(&o).contains("Usage:"), "{cmd:?}: {}", stdout(&o));
    }
}

#[test]
fn gpt_layer_forward_matmul_flops_match_the_paper() {
    let dir = tmpdir("flops");
    let file = dir.join("layer.cir");
    let f = file.to_str().unwrap();
    let o = cleave(&[
        "new-model",
        "gpt-layer",
        "--d-model",
        "4096",
        "--heads",
        "32",
        "--seq",
        "1024",
        "--batch",
        "1",
        "-o",
        f,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = cleave(&["inspect", f, "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let json: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    // Zero Bubble paper, Table 1: 24·s·b·h² + 4·b·s²·h with s=1024, b=1, h=4096.
    assert_eq!(json["flops"]["forward"]["matmul"], 429_496_729_600u64);
    assert!(json["flops"].get("dgrad").is_none());

    // After autodiff (stage mode: the layer has no loss), Table 1's B and W figures:
    // B = 24·s·h² + 8·s²·h, W = 24·s·h².
    let o = cleave(&["inspect", f, "--passes", "autodiff", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let json: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(json["flops"]["forward"]["matmul"], 429_496_729_600u64);
    assert_eq!(json["flops"]["dgrad"]["matmul"], 446_676_598_784u64);
    assert_eq!(json["flops"]["wgrad"]["matmul"], 412_316_860_416u64);

    // After the split: the same figures per F, B and W, and sized stash sets.
    let o = cleave(&["inspect", f, "--split", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let json: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let stage = &json["stages"][0];
    assert_eq!(stage["flops"]["F"]["matmul"], 429_496_729_600u64);
    assert_eq!(stage["flops"]["B"]["matmul"], 446_676_598_784u64);
    assert_eq!(stage["flops"]["W"]["matmul"], 412_316_860_416u64);
    for key in ["F_to_B", "F_to_W", "B_to_W"] {
        assert!(stage["stash_bytes"][key].as_u64().unwrap() > 0, "{key}");
    }
    assert!(json["parameters"]["count"].as_u64().unwrap() > 12 * 4096 * 4096);
    assert!(json["parameters"]["bytes"].as_u64().is_some());
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn inspect_prints_the_table() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/gpt-tiny.cir");
    let o = cleave(&["inspect", root]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("func @"), "{out}");
    assert!(out.contains("parameters:"), "{out}");
    assert!(out.contains("matmul FLOPs"), "{out}");
}

#[test]
fn run_mlp_with_params_and_report_missing_inputs() {
    let dir = tmpdir("run");
    let model = dir.join("mlp.cir");
    let params = dir.join("params.safetensors");
    let o = cleave(&[
        "new-model",
        "mlp",
        "--sizes",
        "6,5,3",
        "--batch",
        "4",
        "--seed",
        "3",
        "-o",
        model.to_str().unwrap(),
        "--params-out",
        params.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let p = read_tensors(&params).unwrap();
    assert_eq!(p.len(), 4, "{:?}", p.keys());

    let mut inputs = BTreeMap::new();
    inputs.insert(
        "x".to_string(),
        Tensor::from_f32(
            vec![4, 6],
            (0..24).map(|i| (i as f32 - 12.0) / 10.0).collect(),
        ),
    );
    let inputs_path = dir.join("inputs.safetensors");
    // Missing labels: the error names every expected argument with its type.
    write_tensors(&inputs_path, &inputs).unwrap();
    let o = cleave(&[
        "run",
        model.to_str().unwrap(),
        "--inputs",
        inputs_path.to_str().unwrap(),
        "--params",
        params.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("labels") && err.contains("i32[4]"), "{err}");

    inputs.insert(
        "labels".to_string(),
        Tensor::from_i64(cleave_ir::DType::I32, vec![4], vec![0, 1, 2, 1]),
    );
    write_tensors(&inputs_path, &inputs).unwrap();
    let out_path = dir.join("out.safetensors");
    let o = cleave(&[
        "run",
        model.to_str().unwrap(),
        "--inputs",
        inputs_path.to_str().unwrap(),
        "--params",
        params.to_str().unwrap(),
        "--out",
        out_path.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = read_tensors(&out_path).unwrap();
    let loss = out["loss"].as_f64().unwrap()[0];
    // Small uniform initialisation: the loss is near ln(3) for 3 classes.
    assert!((loss - 3f64.ln()).abs() < 0.5, "loss {loss}");

    // The same in f64 gives nearly the same loss.
    let o = cleave(&[
        "run",
        model.to_str().unwrap(),
        "--inputs",
        inputs_path.to_str().unwrap(),
        "--params",
        params.to_str().unwrap(),
        "--dtype",
        "f64",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("loss: "), "{}", stdout(&o));
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn broken_file_gives_a_located_error_and_exit_code_1() {
    let dir = tmpdir("broken");
    let file = dir.join("bad.cir");
    std::fs::write(
        &file,
        "func @f {\n  %0 = input {name = \"x\"} : f32[4]\n  %1 = expp %0 : f32[4]\n  return %1 as \"y\"\n}\n",
    )
    .unwrap();
    let o = cleave(&["inspect", file.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("bad.cir:3:8: error: unknown op `expp`"),
        "{err}"
    );
    assert!(err.contains("^^^^"), "{err}");
    let o = cleave(&["inspect", dir.join("missing.cir").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("missing.cir"), "{}", stderr(&o));
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn opt_runs_pipelines_and_rejects_unknown_passes() {
    let mlp = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/mlp.cir");
    let o = cleave(&["opt", mlp, "--passes", "autodiff,bogus"]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("unknown pass `bogus`"), "{err}");
    assert!(
        err.contains("autodiff") && err.contains("dce") && err.contains("optimizer"),
        "{err}"
    );

    let o = cleave(&["opt", mlp, "--passes", "autodiff{mode=sideways}"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("option `mode`"), "{}", stderr(&o));

    let o = cleave(&[
        "opt",
        mlp,
        "--passes",
        "autodiff,optimizer{kind=adamw,lr=0.001}",
        "--verify-each",
        "--print-ir-after",
        "autodiff",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("phase(dgrad)") && out.contains("phase(wgrad)"),
        "{out}"
    );
    assert!(
        out.contains("phase(optimizer)") && out.contains("as \"opt.step\""),
        "{out}"
    );
    assert!(
        stderr(&o).contains("IR Dump After autodiff"),
        "{}",
        stderr(&o)
    );
    assert!(
        !stderr(&o).contains("IR Dump After optimizer"),
        "{}",
        stderr(&o)
    );

    // The e-graph's stop reasons are reported with the IR dump.
    let o = cleave(&[
        "opt",
        mlp,
        "--passes",
        "autodiff,simplify",
        "--print-ir-after",
        "simplify",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("// simplify: @mlp: 1 region(s); stop reasons: algebra: saturated"),
        "{err}"
    );

    let o = cleave(&["opt", "--list-passes"]);
    assert!(o.status.success());
    assert!(stdout(&o).contains("jvp"));
}

#[test]
fn grad_writes_one_gradient_per_parameter() {
    let dir = tmpdir("grad");
    let model = dir.join("mlp.cir");
    let params = dir.join("params.safetensors");
    let o = cleave(&[
        "new-model",
        "mlp",
        "--sizes",
        "3,4,2",
        "--batch",
        "2",
        "-o",
        model.to_str().unwrap(),
        "--params-out",
        params.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut inputs = BTreeMap::new();
    inputs.insert(
        "x".to_string(),
        Tensor::from_f32(vec![2, 3], vec![0.5, -1.0, 2.0, 0.25, 0.0, -0.75]),
    );
    inputs.insert(
        "labels".to_string(),
        Tensor::from_i64(cleave_ir::DType::I32, vec![2], vec![1, 0]),
    );
    let inputs_path = dir.join("inputs.safetensors");
    write_tensors(&inputs_path, &inputs).unwrap();
    let grads_path = dir.join("grads.safetensors");
    let o = cleave(&[
        "grad",
        model.to_str().unwrap(),
        "--inputs",
        inputs_path.to_str().unwrap(),
        "--params",
        params.to_str().unwrap(),
        "--out",
        grads_path.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let grads = read_tensors(&grads_path).unwrap();
    let p = read_tensors(&params).unwrap();
    assert_eq!(
        grads.keys().collect::<Vec<_>>(),
        p.keys().collect::<Vec<_>>(),
        "one gradient per parameter, named as the parameter"
    );
    for (name, g) in &grads {
        assert_eq!(g.shape, p[name].shape, "{name}");
    }
    // The output bias gradient of a mean cross-entropy sums to zero over classes.
    let gb = grads["fc2.bias"].as_f64().unwrap();
    assert!((gb[0] + gb[1]).abs() < 1e-6, "{gb:?}");
    std::fs::remove_dir_all(dir).ok();
}

fn onnx_fixture(name: &str) -> String {
    format!("{}/../tests/onnx/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn inspect_onnx_mlp_with_batch() {
    let o = cleave(&["inspect", &onnx_fixture("mlp.onnx"), "--batch", "4"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("func @mlp"), "{out}");
    assert!(out.contains("input {name = \"x\"} : f32[4,8]"), "{out}");
    assert!(
        out.contains("param {name = \"fc1.weight\"} : f32[16,8]"),
        "{out}"
    );
    assert!(out.contains("parameters: 195"), "{out}");

    let o = cleave(&["inspect", &onnx_fixture("mlp.onnx")]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("dimension 0 is symbolic (`batch_size`); bind it with `--batch N`"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn opt_and_grad_on_onnx_with_added_loss() {
    let dir = tmpdir("onnx");
    let ad = cleave(&[
        "opt",
        &onnx_fixture("gpt.onnx"),
        "--batch",
        "4",
        "--loss",
        "cross-entropy",
        "--labels",
        "labels",
        "--passes",
        "autodiff",
    ]);
    assert!(ad.status.success(), "{}", stderr(&ad));
    assert!(stdout(&ad).contains("as \"grad.wte.weight\""));

    // Inputs from the reference file; parameters from the model's initializers.
    let reference =
        read_tensors(std::path::Path::new(&onnx_fixture("mlp.ref.safetensors"))).unwrap();
    let inputs: BTreeMap<String, Tensor> = ["x", "labels"]
        .iter()
        .map(|k| (k.to_string(), reference[*k].clone()))
        .collect();
    let inputs_path = dir.join("inputs.safetensors");
    write_tensors(&inputs_path, &inputs).unwrap();
    let grads_path = dir.join("grads.safetensors");
    let o = cleave(&[
        "grad",
        &onnx_fixture("mlp.onnx"),
        "--batch",
        "4",
        "--loss",
        "cross-entropy",
        "--labels",
        "labels",
        "--inputs",
        inputs_path.to_str().unwrap(),
        "--out",
        grads_path.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let grads = read_tensors(&grads_path).unwrap();
    let g = grads["fc1.weight"].to_f64_vec();
    let want = reference["grad.fc1.weight"].to_f64_vec();
    let err = g
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(err < 1e-5, "{err}");

    let o = cleave(&[
        "inspect",
        &onnx_fixture("mlp.onnx"),
        "--batch",
        "4",
        "--loss",
        "mse",
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("--loss needs --labels NAME"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn new_model_adds_a_loss() {
    let dir = tmpdir("newloss");
    let model = dir.join("block.cir");
    let o = cleave(&[
        "new-model",
        "gpt-layer",
        "--d-model",
        "8",
        "--heads",
        "2",
        "--seq",
        "4",
        "--batch",
        "2",
        "--loss",
        "mse",
        "-o",
        model.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = std::fs::read_to_string(&model).unwrap();
    assert!(
        text.contains("input {name = \"target\"} : f32[2,4,8]"),
        "{text}"
    );
    assert!(text.contains("as \"loss\""), "{text}");
    // A model that already has a loss: a clear error, not a second loss.
    let o = cleave(&["new-model", "mlp", "--sizes", "3,2", "--loss", "mse"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("already has a `loss` output"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn new_model_writes_synthetic_data_that_trains() {
    let d = tmpdir("data-out");
    let (model, data) = (d.join("gpt.cir"), d.join("gpt.safetensors"));
    // The model, and 40 synthetic examples written to `out`.
    let new_model = |out: &std::path::Path| {
        cleave(&[
            "new-model",
            "gpt",
            "--vocab",
            "32",
            "--seq",
            "8",
            "--batch",
            "4",
            "--layers",
            "1",
            "-o",
            model.to_str().unwrap(),
            "--data-out",
            out.to_str().unwrap(),
            "--examples",
            "40",
        ])
    };
    let o = new_model(&data);
    assert!(o.status.success(), "{}", stderr(&o));
    let t = read_tensors(&data).unwrap();
    let (tok, tgt) = (&t["tokens"], &t["targets"]);
    assert_eq!(tok.shape, vec![40, 8]);
    assert_eq!(tgt.shape, vec![40, 8]);
    let (tok, tgt) = (tok.to_f64_vec(), tgt.to_f64_vec());
    assert!(tok.iter().chain(&tgt).all(|&x| (0.0..32.0).contains(&x)));
    // Next-term targets: within an example, targets[t] = tokens[t + 1].
    for e in 0..40 {
        for p in 0..7 {
            assert_eq!(
                tgt[e * 8 + p],
                tok[e * 8 + p + 1],
                "example {e}, position {p}"
            );
        }
    }
    // The same seed gives the same data; the model trains on it.
    let again = d.join("again.safetensors");
    let o = new_model(&again);
    assert!(o.status.success());
    assert_eq!(
        std::fs::read(&data).unwrap(),
        std::fs::read(&again).unwrap()
    );
    let o = cleave(&[
        "train",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--steps",
        "3",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let _ = std::fs::remove_dir_all(&d);
}

/// `cleave bench --json` reports the heap allocations of a timed step, counted by the
/// instrumented allocator `cleave` installs (all threads; the plan's buffers are allocated at
/// compile time, so a step allocates only small bookkeeping).
#[test]
fn bench_counts_allocations_per_step() {
    let o = cleave(&[
        "bench",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/mlp.cir"),
        "--iters",
        "5",
        "--warmup",
        "2",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let n = v["allocations_per_step"].as_f64().expect("a count");
    assert!(n.is_finite() && n >= 0.0, "{v}");
    // Far fewer than one allocation per buffer of the plan (it has hundreds of values).
    assert!(n < 100.0, "{v}");
}
