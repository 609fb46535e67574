"""Placement as build() wires it, on the clock, with the scripted orchestrator
and engines of acexy_tw.testing (InMemoryProxy with ``orchestrator=True``)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from acexy_tw.content import ContentKey
from acexy_tw.engine import ContentError, EngineError
from acexy_tw.orchestrator.client import ProvisionBlocked, ProvisionFailed, ProvisionTimeout
from acexy_tw.placement import NoEngine
from acexy_tw.testing import InMemoryProxy, orchestrator_status as status


def key(n: int) -> ContentKey:
    return ContentKey("content_id", f"{n:040x}")


def proxy(snapshot: Any = None, **settings: Any) -> InMemoryProxy:
    """The proxy with a scripted orchestrator whose status is ``snapshot`` (healthy by default)."""
    if snapshot is not None:
        settings["snapshot"] = snapshot
    return InMemoryProxy(orchestrator=True, **settings)


def place(p: InMemoryProxy, k: ContentKey) -> Deferred:
    return Deferred.fromCoroutine(p.placement.place(k))


class SelectionTests(SynchronousTestCase):
    def test_no_orchestrator_uses_the_configured_engine(self) -> None:
        p = InMemoryProxy()
        engine, info = self.successResultOf(place(p, key(1)))
        self.assertIs(engine, p.engine)
        self.assertEqual(p.engine.attempts, [key(1)])

    def test_ten_concurrent_requests_land_on_ten_engines(self) -> None:
        p = proxy(max_streams_per_engine=1)
        for n in range(10):
            p.orchestrator.add(n)
        results = [self.successResultOf(place(p, key(n))) for n in range(10)]
        containers = {engine.container_id for engine, _ in results}
        self.assertEqual(len(containers), 10)
        self.assertEqual(p.orchestrator.provision_calls, [])

    def test_max_streams_per_engine_is_respected_counting_our_own_sessions(self) -> None:
        p = proxy(max_streams_per_engine=2)
        p.orchestrator.add(1, streams=1)
        p.orchestrator.add(2, streams=0)
        a, _ = self.successResultOf(place(p, key(1)))  # engine 2 (fewer streams)
        b, _ = self.successResultOf(place(p, key(2)))  # both at 1 now: engine 1 (tie on load, then id)
        c, _ = self.successResultOf(place(p, key(3)))  # engine 2 again (1 of ours < 2)
        self.assertEqual(a.container_id, f"{2:064x}")
        self.assertEqual(c.container_id, f"{2:064x}")
        self.assertEqual(p.orchestrator.provision_calls, [])
        self.successResultOf(place(p, key(4)))  # everything full now: provision
        self.assertEqual(len(p.orchestrator.provision_calls), 1)

    def test_released_sessions_free_their_slot(self) -> None:
        p = proxy()
        p.orchestrator.add(1)
        self.successResultOf(place(p, key(1)))
        p.placement.release(key(1))
        engine, _ = self.successResultOf(place(p, key(2)))
        self.assertEqual(engine.container_id, f"{1:064x}")
        self.assertEqual(p.orchestrator.provision_calls, [])

    def test_healthy_engine_is_preferred(self) -> None:
        p = proxy()
        p.orchestrator.add(1, healthy=False)
        p.orchestrator.add(2)
        engine, _ = self.successResultOf(place(p, key(1)))
        self.assertEqual(engine.container_id, f"{2:064x}")

    def test_engine_that_refuses_means_the_next_one(self) -> None:
        p = proxy()
        first = p.orchestrator.add(1)
        p.orchestrator.add(2)
        p.engine_of(first).script = [EngineError("connection refused")]
        engine, _ = self.successResultOf(place(p, key(1)))
        self.assertEqual(engine.container_id, f"{2:064x}")
        self.assertEqual(p.engine_of(first).attempts, [key(1)])

    def test_content_error_is_final(self) -> None:
        p = proxy()
        first = p.orchestrator.add(1)
        p.orchestrator.add(2)
        p.engine_of(first).script = [ContentError("no such content")]
        self.failureResultOf(place(p, key(1)), ContentError)
        self.assertEqual(p.orchestrator.provision_calls, [])

    def test_orchestrator_unreachable_falls_back_and_comes_back(self) -> None:
        p = proxy()
        p.orchestrator.add(1)
        p.orchestrator.unreachable = True
        engine, _ = self.successResultOf(place(p, key(1)))
        self.assertIs(engine, p.engine)
        self.assertTrue(p.placement.in_outage)
        p.orchestrator.unreachable = False
        engine, _ = self.successResultOf(place(p, key(2)))
        self.assertEqual(engine.container_id, f"{1:064x}")
        self.assertFalse(p.placement.in_outage)


class ProvisioningTests(SynchronousTestCase):
    def test_blocked_snapshot_means_no_post_and_a_503_at_once(self) -> None:
        p = proxy(status(can_provision=False, code="vpn_disconnected", eta=60, vpn_down=True))
        f = self.failureResultOf(place(p, key(1)), NoEngine)
        self.assertEqual(p.orchestrator.provision_calls, [])
        self.assertEqual(f.value.http_status, 503)
        self.assertEqual(f.value.code, "vpn_disconnected")
        self.assertEqual(f.value.retry_after, 60)
        self.assertIn("VPN connection is being restored", str(f.value))

    def test_breaker_and_capacity_messages(self) -> None:
        for code, text in (
            ("circuit_breaker", "System is recovering from errors"),
            ("max_capacity", "Service at capacity"),
        ):
            p = proxy(status(can_provision=False, code=code, eta=None))
            f = self.failureResultOf(place(p, key(1)), NoEngine)
            self.assertIn(text, str(f.value))
            self.assertEqual(f.value.retry_after, 10)  # unknown ETA: the outage poll interval

    def test_a_503_is_a_wait_at_once_never_a_blind_retry(self) -> None:
        p = proxy()
        p.monitor.startService()
        blocked = ProvisionBlocked("vpn_disconnected", "VPN down", recovery_eta_seconds=60, can_retry=True, should_wait=True, http_status=503)
        p.orchestrator.provision_answers = [blocked, "ok"]
        f = self.failureResultOf(place(p, key(1)), NoEngine)
        self.assertEqual((f.value.code, f.value.http_status, f.value.retry_after), ("vpn_disconnected", 503, 60))
        self.assertEqual(p.orchestrator.provision_calls, [0])
        p.clock.pump([1] * 120)  # the ETA passes: placement itself never posts again
        self.assertEqual(p.orchestrator.provision_calls, [0])
        p.monitor.stopService()

    def test_a_503_updates_the_monitor_at_once_and_blocks_the_next_post(self) -> None:
        p = proxy()
        p.monitor.startService()
        polls = p.monitor.polls
        p.orchestrator.provision_answers = [ProvisionBlocked("circuit_breaker", "open", recovery_eta_seconds=0, should_wait=True)]
        self.failureResultOf(place(p, key(1)), NoEngine)
        self.assertEqual(p.monitor.polls, polls + 1)  # the status is asked again at once
        self.assertTrue(p.monitor.blocked)  # the lagging snapshot still says can_provision
        self.assertEqual(p.monitor.current_interval, 10)  # outage polling
        f = self.failureResultOf(place(p, key(2)), NoEngine)
        self.assertEqual(f.value.code, "circuit_breaker")
        self.assertEqual(len(p.orchestrator.provision_calls), 1)  # no second POST
        p.monitor.stopService()

    def test_the_refusal_stands_until_the_status_changes(self) -> None:
        p = proxy()
        p.monitor.startService()
        p.orchestrator.provision_answers = [ProvisionBlocked("vpn_disconnected", "VPN down", recovery_eta_seconds=60, should_wait=True)]
        self.failureResultOf(place(p, key(1)), NoEngine)
        p.clock.advance(10)  # a poll: the status still lags
        self.assertTrue(p.monitor.blocked)
        p.orchestrator.snapshot = status(can_provision=False, code="vpn_disconnected", vpn_down=True)
        p.clock.advance(10)  # the status caught up: it rules from now on
        self.assertIsNone(p.monitor.refusal)
        self.assertEqual(p.monitor.blocked_code, "vpn_disconnected")
        p.orchestrator.snapshot = status()
        p.clock.advance(10)  # VPN back
        self.assertFalse(p.monitor.blocked)
        self.successResultOf(place(p, key(1)))
        self.assertEqual(len(p.orchestrator.provision_calls), 2)
        p.monitor.stopService()

    def test_a_refusal_the_status_never_shows_expires_after_the_normal_interval(self) -> None:
        p = proxy()
        p.monitor.startService()
        p.orchestrator.provision_answers = [ProvisionBlocked("vpn_disconnected", "VPN down", recovery_eta_seconds=60, should_wait=True)]
        self.failureResultOf(place(p, key(1)), NoEngine)
        p.clock.pump([10, 10])
        self.assertTrue(p.monitor.blocked)
        p.clock.advance(10)  # 30 s: at most one POST per normal interval while the status lies
        self.assertFalse(p.monitor.blocked)
        p.monitor.stopService()

    def test_gluetun_active_replicas_500_is_a_capacity_wait(self) -> None:
        from acexy_tw.orchestrator.client import OrchestratorClient

        client = OrchestratorClient(None, "http://orch", "k", Clock())  # type: ignore[arg-type]
        refusal = client._error(500, b'{"detail": "Maximum active replicas limit reached (2)"}', "provision",
                                posted=True, unknown_outcome=ProvisionTimeout)
        p = proxy()
        p.monitor.startService()
        p.orchestrator.provision_answers = [refusal]
        f = self.failureResultOf(place(p, key(1)), NoEngine)
        self.assertEqual((f.value.code, f.value.http_status), ("max_capacity", 503))
        self.assertEqual(p.monitor.blocked_code, "max_capacity")
        p.monitor.stopService()

    def test_no_post_when_the_engines_reach_max_replicas(self) -> None:
        p = proxy(replace(status(), max_replicas=2))
        p.orchestrator.add(1, streams=1)
        p.orchestrator.add(2, streams=1)  # both busy, max_replicas reached: the POST would not refuse
        f = self.failureResultOf(place(p, key(3)), NoEngine)
        self.assertEqual((f.value.code, f.value.http_status), ("max_capacity", 503))
        self.assertEqual(p.orchestrator.provision_calls, [])

    def test_provisions_in_flight_count_toward_max_replicas(self) -> None:
        p = proxy(replace(status(), max_replicas=1))
        pending: Deferred = Deferred()
        p.orchestrator.provision = lambda: (p.orchestrator.provision_calls.append(0), pending)[1]  # type: ignore[assignment]
        place(p, key(1))  # posted, not answered yet
        f = self.failureResultOf(place(p, key(2)), NoEngine)
        self.assertEqual(f.value.code, "max_capacity")
        self.assertEqual(p.orchestrator.provision_calls, [0])

    def test_a_403_is_a_502_naming_the_setting_and_an_operator_warning(self) -> None:
        from acexy_tw.orchestrator.client import OrchestratorAuthError

        p = proxy()
        p.orchestrator.provision_answers = [OrchestratorAuthError("orchestrator refused provision with HTTP 403: check ACEXY_ORCH_APIKEY", 403)]
        f = self.failureResultOf(place(p, key(1)), NoEngine)
        self.assertEqual(f.value.http_status, 502)
        self.assertIn("ACEXY_ORCH_APIKEY", str(f.value))
        self.assertTrue(any("ACEXY_ORCH_APIKEY" in w for w in p.monitor.warnings()))
        self.assertEqual(p.monitor.auth_failures, 1)
        self.successResultOf(place(p, key(2)))  # a POST that works clears the warning
        self.assertFalse(any("ACEXY_ORCH_APIKEY" in w for w in p.monitor.warnings()))

    def test_timeouts_are_reposted_under_the_retry_policy_bounded_and_spaced(self) -> None:
        p = proxy()  # build's policy: 3 POSTs, 1 s then doubling (no jitter on the test's clock)

        def provision() -> Deferred:  # every POST times out and starts nothing, forever
            p.orchestrator.provision_calls.append(p.clock.seconds())
            return fail(ProvisionTimeout("no answer in 60s"))

        p.orchestrator.provision = provision  # type: ignore[assignment]
        d = place(p, key(1))
        p.clock.pump([1] * 60)
        self.assertEqual(p.orchestrator.provision_calls, [0, 1, 3])
        self.assertEqual(self.failureResultOf(d, NoEngine).value.code, "provision_timeout")

    def test_a_500_is_not_retried(self) -> None:
        p = proxy()
        p.orchestrator.provision_answers = [ProvisionFailed("general_error", "docker exploded", http_status=500)]
        f = self.failureResultOf(place(p, key(1)), NoEngine)
        self.assertEqual(p.orchestrator.provision_calls, [0])
        self.assertEqual(f.value.http_status, 502)
        self.assertIn("docker exploded", str(f.value))
        p.clock.advance(1000)
        self.assertEqual(len(p.orchestrator.provision_calls), 1)

    def test_after_a_timeout_it_looks_in_engines_before_posting_again(self) -> None:
        p = proxy()
        p.orchestrator.provision_answers = [ProvisionTimeout("no answer in 60s")]
        engine, _ = self.successResultOf(place(p, key(1)))
        self.assertEqual(len(p.orchestrator.provision_calls), 1)  # found the one it started
        self.assertEqual(engine.container_id, p.orchestrator.engine_list[-1].container_id)

    def test_new_engine_is_polled_until_it_answers_then_used_at_the_listed_address(self) -> None:
        p = proxy(engine_options={"ready": False})  # the engine provisioned does not answer yet
        d = place(p, key(1))
        self.assertNoResult(d)
        new = p.orchestrator.engine_list[-1]
        fake = p.engines[(new.host, new.port)]
        p.clock.pump([0.25] * 4)
        self.assertNoResult(d)
        self.assertEqual(fake.versions, 5)
        fake.ready = True
        p.clock.advance(0.25)  # answered: no fixed sleep beyond the next poll
        engine, _ = self.successResultOf(d)
        self.assertIs(engine, fake)
        self.assertEqual((engine.address.host, engine.address.port), (new.host, new.port))
        self.assertEqual(fake.attempts, [key(1)])

    def test_engine_never_ready_times_out(self) -> None:
        p = proxy(engine_options={"ready": False})
        d = place(p, key(1))
        p.clock.pump([0.25] * 121)
        f = self.failureResultOf(d, NoEngine)
        self.assertEqual(f.value.code, "engine_not_ready")
        self.assertEqual(f.value.retry_after, 10)  # the outage poll interval
        self.assertEqual(p.clock.getDelayedCalls(), [])

    def test_retry_after_is_never_below_one_second(self) -> None:
        # An outage poll interval under a second must not answer "Retry-After: 0"
        # (a player would hammer the proxy): every refusal says at least 1.
        p = proxy(outage_poll_interval=0.4, engine_options={"ready": False})
        d = place(p, key(1))
        p.clock.pump([0.25] * 121)
        self.assertEqual(self.failureResultOf(d, NoEngine).value.retry_after, 1)


class UnavailableTests(SynchronousTestCase):
    def test_unavailable_and_blocked_is_a_holdable_unavailable(self) -> None:
        snap = replace(
            status(can_provision=False, status="unavailable"),  # no engine, no VPN, nothing blocked
            engines_total=0, engines_running=0, engines_healthy=0, capacity_total=0, capacity_available=0,
            vpn_enabled=False, vpn_connected=False,
        )
        p = proxy(snap)
        f = self.failureResultOf(place(p, key(1)), NoEngine)
        self.assertEqual(f.value.code, "unavailable")
        self.assertEqual(f.value.http_status, 503)
        self.assertIn("no engine is running", str(f.value))
        self.assertEqual(p.orchestrator.provision_calls, [])
