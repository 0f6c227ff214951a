"""Times one training step of a 4-layer GPT (vocab 256, d 256, 4 heads, seq 128, batch 8,
pre-LN LayerNorm, exact GELU, causal attention, tied embeddings, mean cross-entropy, SGD) in
PyTorch eager, torch.compile and JAX jit, and cleave's `cleave bench examples/gpt-4l.cir`, in one
run, and prints each median and cleave's ratio to the best baseline.

The math is that of `examples/gpt-4l.cir` (`cleave new-model gpt --vocab 256 --d-model 256
--heads 4 --layers 4 --seq 128 --batch 8`): token embedding `wte` gathered plus learned
positions `wpe`; per layer x + attn(ln1(x)), then + proj(gelu(fc(ln2(·)))), attention with
separate q, k, v, o projections (with biases), scores scaled by 1/sqrt(d/heads), masked to -1e9
above the diagonal, softmax, probs·v; a final LayerNorm; logits = h·wteᵀ; loss the mean
cross-entropy over the B·S positions. Every framework writes it out with the same explicit
matmuls.

Run from the repository root, in a scratch virtualenv (`pip install jax torch numpy`; missing
frameworks are skipped):

    cargo build --release [--features llvm]
    python benches/baselines/gpt_step.py [--iters 20] [--threads 2] [--rounds 3]

Method: see `common.py`. Parameters are updated in place by SGD (lr 0.01).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

args = common.setup(__doc__)

import numpy as np  # noqa: E402

V, B, S, D, H, L, LR, EPS = 256, 8, 128, 256, 4, 4, 0.01, 1e-5
DH = D // H
rng = np.random.default_rng(0)
tokens_np = rng.integers(0, V, (B, S)).astype(np.int32)
targets_np = rng.integers(0, V, (B, S)).astype(np.int32)


def lin(i, o):
    return [(rng.standard_normal((i, o)) / np.sqrt(i)).astype(np.float32),
            np.zeros(o, np.float32)]


def layer_params():
    # Order: ln1 w, b; wq, wk, wv, wo (w, b each); ln2 w, b; fc w, b; proj w, b.
    return ([np.ones(D, np.float32), np.zeros(D, np.float32)]
            + lin(D, D) + lin(D, D) + lin(D, D) + lin(D, D)
            + [np.ones(D, np.float32), np.zeros(D, np.float32)]
            + lin(D, 4 * D) + lin(4 * D, D))


LAYER = 16
params_np = ([(rng.standard_normal((V, D)) * 0.02).astype(np.float32),
              (rng.standard_normal((S, D)) * 0.02).astype(np.float32)]
             + [a for _ in range(L) for a in layer_params()]
             + [np.ones(D, np.float32), np.zeros(D, np.float32)])
causal_np = np.tril(np.ones((S, S), dtype=bool))


def block(p, x, ops):
    """One layer written once over a small table of framework ops."""
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


def gpt_logits(p, tokens, ops):
    wte, wpe = p[0], p[1]
    x = ops.take(wte, tokens) + wpe
    for i in range(L):
        x = block(p[2 + LAYER * i: 2 + LAYER * (i + 1)], x, ops)
    x = ops.layer_norm(x, p[-2], p[-1])
    return x.reshape(B * S, D) @ ops.transpose_last(wte)


steps = {}

torch = common.try_import("torch")
if torch is not None:
    torch.set_num_threads(args.threads)
    F = torch.nn.functional
    TorchOps = common.torch_ops(torch, causal_np, D, EPS)

    tp = [torch.tensor(a, requires_grad=True) for a in params_np]
    tt, tg = torch.tensor(tokens_np).long(), torch.tensor(targets_np).long()

    def forward(tokens, targets):
        return F.cross_entropy(gpt_logits(tp, tokens, TorchOps), targets.reshape(-1))

    def make_step(fwd):
        def step():
            fwd(tt, tg).backward()
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

    jt, jg = jnp.asarray(tokens_np), jnp.asarray(targets_np)

    def loss_fn(p, tokens, targets):
        logits = gpt_logits(p, tokens, JaxOps)
        logp = jax.nn.log_softmax(logits, -1)
        return -jnp.mean(jnp.take_along_axis(logp, targets.reshape(-1, 1), 1))

    @jax.jit
    def jstep(p, tokens, targets):
        g = jax.grad(loss_fn)(p, tokens, targets)
        return [a - LR * b for a, b in zip(p, g)]

    state = {"p": [jnp.asarray(a) for a in params_np]}

    def step():
        state["p"] = jstep(state["p"], jt, jg)
        jax.block_until_ready(state["p"])

    steps["jax jit"] = step

common.compare("examples/gpt-4l.cir", steps, args)
