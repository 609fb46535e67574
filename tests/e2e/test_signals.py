"""
SIGHUP on the real ``twistd -n acexy`` (issue #12, point 8): the logrotate
convention. With ``--logfile`` the file is reopened (the test renames it
first, as logrotate does, and a new file appears with the later lines); the
process never ends on it and keeps serving; SIGTERM then stops it cleanly.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.web.client import Agent, HTTPConnectionPool
from treq.client import HTTPClient

from tests.e2e.test_twistd import DEMO_ID, ROOT, TIMEOUT, TWISTD, Reader, Twistd, clean_env, stop

ANNOUNCE = re.compile(r"serving on [\d.]+:(\d+)")


def poll_until(reactor, probe, failure, seconds: float = TIMEOUT) -> Deferred:
    """Fires with ``probe()``'s first result that is not None (checked every 20 ms);
    after ``seconds`` fails with ``AssertionError(failure())``."""
    d: Deferred = Deferred()

    def check() -> None:
        result = probe()
        if result is not None:
            loop.stop()
            d.callback(result)

    loop = LoopingCall(check)
    loop.clock = reactor
    loop.start(0.02, now=True)

    def timed_out(f):
        if loop.running:
            loop.stop()
        raise AssertionError(failure())

    return d.addTimeout(seconds, reactor).addErrback(timed_out)


def when_file(reactor, path: Path, predicate, what: str, seconds: float = TIMEOUT) -> Deferred:
    """Fires with the file's text once ``predicate(text)`` holds (polled, bounded)."""

    def probe():
        try:
            text = path.read_text(errors="replace")
        except FileNotFoundError:
            return None
        return text if predicate(text) else None

    return poll_until(reactor, probe, lambda: f"timed out waiting for {what} in {path}", seconds)


async def one_megabyte(reactor, client: HTTPClient, port: int) -> int:
    response = await client.get(
        f"http://127.0.0.1:{port}/ace/getstream?id={DEMO_ID}", unbuffered=True
    ).addTimeout(TIMEOUT, reactor)
    assert response.code == 200
    reader = Reader(1024 * 1024)
    response.deliverBody(reader.protocol)
    return len(await reader.done.addTimeout(TIMEOUT, reactor))


@pytest_twisted.ensureDeferred
async def test_sighup_reopens_the_log_file_and_keeps_serving(reactor, tmp_path):
    logfile = tmp_path / "acexy.log"
    rotated = tmp_path / "acexy.log.1"
    proc = Twistd()
    proc.port.addErrback(lambda _: None)  # announced in the log file, not on stdout
    argv = [TWISTD, "-n", "--pidfile=", "--logfile", str(logfile), "acexy", "--demo",
            "--listen", "tcp:0:interface=127.0.0.1", "--linger", "0"]
    reactor.spawnProcess(proc, TWISTD, argv, env=clean_env(), path=str(ROOT))
    pool = HTTPConnectionPool(reactor, persistent=False)
    client = HTTPClient(Agent(reactor, pool=pool))
    try:
        text = await when_file(reactor, logfile, ANNOUNCE.search, "the serving line")
        port = int(ANNOUNCE.search(text).group(1))
        assert await one_megabyte(reactor, client, port) == 1024 * 1024

        logfile.rename(rotated)  # what logrotate does before it signals
        sent = time.monotonic()
        proc.transport.signalProcess(signal.SIGHUP)
        await when_file(reactor, logfile, lambda t: "SIGHUP: reopened 1 log file" in t, "the reopen line")
        took = time.monotonic() - sent
        assert proc.status is None and proc.signal is None  # still running

        assert await one_megabyte(reactor, client, port) == 1024 * 1024  # still serving
        proc.transport.signalProcess(signal.SIGHUP)  # and again: never fatal
        await when_file(reactor, logfile, lambda t: t.count("SIGHUP: reopened 1 log file") == 2, "the second reopen")
        assert await one_megabyte(reactor, client, port) == 1024 * 1024

        await pool.closeCachedConnections()
        await stop(reactor, proc, within=5)
        assert (proc.status, proc.signal) in ((0, None), (None, signal.SIGTERM)), proc.output
        old, new = rotated.read_text(), logfile.read_text()
        assert "serving on" in old and "SIGHUP" not in old  # the rotated file got nothing after the move
        assert "serving on" not in new and "Main loop terminated" in new  # the later lines, to the end
        print(f"\nSIGHUP: log reopened {took * 1000:.0f} ms after the signal; old file {len(old)} bytes,"
              f" new file {len(new)} bytes; served 1 MiB before, between and after; SIGTERM: exit {proc.status}, signal {proc.signal}")
    finally:
        if proc.status is None and proc.signal is None:
            proc.transport.signalProcess(signal.SIGKILL)
        await pool.closeCachedConnections()


@pytest_twisted.ensureDeferred
async def test_sighup_with_stdout_logging_changes_nothing(reactor):
    proc = Twistd()
    argv = [TWISTD, "-n", "--pidfile=", "acexy", "--demo", "--listen", "tcp:0:interface=127.0.0.1", "--linger", "0"]
    reactor.spawnProcess(proc, TWISTD, argv, env=clean_env(), path=str(ROOT))
    pool = HTTPConnectionPool(reactor, persistent=False)
    client = HTTPClient(Agent(reactor, pool=pool))
    try:
        port = await proc.port.addTimeout(TIMEOUT, reactor)
        proc.transport.signalProcess(signal.SIGHUP)
        await when_output(reactor, proc, "SIGHUP: no log file to reopen")
        assert await one_megabyte(reactor, client, port) == 1024 * 1024
        await pool.closeCachedConnections()
        await stop(reactor, proc, within=5)
        assert (proc.status, proc.signal) in ((0, None), (None, signal.SIGTERM)), proc.output
    finally:
        if proc.status is None and proc.signal is None:
            proc.transport.signalProcess(signal.SIGKILL)
        await pool.closeCachedConnections()


def when_output(reactor, proc: Twistd, needle: str, seconds: float = TIMEOUT) -> Deferred:
    return poll_until(
        reactor,
        lambda: True if needle.encode() in proc.output else None,
        lambda: f"timed out waiting for {needle!r}: {proc.output[-2000:]!r}",
        seconds,
    )
