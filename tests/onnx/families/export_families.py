#!/usr/bin/env python3
"""Exports the model-family fixtures of cleave's ONNX importer and their PyTorch references.

Run from anywhere (writes next to this script):

    python -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch torchvision transformers onnx onnxscript safetensors
    /tmp/torchenv/bin/python tests/onnx/families/export_families.py

Each family is built from its published configuration class or constructor, shrunk, and
randomly initialised (no hub downloads):

| file | model |
|---|---|
| `gpt2.onnx` | transformers `GPT2LMHeadModel`: 2 layers, d 128, 4 heads, vocab 256, tied embeddings |
| `llama.onnx` | transformers `LlamaForCausalLM`: 2 layers, d 128, 4 query / 2 key-value heads, vocab 256 |
| `vit.onnx` | torchvision `VisionTransformer`: 32×32 images, patch 8, 2 layers, d 64, 10 classes |
| `resnet18.onnx` | ResNet-18's layout from torchvision `BasicBlock`s at width 8, 32×32 images, `train()` mode (BatchNorm with batch statistics) |
| `tied.onnx` | an `nn.Embedding` shared by the input and two output heads, one block called twice |
| `loss_inside.onnx` | a classifier exported with `F.cross_entropy` inside: its one output is the loss (exporter-named) |
| `two_scalars.onnx` | the same returning the loss and a second scalar |
| `merged_opt.onnx` | LayerNorm, Linear, LayerNorm, Linear exported with `optimize=True`: norms merged, weights stored transposed |
| `folded_opt.onnx` | a position embedding at constant positions exported with `optimize=True`: folded into a constant |

Each is exported with `torch.onnx.export(dynamo=True, optimize=False, opset_version=18)` at a
static batch (the dynamo exporter records which initializers are buffers and the module scope of
every node; cleave uses both), with the per-node stack traces stripped. `<m>.ref.safetensors`
holds the float32 PyTorch references for one batch: `in.<input>`, `labels`, `loss` (mean
cross-entropy of the logits against `labels`, as `cleave --loss cross-entropy` adds it),
`grad.<name>` for every entry of `named_parameters()` (the ResNet's in float64, see `make`),
and `sgd_losses`: the loss before each of
20 plain SGD steps (`p -= LR * grad`, LR in the metadata) on that same batch, then after the
last, and `sgd_lr` (LR). `<m>.data.safetensors` is a training set of 8 batches of random
inputs and labels for `cleave train`. The metadata records the versions, the exporter call and the parameter names.
"""

import json
import os
import sys
import warnings

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.numpy import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
OPSET = 18
BATCH = 2
SEQ = 8
LR = 0.01
STEPS = 20


class Logits(nn.Module):
    """A transformers causal LM returning its logits only."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids):
        return self.lm(input_ids=input_ids, use_cache=False).logits


class Tied(nn.Module):
    """An embedding read by the input and by two output heads, and a block called twice."""

    def __init__(self, vocab=64, d=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.block = nn.Sequential(nn.Linear(d, d), nn.Tanh())
        self.head_bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, input_ids):
        h = self.emb(input_ids)
        h = self.block(self.block(h))
        # Two heads share the embedding matrix: logits and a second, scaled copy.
        a = h @ self.emb.weight.t() + self.head_bias
        b = (0.5 * h) @ self.emb.weight.t()
        return a + b


class WithLoss(nn.Module):
    """A classifier exported with its loss inside (the loss is its only output), or with an
    auxiliary scalar beside it (`two=True`)."""

    def __init__(self, two=False):
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, 5)
        self.two = two

    def forward(self, x, labels):
        logits = self.fc2(F.relu(self.fc1(x)))
        loss = F.cross_entropy(logits, labels)
        if self.two:
            return loss, logits.square().mean()
        return loss


def export_with_loss(name, two):
    """`<name>.onnx` and its reference: `in.x`, `in.labels`, `loss`, `grad.<param>`."""
    torch.manual_seed(11)
    model = WithLoss(two).eval()
    x = torch.randn(BATCH, 12)
    labels = torch.tensor([1, 3])
    path = os.path.join(HERE, f"{name}.onnx")
    # No output names: the exporter names the outputs itself, as for a user who gives none.
    prog = torch.onnx.export(model, (x, labels), dynamo=True, optimize=False,
                             opset_version=OPSET, input_names=["x", "labels"])
    m = save_without_traces(prog, path)
    params = dict(model.named_parameters())
    out = model(x, labels)
    loss = out[0] if two else out
    grads = torch.autograd.grad(loss, list(params.values()))
    ref = {"in.x": x.numpy(), "in.labels": labels.numpy().astype(np.int64),
           "loss": loss.detach().numpy()}
    for (pname, _), gr in zip(params.items(), grads):
        ref[f"grad.{pname}"] = gr.numpy()
    ref = {k: np.array(v, order="C") for k, v in ref.items()}
    save_file(ref, os.path.join(HERE, f"{name}.ref.safetensors"))
    print(f"{name}: outputs {[o.name for o in m.graph.output]}")


class ResNet18(nn.Module):
    """torchvision's ResNet-18 layout (7×7 stem, max pool, four stages of two torchvision
    `BasicBlock`s with 1×1 downsampling, global average pool, linear head) at a width of 8
    instead of 64 (the full width is 45 MB of weights), trained in `train()` mode: every
    `BatchNorm2d` normalises with the batch's statistics."""

    def __init__(self, width=8, classes=10):
        super().__init__()
        from torchvision.models.resnet import BasicBlock

        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inp = width
        for i, (planes, stride) in enumerate([(width, 1), (2 * width, 2), (4 * width, 2),
                                              (8 * width, 2)]):
            down = None
            if stride != 1 or inp != planes:
                down = nn.Sequential(nn.Conv2d(inp, planes, 1, stride, bias=False),
                                     nn.BatchNorm2d(planes))
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(inp, planes, stride, down),
                                                         BasicBlock(planes, planes)))
            inp = planes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inp, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18():
    # A batch of 8: layer4 is 1×1, so its BatchNorms normalise over the batch alone, and over
    # 2 examples the gradients blow up (≈700 on conv1) past what float32 can carry.
    return ResNet18(), torch.randn(8, 3, 32, 32)


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=2, n_embd=128, n_head=4, n_positions=64, vocab_size=256,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return Logits(GPT2LMHeadModel(cfg)), torch.randint(0, 256, (BATCH, SEQ))


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=128, intermediate_size=256,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                      max_position_embeddings=64)
    return Logits(LlamaForCausalLM(cfg)), torch.randint(0, 256, (BATCH, SEQ))


