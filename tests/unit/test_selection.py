"""Engine ranking (CONTRACTS.md §2): each rule alone, then in combination."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any, Optional

import pytest

from acexy_tw.orchestrator.client import OrchestratedEngine
from acexy_tw.orchestrator.selection import load, rank

T0 = datetime(2025, 10, 13, 14, 0, tzinfo=timezone.utc)


def engine(
    cid: str,
    *,
    streams: int = 0,
    health: str = "healthy",
    forwarded: bool = False,
    used: Optional[datetime] = None,
    **kw: Any,
) -> OrchestratedEngine:
    return OrchestratedEngine(
        container_id=cid,
        container_name=f"acestream-{cid}",
        host="gluetun",
        port=19000,
        streams=tuple(f"{cid}-s{i}" for i in range(streams)),
        health_status=health,
        last_stream_usage=used,
        forwarded=forwarded,
        **kw,
    )


def ids(engines: list[OrchestratedEngine]) -> list[str]:
    return [e.container_id for e in engines]


# -- capacity ------------------------------------------------------------------


def test_engines_at_or_over_capacity_are_excluded() -> None:
    es = [engine("a", streams=0), engine("b", streams=1), engine("c", streams=2), engine("d", streams=3)]
    assert ids(rank(es, max_streams=2)) == ["a", "b"]
    assert ids(rank(es, max_streams=1)) == ["a"]


def test_extra_load_counts_towards_capacity() -> None:
    es = [engine("a", streams=0), engine("b", streams=0)]
    assert ids(rank(es, max_streams=1, extra_load={"a": 1})) == ["b"]
    assert rank(es, max_streams=1, extra_load={"a": 1, "b": 3}) == []
    assert ids(rank(es, max_streams=2, extra_load={"a": 1, "zzz": 5})) == ["b", "a"]


def test_load_is_listed_streams_plus_own() -> None:
    e = engine("a", streams=2)
    assert load(e) == 2
    assert load(e, {"a": 3, "b": 7}) == 5


def test_nothing_or_nobody_with_room() -> None:
    assert rank([], max_streams=1) == []
    assert rank([engine("a", streams=1)], max_streams=1) == []


def test_unhealthy_engines_with_room_are_still_candidates() -> None:
    assert ids(rank([engine("a", health="unhealthy")], max_streams=1)) == ["a"]


# -- each ordering rule alone ------------------------------------------------------


def test_healthy_before_unknown_before_unhealthy() -> None:
    es = [engine("a", health="unhealthy"), engine("b", health="unknown"), engine("c", health="healthy")]
    assert ids(rank(es, max_streams=5)) == ["c", "b", "a"]


def test_other_health_words_rank_as_unknown_and_case_is_ignored() -> None:
    es = [engine("a", health="unhealthy"), engine("b", health="starting"), engine("c", health="HEALTHY")]
    assert ids(rank(es, max_streams=5)) == ["c", "b", "a"]


def test_fewer_streams_first() -> None:
    es = [engine("a", streams=3), engine("b", streams=1), engine("c", streams=2)]
    assert ids(rank(es, max_streams=5)) == ["b", "c", "a"]


def test_extra_load_counts_towards_order() -> None:
    es = [engine("a", streams=0), engine("b", streams=1)]
    assert ids(rank(es, max_streams=5, extra_load={"a": 2})) == ["b", "a"]


def test_forwarded_first() -> None:
    es = [engine("a", forwarded=False), engine("b", forwarded=True)]
    assert ids(rank(es, max_streams=5)) == ["b", "a"]


def test_least_recently_used_first_and_never_used_is_oldest() -> None:
    es = [
        engine("a", used=T0),
        engine("b", used=T0 - timedelta(hours=1)),
        engine("c", used=None),
        engine("d", used=T0 + timedelta(minutes=1)),
    ]
    assert ids(rank(es, max_streams=5)) == ["c", "b", "a", "d"]


def test_usage_compares_instants_across_offsets_and_naive_is_utc() -> None:
    plus2 = timezone(timedelta(hours=2))
    es = [
        engine("a", used=datetime(2025, 10, 13, 15, 30, tzinfo=plus2)),  # 13:30Z
        engine("b", used=datetime(2025, 10, 13, 14, 0)),  # naive: 14:00Z
        engine("c", used=datetime(2025, 10, 13, 13, 45, tzinfo=timezone.utc)),
    ]
    assert ids(rank(es, max_streams=5)) == ["a", "c", "b"]


def test_container_id_breaks_ties_whatever_the_input_order() -> None:
    es = [engine("c"), engine("a"), engine("b")]
    assert ids(rank(es, max_streams=5)) == ["a", "b", "c"]
    assert ids(rank(list(reversed(es)), max_streams=5)) == ["a", "b", "c"]


# -- precedence between rules ---------------------------------------------------------


def test_health_beats_load() -> None:
    es = [engine("a", streams=0, health="unknown"), engine("b", streams=3, health="healthy")]
    assert ids(rank(es, max_streams=5)) == ["b", "a"]


def test_load_beats_forwarded() -> None:
    es = [engine("a", streams=1, forwarded=True), engine("b", streams=0, forwarded=False)]
    assert ids(rank(es, max_streams=5)) == ["b", "a"]


def test_forwarded_beats_usage() -> None:
    es = [engine("a", forwarded=False, used=None), engine("b", forwarded=True, used=T0)]
    assert ids(rank(es, max_streams=5)) == ["b", "a"]


def test_usage_beats_container_id() -> None:
    es = [engine("a", used=T0), engine("b", used=T0 - timedelta(seconds=1))]
    assert ids(rank(es, max_streams=5)) == ["b", "a"]


def test_capacity_filter_applies_before_health() -> None:
    es = [engine("a", streams=2, health="healthy"), engine("b", streams=0, health="unhealthy")]
    assert ids(rank(es, max_streams=2)) == ["b"]


def test_full_combination() -> None:
    es = [
        engine("full", streams=2, health="healthy", forwarded=True),
        engine("sick", streams=0, health="unhealthy", forwarded=True),
        engine("unk", streams=0, health="unknown"),
        engine("h1-busy", streams=1, health="healthy", forwarded=True),
        engine("h0-fwd-new", streams=0, health="healthy", forwarded=True, used=T0),
        engine("h0-fwd-old", streams=0, health="healthy", forwarded=True, used=T0 - timedelta(days=1)),
        engine("h0-plain", streams=0, health="healthy"),
        engine("h0-own", streams=0, health="healthy", forwarded=True),
    ]
    ranked = rank(es, max_streams=2, extra_load={"h0-own": 1, "full": 0})
    assert ids(ranked) == ["h0-fwd-old", "h0-fwd-new", "h0-plain", "h0-own", "h1-busy", "unk", "sick"]


def test_rank_does_not_mutate_its_input() -> None:
    es = [engine("b"), engine("a")]
    rank(es, max_streams=1)
    assert ids(es) == ["b", "a"]


@pytest.mark.parametrize("max_streams", [1, 2, 10])
def test_every_result_has_room(max_streams: int) -> None:
    es = [engine(f"e{i}", streams=i % 4) for i in range(12)]
    extra = {f"e{i}": i % 3 for i in range(12)}
    ranked = rank(es, max_streams=max_streams, extra_load=extra)
    assert all(load(e, extra) < max_streams for e in ranked)
    assert len(ranked) == sum(1 for e in es if load(e, extra) < max_streams)
