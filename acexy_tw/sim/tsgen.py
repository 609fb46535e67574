"""
A cheap generator of a real, valid MPEG transport stream.

The simulated engine needs bytes that a proxy can relay and that a player
(VLC, mpv, ffprobe) accepts, so a newcomer running the demo sees SMPTE colour
bars and hears silence instead of a decoder error.  Nothing here encodes
anything at run time:

- video is 160x90 colour bars at 25 fps in GOPs of ``gop`` seconds (default
  2 s): a keyframe starts each GOP and the other frames are predicted frames
  that repeat the picture. ``codec="mpeg2"`` (the default): the keyframe is one
  MPEG-2 intra frame (1.3 KB, with sequence and GOP headers), the others a
  63-byte P picture, both encoded once with ffmpeg and embedded below;
  ``codec="h264"``: the keyframe is an access unit delimiter, SPS, PPS and an
  IDR slice (NAL types 9, 7, 8, 5; libx264 baseline, embedded), the others an
  access unit delimiter and an all-skip P slice (NAL type 1) written here with
  the right ``frame_num``. Each frame is its own PES packet with a fresh PTS;
  the PES start of a keyframe carries the adaptation field's
  ``random_access_indicator`` unless ``random_access_indicator=False`` (a
  muxer that sets none: a reader must look at the NAL units or the picture
  header). ``gop=None`` makes every frame a keyframe (an all-intra stream);
- audio is MPEG-1 Layer II, 48 kHz mono 64 kbit/s, silent: a frame header and
  an all-zero body (every bit allocation zero = no samples = silence), four
  frames per PES packet;
- PAT and PMT are repeated every 80 ms, a PCR is sent every 40 ms in an
  adaptation-field-only packet on the PCR PID, continuity counters are kept per
  PID, and the rest of the requested bitrate is filled with null packets.

The multiplexer is constant-bitrate: packet ``i`` occupies the stream time
``i * 1504 / bitrate`` seconds, the PCR it carries is that time, and audio and
video are queued when their time comes, 0.4 s before they are presented.  At a
bitrate below :data:`VIDEO_MIN_BITRATE` the video is left out so the content
always fits (below :data:`MIN_BITRATE` nothing fits and the constructor
refuses).

Two modes, chosen by :class:`TSGenerator`'s ``bitrate``:

- rate-limited (an int): ``for_duration`` hands out exactly the packets due for
  the stream time asked for, carrying the remainder, so the long-run rate is
  exact; idle time becomes one ``NULL_PACKET * k`` run, so the Python cost is
  per audio/video/PSI event, not per packet;
- flat out (``None``): a block of about 2 MiB of valid stream is multiplexed
  once per process and handed out as slices and repeats, so ``packets`` costs a
  memory copy.  **At each repeat the timestamps jump back and the continuity
  counters jump**; the first packet of every PID in the block carries the
  ``discontinuity_indicator``, which is how MPEG-TS announces exactly that, so
  players and ffprobe accept the loop.
"""

from __future__ import annotations

import base64
import functools
from collections import deque
from typing import Deque, Dict, List, Optional, Tuple

from acexy_tw.streaming.mpegts import NULL_PACKET, PACKET_SIZE, SYNC_BYTE

__all__ = [
    "TSGenerator",
    "CODECS",
    "DEFAULT_GOP",
    "crc32_mpeg2",
    "MIN_BITRATE",
    "VIDEO_MIN_BITRATE",
    "FLAT_OUT_NOMINAL_BITRATE",
    "PAT_PID",
    "PMT_PID",
    "VIDEO_PID",
    "AUDIO_PID",
]

# --- stream layout -----------------------------------------------------------

PAT_PID = 0x0000
PMT_PID = 0x1000
VIDEO_PID = 0x0100
AUDIO_PID = 0x0101
PROGRAM_NUMBER = 1
TRANSPORT_STREAM_ID = 1
STREAM_TYPE_MPEG2_VIDEO = 0x02
STREAM_TYPE_H264 = 0x1B
STREAM_TYPE_MPEG1_AUDIO = 0x03

