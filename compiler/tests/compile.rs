//! `cleave compile -o EXE`: the standalone executable trains with losses identical to
//! `cleave train`, single-stage and pipelined, from another directory with a PATH that holds no
//! toolchain, and reports missing or corrupt files clearly.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cleave-compile-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn cleave(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cleave"))
        .args(args)
        .current_dir(root())
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn err(out: &Output) -> String {
    assert!(!out.status.success(), "unexpectedly succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Compiles `model` with `extra` flags into `dir/train`.
fn compile(model: &str, dir: &Path, extra: &[&str]) -> PathBuf {
    let exe = dir.join("train");
    let mut args = vec!["compile", model, "-o", exe.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = ok(&cleave(&args));
    assert!(out.contains("wrote"), "{out}");
    exe
}

/// Runs the executable in `cwd` with an environment that holds only a PATH to an empty
/// directory: no cargo, rustc or cc can be found.
fn run_exe(exe: &Path, cwd: &Path, args: &[&str]) -> Output {
    let empty = cwd.join("empty-bin");
    std::fs::create_dir_all(&empty).unwrap();
    Command::new(exe)
        .args(args)
        .current_dir(cwd)
        .env_clear()
        .env("PATH", &empty)
        .output()
        .unwrap()
}

/// The (step, loss) pairs and eval lines of a metrics file (timings dropped).
fn losses(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("steps_per_s");
            v.to_string()
        })
        .collect()
}

/// `cleave train MODEL flags` and the executable compiled with `compile_flags` run with `flags`
/// give identical metrics.
fn same_as_train(name: &str, model: &str, data: &str, compile_flags: &[&str], flags: &[&str]) {
    let dir = tmp(name);
    let exe = compile(model, &dir, compile_flags);
    let data_abs = root().join(data);
    let elsewhere = dir.join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();

    let mut exe_args = vec!["--data", data_abs.to_str().unwrap(), "--metrics", "m.jsonl"];
    exe_args.extend_from_slice(flags);
    let out = run_exe(&exe, &elsewhere, &exe_args);
    let line = ok(&out);
    assert!(line.contains("final loss"), "{line}");

    let train_metrics = dir.join("train.jsonl");
    let mut args = vec![
        "train",
        model,
        "--data",
        data,
        "--metrics",
        train_metrics.to_str().unwrap(),
    ];
    args.extend_from_slice(compile_flags);
    args.extend_from_slice(flags);
    ok(&cleave(&args));

    let (a, b) = (losses(&elsewhere.join("m.jsonl")), losses(&train_metrics));
    assert!(a.len() >= 3, "{a:?}");
    assert_eq!(a, b, "executable and cleave train differ");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn mlp_single_stage_matches_cleave_train() {
    same_as_train(
        "mlp1",
        "examples/mlp-digits.cir",
        "examples/data/digits.safetensors",
        &[],
        &[
            "--steps",
            "12",
            "--optimizer",
            "adamw",
            "--seed",
            "3",
            "--eval-every",
            "6",
            "--quiet",
        ],
    );
}

#[test]
fn mlp_pipelined_matches_cleave_train() {
    same_as_train(
        "mlp2",
        "examples/mlp-digits.cir",
        "examples/data/digits.safetensors",
        &[
            "--stages",
            "2",
            "--microbatches",
            "4",
            "--schedule",
            "zb-h1",
        ],
        &["--steps", "6", "--seed", "1", "--lr", "0.05", "--quiet"],
    );
}

#[test]
fn remat_and_grad_method_travel_with_the_executable() {
    same_as_train(
        "mlp-remat",
        "examples/mlp-digits.cir",
        "examples/data/digits.safetensors",
        &[
            "--stages",
            "2",
            "--microbatches",
            "2",
            "--schedule",
            "1f1b",
            "--remat",
            "offload-all",
        ],
        &["--steps", "4", "--seed", "1", "--lr", "0.05", "--quiet"],
    );
    same_as_train(
        "mlp-dfa",
        "examples/mlp-digits.cir",
        "examples/data/digits.safetensors",
        &["--grad-method", "dfa"],
        &[
            "--steps",
            "4",
            "--seed",
            "1",
            "--optimizer",
            "sgd",
            "--quiet",
        ],
    );
}

#[test]
fn gpt_single_stage_and_pipelined_match_cleave_train() {
    same_as_train(
        "gpt1",
        "examples/gpt-tiny.cir",
        "examples/data/modadd.safetensors",
        &[],
        &[
            "--steps",
            "4",
            "--optimizer",
            "momentum",
            "--seed",
            "2",
            "--quiet",
        ],
    );
    same_as_train(
        "gpt2",
        "examples/gpt-tiny.cir",
        "examples/data/modadd.safetensors",
        &["--stages", "2", "--microbatches", "2", "--schedule", "1f1b"],
        &["--steps", "3", "--seed", "2", "--quiet"],
    );
}

#[test]
fn checkpoints_resume_and_file_errors() {
    let dir = tmp("errors");
    let exe = compile("examples/mlp-digits.cir", &dir, &["--batch", "32"]);
    let data = root().join("examples/data/digits.safetensors");
    let data = data.to_str().unwrap();

    // --help names the model and the flags.
    let help = ok(&run_exe(&exe, &dir, &["--help"]));
    assert!(
        help.contains("mlp-digits.cir") && help.contains("--resume"),
        "{help}"
    );

    // Resume from the executable's own checkpoint equals an uninterrupted run.
    let common = [
        "--data",
        data,
        "--optimizer",
        "adamw",
        "--seed",
        "5",
        "--quiet",
    ];
    let run = |extra: &[&str]| {
        let mut a = common.to_vec();
        a.extend_from_slice(extra);
        run_exe(&exe, &dir, &a)
    };
    ok(&run(&["--steps", "8", "--metrics", "full.jsonl"]));
    ok(&run(&[
        "--steps",
        "4",
        "--checkpoint",
        "ck",
        "--checkpoint-every",
        "4",
    ]));
    ok(&run(&[
        "--steps",
        "8",
        "--resume",
        "ck",
        "--metrics",
        "resumed.jsonl",
    ]));
    let full = losses(&dir.join("full.jsonl"));
    let resumed = losses(&dir.join("resumed.jsonl"));
    assert_eq!(&full[full.len() - resumed.len()..], &resumed[..]);

    // Missing and corrupt files.
    let e = err(&run_exe(
        &exe,
        &dir,
        &["--data", "nope.safetensors", "--steps", "1"],
    ));
    assert!(e.contains("nope.safetensors"), "{e}");
    std::fs::write(dir.join("bad.safetensors"), b"not a safetensors file").unwrap();
    let e = err(&run_exe(
        &exe,
        &dir,
        &["--data", "bad.safetensors", "--steps", "1"],
    ));
    assert!(e.contains("bad.safetensors"), "{e}");
    let e = err(&run(&["--steps", "2", "--resume", "no-such-dir"]));
    assert!(e.contains("no-such-dir"), "{e}");
    std::fs::create_dir_all(dir.join("badck")).unwrap();
    std::fs::write(
        dir.join("badck/checkpoint.safetensors"),
        b"\x08\0\0\0\0\0\0\0garbage!",
    )
    .unwrap();
    let e = err(&run(&["--steps", "2", "--resume", "badck"]));
    assert!(e.contains("badck"), "{e}");

    // A corrupt payload.
    let mut image = std::fs::read(&exe).unwrap();
    image.extend_from_slice(b"{not json");
    image.extend_from_slice(&9u64.to_le_bytes());
    image.extend_from_slice(b"CLEAVEX1");
    let bad = dir.join("bad-train");
    std::fs::write(&bad, image).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let e = err(&run_exe(&bad, &dir, &["--data", data]));
    assert!(e.contains("corrupt payload"), "{e}");
    std::fs::remove_file(&bad).unwrap();

    // A batch other than the compiled one.
    let e = err(&run(&["--steps", "1", "--batch", "16"]));
    assert!(e.contains("compiled for batch 32"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn compile_errors() {
    let dir = tmp("compile-errors");
    let out = dir.join("x");
    let o = out.to_str().unwrap();
    // `--target cuda` writes kernels with the MLIR backend, and says how to get it without.
    let kernels = dir.join("kernels");
    let gpu = cleave(&[
        "compile",
        "examples/mlp-digits.cir",
        "-o",
        kernels.to_str().unwrap(),
        "--target",
        "cuda",
    ]);
    if cfg!(feature = "mlir") {
        ok(&gpu);
        assert!(kernels.join("kernels.json").is_file());
    } else {
        let e = err(&gpu);
        assert!(
            e.contains("--target cuda") && e.contains("--features mlir"),
            "{e}"
        );
    }
    let e = err(&cleave(&[
        "compile",
        "examples/mlp-digits.cir",
        "-o",
        o,
        "--remat",
        "all",
    ]));
    assert!(e.contains("unknown policy"), "{e}");
    let e = err(&cleave(&[
        "compile",
        "examples/mlp-digits.cir",
        "-o",
        o,
        "--batch",
        "7",
    ]));
    assert!(e.contains("traced at batch 32"), "{e}");
    let e = err(&cleave(&[
        "compile",
        "examples/mlp-digits.cir",
        "-o",
        o,
        "--stages",
        "2",
        "--schedule",
        "nope",
    ]));
    assert!(e.contains("nope"), "{e}");
    assert!(!out.exists());
    // A runner that is not there.
    let o2 = Command::new(env!("CARGO_BIN_EXE_cleave"))
        .args(["compile", "examples/mlp-digits.cir", "-o", o])
        .env("CLEAVE_RUNNER", dir.join("no-runner"))
        .current_dir(root())
        .output()
        .unwrap();
    let e = err(&o2);
    assert!(
        e.contains("CLEAVE_RUNNER") && e.contains("no-runner"),
        "{e}"
    );
    assert!(!out.exists());
    // The bare runner explains itself.
    let runner = Path::new(env!("CARGO_BIN_EXE_cleave-runner"));
    let e = err(&Command::new(runner).arg("--help").output().unwrap());
    assert!(e.contains("no embedded model"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn onnx_model_with_stored_weights_and_added_loss_matches_cleave_train() {
    // The ONNX MLP's initializers travel inside the executable; the label is the index of the
    // largest of the first 3 features.
    let (n, features) = (64, 8);
    let mut state = 777u64;
    let x: Vec<f32> = (0..n * features)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) as f64 / (1u64 << 31) as f64 * 2.0 - 1.0) as f32
        })
        .collect();
    let labels: Vec<i64> = (0..n)
        .map(|i| {
            let row = &x[i * features..i * features + 3];
            (0..3).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap() as i64
        })
        .collect();
    let dir = tmp("onnx-data");
    let data = dir.join("data.safetensors");
    let mut t = std::collections::BTreeMap::new();
    t.insert(
        "x".to_string(),
        cleave_ir::Tensor::from_f32(vec![n, features], x),
    );
    t.insert(
        "labels".to_string(),
        cleave_ir::Tensor::from_i64(cleave_ir::DType::I32, vec![n], labels),
    );
    cleave_compiler::tensors::write_tensors(&data, &t).unwrap();
    same_as_train(
        "onnx",
        "tests/onnx/mlp.onnx",
        data.to_str().unwrap(),
        &[
            "--batch",
            "4",
            "--loss",
            "cross-entropy",
            "--labels",
            "labels",
        ],
        &["--steps", "10", "--seed", "3", "--quiet"],
    );
    let _ = std::fs::remove_dir_all(&dir);
}
