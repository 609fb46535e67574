"""
MPEG transport stream facts the proxy relies on.

Only what the relay needs: packet size, sync byte, the null packet used for
keepalive, and a cheap aligner that cuts an arbitrary byte stream into whole
packets without touching each packet in Python.
"""

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


class PacketAligner:
    """
    Cuts a byte stream into whole 188-byte packets.

    The first sync is found by looking for a sync byte that is followed by
    another one a packet later (or by the end of the data seen so far); after
    that the stream is trusted to stay framed, so steady-state cost is one
    length check per chunk, plus one join when a chunk ends mid-packet.
    """

    __slots__ = ("_tail", "_synced", "dropped")

    def __init__(self) -> None:
        self._tail = b""
        self._synced = False
        #: bytes thrown away while looking for the first sync byte
        self.dropped = 0

    def feed(self, data: bytes) -> bytes:
        """Return the whole packets now available (possibly ``b""``)."""
        if self._tail:
            data = self._tail + data
            self._tail = b""
        if not self._synced:
            data = self._find_sync(data)
            if not self._synced:
                return b""
        extra = len(data) % PACKET_SIZE
        if extra:
            self._tail = data[-extra:]
            return data[:-extra]
        return data

    def pending(self) -> int:
        return len(self._tail)

    def flush(self) -> bytes:
        """Whatever is held back (a partial packet), e.g. at end of stream."""
        tail, self._tail = self._tail, b""
        return tail

    def _find_sync(self, data: bytes) -> bytes:
        start = 0
        while True:
            i = data.find(SYNC_BYTE, start)
            if i < 0:
                self.dropped += len(data)
                return b""
            nxt = i + PACKET_SIZE
            if nxt >= len(data):
                # Not enough data to confirm: keep from here and wait.
                if len(data) - i >= PACKET_SIZE:
                    # exactly one packet available: accept it
                    self._synced = True
                    self.dropped += i
                    return data[i:]
                self.dropped += i
                self._tail = data[i:]
                return b""
            if data[nxt] == SYNC_BYTE:
                self._synced = True
                self.dropped += i
                return data[i:]
            start = i + 1
