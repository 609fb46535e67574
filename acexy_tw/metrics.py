"""
Prometheus metrics (``prometheus_client``; nothing hand-written).

Almost everything is read from the live objects at scrape time by one custom
collector, so the streaming hot path pays nothing for metrics. What must be
recorded as it happens is counted by small hooks: time to first byte (a
Histogram observed once per player), players cut, each HTTP response as it
ends (:class:`acexy_tw.web.server.QuietSite`'s ``on_response``) and each
refusal a player is answered with (:meth:`Metrics.refused`).

Each service has its own ``CollectorRegistry`` (not the global one), so several
proxies in one process (tests) do not collide; the library's process and
platform collectors (``process_*``, ``python_info``) are registered on it too.

Label values are small fixed sets, each created at 0 up front, so a series
exists before its first event and never grows with what players send: HTTP
routes (:data:`acexy_tw.web.server.ROUTES`, unknown paths ``other``), stop
reasons (:data:`STOP_REASONS`), refusal codes (:data:`REFUSAL_CODES`, any
other ``other``), engine error kinds (:data:`ENGINE_ERROR_KINDS`) and
provisioning results (:data:`PROVISION_RESULTS`). The per-engine and
per-stream families are bounded by the configuration and the open sessions.

While the orchestrator does not answer, the families read from its last
status snapshot are left out (absent, not stale) and ``acexy_orchestrator_up``
is 0; the snapshot's age is still given.
"""

from __future__ import annotations

import platform
from collections import Counter
from typing import Any, Iterator, Optional

import twisted
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from acexy_tw import __version__
from acexy_tw.streaming.limits import MAX_SESSIONS_CODE
from acexy_tw.streaming.waiting import WAIT_CODES
from acexy_tw.web.server import OTHER_ROUTE, ROUTES

__all__ = [
    "ENGINE_ERROR_KINDS",
    "Metrics",
    "ORCHESTRATOR_STATES",
    "PROVISION_RESULTS",
    "REFUSAL_CODES",
    "STOP_REASONS",
]

ORCHESTRATOR_STATES = ("healthy", "degraded", "unavailable")

#: Every reason an engine session (TS or HLS) ends with, ``failover``
#: included (the old engine session of a failover): what
#: ``EngineSession.close`` / ``HlsSession.close`` and the upstream's
#: ``upstream_lost`` are given (tests/unit/test_metrics.py greps them).
STOP_REASONS = (
    "client_disconnected",
    "empty_timeout",
    "engine_eof",
    "engine_error",
    "failover",
    "shutdown",
    "stopped",
)

#: What :class:`acexy_tw.placement.Placement` counts per provisioning request.
PROVISION_RESULTS = ("attempt", "blocked", "failed", "ok", "refused", "timeout")

#: The codes of the refusals players are answered with (``NoEngine.code``):
#: the wait-class ones, placement's own, the session limit's and the wait
#: queue's. A code the orchestrator makes up is counted as ``other``.
REFUSAL_CODES = tuple(
    sorted(
        WAIT_CODES
        | {
            "engine_not_ready",
            "general_error",
            "orchestrator_auth",
            "provision_timeout",
            "queue_full",
            MAX_SESSIONS_CODE,
        }
    )
) + ("other",)

#: Kinds of engine errors: no HTTP answer, no answer in time, an answer
#: refusing the session or not video, a refusal of the content itself.
ENGINE_ERROR_KINDS = ("unreachable", "timeout", "refused", "content")


def _code_label(code: int) -> str:
    return str(code) if isinstance(code, int) and 100 <= code <= 599 else "other"


