#!/usr/bin/env python3
"""
Backlog memory bench (issue #12, point 2): RSS while stalled players hold
backlogs on many contents, and after they are gone, as ratios to the idle RSS
of the same proxy.

    .venv/bin/python bench/backlog.py [--contents 40] [--buffer-size 4MiB] [--bitrate 8M]
    .venv/bin/python bench/backlog.py --row "budget off=--max-backlog 1GiB" --row "default="
    .venv/bin/python bench/backlog.py --source /tmp/acexy-head   # another checkout's acexy_tw

Each row is a fresh simulated engine (``bench/simengine.py``) and a fresh
proxy (``twistd -n --pidfile= acexy --linger 0 --buffer-size …`` plus the
row's options; ``ENV=value`` words in a row are set in the proxy's
environment, e.g. ``MALLOC_ARENA_MAX=2``). Steps:

1. idle: the median of 5 VmRSS samples after ``--settle`` s, no request yet;
2. during: ``--contents`` players, one per content, each a raw socket with a
   small receive buffer that sends its request and never reads. Sampled once
   the proxy's total backlog (``/ace/status``) has not grown for ``--stable``
   s (or after ``--fill`` s);
3. after: every stalled socket closed; sampled once the proxy has no session
   left, after ``--settle`` s (and again ``--settle`` s later: ``after2``).

The figures are the ratios during/idle and after/idle; the backlog the proxy
reported and the players it cut are shown next to them.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

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
    proxy_metrics,
    request_bytes,
    source_line,
    source_state,
    timestamp,
    finish,
)
from memory import HOLD, sample_rss  # noqa: E402


def status(port: int) -> Dict[str, Any]:
    doc = http_json(port, "/ace/status", timeout=10)
    clients = [c for s in doc.get("sessions", []) for c in s.get("client_list", [])]
    return {
        "streams": doc.get("streams", len(doc.get("sessions", []))),
        "clients": len(clients),
        "backlog_bytes": sum(c.get("backlog", 0) for c in clients),
    }


def cut_count(port: int) -> Optional[float]:
    try:
        return proxy_metrics(port).get("acexy_clients_cut_total", proxy_metrics(port).get("acexy_clients_cut"))
    except Exception:  # noqa: BLE001
        return None


def stalled_player(port: int, path: str, rcvbuf: int) -> socket.socket:
    """Connects, sends the request, never reads."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    sock.sendall(request_bytes(path, "127.0.0.1", port))
    return sock


def parse_row(text: str) -> Tuple[str, List[str], Dict[str, str]]:
    name, _, rest = text.partition("=")
    args, env = [], {}
    for word in shlex.split(rest):
        if "=" in word and not word.startswith("-") and word.split("=", 1)[0].isupper():
            k, v = word.split("=", 1)
            env[k] = v
        else:
            args.append(word)
    return name.strip(), args, env


def measure(children: Children, args: argparse.Namespace, name: str, extra: List[str], env: Dict[str, str]) -> Dict[str, Any]:
    engine, engine_port, _ = children.start_stats_engine(f"engine-{name}", ["--bitrate", args.bitrate])
    saved = dict(os.environ)
    os.environ.update(env)
    if args.source:
        os.environ["PYTHONPATH"] = str(args.source)
    try:
        proxy, port = children.start_proxy(
            f"proxy-{name}", engine_port, ["--linger", "0", "--buffer-size", args.buffer_size, *extra]
        )
    finally:
        os.environ.clear()
        os.environ.update(saved)
    socks: List[socket.socket] = []
    readers: Optional[LoadClients] = None
    try:
        time.sleep(args.settle)
        idle = {"rss": sample_rss(proxy.pid), **status(port)}
        paths = [f"/ace/getstream?id={cid}" for cid in content_ids(args.contents)]
        if args.readers:
            specs = [{"path": p, "tag": i} for i, p in enumerate(paths * args.readers)]
            readers = LoadClients(children, f"readers-{name}", port, specs, procs=2, seconds=HOLD)
            readers.start()
            readers.go()
            readers.wait_ready(timeout=60)
        for path in paths:
            socks.append(stalled_player(port, path, args.rcvbuf))
        started = time.monotonic()
        best, best_at, trace = -1, time.monotonic(), []
        peak: Dict[str, Any] = {"backlog_bytes": -1}
        while time.monotonic() - started < args.fill:
            time.sleep(0.5)
            st = status(port)
            rss = proc_status(proxy.pid)["VmRSS"]
            trace.append((round(time.monotonic() - started, 1), st["backlog_bytes"], st["clients"], rss))
            if st["backlog_bytes"] > peak["backlog_bytes"]:
                peak = {**st, "VmRSS": rss}
            if st["backlog_bytes"] > best:
                best, best_at = st["backlog_bytes"], time.monotonic()
            elif time.monotonic() - best_at >= args.stable and best > 0:
                break
        during = {"rss": sample_rss(proxy.pid), **status(port), "seconds": round(time.monotonic() - started, 1), "cut": cut_count(port)}
        during["rss_max"] = max(t[3] for t in trace)
        during["peak_backlog"] = peak
        for s in socks:
            s.close()
        socks.clear()
        if readers is not None:
            readers.stop()
            readers.results(timeout=30)
            readers = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and status(port)["streams"]:
            time.sleep(0.2)
        time.sleep(args.settle)
        after = {"rss": sample_rss(proxy.pid), **status(port)}
        time.sleep(args.settle)
        after2 = {"rss": sample_rss(proxy.pid), **status(port)}
    finally:
        for s in socks:
            s.close()
        if readers is not None:
            readers.stop()
        children.stop(proxy)
        children.stop(engine)
    i = idle["rss"]["VmRSS"]
    return {
        "args": extra,
        "env": env,
        "idle": idle,
        "during": during,
        "after": after,
        "after2": after2,
        "trace": trace,
        "ratio_during": round(during["rss"]["VmRSS"] / i, 2),
        "ratio_peak": round(during["rss"]["VmHWM"] / i, 2),
        "ratio_after": round(after["rss"]["VmRSS"] / i, 2),
        "ratio_after2": round(after2["rss"]["VmRSS"] / i, 2),
    }


