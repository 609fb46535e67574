"""
Fast start over loopback: players joining a running session (SimEngine with
4 s GOPs, real time) get PAT, PMT, then a video PES that starts at a random
access point — not the live edge in the middle of a GOP — and ffmpeg decodes
a joiner's first video frame as a keyframe. Joiners come at random (seeded)
moments, measured in the first player's bytes: nothing sleeps.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from typing import Any

from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from acexy_tw.sim.tsgen import PAT_PID, PMT_PID, VIDEO_PID
from tests.integration.harness import TSPlayer, reactor, sim_engine, start_proxy, within

log = Logger()

PACKET = 188
BITRATE = 4_000_000
BYTES_PER_SECOND = BITRATE // 8
GOP = 4.0


def pid_of(packet: bytes) -> int:
    return (packet[1] & 0x1F) << 8 | packet[2]


def es_of(packet: bytes) -> bytes:
    """The elementary stream bytes in a PES's first packet."""
    pos = 4 + (1 + packet[4] if packet[3] & 0x20 else 0)
    pes = packet[pos:]
    assert pes[:3] == b"\x00\x00\x01", pes[:8].hex()
    return pes[9 + pes[8] :]


def check_joiner_start(test: TestCase, data: bytes, *, flagged: bool) -> None:
    """PAT, PMT, then the first packet of a video PES that is a keyframe."""
    first, second, third = (data[i * PACKET : (i + 1) * PACKET] for i in range(3))
    test.assertEqual([pid_of(first), pid_of(second), pid_of(third)], [PAT_PID, PMT_PID, VIDEO_PID])
    test.assertTrue(first[1] & 0x40 and second[1] & 0x40 and third[1] & 0x40, "each a section or PES start")
    if flagged:
        test.assertTrue(third[3] & 0x20 and third[4] and third[5] & 0x40, "random_access_indicator")
    else:
        test.assertFalse(third[3] & 0x20 and third[4] and third[5] & 0x40)
    es = es_of(third)
    # the access unit: AUD, then SPS (7), PPS (8) and an IDR slice (5)
    nal_types = [es[i + 3] & 0x1F for i in range(len(es) - 3) if es[i : i + 3] == b"\x00\x00\x01"]
    test.assertEqual(nal_types[:4], [9, 7, 8, 5])


class FastStartTests(TestCase):
    async def joiners(self, *, flagged: bool, seed: int, count: int) -> None:
        engine = sim_engine(self, bitrate=BITRATE, gop=GOP, codec="h264", random_access_indicator=flagged)
        proxy = await start_proxy(self, engine, linger="0")
        first = await within(TSPlayer.open(self, proxy.stream_url()))
        await within(first.when_real(1))
        rnd = random.Random(seed)
        # moments in the first player's stream: anywhere in the first two GOPs but the very start
        moments = sorted(rnd.uniform(0.3, 2 * GOP - 0.2) for _ in range(count))
        players = []
        for moment in moments:
            await first.when(lambda p, n=int(moment * BYTES_PER_SECOND): len(p.received) >= n, f"{moment:.2f}s of stream")
            players.append(await within(TSPlayer.open(self, proxy.stream_url())))
        for player in players:
            await player.when(lambda p: len(p.received) >= 3 * PACKET, "three packets")
        # the first player got the live stream as before: the engine's own first packet (a PCR) first
        self.assertEqual((pid_of(first.received[:PACKET]), first.received[1] & 0x40), (VIDEO_PID, 0))
        for moment, player in zip(moments, players):
            check_joiner_start(self, bytes(player.received), flagged=flagged)
        self.assertEqual(len(engine.sessions), 1)  # one engine session for them all
        for player in [first, *players]:
            player.transport.loseConnection()

    async def test_joiners_start_at_a_flagged_keyframe(self) -> None:
        await self.joiners(flagged=True, seed=15, count=5)

    async def test_joiners_start_at_an_idr_when_nothing_is_flagged(self) -> None:
        await self.joiners(flagged=False, seed=16, count=2)

    async def test_ffmpeg_decodes_a_joiners_first_frame_as_a_keyframe(self) -> None:
        ffprobe, ffmpeg = shutil.which("ffprobe"), shutil.which("ffmpeg")
        if ffprobe is None or ffmpeg is None:
            self.skipTest("ffmpeg/ffprobe is not installed")
        engine = sim_engine(self, bitrate=BITRATE, gop=GOP, codec="h264")
        proxy = await start_proxy(self, engine, linger="0")
        first = await within(TSPlayer.open(self, proxy.stream_url()))
        # mid-GOP: 1.5 s into a 4 s GOP
        await first.when(lambda p: len(p.received) >= int(1.5 * BYTES_PER_SECOND), "1.5 s of stream")
        connected = reactor.seconds()
        joiner = await within(TSPlayer.open(self, proxy.stream_url()))
        want = BYTES_PER_SECOND  # one second of stream after joining
        await joiner.when(lambda p: len(p.received) >= want, "a second of stream")
        data = bytes(joiner.received[: len(joiner.received) // PACKET * PACKET])

        folder = tempfile.mkdtemp(prefix="acexy-fast-start-")
        self.addCleanup(shutil.rmtree, folder, True)
        path = os.path.join(folder, "joiner.ts")
        with open(path, "wb") as f:
            f.write(data)
        out, err, status = await within(
            getProcessOutputAndValue(
                ffprobe,
                ["-v", "error", "-select_streams", "v:0", "-show_frames", "-read_intervals", "%+#3",
                 "-show_entries", "frame=key_frame,pict_type,pkt_pos,pkt_size", "-of", "json", path],
                env=dict(os.environ),
            )
        )
        self.assertEqual(status, 0, err)
        frames = json.loads(out)["frames"]
        self.assertTrue(frames, err)
        key_frame, pict_type, pos, size = (frames[0][k] for k in ("key_frame", "pict_type", "pkt_pos", "pkt_size"))
        self.assertEqual((key_frame, pict_type), (1, "I"), frames)
        self.assertEqual(int(pos), 2 * PACKET)  # the very first video packet after PAT and PMT
        # the first frame's bytes: up to the next video PES start
        start = int(pos)
        end = next(
            (i for i in range(start + PACKET, len(data), PACKET) if pid_of(data[i : i + PACKET]) == VIDEO_PID and data[i + 1] & 0x40),
            len(data),
        )
        first_frame_after = joiner.arrival_of(end - 1) - connected
        log.info(
            "fast start: the joiner's first video frame (I, {size} bytes at offset {pos}) had arrived "
            "{ms:.1f} ms after it connected",
            size=size,
            pos=pos,
            ms=first_frame_after * 1000,
        )
        print(f"\nfast start: first decoded video frame of a joiner (1.5 s into a 4 s GOP) complete "
              f"{first_frame_after * 1000:.1f} ms after connecting (offset {pos}, {pict_type}, key_frame={key_frame})")
        # and the video decodes without a single error from that frame on
        _, err, status = await within(
            getProcessOutputAndValue(ffmpeg, ["-nostdin", "-v", "error", "-i", path, "-map", "0:v", "-f", "null", "-"], env=dict(os.environ))
        )
        self.assertEqual((status, err.decode(errors="replace").strip()), (0, ""))
        for player in (first, joiner):
            player.transport.loseConnection()
