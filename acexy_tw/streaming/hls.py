"""
HLS: one engine HLS session per content, shared by its players.

A player polls ``/ace/manifest.m3u8?id=…``; the proxy starts (single-flight)
an engine session with ``/ace/manifest.m3u8?format=json`` and serves the
engine's live playlist with every URI in it (segment lines and ``URI="…"``
attributes: keys, init sections, renditions) replaced by an opaque proxy route
``/ace/hls/<content id>/<session id>/<name>``, written *relative* to the
playlist (``hls/…``), so the links work under whatever path prefix a reverse
proxy serves the proxy at, and a load balancer hashing on the content id
(``etc/haproxy/haproxy.cfg``) sends each segment where its playlist came
from. The engine's own addresses are not routable
from players, and may not be from anywhere but the proxy. A name stands for
one full engine URL of the current (or the previous) playlist; nothing else
can be fetched through it. A URI that is not on the engine, or that the proxy
cannot map, makes the proxy refuse the playlist (502) rather than pass it on.
The engine's playlist is fetched at most once per target duration, whatever
the number of pollers (the last one is kept, one fetch is shared).

Segments are relayed with flow control: the player's transport pauses the
engine connection directly (a 1:1 pipe, like Twisted's portforward), and each
relay is bounded (no data for ACEXY_EMPTY_TIMEOUT, twice that in all) and
closed when its session stops.

The session lives while its playlist is polled: ``max(stream_timeout, 3 ×
target duration)`` (``ACEXY_M3U8_STREAM_TIMEOUT``, acexy's meaning: a request
counts as a player for that long) after the last poll or segment it is stopped (stop command sent,
reservation released, relays closed). HLS players are never *held*: a "wait"
answer is a 503 with Retry-After — a playlist client retries by itself.

From its first engine playlist on (the HLS counterpart of a TS session's
playback opening: the engine delivers), a session polls the engine's
``stat_url`` with the same :class:`~acexy_tw.stats.SessionStats` as a TS
session (every ACEXY_STATS_INTERVAL, one request in flight, failures counted,
stopped at close), so ``/ace/status`` shows HLS sessions with the same live
fields and history. :meth:`HlsSessions.stop` ends every session of a content at once
(``POST /ace/stop``).
"""

from __future__ import annotations

import re
import secrets
from typing import Any, Callable, Optional
from urllib.parse import urljoin, urlsplit, urlunsplit

from twisted.internet.defer import CancelledError, Deferred, fail, gatherResults, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from acexy_tw.content import ContentKey
from acexy_tw.engine import EngineClient, EngineError, NoEngine, PlaybackInfo, discard_body
from acexy_tw.logs import get_logger
from acexy_tw.stats import SessionStats, session_fields

log = get_logger(__name__)

_TARGET = re.compile(rb"^#EXT-X-TARGETDURATION:\s*(\d+(?:\.\d+)?)", re.M)
#: ``URI=`` attributes of tag lines (EXT-X-KEY, EXT-X-MAP, EXT-X-MEDIA, ...)
_URI_ATTR = re.compile(r"(?<=[:,])URI=")
#: the extension an opaque name keeps (players look at it)
_EXTENSION = re.compile(r"\.[A-Za-z0-9]{1,8}$")
_CONTENT_TYPE = re.compile(rb"^[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+$")
#: hosts under which an engine lists its own URLs (its view from inside its container)
ENGINE_SELF_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
#: URIs one playlist may list (a live playlist lists a handful)
MAX_URIS = 1024


class _Refused(Exception):
    """A playlist URI the proxy will not relay: the whole playlist is refused."""


