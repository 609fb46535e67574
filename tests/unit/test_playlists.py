"""Playlists (issue #13, point 1): the pure rewriter and the cache on a Clock."""

from __future__ import annotations

from typing import Any, Optional

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers

from acexy_tw.config import ConfigError, load_config, parse_playlists
from acexy_tw.content import BadRequest, parse_query
from acexy_tw.playlists import NotM3U, PlaylistError, Playlists, UnknownPlaylist, is_m3u, rewrite

A = "a" * 40
B = "0123456789abcdef0123456789abcdef01234567"
BASE = "http://proxy:8080"


def stream(cid: str, extra: str = "") -> bytes:
    return f"{BASE}/ace/getstream?id={cid}{extra}".encode()


# ---------------------------------------------------------------------------
# The rewriter
# ---------------------------------------------------------------------------

HEADER = b'#EXTM3U url-tvg="http://epg.example/guide.xml.gz" x-tvg-url="http://e/x.xml"\n'
INFO = b'#EXTINF:-1 tvg-id="News.uk" tvg-logo="http://logo.example/n.png?a=1&b=2" group-title="News \xc3\xa9",News HD\n'


@pytest.mark.parametrize(
    "entry, expected",
    [
        (f"acestream://{A}".encode(), stream(A)),
        (f"acestream://{A.upper()}".encode(), stream(A)),
        (f"ACESTREAM://{A}/".encode(), stream(A)),
        (B.encode(), stream(B)),
        (B.upper().encode(), stream(B)),
        (f"http://127.0.0.1:6878/ace/getstream?id={A}".encode(), stream(A)),
        (f"http://engine:6878/ace/getstream/?content_id={A}&pid=123".encode(), stream(A)),
        (f"https://far.example/ace/manifest.m3u8?id={A}".encode(), stream(A)),
        (f"http://e:6878/ace/getstream?infohash={B}".encode(), f"{BASE}/ace/getstream?infohash={B}".encode()),
        (
            f"http://e:6878/ace/getstream?id={A}&transcode_audio=1&junk=x".encode(),
            stream(A, "&transcode_audio=1"),
        ),
        (f"http://e/ace/getstream?id=acestream://{A}".encode(), stream(A)),
    ],
)
def test_every_entry_form_becomes_this_proxys_url(entry: bytes, expected: bytes) -> None:
    body = HEADER + INFO + entry + b"\n"
    assert rewrite(body, BASE) == HEADER + INFO + expected + b"\n"


@pytest.mark.parametrize(
    "entry",
    [
        b"http://tv.example/live/channel.ts",
        b"http://e:6878/ace/getstream?id=nothex",  # not an id: left for the player to fail on
        b"http://e:6878/ace/status?id=" + A.encode(),
        b"rtmp://x/ace/getstream?id=" + A.encode(),
        b"acestream://short",
        A.encode() + b"0",  # 41 hex: not an id
        b"udp://@239.0.0.1:1234",
    ],
)
def test_other_entries_are_kept_byte_for_byte(entry: bytes) -> None:
    body = HEADER + INFO + entry + b"\n"
    assert rewrite(body, BASE) == body


def test_every_other_line_is_kept_byte_for_byte_with_crlf_endings() -> None:
    lines = [
        HEADER.rstrip(b"\n"),
        b"# a comment with acestream://" + A.encode(),
        b"",
        b"#EXTGRP:Sports",
        INFO.rstrip(b"\n"),
        b"  acestream://" + A.encode() + b"  ",
        b"#EXTVLCOPT:http-user-agent=Mozilla",
        b"http://other.example/stream.m3u8",
    ]
    body = b"\r\n".join(lines) + b"\r\n"
    out = rewrite(body, BASE).split(b"\r\n")
    assert out[5] == b"  " + stream(A) + b"  "
    assert out[:5] + out[6:] == body.split(b"\r\n")[:5] + body.split(b"\r\n")[6:]


def test_mixed_and_missing_line_endings_are_kept() -> None:
    body = b"#EXTM3U\r#EXTINF:-1,A\n" + A.encode() + b"\r\n#EXTINF:-1,B\r" + B.encode()
    assert rewrite(body, BASE) == b"#EXTM3U\r#EXTINF:-1,A\n" + stream(A) + b"\r\n#EXTINF:-1,B\r" + stream(B)


def test_the_token_is_appended_url_encoded() -> None:
    body = b"#EXTM3U\n" + A.encode() + b"\n"
    out = rewrite(body, BASE, token="s3cret&x=1 #+%/")
    assert out == b"#EXTM3U\n" + stream(A, "&token=s3cret%26x%3D1%20%23%2B%25%2F") + b"\n"


