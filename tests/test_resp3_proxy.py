"""
RESP3 clients end to end: the proxy as a real process in front of real
redis-server backends, driven by redis-py 8 with its defaults (it sends
C{HELLO 3}; CPython only: PyPy 3.9 has redis-py 7), C{redis-cli -3} and raw
frames, with the replies compared to a redis-server's own.
"""

from __future__ import annotations

import subprocess

import pytest
import redis

from tests.support import processes
from tests.support.processes import HOST
from tests.test_redis_proxy import cluster, raw  # noqa: F401 (cluster is a fixture)

pytestmark = pytest.mark.integration

REDIS_PY_8 = int(redis.__version__.split(".")[0]) >= 8
needs_redis_py_8 = pytest.mark.skipif(not REDIS_PY_8, reason="redis-py 8 needs Python 3.10+ (PyPy 3.9 has redis-py 7)")


def multibulk(*args) -> bytes:
    args = [a if isinstance(a, bytes) else str(a).encode() for a in args]
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def read_replies(sock, count: int) -> list:
    """C{count} whole replies from C{sock}, framed by the proxy's own reply parser."""
    from twistedproxy.protocols.redis import codec

    parser = codec.reply_parser()
    replies = []
    while len(replies) < count:
        reply = parser.next_reply(None)
        if reply is not None:
            replies.append(reply)
            continue
        data = sock.recv(65536)
        assert data, replies
        parser.feed(data)
    return replies


def exchange(port: int, stream: bytes, count: int) -> list:
    sock = raw(port)
    try:
        sock.sendall(stream)
        return read_replies(sock, count)
    finally:
        sock.close()


# Keys that spread over the backends, so multi-key commands are split and merged.  The
# pools place keys by modula: ketama's ring follows the backends' (free, random) ports, and
# on some ports it put all six keys of the check below on one server.
KEYS = ["%s:resp3" % c for c in "abcdefgh"]

# One RESP3 connection's commands, every reply type Redis 7 sends in RESP3.
COMMANDS = [
    ("SET", KEYS[0], "v0"),
    ("MSET", KEYS[1], "v1", KEYS[2], "v2", KEYS[3], "v3"),
    ("MGET", KEYS[0], KEYS[4], KEYS[1], KEYS[5], KEYS[2], KEYS[3]),  # nulls among values, split
    ("GET", KEYS[6]),  # null
    ("EXISTS", KEYS[0], KEYS[1], KEYS[4], KEYS[2]),
    ("HSET", "h{x}", "f1", "1", "f2", "2"),
    ("HGETALL", "h{x}"),  # map
    ("HGETALL", "nothing{x}"),  # empty map
    ("SADD", "s{x}", "a"),
    ("SMEMBERS", "s{x}"),  # set
    ("ZADD", "z{x}", "1.5", "m"),
    ("ZSCORE", "z{x}", "m"),  # double
    ("ZSCORE", "z{x}", "nobody"),  # null
    ("ZRANGE", "z{x}", "0", "-1", "WITHSCORES"),  # array of pairs with doubles
    ("INCRBYFLOAT", "f{x}", "0.25"),
    ("SET", "t{x}", "1"),
    ("EXPIRE", "t{x}", "100"),
    ("OBJECT", "ENCODING", "h{x}"),
    ("LPOS", "nolist{x}", "a"),  # null
    ("XADD", "st{x}", "1-1", "a", "1"),
    ("XINFO", "STREAM", "st{x}"),  # nested maps
    ("EVAL", "return redis.setresp(3) and {double=3.5}", "1", "k{x}"),  # a double from Lua
    ("EVAL", "redis.setresp(3); return {map={a=1}}", "1", "k{x}"),  # a map from Lua
    ("EVAL", "redis.setresp(3); return {set={a=true}}", "1", "k{x}"),  # a set from Lua
    ("EVAL", "redis.setresp(3); return true", "1", "k{x}"),  # a boolean from Lua
    ("EVAL", "redis.setresp(3); return {big_number='123456789012345678901234567890'}", "1", "k{x}"),
    ("EVAL", "redis.setresp(3); return {verbatim_string={format='txt', string='hi'}}", "1", "k{x}"),
    ("GET", "h{x}"),  # WRONGTYPE error
    ("PING",),
    ("ECHO", "hi"),
    ("DEL", KEYS[0], KEYS[1], KEYS[2], KEYS[3], KEYS[4], "h{x}", "s{x}", "z{x}", "f{x}", "t{x}", "st{x}"),
]


def _stream(commands) -> bytes:
    return b"".join(multibulk(*c) for c in commands)


