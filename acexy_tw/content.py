"""
The content key: which stream a player asked for.

A player's query string (``?id=<40 hex>&transcode_audio=1``) becomes a
:class:`ContentKey`, the identity under which the proxy shares one engine
session among all players of the same content. Normalising here is what makes
``?id=ABC…`` and ``?id=abc…`` one session instead of two (an acexy defect).

The proxy owns ``format`` and ``pid`` (it sets them itself on the engine
request; a player's ``pid`` used to make acexy answer 400, so it is now
accepted and ignored) and reserves ``token`` for access control. Every other
parameter is passed through to the engine and is part of the key, because it
can change what the engine sends (e.g. ``transcode_audio``).

Untrusted input: every limit is checked before anything is built, and echoed
values are truncated and ``repr``-escaped so a query string cannot inject
control characters into a response or a log line. This module knows nothing
about Twisted or Klein; it takes ``Request.args`` as a plain mapping.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, Sequence
from urllib.parse import urlencode

__all__ = [
    "BadRequest",
    "ContentKey",
    "MAX_EXTRA_NAME",
    "MAX_EXTRA_VALUE",
    "MAX_EXTRAS",
    "RESERVED_PARAMS",
    "SELECTORS",
    "parse_query",
]

#: Query parameter -> key_type (the orchestrator's vocabulary, which is also
#: the engine's parameter name). ``id`` is the deprecated alias players use.
SELECTORS: Mapping[str, str] = MappingProxyType(
    {"id": "content_id", "content_id": "content_id", "infohash": "infohash"}
)

#: Parameters the proxy owns or reserves: dropped, never passed to the engine.
RESERVED_PARAMS = frozenset({"format", "pid", "token"})

#: Limits on pass-through parameters, so bad input costs nothing.
MAX_EXTRAS = 32
MAX_EXTRA_NAME = 64
MAX_EXTRA_VALUE = 1024
MAX_ECHO = 64

NO_SELECTOR = "one of `id` or `infohash` must have a value"
MANY_SELECTORS = "only one of `id` or `infohash` can have a value"

_HEX40_RE = re.compile(r"[0-9a-fA-F]{40}")
_EXTRA_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")


class BadRequest(ValueError):
    """The query cannot name a stream; ``message`` is the 400 body for the player."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class ContentKey:
    """
    A normalised stream identity: equal keys share one engine session.

    ``value`` is lower-case 40-hex; ``extras`` are the pass-through
    parameters sorted by (name, value), so two players asking for the same
    thing in a different parameter order get equal (and equally hashed) keys.
    """

    key_type: str  # "content_id" | "infohash"
    value: str
    extras: tuple[tuple[str, str], ...] = ()

    def engine_params(self) -> list[tuple[str, str]]:
        """Query parameters for the engine's getstream, before ``format``/``pid``."""
        return [(self.key_type, self.value), *self.extras]

    def __str__(self) -> str:
        if not self.extras:
            return self.value
        return f"{self.value}?{urlencode(self.extras)}"


def _echo(value: str) -> str:
    """A safe, bounded rendering of untrusted text for an error message."""
    shown = repr(value[:MAX_ECHO])
    return shown + "..." if len(value) > MAX_ECHO else shown


def _decode(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"query {what} must be UTF-8") from None


def parse_query(args: Mapping[bytes, Sequence[bytes]]) -> ContentKey:
    """
    The content key named by a query, given as ``twisted.web`` ``Request.args``.

    Exactly one selector (``id``, ``content_id`` or ``infohash``) must have a
    non-empty value; repeating it with the same value is fine. Raises
    :class:`BadRequest` (with acexy's exact texts where acexy has one).
    """
    selected: dict[str, set[str]] = {}  # selector param -> distinct (lower-cased) values
    raw_selected: dict[str, str] = {}  # selector param -> first value as given, for errors
    extras: list[tuple[str, str]] = []

    for raw_name, raw_values in args.items():
        name = _decode(raw_name, "parameter names")
        values = [_decode(v, "values") for v in raw_values]
        if name in SELECTORS:
            for v in values:
                if v:
                    selected.setdefault(name, set()).add(v.lower())
                    raw_selected.setdefault(name, v)
            continue
        if name in RESERVED_PARAMS:
            continue
        if len(name) > MAX_EXTRA_NAME:
            raise BadRequest(
                f"query parameter name {_echo(name)} is longer than {MAX_EXTRA_NAME} characters"
            )
        if not _EXTRA_NAME_RE.fullmatch(name):
            raise BadRequest(
                f"query parameter name {_echo(name)} may only contain "
                "letters, digits, '_', '.' and '-'"
            )
        for v in values:
            if len(v) > MAX_EXTRA_VALUE:
                raise BadRequest(
                    f"query parameter `{name}` has a value longer than {MAX_EXTRA_VALUE} characters"
                )
            extras.append((name, v))
            if len(extras) > MAX_EXTRAS:
                raise BadRequest(f"too many query parameters (at most {MAX_EXTRAS})")

    if not selected:
        raise BadRequest(NO_SELECTOR)
    if len(selected) > 1 or any(len(vs) > 1 for vs in selected.values()):
        raise BadRequest(MANY_SELECTORS)

    [(param, values)] = selected.items()
    [value] = values
    if not _HEX40_RE.fullmatch(value):
        raise BadRequest(
            f"`{param}` must be 40 hexadecimal characters, got {_echo(raw_selected[param])}"
        )
    return ContentKey(SELECTORS[param], value, tuple(sorted(extras)))
