"""
HLS in the simulated engine, over real loopback sockets.

Trial test cases in the style of ``test_sim_engine.py``: an engine on
127.0.0.1 port 0, a treq client with its own pool, waiting with a timeout,
never sleeping.  The live timeline (the playlist sliding, old segments
expiring, the manifest delay) is checked on a ``task.Clock`` with the HTTP
API served in memory (``ClockTimelineTests``): exact, and nothing polls.
Segments are checked with ``ffprobe`` and the live playlist is read end to
end with ``ffmpeg`` (each skipped only when the tool is missing).

Runs under ``pytest -p no:twisted`` and ``python -m twisted.trial``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from treq.client import HTTPClient

from acexy_tw.sim.engine import SimEngine
from acexy_tw.streaming.mpegts import PACKET_SIZE
from tests.integration.test_sim_engine import Clocked, assert_session_answer

TIMEOUT = 10
SEGMENT = 0.3  # short segments: the playlist slides quickly
WINDOW = 4
FFMPEG = shutil.which("ffmpeg")
FFPROBE = shutil.which("ffprobe")
TIMEOUT_TOOL = shutil.which("timeout")


def within(d: Deferred, seconds: float = TIMEOUT) -> Deferred:
    return d.addTimeout(seconds, reactor)


def pid_of(packet: bytes) -> int:
    return (packet[1] & 0x1F) << 8 | packet[2]


def payload_start(packet: bytes) -> bool:
    return bool(packet[1] & 0x40)


class Playlist:
    """A parsed live media playlist."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.lines = [line for line in text.splitlines() if line]
        self.tags: Dict[str, str] = {}
        self.entries: List[Tuple[float, str]] = []
        duration: Optional[float] = None
        for line in self.lines:
            if line.startswith("#EXTINF:"):
                assert line.endswith(","), line
                duration = float(line[len("#EXTINF:") : -1])
            elif line.startswith("#"):
                name, _, value = line.partition(":")
                self.tags[name] = value
            else:
                assert duration is not None, f"URI without #EXTINF: {line}"
                self.entries.append((duration, line))
                duration = None
        assert duration is None, "#EXTINF without URI"

    @property
    def media_sequence(self) -> int:
        return int(self.tags["#EXT-X-MEDIA-SEQUENCE"])

    @property
    def target_duration(self) -> int:
        return int(self.tags["#EXT-X-TARGETDURATION"])

    @property
    def urls(self) -> List[str]:
        return [url for _, url in self.entries]


