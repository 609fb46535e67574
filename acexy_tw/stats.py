"""
Live stats of one engine session (issue #13, point 3).

- :class:`RateMeter` — bit/s over the last ``window`` seconds from a byte
  counter sampled once a second: a ring of per-second byte counts, so the
  streaming hot path pays nothing (no clock call per piece).
- :class:`SessionStats` — one per :class:`~acexy_tw.streaming.session.EngineSession`,
  on the injected clock: while the session streams it polls the engine's
  ``stat_url`` every ``interval`` seconds (one request in flight at most, a
  failure counted and never fatal) and samples the session's byte counters
  once a second. :meth:`SessionStats.stop` cancels every timer and the
  request in flight.
- :class:`History` — the last :data:`HISTORY_SPAN` seconds of one session
  (bitrates in and out, peers), one sample every ``step`` seconds in a
  fixed-size deque, kept across a failover (the meters restart, the graph
  does not), so a freshly opened dashboard already draws a graph.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Callable, Optional

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from acexy_tw.logs import get_logger

log = get_logger(__name__)

__all__ = ["History", "RateMeter", "SessionStats", "STAT_FIELDS", "RATE_WINDOW", "TIMER_NAMES", "HISTORY_SPAN"]

#: seconds the bitrates are averaged over
RATE_WINDOW = 10

#: seconds of history kept per session (the dashboard's graph)
HISTORY_SPAN = 600

#: history step (seconds) when the engine is never asked (ACEXY_STATS_INTERVAL=0)
HISTORY_STEP_WITHOUT_POLLS = 5

#: the names of a running SessionStats' two timers' functions (tests tell them apart by name)
TIMER_NAMES = ("_stats_poll", "_stats_sample")

#: what is kept of the engine's stat answer (speeds in KiB/s as the engine reports them)
STAT_FIELDS = ("status", "peers", "speed_down", "speed_up", "downloaded")


class RateMeter:
    """Bit/s over the last ``window`` one-second samples of a growing byte counter."""

    def __init__(self, window: int = RATE_WINDOW) -> None:
        self._ring: deque[int] = deque(maxlen=window)
        self._last: Optional[int] = None

    def sample(self, total: int) -> None:
        """The counter's value now (called once a second)."""
        if self._last is not None:
            self._ring.append(max(0, total - self._last))
        self._last = total

    def reset(self) -> None:
        self._ring.clear()
        self._last = None

    @property
    def bits_per_second(self) -> int:
        """Mean over the seconds sampled so far (at most ``window``); 0 before two samples."""
        if not self._ring:
            return 0
        return round(sum(self._ring) * 8 / len(self._ring))


class History:
    """
    One sample (time, bit/s in, bit/s out, peers) every ``step`` seconds, the
    last ``span`` seconds of them: at most ``ceil(span / step)`` samples,
    whatever the uptime.
    """

    def __init__(self, step: float, span: float = HISTORY_SPAN) -> None:
        self.step = max(1.0, float(step))
        self.span = float(span)
        self._samples: deque[tuple[float, int, int, Optional[int]]] = deque(maxlen=math.ceil(self.span / self.step))
        self._next: Optional[float] = None

    def __len__(self) -> int:
        return len(self._samples)

    def offer(self, now: float, bitrate_in: int, bitrate_out: int, peers: Optional[int]) -> None:
        """Called once a second: kept if a step has passed since the last sample."""
        if self._next is not None and now < self._next - 1e-6:
            return
        self._next = now + self.step
        self._samples.append((now, bitrate_in, bitrate_out, peers))

    def describe(self, now: float) -> list[list[Any]]:
        """``[[seconds ago, bit/s in, bit/s out, peers], ...]``, oldest first, none older than ``span``."""
        return [[round(now - t, 1), i, o, p] for t, i, o, p in self._samples if now - t <= self.span]


