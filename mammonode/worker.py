"""Pipeline worker: claims one job at a time, runs the pipeline, stores and queues results.

Runs as threads inside ``mammonode serve`` or as ``mammonode worker`` processes against the
same database. A heartbeat thread keeps the job's claim alive; a worker that dies stops
heartbeating and its job is re-queued by whichever process next sweeps for stale jobs.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
import uuid

from sqlalchemy import select

from mammonode.config import Config
from mammonode.db import jobs
from mammonode.db.models import Instance, Study
from mammonode.db.records import selection, selection_key
from mammonode.db.session import Database
from mammonode.metrics import METRICS
from mammonode.pipeline.images import ImageInputError, prepare_dicom, read_dicom
from mammonode.pipeline.run import PipelineOptions, run_pipeline
from mammonode.pipeline.weights import WeightsError
from mammonode.views import VIEWS

log = logging.getLogger("mammonode.worker")


class JobSuperseded(Exception):
    """The study's inputs changed after the job was queued."""


def pipeline_options(cfg: Config, device: str | None = None) -> PipelineOptions:
    p = cfg.pipeline
    return PipelineOptions(
        weights_dir=cfg.weights_dir,
        device=device or p.device,
        seed=p.seed,
        epochs=p.epochs,
        augmentation=p.augmentation,
        models=tuple(p.models),
        precision=p.precision,
        heatmap_batch=p.heatmap_batch,
        threads=p.threads or None,
    )


class PipelineWorker:
    def __init__(self, cfg: Config, db: Database, device: str | None = None, worker_id: str | None = None):
        self.cfg = cfg
        self.db = db
        self.device = device or cfg.pipeline.device
        self.id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.current_job: int | None = None
        self._stop = threading.Event()

    # -- one job --------------------------------------------------------------------------
    def _inputs(self, claimed: jobs.ClaimedJob) -> tuple[dict, dict, float, Study]:
        """The prepared views, their headers (kept for the result objects, pixel data
        dropped) and the seconds spent; each file is read once."""
        with self.db.session() as session:
            study = session.get(Study, claimed.study_id)
            instances = list(session.execute(select(Instance).where(Instance.study_id == study.id)).scalars())
            chosen = selection(instances)
            if selection_key(chosen) != claimed.selection_key:
                raise JobSuperseded("the study's inputs changed after the job was queued")
            session.expunge_all()
        prepared, headers = {}, {}
        start = time.perf_counter()
        for view in VIEWS:
            inst = chosen[view]
            path = self.cfg.storage_dir / inst.path
            try:
                ds = read_dicom(path)
                prepared[view] = prepare_dicom(view, ds, inst.sop_instance_uid)
            except ImageInputError as exc:
                raise ImageInputError(f"{view}: {exc}", view=view) from exc
            prepared[view].study_instance_uid = study.study_instance_uid
            del ds.PixelData
            headers[view] = ds
        return prepared, headers, time.perf_counter() - start, study

    def process(self, claimed: jobs.ClaimedJob) -> None:
        from mammonode.dicom_out.results import store_results

        log.info("job %s: study %s attempt %s", claimed.job_id, claimed.study_instance_uid, claimed.attempt)
        prepared, headers, seconds, study = self._inputs(claimed)
        result = run_pipeline(prepared, pipeline_options(self.cfg, self.device), {"prepare": seconds})
        METRICS.observe_job(result.timing_s)
        stored = store_results(self.cfg, self.db, claimed, study, result, prepared, headers)
        with self.db.session() as session:
            if not jobs.finish(session, claimed.job_id, self.id, result.timing_s, result.as_dict()):
                log.warning("job %s was taken from this worker; its result is discarded", claimed.job_id)
                return
        log.info(
            "job %s done in %.1f s: %d result objects", claimed.job_id, result.timing_s.get("total", 0), len(stored)
        )

    # -- loop -----------------------------------------------------------------------------
    def _heartbeat_loop(self) -> None:
        interval = self.cfg.worker.heartbeat_interval_s
        while not self._stop.wait(interval):
            try:
                with self.db.session() as session:
                    jobs.heartbeat(session, self.id, self.current_job)
            except Exception as exc:
                log.warning("heartbeat failed: %s", type(exc).__name__)

    def run_once(self) -> bool:
        """Claim and process one job. Returns whether there was one."""
        with self.db.session() as session:
            jobs.recover_stale(session, self.cfg.worker.stale_after_s, self.cfg.worker.max_attempts)
        with self.db.session() as session:
            claimed = jobs.claim(session, self.id)
        if claimed is None:
            return False
        self.current_job = claimed.job_id
        try:
            self.process(claimed)
        except JobSuperseded as exc:
            with self.db.session() as session:
                jobs.fail(session, claimed.job_id, self.id, str(exc), self.cfg.worker.max_attempts, permanent=True)
        except (ImageInputError, WeightsError) as exc:
            log.error("job %s failed: %s", claimed.job_id, exc)
            with self.db.session() as session:
                jobs.fail(
                    session,
                    claimed.job_id,
                    self.id,
                    f"{type(exc).__name__}: {exc}",
                    self.cfg.worker.max_attempts,
                    permanent=True,
                )
                if isinstance(exc, ImageInputError) and exc.view is not None:
                    flag_unusable(session, claimed, exc.view, str(exc))
        except Exception as exc:
            log.error("job %s failed: %s\n%s", claimed.job_id, exc, traceback.format_exc(limit=5))
            with self.db.session() as session:
                jobs.fail(
                    session, claimed.job_id, self.id, f"{type(exc).__name__}: {exc}", self.cfg.worker.max_attempts
                )
        finally:
            self.current_job = None
        return True

    def run(self) -> None:
        with self.db.session() as session:
            jobs.register_worker(session, self.id, self.device)
        beat = threading.Thread(target=self._heartbeat_loop, name=f"heartbeat-{self.id}", daemon=True)
        beat.start()
        log.info("worker %s started (device %s)", self.id, self.device)
        while not self._stop.is_set():
            try:
                busy = self.run_once()
            except Exception as exc:
                log.error("worker loop error: %s", exc)
                busy = False
            if not busy:
                self._stop.wait(self.cfg.worker.poll_interval_s)

    def stop(self) -> None:
        """Stop taking jobs; a job still running is handed back to the queue."""
        self._stop.set()
        job = self.current_job
        try:
            with self.db.session() as session:
                if job is not None:
                    jobs.release(session, job, self.id)
                jobs.worker_stopped(session, self.id)
        except Exception as exc:
            log.warning("could not release job %s at shutdown: %s", job, type(exc).__name__)


def flag_unusable(session, claimed: jobs.ClaimedJob, view: str, reason: str) -> None:
    """An input that cannot be read or has no breast in it is taken out of the selection, so
    the study runs again with another image of that view or waits for one (and then shows
    up as incomplete), instead of failing the same way forever."""
    from mammonode.db.records import record_event, refresh_selection

    study = session.get(Study, claimed.study_id)
    instances = list(session.execute(select(Instance).where(Instance.study_id == study.id)).scalars())
    chosen = selection(instances).get(view)
    if chosen is None:
        return
    chosen.usable = False
    chosen.reason = f"not usable as pipeline input: {reason}"[:1000]
    session.flush()
    record_event(
        session,
        "ERROR",
        "instance-unusable",
        f"{view} instance {chosen.sop_instance_uid}: {reason}",
        study.study_instance_uid,
    )
    refresh_selection(session, study)
