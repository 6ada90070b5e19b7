"""
Property tests (hypothesis) for every codec's parsers: a valid stream of
requests or replies frames the same whether it arrives whole or cut into
arbitrary reads.

The generators here (valid request and reply streams of each protocol) are shared
with L{tests.test_fuzz_connections}, which feeds random and corrupted bytes
through whole client and backend connections.

Examples are bounded by a hypothesis profile so the suite stays fast: "fuzz"
(the default, 200 examples per property, 40 under PyPy) or "fuzz-long" (25 times
as many) chosen with C{TWISTEDPROXY_FUZZ_PROFILE=fuzz-long}.  Each run draws a fresh seed (printed
with a failing test's output, and fixed with C{TWISTEDPROXY_FUZZ_SEED=N}); a
failure also prints a C{@reproduce_failure} blob.
"""

from __future__ import annotations

import base64
import os
import platform
import random
import struct

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from tests.test_memcache_text import summary as request_summary
from twistedproxy.config.model import ListenSpec, PoolConfig
from twistedproxy.core.request import ProtocolError
from twistedproxy.protocols import memcache, memcache_binary, memcache_text, redis

# Hypothesis's own engine runs several times slower under PyPy; the codecs are the
# same Python code there, so PyPy runs fewer examples of each property.
EXAMPLES = 40 if platform.python_implementation() == "PyPy" else 200

