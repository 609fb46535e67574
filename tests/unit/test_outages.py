"""
Holding players through outages, the wait queue and mid-stream failover,
deterministic: MemoryReactorClock for every timer (keepalive cadence, max
wait, linger), the production wiring (acexy_tw.testing.InMemoryProxy) with a
scripted engine and, for the failover's choice of engine, a scripted orchestrator.
"""

from __future__ import annotations

import json
from dataclasses import replace

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from acexy_tw.engine import EngineError, NoEngine
from acexy_tw.placement import MESSAGES
from acexy_tw.streaming.mpegts import PACKET_SIZE
from acexy_tw.streaming.session import KEEPALIVE
from acexy_tw.testing import (
    CID,
    CID2,
    InMemoryProxy,
    breaker,
    key,
    only_nulls,
    our_delayed_calls,
    ts,
    vpn_down,
)


class HoldTests(SynchronousTestCase):
    def test_held_player_gets_200_at_once_then_nulls_at_the_cadence(self) -> None:
        p = InMemoryProxy(queue_size=8, keepalive_interval=1.0)
        p.engine.script = [vpn_down()]
        c = p.connect()
        self.assertEqual(c.status(), 200)
        self.assertEqual(c.body(), KEEPALIVE)
        self.assertTrue(only_nulls(c.body()))
        p.clock.advance(0.9)
        self.assertEqual(len(c.body()), len(KEEPALIVE))
        p.clock.advance(0.1)
        self.assertEqual(len(c.body()), 2 * len(KEEPALIVE))
        p.clock.pump([1, 1, 1])  # (one big advance would let LoopingCall skip missed ticks)
        self.assertEqual(len(c.body()), 5 * len(KEEPALIVE))
        self.assertEqual(p.registry.get(key()).state, "waiting")

    def test_when_the_engine_comes_the_real_stream_follows_on_the_same_connection(self) -> None:
        p = InMemoryProxy(queue_size=8)
        p.engine.script = [vpn_down()]
        c = p.connect()
        p.clock.advance(2)
        p.waits.kick()  # the monitor saw the VPN back
        p.engine.response.data(ts(3))
        body = c.body()
        self.assertEqual(body[-3 * PACKET_SIZE :], ts(3))
        self.assertTrue(only_nulls(body[: -3 * PACKET_SIZE]))
        p.clock.advance(5)
        self.assertEqual(c.body()[-3 * PACKET_SIZE :], ts(3))  # keepalive stopped
        self.assertEqual(p.waits.held, [])

    def test_still_blocked_stays_held_without_losing_its_place(self) -> None:
        p = InMemoryProxy(queue_size=8)
        p.engine.script = [vpn_down(), vpn_down()]
        p.connect()
        p.waits.kick()
        self.assertEqual(len(p.engine.attempts), 2)
        self.assertEqual([s.key for s in p.waits.held], [key()])

    def test_max_wait_lets_the_player_go_cleanly_and_provisions_nothing(self) -> None:
        p = InMemoryProxy(queue_size=8, max_wait=10, keepalive_interval=1)
        p.engine.script = [vpn_down()]
        c = p.connect()
        p.clock.advance(9)
        self.assertFalse(c.finished_cleanly())
        p.clock.advance(1)
        self.assertTrue(c.finished_cleanly())
        self.assertIsNone(p.registry.get(key()))
        self.assertEqual(p.waits.held, [])
        p.waits.kick()
        self.assertEqual(len(p.engine.attempts), 1)
        self.assertEqual(our_delayed_calls(p.clock), [])

    def test_held_player_hanging_up_drops_the_wait_at_once(self) -> None:
        p = InMemoryProxy(queue_size=8, linger=30)
        p.engine.script = [vpn_down()]
        c = p.connect()
        c.disconnect()
        self.assertIsNone(p.registry.get(key()))  # no linger for a session that never started
        p.waits.kick()
        self.assertEqual(len(p.engine.attempts), 1)  # nothing placed for nobody
        self.assertEqual(our_delayed_calls(p.clock), [])

    def test_players_of_one_content_share_one_pending_session(self) -> None:
        p = InMemoryProxy(queue_size=8)
        p.engine.script = [vpn_down()]
        a, b = p.connect(), p.connect()
        self.assertEqual(len(p.engine.attempts), 1)
        self.assertEqual(b.body(), KEEPALIVE)  # the joiner is kept alive at once too
        p.waits.kick()
        p.engine.response.data(ts(1))
        self.assertEqual(a.body()[-PACKET_SIZE:], ts(1))
        self.assertEqual(b.body()[-PACKET_SIZE:], ts(1))
        self.assertEqual(len(p.engine.attempts), 2)

    def test_a_permanent_refusal_is_not_held(self) -> None:
        p = InMemoryProxy(queue_size=8)
        p.engine.script = [NoEngine("docker exploded", code="general_error", http_status=502)]
        c = p.connect()
        self.assertEqual(c.status(), 502)
        self.assertEqual(p.waits.held, [])

    def test_a_held_session_failing_for_good_ends_its_players_cleanly(self) -> None:
        p = InMemoryProxy(queue_size=8)
        p.engine.script = [vpn_down(), NoEngine("docker exploded", code="general_error", http_status=502)]
        c = p.connect()
        p.waits.kick()
        self.assertTrue(c.finished_cleanly())  # it got a 200 already: a clean end, it retries
        self.assertEqual(p.waits.held, [])


