"""The assembler loop: turns complete, quiet studies into jobs and marks studies that stay
incomplete, or queues them for a partial result (``study.incomplete_policy``; the rules
themselves are in db.assembly)."""

from __future__ import annotations

import logging

from mammonode.config import StudySection
from mammonode.db import assembly
from mammonode.db.session import Database
from mammonode.service.loop import Loop

log = logging.getLogger(__name__)


class Assembler(Loop):
    name = "assembler"

    def __init__(self, study: StudySection, db: Database):
        super().__init__(interval_s=max(0.5, min(5.0, study.quiet_period_s / 4 or 0.5)))
        self.study = study
        self.db = db

    def run_once(self) -> bool:
        with self.db.session() as session:
            result = assembly.tick(
                session,
                self.study.quiet_period_s,
                self.study.incomplete_timeout_s,
                incomplete_policy=self.study.incomplete_policy,
            )
        for uid in result.queued:
            log.info("study %s: complete and quiet, job queued", uid)
        for uid in result.incomplete:
            log.warning("study %s: incomplete after timeout", uid)
        for uid in result.partial:
            log.warning("study %s: incomplete after timeout; job queued for a partial result (image-wise)", uid)
        return False
