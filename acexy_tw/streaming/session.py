"""
EngineSession: one content's engine session, shared by all its players — the
lifecycle *policy* over three parts:

- :class:`~acexy_tw.streaming.lifecycle.Lifecycle` — the state machine
  (starting → waiting → streaming → recovering → lingering → closed); what
  players get and which timers run follow from its state;
- :class:`~acexy_tw.streaming.upstream.EngineConnection` — the engine's
  playback body as a producer (TS-aligned pieces, pause/resume, silence);
- :class:`~acexy_tw.streaming.fanout.Fanout` — the players and the flow policy
  (hold the engine back only while every player is paused);
- :class:`~acexy_tw.streaming.joiner.FastStart` — the stream since the latest
  keyframe, fed every piece before the players get it: a player joining a
  streaming session gets it first (PAT, PMT, the stream from the keyframe),
  then the live pieces. Dropped when the engine goes (failover, close).

Failover is bounded by *incidents*: an incident starts when a streaming
engine fails with players attached to a live stream, and ends only after real
data has flowed for ``failover_reset`` seconds. Within one incident at most
``failover.attempts`` new engine sessions are opened — the first at once, the
later ones spaced by the retry policy — and an engine that failed in the
incident is tried last. When the budget is spent the players get a clean end
and the session closes. So an engine that answers and resets at once, again
and again, costs ``attempts`` + 1 engine sessions, never a storm.

A wait-class refusal (VPN down, breaker open, no capacity) puts the session in
``waiting`` if the :class:`WaitQueue` admits it; the queue re-tries it when
the health snapshot changes or a local session frees an engine — never on a
blind timer.

Closing always does both: the stop command goes to the engine (bounded, its
failure only logged) and the playback connection is closed, whatever failed
first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol as TypingProtocol

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from acexy_tw.content import ContentKey
from acexy_tw.engine import ContentError, EngineClient, EngineError, PlaybackInfo, discard_body
from acexy_tw.logs import get_logger
from acexy_tw.retry import Budget, RetryPolicy
from acexy_tw.stats import SessionStats, session_fields
from acexy_tw.streaming.budget import BacklogBudget
from acexy_tw.streaming.fanout import KEEPALIVE, KEEPALIVE_CHUNK, Fanout
from acexy_tw.streaming.joiner import FAST_START_CAP, FastStart
from acexy_tw.streaming.lifecycle import (
    CLOSED,
    LINGERING,
    RECOVERING,
    STARTING,
    STREAMING,
    WAITING,
    Lifecycle,
)
from acexy_tw.streaming.sink import ClientSink
from acexy_tw.streaming.upstream import EngineConnection
from acexy_tw.streaming.waiting import WAIT_CODES

log = get_logger(__name__)

__all__ = ["EngineSession", "Incident", "SessionSettings", "PlacementLike", "ShuttingDown", "WaitsLike", "KEEPALIVE", "KEEPALIVE_CHUNK"]

#: silence (seconds) that still counts as "data flowing" when an incident's healthy period is checked
HEALTHY_SILENCE = 5.0


class PlacementLike(TypingProtocol):
    """Finds an engine for a session and starts the session there."""

    async def place(self, key: ContentKey, *, avoid: frozenset = frozenset()) -> tuple[EngineClient, PlaybackInfo]: ...

    def release(self, key: ContentKey) -> None: ...


class WaitsLike(TypingProtocol):
    """What a session needs of the :class:`~acexy_tw.streaming.waiting.WaitQueue`."""

    keepalive_interval: float
    max_wait: float

    def admit(self, session: Any, error: Any) -> bool: ...

    def release(self, session: Any) -> None: ...

    def keepalive_started(self, session: Any) -> None: ...

    def keepalive_stopped(self, session: Any) -> None: ...


class ShuttingDown(EngineError):
    http_status = 503


@dataclass(frozen=True)
class SessionSettings:
    """What every engine session of a proxy is configured with."""

    #: the engine sent nothing this long while we were reading: it stalled
    empty_timeout: float
    #: the last player left: keep the engine session this long (zap back)
    linger: float
    #: new engine sessions within one failover incident, and their spacing
    failover: RetryPolicy = RetryPolicy(0)
    #: real data flowing this long ends an incident
    failover_reset: float = 30.0
    #: seconds between the engine's stat_url polls while streaming (0: never)
    stats_interval: float = 0.0
    #: bytes of stream since the latest keyframe kept for joiners (0: they start at the live edge)
    fast_start: int = FAST_START_CAP
    #: the proxy's ACEXY_MAX_BACKLOG budget, which the fast-start caches count in
    budget: Optional[BacklogBudget] = None


@dataclass
class Incident:
    """A run of engine failures of one session (see the module docstring)."""

    started_at: float
    budget: Budget
    #: engines (container id, else URL) that failed in this incident
    failed: set[str] = field(default_factory=set)


def wait_code(error: Any) -> Optional[str]:
    """The wait-class code of a refusal (None for anything else)."""
    code = getattr(error, "code", None)
    return code if code in WAIT_CODES else None


class EngineSession:
    STARTING, WAITING, STREAMING, RECOVERING, LINGERING, CLOSED = (
        STARTING,
        WAITING,
        STREAMING,
        RECOVERING,
        LINGERING,
        CLOSED,
    )

    def __init__(
        self,
        key: ContentKey,
        placement: PlacementLike,
        clock: IReactorTime,
        settings: SessionSettings,
        *,
        on_closed: Callable[["EngineSession", str], None],
        on_streaming: Optional[Callable[["EngineSession"], None]] = None,
        on_engine_lost: Optional[Callable[["EngineSession", str], None]] = None,
        waits: Optional[WaitsLike] = None,
    ) -> None:
        self.key = key
        self.engine: Optional[EngineClient] = None
        self.info: Optional[PlaybackInfo] = None
        self.created_at = clock.seconds()
        self.streaming_since: Optional[float] = None
        self.close_reason: Optional[str] = None
        self.stop_result: Optional[Deferred] = None
        self.stream_id: Optional[str] = None  # set when reported to the orchestrator
        self.waiting_reason: Optional[str] = None
        self.waiting_since: Optional[float] = None
        self.hold_error: Optional[EngineError] = None
        #: engine sessions this session opened (getstream accepted), failovers included
        self.engine_sessions = 0
        self.failovers = 0
        self.last_gap: Optional[float] = None  # seconds without real data in the last recovery
        self.incident: Optional[Incident] = None
        self._bytes_in_done = 0
        self._placement = placement
        self._on_streaming = on_streaming
        self._on_engine_lost = on_engine_lost
        self._waits = waits
        self._failover = settings.failover
        self._failover_reset = settings.failover_reset
        self._clock = clock
        self._empty_timeout = settings.empty_timeout
        self._linger = settings.linger
        self._on_closed = on_closed
        self._fanout = Fanout()
        self._fast = FastStart(cap=settings.fast_start, budget=settings.budget, name=str(key)) if settings.fast_start > 0 else None
        self._life = Lifecycle(self._entered)
        self._conn: Optional[EngineConnection] = None
        self._start_d: Optional[Deferred] = None
        self._linger_call: Optional[IDelayedCall] = None
        self._attempt_call: Optional[IDelayedCall] = None
        self._healthy_call: Optional[IDelayedCall] = None
        self._keepalive: Optional[LoopingCall] = None
        self._retry_waiters: list[Deferred] = []
        self._gap_started: Optional[float] = None
        self._last_piece_at = 0.0
        self._healthy_silence = min(HEALTHY_SILENCE, settings.empty_timeout)
        self.stats = SessionStats(clock, settings.stats_interval, self._stat, lambda: (self.bytes_in, self.bytes_out))

    def __repr__(self) -> str:
        return f"<EngineSession {self.key} {self.state} clients={len(self.sinks)}>"

    # -- status ------------------------------------------------------------------

    @property
    def state(self) -> str:
        return self._life.state

    @property
    def sinks(self) -> list:
        return self._fanout.sinks

    @property
    def bytes_in(self) -> int:
        return self._bytes_in_done + (self._conn.bytes_in if self._conn is not None else 0)

    @property
    def bytes_out(self) -> int:
        return self._fanout.bytes_out

    @property
    def upstream_paused(self) -> bool:
        return self._conn is not None and self._conn.paused

    @property
    def closed(self) -> bool:
        # ``close_reason`` is set first thing in close(): a close that runs
        # inside a transition (a player cut by the keepalive that entering
        # ``recovering`` sends) is already closed for everything after it,
        # although Automat applies the ``close`` input once that transition ends.
        return self.close_reason is not None or self.state == CLOSED

    @property
    def waiting(self) -> bool:
        """Players are being kept alive with null packets."""
        return self._life.keepalive

    def describe(self) -> dict[str, Any]:
        """This session as the status page shows it."""
        now = self._clock.seconds()
        return {
            **session_fields(self, now),
            "clients": len(self.sinks),
            "engine_paused": self.upstream_paused,
            "waiting_reason": self.waiting_reason,
            "waiting": None if self.waiting_since is None else round(now - self.waiting_since, 1),
            "failovers": self.failovers,
            "engine_sessions": self.engine_sessions,
            "failover_attempts_left": None if self.incident is None else self.incident.budget.remaining,
            "client_list": [
                {
                    "peer": s.peer,
                    "bytes": s.bytes_sent,
                    "backlog": s.backlog_bytes,
                    "paused": s.paused,
                    "connected": round(now - s.connected_at, 1),
                }
                for s in self.sinks
            ],
        }

    # -- the state machine's entries: what each state runs ---------------------------

    def _entered(self, old: str, new: str) -> None:
        if new in (WAITING, RECOVERING):
            self._keepalive_on()
        else:
            self._keepalive_off()
        if new != LINGERING:
            self._cancel(self._linger_call)
            self._linger_call = None
        if new == LINGERING:
            self._arm_linger()
        if new != RECOVERING:
            self._cancel(self._attempt_call)
            self._attempt_call = None
        if new != STREAMING:
            self._cancel(self._healthy_call)
            self._healthy_call = None
        if new == STREAMING and self.streaming_since is None:
            self.streaming_since = self._clock.seconds()
        if new in (STREAMING, LINGERING) and self.close_reason is None:  # the engine's playback is open
            self.stats.start()
        else:
            self.stats.stop()

    def _stat(self) -> Optional[Deferred]:
        """One stat request to the current engine (SessionStats' fetch)."""
        if self.engine is None or self.info is None:
            return None
        return self.engine.stat(self.info)

    @staticmethod
    def _cancel(call: Optional[IDelayedCall]) -> None:
        if call is not None and call.active():
            call.cancel()

    # -- start -------------------------------------------------------------------

    def start(self) -> None:
        """Begin placement and the engine handshake (no-op if already begun)."""
        if self._start_d is not None or self.closed:
            return
        self._begin()

    def retry(self) -> Deferred:
        """Try a waiting session again (the WaitQueue's call). Fires True once it
        streams, False if it is still told to wait or it closed."""
        if self.state != WAITING:
            return succeed(self.state in (STREAMING, LINGERING))
        d: Deferred = Deferred()
        self._retry_waiters.append(d)
        if self._start_d is None or self._start_d.called:  # one placement in flight at most
            self._begin()
        return d

    def when_settled(self, d: Deferred) -> None:
        """Fire ``d`` with True once streaming, False if waiting or closed first."""
        if self.state in (STREAMING, LINGERING):
            d.callback(True)
        elif self.state in (CLOSED, WAITING):
            d.callback(False)
        else:
            self._retry_waiters.append(d)

    def _begin(self) -> None:
        d = Deferred.fromCoroutine(self._place())
        self._start_d = d
        d.addErrback(self._start_failed)

    async def _place(self) -> None:
        avoid: frozenset = frozenset()
        if self.incident is not None:
            self._placement.release(self.key)  # the failed engine's slot
            avoid = frozenset(self.incident.failed)
        engine, info = await self._placement.place(self.key, avoid=avoid)
        self.engine, self.info = engine, info
        self.engine_sessions += 1
        if self.closed:  # closed while the engine accepted: close() could not stop it
            self._send_stop(engine, info)
            self.info = None
            return
        response = await engine.open_playback(info)
        if self.closed:  # closed while the headers were on their way
            discard_body(response)
            return
        self._stream(response)

    def _stream(self, response: Any) -> None:
        assert self.engine is not None
        conn = EngineConnection(response, self._clock, empty_timeout=self._empty_timeout, listener=self)
        self._conn = conn
        conn.set_paused(self._fanout.hold_engine)
        self._life.inputs.opened()
        if self._waits is not None:
            self._waits.release(self)
        now = self._clock.seconds()
        log.info(
            "engine session for {key} streaming from {engine} after {secs:.3f}s",
            key=str(self.key),
            engine=self.engine.address.url,
            secs=now - self.created_at,
        )
        if self._on_streaming is not None:
            self._on_streaming(self)  # before any byte: a body that ends at once is reported in order
        # deliverBody hands over any body bytes already buffered, synchronously:
        # the sinks are attached already, so the first bytes reach them.
        conn.start()
        if self._conn is not conn:  # it ended synchronously
            return
        self._fire_retry_waiters(True)
        if not self.sinks:  # a pre-warmed session, or everyone left meanwhile
            self._emptied()

    def _start_failed(self, failure: Failure) -> None:
        if self.closed:
            if not failure.check(CancelledError):
                log.debug("start of {key} failed after close: {f}", key=str(self.key), f=failure.getErrorMessage())
            return
        error = failure.value if failure.check(EngineError) else EngineError(failure.getErrorMessage())
        code = wait_code(error)
        if code is not None and self.sinks and self._waits is not None and self._waits.admit(self, error):
            self._hold(error, code)
            return
        if self.state == RECOVERING and code is None and not isinstance(error, ContentError):
            log.warn(
                "failover attempt {n} of {of} for {key} failed: {error}",
                n=self.incident.budget.used if self.incident else 0,
                of=self._failover.attempts,
                key=str(self.key),
                error=str(error),
            )
            self._engine_failed_in_incident()
            self._drop_engine()
            self._next_attempt(error)
            return
        log.warn("engine session for {key} failed to start: {reason}", key=str(self.key), reason=str(error))
        # Players already kept alive got a 200: they get a clean end and retry.
        self.close("engine_error", clean=self.waiting, error=error)

    # -- waiting -------------------------------------------------------------------

    def _hold(self, error: EngineError, code: str) -> None:
        first = self.state != WAITING
        self.hold_error = error
        self.waiting_reason = code
        self._life.inputs.told_to_wait()
        if first:
            log.info("holding {n} player(s) of {key}: {code}", n=len(self.sinks), key=str(self.key), code=code)
        self._fire_retry_waiters(False)

    def _keepalive_on(self) -> None:
        if self._keepalive is not None:
            return
        now = self._clock.seconds()
        self.waiting_since = now
        if self._gap_started is None:
            self._gap_started = now
        if self.waiting_reason is None:
            self.waiting_reason = "failover" if self.state == RECOVERING else "waiting"
        interval = self._waits.keepalive_interval if self._waits is not None else 1.0
        loop = LoopingCall(self._keepalive_tick)
        loop.clock = self._clock
        self._keepalive = loop
        if self._waits is not None:
            self._waits.keepalive_started(self)
        loop.start(interval, now=True).addErrback(lambda f: log.failure("keepalive failed", f))

    def _keepalive_off(self) -> None:
        loop, self._keepalive = self._keepalive, None
        if loop is None:
            return
        if loop.running:
            loop.stop()
        if self._waits is not None:
            self._waits.keepalive_stopped(self)
        self._fanout.stop_waiting()
        self.waiting_reason = None
        self.waiting_since = None
        if self._gap_started is not None:
            self.last_gap = self._clock.seconds() - self._gap_started
            self._gap_started = None

    def _keepalive_tick(self) -> None:
        max_wait = self._waits.max_wait if self._waits is not None else float("inf")
        self._fanout.keepalive(self._clock.seconds(), max_wait, str(self.key))

    def _fire_retry_waiters(self, result: bool) -> None:
        waiters, self._retry_waiters = self._retry_waiters, []
        for d in waiters:
            d.callback(result)

    # -- sinks (the ClientSink's owner interface) ---------------------------------------

    def attach(self, sink: ClientSink) -> None:
        if self.closed:
            raise RuntimeError("attach to a closed session")
        sink.session = self
        self._fanout.add(sink)
        self._cancel(self._linger_call)
        self._linger_call = None
        if self.state == LINGERING:
            self._life.inputs.joined()
        if self.waiting:  # "200 at once" for a player joining a waiting session
            sink.deliver(KEEPALIVE)
        elif self._fast is not None and self._conn is not None:
            self._fanout.replay(sink, self._fast)  # the picture at once: from the latest keyframe
        self._update_flow()

    def detach(self, sink: ClientSink) -> None:
        if not self._fanout.remove(sink) or self.closed:
            return
        if not self.sinks:
            if self.waiting:
                # Nobody waits for it any more: place nothing for nobody.
                self.close("client_disconnected")
                return
            if self.state == STREAMING:
                self._emptied()
                if self.closed:
                    return
            elif self.state == STARTING:
                # left before the engine answered: the start is abandoned unless a player comes back
                self._arm_linger()
                if self.closed:
                    return
        self._update_flow()

    def sink_paused(self, sink: ClientSink) -> None:
        self._fanout.set_paused(sink, True)
        self._update_flow()

    def sink_resumed(self, sink: ClientSink) -> None:
        self._fanout.set_paused(sink, False)
        self._update_flow()

    def _update_flow(self) -> None:
        if self._conn is not None:
            self._conn.set_paused(self._fanout.hold_engine)

    def _emptied(self) -> None:
        self._life.inputs.emptied()  # lingering: arms the linger timer

    def _arm_linger(self) -> None:
        self._cancel(self._linger_call)
        self._linger_call = None
        if self._linger <= 0:
            self.close("client_disconnected")
        else:
            self._linger_call = self._clock.callLater(self._linger, self._linger_expired)

    def _linger_expired(self) -> None:
        self._linger_call = None
        if not self.sinks:
            self.close("client_disconnected")

    # -- the engine connection (its UpstreamListener interface) ---------------------------

    def upstream_piece(self, piece: bytes) -> None:
        if self.incident is not None and self.state == STREAMING:
            # A healthy period is real data without a gap longer than HEALTHY_SILENCE.
            now = self._clock.seconds()
            if self._healthy_call is None or now - self._last_piece_at > self._healthy_silence:
                self._cancel(self._healthy_call)
                self._healthy_call = self._clock.callLater(self._failover_reset, self._check_healthy)
            self._last_piece_at = now
        if self._fast is not None:
            self._fast.feed(piece)  # first: a player attaching after this piece has it in the cache
        self._fanout.deliver(piece)

    def upstream_lost(self, reason: str, *, clean: bool, error: EngineError) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._bytes_in_done += conn.bytes_in
        if self._fast is not None:
            self._fast.reset()  # that stream is over: a joiner must not start in it
        if self.closed:
            return
        if reason == "engine_eof":
            log.info("engine ended the stream of {key} (EOF)", key=str(self.key))
        else:
            log.warn("engine stream of {key} lost ({reason}): {msg}", key=str(self.key), reason=reason, msg=str(error))
        live = self.info is not None and self.info.is_live
        if self.state == STREAMING and live and self.sinks and self._failover.attempts > 0:
            self._recover(reason, conn)
        else:
            self.close(reason, clean=clean, error=error)

    # -- failover --------------------------------------------------------------------

    def _recover(self, reason: str, conn: Optional[EngineConnection]) -> None:
        now = self._clock.seconds()
        if self.incident is None:
            self.incident = Incident(now, self._failover.budget())
        self._engine_failed_in_incident()
        self.failovers += 1
        log.warn(
            "engine for {key} lost ({reason}) with {n} player(s) attached: failing over ({left} attempt(s) left)",
            key=str(self.key),
            reason=reason,
            n=len(self.sinks),
            left=self.incident.budget.remaining,
        )
        if self._on_engine_lost is not None:
            self._on_engine_lost(self, "failover")
        self._drop_engine()
        # the players' gap began with the last real byte
        self._gap_started = conn.last_data if conn is not None else now
        self._life.inputs.engine_failed()
        if self.closed:  # its keepalive let the last player go
            return
        self._next_attempt(None)

    def _engine_failed_in_incident(self) -> None:
        if self.incident is not None and self.engine is not None:
            self.incident.failed.add(getattr(self.engine, "container_id", None) or self.engine.address.url)

    def _next_attempt(self, last: Optional[BaseException]) -> None:
        assert self.incident is not None
        delay = self.incident.budget.spend()
        if delay is None:
            secs = self._clock.seconds() - self.incident.started_at
            log.warn(
                "giving up on {key}: {n} failover attempt(s) in {secs:.1f}s did not bring the stream back",
                key=str(self.key),
                n=self._failover.attempts,
                secs=secs,
            )
            self.close("engine_error", clean=True, error=EngineError(f"no engine after {self._failover.attempts} failover attempts: {last}"))
            return
        if delay <= 0:
            self._begin()
        else:
            self._attempt_call = self._clock.callLater(delay, self._attempt)

    def _attempt(self) -> None:
        self._attempt_call = None
        if self.state == RECOVERING:
            self._begin()

    def _check_healthy(self) -> None:
        """``failover_reset`` seconds after real data came back: is it still flowing?"""
        self._healthy_call = None
        if self.incident is None or self._conn is None or self.state != STREAMING:
            return
        if self._clock.seconds() - self._last_piece_at < self._healthy_silence:
            log.info(
                "stream of {key} healthy again: failover incident over after {n} attempt(s)",
                key=str(self.key),
                n=self.incident.budget.used,
            )
            self.incident = None
        # else: the next piece starts a new healthy period

    def _drop_engine(self) -> None:
        """Close the engine side only: stop command, connection closed."""
        conn, self._conn = self._conn, None
        if self._fast is not None:
            self._fast.reset()  # another engine's stream (or none) comes next: its budget bytes go back
        if conn is not None:
            self._bytes_in_done += conn.bytes_in
            conn.close()
        if self.info is not None and self.engine is not None:
            self.stop_result = self._send_stop(self.engine, self.info)
        self.info = None

    # -- close -------------------------------------------------------------------

    def close(self, reason: str, *, clean: bool = True, error: Optional[BaseException] = None) -> None:
        """
        End the session: players get their ending, the engine gets its stop
        command and its connection closed. Idempotent.
        """
        if self.closed:
            return
        self.close_reason = reason
        self.stats.stop()
        self._life.inputs.close()
        if self._waits is not None:
            self._waits.release(self)
        if error is None:
            error = EngineError(f"stream ended ({reason}) before any data")
        for sink in self._fanout.end_all(clean, error):  # sinks that did not detach themselves
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
