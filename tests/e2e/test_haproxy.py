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
    assert servers == ["127.0.0.1:8081", "127.0.0.1:8082"] * 2, servers  # players' and the dashboard's backends
    for old, port in zip(servers[:2], backends):
        text = text.replace(f" {old}", f" {HOST}:{port}")
    return text


def get(port: int, path: str, timeout: float = 5) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def get_with_cookie(port: int, path: str, cookie: str = "", timeout: float = 5) -> tuple[int, bytes, str]:
    """GET with a Cookie header; the status, the body and the cookie set (``name=value``, or "")."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Cookie": cookie} if cookie else {})
        resp = conn.getresponse()
        return resp.status, resp.read(), (resp.getheader("set-cookie") or "").split(";")[0]
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


class Cluster:
    """One simulated engine, two ``twistd acexy`` instances on it, and HAProxy
    running the shipped config in front of them; every process is stopped by
    :meth:`stop`."""

    def __init__(self, tmp_path: Path) -> None:
        self.children: list[Child] = []
        engine = self._child(
            "engine",
            [sys.executable, "-m", "acexy_tw.sim.engine", "--port", "0", "--interface", HOST, "--bitrate", "2M"],
            tmp_path,
        )
        engine_port = int(engine.wait_for(r"simulated AceStream engine on http://[\d.]+:(\d+)").group(1))
        self.proxies = [
            self._child(
                name,
                [
                    TWISTD, "-n", "--pidfile=", "acexy",
                    "--listen", f"tcp:0:interface={HOST}",
                    "--engine-host", HOST, "--engine-port", str(engine_port),
                    "--linger", "0",
                ],
                tmp_path,
            )
            for name in ("acexy1", "acexy2")
        ]
        self.ports = [int(p.wait_for(r"serving on [\d.]+:(\d+)").group(1)) for p in self.proxies]
        for port in self.ports:
            assert get(port, "/healthz")[0] == 200

        self.front = front = free_port()
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(haproxy_config(front, self.ports), encoding="utf-8")
        check = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=10)
        assert check.returncode == 0, check.stdout + check.stderr
        self.haproxy = haproxy = self._child("haproxy", ["haproxy", "-db", "-f", str(cfg)], tmp_path)

        def front_healthy():
            if haproxy.proc.poll() is not None:
                raise AssertionError(f"haproxy exited ({haproxy.proc.returncode}):\n{haproxy.output()}")
            try:
                return get(front, "/healthz", timeout=1)[0] == 200
            except OSError:  # not listening yet: HAProxy announces nothing, so its port is polled
                return False

        until(front_healthy, STARTUP, "haproxy's /healthz")

    def _child(self, name: str, argv: list[str], logdir: Path) -> Child:
        child = Child(name, argv, logdir)
        self.children.append(child)
        return child

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()
        for child in self.children:
            assert "Traceback" not in child.output(), f"{child.name}:\n{child.output()}"


@pytest.mark.skipif(not shutil.which("haproxy"), reason="haproxy not installed")
def test_haproxy_keeps_one_content_on_one_instance(tmp_path):
    started = time.monotonic()
    players: list[Player] = []
    cluster = None
    try:
        cluster = Cluster(tmp_path)
        front, ports, proxies, haproxy = cluster.front, cluster.ports, cluster.proxies, cluster.haproxy

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

        # -- the dashboard: spread without a cookie, kept on one instance with it --------
        # (HAProxy's log names the backend and the server.)
        cookies = set()
        for _ in range(4):
            code, _, cookie = get_with_cookie(front, "/ace/status")
            assert code == 200
            cookies.add(cookie)
        assert cookies == {"ACEXY_INSTANCE=acexy1", "ACEXY_INSTANCE=acexy2"}, cookies  # round robin
        for _ in range(6):  # a browser sends its cookie back: the same instance every time
            assert get_with_cookie(front, "/ace/status", "ACEXY_INSTANCE=acexy2")[0] == 200
        for _ in range(2):  # ?instance= picks one, whatever the cookie says
            code, _, cookie = get_with_cookie(front, "/?instance=acexy1", "ACEXY_INSTANCE=acexy2")
            assert (code, cookie) == (200, "ACEXY_INSTANCE=acexy1")

        def dashboard_servers(output: str):
            served = re.findall(r"dashboard/(acexy\d) .*\"GET (/\S*) HTTP", output)
            return served if len(served) >= 12 else None

        served = haproxy.wait_output(dashboard_servers, 10, "log of 12 dashboard requests")
        assert [server for server, _ in served[4:10]] == ["acexy2"] * 6, served
        assert [server for server, _ in served[10:12]] == ["acexy1"] * 2, served

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
        if cluster is not None:
            cluster.stop()
    assert time.monotonic() - started < 60


@pytest.mark.skipif(not shutil.which("haproxy"), reason="haproxy not installed")
@pytest.mark.skipif(not shutil.which("ffmpeg"), reason="ffmpeg not installed")
def test_hls_and_ts_through_haproxy_keep_to_one_instance(tmp_path):
    """ffmpeg plays an HLS stream through HAProxy for 20 s while a player reads
    a TS stream: every segment goes where its playlist came from (the content id
    is in the segment path), so none fails."""
    cluster = None
    ts_player = None
    try:
        cluster = Cluster(tmp_path)
        hls_cid, ts_cid = "ab" * 20, "cd" * 20
        ts_player = Player(cluster.front, f"id={ts_cid}")
        ts_player.read_ts()
        ffmpeg = subprocess.run(
            [
                "ffmpeg", "-nostdin", "-v", "warning",
                "-i", f"http://{HOST}:{cluster.front}/ace/manifest.m3u8?id={hls_cid}",
                "-t", "20", "-c", "copy", "-f", "mpegts", str(tmp_path / "hls.ts"),
            ],
            capture_output=True, text=True, timeout=90,
        )
        assert ffmpeg.returncode == 0, ffmpeg.stderr
        assert "Failed to open segment" not in ffmpeg.stderr, ffmpeg.stderr
        assert "HTTP error" not in ffmpeg.stderr, ffmpeg.stderr
        ts_player.read_ts()  # the TS stream kept flowing meanwhile

        def hls_requests(output: str):
            found = re.findall(r"acexy/(acexy\d) \S+ (\d{3}) .*\"GET (/ace/(?:manifest|hls/)\S*) HTTP", output)
            segments = [f for f in found if f[2].startswith("/ace/hls/")]
            return found if len(segments) >= 8 else None

        found = cluster.haproxy.wait_output(hls_requests, 10, "log of the HLS requests")
        assert {server for server, _, _ in found} == {found[0][0]}, found  # one instance for all of it
        assert {code for _, code, _ in found} == {"200"}, found
        assert all(path.startswith(f"/ace/hls/{hls_cid}/") for _, _, path in found if "/hls/" in path), found
        # the owner carries the HLS session, the other instance does not
        owner = cluster.ports[int(found[0][0][-1]) - 1]
        other = cluster.ports[2 - int(found[0][0][-1])]
        assert [s["key"] for s in status(owner).get("hls", [])] != []
        assert status(other).get("hls", []) == []
    finally:
        if ts_player is not None:
            ts_player.close()
        if cluster is not None:
            cluster.stop()
