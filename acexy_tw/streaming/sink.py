"""
ClientSink: one player's end of a stream.

A sink is the push producer registered on the player's HTTP request (so the
player's TCP buffer pauses *it*, never the engine directly) and the consumer
of the session's fan-out. What the player's transport will not take yet waits
in a bounded backlog; past the cap, or when the player has taken nothing for
too long, the player is cut so it never holds back anyone else. Every sink
also counts its backlog in the proxy's one
:class:`~acexy_tw.streaming.budget.BacklogBudget` (``ACEXY_MAX_BACKLOG``,
all players together), which cuts the players furthest behind when the total
passes its cap.

The transport pausing the sink only makes it *blocked*. The session hears
"paused" (and may pause the engine) once the backlog passes ``high_water``,
and "resumed" once it is drained below a quarter of that. Twisted's transport
pauses its producer whenever more than 64 KiB waits to be sent — that is,
after nearly every large write — so passing every such pause on to the engine
socket would serialise reading and writing (measured: three epoll_ctl calls
per 64 KiB chunk). The backlog's cap still bounds the memory.

A streaming player is written with :func:`acexy_tw._twisted_compat.write_through`:
sent at once while its transport has nothing queued, Twisted's ``write``
otherwise.

Coalescing: a player on a TCP socket that keeps up gets its first piece at
once and then the pieces that arrive within ``coalesce_delay`` (default
:data:`COALESCE_DELAY`) of each other as one HTTP chunk in one ``sendmsg``
(the chunk's size line, the pieces as they are, the CRLF: nothing joined),
sent when they reach ``coalesce_bytes`` (:data:`COALESCE_BYTES`) or when the
latency cap runs out, whichever comes first; a piece as large as the size
bound goes at once. At 8 Mbit/s an engine piece is ~25 KB every 25 ms: one
send per player per piece is most of the fan-out's CPU (README
"Performance"). The latency cap is one timer for every sink on the clock
(:class:`Coalescer`), not one per player. What a player cannot take
(blocked) goes to the backlog as before, after anything held for coalescing.
Players on other transports (TLS, the tests' ``StringTransport``) are written
piece by piece unless asked (``coalesce=True``).

Lifecycle, all transitions idempotent:

    waiting ──first bytes──> streaming ──session ends──> ended
       │                        │
       └──── player gone / cut / failed ─────────────────> ended

``done`` is the Deferred the web route returns to Klein: it fires with None
after a clean end (Klein then finishes the request), errbacks with the engine
error when the session failed before this player got a single byte (so the
route can answer 502/504 instead of an empty 200), and is cancelled by Klein
when the player disconnects (its canceller detaches the sink).
"""

from __future__ import annotations

import weakref
from collections import deque
from typing import Any, Callable, Optional, Protocol as TypingProtocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from acexy_tw._twisted_compat import writes_through, write_through
from acexy_tw.logs import get_logger
from acexy_tw.streaming.budget import BacklogBudget
from zope.interface import implementer

log = get_logger(__name__)


class SinkOwner(TypingProtocol):
    """What a sink tells the session it is attached to (``EngineSession``)."""

    def sink_paused(self, sink: "ClientSink") -> None: ...

    def sink_resumed(self, sink: "ClientSink") -> None: ...

    def detach(self, sink: "ClientSink") -> None: ...


#: a coalescing player's pieces are sent once they add up to this many bytes
COALESCE_BYTES = 128 * 1024
#: ... or this many seconds after the first of them was held, whichever is
#: first (ACEXY_COALESCE_DELAY's default; 0: coalescing off)
COALESCE_DELAY = 0.05

_CRLF = b"\r\n"


def chunk(data: bytes) -> tuple[bytes, bytes, bytes]:
    """
    ``data`` as one HTTP/1.1 chunk, as its parts: (size line, ``data``
    itself, CRLF). :func:`~acexy_tw._twisted_compat.write_through` sends them
    with one ``sendmsg`` (``ClientSink.deliver``'s ``framed``), so framing a
    piece copies nothing; ``b"".join(chunk(data))`` is the chunk as bytes.
    (It was one ``bytes``: a copy of every piece, 4–5 % of a relay's CPU.)
    """
    return (b"%x\r\n" % len(data), data, _CRLF)


