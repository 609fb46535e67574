"""
The content key: which stream a player asked for.

A player's query string (``?id=<40 hex>&transcode_audio=1``) becomes a
:class:`ContentKey`, the identity under which the proxy shares one engine
session among all players of the same content. Normalising here is what makes
``?id=ABC…`` and ``?id=abc…`` one session instead of two (an acexy defect).

Exactly one content selector: ``id`` (alias of ``content_id``) or
``infohash``, its value written ``<40 hex>`` or ``acestream://<40 hex>``. The
engine's other selectors (``url``, ``magnet``, ``data``, ``direct_url``,
``torrent_url``) are never forwarded; next to an id they are a 400, alone they
are the acexy "no selector" 400.

Only the engine options in :data:`ENGINE_OPTIONS` are forwarded to the
engine; any other parameter is dropped (a debug log line), so ``&junk=<i>``
cannot open one engine session per value and nothing a player sends reaches
the engine unless it is a known option. The options that change what the
engine plays are part of the key; the others (``force_session_restart``) are
forwarded when the session starts, and do not make a new session.

The proxy owns ``format`` and ``pid`` (it sets them itself; a player's
``pid`` made acexy answer 400, so it is accepted and ignored) and reserves
``token`` for access control. Reserved names and selectors are matched
case-insensitively: ``PID=``, ``Format=`` or ``ID=`` are not different
parameters. Values are kept decoded (``Request.args`` is percent-decoded
once); the engine client encodes them once (``urlencode``).

Untrusted input: every value is bounded, and echoed values are truncated and
``repr``-escaped so a query string cannot inject control characters into a
response or a log line. This module knows nothing about Twisted's web or
reactor; it takes ``Request.args`` as a plain mapping.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Sequence
from urllib.parse import urlencode

from acexy_tw.logs import get_logger

__all__ = [
    "BadRequest",
    "ContentKey",
    "ENGINE_OPTIONS",
    "FOREIGN_SELECTORS",
    "MAX_EXTRA_VALUE",
    "RESERVED_PARAMS",
    "SELECTORS",
    "parse_query",
    "strip_scheme",
]

log = get_logger(__name__)

#: Query parameter -> key_type (the orchestrator's vocabulary, which is also
#: the engine's parameter name). ``id`` is the deprecated alias players use.
#: Matched case-insensitively.
SELECTORS: Mapping[str, str] = MappingProxyType(
    {"id": "content_id", "content_id": "content_id", "infohash": "infohash"}
)

#: The engine's other content selectors: the proxy keys sessions by a 40-hex
#: id, so these are never forwarded (next to an id: 400). Case-insensitive.
FOREIGN_SELECTORS = frozenset({"url", "magnet", "data", "direct_url", "torrent_url"})

#: Parameters the proxy owns or reserves: dropped, never passed to the engine.
#: Case-insensitive.
RESERVED_PARAMS = frozenset({"format", "pid", "token"})

#: The engine options forwarded (exact names, as the engine spells them;
#: AceStream wiki, Engine HTTP API and Playlist API) -> whether the option
#: changes what the engine plays, i.e. is part of the session key.
ENGINE_OPTIONS: Mapping[str, bool] = MappingProxyType(
    {
        "file_indexes": True,
        "transcode_audio": True,
        "transcode_mp3": True,
        "transcode_ac3": True,
        "preferred_audio_language": True,
        "force_session_restart": False,
    }
)

#: Longest option value accepted (bad input costs nothing).
MAX_EXTRA_VALUE = 1024
MAX_ECHO = 64
#: dropped parameter names named in one debug line
_MAX_DROPPED_LOGGED = 8

NO_SELECTOR = "one of `id` or `infohash` must have a value"
MANY_SELECTORS = "only one of `id` or `infohash` can have a value"

_HEX40_RE = re.compile(r"[0-9a-fA-F]{40}")


class BadRequest(ValueError):
    """The query cannot name a stream; ``message`` is the 400 body for the player."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class ContentKey:
    """
    A normalised stream identity: equal keys share one engine session.

    ``value`` is lower-case 40-hex; ``extras`` are the forwarded options that
    change what the engine plays, sorted by name, so two players asking for
    the same thing in a different parameter order get equal (and equally
    hashed) keys. ``options`` are forwarded options that do not change what
    is played: sent when the session starts, not part of equality or hash.
    """

    key_type: str  # "content_id" | "infohash"
    value: str
    extras: tuple[tuple[str, str], ...] = ()
    options: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    def engine_params(self) -> list[tuple[str, str]]:
        """Query parameters for the engine's getstream, before ``format``/``pid``
        (decoded; the engine client encodes them once)."""
        return [(self.key_type, self.value), *sorted(self.extras + self.options)]

    def __str__(self) -> str:
        if not self.extras:
            return self.value
        return f"{self.value}?{urlencode(self.extras)}"


