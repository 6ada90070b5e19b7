"""
Online migration of a Redis pool's keys (L{IKeyMigration}): SCAN lists a
server's keys, MIGRATE moves them.

A move is one C{MIGRATE host port "" db timeout [AUTH password] KEYS k1 ... kn}
sent to the source, naming the target (the host and port the proxy reaches it
on, the pool's C{redis_db}, the pool's timeout or 5 s).  Redis runs it
atomically per key on the source: DUMP, RESTORE on the target with the
remaining TTL, DEL, while the source serves nothing else.  So two processes
moving one key at once are serialized by the source: the second finds nothing
left (NOKEY), and a key is never on both sides with the source's the newer.
No REPLACE: when the target already has the key, it was written there after
the key moved (by a client, through the target placement), so it is the newer
value: the source's copy is deleted (DEL on the source) and the key counts as
missing (nothing moved: skipped).  A batch that fails (one key already on the
target makes the whole reply an error, though the others did move) is run
again key by key, where each key gets its own answer.

A batch of several keys first asks the source how many of them exist
(EXISTS), since MIGRATE answers +OK when any of them moved: the counts of
moved and missing keys stay true when another process moved some first.
Redis does not say how many bytes a MIGRATE carried: C{bytes} stays 0.
"""

from __future__ import annotations

from zope.interface import implementer

from twistedproxy.core.moves import SOURCE, MoveResult
from twistedproxy.core.request import Request
from twistedproxy.protocols.interface import IKeyMigration
from twistedproxy.protocols.redis import _array_items, _integer, codec as resp2, multibulk

DEFAULT_TIMEOUT_MS = 5000

_OK = b"+OK\r\n"
_NOKEY = b"+NOKEY\r\n"
_BUSYKEY = b"BUSYKEY"


def _bulk_value(item: bytes):
    """The bytes of a bulk string reply (None for any other reply)."""
    if item[:1] != b"$":
        return None
    nl = item.find(b"\r\n")
    return item[nl + 2 : -2]


def _error_text(raw: bytes) -> str:
    return raw[1:].rstrip(b"\r\n").decode("utf-8", "replace")


@implementer(IKeyMigration)
class RedisMigration:
    """SCAN and MIGRATE (see the module)."""

    codec = resp2

    def list_request(self, cursor, match, count: int):
        args = [b"SCAN", b"0" if cursor is None else cursor]
        if match is not None:
            args += [b"MATCH", match]
        args += [b"COUNT", b"%d" % (count,)]
        return Request(multibulk(args), b"scan")

    def list_reply(self, raw: bytes, match=None):
        items = _array_items(raw)
        if items is None or len(items) != 2:
            raise ValueError(_error_text(raw) if raw[:1] == b"-" else "unexpected SCAN reply %r" % (raw[:80],))
        cursor = _bulk_value(items[0])
        keys = _array_items(items[1])
        if cursor is None or keys is None:
            raise ValueError("unexpected SCAN reply %r" % (raw[:80],))
        return (None if cursor == b"0" else cursor), [_bulk_value(key) for key in keys]

    def move(self, keys: list, source, target, pool_config):
        """The moves of C{keys} (see L{IKeyMigration.move} and the module)."""
        total = len(keys)
        if total > 1:
            raw, error = yield SOURCE, Request(multibulk([b"EXISTS"] + list(keys)), b"exists")
            if raw is None:
                return MoveResult(failed=total, error=error)
            present = _integer(raw)
            if present is None:
                return MoveResult(failed=total, error=_error_text(raw))
        raw, error = yield SOURCE, self._migrate(keys, target, pool_config)
        if raw is None:
            return MoveResult(failed=total, error=error)
        if raw == _OK:
            return MoveResult(moved=present, missing=total - present) if total > 1 else MoveResult(moved=1)
        if raw == _NOKEY:
            return MoveResult(missing=total)
        if total == 1:
            if _BUSYKEY in raw:
                # The target's copy was written after the key moved: it wins.
                raw, error = yield SOURCE, Request(multibulk([b"DEL", keys[0]]), b"del")
                if raw is None:
                    return MoveResult(failed=1, error=error)
                if raw[:1] == b"-":
                    return MoveResult(failed=1, error=_error_text(raw))
                return MoveResult(missing=1)
            return MoveResult(failed=1, error=_error_text(raw))
        # Some keys of the batch may have moved: each on its own now.
        moved = missing = failed = 0
        last_error = None
        for key in keys:
            one = yield from self.move([key], source, target, pool_config)
            moved += one.moved
            missing += one.missing
            failed += one.failed
            last_error = one.error or last_error
        return MoveResult(moved=moved, missing=missing, failed=failed, error=last_error)

    @staticmethod
    def _migrate(keys, target, pool_config) -> Request:
        timeout = pool_config.timeout if pool_config.timeout is not None else DEFAULT_TIMEOUT_MS
        args = [b"MIGRATE", target.host.encode("ascii"), b"%d" % (target.port,), b"", b"%d" % (pool_config.redis_db,),
                b"%d" % (timeout,)]
        if pool_config.redis_auth:
            args += [b"AUTH", pool_config.redis_auth.encode("utf-8")]
        return Request(multibulk(args + [b"KEYS"] + list(keys)), b"migrate")


migration = RedisMigration()
