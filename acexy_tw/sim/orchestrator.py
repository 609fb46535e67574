"""
A simulated acestream-orchestrator speaking the wire contract of CONTRACTS.md §2.

It manages real :class:`~acexy_tw.sim.engine.SimEngine` instances: a provision
answers with a new engine listening on loopback, and the engines a test adds
with :meth:`SimOrchestrator.add_engine` are real engines too.  Everything a
real orchestrator can do to a proxy is scriptable (VPN down or erroring, an
open or half-open circuit breaker, provisioning failures, old-style string
errors, a failing ``/engines``, the whole service going away), and everything
the proxy sends is recorded for the test to check.

Use it in a trial test::

    orch = SimOrchestrator(reactor, api_key="k", engine_ready_delay=0.5)
    orch.listen()                            # 127.0.0.1, a free port
    self.addCleanup(orch.shutdown)           # engines, timers, connections
    first = orch.add_engine(streams=1)       # a busy, ready engine
    orch.set_vpn(connected=False)            # later provisions answer 503
    ...
    yield orch.when(lambda o: len(o.provisioned) == 1).addTimeout(10, reactor)

Or from a shell: ``python -m acexy_tw.sim.orchestrator --port 8000 --engines 2``.

Choices where the contract leaves room (the real orchestrator's behaviour
where it is known):

- ``POST /events/stream_started`` for a ``container_id`` the orchestrator does
  not know answers 404 ``{"detail": "engine not found"}``, after the body was
  validated (malformed bodies answer 422 in FastAPI's list format first).
- ``POST /events/stream_ended`` always answers 200: ``{"updated": true,
  "stream": {...}}`` when it ended a started stream with exactly that
  ``stream_id``, else ``{"updated": false}`` (and the body is also added to
  :attr:`SimOrchestrator.unmatched_ended`).
- ``max_replicas`` is reported in ``capacity`` and, once that many engines
  run, as ``max_capacity`` in ``blocked_reason_details`` (``can_provision``
  false), but what a provision does there is ``replica_limit``: ``"none"`` (the
  default, what the real ``/provision/acestream`` does) never refuses for it
  and starts another engine; ``"gluetun"`` (the real one's Gluetun mode, whose
  port range is the limit) answers 500 ``{"detail": "Maximum active replicas
  limit reached (N)"}`` once engines plus provisions in progress reach
  ``max_replicas`` (a plain string even without ``legacy_errors``; checked after
  the VPN and the breaker, at once, and recorded as ``last_failure``).
- ``status_lag`` (seconds, default 0) makes ``GET /orchestrator/status`` answer
  the document as it was that long ago, as the real one's polled status lags
  reality: a VPN drop, an opened breaker or full capacity shows first as a
  refusal of a provision made in between.  Provisions always act on the
  current state.  Documents are recorded on every change and status request
  (one entry per distinct document) while the lag is positive; the answer at
  time t is the newest recorded at or before ``t - status_lag`` (the oldest
  when none is that old), with ``timestamp`` the time it stands for.
- ``vpn_error`` answers with ``"error": "provisioning_failed"`` as the real
  orchestrator does (``vpn_disconnected`` and ``circuit_breaker`` are
  ``provisioning_blocked``).  VPN and breaker refusals are immediate; scripted
  failures and ``vpn_error`` come after ``provision_delay`` (they happen while
  starting the container).
- ``status`` is ``degraded`` when the VPN is down or erroring or the breaker
  is not closed; being at max capacity alone keeps it ``healthy``.

The reactor is always passed in; this module never imports the global one
except in :func:`main`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTCP
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from acexy_tw.sim.cli import run
from acexy_tw.sim.conditions import Conditions
from acexy_tw.sim.engine import SimEngine, SimSite

__all__ = ["SimOrchestrator", "SimEngineHandle", "SimStream", "FAILURE_CODES", "REPLICA_LIMITS", "main"]

log = Logger()

Predicate = Callable[["SimOrchestrator"], bool]

#: the advertised address of every engine, as inside Docker (CONTRACTS.md §1)
ENGINE_ADVERTISE = ("127.0.0.1", 6878)
KEY_TYPES = ("content_id", "infohash", "url", "magnet")

#: per error code: (HTTP status, "error" field, message, ETA, can_retry, should_wait, legacy text)
_ERRORS: Dict[str, Tuple[int, str, str, Optional[int], bool, bool, str]] = {
    "vpn_disconnected": (
        503,
        "provisioning_blocked",
        "VPN connection is required but currently disconnected",
        60,
        True,
        True,
        "VPN is disconnected",
    ),
    "vpn_error": (
        503,
        "provisioning_failed",
        "VPN error during provisioning: gluetun is unhealthy",
        60,
        True,
        True,
        "VPN error: gluetun is unhealthy",
    ),
    "circuit_breaker": (
        503,
        "provisioning_blocked",
        "Circuit breaker is open due to repeated failures",
        300,
        False,
        True,
        "circuit breaker is open",
    ),
    "general_error": (
        500,
        "provisioning_failed",
        "Failed to provision engine: docker error",
        None,
        False,
        False,
        "docker error",
    ),
}
#: codes :meth:`SimOrchestrator.fail_next_provisions` accepts
FAILURE_CODES = tuple(_ERRORS)
#: values of :attr:`SimOrchestrator.replica_limit`
REPLICA_LIMITS = ("none", "gluetun")


# --- small helpers -------------------------------------------------------------------


def rfc3339(seconds: Optional[float]) -> Optional[str]:
    """Reactor time (epoch seconds) as RFC 3339 with an offset; None stays None."""
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat()


def _send_json(request: Request, obj: object, status: int = 200) -> None:
    """Answer and finish, unless the client has already gone."""
    if getattr(request, "channel", None) is None:
        return
    body = json.dumps(obj).encode()
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", b"%d" % len(body))
    request.write(body)
    request.finish()


def _send_text(request: Request, status: int, text: str) -> None:
    if getattr(request, "channel", None) is None:
        return
    body = text.encode()
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"content-length", b"%d" % len(body))
    request.write(body)
    request.finish()


def _absolute_http(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        parts = urlsplit(value)
        return parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        return False


class _Invalid(Exception):
    """A body failed validation: 422 with FastAPI's list of errors."""

    def __init__(self, errors: List[dict]) -> None:
        super().__init__(errors)
        self.errors = errors