def render(report: Dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [
        f"acexy-tw backlog memory bench  {report['timestamp']}",
        machine_line(report["machine"]),
        source_line(report["source"]) + (f"; proxy code from {cfg['source']}" if cfg.get("source") else ""),
        f"{cfg['contents']} contents × (1 stalled player (SO_RCVBUF {cfg['rcvbuf']}, never reads) + "
        f"{cfg['readers']} reading), engine "
        f"{cfg['bitrate']}bit/s per content, --buffer-size {cfg['buffer_size']}, --linger 0; VmRSS median of 5; "
        f"ratios to the idle RSS of the same proxy. peak = VmHWM; during = once the backlog stopped growing; "
        f"after = {cfg['settle']:g} s after the last session closed, after+ = {cfg['settle']:g} s later",
        "",
        f"   {'row':<28} {'idle':>8} {'peak':>8} {'during':>8} {'after':>8} {'after+':>8}   {'peak/idle':>9} "
        f"{'during/idle':>11} {'after/idle':>10} {'after+/idle':>11}  {'max backlog':>11} {'backlog':>8} {'cut':>4}",
    ]
    for name, row in report["rows"].items():
        if "error" in row:
            lines.append(f"   {name:<28} ERROR: {row['error'].splitlines()[0]}")
            continue
        r = lambda k: row[k]["rss"]["VmRSS"] / 1024  # noqa: E731
        cut = row["during"].get("cut")
        lines.append(
            f"   {name:<28} {r('idle'):>7.1f}M {row['during']['rss']['VmHWM'] / 1024:>7.1f}M {r('during'):>7.1f}M "
            f"{r('after'):>7.1f}M {r('after2'):>7.1f}M   {row['ratio_peak']:>9.2f} "
            f"{row['ratio_during']:>11.2f} {row['ratio_after']:>10.2f} {row['ratio_after2']:>11.2f}  "
            f"{row['during']['peak_backlog']['backlog_bytes'] / 1048576:>10.1f}M "
            f"{row['during']['backlog_bytes'] / 1048576:>7.1f}M {'—' if cut is None else int(cut):>4}"
        )
    for e in report.get("errors", []):
        lines.append(f"ERROR: {e}")
    if report.get("json_path"):
        lines.append(f"JSON: {report['json_path']}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="acexy-tw backlog memory bench (stalled players, RSS during/after)")
    parser.add_argument("--contents", type=int, default=40, help="contents, one stalled player each (default 40)")
    parser.add_argument("--buffer-size", default="4MiB", help="the proxy's --buffer-size (default 4MiB)")
    parser.add_argument("--bitrate", default="8M", help="engine bitrate per content (default 8M)")
    parser.add_argument(
        "--readers", type=int, default=1,
        help="reading players per content beside the stalled one (default 1: the engine is not held back, "
        "so the stalled player's backlog grows to --buffer-size; 0: each stalled player holds its engine back)",
    )  # fmt: skip
    parser.add_argument("--rcvbuf", type=int, default=4096, help="stalled players' SO_RCVBUF (default 4096)")
    parser.add_argument("--fill", type=float, default=40.0, help="longest wait for the backlogs to fill (s)")
    parser.add_argument("--stable", type=float, default=4.0, help="backlog unchanged this long = full (s)")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds before each idle/after sample")
    parser.add_argument("--source", type=Path, help="PYTHONPATH for the proxy (another checkout's acexy_tw)")
    parser.add_argument(
        "--row", action="append", default=[], metavar="NAME=ARGS",
        help='a proxy to measure: name, "=", extra twistd acexy options and ENV=value words '
        '(default: "budget off=--max-backlog 1GiB" and "default (64MiB)=")',
    )  # fmt: skip
    parser.add_argument("--json", type=Path)
    parser.add_argument("--time-limit", type=int, default=400)
    args = parser.parse_args(argv)
    rows = args.row or ["budget off=--max-backlog 1GiB", "default (64MiB)="]
    iso, stamp = timestamp()
    install_limits(args.time_limit)
    report: Dict[str, Any] = {
        "timestamp": iso,
        "machine": machine(),
        "source": source_state(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "json"},
        "rows": {},
        "errors": [],
    }
    children = Children()
    started = time.monotonic()
    try:
        for text in rows:
            name, extra, env = parse_row(text)
            try:
                report["rows"][name] = measure(children, args, name.replace(" ", "_").replace("/", "_"), extra, env)
            except Exception as exc:  # noqa: BLE001
                report["rows"][name] = {"error": f"{type(exc).__name__}: {exc}"}
                report["errors"].append(f"{name}: {exc}")
    except OutOfTime as exc:
        report["errors"].append(str(exc))
    finally:
        signal.alarm(0)
        children.stop_all()
    finish(report, args.json, "backlog", stamp, started, render(report))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
