"""Times one training step of the MLP 784-256-256-10 (batch 64, mean cross-entropy, SGD) in
PyTorch eager, torch.compile and JAX jit, and cleave's `cleave bench` on the same model, in one
run, and prints each median and cleave's ratio to the best baseline.

Run from the repository root, in a scratch virtualenv that has what you want to compare
(`pip install jax torch numpy`; missing frameworks are skipped):

    cargo build --release
    python benches/baselines/mlp_step.py [--iters 200] [--threads 2]

Method: each framework runs `warmup` untimed steps, then `iters` timed steps; the median of the
per-step wall times is reported. Parameters are updated in place by SGD (lr 0.01) in every
framework, so each timed step is a real training step. Threads are limited to `--threads`.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--iters", type=int, default=200)
parser.add_argument("--warmup", type=int, default=20)
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--cleave", default="target/release/cleave")
args = parser.parse_args()

os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
os.environ.setdefault("MKL_NUM_THREADS", str(args.threads))
os.environ.setdefault(
    "XLA_FLAGS",
    f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={args.threads}",
)

import numpy as np  # noqa: E402

B, SIZES, LR = 64, [784, 256, 256, 10], 0.01
rng = np.random.default_rng(0)
x_np = rng.standard_normal((B, SIZES[0])).astype(np.float32)
y_np = rng.integers(0, SIZES[-1], size=(B,)).astype(np.int64)
params_np = []
for i, o in zip(SIZES[:-1], SIZES[1:]):
    params_np.append(((rng.standard_normal((i, o)) / np.sqrt(i)).astype(np.float32),
                      np.zeros(o, np.float32)))


def timed(step):
    for _ in range(args.warmup):
        step()
    ts = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


results = {}

try:
    import torch

    torch.set_num_threads(args.threads)
    tp = [(torch.tensor(w, requires_grad=True), torch.tensor(b, requires_grad=True))
          for w, b in params_np]
    tx, ty = torch.tensor(x_np), torch.tensor(y_np)

    def forward(x):
        h = x
        for k, (w, b) in enumerate(tp):
            h = h @ w + b
            if k < len(tp) - 1:
                h = torch.relu(h)
        return h

    def make_step(fwd):
        def step():
            loss = torch.nn.functional.cross_entropy(fwd(tx), ty)
            loss.backward()
            with torch.no_grad():
                for w, b in tp:
                    w -= LR * w.grad
                    b -= LR * b.grad
                    w.grad = None
                    b.grad = None
        return step

    results["pytorch eager"] = timed(make_step(forward))
    try:
        results["torch.compile"] = timed(make_step(torch.compile(forward)))
    except Exception as e:  # noqa: BLE001
        print(f"torch.compile skipped: {e}", file=sys.stderr)
except ImportError:
    print("torch not installed: skipped", file=sys.stderr)

try:
    import jax
    import jax.numpy as jnp

    jp = [(jnp.asarray(w), jnp.asarray(b)) for w, b in params_np]
    jx, jy = jnp.asarray(x_np), jnp.asarray(y_np.astype(np.int32))

    def loss_fn(p, x, y):
        h = x
        for k, (w, b) in enumerate(p):
            h = h @ w + b
            if k < len(p) - 1:
                h = jax.nn.relu(h)
        logp = jax.nn.log_softmax(h)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

    @jax.jit
    def jstep(p, x, y):
        g = jax.grad(loss_fn)(p, x, y)
        return jax.tree_util.tree_map(lambda a, b: a - LR * b, p, g)

    state = {"p": jp}

    def step():
        state["p"] = jstep(state["p"], jx, jy)
        jax.block_until_ready(state["p"])

    results["jax jit"] = timed(step)
except ImportError:
    print("jax not installed: skipped", file=sys.stderr)

out = subprocess.run(
    [args.cleave, "bench", "examples/mlp.cir", "--json", "--iters", str(args.iters),
     "--warmup", str(args.warmup)],
    check=True, capture_output=True, text=True,
)
results["cleave"] = json.loads(out.stdout)["median_ms"]

for name, ms in results.items():
    print(f"{name:>14}: {ms:.3f} ms")
baselines = {k: v for k, v in results.items() if k != "cleave"}
if baselines:
    best = min(baselines, key=baselines.get)
    print(f"cleave / best baseline ({best}) = {results['cleave'] / baselines[best]:.2f}")
