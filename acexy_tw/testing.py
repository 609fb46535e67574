"""
Test doubles for the proxy's unit tests (in the spirit of txacme's
``testing.py``): no sockets, no real reactor, every answer scripted.

- :class:`ScriptedEngine` stands in for an :class:`~acexy_tw.engine.EngineClient`:
  getstream answers at once (or when the test says), raises the errors in
  :attr:`~ScriptedEngine.script` first, in order; the playback body's transport
  is a ``StringTransport``, so ``response.transport.producerState`` shows
  whether the proxy paused the engine.
- :class:`ScriptedOrchestrator` stands in for an
  :class:`~acexy_tw.orchestrator.client.OrchestratorClient`: a list of
  engines, provision answers, a status snapshot (:func:`orchestrator_status`
  builds one), recorded events.
- :class:`ScriptedResource` records every HTTP request and answers through a
  handler: behind ``treq.testing.StubTreq`` it scripts the engine's or the
  orchestrator's HTTP side for the clients' own tests.
- :class:`InMemoryProxy` is the production wiring — :func:`acexy_tw.build.build`
  — on a ``MemoryReactorClock`` with a scripted engine (and optionally a
  scripted orchestrator): a unit test exercises exactly what ships.
  :meth:`InMemoryProxy.connect` plays a player: a real ``HTTPChannel`` + Klein
  stack on a ``StringTransport``; ``client.pause()`` plays a full socket.

Every unit test that needs one of these doubles takes it from here; none
keeps a copy of its own.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional, Union

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Site

from acexy_tw.config import load_config
from acexy_tw.content import ContentKey
from acexy_tw.engine import EngineAddress, EngineError, NoEngine, PlaybackInfo
from acexy_tw.orchestrator.client import (
    BlockedDetails,
    OrchestratedEngine,
    OrchestratorStatus,
    OrchestratorUnavailable,
    Provisioned,
    ProvisionTimeout,
)
from acexy_tw.placement import MESSAGES
from acexy_tw.streaming.mpegts import NULL_PACKET, PACKET_SIZE

__all__ = [
    "CID",
    "CID2",
    "Client",
    "FakeResponse",
    "InMemoryProxy",
    "ScriptedEngine",
    "ScriptedOrchestrator",
    "ScriptedResource",
    "answer",
    "breaker",
    "info_for",
    "key",
    "only_nulls",
    "orchestrator_status",
    "our_delayed_calls",
    "ts",
    "vpn_down",
]

CID = "a" * 40
CID2 = "b" * 40


def ts(n: int, fill: int = 0x11) -> bytes:
    """``n`` fake TS packets (sync byte + filler)."""
    return (b"\x47" + bytes([fill]) * (PACKET_SIZE - 1)) * n


def only_nulls(data: bytes) -> bool:
    """``data`` is whole null packets only (keepalive)."""
    return len(data) % PACKET_SIZE == 0 and all(
        data[i : i + PACKET_SIZE] == NULL_PACKET for i in range(0, len(data), PACKET_SIZE)
    )


def key(cid: str = CID) -> ContentKey:
    """The key a player's ``?id=<cid>`` asks for."""
    return ContentKey("content_id", cid)


def vpn_down() -> NoEngine:
    """Placement's wait-class refusal while the orchestrator's VPN is down."""
    return NoEngine(MESSAGES["vpn_disconnected"], code="vpn_disconnected", retry_after=60)


def breaker(eta: int = 30) -> NoEngine:
    """Placement's wait-class refusal while the orchestrator's circuit breaker is open."""
    return NoEngine(MESSAGES["circuit_breaker"], code="circuit_breaker", retry_after=eta)


def info_for(key: ContentKey, n: int, host: str = "engine:6878") -> PlaybackInfo:
    """What a :class:`ScriptedEngine` at ``host`` answers to its ``n``-th getstream (0-based)."""
    return PlaybackInfo(
        playback_url=f"http://{host}/ace/r/{key.value}/{n}",
        stat_url=f"http://{host}/ace/stat/{key.value}/{n}",
        command_url=f"http://{host}/ace/cmd/{key.value}/{n}",
        infohash=key.value,
        playback_session_id=f"{n:040x}",
        is_live=1,
    )


