"""
Flow control, fan-out, timers and endings of the streaming core, deterministic:
real Klein/HTTPChannel over StringTransport for players, a scripted engine
whose body transport shows pause/resume, MemoryReactorClock for every timer.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from acexy_tw.engine import EngineTimeout
from acexy_tw.streaming.mpegts import PACKET_SIZE
from tests.unit.fakes import CID, CID2, Proxy, ScriptedEngine, engine_error, our_delayed_calls, ts


class FanOutTests(SynchronousTestCase):
    def test_bytes_are_forwarded_as_they_arrive(self) -> None:
        p = Proxy()
        c = p.connect()
        p.engine.response.data(ts(1))  # one packet: nothing waits for a buffer
        self.assertEqual(c.status(), 200)
        self.assertIn(b"content-type: video/MP2T", c.value().lower().replace(b"video/mp2t", b"video/MP2T"))
        self.assertEqual(c.body(), ts(1))

    def test_two_clients_share_one_engine_session(self) -> None:
        p = Proxy()
        c1, c2 = p.connect(), p.connect()
        self.assertEqual(len(p.engine.starts), 1)
        p.engine.response.data(ts(3))
        self.assertEqual(c1.body(), ts(3))
        self.assertEqual(c2.body(), ts(3))

    def test_hex_case_shares_a_session(self) -> None:
        p = Proxy()
        p.connect(b"/ace/getstream?id=" + CID.upper().encode())
        p.connect(b"/ace/getstream?content_id=" + CID.encode())
        self.assertEqual(len(p.engine.starts), 1)

    def test_single_flight_while_starting(self) -> None:
        p = Proxy(ScriptedEngine(auto=False))
        clients = [p.connect() for _ in range(5)]
        self.assertEqual(len(p.engine.starts), 1)
        key, d = p.engine.starts[0]
        d.callback(_info(key))
        p.engine.answer_playback()
        p.engine.response.data(ts(2))
        for c in clients:
            self.assertEqual(c.body(), ts(2))

    def test_different_contents_get_different_sessions(self) -> None:
        p = Proxy()
        p.connect()
        p.connect(b"/ace/getstream?id=" + CID2.encode())
        self.assertEqual(len(p.engine.starts), 2)

    def test_output_is_packet_aligned_when_engine_chunks_are_not(self) -> None:
        p = Proxy()
        c = p.connect()
        data = ts(4)
        p.engine.response.data(data[:100])
        self.assertEqual(c.body(), b"")  # less than a packet: held back
        p.engine.response.data(data[100:500])
        self.assertEqual(c.body(), data[: 2 * PACKET_SIZE])
        p.engine.response.data(data[500:])
        self.assertEqual(c.body(), data)

    def test_late_joiner_starts_at_live_edge_on_a_packet_boundary(self) -> None:
        p = Proxy()
        first = p.connect()
        data = ts(3, fill=0x22)
        p.engine.response.data(ts(5) + data[:50])  # a partial packet is pending
        late = p.connect()
        p.engine.response.data(data[50:])
        self.assertEqual(late.body(), data)
        self.assertEqual(late.body()[0], 0x47)
        self.assertEqual(first.body(), ts(5) + data)

    def test_leading_garbage_is_skipped_to_the_first_sync(self) -> None:
        p = Proxy()
        c = p.connect()
        p.engine.response.data(b"\x00garbage" + ts(2))
        self.assertEqual(c.body(), ts(2))


class BackpressureTests(SynchronousTestCase):
    def test_one_client_pauses_and_resumes_the_engine(self) -> None:
        p = Proxy()
        c = p.connect()
        upstream = p.engine.response.transport
        c.pause()
        self.assertEqual(upstream.producerState, "paused")
        c.resume()
        self.assertEqual(upstream.producerState, "producing")

    def test_engine_paused_only_while_every_client_is_paused(self) -> None:
        p = Proxy()
        c1, c2 = p.connect(), p.connect()
        upstream = p.engine.response.transport
        c1.pause()
        self.assertEqual(upstream.producerState, "producing")
        c2.pause()
        self.assertEqual(upstream.producerState, "paused")
        c2.resume()
        self.assertEqual(upstream.producerState, "producing")

    def test_slow_client_backlog_is_flushed_in_order(self) -> None:
        p = Proxy()
        slow, fast = p.connect(), p.connect()
        slow.pause()
        p.engine.response.data(ts(2, 0x01))
        p.engine.response.data(ts(2, 0x02))
        self.assertEqual(fast.body(), ts(2, 0x01) + ts(2, 0x02))
        self.assertEqual(slow.body(), b"")
        slow.resume()
        self.assertEqual(slow.body(), ts(2, 0x01) + ts(2, 0x02))

    def test_client_over_its_backlog_cap_is_cut_and_others_continue(self) -> None:
        p = Proxy(buffer_size=10 * PACKET_SIZE)
        slow, fast = p.connect(), p.connect()
        p.engine.response.data(ts(1))
        slow.pause()
        p.engine.response.data(ts(6))
        self.assertFalse(slow.aborted)
        p.engine.response.data(ts(6))  # 12 packets queued > 10
        self.assertTrue(slow.aborted)
        slow.disconnect()
        self.assertEqual(p.engine.response.transport.producerState, "producing")
        p.engine.response.data(ts(1, 0x33))
        self.assertEqual(fast.body(), ts(1) + ts(12) + ts(1, 0x33))
        self.assertEqual(len(p.registry.get(_key()).sinks), 1)

    def test_client_stuck_for_too_long_is_cut(self) -> None:
        p = Proxy(stuck_timeout=30)
        c = p.connect()
        p.engine.response.data(ts(1))
        c.pause()
        p.clock.advance(29)
        self.assertFalse(c.aborted)
        p.clock.advance(1)
        self.assertTrue(c.aborted)

    def test_pause_is_idempotent(self) -> None:
        p = Proxy()
        c1, c2 = p.connect(), p.connect()
        for _ in range(3):
            c1.pause()
        c2.pause()
        c2.resume()
        self.assertEqual(p.engine.response.transport.producerState, "producing")


class TimerTests(SynchronousTestCase):
    def test_empty_timeout_ends_the_stream_cleanly(self) -> None:
        p = Proxy(empty_timeout=10)
        c = p.connect()
        p.engine.response.data(ts(1))
        p.clock.advance(9)
        self.assertFalse(c.finished_cleanly())
        p.clock.advance(1)
        self.assertTrue(c.finished_cleanly())
        self.assertEqual(p.closed[-1][1], "empty_timeout")
        self.assertEqual(p.engine.response.transport.producerState, "stopped")
        self.assertEqual(len(p.engine.stops), 1)

    def test_data_resets_the_empty_timeout(self) -> None:
        p = Proxy(empty_timeout=10)
        c = p.connect()
        for _ in range(5):
            p.clock.advance(8)
            p.engine.response.data(ts(1))
        self.assertFalse(c.finished_cleanly())
        self.assertEqual(p.closed, [])

    def test_empty_timeout_does_not_count_time_we_paused_the_engine(self) -> None:
        p = Proxy(empty_timeout=10, stuck_timeout=0)
        c = p.connect()
        p.engine.response.data(ts(1))
        c.pause()
        p.clock.advance(100)  # we hold the engine back: not its silence
        self.assertEqual(p.closed, [])
        c.resume()
        p.clock.advance(9)
        self.assertEqual(p.closed, [])
        p.clock.advance(1.5)
        self.assertEqual(p.closed[-1][1], "empty_timeout")

    def test_stall_before_first_byte_is_504(self) -> None:
        p = Proxy(empty_timeout=10)
        c = p.connect()
        p.clock.advance(10)
        self.assertEqual(c.status(), 504)

    def test_linger_keeps_the_session_then_stops_it(self) -> None:
        p = Proxy(linger=5)
        c = p.connect()
        p.engine.response.data(ts(1))
        c.disconnect()
        self.assertEqual(p.engine.stops, [])
        p.clock.advance(4.9)
        self.assertEqual(p.engine.stops, [])
        self.assertIsNotNone(p.registry.get(_key()))
        p.clock.advance(0.1)
        self.assertEqual(len(p.engine.stops), 1)
        self.assertEqual(p.engine.response.transport.producerState, "stopped")
        self.assertIsNone(p.registry.get(_key()))
        self.assertEqual(p.closed[-1][1], "client_disconnected")
        self.assertEqual(our_delayed_calls(p.clock), [])

    def test_client_arriving_during_linger_reuses_the_session(self) -> None:
        p = Proxy(linger=5)
        c = p.connect()
        p.engine.response.data(ts(1))
        c.disconnect()
        p.clock.advance(3)
        again = p.connect()
        p.clock.advance(10)
        self.assertEqual(len(p.engine.starts), 1)
        self.assertEqual(p.engine.stops, [])
        p.engine.response.data(ts(1, 0x44))
        self.assertEqual(again.body(), ts(1, 0x44))

    def test_connection_closed_even_when_stop_hangs(self) -> None:
        p = Proxy(linger=0)
        p.engine.stop_result = Deferred()  # the engine never answers stop
        c = p.connect()
        p.engine.response.data(ts(1))
        c.disconnect()
        self.assertEqual(len(p.engine.stops), 1)
        self.assertEqual(p.engine.response.transport.producerState, "stopped")

    def test_connection_closed_even_when_stop_fails(self) -> None:
        p = Proxy(linger=0)
        failing: Deferred = Deferred()
        p.engine.stop_result = failing
        c = p.connect()
        p.engine.response.data(ts(1))
        c.disconnect()
        failing.errback(engine_error("stop refused"))  # logged, not raised
        self.assertEqual(p.engine.response.transport.producerState, "stopped")


class DisconnectTests(SynchronousTestCase):
    def test_client_leaving_while_engine_is_silent_is_detached_at_once(self) -> None:
        p = Proxy()
        c1, c2 = p.connect(), p.connect()
        c1.disconnect()
        session = p.registry.get(_key())
        self.assertEqual(len(session.sinks), 1)
        p.engine.response.data(ts(1))
        self.assertEqual(c2.body(), ts(1))

    def test_client_leaving_before_the_engine_answers(self) -> None:
        p = Proxy(ScriptedEngine(auto=False), linger=5)
        c = p.connect()
        c.disconnect()
        self.assertEqual(len(p.registry.get(_key()).sinks), 0)
        p.clock.advance(5)  # nobody came back: the start is abandoned
        self.assertIsNone(p.registry.get(_key()))
        self.assertEqual(our_delayed_calls(p.clock), [])

    def test_one_leaves_other_continues(self) -> None:
        p = Proxy()
        c1, c2 = p.connect(), p.connect()
        p.engine.response.data(ts(1))
        c1.disconnect()
        p.engine.response.data(ts(1, 0x55))
        self.assertEqual(c2.body(), ts(1) + ts(1, 0x55))
        self.assertEqual(p.engine.stops, [])


class EndingTests(SynchronousTestCase):
    def test_engine_error_before_first_byte_is_502_with_its_text(self) -> None:
        p = Proxy(ScriptedEngine(auto=False))
        c1, c2 = p.connect(), p.connect()
        p.engine.fail_start(engine_error("engine error: no such content"))
        for c in (c1, c2):
            self.assertEqual(c.status(), 502)
            self.assertIn(b"no such content", c.value())
        self.assertIsNone(p.registry.get(_key()))

    def test_engine_timeout_is_504(self) -> None:
        p = Proxy(ScriptedEngine(auto=False))
        c = p.connect()
        p.engine.fail_start(EngineTimeout("engine did not answer getstream within 10s"))
        self.assertEqual(c.status(), 504)

    def test_eof_before_any_byte_is_502_not_an_empty_200(self) -> None:
        p = Proxy()
        c = p.connect()
        p.engine.response.eof()
        self.assertEqual(c.status(), 502)

    def test_eof_delivers_every_byte_then_a_clean_end(self) -> None:
        p = Proxy()
        slow, fast = p.connect(), p.connect()
        slow.pause()
        p.engine.response.data(ts(7) + b"\x47tail")
        p.engine.response.eof()
        self.assertEqual(fast.body(), ts(7) + b"\x47tail")
        self.assertTrue(fast.finished_cleanly())
        self.assertEqual(slow.body(), ts(7) + b"\x47tail")  # backlog flushed at the end
        self.assertTrue(slow.finished_cleanly())
        self.assertEqual(len(p.engine.stops), 1)

    def test_engine_reset_mid_stream_aborts_clients(self) -> None:
        p = Proxy()
        c = p.connect()
        p.engine.response.data(ts(2))
        p.engine.response.reset()
        self.assertTrue(c.aborted)
        self.assertEqual(p.closed[-1][1], "engine_error")
        self.assertEqual(len(p.engine.stops), 1)

    def test_new_request_after_close_starts_a_new_session(self) -> None:
        p = Proxy()
        p.connect()
        p.engine.response.eof()
        p.connect()
        self.assertEqual(len(p.engine.starts), 2)

    def test_shutdown_ends_everything_and_refuses_new_players(self) -> None:
        p = Proxy()
        c = p.connect()
        p.engine.response.data(ts(1))
        d = p.registry.shutdown()
        self.successResultOf(d)
        self.assertTrue(c.finished_cleanly())
        self.assertEqual(len(p.engine.stops), 1)
        late = p.connect()
        self.assertEqual(late.status(), 503)
        self.assertEqual(our_delayed_calls(p.clock), [])


def _key():
    from acexy_tw.content import ContentKey

    return ContentKey("content_id", CID)


def _info(key):
    from acexy_tw.engine import PlaybackInfo

    return PlaybackInfo(
        playback_url="http://engine:6878/ace/r/x/0",
        stat_url="http://engine:6878/ace/stat/x/0",
        command_url="http://engine:6878/ace/cmd/x/0",
        infohash=key.value,
        playback_session_id="0" * 40,
        is_live=1,
    )


class HighWaterTests(SynchronousTestCase):
    """With a high-water mark (as in production), a blocked player holds back
    the engine only once its backlog passes the mark, and releases it below a
    quarter of it: reads and writes overlap instead of alternating."""

    def test_a_blocked_player_pauses_the_engine_only_past_the_mark(self) -> None:
        p = Proxy(buffer_size=100 * PACKET_SIZE, high_water=20 * PACKET_SIZE)
        c = p.connect()
        upstream = p.engine.response.transport
        c.pause()  # the socket is full: blocked, but the engine keeps flowing
        self.assertEqual(upstream.producerState, "producing")
        p.engine.response.data(ts(19))
        self.assertEqual(upstream.producerState, "producing")
        p.engine.response.data(ts(1))  # 20 packets waiting: now the engine is held back
        self.assertEqual(upstream.producerState, "paused")
        c.resume()  # drained: the engine flows again
        self.assertEqual(upstream.producerState, "producing")
        self.assertEqual(c.body(), ts(20))

    def test_the_cap_still_cuts_a_player_that_never_drains(self) -> None:
        p = Proxy(buffer_size=30 * PACKET_SIZE, high_water=10 * PACKET_SIZE)
        slow, fast = p.connect(), p.connect()
        slow.pause()
        for _ in range(4):
            p.engine.response.data(ts(10))
        self.assertTrue(slow.aborted)
        self.assertEqual(fast.body(), ts(10) * 4)

    def test_the_app_default_mark_is_a_quarter_of_the_buffer_at_most_256k(self) -> None:
        from acexy_tw.web.app import ProxyApp

        from twisted.internet.task import Clock

        small = ProxyApp(None, Clock(), buffer_size=64 * 1024, stuck_timeout=60)
        big = ProxyApp(None, Clock(), buffer_size=4 * 1024 * 1024, stuck_timeout=60)
        self.assertEqual((small._high_water, big._high_water), (16 * 1024, 256 * 1024))