class HlsSession:
    STARTING, READY, CLOSED = "starting", "ready", "closed"

    def __init__(
        self,
        key: ContentKey,
        placement: Any,
        clock: IReactorTime,
        *,
        stream_timeout: float,
        on_closed: Callable[["HlsSession", str], None],
        on_ready: Optional[Callable[["HlsSession"], None]] = None,
        stats_interval: float = 0.0,
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
        #: playlist requests of players; ``fetches``: of the engine's playlist
        self.polls = 0
        self.fetches = 0
        self.segments_served = 0
        #: segment bytes received from the engine and sent to players (one
        #: engine fetch per player's segment GET: the two grow together)
        self.bytes_in = 0
        self.bytes_out = 0
        self.close_reason: Optional[str] = None
        self.target_duration = 0.0
        #: engine URL -> opaque name, for the URIs of the current and the previous playlist
        self._names: dict[str, str] = {}
        self._previous: dict[str, str] = {}
        self._urls: dict[str, str] = {}  # name -> engine URL (both playlists)
        #: the last playlist, as lines of alternating text and names, or the error it gave
        self._cached: Optional[Any] = None
        self._cached_until = 0.0
        self._fetching: Optional[Deferred] = None
        self._pollers: list[tuple[Deferred, str, str]] = []
        #: segment relays in progress (closed with the session)
        self.relays: set["SegmentRelay"] = set()
        self._placement = placement
        self._clock = clock
        self._stream_timeout = stream_timeout
        self._on_closed = on_closed
        self._waiters: list[Deferred] = []
        self._error: Optional[BaseException] = None
        self._start_d: Optional[Deferred] = None
        self._expiry: Optional[IDelayedCall] = None
        self._stopping: Optional[Deferred] = None
        self.stats = SessionStats(clock, stats_interval, self._stat, lambda: (self.bytes_in, self.bytes_out))

    def _stat(self) -> Optional[Deferred]:
        """One stat request to the engine (SessionStats' fetch)."""
        if self.engine is None or self.info is None or self.closed:
            return None
        return self.engine.stat(self.info)

    @property
    def closed(self) -> bool:
        return self.state == self.CLOSED

    @property
    def idle_timeout(self) -> float:
        return max(self._stream_timeout, 3 * self.target_duration, 1.0)

    @property
    def segment_path(self) -> str:
        """Where this session's segments are, relative to ``/ace/``."""
        return f"hls/{self.key.value}/{self.sid}"

    @property
    def segment_base(self) -> str:
        """The same as an absolute path."""
        return f"/ace/{self.segment_path}"

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

    def playlist(self, query: str = "", up: str = "") -> Deferred:
        """
        The engine's live playlist, every URI in it pointing at a proxy route,
        relative: ``up`` (``../`` per directory the playlist's path is below
        ``/ace/``) + ``segment_path/<name>`` + ``query``. A fresh Deferred per
        poller.

        The engine's playlist is fetched at most once per target duration,
        whatever the number of pollers: the last one is kept that long, and
        pollers arriving during a fetch wait for that fetch.
        """
        self.touch()
        self.polls += 1
        if self.closed or self.engine is None or self.info is None:
            return fail(self._error or EngineError("HLS session ended"))
        link = up + self.segment_path
        if self._cached is not None and self._clock.seconds() < self._cached_until:
            return self._answer(self._cached, query, link)
        d: Deferred = Deferred(self._forget_poller)
        self._pollers.append((d, query, link))  # before the fetch: it may fire at once
        if self._fetching is None:
            self.fetches += 1
            self._fetching = self.engine.fetch(self.info.playback_url)
            self._fetching.addBoth(self._fetched)
        return d

    def _forget_poller(self, d: Deferred) -> None:
        self._pollers = [p for p in self._pollers if p[0] is not d]

    def _answer(self, cached: Any, query: str, link: str) -> Deferred:
        if isinstance(cached, BaseException):
            return fail(cached)
        return succeed(self._render(cached, query, link))

    def _fetched(self, result: Any) -> None:
        self._fetching = None
        if self.closed:
            return  # the pollers were answered by close()
        if isinstance(result, Failure):
            error = result.value if result.check(EngineError) else EngineError(result.getErrorMessage())
            cached: Any = error
        else:
            code, body = result
            try:
                cached = self._parse(code, body)
            except EngineError as e:
                cached = e
            else:
                self.stats.start()  # the engine delivers: poll its stat_url (no-op while running)
        self._cached = cached
        self._cached_until = self._clock.seconds() + (self.target_duration or 1.0)
        pollers, self._pollers = self._pollers, []
        for d, query, link in pollers:
            self._answer(cached, query, link).chainDeferred(d)

    def _parse(self, code: int, body: bytes) -> list[list[str]]:
        """The engine playlist as lines of alternating text and names; EngineError if refused."""
        if code != 200 or not body.lstrip().startswith(b"#EXTM3U"):
            raise EngineError(f"engine playlist answered {code}: {body[:120]!r}")
        m = _TARGET.search(body)
        if m:
            self.target_duration = float(m.group(1))
            self.touch()
        text = body.decode("utf-8", "replace")
        names: dict[str, str] = {}
        lines: list[list[str]] = []
        try:
            for raw in text.splitlines():
                line = raw.strip()
                if not line:
                    continue
                if not line.startswith("#"):
                    lines.append(["", self._name_for(line, names), ""])
                elif "URI=" not in line:
                    lines.append([line])
                else:
                    lines.append(self._tag_with_uris(line, names))
        except _Refused as e:
            log.warn("HLS playlist for {key} refused: {why}", key=str(self.key), why=str(e))
            raise EngineError(f"engine playlist refused: {e}") from None
        self._previous, self._names = self._names, names
        self._urls = {name: url for url, name in self._previous.items()}
        self._urls.update({name: url for url, name in names.items()})
        return lines

    def _tag_with_uris(self, line: str, names: dict[str, str]) -> list[str]:
        """A tag line whose ``URI="..."`` attributes become names; anything else with URI= is refused."""
        parts: list[str] = []
        pos = 0
        for m in _URI_ATTR.finditer(line):
            if m.start() < pos:
                continue  # inside a value already taken
            if line[m.end() : m.end() + 1] != '"':
                raise _Refused("a URI attribute that is not a quoted string")
            close = line.find('"', m.end() + 1)
            if close < 0:
                raise _Refused("an unterminated URI attribute")
            parts.append(line[pos : m.end() + 1])
            parts.append(self._name_for(line[m.end() + 1 : close], names))
            pos = close
        parts.append(line[pos:])
        if sum(parts[i].count("URI=") for i in range(0, len(parts), 2)) != len(parts) // 2:
            raise _Refused("a URI attribute the proxy cannot map")
        return parts

    def _name_for(self, uri: str, names: dict[str, str]) -> str:
        """The opaque name of ``uri`` (resolved on the engine), kept while it is listed."""
        assert self.engine is not None and self.info is not None
        absolute = urljoin(self.info.playback_url, uri)
        parts = urlsplit(absolute)
        if parts.scheme not in ("http", "https") or parts.username is not None or parts.password is not None:
            raise _Refused(f"URI {uri[:80]!r} is not plain http(s)")
        host = (parts.hostname or "").lower()
        on_engine = host == self.engine.address.host.lower() or host in ENGINE_SELF_HOSTS
        # The engine lists its URLs under its own view of its address (a
        # container's IP, say; CONTRACTS.md §1): an engine route (/ace/...) on
        # another host is the engine's, fetched from the address we use.
        if not on_engine and not (parts.path or "").startswith("/ace/"):
            raise _Refused(f"URI {uri[:80]!r} is not on the engine")
        engine_url = urlunsplit((self.engine.address.scheme, self.engine.address.netloc, parts.path or "/", parts.query, ""))
        name = names.get(engine_url) or self._names.get(engine_url) or self._previous.get(engine_url)
        if name is None:
            if len(names) >= MAX_URIS:
                raise _Refused(f"more than {MAX_URIS} URIs")
            ext = _EXTENSION.search(parts.path)
            name = secrets.token_urlsafe(9) + (ext.group(0) if ext else "")
        names[engine_url] = name
        return name

    def _render(self, lines: list[list[str]], query: str, link: str) -> bytes:
        out = []
        for parts in lines:
            out.append("".join(p if i % 2 == 0 else f"{link}/{p}{query}" for i, p in enumerate(parts)))
        return ("\n".join(out) + "\n").encode("utf-8")

    def segment_url(self, name: str) -> Optional[str]:
        """The engine URL behind ``name``, if the current or the previous playlist listed it."""
        return self._urls.get(name)

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
        self.close_reason = reason
        self.stats.stop()
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._expiry = None
        if self._start_d is not None and not self._start_d.called:
            self._start_d.cancel()
        pollers, self._pollers = self._pollers, []
        if self._fetching is not None:
            self._fetching.cancel()
        for d, _, _ in pollers:
            d.errback(EngineError("HLS session ended"))
        for relay in list(self.relays):
            relay.abort("the HLS session stopped", 503)
        self._urls.clear()
        self._stop_engine()
        self._on_closed(self, reason)

    def _stop_engine(self) -> None:
        engine, info = self.engine, self.info
        self.info = None
        if engine is not None and info is not None:
            self._stopping = engine.stop(info).addErrback(
                lambda f: log.warn("HLS stop for {key} failed: {e}", key=str(self.key), e=f.getErrorMessage())
            )

    def describe(self) -> dict[str, Any]:
        """This session as the status page shows it: the TS sessions' fields
        (``clients`` is unknown for HLS: players are pollers), and its own."""
        now = self._clock.seconds()
        return {
            "kind": "hls",
            **session_fields(self, now),
            "clients": None,
            "polls": self.polls,
            "fetches": self.fetches,
            "relays": len(self.relays),
            "segments": self.segments_served,
            "last_poll": round(now - self.last_poll, 1),
        }

    def stopped(self) -> Deferred:
        """Fires (a fresh Deferred) once the engine answered the stop (or its bound passed)."""
        d: Deferred = Deferred()
        if self._stopping is None:
            d.callback(None)
        else:
            self._stopping.addBoth(lambda r: (d.callback(None), r)[1])
        return d


class HlsSessions:
    """One HLS session per content key; found by key (playlists) or id (segments)."""

    def __init__(
        self,
        placement: Any,
        clock: IReactorTime,
        *,
        stream_timeout: float,
        on_ready: Optional[Callable[[HlsSession], None]] = None,
        on_closed: Optional[Callable[[HlsSession, str], None]] = None,
        limit: Optional[Any] = None,  # the SessionLimit shared with the TS sessions
        stats_interval: float = 0.0,  # ACEXY_STATS_INTERVAL (0: the engine's stat_url is never asked)
    ) -> None:
        self._limit = limit
        self._stats_interval = stats_interval
        self._on_ready = on_ready
        self._on_closed = on_closed
        self._placement = placement
        self._clock = clock
        self._stream_timeout = stream_timeout
        self._by_key: dict[ContentKey, HlsSession] = {}
        self._by_sid: dict[str, HlsSession] = {}
        #: stop commands of closed sessions not answered yet (shutdown waits for them too)
        self._stops: set[Deferred] = set()
        self.accepting = True

    def __len__(self) -> int:
        return len(self._by_key)

    def __iter__(self) -> Any:
        return iter(list(self._by_key.values()))

    def for_key(self, key: ContentKey) -> HlsSession:
        session = self._by_key.get(key)
        if session is None:
            session = HlsSession(
                key,
                self._placement,
                self._clock,
                stream_timeout=self._stream_timeout,
                on_closed=self._closed,
                on_ready=self._on_ready,
                stats_interval=self._stats_interval,
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

    def find(self, value: str) -> list[HlsSession]:
        """Sessions whose content id / infohash is ``value`` (any extras)."""
        value = value.strip().lower()
        return [s for s in self._by_key.values() if s.key.value == value]

    def stop(self, value: str) -> int:
        """End every session of content ``value`` (any extras) as a close does:
        pollers and relays answered, the stop command sent, the reservation
        released. Returns how many were open. A player polling again starts
        a new one."""
        sessions = self.find(value)
        for session in sessions:
            log.info("HLS session for {key} stopped on request", key=str(session.key))
            session.close("stopped")
        return len(sessions)

    def _closed(self, session: HlsSession, reason: str) -> None:
        if self._by_key.get(session.key) is session:
            del self._by_key[session.key]
        self._by_sid.pop(session.sid, None)
        if self._limit is not None:
            self._limit.close(session)
        self._placement.release(session.key, hls=True)
        d = session.stopped()
        if not d.called:
            self._stops.add(d)
            d.addBoth(lambda r: (self._stops.discard(d), r)[1])
        if self._on_closed is not None:
            self._on_closed(session, reason)

    def describe(self) -> list[dict[str, Any]]:
        return [h.describe() for h in self._by_key.values()]

    def shutdown(self) -> Deferred:
        """Close every session; fires once every stop command is answered (each
        is bounded): theirs, and those of sessions that closed just before."""
        self.accepting = False
        for session in list(self._by_key.values()):
            session.close("shutdown")
        return gatherResults(list(self._stops)).addCallback(lambda _: None)


class SegmentRelay(Protocol):
    """
    One segment GET: the engine's body piped to one player, its transport
    pausing the engine socket (flow control), and bounded: no data for
    ``idle_timeout`` or longer than ``max_duration`` in all, or its session
    stopping, closes both connections.
    """

    def __init__(
        self,
        request: Any,
        session: HlsSession,
        url: str,
        clock: IReactorTime,
        *,
        idle_timeout: float,
        max_duration: float,
    ) -> None:
        self.request = request
        self.session = session
        self.url = url
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._max_duration = max_duration
        #: fires with None once relayed (or cut), or with (status, message) when nothing was sent
        self.done: Deferred = Deferred(self._cancelled)
        self._over = False
        self._get: Optional[Deferred] = None
        self._last_data = clock.seconds()
        self._timers: list[IDelayedCall] = []

    def start(self) -> Deferred:
        self.session.relays.add(self)
        self._timers = [
            self._clock.callLater(self._idle_timeout, self._check_idle),
            self._clock.callLater(self._max_duration, self.abort, f"segment took over {self._max_duration:g}s", 504),
        ]
        assert self.session.engine is not None
        self._get = self.session.engine.get(self.url)
        self._get.addCallbacks(self._response, self._failed)
        return self.done

    # -- engine side ------------------------------------------------------------------

    def _response(self, response: Any) -> None:
        self._get = None
        if self._over:
            discard_body(response)
            return
        if response.code != 200:
            discard_body(response)
            self._finish((404 if response.code == 404 else 502, f"engine segment answered {response.code}"))
            return
        types = response.headers.getRawHeaders(b"content-type") or []
        content_type = types[0] if types and _CONTENT_TYPE.match(types[0]) else b"video/MP2T"
        self.request.setHeader(b"content-type", content_type)
        self._last_data = self._clock.seconds()
        response.deliverBody(self)

    def _failed(self, failure: Failure) -> None:
        self._get = None
        if self._over:
            return
        error = failure.value
        if isinstance(error, EngineError):
            self._finish((error.http_status, str(error)))
        else:
            self._finish((502, f"engine segment failed: {failure.getErrorMessage()}"))

    def connectionMade(self) -> None:
        self.request.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        self._last_data = self._clock.seconds()
        self.session.bytes_in += len(data)
        self.session.bytes_out += len(data)
        self.request.write(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._unregister()
        if self._over:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.session.segments_served += 1
            self.session.touch()
        else:
            self._cut_player()  # a truncated segment must not pass for a whole one
        self._finish(None)

    # -- deadlines and the end ----------------------------------------------------------

    def _check_idle(self) -> None:
        quiet = self._clock.seconds() - self._last_data
        if quiet >= self._idle_timeout:
            self.abort(f"no segment data for {self._idle_timeout:g}s", 504)
        else:
            self._timers.append(self._clock.callLater(self._idle_timeout - quiet, self._check_idle))

    def abort(self, why: str, status: int = 504) -> None:
        """End now (a deadline, or the session stopped): both connections are closed."""
        if self._over:
            return
        log.info("HLS segment relay for {key} closed: {why}", key=str(self.session.key), why=why)
        started = self.transport is not None
        if started:
            self._unregister()
            self._cut_player()
        self._finish(None if started else (status, why))

    def _cut_player(self) -> None:
        channel = getattr(self.request, "channel", None)
        if channel is not None and channel.transport is not None:
            channel.transport.abortConnection()

    def _finish(self, result: Optional[tuple[int, str]]) -> None:
        self._release()
        self.done.callback(result)

    def _unregister(self) -> None:
        if self.transport is None or getattr(self.request, "producer", None) is not self.transport:
            return
        if getattr(self.request, "channel", None) is not None:
            self.request.unregisterProducer()
        else:  # the player's connection is gone already
            self.request.producer = None

    def _release(self) -> None:
        """Timers off, out of the session, the engine connection closed (if not done)."""
        self._over = True
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self._timers = []
        self.session.relays.discard(self)
        if self._get is not None:
            get, self._get = self._get, None
            get.cancel()
        elif self.transport is not None:
            self._unregister()
            self.transport.stopProducing()  # no-op once the body ended

    def _cancelled(self, _: Deferred) -> None:
        # the player left: drop the engine connection too
        if not self._over:
            self._release()
