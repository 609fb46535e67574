"""
Every use of a Twisted API that Twisted does not promise to keep, in one place.

Each one bought something measured (README "Performance"); each one is
checked by a feature test on the running Twisted, recorded in a module-level
flag, and falls back to a public path that is slower or noisier but still
correct when the test fails. ``tests/unit/test_twisted_compat.py`` asserts
that every private path is taken on the installed Twisted, which must be in
the range ``setup.py`` declares, and that every fallback works with the
private name taken away.

Write-through to players: :func:`write_through`
    Uses ``FileDescriptor._tempDataLen``, ``dataBuffer``, ``offset`` and
    ``_writeDisconnected`` to see that a ``tcp.Server`` has nothing queued,
    and its ``socket`` (what ``getHandle`` returns) to send at once: a piece
    with ``send``, an HTTP chunk given as its parts (size line, pieces, CRLF)
    with one ``sendmsg``, nothing joined. What the socket did not take is
    left to the transport as its own ``doWrite`` leaves a partial send
    (``dataBuffer`` the piece itself, ``offset`` past what went;
    ``_maybePauseProducer`` and ``startWriting``): no copy of the rest. Twisted's ``write`` queues every
    write for the next reactor round, turns write interest on and off around
    it (two ``epoll_ctl`` calls, one more ``epoll_wait`` event and a dozen
    Python frames per player per piece) and joins what is queued (a copy),
    and its ``writeSomeData`` sends at most 128 KiB per call. Measured:
    fan-out 0.93–1.02 → 0.62–0.77 CPU s/GB, relay 1.57 → 1.28 s/GB (the
    first round, with ``writeSomeData``); the parts and coalescing: README
    "Performance".
    Feature test (``HAS_WRITE_THROUGH``, on first use): ``HAS_WRITE_BUFFER``,
    and :func:`write_through` itself, run on real ``tcp.Server`` instances
    over stand-in sockets, sends a piece and a chunk's parts straight to the
    socket when nothing is queued, queues both behind what is (and Twisted's
    ``doWrite`` then sends them in order), and leaves what the socket did not
    take, of a piece (the piece itself, the producer paused when that is more
    than the buffer, resumed once ``doWrite`` sent it) or of parts.
    Fallback: ``transport.write(data)`` / ``transport.writeSequence(parts)``.
    :func:`writes_through` says whether a transport gets the fast path (the
    players' send coalescing is for those).

Twisted's unsent bytes: :func:`unsent_bytes`
    ``len(dataBuffer) - offset + _tempDataLen`` of a ``FileDescriptor``; no
    public API says how much a transport still holds. The simulated engine
    resets a connection only once its byte budget has left that buffer, so
    a player sees exactly ``reset_after`` bytes before the RST.
    Feature test (``HAS_WRITE_BUFFER``, at import): a ``FileDescriptor`` on a
    stand-in reactor counts 0, then 3 after ``write(b"abc")``, then 2 after a
    ``doWrite`` whose send takes one byte.
    Fallback: 0, "nothing known to be queued" (what a transport that is not a
    ``FileDescriptor`` always gets): the reset comes at once rather than after
    the flush, so the simulator's reset point may come early; nothing in the
    proxy reads this.

Quiet engine connections read in large pieces: :func:`quiet_pool`
    Sets ``HTTPConnectionPool._factory`` (a documented ivar, but private) to a
    subclass of ``twisted.web.client._HTTP11ClientFactory`` that builds
    protocols with its ``_quiescentCallback``. The subclass is not ``noisy``
    (else every engine connection logs "Starting factory", STYLE.md pitfall
    14), and its protocol sets the transport's ``bufferSize``, which
    ``tcp.Connection.doRead`` passes to ``recv``: 256 KiB instead of 64 KiB
    per read, relay 1.28–1.46 → 0.95–1.12 CPU s/GB.
    Feature tests (on each call, cheap): ``HAS_QUIET_POOL``: the pool calls
    ``_factory``, which is ``_HTTP11ClientFactory``, with a quiescent callback
    the factory keeps as ``_quiescentCallback``; ``HAS_READ_SIZE``: a real
    ``tcp.Connection`` on a stand-in socket asks ``recv`` for ``bufferSize``.
    Fallback: a plain ``HTTPConnectionPool`` with the same public settings
    (connections log "Starting factory" and read 64 KiB); without
    ``HAS_READ_SIZE`` only ``bufferSize`` is left alone.

Bounded response headers on engine connections: ``header_limit`` of :func:`quiet_pool`
    Twisted's HTTP client parser (``twisted.web._newclient.HTTPParser``)
    bounds each line (``LineReceiver.MAX_LENGTH``, 16 KiB) but not how many
    header lines a response has: an engine sending 200,000 headers cost the
    proxy +31 MiB. The pool's protocol wraps the ``lineReceived`` of the
    parser that ``HTTP11ClientProtocol.request`` stores as ``_parser``
    (private), counting the status and header lines and their bytes; past
    the limit it raises :class:`ResponseHeadersTooLarge`, which the protocol
    turns into a failed response and a closed connection (its own
    ``dataReceived`` error path). Each line is also bounded by the byte limit
    (``MAX_LENGTH``, a public attribute).
    Feature test (``HAS_HEADER_LIMIT``, when read or on the first
    :func:`quiet_pool` asking for it): a request on a protocol over a
    ``StringTransport`` gets a response of too many headers: the response
    fails with ``ResponseHeadersTooLarge`` and the transport is closed; a
    normal response on another still arrives.
    Fallback: no limit on the header count (lines stay bounded by Twisted's
    16 KiB), with a warning; also what a plain pool (no ``HAS_QUIET_POOL``) gets.

Lean chunked decoding of engine bodies: ``lean_chunked`` of :func:`quiet_pool`, :func:`body_spans`
    Twisted's ``_ChunkedTransferDecoder`` appends each read to a
    ``bytearray``, copies every chunk out and deletes it from the front:
    about three and a half copies of each byte of a 64 KiB-chunked body read
    256 KiB at a time. The pool's protocol shadows the ``_transferDecoders``
    table of the parser that ``HTTP11ClientProtocol.request`` stores as
    ``_parser`` (private) on the instance, so a chunked response is decoded by
    :class:`acexy_tw.streaming.chunked.ChunkedDecoder`, given Twisted's
    ``_MalformedChunkedDataError`` and ``_DataLoss`` (private) so a bad or
    cut body fails exactly as with Twisted's decoder. It delivers one
    ``bytes`` per read (zero or one copy); :func:`body_spans` lets the engine
    connection take each read's data as ``memoryview`` spans of the read
    instead (found through the decoder's ``dataCallback``, the response's
    bound ``_bodyDataReceived``), so the TS aligner's join is the only copy.
    Feature test (``HAS_LEAN_CHUNKED``, when read or on the first
    :func:`quiet_pool`): over a stand-in transport, a chunked body cut at
    awkward places (part of it before ``deliverBody``, a CR and its LF in two
    reads, an extension, a trailer) arrives whole and ends in
    ``ResponseDone``; :func:`body_spans` takes over after ``deliverBody``; a
    body cut short ends in ``ResponseFailed``.
    Fallback: Twisted's decoder (with a warning); :func:`body_spans` then
    answers False and the body arrives through ``dataReceived`` as before.

pyOpenSSL left unloaded: :func:`leave_tls_unloaded`
    ``sys.modules["OpenSSL"] = None`` before Twisted's TCP module is imported,
    so that Twisted takes pyOpenSSL as not installed and builds its transports
    without ``startTLS``: 12 MiB of the 57 MiB idle process.
    Feature test (on the call, the only moment it can run): neither pyOpenSSL
    nor ``twisted.internet.tcp`` is loaded yet, and ``twisted.internet.tcp``
    and ``twisted.web.client`` then import without it.
    Fallback: the marker is taken back and pyOpenSSL loads as usual.

twistd's log file, for SIGHUP: :func:`log_files`
    ``LogPublisher._observers`` (the observers twistd gave the global
    publisher) and ``FileLogObserver._outFile`` (the file each writes to): no
    public API hands out the ``LogFile`` that ``twistd --logfile`` opened, and
    the service reopens it on SIGHUP (``BaseLogFile.reopen``, public) after
    logrotate has moved it.
    Feature test (``HAS_LOG_FILES``, on read): a ``textFileLogObserver`` on a
    ``BaseLogFile`` (one that opens no file) added to a fresh
    ``LogPublisher`` is found, and one on a plain stream is not.
    Fallback: no log files known; SIGHUP then reopens nothing (and still
    never ends the process).

Import cost: ``acexy_tw.tap`` imports this module before the reactor and
before :func:`leave_tls_unloaded`, and both ``twisted.internet.tcp`` and
``twisted.web.client`` load pyOpenSSL. So only the ``FileDescriptor`` test
runs at import; the others run when first needed (by then those modules are
loaded anyway), and ``HAS_WRITE_THROUGH``, ``HAS_QUIET_POOL`` and
``HAS_READ_SIZE`` (and the others) are computed when read (module ``__getattr__``).
"""

