"""Where the tests find things: the repository, ../shared, peer tools from Debian."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
ARTIFACTS = REPO / "artifacts"
REQUIRE = os.environ.get("MAMMONODE_REQUIRE_SHARED") == "1"


def need_shared(*parts: str) -> Path:
    """A path under ../shared; skip (or fail under MAMMONODE_REQUIRE_SHARED=1) if absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        message = f"{path} not found: the shared sample data and reference outputs are not next to this checkout"
        if REQUIRE:
            pytest.fail(message + " (MAMMONODE_REQUIRE_SHARED=1)")
        pytest.skip(message)
    return path


def need_tool(name: str) -> str:
    """A Debian-packaged peer tool. /usr/bin first: pynetdicom installs look-alike `storescu`
    and `echoscu` scripts into the virtual environment."""
    found = f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else shutil.which(name)
    if found is None:
        message = f"{name} not installed (Debian package needed; scripts/test.sh installs it)"
        if REQUIRE:
            pytest.fail(message)
        pytest.skip(message)
    return found


def temp_files(storage: Path) -> list[Path]:
    """Files under the storage directory's tmp/ (unfinished writes, STOW-RS and C-STORE
    spools); its sub-folders themselves may stay."""
    tmp = storage / "tmp"
    return sorted(p for p in tmp.rglob("*") if p.is_file()) if tmp.exists() else []
