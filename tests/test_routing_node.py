"""Routing rules in a running node: one node with three rules (drop CT, store what the
archive sends, process mammography) receives small phantom studies by C-STORE and STOW-RS.

Dropped: answered 0x0000 (STOW-RS: listed as stored), nothing kept, counted and logged.
Stored: kept and listed, never queued (state "stored"). Processed: as without rules.
"""

from __future__ import annotations

import json

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from support.dicom import send_datasets, stow
from support.node import NodeProcess

from mammonode.demo.phantom import exam_datasets
from mammonode.pipeline.weights_admin import generate_test_weights

pytestmark = pytest.mark.network
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"  # PS3.4 Annex B
RULES = [
    {"name": "no-ct", "action": "drop", "modality": "CT"},
    {"name": "archive", "action": "store", "calling_ae": "ARCHIVE*"},
    {"name": "mammography", "action": "process", "modality": "MG", "presentation_intent_type": "FOR PRESENTATION"},
]


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("routing")
    weights = generate_test_weights(tmp / "weights", models=("density_histogram",))
    running = NodeProcess(
        tmp / "node", weights_dir=weights, pipeline={"models": ["density_histogram"]}, rules=RULES
    ).start()
    yield running
    running.stop(timeout=20)


def as_ct(datasets):
    for ds in datasets:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        ds.Modality = "CT"
    return datasets


def routed(node) -> dict[tuple[str, str], float]:
    text = requests.get(f"http://127.0.0.1:{node.web_port}/metrics", timeout=10).text
    return {
        (s.labels["rule"], s.labels["action"]): s.value
        for family in text_string_to_metric_families(text)
        if family.name == "mammonode_instances_routed"
        for s in family.samples
        if s.name == "mammonode_instances_routed_total"
    }


def study(node, uid: str) -> dict | None:
    """The node's own view of a study over HTTP (the same JSON as `mammonode study UID`)."""
    response = requests.get(f"http://127.0.0.1:{node.web_port}/status/studies/{uid}", timeout=10)
    return None if response.status_code == 404 else response.json()


def stored_files(node, uid: str) -> list:
    return [p for p in node.storage.rglob("*") if uid in p.name]


def test_drop_store_and_process_by_c_store(node):
    held = exam_datasets(shape=(200, 160), patient_id="ROUTE-HELD")
    dropped = as_ct(exam_datasets(shape=(200, 160), patient_id="ROUTE-DROP"))
    # Large enough for the pipeline's breast segmentation (test_postgres uses the same).
    processed = exam_datasets(shape=(600, 480), patient_id="ROUTE-RUN")
    assert send_datasets(node.port, held, calling="ARCHIVE1") == [0x0000] * 4
    assert send_datasets(node.port, dropped, calling="MODALITY") == [0x0000] * 4
    assert send_datasets(node.port, processed, calling="MODALITY") == [0x0000] * 4
    run_uid, held_uid, drop_uid = (str(e[0].StudyInstanceUID) for e in (processed, held, dropped))

    # Processed as without rules: all four views in, quiet, run, done.
    finished = ("done", "failed")
    run = node.wait_for(lambda: (d := study(node, run_uid))["state"] in finished and d, 180, 0.5, "study run")
    assert run["state"] == "done", run["jobs"]
    assert run["rules"] == {"mammography": 4} and run["held_instances"] == 0
    assert [j["state"] for j in run["jobs"]] == ["done"]

    # Stored: kept (files and rows), never pipeline input, never queued; the quiet period
    # (1 s) passed long ago and the worker has run the later study meanwhile.
    kept = node.study(held_uid)
    assert kept["state"] == "stored" and kept["jobs"] == [] and kept["results"] == []
    assert kept["rules"] == {"archive": 4} and kept["held_instances"] == 4
    assert all(i["held"] and not i["usable"] and "held by rule 'archive'" in i["reason"] for i in kept["instances"])
    assert all((node.storage / i["path"]).is_file() for i in kept["instances"])
    listed = [s["study_instance_uid"] for s in node.studies()]
    assert held_uid in listed and run_uid in listed

    # Dropped: acknowledged above, but neither rows nor files; counted and logged by UID.
    assert drop_uid not in listed and study(node, drop_uid) is None
    assert stored_files(node, drop_uid) == []
    assert all(stored_files(node, str(ds.SOPInstanceUID)) == [] for ds in dropped)
    counts = routed(node)
    assert counts[("no-ct", "drop")] == 4
    assert counts[("archive", "store")] == 4
    assert counts[("mammography", "process")] == 4
    log = node.log()
    lines = [json.loads(line) for line in log.splitlines() if "dropped by rule" in line]
    for ds in dropped:
        assert [line for line in lines if str(ds.SOPInstanceUID) in line["message"] and "'no-ct'" in line["message"]]
    assert "ROUTE-DROP" not in log and "ROUTE-HELD" not in log


def test_stow_rs_drop_is_acknowledged_and_calling_ae_rules_never_match(node, tmp_path):
    ct = as_ct(exam_datasets(shape=(64, 48), patient_id="ROUTE-STOW"))[0]
    mg = exam_datasets(shape=(64, 48), patient_id="ROUTE-STOW2")[0]
    before = routed(node)
    code, response = stow(node, [ct, mg])
    assert code == 200, response
    referenced = [str(item.ReferencedSOPInstanceUID) for item in response.ReferencedSOPSequence]
    assert sorted(referenced) == sorted([ct.SOPInstanceUID, mg.SOPInstanceUID])
    assert stored_files(node, str(ct.SOPInstanceUID)) == []
    assert study(node, str(ct.StudyInstanceUID)) is None
    # No calling AE title over STOW-RS: the "archive" rule never applies, the MG image is processed.
    detail = study(node, str(mg.StudyInstanceUID))
    assert detail["rules"] == {"mammography": 1} and detail["state"] in ("receiving", "ready")
    after = routed(node)
    assert after[("no-ct", "drop")] == before[("no-ct", "drop")] + 1
    assert after[("mammography", "process")] == before[("mammography", "process")] + 1
