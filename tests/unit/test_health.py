"""HealthMonitor under task.Clock: intervals, outage polling, hung/failed polls, transitions."""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from acexy_tw.orchestrator.health import HealthMonitor
from acexy_tw.testing import orchestrator_status

HEALTHY = orchestrator_status()
VPN_DOWN = orchestrator_status(can_provision=False, vpn_down=True)
UNAVAILABLE = orchestrator_status(status="unavailable")


class Script:
    """fetch() answers from a list; the last answer repeats."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.calls: list[float] = []
        self.clock: Optional[Clock] = None

    def __call__(self) -> Deferred:
        self.calls.append(self.clock.seconds())
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            return fail(answer)
        if answer == "hang":
            return Deferred()
        return succeed(answer)


def monitor(*answers: Any, interval: float = 30, outage: float = 10, timeout: float = 5) -> tuple[HealthMonitor, Script, Clock]:
    clock = Clock()
    script = Script(*answers)
    script.clock = clock
    mon = HealthMonitor(script, clock, interval=interval, outage_interval=outage, timeout=timeout)
    return mon, script, clock


class LogCapture:
    def __init__(self, test: SynchronousTestCase) -> None:
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        test.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def texts(self) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.events if e.get("log_namespace", "").startswith("acexy_tw")]


class HealthMonitorTests(SynchronousTestCase):
    def test_polls_at_start_and_every_interval(self) -> None:
        mon, script, clock = monitor(HEALTHY)
        mon.startService()
        self.assertEqual(script.calls, [0])
        clock.pump([30, 30, 30])
        self.assertEqual(script.calls, [0, 30, 60, 90])
        self.assertIs(mon.snapshot, HEALTHY)
        self.assertEqual(mon.age(), 0)
        mon.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_polls_faster_while_blocked_then_back_to_normal(self) -> None:
        mon, script, clock = monitor(HEALTHY, VPN_DOWN, VPN_DOWN, HEALTHY)
        mon.startService()  # t=0 healthy
        clock.advance(30)  # t=30 vpn down -> outage interval
        clock.advance(10)  # t=40 still down
        clock.advance(10)  # t=50 healthy -> normal interval
        clock.advance(10)
        clock.advance(20)  # t=80
        self.assertEqual(script.calls, [0, 30, 40, 50, 80])
        mon.stopService()

    def test_unreachable_polls_at_the_outage_interval(self) -> None:
        mon, script, clock = monitor(ConnectionRefusedError("refused"), HEALTHY)
        mon.startService()
        self.assertFalse(mon.reachable)
        clock.advance(10)
        self.assertTrue(mon.reachable)
        self.assertEqual(script.calls, [0, 10])
        mon.stopService()

    def test_a_failed_or_hung_poll_never_kills_the_loop(self) -> None:
        mon, script, clock = monitor(HEALTHY, RuntimeError("boom"), "hang", HEALTHY, timeout=5)
        mon.startService()
        clock.advance(30)  # boom
        self.assertFalse(mon.reachable)
        self.assertIs(mon.snapshot, HEALTHY)  # the last good snapshot is kept, with its age
        self.assertEqual(mon.age(), 30)
        clock.advance(10)  # hang ...
        clock.advance(5)  # ... bounded by the timeout
        self.assertFalse(mon.reachable)
        self.assertIn("no answer within 5s", mon.last_error)
        clock.advance(10)
        self.assertTrue(mon.reachable)
        self.assertEqual(script.calls, [0, 30, 40, 55])
        mon.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_fresh_uses_a_young_snapshot_and_polls_for_an_old_one(self) -> None:
        mon, script, clock = monitor(HEALTHY)
        mon.startService()
        self.assertIs(self.successResultOf(mon.fresh(30)), HEALTHY)
        self.assertEqual(len(script.calls), 1)
        clock.advance(29)
        self.assertIs(self.successResultOf(mon.fresh(5)), HEALTHY)  # too old: polled now
        self.assertEqual(script.calls, [0, 29])
        mon.stopService()

    def test_fresh_callers_share_one_inflight_poll(self) -> None:
        mon, script, clock = monitor("hang")
        d1, d2 = mon.fresh(1), mon.fresh(1)
        self.assertEqual(len(script.calls), 1)
        clock.advance(5)
        self.assertIsNone(self.successResultOf(d1))  # unreachable: None
        self.assertIsNone(self.successResultOf(d2))

    def test_stop_cancels_an_inflight_poll_and_leaves_no_timers(self) -> None:
        mon, script, clock = monitor("hang")
        mon.startService()
        d = mon.fresh(0)
        mon.stopService()
        self.assertIsNone(self.successResultOf(d))  # resolved as "unreachable", not left hanging
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_transitions_are_logged_once(self) -> None:
        logs = LogCapture(self)
        mon, script, clock = monitor(HEALTHY, VPN_DOWN, VPN_DOWN, VPN_DOWN, HEALTHY, ConnectionRefusedError("x"), ConnectionRefusedError("x"), HEALTHY)
        mon.startService()
        clock.pump([30, 10, 10, 10, 30, 10, 10])
        texts = logs.texts()
        self.assertEqual(sum("VPN down" in t for t in texts), 1)
        self.assertEqual(sum("VPN back up" in t for t in texts), 1)
        self.assertEqual(sum("unreachable" in t for t in texts), 1)
        self.assertEqual(sum("reachable again" in t for t in texts), 1)
        mon.stopService()


class DegradedTests(SynchronousTestCase):
    def test_unavailable_polls_faster_and_warns_once(self) -> None:
        logs = LogCapture(self)
        mon, script, clock = monitor(HEALTHY, UNAVAILABLE, UNAVAILABLE, UNAVAILABLE, HEALTHY)
        mon.startService()
        clock.pump([30, 10, 10, 10])
        self.assertEqual(script.calls, [0, 30, 40, 50, 60])
        self.assertEqual(sum("no engine running" in t for t in logs.texts()), 1)
        self.assertEqual(mon.current_interval, 30)  # healthy again
        mon.stopService()

    def test_warnings_for_the_operator(self) -> None:
        mon, script, clock = monitor(UNAVAILABLE)
        mon.startService()
        self.assertIn("no engine running", " ".join(mon.warnings()))
        mon.stopService()
        mon, script, clock = monitor(VPN_DOWN)
        mon.startService()
        self.assertIn("VPN down", " ".join(mon.warnings()))
        mon.stopService()
        mon, script, clock = monitor(ConnectionRefusedError("refused"))
        mon.startService()
        self.assertIn("unreachable", " ".join(mon.warnings()))
        mon.stopService()
