#!/usr/bin/env python3
"""
Memory benchmark for acexy-tw: idle RSS, RSS per extra player, RSS per extra stream.

    .venv/bin/python bench/memory.py [--clients 100] [--streams 20] [--bitrate 1M]

Two fresh proxies (``twistd -n --pidfile= acexy``, default settings), each with
a fresh simulated engine (``bench/simengine.py`` at ``--bitrate``), so memory
freed by one measurement cannot be reused by the next:

A. players: idle RSS (after start, no request yet); 1 player on one content;
   then ``--clients`` − 1 more on the same content (``--clients`` in all);
   then *after*: every player gone and every session closed.
B. streams: idle; 1 content × 1 player; then ``--streams`` − 1 more
   contents × 1 player each; then after, as in A.

The reference, measured in the same run: the *floor*, a Python process that
imports only the fixed stack (twistd, the reactor without TLS, twisted.web's
server and client, Klein, treq, prometheus_client) and nothing of acexy-tw.
Idle is reported against it, and after-load against idle.

Each step waits until every new player has its first body byte, lets the
proxy settle (``--settle`` s), then takes the median of 5 VmRSS samples
(``/proc/<pid>/status``). What the players have not taken yet sits in the
proxy's per-player backlogs (``backlog`` in ``/ace/status``; bounded by
ACEXY_BUFFER_SIZE, ~0 for players that read): it is reported and subtracted.
Load clients: ``bench/loadclients.py`` (asyncio, raw sockets), 2–3 processes.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    Children,
    LoadClients,
    OutOfTime,
    content_ids,
    http_json,
    install_limits,
    machine,
    machine_line,
    proc_status,
    source_line,
    source_state,
    timestamp,
    finish,
)

HOLD = 600.0  # clients hold on until STOP


def sample_rss(pid: int, n: int = 5, gap: float = 0.2) -> Dict[str, float]:
    """Median of ``n`` samples of VmRSS / RssAnon / RssFile (KiB)."""
    samples: List[Dict[str, int]] = []
    for i in range(n):
        if i:
            time.sleep(gap)
        samples.append(proc_status(pid))
    return {
        key: statistics.median(s.get(key, 0) for s in samples)
        for key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")
    }


def backlog(port: int) -> Dict[str, int]:
    status = http_json(port, "/ace/status", timeout=10)
    clients = [c for s in status.get("sessions", []) for c in s.get("client_list", [])]
    return {
        "streams": status.get("streams", 0),
        "clients": status.get("clients", 0),
        "backlog_bytes": sum(c.get("backlog", 0) for c in clients),
        "paused_clients": sum(1 for c in clients if c.get("paused")),
    }


class Step:
    """One group of clients added to a running proxy, then a settled sample."""

    def __init__(self, children: Children, args: argparse.Namespace, proxy_pid: int, proxy_port: int) -> None:
        self.children = children
        self.args = args
        self.pid = proxy_pid
        self.port = proxy_port
        self.groups: List[LoadClients] = []

    def idle(self) -> Dict[str, Any]:
        time.sleep(self.args.settle)
        return {"rss": sample_rss(self.pid), **backlog(self.port)}

    def add(self, name: str, paths: List[str], procs: int) -> Dict[str, Any]:
        specs = [{"path": p, "tag": i} for i, p in enumerate(paths)]
        group = LoadClients(self.children, name, self.port, specs, procs=procs, seconds=HOLD, ramp=self.args.ramp)
        group.start()
        self.groups.append(group)
        group.go()
        ready = group.wait_ready(timeout=60)
        failed = sum(r["failed"] for r in ready)
        time.sleep(self.args.settle)
        out = {"rss": sample_rss(self.pid), **backlog(self.port), "new_clients_failed": failed}
        return out

    def finish(self) -> List[Dict[str, Any]]:
        for g in self.groups:
            g.stop()
        bad = []
        for g in self.groups:
            result = g.results(timeout=30)
            bad += [c for c in result["clients"] if c["status"] != 200 or c["end"] != "stopped"]
        return bad

    def after(self) -> Dict[str, Any]:
        """Every player gone: once the proxy has no session left, settle and sample."""
        deadline = time.monotonic() + 60
        while backlog(self.port)["streams"] and time.monotonic() < deadline:
            time.sleep(0.2)
        return self.idle()


def measure(children: Children, args: argparse.Namespace, name: str, paths_first: List[str], paths_more: List[str]) -> Dict[str, Any]:
    engine, engine_port, _ = children.start_stats_engine(f"engine-{name}", ["--bitrate", args.bitrate])
    proxy, proxy_port = children.start_proxy(f"proxy-{name}", engine_port, args.proxy_arg)
    try:
        step = Step(children, args, proxy.pid, proxy_port)
        idle = step.idle()
        one = step.add(f"{name}-first", paths_first, procs=1)
        more = step.add(f"{name}-more", paths_more, procs=args.procs)
        bad = step.finish()
        after = step.after()
    finally:
        children.stop(proxy)
        children.stop(engine)
    return {"idle": idle, "one": one, "all": more, "after": after, "failed_clients": len(bad), "failed_samples": bad[:5]}


FLOOR = """
import sys, time
from acexy_tw._twisted_compat import leave_tls_unloaded
leave_tls_unloaded()
import twisted.scripts.twistd
from twisted.internet import epollreactor
epollreactor.install()
import twisted.web.server, twisted.web.client, klein, treq, prometheus_client
print("ready", flush=True)
time.sleep(60)
"""


def floor(settle: float) -> Dict[str, float]:
    """RSS of a process importing the fixed stack only (the reference)."""
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", FLOOR], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(settle)
        return sample_rss(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def derive(m: Dict[str, Any], n: int) -> Dict[str, Any]:
    """Per-unit figures (KiB) from idle → 1 → n."""
    r0, r1, rn = m["idle"]["rss"]["VmRSS"], m["one"]["rss"]["VmRSS"], m["all"]["rss"]["VmRSS"]
    bl = m["all"]["backlog_bytes"] / 1024
    return {
        "idle_kib": r0,
        "one_kib": r1,
        "all_kib": rn,
        "backlog_kib": round(bl, 1),
        "per_unit_0_to_n_kib": round((rn - r0) / n, 1),
        "per_unit_0_to_n_minus_backlog_kib": round((rn - r0 - bl) / n, 1),
        "per_unit_1_to_n_kib": round((rn - r1) / (n - 1), 1) if n > 1 else None,
        "per_unit_1_to_n_minus_backlog_kib": round((rn - r1 - bl) / (n - 1), 1) if n > 1 else None,
        "first_unit_kib": r1 - r0,
        "after_kib": m["after"]["rss"]["VmRSS"],
        "after_over_idle": round(m["after"]["rss"]["VmRSS"] / r0, 3),
    }


def render(report: Dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [
        f"acexy-tw memory bench  {report['timestamp']}",
        machine_line(report["machine"]),
        source_line(report["source"]),
        f"load: players in 2–3 client processes (asyncio, raw sockets); they share the "
        f"{report['machine']['usable_cpus']} cores with the proxy and the engine. Engine {cfg['bitrate']}bit/s per "
        f"content; each sample is the median of 5 VmRSS readings {cfg['settle']:g} s after the last new player's "
        f"first byte. KiB = 1024 B; proxy: twistd -n acexy {' '.join(cfg['proxy_arg']) or '(defaults)'}",
        "",
    ]
    a, b = report.get("players"), report.get("streams")
    if a and "error" not in a:
        i = a["measured"]["idle"]["rss"]
        f = report.get("floor")
        lines += [
            f"idle RSS (after start, no request yet): {i['VmRSS'] / 1024:.1f} MiB "
            f"(anonymous {i['RssAnon'] / 1024:.1f} MiB, files/libraries {i['RssFile'] / 1024:.1f} MiB)",
        ]
        if f:
            lines.append(
                f"reference, the fixed stack imported alone: {f['VmRSS'] / 1024:.1f} MiB; "
                f"idle / reference = {i['VmRSS'] / f['VmRSS']:.2f} (+{(i['VmRSS'] - f['VmRSS']) / 1024:.1f} MiB)"
            )
        lines.append("")
    lines.append(f"   {'':<34} {'idle':>9} {'1':>9} {'N':>9} {'backlog':>8}  {'per unit 0→N':>12} {'− backlog':>9}  {'per unit 1→N':>12} {'− backlog':>9}")
    for label, part in (("players on one content", a), ("streams (contents × 1 player)", b)):
        if not part:
            continue
        if "error" in part:
            lines.append(f"   {label:<34} ERROR: {part['error'].splitlines()[0]}")
            continue
        d = part["derived"]
        lines.append(
            f"   {label + ', N=' + str(part['n']):<34} {d['idle_kib'] / 1024:>8.1f}M {d['one_kib'] / 1024:>8.1f}M "
            f"{d['all_kib'] / 1024:>8.1f}M {d['backlog_kib']:>7.0f}K  {d['per_unit_0_to_n_kib']:>11.1f}K "
            f"{d['per_unit_0_to_n_minus_backlog_kib']:>8.1f}K  {d['per_unit_1_to_n_kib']:>11.1f}K "
            f"{d['per_unit_1_to_n_minus_backlog_kib']:>8.1f}K"
        )
    if a and b and "error" not in a and "error" not in b:
        per_stream = b["derived"]["per_unit_1_to_n_minus_backlog_kib"]
        per_client = a["derived"]["per_unit_1_to_n_minus_backlog_kib"]
        lines.append(
            f"   a stream without its player: {per_stream:.1f} − {per_client:.1f} = {per_stream - per_client:.1f} KiB "
            "(per unit 1→N, backlog subtracted)"
        )
    for label, part in (("players", a), ("streams", b)):
        if part and "error" not in part:
            m = part["measured"]
            lines.append(
                f"   {label}: {m['all']['clients']} players connected at the N sample, {m['all']['paused_clients']} paused; "
                f"peak RSS {m['all']['rss']['VmHWM'] / 1024:.1f} MiB; failed players {m['failed_clients']}; "
                f"after they left {part['derived']['after_kib'] / 1024:.1f} MiB = "
                f"{part['derived']['after_over_idle']:.2f} × idle"
            )
    lines.append("")
    for e in report.get("errors", []):
        lines.append(f"ERROR: {e}")
    if report.get("json_path"):
        lines.append(f"JSON: {report['json_path']}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="acexy-tw memory bench (idle, per player, per stream)")
    parser.add_argument("--clients", type=int, default=100, help="players on one content (default 100)")
    parser.add_argument("--streams", type=int, default=20, help="contents with one player each (default 20)")
    parser.add_argument("--bitrate", default="1M", help="engine bitrate (default 1M)")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds to wait before sampling (default 3)")
    parser.add_argument("--procs", type=int, default=2, choices=(2, 3), help="client processes for the N step")
    parser.add_argument("--ramp", type=float, default=0.0, help="spread connects over this many seconds")
    parser.add_argument("--proxy-arg", action="append", default=[], metavar="ARG", help="extra twistd acexy option")
    parser.add_argument("--skip", choices=("players", "streams"), action="append", default=[])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--time-limit", type=int, default=180)
    args = parser.parse_args(argv)
    iso, stamp = timestamp()
    install_limits(args.time_limit)
    report: Dict[str, Any] = {
        "timestamp": iso,
        "machine": machine(),
        "source": source_state(),
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "errors": [],
    }
    children = Children()
    started = time.monotonic()
    try:
        report["floor"] = floor(args.settle)
        if "players" not in args.skip:
            cid = content_ids(1)[0]
            try:
                paths = [f"/ace/getstream?id={cid}"] * args.clients
                m = measure(children, args, "players", paths[:1], paths[1:])
                report["players"] = {"n": args.clients, "measured": m, "derived": derive(m, args.clients)}
            except Exception as exc:  # noqa: BLE001
                report["players"] = {"error": f"{type(exc).__name__}: {exc}"}
                report["errors"].append(f"players: {exc}")
        if "streams" not in args.skip:
            ids = content_ids(args.streams)
            try:
                paths = [f"/ace/getstream?id={c}" for c in ids]
                m = measure(children, args, "streams", paths[:1], paths[1:])
                report["streams"] = {"n": args.streams, "measured": m, "derived": derive(m, args.streams)}
            except Exception as exc:  # noqa: BLE001
                report["streams"] = {"error": f"{type(exc).__name__}: {exc}"}
                report["errors"].append(f"streams: {exc}")
    except OutOfTime as exc:
        report["errors"].append(str(exc))
    finally:
        signal.alarm(0)
        children.stop_all()
    finish(report, args.json, "memory", stamp, started, render(report))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
