#!/usr/bin/env bash
# Download the wheels the device check installs on a GPU server that has no network: the
# project's dependencies except PyTorch (the server's own CUDA build is used), and the build
# backend of the editable install, for CPython 3.12 on x86-64 Linux (manylinux, glibc 2.17 or
# 2.28). Run where PyPI is reachable; copy the folder beside the checkout on the server.
#
#   scripts/device-wheels.sh [--split MIB] [DEST]
#       DEST: default $MAMMONODE_WHEELS or device-wheels/ (ignored by git)
#       --split MIB: then spread the wheels over DEST, DEST-2, ... each at most MIB mebibytes
#       (the largest wheel alone may exceed it), for a copy tool with a per-transfer limit;
#       benchmarks/device_check.sh installs from all of them
#   DEVICE_PYTHON_VERSION=3.12         the server's Python (major.minor)
set -euo pipefail
cd "$(dirname "$0")/.."
SPLIT=""
if [ "${1:-}" = "--split" ]; then
    SPLIT=$2
    shift 2
fi
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
if [ -n "$SPLIT" ]; then
    # Largest first, each into the first folder with room (first-fit decreasing).
    "$PYTHON" - "$DEST" "$SPLIT" <<'PY'
import shutil
import sys
from pathlib import Path

dest, limit = Path(sys.argv[1]), int(sys.argv[2]) << 20
for stale in dest.parent.glob(f"{dest.name}-[0-9]*"):
    for wheel in stale.iterdir():
        shutil.move(str(wheel), dest / wheel.name)
    stale.rmdir()
folders = [(dest, 0)]
for wheel in sorted(dest.iterdir(), key=lambda p: p.stat().st_size, reverse=True):
    size = wheel.stat().st_size
    for i, (folder, used) in enumerate(folders):
        if used + size <= limit or used == 0:
            break
    else:
        folders.append((dest.parent / f"{dest.name}-{len(folders) + 1}", 0))
        i = len(folders) - 1
    folder, used = folders[i]
    folder.mkdir(exist_ok=True)
    if folder != dest:
        shutil.move(str(wheel), folder / wheel.name)
    folders[i] = (folder, used + size)
for folder, used in folders:
    print(f"{folder}: {len(list(folder.iterdir()))} wheels, {used / 2**20:.1f} MiB")
PY
fi
