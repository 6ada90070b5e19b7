"""
A front: one listener whose requests go to other pools, chosen per key by
prefix (C{route:} with prefix routes, or C{tenants:} by prefix and default)
or, on Redis, per connection by the AUTH user (C{tenants:} with C{users:}).

The client connection is tied to a L{FrontRoute} as it would be to a pool;
for each request the front resolves the key(s) through its prefix tree
(L{twistedproxy.routes.prefix}) to a pool, strips the prefix the pool must
not see (the codec rewrites the frame and, on the way back, puts it into
replies that carry keys: L{twistedproxy.core.request.Request.prefix}),
charges the tenant's token bucket and hands the request to the pool's route.

  - A multi-key request whose keys all land in one pool with one stripped
    prefix goes to that pool whole (split per server there, and sent in
    slices if very large).  Keys in several pools (or under several stripped
    prefixes) are placed here, on each pool's servers, and the request is
    split into fragments across them (C{codec.split} with a strip per
    group) in one go; the fragments merge in key order as any split
    request's do.  A group bound for a route of another kind (failover,
    replicate ...: built by C{build_route}; a cluster or migrating pool)
    becomes fragments that are
    multi-key requests of their own, which that route places and splits
    again.
  - No prefix matches and no default: the request gets an error reply in the
    protocol's form and the connection stays open (a user's tenant: Redis 7's
    C{-NOPERM}).
  - Rate limits are token buckets refilled lazily from the reactor's clock
    when a request arrives: no timer, no per-request allocation.  A request
    that finds the bucket empty is answered with an error, never dropped.
    A request over several tenants takes a token from each and counts (in
    the stats) for the tenant of its first key.
  - Limits are per process: with N workers each enforces 1/N of the rate,
    the burst and the connections (rounded up).
"""

from __future__ import annotations

import math

from zope.interface import implementer

from twistedproxy.config.passwords import Checker
from twistedproxy.core.batching import TurnFlusher
from twistedproxy.core.completion import refuse
from twistedproxy.core.request import ROUTE_KEY, ROUTE_KEYS, Request
from twistedproxy.routes.build import compound_routes
from twistedproxy.routes.hash import SLICE_KEYS
from twistedproxy.routes.interface import IKeyPlacingRoute, IServedRoute
from twistedproxy.routes.logins import LoginRoute
from twistedproxy.routes.prefix import Branch, Node, compile_route, keyless, prefix_node, resolve

# What a login (AUTH user password) comes to (L{UserDirectory.login}).
LOGIN_OK = "ok"
LOGIN_WRONGPASS = "wrongpass"
LOGIN_FULL = "full"  # the user's tenant has max_client_connections connections already


class TokenBucket:
    """
    C{rate} tokens a second, at most C{burst} saved up; refilled lazily by
    L{take} from the time it is given (the reactor's clock, read once per
    batch by the caller).
    """

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float):
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, now: float) -> bool:
        """Take one token; False when the bucket is empty."""
        tokens = self.tokens + (now - self.stamp) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        self.stamp = now
        if tokens < 1.0:
            self.tokens = tokens
            return False
        self.tokens = tokens - 1.0
        return True


