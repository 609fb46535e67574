"""What the simulators' command lines share (``python -m acexy_tw.sim.engine`` / ``.orchestrator``)."""

from __future__ import annotations

import sys
from typing import Any, Callable


def run(start: Callable[[Any], Callable[[], Any]]) -> None:
    """Log to stderr, ``start(reactor)`` (it returns the shutdown to run
    before the reactor stops), and run the global reactor until interrupted."""
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    shutdown = start(reactor)
    reactor.addSystemEventTrigger("before", "shutdown", shutdown)
    reactor.run()
