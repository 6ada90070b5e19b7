"""
The replicate route (memcached): writes go to every route, reads to the
first, which is authoritative (mcrouter's AllInitialRoute for writes, its
first child for reads).

Per command family (the codec decides: L{twistedproxy.protocols.interface.IClusterCodec.replication}):

  - reads (get, gets, gat, gats, mg, me; binary get, getk, gat, gatk and
    their quiet forms): the first route only.  A gets' CAS token is the first
    route's server's.
  - writes (set, add, replace, append, prepend, delete, touch, flush_all,
    verbosity, ms and md without C; binary set, add, replace, append,
    prepend, delete without a CAS, touch, flush, quiet forms too): every
    route at once.  The client gets the first route's reply as soon as it is
    in, whatever the others answer; the others' copies are internal requests
    whose replies are dropped, and a failure among them (no reply, a timeout,
    an error reply such as SERVER_ERROR) is counted (C{failures}) and logged,
    never shown to the client.  An outcome that differs (NOT_STORED on one
    replica of an add) is no failure.
  - compare-and-set and counters (cas, incr, decr, ma, ms and md with C;
    binary incr, decr and writes with a CAS): the first route only, since CAS
    tokens and counters are per server.  When it succeeds (STORED, a number,
    HD/VA, binary status 0) the others get a copy: a cas becomes a set of the
    same item (flags, exptime, data), ms/md/ma lose their C flag, binary
    writes their CAS, and incr/decr are sent as they are (so a counter stays
    equal on replicas that held the same value; a replica that missed it
    keeps missing it: incr does not create).  When it fails nothing is copied.

The client never waits for the other replicas, so a slow or dead replica
costs the client nothing; its copies wait on its connections up to the pool's
C{timeout} (without one, until it answers or its connection is lost).
"""

from __future__ import annotations

from functools import partial

from twisted.logger import Logger
from zope.interface import implementer

from twistedproxy.core.request import REPLICA_FIRST, REPLICA_WRITE
from twistedproxy.routes.copies import CompoundRoute, copy_of, decline
from twistedproxy.routes.interface import ICountedRoute

log = Logger()

# At most one log line per this many seconds about failed copies (each says how many since the last).
LOG_INTERVAL = 1.0


@implementer(ICountedRoute)
class ReplicateRoute(CompoundRoute):
    """
    @ivar routes: the replicas' routes; the first is authoritative.
    @ivar copies: copies sent to the other replicas.
    @ivar failures: copies that failed.
    """

    def __init__(self, routes, name: str = "replicate"):
        self.routes = tuple(routes)
        CompoundRoute.__init__(self, self.routes[0])
        self.others = self.routes[1:]
        self.name = name
        self.copies = 0
        self.failures = 0
        self._unlogged = 0
        self._logged_at = None
        self._first_hook = partial(self._first_replied, None)

    def dispatch(self, request, codec, now: float, touched: list, dirty: list) -> bool:
        policy = codec.replication(request)
        if policy == REPLICA_WRITE:
            self._copy(request, None, codec, now, touched, dirty)
        elif policy == REPLICA_FIRST:
            outer = request.resume
            request.resume = self._first_hook if outer is None else partial(self._first_replied, outer)
        return self.routes[0].dispatch(request, codec, now, touched, dirty)

    def _copy(self, request, frame, codec, now, touched, dirty) -> None:
        for route in self.others:
            self.copies += 1
            route.dispatch(copy_of(request, self._copied, frame), codec, now, touched, dirty)

    def _first_replied(self, outer, request, raw, error, codec, dirty) -> bool:
        """The authoritative reply to a compare-and-set or a counter: copy it on if it succeeded."""
        if raw is not None:
            frame = codec.replica_copy(request, raw)
            if frame is not None:
                touched = []
                self._copy(request, frame, codec, self.reactor.seconds(), touched, dirty)
                self.flusher.add(touched)
        return decline(outer, request, raw, error, codec, dirty)

    def _copied(self, copy, raw, error, dirty) -> None:
        if error is None:
            return
        self.failures += 1
        self._unlogged += 1
        now = self.reactor.seconds()
        if self._logged_at is None or now - self._logged_at >= LOG_INTERVAL:
            log.warn(
                "{route}: {count} writes to a replica failed (last: {command} {key}: {error})",
                route=self.name,
                count=self._unlogged,
                command=copy.command.decode("latin-1"),
                key=(copy.key or b"").decode("utf-8", "backslashreplace")[:64],
                error=error,
            )
            self._unlogged = 0
            self._logged_at = now

    def counters(self) -> dict:
        return {"replica_copies": self.copies, "replica_failures": self.failures}
