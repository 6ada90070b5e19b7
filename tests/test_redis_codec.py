"""The Redis codec: request and reply framing, routing, local replies, split and merge."""

from __future__ import annotations

import random
import time

import pytest
from zope.interface.verify import verifyObject

from twistedproxy.config.model import ListenSpec, PoolConfig
from twistedproxy.core.request import ROUTE_ANY, ROUTE_KEY, ROUTE_KEYS, ROUTE_LOCAL, ProtocolError, Request
from twistedproxy.protocols import redis_commands
from twistedproxy.protocols.interface import ICodec, IReplyParser, IRequestParser
from twistedproxy.protocols.redis import codec, multibulk, split_quoted
from tests.support.resp import cmd


def pool(**kwargs) -> PoolConfig:
    return PoolConfig(name="alpha", listen=ListenSpec("127.0.0.1", 22121), redis=True, **kwargs)


def parse(data: bytes, **kwargs) -> list:
    return codec.request_parser(pool(**kwargs)).feed(data)


def only(data: bytes, **kwargs) -> Request:
    requests = parse(data, **kwargs)
    assert len(requests) == 1, requests
    return requests[0]


def protocol_error(data: bytes, **kwargs) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        parse(data, **kwargs)
    return caught.value


def summary(requests) -> list:
    return [(r.frame, r.command, r.key, r.keys, r.route, r.reply, r.data) for r in requests]


# -- interfaces --------------------------------------------------------------


def test_provides_the_interfaces():
    assert verifyObject(ICodec, codec)
    assert codec.name == "redis"
    assert verifyObject(IRequestParser, codec.request_parser(pool()))
    assert codec.request_parser(pool()).codec is codec
    assert verifyObject(IReplyParser, codec.reply_parser())


# -- request framing ---------------------------------------------------------


def test_one_set():
    frame = cmd("SET", "foo", "bar")
    request = only(frame)
    assert (request.frame, request.command, request.key, request.route) == (frame, b"set", b"foo", ROUTE_KEY)
    assert not request.done and request.reply is None


def test_pipeline_keeps_frames_and_order():
    frames = [cmd("SET", "k%d" % i, "v" * i) for i in range(50)] + [cmd("GET", "k7"), cmd("hget", "h", "f")]
    requests = parse(b"".join(frames))
    assert [r.frame for r in requests] == frames
    assert [r.key for r in requests] == [b"k%d" % i for i in range(50)] + [b"k7", b"h"]
    assert [r.command for r in requests][-2:] == [b"get", b"hget"]


def test_command_names_are_case_insensitive():
    for name in ("get", "GET", "Get", "gEt"):
        request = only(cmd(name, "k"))
        assert (request.command, request.key, request.route) == (b"get", b"k", ROUTE_KEY)


def test_binary_keys_and_values():
    key = b"\x00\r\n\xff*$"
    value = b"\r\n" * 10 + b"$3\r\n"
    request = only(cmd(b"SET", key, value))
    assert request.key == key


def test_long_lengths_and_empty_values():
    frame = cmd("SET", "k" * 1000, b"")
    assert only(frame).key == b"k" * 1000
    frame = cmd("SET", b"", "v" * 123456)
    assert only(frame).key == b""


def test_empty_multibulk_is_skipped():
    requests = parse(b"*0\r\n*-1\r\n" + cmd("GET", "a"))
    assert [r.key for r in requests] == [b"a"]


MIXED_STREAM = b"".join(
    [
        cmd("SET", "alpha", "x" * 300),
        b"GET alpha\r\n",
        cmd("MGET", "a", "b", "c"),
        b"\r\n",
        cmd("MSET", "a", "1", "b", "22"),
        b"set 'quoted key' \"v\\x41\"\n",
        cmd("PING"),
        cmd("EVAL", "return 1", "1", "k", "arg"),
        cmd("KEYS", "*"),
        cmd("GET"),
        b"*0\r\n",
        cmd("DEL", "k1", "k2", "k3", "k4", "k5", "k6", "k7", "k8", "k9", "k10", "k11"),
        cmd("SET", "long", "v" * 70000),
    ]
)


def test_every_split_point_parses_the_same():
    expected = summary(parse(MIXED_STREAM))
    assert len(expected) == 11
    for cut in range(len(MIXED_STREAM) - 70000 + 100):  # the long value's bytes add nothing new
        parser = codec.request_parser(pool())
        got = parser.feed(MIXED_STREAM[:cut]) + parser.feed(MIXED_STREAM[cut:])
        assert summary(got) == expected, cut


def test_byte_by_byte():
    stream = MIXED_STREAM[: -70000 - 20]  # without the long value
    expected = summary(parse(stream))
    parser = codec.request_parser(pool())
    got = []
    for i in range(len(stream)):
        got += parser.feed(stream[i : i + 1])
    assert summary(got) == expected


def test_random_chunks():
    rng = random.Random(7)
    expected = summary(parse(MIXED_STREAM))
    for _ in range(200):
        parser = codec.request_parser(pool())
        got, pos = [], 0
        while pos < len(MIXED_STREAM):
            size = rng.choice([1, 2, 3, 7, 100, 4096, 65536])
            got += parser.feed(MIXED_STREAM[pos : pos + size])
            pos += size
        assert summary(got) == expected


