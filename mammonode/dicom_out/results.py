"""Building a study version's result objects, keeping them, and queueing their delivery."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from sqlalchemy import select

from mammonode.config import Config
from mammonode.db.models import Delivery, DeliveryState, ResultObject, Study
from mammonode.db.session import Database
from mammonode.dicom_out.content import density_lines, model_identity, score_table
from mammonode.dicom_out.render import NOT_FOR_DIAGNOSIS, TEST_NOTICE_BURNED, summary_image
from mammonode.dicom_out.secondary_capture import SourceImage, heatmap_sc, overlay_pixels, summary_sc
from mammonode.dicom_out.sr import build_sr
from mammonode.dicom_out.uids import stable_uid
from mammonode.pipeline.images import PreparedView
from mammonode.pipeline.run import PipelineResult
from mammonode.views import VIEWS

log = logging.getLogger("mammonode.results")


@dataclass
class BuiltObject:
    kind: str
    dataset: Dataset


def sources_from_prepared(
    prepared: Mapping[str, PreparedView], headers: Mapping[str, Dataset]
) -> dict[str, SourceImage]:
    out = {}
    for view in VIEWS:
        p = prepared[view]
        grey = p.image[:, ::-1] if p.mirrored else p.image
        out[view] = SourceImage(view=view, dataset=headers[view], grey=np.ascontiguousarray(grey), mirrored=p.mirrored)
    return out


def build_objects(
    result: PipelineResult,
    sources: Mapping[str, SourceImage],
    study_uid: str,
    selection_key: str,
    benign_overlays: bool = False,
) -> list[BuiltObject]:
    """SCs (one malignant-heatmap overlay per view, optionally benign), the summary, then the
    SR that references them all. UIDs are stable for (study, inputs, kind)."""
    objects: list[BuiltObject] = []
    headers = [sources[v].dataset for v in VIEWS]
    kinds = ["malignant"] + (["benign"] if benign_overlays else [])
    panels = {}
    for kind in kinds:
        series_uid = stable_uid(study_uid, selection_key, f"series-heatmap-{kind}")
        for number, view in enumerate(VIEWS, start=1):
            sop_uid = stable_uid(study_uid, selection_key, f"sc-{kind}-{view}")
            pixels = overlay_pixels(result, sources[view], kind)
            sc = heatmap_sc(sources[view], pixels, kind, series_uid, sop_uid, number)
            sc.ImageComments = model_identity(result)
            objects.append(BuiltObject(kind=f"sc-{kind}-{view}", dataset=sc))
            if kind == "malignant":
                panels[view] = pixels
    notices = [NOT_FOR_DIAGNOSIS] + ([TEST_NOTICE_BURNED] if result.test_weights else [])
    pixels = summary_image(panels, score_table(result), density_lines(result), notices)
    summary = summary_sc(
        pixels,
        headers[0],
        headers,
        stable_uid(study_uid, selection_key, "series-summary"),
        stable_uid(study_uid, selection_key, "summary"),
    )
    summary.ImageComments = model_identity(result)
    objects.append(BuiltObject(kind="summary", dataset=summary))
    produced = [o.dataset for o in objects]
    sr = build_sr(
        result,
        headers,
        produced,
        stable_uid(study_uid, selection_key, "series-sr"),
        stable_uid(study_uid, selection_key, "sr"),
    )
    objects.append(BuiltObject(kind="sr", dataset=sr))
    return objects


def _write_durably(ds: Dataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_suffix(".part")
    ds.save_as(temp, enforce_file_format=True)
    with open(temp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(temp, path)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def result_path(storage_dir: Path, study_uid: str, kind: str, sop_uid: str) -> Path:
    return storage_dir / "results" / study_uid / f"{kind}.{sop_uid}.dcm"


def store_results(
    cfg: Config,
    db: Database,
    claimed,
    study: Study,
    result: PipelineResult,
    prepared: Mapping[str, PreparedView],
    headers: Mapping[str, Dataset],
) -> list[ResultObject]:
    """Build, write and register the result objects of one job, with one delivery row per
    destination. Re-running the same inputs finds the same UIDs and adds nothing twice.
    ``headers``: the source data sets (pixel data not needed)."""
    sources = sources_from_prepared(prepared, headers)
    objects = build_objects(result, sources, study.study_instance_uid, claimed.selection_key)
    stored = []
    for obj in objects:
        path = result_path(cfg.storage_dir, study.study_instance_uid, obj.kind, obj.dataset.SOPInstanceUID)
        _write_durably(obj.dataset, path)
    with db.session() as session:
        for obj in objects:
            uid = str(obj.dataset.SOPInstanceUID)
            path = result_path(cfg.storage_dir, study.study_instance_uid, obj.kind, uid)
            row = session.execute(select(ResultObject).where(ResultObject.sop_instance_uid == uid)).scalar_one_or_none()
            if row is None:
                row = ResultObject(
                    study_id=study.id,
                    job_id=claimed.job_id,
                    selection_key=claimed.selection_key,
                    kind=obj.kind,
                    sop_class_uid=str(obj.dataset.SOPClassUID),
                    sop_instance_uid=uid,
                    path=str(path.relative_to(cfg.storage_dir)),
                )
                session.add(row)
                session.flush()
            existing = {
                d.destination for d in session.execute(select(Delivery).where(Delivery.result_id == row.id)).scalars()
            }
            for dest in cfg.destinations:
                if dest.name not in existing:
                    session.add(Delivery(result_id=row.id, destination=dest.name, state=DeliveryState.PENDING))
            stored.append(row)
    return stored
