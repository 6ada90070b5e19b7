"""
Multi-tenant fronts in memory: key prefixes stripped and put back by each codec
(exact bytes), and a front on a fake reactor routing to pools by prefix and by
AUTH user, splitting multi-key requests across pools, rate limits and the
per-tenant counters.
"""

from __future__ import annotations

import hashlib
import struct

from twisted.internet.testing import MemoryReactorClock, StringTransport

from twistedproxy.api import Proxy
from twistedproxy.config import config_from_dict
from twistedproxy.config.model import PoolConfig
from twistedproxy.protocols import memcache_binary as binary
from twistedproxy.protocols.memcache_text import codec as text_codec
from twistedproxy.protocols.redis import codec as redis_codec
from twistedproxy.routes.tenants import TokenBucket
from twistedproxy.stats import snapshots
from tests.support.resp import cmd
from tests.test_core import Harness

PLAIN = PoolConfig("plain")


def one(parser, data):
    requests = parser.feed(data)
    assert len(requests) == 1, requests
    return requests[0]


# -- Redis: frames without the prefix --------------------------------------------


def test_redis_strips_the_key_argument_of_one_key_commands():
    parser = redis_codec.request_parser(PLAIN)
    request = one(parser, cmd("SET", "t:k", "t:value"))
    redis_codec.strip_keys(request, b"t:")
    assert request.frame == cmd("SET", "k", "t:value")  # the value keeps its bytes
    assert request.key == b"k"
    request = one(parser, cmd("HSET", "t:h", "t:f", "v"))
    redis_codec.strip_keys(request, b"t:")
    assert request.frame == cmd("HSET", "h", "t:f", "v")
    request = one(parser, b"GET t:inline\r\n")
    redis_codec.strip_keys(request, b"t:")
    assert request.frame == cmd("GET", "inline")


def test_redis_strips_every_declared_key_of_eval():
    request = one(redis_codec.request_parser(PLAIN), cmd("EVAL", "s", "2", "t:a", "t:b", "t:arg"))
    redis_codec.strip_keys(request, b"t:")
    assert request.frame == cmd("EVAL", "s", "2", "a", "b", "t:arg")
    assert request.key == b"a"


def test_redis_strips_multi_key_requests_whole_and_per_group():
    parser = redis_codec.request_parser(PLAIN)
    request = one(parser, cmd("MSET", "t:a", "1", "t:b", "2"))
    redis_codec.strip_keys(request, b"t:")
    assert request.frame == cmd("mset", "a", "1", "b", "2")
    assert request.keys == [b"a", b"b"]
    request = one(parser, cmd("MGET", "x:1", "yy:2", "x:3"))
    frames = redis_codec.split(request, [[0, 2], [1]], [2, 0])
    assert frames == [cmd("mget", "1", "3"), cmd("mget", "yy:2")]
    assert redis_codec.restore_keys(request, b"*1\r\n$1\r\nv\r\n", b"x:") == b"*1\r\n$1\r\nv\r\n"


# -- memcached text and meta ----------------------------------------------------


def test_text_strips_command_lines():
    parser = text_codec.request_parser(PLAIN)
    cases = [
        (b"get t:k\r\n", b"get k\r\n"),
        (b"gat 10 t:k\r\n", b"gat 10 k\r\n"),
        (b"set t:k 1 2 3\r\nabc\r\n", b"set k 1 2 3\r\nabc\r\n"),
        (b"set t:k 1 2 3 noreply\r\nabc\r\n", b"set k 1 2 3\r\nabc\r\n"),
        (b"incr t:n 5\r\n", b"incr n 5\r\n"),
        (b"mg t:k v k\r\n", b"mg k v k\r\n"),
        (b"mg dDpr b v k\r\n", b"mg aw== b v k\r\n"),  # base64 "t:k" -> base64 "k"
        (b"ms t:k 2 T0\r\nxx\r\n", b"ms k 2 T0\r\nxx\r\n"),
    ]
    for sent, seen in cases:
        request = one(parser, sent)
        text_codec.strip_keys(request, b"t:")
        assert request.frame == seen, sent
        assert request.key == b"k" or request.key == b"n"


