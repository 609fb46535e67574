"""
The engine session's lifecycle: one explicit state machine (Automat).

Every legal transition (:data:`TRANSITIONS`)::

    starting    ── opened ────────> streaming
    starting    ── told_to_wait ──> waiting
    waiting     ── told_to_wait ──> waiting      a retry told to wait again
    waiting     ── opened ────────> streaming
    streaming   ── engine_failed ─> recovering   live, players attached, attempts left
    streaming   ── emptied ───────> lingering
    recovering  ── opened ────────> streaming
    recovering  ── told_to_wait ──> waiting
    lingering   ── joined ────────> streaming
    any but closed ── close ──────> closed

What players get follows from the state alone:

=============  ==================================================  ===========
state          players                                             engine
=============  ==================================================  ===========
starting       nothing yet (a refusal is still a real HTTP error)  placing
waiting        null-packet keepalive (their 200 is committed)      none; held
streaming      real TS                                             reading
recovering     null-packet keepalive                               failing over
lingering      none attached                                       reading
closed         a clean end (or an abort if the engine broke)       stopped
=============  ==================================================  ===========

Inputs not listed for a state are illegal: Automat raises
:class:`automat.NoTransition`, so e.g. a closed session can never stream again
and a lingering session is never "recovering" (nobody to keep alive).
"""

from __future__ import annotations

from typing import Callable, Protocol

from automat import NoTransition, TypeMachineBuilder

__all__ = [
    "STARTING",
    "WAITING",
    "STREAMING",
    "RECOVERING",
    "LINGERING",
    "CLOSED",
    "KEEPALIVE_STATES",
    "Lifecycle",
    "LifecycleInputs",
    "NoTransition",
    "TRANSITIONS",
]

STARTING, WAITING, STREAMING, RECOVERING, LINGERING, CLOSED = (
    "starting",
    "waiting",
    "streaming",
    "recovering",
    "lingering",
    "closed",
)
#: states in which attached players get null packets
KEEPALIVE_STATES = frozenset({WAITING, RECOVERING})


class LifecycleInputs(Protocol):
    """What can happen to a session (the machine's inputs)."""

    def opened(self) -> None:
        "The engine's playback answered: real data follows."

    def told_to_wait(self) -> None:
        "Placement answered a wait-class refusal (VPN down, breaker, capacity)."

    def engine_failed(self) -> None:
        "The engine stopped delivering (EOF, reset, stall) while players watch a live stream."

    def emptied(self) -> None:
        "The last player left (or a pre-warmed session streams for nobody yet)."

    def joined(self) -> None:
        "A player arrived at a lingering session."

    def close(self) -> None:
        "The session ends, whatever it was doing."


#: (from, input, to): every legal transition, and only those
TRANSITIONS: tuple[tuple[str, str, str], ...] = (
    (STARTING, "opened", STREAMING),
    (STARTING, "told_to_wait", WAITING),
    (WAITING, "told_to_wait", WAITING),
    (WAITING, "opened", STREAMING),
    (STREAMING, "engine_failed", RECOVERING),
    (STREAMING, "emptied", LINGERING),
    (RECOVERING, "opened", STREAMING),
    (RECOVERING, "told_to_wait", WAITING),
    (LINGERING, "joined", STREAMING),
    *((state, "close", CLOSED) for state in (STARTING, WAITING, STREAMING, RECOVERING, LINGERING)),
)


class _Core:
    def __init__(self, on_enter: Callable[[str, str], None]) -> None:
        self.on_enter = on_enter


def _build() -> Callable[[_Core], LifecycleInputs]:
    builder = TypeMachineBuilder(LifecycleInputs, _Core)
    states = {name: builder.state(name) for name in (STARTING, WAITING, STREAMING, RECOVERING, LINGERING, CLOSED)}

    def entering(old: str, new: str) -> Callable[..., None]:
        def transition(inputs: LifecycleInputs, core: _Core) -> None:
            core.on_enter(old, new)

        transition.__name__ = f"{old}_to_{new}"
        return transition

    for old, name, new in TRANSITIONS:
        states[old].upon(getattr(LifecycleInputs, name)).to(states[new])(entering(old, new))
    return builder.build()


_MACHINE = _build()


class Lifecycle:
    """
    One session's machine. ``on_enter(old, new)`` runs on every transition
    (also a state to itself), after :attr:`state` names the new state; the
    session starts and stops its timers and keepalive there.
    """

    def __init__(self, on_enter: Callable[[str, str], None]) -> None:
        self.state = STARTING
        self._on_enter = on_enter
        self._inputs = _MACHINE(_Core(self._entered))

    def _entered(self, old: str, new: str) -> None:
        self.state = new
        self._on_enter(old, new)

    @property
    def inputs(self) -> LifecycleInputs:
        return self._inputs

    @property
    def keepalive(self) -> bool:
        return self.state in KEEPALIVE_STATES
