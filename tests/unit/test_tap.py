"""Options, makeService and the service tree's start/stop, on a fake reactor."""

from __future__ import annotations

import os

from twisted.application.service import MultiService
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from acexy_tw.service import AcexyService
from acexy_tw.tap import ConfigExit, Options, makeService


def parse(*argv: str, **env: str) -> Options:
    opts = Options()
    opts.parseOptions(list(argv))
    return opts


class OptionsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.patch(os, "environ", {})

    def test_defaults_are_acexys(self) -> None:
        c = parse().config
        self.assertEqual((c.listen, c.engine_host, c.engine_port, c.engine_scheme), ("tcp:8080:backlog=1024", "localhost", 6878, "http"))
        self.assertEqual((c.buffer_size, c.linger, c.empty_timeout), (4 * 1024 * 1024, 5.0, 60.0))

    def test_env_then_flag(self) -> None:
        self.patch(os, "environ", {"ACEXY_HOST": "engine.lan", "ACEXY_ADDR": ":9000"})
        c = parse().config
        self.assertEqual((c.engine_host, c.listen), ("engine.lan", "tcp:9000:backlog=1024"))
        c = parse("--engine-host", "other").config
        self.assertEqual(c.engine_host, "other")

    def test_bad_env_value_exits_naming_the_variable(self) -> None:
        self.patch(os, "environ", {"ACEXY_EMPTY_TIMEOUT": "soon"})
        e = self.assertRaises(ConfigExit, parse)
        self.assertIn("ACEXY_EMPTY_TIMEOUT='soon'", str(e))
        self.assertEqual(e.code, str(e))  # SystemExit prints its message and exits 1

    def test_demo_flag(self) -> None:
        self.assertTrue(parse("--demo").config.demo)
        self.assertFalse(parse().config.demo)


class ServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.patch(os, "environ", {})

    def test_make_service_shape(self) -> None:
        svc = makeService(parse("--listen", "tcp:0:interface=127.0.0.1"), reactor=MemoryReactorClock())
        self.assertIsInstance(svc, AcexyService)
        self.assertIsInstance(svc, MultiService)
        self.assertEqual(list(svc), [svc.listener])
        self.assertEqual(svc.engine.address.url, "http://localhost:6878")

    def test_demo_adds_the_simulated_engine(self) -> None:
        svc = makeService(parse("--demo", "--listen", "tcp:0"), reactor=MemoryReactorClock())
        self.assertEqual(list(svc), [svc.sim, svc.monitor, svc.listener])  # demo: engine + orchestrator

    def test_bad_strports_description_exits_naming_the_variable(self) -> None:
        e = self.assertRaises(ConfigExit, makeService, parse("--listen", "tcp:notaport"), MemoryReactorClock())
        self.assertIn("ACEXY_LISTEN_ADDR", str(e))

    def test_start_then_stop_leaves_nothing_behind(self) -> None:
        reactor = MemoryReactorClock()
        svc = makeService(parse("--listen", "tcp:0:interface=127.0.0.1"), reactor=reactor)
        svc.startService()
        self.assertEqual(len(reactor.tcpServers), 1)
        port = self.successResultOf(svc.listener.when_listening())
        self.assertIsNotNone(port)
        self.successResultOf(svc.stopService())
        self.assertEqual(reactor.getDelayedCalls(), [])
        self.assertFalse(svc.running)
