"""OrchestratorClient against in-memory orchestrators (treq's StubTreq), timeouts on a Clock."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Optional

from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, fail
from twisted.internet.error import ConnectionRefusedError, TCPTimedOutError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseNeverReceived
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from acexy_tw.orchestrator.client import (
    BlockedDetails,
    OrchestratedEngine,
    OrchestratorAuthError,
    OrchestratorClient,
    OrchestratorError,
    OrchestratorStatus,
    OrchestratorUnavailable,
    Provisioned,
    ProvisionBlocked,
    ProvisionFailed,
    ProvisionTimeout,
    stream_id_for,
    stream_started_event,
)
from acexy_tw.testing import ScriptedResource, answer

KEY = "s3cr3t-Key-0123456789"
BASE = "http://orch.lan:8000"
CONTAINER = "f" * 64

FULL_STATUS = {
    "status": "healthy",
    "engines": {"total": 2, "running": 2, "healthy": 2, "unhealthy": 0},
    "streams": {"active": 1, "total": 5},
    "capacity": {"total": 2, "used": 1, "available": 1, "max_replicas": 20, "min_replicas": 1},
    "vpn": {"enabled": True, "connected": True, "health": "healthy", "container": "gluetun", "forwarded_port": 41234},
    "provisioning": {
        "can_provision": True,
        "circuit_breaker_state": "closed",
        "last_failure": None,
        "blocked_reason": None,
        "blocked_reason_details": None,
    },
    "timestamp": "2025-10-13T14:00:00+00:00",
}

ENGINES = [
    {
        "container_id": "a" * 64,
        "container_name": "acestream-1",
        "host": "gluetun",
        "port": 19000,
        "labels": {"acestream.http_port": "19000"},
        "first_seen": "2025-10-13T13:00:00Z",
        "last_seen": "2025-10-13T14:00:00Z",
        "streams": ["s1", "s2"],
        "health_status": "healthy",
        "last_health_check": "2025-10-13T14:00:00Z",
        "last_stream_usage": "2025-10-13T13:59:00Z",
        "forwarded": True,
        "something_new": [1, 2, 3],
    },
    {
        # An older orchestrator: no `forwarded`, nulls everywhere optional.
        "container_id": "b" * 64,
        "container_name": None,
        "host": "10.0.0.7",
        "port": 19001,
        "labels": None,
        "first_seen": None,
        "last_seen": None,
        "streams": [],
        "health_status": None,
        "last_health_check": None,
        "last_stream_usage": None,
    },
    {
        "container_id": "c" * 64,
        "container_name": "acestream-3",
        "host": "10.0.0.8",
        "port": 19002,
        "streams": None,
        "health_status": "unhealthy",
        "last_stream_usage": "2025-10-13T16:00:00.123456+02:00",
    },
]


class Base(SynchronousTestCase):
    def make(
        self, handler: Callable[[Any], Any], key: Optional[str] = KEY
    ) -> tuple[OrchestratorClient, StubTreq, ScriptedResource, Clock]:
        resource = ScriptedResource(handler)
        stub = StubTreq(resource)
        clock = Clock()
        client = OrchestratorClient(stub, BASE, key, clock, timeout=10, provision_timeout=60)
        return client, stub, resource, clock

    def run_call(self, handler: Callable[[Any], Any], call: Callable[[OrchestratorClient], Any]) -> Any:
        client, stub, _, clock = self.make(handler)
        d = call(client)
        stub.flush()
        self.assertEqual(clock.getDelayedCalls(), [])
        return d


# -- status ----------------------------------------------------------------------------


class StatusTests(Base):
    def test_full_document(self) -> None:
        client, stub, res, clock = self.make(answer(200, FULL_STATUS))
        d = client.status()
        stub.flush()
        s = self.successResultOf(d)
        self.assertEqual(
            s,
            OrchestratorStatus(
                status="healthy",
                engines_total=2,
                engines_running=2,
                engines_healthy=2,
                streams_active=1,
                capacity_total=2,
                capacity_used=1,
                capacity_available=1,
                max_replicas=20,
                vpn_enabled=True,
                vpn_connected=True,
                vpn_health="healthy",
                can_provision=True,
                breaker_state="closed",
                blocked_reason=None,
                blocked=None,
                timestamp="2025-10-13T14:00:00+00:00",
            ),
        )
        self.assertFalse(s.vpn_down)
        self.assertIsNone(s.blocked_code)
        self.assertEqual((res.seen[0]["method"], res.seen[0]["path"]), ("GET", "/orchestrator/status"))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_nulls_missing_fields_and_unknown_extras(self) -> None:
        doc = {
            "status": "degraded",
            "engines": {"total": 1, "running": None, "shiny": True},
            "capacity": None,
            "vpn": {"enabled": True, "connected": False, "health": None},
            "provisioning": {
                "can_provision": False,
                "circuit_breaker_state": None,
                "blocked_reason": "VPN disconnected",
                "blocked_reason_details": {
                    "code": "vpn_disconnected",
                    "message": "VPN is down",
                    "recovery_eta_seconds": None,
                    "can_retry": True,
                    "should_wait": True,
                    "extra": "ignored",
                },
            },
            "new_section": {"x": 1},
        }
        d = self.run_call(answer(200, doc), lambda c: c.status())
        s = self.successResultOf(d)
        self.assertEqual(s.status, "degraded")
        self.assertEqual((s.engines_total, s.engines_running, s.engines_healthy), (1, 0, 0))
        self.assertEqual((s.streams_active, s.capacity_total, s.capacity_available), (0, 0, 0))
        self.assertIsNone(s.max_replicas)
        self.assertIsNone(s.vpn_health)
        self.assertIsNone(s.timestamp)
        self.assertIsNone(s.breaker_state)
        self.assertTrue(s.vpn_down)
        self.assertFalse(s.can_provision)
        self.assertEqual(s.blocked_reason, "VPN disconnected")
        self.assertEqual(s.blocked, BlockedDetails("vpn_disconnected", "VPN is down", None, True, True))
        self.assertEqual(s.blocked_code, "vpn_disconnected")

    def test_vpn_disabled_is_not_down(self) -> None:
        doc = dict(FULL_STATUS, vpn={"enabled": False, "connected": False, "health": None})
        s = self.successResultOf(self.run_call(answer(200, doc), lambda c: c.status()))
        self.assertFalse(s.vpn_connected)
        self.assertFalse(s.vpn_down)

    def test_minimal_document_infers_can_provision(self) -> None:
        s = self.successResultOf(self.run_call(answer(200, {"status": "unavailable"}), lambda c: c.status()))
        self.assertTrue(s.can_provision)
        self.assertFalse(s.vpn_down)
        doc = {"status": "degraded", "provisioning": {"circuit_breaker_state": "open"}}
        s = self.successResultOf(self.run_call(answer(200, doc), lambda c: c.status()))
        self.assertFalse(s.can_provision)

    def test_bad_types_are_unavailable_not_a_crash(self) -> None:
        bad_docs = [
            [1, 2],
            {"status": 3},
            {"engines": {}},
            dict(FULL_STATUS, engines={"total": "two"}),
            dict(FULL_STATUS, engines={"total": True}),
            dict(FULL_STATUS, vpn="up"),
            dict(FULL_STATUS, vpn={"enabled": "yes"}),
            dict(FULL_STATUS, provisioning={"blocked_reason_details": "soon"}),
            dict(FULL_STATUS, provisioning={"blocked_reason_details": {"recovery_eta_seconds": "a while"}}),
        ]
        for doc in bad_docs:
            f = self.failureResultOf(self.run_call(answer(200, doc), lambda c: c.status()), OrchestratorUnavailable)
            self.assertIn("unexpected answer", str(f.value), doc)

    def test_garbage_json_is_unavailable(self) -> None:
        f = self.failureResultOf(
            self.run_call(answer(200, raw=b"<html>nginx</html>"), lambda c: c.status()), OrchestratorUnavailable
        )
        self.assertIn("unexpected answer", str(f.value))

    def test_5xx_and_404_are_unavailable(self) -> None:
        for handler in (answer(500, raw=b"Internal Server Error"), answer(502, raw=b""), answer(404, {"detail": "Not Found"})):
            f = self.failureResultOf(self.run_call(handler, lambda c: c.status()), OrchestratorUnavailable)
            self.assertNotIsInstance(f.value, ProvisionTimeout)

    def test_redirects_are_not_followed(self) -> None:
        def handler(request: Any) -> bytes:
            request.redirect(b"http://elsewhere/steal")
            return b""

        client, stub, res, _ = self.make(handler)
        d = client.status()
        stub.flush()
        f = self.failureResultOf(d, OrchestratorUnavailable)
        self.assertIn("302", str(f.value))
        self.assertEqual(len(res.seen), 1)

    def test_oversized_status_is_refused(self) -> None:
        big = dict(FULL_STATUS, padding="x" * (300 * 1024))
        self.failureResultOf(self.run_call(answer(200, big), lambda c: c.status()), OrchestratorUnavailable)


# -- engines and streams ------------------------------------------------------------


class EnginesTests(Base):
    def test_engines_parsed_tolerantly(self) -> None:
        client, stub, res, _ = self.make(answer(200, ENGINES))
        d = client.engines()
        stub.flush()
        a, b, c = self.successResultOf(d)
        self.assertEqual(res.seen[0]["path"], "/engines")
        self.assertEqual(res.seen[0]["args"], {})
        self.assertEqual(
            a,
            OrchestratedEngine(
                container_id="a" * 64,
                container_name="acestream-1",
                host="gluetun",
                port=19000,
                streams=("s1", "s2"),
                health_status="healthy",
                last_stream_usage=datetime(2025, 10, 13, 13, 59, tzinfo=timezone.utc),
                forwarded=True,
                labels={"acestream.http_port": "19000"},
            ),
        )
        self.assertEqual(a.url, "http://gluetun:19000")
        self.assertEqual(a.address.port, 19000)
        self.assertEqual((b.container_name, b.streams, b.health_status), ("", (), "unknown"))
        self.assertEqual((b.last_stream_usage, b.forwarded, b.labels), (None, False, {}))
        self.assertEqual(c.streams, ())
        self.assertEqual(c.health_status, "unhealthy")
        self.assertEqual(c.last_stream_usage, datetime(2025, 10, 13, 14, 0, 0, 123456, tzinfo=timezone.utc))
        self.assertEqual(c.last_stream_usage.utcoffset(), timedelta(hours=2))

    def test_engines_must_be_a_list_of_well_formed_engines(self) -> None:
        ok = ENGINES[0]
        for doc in (
            {"engines": []},
            [dict(ok, port="nineteen")],
            [dict(ok, port=0)],
            [dict(ok, host=None)],
            [dict(ok, container_id=None)],
            [dict(ok, streams="s1")],
            [dict(ok, streams=[{"id": "s1"}])],
            [dict(ok, last_stream_usage="yesterday")],
            [dict(ok, forwarded="yes")],
            [dict(ok, labels=["a"])],
        ):
            f = self.failureResultOf(self.run_call(answer(200, doc), lambda c: c.engines()), OrchestratorUnavailable)
            self.assertIn("unexpected answer", str(f.value))

    def test_a_big_fleet_fits_but_not_a_flood(self) -> None:
        fleet = [dict(ENGINES[0], container_id=f"{i:064x}") for i in range(800)]
        body = json.dumps(fleet).encode()
        self.assertTrue(256 * 1024 < len(body) < 1024 * 1024)
        self.assertEqual(len(self.successResultOf(self.run_call(answer(200, raw=body), lambda c: c.engines()))), 800)
        flood = b"[" + b" " * (1024 * 1024) + b"]"
        self.failureResultOf(self.run_call(answer(200, raw=flood), lambda c: c.engines()), OrchestratorUnavailable)

    def test_streams_always_ask_for_started(self) -> None:
        rows = [{"id": "k|p", "key_type": "content_id", "key": "k", "container_id": "a" * 64, "status": "started"}]
        client, stub, res, _ = self.make(answer(200, rows))
        d1 = client.streams()
        d2 = client.streams("a" * 64)
        stub.flush()
        self.assertEqual(self.successResultOf(d1), rows)
        self.assertEqual(self.successResultOf(d2), rows)
        self.assertEqual(res.seen[0]["path"], "/streams")
        self.assertEqual(res.seen[0]["args"], {"status": ["started"]})
        self.assertEqual(res.seen[1]["args"], {"status": ["started"], "container_id": ["a" * 64]})

    def test_streams_bad_shape(self) -> None:
        for doc in ({"streams": []}, ["k|p"]):
            self.failureResultOf(self.run_call(answer(200, doc), lambda c: c.streams()), OrchestratorUnavailable)


# -- provisioning ------------------------------------------------------------------


class ProvisionTests(Base):
    def test_success(self) -> None:
        doc = {
            "container_id": CONTAINER,
            "container_name": "acestream-5",
            "host_http_port": 19023,
            "container_http_port": 19023,
            "container_https_port": 45001,
        }
        client, stub, res, clock = self.make(answer(200, doc))
        d = client.provision()
        stub.flush()
        self.assertEqual(self.successResultOf(d), Provisioned(CONTAINER, "acestream-5", 19023, 19023))
        seen = res.seen[0]
        self.assertEqual((seen["method"], seen["path"]), ("POST", "/provision/acestream"))
        self.assertEqual(json.loads(seen["body"]), {"labels": {}, "env": {}})
        self.assertEqual(seen["content_type"], [b"application/json"])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_success_with_nulls(self) -> None:
        doc = {"container_id": CONTAINER, "container_name": None, "host_http_port": None}
        p = self.successResultOf(self.run_call(answer(200, doc), lambda c: c.provision()))
        self.assertEqual(p, Provisioned(CONTAINER, "", None, None))

    def structured(self, http: int, **detail: Any) -> Failure:
        d = self.run_call(answer(http, {"detail": detail}), lambda c: c.provision())
        return self.failureResultOf(d, OrchestratorError)

    def test_structured_table(self) -> None:
        rows = [
            # http, detail, expected (type, code, eta, can_retry, should_wait)
            (503, ("provisioning_blocked", "vpn_disconnected", 60, True, True), (ProvisionBlocked, "vpn_disconnected", 60, True, True)),
            (503, ("provisioning_blocked", "circuit_breaker", 240, False, True), (ProvisionBlocked, "circuit_breaker", 240, False, True)),
            (503, ("provisioning_blocked", "circuit_breaker", 0, True, True), (ProvisionBlocked, "circuit_breaker", 0, True, True)),
            (503, ("provisioning_blocked", "vpn_error", 60, True, True), (ProvisionBlocked, "vpn_error", 60, True, True)),
            (500, ("provisioning_failed", "general_error", None, False, False), (ProvisionFailed, "general_error")),
            # a 503 is temporary whatever it says
            (503, ("provisioning_failed", "general_error", None, False, False), (ProvisionBlocked, "general_error", None, False, False)),
            # should_wait / can_retry / provisioning_blocked make it temporary at any status
            (500, ("provisioning_failed", "vpn_error", 60, False, True), (ProvisionBlocked, "vpn_error", 60, False, True)),
            (500, ("provisioning_failed", "vpn_error", 60, True, False), (ProvisionBlocked, "vpn_error", 60, True, False)),
            (409, ("provisioning_blocked", "max_capacity", 30, False, True), (ProvisionBlocked, "max_capacity", 30, False, True)),
        ]
        for http, (error, code, eta, can_retry, should_wait), expected in rows:
            f = self.structured(
                http,
                error=error,
                code=code,
                message=f"{code} happened",
                recovery_eta_seconds=eta,
                can_retry=can_retry,
                should_wait=should_wait,
            )
            e = f.value
            self.assertIsInstance(e, expected[0], (http, code))
            self.assertEqual(e.code, expected[1])
            self.assertEqual(e.message, f"{code} happened")
            self.assertEqual(e.http_status, http)
            if expected[0] is ProvisionBlocked:
                self.assertEqual((e.recovery_eta_seconds, e.can_retry, e.should_wait), expected[2:])
                self.assertEqual(e.details, BlockedDetails(code, f"{code} happened", *expected[2:]))

    def test_structured_with_missing_fields(self) -> None:
        e = self.structured(503, error="provisioning_blocked").value
        self.assertIsInstance(e, ProvisionBlocked)
        self.assertEqual((e.code, e.recovery_eta_seconds, e.can_retry, e.should_wait), ("provisioning_blocked", None, False, True))
        e = self.structured(500, error="provisioning_failed", message="docker said no").value
        self.assertIsInstance(e, ProvisionFailed)
        self.assertEqual((e.code, e.message), ("general_error", "docker said no"))

    def test_structured_with_bad_types_is_unavailable(self) -> None:
        f = self.structured(503, error="provisioning_blocked", code="x", recovery_eta_seconds="soon")
        self.assertIsInstance(f.value, OrchestratorUnavailable)

    def test_legacy_strings(self) -> None:
        rows = [
            (503, "VPN not connected", ProvisionBlocked, "vpn_disconnected", 60, True, True),
            (503, "Gluetun vpn is unhealthy", ProvisionBlocked, "vpn_disconnected", 60, True, True),
            (503, "Circuit breaker is open", ProvisionBlocked, "circuit_breaker", 180, False, True),
            (500, "Maximum capacity reached", ProvisionBlocked, "max_capacity", 30, False, True),
            (500, "docker exploded", ProvisionFailed, "general_error", None, None, None),
            (503, "something else", ProvisionFailed, "general_error", None, None, None),
        ]
        for http, text, kind, code, eta, can_retry, should_wait in rows:
            d = self.run_call(answer(http, {"detail": text}), lambda c: c.provision())
            e = self.failureResultOf(d, OrchestratorError).value
            self.assertIsInstance(e, kind, text)
            self.assertEqual((e.code, e.message, e.http_status), (code, text, http))
            if kind is ProvisionBlocked:
                self.assertEqual((e.recovery_eta_seconds, e.can_retry, e.should_wait), (eta, can_retry, should_wait))

    def test_503_without_a_structured_body_is_unavailable(self) -> None:
        for handler in (answer(503, raw=b""), answer(503, raw=b"Service Unavailable"), answer(503, {"error": "x"})):
            f = self.failureResultOf(self.run_call(handler, lambda c: c.provision()), OrchestratorUnavailable)
            self.assertNotIsInstance(f.value, ProvisionTimeout)
            self.assertIn("503", str(f.value))

    def test_auth_errors(self) -> None:
        for http, detail in ((401, "missing bearer token"), (403, "invalid token")):
            d = self.run_call(answer(http, {"detail": detail}), lambda c: c.provision())
            e = self.failureResultOf(d, OrchestratorAuthError).value
            self.assertIn("check ACEXY_ORCH_APIKEY", str(e))
            self.assertEqual(e.http_status, http)

    def test_timeout_is_provision_timeout(self) -> None:
        client, stub, res, clock = self.make(lambda r: NOT_DONE_YET)
        d = client.provision()
        stub.flush()
        clock.advance(59.9)
        self.assertNoResult(d)
        clock.advance(0.1)
        f = self.failureResultOf(d, ProvisionTimeout)
        self.assertIsInstance(f.value, OrchestratorUnavailable)
        self.assertIn("check /engines", str(f.value))
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(len(res.seen), 1)  # never re-POSTed behind the caller's back

    def test_connection_dropped_after_sending_is_provision_timeout(self) -> None:
        def drop(request: Any) -> Any:
            request.transport.loseConnection()
            return NOT_DONE_YET

        self.failureResultOf(self.run_call(drop, lambda c: c.provision()), ProvisionTimeout)
        self.failureResultOf(self.run_call(answer(504, raw=b"Gateway Timeout"), lambda c: c.provision()), ProvisionTimeout)
        self.failureResultOf(self.run_call(answer(200, raw=b"{oops"), lambda c: c.provision()), ProvisionTimeout)

    def test_refused_is_unavailable_not_timeout(self) -> None:
        client = OrchestratorClient(FailingHTTP(ConnectionRefusedError()), BASE, KEY, Clock())
        f = self.failureResultOf(client.provision(), OrchestratorUnavailable)
        self.assertNotIsInstance(f.value, ProvisionTimeout)


# -- events -------------------------------------------------------------------------


class EventsTests(Base):
    def test_stream_started_body_is_exactly_the_contract(self) -> None:
        event = stream_started_event(
            container_id=CONTAINER,
            engine_host="gluetun",
            engine_port=19000,
            key_type="content_id",
            key="k" * 40,
            playback_session_id="p" * 40,
            stat_url="http://gluetun:19000/ace/stat/x/t",
            command_url="http://gluetun:19000/ace/cmd/x/t",
            is_live=1,
        )
        expected = {
            "container_id": CONTAINER,
            "engine": {"host": "gluetun", "port": 19000},
            "stream": {"key_type": "content_id", "key": "k" * 40},
            "session": {
                "playback_session_id": "p" * 40,
                "stat_url": "http://gluetun:19000/ace/stat/x/t",
                "command_url": "http://gluetun:19000/ace/cmd/x/t",
                "is_live": 1,
            },
            "labels": {"stream_id": "k" * 40 + "|" + "p" * 40},
        }
        self.assertEqual(event, expected)
        self.assertEqual(stream_id_for("k" * 40, "p" * 40), expected["labels"]["stream_id"])
        client, stub, res, clock = self.make(answer(200, {"ok": True}))
        d = client.stream_started(event)
        stub.flush()
        self.assertIsNone(self.successResultOf(d))
        seen = res.seen[0]
        self.assertEqual((seen["method"], seen["path"]), ("POST", "/events/stream_started"))
        self.assertEqual(json.loads(seen["body"]), expected)
        self.assertEqual(seen["content_type"], [b"application/json"])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_stream_ended_body(self) -> None:
        client, stub, res, _ = self.make(answer(200, raw=b""))
        d = client.stream_ended(CONTAINER, "k|p", "client_disconnected")
        stub.flush()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(res.seen[0]["path"], "/events/stream_ended")
        self.assertEqual(
            json.loads(res.seen[0]["body"]),
            {"container_id": CONTAINER, "stream_id": "k|p", "reason": "client_disconnected"},
        )

    def test_422_is_an_orchestrator_error_with_the_detail(self) -> None:
        fastapi = {"detail": [{"loc": ["body", "session", "stat_url"], "msg": "invalid or missing URL scheme", "type": "url_parsing"}]}
        for doc, text in ((fastapi, "invalid or missing URL scheme"), ({"detail": "stat_url must be absolute"}, "stat_url must be absolute")):
            d = self.run_call(answer(422, doc), lambda c: c.stream_started({"container_id": CONTAINER}))
            e = self.failureResultOf(d, OrchestratorError).value
            self.assertEqual(type(e), OrchestratorError)
            self.assertIn(text, str(e))
            self.assertIn("422", str(e))

    def test_event_server_errors_are_not_provisioning_errors(self) -> None:
        d = self.run_call(answer(500, {"detail": "database is locked"}), lambda c: c.stream_ended(CONTAINER, "k|p", "shutdown"))
        e = self.failureResultOf(d, OrchestratorUnavailable).value
        self.assertIn("database is locked", str(e))
        d = self.run_call(answer(404, {"detail": "Not Found"}), lambda c: c.stream_ended(CONTAINER, "k|p", "shutdown"))
        e = self.failureResultOf(d, OrchestratorError).value
        self.assertEqual(type(e), OrchestratorError)
        d = self.run_call(answer(401, {"detail": "missing bearer token"}), lambda c: c.stream_ended(CONTAINER, "k|p", "shutdown"))
        self.failureResultOf(d, OrchestratorAuthError)


# -- auth, timeouts, cancellation, secrecy -------------------------------------------


ALL_CALLS: list[tuple[str, Callable[[OrchestratorClient], Any]]] = [
    ("status", lambda c: c.status()),
    ("engines", lambda c: c.engines()),
    ("streams", lambda c: c.streams()),
    ("streams(cid)", lambda c: c.streams(CONTAINER)),
    ("provision", lambda c: c.provision()),
    ("stream_started", lambda c: c.stream_started({"container_id": CONTAINER})),
    ("stream_ended", lambda c: c.stream_ended(CONTAINER, "k|p", "shutdown")),
]


class FailingHTTP:
    """An HTTPClient whose every request fails at the connection level."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def request(self, *args: Any, **kwargs: Any) -> Any:
        return fail(self.exc)


