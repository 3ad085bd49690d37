"""The node end to end with real peers: DCMTK storescu/echoscu send to `mammonode serve`."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from support.dicom import send_datasets, storescu
from support.node import cli, cli_json
from support.paths import need_shared, need_tool, temp_files

from mammonode.demo.phantom import exam_datasets

pytestmark = pytest.mark.network


def _study(node, uid):
    return next((s for s in node.studies() if s["study_instance_uid"] == uid), None)


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def test_storescu_density_exam_and_incomplete_nyu(node_factory):
    density = sorted(need_shared("samples", "dicom", "density-exam").glob("*.dcm"))
    nyu1 = sorted(need_shared("samples", "dicom", "nyu1-cc").glob("*.dcm"))
    node = node_factory(worker={"enabled": False}, study={"quiet_period_s": 1.0, "incomplete_timeout_s": 12.0}).start()
    storescu(node.port, density)
    storescu(node.port, nyu1, "-xv")  # JPEG 2000 lossless files need that context proposed
    density_uid, nyu_uid = _uid(density[0]), _uid(nyu1[0])

    def density_ready():
        s = _study(node, density_uid)
        return s if s and s["state"] in ("ready", "queued") else None

    study = node.wait_for(density_ready, 30, what="density exam ready/queued")
    assert study["views"] == {"L-CC": 1, "R-CC": 1, "L-MLO": 1, "R-MLO": 1}
    assert study["missing_views"] == []
    detail = node.study(density_uid)
    assigned = {Path(p.name).stem: None for p in density}
    for inst in detail["instances"]:
        assert inst["usable"] is True
        assigned[inst["view"]] = inst["sop_instance_uid"]
    for path in density:  # each file's view (its name) holds that file's instance
        assert assigned[path.stem] == str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)

    nyu = _study(node, nyu_uid)
    assert nyu["state"] == "receiving"
    assert nyu["missing_views"] == ["L-MLO", "R-MLO"]
    assert nyu["views"] == {"L-CC": 1, "R-CC": 1, "L-MLO": 0, "R-MLO": 0}

    status = node.status()
    assert set(status) >= {"studies", "jobs", "workers", "errors"}
    assert status["studies"]["queued"] + status["studies"]["ready"] == 1

    incomplete = node.wait_for(
        lambda: (_study(node, nyu_uid) or {}).get("state") == "incomplete", 30, what="nyu1-cc incomplete"
    )
    assert incomplete
    nyu = _study(node, nyu_uid)
    assert nyu["missing_views"] == ["L-MLO", "R-MLO"]
    assert any(e["kind"] == "study-incomplete" and e["study_instance_uid"] == nyu_uid for e in node.status()["errors"])
    # No patient identifiers in the listing unless asked.
    assert "patient_name" not in nyu
    phi = cli_json("studies", "--show-phi", config=node.config)
    assert any(s.get("patient_id") for s in phi)


def test_echo_and_calling_ae_allow_list(node_factory):
    node = node_factory(node={"allowed_calling_aets": ["GOODSCU"]}).start()
    ok = subprocess.run(
        [need_tool("echoscu"), "-aet", "GOODSCU", "-aec", "MAMMONODE", "127.0.0.1", str(node.port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(
        [need_tool("echoscu"), "-aet", "STRANGER", "-aec", "MAMMONODE", "127.0.0.1", str(node.port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode != 0
    assert "Association Rejected" in bad.stdout + bad.stderr
    wrong_called = subprocess.run(
        [need_tool("echoscu"), "-aet", "GOODSCU", "-aec", "OTHERNODE", "127.0.0.1", str(node.port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert wrong_called.returncode != 0
    assert node.proc.poll() is None
    rejections = [line for line in node.log().splitlines() if "association rejected" in line]
    assert any("STRANGER" in line and "allowed_calling_aets" in line for line in rejections), rejections
    assert any("'OTHERNODE' is not 'MAMMONODE'" in line for line in rejections), rejections


@pytest.mark.parametrize("bad_uid", ["../../x", "1.2." + "3" * 70, "1.2.abc.4", "1.2.3/../../etc"])
def test_malicious_sop_instance_uid_is_refused(node_factory, tmp_path, bad_uid, monkeypatch):
    from pynetdicom import _config

    # Let our SCU send what a broken or hostile sender would; the node must do the refusing.
    monkeypatch.setitem(_config.VALIDATORS, "UI", lambda value: (True, ""))
    node = node_factory().start()
    ds = exam_datasets(shape=(300, 200))[0]
    ds.SOPInstanceUID = bad_uid
    ds.file_meta.MediaStorageSOPInstanceUID = bad_uid
    before = {p for p in tmp_path.rglob("*")}
    [status] = send_datasets(node.port, [ds])
    assert status != 0x0000 and (status >> 12) in (0xA, 0xC)
    after = {p for p in tmp_path.rglob("*")}
    # Nothing new outside the node's own directory (its log and database live there).
    assert all(str(p).startswith(str(node.tmp)) for p in after - before)
    assert not list((node.storage / "instances").rglob("*.dcm")) if (node.storage / "instances").exists() else True
    assert not (tmp_path.parent / "x").exists()
    assert node.proc.poll() is None


def test_restart_keeps_everything_and_requeues_running_job(node_factory, test_weights_dir):
    density = sorted(need_shared("samples", "dicom", "density-exam").glob("*.dcm"))
    node = node_factory(weights_dir=test_weights_dir, pipeline={"models": ["image_only"], "epochs": 10}).start()
    storescu(node.port, density)
    uid = _uid(density[0])
    node.wait_for(lambda: (_study(node, uid) or {}).get("state") == "running", 60, what="job running")
    time.sleep(2)
    assert node.stop(signal.SIGTERM) == 0
    log = node.log()
    assert "re-queued at shutdown" in log or "job-released" in log or "released" in log
    # While stopped: the study and its instances are in the database, the job is queued.
    detail = cli_json("study", uid, config=node.config)
    assert len(detail["instances"]) == 4
    assert detail["state"] == "queued"
    assert detail["jobs"][-1]["state"] == "queued"
    node.start()
    done = node.wait_for(
        lambda: (_study(node, uid) or {}).get("state") == "done", 240, interval=1, what="re-queued job done"
    )
    assert done
    detail = node.study(uid)
    assert detail["jobs"][-1]["state"] == "done"
    assert {r["kind"] for r in detail["results"]} >= {"sr", "summary"}


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tiny tmpfs needs root")
def test_disk_full_returns_a700_and_node_keeps_serving(node_factory, tmp_path):
    need_tool("echoscu")
    density = sorted(need_shared("samples", "dicom", "density-exam").glob("*.dcm"))
    mount = tmp_path / "tiny"
    mount.mkdir()
    # Room for one 10.4 MB instance while it is spooled and copied (both under the storage
    # directory: 2 x 10.4 MB at the peak), not for a second one.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], check=True)
    try:
        node = node_factory(storage=mount / "storage", database_url=f"sqlite:///{tmp_path / 'db.sqlite'}").start()
        first = storescu(node.port, density[:1])
        assert "Success" in first.stdout + first.stderr or first.returncode == 0
        second = storescu(node.port, density[1:2], check=False)
        text = second.stdout + second.stderr
        assert "Refused: OutOfResources" in text, text
        assert "status 0xA700 disk full" in node.log()
        echo = subprocess.run(
            [need_tool("echoscu"), "-aet", "X", "-aec", "MAMMONODE", "127.0.0.1", str(node.port)],
            capture_output=True,
            timeout=30,
        )
        assert echo.returncode == 0
        assert not temp_files(mount / "storage"), "temporary file left behind"
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
        storescu(node.port, density[1:2])
        detail = node.study(_uid(density[0]))
        assert len(detail["instances"]) == 2
        node.stop()
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[node]\nport = 'eleven'\n")
    result = cli("status", config=bad, check=False)
    assert result.returncode == 2
    assert "node.port" in result.stderr
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[node]\nae_titel = 'X'\n")
    result = cli("status", config=unknown, check=False)
    assert result.returncode == 2 and "node.ae_titel" in result.stderr
    good = tmp_path / "good.toml"
    good.write_text(f"[storage]\ndirectory = '{tmp_path / 's'}'\n")
    result = cli("status", config=good, check=False, env={"MAMMONODE_NODE_PORT": "notaport"})
    assert result.returncode == 2 and "MAMMONODE_NODE_PORT" in result.stderr