def _problem(loc: Sequence[str], kind: str, msg: str, value: Any = None) -> dict:
    return {"type": kind, "loc": ["body", *loc], "msg": msg, "input": value}


def _parse_json_object(request: Request, *, empty_ok: bool) -> dict:
    raw = request.content.read() if request.content is not None else b""
    if not raw.strip():
        if empty_ok:
            return {}
        raise _Invalid([_problem([], "missing", "Field required")])
    try:
        body = json.loads(raw)
    except ValueError:
        raise _Invalid([_problem([], "json_invalid", "JSON decode error")]) from None
    if not isinstance(body, dict):
        raise _Invalid([_problem([], "model_type", "Input should be an object", body)])
    return body


# --- records -------------------------------------------------------------------------


@dataclass(eq=False)
class SimStream:
    """A stream the orchestrator was told about (or that a test pre-loaded)."""

    id: str
    key_type: str
    key: str
    container_id: str
    playback_session_id: str
    stat_url: str
    command_url: str
    is_live: int
    started_at: float
    ended_at: Optional[float] = None
    end_reason: Optional[str] = None

    @property
    def status(self) -> str:
        return "started" if self.ended_at is None else "ended"

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "key_type": self.key_type,
            "key": self.key,
            "container_id": self.container_id,
            "playback_session_id": self.playback_session_id,
            "stat_url": self.stat_url,
            "command_url": self.command_url,
            "is_live": self.is_live,
            "started_at": rfc3339(self.started_at),
            "ended_at": rfc3339(self.ended_at),
            "status": self.status,
        }


class SimEngineHandle:
    """
    One engine "container" of the orchestrator.

    ``healthy`` (True, False, or None for "unknown"), ``forwarded``,
    ``labels`` and ``last_stream_usage`` (reactor seconds or None) can be
    set by a test at any time; ``/engines`` and the status document reflect
    them on the next request, and :meth:`SimOrchestrator.when` waiters are
    re-checked.
    """

    _WATCHED = frozenset({"healthy", "forwarded", "last_stream_usage", "labels"})

    def __init__(
        self,
        owner: "SimOrchestrator",
        engine: SimEngine,
        *,
        number: int,
        healthy: Optional[bool],
        forwarded: bool,
        labels: Dict[str, str],
        created: float,
    ) -> None:
        self._owner: Optional["SimOrchestrator"] = None  # no change notices during __init__
        self.engine = engine
        self.number = number
        self.container_id = secrets.token_hex(32)
        self.container_name = f"acestream-{number}"
        self.container_https_port = 45000 + number
        self.healthy = healthy
        self.forwarded = forwarded
        self.labels = dict(labels)
        self.first_seen = created
        self.last_stream_usage: Optional[float] = None
        self.last_health_check: Optional[float] = created if healthy is not None else None
        #: the DelayedCall that makes a starting engine reachable
        self._ready_call: Optional[IDelayedCall] = None
        #: fires when the port reservation's socket is really closed
        self._reserved: Optional[Deferred] = None
        self.removed = False
        self._owner = owner

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        owner = self.__dict__.get("_owner")
        if owner is not None and name in self._WATCHED:
            if name == "healthy":
                object.__setattr__(self, "last_health_check", owner.reactor.seconds())
            owner._changed()

    def __repr__(self) -> str:
        return f"<SimEngineHandle {self.container_name} port={self.port} ready={self.ready}>"

    @property
    def port(self) -> int:
        """The port ``/engines`` lists (and the engine listens on once ready)."""
        return self.engine.port

    @property
    def ready(self) -> bool:
        """Whether the engine's HTTP API accepts connections."""
        return self.engine.listening

    @property
    def health_status(self) -> str:
        if self.healthy is None:
            return "unknown"
        return "healthy" if self.healthy else "unhealthy"

    @property
    def stream_ids(self) -> List[str]:
        """Ids of the started (not ended) streams reported on this engine."""
        owner = self._owner
        if owner is None:
            return []
        return [s.id for s in owner.streams.values() if s.container_id == self.container_id and s.ended_at is None]

    def to_json(self, now: float) -> dict:
        return {
            "container_id": self.container_id,
            "container_name": self.container_name,
            "host": "127.0.0.1",
            "port": self.port,
            "labels": dict(self.labels),
            "first_seen": rfc3339(self.first_seen),
            "last_seen": rfc3339(now),
            "streams": self.stream_ids,
            "health_status": self.health_status,
            "last_health_check": rfc3339(self.last_health_check),
            "last_stream_usage": rfc3339(self.last_stream_usage),
            "forwarded": bool(self.forwarded),
        }


# --- HTTP surface ----------------------------------------------------------------------


