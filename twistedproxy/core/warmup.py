"""
Warming the request path up before a process serves.

PyPy compiles a code path only once it has run it often (a loop after 1039
iterations, a function after 1619 calls, a side exit after 200), and each
compilation takes milliseconds: a process that serves cold makes its first
clients wait for the JIT, at the worst percentiles for seconds.  L{warm_up}
runs the request path of every pool of a configuration first: throwaway pools
built from the same pool configurations (so the same hash function,
distribution, servers and codecs), clients and backend connections on
in-memory transports (C{twisted.internet.testing}) and a clock that never
moves, and a fake backend that answers every frame with the codec's sample
answer (L{twistedproxy.protocols.interface.ICodec.warmup_samples}).  So the
whole walk runs, client C{dataReceived} -> request parser -> placement ->
backend connection write -> reply parser -> completion -> client write,
including statistics recording, without a byte reaching a real backend or
client: the throwaway pools record into statistics of their own, never into
the counters, histograms or slow log users read.  Then the same traffic runs
through the real reactor over loopback sockets (throwaway clients and fake
backends listening on 127.0.0.1, port 0), so that Twisted's reads and writes
and the reactor loop compile with the proxy's code inside.  Last, single
requests go over loopback sockets to a throwaway pool from clients and backends
that a thread plays, off the reactor: the reactor then sees only the proxy's
own sockets, as when it serves, in the shapes of real traffic the closed-loop
rounds never make (a poll with one event or a few, a reply arriving in two
reads or after a pause, a reactor with no timer pending), and now and then a
client of one request that connects and leaves, so that accepting, a
connection's first request and its close are compiled too.  On PyPy most of
what the JIT still compiled in the first second of real traffic was bridges
for exactly these (bench/README.md, "Ready means warm").  While it warms up,
PyPy compiles a side exit after 20 failures instead of 200 (L{_trace_eagerness}),
and its throwaway clients are built as the proxy builds its own (L{_factory}), so
that what it compiles fits the objects the process then serves; the loopback
rounds' fake backends and clients set their transports up as the proxy's own
client and backend connections do, for the same reason (the reactor's code
serves both, and PyPy's guards check a transport's attributes).

Nothing here runs per request once the process serves.
"""

from __future__ import annotations

import gc
import os
import select
import socket
import sys
import threading
import time
from dataclasses import replace

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger
from twisted.python.failure import Failure

from twistedproxy.config.model import ServerSpec
from twistedproxy.core.client import ProxyFactory
from twistedproxy.core.jit import mark_again
from twistedproxy.core.logins import LocalAuthLimiter
from twistedproxy.core.transports import set_up_accepted, set_up_connected
from twistedproxy.stats.recorder import PoolStats

log = Logger()

PYPY = sys.implementation.name == "pypy"

# Rounds of the sample traffic (every conversation's reads once, per pool).  On
# PyPy, measured on the sample traffic (bench/README.md, "Ready means warm"): after this
# many the JIT compiles next to nothing new.  On CPython the specialising
# interpreter settles after a few executions; a few dozen rounds also take the
# first-call costs (lazy imports, caches, allocator arenas) off the first clients.
ROUNDS = 2000 if PYPY else 50

# Rounds over loopback sockets through the reactor, after the in-memory ones:
# enough for PyPy to compile the reactor loop and Twisted's reads and writes
# (loops after 1039 iterations) with the proxy's code inside.
LIVE_ROUNDS = 1500 if PYPY else 20

# Clients that send one request at a time, per conversation, in the loopback
# rounds: a reactor turn then reads several sockets, as under real traffic.
SINGLE_CLIENTS = 8

# The in-memory rounds take at most this share of the time, the loopback rounds end by
# the second one, the single requests take the rest.
MEMORY_SHARE = 0.5
LIVE_SHARE = 0.75