# -- the engine ------------------------------------------------------------------------


class FakeResponse:
    """A playback (or HLS segment) response whose body the test drives."""

    code = 200

    def __init__(self) -> None:
        self.headers = Headers({b"content-type": [b"video/MP2T"]})
        self.transport = StringTransport()
        self.protocol: Any = None

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def data(self, payload: bytes) -> None:
        self.protocol.dataReceived(payload)

    def eof(self) -> None:
        self.protocol.connectionLost(Failure(ResponseDone()))

    def reset(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionResetError("reset by peer")))


class ScriptedEngine:
    """An EngineClient whose answers the test controls."""

    def __init__(
        self,
        *,
        auto: bool = True,
        host: str = "engine",
        port: int = 6878,
        container_id: Optional[str] = None,
        ready: bool = True,
    ) -> None:
        self.address = EngineAddress("http", host, port)
        self.container_id = container_id
        self.auto = auto
        #: errors getstream raises first, in order (a refusal, a wait-class NoEngine ...)
        self.script: list[BaseException] = []
        #: every getstream asked, scripted failures included
        self.attempts: list[ContentKey] = []
        #: getstreams that got past the script: (key, Deferred the test may fire)
        self.starts: list[tuple[ContentKey, Deferred]] = []
        self.playbacks: list[tuple[PlaybackInfo, Deferred]] = []
        self.responses: list[FakeResponse] = []
        self.stops: list[PlaybackInfo] = []
        self.stop_result: Optional[Deferred] = None  # None: succeed at once
        #: get_version answers (False: refused)
        self.ready = ready
        self.versions = 0
        #: stat requests asked: (info, Deferred); answered at once with ``stat_answer``
        #: unless it is None (then the test fires the Deferred, or it hangs)
        self.stats: list[tuple[PlaybackInfo, Deferred]] = []
        self.stat_answer: Optional[dict] = {
            "response": {"status": "dl", "peers": 4, "speed_down": 257, "speed_up": 29, "downloaded": 3276800, "uploaded": 491520},
            "error": None,
        }
        #: if set, stat fails with it
        self.stat_error: Optional[BaseException] = None

    def start(self, key: ContentKey) -> Deferred:
        self.attempts.append(key)
        if self.script:
            return fail(self.script.pop(0))
        d: Deferred = Deferred()
        n = len(self.starts)
        self.starts.append((key, d))
        if self.auto:
            d.callback(self.info(n))
        return d

    def info(self, n: int = -1) -> PlaybackInfo:
        """What this engine answers (or answered) to start number ``n``."""
        if n < 0:
            n += len(self.starts)
        return info_for(self.starts[n][0], n, f"{self.address.host}:{self.address.port}")

    def accept(self, index: int = -1) -> FakeResponse:
        """(``auto=False``) accept start number ``index`` and answer its playback."""
        self.starts[index][1].callback(self.info(index))
        return self.answer_playback()

    def start_hls(self, key: ContentKey) -> Deferred:
        return self.start(key)

    def open_playback(self, info: PlaybackInfo) -> Deferred:
        d: Deferred = Deferred()
        self.playbacks.append((info, d))
        if self.auto:
            self.answer_playback()
        return d

    def answer_playback(self, index: int = -1) -> FakeResponse:
        response = FakeResponse()
        self.responses.append(response)
        self.playbacks[index][1].callback(response)
        return response

    def fail_start(self, error: Exception, index: int = -1) -> None:
        self.starts[index][1].errback(error)

    def stop(self, info: PlaybackInfo) -> Deferred:
        self.stops.append(info)
        if self.stop_result is not None:
            return self.stop_result
        return succeed(None)

    def stat(self, info: PlaybackInfo) -> Deferred:
        d: Deferred = Deferred()
        self.stats.append((info, d))
        if self.stat_error is not None:
            d.errback(self.stat_error)
        elif self.stat_answer is not None:
            d.callback(self.stat_answer)
        return d

    def version(self, timeout: Optional[float] = None) -> Deferred:
        self.versions += 1
        return succeed({}) if self.ready else fail(EngineError("refused"))

    @property
    def response(self) -> FakeResponse:
        return self.responses[-1]


