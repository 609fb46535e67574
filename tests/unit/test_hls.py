"""HlsSession and SegmentRelay on a task.Clock: playlist cache and mapping, relay
deadlines, live stats (stat_url polling, bitrates, history), HlsSessions.stop."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone
from twisted.internet.testing import StringTransport

from acexy_tw.engine import EngineAddress, EngineError, PlaybackInfo
from acexy_tw.stats import TIMER_NAMES
from acexy_tw.streaming.hls import HlsSession, SegmentRelay
from acexy_tw.testing import FakeResponse, key

ENGINE = "http://10.0.0.5:19023"
PLAYLIST_URL = f"{ENGINE}/ace/m/abc/tok.m3u8"


def playlist(*lines: str, target: int = 2) -> bytes:
    head = ["#EXTM3U", "#EXT-X-VERSION:3", f"#EXT-X-TARGETDURATION:{target}", "#EXT-X-MEDIA-SEQUENCE:7"]
    return ("\n".join(head + list(lines)) + "\n").encode()


LIVE = playlist("#EXTINF:2.0,", "http://127.0.0.1:6878/ace/c/abc/7.ts", "#EXTINF:2.0,", "http://127.0.0.1:6878/ace/c/abc/8.ts")


class FakeEngine:
    address = EngineAddress("http", "10.0.0.5", 19023)

    def __init__(self) -> None:
        self.fetches: list[Deferred] = []
        self.gets: list[tuple[str, Deferred]] = []
        self.stops = 0
        #: what stop answers (None: at once)
        self.stop_result: Any = None
        #: stat requests: (info, Deferred the test fires)
        self.stats: list[tuple[Any, Deferred]] = []

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
        return self.stop_result if self.stop_result is not None else succeed(None)

    def stat(self, info: Any) -> Deferred:
        d: Deferred = Deferred()
        self.stats.append((info, d))
        return d


STAT = {"response": {"status": "dl", "peers": 6, "speed_down": 300, "speed_up": 40, "downloaded": 123456}, "error": None}


class FakePlacement:
    def __init__(self, engine: FakeEngine, answer: bool = True) -> None:
        self.engine = engine
        self.answer = answer
        self.released: list[tuple[Any, bool]] = []

    def place(self, k: Any, hls: bool = False) -> Deferred:
        if not self.answer:
            return Deferred()
        info = PlaybackInfo(PLAYLIST_URL, f"{ENGINE}/ace/stat/abc/tok", f"{ENGINE}/ace/cmd/abc/tok", "abc", "p", 1)
        return succeed((self.engine, info))

    def release(self, k: Any, hls: bool = False) -> None:
        self.released.append((k, hls))


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


def ready_session(
    clock: Clock, stream_timeout: float = 0, stats_interval: float = 0
) -> tuple[HlsSession, FakeEngine, list[str]]:
    engine = FakeEngine()
    closed: list[str] = []
    session = HlsSession(
        key(), FakePlacement(engine), clock, stream_timeout=stream_timeout, on_closed=lambda s, r: closed.append(r), stats_interval=stats_interval
    )
    session.ready()
    return session, engine, closed


def playing_session(clock: Clock, stream_timeout: float = 600, stats_interval: float = 5) -> tuple[HlsSession, FakeEngine]:
    """A ready session whose first engine playlist came in (its stats run from then on)."""
    session, engine, _ = ready_session(clock, stream_timeout=stream_timeout, stats_interval=stats_interval)
    session.playlist()
    engine.fetches[0].callback((200, LIVE))
    return session, engine


def stats_timers(clock: Clock) -> list[str]:
    """The names of the SessionStats timers pending on ``clock``."""
    names = []
    for call in clock.getDelayedCalls():
        func = getattr(call.func, "f", call.func)
        if getattr(func, "__name__", None) in TIMER_NAMES:
            names.append(func.__name__)
    return sorted(names)


def not_the_sessions_own(clock: Clock, session: HlsSession) -> list:
    """Pending calls other than the session's expiry and its stats timers."""
    return [
        c
        for c in clock.getDelayedCalls()
        if c is not session._expiry and getattr(getattr(c.func, "f", c.func), "__name__", None) not in TIMER_NAMES
    ]


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
        session, engine, _ = ready_session(clock, stream_timeout=60)  # the session outlives the relay
        request = FakeRequest()
        relay = SegmentRelay(request, session, f"{ENGINE}/ace/c/abc/7.ts", clock, idle_timeout=idle, max_duration=total)
        done = relay.start()
        body = FakeResponse()
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
        self.assertEqual(not_the_sessions_own(clock, session), [])  # only the session's expiry and stats sampler

    def test_an_engine_that_never_answers_is_bounded(self) -> None:
        clock = Clock()
        session, engine, _ = ready_session(clock, stream_timeout=60)
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


