"""Shared harness of the baseline scripts (`mlp_step.py`, `gpt_block_step.py`).

Each script builds one training-step callable per framework (PyTorch eager, torch.compile, JAX
jit; a missing framework is skipped) and hands them to `compare`, which times them and
`cleave bench MODEL` in the same run (once per code generator of `--codegen`: Cranelift and
LLVM) and prints each median and cleave's ratio to the best baseline.

Method: each framework runs `--warmup` untimed steps, then `--iters` timed steps; the median of
the per-step wall times is that framework's figure for the round. With `--rounds R` the whole set
(every framework, then cleave with each code generator) is measured R times in turn, so load from other processes falls on
all of them alike; the summary is the median over the rounds of each framework's medians, and the
ratio is taken per round against the best baseline of that round. Threads are limited to
`--threads` (the environment variables must be set before torch or jax is imported, so
`setup()` comes first).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def setup(description):
    """Parses the common flags and limits every framework's threads; call before importing."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--cleave", default="target/release/cleave")
    parser.add_argument("--codegen", default="cranelift,llvm",
                        help="cleave's code generators to time, comma-separated (those the "
                             "binary was not built with are skipped)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("MKL_NUM_THREADS", str(args.threads))
    os.environ.setdefault(
        "XLA_FLAGS",
        f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={args.threads}",
    )
    return args


def timed(step, args):
    """Median milliseconds of one call of `step` after the warm-up."""
    for _ in range(args.warmup):
        step()
    ts = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def torch_ops(torch, causal, d, eps):
    """The table of framework ops the GPT scripts write their blocks over, for PyTorch."""
    F = torch.nn.functional

    class TorchOps:
        layer_norm = staticmethod(lambda h, w, b: F.layer_norm(h, (d,), w, b, eps))
        transpose = staticmethod(lambda h: h.transpose(1, 2))
        transpose_last = staticmethod(lambda h: h.transpose(-1, -2))
        where = staticmethod(lambda c, a, b: torch.where(c, a, torch.tensor(b)))
        softmax = staticmethod(lambda h: torch.softmax(h, -1))
        gelu = staticmethod(F.gelu)
        take = staticmethod(lambda w, t: w[t])

    TorchOps.causal = torch.tensor(causal)
    return TorchOps


def jax_ops(jax, causal, eps):
    """The same table for JAX (LayerNorm written out with mean and variance)."""
    import jax.numpy as jnp

    class JaxOps:
        @staticmethod
        def layer_norm(h, w, b):
            c = h - jnp.mean(h, -1, keepdims=True)
            return c / jnp.sqrt(jnp.mean(c * c, -1, keepdims=True) + eps) * w + b

        transpose = staticmethod(lambda h: jnp.swapaxes(h, 1, 2))
        transpose_last = staticmethod(lambda h: jnp.swapaxes(h, -1, -2))
        where = staticmethod(jnp.where)
        softmax = staticmethod(lambda h: jax.nn.softmax(h, -1))
        gelu = staticmethod(lambda h: jax.nn.gelu(h, approximate=False))
        take = staticmethod(lambda w, t: jnp.take(w, t, axis=0))

    JaxOps.causal = jnp.asarray(causal)
    return JaxOps


def try_import(name):
    """The module, or None (with a note on stderr) when it is not installed."""
    try:
        return __import__(name)
    except ImportError:
        print(f"{name} not installed: skipped", file=sys.stderr)
        return None


def add_torch_steps(steps, make_step, forward):
    """Registers PyTorch eager and, where it compiles, torch.compile of the same step."""
    steps["pytorch eager"] = make_step(forward)
    import torch

    try:
        compiled = make_step(torch.compile(forward))
        compiled()
        steps["torch.compile"] = compiled
    except Exception as e:  # noqa: BLE001
        print(f"torch.compile skipped: {e}", file=sys.stderr)


def cleave_bench(model, args, codegen):
    """`cleave bench MODEL --codegen CODEGEN --json`: the whole JSON report."""
    out = subprocess.run(
        [args.cleave, "bench", model, "--json", "--iters", str(args.iters),
         "--warmup", str(args.warmup), "--codegen", codegen],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout)


def codegens(model, args):
    """The code generators of `--codegen` that this cleave binary has."""
    have = []
    for c in args.codegen.split(","):
        probe = subprocess.run(
            [args.cleave, "bench", model, "--iters", "1", "--warmup", "0", "--codegen", c],
            capture_output=True, text=True,
        )
        if probe.returncode == 0:
            have.append(c)
        else:
            print(f"cleave --codegen {c} skipped: {probe.stderr.strip()}", file=sys.stderr)
    return have


def compare(model, steps, args):
    """Times every baseline step and `cleave bench model` (once per code generator),
    `args.rounds` times; prints a table."""
    gens = codegens(model, args)
    cleaves = [f"cleave {c}" for c in gens]
    names = list(steps) + cleaves
    rounds = []
    reports = {}
    for r in range(args.rounds):
        res = {}
        for name, step in steps.items():
            res[name] = timed(step, args)
        for c in gens:
            reports[c] = cleave_bench(model, args, c)
            res[f"cleave {c}"] = reports[c]["median_ms"]
        rounds.append(res)
        line = "  ".join(f"{n} {res[n]:.3f}" for n in names)
        print(f"round {r + 1}: {line} (ms)", file=sys.stderr)
    summary = {n: statistics.median(r[n] for r in rounds) for n in names}
    for name in names:
        print(f"{name:>16}: {summary[name]:.3f} ms")
    ratios = {}
    if steps:
        for c in cleaves:
            per_round = []
            for res in rounds:
                best = min(steps, key=lambda n: res[n])
                per_round.append((res[c] / res[best], best))
            ratios[c] = [x for x, _ in per_round]
            ratio, best = sorted(per_round)[len(per_round) // 2]
            print(f"{c} / best baseline ({best}) = {ratio:.2f}"
                  + (f" (median of {len(per_round)} rounds: "
                     + ", ".join(f"{x:.2f}" for x, _ in per_round) + ")"
                     if len(per_round) > 1 else ""))
    for c, rep in reports.items():
        if "gflops" in rep:
            print(f"cleave {c}: {rep['flops'] / 1e6:.2f} MFLOP per step, "
                  f"{rep['gflops']:.1f} GFLOP/s, compiled in {rep['compile_ms']:.0f} ms")
    if args.json:
        print(json.dumps({"rounds": rounds, "median_ms": summary,
                          "ratios": ratios, "cleave": reports}))
