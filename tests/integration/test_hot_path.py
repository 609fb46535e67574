"""
The relay's hot path on real loopback sockets, so the tests see what the
reactor and the kernel see: ``write_through`` sends a player's piece at once
when the player's TCP transport holds nothing (and queues it behind what it
holds otherwise); engine connections are read in large pieces.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Optional

from twisted.internet import tcp
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from acexy_tw.build import ENGINE_READ_SIZE
from acexy_tw.streaming.mpegts import PACKET_SIZE
from acexy_tw.streaming.upstream import EngineConnection
from acexy_tw._twisted_compat import write_through
from tests.integration.harness import Player, reactor, sim_engine, start_proxy, within


class _Server(Protocol):
    def __init__(self, connected: Deferred) -> None:
        self._connected = connected

    def connectionMade(self) -> None:
        self._connected.callback(self.transport)


class _Reader(Protocol):
    """Collects everything; ``when(n)`` fires once ``n`` bytes have arrived."""

    def __init__(self) -> None:
        self.data = bytearray()
        self._want: Optional[tuple[int, Deferred]] = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self._check()

    def when(self, n: int) -> Deferred:
        d: Deferred = Deferred()
        self._want = (n, d)
        self._check()
        return d

    def _check(self) -> None:
        if self._want is not None and len(self.data) >= self._want[0]:
            d = self._want[1]
            self._want = None
            d.callback(bytes(self.data))


class WriteThroughTests(TestCase):
    async def _pair(self) -> tuple[Any, _Reader]:
        """A server-side TCP transport (what a player's HTTP channel writes to) and its reader."""
        connected: Deferred = Deferred()
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(lambda: _Server(connected))
        )
        self.addCleanup(port.stopListening)
        reader = _Reader()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), reader)
        transport = await within(connected)
        self.addCleanup(transport.abortConnection)
        self.addCleanup(reader.transport.abortConnection)
        return transport, reader

    async def test_sent_at_once_when_nothing_is_queued(self):
        transport, reader = await self._pair()
        write_through(transport, b"a" * 4000)
        # Sent by the call itself: the transport never asked the reactor to write.
        self.assertNotIn(transport, reactor.getWriters())
        self.assertEqual(await within(reader.when(4000)), b"a" * 4000)

    async def test_queued_behind_what_the_transport_holds(self):
        transport, reader = await self._pair()
        transport.write(b"1" * 1000)  # queued until the next reactor round
        write_through(transport, b"2" * 1000)
        self.assertIn(transport, reactor.getWriters())
        self.assertEqual(await within(reader.when(2000)), b"1" * 1000 + b"2" * 1000)

    async def test_what_the_socket_does_not_take_is_queued_in_order(self):
        transport, reader = await self._pair()
        big = bytes(range(256)) * (8 * 4096)  # 8 MiB: more than loopback takes at once
        write_through(transport, big)
        self.assertIn(transport, reactor.getWriters())  # the rest waits in Twisted's queue
        write_through(transport, b"tail")
        self.assertEqual(await within(reader.when(len(big) + 4)), big + b"tail")

    async def test_a_closing_transport_takes_the_ordinary_path(self):
        transport, reader = await self._pair()
        transport.write(b"x" * 100)
        transport.loseConnection()
        write_through(transport, b"y" * 100)  # what write() does while closing: kept queued
        self.assertEqual(await within(reader.when(200)), b"x" * 100 + b"y" * 100)

    def test_anything_but_a_tcp_transport_gets_write(self):
        written = []

        class Other:
            def write(self, data: bytes) -> None:
                written.append(data)

        write_through(Other(), b"piece")
        self.assertEqual(written, [b"piece"])


class PlayersWrittenThroughTests(TestCase):
    async def test_players_that_keep_up_cost_no_reactor_round_per_piece(self):
        """
        Every engine piece reaches a reading player by a direct send: its
        transport asks the reactor to write only for the response headers, not
        once per piece (which is what costs two epoll_ctl calls per player per
        piece without write-through).
        """
        engine = sim_engine(self, bitrate=8_000_000)  # a piece every 25 ms
        proxy = await start_proxy(self, engine)
        asked: Counter = Counter()
        original = tcp.Server.startWriting

        def counting(transport: Any) -> None:
            if transport.getHost().port == proxy.port:
                asked[id(transport)] += 1
            original(transport)

        self.patch(tcp.Server, "startWriting", counting)
        players = [await Player.open(self, proxy.stream_url()) for _ in range(2)]
        await gatherResults([p.when_received(2000 * PACKET_SIZE) for p in players])  # ≥ 15 pieces each
        session = proxy.registry.get_any()
        self.assertEqual(len(session.sinks), 2)
        self.assertEqual(len(asked), 2)
        self.assertLessEqual(max(asked.values()), 3, asked)


class EngineReadSizeTests(TestCase):
    async def test_a_flat_out_engine_is_read_in_pieces_larger_than_twisteds_64_KiB(self):
        # The engine writes 1 MiB chunks as fast as it can; what one recv()
        # returns bounds what one EngineConnection._data call can carry.
        engine = sim_engine(self, bitrate=None, chunk=1024 * 1024)
        proxy = await start_proxy(self, engine)
        sizes: list[int] = []
        original = EngineConnection._data

        def recording(connection: Any, data: bytes) -> None:
            sizes.append(len(data))
            original(connection, data)

        self.patch(EngineConnection, "_data", recording)
        player = await Player.open(self, proxy.stream_url())
        await player.when_received(16 * 1024 * 1024)
        self.assertGreater(max(sizes), 64 * 1024)
        self.assertLessEqual(max(sizes), ENGINE_READ_SIZE)
