"""
The migrating route: a hash pool while its keys move from one server list to
another (online migration, L{twistedproxy.config.migration}).

Two placements, over the full lists (ejection does not change them while a
plan is in force: a dead server gets error replies, and the migration pauses
on it): a key's source owner (the plan's C{source} list, as the pool placed it
before) and its target owner (C{target}, as it will).  A key whose two owners
differ is moving; a backend is its address, so a server re-weighted or renamed
keeps the keys both placements give it.  Requests go by the target placement
(it is a L{HashRoute} over the target list, with the removed servers in its
servers layer too), except:

  - hold phase: a request on a moving key waits here, in order (no timer per
    request), until the phase becomes C{move}; every other request is served
    at once.  Once every worker holds, no process routes by the source
    placement alone, so no write can land on a source owner unseen;
  - move phase: before a request on a moving key runs on its target owner, the
    key is moved there (migrate on access) by the protocol's move
    (L{twistedproxy.protocols.interface.IKeyMigration}, run by
    L{twistedproxy.core.moves.run_move}), unless this worker knows it moved it
    already (a bounded set of keys: forgetting one only costs a move that finds
    nothing).  A multi-key request moves its moving keys first, in batches per
    source and target, then is split by the target placement as usual.  A move
    that fails fails the requests that waited for it, with its error;
  - broadcasts (FLUSHALL, DBSIZE, flush_all ...) go to every server of either
    list; requests for any server go to a target server.

Order: requests that wait are kept in a queue per key (and, for a client's
transaction, per client: its session requests keep their order whatever their
keys), and a request runs once it heads the queue of every key it has and
those keys have moved.  So a client's pipelined requests on one key run in
the order it sent them, and a request on a key that waits behind a multi-key
request does not overtake it.  A queue exists only while something waits:
requests on other keys pay two placements and a dict lookup.

Counters (L{counters}): C{migrate_on_access}, keys this route moved for its
requests; C{migrate_held}, requests that waited in the hold phase.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import replace
from functools import partial

from zope.interface import implementer_only

from twistedproxy.config.migration import HOLD, MOVE
from twistedproxy.core.completion import CLOSED, fail
from twistedproxy.core.moves import run_move
from twistedproxy.core.request import ROUTE_ALL, ROUTE_KEY, ROUTE_KEYS, ROUTE_SESSION
from twistedproxy.routes.hash import HashRoute
from twistedproxy.routes.interface import ICountedRoute, IServedRoute
from twistedproxy.routes.sessions import ISessionRoute

# Keys this worker knows it moved (per route).  When full, the newest entry
# makes room; a key forgotten costs one move that finds nothing to move.
MOVED_KEYS = 1 << 16

# Keys of one move request (Redis: one MIGRATE); more are moved in several.
MOVE_BATCH = 100

# The state of a key's queue.
_HELD = 0  # moving, the hold phase is in force: waits for the move phase
_MOVING = 1  # its move is under way
_READY = 2  # nothing to move (any more): its waiters run in order
_FAILED = 3  # its move failed: its waiters get the error


class _Queue:
    """What waits on one key (or one client's session): the waiters, in order, and the key's state."""

    __slots__ = ("state", "error", "waiters")

    def __init__(self, state):
        self.state = state
        self.error = None
        self.waiters = deque()


class _Waiter:
    """A request that waits, with the codec it was framed with and the queues it is in."""

    __slots__ = ("request", "codec", "keys", "number")

    def __init__(self, request, codec, number):
        self.request = request
        self.codec = codec
        self.keys = []
        self.number = number  # its place among the route's waiters, oldest first


class _Placement:
    """The source placement: the pool's hash over another server list (the target's is the route's own)."""

    server_for = HashRoute.server_for

    def __init__(self, route, specs, servers):
        self.live = servers
        self._index = route._distribution(specs)
        self._placement = {}
        self._hash = route._hash
        self._hash_tag = route._hash_tag
        self._cache_placement = route._cache_placement


# Not IKeyPlacingRoute, which HashRoute provides: a front sends it whole requests (see the interface).
@implementer_only(IServedRoute, ICountedRoute, ISessionRoute)
class MigratingRoute(HashRoute):
    """
    A hash pool under a L{twistedproxy.config.migration.MigrationPlan}.

    @ivar plan: the plan in force (its phase: L{set_phase}).
    @ivar pool_config: the pool's configuration (its file's servers); the
        route's own C{config} has the plan's servers instead.
    @ivar migration: the protocol's L{IKeyMigration}.
    @ivar source: the source placement (C{server_for(key)}).
    """

    def __init__(self, config, codec, reactor, plan, migration, codecs=None, stats=None):
        self.plan = plan
        self.pool_config = config
        self.migration = migration
        self.moved = {}  # keys moved by this route (a bounded set)
        self.queues = {}  # key, or a client (its session requests), -> _Queue
        self.on_access = 0
        self.held = 0
        self._passing = None  # the request being released (see dispatch)
        self._numbers = itertools.count()
        HashRoute.__init__(self, replace(config, servers=plan.servers), codec, reactor, codecs, stats)

    # -- placement ------------------------------------------------------------

    def rebuild(self) -> None:
        """Both placements over the plan's full lists (ejection does not change them)."""
        self._placement = {}
        by_address = {server.spec.address: server for server in self.servers}
        plan = self.plan
        self.live = [by_address[spec.address] for spec in plan.target]
        self._index = self._distribution(plan.target)
        self.source = _Placement(self, plan.source, [by_address[spec.address] for spec in plan.source])

    def moving(self, key: bytes) -> bool:
        """Whether C{key} has another owner in the source placement than in the target's."""
        return self.source.server_for(key) is not self.server_for(key)

    # -- dispatch ----------------------------------------------------------------

    def dispatch(self, request, codec, now: float, touched: list, dirty: list) -> bool:
        if request is self._passing:  # released, and handed back by the sessions (a command between WATCH and MULTI)
            return self._send_now(request, codec, now, touched, dirty)
        route = request.route
        if route == ROUTE_KEY:
            key = request.key
            if not (self.queues and key in self.queues) and (
                key in self.moved or self.source.server_for(key) is self.server_for(key)
            ):
                return HashRoute.dispatch(self, request, codec, now, touched, dirty)
            return self._wait(request, codec, (key,), dirty)
        if route == ROUTE_KEYS or route == ROUTE_SESSION:
            keys = request.keys if request.keys is not None else (() if request.key is None else (request.key,))
            if route == ROUTE_SESSION and request.client is not None:
                keys = tuple(keys) + (request.client,)  # a client's session requests keep their order
            if self._must_wait(keys):
                return self._wait(request, codec, keys, dirty)
            return HashRoute.dispatch(self, request, codec, now, touched, dirty)
        if route == ROUTE_ALL:
            self._broadcast(request, self.servers, codec, now, touched, dirty)
            return False
        return HashRoute.dispatch(self, request, codec, now, touched, dirty)  # ROUTE_ANY: a target server

    def _must_wait(self, keys) -> bool:
        queues = self.queues
        moved = self.moved
        for key in keys:
            if queues and key in queues:
                return True
            if type(key) is bytes and key not in moved and self.moving(key):
                return True
        return False

    def _wait(self, request, codec, keys, dirty) -> bool:
        """Queue C{request} behind each of its C{keys}; start the moves it needs (move phase)."""
        waiter = _Waiter(request, codec, next(self._numbers))
        queues = self.queues
        holding = self.plan.phase == HOLD
        groups = {}  # (source, target) -> keys to move
        if len(keys) > 1:
            keys = dict.fromkeys(keys)  # a key named twice waits once
        for key in keys:
            queue = queues.get(key)
            if queue is None:
                queue = _Queue(_READY)
                if type(key) is bytes and key not in self.moved:
                    source, target = self.source.server_for(key), self.server_for(key)
                    if source is not target:
                        queue.state = _HELD if holding else _MOVING
                        if not holding:
                            groups.setdefault((source, target), []).append(key)
                queues[key] = queue
            queue.waiters.append(waiter)
            waiter.keys.append(key)
        if holding:
            self.held += 1
        self._start_moves(groups, dirty)
        self._advance(waiter.keys, dirty)
        return False

    def _start_moves(self, groups: dict, dirty) -> None:
        migration = self.migration
        for (source, target), keys in groups.items():
            for start in range(0, len(keys), MOVE_BATCH):
                batch = keys[start : start + MOVE_BATCH]
                steps = migration.move(batch, source.spec, target.spec, self.config)
                run_move(steps, source, target, migration.codec, self.reactor, self.flusher,
                         partial(self._moved, batch), dirty)

    def _moved(self, keys, result, dirty) -> None:
        """A move of C{keys} ended with C{result}: their waiters go on (or fail) in order."""
        self.on_access += result.moved
        queues = self.queues
        failed = result.failed > 0
        for key in keys:
            queue = queues.get(key)
            if queue is None or queue.state != _MOVING:
                continue  # handed over (L{handover}) meanwhile
            if failed:
                queue.state = _FAILED
                queue.error = result.error or CLOSED
            else:
                queue.state = _READY
                self._remember(key)
        self._advance(keys, dirty)

    def _remember(self, key) -> None:
        moved = self.moved
        if len(moved) >= MOVED_KEYS:
            moved.popitem()
        moved[key] = None

    def _advance(self, keys, dirty) -> None:
        """Run (or fail) every waiter that now heads the queues of all its keys, theirs moved; drop empty queues."""
        queues = self.queues
        work = deque(keys)  # in order: waiters on different keys still leave oldest first
        touched = []
        now = self.reactor.seconds()
        while work:
            key = work.popleft()
            queue = queues.get(key)
            if queue is None:
                continue
            while queue.waiters:
                waiter = queue.waiters[0]
                if not self._ready(waiter):
                    break
                for other in waiter.keys:
                    queues[other].waiters.popleft()
                    if other is not key:
                        work.append(other)
                self._release(waiter, now, touched, dirty)
            if not queue.waiters and queue.state >= _READY and queues.get(key) is queue:
                del queues[key]
        self.flusher.add(touched)

    def _ready(self, waiter) -> bool:
        queues = self.queues
        for key in waiter.keys:
            queue = queues[key]
            if queue.state < _READY or queue.waiters[0] is not waiter:
                return False
        return True

    def _release(self, waiter, now, touched, dirty) -> None:
        request = waiter.request
        for key in waiter.keys:
            queue = self.queues[key]
            if queue.state == _FAILED:
                fail(request, queue.error, "migration of pool %s" % (self.name,), waiter.codec, dirty)
                return
        self._passing = request
        try:
            self._send_now(request, waiter.codec, now, touched, dirty)
        finally:
            self._passing = None

    def _send_now(self, request, codec, now, touched, dirty) -> bool:
        """Send a request that waited by the target placement (all at once: no slices)."""
        if request.route == ROUTE_KEYS:
            self._dispatch_keys(request, codec, now, touched, dirty)
            return False
        return HashRoute.dispatch(self, request, codec, now, touched, dirty)

    # -- phases -------------------------------------------------------------------

    def set_phase(self, phase: str) -> None:
        """Switch to C{phase} (L{HOLD} or L{MOVE}); into the move phase, the held requests' keys start moving."""
        self.plan = replace(self.plan, phase=phase)
        if phase != MOVE:
            return
        groups = {}
        for key, queue in self.queues.items():
            if queue.state == _HELD:
                queue.state = _MOVING
                groups.setdefault((self.source.server_for(key), self.server_for(key)), []).append(key)
        dirty = []
        self._start_moves(groups, dirty)
        self.flusher.add_clients(dirty)

    def waiting(self) -> list:
        """The C{(request, codec)} pairs waiting here, oldest first."""
        seen = set()
        out = []
        for queue in self.queues.values():
            for waiter in queue.waiters:
                if id(waiter) not in seen:
                    seen.add(id(waiter))
                    out.append(waiter)
        out.sort(key=lambda waiter: waiter.number)
        return [(waiter.request, waiter.codec) for waiter in out]

    def handover(self, route) -> None:
        """
        Hand every request that waits here to C{route} (the pool's next route,
        after a new plan or the end of the migration), oldest first; moves
        still under way here end unseen.
        """
        waiting = self.waiting()
        self.queues = {}
        touched = []
        dirty = []
        now = self.reactor.seconds()
        for request, codec in waiting:
            if route.dispatch(request, codec, now, touched, dirty):
                while not route.dispatch_slice(request, codec, now, touched, dirty):
                    pass  # the rest of a sliced request at once: later ones must not overtake it
        route.flusher.add(touched)
        route.flusher.add_clients(dirty)

    def counters(self) -> dict:
        return {"migrate_on_access": self.on_access, "migrate_held": self.held}

    # -- life cycle -------------------------------------------------------------

    def use_config(self, config) -> None:
        """As L{HashRoute.use_config}, C{config} being the pool's (its file's servers)."""
        self.pool_config = config
        HashRoute.use_config(self, replace(config, servers=self.config.servers))

    def stop(self) -> None:
        """Close every backend connection; requests in flight or waiting get error replies."""
        HashRoute.stop(self)
        dirty = []
        for key, queue in list(self.queues.items()):
            if queue.state < _READY:
                queue.state = _FAILED
                queue.error = CLOSED
        self._advance(list(self.queues), dirty)
        self.flusher.add_clients(dirty)
