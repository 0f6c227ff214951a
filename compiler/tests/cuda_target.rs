//! `--target cuda` where it cannot run: without `--features cuda` the error says to rebuild with
//! it; with the feature but no CUDA driver it says that no driver was found.

use std::process::Command;

fn cleave(args: &[&str]) -> (bool, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_cleave"))
        .args(args)
        .output()
        .expect("run cleave");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn driver_present() -> bool {
    #[cfg(feature = "cuda")]
    {
        cleave_runtime::cuda::driver_present()
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}

#[test]
fn target_cuda_without_gpu_support_is_a_clear_error() {
    if driver_present() {
        eprintln!("SKIPPED target_cuda_without_gpu_support: a CUDA driver is present");
        return;
    }
    for cmd in [
        &[
            "train",
            "model.cir",
            "--data",
            "d.safetensors",
            "--target",
            "cuda",
        ][..],
        &["bench", "model.cir", "--target", "cuda"][..],
    ] {
        let (ok, err) = cleave(cmd);
        assert!(!ok, "{cmd:?} succeeded");
        if cfg!(feature = "cuda") {
            assert!(
                err.contains("no CUDA driver found") && err.contains("libcuda.so"),
                "{err}"
            );
        } else {
            assert!(
                err.contains("--features cuda") && err.contains("without CUDA support"),
                "{err}"
            );
        }
    }
}

#[test]
fn target_is_checked_by_name() {
    let (ok, err) = cleave(&["bench", "model.cir", "--target", "tpu"]);
    assert!(!ok);
    assert!(
        err.contains("invalid value 'tpu'") && err.contains("cuda"),
        "{err}"
    );
}
