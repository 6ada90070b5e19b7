"""
The migrating route (routes/migrate.py) in memory: hold then release, migrate
on access, requests waiting behind a key's move in order, multi-key requests,
broadcasts, transactions, failed moves; exact bytes on StringTransports and a
fake clock, the Redis codec (and memcached's meta moves once).
"""

from __future__ import annotations

import hashlib

from twisted.internet.testing import MemoryReactorClock, StringTransport
from zope.interface.verify import verifyObject

from twistedproxy.config import config_from_dict
from twistedproxy.config.migration import HOLD, MOVE, MigrationPlan
from twistedproxy.config.model import ServerSpec
from twistedproxy.core.client import ProxyFactory
from twistedproxy.protocols import codec_for, codecs_of, migration_for
from twistedproxy.routes.interface import ICountedRoute, IServedRoute
from twistedproxy.routes.migrate import MigratingRoute
from tests.support.resp import cmd
from tests.test_core import Backend, Harness, bulk


def spec(port, weight=1, name=None):
    return ServerSpec("127.0.0.1", port, weight, name)


class MigratingBackend(Backend):
    """A fake Redis that also runs MIGRATE (to the other fake backends of its harness)."""

    def __init__(self, harness, *args):
        Backend.__init__(self, *args)
        self.harness = harness

    def answer(self, count=None, split=False) -> list:
        """As Backend.answer; then the connections the proxy asked for meanwhile are accepted."""
        commands = Backend.answer(self, count, split)
        self.harness.accept()
        return commands

    def reply(self, args):
        if args[0].lower() == b"migrate":
            target = self.harness.store(int(args[2]))
            keys = args[args.index(b"KEYS") + 1 :]
            present = [k for k in keys if k in self.data]
            if not present:
                return b"+NOKEY\r\n"
            for key in present:
                if key in target:
                    return b"-ERR Target instance replied with error: BUSYKEY Target key name already exists.\r\n"
                target[key] = self.data.pop(key)
            return b"+OK\r\n"
        return Backend.reply(self, args)


class MigHarness(Harness):
    """A Redis pool migrating from C{source} to C{target} (ports), in phase C{phase}."""

    def __init__(self, source=(7001, 7002), target=(7001, 7002, 7003), phase=HOLD, redis=True, **pool_keys):
        self.reactor = MemoryReactorClock()
        data = {"listen": "127.0.0.1:22121", "redis": redis, "servers": ["127.0.0.1:%d:1" % p for p in target]}
        data.update(pool_keys)
        self.config = config_from_dict({"alpha": data})
        pool_config = self.config.pools[0]
        self.plan = MigrationPlan("alpha", tuple(spec(p) for p in source), tuple(spec(p) for p in target), phase)
        codec = codec_for(pool_config.protocol)
        self.pool = MigratingRoute(pool_config, codec, self.reactor, self.plan, migration_for(pool_config.protocol),
                                   codecs=codecs_of(codec))
        self.factory = ProxyFactory(self.pool)
        self.handled = 0
        self.backends = {}
        self.stores = {}  # port -> what the fake backend holds (shared by its connections)

    def store(self, port) -> dict:
        return self.stores.setdefault(port, {})

    def accept(self) -> dict:
        for host, port, factory in self.attempts():
            self.handled += 1
            protocol = factory.buildProtocol(None)
            transport = StringTransport()
            protocol.makeConnection(transport)
            backend = MigratingBackend(self, port, protocol, transport, self.reactor)
            backend.data = self.store(port)
            self.backends[port] = backend
        return self.backends

    def moving_key(self, source_port, target_port, prefix="k", skip=0) -> bytes:
        """A key that moves from the server on C{source_port} to the one on C{target_port}."""
        for i in range(100000):
            key = b"%s%d" % (prefix.encode(), i)
            if (self.pool.source.server_for(key).spec.port == source_port
                    and self.pool.server_for(key).spec.port == target_port):
                if skip == 0:
                    return key
                skip -= 1
        raise AssertionError("no such key")

    def staying_key(self, port, prefix="s") -> bytes:
        for i in range(100000):
            key = b"%s%d" % (prefix.encode(), i)
            if self.pool.source.server_for(key).spec.port == port and self.pool.server_for(key).spec.port == port:
                return key
        raise AssertionError("no such key")


def migrate(*keys) -> list:
    return [b"MIGRATE", b"127.0.0.1", b"7003", b"", b"0", b"5000", b"KEYS"] + list(keys)


def test_the_route_is_a_served_and_counted_route():
    h = MigHarness()
    verifyObject(IServedRoute, h.pool)
    verifyObject(ICountedRoute, h.pool)
    assert [s.spec.port for s in h.pool.servers] == [7001, 7002, 7003]
    assert h.pool.counters() == {"migrate_on_access": 0, "migrate_held": 0}


