"""
Helpers shared by the benches in this directory (not part of the package).

- raw-socket HTTP helpers (``http_get``, ``engine_getstream``, ...), used by the
  load clients and by the parents;
- ``/proc`` readers: CPU seconds, RSS / peak RSS, open file descriptors and the
  TCP peers behind socket descriptors;
- :class:`Children`: starting the engine, the proxy, socat and load clients as
  child processes, waiting for them to be ready, and killing every one of them
  at the end (they also get SIGTERM if the bench itself dies, through
  ``PR_SET_PDEATHSIG``);
- :class:`LoadClients`: 2–3 processes of ``bench/loadclients.py`` released by
  one start barrier, their JSON results merged;
- the report plumbing: machine and source description, time limit, JSON file.

The benches run from the repository root as ``.venv/bin/python bench/<name>.py``;
they import this module as ``common`` (the script's directory is on
``sys.path``).
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import hashlib
import json
import os
import platform
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple
from urllib.parse import urlsplit

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
MB, GB = 1e6, 1e9
MIB = 1024 * 1024


# ---------------------------------------------------------------------------
# small HTTP helpers (raw sockets; used by the clients and the parents)
# ---------------------------------------------------------------------------


def request_bytes(path: str, host: str, port: int, close: bool = False, method: str = "GET") -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "User-Agent: acexy-bench/1",
        "Accept: */*",
    ]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def read_head(sock: socket.socket) -> Tuple[int, Dict[str, str], bytes]:
    """Read up to the end of the headers; return status, headers, body bytes read so far."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before the headers end ({data[:80]!r})")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, rest


def dechunk(body: bytes) -> bytes:
    out, pos = b"", 0
    while True:
        end = body.index(b"\r\n", pos)
        size = int(body[pos:end].split(b";")[0], 16)
        if size == 0:
            return out
        out += body[end + 2 : end + 2 + size]
        pos = end + 2 + size + 2


def http_get(host: str, port: int, path: str, timeout: float = 5.0) -> Tuple[int, bytes]:
    """A whole small response (Content-Length, chunked or close-delimited)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(request_bytes(path, host, port, close=True))
        status, headers, body = read_head(sock)
        length = headers.get("content-length")
        while True:
            if length is not None and len(body) >= int(length):
                break
            if headers.get("transfer-encoding", "").lower() == "chunked" and body.endswith(b"0\r\n\r\n"):
                break
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = dechunk(body)
        return status, body


def http_json(port: int, path: str, timeout: float = 5.0) -> Any:
    """GET a JSON document from 127.0.0.1:port (raises on a non-200 answer)."""
    status, body = http_get("127.0.0.1", port, path, timeout)
    if status != 200:
        raise RuntimeError(f"GET {path}: HTTP {status} {body[:200]!r}")
    return json.loads(body)


def metric_values(text: str) -> Dict[str, float]:
    """Prometheus text format → ``{"name{labels}": value}`` (comments skipped)."""
    out: Dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out


def proxy_metrics(port: int, timeout: float = 5.0) -> Dict[str, float]:
    status, body = http_get("127.0.0.1", port, "/metrics", timeout)
    if status != 200:
        raise RuntimeError(f"GET /metrics: HTTP {status}")
    return metric_values(body.decode("utf-8", "replace"))


def engine_getstream(engine_port: int, content_id: str, timeout: float = 5.0) -> Dict[str, Any]:
    """Start an engine session; the response's URLs rewritten to the real engine address."""
    path = f"/ace/getstream?format=json&id={content_id}&pid={secrets.token_hex(8)}"
    status, body = http_get("127.0.0.1", engine_port, path, timeout)
    reply = json.loads(body)
    if status != 200 or reply.get("error") or not reply.get("response"):
        raise RuntimeError(f"engine getstream failed: HTTP {status} {body[:200]!r}")
    response = reply["response"]
    return {key: path_of(response[key]) for key in ("playback_url", "command_url", "stat_url")}


def path_of(url: str) -> str:
    """The path+query of an engine URL: scheme/host/port are the engine's own view."""
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def engine_stop(engine_port: int, command_path: str) -> None:
    sep = "&" if "?" in command_path else "?"
    try:
        http_get("127.0.0.1", engine_port, f"{command_path}{sep}method=stop", timeout=3.0)
    except (OSError, ValueError):
        pass


def content_ids(n: int) -> List[str]:
    """``n`` fresh 40-hex content ids."""
    return [secrets.token_hex(20) for _ in range(n)]


def quantile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


# ---------------------------------------------------------------------------
# /proc
# ---------------------------------------------------------------------------