class HlsTestCase(TestCase):
    """An engine with short HLS segments, and a client with its own pool."""

    timeout = 30
    bitrate: Optional[int] = 2_000_000
    advertise: Optional[Tuple[str, int]] = ("127.0.0.1", 6878)  # None: where it listens
    hls_direct = False

    def setUp(self) -> None:
        self.engine = SimEngine(
            reactor,
            bitrate=self.bitrate,
            hls_segment_duration=SEGMENT,
            hls_window=WINDOW,
            hls_direct=self.hls_direct,
        )
        self.engine.listen()
        if self.advertise is None:
            self.engine.advertise_host, self.engine.advertise_port = self.engine.interface, self.engine.port
        else:
            self.engine.advertise_host, self.engine.advertise_port = self.advertise
        self.addCleanup(lambda: within(self.engine.shutdown()))
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.retryAutomatically = False
        self.addCleanup(self.pool.closeCachedConnections)
        self.http = HTTPClient(Agent(reactor, pool=self.pool))

    # --- helpers ------------------------------------------------------------------

    def assertNear(self, first: float, second: float, delta: float) -> None:
        """``|first - second| <= delta`` (trial's assertAlmostEqual ignores ``delta``)."""
        self.assertLessEqual(abs(first - second), delta, f"{first!r} != {second!r} within {delta!r}")

    @property
    def advertised(self) -> str:
        return f"http://{self.engine.advertise_host}:{self.engine.advertise_port}"

    def local(self, url: str) -> str:
        """Rewrite an advertised URL to where the engine really listens."""
        assert url.startswith(self.advertised + "/"), url
        return self.engine.url + url[len(self.advertised) :]

    async def fetch(self, path_or_url: str, **params: str) -> Tuple[Any, bytes]:
        url = path_or_url if "://" in path_or_url else self.engine.url + path_or_url
        response = await within(self.http.get(url, params=params or None, unbuffered=True))
        return response, await within(response.content())

    async def manifest_json(self, **params: str) -> Dict[str, Any]:
        response, body = await self.fetch("/ace/manifest.m3u8", format="json", **params)
        self.assertEqual(response.code, 200)
        return json.loads(body)

    async def start(self, content: str = "abc", pid: str = "player-1") -> Dict[str, Any]:
        body = await self.manifest_json(id=content, pid=pid)
        self.assertIsNone(body["error"])
        return body["response"]

    async def playlist(self, answer: Dict[str, Any]) -> Playlist:
        response, body = await self.fetch(self.local(answer["playback_url"]))
        self.assertEqual(response.code, 200, body)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/vnd.apple.mpegurl"])
        return Playlist(body.decode())

    async def status_of(self, url: str) -> int:
        response, _ = await self.fetch(url)
        return response.code

    def tempdir(self) -> str:
        path = tempfile.mkdtemp(prefix="acexy-hls-")
        self.addCleanup(shutil.rmtree, path, True)
        return path

    async def run_tool(self, tool: Optional[str], args: Sequence[str], limit: float = 15) -> Tuple[bytes, bytes]:
        """Run ``tool`` (bounded by coreutils ``timeout`` when present); fails on a non-zero exit."""
        if tool is None:
            raise SkipTest("ffmpeg/ffprobe is not installed")
        if TIMEOUT_TOOL is not None:
            executable, argv = TIMEOUT_TOOL, ["-k", "2", str(limit), tool, *args]
        else:
            executable, argv = tool, list(args)
        out, err, code = await within(
            getProcessOutputAndValue(executable, argv, env=dict(os.environ), reactor=reactor), limit + 5
        )
        self.assertEqual(code, 0, f"{os.path.basename(tool)} {' '.join(args)} failed:\n{err.decode(errors='replace')}")
        return out, err

    async def probe(self, path: str) -> Dict[str, Any]:
        out, _ = await self.run_tool(
            FFPROBE,
            ["-v", "error", "-show_entries", "format=format_name,start_time,duration:stream=codec_name",
             "-of", "json", path],
        )
        return json.loads(out)


class ManifestTests(HlsTestCase):
    async def test_manifest_json_shape_and_advertised_urls(self) -> None:
        body = await self.manifest_json(id="ABCdef", pid="p1", transcode_audio="0")
        answer = assert_session_answer(
            self, body, "ABCdef", r"^http://127\.0\.0\.1:6878/ace/m/{infohash}/[0-9a-f]+\.m3u8$"
        )
        infohash = answer["infohash"]
        self.assertEqual(
            self.engine.manifest_calls,
            [{"format": "json", "id": "ABCdef", "pid": "p1", "transcode_audio": "0"}],
        )
        self.assertEqual(self.engine.getstream_calls, [])
        session = self.engine.sessions[answer["playback_session_id"]]
        self.assertTrue(session.hls)
        self.assertEqual((session.selector, session.content_key, session.pid), ("content_id", "ABCdef", "p1"))
        self.assertIn(infohash, self.engine.hls_streams)

        code_and_stat = json.loads((await self.fetch(self.local(answer["stat_url"])))[1])
        self.assertIsNone(code_and_stat["error"])
        self.assertEqual(code_and_stat["response"]["playback_session_id"], answer["playback_session_id"])

    async def test_selectors(self) -> None:
        infohash = "0123456789ABCDEF0123456789ABCDEF01234567"
        answer = (await self.manifest_json(infohash=infohash, pid="1"))["response"]
        self.assertEqual(answer["infohash"], infohash.lower())
        self.assertTrue(answer["playback_url"].endswith(".m3u8"))
        answer = (await self.manifest_json(content_id="xyz", pid="1"))["response"]
        self.assertEqual(answer["infohash"], hashlib.sha1(b"xyz").hexdigest())
        body = await self.manifest_json(pid="1")
        self.assertEqual(body, {"response": None, "error": "missing content id"})
        self.assertEqual(len(self.engine.sessions), 2)

    async def test_getstream_knobs_apply(self) -> None:
        self.engine.behaviour.json_error = "no peers"
        self.assertEqual(await self.manifest_json(id="abc"), {"response": None, "error": "no peers"})
        self.engine.behaviour.json_error = None
        self.engine.behaviour.getstream_status = 500
        response, _ = await self.fetch("/ace/manifest.m3u8", format="json", id="abc")
        self.assertEqual(response.code, 500)
        self.assertEqual(self.engine.sessions, {})

    async def test_without_format_json_is_404_by_default(self) -> None:
        self.assertEqual(await self.status_of(self.engine.url + "/ace/manifest.m3u8?id=abc"), 404)
        self.assertEqual((self.engine.sessions, self.engine.manifest_calls), ({}, []))


