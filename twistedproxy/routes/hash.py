"""
The hash route: twemproxy's pool.  Places each key on one server of a servers
layer (L{twistedproxy.core.servers.ServerSet}) with the pool's hash function,
distribution (ketama, modula, random) and hash tag, splits multi-key requests
per server and broadcasts the ones every server must answer.

Placement lives here, health lives in the servers layer: when a server is
ejected or readmitted the layer calls L{HashRoute.rebuild}, which recomputes
the distribution over the servers still live, as twemproxy rebuilds its
continuum.

A L{HashRoute} is also what a twemproxy pool's listener serves
(L{twistedproxy.routes.interface.IServedRoute}): its clients, their counters
and settings are the pool's.  As an inner route of another one (a prefix,
failover or replicate route) only L{IRoute} is used.

A request's C{resume} hook (set by an outer route that may resend it) is handed
on to the fragments of a split or broadcast request and to the slices of a
sliced one, so the outer route sees each part's reply or failure on its own
(a fragment's keys are C{[parent.keys[i] for i in fragment.key_indices]}).
"""

from __future__ import annotations

import random
import sys

from zope.interface import implementer

from twistedproxy.core.completion import release
from twistedproxy.core.request import ROUTE_ALL, ROUTE_ANY, ROUTE_KEY, ROUTE_KEYS, ROUTE_SESSION, Request
from twistedproxy.core.servers import ServerSet
from twistedproxy.hashing import hash_function, hash_tag_key, make_distribution
from twistedproxy.routes.interface import IKeyPlacingRoute, IServedRoute
from twistedproxy.routes.logins import LoginRoute
from twistedproxy.routes.sessions import ISessionRoute, Sessions

# Keys whose server is remembered (per pool, forgotten when the placement
# changes).  Hashing a key is a Python loop over its bytes, the largest per-key
# cost on CPython; a dict lookup is a fraction of it.  When full, the newest
# entry makes room: the keys seen first (in practice the hot ones) stay.  Long
# keys are not kept, so the cache stays under about 12 MB per pool.  Not on
# PyPy: its JIT hashes a key about as fast as a lookup, and a large dict of
# constantly replaced young keys costs its garbage collector more than it
# saves (measured: a third more CPU per request at -P 16).
PLACEMENT_CACHE_SIZE = 1 << 16
PLACEMENT_CACHE_KEY_BYTES = 100
PLACEMENT_CACHE_ENABLED = sys.implementation.name == "cpython"

# Keys of one multi-key request placed and sent per reactor turn.  A request
# with more keys is sent in slices of this many, one slice per turn, so that
# hashing 150,000 keys (a third of a second on CPython) does not stall every
# other client of the process; a slice costs a few milliseconds at most.
SLICE_KEYS = 512


