"""
HealthMonitor: the proxy's view of the orchestrator, kept fresh in the background.

It polls ``/orchestrator/status`` at start and then ``interval`` seconds after
each poll settles — ``outage_interval`` seconds while provisioning is blocked
or the orchestrator is unreachable. Each poll is bounded by ``timeout`` and
catches everything, so a failed or hung poll never stops the polling (STYLE.md
pitfall 13). Transitions (reachable/unreachable, status, VPN, breaker,
can_provision) are logged once each, not every poll.

The monitor is the clock of every wait. Its status lags reality (CONTRACTS.md
§2): a VPN drop or an opened breaker often shows first as a 503 to a POST.
Placement reports such a refusal with :meth:`HealthMonitor.refused`: the view
counts as blocked with that code at once, the status is polled again now and
then at the outage interval, and listeners (the wait queue) hear of every
poll. The refusal stands until the status itself changes (it caught up) or
``interval`` seconds have passed (the status never showed it: try again). A
401/403 on a POST is an operator problem, shown in :meth:`warnings` until a
POST succeeds.

Readers (placement, the web status page) use :attr:`snapshot`, :attr:`blocked`,
:attr:`blocked_code` and :meth:`age`, or :meth:`fresh` to get a snapshot no
older than a bound (it polls now, sharing one in-flight poll among all
callers, each with its own Deferred).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, TimeoutError as DeferredTimeout, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
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
        self._listeners: list[Callable[[], None]] = []
        self._next: Optional[IDelayedCall] = None
        #: a wait-class refusal the status did not show yet: (code, ETA, message, when, status signature then)
        self.refusal: Optional[tuple[str, Optional[int], str, float, dict]] = None
        #: the last 401/403 on a POST (a wrong ACEXY_ORCH_APIKEY), until a POST succeeds
        self.auth_error: Optional[str] = None
        self.auth_failures = 0
        self._inflight: Optional[Deferred] = None
        self._waiters: list[Deferred] = []
        self._logged: dict[str, Any] = {}

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after every poll (the waiting sessions are re-evaluated)."""
        self._listeners.append(listener)

    # -- reading -------------------------------------------------------------------

    def age(self) -> Optional[float]:
        if self.snapshot_at is None:
            return None
        return self._clock.seconds() - self.snapshot_at

    @property
    def blocked(self) -> bool:
        """Provisioning is refused (VPN, breaker, capacity): by the snapshot, or
        by a POST the snapshot has not caught up with."""
        return self.refusal is not None or (self.snapshot is not None and not self.snapshot.can_provision)

    @property
    def blocked_code(self) -> Optional[str]:
        """Why provisioning is refused now (None when it is not)."""
        if self.refusal is not None:
            return self.refusal[0]
        snap = self.snapshot
        if snap is None or snap.can_provision:
            return None
        code = getattr(snap.blocked, "code", None)
        if code is None:
            if snap.vpn_down:
                return "vpn_disconnected"
            if snap.status == "unavailable":
                return "unavailable"
            return "max_capacity"
        return code

    @property
    def blocked_eta(self) -> Optional[int]:
        if self.refusal is not None:
            return self.refusal[1]
        return getattr(getattr(self.snapshot, "blocked", None), "recovery_eta_seconds", None)

    @property
    def blocked_message(self) -> Optional[str]:
        if self.refusal is not None:
            return self.refusal[2]
        return getattr(getattr(self.snapshot, "blocked", None), "message", None)

    def refused(self, code: str, eta: Optional[int], message: str) -> None:
        """A POST was refused for a reason that passes (503 with a code, legacy
        VPN text, the active-replicas limit): a fresh fact, newer than the status."""
        signature = _signature(self.snapshot) if self.snapshot is not None else {}
        if self.refusal is None or self.refusal[0] != code:
            log.warn("orchestrator refused provisioning ({code}); waiting on its status", code=code)
        self.refusal = (code, eta, message, self._clock.seconds(), signature)
        self.poll()  # now, and then at the outage interval

    def note_auth_failure(self, what: str, status: int) -> None:
        self.auth_failures += 1
        if self.auth_error is None:
            log.error(
                "orchestrator refused {what} with HTTP {status}: check ACEXY_ORCH_APIKEY", what=what, status=status
            )
        self.auth_error = f"orchestrator refused {what} with HTTP {status}: check ACEXY_ORCH_APIKEY"

    def note_auth_ok(self) -> None:
        if self.auth_error is not None:
            log.info("orchestrator accepts the API key again")
        self.auth_error = None

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
        if self.auth_error is not None:
            out.append(self.auth_error)
        if self.refusal is not None:
            out.append(f"provisioning refused ({self.refusal[0]}): new players wait for the orchestrator's status")
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

    def describe(self) -> dict[str, Any]:
        """The orchestrator as the proxy sees it (the status page and metrics read this)."""
        age = self.age()
        doc: dict[str, Any] = {
            "reachable": self.reachable,
            "last_error": self.last_error,
            "snapshot_age": None if age is None else round(age, 1),
            "poll_interval": self.current_interval,
            "polls": self.polls,
            "warnings": self.warnings(),
            "auth_ok": self.auth_error is None,
            "auth_failures": self.auth_failures,
            "refusal": None if self.refusal is None else self.refusal[0],
        }
        snap = self.snapshot
        if snap is not None:
            doc.update(
                status=snap.status,
                can_provision=snap.can_provision,
                blocked_code=self.blocked_code,
                blocked_eta=self.blocked_eta,
                circuit_breaker=snap.breaker_state,
                vpn={"enabled": snap.vpn_enabled, "connected": snap.vpn_connected, "down": snap.vpn_down},
                capacity={
                    "total": snap.capacity_total,
                    "used": snap.capacity_used,
                    "available": snap.capacity_available,
                    "max_replicas": snap.max_replicas,
                },
            )
        return doc

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
        self.poll()

    def stopService(self) -> None:
        super().stopService()
        self._cancel_next()
        if self._inflight is not None:
            self._inflight.cancel()
        for d in self._waiters[:]:
            d.cancel()

    def _cancel_next(self) -> None:
        call, self._next = self._next, None
        if call is not None and call.active():
            call.cancel()

    def _schedule(self) -> None:
        """The next poll, ``current_interval`` after this one settled."""
        self._cancel_next()
        if self.running:
            self._next = self._clock.callLater(self.current_interval, self._tick)

    def _tick(self) -> None:
        self._next = None
        self.poll()

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
        refusal = self.refusal
        if refusal is not None:
            caught_up = _signature(snapshot) != refusal[4]
            if caught_up or self._clock.seconds() - refusal[3] >= self.interval:
                self.refusal = None
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
        self._schedule()
        waiters, self._waiters = self._waiters, []
        result = self.snapshot if self.reachable else None
        for d in waiters:
            d.callback(result)
        for listener in list(self._listeners):
            try:
                listener()
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

