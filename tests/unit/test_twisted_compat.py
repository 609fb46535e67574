"""
acexy_tw._twisted_compat: each private path is taken on the installed Twisted,
which is in the range setup.py declares, and each falls back to its public
path, still correct, when the private name is taken away.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import twisted
from packaging.requirements import Requirement
from packaging.version import Version
from twisted.internet import abstract, tcp
from twisted.internet.defer import succeed
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web import client
from twisted.web._newclient import Request
from twisted.web.client import HTTP11ClientProtocol, HTTPConnectionPool
from twisted.web.http_headers import Headers

from acexy_tw import _twisted_compat as compat
from acexy_tw.streaming import sink

ROOT = Path(__file__).resolve().parents[2]


def twisted_requirement() -> Requirement:
    """The ``twisted`` entry of setup.py's ``install_requires``."""
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            for entry in ast.literal_eval(node.value):
                requirement = Requirement(entry)
                if requirement.name.lower() == "twisted":
                    return requirement
    raise AssertionError("setup.py declares no twisted requirement")


def test_the_installed_twisted_is_in_the_range_setup_py_declares() -> None:
    # The private paths below are asserted on this Twisted only: an upgrade
    # past the range is a deliberate edit of setup.py, and these tests with it.
    requirement = twisted_requirement()
    assert any(spec.operator in ("<", "<=", "~=", "==") for spec in requirement.specifier), requirement
    assert requirement.specifier.contains(Version(twisted.__version__), prereleases=True), (
        twisted.__version__,
        str(requirement.specifier),
    )


def test_every_private_path_is_taken_on_the_installed_twisted() -> None:
    assert compat.HAS_WRITE_BUFFER
    assert compat.HAS_WRITE_THROUGH
    assert compat.HAS_QUIET_POOL
    assert compat.HAS_READ_SIZE
    assert compat.HAS_LEAN_CHUNKED


def test_an_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError):
        compat.HAS_NOTHING_LIKE_THIS  # noqa: B018


# --- helpers -------------------------------------------------------------------


# The feature tests' own stand-ins: a socket taking ``limit`` bytes per send, a reactor recording writers.
Socket = compat._StandInSocket
Reactor = compat._StandInReactor


def server(limit: int = 1 << 30) -> tuple[tcp.Server, Socket, Reactor]:
    """A real ``tcp.Server`` (what a player's HTTP channel writes to) on a socket and reactor of our own."""
    sock, reactor = Socket(limit), Reactor()
    return tcp.Server(sock, Protocol(), ("127.0.0.1", 1), None, 1, reactor), sock, reactor  # type: ignore[arg-type]


def reprobe_import(monkeypatch: pytest.MonkeyPatch) -> None:
    """What importing the module under the test's patches would record
    (``HAS_WRITE_BUFFER = _probe_write_buffer()``); the write-through type is
    probed again on first use. Both are restored after the test."""
    monkeypatch.setattr(compat, "HAS_WRITE_BUFFER", compat._probe_write_buffer())
    monkeypatch.setattr(compat, "_fast_path_type", None)


# --- unsent_bytes ---------------------------------------------------------------


def test_unsent_bytes_counts_both_of_twisteds_buffers() -> None:
    transport, sock, _ = server(limit=2)
    assert compat.unsent_bytes(transport) == 0
    transport.write(b"abcdef")
    assert compat.unsent_bytes(transport) == 6
    transport.doWrite()  # into dataBuffer; the socket takes b"ab"
    transport.write(b"xyz")
    assert sock.sent == [b"ab"]
    assert compat.unsent_bytes(transport) == 4 + 3


def test_unsent_bytes_is_0_for_what_is_not_a_file_descriptor() -> None:
    transport = StringTransport()
    transport.write(b"held by the test transport, not by Twisted's buffer")
    assert compat.unsent_bytes(transport) == 0


