"""
The client side: one L{ClientConnection} per accepted connection, and the
L{ProxyFactory} a pool listens with.

A client connection frames requests with its codec's parser, hands them to the
route it is tied to (L{twistedproxy.routes.interface.IServedRoute}: a pool's
hash route, or later a route over several pools), and writes replies strictly in request order: a reply that arrives early
waits in the order queue until every request before it is answered.  Each read
from the client ends with one write per backend touched, and each batch of
replies ends with one write to the client.

Backpressure: reading from the client pauses while it has too many requests in
flight or while its transport's write buffer is full (a client that does not
read its replies), so a slow client cannot grow the proxy's memory.  Replies
count too: at most L{DISPATCH_WINDOW} requests of a client are out at backends
or answered but unwritten; the others wait, parsed, until replies are written,
and none are sent while the client's write buffer is full.

Half-close: a client that shuts down its sending side (C{shutdown(SHUT_WR)},
C{nc -q1}) still gets the reply to every request it sent; the connection closes
once the last one is written, as with memcached, Redis and nutcracker.

A request with very many keys is sent in slices, one per reactor turn (see
L{twistedproxy.routes.hash.HashRoute.dispatch}), so it cannot stall the other
clients of the process; the client's later requests wait behind it in the held
queue until its last slice is out, so none overtakes it.
"""

from __future__ import annotations

import base64
from collections import deque

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, ILoggingContext, IProtocolFactory, IPushProducer
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twistedproxy.core.completion import flush_clients
from twistedproxy.core.jit import compiled_apart
from twistedproxy.core.logins import LoginGuard
from twistedproxy.core.request import ROUTE_LOCAL, ProtocolError, local
from twistedproxy.core.transports import set_up_accepted

log = Logger()

# Requests of one client sent to backends and not yet written back.  Bounds what
# a client that never reads can make the proxy buffer (this many of the largest
# reply) while staying deep enough to keep pipelined backends busy.
DISPATCH_WINDOW = 64

_QUIT_CLOSE = Failure(ConnectionDone("the client quit"))


