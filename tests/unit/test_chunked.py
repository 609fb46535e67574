"""
The lean engine-body path: ChunkedDecoder (every way a chunk can be split
across reads, both delivery modes, malformed and cut bodies) and SpanAligner
(every way a packet can be split, alone and behind the decoder), with
property tests over random chunkings and random read splits.
"""

from __future__ import annotations

import itertools
from typing import Any, List, Sequence

import pytest
from hypothesis import given, settings, strategies as st

from acexy_tw.streaming.chunked import ChunkedDecoder, DataLoss, MalformedChunkedData
from acexy_tw.streaming.mpegts import PACKET_SIZE, SpanAligner

# --- helpers ---------------------------------------------------------------------------


def encode(
    payload: bytes,
    sizes: Sequence[int],
    *,
    ext: bytes = b"",
    trailers: Sequence[bytes] = (),
    extra: bytes = b"",
) -> bytes:
    """``payload`` as a chunked body: chunks of ``sizes`` (cycled), each size
    line with ``ext``, the terminal chunk, ``trailers``, the blank line, then
    ``extra`` (bytes after the message)."""
    out, pos = [], 0
    for size in itertools.cycle(sizes):
        if pos >= len(payload):
            break
        piece = payload[pos : pos + size]
        out.append(b"%x%b\r\n%b\r\n" % (len(piece), ext, piece))
        pos += len(piece)
    out.append(b"0%b\r\n" % ext)
    out.extend(t + b"\r\n" for t in trailers)
    out.append(b"\r\n")
    return b"".join(out) + extra


class Sink:
    """Both callbacks of a decoder, recorded."""

    def __init__(self) -> None:
        self.data: List[Any] = []
        self.spans: List[List[Any]] = []
        self.finished: List[bytes] = []

    def decoder(self, spans: bool = False, **kw: Any) -> ChunkedDecoder:
        d = ChunkedDecoder(self.data.append, self.finished.append, **kw)
        if spans:
            d.deliver_spans(self.spans.append)
        return d

    @property
    def body(self) -> bytes:
        return b"".join(bytes(x) for x in self.data) + b"".join(bytes(x) for run in self.spans for x in run)


def feed(decoder: ChunkedDecoder, wire: bytes, cuts: Sequence[int]) -> None:
    """``wire`` in reads cut at ``cuts`` (sorted offsets)."""
    edges = [0, *cuts, len(wire)]
    for a, b in zip(edges, edges[1:]):
        decoder.dataReceived(wire[a:b])


PAYLOAD = bytes(range(256)) * 3  # 768 bytes, every byte value (CR, LF, "0" and ";" in the data too)
WIRE = encode(PAYLOAD[:200], [7, 64, 1, 128], ext=b";name=value", trailers=[b"Expires: never", b"X: 1"])

# --- the decoder: every split --------------------------------------------------------


@pytest.mark.parametrize("spans", [False, True])
def test_every_single_cut_of_a_message_decodes_the_same(spans: bool) -> None:
    # Each offset is one of: inside a size line (and its extension), between
    # its CR and LF, inside a chunk's data, between data and its CRLF, inside
    # that CRLF, inside the terminal chunk, inside a trailer, in the last CRLF.
    for cut in range(1, len(WIRE)):
        sink = Sink()
        feed(sink.decoder(spans), WIRE, [cut])
        assert sink.body == PAYLOAD[:200], cut
        assert sink.finished == [b""], cut


def test_every_pair_of_cuts_of_a_short_message_decodes_the_same() -> None:
    wire = encode(b"abcdefghij", [3, 1], trailers=[b"T: x"])
    for a in range(1, len(wire)):
        for b in range(a, len(wire)):
            for spans in (False, True):
                sink = Sink()
                feed(sink.decoder(spans), wire, [a, b])
                assert (sink.body, sink.finished) == (b"abcdefghij", [b""]), (a, b, spans)


def test_one_byte_at_a_time() -> None:
    sink = Sink()
    feed(sink.decoder(), WIRE, list(range(1, len(WIRE))))
    assert sink.body == PAYLOAD[:200]
    assert sink.finished == [b""]


@pytest.mark.parametrize("line", [b"1f4", b"1F4", b"01f4", b"1f4;a=b;c", b"1f4 ;ext", b"1f4\t;ext"])
def test_chunk_size_lines_split_at_each_byte(line: bytes) -> None:
    wire = line + b"\r\n" + PAYLOAD[:500] + b"\r\n0\r\n\r\n"
    for cut in range(1, len(line) + 2):  # every byte of the line and its CRLF
        sink = Sink()
        feed(sink.decoder(spans=True), wire, [cut])
        assert sink.body == PAYLOAD[:500], (line, cut)


