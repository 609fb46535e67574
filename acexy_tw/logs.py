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
"""

from __future__ import annotations

import re
from typing import Any, Callable
from urllib.parse import unquote_plus

from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    Logger,
    globalLogPublisher,
)

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
    _predicate.defaultLogLevel = LEVELS[name]


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


class RedactingFile:
    """A text file whose every write goes through :func:`redact` first."""

    def __init__(self, out: Any) -> None:
        self._out = out

    def write(self, text: str) -> Any:
        return self._out.write(redact(text))

    def flush(self) -> None:
        flush: Callable[[], None] = getattr(self._out, "flush", lambda: None)
        flush()


#: set when twistd was started with ``--logger acexy_tw.logs.observer``
observer_installed = False


def observer() -> object:
    """
    twistd's log observer factory: ``twistd --logger acexy_tw.logs.observer``.

    Writes to stdout (journald, procd's logd and Docker collect it) as text or,
    with ``ACEXY_LOG_FORMAT=json``, one JSON object per line; either way
    through :func:`redact`, so no line carries a token.
    """
    import os
    import sys

    from twisted.logger import jsonFileLogObserver, textFileLogObserver

    global observer_installed
    observer_installed = True
    fmt = (os.environ.get("ACEXY_LOG_FORMAT") or "text").strip().lower()
    out = RedactingFile(sys.stdout)
    if fmt == "json":
        return jsonFileLogObserver(out)  # type: ignore[arg-type]
    return textFileLogObserver(out)  # type: ignore[arg-type]
