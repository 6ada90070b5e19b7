"""
The core's own work per request, without sockets, the reactor or a load tool:
a pool built as the proxy builds it, its client and backend connections on
in-memory transports that drop what is written, fed pre-built request and
reply frames, one reactor turn per read as the real reactor runs it.

    PYTHONPATH=. .venv-cpython/bin/python bench/corepath.py --protocol redis
    PYTHONPATH=. .venv-pypy/bin/python bench/corepath.py --protocol memcache -P 16

It prints the CPU seconds per request (best of the rounds: the least disturbed by
other work on the machine) and, on PyPy, the minor collections per 100000
requests (C{gc.hooks}); what it measures is the code between the parser and
the write, which the system calls and the reactor of bench/run.py's figure
come on top of.  The load is bench/run.py's: SETs, then GETs of the same keys
(hits), over a key space of 100000 keys.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock

from twistedproxy.api import build_pool
from twistedproxy.config import config_from_dict
from twistedproxy.core.client import ProxyFactory

KEYSPACE = 100000
VALUE = b"x" * 3  # redis-benchmark's default payload


class Reactor(MemoryReactorClock):
    """A memory reactor with the proxy reactor's C{callAfterEvents}, run by L{turn}."""

    def __init__(self):
        super().__init__()
        self.after = []

    def callAfterEvents(self, f):
        self.after.append(f)

    def turn(self):
        # As the reactor runs them; the harness's own loops are written so as
        # not to add frames of PyPy's JIT to what is measured.
        after = self.after
        self.after = []
        if len(after) == 1:
            after[0]()
        else:
            for f in after:
                f()


class Sink:
    """A transport that drops what is written (the in-memory StringTransport keeps it)."""

    disconnecting = False

    def __init__(self):
        self.written = 0

    def write(self, data):
        self.written += 1

    def writeSequence(self, seq):
        self.written += 1

    def registerProducer(self, producer, streaming):
        pass

    def unregisterProducer(self):
        pass

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def loseConnection(self):
        pass

    def getPeer(self):
        return IPv4Address("TCP", "127.0.0.1", 50000)

    def getHost(self):
        return IPv4Address("TCP", "127.0.0.1", 22121)


def frames(protocol: str):
    """(set request, set reply, get request, get reply) makers for key number i."""
    if protocol == "redis":
        def set_(k):
            return b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$3\r\n%s\r\n" % (len(k), k, VALUE)

        def get(k):
            return b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(k), k)

        return set_, b"+OK\r\n", get, b"$3\r\n%s\r\n" % VALUE
    def mset(k):
        return b"set %s 0 0 3\r\n%s\r\n" % (k, VALUE)

    def mget(k):
        return b"get %s\r\n" % (k,)

    return mset, b"STORED\r\n", mget, b"VALUE key 0 3\r\n%s\r\nEND\r\n" % VALUE


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="the core's work per request, in memory")
    parser.add_argument("--protocol", choices=("redis", "memcache"), default="redis")
    parser.add_argument("-P", "--pipeline", type=int, default=1)
    parser.add_argument("-n", "--requests", type=int, default=200000, help="requests per round (SET+GET)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--keys", type=int, default=KEYSPACE, help="the key space (and the warm-up: 4 passes over it)")
    args = parser.parse_args(argv)
    keyspace = args.keys

    reactor = Reactor()
    pool = {"listen": "127.0.0.1:22121", "redis": args.protocol == "redis",
            "servers": ["127.0.0.1:7001:1", "127.0.0.1:7002:1"]}
    config = config_from_dict({"bench": pool})
    route = build_pool(config.pools[0], reactor)
    factory = ProxyFactory(route)
    client = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
    client.makeConnection(Sink())
    keys = [b"key:%012d" % i for i in range(keyspace)]
    depth = args.pipeline
    # Every backend connection made and connected before the load (the proxy's warm-up does the same).
    make_set, set_reply, make_get, get_reply = frames(args.protocol)
    client.parser.feed(make_get(b"probe"))  # a sniffing parser (memcached) picks its codec: dropped
    codec = client.parser.codec
    for server in route.servers:
        server.connection(codec)
    for attempt in reactor.tcpClients:
        backend = attempt[2].buildProtocol(IPv4Address("TCP", attempt[0], attempt[1]))
        backend.makeConnection(Sink())
    reactor.turn()
    servers = {}  # key -> its backend connection
    for key in keys:
        servers[key] = route.server_for(key).connection(codec)
    for conn in set(servers.values()):
        conn.inflight.clear()  # a handshake, if any: no replies will come
        conn.n_expired = 0

    def batches(make, reply):
        out = []
        for start in range(0, keyspace, depth):
            group = keys[start:start + depth]
            replies = {}
            for key in group:
                replies[servers[key]] = replies.get(servers[key], 0) + 1
            out.append((b"".join(make(k) for k in group), [(c, reply * n) for c, n in replies.items()]))
        return out

    loads = [batches(make_set, set_reply), batches(make_get, get_reply)]
    received = client.dataReceived
    turn = reactor.turn

    def run(count):
        done = 0
        while done < count:
            for batch in loads:
                for data, replies in batch:
                    received(data)
                    turn()
                    if len(replies) == 1:
                        replies[0][0].dataReceived(replies[0][1])
                    else:
                        for conn, raw in replies:
                            conn.dataReceived(raw)
                    turn()
                done += keyspace
        return done

    minor = [0]
    if hasattr(gc, "hooks"):
        def on_minor(stats):
            minor[0] += stats.count

        gc.hooks.on_gc_minor = on_minor
    run(keyspace * 4)  # warm-up (PyPy's JIT)
    best = None
    minors = []
    for _ in range(args.rounds):
        minor[0] = 0
        start = time.process_time()
        count = run(args.requests)
        elapsed = time.process_time() - start
        minors.append(minor[0] * 100000.0 / count)
        best = elapsed / count if best is None else min(best, elapsed / count)
    assert not client.queue and not client.closed, "the core lost requests"
    print("%s P=%d on %s: %.3f us/request (best of %d)%s" % (
        args.protocol, depth, sys.implementation.name, best * 1e6, args.rounds,
        "  minor/100k %s (nursery %s)" % (sorted(minors)[len(minors) // 2], os.environ.get("PYPY_GC_NURSERY", "default"))
        if hasattr(gc, "hooks") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
