"""
One playback connection of the simulated engine (``GET /ace/r/<infohash>/<token>``).

:class:`PlaybackStream` is the push producer of STYLE.md §5.5 ("Firehose"),
grown the behaviours a proxy has to survive: prebuffering, error pages,
hanging, stalling, a clean end and a reset after a byte budget.  It is
registered on the request, so the proxy's reading speed throttles it
(``pauseProducing`` is counted in :attr:`PlaybackStream.pauses`), and it notices
the proxy hanging up both through ``stopProducing`` and ``notifyFinish``.

Two pacing modes:

- rate-limited: every ``tick`` seconds (a ``callLater``, never a sleep) write
  the bytes due for the time elapsed, from ``TSGenerator.for_duration``.  A
  pause freezes the stream clock: after a resume the stream carries on from
  where it was, without a catch-up burst;
- flat out: write ``chunk``-sized pieces, a few per reactor turn, with
  ``callLater(0, ...)`` in between so the reactor keeps serving I/O, until the
  transport pauses us.
"""

from __future__ import annotations

from typing import Callable, Optional

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES
from twisted.web.server import Request
from zope.interface import implementer

from acexy_tw._twisted_compat import unsent_bytes
from acexy_tw.sim.model import Behaviour, SimSession
from acexy_tw.sim.tsgen import TSGenerator
from acexy_tw.streaming.mpegts import PACKET_SIZE

__all__ = ["PlaybackStream"]

#: How long a reset waits for Twisted's write buffer to drain before it gives
#: up and resets anyway (a client that stopped reading never drains it).
RESET_FLUSH_LIMIT = 2.0
_RESET_POLL = 0.005
#: Flat out: at most this many writes per reactor turn.
_FLAT_OUT_WRITES_PER_TURN = 8

_ERROR_PAGE = (
    "<html><head><title>{code} {message}</title></head>"
    "<body><h1>{code} {message}</h1><p>AceStream engine: playback failed.</p></body></html>"
)


