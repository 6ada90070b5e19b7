"""
The routing extension of nutcracker.yml: what a listening pool sends its
requests through when it has no C{servers:} of its own.

A plain twemproxy file never uses any of this and reads exactly as before.  A
pool with C{listen:} and C{route:} (or C{tenants:}) instead of C{servers:} is a
I{front}: its requests go through a tree of routes whose leaves are other
pools, named by their key in the file.  Such a pool needs no C{listen:} of its
own; with none it is reached only through routes.

A route is written as::

    POOL                                   # the pool's hash placement over its servers
    {failover: [ROUTE, ROUTE, ...]}        # the first that can answer: the next one when a
                                           # server is down (ejected, refused) or times out
    {replicate: [ROUTE, ROUTE, ...]}       # memcached: writes to all, reads from the first
    {shadow: ROUTE, copy_to: ROUTE,        # ROUTE answers; a sampled copy goes to copy_to
     sample: 0.1, queue: 1024}             # through a bounded queue, its replies dropped
    {warmup: ROUTE, from: ROUTE}           # memcached: a miss on the (cold) first is read
                                           # from the (warm) second and added to the first
    {prefix: {"PREFIX": ROUTE | {route: ROUTE, strip: true}, ...}, default: ROUTE}
                                           # longest prefix wins; no match and no default:
                                           # an error reply

and tenants (one listener, several users of the cache) as::

    tenants:
      NAME:                                # the tenant's name in every stats output
        prefix: "PREFIX"                   # keys with this prefix are the tenant's, or
        default: true                      # the tenant of keys no prefix claims, or
        users: {NAME: PASSWORD, ...}       # Redis: the AUTH users whose connections it owns;
                                           # NAME: {password: PASSWORD, read_only: true}
                                           # for a user whose writes are refused
        strip_prefix: false                # send keys without the prefix (and put it back
                                           # on replies that carry keys)
        route: ROUTE                       # where its requests go
        rate_limit: 1000                   # requests a second (token bucket); excess: errors
        rate_burst: 1000                   # the bucket's size (default: one second's worth)
        max_client_connections: 0          # users' tenants: connections at once; 0 unlimited

A password is the text itself, C{sha256:} and the hex SHA-256 of it, or
C{pbkdf2:sha256:ITERATIONS:SALT:HEX} (L{twistedproxy.config.passwords}).

This module holds the immutable objects those become and the value types that
read them; which pool names exist and which protocol each speaks is checked
by the loader once every pool has been read (L{route_pools}).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

from twistedproxy.config import passwords
from twistedproxy.config.passwords import Password
from twistedproxy.config.tree import MAPPING, SCALAR, SEQUENCE, ConfigNode
from twistedproxy.config.values import (
    INT_MAX,
    Boolean,
    Invalid,
    Report,
    ValueType,
    describe,
    integer_value,
    is_int,
    key_name,
    number_value,
    quote,
    scalar_text,
)

ROUTE_KINDS = ("failover", "replicate", "shadow", "warmup", "prefix")
DEFAULT_SHADOW_QUEUE = 1024  # requests waiting for the shadow pool, at most


# --------------------------------------------------------------------------
# What a route becomes


@dataclass(frozen=True)
class PoolRoute:
    """The named pool's own placement (hash, distribution, hash tag) over its servers."""

    pool: str
    line: Optional[int] = field(default=None, compare=False)  # where the name was written


@dataclass(frozen=True)
class FailoverRoute:
    """The first route that can answer; the next one when a server is down or times out."""

    routes: Tuple["RouteSpec", ...]


@dataclass(frozen=True)
class ReplicateRoute:
    """memcached: writes go to every route, reads to the first (the authoritative one)."""

    routes: Tuple["RouteSpec", ...]


@dataclass(frozen=True)
class ShadowRoute:
    """C{route} answers; a sample of the traffic is copied to C{copy_to}, its replies dropped."""

    route: "RouteSpec"
    copy_to: "RouteSpec"
    sample: float = 1.0  # the fraction of requests copied
    queue: int = DEFAULT_SHADOW_QUEUE  # copies waiting at most; more are dropped and counted


