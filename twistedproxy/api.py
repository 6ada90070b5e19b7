"""
The embedding API: build the proxy's pools and listening factories from a
configuration, inside any Twisted program.

    from twisted.internet import reactor
    from twistedproxy import Proxy

    proxy = Proxy.from_file("conf/nutcracker.yml", reactor)
    proxy.start()                      # listen on every pool's configured address
    # or pick factories yourself:
    reactor.listenTCP(6380, proxy.factories["alpha"])
"""

from __future__ import annotations

from dataclasses import replace

from twisted.internet.defer import DeferredList, maybeDeferred, succeed

from twistedproxy import logs
from twistedproxy.config import ProxyConfig, config_from_dict, load_config
from twistedproxy.config.routes import route_pools
from twistedproxy.config.settings import TuningError, parse as parse_settings
from twistedproxy.core import tuning, warmup
from twistedproxy.core.client import ProxyFactory
from twistedproxy.core.logins import LocalAuthLimiter
from twistedproxy.migration.coordinator import Coordinator
from twistedproxy.migration.state import MemoryStore
from twistedproxy.net.sockets import listen
from twistedproxy.net.tls import listener_tls
from twistedproxy.routes.build import build_route
from twistedproxy.routes.cluster import ClusterRoute
from twistedproxy.routes.hash import HashRoute
from twistedproxy.protocols import cluster_for, codec_for, codecs_of, migration_for
from twistedproxy.routes.tenants import FrontRoute, UserDirectory
from twistedproxy.stats.recorder import StatsRegistry


def warm_up(config, reactor, seconds=None):
    """
    Warm the request path of C{config}'s pools up (L{Proxy.warm_up}), with no
    proxy built: a Deferred firing with the L{warmup.WarmupReport}, or None
    when off.
    """
    if seconds is None:
        seconds = warmup.seconds_for(config.global_.warmup)
    if not seconds:
        return succeed(None)
    # A front's requests go to these; the warm-up's stand-in backends speak plain text.
    # A cluster pool's placement comes from its cluster, which throwaway copies cannot
    # reach: its path is not warmed.
    pools = [replace(pool, backend_tls=False) for pool in config.pools if not pool.is_front and not pool.redis_cluster]
    return warmup.warm_up(reactor, pools, build_pool, seconds)


def build_pool(pool_config, reactor, stats=None, plan=None) -> HashRoute:
    """
    The route of one L{PoolConfig}: twemproxy's pool, a L{HashRoute} over its
    servers, speaking the pool's protocol (C{stats}: its recorder); a
    L{ClusterRoute} over a cluster's nodes for a C{redis_cluster} pool; a
    L{twistedproxy.routes.migrate.MigratingRoute} over both lists of a
    migration C{plan} (a L{MigrationPlan}) when one is given.
    """
    codec = codec_for(pool_config.protocol)
    if plan is not None:
        from twistedproxy.routes.migrate import MigratingRoute

        route = MigratingRoute(pool_config, codec, reactor, plan, migration_for(pool_config.protocol),
                               codecs=codecs_of(codec), stats=stats)
    elif pool_config.redis_cluster:
        return ClusterRoute(pool_config, codec, reactor, cluster_for(pool_config.protocol), codecs=codecs_of(codec),
                            stats=stats)
    else:
        route = HashRoute(pool_config, codec, reactor, codecs=codecs_of(codec), stats=stats)
    if pool_config.users:
        route.users = UserDirectory.of_pool(pool_config.users)  # its clients log in (memcached)
    return route


def build_front(pool_config, reactor, pools: dict, stats=None, workers: int = 1) -> FrontRoute:
    """
    The L{FrontRoute} of a front pool (C{route:} or C{tenants:}): its requests
    go to the routes in C{pools} (pool name -> route) its routes name.
    """
    return FrontRoute(pool_config, codec_for(pool_config.protocol), reactor, pools, stats, workers,
                      build_route=build_route)


