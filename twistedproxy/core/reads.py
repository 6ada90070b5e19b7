"""
Reading from a transport into one reused buffer instead of a fresh one per read.

Twisted's C{Connection.doRead} calls C{socket.recv(bufferSize)}: 64 KiB asked
for every read, however few bytes arrive.  On PyPy that buffer is a new
non-moving GC object each time, and the GC counts all 64 KiB of it as
allocation: a proxy reading a 40-byte request or reply per read fills the
1 MiB nursery every 16 reads, so at 5000 requests/s it ran about 700 minor
collections a second, and the same accounting brought a major collection
every few seconds whose incremental steps, one per minor collection, ran
back to back for tens of milliseconds (see bench/README.md, "Where the pauses
came from").  C{recv_into} a buffer allocated once and a copy of just the
bytes read allocates only what arrived.

CPython frees such a buffer at once (no GC involved), so L{fast_reads} leaves
its transports alone by default.
"""

from __future__ import annotations

import platform
from errno import EWOULDBLOCK

from twisted.internet import main
from twisted.internet.tcp import Connection

# The interpreter whose GC counts recv()'s whole buffer (see the module docstring).
NEEDED = platform.python_implementation() == "PyPy"

# One buffer per process: a read copies its bytes out before any protocol code runs,
# and the reactor runs one read at a time.
_BUFFER = bytearray(65536)


def fast_reads(transport, enabled: bool = NEEDED) -> bool:
    """
    Make C{transport} read into the shared buffer (when C{enabled}); return
    whether it does.  Anything but a plain TCP transport (a test transport,
    TLS) is left alone, as is a transport asking for more than the buffer holds.
    """
    if not enabled or getattr(type(transport), "doRead", None) is not Connection.doRead:
        return False
    if getattr(transport, "bufferSize", 0) > len(_BUFFER) or not hasattr(transport, "_dataReceived"):
        return False
    recv_into = transport.socket.recv_into
    data_received = transport._dataReceived
    buffer = _BUFFER
    size = transport.bufferSize

    def doRead():
        # Twisted's doRead, but without a 64 KiB allocation per call.
        try:
            n = recv_into(buffer, size)
        except OSError as se:
            if se.args[0] == EWOULDBLOCK:
                return None
            return main.CONNECTION_LOST
        return data_received(bytes(buffer[:n]))

    transport.doRead = doRead
    return True
