"""
Validated, immutable configuration objects.

These mirror twemproxy 0.5.0's nutcracker.yml pool keys one to one (same names,
same defaults), plus a C{global:} section for the process model.  Durations are
kept in milliseconds as in the YAML; C{timeout=None} means "wait forever"
(twemproxy's default of -1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple, Union

from twistedproxy.config.routes import Password, RouteSpec, TenantSpec


class Permissions(int):
    """A file's permission bits: an int that reads in octal (C{0600}), as the configuration writes it."""

    def __str__(self) -> str:
        return "%04o" % (self,)


@dataclass(frozen=True)
class ListenSpec:
    """Where a pool listens: TCP C{host:port} or a UNIX socket C{path} (with C{perm})."""

    host: Optional[str] = None
    port: Optional[int] = None
    path: Optional[str] = None
    perm: Optional[int] = None  # file mode of the UNIX socket, e.g. 0o755

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    def __str__(self) -> str:
        if self.path is not None:
            return self.path
        return "%s:%d" % (self.host, self.port)


@dataclass(frozen=True)
class ServerSpec:
    """One backend: C{host:port:weight [name]} or C{/path:weight [name]}."""

    host: Optional[str]
    port: Optional[int]
    weight: int = 1
    name: Optional[str] = None
    path: Optional[str] = None

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    @property
    def address(self) -> str:
        """C{host:port} or the socket path: what logs and stats call this server."""
        if self.path is not None:
            return self.path
        return "%s:%d" % (self.host, self.port)

    @property
    def ketama_name(self) -> str:
        """
        The string twemproxy hashes for this server's ketama points: the name if
        one is given, else C{host} alone when the port is 11211, else C{host:port}
        (C{path:} for a UNIX socket).
        """
        if self.name:
            return self.name
        if self.path is not None:
            return self.path + ":"  # twemproxy keeps the colon of "path:weight"
        if self.port == 11211:
            return self.host or ""
        return "%s:%d" % (self.host, self.port)

    @property
    def label(self) -> str:
        """The server's name in stats: its name if given, else its address."""
        return self.name or self.address


@dataclass(frozen=True)
class PoolConfig:
    """One twemproxy server pool, with twemproxy 0.5.0's defaults."""

    name: str
    listen: Optional[ListenSpec] = None  # None: a pool only routes reach (see config.routes)
    servers: Tuple[ServerSpec, ...] = ()
    hash: str = "fnv1a_64"
    hash_tag: Optional[bytes] = None  # exactly two bytes, e.g. b"{}"
    distribution: str = "ketama"
    timeout: Optional[int] = None  # ms; None = wait forever
    backlog: int = 512
    preconnect: bool = False
    redis: bool = False
    redis_auth: Optional[str] = None
    redis_db: int = 0
    server_connections: int = 1
    auto_eject_hosts: bool = False
    server_retry_timeout: int = 30000  # ms
    server_failure_limit: int = 2
    tcpkeepalive: bool = False
    reuseport: bool = False
    client_connections: int = 0  # 0 = unlimited
    # twistedproxy extensions (not in twemproxy; optional in the YAML)
    max_request_bytes: int = 512 * 1024 * 1024  # a larger frame is a protocol error
    client_max_pending: int = 4096  # requests in flight per client before reading pauses
    transaction_connections: int = 16  # per server: clients pinned there at once (0: no transactions)
    route: Optional[RouteSpec] = None  # a front: where requests go instead of servers
    tenants: Tuple[TenantSpec, ...] = ()  # a front shared by tenants: each with its route
    redis_cluster: bool = False  # servers are seed nodes of a Redis Cluster (routes/cluster.py)
    cluster_refresh_interval: int = 10000  # ms between slot map refreshes of a cluster pool
    read_from: str = "master"  # a cluster pool's reads: master, replica or prefer_replica
    # TLS (config.tls): on the listen address when tls_cert is set, to the servers with backend_tls
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    tls_ca: Optional[str] = None  # set: clients need a certificate it signed
    tls_ciphers: Optional[str] = None  # None: Twisted's default
    tls_min_version: str = "1.2"
    tls_idle_timeout: Optional[int] = None  # ms; a stopping worker closes TLS clients idle this long
    backend_tls: bool = False
    backend_tls_ca: Optional[str] = None  # None: the system's trust store
    backend_tls_cert: Optional[str] = None
    backend_tls_key: Optional[str] = None
    backend_tls_names: Tuple[Tuple[str, str], ...] = ()  # (server address, expected name)
    # memcached logins (protocols/memcache_login.py): the users its clients log in as, and the
    # login to its servers (binary SASL PLAIN, or the text protocol's as memcached -Y)
    users: Tuple[Tuple[str, Password], ...] = ()
    memcache_auth_user: Optional[str] = None
    memcache_auth_password: Optional[str] = None
    redis_auth_user: Optional[str] = None  # the ACL user of AUTH user redis_auth to the servers
    # online migration (twistedproxy.migration): a reload that changes servers moves the keys
    migrate: bool = False
    migrate_rate: int = 10000  # keys a second the mover moves at most; 0 = unlimited
    migrate_match: Optional[str] = None  # glob of the keys to move; None = every key

    @property
    def protocol(self) -> str:
        return "redis" if self.redis else "memcache"

    @property
    def is_front(self) -> bool:
        """Requests go through routes (C{route:} or C{tenants:}), not to servers of its own."""
        return self.route is not None or bool(self.tenants)

    @property
    def authenticates(self) -> bool:
        """Its clients log in: a password (C{redis_auth}) or users (a tenant's C{users:})."""
        return bool(self.redis_auth) or any(tenant.users for tenant in self.tenants)

    @property
    def routes(self) -> Tuple[RouteSpec, ...]:
        """A front's routes: its C{route:}, or each tenant's (none for a pool with servers)."""
        if self.route is not None:
            return (self.route,)
        return tuple(tenant.route for tenant in self.tenants)


