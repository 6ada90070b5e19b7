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
not one per request.
"""

from __future__ import annotations


class TurnFlusher:
    """Flushes registered connections (anything with C{flush()}) at the end of the reactor turn."""

    def __init__(self, reactor):
        self.reactor = reactor
        self.pending = []
        self.call = None

    def add(self, connections: list) -> None:
        """Flush C{connections} at the end of this turn (each must be added once per turn)."""
        if not connections:
            return
        self.pending.extend(connections)
        if self.call is None:
            self.call = self.reactor.callLater(0, self.run)

    def run(self) -> None:
        self.call = None
        pending = self.pending
        self.pending = []
        for conn in pending:
            conn.flush()
