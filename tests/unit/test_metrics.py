"""
/metrics on the in-memory proxy (task.Clock, no sockets): the library's
process and platform collectors, build info, HLS sessions and segment bytes,
HTTP responses by route and code, refusals and engine errors by kind, label
values created at 0 up front (and the lists of them kept in step with the
code), the orchestrator's families absent while it does not answer, and the
engine pool's engines. Every page is also parsed by prometheus_client's own
parser and, where installed, checked with ``promtool check metrics``.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urljoin

import twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import succeed
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone
from twisted.python.failure import Failure
from twisted.internet.testing import StringTransport

from acexy_tw import __version__
from acexy_tw.engine import EngineTimeout, NoEngine
from acexy_tw.metrics import (
    ENGINE_ERROR_KINDS,
    Metrics,
    PROVISION_RESULTS,
    REFUSAL_CODES,
    STOP_REASONS,
)
from acexy_tw.streaming.waiting import WAIT_CODES
from acexy_tw.testing import CID, FakeResponse, InMemoryProxy, orchestrator_status, ts
from acexy_tw.web.server import OTHER_ROUTE, ROUTES, route_of

PACKAGE = Path(__file__).resolve().parents[2] / "acexy_tw"
CID2 = "b" * 40

PLAYLIST = (
    b"#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:1\n"
    b"#EXTINF:2.0,\nhttp://127.0.0.1:6878/ace/c/abc/1.ts\n#EXTINF:2.0,\nhttp://127.0.0.1:6878/ace/c/abc/2.ts\n"
)


def page(p: InMemoryProxy) -> str:
    c = p.connect(b"/metrics")
    assert c.status() == 200, c.value()
    return c.body().decode()


def sample(text: str, name: str, labels: Optional[dict[str, str]] = None) -> Optional[float]:
    """The value of ``name{labels}`` (labels exactly these), or None when absent."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == (labels or {}):
                return s.value
    return None