def vit():
    from torchvision.models.vision_transformer import VisionTransformer

    m = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64,
                          mlp_dim=128, num_classes=10, dropout=0.0, attention_dropout=0.0)
    return m, torch.randn(BATCH, 3, 32, 32)


def tied():
    return Tied(), torch.randint(0, 64, (BATCH, SEQ))


def save_without_traces(prog, path):
    """Saves an exported program, then drops the per-node Python stack traces (they hold local
    paths and change with every edit of this script); the rest is left as exported."""
    prog.save(path)
    m = onnx.load(path, load_external_data=False)
    for node in m.graph.node:
        keep = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)
    onnx.save(m, path)
    return m


def export(model, x, path, input_name):
    with warnings.catch_warnings():
        # Exporting in training mode is intended for the ResNet (batch statistics).
        warnings.simplefilter("ignore", UserWarning)
        prog = torch.onnx.export(model, (x,), dynamo=True, optimize=False, opset_version=OPSET,
                                 input_names=[input_name], output_names=["logits"])
    m = save_without_traces(prog, path)
    onnx.checker.check_model(path)
    return m


def ce(y, labels):
    return F.cross_entropy(y.reshape(-1, y.shape[-1]), labels.reshape(-1))


def make(name, build, seed):
    torch.manual_seed(seed)
    model, x = build()
    # ResNet trains with batch statistics; the rest have no mode-dependent layers (no dropout).
    model.train(name == "resnet18")
    input_name = "input_ids" if x.dtype == torch.int64 else "x"
    path = os.path.join(HERE, f"{name}.onnx")
    for stale in (path, path + ".data"):
        if os.path.exists(stale):
            os.remove(stale)
    m = export(model, x, path, input_name)
    # The keys `load_state_dict(strict=True)` wants (`cleave export-weights --model` writes them).
    with open(os.path.join(HERE, f"{name}.state_dict.json"), "w") as f:
        json.dump(sorted(model.state_dict().keys()), f, indent=0)
        f.write("\n")
    x_in = x
    if name == "resnet18":
        # PyTorch's float32 BatchNorm in train() mode is itself 3e-5 off its float64 result on
        # this model (batch statistics over as few as 2 values per channel), so the ResNet's
        # references are computed in float64: the exact figures cleave's float32 is held to.
        model, x = model.double(), x.double()
    params = dict(model.named_parameters())
    y = model(x)
    g = torch.Generator().manual_seed(7)
    labels = torch.randint(0, y.shape[-1], y.shape[:-1], generator=g)
    loss = ce(y, labels)
    grads = torch.autograd.grad(loss, list(params.values()))
    ref = {f"in.{input_name}": x_in.numpy(), "labels": labels.numpy().astype(np.int64),
           "loss": loss.detach().numpy()}
    for (pname, _), gr in zip(params.items(), grads):
        ref[f"grad.{pname}"] = gr.numpy()
    # Plain SGD on the same batch.
    losses = []
    for _ in range(STEPS):
        l = ce(model(x), labels)
        losses.append(l.item())
        gs = torch.autograd.grad(l, list(params.values()))
        with torch.no_grad():
            for p, gr in zip(params.values(), gs):
                p -= LR * gr
    with torch.no_grad():
        losses.append(ce(model(x), labels).item())
    ref["sgd_losses"] = np.array(losses, dtype=np.float64)
    ref["sgd_lr"] = np.array(LR, dtype=np.float32)
    ref = {k: np.array(v, order="C") for k, v in ref.items()}
    meta = {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxscript": __import__("onnxscript").__version__,
        "exporter": f"torch.onnx.export(dynamo=True, optimize=False, opset_version={OPSET})",
        "loss": "cross-entropy",
        "lr": str(LR),
        "params": json.dumps(list(params)),
    }
    save_file(ref, os.path.join(HERE, f"{name}.ref.safetensors"), metadata=meta)
    # A small training set for `cleave train` (the model's batch per microbatch): random inputs
    # and labels, int32 indices (cleave's index type).
    rows = x.shape[0] * 8
    g = torch.Generator().manual_seed(8)
    if x.dtype == torch.int64:
        xs = torch.randint(0, int(x.max()) + 1, (rows,) + tuple(x.shape[1:]), generator=g)
        xs = xs.numpy().astype(np.int32)
    else:
        xs = torch.randn((rows,) + tuple(x.shape[1:]), generator=g).numpy().astype(np.float32)
    ys = torch.randint(0, y.shape[-1], (rows,) + tuple(y.shape[1:-1]), generator=g)
    save_file({input_name: xs, "labels": ys.numpy().astype(np.int32)},
              os.path.join(HERE, f"{name}.data.safetensors"))
    inits = [i.name for i in m.graph.initializer]
    print(f"{name}: {len(params)} params, {len(inits)} initializers, "
          f"ops {sorted({n.op_type for n in m.graph.node})}")


