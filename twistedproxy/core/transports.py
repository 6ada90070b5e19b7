"""
How the proxy sets up the transport of each connection it makes or accepts.

One function per side, called by the proxy's connections and by the
warm-up's fake peers alike (L{twistedproxy.core.warmup}): on PyPy the JIT's
guards check a transport's instance attributes and the order they were set in
(its map), so every transport the reactor serves must get them the same way,
whichever code accepted or connected it.
"""

from __future__ import annotations

from twistedproxy.core.reads import fast_reads
from twistedproxy.core.writes import immediate_writer


def set_up_accepted(transport, producer):
    """
    Set up an accepted connection's C{transport} (no Nagle, C{producer}
    registered as a streaming producer, reads into the shared buffer) and
    return its C{write(data)} function (L{immediate_writer}).
    """
    if hasattr(transport, "setTcpNoDelay"):
        try:
            transport.setTcpNoDelay(True)
        except OSError:
            pass  # a UNIX socket
    transport.registerProducer(producer, True)
    write = immediate_writer(transport)
    fast_reads(transport)
    return write


def set_up_connected(transport):
    """
    Set up the C{transport} of a connection the proxy made (reads into the
    shared buffer) and return its C{write(data)} function
    (L{immediate_writer}); its socket options are the caller's, once it keeps
    the connection.
    """
    write = immediate_writer(transport)
    fast_reads(transport)
    return write
