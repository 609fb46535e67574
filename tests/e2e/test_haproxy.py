"""
The shipped ``etc/haproxy/haproxy.cfg`` really keeps one content on one
instance: one simulated engine, two ``twistd acexy`` instances, and Debian's
``haproxy`` running that file (only its ports substituted). Players of the same
content with different extra parameters (``pid``, selector name, case) share
one engine session on one instance; different contents do spread over both.

Plain subprocesses and blocking HTTP (no reactor needed). Every wait has a
deadline and waits for an event: a line in a child's output (read by a thread
that wakes the waiters as it arrives) or, for HAProxy starting, its port
answering. Every process is killed in ``finally``.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CFG = ROOT / "etc" / "haproxy" / "haproxy.cfg"
TWISTD = str(Path(sys.executable).with_name("twistd"))
HOST = "127.0.0.1"
STARTUP = 20  # seconds, per readiness wait
READ = 188 * 64  # a few whole TS packets per player
POLL = 0.05  # seconds between checks of a condition no child announces (a port answering)

#: notified whenever any child writes output or exits
ACTIVITY = threading.Condition()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("ACEXY_")}


class WaitTimeout(AssertionError):
    pass


def until(predicate, timeout: float = 10, what: str = "condition", interval: float = POLL):
    """``predicate()``'s first true result, checked again whenever a child
    writes output or exits, and at least every ``interval`` seconds; fails
    after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        with ACTIVITY:
            seen = Child.activity
        result = predicate()
        if result:
            return result
        left = deadline - time.monotonic()
        if left <= 0:
            raise WaitTimeout(f"timed out waiting for {what}")
        with ACTIVITY:
            ACTIVITY.wait_for(lambda: Child.activity != seen, timeout=min(interval, left))


class Child:
    """A child process; a thread reads its output (kept in memory and in a
    log file) and wakes whoever waits for it."""

    #: bumped (under ACTIVITY) on every chunk of output and every exit
    activity = 0

    def __init__(self, name: str, argv: list[str], logdir: Path) -> None:
        self.name = name
        self.log = logdir / f"{name}.log"
        self._out = open(self.log, "wb")
        self._buffer = bytearray()
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=str(ROOT), env=clean_env()
        )
        self._reader = threading.Thread(target=self._read, name=f"{name} output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        fd = self.proc.stdout.fileno()
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                self.proc.wait()  # the output ends as the child exits: let waiters see its status
            with ACTIVITY:
                if chunk:
                    self._buffer += chunk
                    self._out.write(chunk)
                    self._out.flush()
                Child.activity += 1
                ACTIVITY.notify_all()
            if not chunk:
                return

    def output(self) -> str:
        with ACTIVITY:
            return self._buffer.decode(errors="replace")

    def wait_output(self, check, timeout: float, what: str):
        """``check(output)``'s first true result, checked as output arrives;
        fails if the child exits first or after ``timeout`` seconds."""

        def found():
            result = check(self.output())
            if not result and self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}):\n{self.output()}")
            return result

        try:
            return until(found, timeout, what, interval=timeout)  # woken by the output itself
        except WaitTimeout:
            raise AssertionError(f"{self.name}: no {what} within {timeout}s:\n{self.output()}") from None

    def wait_for(self, pattern: str, timeout: float = STARTUP) -> re.Match:
        return self.wait_output(lambda out: re.search(pattern, out), timeout, repr(pattern))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._reader.join(timeout=5)
        self.proc.stdout.close()
        with ACTIVITY:
            self._out.close()


def haproxy_config(front: int, backends: list[int]) -> str:
    """The shipped config with its listen port and its two server ports replaced."""
    text = CFG.read_text(encoding="utf-8")
    text, n = re.subn(r"(?m)^(\s*bind\s+)\S+", rf"\g<1>{HOST}:{front}", text)
    assert n == 1, "expected one bind line in haproxy.cfg"
    servers = re.findall(r"(?m)^\s*server\s+\S+\s+(\S+)", text)
    assert servers == ["127.0.0.1:8081", "127.0.0.1:8082"], servers
    for old, port in zip(servers, backends):
        text = text.replace(f" {old}", f" {HOST}:{port}", 1)
    return text


def get(port: int, path: str, timeout: float = 5) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def status(port: int) -> dict:
    code, body = get(port, "/ace/status")
    assert code == 200, body
    return json.loads(body)


def carries(port: int, content_id: str) -> bool:
    code, _ = get(port, f"/ace/status?id={content_id}")
    assert code in (200, 404), code
    return code == 200


class Player:
    """A player streaming through HAProxy: reads a few packets and stays connected."""

    def __init__(self, port: int, query: str) -> None:
        self.conn = http.client.HTTPConnection(HOST, port, timeout=10)
        self.conn.request("GET", f"/ace/getstream?{query}")
        self.resp = self.conn.getresponse()

    def read_ts(self) -> bytes:
        assert self.resp.status == 200, (self.resp.status, self.resp.read(500))
        assert self.resp.getheader("content-type") == "video/MP2T"
        data = b""
        while len(data) < READ:
            chunk = self.resp.read(READ - len(data))
            assert chunk, "stream ended early"
            data += chunk
        assert all(data[i] == 0x47 for i in range(0, READ, 188)), "not MPEG-TS packets"
        return data

    def close(self) -> None:
        self.conn.close()


