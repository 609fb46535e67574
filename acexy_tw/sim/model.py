"""
The simulated engine's knobs (:class:`Behaviour`) and records (:class:`SimSession`).

Kept apart from the HTTP code so tests can read them as plain data: a test sets
``engine.behaviour.json_hang = True`` (or assigns a whole new ``Behaviour``) and
later inspects ``engine.sessions[...]`` without touching Twisted objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

if TYPE_CHECKING:  # pragma: no cover
    from acexy_tw.sim.playback import PlaybackStream


@dataclass
class Behaviour:
    """
    How the engine misbehaves; the defaults describe a well-behaved engine.

    The engine copies this object when a request arrives, so a change applies
    to requests arriving after it, never to one already being answered, and
    applies to every one of them: a failure here is persistent (for one that
    heals, see ``SimEngine.fail_next_playbacks``).
    """

    # getstream
    #: seconds to wait before answering getstream
    json_delay: float = 0.0
    #: never answer getstream (the connection stays open)
    json_hang: bool = False
    #: answer getstream with ``{"response": null, "error": json_error}`` (HTTP 200)
    json_error: Optional[str] = None
    #: a status other than 200 makes getstream answer a plain-text error page
    getstream_status: int = 200

    # playback
    #: a status other than 200 makes the playback URL answer an HTML error page
    playback_status: int = 200
    #: prebuffering: seconds before the playback response headers are sent
    playback_delay: float = 0.0
    #: never send the playback response headers
    playback_hang: bool = False
    #: send this many bytes (rounded down to whole packets), then go silent
    stall_after: Optional[int] = None
    #: send exactly this many bytes, then finish the response cleanly
    eof_after: Optional[int] = None
    #: send exactly this many bytes, then reset the TCP connection (0: reset
    #: right after the 200 response headers)
    reset_after: Optional[int] = None

    # HLS (``/ace/manifest.m3u8`` starts a session like getstream and obeys
    # the getstream knobs above; these are for its playlist and segments)
    #: a status other than 200 makes the playlist ``/ace/m/...m3u8`` answer a plain-text error page
    manifest_status: int = 200
    #: seconds to wait before answering a playlist request
    manifest_delay: float = 0.0
    #: a status other than 200 makes a segment ``/ace/c/...ts`` answer a plain-text error page
    segment_status: int = 200
    #: seconds to wait before answering a segment request
    segment_delay: float = 0.0
    #: send this many bytes of a segment (after the 200 headers), then go
    #: silent with the connection open
    segment_stall_after: Optional[int] = None
    #: lines put into every playlist after its header tags, and after its
    #: segments; ``{base}`` (the advertised ``http://host:port``),
    #: ``{infohash}``, ``{first}`` and ``{last}`` (the listed segment numbers)
    #: are filled in, e.g. ``'#EXT-X-MAP:URI="{base}/ace/c/{infohash}/{last}.ts"'``
    playlist_head: Tuple[str, ...] = ()
    playlist_tail: Tuple[str, ...] = ()

    # stop command
    #: a status other than 200 makes stop fail (the session keeps running)
    stop_status: int = 200
    #: never answer stop (the session keeps running)
    stop_hang: bool = False


@dataclass(eq=False)
class SimSession:
    """One engine session, created by a successful getstream."""

    playback_session_id: str
    #: which selector started it: content_id (also for ``id``), infohash, url or magnet
    selector: str
    #: the selector's value as the client sent it
    content_key: str
    infohash: str
    token: str
    #: the ``pid`` query parameter (the player id the proxy chose)
    pid: Optional[str]
    #: every query parameter of the getstream that created the session
    params: Dict[str, str]
    created_at: float
    stopped: bool = False
    #: stop commands received for this session (answered or not)
    stop_commands: int = 0
    #: stat_url requests for this session (also after stop)
    stat_requests: int = 0
    #: bytes written to all of its playback connections (and, for an HLS
    #: session, segment bytes of its content served while it was active)
    bytes_sent: int = 0
    #: playback connections that the client closed
    closed_by_peer: int = 0
    #: every playback request, open or ended, in arrival order
    playbacks: List["PlaybackStream"] = field(default_factory=list)
    #: started by ``/ace/manifest.m3u8`` (its playback_url is a playlist)
    hls: bool = False
    #: requests of its playlist ``/ace/m/<infohash>/<token>.m3u8``, counted on
    #: arrival whatever the answer (also after stop), plus direct
    #: ``/ace/manifest.m3u8`` requests it answered
    manifest_requests: int = 0
    #: reactor time of the last playlist request, or None
    last_manifest_at: Optional[float] = None
    #: segment requests ``/ace/c/<infohash>/<n>.ts`` for its content while it
    #: was active (any status; segments belong to the content, so every active
    #: HLS session of the same infohash counts them)
    segment_requests: int = 0
    #: of those, segments answered with their bytes
    segments_served: int = 0

    @property
    def open_playbacks(self) -> List["PlaybackStream"]:
        """Playback requests whose connection is still open."""
        return [p for p in self.playbacks if p.is_open]

    @property
    def prebuffering(self) -> bool:
        return self.bytes_sent == 0 and any(p.waiting for p in self.playbacks)