class QueueTests(SynchronousTestCase):
    def test_queue_is_served_in_arrival_order_and_stops_at_the_first_still_blocked(self) -> None:
        p = InMemoryProxy(queue_size=8)
        p.engine.script = [breaker(), breaker()]
        p.connect()  # A
        p.connect(b"/ace/getstream?id=" + CID2.encode())  # B
        self.assertEqual([s.key for s in p.waits.held], [key(CID), key(CID2)])
        p.engine.script = [breaker()]  # A still blocked: B must not jump ahead
        p.waits.kick()
        self.assertEqual(p.engine.attempts[2:], [key(CID)])
        p.waits.kick()  # now A gets through, then B
        self.assertEqual(p.engine.attempts[3:], [key(CID), key(CID2)])
        self.assertEqual(p.waits.held, [])
        self.assertEqual(p.waits.served, 2)

    def test_queue_full_is_a_503_with_retry_after(self) -> None:
        p = InMemoryProxy(queue_size=2)
        p.engine.script = [breaker(), breaker()]
        p.connect()
        b = p.connect()
        self.assertEqual(b.status(), 200)
        c = p.connect()  # joins the held session: no room
        self.assertEqual(c.status(), 503)
        self.assertIn(b"retry-after: 30", c.value().lower())
        other = p.connect(b"/ace/getstream?id=" + CID2.encode())  # a new content: no room either
        self.assertEqual(other.status(), 503)
        self.assertEqual(json.loads(other.body())["code"], "circuit_breaker")

    def test_breaker_eta_beyond_max_wait_is_a_503(self) -> None:
        p = InMemoryProxy(queue_size=8, max_wait=60)
        p.engine.script = [breaker(eta=300)]
        c = p.connect()
        self.assertEqual(c.status(), 503)
        self.assertEqual(p.waits.held, [])

    def test_reject_mode_answers_503_remembers_and_prewarms(self) -> None:
        p = InMemoryProxy(queue_size=8, wait_mode="reject", linger=5)
        p.engine.script = [breaker()]
        c = p.connect()
        self.assertEqual(c.status(), 503)
        self.assertEqual(list(p.waits.demands), [key()])
        p.waits.kick()  # capacity back: the session is started for nobody yet
        session = p.registry.get(key())
        self.assertEqual(session.state, "lingering")
        self.assertEqual(len(p.engine.starts), 1)
        again = p.connect()  # the player's retry
        p.engine.response.data(ts(2))
        self.assertEqual(again.body(), ts(2))
        self.assertEqual(len(p.engine.starts), 1)  # no new engine start

    def test_unclaimed_prewarmed_session_ends_after_linger(self) -> None:
        p = InMemoryProxy(queue_size=8, wait_mode="reject", linger=5)
        p.engine.script = [breaker()]
        p.connect()
        p.waits.kick()
        p.clock.advance(5)
        self.assertIsNone(p.registry.get(key()))
        self.assertEqual(len(p.engine.stops), 1)

    def test_vpn_outages_are_held_even_in_reject_mode(self) -> None:
        p = InMemoryProxy(queue_size=8, wait_mode="reject")
        p.engine.script = [vpn_down()]
        self.assertEqual(p.connect().status(), 200)


