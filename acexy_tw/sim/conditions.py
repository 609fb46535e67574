"""Waiting for a simulator's state, for tests that must never sleep."""

from __future__ import annotations

from typing import Any, Callable, List, Tuple

from twisted.internet.defer import Deferred

Predicate = Callable[[Any], bool]


class Conditions:
    """
    ``when(predicate)`` Deferreds over one subject, re-checked by ``changed()``.

    A Deferred fires (once) as soon as ``predicate(subject)`` is true: at once,
    or after the state change that makes it so. Cancelling it forgets the
    waiter; an exception from the predicate errbacks it.
    """

    def __init__(self, subject: Any) -> None:
        self._subject = subject
        self._waiters: List[Tuple[Predicate, Deferred]] = []

    def __len__(self) -> int:
        return len(self._waiters)

    def when(self, predicate: Predicate) -> "Deferred[None]":
        entry: List[Tuple[Predicate, Deferred]] = []

        def forget(_: Deferred) -> None:
            if entry and entry[0] in self._waiters:
                self._waiters.remove(entry[0])

        waiter: "Deferred[None]" = Deferred(forget)
        item = (predicate, waiter)
        entry.append(item)
        self._waiters.append(item)
        self._check(item)
        return waiter

    def changed(self) -> None:
        """Re-check the waiters; call after every state change."""
        for item in list(self._waiters):
            self._check(item)

    def _check(self, item: Tuple[Predicate, Deferred]) -> None:
        if item not in self._waiters:
            return  # fired or cancelled by a callback of an earlier waiter
        predicate, waiter = item
        try:
            ready = predicate(self._subject)
        except Exception:
            self._waiters.remove(item)
            waiter.errback()
            return
        if ready:
            self._waiters.remove(item)
            waiter.callback(None)
