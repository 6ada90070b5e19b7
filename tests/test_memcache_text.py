"""
The memcached classic text protocol codec: request framing, noreply rewriting,
multi-get split/merge, local answers, errors, and backend reply framing.
Byte strings are as memcached's doc/protocol.txt documents them.
"""

from __future__ import annotations

import pytest
from zope.interface.verify import verifyObject

from twistedproxy.config.model import ListenSpec, PoolConfig
from twistedproxy.core.request import ROUTE_ALL, ROUTE_KEY, ROUTE_KEYS, ROUTE_LOCAL, ProtocolError, Request
from twistedproxy.protocols.interface import ICodec, IReplyParser, IRequestParser
from twistedproxy.protocols.memcache_text import MAX_LINE_LENGTH, VERSION, codec


def pool_config(max_request_bytes=1024 * 1024):
    return PoolConfig(name="test", listen=ListenSpec(host="127.0.0.1", port=22121), max_request_bytes=max_request_bytes)


# Local answers that read the clock (uptime, time): two feeds a second apart differ in them, so
# the framing checks compare everything but these replies; their tests check the reply itself.
CLOCK_REPLIES = (b"stats", b"stat")


def summary(request):
    return (
        request.frame,
        request.command,
        request.key,
        request.keys,
        request.route,
        None if request.command in CLOCK_REPLIES else request.reply,
        request.filter,
        request.data,
        request.close_after,
    )


def parse(data, parser_codec=codec, **config):
    """
    Frame C{data} fed whole, byte by byte, and cut in two at every offset; all
    three must frame the same requests.  Returns the requests of the whole feed.
    """
    whole = parser_codec.request_parser(pool_config(**config)).feed(data)
    expected = [summary(r) for r in whole]
    parser = parser_codec.request_parser(pool_config(**config))
    bytewise = []
    for i in range(len(data)):
        bytewise.extend(parser.feed(data[i : i + 1]))
    assert [summary(r) for r in bytewise] == expected
    assert parser.buffered() == 0
    for cut in range(1, len(data)):
        parser = parser_codec.request_parser(pool_config(**config))
        halves = parser.feed(data[:cut]) + parser.feed(data[cut:])
        assert [summary(r) for r in halves] == expected
    return whole


def parse_one(data, **config):
    requests = parse(data, **config)
    assert len(requests) == 1, requests
    return requests[0]


def replies(data, requests=None):
    """Frame backend bytes into replies, whole and byte by byte (must agree)."""
    parser = codec.reply_parser()
    parser.feed(data)
    whole = []
    while True:
        reply = parser.next_reply(None)
        if reply is None:
            break
        whole.append(reply)
    assert parser.buffered() == 0
    parser = codec.reply_parser()
    bytewise = []
    for i in range(len(data)):
        parser.feed(data[i : i + 1])
        while True:
            reply = parser.next_reply(None)
            if reply is None:
                break
            bytewise.append(reply)
    assert bytewise == whole
    return whole


class Fragment(object):
    def __init__(self, reply, key_indices=None):
        self.reply = reply
        self.key_indices = key_indices


# -- the interface ------------------------------------------------------------


def test_provides_the_interfaces():
    assert verifyObject(ICodec, codec)
    assert verifyObject(IRequestParser, codec.request_parser(pool_config()))
    assert verifyObject(IReplyParser, codec.reply_parser())
    assert codec.request_parser(pool_config()).codec is codec
    assert codec.handshake(pool_config()) == []
    assert codec.handshake_error(b"OK\r\n") is None


# -- retrieval ----------------------------------------------------------------


@pytest.mark.parametrize("command", [b"get", b"gets"])
def test_single_key_get_routes_by_key(command):
    request = parse_one(command + b" foo\r\n")
    assert request.route == ROUTE_KEY
    assert request.key == b"foo"
    assert request.command == command
    assert request.frame == command + b" foo\r\n"
    assert not request.filter


def test_bare_newline_terminates_a_line():
    request = parse_one(b"get foo\n")
    assert request.key == b"foo"
    assert request.frame == b"get foo\n"


