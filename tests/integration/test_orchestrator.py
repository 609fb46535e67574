"""
The proxy with acestream-orchestrator (simulated, real sockets): status before
provisioning, blocked answers, provisioning and readiness, selection limits,
events, fallback, and the API key staying secret.

These tests look at placement's *decisions*, so they run with an empty wait
queue (ACEXY_QUEUE_SIZE=0): a "wait" answer reaches the player as a 503 at
once. Holding players through outages is tested in test_outages.py.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from acexy_tw.sim.orchestrator import SimOrchestrator
from acexy_tw.streaming.mpegts import PACKET_SIZE
from tests.integration import harness
from tests.integration.harness import (
    orchestrated_proxy,
    Player,
    cid,
    get_json,
    get_text,
    wait_until,
    within,
)

KEY = "k3y-that-must-never-leak-0123456789"


def sim_orchestrator(test: TestCase, **kwargs) -> SimOrchestrator:
    return harness.sim_orchestrator(test, api_key=KEY, **kwargs)


async def proxy_with(test: TestCase, orch: SimOrchestrator, **settings: str):
    """No wait queue here (ACEXY_QUEUE_SIZE=0): refusals reach the player."""
    settings.setdefault("outage_poll_interval", "1s")
    settings.setdefault("queue_size", "0")
    return await orchestrated_proxy(test, orch, **settings)


class ProvisioningTests(TestCase):
    async def test_vpn_down_is_a_503_at_once_and_nothing_is_posted(self) -> None:
        orch = sim_orchestrator(self)
        orch.set_vpn(connected=False)
        proxy, fallback = await proxy_with(self, orch)
        player = await within(Player.open(self, proxy.stream_url(cid(1))), 1.0)  # at once
        self.assertEqual(player.code, 503)
        self.assertTrue(player.response.headers.getRawHeaders(b"retry-after"))
        await player.when_ended()
        body = bytes(player.received).decode()
        self.assertIn("VPN connection is being restored", body)
        self.assertIn('"code": "vpn_disconnected"', body)
        self.assertEqual(orch.provision_calls, [])
        self.assertGreaterEqual(orch.status_calls, 1)  # status was consulted
        self.assertEqual(fallback.getstream_calls, [])

    async def test_general_error_is_a_502_and_not_retried(self) -> None:
        orch = sim_orchestrator(self)
        orch.fail_next_provisions(5, code="general_error")
        proxy, _ = await proxy_with(self, orch)
        player = await Player.open(self, proxy.stream_url(cid(1)))
        self.assertEqual(player.code, 502)
        self.assertEqual(len(orch.provision_calls), 1)

    async def test_no_engine_with_room_provisions_and_streams_as_soon_as_it_answers(self) -> None:
        orch = sim_orchestrator(self, engine_ready_delay=1.0)
        proxy, fallback = await proxy_with(self, orch)
        opening = Player.open(self, proxy.stream_url(cid(1)))
        await within(orch.when(lambda o: bool(o.provisioned) and o.provisioned[0].ready))

        async def first_byte() -> Player:
            player = await opening
            self.assertEqual(player.code, 200)
            await player.when_received(PACKET_SIZE)
            return player

        # readiness is polled every 250 ms, never slept on: the stream follows at once
        await within(Deferred.fromCoroutine(first_byte()), 0.6)
        [handle] = orch.provisioned
        self.assertEqual(len(orch.provision_calls), 1)
        self.assertEqual(len(handle.engine.getstream_calls), 1)  # reached at the listed host/port
        self.assertEqual(fallback.getstream_calls, [])

    async def test_ten_ids_land_on_ten_engines(self) -> None:
        orch = sim_orchestrator(self)
        handles = [orch.add_engine() for _ in range(10)]
        proxy, _ = await proxy_with(self, orch, max_streams_per_engine="1")
        players = await gatherResults([Player.open(self, proxy.stream_url(cid(n))) for n in range(10)])
        await gatherResults([p.when_received(PACKET_SIZE) for p in players])
        self.assertEqual(sorted(len(h.engine.getstream_calls) for h in handles), [1] * 10)
        self.assertEqual(orch.provision_calls, [])


class EventTests(TestCase):
    async def test_started_and_ended_once_per_session_with_exact_fields(self) -> None:
        orch = sim_orchestrator(self)
        handle = orch.add_engine()
        proxy, _ = await proxy_with(self, orch, linger="100ms")
        a = await Player.open(self, proxy.stream_url(cid(7)))
        b = await Player.open(self, proxy.stream_url(cid(7)))
        await gatherResults([a.when_received(PACKET_SIZE), b.when_received(PACKET_SIZE)])
        await within(orch.when(lambda o: len(o.events_started) == 1))
        [event] = orch.events_started
        session = handle.engine.last_session
        self.assertEqual(event["container_id"], handle.container_id)
        self.assertEqual(event["engine"], {"host": "127.0.0.1", "port": handle.port})
        self.assertEqual(event["stream"], {"key_type": "content_id", "key": cid(7)})
        self.assertEqual(event["session"]["playback_session_id"], session.playback_session_id)
        self.assertEqual(event["session"]["is_live"], 1)
        self.assertTrue(event["session"]["stat_url"].startswith(f"http://127.0.0.1:{handle.port}/ace/stat/"))
        stream_id = f"{cid(7)}|{session.playback_session_id}"
        self.assertEqual(event["labels"], {"stream_id": stream_id})
        await gatherResults([a.hang_up(), b.hang_up()])
        await within(orch.when(lambda o: len(o.events_ended) == 1))
        [ended] = orch.events_ended
        self.assertEqual(ended, {"container_id": handle.container_id, "stream_id": stream_id, "reason": "client_disconnected"})
        self.assertEqual(orch.unmatched_ended, [])
        self.assertEqual(len(orch.events_started), 1)

    async def test_no_event_for_a_refused_session(self) -> None:
        orch = sim_orchestrator(self)
        handle = orch.add_engine()
        handle.engine.behaviour.json_error = "failed to load content"
        proxy, _ = await proxy_with(self, orch)
        player = await Player.open(self, proxy.stream_url(cid(8)))
        self.assertEqual(player.code, 502)
        self.assertEqual(orch.events_started, [])
        self.assertEqual(orch.events_ended, [])


class FallbackTests(TestCase):
    async def test_orchestrator_down_then_back(self) -> None:
        orch = sim_orchestrator(self)
        handle = orch.add_engine()
        proxy, fallback = await proxy_with(self, orch)
        await within(orch.down())
        a = await Player.open(self, proxy.stream_url(cid(1)))
        await a.when_received(PACKET_SIZE)
        self.assertEqual(len(fallback.getstream_calls), 1)
        orch.up()
        b = await Player.open(self, proxy.stream_url(cid(2)))
        await b.when_received(PACKET_SIZE)
        self.assertEqual(len(handle.engine.getstream_calls), 1)
        self.assertEqual(len(fallback.getstream_calls), 1)


class SecretTests(TestCase):
    async def test_the_key_appears_nowhere_in_logs_or_status(self) -> None:
        lines: list[str] = []

        def observe(event: dict) -> None:
            lines.append(formatEvent(event))
            if event.get("log_failure") is not None:
                lines.append(event["log_failure"].getTraceback())

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        orch = sim_orchestrator(self)
        orch.add_engine()
        proxy, _ = await proxy_with(self, orch, linger="0")
        # a stream, a refusal, an outage: every path that logs
        p = await Player.open(self, proxy.stream_url(cid(1)))
        await p.when_received(PACKET_SIZE)  # keeps the only engine busy
        orch.set_vpn(connected=False)
        await proxy.service.monitor.fresh(0)
        refused = await Player.open(self, proxy.stream_url(cid(2)))
        self.assertEqual(refused.code, 503)
        await p.hang_up()
        await within(orch.down())
        await proxy.service.monitor.fresh(0)
        code, status = await get_text(self, proxy.url("/ace/status"))
        self.assertEqual(code, 200)
        self.assertIn('"orchestrator"', status)
        for text in [status, *lines]:
            self.assertNotIn(KEY, text)
        self.assertIn(f"Bearer {KEY}", orch.auth_headers)  # it was sent, just never shown

    async def test_status_shows_the_orchestrator_section(self) -> None:
        orch = sim_orchestrator(self)
        orch.add_engine()
        orch.open_breaker(eta=120)
        proxy, _ = await proxy_with(self, orch)
        code, doc = await get_json(self, proxy.url("/ace/status"))
        o = doc["orchestrator"]
        self.assertTrue(o["reachable"])
        self.assertEqual(o["status"], "degraded")
        self.assertFalse(o["can_provision"])
        self.assertEqual(o["blocked_code"], "circuit_breaker")
        self.assertEqual(o["circuit_breaker"], "open")
        self.assertIn("capacity", o)
        self.assertIsNotNone(o["snapshot_age"])


class HealthTests(TestCase):
    async def test_monitor_polls_at_the_configured_intervals_and_survives_a_hung_status(self) -> None:
        orch = sim_orchestrator(self)
        orch.add_engine()
        proxy, _ = await proxy_with(self, orch, health_interval="300ms", outage_poll_interval="100ms",
                                    no_response_timeout="200ms")
        monitor = proxy.service.monitor
        calls = orch.status_calls
        await within(orch.when(lambda o: o.status_calls >= calls + 3))
        # polling at the normal interval, not the outage one (the schedule itself is
        # checked on task.Clock: tests/unit/test_health.py)
        self.assertEqual((monitor.degraded, monitor.current_interval), (False, 0.3))
        orch.status_hang = True  # a hung status call: each tick is bounded by the timeout
        await wait_until(lambda: monitor.reachable is False, "the hung poll to time out")
        self.assertEqual(monitor.current_interval, 0.1)  # outage polling while unreachable
        hung_calls = orch.status_calls
        await within(orch.when(lambda o: o.status_calls >= hung_calls + 2))  # the loop lives on
        orch.status_hang = False
        await wait_until(lambda: monitor.reachable is True, "the monitor to recover")
        self.assertEqual(monitor.current_interval, 0.3)


class RefusalTests(TestCase):
    async def test_open_breaker_is_a_503_with_its_eta(self) -> None:
        orch = sim_orchestrator(self)
        orch.open_breaker(eta=120)
        proxy, _ = await proxy_with(self, orch)
        player = await Player.open(self, proxy.stream_url(cid(1)))
        self.assertEqual(player.code, 503)
        retry = int(player.response.headers.getRawHeaders(b"retry-after")[0])
        self.assertTrue(110 <= retry <= 120, retry)
        await player.when_ended()
        self.assertIn("System is recovering from errors", bytes(player.received).decode())
        self.assertEqual(orch.provision_calls, [])

    async def test_at_capacity_is_a_503_capacity(self) -> None:
        orch = sim_orchestrator(self, max_replicas=1)
        orch.add_engine()
        proxy, _ = await proxy_with(self, orch)
        busy = await Player.open(self, proxy.stream_url(cid(1)))
        await busy.when_received(PACKET_SIZE)
        await proxy.service.monitor.fresh(0)  # the snapshot now says at capacity
        player = await Player.open(self, proxy.stream_url(cid(2)))
        self.assertEqual(player.code, 503)
        await player.when_ended()
        self.assertIn("Service at capacity", bytes(player.received).decode())
        self.assertEqual(orch.provision_calls, [])

    async def test_status_names_each_streams_engine(self) -> None:
        orch = sim_orchestrator(self)
        handle = orch.add_engine()
        proxy, _ = await proxy_with(self, orch)
        p = await Player.open(self, proxy.stream_url(cid(3)))
        await p.when_received(PACKET_SIZE)
        code, doc = await get_json(self, proxy.url(f"/ace/status?id={cid(3)}"))
        self.assertEqual(code, 200)
        self.assertEqual(doc["container_id"], handle.container_id)
        self.assertEqual(doc["engine"], f"http://127.0.0.1:{handle.port}")
