"""
Issue #12, points 3, 4 and 9, over real sockets against the simulated engine:
junk parameters do not multiply engine sessions, ACEXY_MAX_SESSIONS bounds
the engine sessions open at once (TS and HLS together), what a player
smuggles into its query reaches the engine only as the right single
parameters, and an engine's header flood or control characters cost nothing.
"""

from __future__ import annotations

import gc
import json

from treq.client import HTTPClient
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent

from acexy_tw.build import make_pool
from acexy_tw.content import ContentKey
from acexy_tw.engine import EngineAddress, EngineClient, EngineError
from acexy_tw.engine import NoEngine
from acexy_tw.streaming.limits import SessionLimit
from acexy_tw.streaming.mpegts import PACKET_SIZE
from tests.integration.harness import (
    CID,
    Player,
    cid,
    get_json,
    get_text,
    reactor,
    sim_engine,
    start_proxy,
    wait_until,
    within,
)


class SessionLimitUnitTests(SynchronousTestCase):
    def test_open_close_counts_each_holder_once(self) -> None:
        limit, a, b, c = SessionLimit(2), object(), object(), object()
        limit.open(a)
        limit.open(a)  # the same holder again: still one
        limit.open(b)
        with self.assertRaises(NoEngine) as raised:
            limit.open(c)
        self.assertEqual((raised.exception.code, raised.exception.retry_after, raised.exception.http_status), ("max_sessions", 10, 503))
        limit.close(a)
        limit.close(a)  # a double close frees nothing more
        limit.close(c)  # never opened: nothing
        self.assertEqual(len(limit), 1)
        limit.open(c)
        self.assertEqual(limit.describe(), {"open": 2, "max": 2, "refused": 1})

    def test_in_memory_proxy_refuses_a_new_content_and_lets_a_player_join(self) -> None:
        from acexy_tw.testing import InMemoryProxy

        p = InMemoryProxy(max_sessions="1")
        first = p.connect(b"/ace/getstream?id=" + cid(1).encode())
        refused = p.connect(b"/ace/getstream?id=" + cid(2).encode())
        self.assertEqual(refused.status(), 503)
        self.assertIn(b"retry-after: 10", refused.value().lower())
        joined = p.connect(b"/ace/getstream?id=" + cid(1).encode() + b"&junk=1")
        self.assertEqual(len(p.registry), 1)
        self.assertEqual(len(p.registry.get_any().sinks), 2)
        self.assertEqual(len(p.engine.starts), 1)
        for client in (first, joined):
            client.disconnect()


class JunkParameterTests(TestCase):
    async def test_200_players_of_one_id_with_junk_parameters_share_one_engine_session(self) -> None:
        engine = sim_engine(self, bitrate=500_000)
        engine.behaviour.json_delay = 0.2  # many arrive while the first start is pending
        proxy = await start_proxy(self, engine)
        players = await gatherResults(
            [Player.open(self, proxy.stream_url(extra=f"&junk={i}&PID={i}&x{i}=1")) for i in range(200)]
        )
        self.assertEqual({p.code for p in players}, {200})
        await gatherResults([p.when_received(PACKET_SIZE) for p in players])
        self.assertEqual(len(engine.getstream_calls), 1)
        self.assertEqual(engine.open_playbacks, 1)
        self.assertEqual(len(proxy.registry), 1)
        self.assertEqual(len(proxy.registry.get_any().sinks), 200)
        [params] = engine.getstream_calls
        self.assertEqual(sorted(params), ["content_id", "format", "pid"])


