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
the counters, histograms or slow log users read.

Nothing here runs per request once the process serves.
"""

from __future__ import annotations

import gc
import sys
import time

from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from twistedproxy.core.client import ProxyFactory
from twistedproxy.stats.recorder import PoolStats

PYPY = sys.implementation.name == "pypy"

# Rounds of the sample traffic (every conversation's reads once, per pool).  On
# PyPy, measured on the sample traffic (bench/README.md, "Warm-up"): after this
# many the JIT compiles next to nothing new.  On CPython the specialising
# interpreter settles after a few executions; a few dozen rounds also take the
# first-call costs (lazy imports, caches, allocator arenas) off the first clients.
ROUNDS = 2000 if PYPY else 50

# The most seconds C{warmup: auto} spends: a worker that replaces a crashed one
# keeps the connections queued on its socket waiting meanwhile.
AUTO_SECONDS = 0.75

_DONE = Failure(ConnectionDone("warm-up over"))


class WarmupReport:
    """What a warm-up did: C{seconds} spent, C{rounds} run, C{requests} (frames) the fake backends answered."""

    def __init__(self, seconds: float = 0.0, rounds: int = 0, requests: int = 0):
        self.seconds = seconds
        self.rounds = rounds
        self.requests = requests

    def __repr__(self) -> str:
        return "<WarmupReport %.3fs, %d rounds, %d requests>" % (self.seconds, self.rounds, self.requests)


class _Backend(StringTransport):
    """The in-memory transport of one throwaway backend connection."""

    def __init__(self, connection, answers: dict):
        StringTransport.__init__(self)
        self.connection = connection
        self.answers = answers  # codec -> answer(frame)

    def answer(self) -> None:
        """Answer every request written and not answered yet, in one read."""
        self.clear()
        conn = self.connection
        if conn.inflight:
            answer = self.answers[conn.codec]
            conn.dataReceived(b"".join([answer(request.frame) for request in conn.inflight]))


class _Rig:
    """One pool's throwaway copy: its pool, clients and backends, on a frozen clock."""

    def __init__(self, pool_config, build_pool):
        self.clock = clock = MemoryReactorClock()
        self.pool = pool = build_pool(pool_config, clock, PoolStats(pool_config.name))
        factory = ProxyFactory(pool)
        self.answers = {}  # codec -> answer(frame), learnt as each client's parser picks its codec
        self.conversations = []
        self.backends = []
        self.connecting = 0  # connection attempts seen in the clock so far
        self.requests = 0
        for reads, answer in pool.codec.warmup_samples(pool_config):
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
            backend = _Backend(conn, self.answers)
            conn.makeConnection(backend)
            self.backends.append(backend)
        self.connecting = len(attempts)

    def close(self) -> None:
        for client, _, _ in self.conversations:
            client.connectionLost(_DONE)
        self.pool.stop()


def seconds_for(setting) -> float:
    """The most seconds a warm-up may take for C{global: warmup} (C{"auto"} or seconds); 0: none."""
    return AUTO_SECONDS if setting == "auto" else float(setting)


def warm_up(pool_configs, build_pool, seconds: float = AUTO_SECONDS, rounds: int = ROUNDS,
            timer=time.monotonic) -> WarmupReport:
    """
    Run the sample traffic of every pool in C{pool_configs} through throwaway
    copies of them, C{rounds} times or for C{seconds}, whichever ends first
    (pools take turns, so each gets its share of a cut-short warm-up).
    C{build_pool(pool_config, reactor, stats)} builds a pool as the proxy does.
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
        rigs = None
        gc.collect()  # the warm-up's garbage goes now, not in the first seconds of serving
    return WarmupReport(timer() - started, done, requests)
