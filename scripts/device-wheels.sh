#!/usr/bin/env bash
# Download the wheels the device check installs on a GPU server that has no network: the
# project's dependencies except PyTorch (the server's own CUDA build is used), and the build
# backend of the editable install, for CPython 3.12 on x86-64 Linux (manylinux, glibc 2.17 or
# 2.28). Run where PyPI is reachable; copy the folder beside the checkout on the server.
#
#   scripts/device-wheels.sh [DEST]    DEST: default $MAMMONODE_WHEELS or device-wheels/ (ignored by git)
#   DEVICE_PYTHON_VERSION=3.12         the server's Python (major.minor)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-${MAMMONODE_WHEELS:-device-wheels}}
PYVER=${DEVICE_PYTHON_VERSION:-3.12}
ABI="cp${PYVER/./}"
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
requirements=$(mktemp)
trap 'rm -f "$requirements"' EXIT
# pyproject.toml's dependencies and build requirements, torch left out; editables for hatchling's
# editable wheels.
"$PYTHON" - >"$requirements" <<'PY'
import re
import tomllib

with open("pyproject.toml", "rb") as fh:
    project = tomllib.load(fh)
for requirement in project["project"]["dependencies"] + project["build-system"]["requires"] + ["editables"]:
    if re.split(r"[\s<>=!~\[;]", requirement, maxsplit=1)[0].lower() != "torch":
        print(requirement)
PY
mkdir -p "$DEST"
"$PYTHON" -m pip download --quiet --dest "$DEST" --requirement "$requirements" \
    --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --abi "$ABI" --abi abi3 --abi none \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64
if ls "$DEST" | grep -qi '^torch-'; then
    echo "device-wheels.sh: a torch wheel was pulled in by a dependency; remove it before copying" >&2
    exit 1
fi
echo "$(ls "$DEST" | wc -l) wheels ($(du -sh "$DEST" | cut -f1)) in $DEST for CPython $PYVER, x86-64 Linux"