class _OrchestratorResource(Resource):
    """The orchestrator's HTTP API (CONTRACTS.md §2); the state lives in the orchestrator."""

    isLeaf = True

    def __init__(self, orchestrator: "SimOrchestrator") -> None:
        super().__init__()
        self._orch = orchestrator

    def render(self, request: Request) -> Any:
        orch = self._orch
        method = request.method.decode("ascii", "replace")
        path = "/" + request.path.decode("utf-8", "replace").strip("/")
        auth = request.getHeader(b"authorization")
        auth_text = auth.decode("latin-1") if auth is not None else None
        orch.requests.append((method, path, auth_text))
        if auth_text is not None:
            orch.auth_headers.append(auth_text)
        routes: Dict[Tuple[str, str], Callable[[Request], Any]] = {
            ("GET", "/orchestrator/status"): self._status,
            ("GET", "/engines"): self._engines,
            ("GET", "/streams"): self._streams,
            ("POST", "/provision/acestream"): self._provision,
            ("POST", "/events/stream_started"): self._stream_started,
            ("POST", "/events/stream_ended"): self._stream_ended,
        }
        handler = routes.get((method, path))
        if handler is None:
            if any(p == path for _, p in routes):
                _send_json(request, {"detail": "Method Not Allowed"}, 405)
            else:
                _send_json(request, {"detail": "Not Found"}, 404)
            orch._changed()
            return NOT_DONE_YET
        try:
            handler(request)
        finally:
            orch._changed()
        return NOT_DONE_YET

    # auth ---------------------------------------------------------------------

    def _authorized(self, request: Request) -> bool:
        """Check the bearer token; on failure answer 401/403 (an event POST
        is also recorded as rejected) and return False."""
        header = request.getHeader(b"authorization")
        if header is None or not header.lower().startswith(b"bearer "):
            status, detail = 401, "missing bearer token"
        elif header[len(b"bearer ") :].strip().decode("latin-1") != self._orch.api_key:
            status, detail = 403, "invalid token"
        else:
            return True
        if request.path.startswith(b"/events/"):
            self._reject(request, status, detail)
        else:
            _send_json(request, {"detail": detail}, status)
        return False

    def _reject(self, request: Request, status: int, detail: Any, body: Any = None) -> None:
        path = request.path.decode("utf-8", "replace")
        self._orch.rejected_events.append({"path": path, "code": status, "body": body})
        _send_json(request, {"detail": detail}, status)

    # GETs -----------------------------------------------------------------------

    def _status(self, request: Request) -> None:
        self._orch.status_calls += 1
        if self._orch.status_hang:
            return  # never answered (the connection is reset by down()/shutdown())
        _send_json(request, self._orch.served_status_document())

    def _engines(self, request: Request) -> None:
        orch = self._orch
        orch.engines_calls += 1
        if orch.engines_fail:
            _send_text(request, 500, "Internal Server Error")
            return
        now = orch.reactor.seconds()
        _send_json(request, [handle.to_json(now) for handle in orch.engines])

    def _streams(self, request: Request) -> None:
        orch = self._orch
        orch.streams_calls += 1
        args = {k.decode(): v[0].decode() for k, v in request.args.items() if v}
        status, container = args.get("status"), args.get("container_id")
        found = [
            s.to_json()
            for s in orch.streams.values()
            if (status is None or s.status == status) and (container is None or s.container_id == container)
        ]
        _send_json(request, found)

    # provisioning ---------------------------------------------------------------

    def _provision(self, request: Request) -> None:
        orch = self._orch
        orch.provision_calls.append(orch.reactor.seconds())
        if not self._authorized(request):
            return
        try:
            body = _parse_json_object(request, empty_ok=True)
        except _Invalid as invalid:
            _send_json(request, {"detail": invalid.errors}, 422)
            return
        labels = body.get("labels") or {}
        if not isinstance(labels, dict):
            problem = _problem(["labels"], "dict_type", "Input should be a valid dictionary", labels)
            _send_json(request, {"detail": [problem]}, 422)
            return
        refusal = orch._provision_refusal()
        if refusal is not None:
            code, eta = refusal
            orch._answer_error(request, code, eta)
            return
        failure = orch._take_scripted_failure()
        orch._pending_provisions += 1
        orch._schedule(orch.provision_delay, orch._finish_provision, request, labels, failure)

    # events ---------------------------------------------------------------------

    def _stream_started(self, request: Request) -> None:
        orch = self._orch
        if not self._authorized(request):
            return
        body: Optional[dict] = None
        try:
            body = _parse_json_object(request, empty_ok=False)
            event = _validate_started(body)
        except _Invalid as invalid:
            self._reject(request, 422, invalid.errors, body)
            return
        handle = orch.engine_by_id(event["container_id"])
        if handle is None:
            self._reject(request, 404, "engine not found", body)
            return
        orch.events_started.append(body)
        stream = orch._start_stream(handle, event)
        _send_json(request, stream.to_json())

    def _stream_ended(self, request: Request) -> None:
        orch = self._orch
        if not self._authorized(request):
            return
        try:
            body = _parse_json_object(request, empty_ok=False)
        except _Invalid as invalid:
            self._reject(request, 422, invalid.errors)
            return
        orch.events_ended.append(body)
        stream = orch._end_stream(body.get("stream_id"), body.get("reason"))
        if stream is None:
            orch.unmatched_ended.append(body)
            _send_json(request, {"updated": False})
        else:
            _send_json(request, {"updated": True, "stream": stream.to_json()})