settings.register_profile(
    "fuzz",
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=False,
    database=None,  # nothing written into the checkout; the seed and blob reproduce a failure
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("fuzz-long", settings.get_profile("fuzz"), max_examples=25 * EXAMPLES)
settings.load_profile(os.environ.get("TWISTEDPROXY_FUZZ_PROFILE", "fuzz"))

SEED = int(os.environ.get("TWISTEDPROXY_FUZZ_SEED") or random.SystemRandom().randrange(2**32))


def fuzz(test):
    """A property test run with this session's seed (shown with a failure's captured output)."""
    return seed(SEED)(test)


@pytest.fixture(autouse=True)
def _show_seed():
    print("hypothesis seed: TWISTEDPROXY_FUZZ_SEED=%d" % SEED)
    yield


# -- helpers ------------------------------------------------------------------------

LARGE = 512 * 1024 * 1024


def redis_pool(max_request_bytes=LARGE, redis_auth=None) -> PoolConfig:
    return PoolConfig(
        name="fuzz",
        listen=ListenSpec("127.0.0.1", 22121),
        redis=True,
        max_request_bytes=max_request_bytes,
        redis_auth=redis_auth,
    )


def memcache_pool(max_request_bytes=LARGE) -> PoolConfig:
    return PoolConfig(name="fuzz", listen=ListenSpec("127.0.0.1", 22122), max_request_bytes=max_request_bytes)


def summary(request) -> tuple:
    """What a parser decided about a request (stats replies carry the clock: left out)."""
    fields = request_summary(request)
    return fields[:5] + (None,) + fields[6:] if request.command in (b"stats", b"stat") else fields


@st.composite
def cuts(draw, data: bytes) -> list:
    """C{data} cut into non-empty reads at random points (sometimes byte by byte)."""
    byte_by_byte = draw(st.integers(0, 9)) == 0
    if len(data) <= 1:
        return [data] if data else []
    if len(data) <= 64 and byte_by_byte:
        return [data[i : i + 1] for i in range(len(data))]
    points = sorted(draw(st.sets(st.integers(1, len(data) - 1), max_size=min(len(data) - 1, 24))))
    bounds = [0] + points + [len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def frame_all(parser, reads: list):
    """
    Feed C{reads} in order; return the summaries of every request framed and the
    error reply that lost framing (None if none did).
    """
    out = []
    for data in reads:
        try:
            out.extend(parser.feed(data))
        except ProtocolError as e:
            out.extend(e.requests)
            return [summary(r) for r in out], e.reply
    return [summary(r) for r in out], None


def check_requests_frame_alike(make_parser, stream: bytes, reads: list, expected_count=None):
    """
    The same requests whole and cut into C{reads}, and framing lost in both or
    neither (its text may differ: a frame cut short is refused as soon as it
    would outgrow the limit, before the fault further on is read).
    """
    whole = frame_all(make_parser(), [stream])
    cut = frame_all(make_parser(), reads)
    assert (cut[0], cut[1] is None) == (whole[0], whole[1] is None), (cut[1], whole[1])
    if expected_count is not None:
        assert whole[1] is None, whole[1]
        assert len(whole[0]) == expected_count
    return whole


def requests_frame_alike(data, requests, codec):
    """Draw a request stream of C{requests} and reads cutting it; check C{codec}'s parser."""
    stream, count, config = data.draw(requests)
    reads = data.draw(cuts(stream))
    return check_requests_frame_alike(lambda: codec.request_parser(config), stream, reads, count)


def replies_frame_alike(data, reply, codec) -> None:
    """Draw replies of C{reply} and reads cutting them: C{codec}'s reply parser cuts each back out."""
    replies = data.draw(st.lists(reply, max_size=10))
    stream = b"".join(replies)
    parser = codec.reply_parser()
    assert cut_replies(parser, data.draw(cuts(stream))) == replies
    assert parser.buffered() == 0


def cut_replies(parser, reads: list, request=None) -> list:
    out = []
    for data in reads:
        parser.feed(data)
        while True:
            reply = parser.next_reply(request)
            if reply is None:
                break
            out.append(reply)
    return out


# -- Redis --------------------------------------------------------------------------

KEYS = st.binary(max_size=12)
SMALL_VALUES = st.one_of(st.binary(max_size=12), st.binary(min_size=95, max_size=140))
_INLINE_SAFE = bytes(c for c in range(33, 127) if c not in b"\"'\\")
INLINE_WORDS = st.binary(min_size=1, max_size=10).map(
    lambda b: bytes(_INLINE_SAFE[c % len(_INLINE_SAFE)] for c in b)
)

REDIS_COMMANDS = st.one_of(
    st.tuples(st.sampled_from([b"GET", b"get", b"Get", b"INCR", b"TTL", b"STRLEN"]), KEYS),
    st.tuples(st.sampled_from([b"SET", b"APPEND", b"GETSET", b"LPUSH"]), KEYS, SMALL_VALUES),
    st.builds(
        lambda name, keys: (name,) + tuple(keys),
        st.sampled_from([b"MGET", b"DEL", b"EXISTS", b"UNLINK", b"TOUCH"]),
        st.lists(KEYS, min_size=1, max_size=5),
    ),
    st.builds(
        lambda pairs: (b"MSET",) + tuple(x for pair in pairs for x in pair),
        st.lists(st.tuples(KEYS, SMALL_VALUES), min_size=1, max_size=4),
    ),
    st.builds(
        lambda script, keys, extra: (b"EVAL", script, b"%d" % len(keys)) + tuple(keys) + tuple(extra),
        SMALL_VALUES,
        st.lists(KEYS, max_size=3),
        st.lists(SMALL_VALUES, max_size=2),
    ),
    st.builds(lambda args: (b"PING",) + tuple(args), st.lists(SMALL_VALUES, max_size=1)),
    st.tuples(st.just(b"ECHO"), SMALL_VALUES),
    st.tuples(st.sampled_from([b"AUTH"]), st.sampled_from([b"secret", b"wrong"])),
    st.builds(lambda args: (b"HELLO",) + tuple(args), st.lists(st.sampled_from([b"2", b"3", b"x"]), max_size=1)),
    st.tuples(st.sampled_from([b"CONFIG", b"INFO", b"MULTI", b"EXEC", b"KEYS"]), KEYS),
    st.tuples(st.sampled_from([b"RANDOMKEY", b"TIME"])),
    st.tuples(st.sampled_from([b"GET", b"SET", b"ECHO", b"MSET"])),  # wrong number of arguments
    st.lists(SMALL_VALUES, min_size=1, max_size=4).map(tuple),  # mostly unknown commands
)


def _quote(arg: bytes) -> bytes:
    """An inline argument Redis's sdssplitargs reads back as C{arg}."""
    out = []
    for c in arg:
        if c in b'"\\':
            out.append(b"\\" + bytes([c]))
        elif 32 < c < 127:
            out.append(bytes([c]))
        else:
            out.append(b"\\x%02x" % c)
    return b'"' + b"".join(out) + b'"'


def _count(items) -> int | None:
    """How many requests generated items frame (None: not known)."""
    counts = [n for _, n in items]
    return None if None in counts else sum(counts)


@st.composite
def redis_item(draw):
    """(bytes, how many requests they frame): one command as multibulk or inline, or a no-op."""
    kind = draw(st.integers(0, 39))
    if kind == 0:
        return draw(st.sampled_from([b"*0\r\n", b"*-1\r\n", b"\r\n", b"\n", b"   \r\n"])), 0
    if kind == 1:  # a line about Redis's 64 KB limit (refused past it): None requests known
        size = redis.INLINE_MAX_BYTES + draw(st.integers(-3, 1))
        return draw(st.sampled_from([b"GET %s\r\n", b"*%s\r\n", b"*1\r\n$%s\r\n"])) % (b"1" * size), None
    args = draw(REDIS_COMMANDS)
    if kind <= 3:
        words = [a if a and all(c in _INLINE_SAFE for c in a) else _quote(a) for a in args]
        if words[0][:1] == b"*":  # would start a multibulk frame
            words[0] = b'"' + words[0] + b'"'
        return b" ".join(words) + draw(st.sampled_from([b"\r\n", b"\n"])), 1
    return redis.multibulk(args), 1


@st.composite
def redis_requests(draw, max_items=12):
    """(stream, expected request count or None, pool config)."""
    items = draw(st.lists(redis_item(), max_size=max_items))
    stream = b"".join(data for data, _ in items)
    count = _count(items)
    if draw(st.integers(0, 9)) == 0:  # QUIT ends the stream: nothing after it is read
        stream += redis.multibulk([b"QUIT"]) + draw(st.binary(max_size=20))
        count = None if count is None else count + 1
    limit = draw(st.sampled_from([LARGE, LARGE, LARGE, 64, 200, 1000]))
    if limit != LARGE:
        count = None  # a frame may be over the limit
    auth = draw(st.sampled_from([None, "secret"]))
    return stream, count, redis_pool(limit, auth)


_LINE_BYTES = st.binary(max_size=20).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
_RESP_LEAVES = st.one_of(
    _LINE_BYTES.map(lambda s: b"+" + s + b"\r\n"),
    _LINE_BYTES.map(lambda s: b"-ERR " + s + b"\r\n"),
    st.integers(-(2**63), 2**63).map(lambda n: b":%d\r\n" % n),
    st.one_of(st.binary(max_size=20), st.binary(min_size=100, max_size=400)).map(
        lambda v: b"$%d\r\n%s\r\n" % (len(v), v)
    ),
    st.sampled_from(
        [b"$-1\r\n", b"*-1\r\n", b"*0\r\n", b"_\r\n", b",3.14\r\n", b"#t\r\n", b"(12345678901234567890\r\n"]
    ),
    st.binary(max_size=20).map(lambda v: b"=%d\r\ntxt:%s\r\n" % (len(v) + 4, v)),
    st.binary(max_size=20).map(lambda v: b"!%d\r\n%s\r\n" % (len(v), v)),
)


def _aggregate(children):
    return st.one_of(
        st.lists(children, max_size=4).map(lambda xs: b"*%d\r\n" % len(xs) + b"".join(xs)),
        st.lists(children, max_size=3).map(lambda xs: b"~%d\r\n" % len(xs) + b"".join(xs)),
        st.lists(st.tuples(children, children), max_size=2).map(
            lambda pairs: b"%%%d\r\n" % len(pairs) + b"".join(a + b for a, b in pairs)
        ),
    )


REDIS_REPLY = st.recursive(_RESP_LEAVES, _aggregate, max_leaves=8)


@fuzz
@given(st.data())
def test_redis_requests_frame_the_same_in_any_reads(data):
    requests_frame_alike(data, redis_requests(), redis.codec)


@fuzz
@given(st.data())
def test_redis_replies_frame_the_same_in_any_reads(data):
    replies_frame_alike(data, REDIS_REPLY, redis.codec)


# RESP3 replies (what backend connections of RESP3 clients carry): every type
# Redis 7 may send, attributes before a reply or an element included.
_RESP3_LEAVES = st.one_of(
    _RESP_LEAVES,
    st.sampled_from([b",inf\r\n", b",-inf\r\n", b",nan\r\n", b",-1.5e-10\r\n", b",0\r\n", b"#f\r\n"]),
    st.integers(-(2**200), 2**200).map(lambda n: b"(%d\r\n" % n),
    st.binary(max_size=20).map(lambda s: b"=%d\r\nmkd:%s\r\n" % (len(s) + 4, s)),
)


def _resp3_aggregate(children):
    return st.one_of(
        _aggregate(children),
        st.tuples(st.lists(st.tuples(children, children), max_size=2), children).map(
            lambda both: b"|%d\r\n" % len(both[0]) + b"".join(a + b for a, b in both[0]) + both[1]
        ),
    )


RESP3_REPLY = st.recursive(_RESP3_LEAVES, _resp3_aggregate, max_leaves=10)


@fuzz
@given(st.data())
def test_resp3_replies_frame_the_same_in_any_reads(data):
    replies_frame_alike(data, RESP3_REPLY, redis.codec)


def _protocols(parser, reads: list) -> list:
    """
    The protocol each request framed from C{reads} is sent in, as the core
    reads it (the batch's codec, then each switching request's).
    """
    out = []
    for data in reads:
        try:
            requests = parser.feed(data)
        except ProtocolError as e:
            requests = e.requests
        protocol = parser.codec.protocol
        for request in requests:
            if request.switch_to is not None:
                protocol = request.switch_to.protocol
            out.append(protocol)
    return out


@fuzz
@given(st.data())
def test_redis_protocol_switches_fall_alike_in_any_reads(data):
    """HELLO 2 and 3 among requests: each request's protocol is the same whole or cut, and the last good HELLO's."""
    stream, _, config = data.draw(redis_requests())
    reads = data.draw(cuts(stream))
    whole = redis.codec.request_parser(config)
    requests, _ = frame_all(whole, [stream])
    protocols = _protocols(redis.codec.request_parser(config), [stream])
    assert _protocols(redis.codec.request_parser(config), reads) == protocols
    expected = 2
    for request, protocol in zip(requests, protocols):
        reply = request[5] if request[1] == b"hello" else None
        if reply is not None and reply[:1] in (b"%", b"*"):  # a HELLO that succeeded
            expected = 3 if reply[:1] == b"%" else 2
        assert protocol == expected


# -- memcached text and meta --------------------------------------------------------

MC_KEYS = st.binary(min_size=1, max_size=16).map(lambda b: bytes(33 + c % 94 for c in b))
MC_DATA = st.one_of(st.binary(max_size=16), st.binary(min_size=100, max_size=300))
_U32 = st.one_of(st.integers(0, 99), st.just(2**32 - 1)).map(lambda n: b"%d" % n)
_EXPTIME = st.one_of(st.integers(-5, 99), st.just(2**31 - 1)).map(lambda n: b"%d" % n)
_NOREPLY = st.sampled_from([(), (b"noreply",)])
META_FLAGS = st.lists(
    st.sampled_from([b"v", b"t", b"f", b"k", b"c", b"s", b"q", b"O123", b"T30", b"N30", b"MS", b"D5", b"I"]),
    max_size=4,
)


@st.composite
def mc_text_item(draw):
    """(bytes, requests they frame): one text or meta command (1 request), or a blank line."""
    which = draw(st.integers(0, 33))
    key = draw(MC_KEYS)
    if which > 16:
        which = 16 if which < 33 else 17
    if which == 17:  # a line about the 8 KB limit (refused past it; a retrieval may be longer)
        gap = b" " * (memcache_text.MAX_LINE_LENGTH + draw(st.integers(-12, 1)))
        return draw(st.sampled_from([b"delete", b"get", b"touch 0"])) + gap + key + b"\r\n", None
    if which == 0:
        words = [draw(st.sampled_from([b"get", b"gets"]))] + draw(st.lists(MC_KEYS, min_size=1, max_size=5))
    elif which == 1:
        words = [draw(st.sampled_from([b"gat", b"gats"])), draw(_EXPTIME)] + draw(st.lists(MC_KEYS, max_size=4))
    elif which in (2, 3):
        command = draw(st.sampled_from([b"set", b"add", b"replace", b"append", b"prepend", b"cas"]))
        value = draw(MC_DATA)
        words = [command, key, draw(_U32), draw(_EXPTIME), b"%d" % len(value)]
        if command == b"cas":
            words.append(b"%d" % draw(st.integers(0, 2**64 - 1)))
        words += draw(_NOREPLY)
        # Sometimes a block without its CRLF: refused, and skipped by its length.
        tail = draw(st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"xy"]))
        return _line(draw, words) + value + tail, 1
    elif which == 4:
        words = [b"delete", key] + draw(st.sampled_from([[], [b"0"]])) + list(draw(_NOREPLY))
    elif which == 5:
        words = [draw(st.sampled_from([b"incr", b"decr"])), key, draw(_U32)] + list(draw(_NOREPLY))
    elif which == 6:
        words = [b"touch", key, draw(_EXPTIME)] + list(draw(_NOREPLY))
    elif which in (7, 8):
        words = [draw(st.sampled_from([b"mg", b"md", b"ma", b"me"])), key] + draw(META_FLAGS)
        if draw(st.booleans()):
            words[1] = base64.b64encode(key)
            words.append(b"b")
    elif which == 9:
        value = draw(MC_DATA)
        words = [b"ms", key, b"%d" % len(value)] + draw(META_FLAGS)
        return _line(draw, words) + value + b"\r\n", 1
    elif which == 10:
        words = [draw(st.sampled_from([b"mn", b"version", b"stats"]))]
        if words[0] == b"stats":
            words += draw(st.sampled_from([[], [b"items"], [b"reset"], [b"bogus"]]))
    elif which == 11:
        words = [b"verbosity", draw(_U32)] + list(draw(_NOREPLY))
    elif which == 12:
        words = [b"flush_all"] + draw(st.sampled_from([[], [b"0"], [b"30"]])) + list(draw(_NOREPLY))
    elif which == 13:
        # Malformed but well framed: wrong token counts, bad numbers, unknown words, long keys.
        words = draw(
            st.sampled_from(
                [
                    [b"get"],
                    [b"incr", key, b"x"],
                    [b"touch", key],
                    [b"delete", key, b"5"],
                    [b"bogus", key],
                    [b"GET", key],
                    [b"get", b"k" * 251],
                    [b"mg", b"k" * 251, b"v"],
                    [b"mg", b"!!!!", b"b"],
                    [b"gat", b"x", key],
                    [b"verbosity", b"x"],
                    [b"flush_all", b"1", b"2", b"3"],
                ]
            )
        )
    elif which == 14:
        return b"\r\n", 1  # a blank line: ERROR
    elif which == 15:
        # A control character in the line: refused.
        return b"get " + key + b"\x01" + b"\r\n", 1
    else:
        words = [b"mg", key, b"v"]
    return _line(draw, words), 1


