"""
Redis Cluster pools (C{redis_cluster: true}) on in-memory transports and a fake
clock: hash slots, the slot map (CLUSTER SHARDS and CLUSTER SLOTS), routing by
slot, MOVED, ASK, TRYAGAIN and CLUSTERDOWN, multi-key requests split per slot,
replica reads, and the configuration keys.
"""

from __future__ import annotations

import pytest
from twisted.internet.error import ConnectionRefusedError
from twisted.python.failure import Failure

from twistedproxy.config import ConfigError, config_from_dict
from twistedproxy.hashing.functions import hash_crc16
from twistedproxy.protocols.redis_cluster import cluster, key_slot
from twistedproxy.routes import cluster as cluster_module
from twistedproxy.routes.cluster import ClusterRoute
from tests.support.resp import cmd
from tests.test_core import Harness, bulk

HOST = b"127.0.0.1"
# Three masters, as redis-cli --cluster create deals the slots.
RANGES = ((0, 5460, 7001), (5461, 10922, 7002), (10923, 16383, 7003))


def shards_reply(ranges=RANGES, replicas=None) -> bytes:
    """CLUSTER SHARDS as Redis 7 answers it (RESP2): per shard its slots and nodes."""
    replicas = replicas or {}
    out = [b"*%d\r\n" % len(ranges)]
    for first, last, port in ranges:
        nodes = [(port, b"master")] + [(replica, b"replica") for replica in replicas.get(port, ())]
        out.append(b"*4\r\n" + bulk(b"slots") + b"*2\r\n:%d\r\n:%d\r\n" % (first, last) + bulk(b"nodes"))
        out.append(b"*%d\r\n" % len(nodes))
        for node_port, role in nodes:
            fields = [bulk(b"id"), bulk(b"%040d" % node_port), bulk(b"port"), b":%d\r\n" % node_port,
                      bulk(b"ip"), bulk(HOST), bulk(b"endpoint"), bulk(HOST), bulk(b"role"), bulk(role),
                      bulk(b"replication-offset"), b":0\r\n", bulk(b"health"), bulk(b"online")]
            out.append(b"*%d\r\n" % len(fields) + b"".join(fields))
    return b"".join(out)


def slots_reply(ranges=RANGES) -> bytes:
    """CLUSTER SLOTS (Redis before 7), a node that does not know its own ip saying ""."""
    out = [b"*%d\r\n" % len(ranges)]
    for first, last, port in ranges:
        host = b"" if port == 7001 else HOST
        out.append(b"*3\r\n:%d\r\n:%d\r\n*3\r\n%s:%d\r\n%s" % (first, last, bulk(host), port, bulk(b"x" * 40)))
    return b"".join(out)


class Cluster(Harness):
    """A cluster pool whose one seed is 7001, its map answered on start."""

    def __init__(self, ranges=RANGES, replicas=None, **keys):
        keys.setdefault("timeout", 1000)
        Harness.__init__(self, servers=(7001,), redis_cluster=True, **keys)
        self.pool.start()
        seed = self.accept()[7001]
        handshake = seed.pending()[:-1]  # READONLY when reads may go to replicas
        assert seed.pending()[-1] == [b"CLUSTER", b"SHARDS"]
        self.feed(7001, b"+OK\r\n" * len(handshake) + shards_reply(ranges, replicas))
        self.client_protocol, self.client_transport = self.client()

    def feed(self, port, raw: bytes) -> None:
        """The backend at C{port} sends C{raw} (replies to what it was sent, in order)."""
        backend = self.backends[port]
        backend.seen = len(backend.transport.value())
        backend.protocol.dataReceived(raw)
        self.reactor.advance(0)
        self.accept()  # connections to nodes the replies sent requests to

    def send(self, *args) -> None:
        self.client_protocol.dataReceived(cmd(*args))

    def reply(self) -> bytes:
        return self.client_transport.value()

    def key_in(self, port, prefix="k", avoid=()) -> bytes:
        first, last = {p: (f, l) for f, l, p in RANGES}[port]
        for i in range(100000):
            key = b"%s%d" % (prefix.encode(), i)
            if first <= key_slot(key) <= last and key_slot(key) not in avoid:
                return key
        raise AssertionError("no key for %d" % port)


