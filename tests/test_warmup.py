"""
The warm-up before serving (twistedproxy.core.warmup, C{global: warmup}): its
sample traffic goes through the request path and is answered right for every
codec; it stops at its time limit; nothing of it reaches a backend or the
statistics users read; a single process listens, and a worker says ready, only
after it; real backends (their own counters) see none of it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import pytest_twisted
import redis
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport

from tests.support import processes
from tests.support.processes import HOST, free_port
from tests.support.workers import Master, master_config, poll
from tests.test_stats import read_stats_port
from twistedproxy.api import Proxy, build_pool
from twistedproxy.config import ConfigError, config_from_dict
from twistedproxy.core import warmup
from twistedproxy.process.handoff import relay
from twistedproxy.protocols import WARMUP_KEYS, memcache_binary as binary
from twistedproxy.tap import ProxyService

SERVERS = ["127.0.0.1:7101:1", "127.0.0.1:7102:1", "127.0.0.1:7103:1"]


def pools(**global_keys):
    """A Redis pool (with the AUTH/SELECT handshake) and a memcached pool, three servers each."""
    data = {
        "red": {"listen": "127.0.0.1:7001", "redis": True, "servers": SERVERS, "redis_auth": "pw",
                "redis_db": 2, "timeout": 400, "hash": "murmur"},
        "mem": {"listen": "127.0.0.1:7002", "servers": SERVERS, "server_connections": 2},
    }
    if global_keys:
        data["global"] = global_keys
    return config_from_dict(data)


def rig(name):
    config = pools()
    return warmup._Rig(config.pool(name), build_pool)


def outputs(r):
    return [client.transport.value() for client, _, _ in r.conversations]


V = b"v" * 32


def test_redis_samples_are_answered_in_full():
    r = rig("red")
    for _ in range(3):
        r.round()
        (out,) = outputs(r)
        value = b"$32\r\n" + V + b"\r\n"
        assert out == (
            b"+OK\r\n"  # AUTH (the pool has a password), answered by the proxy
            + value + b"+OK\r\n"  # GET, SET
            + value * 8 + b"+OK\r\n" * 8  # the pipelined batch
            + b"*12\r\n" + value * 12  # MGET over three servers, merged
            + b":2\r\n:1\r\n:1\r\n"  # DEL of two keys, INCR, EXPIRE
        )
    # Every server got traffic on its connection, after the handshake (AUTH, SELECT).
    assert len(r.backends) == 3
    assert all(s.requests > 0 for s in r.pool.stats.servers.values())


def test_memcache_text_and_binary_samples_are_answered_in_full():
    r = rig("mem")
    for _ in range(3):
        r.round()
        text, packets = outputs(r)
        keys = WARMUP_KEYS
        value = lambda key: b"VALUE " + key + b" 0 32\r\n" + V + b"\r\n"  # noqa: E731
        assert text == (
            value(keys[0]) + b"END\r\n" + b"STORED\r\n"
            + b"".join(value(k) + b"END\r\n" for k in keys[:8]) + b"STORED\r\n" * 8
            + b"".join(value(k) for k in keys) + b"END\r\n"  # the multi-key get, in key order
            + b"VA 32 f0\r\n" + V + b"\r\n" + b"HD\r\n" + b"DELETED\r\n" + b"1\r\n"
        )
        replies = []
        parser = binary.codec.reply_parser()
        parser.feed(packets)
        while True:
            packet = parser.next_reply(None)
            if packet is None:
                break
            replies.append((packet[1], packet[6:8]))
        assert parser.buffered() == 0
        # The quiet SETQ's success is hidden; the quiet GETKQ hits are not.
        opcodes = ([binary.GET, binary.SET] + [binary.GET] * 8 + [binary.SET] * 8 + [binary.GETKQ] * 8
                   + [binary.NOOP, binary.NOOP, binary.DELETE])
        assert replies == [(opcode, b"\x00\x00") for opcode in opcodes]
    # Backend connections per protocol, over several servers (the samples' keys spread).
    served = {(b.connection.server.label, b.connection.codec.name) for b in r.backends}
    assert len([label for label, codec in served if codec == "memcache_text"]) == 3
    assert len([label for label, codec in served if codec == "memcache_binary"]) >= 2


@pytest.mark.parametrize("name", ["red", "mem"])
def test_warm_up_clients_are_built_as_the_proxys_own(name):
    # The same attributes set in the same order (on PyPy: the same map, so what the
    # warm-up compiled fits the clients served), a login guard included; but the
    # guard's limiter is the warm-up's own, never the one real clients are counted by.
    proxy = Proxy(pools(), MemoryReactorClock())
    served = proxy.factories[name].buildProtocol(None)
    served.makeConnection(StringTransport())
    warm = rig(name).conversations[0][0]
    assert list(vars(warm)) == list(vars(served))
    assert list(vars(warm.parser)) == list(vars(served.parser))
    assert served.parser.login_guard.limiter is proxy.logins
    assert warm.parser.login_guard is not None and warm.parser.login_guard.limiter is not proxy.logins


@pytest_twisted.inlineCallbacks
def test_loopback_backends_transports_are_set_up_as_the_proxys_clients():
    # The reactor's code serves the warm-up's fake backends and the proxy's clients
    # alike: their transports (both accepted TCP connections) get the same
    # attributes in the same order (on PyPy: one map), so nothing the warm-up
    # compiled branches on a shape of transport that serving never shows.
    from twisted.internet import reactor

    proxy = Proxy(pools(), reactor)
    accepted = []
    both = Deferred()

    def keep(protocol):
        accepted.append(protocol)
        if len(accepted) == 2:
            reactor.callLater(0, both.callback, None)  # once both are connected
        return protocol

    served = proxy.factories["mem"]
    ports = [
        reactor.listenTCP(0, warmup._Factory(lambda: keep(served.buildProtocol(None))), interface=HOST),
        reactor.listenTCP(0, warmup._Factory(lambda: keep(warmup._FakeBackend(None))), interface=HOST),
    ]
    sockets = [socket.create_connection((HOST, port.getHost().port)) for port in ports]
    try:
        yield both.addTimeout(10, reactor)
        client, backend = accepted
        assert type(client.transport) is type(backend.transport)
        assert list(vars(backend.transport)) == list(vars(client.transport))
        assert backend.transport.producer is backend
    finally:
        for sock in sockets:
            sock.close()
        for protocol in accepted:
            protocol.transport.abortConnection()
        for port in ports:
            yield port.stopListening()


class _FakeJit:
    """Records PyPy's C{pypyjit.set_param} calls."""

    def __init__(self):
        self.eagerness = []

    def set_param(self, trace_eagerness):
        self.eagerness.append(trace_eagerness)


