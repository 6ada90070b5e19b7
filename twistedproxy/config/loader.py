"""
Read a nutcracker.yml (plus our C{global:} section) into validated, immutable
L{ProxyConfig} objects.

The rules are twemproxy 0.5.0's (src/nc_conf.c): the same keys, types,
defaults and refusals.  Every problem in a file is collected, so one check
shows them all, each as C{file:line: pool 'name': key 'key': what is wrong}.

Each accepted key is described once, in L{POOL_KEYS} and L{GLOBAL_KEYS}: its
name, its value type (which parses and checks it) and what it means.  The
defaults live in L{twistedproxy.config.model}; L{describe_keys} joins the two
for the README's configuration reference.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import MISSING, dataclass, fields
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

from twistedproxy.config.model import GlobalConfig, ListenSpec, Permissions, PoolConfig, ProxyConfig, ServerSpec
from twistedproxy.config.routes import RouteValue, TenantsValue, UsersValue, route_kinds, route_pools
from twistedproxy.config.tls import BACKEND_KEYS, check_pool_tls, tls_key_specs
from twistedproxy.config.tree import MAPPING, SCALAR, SEQUENCE, ConfigNode, SourceError, from_python, from_yaml
from twistedproxy.config.values import (
    DIGITS,
    INT_MAX,
    TEXT,
    BITMASK,
    Boolean,
    Choice,
    ConfigError,
    Integer,
    Invalid,
    Milliseconds,
    Report,
    SocketPath,
    Text,
    ValueType,
    address_key,
    check_socket_path,
    describe,
    host_and_port,
    integer_value,
    is_int,
    number_value,
    octal_permissions,
    is_null,
    key_name,
    quote,
    scalar_text,
)

__all__ = [
    "CPU_SETSIZE",
    "ConfigError",
    "DISTRIBUTIONS",
    "GLOBAL_KEYS",
    "GLOBAL_SECTION",
    "HASHES",
    "KeyDoc",
    "KeySpec",
    "LISTEN_MODES",
    "POOL_KEYS",
    "config_from_dict",
    "describe_keys",
    "load_config",
    "parse_config",
]

# twemproxy's names, in its order (hashkit/nc_hashkit.h HASH_CODEC and DIST_CODEC).
HASHES = (
    "one_at_a_time", "md5", "crc16", "crc32", "crc32a", "fnv1_64", "fnv1a_64",
    "fnv1_32", "fnv1a_32", "hsieh", "murmur", "jenkins",
)
DISTRIBUTIONS = ("ketama", "modula", "random")
READ_FROM = ("master", "replica", "prefer_replica")
LISTEN_MODES = ("reuseport", "shared")

GLOBAL_SECTION = "global"  # the one top-level name that is not a pool

CPU_SETSIZE = 1024  # glibc's cpu_set_t: CPU numbers are below this


class _Problems:
    """The problems found so far in one source."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._found: List[Tuple[int, str]] = []
        self.warnings: List[str] = []  # keys accepted but not used

    def __len__(self) -> int:
        return len(self._found)

    def add(self, line: Optional[int], message: str, section: Optional[str] = None,
            key: Optional[str] = None) -> None:
        where = self.source if line is None else "%s:%d" % (self.source, line)
        parts = [where]
        if section is not None:
            parts.append(section)
        if key is not None:
            parts.append("key %s" % quote(key))
        parts.append(message)
        self._found.append((line or 0, ": ".join(parts)))

    def warn(self, line: Optional[int], message: str, section: str, key: str) -> None:
        where = self.source if line is None else "%s:%d" % (self.source, line)
        self.warnings.append("%s: %s: key %s: %s" % (where, section, quote(key), message))

    def error(self) -> ConfigError:
        # sorted() is stable: problems on one line keep the order they were found in.
        return ConfigError([text for _, text in sorted(self._found, key=lambda found: found[0])])

    def raise_if_any(self) -> None:
        if self._found:
            raise self.error()


class _HashTag(ValueType):
    name = 'two characters, e.g. "{}"'

    def parse(self, node: ConfigNode, report: Report) -> Any:
        text = scalar_text(node)
        if text is None:
            hint = ""
            if node.kind == MAPPING and not node.value:
                hint = ' (quote it: hash_tag: "{}")'
            raise Invalid("expected a 2-character string, got %s%s" % (describe(node), hint))
        tag = text.encode("utf-8")
        if len(tag) != 2:
            raise Invalid('must be exactly 2 characters, like "{}" (got %s)' % (quote(text),))
        return tag


class _Listen(ValueType):
    name = "host:port | /path/to/socket [octal permissions]"

    def parse(self, node: ConfigNode, report: Report) -> Any:
        text = TEXT.parse(node, report).strip()
        if not text.startswith("/"):
            host, port = host_and_port(text, "'host:port' or '/path/to/socket [permissions]'")
            return ListenSpec(host=host, port=port)
        # twemproxy splits "path permissions" at the last space.
        path, space, permission = text.rpartition(" ")
        if not space:
            path, permission = text, "0"
        perm = octal_permissions(permission)
        path = path.rstrip()
        check_socket_path(path)
        # twemproxy only chmods the socket when the permissions are not 0.
        return ListenSpec(path=path, perm=perm or None)


