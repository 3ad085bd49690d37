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
from collections.abc import Sequence
from dataclasses import replace

from pydicom.dataset import Dataset

from mammonode.config import Config
from mammonode.db import jobs
from mammonode.db.assembly import partial_note
from mammonode.db.models import Study
from mammonode.db.records import mark_unusable, selection, selection_key
from mammonode.db.session import Database
from mammonode.exam.views import VIEWS
from mammonode.metrics import METRICS
from mammonode.pipeline.images import ImageInputError, PreparedView, prepare_dicom, read_dicom, without_pixels
from mammonode.pipeline.loaded import ModelCache
from mammonode.pipeline.progress import LogLines
from mammonode.pipeline.registry import IMAGEWISE_MODELS
from mammonode.pipeline.run import PipelineOptions, plan_models, run_pipeline
from mammonode.pipeline.runtime import configure_torch
from mammonode.pipeline.weights import WeightsError
from mammonode.service.errors import PatientValues
from mammonode.service.loop import Loop

log = logging.getLogger(__name__)


class JobSuperseded(Exception):
    """The study's inputs changed after the job was queued."""


def pipeline_options(cfg: Config, device: str | None = None) -> PipelineOptions:
    p = cfg.pipeline
    options = PipelineOptions(
        weights_dir=cfg.weights_dir,
        device=device or p.device,
        seed=p.seed,
        epochs=p.epochs,
        augmentation=p.augmentation,
        precision=p.precision,
        heatmap_batch=p.heatmap_batch,
        classifier_batch=p.classifier_batch,
        threads=p.threads or None,
        compile=p.compile,
    )
    if p.models:
        options.models = tuple(p.models)
    return options


def partial_options(options: PipelineOptions, configured: Sequence[str]) -> PipelineOptions:
    """The options of a partial run (a study lacking views): the image-wise models among the
    configured ones (``pipeline.models``); when none is configured, every image-wise model
    whose weights are installed. WeightsError when none can run."""
    chosen = tuple(m for m in configured if m in IMAGEWISE_MODELS)
    if not chosen:
        chosen = tuple(m for m in IMAGEWISE_MODELS if not plan_models(replace(options, models=(m,)))[1])
    partial = replace(options, models=chosen)
    if not chosen or not plan_models(partial)[0]:
        raise WeightsError(
            f"the study lacks views and no image-wise model can run on the views it has "
            f"(weights of {', '.join(IMAGEWISE_MODELS)} not installed in {options.weights_dir})"
        )
    return partial


def warn_missing_weights(options: PipelineOptions) -> dict[str, str]:
    """Say once, at start, which configured models will not run for lack of weights (each
    result says it again)."""
    _, skipped = plan_models(options)
    if skipped:
        log.warning(
            "configured models that will not run (weights in %s): %s",
            options.weights_dir,
            "; ".join(f"{name}: {reason}" for name, reason in skipped.items()),
        )
    return skipped


class JobStages(LogLines):
    """LogLines, and each stage as it begins recorded on the job (best effort: a busy
    database never stops the pipeline)."""

    def __init__(self, db: Database, job_id: int, worker_id: str):
        super().__init__(log, prefix=f"job {job_id}: ")
        self.db, self.job_id, self.worker_id = db, job_id, worker_id

    def stage(self, name: str, total: int | None = None, unit: str = "") -> None:
        super().stage(name, total, unit)
        try:
            with self.db.session() as session:
                jobs.set_stage(session, self.job_id, self.worker_id, name)
        except Exception as exc:  # noqa: BLE001 - progress is informative only
            log.debug("job %s: stage not recorded: %s", self.job_id, exc)


