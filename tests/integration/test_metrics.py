"""
/metrics of the real service over loopback, busy with everything at once: a
TS stream and an HLS session placed through the simulated orchestrator, an
engine pool of two simulated engines, responses of several routes. The page
goes through ``promtool check metrics`` when promtool is installed (Debian
and Ubuntu: ``apt-get install prometheus``); then the orchestrator goes away
(its snapshot's families disappear, ``acexy_orchestrator_up`` is 0, the page
is still clean) and comes back.

Every wait is bounded (``within``, ``wait_until``); nothing sleeps.
"""

from __future__ import annotations

import shutil
from typing import Optional
from urllib.parse import urljoin

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from acexy_tw.streaming.mpegts import PACKET_SIZE
from tests.integration import harness
from tests.integration.harness import (
    Player,
    cid,
    get_text,
    http_client,
    orchestrated_proxy,
    reactor,
    sim_engine,
    wait_until,
    within,
)

KEY = "metrics-k3y-0123456789"

SNAPSHOT_FAMILIES = (
    "acexy_orchestrator_status",
    "acexy_orchestrator_can_provision",
    "acexy_orchestrator_vpn_connected",
    "acexy_orchestrator_capacity",
)


def value(text: str, name: str, labels: Optional[dict] = None) -> Optional[float]:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == (labels or {}):
                return s.value
    return None


def current_status(text: str) -> float:
    """How many ``acexy_orchestrator_status`` states are current (1: the snapshot is shown)."""
    return sum(value(text, "acexy_orchestrator_status", {"status": s}) or 0 for s in ("healthy", "degraded", "unavailable"))


def names(text: str) -> set[str]:
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


class _Collect(ProcessProtocol):
    def __init__(self, stdin: bytes) -> None:
        self._stdin = stdin
        self.output = bytearray()
        self.done: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self._stdin)
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.done.callback((reason.value.exitCode, bytes(self.output)))


def promtool_check(promtool: str, text: str) -> Deferred:
    """``promtool check metrics`` on ``text`` (stdin): fires (exit code, output)."""
    collect = _Collect(text.encode())
    reactor.spawnProcess(collect, promtool, [promtool, "check", "metrics"], env={})
    return within(collect.done)


class MetricsOverLoopbackTests(TestCase):
    async def _scrape(self, proxy) -> str:
        code, text = await get_text(self, proxy.url("/metrics"))
        self.assertEqual(code, 200)
        return text

    async def _clean(self, text: str) -> None:
        promtool = shutil.which("promtool")
        if promtool is None:
            return
        code, output = await promtool_check(promtool, text)
        self.assertEqual((code, output), (0, b""), output.decode("utf-8", "replace"))

    async def test_a_busy_proxy_then_the_orchestrator_going_away_and_back(self) -> None:
        orch = harness.sim_orchestrator(self, api_key=KEY)
        a, b = sim_engine(self, bitrate=2_000_000), sim_engine(self, bitrate=2_000_000)
        proxy, _ = await orchestrated_proxy(
            self,
            orch,
            engines=f"127.0.0.1:{a.port},127.0.0.1:{b.port}",
            health_interval="1s",
            outage_poll_interval="1s",
            linger="0",
        )
        await within(b.when(lambda e: e.connections == 0))  # b's first probe is over too
        player = await Player.open(self, proxy.stream_url())
        self.assertEqual(player.code, 200)
        await player.when_received(50 * PACKET_SIZE)
        manifest = f"/ace/manifest.m3u8?id={cid(2)}"
        code, playlist = await get_text(self, proxy.url(manifest))
        self.assertEqual(code, 200, playlist)
        segments = [line for line in playlist.splitlines() if line and not line.startswith("#")]
        response = await within(http_client(self).get(proxy.url(urljoin(manifest, segments[-1]))))
        self.assertEqual(response.code, 200)
        segment = await within(response.content())
        self.assertEqual((await get_text(self, proxy.url("/no/such/path")))[0], 404)

        text = await self._scrape(proxy)
        for name in ("process_resident_memory_bytes", "process_open_fds", "python_info", "acexy_build_info"):
            self.assertIn(name, names(text))
        self.assertEqual(value(text, "acexy_engine_sessions"), 1)
        self.assertEqual(value(text, "acexy_hls_sessions"), 1)
        self.assertEqual(value(text, "acexy_hls_segment_bytes_total"), len(segment))
        self.assertEqual(value(text, "acexy_http_responses_total", {"route": "manifest", "code": "200"}), 1)
        self.assertEqual(value(text, "acexy_http_responses_total", {"route": "segment", "code": "200"}), 1)
        self.assertEqual(value(text, "acexy_http_responses_total", {"route": "other", "code": "404"}), 1)
        self.assertEqual(value(text, "acexy_http_responses_total", {"route": "getstream", "code": "200"}), 0)  # still streaming
        for engine in (a, b):
            self.assertEqual(value(text, "acexy_engine_up", {"engine": engine.url}), 1)
            self.assertEqual(value(text, "acexy_engine_pool_sessions", {"engine": engine.url}), 0)  # placed by the orchestrator
        self.assertEqual(value(text, "acexy_orchestrator_up"), 1)
        self.assertEqual(current_status(text), 1)
        self.assertEqual(value(text, "acexy_engine_sessions_stopped_total", {"reason": "engine_eof"}), 0)
        await self._clean(text)

        monitor = proxy.service.monitor
        await within(orch.down())
        await wait_until(lambda: monitor.reachable is False, "the orchestrator to be unreachable")
        text = await self._scrape(proxy)
        self.assertEqual(value(text, "acexy_orchestrator_up"), 0)
        self.assertFalse({n for n in names(text) if n.startswith(SNAPSHOT_FAMILIES)})
        self.assertIsNotNone(value(text, "acexy_orchestrator_snapshot_age_seconds"))
        await self._clean(text)

        orch.up()
        await wait_until(lambda: monitor.reachable is True, "the orchestrator to answer again")
        text = await self._scrape(proxy)
        self.assertEqual(value(text, "acexy_orchestrator_up"), 1)
        self.assertEqual(current_status(text), 1)

        await player.hang_up()
        await wait_until(lambda: len(proxy.registry) == 0, "the TS session to end")
        text = await self._scrape(proxy)
        self.assertEqual(value(text, "acexy_http_responses_total", {"route": "getstream", "code": "200"}), 1)
        self.assertEqual(value(text, "acexy_engine_sessions_stopped_total", {"reason": "client_disconnected"}), 1)
        await self._clean(text)

    def test_promtool_is_installed_where_ci_runs(self) -> None:
        if shutil.which("promtool") is None:
            self.skipTest("promtool not installed (Debian/Ubuntu: apt-get install prometheus): the checks above were skipped")
