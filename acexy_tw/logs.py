"""
Logging conventions.

``twistd`` installs its log observers *after* ``makeService`` runs, so the
level filter cannot be put in front of them. Instead every acexy_tw module
logs through :func:`get_logger`, whose observer filters by ACEXY_LOG_LEVEL and
then forwards to the global publisher that twistd (or a test) listens to.
Twisted's own chatter is kept down separately: factories are not noisy and the
HTTP access log is off (it wears flash on routers).

No log line carries ACEXY_TOKEN: :func:`redact` replaces every ``token=``
query value (however its name is percent-encoded) and every ``Bearer``
credential with ``<redacted>``. The access log and the request's ``repr`` go
through it (:mod:`acexy_tw.web.server`), and so does everything
:func:`observer` writes.

What ``twistd --logger acexy_tw.logs.observer`` writes is Twisted's
``FileLogObserver`` with one of two formatters: :func:`format_text`
(Twisted's classic line, redacted) or :func:`format_json` (one plain JSON
object per line). The observer writes to stdout or straight to twistd's
``--logfile`` (see :func:`configure`), never through a wrapper, so SIGHUP
finds and reopens that file (:func:`acexy_tw._twisted_compat.log_files`).
"""

from __future__ import annotations

import json
import math
import re
import time
from datetime import datetime, timezone
from typing import Any, Callable, Optional
from urllib.parse import unquote_plus

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    Logger,
    formatEvent,
    formatEventAsClassicLogText,
    globalLogPublisher,
)
from twisted.python.failure import Failure
from twisted.python.reflect import safe_str

LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}

_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
_observer = FilteringLogObserver(globalLogPublisher, [_predicate])


def get_logger(namespace: str) -> Logger:
    return Logger(namespace=namespace, observer=_observer)


def set_level(name: str) -> None:
    """Set the lowest level emitted by acexy_tw loggers (debug/info/warn/error)."""
    # the root namespace's level: what every namespace without its own uses
    # (defaultLogLevel is only read when the predicate is made)
    _predicate.setLogLevelForNamespace("", LEVELS[name])


#: a query parameter: what precedes it, its name, its value
_PARAM = re.compile(r"""(^|[?&;\s"'(<,])([^=&?;\s"'<>]{1,64})=((?:\\"|[^&\s"])*)""")
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"',;]+")
REDACTED = "<redacted>"


def _redact_param(m: "re.Match[str]") -> str:
    if unquote_plus(m.group(2)).strip().lower() != "token":
        return m.group(0)
    return f"{m.group(1)}{m.group(2)}={REDACTED}"


def redact(text: str) -> str:
    """``text`` with every ``token=`` value and ``Bearer`` credential replaced by ``<redacted>``."""
    if "=" not in text and "earer" not in text.lower():
        return text
    return _BEARER.sub(r"\1" + REDACTED, _PARAM.sub(_redact_param, text))


def redact_bytes(data: bytes) -> bytes:
    """:func:`redact` for bytes (a URI, a header), byte for byte elsewhere."""
    return redact(data.decode("latin-1")).encode("latin-1")



# --- what twistd writes: text or JSON lines ---------------------------------------

#: the keys every JSON line starts with; an event's own field of the same name is left out
JSON_KEYS = ("time", "level", "logger", "message", "system", "traceback")

#: what twisted.python.log puts in every event it sends on (it sets ``isError``
#: and ``message`` itself): the old API's plumbing, not the event's own fields
_LEGACY_KEYS = frozenset({"message", "format", "isError", "failure", "why", "time", "system", "printed", "logLevel"})

_LEVELS = frozenset(LogLevel.iterconstants())

#: how deep lists and dicts in a field are followed before the rest is repr'd
_MAX_DEPTH = 6


def format_text(event: dict[str, Any]) -> Optional[str]:
    """Twisted's classic line (what ``textFileLogObserver`` writes) through :func:`redact`."""
    text = formatEventAsClassicLogText(event)
    return redact(text) if text else text


def _iso_time(when: Any) -> Optional[str]:
    """``2026-12-01T10:58:28.123Z`` for an epoch time; None if there is none."""
    try:
        stamp = datetime.fromtimestamp(float(when), timezone.utc)
    except (TypeError, ValueError, OverflowError, OSError):
        return None
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _repr(value: Any) -> str:
    try:
        return redact(repr(value))
    except Exception:
        return f"<unrepresentable {type(value).__name__}>"


def _plain(value: Any, depth: int = 0) -> Any:
    """``value`` as JSON can hold it: strings (and bytes, decoded) redacted,
    simple types kept, lists and dicts followed, anything else (and
    non-finite floats) repr'd."""
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, bytes):  # a URI, a header: as text
        return redact(value.decode("utf-8", "backslashreplace"))
    if depth < _MAX_DEPTH:
        if isinstance(value, (list, tuple)):
            return [_plain(item, depth + 1) for item in value]
        if isinstance(value, dict):
            return {redact(str(k)): _plain(v, depth + 1) for k, v in value.items()}
    return _repr(value)


