"""
ACEXY_MAX_BACKLOG over real sockets: stalled raw-TCP players on several
contents, a small global budget. The proxy's total backlog stays within it
(one engine read over at most), the players furthest behind are cut, and a
reading player keeps streaming.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from acexy_tw.build import ENGINE_READ_SIZE
from tests.integration.harness import Player, StalledPlayer, cid, sim_engine, start_proxy, wait_until

KiB = 1024
CAP = 768 * KiB


class BacklogBudgetTests(TestCase):
    async def test_stalled_players_on_several_contents_share_one_budget(self) -> None:
        engine = sim_engine(self, bitrate=20_000_000)
        # alone, each stalled player may queue 1 MiB (and holds its engine back
        # from 256 KiB on); together only 768 KiB. Players only: the sessions'
        # fast-start caches, the budget's other holders, are off here
        # (tests/unit/test_joiner.py has them in the budget).
        proxy = await start_proxy(
            self, engine, buffer_size="1MiB", max_backlog=f"{CAP}", linger="0", fast_start="0"
        )
        budget = proxy.service.web.budget
        sessions = proxy.registry

        def sinks() -> list:
            return [s for session in sessions for s in session.sinks]

        # Every cut for the budget: was the victim the furthest behind at that moment?
        # (logged inside cut(), before its backlog is released)
        verdicts: list[tuple[int, int]] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_namespace") != "acexy_tw.streaming.sink" or "peer" not in event:
                return
            if not str(event.get("reason", "")).startswith("global backlog"):
                return
            everyone = sinks()
            victim = [s for s in everyone if s.peer == event["peer"]]
            verdicts.append((victim[0].backlog_bytes if victim else -1, max(s.backlog_bytes for s in everyone)))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

        highest = [0]

        def sampled(predicate: Any) -> Any:
            def check() -> bool:
                highest[0] = max(highest[0], budget.total)
                return predicate()

            return check

        # content 0: a reader and a stalled player (the engine is not held back
        # for it, so it falls further and further behind); contents 1-3: one
        # stalled player each (each holds its own engine back)
        reader = await Player.open(self, proxy.stream_url(cid(0)))
        stalled = [await StalledPlayer.open(self, proxy.port, f"/ace/getstream?id={cid(n)}") for n in range(4)]
        self.assertEqual(reader.code, 200)
        await wait_until(sampled(lambda: budget.cuts >= 1), "a cut for the global budget", seconds=30)
        await wait_until(sampled(lambda: len(sinks()) == 5 - budget.cuts), "the cut players to leave")
        have = len(reader.received)
        await reader.when_received(have + 2 * 1024 * KiB)  # the reader keeps streaming
        await wait_until(sampled(lambda: True), "one more sample")

        self.assertLessEqual(highest[0], CAP)
        self.assertLessEqual(budget.peak, CAP + ENGINE_READ_SIZE)  # passed by one piece at most
        self.assertEqual(len(verdicts), budget.cuts)
        for victim, furthest in verdicts:
            self.assertEqual(victim, furthest)  # the furthest behind went first
        self.assertEqual(budget.total, sum(s.backlog_bytes for s in sinks()))

        for player in stalled:
            await player.hang_up()
        await reader.hang_up()
        await wait_until(lambda: not sinks(), "every player to leave")
        self.assertEqual((budget.total, budget.holders), (0, {}))
