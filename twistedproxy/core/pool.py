"""
A server pool: its backends, the key -> server placement, and the health of each
backend (failure counting, ejection, reconnect backoff).

The pool knows no protocol: it is handed a codec for splitting and error replies
and asks L{twistedproxy.hashing} where each key lives.
"""

from __future__ import annotations

import random
import sys

from twisted.internet.protocol import ClientFactory
from twisted.logger import Logger

from twistedproxy.core.batching import TurnFlusher
from twistedproxy.core.completion import REFUSED, fail, release
from twistedproxy.core.request import ROUTE_ALL, ROUTE_ANY, ROUTE_KEY, ROUTE_KEYS, Request
from twistedproxy.core.server import ServerConnection
from twistedproxy.hashing import hash_function, hash_tag_key, make_distribution
from twistedproxy.stats.recorder import PoolStats

log = Logger()

# Reconnect backoff after a failed or lost connection (seconds): doubles per
# consecutive failure from the first value up to the last.
BACKOFF_FIRST = 0.05
BACKOFF_MAX = 2.0

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


class _ConnectorFactory(ClientFactory):
    """Hands an already-built L{ServerConnection} to the reactor's connector."""

    noisy = False

    def __init__(self, connection):
        self.connection = connection

    def buildProtocol(self, addr):
        return self.connection

    def clientConnectionFailed(self, connector, reason):
        self.connection.connection_failed(reason)


