"""
A simulated AceStream engine speaking the wire contract of CONTRACTS.md §1.

Tests, the demo and benchmarks need an engine that is always there, starts in
milliseconds, serves real MPEG-TS and can be told to misbehave the way real
engines do (slow or failing JSON, error pages instead of video, stalls, resets,
stop commands that fail or hang, refused connections).  :class:`SimEngine`
is that engine; its state is plain data a test can inspect, and
:meth:`SimEngine.when` lets a test wait for a state instead of sleeping.

Start one in a trial test::

    engine = SimEngine(reactor, bitrate=2_000_000)
    engine.listen()                          # 127.0.0.1, a free port
    self.addCleanup(engine.shutdown)         # close connections, stop listening
    ...
    engine.behaviour.json_delay = 2.0        # later getstreams answer slowly
    yield engine.when(lambda e: e.open_playbacks == 1).addTimeout(10, reactor)

Or from a shell: ``python -m acexy_tw.sim.engine --port 6878 --bitrate 4M``.

Like a real engine inside Docker, the URLs it hands out carry its *advertised*
address (``advertise_host:advertise_port``, default ``127.0.0.1:6878``), not the
one it listens on, so a proxy has to rewrite them.

HLS (see :mod:`acexy_tw.sim.hls` for the timeline and segments):

- ``GET /ace/manifest.m3u8?format=json&<selector>=...`` starts a session like
  getstream (same JSON, same getstream knobs; recorded in
  :attr:`SimEngine.manifest_calls`, not ``getstream_calls``), but its
  ``playback_url`` is ``http://<advertised>/ace/m/<infohash>/<token>.m3u8``.
  Without ``format=json`` the answer is 404, unless the engine was made with
  ``hls_direct=True``: then it starts (or, for the same infohash and ``pid``,
  reuses) a session and serves its playlist directly, as a real engine does;
- ``GET /ace/m/<infohash>/<token>.m3u8``: a live media playlist of the newest
  ``hls_window`` segments, as absolute URLs on the advertised address,
  ``application/vnd.apple.mpegurl``; counted in ``SimSession.manifest_requests``;
- ``GET /ace/c/<infohash>/<n>.ts``: segment ``n`` of the content's live stream,
  ``hls_segment_duration`` seconds of MPEG-TS (``video/MP2T``) at ``bitrate``
  (4 Mbit/s when flat out); 404 when too old, not complete yet, or once no
  HLS session of that infohash is active (after stop).

Knobs: ``Behaviour.manifest_status``/``manifest_delay``/``playlist_head``/
``playlist_tail`` (playlist), ``segment_status``/``segment_delay``/
``segment_stall_after`` (segments).

Failures are persistent: ``behaviour`` is copied onto every request, so
``Behaviour(reset_after=0)`` makes every playback answer 200 and reset at
once, ``stall_after=N`` stalls every playback after N bytes.  For a failure
that heals, :meth:`SimEngine.fail_next_playbacks` fails only the next n
playbacks (:attr:`SimEngine.failing_playbacks` are still to come).

The reactor is always passed in; this module never imports the global one
except in :func:`main`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import secrets
from copy import copy
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTCP, IReactorTime
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES, HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from acexy_tw.sim.cli import run
from acexy_tw.sim.conditions import Conditions
from acexy_tw.sim.hls import HlsStream, check_timing
from acexy_tw.sim.model import Behaviour, SimSession
from acexy_tw.sim.playback import PlaybackStream
from acexy_tw.sim.tsgen import CODECS, DEFAULT_GOP, FLAT_OUT_NOMINAL_BITRATE, TSGenerator

__all__ = ["SimEngine", "Behaviour", "SimSession", "PlaybackStream", "HlsStream", "parse_bitrate", "main"]

#: query parameters that select the content, in the order they are honoured
SELECTORS = ("content_id", "id", "infohash", "url", "magnet")
UNKNOWN_SESSION = "unknown playback session id"
#: what :meth:`SimEngine.fail_next_playbacks` can make a playback do
PLAYBACK_FAILURES = ("reset", "eof", "stall")
VERSION_INFO = {"code": 3020300, "platform": "linux", "version": "3.2.3"}
PLAYLIST_TYPE = b"application/vnd.apple.mpegurl"
SEGMENT_NAME = re.compile(r"^(\d{1,12})\.ts$")

Predicate = Callable[["SimEngine"], bool]


# --- responses ------------------------------------------------------------------


def _connected(request: Request) -> bool:
    return getattr(request, "channel", None) is not None


def _send(request: Request, status: int, content_type: bytes, body: bytes) -> None:
    """Answer and finish, unless the client has already gone."""
    if not _connected(request):
        return
    request.setResponseCode(status)
    request.setHeader(b"content-type", content_type)
    request.setHeader(b"content-length", b"%d" % len(body))
    request.write(body)
    request.finish()


def _send_json(request: Request, obj: object, status: int = 200) -> None:
    _send(request, status, b"application/json", json.dumps(obj).encode())


def _send_text(request: Request, status: int, text: Optional[str] = None) -> None:
    body = text.encode() if text is not None else RESPONSES.get(status, b"Error")
    _send(request, status, b"text/plain; charset=utf-8", body)


def _error(message: str) -> dict:
    return {"response": None, "error": message}


def _query(request: Request) -> Dict[str, str]:
    """The query string as ``{name: first value}``."""
    return {
        key.decode("utf-8", "replace"): values[0].decode("utf-8", "replace")
        for key, values in request.args.items()
        if values
    }


# --- connections and deferred answers --------------------------------------------


class _TrackedChannel(HTTPChannel):
    """An ``HTTPChannel`` that reports to its site when it comes and goes, so
    the engine can drop every connection it accepted and know when they are
    all gone."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.factory.connection_made(self)

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self.factory.connection_lost(self)