def test_the_crlf_after_data_split_between_cr_and_lf() -> None:
    wire = b"3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n"
    for cut in (6, 7, 8):  # before CR, between CR and LF, after LF
        sink = Sink()
        feed(sink.decoder(), wire, [cut])
        assert sink.body == b"abcdef"


def test_the_zero_length_final_chunk_split_anywhere_and_what_follows_it() -> None:
    wire = b"3\r\nabc\r\n0;last=1\r\nTrailer: yes\r\n\r\nNEXT"
    start = wire.index(b"0;last")
    for cut in range(start, len(wire) - 4):  # (the parser feeds nothing after the end: what follows is its own)
        sink = Sink()
        feed(sink.decoder(), wire, [cut])
        assert sink.body == b"abc", cut
        assert sink.finished == [b"NEXT"], cut


def test_bytes_after_the_message_go_to_the_finish_callback() -> None:
    sink = Sink()
    d = sink.decoder()
    d.dataReceived(encode(b"abc", [2], extra=b"HTTP/1.1 200 OK\r\n"))
    assert sink.body == b"abc"
    assert sink.finished == [b"HTTP/1.1 200 OK\r\n"]
    assert d.state == ChunkedDecoder.FINISHED
    d.noMoreData()  # fine once finished


# --- the decoder: what it delivers, and how -------------------------------------------


def test_a_read_that_is_all_chunk_data_is_delivered_as_it_is() -> None:
    for spans in (False, True):
        sink = Sink()
        d = sink.decoder(spans)
        d.dataReceived(b"10000\r\n")
        read = bytes(range(256)) * 64  # the whole 64 KiB chunk in one read
        d.dataReceived(read)
        got = sink.spans[0][0] if spans else sink.data[0]
        assert got is read  # not a slice, not a copy


def test_default_mode_delivers_one_bytes_per_read() -> None:
    sink = Sink()
    d = sink.decoder()
    d.dataReceived(encode(PAYLOAD, [100]))  # eight chunks in one read
    assert len(sink.data) == 1
    assert type(sink.data[0]) is bytes
    assert sink.data[0] == PAYLOAD


def test_spans_mode_delivers_views_of_the_read_once_per_read() -> None:
    sink = Sink()
    d = sink.decoder(spans=True)
    wire = encode(PAYLOAD, [100])
    d.dataReceived(wire)
    assert len(sink.spans) == 1
    (run,) = sink.spans
    assert [len(x) for x in run] == [100] * 7 + [68]
    assert all(type(x) is memoryview and x.obj is wire for x in run)
    assert sink.data == []


def test_spans_can_be_asked_for_mid_body() -> None:
    sink = Sink()
    d = sink.decoder()
    wire = encode(PAYLOAD, [300])
    d.dataReceived(wire[:50])
    d.deliver_spans(sink.spans.append)
    d.dataReceived(wire[50:])
    assert sink.body == PAYLOAD
    assert len(sink.data) == 1 and len(sink.spans) == 1


def test_a_read_of_framing_only_delivers_nothing() -> None:
    sink = Sink()
    d = sink.decoder(spans=True)
    d.dataReceived(b"3\r\nabc")
    d.dataReceived(b"\r\n")
    d.dataReceived(b"4\r")
    assert len(sink.spans) == 1  # no empty delivery for the reads without data


# --- the decoder: malformed and cut bodies ----------------------------------------------


@pytest.mark.parametrize(
    "wire",
    [
        b"xyz\r\n",  # not hex
        b"-5\r\n",  # a sign
        b"0x5\r\n",  # a prefix
        b"\r\n",  # empty size
        b"3\nabc\r\n",  # LF alone
        b"3\r\nabcX\r\n",  # data not followed by CRLF
        b"3\r\nabc\rX",  # CR then not LF
        b"3\r\nabc\r\n0\r\nT: 1\n",  # trailer ended by LF alone
        b"3;a\rGET /x\r\nabc\r\n0\r\n\r\n",  # a bare CR inside an extension
        b"3;a\x00b\r\nabc\r\n0\r\n\r\n",  # a control byte inside an extension
    ],
)
def test_malformed_bodies_raise_the_given_error(wire: bytes) -> None:
    class Bad(Exception):
        pass

    sink = Sink()
    d = sink.decoder(malformed=Bad)
    with pytest.raises(Bad):
        feed(d, wire, [])


