"""
What the cluster routes (failover, replicate, shadow, warm-up) share: hooks
that several routes set on one request, and copies, the internal requests a
route sends besides its client's own.

A request has one C{resume} hook (L{twistedproxy.routes.interface}), but
routes nest: a warm-up route over a failover route, a replicate route whose
replicas fail over.  The route nearer the servers sees a reply first, so a
route that sets its hook keeps the one already there (its I{outer} hook, set
by a route above it) and hands the reply on to it when it lets the reply
stand (L{with_outer}, L{decline}).  A route's hook is a plain bound method
when nothing is outer (the common case: nothing is made per request), else a
C{partial} that carries the outer one.

A L{Copy} is a request the proxy makes itself: a replicate route's write to
the other replicas, a shadow route's sampled copy, a warm-up route's look-up
in the warm route and its fill of the cold one.  It is internal (never a
client's, never in the client-facing counters; see
L{twistedproxy.core.request.Request.internal}), goes through routes like any
request (so placement, failover and splitting apply) and, once its reply or
failure is in (for a copy split per server, once every part's is), calls its
C{on_done(copy, raw, error, dirty)}: C{raw} the reply (None for a split copy
or a failure), C{error} None or what failed (a failure's text or an error
reply's first line).
"""

from __future__ import annotations

from functools import partial

from twistedproxy.core.request import Request


class Copy(Request):
    """An internal request of a route, with what to call when it is answered."""

    __slots__ = ("on_done",)


def copy_of(request, on_done, frame=None) -> Copy:
    """
    An internal copy of C{request} (or, with C{frame}, of its key(s) with
    another frame), calling C{on_done} once answered.  Also how a route sends a
    request a codec made for it (a warm-up look-up or fill).
    """
    copy = Copy(request.frame if frame is None else frame, request.command, request.key, request.route,
                request.keys, data=request.data)
    copy.internal = True
    copy.resume = copy_finished
    copy.on_done = on_done
    return copy


def copy_finished(request, raw, error, codec, dirty) -> bool:
    """The resume hook of every copy (and of its parts): call C{on_done} once all of it is in."""
    if error is None and codec.reply_failed(raw):
        error = raw[:raw.find(b"\n")].strip().decode("utf-8", "replace")
    node = request
    while node.parent is not None:  # a part of a copy split per server
        parent = node.parent
        if error is not None and parent.failed is None:
            parent.failed = error
        parent.pending -= 1
        if parent.pending:
            return True
        error = parent.failed
        raw = None
        node = parent
    node.on_done(node, raw, error, dirty)
    return True


class CompoundRoute:
    """
    What a route over other routes shares: the reactor and turn flusher of
    its first route, slices sent through the first route (a request sent in
    slices is a read, or goes where the first route sends it), and no
    connections of its own: the pools it reaches are started, retired and
    stopped where they are built, since other routes may share them.
    """

    def __init__(self, first):
        self.first = first
        self.reactor = first.reactor
        self.flusher = first.flusher

    def dispatch_slice(self, request, codec, now: float, touched: list, dirty: list) -> bool:
        return self.first.dispatch_slice(request, codec, now, touched, dirty)

    def start(self) -> None:
        pass

    def retire(self) -> None:
        pass

    def stop(self) -> None:
        pass


def with_outer(method, outer, plain):
    """
    The hook to set for a route's C{method}(outer, request, raw, error,
    codec, dirty): C{plain} (C{method} bound to no outer hook, made once per
    route) when C{outer} is None, else C{method} bound to C{outer}.
    """
    return plain if outer is None else partial(method, outer)


def decline(outer, request, raw, error, codec, dirty) -> bool:
    """Let the reply or failure stand as far as this route goes: the outer route's hook, if any, decides."""
    return outer is not None and outer(request, raw, error, codec, dirty)


def split_from(part):
    """
    The request whose keys and codec data C{part} (a fragment) was split from:
    its parent, or for a fragment of a slice (which keeps no data of its own)
    the request sent in slices.  A front's fragment bound for another route
    is a request of its own, with data for its keys.
    """
    request = part.parent
    while request.data is None and request.parent is not None:
        request = request.parent
    return request
