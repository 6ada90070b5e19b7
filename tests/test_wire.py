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
from tests.test_redis_proxy import recv_until_closed

pytestmark = pytest.mark.integration


def half_closed_exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send C{data}, shut down the sending side, read until the peer closes."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        return recv_until_closed(sock)


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
            document = json.loads(recv_until_closed(sock))
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
    port, _, proc = start(spawn, [b.port for b in backends], transaction_connections=0)  # transactions off
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


# -- backend failures answer with nutcracker's texts ------------------------------------

needs_nutcracker = pytest.mark.skipif(shutil.which("nutcracker") is None, reason="nutcracker (twemproxy) is not installed")

REQUESTS = {
    # One server per pool: the multi-key requests are not split (see the fragment test).
    "redis": cmd("GET", "k") + cmd("MGET", "a", "b") + cmd("SET", "k", "v"),
    "memcache": b"get k\r\nget a b\r\nset k 0 0 1\r\nv\r\n",
}


def error_replies(protocol: str, text: str) -> bytes:
    line = ("-ERR %s\r\n" if protocol == "redis" else "SERVER_ERROR %s\r\n") % text
    return line.encode() * 3


def side_by_side(spawn, protocol: str, server_port: int, global_keys=None, **pool_keys):
    """
    nutcracker and the proxy (with C{global_keys}) on the same one-server pool:
    (nutcracker's port, the proxy's, the proxy process).
    """
    pool_keys.setdefault("timeout", 5000)
    ports = []
    for start_one in (processes.nutcracker, processes.proxy):
        port = free_port()
        config = {"alpha": pool_config([server_port], port, redis=protocol == "redis", **pool_keys)}
        if global_keys and start_one is processes.proxy:
            config["global"] = global_keys
        ports.append(port)
        proc = spawn(start_one, config, port)
    return ports[0], ports[1], proc


def unread_connections(port: int) -> int:
    """Connections accepted on loopback C{port} holding bytes their process has not read."""
    count = 0
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].split(":")[1], 16)
            rx_queue = int(fields[4].split(":")[1], 16)
            if local_port == port and fields[3] == "01" and rx_queue > 0:  # ESTABLISHED
                count += 1
    return count


def wait_for(predicate, timeout: float = 10.0):
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError("condition not met after %ss" % timeout)
        time.sleep(0.02)


