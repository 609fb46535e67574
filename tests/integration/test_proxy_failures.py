"""
The proxy over real sockets when things go wrong: engines that stall, end,
fail, hang, refuse or reset; players that zap, leave early or come back; bad
input. Every wait is bounded; nothing sleeps. Upper bounds on time are
timeouts on the awaited event (``within(d, seconds)``); lower bounds are the
proxy's own account of why something ended (``registry.stopped``) or the order
of events, never a wall-clock window.
"""

from __future__ import annotations

import shutil

from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import TestCase

from acexy_tw.content import MANY_SELECTORS, NO_SELECTOR
from acexy_tw.sim.engine import SimEngine
from acexy_tw.streaming.mpegts import PACKET_SIZE
from tests.integration.harness import (
    ffprobe_capture,
    CID,
    Player,
    StalledPlayer,
    cid,
    get_json,
    get_text,
    http_client,
    read_engine_directly,
    reactor,
    sim_engine,
    start_proxy,
    wait_until,
    within,
)


def timers_of(owner: object) -> list:
    """The reactor's pending timers that call a method of ``owner``."""
    return [c for c in reactor.getDelayedCalls() if getattr(c.func, "__self__", None) is owner]


def stopped_and_closed(e: SimEngine) -> bool:
    """Every engine session got its stop and no playback connection is open."""
    return e.open_playbacks == 0 and not e.active_sessions


class EngineStreamEndsTests(TestCase):
    # The engine's end reaches the players here (failover off); with failover on,
    # a live stream is re-placed instead: see test_outages.py.
    async def test_stall_ends_every_player_cleanly_after_empty_timeout(self) -> None:
        """A silent engine ends every player's stream cleanly and is stopped and hung up."""
        engine = sim_engine(self, bitrate=2_000_000)
        engine.behaviour.json_delay = 0.2  # both players attach before the first byte
        engine.behaviour.stall_after = 300 * PACKET_SIZE
        proxy = await start_proxy(self, engine, empty_timeout="500ms", failover_attempts="0")
        a, b = await gatherResults([Player.open(self, proxy.stream_url()) for _ in range(2)])
        await gatherResults([a.when_received(300 * PACKET_SIZE), b.when_received(300 * PACKET_SIZE)])
        await within(gatherResults([a.when_ended(), b.when_ended()]), 3)  # ended soon after the stall...
        self.assertTrue(a.clean_end and b.clean_end, (a.end_reason, b.end_reason))
        self.assertEqual((len(a.received), len(b.received)), (300 * PACKET_SIZE, 300 * PACKET_SIZE))
        # ...and by the silence watchdog (which fires only after empty_timeout without data)
        self.assertEqual(dict(proxy.registry.stopped), {"empty_timeout": 1})
        await within(engine.when(lambda e: e.stop_count == 1 and stopped_and_closed(e)))
        self.assertEqual((await get_json(self, proxy.url("/ace/status")))[1]["streams"], 0)

    async def test_engine_eof_passes_every_byte_then_ends_cleanly(self) -> None:
        """Everything the engine sent before its EOF reaches the player, byte for byte."""
        n = 5000 * PACKET_SIZE
        engine = sim_engine(self, bitrate=None)
        engine.behaviour.eof_after = n
        proxy = await start_proxy(self, engine, failover_attempts="0")
        player = await Player.open(self, proxy.stream_url())
        await player.when_ended()
        self.assertTrue(player.clean_end, player.end_reason)
        sent = await read_engine_directly(self, engine, cid(2))
        self.assertEqual(len(sent), n)
        self.assertEqual(len(player.received), n)
        self.assertTrue(bytes(player.received) == sent, "the player's bytes differ from the engine's")
        await within(engine.when(lambda e: e.stop_count == 1))
        self.assertEqual(len(proxy.registry), 0)

    async def test_engine_reset_mid_stream_aborts_the_player_and_stops_the_session(self) -> None:
        """An engine reset cuts the player (no clean end, so it retries) and the session is stopped."""
        engine = sim_engine(self, bitrate=2_000_000)
        engine.behaviour.reset_after = 200 * PACKET_SIZE
        proxy = await start_proxy(self, engine, failover_attempts="0")
        player = await Player.open(self, proxy.stream_url())
        await player.when_ended()
        self.assertGreater(len(player.received), 0)
        self.assertFalse(player.clean_end, "a broken stream must not look finished")
        await within(engine.when(lambda e: e.stop_count == 1 and stopped_and_closed(e)))
        self.assertEqual(len(proxy.registry), 0)


