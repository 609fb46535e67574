"""
In-memory fakes for deterministic streaming tests (no sockets, no reactor).

- :class:`ScriptedEngine` stands in for an EngineClient: each call returns a
  Deferred the test fires; the playback body's transport is a StringTransport,
  so ``upstream.producerState`` shows whether the proxy paused the engine.
- :func:`connect_client` plays a player: a real HTTPChannel + Klein stack on a
  StringTransport; ``transport.producer.pauseProducing()`` plays a full socket.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.server import Site

from acexy_tw.content import ContentKey
from acexy_tw.engine import EngineAddress, EngineError, PlaybackInfo
from acexy_tw.retry import RetryPolicy
from acexy_tw.streaming.mpegts import PACKET_SIZE
from acexy_tw.streaming.registry import SessionRegistry
from acexy_tw.streaming.waiting import WaitQueue
from acexy_tw.web.app import ProxyApp

CID = "a" * 40
CID2 = "b" * 40


def ts(n: int, fill: int = 0x11) -> bytes:
    """``n`` fake TS packets (sync byte + filler)."""
    return (b"\x47" + bytes([fill]) * (PACKET_SIZE - 1)) * n


class FakeResponse:
    code = 200

    def __init__(self) -> None:
        self.transport = StringTransport()
        self.protocol: Any = None

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    # driving the body
    def data(self, payload: bytes) -> None:
        self.protocol.dataReceived(payload)

    def eof(self) -> None:
        self.protocol.connectionLost(Failure(ResponseDone()))

    def reset(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionResetError("reset by peer")))


class ScriptedEngine:
    """An EngineClient whose answers the test controls."""

    def __init__(self, *, auto: bool = True) -> None:
        self.address = EngineAddress("http", "engine", 6878)
        self.auto = auto
        self.starts: list[tuple[ContentKey, Deferred]] = []
        self.playbacks: list[tuple[PlaybackInfo, Deferred]] = []
        self.responses: list[FakeResponse] = []
        self.stops: list[PlaybackInfo] = []
        self.stop_result: Optional[Deferred] = None  # None: succeed at once

    def start(self, key: ContentKey) -> Deferred:
        n = len(self.starts)
        info = PlaybackInfo(
            playback_url=f"http://engine:6878/ace/r/{key.value}/{n}",
            stat_url=f"http://engine:6878/ace/stat/{key.value}/{n}",
            command_url=f"http://engine:6878/ace/cmd/{key.value}/{n}",
            infohash=key.value,
            playback_session_id=f"{n:040x}",
            is_live=1,
        )
        d: Deferred = Deferred()
        self.starts.append((key, d))
        if self.auto:
            d.callback(info)
        return d

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

    @property
    def response(self) -> FakeResponse:
        return self.responses[-1]


class FixedPlacement:
    """Placement on one engine (as with no orchestrator)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.places: list[tuple[ContentKey, frozenset]] = []

    async def place(self, key: ContentKey, *, avoid: frozenset = frozenset()) -> Any:
        self.places.append((key, avoid))
        return self.engine, await self.engine.start(key)

    def release(self, key: ContentKey) -> None:
        pass


class ScriptedPlacement(FixedPlacement):
    """Placement whose next answers the test scripts: exceptions to raise, in order;
    when the script is empty it places on the engine."""

    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        self.script: list[BaseException] = []
        self.released: list[ContentKey] = []

    async def place(self, key: ContentKey, *, avoid: frozenset = frozenset()) -> Any:
        self.places.append((key, avoid))
        if self.script:
            raise self.script.pop(0)
        return self.engine, await self.engine.start(key)

    def release(self, key: ContentKey) -> None:
        self.released.append(key)


class Proxy:
    """Registry + Klein app + Site on a MemoryReactorClock, with a scripted engine."""

    def __init__(
        self,
        engine: Optional[ScriptedEngine] = None,
        *,
        buffer_size: int = 64 * 1024,
        empty_timeout: float = 60.0,
        linger: float = 5.0,
        stuck_timeout: float = 60.0,
        queue_size: Optional[int] = None,
        wait_mode: str = "hold",
        max_wait: float = 120.0,
        keepalive_interval: float = 1.0,
        failover_attempts: int = 0,
        failover_reset: float = 30.0,
        high_water: int = 0,
    ) -> None:
        self.clock = MemoryReactorClock()
        self.engine = engine or ScriptedEngine()
        self.closed: list[tuple[Any, str]] = []
        self.lost: list[tuple[Any, str]] = []
        self.placement = ScriptedPlacement(self.engine)
        self.waits: Optional[WaitQueue] = None
        if queue_size is not None:
            self.waits = WaitQueue(
                self.clock, size=queue_size, max_wait=max_wait, keepalive_interval=keepalive_interval, mode=wait_mode
            )
        self.registry = SessionRegistry(
            self.placement,
            self.clock,
            empty_timeout=empty_timeout,
            linger=linger,
            on_session_closed=self._closed,
            on_engine_lost=lambda s, r: self.lost.append((s, r)),
            waits=self.waits,
            failover=RetryPolicy(failover_attempts, initial=1.0, factor=2.0, cap=30.0, jitter=lambda: 0),
            failover_reset=failover_reset,
        )
        if self.waits is not None:
            self.waits.prewarm = self.registry.prewarm
        self.app = ProxyApp(
            self.registry, self.clock, buffer_size=buffer_size, stuck_timeout=stuck_timeout, high_water=high_water
        )
        self.site = Site(self.app.resource(), reactor=self.clock)

    def _closed(self, session: Any, reason: str) -> None:
        self.closed.append((session, reason))
        if self.waits is not None and session.streaming_since is not None:
            self.waits.kick()  # as the service does: only a session that held an engine frees a slot

    def connect(self, path: bytes = b"/ace/getstream?id=" + CID.encode(), method: bytes = b"GET") -> "Client":
        return Client(self.site, path, method)


class Client:
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


def engine_error(message: str = "boom") -> EngineError:
    return EngineError(message)


def our_delayed_calls(clock: MemoryReactorClock) -> list:
    """Pending timers, less the HTTP channels' own idle timeouts (not ours to cancel)."""
    return [c for c in clock.getDelayedCalls() if "TimeoutMixin" not in repr(c)]