def test_text_multi_key_gets_strip_whole_and_per_group():
    parser = text_codec.request_parser(PLAIN)
    request = one(parser, b"gets t:a t:b\r\n")
    text_codec.strip_keys(request, b"t:")
    assert (request.frame, request.keys) == (b"gets a b\r\n", [b"a", b"b"])
    request = one(parser, b"gat 5 t:a u:b t:c\r\n")
    assert text_codec.split(request, [[0, 2], [1]], [2, 0]) == [b"gat 5 a c\r\n", b"gat 5 u:b\r\n"]


def test_text_puts_the_prefix_back_in_value_lines_and_meta_k_flags():
    get = one(text_codec.request_parser(PLAIN), b"gets a b\r\n")
    reply = b"VALUE a 0 1 7\r\nx\r\nVALUE b 5 2 8\r\nyy\r\nEND\r\n"
    assert text_codec.restore_keys(get, reply, b"t:") == (
        b"VALUE t:a 0 1 7\r\nx\r\nVALUE t:b 5 2 8\r\nyy\r\nEND\r\n"
    )
    assert text_codec.restore_keys(get, b"END\r\n", b"t:") == b"END\r\n"
    mg = one(text_codec.request_parser(PLAIN), b"mg k v k O1\r\n")
    assert text_codec.restore_keys(mg, b"VA 1 kk O1\r\nx\r\n", b"t:") == b"VA 1 kt:k O1\r\nx\r\n"
    assert text_codec.restore_keys(mg, b"HD b kaw==\r\n", b"t:") == b"HD b kdDpr\r\n"
    assert text_codec.restore_keys(mg, b"EN\r\n", b"t:") == b"EN\r\n"
    assert text_codec.restore_keys(mg, b"SERVER_ERROR out of memory\r\n", b"t:") == (
        b"SERVER_ERROR out of memory\r\n"
    )


# -- memcached binary ------------------------------------------------------------


def packet(magic, opcode, key=b"", extras=b"", value=b"", status=0, opaque=b"\x00\x00\x00\x07"):
    header = struct.pack(">BBHBBHI", magic, opcode, len(key), len(extras), 0, status,
                         len(extras) + len(key) + len(value))
    return header + opaque + bytes(8) + extras + key + value


def test_binary_strips_the_key_and_fixes_both_lengths():
    parser = binary.codec.request_parser(PLAIN)
    request = one(parser, packet(0x80, binary.SET, b"t:key", b"\x00" * 8, b"value"))
    binary.codec.strip_keys(request, b"t:")
    assert request.frame == packet(0x80, binary.SET, b"key", b"\x00" * 8, b"value")
    assert request.key == b"key"
    quiet = one(parser, packet(0x80, binary.GETKQ, b"t:key"))
    binary.codec.strip_keys(quiet, b"t:")
    assert quiet.frame == packet(0x80, binary.GETK, b"key")  # sent as GETK, as without a prefix


def test_binary_puts_the_prefix_back_in_getk_replies():
    request = one(binary.codec.request_parser(PLAIN), packet(0x80, binary.GETK, b"key"))
    reply = packet(0x81, binary.GETK, b"key", b"\x00\x00\x00\x01", b"value")
    assert binary.codec.restore_keys(request, reply, b"t:") == (
        packet(0x81, binary.GETK, b"t:key", b"\x00\x00\x00\x01", b"value")
    )
    plain = packet(0x81, binary.GET, b"", b"\x00\x00\x00\x01", b"value")
    assert binary.codec.restore_keys(request, plain, b"t:") == plain


# -- the token bucket ---------------------------------------------------------------


def test_token_bucket_refills_from_the_clock_it_is_given():
    bucket = TokenBucket(rate=2.0, burst=3, now=100.0)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(100.4) is False  # 0.8 of a token
    assert bucket.take(100.5) is True  # 1.0
    assert [bucket.take(110.0) for _ in range(4)] == [True, True, True, False]  # never more than the burst


# -- a front on a fake reactor -----------------------------------------------------------