def test_unsent_bytes_falls_back_to_0_without_tempDataLen(monkeypatch: pytest.MonkeyPatch) -> None:
    # A Twisted whose FileDescriptor keeps its queue length under another name.
    real_init = abstract.FileDescriptor.__init__

    def init(self: Any, reactor: Any = None) -> None:
        real_init(self, reactor)
        del self._tempDataLen

    real_write = abstract.FileDescriptor.write

    def write(self: Any, data: bytes) -> None:
        self._tempDataLen = getattr(self, "_queued", 0)
        real_write(self, data)
        self._queued = self.__dict__.pop("_tempDataLen")

    monkeypatch.setattr(abstract.FileDescriptor, "__init__", init)
    monkeypatch.setattr(abstract.FileDescriptor, "write", write)
    reprobe_import(monkeypatch)
    assert compat.HAS_WRITE_BUFFER is False
    assert compat.HAS_WRITE_THROUGH is False  # it reads the same buffer
    transport, _, _ = server()
    transport.write(b"queued")
    assert compat.unsent_bytes(transport) == 0


def test_unsent_bytes_falls_back_to_0_without_offset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(abstract.FileDescriptor, "offset")
    reprobe_import(monkeypatch)
    assert compat.HAS_WRITE_BUFFER is False
    assert compat.unsent_bytes(StringTransport()) == 0


# --- write_through ---------------------------------------------------------------


def test_sink_writes_through_the_compat_function() -> None:
    assert sink.write_through is compat.write_through


def test_write_through_sends_at_once_when_nothing_is_queued() -> None:
    transport, sock, reactor = server()
    compat.write_through(transport, b"piece")
    assert sock.sent == [b"piece"]
    assert reactor.writers == []  # no write interest, no reactor round
    assert compat.unsent_bytes(transport) == 0


def test_write_through_queues_what_the_socket_did_not_take() -> None:
    transport, sock, reactor = server(limit=2)
    compat.write_through(transport, b"piece")
    assert sock.sent == [b"pi"]
    assert compat.unsent_bytes(transport) == 3
    assert reactor.writers == [transport]
    transport.doWrite()
    assert sock.sent == [b"pi", b"ec"]


def test_write_through_queues_behind_what_is_queued() -> None:
    transport, sock, _ = server()
    transport.write(b"first")
    compat.write_through(transport, b"second")
    assert sock.sent == []
    transport.doWrite()
    assert sock.sent == [b"firstsecond"]


@pytest.mark.parametrize(
    "state",
    [
        {"TLS": True},
        {"disconnecting": 1},
        {"connected": 0},
        {"_writeDisconnected": True},
        {"dataBuffer": b"abc", "offset": 1},
    ],
)
def test_write_through_takes_write_for_tls_closing_or_busy_transports(state: dict) -> None:
    transport, sock, _ = server()
    for name, value in state.items():
        setattr(transport, name, value)
    written: list[bytes] = []
    transport.write = written.append  # type: ignore[method-assign]
    compat.write_through(transport, b"piece")
    assert sock.sent == []
    assert written == [b"piece"]


def test_write_through_takes_write_for_anything_but_a_tcp_server() -> None:
    transport = StringTransport()
    compat.write_through(transport, b"piece")
    assert transport.value() == b"piece"


def test_write_through_probes_on_first_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compat, "_fast_path_type", None)
    compat.write_through(StringTransport(), b"piece")
    assert compat._fast_path_type is tcp.Server


def test_write_through_falls_back_to_write_when_writeSomeData_does_not_send(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compat, "_fast_path_type", None)
    with pytest.MonkeyPatch.context() as changed_twisted:
        # A Twisted whose writeSomeData no longer sends (say it only queues).
        changed_twisted.setattr(tcp.Connection, "writeSomeData", lambda self, data: 0)
        assert compat.HAS_WRITE_THROUGH is False
    # A healthy transport again, but the fast path stays off: transport.write.
    transport, sock, reactor = server()
    compat.write_through(transport, b"piece")
    assert sock.sent == []
    assert compat.unsent_bytes(transport) == 5
    assert reactor.writers == [transport]


def test_write_through_falls_back_to_write_without_writeDisconnected(monkeypatch: pytest.MonkeyPatch) -> None:
    # Read with a default of True ("closing"): gone, the fast path is never
    # taken, and the feature test turns it off rather than leave it dead.
    monkeypatch.delattr(abstract.FileDescriptor, "_writeDisconnected")
    monkeypatch.setattr(abstract.FileDescriptor, "write", lambda self, data: self._tempDataBuffer.append(data))
    monkeypatch.setattr(compat, "_fast_path_type", None)
    assert compat.HAS_WRITE_THROUGH is False
    assert compat._fast_path_type is compat._NoFastPath
    transport = StringTransport()
    compat.write_through(transport, b"piece")
    assert transport.value() == b"piece"




