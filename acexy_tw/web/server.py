"""
The HTTP server side: what a connection may cost before any route sees it.

:class:`QuietSite` (built once, in :func:`acexy_tw.build.build`) serves every
connection with an :class:`AcexyChannel` and every request with an
:class:`AcexyRequest`:

No request bodies
    No route takes one. A request that announces a body (``Content-Length``
    above 0, or any ``Transfer-Encoding``) gets ``413`` and the connection is
    closed as soon as its headers are in: before the token check, before
    routing, before Twisted would store the body (it spools any body of
    100 kB or more to a temporary file) and without ever answering
    ``Expect: 100-continue`` with ``100``. A body-less request's ``Expect``
    header is dropped, so ``100 Continue`` is never sent at all.

A header deadline, not an idle timer (``ACEXY_HEADER_TIMEOUT``)
    Twisted's channel timeout restarts on every byte, so a client sending a
    byte a second keeps its connection forever. Here the same timer runs from
    the moment the connection is accepted (or the previous response ended,
    for the next request on a kept-alive connection) and bytes do not push
    it back: a connection that has not delivered complete request headers in
    time is aborted (its descriptor freed at once, no reply). While a request
    is being answered the timer is off, as in Twisted (streams are long).

A connection cap (``ACEXY_MAX_CONNECTIONS``)
    At most that many connections are open (plus :data:`HEALTH_SLOTS`). A
    connection accepted at the cap makes room by aborting the oldest
    connection that is still waiting for its request headers (slow or idle:
    nothing is being served on it), so however many slow connections arrive,
    file descriptors do not run out and ``/healthz`` answers: a probe sends
    its request at once, a slow connection never completes one. When every
    open connection is being served, up to :data:`HEALTH_SLOTS` more are let
    in for ``/healthz`` alone (any other request on them: ``503``); past
    those a connection is answered ``503`` and closed at once, unread.

Responses counted by route (``on_response``)
    Every response is reported as it ends (finished, or cut when its
    connection went away after it had begun) as ``(route, status code, body
    bytes sent)``: the route is one of :data:`ROUTES`, from the path alone
    (:func:`route_of`), never the path itself, so the metrics' label values
    stay a small fixed set; any other path is :data:`OTHER_ROUTE`. The
    ``413`` and ``503`` answered before routing are reported too (a
    connection refused at the cap, unread, as :data:`OTHER_ROUTE`); a request
    whose player left before any response began is not a response.

Log lines carry no token
    The access log (``ACEXY_ACCESS_LOG``) and the request's ``repr`` (which
    Twisted puts into its own warnings) show URIs with ``token=`` values
    redacted (:func:`acexy_tw.logs.redact`) and cut at
    :data:`LOGGED_URI_LIMIT` bytes.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any, Callable, Optional

from twisted.web.http import HTTPChannel, combinedLogFormatter
from twisted.web.server import Request, Site

from acexy_tw.logs import get_logger, redact, redact_bytes
from acexy_tw.web.guard import OPEN_PATHS

__all__ = [
    "AcexyChannel",
    "AcexyRequest",
    "HEALTH_SLOTS",
    "LOGGED_URI_LIMIT",
    "OTHER_ROUTE",
    "QuietSite",
    "ROUTES",
    "route_of",
]

log = get_logger(__name__)

#: connections let in past the cap, for /healthz only, when none can be cut
HEALTH_SLOTS = 4

#: the longest URI (and Referer, User-Agent) written to a log line
LOGGED_URI_LIMIT = 512

#: the routes responses are counted under (acexy_tw.web.app's), and the rest
ROUTES = (
    "getstream",
    "manifest",
    "segment",
    "status",
    "stop",
    "playlist",
    "playlists",
    "dashboard",
    "healthz",
    "metrics",
    "other",
)
OTHER_ROUTE = "other"

_EXACT_ROUTES = {
    b"/ace/getstream": "getstream",
    b"/ace/getstream/": "getstream",
    b"/ace/manifest.m3u8": "manifest",
    b"/ace/status": "status",
    b"/ace/status/": "status",
    b"/ace/stop": "stop",
    b"/ace/playlists": "playlists",
    b"/": "dashboard",
    b"/healthz": "healthz",
    b"/metrics": "metrics",
}
_PREFIX_ROUTES = ((b"/ace/hls/", "segment"), (b"/ace/playlist/", "playlist"))


def route_of(path: Optional[bytes]) -> str:
    """The route ``path`` (no query) belongs to: one of :data:`ROUTES`."""
    if not path:
        return OTHER_ROUTE
    route = _EXACT_ROUTES.get(path)
    if route is not None:
        return route
    for prefix, route in _PREFIX_ROUTES:
        if path.startswith(prefix) and len(path) > len(prefix):
            return route
    return OTHER_ROUTE


def _uri_path(uri: Optional[bytes]) -> bytes:
    return (uri or b"").split(b"?", 1)[0]


def _responded(channel: Any, route: str, code: int, body_bytes: int) -> None:
    """Tell the channel's site (a QuietSite) that a response ended."""
    site = getattr(channel, "site", None)
    if site is not None and hasattr(site, "acexy_responded"):
        site.acexy_responded(route, code, body_bytes)