# -- slots and the map -------------------------------------------------------------


def test_the_slot_is_crc16_xmodem_of_the_hash_tag_modulo_16384():
    assert key_slot(b"123456789") == 0x31C3  # CRC-16/XMODEM's check value
    assert key_slot(b"foo") == 12182  # what CLUSTER KEYSLOT foo answers
    assert key_slot(b"{user1000}.following") == key_slot(b"{user1000}.followers") == key_slot(b"user1000")
    assert key_slot(b"{}{user}") == 6164 != key_slot(b"user")  # an empty first tag: the whole key
    assert key_slot(b"a{b") == key_slot(b"a{b") and key_slot(b"}{x}") == key_slot(b"x")
    for key in (b"", b"a", b"hello world", bytes(range(120)) + bytes(range(130, 256))):  # no braces
        assert key_slot(key) == (hash_crc16(key) & 0xFFFF) % 16384  # twemproxy's crc16, unmasked above 16 bits


def test_cluster_shards_is_read_with_roles_and_replicas_not_failed():
    raw = shards_reply(((0, 99, 7001), (100, 16383, 7002)), {7001: (7004,)})
    assert cluster.parse_map(raw, "10.0.0.1") == [
        (0, 99, ("127.0.0.1", 7001), (("127.0.0.1", 7004),)),
        (100, 16383, ("127.0.0.1", 7002), ()),
    ]
    failed = raw.replace(b"$6\r\nonline\r\n", b"$6\r\nfailed\r\n")
    assert cluster.parse_map(failed, "h")[0][3] == ()  # a failed replica serves no reads
    loading = raw.replace(b"$6\r\nonline\r\n", b"$7\r\nloading\r\n")
    assert cluster.parse_map(loading, "h")[0][3] == (("127.0.0.1", 7004),)  # what 7.0 says of an idle replica


def test_cluster_slots_is_read_and_an_unknown_ip_is_the_asked_node():
    assert cluster.parse_map(slots_reply(), "127.0.0.9") == [
        (0, 5460, ("127.0.0.9", 7001), ()),
        (5461, 10922, ("127.0.0.1", 7002), ()),
        (10923, 16383, ("127.0.0.1", 7003), ()),
    ]
    assert cluster.parse_map(b"-ERR This instance has cluster support disabled\r\n", "h") is None
    assert cluster.map_unsupported(b"-ERR unknown subcommand 'SHARDS'. Try CLUSTER HELP.\r\n")


def test_redirects_are_read():
    assert cluster.redirect(b"-MOVED 3999 127.0.0.1:6381\r\n") == (True, 3999, ("127.0.0.1", 6381))
    assert cluster.redirect(b"-ASK 3999 ::1:6381\r\n") == (False, 3999, ("::1", 6381))
    assert cluster.redirect(b"-MOVED nonsense\r\n") is None


# -- routing -------------------------------------------------------------------------


def test_keys_go_to_the_master_of_their_slot_and_nodes_come_from_the_map():
    h = Cluster()
    assert sorted(h.pool.nodes) == [("127.0.0.1", 7001), ("127.0.0.1", 7002), ("127.0.0.1", 7003)]
    assert h.pool.node_role(h.pool.nodes[("127.0.0.1", 7002)]) == ("master", "5461-10922")
    for port in (7001, 7002, 7003):
        h.send("SET", h.key_in(port), b"v%d" % port)
    backends = h.accept()
    for port in (7001, 7002, 7003):
        assert backends[port].answer() == [[b"SET", h.key_in(port), b"v%d" % port]]
    assert h.reply() == b"+OK\r\n" * 3