@dataclass(frozen=True)
class WarmupRoute:
    """memcached: C{route} (cold) answers; its misses are read from C{warm} and added to it."""

    route: "RouteSpec"
    warm: "RouteSpec"


@dataclass(frozen=True)
class PrefixEntry:
    prefix: bytes
    route: "RouteSpec"
    strip: bool = False  # the backend sees the key without the prefix


@dataclass(frozen=True)
class PrefixRoute:
    """Per key, the entry with the longest matching prefix; else C{default}; else an error."""

    entries: Tuple[PrefixEntry, ...]  # longest prefix first
    default: Optional["RouteSpec"] = None


RouteSpec = Union[PoolRoute, FailoverRoute, ReplicateRoute, ShadowRoute, WarmupRoute, PrefixRoute]


@dataclass(frozen=True)
class TenantSpec:
    """One tenant of a listening pool: which requests are its, where they go, its limits."""

    name: str
    route: RouteSpec
    prefix: Optional[bytes] = None
    default: bool = False
    users: Tuple[Tuple[str, Password], ...] = ()
    read_only_users: Tuple[str, ...] = ()  # of its users, those whose writes are refused
    strip_prefix: bool = False
    rate_limit: Optional[float] = None  # requests a second; None: no limit
    rate_burst: Optional[int] = None  # the token bucket's size; None: one second's worth
    max_client_connections: int = 0  # 0: unlimited

    @property
    def burst(self) -> int:
        """Tokens the bucket holds when full."""
        if self.rate_burst is not None:
            return self.rate_burst
        return max(1, int(math.ceil(self.rate_limit or 0)))


def route_pools(route: RouteSpec) -> List[PoolRoute]:
    """Every pool a route reaches, in the order written (repeats kept)."""
    if isinstance(route, PoolRoute):
        return [route]
    found: List[PoolRoute] = []
    for child in route_children(route):
        found.extend(route_pools(child))
    return found


def route_children(route: RouteSpec) -> List[RouteSpec]:
    """The routes a route holds, in the order written."""
    if isinstance(route, (FailoverRoute, ReplicateRoute)):
        return list(route.routes)
    if isinstance(route, ShadowRoute):
        return [route.route, route.copy_to]
    if isinstance(route, WarmupRoute):
        return [route.route, route.warm]
    if isinstance(route, PrefixRoute):
        children = [entry.route for entry in route.entries]
        return children + ([route.default] if route.default is not None else [])
    return []


def route_kinds(route: RouteSpec) -> List[str]:
    """Each compound route's kind, for checks that depend on the protocol."""
    kinds: List[str] = []
    names = {FailoverRoute: "failover", ReplicateRoute: "replicate", ShadowRoute: "shadow",
             WarmupRoute: "warmup", PrefixRoute: "prefix"}
    if type(route) in names:
        kinds.append(names[type(route)])
    for child in route_children(route):
        kinds.extend(route_kinds(child))
    return kinds


# --------------------------------------------------------------------------
# Reading them


def _mapping(node: ConfigNode, what: str) -> Dict[str, Tuple[ConfigNode, ConfigNode]]:
    """A mapping's entries by key name; duplicate or non-text keys are refused."""
    if node.kind != MAPPING:
        raise Invalid("expected %s, got %s" % (what, describe(node)), node.line)
    entries: Dict[str, Tuple[ConfigNode, ConfigNode]] = {}
    for key_node, value_node in node.value:
        name = key_name(key_node)
        if name is None:
            raise Invalid("keys must be strings, got %s" % (describe(key_node),), key_node.line)
        if name in entries:
            raise Invalid("duplicate key %s" % (quote(name),), key_node.line)
        entries[name] = (key_node, value_node)
    return entries


def _only(entries: Dict[str, Tuple[ConfigNode, ConfigNode]], allowed: Tuple[str, ...], kind: str) -> None:
    for name, (key_node, _) in entries.items():
        if name not in allowed:
            raise Invalid("%s route: unknown key %s (expected one of: %s)"
                          % (kind, quote(name), ", ".join(allowed)), key_node.line)


