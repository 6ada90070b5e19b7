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

The shapes stay the same from turn to turn, also for PyPy's sake: code the JIT
compiled checks the shape of what it meets (an object's class and attributes, a
list's storage), and a shape it meets rarely is compiled after a few hundred
such turns, in a pause of milliseconds while the process serves (bench/README.md,
"Measured in the eleventh #10 session").  So backend connections and clients
wait in lists of their own, flushed from two places in L{TurnFlusher.run} (each
meets one class of object), and the lists are kept, emptied in place, rather
than replaced: a new list's storage changes with its first item.
"""

from __future__ import annotations

from twistedproxy.core.jit import compiled_apart, object_list


class TurnFlusher:
    """
    Flushes registered connections (anything with C{flush()}) at the end of the
    reactor turn: backend connections first, then clients.
    """

    def __init__(self, reactor):
        self.reactor = reactor
        self.backends = object_list()
        self.clients = object_list()
        self._spare = object_list()  # the list that takes new entries while one is being flushed
        self.scheduled = False
        self._schedule = getattr(reactor, "callAfterEvents", None) or (lambda f: reactor.callLater(0, f))

    def add(self, connections: list) -> None:
        """Flush backend C{connections} at the end of this turn (each must be added once per turn)."""
        if connections:
            self.backends.extend(connections)
            self._run_at_turn_end()

    def add_clients(self, clients: list) -> None:
        """Flush C{clients} at the end of this turn (each must be added once per turn)."""
        if clients:
            self.clients.extend(clients)
            self._run_at_turn_end()

    def _run_at_turn_end(self) -> None:
        if not self.scheduled:
            self.scheduled = True
            self._schedule(self.run)

    @compiled_apart
    def run(self) -> None:
        # A flush may add connections (a client's held requests going out, a
        # backend connection failing its requests): they go to the spare list,
        # which takes the place of the one being flushed, and wait for the next
        # run, which adding them scheduled.
        self.scheduled = False
        backends = self.backends
        if backends:
            self.backends = self._spare
            self._flush(backends)
        clients = self.clients
        if clients:
            self.clients = self._spare
            self._flush(clients)

    def _flush(self, connections: list) -> None:
        """Flush each of C{connections}; the list, emptied, is the spare then."""
        try:
            if len(connections) == 1:
                connections[0].flush()  # no loop for the common case (see the module's docstring)
            else:
                for conn in connections:
                    conn.flush()
        finally:
            del connections[:]
            self._spare = connections
