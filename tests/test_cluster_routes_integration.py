"""
The memcached cluster routes with real memcached and redis-server behind a
real proxy process: failover when a pool's server is killed, replicate,
shadow with its target frozen (SIGSTOP), warm-up filling the cold pool with
the remaining TTLs.  No timing assertions: the shadow's latency effect is
measured in bench/, not here.
"""

from __future__ import annotations

import struct
import time

import pytest
import redis
from pymemcache.client.base import Client

from tests.support import processes
from tests.support.processes import HOST, free_port
from tests.support.workers import connect, poll, read_reply
from tests.test_stats import read_stats_port

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:Call to '__init__' function with deprecated usage:DeprecationWarning"),
]


def leaf(proc, redis_pool=False, **keys) -> dict:
    entry = {"redis": redis_pool, "servers": ["%s:%d:1" % (HOST, proc.port)]}
    entry.update(keys)
    return entry


def start_front(spawn, pools: dict, route, redis_front=False):
    """A proxy serving C{pools} (reached only through routes) and a front named "front" with C{route}."""
    port = free_port()
    stats_port = free_port()
    config = dict(pools)
    config["front"] = {"listen": "%s:%d" % (HOST, port), "redis": redis_front, "route": route}
    spawn(processes.proxy, config, port, extra_args=["-s", str(stats_port), "-a", HOST])
    return port, lambda: read_stats_port(stats_port)["front"]


def mc(port) -> Client:
    return Client((HOST, port), timeout=5, connect_timeout=5, default_noreply=False)


def meta(port, line: bytes) -> bytes:
    """One meta command straight to a memcached; its reply."""
    with connect(port) as sock:
        sock.sendall(line + b"\r\n")
        data = b""
        while not data.endswith(b"\r\n") or (data.startswith(b"VA ") and data.count(b"\r\n") < 2):
            data += sock.recv(65536)
        return data


def ttl_of(port, key: bytes) -> int:
    """The remaining TTL of C{key} on the memcached at C{port}, once it is there (-1: none)."""
    poll(lambda: meta(port, b"mg " + key + b" t").startswith(b"HD"), message="%r stored" % (key,))
    return int(meta(port, b"mg " + key + b" t").split()[1][1:])


# -- failover -------------------------------------------------------------------------------


def test_memcached_failover_when_a_pools_server_is_killed(spawn, memcached_backends):
    first, second = memcached_backends(2)
    port, stats = start_front(spawn, {"a": leaf(first, timeout=2000), "b": leaf(second, timeout=2000)},
                              {"failover": ["a", "b"]})
    client = mc(port)
    for i in range(20):
        client.set("before:%d" % i, b"v%d" % i)
    assert mc(first.port).get("before:7") == b"v7"
    first.kill()
    # Nothing was in flight to it: no request of the client fails.
    for i in range(50):
        client.set("after:%d" % i, b"w%d" % i)
        assert client.get("after:%d" % i) == b"w%d" % i
    assert mc(second.port).get("after:49") == b"w49"
    assert stats()["failovers"] >= 100


def test_redis_failover_when_a_pools_server_is_killed(spawn, redis_backends):
    first, second = redis_backends(2)
    port, stats = start_front(spawn, {"a": leaf(first, True, timeout=2000), "b": leaf(second, True, timeout=2000)},
                              {"failover": ["a", "b"]}, redis_front=True)
    client = redis.Redis(host=HOST, port=port, socket_timeout=5, protocol=2, lib_name=None, lib_version=None)
    client.set("k", "before")
    first.kill()
    for i in range(50):
        client.set("k%d" % i, "v%d" % i)
        assert client.get("k%d" % i) == b"v%d" % i
    direct = redis.Redis(host=HOST, port=second.port, protocol=2, lib_name=None, lib_version=None)
    assert direct.get("k49") == b"v49"
    assert stats()["failovers"] >= 100


# -- replicate ------------------------------------------------------------------------------


