"""
Checking clients: threads that each write and read keys of their own through
a real client (redis-py) and check every value read against what they wrote.
Each keeps, with timestamps, every error it got and every value it read that
was not the one expected, classified:

  - "stale": a value this client wrote to that key earlier, or no value where
    it had written one (a write the server lost, e.g. in a failover);
  - "wrong": anything else (a value never written to that key: another key's,
    another client's, or garbage), which no server failure explains.

The load is paced (C{rate} operations a second per client) to stay light on
a shared machine; a topology change in a few seconds still sees a few
thousand operations.
"""

from __future__ import annotations

import itertools
import os
import random
import threading
import time

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.support.processes import HOST


def proxy_client(port: int, timeout: float = 10.0) -> redis.Redis:
    """
    redis-py to the proxy at C{port}: RESP2, and no retries, so every error the
    proxy answers or every connection it drops is seen and counted.
    """
    return redis.Redis(host=HOST, port=port, protocol=2, socket_timeout=timeout, socket_connect_timeout=timeout,
                       retry=Retry(NoBackoff(), 0), single_connection_client=True, lib_name=None, lib_version=None)


class Event:
    """
    An error or a bad value: when its operation started and when it was seen
    (time.time()), which client, the keys of the operation, what; for a bad value,
    when the write of the expected value was acknowledged (C{written}).
    """

    __slots__ = ("started", "at", "client", "kind", "keys", "detail", "written")

    def __init__(self, started, at, client, kind, keys, detail, written=None):
        self.started, self.at, self.client, self.kind = started, at, client, kind
        self.keys, self.detail, self.written = keys, detail, written

    def __repr__(self):
        return "<%s started %.3f seen %.3f client %d %s: %s>" % (
            self.kind, self.started, self.at, self.client, " ".join(self.keys), self.detail)


class CheckingClient(threading.Thread):
    """
    One client: loops over set+get, get, mset+mget and del+get on its own
    C{keys} keys until L{stop}, checking every reply.  A write that failed
    leaves its key "either value" until the next write that succeeds.
    """

    def __init__(self, index: int, connect, keys: int = 100, rate: float = 50.0, seed: int = 0, prefix: str = "chk"):
        threading.Thread.__init__(self, name="checking-client-%d" % index, daemon=True)
        self.index = index
        self.connect = connect
        self.keys = ["%s:%02d:%04d" % (prefix, index, n) for n in range(keys)]
        self.interval = 1.0 / rate if rate else 0.0
        self.random = random.Random(seed * 1000 + index)
        self.expected = {}  # key -> set of acceptable values (None: no value)
        self.written = {}  # key -> when the write of its expected value was acknowledged
        self.history = {}  # key -> every value written to it
        self.serial = 0
        self.ops = []  # (started, ended) of each operation
        self.errors = []
        self.bad_values = []
        self._stop_event = threading.Event()
        self.client = None
        self._op_started = 0.0
        self._op_keys = ()

    def stop(self):
        self._stop_event.set()

    def run(self):
        next_at = time.time()
        while not self._stop_event.is_set():
            self._op_started = time.time()
            self._op_keys = ()
            try:
                if self.client is None:
                    self.client = self.connect()
                self.step()
            except Exception as e:  # redis-py's errors, and a bug here must not look like a quiet client
                self.errors.append(Event(self._op_started, time.time(), self.index, "error", self._op_keys,
                                         "%s: %s" % (type(e).__name__, e)))
                self._reconnect()
            self.ops.append((self._op_started, time.time()))
            next_at += self.interval
            delay = next_at - time.time()
            if delay > 0:
                self._stop_event.wait(delay)
            else:
                next_at = time.time()
        if self.client is not None:
            self.client.close()

    def _reconnect(self):
        if self.client is not None:
            try:
                self.client.close()
            except Exception:
                pass
        self.client = None

    # -- the operations ---------------------------------------------------------------

    def _value(self, key):
        self.serial += 1
        return ("%s:v%d" % (key, self.serial)).encode()

    def step(self):
        choice = self.random.random()
        if choice < 0.5:
            key = self.random.choice(self.keys)
            self._op_keys = (key,)
            value = self._value(key)
            self._write({key: value}, lambda: self.client.set(key, value))
            self._check(key, self.client.get(key))
        elif choice < 0.75:
            key = self.random.choice(self.keys)
            self._op_keys = (key,)
            self._check(key, self.client.get(key))
        elif choice < 0.95:
            keys = self.random.sample(self.keys, 4)
            self._op_keys = tuple(keys)
            values = {k: self._value(k) for k in keys[:3]}
            self._write(values, lambda: self.client.mset(values))
            for key, value in zip(keys, self.client.mget(keys)):
                self._check(key, value)
        else:
            key = self.random.choice(self.keys)
            self._op_keys = (key,)
            self._write({key: None}, lambda: self.client.delete(key))
            self._check(key, self.client.get(key))

    def _write(self, values, send):
        for key, value in values.items():
            # While it is out, either value may be read back (and stays so if it fails).
            self.expected[key] = self.expected.get(key, {None}) | {value}
            if value is not None:
                self.history.setdefault(key, set()).add(value)
        send()
        now = time.time()
        for key, value in values.items():
            self.expected[key] = {value}
            self.written[key] = now

    def _check(self, key, value):
        expected = self.expected.get(key, {None})
        if value in expected:
            return
        kind = "stale" if value is None or value in self.history.get(key, ()) else "wrong"
        self.bad_values.append(Event(self._op_started, time.time(), self.index, kind, (key,), "read %r, expected %s" % (
            value, " or ".join(sorted(map(repr, expected)))), self.written.get(key)))


_loads = itertools.count()


class CheckingLoad:
    """
    C{clients} checking clients at once (L{CheckingClient}), each with a client
    from C{connect()}; L{start}, L{stop}, then read the events.  The keys of
    each load are its own (a prefix with this process's id and a serial), so
    loads one after another on the same servers do not read each other's values.
    """

    def __init__(self, connect, clients: int = 20, keys: int = 100, rate: float = 50.0, seed: int = 0):
        prefix = "chk%d.%d" % (os.getpid(), next(_loads))
        self.clients = [CheckingClient(i, connect, keys, rate, seed, prefix) for i in range(clients)]

    def start(self) -> "CheckingLoad":
        for client in self.clients:
            client.start()
        return self

    def stop(self) -> None:
        for client in self.clients:
            client.stop()
        for client in self.clients:
            client.join(30)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def errors(self) -> list:
        return sorted((e for c in self.clients for e in c.errors), key=lambda e: e.at)

    def bad_values(self, kind=None) -> list:
        return sorted((e for c in self.clients for e in c.bad_values if kind in (None, e.kind)), key=lambda e: e.at)

    def ops_between(self, start: float, end: float) -> int:
        """How many operations ran wholly between C{start} and C{end} (time.time())."""
        return sum(1 for c in self.clients for began, ended in c.ops if start <= began and ended <= end)

    def total_ops(self) -> int:
        return sum(len(c.ops) for c in self.clients)

    def wait_ops(self, count: int, timeout: float = 30.0) -> None:
        """Wait until C{count} more operations have completed (the load is really running)."""
        target = self.total_ops() + count
        deadline = time.time() + timeout
        while self.total_ops() < target:
            if time.time() > deadline:
                raise AssertionError("the checking load made no progress (%d of %d ops)" % (
                    self.total_ops(), target))
            time.sleep(0.05)

    def summary(self) -> str:
        return "%d ops, %d errors, %d stale, %d wrong" % (
            self.total_ops(), len(self.errors()), len(self.bad_values("stale")), len(self.bad_values("wrong")))
