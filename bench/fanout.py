#!/usr/bin/env python3
"""
Fan-out benchmark for acexy-tw: one content, many players.

    .venv/bin/python bench/fanout.py [--clients 50,200,500] [--seconds 20] [--bitrate 8M]

For each client count N: a fresh simulated engine (``bench/simengine.py``,
rate-limited to ``--bitrate``) and a fresh proxy (``twistd -n --pidfile=
acexy``, default settings); N load clients (``bench/loadclients.py``: asyncio,
raw sockets) in ``--procs`` (2–3) processes released by one start barrier, all
asking ``/ace/getstream?id=<one content>`` and reading for ``--seconds``.
Reported per N: proxy CPU % and CPU seconds per GB delivered, each client's
payload bytes ÷ the bytes the engine sent for the content in the same window,
clients that got ≥ 90 % of them, time to the first body byte (median/p95),
proxy peak RSS (VmHWM) and engine sessions opened (proxy status, proxy
metrics and the engine's own getstream count: must be 1).

``bench/contents.py`` runs the same measurement with 20 contents × 5 clients.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py

from common import (  # noqa: E402
    GB,
    MB,
    MIB,
    Children,
    LoadClients,
    OutOfTime,
    RESULTS,
    content_ids,
    cpu_seconds,
    fmt,
    http_json,
    install_limits,
    listen_backlog,
    machine,
    machine_line,
    peak_rss_kib,
    proxy_metrics,
    rss_kib,
    source_line,
    source_state,
    summary,
    tcp_ext_counters,
    timestamp,
    finish,
)

GOOD_RATIO = 0.90


def parse_bitrate(text: str) -> int:
    from acexy_tw.sim.engine import parse_bitrate as parse

    return parse(text)


def run_scenario(
    children: Children,
    name: str,
    *,
    contents: int,
    per_content: int,
    bitrate: str,
    seconds: float,
    procs: int,
    ramp: float,
    proxy_args: List[str],
    backlog: Optional[int] = None,
    proxy_env: Optional[Dict[str, str]] = None,
) -> Dict[str, Any]:
    """One measurement: K contents × M clients for ``seconds``; fresh engine and proxy."""
    engine, engine_port, stats_port = children.start_stats_engine(f"engine-{name}", ["--bitrate", bitrate])
    proxy, proxy_port = children.start_proxy(f"proxy-{name}", engine_port, proxy_args, backlog=backlog, env=proxy_env)
    ids = content_ids(contents)
    n = contents * per_content
    # round-robin over the contents, so every process and every part of the
    # ramp carries every content
    specs = [{"path": f"/ace/getstream?id={ids[j % contents]}", "tag": j % contents} for j in range(n)]
    load = LoadClients(children, f"clients-{name}", proxy_port, specs, procs=procs, seconds=seconds, ramp=ramp)
    try:
        rss_idle = rss_kib(proxy.pid)
        backlog_limit = listen_backlog(proxy_port)
        load.start()
        net0 = tcp_ext_counters()
        pids = {"proxy": proxy.pid, "engine": engine.pid}
        cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
        go = load.go()
        # the proxy's view, just before the end of the window
        time.sleep(max(0.0, go + seconds - 1.0 - time.monotonic()))
        status = http_json(proxy_port, "/ace/status", timeout=10)
        time.sleep(max(0.0, go + seconds - time.monotonic()))
        cpu1 = {k: cpu_seconds(p) for k, p in pids.items()}
        wall = time.monotonic() - go
        engine_end = http_json(stats_port, "/", timeout=10)
        rss_end = rss_kib(proxy.pid)
        result = load.results(timeout=60)
        net1 = tcp_ext_counters()
        metrics = proxy_metrics(proxy_port, timeout=10)
        hwm = peak_rss_kib(proxy.pid)
        engine_after = http_json(stats_port, "/", timeout=10)
    finally:
        children.stop(proxy)
        children.stop(engine)

    clients = result["clients"]
    by_content = {s["content_key"]: s["bytes_sent"] for s in engine_end["sessions"]}
    engine_bytes = [by_content.get(ids[c["tag"]], 0) for c in clients]
    ratios = [c["payload"] / e if e else 0.0 for c, e in zip(clients, engine_bytes)]
    raw = sum(c["raw"] for c in clients)
    payload = sum(c["payload"] for c in clients)
    cpu = {k: cpu1[k] - cpu0[k] for k in cpu1}
    ttfb = summary(c["first_body"] * 1000 for c in clients if c["first_body"] is not None)
    connect = summary(c["connect"] * 1000 for c in clients if c["connect"] is not None)
    bad = [c for c in clients if c["status"] != 200 or c["end"] != "stopped"]
    ends: Dict[str, int] = {}
    for c in clients:
        key = f"{c['status']} {c['end']}"
        ends[key] = ends.get(key, 0) + 1
    sessions = {
        "proxy_status_streams": status.get("streams"),
        "proxy_status_clients": status.get("clients"),
        "proxy_metrics_started": metrics.get("acexy_engine_sessions_started_total", metrics.get("acexy_engine_sessions_started")),
        "engine_getstream_calls": engine_after["getstream_calls"],
        "engine_sessions": len(engine_after["sessions"]),
    }
    sessions["ok"] = all(
        v == contents
        for k, v in sessions.items()
        if k in ("proxy_status_streams", "proxy_metrics_started", "engine_getstream_calls")
    )
    out: Dict[str, Any] = {
        "contents": contents,
        "clients_per_content": per_content,
        "clients": n,
        "bitrate": bitrate,
        "window_s": round(wall, 3),
        "client_procs": load.procs,
        "ramp_s": ramp,
        "delivered_raw_bytes": raw,
        "delivered_payload_bytes": payload,
        "delivered_mb_per_s": round(raw / MB / wall, 2),
        "engine_bytes_per_content": {str(i): by_content.get(cid, 0) for i, cid in enumerate(ids)},
        "engine_mb_per_s_per_content": round(statistics.mean(by_content.get(cid, 0) for cid in ids) / MB / wall, 3),
        "proxy_cpu_s": round(cpu["proxy"], 3),
        "proxy_cpu_pct": round(100 * cpu["proxy"] / wall, 1),
        "proxy_cpu_s_per_gb": round(cpu["proxy"] / (raw / GB), 3) if raw else None,
        "engine_cpu_pct": round(100 * cpu["engine"] / wall, 1),
        "clients_cpu_pct": round(100 * result["cpu_s"] / wall, 1),
        "client_loop_lag_p95_ms": max(p["lag_p95_ms"] for p in result["procs"]),
        "client_loop_lag_max_ms": max(p["lag_max_ms"] for p in result["procs"]),
        "ratio": {k: (round(v, 4) if v is not None else None) for k, v in summary(ratios).items()},
        "clients_ge_90pct": sum(1 for r in ratios if r >= GOOD_RATIO),
        "mean_payload_mb_per_client": round(payload / MB / n, 3),
        "ttfb_ms": {k: (round(v, 2) if v is not None else None) for k, v in ttfb.items()},
        "connect_ms": {k: (round(v, 2) if v is not None else None) for k, v in connect.items()},
        "listen_backlog": backlog_limit,
        "listen_overflows": {k: net1.get(k, 0) - net0.get(k, 0) for k in net0},
        "clients_connect_over_500ms": sum(1 for c in clients if c["connect"] is not None and c["connect"] > 0.5),
        "proxy_rss_idle_mib": round(rss_idle / 1024, 1),
        "proxy_rss_end_mib": round(rss_end / 1024, 1),
        "proxy_peak_rss_mib": round(hwm / 1024, 1),
        "sessions": sessions,
        "clients_cut": metrics.get("acexy_clients_cut_total", metrics.get("acexy_clients_cut")),
        "failed_clients": len(bad),
        "client_ends": ends,
        "proxy_backlog_bytes_at_end": sum(
            cl.get("backlog", 0) for s in status.get("sessions", []) for cl in s.get("client_list", [])
        ),
        "samples": [
            {**c, "ratio": round(r, 4), "engine_bytes": e} for c, r, e in zip(clients, ratios, engine_bytes)
        ],
    }
    out["bottleneck"] = bottleneck(out)
    return out


def socat_reference(stamp: str, seconds: float = 5.0, runs: int = 3) -> Dict[str, Any]:
    """
    socat relaying one flat-out chunked playback (``bench/relay.py --paths
    socat --bodies chunked --runs 3``), measured in this run, before the
    fan-out runs and never during them: the CPU per GB the issue's fan-out
    target is a multiple of (the median of ``runs``).
    """
    out = RESULTS / f"socat-reference-{stamp}.json"
    argv = [sys.executable, str(Path(__file__).with_name("relay.py")), "--skip", "ttfb", "--paths", "socat",
            "--bodies", "chunked", "--runs", str(runs), "--seconds", str(seconds), "--json", str(out)]  # fmt: skip
    try:
        subprocess.run(argv, capture_output=True, text=True, timeout=60 + runs * (seconds + 15), check=False)
        row = json.loads(out.read_text())["throughput"]["bodies"]["chunked"]["median"]["socat"]
    except (OSError, ValueError, KeyError, subprocess.TimeoutExpired) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    if not row.get("n"):
        return {"error": "; ".join(row.get("errors", ["no socat run"]))}
    return {
        "socat_cpu_s_per_gb": row["relay_cpu_s_per_gb"],
        "socat_cpu_s_per_gb_runs": row.get("relay_cpu_s_per_gb_all"),
        "socat_mb_per_s": row["mb_per_s"],
        "json": str(out),
    }


def bottleneck(row: Dict[str, Any]) -> str:
    """A one-line reading of the CPU figures (2 cores shared by everyone)."""
    cores = len(os.sched_getaffinity(0))
    total = row["proxy_cpu_pct"] + row["engine_cpu_pct"] + row["clients_cpu_pct"]
    notes = []
    if row["proxy_cpu_pct"] >= 90:
        notes.append("proxy CPU-bound (one core: it is single-threaded)")
    if total >= 0.9 * 100 * cores:
        notes.append(f"machine saturated ({total:.0f}% of {100 * cores}%)")
    if row["client_loop_lag_p95_ms"] >= 50:
        notes.append(f"load clients lagging (loop lag p95 {row['client_loop_lag_p95_ms']:g} ms)")
    if not notes:
        notes.append(f"no saturation ({total:.0f}% of {100 * cores}% CPU in use)")
    return "; ".join(notes)


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------


def render_rows(rows: List[Dict[str, Any]], label: str) -> List[str]:
    lines = [
        f"   {label:>9} {'MB/s out':>9} {'proxy %':>8} {'proxy s/GB':>10} {'engine %':>8} {'clients %':>9}  "
        f"{'cut':>4} {'failed':>6}  bottleneck"
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"   {row['label']:>9} ERROR: {row['error'].splitlines()[0]}")
            continue
        lines.append(
            f"   {row['label']:>9} {row['delivered_mb_per_s']:>9.1f} {row['proxy_cpu_pct']:>8.1f} "
            f"{fmt(row['proxy_cpu_s_per_gb'], '.3f'):>10} {row['engine_cpu_pct']:>8.1f} {row['clients_cpu_pct']:>9.1f}  "
            f"{fmt(row['clients_cut'], '.0f'):>4} {row['failed_clients']:>6}  {row['bottleneck']}"
        )
    lines += [
        "",
        f"   {label:>9} {'ratio med':>9} {'ratio min':>9} {'≥90%':>9}  {'TTFB med':>8} {'TTFB p95':>8} "
        f"{'conn p95':>8} {'conn max':>8}  {'RSS idle':>8} {'peak RSS':>8}  sessions status/metrics/getstream",
    ]
    for row in rows:
        if "error" in row:
            continue
        s = row["sessions"]
        sess = (
            f"{s['proxy_status_streams']}/{fmt(s['proxy_metrics_started'], '.0f')}/{s['engine_getstream_calls']}"
            f" {'OK' if s['ok'] else 'WRONG (expected ' + str(row['contents']) + ')'}"
        )
        lines.append(
            f"   {row['label']:>9} {fmt(row['ratio']['median'], '.3f'):>9} {fmt(row['ratio']['min'], '.3f'):>9} "
            f"{str(row['clients_ge_90pct']) + '/' + str(row['clients']):>9}  "
            f"{fmt(row['ttfb_ms']['median'], '.1f'):>8} {fmt(row['ttfb_ms']['p95'], '.1f'):>8} "
            f"{fmt(row['connect_ms']['p95'], '.1f'):>8} {fmt(row['connect_ms']['max'], '.1f'):>8}  "
            f"{row['proxy_rss_idle_mib']:>8.1f} {row['proxy_peak_rss_mib']:>8.1f}  {sess}"
        )
    for row in rows:
        if "error" not in row and row["clients_connect_over_500ms"]:
            lines.append(
                f"   {row['label']}: {row['clients_connect_over_500ms']} clients took > 0.5 s to connect; proxy listen "
                f"queue limit {fmt(row['listen_backlog'], 'd')}; kernel ListenOverflows +{row['listen_overflows'].get('ListenOverflows', '?')} "
                "during the run (system-wide): SYNs dropped on a full accept queue are retried after 1 s"
            )
    odd = [(row["label"], row["client_ends"]) for row in rows if "error" not in row and row["failed_clients"]]
    for lab, ends in odd:
        lines.append(f"   {lab}: client endings (status end → count): {ends}")
    return lines


def render(report: Dict[str, Any], title: str, label: str) -> str:
    cfg = report["config"]
    lines = [
        f"acexy-tw {title}  {report['timestamp']}",
        machine_line(report["machine"]),
        source_line(report["source"]),
        f"load: {cfg['procs']} client processes (asyncio, raw sockets) started by one barrier; the clients share "
        f"the {report['machine']['usable_cpus']} cores with the proxy and the engine",
        f"engine: simulated, {cfg['bitrate']}bit/s per content; window {cfg['seconds']:g} s from the barrier"
        + (f", connects spread over {cfg['ramp']:g} s" if cfg["ramp"] else ", every client connects at once")
        + f"; proxy: twistd -n acexy {' '.join(cfg['proxy_args']) or '(defaults)'}"
        + (f", listen backlog={cfg['listen_backlog']}" if cfg.get("listen_backlog") else ", listen backlog the proxy's default"),
        "MB = 10^6 B. 'MB/s out' and s/GB: raw bytes the clients received (headers and chunk framing included). "
        "ratio: a client's payload ÷ the engine's bytes for its content in the window. TTFB: connect start → "
        "first body byte (ms). RSS in MiB (peak = VmHWM).",
        "",
    ]
    lines += render_rows(report["runs"], label)
    ref = report.get("reference", {})
    if ref.get("socat_cpu_s_per_gb"):
        runs = ", ".join(f"{v:.3f}" for v in ref.get("socat_cpu_s_per_gb_runs") or [])
        lines += ["", f"   socat relaying one flat-out stream, same run: {ref['socat_cpu_s_per_gb']:.3f} CPU s/GB "
                      f"(median of {runs})"]  # fmt: skip
    summary = report.get("summary", {})
    if summary.get("labels"):
        lines += ["", f"   {'median of runs':<14} {'proxy s/GB':>10} {'÷ socat':>8} {'proxy %':>8} {'TTFB med':>8} "
                      f"{'TTFB p95':>8}  per run: ÷ socat; ≥90%"]  # fmt: skip
        for label, row in summary["labels"].items():
            per_run = " ".join("—" if v is None else f"{v:.2f}" for v in row["proxy_over_socat_relay_all"])
            lines.append(
                f"   {label:<14} {fmt(row['proxy_cpu_s_per_gb'], '.3f'):>10} {fmt(row['proxy_over_socat_relay'], '.2f'):>8} "
                f"{fmt(row['proxy_cpu_pct']):>8} {fmt(row['ttfb_median_ms']):>8} {fmt(row['ttfb_p95_ms']):>8}  "
                f"{per_run}; {' '.join(str(v) for v in row['clients_ge_90pct'])}"
            )
        for step, added in summary.get("added_ttfb_ms", {}).items():
            lines.append(
                f"   {step}: TTFB added by coalescing (median of on − off, per run): {added['median']:+.1f} ms "
                f"({', '.join(f'{v:+.1f}' for v in added['runs'])})"
            )
    lines.append("")
    for e in report.get("errors", []):
        lines.append(f"ERROR: {e}")
    if report.get("json_path"):
        lines.append(f"JSON: {report['json_path']}")
    return "\n".join(lines)


def parse_counts(text: str) -> List[int]:
    return [int(x) for x in text.replace(" ", "").split(",") if x]


def common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=20.0, help="measurement window per run (default 20)")
    parser.add_argument("--procs", type=int, default=2, choices=(2, 3), help="load client processes (2 or 3)")
    parser.add_argument("--ramp", type=float, default=0.0, help="spread the connects over this many seconds (default 0: all at once)")
    parser.add_argument("--proxy-arg", action="append", default=[], metavar="ARG",
                        help="extra twistd acexy option (repeat: --proxy-arg=--buffer-size --proxy-arg=1MiB)")  # fmt: skip
    parser.add_argument("--backlog", type=int, default=None,
                        help="proxy listen queue: --listen tcp:PORT:interface=127.0.0.1:backlog=N (default: the proxy's own, 1024)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="where to write the JSON (default bench/results/<name>-<timestamp>.json)")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the socat relay reference measured first (~15 s)")  # fmt: skip
    parser.add_argument("--time-limit", type=int, default=0, metavar="SECONDS", help="abort after this long (default scales)")


def summarise(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Per label, the median over the runs of proxy s/GB, its ratio to the
    socat relay and the TTFB median; per step measured with coalescing on and
    off, the TTFB coalescing adds (on − off in each run, then the median)."""
    out: Dict[str, Any] = {"labels": {}, "added_ttfb_ms": {}}
    good = [r for r in rows if "error" not in r]
    for label in dict.fromkeys(r["label"] for r in good):
        mine = [r for r in good if r["label"] == label]

        def med(values: List[Optional[float]]) -> Optional[float]:
            values = [v for v in values if v is not None]
            return round(statistics.median(values), 3) if values else None

        out["labels"][label] = {
            "runs": len(mine),
            "proxy_cpu_s_per_gb": med([r["proxy_cpu_s_per_gb"] for r in mine]),
            "proxy_cpu_s_per_gb_all": [r["proxy_cpu_s_per_gb"] for r in mine],
            "proxy_over_socat_relay": med([r.get("proxy_over_socat_relay") for r in mine]),
            "proxy_over_socat_relay_all": [r.get("proxy_over_socat_relay") for r in mine],
            "ttfb_median_ms": med([r["ttfb_ms"]["median"] for r in mine]),
            "ttfb_p95_ms": med([r["ttfb_ms"]["p95"] for r in mine]),
            "clients_ge_90pct": [r["clients_ge_90pct"] for r in mine],
            "proxy_cpu_pct": med([r["proxy_cpu_pct"] for r in mine]),
        }
    for step in dict.fromkeys(r["step"] for r in good):
        added = []
        for run in dict.fromkeys(r["run"] for r in good):
            on = [r for r in good if r["step"] == step and r["run"] == run and r["coalescing"] == "on"]
            off = [r for r in good if r["step"] == step and r["run"] == run and r["coalescing"] == "off"]
            if on and off and on[0]["ttfb_ms"]["median"] is not None and off[0]["ttfb_ms"]["median"] is not None:
                added.append(round(on[0]["ttfb_ms"]["median"] - off[0]["ttfb_ms"]["median"], 2))
        if added:
            out["added_ttfb_ms"][step] = {"median": round(statistics.median(added), 2), "runs": added}
    return out