class SimSite(Site):
    """A quiet ``Site`` (no access log: benchmarks make many requests) that
    tracks its open connections; the simulated engine and orchestrator both
    serve through one."""

    protocol = _TrackedChannel
    noisy = False

    def __init__(self, resource: Resource, reactor: IReactorTime, on_change: Callable[[], None]):
        super().__init__(resource, reactor=reactor)
        self.connections: set = set()
        self._on_change = on_change

    def connection_made(self, channel: HTTPChannel) -> None:
        self.connections.add(channel)
        self._on_change()

    def connection_lost(self, channel: HTTPChannel) -> None:
        self.connections.discard(channel)
        self._on_change()

    def log(self, request: Request) -> None:
        pass


class _PendingAnswers:
    """Answers given later (a delay) or never (a hang).

    Each is forgotten, and its timer cancelled, when its client leaves;
    :meth:`cancel_all` drops the rest, so no ``DelayedCall`` outlives
    ``SimEngine.close``.
    """

    def __init__(self, reactor: IReactorTime, on_change: Callable[[], None]) -> None:
        self._reactor = reactor
        self._on_change = on_change
        self._pending: Dict[Request, Optional[IDelayedCall]] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def answer(self, request: Request, answer: Callable[[], None], *, delay: float, hang: bool) -> int:
        if not hang and delay <= 0:
            answer()
            return NOT_DONE_YET
        call = None if hang else self._reactor.callLater(delay, self._fire, request, answer)
        self._pending[request] = call
        request.notifyFinish().addBoth(self._forget, request)
        self._on_change()
        return NOT_DONE_YET

    def _fire(self, request: Request, answer: Callable[[], None]) -> None:
        self._pending.pop(request, None)
        answer()
        self._on_change()

    def _forget(self, _result: object, request: Request) -> None:
        if request not in self._pending:
            return
        call = self._pending.pop(request)
        if call is not None and call.active():
            call.cancel()
        self._on_change()

    def cancel_all(self) -> None:
        for call in self._pending.values():
            if call is not None and call.active():
                call.cancel()
        self._pending.clear()


# --- HTTP surface ------------------------------------------------------------------


