#!/usr/bin/env bash
# GPU check in two halves (see README "GPU"):
#
#   scripts/gpu-check.sh build   # here, with a Rust toolchain and LLVM/MLIR 22: builds the CUDA
#                                # test executables and benchmark with --features cuda (release),
#                                # and writes the GPU check cases (every op's kernels and the MLP
#                                # and GPT-tiny training steps, compiled to PTX through MLIR, with
#                                # the interpreter's outputs) into .gpu/
#   scripts/gpu-check.sh run     # on the GPU machine, from the repo root (no Rust, no network):
#                                # finds the CUDA libraries, runs the GPU tests, the bandwidth and
#                                # GEMM figures and the PyTorch eager GPT-small baseline
#
# Everything measured goes to stdout and, when $OUT is set, to files under $OUT.
# Environment: PROFILE=release|debug (build half; default release).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
profile=${PROFILE:-release}

build() {
    local flag=()
    [ "$profile" = release ] && flag=(--release)
    rm -rf .gpu && mkdir -p .gpu
    # The runtime's CUDA tests (one executable) and the bandwidth/GEMM benchmark.
    local exe
    exe=$(cargo test -j2 "${flag[@]}" -p cleave-runtime --features cuda --test cuda --no-run \
        --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"]=="cuda": print(m["executable"])' | tail -1)
    [ -n "$exe" ] || { echo "gpu-check build: could not build the cuda test executable" >&2; exit 1; }
    cp "$exe" .gpu/cuda_tests
    cargo build -j2 "${flag[@]}" -p cleave-runtime --features cuda --example gpu_bench
    cp "target/$profile/examples/gpu_bench" .gpu/gpu_bench
    cargo build -j2 "${flag[@]}" -p cleave-runtime --features cuda --example gpu_cases
    cp "target/$profile/examples/gpu_cases" .gpu/gpu_cases
    strip .gpu/cuda_tests .gpu/gpu_bench .gpu/gpu_cases
    # The cases need MLIR (feature mlir) but no GPU; the device side needs neither.
    cargo run -q -j2 -p cleave-mlir --features mlir --example gpu_cases -- .gpu/cases
    cp scripts/gpu-check.sh .gpu/
    cp benches/baselines/gpt_small_torch.py .gpu/
    du -sh .gpu
}

# Adds the CUDA libraries shipped in PyTorch's pip packages (nvidia/*/lib) to LD_LIBRARY_PATH.
find_libs() {
    local site
    site=$(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null || true)
    local dirs=""
    for s in $site; do
        for d in "$s"/nvidia/*/lib "$s"/nvidia/*/*/lib; do
            [ -d "$d" ] && dirs="$dirs:$d"
        done
    done
    export LD_LIBRARY_PATH="${dirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    if [ -n "$dirs" ]; then
        ls ${dirs//:/ } 2>/dev/null | grep -E 'libcublas\.so|libnvrtc\.so' | sort -u | tr '\n' ' ' || true
    fi
    echo
}

run() {
    local dir=.gpu
    [ -x "$dir/cuda_tests" ] || { echo "gpu-check run: $dir/cuda_tests missing; run 'scripts/gpu-check.sh build' first" >&2; exit 1; }
    local out=${OUT:-}
    log() { if [ -n "$out" ]; then tee -a "$out/$1"; else cat; fi; }
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | log gpu-check.txt || true
    find_libs | log gpu-check.txt
    echo "== CUDA runtime tests (NVRTC kernel, cuBLAS GEMMs vs CPU, events)" | log gpu-check.txt
    local rc=0
    "$dir/cuda_tests" --nocapture --test-threads=1 2>&1 | log gpu-check.txt || rc=1
    echo "== bandwidth and GEMM figures" | log gpu-check.txt
    "$dir/gpu_bench" 2>&1 | log gpu-figures.jsonl || rc=1
    echo "== PyTorch eager GPT-small training step" | log gpu-check.txt
    timeout 240 python3 "$dir/gpt_small_torch.py" 2>&1 | log gpu-figures.jsonl || rc=1
    echo "== MLIR kernels on the GPU against the interpreter; GPT-tiny 50 SGD steps" | log gpu-check.txt
    "$dir/gpu_cases" "$dir/cases" 2>&1 | log gpu-cases.jsonl || rc=1
    echo "gpu-check: the cleave GPT-small training step on the GPU is not timed yet (GEMMs run as" \
        "MLIR kernels, not cuBLAS, in the GPU function runner): skipped" | log gpu-check.txt
    return $rc
}

case "$mode" in
    build) build ;;
    run) run ;;
    *) echo "usage: scripts/gpu-check.sh build|run" >&2; exit 2 ;;
esac
