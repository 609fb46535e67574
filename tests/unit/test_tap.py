"""Options, makeService and the service tree's start/stop, on a fake reactor."""

from __future__ import annotations

import os

from twisted.application.service import MultiService
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from acexy_tw.service import AcexyService
from acexy_tw.tap import ConfigExit, Options, leave_tls_unloaded, makeService, uses_tls


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
        port = self.successResultOf(svc.when_listening())
        self.assertIsNotNone(port)
        self.successResultOf(svc.stopService())
        self.assertEqual(reactor.getDelayedCalls(), [])
        self.assertFalse(svc.running)


class TLSStackTests(SynchronousTestCase):
    """Whether the process needs pyOpenSSL at all (see ``leave_tls_unloaded``)."""

    def setUp(self) -> None:
        self.patch(os, "environ", {})

    def test_plain_listeners_and_http_peers_need_no_tls(self) -> None:
        for listen in (":8080", "127.0.0.1:8080", "[::1]:8080", "tcp:8080", "unix:/run/acexy.sock",
                       "systemd:domain=INET:index=0"):  # fmt: skip
            self.assertFalse(uses_tls(parse("--listen", listen).config), listen)
        self.assertFalse(uses_tls(parse("--orch-url", "http://orchestrator:8000").config))

    def test_a_tls_listener_an_https_engine_or_orchestrator_needs_it(self) -> None:
        self.assertTrue(uses_tls(parse("--listen", "ssl:8443:privateKey=k.pem").config))
        self.assertTrue(uses_tls(parse("--listen", "le:/srv/certs:tcp:443").config))  # any other endpoint type
        self.assertTrue(uses_tls(parse("--engine-scheme", "https").config))
        self.assertTrue(uses_tls(parse("--orch-url", "https://orchestrator:8443").config))

    def test_never_done_once_twisted_tcp_or_pyopenssl_is_loaded(self) -> None:
        # This test process has both: marking pyOpenSSL missing now would break it.
        self.assertFalse(leave_tls_unloaded())
        import sys

        self.assertIsNotNone(sys.modules["OpenSSL"])