def test_write_through_sends_a_chunks_parts_with_one_sendmsg() -> None:
    transport, sock, reactor = server()
    sent: list[list[bytes]] = []
    sock.sendmsg = lambda buffers: sent.append([bytes(b) for b in buffers]) or sum(len(b) for b in buffers)  # type: ignore[method-assign]
    piece = b"x" * 300
    compat.write_through(transport, (b"12c\r\n", memoryview(piece), b"\r\n"))
    assert sent == [[b"12c\r\n", piece, b"\r\n"]]  # as given: nothing joined first
    assert reactor.writers == []
    assert compat.unsent_bytes(transport) == 0


def test_write_through_queues_the_parts_the_socket_did_not_take() -> None:
    transport, sock, reactor = server(limit=4)
    compat.write_through(transport, [b"ab", b"cdef", b"gh"])
    assert sock.sent == [b"abcd"]
    assert compat.unsent_bytes(transport) == 4
    sock._send_limit = 1 << 30
    transport.doWrite()
    assert sock.sent == [b"abcd", b"efgh"]


def test_write_through_queues_parts_behind_what_is_queued_in_order() -> None:
    transport, sock, _ = server()
    transport.write(b"first")
    compat.write_through(transport, (b"se", memoryview(b"cond")))
    compat.write_through(transport, b"third")
    assert sock.sent == []
    transport.doWrite()
    assert sock.sent == [b"firstsecondthird"]


def test_write_through_leaves_a_failed_send_to_twisted() -> None:
    transport, sock, reactor = server()

    def broken(data: Any) -> int:
        raise ConnectionResetError(104, "reset")

    sock.send = broken  # type: ignore[method-assign]
    sock.sendmsg = broken  # type: ignore[method-assign]
    compat.write_through(transport, b"piece")
    compat.write_through(transport, (b"a", b"b"))
    assert compat.unsent_bytes(transport) == 7  # queued: Twisted's doWrite meets the error and closes
    assert transport in reactor.writers


def test_what_the_socket_did_not_take_is_handed_over_not_copied() -> None:
    transport, sock, reactor = server(limit=100)
    producer = compat._StandInProducer()
    transport.registerProducer(producer, True)
    transport.bufferSize = 50
    piece = bytes(300)
    compat.write_through(transport, piece)
    assert transport.dataBuffer is piece and transport.offset == 100  # as doWrite leaves a partial send
    assert producer.paused  # 200 bytes wait: more than the transport buffers
    assert reactor.writers == [transport]
    sock._send_limit = 1 << 30
    transport.doWrite()
    assert b"".join(sock.sent) == piece
    assert not producer.paused and compat.unsent_bytes(transport) == 0


def test_the_rest_of_a_chunk_is_handed_over_from_the_part_it_stops_in() -> None:
    transport, sock, _ = server(limit=10)
    piece = b"p" * 100
    compat.write_through(transport, (b"64\r\n", piece, b"\r\n"))
    assert transport.dataBuffer is piece and transport.offset == 6
    assert compat.unsent_bytes(transport) == 94 + 2
    sock._send_limit = 1 << 30
    transport.doWrite()
    assert b"".join(sock.sent) == b"64\r\n" + piece + b"\r\n"
    transport, sock, _ = server(limit=3)
    compat.write_through(transport, (b"ab", memoryview(b"cdef"), b"gh"))  # stops in a view: joined
    assert compat.unsent_bytes(transport) == 5
    sock._send_limit = 1 << 30
    transport.doWrite()
    assert b"".join(sock.sent) == b"abcdefgh"


def test_writes_through_only_a_plain_tcp_server() -> None:
    transport, _, _ = server()
    assert compat.writes_through(transport)
    transport.TLS = True
    assert not compat.writes_through(transport)
    assert not compat.writes_through(StringTransport())
    assert not compat.writes_through(None)