#: the same: :func:`chunk`'s parts
chunk_parts = chunk


class Coalescer:
    """
    The latency cap of the coalescing sinks on one clock: one timer for all
    of them. A sink that starts holding pieces is :meth:`due`; the timer,
    armed by the first due sink, flushes every due sink when it fires, so no
    piece is held longer than ``delay``. A sink that flushes itself earlier
    (size bound), ends or blocks is taken off (:meth:`discard`); the timer is
    cancelled when no sink is due.
    """

    def __init__(self, clock: IReactorTime, delay: float) -> None:
        self.clock = clock
        self.delay = delay
        self._due: dict["ClientSink", None] = {}
        self._call: Optional[IDelayedCall] = None

    def __len__(self) -> int:
        return len(self._due)

    @property
    def armed(self) -> bool:
        return self._call is not None

    def due(self, sink: "ClientSink") -> None:
        self._due[sink] = None
        if self._call is None:
            self._call = self.clock.callLater(self.delay, self._fire)

    def discard(self, sink: "ClientSink") -> None:
        if self._due.pop(sink, 0) is None and not self._due and self._call is not None:
            call, self._call = self._call, None
            if call.active():
                call.cancel()

    def _fire(self) -> None:
        self._call = None
        due, self._due = self._due, {}
        for sink in due:
            sink.flush()


_coalescers: "weakref.WeakKeyDictionary[Any, dict[float, Coalescer]]" = weakref.WeakKeyDictionary()


def coalescer_for(clock: IReactorTime, delay: float) -> Coalescer:
    """The one :class:`Coalescer` of ``clock`` for ``delay``."""
    try:
        by_delay = _coalescers.setdefault(clock, {})
    except TypeError:  # a clock that takes no weak reference: its own coalescer
        return Coalescer(clock, delay)
    found = by_delay.get(delay)
    if found is None:
        found = by_delay[delay] = Coalescer(clock, delay)
    return found


