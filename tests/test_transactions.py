"""
Redis transactions in a hash pool, in memory: the parser's side (what each
command becomes inside MULTI or after WATCH) and the route's (a client pinned
to a backend connection of its own), with exact bytes on StringTransports and a
fake clock.
"""

from __future__ import annotations

import json

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from twistedproxy.core.request import (
    ROUTE_KEY,
    ROUTE_LOCAL,
    ROUTE_SESSION,
    SESSION_EXEC,
    SESSION_MULTI,
    SESSION_MULTI_WATCHED,
    SESSION_QUEUED,
    SESSION_REFUSED,
    SESSION_WATCH,
    SESSION_WATCHING,
)
from twistedproxy.protocols.interface import ISessionCodec
from twistedproxy.core.client import ProxyFactory
from twistedproxy.protocols.redis import codec
from twistedproxy.routes.hash import HashRoute
from twistedproxy.routes.sessions import ISessionRoute
from tests.support.resp import cmd
from tests.test_core import Harness
from tests.test_redis_codec import pool

OK = b"+OK\r\n"
QUEUED = b"+QUEUED\r\n"
EXECABORT = b"-EXECABORT Transaction discarded because of previous errors.\r\n"
CONFLICT = b"-ERR keys of a transaction must all map to one server (use a hash tag)\r\n"
LIMIT = b"-ERR transaction_connections limit reached on the transaction's server\r\n"


# -- the parser ----------------------------------------------------------------------


def ops(requests) -> list:
    return [r.data[0] if r.route == ROUTE_SESSION else r.reply for r in requests]


def test_a_transaction_becomes_session_requests_and_ends_with_exec():
    parser = codec.request_parser(pool())
    requests = parser.feed(
        cmd("GET", "a") + cmd("WATCH", "a", "b") + cmd("GET", "a") + cmd("MULTI") + cmd("SET", "a", "1")
        + cmd("PING") + cmd("NOSUCH") + cmd("EXEC") + cmd("GET", "a")
    )
    assert ops(requests) == [
        None, SESSION_WATCH, SESSION_WATCHING, SESSION_MULTI_WATCHED, SESSION_QUEUED,
        SESSION_QUEUED,  # PING is queued on the backend inside MULTI
        SESSION_REFUSED, SESSION_EXEC, None,
    ]
    assert requests[1].keys == [b"a", b"b"]
    assert (requests[4].key, requests[4].data[1]) == (b"a", ROUTE_KEY)  # its route outside the session kept
    assert requests[6].reply == b"-ERR unsupported command 'NOSUCH'\r\n"
    assert (requests[8].route, requests[8].key) == (ROUTE_KEY, b"a")  # out of the transaction: the hot path again
    assert requests[0].route == ROUTE_KEY


def test_redis_rules_for_misplaced_transaction_commands():
    requests = codec.request_parser(pool()).feed(
        cmd("EXEC") + cmd("DISCARD") + cmd("UNWATCH") + cmd("MULTI") + cmd("MULTI") + cmd("WATCH", "k")
        + cmd("UNWATCH") + cmd("DISCARD") + cmd("PING") + cmd("WATCH") + cmd("MULTI", "x")
    )
    assert [r.reply if r.route == ROUTE_LOCAL else r.data[0] for r in requests] == [
        b"-ERR EXEC without MULTI\r\n",
        b"-ERR DISCARD without MULTI\r\n",
        OK,  # UNWATCH outside a transaction
        SESSION_MULTI,
        b"-ERR MULTI calls can not be nested\r\n",
        b"-ERR WATCH inside MULTI is not allowed\r\n",
        SESSION_QUEUED,  # UNWATCH inside MULTI is queued, as Redis does
        7,  # SESSION_DISCARD
        b"+PONG\r\n",  # out of the transaction: the proxy answers again
        b"-ERR wrong number of arguments for 'watch' command\r\n",
        b"-ERR wrong number of arguments for 'multi' command\r\n",
    ]


def test_the_transaction_state_spans_reads_and_is_carried_to_another_worker():
    parser = codec.request_parser(pool())
    frame = cmd("SET", "k", "v")
    assert ops(parser.feed(cmd("MULTI") + frame[:7])) == [SESSION_MULTI]
    assert ops(parser.feed(frame[7:])) == [SESSION_QUEUED]
    other = codec.request_parser(pool())
    other.restore(parser.state())
    assert ops(other.feed(cmd("GET", "k") + cmd("EXEC"))) == [SESSION_QUEUED, SESSION_EXEC]


