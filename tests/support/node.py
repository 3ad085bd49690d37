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


def write_config(
    path: Path,
    sections: dict,
    destinations: list[dict] | None = None,
    notify: list[dict] | None = None,
    rules: list[dict] | None = None,
) -> Path:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    for dest in destinations or []:
        lines.append("[[destinations]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in dest.items()]
    for hook in notify or []:
        lines.append("[[notify]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in hook.items()]
    for rule in rules or []:
        lines.append("[[rules]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in rule.items()]
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
        notify: list[dict] | None = None,
        rules: list[dict] | None = None,
        audit: dict | None = None,
    ):
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.web_port = free_port()
        self.storage = storage or tmp / "storage"
        self.log_path = tmp / "node.log"
        sections = {
            "node": {"ae_title": "MAMMONODE", "host": "127.0.0.1", "port": self.port, **(node or {})},
            "dicomweb": {
                "enabled": True,
                "host": "127.0.0.1",
                "port": self.web_port,
                # Tests without a token reach the HTTP side anonymously, which must be said explicitly.
                "allow_anonymous": not (dicomweb or {}).get("token"),
                **(dicomweb or {}),
            },
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
        if audit is not None:
            sections["audit"] = audit
        self.config = write_config(tmp / "config.toml", sections, destinations, notify, rules)
        self.config.chmod(0o600)  # as an operator keeps a file that may hold tokens
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
            try:
                wait_port(self.port, timeout=60)
                wait_port(self.web_port, timeout=60)
            except TimeoutError as exc:
                # A node that never listened is not left running behind a failed fixture.
                self.kill()
                raise TimeoutError(f"{exc}; node log tail:\n{self.log()[-3000:]}") from None
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


def wait_for(condition, timeout: float, step: float = 0.1):
    """Poll ``condition`` until it returns something true or ``timeout`` passes; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    return condition()