@pytest.mark.parametrize("command", [b"get", b"gets"])
def test_multi_key_get_splits_per_server_group(command):
    request = parse_one(command + b" a b c d\r\n")
    assert request.route == ROUTE_KEYS
    assert request.keys == [b"a", b"b", b"c", b"d"]
    assert codec.split(request, [[0, 2], [1], [3]]) == [
        command + b" a c\r\n",
        command + b" b\r\n",
        command + b" d\r\n",
    ]


def test_get_and_touch():
    single = parse_one(b"gat 100 foo\r\n")
    assert (single.route, single.key, single.frame) == (ROUTE_KEY, b"foo", b"gat 100 foo\r\n")
    multi = parse_one(b"gats -1 a b\r\n")
    assert multi.route == ROUTE_KEYS
    assert multi.keys == [b"a", b"b"]
    assert codec.split(multi, [[1], [0]]) == [b"gats -1 b\r\n", b"gats -1 a\r\n"]


def test_get_without_key_is_an_error():
    assert parse_one(b"get\r\n").reply == b"ERROR\r\n"
    assert parse_one(b"gets\r\n").reply == b"ERROR\r\n"
    assert parse_one(b"gat\r\n").reply == b"ERROR\r\n"
    # an exptime but no key: memcached 1.6 touches nothing and answers END
    assert parse_one(b"gat 10\r\n").reply == b"END\r\n"


def test_gat_with_bad_exptime():
    request = parse_one(b"gat soon foo\r\n")
    assert request.route == ROUTE_LOCAL
    assert request.reply == b"CLIENT_ERROR invalid exptime argument\r\n"


def test_merge_restores_client_key_order_with_misses():
    request = parse_one(b"get k1 k2 k3 k4 k5\r\n")
    # server A had k1, k3, k5 (k3 missing); server B had k2, k4 (both hit)
    fragment_a = Fragment(b"VALUE k5 0 2\r\nv5\r\nVALUE k1 1 2\r\nv1\r\nEND\r\n", [0, 2, 4])
    fragment_b = Fragment(b"VALUE k2 0 2\r\nv2\r\nVALUE k4 0 2\r\nv4\r\nEND\r\n", [1, 3])
    merged = codec.merge(request, [fragment_a, fragment_b])
    assert merged == (
        b"VALUE k1 1 2\r\nv1\r\n"
        b"VALUE k2 0 2\r\nv2\r\n"
        b"VALUE k4 0 2\r\nv4\r\n"
        b"VALUE k5 0 2\r\nv5\r\n"
        b"END\r\n"
    )


def test_merge_of_all_misses_is_one_end():
    request = parse_one(b"gets a b\r\n")
    assert codec.merge(request, [Fragment(b"END\r\n", [0]), Fragment(b"END\r\n", [1])]) == b"END\r\n"


def test_merge_keeps_gets_cas_and_binary_safe_data():
    request = parse_one(b"gets a b\r\n")
    value = b"x\r\nEND\r\ny"
    merged = codec.merge(
        request,
        [Fragment(b"END\r\n", [0]), Fragment(b"VALUE b 5 9 77\r\n" + value + b"\r\nEND\r\n", [1])],
    )
    assert merged == b"VALUE b 5 9 77\r\n" + value + b"\r\nEND\r\n"


def test_merge_repeats_a_key_asked_twice():
    request = parse_one(b"get a b a\r\n")
    merged = codec.merge(
        request,
        [Fragment(b"VALUE a 0 1\r\n1\r\nVALUE a 0 1\r\n1\r\nEND\r\n", [0, 2]), Fragment(b"END\r\n", [1])],
    )
    assert merged == b"VALUE a 0 1\r\n1\r\nVALUE a 0 1\r\n1\r\nEND\r\n"


def test_merge_passes_an_error_fragment_through():
    request = parse_one(b"get a b\r\n")
    merged = codec.merge(
        request,
        [Fragment(b"VALUE a 0 1\r\n1\r\nEND\r\n", [0]), Fragment(b"SERVER_ERROR out of memory\r\n", [1])],
    )
    assert merged == b"SERVER_ERROR out of memory\r\n"


def test_long_multi_get_line_is_allowed():
    keys = [b"key%05d" % i for i in range(2000)]
    line = b"get " + b" ".join(keys) + b"\r\n"
    assert len(line) > MAX_LINE_LENGTH
    parser = codec.request_parser(pool_config())
    requests = []
    for i in range(0, len(line), 1000):
        requests.extend(parser.feed(line[i : i + 1000]))
    assert len(requests) == 1
    assert requests[0].keys == keys