# -- the orchestrator ------------------------------------------------------------------


def orchestrator_status(
    can_provision: bool = True,
    code: Optional[str] = None,
    eta: Optional[int] = None,
    vpn_down: bool = False,
    max_replicas: Optional[int] = 20,
    status: Optional[str] = None,
) -> OrchestratorStatus:
    """A status snapshot: healthy, one engine with room, unless told otherwise
    (``code``: provisioning blocked with that code and ETA; ``status``: the
    overall status, else healthy or, when it cannot provision, degraded)."""
    blocked = BlockedDetails(code, "blocked", eta, False, True) if code else None
    return OrchestratorStatus(
        status=status or ("healthy" if can_provision else "degraded"),
        engines_total=1,
        engines_running=1,
        engines_healthy=1,
        streams_active=0,
        capacity_total=1,
        capacity_used=0,
        capacity_available=1,
        max_replicas=max_replicas,
        vpn_enabled=True,
        vpn_connected=not vpn_down,
        vpn_health=None,
        can_provision=can_provision,
        breaker_state="closed",
        blocked_reason=code,
        blocked=blocked,
        timestamp=None,
    )


class ScriptedOrchestrator:
    """An OrchestratorClient stand-in: engines listed, provisions answered as
    scripted (exceptions or ``"ok"``), the status snapshot the test sets, and
    events recorded (failing with the errors in :attr:`event_failures` first)."""

    base_url = "http://orchestrator:8000"

    def __init__(self, clock: Any, *, snapshot: Any = None) -> None:
        self.clock = clock
        self.snapshot = snapshot
        self.engine_list: list[OrchestratedEngine] = []
        self.unreachable = False
        self.provision_answers: list[Any] = []  # exceptions or "ok"; default ok
        self.provision_calls: list[float] = []
        self.engines_calls = 0
        self.status_calls = 0
        self.next_port = 20000
        self.started: list[dict] = []
        self.ended: list[tuple[str, str, str]] = []
        self.event_failures: list[Exception] = []  # consumed one per event

    def add(self, n: int, streams: int = 0, healthy: bool = True) -> OrchestratedEngine:
        e = OrchestratedEngine(
            container_id=f"{n:064x}",
            container_name=f"acestream-{n}",
            host="10.9.0.1",
            port=19000 + n,
            streams=tuple(f"s{n}-{i}" for i in range(streams)),
            health_status="healthy" if healthy else "unhealthy",
        )
        self.engine_list.append(e)
        return e

    def status(self) -> Deferred:
        self.status_calls += 1
        if self.unreachable or self.snapshot is None:
            return fail(OrchestratorUnavailable("refused"))
        return succeed(self.snapshot)

    def engines(self) -> Deferred:
        self.engines_calls += 1
        if self.unreachable:
            return fail(OrchestratorUnavailable("refused"))
        return succeed(list(self.engine_list))

    def provision(self) -> Deferred:
        self.provision_calls.append(self.clock.seconds())
        answer = self.provision_answers.pop(0) if self.provision_answers else "ok"
        n = 100 + len(self.provision_calls)
        e = OrchestratedEngine(
            container_id=f"{n:064x}", container_name=f"acestream-{n}", host="10.9.0.2", port=self.next_port + n
        )
        if isinstance(answer, ProvisionTimeout):
            self.engine_list.append(e)  # it did start a container before timing out
            return fail(answer)
        if isinstance(answer, Exception):
            return fail(answer)
        self.engine_list.append(e)
        return succeed(Provisioned(e.container_id, e.container_name, e.port, e.port))

    def _event(self) -> Deferred:
        if self.event_failures:
            return fail(self.event_failures.pop(0))
        return succeed(None)

    def stream_started(self, event: dict) -> Deferred:
        self.started.append(event)
        return self._event()

    def stream_ended(self, container_id: str, stream_id: str, reason: str) -> Deferred:
        self.ended.append((container_id, stream_id, reason))
        return self._event()


