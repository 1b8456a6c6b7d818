"""Sampling for the rejections quarantine.

Per (project, source, reason) and per minute, the first `per_minute`
rejections are kept and the rest are counted but not stored, so no flood can
grow the table faster than per_minute x keys rows a minute per process.
"""

from __future__ import annotations

import time

import msgspec

from gateway.model import Rejection


class Sampler:
    def __init__(self, per_minute: int, excerpt_bytes: int) -> None:
        self._per_minute = max(1, per_minute)
        self._excerpt = excerpt_bytes
        self._minute = -1
        self._counts: dict[tuple[str | None, str, str], int] = {}

    def admit(self, rejection: Rejection) -> bool:
        minute = int(time.time() // 60)
        if minute != self._minute:
            self._minute = minute
            self._counts.clear()
        key = (rejection.project, rejection.source, rejection.reason)
        seen = self._counts.get(key, 0)
        self._counts[key] = seen + 1
        return seen < self._per_minute

    def bound(self, rejection: Rejection) -> Rejection:
        """Cut the payload excerpt to the configured size in UTF-8 bytes."""
        if len(rejection.excerpt) * 4 <= self._excerpt:
            return rejection
        raw = rejection.excerpt.encode("utf-8", "replace")
        if len(raw) <= self._excerpt:
            return rejection
        # Never split a character: drop a partial one at the cut.
        cut = raw[: self._excerpt].decode("utf-8", "ignore")
        return msgspec.structs.replace(rejection, excerpt=cut)