class SessionLimitTests(TestCase):
    async def test_third_content_is_refused_and_joining_still_works(self) -> None:
        engine = sim_engine(self, bitrate=500_000)
        proxy = await start_proxy(self, engine, max_sessions="2", linger="0")
        one = await Player.open(self, proxy.stream_url(cid(1)))
        two = await Player.open(self, proxy.stream_url(cid(2)))
        await gatherResults([one.when_received(PACKET_SIZE), two.when_received(PACKET_SIZE)])

        refused = await Player.open(self, proxy.stream_url(cid(3)))
        await refused.when_ended()
        self.assertEqual(refused.code, 503)
        self.assertEqual(refused.response.headers.getRawHeaders(b"retry-after"), [b"10"])
        doc = json.loads(bytes(refused.received))
        self.assertEqual(doc["code"], "max_sessions")
        self.assertEqual(doc["retry_after"], 10)
        self.assertEqual(len(engine.getstream_calls), 2)  # the engine never heard of content 3

        joined = await Player.open(self, proxy.stream_url(cid(1), "&junk=1"))
        self.assertEqual(joined.code, 200)
        await joined.when_received(50 * PACKET_SIZE)
        self.assertEqual(len(engine.getstream_calls), 2)
        self.assertEqual(len(proxy.registry.get_any().sinks), 2)

        # content 2 ends: its slot is free again
        await two.hang_up()
        await wait_until(lambda: len(proxy.registry) == 1, "content 2's session to close")
        three = await Player.open(self, proxy.stream_url(cid(3)))
        self.assertEqual(three.code, 200)
        await three.when_received(PACKET_SIZE)
        self.assertEqual(proxy.registry.limit.describe(), {"open": 2, "max": 2, "refused": 1})

    async def test_hls_sessions_count_towards_the_limit(self) -> None:
        engine = sim_engine(self, bitrate=500_000)
        proxy = await start_proxy(self, engine, max_sessions="2", linger="0")
        code, body = await get_text(self, proxy.url(f"/ace/manifest.m3u8?id={cid(1)}"))
        self.assertEqual(code, 200, body)
        ts = await Player.open(self, proxy.stream_url(cid(2)))
        await ts.when_received(PACKET_SIZE)
        refused = await Player.open(self, proxy.stream_url(cid(3)))
        await refused.when_ended()
        self.assertEqual(refused.code, 503)
        # the HLS session is joined, not opened again
        code, _ = await get_text(self, proxy.url(f"/ace/manifest.m3u8?id={cid(1)}&junk=2"))
        self.assertEqual(code, 200)
        self.assertEqual(len(engine.manifest_calls), 1)

    async def test_new_hls_content_past_the_limit_is_a_503(self) -> None:
        engine = sim_engine(self, bitrate=500_000)
        proxy = await start_proxy(self, engine, max_sessions="1", linger="0")
        ts = await Player.open(self, proxy.stream_url(cid(1)))
        await ts.when_received(PACKET_SIZE)
        code, doc = await get_json(self, proxy.url(f"/ace/manifest.m3u8?id={cid(2)}"))
        self.assertEqual(code, 503, doc)
        self.assertEqual(doc["code"], "max_sessions")
        self.assertEqual(engine.manifest_calls, [])