def _validate_started(body: dict) -> dict:
    """The checks the real (pydantic) model makes, plus ``labels.stream_id``."""
    problems: List[dict] = []

    def section(name: str) -> dict:
        value = body.get(name)
        if value is None:
            problems.append(_problem([name], "missing", "Field required"))
            return {}
        if not isinstance(value, dict):
            problems.append(_problem([name], "model_type", "Input should be an object", value))
            return {}
        return value

    def text(where: dict, *loc: str) -> Optional[str]:
        value = where.get(loc[-1])
        if not isinstance(value, str) or not value:
            problems.append(_problem(loc, "string_type" if value is not None else "missing", "Field required", value))
            return None
        return value

    container_id = body.get("container_id")
    if not isinstance(container_id, str) or not container_id:
        problems.append(_problem(["container_id"], "missing", "Field required", container_id))
    engine, stream, session = section("engine"), section("stream"), section("session")
    labels = body.get("labels")
    if engine:
        text(engine, "engine", "host")
        port = engine.get("port")
        if not isinstance(port, int) or isinstance(port, bool):
            problems.append(_problem(["engine", "port"], "int_type", "Input should be a valid integer", port))
    if stream:
        key_type = stream.get("key_type")
        if key_type not in KEY_TYPES:
            problems.append(
                _problem(["stream", "key_type"], "literal_error", "Input should be " + ", ".join(KEY_TYPES), key_type)
            )
        text(stream, "stream", "key")
    if session:
        text(session, "session", "playback_session_id")
        for name in ("stat_url", "command_url"):
            if not _absolute_http(session.get(name)):
                problems.append(
                    _problem(["session", name], "url_parsing", "Input should be a valid URL", session.get(name))
                )
        is_live = session.get("is_live")
        if not isinstance(is_live, int):
            problems.append(_problem(["session", "is_live"], "int_type", "Input should be a valid integer", is_live))
    if not isinstance(labels, dict) or not isinstance(labels.get("stream_id"), str) or not labels.get("stream_id"):
        problems.append(_problem(["labels", "stream_id"], "missing", "Field required", labels))
    if problems:
        raise _Invalid(problems)
    return {
        "container_id": container_id,
        "key_type": stream["key_type"],
        "key": stream["key"],
        "playback_session_id": session["playback_session_id"],
        "stat_url": session["stat_url"],
        "command_url": session["command_url"],
        "is_live": int(session["is_live"]),
        "stream_id": labels["stream_id"],
    }


# --- the orchestrator ------------------------------------------------------------------


