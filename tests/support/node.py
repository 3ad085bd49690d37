"""The node under test as a real process, its config file, and its CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mammonode.demo.loopback import free_port, wait_port
from support.paths import REPO


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(value)


def write_config(path: Path, sections: dict, destinations: list[dict] | None = None) -> Path:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    for dest in destinations or []:
        lines.append("[[destinations]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in dest.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def cli(
    *args: str,
    config: Path | None = None,
    check: bool = True,
    timeout: float = 600,
    env: dict | None = None,
    cwd: Path = REPO,
) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mammonode.cli", *args]
    if config is not None:
        command += ["--config", str(config)]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, cwd=cwd, env={**os.environ, **(env or {})}
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def cli_json(*args: str, config: Path | None = None):
    return json.loads(cli(*args, "--json", config=config).stdout)


class NodeProcess:
    """`mammonode serve` in its own process, logging to a file."""

    def __init__(
        self,
        tmp: Path,
        weights_dir: Path | None = None,
        node: dict | None = None,
        study: dict | None = None,
        worker: dict | None = None,
        pipeline: dict | None = None,
        destinations: list[dict] | None = None,
        storage: Path | None = None,
        database_url: str = "",
        delivery: dict | None = None,
        dicomweb: dict | None = None,
    ):
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.web_port = free_port()
        self.storage = storage or tmp / "storage"
        self.log_path = tmp / "node.log"
        sections = {
            "node": {"ae_title": "MAMMONODE", "host": "127.0.0.1", "port": self.port, **(node or {})},
            "dicomweb": {"host": "127.0.0.1", "port": self.web_port, **(dicomweb or {})},
            "storage": {"directory": str(self.storage)},
            "database": {"url": database_url},
            "study": {"quiet_period_s": 1.0, "incomplete_timeout_s": 600.0, **(study or {})},
            "pipeline": {
                "weights_dir": str(weights_dir or tmp / "no-weights"),
                "models": ["image_only"],
                **(pipeline or {}),
            },
            "worker": {
                "enabled": True,
                "poll_interval_s": 0.5,
                "heartbeat_interval_s": 1.0,
                "stale_after_s": 5.0,
                **(worker or {}),
            },
            "delivery": {"poll_interval_s": 0.5, "backoff_initial_s": 1.0, "backoff_max_s": 2.0, **(delivery or {})},
            "logging": {"level": "INFO", "json": True},
        }
        self.config = write_config(tmp / "config.toml", sections, destinations)
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> NodeProcess:
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mammonode.cli", "serve", "--config", str(self.config)],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        if wait:
            wait_port(self.port)
            wait_port(self.web_port)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def studies(self) -> list[dict]:
        return cli_json("studies", config=self.config)

    def status(self) -> dict:
        return cli_json("status", config=self.config)

    def study(self, uid: str) -> dict:
        return cli_json("study", uid, config=self.config)

    def wait_for(self, predicate, timeout: float = 120, interval: float = 0.5, what: str = "condition"):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = predicate()
            if last:
                return last
            time.sleep(interval)
        raise TimeoutError(f"timed out waiting for {what}; node log tail:\n{self.log()[-3000:]}")
