"""
EngineSession: one engine playback session, shared by every player of one
content key.

The session owns the engine side: it asks a placement function for an engine,
starts the session there (getstream, then playback headers), reads the body as
a push-producer-driven protocol, and fans each TS-aligned piece out to its
sinks. Flow control policy lives in one method, :meth:`_update_flow`: the
engine connection is paused only while *every* attached player is paused.

Timers (all on the injected clock, all cancelled on close):
- empty timeout: the engine sent nothing for ``empty_timeout`` seconds while we
  were reading — time we paused the engine ourselves does not count;
- linger: the last player left; after ``linger`` seconds the session closes,
  unless a player arrives first (zap back, probe-then-play).

Closing always does both: the stop command goes to the engine (bounded, its
failure only logged) and the playback connection is closed, whatever failed
first.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Optional

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from acexy_tw.logs import get_logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from acexy_tw.content import ContentKey
from acexy_tw.engine import EngineClient, EngineError, EngineTimeout, PlaybackInfo, discard_body
from acexy_tw.streaming.mpegts import PacketAligner
from acexy_tw.streaming.sink import ClientSink

log = get_logger(__name__)

#: finds an engine for a new session and starts the session there: returns the
#: engine and what it answered (the fixed engine, or the orchestrator's pick)
Placement = Callable[[ContentKey], Awaitable[tuple[EngineClient, PlaybackInfo]]]


class ShuttingDown(EngineError):
    http_status = 503


class _Upstream(Protocol):
    """The engine's playback body; ``self.transport`` pauses the engine socket."""

    def __init__(self, session: "EngineSession") -> None:
        self._session = session

    def connectionMade(self) -> None:
        self._session._upstream_connected(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self._session._upstream_data(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._session._upstream_lost(reason)


class EngineSession:
    STARTING, STREAMING, CLOSED = "starting", "streaming", "closed"

    def __init__(
        self,
        key: ContentKey,
        place: Placement,
        clock: IReactorTime,
        *,
        empty_timeout: float,
        linger: float,
        on_closed: Callable[["EngineSession", str], None],
        on_streaming: Optional[Callable[["EngineSession"], None]] = None,
    ) -> None:
        self.key = key
        self.state = self.STARTING
        self.sinks: list[ClientSink] = []
        self.engine: Optional[EngineClient] = None
        self.info: Optional[PlaybackInfo] = None
        self.bytes_in = 0
        self.bytes_out_done = 0  # bytes of sinks that already left
        self.created_at = clock.seconds()
        self.streaming_since: Optional[float] = None
        self.first_byte_at: Optional[float] = None
        self.close_reason: Optional[str] = None
        self.stop_result: Optional[Deferred] = None
        self.stream_id: Optional[str] = None  # set when reported to the orchestrator
        self._place = place
        self._on_streaming = on_streaming
        self._clock = clock
        self._empty_timeout = empty_timeout
        self._linger = linger
        self._on_closed = on_closed
        self._aligner = PacketAligner()
        self._paused_sinks: set[int] = set()
        self._upstream_transport: Any = None
        self._upstream_paused = False
        self._start_d: Optional[Deferred] = None
        self._linger_call: Optional[IDelayedCall] = None
        self._empty_call: Optional[IDelayedCall] = None
        self._last_data = 0.0

    def __repr__(self) -> str:
        return f"<EngineSession {self.key} {self.state} clients={len(self.sinks)}>"

    # -- status ------------------------------------------------------------------

    @property
    def bytes_out(self) -> int:
        return self.bytes_out_done + sum(s.bytes_sent for s in self.sinks)

    @property
    def upstream_paused(self) -> bool:
        return self._upstream_paused

    @property
    def closed(self) -> bool:
        return self.state == self.CLOSED

    # -- start -------------------------------------------------------------------

    def start(self) -> None:
        """Begin placement and the engine handshake (no-op if already begun)."""
        if self._start_d is not None or self.closed:
            return
        self._start_d = Deferred.fromCoroutine(self._start())
        self._start_d.addErrback(self._start_failed)

    async def _start(self) -> None:
        self.engine, self.info = await self._place(self.key)
        if self.closed:  # closed while the engine accepted: close() could not stop it
            self._send_stop(self.engine, self.info)
            return
        response = await self.engine.open_playback(self.info)
        if self.closed:  # closed while the headers were on their way
            discard_body(response)
            return
        self.state = self.STREAMING
        self.streaming_since = self._clock.seconds()
        self._last_data = self.streaming_since
        self._arm_empty_timer(self._empty_timeout)
        log.info(
            "engine session for {key} streaming from {engine} after {secs:.3f}s",
            key=str(self.key),
            engine=self.engine.address.url,
            secs=self.streaming_since - self.created_at,
        )
        # deliverBody hands over any body bytes already buffered, synchronously:
        # the sinks are attached already, so the first bytes reach them.
        response.deliverBody(_Upstream(self))
        if self._on_streaming is not None and not self.closed:
            self._on_streaming(self)

    def _start_failed(self, failure: Failure) -> None:
        if self.closed:
            if not failure.check(CancelledError):
                log.debug("start of {key} failed after close: {f}", key=str(self.key), f=failure.getErrorMessage())
            return
        log.warn(
            "engine session for {key} failed to start: {reason}",
            key=str(self.key),
            reason=failure.getErrorMessage(),
        )
        error = failure.value if failure.check(EngineError) else EngineError(failure.getErrorMessage())
        self.close("engine_error", clean=False, error=error)

    # -- sinks -------------------------------------------------------------------

    def attach(self, sink: ClientSink) -> None:
        if self.closed:
            raise RuntimeError("attach to a closed session")
        sink.session = self
        self.sinks.append(sink)
        self._cancel_linger()
        if sink.paused:
            self._paused_sinks.add(id(sink))
        self._update_flow()

    def detach(self, sink: ClientSink) -> None:
        if sink not in self.sinks:
            return
        self.sinks.remove(sink)
        self._paused_sinks.discard(id(sink))
        self.bytes_out_done += sink.bytes_sent
        if self.closed:
            return
        if not self.sinks:
            self._start_linger()
        self._update_flow()

    def sink_paused(self, sink: ClientSink) -> None:
        self._paused_sinks.add(id(sink))
        self._update_flow()

    def sink_resumed(self, sink: ClientSink) -> None:
        self._paused_sinks.discard(id(sink))
        self._update_flow()

    def _update_flow(self) -> None:
        """The flow-control policy: pause the engine only while every player is paused."""
        want = bool(self.sinks) and len(self._paused_sinks) >= len(self.sinks)
        if want == self._upstream_paused or self._upstream_transport is None or self.closed:
            return
        self._upstream_paused = want
        if want:
            self._upstream_transport.pauseProducing()
        else:
            # Silence while we held the engine back does not count as a stall.
            self._last_data = self._clock.seconds()
            self._upstream_transport.resumeProducing()

    # -- upstream ------------------------------------------------------------------

    def _upstream_data(self, data: bytes) -> None:
        if self.closed:
            return
        self._last_data = self._clock.seconds()
        if self.first_byte_at is None:
            self.first_byte_at = self._last_data
        self.bytes_in += len(data)
        piece = self._aligner.feed(data)
        if piece:
            for sink in tuple(self.sinks):
                sink.deliver(piece)

    def _upstream_connected(self, transport: Any) -> None:
        self._upstream_transport = transport
        if self._upstream_paused:
            transport.pauseProducing()

    def _upstream_lost(self, reason: Failure) -> None:
        self._upstream_transport = None
        if self.closed:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            # Deliver every byte received, even a trailing partial packet.
            tail = self._aligner.flush()
            if tail:
                for sink in tuple(self.sinks):
                    sink.deliver(tail)
            log.info("engine ended the stream of {key} (EOF)", key=str(self.key))
            self.close(
                "engine_eof",
                clean=True,
                error=EngineError("engine ended the stream before sending any data"),
            )
        else:
            msg = reason.getErrorMessage()
            reasons = getattr(reason.value, "reasons", None)
            if reasons:
                msg = "; ".join(r.getErrorMessage() for r in reasons)
            log.warn("engine connection for {key} broke: {msg}", key=str(self.key), msg=msg)
            self.close("engine_error", clean=False, error=EngineError(f"engine connection broke: {msg}"))

    # -- timers ------------------------------------------------------------------

    def _arm_empty_timer(self, delay: float) -> None:
        self._empty_call = self._clock.callLater(delay, self._check_empty)

    def _check_empty(self) -> None:
        """Fires at most once per ``empty_timeout``; per-chunk cost is one assignment."""
        self._empty_call = None
        if self.closed:
            return
        if self._upstream_paused:
            # We are holding the engine back: not its silence. Look again later.
            self._arm_empty_timer(self._empty_timeout)
            return
        silent = self._clock.seconds() - self._last_data
        if silent >= self._empty_timeout:
            log.warn(
                "engine sent nothing for {key} in {secs:g}s: ending the stream",
                key=str(self.key),
                secs=self._empty_timeout,
            )
            self.close(
                "empty_timeout",
                clean=True,
                error=EngineTimeout(f"engine sent no data within {self._empty_timeout:g}s"),
            )
        else:
            self._arm_empty_timer(self._empty_timeout - silent)

    def _start_linger(self) -> None:
        self._cancel_linger()
        if self._linger <= 0:
            self.close("client_disconnected")
        else:
            self._linger_call = self._clock.callLater(self._linger, self._linger_expired)

    def _linger_expired(self) -> None:
        self._linger_call = None
        if not self.sinks:
            self.close("client_disconnected")

    def _cancel_linger(self) -> None:
        if self._linger_call is not None:
            if self._linger_call.active():
                self._linger_call.cancel()
            self._linger_call = None

    # -- close -------------------------------------------------------------------

    def close(self, reason: str, *, clean: bool = True, error: Optional[BaseException] = None) -> None:
        """
        End the session: players get their ending, the engine gets its stop
        command and its connection closed. Idempotent.
        """
        if self.closed:
            return
        self.state = self.CLOSED
        self.close_reason = reason
        self._cancel_linger()
        if self._empty_call is not None and self._empty_call.active():
            self._empty_call.cancel()
        self._empty_call = None
        if error is None:
            error = EngineError(f"stream ended ({reason}) before any data")
        for sink in tuple(self.sinks):
            sink.end(clean, error)
        for sink in tuple(self.sinks):  # sinks that did not detach themselves
            self.detach(sink)
        if self._start_d is not None and not self._start_d.called:
            self._start_d.cancel()
        transport, self._upstream_transport = self._upstream_transport, None
        if transport is not None:
            transport.stopProducing()
        if self.info is not None and self.engine is not None:
            self.stop_result = self._send_stop(self.engine, self.info)
        self._on_closed(self, reason)

    def _send_stop(self, engine: EngineClient, info: PlaybackInfo) -> Deferred:
        d = engine.stop(info)

        def stopped(_: Any) -> None:
            log.debug("engine stopped session {sid}", sid=info.playback_session_id)

        def failed(f: Failure) -> None:
            log.warn(
                "stop command for {key} failed ({msg}); playback connection closed anyway",
                key=str(self.key),
                msg=f.getErrorMessage(),
            )

        return d.addCallbacks(stopped, failed)