class HlsStatsTests(SynchronousTestCase):
    """An HLS session's live stats: the TS sessions' SessionStats, started with
    the first engine playlist (the engine delivers), stopped at close."""

    def test_polled_every_interval_from_the_first_playlist_and_nothing_left_after_close(self) -> None:
        clock = Clock()
        session, engine, _ = ready_session(clock, stream_timeout=600, stats_interval=5)
        self.assertEqual(engine.stats, [])  # accepted, nothing delivered yet
        session.playlist()
        engine.fetches[0].callback((200, LIVE))
        self.assertEqual(len(engine.stats), 1)  # at once
        self.assertEqual(engine.stats[0][0].stat_url, f"{ENGINE}/ace/stat/abc/tok")
        engine.stats[0][1].callback(STAT)
        clock.advance(4.9)
        self.assertEqual(len(engine.stats), 1)
        clock.advance(0.1)
        self.assertEqual(len(engine.stats), 2)  # the next one stays in flight across the close
        d = session.describe()
        self.assertEqual(
            {k: d[k] for k in ("status", "peers", "speed_down", "speed_up", "downloaded")},
            {"status": "dl", "peers": 6, "speed_down": 300, "speed_up": 40, "downloaded": 123456},
        )
        self.assertEqual((d["stat_polls"], d["stat_failures"]), (2, 0))
        self.assertEqual(stats_timers(clock), sorted(TIMER_NAMES))
        session.close("client_disconnected")
        self.assertTrue(engine.stats[1][1].called)  # cancelled
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(session.stats.failures, 0)  # our own cancel is no failure
        clock.advance(60)
        self.assertEqual(len(engine.stats), 2)

    def test_one_request_in_flight_and_failures_are_counted_never_fatal(self) -> None:
        clock = Clock()
        session, engine = playing_session(clock)
        for _ in range(3):
            clock.advance(5)
        self.assertEqual(len(engine.stats), 1)  # the first never answered
        self.assertEqual(session.stats.skipped, 3)
        engine.stats[0][1].errback(Failure(EngineError("engine stat answered 500")))
        clock.advance(5)
        engine.stats[1][1].callback({"response": None, "error": "unknown playback session id"})
        self.assertEqual(session.stats.failures, 2)
        self.assertEqual(session.stats.last_error, "unknown playback session id")
        self.assertEqual(session.state, HlsSession.READY)
        session.close("shutdown")

    def test_not_polled_before_the_engine_accepted_nor_while_its_playlist_fails(self) -> None:
        clock = Clock()
        engine = FakeEngine()
        session = HlsSession(key(), FakePlacement(engine, answer=False), clock, stream_timeout=0, on_closed=lambda s, r: None, stats_interval=5)
        session.ready()
        clock.advance(30)
        self.assertEqual(engine.stats, [])
        self.assertEqual(stats_timers(clock), [])
        session.close("client_disconnected")
        self.assertEqual(clock.getDelayedCalls(), [])

        session, engine, _ = ready_session(clock, stream_timeout=600, stats_interval=5)
        d = session.playlist()
        engine.fetches[0].callback((500, b"no"))
        self.failureResultOf(d, EngineError)
        clock.advance(30)
        self.assertEqual((engine.stats, stats_timers(clock)), ([], []))
        session.close("shutdown")

    def test_relayed_bytes_make_the_bitrates_and_the_history(self) -> None:
        clock = Clock()
        session, engine = playing_session(clock, stats_interval=2)
        engine.stats[0][1].callback(STAT)
        for second in range(4):
            relay = SegmentRelay(FakeRequest(), session, f"{ENGINE}/ace/c/abc/7.ts", clock, idle_timeout=60, max_duration=120)
            relay.start()
            body = FakeResponse()
            engine.gets[-1][1].callback(body)
            body.protocol.dataReceived(b"\x47" * 188 * 10)
            body.protocol.connectionLost(Failure(ResponseDone()))
            clock.advance(1)
            for _, d in engine.stats:
                if not d.called:
                    d.callback(STAT)
        d = session.describe()
        self.assertEqual((d["bytes_in"], d["bytes_out"], d["segments"]), (4 * 1880, 4 * 1880, 4))
        self.assertEqual(d["bitrate_in"], 1880 * 8)
        self.assertEqual(d["bitrate_out"], 1880 * 8)
        # one sample per stat interval (2 s): at 0 s and 2 s, and now (4 s)
        self.assertEqual([h[0] for h in d["history"]], [4.0, 2.0, 0.0])
        self.assertEqual(d["history"][-1], [0.0, 1880 * 8, 1880 * 8, 6])
        session.close("shutdown")

    def test_described_with_the_ts_sessions_live_fields(self) -> None:
        from acexy_tw.testing import InMemoryProxy

        p = InMemoryProxy(stats_interval=5)
        p.connect()
        [ts_session] = list(p.registry)
        clock = Clock()
        session, _ = playing_session(clock)
        missing = set(ts_session.describe()) - set(session.describe()) - {"client_list", "engine_paused", "waiting",
                                                                         "waiting_reason", "failovers", "engine_sessions",
                                                                         "failover_attempts_left"}
        self.assertEqual(missing, set())
        self.assertEqual(session.describe()["kind"], "hls")
        session.close("shutdown")


