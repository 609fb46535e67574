"""
The one retry policy (acexy_tw.retry): RetryPolicy's delays, a Budget's
attempts, and ``retrying()`` on a task.Clock — deterministic, no reactor.
"""

from __future__ import annotations

import random
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from acexy_tw import retry as retry_module
from acexy_tw.retry import Budget, RetryPolicy, retrying


def no_jitter() -> float:
    return 0.0


def spend_all(budget: Budget, limit: int = 100) -> list:
    """Every spend() until the first None (and one more, to see it stays None)."""
    out = []
    for _ in range(limit):
        delay = budget.spend()
        out.append(delay)
        if delay is None:
            break
    out.append(budget.spend())
    return out


class Flaky(Exception):
    """A retryable failure."""


class Fatal(Exception):
    """A failure retrying will not help."""


def retry_flaky(e: BaseException) -> bool:
    return isinstance(e, Flaky)


class PolicyDelayTests(SynchronousTestCase):
    def test_first_try_is_immediate_then_initial_times_factor_to_the_k(self) -> None:
        policy = RetryPolicy(6, initial=1.0, factor=2.0, cap=100.0, jitter=no_jitter)
        self.assertEqual(spend_all(policy.budget()), [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, None, None])

    def test_other_initial_and_factor(self) -> None:
        policy = RetryPolicy(5, initial=0.5, factor=3.0, cap=100.0, jitter=no_jitter)
        self.assertEqual(spend_all(policy.budget()), [0.0, 0.5, 1.5, 4.5, 13.5, None, None])

    def test_delays_are_capped(self) -> None:
        policy = RetryPolicy(8, initial=1.0, factor=2.0, cap=10.0, jitter=no_jitter)
        self.assertEqual(spend_all(policy.budget()), [0.0, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0, None, None])

    def test_factor_one_is_a_constant_delay(self) -> None:
        policy = RetryPolicy(4, initial=3.0, factor=1.0, cap=3.0, jitter=no_jitter)
        self.assertEqual(spend_all(policy.budget()), [0.0, 3.0, 3.0, 3.0, None, None])

    def test_delay_of_retry_number(self) -> None:
        policy = RetryPolicy(3, initial=2.0, factor=2.0, cap=30.0, jitter=no_jitter)
        self.assertEqual([policy.delay(n) for n in (-1, 0, 1, 2, 3, 4, 5)], [0.0, 0.0, 2.0, 4.0, 8.0, 16.0, 30.0])

    def test_jitter_is_added_to_every_retry_but_not_the_first_try(self) -> None:
        calls = []

        def jitter() -> float:
            calls.append(1)
            return 0.125

        policy = RetryPolicy(4, initial=1.0, factor=2.0, cap=3.0, jitter=jitter)
        self.assertEqual(spend_all(policy.budget()), [0.0, 1.125, 2.125, 3.125, None, None])
        self.assertEqual(len(calls), 3)  # once per retry; the first try has no wait at all

    def test_default_jitter_stays_within_zero_and_jitter_max(self) -> None:
        self.patch(retry_module, "random", random.Random(20240601))  # deterministic
        for jitter_max in (0.25, 2.0):
            policy = RetryPolicy(10, initial=1.0, factor=2.0, cap=8.0, jitter_max=jitter_max)
            bases = [0.0, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0, 8.0, 8.0]
            extras = []
            for _ in range(50):
                delays = spend_all(policy.budget())
                self.assertEqual(len(delays), 12)
                self.assertEqual(delays[0], 0.0)
                self.assertEqual(delays[-2:], [None, None])
                for base, delay in zip(bases[1:], delays[1:10]):
                    self.assertGreaterEqual(delay, base)
                    self.assertLessEqual(delay, base + jitter_max)
                    extras.append(delay - base)
            self.assertEqual(len(extras), 450)
            # really random: spread over the range, not a constant
            self.assertLess(min(extras), jitter_max * 0.1)
            self.assertGreater(max(extras), jitter_max * 0.9)

    def test_default_jitter_is_uniform_over_zero_to_jitter_max(self) -> None:
        seen = []

        class Recorder:
            def uniform(self, a: float, b: float) -> float:
                seen.append((a, b))
                return b

        self.patch(retry_module, "random", Recorder())
        policy = RetryPolicy(3, initial=1.0, factor=2.0, cap=30.0, jitter_max=0.5)
        self.assertEqual(spend_all(policy.budget()), [0.0, 1.5, 2.5, None, None])
        self.assertEqual(seen, [(0.0, 0.5), (0.0, 0.5)])


