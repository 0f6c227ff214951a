"""Times one training step of the MLP 784-256-256-10 (batch 64, mean cross-entropy, SGD) in
PyTorch eager, torch.compile and JAX jit, and cleave's `cleave bench examples/mlp.cir`, in one
run, and prints each median and cleave's ratio to the best baseline.

Run from the repository root, in a scratch virtualenv that has what you want to compare
(`pip install jax torch numpy`; missing frameworks are skipped):

    cargo build --release
    python benches/baselines/mlp_step.py [--iters 200] [--threads 2] [--rounds 3]

Method: see `common.py`. Parameters are updated in place by SGD (lr 0.01) in every framework,
so each timed step is a real training step.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

args = common.setup(__doc__)

import numpy as np  # noqa: E402

B, SIZES, LR = 64, [784, 256, 256, 10], 0.01
rng = np.random.default_rng(0)
x_np = rng.standard_normal((B, SIZES[0])).astype(np.float32)
y_np = rng.integers(0, SIZES[-1], size=(B,)).astype(np.int64)
params_np = []
for i, o in zip(SIZES[:-1], SIZES[1:]):
    params_np.append(((rng.standard_normal((i, o)) / np.sqrt(i)).astype(np.float32),
                      np.zeros(o, np.float32)))

steps = {}

torch = common.try_import("torch")
if torch is not None:
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

    common.add_torch_steps(steps, make_step, forward)

jax = common.try_import("jax")
if jax is not None:
    import jax.numpy as jnp

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

    state = {"p": [(jnp.asarray(w), jnp.asarray(b)) for w, b in params_np]}

    def step():
        state["p"] = jstep(state["p"], jx, jy)
        jax.block_until_ready(state["p"])

    steps["jax jit"] = step

common.compare("examples/mlp.cir", steps, args)