from __future__ import annotations

import functools
import importlib
import sys
import weakref
from typing import TYPE_CHECKING, Any, Callable, Optional

from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from acexy_tw.logs import get_logger

if TYPE_CHECKING:
    from twisted.web.client import HTTPConnectionPool

__all__ = [
    "HAS_HEADER_LIMIT",
    "HAS_LEAN_CHUNKED",
    "HAS_LOG_FILES",
    "HAS_QUIET_POOL",
    "HAS_READ_SIZE",
    "HAS_WRITE_BUFFER",
    "HAS_WRITE_THROUGH",
    "POOL_SETTINGS",
    "ResponseHeadersTooLarge",
    "TLS_LOADING_MODULES",
    "body_spans",
    "leave_tls_unloaded",
    "log_files",
    "quiet_pool",
    "unsent_bytes",
    "write_through",
    "writes_through",
]

log = get_logger(__name__)


class _StandInReactor:
    """Just enough of IReactorFDSet for a transport built by a feature test."""

    def __init__(self) -> None:
        self.writers: list[Any] = []

    def addReader(self, reader: Any) -> None:
        pass

    def addWriter(self, writer: Any) -> None:
        self.writers.append(writer)

    def removeReader(self, reader: Any) -> None:
        pass

    def removeWriter(self, writer: Any) -> None:
        if writer in self.writers:
            self.writers.remove(writer)


