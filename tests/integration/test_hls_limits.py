"""
HLS limits (issue #12, point 7 and the HLS half of point 5), over real
loopback sockets against the simulated engine: segment relays are bounded and
die with their session; playlist URIs become opaque names of full engine
URLs; the engine's playlist is fetched once per target duration whatever the
number of pollers; only the token the guard matched goes into segment URLs.

Every wait is bounded (``within``/``wait_until``); nothing sleeps. Figures
(sockets, engine fetches, time to close) are printed: run with
``pytest -s``.
"""

from __future__ import annotations

import os
import time
from urllib.parse import quote, urljoin

from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import TestCase

from acexy_tw.sim.model import Behaviour
from tests.integration.harness import (
    CID,
    StalledPlayer,
    TSPlayer,
    cid,
    get_text,
    http_client,
    sim_engine,
    start_proxy,
    wait_until,
    within,
)


def fds() -> int:
    """Open sockets of this process (proxy, engine and players all live here)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:  # the directory's own descriptor, gone already
            pass
    return count


def uri_lines(playlist: str) -> list[str]:
    """The playlist's segment links, resolved against its path as a player does (they are relative)."""
    return [urljoin("/ace/manifest.m3u8", line) for line in playlist.splitlines() if line and not line.startswith("#")]


def manifest(content_id: str = CID, extra: str = "") -> str:
    return f"/ace/manifest.m3u8?id={content_id}{extra}"


async def hls_proxy(test: TestCase, engine, **settings: str):
    """The proxy; at test end its HLS sessions are stopped and their stop
    commands answered before it stops (its stopService does not wait for them)."""
    proxy = await start_proxy(test, engine, **settings)
    test.addCleanup(lambda: within(proxy.service.hls.shutdown()))
    return proxy


def big_segment_engine(test: TestCase):
    """10 MB segments (80 Mbit/s, 1 s): more than the loopback buffers hold, so a
    player that does not read really holds the relay."""
    return sim_engine(test, bitrate=80_000_000, hls_segment_duration=1.0)


class SegmentRelayDeadlineTests(TestCase):
    async def _stalled_segment(self, proxy, engine) -> tuple[StalledPlayer, int, float]:
        """A player that asks for a segment and never reads; ``before``: the
        process's fds before any connection (the engine's and proxy's
        connections each count twice here: both ends live in this process)."""
        before = fds()
        code, playlist = await get_text(self, proxy.url(manifest()))
        self.assertEqual(code, 200, playlist)
        segment = uri_lines(playlist)[-1]
        started = time.monotonic()
        player = await StalledPlayer.open(self, proxy.port, segment)
        session = next(iter(proxy.service.hls))
        await wait_until(lambda: len(session.relays) == 1 and engine.segment_requests >= 1, "the relay")
        return player, before, started

    async def test_segment_never_read_is_closed_after_empty_timeout(self) -> None:
        engine = big_segment_engine(self)
        proxy = await hls_proxy(self, engine, empty_timeout="500ms", m3u8_stream_timeout="30s")
        player, before, started = await self._stalled_segment(proxy, engine)
        session = next(iter(proxy.service.hls))
        during = fds()
        await wait_until(
            lambda: fds() <= before + 1 + 2 * engine.connections, "the proxy to close both sides of the relay"
        )
        closed_after = time.monotonic() - started
        print(f"never-read segment: fds {before} -> {during} -> {fds()} (+1: the paused player), "
                f"closed after {closed_after:.2f}s with ACEXY_EMPTY_TIMEOUT=0.5s")
        # the player, the proxy's end of it, and both ends of the engine connection
        self.assertGreaterEqual(during, before + 4)
        self.assertLessEqual(engine.connections, 1)  # at most the pool's idle playlist connection
        self.assertEqual(len(session.relays), 0)
        self.assertLess(closed_after, 5)
        self.assertFalse(session.closed)  # only the relay ends: the session is still polled
        player.start_reading()
        await player.when_closed()
        await wait_until(lambda: fds() <= before, "the player's own socket")

    async def test_engine_stalling_mid_segment_is_cut_after_empty_timeout(self) -> None:
        engine = sim_engine(self, bitrate=1_000_000, hls_segment_duration=0.5)
        proxy = await hls_proxy(self, engine, empty_timeout="500ms")
        code, playlist = await get_text(self, proxy.url(manifest()))
        self.assertEqual(code, 200)
        engine.behaviour.segment_stall_after = 188 * 50
        started = time.monotonic()
        player = await TSPlayer.open(self, proxy.url(uri_lines(playlist)[-1]))
        self.assertEqual(player.code, 200)
        await player.when_ended()
        cut_after = time.monotonic() - started
        print(f"engine stalled after 9400 bytes: player cut after {cut_after:.2f}s, "
                f"{len(player.received)} bytes; engine connections {engine.connections}")
        self.assertFalse(player.clean_end)  # a truncated segment is not passed off as whole
        self.assertEqual(len(player.received), 188 * 50)
        self.assertLess(cut_after, 5)
        session = next(iter(proxy.service.hls))
        self.assertEqual(len(session.relays), 0)
        await within(engine.when(lambda e: e.connections <= 1))  # the stalled segment's connection is gone

    async def test_relays_are_closed_when_their_session_stops(self) -> None:
        engine = big_segment_engine(self)
        # a long empty timeout: only the session's stop can end the relay
        proxy = await hls_proxy(self, engine, empty_timeout="60s", m3u8_stream_timeout="0")
        player, before, started = await self._stalled_segment(proxy, engine)
        session = next(iter(proxy.service.hls))
        await within(engine.when(lambda e: e.stop_count == 1))  # no longer polled: 3 x target duration
        stopped = time.monotonic()
        await wait_until(lambda: fds() <= before + 1 + 2 * engine.connections, "the relay to close with its session")
        print(f"session stop: relay closed {time.monotonic() - stopped:.3f}s after the stop "
                f"({stopped - started:.2f}s after the GET; idle timeout {session.idle_timeout:g}s); fds {fds()} vs {before}")
        self.assertEqual(len(session.relays), 0)
        self.assertTrue(session.closed)
        self.assertLess(time.monotonic() - stopped, 2)
        player.start_reading()
        await player.when_closed()

    async def test_segment_of_a_stopped_session_is_404(self) -> None:
        engine = sim_engine(self, bitrate=1_000_000, hls_segment_duration=0.5)
        proxy = await hls_proxy(self, engine, m3u8_stream_timeout="0")
        code, playlist = await get_text(self, proxy.url(manifest()))
        self.assertEqual(code, 200)
        await within(engine.when(lambda e: e.stop_count == 1))
        code, _ = await get_text(self, proxy.url(uri_lines(playlist)[-1]))
        self.assertEqual(code, 404)


