"""The audit trail (DICOM PS3.15 A.5 messages): cross-cutting, emitted by ingest, web,
service and cli, so it lives at the root and imports only config and itself.

A process opens its trail once (:func:`open_trail`: ``mammonode serve`` with the sender
thread, admin commands without); :func:`emit` then records a message from any thread. Where
no trail is open (library use, unit tests) :func:`emit` does nothing. Audit messages carry
patient IDs; nothing here writes them to the application log.
"""

from __future__ import annotations

import getpass
import logging
import os
import threading

from mammonode.audit import messages
from mammonode.audit.alerts import AlertLimiter
from mammonode.audit.messages import AuditRecord, AuditSource, Participant, StudyObjects
from mammonode.audit.syslog import Endpoint
from mammonode.audit.trail import AuditTrail, SyslogSender
from mammonode.config import Config

__all__ = [
    "AuditRecord",
    "Participant",
    "StudyObjects",
    "messages",
    "open_trail",
    "close_trail",
    "emit",
    "emit_security_alert",
    "context",
]

log = logging.getLogger(__name__)

_lock = threading.Lock()
_trail: AuditTrail | None = None
_sender: SyslogSender | None = None
_context: AuditContext | None = None
_alerts = AlertLimiter()


class AuditContext:
    """What every message of this process says about its source: the AuditSourceID, and
    this node as a participant (its AE title, with the process ID as alternative ID)."""

    def __init__(self, cfg: Config):
        self.source = AuditSource(cfg.audit.source_id or cfg.node.ae_title, cfg.audit.enterprise_site_id)
        self.ae_title = cfg.node.ae_title

    def node(self, requestor: bool, role: messages.Code | None = None, address: str = "") -> Participant:
        return Participant(self.ae_title, requestor, role, address, alternative_id=str(os.getpid()))

    @staticmethod
    def local_user() -> Participant:
        """The operating-system user running this process: the requestor of admin actions."""
        try:
            user = getpass.getuser()
        except (OSError, KeyError):
            user = str(os.getuid())
        return Participant(user, True)


def open_trail(cfg: Config, send: bool = False) -> None:
    """Open this process's trail; ``send``: also start the thread that sends spooled
    messages to the repository (the node's)."""
    global _trail, _sender, _context
    audit = cfg.audit
    with _lock:
        if _trail is not None:
            return
        spool = cfg.audit_spool_dir if audit.transport else None
        _trail = AuditTrail(cfg.audit_file, spool, audit.spool_max_messages)
        _context = AuditContext(cfg)
        if send and audit.transport:
            endpoint = Endpoint(audit.transport, audit.host, audit.port, audit.ca_file, audit.cert_file, audit.key_file)
            _sender = SyslogSender(_trail, endpoint, audit.app_name)
            _sender.start()


def close_trail() -> None:
    global _trail, _sender, _context
    with _lock:
        sender = _sender
        _trail = _sender = _context = None
    if sender is not None:
        sender.stop()


def context() -> AuditContext | None:
    """The open trail's context (None when no trail is open: build nothing then)."""
    return _context


def emit(record: AuditRecord) -> None:
    """Record one message. A failure to write the audit file is logged (without the
    message) and never raised into the caller's work (ingest, a query)."""
    trail = _trail
    if trail is None:
        return
    try:
        trail.emit(record)
    except OSError as exc:
        log.error("audit file %s: cannot record a %s message: %s", trail.file, record.name, exc.strerror or exc)


def emit_security_alert(offender: Participant, subject: str, reason: str, event_type: messages.Code) -> None:
    """A Security Alert (110113) reported by this node, at most one per event type and
    offender address per :data:`mammonode.audit.alerts.INTERVAL_S`; the next one audited
    says how many were left out."""
    ctx = _context
    if ctx is None:
        return
    skipped = _alerts.admit(event_type[0], offender.address)
    if skipped is None:
        return
    if skipped:
        reason += f" ({skipped} more from this address not audited: at most one alert per {_alerts.interval_s:.0f} s)"
    emit(messages.security_alert(ctx.source, ctx.node(False), offender, subject, reason, event_type=event_type))