def test_the_interfaces():
    assert verifyObject(ISessionCodec, codec)
    assert verifyObject(ISessionRoute, Harness().pool)


# -- the route: a client pinned to a connection of its own ---------------------------------------


class _Every(dict):
    """Port -> the latest Backend, remembering every one (a server has several connections now)."""

    def __init__(self):
        dict.__init__(self)
        self.every = []

    def __setitem__(self, port, backend):
        dict.__setitem__(self, port, backend)
        self.every.append(backend)


class Pinned(Harness):
    """A Harness whose accept() gives every backend connection, in connection order."""

    def __init__(self, servers=(7001, 7002), **keys):
        Harness.__init__(self, servers, **keys)
        self.backends = _Every()

    def accept(self) -> list:
        Harness.accept(self)
        return self.backends.every

    def reply(self, backend, data: bytes) -> None:
        backend.seen = len(backend.transport.value())
        backend.protocol.dataReceived(data)
        self.reactor.advance(0)


def test_a_transaction_runs_on_a_connection_of_its_own_and_leaves_it_clean_for_the_next():
    h = Pinned()
    c, t = h.client()
    a = h.key_on(7001)
    c.dataReceived(cmd("GET", a))
    (shared,) = h.accept()
    c.dataReceived(cmd("MULTI") + cmd("SET", a, "1") + cmd("INCR", a) + cmd("EXEC") + cmd("GET", a))
    (pinned,) = h.accept()[1:]
    assert pinned.port == 7001 and pinned.protocol.pinned
    assert pinned.pending() == [[b"MULTI"], [b"SET", a, b"1"], [b"INCR", a], [b"EXEC"]]
    assert shared.pending() == [[b"GET", a], [b"GET", a]]  # the others' connection is not used
    h.reply(shared, b"$-1\r\n")
    h.reply(pinned, OK + QUEUED + QUEUED + b"*2\r\n+OK\r\n:2\r\n")
    h.reply(shared, b"$1\r\n2\r\n")
    assert t.value() == b"$-1\r\n" + OK + QUEUED + QUEUED + b"*2\r\n+OK\r\n:2\r\n" + b"$1\r\n2\r\n"
    # The next transaction (of any client) gets the same connection back: no new connection.
    other, t2 = h.client()
    other.dataReceived(cmd("MULTI") + cmd("GET", a) + cmd("DISCARD"))
    assert h.accept()[2:] == []
    assert pinned.pending() == [[b"MULTI"], [b"GET", a], [b"DISCARD"]]
    h.reply(pinned, OK + QUEUED + OK)
    assert t2.value() == OK + QUEUED + OK


def test_multi_waits_for_the_first_key_and_keyless_commands_go_with_it():
    h = Pinned()
    c, t = h.client()
    b = h.key_on(7002)
    c.dataReceived(cmd("MULTI") + cmd("PING") + cmd("ECHO", "x"))
    assert h.accept() == [] and t.value() == OK + QUEUED + QUEUED  # no server known yet
    c.dataReceived(cmd("GET", b) + cmd("EXEC"))
    (pinned,) = h.accept()
    assert pinned.port == 7002
    assert pinned.pending() == [[b"MULTI"], [b"PING"], [b"ECHO", b"x"], [b"GET", b], [b"EXEC"]]
    h.reply(pinned, OK + QUEUED + QUEUED + QUEUED + b"*3\r\n+PONG\r\n$1\r\nx\r\n$-1\r\n")
    assert t.value() == OK + QUEUED + QUEUED + QUEUED + b"*3\r\n+PONG\r\n$1\r\nx\r\n$-1\r\n"


def test_multi_then_exec_with_nothing_queued_answers_as_redis_does():
    h = Pinned()
    c, t = h.client()
    c.dataReceived(cmd("MULTI") + cmd("EXEC"))
    (pinned,) = h.accept()
    assert pinned.pending() == [[b"MULTI"], [b"EXEC"]]
    h.reply(pinned, OK + b"*0\r\n")
    assert t.value() == OK + b"*0\r\n"


