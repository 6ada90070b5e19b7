"""Unit tests of the process model's parts: channel arguments, accept mutex, listeners, levels."""

from __future__ import annotations

import os
import socket
import sys
import tempfile

import pytest
from twisted.internet.protocol import ServerFactory
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel

from twistedproxy.config import ListenSpec
from twistedproxy.process import accept_mutex, channel
from twistedproxy.logs import parse_level
from twistedproxy.net.sockets import adopt_port, bind_socket
from twistedproxy.process.listeners import INHERIT_ENV, inherited_sockets, is_slot_key, reuseport_migration, socket_key
from twistedproxy.stats.server import stats_key


def test_big_unicode_survives_the_amp_value_limit():
    text = "é" * 70000 + "end"
    box = channel.Reconfigure.makeArguments({"config": text, "source": "x.yml"}, None)
    assert all(len(value) <= 65535 for value in box.values())
    assert channel.Reconfigure.parseArguments(box, None) == {"config": text, "source": "x.yml"}
    empty = channel.Reconfigure.makeArguments({"config": "", "source": ""}, None)
    assert channel.Reconfigure.parseArguments(empty, None)["config"] == ""


class FakePort:
    def __init__(self):
        self.reading = True

    def startReading(self):
        self.reading = True

    def stopReading(self):
        self.reading = False


@pytest.fixture
def mutex_fd():
    fd = accept_mutex.create_file()
    yield fd
    os.close(fd)


def make_mutex(fd, slot, count):
    reactor = MemoryReactorClock()
    ports = [FakePort()]
    state = {"count": count}
    mutex = accept_mutex.AcceptMutex(reactor, fd, slot, lambda: ports, lambda: state["count"])
    return mutex, reactor, ports, state


def test_accept_mutex_holder_reads_and_gives_way_to_emptier_workers(mutex_fd):
    busy, busy_reactor, busy_ports, busy_state = make_mutex(mutex_fd, 0, 0)
    idle, _, _, _ = make_mutex(mutex_fd, 1, 0)
    idle.start()
    busy.start()
    # (POSIX locks are per process, so both hold it here; workers are processes.)
    assert busy.held and busy_ports[0].reading
    # Accepting past 7/8 of the mean + 1 while another worker has fewer: give way.
    busy.accepted()
    assert busy.held
    busy.accepted()
    assert not busy.held and busy_ports[0].reading is False
    # Stays out while over the line; competes again once the others caught up.
    busy_state["count"] = 2
    busy_reactor.advance(accept_mutex.INTERVAL)
    assert not busy.held
    idle._publish(2)
    busy_reactor.advance(accept_mutex.INTERVAL)
    assert busy.held and busy_ports[0].reading
    # A holder that accepted gives the lock up at the next tick.
    busy.accepted()
    busy_reactor.advance(accept_mutex.INTERVAL)
    assert not busy.held
    busy.stop()
    accept_mutex.clear_slot(mutex_fd, 1)
    assert not busy._over()  # alone in the table


def test_socket_keys_and_inherited_sockets():
    spec = ListenSpec(host="127.0.0.1", port=1234)
    assert socket_key(spec, None) == "127.0.0.1:1234#shared"
    assert socket_key(spec, 2) == "127.0.0.1:1234#2"
    sock = bind_socket(ListenSpec(host="127.0.0.1", port=0), 8)
    fd = os.dup(sock.fileno())
    try:
        found = inherited_sockets({INHERIT_ENV: "a#0=%d;junk;b#1=notanfd" % fd})
        assert list(found) == ["a#0"]
        assert found["a#0"].getsockname() == sock.getsockname()
        found["a#0"].close()
    finally:
        sock.close()