class OpaqueSegmentNameTests(TestCase):
    async def test_names_stand_for_full_engine_urls(self) -> None:
        engine = sim_engine(self, bitrate=1_000_000, hls_segment_duration=0.5)
        # the same file name under another path of the engine
        engine.behaviour.playlist_tail = ("#EXTINF:0.5,", "/secret/{last}.ts")
        proxy = await hls_proxy(self, engine)
        code, playlist = await get_text(self, proxy.url(manifest()))
        self.assertEqual(code, 200, playlist)
        lines = uri_lines(playlist)
        session = next(iter(proxy.service.hls))
        self.assertEqual(len(set(lines)), len(lines))  # /ace/c/<ih>/<n>.ts and /secret/<n>.ts differ
        for line in lines:
            self.assertTrue(line.startswith(f"{session.segment_base}/"), line)
            self.assertNotRegex(line.rsplit("/", 1)[1], r"^\d+\.ts$")  # not the engine's file name
        last = int(playlist.split("#EXT-X-MEDIA-SEQUENCE:")[1].split()[0]) + len(lines) - 2
        infohash = engine.last_session.infohash
        self.assertTrue(session.segment_url(lines[-2].rsplit("/", 1)[1]).endswith(f"/ace/c/{infohash}/{last}.ts"))
        self.assertTrue(session.segment_url(lines[-1].rsplit("/", 1)[1]).endswith(f"/secret/{last}.ts"))
        code, _ = await get_text(self, proxy.url(lines[-2]))
        self.assertEqual(code, 200)
        code, _ = await get_text(self, proxy.url(lines[-1]))  # relayed to /secret/<n>.ts: the engine's 404
        self.assertEqual(code, 404)
        for path in (f"{last}.ts", "nope.ts", "..%2F..%2Fsecret%2F1.ts"):
            code, _ = await get_text(self, proxy.url(f"{session.segment_base}/{path}"))
            self.assertEqual(code, 404, path)
        # a listed name under another content's path (or the old path without one) is not found either
        name = lines[-2].rsplit("/", 1)[1]
        for path in (f"/ace/hls/{'f' * 40}/{session.sid}/{name}", f"/ace/hls/{session.sid}/{name}"):
            code, _ = await get_text(self, proxy.url(path))
            self.assertEqual(code, 404, path)
        self.assertEqual(engine.segment_requests, 1)  # unknown names never reach the engine

    async def test_a_name_stays_the_same_while_listed(self) -> None:
        engine = sim_engine(self, bitrate=1_000_000, hls_segment_duration=0.5)
        proxy = await hls_proxy(self, engine)
        _, first = await get_text(self, proxy.url(manifest()))
        session = next(iter(proxy.service.hls))
        fetches = session.fetches
        await wait_until(lambda: self._fresh(session, fetches), "the next target duration")
        _, second = await get_text(self, proxy.url(manifest()))
        a, b = uri_lines(first), uri_lines(second)
        self.assertGreater(session.fetches, fetches)
        urls_a = {session.segment_url(n.rsplit("/", 1)[1]): n for n in a}
        for name in b:
            url = session.segment_url(name.rsplit("/", 1)[1])
            if url in urls_a:
                self.assertEqual(urls_a[url], name)

    @staticmethod
    def _fresh(session, fetches) -> bool:
        # poll (as a player does) until the cache is refreshed
        return session._clock.seconds() >= session._cached_until

    async def test_uri_attributes_go_through_the_same_mapping(self) -> None:
        engine = sim_engine(self, bitrate=1_000_000, hls_segment_duration=0.5)
        engine.behaviour.playlist_head = (
            '#EXT-X-MAP:URI="{base}/ace/c/{infohash}/{last}.ts"',
            '#EXT-X-KEY:METHOD=AES-128,URI="/ace/c/{infohash}/{first}.ts",IV=0x1',
            '#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID="a",NAME="x",URI="../../c/{infohash}/{first}.ts"',
        )
        proxy = await hls_proxy(self, engine)
        code, playlist = await get_text(self, proxy.url(manifest()))
        self.assertEqual(code, 200, playlist)
        self.assertNotIn("127.0.0.1", playlist)
        self.assertNotIn("/ace/c/", playlist)
        session = next(iter(proxy.service.hls))
        tags = {line.split(":", 1)[0]: line for line in playlist.splitlines() if "URI=" in line}
        uri = {tag: urljoin("/ace/manifest.m3u8", line.split('URI="', 1)[1].split('"', 1)[0]) for tag, line in tags.items()}
        lines = uri_lines(playlist)
        self.assertEqual(uri["#EXT-X-MAP"], lines[-1])  # the same engine URL, the same name
        self.assertEqual(uri["#EXT-X-KEY"], uri["#EXT-X-MEDIA"])  # relative and absolute-path forms alike
        self.assertEqual(uri["#EXT-X-KEY"], lines[0])
        self.assertTrue(tags["#EXT-X-KEY"].endswith(",IV=0x1"))
        for value in uri.values():
            self.assertTrue(value.startswith(f"{session.segment_base}/"), value)
        client = http_client(self)
        map_body = await within((await within(client.get(proxy.url(uri["#EXT-X-MAP"])))).content())
        segment_body = await within((await within(client.get(proxy.url(lines[-1])))).content())
        self.assertEqual(map_body, segment_body)
        self.assertEqual(map_body[0], 0x47)

    async def test_a_uri_the_proxy_cannot_map_refuses_the_playlist(self) -> None:
        engine = sim_engine(self, bitrate=1_000_000, hls_segment_duration=0.5)
        proxy = await hls_proxy(self, engine)
        cases = [
            ((), ("#EXTINF:0.5,", "http://127.0.0.2:9/INJECTED.ts")),  # off the engine
            (('#EXT-X-KEY:METHOD=AES-128,URI="http://evil.example/key"',), ()),
            (("#EXT-X-MAP:URI=init.mp4",), ()),  # not a quoted string
            (('#EXT-X-DATERANGE:ID="d",START-DATE="2026-01-01",X-ASSET-URI="/ace/c/x/1.ts"',), ()),
            (('#EXT-X-KEY:METHOD=AES-128,URI="file:///etc/passwd"',), ()),
            (("#EXTINF:0.5,", "http://user:pw@127.0.0.1:6878/ace/c/x/1.ts"), ()),
        ]
        for n, (head, tail) in enumerate(cases):
            engine.behaviour = Behaviour(playlist_head=head, playlist_tail=tail)
            code, body = await get_text(self, proxy.url(manifest(cid(100 + n))))
            self.assertEqual(code, 502, (head, tail, body))
            self.assertNotIn("#EXTM3U", body)
        engine.behaviour = Behaviour()
        code, _ = await get_text(self, proxy.url(manifest(cid(200))))
        self.assertEqual(code, 200)


