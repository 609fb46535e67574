"""POST /ace/stop over real sockets against the simulated engine: the stream
ends with its players (a clean end), the engine gets its stop command, the
proxy lists it no more; HLS sessions too; the token guard covers the route."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from tests.integration.harness import (
    CID,
    Player,
    cid,
    get_json,
    get_text,
    http_client,
    sim_engine,
    start_proxy,
    wait_until,
    within,
)

TOKEN = "st0p-t0ken-42"


async def post(test: TestCase, url: str) -> tuple[int, str]:
    client = http_client(test)
    response = await within(client.post(url))
    body = await within(response.content())
    return response.code, body.decode("utf-8", "replace")


class StopTests(TestCase):
    async def test_a_ts_stream_ends_with_its_players_and_the_engine_gets_its_stop(self) -> None:
        engine = sim_engine(self, bitrate=2_000_000)
        proxy = await start_proxy(self, engine, linger="30s")  # a linger would keep it: stop does not wait
        players = [await Player.open(self, proxy.stream_url()) for _ in range(2)]
        other = await Player.open(self, proxy.stream_url(cid(7)))
        for player in (*players, other):
            await within(player.when_received(188 * 20))
        [stopped] = [s for s in engine.active_sessions if s.content_key == CID]

        code, body = await post(self, proxy.url(f"/ace/stop?id=acestream://{CID}"))
        self.assertEqual((code, body), (204, ""))
        for player in players:
            await player.when_ended()
            self.assertTrue(player.clean_end, player.end_reason)  # the chunked end, as any session end
            self.assertEqual(len(player.received) % 188, 0)
        await within(engine.when(lambda e: e.stop_count == 1))
        self.assertEqual(stopped.stop_commands, 1)
        self.assertEqual([str(s.key) for s in proxy.registry], [cid(7)])
        code, doc = await get_json(self, proxy.url("/ace/status"))
        self.assertEqual([s["key"] for s in doc["sessions"]], [cid(7)])
        self.assertFalse(other.ended.called)  # another content plays on
        code, _ = await get_text(self, proxy.url(f"/ace/status?id={CID}"))
        self.assertEqual(code, 404)
        code, metrics = await get_text(self, proxy.url("/metrics"))
        self.assertIn('acexy_engine_sessions_stopped_total{reason="stopped"} 1.0', metrics)

        code, body = await post(self, proxy.url(f"/ace/stop?id={CID}"))
        self.assertEqual((code, body.strip()), (404, "Stream not found"))
        code, _ = await post(self, proxy.url("/ace/stop?id=nope"))
        self.assertEqual(code, 400)
        code, _ = await get_text(self, proxy.url(f"/ace/stop?id={cid(7)}"))
        self.assertEqual(code, 405)
        self.assertFalse(other.ended.called)

    async def test_an_hls_session_is_stopped_too(self) -> None:
        engine = sim_engine(self, bitrate=1_000_000, hls_segment_duration=0.5)
        proxy = await start_proxy(self, engine, m3u8_stream_timeout="30s")
        code, playlist = await get_text(self, proxy.url(f"/ace/manifest.m3u8?id={CID}"))
        self.assertEqual(code, 200, playlist)
        [session] = list(proxy.service.hls)
        code, _ = await post(self, proxy.url(f"/ace/stop?id={CID}"))
        self.assertEqual(code, 204)
        self.assertTrue(session.closed)
        await within(engine.when(lambda e: e.stop_count == 1))
        self.assertEqual(len(proxy.service.hls), 0)
        code, _ = await get_text(self, proxy.url(session.segment_base + "/x.ts"))
        self.assertEqual(code, 404)  # its segment route is gone
        code, doc = await get_json(self, proxy.url("/ace/status"))
        self.assertEqual(doc["hls"], [])

    async def test_the_token_is_required_when_set(self) -> None:
        engine = sim_engine(self, bitrate=2_000_000)
        proxy = await start_proxy(self, engine, token=TOKEN)
        player = await Player.open(self, proxy.stream_url(extra=f"&token={TOKEN}"))
        await within(player.when_received(188 * 10))
        for url in (f"/ace/stop?id={CID}", f"/ace/stop?id={CID}&token=wrong"):
            code, _ = await post(self, proxy.url(url))
            self.assertEqual(code, 401)
        self.assertEqual(len(proxy.registry), 1)
        code, _ = await post(self, proxy.url(f"/ace/stop?id={CID}&token={TOKEN}"))
        self.assertEqual(code, 204)
        await player.when_ended()
        self.assertTrue(player.clean_end)
        await wait_until(lambda: len(proxy.registry) == 0, "the session to be gone")
        await within(engine.when(lambda e: e.stop_count == 1))
