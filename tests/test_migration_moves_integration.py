"""
Migrate on access with real backends: a migrating route (routes/migrate.py)
served by a small embedded program on the real reactor, in front of real
redis-server and memcached processes, with real clients (redis-py, pymemcache).
Keys written on their source owners are read through the proxy and found on
their target owners afterwards with their type, value, flags and TTL.  And the
listings (SCAN, lru_crawler metadump) framed and read from real servers.
"""

from __future__ import annotations

import socket
import sys
import textwrap

import pytest
import redis
from pymemcache.client.base import Client as Memcache
from twisted.internet.testing import MemoryReactorClock

from tests.support import processes
from tests.support.processes import HOST, free_port
from twistedproxy.config import config_from_dict
from twistedproxy.config.migration import MOVE, MigrationPlan
from twistedproxy.config.model import ServerSpec
from twistedproxy.protocols import codec_for, migration_for
from twistedproxy.routes.migrate import MigratingRoute

pytestmark = pytest.mark.integration

SCRIPT = textwrap.dedent(
    """\
    import json
    import sys

    from twisted.internet import reactor

    from twistedproxy.config import config_from_dict
    from twistedproxy.config.migration import MigrationPlan
    from twistedproxy.core.client import ProxyFactory
    from twistedproxy.protocols import codec_for, codecs_of, migration_for
    from twistedproxy.routes.migrate import MigratingRoute

    pool, plan, port = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
    config = config_from_dict({"pool": pool}).pools[0]
    codec = codec_for(config.protocol)
    route = MigratingRoute(config, codec, reactor, MigrationPlan.from_dict(plan), migration_for(config.protocol),
                           codecs=codecs_of(codec))
    reactor.listenTCP(port, ProxyFactory(route), interface="127.0.0.1")
    print("listening", flush=True)
    reactor.run()
    """
)


def servers(backends):
    return ["127.0.0.1:%d:1" % b.port for b in backends]


def start(spawn, tmp_path, source, target, redis_pool):
    """The embedded migrating route from C{source} to C{target} (backends); its port and a placement copy."""
    import json

    pool = {"listen": "127.0.0.1:1", "redis": redis_pool, "timeout": 5000, "servers": servers(target)}
    plan = MigrationPlan("pool", tuple(ServerSpec(HOST, b.port) for b in source),
                         tuple(ServerSpec(HOST, b.port) for b in target), MOVE)
    port = free_port()
    script = tmp_path / "migrating.py"
    script.write_text(SCRIPT)
    proc = spawn(processes.Process, [sys.executable, str(script), json.dumps(pool), json.dumps(plan.to_dict()),
                                     str(port)], port, env=processes.proxy_env(), cwd=str(tmp_path))
    config = config_from_dict({"pool": pool}).pools[0]
    protocol = "redis" if redis_pool else "memcache"
    placement = MigratingRoute(config, codec_for(protocol), MemoryReactorClock(), plan, migration_for(protocol))
    return proc, port, placement


def moving_keys(placement, count, prefix):
    """C{count} keys whose owner changes, as (key, source port, target port)."""
    out = []
    i = 0
    while len(out) < count:
        key = b"%s:%d" % (prefix, i)
        if placement.moving(key):
            out.append((key, placement.source.server_for(key).spec.port, placement.server_for(key).spec.port))
        i += 1
    return out


