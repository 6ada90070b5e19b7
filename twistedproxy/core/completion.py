"""
How a request gets its reply: from a backend (L{complete}) or from a failure
(L{fail}).  Both paths end the same way: the request is marked done and its
client is queued for one flush at the end of the current I/O batch.

Fragments of a split or broadcast request report to their parent, which gets its
merged reply (or one error reply) once the last fragment is in.
"""

from __future__ import annotations


def complete(request, raw: bytes, codec, dirty: list) -> None:
    """
    Give C{request} its backend reply C{raw}; append its client to C{dirty} when
    something for that client became ready to write.
    """
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


def fail(request, message: str, codec, dirty: list) -> None:
    """Give C{request} the codec's error reply for C{message} (never filtered)."""
    parent = request.parent
    request.failed = message
    request.reply = codec.error_reply(request if parent is None else parent, message)
    request.done = True
    if parent is None:
        _mark(request.client, dirty)
        return
    parent.pending -= 1
    if parent.pending == 0:
        _finish_parent(parent, codec, dirty)


def _finish_parent(parent, codec, dirty: list) -> None:
    for fragment in parent.fragments:
        if fragment.failed is not None:
            parent.failed = fragment.failed
            parent.reply = fragment.reply
            break
    else:
        merged = codec.merge(parent, parent.fragments)
        parent.reply = codec.filter_reply(parent, merged) if parent.filter else merged
    parent.done = True
    parent.fragments = None  # the fragments' replies are no longer needed
    _mark(parent.client, dirty)


def _mark(client, dirty: list) -> None:
    if client is not None and not client.dirty:
        client.dirty = True
        dirty.append(client)


def flush_clients(dirty: list) -> None:
    """Write what became ready for each client of this batch, one write each."""
    for client in dirty:
        client.flush()
