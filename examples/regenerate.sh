#!/usr/bin/env bash
# Regenerates the bundled example models with `cleave new-model`.
# tests/tests/examples.rs reads the `new-model` lines below and checks that every example file is
# exactly what the current code generates, so the examples cannot drift from the builders.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run -q --release -- new-model mlp --sizes 784,256,256,10 --batch 64 -o examples/mlp.cir
cargo run -q --release -- new-model gpt --vocab 64 --d-model 64 --heads 4 --layers 2 --seq 16 --batch 8 -o examples/gpt-tiny.cir
cargo run -q --release -- new-model cnn --batch 16 --in-channels 1 --image 8 --classes 10 -o examples/cnn-tiny.cir
cargo run -q --release -- new-model mlp --sizes 64,128,10 --batch 32 -o examples/mlp-digits.cir
cargo run -q --release -- new-model gpt-layer --d-model 64 --heads 2 --seq 16 --batch 8 --loss mse --labels target -o examples/gpt-block.cir
cargo run -q --release -- new-model gpt --vocab 256 --d-model 256 --heads 4 --layers 4 --seq 128 --batch 8 -o examples/gpt-4l.cir
