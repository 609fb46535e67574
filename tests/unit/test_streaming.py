"""
Flow control, fan-out, timers and endings of the streaming core, deterministic:
real Klein/HTTPChannel over StringTransport for players, a scripted engine
whose body transport shows pause/resume, MemoryReactorClock for every timer.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from acexy_tw.engine import EngineError, EngineTimeout
from acexy_tw.streaming.mpegts import PACKET_SIZE
from acexy_tw.testing import CID, CID2, InMemoryProxy, ScriptedEngine, key, our_delayed_calls, ts

#: the players' buffer InMemoryProxy gives (64 KiB) and the production
#: high-water mark for it: a blocked player holds back the engine only once
#: this much waits for it (see HighWaterTests)
HIGH_WATER = 64 * 1024 // 4


def past_the_mark(fill: int = 0x11) -> bytes:
    """The fewest whole packets that fill a blocked player's backlog up to the high-water mark."""
    return ts(-(-HIGH_WATER // PACKET_SIZE), fill)


class FanOutTests(SynchronousTestCase):
    def test_bytes_are_forwarded_as_they_arrive(self) -> None:
        p = InMemoryProxy()
        c = p.connect()
        p.engine.response.data(ts(1))  # one packet: nothing waits for a buffer
        self.assertEqual(c.status(), 200)
        self.assertIn(b"content-type: video/MP2T", c.value().lower().replace(b"video/mp2t", b"video/MP2T"))
        self.assertEqual(c.body(), ts(1))

    def test_two_clients_share_one_engine_session(self) -> None:
        p = InMemoryProxy()
        c1, c2 = p.connect(), p.connect()
        self.assertEqual(len(p.engine.starts), 1)
        p.engine.response.data(ts(3))
        self.assertEqual(c1.body(), ts(3))
        self.assertEqual(c2.body(), ts(3))

    def test_hex_case_shares_a_session(self) -> None:
        p = InMemoryProxy()
        p.connect(b"/ace/getstream?id=" + CID.upper().encode())
        p.connect(b"/ace/getstream?content_id=" + CID.encode())
        self.assertEqual(len(p.engine.starts), 1)

    def test_single_flight_while_starting(self) -> None:
        p = InMemoryProxy(ScriptedEngine(auto=False))
        clients = [p.connect() for _ in range(5)]
        self.assertEqual(len(p.engine.starts), 1)
        p.engine.accept(0)
        p.engine.response.data(ts(2))
        for c in clients:
            self.assertEqual(c.body(), ts(2))

    def test_different_contents_get_different_sessions(self) -> None:
        p = InMemoryProxy()
        p.connect()
        p.connect(b"/ace/getstream?id=" + CID2.encode())
        self.assertEqual(len(p.engine.starts), 2)

    def test_output_is_packet_aligned_when_engine_chunks_are_not(self) -> None:
        p = InMemoryProxy()
        c = p.connect()
        data = ts(4)
        p.engine.response.data(data[:100])
        self.assertEqual(c.body(), b"")  # less than a packet: held back
        p.engine.response.data(data[100:500])
        self.assertEqual(c.body(), data[: 2 * PACKET_SIZE])
        p.engine.response.data(data[500:])
        self.assertEqual(c.body(), data)

    def test_late_joiner_starts_at_live_edge_on_a_packet_boundary(self) -> None:
        p = InMemoryProxy()
        first = p.connect()
        data = ts(3, fill=0x22)
        p.engine.response.data(ts(5) + data[:50])  # a partial packet is pending
        late = p.connect()
        p.engine.response.data(data[50:])
        self.assertEqual(late.body(), data)
        self.assertEqual(late.body()[0], 0x47)
        self.assertEqual(first.body(), ts(5) + data)

    def test_leading_garbage_is_skipped_to_the_first_sync(self) -> None:
        p = InMemoryProxy()
        c = p.connect()
        p.engine.response.data(b"\x00garbage" + ts(2))
        self.assertEqual(c.body(), ts(2))


class BackpressureTests(SynchronousTestCase):
    def test_one_client_pauses_and_resumes_the_engine(self) -> None:
        p = InMemoryProxy()
        c = p.connect()
        upstream = p.engine.response.transport
        c.pause()
        p.engine.response.data(past_the_mark())
        self.assertEqual(upstream.producerState, "paused")
        c.resume()
        self.assertEqual(upstream.producerState, "producing")
        self.assertEqual(c.body(), past_the_mark())

    def test_engine_paused_only_while_every_client_is_paused(self) -> None:
        p = InMemoryProxy()
        c1, c2 = p.connect(), p.connect()
        upstream = p.engine.response.transport
        c1.pause()
        p.engine.response.data(past_the_mark(0x01))  # c1 past the mark, c2 takes it all
        self.assertEqual(upstream.producerState, "producing")
        c2.pause()
        p.engine.response.data(past_the_mark(0x02))  # now both
        self.assertEqual(upstream.producerState, "paused")
        c2.resume()
        self.assertEqual(upstream.producerState, "producing")
        self.assertEqual(c2.body(), past_the_mark(0x01) + past_the_mark(0x02))
        self.assertEqual(c1.body(), b"")

    def test_slow_client_backlog_is_flushed_in_order(self) -> None:
        p = InMemoryProxy()
        slow, fast = p.connect(), p.connect()
        slow.pause()
        p.engine.response.data(ts(2, 0x01))
        p.engine.response.data(ts(2, 0x02))
        self.assertEqual(fast.body(), ts(2, 0x01) + ts(2, 0x02))
        self.assertEqual(slow.body(), b"")
        slow.resume()
        self.assertEqual(slow.body(), ts(2, 0x01) + ts(2, 0x02))

    def test_client_over_its_backlog_cap_is_cut_and_others_continue(self) -> None:
        p = InMemoryProxy(buffer_size=10 * PACKET_SIZE)
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
        self.assertEqual(len(p.registry.get(key()).sinks), 1)

    def test_client_stuck_for_too_long_is_cut(self) -> None:
        p = InMemoryProxy(empty_timeout=30)  # a player may be stuck as long as an engine may be silent
        c = p.connect()
        p.engine.response.data(ts(1))
        c.pause()
        for _ in range(29):  # the engine keeps sending: only the player is stuck
            p.clock.advance(1)
            p.engine.response.data(ts(1))
        self.assertFalse(c.aborted)
        p.clock.advance(1)
        self.assertTrue(c.aborted)
        self.assertEqual(p.metrics.clients_cut, 1)
        self.assertEqual(p.registry.get(key()).state, "lingering")  # the engine session outlives it

    def test_pause_is_idempotent(self) -> None:
        p = InMemoryProxy()
        c1, c2 = p.connect(), p.connect()
        upstream = p.engine.response.transport
        for _ in range(3):
            c1.pause()
        c2.pause()
        p.engine.response.data(past_the_mark())
        for _ in range(3):
            c1.pause()
        self.assertEqual(upstream.producerState, "paused")
        c2.resume()  # one of two players flowing again: the engine flows, however often c1 was paused
        self.assertEqual(upstream.producerState, "producing")


class TimerTests(SynchronousTestCase):
    def test_empty_timeout_ends_the_stream_cleanly(self) -> None:
        p = InMemoryProxy(empty_timeout=10)
        c = p.connect()
        p.engine.response.data(ts(1))
        p.clock.advance(9)
        self.assertFalse(c.finished_cleanly())
        p.clock.advance(1)
        self.assertTrue(c.finished_cleanly())
        self.assertEqual(p.registry.stopped, {"empty_timeout": 1})
        self.assertEqual(p.engine.response.transport.producerState, "stopped")
        self.assertEqual(len(p.engine.stops), 1)

    def test_data_resets_the_empty_timeout(self) -> None:
        p = InMemoryProxy(empty_timeout=10)
        c = p.connect()
        for _ in range(5):
            p.clock.advance(8)
            p.engine.response.data(ts(1))
        self.assertFalse(c.finished_cleanly())
        self.assertEqual(p.registry.stopped, {})

    def test_empty_timeout_does_not_count_time_we_paused_the_engine(self) -> None:
        # The player's stuck timeout is the empty timeout too: it can hold the
        # engine back for just under it, and that time is not the engine's silence.
        p = InMemoryProxy(empty_timeout=10)
        c = p.connect()
        upstream = p.engine.response.transport
        p.engine.response.data(ts(1))
        c.pause()
        p.engine.response.data(past_the_mark())  # t=0: the last byte before we hold the engine back
        self.assertEqual(upstream.producerState, "paused")
        p.clock.advance(9.9)
        self.assertFalse(c.aborted)
        c.resume()  # t=9.9: the engine may send again; its silence starts now
        self.assertEqual(upstream.producerState, "producing")
        p.clock.advance(9)  # t=18.9: 18.9 s since its last byte, 9 s of them its own
        self.assertEqual(p.registry.stopped, {})
        p.clock.advance(1.5)
        self.assertEqual(p.registry.stopped, {"empty_timeout": 1})
        self.assertTrue(c.finished_cleanly())

    def test_stall_before_first_byte_is_504(self) -> None:
        p = InMemoryProxy(empty_timeout=10)
        c = p.connect()
        p.clock.advance(10)
        self.assertEqual(c.status(), 504)

    def test_linger_keeps_the_session_then_stops_it(self) -> None:
        p = InMemoryProxy(linger=5)
        c = p.connect()
        p.engine.response.data(ts(1))
        c.disconnect()
        self.assertEqual(p.engine.stops, [])
        p.clock.advance(4.9)
        self.assertEqual(p.engine.stops, [])
        self.assertIsNotNone(p.registry.get(key()))
        p.clock.advance(0.1)
        self.assertEqual(len(p.engine.stops), 1)
        self.assertEqual(p.engine.response.transport.producerState, "stopped")
        self.assertIsNone(p.registry.get(key()))
        self.assertEqual(p.registry.stopped, {"client_disconnected": 1})
        self.assertEqual(our_delayed_calls(p.clock), [])

    def test_client_arriving_during_linger_reuses_the_session(self) -> None:
        p = InMemoryProxy(linger=5)
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
        p = InMemoryProxy(linger=0)
        p.engine.stop_result = Deferred()  # the engine never answers stop
        c = p.connect()
        p.engine.response.data(ts(1))
        c.disconnect()
        self.assertEqual(len(p.engine.stops), 1)
        self.assertEqual(p.engine.response.transport.producerState, "stopped")

    def test_connection_closed_even_when_stop_fails(self) -> None:
        p = InMemoryProxy(linger=0)
        failing: Deferred = Deferred()
        p.engine.stop_result = failing
        c = p.connect()
        p.engine.response.data(ts(1))
        c.disconnect()
        failing.errback(EngineError("stop refused"))  # logged, not raised
        self.assertEqual(p.engine.response.transport.producerState, "stopped")


class DisconnectTests(SynchronousTestCase):
    def test_client_leaving_while_engine_is_silent_is_detached_at_once(self) -> None:
        p = InMemoryProxy()
        c1, c2 = p.connect(), p.connect()
        c1.disconnect()
        session = p.registry.get(key())
        self.assertEqual(len(session.sinks), 1)
        p.engine.response.data(ts(1))
        self.assertEqual(c2.body(), ts(1))

    def test_client_leaving_before_the_engine_answers(self) -> None:
        p = InMemoryProxy(ScriptedEngine(auto=False), linger=5)
        c = p.connect()
        c.disconnect()
        self.assertEqual(len(p.registry.get(key()).sinks), 0)
        p.clock.advance(5)  # nobody came back: the start is abandoned
        self.assertIsNone(p.registry.get(key()))
        self.assertEqual(our_delayed_calls(p.clock), [])

    def test_one_leaves_other_continues(self) -> None:
        p = InMemoryProxy()
        c1, c2 = p.connect(), p.connect()
        p.engine.response.data(ts(1))
        c1.disconnect()
        p.engine.response.data(ts(1, 0x55))
        self.assertEqual(c2.body(), ts(1) + ts(1, 0x55))
        self.assertEqual(p.engine.stops, [])


class EndingTests(SynchronousTestCase):
    def test_engine_error_before_first_byte_is_502_with_its_text(self) -> None:
        p = InMemoryProxy(ScriptedEngine(auto=False))
        c1, c2 = p.connect(), p.connect()
        p.engine.fail_start(EngineError("engine error: no such content"))
        for c in (c1, c2):
            self.assertEqual(c.status(), 502)
            self.assertIn(b"no such content", c.value())
        self.assertIsNone(p.registry.get(key()))

    def test_engine_timeout_is_504(self) -> None:
        p = InMemoryProxy(ScriptedEngine(auto=False))
        c = p.connect()
        p.engine.fail_start(EngineTimeout("engine did not answer getstream within 10s"))
        self.assertEqual(c.status(), 504)

    def test_eof_before_any_byte_is_502_not_an_empty_200(self) -> None:
        p = InMemoryProxy()
        c = p.connect()
        p.engine.response.eof()
        self.assertEqual(c.status(), 502)

    def test_eof_delivers_every_byte_then_a_clean_end(self) -> None:
        p = InMemoryProxy()
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
        p = InMemoryProxy()
        c = p.connect()
        p.engine.response.data(ts(2))
        p.engine.response.reset()
        self.assertTrue(c.aborted)
        self.assertEqual(p.registry.stopped, {"engine_error": 1})
        self.assertEqual(len(p.engine.stops), 1)

    def test_new_request_after_close_starts_a_new_session(self) -> None:
        p = InMemoryProxy()
        p.connect()
        p.engine.response.eof()
        p.connect()
        self.assertEqual(len(p.engine.starts), 2)

    def test_shutdown_ends_everything_and_refuses_new_players(self) -> None:
        p = InMemoryProxy()
        c = p.connect()
        p.engine.response.data(ts(1))
        d = p.registry.shutdown()
        self.successResultOf(d)
        self.assertTrue(c.finished_cleanly())
        self.assertEqual(len(p.engine.stops), 1)
        late = p.connect()
        self.assertEqual(late.status(), 503)
        self.assertEqual(our_delayed_calls(p.clock), [])


class HighWaterTests(SynchronousTestCase):
    """A blocked player holds back the engine only once its backlog passes
    the high-water mark (a quarter of the buffer, at most 256 KiB), and
    releases it below a quarter of that: reads and writes overlap instead of
    alternating."""

    def test_a_blocked_player_pauses_the_engine_only_past_the_mark(self) -> None:
        p = InMemoryProxy(buffer_size=80 * PACKET_SIZE)  # the mark: 20 packets
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
        p = InMemoryProxy(buffer_size=40 * PACKET_SIZE)  # the mark: 10 packets
        slow, fast = p.connect(), p.connect()
        slow.pause()
        for _ in range(4):
            p.engine.response.data(ts(10))
        self.assertFalse(slow.aborted)  # 40 packets wait: at the cap, not over it
        p.engine.response.data(ts(10))
        self.assertTrue(slow.aborted)
        self.assertEqual(fast.body(), ts(10) * 5)

    def test_the_mark_is_a_quarter_of_the_buffer_at_most_256k(self) -> None:
        marks = [
            (p.config.buffer_size, p.web._high_water)
            for p in (InMemoryProxy(buffer_size=64 * 1024), InMemoryProxy(buffer_size="4MiB"))
        ]
        self.assertEqual(marks, [(64 * 1024, 16 * 1024), (4 * 1024 * 1024, 256 * 1024)])
        self.assertEqual(HIGH_WATER, InMemoryProxy().web._high_water)  # the mark the tests above use
