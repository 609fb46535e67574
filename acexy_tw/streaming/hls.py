"""
HLS: one engine HLS session per content, shared by its players.

A player polls ``/ace/manifest.m3u8?id=…``; the proxy starts (single-flight)
an engine session with ``/ace/manifest.m3u8?format=json``, fetches the
engine's live playlist on each poll and rewrites its segment URIs to proxy
routes ``/ace/hls/<session id>/<segment>`` (the engine's own addresses are not
routable from players, and may not be from anywhere but the proxy). Segments
are relayed with flow control: the player's transport pauses the engine
connection directly (a 1:1 pipe, like Twisted's portforward).

The session lives while its playlist is polled: ``max(linger, 3 × target
duration)`` after the last poll or segment it is stopped (stop command sent,
reservation released). HLS players are never *held*: a "wait" answer is a 503
with Retry-After — a playlist client retries by itself.
"""

from __future__ import annotations

import re
import secrets
from typing import Any, Callable, Optional
from urllib.parse import urljoin, urlsplit

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from acexy_tw.content import ContentKey
from acexy_tw.engine import EngineClient, EngineError, NoEngine, PlaybackInfo
from acexy_tw.logs import get_logger

log = get_logger(__name__)

_TARGET = re.compile(rb"^#EXT-X-TARGETDURATION:\s*(\d+(?:\.\d+)?)", re.M)
#: segment names we relay: what the engine serves (``<n>.ts``), nothing that could walk paths
_SEGMENT_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
#: segments remembered per session (a live playlist lists a handful)
MAX_SEGMENTS = 64


class HlsSession:
    STARTING, READY, CLOSED = "starting", "ready", "closed"

    def __init__(
        self,
        key: ContentKey,
        placement: Any,
        clock: IReactorTime,
        *,
        linger: float,
        on_closed: Callable[["HlsSession", str], None],
        on_ready: Optional[Callable[["HlsSession"], None]] = None,
    ) -> None:
        self.key = key
        self.stream_id: Optional[str] = None  # set when reported to the orchestrator
        self._on_ready = on_ready
        self.sid = secrets.token_urlsafe(9)
        self.state = self.STARTING
        self.engine: Optional[EngineClient] = None
        self.info: Optional[PlaybackInfo] = None
        self.created_at = clock.seconds()
        self.last_poll = self.created_at
        self.polls = 0
        self.segments_served = 0
        self.bytes_out = 0
        self.target_duration = 0.0
        self._segments: dict[str, str] = {}  # name -> engine URL
        self._placement = placement
        self._clock = clock
        self._linger = linger
        self._on_closed = on_closed
        self._waiters: list[Deferred] = []
        self._error: Optional[BaseException] = None
        self._start_d: Optional[Deferred] = None
        self._expiry: Optional[IDelayedCall] = None

    @property
    def closed(self) -> bool:
        return self.state == self.CLOSED

    @property
    def idle_timeout(self) -> float:
        return max(self._linger, 3 * self.target_duration, 1.0)

    # -- start ---------------------------------------------------------------------------

    def ready(self) -> Deferred:
        """Fires (a fresh Deferred per caller) once the engine accepted the session."""
        if self.state == self.READY:
            return succeed(self)
        if self.closed:
            return fail(self._error or EngineError("HLS session ended"))
        d: Deferred = Deferred(lambda d: self._waiters.remove(d) if d in self._waiters else None)
        self._waiters.append(d)
        if self._start_d is None:
            self._start_d = Deferred.fromCoroutine(self._start())
            self._start_d.addErrback(self._start_failed)
        return d

    async def _start(self) -> None:
        self.engine, self.info = await self._placement.place(self.key, hls=True)
        if self.closed:
            self._stop_engine()
            return
        self.state = self.READY
        log.info("HLS session for {key} on {engine}", key=str(self.key), engine=self.engine.address.url)
        self.touch()
        if self._on_ready is not None:
            self._on_ready(self)
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(self)

    def _start_failed(self, failure: Failure) -> None:
        if failure.check(CancelledError) and self.closed:
            return
        self._error = failure.value if failure.check(EngineError) else EngineError(failure.getErrorMessage())
        waiters, self._waiters = self._waiters, []
        self.close("engine_error")
        for d in waiters:
            d.errback(self._error)

    # -- the playlist --------------------------------------------------------------------

    async def playlist(self, segment_base: str, query: str = "") -> bytes:
        """The engine's live playlist, its segments pointing at ``segment_base``."""
        assert self.engine is not None and self.info is not None
        self.touch()
        code, body = await self.engine.fetch(self.info.playback_url)
        if code != 200 or not body.lstrip().startswith(b"#EXTM3U"):
            raise EngineError(f"engine playlist answered {code}: {body[:120]!r}")
        self.polls += 1
        m = _TARGET.search(body)
        if m:
            self.target_duration = float(m.group(1))
            self.touch()
        return self._rewrite(body, segment_base, query)

    def _rewrite(self, body: bytes, segment_base: str, query: str) -> bytes:
        assert self.engine is not None and self.info is not None
        out = []
        for raw in body.splitlines():
            line = raw.strip()
            if not line or line.startswith(b"#"):
                out.append(raw)
                continue
            absolute = urljoin(self.info.playback_url, line.decode("utf-8", "replace"))
            engine_url = self.engine.address.rewrite(absolute)
            name = urlsplit(engine_url).path.rsplit("/", 1)[-1]
            if not _SEGMENT_NAME.match(name):
                continue  # not something we will relay
            self._segments[name] = engine_url
            out.append(f"{segment_base}/{name}{query}".encode())
        while len(self._segments) > MAX_SEGMENTS:
            self._segments.pop(next(iter(self._segments)))
        return b"\n".join(out) + b"\n"

    def segment_url(self, name: str) -> Optional[str]:
        return self._segments.get(name)

    # -- lifetime --------------------------------------------------------------------------

    def touch(self) -> None:
        """A poll or a segment: the session is wanted for another idle period."""
        self.last_poll = self._clock.seconds()
        if self.closed or self.state != self.READY:
            return
        if self._expiry is not None and self._expiry.active():
            self._expiry.reset(self.idle_timeout)
        else:
            self._expiry = self._clock.callLater(self.idle_timeout, self._expired)

    def _expired(self) -> None:
        self._expiry = None
        log.info("HLS session for {key} no longer polled: stopping it", key=str(self.key))
        self.close("client_disconnected")

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.state = self.CLOSED
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._expiry = None
        if self._start_d is not None and not self._start_d.called:
            self._start_d.cancel()
        self._stop_engine()
        self._on_closed(self, reason)

    def _stop_engine(self) -> None:
        engine, info = self.engine, self.info
        self.info = None
        if engine is not None and info is not None:
            engine.stop(info).addErrback(
                lambda f: log.warn("HLS stop for {key} failed: {e}", key=str(self.key), e=f.getErrorMessage())
            )


