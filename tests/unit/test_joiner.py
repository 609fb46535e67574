"""
Fast start (acexy_tw.streaming.joiner): random access points found on packet
boundaries by both paths (random_access_indicator, or the video itself), PAT
and PMT tracked, every way a stream can be cut into pieces, the cap, the
budget, and the seam between the cache and the live pieces for a joiner.
"""

from __future__ import annotations

import random
from typing import Any, Optional

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from acexy_tw.sim.tsgen import PAT_PID, PMT_PID, TSGenerator, crc32_mpeg2
from acexy_tw.streaming.budget import BacklogBudget
from acexy_tw.streaming.fanout import Fanout
from acexy_tw.streaming.joiner import FastStart, keyframe
from acexy_tw.streaming.mpegts import NULL_PACKET, PACKET_SIZE

VIDEO = 0x0100
AUDIO = 0x0101

# -- a tiny muxer, independent of the one under test ------------------------------------


def packet(pid: int, payload: bytes = b"", *, start: bool = False, rai: bool = False, af: int = 0, cc: int = 0) -> bytes:
    """One packet; ``af`` extra adaptation-field bytes (stuffing) push the payload later."""
    body = b""
    if rai or af:
        flags = bytes([0x40 if rai else 0x00])
        room = 184 - 2 - len(payload)
        stuffing = max(af, room) if af else room
        body = bytes([1 + stuffing]) + flags + b"\xff" * stuffing
        control = 0x30 if payload else 0x20
    else:
        control = 0x10
    pad = 184 - len(body) - len(payload)
    if pad > 0 and not body:  # stuff through an adaptation field
        body = bytes([pad - 1]) + (b"\x00" + b"\xff" * (pad - 2) if pad > 1 else b"")
        control = 0x30
    elif pad > 0:
        payload = payload + b"\xff" * pad
    data = bytes([0x47, (0x40 if start else 0) | pid >> 8, pid & 0xFF, control | (cc & 0x0F)]) + body + payload
    assert len(data) == PACKET_SIZE, len(data)
    return data


def section(table_id: int, ext: int, body: bytes) -> bytes:
    length = 5 + len(body) + 4
    head = bytes([table_id, 0xB0 | length >> 8, length & 0xFF, ext >> 8, ext & 0xFF, 0xC1, 0, 0])
    s = head + body
    return s + crc32_mpeg2(s).to_bytes(4, "big")


def pat(pmt_pid: int = PMT_PID, cc: int = 0) -> bytes:
    return packet(PAT_PID, b"\x00" + section(0, 1, bytes([0, 1, 0xE0 | pmt_pid >> 8, pmt_pid & 0xFF])), start=True, cc=cc)


def pmt(stream_type: int, video: int = VIDEO, cc: int = 0, pmt_pid: int = PMT_PID) -> bytes:
    body = bytes([0xE0 | video >> 8, video & 0xFF, 0xF0, 0])
    body += bytes([0x03, 0xE0 | AUDIO >> 8, AUDIO & 0xFF, 0xF0, 0])  # audio first: the video is found anyway
    body += bytes([stream_type, 0xE0 | video >> 8, video & 0xFF, 0xF0, 0])
    return packet(pmt_pid, b"\x00" + section(2, 1, body), start=True, cc=cc)


def pes(es: bytes) -> bytes:
    return b"\x00\x00\x01\xe0\x00\x00\x80\x80\x05\x21\x00\x01\x00\x01" + es


H264_IDR = b"\x00\x00\x00\x01\x09\xf0\x00\x00\x00\x01\x65\x88"
H264_SPS_IDR = b"\x00\x00\x00\x01\x67\x42\xc0\x0b\x00\x00\x00\x01\x68\xce\x00\x00\x01\x65\x88"
H264_P = b"\x00\x00\x00\x01\x09\xf0\x00\x00\x00\x01\x41\x9a"
H264_SPS_P = b"\x00\x00\x00\x01\x67\x42\xc0\x0b\x00\x00\x01\x41\x9a"
HEVC_IRAP = b"\x00\x00\x01\x40\x01\x0c\x00\x00\x01\x42\x01\x00\x00\x01\x26\x01"  # VPS, SPS, IDR_W_RADL (19)
HEVC_CRA = b"\x00\x00\x01\x2a\x01\xaf"  # CRA (21)
HEVC_TRAIL = b"\x00\x00\x01\x46\x01\x50\x00\x00\x01\x02\x01\xd0"  # AUD (35), TRAIL_R (1)
MPEG2_I = b"\x00\x00\x01\xb3\x0a\x00\x5a\x33\x00\x00\x01\x00\x00\x0f\xff\xf8"
MPEG2_P = b"\x00\x00\x01\x00\x00\x97\xff\xfb"

