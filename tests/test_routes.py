"""
The routing layer: the route interface, resumable requests (a route resends a
request before its client sees anything) and internal requests (the proxy's
own, never a client's nor counted), on in-memory transports and a fake clock.

L{FailoverRoute} is a test route built the way the interface's docstring says a
route kind is added: it holds two pool routes and resends a request to the
second when the first answers "retry" (Redis TRYAGAIN), fails or times out.
"""

from __future__ import annotations

from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from twistedproxy.api import build_pool
from twistedproxy.config import config_from_dict
from twistedproxy.core.client import ProxyFactory
from twistedproxy.core.request import REPLY_FINAL, REPLY_REDIRECT, REPLY_RETRY, Request
from twistedproxy.protocols import codec_for
from twistedproxy.routes.interface import IRoute, IServedRoute
from tests.support.resp import cmd
from tests.test_core import Harness, bulk


@implementer(IServedRoute)
class FailoverRoute:
    """Sends to C{primary}; a retry reply, a failure or a timeout there goes to C{secondary}, once."""

    def __init__(self, primary, secondary):
        self.primary = primary
        self.secondary = secondary
        # What a listener's route provides (IServedRoute): the primary pool's.
        self.name = primary.name
        self.config = primary.config
        self.codec = primary.codec
        self.reactor = primary.reactor
        self.stats = primary.stats
        self.flusher = primary.flusher
        self.clients = primary.clients
        self.resent = []

    def dispatch(self, request, codec, now, touched, dirty):
        request.resume = self._resume
        return self.primary.dispatch(request, codec, now, touched, dirty)

    def dispatch_slice(self, request, codec, now, touched, dirty):
        return self.primary.dispatch_slice(request, codec, now, touched, dirty)

    def _resume(self, request, raw, error, codec, dirty):
        if raw is not None and codec.classify_reply(request, raw) == REPLY_FINAL:
            return False
        request.resume = None  # one failover: what the secondary says is final
        self.resent.append((request.command, error if raw is None else raw))
        touched = []
        now = self.reactor.seconds()
        if request.parent is None:
            self.secondary.dispatch(request, codec, now, touched, dirty)
        else:
            # A fragment (its parent's hook is handed on to it): its frame goes
            # to the secondary's server of its first key (or any, for a broadcast).
            parent = request.parent
            key = parent.keys[request.key_indices[0]] if request.key_indices else b""
            self.secondary.server_set.send(self.secondary.server_for(key), request, codec, now, touched, dirty)
        self.secondary.flusher.add(touched)
        return True

    def client_gone(self, client):
        self.primary.client_gone(client)

    def start(self):
        self.primary.start()
        self.secondary.start()

    def retire(self):
        self.primary.retire()
        self.secondary.retire()

    def stop(self):
        self.primary.stop()
        self.secondary.stop()


def failover_harness(servers_extra=False, **pool_keys):
    """
    A harness whose clients use a L{FailoverRoute} from a pool on 7001 (and
    7003 with C{servers_extra}) to a pool on 7002.
    """
    h = Harness(servers=(7001, 7003) if servers_extra else (7001,), **pool_keys)
    second = dict(listen="127.0.0.1:22122", redis=True, servers=["127.0.0.1:7002:1"], **pool_keys)
    secondary = build_pool(config_from_dict({"beta": second}).pools[0], h.reactor)
    h.route = FailoverRoute(h.pool, secondary)
    h.factory = ProxyFactory(h.route)
    return h, secondary


def test_routes_provide_the_interface():
    h, secondary = failover_harness()
    assert verifyObject(IServedRoute, h.pool)
    assert verifyObject(IRoute, secondary)
    assert verifyObject(IServedRoute, h.route)


