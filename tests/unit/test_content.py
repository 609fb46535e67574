"""Tests for acexy_tw.content: query string -> ContentKey."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
import pytest
from twisted.web.http import parse_qs

from acexy_tw.content import (
    ENGINE_OPTIONS,
    FOREIGN_SELECTORS,
    MAX_EXTRA_VALUE,
    BadRequest,
    ContentKey,
    parse_query,
)

CID = "dd1e67078381739d14beca697356ab76d49d1a2f"
CID_UPPER = CID.upper()
HASH = "0123456789abcdef0123456789abcdef01234567"

NO_SELECTOR = "one of `id` or `infohash` must have a value"
MANY_SELECTORS = "only one of `id` or `infohash` can have a value"


def q(query: str | bytes) -> dict[bytes, list[bytes]]:
    """``Request.args`` for a query string, built as twisted.web's Request does."""
    raw = query.encode() if isinstance(query, str) else query
    return parse_qs(raw, 1)


def message(args: dict[bytes, list[bytes]]) -> str:
    with pytest.raises(BadRequest) as info:
        parse_query(args)
    assert str(info.value) == info.value.message
    assert isinstance(info.value, ValueError)
    return info.value.message


# ---------------------------------------------------------------------------
# Selectors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query, key_type",
    [
        (f"id={CID}", "content_id"),
        (f"content_id={CID}", "content_id"),
        (f"infohash={CID}", "infohash"),
    ],
)
def test_selectors(query: str, key_type: str) -> None:
    assert parse_query(q(query)) == ContentKey(key_type, CID)


def test_id_and_content_id_are_the_same_key() -> None:
    assert parse_query(q(f"id={CID}")) == parse_query(q(f"content_id={CID}"))


def test_content_id_and_infohash_are_different_keys() -> None:
    assert parse_query(q(f"id={CID}")) != parse_query(q(f"infohash={CID}"))


@pytest.mark.parametrize(
    "query",
    ["", "id=", "infohash=", "content_id=", "id=&infohash=", "foo=bar", f"pid={CID}", f"url={CID}", "magnet=x"],
)
def test_no_selector_is_the_acexy_400(query: str) -> None:
    assert message(q(query)) == NO_SELECTOR


@pytest.mark.parametrize(
    "query",
    [
        f"id={CID}&infohash={HASH}",
        f"id={CID}&infohash={CID}",
        f"id={CID}&content_id={CID}",
        f"content_id={CID}&infohash={HASH}",
        f"id={CID}&id={HASH}",
        f"infohash={CID}&infohash={HASH}",
        "id=abc&id=def",  # checked before the format, as acexy does
        f"id={CID}&ID={HASH}",  # selector names are case-insensitive
        f"Content_Id={CID}&INFOHASH={HASH}",
    ],
)
def test_more_than_one_selector_is_the_acexy_400(query: str) -> None:
    assert message(q(query)) == MANY_SELECTORS


@pytest.mark.parametrize(
    "query",
    [
        f"id={CID}&id={CID}",
        f"id={CID}&id={CID_UPPER}",  # same key once normalised
        f"id={CID}&infohash=",  # empty counts as absent
        f"id=&content_id={CID}",
        f"id={CID}&id=",
    ],
)
def test_repeated_same_value_or_empty_is_fine(query: str) -> None:
    assert parse_query(q(query)).value == CID


def test_value_is_lower_cased() -> None:
    upper = parse_query(q(f"id={CID_UPPER}"))
    lower = parse_query(q(f"id={CID}"))
    mixed = parse_query(q(f"id={CID[:20].upper() + CID[20:]}"))
    assert upper.value == CID
    assert upper == lower == mixed
    assert hash(upper) == hash(lower) == hash(mixed)
    assert len({upper, lower, mixed}) == 1


@pytest.mark.parametrize(
    "value",
    [
        "xyz",
        CID[:-1],  # 39
        CID + "0",  # 41
        CID[:-1] + "g",
        " " + CID[1:],
        CID[:-1] + "\u0660",  # Arabic-Indic digit zero: a digit, but not hex
        "0x" + CID[:38],
    ],
)
def test_value_must_be_40_hex(value: str) -> None:
    text = message({b"id": [value.encode()]})
    assert text == f"`id` must be 40 hexadecimal characters, got {value!r}"


@pytest.mark.parametrize("param", ["id", "content_id", "infohash"])
def test_bad_value_message_names_the_parameter_used(param: str) -> None:
    assert message(q(f"{param}=nope")) == f"`{param}` must be 40 hexadecimal characters, got 'nope'"


def test_bad_value_echo_is_truncated() -> None:
    value = "z" * 500
    text = message(q(f"id={value}"))
    assert "z" * 64 in text
    assert "z" * 65 not in text
    assert len(text) < 150


