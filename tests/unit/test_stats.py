"""Live stats (issue #13, points 3 and 4): the stat_url poller, the bitrate meters
and the 10-minute history, on a Clock."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from acexy_tw.engine import EngineError
from acexy_tw.stats import HISTORY_SPAN, TIMER_NAMES, History, RateMeter, SessionStats
from acexy_tw.streaming.session import EngineSession
from acexy_tw.testing import CID, InMemoryProxy, our_delayed_calls, ts


def stats_timers(clock: Any) -> list:
    names = []
    for call in our_delayed_calls(clock):
        func = getattr(call.func, "f", call.func)
        if getattr(func, "__name__", None) in TIMER_NAMES:
            names.append(func.__name__)
    return sorted(names)


def session(p: InMemoryProxy) -> EngineSession:
    [s] = list(p.registry)
    return s


class RateMeterTests(SynchronousTestCase):
    def test_nothing_before_two_samples(self) -> None:
        m = RateMeter()
        self.assertEqual(m.bits_per_second, 0)
        m.sample(1000)
        self.assertEqual(m.bits_per_second, 0)

    def test_mean_over_the_seconds_sampled_then_over_the_last_ten(self) -> None:
        m = RateMeter()
        total = 0
        m.sample(total)
        for n in (100, 300):
            total += n
            m.sample(total)
        self.assertEqual(m.bits_per_second, (100 + 300) * 8 // 2)
        for n in range(1, 13):  # 12 more seconds: only the last 10 count
            total += n * 1000
            m.sample(total)
        self.assertEqual(m.bits_per_second, sum(n * 1000 for n in range(3, 13)) * 8 // 10)


class SessionStatsTests(SynchronousTestCase):
    """The object alone: fetch and counters are plain callables."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.asked: list[Deferred] = []
        self.stats = SessionStats(self.clock, 5.0, self.fetch, lambda: (0, 0))

    def fetch(self) -> Deferred:
        d: Deferred = Deferred()
        self.asked.append(d)
        return d

    def test_a_fetch_that_raises_is_a_counted_failure(self) -> None:
        def broken() -> Deferred:
            raise RuntimeError("boom")

        stats = SessionStats(self.clock, 1.0, broken, lambda: (0, 0))
        stats.start()
        self.clock.advance(1)
        self.clock.advance(1)
        self.assertEqual(stats.failures, 3)
        self.assertEqual(stats.last_error, "boom")
        stats.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_cancels_the_request_in_flight_and_every_timer(self) -> None:
        self.stats.start()
        self.assertEqual(len(self.asked), 1)
        self.stats.stop()
        self.assertTrue(self.asked[0].called)  # cancelled; its CancelledError is handled
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.stats.failures, 0)  # our own cancel is no failure
        self.stats.stop()  # idempotent

    def test_interval_zero_never_asks(self) -> None:
        stats = SessionStats(self.clock, 0, self.fetch, lambda: (0, 0))
        stats.start()
        self.clock.advance(30)
        self.assertEqual(self.asked, [])
        stats.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class SessionPollingTests(SynchronousTestCase):
    """Through the whole proxy (InMemoryProxy, ScriptedEngine.stat)."""

    def test_polled_every_interval_while_streaming(self) -> None:
        p = InMemoryProxy(stats_interval=5)
        p.connect()
        s = session(p)
        self.assertEqual(s.state, EngineSession.STREAMING)
        self.assertEqual(len(p.engine.stats), 1)  # at once
        self.assertEqual(p.engine.stats[0][0].stat_url, s.info.stat_url)
        for n in range(2, 6):
            p.clock.advance(4.9)
            self.assertEqual(len(p.engine.stats), n - 1)
            p.clock.advance(0.1)
            self.assertEqual(len(p.engine.stats), n)
            p.engine.response.data(ts(1))  # data keeps the engine's watchdog quiet
        d = s.describe()
        self.assertEqual(
            {k: d[k] for k in ("status", "peers", "speed_down", "speed_up", "downloaded")},
            {"status": "dl", "peers": 4, "speed_down": 257, "speed_up": 29, "downloaded": 3276800},
        )
        self.assertEqual((d["stat_polls"], d["stat_failures"]), (5, 0))

    def test_nothing_known_before_the_first_answer(self) -> None:
        p = InMemoryProxy(stats_interval=5)
        p.engine.stat_answer = None  # hangs
        p.connect()
        d = session(p).describe()
        self.assertEqual([d[k] for k in ("status", "peers", "speed_down", "speed_up", "downloaded")], [None] * 5)
        self.assertEqual((d["bitrate_in"], d["bitrate_out"]), (0, 0))

    def test_one_request_in_flight_when_the_engine_hangs(self) -> None:
        p = InMemoryProxy(stats_interval=5)
        p.engine.stat_answer = None
        p.connect()
        s = session(p)
        for _ in range(6):
            p.clock.advance(5)
            p.engine.response.data(ts(1))
        self.assertEqual(len(p.engine.stats), 1)
        self.assertEqual(s.stats.skipped, 6)
        p.engine.stats[0][1].callback({"response": {"status": "prebuf", "peers": 1}, "error": None})
        self.assertEqual((s.describe()["status"], s.describe()["peers"]), ("prebuf", 1))
        p.clock.advance(5)  # the next tick asks again
        self.assertEqual(len(p.engine.stats), 2)

    def test_failures_are_counted_and_never_fatal(self) -> None:
        p = InMemoryProxy(stats_interval=5)
        p.engine.stat_error = EngineError("engine stat answered 500")
        c = p.connect()
        s = session(p)
        for i in range(3):
            p.clock.advance(5)
            p.engine.response.data(ts(1, i))
        self.assertEqual((s.stats.polls, s.stats.failures), (4, 4))
        p.engine.stat_error = None
        p.engine.stat_answer = {"response": None, "error": "unknown playback session id"}
        p.clock.advance(5)
        self.assertEqual(s.stats.failures, 5)
        self.assertEqual(s.stats.last_error, "unknown playback session id")
        self.assertEqual(s.state, EngineSession.STREAMING)
        self.assertEqual(c.body(), b"".join(ts(1, i) for i in range(3)))
        self.assertFalse(c.aborted)

    def test_lingering_still_polls_and_close_leaves_no_delayed_call(self) -> None:
        p = InMemoryProxy(stats_interval=2, linger=5)
        p.engine.stat_answer = None  # a request hangs across the close
        c = p.connect()
        s = session(p)
        c.disconnect()
        self.assertEqual(s.state, EngineSession.LINGERING)
        self.assertEqual(stats_timers(p.clock), sorted(TIMER_NAMES))
        p.clock.advance(5)
        self.assertTrue(s.closed)
        self.assertEqual(our_delayed_calls(p.clock), [])
        self.assertTrue(p.engine.stats[0][1].called)  # cancelled
        self.assertEqual(s.stats.failures, 0)
        p.clock.advance(60)
        self.assertEqual(len(p.engine.stats), 1)

    def test_engine_eof_stops_polling(self) -> None:
        p = InMemoryProxy(stats_interval=5)
        p.connect()
        s = session(p)
        p.engine.response.eof()
        self.assertTrue(s.closed)
        self.assertEqual(our_delayed_calls(p.clock), [])
        p.clock.advance(60)
        self.assertEqual(len(p.engine.stats), 1)

    def test_failover_stops_polling_the_dead_engine_and_polls_the_new_one(self) -> None:
        p = InMemoryProxy(stats_interval=5, failover_attempts=1)
        p.connect()
        s = session(p)
        p.engine.auto = False
        p.engine.response.reset()
        self.assertEqual(s.state, EngineSession.RECOVERING)
        self.assertEqual(stats_timers(p.clock), [])
        p.clock.advance(20)
        self.assertEqual(len(p.engine.stats), 1)
        p.engine.accept()
        self.assertEqual(s.state, EngineSession.STREAMING)
        self.assertEqual(len(p.engine.stats), 2)
        self.assertEqual(p.engine.stats[1][0], s.info)


