"""
Settings: environment variables and command-line options -> a validated ``Config``.

Everything the proxy can be told lives in one table, :data:`SETTINGS`. Each row
names the ``Config`` field, the environment variable (acexy's name first, then
the aliases used by forks), the ``twistd`` option, the default *as text* and the
parser. The twistd ``Options`` (:func:`option_parameters`, and
:func:`option_flags` for the booleans, plain switches) and the docs
(:func:`settings_markdown`) are generated from the table, so adding a setting
means adding one row and one ``Config`` field, nothing else.

Defaults go through the same parser as user input, so a bad default fails the
test suite rather than a router at 3 am.

acexy silently turned a bad value into 0 (``ACEXY_BUFFER_SIZE=4 potatoes``
gave a zero-byte buffer). Here every bad value is a :class:`ConfigError` that
names the variable, the option when the value came from the command line, and
the raw text.

This module must stay reactor-free: it is imported by the twistd plugin scan
and by unit tests that never start a reactor.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
from dataclasses import dataclass, field
from decimal import Decimal
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, TypeVar

__all__ = [
    "Config",
    "ConfigError",
    "SETTINGS",
    "Setting",
    "load_config",
    "option_flags",
    "option_parameters",
    "optional",
    "parse_bool",
    "parse_buffer_size",
    "parse_duration",
    "parse_engines",
    "parse_coalesce_delay",
    "parse_fast_start",
    "parse_host",
    "parse_listen",
    "parse_log_level",
    "parse_non_negative_duration",
    "parse_playlists",
    "parse_public_url",
    "parse_port",
    "parse_positive_duration",
    "parse_scheme",
    "parse_size",
    "settings_markdown",
    "unknown_env_warnings",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """
    A setting's value could not be used.

    ``variable`` is the environment variable that held the value, or the
    setting's primary variable when the value came from a command-line option
    (then ``option`` names that option, without dashes). ``value`` is the raw
    text as given; ``reason`` says what is wrong and, where it helps, what is
    accepted.
    """

    def __init__(
        self,
        variable: str,
        value: str,
        reason: str,
        option: Optional[str] = None,
        *,
        secret: bool = False,
    ) -> None:
        self.variable = variable
        self.value = value
        self.reason = reason
        self.option = option
        self.secret = secret
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.variable if self.option is None else f"{self.variable} (--{self.option})"
        shown = "<redacted>" if self.secret else repr(self.value)
        return f"{where}={shown}: {self.reason}"


# ---------------------------------------------------------------------------
# Parsers. Each takes the raw text and returns the typed value, or raises a
# plain ValueError whose message is the *reason*; load_config wraps it in a
# ConfigError that names the variable and value. (ConfigError is itself a
# ValueError, so callers of the bare parsers can catch ValueError either way.)
# ---------------------------------------------------------------------------

_DURATION_UNITS: Mapping[str, Decimal] = MappingProxyType(
    {
        "ns": Decimal("1e-9"),
        "us": Decimal("1e-6"),
        "\u00b5s": Decimal("1e-6"),  # µ MICRO SIGN, as Go accepts
        "\u03bcs": Decimal("1e-6"),  # μ GREEK SMALL LETTER MU, as Go accepts
        "ms": Decimal("1e-3"),
        "s": Decimal(1),
        "m": Decimal(60),
        "h": Decimal(3600),
    }
)
_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"  # ASCII digits only, unlike \d
_BARE_NUMBER_RE = re.compile(rf"{_NUMBER}")
# One number+unit pair; longest units first so "ms" is not read as "m" + "s".
_DURATION_PART_RE = re.compile(rf"({_NUMBER})(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")
_DURATION_HELP = "use e.g. 500ms, 10s, 1m30s, 1h or a number of seconds"


def parse_duration(text: str) -> float:
    """
    A Go-style duration (``500ms``, ``10s``, ``1m30s``, ``1.5h``) in seconds.

    A bare number is seconds. Negative, non-finite and unit-less compound
    values (``1m30``) are rejected. Arithmetic is decimal, so ``1.1s`` is
    exactly the float nearest 1.1.
    """
    s = text.strip()
    if not s:
        raise ValueError(f"empty duration ({_DURATION_HELP})")
    if s.startswith("-"):
        raise ValueError("a duration must not be negative")
    if s.startswith("+"):  # Go accepts an explicit plus sign
        s = s[1:]
    if not s:
        raise ValueError(f"not a duration ({_DURATION_HELP})")
    if _BARE_NUMBER_RE.fullmatch(s):
        total = Decimal(s)
    else:
        total = Decimal(0)
        pos = 0
        while pos < len(s):
            m = _DURATION_PART_RE.match(s, pos)
            if m is None:
                raise ValueError(f"not a duration ({_DURATION_HELP})")
            total += Decimal(m.group(1)) * _DURATION_UNITS[m.group(2)]
            pos = m.end()
    seconds = float(total)
    if not math.isfinite(seconds):
        raise ValueError("duration is too large")
    return seconds


_SIZE_RE = re.compile(rf"({_NUMBER})\s*([A-Za-z]*)")
_SIZE_UNITS: Mapping[str, int] = MappingProxyType(
    {
        "": 1,
        "b": 1,
        "k": 1000,
        "kb": 1000,
        "ki": 1024,
        "kib": 1024,
        "m": 1000**2,
        "mb": 1000**2,
        "mi": 1024**2,
        "mib": 1024**2,
        "g": 1000**3,
        "gb": 1000**3,
        "gi": 1024**3,
        "gib": 1024**3,
        "t": 1000**4,
        "tb": 1000**4,
        "ti": 1024**4,
        "tib": 1024**4,
    }
)
_SIZE_HELP = "use e.g. 4MiB, 512KiB, 4MB or a number of bytes"


def parse_size(text: str) -> int:
    """
    A byte count like go-humanize's ``ParseBytes``: ``4MiB``, ``512 KiB``,
    ``4MB``, ``4M``, ``1.5MiB`` or a bare number of bytes.

    Units are case-insensitive. ``Ki``/``KiB``, ``Mi``/``MiB``... are binary
    (1024); ``K``/``KB``, ``M``/``MB``... are SI (1000), as in go-humanize.
    Fractions are truncated to whole bytes. (Thousands separators, which
    go-humanize also strips, are not accepted: ``1,5MiB`` is more likely a
    decimal comma than 15 MiB.)
    """
    s = text.strip()
    if not s:
        raise ValueError(f"empty size ({_SIZE_HELP})")
    if s.startswith("-"):
        raise ValueError("a size must not be negative")
    m = _SIZE_RE.fullmatch(s)
    if m is None or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"not a size ({_SIZE_HELP})")
    return int(Decimal(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def _bounded_duration(
    *, minimum: float, inclusive: bool
) -> Callable[[str], float]:
    def parse(text: str) -> float:
        seconds = parse_duration(text)
        if inclusive and seconds < minimum:
            raise ValueError(f"must be at least {minimum:g}")
        if not inclusive and seconds <= minimum:
            raise ValueError(f"must be greater than {minimum:g}")
        return seconds

    return parse


#: A duration that must be > 0 (timeouts: 0 would fire at once).
parse_positive_duration = _bounded_duration(minimum=0, inclusive=False)
parse_positive_duration.__name__ = "parse_positive_duration"
parse_positive_duration.__doc__ = "A duration in seconds that is greater than 0."

#: A duration that may be 0 (linger 0 = stop the engine session at once).
parse_non_negative_duration = _bounded_duration(minimum=0, inclusive=True)
parse_non_negative_duration.__name__ = "parse_non_negative_duration"
parse_non_negative_duration.__doc__ = "A duration in seconds that is 0 or more."

#: Upper bound for the per-client buffer. Each client may hold this much, so a
#: typo (4GB for 4MB) must not let a handful of players exhaust a router.
MAX_BUFFER_SIZE = 1024**3


def parse_buffer_size(text: str) -> int:
    """A size in bytes, greater than 0 and at most 1GiB."""
    size = parse_size(text)
    if size <= 0:
        raise ValueError("must be greater than 0")
    if size > MAX_BUFFER_SIZE:
        raise ValueError(
            "must be at most 1GiB (it is held per client; a guard for small routers)"
        )
    return size


#: largest fast-start cache one session may hold
MAX_FAST_START = 64 * 1024 * 1024


def parse_fast_start(text: str) -> int:
    """``ACEXY_FAST_START``: a size from 0 (off) to 64MiB."""
    size = parse_size(text)
    if size > MAX_FAST_START:
        raise ValueError("must be at most 64MiB (one per live session; 0 turns fast start off)")
    return size


def parse_coalesce_delay(text: str) -> float:
    """``ACEXY_COALESCE_DELAY``: 0 (off) to 1s, the latency a player's bytes may gain."""
    seconds = parse_non_negative_duration(text)
    if seconds > 1.0:
        raise ValueError("must be at most 1s (a player's bytes wait this long at most; 0 turns it off)")
    return seconds