class BudgetTests(SynchronousTestCase):
    def test_spend_counts_down_and_then_stays_none(self) -> None:
        budget = RetryPolicy(3, jitter=no_jitter).budget()
        self.assertEqual((budget.used, budget.remaining, budget.exhausted), (0, 3, False))
        self.assertEqual(budget.spend(), 0.0)
        self.assertEqual((budget.used, budget.remaining, budget.exhausted), (1, 2, False))
        self.assertEqual(budget.spend(), 1.0)
        self.assertEqual(budget.spend(), 2.0)
        self.assertEqual((budget.used, budget.remaining, budget.exhausted), (3, 0, True))
        for _ in range(5):
            self.assertIsNone(budget.spend())
        self.assertEqual((budget.used, budget.remaining, budget.exhausted), (3, 0, True))

    def test_one_attempt_is_the_first_try_only(self) -> None:
        self.assertEqual(spend_all(RetryPolicy(1, jitter=no_jitter).budget()), [0.0, None, None])

    def test_zero_attempts_spends_nothing(self) -> None:
        budget = RetryPolicy(0).budget()
        self.assertTrue(budget.exhausted)
        self.assertEqual(budget.remaining, 0)
        self.assertIsNone(budget.spend())
        self.assertIsNone(budget.spend())
        self.assertEqual(budget.used, 0)

    def test_each_budget_is_independent(self) -> None:
        policy = RetryPolicy(2, jitter=no_jitter)
        first = policy.budget()
        first.spend()
        first.spend()
        self.assertIsNone(first.spend())
        second = policy.budget()
        self.assertIs(second.policy, policy)
        self.assertEqual(spend_all(second), [0.0, 1.0, None, None])

    def test_wait_is_a_pause_on_the_given_clock(self) -> None:
        clock = Clock()
        d = Budget.wait(clock, 2.5)
        clock.advance(2.4)
        self.assertNoResult(d)
        clock.advance(0.1)
        self.successResultOf(d)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_wait_zero_or_negative_needs_no_time(self) -> None:
        for seconds in (0.0, -3.0):
            clock = Clock()
            d = Budget.wait(clock, seconds)
            clock.advance(0)
            self.successResultOf(d)
            self.assertEqual(clock.seconds(), 0.0)

    def test_wait_is_cancellable_and_leaves_no_timer(self) -> None:
        clock = Clock()
        d = Budget.wait(clock, 5)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(clock.getDelayedCalls(), [])


class InvalidPolicyTests(SynchronousTestCase):
    def test_invalid_policies_raise_value_error(self) -> None:
        for kwargs in (
            dict(attempts=-1),
            dict(attempts=3, initial=0.0),
            dict(attempts=3, initial=-1.0),
            dict(attempts=3, factor=0.5),
            dict(attempts=3, factor=0.0),
            dict(attempts=3, initial=5.0, cap=4.0),
            dict(attempts=3, initial=1.0, cap=0.5),
        ):
            with self.assertRaises(ValueError, msg=repr(kwargs)):
                RetryPolicy(**kwargs)

    def test_edge_policies_are_valid(self) -> None:
        RetryPolicy(0)
        RetryPolicy(1, initial=0.001, factor=1.0, cap=0.001)
        RetryPolicy(3, initial=5.0, cap=5.0)

    def test_policies_compare_without_their_jitter(self) -> None:
        self.assertEqual(RetryPolicy(3, jitter=no_jitter), RetryPolicy(3))
        self.assertNotEqual(RetryPolicy(3), RetryPolicy(4))