class _ProxyCollector(Collector):
    """Reads the parts' ``describe()`` snapshots at scrape time."""

    def __init__(
        self, metrics: "Metrics", registry: Any, placement: Any, monitor: Optional[Any], hls: Optional[Any]
    ) -> None:
        self._metrics = metrics
        self._registry = registry
        self._placement = placement
        self._monitor = monitor
        self._hls = hls

    def collect(self) -> Iterator[Any]:
        yield from self._sessions()
        yield from self._hls_sessions()
        yield from self._http()
        yield from self._placement_families()
        yield from self._pool()
        yield from self._orchestrator()

    def _sessions(self) -> Iterator[Any]:
        sessions = self._registry.describe()
        yield _gauge("acexy_engine_sessions", "Engine sessions open now", sessions["open"])
        yield _counter("acexy_engine_sessions_started", "Engine sessions started", sessions["started"])
        yield _labelled(
            CounterMetricFamily,
            "acexy_engine_sessions_stopped",
            "Engine sessions ended, by reason",
            "reason",
            STOP_REASONS,
            sessions["stopped"],
        )
        yield _gauge("acexy_clients", "Players connected now", sessions["clients"])
        yield _counter("acexy_bytes_sent", "Bytes sent to players", sessions["bytes_out"])
        yield _counter("acexy_clients_cut", "Players cut for being too slow or stuck", self._metrics.clients_cut)
        yield _counter("acexy_engine_bytes_received", "Bytes received from engines", sessions["bytes_in"])
        peers = GaugeMetricFamily("acexy_engine_peers", "Engine peers per stream (its last stat answer)", labels=["stream"])
        speed = GaugeMetricFamily(
            "acexy_engine_speed_down_kib", "Engine download speed per stream, KiB/s (its last stat answer)", labels=["stream"]
        )
        for stream, n, down in sessions["engine_stats"]:
            if n is not None:
                peers.add_metric([stream], n)
            if down is not None:
                speed.add_metric([stream], down)
        yield peers
        yield speed

        held = sessions["held"]
        yield _gauge("acexy_held_players", "Players held (keepalive) waiting for an engine", held["players"])
        yield _gauge("acexy_queue_length", "Contents held in the wait queue", held["queued"])
        yield _gauge("acexy_queue_size", "Players that may be held at once", held["queue_size"])
        yield _labelled(
            CounterMetricFamily,
            "acexy_refusals",
            "Players answered with a refusal (503/502 and its code)",
            "code",
            REFUSAL_CODES,
            self._metrics.refusals,
        )

    def _hls_sessions(self) -> Iterator[Any]:
        if self._hls is None:
            return
        yield _gauge("acexy_hls_sessions", "HLS engine sessions open now", len(self._hls))
        yield _counter(
            "acexy_hls_segment_bytes",
            "HLS segment bytes relayed from engines to players (counted as each segment response ends)",
            self._metrics.hls_segment_bytes,
        )

    def _http(self) -> Iterator[Any]:
        responses = CounterMetricFamily(
            "acexy_http_responses", "HTTP responses, by route and status code", labels=["route", "code"]
        )
        for (route, code), n in sorted(self._metrics.http_responses.items()):
            responses.add_metric([route, code], n)
        yield responses

    def _placement_families(self) -> Iterator[Any]:
        placement = self._placement.describe()
        yield _counter(
            "acexy_fallbacks", "Streams placed on the fallback engine (orchestrator unreachable)", placement["fallbacks"]
        )
        yield _labelled(
            CounterMetricFamily,
            "acexy_provision_attempts",
            "Provisioning requests, by result",
            "result",
            PROVISION_RESULTS,
            placement["provision_attempts"],
        )
        yield _labelled(  # counted by placement, where engine session starts fail
            CounterMetricFamily,
            "acexy_engine_errors",
            "Engine session starts that failed, by kind",
            "kind",
            ENGINE_ERROR_KINDS,
            placement["engine_errors"],
        )

    def _pool(self) -> Iterator[Any]:
        up = GaugeMetricFamily("acexy_engine_up", "A pool engine answers (1) or not, or not yet (0)", labels=["engine"])
        load = GaugeMetricFamily(
            "acexy_engine_pool_sessions", "Our sessions (and placements in flight) on each pool engine", labels=["engine"]
        )
        for engine in self._placement.pool_status():
            up.add_metric([engine["url"]], 1 if engine["state"] == "up" else 0)
            load.add_metric([engine["url"]], engine["sessions"])
        yield up
        yield load

    def _orchestrator(self) -> Iterator[Any]:
        if self._monitor is None:
            return
        o = self._monitor.describe()
        up = 1 if o["reachable"] else 0
        yield _gauge("acexy_orchestrator_up", "The orchestrator answered its last status poll", up)
        yield _gauge("acexy_orchestrator_reachable", "Same as acexy_orchestrator_up (the older name)", up)
        yield _counter(
            "acexy_orchestrator_auth_failures",
            "POSTs the orchestrator refused with 401/403 (check ACEXY_ORCH_APIKEY)",
            o["auth_failures"],
        )
        yield _gauge(
            "acexy_orchestrator_auth_ok",
            "0 while the orchestrator refuses the API key (since the last refused POST)",
            1 if o["auth_ok"] else 0,
        )
        if o["snapshot_age"] is not None:
            yield _gauge("acexy_orchestrator_snapshot_age_seconds", "Age of the last status snapshot", o["snapshot_age"])
        if "status" not in o or not o["reachable"]:
            return  # no snapshot, or an old one: absent rather than stale
        state = GaugeMetricFamily("acexy_orchestrator_status", "Orchestrator status (1 = current)", labels=["status"])
        for name in ORCHESTRATOR_STATES:
            state.add_metric([name], 1 if o["status"] == name else 0)
        yield state
        yield _gauge("acexy_orchestrator_can_provision", "The orchestrator can provision engines", 1 if o["can_provision"] else 0)
        yield _gauge("acexy_orchestrator_vpn_connected", "The VPN is up (or not in use)", 0 if o["vpn"]["down"] else 1)
        capacity = GaugeMetricFamily("acexy_orchestrator_capacity", "Orchestrator engine capacity", labels=["kind"])
        for kind in ("total", "used", "available"):
            capacity.add_metric([kind], o["capacity"][kind])
        yield capacity


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _labelled(family: Any, name: str, doc: str, label: str, known: tuple, counts: dict) -> Any:
    """One label, every known value present (0 before its first event), then any other counted."""
    metric = family(name, doc, labels=[label])
    for value in known:
        metric.add_metric([value], counts.get(value, 0))
    for value in sorted(set(counts) - set(known)):
        metric.add_metric([value], counts[value])
    return metric


