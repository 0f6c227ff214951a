#!/usr/bin/env python3
"""The Python package's per-step overhead: `Plan.step` against `cleave bench` on the same model.

Usage (after `pip install target/wheels/cleave-*.whl` of a `maturin build --release` wheel, and
`cargo build --release`):

    python3 benches/python_step.py [--rounds 3] [--iters 200] [--cleave target/release/cleave]

For each model (the MLP and the GPT block of `benches/baselines`), each round runs `cleave bench
MODEL --json` (20 untimed steps, then the median of ITERS timed steps of the compiled training
step, inputs already in place) and then, in this process, `cleave.compile(MODEL)` and ITERS timed
`plan.step(batch)` calls after 20 untimed ones (each timed alone with `perf_counter_ns`; the
batch is a dict of C-contiguous numpy arrays, so a step copies it once into the plan's buffers).
Prints per round both medians and their difference, then the median over rounds.
"""
import argparse
import json
import os
import statistics
import subprocess
import time

import numpy as np

import cleave

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ["examples/mlp.cir", "examples/gpt-block.cir"]


def batch_for(plan, rng):
    out = {}
    for name, dtype, shape in plan.inputs:
        if dtype == "f32":
            out[name] = rng.standard_normal(shape).astype(np.float32)
        else:
            out[name] = np.zeros(shape, np.int32)  # a valid class index / token id
    return out


def python_median(model, iters):
    plan = cleave.compile(os.path.join(ROOT, model), progress=False)
    batch = batch_for(plan, np.random.default_rng(0))
    for _ in range(20):
        plan.step(batch)
    times = []
    for _ in range(iters):
        t = time.perf_counter_ns()
        plan.step(batch)
        times.append(time.perf_counter_ns() - t)
    return statistics.median(times) / 1e6


def cleave_median(exe, model, iters):
    out = subprocess.run([exe, "bench", model, "--json", "--iters", str(iters)], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)["median_ms"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--cleave", default=os.path.join(ROOT, "target/release/cleave"))
    a = ap.parse_args()
    for model in MODELS:
        rows = []
        for r in range(a.rounds):
            c = cleave_median(a.cleave, model, a.iters)
            p = python_median(model, a.iters)
            rows.append((c, p))
            print(f"{model} round {r + 1}: cleave bench {c:.4f} ms, plan.step {p:.4f} ms, "
                  f"overhead {p - c:+.4f} ms ({p / c:.3f}x)")
        c = statistics.median(x for x, _ in rows)
        p = statistics.median(y for _, y in rows)
        print(f"{model}: median over {a.rounds} rounds: cleave bench {c:.4f} ms, plan.step "
              f"{p:.4f} ms, overhead {p - c:+.4f} ms ({p / c:.3f}x)")


if __name__ == "__main__":
    main()
