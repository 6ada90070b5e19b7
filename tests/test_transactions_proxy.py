"""
Redis transactions end to end: the proxy process in front of real
redis-server backends, driven by redis-py's transaction pipeline and its WATCH
retry loop, and by raw sockets for the exact bytes.
"""

from __future__ import annotations

import hashlib
import threading
import time

import pytest
import redis

from tests.test_redis_proxy import cluster, raw, recv_exactly  # noqa: F401 (cluster: a fixture)
from tests.support.resp import cmd

pytestmark = pytest.mark.integration

EXECABORT = b"-EXECABORT Transaction discarded because of previous errors.\r\n"


def keys_apart(proxy) -> tuple:
    """Two keys the proxy places on different backends (varied keys: similar ones may hash close)."""
    keys = [hashlib.sha1(b"%d" % i).hexdigest() for i in range(200)]
    first = owner_of(proxy, keys[0])
    for key in keys[1:]:
        if owner_of(proxy, key) != first:
            return keys[0], key
    raise AssertionError("every key on one backend")


def owner_of(proxy, key: str) -> int:
    """The backend a key lands on: set it through the proxy, look for it, delete it."""
    client = proxy.client()
    client.set(key, "x")
    index = proxy.owner(key)
    client.delete(key)
    return index


def test_a_transaction_pipeline_runs_atomically_on_the_keys_server(cluster):
    proxy = cluster(3, hash_tag="{}")
    client = proxy.client()
    pipe = client.pipeline(transaction=True)
    pipe.set("{user}:name", "ada").incr("{user}:visits").incr("{user}:visits").mget("{user}:name", "{user}:visits")
    assert pipe.execute() == [True, 1, 2, [b"ada", b"2"]]
    index = proxy.owner("{user}:name")
    assert proxy.direct(index).get("{user}:visits") == b"2"
    # Keyless commands inside, and an empty transaction, answer as Redis does.
    pipe = client.pipeline(transaction=True)
    pipe.ping().get("{user}:name")
    assert pipe.execute() == [True, b"ada"]
    assert client.pipeline(transaction=True).execute() == []
    # After it, the client's plain commands go through the shared connections as before.
    assert client.get("{user}:name") == b"ada"


def test_an_optimistic_counter_incremented_by_10_clients_ends_exact(cluster):
    proxy = cluster(2)
    clients, rounds = 10, 20
    proxy.client().set("counter", 0)
    errors = []

    def increment(pipe):
        value = int(pipe.get("counter"))
        pipe.multi()
        pipe.set("counter", value + 1)

    def run():
        client = proxy.client()
        try:
            for _ in range(rounds):
                client.transaction(increment, "counter")  # WATCH, GET, MULTI, SET, EXEC; again on WatchError
        except Exception as e:  # reported below: a thread's exception is not the test's
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert int(proxy.client().get("counter")) == clients * rounds


def test_a_transaction_across_servers_gets_execabort_and_applies_nothing(cluster):
    proxy = cluster(2)
    a, b = keys_apart(proxy)
    client = proxy.client()
    pipe = client.pipeline(transaction=True)
    pipe.set(a, "1").set(b, "1").incr(a)
    with pytest.raises(redis.exceptions.ResponseError) as caught:
        pipe.execute()
    assert "EXECABORT" in str(caught.value) or "one server" in str(caught.value)
    assert proxy.direct(0).exists(a, b) == 0 and proxy.direct(1).exists(a, b) == 0
    # The exact bytes: +QUEUED as they come, the misplaced command's error, EXECABORT.
    sock = raw(proxy.port)
    sock.sendall(cmd("MULTI") + cmd("SET", a, "1") + cmd("SET", b, "1") + cmd("INCR", a) + cmd("EXEC") + cmd("EXISTS", a))
    expected = (
        b"+OK\r\n+QUEUED\r\n-ERR keys of a transaction must all map to one server (use a hash tag)\r\n"
        + b"+QUEUED\r\n" + EXECABORT + b":0\r\n"
    )
    assert recv_exactly(sock, len(expected)) == expected
    sock.close()
    assert proxy.direct(0).exists(a, b) == 0 and proxy.direct(1).exists(a, b) == 0


def test_past_transaction_connections_watch_gets_an_error(cluster):
    proxy = cluster(1, transaction_connections=1)
    first = proxy.client().pipeline()
    first.watch("k")
    second = proxy.client().pipeline()
    with pytest.raises(redis.exceptions.ResponseError, match="transaction_connections limit"):
        second.watch("k")
    second.reset()
    first.multi()
    first.set("k", "1")
    assert first.execute() == [True]
    second.watch("k")  # the connection is free again
    second.multi()
    second.incr("k")
    assert second.execute() == [2]


def pinned_clients(backend: redis.Redis) -> list:
    """The backend's client connections other than C{backend}'s own, from CLIENT LIST."""
    return [c for c in backend.client_list() if c["cmd"] != "client|list"]


def test_a_client_closing_mid_transaction_leaves_no_state_on_the_backend(cluster):
    proxy = cluster(1)
    direct = proxy.direct(0)
    client = proxy.client()
    assert client.set("k", "before")  # the shared connection is open
    sock = raw(proxy.port)
    sock.sendall(cmd("WATCH", "k") + cmd("MULTI") + cmd("SET", "k", "inside"))
    assert recv_exactly(sock, 16) == b"+OK\r\n+OK\r\n+QUEUED\r\n"[:16]
    in_multi = [c for c in pinned_clients(direct) if c.get("multi") not in (None, "-1")]
    assert len(in_multi) == 1  # the pinned connection is in MULTI on the backend
    sock.close()
    deadline = time.time() + 10
    while [c for c in pinned_clients(direct) if c.get("multi") not in (None, "-1")] and time.time() < deadline:
        time.sleep(0.02)  # the proxy closes the pinned connection when it sees the client go
    assert [c for c in pinned_clients(direct) if c.get("multi") not in (None, "-1")] == []
    assert client.get("k") == b"before"  # nothing was applied
    pipe = client.pipeline()
    pipe.watch("k")
    pipe.multi()
    pipe.set("k", "after")
    assert pipe.execute() == [True]  # the next transaction runs on a clean connection
    assert client.get("k") == b"after"


def test_a_resp3_clients_transaction_gets_resp3_replies(cluster):
    proxy = cluster(2, hash_tag="{}")
    sock = raw(proxy.port)
    sock.sendall(cmd("HELLO", "3") + cmd("MULTI") + cmd("HSET", "{h}:x", "f", "v") + cmd("HGETALL", "{h}:x")
                 + cmd("GET", "{h}:none") + cmd("EXEC") + cmd("HGETALL", "{h}:x"))
    data = b""
    expected_tail = b"+OK\r\n+QUEUED\r\n+QUEUED\r\n+QUEUED\r\n*3\r\n:1\r\n%1\r\n$1\r\nf\r\n$1\r\nv\r\n_\r\n%1\r\n$1\r\nf\r\n$1\r\nv\r\n"
    while not data.endswith(expected_tail):
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    assert data.startswith(b"%7\r\n")  # HELLO's map, then the transaction in RESP3 (maps, _ null)
    sock.close()