def check_syntax(test: Any, playlist: Playlist, infohash: str, advertised: str) -> None:
    """A live media playlist of ``infohash`` with absolute segment URLs on ``advertised``."""
    lines = playlist.lines
    test.assertEqual(lines[0], "#EXTM3U")
    test.assertEqual(playlist.tags["#EXT-X-VERSION"], "3")
    test.assertNotIn("#EXT-X-ENDLIST", playlist.tags)  # live
    test.assertTrue(3 <= len(playlist.entries) <= 5, playlist.text)
    first = playlist.media_sequence
    for i, (duration, url) in enumerate(playlist.entries):
        test.assertEqual(url, f"{advertised}/ace/c/{infohash}/{first + i}.ts")
        test.assertGreater(duration, 0)
        test.assertLessEqual(math.floor(duration + 0.5), playlist.target_duration)


class PlaylistTests(HlsTestCase):
    def check_syntax(self, playlist: Playlist, infohash: str) -> None:
        check_syntax(self, playlist, infohash, self.advertised)

    async def test_playlist_syntax_and_absolute_segment_urls(self) -> None:
        answer = await self.start()
        playlist = await self.playlist(answer)
        self.check_syntax(playlist, answer["infohash"])
        self.assertEqual(playlist.target_duration, 1)
        self.assertNear(sum(d for d, _ in playlist.entries) / len(playlist.entries), SEGMENT, delta=0.05)
        session = self.engine.last_session
        self.assertEqual((session.manifest_requests, self.engine.manifest_requests), (1, 1))
        self.assertIsNotNone(session.last_manifest_at)

    async def test_manifest_status(self) -> None:
        answer = await self.start()
        self.engine.behaviour.manifest_status = 500
        response, _ = await self.fetch(self.local(answer["playback_url"]))
        self.assertEqual(response.code, 500)
        self.assertEqual(self.engine.last_session.manifest_requests, 1)  # counted all the same
        self.engine.behaviour.manifest_status = 200
        await self.playlist(answer)

    async def test_unknown_token_is_404(self) -> None:
        answer = await self.start()
        self.assertEqual(await self.status_of(self.local(answer["playback_url"]).replace(".m3u8", "0.m3u8")), 404)
        # an HLS session does not play as a TS stream, nor a TS session as HLS
        ts_url = self.local(answer["playback_url"]).replace("/ace/m/", "/ace/r/")[: -len(".m3u8")]
        self.assertEqual(await self.status_of(ts_url), 404)
        response, body = await self.fetch("/ace/getstream", format="json", id="abc")
        ts_answer = json.loads(body)["response"]
        hls_url = self.local(ts_answer["playback_url"]).replace("/ace/r/", "/ace/m/") + ".m3u8"
        self.assertEqual(await self.status_of(hls_url), 404)