def _bool(node: ConfigNode, key: str) -> bool:
    try:
        return Boolean().parse(node, None)
    except Invalid as e:
        raise Invalid("%s: %s" % (key, e.message), node.line)


def _number(node: ConfigNode, key: str) -> float:
    try:
        return number_value(node, "a number")
    except Invalid as e:
        raise Invalid("%s: %s" % (key, e.message), node.line)


def _count(node: ConfigNode, key: str, minimum: int) -> int:
    try:
        value = integer_value(node, "an integer >= %d" % (minimum,))
    except Invalid as e:
        raise Invalid("%s: %s" % (key, e.message), node.line)
    if not minimum <= value <= INT_MAX:
        raise Invalid("%s: must be between %d and %d (got %d)" % (key, minimum, INT_MAX, value), node.line)
    return value


def _prefix(node: ConfigNode, key: str) -> bytes:
    text = scalar_text(node)
    if text is None and node.kind == SCALAR and is_int(node.value):
        text = str(node.value)
    if not text:
        raise Invalid("%s: expected a non-empty key prefix, got %s" % (key, describe(node)), node.line)
    return text.encode("utf-8")


def parse_route(node: ConfigNode) -> RouteSpec:
    """One route, as the module's docstring writes it."""
    if node.kind == SCALAR:
        name = key_name(node) if node.value is not None else None
        if name is None and is_int(node.value):
            name = str(node.value)
        if not name:
            raise Invalid("expected a pool name or a route mapping, got %s" % (describe(node),), node.line)
        return PoolRoute(name, node.line)
    if node.kind == SEQUENCE:
        raise Invalid("expected a pool name or a route mapping (a list needs a kind, such as"
                      " {failover: [...]}), got a list", node.line)
    entries = _mapping(node, "a route")
    kinds = [name for name in entries if name in ROUTE_KINDS]
    if len(kinds) != 1:
        found = ", ".join(quote(k) for k in kinds) if kinds else "none"
        raise Invalid("a route mapping names exactly one kind of %s (found %s)"
                      % (", ".join(ROUTE_KINDS), found), node.line)
    kind = kinds[0]
    key_node, value = entries[kind]
    if kind in ("failover", "replicate"):
        _only(entries, (kind,), kind)
        if value.kind != SEQUENCE or len(value.value) < 2:
            raise Invalid("%s route: expected a list of at least two routes, got %s"
                          % (kind, describe(value)), value.line or key_node.line)
        routes = tuple(parse_route(item) for item in value.value)
        return FailoverRoute(routes) if kind == "failover" else ReplicateRoute(routes)
    if kind == "shadow":
        _only(entries, ("shadow", "copy_to", "sample", "queue"), kind)
        if "copy_to" not in entries:
            raise Invalid("shadow route: copy_to (the route that gets the copies) is missing", key_node.line)
        sample, queue = 1.0, DEFAULT_SHADOW_QUEUE
        if "sample" in entries:
            sample = _number(entries["sample"][1], "sample")
            if not 0 < sample <= 1:
                raise Invalid("sample: the fraction of requests copied, above 0 and at most 1 (got %s)"
                              % (describe(entries["sample"][1]),), entries["sample"][1].line)
        if "queue" in entries:
            queue = _count(entries["queue"][1], "queue", 1)
        return ShadowRoute(parse_route(value), parse_route(entries["copy_to"][1]), sample, queue)
    if kind == "warmup":
        _only(entries, ("warmup", "from"), kind)
        if "from" not in entries:
            raise Invalid("warmup route: from (the warm route its misses are read from) is missing",
                          key_node.line)
        return WarmupRoute(parse_route(value), parse_route(entries["from"][1]))
    _only(entries, ("prefix", "default"), kind)
    prefixes = _mapping(value, "a mapping of key prefixes to routes")
    if not prefixes:
        raise Invalid("prefix route: no prefixes", value.line or key_node.line)
    parsed = []
    for text, (prefix_node, target) in prefixes.items():
        prefix = _prefix(prefix_node, "prefix")
        strip = False
        if target.kind == MAPPING and any(key_name(k) == "route" for k, _ in target.value):
            options = _mapping(target, "a route")
            for name, (option_node, _) in options.items():
                if name not in ("route", "strip"):
                    raise Invalid("prefix %s: unknown key %s (expected route, strip)"
                                  % (quote(text), quote(name)), option_node.line)
            if "strip" in options:
                strip = _bool(options["strip"][1], "strip")
            target = options["route"][1]
        parsed.append(PrefixEntry(prefix, parse_route(target), strip))
    parsed.sort(key=lambda entry: -len(entry.prefix))
    default = parse_route(entries["default"][1]) if "default" in entries else None
    return PrefixRoute(tuple(parsed), default)


