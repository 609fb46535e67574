#!/usr/bin/env python3
"""
Relay benchmark for acexy-tw: how fast, how expensive and how much later than
the engine itself the proxy delivers a stream, against two reference relays
measured in the same run.

    .venv/bin/python bench/relay.py [--runs 3] [--seconds 6] [--bodies chunked,length]
                                    [--paths socat,twisted,proxy] [--iterations 40] [--json PATH]

Every party is its own process: the engine, the relays and the load clients
(this file, re-run in a client mode; raw sockets, standard library only).
Ports are free ones on 127.0.0.1. Every child is killed at the end, whatever
happened.

1. Throughput, one client, engine flat out, ``--seconds`` each. The engine is
   this file's fake engine (``_engine`` mode: the engine's getstream / stat /
   stop contract, and a playback body sent with ``sendall`` from one
   prebuilt 1 MB buffer of TS packets, so it costs next to nothing): the same
   bytes either ``chunked`` (64 KiB chunks, as the simulated engine and
   Twisted's ``Request.write`` send them), with a ``length``
   (Content-Length) or ``close``-delimited. Per body, the paths:
   ``socat`` (``socat -b 65536``, the C reference), ``twisted`` (Twisted's
   own byte relay, ``twistd -n portforward``: the floor of any relay on this
   reactor), ``proxy`` (``twistd -n acexy``, ``/ace/getstream?id=``) and
   optionally ``direct`` (the playback URL itself). MB/s at the client and
   CPU seconds per GB of the relay process (``/proc/<pid>/stat``
   utime+stime, sampled around a window that opens once the first 1 MB has
   arrived), and each figure as a ratio to the Twisted relay's in the same
   run. ``--runs`` repetitions (the order of the paths rotates from one
   repetition to the next); the table gives the median of each figure and of
   each ratio, and every run's values.
2. Time to first body byte, simulated engine rate-limited (4 Mbit/s), proxy
   ``--linger 0``, ``--iterations`` fresh content ids: direct = getstream JSON
   then GET playback (what the proxy must do), proxy = one GET.

MB and GB are 10^6 and 10^9 bytes.  Bytes are counted raw as received (HTTP
headers and chunked framing included).
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
    free_port,
    listening,
    fmt as _fmt,
    http_get,
    machine,
    path_of as _path_of,
    quantile,
    read_head as _read_head,
    request_bytes as _request,
    source_line,
    source_state,
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
# the fake engine (a separate process): the same TS bytes, chunked or not
# ---------------------------------------------------------------------------

#: packets in the buffer the fake engine sends over and over (1,048,476 bytes)
FAKE_PACKETS = 5577
#: chunk size of the chunked body (what Twisted's Request.write of 64 KiB sends)
FAKE_CHUNK = 65536
BODIES = ("chunked", "length", "close")


def fake_ts() -> bytes:
    """FAKE_PACKETS TS packets: sync byte, PID 0x100, a running continuity
    counter, a payload without sync bytes."""
    payload = (bytes(range(0x48, 0xFF)) * 2)[:184]
    return b"".join(bytes([0x47, 0x01, 0x00, 0x10 | (i & 0x0F)]) + payload for i in range(FAKE_PACKETS))


def fake_body(body: str) -> bytes:
    """What one round of the fake engine's playback body is on the wire."""
    ts = fake_ts()
    if body != "chunked":
        return ts
    view = memoryview(ts)
    return b"".join(
        b"%x\r\n%b\r\n" % (len(view[i : i + FAKE_CHUNK]), view[i : i + FAKE_CHUNK]) for i in range(0, len(ts), FAKE_CHUNK)
    )


def _fake_json(sock: socket.socket, doc: Any) -> None:
    body = json.dumps(doc).encode()
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
    sock.sendall(head % len(body) + body)


