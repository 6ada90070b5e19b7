"""
The Redis command table: how the proxy routes, checks and answers each command.

Coverage: every key-bearing command twemproxy 0.5.0 accepts (its redis_arg0,
redis_arg1, redis_arg2, redis_arg3, redis_argn, redis_argx, redis_argkvx and
redis_argeval tables), plus newer single-key commands (streams, EXPIRETIME,
LCS, the _RO variants, ...).  Deliberate differences from twemproxy:

  - EXISTS takes several keys and is split and summed like DEL (twemproxy routes
    a multi-key EXISTS by its first key, which counts the wrong server's keys).
  - ZDIFF, ZINTER, ZUNION, SINTERCARD, ZINTERCARD, LMPOP and ZMPOP route by their
    first key, which follows the C{numkeys} argument (twemproxy hashes C{numkeys}
    itself).  BITOP, OBJECT, XGROUP and XINFO route by the key after their
    subcommand.
  - MOVE is forwarded (twemproxy marks it "no forward" and cannot answer it).
  - COMMAND and LOLWUT go to any server with any arguments.
  - Arity is checked as in Redis 7.2's own table (counting the command name;
    at least C{-arity} when negative), so wrong calls get Redis's own
    "wrong number of arguments" error from the proxy and the connection stays
    open (twemproxy closes it).  Where Redis versions differ the most lenient
    arity is used; the backend still validates everything else.

Commands that touch several keys yet are routed by one of them (SMOVE,
RPOPLPUSH, LMOVE, COPY, SINTERSTORE, ZUNIONSTORE, PFMERGE, BITOP, EVAL, ...)
only work when all their keys live on one server: use hash tags.

Not supported (answered with an error, the connection stays open): anything
about the whole keyspace or the server (KEYS, SCAN, RANDOMKEY, DBSIZE, FLUSHDB,
INFO, CONFIG, ...), pub/sub, blocking commands, SELECT (the pool's
C{redis_db} is selected on every backend connection), RENAME and RENAMENX (the
new name may hash elsewhere; twemproxy refuses them too), MSETNX (not atomic
once split) -- a Redis Cluster pool forwards these three (L{CLUSTER_COMMANDS}) --, SCRIPT and FUNCTION management, and every name not in this table.

Transactions (MULTI, EXEC, DISCARD, WATCH, UNWATCH) pin the client to a
backend connection of its own (L{twistedproxy.protocols.redis_transactions});
in a pool with C{transaction_connections: 0} (and in a front) they are refused:
after a refused MULTI every command up to EXEC or DISCARD is refused too.

An entry is a tuple C{(name, kind, min_args, max_args, key_index, collect, write)}:
the lower-case name (what L{twistedproxy.core.request.Request.command} is set
to), one of the kinds below, the allowed argument counts (the name included),
the index of the routing key among the arguments, how many leading
arguments the request parser must keep to handle the command (the others are
only framed, never copied), and whether a read-only user is refused it
(L{WRITE_COMMANDS}).
"""

from __future__ import annotations

# Command kinds.
KEY = 0  # one backend, chosen by the argument at key_index
MULTI = 1  # every argument after the name is a key: MGET DEL UNLINK TOUCH EXISTS
MSET = 2  # key value pairs
EVAL = 3  # script-or-name, numkeys, keys..., args...: routed by the first key
ANY = 4  # no key; any one server answers
PING = 5  # the proxy answers the rest itself
ECHO = 6
QUIT = 7
AUTH = 8
UNSUPPORTED = 9
HELLO = 10  # answered by the proxy: RESP2 or RESP3 (protocols/resp3.py)
TRANSACTION = 11  # MULTI EXEC DISCARD WATCH UNWATCH: see twistedproxy.protocols.redis_transactions

NAME, KIND, MIN_ARGS, MAX_ARGS, KEY_INDEX, COLLECT, WRITE = range(7)

_UNBOUNDED = 1 << 62