def test_a_transaction_across_servers_is_refused_and_nothing_is_applied():
    h = Pinned()
    c, t = h.client()
    a, a2, b = h.key_on(7001, "a"), h.key_on(7001, "c"), h.key_on(7002, "b")
    c.dataReceived(
        cmd("MULTI") + cmd("SET", a, "1") + cmd("SET", b, "1") + cmd("MSET", a2, "1", b, "2") + cmd("SET", a2, "1")
        + cmd("EXEC") + cmd("GET", b)
    )
    conns = h.accept()
    (pinned,) = [conn for conn in conns if conn.protocol.pinned]
    (shared,) = [conn for conn in conns if not conn.protocol.pinned]
    assert pinned.pending() == [[b"MULTI"], [b"SET", a, b"1"]]  # nothing after the refused command, no EXEC
    assert shared.port == 7002 and shared.pending() == [[b"GET", b]]
    h.reply(pinned, OK + QUEUED)
    h.reply(shared, b"$-1\r\n")
    assert t.value() == OK + QUEUED + CONFLICT + QUEUED + QUEUED + EXECABORT + b"$-1\r\n"
    # Redis drops what was queued when its connection closes: the proxy closed it.
    assert pinned.transport.disconnecting
    pinned.protocol.connectionLost(Failure(ConnectionDone()))
    server = h.pool.server_for(a)
    assert server.failures == 0 and not server.pinned  # not a failure of the server


def test_watch_pins_and_the_commands_before_multi_run_where_they_belong():
    h = Pinned()
    c, t = h.client()
    a, b = h.key_on(7001), h.key_on(7002)
    c.dataReceived(cmd("WATCH", a) + cmd("GET", a) + cmd("GET", b) + cmd("MULTI") + cmd("SET", a, "1") + cmd("EXEC"))
    conns = h.accept()
    (pinned,) = [conn for conn in conns if conn.protocol.pinned]
    (shared,) = [conn for conn in conns if not conn.protocol.pinned]
    assert pinned.pending() == [[b"WATCH", a], [b"GET", a], [b"MULTI"], [b"SET", a, b"1"], [b"EXEC"]]
    assert shared.pending() == [[b"GET", b]]
    h.reply(pinned, OK + b"$1\r\n0\r\n" + OK + QUEUED + b"*-1\r\n")  # the watched key changed: EXEC says nil
    assert t.value() == OK + b"$1\r\n0\r\n"  # in order: GET b is not answered yet
    h.reply(shared, b"$-1\r\n")
    assert t.value() == OK + b"$1\r\n0\r\n" + b"$-1\r\n" + OK + QUEUED + b"*-1\r\n"
    # UNWATCH after WATCH ends a session that never queued.
    t.clear()
    c.dataReceived(cmd("WATCH", a) + cmd("UNWATCH"))
    assert h.accept()[2:] == []  # the same pinned connection again
    h.reply(pinned, OK + OK)
    assert t.value() == OK + OK


def test_a_watch_across_servers_is_refused_and_its_exec_aborts():
    h = Pinned()
    c, t = h.client()
    a, b = h.key_on(7001), h.key_on(7002)
    c.dataReceived(cmd("WATCH", a, b) + cmd("MULTI") + cmd("SET", a, "1") + cmd("EXEC"))
    assert h.accept() == []  # nothing sent anywhere
    assert t.value() == CONFLICT + OK + QUEUED + EXECABORT


def test_past_the_limit_watch_and_multi_get_an_error():
    h = Pinned(servers=(7001,), transaction_connections=1)
    first, t1 = h.client()
    second, t2 = h.client()
    first.dataReceived(cmd("WATCH", "k"))
    second.dataReceived(cmd("WATCH", "k") + cmd("MULTI") + cmd("SET", "k", "2") + cmd("EXEC"))
    assert t2.value() == LIMIT + LIMIT + QUEUED + EXECABORT  # no server has room for MULTI either
    t2.clear()
    second.dataReceived(cmd("MULTI") + cmd("SET", "k", "2") + cmd("EXEC") + cmd("GET", "k"))
    assert t2.value() == LIMIT + QUEUED + EXECABORT  # GET k waits for the shared connection
    conns = h.accept()
    assert [conn.protocol.pinned for conn in conns] == [True, False]
    assert conns[0].pending() == [[b"WATCH", b"k"]] and conns[1].pending() == [[b"GET", b"k"]]
    # Once the first ends, the connection is free for the second.
    first.dataReceived(cmd("UNWATCH"))
    h.reply(conns[0], OK + OK)
    assert t1.value() == OK + OK
    t2.clear()
    second.dataReceived(cmd("MULTI") + cmd("SET", "k", "2") + cmd("EXEC"))
    assert conns[0].pending() == [[b"MULTI"], [b"SET", b"k", b"2"], [b"EXEC"]]