def _line(draw, words) -> bytes:
    """A command line; tokens separated by one or more spaces, CRLF or a bare LF."""
    gaps = draw(st.lists(st.sampled_from([b" ", b" ", b" ", b"  "]), min_size=len(words), max_size=len(words)))
    line = b"".join(word + gap for word, gap in zip(words, gaps))[:-1] if words else b""
    return line + draw(st.sampled_from([b"\r\n", b"\r\n", b"\n"]))


@st.composite
def mc_text_requests(draw, max_items=12):
    items = draw(st.lists(mc_text_item(), max_size=max_items))
    stream = b"".join(data for data, _ in items)
    count = _count(items)
    if draw(st.integers(0, 9)) == 0:
        stream += b"quit\r\n" + draw(st.binary(max_size=20))
        count = None if count is None else count + 1
    limit = draw(st.sampled_from([LARGE, LARGE, LARGE, 64, 200, 1000]))
    return stream, count if limit == LARGE else None, memcache_pool(limit)


_REPLY_LINES = st.sampled_from(
    [
        b"STORED",
        b"NOT_STORED",
        b"EXISTS",
        b"NOT_FOUND",
        b"DELETED",
        b"TOUCHED",
        b"OK",
        b"END",
        b"ERROR",
        b"HD",
        b"HD c123 t-1",
        b"NF",
        b"NS",
        b"EX",
        b"EN",
        b"MN",
        b"ME key exp=-1 la=1 cas=2 fetch=no cls=1 size=63",
        b"12345",
        b"CLIENT_ERROR bad data chunk",
        b"SERVER_ERROR out of memory storing object",
        b"VERSION 1.6.21",
    ]
)


