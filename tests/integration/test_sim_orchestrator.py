"""
The simulated acestream-orchestrator over real loopback sockets.

Trial test cases (real reactor, port 0 on 127.0.0.1, a treq client on its
own non-persistent pool).  Waits are bounded (``orch.when`` for state) and
nothing sleeps or polls: what only changes with time (the breaker ETA, the
provision and ready delays, the status lag) is checked on a ``task.Clock``,
with the HTTP API served in memory (``ClockTests``).  Every test leaves the
reactor clean: the cleanups close the pool, then shut the orchestrator and
all its engines down.

Runs under ``pytest -p no:twisted`` and ``python -m twisted.trial``.
"""

from __future__ import annotations

import json
import re
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from treq.client import HTTPClient

from acexy_tw.sim.orchestrator import SimOrchestrator, _arguments, rfc3339
from tests.integration.test_sim_engine import Clocked

TIMEOUT = 10
KEY = "test-key"
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?[+-]\d\d:\d\d$")
HEX64 = re.compile(r"^[0-9a-f]{64}$")


def within(d: Deferred, seconds: float = TIMEOUT) -> Deferred:
    return d.addTimeout(seconds, reactor)


async def failure_of(d: Deferred) -> Failure:
    box: List[Failure] = []

    def unexpected(value: Any) -> None:
        raise AssertionError(f"expected a failure, got {value!r}")

    await within(d.addCallbacks(unexpected, box.append))
    return box[0]


class OrchestratorTestCase(TestCase):
    timeout = 30
    options: Dict[str, Any] = {}

    def setUp(self) -> None:
        self.orch = SimOrchestrator(reactor, api_key=KEY, **self.options)
        self.orch.listen()
        self.addCleanup(lambda: within(self.orch.shutdown()))
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.pool.retryAutomatically = False
        self.addCleanup(self.pool.closeCachedConnections)
        self.http = HTTPClient(Agent(reactor, pool=self.pool))

    async def call(
        self, method: str, path: str, body: Any = None, *, key: Optional[str] = KEY, base: Optional[str] = None
    ) -> Tuple[int, Any]:
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = json.dumps(body).encode()
        url = (base or self.orch.url) + path
        response = await within(self.http.request(method, url, headers=headers, data=data))
        raw = await within(response.content())
        try:
            return response.code, json.loads(raw)
        except ValueError:
            return response.code, raw.decode("utf-8", "replace")

    async def status(self) -> Dict[str, Any]:
        code, doc = await self.call("GET", "/orchestrator/status")
        self.assertEqual(code, 200)
        return doc

    async def provision(self, **kwargs: Any) -> Tuple[int, Any]:
        return await self.call("POST", "/provision/acestream", {"labels": {}, "env": {}}, **kwargs)

    async def refused(self, status: int) -> Dict[str, Any]:
        """Provision, expecting a structured refusal with ``status``: its ``detail``,
        with the free-text ``message`` checked and removed."""
        code, body = await self.provision()
        self.assertEqual(code, status)
        self.assertEqual(set(body), {"detail"})
        detail = body["detail"]
        self.assertIsInstance(detail.pop("message"), str)
        return detail

    def started_event(self, handle: Any, stream_id: str = "abc|psid-1", **overrides: Any) -> dict:
        session = {
            "playback_session_id": stream_id.split("|")[-1],
            "stat_url": "http://127.0.0.1:6878/ace/stat/x/y",
            "command_url": "http://127.0.0.1:6878/ace/cmd/x/y",
            "is_live": 1,
        }
        session.update(overrides.pop("session", {}))
        event = {
            "container_id": handle.container_id,
            "engine": {"host": "127.0.0.1", "port": handle.port},
            "stream": {"key_type": "content_id", "key": stream_id.split("|")[0]},
            "session": session,
            "labels": {"stream_id": stream_id},
        }
        event.update(overrides)
        return event

    async def engine_answers(self, port: int) -> bool:
        """True if the engine on ``port`` answers get_version, False if refused."""
        url = f"http://127.0.0.1:{port}/webui/api/service?method=get_version"
        try:
            response = await within(self.http.get(url))
        except ConnectionRefusedError:
            return False
        body = await within(response.json())
        return response.code == 200 and body["error"] is None


