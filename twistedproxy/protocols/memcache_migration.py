"""
Online migration of a memcached pool's keys (L{IKeyMigration}): C{lru_crawler
metadump all} lists a server's keys, meta commands move them, on the text
protocol's connections (the warm-up route's requests: L{memcache_text.meta_get}
and L{memcache_text.meta_add}).

memcached has no atomic move; a key moves in three steps, and several
processes may move one key at once (workers on access, the mover):

  1. C{mg KEY v f t c} on the source: a miss means nothing to move, and so
     does an item marked stale (step 3b: another process's copy is on the
     target and that process deletes it);
  2. C{ms KEY LEN F<flags> T<ttl> ME c} on the target: mode E (add) never
     overwrites a value there (a client's newer one, or another process's
     copy); an item expiring within the second is not copied, only deleted;
  3a. stored (we are the adder): C{md KEY C<cas>} on the source deletes the
     original unless it changed since step 1.  Found gone (NF): another
     adder finished first, so the target was emptied (a client deleted the
     key) between its add and ours: ours would bring a deleted key back, and
     is taken back with C{md KEY C<our cas>} on the target.  Found changed
     (EX): a process that found our copy on the target marked it stale
     (3b): our copy stands and the stale original goes;
  3b. not stored (NS): the target has the key already; the original is
     marked stale (C{md KEY C<cas> I}), never deleted: deleting it would
     make the adder take its copy back (NF), losing the key.  The adder
     deletes it (3a, EX).

The one window left: a process that read the original (step 1) before a
client deleted the adder's fresh copy on the target, and adds and deletes
before the adder's own delete, brings the deleted key back (three processes
within one backend round trip of each other).

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
        if _stale(raw):
            return "missing", 0, None  # its adder's copy is on the target, and the adder deletes it
        data, cas = item[2], item[3]
        add = meta_add(key, item, cas=True)
        if add is None:  # it expires within the second: only the original goes
            raw, error = yield SOURCE, meta_delete(key, cas)
            return ("missing", 0, None) if raw is not None else ("failed", 0, error)
        raw, error = yield TARGET, add
        if raw is None:
            return "failed", 0, error
        if raw.startswith(b"NS"):
            raw, error = yield SOURCE, meta_delete(key, cas, invalidate=True)
            return "missing", 0, None  # however that went, the target's value stands
        if not raw.startswith(b"HD"):
            return "failed", 0, _error_text(raw)
        ours = meta_cas(raw)
        raw, error = yield SOURCE, meta_delete(key, cas)
        if raw is not None and raw.startswith(b"HD"):
            return "moved", len(data), None
        if raw is not None and raw.startswith(b"EX"):  # marked stale by a process that found our copy
            raw, error = yield SOURCE, meta_delete(key)
            return "moved", len(data), None
        # Gone (another adder finished first: ours would bring a deleted key
        # back), or the delete failed (the original stays: so must not our copy).
        undo, undo_error = yield TARGET, meta_delete(key, ours)
        if raw is not None and raw.startswith(b"NF"):
            outcome, why = "missing", None
        else:
            outcome, why = "failed", error if raw is None else _error_text(raw)
        if undo is None or not undo.startswith((b"HD", b"NF", b"EX")):
            return "failed", 0, why or undo_error or _error_text(undo)
        return outcome, 0, why


def _stale(raw: bytes) -> bool:
    """Whether a meta hit is of an item marked stale (its C{X} flag)."""
    return b"X" in raw[: raw.find(b"\r\n")].split()[2:]


migration = MemcacheMigration()
