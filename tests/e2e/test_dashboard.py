"""
The dashboard page (``acexy_tw/web/dashboard.html``) rendered by a real
browser: headless Chromium loads it from a tiny HTTP server that also serves a
canned ``/ace/status`` document, and the test reads the resulting DOM and a
screenshot. Skipped when ``chromium`` is not installed.

The same page is also driven through the Chrome DevTools Protocol (a real
browser, real clicks): against the canned document (the pool, an HLS row, a
refused stop, phone width), and against a real proxy in this process with the
simulated engine, a TS player and an HLS player: the new columns, the graphs,
copy, open-in-player links, 1280 and 412 px, and the stop button, which really
ends the TS stream (the player sees its end, the engine its stop command).

To refresh ``docs/dashboard.png`` and ``docs/dashboard-phone.png`` (taken from
the real proxy): ``ACEXY_DASHBOARD_SCREENSHOT=docs/dashboard.png pytest
tests/e2e/test_dashboard.py -k real_proxy``.
"""

import base64
import hashlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urljoin

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import ProcessProtocol, Protocol

from acexy_tw.web import dashboard

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")

KEY_A = "94c2fd8fb9bc8f2fc71a2cbe9d4b866f227a0209"
KEY_B = "d34db33f0c0ffee5a1b2c3d4e5f60718293abeef"
KEY_HELD = "5e1dc0de77aa00bb11cc22dd33ee44ff55667788"
WARNING = "VPN down: new players are held until it is back"
AUTH_WARNING = "orchestrator refused provisioning with HTTP 403: check ACEXY_ORCH_APIKEY"
HELD_REASON = "vpn down, waiting for the orchestrator"
INJECTED = '<b id="injected">bold?</b>'
KEY_HLS = "a11ce5ba5e0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f"
ENGINE_ERROR = "engine get_version failed: Connection was refused by other side: 111: Connection refused."


def short(key: str) -> str:
    """The page's shortening of a 40-hex key (no extras): 8 first, 4 last."""
    return key[:8] + "\u2026" + key[-4:]


def client(peer, sent, backlog=0, paused=False, connected=12.5):
    return {"peer": peer, "bytes": sent, "backlog": backlog, "paused": paused, "connected": connected}


def stream(key, **kw):
    doc = {
        "key": key,
        "state": "streaming",
        "clients": 0,
        "stat_url": None,
        "playback_session_id": None,
        "engine": "http://172.18.0.5:6878",
        "container_id": None,
        "orchestrator_stream_id": None,
        "bytes_in": 0,
        "bytes_out": 0,
        "uptime": 0.0,
        "engine_paused": False,
        "waiting_reason": None,
        "waiting": None,
        "failovers": 0,
        "client_list": [],
    }
    doc.update(kw)
    doc["clients"] = len(doc["client_list"])
    return doc


STATUS = {
    "streams": 3,
    "clients": 4,
    "version": "1.4.0",
    "uptime": 93784.2,
    "clients_cut": 2,
    "sessions": [
        stream(
            KEY_A,
            playback_session_id="pb-1",
            container_id="4f1c2a9e8d7b6c5a4f3e2d1c",
            orchestrator_stream_id="os-17",
            bytes_in=1_734_567_890,
            bytes_out=3_456_789_012,
            uptime=5421.7,
            client_list=[client("192.168.1.20:51234", 1_700_000_000), client("192.168.1.31:40112", 1_756_789_012, 65536)],
        ),
        stream(
            KEY_B + "?pid=7",
            state="recovering",
            engine="http://172.18.0.9:6878",
            bytes_in=48_213_004,
            bytes_out=47_900_000,
            uptime=312.0,
            engine_paused=True,
            waiting_reason="failover: engine stopped sending",
            waiting=4.2,
            failovers=1,
            client_list=[client("192.168.1.44:38001", 47_900_000, 2_097_152, paused=True)],
        ),
        stream(KEY_HELD, state="waiting", engine=None, waiting_reason=HELD_REASON, waiting=37.9,
               client_list=[client("10.0.0.7:50500", 0)]),
    ],
    "orchestrator": {
        "reachable": True,
        "last_error": None,
        "snapshot_age": 1.3,
        "poll_interval": 5.0,
        "warnings": [AUTH_WARNING, WARNING],
        "fallback_engine": "http://127.0.0.1:6878",
        "in_outage": True,
        "fallbacks": 3,
        "provision_attempts": {"ok": 4, "blocked": 2},
        "reservations": 0,
        "status": "degraded",
        "can_provision": False,
        "blocked_code": "vpn_disconnected",
        "blocked_eta": 60,
        "circuit_breaker": "closed",
        "vpn": {"enabled": True, "connected": False, "down": True},
        "capacity": {"total": 4, "used": 2, "available": 2, "max_replicas": 6},
    },
    "hls": [
        {
            "kind": "hls", "key": KEY_HLS, "state": "ready", "clients": None, "engine": "http://192.168.1.21:6878",
            "bytes_in": 31_000_000, "bytes_out": 31_000_000, "uptime": 421.0, "segments": 97, "status": "dl",
            "peers": 7, "speed_down": 310, "speed_up": 12, "bitrate_in": 3_950_000, "bitrate_out": 3_950_000,
            "history": [[420 - 5 * i, 3_000_000 + (i % 7) * 150_000, 3_000_000 + (i % 7) * 150_000, 7] for i in range(85)],
            "play": f"ace/manifest.m3u8?id={KEY_HLS}",
        }
    ],
    "engines": [
        {"url": "http://192.168.1.20:6878", "state": "up", "sessions": 2, "capacity": 2, "failures": 0,
         "last_error": None, "version": "3.1.74"},
        {"url": "http://192.168.1.21:6878", "state": "down", "sessions": 0, "capacity": None, "failures": 3,
         "last_error": ENGINE_ERROR, "version": None},
    ],
    "held": {
        "mode": "hold",
        "players": 1,
        "queue_size": 32,
        "sessions": [{"key": KEY_HELD, "reason": HELD_REASON, "players": 1, "waiting": 37.9}],
        "demands": [{"key": KEY_HELD, "since": 40.1}],
    },
}


