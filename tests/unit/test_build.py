"""
The one composition root: the wiring the unit tests exercise
(:class:`acexy_tw.testing.InMemoryProxy`) and the wiring that ships
(:func:`acexy_tw.service.make_service`) are both :func:`acexy_tw.build.build`,
so a test fails if the two diverge; and build assigns nothing to a part after
constructing it.
"""

from __future__ import annotations

import dataclasses
import inspect
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from acexy_tw import build as build_module
from acexy_tw import service as service_module
from acexy_tw.build import Proxy, QuietSite
from acexy_tw.config import load_config
from acexy_tw.engine import EngineClient
from acexy_tw.metrics import Metrics
from acexy_tw.orchestrator.client import OrchestratorClient
from acexy_tw.orchestrator.events import EventReporter
from acexy_tw.orchestrator.health import HealthMonitor
from acexy_tw.placement import Placement
from acexy_tw.streaming.hls import HlsSessions
from acexy_tw.streaming.registry import SessionRegistry
from acexy_tw.streaming.waiting import WaitQueue
from acexy_tw.testing import InMemoryProxy, key, orchestrator_status, ts
from acexy_tw.web.app import ProxyApp
from acexy_tw.web.guard import TokenGuard

#: the parts build() makes (the engine and orchestrator clients are endpoints a test may swap)
PARTS = (SessionRegistry, WaitQueue, Placement, HealthMonitor, EventReporter, HlsSessions, Metrics, ProxyApp, QuietSite, TokenGuard)
#: Proxy's fields that are build's own parts, not what a test passes in
BUILT = ("monitor", "events", "placement", "registry", "hls", "metrics", "web", "site")


def production_config(**options: str) -> Any:
    return load_config({}, {"listen": "tcp:0:interface=127.0.0.1", "orch-url": "http://orch.lan:8000", **options})


class RecordingBuild:
    """Wraps ``build``: every call's arguments and the Proxy it returned."""

    def __init__(self, real: Callable[..., Proxy]) -> None:
        self.real = real
        self.calls: list[tuple[Any, Any, dict, Proxy]] = []

    def __call__(self, config: Any, reactor: Any, **kwargs: Any) -> Proxy:
        proxy = self.real(config, reactor, **kwargs)
        self.calls.append((config, reactor, kwargs, proxy))
        return proxy


@contextmanager
def late_assignments(classes: tuple[type, ...]) -> Iterator[list[tuple[str, str]]]:
    """Records ``(class, attribute)`` for every attribute set on an instance
    of ``classes`` after its ``__init__`` returned, while the block runs
    (Klein's own cache of the app bound to its instance is not wiring)."""
    built: set[int] = set()
    late: list[tuple[str, str]] = []
    saved: list[tuple[type, str, Any]] = []

    def install(cls: type, name: str, value: Any) -> None:
        saved.append((cls, name, vars(cls).get(name, _MISSING)))
        setattr(cls, name, value)

    for cls in classes:
        def init(self: Any, *args: Any, _init: Any = cls.__init__, _cls: type = cls, **kwargs: Any) -> None:
            _init(self, *args, **kwargs)
            if type(self) is _cls:  # the most derived __init__ is done
                built.add(id(self))

        def setattr_(self: Any, name: str, value: Any, _set: Any = cls.__setattr__) -> None:
            if id(self) in built and name != "__klein_bound_app__":
                late.append((type(self).__name__, name))
            _set(self, name, value)

        install(cls, "__init__", init)
        install(cls, "__setattr__", setattr_)
    try:
        yield late
    finally:
        for cls, name, old in reversed(saved):
            if old is _MISSING:
                delattr(cls, name)
            else:
                setattr(cls, name, old)


_MISSING = object()