@pytest_twisted.inlineCallbacks
def test_bridges_are_compiled_eagerly_only_while_warming_up(monkeypatch):
    from twisted.internet import reactor

    jit = _FakeJit()
    monkeypatch.setitem(sys.modules, "pypyjit", jit)
    monkeypatch.setattr(warmup, "PYPY", True)
    done = Proxy(pools(warmup=1.0), reactor).warm_up()
    assert jit.eagerness == [warmup.WARMUP_EAGERNESS]
    yield done
    assert jit.eagerness == [warmup.WARMUP_EAGERNESS, warmup.SERVING_EAGERNESS]


def test_a_failed_warm_up_serves_with_the_default_eagerness(monkeypatch):
    jit = _FakeJit()
    monkeypatch.setitem(sys.modules, "pypyjit", jit)
    monkeypatch.setattr(warmup, "PYPY", True)

    def broken(*args):
        raise RuntimeError("no pool")

    with pytest.raises(RuntimeError):
        warmup.warm_up(MemoryReactorClock(), pools().pools, broken, 1.0)
    assert jit.eagerness == [warmup.WARMUP_EAGERNESS, warmup.SERVING_EAGERNESS]


def test_in_memory_rounds_stop_at_their_time_limit_or_round_count():
    config = pools()
    now = [0.0]

    def timer():
        now[0] += 0.3
        return now[0]

    report = warmup.warm_up_in_memory(config.pools, build_pool, seconds=1.0, rounds=1000, timer=timer)
    assert report.rounds == 4  # 0.3 .. 1.2: the round that ends past the limit is the last
    report = warmup.warm_up_in_memory(config.pools, build_pool, seconds=100.0, rounds=3)
    assert report.rounds == 3 and report.requests > 0


