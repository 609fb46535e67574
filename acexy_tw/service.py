"""
The service tree: everything that starts here also stops here.

    AcexyService (MultiService), running what :func:`acexy_tw.build.build` made
      ├─ [demo] SimEngineService      — the simulated engine (and orchestrator),
      │                                 already listening when the tree is built
      ├─ HealthMonitor                — when there is an orchestrator
      ├─ EnginePool                   — probes the engines (ACEXY_ENGINES / ACEXY_HOST)
      └─ StreamServerEndpointService  — the web listener; it binds in
                                        ``privilegedStartService``, so
                                        ``twistd --uid`` can take port 80 as
                                        root and then drop privileges

A listen failure stops start-up with one line naming the address
(:class:`ListenFailed`), whenever it happens: raised from
``privilegedStartService`` when the endpoint fails at once (a taken port), or
logged and the reactor stopped when it fails later.

Stop order matters and is explicit: stop accepting players, close every engine
session (stop commands sent, playback connections closed), report the last
events, close the pool (bounded: it can hang, Twisted #7738), and only then
stop the demo simulators so they still receive the stop commands.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, TimeoutError as DeferredTimeout, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.python.failure import Failure
from zope.interface import implementer

from acexy_tw import __version__
from acexy_tw.build import STOP_BUDGET, Proxy, build
from acexy_tw.config import Config, ConfigError
from acexy_tw.logs import get_logger, set_level

log = get_logger(__name__)

DEMO_CONTENT_ID = "0123456789abcdef0123456789abcdef01234567"


class ListenFailed(ConfigError):
    """The web listener could not listen (the address names the setting)."""


@implementer(IStreamServerEndpoint)
class CheckedEndpoint:
    """
    The listening endpoint, reporting its outcome: a failure that happens at
    once (port taken, no permission) is raised as :class:`ListenFailed` from
    ``listen`` itself, so ``privilegedStartService`` stops start-up with it;
    one that happens later is logged the same way and ``on_late_failure`` is
    called (the service stops the reactor). The port is kept for
    :meth:`when_listening`.
    """

    def __init__(self, endpoint: Any, description: str, on_late_failure: Any = None) -> None:
        self._endpoint = endpoint
        self.description = description
        self._on_late_failure = on_late_failure
        self.port: Any = None
        self._waiters: list[Deferred] = []

    def _error(self, failure: Failure) -> ListenFailed:
        return ListenFailed("ACEXY_LISTEN_ADDR", self.description, f"cannot listen: {failure.getErrorMessage()}")

    def listen(self, factory: Any) -> Deferred:
        d = self._endpoint.listen(factory)
        inside, failed = True, []

        def error(failure: Failure) -> Optional[Failure]:
            if inside:  # synchronous: stop start-up here, below
                failed.append(failure)
                return None
            return self._failed_later(failure)

        d.addCallbacks(self._listening, error)
        inside = False
        if failed:
            raise self._error(failed[0])
        return d

    def _listening(self, port: Any) -> Any:
        self.port = port
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.callback(port)
        return port

    def _failed_later(self, failure: Failure) -> Failure:
        log.error("acexy: configuration error: {error}", error=str(self._error(failure)))
        if self._on_late_failure is not None:
            self._on_late_failure()
        return failure

    def when_listening(self) -> Deferred:
        """The listening port, once there is one (a fresh Deferred per caller)."""
        if self.port is not None:
            return succeed(self.port)
        d: Deferred = Deferred()
        self._waiters.append(d)
        return d


class AcexyService(MultiService):
    def __init__(self, proxy: Proxy, reactor: Any, *, sim: Any = None) -> None:
        super().__init__()
        self.proxy = proxy
        self.config = proxy.config
        self.reactor = reactor
        self.sim = sim
        if sim is not None:
            sim.setServiceParent(self)
        if proxy.monitor is not None:
            proxy.monitor.setServiceParent(self)
        proxy.engines.setServiceParent(self)
        try:
            endpoint = serverFromString(reactor, proxy.config.listen)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError("ACEXY_LISTEN_ADDR", proxy.config.listen, f"not a valid listen address: {e}") from None
        self.endpoint = CheckedEndpoint(endpoint, proxy.config.listen, on_late_failure=self._cannot_serve)
        self.listener = StreamServerEndpointService(self.endpoint, proxy.site)
        self.listener.setServiceParent(self)

    # the parts, for tests and tools
    @property
    def registry(self) -> Any:
        return self.proxy.registry

    @property
    def placement(self) -> Any:
        return self.proxy.placement

    @property
    def monitor(self) -> Any:
        return self.proxy.monitor

    @property
    def waits(self) -> Any:
        return self.proxy.registry.waits

    @property
    def web(self) -> Any:
        return self.proxy.web

    @property
    def hls(self) -> Any:
        return self.proxy.hls

    @property
    def orchestrator(self) -> Any:
        return self.proxy.orchestrator

    @property
    def events(self) -> Any:
        return self.proxy.events

    @property
    def engine(self) -> Any:
        """The pool's first engine (with ACEXY_HOST alone: the engine)."""
        return self.proxy.engines.first

    def when_listening(self) -> Deferred:
        return self.endpoint.when_listening()

    def _cannot_serve(self) -> None:
        if getattr(self.reactor, "running", False):
            self.reactor.stop()

    def privilegedStartService(self) -> None:
        set_level(self.config.log_level)
        try:
            super().privilegedStartService()  # the listener binds here, before twistd drops privileges
        except ListenFailed as e:
            from acexy_tw.tap import ConfigExit

            raise ConfigExit(e) from None

    def startService(self) -> None:
        set_level(self.config.log_level)
        from acexy_tw import logs

        if self.config.log_format == "json" and not logs.observer_installed:
            log.warn("ACEXY_LOG_FORMAT=json needs twistd --logger acexy_tw.logs.observer; logging text")
        super().startService()
        self._install_sighup()
        if self.proxy.orchestrator is not None:
            log.info(
                "orchestrator {url}: placing new streams through it (fallback {engine})",
                url=self.proxy.orchestrator.base_url,
                engine=self._engines(),
            )
        self.when_listening().addCallback(self._announce)

    def _announce(self, port: Any) -> None:
        host = port.getHost()
        where = f"{getattr(host, 'host', host)}:{getattr(host, 'port', '')}"
        log.info(
            "acexy-tw {version} serving on {where}, {engine}",
            version=__version__.public(),
            where=where,
            engine=self._engines(),
        )
        if self.sim is not None:
            shown = "127.0.0.1" if host.host in ("0.0.0.0", "::") else host.host
            log.info(
                "demo: simulated engine running; try\n"
                "    curl -s 'http://{h}:{p}/ace/getstream?id={cid}' | head -c 1M | ffprobe -\n"
                "  or open http://{h}:{p}/ace/getstream?id={cid} in VLC / mpv / ffplay",
                h=shown,
                p=host.port,
                cid=DEMO_CONTENT_ID,
            )

    def _engines(self) -> str:
        urls = [e.url for e in self.proxy.engines.engines]
        return f"engine {urls[0]}" if len(urls) == 1 else f"engine pool {', '.join(urls)}"

    def stopService(self) -> Deferred:
        Service.stopService(self)
        self._remove_sighup()
        return Deferred.fromCoroutine(self._stop())

    # -- SIGHUP: reopen the log file (logrotate), never stop ----------------------

    _previous_sighup: Any = None
    _sighup_installed = False

    def _install_sighup(self) -> None:
        """SIGHUP reopens ``twistd --logfile``'s file (logrotate's convention)
        and never ends the process; with stdout there is nothing to reopen.
        The handler only hands the work to the reactor thread."""
        import signal

        if not hasattr(signal, "SIGHUP") or not hasattr(self.reactor, "callFromThread"):
            return
        try:
            self._previous_sighup = signal.signal(signal.SIGHUP, self._sighup)
        except ValueError:  # not the main thread (a test's reactor): leave signals alone
            return
        self._sighup_installed = True

    def _remove_sighup(self) -> None:
        if not self._sighup_installed:
            return
        import signal

        previous = self._previous_sighup
        signal.signal(signal.SIGHUP, previous if previous is not None else signal.SIG_DFL)
        self._sighup_installed = False

    def _sighup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reopen_logs)

    def reopen_logs(self) -> int:
        """Reopen every log file twistd writes to; how many there were."""
        from acexy_tw._twisted_compat import log_files

        files = log_files()
        for f in files:
            try:
                f.reopen()
            except OSError as e:
                log.error("SIGHUP: cannot reopen log file {path}: {e}", path=getattr(f, "path", "?"), e=e)
        log.info("SIGHUP: {what}", what=f"reopened {len(files)} log file(s)" if files else "no log file to reopen")
        return len(files)

    async def _stop(self) -> None:
        proxy = self.proxy
        await self._bounded(self.listener.stopService(), "listener")
        # TS and HLS sessions stop together: their stop commands share one budget
        stops = DeferredList([proxy.hls.shutdown(), proxy.registry.shutdown()], consumeErrors=True)
        await self._bounded(stops, "engine sessions")
        if proxy.web.budget is not None:
            proxy.web.budget.stop()  # the players' backlogs are gone: no trim left pending
        if proxy.events is not None:
            await self._bounded(proxy.events.flush(), "orchestrator events", 2.0)
        if proxy.monitor is not None and proxy.monitor.running:
            proxy.monitor.stopService()
        if proxy.engines.running:
            proxy.engines.stopService()
        if proxy.pool is not None:
            await self._bounded(proxy.pool.closeCachedConnections(), "connection pool", 1.0)
        if self.sim is not None:
            await self._bounded(self.sim.stopService(), "demo engine", 1.0)

    async def _bounded(self, d: Optional[Deferred], what: str, seconds: float = STOP_BUDGET) -> None:
        if d is None:
            return
        try:
            await d.addTimeout(seconds, self.reactor)
        except DeferredTimeout:
            log.warn("shutdown: {what} did not finish within {s:g}s", what=what, s=seconds)
        except Exception as e:  # shutdown goes on whatever one step did
            log.warn("shutdown: {what} failed: {e}", what=what, e=e)


def make_service(config: Config, reactor: Any) -> AcexyService:
    """``twistd acexy``'s service for ``config``: with ``--demo``, the
    simulators listen first and the configuration points at them."""
    sim = None
    if config.demo:
        from acexy_tw.sim.service import SimEngineService

        sim = SimEngineService(reactor, orchestrator=not config.orch_url)
        config = sim.listen(config)
    return AcexyService(build(config, reactor), reactor, sim=sim)