class SessionStats:
    """
    :param fetch: starts one stat request (a Deferred of the engine's JSON
        document), or returns None when there is nothing to ask.
    :param counters: the session's (bytes in, bytes out) totals.
    :param interval: seconds between stat requests; 0: never ask.
    """

    def __init__(
        self,
        clock: IReactorTime,
        interval: float,
        fetch: Callable[[], Optional[Deferred]],
        counters: Callable[[], tuple[int, int]],
    ) -> None:
        self._clock = clock
        self.interval = interval
        self._fetch = fetch
        self._counters = counters
        self.rate_in = RateMeter()
        self.rate_out = RateMeter()
        #: one sample per stat poll (or every HISTORY_STEP_WITHOUT_POLLS s), the last 10 minutes
        self.history = History(interval if interval > 0 else HISTORY_STEP_WITHOUT_POLLS)
        #: the last stat answer's fields (None until one arrived)
        self.engine: dict[str, Any] = {name: None for name in STAT_FIELDS}
        self.polls = 0
        self.failures = 0
        #: ticks skipped because a request was still in flight
        self.skipped = 0
        self.last_error: Optional[str] = None
        self._poll: Optional[LoopingCall] = None
        self._sampler: Optional[LoopingCall] = None
        self._in_flight: Optional[Deferred] = None

    @property
    def running(self) -> bool:
        return self._sampler is not None

    def start(self) -> None:
        """Begin polling and sampling (no-op while running)."""
        if self._sampler is not None:
            return
        self.rate_in.reset()
        self.rate_out.reset()
        self._sampler = self._loop(self._stats_sample, 1.0)
        if self.interval > 0:
            self._poll = self._loop(self._stats_poll, self.interval)

    def stop(self) -> None:
        """Cancel every timer and the request in flight. Idempotent."""
        for name in ("_poll", "_sampler"):
            loop = getattr(self, name)
            setattr(self, name, None)
            if loop is not None and loop.running:
                loop.stop()
        d, self._in_flight = self._in_flight, None
        if d is not None and not d.called:
            d.cancel()

    def describe(self) -> dict[str, Any]:
        return {
            **self.engine,
            "bitrate_in": self.rate_in.bits_per_second,
            "bitrate_out": self.rate_out.bits_per_second,
            "stat_polls": self.polls,
            "stat_failures": self.failures,
            "history": self.history.describe(self._clock.seconds()),
        }

    # -- internals ---------------------------------------------------------------

    def _loop(self, f: Callable[[], None], interval: float) -> LoopingCall:
        loop = LoopingCall(f)
        loop.clock = self._clock
        loop.start(interval, now=True).addErrback(lambda failure: log.failure("stats timer failed", failure))
        return loop

    def _stats_sample(self) -> None:
        bytes_in, bytes_out = self._counters()
        self.rate_in.sample(bytes_in)
        self.rate_out.sample(bytes_out)
        self.history.offer(
            self._clock.seconds(), self.rate_in.bits_per_second, self.rate_out.bits_per_second, self.engine["peers"]
        )

    def _stats_poll(self) -> None:
        if self._in_flight is not None:  # one request in flight at most
            self.skipped += 1
            return
        try:
            d = self._fetch()
        except Exception as e:  # never fatal
            self._failed(str(e) or type(e).__name__)
            return
        if d is None:
            return
        self.polls += 1
        self._in_flight = d
        d.addCallbacks(self._answered, self._errored, callbackArgs=(d,), errbackArgs=(d,))

    def _answered(self, doc: Any, d: Deferred) -> None:
        if self._in_flight is d:
            self._in_flight = None
        if not self.running:
            return
        response = doc.get("response") if isinstance(doc, dict) else None
        if not isinstance(response, dict):
            error = doc.get("error") if isinstance(doc, dict) else None
            self._failed(str(error or "no stat response"))
            return
        for name in STAT_FIELDS:
            value = response.get(name)
            if name == "status":
                self.engine[name] = value if isinstance(value, str) else None
            else:
                self.engine[name] = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        self.last_error = None

    def _errored(self, failure: Failure, d: Deferred) -> None:
        if self._in_flight is d:
            self._in_flight = None
        if failure.check(CancelledError) or not self.running:
            return
        self._failed(failure.getErrorMessage())

    def _failed(self, message: str) -> None:
        self.failures += 1
        self.last_error = message
        log.debug("stat request failed ({n} so far): {msg}", n=self.failures, msg=message)


def session_fields(session: Any, now: float) -> dict[str, Any]:
    """What the status page shows of any engine session, TS or HLS: its key,
    state, engine and engine session, byte counts, age and live stats."""
    info = session.info
    engine = session.engine
    return {
        "key": str(session.key),
        "state": session.state,
        "stat_url": info.stat_url if info else None,
        "playback_session_id": info.playback_session_id if info else None,
        "engine": engine.address.url if engine else None,
        "container_id": getattr(engine, "container_id", None),
        "orchestrator_stream_id": session.stream_id,
        "bytes_in": session.bytes_in,
        "bytes_out": session.bytes_out,
        "uptime": round(now - session.created_at, 1),
        **session.stats.describe(),
    }
