"""
The acestream-orchestrator wire contract as typed calls (CONTRACTS.md §2).

Every call is bounded in time on the injected clock and reads its (capped)
body with :func:`acexy_tw.engine.read_body`. Whatever goes wrong comes out as
an :class:`OrchestratorError` subclass:

- :class:`OrchestratorUnavailable` — refused, timed out, reset, a 5xx without a
  structured body, garbage JSON: the proxy falls back to its configured engine;
- :class:`ProvisionTimeout` (an ``OrchestratorUnavailable``) — provisioning may
  or may not have started a container: look in ``/engines`` before re-POSTing;
- :class:`OrchestratorAuthError` — 401/403;
- :class:`ProvisionBlocked` — temporary (VPN down, breaker open, full): wait;
- :class:`ProvisionFailed` — permanent for this attempt (``general_error``).

A cancellation by the caller stays a ``CancelledError``.

The API key goes into the ``Authorization`` header of every request and
nowhere else: not in a ``repr``, not in an exception message (any text from
the orchestrator or the network is scrubbed of it before it is quoted).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Optional
from urllib.parse import urlencode

from twisted.internet import error as neterror
from twisted.internet.defer import CancelledError, Deferred, TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.iweb import IResponse

from acexy_tw.engine import EngineAddress, EngineError, deadline, describe, read_body, was_cancelled

#: Cap for small answers (status, provision, events).
MAX_BODY = 256 * 1024
#: Cap for listings (/engines, /streams): a big fleet.
MAX_LIST_BODY = 1024 * 1024

#: What older orchestrators' ``{"detail": "<string>"}`` texts mean, first match
#: wins: (lower-case needle, code, recovery ETA, can_retry, should_wait).
_LEGACY_BLOCKED = (
    ("vpn", "vpn_disconnected", 60, True, True),
    ("circuit breaker", "circuit_breaker", 180, False, True),
    ("capacity", "max_capacity", 30, False, True),
    # Gluetun mode: 500 "Maximum active replicas limit reached (N)" is capacity, not a failure
    ("replicas limit", "max_capacity", 30, False, True),
)


# -- errors ------------------------------------------------------------------


class OrchestratorError(Exception):
    """Something the orchestrator (or the way to it) did not do."""


class OrchestratorUnavailable(OrchestratorError):
    """Unreachable, too slow, or made no sense: fall back to the configured engine."""


class ProvisionTimeout(OrchestratorUnavailable):
    """
    A provision request reached (or may have reached) the orchestrator, but we
    do not know what came of it: it timed out, the connection dropped after
    the request was sent, or the answer was unreadable. A container may have
    been started: look in ``/engines`` before POSTing again.
    """


class OrchestratorAuthError(OrchestratorError):
    """401/403: the API key is missing or wrong (the message never holds it)."""

    def __init__(self, message: str, http_status: int) -> None:
        super().__init__(message)
        self.message = message
        self.http_status = http_status


@dataclass(frozen=True)
class BlockedDetails:
    """Why provisioning is blocked right now, and what to do about it."""

    code: str
    message: str
    recovery_eta_seconds: Optional[int]
    can_retry: bool
    should_wait: bool


class ProvisionBlocked(OrchestratorError):
    """
    Temporary: the orchestrator cannot provision now (VPN, breaker, capacity).

    ``recovery_eta_seconds`` may be ``None`` or ≤ 0 (a breaker still open):
    treat that as "poll again", not as "go".
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        recovery_eta_seconds: Optional[int] = None,
        can_retry: bool = False,
        should_wait: bool = True,
        http_status: Optional[int] = None,
    ) -> None:
        eta = "" if recovery_eta_seconds is None else f" (recovery in ~{recovery_eta_seconds}s)"
        super().__init__(f"provisioning blocked: {code}: {message}{eta}")
        self.code = code
        self.message = message
        self.recovery_eta_seconds = recovery_eta_seconds
        self.can_retry = can_retry
        self.should_wait = should_wait
        self.http_status = http_status

    @property
    def details(self) -> BlockedDetails:
        return BlockedDetails(
            self.code, self.message, self.recovery_eta_seconds, self.can_retry, self.should_wait
        )


class ProvisionFailed(OrchestratorError):
    """Permanent for this attempt: the orchestrator tried and failed."""

    def __init__(self, code: str, message: str, *, http_status: Optional[int] = None) -> None:
        super().__init__(f"provisioning failed: {code}: {message}")
        self.code = code
        self.message = message
        self.http_status = http_status


