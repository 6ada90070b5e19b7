"""
RESP3 clients (L{twistedproxy.protocols.resp3}) on in-memory transports and a
fake clock: the reply parser on every RESP3 type, HELLO's replies, the RESP3
codec's handshake, and protocol switches within one pipeline through the core.
"""

from __future__ import annotations

import json

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from twistedproxy.config import ListenSpec, PoolConfig
from twistedproxy.core.request import ROUTE_LOCAL
from twistedproxy.protocols import resp3
from twistedproxy.protocols.redis import codec
from tests.support.resp import cmd
from tests.test_core import Backend, Harness

# -- the reply parser --------------------------------------------------------------
# Every RESP3 type, whole, cut at every point and byte by byte: test_redis_codec.py's
# REPLIES (a push is a protocol error: its test_bad_replies); at random:
# test_fuzz_codecs.py's RESP3_REPLY.


# -- HELLO and the codec --------------------------------------------------------------


def pool(**keys):
    return PoolConfig(name="p", listen=ListenSpec(host="127.0.0.1", port=1), redis=True, **keys)


def test_hello_replies_are_redis_7_shapes():
    two, three = resp3.hello_reply(2), resp3.hello_reply(3)
    pairs = two[len(b"*14\r\n"):]
    assert two.startswith(b"*14\r\n") and three.startswith(b"%7\r\n")
    assert three[len(b"%7\r\n"):] == pairs.replace(b"proto\r\n:2\r\n", b"proto\r\n:3\r\n")
    assert b"$6\r\nserver\r\n$12\r\ntwistedproxy\r\n" in three
    assert b"$4\r\nmode\r\n$5\r\nproxy\r\n$4\r\nrole\r\n$6\r\nmaster\r\n$7\r\nmodules\r\n*0\r\n" in three
    for reply in (two, three):  # one well-framed reply each
        parser = codec.reply_parser()
        parser.feed(reply)
        assert parser.next_reply(None) == reply


def test_the_resp3_codec_adds_hello_3_to_the_handshake():
    variant = resp3.resp3_of(codec)
    assert resp3.resp3_of(codec) is variant and variant.protocol == 3 and codec.protocol == 2
    frames = [r.frame for r in variant.handshake(pool(redis_auth="pw", redis_db=3))]
    assert frames == [cmd("AUTH", "pw"), cmd("SELECT", "3"), cmd("HELLO", "3")]
    assert [r.frame for r in variant.handshake(pool())] == [cmd("HELLO", "3")]
    assert variant.handshake_error(resp3.hello_reply(3)) is None
    assert variant.reply_failed(b"!3\r\nERR\r\n") and variant.reply_failed(b"-ERR\r\n")
    assert not variant.reply_failed(b"_\r\n")


def test_the_parser_switches_codec_after_a_hello_and_says_so():
    parser = codec.request_parser(pool())
    variant = resp3.resp3_of(codec)
    requests = parser.feed(cmd("GET", "a") + cmd("HELLO", "3") + cmd("GET", "b") + cmd("HELLO", "3"))
    assert parser.codec is codec  # the batch's first request's codec
    assert [r.switch_to for r in requests] == [None, variant, None, None]  # a HELLO 3 on RESP3 switches nothing
    assert requests[1].route == ROUTE_LOCAL and requests[1].reply == resp3.hello_reply(3)
    assert requests[3].reply == resp3.hello_reply(3)
    requests = parser.feed(cmd("HELLO") + cmd("HELLO", "2"))
    assert parser.codec is variant
    assert requests[0].switch_to is None and requests[0].reply == resp3.hello_reply(3)
    assert requests[1].switch_to is codec and requests[1].reply == resp3.hello_reply(2)
    parser.feed(cmd("HELLO", "3"))
    state = json.loads(json.dumps(parser.state()))  # what a hand-off carries
    assert state["protocol"] == 3
    other = codec.request_parser(pool())
    other.restore(state)
    (request,) = other.feed(cmd("HELLO"))
    assert other.codec is variant and request.reply == resp3.hello_reply(3)


def test_a_failed_hello_switches_nothing():
    parser = codec.request_parser(pool(redis_auth="pw"))
    requests = parser.feed(
        cmd("HELLO", "3") + cmd("HELLO", "3", "AUTH", "default", "bad") + cmd("HELLO", "4") + cmd("HELLO", "x")
        + cmd("HELLO", "3", "AUTH", "default", "pw")
    )
    assert [r.switch_to for r in requests] == [None] * 4 + [resp3.resp3_of(codec)]
    assert [r.reply[:8] for r in requests[:4]] == [b"-NOAUTH ", b"-ERR inv", b"-NOPROTO", b"-ERR Pro"]


# -- switches through the core --------------------------------------------------------


class Resp3Backend(Backend):
    """A fake backend connection that speaks RESP3 once it got HELLO 3."""

    resp3 = False

    def reply(self, args) -> bytes:
        name = args[0].lower()
        if name == b"hello":
            self.resp3 = args[1] == b"3"
            return resp3.hello_reply(3)
        raw = Backend.reply(self, args)
        if self.resp3:
            raw = raw.replace(b"$-1\r\n", b"_\r\n")
        return raw