class StatusTests(OrchestratorTestCase):
    async def test_every_key_of_the_status_document(self) -> None:
        busy = self.orch.add_engine(streams=1, forwarded=True)
        self.orch.add_engine(healthy=False)
        doc = await self.status()
        self.assertEqual(
            set(doc), {"status", "engines", "streams", "capacity", "vpn", "provisioning", "timestamp"}
        )
        self.assertEqual(doc["status"], "healthy")
        self.assertEqual(doc["engines"], {"total": 2, "running": 2, "healthy": 1, "unhealthy": 1})
        self.assertEqual(doc["streams"], {"active": 1, "total": 1})
        self.assertEqual(
            doc["capacity"], {"total": 2, "used": 1, "available": 1, "max_replicas": 20, "min_replicas": 0}
        )
        self.assertEqual(
            doc["vpn"],
            {"enabled": True, "connected": True, "health": "healthy", "container": "gluetun", "forwarded_port": 41234},
        )
        self.assertEqual(
            doc["provisioning"],
            {
                "can_provision": True,
                "circuit_breaker_state": "closed",
                "last_failure": None,
                "blocked_reason": None,
                "blocked_reason_details": None,
            },
        )
        self.assertRegex(doc["timestamp"], RFC3339)
        self.assertEqual(self.orch.status_calls, 1)
        self.assertEqual(busy.stream_ids, [f"sim-{busy.container_name}-0"])

    async def test_unavailable_without_engines(self) -> None:
        doc = await self.status()
        self.assertEqual(doc["status"], "unavailable")
        self.assertEqual(doc["capacity"]["total"], 0)

    async def test_vpn_disconnected_degrades(self) -> None:
        self.orch.add_engine()
        self.orch.set_vpn(connected=False)
        doc = await self.status()
        self.assertEqual(doc["status"], "degraded")
        self.assertEqual(
            doc["vpn"],
            {
                "enabled": True,
                "connected": False,
                "health": "unhealthy",
                "container": "gluetun",
                "forwarded_port": None,
            },
        )
        provisioning = doc["provisioning"]
        self.assertFalse(provisioning["can_provision"])
        self.assertIsInstance(provisioning["blocked_reason"], str)
        self.assertEqual(
            {k: v for k, v in provisioning["blocked_reason_details"].items() if k != "message"},
            {"code": "vpn_disconnected", "recovery_eta_seconds": 60, "can_retry": True, "should_wait": True},
        )

    async def test_vpn_disabled_is_not_down(self) -> None:
        self.orch.add_engine()
        self.orch.set_vpn(connected=False, enabled=False)
        doc = await self.status()
        self.assertEqual(doc["status"], "healthy")
        self.assertEqual((doc["vpn"]["enabled"], doc["vpn"]["connected"]), (False, False))
        self.assertTrue(doc["provisioning"]["can_provision"])
        code, _ = await self.provision()
        self.assertEqual(code, 200)

    async def test_vpn_error_degrades(self) -> None:
        self.orch.add_engine()
        self.orch.vpn_error(True)
        doc = await self.status()
        self.assertEqual(doc["status"], "degraded")
        self.assertEqual(doc["vpn"]["health"], "unhealthy")
        self.assertEqual(doc["provisioning"]["blocked_reason_details"]["code"], "vpn_error")
        self.orch.vpn_error(False)
        self.assertEqual((await self.status())["status"], "healthy")

    async def test_max_capacity_only_in_status(self) -> None:
        """The status says max_capacity; the provision (replica_limit "none")
        does not enforce it and starts another engine."""
        self.assertEqual(self.orch.replica_limit, "none")
        self.orch.max_replicas = 1
        self.orch.add_engine()
        doc = await self.status()
        self.assertEqual(doc["status"], "healthy")
        self.assertFalse(doc["provisioning"]["can_provision"])
        details = doc["provisioning"]["blocked_reason_details"]
        self.assertEqual(
            {k: v for k, v in details.items() if k != "message"},
            {"code": "max_capacity", "recovery_eta_seconds": 30, "can_retry": False, "should_wait": True},
        )
        code, body = await self.provision()
        self.assertEqual(code, 200)
        self.assertEqual([h.container_id for h in self.orch.provisioned], [body["container_id"]])
        self.assertEqual(len(self.orch.engines), 2)
        doc = await self.status()
        self.assertEqual((doc["capacity"]["total"], doc["capacity"]["max_replicas"]), (2, 1))
        self.assertEqual(doc["provisioning"]["blocked_reason_details"]["code"], "max_capacity")


