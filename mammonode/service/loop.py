"""The one shape of the node's long-running loops (assembler, pipeline workers, senders).

A loop calls :meth:`Loop.run_once` until stopped; when a round found nothing to do it
waits ``interval_s`` (or until stopped). An error in one round is logged and the loop goes
on: a busy database or an unreachable peer must not end a service thread.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)


class Loop:
    name = "loop"

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self._stop = threading.Event()

    def run_once(self) -> bool:
        """One round; True when it did work (then the next round starts at once)."""
        raise NotImplementedError

    def started(self) -> None:
        """Called once in the loop's thread before the first round."""

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> None:
        self.started()
        while not self._stop.is_set():
            try:
                busy = self.run_once()
            except Exception as exc:
                log.error("%s: round failed: %s: %s", self.name, type(exc).__name__, exc)
                busy = False
            if not busy:
                self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
