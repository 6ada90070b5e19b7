"""
A client connection's hand-off parts (core/client.py, the parsers' state):
freezing, draining, exporting and adopting, on StringTransports.
"""

from __future__ import annotations

import json

import pytest

from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from tests.support.resp import cmd
from tests.test_core import Harness
from twistedproxy.config import config_from_dict
from twistedproxy.protocols import memcache


def test_a_frozen_client_reads_nothing_more_and_drains_once_answered():
    h = Harness()
    client, transport = h.client()
    key = h.key_on(h.config.pools[0].servers[0].port)
    client.dataReceived(cmd(b"GET", key))
    backend = h.accept()[h.config.pools[0].servers[0].port]
    client.freeze()
    assert transport.producerState == "paused"
    assert not client.drained()
    backend.answer()
    assert transport.value().endswith(b"$-1\r\n")
    assert client.drained()
    assert transport.producerState == "paused"  # answering does not resume reading


def test_state_and_unparsed_bytes_carry_over_to_an_adopted_connection():
    h = Harness(redis_auth="secret")
    client, transport = h.client()
    client.dataReceived(cmd(b"AUTH", b"secret") + b"*2\r\n$3\r\nGET\r\n$3\r\nk")
    assert transport.value() == b"+OK\r\n"
    state = json.loads(json.dumps(client.export_state()))  # JSON-safe
    accepted = h.pool.stats.clients_accepted
    adopted = h.factory.adopt()
    second = StringTransport()
    adopted.makeConnection(second)
    adopted.import_state(state)
    assert h.pool.stats.clients_accepted == accepted  # not a new connection
    adopted.dataReceived(b"ey\r\n")
    h.reactor.advance(0)
    backend = next(iter(h.accept().values()))
    assert backend.pending()[-1] == [b"GET", b"key"]  # authenticated, the cut frame completed

    eof = h.pool.stats.client_eof
    client.handed_off()
    client.connectionLost(Failure(ConnectionDone()))
    assert h.pool.stats.client_eof == eof and transport._shouldShutdown is False


def test_an_unauthenticated_connection_stays_locked_after_adoption():
    h = Harness(redis_auth="secret")
    client, _ = h.client()
    adopted = h.factory.adopt()
    transport = StringTransport()
    adopted.makeConnection(transport)
    adopted.import_state(client.export_state())
    adopted.dataReceived(cmd(b"GET", b"k"))
    assert transport.value().startswith(b"-NOAUTH")


def test_the_sniffed_memcached_protocol_carries_over():
    pool = config_from_dict({"m": {"listen": "127.0.0.1:1", "servers": ["127.0.0.1:2:1"]}}).pools[0]
    parser = memcache.SniffingRequestParser(pool)
    parser.feed(b"\x80\x0a\x00\x00")  # the start of a binary NOOP header
    fresh = memcache.SniffingRequestParser(pool)
    fresh.restore(json.loads(json.dumps(parser.state())))
    assert fresh.codec is memcache.binary_codec
    assert parser.unparsed() == b"\x80\x0a\x00\x00"
    assert len(fresh.feed(parser.unparsed() + b"\x00" * 20)) == 1


def _refusing_supported() -> bool:
    h = Harness()
    client, _ = h.client()
    return hasattr(client.parser, "_refusing")


@pytest.mark.skipif(not _refusing_supported(), reason="this Redis codec keeps no refused-transaction state")
def test_a_refused_transaction_stays_refused_after_adoption():
    h = Harness(transaction_connections=0)  # transactions off: MULTI is refused
    client, transport = h.client()
    client.dataReceived(cmd(b"MULTI"))
    assert transport.value().startswith(b"-ERR")
    adopted = h.factory.adopt()
    second = StringTransport()
    adopted.makeConnection(second)
    adopted.import_state(json.loads(json.dumps(client.export_state())))
    adopted.dataReceived(cmd(b"SET", b"k", b"1") + cmd(b"EXEC"))
    assert h.attempts() == [] and not h.backends  # nothing reached a backend
    assert second.value().endswith(b"-EXECABORT Transaction discarded because of previous errors.\r\n")
