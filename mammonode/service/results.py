"""Keeping a job's result objects: written durably under the storage directory, then
registered in the database with one outbox row per destination, in that order (a row never
points at a file that is not there)."""

from __future__ import annotations

from collections.abc import Mapping

from pydicom.dataset import Dataset

from mammonode.config import Config
from mammonode.db import outbox
from mammonode.db.models import ResultObject, Study
from mammonode.db.session import Database
from mammonode.ingest.layout import StorageLayout, write_dataset
from mammonode.pipeline.images import PreparedView
from mammonode.pipeline.run import PipelineResult
from mammonode.reporting.objects import build_objects, sources_from_prepared


def store_results(
    cfg: Config,
    db: Database,
    claimed,
    study: Study,
    result: PipelineResult,
    prepared: Mapping[str, PreparedView],
    headers: Mapping[str, Dataset],
) -> list[ResultObject]:
    """Build, write and register the result objects of one job. Re-running the same inputs
    finds the same UIDs and adds nothing twice. ``headers``: the source data sets (pixel data
    not needed)."""
    layout = StorageLayout(cfg.storage_dir)
    sources = sources_from_prepared(prepared, headers)
    objects = build_objects(result, sources, study.study_instance_uid, claimed.selection_key)
    written = []
    for obj in objects:
        path = layout.result_path(study.study_instance_uid, obj.kind, str(obj.dataset.SOPInstanceUID))
        write_dataset(obj.dataset, path, layout)
        written.append(
            outbox.NewResult(
                kind=obj.kind,
                sop_class_uid=str(obj.dataset.SOPClassUID),
                sop_instance_uid=str(obj.dataset.SOPInstanceUID),
                path=layout.relative(path),
            )
        )
    with db.session() as session:
        return outbox.register_results(
            session, study.id, claimed.job_id, claimed.selection_key, written, [d.name for d in cfg.destinations]
        )
