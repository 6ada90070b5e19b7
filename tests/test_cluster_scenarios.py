"""
Issue #12's acceptance for Redis Cluster pools, with real processes on
loopback: a 6-node Redis Cluster (3 masters + 3 replicas, cluster-node-timeout
2000, tests/support/cluster.py) behind one proxy given one seed node.

  - A seeded random command stream gets the same replies through the proxy as
    from a single redis-server given the same stream; commands whose keys span
    slots get -CROSSSLOT as the cluster itself answers them.
  - Under 20 checking clients (tests/support/checking.py: each writes and reads
    keys of its own and checks every value), a reshard of 2000 slots, a CLUSTER
    FAILOVER on a replica and a new master followed by rebalance: no error and
    no wrong value.
  - A master killed with SIGKILL: errors only until the proxy follows the
    promoted replica, none for requests sent after that; values Redis itself
    lost are only those of the dead master's slots written before the
    promotion.  The window is measured and printed (pytest -s shows it).

Nothing here asserts a duration (the windows are printed, bench/README.md
keeps the figures); every boundary is an event seen on the cluster or
through the proxy.
"""

from __future__ import annotations

import platform
import threading
import time

import pytest
from redis.crc import key_slot

from tests.support import processes
from tests.support.checking import CheckingLoad, proxy_client
from tests.support.cluster import Cluster
from tests.support.command_stream import CommandStream, compare, is_cross_slot
from tests.support.processes import HOST, free_port
from tests.support.resp import Connection
from tests.support.workers import poll

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:Call to '__init__' function with deprecated usage:DeprecationWarning"),
]

CLIENTS = 20

# The topology scenarios run on PyPy only: each takes seconds of real cluster work, and the
# proxy's code paths are the same on both interpreters (the stream comparisons run on both).
# PyPy because it is the runtime the README recommends for production.
topology = pytest.mark.skipif(platform.python_implementation() != "PyPy",
                              reason="topology scenarios run on the PyPy pass of the suite only (suite time)")
# The pool's timeout bounds the proxy's retries of TRYAGAIN and CLUSTERDOWN (issue #12).
POOL_TIMEOUT_MS = 5000


@pytest.fixture(scope="module")
def cluster():
    """One 6-node cluster for the tests of this module that leave it whole."""
    cluster = Cluster(masters=3, replicas=1, node_timeout=2000).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def fresh_cluster():
    """A 6-node cluster of the test's own (for a scenario that kills a node)."""
    cluster = Cluster(masters=3, replicas=1, node_timeout=2000).start()
    yield cluster
    cluster.stop()


def start_proxy(spawn, cluster: Cluster, seed=None, **keys) -> int:
    """A proxy process with one cluster pool given one seed node (default: the first node); its port."""
    port = free_port()
    seed = seed or cluster.nodes[0]
    pool = {"listen": "%s:%d" % (HOST, port), "redis": True, "redis_cluster": True,
            "servers": ["%s:%d:1" % (HOST, seed.port)], "timeout": POOL_TIMEOUT_MS}
    pool.update(keys)
    spawn(processes.proxy, {"cluster": pool}, port)
    return port


def flush(cluster: Cluster) -> None:
    for master in cluster.masters():
        assert master.call("FLUSHALL") == b"OK"


def start_load(port: int) -> CheckingLoad:
    load = CheckingLoad(lambda: proxy_client(port), clients=CLIENTS).start()
    load.wait_ops(10 * CLIENTS)  # every client is connected and checking
    return load


def assert_clean(load: CheckingLoad, start: float, end: float, what: str) -> None:
    """No error, no bad value, and the load really ran while C{what} went on."""
    assert load.ops_between(start, end) > 0, "no operation completed during %s" % (what,)
    assert not load.errors(), "%s: %s; first errors: %r" % (what, load.summary(), load.errors()[:10])
    assert not load.bad_values(), "%s: %s; first bad values: %r" % (what, load.summary(), load.bad_values()[:10])


# -- replies as from a single redis-server ------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2])
def test_a_random_command_stream_gets_a_single_servers_replies(spawn, cluster, redis_backends, seed):
    flush(cluster)
    [single] = redis_backends(1)
    port = start_proxy(spawn, cluster)
    commands = CommandStream(seed).commands(3000)
    crossed = [c for c in commands if c.cross_slot]
    assert crossed and len(crossed) < len(commands)
    with Connection(port) as proxy, Connection(single.port) as reference, \
            Connection(cluster.nodes[-1].port) as node:
        mismatches = compare(proxy, reference, node, commands)
        assert not mismatches, "%d of %d replies differ; first: %s" % (
            len(mismatches), len(commands), "\n".join("#%d %r: got %r, expected %r" % m for m in mismatches[:10]))
        # The cluster's answer to a cross-slot command is -CROSSSLOT, and so is the proxy's.
        assert all(is_cross_slot(r) for r in proxy.pipeline([c.args for c in crossed]))


def test_the_stream_unpipelined_and_the_hash_tag_corners(spawn, cluster, redis_backends):
    """One command at a time (no pipelining), and the keys of Redis's hash-tag corner cases."""
    flush(cluster)
    [single] = redis_backends(1)
    port = start_proxy(spawn, cluster)
    commands = CommandStream(3).commands(600)
    with Connection(port) as proxy, Connection(single.port) as reference, \
            Connection(cluster.nodes[0].port) as node:
        mismatches = compare(proxy, reference, node, commands, batch=1)
        assert not mismatches, "first: %s" % ("\n".join("#%d %r: got %r, expected %r" % m for m in mismatches[:10]),)
        # On Redis 7.0 "{}{user}" is slot 6164 (the whole key), not the slot of "user".
        assert node.call("CLUSTER", "KEYSLOT", "{}{user}") == key_slot(b"{}{user}") == 6164
        assert proxy.call("SET", "{}{user}", "whole") == b"OK"
        owner = cluster.owner(6164)
        assert owner.call("GET", "{}{user}") == b"whole"


