"""Helpers shared by the benchmark scripts (not part of the package)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(port)


def tool(name: str) -> str:
    path = f"/usr/bin/{name}"
    if not os.access(path, os.X_OK):
        sys.exit(f"{name} not found: install DCMTK (apt-get install dcmtk)")
    return path


def make_exams(target: Path, count: int) -> list[list[Path]]:
    """``count`` copies of the density exam with distinct UIDs (../shared/tools/mgdicom.py)."""
    pngs = SHARED / "samples" / "png" / "density-exam"
    exams = []
    for i in range(count):
        folder = target / f"exam{i:03d}"
        if not folder.exists():
            views = []
            for view in ("L-CC", "R-CC", "L-MLO", "R-MLO"):
                views += ["--view", f"{view}={pngs / (view + '.png')}"]
            subprocess.run(
                [
                    sys.executable,
                    str(SHARED / "tools" / "mgdicom.py"),
                    str(folder),
                    *views,
                    "--bits-from-8",
                    "--key",
                    f"bench-{i}",
                    "--patient-id",
                    f"BENCH{i:04d}",
                ],
                check=True,
                capture_output=True,
            )
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
