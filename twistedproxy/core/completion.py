"""
How a request gets its reply: from a backend (L{complete}) or from a failure
(L{fail}).  Both paths end the same way: the request is marked done and its
client is queued for one flush at the end of the current I/O batch.

Fragments of a split or broadcast request report to their parent, which gets its
merged reply (or one error reply) once the last fragment is in.  A request with
very many keys is sent in slices (L{twistedproxy.routes.hash}): each slice is a
multi-key request of its own whose fragments report to it, and the slices report
to the client's request, which joins their replies (C{codec.join}) once the
last slice is in and the dispatcher has let go of it (L{release}).

A route may take a request over before it ends (L{Request.resume}): both
paths first offer the reply or the failure to the request's C{resume} hook,
which may send it elsewhere instead (a redirect, a retry, a failover); the
request then stays where it is in its client's order queue, not done, and the
client sees only the reply that finally ends it.

A failure's reply says what nutcracker 0.5.0 says for the same failure (its
C{strerror(errno)}, or "unknown" where it has no errno), so clients and scripts
that match those texts keep working; which server failed goes to the log and
the slow log (L{Request.failed}), not to the reply.
"""

from __future__ import annotations

import os

from twisted.internet import error as _error

from twistedproxy.core.request import ROUTE_KEYS
from twistedproxy.net.tls import failure_text as tls_failure_text

# nutcracker's texts, by failure.
REFUSED = "Connection refused"  # also when no server is left in the placement (nutcracker's ECONNREFUSED)
TIMED_OUT = "Connection timed out"
RESET = "Connection reset by peer"
CLOSED = "unknown"  # the backend closed the connection: nutcracker has no errno to name
BAD_REPLY = "Invalid argument"  # the backend sent bytes that are no reply (nutcracker's EINVAL)


def failure_text(reason) -> str:
    """nutcracker's text for a backend connection that failed or was lost with C{reason} (a Failure)."""
    value = reason.value
    if isinstance(value, _error.TimeoutError):  # the connect timeout
        return TIMED_OUT
    if isinstance(value, _error.ConnectionRefusedError):
        return REFUSED
    if isinstance(value, _error.ConnectError):
        errno = value.osError
        return os.strerror(errno) if isinstance(errno, int) else CLOSED
    if isinstance(value, _error.ConnectionDone):
        return CLOSED
    if isinstance(value, _error.ConnectionLost):
        return RESET  # Twisted drops the errno of a failed read; a reset is what it nearly always is
    return tls_failure_text(value) or CLOSED  # a failed TLS handshake or check says which


def complete(request, raw: bytes, codec, dirty: list) -> None:
    """
    Give C{request} its backend reply C{raw}; append its client to C{dirty} when
    something for that client became ready to write.
    """
    resume = request.resume
    if resume is not None and resume(request, raw, None, codec, dirty):
        return  # a route sent it on: the client sees nothing yet
    if request.prefix is not None:  # a route stripped a key prefix: replies that carry keys get it back
        raw = codec.restore_keys(request, raw, request.prefix)
    parent = request.parent
    if parent is None:
        request.reply = codec.filter_reply(request, raw) if request.filter else raw
        request.done = True
        _mark(request.client, dirty)
        return
    request.reply = raw
    request.done = True
    parent.pending -= 1
    if parent.pending == 0:
        _finish_parent(parent, codec, dirty)


def fail(request, error: str, where: str, codec, dirty: list) -> None:
    """
    Give C{request} the codec's error reply for C{error} (one of nutcracker's
    texts above; never filtered); C{where} (the server or pool) is kept with it
    for the slow log.
    """
    resume = request.resume
    if resume is not None and resume(request, None, error, codec, dirty):
        return  # a route sent it on: the client sees nothing yet
    parent = request.parent
    request.failed = "%s (%s)" % (error, where)
    request.reply = codec.error_reply(request if parent is None else parent, error)
    request.done = True
    if parent is None:
        _mark(request.client, dirty)
        return
    parent.pending -= 1
    if parent.pending == 0:
        _finish_parent(parent, codec, dirty)


def refuse(request, reply: bytes, why: str, dirty: list) -> None:
    """
    End C{request} with a C{reply} a route made itself, without a backend (a
    tenant's rate limit, a key no route takes); C{why} is kept as its failure,
    for the error counters and the slow log.
    """
    request.failed = why
    request.reply = reply
    request.done = True
    _mark(request.client, dirty)


def release(request, codec, dirty: list) -> None:
    """The dispatcher of a sliced request has sent its last slice (it held one count of C{pending})."""
    request.pending -= 1
    if request.pending == 0:
        _finish_parent(request, codec, dirty)


def _finish_parent(parent, codec, dirty: list) -> None:
    fragments = parent.fragments
    for fragment in fragments:
        if fragment.failed is not None:
            parent.failed = fragment.failed
            parent.reply = fragment.reply
            break
    else:
        first = fragments[0]
        # Slices (each reply already merged) have no key indices; a fragment a
        # route resent as a multi-key request of its own keeps its own.
        if first.route == ROUTE_KEYS and first.key_indices is None:
            merged = codec.join(parent, [part.reply for part in fragments])
        else:
            merged = codec.merge(parent, fragments)
        if parent.prefix is not None:  # stripped as a whole: the merged reply gets it back
            merged = codec.restore_keys(parent, merged, parent.prefix)
        parent.reply = codec.filter_reply(parent, merged) if parent.filter else merged
    parent.done = True
    parent.fragments = None  # the fragments' replies are no longer needed
    whole = parent.parent
    if whole is None:
        _mark(parent.client, dirty)
        return
    # A slice of a sliced request: report to it as a fragment reports to a slice.
    if parent.replied_at > whole.replied_at:
        whole.replied_at = parent.replied_at
    whole.pending -= 1
    if whole.pending == 0:
        _finish_parent(whole, codec, dirty)


def _mark(client, dirty: list) -> None:
    if client is not None and not client.dirty:
        client.dirty = True
        dirty.append(client)


def flush_clients(dirty: list) -> None:
    """Write what became ready for each client of this batch, one write each."""
    for client in dirty:
        client.flush()
