"""Options, makeService and the service tree's start/stop, on a fake reactor."""

from __future__ import annotations

import io
import os
import sys

from twisted.application.service import MultiService
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from acexy_tw._version import __version__
from acexy_tw.logs import set_level

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
        self.assertEqual(list(svc), [svc.proxy.engines, svc.listener])  # the pool is probed
        self.assertEqual(svc.engine.address.url, "http://localhost:6878")

    def test_demo_adds_the_simulated_engine(self) -> None:
        svc = makeService(parse("--demo", "--listen", "tcp:0"), reactor=MemoryReactorClock())
        self.assertEqual(list(svc), [svc.sim, svc.monitor, svc.proxy.engines, svc.listener])  # demo: engine + orchestrator

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


class SwitchTests(SynchronousTestCase):
    """Boolean settings are plain switches: ``twistd -n acexy --m3u8``."""

    def setUp(self) -> None:
        self.patch(os, "environ", {})

    def test_m3u8_and_access_log_are_switches(self) -> None:
        c = parse("--m3u8", "--access-log").config
        self.assertEqual((c.m3u8, c.access_log), (True, True))
        c = parse().config
        self.assertEqual((c.m3u8, c.access_log), (False, False))

    def test_a_switch_takes_no_value(self) -> None:
        self.assertRaises(usage.UsageError, parse, "--m3u8", "true")  # "true" is an extra argument
        self.assertRaises(usage.UsageError, parse, "--m3u8=true")

    def test_the_environment_applies_without_the_switch(self) -> None:
        for text in ("true", "1", "yes", "on", "TRUE"):
            self.patch(os, "environ", {"ACEXY_M3U8": text, "ACEXY_ACCESS_LOG": text})
            c = parse().config
            self.assertEqual((c.m3u8, c.access_log), (True, True), text)
        for text in ("false", "0", "no", "off"):
            self.patch(os, "environ", {"ACEXY_M3U8": text})
            self.assertFalse(parse().config.m3u8, text)

    def test_the_switch_beats_an_environment_false(self) -> None:
        self.patch(os, "environ", {"ACEXY_M3U8": "false"})
        self.assertTrue(parse("--m3u8").config.m3u8)

    def test_a_bad_environment_boolean_still_names_the_variable(self) -> None:
        self.patch(os, "environ", {"ACEXY_M3U8": "maybe"})
        e = self.assertRaises(ConfigExit, parse)
        self.assertIn("ACEXY_M3U8='maybe'", str(e))

    def test_demo_is_still_a_switch_and_value_options_still_take_values(self) -> None:
        c = parse("--demo", "--m3u8", "--m3u8-stream-timeout", "90s").config
        self.assertEqual((c.demo, c.m3u8, c.m3u8_stream_timeout), (True, True, 90.0))


class VersionTests(SynchronousTestCase):
    """``twistd acexy --version`` is acexy-tw's version, not Twisted's."""

    def version_output(self, env: dict) -> tuple[object, str]:
        self.patch(os, "environ", env)
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        e = self.assertRaises(SystemExit, parse, "--version")
        return e.code, out.getvalue()

    def test_version_prints_acexy_tws_version_and_exits_0(self) -> None:
        code, out = self.version_output({})
        self.assertIn(code, (0, None))  # sys.exit(0)
        self.assertTrue(out.startswith(f"acexy-tw {__version__.public()} "), out)
        self.assertIn("Twisted", out)
        self.assertEqual(len(out.splitlines()), 1)

    def test_version_works_whatever_the_settings(self) -> None:
        code, out = self.version_output({"ACEXY_PORT": "not-a-port"})  # parsed before postOptions
        self.assertIn(code, (0, None))
        self.assertIn("acexy-tw", out)


class UnknownVariableTests(SynchronousTestCase):
    """An unknown ACEXY_* variable is a warning at start-up, never an error."""

    def setUp(self) -> None:
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.addCleanup(set_level, "info")  # makeService sets ACEXY_LOG_LEVEL's level

    def warnings(self) -> list[str]:
        return [formatEvent(e) for e in self.events if e.get("log_namespace") == "acexy_tw.tap"]

    def test_make_service_logs_each_unknown_variable_with_the_closest_name(self) -> None:
        self.patch(os, "environ", {"ACEXY_BUFER_SIZE": "s3cr3t-value", "ACEXY_M3U8_TIMEOUT": "30s"})
        makeService(parse("--listen", "tcp:0:interface=127.0.0.1"), reactor=MemoryReactorClock())
        self.assertEqual(
            self.warnings(),
            [
                "ignoring unknown ACEXY_BUFER_SIZE (did you mean ACEXY_BUFFER_SIZE?)",
                "ignoring unknown ACEXY_M3U8_TIMEOUT (did you mean ACEXY_M3U8_STREAM_TIMEOUT?)",
            ],
        )
        [event, _] = [e for e in self.events if e.get("log_namespace") == "acexy_tw.tap"]
        self.assertEqual(event["log_level"].name, "warn")
        self.assertNotIn("s3cr3t", repr(self.events))  # the value is never logged, not even as a field

    def test_known_variables_log_nothing(self) -> None:
        self.patch(os, "environ", {"ACEXY_BUFFER_SIZE": "8MiB", "ACEXY_BUFFER": "1MiB", "PATH": "/bin"})
        makeService(parse("--listen", "tcp:0:interface=127.0.0.1"), reactor=MemoryReactorClock())
        self.assertEqual(self.warnings(), [])
