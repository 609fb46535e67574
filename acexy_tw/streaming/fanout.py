"""
Fanout: the players of one session, and the flow policy over them.

Each piece is framed as an HTTP chunk once and handed to every player (they
send from one shared buffer). The flow policy is one property,
:attr:`Fanout.hold_engine`: the engine is held back only while *every* attached
player is paused. Keepalive (null packets while the session waits) goes through
here too, with each player's own wait clock for ``max_wait``. A player joining
a streaming session is first handed the session's fast-start cache
(:meth:`Fanout.replay`): PAT, PMT and the stream from the latest keyframe.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol as TypingProtocol

from acexy_tw.logs import get_logger
from acexy_tw.streaming.mpegts import null_packets
from acexy_tw.streaming.sink import chunk

__all__ = ["Fanout", "KEEPALIVE", "KEEPALIVE_CHUNK", "SinkLike"]

log = get_logger(__name__)

#: one keepalive write: 7 null packets (1316 bytes, the classic TS-over-UDP unit)
KEEPALIVE = null_packets(7)
KEEPALIVE_CHUNK = chunk(KEEPALIVE)


class SinkLike(TypingProtocol):
    """What the fan-out needs of a player (``ClientSink``)."""

    paused: bool
    peer: str
    bytes_sent: int

    def deliver(self, data: bytes, framed: Optional[bytes] = None) -> None: ...

    def end(self, clean: bool, error: Optional[BaseException]) -> None: ...


class Fanout:
    def __init__(self) -> None:
        self.sinks: list[SinkLike] = []
        self._paused: set[int] = set()
        self._waiting_since: dict[int, float] = {}
        #: bytes of players that already left
        self.bytes_out_done = 0

    def __len__(self) -> int:
        return len(self.sinks)

    def __bool__(self) -> bool:
        return bool(self.sinks)

    @property
    def bytes_out(self) -> int:
        return self.bytes_out_done + sum(s.bytes_sent for s in self.sinks)

    @property
    def hold_engine(self) -> bool:
        """The flow-control policy: hold the engine back only while every player is paused."""
        return bool(self.sinks) and len(self._paused) >= len(self.sinks)

    def add(self, sink: SinkLike) -> None:
        self.sinks.append(sink)
        if sink.paused:
            self._paused.add(id(sink))

    def remove(self, sink: SinkLike) -> bool:
        """Forget ``sink``; False if it was not attached."""
        if sink not in self.sinks:
            return False
        self.sinks.remove(sink)
        self._paused.discard(id(sink))
        self._waiting_since.pop(id(sink), None)
        self.bytes_out_done += sink.bytes_sent
        return True

    def set_paused(self, sink: SinkLike, paused: bool) -> None:
        if paused:
            self._paused.add(id(sink))
        else:
            self._paused.discard(id(sink))

    def deliver(self, piece: bytes) -> None:
        if not self.sinks:
            return
        framed = chunk(piece)  # framed once, shared by every player
        for sink in tuple(self.sinks):
            sink.deliver(piece, framed)

    def replay(self, sink: SinkLike, cache: Any) -> int:
        """
        Give a joining ``sink`` (attached already) the stream from the
        session's latest keyframe (``cache``, a
        :class:`~acexy_tw.streaming.joiner.FastStart`), as pieces it delivers
        like live ones: what its transport will not take yet is backlog in the
        sink, under its flow control and caps like any backlog. Nothing when
        no keyframe is held, or when the cache is more than the player may
        ever be behind (it would be cut at once): it starts at the live edge.
        Returns the bytes handed over.
        """
        size = cache.cached_bytes
        if not size or size > getattr(sink, "max_backlog", size):
            return 0
        for piece in cache.snapshot():
            sink.deliver(piece)
            if getattr(sink, "ended", False):  # cut by its own cap or by the budget
                break
        return size

    def keepalive(self, now: float, max_wait: float, what: str) -> None:
        """Null packets for every player; those held past ``max_wait`` get a
        clean end (they got packets: their player retries)."""
        for sink in tuple(self.sinks):
            since = self._waiting_since.setdefault(id(sink), now)
            if now - since >= max_wait:
                log.info("player {peer} waited {s:g}s for {what}: letting it go", peer=sink.peer, s=max_wait, what=what)
                sink.end(True, None)
            else:
                sink.deliver(KEEPALIVE, KEEPALIVE_CHUNK)

    def stop_waiting(self) -> None:
        """Real data again: every player's wait clock starts afresh next time."""
        self._waiting_since.clear()

    def end_all(self, clean: bool, error: Optional[BaseException]) -> list[SinkLike]:
        """Every player gets its ending; returns those that did not detach themselves."""
        for sink in tuple(self.sinks):
            sink.end(clean, error)
        return list(self.sinks)
