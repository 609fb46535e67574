"""
Outages without errors, end to end (real sockets, the simulated orchestrator
and engines): players held with null TS packets while the VPN is down or the
breaker is open, let go cleanly after ACEXY_MAX_WAIT, served in arrival order
when capacity comes back, refused with 503 + Retry-After when the queue is
full or in reject mode (then pre-warmed), and kept connected through a
mid-stream engine failover. Every wait is bounded; nothing sleeps. Upper
bounds on time are timeouts on the awaited event (``within(d, seconds)``);
where a test proves that something does *not* happen, it first waits for the
events that would have caused it (the orchestrator answering N status polls).
Exact timings (the keepalive cadence, max_wait) are checked on ``task.Clock``
in tests/unit/test_outages.py.

Unlike test_orchestrator.py these run with a wait queue (no ACEXY_QUEUE_SIZE=0).
"""

from __future__ import annotations

import json
import shutil
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from acexy_tw.sim.orchestrator import SimEngineHandle, SimOrchestrator
from acexy_tw.sim.tsgen import TSGenerator
from acexy_tw.streaming.fanout import KEEPALIVE
from acexy_tw.streaming.mpegts import NULL_PACKET, PACKET_SIZE
from tests.integration import harness
from tests.integration.harness import (
    orchestrated_proxy,
    ffprobe_capture,
    TSPlayer,
    cid,
    get_json,
    wait_until,
    within,
)

log = Logger()

KEY = "outage-test-key-0123456789abcdef"
BITRATE = 2_000_000  # the simulated orchestrator's engines
#: about one second of the engines' stream, in packets
ONE_SECOND = BITRATE // 8 // PACKET_SIZE


def engine_stream(packets: int) -> bytes:
    """The first ``packets`` packets every simulated engine playback sends
    (the generator is deterministic)."""
    return TSGenerator(BITRATE).packets(packets)


#: how every engine playback begins (its first PCR is 0: never seen again later)
STREAM_START = engine_stream(8)


def sim_orchestrator(test: TestCase, **kwargs: Any) -> SimOrchestrator:
    return harness.sim_orchestrator(test, api_key=KEY, **kwargs)


async def proxy_with(test: TestCase, orch: SimOrchestrator, **settings: str):
    """The proxy placing through ``orch`` (fast keepalive and outage polling)."""
    settings.setdefault("outage_poll_interval", "200ms")
    settings.setdefault("keepalive_interval", "200ms")
    return await orchestrated_proxy(test, orch, **settings)


def engines_asked_for(orch: SimOrchestrator, content_id: str, *extra: Any) -> int:
    """getstream calls for ``content_id`` on every orchestrated engine (and ``extra`` engines)."""
    engines = [h.engine for h in orch.engines] + list(extra)
    return sum(
        1 for e in engines for call in e.getstream_calls if content_id in (call.get("id"), call.get("content_id"))
    )


def keepalive_writes(player: TSPlayer) -> int:
    """Keepalive writes a player got (each is 7 null packets)."""
    return player.null_packets // (len(KEEPALIVE) // PACKET_SIZE)


def status_polls(orch: SimOrchestrator, n: int) -> Deferred:
    """Fires once the proxy's monitor has had ``n`` more status polls answered
    (the one in flight now may be among them; each answered poll kicks the
    wait queue)."""
    seen = orch.status_calls
    return within(orch.when(lambda o: o.status_calls >= seen + n + 1))


def first_content(handle: SimEngineHandle) -> str:
    return next(iter(handle.engine.sessions.values())).content_key


async def held_status(test: TestCase, proxy: Any) -> dict:
    code, doc = await get_json(test, proxy.url("/ace/status"))
    test.assertEqual(code, 200)
    return doc["held"]