def _fake_serve(sock: socket.socket, port: int, body: str, wire: bytes) -> None:
    try:
        data = b""
        while b"\r\n\r\n" not in data:
            more = sock.recv(65536)
            if not more:
                return
            data += more
        path = data.split(b"\r\n", 1)[0].split(b" ")[1].decode("latin-1")
        base = f"http://127.0.0.1:{port}/ace"
        if path.startswith("/ace/getstream"):
            query = dict(p.partition("=")[::2] for p in path.partition("?")[2].split("&"))
            tail = f"{query.get('id', 'x')}/{secrets.token_hex(8)}"
            _fake_json(sock, {"response": {
                "playback_url": f"{base}/r/{tail}", "stat_url": f"{base}/stat/{tail}",
                "command_url": f"{base}/cmd/{tail}", "infohash": query.get("id", "x"),
                "playback_session_id": tail, "is_live": 1, "is_encrypted": 0, "client_session_id": -1,
            }, "error": None})  # fmt: skip
        elif path.startswith("/ace/r/"):
            head = b"HTTP/1.1 200 OK\r\nContent-Type: video/MP2T\r\n"
            if body == "chunked":
                head += b"Transfer-Encoding: chunked\r\n"
            elif body == "length":
                head += b"Content-Length: 1000000000000\r\n"
            else:
                head += b"Connection: close\r\n"
            sock.sendall(head + b"\r\n")
            send = sock.sendall
            while True:
                send(wire)
        elif path.startswith("/ace/stat/"):
            _fake_json(sock, {"response": {"status": "dl", "peers": 1, "speed_down": 100000, "speed_up": 10,
                                           "downloaded": 0, "uploaded": 0, "total_progress": 0, "is_live": 1},
                              "error": None})  # fmt: skip
        elif path.startswith("/ace/cmd/"):
            _fake_json(sock, {"response": "ok", "error": None})
        else:  # /webui/api/service?method=get_version, the pool's probe
            _fake_json(sock, {"result": {"code": 3010500, "platform": "linux", "version": "3.1.5"}, "error": None})
    except OSError:
        pass
    finally:
        sock.close()


def fake_engine(body: str) -> None:
    """Serve the engine contract on a free port (printed as ``PORT n``) until killed."""
    import threading

    wire = fake_body(body)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    print(f"PORT {port}", flush=True)
    while True:
        sock, _ = listener.accept()
        threading.Thread(target=_fake_serve, args=(sock, port, body, wire), daemon=True).start()


# ---------------------------------------------------------------------------
# the parent: processes, /proc sampling, measurements
# ---------------------------------------------------------------------------


MEDIAN_KEYS = ("mb_per_s", "relay_cpu_s_per_gb", "relay_cpu_pct", "engine_cpu_s_per_gb", "client_cpu_s_per_gb",
               "cpu_per_gb_over_twisted", "mb_per_s_over_twisted")  # fmt: skip