def test_big_value_in_small_reads_is_linear():
    value = b"v" * (30 * 1024 * 1024)
    frame = cmd("SET", "big", value) + cmd("GET", "big")
    parser = codec.request_parser(pool())
    got = []
    started = time.perf_counter()
    for i in range(0, len(frame), 16384):
        got += parser.feed(frame[i : i + 16384])
    elapsed = time.perf_counter() - started
    assert [r.command for r in got] == [b"set", b"get"]
    assert got[0].frame == frame[: -len(cmd("GET", "big"))]
    assert got[0].key == b"big"
    assert elapsed < 10  # quadratic copying would take minutes


def test_many_small_arguments_in_small_reads_is_linear():
    pairs = []
    for i in range(100000):
        pairs += [b"key:%d" % i, b"value:%d" % i]
    frame = cmd("MSET", *pairs)
    parser = codec.request_parser(pool())
    got = []
    started = time.perf_counter()
    for i in range(0, len(frame), 1000):
        got += parser.feed(frame[i : i + 1000])
    elapsed = time.perf_counter() - started
    assert len(got) == 1 and got[0].frame == frame
    assert got[0].keys == pairs[0::2] and got[0].data == pairs[1::2]
    assert elapsed < 20


def test_several_big_values_in_one_frame():
    values = [bytes([65 + i]) * (300000 + i) for i in range(4)]
    frame = cmd("MSET", "a", values[0], "b", values[1], "c", values[2], "d", values[3])
    parser = codec.request_parser(pool())
    got = []
    for i in range(0, len(frame), 8192):
        got += parser.feed(frame[i : i + 8192])
    assert len(got) == 1
    assert got[0].frame == frame and got[0].data == values


