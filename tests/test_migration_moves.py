"""
Online migration's moves: the protocols' move generators (IKeyMigration.move)
step by step with exact bytes, their listings, and the driver (core.moves.run_move)
over a servers layer on in-memory transports and a fake clock.
"""

from __future__ import annotations

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from twistedproxy.config import config_from_dict
from twistedproxy.core.moves import MoveResult, run_move
from twistedproxy.core.servers import ServerSet
from twistedproxy.protocols import migration_for
from twistedproxy.protocols.interface import IKeyMigration
from tests.support.resp import cmd

redis = migration_for("redis")
memcache = migration_for("memcache")


def pool(redis_pool=True, **keys):
    servers = ["127.0.0.1:7001:1", "127.0.0.1:7002:1"]
    data = {"listen": "127.0.0.1:22121", "servers": servers, "redis": redis_pool}
    data.update(keys)
    return config_from_dict({"alpha": data}).pools[0]


def converse(steps, answers):
    """
    Run the move generator C{steps}, answering its requests with C{answers} in
    order; the (side, frame) pairs it sent and its result.
    """
    sent = []
    answer = None
    answers = list(answers)
    try:
        side, request = next(steps)
        while True:
            sent.append((side, request.frame))
            answer = answers.pop(0)
            side, request = steps.send(answer)
    except StopIteration as stop:
        assert not answers, "answers left over: %r" % (answers,)
        return sent, stop.value


def ok(raw):
    return (raw, None)


def test_both_protocols_provide_key_migration():
    assert IKeyMigration.providedBy(redis) and IKeyMigration.providedBy(memcache)
    assert redis.codec.name == "redis" and memcache.codec.name == "memcache_text"


# -- Redis: MIGRATE ------------------------------------------------------------------------


def redis_move(keys, answers, **pool_keys):
    config = pool(**pool_keys)
    return converse(redis.move(keys, config.servers[0], config.servers[1], config), answers)


MIGRATE_K = cmd("MIGRATE", "127.0.0.1", "7002", "", "0", "5000", "KEYS", "k")


def test_redis_one_key_moved():
    sent, result = redis_move([b"k"], [ok(b"+OK\r\n")])
    assert sent == [("source", MIGRATE_K)]
    assert result == MoveResult(moved=1)


def test_redis_migrate_names_the_db_timeout_and_password():
    sent, result = redis_move([b"k"], [ok(b"+NOKEY\r\n")], redis_db=3, timeout=250, redis_auth="sekret")
    assert sent == [("source", cmd("MIGRATE", "127.0.0.1", "7002", "", "3", "250", "AUTH", "sekret", "KEYS", "k"))]
    assert result == MoveResult(missing=1)


def test_redis_busykey_keeps_the_targets_copy_and_deletes_the_sources():
    busy = b"-ERR Target instance replied with error: BUSYKEY Target key name already exists.\r\n"
    sent, result = redis_move([b"k"], [ok(busy), ok(b":1\r\n")])
    assert sent == [("source", MIGRATE_K), ("source", cmd("DEL", "k"))]
    assert result == MoveResult(missing=1)


def test_redis_other_errors_and_failures_fail_the_key():
    sent, result = redis_move([b"k"], [ok(b"-IOERR error or timeout reading to target instance\r\n")])
    assert result == MoveResult(failed=1, error="IOERR error or timeout reading to target instance")
    sent, result = redis_move([b"k"], [(None, "Connection refused")])
    assert result == MoveResult(failed=1, error="Connection refused")
    busy = b"-ERR Target instance replied with error: BUSYKEY Target key name already exists.\r\n"
    sent, result = redis_move([b"k"], [ok(busy), (None, "Connection timed out")])
    assert result == MoveResult(failed=1, error="Connection timed out")


