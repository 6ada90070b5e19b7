"""
Requests with very many keys: sent in slices across reactor turns, timed per
fragment from its own send time, never ejecting healthy servers; and timers
that take a reply already waiting in the socket as the reply.

Unit tests drive the core over StringTransports and a fake clock (the manner
of tests/test_core.py); the integration tests run real redis-server and
memcached processes behind the proxy with the README's example settings.
"""

from __future__ import annotations

import socket
import threading
import time

import pymemcache.client.base
import redis

from tests.support import processes
from tests.support.huge import README_SETTINGS, key, value
from tests.support.resp import cmd
from tests.test_core import Harness, bulk
from tests.test_stats import read_stats_port
from twistedproxy.routes import hash as pool_module

SLICE = pool_module.SLICE_KEYS


def raw_feed(client, data: bytes) -> None:
    """Give C{data} to the client without ending the reactor turn (the Harness's wrapper ends it)."""
    type(client).dataReceived(client, data)


# -- slices ------------------------------------------------------------------------------


def test_a_huge_request_goes_out_in_slices_one_per_turn_and_is_joined_in_order():
    h = Harness()
    c, t = h.client()
    keys = [b"k%d" % i for i in range(2 * SLICE + 7)]
    raw_feed(c, cmd("MGET", *keys) + cmd("GET", keys[0]))
    backends = h.accept()
    sent = sum(len(args) - 1 for b in backends.values() for args in b.pending())
    assert sent == SLICE  # the first slice; the next goes in the next turn ...
    h.reactor.advance(0)
    backends = h.accept()
    for port, backend in backends.items():
        for k in keys:
            backend.data[k] = k.upper()
    seen = [k for b in backends.values() for args in b.pending() if args[0].upper() == b"MGET" for k in args[1:]]
    assert sorted(seen) == sorted(keys), "every slice is out after as many turns as slices"
    # The GET that followed the MGET was held until the last slice was out:
    # on its server it comes after every MGET fragment.
    on = h.pool.server_for(keys[0]).spec.port
    assert backends[on].pending()[-1] == [b"GET", keys[0]]
    for backend in backends.values():
        backend.answer()
    assert t.value() == b"*%d\r\n" % len(keys) + b"".join(bulk(k.upper()) for k in keys) + bulk(keys[0].upper())


def test_slices_of_sums_and_mset_are_joined():
    h = Harness()
    c, t = h.client()
    keys = [b"k%d" % i for i in range(SLICE + 3)]
    c.dataReceived(cmd("MSET", *[x for k in keys for x in (k, k + b"!")]))
    backends = h.accept()
    for backend in backends.values():
        backend.answer()
    assert t.value() == b"+OK\r\n"
    t.clear()
    c.dataReceived(cmd("EXISTS", *keys) + cmd("DEL", *keys[:-1]) + cmd("MGET", keys[-1], keys[0]))
    for backend in backends.values():
        backend.answer()
    assert t.value() == b":%d\r\n:%d\r\n" % (len(keys), len(keys) - 1) + b"*2\r\n" + bulk(keys[-1] + b"!") + bulk(None)


def test_an_ordinary_multi_key_request_takes_no_extra_turn():
    h = Harness()
    c, _ = h.client()
    raw_feed(c, cmd("MGET", *[b"k%d" % i for i in range(SLICE)]))
    assert c.slicing is None and c.slice_call is None
    calls = [d for d in h.reactor.getDelayedCalls() if d.active()]
    assert len(calls) == 1 and "TurnFlusher.run" in repr(calls[0].func)  # the turn's one flush, as before


def test_a_client_gone_mid_slices_stops_sending_them():
    h = Harness()
    c, t = h.client()
    keys = [b"k%d" % i for i in range(3 * SLICE)]
    raw_feed(c, cmd("MGET", *keys))
    c.connectionLost(None)
    h.reactor.advance(0)
    backends = h.accept()
    sent = sum(len(args) - 1 for b in backends.values() for args in b.pending())
    assert sent == SLICE
    for backend in backends.values():
        backend.answer()  # dropped: nobody to give them to
    assert t.value() == b""


def test_no_server_fails_a_huge_request_once_without_sending_the_rest():
    h = Harness(servers=(7001,), auto_eject_hosts=True, server_failure_limit=1, server_retry_timeout=1000)
    c, t = h.client()
    c.dataReceived(cmd("GET", "x"))
    h.refuse()  # ejected: no server left
    t.clear()
    c.dataReceived(cmd("MGET", *[b"k%d" % i for i in range(3 * SLICE)]) + cmd("PING"))
    assert t.value() == b"-ERR Connection refused\r\n+PONG\r\n"
    assert c.slicing is None and not c.held


# -- timers ----------------------------------------------------------------------------------


def test_a_fragment_is_timed_from_its_own_send_time():
    h = Harness(timeout=100)
    c, t = h.client()
    first = h.keys_on(7001, SLICE)  # the first slice: all on 7001
    last = h.key_on(7002)  # the second slice: one key on 7002
    raw_feed(c, cmd("MGET", *(first + [last])))
    # The turn that sent the first slice ends 90 ms later (a stall elsewhere):
    # the second slice is sent then, and its time runs from then.
    h.reactor.advance(0.09)
    backends = h.accept()
    backends[7001].answer()
    h.reactor.advance(0.05)  # 140 ms after the request arrived, 50 ms after the slice was sent
    assert t.value() == b""
    assert h.pool.stats.server("127.0.0.1:7002:1").server_timedout == 0
    backends[7002].data[last] = b"L"
    backends[7002].answer()
    assert t.value() == b"*%d\r\n" % (SLICE + 1) + bulk(None) * SLICE + bulk(b"L")
    h.reactor.advance(1)
    assert sum(s.server_timedout for s in h.pool.stats.servers.values()) == 0


