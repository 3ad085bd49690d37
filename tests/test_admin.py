"""Duplicates, replaced objects, retry, purge and a separate worker process."""

from __future__ import annotations

import subprocess
import sys

import pytest
from support.dicom import send_datasets
from support.node import cli, cli_json
from support.paths import REPO
from support.peers import StoreSCP

from mammonode.demo.loopback import free_port
from mammonode.demo.phantom import exam_datasets
from mammonode.pipeline.weights_admin import generate_test_weights as generate

pytestmark = pytest.mark.network


@pytest.fixture
def histogram_weights(tmp_path):
    return generate(tmp_path / "weights", models=("density_histogram",))


def test_duplicate_is_idempotent_and_a_different_object_replaces(node_factory):
    node = node_factory(worker={"enabled": False}).start()
    [first] = exam_datasets(shape=(400, 300))[:1]
    assert send_datasets(node.port, [first, first]) == [0, 0]
    uid = str(first.StudyInstanceUID)
    detail = node.study(uid)
    assert len(detail["instances"]) == 1 and detail["instances"][0]["revisions"] == 0
    assert len(list((node.storage / "instances").rglob("*.dcm"))) == 1
    changed = first.copy()
    pixels = bytearray(changed.PixelData)
    pixels[1000] ^= 0xFF
    changed.PixelData = bytes(pixels)
    assert send_datasets(node.port, [changed]) == [0]
    detail = node.study(uid)
    assert len(detail["instances"]) == 1 and detail["instances"][0]["revisions"] == 1
    files = list((node.storage / "instances").rglob("*.dcm"))
    assert len(files) == 1 and files[0].name.split(".")[-2] == detail["instances"][0]["path"].split(".")[-2]
    assert "replaced by a different object" in node.log()


def test_failed_delivery_retry_and_purge(node_factory, tmp_path, histogram_weights):
    port = free_port()
    node = node_factory(
        weights_dir=histogram_weights,
        pipeline={"models": ["density_histogram"]},
        destinations=[{"name": "archive", "ae_title": "STORESCP", "host": "127.0.0.1", "port": port}],
        delivery={"max_attempts": 1},
    ).start()
    datasets = exam_datasets(shape=(600, 480))
    assert send_datasets(node.port, datasets) == [0, 0, 0, 0]
    uid = str(datasets[0].StudyInstanceUID)

    def failed():
        rows = [d for r in node.study(uid)["results"] for d in r["deliveries"]]
        return rows if rows and all(d["state"] == "failed" for d in rows) else None

    rows = node.wait_for(failed, 120, what="deliveries failed")
    status = node.status()
    assert status["deliveries"]["failed"] == len(rows)
    assert any(e["kind"] == "delivery-failed" for e in status["errors"])
    scp = StoreSCP(tmp_path / "scp", port).start()
    try:
        retried = cli_json("retry", uid, config=node.config)
        assert retried["deliveries_reset"] == len(rows) and retried["job_queued"] is False
        node.wait_for(
            lambda: all(d["state"] == "delivered" for r in node.study(uid)["results"] for d in r["deliveries"]),
            60,
            what="re-sent deliveries",
        )
        assert len(scp.files()) == len(rows)
    finally:
        scp.stop()
    kept = cli_json("purge", "--older-than", "1", config=node.config)
    assert kept["removed"] == 0
    purged = cli_json("purge", "--older-than", "0", config=node.config)
    assert purged["removed"] == 1 and purged["study_instance_uids"] == [uid]
    assert not (node.storage / "instances" / uid).exists() and not (node.storage / "results" / uid).exists()
    assert cli("study", uid, config=node.config, check=False).returncode == 1


def test_separate_worker_process_runs_the_job(node_factory, histogram_weights):
    node = node_factory(
        weights_dir=histogram_weights, pipeline={"models": ["density_histogram"]}, worker={"enabled": False}
    ).start()
    datasets = exam_datasets(shape=(600, 480))
    assert send_datasets(node.port, datasets) == [0, 0, 0, 0]
    uid = str(datasets[0].StudyInstanceUID)
    node.wait_for(lambda: node.study(uid)["state"] == "queued", 30, what="queued")
    worker = subprocess.Popen(
        [sys.executable, "-m", "mammonode.cli", "worker", "--config", str(node.config), "--device", "cpu"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        node.wait_for(lambda: node.study(uid)["state"] == "done", 120, what="done by the separate worker")
        status = node.status()
        assert any(w["alive"] for w in status["workers"])
        detail = node.study(uid)
        assert detail["result"]["density"]["histogram"]["category"] in "abcd"
        # The human view shows the four probabilities too (rich once took "[a=…]" for markup).
        probabilities = detail["result"]["density"]["histogram"]["probabilities"]
        shown = " ".join(f"{c}={p:.2f}" for c, p in zip("abcd", probabilities))
        assert f"[{shown}]" in cli("study", uid, config=node.config).stdout
    finally:
        worker.terminate()
        assert worker.wait(30) == 0
