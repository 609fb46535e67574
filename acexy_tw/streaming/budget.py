"""
BacklogBudget: the bytes queued for all players together (``ACEXY_MAX_BACKLOG``).

Every :class:`~acexy_tw.streaming.sink.ClientSink` of the proxy shares one
budget. A sink adds what it queues (:meth:`BacklogBudget.add`) and takes off
what it drains (:meth:`BacklogBudget.drained`) or drops when it ends
(:meth:`BacklogBudget.release`): integer arithmetic and one dict store on the
hot path. Each session's fast-start cache (the stream since its latest
keyframe, for joiners: :mod:`acexy_tw.streaming.joiner`) is a holder too; it
reports its size with :meth:`BacklogBudget.resize`, and when it is the largest
holder it is the one cut (dropped until the next keyframe — nobody is
disconnected for it). Only when the total passes the cap is a decision made: the players
furthest behind (largest backlog) are cut, as a player past its own cap
(``ACEXY_BUFFER_SIZE``) is, until the total is back within the cap. The total
never exceeds the cap by more than the one piece being queued.

The search looks only at the sinks holding a backlog (:attr:`holders`): the
blocked players, normally few; players that keep up hold nothing and are not
in it.

Freed backlogs go back to the C allocator, which keeps them: the pieces are
spread over the heap among live objects, so glibc's own trimming (only the top
of the heap; ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_ARENA_MAX``) gave nothing back — measured with ``bench/backlog.py``
(40 contents, one stalled and one reading player each, ACEXY_BUFFER_SIZE=4MiB):
RSS stayed at 4.4–4.7× the idle figure after the players were gone. After a
large release the budget therefore asks glibc to return the free pages of the
whole heap (:func:`malloc_trim`, feature-tested; a no-op on other C
libraries): at most once per ``trim_interval`` seconds of the injected clock
while players still hold a backlog, and at once when the last backlog is gone.
With it the same run ends at 1.2× idle. A trim costs about 1 ms per 10 MiB
given back (madvise), nothing when there is nothing to give.
"""

from __future__ import annotations

import ctypes
from typing import Any, Callable, Optional, Protocol as TypingProtocol

from twisted.internet.interfaces import IReactorTime

from acexy_tw.glibc import libc
from acexy_tw.logs import get_logger

__all__ = ["BacklogBudget", "BudgetHolder", "malloc_trim", "TRIM_AFTER", "TRIM_INTERVAL"]

log = get_logger(__name__)

#: bytes freed (drained or released) after which the allocator is asked to trim
TRIM_AFTER = 8 * 1024 * 1024
#: seconds between two trims while players still hold a backlog
TRIM_INTERVAL = 1.0


class BudgetHolder(TypingProtocol):
    """What the budget needs of a player (``ClientSink``) or of a session's fast-start cache (``FastStart``)."""

    backlog_bytes: int

    def cut(self, reason: str) -> None: ...


def _load_malloc_trim() -> Optional[Callable[[], Any]]:
    """glibc's ``malloc_trim(0)``, or None elsewhere (musl, macOS, no libc found)."""
    lib = libc()
    if lib is None:
        return None
    trim = lib.malloc_trim
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


_malloc_trim = _load_malloc_trim()


def malloc_trim() -> bool:
    """Give freed heap memory back to the system; False if this libc cannot."""
    if _malloc_trim is None:
        return False
    _malloc_trim()
    return True