class _BadAnswer(ValueError):
    """A document that does not have the contract's shape (internal)."""


# -- values ------------------------------------------------------------------


@dataclass(frozen=True)
class OrchestratorStatus:
    """``GET /orchestrator/status``, flattened."""

    status: str  # healthy | degraded | unavailable (others passed through)
    engines_total: int
    engines_running: int
    engines_healthy: int
    streams_active: int
    capacity_total: int
    capacity_used: int
    capacity_available: int
    max_replicas: Optional[int]
    vpn_enabled: bool
    vpn_connected: bool
    vpn_health: Optional[str]
    can_provision: bool
    breaker_state: Optional[str]  # closed | open | half_open
    blocked_reason: Optional[str]
    blocked: Optional[BlockedDetails]
    timestamp: Optional[str]

    @property
    def vpn_down(self) -> bool:
        """``vpn.connected`` is false when the VPN is disabled: down only if enabled."""
        return self.vpn_enabled and not self.vpn_connected

    @property
    def blocked_code(self) -> Optional[str]:
        return self.blocked.code if self.blocked is not None else None


@dataclass(frozen=True)
class OrchestratedEngine:
    """One entry of ``GET /engines``."""

    container_id: str
    container_name: str
    host: str
    port: int
    streams: tuple[str, ...] = ()
    health_status: str = "unknown"  # healthy | unhealthy | unknown
    last_stream_usage: Optional[datetime] = None  # always timezone-aware
    forwarded: bool = False
    labels: dict = field(default_factory=dict, hash=False)

    @property
    def url(self) -> str:
        return self.address.url

    @property
    def address(self) -> EngineAddress:
        """Where the proxy reaches this engine (for an ``EngineClient``)."""
        return EngineAddress("http", self.host, self.port)


@dataclass(frozen=True)
class Provisioned:
    """``POST /provision/acestream`` succeeded (reach it via ``/engines``' host/port)."""

    container_id: str
    container_name: str
    host_http_port: Optional[int]
    container_http_port: Optional[int]


def stream_id_for(key: str, playback_session_id: str) -> str:
    """The ``labels.stream_id`` we send: ``<key>|<playback_session_id>``."""
    return f"{key}|{playback_session_id}"


def stream_started_event(
    *,
    container_id: str,
    engine_host: str,
    engine_port: int,
    key_type: str,
    key: str,
    playback_session_id: str,
    stat_url: str,
    command_url: str,
    is_live: int,
) -> dict:
    """The body of ``POST /events/stream_started``, exactly as CONTRACTS.md §2."""
    return {
        "container_id": container_id,
        "engine": {"host": engine_host, "port": engine_port},
        "stream": {"key_type": key_type, "key": key},
        "session": {
            "playback_session_id": playback_session_id,
            "stat_url": stat_url,
            "command_url": command_url,
            "is_live": is_live,
        },
        "labels": {"stream_id": stream_id_for(key, playback_session_id)},
    }


# -- tolerant parsing ----------------------------------------------------------


def _section(doc: dict, key: str) -> dict:
    value = doc.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _BadAnswer(f"{key!r} is not an object")
    return value


def _int(doc: dict, key: str, default: int = 0) -> int:
    value = _opt_int(doc, key)
    return default if value is None else value


def _opt_int(doc: dict, key: str) -> Optional[int]:
    value = doc.get(key)
    if value is None:
        return None
    if isinstance(value, bool):
        raise _BadAnswer(f"{key!r} is not a number")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise _BadAnswer(f"{key!r} is not a whole number")


def _bool(doc: dict, key: str, default: bool = False) -> bool:
    value = doc.get(key)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise _BadAnswer(f"{key!r} is not a boolean")


def _opt_str(doc: dict, key: str) -> Optional[str]:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _BadAnswer(f"{key!r} is not a string")
    return value


def _str(doc: dict, key: str) -> str:
    value = _opt_str(doc, key)
    if not value:
        raise _BadAnswer(f"{key!r} is missing")
    return value


def _opt_time(doc: dict, key: str) -> Optional[datetime]:
    text = _opt_str(doc, key)
    if not text:
        return None
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise _BadAnswer(f"{key!r} is not an RFC 3339 time") from None
    # The contract promises an offset; a naive time would make comparisons
    # (ranking) raise, so read it as UTC.
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


