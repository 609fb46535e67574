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

from collections import deque
from typing import Any, Callable, Optional, Protocol as TypingProtocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from acexy_tw._twisted_compat import write_through
from acexy_tw.logs import get_logger
from acexy_tw.streaming.budget import BacklogBudget
from zope.interface import implementer

log = get_logger(__name__)


class SinkOwner(TypingProtocol):
    """What a sink tells the session it is attached to (``EngineSession``)."""

    def sink_paused(self, sink: "ClientSink") -> None: ...

    def sink_resumed(self, sink: "ClientSink") -> None: ...

    def detach(self, sink: "ClientSink") -> None: ...


def chunk(data: bytes) -> bytes:
    """``data`` as one HTTP/1.1 chunk (what Request.write sends, in one piece)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


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

        ``framed`` is the same bytes as one HTTP chunk (:func:`chunk`), built
        once by the session for all its players: a streaming HTTP/1.1 player
        is written that very object, so every player sends from one shared
        buffer instead of each copying the piece into its own.
        """
        if self.state == self.ENDED:
            return
        self.state = self.STREAMING
        if self.blocked or self._backlog:
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
            return
        self._write(data, framed)

    def _write(self, data: bytes, framed: Optional[bytes] = None) -> None:
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
        while self._backlog and not self.blocked:  # write() can re-enter pauseProducing
            data = self._backlog.popleft()
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
            backlog = b"".join(self._backlog)
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