def test_a_reply_waiting_in_the_socket_when_the_timer_fires_is_the_reply():
    h = Harness(timeout=100)
    c, t = h.client()
    a = h.key_on(7001)
    c.dataReceived(cmd("GET", a))
    backend = h.accept()[7001]
    ours, theirs = socket.socketpair()
    try:
        ours.setblocking(False)
        backend.transport.socket = ours  # the reactor has not read it yet: the process was busy
        theirs.sendall(b"$5\r\nvalue\r\n")
        h.reactor.advance(0.1)
        assert t.value() == b"$5\r\nvalue\r\n"
        assert h.pool.stats.server("127.0.0.1:7001:1").server_timedout == 0
        assert not h.pool.servers[0].failures
        # Nothing waiting: the timer times the request out as before.
        t.clear()
        c.dataReceived(cmd("GET", a))
        h.reactor.advance(0.1)
        assert t.value() == b"-ERR Connection timed out\r\n"
    finally:
        ours.close()
        theirs.close()


# -- real backends, the README's example settings ------------------------------------------------------

KEYS = 150000
OTHERS = 20


def stats_of(proc) -> dict:
    return read_stats_port(int(proc.argv[proc.argv.index("-s") + 1]), timeout=10)


def failures(doc: dict) -> tuple:
    pool = doc["bench"]
    servers = [v for v in pool.values() if isinstance(v, dict)]
    return pool["server_ejects"], sum(s["server_timedout"] for s in servers), pool["forward_error"]


class Others:
    """C{OTHERS} clients sending one small request at a time until stopped; they count errors."""

    def __init__(self, request):
        self.request = request  # a function making one request; raises or returns False on error
        self.stop = threading.Event()
        self.errors = []
        self.done = 0
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(OTHERS)]
        for thread in self.threads:
            thread.start()

    def _run(self, index):
        try:
            call = self.request(index)
            while not self.stop.is_set():
                ok = call()
                self.done += 1
                if not ok:
                    self.errors.append("wrong reply")
                time.sleep(0.001)
        except Exception as e:  # noqa: BLE001 - every error counts
            self.errors.append(repr(e))

    def finish(self):
        self.stop.set()
        for thread in self.threads:
            thread.join(30)


def test_a_150k_key_mget_succeeds_without_ejecting_anyone(redis_backends, spawn):
    backends = redis_backends(3)
    port = processes.free_port()
    proxy = spawn(processes.proxy, {"bench": processes.pool_config([b.port for b in backends], port, **README_SETTINGS)}, port)
    big = redis.Redis(host=processes.HOST, port=port, socket_timeout=60, protocol=2)
    mapping = {key(i): value(i) for i in range(KEYS)}
    assert big.mset(mapping) is True  # itself a huge request
    for index in range(OTHERS):
        big.set(b"other%d" % index, b"x%d" % index)

    def other(index):
        client = redis.Redis(host=processes.HOST, port=port, socket_timeout=30, protocol=2)
        return lambda: client.get(b"other%d" % index) == b"x%d" % index

    others = Others(other)
    try:
        got = big.mget(list(mapping))
    finally:
        others.finish()
    assert got == list(mapping.values())
    assert others.errors == [] and others.done > 0
    assert failures(stats_of(proxy)) == (0, 0, 0)


def test_a_150k_key_memcached_get_succeeds_without_ejecting_anyone(memcached_backends, spawn):
    backends = memcached_backends(3)
    port = processes.free_port()
    config = {"bench": processes.pool_config([b.port for b in backends], port, redis=False, **README_SETTINGS)}
    proxy = spawn(processes.proxy, config, port)
    with socket.create_connection((processes.HOST, port)) as sock:
        for start in range(0, KEYS, 5000):
            batch = range(start, min(start + 5000, KEYS))
            sock.sendall(b"".join(b"set %s 0 0 %d noreply\r\n%s\r\n" % (key(i), len(value(i)), value(i)) for i in batch))
        sock.sendall(b"set other 0 0 1\r\nx\r\n")
        data = b""
        while not data.endswith(b"STORED\r\n"):
            data += sock.recv(65536)
        assert data == b"STORED\r\n"

    def other(index):
        client = pymemcache.client.base.Client((processes.HOST, port), timeout=30)
        return lambda: client.get(b"other") == b"x"

    others = Others(other)
    try:
        with socket.create_connection((processes.HOST, port), timeout=60) as sock:
            sock.sendall(b"get " + b" ".join(key(i) for i in range(KEYS)) + b"\r\n")
            want = b"".join(b"VALUE %s 0 %d\r\n%s\r\n" % (key(i), len(value(i)), value(i)) for i in range(KEYS)) + b"END\r\n"
            chunks, size = [], 0
            while size < len(want):
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if chunk.endswith(b"\r\n") and b"SERVER_ERROR" in chunk[-300:]:
                    break
            got = b"".join(chunks)
    finally:
        others.finish()
    assert got == want, got[:200]
    assert others.errors == [] and others.done > 0
    assert failures(stats_of(proxy)) == (0, 0, 0)