def names(text: str) -> set[str]:
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def series(text: str, name: str) -> list[dict[str, str]]:
    return [s.labels for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


def serve_hls(engine: Any) -> list[FakeResponse]:
    """``engine`` (a ScriptedEngine) serves PLAYLIST, and a FakeResponse per segment GET (returned)."""
    bodies: list[FakeResponse] = []

    def get(url: str) -> Any:
        bodies.append(FakeResponse())
        return succeed(bodies[-1])

    engine.fetch = lambda url: succeed((200, PLAYLIST))
    engine.get = get
    return bodies


def hls_proxy(**settings: Any) -> tuple[InMemoryProxy, list[FakeResponse]]:
    p = InMemoryProxy(**settings)
    return p, serve_hls(p.engine)


def segment_paths(playlist: bytes, manifest: bytes = b"/ace/manifest.m3u8") -> list[bytes]:
    """The playlist's segment links as paths (resolved, should they be relative)."""
    return [urljoin(manifest, line) for line in playlist.splitlines() if line and not line.startswith(b"#")]


class LibraryCollectorTests(SynchronousTestCase):
    def test_process_and_platform_metrics_come_from_our_registry(self) -> None:
        if not os.path.isdir("/proc/self"):
            self.skipTest("process_* metrics need /proc (Linux)")
        text = page(InMemoryProxy())
        for name in (
            "process_resident_memory_bytes",
            "process_cpu_seconds_total",
            "process_open_fds",
            "process_start_time_seconds",
            "python_info",
        ):
            self.assertIn(name, names(text))
        self.assertGreater(sample(text, "process_resident_memory_bytes"), 0)
        [info] = series(text, "python_info")
        self.assertEqual(info["version"], platform.python_version())

    def test_two_proxies_in_one_process_each_have_them(self) -> None:
        if not os.path.isdir("/proc/self"):
            self.skipTest("process_* metrics need /proc (Linux)")
        a, b = InMemoryProxy(), InMemoryProxy()  # no "Duplicated timeseries" on a second registry
        self.assertIn("process_open_fds", names(page(a)))
        self.assertIn("process_open_fds", names(page(b)))


class BuildInfoTests(SynchronousTestCase):
    def test_version_python_and_twisted(self) -> None:
        text = page(InMemoryProxy())
        self.assertEqual(
            series(text, "acexy_build_info"),
            [{"version": __version__.public(), "python": platform.python_version(), "twisted": twisted.__version__}],
        )
        self.assertEqual(sample(text, "acexy_build_info", series(text, "acexy_build_info")[0]), 1.0)


class HlsMetricsTests(SynchronousTestCase):
    def test_sessions_open_and_segment_bytes_relayed(self) -> None:
        p, bodies = hls_proxy()
        text = page(p)
        self.assertEqual(sample(text, "acexy_hls_sessions"), 0)
        self.assertEqual(sample(text, "acexy_hls_segment_bytes_total"), 0)
        poll = p.connect(b"/ace/manifest.m3u8?id=" + CID.encode())
        self.assertEqual(poll.status(), 200)
        first, second = segment_paths(poll.body())
        self.assertEqual(sample(page(p), "acexy_hls_sessions"), 1)

        player = p.connect(first)
        bodies[-1].protocol.dataReceived(ts(10))
        self.assertEqual(sample(page(p), "acexy_hls_segment_bytes_total"), 0)  # counted as it ends
        bodies[-1].protocol.connectionLost(Failure(ResponseDone()))
        self.assertTrue(player.finished_cleanly())
        self.assertEqual(sample(page(p), "acexy_hls_segment_bytes_total"), 10 * 188)

        cut = p.connect(second)
        bodies[-1].protocol.dataReceived(ts(3))
        cut.disconnect()  # a player that leaves mid-segment: what it was sent counts
        text = page(p)
        self.assertEqual(sample(text, "acexy_hls_segment_bytes_total"), 13 * 188)
        self.assertEqual(sample(text, "acexy_http_responses_total", {"route": "segment", "code": "200"}), 2)

        self.assertEqual(p.connect(b"/ace/hls/nope/x.ts").status(), 404)  # an error body is not a segment
        [session] = list(p.hls)
        session.close("stopped")
        text = page(p)
        self.assertEqual(sample(text, "acexy_hls_sessions"), 0)
        self.assertEqual(sample(text, "acexy_hls_segment_bytes_total"), 13 * 188)  # kept after the close


class HttpResponseTests(SynchronousTestCase):
    def test_every_route_has_its_200_series_from_the_start(self) -> None:
        text = page(InMemoryProxy())
        for route in ROUTES:
            self.assertEqual(sample(text, "acexy_http_responses_total", {"route": route, "code": "200"}), 0, route)

    def test_paths_to_routes(self) -> None:
        cases = {
            b"/ace/getstream": "getstream",
            b"/ace/getstream/": "getstream",
            b"/ace/manifest.m3u8": "manifest",
            b"/ace/hls/sid/abc.ts": "segment",
            b"/ace/hls/" + CID.encode() + b"/sid/abc.ts": "segment",  # content id in the path (#14, 1)
            b"/ace/status": "status",
            b"/ace/status/": "status",
            b"/ace/stop": "stop",
            b"/ace/playlist/sports.m3u8": "playlist",
            b"/ace/playlists": "playlists",
            b"/": "dashboard",
            b"/healthz": "healthz",
            b"/metrics": "metrics",
            b"/ace/hls/": "other",
            b"/ace/getstreamx": "other",
            b"/favicon.ico": "other",
            b"": "other",
            None: "other",
        }
        for path, route in cases.items():
            self.assertEqual(route_of(path), route, path)
            self.assertIn(route, ROUTES)

    def test_responses_by_route_and_code(self) -> None:
        p = InMemoryProxy()
        player = p.connect()
        p.engine.response.data(ts(2))
        self.assertEqual(p.connect(b"/ace/status").status(), 200)
        self.assertEqual(p.connect(b"/ace/status?id=" + CID2.encode()).status(), 404)
        self.assertEqual(p.connect(b"/healthz", method=b"HEAD").status(), 200)
        self.assertEqual(p.connect(b"/ace/getstream?id=nope").status(), 400)
        self.assertEqual(p.connect(b"/ace/stop?id=" + CID.encode()).status(), 405)
        self.assertEqual(p.connect(b"/ace/stop?id=" + CID.encode(), method=b"POST").status(), 204)
        self.assertTrue(player.finished_cleanly())
        page(p)
        text = page(p)
        want = {
            ("getstream", "200"): 1,
            ("getstream", "400"): 1,
            ("status", "200"): 1,
            ("status", "404"): 1,
            ("healthz", "200"): 1,
            ("stop", "405"): 1,
            ("stop", "204"): 1,
            ("metrics", "200"): 1,  # the first scrape
        }
        for (route, code), n in want.items():
            self.assertEqual(sample(text, "acexy_http_responses_total", {"route": route, "code": code}), n, (route, code))

    def test_unknown_paths_are_other_and_never_a_new_series(self) -> None:
        p = InMemoryProxy()
        for i in range(50):
            self.assertEqual(p.connect(f"/wp-admin/{i}.php?x={i}".encode()).status(), 404)
        text = page(p)
        self.assertEqual(sample(text, "acexy_http_responses_total", {"route": "other", "code": "404"}), 50)
        routes = {labels["route"] for labels in series(text, "acexy_http_responses_total")}
        self.assertEqual(routes, set(ROUTES))
        self.assertNotIn("wp-admin", text)

    def test_a_stream_cut_short_is_counted_with_its_code_and_a_player_gone_before_any_answer_is_not(self) -> None:
        p = InMemoryProxy()
        p.engine.auto = False
        waiting = p.connect()
        waiting.disconnect()  # no response had begun: nothing to count
        p.engine.auto = True
        watching = p.connect(b"/ace/getstream?id=" + CID2.encode())
        p.engine.response.data(ts(1))
        watching.disconnect()
        text = page(p)
        self.assertEqual(sample(text, "acexy_http_responses_total", {"route": "getstream", "code": "200"}), 1)
        self.assertEqual(len([s for s in series(text, "acexy_http_responses_total") if s["route"] == "getstream"]), 1)

    def test_a_request_with_a_body_is_a_413_of_its_route(self) -> None:
        p = InMemoryProxy()
        c = p.site.buildProtocol(None)
        transport = StringTransport()
        c.makeConnection(transport)
        c.dataReceived(b"POST /ace/stop?id=" + CID.encode() + b" HTTP/1.1\r\nHost: p\r\nContent-Length: 5\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413"))
        self.assertEqual(sample(page(p), "acexy_http_responses_total", {"route": "stop", "code": "413"}), 1)

    def test_connections_refused_at_the_cap_are_503s(self) -> None:
        p = InMemoryProxy(max_connections="8")
        held = [p.connect() for _ in range(8)]  # being served: none can be cut
        extra = [p.site.buildProtocol(None) for _ in range(5)]  # 4 health slots, then refused unread
        for c in extra:
            c.makeConnection(StringTransport())
        self.assertEqual(p.site.refused, 1)
        extra[0].dataReceived(b"GET /ace/status HTTP/1.1\r\nHost: p\r\n\r\n")  # a health slot: /healthz only
        self.assertEqual(len(p.registry.get_any().sinks), len(held))
        # (every connection is taken: the counts are read directly)
        self.assertEqual(p.metrics.http_responses[("other", "503")], 1)
        self.assertEqual(p.metrics.http_responses[("status", "503")], 1)

    def test_codes_outside_http_are_one_label(self) -> None:
        m = InMemoryProxy().metrics
        m.http_response("getstream", 999, 0)
        m.http_response("/raw/path", 200, 0)
        self.assertEqual(m.http_responses[("getstream", "other")], 1)
        self.assertEqual(m.http_responses[(OTHER_ROUTE, "200")], 1)