def test_hold_keeps_moving_keys_waiting_and_serves_the_others():
    h = MigHarness()
    c, t = h.client()
    k, s = h.moving_key(7001, 7003), h.staying_key(7002)
    h.store(7001)[k] = b"old"
    c.dataReceived(cmd("GET", k) + cmd("GET", s) + cmd("PING"))
    backends = h.accept()
    assert 7001 not in backends and 7003 not in backends  # nothing sent for the moving key
    assert backends[7002].answer() == [[b"GET", s]]
    assert t.value() == b""  # the held GET comes first
    assert h.pool.counters()["migrate_held"] == 1
    h.pool.set_phase(MOVE)
    assert h.pool.plan.phase == MOVE
    h.reactor.advance(0)
    backends = h.accept()
    assert backends[7001].answer() == [migrate(k)]
    assert backends[7003].answer() == [[b"GET", k]]
    assert t.value() == b"$3\r\nold\r\n$-1\r\n+PONG\r\n"
    assert h.pool.counters() == {"migrate_on_access": 1, "migrate_held": 1}
    assert h.pool.queues == {}


def test_move_phase_moves_a_key_once_before_its_first_request():
    h = MigHarness(phase=MOVE)
    c, t = h.client()
    k = h.moving_key(7002, 7003)
    h.store(7002)[k] = b"v"
    c.dataReceived(cmd("SET", k, "1") + cmd("GET", k))
    backends = h.accept()
    assert backends[7002].answer() == [migrate(k)]  # one move; both requests wait behind it
    assert backends[7003].answer() == [[b"SET", k, b"1"], [b"GET", k]]
    assert t.value() == b"+OK\r\n$1\r\n1\r\n"
    t.clear()
    c.dataReceived(cmd("GET", k))  # known moved: straight to the target
    assert backends[7003].answer() == [[b"GET", k]]
    assert backends[7002].pending() == []
    assert t.value() == b"$1\r\n1\r\n"


def test_a_key_moved_elsewhere_first_is_nokey_and_not_moved_again():
    h = MigHarness(phase=MOVE)
    c, t = h.client()
    k = h.moving_key(7001, 7003)
    h.store(7003)[k] = b"there"
    c.dataReceived(cmd("GET", k))
    backends = h.accept()
    assert backends[7001].answer() == [migrate(k)]
    backends[7003].answer()
    assert t.value() == b"$5\r\nthere\r\n"
    assert h.pool.counters()["migrate_on_access"] == 0
    c.dataReceived(cmd("GET", k))
    assert backends[7001].pending() == []


def test_busykey_keeps_the_targets_newer_value():
    h = MigHarness(phase=MOVE)
    c, t = h.client()
    k = h.moving_key(7001, 7003)
    h.store(7001)[k] = b"older"
    h.store(7003)[k] = b"newer"
    c.dataReceived(cmd("GET", k))
    backends = h.accept()
    backends[7001].answer()  # MIGRATE: BUSYKEY
    assert backends[7001].answer() == [[b"DEL", k]]
    backends[7003].answer()
    assert t.value() == b"$5\r\nnewer\r\n"
    assert k not in h.store(7001)


def test_a_failed_move_fails_the_requests_that_waited_and_the_next_tries_again():
    h = MigHarness(phase=MOVE)
    c, t = h.client()
    k, s = h.moving_key(7001, 7003), h.staying_key(7002)
    c.dataReceived(cmd("SET", k, "1") + cmd("GET", k) + cmd("GET", s))
    backends = h.accept()
    backends[7002].answer()
    backends[7001].protocol.dataReceived(b"-IOERR error or timeout reading to target instance\r\n")
    h.reactor.advance(0)
    assert t.value() == (b"-ERR IOERR error or timeout reading to target instance\r\n" * 2 + b"$-1\r\n")
    assert 7003 not in h.backends  # nothing reached the target
    assert h.pool.queues == {}
    t.clear()
    backends[7001].seen = len(backends[7001].transport.value())
    c.dataReceived(cmd("GET", k))
    assert backends[7001].pending() == [migrate(k)]


def test_multi_key_requests_move_their_moving_keys_in_one_batch_then_split():
    h = MigHarness(phase=MOVE)
    c, t = h.client()
    a, b = h.moving_key(7001, 7003, "a"), h.moving_key(7001, 7003, "b")
    s = h.staying_key(7002)
    h.store(7001).update({a: b"A", b: b"B"})
    h.store(7002)[s] = b"S"
    c.dataReceived(cmd("MGET", a, s, b))
    backends = h.accept()
    assert backends[7001].answer() == [[b"EXISTS", a, b]]
    assert backends[7001].answer() == [migrate(a, b)]
    h.accept()
    h.backends[7002].answer()
    assert h.backends[7003].answer() == [[b"mget", a, b]]
    assert t.value() == b"*3\r\n$1\r\nA\r\n$1\r\nS\r\n$1\r\nB\r\n"
    assert h.pool.counters()["migrate_on_access"] == 2