def parse_port(text: str) -> int:
    """A TCP port number, 1..65535."""
    s = text.strip()
    if not s.isascii() or not s.isdigit():
        raise ValueError("not a port number (use an integer from 1 to 65535)")
    port = int(s)
    if not 1 <= port <= 65535:
        raise ValueError("port must be from 1 to 65535")
    return port


def parse_scheme(text: str) -> str:
    """``http`` or ``https``, case-insensitive, returned lower-case."""
    s = text.strip().lower()
    if s not in ("http", "https"):
        raise ValueError("scheme must be http or https")
    return s


_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")


def parse_host(text: str) -> str:
    """
    The engine's host name or IP address.

    A bare or bracketed IPv6 literal is returned bare (``::1``);
    :attr:`Config.engine_url` adds the brackets. A scheme or a port in the
    host is rejected with a pointer to the setting that takes it, since
    ``ACEXY_HOST=http://engine`` is the usual mistake.
    """
    s = text.strip()
    if not s:
        raise ValueError("host must not be empty")
    if "://" in s:
        raise ValueError(
            "host must not include a scheme; put the scheme in ACEXY_SCHEME (--engine-scheme)"
        )
    if any(c.isspace() for c in s):
        raise ValueError("host must not contain spaces")
    bare = s[1:-1] if s.startswith("[") and s.endswith("]") else s
    if ":" in bare:
        try:
            return str(ipaddress.IPv6Address(bare))
        except ValueError:
            raise ValueError(
                "host must not include a port; put the port in ACEXY_PORT (--engine-port)"
            ) from None
    if bare is not s:
        raise ValueError("only IPv6 addresses go in brackets")
    if not _HOSTNAME_RE.fullmatch(s):
        raise ValueError("not a host name or IP address")
    return s


