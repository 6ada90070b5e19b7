"""
The cluster route: a pool of a slot cluster (Redis Cluster, C{redis_cluster:
true}).  The servers the configuration lists are seed nodes; the nodes and
which of them serves each hash slot come from the cluster's slot map, read
from a node at start, every C{cluster_refresh_interval} milliseconds, and at
once (at most every L{REFRESH_GAP} seconds) when a reply says a slot moved or
a node fails.  What the words on the wire are is the protocol's business
(L{twistedproxy.protocols.interface.ISlotCluster}); this module knows slots,
nodes and redirects.

Placement is the hash route's with slots for a hash ring (the route is a
L{HashRoute} whose C{server_for} reads the slot table): a key goes to the
master of its slot; a multi-key request is split per slot (not per node: a
cluster refuses keys of several slots in one request even when one node
serves them all) and merged in order by the hash route's machinery; a
command routed by one key whose other keys lie in other slots reaches the
node of the first one, which answers C{-CROSSSLOT} as the cluster does.

Every request carries the route's resume hook
(L{twistedproxy.routes.interface}), so the client never sees a redirect:
  - MOVED: the slot's master changed: the table learns it, the request is
    sent there, and the map is read again soon;
  - ASK: the slot is being moved: the ASKING request (internal) and then the
    request go to the named node on one connection; the table stays;
  - a retry (TRYAGAIN, CLUSTERDOWN): the request waits and is resent, after
    as long as it has waited so far (at least L{RETRY_FIRST}, at most
    L{RETRY_MAX} seconds: a doubling backoff that needs no state), as long as
    it stays within the pool's C{timeout} (L{RETRY_BUDGET} seconds without
    one); then the cluster's error reply goes to the client.  One timer per
    route sweeps the waiting requests;
  - a failure (a node down, a timeout): the error stands (the request may
    have been applied) and the map is read again soon, so requests that come
    after the cluster promoted a replica go to the new master.
A request is redirected at most L{MAX_REDIRECTS} times.

Reads (L{ISlotCluster.is_read}) go where C{read_from} says: the master, a
replica of the slot (round-robin), or a replica that is up, else the master.
Every connection of such a pool says READONLY first (a node that is a master
ignores it, and a master demoted by a failover serves reads at once).

Nodes live in the servers layer (connections, reconnect backoff, counters);
the route never ejects one (the cluster decides who serves a slot).
"""

from __future__ import annotations

import dataclasses
from functools import partial

from twisted.logger import Logger
from zope.interface import implementer_only

from twistedproxy.config.model import ServerSpec
from twistedproxy.core.request import REPLY_FINAL, REPLY_REDIRECT, ROUTE_ANY, ROUTE_KEY, ROUTE_SESSION, keys_of
from twistedproxy.routes.copies import decline
from twistedproxy.routes.hash import HashRoute
from twistedproxy.routes.interface import ICountedRoute, IServedRoute
from twistedproxy.routes.sessions import ISessionRoute

log = Logger()

MAX_REDIRECTS = 5
RETRY_FIRST = 0.01  # seconds
RETRY_MAX = 0.2
RETRY_BUDGET = 1.0  # seconds a request may spend retrying when the pool has no timeout
REFRESH_GAP = 0.1  # seconds between two reads of the map asked for by replies or failures
MAP_WAIT = 2.0  # seconds a map read may take before another node is asked (a pool without a timeout)