def test_a_request_on_a_key_behind_a_multi_key_request_does_not_overtake_it():
    h = MigHarness(phase=MOVE)
    c, t = h.client()
    a, b = h.moving_key(7001, 7003, "a"), h.moving_key(7002, 7003, "b")
    c.dataReceived(cmd("GET", a))  # a's move starts
    backends = h.accept()
    c.dataReceived(cmd("MSET", a, "1", b, "1") + cmd("GET", b))  # behind a; b's move starts
    h.accept()
    assert h.backends[7002].answer() == [migrate(b)]  # b moved: the GET of b still waits behind the MSET
    assert 7003 not in h.backends  # nothing sent there yet
    assert backends[7001].answer() == [migrate(a)]
    h.accept()
    assert h.backends[7003].answer() == [[b"GET", a], [b"MSET", a, b"1", b, b"1"], [b"GET", b]]
    assert t.value() == b"$-1\r\n+OK\r\n$1\r\n1\r\n"


def test_broadcasts_reach_every_server_of_either_list():
    h = MigHarness(source=(7001, 7002, 7003), target=(7001, 7002), phase=MOVE, redis=False)
    c, t = h.client()
    c.dataReceived(b"flush_all\r\n")
    backends = h.accept()
    assert sorted(backends) == [7001, 7002, 7003]
    for port in backends:
        assert backends[port].transport.value() == b"flush_all\r\n"
        backends[port].protocol.dataReceived(b"OK\r\n")
    h.reactor.advance(0)
    assert t.value() == b"OK\r\n"


def test_a_removed_servers_keys_move_to_the_remaining_ones():
    h = MigHarness(source=(7001, 7002, 7003), target=(7001, 7002), phase=MOVE)
    c, t = h.client()
    k = h.moving_key(7003, 7001)
    h.store(7003)[k] = b"v"
    c.dataReceived(cmd("GET", k))
    backends = h.accept()
    assert backends[7003].answer() == [[b"MIGRATE", b"127.0.0.1", b"7001", b"", b"0", b"5000", b"KEYS", k]]
    backends[7001].answer()
    assert t.value() == b"$1\r\nv\r\n"


def test_a_reweighted_server_is_one_backend_and_its_keys_stay():
    h = MigHarness(target=(7001, 7002))
    h.plan = MigrationPlan("alpha", (spec(7001), spec(7002)), (spec(7001, 3), spec(7002)), MOVE)
    h.pool = MigratingRoute(h.config.pools[0], codec_for("redis"), h.reactor, h.plan, migration_for("redis"))
    h.factory = ProxyFactory(h.pool)
    assert [s.spec.port for s in h.pool.servers] == [7001, 7002]
    c, t = h.client()
    keys = [hashlib.md5(b"%d" % i).hexdigest().encode() for i in range(200)]
    moving = [k for k in keys if h.pool.moving(k)]
    assert moving and all(h.pool.source.server_for(k).spec.port == 7002 for k in moving)
    c.dataReceived(cmd("GET", moving[0]))
    backends = h.accept()
    assert backends[7002].answer()[0][:3] == [b"MIGRATE", b"127.0.0.1", b"7001"]


def test_a_transaction_moves_its_keys_first_and_keeps_its_order():
    h = MigHarness(phase=MOVE)
    c, t = h.client()
    k = h.moving_key(7001, 7003)
    h.store(7001)[k] = b"5"
    c.dataReceived(cmd("WATCH", k) + cmd("MULTI") + cmd("SET", k, "6") + cmd("EXEC"))
    backends = h.accept()
    assert backends[7001].answer() == [migrate(k)]
    h.accept()
    pinned = h.backends[7003]
    assert [args[0].upper() for args in pinned.pending()] == [b"WATCH", b"MULTI", b"SET", b"EXEC"]
    pinned.protocol.dataReceived(b"+OK\r\n+OK\r\n+QUEUED\r\n*1\r\n+OK\r\n")
    h.reactor.advance(0)
    assert t.value() == b"+OK\r\n+OK\r\n+QUEUED\r\n*1\r\n+OK\r\n"


def test_stop_fails_what_waits():
    h = MigHarness()
    c, t = h.client()
    c.dataReceived(cmd("GET", h.moving_key(7001, 7003)))
    h.pool.stop()
    h.reactor.advance(0)
    assert t.value() == b"-ERR unknown\r\n"


