"""
Loopback harness: the real AcexyService on 127.0.0.1:0 in front of a real
SimEngine, and players that signal what they received (tests wait for events
with a timeout; nothing sleeps).

Use from a trial ``TestCase`` (real reactor)::

    async def test_x(self):
        engine = sim_engine(self)
        proxy = await start_proxy(self, engine, linger="0")
        player = await Player.open(self, proxy.url("/ace/getstream?id=" + CID))
        await within(player.when_received(188 * 100))
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, ResponseDone
from twisted.web.http import PotentialDataLoss
from treq.client import HTTPClient

from acexy_tw.config import load_config
from acexy_tw.build import make_pool
from acexy_tw.service import AcexyService, make_service
from acexy_tw.sim.engine import SimEngine
from acexy_tw.sim.orchestrator import SimOrchestrator

reactor: Any = _reactor

CID = "0123456789abcdef0123456789abcdef01234567"
TIMEOUT = float(os.environ.get("ACEXY_TEST_TIMEOUT", "15"))


def cid(n: int) -> str:
    """A distinct 40-hex content id per ``n``."""
    return f"{n:040x}"


def within(d: Deferred, seconds: float = TIMEOUT) -> Deferred:
    """Every wait in a test is bounded: a hang fails that test, not the run."""
    return d.addTimeout(seconds, reactor)


def sim_engine(test: Any, **kwargs: Any) -> SimEngine:
    """A listening SimEngine, shut down at test end."""
    engine = SimEngine(reactor, **kwargs)
    engine.listen(0, "127.0.0.1")
    test.addCleanup(lambda: within(engine.shutdown()))
    return engine


class RunningProxy:
    def __init__(self, service: AcexyService, port: int) -> None:
        self.service = service
        self.port = port
        self.registry = service.registry

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stream_url(self, content_id: str = CID, extra: str = "") -> str:
        return self.url(f"/ace/getstream?id={content_id}{extra}")


async def start_proxy(test: Any, engine: SimEngine, **settings: str) -> RunningProxy:
    """
    The real service, configured as a user would (option names as on the
    command line, underscores for dashes), stopped at test end.
    """
    options = {
        "listen": "tcp:0:interface=127.0.0.1",
        "engine-host": "127.0.0.1",
        "engine-port": str(engine.port),
    }
    options.update({k.replace("_", "-"): v for k, v in settings.items()})
    config = load_config({}, options)
    service = make_service(config, reactor)
    service.startService()
    test.addCleanup(lambda: within(service.stopService()))
    port = await within(service.when_listening())
    # ready as a user sees it: every engine probed once (its probe connection
    # is then open, so the tests' socket counts start from a settled baseline)
    await wait_until(lambda: all(e.state != "unknown" for e in service.proxy.engines.engines), "the first engine probes")
    await within(engine.when(lambda e: e.connections == 0))  # the probe's connection closes after its answer
    return RunningProxy(service, port.getHost().port)


def sim_orchestrator(test: Any, *, api_key: str, **kwargs: Any) -> SimOrchestrator:
    """A listening SimOrchestrator, shut down (engines too) at test end."""
    orch = SimOrchestrator(reactor, api_key=api_key, **kwargs)
    orch.listen(0, "127.0.0.1")
    test.addCleanup(lambda: within(orch.shutdown()))
    return orch


async def orchestrated_proxy(test: Any, orch: SimOrchestrator, **settings: str) -> tuple[RunningProxy, SimEngine]:
    """The proxy placing through ``orch`` with its key, a fallback engine
    beside it; returns once the first status poll has been answered."""
    fallback = sim_engine(test, bitrate=2_000_000)
    settings.setdefault("health_interval", "30s")
    proxy = await start_proxy(test, fallback, orch_url=orch.url, orch_apikey=orch.api_key, **settings)
    await wait_until(lambda: proxy.service.monitor.reachable is not None, "the first status poll")
    return proxy, fallback


class Player(Protocol):
    """A reading player: collects the body, lets tests wait for byte counts and the end."""

    def __init__(self, limit: Optional[int] = None) -> None:
        self.received = bytearray()
        self.limit = limit
        self.ended: Deferred[None] = Deferred()  # fires with None; see end_reason
        self.end_reason: Optional[Failure] = None
        self._waiters: list[tuple[int, Deferred]] = []
        self.response: Any = None

    @classmethod
    def open(cls, test: Any, url: str, *, limit: Optional[int] = None) -> "Deferred[Player]":
        """GET ``url``; fires once the headers arrived (check ``.code``)."""
        return Deferred.fromCoroutine(cls._open(test, url, limit=limit))

    @classmethod
    async def _open(cls, test: Any, url: str, *, limit: Optional[int] = None) -> "Player":
        client = http_client(test)
        response = await within(client.get(url, unbuffered=True))
        player = cls(limit)
        player.response = response
        response.deliverBody(player)
        test.addCleanup(player.hang_up)
        return player

    @property
    def code(self) -> int:
        return self.response.code

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        for entry in list(self._waiters):
            n, d = entry
            if len(self.received) >= n:
                self._waiters.remove(entry)
                d.callback(bytes(self.received))
        if self.limit is not None and len(self.received) >= self.limit:
            self.hang_up()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        for n, d in self._waiters:
            d.errback(AssertionError(f"stream ended after {len(self.received)} bytes, waiting for {n}"))
        self._waiters = []
        self.end_reason = reason
        if not self.ended.called:
            self.ended.callback(None)  # (callback(a Failure) would turn into an errback)

    @property
    def clean_end(self) -> bool:
        return self.end_reason is not None and self.end_reason.check(ResponseDone, PotentialDataLoss) is not None

    def when_received(self, n: int) -> Deferred:
        if len(self.received) >= n:
            return succeed(bytes(self.received))
        d: Deferred = Deferred()
        self._waiters.append((n, d))
        return within(d)

    def when_ended(self) -> Deferred:
        """Fires (with None) when the response ended; a fresh Deferred per call."""
        if self.ended.called:
            return succeed(None)
        d: Deferred = Deferred()
        self.ended.addCallback(lambda r: (d.callback(None), r)[1])
        return within(d)

    def hang_up(self) -> Deferred:
        if self.transport is not None and not self.ended.called:
            self.transport.stopProducing()
        return self.when_ended()


class RawClient(Protocol):
    """A raw TCP client whose end tests wait for: ``closed`` fires when the
    connection is gone; :meth:`hang_up` aborts it (test cleanup)."""

    def __init__(self) -> None:
        self.closed: Deferred[None] = Deferred()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.closed.called:
            self.closed.callback(None)

    def when_closed(self, seconds: float = TIMEOUT) -> Deferred:
        """Fires when the proxy closed us; a fresh Deferred per call."""
        if self.closed.called:
            return succeed(None)
        d: Deferred = Deferred()
        self.closed.addCallback(lambda r: (d.callback(None), r)[1])
        return within(d, seconds)

    def hang_up(self) -> Deferred:
        if not self.closed.called:
            self.transport.abortConnection()
        return self.when_closed()


class StalledPlayer(RawClient):
    """A player that sends its request and then never reads (its buffers fill)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    @classmethod
    def open(cls, test: Any, port: int, path: str) -> "Deferred[StalledPlayer]":
        return Deferred.fromCoroutine(cls._open(test, port, path))

    @classmethod
    async def _open(cls, test: Any, port: int, path: str) -> "StalledPlayer":
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        player = await within(connectProtocol(endpoint, cls(path)))
        test.addCleanup(player.hang_up)
        return player

    def connectionMade(self) -> None:
        self.transport.write(f"GET {self.path} HTTP/1.1\r\nHost: proxy\r\n\r\n".encode())
        self.transport.pauseProducing()  # stop reading: kernel buffers fill end to end

    def start_reading(self) -> None:
        """Read again (a paused reader cannot even notice that it was cut)."""
        self.transport.resumeProducing()