@pytest.mark.parametrize(
    "raw",
    [
        b"abc\r\nSet-Cookie: x=1",
        b"\x1b[31mred",
        b"nul\x00byte",
        b"tab\there",
        "rtl\u202eoverride".encode(),
        b"\x7f",
    ],
)
def test_control_characters_are_not_echoed_raw(raw: bytes) -> None:
    text = message({b"id": [raw]})
    assert text.isprintable()
    for ch in ("\r", "\n", "\x1b", "\x00", "\t", "\u202e", "\x7f"):
        assert ch not in text


# ---------------------------------------------------------------------------
# Proxy-owned parameters and extras
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        "pid=123",
        "format=json",
        "token=secret",
        "pid=1&format=hls&token=t&pid=2",
        "pid=",
        "format=",
        "PID=1",
        "Pid=2",
        "FORMAT=json",
        "Token=x",
    ],
)
def test_proxy_owned_parameters_are_dropped_in_any_case(query: str) -> None:
    key = parse_query(q(f"id={CID}&{query}"))
    assert key == ContentKey("content_id", CID)
    assert key.engine_params() == [("content_id", CID)]


def test_selector_names_are_case_insensitive() -> None:
    assert parse_query(q(f"ID={CID}")) == ContentKey("content_id", CID)
    assert parse_query(q(f"InfoHash={HASH}")) == ContentKey("infohash", HASH)
    assert parse_query(q(f"id={CID}&ID={CID_UPPER}")).value == CID


@pytest.mark.parametrize("name", sorted(FOREIGN_SELECTORS) + ["URL", "Magnet"])
def test_another_selector_next_to_an_id_is_a_400(name: str) -> None:
    text = message(q(f"id={CID}&{name}=http%3A%2F%2Fx%2Fa.torrent"))
    assert text == f"only one content selector can have a value: `id` and `{name.lower()}` were given"


@pytest.mark.parametrize("name", sorted(FOREIGN_SELECTORS))
def test_another_selector_alone_is_the_acexy_no_selector_400(name: str) -> None:
    assert message(q(f"{name}=x")) == NO_SELECTOR


def test_empty_foreign_selector_is_ignored() -> None:
    assert parse_query(q(f"id={CID}&url=&magnet=")) == ContentKey("content_id", CID)


def test_known_engine_options_are_forwarded_and_sorted() -> None:
    key = parse_query(q(f"transcode_audio=1&id={CID}&preferred_audio_language=eng&file_indexes=0,2"))
    assert key.extras == (
        ("file_indexes", "0,2"),
        ("preferred_audio_language", "eng"),
        ("transcode_audio", "1"),
    )
    assert key.engine_params() == [("content_id", CID), *key.extras]


@pytest.mark.parametrize(
    "junk", ["junk=1", "a=2&a=1", "Transcode_Audio=1", "accinj=1", "x=", "a%20b=1", "caf%C3%A9=1", "=1", "a[]=1"]
)
def test_unknown_parameters_are_dropped(junk: str) -> None:
    key = parse_query(q(f"id={CID}&{junk}"))
    assert key == ContentKey("content_id", CID)
    assert key.engine_params() == [("content_id", CID)]


def test_junk_parameters_do_not_make_new_keys() -> None:
    keys = {parse_query(q(f"id={CID}&junk={i}")) for i in range(200)}
    assert keys == {ContentKey("content_id", CID)}


def test_options_that_do_not_change_the_content_are_not_part_of_the_key() -> None:
    restart = parse_query(q(f"id={CID}&force_session_restart=1"))
    plain = parse_query(q(f"id={CID}"))
    assert restart == plain and hash(restart) == hash(plain)
    assert restart.extras == ()
    assert restart.options == (("force_session_restart", "1"),)
    assert restart.engine_params() == [("content_id", CID), ("force_session_restart", "1")]
    assert str(restart) == CID


def test_every_engine_option_is_forwarded() -> None:
    for name, identity in ENGINE_OPTIONS.items():
        key = parse_query(q(f"id={CID}&{name}=1"))
        assert key.engine_params() == [("content_id", CID), (name, "1")]
        assert (key != ContentKey("content_id", CID)) is identity


def test_extras_order_does_not_change_the_key() -> None:
    one = parse_query(q(f"id={CID}&transcode_audio=1&transcode_mp3=0"))
    two = parse_query(q(f"transcode_mp3=0&transcode_audio=1&id={CID_UPPER}"))
    assert one == two
    assert hash(one) == hash(two)


