"""The engine pool (ACEXY_ENGINES) as build() wires it, on the clock: probes,
fewest-sessions placement with capacity, failures, failover within the pool,
the pool as the orchestrator's fallback, and its status."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from acexy_tw.content import ContentKey
from acexy_tw.engine import ContentError, EngineError, EngineTimeout, EngineUnreachable, NoEngine
from acexy_tw.pool import DOWN, UNKNOWN, UP
from acexy_tw.testing import InMemoryProxy, our_delayed_calls, ts

A, B = ("box-a", 6878), ("box-b", 6879)
TWO = "box-a:6878,http://box-b:6879"


def key(n: int) -> ContentKey:
    return ContentKey("content_id", f"{n:040x}")


def pool_proxy(**settings: Any) -> InMemoryProxy:
    settings.setdefault("pool", TWO)
    settings.setdefault("max_streams_per_engine", 2)
    return InMemoryProxy(**settings)


def place(p: InMemoryProxy, k: ContentKey, avoid: frozenset = frozenset()) -> Deferred:
    return Deferred.fromCoroutine(p.placement.place(k, avoid=avoid))


def watch(p: InMemoryProxy, n: int):
    """A player of content ``n`` (its session streaming once the engine sends)."""
    return p.connect(b"/ace/getstream?id=" + key(n).value.encode())


def status(p: InMemoryProxy) -> dict:
    c = p.connect(b"/ace/status")
    return json.loads(c.body())


class PlacementTests(SynchronousTestCase):
    def test_the_engines_are_the_listed_ones_in_order(self) -> None:
        p = pool_proxy()
        self.assertEqual([e.url for e in p.pool.engines], ["http://box-a:6878", "http://box-b:6879"])
        self.assertEqual(p.pool.capacity, 2)

    def test_four_contents_spread_two_and_two(self) -> None:
        p = pool_proxy()
        placed = [self.successResultOf(place(p, key(n)))[0] for n in range(4)]
        self.assertEqual([e.address.host for e in placed], ["box-a", "box-b", "box-a", "box-b"])
        self.assertEqual(len(p.engines[A].attempts), 2)
        self.assertEqual(len(p.engines[B].attempts), 2)
        self.assertEqual([e["sessions"] for e in p.placement.pool_status()], [2, 2])

    def test_a_released_slot_is_the_next_one_used(self) -> None:
        p = pool_proxy()
        for n in range(3):  # a, b, a
            self.successResultOf(place(p, key(n)))
        p.placement.release(key(0))  # a: 1, b: 1 -> a (first on a tie)
        p.placement.release(key(2))  # a: 0
        engine, _ = self.successResultOf(place(p, key(9)))
        self.assertEqual(engine.address.host, "box-a")

    def test_a_full_pool_is_a_capacity_wait_not_an_error(self) -> None:
        p = pool_proxy(max_streams_per_engine=1)
        self.successResultOf(place(p, key(1)))
        self.successResultOf(place(p, key(2)))
        refusal = self.failureResultOf(place(p, key(3)), NoEngine).value
        self.assertEqual((refusal.code, refusal.http_status), ("max_capacity", 503))
        self.assertGreaterEqual(refusal.retry_after, 1)
        # nothing was asked of a full engine
        self.assertEqual((len(p.engines[A].attempts), len(p.engines[B].attempts)), (1, 1))

    def test_a_held_player_gets_the_slot_a_closed_session_frees(self) -> None:
        p = pool_proxy(max_streams_per_engine=1, linger=0)
        first, second = watch(p, 1), watch(p, 2)
        p.engines[A].response.data(ts(1))
        p.engines[B].response.data(ts(1))
        third = watch(p, 3)  # both engines full: held, kept alive, nothing asked
        self.assertEqual(p.registry.get(key(3)).state, "waiting")
        self.assertEqual((len(p.engines[A].attempts), len(p.engines[B].attempts)), (1, 1))
        first.disconnect()  # content 1 ends: engine a is free
        self.assertEqual([k for k in p.engines[A].attempts], [key(1), key(3)])
        p.engines[A].response.data(ts(2))
        self.assertEqual(p.registry.get(key(3)).state, "streaming")
        self.assertIn(ts(2), third.body())
        second.disconnect()
        third.disconnect()

    def test_a_pool_of_one_from_acexy_host_has_no_capacity_limit(self) -> None:
        p = InMemoryProxy(max_streams_per_engine=1)
        self.assertIsNone(p.pool.capacity)
        for n in range(5):
            engine, _ = self.successResultOf(place(p, key(n)))
            self.assertIs(engine, p.engine)

    def test_a_content_error_is_final(self) -> None:
        p = pool_proxy()
        p.placement.engines.engines[0].client.script.append(ContentError("engine error: no such content"))
        self.failureResultOf(place(p, key(1)), ContentError)
        self.assertEqual(p.engines[B].attempts, [])  # another engine would say the same
        self.assertEqual(p.placement.reservations, {})
        self.assertEqual(p.pool.engines[0].state, UNKNOWN)  # it answered: not down

    def test_an_engine_that_refuses_is_skipped_for_the_next_but_stays_up(self) -> None:
        p = pool_proxy()
        p.pool.engines[0].client.script.append(EngineError("engine answered 500: busy"))
        engine, _ = self.successResultOf(place(p, key(1)))
        self.assertEqual(engine.address.host, "box-b")
        self.assertEqual(p.pool.engines[0].state, UNKNOWN)  # an HTTP answer is an answer
        self.assertEqual(p.pool.engines[1].state, UP)

    def test_every_engine_refusing_gives_the_last_answer(self) -> None:
        p = pool_proxy()
        for e in p.pool.engines:
            e.client.script.append(EngineError("engine answered 500: busy"))
        self.failureResultOf(place(p, key(1)), EngineError)
        self.assertEqual(p.placement.reservations, {})


class HealthTests(SynchronousTestCase):
    def test_an_unreachable_engine_is_down_at_once_and_skipped(self) -> None:
        p = pool_proxy()
        p.pool.engines[0].client.script.append(EngineUnreachable("engine getstream failed: Connection refused"))
        engine, _ = self.successResultOf(place(p, key(1)))
        self.assertEqual(engine.address.host, "box-b")
        a = p.pool.engines[0]
        self.assertEqual((a.state, a.failures), (DOWN, 1))
        self.assertIn("Connection refused", a.last_error)
        # new contents go to b while a is down, even past the fewest-sessions rule
        engine, _ = self.successResultOf(place(p, key(2)))
        self.assertEqual(engine.address.host, "box-b")
        self.assertEqual(len(p.engines[A].attempts), 1)

    def test_a_timeout_marks_the_engine_down_too(self) -> None:
        p = pool_proxy()
        p.pool.engines[0].client.script.append(EngineTimeout("engine did not answer getstream within 10s"))
        self.successResultOf(place(p, key(1)))
        self.assertEqual(p.pool.engines[0].state, DOWN)

    def test_probes_run_every_health_interval_one_in_flight_per_engine(self) -> None:
        p = pool_proxy(health_interval=30)
        a, b = p.engines[A], p.engines[B]
        hung: Deferred = Deferred()
        a.version = lambda timeout=None: (setattr(a, "versions", a.versions + 1), hung)[1]  # never answers
        p.pool.startService()
        self.assertEqual((a.versions, b.versions), (1, 1))  # at once
        self.assertEqual(p.pool.engines[1].state, UP)
        for _ in range(3):
            p.clock.advance(30)
        self.assertEqual((a.versions, b.versions), (1, 4))  # the hung probe is not stacked on
        p.pool.stopService()
        self.assertTrue(hung.called)  # cancelled: nothing left behind
        self.assertEqual(our_delayed_calls(p.clock), [])
        p.clock.advance(300)
        self.assertEqual(b.versions, 4)

    def test_a_down_engine_is_used_again_once_a_probe_answers(self) -> None:
        p = pool_proxy(health_interval=30)
        a = p.engines[A]
        a.ready = False
        p.pool.startService()
        self.assertEqual(p.pool.engines[0].state, DOWN)
        self.assertEqual(self.successResultOf(place(p, key(1)))[0].address.host, "box-b")
        self.assertEqual(self.successResultOf(place(p, key(2)))[0].address.host, "box-b")
        a.ready = True
        p.clock.advance(30)
        self.assertEqual(p.pool.engines[0].state, UP)
        self.assertEqual(self.successResultOf(place(p, key(3)))[0].address.host, "box-a")
        p.pool.stopService()

    def test_an_engine_coming_back_wakes_the_held_players(self) -> None:
        p = pool_proxy(max_streams_per_engine=1, health_interval=30)
        p.pool.startService()
        p.engines[A].ready = False
        p.clock.advance(30)  # a down
        watch(p, 1)
        p.engines[B].response.data(ts(1))
        held = watch(p, 2)  # b full, a down: held
        self.assertEqual(p.registry.get(key(2)).state, "waiting")
        self.assertEqual(p.engines[A].attempts, [])
        p.engines[A].ready = True
        p.clock.advance(30)  # a answers: the wait queue retries at once
        self.assertEqual(p.engines[A].attempts, [key(2)])
        p.engines[A].response.data(ts(3))
        self.assertIn(ts(3), held.body())
        p.pool.stopService()

    def test_every_engine_down_are_still_tried_and_the_answer_reaches_the_player(self) -> None:
        p = pool_proxy()
        for e in p.pool.engines:
            e.state = DOWN
        p.pool.engines[0].client.script.append(EngineUnreachable("refused"))
        p.pool.engines[1].client.script.append(EngineUnreachable("refused"))
        self.failureResultOf(place(p, key(1)), EngineUnreachable)
        self.assertEqual((len(p.engines[A].attempts), len(p.engines[B].attempts)), (1, 1))
        # a pool of one whose engine is down is still that engine
        q = InMemoryProxy()
        q.pool.engines[0].state = DOWN
        self.assertIs(self.successResultOf(place(q, key(1)))[0], q.engine)
        self.assertEqual(q.pool.engines[0].state, UP)  # it answered

    def test_an_engine_failing_forever_costs_one_attempt_per_placement(self) -> None:
        p = pool_proxy(max_streams_per_engine=25)
        a = p.pool.engines[0].client
        for n in range(20):
            a.script.append(EngineUnreachable("refused"))
            self.successResultOf(place(p, key(n)))
            a.script.clear()
        # tried once (unknown), then skipped while b answers: no storm on a dead box
        self.assertEqual(len(a.attempts), 1)
        self.assertEqual(p.pool.engines[0].failures, 1)


class FailoverTests(SynchronousTestCase):
    def test_failover_moves_to_the_other_engine(self) -> None:
        p = pool_proxy(failover_attempts=2)
        c = watch(p, 1)
        a, b = p.engines[A], p.engines[B]
        a.response.data(ts(1))
        a.response.reset()  # engine a's stream dies mid-way
        self.assertEqual(b.attempts, [key(1)])  # the first attempt at once, on b
        b.response.data(ts(2))
        self.assertIn(ts(2), c.body())
        self.assertEqual(p.placement.pool_status()[1]["sessions"], 1)
        self.assertEqual(p.placement.pool_status()[0]["sessions"], 0)
        c.disconnect()

    def test_the_failed_engine_is_still_used_when_nothing_else_has_room(self) -> None:
        p = pool_proxy(max_streams_per_engine=1)
        self.successResultOf(place(p, key(2)))  # a
        self.successResultOf(place(p, key(3)))  # b
        p.placement.release(key(2))  # a free again
        engine, _ = self.successResultOf(place(p, key(1), avoid=frozenset({"http://box-a:6878"})))
        self.assertEqual(engine.address.host, "box-a")


class OrchestratorFallbackTests(SynchronousTestCase):
    def test_the_pool_is_the_fallback_while_the_orchestrator_is_unreachable(self) -> None:
        p = pool_proxy(orchestrator=True)
        p.orchestrator.unreachable = True
        hosts = [self.successResultOf(place(p, key(n)))[0].address.host for n in range(3)]
        self.assertEqual(hosts, ["box-a", "box-b", "box-a"])
        self.assertEqual(p.placement.fallbacks, 3)


class StatusTests(SynchronousTestCase):
    def test_the_status_page_lists_the_pool_with_health_and_load(self) -> None:
        p = pool_proxy(health_interval=30)
        p.engines[B].ready = False
        p.pool.startService()
        watch(p, 1)
        doc = status(p)
        self.assertEqual(
            [(e["url"], e["state"], e["sessions"], e["capacity"]) for e in doc["engines"]],
            [("http://box-a:6878", "up", 1, 2), ("http://box-b:6879", "down", 0, 2)],
        )
        self.assertEqual(doc["engines"][1]["failures"], 1)
        self.assertIn("refused", doc["engines"][1]["last_error"])
        p.pool.stopService()


class EngineErrorCountTests(SynchronousTestCase):
    def test_failed_starts_are_counted_by_kind_and_exported(self) -> None:
        p = pool_proxy()
        a, b = p.pool.engines[0].client, p.pool.engines[1].client
        a.script.append(EngineUnreachable("refused"))
        self.successResultOf(place(p, key(1)))  # a: unreachable (down), then b
        b.script.append(EngineTimeout("no answer"))
        a.script.append(EngineError("engine answered 500"))
        self.failureResultOf(place(p, key(2)), EngineError)  # b: timeout (down); every engine down: a: 500
        b.script.append(ContentError("engine error: no such content"))
        a.script.append(ContentError("engine error: no such content"))
        self.failureResultOf(place(p, key(3)), ContentError)  # final on the first engine tried
        self.assertEqual(
            p.placement.describe()["engine_errors"], {"unreachable": 1, "timeout": 1, "refused": 1, "content": 1}
        )
        body, _ = p.metrics.render()
        for kind in ("unreachable", "timeout", "refused", "content"):
            self.assertIn(f'acexy_engine_errors_total{{kind="{kind}"}} 1.0'.encode(), body)

    def test_a_full_pool_is_not_an_engine_error(self) -> None:
        p = pool_proxy(max_streams_per_engine=1)
        self.successResultOf(place(p, key(1)))
        self.successResultOf(place(p, key(2)))
        self.failureResultOf(place(p, key(3)), NoEngine)
        self.assertEqual(p.placement.describe()["engine_errors"], {})
        body, _ = p.metrics.render()
        self.assertIn(b'acexy_engine_errors_total{kind="refused"} 0.0', body)
