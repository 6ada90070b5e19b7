"""
The Redis proxy end to end: the proxy as a real process (the C{cacheproxy}
command) in front of real redis-server backends, driven by redis-py, redis-cli
and raw sockets.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import subprocess
import threading
import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.support import processes
from tests.support.processes import HOST, free_port, pool_config

pytestmark = pytest.mark.integration


class Cluster:
    """A proxy process in front of redis-server backends."""

    def __init__(self, spawn, backends, proxy, port, config):
        self.spawn = spawn
        self.backends = backends
        self.proxy = proxy
        self.port = port
        self.config = config

    def client(self, **kwargs) -> redis.Redis:
        return connect(self.port, **kwargs)

    def direct(self, index: int, **kwargs) -> redis.Redis:
        return connect(self.backends[index].port, **kwargs)

    def owner(self, key, **kwargs) -> int:
        """The index of the one backend holding C{key} (written through the proxy)."""
        holders = [i for i in range(len(self.backends)) if self.direct(i, **kwargs).exists(key)]
        assert len(holders) == 1, (key, holders)
        return holders[0]

    def keys_by_backend(self, count: int, prefix: str = "k", **kwargs) -> dict:
        """Write C{count} keys through the proxy; backend index -> its keys."""
        client = self.client(**kwargs.pop("proxy_kwargs", {}))
        keys = ["%d:%s" % (i, prefix) for i in range(count)]
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.set(key, key)
        assert all(pipe.execute())
        out = {i: [] for i in range(len(self.backends))}
        for i in range(len(self.backends)):
            found = self.direct(i, **kwargs).keys("*:" + prefix)
            out[i] = sorted(k.decode() for k in found)
        assert sum(len(v) for v in out.values()) == count
        return out

    def restart_backend(self, index: int, *extra) -> None:
        """Start a new redis-server on the killed backend's port."""
        port = self.backends[index].port
        self.backends[index] = self.spawn(processes.redis_server, port, *extra)


@pytest.fixture
def cluster(spawn, redis_backends):
    """C{cluster(n, backend_args=(), **pool_keys)}: n backends and a proxy; checked for tracebacks."""
    made = []

    def make(count=3, backend_args=(), **pool_keys):
        if backend_args:
            backends = [spawn(processes.redis_server, None, *backend_args) for _ in range(count)]
        else:
            backends = redis_backends(count)
        port = free_port()
        config = {"alpha": pool_config([b.port for b in backends], port, **pool_keys)}
        proxy = spawn(processes.proxy, config, port)
        made.append(proxy)
        return Cluster(spawn, backends, proxy, port, config)

    yield make
    for proxy in made:
        output = proxy.output()
        assert "Traceback" not in output, output


def connect(port: int, **kwargs) -> redis.Redis:
    """
    A redis-py client.  RESP2 explicitly (redis-py 8 defaults to RESP3, HELLO 3):
    the replies these tests expect are RESP2's; RESP3 clients have
    tests/test_resp3_proxy.py.
    """
    kwargs.setdefault("socket_timeout", 10)
    kwargs.setdefault("protocol", 2)
    return redis.Redis(host=HOST, port=port, **kwargs)


def raw(port: int) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    """C{size} bytes from C{sock}, or fewer if it closes first."""
    data = bytearray(size)
    view = memoryview(data)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if not n:
            break
        got += n
    return bytes(data[:got])


def recv_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def poll(predicate, timeout: float = 10.0, interval: float = 0.05):
    """Call C{predicate} until it returns a true value; that value, or fail after C{timeout}."""
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            last = predicate()
        except (redis.RedisError, OSError) as e:
            last = e
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError("condition not met after %ss (last: %r)" % (timeout, last))


# -- pipelines and multi-key commands --------------------------------------------