class _StandInSocket:
    """A socket that takes ``send_limit`` bytes per send and records recv sizes."""

    def __init__(self, send_limit: int = 1 << 30) -> None:
        self.sent: list[bytes] = []
        self.recv_sizes: list[int] = []
        self._send_limit = send_limit

    def setblocking(self, flag: bool) -> None:
        pass

    def fileno(self) -> int:
        return -1

    def send(self, data: Any) -> int:
        taken = bytes(data[: self._send_limit])
        self.sent.append(taken)
        return len(taken)

    def sendmsg(self, buffers: Any) -> int:
        return self.send(b"".join(buffers))

    def recv(self, size: int) -> bytes:
        self.recv_sizes.append(size)
        return b"x"


class _StandInTransport:
    """Just enough of ITransport for a client protocol a feature test drives
    (``twisted.internet.testing`` would load trial, unittest and doctest into
    the running proxy: 3 MiB)."""

    disconnecting = False

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def writeSequence(self, data: Any) -> None:
        self.written.extend(data)

    def loseConnection(self) -> None:
        self.disconnecting = True

    abortConnection = loseConnection

    def getPeer(self) -> Any:
        return None

    getHost = getPeer

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def pauseProducing(self) -> None:
        pass

    resumeProducing = stopProducing = pauseProducing


class _StandInProducer:
    """A streaming producer that records whether it was paused."""

    paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        pass


def _unsent(transport: Any) -> int:
    buffered = getattr(transport, "dataBuffer", b"")
    return len(buffered) - getattr(transport, "offset", 0) + getattr(transport, "_tempDataLen", 0)


def _warn_fallback(what: str, fallback: str) -> None:
    log.warn(
        "Twisted {version}: {what} is not what acexy_tw._twisted_compat expects; {fallback}",
        version=_twisted_version(),
        what=what,
        fallback=fallback,
    )


def _twisted_version() -> str:
    import twisted

    return str(getattr(twisted, "__version__", "?"))


# --- Twisted's write buffer -------------------------------------------------


def _probe_write_buffer() -> bool:
    """Whether ``FileDescriptor`` keeps its queue as :func:`unsent_bytes` reads it."""

    class Descriptor(FileDescriptor):
        connected = 1

        def __init__(self) -> None:
            super().__init__(reactor=_StandInReactor())  # type: ignore[arg-type]
            self.socket = _StandInSocket(send_limit=1)

        def writeSomeData(self, data: bytes) -> int:
            return self.socket.send(data)

    try:
        fd = Descriptor()
        if _unsent(fd) != 0:
            return False
        fd.write(b"abc")
        if fd._tempDataLen != 3 or _unsent(fd) != 3:
            return False
        fd.doWrite()  # the queue moves to dataBuffer; the send takes b"a"
        return fd.socket.sent == [b"a"] and fd.offset == 1 and fd.dataBuffer == b"abc" and _unsent(fd) == 2
    except Exception:
        return False


#: ``FileDescriptor`` has ``dataBuffer``/``offset``/``_tempDataLen`` as
#: :func:`unsent_bytes` and :func:`write_through` read them (tested at import).
HAS_WRITE_BUFFER = _probe_write_buffer()
if not HAS_WRITE_BUFFER:
    _warn_fallback("FileDescriptor's write buffer", "unsent bytes count as 0 and players get transport.write")


def unsent_bytes(transport: Any) -> int:
    """
    Bytes still queued in Twisted's own write buffer for ``transport``.

    Anything that is not a ``FileDescriptor`` counts as drained (0), and so
    does everything when ``HAS_WRITE_BUFFER`` is false: "nothing known to be
    queued".
    """
    if not HAS_WRITE_BUFFER:
        return 0
    return _unsent(transport)


# --- write-through ------------------------------------------------------------


class _NoFastPath:
    """No instance exists: ``type(transport) is _NoFastPath`` is never true."""


#: the transport type :func:`write_through` sends to directly: ``tcp.Server``
#: once the feature test has passed, ``_NoFastPath`` once it has failed, None
#: until it has run (on the first call or the first read of HAS_WRITE_THROUGH)
_fast_path_type: Optional[type] = None