class Front(Harness):
    """A proxy (pools and a front) on a fake reactor; clients and backends on StringTransports."""

    def __init__(self, pools: dict, front: str = "front"):
        self.reactor = MemoryReactorClock()
        self.proxy = Proxy(config_from_dict(pools), self.reactor)
        self.factory = self.proxy.factories[front]
        self.front = self.proxy.pools[front]
        self.handled = 0
        self.backends = {}

    def answer_all(self):
        self.accept()
        for backend in self.backends.values():
            backend.answer()


def redis_pools(front: dict, servers=(7001, 7002)) -> dict:
    pools = {"p%d" % port: {"redis": True, "servers": ["127.0.0.1:%d:1" % port]} for port in servers}
    front = dict(front, listen="127.0.0.1:22121", redis=True)
    pools["front"] = front
    return pools


PREFIX_TENANTS = {
    "tenants": {
        "a": {"prefix": "a:", "strip_prefix": True, "route": "p7001"},
        "b": {"prefix": "b:", "route": "p7002"},
    }
}


def test_pools_without_listen_get_no_listener():
    front = Front(redis_pools(PREFIX_TENANTS))
    assert sorted(front.proxy.factories) == ["front"]


def test_prefix_tenants_strip_or_keep_and_unmatched_keys_get_an_error():
    front = Front(redis_pools(PREFIX_TENANTS))
    client, transport = front.client()
    client.dataReceived(cmd("SET", "a:k", "1") + cmd("SET", "b:k", "2") + cmd("GET", "c:k") + cmd("GET", "a:k"))
    backends = front.accept()
    assert backends[7001].pending() == [[b"SET", b"k", b"1"], [b"GET", b"k"]]
    assert backends[7002].pending() == [[b"SET", b"b:k", b"2"]]
    front.answer_all()
    assert transport.value() == b"+OK\r\n+OK\r\n-ERR no route for this key\r\n$1\r\n1\r\n"
    assert not transport.disconnecting


def test_multi_key_requests_split_across_tenants_pools_and_merge_in_order():
    front = Front(redis_pools(PREFIX_TENANTS))
    client, transport = front.client()
    client.dataReceived(cmd("MSET", "a:1", "x", "b:2", "y", "a:3", "z"))
    backends = front.accept()
    assert backends[7001].pending() == [[b"mset", b"1", b"x", b"3", b"z"]]
    assert backends[7002].pending() == [[b"mset", b"b:2", b"y"]]
    front.answer_all()
    client.dataReceived(cmd("MGET", "b:2", "a:3", "a:1", "b:none"))
    assert backends[7001].pending() == [[b"mget", b"3", b"1"]]
    assert backends[7002].pending() == [[b"mget", b"b:2", b"b:none"]]
    front.answer_all()
    assert transport.value() == b"+OK\r\n*4\r\n$1\r\ny\r\n$1\r\nz\r\n$1\r\nx\r\n$-1\r\n"
    client.dataReceived(cmd("MGET", "a:1", "c:1"))
    assert transport.value().endswith(b"-ERR no route for this key\r\n")


def test_one_tenants_multi_key_request_goes_whole_to_its_pool():
    front = Front(redis_pools(PREFIX_TENANTS))
    client, transport = front.client()
    client.dataReceived(cmd("DEL", "a:1", "a:2"))
    assert front.accept()[7001].pending() == [[b"del", b"1", b"2"]]


def test_a_tenants_rate_limit_answers_errors_and_refills_with_time():
    tenants = {"tenants": {
        "a": {"prefix": "a:", "route": "p7001", "rate_limit": 1, "rate_burst": 2},
        "rest": {"default": True, "route": "p7002"},
    }}
    front = Front(redis_pools(tenants))
    client, transport = front.client()
    client.dataReceived(cmd("GET", "a:1") * 3 + cmd("GET", "other"))
    front.answer_all()
    assert transport.value() == b"$-1\r\n$-1\r\n-ERR tenant 'a' rate limit exceeded\r\n$-1\r\n"
    front.reactor.advance(1.0)
    client.dataReceived(cmd("GET", "a:1"))
    front.answer_all()
    assert transport.value() == b"$-1\r\n$-1\r\n-ERR tenant 'a' rate limit exceeded\r\n$-1\r\n$-1\r\n"
    stats = front.proxy.stats.pool("front").tenants
    assert (stats["a"].requests, stats["a"].errors, stats["a"].rate_limited) == (4, 1, 1)
    assert stats["rest"].requests == 1
    snap = snapshots.snapshot(front.proxy, settings=False)
    assert snap["pools"]["front"]["tenants"]["a"]["rate_limited"] == 1
    assert snap["pools"]["front"]["tenants"]["a"]["latency"]["count"] == 4