def _mixed_pipeline(pipe, rng: random.Random, count: int) -> None:
    """C{count} mixed commands over 60 keys of several types (deterministic for C{rng})."""
    for _ in range(count):
        n = rng.randrange(60)
        choice = rng.randrange(12)
        if choice == 0:
            pipe.set("%d:s" % n, "v%d" % rng.randrange(1000))
        elif choice == 1:
            pipe.get("%d:s" % n)
        elif choice == 2:
            pipe.incr("%d:c" % n)
        elif choice == 3:
            pipe.hset("%d:h" % n, "f%d" % rng.randrange(5), n)
        elif choice == 4:
            pipe.hgetall("%d:h" % n)
        elif choice == 5:
            pipe.rpush("%d:l" % n, n)
        elif choice == 6:
            pipe.lrange("%d:l" % n, 0, -1)
        elif choice == 7:
            pipe.mget(["%d:s" % rng.randrange(60) for _ in range(rng.randrange(1, 6))])
        elif choice == 8:
            pipe.mset({"%d:s" % rng.randrange(60): "m%d" % i for i in range(rng.randrange(1, 4))})
        elif choice == 9:
            pipe.delete(*["%d:s" % rng.randrange(60) for _ in range(rng.randrange(1, 4))])
        elif choice == 10:
            pipe.exists(*["%d:c" % rng.randrange(60) for _ in range(rng.randrange(1, 4))])
        else:
            pipe.zadd("%d:z" % n, {"m%d" % rng.randrange(5): rng.randrange(100)})


def test_cross_server_pipeline_replies_in_order(cluster, spawn):
    """1000 mixed pipelined commands over 3 servers answer exactly as one redis-server does."""
    c = cluster(3)
    reference = spawn(processes.redis_server)
    results = []
    for port in (c.port, reference.port):
        client = connect(port)
        pipe = client.pipeline(transaction=False)
        _mixed_pipeline(pipe, random.Random(7), 1000)
        results.append(pipe.execute(raise_on_error=False))
    proxied, expected = results
    assert len(proxied) == 1000
    assert proxied == expected
    # The keys really are spread: every backend holds some.
    assert all(c.direct(i).dbsize() > 10 for i in range(3))


def test_multi_key_commands_across_servers(cluster):
    c = cluster(3)
    client = c.client()
    keys = ["%d:mk" % i for i in range(30)]
    assert client.mset({k: "v" + k for k in keys}) is True
    assert len({c.owner(k) for k in keys}) == 3
    assert client.mget(keys + ["missing"]) == [("v" + k).encode() for k in keys] + [None]
    assert client.mget(list(reversed(keys))) == [("v" + k).encode() for k in reversed(keys)]
    assert client.exists(*keys[:10], "missing", keys[0]) == 11  # duplicates count twice, as in Redis
    assert client.touch(*keys[:5], "missing") == 5
    assert client.delete(*keys[:10], "missing") == 10
    assert client.unlink(*keys[10:20]) == 10
    assert client.exists(*keys) == 10
    assert client.mget(keys[:3]) == [None, None, None]
    # A multi-key command inside a pipeline keeps its place.
    pipe = client.pipeline(transaction=False)
    pipe.set("a1", 1).mget(keys[20:25]).get("a1").delete(*keys[20:25]).get(keys[20])
    assert pipe.execute() == [True, [("v" + k).encode() for k in keys[20:25]], b"1", 5, None]


def test_eval_is_routed_by_first_key(cluster):
    c = cluster(3)
    client = c.client()
    owners = set()
    for i in range(12):
        key = "%d:ev" % i
        assert client.eval("return redis.call('set', KEYS[1], ARGV[1])", 1, key, "x%d" % i) == b"OK"
        owners.add(c.owner(key))
        assert client.get(key) == ("x%d" % i).encode()
        assert client.eval("return redis.call('get', KEYS[1])", 1, key) == ("x%d" % i).encode()
    assert len(owners) > 1
    with pytest.raises(redis.ResponseError, match="without keys"):
        client.eval("return 1", 0)
    assert client.ping() is True


def test_ping_echo_quit(cluster):
    c = cluster(2)
    client = c.client()
    assert client.ping() is True
    assert client.echo("hello") == b"hello"
    sock = raw(c.port)
    sock.sendall(b"*1\r\n$4\r\nPING\r\n*2\r\n$4\r\nECHO\r\n$2\r\nhi\r\n*2\r\n$4\r\nPING\r\n$1\r\nx\r\n")
    assert recv_exactly(sock, 7 + 8 + 7) == b"+PONG\r\n$2\r\nhi\r\n$1\r\nx\r\n"
    # QUIT answers +OK and closes; what follows it is ignored.
    sock.sendall(b"*1\r\n$4\r\nQUIT\r\n*2\r\n$3\r\nGET\r\n$1\r\na\r\n")
    assert recv_until_closed(sock) == b"+OK\r\n"
    sock.close()