# Not IKeyPlacingRoute, which HashRoute provides: a front sends it whole requests (see the interface).
@implementer_only(IServedRoute, ICountedRoute, ISessionRoute)
class ClusterRoute(HashRoute):
    """
    Slot placement over the nodes of one cluster.

    @ivar cluster: the protocol's L{ISlotCluster}.
    @ivar masters: slot -> the L{Server} that serves it (a seed until the map is known).
    @ivar replicas: slot -> a tuple of the servers that replicate it.
    @ivar nodes: (host, port) -> L{Server}, every node known (seeds and nodes of the map).
    @ivar roles: label -> (role, slot ranges), the last map's view, for the status outputs.
    """

    def __init__(self, config, codec, reactor, cluster, codecs=None, stats=None):
        self.cluster = cluster
        self.masters = []
        self.replicas = []
        self.roles = {}
        # The servers layer never ejects a node: the cluster decides who serves a slot.
        HashRoute.__init__(self, _unejecting(config), codec, reactor, codecs, stats)
        self.nodes = {(server.spec.host, server.spec.port): server for server in self.servers}
        self.seeds = tuple(self.servers)
        self.read_from = config.read_from
        if config.read_from != "master":
            readonly = cluster.readonly_request
            self.server_set.handshake_extra = (readonly,)
        self._retry_budget = self.server_set.timeout or RETRY_BUDGET
        self._hook = partial(self._resumed, None, 0)
        self._map_node = 0  # which known node to ask for the map next (round-robin)
        self._fallback = False  # the nodes only know the older map request
        self._generation = 0  # of map reads: a late answer to an abandoned one is ignored
        self._fetching = None  # when the map read in flight was sent
        self._fetch_again = False
        self._last_fetch = -REFRESH_GAP
        self._soon = None  # the timer of a read asked for within REFRESH_GAP of the last one
        self._periodic = None
        self._retries = []  # (due, request, codec) of requests waiting to be resent
        self._retry_timer = None
        self.redirects = 0  # MOVED and ASK followed
        self.retries = 0  # TRYAGAIN and CLUSTERDOWN resent
        self.map_reads = 0
        self._seed_all(self.seeds[0])

    # -- placement ---------------------------------------------------------

    def _seed_all(self, server) -> None:
        """Before the map is known, every slot goes to a seed (which redirects what it does not serve)."""
        self.masters = [server] * self.cluster.slots
        self.replicas = [()] * self.cluster.slots

    def rebuild(self) -> None:
        """The hash route's hook: the servers any-key requests go to (the masters)."""
        self.live = list(dict.fromkeys(self.masters)) or list(self.servers)
        self._placement = {}

    def server_for(self, key: bytes):
        return self.masters[self.cluster.slot(key)]

    def _place(self, keys, start: int, stop: int):
        """The hash route's grouping, per slot: the node of each group (one per slot) and its key indices."""
        by_slot = {}
        slot_of = self.cluster.slot
        for i in range(start, stop):
            slot = slot_of(keys[i])
            group = by_slot.get(slot)
            if group is None:
                by_slot[slot] = [i]
            else:
                group.append(i)
        pick = self._reader if self._reading else self.masters.__getitem__
        return [pick(slot) for slot in by_slot], list(by_slot.values())

    _reading = False  # set while a read is placed (placement is synchronous)

    def _reader(self, slot):
        """The node a read of C{slot} goes to, as C{read_from} says."""
        replicas = self.replicas[slot]
        if replicas:
            if self.read_from == "prefer_replica":
                now = self.reactor.seconds()
                replicas = [server for server in replicas if server.available(now)]
            if replicas:
                return replicas[0] if len(replicas) == 1 else self._random.choice(replicas)
        return self.masters[slot]

    def node(self, address):
        """The L{Server} at C{address} (host, port), added to the servers layer if new."""
        server = self.nodes.get(address)
        if server is None:
            host, port = address
            server = self.server_set.add_server(ServerSpec(host=host, port=port))
            self.nodes[address] = server
            log.info("pool {pool}: cluster node {node} found", pool=self.name, node=server.label)
        return server

    # -- dispatch -------------------------------------------------------------

    def dispatch(self, request, codec, now: float, touched: list, dirty: list) -> bool:
        if request.route == ROUTE_SESSION:
            # A transaction's request goes to its pinned connection and is never
            # resent: a redirect inside MULTI must abort it there, not run elsewhere.
            return HashRoute.dispatch(self, request, codec, now, touched, dirty)
        outer = request.resume
        request.resume = self._hook if outer is None else partial(self._resumed, outer, 0)
        if self.read_from == "master" or not self.cluster.is_read(request):
            return HashRoute.dispatch(self, request, codec, now, touched, dirty)
        if request.route == ROUTE_KEY:
            self._send(self._reader(self.cluster.slot(request.key)), request, codec, now, touched, dirty)
            return False
        self._reading = True
        try:
            return HashRoute.dispatch(self, request, codec, now, touched, dirty)
        finally:
            self._reading = False

    def dispatch_slice(self, request, codec, now: float, touched: list, dirty: list) -> bool:
        self._reading = self.read_from != "master" and self.cluster.is_read(request)
        try:
            return HashRoute.dispatch_slice(self, request, codec, now, touched, dirty)
        finally:
            self._reading = False

    def _resumed(self, outer, redirects, request, raw, error, codec, dirty) -> bool:
        """Every request's hook: follow redirects, retry what the cluster cannot answer now, else let it stand."""
        if raw is None:
            self.refresh_soon()  # a node failed or is slow: the cluster may be failing it over
            return decline(outer, request, raw, error, codec, dirty)
        kind = codec.classify_reply(request, raw)
        if kind == REPLY_FINAL:
            return decline(outer, request, raw, error, codec, dirty)
        now = self.reactor.seconds()
        if kind == REPLY_REDIRECT:
            redirect = self.cluster.redirect(raw)
            if redirect is None or redirects >= MAX_REDIRECTS or self.closing:
                return decline(outer, request, raw, error, codec, dirty)
            moved, slot, address = redirect
            server = self.node(address)
            if moved:
                self.masters[slot] = server
                self.refresh_soon()
            self.redirects += 1
            request.resume = partial(self._resumed, outer, redirects + 1)
            touched = []
            if not server.available(now):
                self._send(server, request, codec, now, touched, dirty)  # fails it, as that node last failed
                return True
            connection = server.connection(codec)
            if not moved:
                asking = self.cluster.asking_request()
                asking.resume = _ignore
                connection.enqueue_internal(asking, now, touched)
            connection.enqueue(request, now, touched)
            self.flusher.add(touched)
            return True
        # REPLY_RETRY: resend after as long as it waited so far, within the budget.
        delay = min(max(now - request.received_at, RETRY_FIRST), RETRY_MAX)
        if now + delay > request.received_at + self._retry_budget or self.closing:
            return decline(outer, request, raw, error, codec, dirty)
        # A redirect after a retry (ASK, TRYAGAIN, ASK ... while a slot moves) counts anew: the budget bounds it.
        request.resume = self._hook if outer is None else partial(self._resumed, outer, 0)
        self._retries.append((now + delay, request, codec))
        if self._retry_timer is None:
            self._retry_timer = self.reactor.callLater(delay, self._resend_due)
        return True

    def _resend_due(self) -> None:
        """The retry sweep: resend the requests whose wait is over, then wait for the next one."""
        self._retry_timer = None
        now = self.reactor.seconds()
        waiting = []
        due = []
        for entry in self._retries:
            (due if entry[0] <= now + 1e-4 else waiting).append(entry)
        self._retries = waiting
        touched = []
        dirty = []
        for _, request, codec in due:
            self.retries += 1
            self._resend(request, codec, now, touched, dirty)
        self.flusher.add(touched)
        self.flusher.add_clients(dirty)
        if waiting:
            self._retry_timer = self.reactor.callLater(max(min(entry[0] for entry in waiting) - now, 0.0),
                                                       self._resend_due)

    def _resend(self, request, codec, now, touched, dirty) -> None:
        """Send C{request} (or a part of a split one) again, placed by the table as it is now."""
        if request.route == ROUTE_ANY:
            server = self._random.choice(self.live)
        else:
            keys = keys_of(request)
            slot = self.cluster.slot(keys[0])
            read = self.read_from != "master" and self.cluster.is_read(request)
            server = self._reader(slot) if read else self.masters[slot]
        self._send(server, request, codec, now, touched, dirty)

    # -- sessions (transactions): one slot is the group all their keys share ----

    def session_group(self, key):
        """C{(slot, its master)} for C{key}; C{(None, any master)} for None."""
        if key is None:
            return None, (self._random.choice(self.live) if self.live else None)
        slot = self.cluster.slot(key)
        return slot, self.masters[slot]

    def session_conflict(self, request, codec) -> bytes:
        return self.cluster.cross_slot_reply(request)

    # -- the slot map -----------------------------------------------------------

    def refresh_soon(self) -> None:
        """Read the map now, or L{REFRESH_GAP} after the last read (one timer at most)."""
        if self._soon is not None or self.closing:
            return
        wait = self._last_fetch + REFRESH_GAP - self.reactor.seconds()
        if wait <= 0:
            self.refresh()
        else:
            self._soon = self.reactor.callLater(wait, self._refresh_later)

    def _refresh_later(self) -> None:
        self._soon = None
        self.refresh()

    def refresh(self) -> None:
        """Ask a node for the slot map (unless a read is in flight: then once it is in)."""
        if self.closing:
            return
        now = self.reactor.seconds()
        if self._fetching is not None and now - self._fetching < MAP_WAIT:
            self._fetch_again = True
            return
        self._generation += 1
        server = self._map_source(now)
        request = self.cluster.map_request(self._fallback)
        request.resume = partial(self._map_answered, self._generation, server)
        self._fetching = self._last_fetch = now
        self._fetch_again = False
        self.map_reads += 1
        touched = []
        server.connection(self.codec).enqueue_internal(request, now, touched)
        self.flusher.add(touched)

    def _map_source(self, now):
        """The next node to ask for the map: the known ones in turn (masters first), one that is up if any."""
        candidates = list(dict.fromkeys(self.live + list(self.servers)))
        for _ in range(len(candidates)):
            self._map_node += 1
            server = candidates[self._map_node % len(candidates)]
            if server.available(now):
                return server
        return candidates[self._map_node % len(candidates)]

    def _map_answered(self, generation, server, request, raw, error, codec, dirty) -> bool:
        if generation != self._generation:
            return True  # abandoned (it took too long): a newer read is on its way
        self._fetching = None
        ranges = None
        if raw is not None:
            if not self._fallback and self.cluster.map_unsupported(raw):
                self._fallback = True  # an older server: its map, the older way
                self.refresh()
                return True
            ranges = self.cluster.parse_map(raw, server.spec.host)
        if ranges:
            self._apply(ranges)
        else:
            log.warn("pool {pool}: cannot read the cluster's slot map from {node}: {error}", pool=self.name,
                     node=server.label, error=error or raw[:200].decode("utf-8", "replace").strip())
            self._fetch_again = True  # from the next node
        if self._fetch_again:
            self.refresh_soon()
        return True

    def _apply(self, ranges) -> None:
        """Take a slot map: C{(first, last, master address, replica addresses)} per range."""
        slots = self.cluster.slots
        fallback = self.node(ranges[0][2])
        masters = [fallback] * slots  # a slot nobody serves: a node answers what the cluster says of it
        replicas = [()] * slots
        roles = {}
        for first, last, master_address, replica_addresses in ranges:
            master = self.node(master_address)
            reading = tuple(self.node(address) for address in replica_addresses)
            count = last - first + 1
            masters[first : last + 1] = [master] * count
            replicas[first : last + 1] = [reading] * count
            roles.setdefault(master.label, ["master", []])[1].append((first, last))
            for replica in reading:
                roles.setdefault(replica.label, ["replica", []])
        if masters != self.masters:
            log.info("pool {pool}: cluster slot map changed ({count} ranges)", pool=self.name, count=len(ranges))
        for server in self.servers:
            if server.label in self.roles and server.label not in roles:
                # Left the cluster (or its map): what is in flight is answered, then its connections close.
                for connections in server.connections.values():
                    for connection in connections:
                        connection.close_when_idle()
        self.masters = masters
        self.replicas = replicas
        self.roles = {label: (role, slot_ranges(spans)) for label, (role, spans) in roles.items()}
        self.rebuild()

    def node_role(self, server):
        """C{(role, slot ranges)} of a node in the last map: ("master", "0-5460"), ("replica", ""), or ("unknown", "")."""
        return self.roles.get(server.label, ("unknown", ""))

    def _tick(self) -> None:
        self._periodic = self.reactor.callLater(self.config.cluster_refresh_interval / 1000.0, self._tick)
        self.refresh()

    # -- life cycle -----------------------------------------------------------

    def use_config(self, config) -> None:
        HashRoute.use_config(self, _unejecting(config))
        self._retry_budget = self.server_set.timeout or RETRY_BUDGET

    def start(self) -> None:
        HashRoute.start(self)
        if self._periodic is None and not self.closing:
            self._tick()

    def _cancel_timers(self) -> None:
        for timer in (self._periodic, self._soon, self._retry_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._periodic = self._soon = self._retry_timer = None

    def _drop_retries(self) -> None:
        """Requests waiting for a retry get the failure they would have met (the pool closes)."""
        retries, self._retries = self._retries, []
        dirty = []
        for _, request, codec in retries:
            request.resume = None
            self._send(None, request, codec, self.reactor.seconds(), [], dirty)
        self.flusher.add_clients(dirty)

    def retire(self) -> None:
        self._cancel_timers()
        HashRoute.retire(self)
        self._drop_retries()

    def stop(self) -> None:
        self._cancel_timers()
        HashRoute.stop(self)
        self._drop_retries()

    def counters(self) -> dict:
        return {"cluster_redirects": self.redirects, "cluster_retries": self.retries,
                "cluster_map_reads": self.map_reads}

    route_counters = counters  # what the stats outputs read of a pool with counters of its own


def _ignore(request, raw, error, codec, dirty) -> bool:
    """The hook of an ASKING request: its reply matters to no one (the request after it says what happened)."""
    return True


def _unejecting(config):
    return dataclasses.replace(config, auto_eject_hosts=False) if config.auto_eject_hosts else config


def slot_ranges(spans) -> str:
    """Slot ranges C{(first, last)} as Redis writes them: C{"0-5460 10923"}, in slot order."""
    return " ".join(str(first) if first == last else "%d-%d" % (first, last) for first, last in sorted(spans))