# -- storage ------------------------------------------------------------------


@pytest.mark.parametrize("command", [b"set", b"add", b"replace", b"append", b"prepend"])
def test_storage_frame_includes_the_data_block(command):
    data = command + b" foo 5 300 10\r\nab\r\ncd\r\nef\r\n"
    request = parse_one(data)
    assert request.route == ROUTE_KEY
    assert request.key == b"foo"
    assert request.command == command
    assert request.frame == data
    assert not request.filter


def test_cas():
    data = b"cas foo 0 0 3 12345\r\nbar\r\n"
    request = parse_one(data)
    assert (request.command, request.key, request.frame) == (b"cas", b"foo", data)


def test_empty_data_block():
    request = parse_one(b"set foo 0 0 0\r\n\r\n")
    assert request.frame == b"set foo 0 0 0\r\n\r\n"


def test_negative_exptime_is_accepted():
    assert parse_one(b"set foo 0 -1 1\r\nx\r\n").route == ROUTE_KEY


@pytest.mark.parametrize(
    "data, frame",
    [
        (b"set foo 0 0 5 noreply\r\nhello\r\n", b"set foo 0 0 5\r\nhello\r\n"),
        (b"add foo 1 2 5 noreply\r\nhello\r\n", b"add foo 1 2 5\r\nhello\r\n"),
        (b"replace foo 0 0 1 noreply\r\nx\r\n", b"replace foo 0 0 1\r\nx\r\n"),
        (b"append foo 0 0 1 noreply\r\nx\r\n", b"append foo 0 0 1\r\nx\r\n"),
        (b"prepend foo 0 0 1 noreply\r\nx\r\n", b"prepend foo 0 0 1\r\nx\r\n"),
        (b"cas foo 0 0 1 99 noreply\r\nx\r\n", b"cas foo 0 0 1 99\r\nx\r\n"),
        (b"delete foo noreply\r\n", b"delete foo\r\n"),
        (b"delete foo 0 noreply\r\n", b"delete foo 0\r\n"),
        (b"incr foo 5 noreply\r\n", b"incr foo 5\r\n"),
        (b"decr foo 5 noreply\r\n", b"decr foo 5\r\n"),
        (b"touch foo 10 noreply\r\n", b"touch foo 10\r\n"),
    ],
)
def test_noreply_is_stripped_toward_the_backend_and_filtered(data, frame):
    request = parse_one(data)
    assert request.route == ROUTE_KEY
    assert request.key == b"foo"
    assert request.frame == frame
    assert request.filter
    for backend_reply in (b"STORED\r\n", b"NOT_STORED\r\n", b"DELETED\r\n", b"NOT_FOUND\r\n", b"6\r\n"):
        assert codec.filter_reply(request, backend_reply) == b""
    # memcached itself sends nothing at all for noreply, errors included: the
    # client never reads, so a line would answer its next command.
    assert codec.filter_reply(request, b"SERVER_ERROR out of memory\r\n") == b""
    assert codec.error_reply(request, "timeout") == b""


def test_bad_data_chunk_keeps_framing():
    requests = parse(b"set foo 0 0 3\r\nabcde\r\nget foo\r\n")
    assert [r.reply for r in requests[:1]] == [b"CLIENT_ERROR bad data chunk\r\n"]
    # memcached consumes <bytes>+2 (b"abcde") and reads on: the b"\r\n" left is an empty command
    assert requests[1].reply == b"ERROR\r\n"
    assert requests[2].key == b"foo"


def test_bad_data_chunk_with_noreply_is_silent():
    requests = parse(b"set foo 0 0 1 noreply\r\nxy\r\nget foo\r\n")
    assert requests[0].route == ROUTE_LOCAL
    assert requests[0].reply == b""
    assert requests[-1].key == b"foo"