def parse_engine(text: str) -> tuple[str, str, int]:
    """
    One pool engine: ``host:port``, ``[IPv6]:port`` or ``http(s)://host:port``
    (no path). Returns ``(scheme, host, port)``; the scheme is ``""`` when not
    given (``ACEXY_SCHEME`` applies).
    """
    s = text.strip()
    scheme = ""
    if "://" in s:
        scheme, _, s = s.partition("://")
        scheme = parse_scheme(scheme)
    if "/" in s or "?" in s or "#" in s:
        raise ValueError(f"{text.strip()!r}: an engine is host:port, with no path")
    if s.startswith("["):
        host, sep, port = s[1:].partition("]:")
    else:
        host, sep, port = s.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text.strip()!r}: give each engine as host:port (e.g. 192.168.1.20:6878)")
    try:
        return scheme, parse_host(f"[{host}]" if s.startswith("[") else host), parse_port(port)
    except ValueError as e:
        raise ValueError(f"{text.strip()!r}: {e}") from None


def parse_engines(text: str) -> tuple[tuple[str, str, int], ...]:
    """``ACEXY_ENGINES``: comma-separated engines (see :func:`parse_engine`), no duplicates."""
    engines: list[tuple[str, str, int]] = []
    for part in text.split(","):
        if not part.strip():
            continue
        engine = parse_engine(part)
        if any(e[1:] == engine[1:] for e in engines):
            raise ValueError(f"{part.strip()!r} is listed twice")
        engines.append(engine)
    if not engines:
        raise ValueError("no engine given (host:port, comma-separated)")
    return tuple(engines)


_LOG_LEVELS: Mapping[str, str] = MappingProxyType(
    {"debug": "debug", "info": "info", "warn": "warn", "warning": "warn", "error": "error"}
)


def parse_log_level(text: str) -> str:
    """``debug``, ``info``, ``warn`` (or ``warning``) or ``error``, case-insensitive."""
    level = _LOG_LEVELS.get(text.strip().lower())
    if level is None:
        raise ValueError("log level must be one of debug, info, warn, error")
    return level


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def parse_bool(text: str) -> bool:
    """``1/0``, ``true/false``, ``yes/no``, ``on/off``, case-insensitive."""
    s = text.strip().lower()
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise ValueError("not a boolean (use 1/0, true/false, yes/no or on/off)")


#: Endpoint types whose descriptions pass through untouched; Twisted checks
#: them in full when the listener is built against a reactor.
_STRPORTS_PREFIXES = ("tcp:", "tcp6:", "ssl:", "unix:", "systemd:", "le:", "lets:")
_LISTEN_HELP = (
    "use :PORT, PORT, HOST:PORT, IPv4:PORT, [IPv6]:PORT, "
    "or a Twisted endpoint such as tcp:8080:interface=127.0.0.1"
)


def _strports_escape(value: str) -> str:
    """Escape a strports argument (backslash, colon and equals sign are special)."""
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def parse_listen(text: str) -> str:
    """
    A listen address (acexy's Go form, ``:8080``) as a Twisted strports
    server description (``tcp:8080``).

    Forms: ``:PORT`` and ``PORT`` (all interfaces), ``HOST:PORT`` with an IPv4
    address or host name (``tcp:PORT:interface=HOST``), ``[IPv6]:PORT``
    (``tcp6:PORT:interface=<escaped>``). Port 0 means any free port. Text
    starting with a known endpoint type (``tcp:``, ``ssl:``, ``unix:``...) is
    already a description and is returned unchanged.

    The acexy forms listen with a queue of :data:`LISTEN_BACKLOG` pending
    connections instead of Twisted's 50: a room of players zapping at once
    (or all reconnecting after an outage) would otherwise overflow it, and the
    kernel makes each dropped player retry a second later.
    """
    s = text.strip()
    if not s:
        raise ValueError(f"empty listen address ({_LISTEN_HELP})")
    if s.startswith(_STRPORTS_PREFIXES):
        return s
    if s.isascii() and s.isdigit():
        return _tcp("tcp", _listen_port(s))
    host, sep, port_text = s.rpartition(":")
    if not sep:
        raise ValueError(f"not a listen address ({_LISTEN_HELP})")
    port = _listen_port(port_text)
    if host == "":
        return _tcp("tcp", port)
    if host.startswith("[") and host.endswith("]"):
        try:
            address = ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"not an IPv6 address in brackets ({_LISTEN_HELP})") from None
        return _tcp("tcp6", port, _strports_escape(str(address)))
    if ":" in host:
        raise ValueError(f"put an IPv6 address in brackets, e.g. [::1]:8080 ({_LISTEN_HELP})")
    if not _HOSTNAME_RE.fullmatch(host):
        raise ValueError(f"not a host name or IP address ({_LISTEN_HELP})")
    return _tcp("tcp", port, host)


