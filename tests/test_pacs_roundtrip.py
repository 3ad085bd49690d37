"""Results back into a real PACS (Orthanc), and delivery that survives a destination outage."""

from __future__ import annotations

import json
import time

import pydicom
import pytest
from support.dicom import density_dicoms, storescu
from support.node import cli
from support.peers import Orthanc, StoreSCP

from mammonode.demo.loopback import free_port

pytestmark = pytest.mark.network
FAST_MODELS = ["image_only", "density_histogram", "density_cnn"]


def _density_from_sr(ds) -> dict:
    """(model -> probabilities a-d) and the coded category, read back from the SR tree."""
    found: dict[str, dict] = {}
    category = None

    def walk(items, group=None):
        nonlocal category
        for item in items:
            name = item.ConceptNameCodeSequence[0] if "ConceptNameCodeSequence" in item else None
            if item.ValueType == "TEXT" and name is not None and name.CodeMeaning == "Tracking Identifier":
                group = str(item.TextValue)
            if (
                item.ValueType == "NUM"
                and name is not None
                and name.CodeMeaning.startswith("Probability of breast composition")
            ):
                value = float(item.MeasuredValueSequence[0].NumericValue)
                found.setdefault(group, {})[name.CodeMeaning[-1]] = value
            if item.ValueType == "CODE" and name is not None and name.CodeValue == "129715009":
                category = str(item.ConceptCodeSequence[0].CodeValue)
            if "ContentSequence" in item:
                walk(item.ContentSequence, group)

    walk(ds.ContentSequence)
    return {"groups": found, "category": category}


def test_orthanc_pushes_study_and_receives_sr_and_images(node_factory, tmp_path, test_weights_dir):
    files = density_dicoms()
    orthanc_port = free_port()
    node = node_factory(
        weights_dir=test_weights_dir,
        pipeline={"models": FAST_MODELS},
        destinations=[{"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc_port}],
    ).start()
    pacs = Orthanc(
        tmp_path / "orthanc", {"mammonode": ("MAMMONODE", "127.0.0.1", node.port)}, dicom_port=orthanc_port
    ).start()
    try:
        for f in files:
            pacs.upload(f)
        study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        [orthanc_study] = pacs.find("Study", {"StudyInstanceUID": study_uid})
        pushed = pacs.post("/modalities/mammonode/store", {"Resources": [orthanc_study], "Synchronous": True})
        assert pushed.get("FailedInstancesCount", 0) == 0 and pushed.get("InstancesCount") == 4

        def delivered():
            detail = node.study(study_uid)
            states = [d["state"] for r in detail["results"] for d in r["deliveries"]]
            return detail if detail["state"] == "done" and states and all(s == "delivered" for s in states) else None

        detail = node.wait_for(delivered, 300, interval=1, what="results delivered to Orthanc")
        instances = pacs.get(f"/studies/{orthanc_study}/instances")
        modalities = sorted(i["MainDicomTags"].get("SOPInstanceUID") for i in instances)
        # Objects kept at the node and never sent (the CAD SR of test weights) have no deliveries.
        sent = [r for r in detail["results"] if r["deliveries"]]
        assert len(instances) == 4 + len(sent)
        ours = {r["sop_instance_uid"] for r in sent}
        assert ours <= set(modalities)
        sr_ids = [
            i["ID"]
            for i in instances
            if i["MainDicomTags"]["SOPInstanceUID"] in ours
            and pacs.get(f"/instances/{i['ID']}/tags?simplify")["Modality"] == "SR"
        ]
        assert len(sr_ids) == 1
        sr_path = tmp_path / "from-orthanc-sr.dcm"
        sr_path.write_bytes(pacs.get_bytes(f"/instances/{sr_ids[0]}/file"))
        sr = pydicom.dcmread(sr_path)
        assert sr.StudyInstanceUID == study_uid
        from_sr = _density_from_sr(sr)

        predicted = json.loads(
            cli(
                "predict",
                *map(str, files),
                "--weights-dir",
                str(test_weights_dir),
                "--models",
                "density_histogram,density_cnn",
                "--json",
            ).stdout
        )
        groups = {name.lower(): values for name, values in from_sr["groups"].items() if name}
        for model in ("histogram", "cnn"):
            group = f"breast density, {model} model"
            # In percent with two decimals (DICOM's CAD templates' unit for probabilities).
            values = [groups[group.lower()][c] / 100 for c in "abcd"]
            expected = predicted["density"][model]["probabilities"]
            assert values == pytest.approx(expected, rel=0, abs=0.00005 + 1e-12), model
        cid6000 = {"a": "129716005", "b": "129717001", "c": "129718006", "d": "129719003"}  # PS3.16 CID 6000
        assert from_sr["category"] == cid6000[predicted["density"]["histogram"]["category"]]
        # The SR coming back would not make the node run the study again.
        time.sleep(3)
        assert node.study(study_uid)["state"] == "done"
    finally:
        pacs.stop()


def test_destination_down_then_up_gets_each_result_exactly_once(node_factory, tmp_path, test_weights_dir):
    port = free_port()
    node = node_factory(
        weights_dir=test_weights_dir,
        pipeline={"models": ["density_histogram"]},
        destinations=[{"name": "archive", "ae_title": "STORESCP", "host": "127.0.0.1", "port": port}],
        delivery={"max_attempts": 100, "backoff_initial_s": 0.5, "backoff_max_s": 2.0},
    ).start()
    files = density_dicoms()
    storescu(node.port, files)
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)

    def retried():
        detail = node.study(uid)
        rows = [d for r in detail["results"] for d in r["deliveries"]]
        return rows if rows and all(d["attempts"] >= 2 and d["state"] == "pending" for d in rows) else None

    rows = node.wait_for(retried, 180, interval=1, what="deliveries retried while the destination is down")
    # The operating system's reason is kept (nothing listens on the port: ECONNREFUSED).
    assert all("Connection refused" in (d["last_error"] or "") for d in rows), rows
    assert any("delivery to archive" in line and "Connection refused" in line for line in node.log().splitlines())
    status = node.status()
    # Waiting for the next attempt, or in it right now.
    assert status["deliveries"]["pending"] + status["deliveries"]["sending"] == len(rows)
    assert status["deliveries"]["delivered"] == 0
    assert any(e["kind"] == "delivery-retry" for e in status["errors"])

    scp = StoreSCP(tmp_path / "scp", port).start()
    try:

        def all_delivered():
            detail = node.study(uid)
            states = [d["state"] for r in detail["results"] for d in r["deliveries"]]
            return detail if states and all(s == "delivered" for s in states) else None

        detail = node.wait_for(all_delivered, 60, interval=1, what="delivery after the destination came back")
        time.sleep(4)  # anything sent twice would arrive now
        received = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in scp.files()]
        expected = [r["sop_instance_uid"] for r in detail["results"] if r["deliveries"]]
        assert sorted(received) == sorted(expected), "each result object exactly once"
    finally:
        scp.stop()
