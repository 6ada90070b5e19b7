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
import ipaddress
import math
import os
import re
from dataclasses import MISSING, dataclass, fields
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

from twistedproxy.config.model import GlobalConfig, ListenSpec, PoolConfig, ProxyConfig, ServerSpec
from twistedproxy.config.tree import MAPPING, SCALAR, SEQUENCE, ConfigNode, SourceError, from_python, from_yaml

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
LISTEN_MODES = ("reuseport", "shared")

GLOBAL_SECTION = "global"  # the one top-level name that is not a pool

INT_MAX = 2 ** 31 - 1  # twemproxy keeps every number in a C int
UNIX_PATH_MAX = 108  # sizeof(sockaddr_un.sun_path) on Linux, the NUL included
CPU_SETSIZE = 1024  # glibc's cpu_set_t: CPU numbers are below this


class ConfigError(Exception):
    """
    The configuration was refused.  C{errors} holds every problem found, each a
    complete C{file:line: pool 'name': key 'key': message} line, in file order.
    """

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = list(errors)
        Exception.__init__(self, "\n".join(self.errors))

    def __str__(self) -> str:
        return "\n".join(self.errors)


class _Invalid(Exception):
    """One problem with one value; whoever catches it adds file, line, section and key."""

    def __init__(self, message: str, line: Optional[int] = None) -> None:
        Exception.__init__(self, message)
        self.message = message
        self.line = line


# A value type calls this for each problem when it can find more than one
# (one per bad server line), rather than stopping at the first.
Report = Callable[[str, Optional[int]], None]


