"""Exams that lack views: the image-wise models' partial results, per-image groups in the SR,
``study.incomplete_policy`` and ``mammonode process``.

Fast tests build result objects from synthetic pipeline results and drive the assembly on a
real SQLite database; the node tests (slow) run real nodes on a unilateral and a CC-only study.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from support.dicom import density_dicoms, storescu
from support.node import cli
from support.paths import REPO, need_shared, need_tool
from support.peers import StoreSCP
from test_state_machines import INCOMPLETE_S, QUIET_S, jobs_of, receive, seconds, study, uid

from mammonode.config import ConfigError, load_config
from mammonode.db import admin
from mammonode.db.assembly import process, tick
from mammonode.db.jobs import claim, finish
from mammonode.db.migrate import upgrade
from mammonode.db.models import Study, utcnow
from mammonode.db.session import Database
from mammonode.demo.loopback import free_port
from mammonode.exam.orientation import Orientation
from mammonode.exam.views import VIEWS
from mammonode.pipeline.crop import CropInfo
from mammonode.pipeline.registry import IMAGEWISE_MODELS, spec
from mammonode.pipeline.run import PipelineOptions, PipelineResult, ViewResult
from mammonode.pipeline.weights import ModelProvenance, WeightsError
from mammonode.reporting.objects import build_objects
from mammonode.reporting.secondary_capture import SourceImage
from mammonode.service.worker import partial_options

_DCIODVFY = re.compile(r"(?:^|\s-\s)(Error|Warning) - (.*)")
P_CANCER, P_BENIGN = ("111047", "DCM"), ("MN-001", "99MAMMONODE")
IMAGE_VIEW = ("111031", "DCM")
VIEW_CID_4014 = {"CC": ("399162004", "SCT"), "MLO": ("399368009", "SCT")}
LATERALITY_CID_244 = {"L": ("7771000", "SCT"), "R": ("24028007", "SCT")}
UNILATERAL, CC_ONLY = ("L-CC", "L-MLO"), ("L-CC", "R-CC")
SC, SR_3D = "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.88.34"


# --- walking an SR ------------------------------------------------------------------------


def _code(seq) -> tuple[str, str]:
    return str(seq[0].CodeValue), str(seq[0].CodingSchemeDesignator)


def _walk(item: Dataset):
    for child in item.get("ContentSequence", []):
        yield child
        yield from _walk(child)


def _groups(sr: Dataset) -> list[Dataset]:
    return [
        i for i in _walk(sr) if "ConceptNameCodeSequence" in i and _code(i.ConceptNameCodeSequence) == ("125007", "DCM")
    ]


def _comments(sr: Dataset) -> list[str]:
    return [
        str(i.TextValue)
        for i in _walk(sr)
        if i.ValueType == "TEXT" and _code(i.ConceptNameCodeSequence) == ("121106", "DCM")
    ]


def _dciodvfy_errors(path: Path) -> list[str]:
    run = subprocess.run([need_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=120)
    found = [m.groups() for line in (run.stdout + run.stderr).splitlines() if (m := _DCIODVFY.search(line))]
    return [text for level, text in found if level == "Error"]


# --- synthetic results ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def images() -> dict[str, np.ndarray]:
    """The density exam's pixels by view (stored as acquired, not mirrored)."""
    out = {}
    for path in density_dicoms():
        ds = pydicom.dcmread(path)
        out[f"{ds.ImageLaterality}-{ds.ViewPosition}"] = ds.pixel_array
    return out


@pytest.fixture(scope="module")
def headers() -> dict[str, pydicom.Dataset]:
    out = {}
    for path in density_dicoms():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        out[f"{ds.ImageLaterality}-{ds.ViewPosition}"] = ds
    return out


def _prov(name: str) -> ModelProvenance:
    return ModelProvenance(f"{name}.p", hashlib.sha256(name.encode()).hexdigest(), False, True)


