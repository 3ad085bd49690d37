"""The throughput part of the device check: one ``mammonode worker`` draining a queue.

N copies of the density exam (new study, series and instance UIDs, so each is its own study)
are ingested into a temporary SQLite node with ``ingest.store.ingest`` (the path C-STORE and
STOW-RS take), queued in one assembler tick, and drained by a real ``mammonode worker``
process on the device under test. Measured: exams/hour (steady state, first job start to
last job end, and with the worker's start-up), the mean per-stage seconds the jobs recorded,
GPU utilisation and memory sampled by ``nvidia-smi`` beside it (on CUDA), and the worker's
peak RSS and CPU seconds.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from common import REPO, SHARED

EXAM = SHARED / "samples" / "dicom" / "density-exam"


def node_config(work: Path, weights: Path, device: str, quick: bool) -> Path:
    """A worker-only node on SQLite; quick: the cheapest model alone, so two jobs take seconds
    on a CPU. Otherwise the node's defaults (the exam's four models, 10 epochs, fp32)."""
    pipeline = 'models = ["density_histogram"]\n' if quick else ""
    path = work / "config.toml"
    path.write_text(f"""[storage]
directory = "{work / "storage"}"
[pipeline]
device = "{device}"
weights_dir = "{weights}"
{pipeline}[worker]
poll_interval_s = 0.2
[logging]
level = "INFO"
""")
    return path


def ingest_copies(cfg, db, count: int, spool: Path) -> list[str]:
    """``count`` copies of the density exam, each a new study, ingested and queued."""
    import pydicom
    from pydicom.uid import generate_uid

    from mammonode.db.assembly import tick
    from mammonode.ingest.store import ingest

    sources = sorted(EXAM.glob("*.dcm"))
    spool.mkdir(parents=True, exist_ok=True)
    studies = []
    for i in range(count):
        study_uid, series = generate_uid(), {}
        for source in sources:
            ds = pydicom.dcmread(source)
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series.setdefault(ds.SeriesInstanceUID, generate_uid())
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.PatientID = f"DEVCHECK{i:04d}"
            ds.AccessionNumber = f"DC{i:06d}"
            target = spool / f"{i:04d}-{source.name}"
            ds.save_as(target, enforce_file_format=True)
            ingest(target, cfg.storage_dir, db)
            target.unlink()
        studies.append(study_uid)
    with db.session() as session:
        queued = tick(session, quiet_period_s=0.0, incomplete_timeout_s=1e9).queued
    if sorted(queued) != sorted(studies):
        raise RuntimeError(f"{len(queued)} of {count} studies were queued")
    return studies


class GpuSampler:
    """``nvidia-smi`` sampling one GPU's utilisation and memory every ``interval_ms``."""

    def __init__(self, index: int, interval_ms: int = 500):
        self.samples: list[tuple[float, float]] = []  # (utilisation %, memory used MiB)
        self.error: str | None = None
        self.proc: subprocess.Popen | None = None
        smi = shutil.which("nvidia-smi")
        if smi is None:
            self.error = "nvidia-smi not found"
            return
        query = "--query-gpu=utilization.gpu,memory.used"
        command = [smi, f"--id={index}", query, "--format=csv,noheader,nounits", f"--loop-ms={interval_ms}"]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                util, used = (float(x) for x in line.split(","))
            except ValueError:
                continue
            self.samples.append((util, used))

    def stop(self) -> dict:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.reader.join(timeout=5)
        if not self.samples:
            return {"error": self.error or "no samples"}
        utils = [u for u, _ in self.samples]
        return {
            "samples": len(utils),
            "utilisation_mean_pct": statistics.fmean(utils),
            "utilisation_median_pct": statistics.median(utils),
            "utilisation_max_pct": max(utils),
            "memory_used_peak_mib": max(m for _, m in self.samples),
        }


