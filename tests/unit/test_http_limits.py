"""
Issue #12, the HTTP side, deterministic: request bodies refused before they
are read (413), the header deadline driven by the MemoryReactorClock that
build() was given, the connection cap, the token guard's refusals and what it
records, and log lines without tokens. The same points over real sockets are
in tests/integration/test_http_limits.py.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile

from twisted.internet.testing import StringTransport
from twisted.logger import LogPublisher, globalLogPublisher, textFileLogObserver
from twisted.python import logfile
from twisted.trial.unittest import SynchronousTestCase

from acexy_tw import _twisted_compat as compat
from acexy_tw import logs
from acexy_tw.service import AcexyService
from acexy_tw.testing import CID, InMemoryProxy
from acexy_tw.web.server import HEALTH_SLOTS, LOGGED_URI_LIMIT, AcexyRequest

TOKEN = "s3cr&t#to+ken%"  # needs URL-encoding in a query
QUOTED = "s3cr%26t%23to%2Bken%25"


class Raw:
    """A connection on the proxy's real Site, fed raw bytes."""

    def __init__(self, site, first: bytes = b"") -> None:
        self.channel = site.buildProtocol(None)
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)
        if first:
            self.channel.dataReceived(first)

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def value(self) -> bytes:
        return self.transport.value()

    def status(self) -> int:
        return int(self.value().split(b" ", 2)[1])

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting or self.transport.disconnected)

    def lost(self) -> None:
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        self.channel.connectionLost(Failure(ConnectionDone()))


def temp_files() -> set:
    return set(os.listdir(tempfile.gettempdir()))


