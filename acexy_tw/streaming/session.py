"""
EngineSession: one engine playback session, shared by every player of one
content key.

The session owns the engine side: it asks the placement for an engine (which
starts the session there), opens the playback, reads the body as a
push-producer-driven protocol, and fans each TS-aligned piece out to its
sinks. Flow control policy lives in one method, :meth:`_update_flow`: the
engine connection is paused only while *every* attached player is paused.

States::

    starting ──> streaming ──(engine died, live, players attached)──> failover ──> streaming
       │   ▲                                                              │
       ▼   │ retry (WaitQueue)                                            ▼
      held ┘        any state ──────────────────────────────────────> closed

While *waiting* (held, in a placement back-off, or in failover) the players
are kept connected with null TS packets every ``keepalive_interval`` — that
commits their ``200`` — and each is let go cleanly after ``max_wait``.

Timers (all on the injected clock, all cancelled on close):
- empty timeout: the engine sent nothing for ``empty_timeout`` seconds while we
  were reading — time we paused the engine ourselves does not count;
- linger: the last player left; after ``linger`` seconds the session closes,
  unless a player arrives first (zap back, probe-then-play). A waiting session
  whose last player left closes at once: nothing is provisioned for nobody;
- keepalive: null packets while waiting.

Closing always does both: the stop command goes to the engine (bounded, its
failure only logged) and the playback connection is closed, whatever failed
first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol as TypingProtocol

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from acexy_tw.content import ContentKey
from acexy_tw.engine import EngineClient, EngineError, EngineTimeout, PlaybackInfo, discard_body
from acexy_tw.logs import get_logger
from acexy_tw.streaming.mpegts import PacketAligner, null_packets
from acexy_tw.streaming.sink import ClientSink, chunk

if TYPE_CHECKING:  # pragma: no cover
    from acexy_tw.streaming.waiting import WaitQueue

log = get_logger(__name__)

#: one keepalive write: 7 null packets (1316 bytes, the classic TS-over-UDP unit)
KEEPALIVE = null_packets(7)
KEEPALIVE_CHUNK = chunk(KEEPALIVE)


class PlacementLike(TypingProtocol):
    """Finds an engine for a session and starts the session there."""

    async def place(
        self,
        key: ContentKey,
        *,
        avoid: frozenset = frozenset(),
        on_wait: Optional[Callable[[Any], None]] = None,
    ) -> tuple[EngineClient, PlaybackInfo]: ...

    def release(self, key: ContentKey) -> None: ...

    def restarted(self, key: ContentKey, info: PlaybackInfo) -> None: ...


class ShuttingDown(EngineError):
    http_status = 503


class _Upstream(Protocol):
    """The engine's playback body; ``self.transport`` pauses the engine socket."""

    def __init__(self, session: "EngineSession") -> None:
        self._session = session

    def connectionMade(self) -> None:
        self._session._upstream_connected(self, self.transport)

    def dataReceived(self, data: bytes) -> None:
        self._session._upstream_data(self, data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._session._upstream_lost(self, reason)


class EngineSession:
    STARTING, HELD, STREAMING, FAILOVER, CLOSED = "starting", "held", "streaming", "failover", "closed"

    def __init__(
        self,
        key: ContentKey,
        placement: PlacementLike,
        clock: IReactorTime,
        *,
        empty_timeout: float,
        linger: float,
        on_closed: Callable[["EngineSession", str], None],
        on_streaming: Optional[Callable[["EngineSession"], None]] = None,
        on_engine_lost: Optional[Callable[["EngineSession", str], None]] = None,
        waits: Optional["WaitQueue"] = None,
        failover_attempts: int = 0,
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
        self.waiting_reason: Optional[str] = None
        self.waiting_since: Optional[float] = None
        self.hold_error: Optional[EngineError] = None
        self.failovers = 0
        self.last_gap: Optional[float] = None  # seconds without real data in the last failover
        self._placement = placement
        self._on_streaming = on_streaming
        self._on_engine_lost = on_engine_lost
        self._waits = waits
        self._failover_attempts = failover_attempts
        self._clock = clock
        self._empty_timeout = empty_timeout
        self._linger = linger
        self._on_closed = on_closed
        self._aligner = PacketAligner()
        self._paused_sinks: set[int] = set()
        self._upstream: Optional[_Upstream] = None
        self._upstream_transport: Any = None
        self._upstream_paused = False
        self._start_d: Optional[Deferred] = None
        self._linger_call: Optional[IDelayedCall] = None
        self._empty_call: Optional[IDelayedCall] = None
        self._keepalive: Optional[LoopingCall] = None
        self._waiting_since: dict[int, float] = {}
        self._retry_waiters: list[Deferred] = []
        self._gap_started: Optional[float] = None
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

    @property
    def waiting(self) -> bool:
        """Players are being kept alive with null packets."""
        return self._keepalive is not None

    # -- start -------------------------------------------------------------------

    def start(self) -> None:
        """Begin placement and the engine handshake (no-op if already begun)."""
        if self._start_d is not None or self.closed:
            return
        self._begin(self._start())

    def retry(self) -> Deferred:
        """Try a held session again (the WaitQueue's call). Fires True once it
        streams, False if it is still told to wait or it closed."""
        if self.state != self.HELD:
            return succeed(self.state == self.STREAMING)
        d: Deferred = Deferred()
        self._retry_waiters.append(d)
        self.state = self.STARTING
        self._begin(self._start())
        return d

    def when_settled(self, d: Deferred) -> None:
        """Fire ``d`` with True once streaming, False if held or closed first."""
        if self.state == self.STREAMING:
            d.callback(True)
        elif self.closed:
            d.callback(False)
        else:
            self._retry_waiters.append(d)

    def _begin(self, coroutine: Any) -> None:
        d = Deferred.fromCoroutine(coroutine)
        self._start_d = d
        d.addErrback(self._start_failed)

    async def _start(self) -> None:
        engine, info = await self._placement.place(self.key, on_wait=self._placement_waits)
        await self._open(engine, info)

    async def _open(self, engine: EngineClient, info: PlaybackInfo) -> None:
        self.engine, self.info = engine, info
        if self.closed:  # closed while the engine accepted: close() could not stop it
            self._send_stop(engine, info)
            return
        response = await engine.open_playback(info)
        if self.closed:  # closed while the headers were on their way
            discard_body(response)
            return
        self._begin_streaming(response)

    def _begin_streaming(self, response: Any) -> None:
        now = self._clock.seconds()
        self.state = self.STREAMING
        self.streaming_since = now
        self._last_data = now
        self._arm_empty_timer(self._empty_timeout)
        self._keepalive_off()
        if self._waits is not None:
            self._waits.release(self)
        assert self.engine is not None
        log.info(
            "engine session for {key} streaming from {engine} after {secs:.3f}s",
            key=str(self.key),
            engine=self.engine.address.url,
            secs=now - self.created_at,
        )
        # deliverBody hands over any body bytes already buffered, synchronously:
        # the sinks are attached already, so the first bytes reach them.
        response.deliverBody(_Upstream(self))
        if self.closed:
            return
        if self._on_streaming is not None:
            self._on_streaming(self)
        self._fire_retry_waiters(True)
        if not self.sinks:  # a pre-warmed session, or everyone left meanwhile
            self._start_linger()

    def _start_failed(self, failure: Failure) -> None:
        if self.closed:
            if not failure.check(CancelledError):
                log.debug("start of {key} failed after close: {f}", key=str(self.key), f=failure.getErrorMessage())
            return
        error = failure.value if failure.check(EngineError) else EngineError(failure.getErrorMessage())
        if self.sinks and self._waits is not None and self._waits.admit(self, error):
            self._hold(error)
            return
        log.warn(
            "engine session for {key} failed to start: {reason}",
            key=str(self.key),
            reason=failure.getErrorMessage(),
        )
        # Players already kept alive got a 200: they get a clean end and retry.
        self.close("engine_error", clean=self.waiting, error=error)

    # -- waiting -------------------------------------------------------------------

    def _hold(self, error: EngineError) -> None:
        self.state = self.HELD
        self.hold_error = error
        code = getattr(error, "code", "blocked")
        if not self.waiting:
            log.info("holding {n} player(s) of {key}: {code}", n=len(self.sinks), key=str(self.key), code=code)
        self._keepalive_on(code)
        self._fire_retry_waiters(False)

    def _placement_waits(self, error: Any) -> None:
        """Placement is backing off before a retry: keep the players alive meanwhile."""
        if self.sinks and self._waits is not None and self._waits.holdable(getattr(error, "code", None)):
            self._keepalive_on(getattr(error, "code", "waiting"))

    def _keepalive_on(self, reason: str) -> None:
        self.waiting_reason = reason
        if self._keepalive is not None:
            return
        now = self._clock.seconds()
        self.waiting_since = now
        if self._gap_started is None:
            self._gap_started = now
        interval = self._waits.keepalive_interval if self._waits is not None else 1.0
        loop = LoopingCall(self._keepalive_tick)
        loop.clock = self._clock
        self._keepalive = loop
        loop.start(interval, now=True).addErrback(lambda f: log.failure("keepalive failed", f))

    def _keepalive_off(self) -> None:
        loop, self._keepalive = self._keepalive, None
        if loop is not None and loop.running:
            loop.stop()
        self._waiting_since.clear()
        self.waiting_reason = None
        self.waiting_since = None
        if self._gap_started is not None:
            self.last_gap = self._clock.seconds() - self._gap_started
            self._gap_started = None

    def _keepalive_tick(self) -> None:
        """Null packets for every waiting player; let go those past max_wait."""
        now = self._clock.seconds()
        max_wait = self._waits.max_wait if self._waits is not None else float("inf")
        for sink in tuple(self.sinks):
            since = self._waiting_since.setdefault(id(sink), now)
            if now - since >= max_wait:
                log.info("player {peer} waited {s:g}s for {key}: letting it go", peer=sink.peer, s=max_wait, key=str(self.key))
                sink.end(True, None)  # it got packets: a clean end, and it retries
            else:
                sink.deliver(KEEPALIVE, KEEPALIVE_CHUNK)

    def _fire_retry_waiters(self, result: bool) -> None:
        waiters, self._retry_waiters = self._retry_waiters, []
        for d in waiters:
            d.callback(result)

    # -- sinks -------------------------------------------------------------------

    def attach(self, sink: ClientSink) -> None:
        if self.closed:
            raise RuntimeError("attach to a closed session")
        sink.session = self
        self.sinks.append(sink)
        self._cancel_linger()
        if sink.paused:
            self._paused_sinks.add(id(sink))
        if self.waiting:  # "200 at once" for a player joining a held session
            self._waiting_since[id(sink)] = self._clock.seconds()
            sink.deliver(KEEPALIVE)
        self._update_flow()

    def detach(self, sink: ClientSink) -> None:
        if sink not in self.sinks:
            return
        self.sinks.remove(sink)
        self._paused_sinks.discard(id(sink))
        self._waiting_since.pop(id(sink), None)
        self.bytes_out_done += sink.bytes_sent
        if self.closed:
            return
        if not self.sinks:
            if self.waiting:
                # Nobody waits for it any more: provision nothing for nobody.
                self.close("client_disconnected")
                return
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

    def _upstream_connected(self, upstream: _Upstream, transport: Any) -> None:
        self._upstream = upstream
        self._upstream_transport = transport
        self._upstream_paused = False
        self._update_flow()

    def _upstream_data(self, upstream: _Upstream, data: bytes) -> None:
        if self.closed or upstream is not self._upstream:
            return
        self._last_data = self._clock.seconds()
        if self.first_byte_at is None:
            self.first_byte_at = self._last_data
        self.bytes_in += len(data)
        piece = self._aligner.feed(data)  # (also while nobody watches: it keeps the alignment)
        if piece and self.sinks:
            framed = chunk(piece)  # framed once, shared by every player
            for sink in tuple(self.sinks):
                sink.deliver(piece, framed)

    def _upstream_lost(self, upstream: _Upstream, reason: Failure) -> None:
        if upstream is not self._upstream:
            return  # an old engine connection we dropped ourselves
        self._upstream = None
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
            self._engine_gone(
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
            self._engine_gone("engine_error", clean=False, error=EngineError(f"engine connection broke: {msg}"))

    def _engine_gone(self, reason: str, *, clean: bool, error: EngineError) -> None:
        """The engine stopped delivering: fail over if players are watching a live stream."""
        live = self.info is not None and self.info.is_live
        if live and self.sinks and self._failover_attempts > 0 and self.state == self.STREAMING:
            self._failover(reason)
        else:
            self.close(reason, clean=clean, error=error)

    # -- failover ------------------------------------------------------------------

    def _failover(self, reason: str) -> None:
        old_engine = self.engine
        self.failovers += 1
        log.warn(
            "engine for {key} lost ({reason}) with {n} player(s) attached: failing over",
            key=str(self.key),
            reason=reason,
            n=len(self.sinks),
        )
        self._drop_engine()
        self.state = self.FAILOVER
        if self._on_engine_lost is not None:
            self._on_engine_lost(self, "failover")
        self._aligner = PacketAligner()
        self._gap_started = self._last_data  # the players' gap began with the last real byte
        self._keepalive_on("failover")
        assert old_engine is not None
        self._begin(self._failover_start(old_engine))

    async def _failover_start(self, old_engine: EngineClient) -> None:
        last: Optional[BaseException] = None
        for attempt in range(1, self._failover_attempts + 1):
            try:
                if attempt == 1:  # the same engine once: often it only dropped this session
                    engine, info = old_engine, await old_engine.start(self.key)
                    self._placement.restarted(self.key, info)
                else:
                    self._placement.release(self.key)
                    avoid = frozenset({old_engine.container_id}) if old_engine.container_id else frozenset()
                    engine, info = await self._placement.place(self.key, avoid=avoid, on_wait=self._placement_waits)
                await self._open(engine, info)
                return
            except CancelledError:
                raise
            except Exception as e:
                last = e
                log.warn(
                    "failover attempt {n} of {of} for {key} failed: {error}",
                    n=attempt,
                    of=self._failover_attempts,
                    key=str(self.key),
                    error=str(e),
                )
                if self.info is not None and self.engine is not None and self.state != self.STREAMING:
                    self._send_stop(self.engine, self.info)
                    self.info = None
        if getattr(last, "code", None) is not None:
            raise last  # a "wait" answer (VPN down...): the wait queue may hold the players
        raise EngineError(f"no engine after {self._failover_attempts} failover attempts: {last}")

    def _drop_engine(self) -> None:
        """Close the engine side only: stop command, connection closed, timers off."""
        if self._empty_call is not None and self._empty_call.active():
            self._empty_call.cancel()
        self._empty_call = None
        self._upstream = None  # what it still sends is ignored (_upstream_data checks)
        transport, self._upstream_transport = self._upstream_transport, None
        self._upstream_paused = False
        if transport is not None:
            transport.stopProducing()
        if self.info is not None and self.engine is not None:
            self.stop_result = self._send_stop(self.engine, self.info)
        self.info = None

    # -- timers ------------------------------------------------------------------

    def _arm_empty_timer(self, delay: float) -> None:
        self._empty_call = self._clock.callLater(delay, self._check_empty)

    def _check_empty(self) -> None:
        """Fires at most once per ``empty_timeout``; per-chunk cost is one assignment."""
        self._empty_call = None
        if self.closed or self.state != self.STREAMING:
            return
        if self._upstream_paused:
            # We are holding the engine back: not its silence. Look again later.
            self._arm_empty_timer(self._empty_timeout)
            return
        silent = self._clock.seconds() - self._last_data
        if silent >= self._empty_timeout:
            log.warn(
                "engine sent nothing for {key} in {secs:g}s",
                key=str(self.key),
                secs=self._empty_timeout,
            )
            self._engine_gone(
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
        self._keepalive_off()
        if self._waits is not None:
            self._waits.release(self)
        if error is None:
            error = EngineError(f"stream ended ({reason}) before any data")
        for sink in tuple(self.sinks):
            sink.end(clean, error)
        for sink in tuple(self.sinks):  # sinks that did not detach themselves
            self.detach(sink)
        if self._start_d is not None and not self._start_d.called:
            self._start_d.cancel()
        self._drop_engine()
        self._fire_retry_waiters(False)
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