class BacklogBudget:
    def __init__(
        self,
        cap: int,
        *,
        clock: Optional[IReactorTime] = None,
        trim: Optional[Callable[[], Any]] = malloc_trim,
        trim_after: int = TRIM_AFTER,
        trim_interval: float = TRIM_INTERVAL,
    ) -> None:
        self.cap = cap
        #: bytes queued for all players now
        self.total = 0
        #: the largest total seen (at most cap + one piece)
        self.peak = 0
        #: holders cut to keep within the cap (players, and fast-start caches dropped)
        self.cuts = 0
        #: sinks with a backlog (insertion order: the oldest holder first on ties)
        self.holders: dict[BudgetHolder, None] = {}
        self.trims = 0
        self._clock = clock
        self._trim = trim if clock is not None else None
        self._trim_after = trim_after
        self._trim_interval = trim_interval
        self._freed = 0
        self._trimmed_at = float("-inf")
        self._later: Any = None
        self._stopped = False
        self._enforcing = False

    def __repr__(self) -> str:
        return f"<BacklogBudget {self.total}/{self.cap} holders={len(self.holders)} cuts={self.cuts}>"

    # -- the sinks' side (hot path) ------------------------------------------------------

    def add(self, sink: BudgetHolder, n: int) -> None:
        """``sink`` queued ``n`` more bytes (its ``backlog_bytes`` already counts them)."""
        self.holders[sink] = None
        self.total += n
        if self.total > self.peak:
            self.peak = self.total
        if self.total > self.cap and not self._enforcing:
            self._enforce()

    def drained(self, sink: BudgetHolder, n: int) -> None:
        """``sink`` handed ``n`` queued bytes to its transport."""
        self.total -= n
        if not sink.backlog_bytes:
            self.holders.pop(sink, None)
        self._freed_bytes(n)

    def release(self, sink: BudgetHolder) -> None:
        """``sink`` is dropping its whole backlog (it ended, was cut, or flushed it)."""
        if sink in self.holders:
            del self.holders[sink]
            n = sink.backlog_bytes
            self.total -= n
            self._freed_bytes(n)

    def resize(self, holder: BudgetHolder, old: int) -> None:
        """
        A holder that is not a player — a session's fast-start cache
        (:class:`~acexy_tw.streaming.joiner.FastStart`) — now holds
        ``holder.backlog_bytes`` instead of ``old``. Growth is checked against
        the cap as a player's queueing is (the holder itself may be cut: its
        ``cut`` drops what it holds and releases it). Shrinking is the cache
        moving on to a newer keyframe — turnover, not a load going away — so it
        never asks the allocator to trim; a :meth:`release` does.
        """
        new = holder.backlog_bytes
        if new > old:
            self.add(holder, new - old)
            return
        self.total -= old - new
        if not new:
            self.holders.pop(holder, None)

    # -- the decision --------------------------------------------------------------------

    def _enforce(self) -> None:
        self._enforcing = True
        try:
            while self.total > self.cap and self.holders:
                victim = max(self.holders, key=_backlog)
                self.cuts += 1
                victim.cut(f"global backlog over {self.cap} bytes (this player {victim.backlog_bytes} behind)")
                if victim in self.holders:  # it did not release: never loop on it
                    self.release(victim)
        finally:
            self._enforcing = False

    # -- giving memory back ------------------------------------------------------------

    def _freed_bytes(self, n: int) -> None:
        # Trim on a release once ``trim_after`` bytes were freed, and never more
        # than once per ``trim_interval``: a player that keeps up drains its
        # backlog on nearly every read, and a trim each time had the allocator
        # fault the pages back in (25,000-33,000 page faults per GB relayed).
        # When the budget is empty the load may be over and nothing else would
        # come to trim: the trim the interval held back is done when it ends
        # (one timer at most, cancelled by stop()).
        if self._trim is None:
            return
        self._freed += n
        if self._freed < self._trim_after:
            return
        assert self._clock is not None
        wait = self._trimmed_at + self._trim_interval - self._clock.seconds()
        if wait <= 0:
            self._trim_now()
        elif not self.total and self._later is None and not self._stopped:
            self._later = self._clock.callLater(wait, self._trim_later)

    def _trim_later(self) -> None:
        self._later = None
        if self._freed >= self._trim_after:
            self._trim_now()

    def _trim_now(self) -> None:
        assert self._clock is not None and self._trim is not None
        self._freed = 0
        self._trimmed_at = self._clock.seconds()
        self.trims += 1
        try:
            self._trim()
        except Exception:  # noqa: BLE001 - a failed trim only costs memory
            log.failure("malloc_trim failed")

    def stop(self) -> None:
        """The proxy stops: no trim is left pending, nor armed later."""
        self._stopped = True
        if self._later is not None and self._later.active():
            self._later.cancel()
        self._later = None


def _backlog(sink: BudgetHolder) -> int:
    return sink.backlog_bytes
