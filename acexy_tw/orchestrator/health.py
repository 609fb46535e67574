"""
HealthMonitor: the proxy's view of the orchestrator, kept fresh in the background.

A ``LoopingCall`` on the injected clock polls ``/orchestrator/status`` at start
and every ``interval`` seconds — every ``outage_interval`` seconds while
provisioning is blocked or the orchestrator is unreachable. Each tick is
bounded by ``timeout`` and catches everything, so a failed or hung poll never
kills the loop (STYLE.md pitfall 13). Transitions (reachable/unreachable,
status, VPN, breaker, can_provision) are logged once each, not every poll.

Readers (placement, the web status page) use :attr:`snapshot` and :meth:`age`,
or :meth:`fresh` to get a snapshot no older than a bound (it polls now,
sharing one in-flight poll among all callers, each with its own Deferred).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, TimeoutError as DeferredTimeout, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from acexy_tw.logs import get_logger

log = get_logger(__name__)

Fetch = Callable[[], "Deferred[Any]"]


def _signature(snapshot: Any) -> dict[str, Any]:
    """The facts whose changes are worth one log line each."""
    blocked = getattr(snapshot, "blocked", None)
    return {
        "status": snapshot.status,
        "vpn_down": snapshot.vpn_down,
        "breaker": snapshot.breaker_state,
        "can_provision": snapshot.can_provision,
        "blocked_code": getattr(blocked, "code", None),
    }


class HealthMonitor(Service):
    def __init__(
        self,
        fetch: Fetch,
        clock: IReactorTime,
        *,
        interval: float,
        outage_interval: float,
        timeout: float,
        on_change: Optional[Callable[["HealthMonitor"], None]] = None,
    ) -> None:
        self._fetch = fetch
        self._clock = clock
        self.interval = interval
        self.outage_interval = outage_interval
        self.timeout = timeout
        self.snapshot: Any = None
        self.snapshot_at: Optional[float] = None
        self.reachable: Optional[bool] = None  # None: not polled yet
        self.last_error: Optional[str] = None
        self.polls = 0
        self._on_change = on_change
        self._loop: Optional[LoopingCall] = None
        self._inflight: Optional[Deferred] = None
        self._waiters: list[Deferred] = []
        self._logged: dict[str, Any] = {}

    # -- reading -------------------------------------------------------------------

    def age(self) -> Optional[float]:
        if self.snapshot_at is None:
            return None
        return self._clock.seconds() - self.snapshot_at

    @property
    def blocked(self) -> bool:
        """Provisioning is refused (VPN, breaker, capacity) according to the snapshot."""
        return self.snapshot is not None and not self.snapshot.can_provision

    @property
    def degraded(self) -> bool:
        """Unreachable, blocked, or not reporting itself healthy."""
        return self.reachable is False or self.blocked or (
            self.snapshot is not None and self.snapshot.status != "healthy"
        )

    @property
    def current_interval(self) -> float:
        return self.outage_interval if self.degraded else self.interval

    def warnings(self) -> list[str]:
        """What an operator should know now (shown on /ace/status)."""
        out = []
        if self.reachable is False:
            out.append(f"orchestrator unreachable ({self.last_error}): new streams use the configured engine")
        snap = self.snapshot
        if snap is not None and self.reachable:
            if snap.status == "unavailable":
                out.append("orchestrator reports no engine running: new players are held until one is")
            if snap.vpn_down:
                out.append("VPN down: new players are held until it is back")
            elif not snap.can_provision:
                code = getattr(snap.blocked, "code", None) or "blocked"
                out.append(f"provisioning blocked ({code}): players may be held or refused")
        return out

    def fresh(self, max_age: float) -> Deferred:
        """A snapshot no older than ``max_age`` (polls now if needed; a fresh
        Deferred per caller). Fires with None when the orchestrator is unreachable."""
        age = self.age()
        if age is not None and age <= max_age and self.reachable:
            return succeed(self.snapshot)
        d: Deferred = Deferred(lambda d: self._waiters.remove(d) if d in self._waiters else None)
        self._waiters.append(d)
        if self._inflight is None:
            self.poll()
        return d

    # -- the loop ------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._clock
        self._loop.start(self.current_interval, now=True).addErrback(
            lambda f: log.failure("health loop died", f)  # never expected: ticks catch everything
        )

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._inflight is not None:
            self._inflight.cancel()
        for d in self._waiters[:]:
            d.cancel()

    def _tick(self) -> Deferred:
        d = self.poll()
        d.addCallback(lambda _: self._reschedule())
        return d

    def _reschedule(self) -> None:
        """Switch between the normal and the outage interval after a tick."""
        loop = self._loop
        if loop is None:
            return
        want = self.current_interval
        if loop.interval != want:
            # LoopingCall schedules the next call from ``starttime`` and
            # ``interval``; resetting both makes the next poll exactly
            # ``want`` seconds from now.
            loop.interval = want
            loop.starttime = self._clock.seconds()

    def poll(self) -> Deferred:
        """Poll now (shared if a poll is already running); never fails."""
        if self._inflight is not None:
            d: Deferred = Deferred()
            self._inflight.addBoth(lambda r: (d.callback(None), r)[1])
            return d
        self.polls += 1
        inflight = self._fetch().addTimeout(self.timeout, self._clock)
        self._inflight = inflight
        inflight.addCallbacks(self._got, self._failed)
        inflight.addBoth(self._settled)
        return inflight

    def _got(self, snapshot: Any) -> None:
        self.snapshot = snapshot
        self.snapshot_at = self._clock.seconds()
        if self.reachable is False:
            log.info("orchestrator reachable again; placement resumes")
        self.reachable = True
        self.last_error = None
        self._log_transitions(snapshot)

    def _failed(self, failure: Failure) -> None:
        if failure.check(CancelledError) and not self.running:
            return
        if failure.check(CancelledError, DeferredTimeout):
            message = f"no answer within {self.timeout:g}s"
        else:
            message = failure.getErrorMessage()
        if self.reachable is not False:
            log.warn(
                "orchestrator unreachable ({error}); new streams use the configured engine",
                error=message,
            )
        self.reachable = False
        self.last_error = message

    def _settled(self, _: Any) -> None:
        self._inflight = None
        waiters, self._waiters = self._waiters, []
        result = self.snapshot if self.reachable else None
        for d in waiters:
            d.callback(result)
        if self._on_change is not None:
            try:
                self._on_change(self)
            except Exception:
                log.failure("health listener failed")

    def _log_transitions(self, snapshot: Any) -> None:
        now = _signature(snapshot)
        before, self._logged = self._logged, now
        if not before:
            log.info(
                "orchestrator {status}: can_provision={can}, VPN {vpn}, breaker {breaker}",
                status=snapshot.status,
                can=snapshot.can_provision,
                vpn="down" if snapshot.vpn_down else "up",
                breaker=snapshot.breaker_state or "n/a",
            )
            return
        if before["status"] != now["status"]:
            if now["status"] == "unavailable":
                log.warn("orchestrator reports no engine running (unavailable): new players are held until one is")
            else:
                log.info("orchestrator status {a} -> {b}", a=before["status"], b=now["status"])
        if before["vpn_down"] != now["vpn_down"]:
            if now["vpn_down"]:
                log.warn("orchestrator reports the VPN down: provisioning waits for it")
            else:
                log.info("orchestrator reports the VPN back up")
        if before["breaker"] != now["breaker"]:
            log.info("orchestrator circuit breaker {a} -> {b}", a=before["breaker"], b=now["breaker"])
        if before["can_provision"] != now["can_provision"]:
            if now["can_provision"]:
                log.info("orchestrator can provision again")
            else:
                log.warn("orchestrator blocks provisioning ({code})", code=now["blocked_code"] or "unknown")