def test_raw_resp3_replies_are_redis_own(cluster, spawn):
    """Every reply type, pipelined after HELLO 3, merged ones included: byte for byte what one redis-server sends."""
    c = cluster(3, distribution="modula")
    reference = spawn(processes.redis_server, None)
    stream = multibulk("HELLO", "3") + _stream(COMMANDS)
    through_proxy = exchange(c.port, stream, 1 + len(COMMANDS))
    direct = exchange(reference.port, stream, 1 + len(COMMANDS))
    assert through_proxy[0].startswith(b"%7\r\n$6\r\nserver\r\n$12\r\ntwistedproxy\r\n")
    assert b"$5\r\nproto\r\n:3\r\n" in through_proxy[0]
    assert direct[0].startswith(b"%7\r\n")
    assert through_proxy[1:] == direct[1:]
    mget = through_proxy[1 + COMMANDS.index(COMMANDS[2])]
    assert mget == b"*6\r\n$2\r\nv0\r\n_\r\n$2\r\nv1\r\n_\r\n$2\r\nv2\r\n$2\r\nv3\r\n"
    # The keys spread over the backends: MGET, MSET, EXISTS and DEL were split and merged.
    c.client().mset({key: "x" for key in KEYS[:6]})
    assert sum(1 for i in range(3) if c.direct(i).exists(*KEYS[:6])) > 1


def test_protocol_switches_within_one_pipeline(cluster):
    """Replies before a HELLO are in the old protocol, after it in the new one, both ways."""
    c = cluster(3)
    mget = multibulk("MGET", KEYS[0], KEYS[4], KEYS[1])
    stream = (
        multibulk("SET", KEYS[0], "a") + multibulk("SET", KEYS[1], "b")
        + mget + multibulk("GET", "missing") + multibulk("HGETALL", "nohash")
        + multibulk("HELLO", "3")
        + mget + multibulk("GET", "missing") + multibulk("HSET", "hh", "f", "v") + multibulk("HGETALL", "hh")
        + multibulk("HELLO")  # no version: the connection's own protocol
        + multibulk("HELLO", "2")
        + mget + multibulk("GET", "missing") + multibulk("HGETALL", "hh")
        + multibulk("HELLO", "4")  # refused: stays on RESP2
        + multibulk("GET", "missing")
    )
    replies = exchange(c.port, stream, 17)
    resp2_mget = b"*3\r\n$1\r\na\r\n$-1\r\n$1\r\nb\r\n"
    resp3_mget = b"*3\r\n$1\r\na\r\n_\r\n$1\r\nb\r\n"
    assert replies[:5] == [b"+OK\r\n", b"+OK\r\n", resp2_mget, b"$-1\r\n", b"*0\r\n"]
    assert replies[5].startswith(b"%7\r\n")
    assert replies[6:10] == [resp3_mget, b"_\r\n", b":1\r\n", b"%1\r\n$1\r\nf\r\n$1\r\nv\r\n"]
    assert replies[10].startswith(b"%7\r\n") and b":3\r\n" in replies[10]
    assert replies[11].startswith(b"*14\r\n") and b":2\r\n" in replies[11]
    assert replies[12:15] == [resp2_mget, b"$-1\r\n", b"*2\r\n$1\r\nf\r\n$1\r\nv\r\n"]
    assert replies[15].startswith(b"-NOPROTO ")
    assert replies[16:] == [b"$-1\r\n"]


def test_resp3_needs_auth_first(cluster):
    """HELLO 3 on a locked connection is refused and switches nothing; HELLO 3 AUTH logs in and switches."""
    c = cluster(1, redis_auth="secret")
    stream = (
        multibulk("HELLO", "3") + multibulk("GET", "x")
        + multibulk("HELLO", "3", "AUTH", "default", "wrong") + multibulk("GET", "x")
        + multibulk("HELLO", "3", "AUTH", "default", "secret") + multibulk("GET", "x")
    )
    replies = exchange(c.port, stream, 6)
    assert replies[0].startswith(b"-NOAUTH")
    assert replies[1].startswith(b"-NOAUTH")
    assert replies[2] == b"-ERR invalid password\r\n"
    assert replies[3].startswith(b"-NOAUTH")
    assert replies[4].startswith(b"%7\r\n")
    assert replies[5] == b"_\r\n"


def test_a_dead_backend_gives_resp3_clients_an_error(cluster):
    c = cluster(1)
    c.backends[0].stop()
    replies = exchange(c.port, multibulk("HELLO", "3") + multibulk("GET", "x") + multibulk("PING"), 3)
    assert replies[0].startswith(b"%7\r\n")
    assert replies[1].startswith(b"-ERR ")
    assert replies[2] == b"+PONG\r\n"


def _cli(port: int, *args):
    """What C{redis-cli -3} prints and exits with (7.0's cannot print a big number: it says so)."""
    done = subprocess.run(
        ["redis-cli", "-3", "-h", HOST, "-p", str(port)] + list(args),
        capture_output=True, text=True, timeout=30,
    )
    return done.stdout, done.stderr, done.returncode


def test_redis_cli_3(cluster, spawn):
    """redis-cli -3 prints the same through the proxy as from a redis-server of its own."""
    c = cluster(3, distribution="modula")
    reference = spawn(processes.redis_server, None)
    for command in COMMANDS:
        assert _cli(c.port, *command) == _cli(reference.port, *command), command
    assert "proto" in _cli(c.port, "HELLO", "3")[0]


