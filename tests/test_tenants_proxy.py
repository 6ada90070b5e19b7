"""
Tenant fronts end to end: the real proxy process in front of real redis-server
and memcached, two tenants on one port by key prefix (stripped and kept) and by
AUTH user (redis-py with a username), rate limits answered with errors, a key
outside a user's routes refused, a multi-key request split across the tenants'
pools, the per-tenant counters on the stats port and /stats.json, and a reload
that changes a tenant's route.
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import urllib.request

import pytest
import redis
import yaml
from pymemcache.client.base import Client as MemcacheClient

from tests.support import processes
from tests.support.processes import HOST, free_port
from tests.support.workers import poll

pytestmark = pytest.mark.integration


def stats_document(port: int) -> dict:
    with socket.create_connection((HOST, port), timeout=5) as sock:
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return json.loads(b"".join(chunks))


def start(spawn, config: dict, port: int):
    stats_port, http_port = free_port(), free_port()
    config["global"] = {"stats_http": "%s:%d" % (HOST, http_port)}
    proc = spawn(processes.proxy, config, port, extra_args=["-s", str(stats_port), "-a", HOST])
    processes.wait_for_port(stats_port, proc.proc)
    processes.wait_for_port(http_port, proc.proc)
    return proc, stats_port, http_port


def two_redis_pools(spawn, redis_backends, front: dict):
    """Two Redis pools (pa, pb) without listen and a front with C{front}'s keys; the backends too."""
    first, second = redis_backends(2)
    port = free_port()
    config = {
        "pa": {"redis": True, "servers": ["%s:%d:1" % (HOST, first.port)]},
        "pb": {"redis": True, "servers": ["%s:%d:1" % (HOST, second.port)]},
        "front": dict(front, listen="%s:%d" % (HOST, port), redis=True),
    }
    return (first, second, port) + start(spawn, config, port)


def direct(port: int) -> redis.Redis:
    return redis.Redis(host=HOST, port=port, socket_timeout=10, protocol=2)


def test_redis_tenants_by_prefix_strip_keep_limit_split_and_stats(spawn, redis_backends):
    first, second, port, proc, stats_port, http_port = two_redis_pools(spawn, redis_backends, {"tenants": {
        "alpha": {"prefix": "a:", "strip_prefix": True, "route": "pa"},
        "beta": {"prefix": "b:", "route": "pb", "rate_limit": 0.001, "rate_burst": 3},
    }})
    client = direct(port)
    assert client.set("a:k", "1") and client.set("b:k", "2")
    assert direct(first.port).get("k") == b"1"  # stripped
    assert direct(second.port).get("b:k") == b"2"  # kept
    assert direct(first.port).get("a:k") is None
    client.mset({"a:m": "x", "b:m": "y"})
    assert direct(first.port).get("m") == b"x"
    assert client.mget("b:m", "a:m", "a:k", "a:none") == [b"y", b"x", b"1", None]  # beta's third request
    with pytest.raises(redis.ResponseError, match="^tenant 'beta' rate limit exceeded$"):
        client.get("b:k")  # beta's burst of 3 is spent; one token in 1000 s
    with pytest.raises(redis.ResponseError, match="^no route for this key$"):
        client.get("c:k")
    assert client.get("a:k") == b"1"  # the connection stays open and alpha is not limited
    doc = stats_document(stats_port)
    assert doc["front"]["tenant:beta:rate_limited"] == 1
    assert doc["front"]["tenant:beta:requests"] == 3  # set, mget (its first key is beta's), the refused get
    assert doc["front"]["tenant:alpha:errors"] == 0
    with urllib.request.urlopen("http://%s:%d/stats.json" % (HOST, http_port), timeout=10) as response:
        report = json.loads(response.read())
    tenants = report["twistedproxy"]["pools"]["front"]["tenants"]
    assert tenants["alpha"]["requests"] == 3 and tenants["alpha"]["latency"]["count"] == 3  # set, mset, get
    with urllib.request.urlopen("http://%s:%d/metrics" % (HOST, http_port), timeout=10) as response:
        assert 'cacheproxy_tenant_rate_limited_total{pool="front",tenant="beta"} 1.0' in response.read().decode()
    assert proc.alive()