def test_a_client_that_leaves_mid_transaction_leaves_nothing_behind():
    h = Pinned()
    c, t = h.client()
    a = h.key_on(7001)
    c.dataReceived(cmd("WATCH", a) + cmd("MULTI") + cmd("SET", a, "1"))
    (pinned,) = h.accept()
    c.connectionLost(Failure(ConnectionDone()))
    assert pinned.transport.disconnecting  # Redis forgets the WATCH and the MULTI with the connection
    pinned.protocol.connectionLost(Failure(ConnectionDone()))
    server = h.pool.server_for(a)
    assert server.failures == 0 and not server.pinned and not h.pool.sessions.by_client
    other, t2 = h.client()
    other.dataReceived(cmd("MULTI") + cmd("GET", a) + cmd("EXEC"))
    (fresh,) = h.accept()[1:]
    assert fresh.pending() == [[b"MULTI"], [b"GET", a], [b"EXEC"]]


def test_a_backend_failure_fails_exactly_the_transaction_s_requests_and_drops_the_connection():
    h = Pinned()
    c, t = h.client()
    a = h.key_on(7001)
    c.dataReceived(cmd("GET", a) + cmd("MULTI") + cmd("SET", a, "1") + cmd("GET", a))
    shared, pinned = h.accept()
    assert pinned.protocol.pinned
    h.reply(pinned, OK)  # MULTI answered, then the connection breaks
    pinned.protocol.connectionLost(Failure(ConnectionLost()))
    h.reply(shared, b"$-1\r\n")
    c.dataReceived(cmd("INCR", a) + cmd("EXEC"))
    reset = b"-ERR Connection reset by peer\r\n"
    assert t.value() == b"$-1\r\n" + OK + reset * 2 + QUEUED + EXECABORT
    assert not h.pool.server_for(a).pinned
    assert shared.pending() == [] and not shared.transport.disconnecting  # the others' connection is untouched


def test_a_timeout_on_the_pinned_connection_closes_it():
    h = Pinned(timeout=100)
    c, t = h.client()
    a = h.key_on(7001)
    c.dataReceived(cmd("MULTI") + cmd("SET", a, "1") + cmd("EXEC"))
    (pinned,) = h.accept()
    h.reactor.advance(0.2)
    timed_out = b"-ERR Connection timed out\r\n"
    assert t.value() == OK + timed_out * 2  # MULTI was the proxy's to answer (no key yet)
    assert pinned.transport.disconnecting
    pinned.protocol.connectionLost(Failure(ConnectionDone()))
    assert not h.pool.server_for(a).pinned


def test_transactions_off_keep_refusing():
    h = Pinned(transaction_connections=0)
    c, t = h.client()
    c.dataReceived(cmd("MULTI") + cmd("SET", "k", "1") + cmd("EXEC"))
    assert h.accept() == []
    assert t.value().startswith(b"-ERR unsupported command 'MULTI'\r\n") and t.value().endswith(EXECABORT)


def test_a_refused_first_watch_does_not_keep_the_next_from_starting_afresh():
    # redis-py sends no UNWATCH after a WATCH that failed: the connection must stay usable.
    h = Pinned()
    c, t = h.client()
    a, b = h.key_on(7001), h.key_on(7002)
    c.dataReceived(cmd("WATCH", a, b) + cmd("GET", b) + cmd("WATCH", a) + cmd("MULTI") + cmd("INCR", a) + cmd("EXEC"))
    conns = h.accept()
    (pinned,) = [conn for conn in conns if conn.protocol.pinned]
    (shared,) = [conn for conn in conns if not conn.protocol.pinned]
    assert pinned.pending() == [[b"WATCH", a], [b"MULTI"], [b"INCR", a], [b"EXEC"]]
    h.reply(shared, b"$-1\r\n")
    h.reply(pinned, OK + OK + QUEUED + b"*1\r\n:1\r\n")
    assert t.value() == CONFLICT + b"$-1\r\n" + OK + OK + QUEUED + b"*1\r\n:1\r\n"