def write_through(transport: Any, data: Any) -> None:
    """
    ``transport.write(data)``, but sent at once when nothing is queued.

    ``data`` is ``bytes``, or a tuple or list of buffers (``bytes``,
    ``memoryview``) that are one write (``transport.writeSequence``): an HTTP
    chunk as its size line, the pieces and the CRLF, sent by one
    ``sendmsg`` without being joined first.

    Twisted's TCP transport always queues a write and sends it on the next
    reactor round, turning write interest on and then off again around every
    write (and joining what is queued: a copy). A player that keeps up has an
    empty queue nearly always, so this sends straight away on the
    transport's socket and queues only what the socket did not take.
    Anything but a plain ``tcp.Server``
    with an empty queue (TLS, a transport closing, a queue not yet drained, a
    Twisted that failed the feature test) takes the ordinary ``write`` /
    ``writeSequence``, and so does a send that fails (Twisted's own next
    write then meets the error and closes the connection as usual), so order
    and flow control are Twisted's own.
    """
    fast = _fast_path_type
    if fast is None:
        fast = _write_through_type()
    parts = data if type(data) is tuple or type(data) is list else None
    if (
        type(transport) is fast
        and not getattr(transport, "TLS", False)
        and transport.connected
        and not transport.disconnecting
        and not getattr(transport, "_writeDisconnected", True)
        and getattr(transport, "_tempDataLen", None) == 0
        and transport.offset == len(transport.dataBuffer)
    ):
        try:
            sent = transport.socket.send(data) if parts is None else transport.socket.sendmsg(parts)
        except OSError:  # EAGAIN/ENOBUFS: nothing sent; anything else: Twisted's write will see it
            sent = 0
        if sent > 0:
            if parts is None:
                if sent == len(data):
                    return
                _hand_over(transport, data, sent, ())
                return
            rest = _unsent_parts(parts, sent)
            if not rest:
                return
            head, offset = rest[0]
            if type(head) is bytes:
                _hand_over(transport, head, offset, [bytes(p) if type(p) is not bytes else p for p, _ in rest[1:]])
                return
            data, parts = b"".join(memoryview(p)[o:] for p, o in rest), None
    if parts is None:
        transport.write(data)
    else:  # Twisted's transports take bytes only
        transport.writeSequence([bytes(p) if type(p) is not bytes else p for p in parts])


def writes_through(transport: Any) -> bool:
    """Whether :func:`write_through` can send on ``transport``'s socket itself:
    a plain ``tcp.Server`` (no TLS), on a Twisted that passed the feature test."""
    fast = _fast_path_type
    if fast is None:
        fast = _write_through_type()
    return type(transport) is fast and not getattr(transport, "TLS", False)


def _unsent_parts(parts: Any, sent: int) -> list[tuple[Any, int]]:
    """The parts not wholly sent after the first ``sent`` bytes went out,
    each with the offset its unsent bytes start at (0 but for the first)."""
    rest = []
    for part in parts:
        size = len(part)
        if sent >= size:
            sent -= size
            continue
        rest.append((part, sent))
        sent = 0
    return rest


def _hand_over(transport: Any, data: bytes, offset: int, then: Any) -> None:
    """Leave ``data[offset:]`` (then ``then``) to the transport as its own
    ``doWrite`` leaves a partial send: ``dataBuffer`` the object itself and
    ``offset`` where the unsent bytes start, no copy; write interest on, the
    producer paused if that is more than the transport buffers."""
    transport.dataBuffer = data
    transport.offset = offset
    if then:
        transport.writeSequence(then)  # behind it, in order; pauses and starts writing itself
        return
    transport._maybePauseProducer()
    transport.startWriting()


def _write_through_type() -> type:
    global _fast_path_type
    if _fast_path_type is None:
        fast = _probe_write_through()
        if fast is _NoFastPath:
            _warn_fallback("tcp.Server's write path", "players get transport.write (no write-through)")
        _fast_path_type = fast
    return _fast_path_type


def _probe_write_through() -> type:
    """
    ``tcp.Server`` if :func:`write_through` itself, run on real ``tcp.Server``
    instances over stand-in sockets, sends to the socket when nothing is
    queued, queues behind what is, and queues what the socket did not take;
    ``_NoFastPath`` otherwise.
    """
    global _fast_path_type
    if not HAS_WRITE_BUFFER:
        return _NoFastPath
    try:
        from twisted.internet import tcp

        def server(send_limit: int) -> tuple[Any, _StandInSocket, _StandInReactor]:
            sock, reactor = _StandInSocket(send_limit), _StandInReactor()
            return tcp.Server(sock, Protocol(), ("127.0.0.1", 1), None, 1, reactor), sock, reactor  # type: ignore[arg-type]

        _fast_path_type = tcp.Server  # tentatively, for the calls below
        idle, sock, reactor = server(send_limit=1 << 30)
        write_through(idle, b"piece")
        write_through(idle, (b"5\r\n", memoryview(b"xpiece")[1:], b"\r\n"))
        if sock.sent != [b"piece", b"5\r\npiece\r\n"] or _unsent(idle) != 0 or reactor.writers:
            return _NoFastPath
        busy, sock, reactor = server(send_limit=1 << 30)
        busy.write(b"queued")
        write_through(busy, b"piece")
        write_through(busy, [b"se", b"quence"])
        if sock.sent or _unsent(busy) != len(b"queuedpiecesequence"):
            return _NoFastPath
        busy.doWrite()
        if sock.sent != [b"queuedpiecesequence"] or _unsent(busy) != 0:
            return _NoFastPath
        short, sock, reactor = server(send_limit=2)
        producer = _StandInProducer()
        short.registerProducer(producer, True)
        short.bufferSize = 2
        piece = b"piece"
        write_through(short, piece)
        if sock.sent != [b"pi"] or _unsent(short) != len(b"ece") or not reactor.writers:
            return _NoFastPath
        if short.dataBuffer is not piece or not producer.paused:  # handed over, not copied; buffer full
            return _NoFastPath
        short.doWrite()
        short.socket._send_limit = 1 << 30
        short.doWrite()
        if sock.sent != [b"pi", b"ec", b"e"] or _unsent(short) != 0 or producer.paused or reactor.writers:
            return _NoFastPath
        parts, sock, reactor = server(send_limit=3)
        write_through(parts, (b"ab", b"cd", b"ef"))
        parts.socket._send_limit = 1 << 30
        parts.doWrite()
        if sock.sent != [b"abc", b"def"] or _unsent(parts) != 0:
            return _NoFastPath
        views, sock, reactor = server(send_limit=3)
        write_through(views, (memoryview(b"abcd"), b"ef"))
        views.socket._send_limit = 1 << 30
        views.doWrite()
        if sock.sent != [b"abc", b"def"] or _unsent(views) != 0:
            return _NoFastPath
        return tcp.Server
    except Exception:
        return _NoFastPath
    finally:
        _fast_path_type = None