class _ControlMode(ValueType):
    """The control socket's permissions: octal text (YAML's C{0660}), or the number itself from a dict."""

    name = "octal permissions"

    def parse(self, node: ConfigNode, report: Report) -> Any:
        text = scalar_text(node)
        if text is not None:
            mode = octal_permissions(text)
        elif node.kind == SCALAR and is_int(node.value) and 0 <= node.value <= 0o777:
            mode = node.value
        else:
            raise Invalid("expected octal permissions like 0600, got %s" % (describe(node),))
        if not mode & 0o200:
            raise Invalid("%04o leaves the owner unable to connect (a client needs write permission:"
                          " e.g. 0600, 0660)" % (mode,))
        return Permissions(mode)


class _Servers(ValueType):
    name = "list of host:port:weight [name] | /path/to/socket:weight [name]"

    _FORMAT = "'host:port:weight [name]' or '/path/to/socket:weight [name]'"

    def parse(self, node: ConfigNode, report: Report) -> Any:
        if node.kind != SEQUENCE:
            raise Invalid("expected a list of servers, got %s" % (describe(node),))
        if not node.value:
            raise Invalid("is empty: a pool needs at least one server")
        servers = []
        first_by_address: Dict[Tuple, str] = {}
        first_by_name: Dict[str, str] = {}
        for number, entry in enumerate(node.value, 1):
            where = "line %d" % (entry.line,) if entry.line else "entry %d" % (number,)
            text = scalar_text(entry)
            try:
                if text is None:
                    raise Invalid("expected a server string (%s), got %s"
                                   % (self._FORMAT, describe(entry)))
                server = self._server(text.strip())
            except Invalid as e:
                report("server %s: %s" % (quote(text), e.message) if text else e.message, entry.line)
                continue
            # twemproxy refuses two servers with one ketama name; an address
            # listed twice is refused too, as it is surely a mistake.
            address = address_key(server.host, server.port, server.path)
            if address in first_by_address:
                report("server %s: same address as the server on %s"
                       % (quote(text), first_by_address[address]), entry.line)
                continue
            if server.ketama_name in first_by_name:
                report("server %s: name %s is already used by the server on %s"
                       % (quote(text), quote(server.ketama_name), first_by_name[server.ketama_name]),
                       entry.line)
                continue
            first_by_address[address] = where
            first_by_name[server.ketama_name] = where
            servers.append(server)
        return tuple(servers)

    def _server(self, text: str) -> ServerSpec:
        words = text.split()
        if len(words) not in (1, 2):
            raise Invalid("expected %s" % (self._FORMAT,))
        address, name = words[0], (words[1] if len(words) == 2 else None)
        rest, colon, weight_text = address.rpartition(":")
        if not colon or not rest:
            raise Invalid("expected %s" % (self._FORMAT,))
        if not DIGITS.match(weight_text):
            raise Invalid("invalid weight %s (expected an integer >= 1)" % (quote(weight_text),))
        weight = int(weight_text)
        if weight < 1:
            raise Invalid("weight must be at least 1 (got 0)")
        if weight > INT_MAX:
            raise Invalid("weight is too large (got %d, at most %d)" % (weight, INT_MAX))
        if rest.startswith("/"):
            check_socket_path(rest)
            return ServerSpec(host=None, port=None, weight=weight, name=name, path=rest)
        host, port = host_and_port(rest, self._FORMAT)
        return ServerSpec(host=host, port=port, weight=weight, name=name)


class _WorkerProcesses(Integer):
    def __init__(self) -> None:
        Integer.__init__(self, 0, "auto | integer >= 0")

    def parse(self, node: ConfigNode, report: Report) -> Any:
        if scalar_text(node) == "auto":
            return os.cpu_count() or 1
        return Integer.parse(self, node, report)


class _Seconds(ValueType):
    name = "number >= 0 (seconds)"

    def parse(self, node: ConfigNode, report: Report) -> Any:
        value = number_value(node, "a number of seconds")
        if value < 0:
            raise Invalid("must not be negative (got %s)" % (scalar_text(node) or value,))
        return value


class _Warmup(_Seconds):
    name = "auto | off | number >= 0 (seconds)"

    def parse(self, node: ConfigNode, report: Report) -> Any:
        text = scalar_text(node)
        if text in ("auto", "off"):
            return text if text == "auto" else 0.0
        if node.kind == SCALAR and node.plain_text is None and node.value is False:
            return 0.0  # YAML's bare off
        try:
            return _Seconds.parse(self, node, report)
        except Invalid:
            raise Invalid("expected auto, off or a number of seconds, got %s" % (describe(node),))


_AUTO = "auto"


