"""
RESP3 clients of a Redis pool (C{HELLO 3}): their codec and the proxy's own
RESP3 replies.

A client that sends C{HELLO 3} speaks RESP3 from the next request on, and
C{HELLO 2} takes it back to RESP2; the request parser says so with a
switching request (L{twistedproxy.core.request.switching}), so the requests
before the switch keep their codec even when they wait to be sent.  The
RESP3 codec of a Redis codec (L{resp3_of}) is the same codec with one more
request in its backend handshake, C{HELLO 3}: the core keeps backend
connections per codec (L{twistedproxy.core.servers.Server.connection}), so a
server gets a second set of connections, made when its first RESP3 request
comes, that speak RESP3 to Redis.  Replies on them are already what a RESP3
client expects and are forwarded raw, never converted; merged multi-key
replies are too (MGET's array holds RESP3 nulls, C{_}, as the backends sent
them; DEL/EXISTS sums and MSET's +OK are the same in both protocols).

What the proxy answers itself is the same bytes in both protocols (+PONG,
+OK, bulk strings, errors), except HELLO's reply: a flat array in RESP2, a
map in RESP3 (L{hello_reply}).

Push messages (C{>}) are not supported: the commands that make Redis send
them (SUBSCRIBE and the other pub/sub commands, CLIENT TRACKING, MONITOR) are
refused, so a shared backend connection never carries one; should one come
all the same, the reply parser takes it for a protocol error (it answers no
request, and the order of replies is all that ties them to requests): the
connection is closed and its requests get error replies.  Attribute replies
(C{|}) are framed with the reply they precede and forwarded with it.
"""

from __future__ import annotations

import copy
import weakref

from twistedproxy._version import __version__
from twistedproxy.core.request import Request

PROTOCOLS = (2, 3)  # what HELLO accepts; other versions get -NOPROTO

_HELLO_3 = b"*2\r\n$5\r\nHELLO\r\n$1\r\n3\r\n"


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def hello_reply(protocol: int) -> bytes:
    """
    HELLO's reply in C{protocol}, with Redis 7's fields and the proxy's
    values: a map in RESP3, the same pairs as a flat array in RESP2.
    """
    fields = (
        (b"server", _bulk(b"twistedproxy")),
        (b"version", _bulk(__version__.encode())),
        (b"proto", b":%d\r\n" % protocol),
        (b"id", b":0\r\n"),
        (b"mode", _bulk(b"proxy")),
        (b"role", _bulk(b"master")),
        (b"modules", b"*0\r\n"),
    )
    head = b"%%%d\r\n" % len(fields) if protocol == 3 else b"*%d\r\n" % (2 * len(fields))
    return head + b"".join(_bulk(name) + value for name, value in fields)


class _Resp3:
    """What a Redis codec's RESP3 variant does differently (mixed in first)."""

    protocol = 3

    def handshake(self, pool_config) -> list:
        """The Redis codec's handshake (AUTH, SELECT ...), then C{HELLO 3}: it must come after AUTH."""
        return super().handshake(pool_config) + [Request(_HELLO_3, b"hello")]

    def reply_failed(self, raw: bytes) -> bool:
        return raw[:1] == b"-" or raw[:1] == b"!"  # RESP3 has blob errors too


_variants = weakref.WeakKeyDictionary()


def resp3_of(codec):
    """
    The RESP3 variant of the Redis codec C{codec} (one per codec, made once):
    every method is C{codec}'s class's but the handshake, which adds C{HELLO 3}.
    """
    variant = _variants.get(codec)
    if variant is None:
        cls = type(codec)
        variant = copy.copy(codec)  # whatever state the codec holds, shared
        variant.__class__ = type(cls.__name__ + "Resp3", (_Resp3, cls), {})
        _variants[codec] = variant
    return variant