@topology
def test_the_stream_while_slots_move(spawn, cluster, redis_backends):
    """The same replies while redis-cli moves 2000 slots (ASK, TRYAGAIN and MOVED under a pipelined stream)."""
    flush(cluster)
    [single] = redis_backends(1)
    port = start_proxy(spawn, cluster)
    source, target = cluster.masters()[-2:]
    moving = threading.Thread(target=cluster.reshard, args=(source, target, 2000), daemon=True)
    sent = 0
    with Connection(port) as proxy, Connection(single.port) as reference, \
            Connection(cluster.nodes[0].port) as node:
        moving.start()
        seed = 100
        while moving.is_alive() or seed == 100:
            commands = CommandStream(seed, per_type=30).commands(1000)
            found = compare(proxy, reference, node, commands, batch=16)
            assert not found, "%d replies differ; first: %s" % (len(found), "\n".join(
                "#%d %r: got %r, expected %r" % m for m in found[:10]))
            sent += len(commands)
            seed += 1
    moving.join()
    assert cluster.is_ok()
    print("\n%d commands while 2000 slots moved: the same replies" % (sent,))


# -- topology changes under the checking load ---------------------------------------------


def clean_under_load(spawn, cluster: Cluster, what: str, change):
    """
    Run C{change()} under the checking load through a proxy and a little after it;
    assert no error and no bad value.  Returns C{change()}'s result.
    """
    load = start_load(start_proxy(spawn, cluster))
    try:
        start = time.time()
        result = change()
        end = time.time()
        load.wait_ops(10 * CLIENTS)  # and a little after: what the change left behind is read back
    finally:
        load.stop()
    print("\n%s: %.2f s, %s" % (what, end - start, load.summary()))
    assert_clean(load, start, end, what)
    return result


@topology
def test_a_reshard_of_2000_slots_under_load(spawn, cluster):
    source, target = cluster.masters()[:2]
    moved = set(cluster.slots_of(source))
    clean_under_load(spawn, cluster, "reshard of 2000 slots", lambda: cluster.reshard(source, target, 2000))
    assert len(moved - cluster.slots_of(source)) == 2000


@topology
def test_a_cluster_failover_on_a_replica_under_load(spawn, cluster):
    master = cluster.masters()[0]
    [replica] = cluster.replicas_of(master)
    old_master = clean_under_load(spawn, cluster, "CLUSTER FAILOVER", lambda: cluster.failover(replica))
    assert old_master is master and cluster.replicas_of(replica) == [master]


@topology
def test_a_new_master_and_rebalance_under_load(spawn, cluster):
    def grow():
        new = cluster.add_master()
        cluster.rebalance()
        return new

    new = clean_under_load(spawn, cluster, "add-node + rebalance --cluster-use-empty-masters", grow)
    assert len(cluster.slots_of(new)) == 4096  # a quarter of the slots: four masters now


# -- a master killed ----------------------------------------------------------------------


@topology
@pytest.mark.parametrize("victim_is_seed", [False, True], ids=["another-master", "the-seed"])
def test_a_master_killed_errors_only_until_its_replica_serves(spawn, fresh_cluster, victim_is_seed):
    """Killed: a master the proxy learnt from the map, or the one seed it was given."""
    cluster = fresh_cluster
    victim, other = [m for m in cluster.masters() if cluster.replicas_of(m)][:2]
    port = start_proxy(spawn, cluster, seed=victim if victim_is_seed else other)
    dead_slots = cluster.slots_of(victim)
    probe_key = next("probe:%d" % i for i in range(100000) if key_slot(b"probe:%d" % i) in dead_slots)
    load = start_load(port)
    prober = proxy_client(port)
    try:
        window = cluster.kill_master(victim)
        # Through the proxy, a key of the dead master's slots is served again: the proxy follows.
        poll(lambda: _succeeds(prober, probe_key), 30.0, message="the proxy to serve the dead master's slots")
        followed = time.time()
        load.wait_ops(20 * CLIENTS)
    finally:
        prober.close()
        load.stop()
    errors = load.errors()
    elsewhere = [e for e in errors if not any(key_slot(k.encode()) in dead_slots for k in e.keys)]
    print("\nSIGKILL of a master: the cluster promoted its replica %.2f s after the kill; the proxy served "
          "its slots %.2f s after the kill; %s; errors seen from %.2f s to %.2f s after the kill, %d of them "
          "for requests with no key of the dead master's slots (%s)" % (
              window["window"], followed - window["killed"], load.summary(),
              (errors[0].at - window["killed"]) if errors else 0, (errors[-1].at - window["killed"]) if errors else 0,
              len(elsewhere), elsewhere[0].detail if elsewhere else "-"))
    late = [e for e in errors if e.started > followed]
    assert not late, "errors for requests sent after the proxy followed the promotion: %r" % (late[:10],)
    early = [e for e in errors if e.at < window["killed"]]
    assert not early, "errors before the kill: %r" % (early[:10],)
    assert not load.bad_values("wrong"), load.bad_values("wrong")[:10]
    # A value Redis lost is one of the dead master's, written before its replica took over.
    lost = [e for e in load.bad_values("stale")
            if key_slot(e.keys[0].encode()) not in dead_slots or (e.written or 0) > window["promoted"]]
    assert not lost, "stale values Redis did not lose: %r" % (lost[:10],)


def _succeeds(client, key) -> bool:
    try:
        client.set(key, "x")
        return client.get(key) == b"x"
    except Exception:
        client.close()
        return False
