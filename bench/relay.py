#!/usr/bin/env python3
"""
Relay benchmark for acexy-tw: how fast, how expensive and how much later than
the engine itself the proxy delivers a stream.

    .venv/bin/python bench/relay.py [--seconds 8] [--iterations 40] [--json PATH]

Every party is its own process: the simulated engine
(``python -m acexy_tw.sim.engine``), the proxy (``twistd -n acexy``), ``socat``
(the reference relay) and the load clients (this file, re-run in a client
mode; raw sockets, standard library only).  Ports are free ones on 127.0.0.1.
Every child is killed at the end, whatever happened.

1. Throughput, one client, engine flat out, ``--seconds`` each: direct
   (client reads the engine's playback URL), socat (the same through
   ``socat -b 65536``), proxy (``/ace/getstream?id=``).  MB/s at the client,
   and CPU seconds per GB of the relay, the engine and the client, from
   ``/proc/<pid>/stat`` utime+stime sampled around a window that opens once
   the first 1 MB has arrived.
2. Time to first body byte, engine rate-limited (4 Mbit/s), proxy
   ``--linger 0``, ``--iterations`` fresh content ids: direct = getstream JSON
   then GET playback (what the proxy must do), proxy = one GET.

MB and GB are 10^6 and 10^9 bytes.  Bytes are counted raw as received (HTTP
headers and chunked framing included: the engine and the proxy both chunk).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import secrets
import signal
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py

from common import (  # noqa: E402
    GB,
    MB,
    RESULTS,
    ROOT,
    Children,
    OutOfTime,
    cpu_seconds,
    engine_getstream,
    engine_stop,
    fmt as _fmt,
    http_get,
    machine,
    path_of as _path_of,
    quantile,
    read_head as _read_head,
    request_bytes as _request,
)

WARMUP_BYTES = 1_000_000
RECV_BUFFER = 1 << 20


# ---------------------------------------------------------------------------
# client modes (run as separate processes)
# ---------------------------------------------------------------------------


def client_stream(port: int, path: str, seconds: float, warmup: int) -> None:
    """Read one stream as fast as possible; print START when the window opens
    (after ``warmup`` bytes) and a JSON result line when it closes."""
    buf = bytearray(RECV_BUFFER)
    view = memoryview(buf)
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    sock.sendall(_request(path, "127.0.0.1", port))
    recv_into = sock.recv_into
    total = 0
    first = b""
    eof = False
    # warm-up: until the first `warmup` bytes arrived
    while total < warmup:
        n = recv_into(view)
        if not n:
            eof = True
            break
        if not first:
            first = bytes(view[: min(n, 64)])
        total += n
    status_line = first.split(b"\r\n", 1)[0].decode("latin-1")
    if eof:
        print(json.dumps({"error": f"EOF after {total} bytes during warm-up", "status": status_line}), flush=True)
        return
    cpu0 = os.times()
    t0 = time.monotonic()
    print("START", flush=True)
    start_total = total
    deadline = t0 + seconds
    now = t0
    while now < deadline:
        n = recv_into(view)
        if not n:
            eof = True
            now = time.monotonic()
            break
        total += n
        now = time.monotonic()
    t1 = now
    cpu1 = os.times()
    sock.close()
    result = {
        "bytes": total - start_total,
        "elapsed": t1 - t0,
        "client_cpu": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system),
        "eof": eof,
        "status": status_line,
    }
    print(json.dumps(result), flush=True)


def _first_body_byte(sock: socket.socket) -> Tuple[int, float, float]:
    """Status, time headers complete, time first body byte (monotonic)."""
    status, _, rest = _read_head(sock)
    t_head = time.monotonic()
    if not rest:
        rest = sock.recv(65536)
        if not rest:
            raise ConnectionError("connection closed before the first body byte")
    return status, t_head, time.monotonic()


def ttfb_direct_once(engine_port: int, content_id: str) -> Dict[str, float]:
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", engine_port), timeout=10) as sock:
        path = f"/ace/getstream?format=json&id={content_id}&pid={secrets.token_hex(8)}"
        sock.sendall(_request(path, "127.0.0.1", engine_port, close=True))
        status, headers, body = _read_head(sock)
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    t_json = time.monotonic()
    response = json.loads(body)["response"]
    playback = _path_of(response["playback_url"])
    with socket.create_connection(("127.0.0.1", engine_port), timeout=10) as sock:
        sock.sendall(_request(playback, "127.0.0.1", engine_port))
        pstatus, t_head, t1 = _first_body_byte(sock)
    engine_stop(engine_port, _path_of(response["command_url"]))  # not timed
    if status != 200 or pstatus != 200:
        raise RuntimeError(f"direct: getstream HTTP {status}, playback HTTP {pstatus}")
    return {"ttfb": t1 - t0, "json": t_json - t0, "headers": t_head - t0}


def ttfb_proxy_once(proxy_port: int, content_id: str) -> Dict[str, float]:
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=10) as sock:
        sock.sendall(_request(f"/ace/getstream?id={content_id}", "127.0.0.1", proxy_port))
        status, t_head, t1 = _first_body_byte(sock)
    if status != 200:
        raise RuntimeError(f"proxy: HTTP {status}")
    return {"ttfb": t1 - t0, "headers": t_head - t0}


def wait_proxy_idle(proxy_port: int, limit: float = 5.0) -> float:
    """Wait until the proxy reports no open session; return the time waited."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        try:
            _, body = http_get("127.0.0.1", proxy_port, "/ace/status", timeout=2.0)
            if json.loads(body).get("streams") == 0:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.005)
    return time.monotonic() - start


