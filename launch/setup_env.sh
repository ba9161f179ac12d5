#!/usr/bin/env bash
# Create .venv with everything the project, its tests and its demo need.
# torch==2.13.0 goes first: on the project's machines that exact version is a CPU build on local disk,
# while any other torch spec would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[dev,ray]"
.venv/bin/python -c "import torch, megatron.core; print('setup ok: torch', torch.__version__, 'megatron-core', megatron.core.__version__)"