class Layer(nn.Module):
    """One transformer layer of a family, alone: hidden states in, hidden states out (LLaMA's
    rotary tables computed inside from constant positions, as the full model does)."""

    def __init__(self, family):
        super().__init__()
        self.family = family
        if family == "gpt2":
            from transformers import GPT2Config
            from transformers.models.gpt2.modeling_gpt2 import GPT2Block

            cfg = GPT2Config(n_embd=64, n_head=4, n_positions=64, resid_pdrop=0.0,
                             embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager")
            self.layer = GPT2Block(cfg, layer_idx=0)
        else:
            from transformers import LlamaConfig
            from transformers.models.llama.modeling_llama import (LlamaDecoderLayer,
                                                                  LlamaRotaryEmbedding)

            cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=64,
                              attn_implementation="eager")
            self.layer = LlamaDecoderLayer(cfg, layer_idx=0)
            self.rotary = LlamaRotaryEmbedding(cfg)

    def forward(self, x):
        t = x.shape[1]
        causal = torch.full((t, t), float("-inf")).triu(1)[None, None]
        if self.family == "gpt2":
            out = self.layer(x, attention_mask=causal)
        else:
            pos = torch.arange(t)[None]
            out = self.layer(x, attention_mask=causal,
                             position_embeddings=self.rotary(x, pos))
        return out[0] if isinstance(out, tuple) else out


def export_layers():
    """`<family>_layer.onnx`: one GPT-2 block and one LLaMA decoder layer (d 64, seq 16,
    batch 1) for `cleave inspect --split` (BENCHMARKS.md)."""
    for family in ("gpt2", "llama"):
        torch.manual_seed(21)
        model = Layer(family).eval()
        x = torch.randn(1, 16, 64)
        export(model, x, os.path.join(HERE, f"{family}_layer.onnx"), "x")
        print(f"{family}_layer: {sum(p.numel() for p in model.parameters())} parameters")


class MergedAndTransposed(nn.Module):
    """Two freshly initialised LayerNorms (equal weights) and Linears on a 3-d input: the
    default `optimize=True` export merges the norms' tensors and stores the weights transposed
    under generated names."""

    def __init__(self):
        super().__init__()
        self.ln1 = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)
        self.ln2 = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.ln2(self.fc(self.ln1(x)))))


