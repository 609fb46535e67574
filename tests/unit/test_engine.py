"""EngineClient against in-memory engines (treq's StubTreq), timeouts on a Clock."""

from __future__ import annotations

from typing import Any, Callable

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import NOT_DONE_YET

from acexy_tw.content import ContentKey
from acexy_tw.engine import EngineAddress, EngineClient, EngineError, EngineTimeout, PlaybackInfo
from acexy_tw.testing import ScriptedResource, answer

CID = "c" * 40


def start_answer(host: str = "127.0.0.1:6878") -> Callable[[Any], bytes]:
    """The engine's getstream?format=json answer, its URLs on ``host``."""
    base = f"http://{host}"
    return answer(
        200,
        {
            "response": {
                "playback_url": f"{base}/ace/r/{'1' * 40}/tok",
                "stat_url": f"{base}/ace/stat/{'1' * 40}/tok",
                "command_url": f"{base}/ace/cmd/{'1' * 40}/tok",
                "infohash": "1" * 40,
                "playback_session_id": "2" * 40,
                "is_live": 1,
                "is_encrypted": 0,
                "client_session_id": -1,
            },
            "error": None,
        },
    )


class EngineClientTests(SynchronousTestCase):
    def make(self, handler: Callable[[Any], Any], **kw: Any) -> tuple[EngineClient, StubTreq, ScriptedResource, Clock]:
        resource = ScriptedResource(handler)
        stub = StubTreq(resource)
        clock = Clock()
        client = EngineClient(
            stub, EngineAddress("http", "engine.lan", 16878), clock, timeout=kw.get("timeout", 10), stop_timeout=3
        )
        return client, stub, resource, clock

    def test_start_sends_format_json_a_fresh_pid_and_the_key(self) -> None:
        client, stub, res, _ = self.make(start_answer())
        key = ContentKey("content_id", CID, (("transcode_audio", "1"),))
        d1 = client.start(key)
        d2 = client.start(key)
        stub.flush()
        info = self.successResultOf(d1)
        self.successResultOf(d2)
        first, second = res.seen
        q1, q2 = first["args"], second["args"]
        self.assertEqual((first["method"], first["path"]), ("GET", "/ace/getstream"))
        self.assertEqual(second["path"], "/ace/getstream")
        self.assertEqual(q1["format"], ["json"])
        self.assertEqual(q1["content_id"], [CID])
        self.assertEqual(q1["transcode_audio"], ["1"])
        self.assertNotEqual(q1["pid"], q2["pid"])
        self.assertEqual(info.playback_session_id, "2" * 40)
        self.assertEqual(info.is_live, 1)

    def test_engine_urls_are_rewritten_to_the_address_we_used(self) -> None:
        client, stub, _, _ = self.make(start_answer("172.17.0.5:6878"))
        d = client.start(ContentKey("content_id", CID))
        stub.flush()
        info = self.successResultOf(d)
        for url in (info.playback_url, info.stat_url, info.command_url):
            self.assertTrue(url.startswith("http://engine.lan:16878/ace/"), url)
        self.assertTrue(info.playback_url.endswith("/ace/r/" + "1" * 40 + "/tok"))

    def test_json_error_becomes_engine_error_with_its_text(self) -> None:
        client, stub, _, _ = self.make(answer(200, {"response": None, "error": "failed to load content"}))
        d = client.start(ContentKey("content_id", CID))
        stub.flush()
        f = self.failureResultOf(d, EngineError)
        self.assertIn("failed to load content", str(f.value))
        self.assertNotIsInstance(f.value, EngineTimeout)

    def test_plain_text_500_is_an_engine_error(self) -> None:
        client, stub, _, _ = self.make(answer(500, raw=b"Internal Server Error"))
        d = client.start(ContentKey("content_id", CID))
        stub.flush()
        f = self.failureResultOf(d, EngineError)
        self.assertIn("500", str(f.value))

    def test_silent_engine_times_out(self) -> None:
        client, stub, _, clock = self.make(lambda r: NOT_DONE_YET, timeout=10)
        d = client.start(ContentKey("content_id", CID))
        stub.flush()
        self.assertNoResult(d)
        clock.advance(10)
        self.failureResultOf(d, EngineTimeout)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_playback_error_page_is_not_video(self) -> None:
        client, stub, _, _ = self.make(answer(500, raw=b"<html>engine exploded</html>"))
        d = client.open_playback(_info())
        stub.flush()
        f = self.failureResultOf(d, EngineError)
        self.assertIn("500", str(f.value))

    def test_playback_200_returns_the_unread_response(self) -> None:
        client, stub, _, _ = self.make(answer(200, raw=b"\x47" * 188))
        d = client.open_playback(_info())
        stub.flush()
        self.assertEqual(self.successResultOf(d).code, 200)

    def test_stop_sends_method_stop_to_the_command_url(self) -> None:
        client, stub, res, _ = self.make(answer(200, {"response": "ok", "error": None}))
        d = client.stop(_info())
        stub.flush()
        self.successResultOf(d)
        [seen] = res.seen
        self.assertEqual(seen["path"], "/ace/cmd/x/tok")
        self.assertEqual(seen["args"]["method"], ["stop"])

    def test_stop_is_bounded(self) -> None:
        client, stub, _, clock = self.make(lambda r: NOT_DONE_YET)
        d = client.stop(_info())
        stub.flush()
        clock.advance(3)
        self.failureResultOf(d, EngineTimeout)

    def test_oversized_answer_is_refused(self) -> None:
        client, stub, _, _ = self.make(answer(200, raw=b"x" * (300 * 1024)))
        d = client.start(ContentKey("content_id", CID))
        stub.flush()
        self.failureResultOf(d, EngineError)

    def test_unusable_url_in_answer(self) -> None:
        bad = {"response": {"playback_url": "/relative", "stat_url": "x", "command_url": "y"}, "error": None}
        client, stub, _, _ = self.make(answer(200, bad))
        d = client.start(ContentKey("content_id", CID))
        stub.flush()
        self.failureResultOf(d, EngineError)


class AddressTests(SynchronousTestCase):
    def test_ipv6_netloc(self) -> None:
        a = EngineAddress("http", "::1", 6878)
        self.assertEqual(a.url, "http://[::1]:6878")
        self.assertEqual(a.rewrite("http://127.0.0.1:6878/ace/r/a/b?x=1"), "http://[::1]:6878/ace/r/a/b?x=1")


def _info() -> PlaybackInfo:
    return PlaybackInfo(
        playback_url="http://engine.lan:16878/ace/r/x/tok",
        stat_url="http://engine.lan:16878/ace/stat/x/tok",
        command_url="http://engine.lan:16878/ace/cmd/x/tok",
        infohash="x",
        playback_session_id="2" * 40,
        is_live=1,
    )