# Single requests the thread-played clients send last (L{_Sparse}), in all: on PyPy
# enough for each guard of a new shape to fail the 200 times that compile its bridge.
# CPython compiles nothing for a new shape: it skips them (they cost it 0.1 s of start).
SPARSE_REQUESTS = 4000 if PYPY else 0
SPARSE_CLIENTS = 20  # connections they take turns on (bench/warmup.py's load: 20)
# How many requests go out at once, in turn: mostly one (a poll with one event), some more.
SPARSE_BURSTS = (1, 1, 2, 1, 1, 3, 1, 1, 5, 1, 2, 1, 1, 8, 1, 4)
SPARSE_STALL = 0.5  # seconds without a byte from the proxy that end the phase (a failure)
# Every this many bursts, one more request comes from a new connection that closes once
# answered (a client of one request), so that accepting a client, its first request (the
# codec sniffed, the transport set up) and its close are compiled too: without it, the 20
# connections of a fresh benchmark's first 20 ms took ~0.2 ms each in the interpreter
# (bench/README.md, "Measured in the ninth #10 session").  Mixed in all along, not first:
# what the phase ends with is what the process then serves like.
SPARSE_NEW_CLIENT_EVERY = 4
PAUSE = 0.0001  # seconds: long enough for the reactor to finish its turn and wait in its poll
# The loopback rounds' deadline check runs this often (a timer that is not re-armed once they
# are over: the reactor is left with no timer pending, as in a process that serves).
TICK = 0.05

LOOPBACK = "127.0.0.1"

# The most seconds C{warmup: auto} spends at start, in a reload's new workers
# and in an upgrade's (the old ones serve meanwhile) ...  The phases end as
# soon as their rounds are done, so this only bounds a slow or loaded
# machine's warm-up (on a 2-core VM, whole: 3-3.4 s for Redis, 3.4-5.1 s for
# memcached, whose samples are text, meta and binary).  A limit of 2 s there cut
# memcached's to a few per cent of its loopback rounds and single requests, and
# PyPy then compiled 36-48 loops and bridges in the first 20 s of traffic
# instead of 7-28 (bench/README.md, "Measured in the seventh #10 session").
AUTO_SECONDS = 6.0
AUTO_ENV = "TWISTEDPROXY_WARMUP_AUTO"  # seconds that "auto" means instead, if set
# ... and in a worker that replaces a crashed one: connections queued on its
# socket wait for it, and the wait (process start, imports, configuration and
# this) must stay under a second (bench/warmup.py crash measures it).
REPLACING_SECONDS = 0.1

_DONE = Failure(ConnectionDone("warm-up over"))

# PyPy compiles a bridge for a side exit once its guard failed C{trace_eagerness}
# times: this many during a warm-up, PyPy's default once serving (L{_trace_eagerness}).
WARMUP_EAGERNESS = 20
SERVING_EAGERNESS = 200


def _trace_eagerness(value: int) -> None:
    """
    Set PyPy's C{trace_eagerness} (nothing on CPython).  During the warm-up it
    is L{WARMUP_EAGERNESS}: a shape of traffic the warm-up makes a few dozen
    times (a poll with some events, a reply in two reads) then gets its bridge
    compiled before the process serves, not in its first seconds of traffic
    (bench/README.md, "Ready means warm").  Once serving it is PyPy's default
    again, so rare paths go on running in the interpreter instead of being compiled.
    PyPy cannot tell what it was before: a PyPy started with C{--jit
    trace_eagerness=N} serves with the default, not N, after a warm-up.
    """
    if PYPY:
        import pypyjit

        pypyjit.set_param(trace_eagerness=value)


