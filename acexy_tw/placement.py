"""
Placement: where a new engine session runs, and its start there.

``Placement`` is the callable an :class:`EngineSession` awaits; it returns
``(engine client, PlaybackInfo)`` — the engine has *accepted* the session.

- No orchestrator: the engine pool (:mod:`acexy_tw.pool`): the healthy engine
  with the fewest of our sessions and room for one more; one that refuses →
  the next; a content error is final; every engine full → a ``max_capacity``
  wait (players are held until a session ends or an engine comes back).
- Orchestrator: ``GET /engines``, ranked by :func:`selection.rank` counting our
  own sessions the orchestrator does not list yet (reservations are made
  synchronously right after ranking, so concurrent placements never double-book
  an engine); an engine that refuses getstream → the next one; a content error
  (the engine's JSON ``error``) is final — another engine would say the same.
- None has room → provisioning (see :meth:`_provision`), only when the health
  view allows it: never while the monitor says blocked, and never when the
  engines ``/engines`` lists plus our provisions in flight already reach the
  snapshot's ``max_replicas`` (the orchestrator's POST does not enforce it).
  A wait-class refusal of the POST (503 with a code, legacy VPN text, the
  Gluetun-mode 500 "Maximum active replicas limit reached") is reported to the
  monitor and answered at once as a wait: the session waits on the monitor,
  never on a blind sleep. Only a provisioning *timeout* is retried here, under
  the retry policy, after looking in ``/engines`` for the engine we may have
  started. Then poll the new engine until it answers — no fixed sleep — and
  connect to the host/port ``/engines`` lists.
- The orchestrator unreachable (refused, timeout, 5xx) → the engine pool,
  logged once per outage.

Refusals that reach the player are :class:`NoEngine` errors carrying the HTTP
status, a code and a Retry-After.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from acexy_tw.content import ContentKey
from acexy_tw.engine import ContentError, EngineClient, EngineError, NoEngine, PlaybackInfo
from acexy_tw.logs import get_logger
from acexy_tw.orchestrator.client import (
    OrchestratorAuthError,
    OrchestratedEngine,
    OrchestratorClient,
    OrchestratorError,
    OrchestratorUnavailable,
    ProvisionBlocked,
    ProvisionFailed,
    ProvisionTimeout,
    stream_id_for as client_stream_id,
)
from acexy_tw.orchestrator.health import HealthMonitor
from acexy_tw.orchestrator.selection import rank
from acexy_tw.pool import EnginePool
from acexy_tw.retry import RetryPolicy
from acexy_tw.streaming.waiting import WAIT_CODES

log = get_logger(__name__)

#: what players are told, per orchestrator code (acexy-orchestrator's wording)
MESSAGES = {
    "vpn_disconnected": "Service temporarily unavailable: VPN connection is being restored",
    "vpn_error": "Service temporarily unavailable: VPN connection is being restored",
    "circuit_breaker": "Service temporarily unavailable: System is recovering from errors",
    "max_capacity": "Service at capacity: please try again in a moment",
    "unavailable": "Service temporarily unavailable: no engine is running",
}


@dataclass
class Reservation:
    """One of our sessions (or placements in flight) on an orchestrated engine."""

    #: the orchestrator's container id, or a pool engine's URL
    container_id: str
    stream_id: Optional[str] = None  # known once the engine accepted: "<key>|<playback_session_id>"


def _slot(key: ContentKey, hls: bool) -> Any:
    """Reservations of TS and HLS sessions of one content are separate."""
    return ("hls", key) if hls else key


def _start(engine: EngineClient, key: ContentKey, hls: bool) -> Deferred:
    return engine.start_hls(key) if hls else engine.start(key)


def stream_id_for(key: ContentKey, info: PlaybackInfo) -> str:
    """The id the session is reported under (so the orchestrator's /engines lists it)."""
    return client_stream_id(key.value, info.playback_session_id)


class Placement:
    def __init__(
        self,
        *,
        engines: EnginePool,
        make_engine: Callable[[str, int, Optional[str]], EngineClient],
        clock: IReactorTime,
        orchestrator: Optional[OrchestratorClient] = None,
        monitor: Optional[HealthMonitor] = None,
        max_streams: int = 1,
        health_interval: float = 30.0,
        outage_poll_interval: float = 10.0,
        engine_ready_timeout: float = 30.0,
        ready_poll: float = 0.25,
        attempts: int = 3,
        retry: Optional[RetryPolicy] = None,
    ) -> None:
        #: the engine pool: without an orchestrator, and while it is unreachable
        self.engines = engines
        self._make_engine = make_engine
        self._clock = clock
        self.orchestrator = orchestrator
        self.monitor = monitor
        self.max_streams = max_streams
        self.health_interval = health_interval
        self.outage_poll_interval = outage_poll_interval
        self.engine_ready_timeout = engine_ready_timeout
        self.ready_poll = ready_poll
        #: provisioning re-posts after a timeout (the only retry placement makes)
        self.retry = retry or RetryPolicy(attempts)
        self.reservations: dict[Any, Reservation] = {}
        self.in_outage = False
        self.fallbacks = 0
        self.provision_attempts: dict[str, int] = {}
        #: provisions posted and not yet answered (they count toward max_replicas)
        self.provisioning = 0
        self._engines: dict[tuple[str, int], EngineClient] = {}
        #: failed session starts on an engine, by EngineError.kind (refusals, NoEngine, not counted)
        self.engine_errors: dict[str, int] = {}

    # -- placing -----------------------------------------------------------------

    async def place(
        self,
        key: ContentKey,
        *,
        avoid: frozenset = frozenset(),
        hls: bool = False,
    ) -> tuple[EngineClient, PlaybackInfo]:
        """
        An engine that accepted a session for ``key``. ``avoid``: container ids
        tried last (engines that failed in a failover incident): used only when
        no other engine has room, before provisioning. ``hls``: an HLS session
        (its own reservation).
        """
        if self.orchestrator is None:
            return await self._place_in_pool(key, avoid, hls)
        try:
            engines = await self.orchestrator.engines()
        except OrchestratorUnavailable as e:
            return await self._fall_back(key, e, avoid, hls)
        self._reachable()
        tried: set[str] = set()
        while True:
            extra = self._extra_load(engines)
            candidates = [
                e for e in rank(engines, max_streams=self.max_streams, extra_load=extra) if e.container_id not in tried
            ]
            candidates.sort(key=lambda e: e.container_id in avoid)  # stable: the ranking stays within each group
            if not candidates:
                break
            engine = candidates[0]
            tried.add(engine.container_id)
            started = await self._start_on(key, engine, hls=hls)
            if started is not None:
                return started
        engine = await self._provision(key, engines)
        if engine is None:  # the orchestrator went away meanwhile
            return await self._fall_back(key, OrchestratorUnavailable("no status"), avoid, hls)
        started = await self._start_on(key, engine, last=True, hls=hls)
        assert started is not None
        return started

    def release(self, key: ContentKey, *, hls: bool = False) -> None:
        """The session for ``key`` ended: its engine slot is free again."""
        self.reservations.pop(_slot(key, hls), None)

    # -- helpers -------------------------------------------------------------------

    def _extra_load(self, engines: list[OrchestratedEngine]) -> dict[str, int]:
        """Our sessions each engine does not list yet (in flight or unreported)."""
        listed = {e.container_id: set(e.streams) for e in engines}
        extra: dict[str, int] = {}
        for r in self.reservations.values():
            if r.stream_id is None or r.stream_id not in listed.get(r.container_id, ()):
                extra[r.container_id] = extra.get(r.container_id, 0) + 1
        return extra

    def engine_for(self, engine: OrchestratedEngine) -> EngineClient:
        where = (engine.host, engine.port)
        client = self._engines.get(where)
        if client is None or client.container_id != engine.container_id:
            client = self._make_engine(engine.host, engine.port, engine.container_id)
            self._engines[where] = client
        return client

    async def _start_on(
        self, key: ContentKey, engine: OrchestratedEngine, last: bool = False, hls: bool = False
    ) -> Optional[tuple[EngineClient, PlaybackInfo]]:
        """Start on ``engine``; None if it refused and others may not."""
        client = self.engine_for(engine)
        try:
            info = await self._reserve_and_start(key, engine.container_id, client, hls)
        except ContentError:
            raise
        except EngineError as e:
            if last:
                raise
            log.warn(
                "engine {name} refused {key} ({error}); trying the next",
                name=engine.container_name or engine.container_id[:12],
                key=str(key),
                error=str(e),
            )
            return None
        return client, info

    async def _reserve_and_start(self, key: ContentKey, engine_id: str, client: Any, hls: bool) -> PlaybackInfo:
        """Start ``key`` on ``client``, reserved under ``engine_id`` (a container
        id or a pool URL) before any await, so concurrent placements see it; if
        the start fails the reservation is released and an engine error counted."""
        reservation = Reservation(engine_id)
        self.reservations[_slot(key, hls)] = reservation
        try:
            info = await _start(client, key, hls)
        except BaseException as e:
            self.release(key, hls=hls)
            if isinstance(e, EngineError):
                self._engine_error(e)
            raise
        reservation.stream_id = stream_id_for(key, info)
        return info

    async def _fall_back(
        self, key: ContentKey, error: Exception, avoid: frozenset, hls: bool
    ) -> tuple[EngineClient, PlaybackInfo]:
        if not self.in_outage:
            log.warn(
                "orchestrator unreachable ({error}): using {url} until it answers",
                error=str(error),
                url=", ".join(e.url for e in self.engines.engines),
            )
            self.in_outage = True
        self.fallbacks += 1
        return await self._place_in_pool(key, avoid, hls)

    async def _place_in_pool(
        self, key: ContentKey, avoid: frozenset, hls: bool
    ) -> tuple[EngineClient, PlaybackInfo]:
        """The pool's best engine that accepts ``key`` (see :meth:`EnginePool.ranked`)."""
        tried: set[str] = set()
        error: Optional[EngineError] = None
        while True:
            ranked = self.engines.ranked(self.load(), avoid=avoid, tried=frozenset(tried))
            if not ranked:
                break
            engine = ranked[0]
            tried.add(engine.url)
            try:
                info = await self._reserve_and_start(key, engine.url, engine.client, hls)
            except ContentError:
                raise
            except EngineError as e:
                self.engines.failed(engine, e)
                error = e
                if len(self.engines) > 1:
                    log.warn("engine {url} refused {key} ({error})", url=engine.url, key=str(key), error=str(e))
                continue
            self.engines.answered(engine)
            return engine.client, info
        if error is not None:  # every engine with room refused: the last answer stands
            raise error
        raise self.engines.full(self._retry_after())

    def _engine_error(self, error: EngineError) -> None:
        if not isinstance(error, NoEngine):
            self.engine_errors[error.kind] = self.engine_errors.get(error.kind, 0) + 1

    def load(self) -> dict[str, int]:
        """Our sessions (and placements in flight) per engine: container id or pool URL."""
        load: dict[str, int] = {}
        for r in self.reservations.values():
            load[r.container_id] = load.get(r.container_id, 0) + 1
        return load

    def _reachable(self) -> None:
        if self.in_outage:
            log.info("orchestrator answers again: placement through it resumes")
            self.in_outage = False

    def _retry_after(self, eta: Optional[int] = None) -> int:
        """Retry-After for a refusal: the orchestrator's ETA, else the outage poll interval; ≥ 1 s."""
        return max(1, eta if eta is not None and eta > 0 else int(round(self.outage_poll_interval)))

    def _no_engine(self, code: str, eta: Optional[int], message: Optional[str] = None) -> NoEngine:
        if code in MESSAGES:
            return NoEngine(MESSAGES[code], code=code, http_status=503, retry_after=self._retry_after(eta))
        return NoEngine(message or "the orchestrator could not provide an engine", code=code, http_status=502)

    def _wait_refusal(self, code: str, eta: Optional[int], message: str) -> NoEngine:
        """A wait-class refusal of a POST: the monitor hears of it first."""
        if self.monitor is not None:
            self.monitor.refused(code, eta, message)
        return self._no_engine(code, eta, message)

    async def _provision(self, key: ContentKey, known: list[OrchestratedEngine]) -> Optional[OrchestratedEngine]:
        assert self.orchestrator is not None
        max_replicas: Optional[int] = None
        if self.monitor is not None:
            snapshot = await self.monitor.fresh(self.health_interval)
            if snapshot is None:
                return None
            code = self.monitor.blocked_code
            if code is not None:
                log.info("not provisioning for {key}: orchestrator blocked ({code})", key=str(key), code=code)
                raise self._no_engine(code, self.monitor.blocked_eta, self.monitor.blocked_message)
            max_replicas = snapshot.max_replicas
        if max_replicas is not None and len(known) + self.provisioning >= max_replicas:
            log.info(
                "not provisioning for {key}: {n} engine(s) reach max_replicas {m}",
                key=str(key),
                n=len(known) + self.provisioning,
                m=max_replicas,
            )
            raise self._no_engine("max_capacity", None)
        self.provisioning += 1
        try:
            container_id = await self._post(set(e.container_id for e in known))
        finally:
            self.provisioning -= 1
        if container_id is None:
            return None
        return await self._wait_ready(container_id)

    async def _post(self, seen: set[str]) -> Optional[str]:
        """POST /provision/acestream; after a timeout look before posting
        again, under the retry policy. The container id, or None when the
        orchestrator went away."""
        assert self.orchestrator is not None
        budget = self.retry.budget()
        while True:
            delay = budget.spend()
            if delay is None:
                raise NoEngine("provisioning an engine timed out", code="provision_timeout", retry_after=self._retry_after())
            if delay:
                await budget.wait(self._clock, delay)
            self._count("attempt")
            try:
                provisioned = await self.orchestrator.provision()
            except ProvisionTimeout:
                self._count("timeout")
                found = await self._new_engine(seen)  # it may have started a container
                if found is not None:
                    return found
                continue
            except ProvisionBlocked as refusal:
                self._count("blocked")
                if refusal.code in WAIT_CODES or refusal.should_wait:
                    code = refusal.code if refusal.code in WAIT_CODES else "max_capacity"
                    raise self._wait_refusal(code, refusal.recovery_eta_seconds, refusal.message) from None
                raise self._no_engine(refusal.code, refusal.recovery_eta_seconds, refusal.message) from None
            except ProvisionFailed as failure:
                self._count("failed")
                raise self._no_engine(failure.code or "general_error", None, failure.message) from None
            except OrchestratorAuthError as e:
                self._count("refused")
                if self.monitor is not None:
                    self.monitor.note_auth_failure("provisioning", e.http_status)
                raise NoEngine(
                    "the orchestrator refused the proxy's API key (check ACEXY_ORCH_APIKEY)",
                    code="orchestrator_auth",
                    http_status=502,
                ) from None
            except OrchestratorUnavailable:
                return None
            self._count("ok")
            if self.monitor is not None:
                self.monitor.note_auth_ok()
            return provisioned.container_id

    def _count(self, result: str) -> None:
        self.provision_attempts[result] = self.provision_attempts.get(result, 0) + 1

    async def _new_engine(self, seen: set[str]) -> Optional[str]:
        assert self.orchestrator is not None
        try:
            engines = await self.orchestrator.engines()
        except OrchestratorError:
            return None
        reserved = {r.container_id for r in self.reservations.values()}
        for e in engines:
            if e.container_id not in seen and e.container_id not in reserved:
                return e.container_id
        return None

    async def _wait_ready(self, container_id: str) -> OrchestratedEngine:
        """Poll ``/engines`` and the engine's get_version until it answers (bounded)."""
        assert self.orchestrator is not None
        deadline = self._clock.seconds() + self.engine_ready_timeout
        while True:
            remaining = deadline - self._clock.seconds()
            if remaining <= 0:
                raise NoEngine(
                    f"the new engine did not answer within {self.engine_ready_timeout:g}s",
                    code="engine_not_ready",
                    retry_after=self._retry_after(),
                )
            try:
                engines = await self.orchestrator.engines()
            except OrchestratorError:
                engines = []
            for engine in engines:
                if engine.container_id == container_id:
                    try:
                        await self.engine_for(engine).version(timeout=min(2.0, max(remaining, 0.1)))
                    except EngineError:
                        break
                    log.info(
                        "provisioned engine {name} ready at {host}:{port}",
                        name=engine.container_name or container_id[:12],
                        host=engine.host,
                        port=engine.port,
                    )
                    return engine
            await deferLater(self._clock, self.ready_poll)

    # -- status ----------------------------------------------------------------------

    def pool_status(self) -> list[dict[str, Any]]:
        """The pool's engines with their health and our sessions on each."""
        return self.engines.describe(self.load())

    def describe(self) -> dict[str, Any]:
        return {
            "fallback_engine": self.engines.first.address.url,
            "in_outage": self.in_outage,
            "fallbacks": self.fallbacks,
            "provision_attempts": dict(self.provision_attempts),
            "reservations": len(self.reservations),
            "provisioning": self.provisioning,
            "engine_errors": dict(self.engine_errors),
        }