def test_a_retry_reply_is_resent_and_the_client_sees_only_the_final_reply_in_order():
    h, secondary = failover_harness()
    c, t = h.client()
    c.dataReceived(cmd("GET", "a") + cmd("GET", "b") + cmd("PING"))
    backends = h.accept()
    assert list(backends) == [7001]
    primary = backends[7001]
    assert primary.pending() == [[b"GET", b"a"], [b"GET", b"b"]]
    primary.protocol.dataReceived(b"-TRYAGAIN Multiple keys request during rehashing of slot\r\n" + bulk(b"B"))
    h.reactor.advance(0)
    assert t.value() == b""  # b's reply waits for a's, which went on to the secondary
    assert h.route.resent == [(b"get", b"-TRYAGAIN Multiple keys request during rehashing of slot\r\n")]
    backends = h.accept()
    assert backends[7002].pending() == [[b"GET", b"a"]]
    backends[7002].data[b"a"] = b"A"
    backends[7002].answer()
    assert t.value() == bulk(b"A") + bulk(b"B") + b"+PONG\r\n"
    # The client-facing counters saw each request once; each server what it was sent.
    assert h.pool.stats.commands[b"get"].total.count == 2
    assert h.pool.stats.forward_error == 0
    assert h.pool.servers[0].stats.requests == 2
    assert secondary.servers[0].stats.requests == 1


def test_a_final_reply_is_not_resent():
    h, _ = failover_harness()
    c, t = h.client()
    c.dataReceived(cmd("GET", "a"))
    backends = h.accept()
    backends[7001].protocol.dataReceived(b"-ERR wrong kind\r\n")
    h.reactor.advance(0)
    assert t.value() == b"-ERR wrong kind\r\n"
    assert h.route.resent == []


def test_a_refused_connection_fails_over_with_no_error_for_the_client():
    h, _ = failover_harness()
    c, t = h.client()
    c.dataReceived(cmd("SET", "k", "v") + cmd("GET", "k"))
    h.refuse()  # the primary's connection attempt
    assert [command for command, _ in h.route.resent] == [b"set", b"get"]
    backends = h.accept()
    assert list(backends) == [7002]
    backends[7002].answer()
    assert t.value() == b"+OK\r\n" + bulk(b"v")


def test_a_timed_out_request_is_resent_and_its_late_reply_is_swallowed():
    h, _ = failover_harness(timeout=100)
    c, t = h.client()
    c.dataReceived(cmd("GET", "slow"))
    primary = h.accept()[7001]
    h.reactor.advance(0.101)
    assert h.route.resent == [(b"get", "Connection timed out")]
    assert t.value() == b""
    second = h.accept()[7002]
    second.data[b"slow"] = b"fresh"
    second.answer()
    assert t.value() == bulk(b"fresh")
    t.clear()
    # The primary's late reply meets the stand-in the request left there, not
    # the next request on that connection.
    h.reactor.advance(1)  # past the backoff of the timed-out server
    primary.data[b"slow"] = b"late"
    primary.data[b"next"] = b"N"
    c.dataReceived(cmd("GET", "next"))
    assert primary.pending() == [[b"GET", b"slow"], [b"GET", b"next"]]
    primary.answer()
    assert t.value() == bulk(b"N")


def test_a_resent_fragment_is_merged_with_its_siblings():
    h, _ = failover_harness(servers_extra=True)
    c, t = h.client()
    x, y = h.key_on(7001), h.key_on(7003)
    c.dataReceived(cmd("MGET", x, y))
    backends = h.accept()
    assert backends[7001].pending() == [[b"mget", x]]
    assert backends[7003].pending() == [[b"mget", y]]
    backends[7003].data[y] = b"Y"
    backends[7003].answer()
    backends[7001].protocol.dataReceived(b"-TRYAGAIN busy\r\n")
    h.reactor.advance(0)
    assert t.value() == b""
    second = h.accept()[7002]
    assert second.pending() == [[b"mget", x]]
    second.data[x] = b"X"
    second.answer()
    assert t.value() == b"*2\r\n$1\r\nX\r\n$1\r\nY\r\n"


# -- internal requests ------------------------------------------------------------------