class SegmentTests(HlsTestCase):
    async def test_segments_are_mpegts_that_ffprobe_accepts(self) -> None:
        answer = await self.start()
        playlist = await self.playlist(answer)
        directory = self.tempdir()
        paths = []
        for duration, url in playlist.entries[-2:]:
            response, data = await self.fetch(self.local(url))
            self.assertEqual(response.code, 200)
            self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"video/MP2T"])
            self.assertEqual(len(data) % PACKET_SIZE, 0)
            self.assertEqual({data[i] for i in range(0, len(data), PACKET_SIZE)}, {0x47})
            # starts with PAT then PMT
            self.assertEqual((pid_of(data), payload_start(data)), (0x0000, True))
            self.assertEqual(pid_of(data[PACKET_SIZE:]), 0x1000)
            # its #EXTINF duration at the bitrate
            self.assertNear(len(data) * 8 / self.bitrate, duration, delta=0.01)
            path = os.path.join(directory, os.path.basename(url))
            with open(path, "wb") as f:
                f.write(data)
            paths.append(path)
        session = self.engine.last_session
        self.assertEqual((session.segment_requests, session.segments_served, self.engine.segment_requests), (2, 2, 2))
        self.assertGreater(session.bytes_sent, 0)

        if FFPROBE is None:
            raise SkipTest("ffprobe is not installed")
        infos = [await self.probe(path) for path in paths]
        for info in infos:
            self.assertEqual(info["format"]["format_name"], "mpegts")
            self.assertEqual(sorted(s["codec_name"] for s in info["streams"]), ["mp2", "mpeg2video"])
        # consecutive segments continue the timestamps
        first, second = (float(info["format"]["start_time"]) for info in infos)
        self.assertNear(second - first, playlist.entries[-2][0], delta=0.05)

    async def test_segment_status(self) -> None:
        answer = await self.start()
        url = self.local((await self.playlist(answer)).urls[-1])
        self.engine.behaviour.segment_status = 503
        self.assertEqual(await self.status_of(url), 503)
        self.engine.behaviour.segment_status = 200
        self.assertEqual(await self.status_of(url), 200)
        self.assertEqual(self.engine.last_session.segment_requests, 2)

    async def test_stop_makes_playlist_and_segments_404(self) -> None:
        answer = await self.start()
        playlist = await self.playlist(answer)
        segment = self.local(playlist.urls[-1])
        self.assertEqual(await self.status_of(segment), 200)
        response, body = await self.fetch(self.local(answer["command_url"]), method="stop")
        self.assertEqual((response.code, json.loads(body)), (200, {"response": "ok", "error": None}))
        self.assertEqual(await self.status_of(self.local(answer["playback_url"])), 404)
        self.assertEqual(await self.status_of(segment), 404)
        _, body = await self.fetch(self.local(answer["stat_url"]))
        self.assertEqual(json.loads(body), {"response": None, "error": "unknown playback session id"})
        self.assertEqual(self.engine.hls_streams, {})
        self.assertEqual(self.engine.last_session.manifest_requests, 2)

    async def test_segments_belong_to_the_content(self) -> None:
        first = await self.start(pid="a")
        second = await self.start(pid="b")
        self.assertEqual(len(self.engine.hls_streams), 1)
        segment = self.local((await self.playlist(second)).urls[-1])
        await self.fetch(self.local(first["command_url"]), method="stop")
        self.assertEqual(await self.status_of(segment), 200)  # the other session keeps the content
        self.assertEqual(await self.status_of(self.local(first["playback_url"])), 404)
        await self.fetch(self.local(second["command_url"]), method="stop")
        self.assertEqual(await self.status_of(segment), 404)


class FlatOutSegmentTests(HlsTestCase):
    bitrate = None

    async def test_flat_out_engine_serves_segments_at_4_mbit(self) -> None:
        answer = await self.start()
        duration, url = (await self.playlist(answer)).entries[-1]
        _, data = await self.fetch(self.local(url))
        self.assertNear(len(data) * 8 / 4_000_000, duration, delta=0.01)


class DirectManifestTests(HlsTestCase):
    hls_direct = True

    async def test_manifest_without_format_json_is_the_playlist(self) -> None:
        response, body = await self.fetch("/ace/manifest.m3u8", id="abc", pid="p")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/vnd.apple.mpegurl"])
        playlist = Playlist(body.decode())
        self.assertTrue(3 <= len(playlist.entries) <= 5)
        await self.fetch("/ace/manifest.m3u8", id="abc", pid="p")  # same pid: same session
        self.assertEqual(len(self.engine.sessions), 1)
        self.assertEqual(self.engine.last_session.manifest_requests, 2)
        await self.fetch("/ace/manifest.m3u8", id="abc", pid="q")
        self.assertEqual(len(self.engine.sessions), 2)


class FfmpegTests(HlsTestCase):
    advertise = None  # ffmpeg follows the absolute segment URLs: advertise the real address

    async def test_ffmpeg_reads_the_live_playlist(self) -> None:
        if FFMPEG is None or FFPROBE is None:
            raise SkipTest("ffmpeg/ffprobe is not installed")
        answer = await self.start()
        output = os.path.join(self.tempdir(), "out.ts")
        await self.run_tool(
            FFMPEG,
            ["-nostdin", "-v", "error", "-y", "-rw_timeout", "5000000", "-i", answer["playback_url"],
             "-t", "3", "-c", "copy", "-f", "mpegts", output],
        )
        info = await self.probe(output)
        self.assertEqual(info["format"]["format_name"], "mpegts")
        self.assertEqual(sorted(s["codec_name"] for s in info["streams"]), ["mp2", "mpeg2video"])
        self.assertGreaterEqual(float(info["format"]["duration"]), 2.5)
        session = self.engine.last_session
        self.assertGreaterEqual(session.manifest_requests, 2)  # ffmpeg reloaded the live playlist
        self.assertGreaterEqual(session.segments_served, 8)  # > 3 s of 0.3 s segments
        # and decodes cleanly
        await self.run_tool(FFMPEG, ["-nostdin", "-v", "error", "-i", output, "-f", "null", "-"])


