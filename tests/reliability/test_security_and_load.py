"""Security (TLS, mutual TLS) and load (8 concurrent senders, association limit, memory)."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from common import make_exams  # noqa: E402  (the benchmarks make their studies the same way)
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from support.paths import need_shared, need_tool, temp_files
from support.pki import make_pki, tls_node_settings

pytestmark = pytest.mark.network


def test_dimse_over_mutual_tls_with_dcmtk(node_factory, tmp_path):
    pki = make_pki(tmp_path / "pki")
    node = node_factory(
        worker={"enabled": False},
        node=tls_node_settings(pki),
    ).start()
    files = sorted(need_shared("samples", "dicom", "density-exam").glob("*.dcm"))[:1]
    storescu = need_tool("storescu")
    base = [storescu, "-v", "-aet", "TLSSCU", "-aec", "MAMMONODE"]
    ok = subprocess.run(
        [
            *base,
            "+tls",
            str(pki["client.key"]),
            str(pki["client.crt"]),
            "-ic",
            "+cf",
            str(pki["ca.crt"]),
            "127.0.0.1",
            str(node.port),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0 and "Received Store Response (Success)" in ok.stdout + ok.stderr, ok.stderr
    no_cert = subprocess.run(
        [*base, "+tla", "-ic", "+cf", str(pki["ca.crt"]), "127.0.0.1", str(node.port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert no_cert.returncode != 0 or "Success" not in no_cert.stdout + no_cert.stderr
    plain = subprocess.run(
        [*base, "127.0.0.1", str(node.port), *map(str, files)], capture_output=True, text=True, timeout=120
    )
    assert plain.returncode != 0
    assert node.proc.poll() is None
    db = sqlite3.connect(node.storage / "mammonode.sqlite")
    assert db.execute("select count(*) from instances").fetchone()[0] == 1


def make_studies(target: Path, count: int, size: tuple[int, int] | None = None) -> list[list[Path]]:
    """Distinct four-view studies from the shared density exam (../shared/tools/mgdicom.py --key),
    optionally from PNGs shrunk to ``size`` first to keep the suite's disk use small."""
    import cv2

    pngs = need_shared("samples", "png", "density-exam")
    if size is not None:
        small = target / "png"
        small.mkdir(parents=True, exist_ok=True)
        for view in ("L-CC", "R-CC", "L-MLO", "R-MLO"):
            image = cv2.imread(str(pngs / f"{view}.png"), cv2.IMREAD_UNCHANGED)
            cv2.imwrite(str(small / f"{view}.png"), cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA))
        pngs = small
    return make_exams(target, count, pngs, key="load")


def _vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_eight_concurrent_senders_each_instance_and_study_once(node_factory, tmp_path):
    from mammonode.pipeline.weights_admin import generate_test_weights as generate

    storescu = need_tool("storescu")
    studies = make_studies(tmp_path / "studies", 40, size=(650, 500))
    weights = generate(tmp_path / "w", models=("density_histogram",))
    node = node_factory(
        weights_dir=weights,
        pipeline={"models": ["density_histogram"]},
        node={"max_associations": 16},
        study={"quiet_period_s": 1.0},
    ).start()
    senders = []
    for k in range(8):
        files = [str(f) for s in studies[k * 5 : (k + 1) * 5] for f in s]
        senders.append(
            subprocess.Popen(
                [storescu, "-v", "-aet", f"LOAD{k}", "-aec", "MAMMONODE", "127.0.0.1", str(node.port), *files],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=600)[0] for p in senders]
    assert all(p.returncode == 0 for p in senders), outputs
    assert sum(o.count("Received Store Response (Success)") for o in outputs) == 160
    assert not any("Association Rejected" in o for o in outputs)

    def all_done():
        rows = node.studies()
        return len(rows) == 40 and all(r["state"] == "done" for r in rows)

    node.wait_for(all_done, 600, interval=2, what="40 studies processed")
    db = sqlite3.connect(node.storage / "mammonode.sqlite")
    assert db.execute("select count(*), count(distinct sop_instance_uid) from instances").fetchone() == (160, 160)
    per_study = db.execute("select count(*) from jobs where state = 'done' group by study_id").fetchall()
    assert len(per_study) == 40 and {n for (n,) in per_study} == {1}
    assert len(list((node.storage / "instances").rglob("*.dcm"))) == 160