@st.composite
def mc_text_reply(draw):
    which = draw(st.integers(0, 3))
    if which == 0:
        return draw(_REPLY_LINES) + b"\r\n"
    if which == 1:
        value = draw(MC_DATA)
        flags = b" ".join(draw(st.lists(st.sampled_from([b"f0", b"c1", b"t-1", b"s5", b"kfoo"]), max_size=3)))
        return b"VA %d%s\r\n%s\r\n" % (len(value), b" " + flags if flags else b"", value)
    blocks = []
    for key, value in draw(st.lists(st.tuples(MC_KEYS, MC_DATA), max_size=4)):
        cas = draw(st.sampled_from([b"", b" 99"]))
        blocks.append(b"VALUE %s %d %d%s\r\n%s\r\n" % (key, draw(st.integers(0, 2**32 - 1)), len(value), cas, value))
    end = b"END\r\n" if which == 2 else draw(_REPLY_LINES.filter(lambda line: not line.startswith(b"V"))) + b"\r\n"
    return b"".join(blocks) + end


@fuzz
@given(st.data())
def test_memcache_text_requests_frame_the_same_in_any_reads(data):
    requests_frame_alike(data, mc_text_requests(), memcache_text.codec)


@fuzz
@given(st.data())
def test_memcache_text_replies_frame_the_same_in_any_reads(data):
    replies_frame_alike(data, mc_text_reply(), memcache_text.codec)


