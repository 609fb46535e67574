"""
``twistd -n acexy`` as a user starts it: the demo serves valid MPEG-TS, SIGTERM
stops everything within 5 s (engine sessions stopped), bad settings stop
start-up with the variable named, boolean settings are plain switches, an
unknown ACEXY_* variable is a warning, ``twistd acexy --version`` is
acexy-tw's, and the plugin ships correctly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.web.client import Agent, HTTPConnectionPool
from treq.client import HTTPClient

ROOT = Path(__file__).resolve().parents[2]
TWISTD = str(Path(sys.executable).with_name("twistd"))
DEMO_ID = "0123456789abcdef0123456789abcdef01234567"
TIMEOUT = 20


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACEXY_")}
    env.update(extra)
    return env


class Twistd(ProcessProtocol):
    """A twistd child: its output, the port it announced, its exit."""

    announce = re.compile(rb"serving on [\d.]+:(\d+)")

    def __init__(self) -> None:
        self.output = b""
        self.port: Deferred = Deferred()
        self.ended: Deferred = Deferred()
        self.status = None
        self.signal = None

    def outReceived(self, data: bytes) -> None:
        self.output += data
        m = self.announce.search(self.output)
        if m and not self.port.called:
            self.port.callback(int(m.group(1)))

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        self.status = reason.value.exitCode
        self.signal = reason.value.signal
        if not self.port.called:
            self.port.errback(RuntimeError("twistd exited: " + self.output.decode(errors="replace")))
        self.ended.callback(self.status)


def exited(reactor, proc: Twistd, seconds: float = TIMEOUT) -> Deferred:
    """Fires with the exit status once the child has exited, within ``seconds``
    (a fresh Deferred per call: a timeout leaves ``proc.ended`` usable)."""
    d: Deferred = Deferred()
    proc.ended.addBoth(lambda status: (d.callback(status) if not d.called else None, status)[1])
    return d.addTimeout(seconds, reactor)


async def stop(reactor, proc: Twistd, within: float = TIMEOUT) -> str:
    """SIGTERM; the child must exit within ``within`` seconds (else it is
    killed and the test fails). Returns its whole output."""
    proc.transport.signalProcess(signal.SIGTERM)
    try:
        await exited(reactor, proc, within)
    except TimeoutError:
        proc.transport.signalProcess(signal.SIGKILL)
        await exited(reactor, proc)
        raise AssertionError(
            f"twistd still running {within:g}s after SIGTERM:\n" + proc.output.decode(errors="replace")
        ) from None
    return proc.output.decode(errors="replace")


def spawn(reactor, *args: str, env: dict | None = None) -> Twistd:
    proto = Twistd()
    argv = [TWISTD, "-n", "--pidfile=", "acexy", *args]
    reactor.spawnProcess(proto, TWISTD, argv, env=env or clean_env(), path=str(ROOT))
    return proto


class Reader:
    """Reads ``limit`` bytes of a body, then hangs up."""

    def __init__(self, limit: int) -> None:
        from twisted.internet.protocol import Protocol

        outer = self
        self.data = bytearray()
        self.done: Deferred = Deferred()

        class P(Protocol):
            def dataReceived(self, data: bytes) -> None:
                outer.data += data
                if len(outer.data) >= limit and not outer.done.called:
                    self.transport.stopProducing()
                    outer.done.callback(bytes(outer.data[:limit]))

            def connectionLost(self, reason=None) -> None:
                if not outer.done.called:
                    outer.done.callback(bytes(outer.data))

        self.protocol = P()


@pytest_twisted.ensureDeferred
async def test_demo_streams_valid_ts_and_sigterm_stops_within_5s(reactor, tmp_path):
    proc = spawn(reactor, "--demo", "--listen", "tcp:0:interface=127.0.0.1", "--linger", "30s")
    try:
        port = await proc.port.addTimeout(TIMEOUT, reactor)
        pool = HTTPConnectionPool(reactor, persistent=False)
        client = HTTPClient(Agent(reactor, pool=pool))
        response = await client.get(
            f"http://127.0.0.1:{port}/ace/getstream?id={DEMO_ID}", unbuffered=True
        ).addTimeout(TIMEOUT, reactor)
        assert response.code == 200
        assert response.headers.getRawHeaders(b"content-type") == [b"video/MP2T"]
        reader = Reader(1024 * 1024)  # what `curl ... | head -c 1M` gives a newcomer
        response.deliverBody(reader.protocol)
        data = await reader.done.addTimeout(TIMEOUT, reactor)
        assert len(data) == 1024 * 1024
        assert all(data[i] == 0x47 for i in range(0, len(data) - 188, 188))
        if shutil.which("ffprobe"):
            capture = tmp_path / "demo.ts"
            capture.write_bytes(data)
            out, err, code = await getProcessOutputAndValue(
                "ffprobe",
                ["-v", "error", "-show_format", "-show_streams", "-of", "json", str(capture)],
                env=os.environ,
            ).addTimeout(TIMEOUT, reactor)
            assert code == 0, err
            doc = json.loads(out)
            assert "mpegts" in doc["format"]["format_name"]
            assert {s["codec_type"] for s in doc["streams"]} >= {"video", "audio"}
        await pool.closeCachedConnections()
    finally:
        # linger is 30 s, so the session is still open: shutdown must stop it, within 5 s.
        log = await stop(reactor, proc, within=5)
    # twistd re-raises SIGTERM on itself after a clean shutdown (exit "by signal 15",
    # which systemd counts as success); anything else is a crash.
    assert (proc.status, proc.signal) in ((0, None), (None, signal.SIGTERM)), log
    assert "Server Shut Down." in log
    assert "closed (shutdown)" in log
    assert "Traceback" not in log
    assert "GET /ace/getstream" not in log  # the access log is off by default


def loaded(proc: Twistd, name: str) -> bool:
    """Whether a file whose path contains ``name`` is mapped into the child."""
    return name in Path(f"/proc/{proc.transport.pid}/maps").read_text()


@pytest_twisted.ensureDeferred
async def test_pyopenssl_stays_unloaded_when_nothing_speaks_tls(reactor):
    proc = spawn(reactor, "--listen", "127.0.0.1:0")
    try:
        port = await proc.port.addTimeout(TIMEOUT, reactor)
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = await HTTPClient(Agent(reactor, pool=pool)).get(f"http://127.0.0.1:{port}/ace/status")
        assert response.code == 200
        await response.content()
        assert not loaded(proc, "cryptography")  # pyOpenSSL's own library, 12 MiB of RSS
    finally:
        log = await stop(reactor, proc)
    assert "Traceback" not in log


@pytest_twisted.ensureDeferred
async def test_an_ssl_listener_under_twistd_serves_https(reactor, tmp_path):
    from twisted.internet import ssl
    from twisted.web.client import BrowserLikePolicyForHTTPS

    from tests.integration.test_tls import self_signed

    pem, cert_pem = self_signed(str(tmp_path))
    proc = spawn(reactor, "--listen", f"ssl:0:privateKey={pem}:interface=127.0.0.1")
    try:
        port = await proc.port.addTimeout(TIMEOUT, reactor)
        policy = BrowserLikePolicyForHTTPS(trustRoot=ssl.Certificate.loadPEM(cert_pem))
        pool = HTTPConnectionPool(reactor, persistent=False)
        client = HTTPClient(Agent(reactor, contextFactory=policy, pool=pool))
        response = await client.get(f"https://localhost:{port}/ace/status").addTimeout(TIMEOUT, reactor)
        assert response.code == 200
        assert b'"streams"' in await response.content()
        assert loaded(proc, "cryptography")
    finally:
        log = await stop(reactor, proc)
    assert "Traceback" not in log


@pytest_twisted.ensureDeferred
async def test_bad_setting_stops_startup_naming_the_variable(reactor):
    proc = spawn(reactor, env=clean_env(ACEXY_BUFFER_SIZE="4 potatoes"))
    status = await proc.ended.addTimeout(TIMEOUT, reactor)
    proc.port.addErrback(lambda _: None)
    out = proc.output.decode(errors="replace")
    assert status == 1
    assert "ACEXY_BUFFER_SIZE='4 potatoes'" in out
    assert "Traceback" not in out


@pytest_twisted.ensureDeferred
async def test_flag_beats_env(reactor):
    proc = spawn(
        reactor,
        "--buffer-size",
        "nonsense",
        env=clean_env(ACEXY_BUFFER_SIZE="4MiB"),
    )
    status = await proc.ended.addTimeout(TIMEOUT, reactor)
    proc.port.addErrback(lambda _: None)
    assert status == 1
    assert "ACEXY_BUFFER_SIZE (--buffer-size)='nonsense'" in proc.output.decode(errors="replace")


@pytest_twisted.ensureDeferred
async def test_a_boolean_is_a_switch_and_a_misspelt_variable_a_warning(reactor):
    """``--m3u8`` alone turns HLS on over an environment false; a misspelt
    variable is named with its closest setting, its value never shown."""
    env = clean_env(ACEXY_M3U8="false", ACEXY_BUFER_SIZE="s3cr3t-not-shown")
    proc = spawn(reactor, "--demo", "--m3u8", "--listen", "tcp:0:interface=127.0.0.1", env=env)
    try:
        port = await proc.port.addTimeout(TIMEOUT, reactor)
        pool = HTTPConnectionPool(reactor, persistent=False)
        client = HTTPClient(Agent(reactor, pool=pool))
        response = await client.get(f"http://127.0.0.1:{port}/ace/getstream?id={DEMO_ID}").addTimeout(
            TIMEOUT, reactor
        )
        body = await response.content()
        assert response.code == 200, body
        assert body.startswith(b"#EXTM3U")  # ACEXY_M3U8's meaning: getstream answers with HLS
        await pool.closeCachedConnections()
    finally:
        log = await stop(reactor, proc)
    assert "ignoring unknown ACEXY_BUFER_SIZE (did you mean ACEXY_BUFFER_SIZE?)" in log
    assert "s3cr3t" not in log
    assert "Traceback" not in log


def test_version_is_acexy_tws_and_twistds_own_stays_twisteds():
    from acexy_tw._version import __version__

    ours = subprocess.run([TWISTD, "acexy", "--version"], capture_output=True, text=True,
                          env=clean_env(ACEXY_PORT="not-a-port"), cwd=ROOT, timeout=TIMEOUT)  # fmt: skip
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout.startswith(f"acexy-tw {__version__.public()} ("), ours.stdout
    theirs = subprocess.run([TWISTD, "--version"], capture_output=True, text=True, env=clean_env(),
                            cwd=ROOT, timeout=TIMEOUT)  # fmt: skip
    assert theirs.returncode == 0
    assert theirs.stdout.startswith("twistd (the Twisted daemon)")
    assert "acexy-tw" not in theirs.stdout


def test_plugin_is_discoverable():
    from twisted.application.service import IServiceMaker
    from twisted.plugin import getPlugins

    makers = {m.tapname: m for m in getPlugins(IServiceMaker)}
    assert "acexy" in makers
    assert makers["acexy"].options().parseOptions(["--listen", "tcp:0"]) is None


@pytest.mark.skipif(not shutil.which("git"), reason="needs git for a clean build tree")
def test_wheel_ships_only_the_plugin_under_twisted_and_it_loads(tmp_path):
    """pip install . (non-editable): the wheel's plugin makes `twistd acexy` work on its own."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)],
        check=True,
        timeout=300,
    )
    [wheel] = list(wheels.glob("acexy_tw-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    under_twisted = [n for n in names if n.startswith("twisted/")]
    assert under_twisted == ["twisted/plugins/acexy_plugin.py"], under_twisted
    assert not any(n.startswith("tests/") for n in names)
    assert "acexy_tw/web/dashboard.html" in names  # package data: the dashboard page
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        timeout=300,
    )
    # Run from an empty directory with only the installed wheel ahead on the path.
    probe = (
        "import acexy_tw, sys;"
        "from twisted.plugin import getPlugins;"
        "from twisted.application.service import IServiceMaker;"
        "names = [m.tapname for m in getPlugins(IServiceMaker)];"
        "print(acexy_tw.__file__); print('acexy' in names)"
    )
    env = clean_env(PYTHONPATH=str(target))
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    file_line, found = out.stdout.split()
    assert file_line.startswith(str(target)), file_line
    assert found == "True"


@pytest_twisted.ensureDeferred
async def test_json_logs_with_the_acexy_observer(reactor):
    proto = Twistd()
    proto.announce = re.compile(rb'"where": "[\d.]+:(\d+)"')  # structured, not formatted
    argv = [TWISTD, "-n", "--pidfile=", "--logger", "acexy_tw.logs.observer", "acexy", "--demo",
            "--listen", "tcp:0:interface=127.0.0.1"]
    reactor.spawnProcess(proto, TWISTD, argv, env=clean_env(ACEXY_LOG_FORMAT="json"), path=str(ROOT))
    try:
        await proto.port.addTimeout(TIMEOUT, reactor)
    finally:
        proto.transport.signalProcess(signal.SIGTERM)
        await proto.ended.addTimeout(TIMEOUT, reactor)
    lines = [line for line in proto.output.decode().splitlines() if line.strip()]
    assert lines
    events = [json.loads(line) for line in lines]  # every line is one JSON object
    assert any("serving on" in (e.get("log_format") or "") or "serving on" in str(e) for e in events)