def die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Children get SIGTERM if the bench itself is killed (Linux prctl)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status(pid: int) -> Dict[str, int]:
    """The ``kB`` fields of ``/proc/<pid>/status`` (VmRSS, VmHWM, RssAnon, ...), in KiB."""
    out: Dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                out[name] = int(parts[0])
    return out


def rss_kib(pid: int) -> int:
    """Resident set size now (VmRSS), KiB."""
    return proc_status(pid)["VmRSS"]


def peak_rss_kib(pid: int) -> int:
    """Peak resident set size so far (VmHWM), KiB."""
    return proc_status(pid)["VmHWM"]


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_targets(pid: int) -> List[str]:
    """What each open descriptor points at (``socket:[inode]``, ``pipe:[..]``, paths)."""
    out = []
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        try:
            out.append(os.readlink(f"{base}/{name}"))
        except OSError:
            continue
    return sorted(out)


_TCP_STATES = {
    "01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1", "05": "FIN_WAIT2",
    "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT", "09": "LAST_ACK", "0A": "LISTEN", "0B": "CLOSING",
}  # fmt: skip


def tcp_sockets() -> Dict[str, Dict[str, Any]]:
    """``inode → {local_port, remote_port, state}`` for every IPv4/IPv6 TCP socket."""
    out: Dict[str, Dict[str, Any]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    out[parts[9]] = {
                        "local_port": int(parts[1].rsplit(":", 1)[1], 16),
                        "remote_port": int(parts[2].rsplit(":", 1)[1], 16),
                        "state": _TCP_STATES.get(parts[3], parts[3]),
                    }
        except FileNotFoundError:
            continue
    return out


def describe_fds(pid: int, names: Optional[Dict[int, str]] = None) -> Dict[str, int]:
    """Open descriptors of ``pid`` grouped by kind: ``tcp <state> → <peer>``
    (peer named through ``names``: port → name), ``pipe``, ``anon_inode:…``, files."""
    names = names or {}
    tcp = tcp_sockets()
    groups: Dict[str, int] = {}
    for target in fd_targets(pid):
        if target.startswith("socket:["):
            info = tcp.get(target[8:-1])
            if info is None:
                kind = "socket (not TCP)"
            elif info["state"] == "LISTEN":
                kind = f"tcp LISTEN :{info['local_port']}"
            else:
                peer = names.get(info["remote_port"]) or names.get(info["local_port"]) or "other"
                kind = f"tcp {info['state']} {peer}"
        elif target.startswith("pipe:"):
            kind = "pipe"
        elif target.startswith("anon_inode:"):
            kind = target
        else:
            kind = "file " + target
        groups[kind] = groups.get(kind, 0) + 1
    return dict(sorted(groups.items()))


def tcp_ext_counters(names: Sequence[str] = ("ListenOverflows", "ListenDrops")) -> Dict[str, int]:
    """System-wide TcpExt counters from ``/proc/net/netstat`` (e.g. SYNs dropped
    because a listen queue was full: ListenOverflows/ListenDrops)."""
    try:
        with open("/proc/net/netstat") as f:
            rows = f.read().splitlines()
    except OSError:
        return {}
    for header, values in zip(rows[::2], rows[1::2]):
        if header.startswith("TcpExt:"):
            table = dict(zip(header.split()[1:], (int(v) for v in values.split()[1:])))
            return {n: table.get(n, 0) for n in names}
    return {}


def listen_backlog(port: int) -> Optional[int]:
    """The accept-queue limit of the socket listening on ``port`` (``ss`` Send-Q), if ``ss`` is there."""
    ss = shutil.which("ss")
    if not ss:
        return None
    out = subprocess.run([ss, "-Hltn", f"sport = :{port}"], capture_output=True, text=True).stdout.split()
    try:
        return int(out[2])
    except (IndexError, ValueError):
        return None


def listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port (without connecting to it)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                        return True
        except FileNotFoundError:
            continue
    return False


# ---------------------------------------------------------------------------
# child processes
# ---------------------------------------------------------------------------


def venv_python() -> str:
    python = ROOT / ".venv/bin/python"
    return str(python) if python.exists() else sys.executable


def venv_twistd() -> str:
    twistd = ROOT / ".venv/bin/twistd"
    return str(twistd) if twistd.exists() else (shutil.which("twistd") or "twistd")


class LineReader:
    """Whole lines from a child's stdout pipe, with a timeout, without the
    buffered-reader-versus-select trap (a line already buffered in Python that
    ``select`` cannot see)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self._fd = proc.stdout.fileno()
        self._buf = b""
        self.eof = False

    def has_line(self) -> bool:
        return b"\n" in self._buf

    def fill(self, timeout: float) -> bool:
        """Read what is there (waiting up to ``timeout``); False on timeout."""
        ready, _, _ = select.select([self._fd], [], [], max(0.0, timeout))
        if not ready:
            return False
        data = os.read(self._fd, 1 << 20)
        if not data:
            self.eof = True
        self._buf += data
        return True

    def readline(self, timeout: float) -> Optional[str]:
        """The next line (stripped), None at EOF; raises on timeout."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            if self.eof:
                return None
            if not self.fill(deadline - time.monotonic()) and time.monotonic() >= deadline:
                raise TimeoutError(f"no answer within {timeout:g}s")
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode("utf-8", "replace").strip()


class Children:
    """Child processes of one bench run: start, wait until ready, stop all."""

    def __init__(self) -> None:
        self.python = venv_python()
        self.twistd = venv_twistd()
        self.socat = shutil.which("socat")
        self.tmp = Path(tempfile.mkdtemp(prefix="acexy-bench-"))
        self.children: List[Tuple[str, subprocess.Popen]] = []

    # -- processes ----------------------------------------------------------------

    def spawn(
        self,
        name: str,
        argv: List[str],
        *,
        stdout_pipe: bool = False,
        stdin_pipe: bool = False,
        env: Optional[Dict[str, str]] = None,
    ) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "wb")
        proc = subprocess.Popen(
            argv,
            cwd=str(ROOT),
            stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else log,
            stderr=log,
            env=env,
            preexec_fn=die_with_parent,
        )
        log.close()
        self.children.append((name, proc))
        return proc

    def log_path(self, name: str) -> Path:
        return self.tmp / f"{name}.log"

    def log_text(self, name: str) -> str:
        try:
            return self.log_path(name).read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, name: str, lines: int = 15) -> str:
        return "\n".join(self.log_text(name).splitlines()[-lines:])

    def wait_until(self, what: str, proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode}:\n{self.log_tail(what)}")
            if ready():
                return
            time.sleep(0.02)
        raise RuntimeError(f"{what} not ready after {timeout:g}s:\n{self.log_tail(what)}")

    def start_engine(self, name: str, rate: List[str]) -> Tuple[subprocess.Popen, int]:
        """``python -m acexy_tw.sim.engine`` on a free port."""
        port = free_port()
        argv = [self.python, "-m", "acexy_tw.sim.engine", "--port", str(port), "--interface", "127.0.0.1", *rate]
        proc = self.spawn(name, argv)
        self.wait_until(name, proc, lambda: _accepts(port))
        return proc, port

    def start_stats_engine(self, name: str, rate: List[str]) -> Tuple[subprocess.Popen, int, int]:
        """``bench/simengine.py``: the same simulated engine plus a stats port
        (getstream calls, sessions, bytes, stops); returns (proc, port, stats port)."""
        port, stats_port = free_port(), free_port()
        argv = [self.python, str(BENCH / "simengine.py"), "--port", str(port), "--stats-port", str(stats_port), *rate]
        proc = self.spawn(name, argv)
        self.wait_until(name, proc, lambda: _accepts(port) and _accepts(stats_port))
        return proc, port, stats_port

    def start_proxy(
        self,
        name: str,
        engine_port: int,
        extra: Sequence[str] = ("--linger", "0"),
        timeout: float = 20.0,
        backlog: Optional[int] = None,
        env: Optional[Dict[str, str]] = None,
    ) -> Tuple[subprocess.Popen, int]:
        """``twistd -n --pidfile= acexy`` on a free port; ready once it logs "serving on".
        Listens as a user's ``127.0.0.1:PORT`` does (the proxy's default queue of
        1024 connecting players), or, given ``backlog``, with that queue
        (``tcp:PORT:interface=127.0.0.1:backlog=N``). ``env``: variables added
        to this process's environment for the proxy (e.g. a bench toggle)."""
        port = free_port()
        listen = f"tcp:{port}:interface=127.0.0.1:backlog={backlog}" if backlog else f"127.0.0.1:{port}"
        argv = [
            self.twistd, "-n", "--pidfile=", "acexy",
            "--listen", listen,
            "--engine-host", "127.0.0.1", "--engine-port", str(engine_port),
            *extra,
        ]  # fmt: skip
        proc = self.spawn(name, argv, env={**os.environ, **env} if env else None)
        marker = f"serving on 127.0.0.1:{port}"
        self.wait_until(name, proc, lambda: marker in self.log_tail(name, 50), timeout)
        return proc, port

    def start_socat(self, name: str, engine_port: int) -> Tuple[subprocess.Popen, int]:
        """socat without fork: it serves exactly one connection, in this process."""
        if not self.socat:
            raise RuntimeError("socat is not installed (apt-get install -y socat)")
        port = free_port()
        argv = [self.socat, "-b", "65536", f"TCP-LISTEN:{port},reuseaddr,bind=127.0.0.1", f"TCP:127.0.0.1:{engine_port}"]
        proc = self.spawn(name, argv)
        self.wait_until(name, proc, lambda: listening(port))
        return proc, port

    def stop(self, proc: subprocess.Popen, grace: float = 3.0) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(3)

    def stop_all(self) -> None:
        for _, proc in reversed(self.children):
            try:
                self.stop(proc)
            except Exception:  # noqa: BLE001 - keep stopping the others
                pass
            for pipe in (proc.stdout, proc.stdin):
                if pipe is not None:
                    try:
                        pipe.close()
                    except OSError:
                        pass
        self.children.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def read_line(self, proc: subprocess.Popen, timeout: float) -> str:
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        if not ready:
            raise RuntimeError(f"client gave no answer within {timeout:g}s")
        line = proc.stdout.readline().decode()
        if not line:
            raise RuntimeError(f"client exited ({proc.wait()}) without an answer")
        return line.strip()


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------
# load clients (bench/loadclients.py), 2-3 processes behind one start barrier
# ---------------------------------------------------------------------------