#: Test-only: clicks the first stream's "+" (its client list) once the page has rendered.
CLICKER = b"""<script>setTimeout(function () { document.querySelector("button.x").click(); }, 1000);</script>"""


class FakeProxy:
    """
    ``/`` is the dashboard (with its CSP), ``/expanded`` the same page plus a
    script clicking the first client-list button (no CSP: it is not the
    page's), ``/ace/status`` a canned document (or an error); a POST is 501.
    """

    def __init__(self, status=STATUS, status_code=200):
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append(self.path)
                path = self.path.split("?", 1)[0]
                if path == "/":
                    self._send(200, "text/html; charset=utf-8", dashboard.page(),
                               {"Content-Security-Policy": dashboard.content_security_policy()})
                elif path == "/expanded":
                    page = dashboard.page().replace(b"</body>", CLICKER + b"</body>")
                    self._send(200, "text/html; charset=utf-8", page)
                elif path == "/ace/status" and status_code == 200:
                    self._send(200, "application/json", json.dumps(status).encode())
                elif path == "/ace/status":
                    self._send(status_code, "text/plain", b"no")
                else:
                    self._send(404, "text/plain", b"not found")

            def do_POST(self):  # a stop: refused, so the page's error path shows
                outer.requests.append("POST " + self.path)
                self._send(501, "text/plain", b"this status server stops nothing")

            def _send(self, code, ctype, body, extra=None):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def chromium(tmp_path, url, *extra, timeout=90):
    """Run headless Chromium once; its stdout. The whole process group dies on timeout."""
    profile = tmp_path / "profile"
    profile.mkdir(exist_ok=True)
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--virtual-time-budget=5000", *extra, url,
    ]
    env = dict(os.environ, HOME=str(tmp_path))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)
        pytest.fail(f"chromium did not finish within {timeout}s")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # helpers it may have left behind
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode("utf-8", errors="replace")


def rendered(dom):
    """The dumped DOM without the page's own script and style (their text is not output)."""
    assert "</script>" in dom, dom[:2000]
    return re.sub(r"<(script|style)\b.*?</\1>", "", dom, flags=re.S)


def test_page_is_small_and_self_contained():
    html = dashboard.page()
    assert len(html) < 32 * 1024
    assert dashboard.page() is html  # read once
    for forbidden in (b"innerHTML", b"outerHTML", b"insertAdjacentHTML", b"document.write", b"javascript:", b"eval("):
        assert forbidden not in html, forbidden
    assert not re.search(rb"<[^>]*\son[a-z]+=", html)  # no inline event handlers (the CSP forbids them)
    # The only absolute URL is the SVG namespace (an identifier, never fetched).
    assert re.findall(rb"https?://[^\s\"']*", html) == [b"http://www.w3.org/2000/svg"]