class ProvisionErrorTests(OrchestratorTestCase):
    async def test_auth(self) -> None:
        self.assertEqual(await self.provision(key=None), (401, {"detail": "missing bearer token"}))
        self.assertEqual(await self.provision(key="wrong"), (403, {"detail": "invalid token"}))
        for path in ("/events/stream_started", "/events/stream_ended"):
            self.assertEqual(await self.call("POST", path, {}, key=None), (401, {"detail": "missing bearer token"}))
            self.assertEqual(await self.call("POST", path, {}, key="x"), (403, {"detail": "invalid token"}))
        self.assertEqual(len(self.orch.provision_calls), 2)
        self.assertEqual(self.orch.provisioned, [])
        self.assertEqual([e["code"] for e in self.orch.rejected_events], [401, 403, 401, 403])
        self.assertEqual(self.orch.auth_headers, ["Bearer wrong", "Bearer x", "Bearer x"])
        # harmless on GETs
        code, _ = await self.call("GET", "/engines", key="wrong")
        self.assertEqual(code, 200)
        self.assertEqual(self.orch.auth_headers[-1], "Bearer wrong")
        self.assertEqual(self.orch.requests[-1], ("GET", "/engines", "Bearer wrong"))

    async def test_vpn_disconnected(self) -> None:
        self.orch.set_vpn(connected=False)
        detail = await self.refused(503)
        self.assertEqual(
            detail,
            {
                "error": "provisioning_blocked",
                "code": "vpn_disconnected",
                "recovery_eta_seconds": 60,
                "can_retry": True,
                "should_wait": True,
            },
        )
        self.assertEqual(len(self.orch.provision_calls), 1)
        self.orch.set_vpn(connected=True)
        code, _ = await self.provision()
        self.assertEqual(code, 200)

    async def test_vpn_error(self) -> None:
        self.orch.vpn_error(True)
        detail = await self.refused(503)
        self.assertEqual(
            detail,
            {
                "error": "provisioning_failed",
                "code": "vpn_error",
                "recovery_eta_seconds": 60,
                "can_retry": True,
                "should_wait": True,
            },
        )
        self.assertRegex((await self.status())["provisioning"]["last_failure"], RFC3339)

    async def test_breaker_refuses_with_its_eta_until_closed(self) -> None:
        """(Its countdown: ``ClockTests.test_breaker_counts_down_and_stays_open_at_zero``.)"""
        self.orch.open_breaker(1)
        detail = await self.refused(503)
        self.assertEqual(
            detail,
            {
                "error": "provisioning_blocked",
                "code": "circuit_breaker",
                "recovery_eta_seconds": 1,
                "can_retry": False,
                "should_wait": True,
            },
        )
        doc = await self.status()
        self.assertEqual(doc["provisioning"]["circuit_breaker_state"], "open")
        self.assertEqual(doc["provisioning"]["blocked_reason_details"]["recovery_eta_seconds"], 1)
        self.assertFalse(doc["provisioning"]["can_provision"])

        self.orch.close_breaker()
        self.assertEqual((await self.status())["provisioning"]["circuit_breaker_state"], "closed")
        code, _ = await self.provision()
        self.assertEqual(code, 200)

    async def test_breaker_half_open_can_retry(self) -> None:
        self.orch.add_engine()
        self.orch.open_breaker(120, half_open=True)
        code, body = await self.provision()
        self.assertEqual(code, 503)
        self.assertEqual(body["detail"]["code"], "circuit_breaker")
        self.assertTrue(body["detail"]["can_retry"])
        self.assertGreater(body["detail"]["recovery_eta_seconds"], 100)
        doc = await self.status()
        self.assertEqual((doc["status"], doc["provisioning"]["circuit_breaker_state"]), ("degraded", "half_open"))
        self.assertTrue(doc["provisioning"]["blocked_reason_details"]["can_retry"])

    async def test_general_error_then_success(self) -> None:
        self.orch.fail_next_provisions(1)
        detail = await self.refused(500)
        self.assertEqual(
            detail,
            {
                "error": "provisioning_failed",
                "code": "general_error",
                "recovery_eta_seconds": None,
                "can_retry": False,
                "should_wait": False,
            },
        )
        self.assertEqual(self.orch.engines, [])
        code, _ = await self.provision()
        self.assertEqual(code, 200)
        self.assertEqual(len(self.orch.provision_calls), 2)

    def test_unknown_failure_code(self) -> None:
        self.assertRaises(ValueError, self.orch.fail_next_provisions, 1, "max_capacity")

    async def test_legacy_strings(self) -> None:
        self.orch.legacy_errors = True
        self.orch.set_vpn(connected=False)
        self.assertEqual(await self.provision(), (503, {"detail": "VPN is disconnected"}))
        self.orch.set_vpn(connected=True)
        self.orch.open_breaker(30)
        self.assertEqual(await self.provision(), (503, {"detail": "circuit breaker is open"}))
        self.orch.close_breaker()
        self.orch.fail_next_provisions(1)
        self.assertEqual(await self.provision(), (500, {"detail": "docker error"}))
        self.orch.vpn_error(True)
        code, body = await self.provision()
        self.assertEqual(code, 503)
        self.assertIn("VPN", body["detail"])
        self.orch.vpn_error(False)
        self.orch.max_replicas = 0
        code, _ = await self.provision()  # replica_limit "none": not refused
        self.assertEqual(code, 200)
        self.orch.replica_limit = "gluetun"  # a plain string in either error style
        self.assertEqual(await self.provision(), (500, {"detail": "Maximum active replicas limit reached (0)"}))

    async def test_gluetun_replica_limit(self) -> None:
        self.orch.replica_limit = "gluetun"
        self.orch.max_replicas = 2
        self.orch.add_engine()
        code, _ = await self.provision()  # 1 running < 2
        self.assertEqual(code, 200)
        self.assertIsNone((await self.status())["provisioning"]["last_failure"])
        refusal = (500, {"detail": "Maximum active replicas limit reached (2)"})
        self.assertEqual(await self.provision(), refusal)
        self.assertEqual((len(self.orch.engines), len(self.orch.provisioned)), (2, 1))
        self.assertRegex((await self.status())["provisioning"]["last_failure"], RFC3339)
        # the VPN and the breaker are checked first
        self.orch.set_vpn(connected=False)
        self.assertEqual((await self.refused(503))["code"], "vpn_disconnected")
        self.orch.set_vpn(connected=True)
        # a removed engine frees a slot
        await within(self.orch.remove_engine(self.orch.engines[0]))
        code, _ = await self.provision()
        self.assertEqual(code, 200)
        self.assertEqual(await self.provision(), refusal)

    def test_replica_limit_is_validated(self) -> None:
        self.assertRaises(ValueError, SimOrchestrator, reactor, replica_limit="docker")
        with self.assertRaises(ValueError):
            self.orch.replica_limit = "max"
        self.assertEqual(self.orch.replica_limit, "none")
        self.assertEqual(SimOrchestrator(reactor, replica_limit="gluetun").replica_limit, "gluetun")

    async def test_bad_json_is_422(self) -> None:
        code, _ = await self.call("POST", "/provision/acestream", "not an object")
        self.assertEqual(code, 422)


