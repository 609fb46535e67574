"""EventReporter under task.Clock: once per session, exact ids, bounded retries, never blocking."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from acexy_tw.content import ContentKey
from acexy_tw.engine import EngineAddress, PlaybackInfo
from acexy_tw.orchestrator.client import OrchestratorError, OrchestratorUnavailable
from acexy_tw.orchestrator.events import EventReporter
from acexy_tw.retry import RetryPolicy
from acexy_tw.testing import ScriptedOrchestrator


def session(container_id: Any = "c" * 64, n: int = 1) -> SimpleNamespace:
    engine = SimpleNamespace(address=EngineAddress("http", "10.0.0.5", 19001), container_id=container_id)
    info = PlaybackInfo("http://10.0.0.5:19001/ace/r/x/t", "http://10.0.0.5:19001/ace/stat/x/t",
                        "http://10.0.0.5:19001/ace/cmd/x/t", "i" * 40, f"{n:040x}", 1)
    return SimpleNamespace(key=ContentKey("content_id", f"{n:040x}"), engine=engine, info=info, stream_id=None)


class EventReporterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.orch = ScriptedOrchestrator(self.clock)
        self.events = EventReporter(self.orch, self.clock, retry=RetryPolicy(3, initial=1.0, jitter=lambda: 0))

    def test_started_then_ended_with_the_exact_stream_id(self) -> None:
        s = session()
        self.events.started(s)
        self.events.started(s)  # once per session, however often asked
        [event] = self.orch.started
        self.assertEqual(event["labels"]["stream_id"], f"{1:040x}|{1:040x}")
        self.assertEqual(event["engine"], {"host": "10.0.0.5", "port": 19001})
        self.assertEqual(s.stream_id, event["labels"]["stream_id"])
        self.events.ended(s, "client_disconnected")
        self.events.ended(s, "client_disconnected")
        self.assertEqual(self.orch.ended, [("c" * 64, s.stream_id, "client_disconnected")])

    def test_never_ended_without_started(self) -> None:
        self.events.ended(session(), "engine_error")
        self.assertEqual(self.orch.ended, [])

    def test_fallback_engine_sessions_are_not_reported(self) -> None:
        s = session(container_id=None)
        self.events.started(s)
        self.events.ended(s, "engine_eof")
        self.assertEqual((self.orch.started, self.orch.ended), ([], []))

    def test_a_transient_failure_is_retried_a_bounded_number_of_times(self) -> None:
        self.orch.event_failures = [OrchestratorUnavailable("refused")] * 5
        self.events.started(session())
        self.assertEqual(len(self.orch.started), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.orch.started), 2)
        self.clock.advance(2)
        self.assertEqual(len(self.orch.started), 3)
        self.clock.advance(100)
        self.assertEqual(len(self.orch.started), 3)  # gave up after 3
        self.assertEqual(self.events.sent["failed"], 1)
        self.successResultOf(self.events.flush())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_transient_failure_then_success(self) -> None:
        self.orch.event_failures = [OrchestratorUnavailable("timeout")]
        self.events.started(session())
        self.clock.advance(1)
        self.assertEqual(self.events.sent["started"], 1)

    def test_a_rejection_is_not_retried(self) -> None:
        self.orch.event_failures = [OrchestratorError("422: stat_url must be absolute")]
        self.events.started(session())
        self.clock.advance(100)
        self.assertEqual(len(self.orch.started), 1)
        self.assertEqual(self.events.sent["failed"], 1)

    def test_reports_never_block_the_caller(self) -> None:
        hanging: Deferred = Deferred()
        self.orch.stream_started = lambda event: hanging  # type: ignore[assignment]
        self.events.started(session())  # returns at once
        d = self.events.flush()
        self.assertNoResult(d)
        hanging.callback(None)
        self.successResultOf(d)
