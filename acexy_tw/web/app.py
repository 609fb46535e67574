"""
The HTTP surface (Klein). Thin: parse, call the registry, map errors.

Routes (acexy-compatible):
- ``GET|HEAD /ace/getstream[/]?id=|content_id=|infohash=`` — MPEG-TS;
- ``GET /ace/status[?id=]`` — JSON (TS sessions under ``sessions``, HLS ones
  under ``hls``, each with its live stats, ``history`` and ``play`` path);
- ``POST /ace/stop?id=`` — end every engine session (TS and HLS) of a content: 204;
- ``GET /ace/playlist/<name>.m3u[8][?hls=1]`` — an ACEXY_PLAYLISTS source, rewritten;
- ``GET /ace/playlists`` — their names (JSON).
Werkzeug's routing answers other methods with 405 and other paths with 404.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Optional
from urllib.parse import quote, urlencode

from klein import Klein
from twisted.internet.interfaces import IReactorTime

from acexy_tw import __version__
from acexy_tw.content import BadRequest, parse_query, strip_scheme
from acexy_tw.engine import EngineError
from acexy_tw.logs import get_logger
from acexy_tw.metrics import Metrics
from acexy_tw.playlists import PlaylistError, Playlists, UnknownPlaylist, rewrite
from acexy_tw.engine import NoEngine
from acexy_tw.streaming.hls import HlsSessions, SegmentRelay
from acexy_tw.streaming.registry import SessionRegistry
from acexy_tw.streaming.session import ShuttingDown
from acexy_tw.streaming.budget import BacklogBudget
from acexy_tw.streaming.sink import COALESCE_DELAY, ClientSink

log = get_logger(__name__)

TS_CONTENT_TYPE = b"video/MP2T"
HLS_CONTENT_TYPE = b"application/vnd.apple.mpegurl"


def _peer(request: Any) -> str:
    addr = request.getClientAddress()
    host = getattr(addr, "host", None)
    return f"{host}:{addr.port}" if host is not None else str(addr)


def _text(request: Any, code: int, message: str) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    return (message + "\n").encode("utf-8")


_HOST_RE = re.compile(rb"[A-Za-z0-9._-]+(?::[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](?::[0-9]{1,5})?")


def _base_url(request: Any) -> str:
    """This proxy's URL as the player reached it: its ``Host`` header, when
    that is a host[:port], else the address the connection came in on."""
    scheme = "https" if request.isSecure() else "http"
    host = request.getHeader(b"host") or b""
    if not _HOST_RE.fullmatch(host):
        addr = request.getHost()
        where = getattr(addr, "host", "localhost")
        where = f"[{where}]" if ":" in where else where
        host = f"{where}:{getattr(addr, 'port', 80)}".encode("ascii")
    return f"{scheme}://{host.decode('ascii')}"


def _json(request: Any, doc: Any, code: int = 200) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(doc, sort_keys=True).encode("utf-8")


def _play_path(key: Any, hls: bool = False) -> str:
    """The proxy path (relative, no token) a player opens for ``key``."""
    selector = "id" if key.key_type == "content_id" else key.key_type
    route = "ace/manifest.m3u8" if hls else "ace/getstream"
    return f"{route}?{urlencode([(selector, key.value), *key.extras])}"


def _refusal(request: Any, error: NoEngine) -> bytes:
    """No engine for now: JSON ``{"error", "code", "retry_after"}`` and Retry-After."""
    if error.retry_after is not None:
        request.setHeader(b"retry-after", str(error.retry_after).encode())
    return _json(request, error.as_json(), error.http_status)


class ProxyApp:
    app = Klein()

    def __init__(
        self,
        registry: SessionRegistry,
        clock: IReactorTime,
        *,
        buffer_size: int,
        stuck_timeout: float,
        metrics: Metrics,
        orchestrator_status: Optional[Callable[[], dict]] = None,
        hls: Optional[HlsSessions] = None,
        m3u8: bool = False,
        budget: Optional[BacklogBudget] = None,
        playlists: Optional[Playlists] = None,
        engines_status: Optional[Callable[[], list]] = None,
        coalesce_delay: float = COALESCE_DELAY,
    ) -> None:
        self.registry = registry
        self._clock = clock
        self._buffer_size = buffer_size
        #: backlog at which a blocked player holds back the engine (see sink.py)
        self._high_water = min(256 * 1024, buffer_size // 4)
        self._stuck_timeout = stuck_timeout
        self._orchestrator_status = orchestrator_status
        self.metrics = metrics
        self.hls = hls
        self.m3u8 = m3u8
        self.started_at = clock.seconds()
        #: every player's backlog together (ACEXY_MAX_BACKLOG)
        self.budget = budget
        #: ACEXY_PLAYLISTS sources (None: none configured)
        self.playlists = playlists
        #: the engine pool, each engine with its health and load (status page)
        self._engines_status = engines_status
        #: ACEXY_COALESCE_DELAY: how long a player's pieces may wait to go in one send
        self.coalesce_delay = coalesce_delay

    def resource(self) -> Any:
        return self.app.resource()

    @property
    def clients_cut(self) -> int:
        return self.metrics.clients_cut

    # -- /ace/getstream ---------------------------------------------------------

    @app.route("/ace/getstream", methods=["GET", "HEAD"], endpoint="getstream")
    @app.route("/ace/getstream/", methods=["GET", "HEAD"], endpoint="getstream_slash")
    async def getstream(self, request: Any) -> Optional[bytes]:
        if self.m3u8:  # acexy's ACEXY_M3U8: getstream answers with an HLS playlist
            return await self.manifest(request)
        try:
            key = parse_query(request.args)
        except BadRequest as e:
            return _text(request, 400, e.message)
        request.setHeader(b"content-type", TS_CONTENT_TYPE)
        request.setHeader(b"cache-control", b"no-cache, no-store")
        if request.method == b"HEAD":
            # Players probe with HEAD: answer without touching an engine.
            return b""
        transport = getattr(request, "transport", None)
        if transport is not None and hasattr(transport, "setTcpKeepAlive"):
            transport.setTcpKeepAlive(True)  # half-open players are found eventually
        sink = ClientSink(
            request,
            clock=self._clock,
            max_backlog=self._buffer_size,
            stuck_timeout=self._stuck_timeout,
            peer=_peer(request),
            high_water=self._high_water,
            on_cut=self.metrics.client_cut,
            on_first_byte=self.metrics.first_byte,
            budget=self.budget,
            coalesce_delay=self.coalesce_delay,
        )
        try:
            self.registry.join(key, sink)
        except (ShuttingDown, NoEngine) as e:  # shutting down, or the wait queue is full
            sink.end(False, e)
        try:
            await sink.done
        except NoEngine as e:
            return self._refuse(request, e)
        except EngineError as e:
            return _text(request, e.http_status, str(e))
        return None

    def _refuse(self, request: Any, error: NoEngine) -> bytes:
        """A player told "no engine": counted by code (acexy_refusals_total), then answered."""
        self.metrics.refused(error)
        return _refusal(request, error)

    # -- HLS -------------------------------------------------------------------------

    @app.route("/ace/manifest.m3u8", methods=["GET", "HEAD"], endpoint="manifest")
    async def manifest(self, request: Any) -> Optional[bytes]:
        try:
            key = parse_query(request.args)
        except BadRequest as e:
            return _text(request, 400, e.message)
        if self.hls is None:
            return _text(request, 404, "HLS is not enabled")
        if request.method == b"HEAD":
            request.setHeader(b"content-type", HLS_CONTENT_TYPE)
            return b""
        if not self.hls.accepting:
            return _text(request, 503, "proxy is shutting down")
        session = self.hls.for_key(key)
        # Only the token the guard accepted goes into segment URLs, encoded;
        # no other client parameter is copied.
        token = getattr(request, "acexy_token", None)
        if isinstance(token, bytes):
            token = token.decode("ascii", "replace")
        query = "?token=" + quote(token, safe="") if token else ""
        # segment links are relative to this playlist's own path (a path
        # prefix added by a reverse proxy stays in them): one "../" for each
        # directory below /ace/ (``/ace/getstream/`` with ACEXY_M3U8)
        up = "../" * max(0, request.path.count(b"/") - 2)
        try:
            await session.ready()
            body = await session.playlist(query, up)
        except NoEngine as e:  # never held: a playlist client retries by itself
            return self._refuse(request, e)
        except EngineError as e:
            return _text(request, e.http_status, str(e))
        request.setHeader(b"content-type", HLS_CONTENT_TYPE)
        request.setHeader(b"cache-control", b"no-cache, no-store")
        return body

    @app.route("/ace/hls/<string:content>/<string:sid>/<string:name>", methods=["GET"], endpoint="segment")
    async def segment(self, request: Any, content: str, sid: str, name: str) -> Optional[bytes]:
        """A name of the session's current playlist, relayed from the engine;
        anything else (another content's path included) is 404."""
        session = self.hls.by_sid(sid) if self.hls is not None else None
        url = session.segment_url(name) if session is not None and session.key.value == content else None
        if session is None or url is None or session.engine is None or session.closed:
            return _text(request, 404, "unknown HLS segment")
        session.touch()
        relay = SegmentRelay(
            request,
            session,
            url,
            self._clock,
            idle_timeout=self._stuck_timeout,  # ACEXY_EMPTY_TIMEOUT without data
            max_duration=2 * self._stuck_timeout,
        )
        error = await relay.start()
        if error is not None:
            code, message = error
            return _text(request, code, message)
        return None

    # -- /ace/status ---------------------------------------------------------------

    @app.route("/ace/status", methods=["GET"], endpoint="status")
    @app.route("/ace/status/", methods=["GET"], endpoint="status_slash")
    def status(self, request: Any) -> bytes:
        ids = [v for v in request.args.get(b"id", []) if v]
        if not ids:
            sessions = list(self.registry)
            doc = {
                "streams": len(sessions),
                "clients": sum(len(s.sinks) for s in sessions),
                "version": __version__.public(),
                "uptime": round(self._clock.seconds() - self.started_at, 1),
                "clients_cut": self.metrics.clients_cut,
            }
            if self._orchestrator_status is not None:
                doc["orchestrator"] = self._orchestrator_status()
            doc["held"] = self.registry.waits.describe()
            if self._engines_status is not None:
                doc["engines"] = self._engines_status()
            doc["sessions"] = [self._ts_doc(s) for s in sessions]
            if self.hls is not None:
                doc["hls"] = [self._hls_doc(h) for h in self.hls]
            return _json(request, doc)
        wanted = ids[0].decode("utf-8", "replace")
        sessions = self.registry.find(strip_scheme(wanted))
        if not sessions:
            hls = self.hls.find(strip_scheme(wanted)) if self.hls is not None else []
            if not hls:
                return _text(request, 404, "Stream not found")
            doc = self._hls_doc(hls[0])
            doc["stream_id"] = wanted
            if len(hls) > 1:
                doc["variants"] = [self._hls_doc(h) for h in hls]
            return _json(request, doc)
        doc = self._ts_doc(sessions[0])
        doc["stream_id"] = wanted
        doc["clients"] = sum(len(s.sinks) for s in sessions)
        if len(sessions) > 1:
            doc["variants"] = [self._ts_doc(s) for s in sessions]
        return _json(request, doc)

    @staticmethod
    def _ts_doc(session: Any) -> dict[str, Any]:
        return {**session.describe(), "kind": "ts", "play": _play_path(session.key)}

    @staticmethod
    def _hls_doc(session: Any) -> dict[str, Any]:
        return {**session.describe(), "play": _play_path(session.key, hls=True)}

    # -- POST /ace/stop ------------------------------------------------------------

    @app.route("/ace/stop", methods=["POST"], endpoint="stop")
    def stop(self, request: Any) -> bytes:
        """End every engine session (TS and HLS) of one content, as a close
        does: players get their clean end, the engine its stop command."""
        try:
            key = parse_query(request.args)
        except BadRequest as e:
            return _text(request, 400, e.message)
        stopped = self.registry.stop(key.value)
        if self.hls is not None:
            stopped += self.hls.stop(key.value)
        if not stopped:
            return _text(request, 404, "Stream not found")
        log.info("stopped {n} engine session(s) of {id} on request from {peer}", n=stopped, id=key.value, peer=_peer(request))
        request.setResponseCode(204)
        request.setHeader(b"cache-control", b"no-store")
        return b""

    # -- playlists (ACEXY_PLAYLISTS) ---------------------------------------------------

    @app.route("/ace/playlists", methods=["GET"], endpoint="playlists")
    def playlist_names(self, request: Any) -> bytes:
        return _json(request, {"playlists": self.playlists.names() if self.playlists else []})

    @app.route("/ace/playlist/<string:filename>", methods=["GET"], endpoint="playlist")
    async def playlist(self, request: Any, filename: str) -> bytes:
        name, dot, ext = filename.rpartition(".")
        if self.playlists is None or not dot or ext not in ("m3u", "m3u8"):
            return _text(request, 404, "no such playlist")
        try:
            source = await self.playlists.get(name)
        except UnknownPlaylist:
            return _text(request, 404, "no such playlist")
        except PlaylistError as e:
            return _text(request, 502, str(e))
        token = getattr(request, "acexy_token", None)
        if isinstance(token, bytes):
            token = token.decode("ascii", "replace")
        hls = request.args.get(b"hls", [b""])[0].lower() in (b"1", b"true", b"yes", b"on")
        body = rewrite(source, self.playlists.public_url or _base_url(request), token=token, hls=hls)
        request.setHeader(b"content-type", b"audio/x-mpegurl")
        request.setHeader(b"cache-control", b"no-cache")
        return body

    # -- the dashboard -----------------------------------------------------------------

    @app.route("/", methods=["GET"], endpoint="dashboard")
    def dashboard(self, request: Any) -> bytes:
        from acexy_tw.web import dashboard

        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"content-security-policy", dashboard.content_security_policy().encode("ascii"))
        return dashboard.page()

    # -- /healthz and /metrics ---------------------------------------------------------

    @app.route("/healthz", methods=["GET", "HEAD"], endpoint="healthz")
    def healthz(self, request: Any) -> bytes:
        """For Docker/procd/systemd checks: cheap, never touches an engine."""
        doc: dict[str, Any] = {"serving": self.registry.accepting, "streams": len(self.registry)}
        if self._orchestrator_status is not None:
            o = self._orchestrator_status()
            doc["orchestrator"] = {"reachable": o.get("reachable"), "status": o.get("status")}
        return _json(request, doc, 200 if self.registry.accepting else 503)

    @app.route("/metrics", methods=["GET"], endpoint="metrics")
    def metrics_page(self, request: Any) -> bytes:
        body, content_type = self.metrics.render()
        request.setHeader(b"content-type", content_type.encode("ascii"))
        return body