def test_extensions_of_visible_characters_are_ignored() -> None:
    sink = Sink()
    feed(sink.decoder(), b'3;name="v a";x=1\t\r\nabc\r\n0\r\n\r\n', [])
    assert sink.body == b"abc"


def test_the_good_chunks_of_a_read_go_on_before_its_error() -> None:
    sink = Sink()
    d = sink.decoder()
    with pytest.raises(MalformedChunkedData):
        d.dataReceived(b"5\r\nhello\r\n5\r\nworld\r\nzz\r\n")
    assert sink.body == b"helloworld"  # as Twisted's decoder delivers them


def test_a_size_line_past_the_limit_is_malformed_even_without_its_end() -> None:
    sink = Sink()
    d = sink.decoder(max_line=16)
    d.dataReceived(b"1" * 10)
    with pytest.raises(MalformedChunkedData):
        d.dataReceived(b"1" * 10)


def test_trailers_past_the_limit_are_malformed() -> None:
    sink = Sink()
    d = sink.decoder(max_trailer=32)
    d.dataReceived(b"0\r\n" + b"X: 0123456789\r\n" * 2)
    with pytest.raises(MalformedChunkedData):
        d.dataReceived(b"X: 0123456789\r\n")
    sink = Sink()
    d = sink.decoder(max_trailer=32)
    d.dataReceived(b"0\r\n")
    with pytest.raises(MalformedChunkedData):
        d.dataReceived(b"X" * 40)  # no line end yet, already too long


@pytest.mark.parametrize("cut", [0, 2, 5, 7, 9, 11, 12])
def test_a_body_cut_short_is_data_loss(cut: int) -> None:
    class Lost(Exception):
        pass

    sink = Sink()
    d = sink.decoder(data_loss=Lost)
    d.dataReceived(b"3\r\nabc\r\n0\r\n\r\n"[:cut])
    with pytest.raises(Lost):
        d.noMoreData()
    sink = Sink()
    d = sink.decoder()
    d.dataReceived(b"3\r\nabc\r\n0\r\n\r\n"[:cut])
    with pytest.raises(DataLoss):
        d.noMoreData()


def test_data_after_the_end_is_a_programming_error() -> None:
    sink = Sink()
    d = sink.decoder()
    d.dataReceived(b"0\r\n\r\n")
    with pytest.raises(RuntimeError):
        d.dataReceived(b"more")


# --- the decoder: properties -----------------------------------------------------------


@st.composite
def chunked_messages(draw: Any, exts: Sequence[bytes] = (b"", b";a=1", b" ;x")) -> tuple[bytes, bytes, List[int]]:
    payload = draw(st.binary(min_size=0, max_size=3000))
    sizes = draw(st.lists(st.integers(1, 700), min_size=1, max_size=8))
    ext = draw(st.sampled_from(exts))
    trailers = draw(st.lists(st.sampled_from([b"A: b", b"Expires: 0", b"X:"]), max_size=2))
    wire = encode(payload, sizes, ext=ext, trailers=trailers)
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(wire) - 1)), max_size=12))))
    return payload, wire, [c for c in cuts if 0 < c < len(wire)]


@settings(max_examples=300, deadline=None)
@given(chunked_messages(), st.booleans())
def test_decoded_output_is_the_original_for_any_chunking_and_any_reads(msg: Any, spans: bool) -> None:
    payload, wire, cuts = msg
    sink = Sink()
    d = sink.decoder(spans)
    feed(d, wire, cuts)
    assert sink.body == payload
    assert sink.finished == [b""]
    d.noMoreData()


@settings(max_examples=200, deadline=None)
@given(chunked_messages(exts=(b"", b";a=1")))  # (Twisted takes no whitespace before ';': RFC 9112 allows it)
def test_the_lean_decoder_agrees_with_twisteds(msg: Any) -> None:
    from twisted.web.http import _ChunkedTransferDecoder

    payload, wire, cuts = msg
    theirs: List[bytes] = []
    finished: List[bytes] = []
    twisted_decoder = _ChunkedTransferDecoder(theirs.append, finished.append)
    feed(twisted_decoder, wire, cuts)
    sink = Sink()
    feed(sink.decoder(), wire, cuts)
    assert b"".join(theirs) == sink.body == payload
    assert finished == sink.finished


# --- the aligner -----------------------------------------------------------------------


def packets(n: int, start: int = 0) -> bytes:
    """``n`` TS packets: sync byte, a counter, payload bytes that are never 0x47."""
    return b"".join(bytes([0x47, (start + i) & 0xFF, 0x00, 0x10]) + bytes([0x48 + (start + i) % 100]) * 184 for i in range(n))


