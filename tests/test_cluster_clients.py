"""
Real clients through a Redis Cluster pool (issue #12): redis-py 8 with its
default settings (it says HELLO 3), C{redis-cli -3}, and redis-py's
transactions, against a real three-master cluster (tests/support/cluster.py)
behind a proxy process given one seed node.
"""

from __future__ import annotations

import platform
import subprocess
import threading

import pytest
import redis

from tests.support import processes
from tests.support.cluster import Cluster
from tests.support.processes import HOST, free_port, pool_config
from tests.support.resp import Connection, ErrorReply
from twistedproxy.protocols.redis_cluster import key_slot

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster():
    started = Cluster(masters=3, replicas=0).start()
    yield started
    started.stop()


@pytest.fixture
def proxy_port(cluster, spawn):
    """A proxy of a cluster pool seeded with the first node; its port."""
    port = free_port()
    config = {"c": pool_config([cluster.nodes[0].port], port, redis_cluster=True, timeout=2000)}
    spawn(processes.proxy, config, port)
    return port


def slots_of(keys) -> set:
    return {key_slot(key.encode()) for key in keys}


@pytest.mark.skipif(platform.python_implementation() == "PyPy",
                    reason="PyPy's test venv has redis-py 7 (redis-py 8 needs Python 3.10)")
def test_redis_py_8_with_default_settings(cluster, proxy_port):
    assert redis.__version__.split(".")[0] == "8"
    client = redis.Redis(host=HOST, port=proxy_port, socket_timeout=10)
    assert client.execute_command("HELLO")[b"proto"] == 3  # the default is RESP3
    keys = ["rp8:%d" % i for i in range(40)]
    assert len(slots_of(keys)) > 1 and len({cluster.owner(s).port for s in slots_of(keys)}) == 3
    for key in keys[:10]:
        assert client.set(key, key.upper())
    assert [client.get(key) for key in keys[:10]] == [key.upper().encode() for key in keys[:10]]
    assert client.mset({key: key + "!" for key in keys})
    assert client.mget(keys + ["rp8:missing"]) == [(key + "!").encode() for key in keys] + [None]
    hashes = ["rp8h:%d" % i for i in range(10)]
    for number, key in enumerate(hashes):
        assert client.hset(key, mapping={"f": number, "g": "x"}) == 2
    assert [client.hgetall(key) for key in hashes] == [{b"f": b"%d" % n, b"g": b"x"} for n in range(10)]
    assert client.hgetall("rp8h:missing") == {}


def redis_cli(port: int, *args) -> bytes:
    result = subprocess.run(["redis-cli", "-3", "--no-raw", "-h", HOST, "-p", str(port)] + list(args),
                            capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_redis_cli_3_output_is_the_nodes_own(cluster, proxy_port):
    with Connection(proxy_port) as conn:
        assert conn.call("HSET", "cli:h", "a", "1", "b", "2") == 2
        assert conn.call("SET", "{cli:h}k", "v") == b"OK"
    for command in (["HGETALL", "cli:h"], ["HGETALL", "cli:none"], ["MGET", "{cli:h}missing", "{cli:h}k"],
                    ["MGET", "{cli:h}k", "{cli:h}missing"]):
        node = cluster.owner(key_slot(command[1].encode())).port
        assert redis_cli(proxy_port, *command) == redis_cli(node, *command), command
    assert b'1# "a" => "1"\n' in redis_cli(proxy_port, "HGETALL", "cli:h")  # a RESP3 map, as the node sent it
    # The proxy answers HELLO itself, in the protocol asked for.
    assert b'"proto" => (integer) 3\n' in redis_cli(proxy_port, "HELLO", "3")
    # Across slots the node itself says CROSSSLOT; the proxy splits the MGET and joins the replies.
    assert redis_cli(proxy_port, "MGET", "cli:h-missing", "{cli:h}k") == b'1) (nil)\n2) "v"\n'


def test_a_transaction_pipeline_on_hash_tagged_keys(proxy_port):
    client = redis.Redis(host=HOST, port=proxy_port, socket_timeout=10, protocol=2)
    with client.pipeline(transaction=True) as pipe:
        pipe.set("{tx}a", "1").incr("{tx}a").hset("{tx}h", "f", "v").hgetall("{tx}h").get("{tx}a")
        assert pipe.execute() == [True, 2, 1, {b"f": b"v"}, b"2"]


def test_the_watch_retry_loop_of_ten_clients_ends_exact(proxy_port):
    counter, rounds, clients = "{ctr}counter", 20, 10
    redis.Redis(host=HOST, port=proxy_port, socket_timeout=10).delete(counter)
    failures = []
    retries = []

    def increment():
        client = redis.Redis(host=HOST, port=proxy_port, socket_timeout=10, protocol=2)
        try:
            for _ in range(rounds):
                with client.pipeline() as pipe:
                    while True:
                        try:
                            pipe.watch(counter)
                            value = int(pipe.get(counter) or 0)
                            pipe.multi()
                            pipe.set(counter, value + 1)
                            pipe.execute()
                            break
                        except redis.WatchError:
                            retries.append(1)
        except Exception as e:  # reported by the main thread
            failures.append(repr(e))

    threads = [threading.Thread(target=increment) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert failures == []
    assert int(redis.Redis(host=HOST, port=proxy_port, socket_timeout=10).get(counter)) == rounds * clients


def test_a_transaction_spanning_slots_is_aborted_whole(cluster, proxy_port):
    assert key_slot(b"span:a") != key_slot(b"span:b")
    with Connection(proxy_port) as conn:
        replies = conn.pipeline([("MULTI",), ("SET", "span:a", "1"), ("SET", "span:b", "2"), ("EXEC",)])
        assert replies[:2] == [b"OK", b"QUEUED"]
        assert isinstance(replies[2], ErrorReply) and replies[2].startswith(b"CROSSSLOT"), replies[2]
        assert isinstance(replies[3], ErrorReply) and replies[3].startswith(b"EXECABORT"), replies[3]
        assert conn.call("GET", "span:a") is None and conn.call("GET", "span:b") is None
    for key in (b"span:a", b"span:b"):
        assert cluster.owner(key_slot(key)).call("GET", key) is None
    client = redis.Redis(host=HOST, port=proxy_port, socket_timeout=10)
    with client.pipeline(transaction=True) as pipe:
        pipe.set("span:a", "1").set("span:b", "2")
        with pytest.raises(redis.ResponseError) as e:
            pipe.execute()  # redis-py raises the queued command's error (the CROSSSLOT) over EXECABORT
    assert "Command # 2 (SET span:b 2)" in str(e.value) and "don't hash to the same slot" in str(e.value)
    assert client.get("span:a") is None and client.get("span:b") is None