def gpu_memory_used(index: int) -> float | None:
    """The GPU's memory in use now (MiB), before the worker starts: the baseline."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    proc = subprocess.run(
        [smi, f"--id={index}", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
    )
    try:
        return float(proc.stdout.strip())
    except ValueError:
        return None


def process_usage(pid: int) -> dict:
    """Peak RSS and CPU seconds of a live process, from /proc."""
    usage = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                usage["peak_rss_mb"] = int(line.split()[1]) / 1024
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        usage["cpu_s"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        pass
    return usage


def _job_rows(db) -> list:
    from sqlalchemy import select

    from mammonode.db.models import Job

    with db.session() as session:
        return [
            (j.state, j.started_at, j.finished_at, j.timings or {}, j.last_error)
            for j in session.execute(select(Job)).scalars()
        ]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_throughput(device: str, exams: int, quick: bool, weights: Path, work: Path, out: Path, deadline: float) -> dict:
    """Drain ``exams`` queued exams with one worker process; stop at ``deadline`` (monotonic)."""
    from mammonode.config import load_config
    from mammonode.db import open_database
    from mammonode.db.models import JobState

    work.mkdir(parents=True, exist_ok=True)
    config = node_config(work, weights, device, quick)
    cfg = load_config(config)
    db = open_database(cfg)
    start = time.perf_counter()
    ingest_copies(cfg, db, exams, work / "spool")
    report: dict = {"requested": exams, "ingest_s": time.perf_counter() - start}
    report["models"] = cfg.pipeline.models or ["image_only", "image_heatmaps", "density_histogram", "density_cnn"]
    report["epochs"] = cfg.pipeline.epochs if cfg.pipeline.augmentation else 1  # of the cancer models
    report["precision"] = cfg.pipeline.precision
    cuda = device.startswith("cuda")
    index = int(device.split(":")[1]) if ":" in device else 0
    baseline = gpu_memory_used(index) if cuda else None
    sampler = GpuSampler(index) if cuda else None
    log = (out / "worker.log").open("w")
    launched = datetime.now(UTC)
    command = [sys.executable, "-m", "mammonode.cli", "worker", "--config", str(config), "--device", device]
    proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    finished, timed_out, usage = 0, False, {}
    try:
        while True:
            rows = _job_rows(db)
            finished = sum(r[0] in (JobState.DONE, JobState.FAILED) for r in rows)
            if finished >= exams or proc.poll() is not None:
                break
            if time.monotonic() > deadline:
                timed_out = True
                break
            usage = process_usage(proc.pid) or usage
            time.sleep(0.5)
        usage = process_usage(proc.pid) or usage
    finally:
        _stop(proc)
        log.close()
        gpu = sampler.stop() if sampler else None
    rows = _job_rows(db)
    done = [r for r in rows if r[0] == JobState.DONE]
    failed = [r for r in rows if r[0] == JobState.FAILED]
    report.update(drained=len(done), failed=len(failed), timed_out=timed_out, worker=usage)
    if proc.returncode not in (0, -signal.SIGTERM) and finished < exams:
        report["worker_exit"] = proc.returncode
    if failed:
        report["first_error"] = failed[0][4]
    if done:
        first = min(r[1] for r in done)
        last = max(r[2] for r in done)
        steady = (last - first).total_seconds()
        report["worker_startup_s"] = (first - launched).total_seconds()
        report["drain_s"] = steady
        report["exams_per_hour"] = len(done) / steady * 3600 if steady > 0 else None
        report["exams_per_hour_with_startup"] = len(done) / (last - launched).total_seconds() * 3600
        stages = sorted({k for r in done for k in r[3]})
        report["mean_stage_s"] = {k: statistics.fmean(r[3].get(k, 0.0) for r in done) for k in stages}
    if gpu is not None:
        if baseline is not None and "memory_used_peak_mib" in gpu:
            gpu["memory_used_before_mib"] = baseline
            gpu["worker_peak_mib"] = gpu["memory_used_peak_mib"] - baseline
        report["gpu"] = gpu
    report["ok"] = len(done) == exams
    db.engine.dispose()
    return report