def _result(headers, views, exam_models: bool) -> PipelineResult:
    """Image-wise scores for ``views``; with ``exam_models`` also the view-wise and density ones."""
    results = {}
    for view in views:
        ds = headers[view]
        left, right = (0, 1500) if view[0] == "L" else (int(ds.Columns) - 1500, int(ds.Columns))
        crop = CropInfo((100, 2500, left, right), ((0, 0), 0), (0, (0, 0)), 0)
        results[view] = ViewResult(
            source=str(ds.SOPInstanceUID),
            orientation=Orientation(view, False),
            crop=crop,
            best_center=(0, 0),
            sop_instance_uid=str(ds.SOPInstanceUID),
        )
    result = PipelineResult(
        study_instance_uid=str(headers["L-CC"].StudyInstanceUID),
        views=results,
        models={m: _prov(m) for m in IMAGEWISE_MODELS},
        parameters={"seed": 0, "epochs": 1, "augmentation": False, "precision": "fp32"},
        images={
            v: {m: {"benign": 0.25 + i / 100, "malignant": 0.125 + i / 10} for m in IMAGEWISE_MODELS}
            for i, v in enumerate(views)
        },
    )
    if exam_models:
        result.cancer = {
            "image_only": {"left_benign": 0.2, "right_benign": 0.3, "left_malignant": 0.1, "right_malignant": 0.5}
        }
        result.density = {"histogram": {"probabilities": [0.1, 0.6, 0.2, 0.1], "category": "b"}}
        result.models |= {m: _prov(m) for m in ("image_only", "density_histogram")}
    return result


def _build(headers, images, views, exam_models=False):
    result = _result(headers, views, exam_models)
    sources = {v: SourceImage(view=v, dataset=headers[v], grey=images[v], orientation=Orientation(v)) for v in views}
    objects = build_objects(result, sources, result.study_instance_uid, "key-" + "-".join(views))
    return result, {o.kind: o.dataset for o in objects}


@pytest.mark.parametrize("views", [UNILATERAL, CC_ONLY], ids=["unilateral", "cc-only"])
def test_partial_result_objects_say_what_is_missing_and_pass_dciodvfy(headers, images, views, tmp_path, artifacts):
    result, objects = _build(headers, images, views)
    missing = [v for v in VIEWS if v not in views]
    # Heatmap SCs only for the views present; no CAD SR (docs/conformance.md); no Parametric
    # Map without a heatmap.
    assert set(objects) == {*(f"sc-malignant-{v}" for v in views), "summary", "sr"}
    for kind, ds in objects.items():
        path = tmp_path / f"{kind}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert not _dciodvfy_errors(path), f"{kind}: {_dciodvfy_errors(path)}"
    sr = objects["sr"]
    comments = _comments(sr)
    assert any("Partial result" in c and ", ".join(missing) in c for c in comments), comments
    assert any("view-wise (exam) cancer models" in c and "did not run" in c for c in comments), comments
    # One group per image and image-wise model: P(cancer) = malignant, P(benign), the image's
    # laterality and view coded, the image as source; no per-breast or density group.
    groups = _groups(sr)
    assert len(groups) == len(views) * len(IMAGEWISE_MODELS)
    for group in groups:
        items = list(group.ContentSequence)
        source = next(i for i in _walk(group) if i.ValueType == "IMAGE")
        ds = next(
            headers[v]
            for v in views
            if headers[v].SOPInstanceUID == source.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        )
        view = f"{ds.ImageLaterality}-{ds.ViewPosition}"
        nums = {
            _code(i.ConceptNameCodeSequence): float(i.MeasuredValueSequence[0].NumericValue)
            for i in items
            if i.ValueType == "NUM"
        }
        model = next(
            m for m in IMAGEWISE_MODELS if any(spec(m).short_title in str(i.get("TextValue", "")) for i in items)
        )
        expected = result.images[view][model]
        assert nums == {P_CANCER: round(100 * expected["malignant"], 2), P_BENIGN: round(100 * expected["benign"], 2)}
        codes = {_code(i.ConceptNameCodeSequence): _code(i.ConceptCodeSequence) for i in items if i.ValueType == "CODE"}
        assert codes[IMAGE_VIEW] == VIEW_CID_4014[view.split("-")[1]]
        site = next(
            i for i in items if i.ValueType == "CODE" and _code(i.ConceptNameCodeSequence) == ("363698007", "SCT")
        )
        assert _code(site.ContentSequence[0].ConceptCodeSequence) == LATERALITY_CID_244[view[0]]
    library = [i for i in _walk(sr) if i.ValueType == "IMAGE" and i.RelationshipType == "CONTAINS"]
    assert {str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for i in library} == {
        str(headers[v].SOPInstanceUID) for v in views
    }
    summary = objects["summary"]
    assert summary.ImageLaterality == ("L" if views == UNILATERAL else "B")
    assert {str(s.ReferencedSOPInstanceUID) for s in summary.SourceImageSequence} == {
        str(headers[v].SOPInstanceUID) for v in views
    }
    name = "unilateral" if views == UNILATERAL else "cc-only"
    Image.fromarray(summary.pixel_array).save(artifacts / f"partial-{name}-summary.png")  # YBR_RCT undone


