"""Logging: plain text or JSON lines, and a filter that keeps patient identifiers out.

The node's own log calls name studies by UID only; the filter is a second line of defence
for third-party messages (pynetdicom, pydicom) that might print a data set.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

_PHI_PATTERNS = [
    re.compile(r"(\(0010,00[0-9A-Fa-f]{2}\)[^\n]*)"),  # any Patient module element in a dump
    re.compile(r"(Patient(?:'s)?\s*(?:Name|ID|Birth\s*Date)\s*[:=][^\n,]*)", re.IGNORECASE),
    # pydicom's value validation quotes the value ("Invalid value for VR DA: '1961-07-04'.")
    re.compile(r"(?<=Invalid value for VR [A-Z]{2}: )'[^'\n]*'"),
]


class RedactPHI(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = message
        for pattern in _PHI_PATTERNS:
            redacted = pattern.sub("[patient data redacted]", redacted)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload)


def setup(level: str = "INFO", as_json: bool = False, file: str = "") -> None:
    handler: logging.Handler = logging.FileHandler(file) if file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if as_json else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    handler.addFilter(RedactPHI())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Libraries that are chatty at INFO (pynetdicom: one line per DIMSE message; alembic: its
    # migration context; highdicom: object construction) keep only their warnings.
    for name in ("pynetdicom", "alembic", "highdicom", "uvicorn"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
