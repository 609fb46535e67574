"""Tests for acexy_tw.config: parsers, the settings table, precedence, errors."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from acexy_tw import config
from acexy_tw.config import (
    SETTINGS,
    Config,
    ConfigError,
    Setting,
    load_config,
    option_flags,
    option_parameters,
    optional,
    parse_bool,
    parse_buffer_size,
    parse_duration,
    parse_engines,
    parse_host,
    parse_listen,
    parse_log_level,
    parse_non_negative_duration,
    parse_port,
    parse_positive_duration,
    unknown_env_warnings,
    parse_scheme,
    parse_size,
    settings_markdown,
)

MiB = 1024 * 1024

# ---------------------------------------------------------------------------
# Durations
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("500ms", 0.5),
        ("10s", 10.0),
        ("1m30s", 90.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("2m", 120.0),
        ("1h2m3s", 3723.0),
        ("1s500ms", 1.5),
        ("250us", 0.00025),
        ("250\u00b5s", 0.00025),  # MICRO SIGN
        ("250\u03bcs", 0.00025),  # GREEK SMALL LETTER MU
        ("1500000ns", 0.0015),
        ("7", 7.0),
        ("7.25", 7.25),
        ("0", 0.0),
        ("0s", 0.0),
        (".5s", 0.5),
        ("1.s", 1.0),
        ("1.1s", 1.1),
        ("+3s", 3.0),
        ("  10s  ", 10.0),
        ("\t2m\n", 120.0),
    ],
)
def test_parse_duration_good(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "-1s",
        "-5",
        "1m30",  # unit missing on the last part
        "30 s",  # no space inside
        "1m 30s",
        "10x",
        "10sec",
        "10S",  # Go units are case-sensitive
        "1d",
        "s",
        "ms",
        "abc",
        "nan",
        "NaN",
        "inf",
        "-inf",
        "infinity",
        "1e3",
        "1e3s",
        "1,5s",
        "..5s",
        "1..5s",
        "+",
        "0x10",
        "10s!",
        "\u0665s",  # ARABIC-INDIC DIGIT FIVE: a Unicode digit, not an ASCII one
    ],
)
def test_parse_duration_bad(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_parse_duration_negative_reason() -> None:
    with pytest.raises(ValueError, match="negative"):
        parse_duration("-1s")


def test_parse_duration_overflow_is_rejected() -> None:
    with pytest.raises(ValueError, match="too large"):
        parse_duration("9" * 400 + "h")


def test_positive_duration_bound() -> None:
    assert parse_positive_duration("1ns") == 1e-9
    for text in ("0", "0s", "0ms"):
        with pytest.raises(ValueError, match="must be greater than 0"):
            parse_positive_duration(text)


def test_non_negative_duration_bound() -> None:
    assert parse_non_negative_duration("0") == 0.0
    assert parse_non_negative_duration("5s") == 5.0
    with pytest.raises(ValueError, match="negative"):
        parse_non_negative_duration("-1s")


# ---------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, size",
    [
        ("4MiB", 4 * MiB),
        ("4mib", 4 * MiB),
        ("4MIB", 4 * MiB),
        ("4 MiB", 4 * MiB),
        ("4Mi", 4 * MiB),
        ("512KiB", 512 * 1024),
        ("512kib", 512 * 1024),
        ("512Ki", 512 * 1024),
        ("512 ki", 512 * 1024),
        ("1GiB", 1024**3),
        ("1gi", 1024**3),
        ("4MB", 4_000_000),
        ("4mb", 4_000_000),
        ("4KB", 4000),
        ("4K", 4000),
        ("4k", 4000),
        ("4M", 4_000_000),
        ("4G", 4_000_000_000),
        ("4GB", 4_000_000_000),
        ("1TiB", 1024**4),
        ("1Ti", 1024**4),
        ("1T", 1000**4),
        ("2TB", 2 * 1000**4),
        ("100B", 100),
        ("100b", 100),
        ("100 B", 100),
        ("100", 100),
        ("0", 0),
        ("1.5MiB", int(1.5 * 1048576)),
        ("4.2MiB", int(4.2 * 1048576)),  # acexy's README default
        ("0.5KB", 500),
        ("1.0001KB", 1000),  # fractions of a byte are truncated
        ("  4MiB  ", 4 * MiB),
    ],
)
def test_parse_size_good(text: str, size: int) -> None:
    result = parse_size(text)
    assert result == size
    assert type(result) is int


@pytest.mark.parametrize(
    "text",
    [
        "",
        "  ",
        "4 potatoes",
        "MiB",
        "-4MiB",
        "-1",
        "4XB",
        "4MiBs",
        "4 M i B",
        "4MiB4",
        "1,000",
        "1e6",
        "nan",
        "inf",
        "0x10",
        "4MiB extra",
        "\u0665MiB",
    ],
)
def test_parse_size_bad(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_parse_size_reason_shows_accepted_forms() -> None:
    with pytest.raises(ValueError) as info:
        parse_size("4 potatoes")
    assert str(info.value) == "not a size (use e.g. 4MiB, 512KiB, 4MB or a number of bytes)"


def test_buffer_size_bounds() -> None:
    assert parse_buffer_size("1") == 1
    assert parse_buffer_size("1GiB") == 1024**3
    with pytest.raises(ValueError, match="greater than 0"):
        parse_buffer_size("0")
    with pytest.raises(ValueError, match="greater than 0"):
        parse_buffer_size("0.5")  # truncates to 0 bytes
    with pytest.raises(ValueError, match="at most 1GiB.*router"):
        parse_buffer_size(str(1024**3 + 1))
    with pytest.raises(ValueError, match="at most 1GiB"):
        parse_buffer_size("4GB")


# ---------------------------------------------------------------------------
# Port, scheme, host, log level, bool
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("text, port", [("1", 1), ("6878", 6878), ("65535", 65535), (" 80 ", 80)])
def test_parse_port_good(text: str, port: int) -> None:
    assert parse_port(text) == port


@pytest.mark.parametrize(
    "text",
    ["", "0", "65536", "-1", "+80", "80.0", "1_000", "eighty", "0x50", "٨٠", "99999999999"],
)
def test_parse_port_bad(text: str) -> None:
    with pytest.raises(ValueError):
        parse_port(text)


@pytest.mark.parametrize(
    "text, scheme", [("http", "http"), ("https", "https"), ("HTTP", "http"), (" HttpS ", "https")]
)
def test_parse_scheme_good(text: str, scheme: str) -> None:
    assert parse_scheme(text) == scheme


@pytest.mark.parametrize("text", ["", "ftp", "http://", "https:", "ws"])
def test_parse_scheme_bad(text: str) -> None:
    with pytest.raises(ValueError, match="http or https"):
        parse_scheme(text)


@pytest.mark.parametrize(
    "text, host",
    [
        ("localhost", "localhost"),
        ("acestream", "acestream"),
        ("acestream_engine", "acestream_engine"),  # docker service names
        ("engine-1.lan", "engine-1.lan"),
        ("192.168.1.10", "192.168.1.10"),
        ("::1", "::1"),
        ("[::1]", "::1"),
        ("[2001:DB8::1]", "2001:db8::1"),
        ("  localhost ", "localhost"),
    ],
)
def test_parse_host_good(text: str, host: str) -> None:
    assert parse_host(text) == host


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("http://engine", "ACEXY_SCHEME"),
        ("https://engine:6878", "ACEXY_SCHEME"),
        ("my engine", "spaces"),
        ("engine:6878", "ACEXY_PORT"),
        ("[engine]", "brackets"),
        ("engine/ace", "not a host"),
        ("engine?x", "not a host"),
        ("-engine", "not a host"),
        ("user@engine", "not a host"),
    ],
)
def test_parse_host_bad(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_host(text)


@pytest.mark.parametrize(
    "text, engines",
    [
        ("box1:6878", (("", "box1", 6878),)),
        ("192.168.1.20:6878, 192.168.1.21:6879", (("", "192.168.1.20", 6878), ("", "192.168.1.21", 6879))),
        ("https://engine.lan:443,http://10.0.0.2:6878", (("https", "engine.lan", 443), ("http", "10.0.0.2", 6878))),
        ("[::1]:6878", (("", "::1", 6878),)),
        ("a:1,,b:2,", (("", "a", 1), ("", "b", 2))),
    ],
)
def test_parse_engines_good(text: str, engines: tuple) -> None:
    assert parse_engines(text) == engines


@pytest.mark.parametrize(
    "text, reason",
    [
        ("box1", "host:port"),
        ("box1:", "port"),
        (":6878", "host:port"),
        ("box1:99999", "port"),
        ("ftp://box1:6878", "scheme"),
        ("http://box1:6878/ace", "no path"),
        ("a:1,b:2,a:1", "listed twice"),
        ("http://a:1,https://a:1", "listed twice"),
        (" , ", "no engine"),
        ("bad host:1", "spaces"),
    ],
)
def test_parse_engines_bad(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_engines(text)


def test_bad_engines_variable_is_named() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config({"ACEXY_ENGINES": "box1:6878,box2"})
    assert caught.value.variable == "ACEXY_ENGINES"
    assert "box2" in str(caught.value)


@pytest.mark.parametrize(
    "text, level",
    [
        ("debug", "debug"),
        ("DEBUG", "debug"),
        ("info", "info"),
        ("Info", "info"),
        ("warn", "warn"),
        ("warning", "warn"),
        ("WARNING", "warn"),
        ("error", "error"),
        (" ERROR ", "error"),
    ],
)
def test_parse_log_level_good(text: str, level: str) -> None:
    assert parse_log_level(text) == level


@pytest.mark.parametrize("text", ["", "trace", "critical", "fatal", "2", "inf o"])
def test_parse_log_level_bad(text: str) -> None:
    with pytest.raises(ValueError, match="debug, info, warn, error"):
        parse_log_level(text)


@pytest.mark.parametrize(
    "text, value",
    [
        ("1", True),
        ("true", True),
        ("TRUE", True),
        ("True", True),
        ("yes", True),
        ("YES", True),
        ("on", True),
        ("On", True),
        (" true ", True),
        ("0", False),
        ("false", False),
        ("FALSE", False),
        ("no", False),
        ("No", False),
        ("off", False),
        ("OFF", False),
    ],
)
def test_parse_bool_good(text: str, value: bool) -> None:
    assert parse_bool(text) is value


@pytest.mark.parametrize("text", ["", "2", "y", "n", "t", "f", "enabled", "truthy", "-1"])
def test_parse_bool_bad(text: str) -> None:
    with pytest.raises(ValueError, match="boolean"):
        parse_bool(text)


# ---------------------------------------------------------------------------
# Listen addresses
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, description",
    [
        (":8080", "tcp:8080:backlog=1024"),
        (":0", "tcp:0:backlog=1024"),
        ("8080", "tcp:8080:backlog=1024"),
        ("0", "tcp:0:backlog=1024"),
        ("0.0.0.0:8080", "tcp:8080:interface=0.0.0.0:backlog=1024"),
        ("127.0.0.1:8080", "tcp:8080:interface=127.0.0.1:backlog=1024"),
        ("127.0.0.1:0", "tcp:0:interface=127.0.0.1:backlog=1024"),
        ("localhost:8080", "tcp:8080:interface=localhost:backlog=1024"),
        ("[::1]:8080", "tcp6:8080:interface=\\:\\:1:backlog=1024"),
        ("[::]:0", "tcp6:0:interface=\\:\\::backlog=1024"),
        ("[2001:DB8::1]:80", "tcp6:80:interface=2001\\:db8\\:\\:1:backlog=1024"),
        ("  :8080 ", "tcp:8080:backlog=1024"),
        # strports descriptions pass through unchanged
        ("tcp:8080", "tcp:8080"),
        ("tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1"),
        ("tcp6:8080:interface=\\:\\:1", "tcp6:8080:interface=\\:\\:1"),
        ("ssl:8443:privateKey=k.pem", "ssl:8443:privateKey=k.pem"),
        ("unix:/run/acexy.sock", "unix:/run/acexy.sock"),
        ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
        ("le:/srv/certs:tcp:443", "le:/srv/certs:tcp:443"),
        ("lets:/srv/certs:tcp:443", "lets:/srv/certs:tcp:443"),
    ],
)
def test_parse_listen_good(text: str, description: str) -> None:
    assert parse_listen(text) == description


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        ":",
        ":65536",
        "65536",
        ":-1",
        ":http",
        "localhost",
        "localhost:",
        "::1:8080",  # IPv6 without brackets is ambiguous
        "[::1]",
        "[not-ipv6]:8080",
        "[127.0.0.1]:8080",
        "my host:8080",
        "host/x:8080",
        "http://0.0.0.0:8080",
        "tcp6",
        "-host:8080",
        "8080.5",
    ],
)
def test_parse_listen_bad(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_listen(text)
    assert ":PORT" in str(info.value)  # the reason shows the accepted forms


@pytest.mark.parametrize("text", [":8080", "8080", "127.0.0.1:8080", "[::1]:8080"])
def test_acexy_listen_forms_queue_a_burst_of_players(text: str) -> None:
    """The listener built from an acexy address asks the kernel for a 1024-deep
    accept queue (Twisted's own default is 50); an explicit description is the
    user's own choice and keeps Twisted's default."""
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.protocol import Factory
    from twisted.internet.testing import MemoryReactor

    reactor = MemoryReactor()
    serverFromString(reactor, parse_listen(text)).listen(Factory())
    assert [backlog for _port, _factory, backlog, _interface in reactor.tcpServers] == [1024]
    reactor = MemoryReactor()
    serverFromString(reactor, parse_listen("tcp:8080")).listen(Factory())
    assert [backlog for _port, _factory, backlog, _interface in reactor.tcpServers] == [50]


def test_parse_listen_output_is_a_valid_strports_description() -> None:
    """What parse_listen builds, Twisted's own parser reads back (no reactor needed)."""
    from twisted.internet.endpoints import _parseServer

    _, args, kwargs = _parseServer(parse_listen("[::1]:8080"), None)
    assert args == ["8080"]
    assert kwargs == {"interface": "::1", "backlog": "1024"}
    _, (port, _factory), kwargs = _parseServer(parse_listen("127.0.0.1:0"), None)
    assert port == 0
    assert kwargs["interface"] == "127.0.0.1"


def test_optional_wrapper() -> None:
    parse = optional(parse_port)
    assert parse("") is None
    assert parse("  ") is None
    assert parse("80") == 80
    with pytest.raises(ValueError):
        parse("x")


# ---------------------------------------------------------------------------
# The table, defaults, options
# ---------------------------------------------------------------------------

EXPECTED_TABLE = [
    ("listen", "ACEXY_LISTEN_ADDR", ("ACEXY_ADDR",), "listen", ":8080"),
    ("engine_host", "ACEXY_HOST", (), "engine-host", "localhost"),
    ("engine_port", "ACEXY_PORT", (), "engine-port", "6878"),
    ("engine_scheme", "ACEXY_SCHEME", (), "engine-scheme", "http"),
    ("engines", "ACEXY_ENGINES", (), "engines", ""),
    ("no_response_timeout", "ACEXY_NO_RESPONSE_TIMEOUT", (), "no-response-timeout", "10s"),
    ("empty_timeout", "ACEXY_EMPTY_TIMEOUT", (), "empty-timeout", "60s"),
    ("buffer_size", "ACEXY_BUFFER_SIZE", ("ACEXY_BUFFER",), "buffer-size", "4MiB"),
    ("linger", "ACEXY_LINGER", (), "linger", "5s"),
    ("log_level", "ACEXY_LOG_LEVEL", (), "log-level", "info"),
    ("orch_url", "ACEXY_ORCH_URL", (), "orch-url", ""),
    ("orch_apikey", "ACEXY_ORCH_APIKEY", (), "orch-apikey", ""),
    ("max_streams_per_engine", "ACEXY_MAX_STREAMS_PER_ENGINE", (), "max-streams-per-engine", "1"),
    ("health_interval", "ACEXY_HEALTH_INTERVAL", (), "health-interval", "30s"),
    ("outage_poll_interval", "ACEXY_OUTAGE_POLL_INTERVAL", (), "outage-poll-interval", "10s"),
    ("provision_timeout", "ACEXY_PROVISION_TIMEOUT", (), "provision-timeout", "60s"),
    ("engine_ready_timeout", "ACEXY_ENGINE_READY_TIMEOUT", (), "engine-ready-timeout", "30s"),
    ("max_wait", "ACEXY_MAX_WAIT", (), "max-wait", "120s"),
    ("keepalive_interval", "ACEXY_KEEPALIVE_INTERVAL", (), "keepalive-interval", "1s"),
    ("queue_size", "ACEXY_QUEUE_SIZE", (), "queue-size", "32"),
    ("wait_mode", "ACEXY_WAIT_MODE", (), "wait-mode", "hold"),
    ("failover_attempts", "ACEXY_FAILOVER_ATTEMPTS", (), "failover-attempts", "3"),
    ("failover_reset", "ACEXY_FAILOVER_RESET", (), "failover-reset", "30s"),
    ("stats_interval", "ACEXY_STATS_INTERVAL", (), "stats-interval", "5s"),
    ("max_backlog", "ACEXY_MAX_BACKLOG", (), "max-backlog", "64MiB"),
    ("coalesce_delay", "ACEXY_COALESCE_DELAY", (), "coalesce-delay", "50ms"),
    ("fast_start", "ACEXY_FAST_START", (), "fast-start", "4MiB"),
    ("max_sessions", "ACEXY_MAX_SESSIONS", (), "max-sessions", "32"),
    ("header_timeout", "ACEXY_HEADER_TIMEOUT", (), "header-timeout", "10s"),
    ("max_connections", "ACEXY_MAX_CONNECTIONS", (), "max-connections", "1024"),
    ("token", "ACEXY_TOKEN", (), "token", ""),
    ("m3u8", "ACEXY_M3U8", (), "m3u8", "false"),
    ("m3u8_stream_timeout", "ACEXY_M3U8_STREAM_TIMEOUT", (), "m3u8-stream-timeout", "60s"),
    ("log_format", "ACEXY_LOG_FORMAT", (), "log-format", "text"),
    ("access_log", "ACEXY_ACCESS_LOG", (), "access-log", "false"),
    ("playlists", "ACEXY_PLAYLISTS", (), "playlists", ""),
    ("public_url", "ACEXY_PUBLIC_URL", (), "public-url", ""),
    ("playlist_refresh", "ACEXY_PLAYLIST_REFRESH", (), "playlist-refresh", "10m"),
]


def test_settings_table_matches_the_documented_table() -> None:
    assert [(s.field, s.env, s.aliases, s.option, s.default) for s in SETTINGS] == EXPECTED_TABLE


def test_every_config_field_but_demo_has_exactly_one_setting() -> None:
    fields = [f.name for f in dataclasses.fields(Config)]
    assert sorted(s.field for s in SETTINGS) == sorted(f for f in fields if f != "demo")


def test_setting_names_are_unique() -> None:
    envs = [name for s in SETTINGS for name in s.env_names]
    assert len(envs) == len(set(envs))
    options = [s.option for s in SETTINGS]
    assert len(options) == len(set(options))


def test_every_default_parses() -> None:
    for s in SETTINGS:
        s.parser(s.default)  # raises if a default is invalid


def test_defaults_produce_the_documented_config() -> None:
    assert load_config({}) == Config(
        listen="tcp:8080:backlog=1024",
        engine_host="localhost",
        engine_port=6878,
        engine_scheme="http",
        no_response_timeout=10.0,
        empty_timeout=60.0,
        buffer_size=4 * MiB,
        linger=5.0,
        log_level="info",
        demo=False,
    )


def test_demo_flag() -> None:
    assert load_config({}, demo=True).demo is True
    assert load_config({}).demo is False


def test_config_is_frozen() -> None:
    cfg = load_config({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.buffer_size = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        SETTINGS[0].default = "x"  # type: ignore[misc]


def test_config_is_hashable_and_comparable() -> None:
    assert hash(load_config({})) == hash(load_config({}))
    assert load_config({}) != load_config({"ACEXY_PORT": "1"})


@pytest.mark.parametrize(
    "host, scheme, port, url",
    [
        ("localhost", "http", "6878", "http://localhost:6878"),
        ("engine.lan", "HTTPS", "443", "https://engine.lan:443"),
        ("::1", "http", "6878", "http://[::1]:6878"),
        ("[fe80::1]", "http", "80", "http://[fe80::1]:80"),
    ],
)
def test_engine_url(host: str, scheme: str, port: str, url: str) -> None:
    env = {"ACEXY_HOST": host, "ACEXY_SCHEME": scheme, "ACEXY_PORT": port}
    assert load_config(env).engine_url == url


BOOLEANS = ["m3u8", "access-log"]


def test_the_boolean_settings_are_the_parse_bool_ones() -> None:
    assert [s.option for s in SETTINGS if s.is_flag] == BOOLEANS
    assert all(s.parser is parse_bool for s in SETTINGS if s.is_flag)


def test_option_parameters_and_flags_cover_every_setting() -> None:
    params, flags = option_parameters(), option_flags()
    assert [p[0] for p in params] == [s.option for s in SETTINGS if s.option not in BOOLEANS]
    assert [f[0] for f in flags] == BOOLEANS
    by_option = {s.option: s for s in SETTINGS}
    for row in params:  # optParameters: [long, short, default, help]
        assert len(row) == 4
        long_name, short, default, help_text = row
        assert short is None
        assert default is None
        setting = by_option[long_name]
        assert setting.env in help_text
        for alias in setting.aliases:
            assert alias in help_text
        assert f"default: {setting.default}" in help_text
    for row in flags:  # optFlags: [long, short, help]
        assert len(row) == 3
        long_name, short, help_text = row
        assert short is None
        assert f"env {by_option[long_name].env}" in help_text
        assert "default: false" in help_text


def _options_class():
    from twisted.python import usage

    class Options(usage.Options):
        optParameters = option_parameters()
        optFlags = option_flags()

    return Options


def test_option_parameters_work_with_usage_options() -> None:
    Options = _options_class()
    opts = Options()
    opts.parseOptions([])
    assert all(opts[s.option] is None for s in SETTINGS if not s.is_flag)
    assert all(opts[s.option] == 0 for s in SETTINGS if s.is_flag)  # usage.Options' "not given"

    opts = Options()
    opts.parseOptions(["--buffer-size", "8MiB", "--linger=0"])
    cfg = load_config({"ACEXY_BUFFER_SIZE": "1MiB"}, opts)
    assert cfg.buffer_size == 8 * MiB
    assert cfg.linger == 0.0
    assert "ACEXY_BUFFER_SIZE" in opts.getUsage()


def test_a_boolean_option_is_a_plain_switch() -> None:
    from twisted.python import usage

    Options = _options_class()
    opts = Options()
    opts.parseOptions(["--m3u8", "--access-log"])
    cfg = load_config({}, opts)
    assert (cfg.m3u8, cfg.access_log) == (True, True)
    with pytest.raises(usage.UsageError):  # a switch takes no value
        Options().parseOptions(["--m3u8=true"])


@pytest.mark.parametrize(
    "argv, env, expected",
    [
        ([], {}, False),
        ([], {"ACEXY_M3U8": "true"}, True),  # no switch: the environment still applies
        ([], {"ACEXY_M3U8": "1"}, True),
        ([], {"ACEXY_M3U8": "on"}, True),
        ([], {"ACEXY_M3U8": "false"}, False),
        ([], {"ACEXY_M3U8": "0"}, False),
        ([], {"ACEXY_M3U8": "off"}, False),
        (["--m3u8"], {}, True),
        (["--m3u8"], {"ACEXY_M3U8": "false"}, True),  # the switch beats the environment
        (["--m3u8"], {"ACEXY_M3U8": "no"}, True),
        (["--m3u8"], {"ACEXY_M3U8": "true"}, True),
    ],
)
def test_switch_env_and_default_precedence(argv: list[str], env: dict[str, str], expected: bool) -> None:
    opts = _options_class()()
    opts.parseOptions(argv)
    assert load_config(env, opts).m3u8 is expected


def test_switch_not_given_lets_a_bad_env_value_fail() -> None:
    opts = _options_class()()
    opts.parseOptions([])
    with pytest.raises(ConfigError) as info:
        load_config({"ACEXY_M3U8": "maybe"}, opts)
    assert info.value.variable == "ACEXY_M3U8"
    opts.parseOptions(["--m3u8"])  # given: the environment is not read
    assert load_config({"ACEXY_M3U8": "maybe"}, opts).m3u8 is True


def test_boolean_options_as_text_still_work() -> None:
    """Callers that pass a plain mapping of text (the integration harness) keep working."""
    assert load_config({"ACEXY_M3U8": "true"}, {"m3u8": "false"}).m3u8 is False
    assert load_config({}, {"m3u8": "yes"}).m3u8 is True
    assert load_config({"ACEXY_M3U8": "true"}, {"m3u8": False}).m3u8 is True  # False: not given
    assert load_config({}, {"m3u8": True}).m3u8 is True


def test_settings_markdown_lists_every_setting() -> None:
    text = settings_markdown()
    for s in SETTINGS:
        assert f"`--{s.option}`" in text
        for name in s.env_names:
            assert f"`{name}`" in text
    assert len(text.strip().splitlines()) == len(SETTINGS) + 2


# ---------------------------------------------------------------------------
# Precedence
# ---------------------------------------------------------------------------


def test_env_overrides_default() -> None:
    env = {
        "ACEXY_LISTEN_ADDR": "127.0.0.1:0",
        "ACEXY_HOST": "engine",
        "ACEXY_PORT": "7000",
        "ACEXY_SCHEME": "HTTPS",
        "ACEXY_NO_RESPONSE_TIMEOUT": "1m30s",
        "ACEXY_EMPTY_TIMEOUT": "500ms",
        "ACEXY_BUFFER_SIZE": "512KiB",
        "ACEXY_LINGER": "0",
        "ACEXY_LOG_LEVEL": "WARNING",
    }
    assert load_config(env) == Config(
        listen="tcp:0:interface=127.0.0.1:backlog=1024",
        engine_host="engine",
        engine_port=7000,
        engine_scheme="https",
        no_response_timeout=90.0,
        empty_timeout=0.5,
        buffer_size=512 * 1024,
        linger=0.0,
        log_level="warn",
    )


def test_alias_is_used_when_primary_is_unset() -> None:
    cfg = load_config({"ACEXY_ADDR": ":9000", "ACEXY_BUFFER": "1MiB"})
    assert cfg.listen == "tcp:9000:backlog=1024"
    assert cfg.buffer_size == MiB


def test_primary_beats_alias() -> None:
    env = {
        "ACEXY_LISTEN_ADDR": ":9001",
        "ACEXY_ADDR": ":9000",
        "ACEXY_BUFFER_SIZE": "2MiB",
        "ACEXY_BUFFER": "1MiB",
    }
    cfg = load_config(env)
    assert cfg.listen == "tcp:9001:backlog=1024"
    assert cfg.buffer_size == 2 * MiB


def test_a_bad_alias_is_not_read_when_the_primary_is_set() -> None:
    cfg = load_config({"ACEXY_BUFFER_SIZE": "2MiB", "ACEXY_BUFFER": "garbage"})
    assert cfg.buffer_size == 2 * MiB


def test_option_beats_env_and_alias() -> None:
    env = {"ACEXY_LISTEN_ADDR": ":9001", "ACEXY_ADDR": ":9000", "ACEXY_PORT": "7000"}
    cfg = load_config(env, {"listen": ":9002", "engine-port": "7001"})
    assert cfg.listen == "tcp:9002:backlog=1024"
    assert cfg.engine_port == 7001


def test_option_none_means_not_given() -> None:
    cfg = load_config({"ACEXY_PORT": "7000"}, {"engine-port": None, "listen": None})
    assert cfg.engine_port == 7000
    assert cfg.listen == "tcp:8080:backlog=1024"


def test_unknown_option_keys_are_ignored() -> None:
    cfg = load_config({}, {"demo": True, "reactor": "epoll"})  # type: ignore[dict-item]
    assert cfg == load_config({})


@pytest.mark.parametrize("name", [name for s in SETTINGS for name in s.env_names])
def test_empty_env_counts_as_unset(name: str) -> None:
    assert load_config({name: ""}) == load_config({})


def test_empty_primary_falls_through_to_alias() -> None:
    env = {
        "ACEXY_BUFFER_SIZE": "",
        "ACEXY_BUFFER": "1MiB",
        "ACEXY_LISTEN_ADDR": "",
        "ACEXY_ADDR": ":1",
    }
    cfg = load_config(env)
    assert cfg.buffer_size == MiB
    assert cfg.listen == "tcp:1:backlog=1024"


def test_empty_option_is_an_error_not_unset() -> None:
    """An explicit --engine-port= is a mistake on the command line; say so."""
    with pytest.raises(ConfigError) as info:
        load_config({"ACEXY_PORT": "7000"}, {"engine-port": ""})
    assert info.value.option == "engine-port"


def test_load_config_takes_any_mapping_and_does_not_mutate_it() -> None:
    env = {"ACEXY_PORT": "7000"}
    options = {"linger": "1s"}
    load_config(env, options)
    assert env == {"ACEXY_PORT": "7000"}
    assert options == {"linger": "1s"}


# ---------------------------------------------------------------------------
# Errors name the variable, the option and the value
# ---------------------------------------------------------------------------


def test_error_message_from_env() -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"ACEXY_BUFFER_SIZE": "4 potatoes"})
    err = info.value
    assert str(err) == (
        "ACEXY_BUFFER_SIZE='4 potatoes': "
        "not a size (use e.g. 4MiB, 512KiB, 4MB or a number of bytes)"
    )
    assert err.variable == "ACEXY_BUFFER_SIZE"
    assert err.value == "4 potatoes"
    assert err.reason == "not a size (use e.g. 4MiB, 512KiB, 4MB or a number of bytes)"
    assert err.option is None
    assert isinstance(err, ValueError)


def test_error_message_from_option_names_env_and_option() -> None:
    with pytest.raises(ConfigError) as info:
        load_config({}, {"buffer-size": "x"})
    assert str(info.value).startswith("ACEXY_BUFFER_SIZE (--buffer-size)='x': ")
    assert info.value.variable == "ACEXY_BUFFER_SIZE"
    assert info.value.option == "buffer-size"


def test_error_from_alias_names_the_alias() -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"ACEXY_BUFFER": "lots"})
    assert info.value.variable == "ACEXY_BUFFER"
    assert str(info.value).startswith("ACEXY_BUFFER='lots': ")