class LoadClients:
    """Streaming clients spread over ``procs`` processes of ``bench/loadclients.py``.

    Each process gets its share of ``clients`` (dicts with ``path`` and an
    optional ``tag``), sets up, prints ``ARMED`` and waits; :meth:`go` writes
    ``GO`` to every process at once (the common start barrier), after which
    each client connects (spread over ``ramp`` seconds), reads and counts for
    ``seconds``. ``READY`` lines say when every client of a process has its
    first body byte (or failed); ``STOP`` ends them early; each process prints
    one ``RESULT`` JSON line.
    """

    def __init__(
        self,
        children: Children,
        name: str,
        port: int,
        clients: List[Dict[str, Any]],
        *,
        procs: int = 2,
        seconds: float = 20.0,
        ramp: float = 0.0,
    ) -> None:
        self.children = children
        self.name = name
        self.port = port
        self.clients = clients
        self.procs = max(1, min(procs, len(clients)))
        self.seconds = seconds
        self.ramp = ramp
        self.procs_list: List[subprocess.Popen] = []
        self.readers: List[LineReader] = []
        self.go_at: Optional[float] = None

    def start(self, timeout: float = 30.0) -> None:
        for i in range(self.procs):
            share = self.clients[i :: self.procs]
            # spread the connects of all processes evenly over the ramp
            spec = {
                "port": self.port,
                "clients": share,
                "seconds": self.seconds,
                "ramp": self.ramp,
                "offset": i / max(1, len(self.clients)) * self.ramp,
            }
            path = self.children.tmp / f"{self.name}-{i}.json"
            path.write_text(json.dumps(spec))
            argv = [self.children.python, str(BENCH / "loadclients.py"), str(path)]
            proc = self.children.spawn(f"{self.name}-{i}", argv, stdout_pipe=True, stdin_pipe=True)
            self.procs_list.append(proc)
            self.readers.append(LineReader(proc))
        for i, reader in enumerate(self.readers):
            line = reader.readline(timeout)
            if line != "ARMED":
                raise RuntimeError(f"{self.name}-{i}: {line!r}\n{self.children.log_tail(f'{self.name}-{i}')}")

    @property
    def pids(self) -> List[int]:
        return [p.pid for p in self.procs_list]

    def _send(self, word: str) -> None:
        for proc in self.procs_list:
            try:
                proc.stdin.write(word.encode() + b"\n")
                proc.stdin.flush()
            except (BrokenPipeError, OSError):
                pass

    def go(self) -> float:
        """The start barrier: every process starts now. Returns time.monotonic()."""
        self._send("GO")
        self.go_at = time.monotonic()
        return self.go_at

    def stop(self) -> None:
        self._send("STOP")

    def wait_ready(self, timeout: float) -> List[Dict[str, Any]]:
        """Wait for every process's ``READY`` line (all its clients have their
        first body byte or failed); returns their counts."""
        out = []
        for i, reader in enumerate(self.readers):
            line = reader.readline(timeout)
            if line is None or not line.startswith("READY "):
                raise RuntimeError(f"{self.name}-{i}: expected READY, got {line!r}")
            out.append(json.loads(line[6:]))
        return out

    def results(self, timeout: float) -> Dict[str, Any]:
        """Every process's ``RESULT``, merged: ``clients`` (all), ``cpu`` (sum)."""
        merged: Dict[str, Any] = {"clients": [], "cpu_s": 0.0, "procs": []}
        deadline = time.monotonic() + timeout
        for i, reader in enumerate(self.readers):
            while True:
                line = reader.readline(max(0.1, deadline - time.monotonic()))
                if line is None:
                    raise RuntimeError(f"{self.name}-{i} exited without a result:\n{self.children.log_tail(f'{self.name}-{i}')}")
                if line.startswith("RESULT "):
                    break
            result = json.loads(line[7:])
            merged["clients"].extend(result["clients"])
            merged["cpu_s"] += result["cpu_s"]
            merged["procs"].append({k: v for k, v in result.items() if k != "clients"})
        for proc in self.procs_list:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                self.children.stop(proc)
        return merged


