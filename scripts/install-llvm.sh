#!/usr/bin/env bash
# Installs LLVM/MLIR 22 from Debian's apt sources, as the `mlir` cargo feature (melior 0.27,
# mlir-sys 220) and the `llvm` feature (inkwell 0.10, llvm-sys 221) need it. Idempotent and
# non-interactive: packages already installed are skipped, and nothing is asked. Runs apt-get
# directly as root and through sudo otherwise.
#
# After it, `cargo build --features mlir` finds LLVM through MLIR_SYS_220_PREFIX and
# TABLEGEN_220_PREFIX, and `cargo build --features llvm` through LLVM_SYS_221_PREFIX, which
# .cargo/config.toml sets to /usr/lib/llvm-22.
set -euo pipefail

PACKAGES=(
  llvm-22-dev
  libmlir-22-dev
  mlir-22-tools
  libclang1-22
  libclang-common-22-dev
  libpolly-22-dev
  libzstd-dev
  zlib1g-dev
)
PREFIX=/usr/lib/llvm-22

# shellcheck source=lib/apt.sh
source "$(dirname "$0")/lib/apt.sh"
apt_install install-llvm "${PACKAGES[@]}"

# The checks that melior's build needs: the MLIR C API headers and static libraries, tablegen, and
# llvm-config of the right version.
for f in "$PREFIX/bin/llvm-config" "$PREFIX/bin/mlir-tblgen" "$PREFIX/include/mlir-c/IR.h" \
  "$PREFIX/lib/libMLIRCAPIIR.a"; do
  if [ ! -e "$f" ]; then
    echo "install-llvm: $f is missing after installation" >&2
    exit 1
  fi
done
version="$("$PREFIX/bin/llvm-config" --version)"
case "$version" in
  22.*) echo "install-llvm: LLVM $version at $PREFIX" ;;
  *) echo "install-llvm: expected LLVM 22 at $PREFIX, found $version" >&2; exit 1 ;;
esac