def test_handover_sends_what_waits_to_the_next_route():
    h = MigHarness()
    c, t = h.client()
    k = h.moving_key(7001, 7003)
    c.dataReceived(cmd("GET", k) + cmd("SET", k, "1"))
    nxt = MigHarness(phase=MOVE)
    h.pool.handover(nxt.pool)
    nxt.reactor.advance(0)
    assert nxt.accept()[7001].answer() == [migrate(k)]
    assert nxt.accept()[7003].pending() == [[b"GET", k], [b"SET", k, b"1"]]


# -- memcached ----------------------------------------------------------------------------


def test_memcached_get_on_a_moving_key_moves_it_with_meta_commands_first():
    h = MigHarness(redis=False, phase=MOVE)
    k = h.moving_key(7001, 7003)
    c, t = h.client()
    c.dataReceived(b"get " + k + b"\r\n")
    h.accept()
    source = h.backends[7001]
    assert source.transport.value() == b"mg " + k + b" v f t c\r\n"
    source.protocol.dataReceived(b"VA 1 f3 t-1 c8\r\nv\r\n")
    h.reactor.advance(0)
    h.accept()
    target = h.backends[7003]
    assert target.transport.value() == b"ms " + k + b" 1 F3 ME c\r\nv\r\n"
    target.protocol.dataReceived(b"HD c9\r\n")
    h.reactor.advance(0)
    assert source.transport.value().endswith(b"md " + k + b" C8\r\n")
    source.protocol.dataReceived(b"HD\r\n")
    h.reactor.advance(0)
    assert target.transport.value().endswith(b"get " + k + b"\r\n")
    target.protocol.dataReceived(b"VALUE " + k + b" 3 1\r\nv\r\nEND\r\n")
    h.reactor.advance(0)
    assert t.value() == b"VALUE " + k + b" 3 1\r\nv\r\nEND\r\n"
    assert h.pool.counters()["migrate_on_access"] == 1


def test_a_key_named_twice_waits_once_and_held_keys_move_in_one_batch():
    h = MigHarness()
    c, t = h.client()
    a, b = h.moving_key(7001, 7003, "a"), h.moving_key(7001, 7003, "b")
    h.store(7001).update({a: b"A", b: b"B"})
    c.dataReceived(cmd("MGET", a, a) + cmd("GET", b))
    assert h.accept() == {}
    h.pool.set_phase(MOVE)
    h.reactor.advance(0)
    source = h.accept()[7001]
    assert source.answer() == [[b"EXISTS", a, b]]
    assert source.answer() == [migrate(a, b)]
    assert h.backends[7003].answer() == [[b"MGET", a, a], [b"GET", b]]
    assert t.value() == b"*2\r\n$1\r\nA\r\n$1\r\nA\r\n$1\r\nB\r\n"
    assert h.pool.counters() == {"migrate_on_access": 2, "migrate_held": 2}


def test_a_held_watch_keeps_the_clients_transaction_behind_it():
    h = MigHarness()
    c, t = h.client()
    k = h.moving_key(7001, 7003)
    c.dataReceived(cmd("WATCH", k) + cmd("MULTI") + cmd("PING") + cmd("EXEC"))
    assert h.accept() == {}
    assert t.value() == b""
    h.pool.set_phase(MOVE)
    h.reactor.advance(0)
    assert h.accept()[7001].answer() == [migrate(k)]
    pinned = h.backends[7003]
    assert [args[0].upper() for args in pinned.pending()] == [b"WATCH", b"MULTI", b"PING", b"EXEC"]


def test_a_dead_source_answers_errors_to_the_requests_on_its_moving_keys():
    h = MigHarness(phase=MOVE)
    c, t = h.client()
    k, s = h.moving_key(7001, 7003), h.staying_key(7002)
    c.dataReceived(cmd("GET", k) + cmd("GET", s))
    h.refuse()  # 7001 and 7002 both refuse: each request fails on its own
    h.reactor.advance(0)
    assert t.value() == b"-ERR Connection refused\r\n-ERR Connection refused\r\n"
    assert 7003 not in h.backends and not [a for a in h.attempts() if a[1] == 7003]


def test_memcached_binary_clients_keys_move_by_meta_commands_too():
    import struct

    h = MigHarness(redis=False, phase=MOVE)
    k = h.moving_key(7001, 7003)
    c, t = h.client()
    get = struct.pack("!BBHBBHIIQ", 0x80, 0x00, len(k), 0, 0, 0, len(k), 7, 0) + k
    c.dataReceived(get)
    h.accept()
    assert h.backends[7001].transport.value() == b"mg " + k + b" v f t c\r\n"
    h.backends[7001].protocol.dataReceived(b"EN\r\n")
    h.reactor.advance(0)
    h.accept()
    target = h.backends[7003]
    assert target.transport.value() == get  # the binary get, on a binary connection of the target