class ProvisionTests(OrchestratorTestCase):
    options = {"engine_ready_delay": 0.8}

    async def test_provisioned_engine_answers_only_after_the_ready_delay(self) -> None:
        """Refused while starting, answering once ready (how long it takes:
        ``ClockTests.test_provisioned_engine_is_ready_after_the_delay``)."""
        code, body = await self.provision()
        self.assertEqual(code, 200)
        keys = {"container_id", "container_name", "host_http_port", "container_http_port", "container_https_port"}
        self.assertEqual(set(body), keys)
        self.assertRegex(body["container_id"], HEX64)
        self.assertEqual(body["container_name"], "acestream-1")
        [handle] = self.orch.provisioned
        self.assertEqual((handle.container_id, handle.port), (body["container_id"], body["host_http_port"]))
        self.assertIsInstance(body["container_https_port"], int)

        # listed at once, with the address to reach it
        code, engines = await self.call("GET", "/engines")
        self.assertEqual(code, 200)
        [listed] = engines
        self.assertEqual((listed["host"], listed["port"]), ("127.0.0.1", body["host_http_port"]))
        self.assertEqual(listed["health_status"], "unknown")
        self.assertIsNone(listed["last_health_check"])

        # refused while "starting", then answers
        self.assertFalse(handle.ready)
        self.assertFalse(await self.engine_answers(listed["port"]))
        await within(self.orch.when(lambda o: handle.ready))
        self.assertTrue(await self.engine_answers(listed["port"]))
        self.assertEqual(handle.engine.advertise_port, 6878)
        code, engines = await self.call("GET", "/engines")
        self.assertEqual(engines[0]["health_status"], "healthy")

    async def test_provision_delay_and_labels(self) -> None:
        """(The delay on a clock: ``ClockTests.test_provision_delay``.)"""
        self.orch.provision_delay = 0.3
        self.orch.engine_ready_delay = 0
        waiting = self.orch.when(lambda o: len(o.provisioned) == 1)
        code, body = await self.call("POST", "/provision/acestream", {"labels": {"who": "test"}, "env": {}})
        self.assertEqual(code, 200)
        self.assertTrue(waiting.called)  # answered once the engine was there
        handle = self.orch.provisioned[0]
        self.assertEqual(handle.labels, {"who": "test"})
        self.assertTrue(handle.ready)
        self.assertTrue(await self.engine_answers(handle.port))
        code, engines = await self.call("GET", "/engines")
        self.assertEqual(engines[0]["labels"], {"who": "test"})

    async def test_pending_provision_counts_toward_the_gluetun_limit(self) -> None:
        self.orch.replica_limit = "gluetun"
        self.orch.max_replicas = 1
        self.orch.provision_delay = 0.3
        first = Deferred.fromCoroutine(self.provision())
        await within(self.orch.when(lambda o: len(o.provision_calls) == 1))  # arrived, now pending
        self.assertEqual(await self.provision(), (500, {"detail": "Maximum active replicas limit reached (1)"}))
        code, _ = await within(first)
        self.assertEqual(code, 200)
        self.assertEqual(len(self.orch.engines), 1)

    async def test_provisions_ignore_max_replicas_by_default(self) -> None:
        self.orch.max_replicas = 1
        self.orch.provision_delay = 0.3
        first = Deferred.fromCoroutine(self.provision())
        await within(self.orch.when(lambda o: len(o.provision_calls) == 1))  # arrived, now pending
        code, _ = await self.provision()
        self.assertEqual(code, 200)
        code, _ = await within(first)
        self.assertEqual(code, 200)
        self.assertEqual(len(self.orch.engines), 2)

    async def test_shutdown_during_provision_and_startup(self) -> None:
        self.orch.provision_delay = 5
        pending = Deferred.fromCoroutine(self.provision())
        await within(self.orch.when(lambda o: len(o.provision_calls) == 1))
        self.orch.provision_delay = 0
        self.orch.engine_ready_delay = 5
        code, _ = await self.provision()
        self.assertEqual(code, 200)
        await within(self.orch.shutdown())
        self.assertFalse(self.orch.provisioned[0].engine.listening)
        await failure_of(pending)  # its connection was reset


