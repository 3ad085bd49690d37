"""Shared fixtures: the ../shared data, peer tools, and a node running as a real process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mammonode.netutil import free_port, wait_port  # noqa: F401  (re-exported to the tests)
from mammonode.views import VIEWS

REPO = Path(__file__).resolve().parents[1]
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


@pytest.fixture(scope="session")
def reference() -> dict:
    return json.loads(need_shared("reference", "reference.json").read_text())


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


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
    *args: str, config: Path | None = None, check: bool = True, timeout: float = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mammonode.cli", *args]
    if config is not None:
        command += ["--config", str(config)]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})}
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


@pytest.fixture
def node_factory(tmp_path):
    nodes: list[NodeProcess] = []

    def make(**kwargs) -> NodeProcess:
        node = NodeProcess(tmp_path / f"node{len(nodes)}", **kwargs)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.stop(timeout=20)


def storescu(
    port: int, files: list[Path], *extra: str, calling: str = "STORESCU", called: str = "MAMMONODE", check: bool = True
) -> subprocess.CompletedProcess:
    command = [
        need_tool("storescu"),
        "-v",
        "-aet",
        calling,
        "-aec",
        called,
        *extra,
        "127.0.0.1",
        str(port),
        *map(str, files),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"storescu failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def send_datasets(port: int, datasets, calling: str = "TESTSCU", timeout: float = 60) -> list[int | None]:
    """C-STORE each data set over one pynetdicom association; the statuses (None: no answer)."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.dimse_timeout = timeout
    for sop in {str(ds.SOPClassUID) for ds in datasets}:
        ae.add_requested_context(sop, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="MAMMONODE")
    assert assoc.is_established
    out = []
    for ds in datasets:
        status = assoc.send_c_store(ds)
        out.append(int(status.Status) if status is not None and "Status" in status else None)
    assoc.release()
    return out


@pytest.fixture(scope="session")
def test_weights_dir(tmp_path_factory) -> Path:
    """The shared seed-0 test weights plus the official histogram model, in one directory."""
    target = tmp_path_factory.mktemp("weights")
    for f in need_shared("weights", "test").iterdir():
        shutil.copy(f, target / f.name)
    shutil.copy(need_shared("weights", "official", "density_histogram_model.p"), target)
    return target


def density_dicoms() -> list[Path]:
    return sorted(need_shared("samples", "dicom", "density-exam").glob("*.dcm"))


def density_png_args() -> list[str]:
    """The density exam PNGs store every view facing right: the right views are mirrored."""
    folder = need_shared("samples", "png", "density-exam")
    args = []
    for view in VIEWS:
        args += ["--png", f"{view}={folder / (view + '.png')}"]
    return args + ["--png-mirrored", "R-CC", "--png-mirrored", "R-MLO"]


def _predict(tmp: Path, weights: Path, inputs: list[str], extra: list[str] = ()) -> dict:
    heatmaps = tmp / "heatmaps"
    out = cli(
        "predict",
        *inputs,
        "--weights-dir",
        str(weights),
        "--device",
        "cpu",
        "--heatmaps-out",
        str(heatmaps),
        *extra,
        "--json",
        timeout=1800,
    )
    data = json.loads(out.stdout)
    data["_heatmaps_dir"] = str(heatmaps)
    return data


@pytest.fixture(scope="session")
def dicom_run(tmp_path_factory, test_weights_dir) -> dict:
    tmp = tmp_path_factory.mktemp("predict-dicom")
    return _predict(
        tmp, test_weights_dir, [str(p) for p in density_dicoms()], ["--results-out", str(tmp / "results")]
    ) | {"_results_dir": str(tmp / "results")}


@pytest.fixture(scope="session")
def png_run(tmp_path_factory, test_weights_dir) -> dict:
    return _predict(tmp_path_factory.mktemp("predict-png"), test_weights_dir, density_png_args())
