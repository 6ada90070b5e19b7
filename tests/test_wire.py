"""
The wire as clients see it, end to end through real backends: TCP half-close,
the refused-transaction state, the error texts of backend failures (side by
side with nutcracker 0.5.0) and how a QUIT's close is counted.
"""

from __future__ import annotations

import json
import shutil
import socket
import struct
import time

import pytest

from tests.support import processes
from tests.support.processes import HOST, free_port, pool_config

pytestmark = pytest.mark.integration


def half_closed_exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send C{data}, shut down the sending side, read until the peer closes."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return out
            out += chunk


def start(spawn, servers, redis=True, global_keys=None, **pool_keys):
    """A proxy process for one pool on C{servers}; (port, stats port, process)."""
    port, stats_port = free_port(), free_port()
    config = {"alpha": pool_config(servers, port, redis=redis, **pool_keys)}
    if global_keys:
        config["global"] = global_keys
    proc = spawn(processes.proxy, config, port, extra_args=["-s", str(stats_port), "-a", HOST])
    return port, stats_port, proc


def cmd(*args) -> bytes:
    out = b"*%d\r\n" % len(args)
    for arg in args:
        arg = arg if isinstance(arg, bytes) else str(arg).encode()
        out += b"$%d\r\n%s\r\n" % (len(arg), arg)
    return out


def mc_packet(opcode, key=b"", extras=b"", value=b"", opaque=0):
    body = extras + key + value
    return struct.pack(">BBHBBHIIQ", 0x80, opcode, len(key), len(extras), 0, 0, len(body), opaque, 0) + body


# -- TCP half-close ----------------------------------------------------------------


def test_half_closed_redis_client_gets_every_reply(spawn, redis_backends):
    backends = redis_backends(2)
    port, _, proc = start(spawn, [b.port for b in backends])
    keys = ["hc:%d" % i for i in range(20)]
    data = b"".join(cmd("SET", k, "v" + k) for k in keys) + cmd("MGET", *keys) + cmd("PING") + cmd("GET", keys[0])
    got = half_closed_exchange(port, data)
    expected = b"+OK\r\n" * 20 + b"*20\r\n" + b"".join(b"$%d\r\nv%s\r\n" % (len(k) + 1, k.encode()) for k in keys)
    expected += b"+PONG\r\n$5\r\nvhc:0\r\n"
    assert got == expected
    # What redis-server itself answers to a half-closed client, for comparison.
    assert half_closed_exchange(backends[0].port, cmd("SET", "x", "1") + cmd("GET", "x")) == b"+OK\r\n$1\r\n1\r\n"
    assert "Traceback" not in proc.output()


def test_half_closed_memcached_text_client_gets_every_reply(spawn, memcached_backends):
    backends = memcached_backends(2)
    port, _, proc = start(spawn, [b.port for b in backends], redis=False)
    # The README's example: printf 'set k 0 0 1\r\nv\r\nget k\r\n' | nc -q1 127.0.0.1 PORT
    data = b"set k 0 0 1\r\nv\r\nget k\r\n"
    assert half_closed_exchange(port, data) == half_closed_exchange(backends[0].port, data)
    assert half_closed_exchange(port, data) == b"STORED\r\nVALUE k 0 1\r\nv\r\nEND\r\n"
    keys = [b"m%d" % i for i in range(12)]
    sets = b"".join(b"set %s 0 0 1\r\n%s\r\n" % (k, k[-1:]) for k in keys)
    got = half_closed_exchange(port, sets + b"get " + b" ".join(keys) + b"\r\nversion\r\n")
    assert got.startswith(b"STORED\r\n" * 12 + b"VALUE m0 0 1\r\n0\r\n")
    assert got.count(b"VALUE ") == 12 and b"END\r\nVERSION " in got
    assert "Traceback" not in proc.output()


