"""Builds the ONNX fixtures of cleave's importer tests, and their reference outputs and gradients.

Run with a Python that has `onnx`, `numpy`, `safetensors` and `jax` (CPU) installed:

    python3 -m venv /tmp/onnxenv
    /tmp/onnxenv/bin/pip install onnx numpy safetensors jax
    /tmp/onnxenv/bin/python tests/onnx/make_fixtures.py

The models are written with `onnx.helper` in the shapes `torch.onnx.export` produces (Gemm with
transB=1 for Linear layers, Shape/Gather/Concat chains feeding Reshape, a Trilu causal mask used
through Where, GELU as Erf); the GPT block stores its weights in `gpt.onnx.data` (external data).

For each model `<name>.onnx`, `<name>.ref.safetensors` holds:
- the inputs (`x` or `tokens`) and `labels` (int64 class indices) for batch 4;
- `out.<output>`: the forward outputs, from onnx's reference evaluator (an independent ONNX
  implementation);
- `loss`: the mean cross-entropy of the first output against `labels`;
- `grad.<param>`: the gradient of that loss with respect to every initializer, from a JAX
  re-implementation of the model in float64 (its forward pass is checked against the reference
  evaluator first).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from safetensors.numpy import save_file

jax.config.update("jax_enable_x64", True)

HERE = os.path.dirname(os.path.abspath(__file__))
BATCH = 4
rng = np.random.default_rng(0)


def rand(*shape, scale=0.5):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def const_i64(name, values):
    return helper.make_node(
        "Constant", [], [name], value=numpy_helper.from_array(np.array(values, dtype=np.int64))
    )


def cross_entropy(logits, labels):
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    return -jnp.mean(picked)


def finish(name, graph, opset, params, inputs, labels, jax_forward, external=False):
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="cleave-fixtures"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = os.path.join(HERE, f"{name}.onnx")
    if external:
        data = f"{name}.onnx.data"
        if os.path.exists(os.path.join(HERE, data)):
            os.remove(os.path.join(HERE, data))
        onnx.save_model(
            model,
            path,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data,
            size_threshold=0,
        )
    else:
        onnx.save_model(model, path)

    outputs = [o.name for o in graph.output]
    ref = ReferenceEvaluator(onnx.load(path))
    results = ref.run(None, inputs)

    p64 = {k: jnp.asarray(v, dtype=jnp.float64) for k, v in params.items()}
    x64 = {k: (jnp.asarray(v, dtype=jnp.float64) if v.dtype == np.float32 else jnp.asarray(v))
           for k, v in inputs.items()}
    mine = np.asarray(jax_forward(p64, x64))
    np.testing.assert_allclose(mine, results[0], rtol=1e-4, atol=1e-5)

    loss_fn = lambda p: cross_entropy(jax_forward(p, x64), jnp.asarray(labels))
    loss, grads = jax.value_and_grad(loss_fn)(p64)

    tensors = dict(inputs)
    tensors["labels"] = labels
    for o, r in zip(outputs, results):
        tensors[f"out.{o}"] = np.asarray(r)
    tensors["loss"] = np.asarray(loss, dtype=np.float64)
    for k, g in grads.items():
        tensors[f"grad.{k}"] = np.asarray(g, dtype=np.float64)
    save_file(tensors, os.path.join(HERE, f"{name}.ref.safetensors"))
    print(f"wrote {name}.onnx ({len(params)} parameters), loss {float(loss):.6f}")


def mlp():
    """Linear(8,16) -> ReLU -> Linear(16,3), as torch exports it (Gemm, transB=1)."""
    params = {
        "fc1.weight": rand(16, 8),
        "fc1.bias": rand(16),
        "fc2.weight": rand(3, 16),
        "fc2.bias": rand(3),
    }
    nodes = [
        helper.make_node("Gemm", ["x", "fc1.weight", "fc1.bias"], ["h"], name="/fc1/Gemm", transB=1),
        helper.make_node("Relu", ["h"], ["r"], name="/act/Relu"),
        helper.make_node("Gemm", ["r", "fc2.weight", "fc2.bias"], ["logits"], name="/fc2/Gemm",
                         transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch_size", 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", 3])],
        [init(k, v) for k, v in params.items()],
    )

    def fwd(p, x):
        h = jax.nn.relu(x["x"] @ p["fc1.weight"].T + p["fc1.bias"])
        return h @ p["fc2.weight"].T + p["fc2.bias"]

    inputs = {"x": rand(BATCH, 8, scale=1.0)}
    labels = rng.integers(0, 3, size=(BATCH,)).astype(np.int64)
    finish("mlp", graph, 17, params, inputs, labels, fwd)


def cnn():
    """Conv(1->4, 3x3, pad 1) -> BatchNorm (inference) -> ReLU -> MaxPool 2 -> Flatten -> Linear."""
    params = {
        "conv.weight": rand(4, 1, 3, 3),
        "conv.bias": rand(4),
        "bn.weight": (1.0 + rand(4, scale=0.1)).astype(np.float32),
        "bn.bias": rand(4, scale=0.1),
        "fc.weight": rand(3, 64, scale=0.2),
        "fc.bias": rand(3),
    }
    stats = {
        "bn.running_mean": rand(4, scale=0.1),
        "bn.running_var": (1.0 + np.abs(rand(4, scale=0.2))).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["c"], name="/conv/Conv",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1]),
        helper.make_node("BatchNormalization",
                         ["c", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"],
                         ["b"], name="/bn/BatchNormalization", epsilon=1e-5),
        helper.make_node("Relu", ["b"], ["r"], name="/act/Relu"),
        helper.make_node("MaxPool", ["r"], ["p"], name="/pool/MaxPool", kernel_shape=[2, 2],
                         strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"], name="/Flatten", axis=1),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["logits"], name="/fc/Gemm",
                         transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch_size", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", 3])],
        [init(k, v) for k, v in {**params, **stats}.items()],
    )

    def fwd(p, x):
        c = jax.lax.conv_general_dilated(x["x"], p["conv.weight"], (1, 1), ((1, 1), (1, 1)))
        c = c + p["conv.bias"][None, :, None, None]
        inv = 1.0 / jnp.sqrt(jnp.asarray(stats["bn.running_var"], jnp.float64) + 1e-5)
        mean = jnp.asarray(stats["bn.running_mean"], jnp.float64)
        b = (c - mean[None, :, None, None]) * inv[None, :, None, None]
        b = b * p["bn.weight"][None, :, None, None] + p["bn.bias"][None, :, None, None]
        r = jax.nn.relu(b)
        pooled = jax.lax.reduce_window(r, -jnp.inf, jax.lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")
        f = pooled.reshape(pooled.shape[0], -1)
        return f @ p["fc.weight"].T + p["fc.bias"]

    inputs = {"x": rand(BATCH, 1, 8, 8, scale=1.0)}
    labels = rng.integers(0, 3, size=(BATCH,)).astype(np.int64)
    finish("cnn", graph, 18, params, inputs, labels, fwd)


def gpt():
    """One GPT-2 block with token and position embeddings and a tied LM head, as torch exports
    it: LayerNormalization, fused QKV MatMul + Split, Reshape/Transpose into heads with shapes
    computed by Shape/Gather/Concat, a causal mask from Trilu used through Where, Softmax, GELU
    as Erf, residual Adds. Weights live in gpt.onnx.data."""
    V, T, D, H = 11, 4, 8, 2
    hd = D // H
    params = {
        "wte.weight": rand(V, D),
        "wpe.weight": rand(T, D, scale=0.1),
        "ln_1.weight": (1.0 + rand(D, scale=0.1)).astype(np.float32),
        "ln_1.bias": rand(D, scale=0.1),
        "attn.c_attn.weight": rand(D, 3 * D, scale=0.3),
        "attn.c_attn.bias": rand(3 * D, scale=0.1),
        "attn.c_proj.weight": rand(D, D, scale=0.3),
        "attn.c_proj.bias": rand(D, scale=0.1),
        "ln_2.weight": (1.0 + rand(D, scale=0.1)).astype(np.float32),
        "ln_2.bias": rand(D, scale=0.1),
        "mlp.c_fc.weight": rand(D, 4 * D, scale=0.3),
        "mlp.c_fc.bias": rand(4 * D, scale=0.1),
        "mlp.c_proj.weight": rand(4 * D, D, scale=0.3),
        "mlp.c_proj.bias": rand(D, scale=0.1),
        "ln_f.weight": (1.0 + rand(D, scale=0.1)).astype(np.float32),
        "ln_f.bias": rand(D, scale=0.1),
    }
    mk = helper.make_node
    nodes = [
        # Embeddings; the sequence length comes from the input's shape.
        mk("Gather", ["wte.weight", "tokens"], ["tok"], name="/wte/Gather"),
        mk("Shape", ["tokens"], ["tshape"], name="/Shape"),
        const_i64("one", 1),
        mk("Gather", ["tshape", "one"], ["seq"], name="/Gather_seq", axis=0),
        const_i64("zero", 0),
        const_i64("step", 1),
        mk("Range", ["zero", "seq", "step"], ["pos"], name="/Range"),
        const_i64("axis0", [0]),
        mk("Unsqueeze", ["seq", "axis0"], ["seq_v"], name="/Unsqueeze"),
        mk("Gather", ["wpe.weight", "pos"], ["pe"], name="/wpe/Gather"),
        mk("Add", ["tok", "pe"], ["x0"], name="/Add_emb"),
        # Attention.
        mk("LayerNormalization", ["x0", "ln_1.weight", "ln_1.bias"], ["h1"], name="/ln_1/LN",
           axis=-1, epsilon=1e-5),
        mk("MatMul", ["h1", "attn.c_attn.weight"], ["qkv0"], name="/attn/c_attn/MatMul"),
        mk("Add", ["qkv0", "attn.c_attn.bias"], ["qkv"], name="/attn/c_attn/Add"),
        const_i64("split_sizes", [D, D, D]),
        mk("Split", ["qkv", "split_sizes"], ["q0", "k0", "v0"], name="/attn/Split", axis=2),
        mk("Shape", ["q0"], ["qshape"], name="/attn/Shape"),
        const_i64("idx01", [0, 1]),
        mk("Gather", ["qshape", "idx01"], ["bt"], name="/attn/Gather_bt", axis=0),
        const_i64("heads", [H, hd]),
        mk("Concat", ["bt", "heads"], ["split_shape"], name="/attn/Concat", axis=0),
    ]
    for n in ["q", "k", "v"]:
        nodes.append(mk("Reshape", [f"{n}0", "split_shape"], [f"{n}1"], name=f"/attn/Reshape_{n}"))
        perm = [0, 2, 3, 1] if n == "k" else [0, 2, 1, 3]
        nodes.append(mk("Transpose", [f"{n}1"], [f"{n}"], name=f"/attn/Transpose_{n}", perm=perm))
    nodes += [
        mk("MatMul", ["q", "k"], ["s0"], name="/attn/MatMul_qk"),
        mk("Constant", [], ["sqrt_hd"], value=numpy_helper.from_array(np.array(np.sqrt(hd), np.float32))),
        mk("Div", ["s0", "sqrt_hd"], ["s1"], name="/attn/Div"),
        # Causal mask: ones(T, T) -> lower triangle -> positions above it get -inf-like scores.
        mk("Concat", ["seq_v", "seq_v"], ["tt"], name="/attn/Concat_tt", axis=0),
        mk("ConstantOfShape", ["tt"], ["ones"], name="/attn/ConstantOfShape",
           value=numpy_helper.from_array(np.array([1.0], np.float32))),
        mk("Trilu", ["ones"], ["tril"], name="/attn/Trilu", upper=0),
        mk("Constant", [], ["zero_f"], value=numpy_helper.from_array(np.array(0.0, np.float32))),
        mk("Equal", ["tril", "zero_f"], ["masked"], name="/attn/Equal"),
        mk("Constant", [], ["neg"], value=numpy_helper.from_array(np.array(-1e9, np.float32))),
        mk("Where", ["masked", "neg", "s1"], ["s2"], name="/attn/Where"),
        mk("Softmax", ["s2"], ["att"], name="/attn/Softmax", axis=-1),
        mk("MatMul", ["att", "v"], ["y0"], name="/attn/MatMul_av"),
        mk("Transpose", ["y0"], ["y1"], name="/attn/Transpose_y", perm=[0, 2, 1, 3]),
        const_i64("merge", [0, 0, -1]),
        mk("Reshape", ["y1", "merge"], ["y2"], name="/attn/Reshape_y"),
        mk("MatMul", ["y2", "attn.c_proj.weight"], ["y3"], name="/attn/c_proj/MatMul"),
        mk("Add", ["y3", "attn.c_proj.bias"], ["y4"], name="/attn/c_proj/Add"),
        mk("Add", ["x0", "y4"], ["x1"], name="/Add_attn"),
        # MLP with GELU written as torch's Erf form.
        mk("LayerNormalization", ["x1", "ln_2.weight", "ln_2.bias"], ["h2"], name="/ln_2/LN",
           axis=-1, epsilon=1e-5),
        mk("MatMul", ["h2", "mlp.c_fc.weight"], ["f0"], name="/mlp/c_fc/MatMul"),
        mk("Add", ["f0", "mlp.c_fc.bias"], ["f1"], name="/mlp/c_fc/Add"),
        mk("Constant", [], ["sqrt2"], value=numpy_helper.from_array(np.array(np.sqrt(2.0), np.float32))),
        mk("Div", ["f1", "sqrt2"], ["g0"], name="/mlp/gelu/Div"),
        mk("Erf", ["g0"], ["g1"], name="/mlp/gelu/Erf"),
        mk("Constant", [], ["one_f"], value=numpy_helper.from_array(np.array(1.0, np.float32))),
        mk("Add", ["g1", "one_f"], ["g2"], name="/mlp/gelu/Add"),
        mk("Mul", ["f1", "g2"], ["g3"], name="/mlp/gelu/Mul"),
        mk("Constant", [], ["half"], value=numpy_helper.from_array(np.array(0.5, np.float32))),
        mk("Mul", ["g3", "half"], ["g4"], name="/mlp/gelu/Mul_1"),
        mk("MatMul", ["g4", "mlp.c_proj.weight"], ["m0"], name="/mlp/c_proj/MatMul"),
        mk("Add", ["m0", "mlp.c_proj.bias"], ["m1"], name="/mlp/c_proj/Add"),
        mk("Add", ["x1", "m1"], ["x2"], name="/Add_mlp"),
        # Final norm and the LM head tied to the token embedding.
        mk("LayerNormalization", ["x2", "ln_f.weight", "ln_f.bias"], ["hf"], name="/ln_f/LN",
           axis=-1, epsilon=1e-5),
        mk("Transpose", ["wte.weight"], ["wte_t"], name="/lm_head/Transpose", perm=[1, 0]),
        mk("MatMul", ["hf", "wte_t"], ["logits"], name="/lm_head/MatMul"),
    ]
    graph = helper.make_graph(
        nodes,
        "gpt_block",
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch_size", T])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", T, V])],
        [init(k, v) for k, v in params.items()],
    )

    def ln(x, w, b):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / jnp.sqrt(var + 1e-5) * w + b

    def fwd(p, inp):
        tok = inp["tokens"]
        x = p["wte.weight"][tok] + p["wpe.weight"][None, :, :]
        h = ln(x, p["ln_1.weight"], p["ln_1.bias"])
        qkv = h @ p["attn.c_attn.weight"] + p["attn.c_attn.bias"]
        q, k, v = jnp.split(qkv, 3, axis=-1)
        heads = lambda t: t.reshape(t.shape[0], T, H, hd).transpose(0, 2, 1, 3)
        q, k, v = heads(q), heads(k), heads(v)
        s = q @ k.transpose(0, 1, 3, 2) / jnp.sqrt(jnp.asarray(np.float32(np.sqrt(hd)), jnp.float64) ** 2)
        causal = jnp.tril(jnp.ones((T, T))) != 0
        s = jnp.where(causal, s, -1e9)
        a = jax.nn.softmax(s, axis=-1)
        y = (a @ v).transpose(0, 2, 1, 3).reshape(tok.shape[0], T, D)
        x = x + y @ p["attn.c_proj.weight"] + p["attn.c_proj.bias"]
        h = ln(x, p["ln_2.weight"], p["ln_2.bias"])
        f = h @ p["mlp.c_fc.weight"] + p["mlp.c_fc.bias"]
        g = f * (1.0 + jax.scipy.special.erf(f / np.sqrt(2.0))) * 0.5
        x = x + g @ p["mlp.c_proj.weight"] + p["mlp.c_proj.bias"]
        h = ln(x, p["ln_f.weight"], p["ln_f.bias"])
        return h @ p["wte.weight"].T

    inputs = {"tokens": rng.integers(0, V, size=(BATCH, T)).astype(np.int64)}
    labels = rng.integers(0, V, size=(BATCH, T)).astype(np.int64)
    finish("gpt", graph, 18, params, inputs, labels, fwd, external=True)


if __name__ == "__main__":
    mlp()
    cnn()
    gpt()