@pytest.mark.parametrize(
    "line",
    [
        b"set foo bar 0 3",  # flags not a number
        b"set foo -1 0 3",  # negative flags
        b"set foo 4294967296 0 3",  # flags over 32 bits
        b"set foo 0 later 3",  # exptime not a number
        b"set foo 0 99999999999 3",  # exptime over 32 bits
        b"set foo 0 0 3 extra tokens",  # too many tokens
        b"cas foo 0 0 3 notanumber",  # bad cas unique
        b"cas foo 0 0 3",  # cas without its unique
        b"set " + b"k" * 251 + b" 0 0 3",  # key too long
        b"set fo\x01o 0 0 3",  # control character in the key
    ],
)
def test_malformed_storage_line_skips_its_readable_data_block(line):
    requests = parse(line + b"\r\nabc\r\nget next\r\n")
    assert len(requests) == 2
    assert requests[0].route == ROUTE_LOCAL
    assert requests[0].reply.startswith(b"CLIENT_ERROR ")
    assert requests[1].key == b"next"


@pytest.mark.parametrize("line", [b"set foo 0 0 -1", b"set foo 0 0 x", b"set foo 0 0"])
def test_unreadable_length_reads_on_with_the_next_line(line):
    requests = parse(line + b"\r\nget next\r\n")
    # too few tokens is memcached's ERROR; a malformed length its CLIENT_ERROR
    assert requests[0].reply.startswith(b"ERROR" if line.count(b" ") < 4 else b"CLIENT_ERROR ")
    assert requests[1].key == b"next"


def test_malformed_command_with_noreply_answers_nothing():
    requests = parse(b"set " + b"k" * 251 + b" 0 0 1 noreply\r\nx\r\nincr foo bad noreply\r\n")
    assert [(r.route, r.reply) for r in requests] == [(ROUTE_LOCAL, b""), (ROUTE_LOCAL, b"")]


def test_key_of_250_bytes_is_fine_251_is_not():
    assert parse_one(b"get " + b"k" * 250 + b"\r\n").route == ROUTE_KEY
    request = parse_one(b"get " + b"k" * 251 + b"\r\n")
    assert request.reply == b"CLIENT_ERROR key too long\r\n"
    request = parse_one(b"get a " + b"k" * 251 + b"\r\n")
    assert request.reply == b"CLIENT_ERROR key too long\r\n"


def test_control_characters_are_rejected():
    for line in (b"get a\tb\r\n", b"get a\x00\r\n", b"delete a\x7f\r\n", b"get a\rb\r\n"):
        request = parse_one(line)
        assert request.route == ROUTE_LOCAL
        assert request.reply == b"CLIENT_ERROR control characters in command line\r\n"


def test_high_bytes_in_keys_are_allowed():
    assert parse_one(b"get caf\xc3\xa9\r\n").key == b"caf\xc3\xa9"
    # bytes the parser's quick printable check does not vouch for (C1 range, soft hyphen)
    assert parse_one(b"get a\x85\xad\r\n").key == b"a\x85\xad"
    assert parse_one(b"set a\x9f 0 0 1\r\nx\r\n").frame == b"set a\x9f 0 0 1\r\nx\r\n"


# The common shapes (get/gets/delete <key>, set without noreply) take a fast
# path in the parser; these are the edges where it must hand over to the rules.
@pytest.mark.parametrize(
    "data, key, reply",
    [
        (b"get noreply\r\n", b"noreply", None),  # a key, not a flag
        (b"delete noreply\r\n", None, b""),  # a noreply delete without key: silent
        (b"set foo 4294967295 2147483647 1\r\nx\r\n", b"foo", None),  # 10-digit bounds
        (b"set foo 4294967296 0 1\r\nx\r\n", None, b"CLIENT_ERROR bad command line format\r\n"),
        (b"set foo 0 2147483648 1\r\nx\r\n", None, b"CLIENT_ERROR bad command line format\r\n"),
        (b"set foo 0 0 1\r\nx\n\n", None, b"CLIENT_ERROR bad data chunk\r\n"),
        (b"set foo 0 0 1\r\nxy\r\n", None, b"CLIENT_ERROR bad data chunk\r\n"),
        (b"set foo\x01 0 0 1\r\nx\r\n", None, b"CLIENT_ERROR control characters in command line\r\n"),
        (b"set  foo 0 0 1\r\nx\r\n", b"foo", None),  # extra blanks split like memcached's tokenizer
        (b"get  foo\r\n", b"foo", None),
        (b"gets foo \r\n", b"foo", None),
        (b"get\tfoo\r\n", None, b"CLIENT_ERROR control characters in command line\r\n"),
        (b"get fo\x7fo\r\n", None, b"CLIENT_ERROR control characters in command line\r\n"),
        (b"gets fo\x0bo\r\n", None, b"CLIENT_ERROR control characters in command line\r\n"),
        (b"get foo\r\r\n", None, b"CLIENT_ERROR control characters in command line\r\n"),
        (b"getx foo\r\n", None, b"ERROR\r\n"),
        (b"get\n", None, b"ERROR\r\n"),
        (b"gets\r\n", None, b"ERROR\r\n"),
        (b"delete foo\r\n", b"foo", None),
        (b"get " + b"k" * 251 + b"\r\n", None, b"CLIENT_ERROR key too long\r\n"),
    ],
)
def test_common_shapes_at_their_edges(data, key, reply):
    requests = parse(data)
    assert (requests[0].key, requests[0].reply) == (key, reply)