class EnginesTests(OrchestratorTestCase):
    async def test_listing_and_settable_fields(self) -> None:
        first = self.orch.add_engine(streams=2)
        second = self.orch.add_engine(healthy=None, forwarded=True)
        second.last_stream_usage = 1_700_000_000.0
        first.healthy = False
        code, engines = await self.call("GET", "/engines")
        self.assertEqual(code, 200)
        self.assertEqual(self.orch.engines_calls, 1)
        keys = {
            "container_id", "container_name", "host", "port", "labels", "first_seen", "last_seen",
            "streams", "health_status", "last_health_check", "last_stream_usage", "forwarded",
        }  # fmt: skip
        for listed in engines:
            self.assertEqual(set(listed), keys)
            self.assertRegex(listed["first_seen"], RFC3339)
            self.assertRegex(listed["last_seen"], RFC3339)
        a, b = engines
        self.assertEqual((a["container_name"], b["container_name"]), ("acestream-1", "acestream-2"))
        self.assertEqual((a["port"], b["port"]), (first.port, second.port))
        self.assertEqual(len(a["streams"]), 2)
        self.assertEqual((a["health_status"], b["health_status"]), ("unhealthy", "unknown"))
        self.assertEqual((a["forwarded"], b["forwarded"]), (False, True))
        self.assertEqual(b["last_stream_usage"], "2023-11-14T22:13:20+00:00")
        self.assertRegex(a["last_stream_usage"], RFC3339)
        self.assertTrue(await self.engine_answers(first.port))

    async def test_engines_can_fail(self) -> None:
        self.orch.add_engine()
        self.orch.engines_fail = True
        code, _ = await self.call("GET", "/engines")
        self.assertEqual(code, 500)
        self.orch.engines_fail = False
        code, engines = await self.call("GET", "/engines")
        self.assertEqual((code, len(engines)), (200, 1))
        self.assertEqual(self.orch.engines_calls, 2)

    async def test_engine_not_ready_until_made_ready(self) -> None:
        handle = self.orch.add_engine(ready=False)
        self.assertFalse(await self.engine_answers(handle.port))
        self.orch.make_ready(handle)
        await within(self.orch.when(lambda o: handle.ready))
        self.assertTrue(await self.engine_answers(handle.port))

    async def test_remove_engine(self) -> None:
        handle = self.orch.add_engine(streams=1)
        await within(self.orch.remove_engine(handle))
        self.assertEqual(self.orch.engines, [])
        self.assertEqual((await self.status())["streams"], {"active": 0, "total": 1})
        self.assertFalse(await self.engine_answers(handle.port))