class FailoverTests(SynchronousTestCase):
    def test_engine_eof_mid_stream_keeps_players_and_continues_on_a_new_session(self) -> None:
        p = InMemoryProxy(failover_attempts=3, queue_size=8)
        a, b = p.connect(), p.connect()
        first = p.engine.response
        first.data(ts(2, 0x01))
        first.eof()
        self.assertFalse(a.finished_cleanly() or a.aborted)
        self.assertEqual(len(p.engine.stops), 1)  # the dead session is stopped
        self.assertEqual(p.registry.stopped, {"failover": 1})
        self.assertEqual(len(p.engine.starts), 2)  # the same engine, once
        second = p.engine.response
        self.assertIsNot(second, first)
        second.data(ts(2, 0x02))
        for c in (a, b):
            body = c.body()
            self.assertEqual(body[: 2 * PACKET_SIZE], ts(2, 0x01))
            self.assertEqual(body[-2 * PACKET_SIZE :], ts(2, 0x02))
        self.assertEqual(p.registry.get(key()).failovers, 1)

    def test_gap_is_filled_with_keepalive(self) -> None:
        p = InMemoryProxy(failover_attempts=3, queue_size=8, keepalive_interval=1)
        p.engine.auto = False
        c = p.connect()
        p.engine.accept(0)
        p.engine.response.data(ts(1))
        p.engine.response.reset()
        self.assertEqual(c.body()[PACKET_SIZE:], KEEPALIVE)  # at once
        p.clock.pump([1, 1, 1])
        self.assertTrue(only_nulls(c.body()[PACKET_SIZE:]))
        self.assertEqual(len(c.body()[PACKET_SIZE:]), 4 * len(KEEPALIVE))

    def test_second_attempt_avoids_the_dead_engine(self) -> None:
        p = InMemoryProxy(orchestrator=True, failover_attempts=3)
        dead, other = p.orchestrator.add(1), p.orchestrator.add(2)  # "dead" ranks first
        p.connect()
        first = p.engine_of(dead)
        self.assertEqual(first.attempts, [key()])
        first.response.data(ts(1))
        first.response.eof()
        second = p.engine_of(other)
        self.assertEqual(first.attempts, [key()])  # it had room again, but it failed in this incident
        self.assertEqual(second.attempts, [key()])
        session = p.registry.get(key())
        self.assertIs(session.engine, second)
        self.assertEqual(session.state, "streaming")
        self.assertEqual(p.placement.reservations[key()].container_id, other.container_id)
        self.assertEqual((p.engine.attempts, p.orchestrator.provision_calls), ([], []))
        self.assertEqual(len(first.stops), 1)
        # the orchestrator hears the dead engine session end and the new one start
        self.assertEqual([(c, r) for c, _, r in p.orchestrator.ended], [(dead.container_id, "failover")])
        self.assertEqual([e["container_id"] for e in p.orchestrator.started], [dead.container_id, other.container_id])

    def test_the_dead_engines_slot_is_released_for_the_next_attempt(self) -> None:
        # The failed engine is tried last, not never: alone, it is used again,
        # its slot given back first (else it would look full: a provisioning).
        p = InMemoryProxy(orchestrator=True, failover_attempts=3)
        only = p.orchestrator.add(1)
        p.connect()
        engine = p.engine_of(only)
        engine.response.data(ts(1))
        engine.response.eof()
        self.assertEqual(engine.attempts, [key(), key()])
        session = p.registry.get(key())
        self.assertIs(session.engine, engine)
        self.assertEqual(session.state, "streaming")
        self.assertEqual(p.placement.reservations[key()].container_id, only.container_id)
        self.assertEqual(p.orchestrator.provision_calls, [])

    def test_all_attempts_failing_closes_cleanly(self) -> None:
        p = InMemoryProxy(failover_attempts=2, queue_size=8)
        c = p.connect()
        p.engine.response.data(ts(1))
        p.engine.script = [EngineError("no engine"), EngineError("refused")]
        p.engine.response.eof()
        self.assertFalse(c.finished_cleanly())  # the second attempt waits 1 s
        p.clock.advance(1)
        self.assertTrue(c.finished_cleanly())
        self.assertEqual(len(p.engine.attempts), 3)  # the first placement and two attempts
        self.assertIsNone(p.registry.get(key()))
        self.assertEqual(our_delayed_calls(p.clock), [])

    def test_no_failover_without_players(self) -> None:
        p = InMemoryProxy(failover_attempts=3, queue_size=8, linger=30)
        c = p.connect()
        p.engine.response.data(ts(1))
        c.disconnect()  # lingering, nobody watching
        p.engine.response.eof()
        self.assertIsNone(p.registry.get(key()))
        self.assertEqual(len(p.engine.starts), 1)

    def test_no_failover_for_a_non_live_stream(self) -> None:
        p = InMemoryProxy(failover_attempts=3, queue_size=8)
        c = p.connect()
        session = p.registry.get(key())
        session.info = replace(session.info, is_live=0)
        p.engine.response.data(ts(1))
        p.engine.response.eof()
        self.assertTrue(c.finished_cleanly())
        self.assertEqual(len(p.engine.starts), 1)


