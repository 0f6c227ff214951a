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

/// The runner's static library that cargo built for this test (as cleave-compiler's
/// dev-dependency it lands in `deps/` under a hashed name; as a workspace member also beside
/// `cleave`): the newest.
fn runner_lib() -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_cleave")).parent().unwrap();
    let mut found: Vec<PathBuf> = vec![dir.join("libcleave_runner.a")];
    if let Ok(entries) = std::fs::read_dir(dir.join("deps")) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("libcleave_runner-") && name.ends_with(".a") {
                found.push(e.path());
            }
        }
    }
    found
        .into_iter()
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .max()
        .expect("libcleave_runner.a: cargo builds it as a dev-dependency")
        .1
}

fn cleave(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cleave"))
        .args(args)
        .env("CLEAVE_RUNNER_LIB", runner_lib())
        .current_dir(root())
        .output()
        .unwrap()
}

/// The counts of `--kernel-report` on stderr: (ahead of time, JIT).
fn kernel_report(out: &Output) -> (usize, usize) {
    let e = String::from_utf8_lossy(&out.stderr);
    let line = e
        .lines()
        .find(|l| l.starts_with("kernels: "))
        .unwrap_or_else(|| panic!("no kernel report in {e}"));
    let nums: Vec<usize> = line.split(' ').filter_map(|w| w.parse().ok()).collect();
    (nums[0], nums[1])
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

/// The offset of the first occurrence of `needle` in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .unwrap_or_else(|| panic!("{} not in the executable", String::from_utf8_lossy(needle)))
}

/// The offset of the kernel table: the occurrence of its magic (which the runtime's code holds
/// too) whose checksum matches.
fn find_table(img: &[u8]) -> usize {
    (0..img.len() - 48)
        .filter(|&at| &img[at..at + 8] == b"CLVKERN1")
        .find(|&at| {
            let n = u64::from_le_bytes(img[at + 8..at + 16].try_into().unwrap()) as usize;
            if n == 0 || n > img.len() / 24 || at + 48 + n * 24 > img.len() {
                return false;
            }
            let mut bytes = img[at + 32..at + 48].to_vec();
            for i in 0..n {
                let e = at + 48 + i * 24;
                bytes.extend_from_slice(&img[e..e + 16]);
            }
            fnv128(&bytes).to_le_bytes() == img[at + 16..at + 32]
        })
        .expect("no kernel table in the executable")
}

/// FNV-1a, 128 bits (the kernel table's checksum).
fn fnv128(bytes: &[u8]) -> u128 {
    let mut h: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    for &b in bytes {
        h ^= b as u128;
        h = h.wrapping_mul(0x0000_0000_0100_0000_0000_0000_0000_013b);
    }
    h
}

/// Runs a copy of the executable `image` changed by `patch`.
fn run_patched(
    dir: &Path,
    image: &[u8],
    args: &[&str],
    patch: impl FnOnce(&mut Vec<u8>),
) -> Output {
    let mut img = image.to_vec();
    patch(&mut img);
    let bad = dir.join("patched-train");
    let _ = std::fs::remove_file(&bad);
    std::fs::write(&bad, img).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let out = run_exe(&bad, dir, args);
    std::fs::remove_file(&bad).unwrap();
    out
}

