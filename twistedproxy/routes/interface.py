"""
The route interface: what sits between a client connection and the servers.

A client connection frames requests with its codec and hands each one to the
route it is tied to (L{IServedRoute}); a route sends the request, or its
fragments, on: to server connections of a servers layer
(L{twistedproxy.core.servers.ServerSet}), or to other routes it holds.  Routes
compose like mcrouter's route handles: a prefix route picks a pool route by key,
a failover route holds an ordered list of pool routes, a shadow route holds the
real route and a sampled one, and so on; a twemproxy pool is the hash route
(L{twistedproxy.routes.hash.HashRoute}): hash placement over one servers layer.

Every method is synchronous and on the hot path: no Deferreds, no timers per
request.  C{touched} collects backend connections that got frames this batch
(flushed once at the end of the reactor turn: L{twistedproxy.core.batching});
C{dirty} collects clients that have something to write (see
L{twistedproxy.core.completion}).

Resumable requests: before a route sends a request it may set
C{request.resume} to a callable; the completion path
(L{twistedproxy.core.completion.complete} and C{fail}) then calls
C{resume(request, raw, error, codec, dirty)} with the backend reply C{raw} (or
None and the failure text C{error}) before the client sees anything.  It
returns True when it took the request over (sent it elsewhere: the request
waits in its client's order queue, still not done) or False to let the reply or
error stand.  The route asks C{codec.classify_reply(request, raw)} whether a
reply is FINAL, a REDIRECT or a RETRY (L{twistedproxy.core.request}).  A
request that timed out on one connection may be resent: the timed-out
connection keeps a stand-in for it to swallow the late reply.

How to add a route kind:
  1. A module in this package with one class that C{@implementer(IRoute)} and
     implements L{IRoute.dispatch} (and L{IRoute.dispatch_slice} if it can
     receive requests with more than C{SLICE_KEYS} keys: the hash route's
     C{dispatch} returns True for those, and the client calls
     C{dispatch_slice} once per turn until it returns True).
  2. Hold the routes or servers layers it sends to; forward C{start},
     C{retire} and C{stop} to them, unless they are pools shared with other
     routes and started where they are built (a front's routes:
     L{twistedproxy.routes.copies.CompoundRoute}).
  3. To resend, set C{request.resume} (or C{fragment.resume}) before sending
     and, in it, send again with the inner route's C{dispatch} or a server's
     C{connection(codec).enqueue(request, now, touched)}, then hand the
     touched connections to a flusher (C{ServerSet.flusher.add(touched)}).
     Keep the common path free of the hook: only set it where a resend may
     happen.
  4. If clients connect to it directly (a listener's root), provide
     L{IServedRoute} as well.
  5. To serve transactions (Redis MULTI/WATCH: a client pinned to a backend
     connection of its own), provide L{twistedproxy.routes.sessions.ISessionRoute}:
     hold a C{Sessions}, hand it ROUTE_SESSION requests in C{dispatch} and
     closing clients in C{client_gone}, and say where a key's transaction goes
     (C{session_group}: a server for the hash route, a slot and its node for a
     cluster).
See C{tests/test_routes.py} for a failover-style route built this way, and
the cluster routes (failover, replicate, shadow, warmup) for routes that
nest (a hook keeps an outer route's) and send requests of their own
(L{twistedproxy.routes.copies}).
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IRoute(Interface):
    """Sends a request, or its fragments, on."""

    def dispatch(request, codec, now: float, touched: list, dirty: list) -> bool:
        """
        Send C{request} (framed by C{codec}) on, or fail it at once (the codec's
        error reply through L{twistedproxy.core.completion.fail}).  Return True
        only for a request that is being sent in slices: the caller then calls
        L{dispatch_slice} once per reactor turn until it returns True, sending
        nothing else of that client meanwhile.
        """

    def dispatch_slice(request, codec, now: float, touched: list, dirty: list) -> bool:
        """Send the next slice of a request L{dispatch} began to send in slices; True once none is left."""

    def start() -> None:
        """Open what should be open before the first request (preconnect)."""

    def retire() -> None:
        """Take no new requests (a reload replaced it); close backends once what is in flight is answered."""

    def stop() -> None:
        """Close every backend connection now; requests in flight get error replies."""


class ICountedRoute(IRoute):
    """A route with counters of its own (failovers, shadow copies ...), shown with its front's in the stats."""

    def counters() -> dict:
        """Counter name -> value; the names are L{twistedproxy.stats.snapshots.ROUTE_FIELDS}'."""


class IKeyPlacingRoute(IRoute):
    """
    A route that places every key on one server of its own and has nothing
    else to do for a key (a twemproxy pool: L{twistedproxy.routes.hash.HashRoute}),
    so that a front (L{twistedproxy.routes.tenants.FrontRoute}) may send it a
    multi-key request's keys already grouped by server.  A route that must see
    every key itself (a Redis Cluster pool resends per slot, a migrating pool
    holds the keys that move) does not provide it.
    """

    def server_for(key: bytes):
        """The server that holds C{key}, or None when every server is ejected."""


class IServedRoute(IRoute):
    """
    The route a listener serves: the one a client connection is tied to.  What
    a L{twistedproxy.core.client.ClientConnection} needs besides L{IRoute}.
    """

    name = Attribute("A name for logs (the pool's name for a pool route).")
    config = Attribute(
        "The settings of its clients: client_max_pending, client_connections, listen, and "
        "whatever its codec's request parser reads (a PoolConfig for a pool route)."
    )
    codec = Attribute("The ICodec its clients speak (the parser may pick a sub-codec per client).")
    reactor = Attribute("The reactor (for the time and the slicing timer).")
    stats = Attribute("The client-facing recorder: finished(request, now), client_closed(reason), counters.")
    flusher = Attribute("A TurnFlusher: the client hands it the backend connections its batch touched.")
    clients = Attribute("The set of its client connections that are open (the listener factory adds them).")

    def client_gone(client) -> None:
        """C{client} closed."""