@implementer(IPushProducer, IHalfCloseableProtocol)
class ClientConnection(Protocol):
    """One client of a route (a pool); pipelined, replies in order."""

    def __init__(self, route, parser):
        self.route = route
        self.parser = parser
        self.queue = deque()  # requests in client order, oldest first
        self.dirty = False  # queued for a flush at the end of the current batch
        self.closed = False
        self.quitting = False  # a close_after request was read: ignore what follows
        self.quit = False  # the client asked to close (QUIT): however the close goes, it is an EOF
        self.read_closed = False  # the client shut down its sending side: close once answered
        self.max_pending = route.config.client_max_pending
        self.paused_for_queue = False
        self.paused_for_writes = False
        self.held = deque()  # parsed requests waiting for room in the dispatch window
        self.held_codec = None  # the codec of the oldest held request (see _hold)
        self.outstanding = 0  # requests dispatched and not yet written to the client
        self.slicing = None  # the request being sent in slices (heads the held queue meanwhile)
        self.slice_call = None
        self.frozen = False  # a stopping worker reads no more: see freeze()
        self.handed = False  # another worker took the socket: close without a FIN or a count

    @property
    def pool(self):
        """The route this client is tied to, by its older name (a pool's hash route)."""
        return self.route

    @pool.setter
    def pool(self, route):
        self.route = route

    # -- connection events ---------------------------------------------------

    def connectionMade(self):
        self.write = set_up_accepted(self.transport, self)

    @compiled_apart
    def dataReceived(self, data):
        if self.quitting:
            return
        error = None
        try:
            requests = self.parser.feed(data)
        except ProtocolError as e:
            requests = e.requests
            error = e
        codec = self.parser.codec
        route = self.route
        now = route.reactor.seconds()
        touched = []
        dirty = []
        if len(requests) == 1:  # unpipelined: no loop (see _take)
            self._take(requests[0], codec, route, now, touched, dirty)
        else:
            for request in requests:
                codec = self._take(request, codec, route, now, touched, dirty)
                if request.close_after:
                    break
        queue = self.queue
        if error is not None and not self.quitting:
            log.info("client {peer}: {error}; closing", peer=self._peer(), error=str(error))
            queue.append(local(b"", error.reply, close_after=True))
            self.quitting = True
        if touched:
            route.flusher.add(touched)
        if dirty:
            flush_clients(dirty)
        if queue[0].done if queue else False:
            self.flush()
        if len(queue) >= self.max_pending and not self.paused_for_queue and not self.closed:
            self.paused_for_queue = True
            if not self.paused_for_writes:
                self.transport.pauseProducing()

    def _take(self, request, codec, route, now: float, touched: list, dirty: list):
        """
        Queue one request read from the client (framed by C{codec}) and send it,
        or hold it; return the codec of the client's next request.

        A function of its own, called without a loop for the single request of an
        unpipelined read: on PyPy a loop the JIT compiled apart is entered with
        a frame allocated on the heap, several hundred bytes per read.
        """
        request.client = self
        request.received_at = now
        self.queue.append(request)
        if request.route != ROUTE_LOCAL:
            if self.held or self.paused_for_writes or self.outstanding >= DISPATCH_WINDOW:
                self._hold(request, codec)
            else:
                self.outstanding += 1
                if route.dispatch(request, codec, now, touched, dirty):
                    self._slice(request, codec)
        elif request.switch_to is not None:
            # The client's later requests speak another codec (Redis HELLO 3),
            # on other backend connections: they wait until every request
            # before the switch is answered, so none overtakes an earlier one.
            if self.held or self.outstanding:
                self._hold(request, codec)
            codec = request.switch_to
        if request.close_after:
            self.quitting = self.quit = True
        return codec

    @compiled_apart
    def flush(self):
        """Write every reply now at the head of the order queue, in one write."""
        self.dirty = False
        if self.closed:
            return
        queue = self.queue
        stats = self.route.stats
        now = self.route.reactor.seconds()
        close = False
        reply = None
        if len(queue) == 1:
            # Unpipelined: the only request, written without a loop (see _take).
            if queue[0].done:
                request = queue[0]
                # Not popleft(): emptied so, the next item starts mid-block (see
                # ServerConnection._take_reply).
                queue.clear()
                reply = self._written(request, stats, now)
                close = request.close_after
        else:
            out = []
            while queue and queue[0].done:
                request = queue.popleft()
                part = self._written(request, stats, now)
                if part:
                    out.append(part)
                if request.close_after:
                    close = True
                    break
            if not queue:
                queue.clear()
            if out:
                reply = out[0] if len(out) == 1 else b"".join(out)
        if reply:
            self.write(reply)
        if close or (self.read_closed and not queue):
            self.closed = True
            self.held.clear()  # at most switches of codec (see dataReceived), with no request after them
            self.transport.loseConnection()
            return
        if self.paused_for_queue and len(queue) <= self.max_pending // 2:
            self.paused_for_queue = False
            if not self.paused_for_writes and not self.read_closed and not self.frozen:
                self.transport.resumeProducing()
        if self.held and not self.paused_for_writes:
            self._dispatch_held()

    def _written(self, request, stats, now: float):
        """C{request}, answered, leaves the order queue at C{now}: its reply (None or bytes) to write."""
        if request.route != ROUTE_LOCAL:
            self.outstanding -= 1
        stats.finished(request, now)
        return request.reply

    def _dispatch_held(self):
        """Send held requests while the dispatch window has room."""
        if self.slicing is not None:
            return  # they wait behind the request being sent in slices
        held = self.held
        route = self.route
        codec = self.held_codec
        now = route.reactor.seconds()
        touched = []
        dirty = []
        while held and self.outstanding < DISPATCH_WINDOW:
            request = held.popleft()
            if request.route == ROUTE_LOCAL:  # a switch of codec (see dataReceived), answered already
                if self.outstanding:
                    held.appendleft(request)  # the requests before it are not all answered yet
                    break
                codec = self.held_codec = request.switch_to
                continue
            self.outstanding += 1
            if route.dispatch(request, codec, now, touched, dirty):
                self._slice(request, codec)
                break
        route.flusher.add(touched)
        flush_clients(dirty)

    def readConnectionLost(self):
        """
        The client sent its last byte: read nothing more, answer every request
        already read (a partial one is dropped), then close.
        """
        self.read_closed = True
        self.quitting = True
        if not self.queue and not self.closed:
            self.closed = True
            self.transport.loseConnection()

    def writeConnectionLost(self):
        pass  # the proxy never half-closes its own side
    def _hold(self, request, codec):
        """Keep C{request} (framed by C{codec}) for when the dispatch window has room."""
        if not self.held:
            self.held_codec = codec
        self.held.append(request)

    def _slice(self, request, codec):
        """Send the rest of C{request} a slice per reactor turn; later requests are held meanwhile."""
        self.slicing = request
        self.held_codec = codec
        self.held.appendleft(request)  # non-empty held queue: the next requests queue behind
        self.slice_call = self.route.reactor.callLater(0, self._next_slice)

    def _next_slice(self):
        self.slice_call = None
        request = self.slicing
        route = self.route  # a reload may have moved this client to the pool's new version
        touched = []
        dirty = []
        done = route.dispatch_slice(request, self.held_codec, route.reactor.seconds(), touched, dirty)
        route.flusher.add(touched)
        if done:
            self.slicing = None
            self.held.popleft()
        else:
            self.slice_call = route.reactor.callLater(0, self._next_slice)
        flush_clients(dirty)
        if done and self.held and not self.paused_for_writes and not self.closed:
            self._dispatch_held()

    def connectionLost(self, reason):
        self.closed = True
        # Requests still in flight keep their place in the backends' pipelines;
        # their replies are dropped when they arrive.
        for request in self.queue:
            request.client = None
        self.queue.clear()
        self.held.clear()
        if self.slice_call is not None:
            self.slice_call.cancel()  # the slices already sent are answered and dropped
            self.slice_call = None
        self.slicing = None
        # A client that quits often closes before reading the +OK, and the reset
        # that meets it is no error of its connection.
        if not self.handed:
            self.route.stats.client_closed(_QUIT_CLOSE if self.quit else reason)
        self.route.client_gone(self)

    # -- IPushProducer: the transport tells us when its write buffer is full --

    def pauseProducing(self):
        if not self.paused_for_writes:
            self.paused_for_writes = True
            if not self.paused_for_queue:
                self.transport.pauseProducing()

    def resumeProducing(self):
        if self.paused_for_writes:
            self.paused_for_writes = False
            if not self.paused_for_queue and not self.closed and not self.read_closed and not self.frozen:
                self.transport.resumeProducing()
            if self.held and not self.closed:
                self._dispatch_held()

    def stopProducing(self):
        pass

    # -- hand-off to another worker (a reload or an upgrade replaces this one) --

    def freeze(self) -> None:
        """Read nothing more from the client; what was read is still answered."""
        if not self.frozen:
            self.frozen = True
            if not self.closed:
                self.transport.pauseProducing()

    def drained(self) -> bool:
        """Frozen, every request read is answered and its reply is in the kernel's hands."""
        transport = self.transport
        return (
            self.frozen
            and not self.queue
            and not self.closed
            and not self.quitting
            and not getattr(transport, "_tempDataLen", 0)
            and getattr(transport, "offset", 0) == len(getattr(transport, "dataBuffer", b""))
        )

    def export_state(self) -> dict:
        """
        What another worker needs to go on with this connection (JSON-safe): the
        parser's own state and the bytes read but not framed yet (base64).
        """
        parser = self.parser
        return {
            "codec": self.route.codec.name,
            "parser": parser.state(),
            "unparsed": base64.b64encode(parser.unparsed()).decode("ascii"),
        }

    def import_state(self, state: dict) -> None:
        """Take on a connection exported by L{export_state}; call once connected."""
        self.parser.restore(state["parser"])
        unparsed = base64.b64decode(state["unparsed"])
        if unparsed:
            self.dataReceived(unparsed)

    def handed_off(self) -> None:
        """
        Another process holds the socket now: close ours without shutdown() (which
        would end the connection for it too) and without counting a client close.
        """
        self.handed = True
        self.transport._shouldShutdown = False
        self.transport.loseConnection()

    def _peer(self) -> str:
        try:
            peer = self.transport.getPeer()
            return "%s:%s" % (peer.host, peer.port)
        except Exception:
            return "?"