def test_redis_batch_counts_what_existed():
    sent, result = redis_move([b"a", b"b", b"c"], [ok(b":2\r\n"), ok(b"+OK\r\n")])
    assert sent == [("source", cmd("EXISTS", "a", "b", "c")),
                    ("source", cmd("MIGRATE", "127.0.0.1", "7002", "", "0", "5000", "KEYS", "a", "b", "c"))]
    assert result == MoveResult(moved=2, missing=1)
    sent, result = redis_move([b"a", b"b"], [ok(b":0\r\n"), ok(b"+NOKEY\r\n")])
    assert result == MoveResult(missing=2)


def test_redis_failed_batch_is_retried_key_by_key():
    busy = b"-ERR Target instance replied with error: BUSYKEY Target key name already exists.\r\n"
    sent, result = redis_move([b"a", b"b"], [ok(b":2\r\n"), ok(busy), ok(b"+NOKEY\r\n"), ok(busy), ok(b":1\r\n")])
    assert [frame for _, frame in sent[2:]] == [
        cmd("MIGRATE", "127.0.0.1", "7002", "", "0", "5000", "KEYS", "a"),
        cmd("MIGRATE", "127.0.0.1", "7002", "", "0", "5000", "KEYS", "b"),
        cmd("DEL", "b"),
    ]
    assert result == MoveResult(missing=2)


def test_redis_listing_is_scan():
    request = redis.list_request(None, None, 100)
    assert request.frame == cmd("SCAN", "0", "COUNT", "100")
    assert redis.list_request(b"17", b"user:*", 10).frame == cmd("SCAN", "17", "MATCH", "user:*", "COUNT", "10")
    assert redis.list_reply(b"*2\r\n$2\r\n17\r\n*2\r\n$1\r\na\r\n$3\r\nb c\r\n") == (b"17", [b"a", b"b c"])
    assert redis.list_reply(b"*2\r\n$1\r\n0\r\n*0\r\n") == (None, [])
    with pytest.raises(ValueError, match="NOPERM"):
        redis.list_reply(b"-NOPERM no\r\n")


# -- memcached: meta commands -------------------------------------------------------------


def memcache_move(keys, answers):
    config = pool(redis_pool=False)
    return converse(memcache.move(keys, config.servers[0], config.servers[1], config), answers)


HIT = b"VA 3 f5 t99 c41\r\nxyz\r\n"


def test_memcache_miss_on_the_source_moves_nothing():
    sent, result = memcache_move([b"k"], [ok(b"EN\r\n")])
    assert sent == [("source", b"mg k v f t c\r\n")]
    assert result == MoveResult(missing=1)


def test_memcache_hit_is_added_to_the_target_then_deleted_from_the_source():
    sent, result = memcache_move([b"k"], [ok(HIT), ok(b"HD c7\r\n"), ok(b"HD\r\n")])
    assert sent == [
        ("source", b"mg k v f t c\r\n"),
        ("target", b"ms k 3 F5 T99 ME c\r\nxyz\r\n"),
        ("source", b"md k C41\r\n"),
    ]
    assert result == MoveResult(moved=1, bytes=3)


def test_memcache_no_expiry_and_binary_keys():
    sent, result = memcache_move([b"a b"], [ok(b"VA 2 f0 t-1 c9\r\nhi\r\n"), ok(b"HD c10\r\n"), ok(b"HD\r\n")])
    assert sent == [
        ("source", b"mg YSBi v f t c b\r\n"),
        ("target", b"ms YSBi 2 F0 ME c b\r\nhi\r\n"),
        ("source", b"md YSBi C9 b\r\n"),
    ]
    assert result == MoveResult(moved=1, bytes=2)


def test_memcache_a_value_on_the_target_wins_and_the_original_is_marked_stale():
    # NS: a client's newer value, or another process's copy; that process deletes the
    # original, so it is only marked stale here (deleting it would make that process
    # take its copy back).
    sent, result = memcache_move([b"k"], [ok(HIT), ok(b"NS c0\r\n"), ok(b"HD\r\n")])
    assert sent[1:] == [("target", b"ms k 3 F5 T99 ME c\r\nxyz\r\n"), ("source", b"md k C41 I\r\n")]
    assert result == MoveResult(missing=1)