def http_client(test: Any) -> HTTPClient:
    """A treq client on its own pool, closed at test end."""
    pool = make_pool(reactor)
    pool.persistent = False
    test.addCleanup(pool.closeCachedConnections)
    return HTTPClient(Agent(reactor, pool=pool))


async def get_json(test: Any, url: str) -> tuple[int, Any]:
    import json

    client = http_client(test)
    response = await within(client.get(url))
    body = await within(response.content())
    try:
        return response.code, json.loads(body)
    except ValueError:
        return response.code, body.decode("utf-8", "replace")


async def get_text(test: Any, url: str) -> tuple[int, str]:
    client = http_client(test)
    response = await within(client.get(url))
    body = await within(response.content())
    return response.code, body.decode("utf-8", "replace")


def wait_until(
    predicate: Callable[[], bool], what: str = "condition", *, seconds: float = TIMEOUT, interval: float = 0.01
) -> Deferred:
    """Poll a proxy-side condition (bounded); for engine-side ones use ``engine.when``."""
    from twisted.internet.task import LoopingCall

    d: Deferred = Deferred()

    def check() -> None:
        if predicate():
            loop.stop()

    loop = LoopingCall(check)
    loop.clock = reactor
    done = loop.start(interval, now=True)
    done.addCallback(lambda _: d.callback(None) if not d.called else None)

    def cancel_on_timeout(f: Failure) -> Failure:
        if loop.running:
            loop.stop()
        f.value.args = (f"timed out waiting for {what}",)
        return f

    return within(d, seconds).addErrback(cancel_on_timeout)