def accept_all(h) -> list:
    """Complete every pending connection attempt: the new backends, RESP3 ones told apart by their handshake."""
    made = []
    for host, port, factory in h.attempts():
        h.handled += 1
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = StringTransport()
        protocol.makeConnection(transport)
        made.append(Resp3Backend(port, protocol, transport, h.reactor))
    return made


def test_a_switch_in_one_pipeline_keeps_each_reply_in_its_protocol():
    h = Harness(servers=(7001,))
    c, t = h.client()
    c.dataReceived(cmd("GET", "a") + cmd("HELLO", "3") + cmd("GET", "a") + cmd("HELLO", "2") + cmd("GET", "a"))
    (resp2,) = accept_all(h)
    assert resp2.pending() == [[b"GET", b"a"]]
    assert h.attempts() == []  # the requests after the switch wait for the one before it
    resp2.answer()
    assert t.value() == b"$-1\r\n" + resp3.hello_reply(3)
    (resp3_backend,) = accept_all(h)
    assert resp3_backend.pending() == [[b"HELLO", b"3"], [b"GET", b"a"]]
    assert resp2.pending() == []  # the last GET waits behind the RESP3 one
    resp3_backend.answer()
    assert t.value() == b"$-1\r\n" + resp3.hello_reply(3) + b"_\r\n" + resp3.hello_reply(2)
    assert resp2.pending() == [[b"GET", b"a"]]
    resp2.answer()
    assert t.value().endswith(resp3.hello_reply(2) + b"$-1\r\n")


def test_requests_held_before_a_switch_keep_their_protocol():
    h = Harness(servers=(7001,))
    c, t = h.client()
    c.pauseProducing()  # a full write buffer: requests are held
    c.dataReceived(cmd("GET", "a") + cmd("HELLO", "3") + cmd("GET", "b") + cmd("MGET", "a", "b"))
    assert h.attempts() == []
    c.resumeProducing()
    h.reactor.advance(0)
    (resp2,) = accept_all(h)
    assert resp2.pending() == [[b"GET", b"a"]]
    resp2.answer()
    (resp3_backend,) = accept_all(h)
    assert resp3_backend.pending() == [[b"HELLO", b"3"], [b"GET", b"b"], [b"MGET", b"a", b"b"]]
    resp3_backend.answer()
    assert t.value() == b"$-1\r\n" + resp3.hello_reply(3) + b"_\r\n" + b"*2\r\n_\r\n_\r\n"


def test_merged_replies_and_errors_for_a_resp3_client():
    h = Harness()
    c, t = h.client()
    a, b, x = h.key_on(7001, "a"), h.key_on(7002, "b"), h.key_on(7003, "x")
    c.dataReceived(cmd("HELLO", "3"))
    t.clear()
    c.dataReceived(cmd("MSET", a, "A", b, "B") + cmd("MGET", a, x, b) + cmd("EXISTS", a, b, x) + cmd("DEL", a, x))
    backends = {backend.port: backend for backend in accept_all(h)}
    for backend in backends.values():
        assert backend.pending()[0] == [b"HELLO", b"3"]
        backend.answer()
    assert t.value() == b"+OK\r\n" + b"*3\r\n$1\r\nA\r\n_\r\n$1\r\nB\r\n" + b":2\r\n" + b":1\r\n"
    t.clear()
    c.dataReceived(cmd("MGET", a, b) + cmd("GET", a) + cmd("PING"))
    backends[7002].answer()
    backends[7001].protocol.connectionLost(Failure(ConnectionLost()))
    assert t.value() == b"-ERR Connection reset by peer\r\n-ERR Connection reset by peer\r\n+PONG\r\n"


def test_a_quit_after_a_waiting_switch_still_closes_once_answered():
    h = Harness(servers=(7001,), timeout=100)
    c, t = h.client()
    c.dataReceived(cmd("GET", "a") + cmd("HELLO", "3") + cmd("QUIT"))
    accept_all(h)
    h.reactor.advance(0.2)  # the GET times out
    assert t.value() == b"-ERR Connection timed out\r\n" + resp3.hello_reply(3) + b"+OK\r\n"
    assert t.disconnecting and not c.held and not c.queue


def test_a_request_sent_in_slices_before_a_switch_keeps_its_protocol():
    h = Harness(servers=(7001,))
    c, t = h.client()
    keys = [b"k%d" % i for i in range(1300)]  # three slices
    c.dataReceived(cmd("MGET", *keys) + cmd("HELLO", "3") + cmd("GET", "a"))
    for _ in range(4):
        h.reactor.advance(0)  # a slice per reactor turn
    (resp2,) = accept_all(h)
    assert [len(args) - 1 for args in resp2.pending()] == [512, 512, 276]
    resp2.answer()
    (resp3_backend,) = accept_all(h)
    assert resp3_backend.pending() == [[b"HELLO", b"3"], [b"GET", b"a"]]
    resp3_backend.answer()
    assert t.value() == b"*1300\r\n" + b"$-1\r\n" * 1300 + resp3.hello_reply(3) + b"_\r\n"