class _EngineResource(Resource):
    """The engine's HTTP API (CONTRACTS.md §1); the state lives in the engine."""

    isLeaf = True

    def __init__(self, engine: "SimEngine") -> None:
        super().__init__()
        self._engine = engine

    def render_GET(self, request: Request) -> int:
        path = request.path.decode("utf-8", "replace").strip("/").split("/")
        route = self._route(path)
        if route is None:
            _send_text(request, 404)
            return NOT_DONE_YET
        handler, args = route
        return handler(request, *args)

    def _route(self, path: List[str]) -> Optional[Tuple[Callable[..., int], Sequence[str]]]:
        if path == ["ace", "getstream"]:
            return self._getstream, ()
        if path == ["ace", "manifest.m3u8"]:
            return self._manifest, ()
        if len(path) == 4 and path[:2] == ["ace", "m"] and path[3].endswith(".m3u8"):
            return self._playlist, (path[2], path[3][: -len(".m3u8")])
        if len(path) == 4 and path[:2] == ["ace", "c"]:
            return self._segment, path[2:]
        if len(path) == 4 and path[:2] == ["ace", "r"]:
            return self._playback, path[2:]
        if len(path) == 4 and path[:2] == ["ace", "stat"]:
            return self._stat, path[2:]
        if len(path) == 4 and path[:2] == ["ace", "cmd"]:
            return self._command, path[2:]
        if path == ["webui", "api", "service"]:
            return self._service, ()
        if path == ["server", "api"]:
            return self._server_api, ()
        return None

    # getstream ----------------------------------------------------------------

    def _getstream(self, request: Request) -> int:
        params = _query(request)
        self._engine.getstream_calls.append(params)
        return self._start(request, params, hls=False, direct=False)

    def _manifest(self, request: Request) -> int:
        params = _query(request)
        direct = params.get("format") != "json"
        if direct and not self._engine.hls_direct:
            _send_text(request, 404)
            return NOT_DONE_YET
        self._engine.manifest_calls.append(params)
        return self._start(request, params, hls=True, direct=direct)

    def _start(self, request: Request, params: Dict[str, str], *, hls: bool, direct: bool) -> int:
        """getstream and manifest.m3u8: start a session, after the getstream knobs."""
        engine = self._engine
        behaviour = copy(engine.behaviour)
        engine._changed()
        return engine._answers.answer(
            request,
            lambda: self._answer_start(request, params, behaviour, hls, direct),
            delay=behaviour.json_delay,
            hang=behaviour.json_hang,
        )

    def _answer_start(
        self, request: Request, params: Dict[str, str], behaviour: Behaviour, hls: bool, direct: bool
    ) -> None:
        engine = self._engine
        if behaviour.getstream_status != 200:
            _send_text(request, behaviour.getstream_status)
            return
        if behaviour.json_error is not None:
            if direct:
                _send_text(request, 500, behaviour.json_error)
            else:
                _send_json(request, _error(behaviour.json_error))
            return
        selector = next((name for name in SELECTORS if params.get(name)), None)
        if selector is None:
            if direct:
                _send_text(request, 400, "missing content id")
            else:
                _send_json(request, _error("missing content id"))
            return
        if direct:
            session = engine._reuse_hls_session(selector, params[selector], params.get("pid"))
            if session is None:
                session = engine._open_session(selector, params[selector], params, hls=True)
            self._count_playlist_request(session)
            self._serve_playlist(request, session, behaviour)
            return
        session = engine._open_session(selector, params[selector], params, hls=hls)
        _send_json(request, {"response": engine.session_urls(session), "error": None})

    # HLS playlist and segments ------------------------------------------------

    def _playlist(self, request: Request, infohash: str, token: str) -> int:
        engine = self._engine
        session = engine._session_for(infohash, token)
        if session is None or not session.hls:
            _send_text(request, 404)
            return NOT_DONE_YET
        self._count_playlist_request(session)
        if session.stopped:
            _send_text(request, 404)
            return NOT_DONE_YET
        behaviour = copy(engine.behaviour)
        return engine._answers.answer(
            request,
            lambda: self._serve_playlist(request, session, behaviour),
            delay=behaviour.manifest_delay,
            hang=False,
        )

    def _count_playlist_request(self, session: SimSession) -> None:
        engine = self._engine
        session.manifest_requests += 1
        session.last_manifest_at = engine.reactor.seconds()
        engine.manifest_requests += 1
        engine._changed()

    def _serve_playlist(self, request: Request, session: SimSession, behaviour: Behaviour) -> None:
        engine = self._engine
        stream = engine.hls_streams.get(session.infohash)
        if session.stopped or stream is None:
            _send_text(request, 404)
        elif behaviour.manifest_status != 200:
            _send_text(request, behaviour.manifest_status)
        else:
            body = stream.playlist(
                engine.reactor.seconds(),
                engine.advertised_base,
                head=behaviour.playlist_head,
                tail=behaviour.playlist_tail,
            )
            _send(request, 200, PLAYLIST_TYPE, body.encode())

    def _segment(self, request: Request, infohash: str, name: str) -> int:
        engine = self._engine
        infohash = infohash.lower()
        match = SEGMENT_NAME.match(name)
        engine.segment_requests += 1
        stream = engine.hls_streams.get(infohash)
        if stream is not None:
            stream.segment_requests += 1
            for session in engine._hls_sessions(infohash):
                session.segment_requests += 1
        engine._changed()
        if match is None or stream is None:
            _send_text(request, 404)
            return NOT_DONE_YET
        behaviour = copy(engine.behaviour)
        return engine._answers.answer(
            request,
            lambda: self._serve_segment(request, infohash, int(match.group(1)), behaviour),
            delay=behaviour.segment_delay,
            hang=False,
        )

    def _serve_segment(self, request: Request, infohash: str, n: int, behaviour: Behaviour) -> None:
        engine = self._engine
        stream = engine.hls_streams.get(infohash)
        if stream is None:  # stopped while the answer was delayed
            _send_text(request, 404)
            return
        if behaviour.segment_status != 200:
            _send_text(request, behaviour.segment_status)
            return
        data = stream.segment(n, engine.reactor.seconds())
        if data is None:
            _send_text(request, 404)
            return
        if not _connected(request):
            return
        stream.segments_served += 1
        stream.bytes_sent += len(data)
        size = len(data)
        if behaviour.segment_stall_after is not None:
            data = data[: behaviour.segment_stall_after]
        for session in engine._hls_sessions(infohash):
            session.segments_served += 1
            session.bytes_sent += len(data)
        if behaviour.segment_stall_after is not None:  # headers and a part, then silence
            request.setResponseCode(200)
            request.setHeader(b"content-type", b"video/MP2T")
            request.setHeader(b"content-length", b"%d" % size)
            request.write(data)
        else:
            _send(request, 200, b"video/MP2T", data)
        engine._changed()

    # playback -----------------------------------------------------------------

    def _playback(self, request: Request, infohash: str, token: str) -> int:
        engine = self._engine
        session = engine._session_for(infohash, token)
        if session is None or session.stopped or session.hls:
            _send_text(request, 404)  # an HLS session plays through its playlist only
            return NOT_DONE_YET
        stream = PlaybackStream(
            request,
            session,
            engine._playback_behaviour(),
            reactor=engine.reactor,
            bitrate=engine.bitrate,
            tick=engine.tick,
            chunk=engine.chunk,
            generator=engine.generator(),
            on_change=engine._changed,
        )
        session.playbacks.append(stream)
        engine._changed()
        stream.begin()
        return NOT_DONE_YET

    # stat and command ---------------------------------------------------------

    def _stat(self, request: Request, infohash: str, token: str) -> int:
        session = self._engine._session_for(infohash, token)
        self._engine.stat_requests += 1
        if session is not None:
            session.stat_requests += 1
        if session is None or session.stopped:
            _send_json(request, _error(UNKNOWN_SESSION))
        else:
            _send_json(request, {"response": self._engine.session_stat(session), "error": None})
        return NOT_DONE_YET

    def _command(self, request: Request, infohash: str, token: str) -> int:
        engine = self._engine
        method = _query(request).get("method")
        if method != "stop":
            _send_json(request, _error(f"unknown method: {method}"))
            return NOT_DONE_YET
        session = engine._session_for(infohash, token)
        behaviour = copy(engine.behaviour)
        engine.stop_count += 1
        if session is not None:
            session.stop_commands += 1
        engine._changed()
        return engine._answers.answer(
            request,
            lambda: self._answer_stop(request, session, behaviour),
            delay=0,
            hang=behaviour.stop_hang,
        )

    def _answer_stop(self, request: Request, session: Optional[SimSession], behaviour: Behaviour) -> None:
        if behaviour.stop_status != 200:
            _send_json(request, _error("internal error"), behaviour.stop_status)
        elif session is None or session.stopped:
            _send_json(request, _error(UNKNOWN_SESSION))
        else:
            self._engine._stop_session(session)
            _send_json(request, {"response": "ok", "error": None})

    # liveness -----------------------------------------------------------------

    def _service(self, request: Request) -> int:
        if _query(request).get("method") == "get_version":
            _send_json(request, {"result": dict(VERSION_INFO), "error": None})
        else:
            _send_json(request, {"result": None, "error": "unknown method"})
        return NOT_DONE_YET

    def _server_api(self, request: Request) -> int:
        if _query(request).get("method") == "get_status":
            _send_json(request, {"result": {"status": 1}, "error": None})
        else:
            _send_json(request, {"result": None, "error": "unknown method"})
        return NOT_DONE_YET