def push_all(aligner: SpanAligner, reads: Sequence[Sequence[Any]]) -> List[bytes]:
    out = []
    for spans in reads:
        piece = aligner.push(spans)
        assert type(piece) is bytes
        assert len(piece) % PACKET_SIZE == 0
        out.append(piece)
    return out


def test_every_single_cut_of_a_packet_stream_is_aligned() -> None:
    stream = packets(4)
    for cut in range(1, len(stream)):
        aligner = SpanAligner()
        out = push_all(aligner, [[stream[:cut]], [stream[cut:]]])
        assert b"".join(out) == stream, cut
        assert aligner.pending() == 0


def test_every_split_of_one_read_into_two_spans() -> None:
    stream = packets(3)
    view = memoryview(stream)
    for cut in range(0, len(stream) + 1):
        aligner = SpanAligner()
        aligner.feed(stream[:PACKET_SIZE])  # synced first
        out = aligner.push([view[PACKET_SIZE:cut] if cut > PACKET_SIZE else view[0:0], view[max(cut, PACKET_SIZE):]])
        assert out == stream[PACKET_SIZE:], cut


def test_a_read_that_ends_exactly_at_a_packet_boundary_is_passed_on_as_it_is() -> None:
    aligner = SpanAligner()
    first = packets(2)
    assert aligner.feed(first) is first  # synced on the first read, nothing copied
    second = packets(3, 2)
    assert aligner.push([second]) is second
    assert aligner.pending() == 0


def test_a_partial_packet_is_held_until_completed_and_flushed_at_the_end() -> None:
    stream = packets(3)
    aligner = SpanAligner()
    assert aligner.feed(stream[:200]) == stream[:188]
    assert aligner.pending() == 12
    assert aligner.feed(stream[200:300]) == b""
    assert aligner.pending() == 112
    assert aligner.push([stream[300:400], memoryview(stream)[400:500]]) == stream[188:376]
    assert aligner.flush() == stream[376:500]
    assert aligner.pending() == 0


def test_leading_garbage_is_dropped_until_a_confirmed_sync_byte() -> None:
    stream = packets(3)
    junk = b"\x00\x47junk\x47"  # sync bytes not followed by another a packet later
    aligner = SpanAligner()
    assert aligner.push([junk, stream[:100]]) == b""
    assert aligner.push([stream[100:]]) == stream
    assert aligner.dropped == len(junk)


def test_one_packet_alone_is_accepted_and_less_waits() -> None:
    aligner = SpanAligner()
    assert aligner.feed(packets(1)[:187]) == b""
    assert aligner.feed(packets(1)[187:]) == packets(1)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 40), st.binary(max_size=300), st.data())
def test_aligned_output_is_the_stream_for_any_reads_and_spans(n: int, junk: bytes, data: Any) -> None:
    stream = packets(n)
    wire = junk.replace(b"\x47", b"\x00") + stream
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(wire)), max_size=10))))
    edges = [0, *cuts, len(wire)]
    reads = []
    for a, b in zip(edges, edges[1:]):
        inner = sorted(set(data.draw(st.lists(st.integers(a, b), max_size=3))))
        bounds = [a, *inner, b]
        view = memoryview(wire)
        reads.append([view[x:y] if data.draw(st.booleans()) else wire[x:y] for x, y in zip(bounds, bounds[1:])])
    aligner = SpanAligner()
    out = push_all(aligner, reads)
    assert b"".join(out) + aligner.flush() == stream
    # the same as when the whole stream arrives in one read: how it is cut never matters
    whole = SpanAligner()
    assert whole.feed(b"".join(bytes(x) for r in reads for x in r)) + whole.flush() == stream


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 30), st.lists(st.integers(1, 900), min_size=1, max_size=6), st.data())
def test_decoder_then_aligner_deliver_every_packet_whole(n: int, sizes: List[int], data: Any) -> None:
    # A chunk or a read may end inside a packet, exactly at its end, inside
    # the framing: the pieces are always whole packets, and all of them.
    stream = packets(n)
    wire = encode(stream, sizes)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, len(wire) - 1), max_size=12))))
    aligner = SpanAligner()
    pieces: List[bytes] = []

    def spans(run: List[Any]) -> None:
        pieces.append(aligner.push(run))

    finished: List[bytes] = []
    decoder = ChunkedDecoder(lambda data: spans([data]), finished.append)
    decoder.deliver_spans(spans)
    feed(decoder, wire, cuts)
    assert finished == [b""]
    assert all(len(p) % PACKET_SIZE == 0 for p in pieces)
    assert b"".join(pieces) == stream
    assert aligner.flush() == b""


