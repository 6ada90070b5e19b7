"""
Parser microbenchmark: the request and reply parsers of every protocol
(memcached text, memcached binary, Redis), fed pre-built set and get batches
in memory (no sockets, no reactor), timed per request.

    python bench/parsers.py                     # every case, default rounds
    python bench/parsers.py -k memcache         # only cases whose name holds "memcache"
    python bench/parsers.py --profile memcache.request.get.x16   # cProfile one case

Each case is run C{--rounds} times; the first rounds warm PyPy's JIT, and the
figure printed is the best of the rounds after the first, in microseconds per
request.  Request cases feed a batch of C{depth} requests to a long-lived
request parser, as C{ClientConnection.dataReceived} does; reply cases feed a
batch of replies and call C{next_reply(request)} once per request, as
C{ServerConnection.dataReceived} does.  "x16" is bench/run.py's pipeline depth,
"x1" its unpipelined load.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import time

# The repository root instead of bench/, whose profile.py would shadow the
# standard library's (cProfile imports it).
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from twistedproxy.config.loader import config_from_dict  # noqa: E402
from twistedproxy.protocols import memcache, redis  # noqa: E402

PIPELINE = 16
VALUE = b"xyz"
N_BATCHES = 64  # distinct batches cycled through, so keys vary as under real load


def _pool_config(redis_pool: bool):
    pool = {"listen": "127.0.0.1:1", "servers": ["127.0.0.1:2:1"]}
    if redis_pool:
        pool["redis"] = True
    return config_from_dict({"p": pool}).pools[0]


def _keys(depth: int):
    """N_BATCHES lists of C{depth} keys, shaped like redis-benchmark -r's and mcload's."""
    return [[b"key:%012d" % ((b * depth + i) * 7919 % 100000,) for i in range(depth)] for b in range(N_BATCHES)]


def _bulk(arg: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(arg), arg)


def _multibulk(*args) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(_bulk(a) for a in args)


def _binary(magic: int, opcode: int, key: bytes = b"", extras: bytes = b"", value: bytes = b"") -> bytes:
    """A memcached binary packet (request or response header, status/vbucket 0)."""
    body = len(extras) + len(key) + len(value)
    return struct.pack(">BBHBBHIIQ", magic, opcode, len(key), len(extras), 0, 0, body, 0, 0) + extras + key + value


# Per protocol and command: (request bytes for a key, the reply bytes to it).
_SHAPES = {
    ("binary", "get"): (lambda k: _binary(0x80, 0x00, k), lambda k: _binary(0x81, 0x00, extras=b"\0" * 4, value=VALUE)),
    ("binary", "set"): (lambda k: _binary(0x80, 0x01, k, b"\0" * 8, VALUE), lambda k: _binary(0x81, 0x01)),
    ("memcache", "get"): (lambda k: b"get " + k + b"\r\n", lambda k: b"VALUE " + k + b" 0 3\r\nxyz\r\nEND\r\n"),
    ("memcache", "set"): (lambda k: b"set " + k + b" 0 0 3\r\nxyz\r\n", lambda k: b"STORED\r\n"),
    ("redis", "get"): (lambda k: _multibulk(b"GET", k), lambda k: _bulk(VALUE)),
    ("redis", "set"): (lambda k: _multibulk(b"SET", k, VALUE), lambda k: b"+OK\r\n"),
}
# Per protocol: the codec whose request parser a client gets, the codec of the backend side.
_CODECS = {
    "memcache": (memcache.codec, memcache.text_codec),
    "binary": (memcache.codec, memcache.binary_codec),  # memcache's parser picks binary on the first byte
    "redis": (redis.codec, redis.codec),
}


def _request_case(protocol: str, command: str, depth: int):
    """A function(iterations) feeding request batches; returns the requests framed."""
    make, _ = _SHAPES[protocol, command]
    batches = [b"".join(make(k) for k in keys) for keys in _keys(depth)]
    parser = _CODECS[protocol][0].request_parser(_pool_config(protocol == "redis"))
    parser.feed(batches[0])  # memcache's parser settles on text or binary at the first read

    def run(iterations: int) -> int:
        feed = parser.feed
        n = 0
        for i in range(iterations):
            n += len(feed(batches[i % N_BATCHES]))
        return n

    return run


def _reply_case(protocol: str, command: str, depth: int):
    """A function(iterations) feeding reply batches and taking every reply out."""
    make_request, make_reply = _SHAPES[protocol, command]
    pool_config = _pool_config(protocol == "redis")
    codec, reply_codec = _CODECS[protocol]
    batches = []
    for keys in _keys(depth):
        requests = codec.request_parser(pool_config).feed(b"".join(make_request(k) for k in keys))
        assert len(requests) == depth, requests
        batches.append((b"".join(make_reply(k) for k in keys), requests))
    parser = reply_codec.reply_parser()

    def run(iterations: int) -> int:
        feed = parser.feed
        next_reply = parser.next_reply
        n = 0
        for i in range(iterations):
            data, requests = batches[i % N_BATCHES]
            feed(data)
            for request in requests:
                if next_reply(request) is None:
                    raise AssertionError("incomplete reply")
                n += 1
            if parser.buffered():
                raise AssertionError("unread reply bytes")
        return n

    return run


def cases():
    """(name, builder) for every case, in print order."""
    out = []
    for protocol in ("memcache", "binary", "redis"):
        for side, builder in (("request", _request_case), ("reply", _reply_case)):
            for depth in (PIPELINE, 1):
                for command in ("get", "set"):
                    name = "%s.%s.%s.x%d" % (protocol, side, command, depth)
                    out.append((name, lambda b=builder, p=protocol, c=command, d=depth: b(p, c, d)))
    return out


def _iterations(run, requests: int) -> int:
    """How many batches make about C{requests} requests (runs one batch to see)."""
    return max(1, requests // max(1, run(1)))


def measure(run, requests: int, rounds: int) -> float:
    """Best microseconds per request over the rounds after the first."""
    iterations = _iterations(run, requests)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        n = run(iterations)
        times.append((time.perf_counter() - start) / n * 1e6)
    return min(times[1:]) if len(times) > 1 else times[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="request/reply parser microbenchmark (us per request)")
    parser.add_argument("-k", dest="select", default="", help="only cases whose name contains this")
    parser.add_argument("-n", "--requests", type=int, default=200000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=6, help="rounds per case (the first is warm-up)")
    parser.add_argument("--profile", metavar="CASE", help="run one case under cProfile and print the top")
    args = parser.parse_args(argv)
    selected = [(name, build) for name, build in cases() if args.select in name]
    if args.profile:
        import cProfile
        import pstats

        builders = dict(cases())
        if args.profile not in builders:
            parser.error("no case %r; cases: %s" % (args.profile, " ".join(builders)))
        run = builders[args.profile]()
        profiler = cProfile.Profile()
        profiler.runcall(run, _iterations(run, args.requests))
        pstats.Stats(profiler).strip_dirs().sort_stats("tottime").print_stats(15)
        return 0
    impl = sys.implementation.name
    print("# %s %s, %d requests/round, best of %d rounds" % (impl, sys.version.split()[0], args.requests,
                                                              max(1, args.rounds - 1)))
    for name, build in selected:
        print("%-32s %7.3f us/req" % (name, measure(build(), args.requests, args.rounds)))
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
