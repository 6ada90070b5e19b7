"""
The servers layer: the backends of one pool, their connections and their
health (failure counting, auto-ejection, reconnect backoff, probes of ejected
servers, preconnect).  Routes use it; it knows nothing of placement.

A L{ServerSet} is what a route sends to: it owns the L{Server} objects of one
pool (C{servers}, in configuration order), the pool's settings, counters and
turn flusher, and tells whoever places keys on it when a server leaves or comes
back (L{ServerSet.watch}): the hash route then rebuilds its placement over the
servers still live.  A route sends a request with
C{server.connection(codec).enqueue(request, now, touched)} after checking
C{server.available(now)}; L{ServerSet.send} does the same with the failure
replies of an unavailable server, for routes off the hottest path.

Each L{Server} keeps its connections per codec (a memcached pool's clients may
speak text or binary), made on demand, round-robin over
C{server_connections}.  The layer knows no protocol: the codec gives the
handshake and probe requests (internal requests: see
L{twistedproxy.core.request.Request.internal}).
"""

from __future__ import annotations

from twisted.internet.protocol import ClientFactory
from twisted.logger import Logger

from twistedproxy.core.batching import TurnFlusher
from twistedproxy.core.completion import REFUSED, fail
from twistedproxy.core.server import ServerConnection
from twistedproxy.stats.recorder import PoolStats

log = Logger()

# Reconnect backoff after a failed or lost connection (seconds): doubles per
# consecutive failure from the first value up to the last.
BACKOFF_FIRST = 0.05
BACKOFF_MAX = 2.0

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
    """
    One backend of a pool and its (lazily made) connections, per codec.

    @ivar pool: the L{ServerSet} it belongs to (its pool's servers layer).
    """

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
        # Connections of a client's own (transactions: L{pin}), busy or idle; never round-robin.
        self.pinned = set()
        self.idle_pinned = []

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

    def pin(self, codec):
        """
        A connection for one client alone (its transaction), or None when the
        server has C{transaction_connections} of them open already.  An idle one
        (a transaction ended cleanly on it) is taken first.
        """
        idle = self.idle_pinned
        for i in range(len(idle) - 1, -1, -1):
            conn = idle[i]
            if conn.codec is codec and not conn.closed:
                del idle[i]
                return conn
        if len(self.pinned) >= self.pool.config.transaction_connections:
            if not idle:
                return None
            idle.pop(0).close()  # an idle one of another codec makes room
        conn = self._connect(codec)
        conn.pinned = True
        self.pinned.add(conn)
        return conn

    def has_room_to_pin(self) -> bool:
        """Whether L{pin} would give a connection now."""
        return bool(self.idle_pinned) or len(self.pinned) < self.pool.config.transaction_connections

    def unpin(self, conn, clean: bool) -> None:
        """
        Its client's transaction ended: keep C{conn} for the next one when it is
        C{clean} (nothing in flight, no state left on the backend), else close it.
        """
        if clean and not conn.closed and conn in self.pinned and not self.pool.closing and not self.ejected:
            self.idle_pinned.append(conn)
        else:
            conn.close()

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
        if conn.pinned:
            self.pinned.discard(conn)
            if conn in self.idle_pinned:
                self.idle_pinned.remove(conn)
            if conn.closed:
                return  # the proxy let a transaction's connection go: no failure of the server
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
        pool.membership_changed()
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
        self.pool.membership_changed()
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
        for conn in list(self.pinned):
            conn.close()

    def stop(self) -> None:
        if self.retry_call is not None and self.retry_call.active():
            self.retry_call.cancel()
        self.retry_call = None
        if self.probing is not None:
            self.probing.close()
        self.close_connections()


class ServerSet:
    """
    The servers of one pool and what they share: the pool's config, reactor,
    codecs (the first is the pool's main codec), counters, backend timeout and
    the flusher that writes each backend connection once per reactor turn.

    @ivar health: who decides ejections: None counts failures here; a worker
        sets an object with C{failed(server)} and C{recovered(server)} that asks
        the master.
    @ivar closing: retired or stopped: no reconnects, no probes.
    """

    def __init__(self, config, reactor, codecs, stats=None):
        self.config = config
        self.name = config.name
        # Counters outlive the pool object when a registry hands them in (reloads).
        self.stats = stats if stats is not None else PoolStats(config.name)
        self.reactor = reactor
        self.codecs = tuple(codecs)
        self.timeout = config.timeout / 1000.0 if config.timeout is not None else None
        self.closing = False
        self.health = None
        self.flusher = TurnFlusher(reactor)  # backend writes: one per connection per reactor turn
        self._watchers = []
        self.servers = [Server(self, spec, i) for i, spec in enumerate(config.servers)]
        # Makers of requests a route adds to the codec's handshake of every new
        # connection (Redis Cluster's READONLY); internal like the handshake.
        self.handshake_extra = ()

    def add_server(self, spec) -> Server:
        """A server the configuration did not list (a cluster node found in its map), added at the end."""
        server = Server(self, spec, len(self.servers))
        self.servers.append(server)
        if self.config.preconnect and not self.closing:
            server.preconnect()
        return server

    def watch(self, changed) -> None:
        """Call C{changed()} whenever a server is ejected or readmitted."""
        self._watchers.append(changed)

    def membership_changed(self) -> None:
        for changed in self._watchers:
            changed()

    def live(self) -> list:
        """The servers not ejected, in configuration order."""
        return [s for s in self.servers if not s.ejected]

    def send(self, server, request, codec, now: float, touched: list, dirty: list) -> None:
        """
        Send C{request} to C{server} (None: no server is left), or fail it the
        way the server's last failure did while it backs off.
        """
        if server is None:
            fail(request, REFUSED, "no server in pool %s" % (self.name,), codec, dirty)
        elif not server.available(now):
            # Backing off after a failure: fail fast, the way that failure did.
            fail(request, server.last_error or REFUSED, server.label, codec, dirty)
        else:
            server.connection(codec).enqueue(request, now, touched)

    def use_config(self, config) -> None:
        """Take the settings a live pool can change; open connections follow the timeout at once."""
        self.config = config
        self.timeout = timeout = config.timeout / 1000.0 if config.timeout is not None else None
        for server in self.servers:
            for conn in [conn for conns in server.connections.values() for conn in conns] + list(server.pinned):
                conn.timeout = timeout
                if timeout is None:
                    conn._cancel_timer()

    def start(self) -> None:
        """Open backend connections now if the pool asks for C{preconnect}."""
        if self.config.preconnect:
            for server in self.servers:
                server.preconnect()

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
            for conn in list(server.pinned):
                conn.close_when_idle()

    def stop(self) -> None:
        """Close every backend connection; requests in flight get error replies."""
        self.closing = True
        for server in self.servers:
            server.stop()