def test_setting(monkeypatch):
    monkeypatch.delenv(warmup.AUTO_ENV, raising=False)
    assert warmup.seconds_for("auto") == warmup.AUTO_SECONDS
    monkeypatch.setenv(warmup.AUTO_ENV, "0.25")  # what the suite's proxies use
    assert warmup.seconds_for("auto") == 0.25 and warmup.seconds_for("auto", replacing=True) == warmup.REPLACING_SECONDS
    assert warmup.seconds_for(0.0) == 0.0
    assert pools().global_.warmup == "auto"
    assert pools(warmup="off").global_.warmup == 0.0
    assert pools(warmup=False).global_.warmup == 0.0
    assert pools(warmup=2.5).global_.warmup == 2.5
    assert pools(warmup="auto").global_.warmup == "auto"
    for bad in ("fast", -1, True):
        with pytest.raises(ConfigError, match="warmup"):
            pools(warmup=bad)


def untouched(proxy, clock=None):
    """Nothing of a warm-up shows in C{proxy}'s statistics, pools or (memory) reactor."""
    if clock is not None:
        assert clock.tcpClients == [] and clock.unixClients == [] and clock.tcpServers == []
    for pool in proxy.pools.values():
        stats = pool.stats
        assert (stats.clients_accepted, stats.client_eof, stats.client_err, stats.forward_error,
                stats.fragments) == (0, 0, 0, 0, 0)
        assert stats.commands == {} and stats.proxy.count == 0
        for server in stats.servers.values():
            assert (server.requests, server.responses, server.connections_made, server.latency.count) == (0, 0, 0, 0)
        assert pool.clients == set()
        assert all(not conns for server in pool.servers for conns in server.connections.values())
    assert proxy.stats.slowlog.seen == 0 and not proxy.stats.slowlog.entries


def test_in_memory_rounds_reach_no_backend_and_no_statistics():
    clock = MemoryReactorClock()
    proxy = Proxy(pools(), clock)
    report = warmup.warm_up_in_memory(proxy.config.pools, build_pool, seconds=5)
    assert report.rounds == warmup.ROUNDS or report.seconds >= 5
    assert report.requests > 0
    untouched(proxy, clock)


@pytest_twisted.inlineCallbacks
def test_warm_up_over_loopback_reaches_no_backend_and_no_statistics():
    from twisted.internet import reactor

    # The configured servers (ports 7101..7103) are never connected to: nothing listens there.
    proxy = Proxy(pools(warmup=3.0), reactor)  # each phase ends once done: 3 s only bounds a loaded machine
    from twisted.internet import tcp

    listening = lambda: {r for r in reactor.getReaders() if isinstance(r, tcp.Port)}
    before = listening()
    report = yield proxy.warm_up()
    assert report.rounds > 0 and report.live_rounds > 0 and report.seconds < 10
    untouched(proxy)
    # Its listeners (on free ports, which a configured server that is down may share) are
    # closed before the process serves: real pools never reach a fake backend.
    assert listening() == before


@pytest_twisted.inlineCallbacks
def test_loopback_rounds_cut_short_by_their_deadline_close_once(monkeypatch):
    from twisted.internet import reactor, tcp

    # The loopback rounds end at their first deadline check, whatever they got done, and
    # are closed once (their listeners stopped twice failed in Twisted's Port), then the
    # single requests run (on PyPy) or the warm-up is over.
    monkeypatch.setattr(warmup, "LIVE_SHARE", 0.0)
    closed = []
    close = warmup._Live.close
    monkeypatch.setattr(warmup._Live, "close", lambda live: closed.append(live) or close(live))
    listening = lambda: {r for r in reactor.getReaders() if isinstance(r, tcp.Port)}
    before = listening()
    report = yield Proxy(pools(warmup=1.0), reactor).warm_up()
    assert len(closed) == len(set(closed)) == 2 and report.seconds < 10
    assert listening() == before


