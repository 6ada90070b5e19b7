"""RESP frames for tests, written independently of the codec under test."""

from __future__ import annotations


def cmd(*args) -> bytes:
    """A multibulk request frame of C{args} (str or bytes)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


class ErrorReply(bytes):
    """An error reply's text (without the leading '-'), kept as a value rather than raised."""

    def __repr__(self):
        return "ErrorReply(%s)" % (bytes.__repr__(self),)


def read_reply(reader):
    """
    One RESP2 reply from C{reader} (a buffered binary file, e.g. C{sock.makefile("rb")}):
    bytes for simple and bulk strings, int, None for a nil, a list for an array,
    L{ErrorReply} for an error.
    """
    line = reader.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("connection closed mid-reply (%r)" % (line,))
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return bytes(rest)
    if kind == b"-":
        return ErrorReply(rest)
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        data = reader.read(size + 2)
        if len(data) != size + 2:
            raise ConnectionError("connection closed mid-reply")
        return data[:-2]
    if kind == b"*":
        count = int(rest)
        return None if count < 0 else [read_reply(reader) for _ in range(count)]
    raise ValueError("not a RESP2 reply: %r" % (line,))


class Connection:
    """
    A blocking RESP2 connection written apart from the proxy's codec: C{call}
    sends one command and returns its parsed reply (errors as L{ErrorReply});
    C{pipeline} sends many at once and returns their replies in order.
    """

    def __init__(self, port, host="127.0.0.1", timeout=10.0):
        import socket

        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = self.sock.makefile("rb")

    def call(self, *args):
        self.sock.sendall(cmd(*args))
        return read_reply(self.reader)

    def pipeline(self, commands):
        self.sock.sendall(b"".join(cmd(*args) for args in commands))
        return [read_reply(self.reader) for _ in commands]

    def close(self):
        self.reader.close()
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