def test_frame_larger_than_the_limit():
    before = cmd("GET", "a")
    error = protocol_error(before + cmd("SET", "k", "v" * 2000), max_request_bytes=1000)
    assert error.reply.startswith(b"-ERR Protocol error: ") and error.reply.endswith(b"\r\n")
    assert [r.key for r in error.requests] == [b"a"]
    # Refused as soon as the length is known, before the value arrives.
    parser = codec.request_parser(pool(max_request_bytes=1000))
    with pytest.raises(ProtocolError):
        parser.feed(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5000\r\nvvv")
    # At the limit is fine.
    frame = cmd("SET", "k", "v" * 100)
    assert only(frame, max_request_bytes=len(frame)).frame == frame
    protocol_error(frame, max_request_bytes=len(frame) - 1)


def test_many_small_arguments_hit_the_limit():
    frame = cmd("DEL", *["k%d" % i for i in range(1000)])
    parser = codec.request_parser(pool(max_request_bytes=5000))
    with pytest.raises(ProtocolError):
        for i in range(0, len(frame), 100):
            parser.feed(frame[i : i + 100])


@pytest.mark.parametrize(
    "data, message",
    [
        (b"*x\r\n", b"invalid multibulk length"),
        (b"*\r\n", b"invalid multibulk length"),
        (b"*1 \r\n", b"invalid multibulk length"),
        (b"*+1\r\n", b"invalid multibulk length"),
        (b"*01\r\n", b"invalid multibulk length"),
        (b"*1_0\r\n", b"invalid multibulk length"),
        (b"*9999999999\r\n", b"invalid multibulk length"),
        (b"*" + b"9" * 5000 + b"\r\n", b"invalid multibulk length"),
        (b"*2\r\nfoo\r\n", b"expected '$', got 'f'"),
        (b"*2\r\n$3\r\nget\r\n:1\r\n", b"expected '$', got ':'"),
        (b"*1\r\n$x\r\nget\r\n", b"invalid bulk length"),
        (b"*1\r\n$-1\r\n", b"invalid bulk length"),
        (b"*1\r\n$\r\n", b"invalid bulk length"),
        (b"*1\r\n$03\r\nget\r\n", b"invalid bulk length"),
        (b"*1\r\n$ 3\r\nget\r\n", b"invalid bulk length"),
        (b"*1\r\n$" + b"9" * 20 + b"\r\n", b"invalid bulk length"),
        (b"*1\r\n$" + b"9" * 5000 + b"\r\n", b"invalid bulk length"),
        (b"*1\r\n$3\r\ngetXY", b"expected CRLF after bulk data"),
        (b"*1\r\n$4\r\nping\n\r", b"expected CRLF after bulk data"),
        (b"*1\r\n$123\r\n" + b"x" * 123 + b"\r\r", b"expected CRLF after bulk data"),
        (b"*" + b"1" * 70000, b"too big mbulk count string"),
        (b"*1\r\n$" + b"1" * 70000, b"too big bulk count string"),
        (b"GET " + b"k" * 70000, b"too big inline request"),
        (b"SET k \"unterminated\r\n", b"unbalanced quotes in request"),
        (b"SET k \"a\"b\r\n", b"unbalanced quotes in request"),
    ],
)
def test_framing_errors(data, message):
    before = [cmd("GET", "a"), cmd("SET", "b", "c")]
    error = protocol_error(b"".join(before) + data)
    assert error.reply == b"-ERR Protocol error: " + message + b"\r\n"
    assert [r.frame for r in error.requests] == before


@pytest.mark.parametrize(
    "data, message",
    [
        (b"GET " + b"k" * (64 * 1024 - 5) + b"\r\n", None),  # at the limit, with its CR
        (b"GET " + b"k" * (64 * 1024 - 4) + b"\r\n", b"too big inline request"),
        (b"*" + b"1" * (64 * 1024 - 2) + b"\r\n", b"invalid multibulk length"),
        (b"*" + b"1" * 64 * 1024 + b"\r\n", b"too big mbulk count string"),
        (b"*-" + b"1" * 64 * 1024 + b"\r\n", b"too big mbulk count string"),
        (b"*1\r\n$" + b"1" * 64 * 1024 + b"\r\n", b"too big bulk count string"),
    ],
)
def test_long_lines_are_refused_alike_whole_or_in_reads(data, message):
    """A line past the 64 KB limit gets the same answer however the reads cut it."""
    outcomes = set()
    for cut in (None, len(data) - 3, len(data) - 2, len(data) - 1):
        parser = codec.request_parser(pool())
        try:
            for read in [data] if cut is None else [data[:cut], data[cut:]]:
                parser.feed(read)
            outcomes.add(None)
        except ProtocolError as e:
            outcomes.add(e.reply)
    assert outcomes == {None if message is None else b"-ERR Protocol error: " + message + b"\r\n"}


def test_framing_error_split_across_reads():
    parser = codec.request_parser(pool())
    assert [r.key for r in parser.feed(cmd("GET", "a") + b"*2\r\n$3\r\nGE")] == [b"a"]
    with pytest.raises(ProtocolError) as caught:
        parser.feed(b"T\r\n$x\r\n")
    assert caught.value.reply == b"-ERR Protocol error: invalid bulk length\r\n"
    assert caught.value.requests == []


# -- inline commands ---------------------------------------------------------


def test_inline_is_forwarded_as_multibulk():
    request = only(b"GET foo\r\n")
    assert (request.frame, request.command, request.key) == (cmd("GET", "foo"), b"get", b"foo")
    request = only(b"set  foo\tbar\n")  # bare LF and any blanks, as telnet and nc send
    assert (request.frame, request.key) == (cmd("set", "foo", "bar"), b"foo")


def test_inline_blank_lines_are_ignored():
    requests = parse(b"\r\n\n   \r\nGET a\r\n")
    assert [r.key for r in requests] == [b"a"]


def test_inline_quotes():
    request = only(b"SET \"a key\" 'it''s'\r\n".replace(b"''", b"\\'"))
    assert request.frame == cmd("SET", "a key", "it's")
    assert split_quoted(b'"\\x41\\n\\t\\"\\q" x') == [b"A\n\t\"q", b"x"]
    assert split_quoted(b"a\"b c\" d") == [b"ab c", b"d"]
    assert split_quoted(b"a\"b c\"d") is None
    assert split_quoted(b"'a") is None
    assert split_quoted(b"'a'b") is None
    assert split_quoted(b'"a"b') is None
    assert split_quoted(b'"\\xzz"') == [b"xzz"]
    assert split_quoted(b"  ") == []


def test_inline_local_and_multi_key_commands():
    assert only(b"PING\r\n").reply == b"+PONG\r\n"
    request = only(b"MGET a b\r\n")
    assert (request.route, request.keys, request.frame) == (ROUTE_KEYS, [b"a", b"b"], cmd("MGET", "a", "b"))
    assert only(b"FOO bar\r\n").reply == b"-ERR unsupported command 'FOO'\r\n"


# -- routing table -----------------------------------------------------------


@pytest.mark.parametrize(
    "args, command, key",
    [
        (("GET", "k"), b"get", b"k"),
        (("set", "k", "v", "EX", "10"), b"set", b"k"),
        (("SETEX", "k", "10", "v"), b"setex", b"k"),
        (("GETEX", "k", "PERSIST"), b"getex", b"k"),
        (("GETDEL", "k"), b"getdel", b"k"),
        (("HSET", "h", "f", "v", "f2", "v2"), b"hset", b"h"),
        (("HSTRLEN", "h", "f"), b"hstrlen", b"h"),
        (("LPUSH", "l", "a", "b"), b"lpush", b"l"),
        (("LPOS", "l", "a"), b"lpos", b"l"),
        (("LINSERT", "l", "BEFORE", "a", "b"), b"linsert", b"l"),
        (("SMISMEMBER", "s", "a", "b"), b"smismember", b"s"),
        (("ZADD", "z", "1", "a"), b"zadd", b"z"),
        (("ZPOPMIN", "z"), b"zpopmin", b"z"),
        (("ZRANDMEMBER", "z", "2"), b"zrandmember", b"z"),
        (("HRANDFIELD", "h"), b"hrandfield", b"h"),
        (("ZUNIONSTORE", "dest", "2", "a", "b"), b"zunionstore", b"dest"),
        (("ZUNION", "2", "{t}a", "{t}b"), b"zunion", b"{t}a"),
        (("ZINTER", "2", "{t}a", "{t}b"), b"zinter", b"{t}a"),
        (("BITOP", "AND", "dest", "a", "b"), b"bitop", b"dest"),
        (("OBJECT", "ENCODING", "k"), b"object", b"k"),
        (("XADD", "s", "*", "f", "v"), b"xadd", b"s"),
        (("XRANGE", "s", "-", "+"), b"xrange", b"s"),
        (("XLEN", "s"), b"xlen", b"s"),
        (("XTRIM", "s", "MAXLEN", "10"), b"xtrim", b"s"),
        (("XINFO", "STREAM", "s"), b"xinfo", b"s"),
        (("COPY", "{t}a", "{t}b"), b"copy", b"{t}a"),
        (("RPOPLPUSH", "{t}a", "{t}b"), b"rpoplpush", b"{t}a"),
        (("PFCOUNT", "p"), b"pfcount", b"p"),
        (("GEOSEARCH", "g", "FROMMEMBER", "m", "BYRADIUS", "1", "km"), b"geosearch", b"g"),
        (("EXPIRE", "k", "10", "NX"), b"expire", b"k"),
        (("MOVE", "k", "1"), b"move", b"k"),
        (("EVAL", "return 1", "2", "k1", "k2", "a"), b"eval", b"k1"),
        (("EVALSHA", "abc", "1", "k"), b"evalsha", b"k"),
        (("FCALL", "f", "1", "k"), b"fcall", b"k"),
        (("MGET", "only"), b"mget", b"only"),
        (("DEL", "only"), b"del", b"only"),
        (("MSET", "only", "v"), b"mset", b"only"),
    ],
)
def test_routed_by_key(args, command, key):
    frame = cmd(*args)
    request = only(frame)
    assert (request.frame, request.command, request.key, request.route) == (frame, command, key, ROUTE_KEY)


def test_no_key_commands_go_to_any_server():
    for args in (("COMMAND",), ("COMMAND", "DOCS", "GET"), ("LOLWUT",), ("lolwut", "VERSION", "5")):
        request = only(cmd(*args))
        assert request.route == ROUTE_ANY and request.frame == cmd(*args)


def test_every_twemproxy_key_command_is_routed():
    twemproxy = """
        persist pttl ttl type dump decr get getdel incr strlen hgetall hkeys hlen hvals llen scard
        smembers zcard expire expireat pexpire pexpireat move append decrby getbit getset incrby
        incrbyfloat setnx hexists hget hstrlen lindex rpoplpush sismember zrank zrevrank zscore
        getrange psetex setbit setex setrange hincrby hincrbyfloat hsetnx lrange lrem lset ltrim
        smove zcount zlexcount zincrby zremrangebylex zremrangebyrank zremrangebyscore linsert lmove
        sort copy bitcount bitpos bitfield exists getex set hdel hmget hmset hscan hset hrandfield
        lpush lpushx rpush rpushx lpop rpop lpos sadd sdiff sdiffstore sinter sinterstore srem sunion
        sunionstore srandmember sscan spop smismember pfadd pfmerge pfcount zadd zdiff zdiffstore
        zinter zinterstore zmscore zpopmax zpopmin zrandmember zrange zrangebylex zrangebyscore
        zrangestore zrem zrevrange zrevrangebylex zrevrangebyscore zscan zunion zunionstore geodist
        geopos geohash geoadd georadius georadiusbymember geosearch geosearchstore restore
        mget del unlink touch mset eval evalsha ping quit auth command lolwut
    """.split()
    for name in twemproxy:
        entry = redis_commands.COMMANDS[name.encode()]
        assert entry[redis_commands.KIND] != redis_commands.UNSUPPORTED, name
        assert redis_commands.COMMANDS[name.upper().encode()] is entry


def test_wrong_number_of_arguments_is_answered_locally():
    cases = [
        (("GET",), b"get"),
        (("GET", "a", "b"), b"get"),
        (("SET", "k"), b"set"),
        (("SETEX", "k", "1"), b"setex"),
        (("HGET", "h"), b"hget"),
        (("ZUNION", "2"), b"zunion"),
        (("MGET",), b"mget"),
        (("MSET", "a"), b"mset"),
        (("MSET", "a", "1", "b"), b"mset"),
        (("EVAL", "s"), b"eval"),
        (("PING", "a", "b"), b"ping"),
        (("ECHO",), b"echo"),
        (("AUTH",), b"auth"),
        (("AUTH", "u", "p", "x"), b"auth"),
    ]
    stream = b"".join(cmd(*args) for args, _ in cases) + cmd("GET", "after")
    requests = parse(stream)
    for request, (args, name) in zip(requests, cases):
        assert request.route == ROUTE_LOCAL and request.done, args
        assert request.command == name
        assert request.reply == b"-ERR wrong number of arguments for '%s' command\r\n" % name
    assert requests[-1].key == b"after"


def test_unsupported_commands_are_answered_locally():
    names = ["KEYS", "scan", "MULTI", "exec", "SUBSCRIBE", "publish", "BLPOP", "brpop", "BLMOVE",
             "BZPOPMIN", "CONFIG", "FLUSHALL", "flushdb", "DEBUG", "SHUTDOWN", "CLIENT", "INFO",
             "SELECT", "WAIT", "MONITOR", "SAVE", "RENAME", "MSETNX", "SCRIPT", "XREAD"]
    for name in names:
        request = only(cmd(name, "x", "y"), transaction_connections=0)  # MULTI, EXEC: transactions off
        assert request.route == ROUTE_LOCAL
        assert request.command == name.lower().encode()
        assert request.reply == b"-ERR unsupported command '%s'\r\n" % name.encode()
        assert not request.close_after


def test_unknown_commands_are_answered_locally_and_counted_as_unknown():
    request = only(cmd("NOSUCHCMD", "x"))
    assert (request.route, request.command) == (ROUTE_LOCAL, b"unknown")
    assert request.reply == b"-ERR unsupported command 'NOSUCHCMD'\r\n"
    request = only(cmd(b"bad\r\nname" + b"x" * 500))
    assert request.reply.count(b"\r\n") == 1 and len(request.reply) < 200
    assert parse(cmd("NOSUCHCMD") + cmd("GET", "k"))[1].key == b"k"


# -- proxy-local commands ----------------------------------------------------


def test_ping_echo():
    requests = parse(cmd("PING") + cmd("ping", "hello world") + cmd("ECHO", b"a\r\nb") + cmd("ECHO", ""))
    assert [r.reply for r in requests] == [b"+PONG\r\n", b"$11\r\nhello world\r\n", b"$4\r\na\r\nb\r\n", b"$0\r\n\r\n"]
    assert all(r.route == ROUTE_LOCAL and r.done and not r.close_after for r in requests)
    assert [r.command for r in requests] == [b"ping", b"ping", b"echo", b"echo"]


def test_quit_closes_and_ignores_the_rest():
    parser = codec.request_parser(pool())
    requests = parser.feed(cmd("GET", "a") + cmd("QUIT") + cmd("GET", "b"))
    assert [r.command for r in requests] == [b"get", b"quit"]
    assert requests[1].reply == b"+OK\r\n" and requests[1].close_after
    assert parser.feed(cmd("GET", "c")) == []
    assert only(b"quit\r\n").close_after


def test_quit_needs_no_auth():
    request = only(cmd("QUIT"), redis_auth="secret")
    assert request.reply == b"+OK\r\n" and request.close_after


def test_auth_without_a_password_configured():
    request = only(cmd("AUTH", "whatever"))
    assert request.reply == b"-ERR Client sent AUTH, but no password is set\r\n"
    assert request.route == ROUTE_LOCAL


def test_auth_flow():
    parser = codec.request_parser(pool(redis_auth="s3cret"))
    locked = parser.feed(cmd("GET", "a") + cmd("PING") + cmd("MGET", "a", "b") + cmd("EVAL", "x", "1", "k"))
    assert [r.reply for r in locked] == [b"-NOAUTH Authentication required\r\n"] * 4
    assert all(r.route == ROUTE_LOCAL for r in locked)
    requests = parser.feed(cmd("AUTH", "wrong") + cmd("GET", "a") + cmd("AUTH", "s3cret") + cmd("GET", "a"))
    assert [r.reply for r in requests[:3]] == [
        b"-ERR invalid password\r\n",
        b"-NOAUTH Authentication required\r\n",
        b"+OK\r\n",
    ]
    assert (requests[3].route, requests[3].key) == (ROUTE_KEY, b"a")
    # A wrong password locks the connection again (as twemproxy does).
    requests = parser.feed(cmd("AUTH", "nope") + cmd("GET", "a") + b"AUTH s3cret\r\nGET a\r\n")
    assert [r.reply for r in requests] == [
        b"-ERR invalid password\r\n",
        b"-NOAUTH Authentication required\r\n",
        b"+OK\r\n",
        None,
    ]


def test_auth_with_username():
    parser = codec.request_parser(pool(redis_auth="pw"))
    replies = [r.reply for r in parser.feed(cmd("AUTH", "bob", "pw") + cmd("AUTH", "default", "pw"))]
    assert replies == [b"-ERR invalid password\r\n", b"+OK\r\n"]


IN_REFUSED_MULTI = b"-ERR MULTI is not supported by the proxy: command refused inside the refused transaction\r\n"


def test_a_refused_multi_refuses_every_command_until_exec_or_discard():
    parser = codec.request_parser(pool(transaction_connections=0))  # transactions off
    inside = cmd("SET", "k", "1") + cmd("INCR", "k") + cmd("MGET", "a", "b") + cmd("PING") + b"GET k\r\n" + cmd("MULTI")
    requests = parser.feed(cmd("GET", "a") + cmd("MULTI") + inside + cmd("DISCARD") + cmd("GET", "k"))
    assert requests[0].route == ROUTE_KEY
    assert requests[1].reply == b"-ERR unsupported command 'MULTI'\r\n"
    assert [r.reply for r in requests[2:8]] == [IN_REFUSED_MULTI] * 6
    assert all(r.route == ROUTE_LOCAL for r in requests[1:9])
    assert requests[8].reply == b"+OK\r\n"  # DISCARD ends the state
    assert (requests[9].route, requests[9].key) == (ROUTE_KEY, b"k")
    # EXEC ends it too, with Redis's answer when a queued command failed; the state
    # spans reads, even a frame cut in two.
    frame = cmd("SET", "k", "2")
    requests = parser.feed(b"multi\r\n" + frame[:9])
    requests += parser.feed(frame[9:] + cmd("EXEC") + cmd("EXEC") + cmd("DISCARD"))
    assert [r.reply for r in requests] == [
        b"-ERR unsupported command 'multi'\r\n",
        IN_REFUSED_MULTI,
        b"-EXECABORT Transaction discarded because of previous errors.\r\n",
        b"-ERR unsupported command 'EXEC'\r\n",  # no transaction any more
        b"-ERR unsupported command 'DISCARD'\r\n",
    ]


def test_quit_inside_a_refused_multi_closes():
    requests = parse(cmd("MULTI") + cmd("SET", "k", "1") + cmd("QUIT"), transaction_connections=0)
    assert requests[1].reply == IN_REFUSED_MULTI
    assert requests[2].reply == b"+OK\r\n" and requests[2].close_after


def test_multi_with_arguments_is_refused_without_a_transaction():
    requests = parse(cmd("MULTI", "x") + cmd("GET", "k"), transaction_connections=0)
    assert requests[0].reply == b"-ERR unsupported command 'MULTI'\r\n"
    assert requests[1].route == ROUTE_KEY


def test_unsupported_and_arity_errors_before_auth():
    requests = parse(cmd("KEYS", "*") + cmd("GET"), redis_auth="pw")
    assert requests[0].reply.startswith(b"-ERR unsupported command")
    assert requests[1].reply.startswith(b"-ERR wrong number of arguments")


@pytest.mark.parametrize(
    "numkeys, reply",
    [
        (b"0", b"-ERR 'eval' without keys is not supported: scripts are routed by their first key\r\n"),
        (b"-1", b"-ERR Number of keys can't be negative\r\n"),
        (b"x", b"-ERR value is not an integer or out of range\r\n"),
        (b"", b"-ERR value is not an integer or out of range\r\n"),
        (b"3", b"-ERR Number of keys can't be greater than number of args\r\n"),
        (b"9" * 20, b"-ERR value is not an integer or out of range\r\n"),
        (b"9" * 5000, b"-ERR value is not an integer or out of range\r\n"),
    ],
)
def test_eval_numkeys(numkeys, reply):
    request = only(cmd("EVAL", "return 1", numkeys, "k", "a"))
    assert (request.route, request.reply) == (ROUTE_LOCAL, reply)


# -- multi-key commands: split and merge ------------------------------------


class Fragment:
    def __init__(self, reply, key_indices):
        self.reply = reply
        self.key_indices = key_indices


MULTI_KEY = ["MGET", "DEL", "UNLINK", "TOUCH", "EXISTS"]


@pytest.mark.parametrize("name", MULTI_KEY)
def test_multi_key_request(name):
    frame = cmd(name, "a", "b", "c")
    request = only(frame)
    assert (request.route, request.keys, request.frame) == (ROUTE_KEYS, [b"a", b"b", b"c"], frame)
    assert request.command == name.lower().encode()


@pytest.mark.parametrize("name", MULTI_KEY)
def test_multi_key_split(name):
    request = only(cmd(name, "a", "b", "c", "d"))
    frames = codec.split(request, [[0, 2], [1], [3]])
    lower = name.lower()
    assert frames == [cmd(lower, "a", "c"), cmd(lower, "b"), cmd(lower, "d")]
    assert codec.split(request, [[0, 1, 2, 3]]) == [request.frame]
    assert summary(parse(b"".join(frames)))[0][2:5] == (None, [b"a", b"c"], ROUTE_KEYS)


def test_mset_request_and_split():
    frame = cmd("MSET", "a", "1", "b", "2", "c", b"\r\n3")
    request = only(frame)
    assert (request.route, request.keys, request.data) == (ROUTE_KEYS, [b"a", b"b", b"c"], [b"1", b"2", b"\r\n3"])
    frames = codec.split(request, [[0, 2], [1]])
    assert frames == [cmd("mset", "a", "1", "c", b"\r\n3"), cmd("mset", "b", "2")]


def test_mget_merge_in_client_order():
    request = only(cmd("MGET", "a", "b", "c", "d", "e"))
    fragments = [
        Fragment(b"*2\r\n$2\r\nva\r\n$-1\r\n", [0, 3]),
        Fragment(b"*3\r\n$4\r\nv\r\nb\r\n$0\r\n\r\n$-1\r\n", [1, 2, 4]),
    ]
    merged = codec.merge(request, fragments)
    assert merged == b"*5\r\n$2\r\nva\r\n$4\r\nv\r\nb\r\n$0\r\n\r\n$-1\r\n$-1\r\n"
    parser = codec.reply_parser()
    parser.feed(merged)
    assert parser.next_reply(None) == merged and parser.buffered() == 0


def test_mget_merge_single_fragment_and_errors():
    request = only(cmd("MGET", "a", "b"))
    reply = b"*2\r\n$1\r\n1\r\n$1\r\n2\r\n"
    assert codec.merge(request, [Fragment(reply, [0, 1])]) == reply
    error = b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"
    assert codec.merge(request, [Fragment(reply[:9] + b"\r\n", [0]), Fragment(error, [1])]) == error
    assert codec.merge(request, [Fragment(b":1\r\n", [0]), Fragment(b"*1\r\n$1\r\n2\r\n", [1])]).startswith(b"-ERR")
    assert codec.merge(request, [Fragment(b"*2\r\n$-1\r\n$-1\r\n", [0]), Fragment(b"*1\r\n$-1\r\n", [1])]).startswith(
        b"-ERR"
    )


@pytest.mark.parametrize("name", ["DEL", "UNLINK", "TOUCH", "EXISTS"])
def test_integer_merge_sums(name):
    request = only(cmd(name, "a", "b", "c"))
    fragments = [Fragment(b":2\r\n", [0, 2]), Fragment(b":0\r\n", [1])]
    assert codec.merge(request, fragments) == b":2\r\n"
    fragments = [Fragment(b":12\r\n", [0, 2]), Fragment(b":30\r\n", [1])]
    assert codec.merge(request, fragments) == b":42\r\n"
    fragments = [Fragment(b":1\r\n", [0, 2]), Fragment(b"-ERR boom\r\n", [1])]
    assert codec.merge(request, fragments) == b"-ERR boom\r\n"
    fragments = [Fragment(b":1\r\n", [0, 2]), Fragment(b"+OK\r\n", [1])]
    assert codec.merge(request, fragments).startswith(b"-ERR")


def test_mset_merge():
    request = only(cmd("MSET", "a", "1", "b", "2"))
    assert codec.merge(request, [Fragment(b"+OK\r\n", [0]), Fragment(b"+OK\r\n", [1])]) == b"+OK\r\n"
    error = b"-OOM command not allowed\r\n"
    assert codec.merge(request, [Fragment(b"+OK\r\n", [0]), Fragment(error, [1])]) == error


# -- replies -----------------------------------------------------------------

REPLIES = [
    b"+OK\r\n",
    b"-ERR unknown command\r\n",
    b"-WRONGTYPE bad\r\n",
    b":0\r\n",
    b":-12345\r\n",
    b"$5\r\nhello\r\n",
    b"$0\r\n\r\n",
    b"$-1\r\n",
    b"$6\r\n\r\n$1\r\n\r\n",
    b"*0\r\n",
    b"*-1\r\n",
    b"*3\r\n$1\r\na\r\n$-1\r\n:7\r\n",
    b"*2\r\n*2\r\n+a\r\n*1\r\n*0\r\n*-1\r\n",
    b"*1\r\n*1\r\n*1\r\n*1\r\n$3\r\ndeep\r\n".replace(b"$3", b"$4"),
    b"*4\r\n-ERR inside\r\n:1\r\n*2\r\n$2\r\nab\r\n*-1\r\n$-1\r\n",
    # RESP3
    b"_\r\n",
    b",3.14\r\n",
    b"#t\r\n",
    b"(12345678901234567890\r\n",
    b"=8\r\ntxt:abcd\r\n",
    b"!5\r\nERR x\r\n",
    b"%2\r\n+a\r\n:1\r\n+b\r\n*1\r\n:2\r\n",
    b"~2\r\n:1\r\n:2\r\n",
    # RESP3, every type a RESP3 client's backend connections may carry (see test_resp3.py)
    b",-inf\r\n",
    b",nan\r\n",
    b"#f\r\n",
    b"(-12345678901234567890123\r\n",
    b"=4\r\ntxt:\r\n",
    b"!21\r\nSYNTAX invalid syntax\r\n",
    b"!0\r\n\r\n",
    b"%0\r\n",
    b"%2\r\n$5\r\nfirst\r\n:1\r\n$6\r\nsecond\r\n%1\r\n+in\r\n_\r\n",
    b"~0\r\n",
    b"~3\r\n+a\r\n,1.5\r\n~1\r\n#f\r\n",
    b"|1\r\n+key-popularity\r\n%2\r\n$1\r\na\r\n,0.19\r\n$1\r\nb\r\n,0.05\r\n*2\r\n:2039123\r\n:9543892\r\n",  # attribute
    b"|0\r\n:7\r\n",
    b"*3\r\n:1\r\n|1\r\n+ttl\r\n:3600\r\n$1\r\nv\r\n_\r\n",  # an attribute on an element
    b"*2\r\n%1\r\n=5\r\ntxt:x\r\n(1\r\n~1\r\n!3\r\nERR\r\n",
]


def test_reply_types():
    for reply in REPLIES:
        parser = codec.reply_parser()
        parser.feed(reply)
        assert parser.next_reply(None) == reply
        assert parser.next_reply(None) is None
        assert parser.buffered() == 0


def test_reply_stream_at_every_split_point():
    stream = b"".join(REPLIES)
    for cut in range(len(stream) + 1):
        parser = codec.reply_parser()
        parser.feed(stream[:cut])
        got = []
        while True:
            reply = parser.next_reply(None)
            if reply is None:
                break
            got.append(reply)
        assert parser.buffered() == cut - sum(map(len, got))
        parser.feed(stream[cut:])
        while True:
            reply = parser.next_reply(None)
            if reply is None:
                break
            got.append(reply)
        assert got == REPLIES, cut
        assert parser.buffered() == 0


def test_reply_byte_by_byte():
    stream = b"".join(REPLIES)
    parser = codec.reply_parser()
    got = []
    for i in range(len(stream)):
        parser.feed(stream[i : i + 1])
        reply = parser.next_reply(None)
        while reply is not None:
            got.append(reply)
            reply = parser.next_reply(None)
    assert got == REPLIES and parser.buffered() == 0


def test_big_replies_in_small_reads_are_linear():
    bulk = b"$%d\r\n%s\r\n" % (30 * 1024 * 1024, b"x" * (30 * 1024 * 1024))
    array = b"*200000\r\n" + b"$10\r\n0123456789\r\n" * 200000
    stream = b":1\r\n" + bulk + array + b"+OK\r\n"
    parser = codec.reply_parser()
    got = []
    started = time.perf_counter()
    for i in range(0, len(stream), 16384):
        parser.feed(stream[i : i + 16384])
        reply = parser.next_reply(None)
        while reply is not None:
            got.append(reply)
            reply = parser.next_reply(None)
    assert time.perf_counter() - started < 10
    assert got == [b":1\r\n", bulk, array, b"+OK\r\n"]
    assert parser.buffered() == 0


def test_reply_buffered_counts_partial_and_extra_bytes():
    parser = codec.reply_parser()
    partial = b"*2\r\n$3\r\nabc\r\n$3\r\nd"
    parser.feed(partial)
    assert parser.next_reply(None) is None
    assert parser.buffered() == len(partial)
    parser.feed(b"ef\r\n+extra\r\n")
    assert parser.next_reply(None) == b"*2\r\n$3\r\nabc\r\n$3\r\ndef\r\n"
    assert parser.buffered() == len(b"+extra\r\n")


@pytest.mark.parametrize(
    "data",
    [
        b"?what\r\n",
        b"$x\r\n",
        b"$-2\r\n",
        b"$3\r\nabcd\r\n",
        b"*x\r\n",
        b"*-2\r\n",
        b"*2\r\n:1\r\n@\r\n",
        b"*1\r\n$2\r\nabc\r\n",
        b">2\r\n+a\r\n+b\r\n",
        b"*1\r\n>1\r\n+a\r\n",  # a push answers no request, even inside a reply
        b"|-1\r\n:1\r\n",
        b"%x\r\n",
        b"=x\r\n",
    ],
)
def test_bad_replies(data):
    parser = codec.reply_parser()
    parser.feed(data)
    with pytest.raises(ProtocolError):
        parser.next_reply(None)


# -- handshake, errors, filter -----------------------------------------------


def test_handshake():
    assert codec.handshake(pool()) == []
    requests = codec.handshake(pool(redis_auth="pw", redis_db=3))
    assert [r.frame for r in requests] == [cmd("AUTH", "pw"), cmd("SELECT", "3")]
    assert all(r.route == ROUTE_KEY and r.key is None for r in requests)
    assert [r.frame for r in codec.handshake(pool(redis_db=12))] == [cmd("SELECT", "12")]
    assert [r.frame for r in codec.handshake(pool(redis_auth="pw"))] == [cmd("AUTH", "pw")]
    assert codec.handshake_error(b"+OK\r\n") is None
    assert codec.handshake_error(b"-ERR invalid password\r\n") == "ERR invalid password"


def test_error_reply_and_filter():
    request = only(cmd("GET", "a"))
    reply = codec.error_reply(request, "server 10.0.0.1:6379 unavailable")
    assert reply == b"-ERR server 10.0.0.1:6379 unavailable\r\n"
    assert codec.error_reply(request, "two\r\nlines") == b"-ERR two  lines\r\n"
    assert codec.filter_reply(request, b"$1\r\nx\r\n") == b"$1\r\nx\r\n"


def _hello_reply(*args):
    parser = codec.request_parser(PoolConfig(name="p", listen=ListenSpec(host="127.0.0.1", port=1), redis=True, redis_auth="pw" if b"AUTH" in args else None))
    (request,) = parser.feed(multibulk([b"HELLO"] + list(args)))
    return request.reply


def test_hello_is_answered_locally_and_other_versions_refused():
    """HELLO 2 and 3 get Redis's server map (RESP3's is a map: see test_resp3.py); 4 gets NOPROTO."""
    assert _hello_reply().startswith(b"*14\r\n$6\r\nserver\r\n$12\r\ntwistedproxy\r\n")
    assert b":2\r\n" in _hello_reply(b"2")
    assert _hello_reply(b"3").startswith(b"%7\r\n$6\r\nserver\r\n$12\r\ntwistedproxy\r\n")
    assert _hello_reply(b"4").startswith(b"-NOPROTO ")
    assert _hello_reply(b"x").startswith(b"-ERR Protocol version")
    assert _hello_reply(b"2" * 5000).startswith(b"-ERR Protocol version")  # no ValueError out of int()
    assert _hello_reply(b"2", b"AUTH", b"default", b"bad") == b"-ERR invalid password\r\n"
    assert _hello_reply(b"2", b"AUTH", b"default", b"pw").startswith(b"*14\r\n")
