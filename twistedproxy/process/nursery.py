"""
The size of PyPy's nursery (its young generation) in the proxy's processes.

PyPy sizes the nursery from the CPU's cache: 1 MiB on the 2-core development
machine.  A proxy keeps every request in flight, with its frame and reply,
alive across a minor collection, so a small nursery copies them out of it over
and over and leaves them to the major collector: at 1 MiB the garbage collector
took a large part of PyPy's CPU per request, and 8 MiB cut it from 2.15 to
1.5 us per request pipelined (bench/README.md).  PyPy reads the size
(C{PYPY_GC_NURSERY}) only when it starts, so the C{cacheproxy} command runs
itself again once with it (L{reexec}), and the master gives it to the workers
it starts (L{child_environ}).  An operator's own C{PYPY_GC_NURSERY} is kept; on
CPython nothing changes.
"""

from __future__ import annotations

import os
import sys

ENV = "PYPY_GC_NURSERY"
SIZE = "8MB"
_PYPY = sys.implementation.name == "pypy"


def child_environ(env: dict) -> None:
    """Give a child process's environment C{env} the nursery size, unless it names one."""
    if _PYPY:
        env.setdefault(ENV, SIZE)


def reexec(argv: list) -> None:
    """
    On PyPy without C{PYPY_GC_NURSERY}: run C{argv} (this command again, interpreter first) in
    this process with it set, and never return; otherwise return.
    """
    if not _PYPY or ENV in os.environ:
        return
    os.environ[ENV] = SIZE
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)