@needs_redis_py_8
def test_redis_py_8_with_defaults(cluster):
    """redis-py 8 sends HELLO 3 unless told otherwise: every call works and gets RESP3 types."""
    c = cluster(3)
    client = redis.Redis(host=HOST, port=c.port, socket_timeout=10)
    assert client.get_connection_kwargs().get("protocol") in (None, 3)
    assert client.ping() is True
    assert client.set("a:resp3", "1") is True
    assert client.mset({key: key for key in KEYS[:6]}) is True
    assert client.mget(KEYS[:6] + ["missing"]) == [key.encode() for key in KEYS[:6]] + [None]
    assert client.exists(*KEYS) == 6
    assert client.hset("h", mapping={"f": "1", "g": "2"}) == 2
    assert client.hgetall("h") == {b"f": b"1", b"g": b"2"}
    assert client.sadd("s", "x", "y") == 2
    assert client.smembers("s") == {b"x", b"y"}
    assert client.zadd("z", {"m": 1.5}) == 1
    assert client.zscore("z", "m") == 1.5
    assert [tuple(pair) for pair in client.zrange("z", 0, -1, withscores=True)] == [(b"m", 1.5)]
    assert client.echo("hi") == b"hi"
    with pytest.raises(redis.ResponseError):
        client.get("h")
    pipe = client.pipeline(transaction=False)
    for key in KEYS:
        pipe.get(key)
    pipe.delete(*KEYS)
    assert pipe.execute() == [key.encode() for key in KEYS[:6]] + [None, None, 6]
    info = client.connection_pool.get_connection()
    try:
        assert info.handshake_metadata[b"proto"] == 3
        assert info.handshake_metadata[b"server"] == b"twistedproxy"
    finally:
        client.connection_pool.release(info)
    client.close()


@needs_redis_py_8
def test_redis_py_8_with_a_password(cluster):
    """With a password redis-py 8 sends HELLO 3 AUTH default <password>."""
    c = cluster(1, redis_auth="secret")
    client = redis.Redis(host=HOST, port=c.port, password="secret", socket_timeout=10)
    assert client.set("k", "v") is True
    assert client.get("k") == b"v"
    assert client.get("missing") is None
    client.close()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host=HOST, port=c.port, password="wrong", socket_timeout=10).ping()


def test_resp2_and_resp3_clients_share_the_backends(cluster):
    """A RESP3 client's backend connections are their own; RESP2 clients keep theirs."""
    c = cluster(1)
    old = redis.Redis(host=HOST, port=c.port, protocol=2, socket_timeout=10)
    assert old.set("k", "v") is True
    sock = raw(c.port)
    sock.sendall(multibulk("HELLO", "3") + multibulk("HGETALL", "none") + multibulk("GET", "none"))
    replies = read_replies(sock, 3)
    assert replies[1:] == [b"%0\r\n", b"_\r\n"]
    assert old.hgetall("none") == {} and old.get("none") is None
    assert {client["resp"] for client in c.direct(0).client_list()} == {"2", "3"}
    sock.close()
    old.close()


def test_resp3_through_tenant_fronts(spawn, redis_backends):
    """A front's tenants, by user and by prefix (stripped, split across pools): RESP3 replies, merged ones too."""
    from tests.test_tenants_proxy import two_redis_pools

    first, second, port, proc, _, _ = two_redis_pools(spawn, redis_backends, {"tenants": {
        "alpha": {"prefix": "a:", "strip_prefix": True, "route": "pa"},
        "beta": {"prefix": "b:", "route": "pb"},
    }})
    replies = exchange(port, multibulk("HELLO", "3") + multibulk("MSET", "a:m", "x", "b:m", "y")
                       + multibulk("MGET", "b:m", "a:none", "a:m", "b:none") + multibulk("GET", "c:k"), 4)
    assert replies[0].startswith(b"%7\r\n")
    assert replies[1:] == [b"+OK\r\n", b"*4\r\n$1\r\ny\r\n_\r\n$1\r\nx\r\n_\r\n", b"-ERR no route for this key\r\n"]
    assert redis.Redis(host=HOST, port=first.port, protocol=2).get("m") == b"x"  # stripped
    proc.stop()

    first, second, port, proc, _, _ = two_redis_pools(spawn, redis_backends, {"tenants": {
        "acme": {"users": {"alice": "wonder"}, "route": {"prefix": {"acme:": "pa"}}},
        "globex": {"users": {"bob": "builder"}, "route": "pb"},
    }})
    replies = exchange(port, multibulk("HELLO", "3", "AUTH", "alice", "wrong") + multibulk("GET", "acme:1")
                       + multibulk("HELLO", "3", "AUTH", "alice", "wonder") + multibulk("SET", "acme:1", "A")
                       + multibulk("MGET", "acme:1", "acme:2") + multibulk("GET", "globex:1"), 6)
    assert replies[0].startswith(b"-WRONGPASS") and replies[1].startswith(b"-NOAUTH")
    assert replies[2].startswith(b"%7\r\n")
    assert replies[3:5] == [b"+OK\r\n", b"*2\r\n$1\r\nA\r\n_\r\n"]
    assert replies[5].startswith(b"-NOPERM")
