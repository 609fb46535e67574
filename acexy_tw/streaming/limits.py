"""
SessionLimit: engine sessions open at once, TS and HLS together (ACEXY_MAX_SESSIONS).

One object, built in :mod:`acexy_tw.build` and shared by the
:class:`~acexy_tw.streaming.registry.SessionRegistry` and
:class:`~acexy_tw.streaming.hls.HlsSessions`: each asks :meth:`SessionLimit.open`
before it makes a session for a key it has none for, and calls
:meth:`SessionLimit.close` when that session leaves its table. A player joining
a session that exists never asks, so joining always works; a new content past
the limit is refused with :class:`~acexy_tw.engine.NoEngine` (code
``max_sessions``), which the routes answer with ``503`` and ``Retry-After``.

Holders are the session objects themselves, so opening or closing the same
holder twice counts once: a double close cannot free a slot it does not hold.
"""

from __future__ import annotations

from typing import Any

from acexy_tw.engine import NoEngine

__all__ = ["MAX_SESSIONS_CODE", "RETRY_AFTER", "SessionLimit"]

MAX_SESSIONS_CODE = "max_sessions"

#: Seconds a refused player is told to wait: sessions end after their last
#: player leaves plus linger, so a slot frees in seconds when one does.
RETRY_AFTER = 10


class SessionLimit:
    """At most ``maximum`` engine sessions open at once."""

    def __init__(self, maximum: int, *, retry_after: int = RETRY_AFTER) -> None:
        if maximum < 1:
            raise ValueError("maximum must be at least 1")
        self.maximum = maximum
        self.retry_after = retry_after
        self._holders: dict[int, Any] = {}  # id -> holder (kept, so an id is never reused)
        #: new contents refused since start (metrics, tests)
        self.refused = 0

    def __len__(self) -> int:
        return len(self._holders)

    @property
    def full(self) -> bool:
        return len(self._holders) >= self.maximum

    def open(self, holder: Any) -> None:
        """Count ``holder`` (a new session) as open, or raise NoEngine (503)."""
        if id(holder) in self._holders:
            return
        if self.full:
            self.refused += 1
            raise NoEngine(
                f"Service temporarily unavailable: {self.maximum} engine sessions are open "
                "(ACEXY_MAX_SESSIONS); joining one of them works",
                code=MAX_SESSIONS_CODE,
                retry_after=self.retry_after,
            )
        self._holders[id(holder)] = holder

    def close(self, holder: Any) -> None:
        """``holder`` is gone; closing one that is not open does nothing."""
        if self._holders.get(id(holder)) is holder:
            del self._holders[id(holder)]

    def describe(self) -> dict[str, int]:
        return {"open": len(self._holders), "max": self.maximum, "refused": self.refused}