class Tenant:
    """One tenant of a front at run time: its routes, its bucket, its recorder."""

    __slots__ = ("name", "spec", "node", "bucket", "stats", "max_connections", "limited_reply_text")

    def __init__(self, spec, node, stats, now: float, workers: int = 1):
        self.name = spec.name
        self.spec = spec
        self.node = node  # the tenant's own route, compiled
        self.stats = stats
        self.bucket = None
        if spec.rate_limit is not None:
            self.bucket = TokenBucket(spec.rate_limit / workers, max(1.0, math.ceil(spec.burst / workers)), now)
        self.max_connections = -(-spec.max_client_connections // workers) if spec.max_client_connections else 0
        self.limited_reply_text = "tenant '%s' rate limit exceeded" % (spec.name,)


class UserDirectory:
    """
    The AUTH users of a front whose tenants are chosen by user.  A Redis request
    parser given one (its C{users}) answers AUTH through L{login} and keeps
    the connection's user, tenant and whether the user is read-only in its
    C{user}, C{tenant} and C{read_only}.
    """

    def __init__(self, tenants):
        self.users = {}  # user name (bytes) -> (Password, Tenant)
        self.read_only = set()  # user names (bytes) whose writes are refused
        self.by_name = {}
        self.checker = Checker()  # remembers slow passwords that passed
        for tenant in tenants:
            self.by_name[tenant.name] = tenant
            for user, password in tenant.spec.users:
                self.users[user.encode("utf-8")] = (password, tenant)
            self.read_only.update(user.encode("utf-8") for user in tenant.spec.read_only_users)

    @classmethod
    def of_pool(cls, users) -> "UserDirectory":
        """
        The users of a pool with servers whose clients must log in (memcached
        C{users:}): name -> password, no tenants (a connection's C{tenant} stays None).
        """
        directory = cls(())
        for user, password in users:
            directory.users[user.encode("utf-8")] = (password, None)
        return directory

    def login(self, parser, user: bytes, password: bytes):
        """
        Check C{user}'s C{password}; on success the connection of C{parser}
        belongs to the user's tenant from now on.  Returns L{LOGIN_OK},
        L{LOGIN_WRONGPASS} (the connection stays as it was, as in Redis) or
        L{LOGIN_FULL} and the tenant's name.
        """
        entry = self.users.get(user)
        if entry is None or not self.checker.check(user, entry[0], password):
            return LOGIN_WRONGPASS, None
        tenant = entry[1]
        current = parser.tenant
        if tenant is None:  # a pool's user (of_pool)
            parser.user = user
            return LOGIN_OK, None
        if current is not tenant:
            if tenant.max_connections and tenant.stats.connections >= tenant.max_connections:
                return LOGIN_FULL, tenant.name
            if current is not None:
                current.stats.connections -= 1
            tenant.stats.connections += 1
            parser.tenant = tenant
        parser.user = user
        parser.read_only = user in self.read_only
        return LOGIN_OK, tenant.name

    def resume(self, parser, user: bytes) -> bool:
        """A connection another worker logged in as C{user} (a hand-off): its tenant here; False if gone."""
        entry = self.users.get(user)
        if entry is None:
            return False
        tenant = entry[1]
        if tenant is not None:
            tenant.stats.connections += 1
        parser.tenant = tenant
        parser.user = user
        parser.read_only = user in self.read_only
        return True

    def adopt(self, parser) -> None:
        """A connection that logged in under an older front (a reload): its tenant here, by user."""
        old = parser.tenant
        if old is None:
            if parser.user is not None and parser.user not in self.users:
                parser.user = None  # a pool's user that is gone: log the connection out
            return
        entry = self.users.get(parser.user or b"")
        tenant = entry[1] if entry is not None and entry[1].name == old.name else None
        parser.tenant = tenant
        if tenant is None:  # the user or its tenant is gone: log the connection out
            old.stats.connections -= 1
            parser.user = None
            parser.read_only = False
            return
        if tenant.stats is not old.stats:
            old.stats.connections -= 1
            tenant.stats.connections += 1
        parser.read_only = parser.user in self.read_only  # the reload may have changed it

    def logout(self, parser) -> None:
        """The connection closed."""
        tenant = parser.tenant
        if tenant is not None:
            tenant.stats.connections -= 1
            parser.tenant = None


@implementer(IServedRoute)
class FrontRoute(LoginRoute):
    """
    The route a front pool's listener serves (what a client connection is tied
    to): requests resolved by key prefix, or by the connection's user, to other
    pools' routes.

    @ivar tenants: tenant name -> L{Tenant}.
    @ivar users: the L{UserDirectory} when tenants are chosen by user, else None.
    """

    def __init__(self, config, codec, reactor, pools: dict, stats, workers: int = 1, build_route=None):
        self.config = config
        self.name = config.name
        self.codec = codec
        self.reactor = reactor
        self.stats = stats
        self.clients = set()
        self.servers = []  # a front has no servers of its own
        self.flusher = TurnFlusher(reactor)
        self.health = None  # a worker hands every pool its ejection arbiter; a front has no servers
        self._slicing = {}  # request -> the pool sending it in slices
        now = reactor.seconds()
        self.compound = []  # the failover, replicate ... routes built for it: their counters are its

        build = self._recorded(build_route) if build_route is not None else None
        self.tenants = {}
        self.users = None
        if config.tenants:
            for spec in config.tenants:
                self.tenants[spec.name] = Tenant(spec, compile_route(spec.route, pools, build),
                                                 stats.tenant(spec.name),
                                                 now, workers)
            if any(spec.users for spec in config.tenants):
                self.users = UserDirectory(self.tenants.values())
                self.root = None
            else:
                self.root = _tenant_node(self.tenants.values())
        else:
            self.root = compile_route(config.route, pools, build)

    def _recorded(self, build_route):
        """C{build_route}, keeping the compound routes it builds in L{compound}."""
        def build(spec, pools):
            route = build_route(spec, pools, self.name)  # the front's name in its routes' log lines
            self.compound.extend(compound_routes(route))
            return route
        return build

    def route_counters(self) -> dict:
        """The counters of its compound routes (failovers, shadow copies ...), summed per name."""
        totals = {}
        for route in self.compound:
            for name, value in route.counters().items():
                totals[name] = totals.get(name, 0) + value
        return totals

    # -- dispatch ---------------------------------------------------------------

    def dispatch(self, request, codec, now: float, touched: list, dirty: list) -> bool:
        """
        Send C{request} to the pool its key(s) resolve to (see the module's
        docstring); True when that pool sends it in slices (L{dispatch_slice}).
        """
        if self.users is not None:
            client = request.client
            tenant = getattr(client.parser, "tenant", None) if client is not None else None
            if tenant is None:  # logged out meanwhile (a reload removed the user)
                refuse(request, codec.denied_reply(request), "no user", dirty)
                return False
            node = tenant.node
        else:
            tenant = None
            node = self.root
        route = request.route
        if route == ROUTE_KEYS:
            return self._dispatch_keys(request, node, tenant, codec, now, touched, dirty)
        if route == ROUTE_KEY:
            pool, cut, found = resolve(node, request.key)
        else:  # broadcast or any-server commands: the default route's pool
            pool, found = keyless(node)
            cut = 0
        if found is not None:
            tenant = found
        if pool is None:
            self._unrouted(request, codec, tenant, dirty)
            return False
        if tenant is not None:
            if tenant.bucket is not None and not tenant.bucket.take(now):
                self._limited(request, codec, tenant, dirty)
                return False
            request.tenant = tenant.stats
        if cut:
            prefix = request.key[:cut]
            codec.strip_keys(request, prefix)
            request.prefix = prefix
        return pool.dispatch(request, codec, now, touched, dirty)

    def _dispatch_keys(self, request, node, tenant, codec, now, touched, dirty) -> bool:
        keys = request.keys
        placed = []  # ((pool, stripped prefix or None), key index)
        tenants = []
        first = None
        for index, key in enumerate(keys):
            pool, cut, found = resolve(node, key)
            if found is None:
                found = tenant
            if index == 0:
                first = found
            if pool is None:
                self._unrouted(request, codec, found, dirty)
                return False
            if found is not None and found not in tenants:
                tenants.append(found)
            placed.append(((pool, key[:cut] if cut else None), index))
        for each in tenants:
            if each.bucket is not None and not each.bucket.take(now):
                self._limited(request, codec, each, dirty)
                return False
        if first is not None:
            request.tenant = first.stats
        targets = _grouped(placed)
        if len(targets) == 1:
            (pool, prefix), _ = targets[0]
            if prefix is not None:
                codec.strip_keys(request, prefix)
                request.prefix = prefix
            if pool.dispatch(request, codec, now, touched, dirty):
                self._slicing[request] = pool
                return True
            return False
        self._split(request, targets, codec, now, touched, dirty)
        return False

    def _split(self, request, targets, codec, now, touched, dirty) -> None:
        """
        One fragment per server of each (pool, prefix) group whose route places
        keys on servers of its own (L{IKeyPlacingRoute}: a hash pool; its keys
        placed here); for a group whose route is of another kind (failover,
        replicate ..., a Redis Cluster or a migrating pool), fragments that are multi-key requests
        of their own, of at most C{SLICE_KEYS} keys each (that route splits
        them again, and may resend them), merged into the reply like the others.
        """
        keys = request.keys
        groups = []
        strips = []
        sends = []  # (pool, server or None for a part the pool dispatches itself, prefix)
        for (pool, prefix), indices in targets:
            cut = len(prefix) if prefix is not None else 0
            if IKeyPlacingRoute.providedBy(pool):
                for server, group in _grouped([(pool.server_for(keys[index][cut:]), index) for index in indices]):
                    groups.append(group)
                    strips.append(cut)
                    sends.append((pool, server, prefix))
            else:
                for start in range(0, len(indices), SLICE_KEYS):
                    groups.append(indices[start:start + SLICE_KEYS])
                    strips.append(cut)
                    sends.append((pool, None, prefix))
        frames = codec.split(request, groups, strips)
        fragments = []
        for frame, group, cut, (pool, server, prefix) in zip(frames, groups, strips, sends):
            if server is None:
                fragment = _part(request, frame, group, cut, codec)
            else:
                fragment = pool._fragment(request, frame, group)  # as the pool makes its own (resume hook too)
            fragment.prefix = prefix
            fragments.append(fragment)
        request.fragments = fragments
        request.pending = len(fragments)
        request.sent_at = now
        self.stats.fragments += len(fragments)
        for (pool, server, _), fragment in zip(sends, fragments):
            if server is None:
                pool.dispatch(fragment, codec, now, touched, dirty)  # at most SLICE_KEYS keys: never sliced
            else:
                pool.server_set.send(server, fragment, codec, now, touched, dirty)

    def dispatch_slice(self, request, codec, now: float, touched: list, dirty: list) -> bool:
        pool = self._slicing.get(request)
        if pool is None:
            return True
        done = pool.dispatch_slice(request, codec, now, touched, dirty)
        if done:
            del self._slicing[request]
        return done

    def _unrouted(self, request, codec, tenant, dirty) -> None:
        if tenant is not None:
            request.tenant = tenant.stats
        if self.users is not None:
            refuse(request, codec.denied_reply(request), "key outside the user's routes", dirty)
        else:
            refuse(request, codec.error_reply(request, "no route for this key"), "no route for the key", dirty)

    @staticmethod
    def _limited(request, codec, tenant, dirty) -> None:
        request.tenant = tenant.stats
        tenant.stats.rate_limited += 1
        refuse(request, codec.error_reply(request, tenant.limited_reply_text), tenant.limited_reply_text, dirty)

    # -- clients and life cycle ----------------------------------------------

    # request_parser and adopt (a reload): LoginRoute's, with the users when tenants are chosen by user

    def client_gone(self, client) -> None:
        self.clients.discard(client)
        if self.users is not None:
            self.users.logout(client.parser)
        if self._slicing:  # a request it was sending in slices stops with it
            for request in [r for r in self._slicing if r.client is None or r.client is client]:
                del self._slicing[request]

    def use_config(self, config) -> None:
        """Take run-time tuning (C{client_max_pending} ...) as a pool does; routes are rebuilt on reload."""
        self.config = config
        for client in self.clients:
            client.max_pending = config.client_max_pending

    def start(self) -> None:
        pass  # the pools it routes to are started by the proxy

    def retire(self) -> None:
        pass  # nothing of its own in flight: requests belong to the pools' connections

    def stop(self) -> None:
        pass


def _part(request, frame, indices, cut: int, codec) -> Request:
    """
    A fragment of C{request} carrying the keys at C{indices} (without their
    first C{cut} bytes) as a multi-key request of its own, for a route that
    places and splits it itself; its merged reply is its part of the whole.
    """
    keys = request.keys
    part = Request(frame, request.command, route=ROUTE_KEYS, keys=[keys[i][cut:] for i in indices],
                   data=codec.part_data(request, [keys[i] for i in indices]))
    part.parent = request
    part.key_indices = indices
    part.received_at = request.received_at
    part.resume = request.resume
    part.internal = request.internal
    return part


def _grouped(pairs) -> list:
    """C{(target, index)} pairs as C{(target, [indices])}, targets in first-seen order."""
    groups = {}
    for target, index in pairs:
        group = groups.get(target)
        if group is None:
            group = groups[target] = []
        group.append(index)
    return list(groups.items())


def _tenant_node(tenants) -> Node:
    """The prefix node that picks a tenant by key prefix (and the default tenant)."""
    branches = []
    default = None
    for tenant in tenants:
        spec = tenant.spec
        if spec.prefix is not None:
            branches.append((spec.prefix, Branch(tenant.node, len(spec.prefix) if spec.strip_prefix else 0, tenant)))
        elif spec.default:
            default = Branch(tenant.node, 0, tenant)
    return prefix_node(branches, default)