def test_memcache_a_stale_original_is_left_to_its_adder():
    sent, result = memcache_move([b"k"], [ok(b"VA 3 f5 t99 c42 X W\r\nxyz\r\n")])
    assert sent == [("source", b"mg k v f t c\r\n")]
    assert result == MoveResult(missing=1)


def test_memcache_item_expiring_now_is_not_copied():
    sent, result = memcache_move([b"k"], [ok(b"VA 3 f5 t0 c41\r\nxyz\r\n"), ok(b"HD\r\n")])
    assert sent == [("source", b"mg k v f t c\r\n"), ("source", b"md k C41\r\n")]
    assert result == MoveResult(missing=1)


def test_memcache_original_gone_meanwhile_undoes_our_copy():
    # Another adder finished first: the target was emptied (a client deleted the key)
    # before our add, so our copy would bring a deleted key back.
    sent, result = memcache_move([b"k"], [ok(HIT), ok(b"HD c7\r\n"), ok(b"NF\r\n"), ok(b"HD\r\n")])
    assert sent[2:] == [("source", b"md k C41\r\n"), ("target", b"md k C7\r\n")]
    assert result == MoveResult(missing=1)


def test_memcache_original_marked_stale_meanwhile_keeps_our_copy():
    # A process found our copy on the target and marked the original stale: ours stands.
    sent, result = memcache_move([b"k"], [ok(HIT), ok(b"HD c7\r\n"), ok(b"EX\r\n"), ok(b"HD\r\n")])
    assert sent[2:] == [("source", b"md k C41\r\n"), ("source", b"md k\r\n")]
    assert result == MoveResult(moved=1, bytes=3)


def test_memcache_failures():
    assert memcache_move([b"k"], [(None, "Connection refused")])[1] == MoveResult(failed=1, error="Connection refused")
    assert memcache_move([b"k"], [ok(HIT), ok(b"SERVER_ERROR out of memory\r\n")])[1] == MoveResult(
        failed=1, error="SERVER_ERROR out of memory")
    # The delete on the source failed: our copy is taken back, the key stays on the source.
    sent, result = memcache_move([b"k"], [ok(HIT), ok(b"HD c7\r\n"), (None, "Connection timed out"), ok(b"HD\r\n")])
    assert sent[3] == ("target", b"md k C7\r\n")
    assert result == MoveResult(failed=1, error="Connection timed out")


def test_memcache_several_keys_one_after_the_other():
    sent, result = memcache_move([b"a", b"b"], [ok(b"EN\r\n"), ok(HIT), ok(b"HD c7\r\n"), ok(b"HD\r\n")])
    assert [frame for _, frame in sent] == [b"mg a v f t c\r\n", b"mg b v f t c\r\n", b"ms b 3 F5 T99 ME c\r\nxyz\r\n",
                                            b"md b C41\r\n"]
    assert result == MoveResult(moved=1, missing=1, bytes=3)


def test_memcache_listing_is_a_metadump_framed_as_one_reply():
    assert memcache.list_request(None, None, 100).frame == b"lru_crawler metadump all\r\n"
    listing = (b"key=a%2520b exp=-1 la=1 cas=1 fetch=no cls=1 size=71\n"
               b"key=user%3A1 exp=5 la=1 cas=2 fetch=yes cls=1 size=69\n"
               b"key=a%20b exp=-1 la=1 cas=3 fetch=no cls=1 size=69\nEND\r\n")
    parser = memcache.codec.reply_parser()
    for i in range(len(listing)):  # a byte at a time: framed once END is in
        parser.feed(listing[i : i + 1])
        reply = parser.next_reply(None)
        assert reply is None or i == len(listing) - 1
    assert reply == listing
    assert memcache.list_reply(listing) == (None, [b"a%20b", b"user:1", b"a b"])
    assert memcache.list_reply(listing, b"user:*") == (None, [b"user:1"])
    assert memcache.list_reply(b"END\r\n") == (None, [])
    with pytest.raises(ValueError, match="BUSY"):
        memcache.list_reply(b"BUSY currently processing crawler request\r\n")


