"""HLS through the proxy against the simulated engine (real sockets)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from urllib.parse import urljoin

from twisted.internet.defer import Deferred
from twisted.internet.utils import getProcessOutputAndValue
from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.proxy import ReverseProxyResource
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.integration.harness import (
    CID,
    get_text,
    http_client,
    sim_engine,
    sim_orchestrator,
    start_proxy,
    wait_until,
    within,
)


def hls_engine(test: TestCase):
    return sim_engine(test, bitrate=1_000_000, hls_segment_duration=0.5)


def segment_lines(playlist: str, where: str = "/ace/manifest.m3u8") -> list[str]:
    """The segment links, resolved against the playlist's path ``where`` as a player does."""
    return [urljoin(where, line) for line in playlist.splitlines() if line and not line.startswith("#")]


class HlsTests(TestCase):
    async def test_playlist_is_rewritten_to_proxy_segments_that_are_ts(self) -> None:
        engine = hls_engine(self)
        proxy = await start_proxy(self, engine)
        code, playlist = await get_text(self, proxy.url(f"/ace/manifest.m3u8?id={CID}"))
        self.assertEqual(code, 200, playlist)
        self.assertTrue(playlist.startswith("#EXTM3U"))
        raw = [line for line in playlist.splitlines() if line and not line.startswith("#")]
        self.assertTrue(raw)
        for line in raw:  # relative, under the content's own path: no engine address leaks to players
            self.assertRegex(line, rf"^hls/{CID}/[A-Za-z0-9_-]+/[A-Za-z0-9_-]+\.ts$")
        segments = segment_lines(playlist)
        client = http_client(self)
        response = await within(client.get(proxy.url(segments[-1])))
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"video/MP2T"])
        body = await within(response.content())
        self.assertGreater(len(body), 188 * 10)
        self.assertEqual(body[0], 0x47)
        self.assertEqual(len(engine.manifest_calls), 1)

    async def test_players_of_one_content_share_one_engine_hls_session(self) -> None:
        engine = hls_engine(self)
        proxy = await start_proxy(self, engine)
        for _ in range(3):
            code, _ = await get_text(self, proxy.url(f"/ace/manifest.m3u8?id={CID}"))
            self.assertEqual(code, 200)
        self.assertEqual(len(engine.manifest_calls), 1)

    async def test_session_is_stopped_when_no_longer_polled(self) -> None:
        engine = hls_engine(self)
        proxy = await start_proxy(self, engine, m3u8_stream_timeout="300ms")
        code, _ = await get_text(self, proxy.url(f"/ace/manifest.m3u8?id={CID}"))
        self.assertEqual(code, 200)
        hls = proxy.service.hls
        self.assertEqual(len(hls), 1)
        await within(engine.when(lambda e: e.stop_count == 1))  # after max(ACEXY_M3U8_STREAM_TIMEOUT, 3 x target duration)
        self.assertEqual(len(hls), 0)

    async def test_unknown_segment_is_404(self) -> None:
        engine = hls_engine(self)
        proxy = await start_proxy(self, engine)
        for path in ("/ace/hls/nope/1.ts", f"/ace/hls/{CID}/nope/1.ts"):
            code, _ = await get_text(self, proxy.url(path))
            self.assertEqual(code, 404)

    async def test_ffmpeg_reads_the_live_stream_through_the_proxy(self) -> None:
        if shutil.which("ffmpeg") is None:
            self.skipTest("ffmpeg is not installed")
        engine = hls_engine(self)
        proxy = await start_proxy(self, engine)
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, True)
        out = os.path.join(directory, "capture.ts")
        _, err, code = await within(
            getProcessOutputAndValue(
                "ffmpeg",
                ["-v", "error", "-y", "-i", proxy.url(f"/ace/manifest.m3u8?id={CID}"), "-t", "2", "-c", "copy", "-f", "mpegts", out],
                env=os.environ,
            ),
            60,
        )
        self.assertEqual(code, 0, err)
        probe, err, code = await within(
            getProcessOutputAndValue(
                "ffprobe", ["-v", "error", "-show_format", "-show_streams", "-of", "json", out], env=os.environ
            ),
            30,
        )
        self.assertEqual(code, 0, err)
        doc = json.loads(probe)
        self.assertIn("mpegts", doc["format"]["format_name"])
        self.assertGreaterEqual(engine.segment_requests, 2)

    async def test_acexy_m3u8_serves_getstream_as_hls(self) -> None:
        engine = hls_engine(self)
        proxy = await start_proxy(self, engine, m3u8="true")
        code, playlist = await get_text(self, proxy.url(f"/ace/getstream?id={CID}"))
        self.assertEqual(code, 200)
        self.assertTrue(playlist.startswith("#EXTM3U"))
        self.assertEqual(engine.getstream_calls, [])

    async def test_segment_links_are_relative_to_the_playlist_path(self) -> None:
        engine = hls_engine(self)
        proxy = await start_proxy(self, engine, m3u8="true")
        code, playlist = await get_text(self, proxy.url(f"/ace/getstream/?id={CID}"))  # one directory deeper
        self.assertEqual(code, 200, playlist)
        raw = [line for line in playlist.splitlines() if line and not line.startswith("#")]
        self.assertTrue(all(line.startswith(f"../hls/{CID}/") for line in raw), raw)
        code, _ = await get_text(self, proxy.url(segment_lines(playlist, "/ace/getstream/")[-1]))
        self.assertEqual(code, 200)

    async def test_ffmpeg_plays_hls_under_a_reverse_proxy_path_prefix(self) -> None:
        """Twisted's own ReverseProxyResource serves the proxy under /tv/: the
        playlist and its (relative) segment links work there unchanged."""
        if shutil.which("ffmpeg") is None:
            self.skipTest("ffmpeg is not installed")
        engine = hls_engine(self)
        proxy = await start_proxy(self, engine)
        root = Resource()
        root.putChild(b"tv", ReverseProxyResource("127.0.0.1", proxy.port, b""))
        front = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        self.addCleanup(front.stopListening)
        url = f"http://127.0.0.1:{front.getHost().port}/tv/ace/manifest.m3u8?id={CID}"
        _, err, code = await within(
            getProcessOutputAndValue(
                "ffmpeg", ["-v", "error", "-i", url, "-t", "3", "-c", "copy", "-f", "null", "-"], env=os.environ
            ),
            60,
        )
        self.assertEqual(code, 0, err)
        self.assertNotIn(b"Failed to open segment", err)
        self.assertGreaterEqual(engine.segment_requests, 2)

    async def test_token_is_carried_into_segment_urls(self) -> None:
        engine = hls_engine(self)
        proxy = await start_proxy(self, engine, token="hls-token-123")
        code, playlist = await get_text(self, proxy.url(f"/ace/manifest.m3u8?id={CID}&token=hls-token-123"))
        self.assertEqual(code, 200)
        segment = segment_lines(playlist)[-1]
        self.assertTrue(segment.endswith("?token=hls-token-123"))
        code, _ = await get_text(self, proxy.url(segment))
        self.assertEqual(code, 200)
        code, _ = await get_text(self, proxy.url(segment.split("?")[0]))
        self.assertEqual(code, 401)