# -- HTTP-level scripting (behind treq.testing.StubTreq) ----------------------------------


class ScriptedResource(Resource):
    """Every request goes to ``handler(request) -> bytes | NOT_DONE_YET`` and is recorded."""

    isLeaf = True

    def __init__(self, handler: Callable[[Any], Any]) -> None:
        super().__init__()
        self.handler = handler
        self.seen: list[dict] = []

    def render(self, request: Any) -> Any:
        body = request.content.read() if request.content is not None else b""
        self.seen.append(
            {
                "method": request.method.decode(),
                "path": request.path.decode(),
                "args": {k.decode(): [x.decode() for x in v] for k, v in request.args.items()},
                "auth": request.requestHeaders.getRawHeaders(b"authorization"),
                "content_type": request.requestHeaders.getRawHeaders(b"content-type"),
                "body": body,
            }
        )
        return self.handler(request)


def answer(code: int, doc: Any = None, raw: Optional[bytes] = None) -> Callable[[Any], bytes]:
    """A handler answering ``code`` with ``doc`` as JSON (or ``raw`` bytes)."""

    def handler(request: Any) -> bytes:
        request.setResponseCode(code)
        if raw is not None:
            return raw
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(doc).encode()

    return handler


# -- the whole proxy, in memory -----------------------------------------------------------

_HEALTHY = object()  # InMemoryProxy's default snapshot: orchestrator_status()


class InMemoryProxy:
    """
    :func:`acexy_tw.build.build` on a ``MemoryReactorClock``: the production
    wiring with a :class:`ScriptedEngine` as every engine and, with
    ``orchestrator=True``, a :class:`ScriptedOrchestrator` on the proxy's
    clock whose status is ``snapshot`` (healthy by default; a test may pass
    its own ScriptedOrchestrator instead), as :attr:`orchestrator`.

    - ``engine``: the configured engine (``ACEXY_HOST``), :attr:`engine`.
    - The engines ``pool="a:1,b:2"`` (ACEXY_ENGINES) names, and those the
      orchestrator lists, are ScriptedEngines too, made on
      first use, in :attr:`engines` by ``(host, port)``; :attr:`pool` is the
      proxy's EnginePool (not started: a test probes with ``pool.probe()``).
      :meth:`engine_of` gives the one behind a listed engine; ``engine_options`` are passed to
      each orchestrated one (``{"ready": False}``: new engines do not answer get_version yet).
    - Settings are given as on the command line (``linger="5s"``) or as
      numbers of seconds/bytes. Unlike a user's defaults, failover is off
      (``failover_attempts=0``) and players' buffers are 64 KiB unless a test
      asks; retry delays have no jitter (the clock is the test's).

    Nothing is wired here: the parts are :func:`~acexy_tw.build.build`'s, the
    attributes below only name them. The health monitor is not started (the
    service would start it): a test polls with ``monitor.startService()``.
    """

    def __init__(
        self,
        engine: Optional[ScriptedEngine] = None,
        *,
        orchestrator: Union[bool, ScriptedOrchestrator, None] = None,
        snapshot: Any = _HEALTHY,
        engines: Optional[dict[tuple[str, int], ScriptedEngine]] = None,
        engine_options: Optional[dict[str, Any]] = None,
        pool: Optional[str] = None,
        **settings: Any,
    ) -> None:
        self.clock = MemoryReactorClock()
        self.engine = engine or ScriptedEngine()
        self.engines = engines if engines is not None else {}
        self._engine_options = dict(engine_options or {})
        if orchestrator is True:
            orchestrator = ScriptedOrchestrator(
                self.clock, snapshot=orchestrator_status() if snapshot is _HEALTHY else snapshot
            )
        elif orchestrator is False:
            orchestrator = None
        self.orchestrator: Optional[ScriptedOrchestrator] = orchestrator
        settings.setdefault("failover_attempts", 0)
        settings.setdefault("buffer_size", 64 * 1024)
        options = {"listen": "tcp:0:interface=127.0.0.1"}
        for name, value in settings.items():
            if isinstance(value, bool):
                value = "true" if value else "false"
            elif isinstance(value, (int, float)) and name not in (
                "queue_size", "failover_attempts", "max_streams_per_engine", "buffer_size"
            ):
                value = f"{value}s"
            options[name.replace("_", "-")] = str(value)
        if orchestrator is not None:
            options.setdefault("orch-url", orchestrator.base_url)
        if pool is not None:  # ACEXY_ENGINES ("engines" names the scripted engines here)
            options["engines"] = pool
        self.config = load_config({}, options)
        from acexy_tw import build  # looked up now: a test may wrap build.build

        self.proxy = build.build(
            self.config, self.clock, make_engine=self._engine_for, orchestrator=orchestrator, jitter=lambda: 0.0
        )
        self.registry = self.proxy.registry
        self.placement = self.proxy.placement
        self.waits = self.proxy.registry.waits
        self.pool = self.proxy.engines
        self.monitor = self.proxy.monitor
        self.events = self.proxy.events
        self.hls = self.proxy.hls
        self.metrics = self.proxy.metrics
        self.site = self.proxy.site
        self.web = self.proxy.web

    def _engine_for(self, host: str, port: int, container_id: Optional[str], *, scheme: str = "") -> ScriptedEngine:
        """build's ``make_engine``: the configured engine, or the one at (host, port)."""
        if container_id is None and (host, port) == (self.config.engine_host, self.config.engine_port):
            return self.engine  # the configured engine (ACEXY_HOST)
        engine = self.engines.get((host, port))
        if engine is None:
            options = self._engine_options if container_id is not None else {}
            engine = self.engines[(host, port)] = ScriptedEngine(
                host=host, port=port, container_id=container_id, **options
            )
        return engine

    def engine_of(self, listed: OrchestratedEngine) -> ScriptedEngine:
        """The scripted engine behind an engine the orchestrator lists (made now
        if placement has not asked for it yet, e.g. to script its refusals)."""
        return self._engine_for(listed.host, listed.port, listed.container_id)

    def connect(self, path: bytes = b"/ace/getstream?id=" + CID.encode(), method: bytes = b"GET") -> "Client":
        return Client(self.site, path, method)


