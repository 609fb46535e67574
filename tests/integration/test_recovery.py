"""
Recovery that follows the orchestrator, end to end (real sockets on 127.0.0.1,
the simulated engines and orchestrator with the faults the real ones have):

- engines that fail *persistently* (every playback resets at once, or after
  200 KB, or stalls every 300 KB) cost at most ACEXY_FAILOVER_ATTEMPTS + 1
  engine sessions, spaced by the retry policy, each stopped, and the players
  get a clean end — no storm;
- an engine that resets twice and then heals keeps its players connected;
- a VPN drop or an opened breaker seen first as a 503 to a POST between two
  status polls: one POST, then the session waits on the health monitor
  (outage polling at once), and streams as soon as the status says so — not
  after the ETA; reject mode answers at once;
- capacity known before posting, the Gluetun-mode active-replicas 500 as a
  capacity wait, and a wrong API key visible to the operator.

Every wait is bounded by a timeout (``within``); nothing sleeps. Where a test
shows that something does *not* happen later, it checks the state that makes
it impossible (no session left, no timer armed) instead of waiting.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import gatherResults
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from acexy_tw.streaming.mpegts import PACKET_SIZE
from tests.integration.harness import TSPlayer, cid, get_json, get_text, sim_engine, start_proxy, wait_until, within
from tests.integration.test_outages import KEY, proxy_with, sim_orchestrator

log = Logger()

ATTEMPTS = 3


def opened_at(engines: Any) -> list[float]:
    """When each getstream session was created, on all ``engines``, in order."""
    return sorted(s.created_at for e in engines for s in e.sessions.values())


def all_stopped(engines: Any) -> bool:
    return all(s.stopped for e in engines for s in e.sessions.values()) and all(
        e.open_playbacks == 0 for e in engines
    )


class PersistentEngineFaultTests(TestCase):
    """One engine, no orchestrator: the same rule as with one."""

    async def _storm_check(self, **behaviour: Any) -> None:
        engine = sim_engine(self, bitrate=2_000_000)
        for name, value in behaviour.items():
            setattr(engine.behaviour, name, value)
        proxy = await start_proxy(self, engine, failover_attempts=str(ATTEMPTS), linger="0")
        players = await gatherResults(
            [TSPlayer.open(self, proxy.stream_url(cid(700))) for _ in range(2)], consumeErrors=True
        )
        await gatherResults([within(p.when_ended(), 20) for p in players], consumeErrors=True)
        for p in players:
            self.assertEqual(p.code, 200)
            self.assertTrue(p.clean_end, p.end_reason)  # a clean end of body: the player retries
            self.assertTrue(p.aligned())
        await within(engine.when(lambda e: all_stopped([e])))
        times = opened_at([engine])
        log.info("engine sessions opened at {t}", t=[round(t - times[0], 3) for t in times])
        self.assertLessEqual(len(times), ATTEMPTS + 1)
        self.assertEqual(len(times), ATTEMPTS + 1)  # the budget was used, not more
        gaps = [b - a for a, b in zip(times[1:], times[2:])]  # after the first (immediate) retry
        self.assertTrue(all(g >= 0.5 for g in gaps), gaps)
        self.assertEqual(len(proxy.registry), 0)  # nothing left that could open another
        self.assertEqual(proxy.service.registry.sessions_started, 1)

    async def test_every_playback_resetting_at_once_is_bounded_and_spaced(self) -> None:
        await self._storm_check(reset_after=0)

    async def test_every_playback_resetting_after_200_kb_is_bounded_and_spaced(self) -> None:
        await self._storm_check(reset_after=200_000)

    async def test_resets_twice_then_heals_the_player_keeps_its_connection(self) -> None:
        engine = sim_engine(self, bitrate=2_000_000)
        engine.fail_next_playbacks(2, how="reset")
        proxy = await start_proxy(self, engine, failover_attempts=str(ATTEMPTS), linger="0", keepalive_interval="200ms")
        player = await TSPlayer.open(self, proxy.stream_url(cid(701)))
        self.assertEqual(player.code, 200)
        await player.when(
            lambda p: p.first_real_offset is not None and len(p.received) - p.first_real_offset >= 100 * PACKET_SIZE,
            "real TS from the healed engine",
        )
        self.assertFalse(player.ended.called)
        self.assertTrue(player.aligned())
        self.assertEqual(len(engine.sessions), 3)
        [session] = list(proxy.registry)
        self.assertEqual((session.state, session.failovers), ("streaming", 2))
        self.assertIsNotNone(session.incident)  # over only after ACEXY_FAILOVER_RESET of real data

    async def test_a_stall_every_300_kb_with_one_attempt_ends_after_two_sessions(self) -> None:
        engine = sim_engine(self, bitrate=2_000_000)
        engine.behaviour.stall_after = 300_000
        proxy = await start_proxy(self, engine, failover_attempts="1", empty_timeout="500ms", linger="0")
        player = await TSPlayer.open(self, proxy.stream_url(cid(702)))
        await within(player.when_ended(), 20)
        self.assertTrue(player.clean_end, player.end_reason)
        await within(engine.when(lambda e: all_stopped([e])))
        self.assertEqual(len(engine.sessions), 2)
        self.assertEqual(len(proxy.registry), 0)


class OrchestratedFaultTests(TestCase):
    async def test_two_engines_both_resetting_three_players(self) -> None:
        orch = sim_orchestrator(self, max_replicas=2)
        handles = [orch.add_engine(), orch.add_engine()]
        for h in handles:
            h.engine.behaviour.reset_after = 0
        proxy, fallback = await proxy_with(self, orch, failover_attempts=str(ATTEMPTS), linger="0")
        players = await gatherResults(
            [TSPlayer.open(self, proxy.stream_url(cid(710))) for _ in range(3)], consumeErrors=True
        )
        await gatherResults([within(p.when_ended(), 30) for p in players], consumeErrors=True)
        self.assertTrue(all(p.clean_end for p in players), [p.end_reason for p in players])
        engines = [h.engine for h in handles]
        await within(orch.when(lambda o: all_stopped(engines) and len(o.events_ended) == len(o.events_started)))
        sessions = len(opened_at(engines))
        self.assertLessEqual(sessions, ATTEMPTS + 1)
        self.assertGreaterEqual(sessions, 2)  # it did fail over to the other engine
        self.assertEqual({s.container_id for s in orch.streams.values()}, {h.container_id for h in handles})
        self.assertLessEqual(len(orch.events_started), ATTEMPTS + 1)
        self.assertEqual(len(orch.events_started), len(orch.events_ended))
        self.assertEqual(orch.unmatched_ended, [])
        self.assertEqual(orch.provision_calls, [])
        self.assertEqual(fallback.getstream_calls, [])
        self.assertEqual(len(proxy.registry), 0)


class MonitorDrivenWaitTests(TestCase):
    async def test_vpn_drop_between_polls_one_post_then_streams_when_the_status_says_so(self) -> None:
        orch = sim_orchestrator(self, status_lag=0.5)
        proxy, fallback = await proxy_with(self, orch, outage_poll_interval="1s")
        monitor = proxy.service.monitor
        self.assertTrue(monitor.snapshot.can_provision)
        orch.set_vpn(connected=False)  # between two polls (the next is 30 s away), and the status lags
        player = await TSPlayer.open(self, proxy.stream_url(cid(720)))
        self.assertEqual(player.code, 200)  # held: keepalive
        self.assertEqual(len(orch.provision_calls), 1)
        self.assertTrue(monitor.blocked)
        self.assertEqual(monitor.current_interval, 1.0)  # outage polling at once
        polls = monitor.polls
        await wait_until(lambda: monitor.polls >= polls + 2, "two outage polls")
        self.assertEqual(len(orch.provision_calls), 1)  # the refusal stood: no second POST
        [session] = proxy.registry.find(cid(720))
        self.assertEqual((session.state, session.waiting_reason), ("waiting", "vpn_disconnected"))

        orch.set_vpn(connected=True)
        await player.when_real(10, seconds=1.0 + 2.0)  # ACEXY_OUTAGE_POLL_INTERVAL + 2 s, not the 60 s ETA
        self.assertFalse(player.ended.called)
        self.assertEqual(len(orch.provision_calls), 2)
        self.assertEqual(fallback.getstream_calls, [])

    async def test_breaker_opening_between_polls_reject_mode_answers_at_once(self) -> None:
        orch = sim_orchestrator(self)
        proxy, _ = await proxy_with(self, orch, wait_mode="reject")
        orch.open_breaker(eta=60)
        refused = await within(TSPlayer.open(self, proxy.stream_url(cid(721))), 1.0)
        self.assertEqual(refused.code, 503)
        retry = refused.response.headers.getRawHeaders(b"retry-after")
        self.assertTrue(retry and int(retry[0]) >= 1, retry)
        self.assertEqual(len(orch.provision_calls), 1)
        self.assertEqual(proxy.service.monitor.blocked_code, "circuit_breaker")

    async def _capacity_filled(self, mode: str) -> tuple[Any, Any, TSPlayer]:
        """max_replicas 2: one busy engine; A provisions the second; B arrives
        while the cached snapshot still says can_provision."""
        orch = sim_orchestrator(self, max_replicas=2)  # replica_limit "none": the POST would not refuse
        orch.add_engine(streams=1)
        proxy, _ = await proxy_with(self, orch, wait_mode=mode)
        a = await TSPlayer.open(self, proxy.stream_url(cid(730)))
        await a.when_real(10)
        self.assertEqual(len(orch.provision_calls), 1)
        self.assertTrue(proxy.service.monitor.snapshot.can_provision)  # the cached view is behind
        b = await within(TSPlayer.open(self, proxy.stream_url(cid(731))), 1.0)
        self.assertEqual(len(orch.provision_calls), 1)  # no POST past max_replicas
        self.assertEqual(len(orch.engines), 2)
        return orch, proxy, b

    async def test_capacity_filled_no_post_and_held(self) -> None:
        _, proxy, b = await self._capacity_filled("hold")
        self.assertEqual(b.code, 200)
        [session] = proxy.registry.find(cid(731))
        self.assertEqual(session.waiting_reason, "max_capacity")

    async def test_capacity_filled_no_post_and_503_in_reject_mode(self) -> None:
        _, _, b = await self._capacity_filled("reject")
        self.assertEqual(b.code, 503)
        self.assertTrue(b.response.headers.getRawHeaders(b"retry-after"))

    async def _gluetun_limit(self, mode: str) -> tuple[Any, Any, TSPlayer]:
        orch = sim_orchestrator(self, max_replicas=5, replica_limit="gluetun")
        orch.add_engine(streams=1)
        proxy, _ = await proxy_with(self, orch, wait_mode=mode)
        orch.max_replicas = 1  # the container limit is reached; the cached status says 5
        player = await within(TSPlayer.open(self, proxy.stream_url(cid(740))), 1.0)
        self.assertEqual(len(orch.provision_calls), 1)
        self.assertEqual(proxy.service.monitor.blocked_code, "max_capacity")
        return orch, proxy, player

    async def test_gluetun_active_replicas_500_is_held_not_a_502(self) -> None:
        _, proxy, player = await self._gluetun_limit("hold")
        self.assertEqual(player.code, 200)
        await player.when(lambda p: len(p.received) >= 7 * PACKET_SIZE, "keepalive")
        [session] = proxy.registry.find(cid(740))
        self.assertEqual((session.state, session.waiting_reason), ("waiting", "max_capacity"))

    async def test_gluetun_active_replicas_500_is_a_503_with_retry_after_in_reject_mode(self) -> None:
        _, _, player = await self._gluetun_limit("reject")
        self.assertEqual(player.code, 503)
        self.assertTrue(player.response.headers.getRawHeaders(b"retry-after"))


class OperatorVisibilityTests(TestCase):
    async def test_a_403_on_post_shows_in_status_and_metrics_never_the_key(self) -> None:
        orch = sim_orchestrator(self)
        fallback = sim_engine(self, bitrate=2_000_000)
        wrong = "wrong-key-" + "9" * 24
        proxy = await start_proxy(
            self, fallback, orch_url=orch.url, orch_apikey=wrong, outage_poll_interval="200ms", keepalive_interval="200ms"
        )
        await wait_until(lambda: proxy.service.monitor.reachable is not None, "the first status poll")
        player = await TSPlayer.open(self, proxy.stream_url(cid(750)))  # no engine: a POST, refused 403
        self.assertEqual(player.code, 502)
        await player.when_ended()
        self.assertIn(b"ACEXY_ORCH_APIKEY", bytes(player.received))
        code, doc = await get_json(self, proxy.url("/ace/status"))
        self.assertEqual(code, 200)
        warnings = doc["orchestrator"]["warnings"]
        self.assertTrue(any("ACEXY_ORCH_APIKEY" in w and "403" in w for w in warnings), warnings)
        code, text = await get_text(self, proxy.url("/ace/status"))
        self.assertNotIn(wrong, text)
        self.assertNotIn(KEY, text)
        code, metrics = await get_text(self, proxy.url("/metrics"))
        self.assertIn("acexy_orchestrator_auth_failures_total 1.0", metrics)
        self.assertIn("acexy_orchestrator_auth_ok 0.0", metrics)
        self.assertNotIn(wrong, metrics)
        code, page = await get_text(self, proxy.url("/"))
        self.assertIn("o.warnings", page)  # the dashboard lists the orchestrator's warnings