#: pending connections the kernel queues for the listener (acexy forms)
LISTEN_BACKLOG = 1024


def _tcp(kind: str, port: int, interface: Optional[str] = None) -> str:
    where = f":interface={interface}" if interface is not None else ""
    return f"{kind}:{port}{where}:backlog={LISTEN_BACKLOG}"


def _listen_port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) > 65535:
        raise ValueError(f"port must be a number from 0 to 65535 ({_LISTEN_HELP})")
    return int(text)


def parse_orchestrator_url(text: str) -> str:
    """An http(s) base URL without query or fragment; a trailing slash is dropped."""
    from urllib.parse import urlsplit

    text = text.strip()
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL, e.g. http://orchestrator:8000")
    if parts.query or parts.fragment:
        raise ValueError("must not have a query or fragment")
    if parts.username or parts.password:
        raise ValueError("must not carry credentials (put the key in ACEXY_ORCH_APIKEY)")
    try:
        _ = parts.port  # urlsplit only checks the port when asked
    except ValueError:
        raise ValueError("has a bad port") from None
    return text.rstrip("/")


def parse_api_key(text: str) -> str:
    """A bearer token: printable ASCII, no spaces (it goes into a header)."""
    text = text.strip()
    if not text.isascii() or not text.isprintable() or " " in text:
        raise ValueError("must be printable ASCII without spaces")
    return text


def parse_streams_per_engine(text: str) -> int:
    text = text.strip()
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 1000:
        raise ValueError("must be a whole number from 1 to 1000")
    return int(text)


def parse_wait_mode(text: str) -> str:
    mode = text.strip().lower()
    if mode not in ("hold", "reject"):
        raise ValueError("must be hold (keep players waiting with keepalive packets) or reject (503 at once)")
    return mode


def parse_queue_size(text: str) -> int:
    text = text.strip()
    if not (text.isascii() and text.isdigit()) or int(text) > 100000:
        raise ValueError("must be a whole number from 0 to 100000")
    return int(text)


def _whole(text: str, low: int, high: int) -> int:
    text = text.strip()
    if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
        raise ValueError(f"must be a whole number from {low} to {high}")
    return int(text)


def parse_max_sessions(text: str) -> int:
    return _whole(text, 1, 10000)


def parse_max_connections(text: str) -> int:
    return _whole(text, 8, 1_000_000)


def parse_failover_attempts(text: str) -> int:
    text = text.strip()
    if not (text.isascii() and text.isdigit()) or int(text) > 20:
        raise ValueError("must be a whole number from 0 (no failover) to 20")
    return int(text)


def parse_log_format(text: str) -> str:
    fmt = text.strip().lower()
    if fmt not in ("text", "json"):
        raise ValueError("must be text or json")
    return fmt


def parse_token(text: str) -> str:
    """An access token: printable ASCII without spaces, at least 8 characters."""
    token = parse_api_key(text)
    if len(token) < 8:
        raise ValueError("must be at least 8 characters (it guards every route)")
    return token


_PLAYLIST_NAME_RE = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")


def parse_playlists(text: str) -> tuple[tuple[str, str], ...]:
    """
    ``name=source,name=source``: the playlists served at
    ``/ace/playlist/<name>.m3u``. A source is an ``http(s)://`` URL or a file
    path. Names are letters, digits, ``_ - .``; each is given once.
    """
    pairs: list[tuple[str, str]] = []
    if not text.strip():
        return ()
    for item in text.split(","):
        name, sep, source = item.strip().partition("=")
        name, source = name.strip(), source.strip()
        if not sep or not name or not source:
            raise ValueError(f"expected name=source pairs separated by commas, got {item.strip()!r}")
        if not _PLAYLIST_NAME_RE.fullmatch(name):
            raise ValueError(f"playlist name {name!r} may only have letters, digits, _ - and .")
        if any(name == seen for seen, _ in pairs):
            raise ValueError(f"playlist name {name!r} is given twice")
        if "://" in source:
            from urllib.parse import urlsplit

            parts = urlsplit(source)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"playlist {name!r}: a URL source must be http:// or https://")
        pairs.append((name, source))
    return tuple(pairs)


