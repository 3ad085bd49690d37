"""Logging: plain text or JSON lines, a filter that keeps patient identifiers out and one
that keeps peer-chosen control characters from forging or colouring log lines.

The node's own log calls name studies by UID only; the PHI filter is a second line of
defence for third-party messages (pynetdicom, pydicom) that might print a data set. Peers
choose AE titles, header strings and HTTP paths: a CR/LF in one would start a fake log line,
an ANSI escape would repaint a terminal, so every control character is written escaped.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import traceback

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


_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def escape_control(text: str) -> str:
    """``text`` with each control character but TAB written as a visible ``\\xNN`` escape."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _escaped_traceback(exc_info) -> str:
    """The traceback as logging prints it, each exception's message escaped: a library's
    exception may quote what a peer sent (pynetdicom's "Invalid 'Calling AE Title' value")."""
    text = "".join(traceback.format_exception(*exc_info)).rstrip("\n")
    seen: set[int] = set()
    exc = exc_info[1]
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        message = str(exc)
        if message and escape_control(message) != message:
            text = text.replace(message, escape_control(message))
        exc = exc.__cause__ or exc.__context__
    return text


class EscapeControl(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        escaped = escape_control(message)
        if escaped != message:
            record.msg, record.args = escaped, ()
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            record.exc_text = _escaped_traceback(record.exc_info)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_text or record.exc_info:
            payload["exception"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(payload)


def setup(level: str = "INFO", as_json: bool = False, file: str = "") -> None:
    handler: logging.Handler = logging.FileHandler(file) if file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if as_json else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    handler.addFilter(RedactPHI())
    handler.addFilter(EscapeControl())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Libraries that are chatty at INFO (pynetdicom: one line per DIMSE message; alembic: its
    # migration context; highdicom: object construction) keep only their warnings.
    for name in ("pynetdicom", "alembic", "highdicom", "uvicorn"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
