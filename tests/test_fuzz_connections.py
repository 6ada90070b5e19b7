"""
Property tests (hypothesis) for whole connections: random and corrupted bytes
from a client, and from a backend, through the core's real
L{twistedproxy.core.client.ClientConnection} and
L{twistedproxy.core.server.ServerConnection} on in-memory transports and a fake
clock (as in L{tests.test_core}).

Client side: nothing raises out of C{dataReceived}; the parser never holds more
than a request's worth of bytes plus one read; and the connection never goes
silent with its framing lost: once the garbage is followed by enough filler to
finish any partial frame and a probe request, either the probe is answered or
the connection was closed (after its error reply).

Backend side: whatever a backend sends, every request in flight ends with a
reply (its own, or an error) by the pool's timeout at the latest, and nothing
raises out of C{dataReceived}.

Profiles and seeds as in L{tests.test_fuzz_codecs}.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from tests.test_fuzz_codecs import (  # noqa: F401 (_show_seed: the autouse fixture printing the seed)
    _show_seed,
    binary_packet,
    cuts,
    fuzz,
    mc_binary_reply,
    mc_binary_requests,
    mc_text_reply,
    mc_text_requests,
    redis_requests,
    REDIS_REPLY,
)
from twistedproxy.api import build_pool
from twistedproxy.config import config_from_dict
from twistedproxy.core.client import ProxyFactory
from twistedproxy.core.request import ProtocolError
from twistedproxy.protocols import memcache_binary, memcache_text, redis

PORTS = (7001, 7002, 7003)
MAX_REQUEST = 1024


class Recording:
    """A client parser that remembers the framing error it raised."""

    def __init__(self, parser, proxy):
        self.parser = parser
        self.proxy = proxy

    @property
    def codec(self):
        return self.parser.codec

    def feed(self, data):
        try:
            return self.parser.feed(data)
        except ProtocolError as e:
            self.proxy.framing_error = e.reply
            raise


class Proxy:
    """One pool (3 servers) on a fake reactor and one client on a StringTransport."""

    def __init__(self, redis_pool: bool, max_request_bytes: int = MAX_REQUEST):
        self.reactor = MemoryReactorClock()
        pool = {
            "listen": "127.0.0.1:22121",
            "redis": redis_pool,
            "servers": ["127.0.0.1:%d:1" % p for p in PORTS],
            "max_request_bytes": max_request_bytes,
            "timeout": 1000,
            "distribution": "modula",  # ketama's continuum costs 0.1 s per pool
        }
        self.pool = build_pool(config_from_dict({"fuzz": pool}).pools[0], self.reactor)
        self.client = ProxyFactory(self.pool).buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
        self.transport = StringTransport()
        self.client.makeConnection(self.transport)
        self.handled = 0  # reactor.tcpClients entries already connected or refused
        self.backends = []  # (protocol, transport) of accepted backend connections
        self.framing_error = None  # the reply of the ProtocolError that closed the client
        self.client.parser = Recording(self.client.parser, self)

    def parser_buffered(self) -> int:
        """Bytes the client's parser holds (a sniffing parser: the parser it chose)."""
        parser = self.client.parser.parser
        chosen = parser.__dict__.get("feed")  # a sniffing parser's choice: its bound feed
        if chosen is not None:
            parser = chosen.__self__
        if isinstance(parser, redis.RedisRequestParser):
            partial = parser._partial
            return parser._size + (partial[6] if partial is not None else 0)
        return parser.buffered()

    def closed(self) -> bool:
        return self.transport.disconnecting or self.client.quitting

    def send(self, data: bytes) -> None:
        """A read from the client, then the end of the reactor turn."""
        if self.closed():
            return  # a closed connection reads nothing more
        self.client.dataReceived(data)
        self.reactor.advance(0)

    def refuse(self) -> None:
        """Every backend connection attempt fails: the requests sent get error replies."""
        for _ in range(100):
            attempts = self.reactor.tcpClients[self.handled :]
            if not attempts:
                return
            for host, port, factory, _, _ in attempts:
                self.handled += 1
                factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
            self.reactor.advance(0)
        raise AssertionError("backend connection attempts do not stop")

    def accept(self) -> list:
        for host, port, factory, _, _ in self.reactor.tcpClients[self.handled :]:
            self.handled += 1
            protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
            transport = StringTransport()
            protocol.makeConnection(transport)
            self.backends.append((protocol, transport))
        return self.backends

    def answered(self) -> bool:
        """Every request the client sent has its reply written (or was dropped with the client)."""
        client = self.client
        return not client.queue and not client.held and (client.outstanding == 0 or self.transport.disconnecting)