class EngineStartFailsTests(TestCase):
    async def test_playback_error_page_is_502_and_the_session_is_stopped(self) -> None:
        """An engine error page instead of video is a 502 naming its status, never an empty 200."""
        engine = sim_engine(self)
        engine.behaviour.playback_status = 500
        proxy = await start_proxy(self, engine)
        code, text = await get_text(self, proxy.stream_url())
        self.assertEqual(code, 502)
        self.assertIn("500", text)
        await within(engine.when(lambda e: e.stop_count == 1 and not e.active_sessions))
        self.assertEqual(len(proxy.registry), 0)

    async def test_getstream_json_error_is_502_with_the_engine_text(self) -> None:
        """The engine's own error message reaches the player in a 502."""
        engine = sim_engine(self)
        engine.behaviour.json_error = "failed to load content"
        proxy = await start_proxy(self, engine)
        code, text = await get_text(self, proxy.stream_url())
        self.assertEqual(code, 502)
        self.assertIn("failed to load content", text)
        self.assertEqual((len(engine.getstream_calls), engine.sessions, engine.stop_count), (1, {}, 0))
        self.assertEqual(len(proxy.registry), 0)

    async def test_getstream_plain_text_500_is_502(self) -> None:
        """A plain-text engine failure (not JSON) is a 502."""
        engine = sim_engine(self)
        engine.behaviour.getstream_status = 500
        proxy = await start_proxy(self, engine)
        code, text = await get_text(self, proxy.stream_url())
        self.assertEqual(code, 502)
        self.assertIn("500", text)
        self.assertEqual(len(proxy.registry), 0)

    async def test_hanging_getstream_is_504_after_no_response_timeout(self) -> None:
        """An engine that never answers costs the player no_response_timeout, then a 504."""
        engine = sim_engine(self)
        engine.behaviour.json_hang = True
        proxy = await start_proxy(self, engine, no_response_timeout="500ms")
        answer = Deferred.fromCoroutine(get_text(self, proxy.stream_url()))
        await within(engine.when(lambda e: e.pending_answers == 1))  # the engine sits on the getstream...
        self.assertFalse(answer.called)  # ...and the player waits for it
        code, _ = await within(answer, 2)  # (the timeout itself, on a Clock: tests/unit/test_engine.py)
        self.assertEqual(code, 504)
        await within(engine.when(lambda e: e.pending_answers == 0))  # the proxy hung up on it
        self.assertEqual(len(proxy.registry), 0)

    async def test_refused_connection_is_a_quick_502(self) -> None:
        """An engine that is not there is a 502 saying so, at once, not after a timeout."""
        engine = sim_engine(self)
        await within(engine.stop_listening())
        proxy = await start_proxy(self, engine, no_response_timeout="5s")
        code, text = await within(Deferred.fromCoroutine(get_text(self, proxy.stream_url())), 1)
        self.assertEqual(code, 502)
        self.assertIn("refused", text.lower())
        self.assertEqual(len(proxy.registry), 0)