def test_unsupported_command_keeps_connection(cluster):
    c = cluster(2)
    sock = raw(c.port)
    sock.sendall(
        b"*2\r\n$4\r\nKEYS\r\n$1\r\n*\r\n"
        b"*3\r\n$3\r\nSET\r\n$1\r\na\r\n$1\r\n1\r\n"
        b"*1\r\n$8\r\nFLUSHALL\r\n"
        b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n"
    )
    expected = b"-ERR unsupported command 'KEYS'\r\n+OK\r\n-ERR unsupported command 'FLUSHALL'\r\n$1\r\n1\r\n"
    assert recv_exactly(sock, len(expected)) == expected
    sock.close()
    client = c.client()
    for command in (("CONFIG", "GET", "maxmemory"), ("SUBSCRIBE", "ch"), ("NOSUCHCMD", "x")):
        with pytest.raises(redis.ResponseError) as info:
            client.execute_command(*command)
        assert command[0].lower() in str(info.value).lower()
    assert client.get("a") == b"1"


def test_malformed_framing_answers_error_and_closes(cluster):
    c = cluster(2)
    sock = raw(c.port)
    # A complete request, then a multibulk whose second argument is not a bulk string.
    sock.sendall(b"*3\r\n$3\r\nSET\r\n$1\r\nb\r\n$1\r\n2\r\n*2\r\n$3\r\nGET\r\n:1\r\n")
    data = recv_until_closed(sock)
    assert data.startswith(b"+OK\r\n-ERR Protocol error"), data
    sock.close()
    sock = raw(c.port)
    sock.sendall(b"*x\r\n")
    assert recv_until_closed(sock).startswith(b"-ERR Protocol error")
    sock.close()
    assert c.client().get("b") == b"2"  # the proxy itself is fine


def test_inline_commands(cluster):
    c = cluster(2)
    sock = raw(c.port)
    sock.sendall(b'SET greeting "hello world"\r\nGET greeting\r\nPING\r\n\r\nEXISTS greeting nope\nQUIT\r\n')
    assert recv_until_closed(sock) == b"+OK\r\n$11\r\nhello world\r\n+PONG\r\n:1\r\n+OK\r\n"
    sock.close()


def test_redis_cli(cluster):
    c = cluster(3)

    def cli(*args, stdin=None):
        out = subprocess.run(
            ["redis-cli", "-h", HOST, "-p", str(c.port)] + list(args),
            input=stdin,
            capture_output=True,
            timeout=20,
            check=True,
        )
        return out.stdout.decode()

    assert cli("SET", "cli:1", "one") == "OK\n"
    assert cli("MSET", "cli:2", "two", "cli:3", "three") == "OK\n"
    assert cli("MGET", "cli:1", "cli:2", "cli:3", "cli:4") == "one\ntwo\nthree\n\n"
    assert cli("DEL", "cli:1", "cli:2", "cli:9") == "2\n"
    assert cli("PING") == "PONG\n"
    assert "unsupported command" in cli("KEYS", "*")
    # Commands piped on standard input, and redis-cli's own pipe mode.
    assert cli(stdin=b"SET cli:5 five\nGET cli:5\nINCR cli:n\n") == "OK\nfive\n1\n"
    mass = b"".join(b"SET pipe:%d %d\r\n" % (i, i) for i in range(200))
    assert "errors: 0, replies: 200" in cli("--pipe", stdin=mass)
    assert c.client().get("pipe:199") == b"199"


# -- authentication and the backend handshake -------------------------------------


