#!/usr/bin/env python3
"""
The simulated AceStream engine as its own process, plus a stats port.

    .venv/bin/python bench/simengine.py --port P --stats-port S [--bitrate 8M | --flat-out]

It is ``python -m acexy_tw.sim.engine`` (the same :class:`SimEngine`, same
defaults: 25 ms ticks, 64 KiB flat-out writes) with one addition for the
benches: ``GET http://127.0.0.1:S/`` answers JSON with the engine's own
records, which the proxy cannot fake: the number of getstream calls, every
session's bytes sent, stop commands and open playback connections.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from twisted.web.resource import Resource
from twisted.web.server import Site

from acexy_tw.sim.engine import Behaviour, SimEngine, parse_bitrate


class _Stats(Resource):
    isLeaf = True

    def __init__(self, engine: SimEngine) -> None:
        super().__init__()
        self._engine = engine

    def render_GET(self, request) -> bytes:
        e = self._engine
        doc = {
            "time": e.reactor.seconds(),
            "getstream_calls": len(e.getstream_calls),
            "stop_count": e.stop_count,
            "open_playbacks": e.open_playbacks,
            "connections": e.connections,
            "active_sessions": len(e.active_sessions),
            "sessions": [
                {
                    "id": s.playback_session_id,
                    "content_key": s.content_key.lower(),
                    "bytes_sent": s.bytes_sent,
                    "stopped": s.stopped,
                    "stop_commands": s.stop_commands,
                    "playbacks": len(s.playbacks),
                    "open_playbacks": len(s.open_playbacks),
                    "created_at": s.created_at,
                }
                for s in e.sessions.values()
            ],
        }
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(doc).encode()


class _QuietSite(Site):
    noisy = False

    def log(self, request) -> None:
        pass


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="bench/simengine.py", description=__doc__.split("\n\n")[1])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--stats-port", type=int, required=True)
    parser.add_argument("--interface", default="127.0.0.1")
    rate = parser.add_mutually_exclusive_group()
    rate.add_argument("--bitrate", type=parse_bitrate, default=4_000_000, help="e.g. 4M, 500k, 8000000")
    rate.add_argument("--flat-out", action="store_true")
    parser.add_argument("--prebuffer", type=float, default=0.0, help="seconds before playback headers")
    args = parser.parse_args(argv)

    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    engine = SimEngine(
        reactor,
        bitrate=None if args.flat_out else args.bitrate,
        behaviour=Behaviour(playback_delay=args.prebuffer),
    )
    engine.listen(args.port, args.interface)
    reactor.listenTCP(args.stats_port, _QuietSite(_Stats(engine)), interface="127.0.0.1")
    reactor.addSystemEventTrigger("before", "shutdown", engine.close)
    rate = "flat out" if args.flat_out else f"{args.bitrate} bit/s"
    print(f"simulated engine on {engine.url} ({rate}), stats on 127.0.0.1:{args.stats_port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