def test_replicate_writes_every_replica_and_the_first_is_authoritative(spawn, memcached_backends):
    replicas = memcached_backends(3)
    pools = {"r%d" % i: leaf(proc) for i, proc in enumerate(replicas)}
    port, stats = start_front(spawn, pools, {"replicate": ["r0", "r1", "r2"]})
    client = mc(port)
    direct = [mc(proc.port) for proc in replicas]

    def everywhere(key, value):
        # The client does not wait for the other replicas: their copies land a moment later.
        poll(lambda: [d.get(key) for d in direct] == [value] * 3, message="%s=%r on every replica" % (key, value))

    client.set("k", b"one", expire=100)
    everywhere("k", b"one")
    # gets/cas: the token is the first replica's; a stored cas reaches the others as a set.
    value, token = client.gets("k")
    assert value == b"one" and token == direct[0].gets("k")[1]
    assert client.cas("k", b"two", token, expire=100)
    everywhere("k", b"two")
    assert all(90 <= ttl_of(proc.port, b"k") <= 100 for proc in replicas)
    assert not client.cas("k", b"three", token)  # the token is spent: EXISTS, nothing copied
    client.set("marker", b"m")  # sent after the refused cas on every connection: once here, that is settled
    everywhere("marker", b"m")
    assert [d.get("k") for d in direct] == [b"two"] * 3
    # incr: counted by the first, copied as is.
    client.set("n", b"10")
    everywhere("n", b"10")
    assert client.incr("n", 5) == 15
    everywhere("n", b"15")
    client.delete("n")
    everywhere("n", None)
    # Binary protocol: a set replicates too.
    with connect(port) as sock:
        body = struct.pack(">II", 0, 0) + b"bin" + b"binary"
        sock.sendall(struct.pack(">BBHBBHIIQ", 0x80, 0x01, 3, 8, 0, 0, len(body), 0, 0) + body)
        reply = b""
        while len(reply) < 24:
            reply += sock.recv(65536)
        assert struct.unpack(">H", reply[6:8])[0] == 0
    everywhere("bin", b"binary")
    counters = stats()
    assert counters["replica_copies"] >= 10 and counters["replica_failures"] == 0


def test_a_dead_replica_costs_the_client_nothing_and_is_counted(spawn, memcached_backends):
    replicas = memcached_backends(2)
    port, stats = start_front(spawn, {"r0": leaf(replicas[0]), "r1": leaf(replicas[1])},
                              {"replicate": ["r0", "r1"]})
    client = mc(port)
    client.set("warm", b"up")
    replicas[1].kill()
    for i in range(20):
        client.set("k%d" % i, b"v")
        assert client.get("k%d" % i) == b"v"
    poll(lambda: stats()["replica_failures"] >= 20, message="failed copies counted")


# -- shadow ---------------------------------------------------------------------------------


def test_memcached_shadow_frozen_target_fails_nothing_and_its_queue_is_bounded(spawn, memcached_backends):
    real, shadow = memcached_backends(2)
    port, stats = start_front(spawn, {"real": leaf(real), "shadow": leaf(shadow)},
                              {"shadow": "real", "copy_to": "shadow", "queue": 8})
    client = mc(port)
    client.set("first", b"1")
    poll(lambda: mc(shadow.port).get("first") == b"1", message="the shadow got the copy")
    shadow.freeze()
    try:
        for i in range(100):
            client.set("k%d" % i, b"v%d" % i)
            assert client.get("k%d" % i) == b"v%d" % i
        counters = stats()
        assert counters["shadow_queue"] == 8
        assert counters["shadow_sent"] == 1 + 8
        assert counters["shadow_dropped"] == 200 - 8
        assert counters["forward_error"] == 0
    finally:
        shadow.thaw()
    poll(lambda: stats()["shadow_queue"] == 0, message="the queue drains once the shadow answers")
    assert mc(shadow.port).get("k0") == b"v0"  # the copies that were queued arrived
    assert mc(shadow.port).get("k99") is None  # dropped


def test_redis_shadow_frozen_target_fails_nothing(spawn, redis_backends):
    real, shadow = redis_backends(2)
    port, stats = start_front(spawn, {"real": leaf(real, True), "shadow": leaf(shadow, True)},
                              {"shadow": "real", "copy_to": "shadow", "sample": 0.5, "queue": 4},
                              redis_front=True)
    client = redis.Redis(host=HOST, port=port, socket_timeout=5, protocol=2, lib_name=None, lib_version=None)
    shadow.freeze()
    try:
        for i in range(50):
            client.set("k%d" % i, "v%d" % i)
            assert client.get("k%d" % i) == b"v%d" % i
        counters = stats()
        assert (counters["shadow_sent"], counters["shadow_dropped"]) == (4, 50 - 4)
    finally:
        shadow.thaw()
    poll(lambda: stats()["shadow_queue"] == 0, message="the queue drains once the shadow answers")