/// `cleave train MODEL flags` and the executable compiled with `compile_flags` run with `flags`
/// give identical metrics.
fn same_as_train(name: &str, model: &str, data: &str, compile_flags: &[&str], flags: &[&str]) {
    let dir = tmp(name);
    let exe = compile(model, &dir, compile_flags);
    let data_abs = root().join(data);
    let elsewhere = dir.join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();

    let mut exe_args = vec![
        "--data",
        data_abs.to_str().unwrap(),
        "--metrics",
        "m.jsonl",
        "--kernel-report",
    ];
    exe_args.extend_from_slice(flags);
    let out = run_exe(&exe, &elsewhere, &exe_args);
    let line = ok(&out);
    assert!(line.contains("final loss"), "{line}");
    // Every fused loop ran code compiled ahead of time: nothing was compiled at start-up.
    let (aot, jit) = kernel_report(&out);
    assert!(aot > 0 && jit == 0, "ahead of time {aot}, JIT {jit}");

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

/// `--schedule auto --memory-limit`: the executable runs the joint planner's plan (schedule
/// and recomputation chosen together), compiled ahead of time like any other.
#[test]
fn joint_plan_travels_with_the_executable() {
    same_as_train(
        "gpt-joint",
        "examples/gpt-tiny.cir",
        "examples/data/modadd.safetensors",
        &[
            "--stages",
            "2",
            "--microbatches",
            "4",
            "--schedule",
            "auto",
            "--memory-limit",
            "5700K",
        ],
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

    // A corrupt payload: its hash no longer matches the one the kernel table records.
    let image = std::fs::read(&exe).unwrap();
    let e = err(&run_patched(&dir, &image, &["--data", data], |img| {
        let at = find(img, b"\"model_name\":\"mlp-digits.cir\"");
        img[at + 14] = b'M';
    }));
    assert!(e.contains("corrupt payload"), "{e}");
    // A damaged kernel table: a fingerprint changed, the magic, or the entry count (which must
    // fit the table's length, an immediate in `main`'s code).
    let table = find_table(&image);
    let e = err(&run_patched(&dir, &image, &["--data", data], |img| {
        img[table + 48] ^= 1;
    }));
    assert!(e.contains("kernel table") && e.contains("checksum"), "{e}");
    let e = err(&run_patched(&dir, &image, &["--data", data], |img| {
        img[table] = b'X';
    }));
    assert!(e.contains("kernel table") && e.contains("magic"), "{e}");
    let e = err(&run_patched(&dir, &image, &["--data", data], |img| {
        img[table + 12] ^= 0x40;
    }));
    assert!(
        e.contains("kernel table") && e.contains("do not fit"),
        "{e}"
    );
    // Entries whose fingerprints match no loop (checksum recomputed, so the table is
    // consistent) are never called: the loops they were written for are compiled by the JIT at
    // start-up, and training gives the same losses.
    let mut args = common.to_vec();
    args.extend_from_slice(&["--steps", "3", "--kernel-report"]);
    let good = run_exe(&exe, &dir, &args);
    let (good_aot, good_jit) = kernel_report(&good);
    assert_eq!(good_jit, 0);
    let patched = run_patched(&dir, &image, &args, |img| {
        let n = u64::from_le_bytes(img[table + 8..table + 16].try_into().unwrap()) as usize;
        let mut bytes = img[table + 32..table + 48].to_vec();
        for i in 0..n {
            let at = table + 48 + i * 24;
            img[at] ^= 1;
            bytes.extend_from_slice(&img[at..at + 16]);
        }
        let sum = fnv128(&bytes).to_le_bytes();
        img[table + 16..table + 32].copy_from_slice(&sum);
    });
    let no_speed = |o: &Output| {
        ok(o)
            .split(", ")
            .filter(|p| !p.ends_with("steps/s"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    assert_eq!(no_speed(&patched), no_speed(&good));
    let (aot, jit) = kernel_report(&patched);
    assert!(aot == 0 && jit == good_aot, "{aot} + {jit} vs {good_aot}");
    // `--no-aot` compiles every loop with the JIT, as `cleave train` does.
    let mut jit_args = args.clone();
    jit_args.push("--no-aot");
    let all_jit = run_exe(&exe, &dir, &jit_args);
    assert_eq!(no_speed(&all_jit), no_speed(&good));
    assert_eq!(kernel_report(&all_jit), (0, good_aot));

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
    // A runner library that is not there, and a linker that is not there.
    let o2 = Command::new(env!("CARGO_BIN_EXE_cleave"))
        .args(["compile", "examples/mlp-digits.cir", "-o", o])
        .env("CLEAVE_RUNNER_LIB", dir.join("no-runner"))
        .current_dir(root())
        .output()
        .unwrap();
    let e = err(&o2);
    assert!(
        e.contains("CLEAVE_RUNNER_LIB") && e.contains("no-runner") && e.contains("cargo build"),
        "{e}"
    );
    assert!(!out.exists());
    let o3 = Command::new(env!("CARGO_BIN_EXE_cleave"))
        .args(["compile", "examples/mlp-digits.cir", "-o", o])
        .env("CLEAVE_RUNNER_LIB", runner_lib())
        .env("CC", dir.join("no-cc"))
        .current_dir(root())
        .output()
        .unwrap();
    let e = err(&o3);
    assert!(e.contains("linker") && e.contains("no-cc"), "{e}");
    assert!(!out.exists());
    // A library without the runner's entry point (here an empty archive; in practice one from
    // another cleave version): the link fails and says to rebuild it.
    let empty = dir.join("libempty.a");
    std::fs::write(&empty, b"!<arch>\n").unwrap();
    let o4 = Command::new(env!("CARGO_BIN_EXE_cleave"))
        .args(["compile", "examples/mlp-digits.cir", "-o", o])
        .env("CLEAVE_RUNNER_LIB", &empty)
        .current_dir(root())
        .output()
        .unwrap();
    let e = err(&o4);
    assert!(
        e.contains("cleave_runner_main_v1") && e.contains("cargo build --release -p cleave-runner"),
        "{e}"
    );
    assert!(!out.exists());
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

#[test]
fn learning_rates_given_to_compile_are_compiled_ahead_of_time() {
    let dir = tmp("lr");
    let data = root().join("examples/data/digits.safetensors");
    let run = |exe: &Path, lr: &str| {
        let args = [
            "--data",
            data.to_str().unwrap(),
            "--steps",
            "2",
            "--optimizer",
            "momentum",
            "--lr",
            lr,
            "--quiet",
            "--kernel-report",
        ];
        let out = run_exe(exe, &dir, &args);
        ok(&out);
        kernel_report(&out)
    };
    // Without `--lr` at compile time, another rate's optimizer loops go through the JIT.
    let plain = compile("examples/mlp-digits.cir", &dir, &[]);
    let (_, jit) = run(&plain, "0.07");
    assert!(jit > 0, "{jit}");
    // With it, none do; the default rates stay compiled in.
    let exe = dir.join("train-lr");
    let out = ok(&cleave(&[
        "compile",
        "examples/mlp-digits.cir",
        "-o",
        exe.to_str().unwrap(),
        "--lr",
        "0.07",
        "--lr",
        "0.3",
    ]));
    assert!(out.contains("wrote"), "{out}");
    assert_eq!(run(&exe, "0.07").1, 0);
    assert_eq!(run(&exe, "0.3").1, 0);
    assert_eq!(run(&exe, "0.05").1, 0, "momentum's default rate");
    let e = err(&cleave(&[
        "compile",
        "examples/mlp-digits.cir",
        "-o",
        exe.to_str().unwrap(),
        "--lr",
        "0",
    ]));
    assert!(e.contains("--lr 0") && e.contains("positive"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
