"""
The simulated AceStream engine over real loopback sockets.

Trial test cases (real reactor, port 0 on 127.0.0.1, a treq client with its
own connection pool).  Tests wait for events, with a timeout, and never
sleep; every test leaves the reactor clean (cleanups hang up the readers,
close the pool, then shut the engine down).  *When* things happen (the delay
knobs, the pacing) is checked exactly on a ``task.Clock``, with the engine's
HTTP API served in memory (:class:`Clocked`, ``ClockTests``).

Runs under ``pytest -p no:twisted`` and ``python -m twisted.trial``.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, gatherResults, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from treq.client import HTTPClient
from treq.testing import StubTreq

from acexy_tw.sim.engine import Behaviour, SimEngine, parse_bitrate
from acexy_tw.streaming.mpegts import PACKET_SIZE

TIMEOUT = 10
HEX40 = re.compile(r"^[0-9a-f]{40}$")


def within(d: Deferred, seconds: float = TIMEOUT) -> Deferred:
    return d.addTimeout(seconds, reactor)


def assert_session_answer(test: Any, body: Dict[str, Any], content: str, playback_url: str) -> Dict[str, Any]:
    """
    A JSON session answer (getstream or manifest) for ``content``: no error,
    the session's fields, and stat/command URLs at the advertised address;
    ``playback_url`` is the pattern its playback URL must match, with
    ``{infohash}`` in it. Returns the answer.
    """
    test.assertIsNone(body["error"])
    answer = body["response"]
    infohash = hashlib.sha1(content.lower().encode()).hexdigest()
    test.assertEqual(answer["infohash"], infohash)
    test.assertRegex(answer["playback_session_id"], HEX40)
    test.assertEqual((answer["is_live"], answer["is_encrypted"], answer["client_session_id"]), (1, 0, -1))
    test.assertRegex(answer["playback_url"], playback_url.format(infohash=infohash))
    for key, kind in (("stat_url", "stat"), ("command_url", "cmd")):
        test.assertRegex(answer[key], rf"^http://127\.0\.0\.1:6878/ace/{kind}/{infohash}/[0-9a-f]+$")
    return answer


class BodyReader(Protocol):
    """Reads a streaming response body; a test can wait for N bytes or the end.

    After the end, ``reason`` is the ``Failure`` given to ``connectionLost``:
    ``ResponseDone`` for a clean end.
    """

    def __init__(self, keep: bool = True) -> None:
        self.keep = keep
        self.data = bytearray()
        self.received = 0
        self.reason: Optional[Failure] = None
        self._byte_waiters: List[Tuple[int, Deferred]] = []
        self._end_waiters: List[Deferred] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if self.keep:
            self.data += data
        for item in list(self._byte_waiters):
            if self.received >= item[0]:
                self._byte_waiters.remove(item)
                item[1].callback(self.received)

    def connectionLost(self, reason: Failure) -> None:
        self.reason = reason
        byte_waiters, self._byte_waiters = self._byte_waiters, []
        end_waiters, self._end_waiters = self._end_waiters, []
        for _, d in byte_waiters:
            d.errback(AssertionError(f"body ended after {self.received} bytes: {reason.value!r}"))
        for d in end_waiters:
            d.callback(None)

    def at_least(self, count: int) -> Deferred:
        """Fires with the byte count once ``count`` bytes have arrived."""
        if self.received >= count:
            return succeed(self.received)
        item: Tuple[int, Deferred] = (count, Deferred(lambda d: self._byte_waiters.remove(item)))
        self._byte_waiters.append(item)
        return within(item[1])

    def ended(self) -> Deferred:
        """Fires (with None: a Failure would travel down the errback chain)
        once the body has ended; then look at ``reason``."""
        if self.reason is not None:
            return succeed(None)
        d: Deferred = Deferred(lambda d: self._end_waiters.remove(d))
        self._end_waiters.append(d)
        return within(d)

    def hang_up(self) -> Deferred:
        if self.reason is None:
            self.transport.stopProducing()
        return self.ended()


async def failure_of(d: Deferred) -> Failure:
    """Await ``d`` expecting it to fail; returns the Failure (boxed on the
    way: a Failure returned from an errback would stay an error)."""
    box: List[Failure] = []

    def unexpected(value: Any) -> None:
        raise AssertionError(f"expected a failure, got {value!r}")

    await within(d.addCallbacks(unexpected, box.append))
    return box[0]


class Clocked:
    """
    A simulator's HTTP API served in memory (treq's ``StubTreq``) with its
    timers on a ``task.Clock``: *when* something happens is checked exactly and
    nothing waits. A request is answered as soon as nothing delays it;
    :meth:`advance` moves the clock on (and lets the answers through).
    """

    def __init__(self, resource: Any, clock: MemoryReactorClock) -> None:
        self.clock = clock
        self._http = StubTreq(resource)

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred:
        """The response Deferred (it fires at the headers; bodies are unbuffered)."""
        d = self._http.request(method, url, unbuffered=True, **kwargs)
        self.advance(0)
        return d

    def get(self, url: str, **kwargs: Any) -> Deferred:
        return self.request("GET", url, **kwargs)

    def body(self, response: Any) -> Deferred:
        """The whole body of a response that ends."""
        d = response.content()
        self._http.flush()
        return d

    def advance(self, seconds: float) -> None:
        self._http.flush()
        self.clock.advance(seconds)
        self._http.flush()


class EngineTestCase(TestCase):
    """An engine listening on a free port, and a client with its own pool."""

    timeout = 60
    bitrate: Optional[int] = 2_000_000
    advertise = ("127.0.0.1", 6878)

    def setUp(self) -> None:
        self.engine = SimEngine(
            reactor,
            bitrate=self.bitrate,
            advertise_host=self.advertise[0],
            advertise_port=self.advertise[1],
        )
        self.engine.listen()
        self.addCleanup(lambda: within(self.engine.shutdown()))
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.retryAutomatically = False
        self.addCleanup(self.pool.closeCachedConnections)
        self.http = HTTPClient(Agent(reactor, pool=self.pool))
        self.readers: List[BodyReader] = []
        self.addCleanup(lambda: gatherResults([r.hang_up() for r in self.readers]))

    # --- helpers ------------------------------------------------------------------

    def local(self, url: str) -> str:
        """Rewrite an advertised URL to where the engine really listens."""
        advertised = f"http://{self.advertise[0]}:{self.advertise[1]}"
        assert url.startswith(advertised + "/"), url
        return self.engine.url + url[len(advertised) :]

    def get(self, path_or_url: str, **params: str) -> Deferred:
        url = path_or_url if "://" in path_or_url else self.engine.url + path_or_url
        return within(self.http.get(url, params=params or None, unbuffered=True))

    async def get_json(self, path_or_url: str, **params: str) -> Tuple[int, Any]:
        response = await self.get(path_or_url, **params)
        return response.code, await within(response.json())

    async def getstream(self, **params: str) -> Dict[str, Any]:
        params = {"format": "json", **params}
        code, body = await self.get_json("/ace/getstream", **params)
        self.assertEqual(code, 200)
        return body

    async def play(self, url: str, keep: bool = True) -> Tuple[Any, BodyReader]:
        response = await self.get(self.local(url))
        reader = BodyReader(keep)
        response.deliverBody(reader)
        self.readers.append(reader)
        return response, reader

    async def start(self, content: str = "abc", keep: bool = True) -> Tuple[Dict[str, Any], Any, BodyReader]:
        """getstream, then open the playback URL."""
        body = await self.getstream(id=content, pid="player-1")
        response, reader = await self.play(body["response"]["playback_url"], keep)
        return body["response"], response, reader

    def wait(self, predicate) -> Deferred:
        return within(self.engine.when(predicate))


class GetstreamTests(EngineTestCase):
    async def test_success_shape_and_advertised_urls(self) -> None:
        body = await self.getstream(id="ABCdef", pid="p1", transcode_audio="0")
        answer = assert_session_answer(
            self, body, "ABCdef", r"^http://127\.0\.0\.1:6878/ace/r/{infohash}/[0-9a-f]+$"
        )
        self.assertNotEqual(self.engine.port, 6878)
        self.assertEqual(
            self.engine.getstream_calls,
            [{"format": "json", "id": "ABCdef", "pid": "p1", "transcode_audio": "0"}],
        )
        session = self.engine.sessions[answer["playback_session_id"]]
        self.assertEqual((session.selector, session.content_key, session.pid), ("content_id", "ABCdef", "p1"))
        self.assertEqual(session.params["transcode_audio"], "0")
        self.assertIs(self.engine.last_session, session)

    async def test_every_call_is_a_new_session(self) -> None:
        first = (await self.getstream(content_id="abc", pid="1"))["response"]
        second = (await self.getstream(content_id="abc", pid="2"))["response"]
        self.assertEqual(first["infohash"], second["infohash"])
        self.assertNotEqual(first["playback_session_id"], second["playback_session_id"])
        self.assertNotEqual(first["playback_url"], second["playback_url"])
        self.assertEqual(len(self.engine.active_sessions), 2)

    async def test_infohash_selector_is_kept(self) -> None:
        infohash = "0123456789ABCDEF0123456789ABCDEF01234567"
        answer = (await self.getstream(infohash=infohash, pid="1"))["response"]
        self.assertEqual(answer["infohash"], infohash.lower())
        self.assertEqual(self.engine.last_session.selector, "infohash")

    async def test_missing_selector_is_an_error(self) -> None:
        body = await self.getstream(pid="1")
        self.assertEqual(body, {"response": None, "error": "missing content id"})
        self.assertEqual(self.engine.sessions, {})
        self.assertEqual(len(self.engine.getstream_calls), 1)

    async def test_hls_manifest_and_unknown_paths_are_404(self) -> None:
        for path in ("/ace/manifest.m3u8", "/nope", "/ace/r/x"):
            response = await self.get(path, id="abc")
            await within(response.text())
            self.assertEqual(response.code, 404, path)

    async def test_liveness_endpoints(self) -> None:
        code, body = await self.get_json("/webui/api/service", method="get_version")
        self.assertEqual((code, body), (200, {"result": {"code": 3020300, "platform": "linux", "version": "3.2.3"}, "error": None}))
        code, body = await self.get_json("/server/api", api_version="3", method="get_status")
        self.assertEqual((code, body), (200, {"result": {"status": 1}, "error": None}))


class AdvertisedAddressTests(EngineTestCase):
    advertise = ("gluetun", 19000)

    async def test_urls_carry_the_advertised_address(self) -> None:
        answer = (await self.getstream(id="abc"))["response"]
        for key in ("playback_url", "stat_url", "command_url"):
            self.assertTrue(answer[key].startswith("http://gluetun:19000/ace/"), answer[key])
        _, reader = await self.play(answer["playback_url"])
        await reader.at_least(PACKET_SIZE)


class PlaybackTests(EngineTestCase):
    async def test_playback_is_mpegts(self) -> None:
        _, response, reader = await self.start()
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"video/MP2T"])
        await reader.at_least(100 * PACKET_SIZE)
        data = bytes(reader.data[: 100 * PACKET_SIZE])
        self.assertEqual({data[i] for i in range(0, len(data), PACKET_SIZE)}, {0x47})
        self.assertEqual(self.engine.open_playbacks, 1)

    async def test_rate_limited_playback_delivers_the_bitrate(self) -> None:
        """Not much slower than the bitrate over a real socket (not faster: on a
        clock, ``ClockTests.test_rate_limited_playback_keeps_to_the_bitrate``)."""
        answer = (await self.getstream(id="abc"))["response"]

        async def one_second_of_stream() -> int:
            _, reader = await self.play(answer["playback_url"], keep=False)
            return await reader.at_least(self.bitrate // 8 * 95 // 100)

        await within(Deferred.fromCoroutine(one_second_of_stream()), 1.6)

    async def test_client_hang_up_is_recorded(self) -> None:
        answer, _, reader = await self.start()
        await reader.at_least(10 * PACKET_SIZE)
        await reader.hang_up()
        await self.wait(lambda e: e.open_playbacks == 0)
        session = self.engine.sessions[answer["playback_session_id"]]
        self.assertEqual(session.closed_by_peer, 1)
        self.assertEqual(session.playbacks[0].ended_by, "peer")
        self.assertFalse(session.stopped)

    async def test_stat_while_streaming(self) -> None:
        answer, _, reader = await self.start()
        await reader.at_least(10 * PACKET_SIZE)
        code, body = await self.get_json(self.local(answer["stat_url"]))
        self.assertEqual(code, 200)
        self.assertIsNone(body["error"])
        stat = body["response"]
        self.assertEqual(stat["status"], "dl")
        self.assertEqual(stat["speed_down"], round(self.bitrate / 8 / 1024))
        self.assertGreaterEqual(stat["downloaded"], 10 * PACKET_SIZE)
        self.assertGreater(stat["peers"], 0)

    async def test_stop_closes_playback_and_forgets_the_session(self) -> None:
        answer, _, reader = await self.start()
        await reader.at_least(10 * PACKET_SIZE)
        code, body = await self.get_json(self.local(answer["command_url"]), method="stop")
        self.assertEqual((code, body), (200, {"response": "ok", "error": None}))
        await reader.ended()
        reason = reader.reason
        self.assertTrue(reason.check(ResponseDone), reason)
        session = self.engine.sessions[answer["playback_session_id"]]
        self.assertTrue(session.stopped)
        self.assertEqual((session.stop_commands, self.engine.stop_count), (1, 1))
        self.assertEqual((session.closed_by_peer, session.playbacks[0].ended_by), (0, "engine"))
        await self.wait(lambda e: e.open_playbacks == 0)
        self.assertEqual(self.engine.active_sessions, [])

        unknown = {"response": None, "error": "unknown playback session id"}
        self.assertEqual(await self.get_json(self.local(answer["stat_url"])), (200, unknown))
        self.assertEqual(await self.get_json(self.local(answer["command_url"]), method="stop"), (200, unknown))
        self.assertEqual(session.stop_commands, 2)
        response = await self.get(self.local(answer["playback_url"]))
        await within(response.text())
        self.assertEqual(response.code, 404)

    async def test_unknown_token_is_404(self) -> None:
        answer = (await self.getstream(id="abc"))["response"]
        response = await self.get(self.local(answer["playback_url"]) + "0")
        await within(response.text())
        self.assertEqual(response.code, 404)


class FlatOutTests(EngineTestCase):
    bitrate = None

    async def test_flat_out_is_fast_and_honours_pauses(self) -> None:
        answer, _, reader = await self.start(keep=False)
        await reader.at_least(8 * 1024 * 1024)
        stream = self.engine.last_session.playbacks[0]

        reader.transport.pauseProducing()  # stop reading: buffers fill up
        # The engine is paused and resumed while the kernel buffers still take
        # data; once they are full it stays paused.  A stat round trip lets the
        # reactor turn: wait for one during which nothing was sent.
        for _ in range(100):
            await self.wait(lambda e: stream.paused)
            sent = stream.bytes_sent
            await self.get_json(self.local(answer["stat_url"]))
            if stream.paused and stream.bytes_sent == sent:
                break
        self.assertGreaterEqual(stream.pauses, 1)
        await self.get_json(self.local(answer["stat_url"]))
        self.assertEqual(stream.bytes_sent, sent)

        reader.transport.resumeProducing()
        await self.wait(lambda e: stream.bytes_sent > sent + 4 * 1024 * 1024)
        await reader.hang_up()
        await self.wait(lambda e: e.open_playbacks == 0)
        self.assertEqual(stream.ended_by, "peer")

    async def test_reset_after_a_large_budget_delivers_every_byte(self) -> None:
        budget = 20_000 * PACKET_SIZE
        self.engine.behaviour.reset_after = budget
        _, _, reader = await self.start(keep=False)
        await reader.ended()
        reason = reader.reason
        self.assertEqual(reader.received, budget)
        self.assertFalse(reason.check(ResponseDone), reason)
        self.assertEqual(self.engine.last_session.playbacks[0].end_reason, "reset")


class MisbehaviourTests(EngineTestCase):
    async def test_json_delay(self) -> None:
        """The answer is held, then given (how long: ``ClockTests.test_json_delay``)."""
        self.engine.behaviour.json_delay = 0.5
        d = Deferred.fromCoroutine(self.getstream(id="abc"))
        await self.wait(lambda e: e.pending_answers == 1)
        self.assertFalse(d.called)
        body = await within(d)
        self.assertIsNone(body["error"])
        self.assertEqual(self.engine.pending_answers, 0)

    async def test_json_hang_until_the_client_gives_up(self) -> None:
        self.engine.behaviour.json_hang = True
        d = self.http.get(self.engine.url + "/ace/getstream", params={"id": "abc"})
        await self.wait(lambda e: e.pending_answers == 1)
        self.assertEqual(len(self.engine.getstream_calls), 1)
        d.cancel()
        await failure_of(d)
        await self.wait(lambda e: e.pending_answers == 0)
        self.assertEqual(self.engine.sessions, {})

    async def test_behaviour_applies_to_later_requests_only(self) -> None:
        self.engine.behaviour.json_delay = 0.3
        d = Deferred.fromCoroutine(self.getstream(id="slow"))
        await self.wait(lambda e: e.pending_answers == 1)
        self.engine.behaviour = Behaviour(json_error="changed")
        body = await d
        self.assertIsNone(body["error"])
        self.assertEqual(await self.getstream(id="x"), {"response": None, "error": "changed"})

    async def test_json_error(self) -> None:
        self.engine.behaviour.json_error = "no peers"
        self.assertEqual(await self.getstream(id="abc"), {"response": None, "error": "no peers"})
        self.assertEqual(self.engine.sessions, {})

    async def test_getstream_status(self) -> None:
        self.engine.behaviour.getstream_status = 500
        response = await self.get("/ace/getstream", format="json", id="abc")
        self.assertEqual(response.code, 500)
        self.assertEqual(await within(response.text()), "Internal Server Error")

    async def test_playback_status(self) -> None:
        answer = (await self.getstream(id="abc"))["response"]
        self.engine.behaviour.playback_status = 500
        response = await self.get(self.local(answer["playback_url"]))
        self.assertEqual(response.code, 500)
        self.assertTrue(response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/html"))
        self.assertIn("500", await within(response.text()))
        self.assertEqual(self.engine.last_session.playbacks[0].end_reason, "error page")
        self.assertEqual(self.engine.open_playbacks, 0)

    async def test_playback_delay_is_prebuffering(self) -> None:
        answer = (await self.getstream(id="abc"))["response"]
        self.engine.behaviour.playback_delay = 0.5  # how long: ClockTests.test_playback_delay
        d = self.get(self.local(answer["playback_url"]))
        headers: List[Any] = []
        d.addCallback(lambda response: (headers.append(response), response)[1])
        await self.wait(lambda e: e.open_playbacks == 1)
        _, stat = await self.get_json(self.local(answer["stat_url"]))
        self.assertEqual(stat["response"]["status"], "prebuf")
        self.assertEqual(headers, [])  # no headers while prebuffering
        response = await d
        reader = BodyReader()
        response.deliverBody(reader)
        self.readers.append(reader)
        await reader.at_least(PACKET_SIZE)

    async def test_playback_hang_until_the_client_gives_up(self) -> None:
        answer = (await self.getstream(id="abc"))["response"]
        self.engine.behaviour.playback_hang = True
        d = self.http.get(self.local(answer["playback_url"]), unbuffered=True)
        await self.wait(lambda e: e.open_playbacks == 1)
        stream = self.engine.last_session.playbacks[0]
        self.assertTrue(stream.waiting)
        d.cancel()
        await failure_of(d)
        await self.wait(lambda e: e.open_playbacks == 0)
        self.assertEqual((stream.ended_by, self.engine.last_session.closed_by_peer), ("peer", 1))

    async def test_stall_after(self) -> None:
        self.engine.behaviour.stall_after = 1000  # rounds down to 5 packets
        answer, _, reader = await self.start()
        stream = self.engine.last_session.playbacks[0]
        await self.wait(lambda e: stream.state == stream.STALLED)
        await reader.at_least(5 * PACKET_SIZE)
        await self.get_json(self.local(answer["stat_url"]))  # let the reactor turn
        self.assertEqual((reader.received, stream.bytes_sent), (5 * PACKET_SIZE, 5 * PACKET_SIZE))
        self.assertIsNone(reader.reason)
        self.assertEqual(self.engine.open_playbacks, 1)

    async def test_eof_after(self) -> None:
        self.engine.behaviour.eof_after = 300 * PACKET_SIZE
        _, _, reader = await self.start()
        await reader.ended()
        reason = reader.reason
        self.assertTrue(reason.check(ResponseDone), reason)
        self.assertEqual(reader.received, 300 * PACKET_SIZE)
        stream = self.engine.last_session.playbacks[0]
        self.assertEqual((stream.ended_by, stream.end_reason), ("engine", "eof"))
        self.assertEqual(self.engine.last_session.closed_by_peer, 0)

    async def test_reset_after(self) -> None:
        self.engine.behaviour.reset_after = 500 * PACKET_SIZE
        _, _, reader = await self.start()
        await reader.ended()
        reason = reader.reason
        self.assertFalse(reason.check(ResponseDone), reason)
        self.assertEqual(reader.received, 500 * PACKET_SIZE)
        await self.wait(lambda e: e.open_playbacks == 0)
        self.assertEqual(self.engine.last_session.playbacks[0].end_reason, "reset")

    async def test_stop_status(self) -> None:
        answer, _, reader = await self.start()
        self.engine.behaviour.stop_status = 500
        code, body = await self.get_json(self.local(answer["command_url"]), method="stop")
        self.assertEqual(code, 500)
        self.assertIsNone(body["response"])
        session = self.engine.last_session
        self.assertEqual((session.stopped, session.stop_commands), (False, 1))
        await reader.at_least(reader.received + 10 * PACKET_SIZE)  # still streaming

    async def test_stop_hang(self) -> None:
        answer, _, reader = await self.start()
        self.engine.behaviour.stop_hang = True
        d = self.http.get(self.local(answer["command_url"]), params={"method": "stop"})
        await self.wait(lambda e: e.stop_count == 1 and e.pending_answers == 1)
        self.assertFalse(self.engine.last_session.stopped)
        d.cancel()
        await failure_of(d)
        await self.wait(lambda e: e.pending_answers == 0)
        await reader.at_least(reader.received + 10 * PACKET_SIZE)  # still streaming


class PersistentFailureTests(EngineTestCase):
    """A misbehaviour set in ``behaviour`` hits every playback, not only the first."""

    async def test_reset_after_zero_resets_every_playback_right_after_its_headers(self) -> None:
        self.engine.behaviour = Behaviour(reset_after=0)
        for i in range(3):
            answer, response, reader = await self.start(f"content-{i}")
            self.assertEqual(response.code, 200)
            self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"video/MP2T"])
            await reader.ended()
            self.assertFalse(reader.reason.check(ResponseDone), reader.reason)
            self.assertEqual(reader.received, 0)
            [stream] = self.engine.sessions[answer["playback_session_id"]].playbacks
            await self.wait(lambda e: not stream.is_open)
            self.assertEqual((stream.end_reason, stream.bytes_sent), ("reset", 0))
        sessions = list(self.engine.sessions.values())
        self.assertEqual(len(sessions), 3)
        self.assertEqual([s.created_at for s in sessions], sorted(s.created_at for s in sessions))
        self.assertEqual([(s.stop_commands, s.open_playbacks) for s in sessions], [(0, [])] * 3)

    async def test_stall_after_stalls_every_playback(self) -> None:
        self.engine.behaviour.stall_after = 10 * PACKET_SIZE + 100  # rounds down to 10 packets
        for i in range(3):
            answer, response, reader = await self.start(f"content-{i}")
            self.assertEqual(response.code, 200)
            [stream] = self.engine.sessions[answer["playback_session_id"]].playbacks
            await self.wait(lambda e: stream.state == stream.STALLED)
            await reader.at_least(10 * PACKET_SIZE)
            await self.get_json(self.local(answer["stat_url"]))  # let the reactor turn
            self.assertEqual((reader.received, stream.bytes_sent), (10 * PACKET_SIZE, 10 * PACKET_SIZE))
            self.assertIsNone(reader.reason)
        self.assertEqual(self.engine.open_playbacks, 3)
        self.assertEqual(len(self.engine.sessions), 3)


class FailNextPlaybacksTests(EngineTestCase):
    """``fail_next_playbacks``: the next n playbacks fail, then the engine heals."""

    async def three_playbacks(self, how: str, after: int) -> List[Tuple[Any, BodyReader, Any]]:
        """Script two failures, then open three playbacks (one session each):
        ``(response, reader, stream)`` of each, the scripted count checked."""
        self.engine.fail_next_playbacks(2, how=how, after=after)
        self.assertEqual(self.engine.failing_playbacks, 2)
        played = []
        for i in range(3):
            answer, response, reader = await self.start(f"content-{i}")
            self.assertEqual(self.engine.failing_playbacks, max(0, 1 - i))
            self.assertEqual(response.code, 200)
            [stream] = self.engine.sessions[answer["playback_session_id"]].playbacks
            played.append((response, reader, stream))
        return played

    async def assert_streams_normally(self, reader: BodyReader, stream: Any) -> None:
        await reader.at_least(reader.received + 100 * PACKET_SIZE)
        self.assertEqual(stream.state, stream.STREAMING)
        self.assertIsNone(reader.reason)
        self.assertIsNone(stream.behaviour.reset_after)

    async def test_reset(self) -> None:
        played = await self.three_playbacks("reset", after=0)
        for _, reader, stream in played[:2]:
            await reader.ended()
            self.assertFalse(reader.reason.check(ResponseDone), reader.reason)
            self.assertEqual((reader.received, stream.end_reason), (0, "reset"))
        await self.assert_streams_normally(*played[2][1:])

    async def test_reset_after_bytes(self) -> None:
        played = await self.three_playbacks("reset", after=50 * PACKET_SIZE)
        for _, reader, stream in played[:2]:
            await reader.ended()
            self.assertFalse(reader.reason.check(ResponseDone), reader.reason)
            self.assertEqual((reader.received, stream.end_reason), (50 * PACKET_SIZE, "reset"))
        await self.assert_streams_normally(*played[2][1:])

    async def test_eof(self) -> None:
        played = await self.three_playbacks("eof", after=20 * PACKET_SIZE)
        for _, reader, stream in played[:2]:
            await reader.ended()
            self.assertTrue(reader.reason.check(ResponseDone), reader.reason)
            self.assertEqual((reader.received, stream.end_reason), (20 * PACKET_SIZE, "eof"))
        await self.assert_streams_normally(*played[2][1:])

    async def test_stall(self) -> None:
        played = await self.three_playbacks("stall", after=1000)  # rounds down to 5 packets
        for _, reader, stream in played[:2]:
            await self.wait(lambda e: stream.state == stream.STALLED)
            await reader.at_least(5 * PACKET_SIZE)
        await self.assert_streams_normally(*played[2][1:])
        for _, reader, stream in played[:2]:  # still silent, still open
            self.assertEqual((reader.received, stream.bytes_sent), (5 * PACKET_SIZE, 5 * PACKET_SIZE))
            self.assertEqual(stream.state, stream.STALLED)
            self.assertIsNone(reader.reason)
        self.assertEqual(self.engine.open_playbacks, 3)

    async def test_counted_on_arrival_engine_wide_and_over_behaviour(self) -> None:
        self.engine.behaviour.playback_status = 500  # overridden by the scripted failure
        self.engine.fail_next_playbacks(1, how="eof")
        answer = (await self.getstream(id="abc"))["response"]
        response = await self.get(self.local(answer["playback_url"]) + "0")  # unknown token: not a playback
        await within(response.text())
        self.assertEqual((response.code, self.engine.failing_playbacks), (404, 1))
        response, reader = await self.play(answer["playback_url"])
        await reader.ended()
        self.assertEqual((response.code, reader.received), (200, 0))
        self.assertTrue(reader.reason.check(ResponseDone), reader.reason)
        self.assertEqual(self.engine.failing_playbacks, 0)
        response = await self.get(self.local(answer["playback_url"]))  # behaviour again
        await within(response.text())
        self.assertEqual(response.code, 500)
        self.assertEqual([p.end_reason for p in self.engine.last_session.playbacks], ["eof", "error page"])

    def test_calls_add_up_and_are_validated(self) -> None:
        self.engine.fail_next_playbacks(2)
        self.engine.fail_next_playbacks(1, how="stall", after=PACKET_SIZE)
        self.assertEqual(self.engine.failing_playbacks, 3)
        self.engine.fail_next_playbacks(0)
        self.assertEqual(self.engine.failing_playbacks, 3)
        for args, kwargs in (((-1,), {}), ((1,), {"how": "hang"}), ((1,), {"after": -1}), ((1.5,), {})):
            self.assertRaises(ValueError, self.engine.fail_next_playbacks, *args, **kwargs)
        self.assertEqual(self.engine.failing_playbacks, 3)


class ListeningTests(EngineTestCase):
    async def test_stop_listening_refuses_then_listen_again_on_the_same_port(self) -> None:
        _, _, reader = await self.start()
        port = self.engine.port
        await within(self.engine.stop_listening())
        self.assertFalse(self.engine.listening)
        await reader.at_least(reader.received + 10 * PACKET_SIZE)  # open playback carries on

        await self.pool.closeCachedConnections()  # no reuse of a kept-alive connection
        failure = await failure_of(self.get("/webui/api/service", method="get_version"))
        self.assertTrue(failure.check(ConnectionRefusedError), failure)

        self.engine.listen(port)
        self.assertEqual(self.engine.port, port)
        code, _ = await self.get_json("/webui/api/service", method="get_version")
        self.assertEqual(code, 200)

    def test_listen_twice_is_an_error(self) -> None:
        self.assertRaises(RuntimeError, self.engine.listen)


class CloseTests(EngineTestCase):
    async def test_close_drops_streams_timers_and_connections(self) -> None:
        _, _, reader = await self.start()
        await reader.at_least(PACKET_SIZE)
        self.engine.behaviour.json_delay = 30  # a pending DelayedCall
        delayed = self.http.get(self.engine.url + "/ace/getstream", params={"id": "x"})
        self.engine.behaviour = Behaviour(json_hang=True)
        hung = self.http.get(self.engine.url + "/ace/getstream", params={"id": "y"})
        await self.wait(lambda e: e.pending_answers == 2)

        await within(self.engine.close())
        self.assertEqual((self.engine.connections, self.engine.pending_answers), (0, 0))
        self.assertEqual(self.engine.open_playbacks, 0)
        self.assertEqual(self.engine.last_session.playbacks[0].end_reason, "engine closed")
        await reader.ended()
        self.assertFalse(reader.reason.check(ResponseDone))
        await failure_of(delayed)
        await failure_of(hung)
        self.assertTrue(self.engine.listening)  # close() leaves the port open


class WhenTests(EngineTestCase):
    def test_fires_at_once_when_already_true(self) -> None:
        self.assertIsNone(self.successResultOf(self.engine.when(lambda e: True)))
        self.assertEqual(self.engine.waiters, 0)

    async def test_fires_on_the_state_change(self) -> None:
        d = self.engine.when(lambda e: len(e.getstream_calls) == 2)
        await self.getstream(id="a")
        self.assertFalse(d.called)
        await self.getstream(id="b")
        self.assertTrue(d.called)
        await d

    def test_cancel_removes_the_waiter(self) -> None:
        d = self.engine.when(lambda e: False)
        self.assertEqual(self.engine.waiters, 1)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.engine.waiters, 0)

    def test_predicate_error_fails_the_waiter(self) -> None:
        self.failureResultOf(self.engine.when(lambda e: 1 / 0), ZeroDivisionError)
        self.assertEqual(self.engine.waiters, 0)


class BitrateParsingTests(TestCase):
    def test_parse_bitrate(self) -> None:
        self.assertEqual(parse_bitrate("4M"), 4_000_000)
        self.assertEqual(parse_bitrate("500k"), 500_000)
        self.assertEqual(parse_bitrate("8000000"), 8_000_000)
        self.assertEqual(parse_bitrate("1.5m"), 1_500_000)
        self.assertRaises(ValueError, parse_bitrate, "fast")


class ClockTests(SynchronousTestCase):
    """The engine's delay knobs and its pacing on a ``task.Clock``: exact, and
    nothing waits (the HTTP API is served in memory)."""

    bitrate = 2_000_000
    base = "http://127.0.0.1:6878"

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.engine = SimEngine(self.clock, bitrate=self.bitrate)
        self.http = Clocked(self.engine._site.resource, self.clock)

    def getstream(self, **params: str) -> Deferred:
        return self.http.get(self.base + "/ace/getstream", params={"format": "json", **params})

    def answer(self, d: Deferred) -> Dict[str, Any]:
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        return json.loads(self.successResultOf(self.http.body(response)))

    def started(self) -> Dict[str, Any]:
        body = self.answer(self.getstream(id="abc"))
        self.assertIsNone(body["error"])
        return body["response"]

    def test_json_delay(self) -> None:
        self.engine.behaviour.json_delay = 0.5
        d = self.getstream(id="abc")
        self.http.advance(0.49)
        self.assertNoResult(d)
        self.assertEqual(self.engine.pending_answers, 1)
        self.http.advance(0.01)
        self.assertIsNone(self.answer(d)["error"])
        self.assertEqual(self.engine.pending_answers, 0)

    def test_playback_delay(self) -> None:
        answer = self.started()
        self.engine.behaviour.playback_delay = 0.5
        d = self.http.get(answer["playback_url"])
        self.http.advance(0.49)
        self.assertNoResult(d)  # prebuffering
        self.assertEqual(self.engine.open_playbacks, 1)
        self.http.advance(0.01)
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)

    def test_rate_limited_playback_keeps_to_the_bitrate(self) -> None:
        answer = self.started()
        response = self.successResultOf(self.http.get(answer["playback_url"]))
        reader = BodyReader(keep=False)
        response.deliverBody(reader)
        per_second = self.bitrate // 8
        per_tick = per_second * self.engine.tick
        for seconds in (0.5, 1.0, 2.0):
            while self.clock.seconds() < seconds - 1e-9:
                self.http.advance(self.engine.tick)
            # what the bitrate allows by now, to within a write of it: not faster, not slower
            self.assertLessEqual(abs(reader.received - per_second * seconds), per_tick + PACKET_SIZE, seconds)
        reader.transport.stopProducing()  # hang up
        self.http.advance(0)
        self.assertIsNotNone(reader.reason)
