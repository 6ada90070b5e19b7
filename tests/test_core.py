"""
The protocol-agnostic core (client and server connections, the pool, failures)
driven through the real Redis codec over in-memory transports and a fake clock.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectError, ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure

from twistedproxy.api import build_pool
from twistedproxy.config import config_from_dict
from twistedproxy.core import client as client_module
from twistedproxy.routes import hash as pool_module
from twistedproxy.core.client import ProxyFactory
from tests.support.resp import cmd

PORTS = (7001, 7002, 7003)


def bulk(value) -> bytes:
    if value is None:
        return b"$-1\r\n"
    return b"$%d\r\n%s\r\n" % (len(value), value)


def parse_commands(data: bytes) -> list:
    """The argument lists of the multibulk frames in C{data} (what a backend received)."""
    out = []
    pos = 0
    while pos < len(data):
        assert data[pos : pos + 1] == b"*", data[pos:]
        nl = data.index(b"\r\n", pos)
        count = int(data[pos + 1 : nl])
        pos = nl + 2
        args = []
        for _ in range(count):
            nl = data.index(b"\r\n", pos)
            length = int(data[pos + 1 : nl])
            args.append(data[nl + 2 : nl + 2 + length])
            pos = nl + 4 + length
        out.append(args)
    return out


class Backend:
    """One fake backend connection: what the proxy wrote, and replies on demand."""

    def __init__(self, port, protocol, transport, reactor):
        self.reactor = reactor
        self.port = port
        self.protocol = protocol
        self.transport = transport
        self.data = {}
        self.seen = 0  # bytes of transport.value() already answered

    def pending(self) -> list:
        """Commands written by the proxy and not answered yet."""
        return parse_commands(self.transport.value()[self.seen :])

    def answer(self, count=None, split=False) -> list:
        """Answer the oldest C{count} unanswered commands (all by default), like Redis would."""
        commands = self.pending()
        if count is not None:
            commands = commands[:count]
        raw = self.transport.value()[self.seen :]
        self.seen += len(b"".join(_frame(c) for c in commands)) if commands else 0
        assert raw.startswith(b"".join(_frame(c) for c in commands))
        replies = b"".join(self.reply(c) for c in commands)
        if split:  # one byte at a time: the reply parser must reassemble
            for i in range(len(replies)):
                self.protocol.dataReceived(replies[i : i + 1])
        elif replies:
            self.protocol.dataReceived(replies)
        self.reactor.advance(0)  # the end of the reactor turn: held requests go out
        return commands

    def reply(self, args) -> bytes:
        name = args[0].lower()
        if name in (b"auth", b"select"):
            return b"+OK\r\n"
        if name == b"ping":
            return b"+PONG\r\n"
        if name == b"set":
            self.data[args[1]] = args[2]
            return b"+OK\r\n"
        if name == b"get":
            return bulk(self.data.get(args[1]))
        if name == b"mget":
            return b"*%d\r\n" % (len(args) - 1) + b"".join(bulk(self.data.get(k)) for k in args[1:])
        if name == b"mset":
            for k, v in zip(args[1::2], args[2::2]):
                self.data[k] = v
            return b"+OK\r\n"
        if name in (b"del", b"exists"):
            n = sum(1 for k in args[1:] if k in self.data)
            if name == b"del":
                for k in args[1:]:
                    self.data.pop(k, None)
            return b":%d\r\n" % n
        if name == b"ping":
            return b"+PONG\r\n"
        raise AssertionError("unexpected command %r" % (args,))


def _frame(args) -> bytes:
    return cmd(*args)


def memory_client(factory, reactor):
    """A client of C{factory} on a StringTransport: (protocol, transport), or (None, None) if refused."""
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
    if protocol is None:
        return None, None
    transport = StringTransport()
    protocol.makeConnection(transport)
    read = protocol.dataReceived

    def data_received(data):
        # A real reactor ends the turn right after the read: backend writes go out then.
        read(data)
        reactor.advance(0)

    protocol.dataReceived = data_received
    return protocol, transport


class Harness:
    """A pool on a fake reactor; clients and backend connections on StringTransports."""

    def __init__(self, servers=PORTS, **pool_keys):
        self.reactor = MemoryReactorClock()
        pool = {"listen": "127.0.0.1:22121", "redis": True, "servers": ["127.0.0.1:%d:1" % p for p in servers]}
        pool.update(pool_keys)
        self.config = config_from_dict({"alpha": pool})
        self.pool = build_pool(self.config.pools[0], self.reactor)
        self.factory = ProxyFactory(self.pool)
        self.handled = 0  # entries of reactor.tcpClients already connected or failed
        self.backends = {}  # port -> current Backend

    def client(self):
        return memory_client(self.factory, self.reactor)

    def attempts(self) -> list:
        """Connection attempts not handled yet: (host, port, factory)."""
        return [(c[0], c[1], c[2]) for c in self.reactor.tcpClients[self.handled :]]

    def accept(self) -> dict:
        """Complete every pending connection attempt; port -> Backend."""
        for host, port, factory in self.attempts():
            self.handled += 1
            protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
            transport = StringTransport()
            protocol.makeConnection(transport)
            self.backends[port] = Backend(port, protocol, transport, self.reactor)
        return self.backends

    def refuse(self) -> None:
        """Fail every pending connection attempt (connection refused)."""
        for host, port, factory in self.attempts():
            self.handled += 1
            factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))

    def key_on(self, port: int, prefix: str = "key") -> bytes:
        """A key the pool places on the server listening on C{port}."""
        for i in range(10000):
            key = b"%s%d" % (prefix.encode(), i)
            if self.pool.server_for(key).spec.port == port:
                return key
        raise AssertionError("no key for port %d" % port)

    def keys_on(self, port: int, count: int, prefix: str = "k") -> list:
        out = []
        i = 0
        while len(out) < count:
            key = b"%s%d" % (prefix.encode(), i)
            if self.pool.server_for(key).spec.port == port:
                out.append(key)
            i += 1
        return out


# -- ordering, fragments and merge ------------------------------------------------


def test_replies_are_written_in_request_order_across_servers():
    h = Harness()
    c, t = h.client()
    a, b = h.key_on(7001), h.key_on(7002)
    c.dataReceived(cmd("GET", a) + cmd("GET", b) + cmd("PING"))
    backends = h.accept()
    backends[7001].data[a] = b"A"
    backends[7002].data[b] = b"B"
    assert backends[7002].answer() == [[b"GET", b]]
    assert t.value() == b""  # B waits for A
    backends[7001].answer()
    assert t.value() == b"$1\r\nA\r\n$1\r\nB\r\n+PONG\r\n"


def test_a_local_reply_first_is_written_at_once():
    h = Harness()
    c, t = h.client()
    c.dataReceived(cmd("PING") + cmd("GET", "x"))
    assert t.value() == b"+PONG\r\n"
    h.accept()[h.pool.server_for(b"x").spec.port].answer()
    assert t.value() == b"+PONG\r\n$-1\r\n"


def test_one_write_per_backend_per_batch():
    h = Harness()
    c, _ = h.client()
    keys = h.keys_on(7001, 5)
    c.dataReceived(b"".join(cmd("GET", k) for k in keys))
    backend = h.accept()[7001]
    assert [args[1] for args in backend.pending()] == keys
    assert 7002 not in h.backends and 7003 not in h.backends  # untouched servers: no connection


def test_multi_key_requests_are_split_and_merged_in_client_order():
    h = Harness()
    c, t = h.client()
    keys = [h.key_on(7001, "a"), h.key_on(7002, "b"), h.key_on(7003, "c"), h.key_on(7001, "d"), b"missing"]
    c.dataReceived(cmd("MSET", *[x for k in keys[:4] for x in (k, k.upper())]))
    backends = h.accept()
    for port in (7003, 7002, 7001):  # replies in any order
        assert backends[port].answer()[0][0].upper() == b"MSET"  # split frames may use lower case
    assert t.value() == b"+OK\r\n"
    t.clear()
    c.dataReceived(cmd("MGET", *keys) + cmd("DEL", *keys) + cmd("EXISTS", *keys))
    first = backends[7001].pending()[0]
    assert len(backends[7001].pending()) == 3 and first[0].upper() == b"MGET" and first[1:] == [keys[0], keys[3]]
    backends[7002].answer(split=True)
    backends[7003].answer()
    assert t.value() == b""
    backends[7001].answer()
    assert t.value() == (
        b"*5\r\n" + b"".join(bulk(k.upper()) for k in keys[:4]) + b"$-1\r\n" + b":4\r\n" + b":0\r\n"
    )


def test_a_failed_fragment_fails_the_whole_request():
    h = Harness()
    c, t = h.client()
    a, b = h.key_on(7001), h.key_on(7002)
    c.dataReceived(cmd("MGET", a, b) + cmd("GET", b))
    backends = h.accept()
    backends[7002].answer()
    backends[7001].protocol.connectionLost(Failure(ConnectionLost()))
    assert t.value() == b"-ERR Connection reset by peer\r\n$-1\r\n"


# -- timeouts -------------------------------------------------------------------------


def test_timeout_answers_an_error_and_drops_the_late_reply():
    h = Harness(timeout=100)
    c, t = h.client()
    a, b = h.key_on(7001), h.key_on(7002)
    c.dataReceived(cmd("GET", a) + cmd("GET", b))
    backends = h.accept()
    backends[7002].answer()
    h.reactor.advance(0.099)
    assert t.value() == b""
    h.reactor.advance(0.002)
    assert t.value() == b"-ERR Connection timed out\r\n$-1\r\n"
    t.clear()
    # The connection stays; once the backoff is over a new request goes on it,
    # and the expired request's late reply is thrown away, not given to it.
    h.reactor.advance(1)
    backends[7001].data[a] = b"late"
    c.dataReceived(cmd("SET", a, "new") + cmd("GET", a))
    assert [x[0] for x in backends[7001].pending()] == [b"GET", b"SET", b"GET"]
    backends[7001].answer()
    assert t.value() == b"+OK\r\n$3\r\nnew\r\n"
    h.reactor.advance(1)
    assert t.value() == b"+OK\r\n$3\r\nnew\r\n"  # answered requests never time out


def test_timeouts_fire_per_request_age():
    h = Harness(timeout=100)
    c, t = h.client()
    a = h.key_on(7001)
    c.dataReceived(cmd("GET", a))
    backend = h.accept()[7001]
    h.reactor.advance(0.05)
    c.dataReceived(cmd("PING") + cmd("GET", a))
    h.reactor.advance(0.051)
    assert t.value() == b"-ERR Connection timed out\r\n+PONG\r\n"
    backend.answer(1)  # the late reply of the first GET: dropped
    backend.answer()
    assert t.value() == b"-ERR Connection timed out\r\n+PONG\r\n$-1\r\n"
    h.reactor.advance(1)
    assert t.value().count(b"-ERR Connection timed out") == 1


def test_timeout_of_a_fragment():
    h = Harness(timeout=100)
    c, t = h.client()
    a, b = h.key_on(7001), h.key_on(7002)
    c.dataReceived(cmd("MGET", a, b))
    h.accept()[7002].answer()
    h.reactor.advance(0.1)
    assert t.value() == b"-ERR Connection timed out\r\n"


# -- failures ------------------------------------------------------------------------


def test_backend_lost_mid_pipeline_errors_exactly_its_requests():
    h = Harness()
    c, t = h.client()
    a, b = h.keys_on(7001, 2), h.key_on(7002)
    c.dataReceived(cmd("GET", a[0]) + cmd("GET", b) + cmd("GET", a[1]) + cmd("PING"))
    backends = h.accept()
    backends[7001].answer(1)
    backends[7001].protocol.connectionLost(Failure(ConnectionLost()))
    assert t.value() == b"$-1\r\n"  # the GET to 7002 is still pending
    backends[7002].answer()
    assert t.value() == b"$-1\r\n$-1\r\n-ERR Connection reset by peer\r\n+PONG\r\n"


def test_a_connection_lost_while_connecting_is_logged_by_its_cause():
    """
    Twisted reports a connection lost before it was made (the reactor stopping
    while a backend connects) as a ConnectError that carries the loss's whole
    Failure; the log names the loss, and no traceback header reaches it.
    """
    h = Harness()
    c, t = h.client()
    c.dataReceived(cmd("GET", h.key_on(7001)))
    ((host, port, factory),) = h.attempts()
    with capturedLogs() as events:
        factory.clientConnectionFailed(None, Failure(ConnectError(string=Failure(ConnectionLost("Connection lost")))))
    assert t.value() == b"-ERR unknown\r\n"  # nutcracker's text where it has no errno
    (line,) = [formatEvent(event) for event in events if "cannot connect" in formatEvent(event)]
    assert "Traceback" not in line and "Failure" not in line
    assert "cannot connect (Connection to the other side was lost in a non-clean fashion: Connection lost.)" in line


def test_reconnect_after_backoff():
    h = Harness()
    c, t = h.client()
    a = h.key_on(7001)
    c.dataReceived(cmd("GET", a))
    h.refuse()
    assert t.value() == b"-ERR Connection refused\r\n"
    t.clear()
    c.dataReceived(cmd("GET", a))  # during the backoff: fails at once, no new attempt, as the attempt did
    assert t.value() == b"-ERR Connection refused\r\n"
    assert h.attempts() == []
    t.clear()
    h.reactor.advance(1)
    c.dataReceived(cmd("GET", a))
    backend = h.accept()[7001]
    backend.data[a] = b"v"
    backend.answer()
    assert t.value() == b"$1\r\nv\r\n"


def test_ejection_after_failure_limit_and_readmission():
    h = Harness(auto_eject_hosts=True, server_failure_limit=2, server_retry_timeout=1000)
    c, t = h.client()
    a = h.key_on(7001)
    for _ in range(2):
        c.dataReceived(cmd("GET", a))
        h.refuse()
        h.reactor.advance(0.5)  # past the reconnect backoff
    assert t.value().count(b"-ERR Connection refused") == 2
    assert [s.spec.port for s in h.pool.live] == [7002, 7003]
    new_port = h.pool.server_for(a).spec.port
    assert new_port != 7001
    t.clear()
    c.dataReceived(cmd("GET", a))
    h.accept()[new_port].answer()
    assert t.value() == b"$-1\r\n"
    h.reactor.advance(0.6)  # 1.1 s after the ejection: a probe first, no traffic yet
    assert h.pool.server_for(a).spec.port == new_port
    probe = h.accept()[7001]
    assert probe.answer() == [[b"PING"]]
    assert h.pool.server_for(a).spec.port == 7001
    t.clear()
    c.dataReceived(cmd("GET", a))
    assert h.attempts() == []  # the probe's connection carries the traffic
    probe.answer()
    assert t.value() == b"$-1\r\n"


def test_a_failed_probe_keeps_the_server_ejected_without_failing_requests():
    h = Harness(timeout=100, auto_eject_hosts=True, server_failure_limit=1, server_retry_timeout=1000)
    c, t = h.client()
    a = h.key_on(7001)
    c.dataReceived(cmd("GET", a))
    h.refuse()
    server = h.pool.servers[0]
    assert server.ejected and h.pool.stats.server_ejects == 1
    t.clear()
    h.reactor.advance(1.0)
    h.refuse()  # the probe cannot connect
    assert server.ejected
    h.reactor.advance(1.0)
    h.accept()  # the next probe connects, but the backend does not answer
    h.reactor.advance(0.1)
    assert server.ejected and server.probing is None
    c.dataReceived(cmd("GET", a))
    h.accept()[h.pool.server_for(a).spec.port].answer()
    # No client saw any of it, and it was never counted as a new ejection or timeout.
    assert t.value() == b"$-1\r\n"
    assert h.pool.stats.server_ejects == 1 and server.stats.server_timedout == 0
    h.reactor.advance(1.0)
    h.accept()[7001].answer()
    assert not server.ejected


def test_the_placement_cache_is_bounded_and_agrees_with_the_hash(monkeypatch):
    monkeypatch.setattr(pool_module, "PLACEMENT_CACHE_SIZE", 8)
    monkeypatch.setattr(pool_module, "PLACEMENT_CACHE_ENABLED", True)  # CPython only by default
    h = Harness()
    pool = h.pool
    keys = [b"k%d" % i for i in range(50)]
    placed = [pool.server_for(k) for k in keys]
    again = [pool.server_for(k) for k in keys]  # from the cache where it still holds them
    assert again == placed
    assert len(pool._placement) == 8
    # What the cache answers is what hashing answers.
    uncached = [pool.live[pool._index(pool._hash(k))] for k in keys]
    assert placed == uncached
    long_key = b"x" * (pool_module.PLACEMENT_CACHE_KEY_BYTES + 1)
    pool._placement.clear()
    pool.server_for(long_key)
    assert pool._placement == {}


def test_random_distribution_is_not_cached():
    h = Harness(distribution="random")
    seen = {h.pool.server_for(b"same-key").spec.port for _ in range(200)}
    assert seen == {7001, 7002, 7003}
    assert h.pool._placement == {}


def test_ejection_after_timeouts():
    h = Harness(timeout=100, auto_eject_hosts=True, server_failure_limit=2, server_retry_timeout=1000)
    c, t = h.client()
    a = h.key_on(7001)
    c.dataReceived(cmd("GET", a))
    h.accept()
    h.reactor.advance(0.1)
    h.reactor.advance(0.5)  # past the backoff: the next request goes to the same server
    c.dataReceived(cmd("GET", a))
    h.reactor.advance(0.1)
    assert t.value().count(b"-ERR Connection timed out") == 2
    assert 7001 not in [s.spec.port for s in h.pool.live]


def test_requests_behind_a_timeout_that_ejects_fail_as_timed_out():
    h = Harness(timeout=100, auto_eject_hosts=True, server_failure_limit=1, server_retry_timeout=1000)
    c, t = h.client()
    a = h.key_on(7001)
    c.dataReceived(cmd("GET", a))
    backend = h.accept()[7001]
    h.reactor.advance(0.05)
    c.dataReceived(cmd("GET", a))  # younger: not due when the first times out
    h.reactor.advance(0.05)
    assert t.value() == b"-ERR Connection timed out\r\n"
    assert backend.transport.disconnecting  # the ejection closes the connection
    backend.protocol.connectionLost(Failure(ConnectionDone()))
    assert t.value() == b"-ERR Connection timed out\r\n" * 2  # as nutcracker, which closes on a timeout


def test_an_old_failure_is_forgotten_once_a_connection_is_made():
    h = Harness()
    c, t = h.client()
    a = h.key_on(7001)
    c.dataReceived(cmd("GET", a))
    h.refuse()
    h.reactor.advance(1)
    c.dataReceived(cmd("GET", a))
    h.accept()
    h.pool.stop()  # closes with the request in flight: no failure of the server's
    h.backends[7001].protocol.connectionLost(Failure(ConnectionDone()))
    assert t.value() == b"-ERR Connection refused\r\n-ERR unknown\r\n"


def test_all_servers_ejected():
    h = Harness(servers=(7001,), auto_eject_hosts=True, server_failure_limit=1, server_retry_timeout=1000)
    c, t = h.client()
    c.dataReceived(cmd("GET", "x"))
    h.refuse()
    c.dataReceived(cmd("GET", "x") + cmd("MGET", "x", "y") + cmd("PING"))
    assert t.value().endswith(b"-ERR Connection refused\r\n" * 2 + b"+PONG\r\n")


# -- backpressure and limits -----------------------------------------------------


def test_reading_pauses_with_too_many_pending_and_resumes():
    h = Harness(servers=(7001,), client_max_pending=8)
    c, t = h.client()
    c.dataReceived(b"".join(cmd("GET", "k%d" % i) for i in range(10)))
    assert t.producerState == "paused"
    backend = h.accept()[7001]
    backend.answer(4)
    assert t.producerState == "paused"  # 6 still pending: above half the limit
    backend.answer(2)
    assert t.producerState == "producing"
    backend.answer()
    assert t.value() == b"$-1\r\n" * 10


def test_full_write_buffer_holds_requests_back():
    h = Harness(servers=(7001,))
    c, t = h.client()
    c.dataReceived(cmd("GET", "a"))
    backend = h.accept()[7001]
    c.pauseProducing()  # what the transport does when its buffer is full
    assert t.producerState == "paused"
    c.dataReceived(cmd("GET", "b") + cmd("PING"))
    assert len(backend.pending()) == 1  # b is held, not sent
    backend.answer()
    assert t.value() == b"$-1\r\n"
    c.resumeProducing()
    h.reactor.advance(0)
    assert t.producerState == "producing"
    assert backend.pending() == [[b"GET", b"b"]]
    backend.answer()
    assert t.value() == b"$-1\r\n$-1\r\n+PONG\r\n"


def test_dispatch_window_bounds_requests_at_backends():
    window = client_module.DISPATCH_WINDOW
    h = Harness(servers=(7001,))
    c, t = h.client()
    total = window * 2 + 5
    c.dataReceived(b"".join(cmd("GET", "k%d" % i) for i in range(total)))
    backend = h.accept()[7001]
    assert len(backend.pending()) == window
    answered = 0
    while answered < total:
        answered += len(backend.answer(7))
        assert len(backend.pending()) == min(window, total - answered)
    assert t.value() == b"$-1\r\n" * total


def test_client_connections_limit():
    h = Harness(client_connections=2)
    first, _ = h.client()
    second, _ = h.client()
    assert h.client() == (None, None)
    first.connectionLost(Failure(ConnectionLost()))
    third, _ = h.client()
    assert third is not None
    assert len(h.pool.clients) == 2 and second in h.pool.clients


def test_client_gone_with_requests_in_flight():
    h = Harness()
    c, t = h.client()
    a = h.key_on(7001)
    c.dataReceived(cmd("GET", a) + cmd("GET", a))
    c.connectionLost(Failure(ConnectionLost()))
    backend = h.accept()[7001]
    backend.answer()  # replies for a gone client are dropped
    other, t2 = h.client()
    other.dataReceived(cmd("GET", a))
    backend.answer()
    assert t2.value() == b"$-1\r\n"
    assert c not in h.pool.clients


def test_quit_closes_after_earlier_replies():
    h = Harness()
    c, t = h.client()
    a = h.key_on(7001)
    c.dataReceived(cmd("GET", a) + cmd("QUIT") + cmd("GET", a))
    backend = h.accept()[7001]
    assert len(backend.pending()) == 1
    assert not t.disconnecting
    backend.answer()
    assert t.value() == b"$-1\r\n+OK\r\n"
    assert t.disconnecting


def test_a_quit_whose_reply_meets_a_reset_counts_as_an_eof():
    h = Harness()
    c, _ = h.client()
    c.dataReceived(cmd("QUIT"))
    c.connectionLost(Failure(ConnectionLost()))  # the client had closed: the +OK met a reset
    other, _ = h.client()
    other.connectionLost(Failure(ConnectionLost()))
    assert (h.pool.stats.client_eof, h.pool.stats.client_err) == (1, 1)


def test_half_closed_client_gets_every_reply_then_is_closed():
    window = client_module.DISPATCH_WINDOW
    h = Harness(client_max_pending=window * 4)
    c, t = h.client()
    a, b = h.key_on(7001), h.key_on(7002)
    held = [cmd("GET", a)] * (window + 3)  # more than the dispatch window: some are held
    c.dataReceived(cmd("GET", b) + cmd("MGET", a, b) + cmd("PING") + b"".join(held) + cmd("GET", a)[:7])
    c.readConnectionLost()  # shutdown(SHUT_WR) after a partial frame
    resumed = []
    t.resumeProducing = lambda: resumed.append(True)  # reading again would see the EOF again
    assert not t.disconnecting
    backends = h.accept()
    backends[7002].data[b] = b"B"
    backends[7002].answer()
    assert not t.disconnecting
    while backends[7001].pending():
        backends[7001].answer(5)
    assert t.value() == b"$1\r\nB\r\n*2\r\n$-1\r\n$1\r\nB\r\n+PONG\r\n" + b"$-1\r\n" * (window + 3)
    assert t.disconnecting and not resumed


def test_half_closed_idle_client_is_closed_at_once():
    h = Harness()
    c, t = h.client()
    c.dataReceived(cmd("PING"))
    c.readConnectionLost()
    assert t.value() == b"+PONG\r\n" and t.disconnecting


def test_half_closed_client_does_not_resume_reading():
    h = Harness(servers=(7001,))
    c, t = h.client()
    c.dataReceived(cmd("GET", "a"))
    c.pauseProducing()  # its write buffer is full
    c.readConnectionLost()
    resumed = []
    t.resumeProducing = lambda: resumed.append(True)
    c.resumeProducing()  # the buffer drained
    h.accept()[7001].answer()
    assert t.value() == b"$-1\r\n" and t.disconnecting and not resumed


def test_protocol_error_serves_earlier_requests_then_closes():
    h = Harness()
    c, t = h.client()
    a = h.key_on(7001)
    c.dataReceived(cmd("GET", a) + b"*1\r\n:oops\r\n")
    backend = h.accept()[7001]
    assert not t.disconnecting
    backend.answer()
    assert t.value().startswith(b"$-1\r\n-ERR Protocol error")
    assert t.disconnecting


def test_garbage_from_a_backend_fails_its_requests():
    h = Harness()
    c, t = h.client()
    a = h.key_on(7001)
    c.dataReceived(cmd("GET", a))
    backend = h.accept()[7001]
    backend.protocol.dataReceived(b"?what\r\n")
    assert backend.transport.disconnecting or backend.transport.disconnected
    backend.protocol.connectionLost(Failure(ConnectionLost()))
    assert t.value() == b"-ERR Invalid argument\r\n"


# -- connecting ------------------------------------------------------------------------


def test_preconnect_opens_every_server_connection():
    h = Harness(preconnect=True, server_connections=2)
    assert h.attempts() == []
    h.pool.start()
    ports = sorted(port for _, port, _ in h.attempts())
    assert ports == sorted(PORTS * 2)


def test_connections_are_made_on_demand_without_preconnect():
    h = Harness()
    h.pool.start()
    assert h.attempts() == []


def test_handshake_auth_and_select_are_swallowed():
    h = Harness(servers=(7001,), redis_auth="pw", redis_db=2)
    c, t = h.client()
    c.dataReceived(cmd("AUTH", "pw") + cmd("SET", "a", "1") + cmd("GET", "a"))
    backend = h.accept()[7001]
    assert backend.pending() == [[b"AUTH", b"pw"], [b"SELECT", b"2"], [b"SET", b"a", b"1"], [b"GET", b"a"]]
    backend.answer(3)
    assert t.value() == b"+OK\r\n+OK\r\n"  # the client's AUTH (answered by the proxy) and its SET
    backend.answer()
    assert t.value() == b"+OK\r\n+OK\r\n$1\r\n1\r\n"


def test_handshake_on_every_new_connection():
    h = Harness(servers=(7001,), redis_db=5)
    c, t = h.client()
    c.dataReceived(cmd("GET", "a"))
    backend = h.accept()[7001]
    assert backend.pending()[0] == [b"SELECT", b"5"]
    backend.answer()
    backend.protocol.connectionLost(Failure(ConnectionLost()))
    h.reactor.advance(1)
    c.dataReceived(cmd("GET", "a"))
    backend = h.accept()[7001]
    assert backend.pending() == [[b"SELECT", b"5"], [b"GET", b"a"]]
    backend.answer()
    assert t.value() == b"$-1\r\n$-1\r\n"


def test_refused_handshake_is_not_given_to_clients():
    h = Harness(servers=(7001,), redis_db=5)
    c, t = h.client()
    c.dataReceived(cmd("GET", "a"))
    backend = h.accept()[7001]
    backend.seen = len(cmd("SELECT", "5"))
    backend.protocol.dataReceived(b"-ERR DB index is out of range\r\n")
    backend.answer()
    assert t.value() == b"$-1\r\n"


def test_handshake_replies_do_not_time_out_early():
    h = Harness(servers=(7001,), timeout=100, redis_db=2, server_failure_limit=1, auto_eject_hosts=True)
    h.reactor.advance(1000)  # a real clock is far from 0
    c, t = h.client()
    c.dataReceived(cmd("GET", "a"))
    backend = h.accept()[7001]
    h.reactor.advance(0.05)
    backend.answer()
    assert t.value() == b"$-1\r\n"
    assert h.pool.servers[0].failures == 0 and not h.pool.servers[0].ejected


def test_a_frozen_backend_times_out_during_the_handshake():
    h = Harness(servers=(7001,), timeout=100, redis_db=2)
    h.reactor.advance(1000)
    c, t = h.client()
    c.dataReceived(cmd("GET", "a"))
    h.accept()
    h.reactor.advance(0.1)
    assert t.value() == b"-ERR Connection timed out\r\n"


def test_closing_connections_on_ejection_is_not_a_new_failure():
    h = Harness(timeout=100, auto_eject_hosts=True, server_failure_limit=2, server_retry_timeout=1000)
    c, t = h.client()
    a = h.key_on(7001)
    for _ in range(2):
        c.dataReceived(cmd("GET", a))
        h.accept()
        h.reactor.advance(0.1)
        h.reactor.advance(0.5)
    server = h.pool.servers[0]
    assert server.ejected
    h.backends[7001].protocol.connectionLost(Failure(ConnectionLost()))  # the close we asked for
    h.reactor.advance(1)
    h.accept()[7001].answer()  # the probe
    assert not server.ejected
    # One more failure after readmission is not enough to eject it again.
    c.dataReceived(cmd("GET", a))
    h.backends[7001].protocol.connectionLost(Failure(ConnectionLost()))
    assert not server.ejected and server.failures == 1


def test_a_connection_closed_while_connecting_is_dropped_once_connected():
    h = Harness(servers=(7001, 7002), server_connections=2, auto_eject_hosts=True, server_failure_limit=1)
    c, t = h.client()
    a = h.key_on(7001)
    c.dataReceived(cmd("GET", a) + cmd("GET", a))
    attempts = h.attempts()
    assert len(attempts) == 2
    h.handled += 1
    attempts[0][2].clientConnectionFailed(None, Failure(ConnectionRefusedError()))  # -> ejected
    assert h.pool.servers[0].ejected
    backend = h.accept()[7001]  # the other attempt completes after the ejection
    assert backend.transport.disconnecting
    backend.protocol.connectionLost(Failure(ConnectionLost()))
    assert t.value().count(b"-ERR") == 2


def test_held_requests_released_by_a_lost_connection_are_not_sent_on_it():
    window = client_module.DISPATCH_WINDOW
    h = Harness(servers=(7001,))
    c, t = h.client()
    c.dataReceived(b"".join(cmd("GET", "k%d" % i) for i in range(window + 10)))
    backend = h.accept()[7001]
    backend.protocol.connectionLost(Failure(ConnectionLost()))
    # The failed requests make room for the held ones: they must not be queued
    # on the dead connection (where no reply would ever come).
    replies = t.value().split(b"\r\n")[:-1]
    assert len(replies) == window + 10, replies[-3:]
    assert replies[-1] == b"-ERR Connection reset by peer"


def test_one_timer_per_connection_when_timeouts_release_held_requests():
    window = client_module.DISPATCH_WINDOW
    h = Harness(servers=(7001,), timeout=100)
    c, t = h.client()
    c.dataReceived(b"".join(cmd("GET", "k%d" % i) for i in range(window + 5)))
    backend = h.accept()[7001]
    h.reactor.advance(0.1)
    assert t.value().count(b"-ERR Connection timed out") == window
    timers = [d for d in h.reactor.getDelayedCalls() if d.active() and "_timer_fired" in repr(d.func)]
    assert len(timers) == 1, timers
    h.reactor.advance(0.1)
    assert t.value().count(b"-ERR Connection timed out") == window + 5
    backend.answer()  # late replies: all dropped
    assert t.value().count(b"\r\n") == window + 5


def test_probe_requests_are_what_each_protocol_frames_as_ping_or_version():
    from twistedproxy.protocols import memcache, memcache_binary, memcache_text, redis

    for codec, command in ((redis.codec, b"ping"), (memcache_text.codec, b"version"),
                           (memcache_binary.codec, b"version"), (memcache.codec, b"version")):
        probe = codec.probe_request()
        parsed = codec.request_parser(config_from_dict({"a": {"listen": "127.0.0.1:1", "servers": ["127.0.0.1:2:1"]}}
                                                        ).pools[0]).feed(probe.frame)
        assert [r.command for r in parsed] == [command], codec
        assert probe.command == command and probe.client is None and probe.server is None