@pytest.mark.parametrize(
    "env, variable, reason",
    [
        ({"ACEXY_NO_RESPONSE_TIMEOUT": "0s"}, "ACEXY_NO_RESPONSE_TIMEOUT", "greater than 0"),
        ({"ACEXY_EMPTY_TIMEOUT": "0"}, "ACEXY_EMPTY_TIMEOUT", "must be greater than 0"),
        ({"ACEXY_LINGER": "-1s"}, "ACEXY_LINGER", "negative"),
        ({"ACEXY_BUFFER_SIZE": "0"}, "ACEXY_BUFFER_SIZE", "must be greater than 0"),
        ({"ACEXY_BUFFER_SIZE": "2GiB"}, "ACEXY_BUFFER_SIZE", "at most 1GiB"),
        ({"ACEXY_PORT": "0"}, "ACEXY_PORT", "1 to 65535"),
        ({"ACEXY_PORT": "abc"}, "ACEXY_PORT", "not a port"),
        ({"ACEXY_HOST": "http://engine"}, "ACEXY_HOST", "ACEXY_SCHEME"),
        ({"ACEXY_SCHEME": "ftp"}, "ACEXY_SCHEME", "http or https"),
        ({"ACEXY_LOG_LEVEL": "loud"}, "ACEXY_LOG_LEVEL", "debug, info, warn, error"),
        ({"ACEXY_LISTEN_ADDR": "nowhere"}, "ACEXY_LISTEN_ADDR", ":PORT"),
        ({"ACEXY_ADDR": "nowhere"}, "ACEXY_ADDR", ":PORT"),
        ({"ACEXY_NO_RESPONSE_TIMEOUT": "1m30"}, "ACEXY_NO_RESPONSE_TIMEOUT", "not a duration"),
    ],
)
def test_bad_env_values_raise_config_error(env: dict[str, str], variable: str, reason: str) -> None:
    [value] = env.values()
    with pytest.raises(ConfigError) as info:
        load_config(env)
    err = info.value
    assert err.variable == variable
    assert err.value == value
    assert reason in err.reason
    assert variable in str(err)
    assert repr(value) in str(err)