class WarmupReport:
    """
    What a warm-up did: C{seconds} spent, C{rounds} run in memory, C{requests}
    (frames) the in-memory backends answered, C{live_rounds} run over loopback.
    """

    def __init__(self, seconds: float = 0.0, rounds: int = 0, requests: int = 0, live_rounds: int = 0,
                 sparse: int = 0):
        self.seconds = seconds
        self.rounds = rounds
        self.requests = requests
        self.live_rounds = live_rounds
        self.sparse = sparse  # single requests the thread-played clients got answered

    def describe(self) -> str:
        """
        What the log says: C{warmed up in 1.40 s (2000 rounds in memory, 1500 over
        loopback, 4000 single requests)}.
        """
        return "warmed up in %.2f s (%d rounds in memory, %d over loopback, %d single requests)" % (
            self.seconds, self.rounds, self.live_rounds, self.sparse)

    def __repr__(self) -> str:
        return "<WarmupReport %.3fs, %d rounds, %d requests, %d live rounds, %d single requests>" % (
            self.seconds, self.rounds, self.requests, self.live_rounds, self.sparse)


class _Backend(StringTransport):
    """The in-memory transport of one throwaway backend connection."""

    def __init__(self, connection, answers: dict, frames=None):
        StringTransport.__init__(self)
        self.connection = connection
        self.answers = answers  # codec -> answer(frame)
        self.frames = frames  # None, or a dict to note each frame written and its answer in

    def answer(self) -> None:
        """Answer every request written and not answered yet, in one read."""
        self.clear()
        conn = self.connection
        if conn.inflight:
            answer = self.answers[conn.codec]
            replies = [answer(request.frame) for request in conn.inflight]
            if self.frames is not None:
                self.frames.update(zip([request.frame for request in conn.inflight], replies))
            conn.dataReceived(b"".join(replies))


class _Rig:
    """One pool's throwaway copy: its pool, clients and backends, on a frozen clock."""

    def __init__(self, pool_config, build_pool, first_reads_only: bool = False):
        self.clock = clock = MemoryReactorClock()
        # The samples are what clients send once logged in: the copy asks for no login.
        pool_config = replace(pool_config, users=())
        self.pool = pool = build_pool(pool_config, clock, PoolStats(pool_config.name))
        factory = _factory(pool, clock)
        self.answers = {}  # codec -> answer(frame), learnt as each client's parser picks its codec
        self.conversations = []
        self.backends = []
        self.connecting = 0  # connection attempts seen in the clock so far
        self.first_reads_only = first_reads_only
        self.frames = {}  # with first_reads_only: each frame a backend got -> its answer
        for reads, answer in pool.codec.warmup_samples(pool_config):
            if first_reads_only:
                reads = reads[:1]
            client = factory.buildProtocol(None)
            client.makeConnection(StringTransport())
            self.conversations.append((client, reads, answer))

    def round(self) -> None:
        """Every conversation's reads once, with the backends' answers."""
        clock = self.clock
        for client, reads, answer in self.conversations:
            client.transport.clear()  # the last round's replies
            for data in reads:
                client.dataReceived(data)
            self.answers[client.parser.codec] = answer
        self._connect()
        clock.advance(0)  # the end of the reactor turn: backend writes
        for backend in self.backends:
            backend.answer()
        clock.advance(0)  # client writes

    def _connect(self) -> None:
        """Connect the backend connections the pool asked for since the last round."""
        clock = self.clock
        attempts = clock.tcpClients + clock.unixClients
        for attempt in attempts[self.connecting:]:
            factory = attempt[2]
            conn = factory.buildProtocol(None)
            backend = _Backend(conn, self.answers, self.frames if self.first_reads_only else None)
            conn.makeConnection(backend)
            self.backends.append(backend)
        self.connecting = len(attempts)

    def close(self) -> None:
        for client, _, _ in self.conversations:
            client.connectionLost(_DONE)
        self.pool.stop()


def seconds_for(setting, replacing: bool = False) -> float:
    """
    The most seconds a warm-up may take for C{global: warmup} (C{"auto"} or
    seconds; 0: none); C{replacing}: for a worker that replaces a crashed one.
    """
    if setting != "auto":
        return float(setting)
    if replacing:
        return REPLACING_SECONDS
    # The environment may say what "auto" means: the test suite shortens it,
    # since it starts hundreds of proxies and warms none of them up for speed.
    return float(os.environ.get(AUTO_ENV) or AUTO_SECONDS)