class Metrics:
    """The proxy's metrics: built with the parts it reads, before the web app and site that feed it."""

    def __init__(self, registry: Any, placement: Any, monitor: Optional[Any] = None, *, hls: Optional[Any] = None) -> None:
        self.clients_cut = 0
        #: (route, code) -> responses; every route's 200 exists from the start
        self.http_responses: Counter[tuple[str, str]] = Counter({(route, "200"): 0 for route in ROUTES})
        #: segment bytes sent by HLS segment responses that ended
        self.hls_segment_bytes = 0
        #: refusal code -> players refused
        self.refusals: Counter[str] = Counter()
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.registry)  # process_*: RSS, CPU, fds, start time (Linux)
        PlatformCollector(registry=self.registry)  # python_info
        Info("acexy_build", "acexy-tw's version and what it runs on", registry=self.registry).info(
            {"version": __version__.public(), "python": platform.python_version(), "twisted": twisted.__version__}
        )
        self.registry.register(_ProxyCollector(self, registry, placement, monitor, hls))
        self.time_to_first_byte = Histogram(
            "acexy_time_to_first_byte_seconds",
            "From a player's request to its first byte (video or keepalive)",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )

    def client_cut(self, sink: Any, reason: str) -> None:
        self.clients_cut += 1

    def first_byte(self, sink: Any) -> None:
        self.time_to_first_byte.observe(max(0.0, sink.first_byte_at - sink.connected_at))

    def http_response(self, route: str, code: int, body_bytes: int) -> None:
        """A response ended (QuietSite's ``on_response``): counted by route
        (one of :data:`~acexy_tw.web.server.ROUTES`) and status code."""
        route = route if route in ROUTES else OTHER_ROUTE
        self.http_responses[(route, _code_label(code))] += 1
        if route == "segment" and code == 200:
            self.hls_segment_bytes += body_bytes

    def refused(self, error: Any) -> None:
        """A player was answered with ``error`` (a ``NoEngine``), by its code."""
        code = getattr(error, "code", None)
        self.refusals[code if code in REFUSAL_CODES else "other"] += 1

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