class _CpuAffinity(ValueType):
    """
    C{auto}, C{off}, nginx's C{"0001 0010"} string of bitmasks, or a list with
    one entry per worker: a CPU number, a list of CPU numbers or a bitmask
    string (the rightmost digit is CPU 0).  Parses to None, L{_AUTO} or a
    tuple of CPU-number tuples; L{_per_worker_cpu_sets} then fits it to the
    worker count.
    """

    name = "auto | off | list of (CPU | [CPUs] | \"bitmask\") | \"bitmask bitmask ...\""

    _EXPECTED = "expected auto, off, a list of CPUs per worker or bitmask strings"

    def parse(self, node: ConfigNode, report: Report) -> Any:
        if node.kind == SEQUENCE:
            if not node.value:
                raise Invalid("is an empty list (%s)" % (self._EXPECTED,))
            cpu_sets = []
            for entry in node.value:
                try:
                    cpu_sets.append(self._entry(entry))
                except Invalid as e:
                    report(e.message, entry.line)
            return tuple(cpu_sets)
        if node.kind == SCALAR:
            if node.value is False:  # YAML 'off', 'false', 'no'
                return None
            text = scalar_text(node)
            if text == _AUTO:
                return _AUTO
            if text is not None and text.lower() == "off":
                return None
            if text is not None and node.value is not True:
                return tuple(_bitmask_cpus(mask) for mask in text.split())
        raise Invalid("%s, got %s" % (self._EXPECTED, describe(node)))

    def _entry(self, entry: ConfigNode) -> Tuple[int, ...]:
        if entry.kind == SEQUENCE:
            if not entry.value:
                raise Invalid("an empty list of CPUs")
            return tuple(sorted(set(_cpu_number(cpu) for cpu in entry.value)))
        text = scalar_text(entry)
        # Unquoted, "0101" would be YAML's octal 65: nobody means CPU 65 that way.
        if isinstance(entry.value, str) or (text is not None and len(text) > 1 and text.startswith("0")):
            return _bitmask_cpus(text or "")
        return (_cpu_number(entry),)


def _bitmask_cpus(mask: str) -> Tuple[int, ...]:
    if not BITMASK.match(mask) or "1" not in mask or len(mask) > CPU_SETSIZE:
        raise Invalid("invalid CPU bitmask %s (expected 0s and 1s with at least one 1;"
                       " the rightmost digit is CPU 0)" % (quote(mask),))
    return tuple(cpu for cpu, digit in enumerate(reversed(mask)) if digit == "1")


def _cpu_number(node: ConfigNode) -> int:
    cpu = integer_value(node, "a CPU number")
    if not 0 <= cpu < CPU_SETSIZE:
        raise Invalid("invalid CPU number %d (expected 0-%d)" % (cpu, CPU_SETSIZE - 1))
    return cpu