def warm_up_in_memory(pool_configs, build_pool, seconds: float = AUTO_SECONDS, rounds: int = ROUNDS,
                      timer=time.monotonic) -> WarmupReport:
    """
    Run the sample traffic of every pool in C{pool_configs} through throwaway
    in-memory copies of them, C{rounds} times or for C{seconds}, whichever
    ends first (pools take turns, so each gets its share of a cut-short
    warm-up).  C{build_pool(pool_config, reactor, stats)} builds a pool as the
    proxy does.
    """
    started = timer()
    deadline = started + seconds
    rigs = [_Rig(pool_config, build_pool) for pool_config in pool_configs]
    done = 0
    try:
        while done < rounds and rigs:
            for rig in rigs:
                rig.round()
            done += 1
            if timer() >= deadline:
                break
    finally:
        requests = 0
        for rig in rigs:
            rig.close()
            requests += sum(stats.requests for stats in rig.pool.stats.servers.values())
    return WarmupReport(timer() - started, done, requests)


def warm_up(reactor, pool_configs, build_pool, seconds: float = AUTO_SECONDS, timer=time.monotonic) -> Deferred:
    """
    Warm the request path of C{pool_configs} up, for at most C{seconds}: the
    in-memory rounds (L{warm_up_in_memory}, at most L{MEMORY_SHARE} of the
    time), then L{LIVE_ROUNDS} rounds through C{reactor} over loopback
    sockets, which also compile the reactor's and Twisted's own part of the
    walk (until L{LIVE_SHARE} of the time at most), then L{SPARSE_REQUESTS}
    single requests from clients and backends that a thread plays
    (L{_Sparse}; the rest of the time).  A Deferred fires
    with the L{WarmupReport} once done; a failure over loopback is logged and
    ends the warm-up, never the process.
    """
    started = timer()
    _trace_eagerness(WARMUP_EAGERNESS)
    try:
        report = warm_up_in_memory(pool_configs, build_pool, seconds * MEMORY_SHARE, ROUNDS, timer)
    except BaseException:
        _trace_eagerness(SERVING_EAGERNESS)
        raise
    deadline = started + seconds
    live_deadline = started + seconds * LIVE_SHARE
    result = Deferred()
    lives = []
    ended = []  # not empty once the loopback rounds are over
    sparse = []
    left = [len(pool_configs)]

    def end_lives():
        if lives and not ended:  # once: their listeners stop listening once
            ended.append(True)
            report.live_rounds = min([live.close() for live in lives])

    def finish():
        if result.called:
            return
        end_lives()
        for phase in sparse:
            report.sparse = phase.close()
        _trace_eagerness(SERVING_EAGERNESS)
        gc.collect()  # the warm-up's garbage goes now, not in the first seconds of serving
        mark_again()
        report.seconds = timer() - started
        result.callback(report)

    def pool_done():
        left[0] -= 1
        if left[0]:
            return
        end_lives()
        if not SPARSE_REQUESTS:
            finish()
            return
        mark_again()
        try:
            sparse.append(_Sparse(reactor, lives, build_pool, SPARSE_REQUESTS, deadline, timer, finish))
        except Exception:
            log.failure("warm-up with single requests over loopback sockets failed; serving anyway")
            finish()

    def tick():
        # The loopback rounds' deadline.  Not re-armed once they are over: the single
        # requests run with no timer pending (their thread keeps the deadline).
        if result.called or sparse:
            return
        mark_again()  # a mark PyPy dropped meanwhile is back before much more is traced
        if timer() >= live_deadline:
            left[0] = 1
            pool_done()
        else:
            reactor.callLater(TICK, tick)

    if timer() >= deadline or not pool_configs:
        finish()
        return result
    reactor.callLater(TICK, tick)
    mark_again()
    try:
        for pool_config in pool_configs:
            lives.append(_Live(reactor, pool_config, build_pool, LIVE_ROUNDS, pool_done))
    except Exception:
        log.failure("warm-up over loopback sockets failed; serving anyway")
        finish()
    return result