_413 = b"HTTP/1.1 413 Request Entity Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_503 = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 5\r\nConnection: close\r\n\r\n"


def _shown(value: Optional[bytes]) -> Optional[bytes]:
    """``value`` as a log line may show it: token redacted, at most LOGGED_URI_LIMIT bytes."""
    if value is None:
        return None
    value = redact_bytes(value)
    if len(value) > LOGGED_URI_LIMIT:
        value = value[:LOGGED_URI_LIMIT] + b"..."
    return value


class AcexyRequest(Request):
    """A request that never stores a body and never shows its token."""

    #: the token that let this request through (decoded text), set by
    #: :class:`acexy_tw.web.guard.TokenGuard`; None when no token is configured
    acexy_token: Optional[str] = None

    def gotLength(self, length: Optional[int]) -> None:
        # The channel refuses every request with a body before this is called;
        # never let Twisted spool one to a temporary file all the same.
        self.content = BytesIO()

    #: reported to the site (once) as it ended
    _acexy_reported = False

    def process(self) -> None:
        if getattr(self.channel, "acexy_health_only", False) and self.path not in OPEN_PATHS:
            self._acexy_reported = True  # answered raw, not through finish()
            _responded(self.channel, route_of(self.path), 503, 0)
            self.channel.acexy_refuse(_503)
            return
        super().process()

    def finish(self) -> None:
        if not self._disconnected:
            self._acexy_ended(self.code, self.sentLength)
        super().finish()

    def connectionLost(self, reason: Any) -> None:
        if not self.finished and self.startedWriting:  # cut: what it sent counts
            self._acexy_ended(self.code, self.sentLength)
        super().connectionLost(reason)

    def _acexy_ended(self, code: int, sent: int) -> None:
        if self._acexy_reported:
            return
        self._acexy_reported = True
        _responded(self.channel, route_of(getattr(self, "path", None)), code, sent)

    def __repr__(self) -> str:
        uri = (_shown(self.uri) or b"").decode("latin-1")
        return f"<{type(self).__name__} at 0x{id(self):x} method={self.method!r} uri={uri} clientproto={self.clientproto!r}>"


class _Shown:
    """The request as the access log formatter reads it: URI and headers redacted and cut."""

    def __init__(self, request: Any) -> None:
        self._request = request
        self.uri = _shown(request.uri)

    def getHeader(self, name: bytes) -> Optional[bytes]:
        return _shown(self._request.getHeader(name))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


def access_log_formatter(timestamp: str, request: Any) -> str:
    """Twisted's combined log line, with no token and no URI longer than LOGGED_URI_LIMIT."""
    return redact(combinedLogFormatter(timestamp, _Shown(request)))


