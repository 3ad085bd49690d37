"""Loopback helpers shared by the demo, the tests and the benchmarks."""

from __future__ import annotations

import random
import socket
import threading
import time
from pathlib import Path

_handed_out: set[int] = set()
_lock = threading.Lock()


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux; a common default elsewhere)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A TCP port nothing listens on right now, never handed out before by this process.

    Chosen below the kernel's ephemeral range: a port the kernel picked for bind(0) can be
    taken by any outgoing connection before the server that was meant to get it binds it
    (a node once failed to start in CI that way)."""
    low, high = _ephemeral_range()
    below, above = range(max(1024, low - 20000), low), range(high + 1, 65536)
    candidates = below if len(below) >= len(above) else above
    with _lock:
        for _ in range(200 if candidates else 0):
            port = random.choice(candidates)
            if port in _handed_out:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
    raise OSError(f"no free TCP port on 127.0.0.1 outside the ephemeral range {low}-{high}")


def wait_port(port: int, timeout: float = 30.0) -> None:
    """Block until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on port {port}")