class Client:
    """A player on a real HTTPChannel over a StringTransport."""

    def __init__(self, site: Site, path: bytes, method: bytes = b"GET") -> None:
        self.channel = site.buildProtocol(None)
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)
        self.channel.dataReceived(method + b" " + path + b" HTTP/1.1\r\nHost: proxy\r\n\r\n")

    def value(self) -> bytes:
        return self.transport.value()

    def body(self) -> bytes:
        """The de-chunked body written so far."""
        raw = self.value()
        head, _, rest = raw.partition(b"\r\n\r\n")
        if b"transfer-encoding: chunked" not in head.lower():
            return rest
        out = bytearray()
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            out += rest[:size]
            rest = rest[size + 2 :]
        return bytes(out)

    def status(self) -> int:
        return int(self.value().split(b" ", 2)[1])

    def finished_cleanly(self) -> bool:
        return self.value().endswith(b"0\r\n\r\n")

    @property
    def aborted(self) -> bool:
        return bool(self.transport.disconnected)  # StringTransport.abortConnection

    def pause(self) -> None:
        """The player's socket is full."""
        self.transport.producer.pauseProducing()

    def resume(self) -> None:
        self.transport.producer.resumeProducing()

    def disconnect(self) -> None:
        """As a TCP transport does: stop its producer, then tell the protocol."""
        if self.transport.producer is not None:
            self.transport.producer.stopProducing()
        self.channel.connectionLost(Failure(ConnectionError("player went away")))


def our_delayed_calls(clock: MemoryReactorClock) -> list:
    """Pending timers, less the HTTP channels' own idle timeouts (not ours to cancel)."""
    return [c for c in clock.getDelayedCalls() if "TimeoutMixin" not in repr(c)]