def test_hls_emits_manifest_urls() -> None:
    body = b"#EXTM3U\n" + A.encode() + b"\nhttp://e/ace/getstream?id=" + B.encode() + b"&transcode_mp3=1\n"
    assert rewrite(body, "https://tv.example/acexy", token="tok", hls=True) == (
        b"#EXTM3U\n"
        + f"https://tv.example/acexy/ace/manifest.m3u8?id={A}&token=tok\n".encode()
        + f"https://tv.example/acexy/ace/manifest.m3u8?id={B}&transcode_mp3=1&token=tok\n".encode()
    )


def test_undecodable_bytes_are_kept() -> None:
    body = b"#EXTM3U\n#EXTINF:-1,\xff\xfe latin\n\xffhttp://x/\n" + A.encode() + b"\n"
    assert rewrite(body, BASE) == b"#EXTM3U\n#EXTINF:-1,\xff\xfe latin\n\xffhttp://x/\n" + stream(A) + b"\n"


@pytest.mark.parametrize(
    "body, ok",
    [
        (b"#EXTM3U\n", True),
        (b"\xef\xbb\xbf#EXTM3U x-tvg-url=\"\"\r\n", True),
        (b"\n  #EXTM3U\n", True),
        (b"<html>not found</html>", False),
        (b"", False),
        (A.encode() + b"\n", False),
    ],
)
def test_is_m3u(body: bytes, ok: bool) -> None:
    assert is_m3u(body) is ok


# ---------------------------------------------------------------------------
# acestream:// accepted as an id
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", [f"acestream://{A}", f"AceStream://{A.upper()}", f"acestream://{A}/"])
def test_parse_query_accepts_acestream_urls(value: str) -> None:
    assert parse_query({b"id": [value.encode()]}).value == A
    assert parse_query({b"infohash": [value.encode()]}).key_type == "infohash"


def test_an_acestream_url_and_the_bare_id_are_one_content() -> None:
    assert parse_query({b"id": [f"acestream://{A}".encode(), A.encode()]}).value == A
    with pytest.raises(BadRequest):
        parse_query({b"id": [b"acestream://nothex"]})


# ---------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------


def test_playlists_setting() -> None:
    config = load_config({"ACEXY_PLAYLISTS": " tv=http://x/a.m3u , local=/srv/tv list.m3u,b.2=https://y/"})
    assert config.playlists == (("tv", "http://x/a.m3u"), ("local", "/srv/tv list.m3u"), ("b.2", "https://y/"))
    assert load_config({}).playlists == ()
    assert load_config({}).playlist_refresh == 600.0
    assert load_config({"ACEXY_PUBLIC_URL": "https://tv.example/acexy/"}).public_url == "https://tv.example/acexy"


@pytest.mark.parametrize(
    "env",
    [
        {"ACEXY_PLAYLISTS": "tv"},
        {"ACEXY_PLAYLISTS": "tv="},
        {"ACEXY_PLAYLISTS": "=http://x/"},
        {"ACEXY_PLAYLISTS": "tv=http://x/,,b=/p"},
        {"ACEXY_PLAYLISTS": "a/b=http://x/"},
        {"ACEXY_PLAYLISTS": "tv=/a,tv=/b"},
        {"ACEXY_PLAYLISTS": "tv=ftp://x/a.m3u"},
        {"ACEXY_PUBLIC_URL": "tv.example"},
        {"ACEXY_PUBLIC_URL": "http://tv.example/?a=1"},
        {"ACEXY_PLAYLIST_REFRESH": "0"},
    ],
)
def test_bad_playlist_settings_name_the_variable(env: dict) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(env)
    assert caught.value.variable == next(iter(env))


def test_parse_playlists_empty() -> None:
    assert parse_playlists("  ") == ()


# ---------------------------------------------------------------------------
# The cache, on a Clock
# ---------------------------------------------------------------------------

M3U = b"#EXTM3U\n#EXTINF:-1,A\nacestream://" + A.encode() + b"\n"


class FakeTransport:
    def __init__(self) -> None:
        self.stopped = False

    def stopProducing(self) -> None:
        self.stopped = True


class FakeResponse:
    def __init__(self, code: int, body: bytes = b"", headers: Optional[dict] = None, length: Any = None) -> None:
        self.code = code
        self.body = body
        self.headers = Headers({k: [v] for k, v in (headers or {}).items()})
        self.length = len(body) if length is None else length

    def deliverBody(self, protocol: Any) -> None:
        transport = FakeTransport()
        protocol.makeConnection(transport)
        if transport.stopped:
            return
        for i in range(0, len(self.body), 65536):
            protocol.dataReceived(self.body[i : i + 65536])
            if transport.stopped:
                return
        protocol.connectionLost(Failure(ResponseDone()))


