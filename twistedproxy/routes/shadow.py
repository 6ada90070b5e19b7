"""
The shadow route: C{route} answers every request; a sample of them is copied
to C{copy_to} (a new pool being tried, a test cluster), whose replies are
dropped (mcrouter's ShadowRoute).

The copies are internal requests (never a client's, never in its counters)
sent after the real request, in the same reactor turn, on C{copy_to}'s own
connections: they can neither fail nor hold up the real request.  At most
C{queue} copies wait for their reply at once; a copy beyond that is dropped
and counted (C{dropped}), so a shadow pool that is slow or frozen costs a
bounded amount of memory and nothing else.  A copy that times out (the shadow
pool's C{timeout}) or whose connection is lost leaves the queue as one that is
answered does.

C{sample} is the fraction of requests copied, spread evenly (every second
request at 0.5), not drawn at random, so tests and capacity plans can count on
it.  Requests with more keys than the hash route sends at once
(L{twistedproxy.routes.hash.SLICE_KEYS}) are not copied (counted as dropped).
"""

from __future__ import annotations

from zope.interface import implementer

from twistedproxy.core.request import ROUTE_KEYS
from twistedproxy.routes.copies import CompoundRoute, copy_of
from twistedproxy.routes.hash import SLICE_KEYS
from twistedproxy.routes.interface import ICountedRoute


@implementer(ICountedRoute)
class ShadowRoute(CompoundRoute):
    """
    @ivar waiting: copies sent and not answered yet (at most C{queue}).
    @ivar sent: copies sent.
    @ivar dropped: copies not sent because C{queue} were waiting (or too many keys).
    @ivar failed: copies that failed or got an error reply.
    """

    def __init__(self, route, copy_to, sample: float = 1.0, queue: int = 1024):
        CompoundRoute.__init__(self, route)
        self.route = route
        self.copy_to = copy_to
        self.sample = sample
        self.queue = queue
        self.waiting = 0
        self.sent = 0
        self.dropped = 0
        self.failed = 0
        self._credit = 0.0  # sampled requests accrue a fraction each; a whole one is copied

    def dispatch(self, request, codec, now: float, touched: list, dirty: list) -> bool:
        sliced = self.route.dispatch(request, codec, now, touched, dirty)
        if request.internal:
            return sliced  # another route's own request (a warm-up fill ...): not traffic
        credit = self._credit + self.sample
        if credit >= 1.0:
            credit -= 1.0
            if self.waiting >= self.queue or (request.route == ROUTE_KEYS and len(request.keys) > SLICE_KEYS):
                self.dropped += 1
            else:
                self.waiting += 1
                self.sent += 1
                self.copy_to.dispatch(copy_of(request, self._answered), codec, now, touched, dirty)
        self._credit = credit
        return sliced

    def _answered(self, copy, raw, error, dirty) -> None:
        self.waiting -= 1
        if error is not None:
            self.failed += 1

    def counters(self) -> dict:
        return {"shadow_sent": self.sent, "shadow_dropped": self.dropped, "shadow_failed": self.failed,
                "shadow_queue": self.waiting}
