"""
A small memcached text-protocol load generator, in Python: bench/run.py's
pipelined memcached load before bench/latgen.c's batch mode did the same in C
(C{bench/run.py --mc-pipelined-loader mcload} runs it again, for older figures).

Debian has no memcached load tool that pipelines (memaslap, memcslap send one
request per connection at a time), so this one does: C{--clients} connections,
each sending C{--pipeline} requests at once and waiting for all their replies
before the next batch, like C{redis-benchmark -P}.  Requests alternate C{set}
and C{get} on random keys (C{key:%012d} below C{--keyspace}, the shape of
C{redis-benchmark -r}); a request's latency is its batch's round trip, as
redis-benchmark counts it with C{-P}.

It needs only the standard library (one thread, C{selectors}), runs best on
PyPy, and prints one JSON object: requests, seconds, rps, p50_ms, p99_ms, errors.

    pypy3 bench/mcload.py --port 22122 -n 200000 -c 50 -P 16
"""

from __future__ import annotations

import argparse
import json
import random
import selectors
import socket
import sys
import time

VALUE = b"xyz"  # 3 bytes like redis-benchmark's default -d 3; contains no reply marker
# Every memcached text reply to set/get ends with one of these; none can appear in
# our keys or value, so counting them in complete lines counts replies.
_STORED = b"STORED\r\n"
_END = b"END\r\n"
_ERROR = b"ERROR"  # ERROR, CLIENT_ERROR and SERVER_ERROR
_PREBUILT = 4096  # batches made ahead per size and parity


def _batch(rand, keyspace: int, depth: int, parity: int) -> bytes:
    parts = []
    for i in range(depth):
        key = b"key:%012d" % (rand(keyspace),)
        if (i + parity) & 1:
            parts.append(b"get " + key + b"\r\n")
        else:
            parts.append(b"set " + key + b" 0 0 3\r\n" + VALUE + b"\r\n")
    return b"".join(parts)


class _Conn:
    __slots__ = ("sock", "pending", "outstanding", "batch", "sent_at", "remaining", "parity")

    def __init__(self, sock, remaining):
        self.sock = sock
        self.pending = b""
        self.outstanding = 0
        self.batch = 0
        self.sent_at = 0.0
        self.remaining = remaining
        self.parity = 0


def run(host: str, port: int, requests: int, clients: int, depth: int, keyspace: int,
        timeout: float) -> dict:
    """Send C{requests} requests over C{clients} connections; the measured result."""
    rand = random.Random(1).randrange
    sel = selectors.DefaultSelector()
    per_client = [requests // clients + (1 if i < requests % clients else 0) for i in range(clients)]
    conns = []
    for share in per_client:
        sock = socket.create_connection((host, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        conns.append(_Conn(sock, share))
    sizes = {depth, requests % depth or depth}
    sizes |= {share % depth for share in per_client if share % depth}
    batches = [{n: [_batch(rand, keyspace, n, parity) for _ in range(_PREBUILT)] for n in sizes}
               for parity in (0, 1)]
    latencies = []  # one entry per request, microseconds
    errors = 0
    done = 0
    now = time.perf_counter

    def send(conn):
        n = min(depth, conn.remaining)
        conn.remaining -= n
        conn.outstanding = conn.batch = n
        conn.parity ^= 1
        # Batches are made up front (random keys) so that making them costs nothing here.
        data = batches[conn.parity][n][rand(_PREBUILT)]
        conn.sent_at = now()
        # A batch is a few hundred bytes: the socket buffer takes it whole.
        conn.sock.send(data)

    start = now()
    deadline = start + timeout
    active = 0
    for conn in conns:
        if conn.remaining:
            send(conn)
            sel.register(conn.sock, selectors.EVENT_READ, conn)
            active += 1
    while active:
        events = sel.select(1.0)
        if now() > deadline:
            raise SystemExit("mcload: timed out after %ss with %d of %d replies" % (timeout, done, requests))
        for key, _ in events:
            conn = key.data
            try:
                chunk = conn.sock.recv(262144)
            except BlockingIOError:
                continue
            if not chunk:
                raise SystemExit("mcload: the server closed a connection after %d replies" % (done,))
            data = conn.pending + chunk
            cut = data.rfind(b"\n") + 1
            whole, conn.pending = data[:cut], data[cut:]
            if not whole:
                continue
            errs = whole.count(_ERROR)
            got = whole.count(_STORED) + whole.count(_END) + errs
            errors += errs
            conn.outstanding -= got
            if conn.outstanding <= 0:
                latencies.extend([(now() - conn.sent_at) * 1e6] * conn.batch)
                done += conn.batch
                if conn.remaining:
                    send(conn)
                else:
                    sel.unregister(conn.sock)
                    active -= 1
    elapsed = now() - start
    for conn in conns:
        conn.sock.close()
    latencies.sort()
    count = len(latencies)

    def pct(p):
        return latencies[min(count - 1, int(count * p))] / 1000.0 if count else 0.0

    return {
        "requests": done, "seconds": round(elapsed, 4), "rps": round(done / elapsed, 1),
        "p50_ms": round(pct(0.50), 3), "p99_ms": round(pct(0.99), 3), "errors": errors,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("-n", "--requests", type=int, default=200000)
    parser.add_argument("-c", "--clients", type=int, default=50)
    parser.add_argument("-P", "--pipeline", type=int, default=1)
    parser.add_argument("-r", "--keyspace", type=int, default=100000)
    parser.add_argument("--timeout", type=float, default=300.0, help="give up after this many seconds")
    args = parser.parse_args(argv)
    result = run(args.host, args.port, args.requests, args.clients, args.pipeline, args.keyspace, args.timeout)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