def test_write_through_falls_back_without_the_transports_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    real_init = tcp.Server.__init__

    def init(self: Any, *args: Any, **kw: Any) -> None:
        real_init(self, *args, **kw)
        self._sock, self.socket = self.socket, None  # a Twisted keeping it elsewhere

    monkeypatch.setattr(tcp.Server, "__init__", init)
    monkeypatch.setattr(compat, "_fast_path_type", None)
    assert compat.HAS_WRITE_THROUGH is False
    transport = StringTransport()
    compat.write_through(transport, (b"a", b"b"))
    assert transport.value() == b"ab"


# --- quiet_pool -----------------------------------------------------------------


class Transport(StringTransport):
    def abortConnection(self) -> None:
        self.loseConnection()


class Endpoint:
    """Connects every factory to a StringTransport, at once."""

    def __init__(self) -> None:
        self.connects = 0
        self.transports: list[Transport] = []

    def connect(self, factory: Any) -> Any:
        self.connects += 1
        self.factory = factory
        protocol = factory.buildProtocol(None)
        transport = Transport()
        protocol.makeConnection(transport)
        self.transports.append(transport)
        return succeed(protocol)


class Body(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.done = False

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.done = True


def one_request(pool: HTTPConnectionPool, endpoint: Endpoint) -> tuple[Any, bytes]:
    """A GET over a pooled connection answered with a two-byte body."""
    protocols: list[Any] = []
    pool.getConnection(("http", b"engine", 6878), endpoint).addCallback(protocols.append)
    (protocol,) = protocols
    responses: list[Any] = []
    request = Request(b"GET", b"/", Headers({b"host": [b"engine"]}), None, persistent=True)
    protocol.request(request).addCallback(responses.append)
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    (response,) = responses
    body = Body()
    response.deliverBody(body)
    assert body.done
    return protocol, body.data


SETTINGS = dict(maxPersistentPerHost=8, cachedConnectionTimeout=60, retryAutomatically=False)


def test_quiet_pool_connections_are_quiet_read_large_and_go_back_to_the_pool() -> None:
    pool = compat.quiet_pool(Clock(), read_size=256 * 1024, **SETTINGS)
    assert (pool.maxPersistentPerHost, pool.cachedConnectionTimeout, pool.retryAutomatically) == (8, 60, False)
    assert pool.persistent is True
    endpoint = Endpoint()
    protocol, body = one_request(pool, endpoint)
    assert body == b"ok"
    assert endpoint.factory.noisy is False
    assert isinstance(endpoint.factory, client._HTTP11ClientFactory)
    assert endpoint.transports[0].bufferSize == 256 * 1024
    again, body = one_request(pool, endpoint)
    assert (again, body, endpoint.connects) == (protocol, b"ok", 1)  # the quiescent callback reached the pool


def test_quiet_pool_takes_only_public_settings() -> None:
    with pytest.raises(TypeError, match="_factory"):
        compat.quiet_pool(Clock(), read_size=1, _factory=object)


def plain_pool_checks(pool: HTTPConnectionPool) -> None:
    """A pool of Twisted's own factory, with the settings asked for, that works."""
    assert pool._factory is HTTPConnectionPool._factory
    assert (pool.maxPersistentPerHost, pool.cachedConnectionTimeout, pool.retryAutomatically) == (8, 60, False)
    endpoint = Endpoint()
    protocol, body = one_request(pool, endpoint)
    assert body == b"ok"
    assert type(protocol) is HTTP11ClientProtocol
    assert "bufferSize" not in vars(endpoint.transports[0])
    again, body = one_request(pool, endpoint)
    assert (again, body, endpoint.connects) == (protocol, b"ok", 1)


def test_quiet_pool_falls_back_to_a_plain_pool_without_HTTP11ClientFactory(monkeypatch: pytest.MonkeyPatch) -> None:
    # (twisted.web.client is a deprecation proxy: its __dict__ is the module's)
    monkeypatch.delitem(client.__dict__, "_HTTP11ClientFactory")
    assert compat.HAS_QUIET_POOL is False
    plain_pool_checks(compat.quiet_pool(Clock(), read_size=256 * 1024, **SETTINGS))


def test_quiet_pool_falls_back_to_a_plain_pool_without_quiescentCallback(monkeypatch: pytest.MonkeyPatch) -> None:
    # A Twisted whose factory keeps the pool's callback under another name.
    factory = client._HTTP11ClientFactory

    def init(self: Any, quiescentCallback: Any, metadata: Any) -> None:
        self._onQuiescent = quiescentCallback
        self._metadata = metadata

    monkeypatch.setattr(factory, "__init__", init)
    monkeypatch.setattr(factory, "buildProtocol", lambda self, addr: HTTP11ClientProtocol(self._onQuiescent))
    assert compat.HAS_QUIET_POOL is False
    plain_pool_checks(compat.quiet_pool(Clock(), read_size=256 * 1024, **SETTINGS))


def test_quiet_pool_leaves_bufferSize_alone_when_recv_does_not_read_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tcp.Connection, "doRead", lambda self: self._dataReceived(self.socket.recv(65536)))
    assert compat.HAS_READ_SIZE is False
    assert compat.HAS_QUIET_POOL is True
    pool = compat.quiet_pool(Clock(), read_size=256 * 1024, **SETTINGS)
    endpoint = Endpoint()
    protocol, body = one_request(pool, endpoint)
    assert body == b"ok"
    assert endpoint.factory.noisy is False  # still quiet
    assert "bufferSize" not in vars(endpoint.transports[0])




