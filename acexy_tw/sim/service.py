"""The simulators as a child service, for ``twistd -n acexy --demo``."""

from __future__ import annotations

import secrets
from typing import Any, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList

from acexy_tw.sim.engine import SimEngine
from acexy_tw.sim.tsgen import DEFAULT_GOP

#: what the demo engines stream: a small picture and silent audio at a TV-ish rate
DEMO_BITRATE = 4_000_000


class SimEngineService(Service):
    """
    Runs on 127.0.0.1 (free ports) while the service runs:

    - a :class:`SimEngine`, the proxy's configured (fallback) engine;
    - unless the user configured a real orchestrator, a simulated
      acestream-orchestrator with one warm engine, provisioning more on demand
      (after a short, realistic start-up) — so the demo shows the whole system.
    """

    def __init__(
        self,
        reactor: Any,
        *,
        bitrate: Optional[int] = DEMO_BITRATE,
        orchestrator: bool = False,
        gop: Optional[float] = DEFAULT_GOP,
    ) -> None:
        # keyframes every ``gop`` seconds: a player joining a running stream
        # shows what fast start saves it
        self.engine = SimEngine(reactor, bitrate=bitrate, gop=gop)
        self.orchestrator: Any = None
        #: a fresh key per run, so the demo exercises the authenticated calls
        self.api_key = secrets.token_hex(16)
        if orchestrator:
            from acexy_tw.sim.orchestrator import SimOrchestrator

            self.orchestrator = SimOrchestrator(
                reactor,
                api_key=self.api_key,
                engine_bitrate=bitrate,
                provision_delay=0.5,
                engine_ready_delay=1.0,
            )

    @property
    def port_number(self) -> int:
        return self.engine.port

    def listen(self, config: Any) -> Any:
        """Listen now (127.0.0.1, free ports; synchronous) and return ``config``
        pointing at the simulators, so the proxy is built for them."""
        from dataclasses import replace

        self.engine.listen(0, "127.0.0.1")
        config = replace(config, engine_host="127.0.0.1", engine_port=self.engine.port, engine_scheme="http")
        if self.orchestrator is not None:
            self.orchestrator.listen(0, "127.0.0.1")
            self.orchestrator.add_engine()
            config = replace(config, orch_url=self.orchestrator.url, orch_apikey=self.api_key)
        return config

    def stopService(self) -> Deferred:
        super().stopService()
        stops = [self.engine.shutdown()]
        if self.orchestrator is not None:
            stops.append(self.orchestrator.shutdown())
        return DeferredList(stops, consumeErrors=True).addCallback(lambda _: None)
