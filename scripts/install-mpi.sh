#!/usr/bin/env bash
# Installs Open MPI from Debian's apt sources for the `mpi` cargo feature (rsmpi links the system
# MPI library; its bindings are generated with libclang, which scripts/install-llvm.sh also
# installs). Idempotent and non-interactive, like install-llvm.sh.
#
# After it: `cargo build --release --features mpi`, then
# `mpirun -np P target/release/cleave train MODEL --stages P …` (as root, Open MPI also wants
# `--allow-run-as-root`; `--oversubscribe` runs more ranks than cores).
set -euo pipefail
# shellcheck source=lib/apt.sh
source "$(dirname "$0")/lib/apt.sh"
apt_install install-mpi libopenmpi-dev openmpi-bin libclang1-22 libclang-common-22-dev
command -v mpirun >/dev/null || { echo "install-mpi: mpirun is missing after installation" >&2; exit 1; }
echo "install-mpi: $(mpirun --version | head -1)"
