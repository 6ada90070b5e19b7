"""
L{twistedproxy.core.reads.fast_reads}: Twisted's reads into one reused buffer,
on real TCP connections of the real reactor.
"""

from __future__ import annotations

import gc
import platform
import socket

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.tcp import Connection
from twisted.internet.testing import StringTransport

from twistedproxy.core import reads
from twistedproxy.core.reads import fast_reads


class Collect(Protocol):
    def __init__(self, enabled):
        self.enabled = enabled
        self.chunks = []
        self.installed = None
        self.made = Deferred()
        self.lost = Deferred()

    def connectionMade(self):
        self.installed = fast_reads(self.transport, enabled=self.enabled)
        self.made.callback(self)

    def dataReceived(self, data):
        assert type(data) is bytes
        self.chunks.append(data)

    def connectionLost(self, reason):
        self.reason = reason
        self.lost.callback(None)


@inlineCallbacks
def serve(enabled=True):
    """A listening port whose one connection is a L{Collect}; returns (port, protocol, client socket)."""
    from twisted.internet import reactor

    made = []

    class Factory(ServerFactory):
        def buildProtocol(self, addr):
            proto = Collect(enabled)
            made.append(proto)
            return proto

    port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
    client = socket.create_connection(("127.0.0.1", port.getHost().port))
    while not made:
        d = Deferred()
        reactor.callLater(0.01, d.callback, None)
        yield d
    proto = yield made[0].made
    return port, proto, client


@pytest_twisted.inlineCallbacks
def test_reads_deliver_every_byte_as_bytes_and_the_end_of_the_stream():
    port, proto, client = yield serve()
    try:
        assert proto.installed is True
        assert proto.transport.doRead is not Connection.doRead.__get__(proto.transport)
        payload = bytes(range(256)) * 1000  # more than one buffer's worth
        client.sendall(b"small")
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        yield proto.lost
        assert proto.reason.check(ConnectionDone)
        assert b"".join(proto.chunks) == b"small" + payload
        assert max(len(c) for c in proto.chunks) <= 65536
    finally:
        client.close()
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_disabled_or_foreign_transports_keep_twisteds_reads():
    port, proto, client = yield serve(enabled=False)
    try:
        assert proto.installed is False
        assert "doRead" not in vars(proto.transport)
        assert fast_reads(StringTransport(), enabled=True) is False
    finally:
        client.close()
        yield port.stopListening()


def test_only_pypy_needs_it():
    assert reads.NEEDED == (platform.python_implementation() == "PyPy")


@pytest.mark.skipif(not hasattr(gc, "hooks"), reason="PyPy's GC hooks count minor collections")
@pytest_twisted.inlineCallbacks
def test_small_reads_do_not_fill_pypys_nursery():
    """
    The root cause of issue #10's pauses: C{recv(65536)} counted 64 KiB of
    allocation per read, a minor collection every ~16 reads.  Counted, not timed.
    """
    port, proto, client = yield serve()
    transport = proto.transport
    transport.stopReading()  # this test drives the reads itself
    minors = []
    gc.hooks.on_gc_minor = lambda stats: minors.append(stats.count)
    try:
        for _ in range(2000):
            client.sendall(b"*2\r\n$3\r\nGET\r\n$3\r\nkey\r\n")
            transport.doRead()
    finally:
        gc.hooks.on_gc_minor = None
        client.close()
        yield port.stopListening()
    assert len(b"".join(proto.chunks)) == 2000 * 22
    # Twisted's own reads made about 125 here (2000 * 64 KiB / a 1 MiB nursery).
    assert sum(minors) < 40, sum(minors)
