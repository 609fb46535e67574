"""
Which orchestrated engine takes a new session (CONTRACTS.md §2): pure, no I/O.

Order: capacity filter (load < max streams per engine) → healthy first
("healthy" < "unknown" < "unhealthy") → fewer streams → ``forwarded`` first →
oldest ``last_stream_usage`` first (never used counts as oldest) →
``container_id``, so equal engines always come out in the same order.
"""

from __future__ import annotations

from datetime import datetime, timezone
from types import MappingProxyType
from typing import Mapping, Optional, Sequence

from acexy_tw.orchestrator.client import OrchestratedEngine

_HEALTH_RANK = {"healthy": 0, "unknown": 1, "unhealthy": 2}
#: Any other health word (a newer orchestrator's) ranks with "unknown".
_OTHER_HEALTH = 1

_NO_EXTRA: Mapping[str, int] = MappingProxyType({})


def load(engine: OrchestratedEngine, extra_load: Mapping[str, int] = _NO_EXTRA) -> int:
    """Streams the orchestrator lists on it plus our own not yet reported there."""
    return len(engine.streams) + extra_load.get(engine.container_id, 0)


def _usage_key(when: Optional[datetime]) -> float:
    if when is None:
        return float("-inf")
    if when.tzinfo is None:  # the client never makes these; callers might
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def rank(
    engines: Sequence[OrchestratedEngine],
    *,
    max_streams: int,
    extra_load: Mapping[str, int] = _NO_EXTRA,
) -> list[OrchestratedEngine]:
    """
    The engines that can take one more stream, best first.

    ``extra_load`` maps container_id → the proxy's own sessions the
    orchestrator does not list yet (unreported, or placements in flight).
    An empty result means: provision, or wait.
    """
    def key(engine: OrchestratedEngine) -> tuple:
        return (
            _HEALTH_RANK.get(engine.health_status.lower(), _OTHER_HEALTH),
            load(engine, extra_load),
            not engine.forwarded,
            _usage_key(engine.last_stream_usage),
            engine.container_id,
        )

    return sorted((e for e in engines if load(e, extra_load) < max_streams), key=key)