# --- the engine ---------------------------------------------------------------------


class SimEngine:
    """
    A simulated AceStream engine: state, knobs, waiting and lifecycle.

    :param reactor: provides ``IReactorTCP`` and ``IReactorTime``.
    :param bitrate: bit/s of every playback, or ``None`` for flat out.
    :param advertise_host: host put in the URLs getstream returns.
    :param advertise_port: port put in the URLs getstream returns.
    :param behaviour: initial misbehaviour (default: well-behaved); replace
        or mutate ``engine.behaviour`` at any time.
    :param tick: seconds between writes of a rate-limited playback.
    :param chunk: bytes per write of a flat-out playback.
    :param hls_segment_duration: seconds per HLS segment (>= 0.1; durations
        are rounded up to the 80 ms PSI cadence, so 2.0 is exact and 0.3
        gives 0.32/0.32/0.32/0.24 s); read when a content's HLS stream starts.
    :param hls_window: segments listed by an HLS playlist; segments stay
        fetchable while among the newest ``2 * hls_window``.
    :param hls_direct: serve ``/ace/manifest.m3u8`` without ``format=json``
        as a playlist (reusing the session of the same infohash and pid)
        instead of answering 404.
    :param gop: seconds from one keyframe to the next in a playback
        (``None``: every frame is one); HLS segments keep their own stream.
    :param codec: the playbacks' video, ``"mpeg2"`` or ``"h264"``.
    :param random_access_indicator: flag keyframes in the adaptation field
        (False: a muxer that does not, so a reader must find them in the video).
    """

    def __init__(
        self,
        reactor: IReactorTCP,
        *,
        bitrate: Optional[int] = 4_000_000,
        advertise_host: str = "127.0.0.1",
        advertise_port: int = 6878,
        behaviour: Optional[Behaviour] = None,
        tick: float = 0.025,
        chunk: int = 64 * 1024,
        hls_segment_duration: float = 2.0,
        hls_window: int = 4,
        hls_direct: bool = False,
        gop: Optional[float] = DEFAULT_GOP,
        codec: str = "mpeg2",
        random_access_indicator: bool = True,
    ) -> None:
        check_timing(hls_segment_duration, hls_window, prefix="hls_")  # now, not at the first manifest
        self.reactor = reactor
        self.bitrate = bitrate
        self.advertise_host = advertise_host
        self.advertise_port = advertise_port
        self.behaviour = behaviour if behaviour is not None else Behaviour()
        self.tick = tick
        self.chunk = chunk
        self.hls_segment_duration = hls_segment_duration
        self.hls_window = hls_window
        self.hls_direct = hls_direct
        if codec not in CODECS:
            raise ValueError(f"codec {codec!r} is not one of {', '.join(CODECS)}")
        self.gop = gop
        self.codec = codec
        self.random_access_indicator = random_access_indicator
        #: the query parameters of every getstream, in arrival order
        self.getstream_calls: List[Dict[str, str]] = []
        #: the query parameters of every ``/ace/manifest.m3u8`` that was not
        #: refused with 404, in arrival order
        self.manifest_calls: List[Dict[str, str]] = []
        #: playlist requests of any HLS session (even a stopped one; any
        #: status), plus direct ``/ace/manifest.m3u8`` playlists
        self.manifest_requests = 0
        #: ``/ace/c/...`` segment requests, any status
        self.segment_requests = 0
        #: the live HLS stream of each content with an active HLS session
        self.hls_streams: Dict[str, HlsStream] = {}
        #: every session, by playback_session_id (stopped ones stay, so
        #: ``len(sessions)`` counts every session ever opened)
        self.sessions: Dict[str, SimSession] = {}
        #: stop commands received, for any session, answered or not
        self.stop_count = 0
        #: stat_url requests, for any session (or none), any answer
        self.stat_requests = 0
        #: the port number of the last ``listen`` (kept after stop_listening)
        self.port: Optional[int] = None
        self.interface: Optional[str] = None
        self._by_token: Dict[str, SimSession] = {}
        #: scripted failures of the next playbacks: (how, after bytes), in order
        self._playback_failures: List[Tuple[str, int]] = []
        self._conditions = Conditions(self)
        self._answers = _PendingAnswers(reactor, self._changed)
        self._site = SimSite(_EngineResource(self), reactor, self._changed)
        self._listening: Optional[IListeningPort] = None

    # --- listening ------------------------------------------------------------

    def listen(self, port: int = 0, interface: str = "127.0.0.1") -> IListeningPort:
        """Start accepting connections, synchronously; ``port=0`` picks a free
        port (see :attr:`port`), and ``listen(engine.port)`` after
        :meth:`stop_listening` takes the same port again."""
        if self._listening is not None:
            raise RuntimeError("already listening")
        self._listening = self.reactor.listenTCP(port, self._site, interface=interface)
        self.port = self._listening.getHost().port
        self.interface = interface
        return self._listening

    def stop_listening(self) -> "Deferred[None]":
        """Refuse new connections; open ones (playbacks too) carry on."""
        if self._listening is None:
            return succeed(None)
        listening, self._listening = self._listening, None
        return maybeDeferred(listening.stopListening)

    @property
    def listening(self) -> bool:
        return self._listening is not None

    @property
    def url(self) -> str:
        """Where this engine really listens (not what it advertises)."""
        return f"http://{self.interface}:{self.port}"

    def close(self) -> "Deferred[None]":
        """Stop every playback and pending timer and reset every connection;
        fires once all the engine's connections are gone.  The engine keeps
        listening: call :meth:`stop_listening` too, or :meth:`shutdown`."""
        self._answers.cancel_all()
        for stream in self.playbacks:
            stream.abort()
        for channel in list(self._site.connections):
            channel.transport.abortConnection()
        return self.when(lambda engine: not engine._site.connections)

    stopAll = close

    def shutdown(self) -> "Deferred[None]":
        """:meth:`close`, then :meth:`stop_listening`: a clean reactor."""
        return self.close().addCallback(lambda _: self.stop_listening())

    # --- observability ---------------------------------------------------------------

    @property
    def playbacks(self) -> List[PlaybackStream]:
        """Every playback request of every session, in no particular order."""
        return [stream for session in self.sessions.values() for stream in session.playbacks]

    @property
    def open_playbacks(self) -> int:
        """Playback connections currently open (prebuffering, streaming or stalled)."""
        return sum(len(session.open_playbacks) for session in self.sessions.values())

    @property
    def active_sessions(self) -> List[SimSession]:
        """Sessions not stopped, in creation order."""
        return [session for session in self.sessions.values() if not session.stopped]

    @property
    def last_session(self) -> Optional[SimSession]:
        """The most recently created session."""
        return next(reversed(self.sessions.values()), None)

    @property
    def connections(self) -> int:
        """TCP connections currently open to this engine."""
        return len(self._site.connections)

    @property
    def pending_answers(self) -> int:
        """getstream/manifest/stop/playlist/segment requests waiting for a
        delayed or hung answer."""
        return len(self._answers)

    @property
    def waiters(self) -> int:
        """``when`` Deferreds still waiting."""
        return len(self._conditions)

    def when(self, predicate: Predicate) -> "Deferred[None]":
        """A Deferred that fires (once) as soon as ``predicate(self)`` is true
        (see :class:`acexy_tw.sim.conditions.Conditions`)."""
        return self._conditions.when(predicate)

    def _changed(self) -> None:
        """Re-check the ``when`` waiters; called after every state change."""
        self._conditions.changed()

    # --- scripting -----------------------------------------------------------------

    def fail_next_playbacks(self, n: int, *, how: str = "reset", after: int = 0) -> None:
        """
        The next ``n`` playback connections of any session (counted on
        arrival; a 404 for an unknown or stopped session is not one) answer
        200 and then, after ``after`` bytes, reset the TCP connection
        (``"reset"``), end the response cleanly (``"eof"``) or go silent with
        the connection open (``"stall"``, rounded down to whole packets).
        ``playback_delay`` still applies; ``playback_status``,
        ``playback_hang`` and the byte-budget knobs of :attr:`behaviour` do not.
        Later playbacks follow :attr:`behaviour` again.  Calls add up, in order.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an int >= 0, not {n!r}")
        if how not in PLAYBACK_FAILURES:
            raise ValueError(f"unknown how {how!r}; one of {', '.join(PLAYBACK_FAILURES)}")
        if isinstance(after, bool) or not isinstance(after, int) or after < 0:
            raise ValueError(f"after must be an int >= 0, not {after!r}")
        self._playback_failures.extend([(how, after)] * n)
        self._changed()

    @property
    def failing_playbacks(self) -> int:
        """Playbacks still to fail from :meth:`fail_next_playbacks`."""
        return len(self._playback_failures)

    def _playback_behaviour(self) -> Behaviour:
        """The behaviour of a playback arriving now: a copy of
        :attr:`behaviour`, or the next scripted failure."""
        behaviour = copy(self.behaviour)
        if self._playback_failures:
            how, after = self._playback_failures.pop(0)
            behaviour.playback_status = 200
            behaviour.playback_hang = False
            behaviour.stall_after = after if how == "stall" else None
            behaviour.eof_after = after if how == "eof" else None
            behaviour.reset_after = after if how == "reset" else None
        return behaviour

    # --- sessions ------------------------------------------------------------------

    @property
    def advertised_base(self) -> str:
        """``http://<advertise_host>:<advertise_port>``."""
        return f"http://{self.advertise_host}:{self.advertise_port}"

    def generator(self) -> TSGenerator:
        """A new playback's stream: :attr:`bitrate`, :attr:`gop`, :attr:`codec`."""
        return TSGenerator(
            self.bitrate, codec=self.codec, gop=self.gop, random_access_indicator=self.random_access_indicator
        )

    @property
    def hls_bitrate(self) -> int:
        """bit/s of HLS segments: :attr:`bitrate`, or 4 Mbit/s when flat out."""
        return self.bitrate if self.bitrate is not None else FLAT_OUT_NOMINAL_BITRATE

    def session_urls(self, session: SimSession) -> dict:
        """The getstream (or manifest.m3u8) ``response`` object, with advertised URLs."""
        base = f"{self.advertised_base}/ace"
        tail = f"{session.infohash}/{session.token}"
        playback = f"{base}/m/{tail}.m3u8" if session.hls else f"{base}/r/{tail}"
        return {
            "playback_url": playback,
            "stat_url": f"{base}/stat/{tail}",
            "command_url": f"{base}/cmd/{tail}",
            "infohash": session.infohash,
            "playback_session_id": session.playback_session_id,
            "is_live": 1,
            "is_encrypted": 0,
            "client_session_id": -1,
        }

    def session_stat(self, session: SimSession) -> dict:
        """The stat ``response`` object; speeds in KB/s as the engine reports them."""
        if self.bitrate is not None:
            speed_down = round(self.bitrate / 8 / 1024)
        else:
            elapsed = max(self.reactor.seconds() - session.created_at, 1e-3)
            speed_down = round(session.bytes_sent / elapsed / 1024)
        return {
            "status": "prebuf" if session.prebuffering else "dl",
            "peers": 4,
            "speed_down": speed_down,
            "speed_up": speed_down // 8,
            "downloaded": session.bytes_sent,
            "uploaded": session.bytes_sent // 8,
            "total_progress": 0,
            "is_live": 1,
            "infohash": session.infohash,
            "playback_session_id": session.playback_session_id,
            "client_session_id": -1,
        }

    @staticmethod
    def _infohash(selector: str, value: str) -> str:
        if selector == "infohash":
            return value.lower()
        key = value.lower() if selector in ("content_id", "id") else value
        return hashlib.sha1(key.encode("utf-8")).hexdigest()

    def _open_session(self, selector: str, value: str, params: Dict[str, str], *, hls: bool = False) -> SimSession:
        if selector == "id":
            selector = "content_id"
        infohash = self._infohash(selector, value)
        session = SimSession(
            playback_session_id=secrets.token_hex(20),
            selector=selector,
            content_key=value,
            infohash=infohash,
            token=secrets.token_hex(16),
            pid=params.get("pid"),
            params=dict(params),
            created_at=self.reactor.seconds(),
            hls=hls,
        )
        self.sessions[session.playback_session_id] = session
        self._by_token[session.token] = session
        if hls and infohash not in self.hls_streams:
            self.hls_streams[infohash] = HlsStream(
                infohash,
                bitrate=self.hls_bitrate,
                segment_duration=self.hls_segment_duration,
                window=self.hls_window,
                started_at=self.reactor.seconds(),
            )
        self._changed()
        return session

    def _hls_sessions(self, infohash: str) -> List[SimSession]:
        """Active HLS sessions of a content."""
        return [s for s in self.sessions.values() if s.hls and not s.stopped and s.infohash == infohash]

    def _reuse_hls_session(self, selector: str, value: str, pid: Optional[str]) -> Optional[SimSession]:
        """The newest active HLS session of this content and pid (direct manifest mode)."""
        infohash = self._infohash(selector, value)
        for session in reversed(self._hls_sessions(infohash)):
            if session.pid == pid:
                return session
        return None

    def _session_for(self, infohash: str, token: str) -> Optional[SimSession]:
        session = self._by_token.get(token)
        if session is None or session.infohash != infohash.lower():
            return None
        return session

    def _stop_session(self, session: SimSession) -> None:
        """What the real engine does on stop: forget the session and close
        its playback connections."""
        session.stopped = True
        for stream in session.open_playbacks:
            stream.stop()
        if session.hls and not self._hls_sessions(session.infohash):
            hls = self.hls_streams.pop(session.infohash, None)
            if hls is not None:
                hls.discard()
        self._changed()