class SameBuilderTests(SynchronousTestCase):
    def test_the_in_memory_proxy_is_what_build_returns(self) -> None:
        recorder = RecordingBuild(build_module.build)
        self.patch(build_module, "build", recorder)
        p = InMemoryProxy(orchestrator=True)
        [(config, reactor, kwargs, proxy)] = recorder.calls
        self.assertIs(p.proxy, proxy)
        self.assertIs(config, p.config)
        self.assertIs(reactor, p.clock)
        # only the engine and orchestrator endpoints (and the retry jitter) are swapped
        self.assertEqual(sorted(kwargs), ["jitter", "make_engine", "orchestrator"])
        self.assertIs(kwargs["orchestrator"], p.orchestrator)
        self.assertIs(proxy.engines.first, p.engine)
        for name in BUILT:
            self.assertIs(getattr(p, name), getattr(proxy, name), name)
        self.assertIs(p.waits, proxy.registry.waits)

    def test_the_service_builds_its_proxy_through_the_same_build(self) -> None:
        self.assertIs(service_module.build, build_module.build)
        recorder = RecordingBuild(build_module.build)
        self.patch(service_module, "build", recorder)
        config, reactor = production_config(), MemoryReactorClock()
        svc = service_module.make_service(config, reactor)
        [(built_config, built_reactor, kwargs, proxy)] = recorder.calls
        self.assertIs(svc.proxy, proxy)
        self.assertIs(built_config, config)
        self.assertIs(built_reactor, reactor)
        self.assertEqual(kwargs, {})  # production: nothing swapped
        # what the service runs and serves is that graph
        self.assertIs(svc.registry, proxy.registry)
        self.assertIs(svc.web, proxy.web)
        self.assertIs(svc.listener.factory, proxy.site)
        self.assertIn(proxy.monitor, list(svc))
        self.assertIsInstance(proxy.engines.first, EngineClient)
        self.assertIn(proxy.engines, list(svc))  # probed while the service runs
        self.assertIsInstance(proxy.orchestrator, OrchestratorClient)

    def test_the_tests_and_the_service_get_the_same_kinds_of_parts(self) -> None:
        shipped = service_module.make_service(production_config(), MemoryReactorClock()).proxy
        tested = InMemoryProxy(orchestrator=True).proxy
        for name in BUILT:
            self.assertIs(type(getattr(tested, name)), type(getattr(shipped, name)), name)
        self.assertIs(type(tested.registry.waits), type(shipped.registry.waits))
        self.assertEqual(
            [f.name for f in dataclasses.fields(Proxy)],
            ["config", "clock", "pool", "engines", "orchestrator", *BUILT],
        )  # a new part of the proxy is one of build's: add it to BUILT


class CollaboratorTests(SynchronousTestCase):
    """Each part is built with the others it works with (checked by what they do)."""

    def test_fast_start_caches_count_in_the_players_backlog_budget(self) -> None:
        p = InMemoryProxy(fast_start="1MiB")
        settings = p.registry._settings
        self.assertIs(settings.budget, p.web.budget)  # one ACEXY_MAX_BACKLOG for players and caches
        self.assertEqual(settings.fast_start, 1024 * 1024)
        self.assertEqual(InMemoryProxy(fast_start="0").registry._settings.fast_start, 0)

    def test_hls_sessions_close_after_acexy_m3u8_stream_timeout_not_the_ts_linger(self) -> None:
        p = InMemoryProxy(m3u8_stream_timeout=90, linger=5)
        self.assertEqual(p.hls.for_key(key()).idle_timeout, 90)
        self.assertEqual(InMemoryProxy(linger=5).hls.for_key(key()).idle_timeout, 60)  # acexy's default

    def test_placement_uses_the_engines_and_the_orchestrator_it_was_given(self) -> None:
        p = InMemoryProxy(orchestrator=True)
        self.assertIs(p.placement.engines, p.pool)
        self.assertEqual([e.client for e in p.pool.engines], [p.engine])
        self.assertIs(p.placement.orchestrator, p.orchestrator)
        self.assertIs(p.placement.monitor, p.monitor)

    def test_the_registry_places_through_the_placement_and_releases_there(self) -> None:
        p = InMemoryProxy(orchestrator=True, linger=0)
        listed = p.orchestrator.add(1)
        c = p.connect()
        self.assertEqual(p.placement.reservations[key()].container_id, listed.container_id)
        p.engine_of(listed).response.data(ts(1))
        c.disconnect()
        self.assertEqual(p.placement.reservations, {})

    def test_hls_and_the_registry_share_the_placement(self) -> None:
        p = InMemoryProxy()
        self.assertIs(p.hls._placement, p.placement)
        self.assertIs(p.registry._placement, p.placement)

    def test_sessions_are_reported_to_the_orchestrator(self) -> None:
        p = InMemoryProxy(orchestrator=True, linger=0)
        listed = p.orchestrator.add(1)
        c = p.connect()
        p.engine_of(listed).response.data(ts(1))
        [event] = p.orchestrator.started
        self.assertEqual(event["container_id"], listed.container_id)
        c.disconnect()
        self.assertEqual(p.orchestrator.ended, [(listed.container_id, event["labels"]["stream_id"], "client_disconnected")])

    def test_every_status_poll_retries_the_held_players(self) -> None:
        p = InMemoryProxy(orchestrator=True, snapshot=orchestrator_status(can_provision=False, code="vpn_disconnected", vpn_down=True))
        c = p.connect()
        session = p.registry.get(key())
        self.assertEqual((session.state, p.waits.held), ("waiting", [session]))
        p.orchestrator.add(1)  # the VPN is back with an engine ...
        p.orchestrator.snapshot = orchestrator_status()
        p.monitor.startService()  # ... and the monitor's poll says so: the queue is kicked
        self.addCleanup(p.monitor.stopService)
        self.assertEqual(session.state, "streaming")
        self.assertEqual(p.waits.held, [])
        self.assertEqual(c.status(), 200)

    def test_the_web_app_serves_the_metrics_build_made_from_the_parts(self) -> None:
        p = InMemoryProxy(orchestrator=True)
        self.assertIs(p.web.metrics, p.metrics)
        listed = p.orchestrator.add(1)
        p.connect()
        p.engine_of(listed).response.data(ts(1))
        page = p.connect(b"/metrics")
        self.assertEqual(page.status(), 200)
        body = page.body().decode()
        self.assertIn("acexy_engine_sessions 1.0", body)  # the registry
        self.assertIn("acexy_bytes_sent_total 188.0", body)
        self.assertIn("acexy_queue_size 32.0", body)  # its wait queue
        self.assertIn("acexy_fallbacks_total 0.0", body)  # the placement
        self.assertIn("acexy_orchestrator_reachable", body)  # the monitor
        doc = p.connect(b"/ace/status").body()
        self.assertIn(b'"orchestrator"', doc)


