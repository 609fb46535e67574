"""
Playlists (issue #13, point 1): M3U sources rewritten to play through this proxy.

``ACEXY_PLAYLISTS`` names sources (``name=URL-or-path``); ``GET
/ace/playlist/<name>.m3u`` answers the source with every AceStream entry
(``acestream://<id>``, a bare 40-hex id, any ``…/ace/getstream?…`` or
``…/ace/manifest.m3u8?…`` URL, whatever its host) replaced by this proxy's URL
for the same content. Every other byte — ``#EXTM3U``/``#EXTINF`` attributes,
``#EXTGRP``, comments, other URLs, line endings — is kept as it is.

:func:`rewrite` is pure. :class:`Playlists` fetches and caches the sources on
the injected clock with an injected treq client: bounded in time and size,
revalidated with ``ETag``/``Last-Modified`` after ``ACEXY_PLAYLIST_REFRESH``,
served stale (a warning) when the source fails and a copy is held.

A source that keeps failing is not asked on every request: after a failure it
is left alone for 5 s, then 10 s, 20 s … (at most ``refresh``, at most 5 min,
the one retry policy's backoff); meanwhile requests get the held copy, or the
same 502 at once. The first request after the pause asks again; an answer
ends the pause.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence
from urllib.parse import parse_qs, quote, urlencode, urlsplit

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from acexy_tw.content import BadRequest, parse_query
from acexy_tw.engine import EngineError, deadline, describe, discard_body, read_body
from acexy_tw.logs import get_logger
from acexy_tw.retry import RetryPolicy

__all__ = ["MAX_PLAYLIST_BYTES", "NotM3U", "PlaylistError", "Playlists", "UnknownPlaylist", "is_m3u", "rewrite", "shown"]

log = get_logger(__name__)

#: Largest source accepted (a big IPTV list is a few MiB).
MAX_PLAYLIST_BYTES = 10 * 1024 * 1024

_LINE_RE = re.compile(rb"[^\r\n]*(?:\r\n|\n|\r)?")
_HEX40_RE = re.compile(rb"[0-9a-fA-F]{40}")
_ACESTREAM_RE = re.compile(rb"acestream://([0-9a-fA-F]{40})/?", re.IGNORECASE)
_ACE_PATHS = ("/ace/getstream", "/ace/getstream/", "/ace/manifest.m3u8")


class PlaylistError(Exception):
    """The source could not be had and no copy is held (502)."""


class NotM3U(PlaylistError):
    """The source answered something that is not an M3U playlist (502)."""


class UnknownPlaylist(KeyError):
    """No playlist of that name is configured (404)."""


def shown(source: str) -> str:
    """A source as named in errors and logs: a URL without its credentials,
    query or fragment (either may hold a key), a path as it is."""
    if not source.startswith(("http://", "https://")):
        return source
    parts = urlsplit(source)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}"


def is_m3u(body: bytes) -> bool:
    """An M3U starts with ``#EXTM3U`` (after an optional BOM and blank space)."""
    head = body[:4096]
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:]
    return head.lstrip().startswith(b"#EXTM3U")


def _entry_params(entry: bytes) -> Optional[list[tuple[str, str]]]:
    """The proxy query parameters for an AceStream entry, or None to keep it."""
    m = _ACESTREAM_RE.fullmatch(entry)
    if m is not None:
        return [("id", m.group(1).decode("ascii").lower())]
    if _HEX40_RE.fullmatch(entry):
        return [("id", entry.decode("ascii").lower())]
    try:
        text = entry.decode("utf-8")
        parts = urlsplit(text)
    except (UnicodeDecodeError, ValueError):
        return None
    if parts.scheme.lower() not in ("http", "https") or parts.path not in _ACE_PATHS:
        return None
    args = {k.encode(): [v.encode() for v in vs] for k, vs in parse_qs(parts.query, keep_blank_values=True).items()}
    try:
        key = parse_query(args)
    except BadRequest:
        return None
    selector = "id" if key.key_type == "content_id" else key.key_type
    return [(selector, key.value), *sorted(key.extras + key.options)]