def _echo(value: str) -> str:
    """A safe, bounded rendering of untrusted text for an error message."""
    shown = repr(value[:MAX_ECHO])
    return shown + "..." if len(value) > MAX_ECHO else shown


_SCHEME = "acestream://"


def strip_scheme(value: str) -> str:
    """``acestream://<id>`` (as playlists and players write it) is ``<id>``."""
    if value[: len(_SCHEME)].lower() == _SCHEME:
        return value[len(_SCHEME):].rstrip("/")
    return value


def _decode(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"query {what} must be UTF-8") from None


def parse_query(args: Mapping[bytes, Sequence[bytes]]) -> ContentKey:
    """
    The content key named by a query, given as ``twisted.web`` ``Request.args``.

    Exactly one selector (``id``, ``content_id`` or ``infohash``, any case)
    must have a non-empty value; repeating it with the same value is fine.
    Each :data:`ENGINE_OPTIONS` entry may have one distinct non-empty value
    (repeats of it collapse); everything else is dropped. Raises
    :class:`BadRequest` (with acexy's exact texts where acexy has one).
    """
    selected: dict[str, set[str]] = {}  # selector param -> distinct (lower-cased) values
    raw_selected: dict[str, str] = {}  # selector param -> first value as given, for errors
    foreign: list[str] = []  # other engine selectors given a value
    chosen: dict[str, str] = {}  # engine option -> its value
    dropped: list[str] = []

    for raw_name, raw_values in args.items():
        name = _decode(raw_name, "parameter names")
        values = [_decode(v, "values") for v in raw_values]
        folded = name.lower()
        if folded in SELECTORS:
            for v in values:
                v = strip_scheme(v)
                if v:
                    selected.setdefault(folded, set()).add(v.lower())
                    raw_selected.setdefault(folded, v)
            continue
        if folded in FOREIGN_SELECTORS:
            if any(values):
                foreign.append(folded)
            continue
        if folded in RESERVED_PARAMS:
            continue
        if name not in ENGINE_OPTIONS:
            dropped.append(name)
            continue
        for v in values:
            if not v:
                continue
            if len(v) > MAX_EXTRA_VALUE:
                raise BadRequest(
                    f"query parameter `{name}` has a value longer than {MAX_EXTRA_VALUE} characters"
                )
            if chosen.setdefault(name, v) != v:
                raise BadRequest(f"query parameter `{name}` can only have one value")

    if dropped:
        shown = ", ".join(_echo(n) for n in sorted(dropped)[:_MAX_DROPPED_LOGGED])
        more = f" and {len(dropped) - _MAX_DROPPED_LOGGED} more" if len(dropped) > _MAX_DROPPED_LOGGED else ""
        log.debug("query parameters not forwarded to the engine: {names}{more}", names=shown, more=more)

    if not selected:
        raise BadRequest(NO_SELECTOR)
    if len(selected) > 1 or any(len(vs) > 1 for vs in selected.values()):
        raise BadRequest(MANY_SELECTORS)
    [(param, values)] = selected.items()
    if foreign:
        raise BadRequest(
            f"only one content selector can have a value: `{param}` and `{sorted(foreign)[0]}` were given"
        )

    [value] = values
    if not _HEX40_RE.fullmatch(value):
        raise BadRequest(
            f"`{param}` must be 40 hexadecimal characters, got {_echo(raw_selected[param])}"
        )
    extras = tuple(sorted((n, v) for n, v in chosen.items() if ENGINE_OPTIONS[n]))
    options = tuple(sorted((n, v) for n, v in chosen.items() if not ENGINE_OPTIONS[n]))
    return ContentKey(SELECTORS[param], value, extras, options)
