"""
The live HLS stream of one content in the simulated engine.

A real engine serves HLS per content: ``/ace/m/<infohash>/<token>.m3u8`` is a
live media playlist whose entries are absolute URLs of segments
``/ace/c/<infohash>/<n>.ts`` that belong to the content, not to the session.
:class:`HlsStream` is that content's timeline and segment store, free of
Twisted: the engine passes the reactor's time in.

Timeline.  Segment ``n`` covers the stream time ``[T(n), T(n+1))`` where
``T(k)`` is ``k * segment_duration`` rounded up to the stream's PSI cadence
(80 ms), so that every segment can start with a PAT and a PMT; with the default
2 s the durations are exact.  When the stream is created ``window`` segments
are already complete (as if the live stream had been running), and one more
completes each segment duration of reactor time.  The playlist lists the
newest ``window`` complete segments; a segment can be fetched while it is one
of the newest ``2 * window`` (older ones, and ones not complete yet, are
gone / unknown: the engine answers 404).

Segments.  One :class:`~acexy_tw.sim.tsgen.TSGenerator` per stream, at the
stream's bitrate, is cut at PAT packets into segments, so a segment starts
with PAT, PMT, then PES data, and consecutive segments continue timestamps and
continuity counters.  Segments are made lazily, in order, when first asked for
(starting from the oldest one the playlist lists at that moment, so timestamps
start near 0 for the first client) and kept while they can be fetched.  A
request that jumps further ahead than the retention (nobody fetched anything
for a long time) restarts the generator there: timestamps restart, as they
would for a player after a long gap anyway.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from acexy_tw.sim.tsgen import CLOCK_HZ, PAT_PID, PSI_INTERVAL, TSGenerator
from acexy_tw.streaming.mpegts import PACKET_SIZE

__all__ = ["HlsStream", "MIN_SEGMENT_DURATION", "playlist_segment_url"]

#: Shortest segment duration accepted (the PSI cadence is 80 ms).
MIN_SEGMENT_DURATION = 0.1
_PACKET_BITS = PACKET_SIZE * 8
#: Packets generated at a time while looking for a cut.
_GENERATE_STEP = 256


def playlist_segment_url(base: str, infohash: str, n: int) -> str:
    """``<base>/ace/c/<infohash>/<n>.ts``; ``base`` is ``http://host:port``."""
    return f"{base}/ace/c/{infohash}/{n}.ts"



def check_timing(segment_duration: float, window: int, prefix: str = "") -> None:
    """ValueError naming ``prefix + "segment_duration"`` / ``"window"`` when out of range."""
    if segment_duration < MIN_SEGMENT_DURATION:
        raise ValueError(f"{prefix}segment_duration must be at least {MIN_SEGMENT_DURATION} s")
    if window < 1:
        raise ValueError(f"{prefix}window must be at least 1")