def rewrite(body: bytes, base: str, *, token: Optional[str] = None, hls: bool = False) -> bytes:
    """
    ``body`` (an M3U) with its AceStream entries pointing at ``base`` (this
    proxy's URL, no trailing slash): ``/ace/getstream?id=…`` or, with ``hls``,
    ``/ace/manifest.m3u8?id=…``, then ``&token=`` (URL-encoded) when given.
    Lines starting with ``#``, blank lines and other URLs are kept byte for byte,
    and so are each line's ending and the blanks around an entry.
    """
    route = "/ace/manifest.m3u8" if hls else "/ace/getstream"
    suffix = "&token=" + quote(token, safe="") if token else ""
    out: list[bytes] = []
    for m in _LINE_RE.finditer(body):
        line = m.group(0)
        if not line:
            continue
        content = line.rstrip(b"\r\n")
        ending = line[len(content):]
        entry = content.strip()
        if not entry or entry.startswith(b"#"):
            out.append(line)
            continue
        params = _entry_params(entry)
        if params is None:
            out.append(line)
            continue
        start = content.index(entry)
        url = f"{base}{route}?{urlencode(params)}{suffix}".encode("utf-8")
        out.append(content[:start] + url + content[start + len(entry):] + ending)
    return b"".join(out)


@dataclass
class _Cached:
    body: bytes
    fetched_at: float
    etag: Optional[bytes] = None
    last_modified: Optional[bytes] = None


@dataclass
class _Failing:
    """A source's run of failures: its last error, and when it may be asked again."""

    error: PlaylistError
    failures: int
    until: float