def watching():
    """A client of a Pinned harness that watches a key on 7001, answered: (h, client, transport, key, pinned)."""
    h = Pinned()
    c, t = h.client()
    a = h.key_on(7001)
    c.dataReceived(cmd("WATCH", a))
    (pinned,) = h.accept()
    h.reply(pinned, OK)
    t.clear()
    return h, c, t, a, pinned


def test_after_a_lost_watch_the_client_is_told_and_its_next_watch_starts_afresh():
    h, c, t, a, pinned = watching()
    pinned.protocol.connectionLost(Failure(ConnectionDone()))  # the server went away, nothing in flight
    h.reactor.advance(5)  # past the reconnect backoff
    lost = b"-ERR transaction aborted: its server connection was lost\r\n"
    # A client in the middle of its transaction learns it at its next step ...
    c.dataReceived(cmd("MULTI") + cmd("SET", a, "1") + cmd("EXEC"))
    assert t.value() == lost + QUEUED + EXECABORT
    t.clear()
    # ... a WATCH, unless the client was told already (redis-py sends no UNWATCH after an error) ...
    c.dataReceived(cmd("WATCH", a))
    (again,) = h.accept()[1:]
    h.reply(again, OK)
    again.protocol.connectionLost(Failure(ConnectionDone()))
    h.reactor.advance(5)
    c.dataReceived(cmd("WATCH", a) + cmd("WATCH", a))
    assert t.value() == OK + lost  # the second WATCH starts afresh, on a new connection
    (fresh,) = h.accept()[2:]
    assert fresh.pending() == [[b"WATCH", a]]
    # ... and a WATCH that failed in flight told it.
    fresh.protocol.connectionLost(Failure(ConnectionDone()))
    h.reactor.advance(5)
    c.dataReceived(cmd("WATCH", a))
    (last,) = h.accept()[3:]
    assert last.pending() == [[b"WATCH", a]]
    h.reply(last, OK)
    assert t.value() == OK + lost + b"-ERR unknown\r\n" + OK


def test_a_transaction_handed_to_another_worker_aborts_there():
    h, c, t, a, pinned = watching()
    adopted = h.factory.adopt()
    second = StringTransport()
    adopted.makeConnection(second)
    adopted.import_state(json.loads(json.dumps(c.export_state())))
    c.connectionLost(Failure(ConnectionDone()))  # the old worker lets go: the watch goes with the connection
    assert pinned.transport.disconnecting
    adopted.dataReceived(cmd("MULTI") + cmd("SET", a, "1") + cmd("EXEC"))
    assert h.accept()[1:] == []  # nothing reached a backend
    assert second.value() == OK + QUEUED + EXECABORT  # MULTI is answered before any key


# -- the same machinery with groups finer than a server (a cluster's slots) -----------------------


class SlotRoute(HashRoute):
    """A hash route whose transactions are bound to a 'slot' (the key's last byte), as a cluster route's are."""

    def session_group(self, key):
        server = self.server_for(key) if key is not None else self.live[0]
        return (key[-1:] if key is not None else None), server

    def session_conflict(self, request, codec):
        return b"-CROSSSLOT Keys in request don't hash to the same slot\r\n"


def test_a_route_with_slots_pins_per_slot_not_per_server():
    h = Pinned(servers=(7001,))
    h.pool = SlotRoute(h.config.pools[0], codec, h.reactor)
    h.factory = ProxyFactory(h.pool)
    c, t = h.client()
    c.dataReceived(cmd("MULTI") + cmd("SET", "a1", "x") + cmd("SET", "b1", "y") + cmd("SET", "a2", "z") + cmd("EXEC"))
    (pinned,) = h.accept()  # one server: a1 and b1 share the slot '1', a2 does not
    assert pinned.pending() == [[b"MULTI"], [b"SET", b"a1", b"x"], [b"SET", b"b1", b"y"]]
    h.reply(pinned, OK + QUEUED + QUEUED)
    assert t.value() == OK + QUEUED + QUEUED + b"-CROSSSLOT Keys in request don't hash to the same slot\r\n" + EXECABORT