def test_dashboard_renders_status(tmp_path):
    status = json.loads(json.dumps(STATUS))
    status["sessions"][1]["waiting_reason"] = INJECTED
    with FakeProxy(status) as proxy:
        dom = rendered(chromium(tmp_path, proxy.url + "?token=s3cr%20et", "--dump-dom"))
    # The token was passed on to the status fetches (re-encoded).
    assert "/ace/status?token=s3cr%20et" in proxy.requests, proxy.requests
    assert '<div id="error" class="box err" hidden=""></div>' in dom
    for key in (KEY_A, KEY_B, KEY_HELD):
        assert short(key) in dom
    assert short(KEY_B) + "?pid=7" in dom
    assert WARNING in dom
    assert AUTH_WARNING in dom  # a wrong ACEXY_ORCH_APIKEY is shown to the operator
    assert 'class="st st-waiting"' in dom  # the lifecycle state is styled
    assert HELD_REASON in dom
    assert "1.4.0" in dom and "1d 2h" in dom  # header: version, uptime
    assert "3.22 GiB" in dom  # bytes out of KEY_A, human-readable
    assert "vpn_disconnected" in dom and "ok: 4, blocked: 2" in dom  # orchestrator panel
    # Data is text, never markup.
    assert "&lt;b id=\"injected\"&gt;" in dom
    assert 'id="injected"' not in dom.replace("&lt;b id=\"injected\"&gt;", "")


def test_client_list_expands(tmp_path):
    with FakeProxy() as proxy:
        dom = rendered(chromium(tmp_path, proxy.url + "expanded", "--dump-dom"))
    assert "192.168.1.20:51234" in dom and "192.168.1.31:40112" in dom  # the first stream's clients
    assert "64.0 KiB" in dom  # a backlog
    assert "192.168.1.44:38001" not in dom and "10.0.0.7:50500" not in dom  # the others stay folded
    assert "proxy unreachable" not in dom


def test_dashboard_reports_an_unreachable_proxy(tmp_path):
    with FakeProxy(status_code=503) as proxy:
        dom = rendered(chromium(tmp_path, proxy.url, "--dump-dom"))
    assert sum(p.startswith("/ace/status") for p in proxy.requests) >= 2  # it keeps retrying
    assert re.search(r'<div id="error" class="box err"><b>proxy unreachable</b> \(HTTP 503\)', dom), dom
    assert "last updated: never" in dom


def test_dashboard_screenshot(tmp_path):
    png = tmp_path / "dashboard.png"
    with FakeProxy() as proxy:
        chromium(tmp_path, proxy.url + "expanded", f"--screenshot={png}", "--window-size=1280,900")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10 * 1024  # (the docs' screenshots come from the real proxy's test below)


# -- a real browser, driven: Chrome DevTools Protocol over a websocket ------------------
#
# --dump-dom cannot click. Chromium runs with --remote-debugging-port=0 under the
# reactor (spawnProcess: the proxy under test lives in this process and must keep
# running), and a minimal RFC 6455 client (text frames, client-masked, as CDP
# needs) sends it commands: set the viewport, read the page, take screenshots,
# and click with real mouse events.

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CDP_TIMEOUT = 30
DESKTOP, PHONE = (1280, 900), (412, 915)


class CDPError(Exception):
    pass


def _masked(data: bytes, key: bytes) -> bytes:
    n = len(data)
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