USER_TENANTS = {
    "tenants": {
        "acme": {"users": {"alice": "sha256:" + hashlib.sha256(b"secret").hexdigest()},
                 "route": {"prefix": {"acme:": {"route": "p7001", "strip": True}}},
                 "max_client_connections": 1},
        "globex": {"users": {"bob": "pw"}, "route": "p7002"},
    }
}


def test_users_choose_the_tenant_as_redis_7_acl_users():
    front = Front(redis_pools(USER_TENANTS))
    client, transport = front.client()
    client.dataReceived(cmd("GET", "acme:1") + cmd("AUTH", "alice", "wrong") + cmd("AUTH", "alice", "secret")
                        + cmd("GET", "acme:1") + cmd("GET", "other:1") + cmd("MGET", "acme:2", "x"))
    assert front.accept()[7001].pending() == [[b"GET", b"1"]]
    front.answer_all()
    assert transport.value() == (
        b"-NOAUTH Authentication required.\r\n"
        b"-WRONGPASS invalid username-password pair or user is disabled.\r\n"
        b"+OK\r\n$-1\r\n"
        b"-NOPERM this user has no permissions to access one of the keys used as arguments\r\n"
        b"-NOPERM this user has no permissions to access one of the keys used as arguments\r\n"
    )
    other, other_transport = front.client()
    other.dataReceived(cmd("AUTH", "alice", "secret") + cmd("AUTH", "bob", "pw") + cmd("GET", "acme:1"))
    assert front.accept()[7002].pending() == [[b"GET", b"acme:1"]]
    assert other_transport.value().startswith(
        b"-ERR max number of clients reached for tenant 'acme'\r\n+OK\r\n")
    tenants = front.proxy.stats.pool("front").tenants
    assert (tenants["acme"].connections, tenants["globex"].connections) == (1, 1)
    client.connectionLost(None)
    assert tenants["acme"].connections == 0


def test_tenants_appear_in_every_stats_output():
    from twistedproxy.stats import prometheus, status

    tenants = {"tenants": {
        "a": {"prefix": "a:", "route": "p7001", "rate_limit": 1, "rate_burst": 1},
        "rest": {"default": True, "route": "p7002"},
    }}
    front = Front(redis_pools(tenants))
    client, _ = front.client()
    client.dataReceived(cmd("GET", "a:1") * 2 + cmd("GET", "x"))
    front.answer_all()
    one_worker = snapshots.snapshot(front.proxy, settings=False)
    merged = snapshots.merge([one_worker, one_worker])
    assert merged["pools"]["front"]["tenants"]["a"]["requests"] == 4
    assert merged["pools"]["front"]["tenants"]["a"]["latency"]["count"] == 4
    assert "connections" not in snapshots.counters_only(merged)["pools"]["front"]["tenants"]["a"]
    document = snapshots.twemproxy_document(merged, now=0)
    assert document["front"]["tenant:a:rate_limited"] == 2
    assert all(not isinstance(v, dict) for v in document["front"].values())  # no mapping taken for a server
    report = snapshots.report(merged, now=0)
    assert report["twistedproxy"]["pools"]["front"]["tenants"]["rest"]["requests"] == 2
    assert report["twistedproxy"]["pools"]["front"]["tenants"]["rest"]["latency"]["count"] == 2
    metrics = prometheus.render(merged, now=1.0).decode()
    assert 'cacheproxy_tenant_rate_limited_total{pool="front",tenant="a"} 2.0' in metrics
    assert 'cacheproxy_tenant_request_duration_seconds_count{pool="front",tenant="a"} 4.0' in metrics
    page = status.render(merged, now=1.0)
    assert '<table class="tenants">' in page and '<td class="name">rest</td>' in page


