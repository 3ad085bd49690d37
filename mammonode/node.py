"""``mammonode serve``: the listener, the study assembler, workers and the delivery sender
in one process, with a clean stop on SIGTERM (no new associations, in-flight C-STOREs
finish, a running job goes back to the queue)."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from mammonode.config import Config
from mammonode.db import assembly, open_database
from mammonode.dicom_out.delivery import DeliverySender
from mammonode.metrics import METRICS
from mammonode.scp.dimse import DimseListener
from mammonode.scp.storage import recover
from mammonode.worker import PipelineWorker

log = logging.getLogger("mammonode.node")


class Node:
    def __init__(self, cfg: Config, workers: bool | None = None):
        self.cfg = cfg
        self.db = open_database(cfg)
        self.stop_event = threading.Event()
        self.listener = DimseListener(cfg, self.db)
        run_workers = cfg.worker.enabled if workers is None else workers
        self.workers = [PipelineWorker(cfg, self.db) for _ in range(cfg.worker.concurrency)] if run_workers else []
        self.sender = DeliverySender(cfg, self.db)
        self.web = None
        if cfg.dicomweb.enabled:
            from mammonode.scp.dicomweb import DicomWebServer

            self.web = DicomWebServer(cfg, self.db)
        METRICS.attach_database(self.db)
        self.threads: list[threading.Thread] = []

    def _assembler(self) -> None:
        interval = max(0.5, min(5.0, self.cfg.study.quiet_period_s / 4 or 0.5))
        while not self.stop_event.wait(interval):
            try:
                with self.db.session() as session:
                    result = assembly.tick(session, self.cfg.study.quiet_period_s, self.cfg.study.incomplete_timeout_s)
                for uid in result.queued:
                    log.info("study %s: complete and quiet, job queued", uid)
                for uid in result.incomplete:
                    log.warning("study %s: incomplete after timeout", uid)
            except Exception as exc:
                log.error("assembly tick failed: %s", type(exc).__name__)

    def start(self) -> None:
        removed = recover(self.cfg.storage_dir, self.db, min_age_s=0.0 if self.db.sqlite else 600.0)
        if any(removed.values()):
            log.warning("start-up recovery removed %s", removed)
        self.listener.start()
        if self.web is not None:
            self.web.start()
        targets = [("assembler", self._assembler), ("sender", self.sender.run)]
        targets += [(f"worker-{i}", w.run) for i, w in enumerate(self.workers)]
        for name, target in targets:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self.threads.append(thread)

    def stop(self) -> None:
        log.info("stopping: no new associations, letting in-flight transfers finish")
        self.listener.stop()
        if self.web is not None:
            self.web.stop()
        self.stop_event.set()
        for worker in self.workers:
            worker.stop()
        self.sender.stop()
        log.info("stopped")

    def serve_forever(self) -> None:
        def _signal(signum, _frame):
            log.info("received %s", signal.Signals(signum).name)
            self.stop_event.set()

        signal.signal(signal.SIGTERM, _signal)
        signal.signal(signal.SIGINT, _signal)
        self.start()
        try:
            while not self.stop_event.is_set():
                time.sleep(0.2)
        finally:
            self.stop()
        if any(t.is_alive() for t in self.threads if t.name.startswith("worker")):
            # A worker may be inside PyTorch; its job is already back in the queue. Interpreter
            # shutdown under a running native thread can abort, so leave without it.
            logging.shutdown()
            os._exit(0)
