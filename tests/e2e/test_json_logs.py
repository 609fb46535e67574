"""
``ACEXY_LOG_FORMAT=json`` on the real ``twistd -n acexy`` (issue #14, point
2): a stream played and hung up on, a wrong token, a request without an
id, an unknown playlist and a playlist source that disappears, then SIGTERM;
every line the process wrote is one JSON object (``json.loads`` on each, and
``jq`` when it is installed) with ``time``, ``level``, ``logger`` and
``message``, and no token anywhere. With ``--logfile`` the same lines go to
the file, and SIGHUP still reopens it.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
from pathlib import Path
from urllib.parse import quote

import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.web.client import Agent, HTTPConnectionPool
from treq.client import HTTPClient

from tests.e2e.test_signals import poll_until, when_file
from tests.e2e.test_twistd import DEMO_ID, ROOT, TIMEOUT, TWISTD, Reader, Twistd, clean_env, stop

TOKEN = "s3cr&t-json-logs"
QUOTED = quote(TOKEN, safe="")
ISO_UTC_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
LEVELS = {"debug", "info", "warn", "error", "critical"}
PLAYLIST = f"#EXTM3U\n#EXTINF:-1,Demo\nacestream://{DEMO_ID}\n"


def json_env(tmp_path: Path, **extra: str) -> tuple[dict, Path]:
    source = tmp_path / "demo.m3u"
    source.write_text(PLAYLIST)
    env = clean_env(
        ACEXY_LOG_FORMAT="json",
        ACEXY_TOKEN=TOKEN,
        ACEXY_ACCESS_LOG="true",  # one line per request, the refused ones too
        ACEXY_PLAYLISTS=f"demo={source}",
        ACEXY_PLAYLIST_REFRESH="1s",
        **extra,
    )
    return env, source


def argv(*twistd_options: str) -> list[str]:
    return [TWISTD, "-n", "--pidfile=", "--logger", "acexy_tw.logs.observer", *twistd_options,
            "acexy", "--demo", "--listen", "tcp:0:interface=127.0.0.1", "--linger", "0"]


def parse_lines(text: str) -> list[dict]:
    """Every line of ``text`` as one JSON object with the four keys, or the test fails naming the line."""
    assert "\x1e" not in text
    assert text.endswith("\n"), text[-200:]
    lines = text[:-1].split("\n")  # not splitlines(): it also splits on \x1c-\x1e, \x85, \u2028
    events = []
    for n, line in enumerate(lines, 1):
        try:
            event = json.loads(line)
        except ValueError as e:
            raise AssertionError(f"line {n} is not JSON ({e}): {line!r}") from None
        assert isinstance(event, dict), line
        assert ISO_UTC_MS.match(event["time"]), line
        assert event["level"] in LEVELS, line
        assert isinstance(event["logger"], str) and event["logger"], line
        assert isinstance(event["message"], str), line
        assert "traceback" not in event or isinstance(event["traceback"], str), line
        assert not [key for key in event if key.startswith("log_")], line
        events.append(event)
    return events


def check_with_jq(text: str, events: list[dict]) -> None:
    """``jq -c .`` over the output, and ``jq -R fromjson`` line by line, give the same objects."""
    jq = shutil.which("jq")
    if jq is None:
        print("\njq is not installed: only json.loads checked the lines")
        return
    for program in ([jq, "-c", "."], [jq, "-R", "-c", "fromjson"]):
        out = subprocess.run(program, input=text, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, (program, out.stderr)
        assert [json.loads(line) for line in out.stdout.splitlines()] == events, program


def messages(events: list[dict], level: str | None = None) -> list[str]:
    return [e["message"] for e in events if level is None or e["level"] == level]


def has(events: list[dict], pattern: str, level: str | None = None) -> bool:
    return any(re.search(pattern, m) for m in messages(events, level))


class Requests:
    """The player and the mistakes, against one proxy."""

    def __init__(self, reactor, port: int) -> None:
        self.reactor = reactor
        self.base = f"http://127.0.0.1:{port}"
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.client = HTTPClient(Agent(reactor, pool=self.pool))

    async def code(self, path: str, **kw) -> int:
        response = await self.client.get(self.base + path, **kw).addTimeout(TIMEOUT, self.reactor)
        await response.content()
        return response.code

    async def play(self, limit: int) -> int:
        response = await self.client.get(
            f"{self.base}/ace/getstream?id={DEMO_ID}&token={QUOTED}", unbuffered=True
        ).addTimeout(TIMEOUT, self.reactor)
        assert response.code == 200
        reader = Reader(limit)
        response.deliverBody(reader.protocol)  # reads limit bytes, then hangs up
        return len(await reader.done.addTimeout(TIMEOUT, self.reactor))

    async def mistakes(self) -> None:
        assert await self.code(f"/ace/playlist/nope.m3u?token={QUOTED}") == 404  # unknown playlist
        assert await self.code("/ace/getstream?id=" + DEMO_ID + "&token=wrong-" + QUOTED) == 401
        assert await self.code("/ace/getstream", headers={"Authorization": f"Bearer {TOKEN}"}) == 400  # no id

    async def lose_the_playlist_source(self, source: Path, logged) -> None:
        """Serve the playlist, delete its file, and ask again until the proxy
        has said (a warning) that it serves its copy."""
        assert await self.code(f"/ace/playlist/demo.m3u?token={QUOTED}") == 200
        source.unlink()
        asking = LoopingCall(lambda: Deferred.fromCoroutine(self.code(f"/ace/playlist/demo.m3u?token={QUOTED}")))
        asking.clock = self.reactor
        done = asking.start(0.2)
        try:
            await poll_until(self.reactor, lambda: True if logged("source failed") else None,
                             lambda: "timed out waiting for the playlist warning")
        finally:
            if asking.running:
                asking.stop()
            await done

    async def close(self) -> None:
        await self.pool.closeCachedConnections()


@pytest_twisted.ensureDeferred
async def test_every_line_on_stdout_is_a_json_object(reactor, tmp_path):
    env, source = json_env(tmp_path)
    proc = Twistd()
    reactor.spawnProcess(proc, TWISTD, argv(), env=env, path=str(ROOT))
    requests = None
    try:
        port = await proc.port.addTimeout(TIMEOUT, reactor)
        requests = Requests(reactor, port)
        assert await requests.play(256 * 1024) == 256 * 1024
        await poll_until(reactor, lambda: True if b"closed (client_disconnected)" in proc.output else None,
                         lambda: f"the session did not close: {proc.output[-2000:]!r}")
        await requests.mistakes()
        await requests.lose_the_playlist_source(source, lambda needle: needle.encode() in proc.output)
        await requests.close()
        await stop(reactor, proc, within=5)
    finally:
        if proc.status is None and proc.signal is None:
            proc.transport.signalProcess(signal.SIGKILL)
        if requests is not None:
            await requests.close()
    assert (proc.status, proc.signal) in ((0, None), (None, signal.SIGTERM)), proc.output
    text = proc.output.decode("utf-8")
    assert TOKEN not in text and QUOTED not in text
    events = parse_lines(text)
    check_with_jq(text, events)

    assert has(events, r"^twistd .* starting up\.$")
    assert has(events, r"serving on 127\.0\.0\.1:\d+")
    [serving] = [e for e in events if "serving on" in e["message"]]
    assert (serving["logger"], serving["level"]) == ("acexy_tw.service", "info")
    assert serving["where"] == f"127.0.0.1:{port}"  # the event's own fields, next to the message
    assert has(events, rf"engine session for {DEMO_ID} streaming")
    assert has(events, rf"engine session for {DEMO_ID} closed \(client_disconnected\)")
    assert has(events, r'"GET /ace/playlist/nope\.m3u\?token=<redacted> HTTP/1\.1" 404 ')
    assert has(events, r'"GET /ace/getstream\?id=\w+&token=<redacted> HTTP/1\.1" 401 ')
    assert has(events, r'"GET /ace/getstream HTTP/1\.1" 400 ')
    assert has(events, r"^playlist demo: source failed .*serving the copy", level="warn")
    [warning] = [e for e in events if e["level"] == "warn" and "source failed" in e["message"]]
    assert warning["logger"] == "acexy_tw.playlists" and warning["name"] == "demo"
    assert has(events, r"^Main loop terminated\.$")
    print(f"\nJSON logs: {len(events)} lines, every one parsed; levels "
          f"{sorted({e['level'] for e in events})}; {len({e['logger'] for e in events})} loggers")


@pytest_twisted.ensureDeferred
async def test_json_lines_to_the_logfile_and_sighup_reopens_it(reactor, tmp_path):
    logfile = tmp_path / "acexy.log"
    rotated = tmp_path / "acexy.log.1"
    env, _ = json_env(tmp_path)
    proc = Twistd()
    proc.port.addErrback(lambda _: None)  # announced in the log file, not on stdout
    reactor.spawnProcess(proc, TWISTD, argv("--logfile", str(logfile)), env=env, path=str(ROOT))
    requests = None
    try:
        text = await when_file(reactor, logfile, lambda t: "serving on" in t, "the serving line")
        port = int(re.search(r"serving on [\d.]+:(\d+)", text).group(1))
        requests = Requests(reactor, port)
        assert await requests.play(64 * 1024) == 64 * 1024
        await requests.mistakes()

        logfile.rename(rotated)  # what logrotate does before it signals
        proc.transport.signalProcess(signal.SIGHUP)
        await when_file(reactor, logfile, lambda t: "SIGHUP: reopened 1 log file" in t, "the reopen line")
        assert await requests.play(64 * 1024) == 64 * 1024  # still serving
        await requests.close()
        await stop(reactor, proc, within=5)
    finally:
        if proc.status is None and proc.signal is None:
            proc.transport.signalProcess(signal.SIGKILL)
        if requests is not None:
            await requests.close()
    assert (proc.status, proc.signal) in ((0, None), (None, signal.SIGTERM)), proc.output
    old, new = rotated.read_text(encoding="utf-8"), logfile.read_text(encoding="utf-8")
    old_events, new_events = parse_lines(old), parse_lines(new)
    check_with_jq(old, old_events)
    check_with_jq(new, new_events)
    assert has(old_events, "serving on") and not has(old_events, "SIGHUP")
    assert has(new_events, r"^SIGHUP: reopened 1 log file") and has(new_events, r"^Main loop terminated\.$")
    assert TOKEN not in old + new and QUOTED not in old + new
    assert b"serving on" not in proc.output  # nothing went to stdout instead