def medians(runs: List[Dict[str, Any]], paths: List[str]) -> Dict[str, Any]:
    """Per path: the median over the runs of each figure (runs with an error left out)."""
    out: Dict[str, Any] = {}
    for label in paths:
        good = [r[label] for r in runs if label in r and "error" not in r[label]]
        row: Dict[str, Any] = {"n": len(good)}
        for key in MEDIAN_KEYS:
            values = [g[key] for g in good if g.get(key) is not None]
            if values:
                row[key] = round(statistics.median(values), 3)
                row[key + "_all"] = values
        errors = [r[label]["error"] for r in runs if label in r and "error" in r[label]]
        if errors:
            row["errors"] = errors
        out[label] = row
    return out


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

    def start_fake_engine(self, body: str) -> Tuple[Any, int]:
        proc = self.spawn(f"engine-{body}", [sys.executable, __file__, "_engine", body], stdout_pipe=True)
        line = self._read_line(proc, 20)
        if not line.startswith("PORT "):
            raise RuntimeError(f"fake engine ({body}): {line!r}\n{self.log_tail(f'engine-{body}')}")
        return proc, int(line.split()[1])

    def start_twisted_relay(self, name: str, engine_port: int) -> Tuple[Any, int]:
        """``twistd -n portforward``: Twisted's own byte relay (its ProxyServer /
        ProxyClient pair, each transport the other's producer), on a free port."""
        port = free_port()
        argv = [self.twistd, "-n", "--pidfile=", "portforward", "-p", f"tcp:{port}:interface=127.0.0.1",
                "-h", "127.0.0.1", "-d", str(engine_port)]  # fmt: skip
        proc = self.spawn(name, argv)
        self.wait_until(name, proc, lambda: listening(port))
        return proc, port

    def throughput_once(self, body: str, order: List[str]) -> Dict[str, Any]:
        """Every path in ``order`` once, over a fresh fake engine sending ``body``."""
        engine, engine_port = self.start_fake_engine(body)
        rows: Dict[str, Any] = {}
        try:
            for label in order:
                proc = None
                try:
                    if label == "proxy":
                        proc, port = self.start_proxy(f"proxy-{body}", engine_port)
                        path = f"/ace/getstream?id={secrets.token_hex(20)}"
                    else:
                        path = engine_getstream(engine_port, secrets.token_hex(20))["playback_url"]
                        if label == "socat":
                            proc, port = self.start_socat(f"socat-{body}", engine_port)
                        elif label == "twisted":
                            proc, port = self.start_twisted_relay(f"twisted-{body}", engine_port)
                        else:
                            port = engine_port
                    rows[label] = self.stream_once(f"{label}-{body}", port, path, proc.pid if proc else None, engine.pid)
                    if label == "proxy" and self.args.profile and body not in self.profiles:
                        self.profiles[body] = self.profile(proc.pid, port)
                except Exception as exc:  # noqa: BLE001 - one failed row, not the run
                    rows[label] = {"error": str(exc)}
                finally:
                    if proc is not None:
                        self.stop(proc)
        finally:
            self.stop(engine)
        return rows

    def throughput(self) -> Dict[str, Any]:
        paths = [p for p in ("direct", "socat", "twisted", "proxy") if p in self.args.paths]
        self.profiles: Dict[str, Any] = {}
        out: Dict[str, Any] = {"bodies": {}, "runs": self.args.runs, "paths": paths}
        for body in self.args.bodies:
            runs = []
            for i in range(self.args.runs):
                order = paths[i % len(paths):] + paths[: i % len(paths)]  # rotate: drift hits every path alike
                print(f"… throughput, {body} body, run {i + 1}/{self.args.runs}: {', '.join(order)}", flush=True)
                rows = self.throughput_once(body, order)
                ref = rows.get("twisted", {})
                for label, row in rows.items():
                    if "error" in row or "error" in ref or label == "twisted" or not ref:
                        continue
                    if ref.get("relay_cpu_s_per_gb") and row.get("relay_cpu_s_per_gb") is not None:
                        row["cpu_per_gb_over_twisted"] = round(row["relay_cpu_s_per_gb"] / ref["relay_cpu_s_per_gb"], 3)
                    if ref.get("mb_per_s") and row.get("mb_per_s") is not None:
                        row["mb_per_s_over_twisted"] = round(row["mb_per_s"] / ref["mb_per_s"], 3)
                runs.append(rows)
            out["bodies"][body] = {"runs": runs, "median": medians(runs, paths)}
        if self.profiles:
            out["profile"] = self.profiles
        return out

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
        f"load avg at start {m['loadavg_at_start'][0]}, at end {report.get('loadavg_at_end', ['?'])[0]}",
        source_line(report["source"]),
        "",
    ]
    t = report.get("throughput")
    if t:
        lines += [
            f"1. relay throughput: one client, fake engine flat out, {report['config']['seconds']:g} s window "
            f"after the first 1 MB (MB = 10^6 B); median of {t['runs']} run(s), the paths' order rotating",
            "   ratios are to the Twisted relay (twistd portforward) of the same run, then the median taken",
        ]
        for body, result in t["bodies"].items():
            med = result["median"]
            lines += [
                f"   {body} body:",
                f"   {'path':<8} {'MB/s':>7} {'relay CPU s/GB':>14} {'relay %':>8}  {'÷ twisted CPU/GB':>16} "
                f"{'÷ twisted MB/s':>14}  {'engine s/GB':>11}  runs (relay CPU s/GB)",
            ]
            for label in t["paths"]:
                row = med.get(label, {})
                if not row.get("n"):
                    lines.append(f"   {label:<8} ERROR: {(row.get('errors') or ['no run'])[0].splitlines()[0]}")
                    continue
                lines.append(
                    f"   {label:<8} {_fmt(row.get('mb_per_s')):>7} {_fmt(row.get('relay_cpu_s_per_gb'), '.3f'):>14} "
                    f"{_fmt(row.get('relay_cpu_pct')):>8}  {_fmt(row.get('cpu_per_gb_over_twisted'), '.2f'):>16} "
                    f"{_fmt(row.get('mb_per_s_over_twisted'), '.2f'):>14}  {_fmt(row.get('engine_cpu_s_per_gb'), '.3f'):>11}  "
                    + " ".join(f"{v:.3f}" for v in row.get("relay_cpu_s_per_gb_all", []))
                    + (f"  ({len(row['errors'])} failed)" if row.get("errors") else "")
                )
            lines.append("")
        for body, prof in t.get("profile", {}).items():
            if "error" in prof:
                lines += [f"   profile ({body}): {prof['error']}", ""]
                continue
            lines.append(
                f"   py-spy, proxy under the same load, {body} body ({prof['samples']} main-thread samples, proxy CPU "
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
    parser.add_argument("--seconds", type=float, default=6.0, help="throughput window per path and run (default 6)")
    parser.add_argument("--runs", type=int, default=3, help="throughput repetitions; medians reported (default 3)")
    parser.add_argument(
        "--bodies", type=lambda t: [x for x in t.split(",") if x], default=["chunked", "length"],
        help=f"engine bodies to measure, of {','.join(BODIES)} (default chunked,length)",
    )  # fmt: skip
    parser.add_argument("--iterations", type=int, default=40, help="time-to-first-byte samples per path (default 40)")
    parser.add_argument("--warmup", type=int, default=2, help="extra first-byte iterations run first and discarded")
    parser.add_argument("--json", type=Path, help="where to write the JSON (default bench/results/relay-<timestamp>.json)")
    parser.add_argument("--skip", choices=("throughput", "ttfb"), action="append", default=[], help="skip a part")
    parser.add_argument(
        "--paths", type=lambda t: [x for x in t.split(",") if x], default=["socat", "twisted", "proxy"],
        help="throughput paths, of direct,socat,twisted,proxy (default socat,twisted,proxy; fanout.py asks for socat alone)",
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
    if argv and argv[0] == "_engine":
        fake_engine(argv[1])
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
    for body in args.bodies:
        if body not in BODIES:
            raise SystemExit(f"relay.py: unknown body {body!r} (one of {', '.join(BODIES)})")
    rows = args.runs * len(args.bodies) * len(args.paths)
    limit = args.time_limit or int(60 + rows * (args.seconds + 4) + 0.5 * (args.iterations + args.warmup) + 2 * args.profile)
    signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(limit)
    report: Dict[str, Any] = {
        "timestamp": stamp.isoformat(timespec="seconds"),
        "machine": machine(),
        "source": source_state(),
        "config": {"seconds": args.seconds, "runs": args.runs, "bodies": args.bodies, "paths": args.paths,
                   "fake_chunk": FAKE_CHUNK, "iterations": args.iterations, "warmup": args.warmup,
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
    report["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    path = args.json or RESULTS / f"relay-{args.stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    report["json_path"] = str(path)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(render(report))
    print(f"wall time {report['wall_seconds']} s")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
