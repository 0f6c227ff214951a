#!/usr/bin/env bash
# Regenerates runner/src/onnx/proto.rs from runner/onnx/onnx.proto.
#
# No protoc is needed: tools/onnx-codegen parses the .proto with protox (pure Rust) and generates
# the types with prost-build. The tool is not a member of the cleave workspace, so its build
# dependencies are compiled only when this script runs.
#
# To move to a newer onnx.proto, copy it from the `onnx` PyPI package first:
#   python3 -m venv /tmp/onnxenv && /tmp/onnxenv/bin/pip install onnx
#   cp /tmp/onnxenv/lib/python3*/site-packages/onnx/onnx.proto runner/onnx/onnx.proto
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cargo run --quiet --manifest-path "$root/tools/onnx-codegen/Cargo.toml" -- \
    "$root/runner/onnx/onnx.proto" "$root/runner/src/onnx/proto.rs"
rustfmt --edition 2021 "$root/runner/src/onnx/proto.rs"
echo "wrote runner/src/onnx/proto.rs"
