"""Times one GPT-small training step (forward, backward, SGD update) in PyTorch eager on a GPU.

The baseline for `scripts/gpu-check.sh`: the same shape of model as cleave's tracer builds
(`ir/src/models/gpt.rs`: pre-LayerNorm blocks, GELU MLP of 4·d, tied embeddings, biases, f32,
mean cross-entropy). Defaults are GPT-2 small (12 layers, d 768, 12 heads) at sequence 256,
batch 8, vocabulary 50257. Prints one JSON object.

    python3 benches/baselines/gpt_small_torch.py [--iters 20] [--device cuda]

Method: `warmup` untimed steps, then `iters` steps each timed with CUDA events; the median is
reported. TF32 is off (`torch.backends.cuda.matmul.allow_tf32 = False`) so the products are
full f32, like cuBLAS SGEMM in cleave's CUDA runtime.
"""

import argparse
import json
import statistics

import torch
import torch.nn as nn
import torch.nn.functional as F

p = argparse.ArgumentParser()
p.add_argument("--layers", type=int, default=12)
p.add_argument("--d", type=int, default=768)
p.add_argument("--heads", type=int, default=12)
p.add_argument("--seq", type=int, default=256)
p.add_argument("--batch", type=int, default=8)
p.add_argument("--vocab", type=int, default=50257)
p.add_argument("--iters", type=int, default=20)
p.add_argument("--warmup", type=int, default=5)
p.add_argument("--device", default="cuda")
a = p.parse_args()

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
torch.manual_seed(0)
dev = torch.device(a.device)


class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.h = h
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.h, d // self.h).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / (d // self.h) ** 0.5
        mask = torch.ones(t, t, device=x.device, dtype=torch.bool).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(a.vocab, a.d)
        self.pos = nn.Embedding(a.seq, a.d)
        self.blocks = nn.ModuleList(Block(a.d, a.heads) for _ in range(a.layers))
        self.ln = nn.LayerNorm(a.d)

    def forward(self, tokens):
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for blk in self.blocks:
            x = blk(x)
        return self.ln(x) @ self.tok.weight.t()


model = GPT().to(dev)
opt = torch.optim.SGD(model.parameters(), lr=1e-3)
tokens = torch.randint(0, a.vocab, (a.batch, a.seq), device=dev)
targets = torch.randint(0, a.vocab, (a.batch, a.seq), device=dev)


def step():
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(tokens).view(-1, a.vocab), targets.view(-1))
    loss.backward()
    opt.step()
    return loss


for _ in range(a.warmup):
    step()
times = []
for _ in range(a.iters):
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    loss = step()
    e1.record()
    torch.cuda.synchronize()
    times.append(e0.elapsed_time(e1))
print(json.dumps({
    "figure": "gpt_small_step_torch_eager",
    "device": torch.cuda.get_device_name(),
    "torch": torch.__version__,
    "config": {k: getattr(a, k) for k in ("layers", "d", "heads", "seq", "batch", "vocab")},
    "params": sum(p.numel() for p in model.parameters()),
    "median_ms": statistics.median(times),
    "loss": loss.item(),
}))
