#!/usr/bin/env bash
# Create .venv with the pinned CPU build of PyTorch and mammonode (editable) with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first and pinned: this exact version is a CPU wheel; a newer one pulls several GB of CUDA.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test,postgres]"
echo "mammonode installed in $(pwd)/.venv"