def test_before_the_map_a_seed_gets_every_request_and_its_moved_is_followed():
    h = Harness(servers=(7001,), redis_cluster=True, timeout=1000)
    c, t = h.client()
    c.dataReceived(cmd("GET", "foo"))  # before start: no map yet
    seed = h.accept()[7001]
    assert seed.pending() == [[b"GET", b"foo"]]
    seed.protocol.dataReceived(b"-MOVED 12182 127.0.0.1:7003\r\n")
    h.reactor.advance(0)
    # The map is read at once (from the node just learned of), the request resent.
    assert h.accept()[7003].pending() == [[b"CLUSTER", b"SHARDS"], [b"GET", b"foo"]]
    h.backends[7003].protocol.dataReceived(shards_reply() + b"$3\r\nbar\r\n")
    h.reactor.advance(0)
    assert t.value() == b"$3\r\nbar\r\n"
    assert h.pool.masters[0].spec.port == 7001 and h.pool.masters[16383].spec.port == 7003


def redirected(h, redirect: bytes, port: int) -> bytes:
    """Send GET of a key of 7001, which answers C{redirect} (MOVED or ASK) to C{port}; the key."""
    key = h.key_in(7001)
    h.send("GET", key)
    h.accept()
    h.feed(7001, b"-%s %d 127.0.0.1:%d\r\n" % (redirect, key_slot(key), port))
    return key


def test_moved_resends_updates_the_slot_and_reads_the_map_again():
    h = Cluster()
    key = redirected(h, b"MOVED", 7002)
    assert h.reply() == b""  # the client never sees the redirect
    assert h.backends[7002].pending() == [[b"GET", key]]
    assert h.pool.masters[key_slot(key)].spec.port == 7002
    h.feed(7002, b"$1\r\nv\r\n")
    assert h.reply() == b"$1\r\nv\r\n"
    assert h.pool.map_reads == 1  # the map was read at start: the next read waits REFRESH_GAP
    h.reactor.advance(cluster_module.REFRESH_GAP)
    assert h.pool.map_reads == 2
    assert h.pool.redirects == 1


def test_ask_sends_asking_then_the_request_and_keeps_the_map():
    h = Cluster()
    key = redirected(h, b"ASK", 7003)
    target = h.backends[7003]
    assert target.pending() == [[b"ASKING"], [b"GET", key]]
    h.feed(7003, b"+OK\r\n$2\r\nv3\r\n")
    assert h.reply() == b"$2\r\nv3\r\n"
    assert h.pool.masters[key_slot(key)].spec.port == 7001
    assert h.pool.stats.servers["127.0.0.1:7003"].requests == 1  # ASKING is internal: not counted


def test_tryagain_is_retried_with_backoff_then_answered():
    h = Cluster()
    key = h.key_in(7002)
    h.send("MGET", key, key)
    h.accept()
    h.feed(7002, b"-TRYAGAIN Multiple keys request during rehashing of slot\r\n")
    assert h.reply() == b""
    h.reactor.advance(cluster_module.RETRY_FIRST)
    assert h.backends[7002].pending() == [[b"MGET", key, key]]
    h.feed(7002, b"*2\r\n$1\r\na\r\n$1\r\na\r\n")
    assert h.reply() == b"*2\r\n$1\r\na\r\n$1\r\na\r\n"
    assert h.pool.retries == 1


def test_a_cluster_that_stays_down_is_answered_within_the_timeout():
    h = Cluster(timeout=300)
    key = h.key_in(7003)
    h.send("GET", key)
    h.accept()
    down = b"-CLUSTERDOWN The cluster is down\r\n"
    h.feed(7003, down)
    for _ in range(100):
        if h.reply():
            break
        h.reactor.advance(0.01)
        if h.backends[7003].pending():
            h.feed(7003, down)
    assert h.reply() == down
    assert h.reactor.seconds() <= 0.3 + 1e-6
    assert h.pool.retries >= 3  # backing off: 10 ms, then as long as it waited so far


def test_multi_key_requests_are_split_per_slot_and_merged_in_order():
    h = Cluster()
    a = h.key_in(7001, "a")
    b = h.key_in(7001, "b", avoid=(key_slot(a),))  # same node, another slot
    c = h.key_in(7002, "c")
    h.send("MGET", a, c, b)
    backends = h.accept()
    backends[7001].data.update({a: b"A", b: b"B"})
    backends[7002].data[c] = b"C"
    assert backends[7001].answer() == [[b"mget", a], [b"mget", b]]  # one frame per slot
    backends[7002].answer()
    assert h.reply() == b"*3\r\n$1\r\nA\r\n$1\r\nC\r\n$1\r\nB\r\n"


