"""
A lean decoder for an engine body sent with ``Transfer-Encoding: chunked``.

Twisted's own decoder (``twisted.web.http._ChunkedTransferDecoder``) appends
every read to a ``bytearray``, copies each chunk's data out of it
(``memoryview(...).tobytes()``) and deletes it from the front (a ``memmove`` of
all that follows): for a 256 KiB read of four 64 KiB chunks that is about
three and a half copies of every byte, and four calls downstream.
:class:`ChunkedDecoder` works on the read itself: it finds the chunk
boundaries by offset, keeps only what a read cuts short of the framing (a
chunk-size line, the CRLF after a chunk's data, a trailer line: a few bytes),
and delivers the data of one read at once:

- by default as one ``bytes`` to ``data_callback`` (the read itself when all
  of it is chunk data, else one join of the pieces: one copy);
- once :meth:`deliver_spans` has been called, as the list of pieces
  (``memoryview`` slices of the read, or the read itself) to that callback, so
  a consumer that joins them anyway (the TS aligner) makes the only copy.

It has the interface Twisted's HTTP client parser expects of a body decoder
(``dataReceived``, ``noMoreData``, ``state``) and raises the exceptions it is
given for a malformed body (``malformed``) and for a body cut short
(``data_loss``), so :mod:`acexy_tw._twisted_compat`, the one module that
touches Twisted's private classes, can hand it Twisted's. It imports nothing
from Twisted.

What is accepted follows RFC 9112 section 7.1 and Twisted's decoder: a
chunk-size of hex digits (optional whitespace, then ``;`` extensions, which
are ignored), every line ending CRLF, at most ``max_line`` bytes per
chunk-size line and ``max_trailer`` bytes of trailer lines; data after the
terminal chunk and its trailers goes to ``finish_callback``.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Union

__all__ = ["ChunkedDecoder", "MalformedChunkedData", "DataLoss", "Buffer"]

#: a piece of body data: the read itself, or a memoryview slice of it
Buffer = Union[bytes, memoryview]

_HEX = frozenset(b"0123456789abcdefABCDEF")
#: what chunk extensions (after ";") may hold: tab, visible ASCII, space and
#: obs-text, as Twisted's decoder allows; never CR, LF or another control byte
_EXTENSION = frozenset(b"\t" + bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100)))


class MalformedChunkedData(ValueError):
    """The body is not valid chunked transfer coding (default ``malformed``)."""


class DataLoss(Exception):
    """The body ended before its terminal chunk (default ``data_loss``)."""


class ChunkedDecoder:
    CHUNK_LENGTH, BODY, CRLF, TRAILER, FINISHED = "CHUNK_LENGTH", "BODY", "CRLF", "TRAILER", "FINISHED"

    __slots__ = (
        "dataCallback",
        "finishCallback",
        "state",
        "length",
        "_spans_callback",
        "_carry",
        "_trailer_bytes",
        "_malformed",
        "_data_loss",
        "_max_line",
        "_max_trailer",
        "__weakref__",
    )

    def __init__(
        self,
        data_callback: Callable[[bytes], Any],
        finish_callback: Callable[[bytes], Any],
        *,
        malformed: Callable[[str], BaseException] = MalformedChunkedData,
        data_loss: Callable[[str], BaseException] = DataLoss,
        max_line: int = 1024,
        max_trailer: int = 1 << 16,
    ) -> None:
        # Twisted's attribute names: the parser and its tests read them.
        self.dataCallback: Optional[Callable[[bytes], Any]] = data_callback
        self.finishCallback = finish_callback
        self.state = self.CHUNK_LENGTH
        #: data bytes of the current chunk still to come (state BODY)
        self.length = 0
        self._spans_callback: Optional[Callable[[List[Buffer]], Any]] = None
        #: what a read cut short: part of a chunk-size or trailer line, or of the CRLF after data
        self._carry = b""
        self._trailer_bytes = 0
        self._malformed = malformed
        self._data_loss = data_loss
        self._max_line = max_line
        self._max_trailer = max_trailer

    def deliver_spans(self, callback: Callable[[List[Buffer]], Any]) -> None:
        """From now on, hand each read's data to ``callback`` as a list of
        pieces (non-empty; ``memoryview`` slices of the read or the read
        itself, valid as long as the caller keeps them) instead of one
        ``bytes`` to ``data_callback``."""
        self._spans_callback = callback

    def dataReceived(self, data: bytes) -> None:
        state = self.state
        if state == self.FINISHED:
            raise RuntimeError("ChunkedDecoder.dataReceived called after the last chunk")
        spans: List[Buffer] = []
        try:
            rest = self._decode(data, state, spans)
        except BaseException:
            self._deliver(data, spans)  # the good chunks of this read go on before the error, as Twisted's do
            raise
        self._deliver(data, spans)
        if rest is not None:
            self.dataCallback = None
            self._spans_callback = None
            self.finishCallback(rest)

    def _deliver(self, data: bytes, spans: List[Buffer]) -> None:
        if spans:
            callback = self._spans_callback
            if callback is not None:
                callback(spans)
            elif self.dataCallback is not None:
                self.dataCallback(spans[0] if len(spans) == 1 and spans[0] is data else b"".join(spans))

    def _decode(self, data: bytes, state: str, spans: List[Buffer]) -> Optional[bytes]:
        """Decode one read into ``spans``; what follows the message, if it ended."""
        end = len(data)
        pos = 0
        view: Optional[memoryview] = None
        rest: Optional[bytes] = None
        while pos < end:
            if state == self.BODY:
                take = self.length if self.length < end - pos else end - pos
                if take == end:  # the whole read is data of one chunk: no slice at all
                    spans.append(data)
                else:
                    if view is None:
                        view = memoryview(data)
                    spans.append(view[pos : pos + take])
                pos += take
                self.length -= take
                if not self.length:
                    state = self.CRLF
            elif state == self.CRLF:
                # b"\r\n" after the data; a read may end between the two.
                need = b"\r\n"[len(self._carry) :]
                got = data[pos : pos + len(need)]
                if not need.startswith(got):
                    self.state = state
                    raise self._malformed("chunk data not followed by CRLF")
                pos += len(got)
                if len(got) < len(need):
                    self._carry += got
                else:
                    self._carry = b""
                    state = self.CHUNK_LENGTH
            else:  # CHUNK_LENGTH or TRAILER: a line ending CRLF
                nl = data.find(b"\n", pos)
                if nl < 0:
                    self._carry += data[pos:]
                    pos = end
                    self._check_partial_line(state)
                    break
                line = data[pos:nl]
                if self._carry:
                    line = self._carry + line
                    self._carry = b""
                pos = nl + 1
                if not line.endswith(b"\r"):
                    self.state = state
                    raise self._malformed("chunk line not ended by CRLF")
                line = line[:-1]
                if state == self.CHUNK_LENGTH:
                    self.length = self._chunk_size(line)
                    state = self.BODY if self.length else self.TRAILER
                elif line:  # a trailer field: counted, not kept
                    self._trailer_bytes += len(line) + 2
                    if self._trailer_bytes > self._max_trailer:
                        self.state = state
                        raise self._malformed("trailer section too long")
                else:  # the empty line that ends the message
                    state = self.FINISHED
                    rest = data[pos:]
                    break
        self.state = state
        return rest

    def _check_partial_line(self, state: str) -> None:
        if state == self.CHUNK_LENGTH and len(self._carry) > self._max_line:
            self.state = state
            raise self._malformed(f"chunk-size line longer than {self._max_line} bytes")
        if state == self.TRAILER and self._trailer_bytes + len(self._carry) > self._max_trailer:
            self.state = state
            raise self._malformed("trailer section too long")

    def _chunk_size(self, line: bytes) -> int:
        if len(line) > self._max_line:
            raise self._malformed(f"chunk-size line longer than {self._max_line} bytes")
        size, _, extensions = line.partition(b";")
        size = size.rstrip(b" \t")
        if not size or not _HEX.issuperset(size) or not _EXTENSION.issuperset(extensions):
            raise self._malformed(f"bad chunk-size {line[:40]!r}")
        return int(size, 16)

    def noMoreData(self) -> None:
        """The connection ended: fine after the terminal chunk, ``data_loss`` before it."""
        if self.state != self.FINISHED:
            raise self._data_loss(f"chunked body ended in state {self.state}")
