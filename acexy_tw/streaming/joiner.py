"""
Fast start: a player joining a running session gets a picture at once.

A joiner that started at the live edge would land in the middle of a GOP and
see nothing until the next keyframe (2-5 s on typical channels). So each live
session keeps a :class:`FastStart`: the stream from its latest random access
point (RAP) on, plus the PAT and PMT in force there. A joiner is handed, in
this order, that PAT and PMT, the cached packets from the RAP, then the live
pieces — the cache holds exactly the pieces fed so far (from the RAP on) and a
player attaches between two pieces, so the hand-over is at a packet boundary
with no packet missing or repeated.

What counts as a RAP: the first packet of a PES on the video PID (the PID of
the PMT's first H.264 0x1B, HEVC 0x24 or MPEG-2 0x02/0x01 stream, from PAT →
PMT) that either has the adaptation field's ``random_access_indicator`` set
or, when the muxer sets none, carries a keyframe:

- H.264: the first slice NAL unit is an IDR (type 5); AUD, SEI, SPS and PPS
  before it are skipped; a non-IDR slice (1-4) first means no. If the probe
  runs out (:data:`PROBE_LIMIT` bytes of PES without a slice), a PES that
  began with an SPS (7) is taken for one.
- HEVC: the first VCL NAL unit is an IRAP (types 16-21).
- MPEG-2: the first picture header has picture_coding_type 1 (I).

Once the flag has been seen on the video PID the muxer is trusted: an
unflagged PES start is no RAP, and its video is not looked at.

The NAL units may start in a later packet than the PES (a long SEI, a large
adaptation field, a PES header split over two packets, and any of it split
over two pieces): a *probe* then collects the PES's first bytes from the
following video packets, and if it says yes the cache starts at the PES's
first packet, kept meanwhile.

Cost: a piece is scanned by its packet headers only — ``piece[1::188]``, one
C-level slice, then ``bytes.find`` for the PUSI flag with the high bits of
the video PID — so Python runs once per PES start of that PID (and of a PID
sharing its high byte), never per packet; the latest PAT and PMT of a piece
are found with two ``rfind`` and copied only for a RAP, and compared with the
tables every :data:`PSI_CHECK` pieces. Measured on the simulated stream (25
video frames and ~10 audio PES a second at a nominal 4 Mbit/s, so denser in
PES starts per byte than a real channel): 0.10-0.12 CPU s/GB in a tight loop
over 64-256 KiB pieces with flagged keyframes, 0.16-0.19 when the NAL units
must be read; 0.17 s/GB measured inside a running proxy (flagged).

Bounds: the cache never holds more than ``cap`` bytes (4 MiB by default):
a GOP that would grow it past the cap drops it until the next RAP. Its bytes
are charged to the proxy's :class:`~acexy_tw.streaming.budget.BacklogBudget`
(``ACEXY_MAX_BACKLOG``) as a holder like any player; when the budget must
cut, a cache as big as the furthest-behind player goes first (:meth:`cut`
drops it until the next RAP: joiners start at the live edge meanwhile, no
one is disconnected). :meth:`reset` (failover, close) releases everything.

Pieces are kept by reference (a piece fed here is also what every player's
backlog holds), only the piece a RAP falls inside is copied from the RAP on;
a piece that is not ``bytes`` (a memoryview) is copied once.

Not covered (joiners start at the live edge as before): a stream without a
video PID in its PMT, and PSI sections that do not fit in one packet.
"""

from __future__ import annotations

from typing import Any, Optional

from acexy_tw.logs import get_logger
from acexy_tw.streaming.budget import BacklogBudget
from acexy_tw.streaming.mpegts import PACKET_SIZE, SYNC_BYTE

__all__ = ["FastStart", "FAST_START_CAP", "PROBE_LIMIT", "VIDEO_STREAM_TYPES", "keyframe"]

log = get_logger(__name__)


#: bytes a session's cache may hold by default (ACEXY_FAST_START; 0: fast start off)
FAST_START_CAP = 4 * 1024 * 1024
#: bytes of a PES (header included) looked at to decide whether it is a keyframe
PROBE_LIMIT = 2048

#: PMT stream_type → codec of the video streams we can find keyframes in
VIDEO_STREAM_TYPES = {0x1B: "h264", 0x24: "hevc", 0x02: "mpeg2", 0x01: "mpeg2"}