def test_clients_still_cannot_send_a_metadump():
    parser = memcache.codec.request_parser(pool(redis_pool=False))
    (request,) = parser.feed(b"lru_crawler metadump all\r\n")
    assert request.reply.startswith(b"ERROR") or request.reply.startswith(b"CLIENT_ERROR")


# -- the driver -------------------------------------------------------------------------------


class Rig:
    """A servers layer of two memcached servers on a fake reactor; backend connections on StringTransports."""

    def __init__(self, **keys):
        self.reactor = MemoryReactorClock()
        self.config = pool(redis_pool=False, **keys)
        self.servers = ServerSet(self.config, self.reactor, (memcache.codec,))
        self.source, self.target = self.servers.servers
        self.handled = 0
        self.transports = {}
        self.protocols = {}
        self.results = []

    def move(self, keys):
        steps = memcache.move(keys, self.source.spec, self.target.spec, self.config)
        run_move(steps, self.source, self.target, memcache.codec, self.reactor, self.servers.flusher,
                 lambda result, dirty: self.results.append(result))
        self.reactor.advance(0)

    def accept(self):
        for host, port, factory, _, _ in self.reactor.tcpClients[self.handled :]:
            self.handled += 1
            protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
            transport = StringTransport()
            protocol.makeConnection(transport)
            self.transports[port] = transport
            self.protocols[port] = protocol
        self.reactor.advance(0)

    def written(self, port):
        value = self.transports[port].value()
        self.transports[port].clear()
        return value

    def answer(self, port, raw):
        self.protocols[port].dataReceived(raw)
        self.reactor.advance(0)
        self.accept()


def test_run_move_carries_requests_and_replies():
    rig = Rig()
    rig.move([b"k"])
    rig.accept()
    assert rig.written(7001) == b"mg k v f t c\r\n"
    rig.answer(7001, HIT)
    assert rig.written(7002) == b"ms k 3 F5 T99 ME c\r\nxyz\r\n"
    rig.answer(7002, b"HD c7\r\n")
    assert rig.written(7001) == b"md k C41\r\n"
    assert rig.results == []
    rig.answer(7001, b"HD\r\n")
    assert rig.results == [MoveResult(moved=1, bytes=3)]
    # Internal requests: no server request counted.
    assert rig.source.stats.requests == 0 and rig.target.stats.requests == 0


def test_run_move_sends_failures_into_the_generator():
    rig = Rig()
    rig.move([b"k"])
    rig.accept()
    rig.written(7001)
    rig.answer(7001, HIT)
    rig.protocols[7002].connectionLost(Failure(ConnectionLost()))
    assert rig.results == [MoveResult(failed=1, error="Connection reset by peer")]


def test_run_move_on_a_server_that_cannot_be_reached():
    rig = Rig()
    rig.move([b"k"])
    for host, port, factory, _, _ in rig.reactor.tcpClients:
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    assert rig.results == [MoveResult(failed=1, error="Connection refused")]
    # Backing off: the next move fails at once, without a connection attempt.
    attempts = len(rig.reactor.tcpClients)
    rig.move([b"k"])
    assert len(rig.reactor.tcpClients) == attempts
    assert rig.results[1] == MoveResult(failed=1, error="Connection refused")


def test_run_move_times_out_with_the_pools_timeout():
    rig = Rig(timeout=100)
    rig.move([b"k"])
    rig.accept()
    rig.written(7001)
    rig.reactor.advance(0.2)
    assert rig.results == [MoveResult(failed=1, error="Connection timed out")]
    # The late reply is swallowed; the connection stays aligned.
    rig.answer(7001, HIT)
    rig.reactor.advance(1)  # past the backoff that follows a failure
    rig.move([b"j"])
    assert rig.written(7001) == b"mg j v f t c\r\n"
    rig.answer(7001, b"EN\r\n")
    assert rig.results[1] == MoveResult(missing=1)
