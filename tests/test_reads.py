"""
twistedproxy.core.reads: a Twisted TCP transport made to read into the shared
buffer behaves as Twisted's own doRead does (each scenario runs both ways with
real sockets and must come out the same), and the proxy's connections, to
clients and to backends, read that way.
"""

from __future__ import annotations

import gc
import socket
import struct
import time

import pytest
from twisted.internet import epollreactor, error, interfaces
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from tests.support.processes import HOST, free_port
from twistedproxy import Proxy
from twistedproxy.core.reads import READ_SIZE, fast_reads


def _spin(reactor, predicate, timeout=10.0):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        reactor.iterate(0.01)


@implementer(interfaces.IHalfCloseableProtocol)
class Recorder(Protocol):
    fast = False

    def connectionMade(self):
        self.events = []
        self.data = []
        if self.fast:
            fast_reads(self.transport)

    def dataReceived(self, data):
        self.data.append(data)
        self.transport.write(b"%d\n" % len(data))

    def readConnectionLost(self):
        self.events.append("readConnectionLost")
        self.transport.loseConnection()

    def connectionLost(self, reason):
        self.events.append(reason.type)


@pytest.fixture(params=["twisted", "fast"])
def served(request):
    """(reactor, the protocols made, port) with Twisted's reads or fast_reads."""
    reactor = epollreactor.EPollReactor()
    made = []

    class Made(Recorder):
        fast = request.param == "fast"

        def connectionMade(self):
            Recorder.connectionMade(self)
            made.append(self)

    port = reactor.listenTCP(0, Factory.forProtocol(Made), interface=HOST)
    yield reactor, made, port.getHost().port
    port.stopListening()
    reactor.iterate(0)


def test_data_half_close_and_end(served):
    reactor, made, port = served
    sock = socket.create_connection((HOST, port), timeout=10)
    payload = bytes(range(256)) * (3 * READ_SIZE // 256) + b"tail"
    sock.sendall(payload)
    _spin(reactor, lambda: made and sum(len(d) for d in made[0].data) == len(payload))
    (server,) = made
    assert b"".join(server.data) == payload
    assert all(type(d) is bytes and len(d) <= READ_SIZE for d in server.data)
    sock.shutdown(socket.SHUT_WR)
    _spin(reactor, lambda: len(server.events) == 2)
    assert server.events == ["readConnectionLost", error.ConnectionDone]
    sock.close()


def test_reset_is_connection_lost(served):
    reactor, made, port = served
    sock = socket.create_connection((HOST, port), timeout=10)
    sock.sendall(b"x")
    _spin(reactor, lambda: made and made[0].data)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    _spin(reactor, lambda: made[0].events)
    assert made[0].events == [error.ConnectionLost]


@pytest.mark.integration
def test_the_proxys_connections_read_into_the_shared_buffer(redis_backends):
    (backend,) = redis_backends(1)
    reactor = epollreactor.EPollReactor()
    proxy = Proxy.from_dict({"p": {"listen": "%s:%d" % (HOST, free_port()), "redis": True,
                                   "servers": ["%s:%d:1" % (HOST, backend.port)]}}, reactor)
    factory = proxy.factories["p"]
    clients = []
    build = factory.buildProtocol

    def remember(addr):
        protocol = build(addr)
        clients.append(protocol)
        return protocol

    factory.buildProtocol = remember
    port = reactor.listenTCP(0, factory, interface=HOST)
    value = b"v" * (5 * READ_SIZE + 7)  # more than one read each way
    request = b"*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n$%d\r\n%s\r\n*2\r\n$3\r\nGET\r\n$3\r\nbig\r\n" % (len(value), value)
    expected = b"+OK\r\n$%d\r\n%s\r\n" % (len(value), value)
    sock = socket.create_connection((HOST, port.getHost().port), timeout=10)
    sock.setblocking(False)
    sock.sendall(request)
    got = []

    def replied():
        try:
            got.append(sock.recv(1 << 20))
        except BlockingIOError:
            pass
        return len(b"".join(got)) >= len(expected)

    _spin(reactor, replied)
    assert b"".join(got) == expected
    (client,) = clients
    (conn,) = [c for conns in proxy.pools["p"].servers[0].connections.values() for c in conns]
    for transport in (client.transport, conn.transport):
        assert "doRead" in vars(transport)  # fast_reads' reader, not the class's
    sock.close()
    port.stopListening()
    proxy.pools["p"].stop()
    reactor.iterate(0)


@pytest.mark.skipif(not hasattr(gc, "hooks"), reason="PyPy's GC hooks count minor collections")
def test_small_reads_do_not_fill_pypys_nursery(served):
    """
    The root cause of issue #10's pauses: C{recv(65536)} counted 64 KiB of
    allocation per read, a minor collection every ~16 reads.  Counted, not timed.
    """
    reactor, made, port = served
    sock = socket.create_connection((HOST, port), timeout=10)
    _spin(reactor, lambda: made)
    (server,) = made
    server.transport.stopReading()  # this test drives the reads itself
    minors = []
    gc.hooks.on_gc_minor = lambda stats: minors.append(stats.count)
    try:
        for _ in range(2000):
            sock.sendall(b"*2\r\n$3\r\nGET\r\n$3\r\nkey\r\n")
            server.transport.doRead()
    finally:
        gc.hooks.on_gc_minor = None
        sock.close()
    assert len(b"".join(server.data)) == 2000 * 22
    if server.fast:
        # Twisted's own reads made about 125 here (2000 * 64 KiB / a 1 MiB nursery).
        assert sum(minors) < 40, sum(minors)
