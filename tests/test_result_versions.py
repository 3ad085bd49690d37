"""Versioned results and per-destination outputs, against real peers.

A study processed again with different weights is a new result version: new UIDs, the new
SR names the superseded SR (Predecessor Documents Sequence), and a destination with
``iocm = true`` gets an IHE IOCM rejection note listing what it received before. The same
version processed again sends no new UIDs. Each destination receives the outputs it lists,
the SR in the SOP class it asks for. Expected values come from what was sent, the DICOM
standard, and what the peers stored.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections import Counter
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from support.dicom import send_datasets
from support.node import NodeProcess, cli_json
from support.paths import need_tool
from support.peers import Orthanc, StoreSCP

from mammonode.config import OUTPUTS, ConfigError, load_config
from mammonode.db.migrate import upgrade
from mammonode.db.models import DeliveryState, Study
from mammonode.db.outbox import NewResult, earlier_results, register_results, reset_for_retry
from mammonode.db.session import Database
from mammonode.demo.loopback import free_port, wait_port
from mammonode.demo.phantom import exam_datasets
from mammonode.pipeline.weights_admin import generate_test_weights
from mammonode.reporting.header import PREDICT_EQUIPMENT

pytestmark = pytest.mark.network

# SOP classes (DICOM PS3.4 Annex B) and the IOCM rejection title (PS3.16 CID 7010).
SC = "1.2.840.10008.5.1.4.1.1.7"
SR_3D = "1.2.840.10008.5.1.4.1.1.88.34"
SR_COMPREHENSIVE = "1.2.840.10008.5.1.4.1.1.88.33"
KOS = "1.2.840.10008.5.1.4.1.1.88.59"
PM = "1.2.840.10008.5.1.4.1.1.30"
CAD_SR = "1.2.840.10008.5.1.4.1.1.88.50"
MG = "1.2.840.10008.5.1.4.1.1.1.2"
REJECTED_FOR_QUALITY = ("113001", "DCM", "Rejected for Quality Reasons")
SR_AND_SUMMARY = ["sr", "summary"]
PIPELINE = {"models": ["density_histogram"], "augmentation": False}
SHAPE = (600, 480)

# A storescp profile without Comprehensive 3D SR: the archive that refuses it.
COMPREHENSIVE_ONLY = r"""[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = LittleEndianImplicit
[Images]
TransferSyntax1 = JPEG2000LosslessOnly
TransferSyntax2 = JPEG2000
TransferSyntax3 = JPEGLSLossless
TransferSyntax4 = RLELossless
TransferSyntax5 = JPEGBaseline
TransferSyntax6 = LocalEndianExplicit
TransferSyntax7 = LittleEndianImplicit
[[PresentationContexts]]
[ComprehensiveOnly]
PresentationContext1 = VerificationSOPClass\Uncompressed
PresentationContext2 = SecondaryCaptureImageStorage\Images
PresentationContext3 = ComprehensiveSRStorage\Uncompressed
PresentationContext4 = KeyObjectSelectionDocumentStorage\Uncompressed
[[Profiles]]
[ComprehensiveOnly]
PresentationContexts = ComprehensiveOnly
"""


class ComprehensiveOnlySCP(StoreSCP):
    """storescp negotiating only the contexts of COMPREHENSIVE_ONLY."""

    def start(self) -> ComprehensiveOnlySCP:
        config = self.folder.parent / "comprehensive-only.cfg"
        config.write_text(COMPREHENSIVE_ONLY)
        command = [need_tool("storescp"), "-aet", self.aet, "-xf", str(config), "ComprehensiveOnly"]
        command += ["+uf", "-od", str(self.folder), str(self.port)]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, 30)
        return self


def make_node(node_factory, weights_dir: Path, pipeline: dict = PIPELINE, results: str = "", **settings) -> NodeProcess:
    """A node whose Secondary Captures are uncompressed: every SCP here takes them (JPEG 2000
    delivery is another test's subject). ``results``: more lines for its ``[results]``."""
    node = node_factory(weights_dir=weights_dir, pipeline=pipeline, **settings)
    with open(node.config, "a") as fh:
        fh.write('[results]\nsc_compression = "none"\n' + results)
    return node


def weights(folder: Path, seed: int, models: tuple[str, ...] = ("density_histogram",)) -> Path:
    return generate_test_weights(folder, seed=seed, models=models)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def received(scp: StoreSCP) -> dict[str, pydicom.Dataset]:
    """What the peer stored, by SOP Instance UID (a re-sent object counts once)."""
    return {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(f, stop_before_pixels=True) for f in scp.files())}


def by_class(objects: dict[str, pydicom.Dataset], sop_class: str) -> dict[str, pydicom.Dataset]:
    return {uid: ds for uid, ds in objects.items() if str(ds.SOPClassUID) == sop_class}


def wait_for_jobs(node: NodeProcess, uid: str, done: int) -> dict:
    """``done`` jobs finished and every delivery settled (sent, or not sent as superseded)."""

    def settled():
        detail = node.study(uid)
        finished = sum(1 for j in detail["jobs"] if j["state"] == "done")
        states = [d["state"] for r in detail["results"] for d in r["deliveries"]]
        ok = finished >= done and states and all(s in ("delivered", "superseded") for s in states)
        return detail if ok else None

    return node.wait_for(settled, 120, interval=0.5, what=f"{done} jobs done and delivered")


def reprocess(node: NodeProcess, uid: str) -> None:
    assert cli_json("retry", uid, "--force", config=node.config)["job_queued"] is True


def referenced_uids(kos: pydicom.Dataset) -> set[str]:
    return {
        str(ref.ReferencedSOPInstanceUID)
        for study in kos.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }


def device_observer_uid(sr: pydicom.Dataset) -> str:
    """The SR's Device Observer UID (121012, DCM; TID 1004), wherever the tree holds it."""

    def walk(items):
        for item in items:
            name = item.get("ConceptNameCodeSequence")
            if name and name[0].CodeValue == "121012" and name[0].CodingSchemeDesignator == "DCM":
                yield str(item.UID)
            yield from walk(item.get("ContentSequence", []))

    [uid] = set(walk(sr.ContentSequence))
    return uid


def predecessors(sr: pydicom.Dataset) -> set[str]:
    return {
        str(ref.ReferencedSOPInstanceUID)
        for study in sr.get("PredecessorDocumentsSequence", [])
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }


def test_new_weights_make_a_new_version_and_the_same_version_no_new_uids(node_factory, tmp_path):
    weights_a, weights_b = weights(tmp_path / "weights-a", 0), weights(tmp_path / "weights-b", 1)
    model_file = "density_histogram_model.p"
    assert sha256(weights_a / model_file) != sha256(weights_b / model_file)
    iocm = StoreSCP(tmp_path / "iocm", free_port(), aet="IOCMSCP").start()
    plain = StoreSCP(tmp_path / "plain", free_port(), aet="PLAINSCP").start()
    destinations = [
        {"name": "iocm", "ae_title": "IOCMSCP", "host": "127.0.0.1", "port": iocm.port, "iocm": True},
        {"name": "plain", "ae_title": "PLAINSCP", "host": "127.0.0.1", "port": plain.port, "outputs": SR_AND_SUMMARY},
    ]
    try:
        node = make_node(node_factory, weights_a, destinations=destinations).start()
        datasets = exam_datasets(shape=SHAPE)
        sent_uids = {str(ds.SOPInstanceUID) for ds in datasets}
        assert send_datasets(node.port, datasets) == [0, 0, 0, 0]
        uid = str(datasets[0].StudyInstanceUID)
        wait_for_jobs(node, uid, 1)
        first_iocm, first_plain = received(iocm), received(plain)
        # Every view's heatmap SC and the summary, one SR; the plain destination lists sr + summary.
        assert len(by_class(first_iocm, SC)) == 5 and len(by_class(first_iocm, SR_3D)) == 1
        assert sorted(str(ds.SOPClassUID) for ds in first_plain.values()) == sorted([SC, SR_3D])
        assert not by_class(first_iocm, KOS) and not by_class(first_plain, KOS)
        assert {str(ds.StudyInstanceUID) for ds in (*first_iocm.values(), *first_plain.values())} == {uid}
        [first_sr] = by_class(first_iocm, SR_3D)
        assert set(by_class(first_plain, SR_3D)) == {first_sr}

        # The same version again: re-sent, nothing new.
        reprocess(node, uid)
        wait_for_jobs(node, uid, 2)
        assert received(iocm).keys() == first_iocm.keys() and received(plain).keys() == first_plain.keys()

        # Different weights: a new version.
        node.stop(timeout=20)
        node = make_node(node_factory, weights_b, destinations=destinations, storage=node.storage).start()
        reprocess(node, uid)
        wait_for_jobs(node, uid, 3)
        new_iocm = {k: v for k, v in received(iocm).items() if k not in first_iocm}
        new_plain = {k: v for k, v in received(plain).items() if k not in first_plain}
        assert not (new_iocm.keys() | new_plain.keys()) & sent_uids
        [note] = by_class(new_iocm, KOS).values()
        assert len(new_iocm) == len(first_iocm) + 1, "a new UID for every object, plus the rejection note"
        assert sorted(str(ds.SOPClassUID) for ds in new_plain.values()) == sorted([SC, SR_3D]), "no note: iocm off"
        title = note.ConceptNameCodeSequence[0]
        assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == REJECTED_FOR_QUALITY
        assert str(note.StudyInstanceUID) == uid and str(note.Modality) == "KO"
        assert referenced_uids(note) == set(first_iocm), "the note rejects exactly what this destination had"
        listed = {
            str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            for item in note.ContentSequence
            if item.ValueType in ("IMAGE", "COMPOSITE")
        }
        assert listed == set(first_iocm)
        [new_sr] = by_class(new_iocm, SR_3D).values()
        assert predecessors(new_sr) == {first_sr}
        assert new_sr.PredecessorDocumentsSequence[0].StudyInstanceUID == uid
        [plain_sr] = by_class(new_plain, SR_3D).values()
        assert predecessors(plain_sr) == {first_sr}
        # One installation, one identity, kept across versions and restarts (and not predict's).
        old_sr = first_iocm[first_sr]
        assert device_observer_uid(new_sr) == device_observer_uid(old_sr) != PREDICT_EQUIPMENT.device_uid
        assert new_sr.DeviceSerialNumber == old_sr.DeviceSerialNumber != PREDICT_EQUIPMENT.serial_number
    finally:
        iocm.stop()
        plain.stop()


def _refuses_3d_sr(port: int, aet: str) -> bool:
    """The restricted SCP rejects a Comprehensive 3D SR context and accepts Comprehensive SR."""
    from pynetdicom import AE

    ae = AE(ae_title="PROBE")
    ae.add_requested_context(SR_3D)
    ae.add_requested_context(SR_COMPREHENSIVE)
    assoc = ae.associate("127.0.0.1", port, ae_title=aet)
    try:
        accepted = {str(c.abstract_syntax) for c in assoc.accepted_contexts}
    finally:
        assoc.release()
    return accepted == {SR_COMPREHENSIVE}


def orthanc_objects(pacs: Orthanc, orthanc_study: str) -> dict[str, pydicom.Dataset]:
    out = {}
    for instance in pacs.get(f"/studies/{orthanc_study}/instances"):
        ds = pydicom.dcmread(BytesIO(pacs.get_bytes(f"/instances/{instance['ID']}/file")), stop_before_pixels=True)
        out[str(ds.SOPInstanceUID)] = ds
    return out


def test_orthanc_stores_every_output_under_the_original_study(node_factory, tmp_path):
    """Two versions (the second from a replaced input image) into Orthanc, the SR both as 3D
    and as Comprehensive SR, and the Comprehensive SR alone to an SCP that refuses 3D SR."""
    orthanc_port = free_port()
    scp = ComprehensiveOnlySCP(tmp_path / "comprehensive-only", free_port(), aet="COMPONLY").start()
    assert _refuses_3d_sr(scp.port, "COMPONLY")
    orthanc = {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc_port}
    destinations = [
        {"name": "orthanc", **orthanc, "iocm": True},
        {"name": "orthanc-comprehensive", **orthanc, "outputs": ["sr"], "sr_sop_class": "comprehensive"},
        {
            "name": "comprehensive-only",
            "ae_title": "COMPONLY",
            "host": "127.0.0.1",
            "port": scp.port,
            "outputs": SR_AND_SUMMARY,
            "sr_sop_class": "comprehensive",
        },
    ]
    # Heatmaps too (so Parametric Maps), one quick pass; the CAD SR sent although the weights
    # are test weights, as a workstation integration set-up would.
    node = make_node(
        node_factory,
        weights(tmp_path / "weights", 0, models=("patch", "image_heatmaps", "density_histogram")),
        pipeline={"models": ["image_heatmaps", "density_histogram"], "augmentation": False},
        results="cad_sr_with_test_weights = true\n",
        destinations=destinations,
    )
    pacs = Orthanc(tmp_path / "orthanc", {"mammonode": ("MAMMONODE", "127.0.0.1", node.port)}, dicom_port=orthanc_port)
    pacs.start()
    try:
        datasets = exam_datasets(shape=SHAPE)
        uid = str(datasets[0].StudyInstanceUID)
        for ds in datasets:
            path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            pacs.upload(path)
        [orthanc_study] = pacs.find("Study", {"StudyInstanceUID": uid})
        node.start()
        pushed = pacs.post("/modalities/mammonode/store", {"Resources": [orthanc_study], "Synchronous": True})
        assert pushed.get("FailedInstancesCount", 0) == 0 and pushed.get("InstancesCount") == 4
        wait_for_jobs(node, uid, 1)
        first = orthanc_objects(pacs, orthanc_study)
        changed = datasets[0].copy()  # the same image, replaced by a different object: new inputs
        pixels = bytearray(changed.PixelData)
        pixels[len(pixels) // 2] ^= 0xFF
        changed.PixelData = bytes(pixels)
        assert send_datasets(node.port, [changed]) == [0]
        wait_for_jobs(node, uid, 2)

        everything = orthanc_objects(pacs, orthanc_study)
        stored = list(everything.values())
        assert {str(ds.StudyInstanceUID) for ds in stored} == {uid}
        assert pacs.find("Study", {"StudyInstanceUID": uid}) == [orthanc_study]
        classes = Counter(str(ds.SOPClassUID) for ds in stored)
        # Two versions of: every view's heatmap SC + the summary, every view's Parametric Map,
        # the SR as 3D and as Comprehensive SR (the second destination), the Mammography CAD
        # SR; one rejection note (iocm on "orthanc").
        assert classes == {MG: 4, SC: 10, PM: 8, SR_3D: 2, SR_COMPREHENSIVE: 2, CAD_SR: 2, KOS: 1}
        [note] = (ds for ds in stored if str(ds.SOPClassUID) == KOS)
        title = note.ConceptNameCodeSequence[0]
        assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == REJECTED_FOR_QUALITY
        # It rejects the first version's results sent through "orthanc" (not the Comprehensive
        # SR, which went through the other entry, without iocm).
        first_results = {u for u, ds in first.items() if str(ds.SOPClassUID) not in (MG, SR_COMPREHENSIVE)}
        assert referenced_uids(note) == first_results

        at_scp = received(scp)
        assert Counter(str(ds.SOPClassUID) for ds in at_scp.values()) == {SC: 2, SR_COMPREHENSIVE: 2}
        # The same report in both SOP classes: the newest version's pair has equal content.
        newest_3d = next(ds for ds in stored if str(ds.SOPClassUID) == SR_3D and predecessors(ds))
        newest = next(ds for ds in at_scp.values() if str(ds.SOPClassUID) == SR_COMPREHENSIVE and predecessors(ds))
        assert newest.ContentSequence == newest_3d.ContentSequence
        assert newest.SOPInstanceUID != newest_3d.SOPInstanceUID
    finally:
        pacs.stop()
        scp.stop()


def test_destination_output_settings_and_their_errors(tmp_path):
    config = tmp_path / "config.toml"
    base = '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "h"\nport = 104\n'
    config.write_text(base)
    [dest] = load_config(config, environ={}).destinations
    assert (dest.outputs, dest.sr_sop_class, dest.iocm) == (list(OUTPUTS), "comprehensive3d", False)
    config.write_text(base + 'outputs = ["sr"]\nsr_sop_class = "comprehensive"\niocm = true\n')
    [dest] = load_config(config, environ={}).destinations
    assert (dest.outputs, dest.sr_sop_class, dest.iocm) == (["sr"], "comprehensive", True)
    for bad, key in [
        ('outputs = ["sr", "pdf"]', "outputs"),
        ("outputs = []", "outputs"),
        ('outputs = "sr"', "outputs"),
        ('sr_sop_class = "basic"', "sr_sop_class"),
        ('iocm = "yes"', "iocm"),
    ]:
        config.write_text(base + bad + "\n")
        with pytest.raises(ConfigError, match=rf"^destinations\[0\]\.{key}: "):
            load_config(config, environ={})


def test_a_new_version_supersedes_unsent_deliveries_and_retry_resends_only_it(tmp_path):
    database = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    upgrade(database.engine)

    def objects(version: str) -> list[NewResult]:
        return [NewResult(kind, SR_3D, f"2.25.{version}{n}", f"results/{version}{n}.dcm") for n, kind in [(1, "sr")]]

    with database.session() as s:
        study = Study(study_instance_uid="2.25.1")
        s.add(study)
        s.flush()
        study_id = study.id
        [v1] = register_results(s, study_id, None, "inputs", objects("1"), ["x", "y"], version_key="v1")
        next(d for d in v1.deliveries if d.destination == "x").state = DeliveryState.DELIVERED
    with database.session() as s:
        [earlier] = earlier_results(s, study_id, "v2")
        assert (earlier.sop_instance_uid, earlier.reached) == ("2.25.11", frozenset({"x"}))
        register_results(s, study_id, None, "inputs", objects("2"), ["x", "y"], version_key="v2")
    with database.session() as s:
        states = {(r.version_key, d.destination): d.state for r in s.get(Study, study_id).results for d in r.deliveries}
        assert states == {
            ("v1", "x"): "delivered",
            ("v1", "y"): "superseded",
            ("v2", "x"): "pending",
            ("v2", "y"): "pending",
        }
        for row in s.get(Study, study_id).results:
            for delivery in row.deliveries:
                if (row.version_key, delivery.destination) == ("v2", "x"):
                    delivery.state = DeliveryState.DELIVERED
        # --force re-sends what was delivered, of the current version only.
        assert reset_for_retry(s, s.get(Study, study_id), include_delivered=True) == 1
    with database.session() as s:  # the first version again: its unsent rows come back, v2's go
        register_results(s, study_id, None, "inputs", objects("1"), ["x", "y"], version_key="v1")
    with database.session() as s:
        states = {(r.version_key, d.destination): d.state for r in s.get(Study, study_id).results for d in r.deliveries}
        assert states[("v1", "y")] == "pending" and states[("v2", "x")] == states[("v2", "y")] == "superseded"
    database.dispose()
