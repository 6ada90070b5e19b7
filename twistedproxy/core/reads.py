"""
How much a connection reads at a time.

Twisted's TCP transports read up to C{bufferSize} bytes (64 KiB) per read.
PyPy allocates a buffer of the full size for every read, outside the nursery:
at tens of thousands of small reads a second those buffers drive many of its
garbage collections.  Reading 16 KiB at most (nutcracker's mbuf size) cut the
proxy's CPU per request by about a tenth unpipelined (bench/README.md); a
pipelined batch still comes in one read, a large reply in a few more.
"""

from __future__ import annotations

READ_SIZE = 16384


def size_reads(transport) -> None:
    """Make C{transport} read at most L{READ_SIZE} bytes at a time (a transport without C{bufferSize}: no-op)."""
    if hasattr(transport, "bufferSize"):
        transport.bufferSize = READ_SIZE