class ClockTimelineTests(SynchronousTestCase):
    """
    The live timeline on a ``task.Clock``, the HTTP API served in memory: the
    playlist slides by whole segments as time passes, old segments expire,
    the manifest delay holds the playlist back. Exact, and nothing polls.
    (Segment boundaries at 0.3 s segments: 0.32, 0.64, 0.96, 1.2 s, then
    again every 1.2 s; the checks stay clear of them.)
    """

    advertised = "http://127.0.0.1:6878"

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.engine = SimEngine(self.clock, bitrate=2_000_000, hls_segment_duration=SEGMENT, hls_window=WINDOW)
        self.http = Clocked(self.engine._site.resource, self.clock)

    def fetch(self, url: str, **params: str) -> Tuple[Any, bytes]:
        response = self.successResultOf(self.http.get(url, params=params or None))
        return response, self.successResultOf(self.http.body(response))

    def start(self) -> Dict[str, Any]:
        _, body = self.fetch(self.advertised + "/ace/manifest.m3u8", format="json", id="abc", pid="player-1")
        answer = json.loads(body)
        self.assertIsNone(answer["error"])
        return answer["response"]

    def playlist(self, answer: Dict[str, Any]) -> Playlist:
        response, body = self.fetch(answer["playback_url"])
        self.assertEqual(response.code, 200, body)
        return Playlist(body.decode())

    def status_of(self, url: str) -> int:
        return self.fetch(url)[0].code

    def test_playlist_slides_with_time(self) -> None:
        answer = self.start()
        first = self.playlist(answer)
        self.http.advance(1.0)  # three segments complete meanwhile
        later = self.playlist(answer)
        self.assertEqual(later.media_sequence, first.media_sequence + 3)
        check_syntax(self, later, answer["infohash"], self.advertised)
        # The window moved on by whole segments: later URLs continue the first ones.
        self.assertEqual(later.urls[0], f"{self.advertised}/ace/c/{answer['infohash']}/{later.media_sequence}.ts")
        overlap = set(first.urls) & set(later.urls)
        self.assertTrue(overlap)
        for url in overlap:
            self.assertEqual(first.urls.index(url) - later.urls.index(url), later.media_sequence - first.media_sequence)
        session = self.engine.last_session
        self.assertEqual(session.manifest_requests, 2)
        self.assertEqual(session.manifest_requests, self.engine.manifest_requests)

    def test_manifest_delay(self) -> None:
        answer = self.start()
        self.engine.behaviour.manifest_delay = 0.3
        d = self.http.get(answer["playback_url"])
        self.http.advance(0.29)
        self.assertNoResult(d)
        self.http.advance(0.01)
        self.assertEqual(self.successResultOf(d).code, 200)

    def test_unknown_old_and_future_segments_are_404(self) -> None:
        answer = self.start()
        infohash = answer["infohash"]
        playlist = self.playlist(answer)
        newest = playlist.media_sequence + len(playlist.entries) - 1
        base = f"{self.advertised}/ace/c/{infohash}"
        self.assertEqual(self.status_of(f"{base}/{newest + 2}.ts"), 404)  # not yet
        self.assertEqual(self.status_of(f"{base}/x.ts"), 404)
        self.assertEqual(self.status_of(f"{self.advertised}/ace/c/{'0' * 40}/0.ts"), 404)
        self.assertEqual(self.status_of(f"{base}/0.ts"), 200)
        # once the window has moved more than twice its length, segment 0 is gone
        self.http.advance(2.3)  # seven more segments
        self.assertGreaterEqual(self.playlist(answer).media_sequence, 2 * WINDOW - 2)
        self.assertEqual(self.status_of(f"{base}/0.ts"), 404)
        self.assertEqual(self.engine.last_session.segments_served, 1)
        self.assertEqual(self.engine.segment_requests, 5)
