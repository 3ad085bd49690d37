"""How a running pipeline reports where it is: stage by stage, and within the long stages
unit by unit (patches during heatmaps, epochs during the classifiers).

The pipeline calls a :class:`Progress`; what is shown is the caller's choice (a rich display
for ``predict`` on a terminal, one log line per stage for the worker). Reporting never
changes what is computed.
"""

from __future__ import annotations

import logging
from typing import Protocol


class Progress(Protocol):
    def stage(self, name: str, total: int | None = None, unit: str = "") -> None:
        """A stage begins; ``total`` units of ``unit`` are to come when known."""

    def advance(self, units: int = 1) -> None:
        """``units`` more of the current stage are done."""

    def stage_done(self, name: str, seconds: float) -> None:
        """The stage ended after ``seconds``."""


class Silent:
    """Reports nothing."""

    def stage(self, name: str, total: int | None = None, unit: str = "") -> None:
        pass

    def advance(self, units: int = 1) -> None:
        pass

    def stage_done(self, name: str, seconds: float) -> None:
        pass


class LogLines(Silent):
    """One log line per finished stage, with its duration (and units, when counted)."""

    def __init__(self, logger: logging.Logger, prefix: str = ""):
        self.logger = logger
        self.prefix = prefix
        self.done = 0
        self.unit = ""

    def stage(self, name: str, total: int | None = None, unit: str = "") -> None:
        self.done, self.unit = 0, unit

    def advance(self, units: int = 1) -> None:
        self.done += units

    def stage_done(self, name: str, seconds: float) -> None:
        counted = f", {self.done} {self.unit} ({self.done / seconds:.1f}/s)" if self.done and seconds > 0 else ""
        self.logger.info("%sstage %s done in %.1f s%s", self.prefix, name, seconds, counted)
