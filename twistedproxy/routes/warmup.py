"""
The warm-up route (memcached): a new, cold route in front of a warm one
(mcrouter's WarmUpRoute).  Everything goes to the cold route; a miss there is
looked up in the warm route and, when found, filled into the cold one, so the
cold pool fills with what clients read while it takes the traffic.

A miss (of a text get or gets, single or multi-key, a meta mg, a binary get
or getk, quiet ones too) is held back from the client: for each missed key
the route sends the warm route an internal C{mg KEY v f t} (value, client
flags, remaining TTL), then adds each value found to the cold server that
missed it with C{ms KEY LEN F<flags> T<ttl> ME} (mode E: add, so a value a
client wrote meanwhile is never overwritten; no T when the item has no
expiry; an item expiring within the second is not filled).  Then:

  - a text get is answered with the values found (the cold route's hits, if
    a multi-key get had some, and the warm route's), without waiting for the
    fills;
  - gets, mg and binary gets read again from the cold server once the fills
    are answered: the CAS token (and any meta flag the client asked for) must
    be the cold server's, and a value written there meanwhile wins.

Keys the warm route misses too stay misses; a look-up that fails counts as a
miss.  Counters: C{hits} (keys found in the warm route), C{misses}, C{fills}
(stored in the cold route), C{fill_failures} (not stored: a concurrent write,
or an error).

As with mcrouter's, a key deleted from the cold route while its look-up is
under way may come back from the warm one: deletes should go to both (a
replicate route over the two, or deleting from the warm pool too).
"""

from __future__ import annotations

from functools import partial

from zope.interface import implementer

from twistedproxy.core.completion import complete
from twistedproxy.core.request import WARM_ANSWER, WARM_NONE
from twistedproxy.routes.copies import CompoundRoute, copy_of, decline
from twistedproxy.routes.interface import ICountedRoute


@implementer(ICountedRoute)
class WarmupRoute(CompoundRoute):
    """
    @ivar cold: the route that answers (being filled).
    @ivar warm: the route misses are looked up in.
    """

    def __init__(self, cold, warm):
        CompoundRoute.__init__(self, cold)
        self.cold = cold
        self.warm = warm
        self.hits = 0
        self.misses = 0
        self.fills = 0
        self.fill_failures = 0
        self._hook = partial(self._replied, None)

    def dispatch(self, request, codec, now: float, touched: list, dirty: list) -> bool:
        if not request.internal and codec.warm_lookup(request) != WARM_NONE:
            outer = request.resume
            request.resume = self._hook if outer is None else partial(self._replied, outer)
        return self.cold.dispatch(request, codec, now, touched, dirty)

    def _replied(self, outer, request, raw, error, codec, dirty) -> bool:
        if raw is not None:
            missed = codec.warm_misses(request, raw)
            if missed:
                _Lookup(self, outer, request, raw, codec, missed).start(dirty)
                return True
        return decline(outer, request, raw, error, codec, dirty)

    def counters(self) -> dict:
        return {"warmup_hits": self.hits, "warmup_misses": self.misses, "warmup_fills": self.fills,
                "warmup_fill_failures": self.fill_failures}


class _Lookup:
    """One miss of one request (or part of one): its keys' look-ups in the warm route, the fills, the answer."""

    def __init__(self, route, outer, request, raw, codec, missed):
        self.route = route
        self.outer = outer
        self.request = request
        self.raw = raw  # the cold route's reply
        self.codec = codec  # the client's
        self.meta = codec.warm_codec  # the look-ups' and fills'
        self.missed = missed
        self.waiting = len(missed)
        self.found = {}  # key -> (flags, ttl, data)
        self.filling = 0

    def start(self, dirty) -> None:
        route = self.route
        touched = []
        now = route.reactor.seconds()
        for key in self.missed:
            route.warm.dispatch(copy_of(self.meta.warm_fetch(key), self._fetched), self.meta, now, touched, dirty)
        route.flusher.add(touched)

    def _fetched(self, copy, raw, error, dirty) -> None:
        value = self.meta.warm_value(raw) if raw is not None else None
        if value is None:
            self.route.misses += 1
        else:
            self.route.hits += 1
            self.found[copy.key] = value
        self.waiting -= 1
        if not self.waiting:
            self._fill(dirty)

    def _fill(self, dirty) -> None:
        """Add the values found to the cold server that missed them; answer now or after the fills."""
        route = self.route
        request = self.request
        server = request.server  # the cold server that answered the miss
        touched = []
        now = route.reactor.seconds()
        if server is not None and server.available(now):
            for key, value in self.found.items():
                fill = self.meta.warm_fill(key, value)
                if fill is not None:
                    self.filling += 1
                    server.connection(self.meta).enqueue_internal(copy_of(fill, self._filled), now, touched)
        route.flusher.add(touched)
        if not self.found:
            self._answer(self.raw, dirty)  # the warm route missed too: the cold route's miss stands
        elif self.codec.warm_lookup(request) == WARM_ANSWER:
            self._answer(self.codec.warm_reply(request, self.raw, self.found), dirty)
        elif not self.filling:
            self._read_again(dirty)

    def _filled(self, copy, raw, error, dirty) -> None:
        if error is None and self.meta.warm_stored(raw):
            self.route.fills += 1
        else:
            self.route.fill_failures += 1
        self.filling -= 1
        if not self.filling and self.codec.warm_lookup(self.request) != WARM_ANSWER:
            self._read_again(dirty)

    def _answer(self, raw, dirty) -> None:
        request = self.request
        request.resume = self.outer
        complete(request, raw, self.codec, dirty)

    def _read_again(self, dirty) -> None:
        """Send the request again to the cold server that missed (its CAS tokens are the ones to give)."""
        request = self.request
        request.resume = self.outer
        server = request.server
        touched = []
        server.pool.send(server, request, self.codec, self.route.reactor.seconds(), touched, dirty)
        self.route.flusher.add(touched)
