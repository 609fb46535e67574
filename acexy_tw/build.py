"""
The one composition root: every object of a proxy, built once, each with its
collaborators passed in — nothing is assigned after construction.

::

    build(config, reactor)                    production: engines and the orchestrator over HTTP
    build(config, clock, make_engine=...,     tests: only the reactor and the engine /
          orchestrator=...)                   orchestrator endpoints are swapped

The order is the dependency order (each line only uses what is above it):

    HTTP pool ─> engine factory ─> EnginePool (ACEXY_ENGINES, or ACEXY_HOST:ACEXY_PORT)
    orchestrator client ─> HealthMonitor ─> EventReporter
    Placement(engine pool, engine factory, orchestrator, monitor)
    SessionLimit(ACEXY_MAX_SESSIONS)          (engine sessions open at once, TS + HLS)
    BacklogBudget(ACEXY_MAX_BACKLOG, clock)   (every player's ClientSink and every session's fast-start cache)
    SessionRegistry(placement, settings + budget, wait settings, monitor + pool, events, limit)  (owns the WaitQueue)
    HlsSessions(placement, events, limit)
    Metrics(registry, placement, monitor, hls)   (told of each HTTP response by the Site)
    Playlists(ACEXY_PLAYLISTS, HTTP client, clock)
    ProxyApp(registry, metrics, hls, orchestrator status, budget, playlists) ─> TokenGuard ─> Site

:class:`acexy_tw.service.AcexyService` runs what this builds; the unit tests
build through here too, so the wiring they test is the wiring that ships.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from twisted.internet.interfaces import IReactorTime
from twisted.web.client import Agent, HTTPConnectionPool
from treq.client import HTTPClient

from acexy_tw._twisted_compat import quiet_pool
from acexy_tw.config import Config
from acexy_tw.engine import MAX_HEADER_BYTES, MAX_HEADERS, EngineAddress, EngineClient
from acexy_tw.metrics import Metrics
from acexy_tw.orchestrator.client import OrchestratorClient
from acexy_tw.orchestrator.events import EventReporter
from acexy_tw.orchestrator.health import HealthMonitor
from acexy_tw.placement import Placement
from acexy_tw.playlists import Playlists
from acexy_tw.pool import EnginePool
from acexy_tw.retry import RetryPolicy
from acexy_tw.streaming.budget import BacklogBudget
from acexy_tw.streaming.hls import HlsSessions
from acexy_tw.streaming.limits import SessionLimit
from acexy_tw.streaming.registry import SessionRegistry
from acexy_tw.streaming.session import SessionSettings
from acexy_tw.streaming.waiting import WaitSettings
from acexy_tw.web.app import ProxyApp
from acexy_tw.web.guard import TokenGuard
from acexy_tw.web.server import QuietSite  # the Site: header deadline, connection cap, no bodies

__all__ = ["Proxy", "QuietSite", "build", "make_pool", "EngineFactory", "STOP_BUDGET", "ENGINE_READ_SIZE"]

#: shutdown budget for stop commands and pool closing (the whole stop must fit in 5 s)
STOP_BUDGET = 3.0

#: Bytes asked of the kernel per read on an engine or orchestrator connection.
#: Twisted reads 64 KiB at a time; an engine sending flat out (a VOD, a burst
#: after a pause) then costs one reactor round, one chunk decode and one send
#: per player for every 64 KiB. 256 KiB: −25 % CPU per GB relayed, with
#: write-through (bench/relay.py, README "Performance"); larger was no better
#: and only holds more memory per read.
ENGINE_READ_SIZE = 256 * 1024

#: (host, port, container id or None[, scheme=]) -> an engine client; the
#: scheme (keyword, "" or absent: ACEXY_SCHEME) is given for ACEXY_ENGINES entries
EngineFactory = Callable[..., Any]


def make_pool(reactor: Any) -> HTTPConnectionPool:
    """The proxy's own connection pool: quiet ("Starting factory" per engine
    connection, STYLE.md pitfall 14), reading ENGINE_READ_SIZE per recv, and
    never retrying a request by itself (a retried getstream would open a
    second engine session); a response with more than MAX_HEADERS headers or
    MAX_HEADER_BYTES of them fails and its connection is closed."""
    return quiet_pool(
        reactor,
        read_size=ENGINE_READ_SIZE,
        header_limit=(MAX_HEADERS, MAX_HEADER_BYTES),
        maxPersistentPerHost=8,
        cachedConnectionTimeout=60,
        retryAutomatically=False,
    )


@dataclass(frozen=True)
class Proxy:
    """Everything :func:`build` made, typed; the service runs it, tests inspect it."""

    config: Config
    clock: IReactorTime
    #: the HTTP connection pool (None when every endpoint was given)
    pool: Optional[HTTPConnectionPool]
    #: the engine pool (without an orchestrator, and while it is unreachable)
    engines: EnginePool
    orchestrator: Optional[Any]
    monitor: Optional[HealthMonitor]
    events: Optional[EventReporter]
    placement: Placement
    registry: SessionRegistry
    hls: HlsSessions
    metrics: Metrics
    web: ProxyApp
    site: QuietSite

    @property
    def waits(self) -> Any:
        return self.registry.waits


def build(
    config: Config,
    reactor: Any,
    *,
    make_engine: Optional[EngineFactory] = None,
    orchestrator: Optional[Any] = None,
    jitter: Optional[Callable[[], float]] = None,
) -> Proxy:
    """The whole proxy for ``config`` on ``reactor``. ``make_engine`` and
    ``orchestrator`` replace the HTTP engine clients and orchestrator client,
    ``jitter`` the randomness of the retry delays (tests: ``lambda: 0``, as
    the reactor is a ``Clock``); everything else is always built here."""
    pool: Optional[HTTPConnectionPool] = None
    http: Optional[HTTPClient] = None
    # One pool for whatever speaks HTTP here: engines, the orchestrator, playlist sources.
    if make_engine is None or (config.orch_url and orchestrator is None) or config.playlists:
        pool = make_pool(reactor)
        http = HTTPClient(Agent(reactor, pool=pool, connectTimeout=config.no_response_timeout))
    if make_engine is None:
        assert http is not None
        make_engine = _engine_factory(http, config, reactor)
    engines = EnginePool(
        _pool_clients(config, make_engine),
        reactor,
        interval=config.health_interval,
        timeout=config.no_response_timeout,
        # a pool of one (ACEXY_HOST) has no limit, as acexy
        capacity=config.max_streams_per_engine if config.engines else None,
    )

    if orchestrator is None and config.orch_url:
        assert http is not None
        orchestrator = OrchestratorClient(
            http,
            config.orch_url,
            config.orch_apikey,
            reactor,
            timeout=config.no_response_timeout,
            provision_timeout=config.provision_timeout,
        )
    #: provisioning re-posts after a timeout and event delivery: 3 tries, 1 s then 2 s apart
    short_retry = RetryPolicy(3, initial=1.0, cap=10.0, jitter=jitter)
    monitor: Optional[HealthMonitor] = None
    events: Optional[EventReporter] = None
    if orchestrator is not None:
        monitor = HealthMonitor(
            orchestrator.status,
            reactor,
            interval=config.health_interval,
            outage_interval=config.outage_poll_interval,
            timeout=config.no_response_timeout,
        )
        events = EventReporter(
            orchestrator,
            reactor,
            retry=short_retry,
            on_auth_error=monitor.note_auth_failure,
        )

    placement = Placement(
        engines=engines,
        make_engine=make_engine,
        clock=reactor,
        orchestrator=orchestrator,
        monitor=monitor,
        max_streams=config.max_streams_per_engine,
        health_interval=config.health_interval,
        outage_poll_interval=config.outage_poll_interval,
        engine_ready_timeout=config.engine_ready_timeout,
        retry=short_retry,
    )
    limit = SessionLimit(config.max_sessions)
    #: ACEXY_MAX_BACKLOG: every player's backlog and every session's fast-start cache together
    budget = BacklogBudget(config.max_backlog, clock=reactor)
    registry = SessionRegistry(
        placement,
        reactor,
        SessionSettings(
            empty_timeout=config.empty_timeout,
            linger=config.linger,
            failover=RetryPolicy(config.failover_attempts, initial=1.0, factor=2.0, cap=30.0, jitter=jitter),
            failover_reset=config.failover_reset,
            stats_interval=config.stats_interval,
            fast_start=config.fast_start,
            budget=budget,
        ),
        waits=WaitSettings(
            size=config.queue_size,
            max_wait=config.max_wait,
            keepalive_interval=config.keepalive_interval,
            mode=config.wait_mode,
        ),
        health=monitor,
        pool=engines,
        events=events,
        limit=limit,
    )
    hls = HlsSessions(
        placement,
        reactor,
        stream_timeout=config.m3u8_stream_timeout,  # acexy's ACEXY_M3U8_STREAM_TIMEOUT
        on_ready=events.started if events else None,  # reported like TS sessions
        on_closed=events.ended if events else None,
        limit=limit,
        stats_interval=config.stats_interval,  # stat_url polled as for TS sessions
    )
    metrics = Metrics(registry, placement, monitor, hls=hls)
    playlists: Optional[Playlists] = None
    if config.playlists:  # ACEXY_PLAYLISTS: sources fetched over the proxy's own pool
        assert http is not None
        playlists = Playlists(
            config.playlists,
            http,
            reactor,
            refresh=config.playlist_refresh,
            timeout=config.no_response_timeout,
            public_url=config.public_url,
        )
    web = ProxyApp(
        registry,
        reactor,
        buffer_size=config.buffer_size,
        stuck_timeout=config.empty_timeout,
        metrics=metrics,
        orchestrator_status=_orchestrator_status(orchestrator, monitor, placement) if monitor else None,
        hls=hls,
        m3u8=config.m3u8,
        budget=budget,
        playlists=playlists,
        engines_status=placement.pool_status,
        coalesce_delay=config.coalesce_delay,
    )
    resource = web.resource()
    if config.token:
        resource = TokenGuard(resource, config.token)
    site = QuietSite(
        resource,
        reactor=reactor,
        access_log=config.access_log,
        header_timeout=config.header_timeout,
        max_connections=config.max_connections,
        on_response=metrics.http_response,  # acexy_http_responses_total
    )
    return Proxy(
        config=config,
        clock=reactor,
        pool=pool,
        engines=engines,
        orchestrator=orchestrator,
        monitor=monitor,
        events=events,
        placement=placement,
        registry=registry,
        hls=hls,
        metrics=metrics,
        web=web,
        site=site,
    )


def _pool_clients(config: Config, make_engine: EngineFactory) -> list[Any]:
    """ACEXY_ENGINES' engines in order, or the one ACEXY_HOST:ACEXY_PORT names."""
    if not config.engines:
        return [make_engine(config.engine_host, config.engine_port, None)]
    return [make_engine(host, port, None, scheme=scheme) for scheme, host, port in config.engines]


def _engine_factory(http: HTTPClient, config: Config, reactor: Any) -> EngineFactory:
    def make_engine(host: str, port: int, container_id: Optional[str], *, scheme: str = "") -> EngineClient:
        return EngineClient(
            http,
            EngineAddress(scheme or config.engine_scheme, host, port),
            reactor,
            timeout=config.no_response_timeout,
            stop_timeout=min(config.no_response_timeout, STOP_BUDGET),
            container_id=container_id,
        )

    return make_engine


def _orchestrator_status(orchestrator: Any, monitor: HealthMonitor, placement: Placement) -> Callable[[], dict]:
    """The orchestrator section of /ace/status (never the API key)."""

    def status() -> dict[str, Any]:
        return {"url": getattr(orchestrator, "base_url", None), **monitor.describe(), **placement.describe()}

    return status
