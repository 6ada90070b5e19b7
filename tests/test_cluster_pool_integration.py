"""
Redis Cluster pools end to end: the proxy as a real process in front of a real
three-master cluster (redis-server 7 with cluster-enabled on free loopback
ports), driven by redis-py and raw frames.  Slots are moved by hand (CLUSTER
SETSLOT and MIGRATE) to see ASK during a move and MOVED after it.  Real clients
as users run them: redis-py 8 with its default settings (it says HELLO 3),
C{redis-cli -3}, and redis-py's transactions (issue #12).
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import redis

from tests.support import processes
from tests.support.cluster import Cluster
from tests.support.processes import HOST, free_port, pool_config
from tests.support.resp import Connection, ErrorReply
from tests.support.workers import Master, master_config
from twistedproxy.protocols.redis_cluster import key_slot

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster():
    started = Cluster(masters=3, replicas=0).start()
    yield started
    started.stop()


@pytest.fixture
def proxy(cluster, spawn):
    """A proxy of a cluster pool given one seed; returns (port, stats port)."""

    def start(seed=None, **keys):
        port = free_port()
        stats = free_port()
        keys.setdefault("timeout", 2000)
        config = {"c": pool_config([seed or cluster.ports[0]], port, redis_cluster=True, **keys)}
        spawn(processes.proxy, config, port, extra_args=["-s", str(stats), "-a", HOST])
        # Serve tests only once the proxy has read the slot map (every node is in its stats):
        # before that a seed answers for every slot, and a transaction pinned there would get
        # MOVED for the keys it does not serve.
        wait_for(lambda: len(known_nodes(stats)) >= len(cluster.ports))
        return port, stats

    return start


def known_nodes(stats: int) -> list:
    """The nodes in the proxy's stats (none while its stats port does not answer yet)."""
    try:
        pool = processes.read_stats_port(stats)["c"]
    except OSError:
        return []
    return [node for node, counters in pool.items() if isinstance(counters, dict)]


def connect(port: int) -> redis.Redis:
    return redis.Redis(host=HOST, port=port, socket_timeout=10, protocol=2)