def test_a_moved_part_of_a_split_request_goes_on_alone():
    h = Cluster()
    a, c = h.key_in(7001, "a"), h.key_in(7002, "c")
    h.send("DEL", a, c)
    backends = h.accept()
    h.feed(7001, b"-MOVED %d 127.0.0.1:7003\r\n" % key_slot(a))
    assert h.backends[7003].pending() == [[b"del", a]]
    h.feed(7003, b":1\r\n")
    backends[7002].data[c] = b"C"
    backends[7002].answer()
    assert h.reply() == b":2\r\n"


def test_a_node_that_fails_has_its_requests_fail_and_the_map_read_again():
    h = Cluster()
    reads = h.pool.map_reads
    h.send("GET", h.key_in(7003))
    h.refuse()
    assert h.reply() == b"-ERR Connection refused\r\n"
    h.reactor.advance(cluster_module.REFRESH_GAP)
    assert h.pool.map_reads == reads + 1


def test_the_older_map_request_is_used_when_shards_is_unknown():
    h = Harness(servers=(7001,), redis_cluster=True)
    h.pool.start()
    seed = h.accept()[7001]
    seed.protocol.dataReceived(b"-ERR unknown subcommand 'SHARDS'. Try CLUSTER HELP.\r\n")
    h.reactor.advance(0)
    assert seed.pending()[-1] == [b"CLUSTER", b"SLOTS"]
    seed.protocol.dataReceived(slots_reply())
    assert h.pool.masters[16383].spec.port == 7003


def test_reads_go_to_replicas_which_say_readonly_first():
    h = Cluster(replicas={7001: (7004,)}, read_from="replica")
    key = h.key_in(7001)
    h.send("GET", key)
    h.send("SET", key, "v")
    backends = h.accept()
    assert backends[7004].pending() == [[b"READONLY"], [b"GET", key]]
    assert backends[7001].pending()[-1] == [b"SET", key, b"v"]
    assert h.pool.node_role(h.pool.nodes[("127.0.0.1", 7004)]) == ("replica", "")


def test_prefer_replica_reads_from_the_master_while_the_replica_backs_off():
    h = Cluster(replicas={7001: (7004,)}, read_from="prefer_replica")
    key = h.key_in(7001)
    h.send("GET", key)
    h.refuse()  # 7004 refuses
    h.send("GET", key)
    assert h.backends[7001].pending()[-1] == [b"GET", key]


def test_the_route_is_a_hash_route_of_its_own_kind():
    h = Cluster()
    assert isinstance(h.pool, ClusterRoute)
    assert h.pool.counters() == {"cluster_redirects": 0, "cluster_retries": 0, "cluster_map_reads": 1}


# -- configuration ---------------------------------------------------------------------


def _pool(**keys):
    pool = {"listen": "127.0.0.1:22121", "redis": True, "servers": ["127.0.0.1:7001:1"], "redis_cluster": True}
    pool.update(keys)
    return {"alpha": pool}


def test_cluster_keys_are_checked():
    config = config_from_dict(_pool(cluster_refresh_interval=500, read_from="prefer_replica"))
    pool = config.pools[0]
    assert (pool.redis_cluster, pool.cluster_refresh_interval, pool.read_from) == (True, 500, "prefer_replica")
    assert config.warnings == ()
    for bad, words in (
        (dict(redis=False), "needs a redis pool"),
        (dict(read_from="slave"), "unknown read_from"),
        (dict(redis_db=2), "only database 0"),
        (dict(servers=["/tmp/redis.sock:1"]), "host:port"),
    ):
        with pytest.raises(ConfigError) as e:
            config_from_dict(_pool(**bad))
        assert words in str(e.value)
    with pytest.raises(ConfigError) as e:
        config_from_dict({"alpha": {"listen": "127.0.0.1:1", "redis": True, "servers": ["127.0.0.1:7001:1"],
                                    "read_from": "replica"}})
    assert "only valid in a Redis Cluster pool" in str(e.value)