class HlsStream:
    """
    The live HLS timeline and segments of one content (infohash).

    :param infohash: the content.
    :param bitrate: bit/s of the segments' MPEG-TS.
    :param segment_duration: nominal seconds per segment (>= 0.1).
    :param window: segments listed by the playlist.
    :param started_at: the reactor time at which the stream starts.
    """

    def __init__(
        self,
        infohash: str,
        *,
        bitrate: int,
        segment_duration: float,
        window: int,
        started_at: float,
    ) -> None:
        check_timing(segment_duration, window)
        self.infohash = infohash
        self.bitrate = bitrate
        self.segment_duration = segment_duration
        self.window = window
        self.started_at = started_at
        self._duration_ticks = round(segment_duration * CLOCK_HZ)
        #: segment requests for this content (any status)
        self.segment_requests = 0
        #: segments answered with their bytes
        self.segments_served = 0
        #: bytes of segments answered
        self.bytes_sent = 0
        # Generation state: the generator's time 0 is T(_origin); _buffer
        # holds its packets from slot _buffer_slot on; segment _next starts
        # at slot _cut.
        self._generator: Optional[TSGenerator] = None
        self._origin = 0
        self._buffer = bytearray()
        self._buffer_slot = 0
        self._next = 0
        self._cut = 0
        self._segments: Dict[int, bytes] = {}
        #: times the generator was (re)started, for tests
        self.generator_starts = 0

    # --- timeline ----------------------------------------------------------------

    def boundary_ticks(self, k: int) -> int:
        """``T(k)``: where segment ``k`` starts, in 27 MHz ticks of stream time."""
        return -(-k * self._duration_ticks // PSI_INTERVAL) * PSI_INTERVAL

    def duration(self, n: int) -> float:
        """Seconds of segment ``n`` (its ``#EXTINF``)."""
        return (self.boundary_ticks(n + 1) - self.boundary_ticks(n)) / CLOCK_HZ

    @property
    def target_duration(self) -> int:
        """``#EXT-X-TARGETDURATION``: the longest segment, rounded up."""
        longest = -(-self._duration_ticks // PSI_INTERVAL) * PSI_INTERVAL
        return max(1, -(-longest // CLOCK_HZ))

    def newest(self, now: float) -> int:
        """The newest complete segment at reactor time ``now``."""
        elapsed = max(0.0, now - self.started_at)
        stream_ticks = int(elapsed * CLOCK_HZ) + self.boundary_ticks(self.window)
        k = stream_ticks // self._duration_ticks + 1  # T(k) >= k * d > stream time
        while self.boundary_ticks(k) > stream_ticks:
            k -= 1
        return k - 1

    def media_sequence(self, now: float) -> int:
        """The first segment the playlist lists at ``now``."""
        return max(0, self.newest(now) - self.window + 1)

    def oldest_available(self, now: float) -> int:
        """The oldest segment that can still be fetched at ``now``."""
        return max(0, self.newest(now) - 2 * self.window + 1)

    def available(self, n: int, now: float) -> bool:
        return self.oldest_available(now) <= n <= self.newest(now)

    def playlist(self, now: float, base: str, head: Sequence[str] = (), tail: Sequence[str] = ()) -> str:
        """The live media playlist at ``now``, with absolute segment URLs on ``base``
        (``http://host:port``); ``head`` lines go after the header tags, ``tail``
        lines after the segments, with ``{base}``, ``{infohash}``, ``{first}``
        and ``{last}`` filled in."""
        first = self.media_sequence(now)
        last = self.newest(now)
        fields = {"{base}": base, "{infohash}": self.infohash, "{first}": str(first), "{last}": str(last)}

        def fill(line: str) -> str:
            for name, value in fields.items():
                line = line.replace(name, value)
            return line

        lines: List[str] = [
            "#EXTM3U",
            "#EXT-X-VERSION:3",
            f"#EXT-X-TARGETDURATION:{self.target_duration}",
            f"#EXT-X-MEDIA-SEQUENCE:{first}",
        ]
        lines.extend(fill(line) for line in head)
        for n in range(first, last + 1):
            lines.append(f"#EXTINF:{self.duration(n):.3f},")
            lines.append(playlist_segment_url(base, self.infohash, n))
        lines.extend(fill(line) for line in tail)
        return "\n".join(lines) + "\n"

    # --- segments ----------------------------------------------------------------

    def segment(self, n: int, now: float) -> Optional[bytes]:
        """The bytes of segment ``n``, or ``None`` if it cannot be fetched at
        ``now`` (too old, not complete yet, or never made)."""
        if not self.available(n, now):
            return None
        oldest = self.oldest_available(now)
        for old in [k for k in self._segments if k < oldest]:
            del self._segments[old]
        if n < self._next and self._generator is not None:
            return self._segments.get(n)
        if self._generator is None or n - self._next >= 2 * self.window:
            self._restart(min(n, self.media_sequence(now)))
        while self._next <= n:
            self._segments[self._next] = self._make_next()
            self._next += 1
        return self._segments[n]

    def discard(self) -> None:
        """Drop the generator and every segment (the content was stopped)."""
        self._generator = None
        self._buffer = bytearray()
        self._segments.clear()

    def _restart(self, origin: int) -> None:
        self._generator = TSGenerator(self.bitrate)
        self.generator_starts += 1
        self._segments.clear()
        self._origin = origin
        self._buffer = bytearray()
        self._buffer_slot = 0
        self._next = origin
        self._cut = self._find_pat(0)

    def _first_slot_at(self, ticks: int) -> int:
        return -(-ticks * self.bitrate // (_PACKET_BITS * CLOCK_HZ))

    def _make_next(self) -> bytes:
        ticks = self.boundary_ticks(self._next + 1) - self.boundary_ticks(self._origin)
        end = self._find_pat(self._first_slot_at(ticks))
        start = self._cut
        base = self._buffer_slot
        data = bytes(self._buffer[(start - base) * PACKET_SIZE : (end - base) * PACKET_SIZE])
        del self._buffer[: (end - base) * PACKET_SIZE]
        self._buffer_slot = end
        self._cut = end
        return data

    def _find_pat(self, slot: int) -> int:
        """The first slot at or after ``slot`` that holds a PAT (PID 0, payload
        unit start), generating packets as needed."""
        assert self._generator is not None
        while True:
            end = self._buffer_slot + len(self._buffer) // PACKET_SIZE
            if slot >= end:
                self._buffer += self._generator.packets(max(_GENERATE_STEP, slot - end + 1))
                continue
            offset = (slot - self._buffer_slot) * PACKET_SIZE
            b1, b2 = self._buffer[offset + 1], self._buffer[offset + 2]
            if b1 & 0x40 and ((b1 & 0x1F) << 8 | b2) == PAT_PID:
                return slot
            slot += 1
