#!/usr/bin/env python3
"""Regenerates the JAX reference-gradient fixtures of `tests/tests/reference_grads.rs`.

For each model (MLP, small CNN, GPT-tiny) this script

1. runs `cleave new-model KIND ... --params-out P --seed S` in a temporary directory;
2. perturbs every parameter by deterministic Gaussian noise (std `PERTURB`), so that biases and
   norm scales are not the trivial zeros and ones of the initialisation;
3. makes deterministic inputs with numpy;
4. re-implements the model's forward pass in JAX (float32), and computes the loss and
   `jax.grad` of the loss with respect to every parameter;
5. writes `tests/reference/<model>.safetensors` with tensors `param.<name>`, `input.<name>`,
   `loss` and `grad.<name>`, and in its metadata the exact `new-model` arguments
   (`new_model_args`, a JSON list) and the versions used;
6. cross-checks: runs `cleave grad` on the same parameters and inputs and prints the maximum
   relative error (max|cleave - jax| / max|jax| per tensor) of every model.

Usage (from the repository root, after `cargo build`):

    python tests/reference/make_fixtures.py [--cleave target/debug/cleave]

The cleave binary can also be given by the environment variable `CLEAVE`.
"""

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile

import jax

jax.config.update("jax_enable_x64", False)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 7
PERTURB = 0.1
LN_EPS = 1e-5  # cleave_ir::tracer::DEFAULT_NORM_EPS
MASK = -1.0e9  # the f32 mask value of cleave_ir::models::gpt

# ----- model configurations -----

MLP = dict(sizes=[12, 16, 8, 5], batch=6)
CNN = dict(batch=3, in_channels=2, image=8, classes=4)  # channels [8, 16], second pool avg
GPT = dict(vocab=11, d_model=8, heads=2, layers=2, seq=5, batch=2)  # layernorm, gelu, tied

NEW_MODEL_ARGS = {
    "mlp": ["mlp", "--sizes", ",".join(map(str, MLP["sizes"])), "--batch", str(MLP["batch"])],
    "cnn": [
        "cnn",
        "--batch", str(CNN["batch"]),
        "--in-channels", str(CNN["in_channels"]),
        "--image", str(CNN["image"]),
        "--classes", str(CNN["classes"]),
    ],
    "gpt": [
        "gpt",
        "--vocab", str(GPT["vocab"]),
        "--d-model", str(GPT["d_model"]),
        "--heads", str(GPT["heads"]),
        "--layers", str(GPT["layers"]),
        "--seq", str(GPT["seq"]),
        "--batch", str(GPT["batch"]),
        "--norm", "layernorm",
        "--act", "gelu",
    ],
}

# ----- building blocks, with exactly the semantics of cleave's ops -----


def linear(p, name, x, bias=True):
    """`Tracer::linear`: weight `[in, out]`, bias broadcast over the leading dimensions."""
    y = jnp.matmul(x, p[f"{name}.weight"])
    if bias:
        y = y + p[f"{name}.bias"]
    return y


def cross_entropy_mean(logits, labels):
    """`reduce_mean(cross_entropy(logits, labels))` over every position."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    return -jnp.mean(picked)


def layer_norm_affine(p, name, x):
    """`layer_norm` (biased variance, eps 1e-5) then `* weight + bias`."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    xc = x - mean
    var = jnp.mean(xc * xc, axis=-1, keepdims=True)
    y = xc / jnp.sqrt(var + LN_EPS)
    return y * p[f"{name}.weight"] + p[f"{name}.bias"]


def gelu_erf(x):
    """`x·Φ(x)` with the exact (erf) normal CDF."""
    return 0.5 * x * (1.0 + lax.erf(x / np.float32(np.sqrt(2.0))))


def conv3x3(p, name, x):
    """3×3 cross-correlation, stride 1, padding 1, weight `[O, C, 3, 3]`, plus bias."""
    y = lax.conv_general_dilated(
        x,
        p[f"{name}.weight"],
        window_strides=(1, 1),
        padding=((1, 1), (1, 1)),
        dimension_numbers=("NCHW", "OIHW", "NCHW"),
    )
    return y + p[f"{name}.bias"][None, :, None, None]


def max_pool2(x):
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")


def avg_pool2(x):
    return lax.reduce_window(x, 0.0, lax.add, (1, 1, 2, 2), (1, 1, 2, 2), "VALID") / 4.0