class BitrateTests(SynchronousTestCase):
    def test_bitrates_are_exact_for_a_scripted_byte_pattern(self) -> None:
        p = InMemoryProxy(stats_interval=5)
        p.connect()
        p.connect()  # two players: bytes out = 2 x bytes in
        s = session(p)
        pattern = [10, 0, 5, 20, 1, 1, 3, 8, 2, 4, 7, 6]  # packets per second, 12 s
        for n in pattern[:3]:
            if n:
                p.engine.response.data(ts(n))
            p.clock.advance(1)
        d = s.describe()
        self.assertEqual(d["bitrate_in"], round(sum(pattern[:3]) * 188 * 8 / 3))
        self.assertEqual(d["bitrate_out"], round(2 * sum(pattern[:3]) * 188 * 8 / 3))
        for n in pattern[3:]:
            p.engine.response.data(ts(n))
            p.clock.advance(1)
        d = s.describe()
        self.assertEqual(d["bitrate_in"], round(sum(pattern[-10:]) * 188 * 8 / 10))
        self.assertEqual(d["bitrate_out"], 2 * d["bitrate_in"])


class StatusAndMetricsTests(SynchronousTestCase):
    def test_status_and_session_list_carry_the_stats(self) -> None:
        p = InMemoryProxy(stats_interval=5)
        p.connect()
        p.engine.response.data(ts(5))
        p.clock.advance(1)
        one = json.loads(p.connect(b"/ace/status?id=" + CID.encode()).body())
        listed = json.loads(p.connect(b"/ace/status").body())["sessions"][0]
        for doc in (one, listed):
            self.assertEqual((doc["peers"], doc["speed_down"], doc["speed_up"]), (4, 257, 29))
            self.assertEqual((doc["downloaded"], doc["status"]), (3276800, "dl"))
            self.assertEqual(doc["bitrate_in"], 5 * 188 * 8)
            self.assertEqual(doc["bitrate_out"], 5 * 188 * 8)

    def test_metrics(self) -> None:
        p = InMemoryProxy(stats_interval=5)
        c = p.connect()
        p.engine.response.data(ts(5))
        page = p.connect(b"/metrics").body().decode()
        stream = str(session(p).key)
        self.assertIn(f'acexy_engine_peers{{stream="{stream}"}} 4.0', page)
        self.assertIn(f'acexy_engine_speed_down_kib{{stream="{stream}"}} 257.0', page)
        self.assertIn(f"acexy_engine_bytes_received_total {5 * 188}.0", page)
        c.disconnect()
        p.clock.advance(60)  # closed: its bytes still counted, its gauges gone
        page = p.connect(b"/metrics").body().decode()
        self.assertIn(f"acexy_engine_bytes_received_total {5 * 188}.0", page)
        self.assertNotIn("acexy_engine_peers{", page)