class HlsSessionsStopTests(SynchronousTestCase):
    def _sessions(self) -> tuple[Clock, Any, FakeEngine, FakePlacement, list]:
        from acexy_tw.streaming.hls import HlsSessions

        clock = Clock()
        engine = FakeEngine()
        placement = FakePlacement(engine)
        ended: list = []
        hls = HlsSessions(placement, clock, stream_timeout=600, on_closed=lambda s, r: ended.append((str(s.key), r)), stats_interval=5)
        return clock, hls, engine, placement, ended

    def test_stop_ends_every_session_of_the_content_through_close(self) -> None:
        from acexy_tw.content import ContentKey
        from acexy_tw.testing import CID, CID2

        clock, hls, engine, placement, ended = self._sessions()
        plain, variant, other = ContentKey("content_id", CID), ContentKey("content_id", CID, (("transcode_audio", "1"),)), key(CID2)
        sessions = [hls.for_key(k) for k in (plain, variant, other)]
        polls = []
        for s in sessions:
            s.ready()
            polls.append(s.playlist())  # a poller waiting for the engine playlist
        self.assertEqual(hls.stop(CID.upper()), 2)
        self.assertEqual([s.closed for s in sessions], [True, True, False])
        self.assertEqual(sorted(r for _, r in ended), ["stopped", "stopped"])
        self.assertEqual(engine.stops, 2)  # the engine got its stop commands
        self.assertEqual(placement.released, [(plain, True), (variant, True)])  # reservations released
        for d in polls[:2]:
            self.failureResultOf(d, EngineError)
        self.assertNoResult(polls[2])
        self.assertEqual([s.key for s in hls], [other])
        self.assertIsNone(hls.by_sid(sessions[0].sid))
        self.assertEqual(hls.stop(CID), 0)
        self.successResultOf(hls.shutdown())
        self.failureResultOf(polls[2], EngineError)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_shutdown_waits_for_the_stop_of_a_session_closed_just_before(self) -> None:
        clock, hls, engine, placement, ended = self._sessions()
        engine.stop_result = Deferred()
        session = hls.for_key(key())
        session.ready()
        hls.stop(session.key.value)
        done = hls.shutdown()
        self.assertNoResult(done)  # its stop command is still on its way
        engine.stop_result.callback(None)
        self.assertIsNone(self.successResultOf(done))