class PlaylistFetchTests(TestCase):
    async def test_300_polls_cost_one_engine_fetch_per_target_duration(self) -> None:
        engine = sim_engine(self, bitrate=1_000_000, hls_segment_duration=0.5)  # TARGETDURATION:1
        engine.behaviour.manifest_delay = 0.3  # so that the first 100 pollers overlap one fetch
        proxy = await hls_proxy(self, engine)
        client = http_client(self)
        started = time.monotonic()

        async def poll() -> tuple[int, bytes]:
            response = await within(client.get(proxy.url(manifest())))
            return response.code, await within(response.content())

        concurrent = await within(gatherResults([Deferred.fromCoroutine(poll()) for _ in range(100)]))
        self.assertEqual({code for code, _ in concurrent}, {200})
        for _, body in concurrent:  # each poller got its own, whole playlist (STYLE.md pitfall 10)
            self.assertTrue(body.startswith(b"#EXTM3U"))
            self.assertTrue(uri_lines(body.decode()))
        session = engine.last_session
        self.assertEqual(session.manifest_requests, 1)
        engine.behaviour.manifest_delay = 0.0
        for _ in range(200):
            code, _ = await poll()
            self.assertEqual(code, 200)
        elapsed = time.monotonic() - started
        hls = next(iter(proxy.service.hls))
        print(f"300 playlist polls in {elapsed:.2f}s: {session.manifest_requests} engine fetches "
                f"(target duration {hls.target_duration:g}s; proxy polls {hls.polls}, fetches {hls.fetches})")
        self.assertEqual(hls.polls, 300)
        self.assertLessEqual(session.manifest_requests, 2 + int(elapsed / hls.target_duration))
        self.assertEqual(session.manifest_requests, hls.fetches)