def client_ttfb(engine_port: int, proxy_port: int, iterations: int, warmup: int) -> None:
    """Alternate direct and proxy, a fresh content id each time; print JSON."""
    out: Dict[str, Any] = {"direct": [], "proxy": [], "errors": [], "idle_wait": []}
    for i in range(warmup + iterations):
        counted = i >= warmup
        for name, run, port in (("direct", ttfb_direct_once, engine_port), ("proxy", ttfb_proxy_once, proxy_port)):
            try:
                sample = run(port, secrets.token_hex(20))
                if counted:
                    out[name].append(sample)
            except Exception as exc:  # noqa: BLE001 - reported, not fatal
                out["errors"].append(f"{name} #{i}: {type(exc).__name__}: {exc}")
            if name == "proxy":
                waited = wait_proxy_idle(proxy_port)
                if counted:
                    out["idle_wait"].append(waited)
    print(json.dumps(out), flush=True)


# ---------------------------------------------------------------------------
# the parent: processes, /proc sampling, measurements
# ---------------------------------------------------------------------------


class Bench(Children):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.args = args
        self.stamp = args.stamp

    def _read_line(self, proc, timeout: float) -> str:
        return self.read_line(proc, timeout)

    # -- measurement 1 -----------------------------------------------------------------

    def stream_once(self, label: str, port: int, path: str, relay_pid: Optional[int], engine_pid: int) -> Dict[str, Any]:
        seconds = self.args.seconds
        argv = [sys.executable, __file__, "_client-stream", str(port), path, str(seconds), str(WARMUP_BYTES)]
        name = f"client-{label}"
        client = self.spawn(name, argv, stdout_pipe=True)
        pids = {"engine": engine_pid, "client": client.pid}
        if relay_pid is not None:
            pids["relay"] = relay_pid
        try:
            line = self._read_line(client, 20)
            if line != "START":
                raise RuntimeError(f"{label}: {line}\n{self.log_tail(name)}")
            before = {k: cpu_seconds(p) for k, p in pids.items()}
            # the client closes its socket before it answers: sample right after
            result = json.loads(self._read_line(client, seconds + 20))
            after = {k: cpu_seconds(p) for k, p in pids.items() if k != "client"}
            client.wait(5)
        finally:
            self.stop(client)
        if "error" in result:
            raise RuntimeError(f"{label}: {result}")
        gb = result["bytes"] / GB
        out: Dict[str, Any] = {
            "bytes": result["bytes"],
            "seconds": round(result["elapsed"], 3),
            "mb_per_s": round(result["bytes"] / MB / result["elapsed"], 1),
            "status": result["status"],
            "eof": result["eof"],
        }
        cpu = {k: after[k] - before[k] for k in after}
        cpu["client"] = result["client_cpu"]  # the client's own os.times() over its window
        for who, secs in cpu.items():
            out[f"{who}_cpu_s"] = round(secs, 3)
            out[f"{who}_cpu_s_per_gb"] = round(secs / gb, 3) if gb else None
            out[f"{who}_cpu_pct"] = round(100 * secs / result["elapsed"], 1)
        return out

    def throughput(self) -> Dict[str, Any]:
        engine, engine_port = self.start_engine("engine-flat", ["--flat-out"])
        results: Dict[str, Any] = {}

        def run(label: str, fn) -> None:
            try:
                results[label] = fn()
            except Exception as exc:  # noqa: BLE001 - one failed row, not the run
                results[label] = {"error": str(exc)}

        def direct() -> Dict[str, Any]:
            urls = engine_getstream(engine_port, secrets.token_hex(20))
            try:
                return self.stream_once("direct", engine_port, urls["playback_url"], None, engine.pid)
            finally:
                engine_stop(engine_port, urls["command_url"])

        def via_socat() -> Dict[str, Any]:
            socat, socat_port = self.start_socat("socat", engine_port)
            urls = engine_getstream(engine_port, secrets.token_hex(20))
            try:
                return self.stream_once("socat", socat_port, urls["playback_url"], socat.pid, engine.pid)
            finally:
                engine_stop(engine_port, urls["command_url"])
                self.stop(socat)

        def via_proxy() -> Dict[str, Any]:
            proxy, proxy_port = self.start_proxy("proxy-flat", engine_port)
            try:
                path = f"/ace/getstream?id={secrets.token_hex(20)}"
                row = self.stream_once("proxy", proxy_port, path, proxy.pid, engine.pid)
                if self.args.profile:
                    results["profile"] = self.profile(proxy.pid, proxy_port)
                return row
            finally:
                self.stop(proxy)

        for label, fn in (("direct", direct), ("socat", via_socat), ("proxy", via_proxy)):
            if label in self.args.paths:
                run(label, fn)
        self.stop(engine)

        ratios: Dict[str, Optional[float]] = {}
        s, p, d = results.get("socat", {}), results.get("proxy", {}), results.get("direct", {})
        if s.get("relay_cpu_s_per_gb") and p.get("relay_cpu_s_per_gb") is not None:
            ratios["proxy_over_socat_cpu_per_gb"] = round(p["relay_cpu_s_per_gb"] / s["relay_cpu_s_per_gb"], 2)
        if s.get("mb_per_s") and p.get("mb_per_s") is not None:
            ratios["proxy_over_socat_throughput"] = round(p["mb_per_s"] / s["mb_per_s"], 3)
        if d.get("mb_per_s") and p.get("mb_per_s") is not None:
            ratios["proxy_over_direct_throughput"] = round(p["mb_per_s"] / d["mb_per_s"], 3)
        if d.get("mb_per_s") and s.get("mb_per_s") is not None:
            ratios["socat_over_direct_throughput"] = round(s["mb_per_s"] / d["mb_per_s"], 3)
        results["ratios"] = ratios
        return results

    def profile(self, pid: int, port: int) -> Dict[str, Any]:
        """Optional (``--profile SECONDS``): py-spy the proxy under the same
        flat-out load, collapsed stacks to bench/results/, top functions by own time."""
        pyspy = ROOT / ".venv/bin/py-spy"
        if not pyspy.exists():
            return {"error": "py-spy not installed in .venv (.venv/bin/pip install py-spy)"}
        RESULTS.mkdir(parents=True, exist_ok=True)
        seconds = self.args.profile
        raw = RESULTS / f"profile-{self.stamp}.txt"
        argv = [sys.executable, __file__, "_client-stream", str(port), f"/ace/getstream?id={secrets.token_hex(20)}",
                str(seconds + 5), str(WARMUP_BYTES)]  # fmt: skip
        client = self.spawn("client-profile", argv, stdout_pipe=True)
        try:
            if self._read_line(client, 20) != "START":
                return {"error": "profile client did not start"}
            cpu0, t0 = cpu_seconds(pid), time.monotonic()
            spy = self.spawn(
                "py-spy",
                [str(pyspy), "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200",
                 "--nolineno", "--format", "raw", "-o", str(raw)],
            )  # fmt: skip
            spy.wait(seconds + 30)
            cpu = cpu_seconds(pid) - cpu0
            wall = time.monotonic() - t0
        finally:
            self.stop(client)
        if spy.returncode != 0 or not raw.exists():
            return {"error": f"py-spy failed ({spy.returncode}): {self.log_tail('py-spy', 5)}"}
        own: Dict[str, int] = {}
        inclusive: Dict[str, int] = {}
        total = other_threads = 0
        for line in raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack:
                continue
            n = int(count)
            frames = stack.split(";")
            if frames[0].startswith("Thread._bootstrap"):
                other_threads += n  # idle thread-pool workers: py-spy cannot tell they wait
                continue
            total += n
            own[frames[-1]] = own.get(frames[-1], 0) + n
            for frame in set(frames):
                inclusive[frame] = inclusive.get(frame, 0) + n
        top = sorted(own.items(), key=lambda kv: -kv[1])[:10]
        return {
            "collapsed_stacks": str(raw),
            "samples": total,
            "other_thread_samples_ignored": other_threads,
            "rate_hz": 200,
            "seconds": seconds,
            "proxy_cpu_pct_while_profiled": round(100 * cpu / wall, 1),
            "top_own": [
                {"function": f, "own_pct": round(100 * n / total, 1), "incl_pct": round(100 * inclusive[f] / total, 1)}
                for f, n in top
            ],
        }

    # -- measurement 2 ---------------------------------------------------------------

    def ttfb(self) -> Dict[str, Any]:
        engine, engine_port = self.start_engine("engine-4M", ["--bitrate", "4M"])
        proxy, proxy_port = self.start_proxy("proxy-ttfb", engine_port)
        argv = [sys.executable, __file__, "_client-ttfb", str(engine_port), str(proxy_port),
                str(self.args.iterations), str(self.args.warmup)]  # fmt: skip
        client = self.spawn("client-ttfb", argv, stdout_pipe=True)
        try:
            raw = json.loads(self._read_line(client, 60 + 2 * self.args.iterations))
            client.wait(5)
        finally:
            self.stop(client)
            self.stop(proxy)
            self.stop(engine)
        out: Dict[str, Any] = {"errors": raw["errors"], "warmup_iterations_discarded": self.args.warmup}
        for name in ("direct", "proxy"):
            samples = [s["ttfb"] * 1000 for s in raw[name]]
            heads = [s["headers"] * 1000 for s in raw[name]]
            if not samples:
                out[name] = {"n": 0}
                continue
            out[name] = {
                "n": len(samples),
                "median_ms": round(statistics.median(samples), 2),
                "p95_ms": round(quantile(samples, 0.95), 2),
                "min_ms": round(min(samples), 2),
                "max_ms": round(max(samples), 2),
                "headers_median_ms": round(statistics.median(heads), 2),
                "samples_ms": [round(x, 3) for x in samples],
            }
            if name == "direct":
                out[name]["json_median_ms"] = round(statistics.median(s["json"] * 1000 for s in raw[name]), 2)
        if out["direct"].get("n") and out["proxy"].get("n"):
            out["difference"] = {
                "median_ms": round(out["proxy"]["median_ms"] - out["direct"]["median_ms"], 2),
                "p95_ms": round(out["proxy"]["p95_ms"] - out["direct"]["p95_ms"], 2),
            }
        if raw["idle_wait"]:
            out["proxy_idle_wait_median_ms"] = round(statistics.median(raw["idle_wait"]) * 1000, 2)
        return out


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------


