"""
What a plain proxy loads: ``twistd acexy``'s service for a configuration with
no TLS, no demo and no orchestrator, built in a fresh interpreter, must not
pull in test machinery (Twisted's ``internet.testing`` brings trial, unittest
and doctest: 3 MiB) nor TLS (pyOpenSSL and cryptography: 12 MiB). Idle memory
itself is measured in ``bench/memory.py``, not asserted here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

SCRIPT = r"""
import json, sys
from acexy_tw.tap import Options, makeService
options = Options()
options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--engine-host", "127.0.0.1"])
service = makeService(options)
print(json.dumps(sorted(m for m, v in sys.modules.items() if v is not None)))  # None: marked missing
"""

NEVER = (
    "OpenSSL",
    "cryptography",
    "twisted.internet.testing",
    "twisted.trial.unittest",
    "doctest",
    "acexy_tw.sim",
    "acexy_tw.testing",
)


class FootprintTests(SynchronousTestCase):
    def test_a_plain_proxy_loads_no_tls_no_test_machinery_no_simulator(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ACEXY_")}
        out = subprocess.run(
            [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=60, check=True
        ).stdout
        loaded = json.loads(out.strip().splitlines()[-1])
        self.assertIn("acexy_tw.service", loaded)  # the script did build the service
        found = [m for m in loaded if any(m == n or m.startswith(n + ".") for n in NEVER)]
        self.assertEqual(found, [])