def test_data_block_over_the_limit_loses_framing():
    parser = codec.request_parser(pool_config(max_request_bytes=100))
    with pytest.raises(ProtocolError) as caught:
        parser.feed(b"get a\r\nset foo 0 0 101\r\n")
    assert caught.value.reply == b"SERVER_ERROR object too large for cache\r\n"
    assert [r.key for r in caught.value.requests] == [b"a"]
    # at the limit is fine
    request = parse_one(b"set foo 0 0 100\r\n" + b"x" * 100 + b"\r\n", max_request_bytes=100)
    assert request.key == b"foo"


@pytest.mark.parametrize(
    "line, reply",
    [
        (b"incr k " + b"9" * 5000, b"CLIENT_ERROR invalid numeric delta argument\r\n"),
        (b"incr k " + b"0" * 5000 + b"1", None),  # leading zeros count for nothing, as in memcached
        (b"touch k " + b"9" * 5000, b"CLIENT_ERROR invalid exptime argument\r\n"),
        (b"touch k -" + b"9" * 5000, b"CLIENT_ERROR invalid exptime argument\r\n"),
        (b"gat " + b"9" * 5000 + b" k", b"CLIENT_ERROR invalid exptime argument\r\n"),
        (b"set k " + b"9" * 5000 + b" 0 1", b"CLIENT_ERROR bad command line format\r\n"),
        (b"verbosity " + b"9" * 5000, b"CLIENT_ERROR bad command line format\r\n"),
    ],
)
def test_numbers_of_thousands_of_digits_are_judged_not_raised(line, reply):
    requests = parse(line + b"\r\n" + (b"x\r\n" if line.startswith(b"set") else b""))
    assert requests[0].reply == reply


@pytest.mark.parametrize("line", [b"set k 0 0 " + b"9" * 5000, b"set k 0 0 " + b"9" * 20, b"ms k " + b"9" * 5000])
def test_data_length_of_thousands_of_digits_is_too_large(line):
    for data in (line + b"\r\n", line + b" noreply\r\n"):
        with pytest.raises(ProtocolError) as caught:
            codec.request_parser(pool_config()).feed(data)
        assert caught.value.reply == b"SERVER_ERROR object too large for cache\r\n"
    assert parse_one(b"set k 0 0 " + b"0" * 5000 + b"1\r\nx\r\n").key == b"k"


def test_line_without_newline_over_the_limit_loses_framing():
    parser = codec.request_parser(pool_config())
    assert len(parser.feed(b"get a\r\n")) == 1
    with pytest.raises(ProtocolError) as caught:
        parser.feed(b"delete " + b"x" * MAX_LINE_LENGTH)
    assert caught.value.reply == b"CLIENT_ERROR line too long\r\n"
    parser = codec.request_parser(pool_config())
    with pytest.raises(ProtocolError) as caught:
        parser.feed(b"get a\r\n" + b"y" * (MAX_LINE_LENGTH + 1))
    assert [r.key for r in caught.value.requests] == [b"a"]


