"""
Talking to one AceStream engine (CONTRACTS.md §1).

Every call here is bounded in time by the injected clock, and every body is
read by a small protocol that aborts its connection when cancelled or when the
body grows past a limit — ``treq.collect`` can do neither (STYLE.md pitfall 3).
Response headers are bounded too (:data:`MAX_HEADERS`, :data:`MAX_HEADER_BYTES`,
applied by the connection pool, :func:`acexy_tw._twisted_compat.quiet_pool`).

The getstream URL is built from the decoded parameters of the
:class:`~acexy_tw.content.ContentKey` (only allowlisted engine options), each
encoded exactly once by ``urlencode``; ``format`` and ``pid`` are always the
proxy's own, never taken from a player.

Engine text (error messages, error pages) is shown only through :func:`_text`:
bounded, and with control characters escaped, in logs and in error bodies.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Optional
from urllib.parse import urlencode, urlsplit, urlunsplit

from twisted.internet import error as neterror
from twisted.internet.defer import CancelledError, Deferred, TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse

from acexy_tw.content import ContentKey

#: JSON answers are small; anything bigger is not an engine talking.
MAX_JSON_BODY = 256 * 1024

#: Response headers an engine (or the orchestrator) may send: a real engine
#: sends about ten. Past either limit the request fails and its connection closes.
MAX_HEADERS = 100
MAX_HEADER_BYTES = 64 * 1024

#: asks the engine to close the connection after its answer (probes)
_CLOSE = {b"Connection": [b"close"]}

#: Parameter names the proxy owns on a getstream: never taken from a key.
_PROXY_PARAMS = frozenset({"format", "pid"})


class EngineError(Exception):
    """The engine refused, failed or sent something that is not video (502)."""

    http_status = 502
    #: the metrics label (acexy_engine_errors_total{kind})
    kind = "refused"


class ContentError(EngineError):
    """The engine answered, and refused this content (its JSON ``error``):
    another engine would say the same, so placement does not try elsewhere."""

    kind = "content"


class EngineUnreachable(EngineError):
    """The request never got an HTTP answer: refused, reset, unreachable (502)."""

    kind = "unreachable"


class EngineTimeout(EngineError):
    """The engine did not answer in time (504)."""

    http_status = 504
    kind = "timeout"


class NoEngine(EngineError):
    """No engine could be had for a new session (placement's answer): 503 with
    a code and Retry-After when it is temporary, 502 when it is not."""

    def __init__(self, message: str, *, code: str, http_status: int = 503, retry_after: Optional[int] = None):
        super().__init__(message)
        self.code = code
        self.http_status = http_status
        self.retry_after = retry_after

    def as_json(self) -> dict:
        return {"error": str(self), "code": self.code, "retry_after": self.retry_after}


@dataclass(frozen=True)
class EngineAddress:
    """Where we reach an engine: what we rewrite its self-reported URLs to."""

    scheme: str
    host: str
    port: int

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.netloc}"

    def rewrite(self, url: str) -> str:
        """Point an engine-reported URL at the address we actually used."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise EngineError(f"engine sent an unusable URL: {_text(url)!r}")
        return urlunsplit((self.scheme, self.netloc, parts.path, parts.query, ""))


@dataclass(frozen=True)
class PlaybackInfo:
    """What the engine said when it accepted a session (URLs already rewritten)."""

    playback_url: str
    stat_url: str
    command_url: str
    infohash: str
    playback_session_id: str
    is_live: int


class _BodyReader(Protocol):
    """Collects a small body; cancellable; aborts past ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self._limit = limit
        self.done: Deferred[bytes] = Deferred(self._cancel)

    def _cancel(self, _: Deferred) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self._limit:
            self.transport.stopProducing()
            if not self.done.called:
                self.done.errback(EngineError(f"engine answer larger than {self._limit} bytes"))
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(reason)


def read_body(response: IResponse, limit: int = MAX_JSON_BODY) -> Deferred[bytes]:
    """The whole (small) body of ``response``; cancelling aborts the connection."""
    reader = _BodyReader(limit)
    response.deliverBody(reader)
    return reader.done


def discard_body(response: IResponse) -> None:
    """Drop a response we will not read, closing its connection."""
    response.deliverBody(_Discard())


class _Discard(Protocol):
    def connectionMade(self) -> None:
        self.transport.stopProducing()


def describe(failure: Failure) -> str:
    """A short, human reason for a network failure (no tracebacks, no URLs)."""
    if failure.check(ResponseNeverReceived, ResponseFailed):
        reasons = getattr(failure.value, "reasons", None) or []
        return _text("; ".join(r.getErrorMessage() for r in reasons) or failure.getErrorMessage())
    return _text(failure.getErrorMessage())


def was_cancelled(failure: Failure) -> bool:
    """Agent reports a cancelled request as ResponseNeverReceived([CancelledError])."""
    if failure.check(CancelledError):
        return True
    reasons = getattr(failure.value, "reasons", None) or []
    return any(r.check(CancelledError) for r in reasons)


def deadline(
    d: Deferred, seconds: float, clock: IReactorTime, settle: Callable[[Any, bool], Any]
) -> Deferred:
    """
    ``d``, cancelled after ``seconds`` on ``clock``; ``settle(result,
    timed_out)`` then maps the outcome (``timed_out``: the cancel was ours).

    (Not ``Deferred.addTimeout``: Agent turns the cancel into
    ResponseNeverReceived, which addTimeout does not recognise as its own.)
    """
    timed_out = False

    def expire() -> None:
        nonlocal timed_out
        timed_out = True
        d.cancel()

    call = clock.callLater(seconds, expire)

    def done(result: Any) -> Any:
        if call.active():
            call.cancel()
        return settle(result, timed_out)

    return d.addBoth(done)


def bounded(d: Deferred, seconds: float, clock: IReactorTime, what: str) -> Deferred:
    """
    ``d``, cancelled after ``seconds``. Failures come out typed: a timeout as
    :class:`EngineTimeout`, a request that got no HTTP answer (refused, reset,
    garbage) as :class:`EngineUnreachable`; a cancellation by the caller stays a cancellation.
    """

    def settle(result: Any, timed_out: bool) -> Any:
        if not isinstance(result, Failure):
            return result
        if timed_out or result.check(DeferredTimeout, neterror.TimeoutError):
            raise EngineTimeout(f"engine did not answer {what} within {seconds:g}s")
        if result.check(EngineError):
            return result
        if was_cancelled(result):
            raise CancelledError()
        raise EngineUnreachable(f"engine {what} failed: {describe(result)}")

    return deadline(d, seconds, clock, settle)


def _escape(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _text(raw: Any, limit: int = 200) -> str:
    """
    Engine text made safe to show: at most ``limit`` characters, stripped,
    with every non-printable character (CR, LF, ESC, NUL, bidi overrides...)
    escaped as ``\\xNN``/``\\uNNNN``. The one place engine text is
    rendered, for log lines and for error bodies alike.
    """
    if isinstance(raw, (bytes, bytearray)):
        text = bytes(raw[: limit * 4]).decode("utf-8", "replace")
    else:
        text = str(raw)
    text = text.strip()
    shown = text[:limit]
    safe = "".join(ch if ch.isprintable() else _escape(ch) for ch in shown)
    return safe + "..." if len(text) > limit else safe


def engine_query(key: ContentKey, pid: str) -> str:
    """
    The getstream / manifest query for ``key``: ``format=json``, the selector
    and forwarded options (decoded values, each encoded once here), then the
    proxy's ``pid``. Names the proxy owns are never taken from the key,
    whatever their case.
    """
    params = [(n, v) for n, v in key.engine_params() if n.lower() not in _PROXY_PARAMS]
    return urlencode([("format", "json"), *params, ("pid", pid)])


class EngineClient:
    """
    One engine: start a session, open its playback, stop it, ask its stat.

    ``http`` is a ``treq.client.HTTPClient`` built on the service's own
    connection pool (or a ``StubTreq`` in tests); ``clock`` bounds every call.
    """

    def __init__(
        self,
        http: Any,
        address: EngineAddress,
        clock: IReactorTime,
        *,
        timeout: float,
        stop_timeout: float = 5.0,
        container_id: Optional[str] = None,
    ) -> None:
        self._http = http
        self.address = address
        #: the orchestrator's container id for this engine (None: not orchestrated)
        self.container_id = container_id
        self._clock = clock
        self.timeout = timeout
        self.stop_timeout = stop_timeout

    def __repr__(self) -> str:
        return f"<EngineClient {self.address.url}>"

    # -- session start -------------------------------------------------------

    def start(self, key: ContentKey) -> Deferred[PlaybackInfo]:
        """Ask the engine for a playback session (``format=json``, fresh pid)."""
        return bounded(
            Deferred.fromCoroutine(self._start(key, "getstream")), self.timeout, self._clock, "getstream"
        )

    def start_hls(self, key: ContentKey) -> Deferred[PlaybackInfo]:
        """An HLS session: ``playback_url`` is the engine's live playlist."""
        return bounded(
            Deferred.fromCoroutine(self._start(key, "manifest.m3u8")), self.timeout, self._clock, "manifest.m3u8"
        )

    def fetch(self, url: str) -> Deferred[tuple[int, bytes]]:
        """A small document from the engine (an HLS playlist): status and body."""
        return bounded(Deferred.fromCoroutine(self._fetch(url)), self.timeout, self._clock, "playlist")

    async def _fetch(self, url: str) -> tuple[int, bytes]:
        response = await self._get(url)
        return response.code, await read_body(response)

    def get(self, url: str) -> Deferred[IResponse]:
        """A response whose body the caller reads (an HLS segment), headers bounded."""
        return bounded(self._get(url), self.timeout, self._clock, "segment")

    async def _start(self, key: ContentKey, route: str) -> PlaybackInfo:
        url = f"{self.address.url}/ace/{route}?{engine_query(key, uuid.uuid4().hex)}"
        response = await self._get(url)
        body = await read_body(response)
        return self._parse_start(response.code, body)

    def _parse_start(self, code: int, body: bytes) -> PlaybackInfo:
        try:
            doc = json.loads(body)
        except ValueError:
            raise EngineError(f"engine answered {code}: {_text(body) or 'empty body'}") from None
        if not isinstance(doc, dict):
            raise EngineError(f"engine answered {code} with unexpected JSON")
        if doc.get("error"):
            raise ContentError(f"engine error: {_text(doc['error'], 300)}")
        resp = doc.get("response")
        if not isinstance(resp, dict):
            raise EngineError(f"engine answered {code} without a session")
        try:
            return PlaybackInfo(
                playback_url=self.address.rewrite(str(resp["playback_url"])),
                stat_url=self.address.rewrite(str(resp["stat_url"])),
                command_url=self.address.rewrite(str(resp["command_url"])),
                infohash=str(resp.get("infohash") or ""),
                playback_session_id=str(resp.get("playback_session_id") or ""),
                is_live=int(resp.get("is_live") or 0),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise EngineError(f"engine session answer is incomplete: {_text(str(e))}") from None

    # -- playback --------------------------------------------------------------

    def open_playback(self, info: PlaybackInfo) -> Deferred[IResponse]:
        """The playback response, headers received and status checked (body unread)."""
        return bounded(
            Deferred.fromCoroutine(self._open_playback(info)),
            self.timeout,
            self._clock,
            "playback",
        )

    async def _open_playback(self, info: PlaybackInfo) -> IResponse:
        response = await self._get(info.playback_url)
        if response.code != 200:
            # An error page is not video: read a little of it for the message.
            body = await read_body(response, limit=MAX_JSON_BODY)
            raise EngineError(f"engine playback answered {response.code}: {_text(body) or 'no body'}")
        return response

    # -- control ---------------------------------------------------------------

    def stop(self, info: PlaybackInfo) -> Deferred[None]:
        """Send ``method=stop``; bounded by ``stop_timeout`` (engines do hang)."""
        return bounded(
            Deferred.fromCoroutine(self._command(info, "stop")),
            self.stop_timeout,
            self._clock,
            "stop",
        )

    async def _command(self, info: PlaybackInfo, method: str) -> None:
        sep = "&" if urlsplit(info.command_url).query else "?"
        doc = await self._read_json(f"{info.command_url}{sep}method={method}", f"engine {method}")
        if isinstance(doc, dict) and doc.get("error"):
            raise EngineError(f"engine {method} error: {_text(doc['error'], 300)}")

    def stat(self, info: PlaybackInfo) -> Deferred[dict]:
        return bounded(
            Deferred.fromCoroutine(self._json(info.stat_url)), self.timeout, self._clock, "stat"
        )

    def version(self, timeout: Optional[float] = None) -> Deferred[dict]:
        """Cheap liveness probe: ``/webui/api/service?method=get_version``, on
        a connection of its own that closes after the answer (a probe every
        interval never leaves an idle socket behind, nor hands a stale one to
        the next getstream)."""
        return bounded(
            Deferred.fromCoroutine(
                self._json(f"{self.address.url}/webui/api/service?method=get_version", close=True)
            ),
            timeout or self.timeout,
            self._clock,
            "get_version",
        )

    async def _json(self, url: str, close: bool = False) -> dict:
        doc = await self._read_json(url, "engine", close)
        if not isinstance(doc, dict):
            raise EngineError("engine answered unexpected JSON")
        return doc

    async def _read_json(self, url: str, who: str, close: bool = False) -> Any:
        """GET ``url``: its JSON body, or an EngineError for a non-200 or non-JSON answer."""
        response = await self._get(url, close)
        body = await read_body(response)
        if response.code != 200:
            raise EngineError(f"{who} answered {response.code}: {_text(body)}")
        try:
            return json.loads(body)
        except ValueError:
            raise EngineError(f"{who} answered non-JSON: {_text(body)}") from None

    # -- plumbing --------------------------------------------------------------

    def _get(self, url: str, close: bool = False) -> Deferred[IResponse]:
        # unbuffered: we read bodies ourselves (bounded, cancellable);
        # no redirects: an engine never redirects, and a redirect elsewhere
        # would leave the address we rewrite to.
        headers = _CLOSE if close else None
        return self._http.get(url, headers=headers, unbuffered=True, allow_redirects=False)