# -- warm-up --------------------------------------------------------------------------------


def test_warm_up_fills_the_cold_pool_with_the_remaining_ttl(spawn, memcached_backends):
    cold, warm = memcached_backends(2)
    port, stats = start_front(spawn, {"cold": leaf(cold), "warm": leaf(warm)}, {"warmup": "cold", "from": "warm"})
    source = mc(warm.port)
    source.set("ttl", b"hot", expire=100, noreply=False)
    source.set("forever", b"always", noreply=False)
    far = int(time.time()) + 5000000  # over 30 days: memcached reads it as a Unix time
    source.set("far", b"later", expire=far, noreply=False)
    source.set("b", b"B", noreply=False)
    with connect(warm.port) as sock:  # client flags
        sock.sendall(b"set flagged 42 100 1\r\nf\r\n")
        assert read_reply(sock, b"\r\n") == b"STORED\r\n"
    client = mc(port)
    assert client.get("ttl") == b"hot"
    assert 90 <= ttl_of(cold.port, b"ttl") <= 100
    assert mc(cold.port).get("ttl") == b"hot"
    assert client.get("forever") == b"always"
    assert ttl_of(cold.port, b"forever") == -1
    assert client.get("far") == b"later"
    # (memcached keeps a clock of its own in whole seconds: an absolute time can read a few seconds off)
    assert 5000000 - 100 <= ttl_of(cold.port, b"far") <= 5000000 + 5
    with connect(port) as sock:  # a multi-key get: a hit on the cold pool, a warm one, a miss in both
        mc(cold.port).set("a", b"A")
        sock.sendall(b"get a b nowhere flagged\r\n")
        assert read_reply(sock, b"END\r\n") == (
            b"VALUE a 0 1\r\nA\r\nVALUE b 0 1\r\nB\r\nVALUE flagged 42 1\r\nf\r\nEND\r\n")
    poll(lambda: meta(cold.port, b"mg flagged f v") == b"VA 1 f42\r\nf\r\n", message="flagged filled")
    # gets: the CAS token is the cold server's.
    source.set("cas", b"c", expire=100)
    value, token = client.gets("cas")
    assert value == b"c" and token == mc(cold.port).gets("cas")[1]
    # Binary get.
    source.set("binary", b"bin", expire=100)
    with connect(port) as sock:
        sock.sendall(struct.pack(">BBHBBHIIQ", 0x80, 0x00, 6, 0, 0, 0, 6, 0, 0) + b"binary")
        reply = b""
        while len(reply) < 24 or len(reply) < 24 + struct.unpack(">I", reply[8:12])[0]:
            reply += sock.recv(65536)
        assert struct.unpack(">H", reply[6:8])[0] == 0 and reply.endswith(b"bin")
    assert 90 <= ttl_of(cold.port, b"binary") <= 100
    poll(lambda: stats()["warmup_fills"] == 7, message="every fill answered")
    counters = stats()
    assert counters["warmup_hits"] == 7 and counters["warmup_misses"] == 1
    assert counters["warmup_fills"] == 7 and counters["warmup_fill_failures"] == 0


def test_warm_up_never_overwrites_a_value_written_meanwhile(spawn, memcached_backends):
    cold, warm = memcached_backends(2)
    port, stats = start_front(spawn, {"cold": leaf(cold), "warm": leaf(warm)}, {"warmup": "cold", "from": "warm"})
    mc(warm.port).set("k", b"old", expire=100)
    warm.freeze()  # the look-up waits in the warm server's socket
    try:
        reader = connect(port)
        reader.sendall(b"get k\r\n")
        poll(lambda: int(mc(cold.port).stats()[b"get_misses"]) == 1, message="the cold pool missed")
        mc(port).set("k", b"new")  # a client writes the key while its look-up waits
    finally:
        warm.thaw()
    assert read_reply(reader, b"END\r\n") == b"VALUE k 0 3\r\nold\r\nEND\r\n"  # the warm value
    reader.close()
    poll(lambda: stats()["warmup_fill_failures"] == 1, message="the fill refused")
    assert stats()["warmup_fills"] == 0
    assert mc(cold.port).get("k") == b"new"
