"""Live stats over real sockets: the proxy polls the simulated engine's stat_url
while streaming, shows the answer in /ace/status, and stops polling at the end."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from acexy_tw.streaming.mpegts import PACKET_SIZE
from tests.integration.harness import CID, Player, get_json, sim_engine, start_proxy, wait_until, within

INTERVAL = 0.3
BITRATE = 2_000_000


def sleep(seconds: float):
    return within(deferLater(reactor, seconds, lambda: None))


class LiveStatsTests(TestCase):
    async def test_stats_appear_within_two_intervals_and_polling_stops_with_the_session(self) -> None:
        engine = sim_engine(self, bitrate=BITRATE)
        proxy = await start_proxy(self, engine, stats_interval=f"{int(INTERVAL * 1000)}ms", linger="0")
        player = await Player.open(self, proxy.stream_url())
        await within(player.when_received(10 * PACKET_SIZE))
        await sleep(2 * INTERVAL)
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
        [session] = engine.active_sessions
        self.assertGreaterEqual(session.stat_requests, 1)
        polled = session.stat_requests
        await sleep(2 * INTERVAL)
        self.assertGreater(session.stat_requests, polled)  # polled every interval

        await within(player.hang_up())
        await wait_until(lambda: len(proxy.registry) == 0, "the session to close")
        await within(engine.when(lambda e: e.stop_count == 1))
        await sleep(0.1)  # a request sent before the close may still be on its way
        after = engine.stat_requests
        await sleep(3 * INTERVAL)
        self.assertEqual(engine.stat_requests, after)  # no poll after the session ended