# ----- the models (see ir/src/models/*.rs) -----


def mlp_loss(p, inputs):
    h = inputs["x"]
    layers = len(MLP["sizes"]) - 1
    for i in range(layers):
        h = linear(p, f"fc{i + 1}", h)
        if i + 1 < layers:
            h = jax.nn.relu(h)
    return cross_entropy_mean(h, inputs["labels"])


def cnn_loss(p, inputs):
    y = conv3x3(p, "conv1", inputs["x"])
    y = max_pool2(jax.nn.relu(y))
    y = conv3x3(p, "conv2", y)
    y = avg_pool2(jax.nn.relu(y))
    y = y.reshape(y.shape[0], -1)
    return cross_entropy_mean(linear(p, "fc", y), inputs["labels"])


def gpt_block(p, pre, x):
    b, s, d = x.shape
    h = GPT["heads"]
    dh = d // h
    a = layer_norm_affine(p, f"{pre}.ln1", x)

    def heads(name):
        return linear(p, f"{pre}.attn.{name}", a).reshape(b, s, h, dh).transpose(0, 2, 1, 3)

    q, k, v = heads("wq"), heads("wk"), heads("wv")
    scores = jnp.matmul(q, k.transpose(0, 1, 3, 2)) * np.float32(1.0 / np.sqrt(dh))
    causal = np.arange(s)[:, None] >= np.arange(s)[None, :]
    scores = jnp.where(causal, scores, np.float32(MASK))
    probs = jax.nn.softmax(scores, axis=3)
    o = jnp.matmul(probs, v).transpose(0, 2, 1, 3).reshape(b, s, d)
    x = x + linear(p, f"{pre}.attn.wo", o)
    m = layer_norm_affine(p, f"{pre}.ln2", x)
    m = linear(p, f"{pre}.mlp.proj", gelu_erf(linear(p, f"{pre}.mlp.fc", m)))
    return x + m


def gpt_loss(p, inputs):
    tokens, targets = inputs["tokens"], inputs["targets"]
    x = p["wte"][tokens] + p["wpe"][None, :, :]
    for i in range(GPT["layers"]):
        x = gpt_block(p, f"layers.{i}", x)
    x = layer_norm_affine(p, "ln_f", x)
    flat = x.reshape(-1, GPT["d_model"])
    logits = jnp.matmul(flat, p["wte"].T)  # tied head: matmul with transpose_rhs
    return cross_entropy_mean(logits, targets.reshape(-1))


# ----- inputs -----


def make_inputs(model, rng):
    if model == "mlp":
        return {
            "x": rng.standard_normal((MLP["batch"], MLP["sizes"][0])).astype(np.float32),
            "labels": rng.integers(0, MLP["sizes"][-1], MLP["batch"]).astype(np.int32),
        }
    if model == "cnn":
        n, c, hw = CNN["batch"], CNN["in_channels"], CNN["image"]
        return {
            "x": rng.standard_normal((n, c, hw, hw)).astype(np.float32),
            "labels": rng.integers(0, CNN["classes"], n).astype(np.int32),
        }
    if model == "gpt":
        shape = (GPT["batch"], GPT["seq"])
        return {
            "tokens": rng.integers(0, GPT["vocab"], shape).astype(np.int32),
            "targets": rng.integers(0, GPT["vocab"], shape).astype(np.int32),
        }
    raise ValueError(model)


LOSSES = {"mlp": mlp_loss, "cnn": cnn_loss, "gpt": gpt_loss}


def max_rel_err(got, want):
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    scale = np.max(np.abs(want))
    return float(np.max(np.abs(got - want)) / scale) if scale > 0 else float(np.max(np.abs(got)))


def canonicalize(path):
    """Rewrites a safetensors header with sorted keys (the library writes the metadata in hash
    order), so that regenerating unchanged fixtures gives byte-identical files."""
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":"))
    header = header.encode() + b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + data[8 + n :])


def run(cmd):
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def structurally_zero(name):
    """Gradients that are exactly zero in exact arithmetic: a key bias adds `q·b` to every score
    of a softmax row, which softmax ignores. Both sides give rounding noise there, so these are
    compared against the model's gradient scale instead (see reference_grads.rs)."""
    return name.endswith("attn.wk.bias")