# -- the same traffic through the reactor and loopback sockets -------------------------------------


class _FakeBackend(Protocol):
    """
    A throwaway backend on a loopback socket: answers each frame the warm-up
    pool's connection wrote, once all its bytes are in.  It finds the frames
    in that connection's in-flight queue (same process), so it parses nothing.
    """

    def __init__(self, live):
        self.live = live
        self.conn = None  # the pool's ServerConnection at the other end
        self.last = None  # the last request answered
        self.buffered = 0
        self.write = None

    def connectionMade(self):
        # Its transport is set up as a proxy's client's is (a producer, fast
        # reads, immediate writes): the reactor's code that serves both then
        # meets one shape of transport while warming up, the one it meets
        # once serving, and PyPy compiles no branch for the other.
        self.write = set_up_accepted(self.transport, self)

    def pauseProducing(self):
        pass  # a throwaway backend's replies are few: Twisted buffers them

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass

    def dataReceived(self, data):
        self.buffered += len(data)
        conn = self.conn
        if conn is None:
            conn = self.conn = self.live.connection_to(self.transport.getPeer().port)
            if conn is None:  # closed already: the warm-up is over
                self.transport.loseConnection()
                return
        inflight = conn.inflight
        start = 0
        last = self.last
        if last is not None:
            # Answered requests leave the queue in order: those after the last answered wait.
            for index, request in enumerate(inflight):
                if request is last:
                    start = index + 1
                    break
        answer = self.live.answers[conn.codec]
        out = []
        for index in range(start, len(inflight)):
            request = inflight[index]
            size = len(request.frame)
            if size > self.buffered:
                break
            self.buffered -= size
            out.append(answer(request.frame))
            self.last = request
        if out:
            self.write(b"".join(out))


class _FakeClient(Protocol):
    """A throwaway client: sends its conversation's reads, again once all their replies are in."""

    def __init__(self, live, reads, size):
        self.live = live
        self.reads = reads
        self.size = size  # bytes of replies to one round of the reads
        self.received = 0
        self.rounds = 0
        self.write = None

    def connectionMade(self):
        # Set up as a proxy's backend connection is (see _FakeBackend.connectionMade).
        self.write = set_up_connected(self.transport)
        self.transport.setTcpNoDelay(True)
        self._send()

    def _send(self):
        for data in self.reads:
            self.write(data)

    def dataReceived(self, data):
        self.received += len(data)
        if self.received >= self.size:
            self.received -= self.size
            self.rounds += 1
            self.live.answered()
            if self.rounds < self.live.rounds and not self.live.finished:
                self._send()


class _Factory(ClientFactory):
    """Builds with C{build()}; its ports log as "warm-up starting on PORT"."""

    noisy = False

    def __init__(self, build):
        self.build = build

    def buildProtocol(self, addr):
        return self.build()

    def logPrefix(self):
        return "warm-up"


def _factory(pool, reactor) -> ProxyFactory:
    """
    The client factory of a throwaway pool, built as the proxy builds its own: with a
    limiter of failed logins, so each client's parser gets its login guard.  On PyPy
    the parsers then have the layout (map) they have when serving; without it every
    request of the first seconds failed a map guard the warm-up compiled.  The
    limiter is a throwaway too (limit 0: it counts, never blocks, and nobody reads it).
    """
    return ProxyFactory(pool, LocalAuthLimiter(reactor, 0))


