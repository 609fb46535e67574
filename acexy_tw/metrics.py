"""
Prometheus metrics (``prometheus_client``; nothing hand-written).

Almost everything is read from the live objects at scrape time by one custom
collector, so the streaming hot path pays nothing for metrics. The one thing
that must be recorded as it happens — time to first byte — is a Histogram
observed once per player.

Each service has its own ``CollectorRegistry`` (not the global one), so several
proxies in one process (tests) do not collide.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

ORCHESTRATOR_STATES = ("healthy", "degraded", "unavailable")


class _ProxyCollector(Collector):
    """Reads the parts' ``describe()`` snapshots at scrape time."""

    def __init__(self, metrics: "Metrics", registry: Any, placement: Any, monitor: Optional[Any]) -> None:
        self._metrics = metrics
        self._registry = registry
        self._placement = placement
        self._monitor = monitor

    def collect(self) -> Iterator[Any]:
        sessions = self._registry.describe()
        yield _gauge("acexy_engine_sessions", "Engine sessions open now", sessions["open"])
        yield _counter("acexy_engine_sessions_started", "Engine sessions started", sessions["started"])
        stopped = CounterMetricFamily(
            "acexy_engine_sessions_stopped", "Engine sessions ended, by reason", labels=["reason"]
        )
        for reason, n in sorted(sessions["stopped"].items()):
            stopped.add_metric([reason], n)
        yield stopped
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

        placement = self._placement.describe()
        yield _counter(
            "acexy_fallbacks", "Streams placed on the fallback engine (orchestrator unreachable)", placement["fallbacks"]
        )
        attempts = CounterMetricFamily(
            "acexy_provision_attempts", "Provisioning requests, by result", labels=["result"]
        )
        for result, n in sorted(placement["provision_attempts"].items()):
            attempts.add_metric([result], n)
        yield attempts

        if self._monitor is None:
            return
        o = self._monitor.describe()
        yield _gauge("acexy_orchestrator_reachable", "The orchestrator answered its last status poll", 1 if o["reachable"] else 0)
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
        if "status" not in o:
            return
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
        if o["snapshot_age"] is not None:
            yield _gauge("acexy_orchestrator_snapshot_age_seconds", "Age of the last status snapshot", o["snapshot_age"])


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


class Metrics:
    """The proxy's metrics: built with the parts it reads, before the web app that serves them."""

    def __init__(self, registry: Any, placement: Any, monitor: Optional[Any] = None) -> None:
        self.clients_cut = 0
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_ProxyCollector(self, registry, placement, monitor))
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

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
