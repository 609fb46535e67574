"""Tests for acexy_tw.content: query string -> ContentKey."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
import pytest
from twisted.web.http import parse_qs

from acexy_tw.content import (
    MAX_EXTRA_NAME,
    MAX_EXTRA_VALUE,
    MAX_EXTRAS,
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
    ["", "id=", "infohash=", "content_id=", "id=&infohash=", "foo=bar", f"ID={CID}", f"pid={CID}"],
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
    ["pid=123", "format=json", "token=secret", "pid=1&format=hls&token=t&pid=2", "pid=", "format="],
)
def test_proxy_owned_parameters_are_dropped(query: str) -> None:
    key = parse_query(q(f"id={CID}&{query}"))
    assert key == ContentKey("content_id", CID)
    assert key.engine_params() == [("content_id", CID)]


def test_reserved_names_are_case_sensitive() -> None:
    """Like acexy (Go's Query().Get), only the exact names are special."""
    key = parse_query(q(f"id={CID}&PID=1&Format=x"))
    assert key.extras == (("Format", "x"), ("PID", "1"))


def test_extras_are_passed_through_and_sorted() -> None:
    key = parse_query(q(f"transcode_audio=1&id={CID}&preferred_audio_language=eng&a=2&a=1"))
    assert key.extras == (
        ("a", "1"),
        ("a", "2"),
        ("preferred_audio_language", "eng"),
        ("transcode_audio", "1"),
    )
    assert key.engine_params() == [("content_id", CID), *key.extras]


def test_extras_order_does_not_change_the_key() -> None:
    one = parse_query(q(f"id={CID}&x=1&y=2&x=0"))
    two = parse_query(q(f"y=2&x=0&x=1&id={CID_UPPER}"))
    assert one == two
    assert hash(one) == hash(two)


def test_extras_make_a_different_key() -> None:
    plain = parse_query(q(f"id={CID}"))
    transcoded = parse_query(q(f"id={CID}&transcode_audio=1"))
    assert plain != transcoded
    assert parse_query(q(f"id={CID}&transcode_audio=0")) != transcoded


def test_repeated_extra_values_are_all_kept() -> None:
    key = parse_query(q(f"id={CID}&x=1&x=1&x=2"))
    assert key.extras == (("x", "1"), ("x", "1"), ("x", "2"))


def test_empty_extra_value_is_kept() -> None:
    key = parse_query(q(f"id={CID}&flag=&x="))
    assert key.extras == (("flag", ""), ("x", ""))
    assert parse_query({b"id": [CID.encode()], b"flag": [b""]}).extras == (("flag", ""),)


def test_extra_values_may_hold_any_text() -> None:
    key = parse_query(q(f"id={CID}&title=caf%C3%A9%20%26%20bar"))
    assert key.extras == (("title", "café & bar"),)


def test_engine_params_uses_key_type_as_selector() -> None:
    assert parse_query(q(f"id={CID}")).engine_params() == [("content_id", CID)]
    key = parse_query(q(f"infohash={HASH}&x=1"))
    assert key.engine_params() == [("infohash", HASH), ("x", "1")]


def test_engine_params_is_a_fresh_list() -> None:
    key = parse_query(q(f"id={CID}"))
    key.engine_params().append(("pid", "1"))
    assert key.engine_params() == [("content_id", CID)]


def test_str() -> None:
    assert str(parse_query(q(f"id={CID}"))) == CID
    assert str(parse_query(q(f"id={CID}&b=2&a=1"))) == f"{CID}?a=1&b=2"
    assert str(parse_query(q(f"id={CID}&t=a%20b%26c"))) == f"{CID}?t=a+b%26c"


def test_content_key_is_frozen_and_hashable() -> None:
    key = parse_query(q(f"id={CID}&a=1"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        key.value = HASH  # type: ignore[misc]
    assert {key: 1}[ContentKey("content_id", CID, (("a", "1"),))] == 1
    assert isinstance(key.extras, tuple)
    assert all(isinstance(pair, tuple) for pair in key.extras)


# ---------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------


def test_max_extras_allowed() -> None:
    query = f"id={CID}&" + "&".join(f"p{i}=v" for i in range(MAX_EXTRAS))
    assert len(parse_query(q(query)).extras) == MAX_EXTRAS


def test_too_many_extras() -> None:
    query = f"id={CID}&" + "&".join(f"p{i}=v" for i in range(MAX_EXTRAS + 1))
    assert f"at most {MAX_EXTRAS}" in message(q(query))


def test_too_many_extras_counts_values_not_names() -> None:
    query = f"id={CID}&" + "&".join("p=v" for _ in range(MAX_EXTRAS + 1))
    assert f"at most {MAX_EXTRAS}" in message(q(query))


def test_reserved_and_selector_params_do_not_count_towards_the_limit() -> None:
    extras = "&".join(f"p{i}=v" for i in range(MAX_EXTRAS))
    key = parse_query(q(f"id={CID}&id={CID}&pid=1&format=json&token=x&{extras}"))
    assert len(key.extras) == MAX_EXTRAS


def test_extra_name_length_limit() -> None:
    ok = "n" * MAX_EXTRA_NAME
    assert parse_query(q(f"id={CID}&{ok}=1")).extras == ((ok, "1"),)
    text = message(q(f"id={CID}&{ok}n=1"))
    assert f"longer than {MAX_EXTRA_NAME}" in text
    assert "n" * (MAX_EXTRA_NAME + 1) not in text  # echoed name is truncated


def test_extra_value_length_limit() -> None:
    ok = "v" * MAX_EXTRA_VALUE
    assert parse_query(q(f"id={CID}&x={ok}")).extras == (("x", ok),)
    text = message(q(f"id={CID}&x={ok}v"))
    assert f"longer than {MAX_EXTRA_VALUE}" in text
    assert "`x`" in text
    assert "vvvv" not in text  # the long value itself is not echoed


@pytest.mark.parametrize("name", ["Aa0_.-", "transcode_audio", "a.b-c"])
def test_extra_name_charset_good(name: str) -> None:
    assert parse_query(q(f"id={CID}&{name}=1")).extras == ((name, "1"),)


@pytest.mark.parametrize(
    "raw_name",
    [b"a b", b"a/b", b"a;b", "café".encode(), b"a\nb", b"a\x00b", b"<script>", b"a[]", b""],
)
def test_extra_name_charset_bad(raw_name: bytes) -> None:
    text = message({b"id": [CID.encode()], raw_name: [b"1"]})
    assert "letters, digits" in text
    assert text.isprintable()


def test_bad_extra_is_rejected_even_with_a_valid_selector_later() -> None:
    args = {b"a b": [b"1"], b"id": [CID.encode()]}
    assert "letters, digits" in message(args)


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
