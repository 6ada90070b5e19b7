"""
Online migration of a memcached pool's keys (L{IKeyMigration}): C{lru_crawler
metadump all} lists a server's keys, meta commands move them, on the text
protocol's connections (the warm-up route's requests: L{memcache_text.meta_get}
and L{memcache_text.meta_add}).

memcached has no atomic move; a key moves in up to four steps:

  1. C{mg KEY v f t c} on the source: a miss means nothing to move;
  2. C{ms KEY LEN F<flags> T<ttl> ME c} on the target: mode E (add) never
     overwrites a value written there since (the newer one: NS, the source's
     copy is only deleted); an item expiring within the second is not copied;
  3. C{md KEY C<cas>} on the source: the copy there goes, unless it changed
     since step 1 (EX: our copy on the target is older, so it is taken back
     and the key counts as failed, still on the source);
  4. when step 3 finds the source's item gone (NF: another process moved it
     meanwhile, and a client may have deleted it on the target since), our
     copy is taken back: C{md KEY C<our cas>} on the target, which deletes only
     what we added.  The window in which a deleted key can come back is one
     round trip between steps 2 and 4.

Several keys are moved one after the other, one request in flight at a time.
"""

from __future__ import annotations

import fnmatch
from urllib.parse import unquote_to_bytes

from zope.interface import implementer

from twistedproxy.core.moves import SOURCE, TARGET, MoveResult
from twistedproxy.core.request import Request
from twistedproxy.protocols.interface import IKeyMigration
from twistedproxy.protocols.memcache_text import (
    METADUMP,
    METADUMP_COMMAND,
    codec as text,
    meta_add,
    meta_cas,
    meta_delete,
    meta_get,
    meta_item,
)

_END = b"END\r\n"


def _error_text(raw: bytes) -> str:
    return raw.rstrip(b"\r\n").decode("utf-8", "replace")


@implementer(IKeyMigration)
class MemcacheMigration:
    """metadump and meta commands (see the module)."""

    codec = text

    def list_request(self, cursor, match, count: int):
        return Request(METADUMP, METADUMP_COMMAND)

    def list_reply(self, raw: bytes, match=None):
        if not raw.endswith(_END) or not (raw.startswith(b"key=") or raw == _END):
            raise ValueError("metadump refused: %s" % (_error_text(raw)[:200],))
        keys = []
        pattern = match.decode("latin-1") if match is not None else None
        for line in raw[: -len(_END)].split(b"\n"):
            if not line.startswith(b"key="):
                continue
            end = line.find(b" ")
            key = unquote_to_bytes(line[4:end] if end > 0 else line[4:].rstrip(b"\r"))
            if pattern is None or fnmatch.fnmatchcase(key.decode("latin-1"), pattern):
                keys.append(key)
        return None, keys

    def move(self, keys: list, source, target, pool_config):
        """The moves of C{keys}, one after the other (see L{IKeyMigration.move} and the module)."""
        moved = missing = failed = size = 0
        error = None
        for key in keys:
            outcome, length, why = yield from self._move_one(key)
            if outcome == "moved":
                moved += 1
                size += length
            elif outcome == "missing":
                missing += 1
            else:
                failed += 1
                error = why
        return MoveResult(moved=moved, missing=missing, failed=failed, bytes=size, error=error)

    def _move_one(self, key):
        """Generator: moves C{key}; returns C{(outcome, bytes, error)}, outcome moved, missing or failed."""
        raw, error = yield SOURCE, meta_get(key, cas=True)
        if raw is None:
            return "failed", 0, error
        item = meta_item(raw)
        if item is None:
            if raw.startswith(b"EN"):
                return "missing", 0, None
            return "failed", 0, _error_text(raw)
        flags, ttl, data, cas = item
        add = meta_add(key, item, cas=True)
        ours = None
        if add is not None:  # else it expires within the second: only the source's copy goes
            raw, error = yield TARGET, add
            if raw is None:
                return "failed", 0, error
            if raw.startswith(b"HD"):
                ours = meta_cas(raw)
            elif not raw.startswith(b"NS"):  # NS: the target has a newer value; the source's copy goes
                return "failed", 0, _error_text(raw)
        raw, error = yield SOURCE, meta_delete(key, cas)
        if raw is not None and raw.startswith(b"HD"):
            return ("moved", len(data), None) if ours is not None else ("missing", 0, None)
        if raw is not None and raw.startswith(b"NF") and ours is None:
            return "missing", 0, None  # gone from the source and not copied by us: nothing to undo
        # Our copy must not stay: the source's item changed (EX), vanished while
        # we copied it (NF: moved by another process, maybe deleted since), or
        # the delete failed (the source keeps the key; the target must not hold an older one).
        outcome = "missing" if raw is not None and raw.startswith(b"NF") else "failed"
        why = error if raw is None else (None if outcome == "missing" else "source item changed during the move"
                                         if raw.startswith(b"EX") else _error_text(raw))
        if ours is not None:
            undo, undo_error = yield TARGET, meta_delete(key, ours)
            if undo is None or not (undo.startswith(b"HD") or undo.startswith(b"NF") or undo.startswith(b"EX")):
                return "failed", 0, undo_error or _error_text(undo)
        return outcome, 0, why


migration = MemcacheMigration()