# Declared although ServerFactory provides them: zope.interface writes an undeclared
# subclass's declarations onto the class the first time it is asked, which a listening
# port does when it starts; that class write makes PyPy throw away the compiled code that
# depends on the class (the accept path the warm-up compiled), right after "ready".
@implementer(IProtocolFactory, ILoggingContext)
class ProxyFactory(ServerFactory):
    """
    Accepts clients for one route (L{twistedproxy.routes.interface.IServedRoute}:
    a pool's L{twistedproxy.routes.hash.HashRoute}); C{pool} is its older name.

    Enforces the pool's C{client_connections} limit (0 = unlimited) by closing
    connections over the limit, as twemproxy does.  Under a master, C{share} is
    C{(slot, workers)}: the limit is split evenly over the workers, the
    remainder going to the first slots, so it holds for the whole proxy.

    C{tls}: None, or what puts each new client behind TLS (its C{wrap(protocol)},
    L{twistedproxy.net.tls.ListenerTLS}); the client itself never knows.

    C{logins}: the proxy's L{twistedproxy.core.logins.IAuthLimiter} (or None):
    a parser that authenticates clients (one with a C{login_guard} attribute)
    gets a L{LoginGuard} for its connection.
    """

    noisy = False

    def __init__(self, route, logins=None):
        self.route = route
        self.codec = route.codec
        self.share = None
        self.tls = None
        self.logins = logins

    def client_limit(self):
        """The connections this process may hold for the pool: None when unlimited."""
        limit = self.route.config.client_connections
        if not limit:
            return None
        if self.share is not None:
            slot, workers = self.share
            limit = limit // workers + (1 if slot < limit % workers else 0)
        return limit

    def buildProtocol(self, addr):
        route = self.route
        limit = self.client_limit()
        if limit is not None and len(route.clients) >= limit:
            log.warn("pool {pool}: client_connections limit {limit} reached", pool=route.name, limit=limit)
            return None
        client = self._client(route)
        route.clients.add(client)
        route.stats.clients_accepted += 1
        if self.tls is not None:
            return self.tls.wrap(client)
        return client

    def adopt(self):
        """
        A client handed over by another worker: no limit check (it is connected
        already) and not counted as accepted again (its first worker did).
        """
        route = self.route
        client = self._client(route)
        route.clients.add(client)
        return client

    def _client(self, route) -> ClientConnection:
        client = ClientConnection(route, self._parser(route))
        parser = client.parser
        if self.logins is not None and hasattr(parser, "login_guard"):
            parser.login_guard = LoginGuard(self.logins, client, route.stats)
        return client

    def _parser(self, route):
        """A request parser for a new client: the route's own when it has one (a front with users)."""
        make = getattr(route, "request_parser", None)
        if make is not None:
            return make(self.codec)
        return self.codec.request_parser(route.config)

    @property
    def pool(self):
        return self.route

    def switch_pool(self, route) -> None:
        """New connections go to C{route} from now on (a reload)."""
        self.route = route
        self.codec = route.codec
