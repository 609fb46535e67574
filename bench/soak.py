#!/usr/bin/env python3
"""
Soak (endurance) test for acexy-tw: churning players and a misbehaving engine.

    .venv/bin/python bench/soak.py              # 30 minutes of churn (--minutes)
    .venv/bin/python bench/soak.py --quick      # 2 minutes of churn, ~3 minutes in all

This driver is one Twisted program. It runs the simulated engine in-process
(:class:`acexy_tw.sim.engine.SimEngine`, so it can change ``engine.behaviour``
over time and read the engine's own records at the end), the proxy as a
``twistd -n --pidfile= acexy`` subprocess, and the players in-process as
Twisted protocols on real sockets:

- every second players join (``--players`` on average, mean stay
  ``--stay`` s) across ``--contents`` contents (a few popular, a long tail);
- kinds: *viewers* watch and leave cleanly; *zappers* switch content every
  few seconds (sometimes back to the previous one, within the linger);
  *probers* send ``HEAD`` then ``GET``; *slow* players read at 30–90 % of the
  bitrate with a small receive buffer; *frozen* players stop reading after a
  moment (the proxy must cut them); *vanishing* players reset their
  connection (RST) at a random moment;
- every ``--fault-every`` seconds a fault is injected for ``--fault-length``
  seconds through ``engine.behaviour`` (new playbacks stall, reset or end
  after a few hundred KB; getstream answers slowly or with HTTP 500;
  playback headers come late) or at once (live playback connections reset).

The proxy's RSS, VmHWM and open descriptors are sampled every 5 s. At the end
the players leave, the engine behaves again, ``ACEXY_LINGER`` passes, and the
driver checks (PASS/FAIL each, exit status 1 on any FAIL):

1. RSS flat after warm-up: the last sample under churn within 10 % of the
   first sample after the warm-up;
2. the proxy's open file descriptors back to the idle count (measured before
   the first player; the proxy's engine connection pool may keep idle
   keep-alive connections for up to 60 s, so this waits up to 65 s);
3. no engine session open without a player (``engine.active_sessions`` empty,
   ``engine.open_playbacks == 0``);
4. no stop command missing (every session the engine created got one);
5. no error in the proxy log (``Traceback``, ``Unhandled``, ``CRITICAL``,
   ``#critical``, ``#error``): the injected faults only ever cause warnings.

The proxy log is kept as ``bench/results/soak-<timestamp>-proxy.log`` and
the full figures as ``bench/results/soak-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import secrets
import signal
import socket
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from twisted.internet import defer, task  # noqa: E402
from twisted.internet.error import ConnectionDone  # noqa: E402
from twisted.internet.protocol import ClientFactory, Protocol  # noqa: E402
from twisted.python.failure import Failure  # noqa: E402

from acexy_tw.sim.engine import Behaviour, SimEngine, parse_bitrate  # noqa: E402
from common import (  # noqa: E402
    RESULTS,
    Children,
    describe_fds,
    fd_count,
    machine,
    machine_line,
    metric_values,
    proc_status,
    source_line,
    source_state,
    timestamp,
)

ERROR_PATTERNS = ("Traceback", "Unhandled", "CRITICAL", "#critical", "#error")
SAMPLE_EVERY = 5.0
POOL_IDLE_TIMEOUT = 60.0  # acexy_tw.build.make_pool: cachedConnectionTimeout
KINDS = {  # kind: share of arrivals
    "viewer": 0.40,
    "zapper": 0.15,
    "prober": 0.08,
    "slow": 0.12,
    "frozen": 0.07,
    "vanisher": 0.18,
}


# ---------------------------------------------------------------------------
# async HTTP to the proxy (no connection kept: it would count as a descriptor)
# ---------------------------------------------------------------------------


class _OneShot(Protocol):
    def __init__(self, path: str, port: int, done: defer.Deferred) -> None:
        self.path, self.port, self.done, self.data = path, port, done, b""

    def connectionMade(self) -> None:
        self.transport.write(
            f"GET {self.path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nConnection: close\r\n\r\n".encode()
        )

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.done.called:  # timed out already
            return
        head, _, body = self.data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        try:
            status = int(lines[0].split()[1])
        except (IndexError, ValueError):
            self.done.errback(RuntimeError(f"bad answer to {self.path}: {self.data[:100]!r}"))
            return
        if any(line.lower().startswith("transfer-encoding:") and "chunked" in line.lower() for line in lines):
            out, pos = b"", 0
            while True:
                end = body.find(b"\r\n", pos)
                if end < 0:
                    break
                size = int(body[pos:end].split(b";")[0] or b"0", 16)
                if size == 0:
                    break
                out += body[end + 2 : end + 2 + size]
                pos = end + 2 + size + 2
            body = out
        self.done.callback((status, body))


def http_get_async(reactor: Any, port: int, path: str, timeout: float = 10.0) -> defer.Deferred:
    done: defer.Deferred = defer.Deferred()

    class F(ClientFactory):
        def buildProtocol(self, addr):
            return _OneShot(path, port, done)

        def clientConnectionFailed(self, connector, reason):
            if not done.called:
                done.errback(reason)

    reactor.connectTCP("127.0.0.1", port, F(), timeout=timeout)
    return done.addTimeout(timeout, reactor)


# ---------------------------------------------------------------------------
# players
# ---------------------------------------------------------------------------


class Player(Protocol):
    """One player connection. ``kind`` decides how it reads and how it leaves."""

    def __init__(self, soak: "Soak", kind: str, content: int, method: str = "GET") -> None:
        self.soak = soak
        self.kind = kind
        self.content = content
        self.method = method
        self.status: Optional[int] = None
        self.bytes = 0
        self.head = b""
        self.leaving = False
        self.connected_at: Optional[float] = None
        self.first_byte_at: Optional[float] = None
        self.paused = False
        self.rate: Optional[float] = None  # bytes/s for slow players
        self._window_start = 0.0
        self._window_bytes = 0
        self._calls: List[Any] = []

    # -- protocol ---------------------------------------------------------------

    def connectionMade(self) -> None:
        r = self.soak.reactor
        self.connected_at = r.seconds()
        self.soak.live.add(self)
        cid = self.soak.ids[self.content]
        self.transport.write(
            f"{self.method} /ace/getstream?id={cid} HTTP/1.1\r\nHost: 127.0.0.1:{self.soak.proxy_port}\r\n"
            "User-Agent: acexy-soak/1\r\n\r\n".encode()
        )
        if self.kind in ("slow", "frozen"):
            try:  # a small receive buffer: backpressure reaches the proxy quickly
                self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
            except OSError:
                pass

    def dataReceived(self, data: bytes) -> None:
        now = self.soak.reactor.seconds()
        if self.status is None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            line = self.head[: self.head.find(b"\r\n")].decode("latin-1")
            try:
                self.status = int(line.split()[1])
            except (IndexError, ValueError):
                self.status = -1
            self.soak.stats["status " + str(self.status)] += 1
            body = len(self.head) - end - 4
            self.head = b""
            if self.method == "HEAD" or self.status != 200:
                self.leave()  # a probe, or an error answer: done with this connection
                if self.method == "HEAD":
                    self.soak.spawn(self.kind, self.content, method="GET")  # probe-then-play
                return
            self.start_behaviour()
            data_len = body
        else:
            data_len = len(data)
        if data_len and self.first_byte_at is None:
            self.first_byte_at = now
        self.bytes += data_len
        self.soak.bytes_in += data_len
        if self.rate is not None and not self.paused:
            self._window_bytes += data_len
            elapsed = now - self._window_start
            if self._window_bytes >= self.rate * max(elapsed, 0.25):
                # ahead of our reading rate: stop reading until we are due again
                self.paused = True
                self.transport.pauseProducing()
                due = self._window_bytes / self.rate - elapsed
                self.later(max(0.05, due), self.resume)

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.leaving:
            self.paused = False
            self.transport.resumeProducing()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        for call in self._calls:
            if call.active():
                call.cancel()
        self.soak.live.discard(self)
        if self.leaving:
            return
        # the proxy ended it: a clean end (engine EOF, failover given up) or
        # an abort (a cut slow/frozen player, an engine reset)
        how = "clean" if reason is not None and reason.check(ConnectionDone) else "reset"
        self.soak.stats[f"ended by proxy ({how}) {self.kind}"] += 1

    # -- behaviour ----------------------------------------------------------------

    def later(self, delay: float, fn, *args) -> None:
        self._calls.append(self.soak.reactor.callLater(delay, fn, *args))

    def start_behaviour(self) -> None:
        rnd = self.soak.rnd
        stay = min(rnd.expovariate(1 / self.soak.args.stay), 4 * self.soak.args.stay) + 1
        if self.kind == "viewer" or self.kind == "prober":
            self.later(stay, self.leave)
        elif self.kind == "zapper":
            self.later(rnd.uniform(1.5, 6.0), self.zap)
        elif self.kind == "slow":
            self.rate = self.soak.bytes_per_s * rnd.uniform(0.3, 0.9)
            self._window_start = self.soak.reactor.seconds()
            self.later(stay * 1.5, self.leave)
        elif self.kind == "frozen":
            self.later(rnd.uniform(0.5, 3.0), self.freeze)
            self.later(stay * 2, self.leave)  # if the proxy has not cut it by then
        elif self.kind == "vanisher":
            self.later(rnd.uniform(0.2, stay), self.vanish)

    def freeze(self) -> None:
        if self.transport is not None and not self.leaving:
            self.paused = True
            self.transport.pauseProducing()

    def zap(self) -> None:
        if self.leaving:
            return
        zaps = getattr(self, "zaps_left", self.soak.rnd.randint(2, 6))
        self.leave()
        if zaps > 0 and not self.soak.stopping:
            back = self.soak.rnd.random() < 0.3 and getattr(self, "previous", None) is not None
            target = self.previous if back else self.soak.pick_content()
            p = self.soak.spawn("zapper", target)
            if p is not None:
                p.zaps_left = zaps - 1
                p.previous = self.content
            self.soak.stats["zaps back" if back else "zaps"] += 1

    def leave(self) -> None:
        if not self.leaving and self.transport is not None:
            self.leaving = True
            if self.paused and self._reset_seen():
                # reading paused, so Twisted never saw the proxy's RST: it cut us
                self.soak.stats[f"ended by proxy (reset) {self.kind}"] += 1
            else:
                self.soak.stats[f"left {self.kind}"] += 1
            self.transport.loseConnection()

    def _reset_seen(self) -> bool:
        try:
            err = self.transport.getHandle().getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError:
            return True
        return err != 0

    def vanish(self) -> None:
        if not self.leaving and self.transport is not None:
            self.leaving = True
            self.soak.stats["vanished (RST)"] += 1
            self.transport.abortConnection()


class PlayerFactory(ClientFactory):
    def __init__(self, player: Player) -> None:
        self.player = player

    def buildProtocol(self, addr):
        return self.player

    def clientConnectionFailed(self, connector, reason):
        self.player.soak.stats["connect failed"] += 1


# ---------------------------------------------------------------------------
# the soak
# ---------------------------------------------------------------------------


class Soak:
    def __init__(self, reactor: Any, args: argparse.Namespace) -> None:
        self.reactor = reactor
        self.args = args
        self.rnd = random.Random(args.seed)
        self.ids = [secrets.token_hex(20) for _ in range(args.contents)]
        weights = [1 / (i + 1) for i in range(args.contents)]  # a few popular, a long tail
        total = sum(weights)
        self.weights = [w / total for w in weights]
        self.bitrate = parse_bitrate(args.bitrate)
        self.bytes_per_s = self.bitrate / 8
        self.children = Children()
        self.engine = SimEngine(reactor, bitrate=self.bitrate)
        self.live: set = set()
        self.stats: Counter = Counter()
        self.faults: Counter = Counter()
        self.fault_log: List[Dict[str, Any]] = []
        self.samples: List[Dict[str, Any]] = []
        self.bytes_in = 0
        self.stopping = False
        self.proxy: Any = None
        self.proxy_port = 0
        self.t0 = 0.0

    # -- parts ---------------------------------------------------------------------

    def pick_content(self) -> int:
        return self.rnd.choices(range(len(self.ids)), self.weights)[0]

    def spawn(self, kind: str, content: int, method: str = "GET") -> Optional[Player]:
        if self.stopping:
            return None
        player = Player(self, kind, content, method)
        self.stats[f"joined {kind}" + (" (HEAD)" if method == "HEAD" else "")] += 1
        self.reactor.connectTCP("127.0.0.1", self.proxy_port, PlayerFactory(player), timeout=10)
        return player

    def arrivals(self) -> None:
        """Every second: new players, on average players/stay per second."""
        rate = self.args.players / self.args.stay
        n = 0
        # Poisson by inversion (small rates)
        limit, p = pow(2.718281828, -rate), self.rnd.random()
        while p > limit:
            n += 1
            p *= self.rnd.random()
        kinds, shares = zip(*KINDS.items())
        for _ in range(n):
            kind = self.rnd.choices(kinds, shares)[0]
            self.spawn(kind, self.pick_content(), method="HEAD" if kind == "prober" else "GET")

    def initial_population(self) -> None:
        """Start near the target population (spread over 5 s) instead of
        waiting ~3 mean stays for the arrivals to build it up."""
        kinds, shares = zip(*KINDS.items())
        for i in range(self.args.players):
            kind = self.rnd.choices(kinds, shares)[0]
            self.reactor.callLater(
                5.0 * i / self.args.players, self.spawn, kind, self.pick_content(), "HEAD" if kind == "prober" else "GET"
            )

    FAULTS = ("stall", "reset", "eof", "slow-getstream", "getstream-500", "late-headers", "live-reset")

    def inject(self) -> None:
        """Start one fault episode (knobs for ``--fault-length`` s, or a one-off)."""
        kind = self.FAULTS[self.faults.total() % len(self.FAULTS)] if self.args.fault_order == "cycle" else self.rnd.choice(self.FAULTS)
        b = self.engine.behaviour
        budget = self.rnd.randint(100_000, 800_000)
        detail: Any = None
        if kind == "stall":
            b.stall_after = detail = budget
        elif kind == "reset":
            b.reset_after = detail = budget
        elif kind == "eof":
            b.eof_after = detail = budget
        elif kind == "slow-getstream":
            b.json_delay = detail = round(self.rnd.uniform(0.5, 3.0), 2)
        elif kind == "getstream-500":
            b.getstream_status = detail = 500
        elif kind == "late-headers":
            b.playback_delay = detail = round(self.rnd.uniform(0.5, 3.0), 2)
        elif kind == "live-reset":
            open_streams = [p for p in self.engine.playbacks if p.is_open and not p.waiting]
            victims = self.rnd.sample(open_streams, min(len(open_streams), self.rnd.randint(1, 3)))
            for p in victims:
                p.abort()
            detail = len(victims)
        self.faults[kind] += 1
        self.fault_log.append({"t": round(self.reactor.seconds() - self.t0, 1), "fault": kind, "detail": detail})
        if kind != "live-reset":
            self.reactor.callLater(self.args.fault_length, self.heal)

    def heal(self) -> None:
        self.engine.behaviour = Behaviour()

    def proc(self) -> Dict[str, Any]:
        st = proc_status(self.proxy.pid)
        return {"rss_kib": st["VmRSS"], "hwm_kib": st["VmHWM"], "fds": fd_count(self.proxy.pid)}

    async def status(self) -> Dict[str, Any]:
        code, body = await http_get_async(self.reactor, self.proxy_port, "/ace/status")
        if code != 200:
            raise RuntimeError(f"/ace/status: HTTP {code}")
        return json.loads(body)

    async def sample(self, phase: str) -> None:
        row: Dict[str, Any] = {"t": round(self.reactor.seconds() - self.t0, 1), "phase": phase, **self.proc()}
        try:
            st = await self.status()
            listed = [c for sess in st.get("sessions", []) for c in sess.get("client_list", [])]
            row.update(
                streams=st["streams"],
                clients=st["clients"],
                clients_cut=st.get("clients_cut"),
                backlog_kib=round(sum(c.get("backlog", 0) for c in listed) / 1024, 1),
                paused_clients=sum(1 for c in listed if c.get("paused")),
            )
        except Exception as exc:  # noqa: BLE001 - a sample, not the run
            row["status_error"] = str(exc)
        row.update(
            players=len(self.live),
            engine_active=len(self.engine.active_sessions),
            engine_open_playbacks=self.engine.open_playbacks,
            engine_sessions=len(self.engine.sessions),
        )
        self.samples.append(row)
        if self.args.verbose:
            print(json.dumps(row), flush=True)

    def sleep(self, seconds: float) -> defer.Deferred:
        return task.deferLater(self.reactor, max(0.0, seconds), lambda: None)

    # -- the run -------------------------------------------------------------------

    async def run(self) -> int:
        args = self.args
        r = self.reactor
        self.engine.listen(0, "127.0.0.1")
        extra = ["--linger", args.linger, "--empty-timeout", args.empty_timeout, "--buffer-size", args.buffer_size, *args.proxy_arg]
        self.proxy, self.proxy_port = self.children.start_proxy("proxy", self.engine.port, extra)  # blocks ~0.5 s
        names = {self.engine.port: "engine", self.proxy_port: "players/driver"}
        self.t0 = r.seconds()
        # idle baseline: after one served request, before any player
        await http_get_async(r, self.proxy_port, "/healthz")
        await self.sleep(1.0)
        idle = {**self.proc(), "fd_kinds": describe_fds(self.proxy.pid, names)}
        print(f"proxy pid {self.proxy.pid} on :{self.proxy_port}, engine :{self.engine.port}; idle RSS "
              f"{idle['rss_kib'] / 1024:.1f} MiB, {idle['fds']} fds; churn for {args.minutes:g} min…", flush=True)  # fmt: skip

        churn = args.minutes * 60
        warmup = args.warmup if args.warmup is not None else max(45.0, 0.15 * churn)
        start = r.seconds()
        self.initial_population()
        loops = [task.LoopingCall(self.arrivals), task.LoopingCall(self.inject)]
        loops[0].start(1.0, now=True)
        first_fault = r.callLater(min(10.0, args.fault_every), loops[1].start, args.fault_every, True)
        warm_sample: Optional[Dict[str, Any]] = None
        next_report = start + 60
        while r.seconds() - start < churn:
            await self.sleep(min(SAMPLE_EVERY, churn - (r.seconds() - start)))
            await self.sample("churn")
            if warm_sample is None and r.seconds() - start >= warmup:
                warm_sample = self.samples[-1]
            if r.seconds() >= next_report:
                s = self.samples[-1]
                print(f"  t={s['t']:.0f}s players={s['players']} streams={s.get('streams')} RSS={s['rss_kib'] / 1024:.1f} MiB "
                      f"fds={s['fds']} engine sessions={s['engine_sessions']} faults={sum(self.faults.values())}", flush=True)  # fmt: skip
                next_report += 60
        last_churn = self.samples[-1]
        if first_fault.active():
            first_fault.cancel()
        for loop in loops:
            if loop.running:
                loop.stop()

        # the end: players leave, the engine behaves, ACEXY_LINGER passes
        self.stopping = True
        self.heal()
        for p in list(self.live):
            p.leave()
        t_end = r.seconds()
        linger = _seconds(args.linger)
        await self.sleep(linger + 1.0)
        settle_limit = _seconds(args.empty_timeout) + linger + 20.0
        while r.seconds() - t_end < settle_limit:
            st = await self.status()
            if st["streams"] == 0 and not self.engine.active_sessions and self.engine.open_playbacks == 0:
                break
            await self.sleep(0.5)
        settled_after = r.seconds() - t_end
        await self.sample("after")
        final_status = await self.status()
        code, metrics_body = await http_get_async(r, self.proxy_port, "/metrics")
        metrics = metric_values(metrics_body.decode()) if code == 200 else {}

        # descriptors: the pool may hold idle engine connections up to 60 s
        fd_wait_start = r.seconds()
        fd_deadline = fd_wait_start + POOL_IDLE_TIMEOUT + 5
        fds_first = {"fds": fd_count(self.proxy.pid), "fd_kinds": describe_fds(self.proxy.pid, names)}
        while fd_count(self.proxy.pid) > idle["fds"] and r.seconds() < fd_deadline:
            await self.sleep(1.0)
        fds_final = {"fds": fd_count(self.proxy.pid), "fd_kinds": describe_fds(self.proxy.pid, names),
                     "waited_s": round(r.seconds() - fd_wait_start, 1)}  # fmt: skip
        await self.sample("final")

        # checks
        checks: List[Dict[str, Any]] = []
        ref = warm_sample or self.samples[0]
        growth = (last_churn["rss_kib"] - ref["rss_kib"]) / ref["rss_kib"]
        checks.append({
            "check": "RSS flat after warm-up",
            "pass": abs(growth) <= 0.10,
            "detail": f"{ref['rss_kib'] / 1024:.1f} MiB at t={ref['t']:.0f}s (after {warmup:.0f}s warm-up) → "
                      f"{last_churn['rss_kib'] / 1024:.1f} MiB at t={last_churn['t']:.0f}s ({100 * growth:+.1f}%, limit ±10%); "
                      f"player backlogs in the proxy {ref.get('backlog_kib', 0) / 1024:.1f} → "
                      f"{last_churn.get('backlog_kib', 0) / 1024:.1f} MiB, max {max(s.get('backlog_kib', 0) for s in self.samples) / 1024:.1f} MiB; "
                      f"RSS at t=… {', '.join(_rss_series(self.samples))}; "
                      f"peak {max(s['hwm_kib'] for s in self.samples) / 1024:.1f} MiB; after the players left "
                      f"{self.samples[-1]['rss_kib'] / 1024:.1f} MiB",
        })  # fmt: skip
        extra_fds = fds_final["fds"] - idle["fds"]
        checks.append({
            "check": "proxy file descriptors back to idle",
            "pass": extra_fds <= 0,
            "detail": f"idle {idle['fds']}, {fds_first['fds']} once the streams were gone "
                      f"({_kinds(fds_first['fd_kinds'], idle['fd_kinds'])}), {fds_final['fds']} after "
                      f"{fds_final['waited_s']:g}s more" + ("" if extra_fds <= 0 else
                      f": still open beyond idle: {_kinds(fds_final['fd_kinds'], idle['fd_kinds'])}"),
        })  # fmt: skip
        active = self.engine.active_sessions
        checks.append({
            "check": "no engine session open without a player",
            "pass": not active and self.engine.open_playbacks == 0,
            "detail": f"engine: {len(active)} active session(s), {self.engine.open_playbacks} open playback(s), "
                      f"{self.engine.connections} connection(s); proxy: {final_status['streams']} stream(s), "
                      f"{final_status['clients']} client(s); settled {settled_after:.1f}s after the players left"
                      + (f"; active: {[_session_info(s) for s in active[:5]]}" if active else ""),
        })  # fmt: skip
        sessions = list(self.engine.sessions.values())
        missing = [s for s in sessions if s.stop_commands == 0]
        checks.append({
            "check": "no stop command missing",
            "pass": not missing,
            "detail": f"{len(sessions)} engine sessions created, {len(sessions) - len(missing)} got a stop "
                      f"({sum(1 for s in sessions if s.stop_commands > 1)} more than one); "
                      f"{self.engine.stop_count} stop commands in all"
                      + (f"; without a stop: {[_session_info(s) for s in missing[:5]]}" if missing else ""),
        })  # fmt: skip

        # SIGTERM: the proxy stops, then its log is complete
        t_term = time.monotonic()
        self.proxy.send_signal(signal.SIGTERM)
        exited = await self.wait_exit(10.0)
        term_s = time.monotonic() - t_term
        log_text = self.children.log_text("proxy")
        errors = _log_errors(log_text)
        checks.append({
            "check": "no error in the proxy log",
            "pass": not errors,
            "detail": (f"{len(log_text.splitlines())} lines, none matching {', '.join(ERROR_PATTERNS)}" if not errors else
                       f"{sum(e['count'] for e in errors)} matching line(s), {len(errors)} distinct; first: {errors[0]['line']}"),
        })  # fmt: skip

        self.report = {
            "config": {**{k: v for k, v in vars(args).items() if k != "json"}, "warmup_s": warmup},
            "proxy_argv_extra": extra,
            "idle": idle,
            "warm_sample": ref,
            "last_churn_sample": last_churn,
            "fds_after_streams": fds_first,
            "fds_final": fds_final,
            "settled_after_s": round(settled_after, 1),
            "players": dict(sorted(self.stats.items())),
            "player_bytes": self.bytes_in,
            "faults": dict(self.faults),
            "fault_log": self.fault_log,
            "engine": {
                "sessions": len(sessions),
                "getstream_calls": len(self.engine.getstream_calls),
                "stop_count": self.engine.stop_count,
                "playbacks": len(self.engine.playbacks),
                "playback_ends": dict(Counter(p.end_reason for p in self.engine.playbacks)),
            },
            "proxy_metrics": {k: v for k, v in metrics.items() if k.startswith("acexy_") and not k.startswith("acexy_time_to_first_byte_seconds_bucket")},
            "proxy_log": {"lines": len(log_text.splitlines()), "errors": errors, "by_kind": _log_kinds(log_text)},
            "sigterm": {"exited": exited, "seconds": round(term_s, 2), "code": self.proxy.returncode},
            "checks": checks,
            "samples": self.samples,
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        log_copy = RESULTS / f"soak-{args.stamp}-proxy.log"
        log_copy.write_text(log_text)
        self.report["proxy_log"]["path"] = str(log_copy)
        await self.engine.shutdown()
        return 0 if all(c["pass"] for c in checks) else 1

    async def wait_exit(self, limit: float) -> bool:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if self.proxy.poll() is not None:
                return True
            await self.sleep(0.05)
        return False


# ---------------------------------------------------------------------------
# helpers and report
# ---------------------------------------------------------------------------


def _seconds(text: str) -> float:
    """Go-style duration (``5s``, ``500ms``, ``1m30s``, bare seconds) → seconds."""
    text = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    total = 0.0
    for value, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text):
        total += float(value) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


def _rss_series(samples: List[Dict[str, Any]], points: int = 8) -> List[str]:
    """A few evenly spaced churn samples: ``t:RSS`` (MiB)."""
    churn = [s for s in samples if s["phase"] == "churn"]
    if not churn:
        return []
    step = max(1, len(churn) // points)
    picked = churn[::step]
    if picked[-1] is not churn[-1]:
        picked.append(churn[-1])
    return [f"{s['t']:.0f}:{s['rss_kib'] / 1024:.1f}" for s in picked]


def _kinds(now: Dict[str, int], idle: Dict[str, int]) -> str:
    diff = {k: now.get(k, 0) - idle.get(k, 0) for k in set(now) | set(idle)}
    parts = [f"{'+' if v > 0 else ''}{v} {k}" for k, v in sorted(diff.items()) if v]
    return ", ".join(parts) if parts else "same kinds as idle"


def _session_info(s: Any) -> Dict[str, Any]:
    return {
        "id": s.playback_session_id[:12],
        "content": s.content_key[:12],
        "stopped": s.stopped,
        "stops": s.stop_commands,
        "bytes": s.bytes_sent,
        "playbacks": [(p.state, p.end_reason) for p in s.playbacks],
    }


_TS = re.compile(r"^\S+\s+")  # the timestamp


def _log_errors(text: str) -> List[Dict[str, Any]]:
    """Lines matching an error pattern, grouped (timestamps and peers removed), with context."""
    lines = text.splitlines()
    groups: Dict[str, Dict[str, Any]] = {}
    for i, line in enumerate(lines):
        if any(p in line for p in ERROR_PATTERNS):
            key = re.sub(r"\d+", "N", _TS.sub("", line))[:200]
            g = groups.setdefault(key, {"count": 0, "line": line.strip()[:300], "context": lines[i : i + 25]})
            g["count"] += 1
    return list(groups.values())


def _log_kinds(text: str) -> Dict[str, int]:
    """What the proxy logged, by kind: ``[namespace#level]`` + the message with
    ids, numbers and peers blurred (so the faults it saw can be counted)."""
    out: Counter = Counter()
    for line in text.splitlines():
        m = re.match(r"^\S+\s+\[([^\]]+)\]\s+(.*)$", line)
        if not m:
            continue
        msg = re.sub(r"[0-9a-f]{40}", "<id>", m.group(2))
        msg = re.sub(r"\d+(\.\d+)?", "N", msg)
        out[f"[{m.group(1)}] {msg[:90]}"] += 1
    return dict(out.most_common(40))


def render(report: Dict[str, Any]) -> str:
    if "checks" not in report:
        lines = [f"acexy-tw soak  {report['timestamp']}", machine_line(report["machine"]), source_line(report["source"])]
        lines += [f"ERROR: {e}" for e in report.get("errors", [])]
        if report.get("proxy_log_tail"):
            lines += ["proxy log tail:", report["proxy_log_tail"]]
        if report.get("json_path"):
            lines.append(f"JSON: {report['json_path']}")
        return "\n".join(lines)
    cfg = report["config"]
    lines = [
        f"acexy-tw soak  {report['timestamp']}",
        machine_line(report["machine"]),
        source_line(report["source"]),
        f"churn {cfg['minutes']:g} min (warm-up {cfg['warmup_s']:.0f} s), {cfg['contents']} contents at {cfg['bitrate']}bit/s, "
        f"~{cfg['players']} players (mean stay {cfg['stay']:g} s), a fault every {cfg['fault_every']:g} s; seed {cfg['seed']}; "
        f"proxy: twistd -n acexy {' '.join(report.get('proxy_argv_extra', []))}",
        "engine and players run in this driver process; the proxy is its own process; all share the "
        f"{report['machine']['usable_cpus']} cores",
        "",
    ]
    if "checks" in report:
        p = report["players"]
        joined = sum(v for k, v in p.items() if k.startswith("joined"))
        statuses = {k[7:]: v for k, v in p.items() if k.startswith("status ")}
        by_proxy = {k[len("ended by proxy "):]: v for k, v in p.items() if k.startswith("ended by proxy")}
        lines += [
            f"players: {joined} connections ({', '.join(f'{k[7:]} {v}' for k, v in p.items() if k.startswith('joined'))})",
            f"  answers: {statuses}; connect failures {p.get('connect failed', 0)}; "
            f"{report['player_bytes'] / 1e9:.2f} GB received",
            f"  ended by the proxy: {by_proxy or 'none'}",
            f"faults injected: {report['faults']}",
            f"engine: {report['engine']['sessions']} sessions, {report['engine']['getstream_calls']} getstream calls, "
            f"{report['engine']['stop_count']} stop commands, {report['engine']['playbacks']} playbacks "
            f"(ends: {report['engine']['playback_ends']})",
        ]
        m = report["proxy_metrics"]
        stopped = {k.split('"')[1]: int(v) for k, v in m.items() if k.startswith("acexy_engine_sessions_stopped_total{")}
        lines.append(
            f"proxy metrics: sessions started {int(m.get('acexy_engine_sessions_started_total', 0))}, stopped by reason "
            f"{stopped}, clients cut {int(m.get('acexy_clients_cut_total', 0))}"
        )
        kinds = report["proxy_log"]["by_kind"]
        notable = {k: v for k, v in kinds.items() if "#warn]" in k or "cutting" in k or "(EOF)" in k}
        if notable:
            lines.append("proxy log, warnings and cuts by kind:")
            lines += [f"  {v:>5}  {k}" for k, v in notable.items()]
        lines.append(
            f"proxy RSS: idle {report['idle']['rss_kib'] / 1024:.1f} MiB, peak {max(s['hwm_kib'] for s in report['samples']) / 1024:.1f} MiB; "
            f"SIGTERM → exit {report['sigterm']['seconds']} s (code {report['sigterm']['code']})"
        )
        lines.append("")
        for c in report["checks"]:
            lines.append(f"  {'PASS' if c['pass'] else 'FAIL'}  {c['check']}: {c['detail']}")
        lines.append("")
        lines.append(f"proxy log: {report['proxy_log']['path']}")
    for e in report.get("errors", []):
        lines.append(f"ERROR: {e}")
    if report.get("json_path"):
        lines.append(f"JSON: {report['json_path']}")
    return "\n".join(lines)


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="acexy-tw soak: churning players, engine faults, leak checks")
    parser.add_argument("--minutes", type=float, default=30.0, help="minutes of churn (default 30)")
    parser.add_argument("--quick", action="store_true", help="2 minutes of churn (about 3 minutes in all)")
    parser.add_argument("--contents", type=int, default=20)
    parser.add_argument("--players", type=int, default=60, help="players connected on average (default 60)")
    parser.add_argument("--stay", type=float, default=20.0, help="mean seconds a player stays (default 20)")
    parser.add_argument("--bitrate", default="2M", help="engine bitrate per content (default 2M)")
    parser.add_argument("--fault-every", type=float, default=15.0, help="seconds between faults (default 15; --quick 8)")
    parser.add_argument("--fault-length", type=float, default=5.0, help="seconds a knob fault stays on (default 5)")
    parser.add_argument("--fault-order", choices=("cycle", "random"), default="cycle")
    parser.add_argument("--linger", default="3s", help="proxy ACEXY_LINGER (default 3s)")
    parser.add_argument("--empty-timeout", default="4s", help="proxy ACEXY_EMPTY_TIMEOUT (default 4s: stalls resolve quickly)")
    parser.add_argument("--buffer-size", default="1MiB", help="proxy ACEXY_BUFFER_SIZE (default 1MiB)")
    parser.add_argument("--proxy-arg", action="append", default=[], metavar="ARG")
    parser.add_argument("--warmup", type=float, default=None, help="warm-up seconds (default max(45, 15%% of the churn))")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--verbose", action="store_true", help="print every sample")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.minutes = 2.0
        if args.fault_every == 15.0:
            args.fault_every = 8.0
    if args.seed is None:
        args.seed = secrets.randbelow(1 << 31)
    parse_bitrate(args.bitrate)
    return args


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    iso, stamp = timestamp()
    args.stamp = stamp
    report: Dict[str, Any] = {"timestamp": iso, "machine": machine(), "source": source_state(), "errors": []}
    limit = args.minutes * 60 + 240
    started = time.monotonic()

    async def body(reactor: Any) -> None:
        soak = Soak(reactor, args)
        reactor.addSystemEventTrigger("before", "shutdown", soak.children.stop_all)
        watchdog = reactor.callLater(limit, _out_of_time, reactor, soak, report, args, started)
        code = 2
        try:
            code = await soak.run()
            report.update(soak.report)
        except Exception as exc:  # noqa: BLE001 - reported, exit 2
            import traceback

            report["errors"].append(f"{type(exc).__name__}: {exc}")
            report["traceback"] = traceback.format_exc()
            report["config"] = {k: v for k, v in vars(args).items() if k != "json"}
            try:
                report["proxy_log_tail"] = soak.children.log_tail("proxy", 40)
            except Exception:  # noqa: BLE001
                pass
        finally:
            if watchdog.active():
                watchdog.cancel()
            soak.children.stop_all()
        finish(report, args, started)
        raise SystemExit(code)

    task.react(body)


def _out_of_time(reactor: Any, soak: Soak, report: Dict[str, Any], args: argparse.Namespace, started: float) -> None:
    """The overall limit: report what there is, kill the children, exit 2."""
    import os

    report["errors"].append("time limit reached")
    try:
        report["proxy_log_tail"] = soak.children.log_tail("proxy", 40)
        report["samples"] = soak.samples
    finally:
        soak.children.stop_all()
    finish(report, args, started)
    os._exit(2)


def finish(report: Dict[str, Any], args: argparse.Namespace, started: float) -> None:
    report["wall_seconds"] = round(time.monotonic() - started, 1)
    path = args.json or RESULTS / f"soak-{args.stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    report["json_path"] = str(path)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(render(report))
    if report.get("traceback"):
        print(report["traceback"])
    print(f"wall time {report['wall_seconds']} s")


if __name__ == "__main__":
    main()