@implementer(IPushProducer)
class ClientSink:
    WAITING, STREAMING, ENDED = "waiting", "streaming", "ended"

    def __init__(
        self,
        request: Any,
        *,
        clock: IReactorTime,
        max_backlog: int,
        stuck_timeout: float,
        peer: str = "?",
        high_water: int = 0,
        on_cut: Optional[Callable[["ClientSink", str], None]] = None,
        on_first_byte: Optional[Callable[["ClientSink"], None]] = None,
        budget: Optional[BacklogBudget] = None,
        coalesce: Optional[bool] = None,
        coalesce_bytes: int = COALESCE_BYTES,
        coalesce_delay: float = COALESCE_DELAY,
        coalescer: Optional[Coalescer] = None,
    ) -> None:
        self.request = request
        self.session: Optional[SinkOwner] = None
        self.peer = peer
        self.state = self.WAITING
        #: the transport will not take more now
        self.blocked = False
        #: told the session so (the backlog passed ``high_water``)
        self.paused = False
        self.max_backlog = max_backlog
        self.high_water = min(high_water, max_backlog)
        self.low_water = self.high_water // 4
        self.backlog_bytes = 0
        self.bytes_sent = 0
        self.cut_reason: Optional[str] = None
        self.connected_at = clock.seconds()
        self.first_byte_at: Optional[float] = None
        self._on_first_byte = on_first_byte
        self._backlog: deque[bytes] = deque()
        self._clock = clock
        self._stuck_timeout = stuck_timeout
        self._stuck_call: Optional[IDelayedCall] = None
        self._on_cut = on_cut
        self._budget = budget
        if coalesce is None:  # where a send is a system call: a player on a TCP socket
            transport = getattr(getattr(request, "channel", None), "transport", None)
            coalesce = coalesce_delay > 0 and coalesce_bytes > 0 and writes_through(transport)
        #: pieces held to be sent together (coalescing), oldest first
        self._pending: list[bytes] = []
        self.pending_bytes = 0
        self._coalesce_bytes = coalesce_bytes if coalesce else 0
        self._coalescer: Optional[Coalescer] = None
        if coalesce:
            self._coalescer = coalescer if coalescer is not None else coalescer_for(clock, coalesce_delay)
        self.done: Deferred[None] = Deferred(self._cancelled)
        request.registerProducer(self, True)

    def __repr__(self) -> str:
        return f"<ClientSink {self.peer} {self.state} sent={self.bytes_sent} backlog={self.backlog_bytes}>"

    @property
    def ended(self) -> bool:
        return self.state == self.ENDED

    # -- data from the session ------------------------------------------------

    def deliver(self, data: bytes, framed: Optional[bytes] = None) -> None:
        """
        Hand ``data`` (whole TS packets) to this player, or queue it.

        ``framed`` is the same bytes as one HTTP chunk (:func:`chunk`: its
        parts, or one ``bytes``), built once by the session for all its
        players: a streaming HTTP/1.1 player is written those very objects,
        so every player sends from one shared buffer instead of each copying
        the piece into its own.
        """
        if self.state == self.ENDED:
            return
        self.state = self.STREAMING
        if self.blocked or self._backlog:
            if self._pending:
                self._hold_pending()
                if self.state == self.ENDED:
                    return
            self._queue(data)
            return
        bound = self._coalesce_bytes
        if not bound or self.first_byte_at is None:
            self._write(data, framed)
            return
        pending = self._pending
        if not pending and len(data) >= bound:
            self._write(data, framed)
            return
        pending.append(data)
        self.pending_bytes += len(data)
        if self.pending_bytes >= bound:
            self.flush()
        elif len(pending) == 1:
            self._coalescer.due(self)  # type: ignore[union-attr]

    def flush(self) -> None:
        """Send what is held for coalescing now (the latency cap, the size bound)."""
        pending = self._pending
        if not pending or self.state == self.ENDED:
            return
        if self._coalescer is not None:
            self._coalescer.discard(self)
        if self.blocked or self._backlog:
            self._hold_pending()
            return
        self._pending = []
        size, self.pending_bytes = self.pending_bytes, 0
        self._write_group(pending, size)

    def _queue(self, data: bytes) -> None:
        n = len(data)
        if self.backlog_bytes + n > self.max_backlog:
            self.cut(f"backlog over {self.max_backlog} bytes")
            return
        self._backlog.append(data)
        self.backlog_bytes += n
        if self._budget is not None:
            self._budget.add(self, n)  # may cut the players furthest behind: this one too
            if self.state == self.ENDED:
                return
        if not self.paused and self.backlog_bytes >= self.high_water:
            self._report_paused()

    def _hold_pending(self) -> None:
        """The player blocked while pieces were held: they go first into its backlog."""
        pending, self._pending = self._pending, []
        self.pending_bytes = 0
        if self._coalescer is not None:
            self._coalescer.discard(self)
        for data in pending:
            self._queue(data)
            if self.state == self.ENDED:
                return

    def _write(self, data: bytes, framed: Any = None) -> None:
        self.bytes_sent += len(data)
        if self.first_byte_at is None:
            self.first_byte_at = self._clock.seconds()
            if self._on_first_byte is not None:
                self._on_first_byte(self)
            self.request.write(data)  # the first write sends the headers too
            return
        # Either may re-enter pauseProducing synchronously when the transport fills.
        if framed is not None and self.request.chunked:
            write_through(self.request.channel.transport, framed)
        else:
            self.request.write(data)

    def _write_group(self, pieces: list[bytes], size: int) -> None:
        """``pieces`` (``size`` bytes in all) as one write: one chunk, one sendmsg."""
        if len(pieces) == 1 or self.first_byte_at is None:
            for data in pieces:  # (a group is never the first write; kept correct anyway)
                self._write(data)
            return
        self.bytes_sent += size
        if self.request.chunked:
            write_through(self.request.channel.transport, (b"%x\r\n" % size, *pieces, _CRLF))
        else:
            self.request.write(b"".join(pieces))

    # -- IPushProducer (driven by the player's transport) --------------------

    def pauseProducing(self) -> None:
        # Called on every write while the transport is full: idempotent.
        if self.blocked or self.state == self.ENDED:
            return
        self.blocked = True
        if self._stuck_timeout > 0:
            self._stuck_call = self._clock.callLater(self._stuck_timeout, self._stuck)
        if not self.paused and self.backlog_bytes >= self.high_water:
            self._report_paused()

    def resumeProducing(self) -> None:
        if not self.blocked or self.state == self.ENDED:
            return
        self.blocked = False
        self._cancel_stuck()
        taken = 0
        backlog = self._backlog
        bound = self._coalesce_bytes
        while backlog and not self.blocked:  # a write can re-enter pauseProducing
            data = backlog.popleft()
            if bound and backlog and len(data) < bound:
                # coalescing: what is queued leaves in writes of up to the size bound
                group, size = [data], len(data)
                while backlog and size < bound:
                    data = backlog.popleft()
                    group.append(data)
                    size += len(data)
                self.backlog_bytes -= size
                taken += size
                self._write_group(group, size)
                continue
            self.backlog_bytes -= len(data)
            taken += len(data)
            self._write(data)
        if taken and self._budget is not None:  # (also if a write ended it: release took the rest)
            self._budget.drained(self, taken)
        if self.high_water:
            drained = self.backlog_bytes <= self.low_water
        else:  # no high-water mark: pause and resume with the transport itself
            drained = not self.blocked and not self._backlog
        if self.paused and drained and self.state != self.ENDED:
            self.paused = False
            if self.session is not None:
                self.session.sink_resumed(self)

    def _report_paused(self) -> None:
        self.paused = True
        if self.session is not None:
            self.session.sink_paused(self)

    def stopProducing(self) -> None:
        """The player's connection is gone."""
        self._detach()

    # -- endings ----------------------------------------------------------------

    def end(self, clean: bool, error: Optional[BaseException]) -> None:
        """
        The session is over. A player that got bytes gets a clean end (after its
        backlog) or, if the session broke, an aborted connection; a player that
        got nothing gets ``error`` so it can be answered with a real HTTP error.
        """
        if self.state == self.ENDED:
            return
        if self.state == self.WAITING and error is not None:
            self._detach()
            self._unregister()
            self.done.errback(error)
        elif clean:
            if self._budget is not None:
                self._budget.release(self)
            backlog = b"".join([*self._pending, *self._backlog])  # (never both: pending goes first into the backlog)
            self._pending = []
            self.pending_bytes = 0
            self._backlog.clear()
            self.backlog_bytes = 0
            self._detach()
            if backlog:
                self.bytes_sent += len(backlog)
                self.request.write(backlog)
            self._unregister()
            self.done.callback(None)
        else:
            self._abort()

    def cut(self, reason: str) -> None:
        """Drop a player that cannot keep up: close its connection so it reconnects."""
        if self.state == self.ENDED:
            return
        self.cut_reason = reason
        log.info("cutting slow client {peer}: {reason}", peer=self.peer, reason=reason)
        if self._on_cut is not None:
            self._on_cut(self, reason)
        self._abort()

    def _stuck(self) -> None:
        self._stuck_call = None
        self.cut(f"took no data for {self._stuck_timeout:g}s")

    def _abort(self) -> None:
        self._detach()
        channel = getattr(self.request, "channel", None)
        transport = getattr(channel, "transport", None)
        if transport is not None:
            transport.abortConnection()

    def _cancelled(self, _: Deferred) -> None:
        # Klein cancels ``done`` when the player disconnects.
        self._detach()

    def _detach(self) -> None:
        if self.state == self.ENDED:
            return
        self.state = self.ENDED
        self._cancel_stuck()
        if self._budget is not None:
            self._budget.release(self)
        self._backlog.clear()
        self.backlog_bytes = 0
        self._pending = []
        self.pending_bytes = 0
        if self._coalescer is not None:
            self._coalescer.discard(self)
        session, self.session = self.session, None
        if session is not None:
            session.detach(self)

    def _unregister(self) -> None:
        if getattr(self.request, "producer", None) is self:
            self.request.unregisterProducer()

    def _cancel_stuck(self) -> None:
        if self._stuck_call is not None:
            if self._stuck_call.active():
                self._stuck_call.cancel()
            self._stuck_call = None
