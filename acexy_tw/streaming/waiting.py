"""
WaitQueue: players held through outages instead of failed.

When placement answers "wait" (VPN down, circuit breaker open, no capacity),
the session does not fail its players: :meth:`WaitQueue.admit` decides whether
it may be *held* — kept connected with null TS packets — and remembers it in
arrival order. :meth:`kick` is called whenever capacity may have come back
(the health monitor saw a change, a local session ended): it retries the held
sessions **one at a time, oldest first**, and stops at the first one that is
still told to wait, so the queue is served in order and the orchestrator is
never stormed (each retry costs one ``GET /engines``; no POST is made while the
snapshot says blocked). Each retry is given ``settle_window`` seconds to be
told "wait" or to get its engine; one still busy after that (provisioning a
new engine takes seconds) is left to finish while the next is tried, so after
a VPN outage the contents' provisions overlap instead of queueing.

In ``reject`` mode breaker/capacity waits are answered 503 at once, the demand
is remembered, and :meth:`kick` pre-warms sessions for the oldest demands so
the players' retries start at once. VPN outages are always held: a player that
is told 503 every few seconds for minutes gives up; one that sees "buffering"
does not.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol as TypingProtocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from acexy_tw.content import ContentKey
from acexy_tw.logs import get_logger

log = get_logger(__name__)

#: held whatever the mode: the VPN comes back by itself
ALWAYS_HOLD = frozenset({"vpn_disconnected", "vpn_error", "unavailable"})
#: held in hold mode, rejected (and pre-warmed later) in reject mode
QUEUE_CODES = frozenset({"circuit_breaker", "max_capacity"})
#: every wait-class refusal: it may be over by itself, so it is waited out, never retried blindly
WAIT_CODES = ALWAYS_HOLD | QUEUE_CODES


class HeldSession(TypingProtocol):
    """What the queue needs of a session (``EngineSession``)."""

    key: ContentKey
    sinks: list
    waiting_reason: Optional[str]
    waiting_since: Optional[float]

    def retry(self) -> Deferred: ...


class HealthLike(TypingProtocol):
    """A health view that tells its subscribers after every status poll."""

    def subscribe(self, listener: Callable[[], None]) -> None: ...


@dataclass(frozen=True)
class WaitSettings:
    #: players held at once
    size: int
    #: longest a player is held
    max_wait: float
    #: how often held players get null packets
    keepalive_interval: float
    #: "hold" or "reject" (breaker/capacity waits)
    mode: str = "hold"
    #: seconds a retry is given to settle before the next one is tried
    settle_window: float = 1.0


class WaitQueue:
    def __init__(
        self,
        clock: IReactorTime,
        settings: WaitSettings,
        *,
        prewarm: Optional[Callable[[ContentKey], "Deferred[bool]"]] = None,
    ) -> None:
        self.settle_window = settings.settle_window
        self._clock = clock
        self.size = settings.size
        self.max_wait = settings.max_wait
        self.keepalive_interval = settings.keepalive_interval
        self.mode = settings.mode
        self.prewarm = prewarm
        #: sessions told to wait, in arrival order (served by :meth:`kick`)
        self.held: list[HeldSession] = []
        #: every session whose players get keepalive now (waiting or recovering)
        self.kept_alive: list[HeldSession] = []
        self.demands: "OrderedDict[ContentKey, float]" = OrderedDict()
        self.served = 0
        self._serving = False
        self._again = False

    # -- policy ----------------------------------------------------------------------

    def holdable(self, code: Optional[str]) -> bool:
        """May a wait with this code be held at all (before counting room)?"""
        return code in ALWAYS_HOLD or (self.mode == "hold" and code in QUEUE_CODES)

    @property
    def held_players(self) -> int:
        """Players receiving keepalive, whatever their session is doing."""
        return sum(len(s.sinks) for s in self.kept_alive)

    def keepalive_started(self, session: HeldSession) -> None:
        if session not in self.kept_alive:
            self.kept_alive.append(session)

    def keepalive_stopped(self, session: HeldSession) -> None:
        if session in self.kept_alive:
            self.kept_alive.remove(session)

    def has_room(self, extra: int = 1) -> bool:
        return self.held_players + extra <= self.size

    def admit(self, session: HeldSession, error: Any) -> bool:
        """Hold ``session`` (its players stay connected) or not (they get ``error``)."""
        code = getattr(error, "code", None)
        if not self.holdable(code):
            self.release(session)  # a held session told "no" for good is let go
            if code in QUEUE_CODES and self.mode == "reject":
                self._remember(session.key)
            return False
        if session in self.held:
            return True
        eta = getattr(error, "retry_after", None)
        if code in QUEUE_CODES and eta is not None and eta > self.max_wait:
            return False  # it will not be over before the player is let go
        extra = 0 if session in self.kept_alive else len(session.sinks)
        if not self.has_room(extra=extra):
            log.warn("wait queue full ({n} players held): refusing {key}", n=self.held_players, key=str(session.key))
            return False
        self.held.append(session)
        return True

    def release(self, session: HeldSession) -> None:
        if session in self.held:
            self.held.remove(session)

    def _remember(self, key: ContentKey) -> None:
        self.demands.pop(key, None)
        self.demands[key] = self._clock.seconds()
        while len(self.demands) > max(self.size, 1):
            self.demands.popitem(last=False)

    # -- serving -----------------------------------------------------------------------

    def kick(self) -> None:
        """Capacity may be back: serve held sessions (then demands) in order."""
        if not self.held and not self.demands:
            return
        if self._serving:
            self._again = True
            return
        Deferred.fromCoroutine(self._serve()).addErrback(lambda f: log.failure("serving the wait queue failed", f))

    async def _serve(self) -> None:
        self._serving = True
        try:
            while True:
                self._again = False
                blocked = False
                for session in list(self.held):
                    if session not in self.held:
                        continue
                    if await self._settled(session.retry()) is False:
                        blocked = session in self.held  # still told to wait: the rest wait too
                        if blocked:
                            break
                    else:
                        self.served += 1
                if not blocked and self.prewarm is not None:
                    for key in list(self.demands):
                        since = self.demands.pop(key)
                        if await self._settled(self.prewarm(key)) is False:
                            self.demands[key] = since  # still told to wait: keep its place
                            self.demands.move_to_end(key, last=False)
                            break
                if not self._again:
                    return
        finally:
            self._serving = False

    def _settled(self, d: Deferred) -> Deferred:
        """``d``'s result, or None if it is still busy after ``settle_window``."""
        out: Deferred = Deferred()

        def busy() -> None:
            if not out.called:
                out.callback(None)

        call = self._clock.callLater(self.settle_window, busy)

        def done(result: Any) -> None:
            if call.active():
                call.cancel()
            if not out.called:
                out.callback(result)

        d.addBoth(done)
        return out

    # -- status --------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        now = self._clock.seconds()
        return {
            "mode": self.mode,
            "players": self.held_players,
            "queue_size": self.size,
            "sessions": [
                {
                    "key": str(s.key),
                    "reason": s.waiting_reason,
                    "players": len(s.sinks),
                    "waiting": round(now - s.waiting_since, 1) if s.waiting_since is not None else None,
                }
                for s in self.kept_alive
            ],
            "demands": [{"key": str(k), "since": round(now - t, 1)} for k, t in self.demands.items()],
        }