def _blocked_details(doc: dict, *, default_code: str = "unknown") -> BlockedDetails:
    return BlockedDetails(
        code=_opt_str(doc, "code") or default_code,
        message=_opt_str(doc, "message") or "",
        recovery_eta_seconds=_opt_int(doc, "recovery_eta_seconds"),
        can_retry=_bool(doc, "can_retry", False),
        should_wait=_bool(doc, "should_wait", True),
    )


def parse_status(doc: Any) -> OrchestratorStatus:
    if not isinstance(doc, dict):
        raise _BadAnswer("status is not an object")
    engines = _section(doc, "engines")
    streams = _section(doc, "streams")
    capacity = _section(doc, "capacity")
    vpn = _section(doc, "vpn")
    prov = _section(doc, "provisioning")
    details = prov.get("blocked_reason_details")
    if details is not None and not isinstance(details, dict):
        raise _BadAnswer("'blocked_reason_details' is not an object")
    blocked = _blocked_details(details) if details else None
    blocked_reason = _opt_str(prov, "blocked_reason")
    breaker = _opt_str(prov, "circuit_breaker_state")
    can_provision = prov.get("can_provision")
    if can_provision is None:
        # Not said: infer it from what was said.
        can_provision = blocked is None and not blocked_reason and breaker != "open"
    else:
        can_provision = _bool(prov, "can_provision")
    return OrchestratorStatus(
        status=_str(doc, "status"),
        engines_total=_int(engines, "total"),
        engines_running=_int(engines, "running"),
        engines_healthy=_int(engines, "healthy"),
        streams_active=_int(streams, "active"),
        capacity_total=_int(capacity, "total"),
        capacity_used=_int(capacity, "used"),
        capacity_available=_int(capacity, "available"),
        max_replicas=_opt_int(capacity, "max_replicas"),
        vpn_enabled=_bool(vpn, "enabled"),
        vpn_connected=_bool(vpn, "connected"),
        vpn_health=_opt_str(vpn, "health"),
        can_provision=can_provision,
        breaker_state=breaker,
        blocked_reason=blocked_reason,
        blocked=blocked,
        timestamp=_opt_str(doc, "timestamp"),
    )


def parse_engine(doc: Any) -> OrchestratedEngine:
    if not isinstance(doc, dict):
        raise _BadAnswer("an engine is not an object")
    streams = doc.get("streams")
    if streams is None:
        streams = []
    if not isinstance(streams, list) or not all(isinstance(s, str) for s in streams):
        raise _BadAnswer("'streams' is not a list of ids")
    labels = doc.get("labels")
    if labels is None:
        labels = {}
    if not isinstance(labels, dict):
        raise _BadAnswer("'labels' is not an object")
    port = _opt_int(doc, "port")
    if port is None or not 0 < port < 65536:
        raise _BadAnswer("'port' is missing or out of range")
    return OrchestratedEngine(
        container_id=_str(doc, "container_id"),
        container_name=_opt_str(doc, "container_name") or "",
        host=_str(doc, "host"),
        port=port,
        streams=tuple(streams),
        health_status=_opt_str(doc, "health_status") or "unknown",
        last_stream_usage=_opt_time(doc, "last_stream_usage"),
        forwarded=_bool(doc, "forwarded"),
        labels=dict(labels),
    )


def parse_engines(doc: Any) -> list[OrchestratedEngine]:
    if not isinstance(doc, list):
        raise _BadAnswer("engines is not a list")
    return [parse_engine(e) for e in doc]


def parse_provisioned(doc: Any) -> Provisioned:
    if not isinstance(doc, dict):
        raise _BadAnswer("provision answer is not an object")
    return Provisioned(
        container_id=_str(doc, "container_id"),
        container_name=_opt_str(doc, "container_name") or "",
        host_http_port=_opt_int(doc, "host_http_port"),
        container_http_port=_opt_int(doc, "container_http_port"),
    )


# -- the client ------------------------------------------------------------------


