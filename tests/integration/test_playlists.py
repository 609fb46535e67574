"""ACEXY_PLAYLISTS over loopback: an HTTP source with ETag, a file source, the failures."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from twisted.internet.defer import Deferred
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from acexy_tw.streaming.mpegts import PACKET_SIZE
from tests.integration.harness import CID, Player, cid, get_json, get_text, reactor, sim_engine, start_proxy, wait_until, within

OTHER = cid(7)
M3U = (
    '#EXTM3U url-tvg="http://epg.example/guide.xml"\r\n'
    '#EXTINF:-1 tvg-id="one.tv" tvg-logo="http://logo.example/1.png" group-title="Sport",One\r\n'
    "#EXTGRP:Sport\r\n"
    f"acestream://{CID}\r\n"
    '#EXTINF:-1 tvg-id="two" group-title="News",Two\r\n'
    f"http://10.1.2.3:6878/ace/getstream?id={OTHER}&transcode_audio=1\r\n"
    "#EXTINF:-1,Elsewhere\r\n"
    "http://tv.example/live.ts\r\n"
).encode()


class Source(Resource):
    """An M3U source with an ETag; counts requests and the validators sent."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.body = M3U
        self.etag = b'"v1"'
        self.code = 200
        self.requests: list[Optional[bytes]] = []  # If-None-Match of each request
        self.huge = False

    def render_GET(self, request: Any) -> Any:
        self.requests.append(request.getHeader(b"if-none-match"))
        if self.huge:  # 20 MiB, chunked: no Content-Length to refuse it by
            chunk = b"#EXTM3U" + b"x" * (1024 * 1024 - 7)
            for _ in range(20):
                request.write(chunk)
            request.finish()
            return NOT_DONE_YET
        if self.code != 200:
            request.setResponseCode(self.code)
            return b"broken"
        request.setHeader(b"etag", self.etag)
        if request.getHeader(b"if-none-match") == self.etag:
            request.setResponseCode(304)
            return b""
        request.setHeader(b"content-type", b"audio/x-mpegurl")
        return self.body


def serve(test: TestCase, resource: Resource) -> str:
    port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
    test.addCleanup(port.stopListening)
    return f"http://127.0.0.1:{port.getHost().port}"


def temp_dir(test: TestCase) -> Path:
    """A directory outside the checkout, removed at test end."""
    path = Path(tempfile.mkdtemp(prefix="acexy-playlists-"))
    test.addCleanup(shutil.rmtree, path, True)
    return path


def expired(proxy, name: str = "tv") -> Deferred:
    """Fires once the proxy's cached copy of ``name`` is older than ACEXY_PLAYLIST_REFRESH."""
    return wait_until(lambda: not proxy.service.web.playlists.fresh(name), "the cached copy to expire")