class RouteValue(ValueType):
    """The C{route:} key of a front pool."""

    name = "pool name | {failover|replicate|shadow|warmup|prefix: ...} (see Routes and tenants)"

    def parse(self, node: ConfigNode, report: Report) -> Any:
        return parse_route(node)


def parse_password(node: ConfigNode, user: str) -> Password:
    text = scalar_text(node)
    if text is None and node.kind == SCALAR and is_int(node.value):
        text = str(node.value)
    if not text:
        raise Invalid("user %s: expected a password (the text, sha256:HEX or pbkdf2:sha256:...), got %s"
                      % (quote(user), describe(node)), node.line)
    try:
        return passwords.parse(text)
    except ValueError as e:
        raise Invalid("user %s: %s" % (quote(user), e), node.line)


def parse_user(node: ConfigNode, user: str) -> Tuple[Password, bool]:
    """A user's entry: C{PASSWORD}, or C{{password: PASSWORD, read_only: BOOL}}; (password, read-only)."""
    if node.kind != MAPPING:
        return parse_password(node, user), False
    entries = _mapping(node, "a user's password and read_only")
    for key, (key_node, _) in entries.items():
        if key not in ("password", "read_only"):
            raise Invalid("user %s: unknown key %s (expected password, read_only)" % (quote(user), quote(key)),
                          key_node.line)
    if "password" not in entries:
        raise Invalid("user %s: password is missing" % (quote(user),), node.line)
    read_only = _bool(entries["read_only"][1], "read_only") if "read_only" in entries else False
    return parse_password(entries["password"][1], user), read_only


def parse_users(node: ConfigNode) -> List[Tuple[str, Tuple[Password, bool]]]:
    """A C{users:} mapping (user name -> its entry) as (name, (L{Password}, read-only)) pairs."""
    users = _mapping(node, "a mapping of user names to passwords")
    if not users:
        raise Invalid("users: no users", node.line)
    return [(user, parse_user(entry, user)) for user, (_, entry) in users.items()]


class UsersValue(ValueType):
    """The C{users:} key of a memcached pool with servers: who may log in to it."""

    name = "mapping of user name -> password (the text, sha256:HEX or pbkdf2:sha256:...)"

    def parse(self, node: ConfigNode, report: Report) -> Any:
        parsed = parse_users(node)
        for user, (_, read_only) in parsed:
            if read_only:
                raise Invalid("user %s: read_only is for Redis users (a memcached pool's users may write)"
                              % (quote(user),), node.line)
        return tuple((user, password) for user, (password, _) in parsed)


_TENANT_KEYS = ("prefix", "default", "users", "strip_prefix", "route", "rate_limit", "rate_burst",
                "max_client_connections")


