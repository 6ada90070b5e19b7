"""
The memcached cluster routes (failover, replicate, shadow, warm-up) and their
wiring from the configuration, on in-memory transports and a fake clock: the
exact bytes each backend is sent and what the client reads.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from twistedproxy.api import Proxy
from tests.test_core import memory_client

BIN_GET = 0x00
BIN_SET = 0x01


def pool(*ports, **keys):
    entry = {"servers": ["127.0.0.1:%d:1" % p for p in ports]}
    entry.update(keys)
    return entry


class Rig:
    """A proxy on a fake reactor: clients of its fronts, its backend connections by port."""

    def __init__(self, config: dict):
        self.reactor = MemoryReactorClock()
        self.proxy = Proxy.from_dict(config, self.reactor)
        self.handled = 0
        self.conns = {}  # port -> [(protocol, transport)] in the order made

    def client(self, front="front"):
        return memory_client(self.proxy.factories[front], self.reactor)

    def accept(self):
        for host, port, factory in [c[:3] for c in self.reactor.tcpClients[self.handled:]]:
            self.handled += 1
            protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
            transport = StringTransport()
            protocol.makeConnection(transport)
            self.conns.setdefault(port, []).append((protocol, transport))
        return self.conns

    def refuse(self):
        for host, port, factory in [c[:3] for c in self.reactor.tcpClients[self.handled:]]:
            self.handled += 1
            factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))

    def sent(self, port, index=0) -> bytes:
        """What the proxy wrote to connection C{index} of the server on C{port} since the last call."""
        self.accept()
        _, transport = self.conns[port][index]
        data = transport.value()
        transport.clear()
        return data

    def reply(self, port, data: bytes, index=0) -> None:
        self.accept()
        protocol, _ = self.conns[port][index]
        protocol.dataReceived(data)
        self.reactor.advance(0)

    def lose(self, port, index=0) -> None:
        protocol, _ = self.conns[port][index]
        protocol.connectionLost(Failure(ConnectionDone()))
        self.reactor.advance(0)

    def route(self, front="front"):
        return self.proxy.pools[front].root.pool  # the front's only route: a leaf of its (prefix-less) node


# -- wiring -------------------------------------------------------------------------------


def test_a_front_listens_and_pools_without_listen_do_not():
    rig = Rig({"a": pool(7001), "b": pool(7002, listen="127.0.0.1:22199"),
               "front": {"listen": "127.0.0.1:22121", "route": {"failover": ["a", "b"]}}})
    assert sorted(rig.proxy.factories) == ["b", "front"]
    front = rig.proxy.pools["front"]
    assert front.root.pool.routes == (rig.proxy.pools["a"], rig.proxy.pools["b"])


def test_pools_are_built_once_and_shared_by_every_route():
    rig = Rig({"a": pool(7001), "b": pool(7002),
               "one": {"listen": "127.0.0.1:22121", "route": {"failover": ["a", "b"]}},
               "two": {"listen": "127.0.0.1:22122", "route": {"replicate": ["b", "a"]}}})
    assert rig.route("one").routes[0] is rig.route("two").routes[1]


def test_a_reload_rebuilds_a_front_whose_pool_changed():
    from twistedproxy.config import config_from_dict

    config = {"a": pool(7001), "b": pool(7002),
              "front": {"listen": "127.0.0.1:22121", "route": {"failover": ["a", "b"]}}}
    rig = Rig(config)
    c, t = rig.client()
    front = rig.proxy.pools["front"]
    config["b"] = pool(7003)
    rig.proxy.reconfigure(config_from_dict(config))
    assert rig.proxy.pools["front"] is not front
    assert rig.route().routes[1] is rig.proxy.pools["b"]
    assert c.route is rig.proxy.pools["front"]  # its clients moved over
    config["front"]["client_max_pending"] = 10
    kept = rig.proxy.pools["front"]
    rig.proxy.reconfigure(config_from_dict(config))
    assert rig.proxy.pools["front"] is not kept  # its own settings changed: rebuilt too
    unchanged = rig.proxy.pools["front"]
    rig.proxy.reconfigure(config_from_dict(config))
    assert rig.proxy.pools["front"] is unchanged


# -- failover ------------------------------------------------------------------------------


def failover_rig(**keys):
    return Rig({"a": pool(7001, **keys), "b": pool(7002, **keys), "c": pool(7003, **keys),
                "front": {"listen": "127.0.0.1:22121", "route": {"failover": ["a", "b", "c"]}}})


def test_failover_on_refused_connection_reaches_the_next_pool_before_the_client_sees_anything():
    rig = failover_rig()
    c, t = rig.client()
    c.dataReceived(b"set k 0 0 1\r\nv\r\nget k\r\n")
    rig.refuse()  # a's server
    assert t.value() == b""
    assert rig.sent(7002) == b"set k 0 0 1\r\nv\r\nget k\r\n"
    rig.reply(7002, b"STORED\r\nVALUE k 0 1\r\nv\r\nEND\r\n")
    assert t.value() == b"STORED\r\nVALUE k 0 1\r\nv\r\nEND\r\n"
    assert rig.route().failovers == 2
    assert rig.proxy.pools["front"].stats.forward_error == 0


def test_failover_on_a_lost_connection_resends_exactly_the_requests_in_flight():
    rig = failover_rig()
    c, t = rig.client()
    c.dataReceived(b"get x\r\nget y\r\n")
    assert rig.sent(7001) == b"get x\r\nget y\r\n"
    rig.reply(7001, b"VALUE x 0 1\r\nX\r\nEND\r\n")
    rig.lose(7001)
    assert rig.sent(7002) == b"get y\r\n"
    rig.reply(7002, b"END\r\n")
    assert t.value() == b"VALUE x 0 1\r\nX\r\nEND\r\nEND\r\n"


def test_failover_on_timeout_and_the_late_reply_is_swallowed():
    rig = failover_rig(timeout=100)
    c, t = rig.client()
    c.dataReceived(b"get slow\r\n")
    assert rig.sent(7001) == b"get slow\r\n"
    rig.reactor.advance(0.101)
    assert rig.sent(7002) == b"get slow\r\n"
    rig.reply(7002, b"VALUE slow 0 1\r\nB\r\nEND\r\n")
    assert t.value() == b"VALUE slow 0 1\r\nB\r\nEND\r\n"
    rig.reply(7001, b"VALUE slow 0 1\r\nA\r\nEND\r\n")  # late: its stand-in takes it
    assert t.value() == b"VALUE slow 0 1\r\nB\r\nEND\r\n"


def test_an_error_reply_is_final():
    rig = failover_rig()
    c, t = rig.client()
    c.dataReceived(b"get k\r\n")
    rig.sent(7001)
    rig.reply(7001, b"SERVER_ERROR out of memory\r\n")
    assert t.value() == b"SERVER_ERROR out of memory\r\n"
    assert rig.route().failovers == 0


def test_the_last_routes_failure_is_the_clients_error():
    rig = failover_rig()
    c, t = rig.client()
    c.dataReceived(b"get k\r\n")
    rig.refuse()
    rig.refuse()
    assert t.value() == b""
    rig.refuse()
    assert t.value() == b"SERVER_ERROR Connection refused\r\n"
    assert rig.proxy.pools["front"].stats.forward_error == 1


def test_a_failed_part_of_a_multi_get_is_placed_anew_on_the_next_pool():
    rig = Rig({"a": pool(7001), "b": pool(7002, 7003),
               "front": {"listen": "127.0.0.1:22121", "route": {"failover": ["a", "b"]}}})
    b = rig.proxy.pools["b"]
    on2 = [k for k in (b"k%d" % i for i in range(100)) if b.server_for(k).spec.port == 7002][:2]
    on3 = [k for k in (b"k%d" % i for i in range(100)) if b.server_for(k).spec.port == 7003][:1]
    keys = [on2[0], on3[0], on2[1]]
    c, t = rig.client()
    c.dataReceived(b"get " + b" ".join(keys) + b"\r\n")
    assert rig.sent(7001) == b"get " + b" ".join(keys) + b"\r\n"
    rig.lose(7001)
    assert rig.sent(7002) == b"get %s %s\r\n" % (on2[0], on2[1])
    assert rig.sent(7003) == b"get %s\r\n" % (on3[0],)
    rig.reply(7003, b"VALUE %s 0 1\r\n3\r\nEND\r\n" % on3[0])
    rig.reply(7002, b"VALUE %s 0 1\r\n2\r\nEND\r\n" % on2[1])
    assert t.value() == b"VALUE %s 0 1\r\n3\r\nVALUE %s 0 1\r\n2\r\nEND\r\n" % (on3[0], on2[1])


def test_redis_failover():
    rig = Rig({"a": pool(7001, redis=True), "b": pool(7002, redis=True),
               "front": {"listen": "127.0.0.1:22121", "redis": True, "route": {"failover": ["a", "b"]}}})
    c, t = rig.client()
    c.dataReceived(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n")
    rig.sent(7001)
    rig.reply(7001, b"-TRYAGAIN busy\r\n")
    assert rig.sent(7002) == b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
    rig.reply(7002, b"$1\r\nv\r\n")
    assert t.value() == b"$1\r\nv\r\n"


# -- replicate -----------------------------------------------------------------------------


def replicate_rig(**keys):
    return Rig({"a": pool(7001, **keys), "b": pool(7002, **keys), "c": pool(7003, **keys),
                "front": {"listen": "127.0.0.1:22121", "route": {"replicate": ["a", "b", "c"]}}})


def test_writes_go_to_every_replica_and_the_client_gets_the_firsts_reply_at_once():
    rig = replicate_rig()
    c, t = rig.client()
    c.dataReceived(b"set k 5 0 1\r\nv\r\ndelete j\r\n")
    for port in (7001, 7002, 7003):
        assert rig.sent(port) == b"set k 5 0 1\r\nv\r\ndelete j\r\n"
    rig.reply(7001, b"STORED\r\nNOT_FOUND\r\n")
    assert t.value() == b"STORED\r\nNOT_FOUND\r\n"  # the others have not answered
    rig.reply(7002, b"STORED\r\nDELETED\r\n")
    rig.reply(7003, b"SERVER_ERROR out of memory\r\nDELETED\r\n")
    assert t.value() == b"STORED\r\nNOT_FOUND\r\n"
    route = rig.route()
    assert (route.copies, route.failures) == (4, 1)
    # The client-facing counters saw two requests; each server what it was sent.
    assert sum(s.total.count for s in rig.proxy.pools["front"].stats.commands.values()) == 2


def test_a_replica_that_is_down_fails_nothing_the_client_sees():
    rig = replicate_rig()
    c, t = rig.client()
    c.dataReceived(b"set k 0 0 1\r\nv\r\n")
    rig.accept()
    rig.lose(7003)
    rig.reply(7001, b"STORED\r\n")
    assert t.value() == b"STORED\r\n"
    assert rig.route().failures == 1


def test_noreply_writes_are_replicated_without_noreply_and_stay_silent():
    rig = replicate_rig()
    c, t = rig.client()
    c.dataReceived(b"set k 0 0 1 noreply\r\nv\r\nget k\r\n")
    assert rig.sent(7001) == b"set k 0 0 1\r\nv\r\nget k\r\n"
    assert rig.sent(7002) == b"set k 0 0 1\r\nv\r\n"
    rig.reply(7001, b"STORED\r\nVALUE k 0 1\r\nv\r\nEND\r\n")
    assert t.value() == b"VALUE k 0 1\r\nv\r\nEND\r\n"


def test_reads_go_to_the_first_replica_only():
    rig = replicate_rig()
    c, t = rig.client()
    c.dataReceived(b"get a b\r\ngets a\r\nmg a v\r\n")
    assert rig.sent(7001) == b"get a b\r\ngets a\r\nmg a v\r\n"
    assert 7002 not in rig.conns and 7003 not in rig.conns


def test_cas_goes_to_the_first_and_is_copied_as_a_set_when_stored():
    rig = replicate_rig()
    c, t = rig.client()
    c.dataReceived(b"cas k 3 60 1 99\r\nv\r\ncas j 0 0 1 7\r\nw\r\n")
    assert rig.sent(7001) == b"cas k 3 60 1 99\r\nv\r\ncas j 0 0 1 7\r\nw\r\n"
    assert 7002 not in rig.conns
    rig.reply(7001, b"STORED\r\nEXISTS\r\n")
    assert t.value() == b"STORED\r\nEXISTS\r\n"
    assert rig.sent(7002) == b"set k 3 60 1\r\nv\r\n"  # only the one that succeeded
    assert rig.sent(7003) == b"set k 3 60 1\r\nv\r\n"


def test_incr_is_copied_as_is_when_the_first_replica_counted():
    rig = replicate_rig()
    c, t = rig.client()
    c.dataReceived(b"incr n 2\r\ndecr m 1\r\n")
    rig.sent(7001)
    rig.reply(7001, b"12\r\nNOT_FOUND\r\n")
    assert t.value() == b"12\r\nNOT_FOUND\r\n"
    assert rig.sent(7002) == b"incr n 2\r\n"


def test_meta_writes_with_a_cas_lose_it_in_the_copies():
    rig = replicate_rig()
    c, t = rig.client()
    c.dataReceived(b"ms k 1 C55 T60\r\nv\r\nms j 1 T60\r\nw\r\n")
    assert rig.sent(7001) == b"ms k 1 C55 T60\r\nv\r\nms j 1 T60\r\nw\r\n"
    assert rig.sent(7002) == b"ms j 1 T60\r\nw\r\n"  # the plain one at once
    rig.reply(7001, b"HD\r\nHD\r\n")
    assert rig.sent(7002) == b"ms k 1 T60\r\nv\r\n"


def test_binary_writes_replicate_and_a_cas_write_loses_its_cas():
    rig = replicate_rig()
    c, t = rig.client()
    plain = _bin(BIN_SET, b"k", b"\x00" * 8, b"v")
    with_cas = _bin(BIN_SET, b"j", b"\x00" * 8, b"w", cas=9)
    c.dataReceived(plain + with_cas)
    assert rig.sent(7001) == plain + with_cas
    assert rig.sent(7002) == plain
    ok = _bin_reply(BIN_SET, 0)
    rig.reply(7001, ok + ok)
    assert t.value() == ok + ok
    assert rig.sent(7002) == _bin(BIN_SET, b"j", b"\x00" * 8, b"w")


def _bin(opcode, key, extras=b"", value=b"", cas=0):
    import struct

    return struct.pack(">BBHBBHIIQ", 0x80, opcode, len(key), len(extras), 0, 0,
                       len(extras) + len(key) + len(value), 0, cas) + extras + key + value


def _bin_reply(opcode, status, extras=b"", value=b"", cas=0):
    import struct

    return struct.pack(">BBHBBHIIQ", 0x81, opcode, 0, len(extras), 0, status,
                       len(extras) + len(value), 0, cas) + extras + value


# -- shadow --------------------------------------------------------------------------------


def shadow_rig(sample=1.0, queue=2, redis=False):
    return Rig({"a": pool(7001, redis=redis), "s": pool(7002, redis=redis),
                "front": {"listen": "127.0.0.1:22121", "redis": redis,
                          "route": {"shadow": "a", "copy_to": "s", "sample": sample, "queue": queue}}})


def test_shadow_copies_go_out_and_their_replies_are_dropped():
    rig = shadow_rig()
    c, t = rig.client()
    c.dataReceived(b"get k\r\n")
    assert rig.sent(7001) == b"get k\r\n"
    assert rig.sent(7002) == b"get k\r\n"
    rig.reply(7002, b"VALUE k 0 6\r\nshadow\r\nEND\r\n")
    assert t.value() == b""
    rig.reply(7001, b"END\r\n")
    assert t.value() == b"END\r\n"
    route = rig.route()
    assert (route.sent, route.dropped, route.waiting) == (1, 0, 0)
    assert sum(s.total.count for s in rig.proxy.pools["front"].stats.commands.values()) == 1
    # A copy is the route's own request: no server counter counts it.
    assert rig.proxy.pools["a"].servers[0].stats.requests == 1
    assert rig.proxy.pools["s"].servers[0].stats.requests == 0


def test_a_full_shadow_queue_drops_and_counts_and_the_real_requests_go_on():
    rig = shadow_rig(queue=2)
    c, t = rig.client()
    c.dataReceived(b"get a\r\nget b\r\nget c\r\nget d\r\n")
    assert rig.sent(7002) == b"get a\r\nget b\r\n"
    rig.reply(7001, b"END\r\nEND\r\nEND\r\nEND\r\n")
    assert t.value() == b"END\r\n" * 4
    route = rig.route()
    assert (route.sent, route.dropped, route.waiting) == (2, 2, 2)
    rig.reply(7002, b"END\r\n")
    c.dataReceived(b"get e\r\n")
    assert rig.sent(7002) == b"get e\r\n"
    assert (route.sent, route.dropped, route.waiting) == (3, 2, 2)


def test_a_failing_shadow_fails_nothing_and_frees_its_queue():
    rig = shadow_rig()
    c, t = rig.client()
    c.dataReceived(b"get a\r\n")
    rig.accept()
    rig.lose(7002)
    rig.reply(7001, b"END\r\n")
    assert t.value() == b"END\r\n"
    route = rig.route()
    assert (route.waiting, route.failed) == (0, 1)


def test_shadow_samples_evenly():
    rig = shadow_rig(sample=0.25, queue=100)
    c, t = rig.client()
    c.dataReceived(b"".join(b"get k%d\r\n" % i for i in range(8)))
    assert rig.sent(7002) == b"get k3\r\nget k7\r\n"


def test_redis_shadow():
    rig = shadow_rig(redis=True)
    c, t = rig.client()
    c.dataReceived(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n")
    assert rig.sent(7002) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n"
    rig.reply(7001, b"+OK\r\n")
    assert t.value() == b"+OK\r\n"


# -- warm-up -------------------------------------------------------------------------------


def warm_rig():
    return Rig({"cold": pool(7001), "warm": pool(7002),
                "front": {"listen": "127.0.0.1:22121", "route": {"warmup": "cold", "from": "warm"}}})


def test_a_miss_is_read_from_the_warm_pool_answered_and_added_to_the_cold_one():
    rig = warm_rig()
    c, t = rig.client()
    c.dataReceived(b"get k\r\n")
    assert rig.sent(7001) == b"get k\r\n"
    rig.reply(7001, b"END\r\n")
    assert rig.sent(7002) == b"mg k v f t\r\n"
    rig.reply(7002, b"VA 3 f7 t95\r\nhot\r\n")
    assert t.value() == b"VALUE k 7 3\r\nhot\r\nEND\r\n"
    assert rig.sent(7001) == b"ms k 3 F7 T95 ME\r\nhot\r\n"
    rig.reply(7001, b"HD\r\n")
    route = rig.route()
    assert (route.hits, route.fills, route.fill_failures) == (1, 1, 0)


def test_a_hit_on_the_cold_pool_is_answered_as_is():
    rig = warm_rig()
    c, t = rig.client()
    c.dataReceived(b"get k\r\n")
    rig.sent(7001)
    rig.reply(7001, b"VALUE k 0 1\r\nc\r\nEND\r\n")
    assert t.value() == b"VALUE k 0 1\r\nc\r\nEND\r\n"
    assert 7002 not in rig.conns


def test_a_miss_in_both_stays_a_miss_and_an_item_without_expiry_is_filled_without_one():
    rig = warm_rig()
    c, t = rig.client()
    c.dataReceived(b"get a b\r\n")
    rig.sent(7001)
    rig.reply(7001, b"END\r\n")
    assert rig.sent(7002) == b"mg a v f t\r\nmg b v f t\r\n"
    rig.reply(7002, b"EN\r\nVA 1 f0 t-1\r\nB\r\n")
    assert t.value() == b"VALUE b 0 1\r\nB\r\nEND\r\n"
    assert rig.sent(7001) == b"ms b 1 F0 ME\r\nB\r\n"
    assert rig.route().misses == 1


def test_a_multi_get_keeps_its_hits_and_key_order():
    rig = warm_rig()
    c, t = rig.client()
    c.dataReceived(b"get a b c\r\n")
    rig.sent(7001)
    rig.reply(7001, b"VALUE b 0 1\r\nB\r\nEND\r\n")
    assert rig.sent(7002) == b"mg a v f t\r\nmg c v f t\r\n"
    rig.reply(7002, b"VA 1 f0 t10\r\nA\r\nVA 1 f0 t10\r\nC\r\n")
    assert t.value() == b"VALUE a 0 1\r\nA\r\nVALUE b 0 1\r\nB\r\nVALUE c 0 1\r\nC\r\nEND\r\n"


def test_gets_reads_again_from_the_cold_pool_after_the_fill():
    rig = warm_rig()
    c, t = rig.client()
    c.dataReceived(b"gets k\r\n")
    rig.sent(7001)
    rig.reply(7001, b"END\r\n")
    rig.sent(7002)
    rig.reply(7002, b"VA 1 f2 t30\r\nw\r\n")
    assert rig.sent(7001) == b"ms k 1 F2 T30 ME\r\nw\r\n"
    assert t.value() == b""
    rig.reply(7001, b"NS\r\n")  # a client wrote it meanwhile: that value wins
    assert rig.sent(7001) == b"gets k\r\n"
    rig.reply(7001, b"VALUE k 0 3 41\r\nnew\r\nEND\r\n")
    assert t.value() == b"VALUE k 0 3 41\r\nnew\r\nEND\r\n"
    assert rig.route().fill_failures == 1


def test_meta_get_misses_are_filled_and_read_again():
    rig = warm_rig()
    c, t = rig.client()
    c.dataReceived(b"mg k v t c\r\n")
    rig.sent(7001)
    rig.reply(7001, b"EN\r\n")
    rig.reply(7002, b"VA 1 f0 t30\r\nw\r\n")
    assert rig.sent(7001) == b"ms k 1 F0 T30 ME\r\nw\r\n"
    rig.reply(7001, b"HD\r\n")
    assert rig.sent(7001) == b"mg k v t c\r\n"
    rig.reply(7001, b"VA 1 t30 c5\r\nw\r\n")
    assert t.value() == b"VA 1 t30 c5\r\nw\r\n"


def test_binary_get_misses_are_looked_up_with_meta_commands():
    rig = warm_rig()
    c, t = rig.client()
    get = _bin(BIN_GET, b"k")
    c.dataReceived(get)
    assert rig.sent(7001) == get
    rig.reply(7001, _bin_reply(BIN_GET, 1, value=b"Not found"))
    assert rig.sent(7002) == b"mg k v f t\r\n"
    rig.reply(7002, b"VA 1 f0 t30\r\nw\r\n")
    assert rig.sent(7001, index=1) == b"ms k 1 F0 T30 ME\r\nw\r\n"  # a text connection of its own
    rig.reply(7001, b"HD\r\n", index=1)
    assert rig.sent(7001) == get
    hit = _bin_reply(BIN_GET, 0, extras=b"\x00" * 4, value=b"w", cas=3)
    rig.reply(7001, hit)
    assert t.value() == hit


def test_warm_up_over_failover_fails_over_and_still_warms():
    rig = Rig({"cold": pool(7001), "spare": pool(7003), "warm": pool(7002),
               "front": {"listen": "127.0.0.1:22121",
                         "route": {"warmup": {"failover": ["cold", "spare"]}, "from": "warm"}}})
    c, t = rig.client()
    c.dataReceived(b"get k\r\n")
    rig.refuse()
    assert rig.sent(7003) == b"get k\r\n"
    rig.reply(7003, b"END\r\n")
    rig.reply(7002, b"VA 1 f0 t30\r\nw\r\n")
    assert t.value() == b"VALUE k 0 1\r\nw\r\nEND\r\n"
    assert rig.sent(7003) == b"ms k 1 F0 T30 ME\r\nw\r\n"  # into the server that missed


def test_warm_value_with_a_long_ttl_is_filled_as_an_absolute_time(monkeypatch):
    from twistedproxy.protocols import memcache_text

    monkeypatch.setattr(memcache_text.time, "time", lambda: 1000000000.0)
    fill = memcache_text.codec.warm_fill(b"k", (b"0", 3000000, b"v"))
    assert fill.frame == b"ms k 1 F0 T1003000000 ME\r\nv\r\n"
    assert memcache_text.codec.warm_fill(b"k", (b"0", 0, b"v")) is None
    assert memcache_text.codec.warm_fetch(b"a b").frame == b"mg YSBi v f t b\r\n"


def test_route_counters_are_in_the_stats_outputs():
    from twistedproxy.stats import prometheus, snapshots

    rig = shadow_rig(queue=1)
    c, t = rig.client()
    c.dataReceived(b"get a\r\nget b\r\n")
    snap = snapshots.merge([snapshots.snapshot(rig.proxy)])
    front = snap["pools"]["front"]
    assert (front["shadow_sent"], front["shadow_dropped"], front["shadow_queue"]) == (1, 1, 1)
    assert "shadow_sent" not in snap["pools"]["a"]
    doc = snapshots.twemproxy_document(snap)
    assert doc["front"]["shadow_dropped"] == 1 and "shadow_dropped" not in doc["a"]
    assert snapshots.counters_only(snap)["pools"]["front"].get("shadow_queue") is None  # a gauge
    text = prometheus.render(snap, 0.0).decode()
    assert 'cacheproxy_shadow_dropped_total{pool="front"} 1.0' in text
    assert 'cacheproxy_shadow_queue{pool="front"} 1.0' in text


def test_a_failed_part_of_an_mset_keeps_its_values_on_the_next_pool():
    rig = Rig({"a": pool(7001, redis=True), "b": pool(7002, 7003, redis=True),
               "front": {"listen": "127.0.0.1:22121", "redis": True, "route": {"failover": ["a", "b"]}}})
    b = rig.proxy.pools["b"]
    candidates = [b"k%d" % i for i in range(100)]
    on2 = [k for k in candidates if b.server_for(k).spec.port == 7002][:2]
    on3 = [k for k in candidates if b.server_for(k).spec.port == 7003][:1]
    keys = [on2[0], on3[0], on2[1]]
    c, t = rig.client()
    args = [b"MSET"] + [x for k in keys for x in (k, k.upper())]
    c.dataReceived(b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args))
    rig.accept()
    rig.lose(7001)
    frame = lambda *words: b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in words)
    assert rig.sent(7002) == frame(b"mset", on2[0], on2[0].upper(), on2[1], on2[1].upper())
    assert rig.sent(7003) == frame(b"mset", on3[0], on3[0].upper())
    rig.reply(7002, b"+OK\r\n")
    rig.reply(7003, b"+OK\r\n")
    assert t.value() == b"+OK\r\n"


def test_a_replicas_copy_fails_over_and_a_timed_out_copy_leaves_a_stand_in():
    rig = Rig({"a": pool(7001), "b": pool(7002, timeout=100), "c": pool(7003),
               "front": {"listen": "127.0.0.1:22121", "route": {"replicate": ["a", {"failover": ["b", "c"]}]}}})
    c, t = rig.client()
    c.dataReceived(b"set k 0 0 1\r\nv\r\n")
    assert rig.sent(7002) == b"set k 0 0 1\r\nv\r\n"
    rig.reply(7001, b"STORED\r\n")
    assert t.value() == b"STORED\r\n"
    rig.reactor.advance(0.101)  # the copy times out on b: c gets it
    assert rig.sent(7003) == b"set k 0 0 1\r\nv\r\n"
    rig.reply(7003, b"STORED\r\n")
    rig.reactor.advance(1)  # past b's backoff
    c.dataReceived(b"delete k\r\n")
    assert rig.sent(7002) == b"delete k\r\n"
    rig.reply(7002, b"STORED\r\nDELETED\r\n")  # the late reply meets the stand-in, not the delete's copy
    replicate = rig.route()
    assert (replicate.copies, replicate.failures, replicate.routes[1].failovers) == (2, 0, 1)


def test_a_broadcast_copy_is_done_once_every_server_answered():
    rig = Rig({"a": pool(7001), "b": pool(7002, 7003),
               "front": {"listen": "127.0.0.1:22121", "route": {"replicate": ["a", "b"]}}})
    c, t = rig.client()
    c.dataReceived(b"flush_all\r\n")
    for port in (7001, 7002, 7003):
        assert rig.sent(port) == b"flush_all\r\n"
    rig.reply(7001, b"OK\r\n")
    assert t.value() == b"OK\r\n"
    rig.reply(7002, b"SERVER_ERROR busy\r\n")
    rig.reply(7003, b"OK\r\n")
    assert rig.route().failures == 1


# -- a prefix front over compound routes and pools ------------------------------------------


def prefix_over_failover_rig(**keys):
    return Rig({"a": pool(7001, **keys), "b": pool(7002, **keys), "c": pool(7003, **keys),
                "front": dict(keys, listen="127.0.0.1:22121", route={
                    "prefix": {"f:": {"route": {"failover": ["a", "b"]}, "strip": True}, "c:": "c"}})})


def test_a_multi_get_over_a_failover_route_and_a_pool_is_split_and_merged_in_order():
    rig = prefix_over_failover_rig()
    c, t = rig.client()
    c.dataReceived(b"get c:1 f:2 c:3 f:4\r\n")
    assert rig.sent(7001) == b"get 2 4\r\n"  # the failover route's part, its prefix stripped
    assert rig.sent(7003) == b"get c:1 c:3\r\n"
    rig.reply(7003, b"VALUE c:3 0 1\r\n3\r\nEND\r\n")
    assert t.value() == b""
    rig.lose(7001)  # the part fails over to the next pool, the client still sees nothing
    assert rig.sent(7002) == b"get 2 4\r\n"
    rig.reply(7002, b"VALUE 4 0 1\r\n4\r\nVALUE 2 0 1\r\n2\r\nEND\r\n")
    assert t.value() == b"VALUE f:2 0 1\r\n2\r\nVALUE c:3 0 1\r\n3\r\nVALUE f:4 0 1\r\n4\r\nEND\r\n"
    assert rig.proxy.pools["front"].route_counters()["failovers"] == 1


def test_a_redis_mset_over_a_failover_route_and_a_pool_keeps_each_keys_value():
    rig = prefix_over_failover_rig(redis=True)
    c, t = rig.client()
    c.dataReceived(b"*7\r\n$4\r\nMSET\r\n$3\r\nf:1\r\n$1\r\nx\r\n$3\r\nc:2\r\n$1\r\ny\r\n$3\r\nf:3\r\n$1\r\nz\r\n")
    first = rig.sent(7001)
    assert first == b"*5\r\n$4\r\nmset\r\n$1\r\n1\r\n$1\r\nx\r\n$1\r\n3\r\n$1\r\nz\r\n"
    assert rig.sent(7003) == b"*3\r\n$4\r\nmset\r\n$3\r\nc:2\r\n$1\r\ny\r\n"
    rig.lose(7001)
    assert rig.sent(7002) == first  # resent with the values of its own keys
    rig.reply(7002, b"+OK\r\n")
    rig.reply(7003, b"+OK\r\n")
    assert t.value() == b"+OK\r\n"
    c.dataReceived(b"*4\r\n$4\r\nMGET\r\n$3\r\nf:3\r\n$3\r\nc:2\r\n$3\r\nf:9\r\n")
    assert rig.sent(7002) == b"*3\r\n$4\r\nmget\r\n$1\r\n3\r\n$1\r\n9\r\n"
    assert rig.sent(7003) == b"*2\r\n$4\r\nmget\r\n$3\r\nc:2\r\n"
    rig.reply(7003, b"*1\r\n$1\r\ny\r\n")
    rig.reply(7002, b"*2\r\n$1\r\nz\r\n$-1\r\n")
    assert t.value() == b"+OK\r\n*3\r\n$1\r\nz\r\n$1\r\ny\r\n$-1\r\n"


def test_a_front_sends_a_compound_routes_share_of_many_keys_in_parts_of_at_most_a_slice():
    from twistedproxy.routes.hash import SLICE_KEYS
    rig = prefix_over_failover_rig()
    c, t = rig.client()
    keys = [b"f:%d" % i for i in range(SLICE_KEYS + 3)] + [b"c:1"]
    c.dataReceived(b"get " + b" ".join(keys) + b"\r\n")
    sent = rig.sent(7001)
    assert sent == (b"get " + b" ".join(k[2:] for k in keys[:SLICE_KEYS]) + b"\r\n"
                    + b"get " + b" ".join(k[2:] for k in keys[SLICE_KEYS:-1]) + b"\r\n")
    rig.reply(7001, b"END\r\nVALUE %d 0 1\r\nv\r\nEND\r\n" % (SLICE_KEYS + 1))
    rig.reply(7003, b"END\r\n")
    assert t.value() == b"VALUE f:%d 0 1\r\nv\r\nEND\r\n" % (SLICE_KEYS + 1)