def test_redis_tenants_by_auth_user(spawn, redis_backends):
    first, second, port, proc, stats_port, _ = two_redis_pools(spawn, redis_backends, {"tenants": {
        "acme": {"users": {"alice": "wonder"}, "route": {"prefix": {"acme:": "pa"}}, "max_client_connections": 1},
        "globex": {"users": {"bob": "builder"}, "route": "pb"},
    }})
    with pytest.raises(redis.AuthenticationError):
        direct(port).get("acme:1")  # NOAUTH
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host=HOST, port=port, username="alice", password="wrong", protocol=2).ping()
    alice = redis.Redis(host=HOST, port=port, username="alice", password="wonder", protocol=2,
                        socket_timeout=10, single_connection_client=True)
    bob = redis.Redis(host=HOST, port=port, username="bob", password="builder", protocol=2, socket_timeout=10)
    assert alice.set("acme:1", "A") and bob.set("acme:1", "B")
    assert direct(first.port).get("acme:1") == b"A" and direct(second.port).get("acme:1") == b"B"
    with pytest.raises(redis.exceptions.NoPermissionError):
        alice.get("globex:1")  # outside alice's routes
    with pytest.raises(redis.exceptions.NoPermissionError):
        alice.mget("acme:1", "other")
    second_alice = redis.Redis(host=HOST, port=port, username="alice", password="wonder", protocol=2)
    with pytest.raises(redis.RedisError, match="max number of clients reached for tenant 'acme'"):
        second_alice.ping()
    doc = stats_document(stats_port)
    assert doc["front"]["tenant:acme:connections"] == 1
    assert doc["front"]["tenant:acme:errors"] == 2
    assert proc.alive()


def test_memcached_tenants_by_prefix_and_a_reload(spawn, memcached_backends):
    first, second = memcached_backends(2)
    port = free_port()
    config = {
        "ma": {"servers": ["%s:%d:1" % (HOST, first.port)]},
        "mb": {"servers": ["%s:%d:1" % (HOST, second.port)]},
        "front": {"listen": "%s:%d" % (HOST, port), "tenants": {
            "alpha": {"prefix": "a:", "strip_prefix": True, "route": "ma"},
            "beta": {"default": True, "route": "mb", "rate_limit": 0.001, "rate_burst": 2},
        }},
    }
    proc, stats_port, _ = start(spawn, config, port)
    client = MemcacheClient((HOST, port), timeout=10, default_noreply=False)
    client.set("a:one", b"1")
    client.set("two", b"2")
    assert MemcacheClient((HOST, first.port)).get("one") == b"1"  # stripped
    assert MemcacheClient((HOST, second.port)).get("two") == b"2"  # the default
    # VALUE lines get the prefix back; keys of both tenants in one get, in order.
    assert client.get_many(["two", "a:one", "a:none"]) == {"two": b"2", "a:one": b"1"}
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.sendall(b"gets a:one\r\nmg a:one k v\r\nget two\r\n")
        data = b""
        while not data.endswith(b"SERVER_ERROR tenant 'beta' rate limit exceeded\r\n"):
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
    assert data.startswith(b"VALUE a:one 0 1 ")
    assert b"\r\nVA 1 ka:one\r\n1\r\n" in data
    assert stats_document(stats_port)["front"]["tenant:beta:rate_limited"] == 1
    # Binary GETK: the reply's key gets the prefix back (key and body lengths too).
    getk = struct.pack(">BBHBBHI", 0x80, 0x0C, 5, 0, 0, 0, 5) + b"\x00\x00\x00\x09" + bytes(8) + b"a:one"
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.sendall(getk)
        data = b""
        while len(data) < 24 or len(data) < 24 + struct.unpack(">I", data[8:12])[0]:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
    magic, opcode, keylen, extlen, _, status, bodylen = struct.unpack(">BBHBBHI", data[:12])
    assert (magic, opcode, keylen, extlen, status, bodylen) == (0x81, 0x0C, 5, 4, 0, 10)
    assert data[12:16] == b"\x00\x00\x00\x09" and data[28:] == b"a:one1"
    # A reload swaps the tenants' pools; alpha's keys now go whole.
    config["front"]["tenants"]["alpha"] = {"prefix": "a:", "route": "mb"}
    config["front"]["tenants"]["beta"] = {"default": True, "route": "ma"}
    path = proc.argv[proc.argv.index("-c") + 1]
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    proc.signal(signal.SIGHUP)
    poll(lambda: client.set("a:moved", b"m") and MemcacheClient((HOST, second.port)).get("a:moved") == b"m",
         message="alpha's new route")
    assert client.set("three", b"3") and MemcacheClient((HOST, first.port)).get("three") == b"3"
    assert proc.alive()