def parse_public_url(text: str) -> str:
    """This proxy's URL as players reach it (``https://tv.example.org``), for
    playlists; no query or fragment, a trailing slash is dropped."""
    from urllib.parse import urlsplit

    text = text.strip()
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL, e.g. https://tv.example.org")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError("must not have a query, fragment or credentials")
    try:
        _ = parts.port
    except ValueError:
        raise ValueError("not a valid port") from None
    return text.rstrip("/")


def optional(parser: Callable[[str], T]) -> Callable[[str], Optional[T]]:
    """
    Wrap ``parser`` so an empty (or blank) text means "not set": ``None``.

    For settings whose absence is meaningful (an orchestrator URL, an API
    key): give them ``default=""`` and ``parser=optional(...)``.
    """

    def parse(text: str) -> Optional[T]:
        if not text.strip():
            return None
        return parser(text)

    parse.__name__ = f"optional({getattr(parser, '__name__', 'parser')})"
    return parse


# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """
    One configurable value: where it comes from and how it is read.

    ``default`` is text, parsed by ``parser`` like any user input. ``secret``
    settings (API keys) never have their value echoed in errors or docs.
    """

    field: str
    env: str
    aliases: tuple[str, ...]
    option: str
    default: str
    parser: Callable[[str], Any]
    help: str
    secret: bool = False

    @property
    def env_names(self) -> tuple[str, ...]:
        """The primary variable, then the aliases, in order of precedence."""
        return (self.env, *self.aliases)

    @property
    def is_flag(self) -> bool:
        """A boolean: a plain switch on the command line (``--m3u8``), any
        :func:`parse_bool` text in the environment."""
        return self.parser is parse_bool


SETTINGS: tuple[Setting, ...] = (
    Setting(
        field="listen",
        env="ACEXY_LISTEN_ADDR",
        aliases=("ACEXY_ADDR",),
        option="listen",
        default=":8080",
        parser=parse_listen,
        help=(
            "Address to serve players on: :PORT, HOST:PORT, [IPv6]:PORT (these queue up to "
            "1024 connecting players) or a Twisted endpoint"
        ),
    ),
    Setting(
        field="engine_host",
        env="ACEXY_HOST",
        aliases=(),
        option="engine-host",
        default="localhost",
        parser=parse_host,
        help="AceStream engine host name or IP address",
    ),
    Setting(
        field="engine_port",
        env="ACEXY_PORT",
        aliases=(),
        option="engine-port",
        default="6878",
        parser=parse_port,
        help="AceStream engine HTTP port",
    ),
    Setting(
        field="engine_scheme",
        env="ACEXY_SCHEME",
        aliases=(),
        option="engine-scheme",
        default="http",
        parser=parse_scheme,
        help="Scheme for the engine: http or https",
    ),
    Setting(
        field="engines",
        env="ACEXY_ENGINES",
        aliases=(),
        option="engines",
        default="",
        parser=optional(parse_engines),
        help=(
            "Engine pool: comma-separated host:port or http(s)://host:port; each is probed every "
            "ACEXY_HEALTH_INTERVAL and new streams go to the healthy one with the fewest "
            "(empty: ACEXY_HOST:ACEXY_PORT alone)"
        ),
    ),
    Setting(
        field="no_response_timeout",
        env="ACEXY_NO_RESPONSE_TIMEOUT",
        aliases=(),
        option="no-response-timeout",
        default="10s",
        parser=parse_positive_duration,
        help="How long to wait for the engine to answer a new stream request (e.g. 10s, 1m30s)",
    ),
    Setting(
        field="empty_timeout",
        env="ACEXY_EMPTY_TIMEOUT",
        aliases=(),
        option="empty-timeout",
        default="60s",
        parser=parse_positive_duration,
        help="A playback that delivers no data for this long is treated as stalled",
    ),
    Setting(
        field="buffer_size",
        env="ACEXY_BUFFER_SIZE",
        aliases=("ACEXY_BUFFER",),
        option="buffer-size",
        default="4MiB",
        parser=parse_buffer_size,
        help="Per-client backlog cap; a client further behind is dropped (e.g. 4MiB, 4MB)",
    ),
    Setting(
        field="linger",
        env="ACEXY_LINGER",
        aliases=(),
        option="linger",
        default="5s",
        parser=parse_non_negative_duration,
        help="Keep an engine session this long after its last client leaves (0 = stop at once)",
    ),
    Setting(
        field="log_level",
        env="ACEXY_LOG_LEVEL",
        aliases=(),
        option="log-level",
        default="info",
        parser=parse_log_level,
        help="Log level: debug, info, warn or error",
    ),
    # -- acestream-orchestrator (empty URL: no orchestrator, the engine above) --
    Setting(
        field="orch_url",
        env="ACEXY_ORCH_URL",
        aliases=(),
        option="orch-url",
        default="",
        parser=optional(parse_orchestrator_url),
        help="acestream-orchestrator base URL (empty: use the engine above only)",
    ),
    Setting(
        field="orch_apikey",
        env="ACEXY_ORCH_APIKEY",
        aliases=(),
        option="orch-apikey",
        default="",
        parser=optional(parse_api_key),
        help="Orchestrator API key, sent as a Bearer token (never logged)",
        secret=True,
    ),
    Setting(
        field="max_streams_per_engine",
        env="ACEXY_MAX_STREAMS_PER_ENGINE",
        aliases=(),
        option="max-streams-per-engine",
        default="1",
        parser=parse_streams_per_engine,
        help=(
            "Streams one engine (orchestrated, or of ACEXY_ENGINES) may carry before another is used "
            "or provisioned; a full pool holds new players"
        ),
    ),
    Setting(
        field="health_interval",
        env="ACEXY_HEALTH_INTERVAL",
        aliases=(),
        option="health-interval",
        default="30s",
        parser=parse_positive_duration,
        help="How often the orchestrator's status is polled",
    ),
    Setting(
        field="outage_poll_interval",
        env="ACEXY_OUTAGE_POLL_INTERVAL",
        aliases=(),
        option="outage-poll-interval",
        default="10s",
        parser=parse_positive_duration,
        help="Status poll interval while provisioning is blocked or the orchestrator is unreachable",
    ),
    Setting(
        field="provision_timeout",
        env="ACEXY_PROVISION_TIMEOUT",
        aliases=(),
        option="provision-timeout",
        default="60s",
        parser=parse_positive_duration,
        help="How long one provisioning request may take",
    ),
    Setting(
        field="engine_ready_timeout",
        env="ACEXY_ENGINE_READY_TIMEOUT",
        aliases=(),
        option="engine-ready-timeout",
        default="30s",
        parser=parse_positive_duration,
        help="How long a newly provisioned engine may take to answer",
    ),
    # -- outages: holding players instead of failing them ------------------------
    Setting(
        field="max_wait",
        env="ACEXY_MAX_WAIT",
        aliases=(),
        option="max-wait",
        default="120s",
        parser=parse_positive_duration,
        help="Longest a player is held (keepalive packets) waiting for an engine",
    ),
    Setting(
        field="keepalive_interval",
        env="ACEXY_KEEPALIVE_INTERVAL",
        aliases=(),
        option="keepalive-interval",
        default="1s",
        parser=parse_positive_duration,
        help="How often a held player gets null TS packets",
    ),
    Setting(
        field="queue_size",
        env="ACEXY_QUEUE_SIZE",
        aliases=(),
        option="queue-size",
        default="32",
        parser=parse_queue_size,
        help="Players held at once (beyond it: 503 with Retry-After)",
    ),
    Setting(
        field="wait_mode",
        env="ACEXY_WAIT_MODE",
        aliases=(),
        option="wait-mode",
        default="hold",
        parser=parse_wait_mode,
        help="hold: keep players waiting through breaker/capacity waits; reject: 503 at once and pre-warm",
    ),
    Setting(
        field="failover_attempts",
        env="ACEXY_FAILOVER_ATTEMPTS",
        aliases=(),
        option="failover-attempts",
        default="3",
        parser=parse_failover_attempts,
        help="New engine sessions tried within one failover incident of a live stream (0: no failover)",
    ),
    Setting(
        field="failover_reset",
        env="ACEXY_FAILOVER_RESET",
        aliases=(),
        option="failover-reset",
        default="30s",
        parser=parse_positive_duration,
        help="Real data flowing this long ends a failover incident and restores its attempts",
    ),
    Setting(
        field="stats_interval",
        env="ACEXY_STATS_INTERVAL",
        aliases=(),
        option="stats-interval",
        default="5s",
        parser=parse_non_negative_duration,
        help="How often a streaming session asks its engine's stat_url for peers and speeds (0: never)",
    ),
    # -- limits: nothing a stranger sends costs more than a request ------------
    Setting(
        field="max_backlog",
        env="ACEXY_MAX_BACKLOG",
        aliases=(),
        option="max-backlog",
        default="64MiB",
        parser=parse_buffer_size,
        help="Bytes queued for all players together; past it the players furthest behind are cut first",
    ),
    Setting(
        field="coalesce_delay",
        env="ACEXY_COALESCE_DELAY",
        aliases=(),
        option="coalesce-delay",
        default="50ms",
        parser=parse_coalesce_delay,
        help=(
            "A player that keeps up gets the pieces arriving within this long of each other in one "
            "send (fewer system calls; the first piece always goes at once; 0 = off)"
        ),
    ),
    Setting(
        field="fast_start",
        env="ACEXY_FAST_START",
        aliases=(),
        option="fast-start",
        default="4MiB",
        parser=parse_fast_start,
        help=(
            "Per live session, the stream kept from its latest keyframe so a joining player gets a "
            "picture at once (counted in ACEXY_MAX_BACKLOG; 0 = off)"
        ),
    ),
    Setting(
        field="max_sessions",
        env="ACEXY_MAX_SESSIONS",
        aliases=(),
        option="max-sessions",
        default="32",
        parser=parse_max_sessions,
        help="Engine sessions (TS and HLS) open at once; a new content past it gets 503 with Retry-After",
    ),
    Setting(
        field="header_timeout",
        env="ACEXY_HEADER_TIMEOUT",
        aliases=(),
        option="header-timeout",
        default="10s",
        parser=parse_positive_duration,
        help="A connection that has not sent complete request headers within this is closed",
    ),
    Setting(
        field="max_connections",
        env="ACEXY_MAX_CONNECTIONS",
        aliases=(),
        option="max-connections",
        default="1024",
        parser=parse_max_connections,
        help="Player connections open at once; beyond it new ones get 503 and are closed",
    ),
    # -- operations -------------------------------------------------------------
    Setting(
        field="token",
        env="ACEXY_TOKEN",
        aliases=(),
        option="token",
        default="",
        parser=optional(parse_token),
        help="Access token required on every route but /healthz (?token= or Authorization: Bearer)",
        secret=True,
    ),
    Setting(
        field="m3u8",
        env="ACEXY_M3U8",
        aliases=(),
        option="m3u8",
        default="false",
        parser=parse_bool,
        help="Serve /ace/getstream as HLS (acexy's meaning)",
    ),
    Setting(
        field="m3u8_stream_timeout",
        env="ACEXY_M3U8_STREAM_TIMEOUT",
        aliases=(),
        option="m3u8-stream-timeout",
        default="60s",
        parser=parse_non_negative_duration,
        help=(
            "An HLS session is stopped this long after its players' last playlist or segment "
            "request (acexy's meaning; never sooner than three target durations)"
        ),
    ),
    Setting(
        field="log_format",
        env="ACEXY_LOG_FORMAT",
        aliases=(),
        option="log-format",
        default="text",
        parser=parse_log_format,
        help="Log format: text or json (with twistd --logger acexy_tw.logs.observer)",
    ),
    Setting(
        field="access_log",
        env="ACEXY_ACCESS_LOG",
        aliases=(),
        option="access-log",
        default="false",
        parser=parse_bool,
        help="Log every HTTP request (off by default: flash wear on routers)",
    ),
    # -- playlists --------------------------------------------------------------
    Setting(
        field="playlists",
        env="ACEXY_PLAYLISTS",
        aliases=(),
        option="playlists",
        default="",
        parser=parse_playlists,
        help="M3U sources served rewritten at /ace/playlist/<name>.m3u: name=URL-or-path pairs, comma-separated",
    ),
    Setting(
        field="public_url",
        env="ACEXY_PUBLIC_URL",
        aliases=(),
        option="public-url",
        default="",
        parser=optional(parse_public_url),
        help="This proxy's URL in rewritten playlists (empty: the request's Host)",
    ),
    Setting(
        field="playlist_refresh",
        env="ACEXY_PLAYLIST_REFRESH",
        aliases=(),
        option="playlist-refresh",
        default="10m",
        parser=parse_positive_duration,
        help="How long a fetched playlist source is used before it is revalidated",
    ),
)


@dataclass(frozen=True)
class Config:
    """The proxy's settings, validated and typed. Build it with :func:`load_config`."""

    listen: str  # strports server description
    engine_host: str
    engine_port: int
    engine_scheme: str  # "http" | "https"
    no_response_timeout: float  # seconds, > 0
    empty_timeout: float  # seconds, > 0
    buffer_size: int  # bytes, 0 < n <= 1GiB
    linger: float  # seconds, >= 0
    log_level: str  # "debug" | "info" | "warn" | "error"
    engines: Optional[tuple[tuple[str, str, int], ...]] = None  # ACEXY_ENGINES (scheme or "", host, port)
    orch_url: Optional[str] = None  # None: no orchestrator
    orch_apikey: Optional[str] = field(default=None, repr=False)  # secret: never in repr/logs
    max_streams_per_engine: int = 1
    health_interval: float = 30.0
    outage_poll_interval: float = 10.0
    provision_timeout: float = 60.0
    engine_ready_timeout: float = 30.0
    max_wait: float = 120.0
    keepalive_interval: float = 1.0
    queue_size: int = 32
    wait_mode: str = "hold"
    failover_attempts: int = 3
    failover_reset: float = 30.0
    stats_interval: float = 5.0
    max_backlog: int = 64 * 1024 * 1024
    fast_start: int = 4 * 1024 * 1024  # bytes per live session, 0: off
    coalesce_delay: float = 0.05  # seconds, 0: off
    max_sessions: int = 32
    header_timeout: float = 10.0
    max_connections: int = 1024
    token: Optional[str] = field(default=None, repr=False)  # secret: never in repr/logs
    m3u8: bool = False
    m3u8_stream_timeout: float = 60.0  # seconds, >= 0: HLS session idle close
    log_format: str = "text"
    access_log: bool = False
    playlists: tuple[tuple[str, str], ...] = ()  # (name, URL or path)
    public_url: Optional[str] = None
    playlist_refresh: float = 600.0
    demo: bool = False  # set by --demo, not from the environment

    @property
    def engine_url(self) -> str:
        """Base URL of the engine, e.g. ``http://localhost:6878``."""
        host = f"[{self.engine_host}]" if ":" in self.engine_host else self.engine_host
        return f"{self.engine_scheme}://{host}:{self.engine_port}"