#: Lowest bitrate that carries PSI, PCR and audio with headroom.
MIN_BITRATE = 200_000
#: From this bitrate on the video (about 300 kbit/s with TS overhead) is added.
VIDEO_MIN_BITRATE = 600_000
#: Stream time base of the precomputed flat-out block.
FLAT_OUT_NOMINAL_BITRATE = 4_000_000
#: Flat out hands out repeats of a block at least this big.
FLAT_OUT_BLOCK_BYTES = 2 * 1024 * 1024

# --- clocks (27 MHz system clock, 90 kHz PTS) ---------------------------------

CLOCK_HZ = 27_000_000
_PTS_DIVISOR = 300  # 27 MHz / 90 kHz
_PACKET_BITS = PACKET_SIZE * 8
_MASK_33 = (1 << 33) - 1

PSI_INTERVAL = CLOCK_HZ * 80 // 1000
PCR_INTERVAL = CLOCK_HZ * 40 // 1000
#: How long before its presentation time a frame is multiplexed.
PTS_DELAY = CLOCK_HZ * 400 // 1000

# --- elementary streams --------------------------------------------------------

AUDIO_SAMPLE_RATE = 48_000
AUDIO_FRAMES_PER_PES = 4
AUDIO_PES_TICKS = AUDIO_FRAMES_PER_PES * 1152 * CLOCK_HZ // AUDIO_SAMPLE_RATE  # 96 ms

#: MPEG-1 Layer II, no CRC, 64 kbit/s (index 4), 48 kHz (index 1), no padding,
#: mono.  Frame length 144 * 64000 / 48000 = 192 bytes; an all-zero body means
#: every subband has allocation 0, i.e. silence.
_AUDIO_FRAME = bytes([0xFF, 0xFD, 0x44, 0xC0]) + bytes(192 - 4)
_AUDIO_PES_PAYLOAD = _AUDIO_FRAME * AUDIO_FRAMES_PER_PES

VIDEO_FPS = 25
VIDEO_FRAME_TICKS = CLOCK_HZ // VIDEO_FPS