class FakeHTTP:
    """Answers each get from ``answers`` (a response, an exception, or None: never)."""

    def __init__(self) -> None:
        self.answers: list[Any] = []
        self.requests: list[tuple[str, dict]] = []
        self.pending: list[Deferred] = []

    def get(self, url: str, headers: dict, **kwargs: Any) -> Deferred:
        self.requests.append((url, dict(headers)))
        answer = self.answers.pop(0)
        if answer is None:
            d: Deferred = Deferred()
            self.pending.append(d)
            return d
        if isinstance(answer, Exception):
            from twisted.internet.defer import fail

            return fail(answer)
        return succeed(answer)


def make(http: FakeHTTP, clock: Clock, **kwargs: Any) -> Playlists:
    kwargs.setdefault("refresh", 600.0)
    kwargs.setdefault("timeout", 10.0)
    return Playlists([("tv", "http://src/tv.m3u")], http, clock, **kwargs)


def result(d: Deferred) -> Any:
    out: list = []
    d.addBoth(out.append)
    assert out, "not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def test_fetch_cache_then_revalidate_with_304() -> None:
    clock, http = Clock(), FakeHTTP()
    playlists = make(http, clock)
    http.answers.append(FakeResponse(200, M3U, {b"etag": b'"v1"', b"last-modified": b"Tue, 01 Dec 2026 10:00:00 GMT"}))
    assert result(playlists.get("tv")) == M3U
    assert http.requests == [("http://src/tv.m3u", {})]
    clock.advance(599)
    assert result(playlists.get("tv")) == M3U
    assert len(http.requests) == 1  # cached
    clock.advance(1)
    http.answers.append(FakeResponse(304))
    assert result(playlists.get("tv")) == M3U
    assert http.requests[1][1] == {
        b"if-none-match": [b'"v1"'],
        b"if-modified-since": [b"Tue, 01 Dec 2026 10:00:00 GMT"],
    }
    clock.advance(300)
    assert result(playlists.get("tv")) == M3U
    assert len(http.requests) == 2  # the 304 renewed the copy


def test_refresh_picks_up_a_changed_source() -> None:
    clock, http = Clock(), FakeHTTP()
    playlists = make(http, clock, refresh=60.0)
    http.answers.append(FakeResponse(200, M3U, {b"etag": b'"v1"'}))
    result(playlists.get("tv"))
    clock.advance(61)
    changed = M3U + b"#EXTINF:-1,B\n" + B.encode() + b"\n"
    http.answers.append(FakeResponse(200, changed, {b"etag": b'"v2"'}))
    assert result(playlists.get("tv")) == changed
    clock.advance(61)
    http.answers.append(FakeResponse(304))
    assert result(playlists.get("tv")) == changed
    assert http.requests[2][1] == {b"if-none-match": [b'"v2"']}


@pytest.mark.parametrize(
    "failure",
    [
        ConnectionRefusedError("refused"),
        FakeResponse(500, b"oops"),
        FakeResponse(200, b"<html>"),
        None,  # hangs: the timeout
    ],
)
def test_a_failing_source_serves_the_stale_copy(failure: Any) -> None:
    clock, http = Clock(), FakeHTTP()
    playlists = make(http, clock)
    http.answers.append(FakeResponse(200, M3U))
    result(playlists.get("tv"))
    clock.advance(601)
    http.answers.append(failure)
    d = playlists.get("tv")
    clock.advance(10)
    assert result(d) == M3U
    clock.advance(5)  # the pause after a failure (test_a_source_failing_forever_...)
    http.answers.append(FakeResponse(200, M3U + b"#x\n"))
    assert result(playlists.get("tv")) == M3U + b"#x\n"  # asked again after the pause


@pytest.mark.parametrize(
    "failure, error, text",
    [
        (ConnectionRefusedError("refused"), PlaylistError, "http://src/tv.m3u failed"),
        (FakeResponse(404, b"no"), PlaylistError, "http://src/tv.m3u answered HTTP 404"),
        (FakeResponse(200, b"<html>"), NotM3U, "not an M3U"),
        (None, PlaylistError, "did not answer within 10s"),
        (FakeResponse(200, b"#EXTM3U\n" + b"x" * (10 * 1024 * 1024)), PlaylistError, "larger than"),
        (FakeResponse(200, b"#EXTM3U\n", length=20 * 1024 * 1024), PlaylistError, "larger than"),
    ],
)
def test_no_copy_and_a_failing_source_is_an_error_naming_it(failure: Any, error: type, text: str) -> None:
    clock, http = Clock(), FakeHTTP()
    playlists = make(http, clock)
    http.answers.append(failure)
    d = playlists.get("tv")
    clock.advance(10)
    with pytest.raises(error) as caught:
        result(d)
    assert text in str(caught.value) and "http://src/tv.m3u" in str(caught.value)


