"""Times one training step of a pre-LN GPT block (d 64, 2 heads, seq 16, batch 8, LayerNorm,
exact GELU, causal attention, mean-squared error against a target input, SGD) in PyTorch eager,
torch.compile and JAX jit, and cleave's `cleave bench examples/gpt-block.cir`, in one run, and
prints each median and cleave's ratio to the best baseline.

The math is that of `examples/gpt-block.cir` (`cleave new-model gpt-layer --loss mse`):
x + attn(ln1(x)), then + proj(gelu(fc(ln2(·)))); attention with separate q, k, v, o projections
(with biases), scores scaled by 1/sqrt(d/heads), masked to -1e9 above the diagonal, softmax,
probs·v; LayerNorm eps 1e-5; loss mean((y - target)²). Every framework writes it out with the
same explicit matmuls (LayerNorm is PyTorch's `layer_norm`, and mean/variance in JAX).

Run from the repository root, in a scratch virtualenv (`pip install jax torch numpy`; missing
frameworks are skipped):

    cargo build --release
    python benches/baselines/gpt_block_step.py [--iters 200] [--threads 2] [--rounds 3]

Method: see `common.py`. Parameters are updated in place by SGD (lr 0.01).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

args = common.setup(__doc__)

import numpy as np  # noqa: E402

B, S, D, H, LR, EPS = 8, 16, 64, 2, 0.01, 1e-5
DH = D // H
rng = np.random.default_rng(0)
x_np = rng.standard_normal((B, S, D)).astype(np.float32)
t_np = rng.standard_normal((B, S, D)).astype(np.float32)


def lin(i, o):
    return [(rng.standard_normal((i, o)) / np.sqrt(i)).astype(np.float32),
            np.zeros(o, np.float32)]


# Order: ln1 w, b; wq, wk, wv, wo (w, b each); ln2 w, b; fc w, b; proj w, b.
params_np = ([np.ones(D, np.float32), np.zeros(D, np.float32)]
             + lin(D, D) + lin(D, D) + lin(D, D) + lin(D, D)
             + [np.ones(D, np.float32), np.zeros(D, np.float32)]
             + lin(D, 4 * D) + lin(4 * D, D))
causal_np = np.tril(np.ones((S, S), dtype=bool))


def block(p, x, ops):
    """The block written once over a small table of framework ops."""
    (l1w, l1b, wq, bq, wk, bk, wv, bv, wo, bo, l2w, l2b, fw, fb, pw, pb) = p

    ln = ops.layer_norm

    def heads(h):
        return ops.transpose(h.reshape(B, S, H, DH))

    a = ln(x, l1w, l1b)
    q, k, v = heads(a @ wq + bq), heads(a @ wk + bk), heads(a @ wv + bv)
    scores = (q @ ops.transpose_last(k)) * (1.0 / np.sqrt(DH))
    scores = ops.where(ops.causal, scores, -1e9)
    o = ops.transpose(ops.softmax(scores) @ v).reshape(B, S, D)
    x = x + (o @ wo + bo)
    m = ln(x, l2w, l2b)
    return x + (ops.gelu(m @ fw + fb) @ pw + pb)


steps = {}

torch = common.try_import("torch")
if torch is not None:
    torch.set_num_threads(args.threads)

    TorchOps = common.torch_ops(torch, causal_np, D, EPS)

    tp = [torch.tensor(a, requires_grad=True) for a in params_np]
    tx, tt = torch.tensor(x_np), torch.tensor(t_np)

    def forward(x, t):
        return torch.mean((block(tp, x, TorchOps) - t) ** 2)

    def make_step(fwd):
        def step():
            fwd(tx, tt).backward()
            with torch.no_grad():
                for a in tp:
                    a -= LR * a.grad
                    a.grad = None
        return step

    common.add_torch_steps(steps, make_step, forward)

jax = common.try_import("jax")
if jax is not None:
    import jax.numpy as jnp

    JaxOps = common.jax_ops(jax, causal_np, EPS)

    jx, jt = jnp.asarray(x_np), jnp.asarray(t_np)

    def loss_fn(p, x, t):
        return jnp.mean((block(p, x, JaxOps) - t) ** 2)

    @jax.jit
    def jstep(p, x, t):
        g = jax.grad(loss_fn)(p, x, t)
        return [a - LR * b for a, b in zip(p, g)]

    state = {"p": [jnp.asarray(a) for a in params_np]}

    def step():
        state["p"] = jstep(state["p"], jx, jt)
        jax.block_until_ready(state["p"])

    steps["jax jit"] = step

common.compare("examples/gpt-block.cir", steps, args)
