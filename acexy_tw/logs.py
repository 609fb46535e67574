"""
Logging conventions.

``twistd`` installs its log observers *after* ``makeService`` runs, so the
level filter cannot be put in front of them. Instead every acexy_tw module
logs through :func:`get_logger`, whose observer filters by ACEXY_LOG_LEVEL and
then forwards to the global publisher that twistd (or a test) listens to.
Twisted's own chatter is kept down separately: factories are not noisy and the
HTTP access log is off (it wears flash on routers).
"""

from __future__ import annotations

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


#: set when twistd was started with ``--logger acexy_tw.logs.observer``
observer_installed = False


def observer() -> object:
    """
    twistd's log observer factory: ``twistd --logger acexy_tw.logs.observer``.

    Writes to stdout (journald, procd's logd and Docker collect it) as text or,
    with ``ACEXY_LOG_FORMAT=json``, one JSON object per line.
    """
    import os
    import sys

    from twisted.logger import jsonFileLogObserver, textFileLogObserver

    global observer_installed
    observer_installed = True
    fmt = (os.environ.get("ACEXY_LOG_FORMAT") or "text").strip().lower()
    if fmt == "json":
        return jsonFileLogObserver(sys.stdout)
    return textFileLogObserver(sys.stdout)