class Server:
    """One backend of a pool and its (lazily made) connections, per codec."""

    def __init__(self, pool, spec, index: int):
        self.pool = pool
        self.spec = spec
        self.index = index
        self.label = spec.label
        self.connections = {}  # codec -> [ServerConnection]
        self.next_connection = 0
        self.failures = 0  # consecutive failures (reset by a good reply)
        self.last_error = None  # nutcracker's text for the last failure (completion.failure_text)
        self.retry_at = 0.0  # no new connection before this time (backoff)
        self.ejected = False
        self.retry_call = None
        self.probing = None  # the probe connection of an ejected server, while one runs
        self.probe_waiters = []  # called with True/False when the running probe ends
        self.stats = pool.stats.server(self.label)

    def connection(self, codec):
        """A connection for C{codec}: round-robin over C{server_connections}, made on demand."""
        conns = self.connections.get(codec)
        if conns is None:
            conns = self.connections[codec] = []
        count = len(conns)
        if count == 1 and self.pool.config.server_connections == 1:
            return conns[0]  # twemproxy's default: one connection per server
        if count < self.pool.config.server_connections:
            conn = self._connect(codec)
            conns.append(conn)
            return conn
        self.next_connection += 1
        return conns[self.next_connection % count]

    def _connect(self, codec, probe=False):
        pool = self.pool
        conn = ServerConnection(self, codec, pool.reactor, probe)
        factory = _ConnectorFactory(conn)
        timeout = pool.timeout if pool.timeout is not None else 30
        spec = self.spec
        if spec.path is not None:
            pool.reactor.connectUNIX(spec.path, factory, timeout=timeout)
        else:
            pool.reactor.connectTCP(spec.host, spec.port, factory, timeout=timeout)
        return conn

    def available(self, now: float) -> bool:
        """False while ejected or backing off after a failed connection."""
        return not self.ejected and now >= self.retry_at

    def connection_made(self, conn) -> None:
        self.retry_at = 0.0
        self.last_error = None
        self.stats.connections_made += 1

    def connection_lost(self, conn, reason) -> None:
        conns = self.connections.get(conn.codec)
        if conns is not None and conn in conns:
            conns.remove(conn)
        if not conn.closed:  # a close the proxy asked for is neither server_eof nor server_err
            self.stats.connection_lost(reason)
        if conn is self.probing:
            self._probe_finished(False)
            return
        if self.pool.closing or self.ejected:
            return  # a close we asked for (ejection, stop), not a new failure
        self.record_failure()
        if self.pool.config.preconnect and not self.ejected:
            self.pool.reactor.callLater(max(self.retry_at - self.pool.reactor.seconds(), 0.0), self.preconnect)

    def timed_out(self, conn) -> None:
        if conn is self.probing:
            self._probe_finished(False)
            conn.close()
            return
        self.stats.server_timedout += 1
        self.record_failure()

    def record_failure(self) -> None:
        """
        Count a failure: with C{auto_eject_hosts}, towards an ejection (under a
        master, C{pool.health} set, the master counts across workers and says
        when); without, back off reconnecting.
        """
        if self.ejected:
            return  # late failures of requests sent before the ejection
        pool = self.pool
        self.failures += 1
        config = pool.config
        if config.auto_eject_hosts:
            if pool.health is not None:
                pool.health.failed(self)
            elif self.failures >= config.server_failure_limit:
                self.eject()
            # No backoff: the next request tries a new connection, as twemproxy
            # does; failing requests fast meanwhile would only add errors, and
            # the ejection bounds the retries.
            return
        backoff = min(BACKOFF_FIRST * (2 ** (self.failures - 1)), BACKOFF_MAX)
        self.retry_at = pool.reactor.seconds() + backoff

    def succeeded(self) -> None:
        """A reply after failures were counted: the count starts over."""
        self.failures = 0
        if self.pool.health is not None and not self.ejected:
            self.pool.health.recovered(self)

    def suspect(self) -> None:
        """The master counts failures of this server: report the next reply (L{succeeded})."""
        if not self.failures:
            self.failures = 1

    def eject(self, counted: bool = True) -> None:
        """
        Take the server out of the placement: for C{server_retry_timeout}, then
        until a probe answers (L{probe}).  Under a master, until it readmits it;
        the master has one worker count the ejection (C{counted}), since the
        stats port sums the workers' counters.
        """
        if self.ejected:
            return
        pool = self.pool
        self.failures = 0
        self.ejected = True
        self.stats.server_ejected_at = int(pool.reactor.seconds() * 1000000)
        if counted:
            pool.stats.server_ejects += 1
        log.warn(
            "pool {pool}: ejecting server {server} for {seconds}s",
            pool=pool.name,
            server=self.label,
            seconds=pool.config.server_retry_timeout / 1000.0,
        )
        if pool.health is None:
            self._retry_later()
        pool.rebuild()
        self.close_connections()

    def _retry_later(self) -> None:
        self.retry_call = self.pool.reactor.callLater(self.pool.config.server_retry_timeout / 1000.0, self._retry)

    def _retry(self) -> None:
        self.retry_call = None
        self.probe(self._probed)

    def _probed(self, ok: bool) -> None:
        if not self.ejected or self.pool.closing:
            return
        if ok:
            self.readmit()
            return
        log.info(
            "pool {pool}: server {server} did not answer the probe; ejected for {seconds}s more",
            pool=self.pool.name,
            server=self.label,
            seconds=self.pool.config.server_retry_timeout / 1000.0,
        )
        self._retry_later()

    def probe(self, done) -> None:
        """
        Check that the server answers before it gets traffic again: connect, and
        send the handshake and the codec's probe request; C{done(ok)} follows.
        No client request is involved, and a probe that fails counts as nothing.
        """
        self.probe_waiters.append(done)
        if self.probing is None:
            self.probing = self._connect(self.pool.codecs[0], probe=True)

    def probe_answered(self, conn, ok: bool) -> None:
        """The probe connection C{conn} got its probe reply; on success it stays as a connection."""
        if conn is not self.probing:
            return
        if ok:
            self.connections.setdefault(conn.codec, []).append(conn)
        else:
            conn.close()
        self._probe_finished(ok)

    def _probe_finished(self, ok: bool) -> None:
        self.probing = None
        waiters, self.probe_waiters = self.probe_waiters, []
        for done in waiters:
            done(ok)

    def readmit(self) -> None:
        if self.retry_call is not None and self.retry_call.active():
            self.retry_call.cancel()
        self.retry_call = None
        self.ejected = False
        self.retry_at = 0.0
        log.info("pool {pool}: server {server} back in placement", pool=self.pool.name, server=self.label)
        self.pool.rebuild()
        if self.pool.config.preconnect:
            self.preconnect()

    def preconnect(self) -> None:
        """Open every connection now (C{preconnect: true}) for each codec of the pool."""
        if self.ejected or self.pool.closing:
            return
        for codec in self.pool.codecs:
            while len(self.connections.setdefault(codec, [])) < self.pool.config.server_connections:
                self.connections[codec].append(self._connect(codec))

    def close_connections(self) -> None:
        for conns in list(self.connections.values()):
            for conn in list(conns):
                conn.close()
        self.connections = {}

    def stop(self) -> None:
        if self.retry_call is not None and self.retry_call.active():
            self.retry_call.cancel()
        self.retry_call = None
        if self.probing is not None:
            self.probing.close()
        self.close_connections()


