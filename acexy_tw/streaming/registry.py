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
from typing import Any, Iterator, Optional, Protocol as TypingProtocol

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from acexy_tw.logs import get_logger

from acexy_tw.content import ContentKey
from acexy_tw.engine import EngineError, NoEngine
from acexy_tw.streaming.limits import SessionLimit
from acexy_tw.streaming.session import EngineSession, SessionSettings, ShuttingDown
from acexy_tw.streaming.sink import ClientSink
from acexy_tw.streaming.waiting import HealthLike, WaitQueue, WaitSettings

log = get_logger(__name__)


class QueueFull(NoEngine):
    """The wait queue has no room for another held player (503)."""

    def __init__(self, hold_error: Optional[BaseException]) -> None:
        super().__init__(
            "Service temporarily unavailable: too many players waiting",
            code=getattr(hold_error, "code", None) or "queue_full",
            retry_after=getattr(hold_error, "retry_after", None),
        )


class EventsLike(TypingProtocol):
    """Who hears of engine sessions (the orchestrator's :class:`EventReporter`)."""

    def started(self, session: Any) -> None: ...

    def ended(self, session: Any, reason: str) -> None: ...


class SessionRegistry:
    """
    One session per key, built with everything it needs: the placement, the
    clock, the sessions' settings, the wait queue's settings (the registry owns
    its :class:`WaitQueue`, which pre-warms through it) and, when there is an
    orchestrator, the health view (every poll re-evaluates the waiting
    sessions) and the event reporter. ``limit`` (shared with HlsSessions)
    bounds the sessions open at once; without one there is no bound.
    """

    def __init__(
        self,
        placement: Any,
        clock: IReactorTime,
        settings: SessionSettings,
        *,
        waits: WaitSettings,
        health: Optional[HealthLike] = None,
        pool: Optional[HealthLike] = None,
        events: Optional[EventsLike] = None,
        limit: Optional[SessionLimit] = None,
    ) -> None:
        self._placement = placement
        #: engine sessions open at once, shared with HlsSessions (None: unbounded)
        self.limit = limit
        self._clock = clock
        self._settings = settings
        self._events = events
        self.waits = WaitQueue(clock, waits, prewarm=self.prewarm)
        for view in (health, pool):  # the orchestrator's status changed, a pool engine is back
            if view is not None:
                view.subscribe(self.waits.kick)  # capacity may be back
        self._sessions: dict[ContentKey, EngineSession] = {}
        self._stops: set[Deferred] = set()
        self.sessions_started = 0
        #: ended engine sessions by reason (``failover`` included), for metrics
        self.stopped: Counter[str] = Counter()
        #: bytes sent to players by sessions already closed
        self.bytes_out_closed = 0
        #: bytes received from engines by sessions already closed
        self.bytes_in_closed = 0
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

    def stop(self, value: str) -> int:
        """
        End every session of content ``value`` (any extras; ``POST /ace/stop``)
        through the one close path: its players get a clean end (one that got
        nothing yet gets the error), the engine its stop command, the
        reservation is released, and it counts as stopped for ``"stopped"``.
        Returns how many were open.
        """
        sessions = self.find(value)
        for session in sessions:
            log.info("engine session for {key} stopped on request", key=str(session.key))
            session.close("stopped", clean=True, error=EngineError("the stream was stopped on the proxy"))
        return len(sessions)

    def join(self, key: ContentKey, sink: ClientSink) -> EngineSession:
        """Attach ``sink`` to the session for ``key``, starting one if needed.
        Joining an open session always works; a new one past the session
        limit raises NoEngine (``max_sessions``, 503)."""
        if not self.accepting:
            raise ShuttingDown("proxy is shutting down")
        session = self._sessions.get(key)
        if session is not None and session.state == EngineSession.WAITING:
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
        try:
            session = self._new_session(key)
        except NoEngine:  # at the session limit: the player's retry gets the 503
            return succeed(True)
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
            self._settings,
            waits=self.waits,
            on_closed=self._closed,
            on_streaming=self._events.started if self._events is not None else None,
            on_engine_lost=self._engine_lost,
        )
        if self.limit is not None:
            self.limit.open(session)  # raises NoEngine when full: nothing is stored
        self._sessions[key] = session
        self.sessions_started += 1
        return session

    def _closed(self, session: EngineSession, reason: str) -> None:
        if self._sessions.get(session.key) is session:
            del self._sessions[session.key]
        if self.limit is not None:
            self.limit.close(session)
        self.stopped[reason] += 1
        self.bytes_out_closed += session.bytes_out
        self.bytes_in_closed += session.bytes_in
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
        self._placement.release(session.key)
        if self._events is not None:
            self._events.ended(session, reason)
        if session.streaming_since is not None:
            self.waits.kick()  # it held an engine: a slot may have freed for a held player

    def _engine_lost(self, session: EngineSession, reason: str) -> None:
        """Failover: the old engine session is over (reported); a new one follows."""
        self.stopped[reason] += 1
        if self._events is not None:
            self._events.ended(session, reason)

    def describe(self) -> dict[str, Any]:
        """Counts for the status page and metrics (no session objects)."""
        sessions = list(self._sessions.values())
        held = self.waits.describe()
        return {
            "open": len(sessions),
            "started": self.sessions_started,
            "stopped": dict(self.stopped),
            "clients": sum(len(s.sinks) for s in sessions),
            "bytes_out": self.bytes_out_closed + sum(s.bytes_out for s in sessions),
            "bytes_in": self.bytes_in_closed + sum(s.bytes_in for s in sessions),
            #: (stream, engine peers, engine download KiB/s) of sessions with a stat answer
            "engine_stats": [
                (str(s.key), s.stats.engine["peers"], s.stats.engine["speed_down"])
                for s in sessions
                if s.stats.engine["peers"] is not None or s.stats.engine["speed_down"] is not None
            ],
            "held": {"players": held["players"], "queued": len(self.waits.held), "queue_size": held["queue_size"]},
        }

    def shutdown(self) -> Deferred:
        """Close every session (stop commands sent, connections closed); fires
        when every stop command has answered or timed out."""
        self.accepting = False
        for session in list(self._sessions.values()):
            session.close("shutdown", clean=True, error=ShuttingDown("proxy is shutting down"))
        if not self._stops:
            return succeed(None)
        return DeferredList(list(self._stops), consumeErrors=True).addCallback(lambda _: None)
