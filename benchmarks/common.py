"""Helpers shared by the benchmark scripts (not part of the package)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

from mammonode.demo.loopback import free_port, wait_port  # noqa: E402,F401  (re-exported)


def tool(name: str) -> str:
    path = f"/usr/bin/{name}"
    if not os.access(path, os.X_OK):
        sys.exit(f"{name} not found: install DCMTK (apt-get install dcmtk)")
    return path


def make_exams(target: Path, count: int, pngs: Path | None = None, key: str = "bench") -> list[list[Path]]:
    """``count`` distinct four-view studies (../shared/tools/mgdicom.py --key) from the density
    exam PNGs (or the grey PNGs in ``pngs``, named by view), the right views stored mirrored
    as in the original PNGs, with Patient Orientation saying so."""
    pngs = pngs or SHARED / "samples" / "png" / "density-exam"
    exams = []
    for i in range(count):
        folder = target / f"{key}{i:03d}"
        if not folder.exists():
            views = []
            for view in ("L-CC", "R-CC", "L-MLO", "R-MLO"):
                views += ["--view", f"{view}={pngs / (view + '.png')}"]
            command = [
                sys.executable,
                str(SHARED / "tools" / "mgdicom.py"),
                str(folder),
                *views,
                "--bits-from-8",
                "--key",
                f"{key}-{i}",
                "--patient-id",
                f"{key.upper()}{i:04d}",
                "--mirror",
                "R-CC",
                "--mirror",
                "R-MLO",
            ]
            subprocess.run(command, check=True, capture_output=True)
        exams.append(sorted(folder.glob("*.dcm")))
    return exams


def write_config(path: Path, port: int, storage: Path, extra: str = "") -> Path:
    path.write_text(f"""[node]
host = "127.0.0.1"
port = {port}
max_associations = 64
[storage]
directory = "{storage}"
[study]
quiet_period_s = 3600
[worker]
enabled = false
[logging]
level = "WARNING"
{extra}
""")
    return path
