"""
The router deployment: start as root, bind a privileged port, drop to an
unprivileged user (``twistd --uid``). The web listener binds in
``privilegedStartService`` — before twistd drops privileges — so port 81 works
and the process then runs as uid 65534. A taken port stops start-up with one
line naming the address, exit status non-zero.

The interpreter must be readable by the unprivileged user (on a router Python
lives in /usr). Where the test venv's Python is not (a pyenv under /root), the
same code is run by Debian's /usr/bin/python3 of the same minor version with
the venv's packages on its path.
"""

from __future__ import annotations

import os
import socket
import stat
import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.web.client import Agent, HTTPConnectionPool
from treq.client import HTTPClient

from tests.e2e.test_twistd import DEMO_ID, ROOT, TIMEOUT, TWISTD, Reader, Twistd, clean_env, stop

NOBODY = 65534


def readable_by_others(path: Path) -> bool:
    """Every directory on the way is searchable, and the file readable, by 'other'."""
    path = path.resolve()
    for p in [*reversed(path.parents), path]:
        mode = os.stat(p).st_mode
        if stat.S_ISDIR(mode) and not mode & stat.S_IXOTH:
            return False
    return bool(os.stat(path).st_mode & stat.S_IROTH)


def twistd_command() -> list[str]:
    """argv[0..] that runs twistd with an interpreter uid 65534 can read."""
    stdlib = Path(os.__file__)
    if readable_by_others(stdlib) and readable_by_others(Path(sys.executable)):
        return [TWISTD]
    system = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
    if not system.exists():
        pytest.skip(f"no interpreter readable by uid {NOBODY} ({sys.executable} is not, {system} is missing)")
    site_packages = next(p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix))
    boot = (
        "import site, sys; site.addsitedir(%r); sys.argv[0] = 'twistd'; "
        "from twisted.scripts.twistd import run; run()" % site_packages
    )
    return [str(system), "-c", boot]


def spawn_as(reactor, *args: str) -> Twistd:
    proto = Twistd()
    command = twistd_command()
    argv = [*command, "-n", "--pidfile=", *args]
    reactor.spawnProcess(proto, command[0], argv, env=clean_env(), path=str(ROOT))
    return proto


def process_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])  # real uid
    raise AssertionError("no Uid line")


def port_81_free() -> bool:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", 81))
        return True
    except OSError:
        return False
    finally:
        s.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to bind port 81 and switch users (CI runs as root)")
@pytest_twisted.ensureDeferred
async def test_binds_port_81_as_root_then_serves_as_uid_65534(reactor):
    if not port_81_free():
        pytest.skip("127.0.0.1:81 is in use on this machine")
    proc = spawn_as(reactor, "--uid", str(NOBODY), "--gid", str(NOBODY), "acexy", "--listen", "127.0.0.1:81", "--demo")
    try:
        port = await proc.port.addTimeout(TIMEOUT, reactor)
        assert port == 81
        assert process_uid(proc.transport.pid) == NOBODY
        pool = HTTPConnectionPool(reactor, persistent=False)
        client = HTTPClient(Agent(reactor, pool=pool))
        response = await client.get(
            f"http://127.0.0.1:81/ace/getstream?id={DEMO_ID}", unbuffered=True
        ).addTimeout(TIMEOUT, reactor)
        assert response.code == 200
        reader = Reader(256 * 1024)
        response.deliverBody(reader.protocol)
        data = await reader.done.addTimeout(TIMEOUT, reactor)
        assert len(data) == 256 * 1024
        assert all(data[i] == 0x47 for i in range(0, len(data) - 188, 188))
        await pool.closeCachedConnections()
    finally:
        log = await stop(reactor, proc)
    assert "set uid/gid 65534/65534" in log
    assert "Traceback" not in log, log


@pytest_twisted.ensureDeferred
async def test_a_taken_port_stops_startup_naming_it(reactor):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    number = taken.getsockname()[1]
    try:
        proto = Twistd()
        argv = [TWISTD, "-n", "--pidfile=", "acexy", "--listen", f"127.0.0.1:{number}"]
        reactor.spawnProcess(proto, TWISTD, argv, env=clean_env(), path=str(ROOT))
        status = await proto.ended.addTimeout(TIMEOUT, reactor)
    finally:
        taken.close()
    out = proto.output.decode(errors="replace")
    assert status not in (0, None), out
    lines = [line for line in out.splitlines() if "configuration error" in line]
    assert len(lines) == 1, out
    assert "ACEXY_LISTEN_ADDR" in lines[0] and str(number) in lines[0] and "in use" in lines[0], lines[0]
    assert "Traceback" not in out, out
    assert isinstance(proto.port, Deferred) and proto.port.called  # errbacked: never announced serving
    proto.port.addErrback(lambda f: None)