def content_ids(n: int) -> list[str]:
    return [f"{i:02x}" * 20 for i in range(0x10, 0x10 + n)]


@pytest.mark.skipif(not shutil.which("haproxy"), reason="haproxy not installed")
def test_haproxy_keeps_one_content_on_one_instance(tmp_path):
    started = time.monotonic()
    children: list[Child] = []
    players: list[Player] = []
    try:
        engine = Child(
            "engine",
            [sys.executable, "-m", "acexy_tw.sim.engine", "--port", "0", "--interface", HOST, "--bitrate", "2M"],
            tmp_path,
        )
        children.append(engine)
        engine_port = int(engine.wait_for(r"simulated AceStream engine on http://[\d.]+:(\d+)").group(1))

        proxies = []
        for name in ("acexy1", "acexy2"):
            child = Child(
                name,
                [
                    TWISTD, "-n", "--pidfile=", "acexy",
                    "--listen", f"tcp:0:interface={HOST}",
                    "--engine-host", HOST, "--engine-port", str(engine_port),
                    "--linger", "0",
                ],
                tmp_path,
            )
            children.append(child)
            proxies.append(child)
        ports = [int(p.wait_for(r"serving on [\d.]+:(\d+)").group(1)) for p in proxies]
        for port in ports:
            assert get(port, "/healthz")[0] == 200

        front = free_port()
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(haproxy_config(front, ports), encoding="utf-8")
        check = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=10)
        assert check.returncode == 0, check.stdout + check.stderr
        haproxy = Child("haproxy", ["haproxy", "-db", "-f", str(cfg)], tmp_path)
        children.append(haproxy)

        def front_healthy():
            if haproxy.proc.poll() is not None:
                raise AssertionError(f"haproxy exited ({haproxy.proc.returncode}):\n{haproxy.output()}")
            try:
                return get(front, "/healthz", timeout=1)[0] == 200
            except OSError:  # not listening yet: HAProxy announces nothing, so its port is polled
                return False

        until(front_healthy, STARTUP, "haproxy's /healthz")

        # -- one content, two players with different extra parameters: one session --
        cid = "0123456789abcdef0123456789abcdef01234567"
        for query in (f"id={cid}&pid=a", f"id={cid}&pid=b"):
            player = Player(front, query)
            players.append(player)
            player.read_ts()

        def one_instance_with(clients: int) -> list:
            # (every player reading TS is attached to its session: no waiting)
            docs = [status(p) for p in ports]
            counts = sorted((d["streams"], d["clients"]) for d in docs)
            assert counts == [(0, 0), (1, clients)], docs
            return docs

        docs = one_instance_with(2)
        owner = next(i for i, d in enumerate(docs) if d["streams"] == 1)
        assert carries(ports[owner], cid) and not carries(ports[1 - owner], cid)

        # Another selector name and upper case: still the same instance and session.
        player = Player(front, f"content_id={cid.upper()}&pid=c")
        players.append(player)
        player.read_ts()
        docs = one_instance_with(3)
        assert docs[owner]["streams"] == 1

        for player in players:
            player.close()
        players.clear()
        proxies[owner].wait_for(rf"engine session for {cid} closed \(", 10)  # linger 0
        assert all(status(p)["streams"] == 0 for p in ports)

        # -- different contents can land on different instances ---------------------
        seen: dict[str, int] = {}
        for other in content_ids(16):
            player = Player(front, f"id={other}&pid=x")
            try:
                player.read_ts()
                where = [i for i, p in enumerate(ports) if carries(p, other)]
                assert len(where) == 1, (other, where)
                seen[other] = where[0]
            finally:
                player.close()
            if len(set(seen.values())) == 2:
                break
        assert len(set(seen.values())) == 2, f"every content landed on one instance: {seen}"

        # The placement is stable: a content seen above goes to the same instance again.
        first, first_where = next(iter(seen.items()))
        player = Player(front, f"infohash={first}")
        try:
            player.read_ts()
            assert carries(ports[first_where], first) and not carries(ports[1 - first_where], first)
        finally:
            player.close()

        # -- requests without a content id are spread (HAProxy's log names the server) --
        # (Round robin on a consistent-hash ring walks it: runs of one server, so ask a few times.)
        for _ in range(16):
            assert get(front, "/ace/status")[0] == 200

        def status_servers(output: str):
            served = re.findall(r"acexy/(acexy\d) .*\"GET /ace/status HTTP", output)
            return set(served) if len(served) >= 16 else None

        assert haproxy.wait_output(status_servers, 10, "log of 16 /ace/status") == {"acexy1", "acexy2"}

        # -- an instance goes away: its content moves to the other one -----------------
        proxies[owner].stop()
        player = Player(front, f"id={cid}&pid=after")
        try:
            player.read_ts()
            assert carries(ports[1 - owner], cid)
        finally:
            player.close()
        # ... and with none left (once its health checks notice), the front's /healthz says so.
        proxies[1 - owner].stop()
        haproxy.wait_for(r"backend '?acexy'? has no server available", 15)
        assert get(front, "/healthz", timeout=1)[0] == 503
    finally:
        for player in players:
            player.close()
        for child in reversed(children):
            child.stop()
    for child in children:
        assert "Traceback" not in child.output(), f"{child.name}:\n{child.output()}"
    assert time.monotonic() - started < 60