class SimOrchestrator:
    """
    A simulated acestream-orchestrator: state, scripting, waiting and lifecycle.

    :param reactor: provides ``IReactorTCP`` and ``IReactorTime``.
    :param api_key: the bearer token POSTs must carry.
    :param max_replicas: reported in ``capacity`` and, once reached by the
        running engines, as ``max_capacity`` in the status; whether it also
        refuses provisions is ``replica_limit``.
    :param min_replicas: only reported.
    :param engine_bitrate: bit/s of every engine's playbacks.
    :param provision_delay: seconds a provision takes to answer (settable).
    :param engine_ready_delay: seconds after a provision answered before the
        new engine accepts connections (settable).
    :param status_lag: seconds by which ``GET /orchestrator/status`` lags the
        real state (settable; 0: no lag).
    :param replica_limit: ``"none"`` (provisions ignore ``max_replicas``) or
        ``"gluetun"`` (a 500 string ``detail`` at ``max_replicas`` engines plus
        provisions in progress); settable.
    """

    def __init__(
        self,
        reactor: IReactorTCP,
        *,
        api_key: str = "sim-key",
        max_replicas: int = 20,
        min_replicas: int = 0,
        engine_bitrate: Optional[int] = 2_000_000,
        provision_delay: float = 0.0,
        engine_ready_delay: float = 0.0,
        status_lag: float = 0.0,
        replica_limit: str = "none",
    ) -> None:
        self.reactor = reactor
        self.api_key = api_key
        self.max_replicas = max_replicas
        self.min_replicas = min_replicas
        self.engine_bitrate = engine_bitrate
        self.provision_delay = provision_delay
        self.engine_ready_delay = engine_ready_delay
        # scripting
        #: answer provisioning errors the old way: ``{"detail": "<string>"}``
        self.legacy_errors = False
        #: ``GET /engines`` answers 500
        self._engines_fail = False
        #: ``GET /orchestrator/status`` never answers (a hung orchestrator)
        self.status_hang = False
        self.vpn_enabled = True
        self.vpn_connected = True
        self.vpn_erroring = False
        #: reported as ``vpn.forwarded_port`` while the VPN is up
        self.forwarded_port: Optional[int] = 41234
        self.breaker_state = "closed"
        self._breaker_deadline: Optional[float] = None
        self._failures: List[str] = []
        self.last_failure: Optional[float] = None
        # observability
        #: reactor time of every ``POST /provision/acestream``, accepted or refused
        self.provision_calls: List[float] = []
        #: handles of the engines created by successful provisions
        self.provisioned: List[SimEngineHandle] = []
        self.status_calls = 0
        self.engines_calls = 0
        self.streams_calls = 0
        #: bodies of accepted ``stream_started`` events
        self.events_started: List[dict] = []
        #: bodies of every authorised, well-formed ``stream_ended`` event
        self.events_ended: List[dict] = []
        #: the ``stream_ended`` bodies that ended nothing (unknown or already ended id)
        self.unmatched_ended: List[dict] = []
        #: refused event POSTs: ``{"path", "code", "body"}``
        self.rejected_events: List[dict] = []
        #: every Authorization header seen, on any route
        self.auth_headers: List[str] = []
        #: every request: ``(method, path, authorization or None)``
        self.requests: List[Tuple[str, str, Optional[str]]] = []
        #: every stream ever reported (or pre-loaded), by id
        self.streams: Dict[str, SimStream] = {}
        # internals
        self._engines: List[SimEngineHandle] = []
        self._numbers = 0
        self._pending_provisions = 0
        self._timers: List[IDelayedCall] = []
        self._conditions = Conditions(self)
        self._site = SimSite(_OrchestratorResource(self), reactor, self._changed)
        self._listening: Optional[IListeningPort] = None
        self.port: Optional[int] = None
        self.interface: Optional[str] = None
        #: (reactor time, status document) while ``status_lag`` > 0, oldest first
        self._status_history: List[Tuple[float, dict]] = []
        self._status_lag = 0.0
        self._replica_limit = "none"
        self.replica_limit = replica_limit
        self.status_lag = status_lag

    # --- listening ------------------------------------------------------------------

    def listen(self, port: int = 0, interface: str = "127.0.0.1") -> IListeningPort:
        """Start accepting connections, synchronously; ``port=0`` picks a free port."""
        if self._listening is not None:
            raise RuntimeError("already listening")
        self._listening = self.reactor.listenTCP(port, self._site, interface=interface)
        self.port = self._listening.getHost().port
        self.interface = interface
        self._changed()
        return self._listening

    @property
    def listening(self) -> bool:
        return self._listening is not None

    @property
    def url(self) -> str:
        return f"http://{self.interface}:{self.port}"

    def down(self) -> "Deferred[None]":
        """The service goes away: stop listening and reset every open
        connection (pooled keep-alive ones too); fires when all are gone.
        Engines keep running, and a provision being processed completes."""
        listening, self._listening = self._listening, None
        stopped = succeed(None) if listening is None else maybeDeferred(listening.stopListening)
        for channel in list(self._site.connections):
            channel.transport.abortConnection()
        gone = self.when(lambda orch: not orch._site.connections)
        self._changed()
        return DeferredList([stopped, gone], fireOnOneErrback=True, consumeErrors=True).addCallback(lambda _: None)

    def up(self) -> IListeningPort:
        """Listen again on the same port and interface (synchronous)."""
        if self.port is None:
            raise RuntimeError("never listened")
        return self.listen(self.port, self.interface or "127.0.0.1")

    def shutdown(self) -> "Deferred[None]":
        """Cancel pending provisions and timers, shut every engine down and
        stop listening: a clean reactor once it fires."""
        for call in self._timers:
            if call.active():
                call.cancel()
        self._timers.clear()
        self._pending_provisions = 0
        engines = [self._shutdown_engine(handle) for handle in self._engines]
        down = self.down()
        return DeferredList([down, *engines], fireOnOneErrback=True, consumeErrors=True).addCallback(
            lambda _: None
        )

    # --- engines -----------------------------------------------------------------------

    @property
    def engines(self) -> List[SimEngineHandle]:
        """Every engine the orchestrator lists, oldest first."""
        return list(self._engines)

    def engine_by_id(self, container_id: Any) -> Optional[SimEngineHandle]:
        return next((h for h in self._engines if h.container_id == container_id), None)

    def add_engine(
        self,
        *,
        healthy: Optional[bool] = True,
        forwarded: bool = False,
        streams: int = 0,
        ready: bool = True,
        labels: Optional[Dict[str, str]] = None,
    ) -> SimEngineHandle:
        """An engine that was already running: listening at once unless
        ``ready=False`` (then its port is reserved but refuses connections
        until :meth:`make_ready`), carrying ``streams`` pre-loaded started
        streams (ids ``sim-<container_name>-<i>``)."""
        handle = self._new_engine(healthy=healthy, forwarded=forwarded, labels=labels or {})
        if ready:
            handle.engine.listen(0, self.interface or "127.0.0.1")
        else:
            self._reserve_port(handle)
        now = self.reactor.seconds()
        host, port = ENGINE_ADVERTISE
        for i in range(streams):
            token = secrets.token_hex(20)
            stream = SimStream(
                id=f"sim-{handle.container_name}-{i}",
                key_type="content_id",
                key=secrets.token_hex(20),
                container_id=handle.container_id,
                playback_session_id=token,
                stat_url=f"http://{host}:{port}/ace/stat/{token}/x",
                command_url=f"http://{host}:{port}/ace/cmd/{token}/x",
                is_live=1,
                started_at=now,
            )
            self.streams[stream.id] = stream
        if streams:
            handle.last_stream_usage = now
        self._changed()
        return handle

    def make_ready(self, handle: SimEngineHandle) -> None:
        """Let a starting engine accept connections now."""
        if handle._ready_call is not None and handle._ready_call.active():
            handle._ready_call.cancel()
        handle._ready_call = None
        self._become_ready(handle)

    def remove_engine(self, handle: SimEngineHandle) -> "Deferred[None]":
        """The container goes away: unlisted, its streams ended (reason
        ``container_removed``), its engine shut down."""
        if handle in self._engines:
            self._engines.remove(handle)
        now = self.reactor.seconds()
        for stream in self.streams.values():
            if stream.container_id == handle.container_id and stream.ended_at is None:
                stream.ended_at, stream.end_reason = now, "container_removed"
        self._changed()
        return self._shutdown_engine(handle)

    def _new_engine(self, *, healthy: Optional[bool], forwarded: bool, labels: Dict[str, str]) -> SimEngineHandle:
        self._numbers += 1
        engine = SimEngine(
            self.reactor,
            bitrate=self.engine_bitrate,
            advertise_host=ENGINE_ADVERTISE[0],
            advertise_port=ENGINE_ADVERTISE[1],
        )
        handle = SimEngineHandle(
            self,
            engine,
            number=self._numbers,
            healthy=healthy,
            forwarded=forwarded,
            labels=labels,
            created=self.reactor.seconds(),
        )
        self._engines.append(handle)
        return handle

    def _reserve_port(self, handle: SimEngineHandle) -> None:
        """Take a port number and close it again: connections are refused
        until :meth:`_become_ready` listens on it (a starting container)."""
        handle.engine.listen(0, self.interface or "127.0.0.1")
        handle._reserved = handle.engine.stop_listening()

    def _become_ready(self, handle: SimEngineHandle) -> None:
        if handle.removed or handle.engine.listening:
            return

        def listen(_: object) -> None:
            if handle.removed or handle.engine.listening:
                return
            try:
                handle.engine.listen(handle.engine.port, self.interface or "127.0.0.1")
            except CannotListenError:
                log.failure("simulated engine {name} could not take its port back", name=handle.container_name)
                return
            if handle.healthy is None:
                handle.healthy = True
            self._changed()

        reserved = handle._reserved if handle._reserved is not None else succeed(None)
        handle._reserved = None
        reserved.addCallback(listen).addErrback(lambda f: log.failure("engine ready", f))

    def _shutdown_engine(self, handle: SimEngineHandle) -> "Deferred[None]":
        handle.removed = True
        if handle._ready_call is not None and handle._ready_call.active():
            handle._ready_call.cancel()
        handle._ready_call = None
        reserved = handle._reserved if handle._reserved is not None else succeed(None)
        handle._reserved = None
        return reserved.addCallback(lambda _: handle.engine.shutdown())

    # --- provisioning --------------------------------------------------------------

    def _provision_refusal(self) -> Optional[Tuple[str, Optional[int]]]:
        """What refuses a provision at once: (code, ETA) or None."""
        if self.vpn_enabled and not self.vpn_connected:
            return "vpn_disconnected", 60
        if self.breaker_state != "closed":
            return "circuit_breaker", self.breaker_eta
        if self.replica_limit == "gluetun" and len(self._engines) + self._pending_provisions >= self.max_replicas:
            return "replica_limit", None
        return None

    def _take_scripted_failure(self) -> Optional[str]:
        if self._failures:
            return self._failures.pop(0)
        if self.vpn_erroring:
            return "vpn_error"
        return None

    def _answer_error(self, request: Request, code: str, eta: Optional[int] = None) -> None:
        if code == "replica_limit":  # Gluetun mode: the port allocator's error, as a string
            self.last_failure = self.reactor.seconds()
            _send_json(request, {"detail": f"Maximum active replicas limit reached ({self.max_replicas})"}, 500)
            return
        status, error, message, default_eta, can_retry, should_wait, legacy = _ERRORS[code]
        eta = default_eta if eta is None else eta
        if code == "circuit_breaker":
            can_retry = self.breaker_state == "half_open"
            message = f"Circuit breaker is {self.breaker_state} due to repeated failures"
        if self.legacy_errors:
            _send_json(request, {"detail": legacy}, status)
            return
        detail = {
            "error": error,
            "code": code,
            "message": message,
            "recovery_eta_seconds": eta,
            "can_retry": can_retry,
            "should_wait": should_wait,
        }
        _send_json(request, {"detail": detail}, status)

    def _finish_provision(self, request: Request, labels: Dict[str, str], failure: Optional[str]) -> None:
        self._pending_provisions = max(0, self._pending_provisions - 1)
        if failure is not None:
            self.last_failure = self.reactor.seconds()
            self._answer_error(request, failure)
            self._changed()
            return
        handle = self._new_engine(healthy=None, forwarded=False, labels=labels)
        delay = self.engine_ready_delay
        if delay > 0:
            self._reserve_port(handle)
            handle._ready_call = self._schedule(delay, self._ready_timer, handle)
        else:
            handle.engine.listen(0, self.interface or "127.0.0.1")
            handle.healthy = True
        self.provisioned.append(handle)
        _send_json(
            request,
            {
                "container_id": handle.container_id,
                "container_name": handle.container_name,
                "host_http_port": handle.port,
                "container_http_port": handle.port,
                "container_https_port": handle.container_https_port,
            },
        )
        self._changed()

    def _ready_timer(self, handle: SimEngineHandle) -> None:
        handle._ready_call = None
        self._become_ready(handle)

    def _schedule(self, delay: float, f: Callable[..., None], *args: Any) -> IDelayedCall:
        """callLater, remembered so :meth:`shutdown` can cancel it."""

        def run() -> None:
            if call in self._timers:
                self._timers.remove(call)
            try:
                f(*args)
            except Exception:
                log.failure("simulated orchestrator timer")

        call = self.reactor.callLater(max(0.0, delay), run)
        self._timers.append(call)
        return call

    # --- streams -----------------------------------------------------------------------

    def _start_stream(self, handle: SimEngineHandle, event: dict) -> SimStream:
        now = self.reactor.seconds()
        stream = SimStream(
            id=event["stream_id"],
            key_type=event["key_type"],
            key=event["key"],
            container_id=handle.container_id,
            playback_session_id=event["playback_session_id"],
            stat_url=event["stat_url"],
            command_url=event["command_url"],
            is_live=event["is_live"],
            started_at=now,
        )
        self.streams.pop(stream.id, None)  # a repeated id overwrites, as the real one does
        self.streams[stream.id] = stream
        handle.last_stream_usage = now
        return stream

    def _end_stream(self, stream_id: Any, reason: Any) -> Optional[SimStream]:
        stream = self.streams.get(stream_id) if isinstance(stream_id, str) else None
        if stream is None or stream.ended_at is not None:
            return None
        stream.ended_at = self.reactor.seconds()
        stream.end_reason = reason if isinstance(reason, str) else None
        return stream

    @property
    def active_streams(self) -> List[SimStream]:
        return [s for s in self.streams.values() if s.ended_at is None]

    # --- scripting ---------------------------------------------------------------------

    def set_vpn(self, connected: bool, enabled: bool = True) -> None:
        self.vpn_connected = connected
        self.vpn_enabled = enabled
        self._changed()

    def vpn_error(self, on: bool) -> None:
        """While on: VPN health "unhealthy", status degraded, and provisions
        fail with ``vpn_error`` (after ``provision_delay``)."""
        self.vpn_erroring = on
        self._changed()

    def open_breaker(self, eta: int, half_open: bool = False) -> None:
        """Open (or half-open) the breaker; its ETA counts down with the
        reactor clock from ``eta`` to 0, where it stays until :meth:`close_breaker`."""
        self.breaker_state = "half_open" if half_open else "open"
        self._breaker_deadline = self.reactor.seconds() + eta
        self.last_failure = self.reactor.seconds()
        self._changed()

    def close_breaker(self) -> None:
        self.breaker_state = "closed"
        self._breaker_deadline = None
        self._changed()

    @property
    def breaker_eta(self) -> Optional[int]:
        """Whole seconds left (≥ 0) while the breaker is not closed, else None."""
        if self.breaker_state == "closed" or self._breaker_deadline is None:
            return None
        return max(0, math.ceil(self._breaker_deadline - self.reactor.seconds() - 1e-9))

    def fail_next_provisions(self, n: int, code: str = "general_error") -> None:
        """The next ``n`` provisions that get past the VPN/breaker/capacity
        checks fail with ``code`` (one of :data:`FAILURE_CODES`)."""
        if code not in _ERRORS:
            raise ValueError(f"unknown code {code!r}; one of {', '.join(_ERRORS)}")
        self._failures.extend([code] * n)
        self._changed()

    @property
    def replica_limit(self) -> str:
        """What a provision does at ``max_replicas``: ``"none"`` or ``"gluetun"``
        (see the module docstring); a ValueError for anything else."""
        return self._replica_limit

    @replica_limit.setter
    def replica_limit(self, value: str) -> None:
        if value not in REPLICA_LIMITS:
            raise ValueError(f"unknown replica_limit {value!r}; one of {', '.join(REPLICA_LIMITS)}")
        self._replica_limit = value
        self._changed()

    @property
    def status_lag(self) -> float:
        """Seconds by which ``GET /orchestrator/status`` lags the state (≥ 0).

        Setting it records the current document, so the lagged status starts
        from the state at that moment; setting 0 serves the current state again
        at once.  A plain attribute set directly (``max_replicas``,
        ``vpn_connected``, ...) is not a change notice: it is recorded with the
        next change or status request."""
        return self._status_lag

    @status_lag.setter
    def status_lag(self, value: float) -> None:
        lag = float(value)
        if not lag >= 0 or math.isinf(lag):
            raise ValueError(f"status_lag must be a finite number of seconds >= 0, not {value!r}")
        self._status_lag = lag
        if lag == 0:
            self._status_history.clear()
        self._changed()

    @property
    def engines_fail(self) -> bool:
        return self._engines_fail

    @engines_fail.setter
    def engines_fail(self, value: bool) -> None:
        self._engines_fail = value
        self._changed()

    # --- status document -----------------------------------------------------------------

    @property
    def vpn_down(self) -> bool:
        return self.vpn_enabled and not self.vpn_connected

    def blocked_details(self) -> Optional[dict]:
        """``provisioning.blocked_reason_details`` as the status reports it now."""
        if self.vpn_down:
            code, eta, can_retry = "vpn_disconnected", 60, True
        elif self.breaker_state != "closed":
            code, eta, can_retry = "circuit_breaker", self.breaker_eta, self.breaker_state == "half_open"
        elif self.vpn_enabled and self.vpn_erroring:
            code, eta, can_retry = "vpn_error", 60, True
        elif len(self._engines) >= self.max_replicas:
            return {
                "code": "max_capacity",
                "message": f"Maximum capacity reached ({self.max_replicas} engines)",
                "recovery_eta_seconds": 30,
                "can_retry": False,
                "should_wait": True,
            }
        else:
            return None
        message = _ERRORS[code][2]
        if code == "circuit_breaker":
            message = f"Circuit breaker is {self.breaker_state} due to repeated failures"
        return {
            "code": code,
            "message": message,
            "recovery_eta_seconds": eta,
            "can_retry": can_retry,
            "should_wait": True,
        }

    def served_status_document(self) -> dict:
        """The ``GET /orchestrator/status`` body as served: the current
        document, or with ``status_lag`` the one recorded ``status_lag``
        seconds ago (the oldest recorded when none is that old), its
        ``timestamp`` the time it stands for."""
        if self._status_lag <= 0:
            return self.status_document()
        self._record_status()
        cutoff = self.reactor.seconds() - self._status_lag
        when, doc = self._status_history[0]
        for recorded, document in self._status_history:
            if recorded > cutoff:
                break
            when, doc = recorded, document
        served = copy.deepcopy(doc)
        served["timestamp"] = rfc3339(max(when, cutoff))
        return served

    def _record_status(self) -> None:
        """Remember the current document for a lagged status (only while
        ``status_lag`` > 0): a new entry when it differs from the newest one
        other than by ``timestamp``; entries older than the newest one at or
        before ``now - status_lag`` are no longer needed and are dropped."""
        if self._status_lag <= 0:
            return
        now = self.reactor.seconds()
        doc = self.status_document()
        history = self._status_history
        if not history or {**history[-1][1], "timestamp": None} != {**doc, "timestamp": None}:
            history.append((now, doc))
        cutoff = now - self._status_lag
        needed = 0
        for i, (recorded, _) in enumerate(history):
            if recorded <= cutoff:
                needed = i
        del history[:needed]

    def status_document(self) -> dict:
        """The ``GET /orchestrator/status`` body for the current state."""
        now = self.reactor.seconds()
        engines = self._engines
        healthy = sum(1 for h in engines if h.health_status == "healthy")
        unhealthy = sum(1 for h in engines if h.health_status == "unhealthy")
        active = self.active_streams
        busy = {s.container_id for s in active}
        used = sum(1 for h in engines if h.container_id in busy)
        details = self.blocked_details()
        vpn_ok = self.vpn_enabled and self.vpn_connected
        if not engines:
            status = "unavailable"
        elif self.vpn_down or (self.vpn_enabled and self.vpn_erroring) or self.breaker_state != "closed":
            status = "degraded"
        else:
            status = "healthy"
        if not self.vpn_enabled:
            vpn_health = "unknown"
        elif vpn_ok and not self.vpn_erroring:
            vpn_health = "healthy"
        else:
            vpn_health = "unhealthy"
        return {
            "status": status,
            "engines": {"total": len(engines), "running": len(engines), "healthy": healthy, "unhealthy": unhealthy},
            "streams": {"active": len(active), "total": len(self.streams)},
            "capacity": {
                "total": len(engines),
                "used": used,
                "available": len(engines) - used,
                "max_replicas": self.max_replicas,
                "min_replicas": self.min_replicas,
            },
            "vpn": {
                "enabled": self.vpn_enabled,
                "connected": vpn_ok,
                "health": vpn_health,
                "container": "gluetun",
                "forwarded_port": self.forwarded_port if vpn_ok else None,
            },
            "provisioning": {
                "can_provision": details is None,
                "circuit_breaker_state": self.breaker_state,
                "last_failure": rfc3339(self.last_failure),
                "blocked_reason": details["message"] if details else None,
                "blocked_reason_details": details,
            },
            "timestamp": rfc3339(now),
        }

    # --- waiting ---------------------------------------------------------------------

    @property
    def waiters(self) -> int:
        return len(self._conditions)

    @property
    def connections(self) -> int:
        """TCP connections currently open to the orchestrator."""
        return len(self._site.connections)

    def when(self, predicate: Predicate) -> "Deferred[None]":
        """A Deferred that fires (once) as soon as ``predicate(self)`` is true
        (see :class:`acexy_tw.sim.conditions.Conditions`)."""
        return self._conditions.when(predicate)

    def _changed(self) -> None:
        """Re-check the ``when`` waiters (and record the status document for
        ``status_lag``); called after every state change."""
        self._record_status()
        self._conditions.changed()


