"""Bounds on HTTP connections, so that idle or slow clients cannot starve the listener.

uvicorn closes a kept-alive connection after ``timeout_keep_alive``, but not a connection
that never finishes its request head (it waits forever for a slowloris client trickling a
header byte by byte, or for a socket opened and left silent), and its ``limit_concurrency``
answers 503 to everyone once that many sockets are open, idle ones included, so a few
hundred silent sockets would take ``/status`` down. This protocol adds:

- a request-head timeout: a connection that has not sent a complete request head within
  ``head_timeout_s`` of opening (or of its previous response) is closed;
- a connection cap: when more than ``max_connections`` are open, the longest-waiting
  connection that has no request in progress is closed to make room; when every one is
  busy with a request, the new connection is closed at once.
"""

from __future__ import annotations

import asyncio
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class GuardedH11Protocol(H11Protocol):
    head_timeout_s: float = 10.0
    max_connections: int = 256

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._idle_since = time.monotonic()
        self._arm_head_timer()
        # Closing ones are still in the set until their connection_lost runs (a burst of
        # accepts makes several connections in one loop iteration): count only open ones.
        open_ = [c for c in self.connections if c.transport is not None and not c.transport.is_closing()]
        if len(open_) > self.max_connections:
            idle = [c for c in open_ if c is not self and isinstance(c, GuardedH11Protocol) and c.waiting_for_request()]
            victim = min(idle, key=lambda c: c._idle_since) if idle else self
            victim.transport.close()

    def waiting_for_request(self) -> bool:
        """No request in progress: between connect (or the previous response) and a full head."""
        return self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._idle_since = time.monotonic()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.waiting_for_request() and not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)


def guarded_protocol(head_timeout_s: float, max_connections: int) -> type[GuardedH11Protocol]:
    """The protocol class for ``uvicorn.Config(http=...)`` with these bounds."""
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {"head_timeout_s": float(head_timeout_s), "max_connections": int(max_connections)},
    )