def _served_copy(reactor, pool_config, build_pool, backend_ports, **changes):
    """
    A throwaway copy of C{pool_config}'s pool, with C{changes}, over fake
    backends at C{backend_ports} on loopback (one per configured server, of the
    same weight), and the loopback listener that serves it through C{reactor}.
    The copy records into statistics of its own, connects only when a request
    needs it, never ejects a server and takes any number of clients.
    """
    # Named so that a log line of theirs, should there be one, says what they are.
    specs = tuple(ServerSpec(LOOPBACK, port, spec.weight, "warm-up " + spec.label)
                  for spec, port in zip(pool_config.servers, backend_ports))
    config = replace(pool_config, servers=specs, preconnect=False, auto_eject_hosts=False,
                     client_connections=0, **changes)
    pool = build_pool(config, reactor, PoolStats(pool_config.name))
    accept = _factory(pool, reactor).buildProtocol
    return pool, reactor.listenTCP(0, _Factory(lambda: accept(None)), interface=LOOPBACK)


class _Live:
    """One pool's throwaway copy served over loopback sockets by the real reactor."""

    def __init__(self, reactor, pool_config, build_pool, rounds, done):
        self.reactor = reactor
        self.rounds = rounds
        self.done = done
        self.finished = False
        # One in-memory round: which codec each conversation speaks, and how many reply
        # bytes it gets; the same for the conversations' first reads alone (one request:
        # that is what most clients send), which L{SINGLE_CLIENTS} clients each repeat.
        self.pool_config = pool_config
        self.answers = {}
        samples = []
        for first_only, copies in ((False, 1), (True, SINGLE_CLIENTS)):
            rig = _Rig(pool_config, build_pool, first_only)
            rig.round()
            self.answers.update(rig.answers)
            for client, reads, _ in rig.conversations:
                samples.extend([(reads, len(client.transport.value()))] * copies)
            rig.close()
        # For L{_Sparse}: the single requests with the bytes of their replies, and the
        # frames the backends got for them with their answers.
        self.singles = [(b"".join(reads), len(client.transport.value()))
                        for client, reads, _ in rig.conversations if client.transport.value()]
        self.frames = rig.frames
        self.clients = len(samples)
        self.pending = self.clients * rounds
        self.ports = [reactor.listenTCP(0, _Factory(lambda: _FakeBackend(self)), interface=LOOPBACK)
                      for _ in pool_config.servers]
        # One connection per server, no timeout (a compilation may take longer).
        self.pool, listener = _served_copy(reactor, pool_config, build_pool,
                                           [port.getHost().port for port in self.ports],
                                           server_connections=1, timeout=None)
        self.ports.append(listener)
        self.connections = []
        for reads, size in samples:
            factory = _Factory(lambda reads=reads, size=size: self._client(reads, size))
            reactor.connectTCP(LOOPBACK, listener.getHost().port, factory)

    def _client(self, reads, size):
        client = _FakeClient(self, reads, size)
        self.connections.append(client)
        return client

    def connection_to(self, port: int):
        """The pool's backend connection whose local port is C{port} (None if there is none)."""
        for server in self.pool.servers:
            for conns in server.connections.values():
                for conn in conns:
                    if conn.transport is not None and conn.transport.getHost().port == port:
                        return conn
        return None

    def answered(self) -> None:
        self.pending -= 1
        if self.pending == 0:
            self.done()

    def close(self) -> int:
        """Close everything; the rounds the clients completed."""
        self.finished = True
        for client in self.connections:
            client.transport.loseConnection()
        # Backend connections close once answered: a cut-short round fails nothing (and logs
        # nothing).  The listeners close now, before the process serves: their ports were
        # free ones, so a configured server that is down may have the same number, and
        # the real pools must never reach a fake backend there.
        self.pool.retire()
        for port in self.ports:
            port.stopListening()
        return sum(client.rounds for client in self.connections) // max(self.clients, 1)


# -- single requests from a thread: the shapes of real traffic -------------------------------------