def test_redis_keys_move_on_access_with_type_value_and_ttl(spawn, redis_backends, tmp_path):
    backends = redis_backends(3)
    proc, port, placement = start(spawn, tmp_path, backends[:2], backends, True)
    direct = {b.port: redis.Redis(host=HOST, port=b.port, socket_timeout=10, protocol=2) for b in backends}
    (s, s_src, s_dst), (h, h_src, h_dst), (l, l_src, l_dst), (a, a_src, _), (b, b_src, b_dst) = moving_keys(
        placement, 5, b"mv")
    direct[s_src].set(s, b"string", px=100000)
    direct[h_src].hset(h, mapping={b"f1": b"v1", b"f2": b"v2"})
    direct[l_src].rpush(l, b"x", b"y", b"z")
    direct[a_src].set(a, b"A")
    direct[b_src].set(b, b"old B")
    direct[b_dst].set(b, b"new B")  # written on the target since: the newer one

    client = redis.Redis(host=HOST, port=port, socket_timeout=10, protocol=2)
    assert client.get(s) == b"string"
    assert 90000 < client.pttl(s) <= 100000
    assert client.hgetall(h) == {b"f1": b"v1", b"f2": b"v2"}
    assert client.lpush(l, b"w") == 4  # builds on the moved value
    assert client.lrange(l, 0, -1) == [b"w", b"x", b"y", b"z"]
    assert client.mget([a, b]) == [b"A", b"new B"]

    for key, src, dst in ((s, s_src, s_dst), (h, h_src, h_dst), (l, l_src, l_dst), (b, b_src, b_dst)):
        assert direct[src].exists(key) == 0 and direct[dst].exists(key) == 1
    assert direct[s_dst].type(s) == b"string" and 90000 < direct[s_dst].pttl(s) <= 100000
    assert direct[h_dst].type(h) == b"hash" and direct[l_dst].type(l) == b"list"
    output = proc.output()
    assert "Traceback" not in output, output


def test_memcached_keys_move_on_access_with_flags_and_ttl(spawn, memcached_backends, tmp_path):
    backends = memcached_backends(3)
    proc, port, placement = start(spawn, tmp_path, backends[:2], backends, False)
    direct = {b.port: Memcache((HOST, b.port), timeout=10) for b in backends}
    (k, src, dst), (n, n_src, n_dst) = moving_keys(placement, 2, b"mv")
    direct[src].set(k, b"value", expire=1000, flags=42, noreply=False)
    direct[n_src].set(n, b"10", noreply=False)

    client = Memcache((HOST, port), timeout=10)
    assert client.get(k) == b"value"
    assert client.incr(n, 5) == 15  # builds on the moved value
    assert raw(port, b"get " + k + b"\r\n") == b"VALUE " + k + b" 42 5\r\nvalue\r\nEND\r\n"

    assert raw(src, b"mg " + k + b" v\r\n") == b"EN\r\n"
    hit = raw(dst, b"mg " + k + b" f t v\r\n")
    line = hit.split(b"\r\n")[0].split()
    assert line[0] == b"VA" and b"f42" in line and 900 < int([t for t in line if t[:1] == b"t"][0][1:]) <= 1000
    assert direct[n_dst].get(n) == b"15" and direct[n_src].get(n) is None
    output = proc.output()
    assert "Traceback" not in output, output


def raw(port, request: bytes) -> bytes:
    """One request to C{port}; its reply (one read of up to a line ending in END or one line)."""
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while not data.endswith(b"\r\n") or (data.startswith(b"VALUE") and not data.endswith(b"END\r\n")):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def test_the_listings_of_real_servers(memcached_backends, redis_backends):
    (mc,) = memcached_backends(1)
    (rd,) = redis_backends(1)
    memcache, redis_migration = migration_for("memcache"), migration_for("redis")
    client = Memcache((HOST, mc.port), timeout=10)
    keys = [b"user:%d" % i for i in range(300)] + [b"other:1", b"with%percent"]
    for key in keys:
        client.set(key, b"v", noreply=False)
    with socket.create_connection((HOST, mc.port), timeout=10) as sock:
        sock.sendall(memcache.list_request(None, None, 100).frame)
        parser = memcache.codec.reply_parser()
        reply = None
        while reply is None:
            parser.feed(sock.recv(4096))
            reply = parser.next_reply(None)
    assert sorted(memcache.list_reply(reply)[1]) == sorted(keys)
    assert sorted(memcache.list_reply(reply, b"user:*")[1]) == sorted(keys[:300])

    r = redis.Redis(host=HOST, port=rd.port, socket_timeout=10, protocol=2)
    for key in keys:
        r.set(key, b"v")
    found = []
    cursor = None
    with socket.create_connection((HOST, rd.port), timeout=10) as sock:
        parser = redis_migration.codec.reply_parser()
        while True:
            sock.sendall(redis_migration.list_request(cursor, b"user:*", 50).frame)
            reply = None
            while reply is None:
                parser.feed(sock.recv(65536))
                reply = parser.next_reply(None)
            cursor, batch = redis_migration.list_reply(reply)
            found += batch
            if cursor is None:
                break
    assert sorted(set(found)) == sorted(keys[:300])


