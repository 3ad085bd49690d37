"""A throw-away PostgreSQL server (Debian's binaries) on a private port and data directory."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from mammonode.demo.loopback import free_port
from support.paths import REQUIRE


def _bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


class PostgresServer:
    def __init__(self):
        bindir = _bindir()
        if bindir is None:
            message = "PostgreSQL server binaries not installed (Debian package postgresql)"
            if REQUIRE:
                pytest.fail(message)
            pytest.skip(message)
        self.bindir = bindir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="mammonode-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root / "sock"
        self.user = None
        if os.geteuid() == 0:  # postgres refuses to run as root
            self.user = "postgres"
            shutil.chown(self.root, "postgres")

    def _run(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        command = list(args)
        if self.user:
            command = ["runuser", "-u", self.user, "--", *command]
        return subprocess.run(command, check=True, capture_output=True, text=True, **kwargs)

    def start(self) -> PostgresServer:
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "mammonode",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        self._run("mkdir", "-p", str(self.socket_dir))
        options = (
            f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1 -c max_connections=200 "
            "-c fsync=on -c synchronous_commit=on"
        )
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.root / "log"),
            "-w",
            "start",
            timeout=60,
        )
        self._run(
            str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "mammonode", "mammonode"
        )
        return self

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://mammonode@127.0.0.1:{self.port}/mammonode"

    def stop(self) -> None:
        try:
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop", timeout=60)
        except subprocess.CalledProcessError:
            pass
        time.sleep(0.2)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def postgres():
    server = PostgresServer().start()
    yield server
    server.stop()