# ---------------------------------------------------------------------------
# reports
# ---------------------------------------------------------------------------


def machine() -> Dict[str, Any]:
    info: Dict[str, Any] = {
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import twisted

        info["twisted"] = twisted.__version__
    except ImportError:
        pass
    if shutil.which("socat"):
        out = subprocess.run(["socat", "-V"], capture_output=True, text=True).stdout
        match = re.search(r"socat version (\S+)", out)
        info["socat"] = match.group(1) if match else None
    return info


def source_state() -> Dict[str, Any]:
    """Which proxy code was measured: HEAD, and a hash of uncommitted changes
    under ``acexy_tw/`` (someone may be editing it while benches run)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=str(ROOT), capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    diff = git("diff", "HEAD", "--", "acexy_tw", "twisted")
    return {
        "head": git("rev-parse", "--short", "HEAD").strip() or None,
        "acexy_tw_uncommitted": bool(diff),
        "acexy_tw_diff_sha1": hashlib.sha1(diff.encode()).hexdigest()[:12] if diff else None,
    }


def machine_line(m: Dict[str, Any]) -> str:
    return (
        f"machine: nproc={m['nproc']} (usable {m['usable_cpus']}), {m.get('cpu', '?')}, "
        f"{m['implementation']} {m['python']}, Twisted {m.get('twisted', '?')}, "
        f"load avg at start {m['loadavg_at_start'][0]}"
    )


def source_line(s: Dict[str, Any]) -> str:
    dirty = f" + uncommitted acexy_tw changes (diff {s['acexy_tw_diff_sha1']})" if s.get("acexy_tw_uncommitted") else ""
    return f"proxy code: {s.get('head')}{dirty}"


def fmt(value: Any, spec: str = ".1f") -> str:
    return "—" if value is None else format(value, spec)


def timestamp() -> Tuple[str, str]:
    """(ISO time, file-name stamp) in UTC."""
    now = _dt.datetime.now(_dt.timezone.utc)
    return now.isoformat(timespec="seconds"), now.strftime("%Y%m%dT%H%M%SZ")


def write_json(report: Dict[str, Any], path: Optional[Path], name: str, stamp: str) -> Path:
    path = path or RESULTS / f"{name}-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    report["json_path"] = str(path)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def finish(report: Dict[str, Any], path: Optional[Path], name: str, stamp: str, started: float, text: str) -> None:
    """A bench's ending: its wall time, the JSON file, the table and the wall time printed."""
    report["wall_seconds"] = round(time.monotonic() - started, 1)
    write_json(report, path, name, stamp)
    print(text)
    print(f"wall time {report['wall_seconds']} s")


class OutOfTime(BaseException):
    """The overall time limit: a BaseException, so no per-row handler swallows it."""


def install_limits(limit: int) -> None:
    """SIGTERM runs the ``finally`` blocks (children get stopped); after
    ``limit`` seconds :class:`OutOfTime` is raised wherever the bench is."""

    def terminated(signum, frame):
        raise SystemExit(128 + signum)

    def out_of_time(signum, frame):
        raise OutOfTime(f"time limit of {limit}s reached")

    signal.signal(signal.SIGTERM, terminated)
    signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(limit)


def summary(values: Iterable[float]) -> Dict[str, Optional[float]]:
    """median / p95 / min / max of a list (None when empty)."""
    vals = list(values)
    if not vals:
        return {"n": 0, "median": None, "p95": None, "min": None, "max": None}
    vals.sort()
    return {
        "n": len(vals),
        "median": quantile(vals, 0.5),
        "p95": quantile(vals, 0.95),
        "min": vals[0],
        "max": vals[-1],
    }
