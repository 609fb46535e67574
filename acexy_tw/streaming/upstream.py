"""
EngineConnection: one engine playback body, as a producer the session steers.

It turns the body into TS-aligned pieces for its listener, pauses and resumes
the engine socket when told (``self.transport`` of a ``deliverBody`` protocol
is the socket's producer), watches for silence — ``empty_timeout`` seconds
without a byte while *we* were not holding the engine back — and reports how
the body ended, once: ``engine_eof`` (a clean end; a trailing partial packet is
still delivered), ``engine_error`` (the connection broke) or ``empty_timeout``.
:meth:`close` stops reading (the socket is closed) and reports nothing.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol as TypingProtocol, Sequence

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from acexy_tw._twisted_compat import body_spans
from acexy_tw.engine import EngineError, EngineTimeout
from acexy_tw.glibc import libc
from acexy_tw.logs import get_logger
from acexy_tw.streaming.mpegts import Buffer, SpanAligner

__all__ = ["EngineConnection", "UpstreamListener", "keep_heap_for_reads"]

log = get_logger(__name__)

#: glibc's mallopt() parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: what :func:`keep_heap_for_reads` sets: buffers below this come from the heap ...
MMAP_THRESHOLD = 1 << 20
#: ... and this much freed memory at the top of the heap is kept for the next reads
TRIM_THRESHOLD = 8 << 20

_heap_kept: Optional[bool] = None


def keep_heap_for_reads() -> bool:
    """
    Keep glibc's allocator from handing the pages of each engine read back to
    the system, only to take fresh ones for the next (once per process; True
    if done).

    Every engine read is a new buffer of up to 256 KiB (Twisted's ``recv``),
    and its whole packets another (the aligner's join): a few such buffers
    live at once and are freed a moment later. With glibc's defaults (buffers
    from 128 KiB up get pages of their own from ``mmap``, and freed memory at the top of the heap
    past 128 KiB, adjusted upwards as it goes, is given back at once), the
    pages came and went with every read: 360,000 page faults per GB relayed,
    the zeroing of a fresh page for every byte, and half the proxy's CPU
    (bench/relay.py; Twisted's own relay, reading 64 KiB, has none). With
    buffers below :data:`MMAP_THRESHOLD` from the heap and up to
    :data:`TRIM_THRESHOLD` of free heap kept, they are reused: ~25,000 faults
    per GB. Memory given back when the load is gone is the job of an explicit
    ``malloc_trim`` (:mod:`acexy_tw.streaming.budget`), which these settings do
    not limit. Elsewhere than glibc (musl, macOS) nothing is done.
    """
    global _heap_kept
    if _heap_kept is None:
        _heap_kept = False
        lib = libc()
        if lib is not None:
            import ctypes

            mallopt = lib.mallopt
            mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            mallopt.restype = ctypes.c_int
            _heap_kept = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
                mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
            )
        if _heap_kept:
            log.debug("glibc malloc: mmap threshold {m} B, trim threshold {t} B", m=MMAP_THRESHOLD, t=TRIM_THRESHOLD)
    return _heap_kept


class UpstreamListener(TypingProtocol):
    """What the connection tells its session."""

    def upstream_piece(self, piece: bytes) -> None: ...

    def upstream_lost(self, reason: str, *, clean: bool, error: EngineError) -> None: ...


class _Body(Protocol):
    def __init__(self, connection: "EngineConnection") -> None:
        self._connection = connection

    def connectionMade(self) -> None:
        self._connection._connected(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self._connection._data(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._connection._lost(reason)


class EngineConnection:
    def __init__(
        self,
        response: Any,
        clock: IReactorTime,
        *,
        empty_timeout: float,
        listener: UpstreamListener,
    ) -> None:
        self._response = response
        self._clock = clock
        self._empty_timeout = empty_timeout
        self._listener: Optional[UpstreamListener] = listener
        self._aligner = SpanAligner()
        keep_heap_for_reads()
        self._transport: Any = None
        self._want_paused = False
        self._empty_call: Optional[IDelayedCall] = None
        self.opened_at = clock.seconds()
        self.last_data = self.opened_at
        self.first_byte_at: Optional[float] = None
        self.bytes_in = 0

    @property
    def open(self) -> bool:
        return self._listener is not None

    @property
    def paused(self) -> bool:
        return self._want_paused and self._transport is not None

    def start(self) -> None:
        """Begin reading. Body bytes already buffered are delivered now, synchronously."""
        self._arm(self._empty_timeout)
        self._response.deliverBody(_Body(self))
        # A chunked body from the proxy's pool: each read's data as spans of
        # the read itself, so the aligner's join is the only copy.
        body_spans(self._response, self._spans)
        if self._want_paused and self._transport is not None:
            # deliverBody resumes the transport after connecting the protocol
            self._transport.pauseProducing()

    def set_paused(self, paused: bool) -> None:
        """The flow policy's answer: hold the engine back, or let it send."""
        if paused == self._want_paused:
            return
        self._want_paused = paused
        if self._transport is None or not self.open:
            return
        if paused:
            self._transport.pauseProducing()
        else:
            # Silence while we held the engine back does not count as a stall.
            self.last_data = self._clock.seconds()
            self._transport.resumeProducing()

    def silence(self) -> float:
        """Seconds since the engine last sent a byte (0 while we hold it back)."""
        if self.paused:
            return 0.0
        return self._clock.seconds() - self.last_data

    def close(self) -> None:
        """Stop reading and close the socket; nothing more is reported."""
        self._listener = None
        self._disarm()
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.stopProducing()

    # -- the body protocol's events ------------------------------------------------

    def _connected(self, transport: Any) -> None:
        self._transport = transport
        if self._want_paused:
            transport.pauseProducing()

    def _data(self, data: Buffer) -> None:
        """One read's data in one piece (the body protocol's ``dataReceived``, or one span)."""
        self._take((data,))

    def _spans(self, spans: Sequence[Buffer]) -> None:
        """One read's data as spans of it (:func:`~acexy_tw._twisted_compat.body_spans`)."""
        if len(spans) == 1:
            self._data(spans[0])
        else:
            self._take(spans)

    def _take(self, spans: Sequence[Buffer]) -> None:
        if self._listener is None:
            return
        self.last_data = self._clock.seconds()
        if self.first_byte_at is None:
            self.first_byte_at = self.last_data
        for span in spans:
            self.bytes_in += len(span)
        piece = self._aligner.push(spans)
        if piece:
            self._listener.upstream_piece(piece)

    def _lost(self, reason: Failure) -> None:
        self._transport = None
        if self._listener is None:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            tail = self._aligner.flush()  # every byte received, even a trailing partial packet
            if tail and self._listener is not None:
                self._listener.upstream_piece(tail)
            self._report("engine_eof", True, EngineError("engine ended the stream before sending any data"))
        else:
            msg = reason.getErrorMessage()
            reasons = getattr(reason.value, "reasons", None)
            if reasons:
                msg = "; ".join(r.getErrorMessage() for r in reasons)
            self._report("engine_error", False, EngineError(f"engine connection broke: {msg}"))

    def _report(self, reason: str, clean: bool, error: EngineError) -> None:
        listener, self._listener = self._listener, None
        self._disarm()
        if listener is not None:
            listener.upstream_lost(reason, clean=clean, error=error)

    # -- the silence watchdog (fires at most once per empty_timeout) -------------------

    def _arm(self, delay: float) -> None:
        self._empty_call = self._clock.callLater(delay, self._check_silence)

    def _disarm(self) -> None:
        call, self._empty_call = self._empty_call, None
        if call is not None and call.active():
            call.cancel()

    def _check_silence(self) -> None:
        self._empty_call = None
        if self._listener is None:
            return
        silent = self.silence()
        if silent >= self._empty_timeout:
            transport, self._transport = self._transport, None
            if transport is not None:
                transport.stopProducing()
            self._report(
                "empty_timeout", True, EngineTimeout(f"engine sent no data within {self._empty_timeout:g}s")
            )
        else:
            self._arm(self._empty_timeout - silent)
