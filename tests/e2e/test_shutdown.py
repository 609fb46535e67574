"""
SIGTERM with live streams: the real ``twistd -n acexy`` process, its engines and
orchestrator simulated in this test process — so the test sees, from the
engines' and orchestrator's side, every stop command and every
``stream_ended(shutdown)``, and the process gone within 5 s.
"""

from __future__ import annotations

import signal

import pytest_twisted
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent, HTTPConnectionPool
from treq.client import HTTPClient

from acexy_tw.sim.engine import SimEngine
from acexy_tw.sim.orchestrator import SimOrchestrator
from tests.e2e.test_twistd import TIMEOUT, clean_env, spawn, stop

KEY = "shutdown-test-key-0001"


class Counting(Protocol):
    def __init__(self) -> None:
        from twisted.internet.defer import Deferred

        self.received = 0
        self.first = Deferred()
        self.lost = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if not self.first.called:
            self.first.callback(None)

    def connectionLost(self, reason=None) -> None:
        self.lost.callback(None)


@pytest_twisted.ensureDeferred
async def test_sigterm_stops_every_engine_session_and_reports_shutdown(reactor):
    orch = SimOrchestrator(reactor, api_key=KEY)
    orch.listen(0, "127.0.0.1")
    engines = [orch.add_engine() for _ in range(2)]
    fallback = SimEngine(reactor, bitrate=2_000_000)
    fallback.listen(0, "127.0.0.1")
    pool = HTTPConnectionPool(reactor, persistent=False)
    proc = spawn(
        reactor,
        "--listen", "tcp:0:interface=127.0.0.1",
        "--engine-host", "127.0.0.1",
        "--engine-port", str(fallback.port),
        "--linger", "60s",  # sessions stay open: only the shutdown can end them
        env=clean_env(ACEXY_ORCH_URL=orch.url, ACEXY_ORCH_APIKEY=KEY),
    )
    try:
        port = await proc.port.addTimeout(TIMEOUT, reactor)
        client = HTTPClient(Agent(reactor, pool=pool))
        players = []
        for n in (1, 2):
            response = await client.get(
                f"http://127.0.0.1:{port}/ace/getstream?id={n:040x}", unbuffered=True
            ).addTimeout(TIMEOUT, reactor)
            assert response.code == 200
            player = Counting()
            response.deliverBody(player)
            await player.first.addTimeout(TIMEOUT, reactor)
            players.append(player)
        await orch.when(lambda o: len(o.events_started) == 2).addTimeout(TIMEOUT, reactor)
        log = await stop(reactor, proc, within=5)  # the process is gone within 5 s of SIGTERM
        # seen from the other side: each engine session stopped, each reported ended(shutdown)
        assert sum(h.engine.stop_count for h in engines) == 2
        assert all(h.engine.open_playbacks == 0 for h in engines)
        reasons = sorted(e["reason"] for e in orch.events_ended)
        assert reasons == ["shutdown", "shutdown"], orch.events_ended
        assert {e["stream_id"] for e in orch.events_ended} == {
            e["labels"]["stream_id"] for e in orch.events_started
        }
        for player in players:  # the players' connections were closed
            await player.lost.addTimeout(TIMEOUT, reactor)
        assert "Traceback" not in log
        assert KEY not in log
    finally:
        if proc.status is None and proc.signal is None:
            proc.transport.signalProcess(signal.SIGKILL)
        await pool.closeCachedConnections()
        await orch.shutdown()
        await fallback.shutdown()
