"""
Where PyPy's JIT cuts the request path into pieces.

PyPy compiles the reactor's loop as one trace with everything it calls inlined:
a poll, the handlers of its events, the end-of-turn flush.  A path taken for
the first time after warm-up (a turn that reads a client and a backend both,
two clients' requests for one backend connection) is then compiled as a
bridge that runs to the end of the reactor's iteration: it takes 5-16 ms to
trace, the whole process waits meanwhile, and the number of such paths grows
with every combination of events a turn can hold (bench/README.md, "Measured
in the eleventh #10 session").  The handlers marked L{compiled_apart} are
compiled as functions of their own, called from the traces of their callers:
a new path inside one costs a bridge of that function alone, one or two
milliseconds, and what one handler did no longer multiplies the paths of the
next.  On CPython this does nothing.

The traces also check the shape of what they meet (an object's class, a list's
storage): L{object_list} makes lists that keep one shape for their whole life.
"""

from __future__ import annotations

try:
    import pypyjit
except ImportError:  # CPython
    pypyjit = None


# The functions marked, to mark again (see mark_again).
_APART = []


def compiled_apart(function):
    """
    Have PyPy compile C{function} apart and call it, instead of inlining it
    into the trace of the code that calls it (see the module docstring).
    Returns C{function}.
    """
    if pypyjit is not None:
        _APART.append(function)
        _mark(function)
    return function


def mark_again() -> None:
    """
    Mark every function L{compiled_apart} again.  PyPy keeps the mark in the
    entry it keeps for the function's compiled code, and drops that entry when
    it throws the code away (as it does with some of what a warm-up compiled):
    the function was then inlined again into the traces made after it.  The
    warm-up calls this as each of its phases starts, every tick of its
    loopback rounds (where PyPy dropped them) and once it is over.
    """
    for function in _APART:
        _mark(function)


def _mark(function) -> None:
    pypyjit.dont_trace_here(0, False, function.__code__)


def object_list() -> list:
    """
    An empty list that stores objects, as a list that held some does.  On PyPy
    a new list's storage changes with its first item (and stays a special one
    for bytes or ints), and a list emptied with C{del l[:]} keeps its storage
    (C{[]} and C{clear()} do not): a list made here and emptied that way keeps
    one shape, so the code that checks whether it is empty compiles one path.
    """
    made = [None]
    del made[:]
    return made
