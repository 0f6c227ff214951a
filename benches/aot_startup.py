#!/usr/bin/env python3
"""Start-up of `cleave compile` executables: time from exec to the end of the first step.

Usage: python3 benches/aot_startup.py [--runs N] [--cleave target/release/cleave]

For each model it compiles a standalone executable, then runs it N times with `--steps 1
--metrics FIFO` (a named pipe): the clock starts just before the process is spawned and stops
when the first metrics line (written right after step 1) arrives, so the figure covers process
start, reading the embedded payload, building and compiling the step, loading the data and the
first step. The same measurement of `cleave train MODEL` with the same flags runs interleaved as
the baseline. Prints medians (min, max) in ms and the executable's size.
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
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fifo = os.path.join(tmp, "metrics")
        os.mkfifo(fifo)
        for model, data, pipe in MODELS:
            exe = os.path.join(tmp, "train")
            subprocess.run([a.cleave, "compile", model, "-o", exe] + pipe, cwd=ROOT,
                           check=True, stdout=subprocess.DEVNULL)
            size = os.path.getsize(exe)
            flags = ["--data", os.path.join(ROOT, data), "--steps", "1", "--quiet"]
            exe_t, train_t = [], []
            for _ in range(a.runs):
                exe_t.append(first_step_ms([exe] + flags, fifo, tmp))
                train_t.append(first_step_ms([a.cleave, "train", model] + pipe + flags, fifo, ROOT))
            label = model + (" " + " ".join(pipe) if pipe else "")
            for name, t in (("executable", exe_t), ("cleave train", train_t)):
                print(f"{label}: {name}: start-up to first step median {statistics.median(t):.1f} ms "
                      f"(min {min(t):.1f}, max {max(t):.1f}, {a.runs} runs)")
            print(f"{label}: executable size {size} bytes ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
