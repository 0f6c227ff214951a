#!/usr/bin/env python3
"""Writes examples/data/modadd.safetensors: a synthetic modular-addition task for gpt-tiny.

Vocabulary (gpt-tiny has 64 tokens): 0..30 are the numbers mod P = 31, 31 is "=".
Each sequence packs problems "a b = c" with c = (a + b) mod 31, four tokens each, drawn
uniformly (seeded, so the file is reproducible). `tokens` is a 17-token stream without its
last token and `targets` the same stream shifted by one (next-token prediction):
tokens i32[1024,16], targets i32[1024,16].

Only some targets are predictable: after `b` comes "=" (always), after "=" comes c (learnable),
after `a` and after `c` come fresh random numbers. Token accuracy is therefore at most
1/2 + (1/2)(1/31), about 51.6%; 50% means the model has learned the format and the sums.

No dependencies: the safetensors file is written by hand (8-byte header length, JSON header,
little-endian data).
"""
import json
import random
import struct
from pathlib import Path

P = 31
EQ = 31
N = 1024
SEQ = 16


def main():
    rng = random.Random(0)
    tokens, targets = [], []
    for _ in range(N):
        stream = []
        while len(stream) < SEQ + 1:
            a, b = rng.randrange(P), rng.randrange(P)
            stream += [a, b, EQ, (a + b) % P]
        stream = stream[: SEQ + 1]
        tokens += stream[:SEQ]
        targets += stream[1 : SEQ + 1]
    blobs = [("targets", targets), ("tokens", tokens)]
    header, data, off = {}, b"", 0
    for name, vals in blobs:
        raw = struct.pack(f"<{len(vals)}i", *vals)
        header[name] = {"dtype": "I32", "shape": [N, SEQ], "data_offsets": [off, off + len(raw)]}
        data += raw
        off += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    out = Path(__file__).with_name("modadd.safetensors")
    out.write_bytes(struct.pack("<Q", len(h)) + h + data)
    print(f"wrote {out} ({N} sequences of {SEQ} tokens)")


if __name__ == "__main__":
    main()