STREAM_TYPES = {"h264": 0x1B, "hevc": 0x24, "mpeg2": 0x02}
KEY = {"h264": H264_IDR, "hevc": HEVC_IRAP, "mpeg2": MPEG2_I}
NOT_KEY = {"h264": H264_P, "hevc": HEVC_TRAIL, "mpeg2": MPEG2_P}


def frame(es: bytes, *, rai: bool = False, extra: int = 0) -> bytes:
    """A video PES in ``1 + extra`` packets (the extra ones are continuation packets)."""
    out = packet(VIDEO, pes(es), start=True, rai=rai)
    for _ in range(extra):
        out += packet(VIDEO, b"\x55" * 184)
    return out


def feed_all(fast: FastStart, data: bytes, cuts: list[int]) -> None:
    """Feed ``data`` cut at the given packet indexes."""
    last = 0
    for cut in sorted(set(cuts)) + [len(data) // PACKET_SIZE]:
        if cut > last:
            fast.feed(data[last * PACKET_SIZE : cut * PACKET_SIZE])
            last = cut


def joined(fast: FastStart) -> bytes:
    return b"".join(fast.snapshot())


# -- keyframes in the video ------------------------------------------------------------


class KeyframeTests(SynchronousTestCase):
    def test_h264(self) -> None:
        self.assertTrue(keyframe("h264", pes(H264_IDR)))
        self.assertTrue(keyframe("h264", pes(H264_SPS_IDR)))  # SPS, PPS, then the IDR
        self.assertFalse(keyframe("h264", pes(H264_P)))
        self.assertFalse(keyframe("h264", pes(H264_SPS_P)))  # an SPS before a non-IDR slice is no IDR
        sei = b"\x00\x00\x01\x06" + b"\x05" * 50
        self.assertTrue(keyframe("h264", pes(b"\x00\x00\x01\x09\xf0" + sei + b"\x00\x00\x01\x65")))

    def test_hevc(self) -> None:
        self.assertTrue(keyframe("hevc", pes(HEVC_IRAP)))
        self.assertTrue(keyframe("hevc", pes(HEVC_CRA)))
        for irap in range(16, 22):
            self.assertTrue(keyframe("hevc", pes(bytes([0, 0, 1, irap << 1, 1]))))
        self.assertFalse(keyframe("hevc", pes(HEVC_TRAIL)))

    def test_mpeg2(self) -> None:
        self.assertTrue(keyframe("mpeg2", pes(MPEG2_I)))
        self.assertFalse(keyframe("mpeg2", pes(MPEG2_P)))
        self.assertFalse(keyframe("mpeg2", pes(b"\x00\x00\x01\x00\x00\x9f\xff\xfb")))  # B (3)

    def test_undecided_until_the_bytes_that_tell(self) -> None:
        whole = pes(H264_SPS_IDR)
        for n in range(len(whole) - 1):
            self.assertIn(keyframe("h264", whole[:n]), (None, False))
        self.assertIsNone(keyframe("h264", whole[:5]))  # the PES header itself is cut
        self.assertIsNone(keyframe("mpeg2", pes(MPEG2_I)[:-3]))
        self.assertIsNone(keyframe("hevc", pes(HEVC_IRAP[:6])))
        # out of bytes: only a PES that began with an SPS is taken for a keyframe
        self.assertTrue(keyframe("h264", pes(b"\x00\x00\x01\x67\x42" + b"\x11" * 40), final=True))
        self.assertFalse(keyframe("h264", pes(b"\x00\x00\x01\x09\xf0" + b"\x11" * 40), final=True))
        self.assertFalse(keyframe("mpeg2", b"\x00\x00", final=True))

    def test_not_a_pes(self) -> None:
        self.assertFalse(keyframe("h264", b"\x12\x34\x56" + H264_IDR))


# -- RAPs on packet boundaries ---------------------------------------------------------


def stream(codec: str, *, rai: bool, gops: int = 3, frames: int = 5, extra: int = 2) -> tuple[bytes, list[int]]:
    """PAT, PMT, then GOPs of ``frames`` video PES (a keyframe first) with
    audio and null packets between; returns the bytes and each keyframe's packet index."""
    st = STREAM_TYPES[codec]
    out, keys, cc = [], [], 0
    out += [pat(cc=0), pmt(st, cc=0)]
    for g in range(gops):
        for f in range(frames):
            if f == 2:
                cc += 1
                out += [pat(cc=cc), pmt(st, cc=cc)]
            es = KEY[codec] if f == 0 else NOT_KEY[codec]
            if f == 0:
                keys.append(len(out))
            for i in range(0, len(frame(es, rai=rai and f == 0, extra=extra)), PACKET_SIZE):
                out.append(frame(es, rai=rai and f == 0, extra=extra)[i : i + PACKET_SIZE])
            out += [packet(AUDIO, pes(b"\xff\xfd" + b"\x00" * 20), start=True), NULL_PACKET]
    return b"".join(out), keys


class RapTests(SynchronousTestCase):
    def check(self, codec: str, rai: bool) -> None:
        data, keys = stream(codec, rai=rai)
        fast = FastStart()
        fast.feed(data)
        self.assertEqual((fast.codec, fast.video_pid), (codec, VIDEO))
        self.assertEqual(fast.raps, len(keys))
        self.assertEqual(fast.flags_keyframes, rai)
        last = keys[-1] * PACKET_SIZE
        psi = fast.snapshot()[0]
        # the PAT and PMT before the last keyframe (not those after it), then the stream from it
        before = [data[i : i + PACKET_SIZE] for i in range(0, last, PACKET_SIZE)]
        latest_pat = [p for p in before if p[1:3] == b"\x40\x00"][-1]
        latest_pmt = [p for p in before if p[1:3] == bytes([0x40 | PMT_PID >> 8, PMT_PID & 0xFF])][-1]
        self.assertEqual(psi, latest_pat + latest_pmt)
        self.assertNotEqual(psi, pat(cc=0) + pmt(STREAM_TYPES[codec], cc=0))  # the latest, not the first
        self.assertEqual(joined(fast)[len(psi):], data[last:])

    def test_h264_by_flag(self) -> None:
        self.check("h264", True)

    def test_h264_by_nal(self) -> None:
        self.check("h264", False)

    def test_hevc_by_flag(self) -> None:
        self.check("hevc", True)

    def test_hevc_by_nal(self) -> None:
        self.check("hevc", False)

    def test_mpeg2_by_flag(self) -> None:
        self.check("mpeg2", True)

    def test_mpeg2_by_picture(self) -> None:
        self.check("mpeg2", False)

    def test_mpeg1_stream_type(self) -> None:
        fast = FastStart()
        fast.feed(pat() + pmt(0x01) + frame(MPEG2_I))
        self.assertEqual((fast.codec, fast.raps), ("mpeg2", 1))

    def test_a_flag_on_another_pid_is_no_rap(self) -> None:
        fast = FastStart()
        fast.feed(pat() + pmt(0x1B) + packet(AUDIO, pes(b"\xff\xfd"), start=True, rai=True) + frame(H264_P))
        self.assertEqual((fast.raps, fast.snapshot()), (0, []))

    def test_a_muxer_that_flags_keyframes_is_trusted(self) -> None:
        fast = FastStart()
        fast.feed(pat() + pmt(0x1B) + frame(H264_P, rai=True) + frame(H264_IDR))  # unflagged IDR after a flag
        self.assertEqual(fast.raps, 1)
        self.assertEqual(joined(fast)[2 * PACKET_SIZE :], frame(H264_P, rai=True) + frame(H264_IDR))

    def test_no_pmt_no_cache(self) -> None:
        fast = FastStart()
        fast.feed(frame(H264_IDR, rai=True) + pat() + frame(H264_IDR, rai=True))
        self.assertEqual((fast.video_pid, fast.snapshot()), (None, []))
        fast.feed(pmt(0x03) + frame(H264_IDR, rai=True))  # audio-only programme
        self.assertEqual((fast.video_pid, fast.snapshot()), (None, []))

    def test_a_pmt_naming_another_video_pid_drops_the_cache(self) -> None:
        fast = FastStart()
        fast.feed(pat() + pmt(0x1B) + frame(H264_IDR))
        self.assertTrue(fast.snapshot())
        other = 0x0200
        for _ in range(20):  # the tables are looked at again within PSI_CHECK pieces
            fast.feed(pmt(0x1B, video=other) + packet(VIDEO, pes(H264_IDR), start=True))
        self.assertEqual((fast.video_pid, fast.snapshot()), (other, []))
        idr = packet(other, pes(H264_IDR), start=True)
        fast.feed(idr)
        self.assertEqual(joined(fast)[2 * PACKET_SIZE :], idr)
        self.assertEqual(joined(fast)[PACKET_SIZE : 2 * PACKET_SIZE], pmt(0x1B, video=other))

    def test_reset_forgets_the_tables(self) -> None:
        fast = FastStart()
        fast.feed(pat() + pmt(0x1B) + frame(H264_IDR))
        fast.reset()
        self.assertEqual((fast.video_pid, fast.snapshot(), fast.backlog_bytes), (None, [], 0))
        fast.feed(frame(H264_IDR, rai=True))
        self.assertEqual(fast.snapshot(), [])

    def test_a_last_piece_cut_mid_packet_ends_it(self) -> None:
        fast = FastStart()
        fast.feed(pat() + pmt(0x1B) + frame(H264_IDR))
        fast.feed(b"\x47\x01")
        self.assertEqual(fast.snapshot(), [])


# -- every way to cut it ---------------------------------------------------------------


def split_pes_stream() -> tuple[bytes, int]:
    """An IDR whose PES header is split over two packets (the first packet
    has a 4-byte payload), with audio between its packets, after a P frame."""
    whole = pes(H264_SPS_IDR)
    first = packet(VIDEO, whole[:4], start=True, af=178)
    second = packet(VIDEO, whole[4:])
    head = pat() + pmt(0x1B) + frame(H264_P)
    data = head + first + packet(AUDIO, b"\x00" * 184) + NULL_PACKET + second + frame(H264_P, extra=1)
    return data, len(head) // PACKET_SIZE


class SplitTests(SynchronousTestCase):
    def test_a_pes_header_split_across_packets(self) -> None:
        data, rap = split_pes_stream()
        fast = FastStart()
        fast.feed(data)
        self.assertEqual(fast.raps, 1)
        self.assertEqual(joined(fast)[2 * PACKET_SIZE :], data[rap * PACKET_SIZE :])

    def test_every_cut_into_two_and_three_pieces(self) -> None:
        for data, name in [(split_pes_stream()[0], "split"), (stream("h264", rai=False, gops=2, frames=3)[0], "h264")]:
            whole = FastStart()
            whole.feed(data)
            expected = joined(whole)
            packets = len(data) // PACKET_SIZE
            for a in range(1, packets):
                for b in range(a, packets):
                    fast = FastStart()
                    feed_all(fast, data, [a, b])
                    self.assertEqual(joined(fast), expected, f"{name}: cut at {a} and {b}")

    def test_one_packet_at_a_time(self) -> None:
        for codec in ("h264", "hevc", "mpeg2"):
            data, _ = stream(codec, rai=False)
            whole, single = FastStart(), FastStart()
            whole.feed(data)
            feed_all(single, data, list(range(len(data) // PACKET_SIZE)))
            self.assertEqual(joined(single), joined(whole), codec)

    def test_the_simulated_engine_in_random_pieces(self) -> None:
        rnd = random.Random(15)
        for codec, rai in (("h264", True), ("h264", False), ("mpeg2", False)):
            data = TSGenerator(4_000_000, codec=codec, gop=1.0, random_access_indicator=rai).for_duration(4.5)
            whole = FastStart()
            whole.feed(data)
            self.assertEqual(whole.raps, 5, codec)
            for _ in range(5):
                fast = FastStart()
                pos = 0
                while pos < len(data):
                    n = rnd.choice([1, 2, 7, 64, 349, 1000]) * PACKET_SIZE
                    fast.feed(memoryview(data)[pos : pos + n])  # memoryviews too
                    pos += n
                self.assertEqual(joined(fast), joined(whole), codec)


# -- the cap and the budget ----------------------------------------------------------------


class BoundsTests(SynchronousTestCase):
    def test_a_gop_over_the_cap_drops_the_cache_until_the_next_rap(self) -> None:
        budget = BacklogBudget(10**9, clock=Clock())
        fast = FastStart(cap=20 * PACKET_SIZE, budget=budget)
        fast.feed(pat() + pmt(0x1B) + frame(H264_IDR, extra=3))
        self.assertEqual(budget.total, (2 + 4) * PACKET_SIZE)  # the PAT and PMT copies count too
        for _ in range(20):
            fast.feed(frame(H264_P))
            self.assertLessEqual(fast.backlog_bytes, 20 * PACKET_SIZE)
            self.assertEqual(budget.total, fast.backlog_bytes)
        self.assertEqual((fast.snapshot(), fast.overflows, budget.total, dict(budget.holders)), ([], 1, 0, {}))
        fast.feed(frame(H264_P) * 3)
        self.assertEqual(fast.snapshot(), [])  # not before the next RAP
        fast.feed(frame(H264_IDR))
        self.assertEqual(joined(fast)[2 * PACKET_SIZE :], frame(H264_IDR))
        self.assertEqual(budget.total, 3 * PACKET_SIZE)

    def test_moving_on_to_a_new_rap_resizes_without_a_trim(self) -> None:
        trims: list[int] = []
        budget = BacklogBudget(10**9, clock=Clock(), trim=lambda: trims.append(1), trim_after=1)
        fast = FastStart(budget=budget)
        fast.feed(pat() + pmt(0x1B) + frame(H264_IDR, extra=50))
        fast.feed(frame(H264_IDR))
        self.assertEqual((budget.total, trims), (3 * PACKET_SIZE, []))
        fast.reset()  # memory really going: released (and trimmed)
        self.assertEqual((budget.total, trims, fast in budget.holders), (0, [1], False))

    def test_the_budget_cuts_the_cache_like_a_player(self) -> None:
        budget = BacklogBudget(10 * PACKET_SIZE, clock=Clock())
        fast = FastStart(budget=budget)
        fast.feed(pat() + pmt(0x1B) + frame(H264_IDR, extra=5))
        self.assertEqual(budget.total, 8 * PACKET_SIZE)
        fast.feed(frame(H264_P, extra=5))  # 14 packets: over the budget's cap, and the largest holder
        self.assertEqual((fast.snapshot(), fast.cuts, budget.cuts, budget.total), ([], 1, 1, 0))
        fast.feed(frame(H264_IDR))
        self.assertEqual(budget.total, 3 * PACKET_SIZE)


# -- a joiner through the fan-out ------------------------------------------------------------


class FakeSink:
    def __init__(self, max_backlog: int = 10**9) -> None:
        self.paused = False
        self.peer = "joiner"
        self.bytes_sent = 0
        self.max_backlog = max_backlog
        self.ended = False
        self.received: list[bytes] = []

    def deliver(self, data: bytes, framed: Optional[bytes] = None) -> None:
        self.received.append(bytes(data))
        self.bytes_sent += len(data)

    def end(self, clean: bool, error: Any) -> None:
        self.ended = True


class SeamTests(SynchronousTestCase):
    def test_cache_then_live_is_the_engine_stream_from_the_rap(self) -> None:
        """Pieces of random sizes; joiners attach between any two pieces: each
        gets PAT, PMT, then the engine's bytes from the latest RAP, byte for byte."""
        data = TSGenerator(4_000_000, codec="h264", gop=0.5, random_access_indicator=False).for_duration(3.0)
        rnd = random.Random(3)
        fast, fanout = FastStart(), Fanout()
        joiners: list[tuple[FakeSink, int]] = []
        pos = 0
        while pos < len(data):
            n = rnd.randint(1, 120) * PACKET_SIZE
            piece = data[pos : pos + n]
            fast.feed(piece)
            fanout.deliver(piece)
            pos += len(piece)
            if rnd.random() < 0.3:
                sink = FakeSink()
                fanout.add(sink)
                fanout.replay(sink, fast)
                joiners.append((sink, pos))
        self.assertGreater(len(joiners), 5)
        for sink, at in joiners:
            got = b"".join(sink.received)
            if not got:
                continue  # joined before the first keyframe: the live edge
            psi_pat, psi_pmt, rest = got[:PACKET_SIZE], got[PACKET_SIZE : 2 * PACKET_SIZE], got[2 * PACKET_SIZE :]
            self.assertEqual(((psi_pat[1] & 0x1F) << 8 | psi_pat[2], (psi_pmt[1] & 0x1F) << 8 | psi_pmt[2]), (PAT_PID, PMT_PID))
            start = len(data) - len(rest)
            self.assertEqual(rest, data[start:], "cache + live = the stream from the RAP on")
            self.assertLessEqual(start, at)
            self.assertTrue(keyframe("h264", data[start + 4 : start + PACKET_SIZE]))
            # and it is the latest keyframe before the joiner came
            for later in range(start + PACKET_SIZE, at, PACKET_SIZE):
                p = data[later : later + PACKET_SIZE]
                if (p[1] & 0x1F) << 8 | p[2] == VIDEO and p[1] & 0x40:
                    self.assertFalse(keyframe("h264", p[4:] if not p[3] & 0x20 else p[5 + p[4] :], True))

    def test_a_cache_bigger_than_the_players_cap_is_not_replayed(self) -> None:
        fast, fanout = FastStart(), Fanout()
        fast.feed(pat() + pmt(0x1B) + frame(H264_IDR, extra=20))
        small = FakeSink(max_backlog=10 * PACKET_SIZE)
        fanout.add(small)
        self.assertEqual((fanout.replay(small, fast), small.received), (0, []))
        big = FakeSink()
        fanout.add(big)
        self.assertEqual(fanout.replay(big, fast), 23 * PACKET_SIZE)


# -- in a session ---------------------------------------------------------------------------


class Placement:
    def __init__(self, engine: Any) -> None:
        self.engine = engine

    async def place(self, key: Any, *, avoid: frozenset = frozenset()) -> tuple:
        info = await self.engine.start(key)
        return self.engine, info

    def release(self, key: Any) -> None:
        pass


class SessionSink(FakeSink):
    session: Any = None

    def end(self, clean: bool, error: Any) -> None:
        self.ended = True
        session, self.session = self.session, None
        if session is not None:
            session.detach(self)


class SessionTests(SynchronousTestCase):
    def session(self, **settings: Any) -> tuple[Any, Any, BacklogBudget, list]:
        from acexy_tw.streaming.session import EngineSession, SessionSettings
        from acexy_tw.testing import ScriptedEngine, key

        budget = BacklogBudget(10**9, clock=Clock())
        engine = ScriptedEngine()
        closed: list = []
        session = EngineSession(
            key(),
            Placement(engine),
            Clock(),
            SessionSettings(empty_timeout=60, linger=0, budget=budget, **settings),
            on_closed=lambda s, reason: closed.append(reason),
        )
        return session, engine, budget, closed

    def test_first_player_live_joiner_from_the_rap_budget_released_at_close(self) -> None:
        session, engine, budget, closed = self.session()
        first = SessionSink()
        session.attach(first)
        session.start()
        data = TSGenerator(4_000_000, codec="h264", gop=1.0).for_duration(2.5)
        half = len(data) // PACKET_SIZE // 2 * PACKET_SIZE
        engine.response.data(data[:half])
        self.assertEqual(b"".join(first.received), data[:half])  # the first player: the live stream as before
        self.assertGreater(budget.total, 0)  # the cache counts in ACEXY_MAX_BACKLOG
        joiner = SessionSink()
        session.attach(joiner)
        engine.response.data(data[half:])
        got = b"".join(joiner.received)
        self.assertEqual(got[2 * PACKET_SIZE :], data[len(data) - len(got) + 2 * PACKET_SIZE :])
        self.assertTrue(keyframe("h264", got[2 * PACKET_SIZE + 5 + got[2 * PACKET_SIZE + 4] :]))
        session.close("stopped")
        self.assertEqual((budget.total, dict(budget.holders), closed), (0, {}, ["stopped"]))

    def test_a_player_joining_before_any_rap_starts_at_the_live_edge(self) -> None:
        session, engine, budget, _ = self.session()
        session.attach(SessionSink())
        session.start()
        data = TSGenerator(4_000_000, codec="h264", gop=1.0).for_duration(1.5)
        keyless = data[: 3 * PACKET_SIZE]  # PCR, PAT, PMT: no keyframe yet
        engine.response.data(keyless)
        joiner = SessionSink()
        session.attach(joiner)
        self.assertEqual(joiner.received, [])
        engine.response.data(data[3 * PACKET_SIZE :])
        self.assertEqual(b"".join(joiner.received), data[3 * PACKET_SIZE :])

    def test_the_engine_lost_drops_the_cache(self) -> None:
        session, engine, budget, _ = self.session()
        session.attach(SessionSink())
        session.start()
        engine.response.data(TSGenerator(4_000_000, codec="h264", gop=1.0).for_duration(1.5))
        self.assertGreater(budget.total, 0)
        engine.response.eof()
        self.assertEqual(budget.total, 0)

    def test_off(self) -> None:
        session, engine, budget, _ = self.session(fast_start=0)
        session.attach(SessionSink())
        session.start()
        engine.response.data(TSGenerator(4_000_000, codec="h264", gop=1.0).for_duration(1.5))
        joiner = SessionSink()
        session.attach(joiner)
        self.assertEqual((budget.total, joiner.received), (0, []))

    def test_the_cache_is_backlog_under_the_joiners_flow_control(self) -> None:
        """A joiner whose transport is full after the first write: the rest of
        the cache waits in its sink (its backlog, in the budget, past its
        high-water mark: paused), and drains when the transport resumes."""
        from acexy_tw.streaming.sink import ClientSink

        session, engine, budget, _ = self.session()
        session.attach(SessionSink())
        session.start()
        data = TSGenerator(4_000_000, codec="h264", gop=1.0).for_duration(1.8)
        for i in range(0, len(data), 64 * PACKET_SIZE):
            engine.response.data(data[i : i + 64 * PACKET_SIZE])
        cache = session._fast.cached_bytes

        class Request:
            chunked = False
            producer: Any = None
            def __init__(self) -> None:
                self.written: list[bytes] = []

            def registerProducer(self, producer: Any, streaming: bool) -> None:
                self.producer = producer

            def unregisterProducer(self) -> None:
                self.producer = None

            def write(self, data: bytes) -> None:
                self.written.append(bytes(data))
                self.producer.pauseProducing()  # the transport is full at once

        request = Request()
        sink = ClientSink(request, clock=Clock(), max_backlog=8 * 1024 * 1024, stuck_timeout=0, high_water=64 * 1024, budget=budget)
        session.attach(sink)
        self.assertEqual(len(request.written), 1)  # PAT and PMT (with the headers)
        self.assertEqual(sink.backlog_bytes, cache - 2 * PACKET_SIZE)
        self.assertEqual(budget.total, cache + sink.backlog_bytes)
        self.assertTrue(sink.paused)
        self.assertFalse(session.upstream_paused)  # the other player keeps the engine going
        sink.resumeProducing()  # write() pauses again: one piece per resume
        while sink.backlog_bytes:
            sink.resumeProducing()
        self.assertEqual(b"".join(request.written)[2 * PACKET_SIZE :], data[len(data) - cache + 2 * PACKET_SIZE :])
        self.assertEqual(budget.total, cache)