def _option_help(setting: Setting) -> str:
    names = ", ".join(setting.env_names)
    default = "<hidden>" if setting.secret else (setting.default or "unset")
    return f"{setting.help} [env {names}; default: {default}]"


def option_parameters() -> list[list[Any]]:
    """
    ``optParameters`` rows for ``twisted.python.usage.Options``: every
    setting that takes a value (the booleans are :func:`option_flags`).

    Every default is ``None`` so :func:`load_config` can tell "not given on
    the command line" from any given value; the real default is in the help.
    """
    return [[s.option, None, None, _option_help(s)] for s in SETTINGS if not s.is_flag]


def option_flags() -> list[list[Any]]:
    """
    ``optFlags`` rows for ``twisted.python.usage.Options``: the boolean
    settings, as switches (``twistd acexy --m3u8``).

    A switch can only say "true": given, it beats the environment; not given
    (``usage.Options`` stores 0), the environment and then the default apply,
    so ``ACEXY_M3U8=true`` with no switch is still true.
    """
    return [[s.option, None, _option_help(s)] for s in SETTINGS if s.is_flag]


def settings_markdown() -> str:
    """The settings as a Markdown table, for the README/docs."""
    rows = [
        "| Environment variable | Option | Default | Meaning |",
        "|---|---|---|---|",
    ]
    for s in SETTINGS:
        env = " ".join(f"`{name}`" for name in s.env_names)
        default = "(hidden)" if s.secret else (f"`{s.default}`" if s.default else "(unset)")
        rows.append(f"| {env} | `--{s.option}` | {default} | {s.help} |")
    return "\n".join(rows) + "\n"