# -- memcached binary ---------------------------------------------------------------

_HEADER = struct.Struct(">BBHBBHIIQ")


def binary_packet(opcode, key=b"", extras=b"", value=b"", opaque=0, cas=0, magic=0x80, status=0) -> bytes:
    body = extras + key + value
    return _HEADER.pack(magic, opcode, len(key), len(extras), 0, status, len(body), opaque, cas) + body


_EXTRAS_BY_OPCODE = {}
for _op, _command in memcache_binary.COMMANDS.items():
    _shape = _command.shape
    _EXTRAS_BY_OPCODE[_op] = {
        memcache_binary._shape_store: 8,
        memcache_binary._shape_arithmetic: 20,
        memcache_binary._shape_touch: 4,
    }.get(_shape, 0)
_KEYLESS = {memcache_binary.NOOP, memcache_binary.VERSION_OPCODE, memcache_binary.FLUSH, memcache_binary.FLUSHQ}
_CLOSING = {memcache_binary.QUIT, memcache_binary.QUITQ}
_VALUED = {
    memcache_binary._shape_store,
    memcache_binary._shape_concat,
    memcache_binary._shape_touch,
}


@st.composite
def mc_binary_item(draw):
    """One binary request packet (each frames exactly one request)."""
    opaque = draw(st.integers(0, 2**32 - 1))
    which = draw(st.integers(0, 9))
    if which == 0:  # an unknown opcode or a malformed packet: answered locally, framing kept
        opcode = draw(st.integers(0, 255).filter(lambda op: op not in _CLOSING))
        key = draw(st.binary(max_size=8))
        extras = draw(st.binary(max_size=24))
        return binary_packet(opcode, key, extras, draw(st.binary(max_size=8)), opaque)
    if which == 1:  # a key too long
        opcode = draw(st.sampled_from([memcache_binary.GET, memcache_binary.DELETE]))
        return binary_packet(opcode, b"k" * draw(st.integers(251, 300)), opaque=opaque)
    opcode = draw(st.sampled_from(sorted(op for op in memcache_binary.COMMANDS if op not in _CLOSING)))
    command = memcache_binary.COMMANDS[opcode]
    extras = draw(st.binary(min_size=_EXTRAS_BY_OPCODE[opcode], max_size=_EXTRAS_BY_OPCODE[opcode]))
    if opcode in (memcache_binary.FLUSH, memcache_binary.FLUSHQ):
        extras = draw(st.sampled_from([b"", b"\0\0\0\x1e"]))
    key = b"" if opcode in _KEYLESS or command.shape is memcache_binary._shape_stat else draw(MC_KEYS)
    if command.shape is memcache_binary._shape_stat:
        key = draw(st.sampled_from([b"", b"items"]))
    value = draw(MC_DATA) if command.shape in _VALUED else b""
    return binary_packet(opcode, key, extras, value, opaque, cas=draw(st.integers(0, 2**64 - 1)))