class RefusalAndErrorTests(SynchronousTestCase):
    def test_refusal_codes_exist_at_zero_and_count_by_code(self) -> None:
        p = InMemoryProxy()
        text = page(p)
        for code in REFUSAL_CODES:
            self.assertEqual(sample(text, "acexy_refusals_total", {"code": code}), 0, code)
        p.metrics.refused(NoEngine("vpn", code="vpn_disconnected"))
        p.metrics.refused(NoEngine("made up", code="orchestrator_new_code"))
        text = page(p)
        self.assertEqual(sample(text, "acexy_refusals_total", {"code": "vpn_disconnected"}), 1)
        self.assertEqual(sample(text, "acexy_refusals_total", {"code": "other"}), 1)
        self.assertEqual(len(series(text, "acexy_refusals_total")), len(REFUSAL_CODES))

    def test_players_refused_over_http_are_counted(self) -> None:
        p = InMemoryProxy(max_sessions="1")
        first = p.connect()
        p.engine.response.data(ts(1))
        refused = p.connect(b"/ace/getstream?id=" + b"b" * 40)  # a second engine session: over the limit
        self.assertEqual(refused.status(), 503)
        self.assertEqual(p.connect(b"/ace/manifest.m3u8?id=" + b"c" * 40).status(), 503)
        self.assertEqual(sample(page(p), "acexy_refusals_total", {"code": "max_sessions"}), 2)
        first.disconnect()

    def test_every_refusal_code_in_the_code_is_listed(self) -> None:
        self.assertTrue(WAIT_CODES <= set(REFUSAL_CODES))
        found = set()
        for path in PACKAGE.rglob("*.py"):
            if "sim" in path.parts or path.name == "testing.py":
                continue
            text = path.read_text()
            found |= set(re.findall(r'\bcode="([a-z_]+)"', text))
            found |= set(re.findall(r'_no_engine\("([a-z_]+)"', text))
            found |= set(re.findall(r'or "([a-z_]+)"', text)) & {"queue_full", "general_error"}
        found.discard("code")
        self.assertTrue(found)
        self.assertEqual(found - set(REFUSAL_CODES), set())

    def test_engine_errors_by_kind_once_placement_counts_them(self) -> None:
        """Read from ``placement.describe()["engine_errors"]`` (kind -> n), every kind at 0 up front."""
        p = InMemoryProxy()

        class Counting:
            def __init__(self, placement: Any) -> None:
                self._placement = placement
                self.errors: dict[str, int] = {"timeout": 2}

            def describe(self) -> dict:
                return {**self._placement.describe(), "engine_errors": dict(self.errors)}

            def pool_status(self) -> list:
                return self._placement.pool_status()

        placement = Counting(p.placement)
        metrics = Metrics(p.registry, placement, p.monitor, hls=p.hls)
        text = metrics.render()[0].decode()
        self.assertEqual({s["kind"] for s in series(text, "acexy_engine_errors_total")}, set(ENGINE_ERROR_KINDS))
        self.assertEqual(sample(text, "acexy_engine_errors_total", {"kind": "timeout"}), 2)
        self.assertEqual(sample(text, "acexy_engine_errors_total", {"kind": "unreachable"}), 0)

    def test_an_engine_timeout_is_a_504_of_its_route(self) -> None:
        p = InMemoryProxy()
        p.engine.script.append(EngineTimeout("no answer in time"))
        player = p.connect()
        self.assertEqual(player.status(), 504)
        self.assertEqual(sample(page(p), "acexy_http_responses_total", {"route": "getstream", "code": "504"}), 1)


