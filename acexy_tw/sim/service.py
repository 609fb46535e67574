"""The simulated engine as a child service, for ``twistd -n acexy --demo``."""

from __future__ import annotations

from typing import Any, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred

from acexy_tw.sim.engine import SimEngine

#: what the demo engine streams: a small picture and silent audio at a TV-ish rate
DEMO_BITRATE = 4_000_000


class SimEngineService(Service):
    """Runs a :class:`SimEngine` on 127.0.0.1 (a free port) while the service runs."""

    def __init__(self, reactor: Any, *, bitrate: Optional[int] = DEMO_BITRATE) -> None:
        self.engine = SimEngine(reactor, bitrate=bitrate)

    @property
    def port_number(self) -> int:
        return self.engine.port

    def startService(self) -> None:
        super().startService()
        self.engine.listen(0, "127.0.0.1")  # synchronous: the port is known on return

    def stopService(self) -> Deferred:
        super().stopService()
        return self.engine.shutdown()