class PlaylistTests(TestCase):
    async def test_an_http_source_is_rewritten_for_this_proxy_and_revalidated(self) -> None:
        source = Source()
        base = serve(self, source)
        engine = sim_engine(self, bitrate=2_000_000)
        proxy = await start_proxy(self, engine, playlists=f"tv={base}/list.m3u", playlist_refresh="100ms")
        here = f"http://127.0.0.1:{proxy.port}"
        code, text = await get_text(self, proxy.url("/ace/playlist/tv.m3u"))
        self.assertEqual(code, 200)
        expected = (
            M3U.decode()
            .replace(f"acestream://{CID}", f"{here}/ace/getstream?id={CID}")
            .replace(f"http://10.1.2.3:6878/ace/getstream?id={OTHER}", f"{here}/ace/getstream?id={OTHER}")
        )
        self.assertEqual(text, expected)  # CRLF, attributes and the other URL byte for byte
        code, text = await get_text(self, proxy.url("/ace/playlist/tv.m3u8?hls=1"))
        self.assertIn(f"{here}/ace/manifest.m3u8?id={CID}\r\n", text)
        self.assertEqual(source.requests, [None])  # cached
        await expired(proxy)
        code, again = await get_text(self, proxy.url("/ace/playlist/tv.m3u"))
        self.assertEqual((code, again), (200, expected))
        self.assertEqual(source.requests, [None, b'"v1"'])  # revalidated: 304

        # The rewritten entry plays.
        player = await Player.open(self, f"{here}/ace/getstream?id={CID}")
        await within(player.when_received(10 * PACKET_SIZE))
        await player.hang_up()

    async def test_the_content_type_names_and_public_url(self) -> None:
        from tests.integration.harness import http_client

        source = Source()
        base = serve(self, source)
        engine = sim_engine(self)
        proxy = await start_proxy(
            self, engine, playlists=f"tv={base}/list.m3u,b={base}/b.m3u", public_url="https://tv.example/acexy/"
        )
        response = await within(http_client(self).get(proxy.url("/ace/playlist/tv.m3u")))
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"audio/x-mpegurl"])
        body = await within(response.content())
        self.assertIn(f"https://tv.example/acexy/ace/getstream?id={CID}\r\n".encode(), body)
        code, doc = await get_json(self, proxy.url("/ace/playlists"))
        self.assertEqual((code, doc), (200, {"playlists": ["b", "tv"]}))

    async def test_the_token_is_put_into_the_entries_encoded(self) -> None:
        source = Source()
        base = serve(self, source)
        engine = sim_engine(self)
        token = "tok&en#with+stuff"
        proxy = await start_proxy(self, engine, playlists=f"tv={base}/l.m3u", token=token)
        code, _ = await get_text(self, proxy.url("/ace/playlist/tv.m3u"))
        self.assertEqual(code, 401)
        code, text = await get_text(self, proxy.url("/ace/playlist/tv.m3u?token=tok%26en%23with%2Bstuff"))
        self.assertEqual(code, 200)
        self.assertIn(f"/ace/getstream?id={CID}&token=tok%26en%23with%2Bstuff\r\n", text)

    async def test_a_file_source_outside_the_checkout(self) -> None:
        directory = temp_dir(self)
        (directory / "tv list.m3u").write_bytes(M3U.replace(b"\r\n", b"\n"))
        engine = sim_engine(self)
        proxy = await start_proxy(self, engine, playlists=f"local={directory / 'tv list.m3u'}")
        code, text = await get_text(self, proxy.url("/ace/playlist/local.m3u"))
        self.assertEqual(code, 200)
        self.assertTrue(text.startswith('#EXTM3U url-tvg="http://epg.example/guide.xml"\n'))
        self.assertIn(f"http://127.0.0.1:{proxy.port}/ace/getstream?id={CID}\n", text)
        self.assertIn("http://tv.example/live.ts\n", text)

    async def test_unknown_names_are_404_and_failing_sources_502(self) -> None:
        source = Source()
        source.code = 500
        base = serve(self, source)
        not_m3u = temp_dir(self) / "page.html"
        not_m3u.write_bytes(b"<html>hello</html>")
        engine = sim_engine(self)
        proxy = await start_proxy(
            self, engine, playlists=f"bad={base}/x.m3u,html={not_m3u},gone={not_m3u}.missing",
            no_response_timeout="2s",
        )
        for path in ("/ace/playlist/nope.m3u", "/ace/playlist/bad.txt", "/ace/playlist/bad"):
            code, _ = await get_text(self, proxy.url(path))
            self.assertEqual(code, 404, path)
        code, text = await get_text(self, proxy.url("/ace/playlist/bad.m3u"))
        self.assertEqual(code, 502)
        self.assertIn(f"{base}/x.m3u answered HTTP 500", text)
        code, text = await get_text(self, proxy.url("/ace/playlist/html.m3u"))
        self.assertEqual(code, 502)
        self.assertIn("not an M3U", text)
        code, text = await get_text(self, proxy.url("/ace/playlist/gone.m3u"))
        self.assertEqual(code, 502)
        self.assertIn("page.html.missing", text)

    async def test_a_20_mib_source_is_refused(self) -> None:
        source = Source()
        source.huge = True
        base = serve(self, source)
        engine = sim_engine(self)
        proxy = await start_proxy(self, engine, playlists=f"big={base}/big.m3u")
        code, text = await get_text(self, proxy.url("/ace/playlist/big.m3u"))
        self.assertEqual(code, 502)
        self.assertIn("larger than 10485760 bytes", text)

    async def test_a_failing_source_is_served_stale_with_a_warning(self) -> None:
        source = Source()
        base = serve(self, source)
        engine = sim_engine(self)
        proxy = await start_proxy(self, engine, playlists=f"tv={base}/l.m3u", playlist_refresh="50ms")
        code, first = await get_text(self, proxy.url("/ace/playlist/tv.m3u"))
        self.assertEqual(code, 200)
        source.code = 503
        warnings: list[str] = []

        def observe(event: dict) -> None:
            if event.get("log_namespace") == "acexy_tw.playlists":
                warnings.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        await expired(proxy)
        code, stale = await get_text(self, proxy.url("/ace/playlist/tv.m3u"))
        self.assertEqual((code, stale), (200, first))
        self.assertEqual(len(source.requests), 2)
        self.assertTrue(any("HTTP 503" in w and "serving the copy" in w for w in warnings), warnings)

    async def test_acestream_urls_are_accepted_as_ids(self) -> None:
        engine = sim_engine(self, bitrate=2_000_000)
        proxy = await start_proxy(self, engine)
        player = await Player.open(self, proxy.url(f"/ace/getstream?id=acestream://{CID}"))
        await within(player.when_received(10 * PACKET_SIZE))
        code, doc = await get_json(self, proxy.url(f"/ace/status?id=acestream://{CID}"))
        self.assertEqual(code, 200)
        self.assertEqual(doc["clients"], 1)
        await player.hang_up()