_NO_OPTIONS: Mapping[str, Optional[str]] = MappingProxyType({})


def load_config(
    env: Mapping[str, str],
    options: Mapping[str, Optional[str]] = _NO_OPTIONS,
    *,
    demo: bool = False,
) -> Config:
    """
    Read every setting and build a :class:`Config`.

    For each setting the first of these wins: the command-line option (keyed
    by option name, as ``usage.Options`` stores it; ``None`` means not given,
    and so does a boolean switch's ``0``),
    the primary environment variable, each alias in order, the default. An
    environment variable set to the empty string counts as unset, as acexy and
    docker-compose users expect (``ACEXY_PORT=`` in a compose file).

    Keys of ``options`` that are not settings (``demo``, twistd's own) are
    ignored. Raises :class:`ConfigError` for the first bad value.
    """
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        text, variable, option = _pick(setting, env, options)
        try:
            values[setting.field] = setting.parser(text)
        except ValueError as e:
            reason = e.reason if isinstance(e, ConfigError) else str(e)
            if variable is None:  # the built-in default itself is bad: a bug here
                variable, reason = setting.env, f"bad built-in default: {reason}"
            raise ConfigError(variable, text, reason, option, secret=setting.secret) from e
    return Config(**values, demo=demo)


def _pick(
    setting: Setting, env: Mapping[str, str], options: Mapping[str, Optional[str]]
) -> tuple[str, Optional[str], Optional[str]]:
    """(text, variable it came from or None for the default, option or None)."""
    given: Any = options.get(setting.option)
    if setting.is_flag and isinstance(given, (bool, int)):  # a usage.Options switch: 0 or 1
        given = "true" if given else None
    if given is not None:
        return given, setting.env, setting.option
    for name in setting.env_names:
        value = env.get(name)
        if value:  # unset or "" -> keep looking
            return value, name, None
    return setting.default, None, None