# -- client bytes ---------------------------------------------------------------


@st.composite
def corrupted(draw, stream: bytes) -> bytes:
    """C{stream} with a few random flips, insertions, deletions or huge numbers."""
    data = bytearray(stream)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        how = draw(st.integers(0, 4))
        if how == 0 and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif how == 1:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif how == 2:
            del data[at : at + draw(st.integers(1, 16))]
        elif how == 3:  # a number far too long, where a length, count or number may start
            starts = [i + 1 for i, c in enumerate(data) if c in b"*$: "] or [0]
            at = starts[draw(st.integers(0, len(starts) - 1))]
            data[at:at] = b"9" * draw(st.sampled_from([20, 25, 5000]))
        else:
            data[at:at] = draw(st.sampled_from([b"\r\n", b"\n", b"*", b"$", b" ", b"\x80", b"-1", b"0"]))
    return bytes(data)


def client_stream(kind: str):
    """Random bytes, or a valid stream of the protocol with random corruption."""
    valid = {"redis": redis_requests(6), "text": mc_text_requests(6), "binary": mc_binary_requests(6)}[kind]
    first = {"redis": b"", "text": b"", "binary": b"\x80"}[kind]
    return st.one_of(
        st.binary(max_size=300).map(lambda b: first + b),
        valid.flatmap(lambda generated: corrupted(generated[0])),
    )


