"""
The spare's channel before AMP, on a real socketpair and an in-memory
reactor: the spare warms up and says so, the master gives a slot only then,
and the slot's layout arrives with its sockets placed; a master that closes the
channel stops the spare; a spare stopping is not a lost channel.
"""

from __future__ import annotations

import os
import socket

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from twistedproxy.process import spare

CONFIG = "mc:\n  listen: 127.0.0.1:22121\n  servers:\n   - 127.0.0.1:11211:1\n"


def test_placed_puts_the_descriptors_where_the_worker_has_them():
    layout = {"slot": 1, "listen": {"a": 0, "b": 1}, "mutex": 2}
    assert spare.placed(layout, [7, 9, 12]) == {"slot": 1, "listen": {"a": 7, "b": 9}, "mutex": 12}
    assert spare.placed({"listen": {"a": 0}, "mutex": None}, [5]) == {"listen": {"a": 5}, "mutex": None}


@pytest.fixture
def pair():
    master, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield master, child
    master.close()
    child.close()


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "conf.yml"
    path.write_text(CONFIG)
    return str(path)


def standby(child, config_path):
    """
    A started L{spare.Standby} on C{child}'s descriptor, its reactor, its
    warm-ups (config, Deferred) and the layouts it took.
    """
    reactor = MemoryReactorClock()
    reactor.running = True
    warmups, taken = [], []

    def warm_up(config):
        d = Deferred()
        warmups.append((config, d))
        return d

    waiting = spare.Standby(reactor, {"channel": child.fileno(), "config": config_path}, taken.append, warm_up)
    waiting.start()
    return reactor, waiting, warmups, taken


def test_the_master_gives_the_slot_once_the_spare_is_warm_and_its_sockets_arrive_placed(pair, config_file):
    master, child = pair
    reactor, waiting, warmups, taken = standby(child, config_file)
    channel = spare.SpareChannel(master)
    # Warming up on the file's pools: not warm, not reading its channel yet.
    [(config, warming)] = warmups
    assert [pool.name for pool in config.pools] == ["mc"] and not reactor.readers
    assert channel.warm() is False
    warming.callback(None)
    assert channel.warm() is True and channel.warm() is True  # heard once, remembered
    assert reactor.readers == {waiting}

    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    try:
        layout = {"slot": 3, "listen": {"mc": 0}, "mutex": None, "replacing": True}
        assert channel.give(layout, [listening.fileno()]) is master
        waiting.doRead()
        [got] = taken
        assert (got["slot"], got["replacing"], got["mutex"]) == (3, True, None)
        fd = got["listen"]["mc"]
        assert fd != listening.fileno() and os.fstat(fd).st_ino == os.fstat(listening.fileno()).st_ino
        os.close(fd)
    finally:
        listening.close()
    assert not reactor.readers and reactor.running  # AMP speaks on the channel next
    master.sendall(b"after")
    assert child.recv(10) == b"after"


def test_a_file_that_does_not_load_skips_the_warm_up_and_the_spare_is_warm(pair, tmp_path):
    master, child = pair
    reactor, waiting, warmups, taken = standby(child, str(tmp_path / "absent.yml"))
    assert warmups == [] and spare.SpareChannel(master).warm() is True and reactor.readers == {waiting}


def test_a_failed_warm_up_still_says_warm(pair, config_file):
    master, child = pair
    reactor, waiting, warmups, taken = standby(child, config_file)
    warmups[0][1].errback(RuntimeError("boom"))
    assert spare.SpareChannel(master).warm() is True


def test_a_master_that_closes_the_channel_stops_the_spare(pair, tmp_path):
    master, child = pair
    reactor, waiting, warmups, taken = standby(child, str(tmp_path / "absent.yml"))
    assert master.recv(10) == spare.WARM
    master.close()
    waiting.doRead()
    assert taken == [] and reactor.hasStopped and not reactor.readers


def test_a_spare_that_closed_its_channel_cannot_take_a_slot(pair):
    master, child = pair
    child.close()
    with pytest.raises(OSError):
        spare.SpareChannel(master).warm()


@pytest.mark.parametrize("stopping", [False, True])
def test_the_channel_lost_is_a_failure_unless_the_spare_is_stopping(pair, tmp_path, stopping):
    """
    A stopping reactor disconnects what it still reads (the spare's channel):
    the spare stopped by its master logs no failure; a channel lost while it
    runs does.
    """
    master, child = pair
    reactor, waiting, warmups, taken = standby(child, str(tmp_path / "absent.yml"))
    logged = []
    globalLogPublisher.addObserver(logged.append)
    try:
        if stopping:  # the shutdown's "before" triggers (the in-memory reactor only records them)
            for trigger, args, kwargs in reactor.triggers["before"]["shutdown"]:
                trigger(*args, **kwargs)
        waiting.connectionLost(Failure(ConnectionLost()))
    finally:
        globalLogPublisher.removeObserver(logged.append)
    failures = [e for e in logged if e.get("log_failure") is not None]
    assert len(failures) == (0 if stopping else 1)
    assert reactor.hasStopped