PAT_PID = 0x0000
#: pieces between two looks at whether the PAT or PMT changed (a new video PID is followed from then on)
PSI_CHECK = 16
_PUSI = 0x40
#: byte 1 of a packet without transport_error_indicator and transport_priority
_HEADER_MASK = bytes(b & 0x5F for b in range(256))
_RAI = 0x40


# -- keyframes in the first bytes of a video PES ---------------------------------------


def keyframe(codec: str, pes: bytes, final: bool = False) -> Optional[bool]:
    """
    Whether the PES that begins with ``pes`` (its first bytes, header
    included) starts with a keyframe: True, False, or None when more bytes
    are needed (never None when ``final``).
    """
    return _verdict(codec, pes, 0, final)


def _verdict(codec: str, buf: bytes, pos: int, final: bool) -> Optional[bool]:
    """:func:`keyframe` for the PES that begins at ``buf[pos]`` (no copy)."""
    if len(buf) < pos + 9:
        return False if final else None
    if not buf.startswith(b"\x00\x00\x01", pos):
        return False  # not a PES start
    head = pos + 9 + buf[pos + 8]
    if len(buf) < head:
        return False if final else None
    if codec == "h264":
        return _h264(buf, head, final)
    if codec == "hevc":
        return _hevc(buf, head, final)
    return _mpeg2(buf, head, final)


def _h264(es: bytes, start: int, final: bool) -> Optional[bool]:
    sps = False
    last = len(es) - 3
    j = es.find(b"\x00\x00\x01", start)
    while 0 <= j < last:
        nal = es[j + 3] & 0x1F
        if nal == 5:
            return True
        if 1 <= nal <= 4:
            return False
        if nal == 7:
            sps = True
        j = es.find(b"\x00\x00\x01", j + 3)
    return sps if final else None


def _hevc(es: bytes, start: int, final: bool) -> Optional[bool]:
    last = len(es) - 3
    j = es.find(b"\x00\x00\x01", start)
    while 0 <= j < last:
        nal = es[j + 3] >> 1 & 0x3F
        if 16 <= nal <= 21:
            return True
        if nal < 16:
            return False
        j = es.find(b"\x00\x00\x01", j + 3)
    return False if final else None


def _mpeg2(es: bytes, start: int, final: bool) -> Optional[bool]:
    j = es.find(b"\x00\x00\x01\x00", start)  # picture_start_code
    if j >= 0 and j + 5 < len(es):
        return (es[j + 5] >> 3) & 0x07 == 1
    return False if final else None


# -- PSI -----------------------------------------------------------------------------


def _payload(packet: Any, o: int = 0) -> Optional[bytes]:
    """The payload of the packet at ``o`` (None: none)."""
    control = packet[o + 3] >> 4 & 0x3
    pos = o + 4
    if control & 0x2:
        pos += 1 + packet[o + 4]
    if not control & 0x1 or pos >= o + PACKET_SIZE:
        return None
    return bytes(packet[pos : o + PACKET_SIZE])


def _packet(at: Optional[tuple]) -> bytes:
    """The 188 bytes at (piece, offset), or nothing."""
    if at is None:
        return b""
    piece, o = at
    return bytes(piece[o : o + PACKET_SIZE])


def _section(packet: bytes, table_id: int) -> Optional[bytes]:
    """The whole PSI section a packet starts, if it fits in the packet."""
    payload = _payload(packet)
    if not payload:
        return None
    start = 1 + payload[0]
    section = payload[start:]
    if len(section) < 12 or section[0] != table_id:
        return None
    end = 3 + ((section[1] & 0x0F) << 8 | section[2])
    if end > len(section):
        return None
    return section[:end]


def _pmt_pid(pat: bytes) -> Optional[int]:
    section = _section(pat, 0x00)
    if section is None:
        return None
    for i in range(8, len(section) - 4 - 3, 4):
        if section[i] << 8 | section[i + 1]:  # program 0 is the network PID
            return (section[i + 2] & 0x1F) << 8 | section[i + 3]
    return None


def _video_stream(pmt: bytes) -> Optional[tuple[int, str]]:
    section = _section(pmt, 0x02)
    if section is None:
        return None
    pos = 12 + ((section[10] & 0x0F) << 8 | section[11])
    end = len(section) - 4
    while pos + 5 <= end:
        codec = VIDEO_STREAM_TYPES.get(section[pos])
        if codec is not None:
            return (section[pos + 1] & 0x1F) << 8 | section[pos + 2], codec
        pos += 5 + ((section[pos + 3] & 0x0F) << 8 | section[pos + 4])
    return None


