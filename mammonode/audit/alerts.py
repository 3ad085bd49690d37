"""A per-address limit on Security Alerts: a scanner sending bad tokens or probing AE titles
would otherwise spool one message per attempt and, while the repository is down, fill the
spool (``spool_max_messages``) and crowd out the messages that matter. One alert per kind
and client address per interval is audited; the next one says how many were left out."""

from __future__ import annotations

import threading
import time

INTERVAL_S = 10.0
MAX_ADDRESSES = 4096  # beyond this many addresses at once, the rest share one limit
OTHERS = "*"


class AlertLimiter:
    def __init__(self, interval_s: float = INTERVAL_S, max_addresses: int = MAX_ADDRESSES):
        self.interval_s = interval_s
        self.max_addresses = max_addresses
        self._lock = threading.Lock()
        # (kind, address) -> [time of the last alert audited, alerts left out since]
        self._seen: dict[tuple[str, str], list] = {}

    def admit(self, kind: str, address: str, now: float | None = None) -> int | None:
        """None: leave this alert out (it is counted); otherwise audit it, and the number
        of alerts of this kind and address left out before it."""
        now = time.monotonic() if now is None else now
        with self._lock:
            key = (kind, address)
            if key not in self._seen and len(self._seen) >= self.max_addresses:
                self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.interval_s}
                if len(self._seen) >= self.max_addresses:
                    key = (kind, OTHERS)
            entry = self._seen.get(key)
            if entry is not None and now - entry[0] < self.interval_s:
                entry[1] += 1
                return None
            skipped = entry[1] if entry is not None else 0
            self._seen[key] = [now, 0]
            return skipped
