//! Every op's kernel compiles to PTX (MLIR's GPU pipeline, `gpu-module-to-binary`, no GPU
//! needed), and the launch descriptors are consistent with the PTX: one `.entry` per launch whose
//! parameter count is the number of buffers, no libdevice or other external calls, and valid
//! launch sizes.
#![cfg(feature = "mlir")]

mod common;

use std::collections::BTreeSet;

use cleave_ir::Op;
use cleave_mlir::gpu::{compile_gpu, compile_gpu_threads};
use cleave_mlir::pipeline::{check_nvvm_target, default_gpu_pipeline, gpu_pipeline};
use cleave_runtime::gpu_kernel::ArgRole;

/// Ops with no kernel of their own: function arguments.
const NO_KERNEL: &[&str] = &["input", "param"];

#[test]
fn every_op_compiles_to_ptx() {
    let pipeline = default_gpu_pipeline();
    let mut covered = BTreeSet::new();
    for (name, func) in common::op_cases() {
        for &n in &func.body {
            covered.insert(func.node(n).op.name());
        }
        let prog = compile_gpu(&func, &pipeline).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(prog.groups.len(), prog.mlir.len());
        for g in &prog.groups {
            assert!(
                !g.launches.is_empty() || !g.copies.is_empty(),
                "{name}/{}: nothing to run",
                g.name
            );
            for k in &g.launches {
                let what = format!("{name}/{}", k.name);
                assert!(k.ptx.contains(".target sm_90"), "{what}: PTX target");
                assert!(!k.ptx.contains(".extern"), "{what}: external call in PTX");
                let at = k
                    .ptx
                    .find(&format!(".entry {}(", k.entry))
                    .unwrap_or_else(|| panic!("{what}: no .entry {}", k.entry));
                let sig = &k.ptx[at..at + k.ptx[at..].find(')').unwrap()];
                assert_eq!(
                    sig.matches(".param .u64").count(),
                    k.args.len(),
                    "{what}: one pointer parameter per buffer in {sig}"
                );
                let threads: u64 = k.block.iter().map(|&x| x as u64).product();
                assert!(
                    (1..=1024).contains(&threads) && k.grid.iter().all(|&g| g >= 1),
                    "{what}: launch size {:?} x {:?}",
                    k.grid,
                    k.block
                );
            }
        }
    }
    let missing: Vec<&str> = Op::all_names()
        .into_iter()
        .filter(|n| !covered.contains(n) && !NO_KERNEL.contains(n))
        .collect();
    assert!(
        missing.is_empty(),
        "ops without a PTX test case: {missing:?}"
    );
}

#[test]
fn descriptors_serialize_to_json() {
    let func = &common::op_cases()
        .into_iter()
        .find(|(n, _)| n == "constants_and_copies")
        .unwrap()
        .1;
    let prog = compile_gpu(func, &default_gpu_pipeline()).unwrap();
    let json = serde_json::to_string(&prog.descriptor()).unwrap();
    let back: cleave_runtime::gpu_kernel::GpuFunction = serde_json::from_str(&json).unwrap();
    assert_eq!(back, prog.descriptor());
    assert_eq!(back.outputs.len(), func.outputs.len());
    assert_eq!(back.outputs[0].0, "iota_i");
    // The dense constants are parameters with their data.
    let consts: Vec<_> = prog
        .groups
        .iter()
        .flat_map(|g| g.launches.iter().flat_map(|k| k.args.iter()))
        .filter(|a| a.role == ArgRole::Constant)
        .collect();
    assert!(consts
        .iter()
        .any(|a| a.data == vec![1.0, -2.0, 3.0, -4.0, 5.0, -6.0] && a.dtype == "i32"));
}

#[test]
fn matmul_groups_describe_their_gemm_for_cublas() {
    let func = &common::op_cases()
        .into_iter()
        .find(|(n, _)| n == "matmuls")
        .unwrap()
        .1;
    let prog = compile_gpu(func, &default_gpu_pipeline()).unwrap();
    let gemms: Vec<_> = prog.groups.iter().filter_map(|g| g.gemm.clone()).collect();
    assert_eq!(gemms.len(), 6, "one per matmul");
    // `%4 = matmul %q, %k {transpose_rhs = true} : f32[2,4,5,3]` with k : f32[2,4,3,7].
    let batched = gemms.iter().find(|g| g.lhs == "q").unwrap();
    assert_eq!(
        (batched.batch, batched.m, batched.n, batched.k),
        (8, 5, 3, 7)
    );
    assert!(batched.transpose_rhs && !batched.transpose_lhs);
    let tn = gemms
        .iter()
        .find(|g| g.lhs == "at" && g.rhs == "b")
        .unwrap();
    assert_eq!((tn.m, tn.n, tn.k, tn.transpose_lhs), (5, 3, 7, true));
}

#[test]
fn pipelines_that_abort_llvm_are_refused() {
    assert!(check_nvvm_target(&default_gpu_pipeline()).is_ok());
    assert!(check_nvvm_target(&gpu_pipeline("sm_100", "+ptx86")).is_ok());
    let err = check_nvvm_target(&gpu_pipeline("sm_90", "+ptx70")).unwrap_err();
    assert!(err.contains("+ptx80"), "{err}");
    assert!(check_nvvm_target(&gpu_pipeline("sm_75", "+ptx80")).is_err());
    let func = &common::op_cases()[0].1;
    let e = compile_gpu(func, &gpu_pipeline("sm_90", "+ptx60")).unwrap_err();
    assert!(e.to_string().contains("abort"), "{e}");
    // A pipeline MLIR cannot parse is an error naming it, not a crash.
    let e = compile_gpu(func, "builtin.module(no-such-pass)").unwrap_err();
    assert!(e.to_string().contains("no-such-pass"), "{e}");
}