def run_main(
    args: argparse.Namespace,
    *,
    name: str,
    title: str,
    label: str,
    plan: List[Dict[str, Any]],
) -> int:
    iso, stamp = timestamp()
    per_run = args.seconds + 60
    repeats = getattr(args, "runs", 1) * (2 if getattr(args, "coalescing", "on") == "both" else 1)
    limit = args.time_limit or int(30 + repeats * len(plan) * per_run + (0 if args.no_reference else 150))
    install_limits(limit)
    report: Dict[str, Any] = {
        "timestamp": iso,
        "machine": machine(),
        "source": source_state(),
        "config": {
            "seconds": args.seconds,
            "procs": args.procs,
            "ramp": args.ramp,
            "bitrate": plan[0]["bitrate"] if plan else None,
            "proxy_args": args.proxy_arg,
            "listen_backlog": args.backlog,
            "runs": getattr(args, "runs", 1),
            "coalescing": getattr(args, "coalescing", "on"),
            "time_limit_s": limit,
            "plan": [{k: v for k, v in p.items() if k != "label"} for p in plan],
        },
        "runs": [],
        "errors": [],
    }
    children = Children()
    started = time.monotonic()
    if not args.no_reference:
        print("… socat relay reference (bench/relay.py --paths socat --bodies chunked --runs 3)", flush=True)
        report["reference"] = socat_reference(stamp)
        if "error" in report["reference"]:
            report["errors"].append(f"socat reference: {report['reference']['error']}")
    runs = getattr(args, "runs", 1)
    variants = {"on": ["on"], "off": ["off"], "both": ["off", "on"]}[getattr(args, "coalescing", "on")]
    try:
        for i in range(runs):
            for step in plan:
                for variant in variants:
                    label = step["label"] + (" off" if variant == "off" and len(variants) > 1 else "")
                    print(f"… run {i + 1}/{runs}, {label}: {step['contents']} content(s) × {step['per_content']} "
                          f"client(s), coalescing {variant}", flush=True)  # fmt: skip
                    try:
                        row = run_scenario(
                            children,
                            label.replace(" ", ""),
                            contents=step["contents"],
                            per_content=step["per_content"],
                            bitrate=step["bitrate"],
                            seconds=args.seconds,
                            procs=args.procs,
                            ramp=args.ramp,
                            proxy_args=args.proxy_arg,
                            backlog=args.backlog,
                            proxy_env={"ACEXY_COALESCE_DELAY": "0"} if variant == "off" else None,  # the setting, from the environment
                        )
                    except Exception as exc:  # noqa: BLE001 - one failed row, not the run
                        row = {"error": f"{type(exc).__name__}: {exc}"}
                        report["errors"].append(f"{label}: {row['error']}")
                    row.update(label=label, run=i + 1, coalescing=variant, step=step["label"])
                    report["runs"].append(row)
    except OutOfTime as exc:
        report["errors"].append(str(exc))
    finally:
        signal.alarm(0)
        children.stop_all()
    socat = report.get("reference", {}).get("socat_cpu_s_per_gb")
    for row in report["runs"]:
        if socat and row.get("proxy_cpu_s_per_gb") is not None:
            row["proxy_over_socat_relay"] = round(row["proxy_cpu_s_per_gb"] / socat, 2)
    report["summary"] = summarise(report["runs"])
    finish(report, args.json, name, stamp, started, render(report, title, label))
    failed = report["errors"] or any(not r.get("sessions", {}).get("ok", False) for r in report["runs"])
    return 1 if failed else 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="acexy-tw fan-out bench: one content, N players")
    parser.add_argument("--clients", type=parse_counts, default=[50, 200, 500],
                        help="comma-separated client counts, one run each (default 50,200,500)")  # fmt: skip
    parser.add_argument("--bitrate", default="8M", help="engine bitrate (default 8M)")
    parser.add_argument("--runs", type=int, default=1, help="repeat the whole plan; medians reported (default 1)")
    parser.add_argument(
        "--coalescing", choices=("on", "off", "both"), default="on",
        help="the players' send coalescing (ACEXY_COALESCE_DELAY=0 turns it off): on (default), off, "
             "or both, each client count measured off then on in every run",
    )  # fmt: skip
    common_args(parser)
    args = parser.parse_args(argv)
    parse_bitrate(args.bitrate)
    plan = [
        {"label": str(n), "contents": 1, "per_content": n, "bitrate": args.bitrate} for n in args.clients
    ]
    return run_main(args, name="fanout", title="fan-out bench: one content, N clients", label="clients", plan=plan)


if __name__ == "__main__":
    sys.exit(main())
