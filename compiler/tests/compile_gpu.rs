//! `cleave compile --target cuda`: with the `mlir` feature it writes the MLIR, PTX and
//! descriptors of every kernel of a training step; without it, a clear error.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn cleave(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cleave"))
        .args(args)
        .output()
        .expect("run cleave")
}

fn example(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name)
        .display()
        .to_string()
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cleave-compile-gpu-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[cfg(not(feature = "mlir"))]
#[test]
fn cuda_target_without_the_feature_says_how_to_get_it() {
    let out = tmpdir("nofeature");
    let o = cleave(&[
        "compile",
        &example("mlp.cir"),
        "--target",
        "cuda",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--features mlir") && err.contains("scripts/install-llvm.sh"),
        "{err}"
    );
}

#[cfg(feature = "mlir")]
#[test]
fn cuda_target_writes_mlir_ptx_and_descriptors() {
    use cleave_runtime::gpu_kernel::{ArgRole, GpuFunction};

    let out = tmpdir("mlp");
    let o = cleave(&[
        "compile",
        &example("mlp.cir"),
        "--target",
        "cuda",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let json = std::fs::read_to_string(out.join("kernels.json")).unwrap();
    let desc: GpuFunction = serde_json::from_str(&json).unwrap();
    // Every output's buffer is written by some group (or is an argument).
    for (name, buf) in &desc.outputs {
        let written = desc.groups.iter().any(|g| {
            g.launches
                .iter()
                .flat_map(|k| &k.args)
                .any(|a| &a.name == buf && a.role == ArgRole::Output)
                || g.copies.iter().any(|(_, to)| to == buf)
        });
        assert!(
            written || desc.args.iter().any(|a| &a.name == buf),
            "output {name} ({buf}) is never written"
        );
    }
    assert!(desc.outputs.iter().any(|(n, _)| n == "loss"));
    assert!(desc.args.iter().any(|a| a.name == "fc1.weight"));
    let groups = desc.groups;
    assert!(groups.len() > 5);
    // The step's matmuls, reductions and the loss are all there.
    let ops: Vec<&str> = groups
        .iter()
        .flat_map(|g| g.ops.iter().map(|s| s.as_str()))
        .collect();
    for op in ["matmul", "cross_entropy", "reduce_sum", "relu"] {
        assert!(ops.contains(&op), "no {op} kernel in {ops:?}");
    }
    for g in &groups {
        let mlir = std::fs::read_to_string(out.join(format!("{}.mlir", g.name))).unwrap();
        assert!(mlir.contains(&format!("func.func @{}(", g.name)));
        assert!(mlir.contains("linalg.generic"));
        for k in &g.launches {
            let ptx = std::fs::read_to_string(out.join(format!("{}.ptx", k.name))).unwrap();
            assert_eq!(ptx, k.ptx);
            assert!(ptx.contains(&format!(".entry {}(", k.entry)));
        }
    }
    let pipeline = std::fs::read_to_string(out.join("pipeline.txt")).unwrap();
    assert!(pipeline.contains("gpu-module-to-binary{format=isa}"));

    // --emit mlir alone with a user pipeline (here: the default one, printed).
    let out2 = tmpdir("mlp-mlir");
    let o = cleave(&[
        "compile",
        &example("mlp.cir"),
        "--target",
        "cuda",
        "--emit",
        "mlir",
        "--mlir-pipeline",
        pipeline.trim(),
        "-o",
        out2.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out2.join("k0.mlir").exists());
    assert!(!out2.join("kernels.json").exists());

    // A pipeline that would abort LLVM is refused with the reason.
    let o = cleave(&[
        "compile",
        &example("mlp.cir"),
        "--target",
        "cuda",
        "--mlir-pipeline",
        &pipeline.trim().replace("+ptx80", "+ptx70"),
        "-o",
        out2.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("abort"));

    // A pass that fails (PTX from a GPU module never lowered to NVVM) names the kernel group
    // and dumps the MLIR it ran on; so does a pipeline whose result the backend cannot use.
    let no_nvvm = pipeline.trim().replace(
        "gpu.module(convert-scf-to-cf,convert-gpu-to-nvvm{use-bare-ptr-memref-call-conv=true},\
         canonicalize,reconcile-unrealized-casts),",
        "",
    );
    assert_ne!(no_nvvm, pipeline.trim());
    for (tag, bad, says) in [
        ("pass", no_nvvm.as_str(), "pipeline failed"),
        (
            "unusable",
            "builtin.module(func.func(convert-linalg-to-loops))",
            "unexpected host code",
        ),
    ] {
        let out3 = tmpdir(tag);
        let o = cleave(&[
            "compile",
            &example("mlp.cir"),
            "--target",
            "cuda",
            "--mlir-pipeline",
            bad,
            "-o",
            out3.to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success());
        assert!(err.contains("kernel k0") && err.contains(says), "{err}");
        assert!(err.contains("failed.mlir"), "{err}");
        let dumped = std::fs::read_to_string(out3.join("failed.mlir")).unwrap();
        assert!(dumped.contains("@k0("), "{dumped}");
    }
}

/// A model without a `loss` output (an ONNX export) compiles its forward function.
#[cfg(feature = "mlir")]
#[test]
fn cuda_target_compiles_the_forward_function_of_a_model_without_loss() {
    use cleave_runtime::gpu_kernel::GpuFunction;

    let out = tmpdir("onnx-mlp");
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/onnx/mlp.onnx");
    let o = cleave(&[
        "compile",
        model.to_str().unwrap(),
        "--target",
        "cuda",
        "--batch",
        "4",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let desc: GpuFunction =
        serde_json::from_str(&std::fs::read_to_string(out.join("kernels.json")).unwrap()).unwrap();
    assert!(!desc.outputs.iter().any(|(n, _)| n == "loss"));
    let x = desc.args.iter().find(|a| a.name == "x").unwrap();
    assert_eq!(x.shape[0], 4);
}
