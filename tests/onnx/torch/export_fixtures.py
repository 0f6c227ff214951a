#!/usr/bin/env python3
"""Exports the PyTorch fixtures of cleave's ONNX importer and their PyTorch references.

Run from anywhere (writes next to this script):

    python -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch onnx onnxscript safetensors   # CPU use only
    /tmp/torchenv/bin/python tests/onnx/torch/export_fixtures.py

For each model `<m>` in {mlp, cnn, gpt} this writes

- `<m>.onnx` (and `<m>.onnx.data` where the weights are external): `torch.onnx.export` with the
  default (dynamo) exporter, `optimize=False` (so initializers keep their `named_parameters()`
  names and no two parameters are merged), opset 18, a dynamic batch dimension;
- `<m>.ref.safetensors`: float32 PyTorch references computed on CPU:
  `in.<input>`, `labels` / `target`, `out.<output>`, `loss` (scalar) and
  `grad.<initializer name>` for every parameter, with the versions in the metadata.

Losses match `runner/src/loss.rs`: `cross-entropy` is mean softmax cross-entropy against i64
class indices (`F.cross_entropy`, reduction "mean"); `mse` is the mean over every element of
`(pred - target)^2` (`F.mse_loss`, reduction "mean").

It also writes `ln_pitfall.onnx`: two freshly initialised LayerNorms around a Linear on a 3-d
input, exported with the default `optimize=True`, which merges the LayerNorms' equal weights into
one initializer and pre-transposes the Linear's weight into an unnamed one; cleave warns on both.
"""

import json
import os
import sys

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.numpy import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
OPSET = 18
BATCH = 2


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 2 * 2, 5)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # [B,4,4,4]
        x = F.avg_pool2d(F.relu(self.conv2(x)), 2)  # [B,6,2,2]
        return self.fc(torch.flatten(x, 1))


class Block(nn.Module):
    """A pre-LN GPT block: x + attn(ln1(x)), then + mlp(ln2(.))."""

    def __init__(self, d=16, heads=2, seq=8):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)
        self.register_buffer("mask", torch.tril(torch.ones(seq, seq, dtype=torch.bool)))
        # Non-trivial LayerNorm affine parameters, so that they are neither merged nor trivial.
        with torch.no_grad():
            for ln in (self.ln1, self.ln2):
                ln.weight.add_(0.1 * torch.randn(d))
                ln.bias.add_(0.1 * torch.randn(d))

    def forward(self, x):
        b, t, d = x.shape
        h = self.heads
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q = q.reshape(b, t, h, d // h).transpose(1, 2)
        k = k.reshape(b, t, h, d // h).transpose(1, 2)
        v = v.reshape(b, t, h, d // h).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) / float(d // h) ** 0.5
        att = att.masked_fill(~self.mask[:t, :t], float("-inf"))
        y = F.softmax(att, dim=-1) @ v
        y = y.transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TwoLayerNorms(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1 = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)
        self.ln2 = nn.LayerNorm(8)

    def forward(self, x):
        return self.ln2(self.fc(self.ln1(x)))


def export(model, x, path, optimize, external):
    batch = torch.export.Dim("batch", min=1, max=1024)
    prog = torch.onnx.export(
        model,
        (x,),
        dynamo=True,
        optimize=optimize,
        opset_version=OPSET,
        input_names=["x"],
        output_names=["y"],
        dynamic_shapes=({0: batch},),
        external_data=external,
    )
    prog.save(path, external_data=external)
    # Drop the per-node Python stack traces: they hold local paths and change with every edit of
    # this script. The weights (and any external-data references) are left as written.
    m = onnx.load(path, load_external_data=False)
    for node in m.graph.node:
        keep = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)
    onnx.save(m, path)
    onnx.checker.check_model(path)
    return m


def make(name, model, x, loss, external=False):
    model.eval()
    path = os.path.join(HERE, f"{name}.onnx")
    for stale in (path, path + ".data"):
        if os.path.exists(stale):
            os.remove(stale)
    m = export(model, x, path, optimize=False, external=external)
    inits = {i.name for i in m.graph.initializer}
    params = dict(model.named_parameters())
    missing = sorted(set(params) - inits)
    assert not missing, f"{name}: parameters without an initializer of the same name: {missing}"

    y = model(x)
    if loss == "cross-entropy":
        g = torch.Generator().manual_seed(7)
        labels = torch.randint(0, y.shape[-1], y.shape[:-1], generator=g)
        l = F.cross_entropy(y.reshape(-1, y.shape[-1]), labels.reshape(-1))
        extra = {"labels": labels.numpy().astype(np.int64)}
    else:
        g = torch.Generator().manual_seed(7)
        target = torch.randn(y.shape, generator=g)
        l = F.mse_loss(y, target)
        extra = {"target": target.numpy().astype(np.float32)}
    grads = torch.autograd.grad(l, list(params.values()))

    ref = {"in.x": x.detach().numpy(), "out.y": y.detach().numpy(), "loss": l.detach().numpy()}
    ref.update(extra)
    for (pname, _), gr in zip(params.items(), grads):
        ref[f"grad.{pname}"] = gr.numpy()
    # (not np.ascontiguousarray, which turns the 0-d loss into shape [1])
    ref = {k: np.array(v, order="C") for k, v in ref.items()}
    meta = {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxscript": __import__("onnxscript").__version__,
        "exporter": f"torch.onnx.export(dynamo=True, optimize=False, opset_version={OPSET}, "
        f"dynamic batch, external_data={external})",
        "loss": loss,
        "batch": str(x.shape[0]),
        "params": json.dumps(list(params)),
    }
    save_file(ref, os.path.join(HERE, f"{name}.ref.safetensors"), metadata=meta)
    print(f"{name}: {len(params)} params, ops {sorted({n.op_type for n in m.graph.node})}")


def main():
    torch.manual_seed(0)
    make("mlp", MLP(), torch.randn(BATCH, 12), "cross-entropy")
    torch.manual_seed(1)
    make("cnn", CNN(), torch.randn(BATCH, 3, 8, 8), "cross-entropy")
    torch.manual_seed(2)
    make("gpt", Block(), torch.randn(BATCH, 8, 16), "mse", external=True)

    torch.manual_seed(3)
    path = os.path.join(HERE, "ln_pitfall.onnx")
    # A 3-d input makes nn.Linear a MatMul with the transposed weight, which the optimizer
    # pre-transposes into an unnamed initializer (`val_<n>`).
    x = torch.randn(BATCH, 4, 8)
    m = export(TwoLayerNorms().eval(), x, path, optimize=True, external=False)
    print("ln_pitfall initializers:", [i.name for i in m.graph.initializer])
    print("torch", torch.__version__, "onnx", onnx.__version__, file=sys.stderr)


if __name__ == "__main__":
    main()