def test_a_users_login_survives_a_hand_off_to_another_worker():
    front = Front(redis_pools(USER_TENANTS))
    client, _ = front.client()
    client.dataReceived(cmd("AUTH", "bob", "pw"))
    state = client.export_state()
    other = Front(redis_pools(USER_TENANTS))  # the worker taking the connection over
    adopted = other.factory.adopt()
    adopted.makeConnection(StringTransport())
    adopted.import_state(state)
    adopted.dataReceived(cmd("GET", "k"))
    other.reactor.advance(0)
    assert other.accept()[7002].pending() == [[b"GET", b"k"]]
    assert other.proxy.stats.pool("front").tenants["globex"].connections == 1


def test_a_reload_moves_clients_to_the_new_routes_and_keeps_logins():
    front = Front(redis_pools(USER_TENANTS))
    client, transport = front.client()
    client.dataReceived(cmd("AUTH", "bob", "pw"))
    changed = redis_pools({"tenants": {  # the tenants swap pools
        "globex": {"users": {"bob": "pw"}, "route": "p7001"},
        "acme": dict(USER_TENANTS["tenants"]["acme"], route={"prefix": {"acme:": "p7002"}}),
    }})
    front.proxy.reconfigure(config_from_dict(changed))
    new_front = front.proxy.pools["front"]
    assert new_front is not front.front and client.pool is new_front
    client.dataReceived(cmd("GET", "k"))
    assert front.accept()[7001].pending() == [[b"GET", b"k"]]
    assert front.proxy.stats.pool("front").tenants["globex"].connections == 1


def test_memcached_keyless_broadcasts_go_to_the_default_route_or_get_an_error():
    pools = {
        "m1": {"servers": ["127.0.0.1:7001:1"]},
        "front": {"listen": "127.0.0.1:22121", "route": {"prefix": {"a:": "m1"}}},
    }
    front = Front(pools)
    client, transport = front.client()
    client.dataReceived(b"flush_all\r\nget b:1\r\nget a:1 b:1\r\n")
    assert transport.value() == b"SERVER_ERROR no route for this key\r\n" * 3


def test_binary_rate_limit_and_prefix_replies_exact_bytes():
    pools = {
        "m1": {"servers": ["127.0.0.1:7001:1"]},
        "front": {"listen": "127.0.0.1:22121", "tenants": {
            "t": {"prefix": "t:", "strip_prefix": True, "route": "m1", "rate_limit": 1, "rate_burst": 1},
        }},
    }
    front = Front(pools)
    client, transport = front.client()
    client.dataReceived(packet(0x80, binary.GETK, b"t:key", opaque=b"\x00\x00\x00\x01")
                        + packet(0x80, binary.GETK, b"t:key", opaque=b"\x00\x00\x00\x02"))
    backend = front.accept()[7001]
    assert backend.transport.value() == packet(0x80, binary.GETK, b"key", opaque=b"\x00\x00\x00\x01")
    backend.protocol.dataReceived(packet(0x81, binary.GETK, b"key", b"\x00\x00\x00\x00", b"v",
                                         opaque=b"\x00\x00\x00\x01"))
    front.reactor.advance(0)
    text = b"tenant 't' rate limit exceeded"
    assert transport.value() == (
        packet(0x81, binary.GETK, b"t:key", b"\x00\x00\x00\x00", b"v", opaque=b"\x00\x00\x00\x01")
        + packet(0x81, binary.GETK, value=text, status=0x0086, opaque=b"\x00\x00\x00\x02")
    )


def test_a_front_groups_keys_by_server_only_for_pools_that_place_keys_themselves():
    """A hash pool takes keys grouped by server; a cluster or a migrating pool sees every key itself."""
    from twistedproxy.routes.cluster import ClusterRoute
    from twistedproxy.routes.hash import HashRoute
    from twistedproxy.routes.interface import IKeyPlacingRoute, IServedRoute
    from twistedproxy.routes.migrate import MigratingRoute
    from twistedproxy.routes.sessions import ISessionRoute

    assert IKeyPlacingRoute.implementedBy(HashRoute)
    for route in (ClusterRoute, MigratingRoute):
        assert not IKeyPlacingRoute.implementedBy(route)
        assert IServedRoute.implementedBy(route) and ISessionRoute.implementedBy(route)