def render(report: Dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"acexy-tw relay bench  {report['timestamp']}",
        f"machine: nproc={m['nproc']} (usable {m['usable_cpus']}), {m.get('cpu', '?')}, "
        f"{m['implementation']} {m['python']}, Twisted {m.get('twisted', '?')}, socat {m.get('socat', '?')}, "
        f"load avg at start {m['loadavg_at_start'][0]}",
        "",
    ]
    t = report.get("throughput")
    if t:
        lines += [
            f"1. relay throughput: one client, engine flat out, {report['config']['seconds']:g} s window "
            "after the first 1 MB (MB = 10^6 B)",
            f"   {'path':<7} {'MB/s':>8}  {'relay CPU s/GB':>14} {'relay %':>8}  "
            f"{'engine s/GB':>11} {'engine %':>8}  {'client s/GB':>11} {'client %':>8}",
        ]
        for label in ("direct", "socat", "proxy"):
            if label not in t:
                continue
            row = t[label]
            if "error" in row:
                lines.append(f"   {label:<7} ERROR: {row['error'].splitlines()[0]}")
                continue
            lines.append(
                f"   {label:<7} {_fmt(row.get('mb_per_s')):>8}  {_fmt(row.get('relay_cpu_s_per_gb'), '.3f'):>14} "
                f"{_fmt(row.get('relay_cpu_pct')):>8}  {_fmt(row.get('engine_cpu_s_per_gb'), '.3f'):>11} "
                f"{_fmt(row.get('engine_cpu_pct')):>8}  {_fmt(row.get('client_cpu_s_per_gb'), '.3f'):>11} "
                f"{_fmt(row.get('client_cpu_pct')):>8}" + ("  (EOF!)" if row.get("eof") else "")
            )
        r = t.get("ratios", {})
        lines += [
            f"   proxy ÷ socat: CPU per GB ×{_fmt(r.get('proxy_over_socat_cpu_per_gb'), '.2f')}, "
            f"throughput ×{_fmt(r.get('proxy_over_socat_throughput'), '.2f')}; "
            f"throughput ÷ direct: socat ×{_fmt(r.get('socat_over_direct_throughput'), '.2f')}, "
            f"proxy ×{_fmt(r.get('proxy_over_direct_throughput'), '.2f')}",
            "",
        ]
        prof = t.get("profile")
        if prof and "error" in prof:
            lines += [f"   profile: {prof['error']}", ""]
        elif prof:
            lines.append(
                f"   py-spy, proxy under the same load ({prof['samples']} main-thread samples, proxy CPU "
                f"{prof['proxy_cpu_pct_while_profiled']}%; {prof['collapsed_stacks']}): top 10 by own time"
            )
            lines.append(f"   {'own %':>6} {'incl %':>6}  function")
            for item in prof["top_own"]:
                lines.append(f"   {item['own_pct']:>6.1f} {item['incl_pct']:>6.1f}  {item['function']}")
            lines.append("")
    f = report.get("ttfb")
    if f:
        lines += [
            f"2. time to first body byte: engine 4 Mbit/s (25 ms ticks), proxy --linger 0, "
            f"{report['config']['iterations']} fresh ids each ({f['warmup_iterations_discarded']} warm-up discarded)",
            f"   {'path':<17} {'median ms':>9} {'p95 ms':>8} {'min ms':>8} {'max ms':>8}  {'headers median ms':>17}",
        ]
        for label, desc in (("direct", "direct (json+GET)"), ("proxy", "proxy")):
            row = f.get(label, {})
            if not row.get("n"):
                lines.append(f"   {desc:<17} no samples")
                continue
            lines.append(
                f"   {desc:<17} {row['median_ms']:>9.2f} {row['p95_ms']:>8.2f} {row['min_ms']:>8.2f} "
                f"{row['max_ms']:>8.2f}  {row['headers_median_ms']:>17.2f}"
            )
        if "difference" in f:
            d = f["difference"]
            lines.append(f"   proxy − direct: median {d['median_ms']:+.2f} ms, p95 {d['p95_ms']:+.2f} ms")
        if f["errors"]:
            lines.append(f"   {len(f['errors'])} errors, first: {f['errors'][0]}")
        lines.append("")
    if report.get("errors"):
        lines += [f"ERROR: {e}" for e in report["errors"]]
    if report.get("json_path"):
        lines.append(f"JSON: {report['json_path']}")
    return "\n".join(lines)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="acexy-tw relay benchmark (throughput, CPU per GB, time to first byte)")
    parser.add_argument("--seconds", type=float, default=8.0, help="throughput window per path (default 8)")
    parser.add_argument("--iterations", type=int, default=40, help="time-to-first-byte samples per path (default 40)")
    parser.add_argument("--warmup", type=int, default=2, help="extra first-byte iterations run first and discarded")
    parser.add_argument("--json", type=Path, help="where to write the JSON (default bench/results/relay-<timestamp>.json)")
    parser.add_argument("--skip", choices=("throughput", "ttfb"), action="append", default=[], help="skip a part")
    parser.add_argument(
        "--paths", type=lambda t: [x for x in t.split(",") if x], default=["direct", "socat", "proxy"],
        help="throughput paths to measure (default direct,socat,proxy; fanout.py asks for socat alone)",
    )  # fmt: skip
    parser.add_argument(
        "--profile", type=float, default=0, metavar="SECONDS",
        help="also py-spy the proxy under flat-out load for SECONDS (needs py-spy in .venv)",
    )  # fmt: skip
    parser.add_argument("--time-limit", type=int, default=0, metavar="SECONDS",
                        help="abort (killing every child) after this long; default scales with the options, 110 s")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_client-stream":
        client_stream(int(argv[1]), argv[2], float(argv[3]), int(argv[4]))
        return 0
    if argv and argv[0] == "_client-ttfb":
        client_ttfb(int(argv[1]), int(argv[2]), int(argv[3]), int(argv[4]))
        return 0
    args = parse_args(argv)
    stamp = _dt.datetime.now(_dt.timezone.utc)
    args.stamp = stamp.strftime("%Y%m%dT%H%M%SZ")

    def terminated(signum, frame):  # run the finally blocks on SIGTERM too
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminated)

    def out_of_time(signum, frame):
        raise OutOfTime(f"time limit of {limit}s reached")

    # every wait below has its own timeout; this bounds the sum of them
    limit = args.time_limit or int(60 + 3 * (args.seconds + 2) + 0.5 * (args.iterations + args.warmup) + 2 * args.profile)
    signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(limit)
    report: Dict[str, Any] = {
        "timestamp": stamp.isoformat(timespec="seconds"),
        "machine": machine(),
        "config": {"seconds": args.seconds, "iterations": args.iterations, "warmup": args.warmup,
                   "warmup_bytes": WARMUP_BYTES, "recv_buffer": RECV_BUFFER, "socat_block": 65536,
                   "engine_ttfb_bitrate": 4_000_000, "proxy_linger": 0},
        "errors": [],
    }  # fmt: skip
    bench = Bench(args)
    started = time.monotonic()
    try:
        if "throughput" not in args.skip:
            try:
                report["throughput"] = bench.throughput()
            except Exception as exc:  # noqa: BLE001
                report["errors"].append(f"throughput: {exc}")
        if "ttfb" not in args.skip:
            try:
                report["ttfb"] = bench.ttfb()
            except Exception as exc:  # noqa: BLE001
                report["errors"].append(f"ttfb: {exc}")
    except OutOfTime as exc:
        report["errors"].append(str(exc))
    finally:
        signal.alarm(0)
        bench.stop_all()
    report["wall_seconds"] = round(time.monotonic() - started, 1)
    path = args.json or RESULTS / f"relay-{args.stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    report["json_path"] = str(path)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(render(report))
    print(f"wall time {report['wall_seconds']} s")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