class EventTests(OrchestratorTestCase):
    async def test_started_and_ended_update_streams(self) -> None:
        handle = self.orch.add_engine()
        other = self.orch.add_engine()
        event = self.started_event(handle, "abc|psid-1")
        code, stream = await self.call("POST", "/events/stream_started", event)
        self.assertEqual(code, 200)
        self.assertEqual(
            set(stream),
            {"id", "key_type", "key", "container_id", "playback_session_id", "stat_url",
             "command_url", "is_live", "started_at", "ended_at", "status"},
        )  # fmt: skip
        self.assertEqual((stream["id"], stream["status"], stream["ended_at"]), ("abc|psid-1", "started", None))
        self.assertRegex(stream["started_at"], RFC3339)
        self.assertEqual(self.orch.events_started, [event])
        await self.call("POST", "/events/stream_started", self.started_event(other, "def|psid-2"))

        code, engines = await self.call("GET", "/engines")
        self.assertEqual([e["streams"] for e in engines], [["abc|psid-1"], ["def|psid-2"]])
        self.assertIsNotNone(engines[0]["last_stream_usage"])
        code, started = await self.call("GET", "/streams?status=started")
        self.assertEqual(sorted(s["id"] for s in started), ["abc|psid-1", "def|psid-2"])
        code, started = await self.call("GET", f"/streams?status=started&container_id={other.container_id}")
        self.assertEqual([s["id"] for s in started], ["def|psid-2"])
        doc = await self.status()
        self.assertEqual(doc["streams"], {"active": 2, "total": 2})
        self.assertEqual((doc["capacity"]["used"], doc["capacity"]["available"]), (2, 0))

        ended = {"container_id": handle.container_id, "stream_id": "abc|psid-1", "reason": "client_disconnected"}
        code, answer = await self.call("POST", "/events/stream_ended", ended)
        self.assertEqual((code, answer["updated"], answer["stream"]["status"]), (200, True, "ended"))
        self.assertEqual(self.orch.streams["abc|psid-1"].end_reason, "client_disconnected")
        self.assertEqual(self.orch.events_ended, [ended])
        code, started = await self.call("GET", "/streams?status=started")
        self.assertEqual([s["id"] for s in started], ["def|psid-2"])
        code, engines = await self.call("GET", "/engines")
        self.assertEqual(engines[0]["streams"], [])
        self.assertEqual((await self.status())["streams"], {"active": 1, "total": 2})

        # an id that matches nothing (or a second end) ends nothing, still 200
        for stream_id in ("abc", "abc|psid-1"):
            wrong = {"container_id": handle.container_id, "stream_id": stream_id, "reason": "shutdown"}
            self.assertEqual(await self.call("POST", "/events/stream_ended", wrong), (200, {"updated": False}))
        self.assertEqual([e["stream_id"] for e in self.orch.unmatched_ended], ["abc", "abc|psid-1"])
        self.assertEqual(len(self.orch.events_ended), 3)
        self.assertEqual(len(self.orch.active_streams), 1)

    async def test_started_validation(self) -> None:
        handle = self.orch.add_engine()
        bad = [
            (422, self.started_event(handle, session={"stat_url": "/ace/stat/x/y"})),
            (422, self.started_event(handle, session={"command_url": "ftp://h/x"})),
            (422, self.started_event(handle, labels={})),
            (422, self.started_event(handle, stream={"key_type": "nope", "key": "k"})),
            (404, self.started_event(handle, container_id="f" * 64)),
        ]
        for expected, event in bad:
            code, body = await self.call("POST", "/events/stream_started", event)
            self.assertEqual(code, expected, event)
            self.assertIn("detail", body)
        code, body = await self.call("POST", "/events/stream_started", self.started_event(handle, labels={}))
        self.assertEqual(body["detail"][0]["loc"], ["body", "labels", "stream_id"])
        self.assertEqual(self.orch.events_started, [])
        self.assertEqual([r["code"] for r in self.orch.rejected_events], [422, 422, 422, 422, 404, 422])
        self.assertEqual(self.orch.streams, {})
        https = self.started_event(handle, "https-ok|1", session={"stat_url": "https://engine.example/ace/stat/a/b"})
        code, _ = await self.call("POST", "/events/stream_started", https)
        self.assertEqual(code, 200)


class StatusLagTests(OrchestratorTestCase):
    async def test_status_shows_the_past_while_provisions_see_the_present(self) -> None:
        self.orch.add_engine()
        self.orch.status_lag = 60
        self.orch.set_vpn(connected=False)
        doc = await self.status()
        self.assertEqual((doc["status"], doc["vpn"]["connected"]), ("healthy", True))
        self.assertTrue(doc["provisioning"]["can_provision"])
        self.assertEqual(self.orch.status_document()["status"], "degraded")  # the current state
        self.assertEqual((await self.refused(503))["code"], "vpn_disconnected")
        self.orch.set_vpn(connected=True)
        self.orch.open_breaker(120)
        self.assertEqual((await self.refused(503))["code"], "circuit_breaker")
        doc = await self.status()
        self.assertEqual((doc["status"], doc["provisioning"]["circuit_breaker_state"]), ("healthy", "closed"))
        # lag 0: the current state again, at once
        self.orch.status_lag = 0
        doc = await self.status()
        self.assertEqual((doc["status"], doc["provisioning"]["circuit_breaker_state"]), ("degraded", "open"))

    async def test_full_capacity_shows_first_as_a_refusal(self) -> None:
        self.orch.replica_limit = "gluetun"
        self.orch.max_replicas = 2
        self.orch.add_engine()
        self.orch.status_lag = 60
        code, _ = await self.provision()
        self.assertEqual(code, 200)
        doc = await self.status()  # from before the provision
        self.assertEqual((doc["capacity"]["total"], doc["provisioning"]["can_provision"]), (1, True))
        self.assertEqual(await self.provision(), (500, {"detail": "Maximum active replicas limit reached (2)"}))
        self.assertEqual(self.orch.status_document()["provisioning"]["blocked_reason_details"]["code"], "max_capacity")

    def test_status_lag_is_validated(self) -> None:
        for wrong in (-1, float("nan"), float("inf")):
            with self.assertRaises(ValueError):
                self.orch.status_lag = wrong
        self.assertRaises(ValueError, SimOrchestrator, reactor, status_lag=-0.5)
        self.assertEqual(self.orch.status_lag, 0)