def test_placement_keys_are_accepted_with_a_warning():
    config = config_from_dict(_pool(hash="murmur", distribution="modula", auto_eject_hosts=True))
    assert [w.split("key ")[1].split(":")[0] for w in config.warnings] == ["'hash'", "'distribution'",
                                                                           "'auto_eject_hosts'"]
    assert "not used by a Redis Cluster pool" in config.warnings[0]


def test_check_config_prints_the_warnings(tmp_path):
    import io

    from twistedproxy.tap import check_config

    path = tmp_path / "cluster.yml"
    path.write_text("alpha:\n  listen: 127.0.0.1:22121\n  redis: true\n  redis_cluster: true\n"
                    "  hash: murmur\n  servers:\n    - 127.0.0.1:7001:1\n")
    out = io.StringIO()
    assert check_config(str(path), out)
    assert out.getvalue() == (
        "cacheproxy: warning: %s:5: pool 'alpha': key 'hash': not used by a Redis Cluster pool (keys go by hash"
        " slot, nodes by the cluster's map)\ncacheproxy: configuration file '%s' syntax is ok\n" % (path, path))


def test_multi_key_reads_go_to_replicas_per_slot():
    h = Cluster(replicas={7001: (7004,), 7002: (7005,)}, read_from="replica")
    a, c = h.key_in(7001, "a"), h.key_in(7002, "c")
    h.send("MGET", a, c)
    h.send("DEL", a, c)
    backends = h.accept()
    assert backends[7004].pending() == [[b"READONLY"], [b"mget", a]]
    assert backends[7005].pending() == [[b"READONLY"], [b"mget", c]]
    assert backends[7001].pending()[-1] == [b"del", a] and backends[7002].pending()[-1] == [b"del", c]


def test_a_node_that_leaves_the_map_closes_its_connections_once_idle():
    h = Cluster(cluster_refresh_interval=50)
    key = h.key_in(7003)
    h.send("GET", key)
    node = h.accept()[7003]
    h.reactor.advance(0.05)  # the periodic read
    h.accept()
    source = next(b for b in h.backends.values() if b.pending()[-1:] == [[b"CLUSTER", b"SHARDS"]])
    if source is node:  # its GET is older than the map read: the proxy reads its reply first
        h.feed(7003, b"$1\r\nv\r\n")
    h.feed(source.port, shards_reply(((0, 5460, 7001), (5461, 16383, 7002))))
    assert h.pool.node_role(h.pool.nodes[("127.0.0.1", 7003)]) == ("unknown", "")
    if source is not node:
        assert not node.transport.disconnecting  # its GET is still unanswered
        h.feed(7003, b"$1\r\nv\r\n")
    assert h.reply() == b"$1\r\nv\r\n"
    assert node.transport.disconnecting


def test_stats_show_every_node_with_its_role_and_slots():
    from twistedproxy.stats import snapshots, status
    from twistedproxy.stats.recorder import StatsRegistry

    h = Cluster(replicas={7001: (7004,)})
    h.send("GET", h.key_in(7002))
    h.accept()[7002].answer()

    class Proxy:  # what a snapshot reads of a proxy
        pools = {"alpha": h.pool}
        stats = StatsRegistry(h.reactor, h.config.global_)
        reactor = h.reactor
        ports = []

    snap = snapshots.snapshot(Proxy(), settings=False)
    pool = snap["pools"]["alpha"]
    assert pool["cluster_map_reads"] == 1 and pool["cluster_redirects"] == 0
    nodes = pool["servers"]
    assert sorted(nodes) == ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003", "127.0.0.1:7004"]
    assert (nodes["127.0.0.1:7002"]["role"], nodes["127.0.0.1:7002"]["slots"]) == ("master", "5461-10922")
    assert (nodes["127.0.0.1:7004"]["role"], nodes["127.0.0.1:7004"]["slots"]) == ("replica", "")
    assert nodes["127.0.0.1:7002"]["requests"] == 1  # the map read is internal: not counted
    merged = snapshots.merge([snap, snap])
    assert merged["pools"]["alpha"]["servers"]["127.0.0.1:7001"]["role"] == "master"
    assert merged["pools"]["alpha"]["servers"]["127.0.0.1:7002"]["requests"] == 2
    assert "role" not in snapshots.counters_only(snap)["pools"]["alpha"]["servers"]["127.0.0.1:7001"]
    report = snapshots.report(merged)
    assert report["twistedproxy"]["pools"]["alpha"]["servers"]["127.0.0.1:7001"]["slots"] == "0-5460"
    assert report["alpha"]["cluster_redirects"] == 0  # the stats port's document
    assert "127.0.0.1:7001<br><small>master 0-5460</small>" in status.render(merged)