def _byte_budget(behaviour: Behaviour) -> tuple[Optional[int], Optional[str]]:
    """The bytes this connection may send and what happens then; the
    smallest of ``stall_after`` (whole packets), ``eof_after`` and
    ``reset_after`` wins."""
    limits = []
    if behaviour.stall_after is not None:
        limits.append((behaviour.stall_after // PACKET_SIZE * PACKET_SIZE, "stall"))
    if behaviour.eof_after is not None:
        limits.append((behaviour.eof_after, "eof"))
    if behaviour.reset_after is not None:
        limits.append((behaviour.reset_after, "reset"))
    if not limits:
        return None, None
    return min(limits, key=lambda limit: limit[0])


@implementer(IPushProducer)
class PlaybackStream:
    """One playback request, from arrival to the end of its connection."""

    WAITING = "waiting"  # prebuffering or hanging: no headers sent yet
    STREAMING = "streaming"
    STALLED = "stalled"  # budget spent: silent, connection open
    FLUSHING = "flushing"  # budget spent: waiting to reset once sent
    ENDED = "ended"

    def __init__(
        self,
        request: Request,
        session: SimSession,
        behaviour: Behaviour,
        *,
        reactor: IReactorTime,
        bitrate: Optional[int],
        tick: float,
        chunk: int,
        on_change: Callable[[], None],
        generator: Optional[TSGenerator] = None,
    ) -> None:
        self.request = request
        self.session = session
        self.behaviour = behaviour
        self.state = self.WAITING
        self.bytes_sent = 0
        #: times the consumer paused us (transitions, not calls)
        self.pauses = 0
        self.paused = False
        #: "peer" or "engine" once ended
        self.ended_by: Optional[str] = None
        #: why it ended: disconnected, eof, reset, stopped, error page, engine closed
        self.end_reason: Optional[str] = None
        self._reactor = reactor
        self._generator = generator if generator is not None else TSGenerator(bitrate)
        self._tick = tick
        self._packets_per_write = max(1, chunk // PACKET_SIZE)
        self._on_change = on_change
        self._call: Optional[IDelayedCall] = None
        self._last = 0.0
        self._reset_deadline = 0.0
        self._connected = True
        self._budget, self._budget_action = _byte_budget(behaviour)
        request.notifyFinish().addCallbacks(lambda _: None, self._connection_lost)

    # --- state ----------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self.state != self.ENDED

    @property
    def waiting(self) -> bool:
        return self.state == self.WAITING

    def __repr__(self) -> str:
        return (
            f"<PlaybackStream {self.session.token[:8]} {self.state} sent={self.bytes_sent}"
            f" pauses={self.pauses} ended_by={self.ended_by}>"
        )

    # --- lifecycle --------------------------------------------------------------

    def begin(self) -> None:
        """Answer now, after the prebuffer delay, or never."""
        if self.behaviour.playback_hang:
            return
        if self.behaviour.playback_delay > 0:
            self._call = self._reactor.callLater(self.behaviour.playback_delay, self._respond)
        else:
            self._respond()

    def stop(self) -> None:
        """The engine ends this playback (stop command): end the response
        cleanly if it started, and close the connection."""
        self._end("engine", "stopped", finish=self.state != self.WAITING, close=True)

    def abort(self) -> None:
        """The engine goes away (``SimEngine.close``): reset the connection."""
        self._end("engine", "engine closed", abort=True)

    def _respond(self) -> None:
        self._call = None
        status = self.behaviour.playback_status
        if status != 200:
            self._error_page(status)
            return
        self.request.setResponseCode(200)
        self.request.setHeader(b"content-type", b"video/MP2T")
        self.request.registerProducer(self, True)
        self.state = self.STREAMING
        self._last = self._reactor.seconds()
        self.request.write(b"")  # send the headers now: prebuffering is over
        self._on_change()  # may run a test's callback, which may end us
        if self._budget == 0 and self.state == self.STREAMING:
            self._budget_spent()
        self._schedule()

    def _error_page(self, status: int) -> None:
        message = RESPONSES.get(status, b"Error").decode("ascii", "replace")
        self.request.setResponseCode(status)
        self.request.setHeader(b"content-type", b"text/html; charset=utf-8")
        self.request.write(_ERROR_PAGE.format(code=status, message=message).encode())
        self._end("engine", "error page", finish=True)

    def _end(
        self,
        by: str,
        reason: str,
        *,
        finish: bool = False,
        close: bool = False,
        abort: bool = False,
    ) -> None:
        """The one way out; idempotent, so every path may call it."""
        if self.state == self.ENDED:
            return
        self.state = self.ENDED
        self.ended_by, self.end_reason = by, reason
        self._cancel_call()
        channel = getattr(self.request, "channel", None)
        transport = channel.transport if channel is not None else None
        if self.request.producer is self and channel is not None:
            self.request.unregisterProducer()
        if finish and self._connected:
            self.request.finish()
        if transport is not None:
            if abort:
                transport.abortConnection()
            elif close:
                transport.loseConnection()
        if by == "peer":
            self.session.closed_by_peer += 1
        self._on_change()

    def _connection_lost(self, reason: Failure) -> None:
        self._connected = False
        self._end("peer", "disconnected")

    # --- IPushProducer ------------------------------------------------------------

    def pauseProducing(self) -> None:
        if not self.paused:
            self.paused = True
            self.pauses += 1
            self._cancel_call()

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            self._last = self._reactor.seconds()  # no catch-up burst
            self._schedule()

    def stopProducing(self) -> None:
        """The connection is going away under us (Twisted calls this before
        ``notifyFinish`` errbacks)."""
        self._end("peer", "disconnected")

    # --- writing ------------------------------------------------------------------

    def _schedule(self) -> None:
        if self.state != self.STREAMING or self.paused or self._call is not None:
            return
        if self._generator.flat_out:
            self._call = self._reactor.callLater(0, self._flat_out_turn)
        else:
            self._call = self._reactor.callLater(self._tick, self._paced_turn)

    def _cancel_call(self) -> None:
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None

    def _paced_turn(self) -> None:
        self._call = None
        now = self._reactor.seconds()
        data = self._generator.for_duration(max(0.0, now - self._last))
        self._last = now
        self._send(data)
        self._schedule()

    def _flat_out_turn(self) -> None:
        self._call = None
        for _ in range(_FLAT_OUT_WRITES_PER_TURN):
            if self.state != self.STREAMING or self.paused:
                break
            count = self._packets_per_write
            if self._budget is not None:
                count = min(count, -(-self._budget // PACKET_SIZE))
            self._send(self._generator.packets(count))
        self._schedule()

    def _send(self, data: bytes) -> None:
        """Write ``data`` within the byte budget; the write may pause us, and
        the change notification may run test code that ends us, so callers
        re-check the state afterwards."""
        if self._budget is not None:
            data = data[: self._budget]
            self._budget -= len(data)
        if data:
            self.request.write(data)
            self.bytes_sent += len(data)
            self.session.bytes_sent += len(data)
        if self._budget == 0 and self.state == self.STREAMING:
            self._budget_spent()
        if data:
            self._on_change()

    def _budget_spent(self) -> None:
        if self._budget_action == "stall":
            self.state = self.STALLED
            self._cancel_call()
            self._on_change()
        elif self._budget_action == "eof":
            self._end("engine", "eof", finish=True)
        else:
            self.state = self.FLUSHING
            self._cancel_call()
            self._reset_deadline = self._reactor.seconds() + RESET_FLUSH_LIMIT
            self._reset_when_flushed()

    def _reset_when_flushed(self) -> None:
        """Reset only once the budget has left Twisted's buffer, so the client
        receives exactly ``reset_after`` bytes before the RST."""
        self._call = None
        if self.state != self.FLUSHING:
            return
        channel = getattr(self.request, "channel", None)
        transport = channel.transport if channel is not None else None
        if (
            transport is None
            or unsent_bytes(transport) <= 0
            or self._reactor.seconds() >= self._reset_deadline
        ):
            self._end("engine", "reset", abort=True)
        else:
            self._call = self._reactor.callLater(_RESET_POLL, self._reset_when_flushed)