class FoldedPositions(nn.Module):
    """A position embedding read at constant positions: `optimize=True` folds the lookup into a
    constant, and the parameter is gone from the file."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Embedding(16, 8)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x + self.pos(torch.arange(x.shape[1])))


def export_optimized():
    """`merged_opt.onnx` (+ reference: MSE against `target`) and `folded_opt.onnx`, both with
    the exporter's default `optimize=True`."""
    for name, build in (("merged_opt", MergedAndTransposed), ("folded_opt", FoldedPositions)):
        torch.manual_seed(5)
        model = build().eval()
        x, target = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
        path = os.path.join(HERE, f"{name}.onnx")
        prog = torch.onnx.export(model, (x,), dynamo=True, optimize=True, opset_version=OPSET,
                                 input_names=["x"], output_names=["y"])
        m = save_without_traces(prog, path)
        params = dict(model.named_parameters())
        loss = F.mse_loss(model(x), target)
        grads = torch.autograd.grad(loss, list(params.values()))
        ref = {"in.x": x.numpy(), "target": target.numpy(), "loss": loss.detach().numpy()}
        for (pname, _), gr in zip(params.items(), grads):
            ref[f"grad.{pname}"] = gr.numpy()
        save_file({k: np.array(v, order="C") for k, v in ref.items()},
                  os.path.join(HERE, f"{name}.ref.safetensors"))
        print(f"{name}: initializers {[i.name for i in m.graph.initializer]}")


def export_legacy():
    """`vit_legacy.onnx` and `resnet18_legacy.onnx`: the same models as `vit.onnx` and
    `resnet18.onnx` (same seeds, so `<m>.ref.safetensors` is their reference too) from the
    TorchScript exporter (`dynamo=False, do_constant_folding=False`; the ResNet with
    `training=TrainingMode.TRAINING`). That exporter deduplicates parameters with equal values
    (the ViT's norms and zero biases) and keeps each dropped name as an `Identity` of the kept
    one. `legacy_folded.onnx`: a LayerNorm/Linear stack from the same exporter with its default
    `do_constant_folding=True`, which stores the Linear weights transposed under generated names
    (`onnx::MatMul_*`): cleave refuses to train it."""
    builds = {"vit": (2, vit), "resnet18": (4, resnet18)}
    for name, (seed, build) in builds.items():
        torch.manual_seed(seed)
        model, x = build()
        model.train(name == "resnet18")
        mode = torch.onnx.TrainingMode.TRAINING if name == "resnet18" else \
            torch.onnx.TrainingMode.EVAL
        path = os.path.join(HERE, f"{name}_legacy.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), path, dynamo=False, do_constant_folding=False,
                              training=mode, opset_version=OPSET, input_names=["x"],
                              output_names=["logits"])
        m = onnx.load(path)
        ids = [n for n in m.graph.node if n.op_type == "Identity"]
        print(f"{name}_legacy: {len(m.graph.initializer)} initializers, {len(ids)} Identity "
              f"nodes, {len(dict(model.named_parameters()))} parameters")
    torch.manual_seed(5)
    model = MergedAndTransposed().eval()
    path = os.path.join(HERE, "legacy_folded.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 4, 8),), path, dynamo=False,
                          opset_version=OPSET, input_names=["x"], output_names=["y"])
    print(f"legacy_folded: initializers {[i.name for i in onnx.load(path).graph.initializer]}")


def check_weights(name, path):
    """By hand: `export_families.py --check-weights gpt2 out.safetensors` loads the weights
    `cleave export-weights CKPT --model gpt2.onnx --safetensors out.safetensors` wrote into a
    fresh PyTorch model with `load_state_dict(strict=True)` and prints the loss on the fixture's
    batch."""
    from safetensors.torch import load_file

    builds = {"gpt2": gpt2, "llama": llama, "vit": vit, "tied": tied, "resnet18": resnet18}
    model, _ = builds[name]()
    model.load_state_dict(load_file(path), strict=True)
    ref = load_file(os.path.join(HERE, f"{name}.ref.safetensors"))
    x = next(v for k, v in ref.items() if k.startswith("in."))
    model.train(name == "resnet18")
    print(f"{name}: loaded strictly; loss on the fixture batch {ce(model(x), ref['labels']).item():.6f}")


def main():
    if sys.argv[1:2] == ["--check-weights"]:
        check_weights(sys.argv[2], sys.argv[3])
        return
    only = set(sys.argv[1:])
    for i, (name, build) in enumerate([("gpt2", gpt2), ("llama", llama), ("vit", vit),
                                       ("tied", tied), ("resnet18", resnet18)]):
        if not only or name in only:
            make(name, build, i)
    if not only or "optimized" in only:
        export_optimized()
    if not only or "layers" in only:
        export_layers()
    if not only or "legacy" in only:
        export_legacy()
    if not only or "loss" in only:
        export_with_loss("loss_inside", two=False)
        export_with_loss("two_scalars", two=True)
    print("torch", torch.__version__, "onnx", onnx.__version__, file=sys.stderr)


if __name__ == "__main__":
    main()
