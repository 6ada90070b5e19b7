"""
A seeded random stream of Redis commands for comparing a Redis Cluster proxy
with a single redis-server: strings, hashes, lists, sets, sorted sets, the
multi-key commands a proxy splits by slot (MGET, MSET, DEL, UNLINK, EXISTS,
TOUCH), the ones it cannot split (RENAME, SMOVE, SINTERSTORE, ..., EVAL with
several keys) on hash-tagged keys that share a slot and, now and then, on keys
that do not (which Redis Cluster answers with -CROSSSLOT).

Every command is deterministic (no SPOP, SRANDMEMBER, TTL, ...): given the same
stream, a single redis-server and a cluster answer alike, except

  - commands whose keys span slots: the cluster answers -CROSSSLOT, so the
    expected reply is the cluster's own (L{Command.cross_slot}) and the single
    server never runs them (the two keyspaces stay the same);
  - set replies (SMEMBERS, SINTER, ...): their order follows each server's
    hash seed, so they are compared sorted (L{normalize}).

Slots are computed with redis-py's C{key_slot} (Redis Cluster's CRC16 and
hash-tag rule), independent of the proxy's.
"""

from __future__ import annotations

import random

from redis.crc import key_slot

from tests.support.resp import ErrorReply

# Replies that are sets: their element order is the server's hash order.
SET_REPLIES = {b"SMEMBERS", b"SINTER", b"SUNION", b"SDIFF"}

# Keys that exercise the hash-tag rule's corners: "{user}" and "{user}x" share a slot;
# "{}{user}" hashes whole (6164 on Redis 7.0), "a{}b{c}" too (the first "{}" is empty).
TAG_CORNERS = [b"{user}", b"{user}x", b"{}{user}", b"a{}b{c}", b"{user}}", b"{{user}"]

SCRIPT_SET_GET = b"redis.call('SET', KEYS[1], ARGV[1]); return redis.call('GET', KEYS[1])"
SCRIPT_TWO_KEYS = b"redis.call('SET', KEYS[1], ARGV[1]); return {redis.call('GET', KEYS[2]), ARGV[1]}"


class Command:
    """One command of the stream: its arguments and whether its keys span slots."""

    __slots__ = ("args", "cross_slot")

    def __init__(self, args, cross_slot=False):
        self.args = tuple(a if isinstance(a, bytes) else str(a).encode() for a in args)
        self.cross_slot = cross_slot

    @property
    def name(self) -> bytes:
        return self.args[0].upper()

    def __repr__(self):
        return "Command(%s%s)" % (b" ".join(self.args).decode("utf-8", "replace"),
                                  ", cross_slot" if self.cross_slot else "")


def normalize(command: Command, reply):
    """C{reply} in a form that compares equal across servers (set replies sorted)."""
    if command.name in SET_REPLIES and isinstance(reply, list):
        return sorted(reply)
    return reply


def replies_equal(command: Command, got, expected) -> bool:
    return normalize(command, got) == normalize(command, expected)