#: One MPEG-2 intra frame, 160x90, 25 fps, 16:9: sequence header, sequence
#: extension, GOP header (closed) and picture.  Made once with
#: ``ffmpeg -f lavfi -i smptebars=size=160x90 -frames:v 1 -c:v mpeg2video -g 1
#: -q:v 8 -f mpeg2video bars.m2v``.
_VIDEO_FRAME = base64.b64decode(
    "AAABswoAWjP//+AYAAABtRSKAAEAAAAAAbgACABAAAABAAAP//gAAAG1j//zQYAAAAEBQ/aU"
    "pSIuXNulc2+VAHAIn/YJAAYAM7csy5SlL5W3vgUpS/cL8duXMuncy+VAHAIn/YJAAYAM7csy"
    "5SlL5W3vh0pS/cL+jLlzLp3MvlQBwCJ/2CQAGADO3LMuUpS+Vt74NKUv3C/HYAAAAQJD9pSl"
    "Ii5c26Vzb5UAcAif9gkABgAztyzLlKUvlbe+BSlL9wvx25cy6dzL5UAcAif9gkABgAztyzLl"
    "KUvlbe+HSlL9wv6MuXMuncy+VAHAIn/YJAAYAM7csy5SlL5W3vg0pS/cL8dgAAABA0P2lKUi"
    "LlzbpXNvlQBwCJ/2CQAGADO3LMuUpS+Vt74FKUv3C/HblzLp3MvlQBwCJ/2CQAGADO3LMuUp"
    "S+Vt74dKUv3C/oy5cy6dzL5UAcAif9gkABgAztyzLlKUvlbe+DSlL9wvx2AAAAEEQ/aUvm4I"
    "IEII3/AJQAoJ3/lAQQIQRv+ASgBQTv/L1QA1AdAEoBAkgUDPf0i5t4kEECEEb/gEoAUE7/y5"
    "wIIEAI3/AJQAoJ3/l8qAOADMB0AUgXAJAPJAeirctHVf0el84BBAgBG/4BKAFBO/8oCCBACN"
    "/wCUAKCd/5fKgBqA6AJQCBJAtxnv1FLkABwACknAdoAHAAKScB2/YgMlDyd74cEH+cAuBF/6"
    "BKADDQTQA769zKsAOAAUk4Dt5UEEBUEb/sEoAMAF98yAPAKhiAMukCRnFirPADsBAQwHAa7H"
    "hBePEo1+upeRBBAVBG/7BKADABfQEEBUEb/sEoAMAF98wAHpMAmTkkCgAOQKAEpOSQL6VLsA"
    "ByACgngcoAHIAKCeBy/WwMFjifr9UBBAZALwRQBgSv/QwE3/2+Pcy9WAHIAKCeBy+egB0ACk"
    "nAdvnAB8AoAyNU4wijrvAqAOAEJMGEsmM7sBcrnMOTfXpcgAOgAUk4DtAA6ABSTgO3zgGSh5"
    "O96AAaAOwCQAhQQbopfSQQf3wRgCASv+wTgBKAg/vgjAEAlf9gnACX6oAGgDsAkAIUEG/Nhu"
    "gAAAAQVD+WgNxRPoA3FE+10vqgA8JgEiekg3iEpA68gDcUT7cAYgDkANAGAaBUBsSyUMCCWM"
    "canIPGceOkvWgCcEMBECoJAAgJf/ZVxEIpBM4Fsw35zSPallIbqO3vsgg/ngjAGAlf8gnADU"
    "BB/PBGAMBK/5BOAGvtlLwr1r+aAg/vAjAEglf9gnACXjwBkAagg/2gNwLANgMEoD5LcaNFIZ"
    "hl97vkAIAFYIn+oJAAwJn/l6xNAoGIK/yFqN48TeqkBMQtgHBPSQb+ZgB4A9JwHbz4BaKJ4H"
    "LZS9EpPDHGKcBfUGIxMclZnPNOE3jALRRPA5ZEcbnuvcoMAcYBfeYBQNSWn791ChVwlJ/679"
    "mCCA0CN/yCUAICd/7QEEBoEb/kEoAQE7/28LS4gMFDif7wQA1AdgEoBAggX7oEEBoEb/kEoA"
    "QE7/28EShc9moyMg66yaBUNIbEtLs7K2PEbXraseptFndV/SgQQJQRv9wSgBQTv/KAggSgjf"
    "7glACgnf+Xy2kRAAAAEGQ/nFKUvcvAuXrQBOCGAiBUEgAQEv/sq8letAE4IYCIFQSABAS/+y"
    "qEEnCdaFkhIj3+haUpeNe3cvkAIAFYIn+oJAAwJn/l9fvkAIAFYIn+oJAAwJn/l1gVAJkhxH"
    "1qWSPfx+lKX0F3XLlBgDjAL7q3KDAHGAX3ngMAHPAVEXWAYeHXRSlLxLjuWa02aIvTaLPaIi"
    "89KUiIA="
)

#: An MPEG-2 P picture of the same sequence (picture header, coding extension
#: and six slices, nearly every macroblock skipped), from the same encoder run
#: with ``-g 1000 -bf 0``; :func:`_mpeg2_p_frame` sets its temporal_reference.
_MPEG2_P_FRAME = base64.b64decode(
    "AAABAACX//uAAAABtYEf80GAAAABAUJwxwAAAQJCcMcAAAEDQnDHAAABBEJwxwAAAQVCdNgG8M4AAAEGQnDH"
)

