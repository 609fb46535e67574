#!/usr/bin/env python3
"""
Load clients for the benches: many streaming HTTP clients in one asyncio process.

    .venv/bin/python bench/loadclients.py SPEC.json

Started by :class:`common.LoadClients` (2–3 of these processes per run), never
by hand. Standard library only; each client is a raw TCP socket with an
``asyncio.BufferedProtocol`` (``recv_into`` one reusable buffer per process,
no per-read allocation): it sends ``GET <path>``, parses the status line and
headers, then counts bytes — raw (headers and chunk framing included) and
payload (chunked framing removed) — and records when its first byte and
first body byte arrived.

The spec: ``{"port", "clients": [{"path", "tag"}...], "seconds", "ramp",
"offset"}``. Protocol on stdin/stdout, one line each:

- ``ARMED``  (out): set up, waiting for the start barrier;
- ``GO``     (in):  start. Client ``i`` connects at ``offset + ramp * i / n``
  seconds after GO (the parent interleaves processes so the connects of all
  processes are spread evenly); every client stops ``seconds`` after GO;
- ``READY {...}`` (out): every client has its first body byte, or failed;
- ``STOP``   (in):  stop every client now;
- ``RESULT {...}`` (out): one JSON line with every client's figures, this
  process's CPU seconds and its event-loop lag (a busy client process reads
  late, which would look like a slow proxy).

Times are seconds (``time.monotonic``), relative to the client's own connect
start unless named ``*_at`` (relative to GO).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
from typing import Any, Dict, List, Optional

BUFFER = bytearray(256 * 1024)  # shared: asyncio reads one socket at a time
VIEW = memoryview(BUFFER)
HEAD_LIMIT = 64 * 1024


class Client(asyncio.BufferedProtocol):
    def __init__(self, spec: Dict[str, Any], index: int, go: float, runner: "Runner") -> None:
        self.tag = spec.get("tag")
        self.path = spec["path"]
        self.method = spec.get("method", "GET")
        self.index = index
        self.go = go
        self.runner = runner
        self.transport: Optional[asyncio.Transport] = None
        self.t0 = 0.0  # connect start
        self.connected = None  # seconds after t0
        self.first_byte = None
        self.headers_at = None
        self.first_body = None
        self.status: Optional[int] = None
        self.raw = 0
        self.payload = 0
        self.end: Optional[str] = None
        self.end_at: Optional[float] = None
        self.stopping = False
        self.ready = False
        self._head = b""
        self._chunked = False
        self._in_body = False
        self._remaining = 0  # chunk bytes still to come
        self._line = b""  # a partial chunk-size line
        self._done_body = False

    # -- asyncio.BufferedProtocol -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.connected = time.monotonic() - self.t0
        port = self.runner.port
        request = (
            f"{self.method} {self.path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "User-Agent: acexy-bench-load/1\r\nAccept: */*\r\n\r\n"
        )
        transport.write(request.encode("ascii"))  # type: ignore[attr-defined]

    def get_buffer(self, sizehint: int) -> memoryview:
        return VIEW

    def buffer_updated(self, nbytes: int) -> None:
        if self.first_byte is None:
            self.first_byte = time.monotonic() - self.t0
        self.raw += nbytes
        if self._in_body:
            self._body(0, nbytes)
            return
        self._head += bytes(VIEW[:nbytes])
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > HEAD_LIMIT:
                self._finish("error: headers too long")
            return
        head, rest = self._head[:end], self._head[end + 4 :]
        self._head = b""
        self.headers_at = time.monotonic() - self.t0
        lines = head.decode("latin-1").split("\r\n")
        try:
            self.status = int(lines[0].split()[1])
        except (IndexError, ValueError):
            self._finish(f"error: bad status line {lines[0][:60]!r}")
            return
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "transfer-encoding" and "chunked" in value.lower():
                self._chunked = True
        self._in_body = True
        if self.method == "HEAD":
            self._mark_ready()
            return
        if rest:
            BUFFER[: len(rest)] = rest
            self._body(0, len(rest))

    def _body(self, pos: int, end: int) -> None:
        """Count the body bytes in ``BUFFER[pos:end]``."""
        if not self._chunked:
            if end > pos:
                self._got_payload(end - pos)
            return
        while pos < end:
            if self._remaining:
                take = min(self._remaining, end - pos)
                self._remaining -= take
                pos += take
                self._got_payload(take)
                continue
            nl = BUFFER.find(b"\n", pos, end)
            if nl < 0:
                self._line += bytes(BUFFER[pos:end])
                return
            line = (self._line + bytes(BUFFER[pos:nl])).strip()
            self._line = b""
            pos = nl + 1
            if not line:
                continue  # the CRLF after a chunk's data
            try:
                size = int(line.split(b";")[0], 16)
            except ValueError:
                self._finish(f"error: bad chunk size {line[:40]!r}")
                return
            if size == 0:
                self._done_body = True
                return
            self._remaining = size

    def _got_payload(self, n: int) -> None:
        self.payload += n
        if self.first_body is None:
            self.first_body = time.monotonic() - self.t0
            self._mark_ready()

    def _mark_ready(self) -> None:
        if not self.ready:
            self.ready = True
            self.runner.client_ready()

    def eof_received(self) -> Optional[bool]:
        self._finish("eof (complete)" if self._done_body else "eof")
        return None

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self.end is None:
            if self.stopping:
                self._finish("stopped")
            else:
                self._finish(f"reset: {type(exc).__name__}" if exc else ("eof (complete)" if self._done_body else "eof"))

    # -- run ------------------------------------------------------------------------

    def _finish(self, why: str) -> None:
        if self.end is None:
            self.end = why
            self.end_at = time.monotonic() - self.go
            if self.transport is not None and not self.stopping:
                self.transport.abort()
            self._mark_ready()

    def stop(self) -> None:
        if self.end is None:
            self.stopping = True
            self.end = "stopped"
            self.end_at = time.monotonic() - self.go
            if self.transport is not None:
                self.transport.close()
            self._mark_ready()

    def result(self) -> Dict[str, Any]:
        r = lambda x: None if x is None else round(x, 6)  # noqa: E731
        return {
            "tag": self.tag,
            "status": self.status,
            "start_at": r(self.t0 - self.go),
            "connect": r(self.connected),
            "first_byte": r(self.first_byte),
            "headers": r(self.headers_at),
            "first_body": r(self.first_body),
            "raw": self.raw,
            "payload": self.payload,
            "end": self.end,
            "end_at": r(self.end_at),
        }


class Runner:
    def __init__(self, spec: Dict[str, Any]) -> None:
        self.spec = spec
        self.port = int(spec["port"])
        self.clients: List[Client] = []
        self.pending = len(spec["clients"])
        self.stop_event: Optional[asyncio.Event] = None
        self.lags: List[float] = []

    def client_ready(self) -> None:
        self.pending -= 1
        if self.pending == 0:
            ok = sum(1 for c in self.clients if c.first_body is not None or (c.method == "HEAD" and c.status))
            print("READY " + json.dumps({"ok": ok, "failed": len(self.clients) - ok}), flush=True)

    async def connect(self, client: Client, delay: float) -> None:
        if delay > 0:
            await asyncio.sleep(delay)
        if self.stop_event.is_set():
            client.end = "not started"
            client._mark_ready()
            return
        loop = asyncio.get_running_loop()
        client.t0 = time.monotonic()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", self.port)), 30)
            await loop.create_connection(lambda: client, sock=sock)
        except Exception as exc:  # noqa: BLE001 - reported per client
            sock.close()
            client._finish(f"connect failed: {type(exc).__name__}: {exc}")

    async def watch_stdin(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while True:
            line = await reader.readline()
            if not line or line.strip() == b"STOP":
                self.stop_event.set()
                return

    async def lag_probe(self) -> None:
        interval = 0.1
        while not self.stop_event.is_set():
            t = time.monotonic()
            await asyncio.sleep(interval)
            self.lags.append(max(0.0, time.monotonic() - t - interval))

    async def run(self, go: float) -> Dict[str, Any]:
        self.stop_event = asyncio.Event()
        spec = self.spec
        n = max(1, len(spec["clients"]))
        ramp, offset = float(spec.get("ramp", 0)), float(spec.get("offset", 0))
        self.clients = [Client(c, i, go, self) for i, c in enumerate(spec["clients"])]
        tasks = [asyncio.ensure_future(self.watch_stdin()), asyncio.ensure_future(self.lag_probe())]
        for i, client in enumerate(self.clients):
            tasks.append(asyncio.ensure_future(self.connect(client, offset + ramp * i / n - (time.monotonic() - go))))
        try:
            await asyncio.wait_for(self.stop_event.wait(), max(0.0, go + float(spec["seconds"]) - time.monotonic()))
        except asyncio.TimeoutError:
            pass
        self.stop_event.set()
        for client in self.clients:
            client.stop()
        await asyncio.sleep(0.05)  # let the closes go out
        for t in tasks:
            t.cancel()
        lags = sorted(self.lags) or [0.0]
        return {
            "lag_max_ms": round(lags[-1] * 1000, 1),
            "lag_p95_ms": round(lags[int(0.95 * (len(lags) - 1))] * 1000, 1),
        }


def main() -> int:
    spec = json.loads(open(sys.argv[1]).read())
    runner = Runner(spec)
    print("ARMED", flush=True)
    line = sys.stdin.readline()
    if line.strip() != "GO":
        return 1
    go = time.monotonic()
    cpu0 = os.times()
    extra = asyncio.run(runner.run(go))
    cpu1 = os.times()
    out = {
        "clients": [c.result() for c in runner.clients],
        "cpu_s": round((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system), 3),
        "wall_s": round(time.monotonic() - go, 3),
        **extra,
    }
    print("RESULT " + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