def _available_cpus() -> List[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux, or PyPy without it
        return list(range(os.cpu_count() or 1))


def _per_worker_cpu_sets(affinity: Any, worker_processes: int) -> Tuple[Tuple[int, ...], ...]:
    """
    One CPU set per worker (one for the lone process when there are no
    workers): C{auto} deals the available CPUs round-robin; a shorter
    explicit list repeats its last entry, as nginx does.
    """
    count = max(1, worker_processes)
    if affinity == _AUTO:
        cpus = _available_cpus()
        return tuple((cpus[i % len(cpus)],) for i in range(count))
    missing = count - len(affinity)
    return tuple(affinity) + (affinity[-1],) * max(0, missing)


# --------------------------------------------------------------------------
# The key tables


@dataclass(frozen=True)
class KeySpec:
    """One accepted key: its name, its value type and what it means."""

    name: str
    value_type: ValueType
    meaning: str
    required: bool = False

    @property
    def type_name(self) -> str:
        return self.value_type.name


POOL_KEYS: Tuple[KeySpec, ...] = (
    KeySpec("listen", _Listen(),
            "Address the pool listens on: host:port, or the path of a UNIX socket with"
            " optional octal permissions. In a file with routes, a pool they name may leave it out"
            " (it is reached only through them).", required=True),
    KeySpec("hash", Choice(HASHES, "hash"), "Hash function applied to keys."),
    KeySpec("hash_tag", _HashTag(),
            "Two characters; only the part of a key between them is hashed, so related keys"
            " land on one server."),
    KeySpec("distribution", Choice(DISTRIBUTIONS, "distribution"),
            "How a key's hash picks a server: consistent hashing (ketama), hash modulo server"
            " count, or a random server."),
    KeySpec("timeout", Milliseconds(),
            "Milliseconds to wait for a server to connect or reply; absent or 0 waits forever."),
    KeySpec("backlog", Integer(0), "Listen backlog of the pool's socket."),
    KeySpec("preconnect", Boolean(), "Connect to every server at start-up instead of on first use."),
    KeySpec("redis", Boolean(), "The pool speaks Redis (true) or memcached (false)."),
    KeySpec("redis_auth", Text(),
            "Password sent with AUTH on every new server connection; Redis pools only."),
    KeySpec("redis_db", Integer(0), "Database selected with SELECT on every new server connection."),
    KeySpec("server_connections", Integer(1), "Connections opened to each server, at most."),
    KeySpec("auto_eject_hosts", Boolean(),
            "Eject a server from the hash ring after server_failure_limit consecutive failures."),
    KeySpec("server_retry_timeout", Integer(0),
            "Milliseconds before an ejected server is tried again."),
    KeySpec("server_failure_limit", Integer(0),
            "Consecutive failures that eject a server (with auto_eject_hosts)."),
    KeySpec("tcpkeepalive", Boolean(), "Enable TCP keepalive on server connections."),
    KeySpec("reuseport", Boolean(), "Set SO_REUSEPORT on the pool's listening socket."),
    KeySpec("servers", _Servers(),
            "The backends: host:port:weight or /path:weight, each with an optional name that"
            " replaces the address in consistent hashing.", required=True),
    KeySpec("client_connections", Integer(0),
            "Client connections allowed at once; 0 is unlimited (twemproxy 0.5.0 reads but"
            " ignores it). Under a master it holds for the whole proxy, split evenly over the"
            " workers (limit // workers each, the remainder to the first ones)."),
    KeySpec("max_request_bytes", Integer(1),
            "twistedproxy: a larger request is refused as a protocol error."),
    KeySpec("client_max_pending", Integer(1),
            "twistedproxy: requests in flight per client before the proxy stops reading from it."),
    KeySpec("transaction_connections", Integer(0),
            "twistedproxy: Redis pools: connections to each server that clients in a transaction"
            " hold at once, each client one of its own from its WATCH or MULTI to its EXEC, DISCARD"
            " or UNWATCH (see Transactions); past it WATCH and MULTI get an error. Per worker"
            " process under a master. 0 refuses transactions (MULTI gets an error, and every command"
            " up to EXEC or DISCARD)."),
    KeySpec("route", RouteValue(),
            "twistedproxy: instead of servers, where the pool's requests go: another pool by name"
            " (a pool with no listen of its own is reached only this way), or failover, replicate,"
            " shadow, warmup and prefix routes over pools (see Routes and tenants)."),
    KeySpec("tenants", TenantsValue(),
            "twistedproxy: instead of servers, the tenants sharing this listener, each chosen by key"
            " prefix (or as the default) or by user (Redis AUTH, memcached logins), each with its route,"
            " rate limit and counters (see Routes and tenants)."),
    KeySpec("redis_cluster", Boolean(),
            "twistedproxy: the servers are seed nodes of a Redis Cluster (any of its nodes; the"
            " others are found in its slot map): keys go by hash slot, redirects are followed"
            " (see Redis Cluster pools). Needs redis: true; hash, hash_tag, distribution and"
            " auto_eject_hosts are not used."),
    KeySpec("cluster_refresh_interval", Integer(1),
            "twistedproxy: milliseconds between two reads of a cluster pool's slot map (it is"
            " also read at start and at once when a reply or a failure says it changed)."),
    KeySpec("read_from", Choice(READ_FROM, "read_from"),
            "twistedproxy: where a cluster pool's reads go: master; replica (a replica of the"
            " slot, the master if it has none); prefer_replica (a replica that is up, else the"
            " master). Writes always go to masters."),
    KeySpec("users", UsersValue(),
            "twistedproxy: memcached pools: clients must log in as one of these users (user name ->"
            " password, written as in tenants' users) before anything else: binary SASL PLAIN or the"
            " text protocol's login, as memcached -S and -Y (see memcached logins)."),
    KeySpec("memcache_auth_user", Text(),
            "twistedproxy: memcached pools: the user every new server connection logs in as (binary"
            " connections with SASL PLAIN, text and meta ones as memcached -Y expects); needs"
            " memcache_auth_password."),
    KeySpec("memcache_auth_password", Text(),
            "twistedproxy: the password of memcache_auth_user."),
    KeySpec("redis_auth_user", Text(),
            "twistedproxy: the Redis ACL user every new server connection logs in as (AUTH user"
            " redis_auth); needs redis_auth. Clients still log in with redis_auth (AUTH password,"
            " or AUTH with the user default or this user)."),
) + tls_key_specs(KeySpec) + (
    KeySpec("migrate", Boolean(),
            "twistedproxy: a reload that changes this pool's servers (added, removed, re-weighted,"
            " renamed) moves the keys whose server changed to it while the pool serves, instead of"
            " rebuilding the pool (see Online migration). Hash pools only: not with redis_cluster or"
            " distribution random, nor for Redis with backend_tls or UNIX-socket servers."),
    KeySpec("migrate_rate", Integer(0),
            "twistedproxy: keys a second the background mover of a migration moves at most (requests"
            " of clients move the keys they touch besides); 0 is unlimited."),
    KeySpec("migrate_match", Text(),
            "twistedproxy: a glob pattern (Redis SCAN MATCH; memcached fnmatch): a migration moves only"
            " the keys it matches; absent, every key on the servers (they are assumed to hold only this"
            " pool's keys)."),
)

# Keys that describe a pool's own servers and placement: a front (route or tenants) has none,
# its routes' pools do.
SERVER_KEYS = ("servers", "hash", "hash_tag", "distribution", "timeout", "preconnect", "redis_auth",
               "redis_db", "server_connections", "auto_eject_hosts", "server_retry_timeout",
               "server_failure_limit", "tcpkeepalive", "transaction_connections", "redis_cluster",
               "cluster_refresh_interval", "read_from", "redis_auth_user", "users", "memcache_auth_user",
               "memcache_auth_password") + BACKEND_KEYS + ("migrate", "migrate_rate", "migrate_match")
# Keys of a twemproxy pool's hash placement, which a cluster pool does not use.
CLUSTER_UNUSED_KEYS = ("hash", "hash_tag", "distribution", "auto_eject_hosts", "server_failure_limit",
                       "server_retry_timeout")
# Keys that only a cluster pool reads.
CLUSTER_ONLY_KEYS = ("cluster_refresh_interval", "read_from")

GLOBAL_KEYS: Tuple[KeySpec, ...] = (
    KeySpec("worker_processes", _WorkerProcesses(),
            "Worker processes under a master; auto is one per CPU; 0 runs a single process"
            " without a master."),
    KeySpec("worker_cpu_affinity", _CpuAffinity(),
            "Pin workers to CPUs: auto deals one CPU per worker round-robin; a list gives"
            " each worker a CPU, a list of CPUs or a bitmask; off does not pin."),
    KeySpec("worker_shutdown_timeout", _Seconds(),
            "Seconds a stopping worker may spend finishing in-flight requests."),
    KeySpec("listen_mode", Choice(LISTEN_MODES, "listen mode"),
            "reuseport: each worker binds its own SO_REUSEPORT socket; shared: workers share"
            " the master's sockets."),
    KeySpec("accept_mutex", Boolean(),
            "In shared mode, workers take turns accepting (avoids the thundering herd)."),
    KeySpec("tcp_quickack", Boolean(),
            "Set TCP_QUICKACK after reading, to avoid delayed-ACK stalls."),
    KeySpec("control", SocketPath(),
            "Path of the control socket (`cacheproxyctl`) of the master or single process; absent disables it."
            " Created with control_mode's permissions."),
    KeySpec("user", Text(), "User the workers run as (the master must start as root)."),
    KeySpec("group", Text(), "Group the workers run as."),
    KeySpec("stats_http", _Listen(),
            "Address of the HTTP endpoint serving /status, /metrics (Prometheus), /stats.json and"
            " /slowlog; absent disables it."),
    KeySpec("admin_token", Text(),
            "Token that state-changing HTTP calls (POST /tune) need as Authorization: Bearer"
            " TOKEN; absent (and no admin_token_file): they are refused."),
    KeySpec("admin_token_file", Text(),
            "File holding the admin_token (read at each call; surrounding whitespace ignored)."),
    KeySpec("slowlog_threshold", _Seconds(),
            "Requests taking at least this many seconds (e.g. 0.01) go to the slow log."),
    KeySpec("slowlog_max_len", Integer(0),
            "Slow requests kept per process (the most recent, at most 100000); 0 keeps none."),
    KeySpec("slowlog_log", Boolean(), "Also write every slow request to the log."),
    KeySpec("worker_rlimit_nofile", Integer(1),
            "Open files limit (RLIMIT_NOFILE) of every process, as nginx's key; absent, the soft"
            " limit is raised to what client_connections and server connections need (up to"
            " the hard limit; the hard limit if clients are unlimited). Logged at start; at the"
            " limit new clients are refused, with one log line a second."),
    KeySpec("warmup", _Warmup(),
            "Before a process serves, run sample traffic through throwaway copies of the pools"
            " (in memory, then over loopback sockets; never to a backend) so PyPy's JIT has"
            " compiled the request path: a worker says ready, a single process listens, only"
            " after it. auto: until compiled, at most 6 s (0.1 s in a worker replacing a crashed"
            " one; a short warm-up on CPython); a number: at most that many seconds; off (or 0):"
            " none."),
    KeySpec("spare_worker", Boolean(),
            "Under a master, keep one more worker process started ahead (imports done, warmed up"
            " on the configuration file's pools, no slot yet, nothing served): it takes the place"
            " of the next worker to crash, so the connections queued on the crashed worker's"
            " socket wait for a short warm-up only, not for a new process to start and warm up."
            " A new spare starts once the replacement is ready."),
    KeySpec("control_mode", _ControlMode(),
            "Permissions of the control socket, in octal as listen's (0600: its owner only;"
            " connecting needs write permission, so 0660 lets its group in). The socket is created"
            " with them, never more open even for a moment; a reload leaves them (an upgrade applies them)."),
    KeySpec("metrics_http", _Listen(),
            "Address of a read-only HTTP endpoint serving only GET (and HEAD) /metrics, /status and"
            " /stats.json, any other method 405: for scrapers that must change nothing. Moved by a"
            " reload like stats_http; absent disables it."),
    KeySpec("auth_failures_limit", Integer(0),
            "Failed logins (Redis AUTH and HELLO AUTH, memcached authentication) from one client"
            " address within a minute, across the whole proxy, before that address's logins are"
            " refused for auth_block_seconds (see Authentication); 0 never blocks."),
    KeySpec("auth_block_seconds", _Seconds(),
            "Seconds a client address that reached auth_failures_limit has its logins refused"
            " unchecked."),
    KeySpec("state_dir", Text(),
            "Directory where the single process or the master keeps the state of online migrations"
            " (cacheproxy-migration-POOL.json), read again after a restart or an upgrade; absent: the"
            " configuration file's directory."),
)


class KeyDoc(NamedTuple):
    """One row of the configuration reference."""

    section: str  # "pool" or "global"
    key: str
    type: str
    default: Any  # the model's default; None for required keys
    required: bool
    meaning: str


def _model_defaults(model: type) -> Dict[str, Any]:
    return {f.name: f.default for f in fields(model) if f.default is not MISSING}


def describe_keys() -> List[KeyDoc]:
    """Every accepted key, pool keys first, with type, default and meaning."""
    docs = []
    for section, specs, model in (("pool", POOL_KEYS, PoolConfig), (GLOBAL_SECTION, GLOBAL_KEYS, GlobalConfig)):
        defaults = _model_defaults(model)
        for spec in specs:
            default = None if spec.required else defaults.get(spec.name)
            docs.append(KeyDoc(section, spec.name, spec.type_name, default,
                               spec.required, spec.meaning))
    return docs


# --------------------------------------------------------------------------
# Sections


def _unknown_key_message(key: str, specs: Sequence[KeySpec]) -> str:
    names = [spec.name for spec in specs]
    close = difflib.get_close_matches(key, names, n=1)
    if close:
        return "unknown key (did you mean %s?)" % (quote(close[0]),)
    return "unknown key (expected one of: %s)" % (", ".join(names),)


class _Section(NamedTuple):
    values: Dict[str, Any]  # the keys that parsed, by name
    lines: Dict[str, Optional[int]]  # line of every key present, valid or not


def _parse_section(node: ConfigNode, specs: Sequence[KeySpec], defaults: Dict[str, Any],
                   section: str, problems: _Problems) -> _Section:
    """Parse the keys of one pool or of the global section, reporting each bad one."""
    by_name = {spec.name: spec for spec in specs}
    values: Dict[str, Any] = {}
    lines: Dict[str, Optional[int]] = {}
    for key_node, value_node in node.value:
        key = key_name(key_node)
        line = key_node.line
        if key is None:
            problems.add(line, "keys must be strings, got %s" % (describe(key_node),), section)
            continue
        if key in lines:
            first = lines[key]
            problems.add(line, "duplicate key" + (" (first set on line %d)" % first if first else ""),
                         section, key)
            continue
        lines[key] = line
        spec = by_name.get(key)
        if spec is None:
            problems.add(line, _unknown_key_message(key, specs), section, key)
            continue
        if is_null(value_node):
            if not spec.required and defaults.get(key, MISSING) is None:
                continue  # an empty optional value is the same as leaving it out
            problems.add(line, "has no value", section, key)
            continue

        def report(message: str, at: Optional[int], key: str = key, line: Optional[int] = line) -> None:
            problems.add(at or line, message, section, key)

        try:
            values[key] = spec.value_type.parse(value_node, report)
        except Invalid as e:
            report(e.message, e.line)
    return _Section(values, lines)


class _ParsedPool(NamedTuple):
    pool: Optional[PoolConfig]  # None when the pool was refused
    listen: Optional[ListenSpec]  # kept even then, to find listen addresses used twice
    listen_line: Optional[int]
    has_listen: bool = True  # the key is there (valid or not)


def _parse_pool(name: str, line: Optional[int], node: ConfigNode, problems: _Problems,
                routed_file: bool = False) -> _ParsedPool:
    """One pool; its problems are reported."""
    section = "pool %s" % (quote(name),)
    if node.kind != MAPPING:
        problems.add(line, "expected a mapping of pool keys, got %s" % (describe(node),), section)
        return _ParsedPool(None, None, None, True)
    found_before = len(problems)
    parsed = _parse_section(node, POOL_KEYS, _POOL_DEFAULTS, section, problems)
    front = [key for key in ("route", "tenants") if key in parsed.lines]
    if len(front) == 2:
        problems.add(parsed.lines["tenants"], "set route or tenants, not both", section, "tenants")
    if front:
        for key in SERVER_KEYS:
            if key in parsed.lines:
                problems.add(parsed.lines[key], "applies to pools with servers, not to one with %s"
                             " (set it on the pools its routes name)" % (front[0],), section, key)
    elif "servers" not in parsed.lines:
        problems.add(line, "is missing (every pool needs it)", section, "servers")
    if "listen" not in parsed.lines and not routed_file:
        problems.add(line, "is missing (every pool needs it)", section, "listen")
    # In a file with routes, a pool they reach may leave listen out: checked once every pool is read.
    if parsed.values.get("redis_auth") and not parsed.values.get("redis", _POOL_DEFAULTS["redis"]):
        problems.add(parsed.lines["redis_auth"], "is only valid in a redis pool (set redis: true)",
                     section, "redis_auth")
    _check_memcache_logins(parsed, section, problems)
    if "redis_auth_user" in parsed.lines and not parsed.values.get("redis_auth"):
        problems.add(parsed.lines["redis_auth_user"], "needs redis_auth (the user's password)",
                     section, "redis_auth_user")
    _check_cluster(parsed, section, problems)
    _check_migrate(parsed, section, problems)
    check_pool_tls(parsed.values, parsed.lines, lambda at, message, key: problems.add(at, message, section, key))
    listen, listen_line = parsed.values.get("listen"), parsed.lines.get("listen")
    has_listen = "listen" in parsed.lines
    if len(problems) > found_before:
        return _ParsedPool(None, listen, listen_line, has_listen)
    return _ParsedPool(PoolConfig(name=name, **parsed.values), listen, listen_line, has_listen)


def _check_memcache_logins(parsed: "_Section", section: str, problems: _Problems) -> None:
    """The memcached login keys: memcached pools only; a backend login needs its user and password both."""
    values, lines = parsed.values, parsed.lines
    keys = [key for key in ("users", "memcache_auth_user", "memcache_auth_password") if key in lines]
    if values.get("redis", _POOL_DEFAULTS["redis"]):
        for key in keys:
            problems.add(lines[key], "is only valid in a memcached pool (Redis pools: redis_auth, or tenants"
                         " chosen by users)", section, key)
        return
    for key, other in (("memcache_auth_user", "memcache_auth_password"),
                       ("memcache_auth_password", "memcache_auth_user")):
        if key in lines and other not in lines:
            problems.add(lines[key], "needs %s too" % (other,), section, key)
        if len((values.get(key) or "x").split()) != 1:
            problems.add(lines[key], "no spaces (the text protocol's login sends user and password"
                         " separated by one)", section, key)


def _check_cluster(parsed: "_Section", section: str, problems: _Problems) -> None:
    """A cluster pool's keys: what it needs, what it refuses, and what it accepts without using."""
    values, lines = parsed.values, parsed.lines
    if not values.get("redis_cluster"):
        for key in CLUSTER_ONLY_KEYS:
            if key in lines:
                problems.add(lines[key], "is only valid in a Redis Cluster pool (set redis_cluster: true)",
                             section, key)
        return
    if not values.get("redis", _POOL_DEFAULTS["redis"]):
        problems.add(lines["redis_cluster"], "needs a redis pool (set redis: true)", section, "redis_cluster")
    if "redis_db" in lines and values.get("redis_db"):
        problems.add(lines["redis_db"], "Redis Cluster has only database 0", section, "redis_db")
    for server in values.get("servers", ()):
        if server.path is not None:
            problems.add(lines.get("servers"), "server %s: a cluster's seed nodes are host:port (its nodes"
                         " announce TCP addresses)" % (quote(server.path),), section, "servers")
    for key in CLUSTER_UNUSED_KEYS:
        if key in lines:
            problems.warn(lines[key], "not used by a Redis Cluster pool (keys go by hash slot, nodes by the"
                          " cluster's map)", section, key)


def _check_migrate(parsed: "_Section", section: str, problems: _Problems) -> None:
    """What online migration cannot do (L{twistedproxy.migration}): refused when C{migrate: true}."""
    values, lines = parsed.values, parsed.lines
    if not values.get("migrate"):
        return
    at = lines["migrate"]
    why = []
    if values.get("redis_cluster"):
        why.append("a Redis Cluster pool moves its slots itself")
    if values.get("distribution") == "random":
        why.append("distribution random places no key on one server")
    if values.get("redis", _POOL_DEFAULTS["redis"]):
        if values.get("backend_tls"):
            why.append("the servers are reached over TLS (backend_tls), which Redis MIGRATE does not speak")
        unix = [server.path for server in values.get("servers", ()) if server.path is not None]
        if unix:
            why.append("Redis MIGRATE needs host:port servers, not UNIX sockets (%s)"
                       % (", ".join(quote(path) for path in unix),))
    for reason in why:
        problems.add(at, "cannot move keys online: %s" % (reason,), section, "migrate")


def _parse_global(line: Optional[int], node: ConfigNode, problems: _Problems) -> Optional[GlobalConfig]:
    """The global section, or None after reporting why not."""
    section = "section %s" % (quote(GLOBAL_SECTION),)
    if is_null(node):
        return GlobalConfig()
    if node.kind != MAPPING:
        problems.add(line, "expected a mapping of global keys, got %s" % (describe(node),), section)
        return None
    found_before = len(problems)
    parsed = _parse_section(node, GLOBAL_KEYS, _GLOBAL_DEFAULTS, section, problems)
    values = parsed.values
    if "admin_token" in values and "admin_token_file" in values:
        problems.add(parsed.lines["admin_token_file"], "set admin_token or admin_token_file, not both",
                     section, "admin_token_file")
    if values.get("metrics_http") is not None and values.get("metrics_http") == values.get("stats_http"):
        problems.add(parsed.lines["metrics_http"], "is stats_http's address (the read-only endpoint needs one"
                     " of its own)", section, "metrics_http")
    if len(problems) > found_before:
        return None
    affinity = values.get("worker_cpu_affinity")
    if affinity is not None:
        workers = values.get("worker_processes", _GLOBAL_DEFAULTS["worker_processes"])
        values["worker_cpu_affinity"] = _per_worker_cpu_sets(affinity, workers)
    return GlobalConfig(**values)


def _check_routes(pools: Sequence[Tuple[str, _ParsedPool]], lines: Dict[str, Optional[int]],
                  problems: _Problems) -> None:
    """
    What routes need from the pools they name: that each exists, has servers and speaks the
    front's protocol; and that a pool without listen is named by some route.
    """
    by_name = {name: parsed.pool for name, parsed in pools if parsed.pool is not None}
    named = set()
    for name, parsed in pools:
        front = parsed.pool
        if front is None or not front.is_front:
            continue
        section = "pool %s" % (quote(name),)
        key = "route" if front.route is not None else "tenants"
        for route in front.routes:
            for leaf in route_pools(route):
                named.add(leaf.pool)
                target = by_name.get(leaf.pool)
                if leaf.pool not in lines:
                    problems.add(leaf.line, "no pool named %s" % (quote(leaf.pool),), section, key)
                elif target is None:
                    continue  # refused itself: its own problems are reported
                elif target.is_front:
                    problems.add(leaf.line, "pool %s has no servers (a route names pools with servers)"
                                 % (quote(leaf.pool),), section, key)
                elif target.redis != front.redis:
                    problems.add(leaf.line, "pool %s speaks %s, this pool %s" % (
                        quote(leaf.pool), target.protocol, front.protocol), section, key)
            if front.redis:
                for kind in route_kinds(route):
                    if kind in ("replicate", "warmup"):
                        problems.add(lines.get(name), "%s routes are for memcached pools only (a Redis"
                                     " command's effect cannot be copied safely)" % (kind,), section, key)
        if not front.redis and any(tenant.read_only_users for tenant in front.tenants):
            problems.add(lines.get(name), "read_only users are for Redis fronts (memcached users may write)",
                         section, key)
    if any(parsed.pool is None for _, parsed in pools):
        return  # a refused front's routes are unknown: which pools they name is too
    for name, parsed in pools:
        if not parsed.has_listen and name not in named:
            problems.add(lines.get(name), "is missing (every pool needs it, unless a route names the pool)",
                         "pool %s" % (quote(name),), "listen")


def _check_unique_listen(pools: Sequence[Tuple[str, _ParsedPool]], problems: _Problems) -> None:
    owners: Dict[Tuple, Tuple[str, Optional[int]]] = {}
    for name, parsed in pools:
        listen = parsed.listen
        if listen is None:
            continue
        address = address_key(listen.host, listen.port, listen.path)
        if address in owners:
            owner, owner_line = owners[address]
            problems.add(parsed.listen_line, "address %s is already used by pool %s%s"
                         % (listen, quote(owner), " (line %d)" % owner_line if owner_line else ""),
                         "pool %s" % (quote(name),), "listen")
        else:
            owners[address] = (name, parsed.listen_line)


def _build(root: Optional[ConfigNode], source: str) -> ProxyConfig:
    problems = _Problems(source)
    routed_file = False  # some pool has route or tenants
    pools: List[Tuple[str, _ParsedPool]] = []
    global_config = GlobalConfig()
    if root is None:
        problems.add(None, "no pools defined (the file is empty)")
    elif root.kind != MAPPING:
        problems.add(root.line, "expected a mapping of pool names to pools at the top level, got %s"
                     % (describe(root),))
    else:
        first_lines: Dict[str, Optional[int]] = {}
        routed_file = any(value.kind == MAPPING and any(key_name(k) in ("route", "tenants") for k, _ in value.value)
                          for key, value in root.value if key_name(key) != GLOBAL_SECTION)
        for key_node, value_node in root.value:
            name = key_name(key_node)
            line = key_node.line
            if name is None:
                problems.add(line, "pool names must be strings, got %s" % (describe(key_node),))
                continue
            if name in first_lines:
                first = first_lines[name]
                what = "section" if name == GLOBAL_SECTION else "pool"
                problems.add(line, "duplicate %s %s%s" % (what, quote(name),
                             " (first defined on line %d)" % first if first else ""))
                continue
            first_lines[name] = line
            if name == GLOBAL_SECTION:
                global_config = _parse_global(line, value_node, problems) or global_config
                continue
            pools.append((name, _parse_pool(name, line, value_node, problems, routed_file)))
        if not set(first_lines) - {GLOBAL_SECTION}:
            problems.add(root.line, "no pools defined")
    _check_unique_listen(pools, problems)
    if root is not None and root.kind == MAPPING and routed_file:
        _check_routes(pools, first_lines, problems)
    problems.raise_if_any()
    return ProxyConfig(pools=tuple(parsed.pool for _, parsed in pools if parsed.pool is not None),
                       global_=global_config, source=source, warnings=tuple(problems.warnings))


_POOL_DEFAULTS = _model_defaults(PoolConfig)
_GLOBAL_DEFAULTS = _model_defaults(GlobalConfig)


# --------------------------------------------------------------------------
# Entry points


def parse_config(text: str, source: str = "<string>") -> ProxyConfig:
    """
    The configuration in YAML C{text}; C{source} names it in error messages.

    @raise ConfigError: listing every problem found.
    """
    try:
        root = from_yaml(text)
    except SourceError as e:
        problems = _Problems(source)
        problems.add(e.line, e.message)
        raise problems.error()
    return _build(root, source)


def config_from_dict(data: Dict[str, Any], source: str = "<dict>") -> ProxyConfig:
    """
    The configuration in plain Python data shaped like the YAML (pool name ->
    keys, plus an optional C{"global"}), checked by the same rules.

    @raise ConfigError: listing every problem found (without line numbers).
    """
    return _build(from_python(data), source)


def load_config(path: Union[str, "os.PathLike[str]"]) -> ProxyConfig:
    """
    The configuration in the file at C{path}, which names it in error messages.

    @raise ConfigError: when the file cannot be read or is refused.
    """
    return load_config_text(path)[1]


def load_config_text(path: Union[str, "os.PathLike[str]"]) -> Tuple[str, ProxyConfig]:
    """
    The text of the file at C{path} and the configuration in it (the text is
    what a master pushes to its workers, and tells a reload whether anything changed).

    @raise ConfigError: when the file cannot be read or is refused.
    """
    source = os.fsdecode(path)
    try:
        with open(source, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(["%s: cannot read the configuration: %s" % (source, e.strerror or e)])
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(["%s: not UTF-8 text (invalid byte at offset %d)" % (source, e.start)])
    return text, parse_config(text, source)