# --- the engine connection pool ---------------------------------------------

#: what :func:`quiet_pool` may set: HTTPConnectionPool's public ivars
POOL_SETTINGS = frozenset({"maxPersistentPerHost", "cachedConnectionTimeout", "retryAutomatically"})


@functools.lru_cache(maxsize=None)
def _quiet_factory_type() -> type:
    from twisted.web.client import HTTP11ClientProtocol, _HTTP11ClientFactory

    class ClientProtocol(HTTP11ClientProtocol):
        def __init__(
            self,
            quiescentCallback: Callable[[Any], None],
            read_size: Optional[int],
            header_limit: Optional[tuple[int, int]] = None,
            lean_chunked: bool = False,
        ) -> None:
            super().__init__(quiescentCallback)
            self._acexy_read_size = read_size
            self._acexy_header_limit = header_limit
            self._acexy_lean_chunked = lean_chunked

        def connectionMade(self) -> None:
            super().connectionMade()
            if self._acexy_read_size is not None:
                # ``bufferSize``: what the TCP transport's doRead asks recv() for.
                self.transport.bufferSize = self._acexy_read_size

        def request(self, request: Any) -> Deferred[Any]:
            d = super().request(request)
            parser = getattr(self, "_parser", None)
            if self._acexy_header_limit is not None and parser is not None:
                _limit_header_lines(parser, *self._acexy_header_limit)
            if self._acexy_lean_chunked and parser is not None:
                _use_lean_chunked(parser)
            return d

    class QuietClientFactory(_HTTP11ClientFactory):  # type: ignore[misc]
        # Every engine connection would log "Starting factory" (STYLE.md pitfall 14).
        noisy = False

        def __init__(
            self,
            quiescentCallback: Any,
            metadata: Any,
            read_size: Optional[int] = None,
            header_limit: Optional[tuple[int, int]] = None,
            lean_chunked: bool = False,
        ) -> None:
            super().__init__(quiescentCallback, metadata)
            self._acexy_read_size = read_size
            self._acexy_header_limit = header_limit
            self._acexy_lean_chunked = lean_chunked

        def buildProtocol(self, addr: Any) -> HTTP11ClientProtocol:
            return ClientProtocol(
                self._quiescentCallback, self._acexy_read_size, self._acexy_header_limit, self._acexy_lean_chunked
            )

    QuietClientFactory.protocol_type = ClientProtocol  # for the feature test

    return QuietClientFactory


def _probe_quiet_pool() -> bool:
    """Whether HTTPConnectionPool builds its connections' factory as :func:`quiet_pool` expects."""
    try:
        from twisted.web import client

        base = client._HTTP11ClientFactory
        if not isinstance(base, type) or client.HTTPConnectionPool._factory is not base:
            return False
        factories: list[Any] = []

        class Endpoint:
            def connect(self, factory: Any) -> Deferred[Any]:
                factories.append(factory)
                return Deferred()  # never fires: nothing is connected

        client.HTTPConnectionPool(_StandInReactor(), persistent=True).getConnection("probe", Endpoint())
        if len(factories) != 1 or type(factories[0]) is not base:
            return False
        callback = factories[0]._quiescentCallback
        if not callable(callback):
            return False
        protocol = _quiet_factory_type()(callback, "probe", read_size=None).buildProtocol(None)
        return isinstance(protocol, client.HTTP11ClientProtocol)
    except Exception:
        return False


