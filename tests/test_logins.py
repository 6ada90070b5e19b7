"""
Failed logins counted and limited per client address (core/logins.py): the
counting class on a given clock, and Redis AUTH / HELLO AUTH through a proxy on
a fake reactor (exact bytes), with the counters in the stats.
"""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.address import IPv4Address

from twistedproxy.api import Proxy
from twistedproxy.config import config_from_dict
from twistedproxy.core.logins import FailureCounter, LocalAuthLimiter, RecentAttempts, RemoteAuthLimiter
from twistedproxy.stats import prometheus, snapshots
from tests.support.resp import cmd

TOO_MANY = b"-WRONGPASS too many failed authentication attempts from this address; try again later\r\n"
INVALID = b"-ERR invalid password\r\n"
WRONGPASS = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n"


def test_the_limit_th_failure_within_a_minute_blocks_for_the_block_time():
    counter = FailureCounter(limit=3, block_seconds=60)
    assert [counter.failed("10.0.0.1", t) for t in (0, 10, 20)] == [False, False, True]
    assert counter.blocked("10.0.0.1", 20) and counter.blocked("10.0.0.1", 79.9)
    assert not counter.blocked("10.0.0.2", 20)
    assert not counter.blocked("10.0.0.1", 80)  # the block ended: counted afresh
    assert [counter.failed("10.0.0.1", t) for t in (81, 82)] == [False, False]


def test_failures_older_than_a_minute_no_longer_count():
    counter = FailureCounter(limit=3, block_seconds=60)
    assert [counter.failed("a", t) for t in (0, 30, 61, 62)] == [False, False, False, True]
    assert counter.blocks(62) == {"a": 60}


def test_a_limit_of_zero_never_blocks_and_many_addresses_are_swept():
    counter = FailureCounter(limit=0, block_seconds=60)
    assert not any(counter.failed("a", t) for t in range(100))
    counter = FailureCounter(limit=2, block_seconds=60)
    for n in range(5000):
        counter.failed("10.%d" % n, n * 0.1)
    assert len(counter._failures) < 5000  # the ones older than the window went


def test_a_repeated_attempt_counts_once_towards_the_limit_until_a_minute_without_it():
    reactor = MemoryReactorClock()
    limiter = LocalAuthLimiter(reactor, limit=2, block_seconds=60)
    for _ in range(11):  # a client library retrying one wrong password by itself
        limiter.failed("10.0.0.1", b"alice\0typo")
    assert not limiter.blocked("10.0.0.1")
    limiter.failed("10.0.0.2", b"alice\0typo")  # another address's attempts are its own
    assert not limiter.blocked("10.0.0.2")
    reactor.advance(30)
    limiter.failed("10.0.0.1", b"alice\0guess")  # a new guess: the second failure
    assert limiter.blocked("10.0.0.1")
    recent = RecentAttempts()
    assert [recent.first("a", b"x", t) for t in (0, 59, 118, 179)] == [True, False, False, True]


def test_a_workers_limiter_reports_failures_and_holds_the_masters_blocks():
    reactor = MemoryReactorClock()
    reported = []
    limiter = RemoteAuthLimiter(reactor, reported.append)
    limiter.failed("10.0.0.1", b"alice\0guess")
    limiter.failed("10.0.0.1", b"alice\0guess")  # a repeat: not reported again
    limiter.failed("10.0.0.1", b"alice\0other")
    assert reported == ["10.0.0.1", "10.0.0.1"] and not limiter.blocked("10.0.0.1")
    limiter.block("10.0.0.1", 30.0)
    assert limiter.blocked("10.0.0.1")
    reactor.advance(30.0)
    assert not limiter.blocked("10.0.0.1")


def proxy_with(pool: dict, **glob):
    reactor = MemoryReactorClock()
    pool = dict(pool, listen="127.0.0.1:22121", redis=True)
    if "tenants" not in pool:
        pool["servers"] = ["127.0.0.1:7001:1"]
    data = {"front": pool}
    if "tenants" in pool:
        data["p7001"] = {"redis": True, "servers": ["127.0.0.1:7001:1"]}
    if glob:
        data["global"] = glob
    return Proxy(config_from_dict(data), reactor)