def test_auth_and_backend_handshake(cluster):
    password = "s3cret"
    c = cluster(2, backend_args=("--requirepass", password), redis_auth=password, redis_db=3)
    client = c.client(retry=Retry(NoBackoff(), 0))  # redis-py 8 retries connection errors (NOAUTH is one)
    with pytest.raises(redis.AuthenticationError, match="Authentication required"):  # -NOAUTH
        client.get("x")
    sock = raw(c.port)
    sock.sendall(b"GET x\r\nAUTH nope\r\nPING\r\nAUTH %s\r\nPING\r\n" % password.encode())
    noauth = b"-NOAUTH Authentication required\r\n"
    expected = noauth + b"-ERR invalid password\r\n" + noauth + b"+OK\r\n+PONG\r\n"
    assert recv_exactly(sock, len(expected)) == expected
    sock.close()
    good = c.client(password=password)
    keys = ["%d:au" % i for i in range(20)]
    assert good.mset({k: k for k in keys}) is True
    assert good.mget(keys) == [k.encode() for k in keys]
    # The keys live in database 3 of the password-protected backends.
    direct = [c.direct(i, password=password, db=3) for i in range(2)]
    assert sum(d.dbsize() for d in direct) == 20 and all(d.dbsize() for d in direct)
    assert all(c.direct(i, password=password).dbsize() == 0 for i in range(2))
    # The handshake is replayed on every new server connection: kill the proxy's
    # backend connections, then keys still go to database 3.
    for i in range(2):
        c.direct(i, password=password).client_kill_filter(_type="normal", skipme=True)
    poll(lambda: good.set("after", "kill") is True)
    assert poll(lambda: good.mset({k + ":2": "x" for k in keys}) is True)
    assert sum(d.dbsize() for d in direct) == 41
    assert all(c.direct(i, password=password).dbsize() == 0 for i in range(2))


def test_handshake_is_not_counted_as_a_failure(cluster):
    """With a timeout and a failure limit of 1, a miscounted handshake would eject every server."""
    c = cluster(2, redis_db=1, timeout=2000, auto_eject_hosts=True, server_failure_limit=1)
    client = c.client()
    keys = ["%d:hs" % i for i in range(20)]
    assert client.mset({k: k for k in keys}) is True
    assert client.mget(keys) == [k.encode() for k in keys]
    sizes = [c.direct(i, db=1).dbsize() for i in range(2)]
    assert sum(sizes) == 20 and min(sizes) > 0, sizes


# -- failures: killed, restarted, frozen and ejected backends ------------------------


def _results_by_owner(client, by_backend):
    """GET every key in one pipeline; backend index -> list of results (values or errors)."""
    pipe = client.pipeline(transaction=False)
    order = []
    for index, keys in by_backend.items():
        for key in keys:
            pipe.get(key)
            order.append(index)
    out = {index: [] for index in by_backend}
    for index, result in zip(order, pipe.execute(raise_on_error=False)):
        out[index].append(result)
    return out


def test_backend_killed_mid_traffic_and_restarted(cluster):
    c = cluster(3)
    by_backend = c.keys_by_backend(90)
    victim = 1
    bad_results = []
    stop = threading.Event()
    rounds = [0]

    def traffic():
        client = c.client()
        while not stop.is_set():
            for index, results in _results_by_owner(client, by_backend).items():
                for result in results:
                    if isinstance(result, Exception) and index != victim:
                        bad_results.append((index, result))
                    if index == victim and not isinstance(result, (Exception, bytes)):
                        bad_results.append((index, result))
            rounds[0] += 1

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        poll(lambda: rounds[0] >= 3)
        c.backends[victim].kill()
        started = rounds[0]
        poll(lambda: rounds[0] >= started + 5)
    finally:
        stop.set()
        thread.join(10)
    assert not bad_results, bad_results[:5]
    # While it is down, its keys fail and the others' keys are served.
    results = _results_by_owner(c.client(), by_backend)
    assert all(isinstance(r, redis.ResponseError) for r in results[victim])
    assert all(r == k.encode() for i in (0, 2) for r, k in zip(results[i], by_backend[i]))
    # Back on the same port (empty): the proxy reconnects and its keys work again.
    c.restart_backend(victim)
    client = c.client()
    key = by_backend[victim][0]
    poll(lambda: client.set(key, "again") is True)
    assert c.direct(victim).get(key) == b"again"
    results = _results_by_owner(client, by_backend)
    assert not any(isinstance(r, Exception) for rs in results.values() for r in rs)


