"""
twistedproxy.reactor: Twisted's epoll reactor without the per-event log
context keeps Twisted's semantics (each scenario runs on Twisted's own epoll
reactor and on ours, with real sockets, and must come out the same), and the
proxy's processes run on it unless C{TWISTEDPROXY_REACTOR=twisted}.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import subprocess
import sys
import time

import pytest
import redis
from twisted.internet import epollreactor, error, interfaces
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher
from twisted.python import context, log, threadable
from zope.interface import implementer

from tests.support import processes
from tests.support.processes import HOST, ROOT, free_port, pool_config
from tests.support.workers import poll
from twistedproxy import reactor as fast

REACTORS = {"twisted": epollreactor.EPollReactor, "fast": fast.EPollReactor}


@pytest.fixture(params=sorted(REACTORS))
def reactor(request):
    """A fresh, not installed reactor of each kind, with the log's "system" resolved as install() sets it up."""
    threadable.registerAsIOThread()
    made = REACTORS[request.param]()
    previous = context.defaultContextDict[log.ILogContext]
    if request.param == "fast":
        context.setDefault(log.ILogContext, fast._ServedSystem(made, previous))
    yield made
    context.setDefault(log.ILogContext, previous)
    for port in list(getattr(made, "test_ports", ())):
        port.stopListening()
    made.iterate(0)


@pytest.fixture
def logged():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def failures(events):
    """(exception type, log system) of each logged failure in C{events} (legacy log events)."""
    return [(e["failure"].type, e["system"]) for e in events if e.get("failure") is not None]


def spin(reactor, predicate, timeout=10.0):
    """Run C{reactor}'s iterations until C{predicate()} is true (AssertionError after C{timeout}s)."""
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError("reactor: timed out")
        reactor.iterate(0.01)


def listen(reactor, protocol_class, **attrs):
    """Listen on a loopback port with C{protocol_class}; the protocols made go to C{factory.made}."""
    factory = Factory.forProtocol(protocol_class)
    factory.made = []
    factory.__dict__.update(attrs)
    original = factory.buildProtocol

    def build(addr):
        protocol = original(addr)
        factory.made.append(protocol)
        return protocol

    factory.buildProtocol = build
    port = reactor.listenTCP(0, factory, interface=HOST)
    reactor.test_ports = getattr(reactor, "test_ports", []) + [port]
    return factory, port.getHost().port


def connect(port):
    sock = socket.create_connection((HOST, port), timeout=10)
    sock.setblocking(False)
    return sock


def recv_some(reactor, sock, want=1):
    """What C{sock} receives while the reactor runs: at least C{want} bytes, or everything up to EOF."""
    got = []

    def ready():
        try:
            chunk = sock.recv(65536)
        except BlockingIOError:
            return False
        if not chunk:
            got.append(b"")
            return True
        got.append(chunk)
        return sum(len(c) for c in got) >= want

    spin(reactor, ready)
    return b"".join(got), got[-1] == b""


@implementer(interfaces.IHalfCloseableProtocol)
class Echo(Protocol):
    def connectionMade(self):
        self.events = []

    def dataReceived(self, data):
        if data.startswith(b"boom"):
            raise ZeroDivisionError("boom in dataReceived")
        self.transport.write(data)

    def readConnectionLost(self):
        self.events.append("readConnectionLost")
        self.transport.write(b"bye")
        self.transport.loseConnection()

    def writeConnectionLost(self):
        self.events.append("writeConnectionLost")

    def connectionLost(self, reason):
        self.events.append(reason.type)


def test_writes_and_half_close(reactor):
    factory, port = listen(reactor, Echo)
    sock = connect(port)
    sock.sendall(b"hello")
    assert recv_some(reactor, sock, 5) == (b"hello", False)
    sock.shutdown(socket.SHUT_WR)
    data, eof = recv_some(reactor, sock, 1 << 20)
    assert (data, eof) == (b"bye", True)
    (server,) = factory.made
    spin(reactor, lambda: len(server.events) == 2)
    assert server.events == ["readConnectionLost", error.ConnectionDone]
    sock.close()


