"""
Moves of keys between two servers of a pool (online migration): what a move
of some keys came to (L{MoveResult}), and the driver that runs a protocol's
move (L{twistedproxy.protocols.interface.IKeyMigration.move}, a generator of
internal requests) over the pool's server connections (L{run_move}).

A move is a conversation of one request at a time with two servers (read on
the source, write on the target, delete on the source ...): the protocol's
generator says what to send where and decides on each reply; the driver only
carries requests and replies.  Each request is an internal one
(L{twistedproxy.core.request.Request.internal}) queued on a pooled connection
of its server like any other: pipelined with clients' requests, timed by the
connection's one timer, its reply or failure handed to the driver by the
request's C{resume} hook.  So a move costs no Deferred and no timer of its own.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

from twisted.logger import Logger

from twistedproxy.core.completion import REFUSED

log = Logger()

SOURCE = "source"
TARGET = "target"


class MoveResult(NamedTuple):
    """
    What a move of some keys did: C{moved} keys now on the target, C{missing}
    ones found on neither side or already on the target (nothing to move),
    C{failed} ones left where they were (C{error} says why), C{bytes} of
    values moved.
    """

    moved: int = 0
    missing: int = 0
    failed: int = 0
    bytes: int = 0
    error: Optional[str] = None


def run_move(steps, source, target, codec, reactor, flusher, on_done, dirty=None) -> None:
    """
    Run the move generator C{steps} (L{IKeyMigration.move}) between the
    L{twistedproxy.core.servers.Server}s C{source} and C{target}: each
    C{(side, request)} it yields is sent on a connection of C{codec} of that
    server, and its reply sent back into it as C{(raw, None)}; a request that
    cannot be sent (the server is backing off or ejected) or fails (connection
    lost, timeout) as C{(None, error)} with nutcracker's text of the failure.
    When the generator returns, C{on_done(result, dirty)} gets its
    L{MoveResult} and the list of clients that have replies to write (see
    L{twistedproxy.core.completion}).  Touched connections are handed to
    C{flusher} (a L{twistedproxy.core.batching.TurnFlusher}).

    C{on_done} may run before C{run_move} returns (a server that cannot be
    reached fails at once): with C{dirty}, the caller's list, if given; else
    the clients are handed to C{flusher} too.
    """
    _Move(steps, source, target, codec, reactor, flusher, on_done).step(None, dirty)


class _Move:
    """One running move generator and where its requests go."""

    __slots__ = ("steps", "source", "target", "codec", "reactor", "flusher", "on_done", "started")

    def __init__(self, steps, source, target, codec, reactor, flusher, on_done):
        self.steps = steps
        self.source = source
        self.target = target
        self.codec = codec
        self.reactor = reactor
        self.flusher = flusher
        self.on_done = on_done
        self.started = False

    def step(self, answer, dirty) -> None:
        """Send C{answer} (None to start) into the generator and send what it asks for next."""
        own = dirty is None
        if own:
            dirty = []
        try:
            while True:
                try:
                    if self.started:
                        side, request = self.steps.send(answer)
                    else:
                        self.started = True
                        side, request = next(self.steps)
                except StopIteration as stop:
                    self.on_done(stop.value if stop.value is not None else MoveResult(), dirty)
                    return
                except Exception as e:  # a bug or a reply no protocol rule expected: the keys stay where they are
                    log.failure("a key move failed")
                    self.on_done(MoveResult(failed=1, error="move failed: %s" % (e,)), dirty)
                    return
                server = self.source if side == SOURCE else self.target
                now = self.reactor.seconds()
                if server is None or not server.available(now):
                    answer = (None, (server.last_error if server is not None else None) or REFUSED)
                    continue
                request.resume = self._replied
                touched = []
                server.connection(self.codec).enqueue_internal(request, now, touched)
                self.flusher.add(touched)
                return
        finally:
            if own:
                self.flusher.add_clients(dirty)

    def _replied(self, request, raw, error, codec, dirty) -> bool:
        self.step((raw, error), dirty)
        return True