def _probe_read_size() -> bool:
    """Whether a TCP connection asks ``recv`` for its ``bufferSize``."""
    try:
        from twisted.internet import tcp

        sock = _StandInSocket()
        connection = tcp.Connection(sock, Protocol(), _StandInReactor())  # type: ignore[arg-type]
        connection.bufferSize = 12345
        connection.doRead()
        return sock.recv_sizes == [12345]
    except Exception:
        return False


class ResponseHeadersTooLarge(Exception):
    """A response had more header lines or header bytes than allowed."""


def _limit_header_lines(parser: Any, max_lines: int, max_bytes: int) -> None:
    """Bound the status and header lines ``parser`` takes: at most
    ``max_lines`` headers (plus the status line) and ``max_bytes`` in all."""
    original = parser.lineReceived
    seen = [0, 0]  # lines, bytes
    parser.MAX_LENGTH = min(getattr(parser, "MAX_LENGTH", max_bytes), max_bytes)

    def lineReceived(line: bytes) -> None:
        if getattr(parser, "state", None) in ("STATUS", "HEADER"):
            seen[0] += 1
            seen[1] += len(line) + 1
            if seen[0] > max_lines + 2 or seen[1] > max_bytes:  # + status line + blank line
                raise ResponseHeadersTooLarge(
                    f"response headers exceed {max_lines} lines or {max_bytes} bytes"
                )
        original(line)

    parser.lineReceived = lineReceived


def _probe_header_limit() -> bool:
    """Whether the pool's protocol refuses a response of too many headers,
    and still takes a normal one."""
    try:
        from twisted.web.client import ResponseFailed
        from twisted.web._newclient import Request
        from twisted.web.http_headers import Headers

        protocol_type = _quiet_factory_type().protocol_type

        def respond(head: bytes) -> tuple[list[Any], _StandInTransport]:
            transport = _StandInTransport()
            protocol = protocol_type(lambda p: None, None, (4, 1024))
            protocol.makeConnection(transport)
            outcome: list[Any] = []
            d = protocol.request(Request(b"GET", b"/", Headers({b"host": [b"probe"]}), None))
            d.addBoth(outcome.append)
            protocol.dataReceived(head)
            return outcome, transport

        ok, _ = respond(b"HTTP/1.1 200 OK\r\nA: 1\r\nB: 2\r\nContent-Length: 0\r\n\r\n")
        if len(ok) != 1 or getattr(ok[0], "code", None) != 200:
            return False
        bad, transport = respond(b"HTTP/1.1 200 OK\r\n" + b"X: 1\r\n" * 5000)
        if len(bad) != 1 or not isinstance(bad[0], Failure) or not bad[0].check(ResponseFailed):
            return False
        reasons = getattr(bad[0].value, "reasons", [])
        return any(r.check(ResponseHeadersTooLarge) for r in reasons) and transport.disconnecting
    except Exception:
        return False


# --- lean chunked decoding of engine bodies ---------------------------------------

#: id(response) -> its lean decoder, while the decoder lives. The decoder holds
#: its response (``dataCallback`` is the response's bound method), so an id
#: found here is that of a live response: no reuse, and no entry that keeps a
#: response alive.
_lean_decoders: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()


def _lean_chunked_decoder(dataCallback: Callable[[bytes], Any], finishCallback: Callable[[bytes], Any]) -> Any:
    """What the parser builds for a chunked body instead of Twisted's
    ``_ChunkedTransferDecoder``: :class:`acexy_tw.streaming.chunked.ChunkedDecoder`
    with Twisted's own exceptions, so the parser reports a malformed or cut
    body exactly as it does with its own decoder."""
    from twisted.web import http

    from acexy_tw.streaming.chunked import ChunkedDecoder

    decoder = ChunkedDecoder(
        dataCallback,
        finishCallback,
        malformed=http._MalformedChunkedDataError,
        data_loss=http._DataLoss,
        max_line=http.maxChunkSizeLineLength,
    )
    owner = getattr(dataCallback, "__self__", None)
    if owner is not None:
        _lean_decoders[id(owner)] = decoder
    return decoder


def _use_lean_chunked(parser: Any) -> None:
    """Have ``parser`` (an ``HTTPClientParser``) decode a chunked body with
    :func:`_lean_chunked_decoder`: its ``_transferDecoders`` table, shadowed
    on the instance."""
    decoders = getattr(parser, "_transferDecoders", None)
    if isinstance(decoders, dict) and b"chunked" in decoders:
        parser._transferDecoders = {**decoders, b"chunked": _lean_chunked_decoder}


def body_spans(response: Any, callback: Callable[[list[Any]], Any]) -> bool:
    """
    Have the rest of ``response``'s chunked body handed to ``callback``, one
    call per read, as a list of buffers (``memoryview`` slices of the read,
    or the read itself) instead of one ``bytes`` per read to the body
    protocol's ``dataReceived``. ``response`` is Twisted's or a wrapper of it
    (treq's, a ``proxyForInterface``: the wrapped one is its ``original``).
    Call it right after ``deliverBody`` (which
    delivers what arrived before in the ordinary way); the body protocol
    still gets ``connectionLost`` at the end, after the last span. False (and
    nothing changes) when the body is not being decoded by the lean decoder:
    not chunked, not from a :func:`quiet_pool` connection, no
    ``HAS_LEAN_CHUNKED``, or already over.
    """
    decoder = None
    for _ in range(4):  # treq's response is a proxyForInterface: its ``original`` is Twisted's
        decoder = _lean_decoders.get(id(response))
        if decoder is not None or getattr(response, "original", None) is None:
            break
        response = response.original
    if decoder is None or decoder.state == decoder.FINISHED:
        return False
    if getattr(decoder.dataCallback, "__self__", None) is not response:
        return False
    decoder.deliver_spans(callback)
    return True