class PipelineWorker(Loop):
    name = "worker"

    def __init__(self, cfg: Config, db: Database, device: str | None = None, worker_id: str | None = None):
        super().__init__(interval_s=cfg.worker.poll_interval_s)
        self.cfg = cfg
        self.db = db
        self.options = pipeline_options(cfg, device)
        self.device = self.options.device
        self.id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.current_job: int | None = None
        self.patient_values = PatientValues()  # the current job's, hidden in its error messages
        self.models = ModelCache()  # loaded at the first job, kept for the next ones

    # -- one job --------------------------------------------------------------------------
    def _inputs(self, claimed: jobs.ClaimedJob) -> tuple[dict[str, PreparedView], dict[str, Dataset], float, Study]:
        """The prepared views, their headers (kept for the result objects, pixel data
        dropped) and the seconds spent; each file is read once."""
        with self.db.session() as session:
            study = session.get(Study, claimed.study_id)
            chosen = selection(study.instances)
            if selection_key(chosen) != claimed.selection_key:
                raise JobSuperseded("the study's inputs changed after the job was queued")
            self.patient_values.add("PatientName", study.patient_name)
            self.patient_values.add("PatientID", study.patient_id)
            self.patient_values.add("AccessionNumber", study.accession_number)
            session.expunge_all()
        prepared, headers = {}, {}
        start = time.perf_counter()
        for view in (v for v in VIEWS if v in chosen):  # fewer than four: a partial run
            inst = chosen[view]
            try:
                max_pixels = self.cfg.pipeline.max_pixels
                ds = read_dicom(self.cfg.storage_dir / inst.path, max_pixels)
                self.patient_values.add_dataset(ds)
                prepared[view] = prepare_dicom(view, ds, inst.sop_instance_uid, max_pixels)
            except ImageInputError as exc:
                raise ImageInputError(f"{view}: {exc}", view=view) from exc
            prepared[view].study_instance_uid = study.study_instance_uid
            headers[view] = without_pixels(ds)
        return prepared, headers, time.perf_counter() - start, study

    def process(self, claimed: jobs.ClaimedJob) -> None:
        from mammonode.service.results import store_results

        log.info("job %s: study %s attempt %s", claimed.job_id, claimed.study_instance_uid, claimed.attempt)
        prepared, headers, seconds, study = self._inputs(claimed)
        progress = JobStages(self.db, claimed.job_id, self.id)
        lacking = [v for v in VIEWS if v not in prepared]
        options = self.options
        if lacking:  # queued by study.incomplete_policy = "image_wise" or `mammonode process`
            options = partial_options(self.options, self.cfg.pipeline.models)
            log.info(
                "job %s: study lacks %s; partial result from %s",
                claimed.job_id,
                ", ".join(lacking),
                ", ".join(options.models),
            )
        result = run_pipeline(prepared, options, {"prepare": seconds}, progress, self.models)
        METRICS.observe_job(result.timing_s)
        stored = store_results(self.cfg, self.db, claimed, study, result, prepared, headers)
        note = partial_note(lacking) if lacking else None
        with self.db.session() as session:
            if not jobs.finish(session, claimed.job_id, self.id, result.timing_s, result.as_dict(), note):
                log.warning("job %s was taken from this worker; its result is discarded", claimed.job_id)
                return
        log.info(
            "job %s done in %.1f s: %d result objects", claimed.job_id, result.timing_s.get("total", 0), len(stored)
        )

    def _fail(self, claimed: jobs.ClaimedJob, error: str, permanent: bool, unusable: ImageInputError | None = None):
        with self.db.session() as session:
            jobs.fail(session, claimed.job_id, self.id, error, self.cfg.worker.max_attempts, permanent=permanent)
            if unusable is not None and unusable.view is not None:
                mark_unusable(session, claimed.study_id, unusable.view, self.patient_values.scrub(str(unusable)))

    # -- loop -----------------------------------------------------------------------------
    def started(self) -> None:
        configure_torch(self.device, self.options.precision, self.options.threads)
        with self.db.session() as session:
            jobs.register_worker(session, self.id, self.device)
        beat = threading.Thread(target=self._heartbeat_loop, name=f"heartbeat-{self.id}", daemon=True)
        beat.start()
        log.info("worker %s started (device %s)", self.id, self.device)

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.cfg.worker.heartbeat_interval_s):
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
        self.patient_values = PatientValues()
        scrub = self.patient_values.scrub  # errors name attributes, never their values
        try:
            self.process(claimed)
        except JobSuperseded as exc:
            self._fail(claimed, str(exc), permanent=True)
        except (ImageInputError, WeightsError) as exc:
            log.error("job %s failed: %s", claimed.job_id, scrub(str(exc)))
            unusable = exc if isinstance(exc, ImageInputError) else None
            self._fail(claimed, scrub(f"{type(exc).__name__}: {exc}"), permanent=True, unusable=unusable)
        except Exception as exc:
            log.error("job %s failed: %s\n%s", claimed.job_id, scrub(str(exc)), scrub(traceback.format_exc(limit=5)))
            self._fail(claimed, scrub(f"{type(exc).__name__}: {exc}"), permanent=False)
        finally:
            self.current_job = None
        return True

    def stop(self) -> None:
        """Stop taking jobs; a job still running is handed back to the queue."""
        super().stop()
        job = self.current_job
        try:
            with self.db.session() as session:
                if job is not None:
                    jobs.release(session, job, self.id)
                jobs.worker_stopped(session, self.id)
        except Exception as exc:
            log.warning("could not release job %s at shutdown: %s", job, type(exc).__name__)
