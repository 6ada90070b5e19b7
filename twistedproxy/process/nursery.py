"""
PyPy's garbage-collector settings in the proxy's processes: the size of its
nursery (the young generation) and the size of each incremental marking step.

PyPy sizes the nursery from the CPU's cache: 1 MiB on the 2-core development
machine.  A proxy keeps every request in flight, with its frame and reply,
alive across a minor collection, so a small nursery copies them out of it over
and over and leaves them to the major collector: at 1 MiB the garbage collector
took a large part of PyPy's CPU per request, and 8 MiB cut it from 2.15 to
1.5 us per request pipelined (bench/README.md).

PyPy derives the major collector's marking step from the nursery: it marks 4
nurseries' worth of objects per step, 32 MiB at 8 MiB, about the whole heap of
a serving proxy (40-50 MiB live, mostly imported code), so a major collection
marked it in two steps, the first ~25 ms of CPU during which no request moves.
With steps of 1 MiB the same marking takes about as much CPU in all, spread
over ~45 steps (one after each minor collection) of 0.5-1 ms, the last (which
PyPy cannot divide) ~1.5 ms (bench/README.md, "PyPy's major-collection steps").

PyPy reads both (C{PYPY_GC_NURSERY}, C{PYPY_GC_INCREMENT_STEP}) only when it
starts, so the C{cacheproxy} command runs itself again once with them
(L{reexec}), and the master gives them to the workers it starts
(L{child_environ}).  An operator's own values are kept; on CPython nothing
changes.
"""

from __future__ import annotations

import os
import sys

ENV = "PYPY_GC_NURSERY"
SIZE = "8MB"
STEP_ENV = "PYPY_GC_INCREMENT_STEP"
STEP = "1MB"
SETTINGS = {ENV: SIZE, STEP_ENV: STEP}
_PYPY = sys.implementation.name == "pypy"


def child_environ(env: dict) -> None:
    """Give a child process's environment C{env} the garbage-collector settings it does not name."""
    if _PYPY:
        for name, value in SETTINGS.items():
            env.setdefault(name, value)


def reexec(argv: list) -> None:
    """
    On PyPy with a garbage-collector setting missing from the environment: run
    C{argv} (this command again, interpreter first) in this process with it
    set, and never return; otherwise return.
    """
    if not _PYPY or all(name in os.environ for name in SETTINGS):
        return
    child_environ(os.environ)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)