@implementer(IServedRoute, ISessionRoute, IKeyPlacingRoute)
class HashRoute(LoginRoute):
    """
    Hash placement of keys over the servers of one pool.

    @ivar server_set: the pool's servers layer (health, connections).
    @ivar servers: its servers, in configuration order.
    @ivar live: the servers in the placement (not ejected).
    @ivar codecs: the codecs this pool's clients speak (backend connections are
        kept per codec); the first is the pool's main codec.
    @ivar users: the users its clients must log in as (memcached C{users:}, set
        by L{twistedproxy.api.build_pool}), or None (L{LoginRoute}).
    """

    def __init__(self, config, codec, reactor, codecs=None, stats=None, server_set=None):
        if server_set is None:
            server_set = ServerSet(config, reactor, tuple(codecs) if codecs else (codec,), stats)
        self.server_set = server_set
        self.config = config
        self.name = config.name
        self.stats = server_set.stats
        self.reactor = reactor
        self.codec = codec
        self.codecs = server_set.codecs
        self.clients = set()  # ClientConnections currently open
        self.flusher = server_set.flusher
        self.servers = server_set.servers
        self._send = server_set.send
        self._hash = hash_function(config.hash)
        self._hash_tag = config.hash_tag
        self._random = random.Random()
        self.live = []
        self._index = None
        self._placement = {}  # key -> Server (deterministic distributions only)
        self._cache_placement = PLACEMENT_CACHE_ENABLED and config.distribution != "random"
        self.sessions = Sessions(self)  # its clients' transactions, each on a server connection of its own
        server_set.watch(self.rebuild)
        self.rebuild()

    # The servers layer's state, read and set through the pool as before.
    @property
    def health(self):
        return self.server_set.health

    @health.setter
    def health(self, health):
        self.server_set.health = health

    @property
    def timeout(self):
        return self.server_set.timeout

    @property
    def closing(self):
        return self.server_set.closing

    # -- placement ---------------------------------------------------------

    def rebuild(self) -> None:
        """Recompute the placement over the servers not ejected."""
        self._placement = {}
        self.live = [s for s in self.servers if not s.ejected]
        self._index = self._distribution([s.spec for s in self.live])

    def _distribution(self, specs):
        """The index function of the pool's distribution over servers C{specs} (None for none)."""
        if not specs:
            return None
        return make_distribution(
            self.config.distribution, [(spec.ketama_name, spec.weight) for spec in specs], rng=self._random
        ).index

    def server_for(self, key: bytes):
        """The server that holds C{key}, or None when every server is ejected."""
        if self._cache_placement:
            server = self._placement.get(key)
            if server is not None:
                return server
        index = self._index
        if index is None:
            return None
        hashed = key if self._hash_tag is None else hash_tag_key(key, self._hash_tag)
        server = self.live[index(self._hash(hashed))]
        if self._cache_placement and len(key) <= PLACEMENT_CACHE_KEY_BYTES:
            placement = self._placement
            if len(placement) >= PLACEMENT_CACHE_SIZE:
                placement.popitem()
            placement[key] = server
        return server

    # -- dispatch -------------------------------------------------------------

    def dispatch(self, request, codec, now: float, touched: list, dirty: list) -> bool:
        """
        Send C{request} (and its fragments, for split or broadcast requests) to
        the right server connections.  Requests that cannot be sent fail at once.

        Returns True for a request with more than L{SLICE_KEYS} keys, of which
        only the first slice was sent: the caller sends the others with
        L{dispatch_slice}, one per reactor turn, and sends nothing else of that
        client meanwhile (later requests must not overtake it).
        """
        route = request.route
        if route == ROUTE_KEY:
            server = self.server_for(request.key)
            if server is not None and server.available(now):
                server.connection(codec).enqueue(request, now, touched)  # _send's common case, inline
            else:
                self._send(server, request, codec, now, touched, dirty)
        elif route == ROUTE_KEYS:
            if len(request.keys) > SLICE_KEYS:
                # The dispatcher holds one count of pending until its last slice is out.
                request.fragments = []
                request.pending = 1
                request.sent_at = now
                return not self.dispatch_slice(request, codec, now, touched, dirty)
            self._dispatch_keys(request, codec, now, touched, dirty)
        elif route == ROUTE_ALL:
            self._broadcast(request, self.live, codec, now, touched, dirty)
        elif route == ROUTE_ANY:
            server = self._random.choice(self.live) if self.live else None
            self._send(server, request, codec, now, touched, dirty)
        elif route == ROUTE_SESSION:
            return self.sessions.dispatch(request, codec, now, touched, dirty)
        else:
            raise ValueError("unknown route %r" % (route,))

    def _broadcast(self, request, servers, codec, now, touched, dirty) -> None:
        """Send C{request} to every one of C{servers} (its replies merged), or fail it when there is none."""
        if not servers:
            self._send(None, request, codec, now, touched, dirty)  # fails it: no server
            return
        request.fragments = [(server, self._fragment(request, request.frame, None)) for server in servers]
        self._send_fragments(request, codec, now, touched, dirty)

    def _dispatch_keys(self, request, codec, now, touched, dirty) -> None:
        order, groups = self._place(request.keys, 0, len(request.keys))
        frames = codec.split(request, groups)
        request.fragments = [
            (server, self._fragment(request, frame, group)) for server, frame, group in zip(order, frames, groups)
        ]
        self._send_fragments(request, codec, now, touched, dirty)

    def dispatch_slice(self, request, codec, now: float, touched: list, dirty: list) -> bool:
        """
        Send the next L{SLICE_KEYS} keys of a request L{dispatch} began to send
        in slices, as a multi-key request of their own (split per server, its
        fragments merged when in); return True once no slice is left to send.
        """
        keys = request.keys
        start = len(request.fragments) * SLICE_KEYS
        stop = min(start + SLICE_KEYS, len(keys))
        order, groups = self._place(keys, start, stop)
        frames = codec.split(request, groups)  # the request's codec data (MSET values ...) stay its own
        part = Request(b"", request.command, route=ROUTE_KEYS, keys=keys[start:stop])
        part.parent = request
        part.received_at = request.received_at
        part.resume = request.resume  # handed on to its fragments (never called for the slice itself)
        part.fragments = [
            (server, self._fragment(part, frame, [i - start for i in group]))
            for server, frame, group in zip(order, frames, groups)
        ]
        request.fragments.append(part)
        request.pending += 1
        self._send_fragments(part, codec, now, touched, dirty)
        if stop < len(keys) and part.failed is None:
            return False
        # The last slice, or one failed at once (no server): the request's reply
        # is an error either way, so the rest is not sent.
        release(request, codec, dirty)
        return True

    def _place(self, keys, start: int, stop: int):
        """The servers of C{keys[start:stop]} in first-seen order, and the indices of the keys each holds."""
        by_server = {}
        order = []
        server_for = self.server_for
        for i in range(start, stop):
            server = server_for(keys[i])
            group = by_server.get(server)
            if group is None:
                group = by_server[server] = []
                order.append(server)
            group.append(i)
        return order, [by_server[s] for s in order]

    @staticmethod
    def _fragment(parent, frame, key_indices):
        fragment = Request(frame, parent.command)
        fragment.parent = parent
        fragment.key_indices = key_indices
        fragment.received_at = parent.received_at
        fragment.resume = parent.resume  # a route that may resend the request may resend each part
        fragment.internal = parent.internal  # a route's own request (a copy) stays its own in parts
        return fragment

    def _send_fragments(self, request, codec, now, touched, dirty) -> None:
        pairs = request.fragments
        request.fragments = [fragment for _, fragment in pairs]
        request.pending = len(pairs)
        request.sent_at = now
        if len(pairs) > 1:
            self.stats.fragments += len(pairs)
        for server, fragment in pairs:
            self._send(server, fragment, codec, now, touched, dirty)

    # -- sessions (transactions): one server is the group all their keys share --

    def session_group(self, key):
        """C{(server, server)} for C{key} (any live server for None); C{(None, None)} when none is left."""
        if key is None:
            server = self._random.choice(self.live) if self.live else None
        else:
            server = self.server_for(key)
        return server, server

    def session_room(self) -> bool:
        return any(server.has_room_to_pin() for server in self.live)

    def session_conflict(self, request, codec) -> bytes:
        return codec.error_reply(request, "keys of a transaction must all map to one server (use a hash tag)")

    # -- life cycle -----------------------------------------------------------

    def use_config(self, config) -> None:
        """
        Take C{config}, which may differ from the pool's own only in the
        settings a live pool can change (C{timeout}, C{client_max_pending},
        C{max_request_bytes}): open clients and connections follow at once
        (C{max_request_bytes} applies to clients connecting from now on).
        """
        self.config = config
        self.server_set.use_config(config)
        for client in self.clients:
            client.max_pending = config.client_max_pending

    def start(self) -> None:
        """Open backend connections now if the pool asks for C{preconnect}."""
        self.server_set.start()

    def client_gone(self, client) -> None:
        self.clients.discard(client)
        if self.sessions.by_client:
            self.sessions.client_gone(client)

    def retire(self) -> None:
        """
        Stop taking requests after a reload: every backend connection closes as
        soon as its in-flight requests are answered, so they finish normally.
        """
        self.server_set.retire()

    def stop(self) -> None:
        """Close every backend connection; requests in flight get error replies."""
        self.server_set.stop()