class DevTools(Protocol):
    """One CDP websocket: :meth:`call` sends a command, its Deferred fires with the result."""

    def __init__(self, host: str, path: str) -> None:
        self.host, self.path = host, path
        self.key = base64.b64encode(os.urandom(16))
        self.ready: Deferred = Deferred()
        self.lost: Deferred = Deferred()
        self._buffer = b""
        self._open = False
        self._fragments: list = []
        self._pending: dict = {}
        self._ids = 0

    def connectionMade(self) -> None:
        self.transport.write(
            b"GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (self.path.encode(), self.host.encode(), self.key)
        )

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        if not self._open:
            head, sep, rest = self._buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            accept = base64.b64encode(hashlib.sha1(self.key + WS_GUID).digest())
            if not head.startswith(b"HTTP/1.1 101") or accept not in head:
                self.ready.errback(CDPError(f"websocket handshake refused: {head[:200]!r}"))
                self.transport.abortConnection()
                return
            self._open, self._buffer = True, rest
            self.ready.callback(self)
        self._frames()

    def _frames(self) -> None:
        while len(self._buffer) >= 2:
            b0, b1 = self._buffer[0], self._buffer[1]
            size, pos = b1 & 0x7F, 2
            if size == 126:
                if len(self._buffer) < 4:
                    return
                size, pos = struct.unpack(">H", self._buffer[2:4])[0], 4
            elif size == 127:
                if len(self._buffer) < 10:
                    return
                size, pos = struct.unpack(">Q", self._buffer[2:10])[0], 10
            key = None
            if b1 & 0x80:
                key, pos = self._buffer[pos : pos + 4], pos + 4
            if len(self._buffer) < pos + size:
                return
            payload, self._buffer = self._buffer[pos : pos + size], self._buffer[pos + size :]
            if key:
                payload = _masked(payload, key)
            opcode = b0 & 0x0F
            if opcode == 0x8:  # close
                self.transport.loseConnection()
                return
            if opcode == 0x9:  # ping
                self._send(0xA, payload)
            elif opcode in (0x0, 0x1):
                self._fragments.append(payload)
                if b0 & 0x80:
                    message, self._fragments = b"".join(self._fragments), []
                    self._message(json.loads(message))

    def _send(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        if n < 126:
            header = struct.pack(">BB", 0x80 | opcode, 0x80 | n)
        elif n < 1 << 16:
            header = struct.pack(">BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            header = struct.pack(">BBQ", 0x80 | opcode, 0x80 | 127, n)
        key = os.urandom(4)
        self.transport.write(header + key + _masked(payload, key))

    def _message(self, doc: dict) -> None:
        d = self._pending.pop(doc.get("id"), None)
        if d is None:
            return  # an event: not needed here
        if "error" in doc:
            d.errback(CDPError(f"{doc['error']}"))
        else:
            d.callback(doc.get("result", {}))

    def call(self, method: str, **params) -> Deferred:
        from twisted.internet import reactor

        self._ids += 1
        d: Deferred = Deferred()
        self._pending[self._ids] = d
        self._send(0x1, json.dumps({"id": self._ids, "method": method, "params": params}).encode())
        return d.addTimeout(CDP_TIMEOUT, reactor)

    def connectionLost(self, reason=None) -> None:
        pending, self._pending = self._pending, {}
        for d in pending.values():
            d.errback(CDPError("devtools connection lost"))
        if not self.ready.called:
            self.ready.errback(CDPError("devtools connection lost before the handshake"))
        self.lost.callback(None)

    def close(self) -> Deferred:
        if self.transport is not None and not self.lost.called:
            self.transport.loseConnection()
        return self.lost


class ChromiumProcess(ProcessProtocol):
    """Headless Chromium in its own session (``setsid``: the whole tree is signalled at the end)."""

    announce = re.compile(rb"DevTools listening on ws://([\d.]+):(\d+)/")

    def __init__(self) -> None:
        self.output = b""
        self.listening: Deferred = Deferred()
        self.ended: Deferred = Deferred()

    def errReceived(self, data: bytes) -> None:
        self.output += data
        m = self.announce.search(self.output)
        if m and not self.listening.called:
            self.listening.callback((m.group(1).decode(), int(m.group(2))))

    outReceived = errReceived

    def processEnded(self, reason) -> None:
        if not self.listening.called:
            self.listening.errback(CDPError("chromium exited: " + self.output.decode(errors="replace")[-2000:]))
        self.ended.callback(None)


class Cleanups:
    """trial's addCleanup for the harness helpers, run (last first, each awaited, bounded) at the end."""

    def __init__(self) -> None:
        self._calls: list = []

    def addCleanup(self, f, *args) -> None:
        self._calls.append((f, args))

    async def run(self, reactor) -> None:
        from twisted.internet.defer import maybeDeferred

        errors = []
        while self._calls:
            f, args = self._calls.pop()
            try:
                await maybeDeferred(f, *args).addTimeout(20, reactor)
            except Exception as e:  # every cleanup runs; the first error is raised after
                errors.append(e)
        if errors:
            raise errors[0]


class Page:
    """The one tab of a Chromium started for a test."""

    def __init__(self, devtools: DevTools) -> None:
        self.devtools = devtools

    @classmethod
    async def open(cls, reactor, cleanups: Cleanups, tmp_path) -> "Page":
        proc = ChromiumProcess()
        profile = tmp_path / "cdp-profile"
        profile.mkdir(exist_ok=True)
        argv = [
            "setsid", CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
            "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1", f"--user-data-dir={profile}",
            "about:blank",
        ]
        env = dict(os.environ, HOME=str(tmp_path))
        transport = reactor.spawnProcess(proc, shutil.which("setsid"), argv, env=env)

        async def stop_chromium() -> None:
            for sig, seconds in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
                if proc.ended.called:
                    break
                try:
                    os.killpg(transport.pid, sig)  # the group we started (setsid: its leader is chromium)
                except (ProcessLookupError, TypeError):
                    break
                ended: Deferred = Deferred()
                proc.ended.addBoth(lambda r: (ended.callback(None) if not ended.called else None, r)[1])
                try:
                    await ended.addTimeout(seconds, reactor)
                except Exception:
                    continue

        cleanups.addCleanup(lambda: Deferred.fromCoroutine(stop_chromium()))
        host, port = await proc.listening.addTimeout(CDP_TIMEOUT, reactor)
        targets = await json_get(reactor, cleanups, f"http://{host}:{port}/json/list")
        [page] = [t for t in targets if t.get("type") == "page"]
        path = "/" + page["webSocketDebuggerUrl"].split("/", 3)[3]
        devtools = DevTools(f"{host}:{port}", path)
        await connectProtocol(TCP4ClientEndpoint(reactor, host, port), devtools).addTimeout(CDP_TIMEOUT, reactor)
        cleanups.addCleanup(devtools.close)
        await devtools.ready.addTimeout(CDP_TIMEOUT, reactor)
        self = cls(devtools)
        await self.call("Page.enable")
        await self.call("Runtime.enable")
        return self

    def call(self, method: str, **params) -> Deferred:
        return self.devtools.call(method, **params)

    async def js(self, expression: str):
        """The value of a JS expression in the page (a promise is awaited)."""
        r = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise AssertionError(f"{expression[:200]}: {r['exceptionDetails'].get('exception', r['exceptionDetails'])}")
        return r["result"].get("value")

    async def until(self, expression: str, what: str, seconds: float = 15):
        """Wait (in the page, on its own timers, bounded) until ``expression`` is truthy; its value."""
        return await self.js(
            "new Promise(function (ok, no) { var end = Date.now() + %d;"
            " (function check() { var v; try { v = (%s); } catch (e) { v = null; }"
            " if (v) ok(v); else if (Date.now() > end) no(new Error(%s)); else setTimeout(check, 50); })(); })"
            % (seconds * 1000, expression, json.dumps("timed out waiting for " + what))
        )

    async def viewport(self, width: int, height: int) -> None:
        await self.call(
            "Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=width < 600
        )
        await self.until(f"window.innerWidth === {width}", f"a {width} px viewport")

    async def goto(self, url: str) -> None:
        await self.call("Page.navigate", url=url)
        await self.until(f"location.href === {json.dumps(url)} && document.readyState === 'complete'", "the page")

    async def click(self, selector: str) -> None:
        """A real click (mouse events at the element's centre), as a user's."""
        box = await self.until(
            f"(function () {{ var e = document.querySelector({json.dumps(selector)}); if (!e) return null;"
            " e.scrollIntoView({block: 'center'}); var r = e.getBoundingClientRect();"
            " return {x: r.left + r.width / 2, y: r.top + r.height / 2}; })()",
            selector,
        )
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            await self.call("Input.dispatchMouseEvent", type=kind, x=box["x"], y=box["y"], button="left", clickCount=1)

    async def screenshot(self, path) -> bytes:
        height = await self.js("Math.ceil(document.documentElement.scrollHeight)")
        width = await self.js("window.innerWidth")
        r = await self.call(
            "Page.captureScreenshot", format="png", captureBeyondViewport=True,
            clip={"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
        )
        data = base64.b64decode(r["data"])
        path.write_bytes(data)
        return data

    async def layout_problems(self, table: str) -> list:
        """What a narrow screen would cut: horizontal overflow of the document,
        cells outside the viewport or with clipped text, and (in card layout)
        cells whose column label is not shown."""
        return await self.js(
            """(function () {
              var w = window.innerWidth, out = [];
              if (document.documentElement.scrollWidth > w) out.push("document " + document.documentElement.scrollWidth + " > " + w);
              document.querySelectorAll("body *").forEach(function (e) {
                var r = e.getBoundingClientRect();
                if (r.width && (r.right > w + 0.5 || r.left < -0.5)) out.push(e.tagName + "." + e.className + " at " + r.left + ".." + r.right);
              });
              document.querySelectorAll(%s + " td").forEach(function (td) {
                if (td.scrollWidth > td.clientWidth + 1) out.push("clipped cell " + td.getAttribute("data-label"));
                var cards = getComputedStyle(td).display !== "table-cell", label = td.getAttribute("data-label");
                if (cards && label && getComputedStyle(td, "::before").content !== JSON.stringify(label)) out.push("no label " + label);
              });
              return out;
            })()""" % json.dumps(table)
        )


async def json_get(reactor, cleanups: Cleanups, url: str):
    from twisted.web.client import Agent, HTTPConnectionPool
    from treq.client import HTTPClient

    pool = HTTPConnectionPool(reactor, persistent=False)
    cleanups.addCleanup(pool.closeCachedConnections)
    response = await HTTPClient(Agent(reactor, pool=pool)).get(url).addTimeout(CDP_TIMEOUT, reactor)
    return json.loads(await response.content())


def save_screenshot(data: bytes, name: str) -> None:
    """``ACEXY_DASHBOARD_SCREENSHOT=docs/dashboard.png``: the desktop shot there, the phone one beside it."""
    target = os.environ.get("ACEXY_DASHBOARD_SCREENSHOT")
    if target:
        base, ext = os.path.splitext(target)
        with open(target if name == "desktop" else f"{base}-{name}{ext}", "wb") as f:
            f.write(data)


# -- the dashboard of a real proxy --------------------------------------------------------

TOKEN = "dash-t0ken-1"
BITRATE = 2_000_000
#: the stream table's columns, as the page heads them
COLUMNS = ["stream", "state", "engine", "clients", "in", "out", "peers", "speed", "last 10 min", "uptime", "waiting", ""]

#: every cell of each stream row by its column label, its links and its graph
ROWS = """(function () {
  var rows = Array.from(document.querySelectorAll("table.streams > tbody > tr.ts, table.streams > tbody > tr.hls"));
  return rows.map(function (r) {
    var o = {kind: r.className, cells: {}}, g = r.querySelector("svg.g");
    Array.from(r.cells).forEach(function (c) { o.cells[c.getAttribute("data-label")] = c.innerText.trim(); });
    o.play = (r.querySelector("a.play") || {}).href || null;
    o.lines = g ? Array.from(g.querySelectorAll("polyline")).map(function (p) {
      return [p.getAttribute("class"), p.getAttribute("points").split(" ").filter(Boolean).length]; }) : null;
    return o;
  });
})()"""


class HlsPoller:
    """An HLS player: polls the playlist every half second and fetches its newest segment."""

    def __init__(self, reactor, cleanups: Cleanups, proxy, manifest: str) -> None:
        from twisted.internet.task import LoopingCall

        from tests.integration.harness import http_client

        self.proxy, self.manifest = proxy, manifest
        self.client = http_client(cleanups)
        self.segments = 0
        self.errors: list = []
        self.got_segment: Deferred = Deferred()
        self._current = None
        self.loop = LoopingCall(self._poll)
        self.loop.clock = reactor
        self.loop.start(0.5, now=True).addErrback(lambda f: self.errors.append(f.getErrorMessage()))
        cleanups.addCleanup(self.stop)

    def stop(self) -> None:
        if self.loop.running:
            self.loop.stop()
        if self._current is not None and not self._current.called:
            self._current.cancel()

    def _poll(self) -> Deferred:
        self._current = Deferred.fromCoroutine(self._once())
        return self._current.addErrback(lambda f: None if self.loop is None or not self.loop.running else self.errors.append(f.getErrorMessage()))

    async def _once(self) -> None:
        from tests.integration.harness import within

        response = await within(self.client.get(self.proxy.url(self.manifest)))
        playlist = (await within(response.content())).decode()
        if response.code != 200:
            self.errors.append(response.code)
            return
        segment = [line for line in playlist.splitlines() if line and not line.startswith("#")][-1]
        response = await within(self.client.get(urljoin(self.proxy.url(self.manifest), segment)))  # relative to the playlist
        body = await within(response.content())
        if response.code == 200 and body[:1] == b"\x47":
            self.segments += 1
            if not self.got_segment.called:
                self.got_segment.callback(None)


@pytest_twisted.ensureDeferred
async def test_dashboard_of_a_real_proxy_with_a_ts_and_an_hls_stream(reactor, tmp_path):
    cleanups = Cleanups()
    try:
        await _real_proxy_dashboard(reactor, cleanups, tmp_path)
    finally:
        await cleanups.run(reactor)


async def _real_proxy_dashboard(reactor, cleanups: Cleanups, tmp_path) -> None:
    from tests.integration.harness import CID, Player, cid, get_json, sim_engine, start_proxy, wait_until, within

    hls_id = cid(0x5A)
    engine = sim_engine(cleanups, bitrate=BITRATE, hls_segment_duration=0.5)
    proxy = await start_proxy(cleanups, engine, token=TOKEN, stats_interval="1s", linger="0")
    # One TS player reading the stream, one HLS player polling its playlist and fetching segments.
    player = await Player.open(cleanups, proxy.stream_url(CID, f"&token={TOKEN}"))
    await within(player.when_received(188 * 200))
    hls_player = HlsPoller(reactor, cleanups, proxy, f"/ace/manifest.m3u8?id={hls_id}&token={TOKEN}")
    await within(hls_player.got_segment)
    [ts_session] = list(proxy.registry)
    [hls_session] = list(proxy.service.hls)

    def live(s) -> bool:
        d = s.stats.describe()
        return d["peers"] == 4 and d["bitrate_out"] > 0 and len(d["history"]) >= 3

    await wait_until(lambda: live(ts_session) and live(hls_session), "stats and 3 s of history for both streams")
    if os.environ.get("ACEXY_DASHBOARD_SCREENSHOT"):  # the docs' pictures: half a minute of graph
        await wait_until(lambda: len(ts_session.stats.history) >= 30, "30 s of history", seconds=60)
    [ts_sim] = [s for s in engine.active_sessions if s.content_key == CID]
    [hls_sim] = [s for s in engine.active_sessions if s.content_key == hls_id]

    page = await Page.open(reactor, cleanups, tmp_path)

    # -- 1280 px ---------------------------------------------------------------------
    await page.viewport(*DESKTOP)
    await page.goto(proxy.url(f"/?token={TOKEN}"))
    await page.until(
        "document.querySelectorAll('table.streams tr.ts polyline, table.streams tr.hls polyline').length === 4",
        "both streams and their graphs",
    )
    assert await page.js("Array.from(document.querySelectorAll('table.streams > thead th')).map(function (t) { return t.textContent; })") == COLUMNS
    ts_row, hls_row = await page.js(ROWS)
    speed = f"\u2193 {round(BITRATE / 8 / 1024)} KiB/s\n\u2191 {round(BITRATE / 8 / 1024) // 8} KiB/s"
    for row, key in ((ts_row, CID), (hls_row, hls_id)):
        cells = row["cells"]
        assert short(key) in cells["stream"], cells
        assert cells["peers"] == "4", cells
        assert cells["speed"] == speed, cells
        for column in ("in", "out"):
            assert re.match(r"[\d.]+ (k|M)bit/s\n[\d.]+ (B|KiB|MiB)$", cells[column]), (column, cells)
        assert "engine: " in cells["state"], cells  # the engine's own status (prebuf / dl)
        assert cells["engine"] == engine.url.replace("http://", ""), cells
        # the graph: one polyline in, one out, a point per history sample
        assert [name for name, _ in row["lines"]] == ["in", "out"], row
        assert all(points >= 3 for _, points in row["lines"]), row
        assert "copy URL" in cells[""] and "stop" in cells[""] and "open" in cells[""], cells
    assert ts_row["kind"] == "ts" and "streaming" in ts_row["cells"]["state"]
    assert hls_row["kind"] == "hls" and "HLS" in hls_row["cells"]["stream"] and "ready" in hls_row["cells"]["state"]
    # open-in-player: the plain stream URL, and the manifest for HLS, with the page's token
    assert ts_row["play"] == proxy.url(f"/ace/getstream?id={CID}&token={TOKEN}")
    assert hls_row["play"] == proxy.url(f"/ace/manifest.m3u8?id={hls_id}&token={TOKEN}")
    # the TS stream's client list, unfolded: our player
    await page.click("table.streams tr.ts button.x")
    peer = await page.until("(document.querySelector('table.streams tr.sub td.mono') || {}).textContent", "the client list")
    assert re.fullmatch(r"127\.0\.0\.1:\d+", peer), peer
    assert await page.layout_problems("table.streams") == []
    save_screenshot(await page.screenshot(tmp_path / "desktop.png"), "desktop")

    # -- 412 px (a phone) -------------------------------------------------------------
    await page.viewport(*PHONE)
    assert await page.layout_problems("table.streams") == []
    assert await page.layout_problems("table.pool") == []
    phone_rows = await page.js(ROWS)
    for row in phone_rows:  # every column is there, labelled
        assert sorted(row["cells"]) == sorted(COLUMNS), row
    save_screenshot(await page.screenshot(tmp_path / "phone.png"), "phone")

    # copy URL: a real tap; the browser's clipboard holds the stream URL after it
    await page.call("Browser.grantPermissions", permissions=["clipboardReadWrite", "clipboardSanitizedWrite"],
                    origin=proxy.url(""))
    await page.call("Emulation.setFocusEmulationEnabled", enabled=True)
    await page.click("table.streams tr.ts button.copy")
    await page.until("document.querySelector('table.streams tr.ts button.copy').textContent === 'copied'", "the copy")
    assert await page.js("navigator.clipboard.readText()") == ts_row["play"]

    # -- stop, tapped on the phone layout (it asks once more) ---------------------------
    await page.click("table.streams tr.ts button.stop")
    await page.until("document.querySelector('table.streams tr.ts button.stop').textContent === 'really stop?'", "the question")
    assert not player.ended.called and ts_sim.stop_commands == 0  # one tap stops nothing
    await page.click("table.streams tr.ts button.stop")
    await player.when_ended()
    assert player.clean_end, player.end_reason  # the player's stream really ended, cleanly
    await within(engine.when(lambda e: ts_sim.stop_commands >= 1))  # the engine got its stop command
    await page.until(
        "!document.querySelector('table.streams tr.ts') && document.querySelector('table.streams tr.hls')"
        " && /^stopped /.test(document.getElementById('note').textContent)",
        "the page to show the stream stopped",
    )
    code, doc = await get_json(cleanups, proxy.url(f"/ace/status?token={TOKEN}"))
    assert code == 200
    assert doc["sessions"] == []
    assert [h["key"] for h in doc["hls"]] == [hls_id]  # the other stream plays on
    assert hls_sim.stop_commands == 0 and not hls_sim.stopped
    assert ts_sim.stop_commands == 1
    assert TOKEN not in json.dumps(doc)
    assert hls_player.segments >= 1
    assert hls_player.errors == []  # the HLS player played on throughout


@pytest_twisted.ensureDeferred
async def test_pool_hls_and_a_refused_stop_on_the_canned_status_at_both_widths(reactor, tmp_path):
    cleanups = Cleanups()
    try:
        with FakeProxy() as proxy:
            page = await Page.open(reactor, cleanups, tmp_path)
            await page.viewport(*DESKTOP)
            await page.goto(proxy.url)
            await page.until("document.querySelectorAll('table.pool > tbody > tr').length === 2", "the pool table")
            pool = await page.js(
                "Array.from(document.querySelectorAll('table.pool > tbody > tr')).map(function (r) {"
                " return Array.from(r.cells).map(function (c) { return c.textContent; }); })"
            )
            assert pool == [
                ["http://192.168.1.20:6878", "up", "2", "2", "0", "\u2013", "3.1.74"],
                ["http://192.168.1.21:6878", "down", "0", "no limit", "3", ENGINE_ERROR, "\u2013"],
            ]
            rows = await page.js(ROWS)
            assert [r["kind"] for r in rows] == ["ts", "ts", "ts", "hls"]  # HLS sessions listed with the TS ones
            hls = rows[-1]
            assert "HLS" in hls["cells"]["stream"] and hls["cells"]["peers"] == "7"
            assert hls["lines"] == [["in", 85], ["out", 85]]
            assert rows[0]["lines"] == [["in", 0], ["out", 0]]  # no history: an empty graph, no error
            assert hls["play"] == proxy.url + f"ace/manifest.m3u8?id={KEY_HLS}"
            problems = await page.layout_problems("table.streams")
            assert problems == [], problems
            for width in (PHONE[0], 360):
                await page.viewport(width, PHONE[1])
                for table in ("table.streams", "table.pool", "table.kv"):
                    assert await page.layout_problems(table) == [], (width, table)
            # This server refuses POST (501): the page says so and carries on.
            await page.click("table.streams tr.hls button.stop")
            assert not any(r.startswith("POST") for r in proxy.requests)  # one tap sends nothing
            await page.until("document.querySelector('table.streams tr.hls button.stop').textContent === 'really stop?'", "the question")
            await page.until("document.querySelector('table.streams tr.hls button.stop').textContent === 'stop'", "the question to lapse", seconds=8)
            await page.click("table.streams tr.hls button.stop")
            await page.click("table.streams tr.hls button.stop")
            message = await page.until(
                "/could not stop/.test(document.getElementById('note').textContent) && document.getElementById('note').textContent",
                "the refusal",
            )
            assert "HTTP 501 this status server stops nothing" in message, message
            assert [r for r in proxy.requests if r.startswith("POST")] == [f"POST /ace/stop?id={KEY_HLS}"]
            assert await page.js("document.getElementById('note').className") == "box err"
            # the page refreshes after the answer, and the button is back
            await page.until("document.querySelector('table.streams tr.hls button.stop').disabled === false", "the button back")
    finally:
        await cleanups.run(reactor)