# What finishes any partial frame (no frame may need more than the request limit
# plus a header), and then a request whose reply is known.
REDIS_FILLER = b"\r\n" * (MAX_REQUEST // 2 + 64)
# DISCARD first: garbage may hold a MULTI, which the proxy refuses along with every command
# after it until EXEC or DISCARD (as Redis does inside a transaction with an error).
REDIS_PROBE = redis.multibulk([b"DISCARD"]) + redis.multibulk([b"ECHO", b"fuzz-probe-7d1c"])
REDIS_PROBE_REPLY = b"$15\r\nfuzz-probe-7d1c\r\n"
TEXT_FILLER = b"\r\n" * (MAX_REQUEST // 2 + 64)
TEXT_PROBE = b"mn\r\n"
TEXT_PROBE_REPLY = b"MN\r\n"
BINARY_FILLER = binary_packet(memcache_binary.NOOP) * (MAX_REQUEST // 24 + 8)
BINARY_PROBE = binary_packet(memcache_binary.NOOP, opaque=0x7D1C7D1C)
BINARY_PROBE_REPLY = memcache_binary.response(memcache_binary.NOOP, b"\x7d\x1c\x7d\x1c")

PROBES = {
    "redis": (REDIS_FILLER, REDIS_PROBE, REDIS_PROBE_REPLY),
    "text": (TEXT_FILLER, TEXT_PROBE, TEXT_PROBE_REPLY),
    "binary": (BINARY_FILLER, BINARY_PROBE, BINARY_PROBE_REPLY),
}

# The most a parser may hold after a read, besides that read: a request at the
# limit, or a command line at its own limit (Redis inline commands and length
# lines: 64 KB; memcached text lines: 8 KB, then a data block at the limit).
HOLD_LIMIT = {
    "redis": max(MAX_REQUEST, redis.INLINE_MAX_BYTES),
    "text": memcache_text.MAX_LINE_LENGTH + MAX_REQUEST + 2,
    "binary": memcache_binary.HEADER_LENGTH + MAX_REQUEST,
}


def check_client_garbage(kind: str, reads: list) -> None:
    proxy = Proxy(redis_pool=kind == "redis")
    for data in reads:
        proxy.send(data)  # nothing may raise
        proxy.refuse()
        if kind != "redis":  # the protocol the first byte chose (a corrupted one may pick the other)
            kind = "binary" if proxy.client.parser.codec is memcache_binary.codec else "text"
        assert proxy.parser_buffered() <= HOLD_LIMIT[kind] + len(data)
    assert proxy.answered()
    filler, probe, reply = PROBES[kind]
    if not proxy.closed():
        proxy.send(filler + probe)
        proxy.refuse()
        assert proxy.answered()
    written = proxy.transport.value()
    if proxy.closed():
        assert proxy.transport.disconnecting  # a close_after reply was written, then the close
        if proxy.framing_error:
            assert written.endswith(proxy.framing_error)
    else:
        assert written.endswith(reply), written[-200:]


@fuzz
@given(st.data())
def test_redis_client_garbage_ends_in_an_error_or_a_close(data):
    check_client_garbage("redis", data.draw(client_stream("redis").flatmap(cuts)))


@fuzz
@given(st.data())
def test_memcache_text_client_garbage_ends_in_an_error_or_a_close(data):
    check_client_garbage("text", data.draw(client_stream("text").flatmap(cuts)))


@fuzz
@given(st.data())
def test_memcache_binary_client_garbage_ends_in_an_error_or_a_close(data):
    check_client_garbage("binary", data.draw(client_stream("binary").flatmap(cuts)))


# -- backend bytes ----------------------------------------------------------------


REQUESTS = {
    "redis": redis_requests(6),
    "text": mc_text_requests(6),
    "binary": mc_binary_requests(6),
}
REPLIES = {
    "redis": st.lists(REDIS_REPLY, max_size=6).map(b"".join),
    "text": st.lists(mc_text_reply(), max_size=6).map(b"".join),
    "binary": st.lists(mc_binary_reply(), max_size=6).map(b"".join),
}


def backend_stream(kind: str):
    replies = REPLIES[kind]
    return st.one_of(st.binary(max_size=300), replies, replies.flatmap(corrupted))


def check_backend_garbage(kind: str, data) -> None:
    stream, _, config = data.draw(REQUESTS[kind])
    proxy = Proxy(redis_pool=kind == "redis", max_request_bytes=config.max_request_bytes)
    if kind == "redis" and config.redis_auth:
        stream = redis.multibulk([b"AUTH", b"secret"]) + stream
    # Every backend sends the same bytes, drawn up front: how many backends get
    # requests varies (ROUTE_ANY picks one at random).
    reads = data.draw(backend_stream(kind).flatmap(cuts))
    proxy.send(stream)
    backends = proxy.accept()
    proxy.reactor.advance(0)
    for protocol, transport in backends:
        for read in reads:
            if transport.disconnecting:
                break
            protocol.dataReceived(read)  # nothing may raise
            proxy.reactor.advance(0)
    proxy.reactor.advance(1.001)  # past the pool's timeout: a reply still missing is an error
    proxy.refuse()  # connections the proxy replaced: refused
    assert proxy.answered()
    for protocol, transport in backends:  # then every backend closes (or was closed)
        protocol.connectionLost(Failure(ConnectionLost()))
        proxy.reactor.advance(0)
    proxy.refuse()
    assert proxy.answered()


@fuzz
@given(st.data())
def test_redis_backend_garbage_answers_every_request(data):
    check_backend_garbage("redis", data)


@fuzz
@given(st.data())
def test_memcache_text_backend_garbage_answers_every_request(data):
    check_backend_garbage("text", data)


@fuzz
@given(st.data())
def test_memcache_binary_backend_garbage_answers_every_request(data):
    check_backend_garbage("binary", data)
