#!/usr/bin/env python3
"""
Start-up benchmark for acexy-tw: from spawning ``twistd -n acexy`` to its first served request.

    .venv/bin/python bench/startup.py [--runs 5]

Each run spawns ``twistd -n --pidfile= acexy`` (a free port, an engine address
nobody listens on: ``/healthz`` never touches the engine) and, from the moment
before ``Popen``, tries ``GET /healthz`` in a tight loop: a connect attempt
every ``--poll`` seconds (refused while the port is not listening yet), then
the request on the first connection that succeeds. The time is taken when
the whole ``200`` answer has arrived. The proxy is then stopped with SIGTERM
and the time it took to exit is recorded too. Reported: median, min and max
over ``--runs`` runs (a first, discarded run warms the file cache unless
``--no-warmup``), and the RSS right after the first answer.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    Children,
    OutOfTime,
    dechunk,
    free_port,
    install_limits,
    machine,
    machine_line,
    read_head,
    request_bytes,
    rss_kib,
    source_line,
    source_state,
    timestamp,
    write_json,
)


def healthz_once(port: int) -> Optional[Dict[str, Any]]:
    """One try: None if the port refuses (not listening yet), else the answer."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=2)
    except (ConnectionRefusedError, socket.timeout):
        return None
    with sock:
        t_connected = time.monotonic()
        sock.sendall(request_bytes("/healthz", "127.0.0.1", port, close=True))
        status, headers, body = read_head(sock)
        while True:  # Connection: close — the answer ends with the connection
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = dechunk(body)
    return {"status": status, "body": body.decode("utf-8", "replace"), "connected": t_connected}


def one_run(children: Children, name: str, poll: float, timeout: float) -> Dict[str, Any]:
    port = free_port()
    dead_engine = free_port()  # nothing listens there; /healthz never asks the engine
    argv = [
        children.twistd, "-n", "--pidfile=", "acexy",
        "--listen", f"tcp:{port}:interface=127.0.0.1",
        "--engine-host", "127.0.0.1", "--engine-port", str(dead_engine),
    ]  # fmt: skip
    t0 = time.monotonic()
    proc = children.spawn(name, argv)
    tries = 0
    answer = None
    try:
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            tries += 1
            answer = healthz_once(port)
            if answer is not None:
                break
            if proc.poll() is not None:
                raise RuntimeError(f"twistd exited with {proc.returncode}:\n{children.log_tail(name)}")
            time.sleep(poll)
        t1 = time.monotonic()
        if answer is None:
            raise RuntimeError(f"no answer within {timeout:g}s:\n{children.log_tail(name)}")
        rss = rss_kib(proc.pid)
        t_stop = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
            stop_s: Optional[float] = time.monotonic() - t_stop
        except subprocess.TimeoutExpired:
            stop_s = None
    finally:
        children.stop(proc)
    return {
        "seconds": round(t1 - t0, 4),
        "listening_s": round(answer["connected"] - t0, 4),
        "status": answer["status"],
        "body": answer["body"][:200],
        "connect_tries": tries,
        "rss_mib": round(rss / 1024, 1),
        "sigterm_exit_s": round(stop_s, 3) if stop_s is not None else None,
        "exit_code": proc.returncode,
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="acexy-tw start-up bench: spawn → first /healthz answer")
    parser.add_argument("--runs", type=int, default=5, help="measured runs (default 5)")
    parser.add_argument("--poll", type=float, default=0.002, help="seconds between connect attempts (default 0.002)")
    parser.add_argument("--no-warmup", action="store_true", help="do not run (and discard) a first run")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--time-limit", type=int, default=0)
    args = parser.parse_args(argv)
    iso, stamp = timestamp()
    install_limits(args.time_limit or 30 + 15 * (args.runs + 1))
    report: Dict[str, Any] = {
        "timestamp": iso,
        "machine": machine(),
        "source": source_state(),
        "config": {"runs": args.runs, "poll": args.poll, "warmup": not args.no_warmup},
        "runs": [],
        "errors": [],
    }
    children = Children()
    started = time.monotonic()
    try:
        if not args.no_warmup:
            try:
                report["warmup_run"] = one_run(children, "warmup", args.poll, 20)
            except Exception as exc:  # noqa: BLE001
                report["errors"].append(f"warm-up: {exc}")
        for i in range(args.runs):
            try:
                report["runs"].append(one_run(children, f"run{i}", args.poll, 20))
            except Exception as exc:  # noqa: BLE001
                report["errors"].append(f"run {i}: {exc}")
    except OutOfTime as exc:
        report["errors"].append(str(exc))
    finally:
        signal.alarm(0)
        children.stop_all()
    secs = [r["seconds"] for r in report["runs"]]
    if secs:
        report["median_s"] = round(statistics.median(secs), 4)
        report["min_s"], report["max_s"] = min(secs), max(secs)
    report["wall_seconds"] = round(time.monotonic() - started, 1)
    write_json(report, args.json, "startup", stamp)

    lines = [
        f"acexy-tw start-up bench  {report['timestamp']}",
        machine_line(report["machine"]),
        source_line(report["source"]),
        f"spawn of `twistd -n --pidfile= acexy` → first complete `GET /healthz` answer; connect tried every "
        f"{args.poll * 1000:g} ms; {args.runs} runs" + ("" if args.no_warmup else " after 1 discarded warm-up run"),
        "",
        f"   {'run':>4} {'first answer s':>14} {'listening s':>11} {'tries':>6} {'RSS MiB':>8} {'SIGTERM→exit s':>14}",
    ]
    for i, r in enumerate(report["runs"]):
        lines.append(
            f"   {i + 1:>4} {r['seconds']:>14.3f} {r['listening_s']:>11.3f} {r['connect_tries']:>6} {r['rss_mib']:>8.1f} "
            f"{r['sigterm_exit_s'] if r['sigterm_exit_s'] is not None else '—':>14}"
        )
    if secs:
        lines.append(f"   median {report['median_s']:.3f} s (min {report['min_s']:.3f}, max {report['max_s']:.3f})")
        lines.append(f"   /healthz said: {report['runs'][0]['status']} {json.loads(report['runs'][0]['body']) if report['runs'][0]['body'].startswith('{') else report['runs'][0]['body']}")
    lines.append("")
    for e in report["errors"]:
        lines.append(f"ERROR: {e}")
    lines.append(f"JSON: {report['json_path']}")
    print("\n".join(lines))
    print(f"wall time {report['wall_seconds']} s")
    return 1 if report["errors"] or not secs else 0


if __name__ == "__main__":
    sys.exit(main())
