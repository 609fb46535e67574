"""
The global backlog budget (ACEXY_MAX_BACKLOG): the bytes queued for all
players together, the players furthest behind cut first once the total passes
the cap. First the BacklogBudget alone, then through the whole proxy
(InMemoryProxy: real HTTP channels over StringTransport, MemoryReactorClock).
"""

from __future__ import annotations

from typing import Optional

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from acexy_tw.streaming.budget import BacklogBudget, malloc_trim
from acexy_tw.streaming.mpegts import PACKET_SIZE
from acexy_tw.testing import CID, CID2, InMemoryProxy, key, ts

CID3, CID4 = "c" * 40, "d" * 40


class Holder:
    """What a ClientSink does for the budget: count its backlog, release it when cut."""

    def __init__(self, budget: BacklogBudget, name: str) -> None:
        self.budget = budget
        self.name = name
        self.backlog_bytes = 0
        self.cut_reason: Optional[str] = None

    def __repr__(self) -> str:
        return f"<Holder {self.name} {self.backlog_bytes}>"

    def queue(self, n: int) -> None:
        self.backlog_bytes += n
        self.budget.add(self, n)

    def drain(self, n: int) -> None:
        self.backlog_bytes -= n
        self.budget.drained(self, n)

    def cut(self, reason: str) -> None:
        self.cut_reason = reason
        self.budget.release(self)
        self.backlog_bytes = 0


class BudgetTests(SynchronousTestCase):
    def test_under_the_cap_nobody_is_cut(self) -> None:
        b = BacklogBudget(100)
        a, c = Holder(b, "a"), Holder(b, "c")
        a.queue(60)
        c.queue(40)
        self.assertEqual((b.total, b.cuts, a.cut_reason, c.cut_reason), (100, 0, None, None))

    def test_past_the_cap_the_furthest_behind_is_cut_first(self) -> None:
        b = BacklogBudget(100)
        small, big, mid = Holder(b, "small"), Holder(b, "big"), Holder(b, "mid")
        small.queue(10)
        big.queue(50)
        mid.queue(30)
        small.queue(20)  # 110 > 100: "small" pushed it over, "big" is furthest behind
        self.assertIsNotNone(big.cut_reason)
        self.assertIn("global backlog over 100 bytes", big.cut_reason)
        self.assertEqual((small.cut_reason, mid.cut_reason), (None, None))
        self.assertEqual(b.total, 60)
        self.assertEqual(set(b.holders), {small, mid})
        self.assertEqual(b.cuts, 1)

    def test_as_many_are_cut_as_it_takes(self) -> None:
        b = BacklogBudget(100)
        hs = [Holder(b, str(i)) for i in range(5)]
        for i, h in enumerate(hs):
            h.queue(10 + i)  # 10, 11, 12, 13, 14 = 60
        late = Holder(b, "late")
        late.queue(70)  # 130: the late one is the furthest behind now
        self.assertIsNotNone(late.cut_reason)
        self.assertEqual([h.cut_reason for h in hs], [None] * 5)
        hs[0].queue(50)  # 110: hs[0] (60) is cut, 50 left
        self.assertIsNotNone(hs[0].cut_reason)
        self.assertEqual(b.total, 50)

    def test_the_total_never_passes_the_cap_by_more_than_one_piece(self) -> None:
        b = BacklogBudget(1000)
        hs = [Holder(b, str(i)) for i in range(7)]
        piece = 97
        for step in range(500):
            h = hs[(step * 3) % len(hs)]
            if step % 5 == 4 and h.backlog_bytes >= piece:
                h.drain(piece)
            else:
                h.queue(piece)
            self.assertLessEqual(b.total, b.cap)
            self.assertEqual(b.total, sum(x.backlog_bytes for x in hs))
        self.assertLessEqual(b.peak, b.cap + piece)
        self.assertGreater(b.cuts, 0)

    def test_drained_and_released_shares_come_back(self) -> None:
        b = BacklogBudget(100)
        a, c = Holder(b, "a"), Holder(b, "c")
        a.queue(40)
        c.queue(30)
        a.drain(40)
        self.assertEqual((b.total, list(b.holders)), (30, [c]))
        c.cut("gone")
        self.assertEqual((b.total, b.holders), (0, {}))
        c.cut("again")  # a second release is a no-op
        self.assertEqual(b.total, 0)

    def test_a_holder_that_does_not_release_is_not_cut_forever(self) -> None:
        b = BacklogBudget(10)

        class Stubborn(Holder):
            def cut(self, reason: str) -> None:
                self.cut_reason = reason  # releases nothing

        s = Stubborn(b, "s")
        s.queue(20)
        self.assertEqual((b.cuts, b.total, b.holders), (1, 0, {}))


class TrimTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.trims = 0

    def trim(self) -> None:
        self.trims += 1

    def budget(self, **kw) -> BacklogBudget:
        return BacklogBudget(1000, clock=self.clock, trim=self.trim, trim_after=100, trim_interval=1.0, **kw)

    def test_trim_once_the_last_backlog_is_gone(self) -> None:
        b = self.budget()
        hs = [Holder(b, str(i)) for i in range(4)]
        for h in hs:
            h.queue(60)
        for h in hs:
            h.cut("gone")  # the 2nd release passes 100 bytes freed, the last empties the budget
        self.assertEqual(self.trims, 1)  # at once; the second is held back by the interval ...
        self.clock.advance(1)
        self.assertEqual(self.trims, 2)  # ... and done when it ends: the load is gone
        self.assertEqual(b.trims, 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_player_that_keeps_up_costs_one_trim_per_interval(self) -> None:
        b = self.budget()
        h = Holder(b, "h")
        for _ in range(50):  # its backlog empties on every read
            h.queue(200)
            h.drain(200)
        self.assertEqual(self.trims, 1)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # one held-back trim, not one per read
        self.clock.advance(1)
        self.assertEqual(self.trims, 2)

    def test_stop_cancels_a_held_back_trim(self) -> None:
        b = self.budget()
        h = Holder(b, "h")
        for _ in range(2):
            h.queue(200)
            h.drain(200)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        b.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(5)
        self.assertEqual(self.trims, 1)
        for _ in range(2):  # a release after stop() arms nothing either
            h.queue(200)
            h.drain(200)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_small_releases_do_not_trim(self) -> None:
        b = self.budget()
        h = Holder(b, "h")
        for _ in range(5):
            h.queue(10)
            h.drain(10)
        self.assertEqual(self.trims, 0)

    def test_at_most_one_trim_per_interval_while_backlogs_remain(self) -> None:
        b = self.budget()
        keep, h = Holder(b, "keep"), Holder(b, "h")
        keep.queue(1)
        for _ in range(10):
            h.queue(200)
            h.drain(200)
        self.assertEqual(self.trims, 1)
        self.clock.advance(1)
        h.queue(200)
        h.drain(200)
        self.assertEqual(self.trims, 2)

    def test_no_clock_no_trim(self) -> None:
        b = BacklogBudget(1000, trim=self.trim, trim_after=1)
        h = Holder(b, "h")
        h.queue(10)
        h.cut("gone")
        self.assertEqual(self.trims, 0)

    def test_malloc_trim_is_feature_tested(self) -> None:
        self.assertIn(malloc_trim(), (True, False))  # True on glibc; never raises


def budget_of(p: InMemoryProxy) -> BacklogBudget:
    budget = p.web.budget
    assert budget is not None
    return budget


def sinks(p: InMemoryProxy, cid: str) -> list:
    return p.registry.get(key(cid)).sinks


def backlogs(p: InMemoryProxy, *cids: str) -> int:
    return sum(s.backlog_bytes for c in cids for s in sinks(p, c))


class ProxyBudgetTests(SynchronousTestCase):
    """ACEXY_MAX_BACKLOG through the composition root: one budget for every player."""

    CAP = 40 * PACKET_SIZE

    def proxy(self) -> InMemoryProxy:
        # each player may queue 300 packets; all together only 40
        return InMemoryProxy(buffer_size=300 * PACKET_SIZE, max_backlog=str(self.CAP))

    def players(self, p: InMemoryProxy, *cids: str) -> list:
        out = []
        for i, cid in enumerate(cids):
            out.append(p.connect(b"/ace/getstream?id=" + cid.encode()))
            p.engine.responses[i].data(ts(1))  # first bytes: headers sent, streaming
        return out

    def test_one_budget_for_every_player_from_the_config(self) -> None:
        p = self.proxy()
        a, b = self.players(p, CID, CID2)
        self.assertIs(sinks(p, CID)[0]._budget, sinks(p, CID2)[0]._budget)
        self.assertEqual(budget_of(p).cap, self.CAP)

    def test_the_default_cap_is_64_mib(self) -> None:
        self.assertEqual(budget_of(InMemoryProxy()).cap, 64 * 1024 * 1024)

    def test_cap_reached_cuts_the_furthest_behind_first_others_untouched(self) -> None:
        p = self.proxy()
        far, near, reader = self.players(p, CID, CID2, CID3)
        e_far, e_near, e_reader = p.engine.responses
        far.pause()
        near.pause()
        e_far.data(ts(25))
        e_near.data(ts(10))
        e_reader.data(ts(10))
        self.assertEqual(budget_of(p).total, 35 * PACKET_SIZE)
        self.assertFalse(far.aborted or near.aborted)
        e_near.data(ts(10))  # 45 packets > 40: "near" pushed it over, "far" is furthest behind
        self.assertTrue(far.aborted)
        self.assertFalse(near.aborted)
        self.assertEqual(p.metrics.clients_cut, 1)
        self.assertEqual(budget_of(p).total, 20 * PACKET_SIZE)
        self.assertEqual(sinks(p, CID), [])
        # the others go on: the stalled one keeps its backlog, the reader everything
        e_reader.data(ts(5, 0x22))
        self.assertEqual(reader.body(), ts(11) + ts(5, 0x22))
        near.resume()
        self.assertEqual(near.body(), ts(1) + ts(20))
        self.assertEqual(budget_of(p).total, 0)

    def test_totals_stay_within_the_cap_plus_one_piece(self) -> None:
        p = self.proxy()
        cids = (CID, CID2, CID3, CID4)
        clients = self.players(p, *cids)
        for c in clients:
            c.pause()
        budget = budget_of(p)
        for step in range(300):
            i = (step * 7) % 4
            if clients[i].aborted:  # a cut player reconnects, and stalls again
                clients[i].disconnect()
                clients[i] = p.connect(b"/ace/getstream?id=" + cids[i].encode())
                p.registry.get(key(cids[i])).upstream_piece(ts(1))
                clients[i].pause()
            p.registry.get(key(cids[i])).upstream_piece(ts(1 + step % 5))  # pieces of 1-5 packets
            if step % 11 == 10:  # someone takes a little
                clients[(i + 1) % 4].resume()
                clients[(i + 1) % 4].pause()
            self.assertLessEqual(budget.total, budget.cap)
            self.assertEqual(budget.total, backlogs(p, *cids))
        self.assertGreater(budget.peak, budget.cap)  # it was passed, by one piece at most
        self.assertLessEqual(budget.peak, budget.cap + 5 * PACKET_SIZE)
        self.assertGreater(budget.cuts, 3)
        self.assertEqual(p.metrics.clients_cut, budget.cuts)

    def test_a_cut_or_drained_player_releases_its_share(self) -> None:
        p = self.proxy()
        a, b = self.players(p, CID, CID2)
        a.pause()
        b.pause()
        p.engine.responses[0].data(ts(8))
        p.engine.responses[1].data(ts(4))
        self.assertEqual(budget_of(p).total, 12 * PACKET_SIZE)
        a.resume()  # drained
        self.assertEqual(budget_of(p).total, 4 * PACKET_SIZE)
        self.assertEqual(list(budget_of(p).holders), sinks(p, CID2))
        sinks(p, CID2)[0].cut("test")  # cut
        self.assertEqual((budget_of(p).total, budget_of(p).holders), (0, {}))

    def test_counters_back_to_zero_when_all_leave(self) -> None:
        p = self.proxy()
        clients = self.players(p, CID, CID2, CID3)
        for c, r in zip(clients, p.engine.responses):
            c.pause()
            r.data(ts(6))
        self.assertEqual(budget_of(p).total, 18 * PACKET_SIZE)
        clients[0].disconnect()  # gone
        p.engine.responses[1].eof()  # clean end: its backlog is flushed to the transport
        self.assertTrue(clients[1].finished_cleanly())
        p.engine.responses[2].reset()  # engine broke: aborted
        self.assertEqual((budget_of(p).total, budget_of(p).holders), (0, {}))
        self.assertLessEqual(budget_of(p).peak, 18 * PACKET_SIZE)