# -- the cache -------------------------------------------------------------------------


class _Probe:
    """A video PES start that may be a keyframe: its first bytes so far, and the
    stream from its first packet on (until the end of the last piece) while that
    is undecided."""

    __slots__ = ("pes", "pieces", "size", "psi")

    def __init__(self, pes: bytes, psi: bytes) -> None:
        self.pes = pes
        self.pieces: list[Any] = []
        self.size = 0
        self.psi = psi


class FastStart:
    """The stream of one session from its latest random access point (see the module docstring)."""

    def __init__(self, *, cap: int = FAST_START_CAP, budget: Optional[BacklogBudget] = None, name: str = "?") -> None:
        self.cap = cap
        self.name = name
        #: bytes held (the budget's view of this holder): the cache and a pending probe
        self.backlog_bytes = 0
        self.pmt_pid: Optional[int] = None
        self.video_pid: Optional[int] = None
        self.codec: Optional[str] = None
        #: RAPs found / caches dropped past the cap / dropped by the budget
        self.raps = 0
        self.overflows = 0
        self.cuts = 0
        self._budget = budget
        self._pieces: list[Any] = []
        self._cached = 0
        self._psi = b""  # the PAT and PMT in force at the cached RAP
        self._pat: Optional[bytes] = None  # the tables as last looked at
        self._pmt: Optional[bytes] = None
        # where the latest PAT and PMT packets are (piece, offset): copied
        # when a RAP needs them, compared with the tables every PSI_CHECK pieces
        self._pat_at: Optional[tuple] = None
        self._pmt_at: Optional[tuple] = None
        self._psi_check = 0
        #: the muxer flags keyframes (random_access_indicator seen on the video PID): trust it
        self.flags_keyframes = False
        self._probe: Optional[_Probe] = None

    def __repr__(self) -> str:
        return f"<FastStart {self.name} {self.codec} pid={self.video_pid} cached={self._cached}/{self.cap}>"

    # -- what a joiner gets --------------------------------------------------------------

    @property
    def cached_bytes(self) -> int:
        """Bytes a joiner would get now (PAT and PMT included); 0: no RAP held."""
        return len(self._psi) + self._cached if self._pieces else 0

    def snapshot(self) -> list[bytes]:
        """The PAT and PMT in force at the RAP, then the stream from it up to
        the last piece fed; ``[]`` when no RAP is held."""
        if not self._pieces:
            return []
        out = [self._psi] if self._psi else []
        return out + [p if isinstance(p, bytes) else bytes(p) for p in self._pieces]

    # -- the budget's holder interface ---------------------------------------------------

    def cut(self, reason: str) -> None:
        """The budget needs the memory: drop the cache until the next RAP."""
        if not self.backlog_bytes:
            return
        self.cuts += 1
        log.info("dropping the fast-start cache of {name}: {reason}", name=self.name, reason=reason)
        self._drop()

    # -- lifecycle -----------------------------------------------------------------------

    def reset(self) -> None:
        """A new engine stream (failover) or the end: forget everything, release the budget."""
        self._drop()
        self._pat = self._pmt = self._pat_at = self._pmt_at = None
        self.pmt_pid = self.video_pid = self.codec = None
        self.flags_keyframes = False

    def _drop(self) -> None:
        """Forget the cache and any probe, and give their bytes back to the budget."""
        if self._budget is not None and self.backlog_bytes:
            self._budget.release(self)
        self.backlog_bytes = 0
        self._pieces = []
        self._cached = 0
        self._psi = b""
        self._probe = None

    def _account(self) -> None:
        """Tell the budget what is held now (moving on to a newer RAP is churn: no trim)."""
        held = len(self._psi) + self._cached + (self._probe.size if self._probe is not None else 0)
        old, self.backlog_bytes = self.backlog_bytes, held
        if self._budget is not None and held != old:
            self._budget.resize(self, old)  # may cut() this very cache

    # -- the data path -------------------------------------------------------------------

    def feed(self, piece: Any) -> None:
        """The next piece of the engine's stream (whole packets), before the players get it."""
        size = len(piece)
        if not size:
            return
        if size % PACKET_SIZE:  # only an engine's last piece is cut mid-packet: nothing to join any more
            self.reset()
            return
        if type(piece) is not bytes:  # one copy (2 us per 64 KiB) beats a strided memoryview's (5 us)
            piece = bytes(piece)
        count = size // PACKET_SIZE
        header = bytes(piece[1::PACKET_SIZE]).translate(_HEADER_MASK)
        first = 0
        if self.video_pid is None:  # learning the tables: the RAPs count from the PMT on
            first = self._learn(piece, header, count)
        #: where the newest RAP starts: ("here", packet index, psi) or ("probe", probe)
        rap: Optional[tuple] = None
        probe = self._probe  # a PES start from an earlier piece, still undecided
        began: Optional[int] = None  # packet index where ``probe`` began, if in this piece
        walked = first  # the probe has seen the video packets before this index
        pid = self.video_pid
        if pid is not None:
            codec = self.codec or ""
            value, low = pid >> 8 | _PUSI, pid & 0xFF
            index = header.find(value, first)
            while index >= 0:
                o = index * PACKET_SIZE
                if piece[o + 2] != low or piece[o] != SYNC_BYTE:  # another PID with the same high bits
                    index = header.find(value, index + 1)
                    continue
                if probe is not None:  # a PES start ends the probe of the previous one
                    verdict = self._walk(probe, piece, header, walked, index)
                    if verdict is None:
                        verdict = bool(keyframe(codec, probe.pes, True))
                    if verdict:
                        self.raps += 1
                        rap = ("probe", probe) if began is None else ("here", began, self._pat_pmt(probe.psi))
                    probe = began = None
                walked = index + 1
                if piece[o + 3] & 0x20 and piece[o + 4] and piece[o + 5] & _RAI:
                    self.flags_keyframes = True
                    self.raps += 1
                    rap = ("here", index, None)
                elif not self.flags_keyframes:  # a muxer that flags keyframes is trusted: no flag, no keyframe
                    verdict, pes = self._pes_start(codec, piece, o)
                    if verdict:
                        self.raps += 1
                        rap = ("here", index, None)
                    elif verdict is None:
                        probe, began = _Probe(pes, self._psi_at(piece, header, index)), index
                index = header.find(value, index + 1)
            if probe is not None:
                verdict = self._walk(probe, piece, header, walked, count)
                if verdict is not None:
                    if verdict:
                        self.raps += 1
                        rap = ("probe", probe) if began is None else ("here", began, self._pat_pmt(probe.psi))
                    probe = began = None
            if rap is not None and rap[0] == "here" and rap[2] is None:
                rap = ("here", rap[1], self._pat_pmt(self._psi_at(piece, header, rap[1])))
        self._probe = probe
        self._keep(piece, rap)
        if probe is not None:  # still undecided: keep the stream from its first packet on
            kept = piece if not began else bytes(piece[began * PACKET_SIZE :])
            probe.pieces.append(kept)
            probe.size += len(kept)
            if probe.size > self.cap:  # its video packets never came
                self._probe = probe = None
        if self._pieces and len(self._psi) + self._cached + (probe.size if probe is not None else 0) > self.cap:
            self.overflows += 1
            log.debug("fast-start cache of {name} over {cap} bytes: dropped until the next RAP", name=self.name, cap=self.cap)
            self._pieces = []
            self._cached = 0
            self._psi = b""
        self._pat_at, self._pmt_at = self._psi_at(piece, header, count)
        self._psi_check -= 1
        if self._psi_check <= 0 and self.video_pid is not None:
            self._look_at_psi()  # (a change applies from the next piece on)
        self._account()

    # -- the steps of feed ---------------------------------------------------------------

    def _last(self, piece: Any, header: bytes, pid: Optional[int], end: int) -> Optional[tuple]:
        """(piece, offset) of the last section start of ``pid`` before packet ``end``, if any."""
        if pid is None:
            return None
        value, low = pid >> 8 | _PUSI, pid & 0xFF
        i = header.rfind(value, 0, end)
        while i >= 0:
            o = i * PACKET_SIZE
            if piece[o + 2] == low and piece[o] == SYNC_BYTE:
                return piece, o
            i = header.rfind(value, 0, i)
        return None

    def _psi_at(self, piece: Any, header: bytes, index: int) -> tuple:
        """Where the latest PAT and PMT before packet ``index`` of ``piece`` are."""
        pat = self._last(piece, header, PAT_PID, index) or self._pat_at
        pmt = self._last(piece, header, self.pmt_pid, index) or self._pmt_at
        return pat, pmt

    def _learn(self, piece: Any, header: bytes, count: int) -> int:
        """No video PID yet: follow the PAT and PMT in this piece. Returns the
        packet index after the first PMT naming a video stream (``count``: none)."""
        index = 0
        while self.video_pid is None:
            pids = [p for p in (PAT_PID, self.pmt_pid) if p is not None]
            nxt = None
            for p in pids:
                value, low = p >> 8 | _PUSI, p & 0xFF
                i = header.find(value, index)
                while i >= 0 and (piece[i * PACKET_SIZE + 2] != low or piece[i * PACKET_SIZE] != SYNC_BYTE):
                    i = header.find(value, i + 1)
                if i >= 0 and (nxt is None or i < nxt[0]):
                    nxt = (i, p)
            if nxt is None:
                return count
            i, p = nxt
            if p == PAT_PID:
                self._pat_at = (piece, i * PACKET_SIZE)
            else:
                self._pmt_at = (piece, i * PACKET_SIZE)
            self._look_at_psi()
            index = i + 1
        return index

    def _walk(self, probe: _Probe, piece: Any, header: bytes, start: int, end: int) -> Optional[bool]:
        """Give the probe the payloads of the video packets in [start, end): its verdict, if any."""
        pid = self.video_pid
        assert pid is not None
        value, low = pid >> 8, pid & 0xFF  # a continuation packet: PUSI clear
        codec = self.codec or ""
        i = header.find(value, start, end)
        while i >= 0:
            o = i * PACKET_SIZE
            if piece[o + 2] == low:
                payload = _payload(piece, o)
                if payload:
                    probe.pes += payload
                    verdict = keyframe(codec, probe.pes, len(probe.pes) >= PROBE_LIMIT)
                    if verdict is not None:
                        return verdict
            i = header.find(value, i + 1, end)
        return None

    @staticmethod
    def _pes_start(codec: str, piece: Any, o: int) -> tuple[Optional[bool], bytes]:
        """Is the (unflagged) video PES starting at ``o`` a keyframe (None: its
        next packets will tell; then its first bytes so far)?"""
        packet = bytes(piece[o : o + PACKET_SIZE])  # (no copy of a bytes piece's slice but this one)
        control = packet[3] >> 4 & 0x3
        pos = 5 + packet[4] if control & 0x2 else 4
        if not control & 0x1 or pos >= PACKET_SIZE:
            return False, b""
        verdict = _verdict(codec, packet, pos, False)
        return verdict, (packet[pos:] if verdict is None else b"")

    def _pat_pmt(self, at: Optional[tuple] = None) -> bytes:
        """The latest PAT and PMT packets (or those at ``at``, a probe's (PAT, PMT) places)."""
        pat, pmt = at if at is not None else (self._pat_at, self._pmt_at)
        return _packet(pat) + _packet(pmt)

    def _look_at_psi(self) -> bool:
        """Compare the latest PAT and PMT with the tables followed; True if the
        PIDs followed changed (the cache and any probe are gone then)."""
        self._psi_check = PSI_CHECK
        changed = False
        pat = _packet(self._pat_at)
        if pat and (self._pat is None or self._pat[4:] != pat[4:]):  # not just the continuity counter
            self._pat = pat
            pmt_pid = _pmt_pid(pat)
            if pmt_pid != self.pmt_pid:
                self.pmt_pid = pmt_pid
                self._pmt = self._pmt_at = None
                self._set_video(None)
                changed = True
        pmt = _packet(self._pmt_at)
        if pmt and (self._pmt is None or self._pmt[4:] != pmt[4:]):
            self._pmt = pmt
            changed = self._set_video(_video_stream(pmt)) or changed
        return changed

    def _set_video(self, video: Optional[tuple[int, str]]) -> bool:
        pid, codec = video if video is not None else (None, None)
        if pid is not None and pid == self.pmt_pid:
            pid = codec = None
        if (pid, codec) == (self.video_pid, self.codec):
            return False
        self.video_pid, self.codec = pid, codec
        self.flags_keyframes = False
        self._drop()  # a cache of another video stream is no use
        return True

    def _keep(self, piece: Any, rap: Optional[tuple]) -> None:
        """Move the cache on to a new RAP, or add the piece to it (the cap is checked after)."""
        if rap is None:
            if not self._pieces:
                return
            self._pieces.append(piece)
            self._cached += len(piece)
        elif rap[0] == "probe":
            probe = rap[1]
            self._psi = self._pat_pmt(probe.psi)
            self._pieces = probe.pieces + [piece]
            self._cached = probe.size + len(piece)
        else:
            _, index, psi = rap
            kept = piece if index == 0 else bytes(piece[index * PACKET_SIZE :])
            self._psi = psi
            self._pieces = [kept]
            self._cached = len(kept)