class StatusLagClockTests(TestCase):
    """The lag's time arithmetic on a fake clock (the orchestrator never listens)."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.orch = SimOrchestrator(self.clock, api_key=KEY, status_lag=10)

    def served(self) -> Dict[str, Any]:
        return self.orch.served_status_document()

    def test_newest_document_at_or_before_now_minus_the_lag(self) -> None:
        self.orch.set_vpn(connected=False)  # t=0, right after the lag began
        self.assertTrue(self.served()["vpn"]["connected"])  # none 10 s old: the oldest
        self.clock.advance(9.5)
        self.assertTrue(self.served()["vpn"]["connected"])
        self.clock.advance(0.5)  # t=10: the t=0 change is 10 s old
        doc = self.served()
        self.assertFalse(doc["vpn"]["connected"])
        self.assertEqual(doc["timestamp"], rfc3339(0))
        self.assertFalse(self.orch.status_document()["vpn"]["connected"])
        self.orch.set_vpn(connected=True)  # t=10
        self.clock.advance(5)
        doc = self.served()  # t=15: still the t=0..10 state, as of t=5
        self.assertEqual((doc["vpn"]["connected"], doc["timestamp"]), (False, rfc3339(5)))
        self.assertTrue(self.orch.status_document()["vpn"]["connected"])
        self.clock.advance(5)
        self.assertTrue(self.served()["vpn"]["connected"])  # t=20

    def test_history_is_bounded_by_the_lag(self) -> None:
        for i in range(200):
            self.clock.advance(1)
            self.orch.set_vpn(connected=bool(i % 2))
            self.served()
        # the newest entry at or before now - 10 and the 10 s after it
        self.assertLessEqual(len(self.orch._status_history), 12)
        self.orch.status_lag = 0
        self.assertEqual(self.orch._status_history, [])
        self.assertEqual(self.served(), self.orch.status_document())

    def test_unchanged_documents_are_recorded_once(self) -> None:
        for _ in range(50):
            self.orch._changed()
            self.served()
        self.assertEqual(len(self.orch._status_history), 1)


class LifecycleTests(OrchestratorTestCase):
    async def test_down_and_up_on_the_same_port(self) -> None:
        port = self.orch.port
        await self.status()
        await within(self.orch.down())
        self.assertEqual(self.orch.connections, 0)
        failure = await failure_of(self.http.get(self.orch.url + "/orchestrator/status"))
        self.assertTrue(failure.check(ConnectionRefusedError), failure)
        self.orch.up()
        self.assertEqual(self.orch.port, port)
        self.assertEqual((await self.status())["status"], "unavailable")

    async def test_when(self) -> None:
        fired = self.orch.when(lambda o: o.status_calls == 2)
        self.assertFalse(fired.called)
        await self.status()
        self.assertFalse(fired.called)
        await self.status()
        self.assertTrue(fired.called)
        # true at once
        self.assertTrue(self.orch.when(lambda o: o.status_calls == 2).called)
        # scripting calls are changes
        vpn = self.orch.when(lambda o: not o.vpn_connected)
        self.orch.set_vpn(connected=False)
        self.assertTrue(vpn.called)
        # cancelling forgets the waiter
        never = self.orch.when(lambda o: False)
        self.assertEqual(self.orch.waiters, 1)
        never.cancel()
        self.assertEqual(self.orch.waiters, 0)
        self.failureResultOf(never, CancelledError)
        # a raising predicate errbacks
        broken = self.orch.when(lambda o: 1 / 0)
        self.failureResultOf(broken, ZeroDivisionError)
        self.assertEqual(self.orch.waiters, 0)

    async def test_unknown_routes(self) -> None:
        self.assertEqual(await self.call("GET", "/nope"), (404, {"detail": "Not Found"}))
        self.assertEqual(await self.call("GET", "/provision/acestream"), (405, {"detail": "Method Not Allowed"}))

    def test_listen_twice_is_an_error(self) -> None:
        self.assertRaises(RuntimeError, self.orch.listen)

    def test_cli_arguments(self) -> None:
        args = _arguments(["--port", "8001", "--engines", "3", "--api-key", "k", "--bitrate", "4M"])
        self.assertEqual((args.port, args.engines, args.api_key, args.bitrate), (8001, 3, "k", 4_000_000))
        self.assertEqual((args.status_lag, args.replica_limit), (0.0, "none"))
        args = _arguments(["--status-lag", "2.5", "--replica-limit", "gluetun"])
        self.assertEqual((args.status_lag, args.replica_limit), (2.5, "gluetun"))
        with self.assertRaises(SystemExit):
            _arguments(["--replica-limit", "docker"])


class ClockTests(SynchronousTestCase):
    """What only changes with time, on a ``task.Clock`` with the HTTP API
    served in memory: exact, and nothing waits or polls."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.orch = SimOrchestrator(self.clock, api_key=KEY)
        self.http = Clocked(self.orch._site.resource, self.clock)

    def call(self, method: str, path: str, body: Any = None) -> Deferred:
        """Fires with (status, JSON body) once answered."""
        headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        data = json.dumps(body).encode() if body is not None else None
        d = self.http.request(method, "http://orchestrator" + path, headers=headers, data=data)
        return d.addCallback(lambda r: self.http.body(r).addCallback(lambda raw: (r.code, json.loads(raw))))

    def answer(self, d: Deferred) -> Tuple[int, Any]:
        self.http.advance(0)
        return self.successResultOf(d)

    def provision(self) -> Deferred:
        return self.call("POST", "/provision/acestream", {"labels": {}, "env": {}})

    def status(self) -> Dict[str, Any]:
        code, doc = self.answer(self.call("GET", "/orchestrator/status"))
        self.assertEqual(code, 200)
        return doc

    def test_provision_delay(self) -> None:
        self.orch.provision_delay = 0.3
        d = self.provision()
        self.http.advance(0.29)
        self.assertNoResult(d)
        self.assertEqual(self.orch.provisioned, [])
        self.http.advance(0.01)
        self.assertEqual(self.answer(d)[0], 200)
        [handle] = self.orch.provisioned
        self.assertTrue(handle.ready)

    def test_provisioned_engine_is_ready_after_the_delay(self) -> None:
        self.orch.engine_ready_delay = 0.8
        code, _ = self.answer(self.provision())  # answered at once...
        self.assertEqual(code, 200)
        [handle] = self.orch.provisioned
        self.http.advance(0.79)
        self.assertFalse(handle.ready)  # ...the engine refuses connections until the delay is over
        self.assertEqual(handle.health_status, "unknown")
        self.http.advance(0.01)
        self.assertTrue(handle.ready)
        self.assertEqual(handle.health_status, "healthy")

    def test_breaker_counts_down_and_stays_open_at_zero(self) -> None:
        self.orch.open_breaker(1)

        def eta() -> int:
            return self.status()["provisioning"]["blocked_reason_details"]["recovery_eta_seconds"]

        self.assertEqual(eta(), 1)
        self.http.advance(0.5)
        self.assertEqual(eta(), 1)  # whole seconds, rounded up
        self.http.advance(0.5)
        self.assertEqual(eta(), 0)
        self.http.advance(60)
        doc = self.status()
        self.assertEqual(doc["provisioning"]["circuit_breaker_state"], "open")
        self.assertFalse(doc["provisioning"]["can_provision"])
        self.assertEqual(eta(), 0)
        code, body = self.answer(self.provision())
        detail = body["detail"]
        self.assertEqual((code, detail["code"], detail["recovery_eta_seconds"]), (503, "circuit_breaker", 0))

        self.orch.close_breaker()
        self.assertEqual(self.status()["provisioning"]["circuit_breaker_state"], "closed")
        self.assertEqual(self.answer(self.provision())[0], 200)

    def test_lagged_status_catches_up_after_the_lag(self) -> None:
        self.orch = SimOrchestrator(self.clock, api_key=KEY, status_lag=0.5)
        self.http = Clocked(self.orch._site.resource, self.clock)
        self.orch.add_engine()  # at t=0

        def listed() -> int:
            return self.status()["engines"]["total"]

        seen = []
        for t in (0, 0.25, 0.49):
            self.http.advance(t - self.clock.seconds())
            seen.append(listed())
        self.assertEqual(seen, [0, 0, 0])  # never before the lag
        self.http.advance(0.5 - self.clock.seconds())
        self.assertEqual(listed(), 1)  # then at once, and for good
        self.http.advance(10)
        self.assertEqual(listed(), 1)
        self.assertEqual(self.orch.status_document()["engines"]["total"], 1)