@pytest_twisted.inlineCallbacks
def test_single_requests_from_a_thread_are_answered_and_reach_no_backend():
    from twisted.internet import reactor

    # The Redis pool logs in to its backends (AUTH, SELECT) and times requests out: the
    # thread's backends answer the handshake too, and every request comes back.
    proxy = Proxy(pools(), reactor)
    lives = []
    ready = Deferred()
    left = [len(proxy.config.pools)]

    def live_done():
        left[0] -= 1
        if not left[0]:
            ready.callback(None)

    for pool_config in proxy.config.pools:
        lives.append(warmup._Live(reactor, pool_config, build_pool, 1, live_done))
    yield ready
    for live in lives:
        live.close()
    over = Deferred()
    timer = warmup.time.monotonic
    phase = warmup._Sparse(reactor, lives, build_pool, 200, timer() + 30, timer, lambda: over.callback(None))
    yield over
    sent = phase.close()
    assert phase.ended == "done" and sent >= 200
    assert not phase.thread.is_alive()
    assert all(live.singles for live in lives) and all(live.frames for live in lives)
    # Besides the clients that take turns, new clients of one request each came and went
    # (so accepting and closing are compiled too): the pools saw them close cleanly.
    assert sum(pool.stats.client_eof for pool in phase.pools) > warmup.SPARSE_CLIENTS
    untouched(proxy)


_FIRST_ASKED = """
from zope.interface import providedBy
from twistedproxy.core.client import ProxyFactory
from twistedproxy.process.worker import _PoolFactory
from twistedproxy.stats.server import StatsPortFactory
for cls in (ProxyFactory, _PoolFactory, StatsPortFactory):
    before = dict(vars(cls))
    providedBy(cls.__new__(cls))
    assert dict(vars(cls)) == before, (cls, sorted(set(vars(cls)) - set(before)))
"""


def test_listening_factories_declare_their_interfaces_on_their_class():
    """
    zope.interface writes an undeclared subclass's declarations onto the class when
    first asked (a port that starts listening asks): a class write after "ready" makes
    PyPy drop the code compiled for the warm-up's accepts.  Declared, nothing is written
    (a fresh interpreter: in this one, earlier tests have asked already).
    """
    subprocess.run([sys.executable, "-c", _FIRST_ASKED], check=True, cwd=processes.ROOT)


def test_warm_up_off():
    assert Proxy(pools(warmup="off"), MemoryReactorClock()).warm_up().result is None


def warming_service(monkeypatch):
    """A single-process service started on a memory reactor, its warm-up held: (service, reactor, warm-up)."""
    clock = MemoryReactorClock()
    warm = Deferred()
    monkeypatch.setattr(Proxy, "warm_up", lambda proxy: warm)
    service = ProxyService(pools(), clock)
    service.startService()
    return service, clock, warm


def test_single_process_listens_only_after_warm_up(monkeypatch):
    service, clock, warm = warming_service(monkeypatch)
    try:
        assert clock.tcpServers == []
        warm.callback(warmup.WarmupReport(0.5, 10, 100, 10))
        assert sorted(port for port, *_ in clock.tcpServers) == [7001, 7002]
        assert service.serving.called
    finally:
        service.stopService()


def test_single_process_stopped_while_warming_up_never_listens(monkeypatch):
    service, clock, warm = warming_service(monkeypatch)
    service.stopService()
    warm.callback(None)
    assert clock.tcpServers == []


# -- real processes --------------------------------------------------------------------------------


def commandstats(port) -> dict:
    r = redis.Redis(host=HOST, port=port, protocol=2, lib_name=None, lib_version=None)
    try:
        return {name: stats["calls"] for name, stats in r.info("commandstats").items()}
    finally:
        r.close()


def memcached_stats(port) -> dict:
    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.sendall(b"stats\r\n")
        data = b""
        while not data.endswith(b"END\r\n"):
            data += sock.recv(65536)
    return {line.split()[1]: line.split()[2] for line in data.decode().splitlines() if line.startswith("STAT ")}


def pool_requests(doc, pool) -> int:
    return sum(v["requests"] for v in doc[pool].values() if isinstance(v, dict))


def two_pools(redis_port, memcached_port):
    red_port, mem_port = free_port(), free_port()
    return red_port, mem_port, {
        "red": processes.pool_config([redis_port], red_port, preconnect=True),
        "mem": processes.pool_config([memcached_port], mem_port, redis=False, preconnect=True),
    }


def check_backends_untouched(backend, cache, stats_port):
    calls = commandstats(backend.port)
    assert set(calls) <= {"cmdstat_info", "cmdstat_command", "cmdstat_ping"}, calls
    mc = memcached_stats(cache.port)
    assert (mc["cmd_get"], mc["cmd_set"], mc["get_hits"], mc["get_misses"]) == ("0", "0", "0", "0"), mc
    doc = read_stats_port(stats_port)
    assert pool_requests(doc, "red") == 0 and pool_requests(doc, "mem") == 0