def test_handshake_requests_never_reach_the_client_nor_its_counters():
    h = Harness(servers=(7001,), redis_auth="secret", redis_db=3)
    c, t = h.client()
    c.dataReceived(cmd("AUTH", "secret") + cmd("GET", "a"))
    backend = h.accept()[7001]
    assert backend.pending() == [[b"AUTH", b"secret"], [b"SELECT", b"3"], [b"GET", b"a"]]
    backend.answer()
    assert t.value() == b"+OK\r\n$-1\r\n"  # the client's AUTH is the proxy's own answer
    stats = h.pool.stats
    assert sorted(stats.commands) == [b"auth", b"get"]  # the client's two, not the handshake's
    assert h.pool.servers[0].stats.requests == 1
    assert h.pool.servers[0].stats.responses == 1


def internal_ping_after_a_get():
    """A client's GET on 7001, then a route's own PING queued on the same connection; what its hook got."""
    h = Harness(servers=(7001,))
    c, t = h.client()
    c.dataReceived(cmd("GET", "a"))
    backend = h.accept()[7001]
    got = []
    ping = Request(cmd("PING"), b"ping")
    ping.resume = lambda request, raw, error, codec, dirty: got.append((request, raw, error)) or True
    touched = []
    backend.protocol.enqueue_internal(ping, h.reactor.seconds(), touched)
    h.pool.flusher.add(touched)
    h.reactor.advance(0)
    return h, t, backend, ping, got


def test_an_internal_request_of_a_route_goes_to_its_hook_uncounted():
    h, t, backend, ping, got = internal_ping_after_a_get()
    backend.answer()
    assert got == [(ping, b"+PONG\r\n", None)]
    assert t.value() == b"$-1\r\n"
    assert h.pool.servers[0].stats.requests == 1
    assert sorted(h.pool.stats.commands) == [b"get"]


def test_a_failed_internal_request_goes_to_its_hook_not_to_a_client():
    h, t, backend, ping, got = internal_ping_after_a_get()
    backend.protocol.connectionLost(Failure(ConnectionDone()))
    assert got == [(ping, None, "unknown")]
    assert t.value() == b"-ERR unknown\r\n"  # the client's own request, failed as before


def test_a_timed_out_internal_request_goes_to_its_hook_not_to_a_client():
    h = Harness(servers=(7001,), timeout=100)
    c, t = h.client()
    c.dataReceived(cmd("GET", "a"))
    backend = h.accept()[7001]
    got = []
    ping = Request(cmd("PING"), b"ping")
    ping.resume = lambda request, raw, error, codec, dirty: got.append((raw, error)) or True
    backend.protocol.enqueue_internal(ping, h.reactor.seconds(), [])
    backend.protocol.flush()
    h.reactor.advance(0.101)
    assert got == [(None, "Connection timed out")]
    assert t.value() == b"-ERR Connection timed out\r\n"
    backend.answer()  # both late replies are swallowed
    assert got == [(None, "Connection timed out")]
    assert t.value() == b"-ERR Connection timed out\r\n"


# -- reply classification -----------------------------------------------------------


def test_codecs_classify_replies():
    redis = codec_for("redis")
    request = Request(cmd("GET", "a"), b"get", key=b"a")
    assert redis.classify_reply(request, b"$1\r\nA\r\n") == REPLY_FINAL
    assert redis.classify_reply(request, b"-ERR nope\r\n") == REPLY_FINAL
    assert redis.classify_reply(request, b"-MOVED 3999 127.0.0.1:6381\r\n") == REPLY_REDIRECT
    assert redis.classify_reply(request, b"-ASK 3999 127.0.0.1:6381\r\n") == REPLY_REDIRECT
    assert redis.classify_reply(request, b"-TRYAGAIN busy\r\n") == REPLY_RETRY
    memcache = codec_for("memcache")
    for codec in (memcache,) + tuple(memcache.codecs):
        assert codec.classify_reply(request, b"SERVER_ERROR out of memory\r\n") == REPLY_FINAL
