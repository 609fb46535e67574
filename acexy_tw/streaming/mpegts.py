"""
MPEG transport stream facts the proxy relies on.

Only what the relay needs: packet size, sync byte, the null packet used for
keepalive, and a cheap aligner that cuts an arbitrary byte stream into whole
packets without touching each packet in Python.
"""

from __future__ import annotations

from typing import List, Sequence, Union

#: what the aligner takes: a read, or a memoryview span of one
Buffer = Union[bytes, memoryview]

PACKET_SIZE = 188
SYNC_BYTE = 0x47
NULL_PID = 0x1FFF

#: A null packet (PID 0x1FFF, payload only, continuity counter 0): players
#: discard it, so a run of them keeps a connection alive without showing
#: anything.
NULL_PACKET = bytes([SYNC_BYTE, 0x1F, 0xFF, 0x10]) + b"\xff" * (PACKET_SIZE - 4)


def null_packets(count: int) -> bytes:
    """``count`` null packets in one piece (one write, one HTTP chunk)."""
    return NULL_PACKET * count


def is_null_packet(packet: bytes) -> bool:
    return (
        len(packet) == PACKET_SIZE
        and packet[0] == SYNC_BYTE
        and ((packet[1] & 0x1F) << 8 | packet[2]) == NULL_PID
    )


class SpanAligner:
    """
    Cuts a byte stream, given as runs of buffers, into whole 188-byte packets
    with at most one copy of each byte.

    It finds the first sync byte that another one follows a packet later,
    then trusts the framing; it is fed the pieces of one read at once (``bytes`` or
    ``memoryview`` slices, e.g. the spans of
    :class:`acexy_tw.streaming.chunked.ChunkedDecoder`): the whole packets are
    one join of the held-back tail and the pieces up to the last packet
    boundary, and a read that is exactly whole packets (nothing held back,
    one ``bytes``) is passed on as it is. Only the partial packet at the end
    (< 188 bytes) is kept, as ``bytes``.
    """

    __slots__ = ("_tail", "_synced", "dropped")

    def __init__(self) -> None:
        self._tail = b""
        self._synced = False
        #: bytes thrown away while looking for the first sync byte
        self.dropped = 0

    def feed(self, data: Buffer) -> bytes:
        """The whole packets now available (possibly ``b""``)."""
        return self.push((data,))

    def push(self, spans: Sequence[Buffer]) -> bytes:
        """The whole packets now available from the tail and ``spans``, as one ``bytes``."""
        tail = self._tail
        if not self._synced:
            only = spans[0] if not tail and len(spans) == 1 else None
            found = self._find_sync(only if type(only) is bytes else b"".join((tail, *spans)))
            if not self._synced:
                return b""
            parts: List[Buffer] = [found]
        elif tail:
            parts = [tail, *spans]
        else:
            parts = list(spans)
        total = 0
        for part in parts:
            total += len(part)
        keep = total % PACKET_SIZE
        if keep:
            held: List[Buffer] = []
            while keep:
                last = parts.pop()
                size = len(last)
                if size <= keep:
                    held.append(last)
                    keep -= size
                else:
                    view = last if type(last) is memoryview else memoryview(last)
                    held.append(view[size - keep :])
                    parts.append(view[: size - keep])
                    keep = 0
            held.reverse()
            self._tail = b"".join(held)
        else:
            self._tail = b""
        if len(parts) == 1 and type(parts[0]) is bytes:
            return parts[0]
        return b"".join(parts)

    def pending(self) -> int:
        return len(self._tail)

    def flush(self) -> bytes:
        """Whatever is held back (a partial packet), e.g. at end of stream."""
        tail, self._tail = self._tail, b""
        return tail

    def _find_sync(self, data: bytes) -> bytes:
        """``data`` from the first confirmed sync byte on (synced), or b""
        with the unconfirmed rest kept as the tail."""
        self._tail = b""
        start = 0
        while True:
            i = data.find(SYNC_BYTE, start)
            if i < 0:
                self.dropped += len(data)
                return b""
            nxt = i + PACKET_SIZE
            if nxt >= len(data):
                # Not enough data to confirm with a second sync byte.
                self.dropped += i
                if len(data) - i >= PACKET_SIZE:  # exactly one packet: accept it
                    self._synced = True
                    return data[i:] if i else data
                self._tail = data[i:]
                return b""
            if data[nxt] == SYNC_BYTE:
                self._synced = True
                self.dropped += i
                return data[i:] if i else data
            start = i + 1