class PlaylistTokenTests(TestCase):
    async def test_without_a_token_setting_no_client_parameter_is_copied(self) -> None:
        engine = sim_engine(self, bitrate=1_000_000, hls_segment_duration=0.5)
        proxy = await hls_proxy(self, engine)
        code, playlist = await get_text(
            self, proxy.url(manifest(extra="&token=x%0Ahttp://127.0.0.2:9/INJECTED.ts&foo=bar"))
        )
        self.assertEqual(code, 200, playlist)
        self.assertNotIn("INJECTED", playlist)
        self.assertNotIn("token", playlist)
        self.assertNotIn("foo", playlist)
        for line in uri_lines(playlist):
            self.assertRegex(line, rf"^/ace/hls/{CID}/[A-Za-z0-9_-]+/[A-Za-z0-9_-]+\.ts$")

    async def test_the_matched_token_is_copied_url_encoded(self) -> None:
        token = "a&b#c+d%e=f?g"
        engine = sim_engine(self, bitrate=1_000_000, hls_segment_duration=0.5)
        proxy = await hls_proxy(self, engine, token=token)
        evil = "x%0Ahttp://127.0.0.2:9/INJECTED.ts"
        good = quote(token, safe="")
        code, playlist = await get_text(self, proxy.url(manifest(extra=f"&token={evil}&token={good}")))
        self.assertEqual(code, 200, playlist)  # the guard accepts on the good one
        self.assertNotIn("INJECTED", playlist)
        lines = uri_lines(playlist)
        self.assertEqual(len(playlist.splitlines()), 4 + 2 * len(lines))  # no line added
        for line in lines:
            self.assertTrue(line.endswith(f"?token={good}"), line)
        code, body = await get_text(self, proxy.url(lines[-1]))
        self.assertEqual(code, 200, body)  # the encoded token passes the guard again

    async def test_a_bearer_token_is_copied_for_the_segments(self) -> None:
        token = "bearer-token+1%"
        engine = sim_engine(self, bitrate=1_000_000, hls_segment_duration=0.5)
        proxy = await hls_proxy(self, engine, token=token)
        client = http_client(self)
        response = await within(
            client.get(proxy.url(manifest()), headers={b"authorization": [f"Bearer {token}".encode()]})
        )
        playlist = (await within(response.content())).decode()
        self.assertEqual(response.code, 200, playlist)
        segment = uri_lines(playlist)[-1]
        self.assertTrue(segment.endswith("?token=" + quote(token, safe="")), segment)
        code, _ = await get_text(self, proxy.url(segment))
        self.assertEqual(code, 200)
