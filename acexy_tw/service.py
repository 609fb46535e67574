"""
The service tree: everything that starts here also stops here.

    AcexyService (MultiService)
      ├─ [demo] SimEngineService  — the simulated engine, in-process
      └─ ListenerService          — the web listener (strports description)
    owned directly: the HTTP connection pool, the engine client, the registry

Stop order matters and is explicit: stop accepting players, close every engine
session (stop commands sent, playback connections closed), close the pool
(bounded: it can hang, Twisted #7738), and only then stop the demo engine so
it still receives the stop commands.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, TimeoutError as DeferredTimeout, succeed
from twisted.internet.endpoints import serverFromString
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTP11ClientProtocol, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.server import Site
from treq.client import HTTPClient

from acexy_tw import __version__
from acexy_tw.config import Config, ConfigError
from acexy_tw.engine import EngineAddress, EngineClient
from acexy_tw.logs import get_logger, set_level
from acexy_tw.metrics import Metrics
from acexy_tw.orchestrator.client import OrchestratorClient
from acexy_tw.orchestrator.events import EventReporter
from acexy_tw.orchestrator.health import HealthMonitor
from acexy_tw.placement import Placement
from acexy_tw.retry import RetryPolicy
from acexy_tw.streaming.registry import SessionRegistry
from acexy_tw.streaming.hls import HlsSessions
from acexy_tw.streaming.session import EngineSession
from acexy_tw.streaming.waiting import WaitQueue
from acexy_tw.web.app import ProxyApp
from acexy_tw.web.guard import TokenGuard

log = get_logger(__name__)

#: shutdown budget for stop commands and pool closing (the whole stop must fit in 5 s)
STOP_BUDGET = 3.0

DEMO_CONTENT_ID = "0123456789abcdef0123456789abcdef01234567"


class QuietSite(Site):
    """A Site whose per-request access log is off unless asked for (flash wear
    on routers; the log line would also carry ?token= URLs)."""

    noisy = False
    access_log = False

    def log(self, request: Any) -> None:
        if self.access_log:
            super().log(request)


#: Bytes asked of the kernel per read on an engine or orchestrator connection.
#: Twisted reads 64 KiB at a time; an engine sending flat out (a VOD, a burst
#: after a pause) then costs one reactor round, one chunk decode and one send
#: per player for every 64 KiB. 256 KiB: −25 % CPU per GB relayed, with
#: write-through (bench/relay.py, README "Performance"); larger was no better
#: and only holds more memory per read.
ENGINE_READ_SIZE = 256 * 1024


class _ClientProtocol(HTTP11ClientProtocol):
    def connectionMade(self) -> None:
        super().connectionMade()
        # ``bufferSize``: what the TCP transport's doRead asks recv() for.
        self.transport.bufferSize = ENGINE_READ_SIZE


class _QuietClientFactory(_HTTP11ClientFactory):
    # Every engine connection would log "Starting factory" (STYLE.md pitfall 14).
    noisy = False

    def buildProtocol(self, addr: Any) -> HTTP11ClientProtocol:
        return _ClientProtocol(self._quiescentCallback)


def make_pool(reactor: Any) -> HTTPConnectionPool:
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool._factory = _QuietClientFactory  # documented ivar of HTTPConnectionPool
    pool.maxPersistentPerHost = 8
    pool.cachedConnectionTimeout = 60
    pool.retryAutomatically = False  # a retried getstream would open a second session
    return pool


class ListenerService(Service):
    """Listens on a strports endpoint; a synchronous failure (port in use)
    aborts start-up with a message naming the address."""

    def __init__(self, description: str, endpoint: Any, factory: Any) -> None:
        self.description = description
        self._endpoint = endpoint
        self._factory = factory
        self.port: Any = None
        self._waiters: list[Deferred] = []

    def startService(self) -> None:
        super().startService()
        failures: list[Failure] = []
        d = self._endpoint.listen(self._factory)
        d.addCallbacks(self._listening, failures.append)
        if failures:
            raise ConfigError(
                "ACEXY_LISTEN_ADDR", self.description, f"cannot listen: {failures[0].getErrorMessage()}"
            )

    def _listening(self, port: Any) -> None:
        self.port = port
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(port)

    def when_listening(self) -> Deferred:
        """The listening port, once there is one (a fresh Deferred per caller)."""
        if self.port is not None:
            return succeed(self.port)
        d: Deferred = Deferred()
        self._waiters.append(d)
        return d

    def stopService(self) -> Optional[Deferred]:
        super().stopService()
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        return None


class AcexyService(MultiService):
    def __init__(self, config: Config, reactor: Any) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.pool = make_pool(reactor)
        self.http = HTTPClient(
            Agent(reactor, pool=self.pool, connectTimeout=config.no_response_timeout)
        )
        self.engine = self._make_engine(config.engine_host, config.engine_port, None)  # the fallback
        self.sim: Any = None
        demo_orchestrator = config.demo and not config.orch_url
        if config.demo:
            from acexy_tw.sim.service import SimEngineService

            self.sim = SimEngineService(reactor, orchestrator=demo_orchestrator)
            self.sim.setServiceParent(self)
        self.orchestrator: Optional[OrchestratorClient] = None
        self.monitor: Optional[HealthMonitor] = None
        self.events: Optional[EventReporter] = None
        if config.orch_url or demo_orchestrator:
            self.orchestrator = OrchestratorClient(
                self.http,
                config.orch_url or "http://127.0.0.1",  # demo: the real port is set at start
                config.orch_apikey if config.orch_url else self.sim.api_key,
                reactor,
                timeout=config.no_response_timeout,
                provision_timeout=config.provision_timeout,
            )
            self.monitor = HealthMonitor(
                self.orchestrator.status,
                reactor,
                interval=config.health_interval,
                outage_interval=config.outage_poll_interval,
                timeout=config.no_response_timeout,
                on_change=lambda _: self.waits.kick(),  # capacity may be back
            )
            self.monitor.setServiceParent(self)
            self.events = EventReporter(self.orchestrator, reactor, on_auth_error=self.monitor.note_auth_failure)
        self.placement = Placement(
            fallback=self.engine,
            make_engine=self._make_engine,
            clock=reactor,
            orchestrator=self.orchestrator,
            monitor=self.monitor,
            max_streams=config.max_streams_per_engine,
            health_interval=config.health_interval,
            outage_poll_interval=config.outage_poll_interval,
            engine_ready_timeout=config.engine_ready_timeout,
        )
        self.waits = WaitQueue(
            reactor,
            size=config.queue_size,
            max_wait=config.max_wait,
            keepalive_interval=config.keepalive_interval,
            mode=config.wait_mode,
        )
        self.registry = SessionRegistry(
            self.placement,
            reactor,
            empty_timeout=config.empty_timeout,
            linger=config.linger,
            on_session_closed=self._session_closed,
            on_session_streaming=self.events.started if self.events else None,
            on_engine_lost=self._engine_lost,
            waits=self.waits,
            failover=RetryPolicy(config.failover_attempts, initial=1.0, factor=2.0, cap=30.0),
            failover_reset=config.failover_reset,
        )
        self.waits.prewarm = self.registry.prewarm
        self.hls = HlsSessions(
            self.placement,
            reactor,
            linger=config.linger,
            on_ready=self.events.started if self.events else None,  # reported like TS sessions
            on_closed=self.events.ended if self.events else None,
        )
        self.web = ProxyApp(
            self.registry,
            reactor,
            buffer_size=config.buffer_size,
            stuck_timeout=config.empty_timeout,
            orchestrator_status=self._orchestrator_status if self.orchestrator else None,
            waits=self.waits,
            hls=self.hls,
            m3u8=config.m3u8,
        )
        self.metrics = Metrics(self)
        self.web.metrics = self.metrics
        resource = self.web.resource()
        if config.token:
            resource = TokenGuard(resource, config.token)
        self.site = QuietSite(resource, reactor=reactor)
        self.site.access_log = config.access_log
        try:
            endpoint = serverFromString(reactor, config.listen)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError("ACEXY_LISTEN_ADDR", config.listen, f"not a valid listen address: {e}") from None
        self.listener = ListenerService(config.listen, endpoint, self.site)
        self.listener.setServiceParent(self)

    def _make_engine(self, host: str, port: int, container_id: Optional[str]) -> EngineClient:
        return EngineClient(
            self.http,
            EngineAddress(self.config.engine_scheme, host, port),
            self.reactor,
            timeout=self.config.no_response_timeout,
            stop_timeout=min(self.config.no_response_timeout, STOP_BUDGET),
            container_id=container_id,
        )

    def _session_closed(self, session: EngineSession, reason: str) -> None:
        self.placement.release(session.key)
        if self.events is not None:
            self.events.ended(session, reason)
        if session.streaming_since is not None:
            self.waits.kick()  # it held an engine: a slot may have freed for a held player

    def _engine_lost(self, session: EngineSession, reason: str) -> None:
        """Failover: the old engine session is over (reported); a new one follows."""
        self.registry.stopped[reason] += 1
        if self.events is not None:
            self.events.ended(session, reason)

    def _orchestrator_status(self) -> dict[str, Any]:
        """The orchestrator section of /ace/status (never the API key)."""
        assert self.monitor is not None
        snap = self.monitor.snapshot
        age = self.monitor.age()
        doc: dict[str, Any] = {
            "url": self.orchestrator.base_url if self.orchestrator else None,
            "reachable": self.monitor.reachable,
            "last_error": self.monitor.last_error,
            "snapshot_age": None if age is None else round(age, 1),
            "poll_interval": self.monitor.current_interval,
            "warnings": self.monitor.warnings(),
            **self.placement.describe(),
        }
        if snap is not None:
            blocked = snap.blocked
            doc.update(
                status=snap.status,
                can_provision=snap.can_provision,
                blocked_code=getattr(blocked, "code", None),
                blocked_eta=getattr(blocked, "recovery_eta_seconds", None),
                circuit_breaker=snap.breaker_state,
                vpn={"enabled": snap.vpn_enabled, "connected": snap.vpn_connected, "down": snap.vpn_down},
                capacity={
                    "total": snap.capacity_total,
                    "used": snap.capacity_used,
                    "available": snap.capacity_available,
                    "max_replicas": snap.max_replicas,
                },
            )
        return doc

    def startService(self) -> None:
        set_level(self.config.log_level)
        from acexy_tw import logs

        if self.config.log_format == "json" and not logs.observer_installed:
            log.warn("ACEXY_LOG_FORMAT=json needs twistd --logger acexy_tw.logs.observer; logging text")
        if self.sim is not None:
            self.sim.startService()  # listen first: the engine address depends on it
            self.engine.address = EngineAddress("http", "127.0.0.1", self.sim.port_number)
            if self.sim.orchestrator is not None and self.orchestrator is not None:
                self.orchestrator.base_url = self.sim.orchestrator.url
        for child in self:
            if child is not self.sim:
                child.startService()
        if self.orchestrator is not None:
            log.info(
                "orchestrator {url}: placing new streams through it (fallback engine {engine})",
                url=self.orchestrator.base_url,
                engine=self.engine.address.url,
            )
        Service.startService(self)
        self.listener.when_listening().addCallback(self._announce)

    def _announce(self, port: Any) -> None:
        host = port.getHost()
        where = f"{getattr(host, 'host', host)}:{getattr(host, 'port', '')}"
        log.info(
            "acexy-tw {version} serving on {where}, engine {engine}",
            version=__version__.public(),
            where=where,
            engine=self.engine.address.url,
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

    def stopService(self) -> Deferred:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        await self._bounded(self.listener.stopService(), "listener")
        self.hls.shutdown()
        await self._bounded(self.registry.shutdown(), "engine sessions")
        if self.events is not None:
            await self._bounded(self.events.flush(), "orchestrator events", 2.0)
        if self.monitor is not None:
            self.monitor.stopService()
        await self._bounded(self.pool.closeCachedConnections(), "connection pool", 1.0)
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