def wait_for(check, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("not true after %ss" % timeout)


def test_keys_reach_the_node_of_their_slot(cluster, proxy):
    port, stats = proxy()
    client = connect(port)
    keys = ["user:%d" % i for i in range(200)]
    for key in keys:
        assert client.set(key, key + "!")
    for key in keys[:20]:
        owner = cluster.owner(key_slot(key.encode()))
        assert owner.call("GET", key) == (key + "!").encode()  # straight from the node: no redirect happened
        assert owner.call("CLUSTER", "KEYSLOT", key) == key_slot(key.encode())
    assert client.get("{}{user}") is None and cluster.nodes[0].call("CLUSTER", "KEYSLOT", "{}{user}") == 6164
    nodes = processes.read_stats_port(stats)["c"]
    for node_port in cluster.ports:  # every node found from one seed, with its counters
        assert nodes["%s:%d" % (HOST, node_port)]["requests"] > 0


def test_multi_key_commands_split_per_slot_and_unsplittable_ones_get_crossslot(cluster, proxy):
    port, _ = proxy()
    client = connect(port)
    pairs = {"mk:%d" % i: "v%d" % i for i in range(50)}
    assert client.mset(pairs)
    assert client.mget(list(pairs) + ["missing"]) == [v.encode() for v in pairs.values()] + [None]
    assert client.exists(*pairs) == 50
    assert client.delete(*list(pairs)[:25]) == 25
    assert client.unlink(*pairs) == 25
    # Several slots in one command that cannot be split: the cluster's own answer.
    client.sadd("set:a", "x")
    with pytest.raises(redis.ResponseError) as e:
        client.smove("set:a", "set:b", "x")
    assert str(e.value) == "Keys in request don't hash to the same slot"
    with pytest.raises(redis.ResponseError) as e:
        client.eval("return redis.call('get', KEYS[2])", 2, "k:a", "k:b")
    assert str(e.value).startswith("Keys in request don't hash to the same slot")
    client.set("r:a", "1")
    for command in (("RENAME", "r:a", "r:b"), ("RENAMENX", "r:a", "r:b"), ("MSETNX", "r:a", "1", "r:b", "2")):
        with pytest.raises(redis.ResponseError) as e:
            client.execute_command(*command)
        assert str(e.value) == "Keys in request don't hash to the same slot"
    assert client.rename("{r}a", "{r}b") if client.set("{r}a", "1") else False
    assert client.get("{r}b") == b"1" and client.msetnx({"{r}c": "3", "{r}d": "4"})
    # One slot by hash tag: fine.
    client.sadd("{s}:a", "x")
    assert client.smove("{s}:a", "{s}:b", "x")
    assert client.eval("return redis.call('get', KEYS[2])", 2, "{t}a", "{t}b") is None


def test_a_slot_being_moved_is_asked_then_moved(cluster, proxy):
    port, stats = proxy()
    client = connect(port)
    key = "moving-key"
    slot = key_slot(key.encode())
    client.set(key, "before")
    client.set("{moving-key}other", "stays")  # same slot, left on the source during the move
    source = cluster.owner(slot)
    target = next(n for n in cluster.nodes if n is not source)
    cluster.begin_move(slot, source, target)
    cluster.migrate_key(key, source, target)
    # The key is on the target now, the slot still the source's: -ASK, followed.
    assert client.get(key) == b"before"
    assert client.get("{moving-key}other") == b"stays"
    assert client.set(key, "during") and target.call("ASKING") == b"OK"
    cluster.migrate_key("{moving-key}other", source, target)
    cluster.end_move(slot, target)
    # The slot is the target's: the proxy's table says the source, -MOVED, followed.
    assert client.get(key) == b"during"
    assert client.mget(key, "{moving-key}other") == [b"during", b"stays"]
    pool = processes.read_stats_port(stats)["c"]
    assert pool["cluster_redirects"] >= 2
    # The map read after MOVED knows it: the next request goes straight there.
    wait_for(lambda: processes.read_stats_port(stats)["c"]["cluster_map_reads"] >= 2)
    before = processes.read_stats_port(stats)["c"]["cluster_redirects"]
    assert client.get(key) == b"during"
    assert processes.read_stats_port(stats)["c"]["cluster_redirects"] == before


def test_workers_and_cacheproxyctl_status_show_the_nodes(cluster, spawn):
    port = free_port()
    pool = pool_config([cluster.ports[2]], port, redis_cluster=True, timeout=2000)
    master = Master(spawn, master_config({"c": pool}), port)
    client = connect(port)
    for i in range(30):  # over both workers' connections
        assert connect(port).set("w%d" % i, i)
    assert client.get("w7") == b"7"
    argv = [sys.executable, "-m", "twistedproxy.control.cli", "-s", master.control_path, "status"]
    result = subprocess.run(argv, capture_output=True, text=True, cwd=processes.ROOT, env=processes.proxy_env(),
                            timeout=30)
    assert result.returncode == 0, result.stderr
    nodes = json.loads(result.stdout)["clusters"]["c"]
    owners = {cluster.owner(slot).address for slot in (0, 8000, 16383)}
    assert {label for label, node in nodes.items() if node["role"] == "master"} == owners
    assert all(node["slots"] for node in nodes.values() if node["role"] == "master")


def test_a_seed_that_is_down_is_skipped(cluster, proxy):
    dead = free_port()
    port = free_port()
    config = {"c": pool_config([dead, cluster.ports[1]], port, redis_cluster=True, timeout=2000)}
    p = processes.proxy(config, port)
    try:
        client = connect(port)
        wait_for(lambda: _works(client))
        assert client.get("skip") is None
    finally:
        p.stop()


def fetch(port: int, path: str) -> str:
    with urllib.request.urlopen("http://%s:%d%s" % (HOST, port, path), timeout=10) as response:
        return response.read().decode("utf-8")


def _works(client) -> bool:
    try:
        client.set("skip-probe", "1")
        return True
    except redis.ResponseError:
        return False


def test_reads_from_replicas_and_a_failover_followed_without_errors(spawn):
    replicated = Cluster(masters=3, replicas=1).start()
    try:
        port, stats = free_port(), free_port()
        http = free_port()
        config = {"c": pool_config([replicated.ports[0]], port, redis_cluster=True, timeout=2000,
                                   read_from="replica"),
                  "global": {"stats_http": "%s:%d" % (HOST, http)}}
        spawn(processes.proxy, config, port, extra_args=["-s", str(stats), "-a", HOST])

        def nodes():
            return json.loads(fetch(http, "/stats.json"))["twistedproxy"]["pools"]["c"]["servers"]

        client = connect(port)
        key = "replicated"
        master = replicated.owner(key_slot(key.encode()))
        [replica] = replicated.replicas_of(master)
        assert client.set(key, "v1")
        wait_for(lambda: client.get(key) == b"v1")  # replication is asynchronous
        assert nodes()[replica.address]["role"] == "replica"
        assert nodes()[master.address]["role"] == "master"
        assert "%s<br><small>replica " % (replica.address,) in fetch(http, "/status")
        reads_before = processes.read_stats_port(stats)["c"][replica.address]["requests"]
        assert client.get(key) in (b"v1",)
        assert processes.read_stats_port(stats)["c"][replica.address]["requests"] > reads_before
        # A graceful failover under traffic: the old master redirects, the map follows; no error.
        errors = []
        written = 0
        replica.call_ok("CLUSTER", "FAILOVER")
        deadline = time.time() + 20
        while time.time() < deadline and replica.role() != "master":
            try:
                written += 1
                client.set(key, "w%d" % written)
            except redis.RedisError as e:
                errors.append(str(e))
        replicated.wait_ok()
        for i in range(20):
            client.set(key, "after%d" % i)
        assert errors == []
        wait_for(lambda: nodes()[replica.address]["role"] == "master")
        assert nodes()[replica.address]["slots"]
    finally:
        replicated.stop()


# -- real clients as users run them ----------------------------------------------------------


@pytest.fixture
def proxy_port(proxy):
    return proxy()[0]


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