# --- command line -------------------------------------------------------------------

_BITRATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*(?:bit/s|bps|b)?\s*$")
_UNITS = {"": 1, "k": 1_000, "m": 1_000_000, "g": 1_000_000_000}


def parse_bitrate(text: str) -> int:
    """``"4M"`` → 4_000_000, ``"500k"`` → 500_000, ``"8000000"`` → 8_000_000."""
    match = _BITRATE.match(text)
    if not match:
        raise ValueError(f"not a bitrate: {text!r} (try 4M, 500k or 8000000)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _arguments(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m acexy_tw.sim.engine",
        description="A simulated AceStream engine serving a valid MPEG-TS test stream.",
    )
    parser.add_argument("--port", type=int, default=6878)
    parser.add_argument("--interface", default="127.0.0.1")
    rate = parser.add_mutually_exclusive_group()
    rate.add_argument("--bitrate", type=parse_bitrate, default=4_000_000, help="e.g. 4M, 500k, 8000000")
    rate.add_argument("--flat-out", action="store_true", help="send as fast as the client reads")
    parser.add_argument("--advertise-host", default="127.0.0.1", help="host in the URLs handed out")
    parser.add_argument("--advertise-port", type=int, default=6878, help="port in the URLs handed out")
    parser.add_argument("--prebuffer", type=float, default=0.0, help="seconds before playback headers")
    parser.add_argument("--hls-segment", type=float, default=2.0, help="seconds per HLS segment")
    parser.add_argument(
        "--gop", type=float, default=DEFAULT_GOP, help="seconds from one keyframe to the next (0: every frame)"
    )
    parser.add_argument("--codec", choices=CODECS, default="mpeg2", help="the video codec of playbacks")
    parser.add_argument(
        "--no-random-access-indicator",
        dest="random_access_indicator",
        action="store_false",
        help="do not flag keyframes in the TS adaptation field (as some muxers do not)",
    )
    parser.add_argument(
        "--hls-direct", action="store_true", help="serve /ace/manifest.m3u8 without format=json as a playlist"
    )
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run a simulated engine until interrupted."""
    args = _arguments(argv)

    def start(reactor: Any) -> Any:
        engine = SimEngine(
            reactor,
            bitrate=None if args.flat_out else args.bitrate,
            advertise_host=args.advertise_host,
            advertise_port=args.advertise_port,
            behaviour=Behaviour(playback_delay=args.prebuffer),
            hls_segment_duration=args.hls_segment,
            hls_direct=args.hls_direct,
            gop=args.gop or None,
            codec=args.codec,
            random_access_indicator=args.random_access_indicator,
        )
        engine.listen(args.port, args.interface)
        rate = "flat out" if args.flat_out else f"{args.bitrate} bit/s"
        print(
            f"simulated AceStream engine on {engine.url} ({rate}), "
            f"advertising {args.advertise_host}:{args.advertise_port}",
            flush=True,
        )
        return engine.close

    run(start)


if __name__ == "__main__":
    main()
