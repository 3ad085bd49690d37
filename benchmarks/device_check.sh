#!/usr/bin/env bash
# The device check on a fresh GPU server without network (benchmarks/device_check.py says what
# it measures). Installs mammonode into a virtual environment that sees the server's own CUDA
# build of PyTorch (--system-site-packages; torch is pinned to that build, never replaced)
# from the wheels scripts/device-wheels.sh downloaded, then runs the check.
#
#   benchmarks/device_check.sh OUT_DIR [device_check.py options: --device cuda:K, --exams N,
#                                       --time-budget-s S, --quick]
#   OUT_DIR may instead come from $MAMMONODE_CHECK_OUT. Wheels: $MAMMONODE_WHEELS (default
#   device-wheels/, and device-wheels-2/, ... when split); environment: $MAMMONODE_CHECK_VENV (default .venv-device/); the server's
#   Python: $PYTHON (default python3). ../shared (samples, weights, references) must be beside
#   the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
    OUT=$1
    shift
else
    OUT=${MAMMONODE_CHECK_OUT:-}
fi
fail() { echo "device_check.sh: $1" >&2; exit 2; }
[ -n "$OUT" ] || fail "give the output folder as the first argument or MAMMONODE_CHECK_OUT"
WHEELS=${MAMMONODE_WHEELS:-device-wheels}
VENV=${MAMMONODE_CHECK_VENV:-.venv-device}
PYTHON=${PYTHON:-python3}
[ -d "$WHEELS" ] || fail "no wheels in $WHEELS: run scripts/device-wheels.sh where PyPI is reachable and copy the folder here"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -c 'import torch' 2>/dev/null ||
        fail "$PYTHON cannot import torch: install the server's CUDA build of PyTorch first (or set PYTHON)"
    "$PYTHON" -m venv --system-site-packages "$VENV"
fi
# An existing environment (MAMMONODE_CHECK_VENV: one that already holds PyTorch) is used as is.
TORCH=$("$VENV/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null) ||
    fail "$VENV cannot import torch (a virtual environment's PyTorch is not a system package: set MAMMONODE_CHECK_VENV to it)"
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$TORCH" >"$constraints"
# The wheels may be split over $WHEELS, $WHEELS-2, ... (device-wheels.sh --split: a copy tool
# that carries 64 MiB per call brings them in several calls).
links=()
for folder in "$WHEELS" "$WHEELS"-[0-9]*; do
    [ -d "$folder" ] && links+=(--find-links "$folder")
done
"$VENV/bin/python" -m pip install --quiet --no-index "${links[@]}" --constraint "$constraints" -e .
mkdir -p "$OUT"
exec "$VENV/bin/python" benchmarks/device_check.py --out "$OUT" "$@"
