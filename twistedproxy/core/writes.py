"""
Writing to a transport without waiting for the next reactor turn.

Twisted's C{transport.write} only buffers: the bytes go out on the next
reactor iteration, after an epoll registration for writability and before
another to undo it.  A proxy writes once per batch on each side, so that detour
costs two system calls and a loop turn per request at low pipeline depth.
L{immediate_writer} sends at once when nothing is queued and hands whatever the
kernel did not take to Twisted's normal buffered path, so ordering, producers,
errors and disconnects keep Twisted's semantics.
"""

from __future__ import annotations

from twisted.internet.tcp import Connection

from twistedproxy.net.tls import is_tls, raw_transport


def immediate_writer(transport):
    """A C{write(data)} function for C{transport} that sends at once when it can."""
    if is_tls(transport):
        # The TLS layer encrypts at once and writes its records to the socket's
        # transport: they go out at once too.
        raw = raw_transport(transport)
        if isinstance(raw, Connection) and "write" not in vars(raw):
            raw.write = immediate_writer(raw)
        return transport.write
    if not isinstance(transport, Connection) or not hasattr(transport, "_tempDataLen"):
        return transport.write  # a test transport or another Twisted: buffered path
    send = transport.socket.send
    buffered_write = transport.write

    def write(data: bytes) -> None:
        if (
            transport._tempDataLen
            or transport.offset != len(transport.dataBuffer)
            or transport.disconnecting
            or not transport.connected
        ):
            buffered_write(data)
            return
        try:
            sent = send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            # Let Twisted's own write path meet the error and close as usual.
            buffered_write(data)
            return
        if sent < len(data):
            buffered_write(data[sent:])

    return write
