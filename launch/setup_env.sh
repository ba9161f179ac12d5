#!/usr/bin/env bash
# Create .venv with everything the project, its tests and its demo need.
# torch==2.13.0 goes first: on the project's machines that exact version is a CPU build on local disk,
# while any other torch spec would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Already set up (this checkout installed, the test and demo dependencies importable): nothing to do.
ROOT=$PWD
if [ -z "${FORCE_SETUP:-}" ] && [ -x .venv/bin/python ] && (cd / && "$ROOT/.venv/bin/python" - "$ROOT" <<'PYEOF') 2>/dev/null
import os, sys  # run from / so that mora_dist must come from the install, not the working directory
import torch, megatron.core, pytest, transformers, peft, ray, sentencepiece, triton, mora_dist
sys.exit(os.path.dirname(os.path.dirname(os.path.realpath(mora_dist.__file__))) != os.path.realpath(sys.argv[1]))
PYEOF
then
    echo "setup ok: .venv is ready (FORCE_SETUP=1 reinstalls)"
    exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[dev,ray]"
.venv/bin/python -c "import torch, megatron.core; print('setup ok: torch', torch.__version__, 'megatron-core', megatron.core.__version__)"
