"""
The harness of the online migration acceptance tests (issue #13) and of
bench/migrate.py:

  - L{RedisMigrationClient}: a L{tests.support.checking.CheckingClient} that
    also writes expiring keys and runs read-modify-write commands (INCR,
    APPEND, LPUSH + LRANGE, HSET + HGETALL), checking every reply against what
    it had acknowledged; L{RedisMigrationLoad} runs 20 of them;
  - L{MemcachedClient} / L{MemcachedLoad}: the same for a memcached pool with
    pymemcache (set, get, get_many, delete, expiring sets, incr, append), which
    also counts the misses of keys it had written (the hit-rate dip) apart;
  - L{preload_redis} / L{preload_memcached}: 10k keys through the proxy,
    pipelined, some with TTLs, some hashes and lists (Redis), flags (memcached);
    L{verify_redis} / L{verify_memcached} read every one back with its type,
    value, flags and TTL;
  - L{placement_problems}: every key on every backend must sit on the server a
    fresh proxy with the new server list sends it to (computed with
    L{twistedproxy.hashing} from the pool's configuration, as HashRoute does),
    and no key may be left on a removed server;
  - L{tests.support.migration_control}: C{cacheproxyctl migration ...} as a
    user runs it (apart: bench/migrate.py uses it without the clients).
"""

from __future__ import annotations

import itertools
import os
import random
import socket
import threading
import time
import urllib.parse

import redis
from pymemcache.client.base import Client as PymemcacheClient

from tests.support.checking import CheckingClient, CheckingLoad, proxy_client
from tests.support.processes import HOST
from twistedproxy.config import config_from_dict
from twistedproxy.hashing import hash_function, hash_tag_key, make_distribution

# How far from a TTL's end a read may see either the value or none: Redis expires
# to the millisecond (a moved key keeps its remaining TTL, so it may live a round
# trip longer), memcached to the second (its clock ticks once a second).
REDIS_TTL_SLACK = 1.0
MEMCACHED_TTL_SLACK = 2.1

# Placement keys of a pool (the rest of its section does not move keys).
PLACEMENT_KEYS = ("listen", "redis", "servers", "hash", "hash_tag", "distribution")


_loads = itertools.count()


# -- checking clients ---------------------------------------------------------------