class AcexyChannel(HTTPChannel):
    """An HTTPChannel with a header deadline, no request bodies and a place under the site's cap."""

    #: let in past the cap: may only ask for /healthz
    acexy_health_only = False
    _refused = False

    def connectionMade(self) -> None:
        super().connectionMade()  # starts the header deadline (the site's timeOut)
        admitted = self.site.acexy_admit(self)
        if not admitted:
            _responded(self, OTHER_ROUTE, 503, 0)  # unread: no route known
            self.acexy_refuse(_503)

    def resetTimeout(self) -> None:
        """Bytes do not push the header deadline back (Twisted's resets it on every byte)."""

    def timeoutConnection(self) -> None:
        # Headers not complete in time (or a kept-alive connection idle that
        # long): free the descriptor now. Not logged at info: a slowloris
        # would write one line per connection.
        log.debug("closing a connection that sent no complete request in time")
        self.site.acexy_release(self)
        self.transport.abortConnection()

    def acexy_refuse(self, response: bytes) -> None:
        """Answer ``response`` (a whole raw HTTP response) and close; ignore anything more."""
        self._refused = True
        self.persistent = False
        self.setTimeout(None)
        self.site.acexy_release(self)
        self.transport.write(response)
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if not self._refused:
            super().dataReceived(data)

    def rawDataReceived(self, data: bytes) -> None:
        if not self._refused:
            super().rawDataReceived(data)

    def allHeadersReceived(self) -> None:
        request = self.requests[-1]
        headers = request.requestHeaders
        if self.length != 0 or headers.hasHeader(b"transfer-encoding"):
            # A body is announced: refuse before Twisted opens a file for it
            # (gotLength) or invites it (100 Continue). The channel's parser
            # goes on in raw mode (length None), where rawDataReceived drops it.
            self.requests.remove(request)
            self.length = None
            _responded(self, route_of(_uri_path(getattr(self, "_path", None))), 413, 0)
            self.acexy_refuse(_413)
            return
        headers.removeHeader(b"expect")  # no body: nothing to continue with
        self.site.acexy_busy(self)
        super().allHeadersReceived()

    def requestDone(self, request: Any) -> None:
        # Waiting for the next request from here on (Twisted restarts the
        # deadline); marked first, as a pipelined request may start inside.
        self.site.acexy_waiting(self)
        super().requestDone(request)

    def connectionLost(self, reason: Any) -> None:
        self.site.acexy_release(self)
        super().connectionLost(reason)


class QuietSite(Site):
    """
    The proxy's Site: the channel and request above, the header deadline
    (``header_timeout``, on ``reactor``), the connection cap
    (``max_connections``), a per-request access log that is off unless
    asked for (flash wear on routers) and shows no token, and
    ``on_response(route, code, body_bytes)`` told of every response as it
    ends (the metrics).
    """

    noisy = False
    protocol = AcexyChannel
    requestFactory = AcexyRequest

    def __init__(
        self,
        resource: Any,
        *,
        reactor: Any,
        access_log: bool = False,
        header_timeout: float = 10.0,
        max_connections: int = 1024,
        on_response: Optional[Callable[[str, int, int], None]] = None,
    ) -> None:
        super().__init__(resource, reactor=reactor, timeout=header_timeout, logFormatter=access_log_formatter)
        self._on_response = on_response
        self.access_log = access_log
        self.max_connections = max_connections
        #: every connection counted against the cap, oldest first -> waiting for its request headers?
        self._open: dict[Any, bool] = {}
        #: connections let in past the cap for /healthz (not counted in _open)
        self._health: dict[Any, bool] = {}
        #: connections aborted to make room, and connections refused with 503 at the cap
        self.evicted = 0
        self.refused = 0

    @property
    def open_connections(self) -> int:
        return len(self._open) + len(self._health)

    def log(self, request: Any) -> None:
        if self.access_log:
            super().log(request)

    def acexy_responded(self, route: str, code: int, body_bytes: int) -> None:
        """A response ended: ``route`` (one of ROUTES), its status, the body bytes sent."""
        if self._on_response is not None:
            self._on_response(route, code, body_bytes)

    # -- the cap, as AcexyChannel reports its connection's life --------------

    def acexy_admit(self, channel: Any) -> bool:
        if len(self._open) >= self.max_connections:
            oldest = next((c for c, waiting in self._open.items() if waiting), None)
            if oldest is not None:
                self.evicted += 1
                self.acexy_release(oldest)
                oldest.transport.abortConnection()
            elif len(self._health) < HEALTH_SLOTS:
                channel.acexy_health_only = True
                self._health[channel] = True
                return True
            else:
                self.refused += 1
                return False
        self._open[channel] = True
        return True

    def _where(self, channel: Any) -> Optional[dict[Any, bool]]:
        if channel in self._open:
            return self._open
        if channel in self._health:
            return self._health
        return None

    def acexy_busy(self, channel: Any) -> None:
        where = self._where(channel)
        if where is not None:
            where[channel] = False

    def acexy_waiting(self, channel: Any) -> None:
        where = self._where(channel)
        if where is not None:
            where[channel] = True

    def acexy_release(self, channel: Any) -> None:
        self._open.pop(channel, None)
        self._health.pop(channel, None)