def test_complete_exam_sr_has_image_groups_beside_breast_groups(headers, images, tmp_path, artifacts):
    _, objects = _build(headers, images, VIEWS, exam_models=True)
    assert "cad_sr" in objects
    sr = objects["sr"]
    groups = _groups(sr)
    # image_only x 2 breasts, the ensemble x 2, the histogram density, 4 images x 2 image-wise models
    assert len(groups) == 2 + 2 + 1 + 4 * len(IMAGEWISE_MODELS)
    assert not any("Partial result" in c for c in _comments(sr))
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert not _dciodvfy_errors(path)
    names = [
        str(i.Manufacturer) + " " + str(i.get("ManufacturerModelName", "")) for i in sr.ContributingEquipmentSequence
    ]
    assert any("image-wise" in n for n in names), names
    Image.fromarray(objects["summary"].pixel_array).save(artifacts / "complete-with-imagewise-summary.png")


# --- assembly, process, retry (no pipeline) ------------------------------------------------


@pytest.fixture(scope="module")
def migrated(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("schema") / "schema.sqlite"
    database = Database(f"sqlite:///{path}")
    upgrade(database.engine)
    database.dispose()
    return path


@pytest.fixture
def db(tmp_path, migrated):
    shutil.copyfile(migrated, tmp_path / "t.sqlite")
    database = Database(f"sqlite:///{tmp_path / 't.sqlite'}")
    yield database
    database.dispose()


def test_incomplete_policy_image_wise_queues_a_partial_job_and_wait_does_not(db):
    waiting = uid()
    receive(db, waiting, views=UNILATERAL)
    later = utcnow() + seconds(INCOMPLETE_S + 1)
    with db.session() as s:
        result = tick(s, QUIET_S, INCOMPLETE_S, now=later, incomplete_policy="wait")
    assert result.incomplete == [waiting] and result.partial == []
    assert study(db, waiting).state == "incomplete" and jobs_of(db, study(db, waiting).id) == []

    other, unusable = uid(), uid()
    receive(db, other, views=("L-CC", "R-CC"))
    receive(db, unusable, views=("L-CC",), usable=False)
    with db.session() as s:
        result = tick(s, QUIET_S, INCOMPLETE_S, now=later, incomplete_policy="image_wise")
    assert result.partial == [other] and result.incomplete == [unusable]
    row = study(db, other)
    assert row.state == "queued" and row.note.endswith("missing views: L-MLO, R-MLO")
    [job] = jobs_of(db, row.id)
    assert job.selection_key == row.selection_key
    # The worker finishing the partial run keeps the note; a full exam later gets a new selection key.
    with db.session() as s:
        claimed = claim(s, "w1")
        finish(s, claimed.job_id, "w1", {}, {}, note="partial result (image-wise models only); missing views: L-MLO")
    assert study(db, other).state == "done" and "partial result" in study(db, other).note
    receive(db, other, views=("L-MLO", "R-MLO"))
    full = study(db, other)
    assert full.state == "receiving" and full.selection_key != job.selection_key


def test_process_queues_a_waiting_study_and_refuses_the_others(db):
    incomplete, receiving, nothing = uid(), uid(), uid()
    receive(db, incomplete, views=UNILATERAL)
    with db.session() as s:
        tick(s, QUIET_S, INCOMPLETE_S, now=utcnow() + seconds(INCOMPLETE_S + 1))
    receive(db, receiving, views=VIEWS)
    receive(db, nothing, views=("L-CC",), usable=False)
    with db.session() as s:
        out = process(s, s.get(Study, study(db, incomplete).id))
    assert out == {
        "study_instance_uid": incomplete,
        "job_queued": True,
        "partial": True,
        "missing_views": ["R-CC", "R-MLO"],
    }
    with db.session() as s:
        assert process(s, s.get(Study, study(db, receiving).id))["partial"] is False
    assert study(db, incomplete).state == study(db, receiving).state == "queued"
    for target, message in ((incomplete, "already queued"), (nothing, "no usable image")):
        with db.session() as s, pytest.raises(ValueError, match=message):
            process(s, s.get(Study, study(db, target).id))
    with db.session() as s:
        claimed = claim(s, "w1")
        finish(s, claimed.job_id, "w1", {}, {})
    with db.session() as s, pytest.raises(ValueError, match="already processed"):
        process(s, s.get(Study, study(db, incomplete).id))
    # retry --force runs a partial result again the same way; an incomplete study is refused.
    with db.session() as s:
        assert admin.retry(s, s.get(Study, study(db, incomplete).id), force=True)["job_queued"] is True


def test_partial_runs_use_the_configured_image_wise_models_else_those_installed(tmp_path):
    options = PipelineOptions(weights_dir=tmp_path)
    with pytest.raises(WeightsError, match="no image-wise model can run"):
        partial_options(options, [])
    (tmp_path / spec("image_only_imagewise").file).write_bytes(b"")
    assert partial_options(options, []).models == ("image_only_imagewise",)
    assert partial_options(options, ["image_only", "image_only_imagewise"]).models == ("image_only_imagewise",)
    with pytest.raises(WeightsError):  # configured, but its weights (and the patch model's) are missing
        partial_options(options, ["image_heatmaps_imagewise"])


def test_incomplete_policy_setting(tmp_path):
    assert load_config(REPO / "config.toml", environ={}).study.incomplete_policy == "wait"
    env = load_config(None, environ={"MAMMONODE_STUDY_INCOMPLETE_POLICY": "image_wise"})
    assert env.study.incomplete_policy == "image_wise"
    bad = tmp_path / "bad.toml"
    bad.write_text('[study]\nincomplete_policy = "guess"\n')
    with pytest.raises(ConfigError, match="study.incomplete_policy"):
        load_config(bad, environ={})


# --- the node: a unilateral and a CC-only study ----------------------------------------------


def _unilateral(tmp: Path) -> list[Path]:
    """The density exam's left breast (L-CC, L-MLO) as a study of its own (mgdicom.py)."""
    folder = need_shared("samples", "png", "density-exam")
    out = tmp / "unilateral"
    tool = need_shared("tools", "mgdicom.py")
    views = [a for v in UNILATERAL for a in ("--view", f"{v}={folder / (v + '.png')}")]
    subprocess.run(
        [
            sys.executable,
            str(tool),
            str(out),
            *views,
            "--key",
            "mammonode-unilateral",
            "--patient-id",
            "UNI1",
            "--bits-from-8",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return sorted(out.glob("*.dcm"))


def _state(node, uid: str) -> str | None:
    return next((s["state"] for s in node.studies() if s["study_instance_uid"] == uid), None)


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def _received(scp: StoreSCP, study_uid: str) -> dict[Path, pydicom.Dataset]:
    out = {}
    for f in scp.files():
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        if ds.StudyInstanceUID == study_uid:
            out[f] = ds
    return out


@pytest.mark.slow
@pytest.mark.network
def test_node_delivers_partial_results_with_image_wise_and_waits_otherwise(node_factory, tmp_path, test_weights_dir):
    unilateral = _unilateral(tmp_path)
    cc_only = sorted(need_shared("samples", "dicom", "nyu1-cc").glob("*.dcm"))
    studies = {
        "unilateral": (_uid(unilateral[0]), ["R-CC", "R-MLO"]),
        "cc-only": (_uid(cc_only[0]), ["L-MLO", "R-MLO"]),
    }
    port = free_port()
    scp = StoreSCP(tmp_path / "scp", port, options=("+xa",)).start()
    fast = {"models": ["image_only_imagewise"], "epochs": 1, "augmentation": False}
    destination = [{"name": "archive", "ae_title": "STORESCP", "host": "127.0.0.1", "port": port}]
    timers = {"quiet_period_s": 1.0, "incomplete_timeout_s": 6.0}
    try:
        image_wise = node_factory(
            weights_dir=test_weights_dir,
            study={**timers, "incomplete_policy": "image_wise"},
            pipeline=fast,
            destinations=destination,
        ).start()
        wait = node_factory(weights_dir=test_weights_dir, study=timers, pipeline=fast).start()
        for node in (image_wise, wait):
            storescu(node.port, unilateral)
            storescu(node.port, cc_only, "-xv")  # JPEG 2000 lossless files need that context proposed

        for name, (uid_, missing) in studies.items():
            image_wise.wait_for(lambda u=uid_: _state(image_wise, u) == "done", 300, interval=1, what=f"{name} done")
            detail = image_wise.study(uid_)
            assert detail["missing_views"] == missing
            assert detail["note"].startswith("partial result") and ", ".join(missing) in detail["note"]
            present = [v for v in VIEWS if v not in missing]
            assert sorted(detail["result"]["images"]) == sorted(present)
            assert detail["result"]["cancer"] == {} and set(detail["result"]["models"]) == {"image_only_imagewise"}
            kinds = {r["kind"] for r in detail["results"]}
            assert {"sr", "summary", *(f"sc-malignant-{v}" for v in present)} <= kinds and "cad_sr" not in kinds

            def delivered(u=uid_):
                rows = [d["state"] for r in image_wise.study(u)["results"] for d in r["deliveries"]]
                return rows and all(s == "delivered" for s in rows)

            image_wise.wait_for(delivered, 60, interval=1, what=f"{name} delivered")
            received = _received(scp, uid_)
            classes = sorted(str(ds.SOPClassUID) for ds in received.values())
            assert classes.count(SC) == len(present) + 1 and classes.count(SR_3D) == 1, classes
            [sr] = [f for f, ds in received.items() if ds.SOPClassUID == SR_3D]
            assert any("Partial result" in c for c in _comments(pydicom.dcmread(sr)))

        # With "wait", both stay incomplete and nothing runs ...
        for name, (uid_, _) in studies.items():
            wait.wait_for(lambda u=uid_: _state(wait, u) == "incomplete", 60, what=f"{name} incomplete (wait)")
            assert wait.study(uid_)["jobs"] == []
        # ... until `mammonode process` asks for a partial result.
        uid_, missing = studies["unilateral"]
        out = cli("process", uid_, config=wait.config)
        assert "partial result" in out.stdout and ", ".join(missing) in out.stdout
        wait.wait_for(lambda: _state(wait, uid_) == "done", 300, interval=1, what="processed study done")
        assert {"sr", "summary"} <= {r["kind"] for r in wait.study(uid_)["results"]}
        again = cli("process", uid_, config=wait.config, check=False)
        assert again.returncode == 1 and "already processed (done)" in again.stderr
        assert len(again.stderr.strip().splitlines()) == 1
        unknown = cli("process", "1.2.3.4.5.6.7.8.9", config=wait.config, check=False)
        assert unknown.returncode != 0 and "no study" in unknown.stderr
        assert _state(wait, studies["cc-only"][0]) == "incomplete"
    finally:
        scp.stop()