class Stepper:
    """A move generator driven one request at a time against real servers (to interleave two moves)."""

    def __init__(self, steps, source_port, target_port):
        self.steps = steps
        self.socks = {"source": socket.create_connection((HOST, source_port), timeout=10),
                      "target": socket.create_connection((HOST, target_port), timeout=10)}
        self.parsers = {side: migration_for("memcache").codec.reply_parser() for side in self.socks}
        self.next = next(steps)
        self.result = None

    def step(self, expect: bytes) -> bytes:
        """Send the next request (its frame starts with C{expect}); its reply goes into the generator."""
        side, request = self.next
        assert request.frame.startswith(expect), request.frame
        self.socks[side].sendall(request.frame)
        reply = None
        while reply is None:
            self.parsers[side].feed(self.socks[side].recv(65536))
            reply = self.parsers[side].next_reply(None)
        try:
            self.next = self.steps.send((reply, None))
        except StopIteration as stop:
            self.result = stop.value
            for sock in self.socks.values():
                sock.close()
        return reply


def memcache_movers(count, source, target):
    config = config_from_dict({"p": {"listen": "127.0.0.1:1", "servers": servers([source, target])}}).pools[0]
    memcache = migration_for("memcache")
    return [Stepper(memcache.move([b"k"], config.servers[0], config.servers[1], config), source.port, target.port)
            for _ in range(count)]


def test_two_memcached_moves_of_one_key_at_once_keep_it(memcached_backends):
    source, target = memcached_backends(2)
    Memcache((HOST, source.port), timeout=10).set(b"k", b"value", flags=3, noreply=False)
    adder, other = memcache_movers(2, source, target)
    adder.step(b"mg")
    other.step(b"mg")
    assert adder.step(b"ms").startswith(b"HD")
    assert other.step(b"ms").startswith(b"NS")
    other.step(b"md k C")  # marks the original stale: the adder deletes it
    assert adder.step(b"md k C") == b"EX\r\n"
    adder.step(b"md k\r\n")
    assert adder.result.moved == 1 and other.result.missing == 1
    assert Memcache((HOST, target.port), timeout=10).get(b"k") == b"value"
    assert raw(source.port, b"mg k v\r\n") == b"EN\r\n"


def test_a_stale_memcached_copy_of_a_deleted_key_is_taken_back(memcached_backends):
    source, target = memcached_backends(2)
    Memcache((HOST, source.port), timeout=10).set(b"k", b"value", noreply=False)
    first, late = memcache_movers(2, source, target)
    first.step(b"mg")
    late.step(b"mg")  # reads the original before the first move deletes it
    first.step(b"ms")
    first.step(b"md")
    assert first.result.moved == 1
    assert Memcache((HOST, target.port), timeout=10).delete(b"k", noreply=False)  # a client deletes it
    assert late.step(b"ms").startswith(b"HD")  # the late copy would bring it back ...
    assert late.step(b"md") == b"NF\r\n"
    late.step(b"md k C")  # ... and is taken back
    assert late.result.missing == 1
    assert raw(target.port, b"mg k v\r\n") == b"EN\r\n" and raw(source.port, b"mg k v\r\n") == b"EN\r\n"