class _MigrationClient(CheckingClient):
    """
    A L{CheckingClient} with keys of more kinds (C{FAMILIES}: C{families[name]}
    is this client's keys of that kind), expiring writes and read-modify-writes.
    A key written with a TTL must read back its value until the TTL is nearly
    over, and no value once it is well over (a moved key that came back after
    expiring would be a resurrection).
    """

    FAMILIES = ()
    ttl_slack = REDIS_TTL_SLACK

    def __init__(self, index, connect, keys=100, rate=50.0, seed=0, prefix="mig"):
        CheckingClient.__init__(self, index, connect, keys, rate, seed, prefix)
        self.expiring = {}  # key -> (value, sent, acknowledged, ttl seconds)
        few = max(4, keys // 5)
        self.families = {name: ["%s:%02d:%s:%04d" % (prefix, index, name, n) for n in range(few)]
                         for name in self.FAMILIES}

    def _expiring_write(self, key, value, ttl, send):
        sent = time.time()
        self.expiring.pop(key, None)
        try:
            self._write({key: value}, send)
        except Exception:
            # Whatever the key holds now (this value or an earlier one) was written with a TTL too.
            self.expected[key] = self.expected[key] | {None}
            raise
        self.expiring[key] = (value, sent, self.written[key], ttl)

    def _plain_write(self, values, send):
        for key in values:
            self.expiring.pop(key, None)
        self._write(values, send)

    def _check(self, key, value):
        entry = self.expiring.get(key)
        if entry is not None and self.expected.get(key) == {entry[0]}:
            stored, sent, acked, ttl = entry
            started = self._op_started
            if started >= acked + ttl + self.ttl_slack:
                self.expected[key] = {None}
                del self.expiring[key]
            elif time.time() >= sent + ttl - self.ttl_slack:
                # Answered once the TTL was nearly over (a read may wait long in
                # the proxy while it restarts): the key may have expired meanwhile.
                if value is None:
                    return
        CheckingClient._check(self, key, value)

    def _modify(self, key, apply, send):
        """
        A read-modify-write: each value C{key} may hold becomes C{apply(value)};
        while C{send()} is out either may be read; C{send}'s reply (returned)
        is what the server says the new value is, when it says.
        """
        self.expiring.pop(key, None)
        old = self.expected.get(key, {None})
        new = {apply(v) for v in old}
        self.expected[key] = old | new
        self.history.setdefault(key, set()).update(v for v in new if v is not None)
        reply = send()
        self.expected[key] = new
        self.written[key] = time.time()
        return reply

    def _narrow(self, key, value):
        """After a read that matched: the key holds that value (a failed write's doubt is gone)."""
        if value in self.expected.get(key, ()):
            self.expected[key] = {value}


class RedisMigrationClient(_MigrationClient):
    """
    L{CheckingClient}'s set/get/mset+mget/del on plain keys, plus: SET with a
    2-4 s TTL on keys of their own, INCR on counters, APPEND, LPUSH + LRANGE on
    lists and HSET + HGETALL on hashes, each read back and checked.
    """

    FAMILIES = ("ttl", "incr", "append", "list", "hash")

    def step(self):
        choice = self.random.random()
        if choice < 0.55:
            # The plain mix (set+get, get, mset+mget, del+get) through the base class's writes.
            CheckingClient.step(self)
            return
        r = self.random
        if choice < 0.67:
            key = r.choice(self.families["ttl"])
            self._op_keys = (key,)
            value = self._value(key)
            ttl_ms = r.randint(2000, 4000)
            self._expiring_write(key, value, ttl_ms / 1000.0, lambda: self.client.set(key, value, px=ttl_ms))
            self._check(key, self.client.get(key))
        elif choice < 0.72:
            key = r.choice(self.families["ttl"])
            self._op_keys = (key,)
            self._check(key, self.client.get(key))
        elif choice < 0.79:
            key = r.choice(self.families["incr"])
            self._op_keys = (key,)
            reply = self._modify(key, lambda v: b"%d" % (int(v or 0) + 1), lambda: self.client.incr(key))
            self._check(key, b"%d" % reply)
            self._narrow(key, b"%d" % reply)
        elif choice < 0.86:
            key = r.choice(self.families["append"])
            self._op_keys = (key,)
            token = b"%d," % r.randint(0, 999)
            self._modify(key, lambda v: (v or b"") + token, lambda: self.client.append(key, token))
            value = self.client.get(key)
            self._check(key, value)
            self._narrow(key, value)
        elif choice < 0.93:
            key = r.choice(self.families["list"])
            self._op_keys = (key,)
            item = self._value(key)
            if r.random() < 0.1:
                self._plain_write({key: None}, lambda: self.client.delete(key))
            else:
                self._modify(key, lambda v: (item,) + (v or ())[:49], lambda: self.client.pipeline(
                    transaction=False).lpush(key, item).ltrim(key, 0, 49).execute())
            value = tuple(self.client.lrange(key, 0, -1)) or None
            self._check(key, value)
            self._narrow(key, value)
        else:
            key = r.choice(self.families["hash"])
            self._op_keys = (key,)
            field, value = b"f%d" % r.randint(0, 9), self._value(key)
            self._modify(key, lambda v: frozenset(dict(v or (), **{field.decode(): value}).items()),
                         lambda: self.client.hset(key, field, value))
            got = self.client.hgetall(key)
            got = frozenset((k.decode(), v) for k, v in got.items()) or None
            self._check(key, got)
            self._narrow(key, got)



class _MigrationLoad(CheckingLoad):
    """C{clients} checking clients of class C{CLIENT} (20 by default) through the proxy at C{port}."""

    CLIENT = None

    def __init__(self, port, clients=20, keys=60, rate=40.0, seed=0):
        CheckingLoad.__init__(self, None, 0)
        prefix = "mig%d.%d" % (os.getpid(), next(_loads))
        self.clients = [self.CLIENT(i, lambda: self.connect(port), keys, rate, seed, prefix)
                        for i in range(clients)]


class RedisMigrationLoad(_MigrationLoad):
    """L{RedisMigrationClient}s (redis-py) through the proxy at C{port}."""

    CLIENT = RedisMigrationClient

    @staticmethod
    def connect(port):
        return proxy_client(port)


class _MemcachedSerde:
    """pymemcache's values as C{(bytes, flags)} both ways, so flags are written and checked."""

    def serialize(self, key, value):
        if isinstance(value, tuple):
            return value
        return value, 0

    def deserialize(self, key, value, flags):
        return value, flags


def memcached_client(port: int, timeout: float = 10.0):
    """pymemcache to the proxy at C{port}: every write waits for its reply (no noreply)."""
    return PymemcacheClient((HOST, port), connect_timeout=timeout, timeout=timeout, default_noreply=False,
                            serde=_MemcachedSerde(), allow_unicode_keys=False)


class MemcachedClient(_MigrationClient):
    """
    A checking client of a memcached pool: set+get, get, set_many+get_many,
    delete+get, expiring sets (2-4 s), incr and append, each checked.  A miss of
    a key this client wrote and did not delete and that cannot have expired is
    a "miss" event (counted apart from stale/wrong values: in a cache that is
    the hit-rate dip; here it means a key the migration lost track of).
    """

    FAMILIES = ("ttl", "incr", "append")
    ttl_slack = MEMCACHED_TTL_SLACK

    def __init__(self, *args, **kwargs):
        _MigrationClient.__init__(self, *args, **kwargs)
        self.reads = 0
        self.misses = []  # Events of misses of written keys

    def _get(self, key):
        got = self.client.get(key)
        self.reads += 1
        return None if got is None else got[0]

    def _check(self, key, value):
        before = len(self.bad_values)
        _MigrationClient._check(self, key, value)
        if len(self.bad_values) > before and value is None:
            # Not a wrong value: the key is gone from where the proxy looked.
            event = self.bad_values.pop()
            event.kind = "miss"
            self.misses.append(event)

    def step(self):
        r = self.random
        choice = r.random()
        if choice < 0.3:
            key = r.choice(self.keys)
            self._op_keys = (key,)
            value = self._value(key)
            self._plain_write({key: value}, lambda: self._stored(self.client.set(key, value)))
            self._check(key, self._get(key))
        elif choice < 0.45:
            key = r.choice(self.keys)
            self._op_keys = (key,)
            self._check(key, self._get(key))
        elif choice < 0.6:
            keys = r.sample(self.keys, 4)
            self._op_keys = tuple(keys)
            values = {k: self._value(k) for k in keys[:3]}
            self._plain_write(values, lambda: self._none_failed(self.client.set_many(values)))
            got = self.client.get_many(keys)
            for key in keys:
                self.reads += 1
                self._check(key, got[key][0] if key in got else None)
        elif choice < 0.65:
            key = r.choice(self.keys)
            self._op_keys = (key,)
            self._plain_write({key: None}, lambda: self.client.delete(key))
            self._check(key, self._get(key))
        elif choice < 0.77:
            key = r.choice(self.families["ttl"])
            self._op_keys = (key,)
            value = self._value(key)
            ttl = r.randint(2, 4)
            self._expiring_write(key, value, ttl, lambda: self._stored(self.client.set(key, value, expire=ttl)))
            self._check(key, self._get(key))
        elif choice < 0.82:
            key = r.choice(self.families["ttl"])
            self._op_keys = (key,)
            self._check(key, self._get(key))
        elif choice < 0.91:
            key = r.choice(self.families["incr"])
            self._op_keys = (key,)
            if self.expected.get(key, {None}) == {None}:
                self._plain_write({key: b"0"}, lambda: self._stored(self.client.set(key, b"0")))
            reply = self._modify(key, lambda v: None if v is None else b"%d" % (int(v) + 1),
                                 lambda: self.client.incr(key, 1))
            self.reads += 1
            self._check(key, None if reply is None else b"%d" % reply)
            self._narrow(key, None if reply is None else b"%d" % reply)
        else:
            key = r.choice(self.families["append"])
            self._op_keys = (key,)
            if self.expected.get(key, {None}) == {None}:
                self._plain_write({key: b"."}, lambda: self._stored(self.client.set(key, b".")))
            token = b"%d," % r.randint(0, 999)
            self._modify(key, lambda v: None if v is None else v + token,
                         lambda: self.client.append(key, token))
            value = self._get(key)
            self._check(key, value)
            self._narrow(key, value)

    @staticmethod
    def _stored(reply):
        if reply is not True:
            raise RuntimeError("not stored: %r" % (reply,))

    @staticmethod
    def _none_failed(failed):
        if failed:
            raise RuntimeError("set_many failed for %r" % (failed,))


class MemcachedLoad(_MigrationLoad):
    """L{MemcachedClient}s (pymemcache) through the proxy at C{port}."""

    CLIENT = MemcachedClient

    @staticmethod
    def connect(port):
        return memcached_client(port)

    def misses(self) -> list:
        return sorted((e for c in self.clients for e in c.misses), key=lambda e: e.at)

    def reads(self) -> int:
        return sum(c.reads for c in self.clients)

    def summary(self) -> str:
        return "%s, %d reads, %d misses of written keys" % (CheckingLoad.summary(self), self.reads(),
                                                             len(self.misses()))


def report(load, what: str) -> str:
    """One line for the test output, and the first events when there are any."""
    events = load.errors() + load.bad_values()
    if isinstance(load, MemcachedLoad):
        events += load.misses()
    lines = ["%s: %s" % (what, load.summary())]
    lines += ["  %r" % (e,) for e in sorted(events, key=lambda e: e.at)[:15]]
    return "\n".join(lines)


# -- preloading and verifying ------------------------------------------------------------

def preload_redis(port: int, count: int = 10000, seed: int = 1, prefix: str = "pre") -> dict:
    """
    C{count} keys through the proxy, pipelined: 80% strings (a quarter of them
    with a TTL of an hour), 10% hashes, 10% lists.  Returns key -> (type, value)
    (value: bytes, a dict, a list).
    """
    rnd = random.Random(seed)
    client = redis.Redis(host=HOST, port=port, protocol=2, socket_timeout=30)
    keys = {}
    pipe = client.pipeline(transaction=False)
    for n in range(count):
        key = "%s:%06d" % (prefix, n)
        kind = rnd.random()
        if kind < 0.8:
            value = b"v%d:%s" % (n, b"x" * rnd.randint(0, 40))
            if kind < 0.2:
                pipe.set(key, value, ex=3600)
                keys[key] = ("string-ttl", value)
            else:
                pipe.set(key, value)
                keys[key] = ("string", value)
        elif kind < 0.9:
            value = {b"a": b"%d" % n, b"b": b"b%d" % rnd.randint(0, 99)}
            pipe.hset(key, mapping=value)
            keys[key] = ("hash", value)
        else:
            value = [b"%d" % n, b"l%d" % rnd.randint(0, 99), b"z"]
            pipe.rpush(key, *value)
            keys[key] = ("list", value)
        if len(pipe) >= 500:
            _all_ok(pipe.execute())
    _all_ok(pipe.execute())
    client.close()
    return keys


def _all_ok(replies):
    bad = [r for r in replies if not r or isinstance(r, Exception)]
    if bad:
        raise AssertionError("preload: %d replies failed, e.g. %r" % (len(bad), bad[0]))


def verify_redis(port: int, keys: dict) -> list:
    """The preloaded keys read back through the proxy that differ (type, value, TTL), as text."""
    client = redis.Redis(host=HOST, port=port, protocol=2, socket_timeout=30)
    problems = []
    names = sorted(keys)
    for start in range(0, len(names), 500):
        chunk = names[start:start + 500]
        pipe = client.pipeline(transaction=False)
        for key in chunk:
            kind = keys[key][0]
            if kind.startswith("string"):
                pipe.get(key)
            elif kind == "hash":
                pipe.hgetall(key)
            else:
                pipe.lrange(key, 0, -1)
            pipe.ttl(key)
        replies = pipe.execute(raise_on_error=False)
        for i, key in enumerate(chunk):
            kind, value = keys[key]
            got, ttl = replies[2 * i], replies[2 * i + 1]
            if got != value:
                problems.append("%s: %s read %r, expected %r" % (key, kind, got, value))
            elif kind == "string-ttl" and not (0 < ttl <= 3600):
                problems.append("%s: TTL %r, expected 1..3600" % (key, ttl))
            elif kind != "string-ttl" and ttl != -1:
                problems.append("%s: TTL %r, expected none (-1)" % (key, ttl))
    client.close()
    return problems


def preload_memcached(port: int, count: int = 10000, seed: int = 1, prefix: str = "pre") -> dict:
    """C{count} keys through the proxy with flags, a quarter with an hour's TTL; key -> (value, flags)."""
    rnd = random.Random(seed)
    client = memcached_client(port, timeout=30)
    keys = {}
    batch = {}
    for n in range(count):
        key = "%s:%06d" % (prefix, n)
        value = (b"v%d:%s" % (n, b"x" * rnd.randint(0, 40)), rnd.randint(0, 65535))
        keys[key] = value
        batch[key] = value
        if len(batch) >= 200 or n == count - 1:
            ttl = 3600 if rnd.random() < 0.25 else 0
            failed = client.set_many(batch, expire=ttl)
            if failed:
                raise AssertionError("preload: %d keys not stored, e.g. %r" % (len(failed), failed[0]))
            batch = {}
    client.close()
    return keys


def verify_memcached(port: int, keys: dict) -> list:
    """The preloaded keys read back through the proxy that differ (value, flags) or miss, as text."""
    client = memcached_client(port, timeout=30)
    problems = []
    names = sorted(keys)
    for start in range(0, len(names), 100):
        chunk = names[start:start + 100]
        got = client.get_many(chunk)
        for key in chunk:
            if got.get(key) != keys[key]:
                problems.append("%s: read %r, expected %r" % (key, got.get(key), keys[key]))
    client.close()
    return problems


class HitRateProbe(threading.Thread):
    """
    Reads random preloaded memcached keys through the proxy (get_many of 10)
    until L{stop}, keeping (time, hits, misses) per read: the hit rate before a
    migration and during it (the dip) come from L{hit_rate}.  A value other than
    the preloaded one is kept in C{wrong}.
    """

    def __init__(self, port: int, keys: dict, seed: int = 7):
        threading.Thread.__init__(self, daemon=True)
        self.port, self.keys = port, keys
        self.names = sorted(keys)
        self.random = random.Random(seed)
        self.samples = []
        self.wrong = []
        self.errors = []
        self._stop_event = threading.Event()

    def run(self):
        client = memcached_client(self.port)
        while not self._stop_event.is_set():
            chunk = self.random.sample(self.names, 10)
            try:
                got = client.get_many(chunk)
            except Exception as e:
                self.errors.append("%s: %s" % (type(e).__name__, e))
                client.close()
                client = memcached_client(self.port)
                continue
            self.wrong += ["%s: %r" % (k, got[k]) for k in got if got[k] != self.keys[k]]
            self.samples.append((time.time(), len(got), len(chunk) - len(got)))
            self._stop_event.wait(0.01)
        client.close()

    def stop(self):
        self._stop_event.set()
        self.join(10)

    def hit_rate(self, start: float, end: float):
        """C{(hit rate, reads)} over the reads made between C{start} and C{end} (None without reads)."""
        hits = sum(h for at, h, _ in self.samples if start <= at <= end)
        misses = sum(m for at, _, m in self.samples if start <= at <= end)
        return (hits / float(hits + misses) if hits + misses else None), hits + misses


# -- placement ----------------------------------------------------------------------------

def pool_placement(pool: dict, name: str = "pool"):
    """
    C{key (bytes) -> "host:port"} for a pool's YAML section (C{pool}): the
    server a fresh proxy with that section sends the key to, computed as
    HashRoute does (hash, hash_tag, distribution over every configured server).
    """
    section = {k: v for k, v in pool.items() if k in PLACEMENT_KEYS}
    pool_config = config_from_dict({name: section}).pools[0]
    servers = list(pool_config.servers)
    index = make_distribution(pool_config.distribution, [(s.ketama_name, s.weight) for s in servers],
                              rng=random.Random(0)).index
    hash_ = hash_function(pool_config.hash)
    tag = pool_config.hash_tag

    def owner(key: bytes) -> str:
        return servers[index(hash_(key if tag is None else hash_tag_key(key, tag)))].address

    return owner


def redis_keys(port: int, db: int = 0) -> list:
    """Every key of db C{db} on the Redis at C{port} (SCAN; expired ones left out)."""
    client = redis.Redis(host=HOST, port=port, db=db, protocol=2, socket_timeout=30)
    keys = list(client.scan_iter(count=1000))
    client.close()
    return keys


def memcached_keys(port: int) -> list:
    """Every live key of the memcached at C{port} (C{lru_crawler metadump all})."""
    with socket.create_connection((HOST, port), timeout=30) as sock:
        sock.sendall(b"lru_crawler metadump all\r\n")
        data = b""
        while not (data.endswith(b"END\r\n") or data.startswith(b"BUSY") or data.startswith(b"ERROR")):
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            data += chunk
    if not data.endswith(b"END\r\n"):
        raise AssertionError("metadump of memcached %d: %r" % (port, data[:200]))
    now = time.time()
    keys = []
    for line in data.split(b"\n"):  # metadump's lines end in a bare newline, END in CRLF
        line = line.rstrip(b"\r")
        if not line.startswith(b"key="):
            continue
        fields = dict(f.split(b"=", 1) for f in line.split(b" ") if b"=" in f)
        exp = int(fields.get(b"exp", b"-1"))
        if exp != -1 and exp <= now:
            continue
        keys.append(urllib.parse.unquote_to_bytes(fields[b"key"]))
    return keys


def placement_problems(pool: dict, backends: list, redis_pool: bool = True, limit: int = 20):
    """
    C{(problems, counts)}: every key on every backend port in C{backends} (the
    old and the new list's) checked against the placement of C{pool} (the new
    section): the keys that sit elsewhere than their owner (a removed server's
    keys all do), as text, at most C{limit}; and the key count per backend.
    """
    owner = pool_placement(pool)
    problems, counts, misplaced = [], {}, 0
    for port in backends:
        address = "%s:%d" % (HOST, port)
        keys = redis_keys(port) if redis_pool else memcached_keys(port)
        counts[address] = len(keys)
        for key in keys:
            if owner(key) != address:
                if redis_pool and _gone(port, key):
                    continue
                misplaced += 1
                if len(problems) < limit:
                    problems.append("%r on %s, owner %s" % (key, address, owner(key)))
    if misplaced > len(problems):
        problems.append("... %d misplaced keys in all" % (misplaced,))
    return problems, counts


def _gone(port, key) -> bool:
    """Whether C{key} has expired on the Redis at C{port} since it was listed (EXISTS expires it)."""
    client = redis.Redis(host=HOST, port=port, protocol=2, socket_timeout=10)
    try:
        return not client.exists(key)
    finally:
        client.close()
