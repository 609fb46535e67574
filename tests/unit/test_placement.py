"""Placement under task.Clock with a Python-level fake orchestrator and engines."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from acexy_tw.content import ContentKey
from acexy_tw.engine import ContentError, EngineAddress, EngineError, PlaybackInfo
from acexy_tw.orchestrator.client import (
    BlockedDetails,
    OrchestratedEngine,
    OrchestratorStatus,
    OrchestratorUnavailable,
    ProvisionBlocked,
    ProvisionFailed,
    Provisioned,
    ProvisionTimeout,
)
from acexy_tw.orchestrator.health import HealthMonitor
from acexy_tw.retry import RetryPolicy
from acexy_tw.placement import NoEngine, Placement


def key(n: int) -> ContentKey:
    return ContentKey("content_id", f"{n:040x}")


def status(can_provision: bool = True, code: Optional[str] = None, eta: Optional[int] = None, vpn_down: bool = False) -> OrchestratorStatus:
    blocked = BlockedDetails(code, "blocked", eta, False, True) if code else None
    return OrchestratorStatus(
        status="healthy" if can_provision else "degraded",
        engines_total=1, engines_running=1, engines_healthy=1, streams_active=0,
        capacity_total=1, capacity_used=0, capacity_available=1, max_replicas=20,
        vpn_enabled=True, vpn_connected=not vpn_down, vpn_health=None,
        can_provision=can_provision, breaker_state="closed", blocked_reason=code, blocked=blocked, timestamp=None,
    )


class FakeEngine:
    """An EngineClient stand-in: start() answers, or refuses when told."""

    def __init__(self, host: str, port: int, container_id: Optional[str]) -> None:
        self.address = EngineAddress("http", host, port)
        self.container_id = container_id
        self.refuse: Optional[Exception] = None
        self.ready = True
        self.starts: list[ContentKey] = []
        self.versions = 0

    def start(self, k: ContentKey) -> Deferred:
        self.starts.append(k)
        if self.refuse is not None:
            return fail(self.refuse)
        return succeed(PlaybackInfo("http://x/r", "http://x/s", "http://x/c", k.value, f"{len(self.starts):040x}", 1))

    def version(self, timeout: Optional[float] = None) -> Deferred:
        self.versions += 1
        return succeed({}) if self.ready else fail(EngineError("refused"))


class FakeOrchestrator:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.engine_list: list[OrchestratedEngine] = []
        self.unreachable = False
        self.provision_answers: list[Any] = []  # exceptions or "ok"; default ok
        self.provision_calls: list[float] = []
        self.engines_calls = 0
        self.next_port = 20000
        self.list_new_engines = True
        self.pending_new: list[OrchestratedEngine] = []

    def add(self, n: int, streams: int = 0, healthy: bool = True) -> OrchestratedEngine:
        e = OrchestratedEngine(
            container_id=f"{n:064x}", container_name=f"acestream-{n}", host="10.9.0.1", port=19000 + n,
            streams=tuple(f"s{n}-{i}" for i in range(streams)), health_status="healthy" if healthy else "unhealthy",
        )
        self.engine_list.append(e)
        return e

    def engines(self) -> Deferred:
        self.engines_calls += 1
        if self.unreachable:
            return fail(OrchestratorUnavailable("refused"))
        return succeed(list(self.engine_list))

    def provision(self) -> Deferred:
        self.provision_calls.append(self.clock.seconds())
        answer = self.provision_answers.pop(0) if self.provision_answers else "ok"
        n = 100 + len(self.provision_calls)
        e = OrchestratedEngine(container_id=f"{n:064x}", container_name=f"acestream-{n}", host="10.9.0.2", port=self.next_port + n)
        if isinstance(answer, ProvisionTimeout):
            self.engine_list.append(e)  # it did start a container before timing out
            return fail(answer)
        if isinstance(answer, Exception):
            return fail(answer)
        self.engine_list.append(e)
        return succeed(Provisioned(e.container_id, e.container_name, e.port, e.port))


class Harness:
    def __init__(self, *, snapshot: Any = None, max_streams: int = 1, monitor: bool = True) -> None:
        self.clock = Clock()
        self.orch = FakeOrchestrator(self.clock)
        self.engines: dict[tuple[str, int], FakeEngine] = {}
        self.fallback = FakeEngine("localhost", 6878, None)
        self.snapshot = snapshot if snapshot is not None else status()
        self.monitor = HealthMonitor(self._status, self.clock, interval=30, outage_interval=10, timeout=5) if monitor else None
        self.placement = Placement(
            fallback=self.fallback,
            make_engine=self._make,
            clock=self.clock,
            orchestrator=self.orch,
            monitor=self.monitor,
            max_streams=max_streams,
            outage_poll_interval=10,
            engine_ready_timeout=30,
        )

    def _status(self) -> Deferred:
        if self.orch.unreachable:
            return fail(OrchestratorUnavailable("refused"))
        return succeed(self.snapshot)

    def _make(self, host: str, port: int, cid: Optional[str]) -> FakeEngine:
        e = self.engines.get((host, port))
        if e is None:
            e = self.engines[(host, port)] = FakeEngine(host, port, cid)
        return e

    def place(self, k: ContentKey) -> Deferred:
        return Deferred.fromCoroutine(self.placement.place(k))


class SelectionTests(SynchronousTestCase):
    def test_no_orchestrator_uses_the_configured_engine(self) -> None:
        h = Harness()
        h.placement.orchestrator = None
        engine, info = self.successResultOf(h.place(key(1)))
        self.assertIs(engine, h.fallback)

    def test_ten_concurrent_requests_land_on_ten_engines(self) -> None:
        h = Harness(max_streams=1)
        for n in range(10):
            h.orch.add(n)
        results = [self.successResultOf(h.place(key(n))) for n in range(10)]
        containers = {engine.container_id for engine, _ in results}
        self.assertEqual(len(containers), 10)
        self.assertEqual(h.orch.provision_calls, [])

    def test_max_streams_per_engine_is_respected_counting_our_own_sessions(self) -> None:
        h = Harness(max_streams=2)
        h.orch.add(1, streams=1)
        h.orch.add(2, streams=0)
        a, _ = self.successResultOf(h.place(key(1)))  # engine 2 (fewer streams)
        b, _ = self.successResultOf(h.place(key(2)))  # both at 1 now: engine 1 (tie on load, then id)
        c, _ = self.successResultOf(h.place(key(3)))  # engine 2 again (1 of ours < 2)
        self.assertEqual(a.container_id, f"{2:064x}")
        self.assertEqual(c.container_id, f"{2:064x}")
        self.assertEqual(h.orch.provision_calls, [])
        self.successResultOf(h.place(key(4)))  # everything full now: provision
        self.assertEqual(len(h.orch.provision_calls), 1)

    def test_released_sessions_free_their_slot(self) -> None:
        h = Harness()
        h.orch.add(1)
        self.successResultOf(h.place(key(1)))
        h.placement.release(key(1))
        engine, _ = self.successResultOf(h.place(key(2)))
        self.assertEqual(engine.container_id, f"{1:064x}")
        self.assertEqual(h.orch.provision_calls, [])

    def test_healthy_engine_is_preferred(self) -> None:
        h = Harness()
        h.orch.add(1, healthy=False)
        h.orch.add(2)
        engine, _ = self.successResultOf(h.place(key(1)))
        self.assertEqual(engine.container_id, f"{2:064x}")

    def test_engine_that_refuses_means_the_next_one(self) -> None:
        h = Harness()
        first = h.orch.add(1)
        h.orch.add(2)
        h._make(first.host, first.port, first.container_id).refuse = EngineError("connection refused")
        engine, _ = self.successResultOf(h.place(key(1)))
        self.assertEqual(engine.container_id, f"{2:064x}")
        self.flushLoggedErrors()

    def test_content_error_is_final(self) -> None:
        h = Harness()
        first = h.orch.add(1)
        h.orch.add(2)
        h._make(first.host, first.port, first.container_id).refuse = ContentError("no such content")
        self.failureResultOf(h.place(key(1)), ContentError)
        self.assertEqual(h.orch.provision_calls, [])

    def test_orchestrator_unreachable_falls_back_and_comes_back(self) -> None:
        h = Harness()
        h.orch.add(1)
        h.orch.unreachable = True
        engine, _ = self.successResultOf(h.place(key(1)))
        self.assertIs(engine, h.fallback)
        self.assertTrue(h.placement.in_outage)
        h.orch.unreachable = False
        engine, _ = self.successResultOf(h.place(key(2)))
        self.assertEqual(engine.container_id, f"{1:064x}")
        self.assertFalse(h.placement.in_outage)


class ProvisioningTests(SynchronousTestCase):
    def test_blocked_snapshot_means_no_post_and_a_503_at_once(self) -> None:
        h = Harness(snapshot=status(can_provision=False, code="vpn_disconnected", eta=60, vpn_down=True))
        f = self.failureResultOf(h.place(key(1)), NoEngine)
        self.assertEqual(h.orch.provision_calls, [])
        self.assertEqual(f.value.http_status, 503)
        self.assertEqual(f.value.code, "vpn_disconnected")
        self.assertEqual(f.value.retry_after, 60)
        self.assertIn("VPN connection is being restored", str(f.value))

    def test_breaker_and_capacity_messages(self) -> None:
        for code, text in (
            ("circuit_breaker", "System is recovering from errors"),
            ("max_capacity", "Service at capacity"),
        ):
            h = Harness(snapshot=status(can_provision=False, code=code, eta=None))
            f = self.failureResultOf(h.place(key(1)), NoEngine)
            self.assertIn(text, str(f.value))
            self.assertEqual(f.value.retry_after, 10)  # unknown ETA: the outage poll interval

    def test_a_503_is_a_wait_at_once_never_a_blind_retry(self) -> None:
        h = Harness()
        h.monitor.startService()
        blocked = ProvisionBlocked("vpn_disconnected", "VPN down", recovery_eta_seconds=60, can_retry=True, should_wait=True, http_status=503)
        h.orch.provision_answers = [blocked, "ok"]
        f = self.failureResultOf(h.place(key(1)), NoEngine)
        self.assertEqual((f.value.code, f.value.http_status, f.value.retry_after), ("vpn_disconnected", 503, 60))
        self.assertEqual(h.orch.provision_calls, [0])
        h.clock.pump([1] * 120)  # the ETA passes: placement itself never posts again
        self.assertEqual(h.orch.provision_calls, [0])
        h.monitor.stopService()

    def test_a_503_updates_the_monitor_at_once_and_blocks_the_next_post(self) -> None:
        h = Harness()
        h.monitor.startService()
        polls = h.monitor.polls
        h.orch.provision_answers = [ProvisionBlocked("circuit_breaker", "open", recovery_eta_seconds=0, should_wait=True)]
        self.failureResultOf(h.place(key(1)), NoEngine)
        self.assertEqual(h.monitor.polls, polls + 1)  # the status is asked again at once
        self.assertTrue(h.monitor.blocked)  # the lagging snapshot still says can_provision
        self.assertEqual(h.monitor.current_interval, 10)  # outage polling
        f = self.failureResultOf(h.place(key(2)), NoEngine)
        self.assertEqual(f.value.code, "circuit_breaker")
        self.assertEqual(len(h.orch.provision_calls), 1)  # no second POST
        h.monitor.stopService()

    def test_the_refusal_stands_until_the_status_changes(self) -> None:
        h = Harness()
        h.monitor.startService()
        h.orch.provision_answers = [ProvisionBlocked("vpn_disconnected", "VPN down", recovery_eta_seconds=60, should_wait=True)]
        self.failureResultOf(h.place(key(1)), NoEngine)
        h.clock.advance(10)  # a poll: the status still lags
        self.assertTrue(h.monitor.blocked)
        h.snapshot = status(can_provision=False, code="vpn_disconnected", vpn_down=True)
        h.clock.advance(10)  # the status caught up: it rules from now on
        self.assertIsNone(h.monitor.refusal)
        self.assertEqual(h.monitor.blocked_code, "vpn_disconnected")
        h.snapshot = status()
        h.clock.advance(10)  # VPN back
        self.assertFalse(h.monitor.blocked)
        self.successResultOf(h.place(key(1)))
        self.assertEqual(len(h.orch.provision_calls), 2)
        h.monitor.stopService()

    def test_a_refusal_the_status_never_shows_expires_after_the_normal_interval(self) -> None:
        h = Harness()
        h.monitor.startService()
        h.orch.provision_answers = [ProvisionBlocked("vpn_disconnected", "VPN down", recovery_eta_seconds=60, should_wait=True)]
        self.failureResultOf(h.place(key(1)), NoEngine)
        h.clock.pump([10, 10])
        self.assertTrue(h.monitor.blocked)
        h.clock.advance(10)  # 30 s: at most one POST per normal interval while the status lies
        self.assertFalse(h.monitor.blocked)
        h.monitor.stopService()

    def test_gluetun_active_replicas_500_is_a_capacity_wait(self) -> None:
        from acexy_tw.orchestrator.client import OrchestratorClient

        client = OrchestratorClient(None, "http://orch", "k", Clock())  # type: ignore[arg-type]
        refusal = client._error(500, b'{"detail": "Maximum active replicas limit reached (2)"}', "provision",
                                posted=True, unknown_outcome=ProvisionTimeout)
        h = Harness()
        h.monitor.startService()
        h.orch.provision_answers = [refusal]
        f = self.failureResultOf(h.place(key(1)), NoEngine)
        self.assertEqual((f.value.code, f.value.http_status), ("max_capacity", 503))
        self.assertEqual(h.monitor.blocked_code, "max_capacity")
        h.monitor.stopService()

    def test_no_post_when_the_engines_reach_max_replicas(self) -> None:
        h = Harness(snapshot=replace(status(), max_replicas=2))
        h.orch.add(1, streams=1)
        h.orch.add(2, streams=1)  # both busy, max_replicas reached: the POST would not refuse
        f = self.failureResultOf(h.place(key(3)), NoEngine)
        self.assertEqual((f.value.code, f.value.http_status), ("max_capacity", 503))
        self.assertEqual(h.orch.provision_calls, [])

    def test_provisions_in_flight_count_toward_max_replicas(self) -> None:
        h = Harness(snapshot=replace(status(), max_replicas=1))
        pending: Deferred = Deferred()
        h.orch.provision = lambda: (h.orch.provision_calls.append(0), pending)[1]  # type: ignore[assignment]
        h.place(key(1))  # posted, not answered yet
        f = self.failureResultOf(h.place(key(2)), NoEngine)
        self.assertEqual(f.value.code, "max_capacity")
        self.assertEqual(h.orch.provision_calls, [0])

    def test_a_403_is_a_502_naming_the_setting_and_an_operator_warning(self) -> None:
        from acexy_tw.orchestrator.client import OrchestratorAuthError

        h = Harness()
        h.orch.provision_answers = [OrchestratorAuthError("orchestrator refused provision with HTTP 403: check ACEXY_ORCH_APIKEY", 403)]
        f = self.failureResultOf(h.place(key(1)), NoEngine)
        self.assertEqual(f.value.http_status, 502)
        self.assertIn("ACEXY_ORCH_APIKEY", str(f.value))
        self.assertTrue(any("ACEXY_ORCH_APIKEY" in w for w in h.monitor.warnings()))
        self.assertEqual(h.monitor.auth_failures, 1)
        self.successResultOf(h.place(key(2)))  # a POST that works clears the warning
        self.assertFalse(any("ACEXY_ORCH_APIKEY" in w for w in h.monitor.warnings()))
        self.flushLoggedErrors()

    def test_timeouts_are_reposted_under_the_retry_policy_bounded_and_spaced(self) -> None:
        h = Harness()
        h.placement.retry = RetryPolicy(3, initial=1.0, factor=2.0, jitter=lambda: 0)

        def provision() -> Deferred:  # every POST times out and starts nothing, forever
            h.orch.provision_calls.append(h.clock.seconds())
            return fail(ProvisionTimeout("no answer in 60s"))

        h.orch.provision = provision  # type: ignore[assignment]
        d = h.place(key(1))
        h.clock.pump([1] * 60)
        self.assertEqual(h.orch.provision_calls, [0, 1, 3])
        self.assertEqual(self.failureResultOf(d, NoEngine).value.code, "provision_timeout")

    def test_a_500_is_not_retried(self) -> None:
        h = Harness()
        h.orch.provision_answers = [ProvisionFailed("general_error", "docker exploded", http_status=500)]
        f = self.failureResultOf(h.place(key(1)), NoEngine)
        self.assertEqual(h.orch.provision_calls, [0])
        self.assertEqual(f.value.http_status, 502)
        self.assertIn("docker exploded", str(f.value))
        h.clock.advance(1000)
        self.assertEqual(len(h.orch.provision_calls), 1)

    def test_after_a_timeout_it_looks_in_engines_before_posting_again(self) -> None:
        h = Harness()
        h.orch.provision_answers = [ProvisionTimeout("no answer in 60s")]
        engine, _ = self.successResultOf(h.place(key(1)))
        self.assertEqual(len(h.orch.provision_calls), 1)  # found the one it started
        self.assertEqual(engine.container_id, h.orch.engine_list[-1].container_id)

    def test_new_engine_is_polled_until_it_answers_then_used_at_the_listed_address(self) -> None:
        h = Harness()
        # the engine will be created by the provision call; make it not ready yet
        real_make = h._make

        def make(host: str, port: int, cid: Optional[str]) -> FakeEngine:
            e = real_make(host, port, cid)
            if e.versions == 0 and not hasattr(e, "_set"):
                e.ready = False
                e._set = True  # type: ignore[attr-defined]
            return e

        h.placement._make_engine = make
        d = h.place(key(1))
        self.assertNoResult(d)
        new = h.orch.engine_list[-1]
        fake = h.engines[(new.host, new.port)]
        h.clock.pump([0.25] * 4)
        self.assertNoResult(d)
        self.assertEqual(fake.versions, 5)
        fake.ready = True
        h.clock.advance(0.25)  # answered: no fixed sleep beyond the next poll
        engine, _ = self.successResultOf(d)
        self.assertEqual((engine.address.host, engine.address.port), (new.host, new.port))

    @staticmethod
    def _engines_never_ready(h: "Harness") -> None:
        real_make = h._make

        def make(host: str, port: int, cid: Optional[str]) -> FakeEngine:
            e = real_make(host, port, cid)
            e.ready = False
            return e

        h.placement._make_engine = make

    def test_engine_never_ready_times_out(self) -> None:
        h = Harness()
        self._engines_never_ready(h)
        d = h.place(key(1))
        h.clock.pump([0.25] * 121)
        f = self.failureResultOf(d, NoEngine)
        self.assertEqual(f.value.code, "engine_not_ready")
        self.assertEqual(f.value.retry_after, 10)  # the outage poll interval
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_retry_after_is_never_below_one_second(self) -> None:
        # An outage poll interval under a second must not answer "Retry-After: 0"
        # (a player would hammer the proxy): every refusal says at least 1.
        h = Harness()
        h.placement.outage_poll_interval = 0.4
        self._engines_never_ready(h)
        d = h.place(key(1))
        h.clock.pump([0.25] * 121)
        self.assertEqual(self.failureResultOf(d, NoEngine).value.retry_after, 1)


class UnavailableTests(SynchronousTestCase):
    def test_unavailable_and_blocked_is_a_holdable_unavailable(self) -> None:
        snap = OrchestratorStatus(
            status="unavailable", engines_total=0, engines_running=0, engines_healthy=0, streams_active=0,
            capacity_total=0, capacity_used=0, capacity_available=0, max_replicas=20,
            vpn_enabled=False, vpn_connected=False, vpn_health=None,
            can_provision=False, breaker_state="closed", blocked_reason=None, blocked=None, timestamp=None,
        )
        h = Harness(snapshot=snap)
        f = self.failureResultOf(h.place(key(1)), NoEngine)
        self.assertEqual(f.value.code, "unavailable")
        self.assertEqual(f.value.http_status, 503)
        self.assertIn("no engine is running", str(f.value))
        self.assertEqual(h.orch.provision_calls, [])