# --- lean chunked decoding -----------------------------------------------------------


class Spy(Protocol):
    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.reason: Any = None

    def dataReceived(self, data: bytes) -> None:
        self.data.append(bytes(data))

    def connectionLost(self, reason: Any = None) -> None:
        self.reason = reason


def chunked_response(pool: HTTPConnectionPool, first: bytes = b"") -> tuple[Any, Any]:
    """A GET over a pooled connection answered with a chunked body's headers (and ``first``)."""
    endpoint = Endpoint()
    protocols: list[Any] = []
    pool.getConnection(("http", b"engine", 6878), endpoint).addCallback(protocols.append)
    (protocol,) = protocols
    responses: list[Any] = []
    request = Request(b"GET", b"/", Headers({b"host": [b"engine"]}), None, persistent=True)
    protocol.request(request).addCallback(responses.append)
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + first)
    (response,) = responses
    return protocol, response


def test_chunked_engine_bodies_are_decoded_by_the_lean_decoder() -> None:
    from acexy_tw.streaming.chunked import ChunkedDecoder

    pool = compat.quiet_pool(Clock(), read_size=256 * 1024, **SETTINGS)
    protocol, response = chunked_response(pool, b"5\r\nhel")
    assert isinstance(protocol._parser.bodyDecoder, ChunkedDecoder)
    body = Spy()
    response.deliverBody(body)
    protocol.dataReceived(b"lo\r\n6\r\n world\r\n0\r\n\r\n")
    assert b"".join(body.data) == b"hello world"
    assert body.reason.check(client.ResponseDone)


def test_body_spans_hands_over_each_read_as_views_of_it() -> None:
    import treq.response

    pool = compat.quiet_pool(Clock(), read_size=256 * 1024, **SETTINGS)
    protocol, response = chunked_response(pool, b"3\r\nabc\r\n")
    wrapped = treq.response._Response(response, None)  # what treq hands out
    body, spans = Spy(), []
    wrapped.deliverBody(body)
    assert compat.body_spans(wrapped, spans.append)
    read = b"2\r\nde\r\n3\r\nfgh\r\n"
    protocol.dataReceived(read)
    protocol.dataReceived(b"0\r\n\r\n")
    assert body.data == [b"abc"]  # what came before deliverBody, as before
    assert [[bytes(v) for v in run] for run in spans] == [[b"de", b"fgh"]]
    assert all(type(v) is memoryview and v.obj is read for v in spans[0])
    assert body.reason.check(client.ResponseDone)  # the end still reaches the body protocol
    assert not compat.body_spans(wrapped, spans.append)  # over


def test_a_cut_chunked_body_fails_as_with_twisteds_decoder() -> None:
    pool = compat.quiet_pool(Clock(), read_size=256 * 1024, **SETTINGS)
    protocol, response = chunked_response(pool, b"10\r\nabc")
    body = Spy()
    response.deliverBody(body)
    from twisted.internet.error import ConnectionLost
    from twisted.python.failure import Failure

    protocol.connectionLost(Failure(ConnectionLost()))
    assert body.data == [b"abc"]
    assert body.reason.check(client.ResponseFailed)


