#!/usr/bin/env python3
"""Start-up of `cleave compile` executables: time from exec to the end of the first step.

Usage: python3 benches/aot_startup.py [--runs N] [--cleave target/release/cleave]
                                      [--baseline-cleave OTHER/cleave]

For each model it compiles a standalone executable, then runs it N times with `--steps 1
--metrics FIFO` (a named pipe): the clock starts just before the process is spawned and stops
when the first metrics line (written right after step 1) arrives, so the figure covers process
start, checking the kernel table, building the step, compiling its plan, loading the data and
the first step. Interleaved with it, as baselines: the same executable with `--no-aot` (every
fused loop compiled by the JIT at start-up), `cleave train MODEL` with the same flags, and, with
`--baseline-cleave`, the executable another cleave (e.g. an older build) writes. Prints medians
(min, max) in ms and the executables' sizes.
"""
import argparse
import os
import statistics
import subprocess
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = [
    ("examples/mlp-digits.cir", "examples/data/digits.safetensors", []),
    ("examples/gpt-tiny.cir", "examples/data/modadd.safetensors", []),
    ("examples/mlp-digits.cir", "examples/data/digits.safetensors",
     ["--stages", "2", "--microbatches", "4", "--schedule", "1f1b"]),
]


def first_step_ms(cmd, fifo, cwd):
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd + ["--metrics", fifo], cwd=cwd,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with open(fifo) as f:
        line = f.readline()
        t1 = time.perf_counter()
        f.read()
    _, err = p.communicate()
    if p.returncode != 0 or not line:
        raise SystemExit(f"{cmd}: failed: {err.decode()}")
    return (t1 - t0) * 1000.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=11)
    ap.add_argument("--cleave", default=os.path.join(ROOT, "target/release/cleave"))
    ap.add_argument("--baseline-cleave", default=None)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fifo = os.path.join(tmp, "metrics")
        os.mkfifo(fifo)
        for model, data, pipe in MODELS:
            exe = os.path.join(tmp, "train")
            subprocess.run([a.cleave, "compile", model, "-o", exe] + pipe, cwd=ROOT,
                           check=True, stdout=subprocess.DEVNULL)
            sizes = {"executable": os.path.getsize(exe)}
            flags = ["--data", os.path.join(ROOT, data), "--steps", "1", "--quiet"]
            cmds = [
                ("executable", [exe] + flags, tmp),
                ("executable --no-aot", [exe, "--no-aot"] + flags, tmp),
                ("cleave train", [a.cleave, "train", model] + pipe + flags, ROOT),
            ]
            if a.baseline_cleave:
                old = os.path.join(tmp, "train-baseline")
                subprocess.run([a.baseline_cleave, "compile", model, "-o", old] + pipe, cwd=ROOT,
                               check=True, stdout=subprocess.DEVNULL)
                sizes["baseline executable"] = os.path.getsize(old)
                cmds.append(("baseline executable", [old] + flags, tmp))
            times = {name: [] for name, _, _ in cmds}
            for _ in range(a.runs):
                for name, cmd, cwd in cmds:
                    times[name].append(first_step_ms(cmd, fifo, cwd))
            label = model + (" " + " ".join(pipe) if pipe else "")
            for name, t in times.items():
                print(f"{label}: {name}: start-up to first step median {statistics.median(t):.1f} ms "
                      f"(min {min(t):.1f}, max {max(t):.1f}, {a.runs} runs)")
            for name, size in sizes.items():
                print(f"{label}: {name} size {size} bytes ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