class HlsSessions:
    """One HLS session per content key; found by key (playlists) or id (segments)."""

    def __init__(
        self,
        placement: Any,
        clock: IReactorTime,
        *,
        linger: float,
        on_ready: Optional[Callable[[HlsSession], None]] = None,
        on_closed: Optional[Callable[[HlsSession, str], None]] = None,
        limit: Optional[Any] = None,  # the SessionLimit shared with the TS sessions
    ) -> None:
        self._limit = limit
        self._on_ready = on_ready
        self._on_closed = on_closed
        self._placement = placement
        self._clock = clock
        self._linger = linger
        self._by_key: dict[ContentKey, HlsSession] = {}
        self._by_sid: dict[str, HlsSession] = {}
        self.accepting = True

    def __len__(self) -> int:
        return len(self._by_key)

    def __iter__(self) -> Any:
        return iter(list(self._by_key.values()))

    def for_key(self, key: ContentKey) -> HlsSession:
        session = self._by_key.get(key)
        if session is None:
            session = HlsSession(
                key, self._placement, self._clock, linger=self._linger, on_closed=self._closed, on_ready=self._on_ready
            )
            try:
                if self._limit is not None:
                    self._limit.open(session)
            except NoEngine as e:  # at ACEXY_MAX_SESSIONS: not kept; its ready() fails with the 503
                session.state, session._error = HlsSession.CLOSED, e
                return session
            self._by_key[key] = session
            self._by_sid[session.sid] = session
        return session

    def by_sid(self, sid: str) -> Optional[HlsSession]:
        return self._by_sid.get(sid)

    def _closed(self, session: HlsSession, reason: str) -> None:
        if self._by_key.get(session.key) is session:
            del self._by_key[session.key]
        self._by_sid.pop(session.sid, None)
        if self._limit is not None:
            self._limit.close(session)
        self._placement.release(session.key, hls=True)
        if self._on_closed is not None:
            self._on_closed(session, reason)

    def describe(self) -> list[dict[str, Any]]:
        now = self._clock.seconds()
        return [
            {
                "key": str(h.key),
                "state": h.state,
                "engine": h.engine.address.url if h.engine else None,
                "polls": h.polls,
                "segments": h.segments_served,
                "bytes_out": h.bytes_out,
                "last_poll": round(now - h.last_poll, 1),
            }
            for h in self._by_key.values()
        ]

    def shutdown(self) -> None:
        self.accepting = False
        for session in list(self._by_key.values()):
            session.close("shutdown")


class SegmentRelay(Protocol):
    """An engine segment body piped to one player: its transport pauses the engine socket."""

    def __init__(self, request: Any, session: HlsSession) -> None:
        self.request = request
        self.session = session
        self.done: Deferred = Deferred(self._cancelled)

    def connectionMade(self) -> None:
        self.request.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        self.session.bytes_out += len(data)
        self.request.write(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.done.called:
            return
        if getattr(self.request, "producer", None) is self.transport:
            self.request.unregisterProducer()
        if reason.check(ResponseDone, PotentialDataLoss):
            self.session.segments_served += 1
            self.done.callback(None)
        else:
            # mid-segment failure: the player must not take a truncated segment as whole
            channel = getattr(self.request, "channel", None)
            if channel is not None and channel.transport is not None:
                channel.transport.abortConnection()
            self.done.callback(None)

    def _cancelled(self, _: Deferred) -> None:
        # the player left: drop the engine connection too
        if self.transport is not None:
            self.transport.stopProducing()