def serve_one_of_each(red_port, mem_port, backend, cache, stats_port):
    """One GET through each pool: the checks above do see traffic."""
    r = redis.Redis(host=HOST, port=red_port, protocol=2, lib_name=None, lib_version=None)
    assert r.get("k") is None
    r.close()
    with socket.create_connection((HOST, mem_port), timeout=5) as sock:
        sock.sendall(b"get k\r\n")
        assert sock.recv(100) == b"END\r\n"
    assert commandstats(backend.port).get("cmdstat_get") == 1
    assert memcached_stats(cache.port)["cmd_get"] == "1"
    poll(lambda: [pool_requests(read_stats_port(stats_port), pool) for pool in ("red", "mem")] == [1, 1],
         10, 0.05, "the stats port to count both requests")


@pytest.mark.integration
def test_single_process_warms_up_then_listens_and_backends_see_nothing(spawn, redis_backends, memcached_backends):
    (backend,), (cache,) = redis_backends(1), memcached_backends(1)
    red_port, mem_port, config = two_pools(backend.port, cache.port)
    stats_port = free_port()
    proc = spawn(processes.proxy, config, red_port, extra_args=["-s", str(stats_port), "-a", HOST])
    processes.wait_for_port(mem_port, proc.proc)
    processes.wait_for_port(stats_port, proc.proc)
    log = proc.output()
    assert "warmed up in " in log and "; listening on %s:%d, %s:%d" % (HOST, red_port, HOST, mem_port) in log
    check_backends_untouched(backend, cache, stats_port)
    serve_one_of_each(red_port, mem_port, backend, cache, stats_port)


@pytest.mark.integration
def test_workers_say_ready_after_their_warm_up_and_backends_see_nothing(spawn, redis_backends, memcached_backends):
    (backend,), (cache,) = redis_backends(1), memcached_backends(1)
    red_port, mem_port, pools_ = two_pools(backend.port, cache.port)
    stats_port = free_port()
    config = master_config(pools_, worker_processes=2)
    # -v 7: the master logs each worker's Ready ("worker PID ready", debug).
    master = Master(spawn, config, red_port, extra_args=["-v", "7", "-s", str(stats_port), "-a", HOST])
    log = master.process.output()
    for worker in master.status["workers"]:
        pid = worker["pid"]
        warmed = log.find("worker %d (slot %d) warmed up in " % (pid, worker["slot"]))
        ready = log.find("worker %d ready" % (pid,))
        assert 0 <= warmed < ready, log
    check_backends_untouched(backend, cache, stats_port)
    serve_one_of_each(red_port, mem_port, backend, cache, stats_port)


class _Channel:
    def __init__(self):
        self.handed = 0

    def callRemote(self, command, **arguments):
        self.handed += 1
        return succeed({"ok": True, "why": ""})


class _Worker:
    def __init__(self, state):
        self.state = state  # "starting" until it said Ready, which it says once warm
        self.hello = True
        self.channel = _Channel()


def test_handed_over_clients_go_to_ready_workers_only():
    warming, ready = _Worker("starting"), _Worker("ready")
    master = SimpleNamespace(heir=None, stopping=False, config=pools(), handoff_turn=-1,
                             workers={0: warming, 1: ready})
    answers = []
    for _ in range(3):
        read, write = os.pipe()
        os.close(write)
        relay(master, None, read, socket.AF_INET, "127.0.0.1:7001", "red", "{}").addCallback(answers.append)
    assert (warming.channel.handed, ready.channel.handed) == (0, 3)
    master.workers = {0: warming}
    read, write = os.pipe()
    os.close(write)
    relay(master, None, read, socket.AF_INET, "127.0.0.1:7001", "red", "{}").addCallback(answers.append)
    assert answers[-1] == {"ok": False, "why": "no worker ready to take it"} and warming.channel.handed == 0


@pytest.mark.integration
def test_single_process_that_cannot_listen_after_its_warm_up_exits_1(spawn):
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = spawn(processes.proxy, {"red": processes.pool_config([free_port()], port)}, port, wait_port=False)
        poll(lambda: not proc.alive(), 30, 0.05, "the proxy to exit")
    assert proc.proc.returncode == 1
    assert "cacheproxy cannot start" in proc.output() and "Address already in use" in proc.output()
