"""
Writes batched per reactor turn.

One reactor turn (one epoll wait) often delivers requests from many clients
and replies from several backends; nutcracker answers them with one write per
backend, not one per client, and we also want one write per client, not one per
backend that answered it.  A L{TurnFlusher} collects the connections (backend
or client) that have bytes to write during the turn and flushes each once when
the turn's events are all handled: a
C{callLater(0)} runs right after the current poll's callbacks, before the
reactor waits again, so this adds no waiting, and it costs one timer per turn,
not one per request.  On the proxy's own reactor
(L{twistedproxy.reactor.EPollReactor}) its C{callAfterEvents} does the same
without making a timer at all.

A turn usually flushes one connection at low load; L{TurnFlusher.run} calls it
without a loop then: on PyPy each entry into a loop that the JIT compiled apart
allocates a frame on the heap, and at one request per turn those frames were a
large part of what the proxy allocated (bench/README.md, "Allocation per request").
"""

from __future__ import annotations


class TurnFlusher:
    """Flushes registered connections (anything with C{flush()}) at the end of the reactor turn."""

    def __init__(self, reactor):
        self.reactor = reactor
        self.pending = []
        self.scheduled = False
        self._schedule = getattr(reactor, "callAfterEvents", None) or (lambda f: reactor.callLater(0, f))

    def add(self, connections: list) -> None:
        """Flush C{connections} at the end of this turn (each must be added once per turn)."""
        if not connections:
            return
        self.pending.extend(connections)
        if not self.scheduled:
            self.scheduled = True
            self._schedule(self.run)

    def run(self) -> None:
        self.scheduled = False
        pending = self.pending
        self.pending = []
        if len(pending) == 1:
            pending[0].flush()  # no loop for the common case (see the module's docstring)
            return
        for conn in pending:
            conn.flush()