@pytest.mark.parametrize(
    "line, refused",
    [
        (b"delete" + b" " * (MAX_LINE_LENGTH - 8) + b"k\r", False),  # at the limit, with its CR
        (b"delete" + b" " * (MAX_LINE_LENGTH - 7) + b"k\r", True),
        (b"set k 0 0 1" + b" " * MAX_LINE_LENGTH, True),
        (b"get " + b"k " * 5000, False),  # a multi-get may run up to max_request_bytes
    ],
)
def test_long_lines_are_refused_alike_whole_or_in_reads(line, refused):
    """A complete line past the limit is refused as when its newline comes in a later read."""
    data = line + b"\n" + (b"x\r\n" if line.startswith(b"set") else b"")
    for reads in ([data], [line, data[len(line) :]]):
        parser = codec.request_parser(pool_config(max_request_bytes=20000))
        try:
            for read in reads:
                parser.feed(read)
        except ProtocolError as e:
            assert refused and e.reply == b"CLIENT_ERROR line too long\r\n"
        else:
            assert not refused


def test_large_data_block_is_not_rejoined_on_every_read():
    parser = codec.request_parser(pool_config())
    value = b"v" * 200000
    data = b"set big 0 0 %d\r\n" % len(value) + value + b"\r\n"
    pieces = [data[i : i + 1000] for i in range(0, len(data), 1000)]
    for count, piece in enumerate(pieces[:-1], 1):
        assert parser.feed(piece) == []
        assert parser.buffered() == count * 1000
    # the pieces wait unjoined until the block is complete
    assert len(parser._chunks) == len(pieces) - 1
    requests = parser.feed(pieces[-1])
    assert [r.frame for r in requests] == [data]
    assert parser.buffered() == 0


# -- other keyed commands ------------------------------------------------------


def test_delete_forms():
    assert parse_one(b"delete foo\r\n").key == b"foo"
    assert parse_one(b"delete foo 0\r\n").frame == b"delete foo 0\r\n"
    usage = b"CLIENT_ERROR bad command line format.  Usage: delete <key> [noreply]\r\n"
    assert parse_one(b"delete\r\n").reply == b"ERROR\r\n"  # a token count memcached rejects
    assert parse_one(b"delete foo 1\r\n").reply == usage
    assert parse_one(b"delete a b c d e\r\n").reply == b"ERROR\r\n"
    assert parse_one(b"delete a b c\r\n").reply == usage


@pytest.mark.parametrize("command", [b"incr", b"decr"])
def test_arithmetic(command):
    request = parse_one(command + b" counter 18446744073709551615\r\n")
    assert (request.route, request.key, request.command) == (ROUTE_KEY, b"counter", command)
    for bad in (b"x", b"-1", b"18446744073709551616", b"1.5"):
        request = parse_one(command + b" counter " + bad + b"\r\n")
        assert request.reply == b"CLIENT_ERROR invalid numeric delta argument\r\n"
    assert parse_one(command + b" counter\r\n").reply == b"ERROR\r\n"


def test_touch():
    request = parse_one(b"touch foo 3600\r\n")
    assert (request.route, request.key) == (ROUTE_KEY, b"foo")
    assert parse_one(b"touch foo soon\r\n").reply == b"CLIENT_ERROR invalid exptime argument\r\n"
    assert parse_one(b"touch foo\r\n").reply == b"ERROR\r\n"


# -- broadcast and local commands -----------------------------------------------


def test_flush_all_goes_to_every_server_with_one_reply():
    for line in (b"flush_all\r\n", b"flush_all 10\r\n", b"flush_all -1\r\n"):
        request = parse_one(line)
        assert request.route == ROUTE_ALL
        assert request.frame == line
        assert not request.filter
        assert codec.merge(request, [Fragment(b"OK\r\n"), Fragment(b"OK\r\n")]) == b"OK\r\n"
    request = parse_one(b"flush_all\r\n")
    failed = codec.merge(request, [Fragment(b"OK\r\n"), Fragment(b"CLIENT_ERROR flush_all not allowed\r\n")])
    assert failed == b"CLIENT_ERROR flush_all not allowed\r\n"


def test_flush_all_noreply():
    for line, frame in ((b"flush_all noreply\r\n", b"flush_all\r\n"), (b"flush_all 5 noreply\r\n", b"flush_all 5\r\n")):
        request = parse_one(line)
        assert (request.route, request.frame, request.filter) == (ROUTE_ALL, frame, True)
        assert codec.filter_reply(request, codec.merge(request, [Fragment(b"OK\r\n")])) == b""