def test_a_source_failing_forever_is_asked_less_and_less_often() -> None:
    clock, http = Clock(), FakeHTTP()
    playlists = make(http, clock, refresh=600.0)
    asked_at: list[float] = []
    for _ in range(2000):  # a player asking every 0.5 s for 1000 s
        if len(http.answers) == 0:
            http.answers.append(ConnectionRefusedError("refused"))
        before = len(http.requests)
        with pytest.raises(PlaylistError, match="http://src/tv.m3u failed"):
            result(playlists.get("tv"))  # a 502 every time, at once
        if len(http.requests) > before:
            asked_at.append(clock.seconds())
        clock.advance(0.5)
    gaps = [b - a for a, b in zip(asked_at, asked_at[1:])]
    assert gaps[:6] == [5.0, 10.0, 20.0, 40.0, 80.0, 160.0]
    assert all(g == 300.0 for g in gaps[7:])  # capped at 5 min
    assert len(asked_at) <= 12  # not 2000
    # an answer ends the pause at once
    clock.advance(300)
    http.answers[:] = [FakeResponse(200, M3U)]
    assert result(playlists.get("tv")) == M3U
    assert "tv" not in playlists._failing


def test_the_held_copy_is_served_without_asking_while_the_source_is_paused() -> None:
    clock, http = Clock(), FakeHTTP()
    playlists = make(http, clock, refresh=60.0)
    http.answers.append(FakeResponse(200, M3U))
    result(playlists.get("tv"))
    clock.advance(61)
    http.answers.append(FakeResponse(503, b"busy"))
    assert result(playlists.get("tv")) == M3U  # stale, with a warning
    for _ in range(9):
        clock.advance(0.5)
        assert result(playlists.get("tv")) == M3U
    assert len(http.requests) == 2  # paused for 5 s: not asked
    clock.advance(0.5)
    http.answers.append(FakeResponse(304))
    assert result(playlists.get("tv")) == M3U
    assert len(http.requests) == 3


def test_concurrent_requests_share_one_fetch() -> None:
    clock, http = Clock(), FakeHTTP()
    playlists = make(http, clock)
    http.answers.append(None)
    first, second = playlists.get("tv"), playlists.get("tv")
    assert len(http.requests) == 1
    http.pending[0].callback(FakeResponse(200, M3U))
    assert result(first) == M3U and result(second) == M3U
    assert clock.getDelayedCalls() == []  # the timeout was cancelled


def test_unknown_name_and_names() -> None:
    playlists = Playlists([("b", "/x"), ("a", "http://y/")], FakeHTTP(), Clock(), refresh=1, timeout=1)
    assert playlists.names() == ["a", "b"]
    with pytest.raises(UnknownPlaylist):
        playlists.get("c")


def test_file_sources(tmp_path: Any) -> None:
    path = tmp_path / "tv.m3u"
    path.write_bytes(M3U)
    clock = Clock()
    playlists = Playlists([("tv", str(path)), ("gone", str(tmp_path / "none"))], FakeHTTP(), clock, refresh=60, timeout=1)
    assert result(playlists.get("tv")) == M3U
    path.write_bytes(M3U + b"#2\n")
    assert result(playlists.get("tv")) == M3U  # cached
    clock.advance(60)
    assert result(playlists.get("tv")) == M3U + b"#2\n"
    path.unlink()
    clock.advance(60)
    assert result(playlists.get("tv")) == M3U + b"#2\n"  # stale
    with pytest.raises(PlaylistError, match="none cannot be read"):
        result(playlists.get("gone"))


def test_errors_name_the_source_without_its_credentials_or_query() -> None:
    clock, http = Clock(), FakeHTTP()
    playlists = Playlists([("tv", "http://user:pw@src:81/tv.m3u?key=secret")], http, clock, refresh=1, timeout=1)
    http.answers.append(FakeResponse(403, b"no"))
    with pytest.raises(PlaylistError) as caught:
        result(playlists.get("tv"))
    assert str(caught.value) == "playlist source http://src:81/tv.m3u answered HTTP 403"
    assert http.requests[0][0] == "http://user:pw@src:81/tv.m3u?key=secret"