class ConstructionTests(SynchronousTestCase):
    """Nothing is assigned to a part after it is constructed."""

    def test_build_assigns_nothing_after_construction(self) -> None:
        for make in (
            lambda: InMemoryProxy(orchestrator=True).proxy,
            lambda: InMemoryProxy(token="s3cret-t0ken").proxy,
            lambda: build_module.build(production_config(token="s3cret-t0ken"), MemoryReactorClock()),
        ):
            with late_assignments(PARTS) as late:
                proxy = make()
            self.assertEqual(late, [])
            self.assertEqual(isinstance(proxy.site.resource, TokenGuard), bool(proxy.config.token))

    def test_the_check_above_sees_a_late_assignment(self) -> None:
        with late_assignments(PARTS) as late:
            proxy = InMemoryProxy().proxy
            proxy.web.metrics = proxy.metrics  # what the old service did
        self.assertEqual(late, [("ProxyApp", "metrics")])

    def test_the_proxy_is_frozen(self) -> None:
        proxy = InMemoryProxy().proxy
        with self.assertRaises(dataclasses.FrozenInstanceError):
            proxy.metrics = None  # type: ignore[misc]

    def test_two_builds_share_nothing(self) -> None:
        a, b = InMemoryProxy(orchestrator=True), InMemoryProxy(orchestrator=True)
        for name in BUILT:
            self.assertIsNot(getattr(a.proxy, name), getattr(b.proxy, name), name)
        self.assertIsNot(a.waits, b.waits)
        self.assertIsNot(a.metrics.registry, b.metrics.registry)
        a.connect()
        self.assertEqual((len(a.registry), len(b.registry)), (1, 0))
        self.assertIn("acexy_engine_sessions 0.0", b.connect(b"/metrics").body().decode())
        self.assertEqual(b.placement.describe()["fallbacks"], 0)
        self.assertEqual(a.placement.describe()["fallbacks"], 0)  # (the orchestrator answered: no fallback)
        self.assertEqual((a.engine.attempts, b.engine.attempts), ([], []))

    def test_the_web_app_has_no_path_without_metrics(self) -> None:
        metrics = inspect.signature(ProxyApp.__init__).parameters["metrics"]
        self.assertIs(metrics.default, inspect.Parameter.empty)
        self.assertEqual(InMemoryProxy().connect(b"/metrics").status(), 200)