def test_exception_in_data_received_is_logged_and_drops_the_connection(reactor, logged):
    factory, port = listen(reactor, Echo)
    sock = connect(port)
    sock.sendall(b"boom")
    assert recv_some(reactor, sock, 1 << 20) == (b"", True)
    (server,) = factory.made
    spin(reactor, lambda: server.events)
    assert server.events == [ZeroDivisionError]
    # Logged under the connection's log prefix, as log.callWithLogger names it.
    assert failures(logged) == [(ZeroDivisionError, server.transport.logPrefix())]
    assert server.transport.logPrefix().startswith("Echo,")
    # The reactor goes on serving others, and logs outside an event as "-".
    other = connect(port)
    other.sendall(b"after")
    assert recv_some(reactor, other, 5) == (b"after", False)
    log.msg("outside any event")
    assert logged[-1]["system"] == "-"
    sock.close()
    other.close()


def test_reset_by_peer_is_connection_lost(reactor):
    factory, port = listen(reactor, Echo)
    sock = connect(port)
    sock.sendall(b"x")
    assert recv_some(reactor, sock, 1) == (b"x", False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # RST
    (server,) = factory.made
    spin(reactor, lambda: server.events)
    assert server.events == [error.ConnectionLost]


class Raising(Echo):
    def connectionLost(self, reason):
        raise KeyError("from connectionLost")


def test_error_escaping_the_dispatch_is_logged_and_the_loop_goes_on(reactor, logged):
    factory, port = listen(reactor, Raising)
    sock = connect(port)
    sock.sendall(b"x")
    recv_some(reactor, sock, 1)
    sock.close()
    (server,) = factory.made
    spin(reactor, lambda: failures(logged))
    assert failures(logged) == [(KeyError, server.transport.logPrefix())]
    other = connect(port)
    other.sendall(b"still")
    assert recv_some(reactor, other, 5) == (b"still", False)
    other.close()


@implementer(interfaces.IPushProducer)
class Streamer(Protocol):
    """Writes C{factory.total} bytes as a push producer: paused when the peer does not read."""

    def connectionMade(self):
        self.sent = 0
        self.pauses = self.resumes = 0
        self.paused = False
        self.transport.registerProducer(self, True)
        self.produce()

    def produce(self):
        chunk = b"x" * 65536
        while not self.paused and self.sent < self.factory.total:
            self.transport.write(chunk)
            self.sent += len(chunk)
        if self.sent >= self.factory.total and not self.paused:
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def pauseProducing(self):
        self.pauses += 1
        self.paused = True

    def resumeProducing(self):
        self.resumes += 1
        self.paused = False
        self.produce()

    def stopProducing(self):
        self.paused = True


def test_push_producer_is_paused_and_resumed(reactor):
    factory, port = listen(reactor, Streamer, total=8 << 20)
    sock = connect(port)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    spin(reactor, lambda: factory.made and factory.made[0].pauses)
    (server,) = factory.made
    assert server.sent < factory.total  # the peer did not read: the producer stopped
    received = 0
    while True:
        data, eof = recv_some(reactor, sock, 1)
        received += len(data)
        if eof:
            break
    assert received == factory.total
    assert server.resumes >= 1
    sock.close()


# -- install() and the proxy's processes ------------------------------------------------

def _installed(env_value=None, preinstall=False):
    env = processes.proxy_env()
    env.pop(fast.REACTOR_ENV, None)
    if env_value is not None:
        env[fast.REACTOR_ENV] = env_value
    code = ("import twisted.internet.reactor\n" if preinstall else "") + (
        "from twistedproxy.reactor import install\n"
        "r = install()\n"
        "print(type(r).__module__ + '.' + type(r).__name__)\n")
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=60)


def test_install_chooses_by_environment_and_keeps_an_installed_reactor():
    assert _installed().stdout.strip() == "twistedproxy.reactor.EPollReactor"
    assert _installed("fast").stdout.strip() == "twistedproxy.reactor.EPollReactor"
    assert _installed("twisted").stdout.strip() == "twisted.internet.epollreactor.EPollReactor"
    assert _installed(preinstall=True).stdout.strip() == "twisted.internet.epollreactor.EPollReactor"
    bad = _installed("nosuch")
    assert bad.returncode != 0 and "TWISTEDPROXY_REACTOR=nosuch" in bad.stdout


