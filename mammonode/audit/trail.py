"""The audit trail of one process: every message appended to the local JSON-lines file, and,
with a repository configured, spooled to disk for the sender thread of ``mammonode serve``.

The file (``[audit] file``) is opened with O_APPEND for each record, which is one ``write``
of one line, fsynced before :meth:`AuditTrail.emit` returns, so records of several processes
(the node and admin commands) never interleave and none acknowledged is lost to a crash. It
is not held open between records: a file system holding it (by default the storage
directory) can then be remounted read-only, which the storage's read-only handling needs.

The spool (``<storage>/audit/spool``) holds one file per message not yet taken by the
repository, named so that sorting them is sending order. Every process writes there; only
the node's :class:`SyslogSender` sends, in order, and removes each file once sent, so a
repository that is down only delays messages. At ``spool_max_messages`` new messages are
kept in the audit file only (the oldest, unsent ones stay spooled) with a WARNING. The count
is kept in memory (read from the directory at start, and again on each pass of the sender)
rather than listing the directory for every message.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from mammonode.audit.messages import AuditRecord
from mammonode.audit.syslog import Endpoint, SendError, format_message, local_identity, transport_for

log = logging.getLogger(__name__)

RETRY_MIN_S, RETRY_MAX_S = 0.5, 10.0
POLL_S = 1.0  # how often the sender looks for messages other processes spooled
FULL_WARNING_EVERY_S = 60.0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_for_append(file: Path) -> int:
    """The audit file opened for appending, created if it is not there (after a rotation).
    A file root creates (an admin command run with sudo) is given to the directory's owner,
    the service user, who could otherwise no longer append to it."""
    fd = os.open(file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    if os.geteuid() == 0:
        try:
            folder, mine = os.stat(file.parent), os.fstat(fd)
            if (mine.st_uid, mine.st_gid) != (folder.st_uid, folder.st_gid) and mine.st_size == 0:
                os.fchown(fd, folder.st_uid, folder.st_gid)
        except OSError:
            pass  # the record matters more than the owner
    return fd


class AuditTrail:
    def __init__(self, file: Path, spool_dir: Path | None, spool_max: int):
        self.file = file
        self.spool_dir = spool_dir
        self.spool_max = spool_max
        self._lock = threading.Lock()
        self._seq = 0
        self._last_full_warning = 0.0
        self.wake = threading.Event()
        file.parent.mkdir(parents=True, exist_ok=True)
        os.close(_open_for_append(file))  # writable, or fail at start
        self._queued = 0  # spool files, as far as this process knows
        if spool_dir is not None:
            spool_dir.mkdir(parents=True, exist_ok=True)
            self._queued = len(list(spool_dir.glob("*.json")))

    def emit(self, record: AuditRecord) -> None:
        line = json.dumps(
            {
                "time": record.time,
                "event": record.event,
                "name": record.name,
                "outcome": record.outcome,
                "xml": record.xml,
            }
        )
        data = (line + "\n").encode()
        with self._lock:
            fd = _open_for_append(self.file)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            if self.spool_dir is not None:
                self._spool(data)
        self.wake.set()

    def _spool(self, data: bytes) -> None:
        queued = self._queued
        if queued >= self.spool_max:
            now = time.monotonic()
            if now - self._last_full_warning >= FULL_WARNING_EVERY_S:
                self._last_full_warning = now
                log.warning(
                    "audit spool full (%d messages, audit.spool_max_messages): newer messages are kept in %s only"
                    " until the repository takes the spooled ones",
                    queued,
                    self.file,
                )
            return
        self._seq += 1
        name = f"{time.time_ns():020d}-{os.getpid()}-{self._seq:08d}.json"
        temp = self.spool_dir / f".{name}.tmp"
        with open(temp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(temp, self.spool_dir / name)
        _fsync_dir(self.spool_dir)
        self._queued += 1

    def spooled(self) -> list[Path]:
        """The spooled messages in sending order; also recounts them (other processes spool
        too, and only the node's sender removes)."""
        with self._lock:
            paths = sorted(self.spool_dir.glob("*.json"))
            self._queued = len(paths)
        return paths

    def unspooled(self, path: Path) -> None:
        """Remove one spooled message, sent."""
        path.unlink()
        with self._lock:
            self._queued = max(0, self._queued - 1)


class SyslogSender:
    """The node's thread that sends spooled messages to the repository, oldest first; on a
    failure it waits (0.5 s doubling to 10 s) and tries the same message again."""

    def __init__(self, trail: AuditTrail, endpoint: Endpoint, app_name: str):
        self.trail = trail
        self.endpoint = endpoint
        self.app_name = app_name
        self.hostname, self.procid = local_identity()
        self.transport = transport_for(endpoint)
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.failing_since: float | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="audit-sender", daemon=True)
        self.thread.start()

    def pending(self) -> list[Path]:
        return self.trail.spooled()

    def send_pending(self) -> bool:
        """Send what is spooled; False when the repository failed (the rest stays spooled)."""
        for path in self.pending():
            try:
                entry = json.loads(path.read_bytes())
            except FileNotFoundError:
                continue
            except ValueError:
                log.error("audit spool file %s is not a message; set aside", path.name)
                path.rename(path.with_suffix(".bad"))
                continue
            message = format_message(
                entry["xml"], entry["time"], entry["outcome"], self.app_name, self.hostname, self.procid
            )
            try:
                self.transport.send(message)
            except SendError as exc:
                if self.failing_since is None:
                    self.failing_since = time.monotonic()
                    log.warning(
                        "audit repository %s:%d (%s) unreachable: %s; messages are spooled in %s",
                        self.endpoint.host,
                        self.endpoint.port,
                        self.endpoint.transport,
                        exc,
                        self.trail.spool_dir,
                    )
                return False
            self.trail.unspooled(path)
            if self.failing_since is not None:
                log.info(
                    "audit repository %s:%d reachable again after %.0f s",
                    self.endpoint.host,
                    self.endpoint.port,
                    time.monotonic() - self.failing_since,
                )
                self.failing_since = None
        return True

    def _run(self) -> None:
        delay = RETRY_MIN_S
        while not self.stopping.is_set():
            self.trail.wake.clear()
            try:
                ok = self.send_pending()
            except OSError:
                log.exception("audit sender failed; retrying")
                ok = False
            if ok:
                delay = RETRY_MIN_S
                self.trail.wake.wait(POLL_S)
            else:
                self.stopping.wait(delay)
                delay = min(delay * 2, RETRY_MAX_S)

    def stop(self, drain_s: float = 3.0) -> None:
        """Give the last messages (application stop) up to ``drain_s`` to go; what is left
        stays spooled for the next start."""
        deadline = time.monotonic() + drain_s
        while time.monotonic() < deadline and self.pending() and self.failing_since is None:
            self.trail.wake.set()
            time.sleep(0.05)
        self.stopping.set()
        self.trail.wake.set()
        if self.thread is not None:
            self.thread.join(timeout=self.endpoint.timeout_s + 1)
        self.transport.close()
