"""
The engine session's lifecycle (acexy_tw.streaming.lifecycle), deterministic:

- the bare Automat machine: every legal transition and every illegal input;
- each transition through EngineSession on the production wiring in memory
  (acexy_tw.testing.InMemoryProxy):
  what the players get and which timers run in each state;
- the failover budget of an incident under the clock: how many engine
  sessions a persistently failing engine costs, when, and when an incident
  ends (``failover_reset`` seconds of real data).
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Any

from twisted.internet.task import LoopingCall
from twisted.trial.unittest import SynchronousTestCase

from acexy_tw.content import ContentKey
from acexy_tw.engine import EngineError
from acexy_tw.streaming.lifecycle import (
    CLOSED,
    KEEPALIVE_STATES,
    LINGERING,
    RECOVERING,
    STARTING,
    STREAMING,
    TRANSITIONS,
    WAITING,
    Lifecycle,
    LifecycleInputs,
    NoTransition,
)
from acexy_tw.streaming.mpegts import PACKET_SIZE
from acexy_tw.streaming.session import KEEPALIVE, EngineSession
from acexy_tw.stats import TIMER_NAMES as STATS_TIMERS
from acexy_tw.testing import (
    CID,
    CID2,
    InMemoryProxy,
    ScriptedEngine,
    key,
    only_nulls,
    orchestrator_status,
    our_delayed_calls,
    ts,
    vpn_down,
)

ALL_STATES = (STARTING, WAITING, STREAMING, RECOVERING, LINGERING, CLOSED)
ALL_INPUTS = ("opened", "told_to_wait", "engine_failed", "emptied", "joined", "close")
K = len(KEEPALIVE)


# -- helpers ---------------------------------------------------------------------------


def timer_name(call: Any) -> str:
    func = call.func
    if isinstance(func, LoopingCall):
        func = func.f
    return getattr(func, "__name__", repr(func))


def timers(p: InMemoryProxy) -> list[str]:
    """Our pending timers by function name, sorted (the channels' idle timeouts
    left out, and the live stats' timers: tests/unit/test_stats.py checks them)."""
    return sorted(n for n in (timer_name(c) for c in our_delayed_calls(p.clock)) if n not in STATS_TIMERS)


def timer(p: InMemoryProxy, name: str) -> Any:
    [call] = [c for c in our_delayed_calls(p.clock) if timer_name(c) == name]
    return call


class Recorder:
    """Every lifecycle transition of every EngineSession made while installed."""

    def __init__(self, case: SynchronousTestCase) -> None:
        self.log: list[tuple[str, str]] = []
        original = EngineSession._entered
        recorder = self

        def entered(session: EngineSession, old: str, new: str) -> None:
            recorder.log.append((old, new))
            original(session, old, new)

        case.patch(EngineSession, "_entered", entered)


def record_start_times(p: InMemoryProxy) -> list[float]:
    """Clock times of every engine start (getstream) from now on."""
    times: list[float] = []
    original = p.engine.start

    def start(k: ContentKey) -> Any:
        times.append(p.clock.seconds())
        return original(k)

    p.engine.start = start  # type: ignore[method-assign]
    return times


def reset_every_new_playback(p: InMemoryProxy, until: float, handled: int, step: float = 0.25) -> int:
    """Advance the clock to ``until``; every playback that appears meanwhile
    (beyond the first ``handled``) is reset the moment it is there."""
    while True:
        while len(p.engine.responses) > handled:
            p.engine.responses[handled].reset()
            handled += 1
        if p.clock.seconds() >= until:
            return handled
        p.clock.advance(min(step, until - p.clock.seconds()))


# -- a. the bare machine --------------------------------------------------------------


def path_to(state: str) -> list[str]:
    """The inputs leading from ``starting`` to ``state`` (breadth first over TRANSITIONS)."""
    seen = {STARTING: []}
    todo = deque([STARTING])
    while todo:
        here = todo.popleft()
        for old, name, new in TRANSITIONS:
            if old == here and new not in seen:
                seen[new] = seen[here] + [name]
                todo.append(new)
    return seen[state]


class Machine:
    def __init__(self, state: str = STARTING) -> None:
        self.entered: list[tuple[str, str, str]] = []
        self.life = Lifecycle(self._on_enter)
        for name in path_to(state):
            getattr(self.life.inputs, name)()
        assert self.life.state == state
        self.entered.clear()

    def _on_enter(self, old: str, new: str) -> None:
        self.entered.append((old, new, self.life.state))


class MachineTests(SynchronousTestCase):
    def test_the_table(self) -> None:
        inputs = sorted(n for n in vars(LifecycleInputs) if not n.startswith("_") and callable(getattr(LifecycleInputs, n)))
        self.assertEqual(inputs, sorted(ALL_INPUTS))
        self.assertEqual(len(TRANSITIONS), 14)
        pairs = [(old, name) for old, name, _ in TRANSITIONS]
        self.assertEqual(len(set(pairs)), 14)  # deterministic: one target per (state, input)
        self.assertEqual({old for old, _ in pairs} | {new for _, _, new in TRANSITIONS}, set(ALL_STATES))
        self.assertEqual({old for old, name, _ in TRANSITIONS if name == "close"}, set(ALL_STATES) - {CLOSED})
        self.assertEqual(Lifecycle(lambda o, n: None).state, STARTING)

    def test_every_state_is_reachable(self) -> None:
        self.assertEqual(path_to(STARTING), [])
        self.assertEqual(path_to(WAITING), ["told_to_wait"])
        self.assertEqual(path_to(STREAMING), ["opened"])
        self.assertEqual(path_to(RECOVERING), ["opened", "engine_failed"])
        self.assertEqual(path_to(LINGERING), ["opened", "emptied"])
        self.assertEqual(path_to(CLOSED), ["close"])
        for state in ALL_STATES:
            self.assertEqual(Machine(state).life.state, state)

    def test_every_legal_transition_moves_and_calls_on_enter(self) -> None:
        for old, name, new in TRANSITIONS:
            m = Machine(old)
            result = getattr(m.life.inputs, name)()
            self.assertIsNone(result)
            self.assertEqual(m.life.state, new, (old, name))
            # once, with (old, new), and the state already names the new one
            self.assertEqual(m.entered, [(old, new, new)], (old, name))

    def test_every_other_input_is_no_transition_and_changes_nothing(self) -> None:
        legal = {(old, name) for old, name, _ in TRANSITIONS}
        illegal = [(s, i) for s in ALL_STATES for i in ALL_INPUTS if (s, i) not in legal]
        self.assertEqual(len(illegal), 36 - 14)
        for state, name in illegal:
            m = Machine(state)
            with self.assertRaises(NoTransition, msg=(state, name)):
                getattr(m.life.inputs, name)()
            self.assertEqual(m.life.state, state, (state, name))
            self.assertEqual(m.entered, [], (state, name))
            self.assertEqual(m.life.keepalive, state in (WAITING, RECOVERING))
            # the machine itself did not move either: a legal input still works from here
            follow = [(n, new) for old, n, new in TRANSITIONS if old == state]
            if follow:
                n, new = follow[0]
                getattr(m.life.inputs, n)()
                self.assertEqual(m.life.state, new, (state, name, n))

    def test_closed_accepts_no_input_at_all(self) -> None:
        m = Machine(CLOSED)
        for name in ALL_INPUTS:
            with self.assertRaises(NoTransition, msg=name):
                getattr(m.life.inputs, name)()
            self.assertEqual(m.life.state, CLOSED)
        self.assertEqual(m.entered, [])

    def test_a_state_to_itself_still_calls_on_enter(self) -> None:
        m = Machine(WAITING)
        m.life.inputs.told_to_wait()
        m.life.inputs.told_to_wait()
        self.assertEqual(m.entered, [(WAITING, WAITING, WAITING)] * 2)

    def test_keepalive_exactly_in_waiting_and_recovering(self) -> None:
        self.assertEqual(KEEPALIVE_STATES, frozenset({WAITING, RECOVERING}))
        self.assertEqual([s for s in ALL_STATES if Machine(s).life.keepalive], [WAITING, RECOVERING])

    def test_a_long_walk(self) -> None:
        m = Machine()
        for name in ("told_to_wait", "told_to_wait", "opened", "engine_failed", "told_to_wait", "opened",
                     "engine_failed", "opened", "emptied", "joined", "emptied", "close"):
            getattr(m.life.inputs, name)()
        self.assertEqual(
            [(o, n) for o, n, _ in m.entered],
            [
                (STARTING, WAITING),
                (WAITING, WAITING),
                (WAITING, STREAMING),
                (STREAMING, RECOVERING),
                (RECOVERING, WAITING),
                (WAITING, STREAMING),
                (STREAMING, RECOVERING),
                (RECOVERING, STREAMING),
                (STREAMING, LINGERING),
                (LINGERING, STREAMING),
                (STREAMING, LINGERING),
                (LINGERING, CLOSED),
            ],
        )


# -- b. each transition through EngineSession -------------------------------------------


class SessionTransitionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.rec = Recorder(self)

    def session(self, p: InMemoryProxy, cid: str = CID) -> EngineSession:
        s = p.registry.get(key(cid))
        self.assertIsNotNone(s)
        return s

    # starting -> ...

    def test_starting_to_streaming(self) -> None:
        p = InMemoryProxy(ScriptedEngine(auto=False))
        c = p.connect()
        s = self.session(p)
        self.assertEqual(s.state, STARTING)
        self.assertEqual(c.value(), b"")  # nothing yet: a refusal can still be a real HTTP error
        self.assertEqual(timers(p), [])
        self.assertEqual(len(p.engine.starts), 1)
        p.engine.accept()
        self.assertEqual(s.state, STREAMING)
        self.assertEqual(self.rec.log, [(STARTING, STREAMING)])
        self.assertFalse(s.waiting)
        p.engine.response.data(ts(3, 0x21))
        self.assertEqual(c.status(), 200)
        self.assertEqual(c.body(), ts(3, 0x21))
        self.assertEqual(timers(p), ["_check_silence"])  # the engine's watchdog only: no keepalive
        p.clock.pump([1] * 5)
        self.assertEqual(c.body(), ts(3, 0x21))  # no null packets ever
        self.assertEqual(s.streaming_since, 0.0)
        self.assertEqual(s.engine_sessions, 1)

    def test_starting_to_waiting(self) -> None:
        p = InMemoryProxy(queue_size=8, keepalive_interval=1.0)
        p.engine.script = [vpn_down()]
        c = p.connect()
        s = self.session(p)
        self.assertEqual(s.state, WAITING)
        self.assertEqual(self.rec.log, [(STARTING, WAITING)])
        self.assertEqual(c.status(), 200)
        self.assertEqual(c.body(), KEEPALIVE)  # 200 + null packets at once
        self.assertTrue(only_nulls(c.body()))
        self.assertTrue(s.waiting)
        self.assertEqual(s.waiting_reason, "vpn_disconnected")
        self.assertEqual(s.waiting_since, 0.0)
        self.assertEqual(timers(p), ["_keepalive_tick"])
        self.assertEqual(timer(p, "_keepalive_tick").getTime(), 1.0)
        self.assertEqual(p.waits.held, [s])
        self.assertEqual(p.waits.kept_alive, [s])
        self.assertEqual(p.engine.starts, [])  # no engine
        p.clock.advance(1)
        self.assertEqual(len(c.body()), 2 * K)
        self.assertFalse(c.finished_cleanly() or c.aborted)

    def test_waiting_to_waiting_keeps_the_player_and_its_queue_place(self) -> None:
        p = InMemoryProxy(queue_size=8, keepalive_interval=1.0)
        p.engine.script = [vpn_down(), vpn_down()]
        a = p.connect()
        b = p.connect(b"/ace/getstream?id=" + CID2.encode())
        sa, sb = self.session(p, CID), self.session(p, CID2)
        self.assertEqual(p.waits.held, [sa, sb])
        p.clock.advance(0.5)
        p.engine.script = [vpn_down()]  # A is told to wait again
        p.waits.kick()
        self.assertEqual(p.engine.attempts, [key(CID), key(CID2), key(CID)])  # B not tried
        self.assertEqual(sa.state, WAITING)
        self.assertEqual(self.rec.log, [(STARTING, WAITING), (STARTING, WAITING), (WAITING, WAITING)])
        self.assertEqual(p.waits.held, [sa, sb])  # A keeps its place, ahead of B
        self.assertEqual(sa.waiting_since, 0.0)  # still the same wait
        self.assertEqual(len(a.body()), K)  # no extra keepalive burst from the re-entry
        p.clock.advance(0.5)
        self.assertEqual(len(a.body()), 2 * K)  # the same cadence
        self.assertTrue(only_nulls(a.body()))
        self.assertEqual(timers(p), ["_keepalive_tick", "_keepalive_tick"])
        self.assertFalse(a.finished_cleanly() or a.aborted)
        self.assertEqual(len(b.body()), 2 * K)
        self.assertEqual(p.engine.starts, [])

    def test_waiting_to_streaming_on_the_same_connection(self) -> None:
        p = InMemoryProxy(queue_size=8, keepalive_interval=1.0)
        p.engine.script = [vpn_down()]
        c = p.connect()
        s = self.session(p)
        p.clock.pump([1, 1, 0.5])  # keepalive at 0, 1, 2
        p.waits.kick()  # the monitor saw the VPN back
        self.assertEqual(s.state, STREAMING)
        self.assertEqual(self.rec.log, [(STARTING, WAITING), (WAITING, STREAMING)])
        self.assertFalse(s.waiting)
        self.assertEqual(timers(p), ["_check_silence"])  # keepalive stopped
        self.assertEqual(p.waits.held, [])
        self.assertEqual(p.waits.kept_alive, [])
        self.assertEqual(s.last_gap, 2.5)
        p.engine.response.data(ts(2, 0x33))
        self.assertEqual(c.body(), KEEPALIVE * 3 + ts(2, 0x33))
        p.clock.pump([1] * 5)
        self.assertEqual(c.body(), KEEPALIVE * 3 + ts(2, 0x33))  # no more nulls
        self.assertEqual(c.value().count(b"HTTP/1.1 200"), 1)  # one response, the same connection
        self.assertEqual(len(p.engine.starts), 1)

    # streaming -> recovering -> ...

    def _streaming_with_players(self, **kwargs: Any) -> tuple[InMemoryProxy, EngineSession, list]:
        p = InMemoryProxy(failover_attempts=3, queue_size=8, keepalive_interval=1.0, **kwargs)
        players = [p.connect(), p.connect()]
        s = self.session(p)
        p.engine.response.data(ts(2, 0x01))
        return p, s, players

    def test_streaming_to_recovering(self) -> None:
        p, s, players = self._streaming_with_players()
        p.clock.advance(3)
        dead = s.info
        p.engine.auto = False  # the failover's engine answers later
        p.engine.response.reset()
        self.assertEqual(s.state, RECOVERING)
        self.assertEqual(self.rec.log, [(STARTING, STREAMING), (STREAMING, RECOVERING)])
        self.assertTrue(s.waiting)
        for c in players:
            self.assertEqual(c.body(), ts(2, 0x01) + KEEPALIVE)  # keepalive at once
            self.assertFalse(c.finished_cleanly() or c.aborted)
        self.assertEqual(p.engine.stops, [dead])  # the dead engine session is stopped
        self.assertEqual(len(p.engine.starts), 2)  # the first attempt is in flight already
        self.assertEqual(p.registry.stopped, {"failover": 1})  # the dead engine session, reported
        self.assertEqual(timers(p), ["_keepalive_tick"])  # the dead connection's watchdog is gone
        self.assertIsNotNone(s.incident)
        self.assertEqual((s.incident.started_at, s.incident.budget.used), (3.0, 1))
        self.assertEqual(s.failovers, 1)
        self.assertEqual(p.waits.kept_alive, [s])
        self.assertEqual(p.waits.held, [])  # recovering is not queued
        p.clock.advance(1)
        for c in players:
            self.assertEqual(c.body(), ts(2, 0x01) + KEEPALIVE * 2)

    def test_recovering_to_streaming(self) -> None:
        p, s, players = self._streaming_with_players()
        p.clock.advance(3)
        p.engine.auto = False
        p.engine.response.reset()
        p.clock.advance(1.5)  # keepalive at 3 and 4
        p.engine.accept()
        self.assertEqual(s.state, STREAMING)
        self.assertEqual(self.rec.log, [(STARTING, STREAMING), (STREAMING, RECOVERING), (RECOVERING, STREAMING)])
        self.assertFalse(s.waiting)
        p.engine.response.data(ts(2, 0x02))
        for c in players:
            self.assertEqual(c.body(), ts(2, 0x01) + KEEPALIVE * 2 + ts(2, 0x02))
        # real data while an incident is open arms its healthy-period check
        self.assertEqual(timers(p), ["_check_healthy", "_check_silence"])
        self.assertEqual(timer(p, "_check_healthy").getTime(), 4.5 + 30.0)
        self.assertEqual(s.last_gap, 4.5)  # from the last real byte (t=0) to the new stream
        self.assertEqual(s.engine_sessions, 2)
        self.assertEqual(len(p.engine.stops), 1)
        self.assertEqual(p.waits.kept_alive, [])
        p.clock.pump([1] * 3)
        for c in players:
            self.assertEqual(c.body(), ts(2, 0x01) + KEEPALIVE * 2 + ts(2, 0x02))

    def test_recovering_to_waiting(self) -> None:
        # The VPN drops: the engine dies, the orchestrator lists none and says
        # why, so the failover's placement is told to wait.
        p = InMemoryProxy(orchestrator=True, failover_attempts=3, keepalive_interval=1.0)
        dead, other = p.orchestrator.add(1), p.orchestrator.add(2)
        players = [p.connect(), p.connect()]
        s = self.session(p)
        first = p.engine_of(dead)
        first.response.data(ts(2, 0x01))
        p.orchestrator.engine_list = []
        p.orchestrator.snapshot = orchestrator_status(can_provision=False, code="vpn_disconnected", vpn_down=True)
        first.response.reset()
        self.assertEqual(s.state, WAITING)
        self.assertEqual(
            self.rec.log, [(STARTING, STREAMING), (STREAMING, RECOVERING), (RECOVERING, WAITING)]
        )
        self.assertEqual(s.waiting_reason, "vpn_disconnected")
        self.assertEqual(p.waits.held, [s])
        self.assertEqual(p.waits.kept_alive, [s])
        self.assertEqual(p.orchestrator.engines_calls, 2)  # the first placement and the failover's
        self.assertEqual(p.orchestrator.provision_calls, [])  # blocked: nothing posted
        self.assertEqual(first.attempts, [key()])
        self.assertEqual(len(first.stops), 1)
        self.assertEqual(timers(p), ["_keepalive_tick"])  # no blind failover timer: the queue retries it
        p.clock.pump([1] * 10)
        self.assertEqual(p.orchestrator.engines_calls, 2)
        for c in players:
            self.assertEqual(c.body(), ts(2, 0x01) + KEEPALIVE * 11)
            self.assertFalse(c.finished_cleanly() or c.aborted)
        p.orchestrator.engine_list = [dead, other]  # the VPN is back, and the engines
        p.orchestrator.snapshot = orchestrator_status()
        p.waits.kick()
        self.assertEqual(s.state, STREAMING)
        self.assertEqual(self.rec.log[-1], (WAITING, STREAMING))
        second = p.engine_of(other)
        self.assertIs(s.engine, second)  # the failed engine last, though it ranks first
        self.assertEqual((first.attempts, second.attempts), ([key()], [key()]))
        self.assertIsNotNone(s.incident)  # still the same incident
        second.response.data(ts(1, 0x03))
        for c in players:
            self.assertEqual(c.body()[-PACKET_SIZE:], ts(1, 0x03))

    # streaming -> lingering -> ...

    def _lingering(self) -> tuple[InMemoryProxy, EngineSession]:
        p = InMemoryProxy(linger=5)
        c = p.connect()
        s = self.session(p)
        p.engine.response.data(ts(1))
        p.clock.advance(2)
        c.disconnect()
        return p, s

    def test_streaming_to_lingering(self) -> None:
        p, s = self._lingering()
        self.assertEqual(s.state, LINGERING)
        self.assertEqual(self.rec.log, [(STARTING, STREAMING), (STREAMING, LINGERING)])
        self.assertEqual(timers(p), ["_check_silence", "_linger_expired"])
        self.assertEqual(timer(p, "_linger_expired").getTime(), 7.0)
        self.assertEqual(p.engine.stops, [])  # the engine stays open
        self.assertEqual(p.engine.response.transport.producerState, "producing")  # and is read
        self.assertIs(p.registry.get(key()), s)
        self.assertFalse(s.waiting)
        p.engine.response.data(ts(3))  # for nobody: dropped
        self.assertEqual(s.state, LINGERING)

    def test_lingering_to_streaming(self) -> None:
        p, s = self._lingering()
        p.clock.advance(4.9)
        c = p.connect()
        self.assertEqual(s.state, STREAMING)
        self.assertEqual(self.rec.log[-1], (LINGERING, STREAMING))
        self.assertEqual(len(p.engine.starts), 1)  # no new engine start
        self.assertEqual(timers(p), ["_check_silence"])  # linger timer gone
        p.engine.response.data(ts(2, 0x44))
        self.assertEqual(c.body(), ts(2, 0x44))
        p.clock.advance(10)
        self.assertIs(p.registry.get(key()), s)
        self.assertEqual(p.engine.stops, [])

    def test_lingering_to_closed(self) -> None:
        p, s = self._lingering()
        info = s.info
        p.clock.advance(4.999)
        self.assertEqual(s.state, LINGERING)
        p.clock.advance(0.001)
        self.assertEqual(s.state, CLOSED)
        self.assertEqual(self.rec.log[-1], (LINGERING, CLOSED))
        self.assertEqual(p.engine.stops, [info])
        self.assertEqual(p.engine.response.transport.producerState, "stopped")  # connection closed
        self.assertIsNone(p.registry.get(key()))
        self.assertEqual(s.close_reason, "client_disconnected")
        self.assertEqual(p.registry.stopped, {"client_disconnected": 1})
        self.assertEqual(our_delayed_calls(p.clock), [])

    # close from every non-closed state

    def _close_and_check(self, p: InMemoryProxy, s: EngineSession, state: str, stops: int) -> None:
        starts = len(p.engine.starts)
        attempts = len(p.engine.attempts)
        before = Counter(p.registry.stopped)  # a failover's lost engine session is counted already
        self.assertEqual(s.state, state)
        s.close("shutdown")
        self.assertEqual(s.state, CLOSED)
        self.assertEqual(self.rec.log[-1], (state, CLOSED))
        self.assertEqual(our_delayed_calls(p.clock), [])
        self.assertEqual(len(p.engine.stops), stops)
        self.assertIsNone(p.registry.get(s.key))
        self.assertEqual(p.registry.stopped - before, {"shutdown": 1})
        self.assertEqual(s.close_reason, "shutdown")
        self.assertEqual((p.waits.held, p.waits.kept_alive), ([], []))
        s.close("again")  # idempotent
        self.assertEqual(p.registry.stopped - before, {"shutdown": 1})
        self.assertEqual(s.close_reason, "shutdown")
        p.clock.advance(100)
        self.assertEqual(len(p.engine.starts), starts)  # nothing placed after the close
        self.assertEqual(len(p.engine.attempts), attempts)
        self.assertEqual(len(p.engine.stops), stops)

    def test_close_while_starting(self) -> None:
        p = InMemoryProxy(ScriptedEngine(auto=False))
        c = p.connect()
        s = self.session(p)
        self._close_and_check(p, s, STARTING, stops=0)  # no engine session yet
        self.assertTrue(p.engine.starts[0][1].called)  # the start was cancelled: no late answer
        self.assertEqual(p.engine.playbacks, [])
        self.assertEqual(c.status(), 502)  # no byte yet: a real HTTP error

    def test_close_while_waiting(self) -> None:
        p = InMemoryProxy(queue_size=8)
        p.engine.script = [vpn_down()]
        c = p.connect()
        s = self.session(p)
        p.clock.advance(1)
        self._close_and_check(p, s, WAITING, stops=0)
        self.assertTrue(c.finished_cleanly())  # it had its 200: a clean end
        self.assertEqual(c.body(), KEEPALIVE * 2)

    def test_close_while_streaming(self) -> None:
        p = InMemoryProxy()
        c = p.connect()
        s = self.session(p)
        p.engine.response.data(ts(2))
        self._close_and_check(p, s, STREAMING, stops=1)
        self.assertTrue(c.finished_cleanly())
        self.assertEqual(c.body(), ts(2))
        self.assertEqual(p.engine.response.transport.producerState, "stopped")

    def test_close_while_recovering_with_an_attempt_in_flight(self) -> None:
        p, s, players = self._streaming_with_players()
        p.engine.auto = False
        p.engine.response.reset()
        self._close_and_check(p, s, RECOVERING, stops=1)  # the dead one only: the new one never answered
        self.assertTrue(p.engine.starts[1][1].called)  # the attempt was cancelled: no late answer
        self.assertEqual(len(p.engine.playbacks), 1)
        for c in players:
            self.assertTrue(c.finished_cleanly())

    def test_close_while_recovering_between_attempts(self) -> None:
        p, s, players = self._streaming_with_players()
        p.engine.script = [EngineError("connection refused")]  # the immediate attempt fails
        p.engine.response.reset()
        self.assertEqual(timers(p), ["_attempt", "_keepalive_tick"])
        self.assertEqual(timer(p, "_attempt").getTime(), 1.0)
        self._close_and_check(p, s, RECOVERING, stops=1)
        for c in players:
            self.assertTrue(c.finished_cleanly())

    def test_close_while_lingering(self) -> None:
        p, s = self._lingering()
        self._close_and_check(p, s, LINGERING, stops=1)


class ReentrantCloseTests(SynchronousTestCase):
    # Fails at the time of writing: EngineSession._recover fires engine_failed(),
    # whose entry starts the keepalive with an immediate tick; that tick cuts the
    # player and detach() calls close() *inside* the transition, so Automat
    # postpones the close input. _recover then goes on to _next_attempt() and
    # places a new engine (start + stop) for a session that is already closed.

    def test_player_cut_by_the_first_keepalive_of_a_failover_places_nothing(self) -> None:
        # A slow player whose backlog is just under its cap when the engine
        # fails: the first null packets of "recovering" push it over and it is
        # cut, so the session has nobody left and closes — inside the
        # engine_failed transition. No engine may be placed for it after that.
        p = InMemoryProxy(failover_attempts=3, queue_size=8, buffer_size=4000)
        c = p.connect()
        s = p.registry.get(key())
        p.engine.response.data(ts(1))
        c.pause()  # its socket is full
        p.engine.response.data(ts(21))  # 3948 bytes wait: under 4000
        self.assertEqual(len(s.sinks), 1)
        p.engine.response.reset()
        self.assertTrue(c.aborted)  # cut by the keepalive
        self.assertEqual(s.state, CLOSED)
        self.assertEqual(s.close_reason, "client_disconnected")
        self.assertEqual(p.registry.stopped, {"failover": 1, "client_disconnected": 1})
        self.assertEqual(our_delayed_calls(p.clock), [])
        self.assertEqual(len(p.engine.stops), 1)  # the dead engine session only
        self.assertEqual(len(p.engine.starts), 1)  # no failover for a session that closed
        self.assertEqual(s.engine_sessions, 1)


# -- c. the failover budget under the clock ------------------------------------------------


class FailoverBudgetTests(SynchronousTestCase):
    def _streaming(self, **kwargs: Any) -> tuple[InMemoryProxy, EngineSession, Any, list[float]]:
        p = InMemoryProxy(failover_attempts=3, queue_size=8, **kwargs)
        times = record_start_times(p)
        c = p.connect()
        s = p.registry.get(key())
        p.engine.response.data(ts(1))
        return p, s, c, times

    def _give_up_after(self, p: InMemoryProxy, s: EngineSession, c: Any, t: float, handled: int) -> int:
        """From a failure at ``t`` that began a fresh incident: attempts at t, t+1, t+3, then a clean end."""
        handled = reset_every_new_playback(p, t + 2.75, handled)
        self.assertFalse(c.finished_cleanly() or c.aborted)
        self.assertEqual(s.state, RECOVERING)
        return reset_every_new_playback(p, t + 20, handled)

    def test_an_engine_that_resets_every_playback_costs_attempts_plus_one_sessions(self) -> None:
        p, s, c, times = self._streaming()
        p.clock.advance(10)
        t = p.clock.seconds()
        p.engine.response.reset()  # the first failure: the incident begins
        handled = reset_every_new_playback(p, t + 2.75, 1)
        self.assertEqual(times, [0.0, t, t + 1])  # t+3 not yet
        self.assertFalse(c.finished_cleanly() or c.aborted)
        self.assertEqual(s.state, RECOVERING)
        reset_every_new_playback(p, t + 60, handled)
        self.assertEqual(times, [0.0, t, t + 1, t + 3])
        self.assertEqual(len(p.engine.starts), 4)
        self.assertTrue(c.finished_cleanly())
        self.assertEqual(s.state, CLOSED)
        self.assertEqual(s.close_reason, "engine_error")
        # each of the four lost engine sessions is counted, then the session's own end
        self.assertEqual(p.registry.stopped, {"failover": 4, "engine_error": 1})
        self.assertEqual(len(p.engine.stops), 4)  # every engine session got its stop
        self.assertEqual(len({i.playback_session_id for i in p.engine.stops}), 4)
        self.assertEqual(s.engine_sessions, 4)
        self.assertEqual(our_delayed_calls(p.clock), [])
        self.assertIsNone(p.registry.get(key()))
        body = c.body()
        self.assertEqual(body[:PACKET_SIZE], ts(1))
        self.assertTrue(only_nulls(body[PACKET_SIZE:]))
        self.assertGreater(len(body), PACKET_SIZE)

    def test_the_player_ends_when_the_last_attempt_fails(self) -> None:
        p, s, c, times = self._streaming()
        p.clock.advance(10)
        p.engine.response.reset()
        handled = reset_every_new_playback(p, 12.75, 1)
        self.assertFalse(c.finished_cleanly())
        p.clock.advance(0.25)  # t+3: the third attempt opens ...
        self.assertEqual(times[-1], 13.0)
        self.assertFalse(c.finished_cleanly())
        p.engine.responses[handled].reset()  # ... and fails: the budget is spent
        self.assertTrue(c.finished_cleanly())
        self.assertEqual(p.clock.seconds(), 13.0)

    def test_a_healthy_period_ends_the_incident_and_restores_the_budget(self) -> None:
        p, s, c, times = self._streaming(failover_reset=10)
        p.clock.advance(5)
        p.engine.response.reset()  # t=5: incident, the immediate attempt streams
        self.assertEqual(times, [0.0, 5.0])
        self.assertEqual(s.state, STREAMING)
        self.assertEqual(s.incident.budget.used, 1)
        for _ in range(9):  # real data every second, t=5 .. 13
            p.engine.response.data(ts(1))
            p.clock.advance(1)
        p.engine.response.data(ts(1))  # t=14
        self.assertIsNotNone(s.incident)  # 9 s of data: not yet
        p.clock.advance(1)  # t=15: 10 s since data came back
        self.assertIsNone(s.incident)
        self.assertEqual(timers(p), ["_check_silence"])
        # the next failure is a fresh incident: immediate first retry, full attempts
        p.engine.response.reset()
        self.assertEqual(times, [0.0, 5.0, 15.0])
        self.assertEqual(s.incident.started_at, 15.0)
        self._give_up_after(p, s, c, 15.0, len(p.engine.responses) - 1)
        self.assertEqual(times, [0.0, 5.0, 15.0, 16.0, 18.0])
        self.assertTrue(c.finished_cleanly())
        self.assertEqual(len(p.engine.stops), 5)
        self.assertEqual(our_delayed_calls(p.clock), [])

    def test_data_that_stops_before_failover_reset_does_not_end_the_incident(self) -> None:
        p, s, c, times = self._streaming(failover_reset=10)
        p.clock.advance(5)
        p.engine.response.reset()  # t=5: incident, the immediate attempt streams
        for _ in range(4):  # data at t=5 .. 8, then silence
            p.engine.response.data(ts(1))
            p.clock.advance(1)
        p.engine.response.data(ts(1))  # t=9: the last byte
        p.clock.advance(6)  # t=15: the check finds 6 s of silence
        self.assertIsNotNone(s.incident)
        self.assertEqual(s.incident.budget.used, 1)
        self.assertEqual(timers(p), ["_check_silence"])  # no new healthy period without data
        p.engine.response.reset()  # t=15: the same incident goes on
        self.assertEqual(times, [0.0, 5.0])  # no immediate retry this time
        self.assertEqual(s.state, RECOVERING)
        reset_every_new_playback(p, 40, len(p.engine.responses))
        self.assertEqual(times, [0.0, 5.0, 16.0, 18.0])  # the two attempts left
        self.assertTrue(c.finished_cleanly())
        self.assertEqual(len(p.engine.starts), 4)
        self.assertEqual(len(p.engine.stops), 4)
        self.assertEqual(our_delayed_calls(p.clock), [])

    def test_silence_just_under_five_seconds_still_counts_as_flowing(self) -> None:
        p, s, c, times = self._streaming(failover_reset=10)
        p.clock.advance(5)
        p.engine.response.reset()
        p.engine.response.data(ts(1))  # t=5: the healthy period begins
        p.clock.advance(4.9)
        p.engine.response.data(ts(1))  # t=9.9: a 4.9 s gap does not restart it
        p.clock.advance(4.9)
        p.engine.response.data(ts(1))  # t=14.8
        p.clock.advance(0.2)
        self.assertEqual(p.clock.seconds(), 15.0)
        self.assertIsNone(s.incident)

    def test_a_gap_over_five_seconds_inside_the_period_starts_it_again(self) -> None:
        p, s, c, times = self._streaming(failover_reset=10)
        p.clock.advance(5)
        p.engine.response.reset()
        p.engine.response.data(ts(1))  # t=5
        p.clock.advance(5.1)
        p.engine.response.data(ts(1))  # t=10.1: after a 5.1 s gap the period starts again
        p.clock.advance(4.9)
        p.engine.response.data(ts(1))  # t=15
        self.assertIsNotNone(s.incident)  # not 10 s of data without a gap yet
        for _ in range(5):  # t=15 .. 19
            p.clock.advance(1)
            p.engine.response.data(ts(1))
        p.clock.advance(0.1)  # t=20.1: ten seconds since 10.1
        self.assertIsNone(s.incident)

    def test_data_coming_back_after_a_failed_check_starts_a_new_healthy_period(self) -> None:
        p, s, c, times = self._streaming(failover_reset=10)
        p.clock.advance(5)
        p.engine.response.reset()
        p.engine.response.data(ts(1))  # t=5, then silence
        p.clock.advance(10)  # t=15: check fails (10 s silent)
        self.assertIsNotNone(s.incident)
        p.clock.advance(5)
        for _ in range(10):  # t=20 .. 29
            p.engine.response.data(ts(1))
            p.clock.advance(1)
        self.assertEqual(p.clock.seconds(), 30.0)
        self.assertIsNone(s.incident)  # the period that began at t=20 ended it
        p.engine.response.reset()
        self.assertEqual(times, [0.0, 5.0, 30.0])  # immediate again