FAST_LINE = "reactor: twistedproxy.reactor.EPollReactor"
TWISTED_LINE = "reactor: twisted.internet.epollreactor.EPollReactor"


def _serves(port):
    client = redis.Redis(host=HOST, port=port, socket_timeout=10, protocol=2)
    assert client.set("reactor-key", "v") is True
    assert client.get("reactor-key") == b"v"


@pytest.mark.integration
@pytest.mark.parametrize("launcher", ["cacheproxy", "twistd", "workers"])
@pytest.mark.parametrize("choice", [None, "twisted"])
def test_the_proxy_runs_on_the_chosen_reactor(spawn, redis_backends, monkeypatch, launcher, choice):
    (backend,) = redis_backends(1)
    port = free_port()
    if choice is None:
        monkeypatch.delenv(fast.REACTOR_ENV, raising=False)
    else:
        monkeypatch.setenv(fast.REACTOR_ENV, choice)
    config = {"alpha": pool_config([backend.port], port)}
    if launcher == "workers":
        config["global"] = {"worker_processes": 2}
    start = processes.twistd if launcher == "twistd" else processes.proxy
    proc = spawn(start, config, port, extra_args=["-v", "7"])
    _serves(port)
    line = FAST_LINE if choice is None else TWISTED_LINE
    # The master, both workers and the spare (started with them) log theirs.
    poll(lambda: proc.output().count(line) == (4 if launcher == "workers" else 1), message=line)
    other = TWISTED_LINE if choice is None else FAST_LINE
    assert other not in proc.output()
    assert "Traceback" not in proc.output(), proc.output()