class FakeBackend:
    """A loopback listener that reads each connection's first bytes, then sends C{reply} or closes."""

    def __init__(self, reply=None):
        import threading

        self.reply = reply
        self.listener = socket.socket()
        self.listener.bind((HOST, 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                try:
                    if conn.recv(65536) and self.reply is not None:
                        conn.sendall(self.reply)
                        conn.recv(65536)  # until the peer closes
                except OSError:
                    pass

    def stop(self):
        self.listener.close()


@pytest.fixture
def fake_backend():
    made = []

    def make(reply=None):
        backend = FakeBackend(reply)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.stop()


def backend_process(spawn, protocol):
    return spawn(processes.redis_server if protocol == "redis" else processes.memcached)


@needs_nutcracker
@pytest.mark.parametrize("protocol", ["redis", "memcache"])
def test_refused_backend(spawn, protocol):
    import urllib.request

    dead = free_port()
    http = free_port()
    global_keys = {"stats_http": "%s:%d" % (HOST, http), "slowlog_threshold": 0}
    nut, ours, proc = side_by_side(spawn, protocol, dead, global_keys=global_keys)
    data = REQUESTS[protocol]
    expected = error_replies(protocol, "Connection refused")
    assert half_closed_exchange(nut, data) == expected
    assert half_closed_exchange(ours, data) == expected
    assert half_closed_exchange(ours, data) == expected  # during the reconnect backoff too
    # The log and the slow log name the server instead.
    label = "%s:%d" % (HOST, dead)
    assert "backend %s: cannot connect" % label in proc.output()
    processes.wait_for_port(http, proc.proc)
    with urllib.request.urlopen("http://%s:%d/slowlog" % (HOST, http), timeout=10) as response:
        entries = json.loads(response.read())
    assert len(entries) == 6
    assert all(e["error"] == "Connection refused (%s)" % label for e in entries), entries
    assert "Traceback" not in proc.output()


@needs_nutcracker
@pytest.mark.parametrize("protocol", ["redis", "memcache"])
def test_ejected_backend_no_server_left(spawn, protocol):
    nut, ours, proc = side_by_side(
        spawn, protocol, free_port(), auto_eject_hosts=True, server_failure_limit=1, server_retry_timeout=30000
    )
    data = REQUESTS[protocol]
    expected = error_replies(protocol, "Connection refused")
    for port in (nut, ours):
        assert half_closed_exchange(port, data) == expected  # the failure that ejects
        assert half_closed_exchange(port, data) == expected  # no server in the placement
    assert "ejecting server" in proc.output()


@needs_nutcracker
@pytest.mark.parametrize("protocol", ["redis", "memcache"])
def test_frozen_backend_times_out(spawn, protocol):
    backend = backend_process(spawn, protocol)
    nut, ours, proc = side_by_side(spawn, protocol, backend.port, timeout=300)
    backend.freeze()
    data = REQUESTS[protocol]
    expected = error_replies(protocol, "Connection timed out")
    assert half_closed_exchange(nut, data) == expected
    assert half_closed_exchange(ours, data) == expected
    assert "requests timed out" in proc.output()


@needs_nutcracker
@pytest.mark.parametrize("protocol", ["redis", "memcache"])
def test_backend_killed_with_requests_in_flight(spawn, protocol):
    backend = backend_process(spawn, protocol)
    nut, ours, proc = side_by_side(spawn, protocol, backend.port)
    backend.freeze()
    clients = []
    for port in (nut, ours):
        sock = socket.create_connection((HOST, port), timeout=10)
        sock.sendall(REQUESTS[protocol])
        sock.shutdown(socket.SHUT_WR)
        clients.append(sock)
    # Both proxies' requests wait unread in the frozen backend: killing it resets them.
    wait_for(lambda: unread_connections(backend.port) == 2)
    backend.kill()
    expected = error_replies(protocol, "Connection reset by peer")
    for sock in clients:
        with sock:
            assert recv_until_closed(sock) == expected


@needs_nutcracker
@pytest.mark.parametrize("protocol", ["redis", "memcache"])
def test_backend_closing_the_connection(spawn, fake_backend, protocol):
    backend = fake_backend()  # reads the request, then closes
    nut, ours, proc = side_by_side(spawn, protocol, backend.port)
    data = REQUESTS[protocol]
    expected = error_replies(protocol, "unknown")  # nutcracker has no errno to name then
    assert half_closed_exchange(nut, data) == expected
    assert half_closed_exchange(ours, data) == expected


@needs_nutcracker
@pytest.mark.parametrize("protocol", ["redis", "memcache"])
def test_backend_sending_garbage(spawn, fake_backend, protocol):
    backend = fake_backend(b"?what\r\n" if protocol == "redis" else b"VALUE k 0 zz\r\n")
    nut, ours, proc = side_by_side(spawn, protocol, backend.port)
    data = cmd("GET", "k") if protocol == "redis" else b"get k\r\n"  # one: what follows depends on timing
    expected = error_replies(protocol, "Invalid argument")[: len(error_replies(protocol, "Invalid argument")) // 3]
    assert half_closed_exchange(nut, data) == expected
    assert half_closed_exchange(ours, data) == expected
    assert "sent bad data" in proc.output()


def keys_on_each(ports, count: int) -> list:
    """C{count} keys placed on each server of a default pool on C{ports} (the same in nutcracker)."""
    from twisted.internet.testing import MemoryReactorClock

    from twistedproxy.api import build_pool
    from twistedproxy.config import config_from_dict

    pool = build_pool(config_from_dict({"alpha": pool_config(ports, 1)}).pools[0], MemoryReactorClock())
    found = {port: [] for port in ports}
    i = 0
    while min(len(keys) for keys in found.values()) < count:
        key = "key:%d" % i
        on = found[pool.server_for(key.encode()).spec.port]
        if len(on) < count:
            on.append(key)
        i += 1
    return [key for keys in found.values() for key in keys]


@needs_nutcracker
def test_an_error_from_one_fragment_keeps_the_backends_message(spawn):
    """
    A deliberate difference: nutcracker 0.5.0 answers a split request whose
    fragment got an error reply with "-ERR Invalid argument"; the proxy passes
    the backend's own error (here NOREPLICAS; READONLY from a replica alike).
    """
    healthy = spawn(processes.redis_server)
    refusing = spawn(processes.redis_server, None, "--min-replicas-to-write", "1")
    keys = keys_on_each([healthy.port, refusing.port], 10)
    ports = []
    for start_one in (processes.nutcracker, processes.proxy):
        port = free_port()
        spawn(start_one, {"alpha": pool_config([healthy.port, refusing.port], port, timeout=5000)}, port)
        ports.append(port)
    nut, ours = ports
    data = cmd("MSET", *[x for k in keys for x in (k, "v")]) + cmd("DEL", *keys) + cmd("MGET", *keys)
    mget = b"*20\r\n" + b"$-1\r\n" * 20
    noreplicas = b"-NOREPLICAS Not enough good replicas to write.\r\n"
    assert half_closed_exchange(ours, data) == noreplicas * 2 + mget
    assert half_closed_exchange(nut, data) == b"-ERR Invalid argument\r\n" * 2 + mget


# -- QUIT ------------------------------------------------------------------------------------


def test_a_quit_meeting_a_closed_client_is_no_client_error(spawn, redis_backends):
    backends = redis_backends(1)
    port, stats_port, proc = start(spawn, [backends[0].port])
    processes.wait_for_port(stats_port, proc.proc)
    for i in range(20):
        sock = socket.create_connection((HOST, port))
        sock.sendall(cmd("GET", "k") * (i * 5) + cmd("QUIT"))
        if i % 2:  # an abortive close: the +OK meets a reset
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # without reading the +OK
    with socket.create_connection((HOST, port)) as sock:  # a real error, for contrast
        sock.sendall(cmd("GET", "k") * 50)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    deadline = time.time() + 20
    while True:
        with socket.create_connection((HOST, stats_port), timeout=10) as sock:
            pool = json.loads(recv_until_closed(sock))["alpha"]
        # The port check of the start counts as one more EOF.
        if pool["client_eof"] + pool["client_err"] >= 22 or time.time() > deadline:
            break
        time.sleep(0.05)
    assert (pool["client_eof"], pool["client_err"]) == (21, 1)
    assert "Traceback" not in proc.output()


# -- memcached binary framing errors in the log ------------------------------------------


def test_binary_framing_errors_are_logged_readably(spawn, memcached_backends):
    backends = memcached_backends(1)
    port, _, proc = start(spawn, [backends[0].port], redis=False, max_request_bytes=1024)
    too_large = mc_packet(0x01, b"k\r\n", extras=bytes(8), value=b"\x00\x07" * 1024, opaque=9)
    reply = half_closed_exchange(port, too_large)
    assert struct.unpack(">BBHBBH", reply[:8]) == (0x81, 0x01, 0, 0, 0, 0x0003)  # E2BIG, then closed
    half_closed_exchange(port, mc_packet(0x0A) + b"\x07\x01garbage" + bytes(30))
    wait_for(lambda: proc.output().count("; closing") >= 2)
    lines = [line for line in proc.output().splitlines() if "; closing" in line]
    assert all(all(32 <= ord(c) < 127 for c in line) for line in lines), lines
    assert "request body over max_request_bytes (1024): magic 0x80, opcode 0x01 (set), key length 3" in lines[0]
    assert "bad request magic: magic 0x07, not a binary packet; first bytes 07 01 67 61" in lines[1]
