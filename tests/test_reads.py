"""
twistedproxy.core.reads: the proxy's connections, to clients and to backends,
read at most READ_SIZE bytes at a time on a real TCP transport, and a reply
larger than that still arrives whole.
"""

from __future__ import annotations

import socket
import time

import pytest
from twisted.internet import epollreactor

from tests.support.processes import HOST, free_port
from twistedproxy import Proxy
from twistedproxy.core.reads import READ_SIZE

pytestmark = pytest.mark.integration


def _spin(reactor, predicate, timeout=10.0):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        reactor.iterate(0.01)


def test_connections_read_at_most_read_size(redis_backends):
    (backend,) = redis_backends(1)
    reactor = epollreactor.EPollReactor()  # Twisted's own: the read size is the core's, whatever the reactor
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
    value = b"v" * (5 * READ_SIZE + 7)
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
    assert client.transport.bufferSize == READ_SIZE
    (conn,) = [c for conns in proxy.pools["p"].servers[0].connections.values() for c in conns]
    assert conn.transport.bufferSize == READ_SIZE
    sock.close()
    port.stopListening()
    proxy.pools["p"].stop()
    reactor.iterate(0)
