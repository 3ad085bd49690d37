"""Admin actions that touch both the database and the storage directory."""

from __future__ import annotations

import shutil

from mammonode import audit
from mammonode.db import admin
from mammonode.db.session import Database
from mammonode.ingest.layout import StorageLayout


def purge(db: Database, layout: StorageLayout, older_than_days: float, dry_run: bool = False) -> dict:
    """Remove the files and rows of finished studies not touched for ``older_than_days``
    (never one with deliveries still pending)."""
    with db.session() as session:
        studies, pending = admin.purgeable(session, older_than_days)
        removed = [study.study_instance_uid for study in studies]
        patients = {study.study_instance_uid: study.patient_id or "" for study in studies}
        freed = sum(
            path.stat().st_size
            for study in studies
            for folder in layout.study_dirs(study.study_instance_uid)
            if folder.is_dir()
            for path in folder.rglob("*")
            if path.is_file()
        )
        if not dry_run:
            for study in studies:
                for folder in layout.study_dirs(study.study_instance_uid):
                    shutil.rmtree(folder, ignore_errors=True)
                session.delete(study)
    ctx = audit.context()
    if ctx is not None and not dry_run:
        for uid in removed:  # 110105 once the removal is committed
            study = audit.StudyObjects(uid, patients[uid])
            audit.emit(audit.messages.study_deleted(ctx.source, ctx.local_user(), study))
    return {
        "removed": len(removed),
        "skipped_pending_deliveries": pending,
        "study_instance_uids": removed,
        "bytes": freed,
        "dry_run": dry_run,
    }
