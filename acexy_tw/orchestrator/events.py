"""
stream_started / stream_ended, reported in the background.

One ``stream_started`` per engine session (not per client), sent once the
engine accepted the session and its playback is open; one ``stream_ended`` per
session with exactly the ``labels.stream_id`` that was sent. Reports never delay
or break streaming: they run in the background, a transient failure is retried
under the one retry policy (bounded count, spaced, capped), and only sessions on orchestrated engines are
reported (the configured fallback engine is not the orchestrator's).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from acexy_tw.logs import get_logger
from acexy_tw.orchestrator.client import (
    OrchestratorAuthError,
    OrchestratorClient,
    OrchestratorUnavailable,
    stream_started_event,
)
from acexy_tw.retry import RetryPolicy, retrying

log = get_logger(__name__)


class EventReporter:
    def __init__(
        self,
        orchestrator: OrchestratorClient,
        clock: IReactorTime,
        *,
        retry: RetryPolicy = RetryPolicy(3, initial=1.0, cap=10.0),
        on_auth_error: Optional[Callable[[str, int], None]] = None,
    ) -> None:
        self._orch = orchestrator
        self._clock = clock
        self.retry = retry
        self._on_auth_error = on_auth_error
        self._started: dict[int, tuple[str, str]] = {}  # id(session) -> (container_id, stream_id)
        self._pending: set[Deferred] = set()
        self.sent = {"started": 0, "ended": 0, "failed": 0}

    def started(self, session: Any) -> None:
        engine, info = session.engine, session.info
        container_id = getattr(engine, "container_id", None)
        if container_id is None or info is None or id(session) in self._started:
            return
        event = stream_started_event(
            container_id=container_id,
            engine_host=engine.address.host,
            engine_port=engine.address.port,
            key_type=session.key.key_type,
            key=session.key.value,
            playback_session_id=info.playback_session_id,
            stat_url=info.stat_url,
            command_url=info.command_url,
            is_live=info.is_live,
        )
        stream_id = event["labels"]["stream_id"]
        self._started[id(session)] = (container_id, stream_id)
        session.stream_id = stream_id
        self._send("started", lambda: self._orch.stream_started(event), stream_id)

    def ended(self, session: Any, reason: str) -> None:
        entry = self._started.pop(id(session), None)
        if entry is None:  # never reported started (refused, or not orchestrated)
            return
        container_id, stream_id = entry
        self._send("ended", lambda: self._orch.stream_ended(container_id, stream_id, reason), stream_id)

    def _send(self, what: str, call: Callable[[], Deferred], stream_id: str) -> None:
        d = Deferred.fromCoroutine(self._with_retries(what, call, stream_id))
        self._pending.add(d)
        d.addBoth(lambda r: (self._pending.discard(d), None)[1])

    async def _with_retries(self, what: str, call: Callable[[], Deferred], stream_id: str) -> None:
        def retryable(e: BaseException) -> bool:
            return isinstance(e, OrchestratorUnavailable)  # a 4xx: retrying will not help

        try:
            await retrying(self.retry, self._clock, call, retryable=retryable)
        except Exception as e:
            self.sent["failed"] += 1
            if isinstance(e, OrchestratorAuthError) and self._on_auth_error is not None:
                self._on_auth_error(f"stream_{what}", e.http_status)
            log.warn("stream_{what} for {sid} not reported: {error}", what=what, sid=stream_id, error=str(e))
            return
        self.sent[what] += 1

    def flush(self) -> Deferred:
        """Fires when every report in flight is done (for shutdown)."""
        if not self._pending:
            return succeed(None)
        return DeferredList(list(self._pending), consumeErrors=True).addCallback(lambda _: None)

