"""``mammonode serve``: the listeners, the study assembler, workers and the delivery senders
(one per destination) in one process, with a clean stop on SIGTERM (no new associations,
in-flight C-STOREs finish, a running job goes back to the queue)."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from mammonode import audit
from mammonode.config import Config
from mammonode.ingest.dimse import DimseListener
from mammonode.ingest.recovery import recover
from mammonode.service.assembler import Assembler
from mammonode.service.loop import Loop
from mammonode.service.notifier import notifiers
from mammonode.service.sender import release_dead_claims, senders
from mammonode.service.startup import StartupError, open_node_database
from mammonode.service.worker import PipelineWorker, warn_missing_weights

log = logging.getLogger(__name__)


def _audit_activity(started: bool) -> None:
    """110100 Application Activity: start once listening, stop once every listener closed."""
    ctx = audit.context()
    if ctx is not None:
        app = ctx.node(False, audit.messages.APPLICATION)
        launcher = audit.Participant(ctx.local_user().user_id, True, audit.messages.APPLICATION_LAUNCHER)
        audit.emit(audit.messages.application_activity(ctx.source, app, started, launcher))


class Node:
    def __init__(self, cfg: Config, workers: bool | None = None):
        self.cfg = cfg
        self.db = open_node_database(cfg)
        self.stop_event = threading.Event()
        self.listener = DimseListener(cfg, self.db)
        run_workers = cfg.worker.enabled if workers is None else workers
        self.workers = [PipelineWorker(cfg, self.db) for _ in range(cfg.worker.concurrency)] if run_workers else []
        for index, worker in enumerate(self.workers):
            worker.name = f"worker-{index}"
        self.loops: list[Loop] = [
            Assembler(cfg.study, self.db),
            *senders(cfg, self.db),
            *notifiers(cfg, self.db),
            *self.workers,
        ]
        self.web = None
        if cfg.dicomweb.enabled:
            from mammonode.web.app import WebServer

            self.web = WebServer(cfg, self.db)
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        removed = recover(self.cfg.storage_dir, self.db, min_age_s=0.0 if self.db.sqlite else 600.0)
        if any(removed.values()):
            log.warning("start-up recovery removed %s", removed)
        node = self.cfg.node
        try:
            self.listener.start()
        except OSError as exc:
            raise StartupError(f"DIMSE port {node.host}:{node.port}: {exc.strerror or exc}") from None
        if self.web is not None:
            try:
                self.web.start()
            except OSError as exc:
                self.listener.stop(grace_s=0)
                web = self.cfg.dicomweb
                raise StartupError(f"HTTP port {web.host}:{web.port}: {exc.strerror or exc}") from None
        if self.workers:
            warn_missing_weights(self.workers[0].options)
        # Before the senders start: what a killed process on this host was sending is due now,
        # not after the claim timeout.
        release_dead_claims(self.db)
        for loop in self.loops:
            thread = threading.Thread(target=loop.run, name=loop.name, daemon=True)
            thread.start()
            self.threads.append(thread)

    def stop(self) -> None:
        log.info("stopping: no new associations, letting in-flight transfers finish")
        self.listener.stop()
        if self.web is not None:
            self.web.stop()
        self.stop_event.set()
        for loop in self.loops:
            loop.stop()
        log.info("stopped")

    def serve_forever(self) -> None:
        def _signal(signum, _frame):
            log.info("received %s", signal.Signals(signum).name)
            self.stop_event.set()

        signal.signal(signal.SIGTERM, _signal)
        signal.signal(signal.SIGINT, _signal)
        audit.open_trail(self.cfg, send=True)
        self.start()
        _audit_activity(started=True)
        try:
            while not self.stop_event.is_set():
                time.sleep(0.2)
        finally:
            self.stop()
        _audit_activity(started=False)
        audit.close_trail()
        if any(t.is_alive() for t in self.threads if t.name.startswith("worker")):
            # A worker may be inside PyTorch; its job is already back in the queue. Interpreter
            # shutdown under a running native thread can abort, so leave without it.
            logging.shutdown()
            os._exit(0)
