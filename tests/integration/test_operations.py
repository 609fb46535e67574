"""Metrics moving with real streams, /healthz, and ACEXY_TOKEN, over loopback."""

from __future__ import annotations

from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from acexy_tw.streaming.mpegts import PACKET_SIZE
from tests.integration.harness import CID, Player, get_json, get_text, sim_engine, start_proxy, wait_until, within

TOKEN = "t0ken-for-players-42"


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in metrics")


def labelled(text: str, name: str, labels: str) -> float:
    prefix = f"{name}{{{labels}}} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    return 0.0


class MetricsTests(TestCase):
    async def test_metrics_move_with_a_real_stream(self) -> None:
        engine = sim_engine(self, bitrate=2_000_000)
        proxy = await start_proxy(self, engine, linger="0")
        code, before = await get_text(self, proxy.url("/metrics"))
        self.assertEqual(code, 200)
        self.assertEqual(metric(before, "acexy_engine_sessions"), 0)
        self.assertEqual(metric(before, "acexy_time_to_first_byte_seconds_count"), 0)
        p = await Player.open(self, proxy.stream_url())
        await p.when_received(100 * PACKET_SIZE)
        _, during = await get_text(self, proxy.url("/metrics"))
        self.assertEqual(metric(during, "acexy_engine_sessions"), 1)
        self.assertEqual(metric(during, "acexy_clients"), 1)
        self.assertEqual(metric(during, "acexy_engine_sessions_started_total"), 1)
        self.assertGreaterEqual(metric(during, "acexy_bytes_sent_total"), 100 * PACKET_SIZE)
        self.assertEqual(metric(during, "acexy_time_to_first_byte_seconds_count"), 1)
        await p.hang_up()
        await wait_until(lambda: len(proxy.registry) == 0, "the session to end")
        _, after = await get_text(self, proxy.url("/metrics"))
        self.assertEqual(metric(after, "acexy_engine_sessions"), 0)
        self.assertEqual(labelled(after, "acexy_engine_sessions_stopped_total", 'reason="client_disconnected"'), 1)
        self.assertGreaterEqual(metric(after, "acexy_bytes_sent_total"), metric(during, "acexy_bytes_sent_total"))

    async def test_status_lists_sessions_and_healthz_answers(self) -> None:
        engine = sim_engine(self, bitrate=2_000_000)
        proxy = await start_proxy(self, engine)
        p = await Player.open(self, proxy.stream_url())
        await p.when_received(PACKET_SIZE)
        code, doc = await get_json(self, proxy.url("/ace/status"))
        self.assertEqual([s["key"] for s in doc["sessions"]], [CID])
        code, health = await get_json(self, proxy.url("/healthz"))
        self.assertEqual((code, health["serving"], health["streams"]), (200, True, 1))


class TokenTests(TestCase):
    async def test_every_route_but_healthz_needs_the_token(self) -> None:
        engine = sim_engine(self, bitrate=2_000_000)
        proxy = await start_proxy(self, engine, token=TOKEN)
        for path in ("/ace/getstream?id=" + CID, "/ace/status", "/metrics", "/", "/nope"):
            code, _ = await get_text(self, proxy.url(path))
            self.assertEqual(code, 401, path)
            code, _ = await get_text(self, proxy.url(path + ("&" if "?" in path else "?") + "token=wrong-token-x"))
            self.assertEqual(code, 401, path)
        self.assertEqual(engine.getstream_calls, [])  # refused players cost nothing
        code, _ = await get_text(self, proxy.url("/healthz"))
        self.assertEqual(code, 200)
        code, _ = await get_text(self, proxy.url(f"/ace/status?token={TOKEN}"))
        self.assertEqual(code, 200)

    async def test_query_token_and_bearer_both_work_and_the_token_never_shows(self) -> None:
        lines: list[str] = []
        observe = lambda e: lines.append(formatEvent(e))  # noqa: E731
        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        engine = sim_engine(self, bitrate=2_000_000)
        proxy = await start_proxy(self, engine, token=TOKEN, access_log="false")
        p = await Player.open(self, proxy.stream_url(extra=f"&token={TOKEN}"))
        self.assertEqual(p.code, 200)
        await p.when_received(PACKET_SIZE)
        self.assertNotIn("token", engine.getstream_calls[0])  # never passed on to the engine
        from tests.integration.harness import http_client

        client = http_client(self)
        response = await within(client.get(proxy.url("/ace/status"), headers={"Authorization": f"Bearer {TOKEN}"}))
        body = (await within(response.content())).decode()
        self.assertEqual(response.code, 200)
        _, one = await get_text(self, proxy.url(f"/ace/status?id={CID}&token={TOKEN}"))
        code, page = await get_text(self, proxy.url(f"/?token={TOKEN}"))
        self.assertEqual(code, 200)
        for text in (body, one, page, *lines):
            self.assertNotIn(TOKEN, text)