@dataclass(frozen=True)
class GlobalConfig:
    """The process model (C{global:} section); plain twemproxy files get these defaults."""

    worker_processes: int = 0  # 0 = single process, no master; resolved from 'auto'
    worker_cpu_affinity: Optional[Tuple[Tuple[int, ...], ...]] = None  # per-worker CPU sets
    worker_shutdown_timeout: float = 10.0  # seconds
    listen_mode: str = "reuseport"  # or "shared"
    accept_mutex: bool = False
    tcp_quickack: bool = False
    control: Optional[str] = None  # path of the master's control socket
    control_mode: int = Permissions(0o600)  # the control socket's permissions
    user: Optional[str] = None
    group: Optional[str] = None
    stats_http: Optional[ListenSpec] = None  # HTTP /metrics, /status, /slowlog, /stats.json
    admin_token: Optional[str] = None  # enables POST /tune (Authorization: Bearer)
    admin_token_file: Optional[str] = None  # the same, read from this file
    slowlog_threshold: float = 0.010  # seconds; requests at least this slow are kept
    slowlog_max_len: int = 128  # slow requests kept per process; 0 keeps none
    slowlog_log: bool = False  # also write each slow request to the log
    worker_rlimit_nofile: Optional[int] = None  # soft nofile limit; None: what the connections need
    warmup: Union[str, float] = "auto"  # "auto", or at most this many seconds (0: no warm-up)
    spare_worker: bool = True  # a worker started ahead, to replace a crashed one
    metrics_http: Optional[ListenSpec] = None  # read-only HTTP: GET /metrics, /status, /stats.json
    auth_failures_limit: int = 10  # failed logins per client address per minute before a block (0: no block)
    auth_block_seconds: float = 60.0  # how long a blocked address's logins are refused
    state_dir: Optional[str] = None  # migration state files; None: the configuration file's directory
    extra: Tuple[Tuple[str, object], ...] = field(default=())  # keys for later features


@dataclass(frozen=True)
class ProxyConfig:
    """A whole configuration file: the pools in file order, and the global section."""

    pools: Tuple[PoolConfig, ...]
    global_: GlobalConfig = GlobalConfig()
    source: str = "<string>"
    # Keys accepted but not used (a cluster pool's hash ...): what -t and the start-up log say.
    warnings: Tuple[str, ...] = ()

    @property
    def listening(self) -> Tuple[PoolConfig, ...]:
        """The pools with a listen address (a pool only routes reach has none)."""
        return tuple(pool for pool in self.pools if pool.listen is not None)

    def pool(self, name: str) -> PoolConfig:
        for pool in self.pools:
            if pool.name == name:
                return pool
        raise KeyError(name)
