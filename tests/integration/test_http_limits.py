"""
Issue #12, the HTTP side, over real loopback sockets against the real service:
request bodies refused before they are read (413), 1,000 HEADs with an 8 KB
path and a token leave a small log without the token, and 200 slow
connections neither keep their sockets past ACEXY_HEADER_TIMEOUT nor make
/healthz fail with ACEXY_MAX_CONNECTIONS small.

Each test prints its figures (``pytest -s``): bytes the proxy read, open
descriptors, times to close.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from typing import Any, Optional

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import globalLogPublisher, textFileLogObserver
from twisted.trial.unittest import TestCase

from acexy_tw.streaming.mpegts import PACKET_SIZE
from acexy_tw.web.server import HEALTH_SLOTS, AcexyChannel
from tests.integration.harness import Player, RawClient, cid, reactor, sim_engine, start_proxy, wait_until, within

TOKEN = "s3cr&t#to+ken%"
QUOTED = "s3cr%26t%23to%2Bken%25"


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Raw(RawClient):
    """A raw TCP client: what it sent, what it got, when it was closed."""

    def __init__(self, first: bytes = b"") -> None:
        super().__init__()
        self.first = first
        self.received = bytearray()
        self.sent = 0
        self.opened_at = self.closed_at = 0.0
        self._waiters: list[tuple[Any, Deferred]] = []

    @classmethod
    async def open(cls, test: Any, port: int, first: bytes = b"") -> "Raw":
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        client = await within(connectProtocol(endpoint, cls(first)))
        test.addCleanup(client.hang_up)
        return client

    def connectionMade(self) -> None:
        self.opened_at = time.monotonic()
        if self.first:
            self.write(self.first)

    def write(self, data: bytes) -> None:
        if not self.closed.called:
            self.sent += len(data)
            self.transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        for predicate, d in list(self._waiters):
            if predicate():
                self._waiters.remove((predicate, d))
                d.callback(bytes(self.received))

    def connectionLost(self, reason: Any = None) -> None:
        self.closed_at = time.monotonic()
        for _, d in self._waiters:
            d.callback(bytes(self.received))
        self._waiters = []
        super().connectionLost(reason)

    def when(self, marker: bytes, count: int = 1) -> Deferred:
        """Fires once ``marker`` was received ``count`` times in all (or the connection closed)."""

        def predicate() -> bool:
            return self.received.count(marker) >= count

        if predicate() or self.closed.called:
            return succeed(bytes(self.received))
        d: Deferred = Deferred()
        self._waiters.append((predicate, d))
        return within(d)

    def status(self) -> Optional[int]:
        parts = bytes(self.received).split(b" ", 2)
        return int(parts[1]) if len(parts) > 2 and parts[0].startswith(b"HTTP/") else None


class Zeros:
    """Streams zeros into a Raw client as fast as its socket takes them, until closed or ``limit``."""

    def __init__(self, client: Raw, limit: int = 256 * 1024 * 1024, piece: int = 64 * 1024) -> None:
        self.client, self.limit, self.piece = client, limit, b"\0" * piece
        self.paused = False
        client.transport.registerProducer(self, True)
        self._schedule()

    def _schedule(self) -> None:
        reactor.callLater(0, self._tick)

    def _tick(self) -> None:
        while not self.paused and not self.client.closed.called and self.client.sent < self.limit:
            self.client.write(self.piece)
        if not self.paused and not self.client.closed.called and self.client.sent < self.limit:
            self._schedule()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._schedule()

    def stopProducing(self) -> None:
        self.paused = True


class ReadCounter:
    """Counts the bytes every AcexyChannel of the process is handed (what the proxy read)."""

    def __init__(self, test: TestCase) -> None:
        self.bytes = 0
        real = AcexyChannel.dataReceived
        counter = self

        def counting(channel: Any, data: bytes) -> None:
            counter.bytes += len(data)
            real(channel, data)

        test.patch(AcexyChannel, "dataReceived", counting)


class BodyTests(TestCase):
    """Point 1: 413 and a close before the body is read or stored; never 100 Continue."""

    async def _refused(self, head: bytes) -> tuple[Raw, ReadCounter, float]:
        engine = sim_engine(self)
        proxy = await start_proxy(self, engine)
        counter = ReadCounter(self)
        before = set(os.listdir(tempfile.gettempdir()))
        client = await Raw.open(self, proxy.port, head)
        Zeros(client)
        await client.when_closed()
        took = client.closed_at - client.opened_at
        self.assertEqual(set(os.listdir(tempfile.gettempdir())) - before, set())
        self.assertEqual(client.status(), 413, bytes(client.received))
        self.assertNotIn(b"100 Continue", bytes(client.received))
        self.assertLess(counter.bytes, 1024 * 1024)
        self.assertEqual(proxy.service.proxy.site.open_connections, 0)
        print(
            f"\n{head.splitlines()[0].decode()} {head.splitlines()[2].decode()}: 413 and closed in {took * 1000:.1f} ms;"
            f" proxy read {counter.bytes} bytes, client pushed {client.sent} bytes into its socket"
        )
        return client, counter, took

    async def test_a_huge_content_length_is_refused_before_its_body(self) -> None:
        await self._refused(b"GET /x HTTP/1.1\r\nHost: p\r\nContent-Length: 99999999999\r\n\r\n")

    async def test_a_chunked_body_is_refused(self) -> None:
        await self._refused(b"GET /x HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n")

    async def test_expect_100_continue_is_never_answered_with_100(self) -> None:
        await self._refused(b"PUT /x HTTP/1.1\r\nHost: p\r\nContent-Length: 99999999999\r\nExpect: 100-continue\r\n\r\n")

    async def test_expect_without_sending_the_body_gets_413_not_100(self) -> None:
        engine = sim_engine(self)
        proxy = await start_proxy(self, engine)
        client = await Raw.open(
            self, proxy.port, b"PUT /x HTTP/1.1\r\nHost: p\r\nContent-Length: 10000000\r\nExpect: 100-continue\r\n\r\n"
        )
        await client.when_closed()
        self.assertEqual(client.status(), 413)
        self.assertNotIn(b"100 Continue", bytes(client.received))


class TokenLogTests(TestCase):
    """Point 5a: 1,000 HEADs with an 8 KB path and a token: a small log, no token in it."""

    async def _heads(self, access_log: bool) -> str:
        engine = sim_engine(self)
        proxy = await start_proxy(self, engine, token=TOKEN, access_log="true" if access_log else "false")
        out = io.StringIO()
        observer = textFileLogObserver(out)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        client = await Raw.open(self, proxy.port)
        path = "/" + "p" * 8192
        codes = {}
        started = time.monotonic()
        for n in range(1000):
            token = QUOTED if n % 10 == 0 else f"wrong-{n}-{QUOTED}"
            mark = len(client.received)
            client.write(f"HEAD {path}?token={token} HTTP/1.1\r\nHost: p\r\n\r\n".encode())
            await client.when(b"\r\n\r\n", n + 1)  # its answer, head only
            code = int(bytes(client.received[mark:]).split(b" ", 2)[1])
            codes[code] = codes.get(code, 0) + 1
        took = time.monotonic() - started
        body_bytes = len(client.received) - sum(
            len(part) + 4 for part in bytes(client.received).split(b"\r\n\r\n")[:-1]
        )
        text = out.getvalue()
        self.assertEqual(codes, {401: 900, 404: 100})
        self.assertEqual(body_bytes, 0)  # no HEAD answer carried a body
        self.assertNotIn(TOKEN, text)
        self.assertNotIn(QUOTED, text)
        print(
            f"\n1000 HEADs, 8 KB path, token, access log {'on' if access_log else 'off'}: {codes} in {took:.2f} s;"
            f" log {len(text.encode())} bytes, {text.count(chr(10))} lines, no token"
        )
        return text

    async def test_without_the_access_log_nothing_is_logged(self) -> None:
        text = await self._heads(access_log=False)
        self.assertLess(len(text), 4096)

    async def test_with_the_access_log_lines_are_short_and_redacted(self) -> None:
        text = await self._heads(access_log=True)  # the URIs are cut before the token, which is redacted anyway
        self.assertEqual(text.count('"HEAD /p'), 1000)
        self.assertLess(len(text), 1000 * 1200)


class SlowlorisTests(TestCase):
    """Point 6: 200 slow connections, ACEXY_MAX_CONNECTIONS=8, ACEXY_HEADER_TIMEOUT=2s."""

    async def test_slow_connections_are_cut_and_healthz_keeps_answering(self) -> None:
        engine = sim_engine(self)
        proxy = await start_proxy(self, engine, max_connections="8", header_timeout="2s")
        site = proxy.service.proxy.site
        fds_before = open_fds()
        slow = []
        peak = [0]

        def sample() -> None:
            peak[0] = max(peak[0], site.open_connections)

        sampler = LoopingCall(sample)
        sampler.clock = reactor
        sampler.start(0.01)
        self.addCleanup(lambda: sampler.running and sampler.stop())
        for n in range(200):
            slow.append(await Raw.open(self, proxy.port, b"GET /ace/getstream?id=" + cid(n).encode()[:4]))
        trickle = LoopingCall(lambda: [c.write(b"a") for c in slow if not c.closed.called])
        trickle.clock = reactor
        trickle.start(0.2)  # a byte every 0.2 s on each: an idle timer would never fire
        self.addCleanup(lambda: trickle.running and trickle.stop())
        fds_during = open_fds()
        t0 = time.monotonic()
        probe = await Raw.open(self, proxy.port, b"GET /healthz HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")
        await probe.when_closed()
        healthz_ms = (time.monotonic() - t0) * 1000
        self.assertEqual(probe.status(), 200, bytes(probe.received))
        for c in slow:
            await c.when_closed(seconds=10)
        trickle.stop()
        lifetimes = sorted(c.closed_at - c.opened_at for c in slow)
        kept = [c for c in slow if c.closed_at - c.opened_at > 1.0]  # not cut to make room: the deadline cut them
        await wait_until(lambda: site.open_connections == 0, "the proxy to close every slow connection")
        sampler.stop()
        fds_after = open_fds()
        self.assertLessEqual(peak[0], 8 + HEALTH_SLOTS)
        self.assertGreaterEqual(site.evicted, 190)
        self.assertTrue(kept)
        for c in kept:
            self.assertLess(c.closed_at - c.opened_at, 2.0 + 1.5)  # a deadline: 2 s, not an idle timer
            self.assertEqual(bytes(c.received), b"")
        self.assertLessEqual(fds_after, fds_before + 2)
        print(
            f"\n200 slow connections (a byte per 0.2 s each), max_connections=8, header_timeout=2s:"
            f" proxy-side open connections peak {peak[0]}; process fds before {fds_before},"
            f" with all 200 opened {fds_during} (clients of this process included), after {fds_after};"
            f" /healthz 200 in {healthz_ms:.1f} ms; {site.evicted} cut to make room"
            f" (lifetime min {lifetimes[0] * 1000:.1f} ms), {len(kept)} cut by the deadline after"
            f" {min(c.closed_at - c.opened_at for c in kept):.2f}-{max(c.closed_at - c.opened_at for c in kept):.2f} s"
        )

    async def test_past_the_cap_with_every_connection_busy_503_at_once(self) -> None:
        engine = sim_engine(self, bitrate=2_000_000)
        proxy = await start_proxy(self, engine, max_connections="8")
        site = proxy.service.proxy.site
        players = []
        for n in range(8):
            p = await Player.open(self, proxy.stream_url(cid(n)))
            self.assertEqual(p.code, 200)
            players.append(p)
        await wait_until(lambda: site.open_connections == 8, "8 players served")
        spare = [await Raw.open(self, proxy.port) for _ in range(HEALTH_SLOTS)]
        await wait_until(lambda: site.open_connections == 8 + HEALTH_SLOTS, "the health slots taken")
        t0 = time.monotonic()
        over = await Raw.open(self, proxy.port)
        await over.when_closed()
        took = (time.monotonic() - t0) * 1000
        self.assertEqual(over.status(), 503)
        self.assertEqual(site.refused, 1)
        spare[0].write(b"GET /healthz HTTP/1.1\r\nHost: p\r\n\r\n")
        self.assertIn(b"200 OK", await spare[0].when(b"\r\n\r\n"))
        spare[1].write(f"GET /ace/getstream?id={cid(99)} HTTP/1.1\r\nHost: p\r\n\r\n".encode())
        await spare[1].when_closed()
        self.assertEqual(spare[1].status(), 503)
        for p in players:  # the players kept streaming
            await p.when_received(len(p.received) + 10 * PACKET_SIZE)
        print(f"\nmax_connections=8 all streaming + {HEALTH_SLOTS} health slots taken: 503 and closed in {took:.1f} ms")