class SmugglingTests(TestCase):
    async def test_smuggled_parameters_reach_the_engine_as_the_right_single_parameters(self) -> None:
        engine = sim_engine(self, bitrate=500_000)
        proxy = await start_proxy(self, engine, linger="0")
        cases = [
            # (query after the id, the parameters the engine must get besides format/content_id/pid)
            ("&PID=evil&Pid=evil&FORMAT=hls&Format=x&TOKEN=t", {}),
            ("&transcode_audio=1%26accinj%3D1", {"transcode_audio": "1&accinj=1"}),
            ("&preferred_audio_language=eng&accinj=1&junk=2", {"preferred_audio_language": "eng"}),
            ("&Transcode_Audio=1&file_indexes=0%2C1", {"file_indexes": "0,1"}),
        ]
        for n, (extra, options) in enumerate(cases, start=1):
            player = await Player.open(self, proxy.stream_url(cid(n), extra))
            self.assertEqual(player.code, 200, extra)
            await player.when_received(PACKET_SIZE)
            params = engine.getstream_calls[-1]
            self.assertEqual(sorted(params), sorted(["format", "content_id", "pid", *options]), extra)
            self.assertEqual(params["format"], "json")
            self.assertEqual(params["content_id"], cid(n))
            self.assertRegex(params["pid"], r"^[0-9a-f]{32}$")
            for name, value in options.items():
                self.assertEqual(params[name], value)
            await player.hang_up()
        self.assertEqual(len(engine.getstream_calls), len(cases))

    async def test_smuggling_into_the_id_or_a_second_selector_is_a_400(self) -> None:
        engine = sim_engine(self)
        proxy = await start_proxy(self, engine)
        for query in (
            f"id={CID}%26accinj%3D1",
            f"id={CID}&url=http%3A%2F%2Fevil%2Fa.torrent",
            f"id={CID}&magnet=magnet%3A%3Fxt",
            f"id={CID}&direct_url=x",
            f"id={CID}&infohash={cid(9)}",
            f"id={CID}&ID={cid(9)}",
        ):
            code, _ = await get_text(self, proxy.url(f"/ace/getstream?{query}"))
            self.assertEqual(code, 400, query)
        self.assertEqual(engine.getstream_calls, [])


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class _HeaderFlood(Protocol):
    """A fake engine answering any request with ``count`` headers, written a
    thousand at a time while the client reads (so it holds little itself)."""

    def __init__(self, count: int) -> None:
        self.left = count
        self.paused = False
        self.lost: Deferred[None] = Deferred()
        self.sent = 0

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" in data and self.sent == 0:
            self.transport.registerProducer(self, True)
            self.transport.write(b"HTTP/1.1 200 OK\r\n")
            self._more()

    def _more(self) -> None:
        if self.paused or self.lost.called:
            return
        if self.left <= 0:
            self.transport.write(b"Content-Length: 0\r\n\r\n")
            return
        n = min(1000, self.left)
        self.transport.write(b"".join(b"X-H-%d: v\r\n" % (self.sent + i) for i in range(n)))
        self.left -= n
        self.sent += n
        reactor.callLater(0, self._more)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._more()

    def stopProducing(self) -> None:
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.lost.called:
            self.lost.callback(None)


class EngineEdgeTests(TestCase):
    async def test_200000_engine_headers_fail_cleanly_and_cost_no_memory(self) -> None:
        floods: list[_HeaderFlood] = []

        def flood() -> _HeaderFlood:
            floods.append(_HeaderFlood(200_000))
            return floods[-1]

        port = reactor.listenTCP(0, Factory.forProtocol(flood), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        pool = make_pool(reactor)
        self.addCleanup(pool.closeCachedConnections)
        client = EngineClient(
            HTTPClient(Agent(reactor, pool=pool)),
            EngineAddress("http", "127.0.0.1", port.getHost().port),
            reactor,
            timeout=10,
        )
        gc.collect()
        before = _rss_kib()
        failure = None
        try:
            await within(client.start(ContentKey("content_id", CID)))
        except EngineError as e:
            failure = e
        await within(floods[0].lost)  # the connection was closed by the client
        gc.collect()
        grown = _rss_kib() - before
        self.assertIsNotNone(failure)
        self.assertIn("response headers exceed", str(failure))
        self.assertLess(floods[0].sent, 200_000)  # it stopped reading long before the end
        self.assertLess(grown, 4 * 1024, f"RSS grew {grown} KiB")
        print(f"\n200,000-header engine: request failed after {floods[0].sent} headers sent; RSS +{grown} KiB")

    async def test_engine_error_text_is_escaped_in_the_502_body(self) -> None:
        engine = sim_engine(self)
        engine.behaviour.json_error = "no\r\nX-Injected: 1\x1b[2J\x07"
        proxy = await start_proxy(self, engine)
        code, body = await get_text(self, proxy.stream_url())
        self.assertEqual(code, 502)
        self.assertIn("no\\x0d\\x0aX-Injected: 1\\x1b[2J\\x07", body)
        self.assertTrue(body.rstrip("\n").isprintable(), repr(body))