#: One H.264 keyframe access unit (SPS, PPS, IDR slice; baseline, CAVLC, 10x6
#: macroblocks, log2_max_frame_num 4, pic_order_cnt_type 2, one reference
#: frame): ``ffmpeg -f lavfi -i smptebars=size=160x90:rate=25 -frames:v 1 -c:v
#: libx264 -profile:v baseline -bf 0 -refs 1 -f h264``, x264's SEI left out.
_H264_KEY = base64.b64decode(
    "AAAAAWdCwAvaCjfkwEQAAAMABAAAAwDIPFCqgAAAAAFozg8sgAAAAWWIhAvyYoAAk8REEQOABH4gAAgHAA8QFpII4jFAAEWuOAAJrUcAAS7Y"
    "iCIHAAj8QAAQDgAeIC0kEYoAxGKAAIoscAATWo4AAodREEQOABH4gAAgHAA8QFpIIxQBiMUAARX44AAmtRwABLtrp66enrp6eunrp66enrp6e"
    "un//j8FoKsUAAQCcQABGRVg5AZkHIDM6aYuUHAJ+EpNwcgGZByAZnTTa4f8QwBgt4vEEkIAAIAIBFiBMiBM4OBAcyDgQHM//AMAgu4oABfCU"
    "m4gTIPBmcHAgOZB4GZOsqMhTgOAAhCSJYQmhAABAAAKsSTIkmcHAQGMg4CAxkVgOAAjPIPNCUm4kmRAmcHAQGMg4gEZOsqMof+GAMFvFAAEB"
    "LEAAIBUZYOIBGQcQCM7bf//4Kz4oBxAAIAFQhAGhxARkcQEZ4mZPmf8IB8OCw3A4EBRyANzYKGOgjJBXaaS7hdgmr00rdw8i9hAMP/BZ4oAw"
    "JmIATwdCMhaTypwLAOgjIOwK0pb4BgH/BULEAEkIWDx9jwZnjoCMnCZ/AMf/BZxJUuBw6Cxg8GZAS02uekSFcECZDf0k3OAYB/wVEEI4gABM"
    "EvkyeTPHIAzI5AGZ/AMA/4LO8FqCkiPJnxyAMz5mEQD0gfgRfwDAA/oPBLeaCej5mCiyZgpjGNZmCqmmYKxQDHxxU8zigGOU1IMA5fXUMigA"
    "CALgA=="
)
#: access unit delimiter (primary_pic_type 7: any slice type)
_H264_AUD = b"\x00\x00\x00\x01\x09\xf0"
_H264_MBS = 10 * 6
_H264_MAX_FRAME_NUM = 16

#: the video codecs the generator can send
CODECS = ("mpeg2", "h264")
#: seconds between keyframes unless told otherwise
DEFAULT_GOP = 2.0


def _mpeg2_p_frame(temporal_reference: int) -> bytes:
    tr = temporal_reference & 0x3FF
    frame = bytearray(_MPEG2_P_FRAME)
    frame[4] = tr >> 2
    frame[5] = (tr & 0x03) << 6 | (frame[5] & 0x3F)
    return bytes(frame)


def _ue(value: int) -> str:
    """Exp-Golomb ue(v) as a bit string."""
    code = bin(value + 1)[2:]
    return "0" * (len(code) - 1) + code


def _emulation_prevented(rbsp: bytes) -> bytes:
    out = bytearray()
    zeros = 0
    for byte in rbsp:
        if zeros >= 2 and byte <= 3:
            out.append(3)
            zeros = 0
        out.append(byte)
        zeros = zeros + 1 if byte == 0 else 0
    return bytes(out)