class Proxy:
    """
    Every pool of a configuration, with one L{ProxyFactory} per pool that listens.

    @ivar pools: pool name -> its route: a L{HashRoute} for a pool with servers,
        a L{FrontRoute} for a front (a pool with C{route:} or C{tenants:}, built
        after the pools it routes to).
    @ivar factories: pool name -> L{ProxyFactory} (a Twisted ServerFactory), for
        pools with a C{listen:} address.
    @ivar stats: the L{StatsRegistry} every pool records into (kept across reloads).
    @ivar logins: the L{twistedproxy.core.logins.IAuthLimiter} its clients' failed
        logins are counted by: its own (L{LocalAuthLimiter}), or a worker's
        (L{use_logins}).
    @ivar migrations: the L{MigrationState} the pools route by (online migration).
    @ivar coordinator: the L{Coordinator} of this proxy's migrations (their state
        in C{state_store}, by default in memory), or None in a worker, whose
        master coordinates and hands it C{migrations}.
    """

    def __init__(self, config: ProxyConfig, reactor, migrations=None, state_store=None):
        self.config = config
        self.reactor = reactor
        self.pools = {}
        self.factories = {}
        self.stats = StatsRegistry(reactor, config.global_)
        glob = config.global_
        self.logins = LocalAuthLimiter(reactor, glob.auth_failures_limit, glob.auth_block_seconds)
        self.coordinator = None
        if migrations is None:
            self.coordinator = Coordinator(reactor, _OwnPools(self), state_store or MemoryStore())
            self.coordinator.restore(config)  # MigrationRefused: the file and the kept state disagree
            migrations = self.coordinator.state
        self.migrations = migrations
        self._built = {}  # pool name -> what its route was built for (see _in_force)
        for pool_config in _fronts_last(config):
            pool = self._build(pool_config)
            self.pools[pool_config.name] = pool
            if pool_config.listen is not None:
                self.factories[pool_config.name] = ProxyFactory(pool, self.logins)
        self._port_by_pool = {}
        self._read_certificates()

    def _in_force(self, pool_config):
        """
        C{(config, plan)}: the configuration a pool's route is built from (its
        servers: those in force, which after an abort are not the file's; a
        migrating pool's: the plan's target) and its migration plan or None.
        """
        plan = self.migrations.plan_of(pool_config.name)
        if plan is not None:
            return replace(pool_config, servers=plan.target), plan
        servers = dict(self.migrations.servers).get(pool_config.name)
        if servers is not None:
            return replace(pool_config, servers=servers), None
        return pool_config, None

    def _build(self, pool_config):
        """A pool's route, or a front's over L{pools} (which holds every pool it routes to by now)."""
        stats = self.stats.pool(pool_config.name)
        if pool_config.is_front:
            self._built[pool_config.name] = (pool_config, None)
            workers = max(1, self.config.global_.worker_processes)
            return build_front(pool_config, self.reactor, self.pools, stats, workers)
        config, plan = self._in_force(pool_config)
        self._built[pool_config.name] = (config, _plan_key(plan))
        return build_pool(config, self.reactor, stats, plan)

    def use_logins(self, limiter) -> None:
        """Count failed logins with C{limiter} from now on (a worker's, which asks its master)."""
        self.logins = limiter
        for factory in self.factories.values():
            factory.logins = limiter

    @classmethod
    def from_file(cls, path: str, reactor) -> "Proxy":
        """A proxy for the nutcracker.yml-style file at C{path}."""
        return cls(load_config(path), reactor)

    @classmethod
    def from_dict(cls, data: dict, reactor) -> "Proxy":
        """A proxy for a configuration given as a dict (the YAML's structure)."""
        return cls(config_from_dict(data), reactor)

    def warm_up(self, seconds=None):
        """
        Warm the request path up before serving, for at most C{seconds} (by
        default as C{global: warmup} says): run sample traffic through
        throwaway copies of the pools, in memory and then over loopback
        sockets (L{twistedproxy.core.warmup}; nothing reaches a backend or this
        proxy's statistics).  A Deferred fires with the
        L{warmup.WarmupReport}, or None when off.
        """
        return warm_up(self.config, self.reactor, seconds)

    def start(self) -> list:
        """
        Connect preconnect pools and listen on every pool's address (and go on
        with migrations a restart found); returns the ports.
        """
        if self.coordinator is not None:
            self.coordinator.start()
        for name, pool in self.pools.items():
            pool.start()
            cfg = pool.config
            if cfg.listen is not None:
                port = listen(self.reactor, cfg.listen, self.factories[name], cfg.backlog, cfg.reuseport)
                self._port_by_pool[name] = port
        return self.ports

    @property
    def ports(self) -> list:
        """The listening ports this proxy opened itself (L{start})."""
        return list(self._port_by_pool.values())

    def reconfigure(self, config: ProxyConfig, migrations=None) -> list:
        """
        Switch to C{config} between requests, keeping client connections.

        A pool the new configuration leaves as it was stays as it is: its
        clients, backend connections and server health (failures, ejections)
        carry on, and only settings changed at run time (L{tune})
        go back to the configuration's values.  Every other pool is rebuilt:
        clients of a pool that still exists move to its new version at once
        (their next request is routed by it), while requests already in flight
        finish on the old pool, whose backend connections close once idle.
        Pools that disappeared stop listening and their clients are closed; new
        pools start listening (when this proxy listens itself, i.e. L{start}
        was used).

        A pool with C{migrate: true} whose servers changed is not rebuilt on
        them: a migration to them starts (L{twistedproxy.migration}).  A
        coordinating proxy decides that itself and returns the refusals of
        pools whose change must wait for their migration (raises
        L{twistedproxy.migration.coordinator.MigrationRefused} when nothing
        can apply); a worker is handed the master's C{migrations}.
        """
        refusals = []
        if self.coordinator is not None:
            refusals = self.coordinator.reload(config)
            migrations = self.coordinator.state
        self._switch(config, self.migrations if migrations is None else migrations, reload=True)
        if self.coordinator is not None:
            self.coordinator.reloaded(True)
        return refusals

    def apply_migrations(self, state) -> None:
        """
        Route by the L{MigrationState} C{state} from now on: pools that start
        or stop migrating are rebuilt (their clients move to the new route as
        on a reload), a migrating pool switches phase in place.
        """
        self._switch(self.config, state, reload=False)

    def migration(self, action: str = "status", pool=None):
        """C{cacheproxyctl migration}'s actions on this proxy's migrations: (ok, records or why not)."""
        if self.coordinator is None:
            return False, "this process does not coordinate migrations (its master does)"
        return self.coordinator.control(action, pool)

    def _switch(self, config, migrations, reload: bool) -> None:
        listening = bool(self._port_by_pool)
        old_pools = self.pools
        old_built = self._built
        self.config = config
        self.migrations = migrations
        self.pools = {}
        self._built = {}
        if reload:
            self.stats.configure(config.global_)
            self.logins.configure(config.global_.auth_failures_limit, config.global_.auth_block_seconds)
            self.stats.prune(config)
        rebuilt = set()
        for pool_config in _fronts_last(config):
            name = pool_config.name
            old = old_pools.get(name)
            in_force, plan = self._in_force(pool_config) if not pool_config.is_front else (pool_config, None)
            built = (in_force, _plan_key(plan))
            if old is not None and old_built.get(name) == built and not (_routed_to(pool_config) & rebuilt):
                if reload:
                    old.use_config(in_force)
                if plan is not None and old.plan.phase != plan.phase:
                    old.set_phase(plan.phase)
                self.pools[name] = old
                self._built[name] = built
                continue
            rebuilt.add(name)
            pool = self._build(pool_config)
            self.pools[name] = pool
            factory = self.factories.get(name)
            if pool_config.listen is None:
                self.factories.pop(name, None)
            elif factory is None:
                factory = self.factories[name] = ProxyFactory(pool, self.logins)
            else:
                factory.switch_pool(pool)
            pool.start()
            if old is not None:
                clients = list(old.clients)
                old.clients.clear()
                for client in clients:
                    client.route = pool
                    adopt = getattr(pool, "adopt", None)
                    if adopt is not None:
                        adopt(client)
                    else:
                        pool.clients.add(client)
                handover = getattr(old, "handover", None)  # a migrating pool's waiting requests
                if handover is not None:
                    handover(pool)
                old.retire()
            if listening and (old is None or old.config.listen != pool_config.listen):
                self._relisten(name, old)
        for name, old in old_pools.items():
            if name not in self.pools:
                self._relisten(name, old)
                self.factories.pop(name, None)
                for client in list(old.clients):
                    client.transport.loseConnection()
                old.retire()
        if reload:
            self._read_certificates()

    def _read_certificates(self) -> None:
        """
        Read every listen address's TLS certificate and key (again, on a reload):
        new clients get what the files hold now, connected ones keep their sessions.
        """
        for name, factory in self.factories.items():
            factory.tls = listener_tls(self.pools[name].config, factory)

    def _relisten(self, name, old_pool) -> None:
        """Close the old pool's port (if any) and open the new pool's (if it listens)."""
        if old_pool is not None and name in self._port_by_pool:
            self._port_by_pool.pop(name).stopListening()
        pool = self.pools.get(name)
        if pool is not None and pool.config.listen is not None:
            cfg = pool.config
            port = listen(self.reactor, cfg.listen, self.factories[name], cfg.backlog, cfg.reuseport)
            self._port_by_pool[name] = port

    def tune(self, changes: dict, pool=None) -> dict:
        """
        Change run-time settings (L{twistedproxy.config.settings}; values may
        be text) in this process, pool settings in every pool or only pool
        C{pool}, and return L{settings}.  Nothing changes unless every value is
        valid: raises L{TuningError}.
        """
        parsed = parse_settings(changes)
        pools = list(self.pools.values())
        if pool is not None:
            pools = [p for p in pools if p.name == pool]
            if not pools:
                raise TuningError("no pool named %r" % (pool,))
        self.stats.set_slowlog(
            threshold=parsed.get("slowlog_threshold"),
            max_len=parsed.get("slowlog_max_len"),
            to_log=parsed.get("slowlog_log"),
        )
        if "log_level" in parsed:
            logs.set_level(parsed["log_level"])
        for server_pool in pools:
            tuning.tune_pool(server_pool, parsed)
        return self.settings()

    def settings(self) -> dict:
        """The run-time settings in force in this process; pool settings per pool."""
        registry = self.stats
        level = logs.current_level()
        return {
            "slowlog_threshold": registry.slowlog_threshold,
            "slowlog_max_len": registry.slowlog.max_len,
            "slowlog_log": registry.slowlog.to_log,
            "log_level": level.name if level is not None else None,
            "pools": {name: tuning.pool_settings(p) for name, p in self.pools.items()},
        }

    def stop(self):
        """Stop listening, close clients and backend connections; a Deferred fires when done."""
        ports = self.ports
        self._port_by_pool = {}
        if self.coordinator is not None:
            self.coordinator.stop()
        waits = [maybeDeferred(port.stopListening) for port in ports]
        for pool in self.pools.values():
            for client in list(pool.clients):
                client.transport.loseConnection()
            pool.stop()
        return DeferredList(waits)


class _OwnPools:
    """The coordinator's participants when this process routes its pools itself: its own proxy."""

    def __init__(self, proxy):
        self.proxy = proxy

    def apply(self, state):
        self.proxy.apply_migrations(state)
        return succeed(None)


def _plan_key(plan):
    """What tells one migration plan from another (not its phase, which a route switches in place)."""
    return None if plan is None else (plan.id, plan.aborting, plan.source, plan.target)


def _fronts_last(config) -> list:
    """The pools of C{config}, fronts after the pools (so a front finds every pool it routes to built)."""
    return [pool for pool in config.pools if not pool.is_front] + [pool for pool in config.pools if pool.is_front]


def _routed_to(pool_config) -> set:
    """The names of the pools a front's routes reach (none for a plain pool)."""
    return {pool.pool for spec in pool_config.routes for pool in route_pools(spec)}