def client_of(proxy, host="10.0.0.1"):
    client = proxy.factories["front"].buildProtocol(IPv4Address("TCP", host, 50000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", host, 50000))
    client.makeConnection(transport)
    return client, transport


def test_redis_auth_is_refused_unchecked_once_an_address_failed_too_often():
    proxy = proxy_with({"redis_auth": "secret"}, auth_failures_limit=2, auth_block_seconds=30)
    client, transport = client_of(proxy)
    client.dataReceived(cmd("AUTH", "nope") + cmd("AUTH", "nope2") + cmd("AUTH", "secret") + cmd("GET", "k"))
    assert transport.value() == INVALID + INVALID + TOO_MANY + b"-NOAUTH Authentication required\r\n"
    other, other_transport = client_of(proxy, "10.0.0.1")  # the same address, another connection
    other.dataReceived(cmd("HELLO", "3", "AUTH", "default", "secret"))
    assert other_transport.value() == TOO_MANY
    elsewhere, elsewhere_transport = client_of(proxy, "10.0.0.2")
    elsewhere.dataReceived(cmd("AUTH", "secret"))
    assert elsewhere_transport.value() == b"+OK\r\n"
    proxy.reactor.advance(30)
    client.dataReceived(cmd("AUTH", "secret"))
    assert transport.value().endswith(TOO_MANY + b"-NOAUTH Authentication required\r\n+OK\r\n")
    stats = proxy.stats.pool("front")
    assert (stats.auth_failures, stats.auth_blocked) == (2, 2)
    snap = snapshots.snapshot(proxy, settings=False)
    assert (snap["pools"]["front"]["auth_failures"], snap["pools"]["front"]["auth_blocked"]) == (2, 2)
    text = prometheus.render(snapshots.merge([snap]), proxy.reactor.seconds()).decode()
    assert 'cacheproxy_auth_failures_total{pool="front"} 2.0' in text
    assert 'cacheproxy_auth_blocked_total{pool="front"} 2.0' in text


def test_users_wrong_passwords_and_unknown_users_count_as_failures():
    tenants = {"tenants": {"acme": {"users": {"alice": "pw"}, "route": "p7001"}}}
    proxy = proxy_with(tenants, auth_failures_limit=3)
    client, transport = client_of(proxy)
    client.dataReceived(cmd("AUTH", "alice", "bad") + cmd("AUTH", "mallory", "pw")
                        + cmd("HELLO", "2", "AUTH", "alice", "bad2") + cmd("AUTH", "alice", "pw"))
    assert transport.value() == WRONGPASS * 3 + TOO_MANY
    assert proxy.stats.pool("front").auth_failures == 3


def test_a_pool_without_logins_reports_no_auth_counters_and_auth_is_not_a_failure():
    proxy = proxy_with({})
    client, transport = client_of(proxy)
    for _ in range(12):
        client.dataReceived(cmd("AUTH", "x"))
    assert transport.value() == b"-ERR Client sent AUTH, but no password is set\r\n" * 12
    assert "auth_failures" not in snapshots.snapshot(proxy, settings=False)["pools"]["front"]


def test_a_reload_changes_the_limits():
    proxy = proxy_with({"redis_auth": "secret"}, auth_failures_limit=5)
    limiter = proxy.logins
    assert isinstance(limiter, LocalAuthLimiter) and limiter.counter.limit == 5
    proxy.reconfigure(config_from_dict({"front": {"listen": "127.0.0.1:22121", "redis": True, "redis_auth": "secret",
                                                  "servers": ["127.0.0.1:7001:1"]},
                                        "global": {"auth_failures_limit": 1, "auth_block_seconds": 5}}))
    assert proxy.logins is limiter and (limiter.counter.limit, limiter.counter.block_seconds) == (1, 5)