def test_backend_frozen_times_out_then_recovers(cluster):
    c = cluster(3, timeout=300)
    by_backend = c.keys_by_backend(30)
    victim = 2
    client = c.client()
    c.backends[victim].freeze()
    try:
        started = time.time()
        results = _results_by_owner(client, by_backend)
        elapsed = time.time() - started
        assert 0.25 <= elapsed < 3, elapsed
        for result in results[victim]:
            assert isinstance(result, redis.ResponseError) and str(result) == "Connection timed out", result
        for i in (0, 1):
            assert results[i] == [k.encode() for k in by_backend[i]]
        # Requests to the other backends do not wait for the frozen one.
        started = time.time()
        assert client.mget(by_backend[0] + by_backend[1]) == [k.encode() for k in by_backend[0] + by_backend[1]]
        assert time.time() - started < 0.25
    finally:
        c.backends[victim].thaw()
    key = by_backend[victim][0]
    assert poll(lambda: client.get(key)) == key.encode()
    assert _results_by_owner(client, by_backend)[victim] == [k.encode() for k in by_backend[victim]]


def test_auto_eject_moves_keys_and_readmits(cluster):
    c = cluster(
        3, timeout=200, auto_eject_hosts=True, server_failure_limit=2, server_retry_timeout=1500
    )
    by_backend = c.keys_by_backend(60)
    victim = 0
    keys = by_backend[victim]
    client = c.client()
    c.backends[victim].freeze()
    try:
        # Failures (timeouts) until the server is ejected: then its keys are
        # placed on the others, which do not have them yet.
        poll(lambda: client.get(keys[0]) is None, timeout=5)
        ejected_at = time.time()
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.set(key, "moved")
        assert all(r is True for r in pipe.execute(raise_on_error=False))
        assert sum(c.direct(i).exists(*keys) for i in (1, 2)) == len(keys)
        assert client.mget(keys) == [b"moved"] * len(keys)
        # The other servers' keys stayed where they were.
        assert client.mget(by_backend[1]) == [k.encode() for k in by_backend[1]]
    finally:
        c.backends[victim].thaw()
    # After server_retry_timeout the server is back in the placement: its keys
    # are read from it again (it still has the old values).
    assert poll(lambda: client.get(keys[0]) == keys[0].encode(), timeout=10)
    assert time.time() - ejected_at >= 1.0
    assert client.mget(keys) == [k.encode() for k in keys]


# -- big values and slow clients --------------------------------------------------


def test_large_values_intact(cluster):
    c = cluster(2)
    client = c.client(socket_timeout=60)
    value = os.urandom(20 * 1024 * 1024)
    assert client.set("big", value) is True
    got = client.get("big")
    assert len(got) == len(value) and hashlib.sha1(got).digest() == hashlib.sha1(value).digest()
    pipe = client.pipeline(transaction=False)
    pipe.set("big2", value[: 5 * 1024 * 1024]).get("small-before").get("big2").mget(["big", "big2"])
    r = pipe.execute()
    assert r[0] is True and r[1] is None and r[2] == value[: 5 * 1024 * 1024]
    assert r[3] == [value, value[: 5 * 1024 * 1024]]


def test_slow_client_does_not_grow_proxy_memory(cluster):
    c = cluster(1)
    value = b"v" * (1024 * 1024)
    c.client().set("mega", value)
    baseline = c.proxy.rss_kb()
    gets = 600  # 600 MB of replies if the proxy buffered them all
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.connect((HOST, c.port))
    sock.sendall(b"*2\r\n$3\r\nGET\r\n$4\r\nmega\r\n" * gets)
    peak = baseline
    deadline = time.time() + 1.5
    while time.time() < deadline:
        peak = max(peak, c.proxy.rss_kb())
        time.sleep(0.05)
    # The bound leaves room for PyPy's lazy major collections (CPython: ~70 MB).
    assert peak - baseline < 200 * 1024, (baseline, peak)
    # The client then reads: held requests go out as replies are written.
    expected = b"$1048576\r\n" + value + b"\r\n"
    for _ in range(150):
        assert recv_exactly(sock, len(expected)) == expected
    sock.close()  # with replies still coming
    assert c.client().get("mega") == value
