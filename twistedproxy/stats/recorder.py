"""
The recorders the core feeds: one L{PoolStats} per pool name and one
L{ServerStats} per server of it, owned by a L{StatsRegistry} that outlives
reloads (a reload builds new pool objects; their counters carry on).

The core calls these at a few points only; each call is a few attribute
increments and at most a couple of histogram records, with the time taken once
per I/O batch by the caller.  Gauges (connections, queues) are not counted
here: L{twistedproxy.stats.snapshots} reads them off the live objects.

Counters follow twemproxy 0.5.0 (src/nc_stats.h) where it has them:
  - client_eof / client_err: client connections closed cleanly / with an error;
  - server_ejects: ejections of a server from the pool;
  - forward_error: client requests answered with an error because forwarding
    failed (no server, server down, timeout);
  - fragments: sub-requests made by splitting multi-key requests (twemproxy
    0.5.0 declares it but never counts it: it always reports 0);
  - per server: server_eof / server_err (connections lost cleanly / not),
    server_timedout (timeout events), server_ejected_at (microseconds since the
    epoch of the last ejection), requests / request_bytes (frames written),
    responses / response_bytes (replies read).
twistedproxy's own: auth_failures / auth_blocked (failed logins of a pool's
clients / logins refused unchecked because their address failed too often).
"""

from __future__ import annotations

from collections import deque

from twisted.internet.error import ConnectionDone
from twisted.logger import Logger

from twistedproxy.config.settings import SLOWLOG_MAX_LEN_LIMIT
from twistedproxy.stats.histogram import Latency

log = Logger()

DEFAULT_SLOWLOG_THRESHOLD = 0.010  # seconds
DEFAULT_SLOWLOG_MAX_LEN = 128
SLOWLOG_KEY_BYTES = 64  # keys are truncated to this many bytes in the slow log


class ServerStats:
    """Counters and backend latency of one server of one pool."""

    __slots__ = (
        "label", "server_eof", "server_err", "server_timedout", "server_ejected_at",
        "requests", "request_bytes", "responses", "response_bytes", "connections_made",
        "latency",
    )

    def __init__(self, label: str):
        self.label = label
        self.server_eof = 0
        self.server_err = 0
        self.server_timedout = 0
        self.server_ejected_at = 0
        self.requests = 0
        self.request_bytes = 0
        self.responses = 0
        self.response_bytes = 0
        self.connections_made = 0
        self.latency = Latency()  # request written .. reply read

    def reply(self, nbytes: int, seconds: float) -> None:
        """A reply of C{nbytes} arrived C{seconds} after its request was sent."""
        self.responses += 1
        self.response_bytes += nbytes
        self.latency.record_us(int(seconds * 1000000.0))  # not record(): one call less per reply

    def connection_lost(self, reason) -> None:
        if reason is not None and reason.check(ConnectionDone):
            self.server_eof += 1
        else:
            self.server_err += 1


class TenantStats:
    """
    One tenant of a front (L{twistedproxy.routes.tenants}): its requests, the
    ones answered with an error (backend failures and the proxy's refusals),
    the ones refused by its rate limit, its client connections now (tenants
    chosen by AUTH user), and its requests' latency (received .. written).
    """

    __slots__ = ("name", "requests", "errors", "rate_limited", "connections", "latency")

    def __init__(self, name: str):
        self.name = name
        self.requests = 0
        self.errors = 0
        self.rate_limited = 0
        self.connections = 0
        self.latency = Latency()


class CommandStats:
    """Latency of one command of one pool: total in the proxy, and its backend part."""

    __slots__ = ("total", "backend")

    def __init__(self):
        self.total = Latency()
        self.backend = Latency()


class PoolStats:
    """Counters, per-command latency and the slow log of one pool (by name)."""

    def __init__(self, name: str, registry=None):
        self.name = name
        self.registry = registry
        self.client_eof = 0
        self.client_err = 0
        self.clients_accepted = 0
        self.server_ejects = 0
        self.forward_error = 0
        self.fragments = 0
        self.auth_failures = 0  # failed logins of its clients (core/logins.py)
        self.auth_blocked = 0  # logins refused unchecked: their address had too many failures
        self.servers = {}  # label -> ServerStats
        self.tenants = {}  # name -> TenantStats (a front's tenants)
        self.commands = {}  # command (bytes) -> CommandStats
        self.proxy = Latency()  # time in the proxy: total minus the backend wait
        if registry is not None:
            self.slow_threshold = registry.slowlog_threshold
            self.slowlog = registry.slowlog
        else:
            self.slow_threshold = DEFAULT_SLOWLOG_THRESHOLD
            self.slowlog = SlowLog()

    def server(self, label: str) -> ServerStats:
        """The recorder of server C{label}, made on first use (kept across reloads)."""
        stats = self.servers.get(label)
        if stats is None:
            stats = self.servers[label] = ServerStats(label)
        return stats

    def tenant(self, name: str) -> TenantStats:
        """The recorder of tenant C{name} of this front, made on first use (kept across reloads)."""
        stats = self.tenants.get(name)
        if stats is None:
            stats = self.tenants[name] = TenantStats(name)
        return stats

    def client_closed(self, reason) -> None:
        if reason is not None and reason.check(ConnectionDone):
            self.client_eof += 1
        else:
            self.client_err += 1

    def finished(self, request, now: float) -> None:
        """
        C{request} was written to its client at C{now}: record its latency
        (received .. written), its backend part (first frame sent .. last reply
        read) and the time in the proxy, and keep it in the slow log if slow.
        """
        total = now - request.received_at
        command = request.command
        stats = self.commands.get(command)
        if stats is None:
            stats = self.commands[command] = CommandStats()
        total_us = int(total * 1000000.0)
        stats.total.record_us(total_us)
        backend = 0.0
        replied_at = request.replied_at
        if replied_at:
            backend = replied_at - request.sent_at
            backend_us = int(backend * 1000000.0)
            stats.backend.record_us(backend_us)
            self.proxy.record_us(total_us - backend_us)
        if request.failed is not None:
            self.forward_error += 1
        tenant = request.tenant
        if tenant is not None:
            tenant.requests += 1
            tenant.latency.record_us(total_us)
            if request.failed is not None:
                tenant.errors += 1
        if total >= self.slow_threshold:
            self.slowlog.add(now, self.name, request, total, backend)


