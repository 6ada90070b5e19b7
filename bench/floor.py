"""
The floor under the proxy: the proxy's own I/O layer forwarding bytes, and
nothing else.  Each client connection gets one connection to the backend, and
whatever one side sends is written to the other as it arrives: no parsing,
routing, ordering queue, stats or timers.  It reads and writes the way the
proxy does (its reactor, and each side set up by L{twistedproxy.core.transports}:
reads into the shared buffer, immediate writes, TCP_NODELAY), so the
difference between a proxy row and this row of C{bench/latency.py} is what the
core costs on that interpreter, and this row is the least latency and CPU that
a Twisted process can add on this machine.

    PYTHONPATH=. .venv-cpython/bin/python bench/floor.py LISTEN_PORT BACKEND_PORT

C{bench/latency.py --targets floor-cpython,floor-pypy} runs it (bench/README.md,
"Measured in the twelfth #10 session").  Not a proxy: a client's bytes reach
the backend as they come, so only a client that waits for the connection's
replies, one backend behind it, gets them right.
"""

from __future__ import annotations

import sys

import twistedproxy.reactor

twistedproxy.reactor.install()  # the reactor the proxy serves on
from twisted.internet import protocol, reactor  # noqa: E402

from twistedproxy.core.transports import set_up_accepted, set_up_connected  # noqa: E402

HOST = "127.0.0.1"


class Backend(protocol.Protocol):
    """The client's connection to the backend: replies go straight to the client."""

    def __init__(self, client):
        self.client = client
        self.write = None

    def connectionMade(self):
        self.write = set_up_connected(self.transport)
        self.transport.setTcpNoDelay(True)  # as the proxy's backend connections do, once connected
        self.client.backend_ready(self)

    def dataReceived(self, data):
        self.client.write(data)

    def connectionLost(self, reason):
        self.client.transport.loseConnection()


class Client(protocol.Protocol):
    """A client connection: its bytes go to its backend connection (held until it is up)."""

    def __init__(self, backend_port: int):
        self.backend_port = backend_port
        self.backend = None
        self.early = []  # bytes received before the backend connection was up

    def connectionMade(self):
        self.write = set_up_accepted(self.transport, self)
        protocol.ClientCreator(reactor, Backend, self).connectTCP(HOST, self.backend_port).addErrback(
            lambda _: self.transport.loseConnection())

    def backend_ready(self, backend):
        self.backend = backend
        if self.early:
            backend.write(b"".join(self.early))
            del self.early[:]

    def dataReceived(self, data):
        if self.backend is None:
            self.early.append(data)
        else:
            self.backend.write(data)

    def connectionLost(self, reason):
        if self.backend is not None:
            self.backend.transport.loseConnection()

    # The producer of this client's writes is its backend connection's reads:
    # a client that does not read its replies stops those reads.

    def pauseProducing(self):
        if self.backend is not None:
            self.backend.transport.pauseProducing()

    def resumeProducing(self):
        if self.backend is not None:
            self.backend.transport.resumeProducing()

    def stopProducing(self):
        pass


class FloorFactory(protocol.Factory):
    """Makes a L{Client} for each accepted connection, in front of the backend at C{backend_port}."""

    def __init__(self, backend_port: int):
        self.backend_port = backend_port

    def buildProtocol(self, addr):
        return Client(self.backend_port)


def main(argv) -> None:
    listen_port, backend_port = int(argv[1]), int(argv[2])
    reactor.listenTCP(listen_port, FloorFactory(backend_port), interface=HOST)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv)