def test_a_front_sends_a_tenants_requests_to_a_cluster_pool_which_follows_its_redirects():
    from tests.test_tenants import Front

    pools = {
        "cluster": {"redis": True, "redis_cluster": True, "servers": ["127.0.0.1:7001:1"]},
        "plain": {"redis": True, "servers": ["127.0.0.1:7009:1"]},
        "front": {"listen": "127.0.0.1:22121", "redis": True, "tenants": {
            "a": {"prefix": "a:", "route": "cluster"}, "b": {"prefix": "b:", "route": "plain"}}},
    }
    front = Front(pools)
    client, transport = front.client()
    client.dataReceived(cmd("GET", "a:k"))
    seed = front.accept()[7001]
    assert seed.pending() == [[b"GET", b"a:k"]]  # no map yet: the seed
    seed.protocol.dataReceived(b"-MOVED %d 127.0.0.1:7003\r\n" % key_slot(b"a:k"))
    front.reactor.advance(0)
    node = front.accept()[7003]
    assert node.pending() == [[b"CLUSTER", b"SHARDS"], [b"GET", b"a:k"]]  # the map is read there at once
    node.protocol.dataReceived(shards_reply() + b"$1\r\nv\r\n")
    node.seen = len(node.transport.value())
    front.reactor.advance(0)
    assert transport.value() == b"$1\r\nv\r\n"
    # Keys of the cluster pool and of another in one request: the cluster pool's share is a
    # request of its own, which it splits per slot (and would resend) itself.
    a1, a2 = b"a:x", b"a:y"
    assert key_slot(a1) != key_slot(a2)
    client.dataReceived(cmd("MGET", a1, "b:k", a2))
    backends = front.accept()
    placed = {key: front.proxy.pools["cluster"].server_for(key).spec.port for key in (a1, a2)}
    for key, port in placed.items():
        assert [b"mget", key] in backends[port].pending()
    assert backends[7009].pending() == [[b"mget", b"b:k"]]
    backends[7009].data[b"b:k"] = b"B"
    backends[7009].answer()
    for port in sorted(set(placed.values())):
        backends[port].data.update({a1: b"X", a2: b"Y"})
        backends[port].answer()
    assert transport.value() == b"$1\r\nv\r\n*3\r\n$1\r\nX\r\n$1\r\nB\r\n$1\r\nY\r\n"


def test_a_transaction_is_pinned_per_slot_and_a_second_slot_gets_crossslot():
    h = Cluster(transaction_connections=2)
    a = h.key_in(7001, "a")
    b = h.key_in(7001, "b", avoid=(key_slot(a),))  # same node, another slot
    h.send("MULTI")
    h.send("SET", a, "1")
    h.send("SET", b, "2")
    h.send("EXEC")
    pinned = h.accept()[7001]
    assert pinned.pending()[-2:] == [[b"MULTI"], [b"SET", a, b"1"]]
    h.feed(7001, b"+OK\r\n+QUEUED\r\n")
    assert h.reply() == (b"+OK\r\n+QUEUED\r\n-CROSSSLOT Keys in request don't hash to the same slot\r\n"
                         b"-EXECABORT Transaction discarded because of previous errors.\r\n")