@functools.lru_cache(maxsize=_H264_MAX_FRAME_NUM)
def _h264_p_frame(frame_num: int) -> bytes:
    """An access unit of one P slice (NAL type 1, a reference picture) in which
    every macroblock is skipped: the previous picture again."""
    bits = (
        _ue(0)  # first_mb_in_slice
        + _ue(5)  # slice_type: P (every slice of the picture)
        + _ue(0)  # pic_parameter_set_id
        + format(frame_num % _H264_MAX_FRAME_NUM, "04b")  # frame_num, u(4)
        + "0"  # num_ref_idx_active_override_flag
        + "0"  # ref_pic_list_modification_flag_l0
        + "0"  # adaptive_ref_pic_marking_mode_flag (sliding window)
        + _ue(0)  # slice_qp_delta se(0)
        + _ue(1)  # disable_deblocking_filter_idc: off
        + _ue(_H264_MBS)  # mb_skip_run: the whole picture
        + "1"  # rbsp_stop_one_bit
    )
    bits += "0" * (-len(bits) % 8)
    rbsp = int(bits, 2).to_bytes(len(bits) // 8, "big")
    return _H264_AUD + b"\x00\x00\x00\x01\x41" + _emulation_prevented(rbsp)  # nal_ref_idc 2, type 1


def _video_frame(codec: str, index_in_gop: int) -> bytes:
    """The ES bytes of a frame: a keyframe at index 0 of its GOP."""
    if codec == "h264":
        return _H264_AUD + _H264_KEY if index_in_gop == 0 else _h264_p_frame(index_in_gop % _H264_MAX_FRAME_NUM)
    return _VIDEO_FRAME if index_in_gop == 0 else _mpeg2_p_frame(index_in_gop)


def gop_frames(gop: Optional[float]) -> int:
    """Frames per GOP for ``gop`` seconds (None or 0: every frame a keyframe)."""
    if gop is None or gop <= 0:
        return 1
    return max(1, round(gop * VIDEO_FPS))

# --- adaptation field flags ---------------------------------------------------

AF_DISCONTINUITY = 0x80
AF_RANDOM_ACCESS = 0x40
_AF_PCR = 0x10


# --- CRC and section helpers --------------------------------------------------


def _crc_table() -> List[int]:
    table = []
    for byte in range(256):
        crc = byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
        table.append(crc & 0xFFFFFFFF)
    return table


_CRC_TABLE = _crc_table()


def crc32_mpeg2(data: bytes) -> int:
    """CRC-32/MPEG-2 (poly 0x04C11DB7, init 0xFFFFFFFF, not reflected, no xorout).

    ``zlib.crc32`` is the reflected variant and does not fit PSI sections.
    """
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for byte in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ table[(crc >> 24) ^ byte]
    return crc


def _section(table_id: int, table_id_extension: int, body: bytes) -> bytes:
    """A long-form PSI section (version 0, current, single section) with its CRC."""
    length = 5 + len(body) + 4
    head = bytes(
        [
            table_id,
            0xB0 | (length >> 8),  # section_syntax_indicator, '0', reserved
            length & 0xFF,
            table_id_extension >> 8,
            table_id_extension & 0xFF,
            0xC1,  # reserved, version 0, current_next_indicator
            0x00,  # section_number
            0x00,  # last_section_number
        ]
    )
    section = head + body
    return section + crc32_mpeg2(section).to_bytes(4, "big")


def _pat_section() -> bytes:
    body = bytes(
        [PROGRAM_NUMBER >> 8, PROGRAM_NUMBER & 0xFF, 0xE0 | (PMT_PID >> 8), PMT_PID & 0xFF]
    )
    return _section(0x00, TRANSPORT_STREAM_ID, body)


def _pmt_section(video: bool, codec: str = "mpeg2") -> bytes:
    pcr_pid = VIDEO_PID if video else AUDIO_PID
    body = bytearray([0xE0 | (pcr_pid >> 8), pcr_pid & 0xFF, 0xF0, 0x00])
    streams = [(STREAM_TYPE_MPEG1_AUDIO, AUDIO_PID)]
    if video:
        streams.insert(0, (STREAM_TYPE_H264 if codec == "h264" else STREAM_TYPE_MPEG2_VIDEO, VIDEO_PID))
    for stream_type, pid in streams:
        body += bytes([stream_type, 0xE0 | (pid >> 8), pid & 0xFF, 0xF0, 0x00])
    return _section(0x02, PROGRAM_NUMBER, bytes(body))


# --- packet helpers -----------------------------------------------------------


def _pcr_field(ticks: int) -> bytes:
    """The 6-byte PCR: 33-bit base (90 kHz), 6 reserved bits, 9-bit extension."""
    base = (ticks // _PTS_DIVISOR) & _MASK_33
    return ((base << 15) | 0x7E00 | (ticks % _PTS_DIVISOR)).to_bytes(6, "big")


def _pts_field(pts: int) -> bytes:
    """A 5-byte PTS with the '0010' prefix (PTS only) and marker bits."""
    pts &= _MASK_33
    return bytes(
        [
            0x21 | ((pts >> 29) & 0x0E),
            (pts >> 22) & 0xFF,
            0x01 | ((pts >> 14) & 0xFE),
            (pts >> 7) & 0xFF,
            0x01 | ((pts << 1) & 0xFE),
        ]
    )


def _pes(stream_id: int, pts: int, payload: bytes) -> bytes:
    """A PES packet with a PTS (no DTS: no frame reordering, so DTS = PTS)."""
    length = 3 + 5 + len(payload)
    head = bytes([0, 0, 1, stream_id, length >> 8, length & 0xFF, 0x84, 0x80, 5])
    return head + _pts_field(pts) + payload


def _ts_packet(
    pid: int,
    cc: int,
    payload: bytes,
    *,
    start: bool = False,
    flags: int = 0,
    pcr: Optional[int] = None,
) -> bytes:
    """One 188-byte packet; ``payload`` must fit what is left after the
    adaptation field, which is added when flags or a PCR are asked for and
    padded with stuffing bytes when the payload is short."""
    af_body = b""
    if pcr is not None:
        af_body = bytes([flags | _AF_PCR]) + _pcr_field(pcr)
    elif flags:
        af_body = bytes([flags])
    capacity = 184 - (1 + len(af_body) if af_body else 0)
    stuffing = capacity - len(payload)
    if stuffing < 0:
        raise ValueError("payload does not fit in one packet")
    if af_body:
        af = bytes([len(af_body) + stuffing]) + af_body + b"\xff" * stuffing
    elif stuffing == 1:
        af = b"\x00"
    elif stuffing:
        af = bytes([stuffing - 1, 0x00]) + b"\xff" * (stuffing - 2)
    else:
        af = b""
    control = (2 if af else 0) | (1 if payload else 0)
    header = bytes(
        [SYNC_BYTE, (0x40 if start else 0) | (pid >> 8), pid & 0xFF, (control << 4) | cc]
    )
    return header + af + payload


# --- the multiplexer ----------------------------------------------------------


class _Mux:
    """Constant-bitrate multiplexer: decides, for each packet slot, what goes
    in it (PCR when due, then PSI, then queued audio/video, else null)."""

    def __init__(
        self,
        bitrate: int,
        video: bool,
        mark_discontinuity: bool = False,
        *,
        codec: str = "mpeg2",
        gop: int = 1,
        random_access_indicator: bool = True,
    ) -> None:
        self.bitrate = bitrate
        self.video = video
        self._codec = codec
        #: frames per GOP
        self._gop = gop
        self._rai = AF_RANDOM_ACCESS if random_access_indicator else 0
        #: video frames queued so far
        self._frame = 0
        #: index of the next packet slot
        self.slot = 0
        self._pcr_pid = VIDEO_PID if video else AUDIO_PID
        self._pat = _pat_section()
        self._pmt = _pmt_section(video, codec)
        self._cc: Dict[int, int] = {}
        self._flags_once: Dict[int, int] = {}
        if mark_discontinuity:
            pids = [PAT_PID, PMT_PID, AUDIO_PID] + ([VIDEO_PID] if video else [])
            self._flags_once = {pid: AF_DISCONTINUITY for pid in pids}
        self._psi: Deque[bytes] = deque()
        self._es: Deque[Tuple[int, bytes, bool, int]] = deque()
        self._next_pcr = 0
        self._next_psi = 0
        self._next_audio = 0
        self._next_video = 0 if video else None

    # slot <-> time ----------------------------------------------------------

    def _time(self, slot: int) -> int:
        return slot * _PACKET_BITS * CLOCK_HZ // self.bitrate

    def _first_slot_at(self, ticks: int) -> int:
        """Smallest slot whose time is >= ``ticks``."""
        return -(-ticks * self.bitrate // (_PACKET_BITS * CLOCK_HZ))

    @property
    def pending(self) -> bool:
        """Whether a PSI or PES packet is waiting for a slot."""
        return bool(self._psi or self._es)

    # packet building --------------------------------------------------------

    def _take_cc(self, pid: int) -> int:
        cc = self._cc.get(pid, 0)
        self._cc[pid] = (cc + 1) & 0x0F
        return cc

    def _psi_packet(self, pid: int, section: bytes) -> bytes:
        flags = self._flags_once.pop(pid, 0)
        payload = b"\x00" + section  # pointer_field 0
        room = 184 - (2 if flags else 0)
        payload += b"\xff" * (room - len(payload))
        return _ts_packet(pid, self._take_cc(pid), payload, start=True, flags=flags)

    def _pcr_packet(self, ticks: int) -> bytes:
        pid = self._pcr_pid
        flags = self._flags_once.pop(pid, 0)
        # No payload, so the continuity counter repeats the last one sent.
        cc = (self._cc.get(pid, 0) - 1) & 0x0F
        return _ts_packet(pid, cc, b"", flags=flags, pcr=ticks)

    def _queue_pes(self, pid: int, pes: bytes, flags: int) -> None:
        """Cut a PES packet into TS payloads; headers and continuity counters
        are made when each piece is sent, so a PCR packet on the same PID sent
        in between repeats the right counter."""
        flags |= self._flags_once.pop(pid, 0)
        first = 184 - (2 if flags else 0)
        self._es.append((pid, pes[:first], True, flags))
        for pos in range(first, len(pes), 184):
            self._es.append((pid, pes[pos : pos + 184], False, 0))

    def _es_packet(self) -> bytes:
        pid, payload, start, flags = self._es.popleft()
        return _ts_packet(pid, self._take_cc(pid), payload, start=start, flags=flags)

    def _queue_due_frames(self, now: int) -> None:
        while True:
            audio, video = self._next_audio, self._next_video
            if video is not None and video <= now and video <= audio:
                pts = (video + PTS_DELAY) // _PTS_DIVISOR
                index = self._frame % self._gop
                self._frame += 1
                frame = _video_frame(self._codec, index)
                self._queue_pes(VIDEO_PID, _pes(0xE0, pts, frame), self._rai if index == 0 else 0)
                self._next_video = video + VIDEO_FRAME_TICKS
            elif audio <= now:
                pts = (audio + PTS_DELAY) // _PTS_DIVISOR
                self._queue_pes(AUDIO_PID, _pes(0xC0, pts, _AUDIO_PES_PAYLOAD), 0)
                self._next_audio = audio + AUDIO_PES_TICKS
            else:
                return

    def _next_event(self) -> int:
        events = [self._next_pcr, self._next_psi, self._next_audio]
        if self._next_video is not None:
            events.append(self._next_video)
        return min(events)

    # output -----------------------------------------------------------------

    def packets(self, count: int) -> bytes:
        """The next ``count`` packets of the stream."""
        out: List[bytes] = []
        while count > 0:
            piece, used = self._next_piece(count)
            out.append(piece)
            self.slot += used
            count -= used
        return b"".join(out)

    def _next_piece(self, room: int) -> Tuple[bytes, int]:
        """What fills the next slot: a PCR, PSI or PES packet, or a run of
        null packets (at most ``room``) up to the next event."""
        now = self._time(self.slot)
        if now >= self._next_pcr:
            # Checked before frames are queued: at a block start this PCR
            # packet is the first of its PID and takes the discontinuity flag.
            self._next_pcr += PCR_INTERVAL
            return self._pcr_packet(now), 1
        self._queue_due_frames(now)
        if self._psi:
            return self._psi.popleft(), 1
        if now >= self._next_psi:
            self._next_psi += PSI_INTERVAL
            self._psi.append(self._psi_packet(PMT_PID, self._pmt))
            return self._psi_packet(PAT_PID, self._pat), 1
        if self._es:
            return self._es_packet(), 1
        idle = min(room, max(1, self._first_slot_at(self._next_event()) - self.slot))
        return NULL_PACKET * idle, idle


@functools.lru_cache(maxsize=None)
def _flat_out_block(codec: str = "mpeg2", gop: int = 1, random_access_indicator: bool = True) -> bytes:
    """About 2 MiB of stream ending on a clean boundary (nothing queued), so a
    repeat starts with fresh PCR, PAT, PMT and whole PES packets (and a keyframe)."""
    mux = _Mux(
        FLAT_OUT_NOMINAL_BITRATE,
        video=True,
        mark_discontinuity=True,
        codec=codec,
        gop=gop,
        random_access_indicator=random_access_indicator,
    )
    parts = [mux.packets(FLAT_OUT_BLOCK_BYTES // PACKET_SIZE)]
    while mux.pending:
        parts.append(mux.packets(1))
    return b"".join(parts)


# --- public API ---------------------------------------------------------------


class TSGenerator:
    """
    An endless, valid MPEG-TS stream, handed out in whole 188-byte packets.

    ``TSGenerator(4_000_000)`` multiplexes a stream of exactly 4 Mbit/s on the
    fly; ``TSGenerator(None)`` ("flat out") hands out repeats of a block
    precomputed once per process, fast enough (several GB/s) that the
    simulator is never the bottleneck of a proxy benchmark; timestamps and
    continuity counters jump (flagged as discontinuities) at each repeat.
    See the module docstring for the stream's content.
    """

    def __init__(
        self,
        bitrate: Optional[int],
        *,
        video: Optional[bool] = None,
        codec: str = "mpeg2",
        gop: Optional[float] = DEFAULT_GOP,
        random_access_indicator: bool = True,
    ) -> None:
        """
        :param bitrate: bits per second, or ``None`` for flat out.
        :param video: include the video stream; ``None`` = when the bitrate
            leaves room for it (always, flat out).  Ignored flat out.
        :param codec: ``"mpeg2"`` or ``"h264"`` video.
        :param gop: seconds from one keyframe to the next (``None``: every
            frame is one).
        :param random_access_indicator: flag each keyframe's first packet with
            the adaptation field's ``random_access_indicator``.
        """
        if codec not in CODECS:
            raise ValueError(f"codec {codec!r} is not one of {', '.join(CODECS)}")
        self.bitrate = bitrate
        self.codec = codec
        #: frames from one keyframe to the next
        self.gop_frames = gop_frames(gop)
        self._emitted = 0  # packets handed out
        self._stream_ns = 0  # stream time asked for through for_duration
        if bitrate is None:
            self._mux: Optional[_Mux] = None
            self._block = _flat_out_block(codec, self.gop_frames, random_access_indicator)
            self.has_video = True
            return
        if bitrate < MIN_BITRATE:
            raise ValueError(f"bitrate {bitrate} is below the minimum {MIN_BITRATE}")
        if video is None:
            video = bitrate >= VIDEO_MIN_BITRATE
        elif video and bitrate < VIDEO_MIN_BITRATE:
            raise ValueError(f"video needs a bitrate of at least {VIDEO_MIN_BITRATE}")
        self.has_video = video
        self._mux = _Mux(bitrate, video, codec=codec, gop=self.gop_frames, random_access_indicator=random_access_indicator)

    @property
    def flat_out(self) -> bool:
        return self._mux is None

    @property
    def packets_emitted(self) -> int:
        return self._emitted

    @property
    def bytes_emitted(self) -> int:
        return self._emitted * PACKET_SIZE

    def packets(self, n: int) -> bytes:
        """The next ``n`` whole packets (``n * 188`` bytes) of the stream."""
        if n <= 0:
            return b""
        self._emitted += n
        if self._mux is not None:
            return self._mux.packets(n)
        return self._slice(n * PACKET_SIZE)

    def for_duration(self, seconds: float) -> bytes:
        """The packets due for ``seconds`` more of stream time.

        Stream time is accumulated in integer nanoseconds and compared with
        the packets already handed out, so rounding never accumulates: after
        any sequence of calls totalling T seconds exactly
        ``floor(T * bitrate / 1504)`` packets have been returned (provided
        ``packets`` was not also used).  Flat out has no stream time, so this
        raises ``ValueError``.
        """
        if self._mux is None:
            raise ValueError("for_duration needs a bitrate (this generator is flat out)")
        if seconds < 0:
            raise ValueError("seconds must not be negative")
        self._stream_ns += round(seconds * 1_000_000_000)
        due = self._stream_ns * self.bitrate // (_PACKET_BITS * 1_000_000_000)
        return self.packets(due - self._emitted)

    def _slice(self, size: int) -> bytes:
        block = self._block
        start = (self._emitted * PACKET_SIZE - size) % len(block)
        end = start + size
        if end <= len(block):
            return block[start:end]
        pieces = [block[start:]]
        left = end - len(block)
        while left > len(block):
            pieces.append(block)
            left -= len(block)
        pieces.append(block[:left])
        return b"".join(pieces)