class PlayerBehaviourTests(TestCase):
    async def test_rapid_channel_switching_keeps_status_responsive_and_leaks_nothing(self) -> None:
        """Zapping through 20 channels on a slow engine: status stays fast, every session is stopped."""
        engine = sim_engine(self, bitrate=2_000_000)
        proxy = await start_proxy(self, engine, linger="200ms")
        for n in range(1, 21):
            if n == 16:
                engine.behaviour.json_delay = 0.5  # the engine slows down under the load
            opening = Player.open(self, proxy.stream_url(cid(n)))
            # /ace/status answers within 1 s whatever the engine is doing
            code, doc = await within(Deferred.fromCoroutine(get_json(self, proxy.url("/ace/status"))), 1)
            self.assertEqual(code, 200, f"/ace/status at channel {n}")
            player = await within(opening)
            await player.when_received(PACKET_SIZE)
            await within(player.hang_up())
        await within(engine.when(stopped_and_closed))
        self.assertEqual((len(engine.getstream_calls), engine.stop_count), (20, 20))
        self.assertEqual(len(proxy.registry), 0)

    async def test_player_leaving_during_prebuffer_is_detached_and_the_start_abandoned(self) -> None:
        """A player that gives up while the engine prebuffers frees everything after linger."""
        engine = sim_engine(self, bitrate=2_000_000)
        engine.behaviour.playback_delay = 2
        engine.behaviour.stop_status = 500  # the engine keeps its side open: only the proxy can hang up
        proxy = await start_proxy(self, engine, linger="200ms")
        player = await StalledPlayer.open(self, proxy.port, f"/ace/getstream?id={CID}")
        await within(engine.when(lambda e: e.open_playbacks == 1))  # prebuffering
        session = proxy.registry.get_any()
        await wait_until(lambda: len(session.sinks) == 1, "the player to attach")
        await within(player.hang_up())
        await wait_until(lambda: not session.sinks, "the player to be detached", seconds=0.5)
        # well before the 2 s prebuffer ends: abandoned, not streamed then closed
        await within(engine.when(lambda e: e.stop_count == 1 and e.open_playbacks == 0), 1.5)
        self.assertEqual(engine.last_session.bytes_sent, 0)
        self.assertEqual(len(proxy.registry), 0)

    async def test_player_arriving_during_linger_reuses_the_session(self) -> None:
        """Zapping back within linger is instant: same engine session, no new getstream, no stop."""
        engine = sim_engine(self, bitrate=2_000_000)
        proxy = await start_proxy(self, engine, linger="500ms")
        first = await Player.open(self, proxy.stream_url())
        await first.when_received(PACKET_SIZE)
        session = proxy.registry.get_any()
        await within(first.hang_up())
        await wait_until(lambda: not session.sinks, "the session to linger")
        [linger] = timers_of(session)  # its linger deadline, 500 ms out
        second = await Player.open(self, proxy.stream_url())
        await second.when_received(PACKET_SIZE)
        # The first linger's deadline can no longer end the session: its timer is
        # cancelled and the session, streaming again, has no timer of its own left.
        self.assertTrue(linger.cancelled)
        self.assertEqual((session.state, timers_of(session)), ("streaming", []))
        await second.when_received(len(second.received) + 10 * PACKET_SIZE)
        self.assertIs(proxy.registry.get_any(), session)
        self.assertEqual((len(engine.getstream_calls), engine.stop_count), (1, 0))
        self.assertEqual(engine.open_playbacks, 1)

    async def test_ffprobe_reads_the_proxied_stream_as_mpegts(self) -> None:
        """What a player gets through the proxy is a valid MPEG-TS with video and audio."""
        ffprobe = shutil.which("ffprobe")
        if ffprobe is None:
            self.skipTest("ffprobe not installed")
        engine = sim_engine(self, bitrate=2_000_000)
        proxy = await start_proxy(self, engine)
        want = 2_000_000 // 8 * 2  # about 2 s of stream
        player = await Player.open(self, proxy.stream_url(), limit=want)
        await player.when_received(want)
        probe = await ffprobe_capture(self, bytes(player.received))
        self.assertEqual(probe["format"]["format_name"], "mpegts")
        kinds = {s["codec_type"] for s in probe["streams"]}
        self.assertTrue({"video", "audio"} <= kinds, kinds)


class RequestTests(TestCase):
    async def test_head_answers_without_touching_the_engine(self) -> None:
        """Players probing with HEAD get 200 video/MP2T and start no engine session."""
        engine = sim_engine(self)
        proxy = await start_proxy(self, engine)
        response = await within(http_client(self).head(proxy.stream_url()))
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"video/MP2T"])
        self.assertEqual(engine.getstream_calls, [])
        self.assertEqual(len(proxy.registry), 0)

    async def test_bad_requests_are_rejected_without_touching_the_engine(self) -> None:
        """Malformed requests get acexy's 400 texts, 405 or 404, and cost no engine work."""
        engine = sim_engine(self)
        proxy = await start_proxy(self, engine)
        for path, want in [
            ("/ace/getstream", NO_SELECTOR),
            (f"/ace/getstream?id={CID}&infohash={cid(7)}", MANY_SELECTORS),
            ("/ace/getstream?id=not-hex", "`id` must be 40 hexadecimal characters"),
        ]:
            code, text = await get_text(self, proxy.url(path))
            self.assertEqual((code, want in text), (400, True), (path, text))
        response = await within(http_client(self).post(proxy.stream_url()))
        await within(response.content())
        self.assertEqual(response.code, 405)
        self.assertEqual((await get_text(self, proxy.url("/nope")))[0], 404)
        self.assertEqual((engine.getstream_calls, engine.connections), ([], 0))
        self.assertEqual(len(proxy.registry), 0)

    async def test_engine_urls_are_rewritten_to_the_address_in_use(self) -> None:
        """The engine's self-reported 127.0.0.1:6878 URLs are rewritten to where it really is."""
        engine = sim_engine(self, bitrate=2_000_000)
        self.assertNotEqual(engine.port, engine.advertise_port)
        proxy = await start_proxy(self, engine)
        player = await Player.open(self, proxy.stream_url())
        await player.when_received(10 * PACKET_SIZE)  # the playback URL worked
        code, doc = await get_json(self, proxy.url(f"/ace/status?id={CID}"))
        self.assertEqual(code, 200)
        self.assertTrue(doc["stat_url"].startswith(f"http://127.0.0.1:{engine.port}/ace/stat/"), doc)
        code, stat = await get_json(self, doc["stat_url"])  # and it reaches the engine
        self.assertEqual((code, stat["error"]), (200, None))