class _Problems:
    """The problems found so far in one source."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._found: List[Tuple[int, str]] = []

    def __len__(self) -> int:
        return len(self._found)

    def add(self, line: Optional[int], message: str, section: Optional[str] = None,
            key: Optional[str] = None) -> None:
        where = self.source if line is None else "%s:%d" % (self.source, line)
        parts = [where]
        if section is not None:
            parts.append(section)
        if key is not None:
            parts.append("key %s" % _quote(key))
        parts.append(message)
        self._found.append((line or 0, ": ".join(parts)))

    def error(self) -> ConfigError:
        # sorted() is stable: problems on one line keep the order they were found in.
        return ConfigError([text for _, text in sorted(self._found, key=lambda found: found[0])])

    def raise_if_any(self) -> None:
        if self._found:
            raise self.error()


# --------------------------------------------------------------------------
# Reading scalars the way twemproxy does: as text


_DECIMAL = re.compile(r"[+-]?[0-9]+\Z")
_DIGITS = re.compile(r"[0-9]+\Z")
_HOSTNAME = re.compile(r"[A-Za-z0-9_.-]+\Z")
_OCTAL_PERMISSION = re.compile(r"[0-7]{1,4}\Z")
_BITMASK = re.compile(r"[01]+\Z")


def _quote(text: str) -> str:
    return "'%s'" % (text,)


def _is_null(node: ConfigNode) -> bool:
    return node.kind == SCALAR and node.value is None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _scalar_text(node: ConfigNode) -> Optional[str]:
    """
    A scalar as twemproxy reads it, the text as written; None for collections,
    nulls and non-string data handed to L{config_from_dict}.
    """
    if node.kind != SCALAR or node.value is None:
        return None
    if node.plain_text is not None:
        return node.plain_text
    if isinstance(node.value, str):
        return node.value
    return None


def _describe(node: ConfigNode) -> str:
    """A value as an error message quotes it."""
    if node.kind == MAPPING:
        return "a mapping"
    if node.kind == SEQUENCE:
        return "a list"
    if node.value is None:
        return "an empty value"
    text = _scalar_text(node)
    if text is None:
        value = node.value
        text = ("true" if value else "false") if isinstance(value, bool) else repr(value)
    return _quote(text)


def _key_name(node: ConfigNode) -> Optional[str]:
    """A mapping key as text (YAML C{123:} names pool '123'); None when it is not a scalar."""
    if node.kind != SCALAR:
        return None
    if node.plain_text is not None:
        return node.plain_text
    return node.value if isinstance(node.value, str) else None


def _integer_value(node: ConfigNode, expected: str) -> int:
    """
    A whole number written in decimal, as twemproxy's C{nc_atoi} reads it
    (so C{0400} is 400, not YAML 1.1's octal 256; C{0x10} is refused).
    """
    text = _scalar_text(node)
    if text is not None:
        if _DECIMAL.match(text.strip()):
            return int(text.strip(), 10)
    elif node.kind == SCALAR and _is_int(node.value):
        return node.value
    raise _Invalid("expected %s, got %s" % (expected, _describe(node)))


def _check_socket_path(path: str) -> None:
    if len(path.encode("utf-8")) >= UNIX_PATH_MAX:
        raise _Invalid("UNIX socket path %s is too long (at most %d bytes)"
                       % (_quote(path), UNIX_PATH_MAX - 1))


def _host(text: str) -> str:
    """A hostname or IP address; an IPv6 address loses its brackets."""
    host = text
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    if bracketed or ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _Invalid("invalid IPv6 address %s" % (_quote(text),))
        return host
    if not _HOSTNAME.match(host):
        raise _Invalid("invalid host %s" % (_quote(text),))
    return host


def _port(text: str) -> int:
    if not _DIGITS.match(text) or not 1 <= int(text) <= 65535:
        raise _Invalid("invalid port %s (expected 1-65535)" % (_quote(text),))
    return int(text)


def _host_and_port(text: str, expected_format: str) -> Tuple[str, int]:
    """C{host:port}, split at the last colon like twemproxy (so C{::1:6379} works)."""
    host, colon, port = text.rpartition(":")
    if not colon or not host:
        raise _Invalid("expected %s, got %s" % (expected_format, _quote(text)))
    return _host(host), _port(port)


def _address_key(host: Optional[str], port: Optional[int], path: Optional[str]) -> Tuple:
    """What makes two addresses the same, for duplicate checks (case, IPv6 spellings)."""
    if path is not None:
        return ("unix", path)
    assert host is not None
    if ":" in host:
        host = ipaddress.ip_address(host).compressed
    return ("inet", host.lower(), port)


# --------------------------------------------------------------------------
# Value types: each has the name shown in the reference and a parse() that
# returns the model's value or raises _Invalid.


class _ValueType:
    name = ""

    def parse(self, node: ConfigNode, report: Report) -> Any:
        raise NotImplementedError


class _Integer(_ValueType):
    def __init__(self, minimum: int, name: Optional[str] = None) -> None:
        self.minimum = minimum
        self.name = name or "integer >= %d" % (minimum,)

    def parse(self, node: ConfigNode, report: Report) -> Any:
        value = _integer_value(node, "an integer >= %d" % (self.minimum,))
        if value < self.minimum:
            if self.minimum == 0:
                raise _Invalid("must not be negative (got %d)" % (value,))
            raise _Invalid("must be at least %d (got %d)" % (self.minimum, value))
        if value > INT_MAX:
            raise _Invalid("is too large (got %d, at most %d)" % (value, INT_MAX))
        return value


class _Milliseconds(_Integer):
    """A timeout in ms where 0, like twemproxy's unset -1, means none: stored as None."""

    def __init__(self) -> None:
        _Integer.__init__(self, 0, "integer >= 0 (ms)")

    def parse(self, node: ConfigNode, report: Report) -> Any:
        return _Integer.parse(self, node, report) or None


class _Boolean(_ValueType):
    """twemproxy takes exactly C{true} or C{false} (YAML's C{True}, C{yes}, C{on} are refused)."""

    name = "true | false"

    def parse(self, node: ConfigNode, report: Report) -> Any:
        if node.kind == SCALAR:
            if node.plain_text is None and isinstance(node.value, bool):
                return node.value
            text = _scalar_text(node)
            if text in ("true", "false"):
                return text == "true"
        raise _Invalid("expected true or false, got %s" % (_describe(node),))


class _Choice(_ValueType):
    def __init__(self, choices: Sequence[str], noun: str) -> None:
        self.choices = tuple(choices)
        self.noun = noun
        self.name = " | ".join(self.choices)

    def parse(self, node: ConfigNode, report: Report) -> Any:
        text = _scalar_text(node)
        if text in self.choices:
            return text
        expected = "expected one of: %s" % (", ".join(self.choices),)
        if text is None:
            raise _Invalid("%s, got %s" % (expected, _describe(node)))
        raise _Invalid("unknown %s %s (%s)" % (self.noun, _quote(text), expected))


class _Text(_ValueType):
    """A string; a number is taken as its digits (YAML C{redis_auth: 1234})."""

    name = "string"

    def parse(self, node: ConfigNode, report: Report) -> Any:
        text = _scalar_text(node)
        if text is None and node.kind == SCALAR and _is_int(node.value):
            text = str(node.value)
        if text is None:
            raise _Invalid("expected a string, got %s" % (_describe(node),))
        if not text:
            raise _Invalid("must not be empty")
        return text


_TEXT = _Text()


class _SocketPath(_Text):
    name = "path"

    def parse(self, node: ConfigNode, report: Report) -> Any:
        path = _Text.parse(self, node, report)
        _check_socket_path(path)
        return path


class _HashTag(_ValueType):
    name = 'two characters, e.g. "{}"'

    def parse(self, node: ConfigNode, report: Report) -> Any:
        text = _scalar_text(node)
        if text is None:
            hint = ""
            if node.kind == MAPPING and not node.value:
                hint = ' (quote it: hash_tag: "{}")'
            raise _Invalid("expected a 2-character string, got %s%s" % (_describe(node), hint))
        tag = text.encode("utf-8")
        if len(tag) != 2:
            raise _Invalid('must be exactly 2 characters, like "{}" (got %s)' % (_quote(text),))
        return tag


class _Listen(_ValueType):
    name = "host:port | /path/to/socket [octal permissions]"

    def parse(self, node: ConfigNode, report: Report) -> Any:
        text = _TEXT.parse(node, report).strip()
        if not text.startswith("/"):
            host, port = _host_and_port(text, "'host:port' or '/path/to/socket [permissions]'")
            return ListenSpec(host=host, port=port)
        # twemproxy splits "path permissions" at the last space.
        path, space, permission = text.rpartition(" ")
        if not space:
            path, permission = text, "0"
        if not _OCTAL_PERMISSION.match(permission) or int(permission, 8) > 0o777:
            raise _Invalid("invalid socket permissions %s (expected octal like 0666)"
                           % (_quote(permission),))
        path = path.rstrip()
        _check_socket_path(path)
        # twemproxy only chmods the socket when the permissions are not 0.
        return ListenSpec(path=path, perm=int(permission, 8) or None)


class _Servers(_ValueType):
    name = "list of host:port:weight [name] | /path/to/socket:weight [name]"

    _FORMAT = "'host:port:weight [name]' or '/path/to/socket:weight [name]'"

    def parse(self, node: ConfigNode, report: Report) -> Any:
        if node.kind != SEQUENCE:
            raise _Invalid("expected a list of servers, got %s" % (_describe(node),))
        if not node.value:
            raise _Invalid("is empty: a pool needs at least one server")
        servers = []
        first_by_address: Dict[Tuple, str] = {}
        first_by_name: Dict[str, str] = {}
        for number, entry in enumerate(node.value, 1):
            where = "line %d" % (entry.line,) if entry.line else "entry %d" % (number,)
            text = _scalar_text(entry)
            try:
                if text is None:
                    raise _Invalid("expected a server string (%s), got %s"
                                   % (self._FORMAT, _describe(entry)))
                server = self._server(text.strip())
            except _Invalid as e:
                report("server %s: %s" % (_quote(text), e.message) if text else e.message, entry.line)
                continue
            # twemproxy refuses two servers with one ketama name; an address
            # listed twice is refused too, as it is surely a mistake.
            address = _address_key(server.host, server.port, server.path)
            if address in first_by_address:
                report("server %s: same address as the server on %s"
                       % (_quote(text), first_by_address[address]), entry.line)
                continue
            if server.ketama_name in first_by_name:
                report("server %s: name %s is already used by the server on %s"
                       % (_quote(text), _quote(server.ketama_name), first_by_name[server.ketama_name]),
                       entry.line)
                continue
            first_by_address[address] = where
            first_by_name[server.ketama_name] = where
            servers.append(server)
        return tuple(servers)

    def _server(self, text: str) -> ServerSpec:
        words = text.split()
        if len(words) not in (1, 2):
            raise _Invalid("expected %s" % (self._FORMAT,))
        address, name = words[0], (words[1] if len(words) == 2 else None)
        rest, colon, weight_text = address.rpartition(":")
        if not colon or not rest:
            raise _Invalid("expected %s" % (self._FORMAT,))
        if not _DIGITS.match(weight_text):
            raise _Invalid("invalid weight %s (expected an integer >= 1)" % (_quote(weight_text),))
        weight = int(weight_text)
        if weight < 1:
            raise _Invalid("weight must be at least 1 (got 0)")
        if weight > INT_MAX:
            raise _Invalid("weight is too large (got %d, at most %d)" % (weight, INT_MAX))
        if rest.startswith("/"):
            _check_socket_path(rest)
            return ServerSpec(host=None, port=None, weight=weight, name=name, path=rest)
        host, port = _host_and_port(rest, self._FORMAT)
        return ServerSpec(host=host, port=port, weight=weight, name=name)


class _WorkerProcesses(_Integer):
    def __init__(self) -> None:
        _Integer.__init__(self, 0, "auto | integer >= 0")

    def parse(self, node: ConfigNode, report: Report) -> Any:
        if _scalar_text(node) == "auto":
            return os.cpu_count() or 1
        return _Integer.parse(self, node, report)


class _Seconds(_ValueType):
    name = "number >= 0 (seconds)"

    def parse(self, node: ConfigNode, report: Report) -> Any:
        text = _scalar_text(node)
        value: Optional[float] = None
        if text is not None:
            try:
                value = float(text)
            except ValueError:
                pass
        elif node.kind == SCALAR and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            value = float(node.value)
        if value is None or not math.isfinite(value):
            raise _Invalid("expected a number of seconds, got %s" % (_describe(node),))
        if value < 0:
            raise _Invalid("must not be negative (got %s)" % (text or value,))
        return value


class _Warmup(_Seconds):
    name = "auto | off | number >= 0 (seconds)"

    def parse(self, node: ConfigNode, report: Report) -> Any:
        text = _scalar_text(node)
        if text in ("auto", "off"):
            return text if text == "auto" else 0.0
        if node.kind == SCALAR and node.plain_text is None and node.value is False:
            return 0.0  # YAML's bare off
        try:
            return _Seconds.parse(self, node, report)
        except _Invalid:
            raise _Invalid("expected auto, off or a number of seconds, got %s" % (_describe(node),))


_AUTO = "auto"


class _CpuAffinity(_ValueType):
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
                raise _Invalid("is an empty list (%s)" % (self._EXPECTED,))
            cpu_sets = []
            for entry in node.value:
                try:
                    cpu_sets.append(self._entry(entry))
                except _Invalid as e:
                    report(e.message, entry.line)
            return tuple(cpu_sets)
        if node.kind == SCALAR:
            if node.value is False:  # YAML 'off', 'false', 'no'
                return None
            text = _scalar_text(node)
            if text == _AUTO:
                return _AUTO
            if text is not None and text.lower() == "off":
                return None
            if text is not None and node.value is not True:
                return tuple(_bitmask_cpus(mask) for mask in text.split())
        raise _Invalid("%s, got %s" % (self._EXPECTED, _describe(node)))

    def _entry(self, entry: ConfigNode) -> Tuple[int, ...]:
        if entry.kind == SEQUENCE:
            if not entry.value:
                raise _Invalid("an empty list of CPUs")
            return tuple(sorted(set(_cpu_number(cpu) for cpu in entry.value)))
        text = _scalar_text(entry)
        # Unquoted, "0101" would be YAML's octal 65: nobody means CPU 65 that way.
        if isinstance(entry.value, str) or (text is not None and len(text) > 1 and text.startswith("0")):
            return _bitmask_cpus(text or "")
        return (_cpu_number(entry),)


def _bitmask_cpus(mask: str) -> Tuple[int, ...]:
    if not _BITMASK.match(mask) or "1" not in mask or len(mask) > CPU_SETSIZE:
        raise _Invalid("invalid CPU bitmask %s (expected 0s and 1s with at least one 1;"
                       " the rightmost digit is CPU 0)" % (_quote(mask),))
    return tuple(cpu for cpu, digit in enumerate(reversed(mask)) if digit == "1")


def _cpu_number(node: ConfigNode) -> int:
    cpu = _integer_value(node, "a CPU number")
    if not 0 <= cpu < CPU_SETSIZE:
        raise _Invalid("invalid CPU number %d (expected 0-%d)" % (cpu, CPU_SETSIZE - 1))
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
    value_type: _ValueType
    meaning: str
    required: bool = False

    @property
    def type_name(self) -> str:
        return self.value_type.name


POOL_KEYS: Tuple[KeySpec, ...] = (
    KeySpec("listen", _Listen(),
            "Address the pool listens on: host:port, or the path of a UNIX socket with"
            " optional octal permissions.", required=True),
    KeySpec("hash", _Choice(HASHES, "hash"), "Hash function applied to keys."),
    KeySpec("hash_tag", _HashTag(),
            "Two characters; only the part of a key between them is hashed, so related keys"
            " land on one server."),
    KeySpec("distribution", _Choice(DISTRIBUTIONS, "distribution"),
            "How a key's hash picks a server: consistent hashing (ketama), hash modulo server"
            " count, or a random server."),
    KeySpec("timeout", _Milliseconds(),
            "Milliseconds to wait for a server to connect or reply; absent or 0 waits forever."),
    KeySpec("backlog", _Integer(0), "Listen backlog of the pool's socket."),
    KeySpec("preconnect", _Boolean(), "Connect to every server at start-up instead of on first use."),
    KeySpec("redis", _Boolean(), "The pool speaks Redis (true) or memcached (false)."),
    KeySpec("redis_auth", _Text(),
            "Password sent with AUTH on every new server connection; Redis pools only."),
    KeySpec("redis_db", _Integer(0), "Database selected with SELECT on every new server connection."),
    KeySpec("server_connections", _Integer(1), "Connections opened to each server, at most."),
    KeySpec("auto_eject_hosts", _Boolean(),
            "Eject a server from the hash ring after server_failure_limit consecutive failures."),
    KeySpec("server_retry_timeout", _Integer(0),
            "Milliseconds before an ejected server is tried again."),
    KeySpec("server_failure_limit", _Integer(0),
            "Consecutive failures that eject a server (with auto_eject_hosts)."),
    KeySpec("tcpkeepalive", _Boolean(), "Enable TCP keepalive on server connections."),
    KeySpec("reuseport", _Boolean(), "Set SO_REUSEPORT on the pool's listening socket."),
    KeySpec("servers", _Servers(),
            "The backends: host:port:weight or /path:weight, each with an optional name that"
            " replaces the address in consistent hashing.", required=True),
    KeySpec("client_connections", _Integer(0),
            "Client connections allowed at once; 0 is unlimited (twemproxy 0.5.0 reads but"
            " ignores it). Under a master it holds for the whole proxy, split evenly over the"
            " workers (limit // workers each, the remainder to the first ones)."),
    KeySpec("max_request_bytes", _Integer(1),
            "twistedproxy: a larger request is refused as a protocol error."),
    KeySpec("client_max_pending", _Integer(1),
            "twistedproxy: requests in flight per client before the proxy stops reading from it."),
)

GLOBAL_KEYS: Tuple[KeySpec, ...] = (
    KeySpec("worker_processes", _WorkerProcesses(),
            "Worker processes under a master; auto is one per CPU; 0 runs a single process"
            " without a master."),
    KeySpec("worker_cpu_affinity", _CpuAffinity(),
            "Pin workers to CPUs: auto deals one CPU per worker round-robin; a list gives"
            " each worker a CPU, a list of CPUs or a bitmask; off does not pin."),
    KeySpec("worker_shutdown_timeout", _Seconds(),
            "Seconds a stopping worker may spend finishing in-flight requests."),
    KeySpec("listen_mode", _Choice(LISTEN_MODES, "listen mode"),
            "reuseport: each worker binds its own SO_REUSEPORT socket; shared: workers share"
            " the master's sockets."),
    KeySpec("accept_mutex", _Boolean(),
            "In shared mode, workers take turns accepting (avoids the thundering herd)."),
    KeySpec("tcp_quickack", _Boolean(),
            "Set TCP_QUICKACK after reading, to avoid delayed-ACK stalls."),
    KeySpec("control", _SocketPath(),
            "Path of the control socket (`cacheproxyctl`) of the master or single process; absent disables it."),
    KeySpec("user", _Text(), "User the workers run as (the master must start as root)."),
    KeySpec("group", _Text(), "Group the workers run as."),
    KeySpec("stats_http", _Listen(),
            "Address of the HTTP endpoint serving /status, /metrics (Prometheus), /stats.json and"
            " /slowlog; absent disables it."),
    KeySpec("admin_token", _Text(),
            "Token that state-changing HTTP calls (POST /tune) need as Authorization: Bearer"
            " TOKEN; absent (and no admin_token_file): they are refused."),
    KeySpec("admin_token_file", _Text(),
            "File holding the admin_token (read at each call; surrounding whitespace ignored)."),
    KeySpec("slowlog_threshold", _Seconds(),
            "Requests taking at least this many seconds (e.g. 0.01) go to the slow log."),
    KeySpec("slowlog_max_len", _Integer(0),
            "Slow requests kept per process (the most recent, at most 100000); 0 keeps none."),
    KeySpec("slowlog_log", _Boolean(), "Also write every slow request to the log."),
    KeySpec("worker_rlimit_nofile", _Integer(1),
            "Open files limit (RLIMIT_NOFILE) of every process, as nginx's key; absent, the soft"
            " limit is raised to what client_connections and server connections need (up to"
            " the hard limit; the hard limit if clients are unlimited). Logged at start; at the"
            " limit new clients are refused, with one log line a second."),
    KeySpec("warmup", _Warmup(),
            "Before a process serves, run sample traffic through throwaway copies of the pools"
            " (in memory, then over loopback sockets; never to a backend) so PyPy's JIT has"
            " compiled the request path: a worker says ready, a single process listens, only"
            " after it. auto: until compiled, at most 2 s (0.1 s in a worker replacing a crashed"
            " one; a short warm-up on CPython); a number: at most that many seconds; off (or 0):"
            " none."),
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
        return "unknown key (did you mean %s?)" % (_quote(close[0]),)
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
        key = _key_name(key_node)
        line = key_node.line
        if key is None:
            problems.add(line, "keys must be strings, got %s" % (_describe(key_node),), section)
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
        if _is_null(value_node):
            if not spec.required and defaults.get(key, MISSING) is None:
                continue  # an empty optional value is the same as leaving it out
            problems.add(line, "has no value", section, key)
            continue

        def report(message: str, at: Optional[int], key: str = key, line: Optional[int] = line) -> None:
            problems.add(at or line, message, section, key)

        try:
            values[key] = spec.value_type.parse(value_node, report)
        except _Invalid as e:
            report(e.message, e.line)
    return _Section(values, lines)


class _ParsedPool(NamedTuple):
    pool: Optional[PoolConfig]  # None when the pool was refused
    listen: Optional[ListenSpec]  # kept even then, to find listen addresses used twice
    listen_line: Optional[int]


def _parse_pool(name: str, line: Optional[int], node: ConfigNode, problems: _Problems) -> _ParsedPool:
    """One pool; its problems are reported."""
    section = "pool %s" % (_quote(name),)
    if node.kind != MAPPING:
        problems.add(line, "expected a mapping of pool keys, got %s" % (_describe(node),), section)
        return _ParsedPool(None, None, None)
    found_before = len(problems)
    parsed = _parse_section(node, POOL_KEYS, _POOL_DEFAULTS, section, problems)
    for spec in POOL_KEYS:
        if spec.required and spec.name not in parsed.lines:
            problems.add(line, "is missing (every pool needs it)", section, spec.name)
    if parsed.values.get("redis_auth") and not parsed.values.get("redis", _POOL_DEFAULTS["redis"]):
        problems.add(parsed.lines["redis_auth"], "is only valid in a redis pool (set redis: true)",
                     section, "redis_auth")
    listen, listen_line = parsed.values.get("listen"), parsed.lines.get("listen")
    if len(problems) > found_before:
        return _ParsedPool(None, listen, listen_line)
    return _ParsedPool(PoolConfig(name=name, **parsed.values), listen, listen_line)


def _parse_global(line: Optional[int], node: ConfigNode, problems: _Problems) -> Optional[GlobalConfig]:
    """The global section, or None after reporting why not."""
    section = "section %s" % (_quote(GLOBAL_SECTION),)
    if _is_null(node):
        return GlobalConfig()
    if node.kind != MAPPING:
        problems.add(line, "expected a mapping of global keys, got %s" % (_describe(node),), section)
        return None
    found_before = len(problems)
    parsed = _parse_section(node, GLOBAL_KEYS, _GLOBAL_DEFAULTS, section, problems)
    values = parsed.values
    if "admin_token" in values and "admin_token_file" in values:
        problems.add(parsed.lines["admin_token_file"], "set admin_token or admin_token_file, not both",
                     section, "admin_token_file")
    if len(problems) > found_before:
        return None
    affinity = values.get("worker_cpu_affinity")
    if affinity is not None:
        workers = values.get("worker_processes", _GLOBAL_DEFAULTS["worker_processes"])
        values["worker_cpu_affinity"] = _per_worker_cpu_sets(affinity, workers)
    return GlobalConfig(**values)


def _check_unique_listen(pools: Sequence[Tuple[str, _ParsedPool]], problems: _Problems) -> None:
    owners: Dict[Tuple, Tuple[str, Optional[int]]] = {}
    for name, parsed in pools:
        listen = parsed.listen
        if listen is None:
            continue
        address = _address_key(listen.host, listen.port, listen.path)
        if address in owners:
            owner, owner_line = owners[address]
            problems.add(parsed.listen_line, "address %s is already used by pool %s%s"
                         % (listen, _quote(owner), " (line %d)" % owner_line if owner_line else ""),
                         "pool %s" % (_quote(name),), "listen")
        else:
            owners[address] = (name, parsed.listen_line)


def _build(root: Optional[ConfigNode], source: str) -> ProxyConfig:
    problems = _Problems(source)
    pools: List[Tuple[str, _ParsedPool]] = []
    global_config = GlobalConfig()
    if root is None:
        problems.add(None, "no pools defined (the file is empty)")
    elif root.kind != MAPPING:
        problems.add(root.line, "expected a mapping of pool names to pools at the top level, got %s"
                     % (_describe(root),))
    else:
        first_lines: Dict[str, Optional[int]] = {}
        for key_node, value_node in root.value:
            name = _key_name(key_node)
            line = key_node.line
            if name is None:
                problems.add(line, "pool names must be strings, got %s" % (_describe(key_node),))
                continue
            if name in first_lines:
                first = first_lines[name]
                what = "section" if name == GLOBAL_SECTION else "pool"
                problems.add(line, "duplicate %s %s%s" % (what, _quote(name),
                             " (first defined on line %d)" % first if first else ""))
                continue
            first_lines[name] = line
            if name == GLOBAL_SECTION:
                global_config = _parse_global(line, value_node, problems) or global_config
                continue
            pools.append((name, _parse_pool(name, line, value_node, problems)))
        if not set(first_lines) - {GLOBAL_SECTION}:
            problems.add(root.line, "no pools defined")
    _check_unique_listen(pools, problems)
    problems.raise_if_any()
    return ProxyConfig(pools=tuple(parsed.pool for _, parsed in pools if parsed.pool is not None),
                       global_=global_config, source=source)


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