def test_flush_all_errors():
    assert parse_one(b"flush_all soon\r\n").reply == b"CLIENT_ERROR invalid exptime argument\r\n"
    assert parse_one(b"flush_all 1 2 3\r\n").reply == b"ERROR\r\n"


def test_verbosity():
    request = parse_one(b"verbosity 1\r\n")
    assert (request.route, request.frame) == (ROUTE_ALL, b"verbosity 1\r\n")
    assert codec.merge(request, [Fragment(b"OK\r\n")] * 3) == b"OK\r\n"
    quiet = parse_one(b"verbosity 0 noreply\r\n")
    assert (quiet.route, quiet.frame, quiet.filter) == (ROUTE_ALL, b"verbosity 0\r\n", True)
    # what memccapable checks
    assert parse_one(b"verbosity foo bar my\r\n").reply == b"ERROR\r\n"
    assert parse_one(b"verbosity\r\n").reply == b"ERROR\r\n"
    assert parse_one(b"verbosity noreply\r\n").reply == b""


def test_version_is_answered_locally():
    for line in (b"version\r\n", b"version foo bar\r\n", b"version noreply\r\n"):
        request = parse_one(line)
        assert request.route == ROUTE_LOCAL
        assert request.reply == b"VERSION " + VERSION + b"\r\n"
    major, minor = VERSION.split(b".")[:2]
    assert (int(major), int(minor)) >= (1, 6)


def test_stats_is_answered_locally():
    request = parse_one(b"stats\r\n")
    assert request.route == ROUTE_LOCAL
    lines = request.reply.split(b"\r\n")
    assert lines[-2:] == [b"END", b""]
    assert all(entry.startswith(b"STAT ") and len(entry.split()) == 3 for entry in lines[:-2])
    assert b"STAT version " + VERSION in lines


def test_stats_reset():
    assert parse_one(b"stats reset\r\n").reply == b"RESET\r\n"


@pytest.mark.parametrize("group", [b"items", b"slabs", b"settings", b"conns"])
def test_stats_group_lists_nothing(group):
    request = parse_one(b"stats " + group + b"\r\n")
    assert (request.route, request.reply) == (ROUTE_LOCAL, b"END\r\n")


@pytest.mark.parametrize("line", [b"stats noreply\r\n", b"stats bogus\r\n", b"stats slabs 1 2\r\n"])
def test_stats_unknown_group_is_an_error(line):
    # memcached answers ERROR here; memccapable's "ascii stat" checks it for noreply
    assert parse_one(line).reply == b"ERROR\r\n"


def test_quit_closes_and_stops_reading():
    parser = codec.request_parser(pool_config())
    requests = parser.feed(b"get a\r\nquit\r\nget b\r\n")
    assert [r.command for r in requests] == [b"get", b"quit"]
    assert (requests[1].route, requests[1].reply, requests[1].close_after) == (ROUTE_LOCAL, b"", True)
    assert parser.feed(b"get c\r\n") == []
    assert parse_one(b"quit now please\r\n").close_after


def test_unknown_and_empty_commands_answer_error_and_keep_framing():
    requests = parse(b"bogus a b\r\n\r\nGET a\r\nslabs automove 1\r\nget a\r\n")
    assert [r.reply for r in requests[:4]] == [b"ERROR\r\n"] * 4
    assert requests[4].key == b"a"


def test_pipeline_of_everything():
    data = (
        b"set a 0 0 1\r\n1\r\n"
        b"get a b\r\n"
        b"incr a 1 noreply\r\n"
        b"version\r\n"
        b"delete a\r\n"
        b"flush_all\r\n"
        b"gets a\r\n"
    )
    requests = parse(data)
    assert [(r.command, r.route) for r in requests] == [
        (b"set", ROUTE_KEY),
        (b"get", ROUTE_KEYS),
        (b"incr", ROUTE_KEY),
        (b"version", ROUTE_LOCAL),
        (b"delete", ROUTE_KEY),
        (b"flush_all", ROUTE_ALL),
        (b"gets", ROUTE_KEY),
    ]


# -- errors toward the client -----------------------------------------------------