class CommandStream:
    """
    C{CommandStream(seed).commands(n)}: n commands.  Keys are a few per type, in
    one plain space (spread over slots) and in C{tags} hash-tagged spaces (each
    in one slot), so that writes and reads meet often.
    """

    TYPES = ("s", "n", "h", "l", "S", "z")  # string, counter, hash, list, set, sorted set

    def __init__(self, seed: int, per_type: int = 8, tags: int = 3, cross_slot_share: float = 0.15):
        self.random = random.Random(seed)
        self.per_type = per_type
        self.spaces = [b""] + [b"{t%d}" % i for i in range(tags)]
        self.cross_slot_share = cross_slot_share
        self.serial = 0
        self.generators = [
            (12, self._string), (4, self._counter), (8, self._hash), (8, self._list), (8, self._set),
            (8, self._zset), (3, self._keyspace), (12, self._split), (10, self._unsplittable),
            (4, self._eval), (2, self._tag_corner),
        ]
        self.weights = [w for w, _ in self.generators]

    def commands(self, count: int) -> list:
        return [self.next() for _ in range(count)]

    def next(self) -> Command:
        (_, generate), = self.random.choices(self.generators, self.weights)
        return generate()

    # -- keys and values ---------------------------------------------------------------

    def key(self, kind: str, space: bytes = None) -> bytes:
        r = self.random
        if r.random() < 0.04:  # now and then a key of another type: WRONGTYPE both ways
            kind = r.choice(self.TYPES)
        if space is None:
            space = r.choice(self.spaces)
        return b"%s%s:%d" % (space, kind.encode(), r.randrange(self.per_type))

    def keys_together(self, kinds) -> tuple:
        """
        Keys for a command that cannot be split: mostly from one hash-tagged space
        (one slot), sometimes from the plain space (likely several slots).
        """
        if self.random.random() < self.cross_slot_share:
            space = b""
        else:
            space = self.random.choice(self.spaces[1:])
        return tuple(self.key(kind, space) for kind in kinds)

    def any_keys(self, count: int) -> list:
        return [self.key(self.random.choice(self.TYPES)) for _ in range(count)]

    def value(self) -> bytes:
        self.serial += 1
        return b"v%d" % (self.serial,)

    def member(self) -> bytes:
        return b"m%d" % (self.random.randrange(10),)

    def unsplittable(self, *args, keys) -> Command:
        return Command(args, cross_slot=len({key_slot(k) for k in keys}) > 1)

    # -- per type ----------------------------------------------------------------------

    def _string(self) -> Command:
        r, k = self.random, self.key("s")
        return r.choice([
            lambda: Command((b"SET", k, self.value())),
            lambda: Command((b"SET", k, self.value(), r.choice([b"NX", b"XX"]))),
            lambda: Command((b"SET", k, self.value(), b"GET")),
            lambda: Command((b"GET", k)),
            lambda: Command((b"APPEND", k, self.value())),
            lambda: Command((b"STRLEN", k)),
            lambda: Command((b"GETRANGE", k, 0, r.randrange(-2, 6))),
            lambda: Command((b"SETRANGE", k, r.randrange(4), self.value())),
            lambda: Command((b"GETSET", k, self.value())),
            lambda: Command((b"SETNX", k, self.value())),
            lambda: Command((b"GETDEL", k)),
        ])()

    def _counter(self) -> Command:
        r, k = self.random, self.key("n")
        return r.choice([
            lambda: Command((b"INCR", k)),
            lambda: Command((b"DECR", k)),
            lambda: Command((b"INCRBY", k, r.randrange(-50, 50))),
            lambda: Command((b"INCRBYFLOAT", k, b"%d.5" % r.randrange(10))),
            lambda: Command((b"GET", k)),
        ])()

    def _hash(self) -> Command:
        r, k = self.random, self.key("h")
        field = b"f%d" % r.randrange(6)
        return r.choice([
            lambda: Command((b"HSET", k, field, self.value())),
            lambda: Command((b"HSET", k, field, self.value(), b"f%d" % r.randrange(6), self.value())),
            lambda: Command((b"HSETNX", k, field, self.value())),
            lambda: Command((b"HGET", k, field)),
            lambda: Command((b"HDEL", k, field)),
            lambda: Command((b"HGETALL", k)),
            lambda: Command((b"HINCRBY", k, b"count", r.randrange(-5, 6))),
            lambda: Command((b"HLEN", k)),
            lambda: Command((b"HEXISTS", k, field)),
            lambda: Command((b"HMGET", k, field, b"f%d" % r.randrange(6), b"count")),
            lambda: Command((b"HKEYS", k)),
            lambda: Command((b"HVALS", k)),
        ])()

    def _list(self) -> Command:
        r, k = self.random, self.key("l")
        return r.choice([
            lambda: Command((b"LPUSH", k) + tuple(self.value() for _ in range(r.randrange(1, 4)))),
            lambda: Command((b"RPUSH", k) + tuple(self.value() for _ in range(r.randrange(1, 4)))),
            lambda: Command((b"LPOP", k)),
            lambda: Command((b"RPOP", k, r.randrange(1, 3))),
            lambda: Command((b"LRANGE", k, 0, -1)),
            lambda: Command((b"LLEN", k)),
            lambda: Command((b"LINDEX", k, r.randrange(-3, 3))),
            lambda: Command((b"LSET", k, r.randrange(-2, 3), self.value())),
            lambda: Command((b"LTRIM", k, 0, r.randrange(3, 8))),
            lambda: Command((b"LINSERT", k, b"BEFORE", b"v%d" % r.randrange(1, self.serial + 2), self.value())),
        ])()

    def _set(self) -> Command:
        r, k = self.random, self.key("S")
        return r.choice([
            lambda: Command((b"SADD", k) + tuple(self.member() for _ in range(r.randrange(1, 4)))),
            lambda: Command((b"SREM", k, self.member())),
            lambda: Command((b"SMEMBERS", k)),
            lambda: Command((b"SISMEMBER", k, self.member())),
            lambda: Command((b"SMISMEMBER", k, self.member(), self.member())),
            lambda: Command((b"SCARD", k)),
        ])()

    def _zset(self) -> Command:
        r, k = self.random, self.key("z")
        return r.choice([
            lambda: Command((b"ZADD", k, r.randrange(100), self.member())),
            lambda: Command((b"ZADD", k, r.randrange(100), self.member(), r.randrange(100), self.member())),
            lambda: Command((b"ZINCRBY", k, r.randrange(1, 5), self.member())),
            lambda: Command((b"ZRANGE", k, 0, -1, b"WITHSCORES")),
            lambda: Command((b"ZSCORE", k, self.member())),
            lambda: Command((b"ZREM", k, self.member())),
            lambda: Command((b"ZCARD", k)),
            lambda: Command((b"ZRANK", k, self.member())),
            lambda: Command((b"ZRANGEBYSCORE", k, b"-inf", r.randrange(100))),
            lambda: Command((b"ZCOUNT", k, 10, 60)),
        ])()

    def _keyspace(self) -> Command:
        r, k = self.random, self.key(self.random.choice(self.TYPES))
        return r.choice([
            lambda: Command((b"TYPE", k)),
            lambda: Command((b"EXPIRE", k, 100000)),
            lambda: Command((b"PERSIST", k)),
        ])()

    # -- several keys ------------------------------------------------------------------

    def _split(self) -> Command:
        """The multi-key commands a cluster proxy splits by slot (duplicate keys included)."""
        r = self.random
        count = r.randrange(1, 6)
        keys = self.any_keys(count)
        if r.random() < 0.2:
            keys.append(r.choice(keys))  # the same key twice: EXISTS counts it twice
        name = r.choice([b"MGET", b"MGET", b"MSET", b"MSET", b"DEL", b"UNLINK", b"EXISTS", b"TOUCH"])
        if name == b"MSET":
            keys = [self.key("s") for _ in range(count)]
            return Command([name] + [part for key in keys for part in (key, self.value())])
        return Command([name] + keys)

    def _unsplittable(self) -> Command:
        """Commands whose keys must share a slot: hash-tagged keys mostly, cross-slot ones now and then."""
        r = self.random
        choice = r.randrange(11)
        if choice == 0:
            a, b = self.keys_together("ss")
            return self.unsplittable(b"RENAME", a, b, keys=(a, b))
        if choice == 1:
            a, b = self.keys_together("ss")
            return self.unsplittable(b"RENAMENX", a, b, keys=(a, b))
        if choice == 2:
            a, b = self.keys_together("SS")
            return self.unsplittable(b"SMOVE", a, b, self.member(), keys=(a, b))
        if choice in (3, 4):
            d, a, b = self.keys_together("SSS")
            name = r.choice([b"SINTERSTORE", b"SUNIONSTORE", b"SDIFFSTORE"])
            return self.unsplittable(name, d, a, b, keys=(d, a, b))
        if choice == 5:
            a, b = self.keys_together("SS")
            return self.unsplittable(r.choice([b"SINTER", b"SUNION", b"SDIFF"]), a, b, keys=(a, b))
        if choice == 6:
            d, a, b = self.keys_together("zzz")
            return self.unsplittable(b"ZUNIONSTORE", d, 2, a, b, keys=(d, a, b))
        if choice == 7:
            a, b = self.keys_together("ll")
            return self.unsplittable(b"RPOPLPUSH", a, b, keys=(a, b))
        if choice == 8:
            a, b = self.keys_together("ll")
            return self.unsplittable(b"LMOVE", a, b, r.choice([b"LEFT", b"RIGHT"]), r.choice([b"LEFT", b"RIGHT"]),
                                     keys=(a, b))
        if choice == 9:
            a, b = self.keys_together("ss")
            return self.unsplittable(b"MSETNX", a, self.value(), b, self.value(), keys=(a, b))
        a, b = self.keys_together("ss")
        return self.unsplittable(b"COPY", a, b, keys=(a, b))

    def _eval(self) -> Command:
        """EVAL with keys (a script without keys has no slot: the proxy refuses it, see redis_commands)."""
        if self.random.random() < 0.5:
            return Command((b"EVAL", SCRIPT_SET_GET, 1, self.key("s"), self.value()))
        a, b = self.keys_together("ss")
        return self.unsplittable(b"EVAL", SCRIPT_TWO_KEYS, 2, a, b, self.value(), keys=(a, b))

    def _tag_corner(self) -> Command:
        r = self.random
        a, b = r.choice(TAG_CORNERS), r.choice(TAG_CORNERS)
        if r.random() < 0.5:
            return Command((b"SET", a, self.value()))
        if r.random() < 0.5:
            return Command((b"MGET", a, b))
        return self.unsplittable(b"RENAME", a, b, keys=(a, b))


def compare(proxy, reference, cluster_node, commands, batch: int = 32):
    """
    Send C{commands} through C{proxy} and to C{reference} (a single
    redis-server), pipelined C{batch} at a time (L{tests.support.resp.Connection}s);
    a cross-slot command goes to C{cluster_node} instead of the reference.
    Returns the mismatches: [(index, command, proxy's reply, expected reply)].
    """
    mismatches = []
    for start in range(0, len(commands), batch):
        chunk = commands[start:start + batch]
        got = proxy.pipeline([c.args for c in chunk])
        plain = [c for c in chunk if not c.cross_slot]
        crossed = [c for c in chunk if c.cross_slot]
        expected = dict(zip(map(id, plain), reference.pipeline([c.args for c in plain]) if plain else []))
        expected.update(zip(map(id, crossed), cluster_node.pipeline([c.args for c in crossed]) if crossed else []))
        for offset, (command, reply) in enumerate(zip(chunk, got)):
            if not replies_equal(command, reply, expected[id(command)]):
                mismatches.append((start + offset, command, reply, expected[id(command)]))
    return mismatches


def is_cross_slot(reply) -> bool:
    return isinstance(reply, ErrorReply) and reply.startswith(b"CROSSSLOT")
