"""
SessionRegistry: one engine session per content key.

``join`` is single-flight by construction: the session is created, stored and
given its first player *before* its start begins, so a start that fails
synchronously still reaches that player, and every concurrent request for the
same key finds the session in the dict and attaches to it — one engine
getstream call however many players arrive at once (STYLE.md pitfalls 10, 11).
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Iterator, Optional

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from acexy_tw.logs import get_logger

from acexy_tw.content import ContentKey
from acexy_tw.engine import NoEngine
from acexy_tw.retry import RetryPolicy
from acexy_tw.streaming.session import EngineSession, PlacementLike, ShuttingDown
from acexy_tw.streaming.sink import ClientSink
from acexy_tw.streaming.waiting import WaitQueue

log = get_logger(__name__)


class QueueFull(NoEngine):
    """The wait queue has no room for another held player (503)."""

    def __init__(self, hold_error: Optional[BaseException]) -> None:
        super().__init__(
            "Service temporarily unavailable: too many players waiting",
            code=getattr(hold_error, "code", None) or "queue_full",
            retry_after=getattr(hold_error, "retry_after", None),
        )


class SessionRegistry:
    def __init__(
        self,
        placement: PlacementLike,
        clock: IReactorTime,
        *,
        empty_timeout: float,
        linger: float,
        on_session_closed: Optional[Callable[[EngineSession, str], None]] = None,
        on_session_streaming: Optional[Callable[[EngineSession], None]] = None,
        on_engine_lost: Optional[Callable[[EngineSession, str], None]] = None,
        waits: Optional[WaitQueue] = None,
        failover: RetryPolicy = RetryPolicy(0),
        failover_reset: float = 30.0,
    ) -> None:
        self._placement = placement
        self.waits = waits
        self._on_engine_lost = on_engine_lost
        self._failover = failover
        self._failover_reset = failover_reset
        self._clock = clock
        self._empty_timeout = empty_timeout
        self._linger = linger
        self._on_session_closed = on_session_closed
        self._on_session_streaming = on_session_streaming
        self._sessions: dict[ContentKey, EngineSession] = {}
        self._stops: set[Deferred] = set()
        self.sessions_started = 0
        #: ended engine sessions by reason (``failover`` included), for metrics
        self.stopped: Counter[str] = Counter()
        #: bytes sent to players by sessions already closed
        self.bytes_out_closed = 0
        self.accepting = True

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[EngineSession]:
        return iter(list(self._sessions.values()))

    def get(self, key: ContentKey) -> Optional[EngineSession]:
        return self._sessions.get(key)

    def get_any(self) -> Optional[EngineSession]:
        """Some open session (tests and status with a single stream)."""
        return next(iter(self._sessions.values()), None)

    def find(self, value: str) -> list[EngineSession]:
        """Sessions whose content id / infohash is ``value`` (any extras)."""
        value = value.strip().lower()
        return [s for s in self._sessions.values() if s.key.value == value]

    def join(self, key: ContentKey, sink: ClientSink) -> EngineSession:
        """Attach ``sink`` to the session for ``key``, starting one if needed."""
        if not self.accepting:
            raise ShuttingDown("proxy is shutting down")
        session = self._sessions.get(key)
        if session is not None and session.state == EngineSession.WAITING and self.waits is not None:
            if not self.waits.has_room():
                raise QueueFull(session.hold_error)
        if session is None:
            session = self._new_session(key)
        session.attach(sink)
        session.start()
        return session

    def prewarm(self, key: ContentKey) -> Deferred:
        """Start a session nobody watches yet (reject mode: the player's retry
        will find it); it ends after linger if unclaimed. Fires True unless it
        was told to wait again."""
        if key in self._sessions or not self.accepting:
            return succeed(True)
        session = self._new_session(key)
        log.info("pre-warming {key} for a player told to retry", key=str(key))
        done: Deferred = Deferred()
        session.start()
        session.when_settled(done)
        return done

    def _new_session(self, key: ContentKey) -> EngineSession:
        session = EngineSession(
            key,
            self._placement,
            self._clock,
            empty_timeout=self._empty_timeout,
            linger=self._linger,
            on_closed=self._closed,
            on_streaming=self._on_session_streaming,
            on_engine_lost=self._on_engine_lost,
            waits=self.waits,
            failover=self._failover,
            failover_reset=self._failover_reset,
        )
        self._sessions[key] = session
        self.sessions_started += 1
        return session

    def _closed(self, session: EngineSession, reason: str) -> None:
        if self._sessions.get(session.key) is session:
            del self._sessions[session.key]
        self.stopped[reason] += 1
        self.bytes_out_closed += session.bytes_out
        if session.stop_result is not None:
            d = session.stop_result
            self._stops.add(d)
            d.addBoth(lambda r: (self._stops.discard(d), r)[1])
        log.info(
            "engine session for {key} closed ({reason}); {n} open",
            key=str(session.key),
            reason=reason,
            n=len(self._sessions),
        )
        if self._on_session_closed is not None:
            self._on_session_closed(session, reason)

    def shutdown(self) -> Deferred:
        """Close every session (stop commands sent, connections closed); fires
        when every stop command has answered or timed out."""
        self.accepting = False
        for session in list(self._sessions.values()):
            session.close("shutdown", clean=True, error=ShuttingDown("proxy is shutting down"))
        if not self._stops:
            return succeed(None)
        return DeferredList(list(self._stops), consumeErrors=True).addCallback(lambda _: None)