class SettleWindowTests(SynchronousTestCase):
    def test_a_slow_retry_does_not_hold_up_the_rest_of_the_queue(self) -> None:
        p = InMemoryProxy(queue_size=8)
        p.engine.script = [vpn_down(), vpn_down()]
        p.connect()  # A
        p.connect(b"/ace/getstream?id=" + CID2.encode())  # B
        slow: Deferred = Deferred()
        original = p.placement.place

        async def place(key, *, avoid=frozenset()):
            if key.value == CID:
                await slow  # A's new engine takes a while to come up
            return await original(key, avoid=avoid)

        p.placement.place = place
        p.waits.kick()
        self.assertEqual(len(p.engine.attempts), 2)  # only A tried so far
        p.clock.advance(1.0)  # the settle window: A is busy, not blocked -> B's turn
        self.assertEqual(p.engine.attempts[2:], [key(CID2)])
        slow.callback(None)
        self.assertEqual(p.waits.held, [])


class UnavailableTests(SynchronousTestCase):
    def test_no_engine_running_holds_players_in_either_mode(self) -> None:
        for mode in ("hold", "reject"):
            p = InMemoryProxy(queue_size=8, wait_mode=mode)
            p.engine.script = [NoEngine(MESSAGES["unavailable"], code="unavailable", retry_after=10)]
            c = p.connect()
            self.assertEqual(c.status(), 200, mode)
            self.assertTrue(only_nulls(c.body()))
            self.assertEqual(p.registry.get(key()).waiting_reason, "unavailable")


class HeldCountTests(SynchronousTestCase):
    def test_players_kept_alive_by_a_failover_are_counted_as_held(self) -> None:
        p = InMemoryProxy(failover_attempts=3, queue_size=8)
        a, b = p.connect(), p.connect()
        p.engine.response.data(ts(1))
        p.engine.script = [EngineError("refused")] * 3  # the immediate attempt fails: 1 s backoff
        p.engine.response.reset()
        session = p.registry.get(key())
        self.assertEqual(session.state, "recovering")
        self.assertEqual(p.waits.held, [])  # not queued: it retries on its own budget...
        self.assertEqual(p.waits.held_players, 2)  # ...but its players get keepalive: they are held
        doc = p.waits.describe()
        self.assertEqual(doc["players"], 2)
        self.assertEqual([(s["key"], s["reason"], s["players"]) for s in doc["sessions"]], [(str(key()), "failover", 2)])
        p.clock.advance(1)
        p.clock.advance(2)  # budget spent: clean end
        self.assertTrue(a.finished_cleanly() and b.finished_cleanly())
        self.assertEqual(p.waits.held_players, 0)
        self.assertEqual((len(p.engine.attempts), len(p.engine.starts)), (4, 1))  # the first start and three attempts

    def test_a_queue_full_counts_players_kept_alive_by_a_failover(self) -> None:
        p = InMemoryProxy(failover_attempts=3, queue_size=2)
        p.connect(), p.connect()
        p.engine.response.data(ts(1))
        p.engine.script = [EngineError("refused")]
        p.engine.response.reset()  # two players held by the failover
        self.assertEqual(p.waits.held_players, 2)
        p.engine.script = [vpn_down()]
        c = p.connect(b"/ace/getstream?id=" + CID2.encode())
        self.assertEqual(c.status(), 503)  # no room left for a third held player