def test_extras_make_a_different_key() -> None:
    plain = parse_query(q(f"id={CID}"))
    transcoded = parse_query(q(f"id={CID}&transcode_audio=1"))
    assert plain != transcoded
    assert parse_query(q(f"id={CID}&transcode_audio=0")) != transcoded


def test_repeated_option_with_one_value_collapses() -> None:
    key = parse_query(q(f"id={CID}&transcode_audio=1&transcode_audio=1&transcode_audio="))
    assert key.extras == (("transcode_audio", "1"),)


def test_option_with_two_values_is_a_400() -> None:
    text = message(q(f"id={CID}&transcode_audio=1&transcode_audio=0"))
    assert text == "query parameter `transcode_audio` can only have one value"


def test_empty_option_value_is_absent() -> None:
    assert parse_query(q(f"id={CID}&transcode_audio=")) == ContentKey("content_id", CID)


def test_option_values_are_kept_decoded() -> None:
    """Request.args is decoded once; the value is kept as text, a decoded '&' included."""
    key = parse_query(q(f"id={CID}&preferred_audio_language=eng%26accinj%3D1"))
    assert key.extras == (("preferred_audio_language", "eng&accinj=1"),)


def test_smuggled_parameter_in_the_id_is_a_400() -> None:
    text = message(q(f"id={CID}%26accinj%3D1"))
    assert text.startswith("`id` must be 40 hexadecimal characters")


def test_engine_params_uses_key_type_as_selector() -> None:
    assert parse_query(q(f"id={CID}")).engine_params() == [("content_id", CID)]
    key = parse_query(q(f"infohash={HASH}&transcode_ac3=1"))
    assert key.engine_params() == [("infohash", HASH), ("transcode_ac3", "1")]


def test_engine_params_is_a_fresh_list() -> None:
    key = parse_query(q(f"id={CID}"))
    key.engine_params().append(("pid", "1"))
    assert key.engine_params() == [("content_id", CID)]


def test_str() -> None:
    assert str(parse_query(q(f"id={CID}"))) == CID
    assert str(parse_query(q(f"id={CID}&transcode_mp3=2&transcode_audio=1"))) == f"{CID}?transcode_audio=1&transcode_mp3=2"
    assert str(parse_query(q(f"id={CID}&preferred_audio_language=a%20b%26c"))) == f"{CID}?preferred_audio_language=a+b%26c"


def test_content_key_is_frozen_and_hashable() -> None:
    key = parse_query(q(f"id={CID}&transcode_audio=1"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        key.value = HASH  # type: ignore[misc]
    assert {key: 1}[ContentKey("content_id", CID, (("transcode_audio", "1"),))] == 1
    assert isinstance(key.extras, tuple)
    assert all(isinstance(pair, tuple) for pair in key.extras)


# ---------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------


def test_many_junk_parameters_cost_nothing() -> None:
    query = f"id={CID}&" + "&".join(f"p{i}=v" for i in range(5000))
    assert parse_query(q(query)) == ContentKey("content_id", CID)


def test_option_value_length_limit() -> None:
    ok = "v" * MAX_EXTRA_VALUE
    assert parse_query(q(f"id={CID}&preferred_audio_language={ok}")).extras == (("preferred_audio_language", ok),)
    text = message(q(f"id={CID}&preferred_audio_language={ok}v"))
    assert f"longer than {MAX_EXTRA_VALUE}" in text
    assert "`preferred_audio_language`" in text
    assert "vvvv" not in text  # the long value itself is not echoed


# ---------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        {b"id": [b"\xff" * 40]},
        {b"id": [CID.encode()], b"x": [b"\xc3"]},
        {b"id": [CID.encode()], b"\xfe": [b"1"]},
        {b"id": [CID.encode()], b"pid": [b"\xff"]},  # even a dropped parameter
        {b"\xff": [b""]},
    ],
)
def test_non_utf8_is_a_bad_request(args: dict[bytes, list[bytes]]) -> None:
    assert "UTF-8" in message(args)


def test_percent_encoded_selector_is_decoded_by_the_caller() -> None:
    """Request.args is already percent-decoded; %41 would be 'A' and is lower-cased."""
    key = parse_query(q(f"id=%{ord(CID_UPPER[0]):02X}{CID_UPPER[1:]}"))
    assert key.value == CID


# ---------------------------------------------------------------------------
# Hygiene
# ---------------------------------------------------------------------------


def test_importing_content_needs_neither_reactor_nor_klein() -> None:
    code = (
        "import sys, acexy_tw.content; "
        "assert 'twisted.internet.reactor' not in sys.modules, 'reactor imported'; "
        "assert 'klein' not in sys.modules, 'klein imported'; "
        "assert 'twisted.web' not in sys.modules, 'twisted.web imported'"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