class AuthAndLifecycleTests(Base):
    def test_bearer_on_every_call(self) -> None:
        client, stub, res, _ = self.make(answer(200, []))
        for _, call in ALL_CALLS:
            call(client).addErrback(lambda f: None)
        stub.flush()
        self.assertEqual(len(res.seen), len(ALL_CALLS))
        for seen in res.seen:
            self.assertEqual(seen["auth"], [f"Bearer {KEY}".encode()], seen["path"])

    def test_no_key_no_header(self) -> None:
        client, stub, res, _ = self.make(answer(200, []), key=None)
        for _, call in ALL_CALLS:
            call(client).addErrback(lambda f: None)
        stub.flush()
        self.assertTrue(all(seen["auth"] is None for seen in res.seen))
        self.assertIn("without API key", repr(client))

    def test_each_call_times_out_on_the_clock(self) -> None:
        for name, call in ALL_CALLS:
            client, stub, _, clock = self.make(lambda r: NOT_DONE_YET)
            d = call(client)
            stub.flush()
            limit = 60 if name == "provision" else 10
            clock.advance(limit - 0.5)
            self.assertNoResult(d)
            clock.advance(0.5)
            f = self.failureResultOf(d, OrchestratorUnavailable)
            self.assertIn("did not answer", str(f.value))
            self.assertEqual(isinstance(f.value, ProvisionTimeout), name == "provision")
            self.assertEqual(clock.getDelayedCalls(), [], name)

    def test_cancellation_stays_a_cancellation(self) -> None:
        for name, call in ALL_CALLS:
            client, stub, _, clock = self.make(lambda r: NOT_DONE_YET)
            d = call(client)
            stub.flush()
            d.cancel()
            self.failureResultOf(d, CancelledError)
            self.assertEqual(clock.getDelayedCalls(), [], name)

    def test_network_failures_are_unavailable(self) -> None:
        for exc in (
            ConnectionRefusedError(),
            TCPTimedOutError(),
            ResponseNeverReceived([Failure(ConnectionResetError("reset by peer"))]),
        ):
            for name, call in ALL_CALLS:
                clock = Clock()
                client = OrchestratorClient(FailingHTTP(exc), BASE, KEY, clock)
                self.failureResultOf(call(client), OrchestratorUnavailable)
                self.assertEqual(clock.getDelayedCalls(), [], name)

    def test_the_key_never_appears_in_errors_or_repr(self) -> None:
        """Every call, failing every way — even with an orchestrator that echoes the key."""
        echo = f"bad token {KEY}"
        handlers: list[Callable[[Any], Any]] = [
            answer(401, {"detail": echo}),
            answer(403, {"detail": echo}),
            answer(422, {"detail": [{"msg": echo}]}),
            answer(422, {"detail": echo}),
            answer(400, {"detail": echo}),
            answer(404, raw=echo.encode()),
            answer(500, raw=echo.encode()),
            answer(500, {"detail": echo}),
            answer(503, {"detail": echo}),
            answer(503, {"detail": {"error": "provisioning_blocked", "code": "vpn_error", "message": echo}}),
            answer(500, {"detail": {"error": "provisioning_failed", "code": "general_error", "message": echo}}),
            answer(503, {"detail": {"error": "provisioning_blocked", "code": "x", "recovery_eta_seconds": echo}}),
            answer(504, raw=echo.encode()),
            answer(200, raw=echo.encode()),
            answer(200, {"status": echo, "engines": echo}),
            answer(200, [{"container_id": echo, "host": echo, "port": echo}]),
            answer(200, raw=b"[" + b" " * (1024 * 1024 + 1) + b"]"),
            lambda r: NOT_DONE_YET,
        ]
        errors: list[BaseException] = []
        for handler in handlers:
            for _name, call in ALL_CALLS:
                client, stub, _, clock = self.make(handler)
                self.assertNotIn(KEY, repr(client))
                d = call(client)
                stub.flush()
                clock.advance(120)
                results: list[Any] = []
                d.addBoth(results.append)
                if isinstance(results[0], Failure):
                    errors.append(results[0].value)
        for exc in (ConnectionRefusedError(KEY), ResponseNeverReceived([Failure(ConnectionResetError(echo))])):
            for _name, call in ALL_CALLS:
                client = OrchestratorClient(FailingHTTP(exc), BASE, KEY, Clock())
                self.failureResultOf(call(client), OrchestratorUnavailable)
                call(client).addErrback(lambda f: errors.append(f.value))
        self.assertGreater(len(errors), 100)
        for e in errors:
            self.assertIsInstance(e, OrchestratorError)
            self.assertNotIn(KEY, str(e))
            self.assertNotIn(KEY, repr(e))
            for value in vars(e).values():
                self.assertNotIn(KEY, repr(value))
        client = OrchestratorClient(StubTreq(Resource()), BASE, KEY, Clock())
        self.assertEqual(repr(client), f"<OrchestratorClient {BASE} with API key>")