def _failure_of(event: dict[str, Any]) -> tuple[Optional[Failure], Optional[str]]:
    """The event's failure, and for an old-API ``log.err`` (whose rendered
    text has the traceback in it) the message without it."""
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        return failure, None
    failure = event.get("failure")
    if event.get("isError") and isinstance(failure, Failure):
        if event.get("log_format") == "{log_text}" and not event.get("message"):
            return failure, safe_str(event.get("why") or "Unhandled Error")
        return failure, None
    return None, None


def _traceback(failure: Failure) -> str:
    try:
        return failure.getTraceback()
    except BaseException as e:  # Twisted's own text formatter does the same
        return f"(UNABLE TO OBTAIN TRACEBACK FROM EVENT): {e}"


def format_json(event: dict[str, Any]) -> Optional[str]:
    """
    One JSON object and a newline, for :class:`twisted.logger.FileLogObserver`.

    ``time`` (ISO 8601 UTC, milliseconds, ``Z``), ``level``
    (debug/info/warn/error/critical), ``logger`` (the namespace), ``message``
    (:func:`twisted.logger.formatEvent`), ``system`` when the event has one,
    ``traceback`` (text) when it carries a failure, then the event's own
    fields: Twisted's ``log_*`` keys left out, values JSON cannot hold repr'd.
    Every string goes through :func:`redact`. ASCII only: every control and
    non-ASCII character is escaped, so an event is always exactly one line.
    The events the text format skips (nothing to say) are skipped too.
    """
    try:
        return _json_line(event)
    except Exception as e:  # a log line must not be lost to a bad field
        return _dump({"time": _iso_time(time.time()), "level": "error", "logger": __name__,
                      "message": f"unformattable log event: {_repr(e)}"})


def _json_line(event: dict[str, Any]) -> Optional[str]:
    failure, message = _failure_of(event)
    if message is None:
        message = formatEvent(event)
    if not message and failure is None:
        return None
    level = event.get("log_level")
    line: dict[str, Any] = {
        "time": _iso_time(event.get("log_time")),
        "level": level.name if level in _LEVELS else "info",
        "logger": redact(str(event.get("log_namespace") or "-")),
        "message": redact(message),
    }
    system = event.get("log_system")
    if system is not None and system != "-":
        line["system"] = _plain(system if isinstance(system, str) else str(system))
    if failure is not None:
        line["traceback"] = redact(_traceback(failure))
    legacy = "isError" in event and "message" in event
    for key, value in event.items():
        if not isinstance(key, str) or key.startswith("log_") or key in JSON_KEYS:
            continue
        if legacy and key in _LEGACY_KEYS:
            continue
        line[redact(key)] = _plain(value)
    return _dump(line)


def _dump(line: dict[str, Any]) -> str:
    # DEL is the one control character JSON may carry raw: escape it too.
    return json.dumps(line, ensure_ascii=True, allow_nan=False).replace("\x7f", "\\u007f") + "\n"


FORMATTERS: dict[str, Callable[[dict[str, Any]], Optional[str]]] = {"text": format_text, "json": format_json}


def observer_for(out: Any, fmt: str = "text") -> FileLogObserver:
    """
    A ``FileLogObserver`` writing ``out`` (stdout, or a ``LogFile``) in ``fmt``
    (``text`` or ``json``). It writes to ``out`` itself, so
    :func:`acexy_tw._twisted_compat.log_files` finds a ``LogFile`` behind it
    and SIGHUP reopens it.
    """
    return FileLogObserver(out, FORMATTERS[fmt])


#: set when twistd was started with ``--logger acexy_tw.logs.observer``
observer_installed = False

#: what :func:`configure` was told (``format``, ``logfile``), for :func:`observer`
_configured: dict[str, Optional[str]] = {}


def configure(log_format: str, twistd_options: Any = None) -> None:
    """
    What :func:`observer` writes, and where. ``makeService`` calls it: twistd
    runs that before it builds its log observer. ``log_format`` is the
    setting (``ACEXY_LOG_FORMAT`` or ``--log-format``); ``twistd_options``
    is twistd's own options (the plugin options' ``parent``), whose
    ``--logfile`` is then written instead of stdout (``-`` is stdout).
    """
    _configured["format"] = log_format
    logfile = twistd_options.get("logfile") if twistd_options is not None else None
    _configured["logfile"] = logfile if logfile and logfile != "-" else None


def observer() -> object:
    """
    twistd's log observer factory: ``twistd --logger acexy_tw.logs.observer``.

    Text or, with ``ACEXY_LOG_FORMAT=json``, one JSON object per line
    (:func:`format_json`); either way through :func:`redact`, so no line
    carries a token. To stdout (journald, procd's logd and Docker collect it),
    or to twistd's ``--logfile`` once :func:`configure` has passed it on.
    """
    import os
    import sys

    from twisted.python.logfile import LogFile

    global observer_installed
    observer_installed = True
    chosen = dict(_configured)
    _configured.clear()  # for this observer only: twistd builds one, right after makeService
    fmt = (chosen.get("format") or os.environ.get("ACEXY_LOG_FORMAT") or "text").strip().lower()
    path = chosen.get("logfile")
    out = LogFile.fromFullPath(path) if path else sys.stdout  # as twistd opens its --logfile
    return observer_for(out, fmt if fmt in FORMATTERS else "text")