@st.composite
def mc_binary_requests(draw, max_items=12):
    packets = draw(st.lists(mc_binary_item(), max_size=max_items))
    stream = b"".join(packets)
    count = len(packets)
    if draw(st.integers(0, 9)) == 0:
        stream += binary_packet(draw(st.sampled_from(sorted(_CLOSING)))) + draw(st.binary(max_size=30))
        count += 1
    limit = draw(st.sampled_from([LARGE, LARGE, LARGE, 64, 200, 1000]))
    return stream, count if limit == LARGE else None, memcache_pool(limit)


@st.composite
def mc_binary_reply(draw):
    status = draw(st.sampled_from([0, 0, 1, 2, 5, 0x81, 0x86]))
    return binary_packet(
        draw(st.integers(0, 0x24)),
        draw(st.binary(max_size=10)),
        draw(st.binary(max_size=8)),
        draw(MC_DATA),
        draw(st.integers(0, 2**32 - 1)),
        draw(st.integers(0, 2**64 - 1)),
        magic=0x81,
        status=status,
    )


@fuzz
@given(st.data())
def test_memcache_binary_requests_frame_the_same_in_any_reads(data):
    requests_frame_alike(data, mc_binary_requests(), memcache_binary.codec)


@fuzz
@given(st.data())
def test_memcache_binary_replies_frame_the_same_in_any_reads(data):
    replies_frame_alike(data, mc_binary_reply(), memcache_binary.codec)


# -- memcached text or binary, sniffed on the first byte ----------------------------


@fuzz
@given(st.data())
def test_memcache_sniffing_frames_the_same_in_any_reads(data):
    binary = data.draw(st.booleans())
    stream, count, config = data.draw(mc_binary_requests() if binary else mc_text_requests())
    reads = data.draw(cuts(stream))
    whole = check_requests_frame_alike(lambda: memcache.codec.request_parser(config), stream, reads, count)
    direct = (memcache_binary.codec if binary else memcache_text.codec).request_parser(config)
    assert frame_all(direct, [stream]) == whole  # the same as the protocol's own parser
    parser = memcache.codec.request_parser(config)
    frame_all(parser, reads)
    if stream:
        assert parser.codec is (memcache_binary.codec if binary else memcache_text.codec)