/// Snapshots of the launch descriptors (PTX replaced by its entry line) of the small files in
/// `tests/emit/`: grid, block, buffers and their roles after the GPU pipeline.
#[test]
fn launch_descriptors() {
    insta::glob!("emit/*.cir", |path| {
        let text = std::fs::read_to_string(path).unwrap();
        let module = cleave_ir::parse_module(&text).unwrap();
        let mut prog = compile_gpu(&module.functions[0], &default_gpu_pipeline()).unwrap();
        for g in &mut prog.groups {
            for k in &mut g.launches {
                let entry = k.ptx.lines().find(|l| l.contains(".entry")).unwrap_or("");
                k.ptx = format!("<{} lines of PTX; {}>", k.ptx.lines().count(), entry.trim());
            }
        }
        insta::assert_snapshot!(serde_json::to_string_pretty(&prog.groups).unwrap());
    });
}

/// The fused kernels of the GPT-tiny and MLP training steps (`autodiff,optimizer`) compile to
/// self-contained PTX, and every output of the step is written by some launch or copy.
#[test]
fn training_steps_compile_to_ptx() {
    for (example, before, opt) in [
        ("gpt-tiny.cir", "", "optimizer{kind=adamw}"),
        ("mlp.cir", "", "optimizer{kind=momentum}"),
        // `--precision bf16`: bf16 buffers, casts and cuBLAS GEMMs in bf16.
        ("gpt-tiny.cir", "precision{bf16},", "optimizer{kind=adamw}"),
    ] {
        let step = common::training_step_after(example, before, opt);
        let prog = compile_gpu(&step, &default_gpu_pipeline())
            .unwrap_or_else(|e| panic!("{example} {before}: {e}"));
        let desc = prog.descriptor();
        let bf16_gemms = desc
            .groups
            .iter()
            .filter_map(|g| g.gemm.as_ref())
            .filter(|g| g.dtype == "bf16")
            .count();
        if before.is_empty() {
            assert_eq!(bf16_gemms, 0, "{example}");
        } else {
            // Every forward GEMM and both of its backward GEMMs.
            let all = desc.groups.iter().filter(|g| g.gemm.is_some()).count();
            assert!(
                bf16_gemms > 0 && bf16_gemms * 10 >= all * 9,
                "{example}: {bf16_gemms} of {all}"
            );
        }
        // Dataflow: every buffer a launch reads is an argument, a constant, a temporary of its
        // group, or written by an earlier launch or copy.
        let mut defined: std::collections::HashSet<String> =
            desc.args.iter().map(|a| a.name.clone()).collect();
        for g in &desc.groups {
            for k in &g.launches {
                assert!(!k.ptx.contains(".extern"), "{example}/{}", k.name);
                assert!(k.ptx.contains(&format!(".entry {}(", k.entry)));
                for a in &k.args {
                    match a.role {
                        ArgRole::Input => assert!(
                            defined.contains(&a.name),
                            "{example}/{}: reads {} before it is written",
                            k.name,
                            a.name
                        ),
                        ArgRole::Output => {
                            defined.insert(a.name.clone());
                        }
                        ArgRole::Scratch => assert!(g.scratch.contains(a)),
                        ArgRole::Constant => assert!(!a.data.is_empty()),
                    }
                }
            }
            for (from, to) in &g.copies {
                assert!(defined.contains(from) || from.ends_with(".const"));
                defined.insert(to.clone());
            }
        }
        for (name, buf) in &desc.outputs {
            let written = desc.groups.iter().any(|g| {
                g.copies.iter().any(|(_, to)| to == buf)
                    || g.launches
                        .iter()
                        .flat_map(|k| &k.args)
                        .any(|a| &a.name == buf && a.role == ArgRole::Output)
            });
            assert!(
                written || desc.args.iter().any(|a| &a.name == buf),
                "{example}: output {name} ({buf}) is never written"
            );
        }
    }
}

/// The groups are compiled on several threads; the program does not depend on how many.
#[test]
fn parallel_compilation_is_deterministic() {
    let step = common::training_step("mlp.cir", "optimizer{kind=momentum}");
    let one = compile_gpu_threads(&step, &default_gpu_pipeline(), 1).unwrap();
    let three = compile_gpu_threads(&step, &default_gpu_pipeline(), 3).unwrap();
    assert!(one.groups.len() > 3, "{} groups", one.groups.len());
    assert_eq!(
        serde_json::to_string(&one.descriptor()).unwrap(),
        serde_json::to_string(&three.descriptor()).unwrap()
    );
    assert_eq!(one.mlir, three.mlir);
    // An error is still an error (every group fails here; no worker hangs or panics).
    let e = compile_gpu_threads(&step, "builtin.module(no-such-pass)", 3).unwrap_err();
    assert!(e.to_string().contains("no-such-pass"), "{e}");
}