def test_error_reply_is_a_server_error_line():
    request = parse_one(b"get foo\r\n")
    assert codec.error_reply(request, "timeout on 127.0.0.1:11211") == b"SERVER_ERROR timeout on 127.0.0.1:11211\r\n"
    assert codec.error_reply(request, "two\r\nlines") == b"SERVER_ERROR two lines\r\n"
    multi = parse_one(b"get a b\r\n")
    assert codec.error_reply(multi, "server down") == b"SERVER_ERROR server down\r\n"


# -- backend replies --------------------------------------------------------------


def test_reply_framing_of_one_line_replies():
    data = b"STORED\r\nNOT_STORED\r\nEXISTS\r\nNOT_FOUND\r\nDELETED\r\nTOUCHED\r\n42\r\nOK\r\n"
    assert replies(data) == [line + b"\r\n" for line in data.split(b"\r\n")[:-1]]


def test_reply_framing_of_retrievals():
    hit = b"VALUE foo 0 5\r\nhello\r\nEND\r\n"
    miss = b"END\r\n"
    multi = b"VALUE a 1 3 10\r\nEND\r\nVALUE b 2 0 11\r\n\r\nEND\r\n"
    assert replies(hit + miss + multi) == [hit, miss, multi]


def test_reply_framing_of_errors():
    data = b"ERROR\r\nCLIENT_ERROR bad data chunk\r\nSERVER_ERROR out of memory storing object\r\n"
    assert replies(data) == [line + b"\r\n" for line in data.split(b"\r\n")[:-1]]


def test_reply_parser_waits_for_large_values():
    parser = codec.reply_parser()
    value = b"z" * 100000
    reply = b"VALUE big 0 %d\r\n" % len(value) + value + b"\r\nEND\r\n"
    request = Request(b"get big\r\n", b"get", b"big")
    for i in range(0, len(reply) - 1, 4096):
        parser.feed(reply[i : min(i + 4096, len(reply) - 1)])
        assert parser.next_reply(request) is None
    parser.feed(reply[-1:])
    assert parser.next_reply(request) == reply
    assert parser.buffered() == 0


def test_reply_parser_buffered_counts_unread_bytes():
    parser = codec.reply_parser()
    parser.feed(b"STORED\r\nVALUE a 0 1\r\n")
    assert parser.buffered() == 21
    assert parser.next_reply(None) == b"STORED\r\n"
    assert parser.buffered() == 13
    assert parser.next_reply(None) is None
    parser.feed(b"x\r\nEND\r\n")
    assert parser.next_reply(None) == b"VALUE a 0 1\r\nx\r\nEND\r\n"
    assert parser.buffered() == 0


def test_reply_parser_does_not_copy_a_read_it_has_no_leftover_for():
    parser = codec.reply_parser()
    data = b"STORED\r\nVALUE a 0 1\r\nx\r\nEND\r\n"
    parser.feed(data)
    assert parser.next_reply(None) == b"STORED\r\n"
    assert parser.next_reply(None) == b"VALUE a 0 1\r\nx\r\nEND\r\n"
    data = b"END\r\n"
    parser.feed(data)
    assert parser._buf is data
    assert parser.next_reply(None) == b"END\r\n"
    assert parser.buffered() == 0


def test_reply_parser_hit_whose_end_comes_later():
    assert replies(b"VALUE a 0 1\r\nx\r\nSERVER_ERROR oops\r\nEND\r\n") == [
        b"VALUE a 0 1\r\nx\r\nSERVER_ERROR oops\r\n",
        b"END\r\n",
    ]
    parser = codec.reply_parser()
    parser.feed(b"VALUE a 0 1\r\nx\r\nEN")
    assert parser.next_reply(None) is None
    parser.feed(b"D\r\nSTORED\r\n")
    assert parser.next_reply(None) == b"VALUE a 0 1\r\nx\r\nEND\r\n"
    assert parser.next_reply(None) == b"STORED\r\n"


def test_reply_parser_rejects_garbage():
    for data in (
        b"VALUE a 0 x\r\n",
        b"VALUE a 0\r\n",
        b"VALUE a 0 1\r\nxyz\r\n",
        b"S" * 70000,
        b"VALUE a 0 " + b"9" * 5000 + b"\r\n",  # a ProtocolError, not int()'s ValueError
        b"VA " + b"9" * 5000 + b"\r\n",
    ):
        parser = codec.reply_parser()
        parser.feed(data)
        with pytest.raises(ProtocolError):
            parser.next_reply(None)
