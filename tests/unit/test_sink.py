"""
ClientSink's send coalescing, on task.Clock: the first piece at once, then
pieces held until the size bound or the latency cap (one timer for every
sink on the clock, cancelled when none is due), what was held first into
the backlog when the player blocks, all of it before a clean end, nothing
left behind when the player goes.
"""

from __future__ import annotations

from typing import Any, List

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from acexy_tw.streaming.sink import COALESCE_DELAY, ClientSink, Coalescer, chunk, chunk_parts, coalescer_for

DELAY = 0.05
BOUND = 1000


class Channel:
    def __init__(self) -> None:
        self.transport = StringTransport()


class Request:
    """What a sink needs of twisted.web's Request: chunked HTTP/1.1 on a StringTransport."""

    chunked = True

    def __init__(self) -> None:
        self.channel = Channel()
        self.producer: Any = None
        self.writes: List[bytes] = []  # Request.write: the first one carries the headers

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        self.channel.transport.write(b"".join(chunk(data)))

    @property
    def sent(self) -> bytes:
        return self.channel.transport.value()


def make(clock: Clock, **kw: Any) -> tuple[ClientSink, Request]:
    request = Request()
    options: dict = dict(coalesce=True, coalesce_bytes=BOUND, coalesce_delay=DELAY)
    options.update(kw)
    sink = ClientSink(request, clock=clock, max_backlog=1 << 20, stuck_timeout=0, high_water=4096, **options)
    return sink, request


def chunks(wire: bytes) -> List[bytes]:
    """The chunks' data, in order (chunked framing checked)."""
    out, pos = [], 0
    while pos < len(wire):
        end = wire.index(b"\r\n", pos)
        size = int(wire[pos:end], 16)
        out.append(wire[end + 2 : end + 2 + size])
        assert wire[end + 2 + size : end + 4 + size] == b"\r\n"
        pos = end + 4 + size
    return out


def test_the_first_piece_goes_at_once_then_pieces_wait_for_the_latency_cap() -> None:
    clock = Clock()
    s, r = make(clock)
    s.deliver(b"a" * 10)
    assert chunks(r.sent) == [b"a" * 10]  # the first write (headers) is never held
    s.deliver(b"b" * 10, chunk(b"b" * 10))
    clock.advance(DELAY / 2)
    s.deliver(b"c" * 10)
    assert chunks(r.sent) == [b"a" * 10]
    assert s.pending_bytes == 20
    clock.advance(DELAY / 2 - 1e-6)
    assert chunks(r.sent) == [b"a" * 10]
    clock.advance(2e-6)  # the cap, counted from the first piece held
    assert chunks(r.sent) == [b"a" * 10, b"b" * 10 + b"c" * 10]  # one chunk, one send
    assert s.pending_bytes == 0
    assert s.bytes_sent == 30
    assert clock.getDelayedCalls() == []


def test_no_piece_is_held_longer_than_the_cap() -> None:
    clock = Clock()
    s, r = make(clock)
    s.deliver(b"x")
    delivered: List[tuple[float, bytes]] = []
    for i in range(60):  # a small piece every 7 ms: only the cap sends them
        piece = bytes([65 + i % 26]) * 7
        s.deliver(piece)
        delivered.append((clock.seconds(), piece))
        for step in (0.003, 0.004):
            clock.advance(step)
            body = b"".join(chunks(r.sent))
            due = b"x" + b"".join(p for t, p in delivered if clock.seconds() - t >= DELAY - 1e-9)
            assert body.startswith(due), (i, clock.seconds())
    clock.advance(DELAY)
    assert b"".join(chunks(r.sent)) == b"x" + b"".join(p for _, p in delivered)
    assert len(chunks(r.sent)) < 20  # ~7 pieces per send, not one each
    assert clock.getDelayedCalls() == []


def test_the_size_bound_sends_at_once_and_cancels_the_timer() -> None:
    clock = Clock()
    s, r = make(clock)
    s.deliver(b"0")
    s.deliver(b"a" * 600)
    assert len(clock.getDelayedCalls()) == 1
    s.deliver(b"b" * 600)  # 1200 >= BOUND
    assert chunks(r.sent) == [b"0", b"a" * 600 + b"b" * 600]
    assert clock.getDelayedCalls() == []


def test_a_piece_as_large_as_the_bound_goes_at_once() -> None:
    clock = Clock()
    s, r = make(clock)
    s.deliver(b"0")
    big = b"z" * BOUND
    s.deliver(big, chunk_parts(big))
    assert chunks(r.sent) == [b"0", big]
    assert clock.getDelayedCalls() == []


def test_the_timer_is_cancelled_when_the_player_goes() -> None:
    clock = Clock()
    s, r = make(clock)
    s.deliver(b"0")
    s.deliver(b"held")
    assert len(clock.getDelayedCalls()) == 1
    s.stopProducing()  # the connection is gone
    assert clock.getDelayedCalls() == []
    assert s.pending_bytes == 0
    clock.advance(1)
    assert chunks(r.sent) == [b"0"]


