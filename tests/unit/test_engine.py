"""EngineClient against in-memory engines (treq's StubTreq), timeouts on a Clock."""

from __future__ import annotations

from typing import Any, Callable

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import NOT_DONE_YET

from acexy_tw import _twisted_compat
from acexy_tw.build import make_pool
from acexy_tw.content import ContentKey
from acexy_tw.engine import (
    MAX_HEADER_BYTES,
    MAX_HEADERS,
    EngineAddress,
    EngineClient,
    EngineError,
    EngineTimeout,
    PlaybackInfo,
    _text,
    engine_query,
)
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


    def test_start_url_is_encoded_once_and_the_proxy_owns_format_and_pid(self) -> None:
        client, stub, res, _ = self.make(start_answer())
        uris: list[bytes] = []
        handler = res.handler
        res.handler = lambda request: (uris.append(request.uri), handler(request))[1]
        key = ContentKey("content_id", CID, (("preferred_audio_language", "eng&accinj=1"),))
        d = client.start(key)
        stub.flush()
        self.successResultOf(d)
        [uri] = uris
        self.assertIn(b"preferred_audio_language=eng%26accinj%3D1", uri)
        [seen] = res.seen
        self.assertNotIn("accinj", seen["args"])
        self.assertEqual(seen["args"]["preferred_audio_language"], ["eng&accinj=1"])
        self.assertEqual(sorted(seen["args"]), ["content_id", "format", "pid", "preferred_audio_language"])

    def test_engine_query_never_takes_format_or_pid_from_the_key(self) -> None:
        key = ContentKey("content_id", CID, (("FORMAT", "hls"), ("pid", "mine"), ("Pid", "x")))
        self.assertEqual(engine_query(key, "p1"), f"format=json&content_id={CID}&pid=p1")

    def test_engine_error_text_is_escaped(self) -> None:
        evil = "no\r\nX-Injected: 1\x1b[2J\x00\u202e"
        client, stub, _, _ = self.make(answer(200, {"response": None, "error": evil}))
        d = client.start(ContentKey("content_id", CID))
        stub.flush()
        text = str(self.failureResultOf(d, EngineError).value)
        self.assertTrue(text.isprintable(), text)
        self.assertIn("no\\x0d\\x0aX-Injected: 1\\x1b[2J\\x00\\u202e", text)

    def test_engine_error_page_text_is_escaped(self) -> None:
        for route in ("start", "playback"):
            client, stub, _, _ = self.make(answer(500, raw=b"boom\r\n\x1b[31mred\x07"))
            d = client.start(ContentKey("content_id", CID)) if route == "start" else client.open_playback(_info())
            stub.flush()
            text = str(self.failureResultOf(d, EngineError).value)
            self.assertTrue(text.isprintable(), (route, text))
            self.assertIn("boom\\x0d\\x0a\\x1b[31mred\\x07", text)

    def test_engine_stop_error_text_is_escaped(self) -> None:
        client, stub, _, _ = self.make(answer(200, {"response": None, "error": "x\ny"}))
        d = client.stop(_info())
        stub.flush()
        self.assertEqual(str(self.failureResultOf(d, EngineError).value), "engine stop error: x\\x0ay")


class TextTests(SynchronousTestCase):
    def test_text_escapes_what_is_not_printable(self) -> None:
        self.assertEqual(_text(b"  a\tb\r\n  "), "a\\x09b")
        self.assertEqual(_text("\u202eabc\U000e0001"), "\\u202eabc\\U000e0001")
        self.assertEqual(_text(b"\xff\xfe"), "\ufffd\ufffd")  # replacement characters are printable

    def test_text_is_bounded(self) -> None:
        self.assertEqual(_text(b"x" * 1000, 10), "x" * 10 + "...")
        self.assertEqual(_text("y" * 10, 10), "y" * 10)


class HeaderLimitTests(SynchronousTestCase):
    """The engine pool's protocol refuses responses with too many headers."""

    def respond(self, head: bytes, limit: tuple[int, int] = (MAX_HEADERS, MAX_HEADER_BYTES)) -> tuple[list, Any]:
        from twisted.internet.testing import StringTransport
        from twisted.web._newclient import Request
        from twisted.web.http_headers import Headers

        protocol = _twisted_compat._quiet_factory_type().protocol_type(lambda p: None, None, limit)
        transport = StringTransport()
        protocol.makeConnection(transport)
        outcome: list = []
        protocol.request(Request(b"GET", b"/", Headers({b"host": [b"e"]}), None)).addBoth(outcome.append)
        protocol.dataReceived(head)
        return outcome, transport

    def test_the_installed_twisted_takes_the_limit(self) -> None:
        self.assertTrue(_twisted_compat.HAS_HEADER_LIMIT)

    def test_the_pool_is_built_with_the_limit(self) -> None:
        from twisted.internet.testing import MemoryReactorClock

        pool = make_pool(MemoryReactorClock())
        self.assertEqual(pool._factory.keywords["header_limit"], (MAX_HEADERS, MAX_HEADER_BYTES))

    def test_up_to_the_limit_is_fine(self) -> None:
        head = b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(MAX_HEADERS - 1))
        outcome, transport = self.respond(head + b"Content-Length: 0\r\n\r\n")
        self.assertEqual(outcome[0].code, 200)
        self.assertEqual(len(list(outcome[0].headers.getAllRawHeaders())), MAX_HEADERS - 1)

    def test_too_many_headers_fail_and_close(self) -> None:
        from twisted.web.client import ResponseFailed

        outcome, transport = self.respond(b"HTTP/1.1 200 OK\r\n" + b"X: 1\r\n" * (MAX_HEADERS + 1) + b"\r\n")
        [failure] = outcome
        failure.trap(ResponseFailed)
        self.assertTrue(any(r.check(_twisted_compat.ResponseHeadersTooLarge) for r in failure.value.reasons))
        self.assertTrue(transport.disconnecting)

    def test_too_many_header_bytes_fail(self) -> None:
        line = b"X: " + b"v" * 8000 + b"\r\n"
        outcome, transport = self.respond(b"HTTP/1.1 200 OK\r\n" + line * 9, limit=(MAX_HEADERS, 64 * 1024))
        self.assertTrue(outcome and outcome[0].check(Exception) and transport.disconnecting)

    def test_fallback_without_the_parser_hook_is_an_unbounded_pool(self) -> None:
        from twisted.internet.testing import MemoryReactorClock

        self.patch(_twisted_compat, "_limit_header_lines", lambda parser, lines, size: None)
        self.assertFalse(_twisted_compat._probe_header_limit())
        pool = make_pool(MemoryReactorClock())
        self.assertIsNone(pool._factory.keywords["header_limit"])

    def test_continuation_lines_count(self) -> None:
        head = b"HTTP/1.1 200 OK\r\nX: 1\r\n" + b" more\r\n" * (MAX_HEADERS + 1)
        outcome, transport = self.respond(head)
        self.assertTrue(outcome and transport.disconnecting)


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


