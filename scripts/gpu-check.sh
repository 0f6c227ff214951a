#!/usr/bin/env bash
# GPU check in two halves (see README "GPU"):
#
#   scripts/gpu-check.sh build   # here, with a Rust toolchain and LLVM/MLIR 22: builds release
#                                # binaries with --features mlir,cuda (the `cleave` CLI, the CUDA
#                                # runtime tests, the bandwidth/GEMM benchmark, the case runner),
#                                # strips them, writes the GPU check cases (every op's kernels and
#                                # the MLP and GPT-tiny training steps compiled to PTX through
#                                # MLIR, with the interpreter's outputs), the GPT-small model and
#                                # the MLIR elementwise kernels into .gpu/
#   .gpu/gpu-check.sh run        # on the GPU machine, from the repo root (no Rust, no network;
#                                # OUT=DIR keeps the figures): every part reports pass/fail and the
#                                # run goes on; a summary table at the end. Well under 4 minutes on
#                                # an H200.
#
# Parts of `run`: the CUDA runtime tests; copy bandwidth, NVRTC and MLIR elementwise kernels
# against it (aim: >= 70% of the copy), cuBLAS SGEMM; every MLIR kernel against the interpreter;
# `cleave train --target cuda` of GPT-tiny for 50 steps against `cleave train` on the CPU (losses
# within 1e-4 relative) and with `--stages 2 --microbatches 4` against the CPU thread pipeline
# (within 1e-5 relative), with `--precision bf16 --compress int8` and with `--precision f16`
# (each within 1e-3); the cleave GPT-small training step (`cleave bench --target cuda`) against
# PyTorch eager (benches/baselines/gpt_small_torch.py) on the same GPU in the same run.
#
# Environment: PROFILE=release|debug (build half; default release).
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
profile=${PROFILE:-release}

build() {
    set -e
    local flag=()
    [ "$profile" = release ] && flag=(--release)
    rm -rf .gpu && mkdir -p .gpu/lib .gpu/models .gpu/ew
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
    cargo build -j2 "${flag[@]}" -p cleave-runtime --features cuda --example gpu_bench --example gpu_cases
    cp "target/$profile/examples/gpu_bench" "target/$profile/examples/gpu_cases" .gpu/
    cargo build -j2 "${flag[@]}" -p cleave-compiler --features mlir,cuda --bin cleave
    cp "target/$profile/cleave" .gpu/cleave
    strip .gpu/cuda_tests .gpu/gpu_bench .gpu/gpu_cases .gpu/cleave
    # Non-glibc libraries cleave links dynamically (MLIR's compression), in case the GPU machine
    # lacks them; `run` appends .gpu/lib to the library path (the machine's own come first).
    for l in $(ldd .gpu/cleave | awk '/=> \//{print $3}'); do
        case "$(basename "$l")" in
            libc.so*|libm.so*|libpthread*|libdl*|librt*|ld-linux*) ;;
            *) cp -L "$l" .gpu/lib/ ;;
        esac
    done
    # The cases need MLIR (feature mlir) but no GPU; the device side needs neither.
    cargo run -q -j2 "${flag[@]}" -p cleave-mlir --features mlir --example gpu_cases -- .gpu/cases
    # Models and data: GPT-tiny with its data; GPT-small (GPT-2 small at seq 256, batch 8) as
    # gpt_small_torch.py builds it.
    cp examples/gpt-tiny.cir examples/data/modadd.safetensors .gpu/models/
    .gpu/cleave new-model gpt --layers 12 --d-model 768 --heads 12 --seq 256 --vocab 50257 \
        --batch 8 -o .gpu/models/gpt-small.cir
    # MLIR elementwise kernels (64M f32) for the bandwidth figure.
    for f in scripts/gpu/ew_*.cir; do
        .gpu/cleave compile "$f" --target cuda --emit ptx -o ".gpu/ew/$(basename "$f" .cir)" >/dev/null
    done
    cp scripts/gpu-check.sh .gpu/
    cp benches/baselines/gpt_small_torch.py .gpu/
    # The device tool carries at most 64 MiB: compress the CLI (MLIR is linked in statically)
    # and the cases; `run` unpacks them (xz, or Python's lzma where xz is missing).
    xz -T2 -6 -c .gpu/cleave > .gpu/cleave.xz && rm .gpu/cleave
    tar -cf - -C .gpu cases | xz -T2 -6 -c > .gpu/cases.tar.xz && rm -rf .gpu/cases
    du -sh .gpu
}