def make_fixture(model, cleave, tmp):
    args = NEW_MODEL_ARGS[model]
    cir = os.path.join(tmp, f"{model}.cir")
    init = os.path.join(tmp, f"{model}.init.safetensors")
    run([cleave, "new-model", *args, "-o", cir, "--params-out", init, "--seed", str(SEED)])
    full_args = [*args, "--seed", str(SEED)]

    rng = np.random.default_rng(SEED)
    params = {}
    for name, value in sorted(load_file(init).items()):
        noise = rng.standard_normal(value.shape).astype(np.float32)
        params[name] = (value + np.float32(PERTURB) * noise).astype(np.float32)
    inputs = make_inputs(model, rng)

    loss_fn = LOSSES[model]
    jp = {k: jnp.asarray(v) for k, v in params.items()}
    ji = {k: jnp.asarray(v) for k, v in inputs.items()}
    loss, grads = jax.value_and_grad(loss_fn)(jp, ji)
    assert loss.dtype == jnp.float32

    tensors = {}
    for k, v in params.items():
        tensors[f"param.{k}"] = v
    for k, v in inputs.items():
        tensors[f"input.{k}"] = v
    tensors["loss"] = np.asarray(loss, np.float32)
    for k, v in grads.items():
        tensors[f"grad.{k}"] = np.asarray(v, np.float32)
    metadata = {
        "model": model,
        "new_model_args": json.dumps(full_args),
        "param_perturbation": f"param = init + {PERTURB} * normal, numpy default_rng({SEED}), "
        "parameters in sorted name order, then the inputs",
        "jax_version": jax.__version__,
        "numpy_version": np.__version__,
    }
    out = os.path.join(HERE, f"{model}.safetensors")
    save_file(tensors, out, metadata=metadata)
    canonicalize(out)

    # Cross-check with `cleave grad` (f32 interpreter).
    pfile = os.path.join(tmp, f"{model}.params.safetensors")
    ifile = os.path.join(tmp, f"{model}.inputs.safetensors")
    gfile = os.path.join(tmp, f"{model}.grads.safetensors")
    ofile = os.path.join(tmp, f"{model}.out.safetensors")
    save_file(params, pfile)
    save_file(inputs, ifile)
    run([cleave, "grad", cir, "--inputs", ifile, "--params", pfile, "--out", gfile])
    run([cleave, "run", cir, "--inputs", ifile, "--params", pfile, "--out", ofile])
    cgrads = load_file(gfile)
    closs = load_file(ofile)["loss"]
    missing = sorted(set(params) - set(cgrads))
    if missing:
        sys.exit(f"{model}: cleave gave no gradient for {missing}")
    loss_err = max_rel_err(closs, loss)
    scale = max(float(np.max(np.abs(g))) for g in grads.values())
    errs = {}
    for k in sorted(params):
        if structurally_zero(k):
            noise = max(np.max(np.abs(cgrads[k])), np.max(np.abs(grads[k]))) / scale
            print(f"  {k}: exactly zero in exact arithmetic; |noise| / scale {noise:.2e}")
            errs[k] = float(noise)
        else:
            errs[k] = max_rel_err(cgrads[k], grads[k])
            print(f"  {k}: max|jax| {np.max(np.abs(grads[k])):.3e} rel err {errs[k]:.2e}")
    worst = max(errs, key=errs.get)
    size = os.path.getsize(out)
    print(
        f"{model}: {len(params)} params, {size} bytes; loss {float(loss):.6f} "
        f"(rel err {loss_err:.2e}); max grad rel err {errs[worst]:.2e} ({worst})"
    )
    return max(loss_err, errs[worst])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--cleave",
        default=os.environ.get("CLEAVE", "target/debug/cleave"),
        help="path of the cleave binary (default: $CLEAVE or target/debug/cleave)",
    )
    ap.add_argument("models", nargs="*", default=list(LOSSES), help="models to regenerate")
    a = ap.parse_args()
    print(f"jax {jax.__version__}, numpy {np.__version__}")
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for model in a.models:
            worst = max(worst, make_fixture(model, a.cleave, tmp))
    print(f"worst relative error: {worst:.2e} ({'ok' if worst <= 1e-5 else 'ABOVE 1e-5'})")


if __name__ == "__main__":
    main()