def test_the_timer_is_cancelled_when_the_player_is_cut() -> None:
    clock = Clock()
    s, r = make(clock)
    s.deliver(b"0")
    s.deliver(b"held")
    s.cut("test")
    assert clock.getDelayedCalls() == []


def test_a_clean_end_sends_what_was_held_first() -> None:
    clock = Clock()
    s, r = make(clock)
    s.deliver(b"0")
    s.deliver(b"held")
    s.end(True, None)
    assert b"".join(chunks(r.sent)) == b"0held"
    assert clock.getDelayedCalls() == []
    assert s.bytes_sent == 5
    assert s.done.called


def test_held_pieces_go_first_into_the_backlog_when_the_player_blocks() -> None:
    clock = Clock()
    s, r = make(clock)
    s.deliver(b"0")
    s.deliver(b"1" * 10)
    s.deliver(b"2" * 10)
    s.pauseProducing()  # the player's socket is full
    s.deliver(b"3" * 10)
    assert s.pending_bytes == 0
    assert s.backlog_bytes == 30
    assert clock.getDelayedCalls() == []  # nothing due: the backlog waits for resume
    s.resumeProducing()
    assert b"".join(chunks(r.sent)) == b"0" + b"1" * 10 + b"2" * 10 + b"3" * 10
    assert chunks(r.sent)[1:] == [b"1" * 10 + b"2" * 10 + b"3" * 10]  # drained as one chunk
    assert s.backlog_bytes == 0


def test_the_cap_firing_while_blocked_queues_instead_of_writing() -> None:
    clock = Clock()
    s, r = make(clock)
    s.deliver(b"0")
    s.deliver(b"held")
    s.pauseProducing()
    clock.advance(DELAY)
    assert chunks(r.sent) == [b"0"]
    assert s.backlog_bytes == 4
    s.resumeProducing()
    assert chunks(r.sent) == [b"0", b"held"]


def test_a_drained_backlog_leaves_in_writes_of_the_size_bound() -> None:
    clock = Clock()
    s, r = make(clock)
    s.deliver(b"0")
    s.pauseProducing()
    for i in range(10):
        s.deliver(bytes([97 + i]) * 300)
    s.resumeProducing()
    sent = chunks(r.sent)[1:]
    assert b"".join(sent) == b"".join(bytes([97 + i]) * 300 for i in range(10))
    assert [len(c) for c in sent] == [1200, 1200, 600]


def test_one_timer_for_every_sink_on_the_clock() -> None:
    clock = Clock()
    shared = Coalescer(clock, DELAY)
    sinks = [make(clock, coalescer=shared) for _ in range(5)]
    for s, _ in sinks:
        s.deliver(b"0")
        s.deliver(b"held")
    assert len(clock.getDelayedCalls()) == 1
    assert len(shared) == 5
    sinks[0][0].stopProducing()
    assert len(clock.getDelayedCalls()) == 1  # the others are still due
    clock.advance(DELAY)
    for s, r in sinks[1:]:
        assert chunks(r.sent) == [b"0", b"held"]
    assert clock.getDelayedCalls() == []
    assert not shared.armed


def test_the_default_coalescer_is_one_per_clock_and_delay() -> None:
    clock = Clock()
    assert coalescer_for(clock, 0.05) is coalescer_for(clock, 0.05)
    assert coalescer_for(clock, 0.05) is not coalescer_for(clock, 0.1)
    assert coalescer_for(clock, 0.05) is not coalescer_for(Clock(), 0.05)


def test_players_not_on_a_tcp_socket_are_written_piece_by_piece() -> None:
    clock = Clock()
    request = Request()  # a StringTransport: no system call to save
    s = ClientSink(request, clock=clock, max_backlog=1 << 20, stuck_timeout=0)
    for piece in (b"a", b"b", b"c"):
        s.deliver(piece)
    assert chunks(request.sent) == [b"a", b"b", b"c"]
    assert clock.getDelayedCalls() == []


def test_coalescing_off_with_a_zero_delay() -> None:
    clock = Clock()
    s, r = make(clock, coalesce=None, coalesce_delay=0)
    s.deliver(b"a")
    s.deliver(b"b")
    assert chunks(r.sent) == [b"a", b"b"]


def test_the_setting_reaches_each_player() -> None:
    from acexy_tw.testing import InMemoryProxy

    assert InMemoryProxy().web.coalesce_delay == COALESCE_DELAY == 0.05  # ACEXY_COALESCE_DELAY's default
    assert InMemoryProxy(coalesce_delay="0").web.coalesce_delay == 0.0  # off
    assert InMemoryProxy(coalesce_delay="20ms").web.coalesce_delay == 0.02


def test_a_chunk_is_its_parts() -> None:
    assert b"".join(chunk(b"hello")) == b"5\r\nhello\r\n"
    assert chunk_parts is chunk
    data = b"x" * 300
    assert chunk(data)[1] is data  # the piece itself: framing copies nothing


def test_http_1_0_players_get_the_held_pieces_joined() -> None:
    clock = Clock()
    s, r = make(clock)
    r.chunked = False
    s.deliver(b"0")
    s.deliver(b"ab")
    s.deliver(b"cd")
    clock.advance(DELAY)
    assert r.writes == [b"0", b"abcd"]