class ServerPool:
    """
    The servers of one pool and the placement of keys on them.

    @ivar codecs: the codecs this pool's clients speak (backend connections are
        kept per codec); the first is the pool's main codec.
    """

    def __init__(self, config, codec, reactor, codecs=None, stats=None):
        self.config = config
        self.name = config.name
        # Counters outlive the pool object when a registry hands them in (reloads).
        self.stats = stats if stats is not None else PoolStats(config.name)
        self.reactor = reactor
        self.codec = codec
        self.codecs = tuple(codecs) if codecs else (codec,)
        self.timeout = config.timeout / 1000.0 if config.timeout is not None else None
        self.closing = False
        # Who decides ejections: None counts failures here; a worker sets an
        # object with failed(server) and recovered(server) that asks the master.
        self.health = None
        self.clients = set()  # ClientConnections currently open
        self.flusher = TurnFlusher(reactor)  # backend writes: one per connection per reactor turn
        self.servers = [Server(self, spec, i) for i, spec in enumerate(config.servers)]
        self._hash = hash_function(config.hash)
        self._hash_tag = config.hash_tag
        self._random = random.Random()
        self.live = []
        self._index = None
        self._placement = {}  # key -> Server (deterministic distributions only)
        self._cache_placement = PLACEMENT_CACHE_ENABLED and config.distribution != "random"
        self.rebuild()

    # -- placement ---------------------------------------------------------

    def rebuild(self) -> None:
        """Recompute the placement over the servers not ejected."""
        self._placement = {}
        self.live = [s for s in self.servers if not s.ejected]
        if self.live:
            dist = make_distribution(
                self.config.distribution,
                [(s.spec.ketama_name, s.spec.weight) for s in self.live],
                rng=self._random,
            )
            self._index = dist.index
        else:
            self._index = None

    def server_for(self, key: bytes):
        """The server that holds C{key}, or None when every server is ejected."""
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
            servers = self.live
            if not servers:
                fail(request, REFUSED, "no server in pool %s" % (self.name,), codec, dirty)
                return
            request.fragments = fragments = []
            for server in servers:
                fragment = self._fragment(request, request.frame, None)
                fragments.append((server, fragment))
            self._send_fragments(request, codec, now, touched, dirty)
        elif route == ROUTE_ANY:
            server = self._random.choice(self.live) if self.live else None
            self._send(server, request, codec, now, touched, dirty)
        else:
            raise ValueError("unknown route %r" % (route,))

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

    def _send(self, server, request, codec, now, touched, dirty) -> None:
        if server is None:
            fail(request, REFUSED, "no server in pool %s" % (self.name,), codec, dirty)
        elif not server.available(now):
            # Backing off after a failure: fail fast, the way that failure did.
            fail(request, server.last_error or REFUSED, server.label, codec, dirty)
        else:
            server.connection(codec).enqueue(request, now, touched)

    # -- life cycle -----------------------------------------------------------

    def use_config(self, config) -> None:
        """
        Take C{config}, which may differ from the pool's own only in the
        settings a live pool can change (C{timeout}, C{client_max_pending},
        C{max_request_bytes}): open clients and connections follow at once
        (C{max_request_bytes} applies to clients connecting from now on).
        """
        self.config = config
        self.timeout = timeout = config.timeout / 1000.0 if config.timeout is not None else None
        for client in self.clients:
            client.max_pending = config.client_max_pending
        for server in self.servers:
            for conns in server.connections.values():
                for conn in conns:
                    conn.timeout = timeout
                    if timeout is None:
                        conn._cancel_timer()

    def start(self) -> None:
        """Open backend connections now if the pool asks for C{preconnect}."""
        if self.config.preconnect:
            for server in self.servers:
                server.preconnect()

    def client_gone(self, client) -> None:
        self.clients.discard(client)

    def retire(self) -> None:
        """
        Stop taking requests after a reload: every backend connection closes as
        soon as its in-flight requests are answered, so they finish normally.
        """
        self.closing = True
        for server in self.servers:
            if server.retry_call is not None and server.retry_call.active():
                server.retry_call.cancel()
            if server.probing is not None:
                server.probing.close()
            for conns in server.connections.values():
                for conn in conns:
                    conn.close_when_idle()

    def stop(self) -> None:
        """Close every backend connection; requests in flight get error replies."""
        self.closing = True
        for server in self.servers:
            server.stop()