class OrchestratorClient:
    """
    acestream-orchestrator over HTTP.

    ``http`` is a ``treq.client.HTTPClient`` on the service's own pool (or a
    ``StubTreq``); ``clock`` bounds every call: ``timeout`` seconds, or
    ``provision_timeout`` for ``provision`` (it is slow: ~30 s).
    """

    def __init__(
        self,
        http: Any,
        base_url: str,
        api_key: Optional[str],
        clock: IReactorTime,
        *,
        timeout: float = 10.0,
        provision_timeout: float = 60.0,
    ) -> None:
        self._http = http
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key or None
        self._clock = clock
        self.timeout = timeout
        self.provision_timeout = provision_timeout

    def __repr__(self) -> str:
        auth = "with API key" if self._api_key else "without API key"
        return f"<OrchestratorClient {self.base_url} {auth}>"

    # -- calls -------------------------------------------------------------------

    def status(self) -> Deferred[OrchestratorStatus]:
        return self._call("GET", "/orchestrator/status", parse=parse_status, what="status")

    def engines(self) -> Deferred[list[OrchestratedEngine]]:
        return self._call("GET", "/engines", parse=parse_engines, what="engines", limit=MAX_LIST_BODY)

    def streams(self, container_id: Optional[str] = None) -> Deferred[list[dict]]:
        """Started streams (``status=started`` always), optionally on one engine."""
        query = [("status", "started")]
        if container_id is not None:
            query.append(("container_id", container_id))
        return self._call(
            "GET", f"/streams?{urlencode(query)}", parse=_parse_streams, what="streams", limit=MAX_LIST_BODY
        )

    def provision(self) -> Deferred[Provisioned]:
        """
        Start a new engine. Slow; bounded by ``provision_timeout``. A
        :class:`ProvisionTimeout` means a container may exist: check
        ``/engines`` before calling this again.
        """
        return self._call(
            "POST",
            "/provision/acestream",
            body={"labels": {}, "env": {}},
            parse=parse_provisioned,
            what="provision",
            seconds=self.provision_timeout,
            unknown_outcome=ProvisionTimeout,
        )

    def stream_started(self, event: dict) -> Deferred[None]:
        """Report one engine session (see :func:`stream_started_event`)."""
        return self._call("POST", "/events/stream_started", body=event, parse=None, what="stream_started")

    def stream_ended(self, container_id: str, stream_id: str, reason: str) -> Deferred[None]:
        """Report its end, with exactly the ``labels.stream_id`` that was sent."""
        body = {"container_id": container_id, "stream_id": stream_id, "reason": reason}
        return self._call("POST", "/events/stream_ended", body=body, parse=None, what="stream_ended")

    # -- plumbing ----------------------------------------------------------------

    def _call(
        self,
        method: str,
        path: str,
        *,
        what: str,
        parse: Optional[Callable[[Any], Any]],
        body: Optional[dict] = None,
        limit: int = MAX_BODY,
        seconds: Optional[float] = None,
        unknown_outcome: type[OrchestratorUnavailable] = OrchestratorUnavailable,
    ) -> Deferred:
        return self._bounded(
            Deferred.fromCoroutine(self._exchange(method, path, what, parse, body, limit, unknown_outcome)),
            self.timeout if seconds is None else seconds,
            what,
            unknown_outcome,
        )

    async def _exchange(
        self,
        method: str,
        path: str,
        what: str,
        parse: Optional[Callable[[Any], Any]],
        body: Optional[dict],
        limit: int,
        unknown_outcome: type[OrchestratorUnavailable],
    ) -> Any:
        headers = {b"Accept": [b"application/json"]}
        if self._api_key:
            headers[b"Authorization"] = [b"Bearer " + self._api_key.encode("utf-8")]
        data = None
        if body is not None:
            headers[b"Content-Type"] = [b"application/json"]
            data = json.dumps(body).encode("utf-8")
        response: IResponse = await self._http.request(
            method,
            self.base_url + path,
            headers=headers,
            data=data,
            unbuffered=True,  # we read bodies ourselves: capped, cancellable
            allow_redirects=False,  # never carry the key somewhere else
        )
        try:
            raw = await read_body(response, limit)
        except EngineError:  # read_body's "too big"
            raise unknown_outcome(f"orchestrator answer to {what} is larger than {limit} bytes") from None
        code = response.code
        if 200 <= code < 300:
            if parse is None:
                return None
            try:
                return parse(json.loads(raw))
            except (ValueError, _BadAnswer) as e:
                reason = str(e) if isinstance(e, _BadAnswer) else "not JSON"
                raise unknown_outcome(
                    f"orchestrator sent an unexpected answer to {what}: {self._scrub(reason)}"
                ) from None
        raise self._error(code, raw, what, posted=method == "POST", unknown_outcome=unknown_outcome)

    def _error(
        self, code: int, raw: bytes, what: str, *, posted: bool, unknown_outcome: type[OrchestratorUnavailable]
    ) -> OrchestratorError:
        """The typed error for a non-2xx answer."""
        if code in (401, 403):
            return OrchestratorAuthError(
                f"orchestrator refused {what} with HTTP {code}: check ACEXY_ORCH_APIKEY", code
            )
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None
        detail = doc.get("detail") if isinstance(doc, dict) else None
        if code == 422:
            return OrchestratorError(f"orchestrator rejected {what} (422): {self._detail_text(detail, raw)}")
        if posted and isinstance(detail, dict) and (detail.get("error") or detail.get("code")):
            return self._structured(code, detail, what)
        if what == "provision" and isinstance(detail, str):
            return self._legacy(code, detail)
        if code == 504:
            # A gateway gave up after the request got through: for provision,
            # a container may have started.
            return unknown_outcome(f"orchestrator {what} answered 504 (gateway timeout)")
        if posted and 400 <= code < 500:
            return OrchestratorError(f"orchestrator refused {what} ({code}): {self._detail_text(detail, raw)}")
        return OrchestratorUnavailable(f"orchestrator {what} answered {code}: {self._detail_text(detail, raw)}")

    def _structured(self, code: int, detail: dict, what: str) -> OrchestratorError:
        try:
            error = _opt_str(detail, "error")
            blocked = (
                code == 503
                or error == "provisioning_blocked"
                or _bool(detail, "should_wait")
                or _bool(detail, "can_retry")
            )
            if blocked:
                d = _blocked_details(detail, default_code=error or "provisioning_blocked")
                return ProvisionBlocked(
                    d.code,
                    self._scrub(d.message[:300]),
                    recovery_eta_seconds=d.recovery_eta_seconds,
                    can_retry=d.can_retry,
                    should_wait=d.should_wait,
                    http_status=code,
                )
            return ProvisionFailed(
                _opt_str(detail, "code") or "general_error",
                self._scrub((_opt_str(detail, "message") or "")[:300]),
                http_status=code,
            )
        except _BadAnswer as e:
            return OrchestratorUnavailable(
                f"orchestrator sent an unexpected answer to {what} ({code}): {self._scrub(str(e))}"
            )

    def _legacy(self, code: int, text: str) -> OrchestratorError:
        message = self._scrub(text[:300])
        lowered = text.lower()
        for needle, name, eta, can_retry, should_wait in _LEGACY_BLOCKED:
            if needle in lowered:
                return ProvisionBlocked(
                    name,
                    message,
                    recovery_eta_seconds=eta,
                    can_retry=can_retry,
                    should_wait=should_wait,
                    http_status=code,
                )
        return ProvisionFailed("general_error", message, http_status=code)

    def _detail_text(self, detail: Any, raw: bytes) -> str:
        if isinstance(detail, str):
            text = detail
        elif isinstance(detail, list):  # FastAPI validation errors
            text = "; ".join(
                str(item.get("msg", item)) if isinstance(item, dict) else str(item) for item in detail
            )
        elif detail is not None:
            text = json.dumps(detail)
        else:
            text = raw.decode("utf-8", "replace").strip() or "no body"
        return self._scrub(text[:300])

    def _scrub(self, text: str) -> str:
        """Never quote the key back, even if the other side echoes it."""
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return text

    def _bounded(
        self, d: Deferred, seconds: float, what: str, unknown_outcome: type[OrchestratorUnavailable]
    ) -> Deferred:
        """``d``, cancelled after ``seconds`` on our clock; failures typed."""

        def settle(result: Any, timed_out: bool) -> Any:
            if not isinstance(result, Failure):
                return result
            extra = "; a container may have started: check /engines" if what == "provision" else ""
            if timed_out or result.check(DeferredTimeout):
                raise unknown_outcome(f"orchestrator did not answer {what} within {seconds:g}s{extra}")
            if result.check(OrchestratorError):
                return result
            if was_cancelled(result):
                raise CancelledError()
            reason = self._scrub(describe(result))
            if result.check(ResponseNeverReceived, ResponseFailed):
                # The request went out; for provision the outcome is unknown.
                raise unknown_outcome(f"orchestrator {what} failed: {reason}{extra}")
            if result.check(neterror.TimeoutError):
                raise OrchestratorUnavailable(f"orchestrator {what}: connection timed out")
            raise OrchestratorUnavailable(f"orchestrator {what} failed: {reason}")

        return deadline(d, seconds, self._clock, settle)


def _parse_streams(doc: Any) -> list[dict]:
    if not isinstance(doc, list) or not all(isinstance(s, dict) for s in doc):
        raise _BadAnswer("streams is not a list of objects")
    return doc
