"""Live stats over real sockets: the proxy polls the simulated engine's stat_url
while streaming, shows the answer in /ace/status, and stops polling at the end."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from acexy_tw.stats import TIMER_NAMES
from acexy_tw.streaming.mpegts import PACKET_SIZE
from tests.integration.harness import CID, Player, get_json, sim_engine, start_proxy, wait_until, within

INTERVAL = 0.3
BITRATE = 2_000_000


#: "within two intervals", with room for a loaded machine
TWO_INTERVALS = 2 * INTERVAL + 1.0


class LiveStatsTests(TestCase):
    async def test_stats_appear_within_two_intervals_and_polling_stops_with_the_session(self) -> None:
        engine = sim_engine(self, bitrate=BITRATE)
        proxy = await start_proxy(self, engine, stats_interval=f"{int(INTERVAL * 1000)}ms", linger="0")
        player = await Player.open(self, proxy.stream_url())
        await within(player.when_received(10 * PACKET_SIZE))
        [session] = list(proxy.registry)
        await wait_until(lambda: session.stats.describe()["peers"] is not None, "the first stats", seconds=TWO_INTERVALS)
        code, doc = await get_json(self, proxy.url(f"/ace/status?id={CID}"))
        self.assertEqual(code, 200)
        self.assertEqual(doc["peers"], 4)
        self.assertEqual(doc["speed_down"], round(BITRATE / 8 / 1024))
        self.assertEqual(doc["speed_up"], round(BITRATE / 8 / 1024) // 8)
        self.assertIn(doc["status"], ("prebuf", "dl"))
        self.assertIsInstance(doc["downloaded"], int)
        self.assertEqual(doc["stat_failures"], 0)
        code, listing = await get_json(self, proxy.url("/ace/status"))
        self.assertEqual(listing["sessions"][0]["peers"], 4)
        [engine_session] = engine.active_sessions
        self.assertGreaterEqual(engine_session.stat_requests, 1)
        polled = engine_session.stat_requests
        await within(engine.when(lambda e: engine_session.stat_requests > polled), TWO_INTERVALS)  # polled again

        await within(player.hang_up())
        await wait_until(lambda: len(proxy.registry) == 0, "the session to close")
        await within(engine.when(lambda e: e.stop_count == 1))
        # Nothing is left that could poll again: no loop running, no stats timer pending.
        self.assertFalse(session.stats.running)
        pending = [c for c in reactor.getDelayedCalls() if any(n in repr(c) for n in TIMER_NAMES)]
        self.assertEqual(pending, [])

    async def test_hls_sessions_are_polled_like_ts_ones_and_polling_stops_with_the_session(self) -> None:
        from tests.integration.harness import get_text, http_client

        engine = sim_engine(self, bitrate=BITRATE, hls_segment_duration=0.5)
        proxy = await start_proxy(self, engine, stats_interval=f"{int(INTERVAL * 1000)}ms", m3u8_stream_timeout="4s")
        from urllib.parse import urljoin

        manifest = proxy.url(f"/ace/manifest.m3u8?id={CID}")
        code, playlist = await get_text(self, manifest)
        self.assertEqual(code, 200, playlist)
        [session] = list(proxy.service.hls)
        segment = [line for line in playlist.splitlines() if line and not line.startswith("#")][-1]
        response = await within(http_client(self).get(urljoin(manifest, segment)))  # linked relative to the playlist
        body = await within(response.content())
        self.assertGreater(len(body), 188)
        await wait_until(lambda: session.stats.describe()["peers"] is not None, "the first HLS stats", seconds=TWO_INTERVALS)
        await wait_until(lambda: session.stats.describe()["bitrate_out"] > 0, "a measured bitrate", seconds=3)
        code, doc = await get_json(self, proxy.url("/ace/status"))
        [listed] = doc["hls"]
        self.assertEqual((listed["kind"], listed["peers"]), ("hls", 4))
        self.assertEqual(listed["speed_down"], round(BITRATE / 8 / 1024))
        self.assertGreater(listed["bitrate_in"], 0)
        self.assertTrue(listed["history"])
        code, one = await get_json(self, proxy.url(f"/ace/status?id={CID}"))  # an HLS-only content is found
        self.assertEqual((code, one["kind"], one["peers"]), (200, "hls", 4))
        [engine_session] = engine.active_sessions
        polled = engine_session.stat_requests
        # (the simulator re-checks ``when`` conditions on stream events only: an HLS session has none here)
        await wait_until(lambda: engine_session.stat_requests > polled, "another stat request", seconds=TWO_INTERVALS)

        # nobody polls the playlist any more: the session expires, and so does the polling
        await within(engine.when(lambda e: e.stop_count == 1))
        self.assertTrue(session.closed)
        self.assertFalse(session.stats.running)
        pending = [c for c in reactor.getDelayedCalls() if any(n in repr(c) for n in TIMER_NAMES)]
        self.assertEqual(pending, [])