def only_null_packets(player: TSPlayer) -> bool:
    data = bytes(player.received)
    return len(data) > 0 and data == NULL_PACKET * (len(data) // PACKET_SIZE)


def held_then_streamed(player: TSPlayer) -> bool:
    """Keepalive null packets, then an engine's stream from its first byte,
    byte for byte: nothing lost, nothing interleaved once it flows."""
    start = player.first_real_offset
    if not start or player.received.find(STREAM_START) != start:
        return False
    if bytes(player.received[:start]) != NULL_PACKET * (start // PACKET_SIZE):
        return False
    packets = (len(player.received) - start) // PACKET_SIZE
    return bytes(player.received[start : start + packets * PACKET_SIZE]) == engine_stream(packets)


class VpnOutageTests(TestCase):
    async def test_held_with_null_packets_then_real_ts_on_the_same_connection(self) -> None:
        """VPN down: 200 video/MP2T at once, null packets at the keepalive
        cadence; VPN back: real TS on the same connection, and ffprobe reads
        the whole capture."""
        orch = sim_orchestrator(self)
        orch.set_vpn(connected=False)
        proxy, fallback = await proxy_with(self, orch)
        # the 200 does not wait for the VPN
        player = await within(TSPlayer.open(self, proxy.stream_url(cid(1))), 0.5)
        self.assertEqual(player.code, 200)
        self.assertEqual(player.response.headers.getRawHeaders(b"content-type"), [b"video/MP2T"])

        # keepalive_interval=200ms: each write comes within 0.6 s of the one before,
        # the five gaps after the first one add up to at most 1.5 s (0.3 s each)...
        await player.when(lambda p: len(p.keepalive_ticks()) >= 1, "the first keepalive write", seconds=0.6)
        five_gaps = player.when(lambda p: len(p.keepalive_ticks()) >= 6, "6 keepalive writes", seconds=1.5)
        for n in range(2, 7):
            await player.when(lambda p: len(p.keepalive_ticks()) >= n, f"keepalive write {n}", seconds=0.6)
        await five_gaps
        self.assertTrue(only_null_packets(player))  # 47 1F FF 10 FF..., aligned
        # ...and they are paced, not a burst: every arrival apart from the others is one write
        self.assertLessEqual(keepalive_writes(player), len(player.keepalive_ticks()))
        self.assertEqual(orch.provision_calls, [])

        orch.set_vpn(connected=True)  # the monitor notices within outage_poll_interval
        await player.when(
            lambda p: p.first_real_offset is not None
            and len(p.received) - p.first_real_offset >= ONE_SECOND * PACKET_SIZE,
            "a second of stream",
        )
        self.assertFalse(player.ended.called)  # the same connection carried both
        self.assertTrue(player.aligned())
        self.assertTrue(held_then_streamed(player))
        self.assertEqual(len(orch.provision_calls), 1)
        self.assertEqual(fallback.getstream_calls, [])

        ffprobe = shutil.which("ffprobe")
        if ffprobe is None:
            self.skipTest("ffprobe not installed (everything but the probe passed)")
        probe = await ffprobe_capture(self, bytes(player.received))
        self.assertEqual(probe["format"]["format_name"], "mpegts")
        self.assertTrue({"video", "audio"} <= {s["codec_type"] for s in probe["streams"]}, probe["streams"])

    async def test_past_max_wait_the_player_ends_cleanly_and_nothing_leaks(self) -> None:
        """VPN down longer than ACEXY_MAX_WAIT: a clean end of the response, no
        session, no held player, no engine session, nothing provisioned."""
        orch = sim_orchestrator(self)
        busy = orch.add_engine(streams=1)  # the only engine is full: a new stream needs a provision
        orch.set_vpn(connected=False)
        proxy, fallback = await proxy_with(self, orch, max_wait="1s")
        player = await TSPlayer.open(self, proxy.stream_url(cid(2)))
        self.assertEqual(player.code, 200)
        await within(player.when_ended(), 2.5)
        self.assertTrue(player.clean_end, player.end_reason)
        self.assertTrue(only_null_packets(player))
        # Let go by the proxy's max_wait rule, not by anything that went wrong: the
        # response was finished (clean end) by the proxy, and the session then closed
        # because its last player had gone. The player was held across keepalive
        # ticks and never past max_wait: at most one write per 200 ms in 1 s.
        self.assertEqual(dict(proxy.registry.stopped), {"client_disconnected": 1})
        self.assertTrue(1 < keepalive_writes(player) <= 5, player.null_packets)

        self.assertEqual(len(proxy.registry), 0)
        self.assertEqual(proxy.service.waits.held, [])
        self.assertEqual(proxy.service.placement.reservations, {})
        held = await held_status(self, proxy)
        self.assertEqual((held["players"], held["sessions"]), (0, []))
        # two outage polls (each one kicks the queue) change nothing
        await status_polls(orch, 2)
        self.assertEqual(len(proxy.registry), 0)
        self.assertEqual(orch.provision_calls, [])
        self.assertEqual((busy.engine.getstream_calls, busy.engine.open_playbacks), ([], 0))
        self.assertEqual((fallback.getstream_calls, fallback.open_playbacks), ([], 0))
        self.assertEqual(orch.engines, [busy])

    async def test_fifty_players_five_ids_provision_once_per_id_still_wanted(self) -> None:
        """50 players for 5 ids arrive during an outage: nothing is posted while
        blocked; the id everyone left is never provisioned; afterwards at most
        one provision per remaining id and every connected player gets TS."""
        orch = sim_orchestrator(self)
        orch.set_vpn(connected=False)
        proxy, _ = await proxy_with(self, orch, queue_size="64")
        ids = [cid(100 + n) for n in range(5)]
        abandoned = ids[4]
        wanted = [abandoned if n % 10 == 0 else ids[n % 4] for n in range(50)]
        opening = [TSPlayer.open(self, proxy.stream_url(i)) for i in wanted]
        players = await gatherResults(opening, consumeErrors=True)
        self.assertEqual({p.code for p in players}, {200})
        keepalives = [p.when(lambda p: p.null_packets > 0, "a keepalive") for p in players]
        await gatherResults(keepalives, consumeErrors=True)
        self.assertEqual(proxy.service.waits.held_players, 50)

        leaving = [p for p, i in zip(players, wanted) if i == abandoned]
        staying = [p for p, i in zip(players, wanted) if i != abandoned]
        self.assertEqual((len(leaving), len(staying)), (5, 45))
        await gatherResults([p.hang_up() for p in leaving], consumeErrors=True)
        await wait_until(lambda: not proxy.registry.find(abandoned), "the abandoned id's session to close")
        self.assertEqual(proxy.service.waits.held_players, 45)
        self.assertEqual(len(proxy.service.waits.held), 4)
        # three outage polls, each one kicks the queue: its retries ask /engines, post nothing
        engines_calls = orch.engines_calls
        await status_polls(orch, 3)
        self.assertGreaterEqual(orch.engines_calls, engines_calls + 2)
        self.assertEqual(orch.provision_calls, [])

        orch.set_vpn(connected=True)
        await gatherResults([p.when_real(10) for p in staying], consumeErrors=True)
        self.assertTrue(all(not p.ended.called and held_then_streamed(p) for p in staying))
        self.assertLessEqual(len(orch.provision_calls), 4)
        self.assertEqual(engines_asked_for(orch, abandoned), 0)
        self.assertEqual([engines_asked_for(orch, i) for i in ids[:4]], [1, 1, 1, 1])
        self.assertEqual(proxy.service.waits.held, [])
        log.info("50 players / 5 ids: {n} provision calls after recovery", n=len(orch.provision_calls))


class BreakerTests(TestCase):
    async def test_held_players_are_served_in_arrival_order_when_the_breaker_closes(self) -> None:
        """Breaker open (ETA within max_wait): three ids held; when it closes
        they are provisioned one at a time, in the order they arrived."""
        orch = sim_orchestrator(self)
        orch.open_breaker(eta=20)  # within max_wait: worth holding
        proxy, _ = await proxy_with(self, orch, max_wait="60s")
        ids = [cid(200 + n) for n in range(3)]
        players = []
        for content in ids:  # one after the other: the arrival order is known
            player = await TSPlayer.open(self, proxy.stream_url(content))
            self.assertEqual(player.code, 200)
            await player.when(lambda p: p.null_packets > 0, "a keepalive")
            players.append(player)
        self.assertEqual([str(s.key) for s in proxy.service.waits.held], ids)
        self.assertTrue(all(only_null_packets(p) for p in players))
        self.assertEqual(orch.provision_calls, [])

        orch.close_breaker()
        await gatherResults([p.when_real(10) for p in players], consumeErrors=True)
        self.assertEqual([first_content(h) for h in orch.provisioned], ids)  # provisioned in arrival order
        self.assertTrue(all(held_then_streamed(p) for p in players))
        # one at a time (these provisions take milliseconds, well within the wait queue's
        # settle window): each was posted only after the previous id's engine session began.
        # (When each player's first picture then arrives is up to its own engine's
        # prebuffering: not an order the proxy decides, so not asserted.)
        started = [next(iter(h.engine.sessions.values())).created_at for h in orch.provisioned]
        self.assertEqual(started, sorted(started))
        for previous, post in zip(started, orch.provision_calls[1:]):
            self.assertLessEqual(previous, post)
        self.assertEqual(len(orch.provision_calls), 3)

    async def test_a_full_queue_answers_503_with_retry_after(self) -> None:
        """ACEXY_QUEUE_SIZE=2: a third player (new id or a held one) gets 503 + Retry-After."""
        orch = sim_orchestrator(self)
        orch.open_breaker(eta=20)
        proxy, _ = await proxy_with(self, orch, max_wait="60s", queue_size="2")
        a = await TSPlayer.open(self, proxy.stream_url(cid(301)))
        b = await TSPlayer.open(self, proxy.stream_url(cid(302)))
        self.assertEqual((a.code, b.code), (200, 200))
        for content in (cid(303), cid(301)):  # a new id, and one more player of a held id
            refused = await TSPlayer.open(self, proxy.stream_url(content))
            self.assertEqual(refused.code, 503, content)
            retry = refused.response.headers.getRawHeaders(b"retry-after")
            self.assertTrue(retry and 1 <= int(retry[0]) <= 20, retry)
            await refused.when_ended()
            body = json.loads(bytes(refused.received))
            self.assertEqual(body["code"], "circuit_breaker", body)
        self.assertEqual(proxy.service.waits.held_players, 2)
        self.assertEqual(proxy.registry.find(cid(303)), [])
        self.assertFalse(a.ended.called or b.ended.called)
        self.assertEqual(orch.provision_calls, [])

    async def test_reject_mode_answers_503_then_the_retry_finds_a_prewarmed_session(self) -> None:
        """ACEXY_WAIT_MODE=reject: 503 + Retry-After at once; once the breaker
        closes the session is pre-warmed and the player's retry streams from it."""
        orch = sim_orchestrator(self)
        orch.open_breaker(eta=20)
        proxy, fallback = await proxy_with(self, orch, wait_mode="reject", linger="30s")
        content = cid(401)
        refused = await within(TSPlayer.open(self, proxy.stream_url(content)), 0.5)  # answered at once
        self.assertEqual(refused.code, 503)
        retry = refused.response.headers.getRawHeaders(b"retry-after")
        self.assertTrue(retry and 1 <= int(retry[0]) <= 20, retry)
        await refused.when_ended()
        self.assertEqual(proxy.registry.find(content), [])
        self.assertEqual([str(k) for k in proxy.service.waits.demands], [content])  # the demand is remembered

        orch.close_breaker()  # the monitor notices within outage_poll_interval and pre-warms
        await wait_until(
            lambda: any(s.state == "lingering" for s in proxy.registry.find(content)),
            "the pre-warmed session",
            seconds=1.0,  # a 200 ms poll, then one provision
        )
        [session] = proxy.registry.find(content)
        self.assertEqual(session.sinks, [])

        async def play() -> TSPlayer:
            player = await TSPlayer.open(self, proxy.stream_url(content))
            self.assertEqual(player.code, 200)
            await player.when_real(10)
            return player

        await within(Deferred.fromCoroutine(play()), 0.5)  # no waiting at all
        self.assertEqual(proxy.registry.find(content), [session])
        self.assertEqual(engines_asked_for(orch, content, fallback), 1)  # no second engine start
        self.assertEqual(len(orch.provision_calls), 1)


class CapacityTests(TestCase):
    async def test_a_freed_slot_goes_to_the_oldest_held_player(self) -> None:
        """One engine, max_replicas=1: A then B held; the busy stream ends → A
        streams, B still held; A ends → B streams."""
        orch = sim_orchestrator(self, max_replicas=1)
        engine = orch.add_engine()
        proxy, _ = await proxy_with(self, orch, max_wait="60s", max_streams_per_engine="1", linger="0")
        busy = await TSPlayer.open(self, proxy.stream_url(cid(500)))
        await busy.when_real(1)
        a = await TSPlayer.open(self, proxy.stream_url(cid(501)))  # held: at capacity
        b = await TSPlayer.open(self, proxy.stream_url(cid(502)))
        self.assertEqual((a.code, b.code), (200, 200))
        self.assertEqual([str(s.key) for s in proxy.service.waits.held], [cid(501), cid(502)])
        self.assertEqual(proxy.service.waits.held[0].waiting_reason, "max_capacity")

        await busy.hang_up()  # the busy stream ends: one slot frees
        await a.when_real(10)
        [session_b] = proxy.registry.find(cid(502))
        self.assertEqual((b.real_packets, session_b.state), (0, "waiting"))
        self.assertFalse(b.ended.called)

        await a.hang_up()
        await b.when_real(10)
        order = [s.content_key for s in engine.engine.sessions.values()]
        self.assertEqual(order, [cid(500), cid(501), cid(502)])
        self.assertEqual(orch.provision_calls, [])


def restarted_at(player: TSPlayer) -> int:
    """Offset where a second engine stream began (-1: none yet)."""
    at = player.received.rfind(STREAM_START)
    return at if at > 0 else -1


class FailoverTests(TestCase):
    async def test_an_engine_dying_mid_stream_fails_over_without_dropping_players(self) -> None:
        """A live stream's engine resets with 3 players attached and refuses the
        retry: the players keep their connections, get null packets in the gap,
        then the stream from another engine; stream_ended "failover", then a new
        stream_started."""
        orch = sim_orchestrator(self)
        first = orch.add_engine()
        # the first engine resets its playback after about a second of stream
        first.engine.behaviour.reset_after = ONE_SECOND * PACKET_SIZE
        proxy, _ = await proxy_with(self, orch, linger="0")
        content = cid(600)
        opening = [TSPlayer.open(self, proxy.stream_url(content)) for _ in range(3)]
        players = await gatherResults(opening, consumeErrors=True)
        await gatherResults([p.when_real(1) for p in players], consumeErrors=True)
        # before the reset: the dead engine would refuse a retry, and another one is there
        first.engine.behaviour.reset_after = None
        first.engine.behaviour.getstream_status = 500
        second = orch.add_engine()
        await within(orch.when(lambda o: len(o.events_started) == 1))
        old_stream = orch.events_started[0]["labels"]["stream_id"]

        # the gap is bounded: every player has the new engine's stream within 5 s of the reset
        await within(first.engine.when(lambda e: any(pb.end_reason == "reset" for pb in e.playbacks)))
        resumed = 50
        await within(
            gatherResults(
                [
                    p.when(
                        lambda p: restarted_at(p) > 0 and len(p.received) - restarted_at(p) >= resumed * PACKET_SIZE,
                        "TS from another engine",
                    )
                    for p in players
                ],
                consumeErrors=True,
            ),
            5.0,
        )
        gaps, ts_gaps = [], []
        for p in players:
            self.assertFalse(p.ended.called)  # kept its connection throughout
            self.assertTrue(p.aligned())
            again = restarted_at(p)
            last_ts = p.last_real_before(again)
            self.assertIsNotNone(last_ts)  # real TS from the first engine...
            if p.received.find(STREAM_START) == 0:
                # it saw the first engine's whole stream, so where that ended is known exactly
                old_end = ONE_SECOND * PACKET_SIZE
                self.assertEqual(bytes(p.received[:old_end]), engine_stream(ONE_SECOND))
            else:
                old_end = last_ts + PACKET_SIZE
            keepalive = bytes(p.received[old_end:again])
            self.assertGreaterEqual(len(keepalive) // PACKET_SIZE, 7)  # ...null packets in the gap...
            self.assertEqual(keepalive, NULL_PACKET * (len(keepalive) // PACKET_SIZE))
            packets = (len(p.received) - again) // PACKET_SIZE  # ...then the new stream, byte for byte
            self.assertEqual(bytes(p.received[again : again + packets * PACKET_SIZE]), engine_stream(packets))
            gaps.append(p.arrival_of(again) - p.arrival_of(old_end - 1))  # last engine byte -> first
            ts_gaps.append(p.arrival_of(again) - p.arrival_of(last_ts))  # last non-null packet -> first
        self.assertEqual(len(first.engine.getstream_calls), 1)  # the failed engine is avoided: another has room
        self.assertEqual(first.engine.open_playbacks, 0)
        self.assertEqual((len(second.engine.getstream_calls), second.engine.open_playbacks), (1, 1))

        await within(orch.when(lambda o: len(o.events_started) == 2 and len(o.events_ended) >= 1))
        self.assertIn(
            {"container_id": first.container_id, "stream_id": old_stream, "reason": "failover"}, orch.events_ended
        )
        posts = [path for method, path, _ in orch.requests if method == "POST" and path.startswith("/events/")]
        self.assertEqual(posts[-2:], ["/events/stream_ended", "/events/stream_started"])  # ended, then the new one
        new = orch.events_started[1]
        self.assertEqual(new["container_id"], second.container_id)
        self.assertNotEqual(new["labels"]["stream_id"], old_stream)
        [session] = proxy.registry.find(content)
        self.assertEqual((session.failovers, session.state, len(session.sinks)), (1, "streaming", 3))
        log.info(
            "failover gap: last byte -> first byte {gaps} s; last non-null -> first non-null {ts_gaps} s;"
            " session.last_gap {last:.4f} s",
            gaps=[round(g, 4) for g in gaps],
            ts_gaps=[round(g, 4) for g in ts_gaps],
            last=session.last_gap,
        )


class StatusTests(TestCase):
    async def test_status_lists_held_players_with_reason_and_wait(self) -> None:
        """/ace/status "held": players (the queue length), each session's reason and wait so far."""
        orch = sim_orchestrator(self)
        orch.set_vpn(connected=False)
        # slow outage polls: no retry is in flight while the status is read
        proxy, _ = await proxy_with(self, orch, queue_size="8", outage_poll_interval="5s")
        a1 = await TSPlayer.open(self, proxy.stream_url(cid(701)))
        a2 = await TSPlayer.open(self, proxy.stream_url(cid(701)))
        b = await TSPlayer.open(self, proxy.stream_url(cid(702)))
        await a1.when(lambda p: len(p.keepalive_ticks()) >= 3, "3 keepalive writes")
        held = await held_status(self, proxy)
        self.assertEqual((held["mode"], held["players"], held["queue_size"]), ("hold", 3, 8))
        sessions = held["sessions"]
        self.assertEqual(
            [(s["key"], s["players"], s["reason"]) for s in sessions],
            [(cid(701), 2, "vpn_disconnected"), (cid(702), 1, "vpn_disconnected")],
        )
        self.assertGreaterEqual(sessions[0]["waiting"], 0.3)
        self.assertGreaterEqual(sessions[0]["waiting"], sessions[1]["waiting"])

        await a1.when(lambda p: len(p.keepalive_ticks()) >= 6, "6 keepalive writes")
        later = (await held_status(self, proxy))["sessions"]
        self.assertGreater(later[0]["waiting"], sessions[0]["waiting"])  # the wait so far grows
        code, doc = await get_json(self, proxy.url(f"/ace/status?id={cid(701)}"))
        self.assertEqual(code, 200)
        self.assertEqual((doc["state"], doc["waiting_reason"], doc["clients"]), ("waiting", "vpn_disconnected", 2))
        self.assertGreaterEqual(doc["waiting"], 0.6)
        self.assertFalse(any(p.ended.called for p in (a1, a2, b)))
