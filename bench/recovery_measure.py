"""
Recovery figures, measured on loopback with the simulators (issue #10):

- a persistent engine fault: every playback resets at once / after 200 KB —
  engine sessions opened in a 5 s window (a storm is hundreds);
- the VPN comes back: seconds from the simulated orchestrator's VPN up to the
  player's first real TS (status lag 0.5 s, outage poll interval 1 s), and
  the POSTs made while it was down;
- reject mode, breaker opened between polls: how long the 503 takes.

Not a test (it asserts nothing and sleeps a measurement window); run it::

    .venv/bin/python -m pytest -p no:twisted -q -s bench/recovery_measure.py

To compare with an older commit, copy this file into that checkout's
``tests/integration/`` and run it there with the same command (older
simulators may lack ``status_lag``: it is then left out).
"""

from __future__ import annotations

from twisted.internet.defer import gatherResults
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests.integration.harness import TSPlayer, cid, reactor, sim_engine, start_proxy, wait_until
from tests.integration.test_outages import proxy_with, sim_orchestrator


def lag_option() -> dict:
    from acexy_tw.sim.orchestrator import SimOrchestrator

    return {"status_lag": 0.5} if hasattr(SimOrchestrator, "status_lag") else {}


class RecoveryFigures(TestCase):
    timeout = 120

    async def test_persistent_engine_fault(self) -> None:
        for reset in (0, 200_000):
            engine = sim_engine(self, bitrate=2_000_000)
            engine.behaviour.reset_after = reset
            proxy = await start_proxy(self, engine, failover_attempts="3", linger="0")
            players = await gatherResults([TSPlayer.open(self, proxy.stream_url(cid(700 + reset))) for _ in range(2)])
            t0 = reactor.seconds()
            await deferLater(reactor, 5.0, lambda: None)  # the measurement window
            print(
                f"\nFIGURE reset_after={reset}: {len(engine.sessions)} engine sessions in "
                f"{reactor.seconds() - t0:.1f}s; players ended: {[p.ended.called for p in players]}"
            )
            for p in players:
                p.hang_up()

    async def test_vpn_back_to_real_ts(self) -> None:
        orch = sim_orchestrator(self, **lag_option())
        proxy, _ = await proxy_with(self, orch, outage_poll_interval="1s")
        orch.set_vpn(connected=False)
        player = await TSPlayer.open(self, proxy.stream_url(cid(720)))
        polls = proxy.service.monitor.polls
        await wait_until(lambda: proxy.service.monitor.polls >= polls + 3, "three polls", seconds=30)
        posts = len(orch.provision_calls)
        t0 = reactor.seconds()
        orch.set_vpn(connected=True)
        await player.when_real(10, seconds=100)
        print(f"\nFIGURE VPN back -> real TS {reactor.seconds() - t0:.2f}s; POSTs while down: {posts}")

    async def test_reject_mode_breaker_between_polls(self) -> None:
        orch = sim_orchestrator(self)
        proxy, _ = await proxy_with(self, orch, wait_mode="reject")
        orch.open_breaker(eta=60)
        t0 = reactor.seconds()
        player = await TSPlayer.open(self, proxy.stream_url(cid(721)))
        await player.when_ended()
        print(f"\nFIGURE reject: {player.code} after {reactor.seconds() - t0:.3f}s; POSTs: {len(orch.provision_calls)}")
