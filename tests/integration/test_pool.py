"""
An engine pool without an orchestrator (ACEXY_ENGINES), end to end: two
simulated engines on 127.0.0.1, the real service probing them.

- four contents spread two and two (capacity ACEXY_MAX_STREAMS_PER_ENGINE=2);
- one engine killed: the stream it carried fails over to the other one, new
  contents go there too, the status page shows it down;
- it comes back on the same port: the next probe sees it, new contents go to
  it again.

Every wait is bounded (``within``, ``wait_until``); nothing sleeps.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import TestCase

from tests.integration.harness import TSPlayer, cid, get_json, sim_engine, start_proxy, wait_until, within


class EnginePoolTests(TestCase):
    async def _pool(self, **settings: str):
        a = sim_engine(self, bitrate=2_000_000)
        b = sim_engine(self, bitrate=2_000_000)
        settings.setdefault("max_streams_per_engine", "2")
        proxy = await start_proxy(
            self, a, engines=f"127.0.0.1:{a.port},http://127.0.0.1:{b.port}", linger="0", **settings
        )
        await within(b.when(lambda e: e.connections == 0))  # b's probe is over too
        return proxy, a, b

    async def _watch(self, proxy, n: int) -> TSPlayer:
        player = await TSPlayer.open(self, proxy.stream_url(cid(n)))
        self.assertEqual(player.code, 200)
        await within(player.when_received(188 * 100))
        self.addCleanup(player.hang_up)
        return player

    async def test_four_contents_spread_two_and_two(self) -> None:
        proxy, a, b = await self._pool()
        await gatherResults([Deferred.fromCoroutine(self._watch(proxy, n)) for n in range(4)])
        self.assertEqual((len(a.active_sessions), len(b.active_sessions)), (2, 2))
        code, doc = await get_json(self, proxy.url("/ace/status"))
        self.assertEqual(code, 200)
        self.assertEqual([(e["state"], e["sessions"], e["capacity"]) for e in doc["engines"]], [("up", 2, 2)] * 2)
        self.assertEqual({s["engine"] for s in doc["sessions"]}, {a.url, b.url})

    async def test_a_killed_engine_is_skipped_and_used_again_when_it_returns(self) -> None:
        proxy, a, b = await self._pool(failover_attempts="3", health_interval="1s", max_streams_per_engine="4")
        player = await self._watch(proxy, 1)  # on a (first on a tie)
        self.assertEqual((len(a.active_sessions), len(b.active_sessions)), (1, 0))
        port = a.port
        await within(a.shutdown())  # the box goes away: connections reset, port closed
        # the player's stream fails over to b and goes on
        got = len(player.received)
        await within(player.when_received(got + 188 * 200))
        self.assertFalse(player.ended.called)
        self.assertEqual(len(b.active_sessions), 1)
        pool = proxy.service.proxy.engines
        await wait_until(lambda: pool.engines[0].state == "down", "engine a seen down")
        # a new content goes to b as well, though a would have fewer sessions
        await self._watch(proxy, 2)
        self.assertEqual(len(b.active_sessions), 2)
        code, doc = await get_json(self, proxy.url("/ace/status"))
        self.assertEqual([e["state"] for e in doc["engines"]], ["down", "up"])
        self.assertIsNotNone(doc["engines"][0]["last_error"])
        # a comes back on the same port: the next probe (1 s) finds it
        a.listen(port)
        await wait_until(lambda: pool.engines[0].state == "up", "engine a answering again")
        before = len(a.sessions)  # (the session a had when it died stays in its books: its stop never arrived)
        await self._watch(proxy, 3)
        self.assertEqual(len(a.sessions), before + 1)  # fewest sessions again
        self.assertEqual(len(b.active_sessions), 2)