def unknown_env_warnings(env: Mapping[str, str]) -> list[str]:
    """
    One warning for each ``ACEXY_*`` variable in ``env`` that is no setting's
    name or alias, naming the closest known name when one is close, e.g.
    ``unknown ACEXY_BUFER_SIZE (did you mean ACEXY_BUFFER_SIZE?)``.

    acexy silently ignored a misspelt variable, so a typo in a compose file
    went unnoticed until the default misbehaved. Here it is a warning, never
    an error (a variable meant for another tool must not stop start-up).
    Values are never read into the message: a misspelt API key is still a
    secret. Sorted by name, so start-up logs are stable.
    """
    known = [name for s in SETTINGS for name in s.env_names]
    # Compared without the common prefix, which would make every name look close to some setting.
    by_suffix = {name[len(_ENV_PREFIX):]: name for name in known}
    warnings = []
    for name in sorted(env):
        if not name.upper().startswith(_ENV_PREFIX) or name in known:
            continue
        close = difflib.get_close_matches(name[len(_ENV_PREFIX):].upper(), by_suffix, n=1)
        if close:
            warnings.append(f"unknown {name} (did you mean {by_suffix[close[0]]}?)")
        else:
            warnings.append(f"unknown {name} (not an acexy-tw setting; twistd acexy --help lists them)")
    return warnings


_ENV_PREFIX = "ACEXY_"
