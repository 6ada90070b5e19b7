"""
The turn flusher: one flush per connection per reactor turn, backend
connections before clients, and lists whose shape stays the same from turn to
turn (on PyPy the JIT checks a list's storage).
"""

from __future__ import annotations

import sys

import pytest
from twisted.internet.testing import MemoryReactorClock

from twistedproxy.core.batching import TurnFlusher


class Conn:
    """A connection that records its flushes in a shared log and may do something when flushed."""

    def __init__(self, name: str, log: list, on_flush=None):
        self.name = name
        self.log = log
        self.on_flush = on_flush

    def flush(self):
        self.log.append(self.name)
        if self.on_flush is not None:
            self.on_flush()


def test_connections_are_flushed_once_at_the_end_of_the_turn_backends_first():
    reactor = MemoryReactorClock()
    flusher = TurnFlusher(reactor)
    log = []
    flusher.add_clients([Conn("client a", log)])
    flusher.add([Conn("backend 1", log), Conn("backend 2", log)])
    flusher.add_clients([Conn("client b", log)])
    assert log == []
    assert len(reactor.getDelayedCalls()) == 1  # one run for the turn, however many adds
    reactor.advance(0)
    assert log == ["backend 1", "backend 2", "client a", "client b"]
    reactor.advance(0)
    assert log == ["backend 1", "backend 2", "client a", "client b"]  # flushed once


def test_nothing_to_flush_schedules_nothing():
    reactor = MemoryReactorClock()
    flusher = TurnFlusher(reactor)
    flusher.add([])
    flusher.add_clients([])
    assert reactor.getDelayedCalls() == []


def test_a_connection_added_by_a_flush_waits_for_the_next_run():
    reactor = MemoryReactorClock()
    flusher = TurnFlusher(reactor)
    log = []
    late = Conn("backend late", log)
    # A client's flush sends its held requests: their backend connection is added.
    flusher.add_clients([Conn("client", log, on_flush=lambda: flusher.add([late]))])
    flusher.run()  # the turn's run
    assert log == ["client"]
    assert len(reactor.getDelayedCalls()) == 2  # the turn's own (called by hand here) and the next
    reactor.advance(0)
    assert log == ["client", "backend late"]
    assert reactor.getDelayedCalls() == []


def test_a_flush_that_raises_leaves_the_flusher_working():
    reactor = MemoryReactorClock()
    flusher = TurnFlusher(reactor)
    log = []

    def fail():
        raise RuntimeError("flush failed")

    flusher.add([Conn("backend bad", log, on_flush=fail)])
    flusher.add_clients([Conn("client a", log)])
    with pytest.raises(RuntimeError):
        flusher.run()
    assert flusher.backends is not flusher.clients
    # The clients not reached wait for the next run, which the next add schedules.
    flusher.add([Conn("backend 2", log)])
    reactor.advance(0)
    assert log == ["backend bad", "backend 2", "client a"]
    assert flusher.backends == [] and flusher.clients == []
    assert len({id(flusher.backends), id(flusher.clients), id(flusher._spare)}) == 3


@pytest.mark.skipif(sys.implementation.name != "pypy", reason="list storage strategies are PyPy's")
def test_the_lists_keep_their_object_storage_through_turns():
    from __pypy__ import strategy

    reactor = MemoryReactorClock()
    flusher = TurnFlusher(reactor)
    log = []
    for _ in range(3):
        assert {strategy(flusher.backends), strategy(flusher.clients)} == {"ObjectListStrategy"}
        flusher.add([Conn("backend", log)])
        flusher.add_clients([Conn("client", log)])
        reactor.advance(0)
    assert {strategy(flusher.backends), strategy(flusher.clients)} == {"ObjectListStrategy"}