def test_an_unknown_choice_is_refused(monkeypatch, tmp_path):
    config = processes.write_config({"alpha": pool_config([free_port()], free_port())})
    env = processes.proxy_env()
    env[fast.REACTOR_ENV] = "nosuch"
    out = subprocess.run([sys.executable, "-m", "twistedproxy.cli", "-c", config], env=env, cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    os.unlink(config)
    assert out.returncode == 1
    assert "TWISTEDPROXY_REACTOR=nosuch: expected one of fast, twisted" in out.stdout


def test_call_after_events_runs_once_the_polls_events_are_handled(logged):
    """The proxy's reactor only: what callLater(0) from an event handler does, without a timer."""
    threadable.registerAsIOThread()
    reactor = fast.EPollReactor()
    calls = []

    class Noting(Protocol):
        def dataReceived(self, data):
            calls.append(("data", data))
            reactor.callAfterEvents(lambda: calls.append(("after", data)))
            if data == b"bad":
                reactor.callAfterEvents(lambda: 1 / 0)

    factory, port = listen(reactor, Noting)
    first, second = connect(port), connect(port)
    spin(reactor, lambda: len(factory.made) == 2)
    first.sendall(b"one")
    second.sendall(b"bad")
    time.sleep(0.2)  # both reads wait in the same poll
    spin(reactor, lambda: len(calls) == 4)
    assert sorted(calls[:2]) == [("data", b"bad"), ("data", b"one")]
    assert sorted(calls[2:]) == [("after", b"bad"), ("after", b"one")]
    # One that failed is logged; the others ran.
    assert [e["log_failure"].type for e in logged if e.get("log_failure") is not None] == [ZeroDivisionError]
    # Outside event handling it waits for the next turn, as callLater(0) does.
    reactor.callAfterEvents(lambda: calls.append("later"))
    assert calls[-1] != "later"
    reactor.iterate(0)
    assert calls[-1] == "later"
    for sock in (first, second):
        sock.close()
    for p in reactor.test_ports:
        p.stopListening()
    reactor.iterate(0)


def test_a_failing_first_call_after_events_does_not_stop_the_others(logged):
    """A call after a poll's events that fails is logged; the ones after it still run."""
    threadable.registerAsIOThread()
    reactor = fast.EPollReactor()
    calls = []
    reactor._after_events = [lambda: 1 / 0, lambda: calls.append("second"), lambda: calls.append("third")]
    reactor.doPoll(0)
    assert calls == ["second", "third"]
    assert [e["log_failure"].type for e in logged if e.get("log_failure") is not None] == [ZeroDivisionError]
    reactor.doPoll(0)  # nothing left to call
    assert calls == ["second", "third"]


def test_timed_calls_run_cancel_and_read_as_twisteds(reactor):
    """callLater on either reactor: runs when due, a cancelled call never runs, the errors and reprs are Twisted's."""
    calls = []
    kept = reactor.callLater(0, calls.append, "ran")
    dropped = reactor.callLater(0, calls.append, "cancelled")
    dropped.cancel()
    with pytest.raises(error.AlreadyCancelled):
        dropped.cancel()
    assert not dropped.active()
    assert re.fullmatch(r"<DelayedCall 0x[0-9a-f]+ \[-?[0-9.e-]+s\] called=0 cancelled=1>", repr(dropped))
    reactor.runUntilCurrent()
    assert calls == ["ran"]
    with pytest.raises(error.AlreadyCalled):
        kept.cancel()
    assert "called=1" in repr(kept)


def test_a_cancelled_timed_call_keeps_its_attributes():
    """
    The proxy's reactor only: a cancelled call has the attributes of a pending
    one (references dropped), so on PyPy the same map: the compiled reactor loop
    meets cancelled calls waiting in the timer heap without leaving its path.
    """
    reactor = fast.EPollReactor()
    pending = reactor.callLater(5, print, "x", end="")
    cancelled = reactor.callLater(5, print, "y", end="")
    cancelled.cancel()
    assert list(vars(cancelled)) == list(vars(pending))
    assert (cancelled.func, cancelled.args, cancelled.kw) == (None, None, None)
    if sys.implementation.name == "pypy":
        import __pypy__

        assert __pypy__.strategy(cancelled) == __pypy__.strategy(pending)
    pending.cancel()
    reactor.runUntilCurrent()


def test_the_main_loop_runs_timed_and_thread_calls_and_stops_as_twisteds(reactor, logged):
    """
    reactor.run() on either reactor: timed calls run in time order (one moved
    later by reset, one cancelled, one made by another), a call from another
    thread wakes the wait, a timed call that fails is logged and the loop goes
    on, more than 50 cancelled calls are purged, an error escaping a turn is
    logged as "Unexpected error in main loop" and the loop goes on, and stop()
    fires the shutdown triggers.
    """
    import threading

    calls = []
    started = time.time()
    reactor.addSystemEventTrigger("before", "shutdown", calls.append, "shutdown")
    moved = reactor.callLater(0.01, calls.append, "moved")
    moved.reset(0.08)
    reactor.callLater(0.02, lambda: 1 / 0)
    reactor.callLater(0.03, lambda: reactor.callLater(0.01, calls.append, "made by a timed call"))
    reactor.callLater(0.02, calls.append, "second")
    reactor.callLater(0.01, calls.append, "first")
    cancelled = [reactor.callLater(60, calls.append, "never") for _ in range(60)]
    for call in cancelled:
        call.cancel()
    poll = reactor.doIteration
    failed = []

    def failing_once(timeout):
        if not failed:
            failed.append(timeout)
            raise RuntimeError("escaping a turn")
        poll(timeout)

    reactor.doIteration = failing_once

    def from_thread():
        # Called while the loop waits with no timed call due for a minute.
        calls.append("thread")
        reactor.callLater(0, reactor.stop)

    def start_thread():
        calls.append("waiting")
        threading.Timer(0.05, reactor.callFromThread, args=(from_thread,)).start()

    reactor.callLater(0.1, start_thread)
    reactor.callLater(60, calls.append, "a minute later")
    reactor.run(installSignalHandlers=False)
    # The calls scheduled up front run in their time order.  The one a timed call
    # made is due 10 ms after that call ran, so on a loaded machine it may come
    # after any of them but the stop (due later still).
    made = "made by a timed call"
    assert [call for call in calls if call != made] == ["first", "second", "moved", "waiting", "thread", "shutdown"]
    assert calls.count(made) == 1 and calls.index("second") < calls.index(made) < calls.index("shutdown")
    assert time.time() - started < 5
    assert len(reactor._pendingTimedCalls) == 1  # the minute's call; the 60 cancelled ones purged
    logged_failures = [(e["log_failure"].type, e.get("log_format")) for e in logged if e.get("log_failure") is not None]
    assert sorted(logged_failures, key=str) == [
        (RuntimeError, "Unexpected error in main loop"),
        (ZeroDivisionError, "while handling timed call"),
    ]