def test_association_limit_is_a_clean_reject(node_factory):
    node = node_factory(worker={"enabled": False}, node={"max_associations": 2, "acse_timeout_s": 2.0}).start()
    time.sleep(3)  # the start-up port probe (a bare TCP connect) holds a slot until the ACSE timeout
    ae = AE(ae_title="LIMIT")
    ae.add_requested_context("1.2.840.10008.1.1", ExplicitVRLittleEndian)
    held = [ae.associate("127.0.0.1", node.port, ae_title="MAMMONODE") for _ in range(2)]
    assert all(a.is_established for a in held)
    third = ae.associate("127.0.0.1", node.port, ae_title="MAMMONODE")
    assert third.is_rejected
    for a in held:
        a.release()
    time.sleep(0.5)
    again = ae.associate("127.0.0.1", node.port, ae_title="MAMMONODE")
    assert again.is_established
    again.release()
    assert node.proc.poll() is None


def test_listener_memory_bounded_with_eight_concurrent_40mb_studies(node_factory, tmp_path):
    studies = make_studies(tmp_path / "big", 8)  # full size: 4 x 10.4 MB each
    node = node_factory(worker={"enabled": False}).start()
    storescu = need_tool("storescu")
    procs = [
        subprocess.Popen(
            [storescu, "-aet", f"BIG{k}", "-aec", "MAMMONODE", "127.0.0.1", str(node.port), *map(str, files)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for k, files in enumerate(studies)
    ]
    assert all(p.wait(300) == 0 for p in procs)
    peak = _vm_hwm_mb(node.proc.pid)
    print(f"listener peak RSS with 8 concurrent 41.6 MB studies: {peak:.0f} MB")
    assert peak <= 1536
    db = sqlite3.connect(node.storage / "mammonode.sqlite")
    assert db.execute("select count(*) from instances").fetchone()[0] == 32


def test_sigterm_during_a_long_association_half_stores_nothing(node_factory, tmp_path):
    storescu = need_tool("storescu")
    node = node_factory(worker={"enabled": False}).start()
    studies = make_studies(tmp_path / "long", 6)
    files = [str(f) for s in studies for f in s]
    sender = subprocess.Popen(
        [storescu, "-v", "-aet", "LONG", "-aec", "MAMMONODE", "127.0.0.1", str(node.port), *files],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    time.sleep(1.0)
    node.proc.send_signal(signal.SIGTERM)
    output = sender.communicate(timeout=300)[0]
    assert node.proc.wait(60) == 0
    acknowledged = output.count("Received Store Response (Success)")
    db = sqlite3.connect(node.storage / "mammonode.sqlite")
    rows = {r[0] for r in db.execute("select path from instances")}
    files_on_disk = {str(p.relative_to(node.storage)) for p in (node.storage / "instances").rglob("*") if p.is_file()}
    assert rows == files_on_disk, "half-stored instance"
    assert len(rows) >= acknowledged, "success answered for an instance that is not stored"
    assert not temp_files(node.storage)


def test_systemd_unit_hardening_score():
    tool = need_tool("systemd-analyze")
    unit = Path(__file__).resolve().parents[2] / "systemd" / "mammonode.service"
    run = subprocess.run([tool, "security", "--offline=yes", str(unit)], capture_output=True, text=True, timeout=60)
    line = next((x for x in run.stdout.splitlines() if "Overall exposure level" in x), "")
    print(line)
    score = float(line.split("level for mammonode.service:")[1].split()[0])
    assert score <= 2.0, line  # systemd rates 0-10; below 2 is "OK"
