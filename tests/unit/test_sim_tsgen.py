"""
The simulator's MPEG-TS generator produces a stream players accept.

The checks parse the output with a small independent parser (and recompute
the PSI CRCs bit by bit) rather than trusting the generator's own helpers.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import pytest

from acexy_tw.sim import tsgen
from acexy_tw.sim.tsgen import (
    AUDIO_PID,
    MIN_BITRATE,
    PAT_PID,
    PMT_PID,
    VIDEO_MIN_BITRATE,
    VIDEO_PID,
    TSGenerator,
    crc32_mpeg2,
)
from acexy_tw.streaming.mpegts import NULL_PID, PACKET_SIZE

# --- an independent parser -----------------------------------------------------


@dataclass
class Packet:
    index: int
    pid: int
    start: bool
    cc: int
    has_payload: bool
    discontinuity: bool
    pcr: Optional[int]  # 27 MHz ticks
    payload: bytes


def parse(data: bytes) -> List[Packet]:
    assert len(data) % PACKET_SIZE == 0
    packets = []
    for index in range(len(data) // PACKET_SIZE):
        p = data[index * PACKET_SIZE : (index + 1) * PACKET_SIZE]
        assert p[0] == 0x47, f"packet {index}: no sync byte"
        pid = (p[1] & 0x1F) << 8 | p[2]
        control = (p[3] >> 4) & 0x3
        assert control != 0, f"packet {index}: reserved adaptation_field_control"
        pos, discontinuity, pcr = 4, False, None
        if control & 0x2:
            length = p[4]
            if control == 0x2:
                assert length == 183
            else:
                assert length <= 182
            if length:
                flags = p[5]
                discontinuity = bool(flags & 0x80)
                if flags & 0x10:
                    raw = int.from_bytes(p[6:12], "big")
                    pcr = (raw >> 15) * 300 + (raw & 0x1FF)
            pos = 5 + length
        packets.append(
            Packet(index, pid, bool(p[1] & 0x40), p[3] & 0x0F, bool(control & 0x1), discontinuity, pcr, p[pos:])
        )
    return packets


def crc_bitwise(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        for bit in range(7, -1, -1):
            top = ((crc >> 31) & 1) ^ ((byte >> bit) & 1)
            crc = (crc << 1) & 0xFFFFFFFF
            if top:
                crc ^= 0x04C11DB7
    return crc


def section_of(packet: Packet) -> bytes:
    assert packet.start
    pointer = packet.payload[0]
    body = packet.payload[1 + pointer :]
    length = ((body[1] & 0x0F) << 8) | body[2]
    return body[: 3 + length]


def pts_of(packet: Packet) -> int:
    pes = packet.payload
    assert pes[:3] == b"\x00\x00\x01"
    assert pes[7] & 0x80, "PES without PTS"
    b = pes[9:14]
    return ((b[0] >> 1) & 0x07) << 30 | b[1] << 22 | (b[2] >> 1) << 15 | b[3] << 7 | b[4] >> 1


def check_continuity(packets: List[Packet]) -> None:
    last: Dict[int, int] = {}
    for p in packets:
        if p.pid == NULL_PID:
            continue
        if p.pid in last and not p.discontinuity:
            expected = (last[p.pid] + 1) & 0x0F if p.has_payload else last[p.pid]
            assert p.cc == expected, f"packet {p.index} pid {p.pid:#x}: cc {p.cc} != {expected}"
        last[p.pid] = p.cc


def packet_time(packet: Packet, bitrate: int) -> float:
    return packet.index * PACKET_SIZE * 8 / bitrate


# --- tests ------------------------------------------------------------------------


def test_crc_matches_the_mpeg2_check_value():
    assert crc32_mpeg2(b"123456789") == 0x0376E6E7
    assert crc_bitwise(b"123456789") == 0x0376E6E7


def test_packets_are_whole_and_synced():
    data = TSGenerator(4_000_000).packets(1000)
    assert len(data) == 1000 * PACKET_SIZE
    assert all(data[i] == 0x47 for i in range(0, len(data), PACKET_SIZE))


def test_pat_and_pmt_have_correct_crc_and_content():
    packets = parse(TSGenerator(4_000_000).for_duration(1.0))
    pat = section_of(next(p for p in packets if p.pid == PAT_PID))
    pmt = section_of(next(p for p in packets if p.pid == PMT_PID))
    for section in (pat, pmt):
        assert crc_bitwise(section[:-4]) == int.from_bytes(section[-4:], "big")
        assert crc_bitwise(section) == 0  # the MPEG-2 property of a good section
    assert pat[0] == 0x00 and ((pat[10] & 0x1F) << 8 | pat[11]) == PMT_PID
    assert pmt[0] == 0x02
    streams = {}
    pos = 12 + (((pmt[10] & 0x0F) << 8) | pmt[11])
    while pos < len(pmt) - 4:
        streams[(pmt[pos + 1] & 0x1F) << 8 | pmt[pos + 2]] = pmt[pos]
        pos += 5 + (((pmt[pos + 3] & 0x0F) << 8) | pmt[pos + 4])
    assert streams == {VIDEO_PID: 0x02, AUDIO_PID: 0x03}
    assert ((pmt[8] & 0x1F) << 8 | pmt[9]) == VIDEO_PID  # PCR PID


@pytest.mark.parametrize("bitrate", [MIN_BITRATE, VIDEO_MIN_BITRATE, 4_000_000, 20_000_000])
def test_stream_structure_over_ten_seconds(bitrate):
    gen = TSGenerator(bitrate)
    packets = parse(b"".join(gen.for_duration(0.04) for _ in range(250)))
    check_continuity(packets)

    # PAT and PMT at least every 100 ms of stream time
    for pid in (PAT_PID, PMT_PID):
        times = [packet_time(p, bitrate) for p in packets if p.pid == pid]
        assert times[0] < 0.1
        assert max(b - a for a, b in zip(times, times[1:])) <= 0.1

    # PCR at least every 100 ms on one PID, and equal to the packet's stream time
    pcr_pid = VIDEO_PID if gen.has_video else AUDIO_PID
    pcrs = [p for p in packets if p.pcr is not None]
    assert {p.pid for p in pcrs} == {pcr_pid}
    assert max(b.pcr - a.pcr for a, b in zip(pcrs, pcrs[1:])) <= 27_000_000 // 10
    for p in pcrs:
        assert abs(p.pcr / 27e6 - packet_time(p, bitrate)) < 1e-6

    # every PES has a PTS and arrives before it is due (the content fits)
    pes_pids = {AUDIO_PID, VIDEO_PID} if gen.has_video else {AUDIO_PID}
    starts = [p for p in packets if p.start and p.pid in pes_pids]
    assert {p.pid for p in starts} == pes_pids
    for p in starts:
        assert pts_of(p) / 90_000 > packet_time(p, bitrate) + 0.05, f"PES at packet {p.index} is late"


def test_video_only_when_the_bitrate_leaves_room():
    assert TSGenerator(VIDEO_MIN_BITRATE).has_video
    assert not TSGenerator(VIDEO_MIN_BITRATE - 1).has_video
    assert not TSGenerator(4_000_000, video=False).has_video
    with pytest.raises(ValueError):
        TSGenerator(MIN_BITRATE - 1)
    with pytest.raises(ValueError):
        TSGenerator(MIN_BITRATE, video=True)


@pytest.mark.parametrize("chunk", [0.02, 0.0333, 0.05, 0.25])
def test_for_duration_averages_the_bitrate_exactly(chunk):
    bitrate = 4_000_000
    gen = TSGenerator(bitrate)
    total, elapsed = 0, 0.0
    while elapsed < 10.0 - 1e-9:
        total += len(gen.for_duration(chunk))
        elapsed += chunk
    expected = int(round(elapsed * 1e9) * bitrate // (PACKET_SIZE * 8 * 10**9)) * PACKET_SIZE
    assert total == expected
    assert abs(total * 8 / elapsed - bitrate) < PACKET_SIZE * 8 / elapsed


def test_for_duration_small_steps_carry_the_remainder():
    gen = TSGenerator(1_000_000)
    # 1 ms is 0.66 packets at 1 Mbit/s: most calls return nothing, none lose time
    sizes = [len(gen.for_duration(0.001)) for _ in range(3000)]
    assert set(sizes) <= {0, PACKET_SIZE}
    assert sum(sizes) == 3 * 1_000_000 // (PACKET_SIZE * 8) * PACKET_SIZE


def test_flat_out_packets_are_valid_across_repeats():
    gen = TSGenerator(None)
    assert gen.flat_out and gen.bitrate is None
    block = len(tsgen._flat_out_block()) // PACKET_SIZE
    data = b"".join(gen.packets(n) for n in (1, 347, 5000, block, 2 * block + 7))
    assert len(data) == (1 + 347 + 5000 + 3 * block + 7) * PACKET_SIZE
    packets = parse(data)
    check_continuity(packets)  # repeats are flagged as discontinuities
    assert sum(1 for p in packets if p.pid == PAT_PID) > 10
    with pytest.raises(ValueError):
        gen.for_duration(1.0)


def test_flat_out_is_cheap():
    gen = TSGenerator(None)
    size, deadline, start = 0, time.perf_counter() + 0.2, time.perf_counter()
    while time.perf_counter() < deadline:
        size += len(gen.packets(348))  # one 64 KiB write
    rate = size / (time.perf_counter() - start)
    assert rate > 1e9, f"flat out produced only {rate / 1e6:.0f} MB/s"


def ffprobe(path) -> dict:
    result = subprocess.run(
        ["ffprobe", "-v", "error", "-show_format", "-show_streams", "-of", "json", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(result.stdout)


@pytest.mark.skipif(shutil.which("ffprobe") is None, reason="ffprobe is not installed")
@pytest.mark.parametrize(
    "bitrate, codecs",
    [(4_000_000, {"mpeg2video", "mp2"}), (300_000, {"mp2"}), (None, {"mpeg2video", "mp2"})],
)
def test_ffprobe_recognises_the_stream(tmp_path, bitrate, codecs):
    gen = TSGenerator(bitrate)
    data = gen.for_duration(3.0) if bitrate else gen.packets(3 * 11155)
    path = tmp_path / "sim.ts"
    path.write_bytes(data)
    info = ffprobe(path)
    assert "mpegts" in info["format"]["format_name"]
    assert len(info["streams"]) >= 1
    assert {s["codec_name"] for s in info["streams"]} == codecs
    video = [s for s in info["streams"] if s["codec_type"] == "video"]
    if video:
        assert (video[0]["width"], video[0]["height"]) == (160, 90)


# --- GOPs ----------------------------------------------------------------------------


def video_frames(packets: List[Packet]) -> List[tuple]:
    """(PES first packet, ES bytes of the whole PES) of every video frame."""
    frames: List[list] = []
    for p in packets:
        if p.pid != VIDEO_PID or not p.has_payload:
            continue
        if p.start:
            frames.append([p, bytearray(p.payload)])
        elif frames:
            frames[-1][1] += p.payload
    out = []
    for first, pes in frames:
        assert pes[:3] == b"\x00\x00\x01"
        out.append((first, bytes(pes[9 + pes[8] :])))
    return out


def nal_types(es: bytes) -> List[int]:
    return [es[i + 3] & 0x1F for i in range(len(es) - 3) if es[i : i + 3] == b"\x00\x00\x01"]


def flagged(first: Packet, data: bytes) -> bool:
    raw = data[first.index * PACKET_SIZE : (first.index + 1) * PACKET_SIZE]
    return bool(raw[3] & 0x20 and raw[4] and raw[5] & 0x40)


@pytest.mark.parametrize("codec", ["mpeg2", "h264"])
@pytest.mark.parametrize("rai", [True, False])
def test_a_keyframe_every_gop(codec, rai):
    gen = TSGenerator(4_000_000, codec=codec, gop=0.4, random_access_indicator=rai)
    assert gen.gop_frames == 10
    data = gen.for_duration(2.0)
    frames = video_frames(parse(data))
    assert len(frames) >= 45
    for n, (first, es) in enumerate(frames):
        key = n % 10 == 0
        assert flagged(first, data) == (key and rai), n
        if codec == "h264":
            assert nal_types(es) == ([9, 7, 8, 5] if key else [9, 1]), n
        else:
            picture = es.index(b"\x00\x00\x01\x00")
            assert (es[picture + 5] >> 3) & 0x07 == (1 if key else 2), n  # I, else P
            assert (es[picture + 4] << 2 | es[picture + 5] >> 6) == n % 10  # temporal_reference


def test_h264_pmt_and_frame_numbers():
    packets = parse(TSGenerator(4_000_000, codec="h264", gop=2.0).for_duration(1.0))
    pmt = section_of(next(p for p in packets if p.pid == PMT_PID))
    assert bytes([0x1B, 0xE0 | VIDEO_PID >> 8, VIDEO_PID & 0xFF]) in pmt
    # P slices: first_mb 0 ('1'), slice_type 5 ('00110'), pps 0 ('1'), then frame_num (4 bits)
    numbers = []
    for _, es in video_frames(packets)[1:]:
        slice_ = es[es.index(b"\x00\x00\x01\x41") + 4 :]
        bits = format(int.from_bytes(slice_[:2], "big"), "016b")
        assert bits[:7] == "1001101"
        numbers.append(int(bits[7:11], 2))
    assert numbers[:20] == [n % 16 for n in range(1, 21)]


def test_no_gop_is_all_intra_and_codecs_are_checked():
    frames = video_frames(parse(TSGenerator(4_000_000, gop=None).for_duration(0.5)))
    assert all(es.startswith(b"\x00\x00\x01\xb3") for _, es in frames)  # a sequence header each
    with pytest.raises(ValueError):
        TSGenerator(4_000_000, codec="vp9")


@pytest.mark.skipif(shutil.which("ffprobe") is None, reason="ffprobe is not installed")
@pytest.mark.parametrize("codec, name", [("h264", "h264"), ("mpeg2", "mpeg2video")])
def test_ffprobe_decodes_the_gops(tmp_path, codec, name):
    data = TSGenerator(4_000_000, codec=codec, gop=1.0, random_access_indicator=False).for_duration(3.0)
    path = tmp_path / "gop.ts"
    path.write_bytes(data)
    result = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_frames", "-show_streams",
         "-show_entries", "frame=key_frame,pict_type:stream=codec_name,width,height", "-of", "json", str(path)],
        capture_output=True, text=True, timeout=60, check=True,
    )
    assert result.stderr == ""
    info = json.loads(result.stdout)
    assert (info["streams"][0]["codec_name"], info["streams"][0]["width"], info["streams"][0]["height"]) == (name, 160, 90)
    kinds = [(f["key_frame"], f["pict_type"]) for f in info["frames"]]
    assert len(kinds) >= 60
    assert all(k == ((1, "I") if n % 25 == 0 else (0, "P")) for n, k in enumerate(kinds)), kinds


def test_flat_out_has_gops_and_starts_each_repeat_with_a_keyframe():
    gen = TSGenerator(None, codec="h264", gop=2.0)
    block = len(tsgen._flat_out_block("h264", 50, True)) // PACKET_SIZE
    data = gen.packets(2 * block)
    frames = video_frames(parse(data))
    keys = [n for n, (_, es) in enumerate(frames) if 5 in nal_types(es)]
    per_block = len(frames) // 2
    assert keys == [base + k for base in (0, per_block) for k in range(0, per_block, 50)]
