"""Headless Chromium screenshots of our pages (the Debian `chromium` package)."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from support.paths import need_tool


def screenshot(url: str, shot: Path, width: int, height: int) -> None:
    """Draw ``url`` at ``width`` x ``height`` into ``shot`` (PNG), in a throwaway profile;
    the test fails with Chromium's own error when no image comes out."""
    chromium = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if os.path.exists(p)), None)
    if chromium is None:
        chromium = need_tool("chromium")
    shot.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        run = subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                f"--screenshot={shot}",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert shot.exists(), run.stderr[-2000:]
