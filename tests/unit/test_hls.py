"""HlsSession and SegmentRelay on a task.Clock: playlist cache and mapping, relay deadlines."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.internet.testing import StringTransport

from acexy_tw.engine import EngineAddress, EngineError, PlaybackInfo
from acexy_tw.streaming.hls import HlsSession, SegmentRelay
from acexy_tw.testing import key

ENGINE = "http://10.0.0.5:19023"
PLAYLIST_URL = f"{ENGINE}/ace/m/abc/tok.m3u8"


def playlist(*lines: str, target: int = 2) -> bytes:
    head = ["#EXTM3U", "#EXT-X-VERSION:3", f"#EXT-X-TARGETDURATION:{target}", "#EXT-X-MEDIA-SEQUENCE:7"]
    return ("\n".join(head + list(lines)) + "\n").encode()


LIVE = playlist("#EXTINF:2.0,", "http://127.0.0.1:6878/ace/c/abc/7.ts", "#EXTINF:2.0,", "http://127.0.0.1:6878/ace/c/abc/8.ts")


class FakeBody:
    code = 200

    def __init__(self) -> None:
        self.headers = Headers({b"content-type": [b"video/MP2T"]})
        self.transport = StringTransport()
        self.protocol: Any = None

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)


class FakeEngine:
    address = EngineAddress("http", "10.0.0.5", 19023)

    def __init__(self) -> None:
        self.fetches: list[Deferred] = []
        self.gets: list[tuple[str, Deferred]] = []
        self.stops = 0

    def fetch(self, url: str) -> Deferred:
        d: Deferred = Deferred()
        self.fetches.append(d)
        return d

    def get(self, url: str) -> Deferred:
        d: Deferred = Deferred()
        self.gets.append((url, d))
        return d

    def stop(self, info: Any) -> Deferred:
        self.stops += 1
        return succeed(None)


class FakePlacement:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine

    def place(self, k: Any, hls: bool = False) -> Deferred:
        info = PlaybackInfo(PLAYLIST_URL, f"{ENGINE}/ace/stat/abc/tok", f"{ENGINE}/ace/cmd/abc/tok", "abc", "p", 1)
        return succeed((self.engine, info))

    def release(self, k: Any, hls: bool = False) -> None:
        pass


class FakeChannel:
    def __init__(self) -> None:
        self.transport = StringTransport()
        self.aborted = False
        self.transport.abortConnection = self._abort  # type: ignore[method-assign]

    def _abort(self) -> None:
        self.aborted = True


class FakeRequest:
    def __init__(self) -> None:
        self.channel = FakeChannel()
        self.written: list[bytes] = []
        self.headers: dict[bytes, bytes] = {}
        self.producer: Any = None

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.headers[name] = value

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None


def ready_session(clock: Clock, linger: float = 0) -> tuple[HlsSession, FakeEngine, list[str]]:
    engine = FakeEngine()
    closed: list[str] = []
    session = HlsSession(key(), FakePlacement(engine), clock, linger=linger, on_closed=lambda s, r: closed.append(r))
    session.ready()
    return session, engine, closed


def results(ds: list[Deferred]) -> list[Any]:
    out: list[Any] = []
    for d in ds:
        d.addBoth(out.append)
    return out


class PlaylistTests(SynchronousTestCase):
    def test_pollers_share_one_fetch_and_each_gets_its_own_playlist(self) -> None:
        clock = Clock()
        session, engine, _ = ready_session(clock)
        polls = [session.playlist(f"?token=t{i}") for i in range(3)]
        self.assertEqual(len(set(map(id, polls))), 3)
        self.assertEqual(len(engine.fetches), 1)
        got = results(polls)
        engine.fetches[0].callback((200, LIVE))
        self.assertEqual(len(got), 3)
        for i, body in enumerate(got):
            self.assertIsInstance(body, bytes)
            self.assertEqual(body.count(f"?token=t{i}".encode()), 2)
            self.assertNotIn(b"127.0.0.1", body)

    def test_one_fetch_per_target_duration(self) -> None:
        clock = Clock()
        session, engine, _ = ready_session(clock)
        session.playlist()
        engine.fetches[0].callback((200, LIVE))
        for _ in range(50):
            clock.advance(0.039)
            self.successResultOf(session.playlist())
        self.assertEqual(len(engine.fetches), 1)  # 1.95 s < the 2 s target duration
        clock.advance(0.06)
        session.playlist()
        self.assertEqual(len(engine.fetches), 2)
        self.assertEqual(session.polls, 52)

    def test_a_cancelled_poller_leaves_the_others_alone(self) -> None:
        clock = Clock()
        session, engine, _ = ready_session(clock)
        first, second = session.playlist(), session.playlist()
        first.cancel()
        self.failureResultOf(first)
        engine.fetches[0].callback((200, LIVE))
        self.assertTrue(self.successResultOf(second).startswith(b"#EXTM3U"))

    def test_a_failed_fetch_reaches_every_poller(self) -> None:
        clock = Clock()
        session, engine, _ = ready_session(clock)
        polls = [session.playlist(), session.playlist()]
        engine.fetches[0].errback(Failure(EngineError("engine playlist answered 500")))
        for d in polls:
            self.failureResultOf(d, EngineError)

    def test_names_are_opaque_stable_and_per_full_url(self) -> None:
        clock = Clock()
        session, engine, _ = ready_session(clock)
        body = playlist("#EXTINF:2,", "/ace/c/abc/1.ts", "#EXTINF:2,", "/secret/1.ts", "#EXTINF:2,", "1.ts")
        session.playlist()
        engine.fetches[0].callback((200, body))
        lines = [line for line in self.successResultOf(session.playlist()).decode().splitlines() if not line.startswith("#")]
        names = [line.rsplit("/", 1)[1] for line in lines]
        self.assertEqual(len(set(names)), 3)
        self.assertEqual(
            [session.segment_url(n) for n in names],
            [f"{ENGINE}/ace/c/abc/1.ts", f"{ENGINE}/secret/1.ts", f"{ENGINE}/ace/m/abc/1.ts"],
        )
        self.assertIsNone(session.segment_url("1.ts"))
        clock.advance(2)
        session.playlist()
        engine.fetches[1].callback((200, playlist("#EXTINF:2,", "/secret/1.ts", "#EXTINF:2,", "/ace/c/abc/2.ts")))
        again = self.successResultOf(session.playlist()).decode()
        self.assertIn(names[1], again)  # still listed: the same name
        self.assertEqual(session.segment_url(names[0]), f"{ENGINE}/ace/c/abc/1.ts")  # the previous playlist's too
        clock.advance(2)
        session.playlist()
        engine.fetches[2].callback((200, playlist("#EXTINF:2,", "/ace/c/abc/3.ts")))
        self.assertIsNone(session.segment_url(names[0]))  # two playlists later: gone

    def test_uri_attributes_share_the_mapping(self) -> None:
        clock = Clock()
        session, engine, _ = ready_session(clock)
        body = playlist(
            '#EXT-X-KEY:METHOD=AES-128,URI="http://127.0.0.1:6878/ace/c/abc/7.ts",IV=0x1',
            '#EXT-X-MAP:URI="7.ts",BYTERANGE="10@0"',
            "#EXTINF:2,",
            "/ace/c/abc/7.ts",
        )
        session.playlist()
        engine.fetches[0].callback((200, body))
        text = self.successResultOf(session.playlist("?token=a%26b")).decode().splitlines()
        key_line = next(line for line in text if line.startswith("#EXT-X-KEY"))
        map_line = next(line for line in text if line.startswith("#EXT-X-MAP"))
        segment = text[-1]
        self.assertEqual(key_line, f'#EXT-X-KEY:METHOD=AES-128,URI="{segment}",IV=0x1')
        self.assertTrue(map_line.endswith('",BYTERANGE="10@0"'))
        self.assertNotEqual(map_line.split('"')[1], segment)  # 7.ts next to the playlist: another URL

    def test_an_engine_route_under_the_engines_own_view_of_its_address_is_fetched_from_ours(self) -> None:
        clock = Clock()
        session, engine, _ = ready_session(clock)
        session.playlist()
        engine.fetches[0].callback((200, playlist("#EXTINF:2,", "http://172.18.0.5:6878/ace/c/abc/9.ts")))
        text = self.successResultOf(session.playlist()).decode().splitlines()
        name = text[-1].rsplit("/", 1)[1]
        self.assertEqual(session.segment_url(name), f"{ENGINE}/ace/c/abc/9.ts")  # never the container's address

    def test_unmappable_uris_refuse_the_playlist(self) -> None:
        for bad in (
            ["#EXTINF:2,", "http://127.0.0.2:9/INJECTED.ts"],
            ['#EXT-X-KEY:METHOD=AES-128,URI="https://evil.example/k"'],
            ["#EXT-X-MAP:URI=init.mp4"],
            ['#EXT-X-MAP:URI="init.mp4'],
            ['#EXT-X-DATERANGE:ID="x",X-ASSET-URI="/a.ts"'],
            ["#EXTINF:2,", "ftp://10.0.0.5/a.ts"],
        ):
            clock = Clock()
            session, engine, _ = ready_session(clock)
            d = session.playlist()
            engine.fetches[0].callback((200, playlist(*bad)))
            self.failureResultOf(d, EngineError)

    def test_close_answers_waiting_pollers_and_aborts_relays(self) -> None:
        clock = Clock()
        session, engine, closed = ready_session(clock)
        waiting = session.playlist()
        relay = SegmentRelay(FakeRequest(), session, f"{ENGINE}/ace/c/abc/7.ts", clock, idle_timeout=60, max_duration=120)
        done = relay.start()
        session.close("shutdown")
        self.failureResultOf(waiting, EngineError)
        self.assertEqual(self.successResultOf(done), (503, "the HLS session stopped"))
        self.assertEqual(session.relays, set())
        self.assertTrue(engine.gets[0][1].called)  # the engine request was cancelled
        self.assertEqual(closed, ["shutdown"])
        self.assertEqual(clock.getDelayedCalls(), [])


class SegmentRelayTests(SynchronousTestCase):
    def _relay(self, idle: float = 1.0, total: float = 5.0) -> tuple[Any, ...]:
        clock = Clock()
        session, engine, _ = ready_session(clock, linger=60)  # the session outlives the relay
        request = FakeRequest()
        relay = SegmentRelay(request, session, f"{ENGINE}/ace/c/abc/7.ts", clock, idle_timeout=idle, max_duration=total)
        done = relay.start()
        body = FakeBody()
        engine.gets[0][1].callback(body)
        return clock, session, request, relay, done, body

    def test_no_data_for_the_idle_timeout_closes_both_sides(self) -> None:
        clock, session, request, relay, done, body = self._relay()
        body.protocol.dataReceived(b"\x47" * 188)
        clock.advance(0.9)
        body.protocol.dataReceived(b"\x47" * 188)  # data: the idle clock restarts
        clock.advance(0.9)
        self.assertNoResult(done)
        clock.advance(0.2)
        self.assertIsNone(self.successResultOf(done))
        self.assertTrue(request.channel.aborted)  # a truncated segment is not passed off as whole
        self.assertTrue(body.transport.producerState == "stopped")  # the engine connection closes
        self.assertIsNone(request.producer)
        self.assertEqual(session.relays, set())
        self.assertEqual(session.bytes_out, 376)

    def test_a_steady_trickle_is_still_bounded_in_all(self) -> None:
        clock, session, request, relay, done, body = self._relay(idle=1.0, total=5.0)
        for _ in range(9):
            clock.advance(0.5)
            body.protocol.dataReceived(b"\x47" * 188)
        self.assertNoResult(done)
        clock.advance(0.5)
        self.successResultOf(done)
        self.assertTrue(request.channel.aborted)
        self.assertTrue(body.transport.producerState == "stopped")

    def test_a_whole_segment_ends_cleanly_with_no_timer_left(self) -> None:
        clock, session, request, relay, done, body = self._relay()
        body.protocol.dataReceived(b"\x47" * 188)
        body.protocol.connectionLost(Failure(ResponseDone()))
        self.assertIsNone(self.successResultOf(done))
        self.assertFalse(request.channel.aborted)
        self.assertEqual(session.segments_served, 1)
        self.assertEqual(session.relays, set())
        self.assertEqual(clock.getDelayedCalls(), [session._expiry])  # only the session's own expiry

    def test_an_engine_that_never_answers_is_bounded(self) -> None:
        clock = Clock()
        session, engine, _ = ready_session(clock, linger=60)
        relay = SegmentRelay(FakeRequest(), session, f"{ENGINE}/ace/c/abc/7.ts", clock, idle_timeout=1, max_duration=5)
        done = relay.start()
        clock.advance(1)
        self.assertEqual(self.successResultOf(done)[0], 504)
        self.assertTrue(engine.gets[0][1].called)

    def test_the_player_leaving_closes_the_engine_connection(self) -> None:
        clock, session, request, relay, done, body = self._relay()
        done.cancel()
        self.failureResultOf(done)
        self.assertTrue(body.transport.producerState == "stopped")
        self.assertEqual(session.relays, set())