class PreCreatedLabelTests(SynchronousTestCase):
    def test_every_stop_reason_exists_at_zero(self) -> None:
        text = page(InMemoryProxy())
        for reason in STOP_REASONS:
            self.assertEqual(sample(text, "acexy_engine_sessions_stopped_total", {"reason": reason}), 0, reason)

    def test_every_reason_a_session_ends_with_is_listed(self) -> None:
        found = set()
        for where in ("streaming", "web"):
            for path in (PACKAGE / where).rglob("*.py"):
                text = path.read_text()
                found |= set(re.findall(r'\bclose\("([a-z_]+)"', text))
                found |= set(re.findall(r'_report\(\s*"([a-z_]+)"', text))
                found |= set(re.findall(r'_on_engine_lost\(self, "([a-z_]+)"', text))
        self.assertGreaterEqual(len(found), 6)
        self.assertEqual(found - set(STOP_REASONS), set())

    def test_every_provisioning_result_exists_at_zero_and_is_listed(self) -> None:
        found = set(re.findall(r'_count\("([a-z_]+)"\)', (PACKAGE / "placement.py").read_text()))
        self.assertEqual(found, set(PROVISION_RESULTS))
        text = page(InMemoryProxy())
        for result in PROVISION_RESULTS:
            self.assertEqual(sample(text, "acexy_provision_attempts_total", {"result": result}), 0, result)

    def test_a_reason_not_listed_still_shows(self) -> None:
        p = InMemoryProxy()
        p.registry.stopped["brand_new"] += 1
        self.assertEqual(sample(page(p), "acexy_engine_sessions_stopped_total", {"reason": "brand_new"}), 1)


SNAPSHOT_FAMILIES = (
    "acexy_orchestrator_status",
    "acexy_orchestrator_can_provision",
    "acexy_orchestrator_vpn_connected",
    "acexy_orchestrator_capacity",
)


