//! The MLIR pass pipelines, as data: textual pipelines (`mlir-opt --pass-pipeline` syntax) that
//! can be printed, and replaced by a user's (`cleave compile --mlir-pipeline`).

/// The GPU pipeline: linalg on tensors → (fusion) → bufferization → parallel loops (tiled by 256
/// along the flat index) → `gpu.launch` → outlined `gpu.module`s → NVVM → PTX
/// (`gpu-module-to-binary`, format `isa`).
///
/// - `nvvm-attach-target` needs `features=+ptx80` (or newer) with `chip=sm_80` and up: other
///   combinations make LLVM abort the process, so user pipelines are checked for it
///   ([`check_nvvm_target`]).
/// - `convert-gpu-to-nvvm{use-bare-ptr-memref-call-conv=true}`: one pointer per buffer.
/// - `canonicalize` before `gpu-launch-sink-index-computations` folds the loop bounds so that
///   kernels take only buffers (no index or scalar parameters).
pub fn gpu_pipeline(chip: &str, ptx_features: &str) -> String {
    format!(
        "builtin.module(func.func(linalg-fuse-elementwise-ops),eliminate-empty-tensors,\
one-shot-bufferize,func.func(canonicalize,convert-linalg-to-parallel-loops,\
scf-parallel-loop-tiling{{parallel-loop-tile-sizes=256 no-min-max-bounds=true}},\
gpu-map-parallel-loops,convert-parallel-loops-to-gpu,canonicalize,\
gpu-launch-sink-index-computations),gpu-kernel-outlining,canonicalize,lower-affine,\
nvvm-attach-target{{chip={chip} features={ptx_features} O=3}},\
gpu.module(convert-scf-to-cf,convert-gpu-to-nvvm{{use-bare-ptr-memref-call-conv=true}},\
canonicalize,reconcile-unrealized-casts),gpu-module-to-binary{{format=isa}})"
    )
}

/// The default GPU pipeline: sm_90 (H100) with PTX 8.0.
pub fn default_gpu_pipeline() -> String {
    gpu_pipeline("sm_90", "+ptx80")
}

/// The CPU pipeline: the same front half (fusion, bufferization), then sequential loops and
/// MLIR's LLVM lowering with the bare-pointer convention, for the ExecutionEngine.
pub fn cpu_pipeline() -> String {
    "builtin.module(func.func(linalg-fuse-elementwise-ops),eliminate-empty-tensors,\
one-shot-bufferize,func.func(canonicalize,convert-linalg-to-loops),lower-affine,\
convert-scf-to-cf,expand-strided-metadata,finalize-memref-to-llvm,\
convert-func-to-llvm{use-bare-ptr-memref-call-conv=true},convert-arith-to-llvm,\
convert-cf-to-llvm,convert-index-to-llvm,reconcile-unrealized-casts)"
        .to_string()
}

/// Rejects `nvvm-attach-target` options that make LLVM abort instead of reporting an error:
/// a PTX feature older than `+ptx80`, or a chip older than `sm_80`.
pub fn check_nvvm_target(pipeline: &str) -> Result<(), String> {
    let Some(at) = pipeline.find("nvvm-attach-target") else {
        return Ok(());
    };
    let rest = &pipeline[at..];
    let opts = match (rest.find('{'), rest.find('}')) {
        (Some(a), Some(b)) if a < b && !rest[..a].contains(',') => &rest[a + 1..b],
        _ => "",
    };
    let mut chip_ok = false;
    let mut ptx_ok = false;
    for opt in opts.split_whitespace() {
        if let Some(chip) = opt.strip_prefix("chip=") {
            let n: u32 = chip
                .trim_start_matches("sm_")
                .trim_end_matches(char::is_alphabetic)
                .parse()
                .unwrap_or(0);
            chip_ok = n >= 80;
        }
        if let Some(f) = opt.strip_prefix("features=") {
            let n: u32 = f.trim_start_matches("+ptx").parse().unwrap_or(0);
            ptx_ok = n >= 80;
        }
    }
    if chip_ok && ptx_ok {
        Ok(())
    } else {
        Err(format!(
            "nvvm-attach-target needs chip=sm_80 or newer and features=+ptx80 or newer \
(other combinations abort LLVM); got `nvvm-attach-target{{{opts}}}`"
        ))
    }
}