# Decompresses an .xz file to stdout.
unxz_to() {
    if command -v xz >/dev/null; then
        xz -dc "$1"
    else
        python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), sys.stdout.buffer)' "$1"
    fi
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

# compare_losses CPU.jsonl GPU.jsonl STEPS RTOL: "ok …" or "off …"/"bad …" on stdout.
compare_losses() {
    python3 - "$1" "$2" "$3" "$4" <<'PY'
import json, sys
def losses(p):
    return [json.loads(l)["loss"] for l in open(p) if '"loss"' in l]
a, b = losses(sys.argv[1]), losses(sys.argv[2])
n, tol = int(sys.argv[3]), float(sys.argv[4])
if len(a) != n or len(b) != n:
    print("bad steps: cpu %d, cuda %d" % (len(a), len(b))); sys.exit()
err = max(abs(x - y) / max(abs(x), 1e-30) for x, y in zip(a, b))
print(("ok " if err <= tol else "off ") + "max rel err %.2e over %d steps; loss %.4f -> %.4f (cpu %.4f)" % (err, n, b[0], b[-1], a[-1]))
PY
}

run() {
    local dir=.gpu
    [ -f "$dir/cleave.xz" ] || { echo "gpu-check run: $dir/cleave.xz missing; run 'scripts/gpu-check.sh build' first" >&2; exit 1; }
    local out=${OUT:-}
    local tmp
    tmp=$(mktemp -d)
    # Unpack the CLI and the cases.
    unxz_to "$dir/cleave.xz" > "$tmp/cleave" && chmod +x "$tmp/cleave"
    unxz_to "$dir/cases.tar.xz" | tar -xf - -C "$tmp"
    local cleave=$tmp/cleave
    # If the machine's C++ runtime is older than the one cleave was linked against, use the copy.
    if ! "$cleave" --help >/dev/null 2>&1; then
        echo "gpu-check: cleave does not start with the machine's libraries; trying .gpu/lib first" | log gpu-check.txt
        "$cleave" --help 2>&1 | head -3 | log gpu-check.txt
        export LD_LIBRARY_PATH="$PWD/$dir/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
    [ -n "$out" ] && mkdir -p "$out"
    log() { if [ -n "$out" ]; then tee -a "$out/$1"; else cat; fi; }
    local t_start=$SECONDS
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | log gpu-check.txt || true
    find_libs | log gpu-check.txt
    export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$PWD/$dir/lib"
    local names=() results=() notes=()
    # Every part's timeout is cut to what is left of the whole run's budget (GPU_CHECK_BUDGET
    # seconds, default 180), so the run ends in time even when a part hangs.
    local budget=${GPU_CHECK_BUDGET:-180}
    tl() { local left=$((budget - (SECONDS - t_start))); [ "$left" -lt "$1" ] && echo $((left > 1 ? left : 1)) || echo "$1"; }
    record() { names+=("$1"); results+=("$2"); notes+=("$3"); echo "-- $1: $2 ($3)" | log gpu-check.txt; }

    echo "== 1. CUDA runtime tests (NVRTC kernel, cuBLAS GEMMs vs CPU, GpuRunner cuBLAS/MLIR GEMM groups and carried state, events)" | log gpu-check.txt
    if timeout $(tl 60) "$dir/cuda_tests" --nocapture --test-threads=1 2>&1 | log gpu-check.txt; then
        record "runtime tests" pass "runtime/tests/cuda.rs"
    else
        record "runtime tests" FAIL "see gpu-check.txt"
    fi

    echo "== 2. cleave train --target cuda: GPT-tiny 50 SGD steps against the CPU run" | log gpu-check.txt
    local m="$dir/models"
    # Without `--steps`: each part names its own (clap refuses a repeated option).
    local targs=("$m/gpt-tiny.cir" --data "$m/modadd.safetensors" --optimizer sgd --lr 0.05 --seed 1 --quiet)
    # vs_cpu NAME TAG STEPS RTOL ARGS…: `cleave train ARGS` on the CPU and on `--target cuda`
    # (metrics in $tmp/TAG-cpu.jsonl and $tmp/TAG-cuda.jsonl), the losses compared and recorded.
    vs_cpu() {
        local name=$1 tag=$2 steps=$3 tol=$4
        shift 4
        rm -f "$tmp/$tag-cpu.jsonl" "$tmp/$tag-cuda.jsonl"
        if timeout $(tl 60) "$cleave" train "$@" --metrics "$tmp/$tag-cpu.jsonl" 2>&1 | log gpu-check.txt &&
            timeout $(tl 60) "$cleave" train "$@" --target cuda --metrics "$tmp/$tag-cuda.jsonl" 2>&1 | log gpu-check.txt; then
            local cmp
            cmp=$(compare_losses "$tmp/$tag-cpu.jsonl" "$tmp/$tag-cuda.jsonl" "$steps" "$tol")
            if [[ "$cmp" == ok* ]]; then
                record "$name" pass "${cmp#ok }"
            else
                record "$name" FAIL "$cmp"
            fi
        else
            record "$name" FAIL "cleave train failed; see gpu-check.txt"
        fi
    }
    vs_cpu "GPT-tiny cuda vs cpu losses" tiny 50 1e-4 "${targs[@]}" --steps 50
    cp "$tmp/tiny-cpu.jsonl" "${out:-$tmp}/gpt-tiny-cpu.jsonl" 2>/dev/null || true
    cp "$tmp/tiny-cuda.jsonl" "${out:-$tmp}/gpt-tiny-cuda.jsonl" 2>/dev/null || true
    # Pipeline stages on the one GPU (one stream each) against the CPU thread pipeline.
    echo "== 2b. cleave train --target cuda --stages 2 (ZB-H1, 4 microbatches) against the CPU pipeline" | log gpu-check.txt
    vs_cpu "GPT-tiny 2 stages cuda vs cpu pipeline" stages 20 1e-5 \
        "${targs[@]}" --steps 20 --stages 2 --microbatches 4 --schedule zb-h1
    # Mixed precision: bf16 GEMMs on cuBLAS (cublasGemmEx, f32 accumulation) against the CPU's
    # bf16 GEMM (f32 accumulation too; sums in another order, so a result may differ by one bf16
    # step: 1e-3 relative over 20 steps).
    echo "== 2c. cleave train --target cuda --precision bf16 --compress int8 against the CPU" | log gpu-check.txt
    vs_cpu "GPT-tiny bf16+int8 cuda vs cpu" bf16 20 1e-3 \
        "${targs[@]}" --steps 20 --precision bf16 --compress int8
    # f16 under a dynamic loss scale: the stage pipeline feeds the scale, rolls back steps whose
    # gradients overflow f16 and halves the scale (2^19 overflows GPT-tiny's backward at first),
    # as the CPU pipeline does; f16 GEMMs on cuBLAS against the CPU's widened f16 GEMM.
    echo "== 2d. cleave train --target cuda --precision f16 --loss-scale 524288 against the CPU" | log gpu-check.txt
    vs_cpu "GPT-tiny f16 cuda vs cpu" f16 20 1e-3 \
        "${targs[@]}" --steps 20 --precision f16 --loss-scale 524288 --loss-scale-window 4 \
        --microbatches 4
    # The MLIR GEMM option on the same model: one bench, to show it runs.
    if timeout $(tl 30) "$cleave" bench "$m/gpt-tiny.cir" --target cuda --gemm mlir --warmup 3 --iters 20 --json 2>&1 | tee "$tmp/tiny-mlir.json" | log gpu-figures.jsonl &&
        timeout $(tl 30) "$cleave" bench "$m/gpt-tiny.cir" --target cuda --warmup 3 --iters 20 --json 2>&1 | tee "$tmp/tiny-blas.json" | log gpu-figures.jsonl; then
        record "GPT-tiny step, --gemm mlir vs cublas" pass "$(python3 -c 'import json,sys; a,b=[json.load(open(p)) for p in sys.argv[1:]]; print("%.3f ms vs %.3f ms" % (a["median_ms"], b["median_ms"]))' "$tmp/tiny-mlir.json" "$tmp/tiny-blas.json")"
    else
        record "GPT-tiny step, --gemm mlir vs cublas" FAIL "see gpu-figures.jsonl"
    fi

    echo "== 3. GPT-small training step: cleave (cuda, cuBLAS GEMMs) vs PyTorch eager" | log gpu-check.txt
    local ok_c=0 ok_t=0
    timeout $(tl 80) "$cleave" bench "$m/gpt-small.cir" --target cuda --warmup 3 --iters 10 --profile 12 --json 2>&1 | tee "$tmp/small.json" | log gpu-figures.jsonl && ok_c=1
    timeout $(tl 70) python3 "$dir/gpt_small_torch.py" --warmup 3 --iters 10 2>&1 | tee "$tmp/torch.json" | log gpu-figures.jsonl && ok_t=1
    if [ $ok_c = 1 ] && [ $ok_t = 1 ]; then
        local cmp
        cmp=$(python3 - "$tmp/small.json" "$tmp/torch.json" <<'PY'
import json, sys
c = json.loads([l for l in open(sys.argv[1]) if l.startswith("{")][-1])
t = json.loads([l for l in open(sys.argv[2]) if l.startswith("{")][-1])
r = c["median_ms"] / t["median_ms"]
print(("ok " if r <= 1.0 else "slower ") + "cleave %.2f ms vs PyTorch %.2f ms (%.2fx); cuBLAS %.1f ms + MLIR kernels %.1f ms" % (
    c["median_ms"], t["median_ms"], r, c["profile"]["cublas_ms"], c["profile"]["mlir_kernels_ms"]))
PY
)
        if [[ "$cmp" == ok* ]]; then
            record "GPT-small step vs PyTorch eager" pass "${cmp#ok }"
        else
            record "GPT-small step vs PyTorch eager" "aim missed" "${cmp#slower }"
        fi
    else
        record "GPT-small step vs PyTorch eager" FAIL "cleave bench ok=$ok_c, torch ok=$ok_t; see gpu-figures.jsonl"
    fi

    echo "== 4. bandwidth: copy, NVRTC and MLIR elementwise kernels; cuBLAS SGEMM" | log gpu-check.txt
    if timeout $(tl 60) "$dir/gpu_bench" "$dir"/ew/*/kernels.json 2>&1 | tee "$tmp/bench.jsonl" | log gpu-figures.jsonl; then
        local bw
        bw=$(python3 - "$tmp/bench.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
ew = [r for r in rows if r.get("figure") == "mlir_elementwise"]
copy = [r for r in rows if r.get("figure") == "d2d_copy"]
parts = ["copy %.0f GB/s" % copy[0]["gb_per_s"]] if copy else []
parts += ["%s %.0f%%" % (r["function"], 100 * r["fraction_of_copy"]) for r in ew]
print(("ok " if ew and all(r["fraction_of_copy"] >= 0.7 for r in ew) else "below ") + ", ".join(parts))
PY
)
        if [[ "$bw" == ok* ]]; then
            record "MLIR elementwise >= 70% of copy" pass "${bw#ok }"
        else
            record "MLIR elementwise >= 70% of copy" "aim missed" "${bw#below }"
        fi
    else
        record "MLIR elementwise >= 70% of copy" FAIL "gpu_bench failed"
    fi

    echo "== 5. MLIR kernels on the GPU against the interpreter (every op, MLP step, GPT-tiny 50 steps)" | log gpu-check.txt
    if timeout $(tl 90) "$dir/gpu_cases" "$tmp/cases" 2>&1 | tee "$tmp/cases.jsonl" | log gpu-cases.jsonl; then
        record "kernels vs interpreter" pass "$(tail -1 "$tmp/cases.jsonl")"
    else
        record "kernels vs interpreter" FAIL "$(grep -c '"ok":false' "$tmp/cases.jsonl") case(s) off; see gpu-cases.jsonl"
    fi

    {
        echo
        echo "== summary ($((SECONDS - t_start)) s)"
        printf '%-40s %-11s %s\n' part result detail
        for i in "${!names[@]}"; do
            printf '%-40s %-11s %s\n' "${names[$i]}" "${results[$i]}" "${notes[$i]}"
        done
    } | log gpu-check.txt
    rm -rf "$tmp"
    for r in "${results[@]}"; do
        [ "$r" = FAIL ] && return 1
    done
    return 0
}

case "$mode" in
    build) build ;;
    run) run ;;
    *) echo "usage: scripts/gpu-check.sh build|run" >&2; exit 2 ;;
esac
