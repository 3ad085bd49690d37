"""README's first command ends in `mammonode demo`: it must work as a user runs it."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from support.node import cli
from support.paths import need_shared

pytestmark = pytest.mark.network


def test_demo_runs_the_shared_exam_and_cleans_up(tmp_path):
    need_shared("samples", "dicom", "density-exam")
    result = cli("demo", timeout=600, env={"MAMMONODE_WEIGHTS_DIR": str(tmp_path / "none")}, cwd=tmp_path)
    out = result.stdout
    assert out.count("TEST WEIGHTS - NOT FOR CLINICAL USE") == 2, out  # said once up front, once at the end
    assert "shared seeded test weights" in out
    assert "C-STORE statuses: 0x0000, 0x0000, 0x0000, 0x0000" in out
    assert "the demo PACS received" in out and "next steps:" in out
    line = next(line for line in out.splitlines() if line.startswith("demo directory: "))
    demo_dir = Path(line.removeprefix("demo directory: ").split(" (")[0])
    assert not demo_dir.exists(), "the demo directory is removed without --keep"
    summary = tmp_path / "mammonode-demo-summary.png"
    assert f"summary image: {summary}" in out
    with Image.open(summary) as image:
        assert image.size == (1920, 1080)
