"""
The one retry policy: an attempt budget and capped exponential backoff with
jitter, on an injected clock.

Every retry in the proxy goes through it — failover within an incident,
provisioning re-posts after a timeout, orchestrator event delivery — so each
answers the same question the same way: *what if every attempt fails the same
way, forever?* At most ``attempts`` tries, the first at once, the later ones
``initial``, ``initial × factor``, … seconds apart (never more than ``cap`` plus
the jitter). The delays come from Twisted's own
:func:`twisted.application.internet.backoffPolicy` (what ``ClientService``
uses); this module only adds the budget and the clock.

Use::

    budget = policy.budget()
    delay = budget.spend()        # 0 for the first try, None once spent
    if delay is None: give up
    await budget.wait(clock, delay)   # cancellable (deferLater)
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional, TypeVar

from twisted.application.internet import backoffPolicy
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """
    :param attempts: tries in all (the first included); 0 means never.
    :param initial: seconds before the first retry.
    :param factor: each later retry waits this much longer.
    :param cap: longest wait before jitter.
    :param jitter: returns extra seconds added to each wait (``random`` scaled
        to ``jitter_max`` by default; tests pass ``lambda: 0``).
    """

    attempts: int
    initial: float = 1.0
    factor: float = 2.0
    cap: float = 30.0
    jitter_max: float = 0.25
    jitter: Optional[Callable[[], float]] = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.attempts < 0 or self.initial <= 0 or self.factor < 1 or self.cap < self.initial:
            raise ValueError(f"invalid retry policy {self!r}")

    def _jitter(self) -> float:
        if self.jitter is not None:
            return self.jitter()
        return random.uniform(0.0, self.jitter_max)

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1 = the first retry)."""
        if retry < 1:
            return 0.0
        return backoffPolicy(self.initial, self.cap, self.factor, self._jitter)(retry - 1)

    def budget(self) -> "Budget":
        return Budget(self)


class Budget:
    """One run (an incident, one provisioning, one event) spending a policy."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.used = 0

    @property
    def exhausted(self) -> bool:
        return self.used >= self.policy.attempts

    @property
    def remaining(self) -> int:
        return max(0, self.policy.attempts - self.used)

    def spend(self) -> Optional[float]:
        """Take one try: the seconds to wait before it (0 for the first),
        or None when the budget is spent."""
        if self.exhausted:
            return None
        self.used += 1
        return self.policy.delay(self.used - 1)

    @staticmethod
    def wait(clock: IReactorTime, seconds: float) -> Deferred:
        """A cancellable pause on ``clock`` (immediate for 0)."""
        return deferLater(clock, max(0.0, seconds))


async def retrying(
    policy: RetryPolicy,
    clock: IReactorTime,
    call: Callable[[], Awaitable[T]],
    *,
    retryable: Callable[[BaseException], bool],
    on_retry: Optional[Callable[[int, BaseException, float], Any]] = None,
) -> T:
    """``call()`` until it succeeds, the error is not ``retryable`` or the
    budget is spent (then the last error is raised)."""
    budget = policy.budget()
    if budget.spend() is None:
        raise ValueError("a retry policy with no attempts")
    while True:
        try:
            return await call()
        except Exception as e:
            if not retryable(e):
                raise
            delay = budget.spend()
            if delay is None:
                raise
            if on_retry is not None:
                on_retry(budget.used, e, delay)
            await budget.wait(clock, delay)