class OrchestratorTests(SynchronousTestCase):
    def test_absent_while_unreachable_with_up_0_and_back_when_it_answers(self) -> None:
        p = InMemoryProxy(orchestrator=True, health_interval=30, outage_poll_interval=10)
        text = page(p)
        self.assertEqual(sample(text, "acexy_orchestrator_up"), 0)  # not polled yet
        self.assertFalse(names(text) & set(SNAPSHOT_FAMILIES))
        p.monitor.startService()
        self.addCleanup(p.monitor.stopService)
        text = page(p)
        self.assertEqual(sample(text, "acexy_orchestrator_up"), 1)
        self.assertEqual(sample(text, "acexy_orchestrator_status", {"status": "healthy"}), 1)
        self.assertEqual(sample(text, "acexy_orchestrator_can_provision"), 1)
        self.assertIsNotNone(sample(text, "acexy_orchestrator_capacity", {"kind": "total"}))

        p.orchestrator.unreachable = True
        p.clock.advance(30)
        self.assertIs(p.monitor.reachable, False)
        text = page(p)
        self.assertEqual(sample(text, "acexy_orchestrator_up"), 0)
        self.assertEqual(sample(text, "acexy_orchestrator_reachable"), 0)
        for family in SNAPSHOT_FAMILIES:
            self.assertFalse([n for n in names(text) if n.startswith(family)], family)
        self.assertGreaterEqual(sample(text, "acexy_orchestrator_snapshot_age_seconds"), 30)  # how old the last one is

        p.orchestrator.unreachable = False
        p.clock.advance(10)  # the outage poll interval
        text = page(p)
        self.assertEqual(sample(text, "acexy_orchestrator_up"), 1)
        self.assertEqual(sample(text, "acexy_orchestrator_status", {"status": "healthy"}), 1)

    def test_a_degraded_snapshot_is_shown_while_reachable(self) -> None:
        p = InMemoryProxy(orchestrator=True, snapshot=orchestrator_status(status="degraded"))
        p.monitor.startService()
        self.addCleanup(p.monitor.stopService)
        text = page(p)
        self.assertEqual(sample(text, "acexy_orchestrator_status", {"status": "degraded"}), 1)
        self.assertEqual(sample(text, "acexy_orchestrator_status", {"status": "healthy"}), 0)


class PoolTests(SynchronousTestCase):
    def test_each_engine_up_or_not_and_its_sessions(self) -> None:
        p = InMemoryProxy(pool="a:1,b:2", max_streams_per_engine=2)
        a, b = "http://a:1", "http://b:2"
        text = page(p)
        self.assertEqual(sample(text, "acexy_engine_up", {"engine": a}), 0)  # unknown until probed
        self.assertEqual(sample(text, "acexy_engine_up", {"engine": b}), 0)
        p.engines[("b", 2)].ready = False
        p.pool.probe()
        p.connect()
        text = page(p)
        self.assertEqual(sample(text, "acexy_engine_up", {"engine": a}), 1)
        self.assertEqual(sample(text, "acexy_engine_up", {"engine": b}), 0)  # down
        self.assertEqual(sample(text, "acexy_engine_pool_sessions", {"engine": a}), 1)
        self.assertEqual(sample(text, "acexy_engine_pool_sessions", {"engine": b}), 0)
        self.assertEqual(sample(text, "acexy_engine_sessions"), 1)  # the unlabelled total stays


class ExpositionTests(SynchronousTestCase):
    def test_a_busy_proxy_renders_valid_exposition(self) -> None:
        """Sessions, HLS, a pool and an orchestrator at once: parsed, and promtool-clean where installed."""
        p = InMemoryProxy(orchestrator=True, pool="a:1,b:2", stats_interval=5, max_streams_per_engine=4)
        p.monitor.startService()
        self.addCleanup(p.monitor.stopService)
        p.pool.probe()
        engine = p.engine_of(p.orchestrator.add(1))
        bodies = serve_hls(engine)
        ts_player = p.connect()
        engine.response.data(ts(4))
        poll = p.connect(b"/ace/manifest.m3u8?id=" + CID2.encode())
        self.assertEqual((ts_player.status(), poll.status()), (200, 200))
        segment = p.connect(segment_paths(poll.body())[0])
        bodies[-1].protocol.dataReceived(ts(2))
        bodies[-1].protocol.connectionLost(Failure(ResponseDone()))
        self.assertTrue(segment.finished_cleanly())
        p.connect(b"/nope")
        text = page(p)
        for name in ("acexy_hls_sessions", "acexy_engine_peers", "acexy_orchestrator_status", "acexy_engine_up"):
            self.assertIn(name, names(text))
        families = list(text_string_to_metric_families(text))
        self.assertGreater(len(families), 30)
        promtool = shutil.which("promtool")
        if promtool is None:
            self.skipTest("promtool not installed (Debian/Ubuntu: apt-get install prometheus)")
        result = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertEqual(result.stdout + result.stderr, b"")  # no lint findings either