def test_a_chunk_ending_exactly_at_a_packet_boundary() -> None:
    stream = packets(4)
    wire = encode(stream, [2 * PACKET_SIZE])  # chunk ends == packet ends
    for cut in range(1, len(wire)):
        aligner = SpanAligner()
        pieces: List[bytes] = []
        decoder = ChunkedDecoder(lambda data: None, lambda rest: None)
        decoder.deliver_spans(lambda run: pieces.append(aligner.push(run)))
        feed(decoder, wire, [cut])
        assert b"".join(pieces) == stream, cut
        assert aligner.pending() == 0


def test_no_empty_or_none_piece() -> None:
    aligner = SpanAligner()
    assert aligner.push([]) == b""
    assert aligner.feed(b"") == b""


# --- the allocator setting of engine reads -----------------------------------------------


def test_the_heap_is_kept_for_engine_reads_once_per_process(monkeypatch: Any) -> None:
    import platform

    from acexy_tw.streaming import upstream

    monkeypatch.setattr(upstream, "_heap_kept", None)
    done = upstream.keep_heap_for_reads()
    assert done is (platform.libc_ver()[0] == "glibc")
    assert upstream.keep_heap_for_reads() is done  # once: the second call changes nothing
    monkeypatch.setattr(upstream, "_heap_kept", None)
    monkeypatch.setattr(upstream, "libc", lambda: None)
    assert upstream.keep_heap_for_reads() is False  # not glibc: nothing done, no error


def test_glibc_is_found_once_and_only_glibc(monkeypatch: Any) -> None:
    import ctypes.util
    import platform

    from acexy_tw import glibc

    assert (glibc.libc() is not None) is (platform.libc_ver()[0] == "glibc")
    assert glibc.libc() is glibc.libc()  # loaded once
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libc-that-is-not-there.so")
    assert glibc.libc.__wrapped__() is None  # no such libc: None, no error


# --- EngineConnection: the pause across deliverBody, spans in, pieces out ----------------


class FakeTransport:
    def __init__(self) -> None:
        self.state = "producing"

    def pauseProducing(self) -> None:
        self.state = "paused"

    def resumeProducing(self) -> None:
        self.state = "producing"

    def stopProducing(self) -> None:
        self.state = "stopped"


class FakeResponse:
    """deliverBody as Twisted's: connect the protocol, then resume the transport."""

    def __init__(self) -> None:
        self.transport = FakeTransport()
        self.protocol: Any = None

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)
        self.transport.resumeProducing()


class Listener:
    def __init__(self) -> None:
        self.pieces: List[bytes] = []
        self.lost: List[str] = []

    def upstream_piece(self, piece: bytes) -> None:
        self.pieces.append(piece)

    def upstream_lost(self, reason: str, *, clean: bool, error: Any) -> None:
        self.lost.append(reason)


def test_a_connection_held_before_it_started_stays_held_after_deliverBody() -> None:
    from twisted.internet.task import Clock

    from acexy_tw.streaming.upstream import EngineConnection

    response = FakeResponse()
    conn = EngineConnection(response, Clock(), empty_timeout=10, listener=Listener())
    conn.set_paused(True)
    conn.start()
    assert response.transport.state == "paused"
    assert conn.paused
    conn.set_paused(False)
    assert response.transport.state == "producing"
    conn.close()


def test_spans_and_reads_come_out_as_whole_packets_and_every_byte_at_eof() -> None:
    from twisted.internet.task import Clock
    from twisted.python.failure import Failure
    from twisted.web.client import ResponseDone

    from acexy_tw.streaming.upstream import EngineConnection

    listener = Listener()
    response = FakeResponse()
    conn = EngineConnection(response, Clock(), empty_timeout=10, listener=listener)
    conn.start()
    stream = packets(5) + b"\x47tail"
    view = memoryview(stream)
    conn._spans([view[:100], view[100:300]])  # as body_spans hands them over
    response.protocol.dataReceived(stream[300:700])
    conn._spans([view[700:]])  # one span: the read as it is
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert all(len(p) % PACKET_SIZE == 0 for p in listener.pieces[:-1])
    assert b"".join(listener.pieces) == stream  # the partial packet too, at the clean end
    assert listener.lost == ["engine_eof"]
    assert conn.bytes_in == len(stream)
