"""Converts scikit-learn's bundled 8x8 handwritten digits to safetensors for cleave.

scikit-learn ships the data set inside the package (UCI ML hand-written digits, 1,797 images of
8x8 pixels with values 0..16), so nothing is downloaded. Run it in a scratch virtualenv:

    python -m venv /tmp/venv && /tmp/venv/bin/pip install scikit-learn safetensors numpy
    /tmp/venv/bin/python examples/data/make_digits.py

It writes examples/data/digits.safetensors with
  x:      f32[1797, 64]  pixel values scaled to [0, 1] (divided by 16)
  labels: i32[1797]      the digit, 0..9
in the data set's own order (no shuffling; split or shuffle in the consumer), and
examples/data/digits-images.safetensors with the same pixels as images, x: f32[1797, 1, 8, 8]
(for examples/cnn-tiny.cir).
"""

import pathlib

import numpy as np
from safetensors.numpy import save_file
from sklearn.datasets import load_digits

digits = load_digits()
x = (digits.data / 16.0).astype(np.float32)
labels = digits.target.astype(np.int32)
out = pathlib.Path(__file__).with_name("digits.safetensors")
save_file({"x": x, "labels": labels}, str(out))
print(f"wrote {out}: x {x.shape}, labels {labels.shape}, classes {np.bincount(labels).tolist()}")
images = pathlib.Path(__file__).with_name("digits-images.safetensors")
save_file({"x": x.reshape(-1, 1, 8, 8), "labels": labels}, str(images))
print(f"wrote {images}: x {x.reshape(-1, 1, 8, 8).shape}")