class Playlists:
    """
    The configured sources: fetched on demand, cached for ``refresh`` seconds.

    ``get(name)`` fires with the source's bytes (an M3U); it fails with
    :class:`UnknownPlaylist`, or :class:`PlaylistError` when the source fails
    and no copy is held. One fetch per source at a time: concurrent requests
    wait for the same one.
    """

    def __init__(
        self,
        sources: Sequence[tuple[str, str]],
        http: Any,
        clock: IReactorTime,
        *,
        refresh: float,
        timeout: float,
        public_url: Optional[str] = None,
        max_bytes: int = MAX_PLAYLIST_BYTES,
    ) -> None:
        self._sources: Mapping[str, str] = dict(sources)
        self._http = http
        self._clock = clock
        self.refresh = refresh
        self.timeout = timeout
        self.public_url = public_url
        self.max_bytes = max_bytes
        self._cache: dict[str, _Cached] = {}
        self._inflight: dict[str, list[Deferred]] = {}
        self._failing: dict[str, _Failing] = {}
        #: the pause after each further failure of a source (attempts: unused, never spent)
        self.backoff = RetryPolicy(1, initial=5.0, factor=2.0, cap=max(5.0, min(refresh, 300.0)), jitter=lambda: 0.0)

    def names(self) -> list[str]:
        return sorted(self._sources)

    def fresh(self, name: str) -> bool:
        """A copy of ``name`` younger than ``refresh`` is held (served without asking the source)."""
        cached = self._cache.get(name)
        return cached is not None and self._clock.seconds() - cached.fetched_at < self.refresh

    def get(self, name: str) -> Deferred[bytes]:
        if name not in self._sources:
            raise UnknownPlaylist(name)
        if self.fresh(name):
            return succeed(self._cache[name].body)
        failing = self._failing.get(name)
        if failing is not None and self._clock.seconds() < failing.until:  # paused after a failure
            cached = self._cache.get(name)
            return succeed(cached.body) if cached is not None else fail(failing.error)
        waiter: Deferred[bytes] = Deferred()
        waiters = self._inflight.get(name)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        self._inflight[name] = [waiter]
        Deferred.fromCoroutine(self._refresh(name)).addBoth(self._settle, name)
        return waiter

    def _settle(self, result: Any, name: str) -> None:
        for waiter in self._inflight.pop(name, []):
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    async def _refresh(self, name: str) -> bytes:
        source = self._sources[name]
        cached = self._cache.get(name)
        try:
            fresh = await self._load(source, cached)
        except PlaylistError as e:
            self._failed(name, e)
            if cached is None:
                raise
            log.warn(
                "playlist {name}: source failed ({reason}); serving the copy from {age:.0f}s ago",
                name=name,
                reason=str(e),
                age=self._clock.seconds() - cached.fetched_at,
            )
            return cached.body
        self._failing.pop(name, None)
        if fresh is None:  # 304: the copy is current
            assert cached is not None
            cached.fetched_at = self._clock.seconds()
            return cached.body
        self._cache[name] = fresh
        return fresh.body

    def _failed(self, name: str, error: PlaylistError) -> None:
        failures = self._failing[name].failures + 1 if name in self._failing else 1
        pause = self.backoff.delay(failures)
        self._failing[name] = _Failing(error, failures, self._clock.seconds() + pause)
        log.info("playlist {name}: source not asked again for {pause:g}s", name=name, pause=pause)

    async def _load(self, source: str, cached: Optional[_Cached]) -> Optional[_Cached]:
        """The source's new content, or None when it says the copy is current."""
        if source.startswith(("http://", "https://")):
            entry = await self._fetch(source, cached)
        else:
            entry = _Cached(self._read_file(source), self._clock.seconds())
        if entry is not None and not is_m3u(entry.body):
            raise NotM3U(f"playlist source {shown(source)} is not an M3U playlist (no #EXTM3U)")
        return entry

    def _read_file(self, path: str) -> bytes:
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size > self.max_bytes:
                    raise PlaylistError(f"playlist source {path} is larger than {self.max_bytes} bytes")
                body = f.read(self.max_bytes + 1)
        except OSError as e:
            raise PlaylistError(f"playlist source {path} cannot be read: {e.strerror}") from None
        if len(body) > self.max_bytes:
            raise PlaylistError(f"playlist source {path} is larger than {self.max_bytes} bytes")
        return body

    def _fetch(self, source: str, cached: Optional[_Cached]) -> Deferred[Optional[_Cached]]:
        url = shown(source)

        def settle(result: Any, timed_out: bool) -> Any:
            if not isinstance(result, Failure):
                return result
            if timed_out:
                raise PlaylistError(f"playlist source {url} did not answer within {self.timeout:g}s")
            if result.check(PlaylistError):
                return result
            raise PlaylistError(f"playlist source {url} failed: {describe(result)}")

        return deadline(Deferred.fromCoroutine(self._get(source, cached)), self.timeout, self._clock, settle)

    async def _get(self, source: str, cached: Optional[_Cached]) -> Optional[_Cached]:
        url = shown(source)
        headers: dict[bytes, list[bytes]] = {}
        if cached is not None and cached.etag:
            headers[b"if-none-match"] = [cached.etag]
        if cached is not None and cached.last_modified:
            headers[b"if-modified-since"] = [cached.last_modified]
        response = await self._http.get(source, headers=headers, unbuffered=True, allow_redirects=True)
        if response.code == 304 and cached is not None:
            discard_body(response)
            return None
        if response.code != 200:
            discard_body(response)
            raise PlaylistError(f"playlist source {url} answered HTTP {response.code}")
        length = response.length
        if isinstance(length, int) and length > self.max_bytes:
            discard_body(response)
            raise PlaylistError(f"playlist source {url} is larger than {self.max_bytes} bytes")
        try:
            body = await read_body(response, self.max_bytes)
        except EngineError:
            raise PlaylistError(f"playlist source {url} is larger than {self.max_bytes} bytes") from None
        etag = response.headers.getRawHeaders(b"etag", [None])[0]
        modified = response.headers.getRawHeaders(b"last-modified", [None])[0]
        return _Cached(body, self._clock.seconds(), etag, modified)
