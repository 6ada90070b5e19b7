"""
How a connection reads.

Twisted's TCP transports read with C{socket.recv(bufferSize)}, 64 KiB.  PyPy
allocates a buffer of the full size for every such read, outside the nursery:
at tens of thousands of small reads a second those buffers drove most of its
garbage collections (bench/README.md).  L{fast_reads} makes a Twisted TCP
transport read into one buffer that the whole process shares instead (reads
happen one at a time, in the reactor's thread, and each read's bytes are
copied out before C{dataReceived} sees them), so a read allocates only the
bytes it got.  Everything else is Twisted's C{doRead}: a read error loses the
connection, an empty read is the end of the stream, C{dataReceived} gets the
bytes.
"""

from __future__ import annotations

from errno import EWOULDBLOCK

from twisted.internet import main
from twisted.internet.tcp import Connection

from twistedproxy.net.tls import raw_transport

READ_SIZE = 65536  # Twisted's own bufferSize: a pipelined batch or a large reply in few reads

_buffer = bytearray(READ_SIZE)
_view = memoryview(_buffer)


def fast_reads(transport) -> None:
    """Make C{transport} (a Twisted TCP connection; others are left alone) read into the shared buffer."""
    transport = raw_transport(transport)  # under TLS, the socket's reads feed the TLS layer
    if not isinstance(transport, Connection) or not hasattr(transport, "_dataReceived"):
        return  # a test transport or another Twisted: its own reads
    recv_into = transport.socket.recv_into
    received = transport._dataReceived

    def doRead():
        try:
            count = recv_into(_buffer)
        except OSError as e:
            if e.args[0] == EWOULDBLOCK:
                return None
            return main.CONNECTION_LOST
        return received(_view[:count].tobytes())

    transport.doRead = doRead