def parse_tenant(name: str, node: ConfigNode) -> TenantSpec:
    entries = _mapping(node, "a mapping of tenant keys")
    for key, (key_node, _) in entries.items():
        if key not in _TENANT_KEYS:
            raise Invalid("tenant %s: unknown key %s (expected one of: %s)"
                          % (quote(name), quote(key), ", ".join(_TENANT_KEYS)), key_node.line)
    if "route" not in entries:
        raise Invalid("tenant %s: route is missing (where its requests go)" % (quote(name),))
    values: Dict[str, Any] = {"name": name}
    try:
        values["route"] = parse_route(entries["route"][1])
        if "prefix" in entries:
            values["prefix"] = _prefix(entries["prefix"][1], "prefix")
        for key in ("default", "strip_prefix"):
            if key in entries:
                values[key] = _bool(entries[key][1], key)
        if "users" in entries:
            parsed = parse_users(entries["users"][1])
            values["users"] = tuple((user, password) for user, (password, _) in parsed)
            values["read_only_users"] = tuple(user for user, (_, read_only) in parsed if read_only)
        if "rate_limit" in entries:
            rate = _number(entries["rate_limit"][1], "rate_limit")
            if rate <= 0:
                raise Invalid("rate_limit: requests a second, above 0 (got %s)"
                              % (describe(entries["rate_limit"][1]),), entries["rate_limit"][1].line)
            values["rate_limit"] = rate
        if "rate_burst" in entries:
            values["rate_burst"] = _count(entries["rate_burst"][1], "rate_burst", 1)
        if "max_client_connections" in entries:
            values["max_client_connections"] = _count(entries["max_client_connections"][1],
                                                      "max_client_connections", 0)
    except Invalid as e:
        raise Invalid("tenant %s: %s" % (quote(name), e.message), e.line)
    selectors = [key for key in ("prefix", "default", "users") if key in entries and values.get(key)]
    if len(selectors) != 1:
        raise Invalid("tenant %s: needs exactly one of prefix, default: true or users (found %s)"
                      % (quote(name), ", ".join(selectors) or "none"))
    if "rate_burst" in values and "rate_limit" not in values:
        raise Invalid("tenant %s: rate_burst needs rate_limit" % (quote(name),), entries["rate_burst"][0].line)
    if values.get("strip_prefix") and "prefix" not in values:
        raise Invalid("tenant %s: strip_prefix needs a prefix" % (quote(name),), entries["strip_prefix"][0].line)
    if values.get("max_client_connections") and "users" not in values:
        raise Invalid("tenant %s: max_client_connections applies to tenants chosen by users (a connection"
                      " belongs to one tenant only then)" % (quote(name),),
                      entries["max_client_connections"][0].line)
    return TenantSpec(**values)


class TenantsValue(ValueType):
    """The C{tenants:} key of a front pool: tenant name -> tenant."""

    name = "mapping of tenant name -> {prefix | default | users, route, limits} (see Routes and tenants)"

    def parse(self, node: ConfigNode, report: Report) -> Any:
        entries = _mapping(node, "a mapping of tenant names to tenants")
        if not entries:
            raise Invalid("no tenants")
        tenants = []
        for name, (key_node, value) in entries.items():
            try:
                tenants.append(parse_tenant(name, value))
            except Invalid as e:
                report(e.message, e.line or key_node.line)
        _check_tenants(tenants, entries, report)
        return tuple(tenants)


def _check_tenants(tenants: List[TenantSpec], entries: Dict[str, Tuple[ConfigNode, ConfigNode]],
                   report: Report) -> None:
    """What one listener's tenants must agree on among themselves."""
    by_prefix: Dict[bytes, str] = {}
    by_user: Dict[str, str] = {}
    defaults = []
    for tenant in tenants:
        line = entries[tenant.name][0].line
        if tenant.prefix is not None:
            if tenant.prefix in by_prefix:
                report("tenant %s: prefix %s is already tenant %s's"
                       % (quote(tenant.name), quote(tenant.prefix.decode("utf-8", "replace")),
                          quote(by_prefix[tenant.prefix])), line)
            by_prefix.setdefault(tenant.prefix, tenant.name)
        for user, _ in tenant.users:
            if user in by_user:
                report("tenant %s: user %s is already tenant %s's" % (quote(tenant.name), quote(user),
                                                                       quote(by_user[user])), line)
            by_user.setdefault(user, tenant.name)
        if tenant.default:
            defaults.append(tenant.name)
    if len(defaults) > 1:
        report("more than one default tenant (%s)" % (", ".join(quote(d) for d in defaults),), None)
    if by_user and (by_prefix or defaults):
        report("tenants are chosen either by key prefix (and a default) or by AUTH user, not both"
               " on one listener", None)
