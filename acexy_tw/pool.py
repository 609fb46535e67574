"""
EnginePool: the engines the proxy reaches without an orchestrator.

``ACEXY_ENGINES`` names them (``ACEXY_HOST``:``ACEXY_PORT`` alone is a pool of
one); with an orchestrator the pool is where streams go while it is
unreachable.

Each engine is probed on a ``LoopingCall`` every ``ACEXY_HEALTH_INTERVAL``
(the engine's version API, bounded, one probe in flight per engine). An engine
is ``unknown`` until its first answer, then ``up`` or ``down``; a session
start that fails for a network reason (refused, reset, no answer in time)
marks it ``down`` at once. A ``down`` engine is skipped while any other is
``up`` or ``unknown``, and used again as soon as a probe answers; when every
engine is down they are still tried (the last probe may be stale, and a
refused connection costs nothing), so a pool of one behaves as one engine.

:meth:`ranked` orders the engines for a new session: those with room
(``capacity`` sessions each; ``None``: no limit, a pool of one as acexy has it)
by fewest sessions, engines that failed in the session's failover incident
last. Placement counts the sessions (its reservations) and passes the counts
in; the pool keeps only what the probes and failures say. When an engine comes
back up, subscribers are told (the wait queue retries its held players).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from acexy_tw.engine import EngineError, EngineTimeout, EngineUnreachable, NoEngine
from acexy_tw.logs import get_logger

log = get_logger(__name__)

UNKNOWN, UP, DOWN = "unknown", "up", "down"


@dataclass(eq=False)
class PoolEngine:
    """One engine of the pool and what its probes and starts said."""

    client: Any
    state: str = UNKNOWN
    #: failed probes and starts since it last answered
    failures: int = 0
    last_error: Optional[str] = None
    #: the engine's version string, from its last answer
    version: Optional[str] = None
    _probe: Optional[Deferred] = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return self.client.address.url


def _version(doc: Any) -> Optional[str]:
    result = doc.get("result") if isinstance(doc, dict) else None
    version = result.get("version") if isinstance(result, dict) else None
    return str(version)[:40] if version is not None else None


class EnginePool(Service):
    """The pool's engines and their probe loop (a child of the service tree)."""

    name = "engine-pool"

    def __init__(
        self,
        clients: Sequence[Any],
        clock: IReactorTime,
        *,
        interval: float,
        timeout: float,
        capacity: Optional[int] = None,
    ) -> None:
        if not clients:
            raise ValueError("an engine pool needs at least one engine")
        self.engines = [PoolEngine(c) for c in clients]
        self._clock = clock
        self.interval = interval
        self.timeout = min(timeout, interval)
        #: sessions one engine carries at most (None: no limit)
        self.capacity = capacity
        self._loop: Optional[LoopingCall] = None
        self._listeners: list[Callable[[], None]] = []

    def __len__(self) -> int:
        return len(self.engines)

    @property
    def first(self) -> Any:
        """The first engine's client (a pool of one: the engine)."""
        return self.engines[0].client

    def subscribe(self, listener: Callable[[], None]) -> None:
        """``listener()`` is called whenever an engine comes back up."""
        self._listeners.append(listener)

    # -- probing ---------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.probe)
        self._loop.clock = self._clock
        self._loop.start(self.interval, now=True)

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        for engine in self.engines:
            if engine._probe is not None:
                engine._probe.cancel()

    def probe(self) -> None:
        """Ask every engine without a probe in flight for its version."""
        for engine in self.engines:
            if engine._probe is None:
                engine._probe = d = engine.client.version(timeout=self.timeout)
                d.addCallbacks(self._answered, self._probe_failed, callbackArgs=(engine,), errbackArgs=(engine,))

    def _answered(self, doc: Any, engine: PoolEngine) -> None:
        engine._probe = None
        engine.version = _version(doc) or engine.version
        self.answered(engine)

    def _probe_failed(self, failure: Any, engine: PoolEngine) -> None:
        engine._probe = None
        if not self.running:  # cancelled by stopService
            return
        self._down(engine, failure.getErrorMessage())

    # -- state -------------------------------------------------------------------------

    def answered(self, engine: PoolEngine) -> None:
        """``engine`` answered (a probe, or a session start): it is up."""
        before = engine.state
        engine.state, engine.failures, engine.last_error = UP, 0, None
        if before == UP:
            return
        log.info(
            "engine {url} answers{version}{back}",
            url=engine.url,
            version=f" (AceStream {engine.version})" if engine.version else "",
            back=": used again" if before == DOWN else "",
        )
        if before == DOWN:
            for listener in list(self._listeners):
                listener()

    def failed(self, engine: PoolEngine, error: EngineError) -> None:
        """A session start on ``engine`` failed: down when the engine itself did not answer."""
        if isinstance(error, (EngineUnreachable, EngineTimeout)):
            self._down(engine, str(error))

    def _down(self, engine: PoolEngine, reason: str) -> None:
        engine.failures += 1
        engine.last_error = reason[:200]
        if engine.state == DOWN:
            return
        before, engine.state = engine.state, DOWN
        others = "" if len(self.engines) == 1 else ": skipped while another engine answers"
        log.warn(
            "engine {url} {what} ({reason}){others}",
            url=engine.url,
            what="does not answer" if before == UNKNOWN else "stopped answering",
            reason=engine.last_error,
            others=others,
        )

    # -- choosing ----------------------------------------------------------------------

    def ranked(
        self, load: Mapping[str, int], *, avoid: frozenset = frozenset(), tried: frozenset = frozenset()
    ) -> list[PoolEngine]:
        """The engines to try for a new session, best first (see the module docstring)."""
        room = [
            e
            for e in self.engines
            if e.url not in tried and (self.capacity is None or load.get(e.url, 0) < self.capacity)
        ]
        live = [e for e in room if e.state != DOWN]
        if not live and all(e.state == DOWN for e in self.engines):
            live = room  # every engine is down: try them anyway
        order = {id(e): i for i, e in enumerate(self.engines)}
        return sorted(live, key=lambda e: (e.url in avoid, load.get(e.url, 0), order[id(e)]))

    def full(self, retry_after: int) -> NoEngine:
        """Every engine that answers carries ``capacity`` sessions: players wait."""
        return NoEngine(
            f"every engine of the pool carries {self.capacity} stream(s): please try again in a moment",
            code="max_capacity",
            retry_after=retry_after,
        )

    # -- status ------------------------------------------------------------------------

    def describe(self, load: Mapping[str, int]) -> list[dict[str, Any]]:
        return [
            {
                "url": e.url,
                "state": e.state,
                "sessions": load.get(e.url, 0),
                "capacity": self.capacity,
                "failures": e.failures,
                "last_error": e.last_error,
                "version": e.version,
            }
            for e in self.engines
        ]
