"""
The failover route: an ordered list of routes; a request goes to the first,
and to the next one when it cannot answer (mcrouter's FailoverRoute).

"Cannot answer" means the request failed before any reply: the server is
down (connection refused or lost, every server of the pool ejected, backing
off after a failure) or the request timed out; or the codec classifies the
reply as not final (Redis TRYAGAIN, L{twistedproxy.core.request.REPLY_RETRY}).
An error reply from a server that answered (SERVER_ERROR, -ERR) is final: it
goes to the client.  The request is resent before its client sees anything
(a resumable request: see L{twistedproxy.routes.interface}); only when the
last route fails too does the client get the error reply, the last route's.

A multi-key request is split per server by the first route; a part that fails
goes on alone: its keys become a request of their own for the next route
(split again by that route's placement) and its reply joins the others' as
before.  Broadcasts (memcached C{flush_all}) go to the first route only.

A write that timed out may have been applied by the first route anyway: the
next route gets it too (what a failover pool of a cache expects; a Redis user
of failover should know that a timed-out INCR may count on two pools).
"""

from __future__ import annotations

from functools import partial

from zope.interface import implementer

from twistedproxy.core.request import REPLY_FINAL, ROUTE_ALL, ROUTE_KEY, ROUTE_KEYS, keys_of
from twistedproxy.routes.copies import CompoundRoute, decline, split_from
from twistedproxy.routes.interface import ICountedRoute


@implementer(ICountedRoute)
class FailoverRoute(CompoundRoute):
    """
    @ivar routes: the routes, in order of preference.
    @ivar failovers: requests (or parts of one) sent on to a next route.
    """

    def __init__(self, routes):
        self.routes = tuple(routes)
        CompoundRoute.__init__(self, self.routes[0])
        self.failovers = 0
        # The hook of a request now at route i, with no outer hook: made once.
        self._hooks = [partial(self._resume, i, None) for i in range(len(self.routes))]

    def dispatch(self, request, codec, now: float, touched: list, dirty: list) -> bool:
        if request.route != ROUTE_ALL:
            outer = request.resume
            request.resume = self._hooks[0] if outer is None else partial(self._resume, 0, outer)
        return self.routes[0].dispatch(request, codec, now, touched, dirty)

    def _resume(self, index, outer, request, raw, error, codec, dirty) -> bool:
        following = index + 1
        if following == len(self.routes) or (raw is not None and codec.classify_reply(request, raw) == REPLY_FINAL):
            return decline(outer, request, raw, error, codec, dirty)
        if request.parent is not None and request.route == ROUTE_KEY and request.key_indices is None:
            return decline(outer, request, raw, error, codec, dirty)  # a broadcast's part (an outer route's)
        self.failovers += 1
        request.resume = self._hooks[following] if outer is None else partial(self._resume, following, outer)
        if request.parent is not None and request.route == ROUTE_KEY:
            # A part of a split request: its keys travel on as a request of
            # their own (the next route places them anew); its reply joins the
            # other parts' as before.
            keys = keys_of(request)
            if len(keys) == 1:
                request.key = keys[0]
            else:
                request.route = ROUTE_KEYS
                request.data = codec.part_data(split_from(request), keys)  # what it is split with (MSET's values)
                request.keys = keys
        touched = []
        self.routes[following].dispatch(request, codec, self.reactor.seconds(), touched, dirty)
        self.flusher.add(touched)
        return True

    def counters(self) -> dict:
        return {"failovers": self.failovers}
