"""
The dashboard page (``acexy_tw/web/dashboard.html``) rendered by a real
browser: headless Chromium loads it from a tiny HTTP server that also serves a
canned ``/ace/status`` document, and the test reads the resulting DOM and a
screenshot. Skipped when ``chromium`` is not installed.

To refresh ``docs/dashboard.png``: ``ACEXY_DASHBOARD_SCREENSHOT=docs/dashboard.png
pytest tests/e2e/test_dashboard.py``.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

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
    page's), ``/ace/status`` a canned document (or an error).
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
    assert len(html) < 20 * 1024
    assert dashboard.page() is html  # read once
    for forbidden in (b"innerHTML", b"outerHTML", b"insertAdjacentHTML", b"document.write", b"http://", b"https://"):
        assert forbidden not in html, forbidden


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
    assert len(data) > 10 * 1024
    target = os.environ.get("ACEXY_DASHBOARD_SCREENSHOT")
    if target:
        shutil.copyfile(png, target)