def _probe_lean_chunked() -> bool:
    """Whether the pool's protocol decodes a chunked body with the lean
    decoder as Twisted's would: the body (cut at awkward places, the part
    before ``deliverBody`` buffered) arrives whole and ends in
    ``ResponseDone``; :func:`body_spans` takes over after ``deliverBody``;
    a body cut short ends in ``ResponseFailed``."""
    try:
        from twisted.internet.error import ConnectionDone
        from twisted.web._newclient import Request
        from twisted.web.client import ResponseDone, ResponseFailed
        from twisted.web.http_headers import Headers

        from acexy_tw.streaming.chunked import ChunkedDecoder

        protocol_type = _quiet_factory_type().protocol_type

        class Body(Protocol):
            def __init__(self) -> None:
                self.data: list[bytes] = []
                self.reason: Any = None

            def dataReceived(self, data: bytes) -> None:
                self.data.append(bytes(data))

            def connectionLost(self, reason: Any = None) -> None:
                self.reason = reason

        def respond(first: bytes, spans: bool) -> tuple[Any, Body, list[bytes], Any]:
            protocol = protocol_type(lambda p: None, None, None, True)
            protocol.makeConnection(_StandInTransport())
            got: list[Any] = []
            protocol.request(Request(b"GET", b"/", Headers({b"host": [b"probe"]}), None)).addBoth(got.append)
            protocol.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + first)
            body, spanned = Body(), []
            if len(got) != 1 or getattr(got[0], "code", None) != 200:
                raise AssertionError("no response")
            got[0].deliverBody(body)
            if spans and not body_spans(got[0], lambda parts: spanned.append(b"".join(parts))):
                raise AssertionError("body_spans refused")
            if not isinstance(_lean_decoders.get(id(got[0])), ChunkedDecoder):
                raise AssertionError("not the lean decoder")
            return protocol, body, spanned, got[0]

        protocol, body, _, _ = respond(b"3\r\nabc\r", spans=False)
        protocol.dataReceived(b"\n4;x=1\r\nde")
        protocol.dataReceived(b"fg\r\n0\r\nT: 1\r\n\r\n")
        if b"".join(body.data) != b"abcdefg" or body.reason is None or not body.reason.check(ResponseDone):
            return False
        protocol, body, spanned, _ = respond(b"3\r\nabc\r\n", spans=True)
        protocol.dataReceived(b"2\r\nde\r\n2\r\nfg\r\n0\r\n\r\n")
        if body.data != [b"abc"] or spanned != [b"defg"] or not body.reason.check(ResponseDone):
            return False
        protocol, body, _, _ = respond(b"10\r\nabc", spans=False)
        protocol.connectionLost(Failure(ConnectionDone()))
        return body.reason is not None and bool(body.reason.check(ResponseFailed))
    except Exception:
        return False


def quiet_pool(
    reactor: Any,
    *,
    read_size: int,
    persistent: bool = True,
    header_limit: Optional[tuple[int, int]] = None,
    lean_chunked: bool = True,
    **pool_settings: Any,
) -> HTTPConnectionPool:
    """
    An ``HTTPConnectionPool`` whose connections are not ``noisy`` and ask
    ``recv`` for ``read_size`` bytes at a time; with ``header_limit``
    (``(lines, bytes)``) a response with more header lines or header bytes
    fails (:class:`ResponseHeadersTooLarge`) and its connection is closed.

    ``pool_settings`` are HTTPConnectionPool's public ivars
    (:data:`POOL_SETTINGS`: ``maxPersistentPerHost``,
    ``cachedConnectionTimeout``, ``retryAutomatically``), set on the pool in
    either case; anything else is a TypeError. Without ``HAS_QUIET_POOL`` the
    pool is a plain one with those settings.
    """
    from twisted.web.client import HTTPConnectionPool

    unknown = sorted(set(pool_settings) - POOL_SETTINGS)
    if unknown:
        raise TypeError(f"quiet_pool(): not a public HTTPConnectionPool setting: {', '.join(unknown)}")
    pool = HTTPConnectionPool(reactor, persistent=persistent)
    for name, value in pool_settings.items():
        setattr(pool, name, value)
    if not _probe_quiet_pool():
        _warn_fallback("HTTPConnectionPool's factory", "engine connections use Twisted's own (noisy, 64 KiB reads)")
        return pool
    sized = _probe_read_size()
    if not sized:
        _warn_fallback("tcp.Connection's bufferSize", "engine connections read Twisted's 64 KiB")
    if header_limit is not None and not _probe_header_limit():
        _warn_fallback("HTTP11ClientProtocol's response parser", "engine response headers are not counted")
        header_limit = None
    if lean_chunked and not _probe_lean_chunked():
        _warn_fallback("HTTPClientParser's transfer decoders", "chunked engine bodies use Twisted's decoder")
        lean_chunked = False
    pool._factory = functools.partial(
        _quiet_factory_type(),
        read_size=read_size if sized else None,
        header_limit=header_limit,
        lean_chunked=lean_chunked,
    )
    return pool


