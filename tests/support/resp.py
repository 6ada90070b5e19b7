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