class BodyTests(SynchronousTestCase):
    """Point 1: a request with a body is refused before the body is read or stored."""

    def setUp(self) -> None:
        self.proxy = InMemoryProxy()
        self.routed = []
        real = AcexyRequest.process
        self.patch(AcexyRequest, "process", lambda req: (self.routed.append(req.path), real(req)))

    def test_content_length_is_413_and_close_before_the_body(self) -> None:
        before = temp_files()
        c = Raw(self.proxy.site, b"GET /x HTTP/1.1\r\nHost: p\r\nContent-Length: 99999999999\r\n\r\n")
        self.assertEqual(c.status(), 413)
        self.assertTrue(c.closed)
        c.send(b"\0" * 1_000_000)  # what arrives before the close is dropped, not stored
        self.assertEqual(self.routed, [])
        self.assertEqual(c.channel.requests, [])
        self.assertEqual(temp_files() - before, set())
        self.assertNotIn(b"100 Continue", c.value())

    def test_chunked_body_is_413(self) -> None:
        c = Raw(self.proxy.site, b"POST /ace/getstream HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        self.assertEqual(c.status(), 413)
        self.assertTrue(c.closed)
        self.assertEqual(self.routed, [])

    def test_any_transfer_encoding_is_413(self) -> None:
        c = Raw(self.proxy.site, b"GET /healthz HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: identity\r\n\r\n")
        self.assertEqual(c.status(), 413)
        self.assertEqual(self.routed, [])

    def test_expect_100_continue_with_a_body_gets_413_never_100(self) -> None:
        c = Raw(self.proxy.site, b"PUT /x HTTP/1.1\r\nHost: p\r\nContent-Length: 5000000\r\nExpect: 100-continue\r\n\r\n")
        self.assertEqual(c.status(), 413)
        self.assertNotIn(b"100 Continue", c.value())

    def test_expect_without_a_body_is_served_without_100(self) -> None:
        c = Raw(self.proxy.site, b"GET /healthz HTTP/1.1\r\nHost: p\r\nExpect: 100-continue\r\n\r\n")
        self.assertEqual(c.status(), 200)
        self.assertNotIn(b"100 Continue", c.value())
        self.assertFalse(c.closed)

    def test_content_length_zero_is_fine(self) -> None:
        c = Raw(self.proxy.site, b"GET /healthz HTTP/1.1\r\nHost: p\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(c.status(), 200)
        self.assertEqual(self.routed, [b"/healthz"])

    def test_refused_before_the_token_check(self) -> None:
        proxy = InMemoryProxy(token=TOKEN)
        c = Raw(proxy.site, b"GET /ace/getstream HTTP/1.1\r\nHost: p\r\nContent-Length: 10\r\n\r\n")
        self.assertEqual(c.status(), 413)


class HeaderDeadlineTests(SynchronousTestCase):
    """Point 6: complete headers within ACEXY_HEADER_TIMEOUT of the connection, bytes or not."""

    def setUp(self) -> None:
        self.proxy = InMemoryProxy(header_timeout=10)
        self.clock = self.proxy.clock

    def test_a_byte_a_second_does_not_keep_the_connection(self) -> None:
        c = Raw(self.proxy.site)
        request = b"GET /healthz HTTP/1.1\r\nHost: p\r\nX-Slow: " + b"a" * 100
        for n in range(9):
            c.send(request[n : n + 1])
            self.clock.advance(1)
            self.assertFalse(c.closed, n)
        c.send(request[9:10])
        self.clock.advance(1)  # 10 s since the connection started
        self.assertTrue(c.transport.disconnected)  # aborted: the descriptor is freed at once
        self.assertEqual(c.value(), b"")
        self.assertEqual(self.proxy.site.open_connections, 0)

    def test_headers_in_time_are_served_and_the_stream_is_not_cut(self) -> None:
        c = Raw(self.proxy.site, b"GET /ace/getstream?id=" + CID.encode() + b" HTTP/1.1\r\nHost: p\r\n\r\n")
        self.proxy.engine.responses[-1].data(b"\x47" * 188) if self.proxy.engine.responses else None
        self.clock.advance(60)
        self.assertFalse(c.closed)

    def test_a_kept_alive_connection_gets_a_new_deadline_for_its_next_request(self) -> None:
        c = Raw(self.proxy.site)
        self.clock.advance(9)
        c.send(b"GET /healthz HTTP/1.1\r\nHost: p\r\n\r\n")
        self.assertEqual(c.status(), 200)
        self.clock.advance(9)  # 18 s since the connection, 9 since the response
        self.assertFalse(c.closed)
        c.send(b"GET /heal")
        self.clock.advance(1)
        self.assertTrue(c.transport.disconnected)


class ConnectionCapTests(SynchronousTestCase):
    """Point 6: ACEXY_MAX_CONNECTIONS; slow connections make room, busy ones do not."""

    def setUp(self) -> None:
        self.proxy = InMemoryProxy(max_connections="8")  # the smallest allowed
        self.site = self.proxy.site

    def test_slow_connections_make_room_oldest_first_and_healthz_answers(self) -> None:
        slow = [Raw(self.site, b"GET /ace/getstream?id=") for _ in range(200)]
        self.assertLessEqual(self.site.open_connections, 8)
        self.assertEqual([c.closed for c in slow].count(False), 8)
        self.assertTrue(all(c.transport.disconnected for c in slow[:-8]))
        probe = Raw(self.site, b"GET /healthz HTTP/1.1\r\nHost: p\r\n\r\n")
        self.assertEqual(probe.status(), 200)
        self.assertEqual(self.site.evicted, 193)
        self.assertEqual(self.site.refused, 0)

    def test_busy_connections_are_kept_the_newcomer_gets_503(self) -> None:
        players = [self.proxy.connect() for _ in range(8)]  # streams being served
        extra = [Raw(self.site) for _ in range(HEALTH_SLOTS)]  # let in for /healthz only
        over = Raw(self.site)
        self.assertEqual(over.status(), 503)
        self.assertTrue(over.closed)
        self.assertTrue(all(not p.transport.disconnecting for p in players))
        self.assertEqual(self.site.refused, 1)
        extra[0].send(b"GET /healthz HTTP/1.1\r\nHost: p\r\n\r\n")
        self.assertEqual(extra[0].status(), 200)
        extra[1].send(b"GET /ace/getstream?id=" + CID.encode() + b" HTTP/1.1\r\nHost: p\r\n\r\n")
        self.assertEqual(extra[1].status(), 503)

    def test_closed_connections_free_their_place(self) -> None:
        conns = [Raw(self.site, b"GET /healthz HTTP/1.1\r\nHost: p\r\n\r\n") for _ in range(8)]
        for c in conns:
            c.lost()
        self.assertEqual(self.site.open_connections, 0)


class TokenTests(SynchronousTestCase):
    """Point 5a: refusals, special characters, and request.acexy_token."""

    def setUp(self) -> None:
        self.proxy = InMemoryProxy(token=TOKEN)
        self.seen = []
        real = AcexyRequest.process

        def process(req):
            real(req)
            self.seen.append(req)

        self.patch(AcexyRequest, "process", process)

    def request(self, target: bytes, method: bytes = b"GET", headers: bytes = b"") -> Raw:
        return Raw(self.proxy.site, method + b" " + target + b" HTTP/1.1\r\nHost: p\r\n" + headers + b"\r\n")

    def test_head_refused_is_401_without_a_body(self) -> None:
        c = self.request(b"/ace/getstream?id=x&token=wrong", b"HEAD")
        self.assertEqual(c.status(), 401)
        head, _, body = c.value().partition(b"\r\n\r\n")
        self.assertEqual(body, b"")
        self.assertIn(b"WWW-Authenticate", head)

    def test_get_refused_is_401_with_a_short_text(self) -> None:
        c = self.request(b"/ace/status")
        self.assertEqual(c.status(), 401)
        self.assertIn(b"missing or wrong token", c.value())

    def test_url_encoded_special_characters_and_the_token_recorded(self) -> None:
        c = self.request(b"/ace/status?token=" + QUOTED.encode())
        self.assertEqual(c.status(), 200)
        self.assertEqual(self.seen[-1].acexy_token, TOKEN)

    def test_bearer_with_special_characters(self) -> None:
        c = self.request(b"/ace/status", headers=b"Authorization: Bearer " + TOKEN.encode() + b"\r\n")
        self.assertEqual(c.status(), 200)
        self.assertEqual(self.seen[-1].acexy_token, TOKEN)

    def test_evil_then_good_passes_on_the_good_one(self) -> None:
        c = self.request(b"/ace/status?token=evil-token-x&token=" + QUOTED.encode())
        self.assertEqual(c.status(), 200)
        self.assertEqual(self.seen[-1].acexy_token, TOKEN)
        c = self.request(b"/ace/status?token=evil-token-x&token=evil-token-y")
        self.assertEqual(c.status(), 401)

    def test_healthz_is_open_and_records_no_token(self) -> None:
        c = self.request(b"/healthz")
        self.assertEqual(c.status(), 200)
        self.assertIsNone(self.seen[-1].acexy_token)

    def test_no_token_configured_records_none(self) -> None:
        proxy = InMemoryProxy()
        seen = []
        real = AcexyRequest.process
        self.patch(AcexyRequest, "process", lambda req: (real(req), seen.append(req)))
        Raw(proxy.site, b"GET /ace/status?token=whatever HTTP/1.1\r\nHost: p\r\n\r\n")
        self.assertIsNone(seen[-1].acexy_token)


class RedactionTests(SynchronousTestCase):
    """Point 5a: no log line carries a token."""

    def test_redact(self) -> None:
        cases = {
            "/a?id=1&token=" + QUOTED + "&b=2": "/a?id=1&token=<redacted>&b=2",
            "/a?tok%65n=abc": "/a?tok%65n=<redacted>",
            "/a?token=ab#cd ok": "/a?token=<redacted> ok",
            "Authorization: Bearer " + TOKEN: "Authorization: Bearer <redacted>",
            '"GET /x?token=abc HTTP/1.1" 401 - "http://r/?token=def" "ua"': '"GET /x?token=<redacted> HTTP/1.1" 401 - "http://r/?token=<redacted>" "ua"',
            "/a?id=1&mytoken=2": "/a?id=1&mytoken=2",
        }
        for given, wanted in cases.items():
            self.assertEqual(logs.redact(given), wanted)

    def test_access_log_and_repr_carry_no_token_and_no_8kb_uri(self) -> None:
        proxy = InMemoryProxy(token=TOKEN, access_log=True)
        out = io.StringIO()
        proxy.site._logFile = out  # where startFactory would point it
        proxy.site._logDateTime = "[01/Dec/2026:00:00:00 +0000]"
        path = b"/" + b"p" * 8192 + b"?token=" + QUOTED.encode()
        c = Raw(proxy.site, b"HEAD " + path + b" HTTP/1.1\r\nHost: p\r\nReferer: http://x/?token=" + QUOTED.encode() + b"\r\n\r\n")
        self.assertEqual(c.status(), 404)  # the token was good: the router answered
        line = out.getvalue()
        self.assertNotIn(TOKEN, line)
        self.assertNotIn(QUOTED, line)
        self.assertLess(len(line), 2 * LOGGED_URI_LIMIT + 300)
        request = AcexyRequest(c.channel)
        request.uri = path
        self.assertNotIn(QUOTED, repr(request))
        self.assertLess(len(repr(request)), LOGGED_URI_LIMIT + 200)

    def test_the_acexy_observer_redacts_everything_it_writes(self) -> None:
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(logs, "observer_installed", False)
        for fmt in ("text", "json"):
            self.patch(os, "environ", {**os.environ, "ACEXY_LOG_FORMAT": fmt})
            observer = logs.observer()
            publisher = LogPublisher(observer)
            from twisted.logger import Logger

            Logger(observer=publisher).info("GET {uri}", uri="/x?token=" + TOKEN)
        self.assertNotIn(TOKEN, out.getvalue())
        self.assertGreaterEqual(out.getvalue().count("token=<redacted>"), 2)


class LogFileTests(SynchronousTestCase):
    """Point 8: what SIGHUP reopens (the compat path and its fallback)."""

    def test_the_private_path_is_taken(self) -> None:
        self.assertTrue(compat.HAS_LOG_FILES)

    def test_finds_twistd_logfile_and_reopens_it(self) -> None:
        directory = self.mktemp()
        os.mkdir(directory)
        f = logfile.LogFile("acexy.log", directory, rotateLength=None)
        observer = textFileLogObserver(f)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.addCleanup(f.close)
        self.assertIn(f, compat.log_files())
        os.rename(os.path.join(directory, "acexy.log"), os.path.join(directory, "acexy.log.1"))
        service = AcexyService(InMemoryProxy().proxy, InMemoryProxy().clock)
        self.assertGreaterEqual(service.reopen_logs(), 1)
        self.assertTrue(os.path.exists(os.path.join(directory, "acexy.log")))

    def test_stdout_is_not_a_log_file(self) -> None:
        publisher = LogPublisher(textFileLogObserver(sys.stdout))
        self.assertEqual(compat.log_files(publisher), [])

    def test_fallback_without_the_private_attributes(self) -> None:
        self.patch(compat, "_log_files_checked", None)
        self.patch(compat, "_probe_log_files", lambda: False)
        self.assertEqual(compat.log_files(), [])


class SighupHandlerTests(SynchronousTestCase):
    """Point 8: the service installs the SIGHUP handler on start and removes it on stop."""

    def test_installed_on_start_reactor_safe_and_removed_on_stop(self) -> None:
        import signal

        from twisted.internet.testing import MemoryReactorClock

        class Reactor(MemoryReactorClock):
            def __init__(self) -> None:
                super().__init__()
                self.from_thread: list = []

            def callFromThread(self, f, *args, **kwargs) -> None:
                self.from_thread.append(f)

        previous = signal.getsignal(signal.SIGHUP)
        self.addCleanup(signal.signal, signal.SIGHUP, previous)
        reactor = Reactor()
        proxy = InMemoryProxy()
        service = AcexyService(proxy.proxy, reactor)
        service.startService()
        self.assertNotEqual(signal.getsignal(signal.SIGHUP), previous)
        os.kill(os.getpid(), signal.SIGHUP)  # the process survives; the work goes to the reactor
        self.assertEqual([f.__name__ for f in reactor.from_thread], ["reopen_logs"])
        self.assertEqual(reactor.from_thread[0](), 0)  # nothing to reopen here
        service.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), previous)