# --- command line -------------------------------------------------------------------------


def _arguments(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    from acexy_tw.sim.engine import parse_bitrate

    parser = argparse.ArgumentParser(
        prog="python -m acexy_tw.sim.orchestrator",
        description="A simulated acestream-orchestrator managing simulated engines on loopback.",
    )
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--interface", default="127.0.0.1")
    parser.add_argument("--engines", type=int, default=0, help="engines running at start")
    parser.add_argument("--api-key", default="sim-key")
    parser.add_argument("--max-replicas", type=int, default=20)
    parser.add_argument("--min-replicas", type=int, default=0)
    parser.add_argument("--bitrate", type=parse_bitrate, default=2_000_000, help="engines' bitrate, e.g. 4M")
    parser.add_argument("--provision-delay", type=float, default=0.0, help="seconds a provision takes")
    parser.add_argument("--engine-ready-delay", type=float, default=0.0, help="seconds until a new engine answers")
    parser.add_argument(
        "--status-lag", type=float, default=0.0, help="seconds by which /orchestrator/status lags the real state"
    )
    parser.add_argument(
        "--replica-limit",
        choices=REPLICA_LIMITS,
        default="none",
        help="none: provisions ignore --max-replicas; gluetun: a 500 at --max-replicas",
    )
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run a simulated orchestrator until interrupted."""
    args = _arguments(argv)

    def start(reactor: Any) -> Any:
        orch = SimOrchestrator(
            reactor,
            api_key=args.api_key,
            max_replicas=args.max_replicas,
            min_replicas=args.min_replicas,
            engine_bitrate=args.bitrate,
            provision_delay=args.provision_delay,
            engine_ready_delay=args.engine_ready_delay,
            status_lag=args.status_lag,
            replica_limit=args.replica_limit,
        )
        orch.listen(args.port, args.interface)
        for _ in range(args.engines):
            orch.add_engine()
        print(f"simulated acestream-orchestrator on {orch.url} (API key {args.api_key!r})", flush=True)
        for handle in orch.engines:
            print(f"  engine {handle.container_name} on {handle.engine.url}", flush=True)
        return orch.shutdown

    run(start)


if __name__ == "__main__":
    main()