class HistoryTests(SynchronousTestCase):
    def test_one_sample_per_step_from_once_a_second_offers(self) -> None:
        h = History(5)
        for t in range(0, 21):
            h.offer(float(t), t * 100, t * 200, t)
        self.assertEqual(
            h.describe(20.0),
            [[20.0, 0, 0, 0], [15.0, 500, 1000, 5], [10.0, 1000, 2000, 10], [5.0, 1500, 3000, 15], [0.0, 2000, 4000, 20]],
        )

    def test_bounded_to_the_last_ten_minutes_whatever_the_uptime(self) -> None:
        for step in (1, 5, 7.5, 30):
            h = History(step)
            for t in range(0, 3 * 24 * 3600, 1):  # three days of once-a-second offers
                h.offer(float(t), 1, 1, None)
            samples = h.describe(3 * 24 * 3600 - 1.0)
            self.assertLessEqual(len(samples), -(-HISTORY_SPAN // step))
            self.assertLessEqual(max(s[0] for s in samples), HISTORY_SPAN)
            self.assertLessEqual(min(s[0] for s in samples), step)

    def test_samples_older_than_the_span_are_not_shown_after_a_pause(self) -> None:
        h = History(5)
        h.offer(0.0, 1, 1, 1)
        h.offer(5.0, 2, 2, 2)
        self.assertEqual(h.describe(604.0), [[599.0, 2, 2, 2]])

    def test_a_step_below_a_second_is_a_second(self) -> None:
        self.assertEqual(History(0.3).step, 1.0)


class SessionHistoryTests(SynchronousTestCase):
    def test_one_sample_per_stat_poll_with_bitrates_and_peers(self) -> None:
        p = InMemoryProxy(stats_interval=5)
        p.connect()
        s = session(p)
        for _ in range(10):
            p.engine.response.data(ts(10))
            p.clock.advance(1)
        history = s.describe()["history"]
        self.assertEqual([h[0] for h in history], [10.0, 5.0, 0.0])
        rate = 10 * 188 * 8
        self.assertEqual(history[0][1:], [0, 0, None])  # the first sample: nothing measured, no answer yet
        self.assertEqual(history[-1], [0.0, rate, rate, 4])

    def test_without_stat_polls_still_sampled_and_kept_across_a_failover(self) -> None:
        p = InMemoryProxy(stats_interval=0, failover_attempts=1)
        p.connect()
        s = session(p)
        for _ in range(10):
            p.engine.response.data(ts(1))
            p.clock.advance(1)
        self.assertEqual(len(s.describe()["history"]), 3)  # every HISTORY_STEP_WITHOUT_POLLS (5 s)
        p.engine.auto = False
        p.engine.response.reset()
        self.assertEqual(s.state, EngineSession.RECOVERING)
        p.clock.advance(30)
        self.assertEqual(len(s.describe()["history"]), 3)  # nothing sampled while recovering, nothing lost
        p.engine.accept()
        self.assertEqual(s.state, EngineSession.STREAMING)
        self.assertEqual(len(s.describe()["history"]), 4)

    def test_in_the_status_listing_for_a_fresh_dashboard(self) -> None:
        p = InMemoryProxy(stats_interval=1)
        p.connect()
        for _ in range(5):
            p.engine.response.data(ts(5))
            p.clock.advance(1)
        listed = json.loads(p.connect(b"/ace/status").body())["sessions"][0]
        self.assertEqual(len(listed["history"]), 6)
        self.assertEqual(listed["history"][-1], [0.0, 5 * 188 * 8, 5 * 188 * 8, 4])