# --- pyOpenSSL ------------------------------------------------------------------

#: the Twisted modules that load pyOpenSSL when it is installed; each must
#: import without it for :func:`leave_tls_unloaded` to keep it out
TLS_LOADING_MODULES = ("twisted.internet.tcp", "twisted.web.client")


def leave_tls_unloaded() -> bool:
    """
    Keep pyOpenSSL, and the cryptography package under it, out of a process
    that will never speak TLS: 12 MiB of the 57 MiB idle process.

    Twisted's TCP module imports pyOpenSSL whenever it is installed (for
    ``startTLS``), the moment the reactor is imported, whether or not anything
    uses it. Marked missing in ``sys.modules`` before that import, it is not
    loaded, and Twisted builds its TCP transports without ``startTLS``, just
    as where pyOpenSSL is not installed. Only done before anything has loaded
    pyOpenSSL or Twisted's TCP module; the modules that would load it
    (:data:`TLS_LOADING_MODULES`) are imported here, and if one of them
    fails without pyOpenSSL the mark is taken back. Returns whether
    pyOpenSSL was left unloaded.
    """
    if "OpenSSL" in sys.modules or "twisted.internet.tcp" in sys.modules:
        return False
    sys.modules["OpenSSL"] = None  # type: ignore[assignment]
    try:
        for name in TLS_LOADING_MODULES:
            importlib.import_module(name)
    except ImportError:
        if sys.modules.get("OpenSSL", False) is None:
            del sys.modules["OpenSSL"]
        _warn_fallback("importing without pyOpenSSL", "pyOpenSSL loads as usual")
        return False
    return True


# --- twistd's log file -----------------------------------------------------------


def _files_of(publisher: Any) -> list[Any]:
    from twisted.python.logfile import BaseLogFile

    found = []
    for observer in list(getattr(publisher, "_observers", ())):
        out = getattr(observer, "_outFile", None)
        if isinstance(out, BaseLogFile) and out not in found:
            found.append(out)
    return found


def _probe_log_files() -> bool:
    """Whether :func:`log_files` finds a ``LogFile`` behind a text observer, and only that."""
    try:
        import io

        from twisted.logger import LogPublisher, textFileLogObserver
        from twisted.python.logfile import BaseLogFile

        class StandInLogFile(BaseLogFile):
            def __init__(self) -> None:  # opens nothing
                self._file = io.StringIO()
                self.closed = False

            def _openFile(self) -> None:
                self._file = io.StringIO()

        publisher = LogPublisher()
        standin = StandInLogFile()
        publisher.addObserver(textFileLogObserver(io.StringIO()))
        publisher.addObserver(textFileLogObserver(standin))  # type: ignore[arg-type]
        return _files_of(publisher) == [standin]
    except Exception:
        return False


def log_files(publisher: Any = None) -> list[Any]:
    """
    The ``twisted.python.logfile.BaseLogFile`` objects the log observers of
    ``publisher`` (the global one by default) write to: the file of
    ``twistd --logfile``; none when twistd logs to stdout or a ``--logger``.
    Empty without ``HAS_LOG_FILES`` (warned once).
    """
    global _log_files_checked
    if _log_files_checked is None:
        _log_files_checked = _probe_log_files()
        if not _log_files_checked:
            _warn_fallback("the log publisher's observers", "SIGHUP reopens no log file")
    if not _log_files_checked:
        return []
    if publisher is None:
        from twisted.logger import globalLogPublisher as publisher
    return _files_of(publisher)


_log_files_checked: Optional[bool] = None


# --- flags computed on read -----------------------------------------------------

_FLAGS_ON_READ: dict[str, Callable[[], bool]] = {
    "HAS_WRITE_THROUGH": lambda: _write_through_type() is not _NoFastPath,
    "HAS_QUIET_POOL": _probe_quiet_pool,
    "HAS_READ_SIZE": _probe_read_size,
    "HAS_HEADER_LIMIT": _probe_header_limit,
    "HAS_LEAN_CHUNKED": _probe_lean_chunked,
    "HAS_LOG_FILES": _probe_log_files,
}


def __getattr__(name: str) -> bool:
    """``HAS_WRITE_THROUGH``, ``HAS_QUIET_POOL``, ``HAS_READ_SIZE``, ``HAS_HEADER_LIMIT``: probed when read, see the module docstring."""
    probe = _FLAGS_ON_READ.get(name)
    if probe is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return probe()