def test_error_value_is_shown_with_repr_so_control_characters_are_escaped() -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"ACEXY_PORT": "80\n\x1b[31m"})
    assert "\n" not in str(info.value)
    assert "\x1b" not in str(info.value)
    assert info.value.value == "80\n\x1b[31m"  # the raw text is kept on the attribute


def test_secret_settings_are_not_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = Setting(
        field="engine_host",
        env="ACEXY_TEST_SECRET",
        aliases=(),
        option="test-secret",
        default="localhost",
        parser=parse_host,
        help="A secret",
        secret=True,
    )
    monkeypatch.setattr(config, "SETTINGS", (secret,) + SETTINGS[2:] + (SETTINGS[0],))
    with pytest.raises(ConfigError) as info:
        load_config({"ACEXY_TEST_SECRET": "hunter2 hunter2"})
    assert "hunter2" not in str(info.value)
    assert "<redacted>" in str(info.value)
    assert "hunter2" not in config.settings_markdown()
    [row] = [row for row in config.option_parameters() if row[0] == "test-secret"]
    assert "localhost" not in row[3]


def test_a_bad_built_in_default_is_reported_as_such(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = dataclasses.replace(SETTINGS[2], default="not-a-port")
    monkeypatch.setattr(config, "SETTINGS", SETTINGS[:2] + (broken,) + SETTINGS[3:])
    with pytest.raises(ConfigError) as info:
        load_config({})
    assert info.value.variable == "ACEXY_PORT"
    assert "built-in default" in info.value.reason


def test_config_error_str_formats() -> None:
    assert str(ConfigError("ACEXY_X", "v", "bad")) == "ACEXY_X='v': bad"
    assert str(ConfigError("ACEXY_X", "v", "bad", "x")) == "ACEXY_X (--x)='v': bad"
    assert str(ConfigError("ACEXY_X", "v", "bad", secret=True)) == "ACEXY_X=<redacted>: bad"


# ---------------------------------------------------------------------------
# acexy compatibility: ACEXY_M3U8_STREAM_TIMEOUT, unknown variables
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("text, seconds", [("60s", 60.0), ("1m", 60.0), ("2m30s", 150.0), ("90", 90.0),
                                           ("500ms", 0.5), ("0", 0.0)])  # fmt: skip
def test_m3u8_stream_timeout_takes_go_durations(text: str, seconds: float) -> None:
    assert load_config({"ACEXY_M3U8_STREAM_TIMEOUT": text}).m3u8_stream_timeout == seconds
    assert load_config({}, {"m3u8-stream-timeout": text}).m3u8_stream_timeout == seconds


def test_m3u8_stream_timeout_default_is_acexys_60s() -> None:
    assert load_config({}).m3u8_stream_timeout == 60.0


@pytest.mark.parametrize("text", ["-1s", "soon", "1m30"])
def test_a_bad_m3u8_stream_timeout_is_an_error_not_zero(text: str) -> None:
    with pytest.raises(ConfigError) as info:  # acexy made it 0: every HLS session stopped at once
        load_config({"ACEXY_M3U8_STREAM_TIMEOUT": text})
    assert info.value.variable == "ACEXY_M3U8_STREAM_TIMEOUT"


def test_a_misspelt_variable_names_the_closest_setting() -> None:
    assert unknown_env_warnings({"ACEXY_BUFER_SIZE": "8MiB"}) == [
        "unknown ACEXY_BUFER_SIZE (did you mean ACEXY_BUFFER_SIZE?)"
    ]


@pytest.mark.parametrize(
    "name, closest",
    [
        ("ACEXY_M3U8_TIMEOUT", "ACEXY_M3U8_STREAM_TIMEOUT"),
        ("ACEXY_ORCH_API_KEY", "ACEXY_ORCH_APIKEY"),
        ("ACEXY_LISTEN", "ACEXY_LISTEN_ADDR"),
        ("ACEXY_BUFFERSIZE", "ACEXY_BUFFER_SIZE"),
        ("ACEXY_EMPTY_TIMOUT", "ACEXY_EMPTY_TIMEOUT"),
        ("ACEXY_ENGINE", "ACEXY_ENGINES"),
        ("ACEXY_port", "ACEXY_PORT"),  # the case is wrong (variables are case-sensitive)
        ("acexy_log_level", "ACEXY_LOG_LEVEL"),
    ],
)
def test_close_matches_cover_names_and_aliases(name: str, closest: str) -> None:
    assert unknown_env_warnings({name: "x"}) == [f"unknown {name} (did you mean {closest}?)"]


def test_a_name_close_to_no_setting_still_warns_without_a_guess() -> None:
    [warning] = unknown_env_warnings({"ACEXY_FOO": "1"})
    assert warning.startswith("unknown ACEXY_FOO (")
    assert "did you mean" not in warning


def test_known_names_aliases_and_other_variables_give_no_warning() -> None:
    env = {name: "x" for s in SETTINGS for name in s.env_names}
    env.update({"PATH": "/usr/bin", "HOME": "/root", "XACEXY_PORT": "1", "ACEXYPORT": "1"})
    assert unknown_env_warnings(env) == []
    assert unknown_env_warnings({}) == []


def test_warnings_never_show_the_value_and_are_sorted() -> None:
    env = {"ACEXY_ORCH_APIKY": "sk-hunter2-secret", "ACEXY_TOKN": "tok-hunter2-secret", "ACEXY_BUFER": ""}
    warnings = unknown_env_warnings(env)
    assert [w.split()[1] for w in warnings] == ["ACEXY_BUFER", "ACEXY_ORCH_APIKY", "ACEXY_TOKN"]
    assert "hunter2" not in " ".join(warnings)
    assert warnings[1] == "unknown ACEXY_ORCH_APIKY (did you mean ACEXY_ORCH_APIKEY?)"
    assert warnings[2] == "unknown ACEXY_TOKN (did you mean ACEXY_TOKEN?)"


def test_unknown_variables_never_stop_load_config() -> None:
    assert load_config({"ACEXY_BUFER_SIZE": "garbage"}) == load_config({})


# ---------------------------------------------------------------------------
# Hygiene
# ---------------------------------------------------------------------------


def test_importing_config_does_not_install_a_reactor() -> None:
    code = (
        "import sys, acexy_tw.config; "
        "assert 'twisted.internet.reactor' not in sys.modules, 'reactor imported'"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