class _Sparse:
    """
    Single requests to throwaway pools over loopback sockets, from clients and
    backends that a thread plays (L{_play}), so that the reactor sees only the
    pools' sockets, as when it serves: mostly one request at a time taking
    turns over L{SPARSE_CLIENTS} connections, some at once (a poll with several
    events), and backends that answer sometimes at once, sometimes after a
    pause, sometimes in two parts (two reads); every L{SPARSE_NEW_CLIENT_EVERY}
    bursts one request more, from a new connection that closes once answered.
    The thread ends the phase after C{requests} answers, at C{deadline} or once
    the proxy stays silent for L{SPARSE_STALL} seconds, and connects to C{done}
    (L{_Over}).
    """

    def __init__(self, reactor, lives, build_pool, requests, deadline, timer, done):
        self.reactor = reactor
        self.requests = requests
        self.deadline = deadline
        self.timer = timer
        self.done = done
        self.answered = 0
        self.stopped = False
        self.ended = "done"  # or why the thread ended the phase early
        self.ports = []
        self.pools = []
        self.backends = []  # (listening socket, frame -> answer)
        self.targets = []  # (proxy port, [(request, reply size)])
        try:
            for live in lives:
                if not live.singles:
                    continue
                backend_ports = []
                for _ in live.pool_config.servers:
                    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    self.backends.append((sock, live.frames))
                    sock.bind((LOOPBACK, 0))
                    sock.listen(64)
                    backend_ports.append(sock.getsockname()[1])
                timeout = live.pool_config.timeout
                pool, port = _served_copy(reactor, live.pool_config, build_pool, backend_ports, users=(),
                                          timeout=max(timeout, 1000) if timeout else timeout)
                self.pools.append(pool)
                self.ports.append(port)
                self.targets.append((port.getHost().port, live.singles))
        except Exception:
            self.close()
            raise
        if not self.targets:
            self.close()
            reactor.callLater(0, done)
            return
        # The thread connects here when it is over.
        port = reactor.listenTCP(0, _Factory(lambda: _Over(done)), interface=LOOPBACK)
        self.ports.append(port)
        self.over = port.getHost().port
        self.thread = threading.Thread(target=self._play, name="warm-up clients and backends", daemon=True)
        self.thread.start()

    def _play(self) -> None:
        """The thread: clients and backends on blocking sockets and their own epoll."""
        poller = select.epoll()
        socks = {}  # fd -> (socket, role, frame -> answer or None, [buffered bytes])
        try:
            for sock, frames in self.backends:
                socks[sock.fileno()] = (sock, "listen", frames, None)
                poller.register(sock.fileno(), select.EPOLLIN)

            def client(port: int):
                """A client connected to the proxy's C{port}, watched by the poller."""
                sock = socket.create_connection((LOOPBACK, port), timeout=SPARSE_STALL)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                socks[sock.fileno()] = (sock, "client", None, None)
                poller.register(sock.fileno(), select.EPOLLIN)
                return sock

            clients = []
            for index in range(SPARSE_CLIENTS):
                port, singles = self.targets[index % len(self.targets)]
                sock = client(port)
                # Each client its own of the requests (a connection speaks one protocol:
                # memcached's text or binary), or its share of them when there are more.
                mine = index // len(self.targets)
                clients.append((sock, singles[mine % len(singles)::SPARSE_CLIENTS] or singles[:1]))
            turn = 0
            answers = 0  # backend answers sent, whose number picks how the next goes out
            burst = 0

            def replies(waiting: int) -> bool:
                """Serve the backends until the clients got C{waiting} reply bytes (False: the phase ends)."""
                nonlocal answers
                while waiting > 0:
                    events = poller.poll(SPARSE_STALL)
                    if not events or self.stopped:
                        self.ended = "no reply within %s s" % (SPARSE_STALL,) if not events else "stopped"
                        return False
                    for fd, _ in events:
                        sock, role, frames, buffered = socks[fd]
                        if role == "listen":
                            conn, _ = sock.accept()
                            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                            socks[conn.fileno()] = (conn, "backend", frames, [b""])
                            poller.register(conn.fileno(), select.EPOLLIN)
                            continue
                        data = sock.recv(65536)
                        if not data:
                            self.ended = "the proxy closed a connection"  # not the traffic planned
                            return False
                        if role == "client":
                            waiting -= len(data)
                            continue
                        buffered[0] += data
                        reply = _answer(buffered, frames)
                        if reply is None:
                            self.ended = "a frame no single request made: %r" % (buffered[0][:60],)
                            return False
                        if reply:
                            answers += 1
                            _send_reply(sock, reply, answers)
                return True

            while self.answered < self.requests and not self.stopped and self.timer() < self.deadline:
                waiting = 0  # reply bytes the clients wait for
                for _ in range(SPARSE_BURSTS[burst % len(SPARSE_BURSTS)]):
                    sock, singles = clients[turn % len(clients)]
                    request, size = singles[(turn // len(clients)) % len(singles)]
                    turn += 1
                    sock.sendall(request)
                    waiting += size
                    self.answered += 1
                burst += 1
                if not replies(waiting):
                    return
                if burst % SPARSE_NEW_CLIENT_EVERY == 0:
                    port, singles = self.targets[burst % len(self.targets)]
                    request, size = singles[burst % len(singles)]
                    sock = client(port)
                    sock.sendall(request)
                    self.answered += 1
                    answered = replies(size)
                    poller.unregister(sock.fileno())
                    del socks[sock.fileno()]
                    sock.close()
                    if not answered:
                        return
                if burst % 4 == 0:
                    time.sleep(PAUSE)  # the reactor waits in its poll, as between real requests
        except OSError as e:
            self.ended = "%s" % (e,)  # the proxy's side went away: the phase ends
        finally:
            for sock, _, _, _ in socks.values():
                sock.close()
            poller.close()
            # Tell the reactor by connecting to it (callFromThread would leave its thread-call
            # queue in a state the JIT then compiles bridges for, in the first seconds of serving).
            try:
                socket.create_connection((LOOPBACK, self.over), timeout=SPARSE_STALL).close()
            except OSError:
                pass  # closed already: the warm-up is over

    def close(self) -> int:
        """Stop the thread, close everything; the single requests sent."""
        self.stopped = True
        thread = getattr(self, "thread", None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(SPARSE_STALL * 2)
        for pool in self.pools:
            pool.retire()
        for port in self.ports:
            port.stopListening()
        for sock, _ in self.backends:
            sock.close()
        return self.answered


class _Over(Protocol):
    """The connection that says the single requests' thread is over: calls C{done}."""

    def __init__(self, done):
        self.done = done

    def connectionMade(self):
        self.transport.loseConnection()
        self.done()


def _answer(buffered: list, frames: dict):
    """
    The answers to the whole frames at the start of C{buffered[0]} (taken off
    it): b"" while a frame is incomplete, None for bytes no frame starts.
    """
    data = buffered[0]
    out = []
    while data:
        for frame, answer in frames.items():
            if data.startswith(frame):
                out.append(answer)
                data = data[len(frame):]
                break
        else:
            if any(frame.startswith(data) for frame in frames):
                break  # the rest of a frame is still on its way
            return None
    buffered[0] = data
    return b"".join(out)


def _send_reply(sock, reply: bytes, count: int) -> None:
    """A backend's answer: at once, after a pause, or in two parts (two reads for the proxy)."""
    how = count % 3
    if how == 1:
        time.sleep(PAUSE)
    if how == 2 and len(reply) > 1:
        sock.sendall(reply[:len(reply) // 2])
        time.sleep(PAUSE)
        sock.sendall(reply[len(reply) // 2:])
    else:
        sock.sendall(reply)
