#!/usr/bin/env python3
"""
Many-contents benchmark for acexy-tw: 20 contents × 5 players at 4 Mbit/s.

    .venv/bin/python bench/contents.py [--contents 20] [--clients 5] [--bitrate 4M] [--seconds 20]

The same measurement as ``bench/fanout.py`` (fresh simulated engine and
proxy, load clients in 2–3 processes behind one start barrier, same figures),
with K contents of M clients each: every client's bytes are compared with
what the engine sent for *its* content, and the engine sessions opened must
be K (proxy status, proxy metrics and the engine's getstream count).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fanout import common_args, parse_bitrate, run_main  # noqa: E402


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="acexy-tw many-contents bench: K contents × M players")
    parser.add_argument("--contents", type=int, default=20, help="contents (default 20)")
    parser.add_argument("--clients", type=int, default=5, help="clients per content (default 5)")
    parser.add_argument("--bitrate", default="4M", help="engine bitrate per content (default 4M)")
    common_args(parser)
    args = parser.parse_args(argv)
    parse_bitrate(args.bitrate)
    plan = [
        {
            "label": f"{args.contents}×{args.clients}",
            "contents": args.contents,
            "per_content": args.clients,
            "bitrate": args.bitrate,
        }
    ]
    return run_main(
        args, name="contents", title="many-contents bench: K contents × M clients", label="K×M", plan=plan
    )


if __name__ == "__main__":
    sys.exit(main())