async def read_engine_directly(test: Any, engine: SimEngine, content_id: str) -> bytes:
    """
    Start a session on the simulator without the proxy and read its playback
    to the end (use with ``eof_after``): what the engine sends, for comparing.
    """
    from urllib.parse import urlsplit

    code, doc = await get_json(test, f"{engine.url}/ace/getstream?format=json&id={content_id}")
    if code != 200 or not isinstance(doc, dict) or doc.get("error"):
        raise AssertionError(f"direct getstream failed: {code} {doc!r}")
    path = urlsplit(doc["response"]["playback_url"]).path
    reader = await Player.open(test, engine.url + path)
    await reader.when_ended()
    return bytes(reader.received)



class TSPlayer(Player):
    """
    A :class:`Player` that classifies the MPEG-TS it receives, packet by
    packet, and remembers when each byte arrived: counts of null and real
    (non-null) packets, the offset of the first real packet, the arrival
    times of the chunks that carried null packets, and whether every packet
    started with the sync byte. Tests wait on any predicate over it with
    :meth:`when`.

    (Real streams carry null packets too — the simulator pads to its
    bitrate — so "real" means "not a null packet", and a keepalive run is
    told from content by where it sits, not by its bytes.)
    """

    def __init__(self, limit: Optional[int] = None) -> None:
        super().__init__(limit)
        #: (end offset, reactor time) of every chunk received
        self.arrivals: list[tuple[int, float]] = []
        #: arrival time of every chunk that carried at least one null packet
        self.null_arrivals: list[float] = []
        self.null_packets = 0
        self.real_packets = 0
        #: packets that did not start with the sync byte 0x47
        self.bad_packets = 0
        #: byte offset of the first non-null packet, once there is one
        self.first_real_offset: Optional[int] = None
        self._scanned = 0
        self._conditions: list[tuple[Callable[["TSPlayer"], bool], str, Deferred]] = []

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        now = reactor.seconds()
        self.arrivals.append((len(self.received), now))
        self._classify(now)
        for entry in list(self._conditions):
            predicate, _, d = entry
            if entry in self._conditions and predicate(self):
                self._conditions.remove(entry)
                d.callback(self)

    def _classify(self, now: float) -> None:
        buf = self.received
        saw_null = False
        i = self._scanned
        end = len(buf) - (PACKET - 1)
        while i < end:
            if buf[i] != 0x47:
                self.bad_packets += 1
            elif (buf[i + 1] & 0x1F) == 0x1F and buf[i + 2] == 0xFF:
                self.null_packets += 1
                saw_null = True
            else:
                self.real_packets += 1
                if self.first_real_offset is None:
                    self.first_real_offset = i
            i += PACKET
        self._scanned = i
        if saw_null:
            self.null_arrivals.append(now)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        conditions, self._conditions = self._conditions, []
        for _, what, d in conditions:
            d.errback(AssertionError(f"stream ended after {len(self.received)} bytes, waiting for {what}"))
        super().connectionLost(reason)

    def when(
        self, predicate: Callable[["TSPlayer"], bool], what: str = "condition", seconds: float = TIMEOUT
    ) -> Deferred:
        """Fires (with the player) once ``predicate(player)`` holds; bounded."""
        from twisted.internet.defer import fail

        if predicate(self):
            return succeed(self)
        if self.ended.called:
            return fail(AssertionError(f"stream already ended after {len(self.received)} bytes, waiting for {what}"))
        d: Deferred = Deferred(lambda d: self._forget(d))
        self._conditions.append((predicate, what, d))
        return within(d, seconds)

    def _forget(self, d: Deferred) -> None:
        self._conditions = [c for c in self._conditions if c[2] is not d]

    def when_real(self, packets: int = 1, seconds: float = TIMEOUT) -> Deferred:
        return self.when(lambda p: p.real_packets >= packets, f"{packets} real TS packets", seconds)

    def arrival_of(self, offset: int) -> float:
        """When the byte at ``offset`` arrived."""
        import bisect

        i = bisect.bisect_right(self.arrivals, offset, key=lambda a: a[0])
        return self.arrivals[i][1]

    def is_null_at(self, offset: int) -> bool:
        buf = self.received
        return (buf[offset + 1] & 0x1F) == 0x1F and buf[offset + 2] == 0xFF

    def last_real_before(self, offset: int) -> Optional[int]:
        """Offset of the last non-null packet before ``offset`` (packet-aligned)."""
        i = offset - PACKET
        while i >= 0:
            if not self.is_null_at(i):
                return i
            i -= PACKET
        return None

    def keepalive_ticks(self, gap: float = 0.05) -> list[float]:
        """Arrival times of keepalive writes while nothing else arrives
        (chunks of null packets closer than ``gap`` seconds count as one)."""
        ticks: list[float] = []
        for t in self.null_arrivals:
            if not ticks or t - ticks[-1] > gap:
                ticks.append(t)
        return ticks

    def aligned(self) -> bool:
        return len(self.received) % PACKET == 0 and self.bad_packets == 0


PACKET = 188


async def ffprobe_capture(test: Any, data: bytes) -> dict:
    """ffprobe's JSON for a capture (cut to whole TS packets); fails the test
    unless ffprobe accepts it. Temp files live outside the checkout."""
    import json
    import shutil
    import tempfile

    from twisted.internet.utils import getProcessOutputAndValue

    ffprobe = shutil.which("ffprobe")
    if ffprobe is None:
        test.skipTest("ffprobe is not installed")
    folder = tempfile.mkdtemp(prefix="acexy-capture-")  # (trial's mktemp litters the cwd under pytest)
    test.addCleanup(shutil.rmtree, folder, True)
    path = os.path.join(folder, "capture.ts")
    with open(path, "wb") as f:
        f.write(data[: len(data) // 188 * 188])
    args = ["-v", "error", "-show_format", "-show_streams", "-of", "json", path]
    out, err, status = await within(getProcessOutputAndValue(ffprobe, args, env=dict(os.environ)))
    test.assertEqual(status, 0, err)
    return json.loads(out)