def test_half_closed_memcached_binary_client_gets_every_reply(spawn, memcached_backends):
    backends = memcached_backends(1)
    port, _, proc = start(spawn, [b.port for b in backends], redis=False)
    data = (
        mc_packet(0x01, b"bk", extras=struct.pack(">II", 0, 0), value=b"hello", opaque=1)  # set
        + mc_packet(0x00, b"bk", opaque=2)  # get
        + mc_packet(0x0A, opaque=3)  # noop
    )
    got = half_closed_exchange(port, data)
    direct = half_closed_exchange(backends[0].port, data)
    # Three responses in order; the CAS values differ between the two sets.
    def shape(raw):
        out = []
        while raw:
            magic, opcode, _, _, _, status, body, opaque = struct.unpack(">BBHBBHII", raw[:16])
            out.append((magic, opcode, status, opaque, raw[24 : 24 + body]))
            raw = raw[24 + body :]
        return out
    assert [r[:4] for r in shape(got)] == [(0x81, 0x01, 0, 1), (0x81, 0x00, 0, 2), (0x81, 0x0A, 0, 3)]
    assert shape(got)[1][4].endswith(b"hello")
    assert [r[:4] for r in shape(got)] == [r[:4] for r in shape(direct)]
    assert "Traceback" not in proc.output()


def test_half_closed_stats_port_client_gets_the_document(spawn, redis_backends):
    backends = redis_backends(1)
    # With workers the master collects over AMP: the client's EOF arrives first.
    port, stats_port, proc = start(spawn, [backends[0].port], global_keys={"worker_processes": 1})
    processes.wait_for_port(stats_port, proc.proc)
    deadline = time.time() + 20
    while True:
        with socket.create_connection((HOST, stats_port), timeout=10) as sock:
            sock.shutdown(socket.SHUT_WR)  # nc HOST PORT </dev/null
            data = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        document = json.loads(data)
        if "alpha" in document or time.time() > deadline:
            break
        time.sleep(0.1)  # the worker may not have reported yet
    assert "alpha" in document and document["service"] == "nutcracker"
    assert "Traceback" not in proc.output()


# -- a refused transaction ------------------------------------------------------------

IN_REFUSED_MULTI = b"-ERR MULTI is not supported by the proxy: command refused inside the refused transaction\r\n"


def test_commands_inside_a_refused_multi_never_run(spawn, redis_backends):
    import redis

    backends = redis_backends(2)
    port, _, proc = start(spawn, [b.port for b in backends])
    data = cmd("MULTI") + cmd("SET", "k", "1") + cmd("INCR", "k") + cmd("DISCARD") + cmd("GET", "k")
    assert half_closed_exchange(port, data) == (
        b"-ERR unsupported command 'MULTI'\r\n" + IN_REFUSED_MULTI * 2 + b"+OK\r\n" + b"$-1\r\n"
    )
    data = cmd("MULTI") + cmd("SET", "k", "1") + cmd("MSET", "a", "1", "b", "2") + cmd("EXEC") + cmd("EXISTS", "k", "a")
    assert half_closed_exchange(port, data) == (
        b"-ERR unsupported command 'MULTI'\r\n"
        + IN_REFUSED_MULTI * 2
        + b"-EXECABORT Transaction discarded because of previous errors.\r\n"
        + b":0\r\n"
    )
    # redis-py's transactional pipeline: MULTI ... EXEC in one write; nothing runs.
    client = redis.Redis(host=HOST, port=port, socket_timeout=10, protocol=2)
    pipe = client.pipeline(transaction=True)
    pipe.set("k", "1")
    pipe.incr("k")
    with pytest.raises(redis.exceptions.ResponseError):
        pipe.execute()
    assert client.get("k") is None
    assert client.set("k", "2") and client.incr("k") == 3  # the connection is usable again
    for backend in backends:
        direct = redis.Redis(host=HOST, port=backend.port, protocol=2)
        assert direct.exists("a", "b") == 0
    assert "Traceback" not in proc.output()