class Calls:
    """A call() for retrying(): each try returns the next scripted result
    (an exception fails it, a Deferred is returned as is) and records the time."""

    def __init__(self, clock: Clock, script: list, default: Any = None) -> None:
        self.clock = clock
        self.script = list(script)
        self.default = default
        self.times: list[float] = []
        self.errors: list[BaseException] = []

    def __call__(self) -> Deferred:
        self.times.append(self.clock.seconds())
        item = self.script.pop(0) if self.script else self.default
        if callable(item) and not isinstance(item, (BaseException, Deferred)):
            item = item()
        if isinstance(item, BaseException):
            self.errors.append(item)
            return fail(item)
        if isinstance(item, Deferred):
            return item
        return succeed(item)


def run(policy: RetryPolicy, clock: Clock, call: Calls, **kwargs: Any) -> Deferred:
    kwargs.setdefault("retryable", retry_flaky)
    return Deferred.fromCoroutine(retrying(policy, clock, call, **kwargs))


class RetryingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def test_failing_forever_is_tried_exactly_attempts_times_then_the_last_error_is_raised(self) -> None:
        n = [0]

        def flaky() -> Flaky:
            n[0] += 1
            return Flaky(f"try {n[0]}")

        call = Calls(self.clock, [], default=flaky)
        d = run(RetryPolicy(4, initial=1.0, factor=2.0, cap=30.0, jitter=no_jitter), self.clock, call)
        self.assertEqual(call.times, [0.0])
        self.clock.advance(0.999)
        self.assertEqual(call.times, [0.0])
        self.clock.pump([0.001, 1, 1, 1, 1, 1, 1])  # to t=7
        self.assertEqual(call.times, [0.0, 1.0, 3.0, 7.0])
        failure = self.failureResultOf(d, Flaky)
        self.assertIs(failure.value, call.errors[-1])
        self.assertEqual(str(failure.value), "try 4")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(1000)
        self.assertEqual(len(call.times), 4)  # never again

    def test_retry_times_follow_the_cap(self) -> None:
        call = Calls(self.clock, [], default=lambda: Flaky())
        d = run(RetryPolicy(6, initial=1.0, factor=2.0, cap=3.0, jitter=no_jitter), self.clock, call)
        self.clock.pump([0.5] * 40)
        self.assertEqual(call.times, [0.0, 1.0, 3.0, 6.0, 9.0, 12.0])
        self.failureResultOf(d, Flaky)

    def test_non_retryable_error_is_raised_after_one_call(self) -> None:
        error = Fatal("400 bad request")
        call = Calls(self.clock, [error], default=lambda: Flaky())
        retries = []
        d = run(RetryPolicy(5, jitter=no_jitter), self.clock, call, on_retry=lambda *a: retries.append(a))
        failure = self.failureResultOf(d, Fatal)
        self.assertIs(failure.value, error)
        self.assertEqual(call.times, [0.0])
        self.assertEqual(retries, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_non_retryable_error_after_retries_is_raised_at_once(self) -> None:
        fatal = Fatal("auth")
        call = Calls(self.clock, [Flaky(), fatal])
        d = run(RetryPolicy(5, jitter=no_jitter), self.clock, call)
        self.clock.advance(1)
        self.assertIs(self.failureResultOf(d, Fatal).value, fatal)
        self.assertEqual(call.times, [0.0, 1.0])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_success_on_the_second_try(self) -> None:
        call = Calls(self.clock, [Flaky("once"), "answer"])
        d = run(RetryPolicy(3, initial=2.0, jitter=no_jitter), self.clock, call)
        self.clock.advance(1.999)
        self.assertNoResult(d)
        self.clock.advance(0.001)
        self.assertEqual(self.successResultOf(d), "answer")
        self.assertEqual(call.times, [0.0, 2.0])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_success_at_once_waits_for_nothing(self) -> None:
        call = Calls(self.clock, ["now"])
        d = run(RetryPolicy(3, jitter=no_jitter), self.clock, call)
        self.assertEqual(self.successResultOf(d), "now")
        self.assertEqual(call.times, [0.0])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_pending_call_is_awaited(self) -> None:
        slow: Deferred = Deferred()
        call = Calls(self.clock, [Flaky(), slow])
        d = run(RetryPolicy(3, jitter=no_jitter), self.clock, call)
        self.clock.advance(1)
        self.assertEqual(call.times, [0.0, 1.0])
        self.clock.advance(100)
        self.assertNoResult(d)
        self.assertEqual(len(call.times), 2)  # no retry while a try is in flight
        slow.callback("late")
        self.assertEqual(self.successResultOf(d), "late")

    def test_on_retry_gets_attempt_error_and_delay(self) -> None:
        errors = [Flaky("a"), Flaky("b"), Flaky("c"), Flaky("d")]
        call = Calls(self.clock, list(errors))
        retries = []
        d = run(
            RetryPolicy(4, initial=1.0, factor=2.0, cap=30.0, jitter=no_jitter),
            self.clock,
            call,
            on_retry=lambda attempt, error, delay: retries.append((attempt, error, delay, self.clock.seconds())),
        )
        self.clock.pump([1] * 10)
        self.assertEqual(
            retries,
            [
                (2, errors[0], 1.0, 0.0),  # told before the wait: the 2nd try follows in 1 s
                (3, errors[1], 2.0, 1.0),
                (4, errors[2], 4.0, 3.0),
            ],
        )
        self.assertIs(self.failureResultOf(d, Flaky).value, errors[3])  # no on_retry once spent

    def test_on_retry_sees_the_jittered_delay(self) -> None:
        call = Calls(self.clock, [Flaky(), "ok"])
        retries = []
        d = run(
            RetryPolicy(2, initial=1.0, jitter=lambda: 0.25),
            self.clock,
            call,
            on_retry=lambda *a: retries.append(a[2]),
        )
        self.clock.advance(1.0)
        self.assertNoResult(d)
        self.clock.advance(0.25)
        self.assertEqual(self.successResultOf(d), "ok")
        self.assertEqual(retries, [1.25])
        self.assertEqual(call.times, [0.0, 1.25])

    def test_single_attempt_is_never_retried(self) -> None:
        call = Calls(self.clock, [], default=lambda: Flaky())
        retries = []
        d = run(RetryPolicy(1, jitter=no_jitter), self.clock, call, on_retry=lambda *a: retries.append(a))
        self.failureResultOf(d, Flaky)
        self.assertEqual(call.times, [0.0])
        self.assertEqual(retries, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_zero_attempts_is_an_error_and_calls_nothing(self) -> None:
        call = Calls(self.clock, ["never"])
        d = run(RetryPolicy(0), self.clock, call)
        self.failureResultOf(d, ValueError)
        self.assertEqual(call.times, [])

    def test_cancelling_during_a_backoff_wait_leaves_no_timer(self) -> None:
        call = Calls(self.clock, [], default=lambda: Flaky())
        d = run(RetryPolicy(5, initial=1.0, jitter=no_jitter), self.clock, call)
        self.clock.advance(1)  # second try failed: waiting 2 s for the third
        self.assertEqual(call.times, [0.0, 1.0])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertEqual(self.clock.getDelayedCalls()[0].getTime(), 3.0)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(100)
        self.assertEqual(call.times, [0.0, 1.0])

    def test_cancelling_during_a_try_in_flight_does_not_retry(self) -> None:
        cancelled = []
        slow: Deferred = Deferred(lambda d: cancelled.append(d))
        call = Calls(self.clock, [slow], default=lambda: Flaky())
        d = run(RetryPolicy(5, jitter=no_jitter), self.clock, call)
        d.cancel()
        self.assertEqual(cancelled, [slow])
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(100)
        self.assertEqual(call.times, [0.0])