class SlowLog:
    """The slowest requests of this process, most recent last, in a bounded ring."""

    def __init__(self, max_len: int = DEFAULT_SLOWLOG_MAX_LEN, to_log: bool = False):
        self.entries = deque(maxlen=max_len)
        self.to_log = to_log
        self.seen = 0  # slow requests ever seen (the ring keeps the last max_len)

    @property
    def max_len(self) -> int:
        return self.entries.maxlen

    def resize(self, max_len: int) -> None:
        self.entries = deque(self.entries, maxlen=max_len)

    def add(self, now: float, pool: str, request, total: float, backend: float) -> None:
        if not self.entries.maxlen:
            return
        self.seen += 1
        server = request.server
        if server is not None:
            server_label = server.label
        elif request.fragments is not None or request.keys is not None:
            server_label = "*"  # a split or broadcast request: several servers
        else:
            server_label = ""  # answered by the proxy itself
        key = request.key
        if key is None and request.keys:
            key = request.keys[0]
        entry = (now, pool, server_label, request.command, key[:SLOWLOG_KEY_BYTES] if key else b"",
                 total - backend, backend, request.failed)
        self.entries.append(entry)
        if self.to_log:
            log.warn(
                "slow request: pool {pool} server {server} {command} {key} {total:.3f} ms"
                " (proxy {proxy:.3f} ms, backend {backend:.3f} ms)",
                pool=pool, server=server_label, command=_text(request.command), key=_text(entry[4]),
                total=total * 1000.0, proxy=(total - backend) * 1000.0, backend=backend * 1000.0,
            )

    def export(self) -> list:
        """The entries as JSON-able dicts, oldest first (times in ms, keys as text)."""
        return [
            {
                "time": round(at, 6),
                "pool": pool,
                "server": server,
                "command": _text(command),
                "key": _text(key),
                "total_ms": round((proxy + backend) * 1000.0, 3),
                "proxy_ms": round(proxy * 1000.0, 3),
                "backend_ms": round(backend * 1000.0, 3),
                "error": failed,
            }
            for at, pool, server, command, key, proxy, backend, failed in self.entries
        ]


def _text(data) -> str:
    if isinstance(data, bytes):
        return data.decode("utf-8", "backslashreplace")
    return data or ""


class StatsRegistry:
    """
    Every pool's recorder in one process, by pool name, plus the process-wide
    settings (slow log threshold, size, logging) that run-time tuning changes.
    """

    def __init__(self, reactor=None, global_config=None):
        self.reactor = reactor
        self.started = reactor.seconds() if reactor is not None else 0.0
        self.pools = {}  # name -> PoolStats
        self.slowlog_threshold = DEFAULT_SLOWLOG_THRESHOLD
        self.slowlog = SlowLog()
        self.connections_made = 0  # server connections ever made (total_connections)
        if global_config is not None:
            self.configure(global_config)

    def configure(self, global_config) -> None:
        """Take the slow log settings of a C{global:} section (start and reload)."""
        self.set_slowlog(
            threshold=getattr(global_config, "slowlog_threshold", DEFAULT_SLOWLOG_THRESHOLD),
            max_len=getattr(global_config, "slowlog_max_len", DEFAULT_SLOWLOG_MAX_LEN),
            to_log=getattr(global_config, "slowlog_log", False),
        )

    def set_slowlog(self, threshold=None, max_len=None, to_log=None) -> None:
        if threshold is not None:
            self.slowlog_threshold = float(threshold)
            for pool in self.pools.values():
                pool.slow_threshold = self.slowlog_threshold
        if max_len is not None and max_len != self.slowlog.max_len:
            self.slowlog.resize(min(int(max_len), SLOWLOG_MAX_LEN_LIMIT))
        if to_log is not None:
            self.slowlog.to_log = bool(to_log)

    def pool(self, name: str) -> PoolStats:
        """The recorder of pool C{name}, made on first use."""
        stats = self.pools.get(name)
        if stats is None:
            stats = self.pools[name] = PoolStats(name, self)
        return stats

    def prune(self, config) -> None:
        """Forget pools and servers that C{config} no longer has (after a reload)."""
        names = {pool.name: pool for pool in config.pools}
        for name in list(self.pools):
            if name not in names:
                del self.pools[name]
            else:
                labels = {spec.label for spec in names[name].servers}
                servers = self.pools[name].servers
                # A cluster pool's nodes come from its cluster's map, not the file: kept.
                for label in list(servers) if not names[name].redis_cluster else ():
                    if label not in labels:
                        del servers[label]
                tenant_names = {tenant.name for tenant in names[name].tenants}
                tenants = self.pools[name].tenants
                for tenant in list(tenants):
                    if tenant not in tenant_names:
                        del tenants[tenant]