# (name, arity[, key index]) of the commands routed by one key.  Arity as in
# Redis: n > 0 means exactly n arguments, n < 0 at least -n, the name included.
_KEY_COMMANDS = (
    # keyspace
    ("copy", -3),
    ("dump", 2),
    ("expire", -3),
    ("expireat", -3),
    ("expiretime", 2),
    ("move", 3),
    ("object", -3, 2),
    ("persist", 2),
    ("pexpire", -3),
    ("pexpireat", -3),
    ("pexpiretime", 2),
    ("pttl", 2),
    ("restore", -4),
    ("sort", -2),
    ("sort_ro", -2),
    ("ttl", 2),
    ("type", 2),
    # strings and bitmaps
    ("append", 3),
    ("bitcount", -2),
    ("bitfield", -2),
    ("bitfield_ro", -2),
    ("bitop", -4, 2),
    ("bitpos", -3),
    ("decr", 2),
    ("decrby", 3),
    ("get", 2),
    ("getbit", 3),
    ("getdel", 2),
    ("getex", -2),
    ("getrange", 4),
    ("getset", 3),
    ("incr", 2),
    ("incrby", 3),
    ("incrbyfloat", 3),
    ("lcs", -3),
    ("psetex", 4),
    ("set", -3),
    ("setbit", 4),
    ("setex", 4),
    ("setnx", 3),
    ("setrange", 4),
    ("strlen", 2),
    ("substr", 4),
    # hashes
    ("hdel", -3),
    ("hexists", 3),
    ("hget", 3),
    ("hgetall", 2),
    ("hincrby", 4),
    ("hincrbyfloat", 4),
    ("hkeys", 2),
    ("hlen", 2),
    ("hmget", -3),
    ("hmset", -4),
    ("hrandfield", -2),
    ("hscan", -3),
    ("hset", -4),
    ("hsetnx", 4),
    ("hstrlen", 3),
    ("hvals", 2),
    # lists
    ("lindex", 3),
    ("linsert", 5),
    ("llen", 2),
    ("lmove", 5),
    ("lmpop", -4, 2),
    ("lpop", -2),
    ("lpos", -3),
    ("lpush", -3),
    ("lpushx", -3),
    ("lrange", 4),
    ("lrem", 4),
    ("lset", 4),
    ("ltrim", 4),
    ("rpop", -2),
    ("rpoplpush", 3),
    ("rpush", -3),
    ("rpushx", -3),
    # sets
    ("sadd", -3),
    ("scard", 2),
    ("sdiff", -2),
    ("sdiffstore", -3),
    ("sinter", -2),
    ("sintercard", -3, 2),
    ("sinterstore", -3),
    ("sismember", 3),
    ("smembers", 2),
    ("smismember", -3),
    ("smove", 4),
    ("spop", -2),
    ("srandmember", -2),
    ("srem", -3),
    ("sscan", -3),
    ("sunion", -2),
    ("sunionstore", -3),
    # sorted sets
    ("zadd", -4),
    ("zcard", 2),
    ("zcount", 4),
    ("zdiff", -3, 2),
    ("zdiffstore", -4),
    ("zincrby", 4),
    ("zinter", -3, 2),
    ("zintercard", -3, 2),
    ("zinterstore", -4),
    ("zlexcount", 4),
    ("zmpop", -4, 2),
    ("zmscore", -3),
    ("zpopmax", -2),
    ("zpopmin", -2),
    ("zrandmember", -2),
    ("zrange", -4),
    ("zrangebylex", -4),
    ("zrangebyscore", -4),
    ("zrangestore", -5),
    ("zrank", -3),
    ("zrem", -3),
    ("zremrangebylex", 4),
    ("zremrangebyrank", 4),
    ("zremrangebyscore", 4),
    ("zrevrange", -4),
    ("zrevrangebylex", -4),
    ("zrevrangebyscore", -4),
    ("zrevrank", -3),
    ("zscan", -3),
    ("zscore", 3),
    ("zunion", -3, 2),
    ("zunionstore", -4),
    # hyperloglog
    ("pfadd", -2),
    ("pfcount", -2),
    ("pfmerge", -2),
    # geo
    ("geoadd", -5),
    ("geodist", -4),
    ("geohash", -2),
    ("geopos", -2),
    ("georadius", -6),
    ("georadius_ro", -6),
    ("georadiusbymember", -5),
    ("georadiusbymember_ro", -5),
    ("geosearch", -7),
    ("geosearchstore", -8),
    # streams (not the blocking XREAD / XREADGROUP)
    ("xack", -4),
    ("xadd", -5),
    ("xautoclaim", -6),
    ("xclaim", -6),
    ("xdel", -3),
    ("xgroup", -3, 2),
    ("xinfo", -3, 2),
    ("xlen", 2),
    ("xpending", -3),
    ("xrange", -4),
    ("xrevrange", -4),
    ("xsetid", -3),
    ("xtrim", -4),
)

# (name, kind, arity[, max args]) of everything else the proxy accepts.
_OTHER_COMMANDS = (
    ("mget", MULTI, -2),
    ("del", MULTI, -2),
    ("unlink", MULTI, -2),
    ("touch", MULTI, -2),
    ("exists", MULTI, -2),
    ("mset", MSET, -3),
    ("eval", EVAL, -3),
    ("evalsha", EVAL, -3),
    ("eval_ro", EVAL, -3),
    ("evalsha_ro", EVAL, -3),
    ("fcall", EVAL, -3),
    ("fcall_ro", EVAL, -3),
    ("command", ANY, -1),
    ("lolwut", ANY, -1),
    ("ping", PING, -1, 2),
    ("echo", ECHO, 2),
    ("quit", QUIT, -1),
    ("auth", AUTH, -2, 3),
    ("hello", HELLO, -1, 16),
    ("multi", TRANSACTION, 1),
    ("exec", TRANSACTION, 1),
    ("discard", TRANSACTION, 1),
    ("watch", TRANSACTION, -2),
    ("unwatch", TRANSACTION, 1),
)