def test_a_malformed_chunked_body_fails_the_response() -> None:
    pool = compat.quiet_pool(Clock(), read_size=256 * 1024, **SETTINGS)
    protocol, response = chunked_response(pool)
    body = Spy()
    response.deliverBody(body)
    protocol.dataReceived(b"zz\r\n")
    assert body.reason is not None and body.reason.check(client.ResponseFailed)


def test_body_spans_is_false_for_a_body_not_lean_decoded() -> None:
    pool = HTTPConnectionPool(Clock())  # Twisted's own protocol
    protocol, response = chunked_response(pool, b"1\r\na\r\n")
    response.deliverBody(Spy())
    assert not compat.body_spans(response, lambda spans: None)
    assert not compat.body_spans(object(), lambda spans: None)


def test_lean_chunked_falls_back_to_twisteds_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    # A Twisted whose parser keeps its decoders elsewhere: the table is not shadowed.
    from twisted.web import _newclient
    from twisted.web.http import _ChunkedTransferDecoder

    monkeypatch.delattr(_newclient.HTTPClientParser, "_transferDecoders")
    monkeypatch.setattr(
        _newclient.HTTPClientParser, "_decoders", {b"chunked": _ChunkedTransferDecoder}, raising=False
    )
    assert compat.HAS_LEAN_CHUNKED is False


def test_lean_chunked_falls_back_without_twisteds_data_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    from twisted.web import http
    from twisted.web.http import _ChunkedTransferDecoder

    # (twisted.web.http is a deprecation proxy: its __dict__ is the module's)
    monkeypatch.delitem(http.__dict__, "_DataLoss")
    assert compat.HAS_LEAN_CHUNKED is False
    pool = compat.quiet_pool(Clock(), read_size=256 * 1024, **SETTINGS)
    monkeypatch.undo()
    protocol, response = chunked_response(pool, b"1\r\na")
    assert type(protocol._parser.bodyDecoder) is _ChunkedTransferDecoder
    body = Spy()
    response.deliverBody(body)
    assert not compat.body_spans(response, lambda spans: None)
    protocol.dataReceived(b"\r\n0\r\n\r\n")
    assert body.data == [b"a"] and body.reason.check(client.ResponseDone)


# --- leave_tls_unloaded (each in a fresh interpreter: this one has loaded both) ----


def run_fresh(code: str, tmp_path: Path) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_never_done_once_twisted_tcp_or_pyopenssl_is_loaded() -> None:
    assert "twisted.internet.tcp" in sys.modules
    assert compat.leave_tls_unloaded() is False
    assert sys.modules["OpenSSL"] is not None


def test_importing_tap_loads_neither_pyopenssl_nor_the_reactor(tmp_path: Path) -> None:
    out = run_fresh(
        """
        import sys
        import acexy_tw.tap
        print(sorted(m for m in ("OpenSSL", "cryptography", "twisted.internet.tcp", "twisted.internet.reactor",
                                 "twisted.web.client") if m in sys.modules))
        """,
        tmp_path,
    )
    assert out == "[]"


def test_pyopenssl_left_unloaded_in_a_fresh_process(tmp_path: Path) -> None:
    out = run_fresh(
        """
        import sys
        from acexy_tw import tap
        done = tap.leave_tls_unloaded()
        from twisted.internet import reactor, tcp
        import treq, twisted.web.client, twisted.web.server
        print(done, "cryptography" in sys.modules, hasattr(tcp.Server, "startTLS"))
        """,
        tmp_path,
    )
    assert out == "True False False"


def test_pyopenssl_loads_as_usual_when_a_twisted_module_needs_it(tmp_path: Path) -> None:
    # A Twisted module that imports pyOpenSSL unconditionally.
    (tmp_path / "needs_openssl.py").write_text("from OpenSSL import SSL\n")
    out = run_fresh(
        """
        import sys
        from acexy_tw import _twisted_compat as compat
        compat.TLS_LOADING_MODULES += ("needs_openssl",)
        done = compat.leave_tls_unloaded()
        import needs_openssl
        from twisted.internet import reactor
        print(done, sys.modules["OpenSSL"] is not None)
        """,
        tmp_path,
    )
    assert out == "False True"