class HlsNeverHeldTests(TestCase):
    async def test_blocked_orchestrator_is_a_503_with_retry_after_not_a_hold(self) -> None:
        orch = sim_orchestrator(self, api_key="k-hls-0000")
        orch.set_vpn(connected=False)
        fallback = hls_engine(self)
        proxy = await start_proxy(self, fallback, orch_url=orch.url, orch_apikey="k-hls-0000")
        await wait_until(lambda: proxy.service.monitor.reachable is not None, "the first status poll")
        client = http_client(self)

        async def ask() -> tuple:
            response = await client.get(proxy.url(f"/ace/manifest.m3u8?id={CID}"))
            return response, await response.content()

        response, body = await within(Deferred.fromCoroutine(ask()), 2)  # at once: not held
        self.assertEqual(response.code, 503)
        self.assertTrue(response.headers.getRawHeaders(b"retry-after"))
        self.assertEqual(json.loads(body)["code"], "vpn_disconnected")
        self.assertEqual(orch.provision_calls, [])
        self.assertEqual(proxy.service.waits.held_players, 0)


class HlsEventTests(TestCase):
    async def test_hls_sessions_are_reported_to_the_orchestrator(self) -> None:
        orch = sim_orchestrator(self, api_key="k-hls-0001")
        handle = orch.add_engine()
        fallback = hls_engine(self)
        proxy = await start_proxy(self, fallback, orch_url=orch.url, orch_apikey="k-hls-0001", m3u8_stream_timeout="300ms")
        await wait_until(lambda: proxy.service.monitor.reachable is not None, "the first status poll")
        code, _ = await get_text(self, proxy.url(f"/ace/manifest.m3u8?id={CID}"))
        self.assertEqual(code, 200)
        await within(orch.when(lambda o: len(o.events_started) == 1))
        started = orch.events_started[0]
        self.assertEqual(started["container_id"], handle.container_id)
        self.assertEqual(started["stream"], {"key_type": "content_id", "key": CID})
        await within(orch.when(lambda o: len(o.events_ended) == 1))  # no longer polled
        ended = orch.events_ended[0]
        self.assertEqual(ended["stream_id"], started["labels"]["stream_id"])
        self.assertEqual(ended["reason"], "client_disconnected")