def test_adopting_a_shared_socket_never_makes_it_blocking():
    # Another process accepting on the socket meanwhile (an old worker during an
    # upgrade) would hang in accept(): watch the flag at every Python-level step.
    sock = bind_socket(ListenSpec(host="127.0.0.1", port=0), 8, reuseport=True)
    fd = os.dup(sock.fileno())
    seen = []

    def watch(frame, event, arg):
        seen.append(os.get_blocking(sock.fileno()))
        return watch

    reactor = MemoryReactorClock()
    sys.settrace(watch)
    try:
        inherited = inherited_sockets({INHERIT_ENV: "a#0=%d" % fd})["a#0"]
        port = adopt_port(reactor, inherited.fileno(), ServerFactory())
    finally:
        sys.settrace(None)
    port.stopListening()
    reactor.advance(0)
    inherited.close()
    sock.close()
    assert seen and not any(seen)


def test_adopted_unix_port_leaves_the_path_to_the_master():
    path = tempfile.mktemp(prefix="tp-adopt-", suffix=".sock")
    sock = bind_socket(ListenSpec(path=path, perm=0o600), 8)
    reactor = MemoryReactorClock()
    try:
        port = adopt_port(reactor, sock.fileno(), ServerFactory(), one_accept=True)
        assert os.get_blocking(sock.fileno()) is False
        port.stopListening()
        reactor.advance(0)
        assert os.path.exists(path)
    finally:
        sock.close()
        os.unlink(path)


def test_parse_level():
    assert parse_level("debug") is LogLevel.debug
    assert parse_level("WARNING") is LogLevel.warn
    assert parse_level("11") is LogLevel.debug
    with pytest.raises(ValueError):
        parse_level("loud")


def test_tcp_sockets_of_the_master_share_a_port():
    first = bind_socket(ListenSpec(host="127.0.0.1", port=0), 8, reuseport=True)
    try:
        port = first.getsockname()[1]
        second = bind_socket(ListenSpec(host="127.0.0.1", port=port), 8, reuseport=True)
        second.close()
    finally:
        first.close()
    assert socket.SO_REUSEPORT


def test_slot_keys_and_the_reuseport_migration_setting(tmp_path):
    tcp = ListenSpec(host="127.0.0.1", port=22121)
    assert is_slot_key(socket_key(tcp, 3))
    assert not is_slot_key(socket_key(tcp, None))
    assert not is_slot_key(stats_key("http", tcp))
    sysctl = tmp_path / "tcp_migrate_req"
    sysctl.write_text("0\n")
    assert reuseport_migration(str(sysctl)) is False
    sysctl.write_text("1\n")
    assert reuseport_migration(str(sysctl)) is True
    assert reuseport_migration(str(tmp_path / "absent")) is None


class _Channel:
    """A worker's end of the master channel that answers every push with C{answer}."""

    def __init__(self, answer):
        self.answer = answer

    def callRemote(self, command, **kwargs):
        from twisted.internet import defer

        if isinstance(self.answer, Exception):
            return defer.fail(self.answer)
        return defer.succeed(self.answer)


class _Worker:
    hello = True
    state = "ready"

    def __init__(self, pid, answer):
        self.pid = pid
        self.channel = _Channel(answer)


@pytest.mark.parametrize("answer, expected", [
    ({"ok": False, "error": "no such pool"}, "worker 102 refused the configuration: no such pool"),
    (ConnectionError("channel lost"), "worker 102 could not apply the configuration: channel lost"),
])
def test_a_reload_that_a_worker_did_not_apply_is_a_failed_reload(tmp_path, answer, expected):
    """Scripts rely on it (cacheproxyctl reload exits 1): one worker's failure fails the reload."""
    from twistedproxy.process.master import MasterService

    path = tmp_path / "conf.yml"
    path.write_text("global:\n  worker_processes: 2\nmc:\n  listen: 127.0.0.1:1\n  servers:\n   - 127.0.0.1:2:1\n")
    master = MasterService(None, {"conf-file": str(path)}, reactor=MemoryReactorClock())
    master.supervisor.workers = {0: _Worker(101, {"ok": True, "error": ""}), 1: _Worker(102, answer)}
    results = []
    master.reload().addCallback(results.append)
    assert results == [(False, expected)]
    assert master.last_reload["ok"] is False and master.last_reload["error"] == expected
    master.workers[1].channel.answer = {"ok": True, "error": ""}
    master.reload().addCallback(results.append)
    assert results[-1] == (True, "")
