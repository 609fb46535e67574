"""
SessionRegistry: one engine session per content key.

``join`` is single-flight by construction: the session is created, stored and
given its first player *before* its start begins, so a start that fails
synchronously still reaches that player, and every concurrent request for the
same key finds the session in the dict and attaches to it — one engine
getstream call however many players arrive at once (STYLE.md pitfalls 10, 11).
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from acexy_tw.logs import get_logger

from acexy_tw.content import ContentKey
from acexy_tw.streaming.session import EngineSession, Placement, ShuttingDown
from acexy_tw.streaming.sink import ClientSink

log = get_logger(__name__)


class SessionRegistry:
    def __init__(
        self,
        place: Placement,
        clock: IReactorTime,
        *,
        empty_timeout: float,
        linger: float,
        on_session_closed: Optional[Callable[[EngineSession, str], None]] = None,
        on_session_streaming: Optional[Callable[[EngineSession], None]] = None,
    ) -> None:
        self._place = place
        self._clock = clock
        self._empty_timeout = empty_timeout
        self._linger = linger
        self._on_session_closed = on_session_closed
        self._on_session_streaming = on_session_streaming
        self._sessions: dict[ContentKey, EngineSession] = {}
        self._stops: set[Deferred] = set()
        self.sessions_started = 0
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
        if session is None:
            session = EngineSession(
                key,
                self._place,
                self._clock,
                empty_timeout=self._empty_timeout,
                linger=self._linger,
                on_closed=self._closed,
                on_streaming=self._on_session_streaming,
            )
            self._sessions[key] = session
            self.sessions_started += 1
        session.attach(sink)
        session.start()
        return session

    def _closed(self, session: EngineSession, reason: str) -> None:
        if self._sessions.get(session.key) is session:
            del self._sessions[session.key]
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