# Known commands the proxy refuses (named here so stats and errors say which).
UNSUPPORTED_COMMANDS = (
    # keyspace-wide or two keys that may live apart
    "keys", "scan", "randomkey", "rename", "renamenx", "msetnx", "migrate", "wait", "waitaof",
    # pub/sub
    "subscribe", "unsubscribe", "psubscribe", "punsubscribe", "ssubscribe", "sunsubscribe",
    "publish", "spublish", "pubsub",
    # blocking
    "blpop", "brpop", "brpoplpush", "blmove", "blmpop", "bzpopmin", "bzpopmax", "bzmpop",
    "xread", "xreadgroup",
    # scripts and functions management
    "script", "function",
    # connection and server administration
    "select", "swapdb", "reset", "client", "info", "config", "dbsize", "debug",
    "flushall", "flushdb", "shutdown", "save", "bgsave", "bgrewriteaof", "lastsave", "monitor",
    "sync", "psync", "replicaof", "slaveof", "role", "time", "slowlog", "latency", "memory",
    "module", "acl", "cluster", "readonly", "readwrite", "failover", "asking",
)


# What a read-only user (a tenant's C{read_only: true} user) may not run: the
# commands Redis 7 flags C{write} (COMMAND INFO), XGROUP (whose subcommands but
# HELP write), and EVAL, EVALSHA and FCALL, whose scripts may write (Redis flags
# them C{may_replicate}; their _RO variants run read-only scripts only).
WRITE_COMMANDS = frozenset((
    "append", "bitfield", "bitop", "copy", "decr", "decrby", "del", "expire", "expireat", "geoadd",
    "georadius", "georadiusbymember", "geosearchstore", "getdel", "getex", "getset", "hdel", "hincrby",
    "hincrbyfloat", "hmset", "hset", "hsetnx", "incr", "incrby", "incrbyfloat", "linsert", "lmove", "lmpop",
    "lpop", "lpush", "lpushx", "lrem", "lset", "ltrim", "move", "mset", "msetnx", "persist", "pexpire",
    "pexpireat", "pfadd", "pfmerge", "psetex", "rename", "renamenx", "restore", "rpop", "rpoplpush", "rpush",
    "rpushx", "sadd", "sdiffstore", "set", "setbit", "setex", "setnx", "setrange", "sinterstore", "smove",
    "sort", "spop", "srem", "sunionstore", "unlink", "xack", "xadd", "xautoclaim", "xclaim", "xdel",
    "xsetid", "xtrim", "zadd", "zdiffstore", "zincrby", "zinterstore", "zmpop", "zpopmax", "zpopmin",
    "zrangestore", "zrem", "zremrangebylex", "zremrangebyrank", "zremrangebyscore", "zunionstore",
    "xgroup", "eval", "evalsha", "fcall",
))


def _entry(name, kind, arity, max_args=None, key_index=1):
    min_args = arity if arity > 0 else -arity
    if max_args is None:
        max_args = arity if arity > 0 else _UNBOUNDED
    if kind == KEY:
        collect = key_index + 1
    elif kind == EVAL:
        collect = 4  # name, script, numkeys, first key
    elif kind in (MULTI, MSET, TRANSACTION):
        collect = _UNBOUNDED
    elif kind in (PING, ECHO, AUTH, HELLO):
        collect = max_args
    else:
        collect = 1
    return (name.encode("ascii"), kind, min_args, max_args, key_index, collect, name in WRITE_COMMANDS)


# An unknown name: refused like the unsupported ones, counted under one name.
UNKNOWN = _entry("unknown", UNSUPPORTED, -1)


def _build():
    entries = [_entry(name, KEY, arity, None, *rest) for name, arity, *rest in _KEY_COMMANDS]
    entries += [_entry(*spec) for spec in _OTHER_COMMANDS]
    entries += [_entry(name, UNSUPPORTED, -1) for name in UNSUPPORTED_COMMANDS]
    table = {}
    for entry in entries:
        name = entry[NAME]
        assert name not in table, name
        table[name] = entry
        table[name.upper()] = entry
    return table


# The command name as sent (lower or upper case) -> entry.  Look up other
# spellings with their lower() form.
COMMANDS = _build()

# Commands of two keys or more that a Redis Cluster pool forwards by their
# first key although a hash pool refuses them: a cluster node checks that every
# key is in one slot and answers -CROSSSLOT itself when not, and the slot is
# the pool's placement.  Their arity as in Redis.
_CLUSTER_KEY_COMMANDS = (("rename", 3), ("renamenx", 3), ("msetnx", -3))


def _build_cluster():
    table = dict(COMMANDS)
    for name, arity in _CLUSTER_KEY_COMMANDS:
        entry = _entry(name, KEY, arity)
        table[entry[NAME]] = table[entry[NAME].upper()] = entry
    return table


# A Redis Cluster pool's table (its request parser's).
CLUSTER_COMMANDS = _build_cluster()
