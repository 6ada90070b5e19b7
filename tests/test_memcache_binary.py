"""
The memcached binary protocol codec (packet framing, quiet opcode rewriting,
local noop/version/stat/quit, errors) and the sniffing memcache codec that picks
text or binary on a connection's first byte.
"""

from __future__ import annotations

import struct

import pytest
from zope.interface.verify import verifyObject

from tests.test_memcache_text import Fragment, parse, pool_config
from twistedproxy.core.request import ROUTE_ALL, ROUTE_KEY, ROUTE_LOCAL, ProtocolError
from twistedproxy.protocols import codec_for, codecs_of, memcache, memcache_binary, memcache_text
from twistedproxy.protocols.interface import ICodec, IReplyParser, IRequestParser
from twistedproxy.protocols.memcache_binary import codec

OPAQUE = 0xDEADBEEF

GET, SET, ADD, REPLACE, DELETE, INCR, DECR, QUIT, FLUSH, GETQ, NOOP, VERSION, GETK, GETKQ = range(0x0E)
APPEND, PREPEND, STAT, SETQ, ADDQ, REPLACEQ, DELETEQ, INCRQ, DECRQ, QUITQ, FLUSHQ, APPENDQ, PREPENDQ = range(
    0x0E, 0x1B
)
TOUCH, GAT, GATQ, GATK, GATKQ = 0x1C, 0x1D, 0x1E, 0x23, 0x24


def packet(opcode, key=b"", extras=b"", value=b"", opaque=OPAQUE, cas=0, magic=0x80, status=0):
    """A request (magic 0x80; status is the vbucket) or response (0x81) packet."""
    header = struct.pack(
        ">BBHBBHIIQ",
        magic,
        opcode,
        len(key),
        len(extras),
        0,
        status,
        len(extras) + len(key) + len(value),
        opaque,
        cas,
    )
    return header + extras + key + value


def reply_packet(opcode, status=0, key=b"", extras=b"", value=b"", opaque=OPAQUE, cas=0):
    return packet(opcode, key, extras, value, opaque, cas, magic=0x81, status=status)


def store_extras(flags=0, exptime=0):
    return struct.pack(">II", flags, exptime)


def arithmetic_extras(delta=1, initial=0, exptime=0):
    return struct.pack(">QQI", delta, initial, exptime)


def header(raw):
    """magic, opcode, keylen, extlen, datatype, status, bodylen, opaque, cas"""
    return struct.unpack(">BBHBBHIIQ", raw[:24])


def packets(raw):
    """Cut a string of response packets apart."""
    out = []
    while raw:
        end = 24 + header(raw)[6]
        out.append(raw[:end])
        raw = raw[end:]
    return out


def parse_binary(data, **config):
    return parse(data, parser_codec=codec, **config)


def parse_one(data, **config):
    requests = parse_binary(data, **config)
    assert len(requests) == 1, requests
    return requests[0]


def test_provides_the_interfaces():
    assert verifyObject(ICodec, codec)
    assert verifyObject(IRequestParser, codec.request_parser(pool_config()))
    assert verifyObject(IReplyParser, codec.reply_parser())
    assert codec.handshake(pool_config()) == []
    assert codec.handshake_error(reply_packet(NOOP)) is None


# -- keyed commands --------------------------------------------------------------


@pytest.mark.parametrize(
    "opcode, command, extras, value",
    [
        (GET, b"get", b"", b""),
        (GETK, b"getk", b"", b""),
        (SET, b"set", store_extras(5, 60), b"value"),
        (ADD, b"add", store_extras(), b"value"),
        (REPLACE, b"replace", store_extras(), b""),
        (APPEND, b"append", b"", b" world"),
        (PREPEND, b"prepend", b"", b"hello "),
        (DELETE, b"delete", b"", b""),
        (INCR, b"incr", arithmetic_extras(), b""),
        (DECR, b"decr", arithmetic_extras(2, 9, 0xFFFFFFFF), b""),
        (TOUCH, b"touch", struct.pack(">I", 10), b""),
        (GAT, b"gat", struct.pack(">I", 10), b""),
        (GATK, b"gatk", struct.pack(">I", 10), b""),
    ],
)
def test_keyed_commands_go_through_untouched(opcode, command, extras, value):
    data = packet(opcode, b"the key", extras, value, cas=0x1122334455667788)
    request = parse_one(data)
    assert request.route == ROUTE_KEY
    assert request.command == command
    assert request.key == b"the key"
    assert request.frame == data  # opaque and CAS travel to the backend
    assert not request.filter


@pytest.mark.parametrize(
    "quiet, replying, command, extras, value",
    [
        (GETQ, GET, b"getq", b"", b""),
        (GETKQ, GETK, b"getkq", b"", b""),
        (GATQ, GAT, b"gatq", struct.pack(">I", 5), b""),
        (GATKQ, GATK, b"gatkq", struct.pack(">I", 5), b""),
    ],
)
def test_quiet_gets_hide_a_miss(quiet, replying, command, extras, value):
    data = packet(quiet, b"k", extras, value)
    request = parse_one(data)
    assert request.command == command
    assert request.frame == data[:1] + bytes((replying,)) + data[2:]
    assert request.filter
    assert codec.filter_reply(request, reply_packet(replying, status=1, value=b"Not found")) == b""
    hit = reply_packet(replying, extras=b"\0\0\0\0", value=b"v", cas=7)
    kept = codec.filter_reply(request, hit)
    # memcached answers a quiet request with the opcode it was sent
    assert kept == hit[:1] + bytes((quiet,)) + hit[2:]
    failure = reply_packet(replying, status=0x82, value=b"Out of memory")
    assert header(codec.filter_reply(request, failure))[1] == quiet


@pytest.mark.parametrize(
    "quiet, replying, command, extras, value",
    [
        (SETQ, SET, b"setq", store_extras(), b"v"),
        (ADDQ, ADD, b"addq", store_extras(), b"v"),
        (REPLACEQ, REPLACE, b"replaceq", store_extras(), b"v"),
        (APPENDQ, APPEND, b"appendq", b"", b"v"),
        (PREPENDQ, PREPEND, b"prependq", b"", b"v"),
        (DELETEQ, DELETE, b"deleteq", b"", b""),
        (INCRQ, INCR, b"incrq", arithmetic_extras(), b""),
        (DECRQ, DECR, b"decrq", arithmetic_extras(), b""),
    ],
)
def test_quiet_mutations_hide_success(quiet, replying, command, extras, value):
    data = packet(quiet, b"k", extras, value, cas=99)
    request = parse_one(data)
    assert (request.command, request.key, request.route) == (command, b"k", ROUTE_KEY)
    assert request.frame == data[:1] + bytes((replying,)) + data[2:]
    assert codec.filter_reply(request, reply_packet(replying, cas=100)) == b""
    for status in (1, 2, 5, 6):
        failure = reply_packet(replying, status=status, value=b"failed")
        assert codec.filter_reply(request, failure) == failure[:1] + bytes((quiet,)) + failure[2:]


def test_getkq_pipeline_closed_by_noop():
    data = b"".join(packet(GETKQ, key, opaque=i) for i, key in enumerate([b"a", b"b", b"c"])) + packet(NOOP, opaque=9)
    requests = parse_binary(data)
    assert [r.route for r in requests] == [ROUTE_KEY] * 3 + [ROUTE_LOCAL]
    assert [r.key for r in requests[:3]] == [b"a", b"b", b"c"]
    assert requests[3].reply == reply_packet(NOOP, opaque=9)


# -- local answers ---------------------------------------------------------------


def test_noop_echoes_the_opaque():
    request = parse_one(packet(NOOP, opaque=0x01020304))
    assert request.route == ROUTE_LOCAL
    magic, opcode, keylen, extlen, _, status, bodylen, opaque, cas = header(request.reply)
    assert (magic, opcode, keylen, extlen, status, bodylen, opaque, cas) == (0x81, NOOP, 0, 0, 0, 0, 0x01020304, 0)


def test_version_is_answered_locally():
    request = parse_one(packet(VERSION))
    assert request.route == ROUTE_LOCAL
    assert header(request.reply)[1:8] == (VERSION, 0, 0, 0, 0, len(memcache_text.VERSION), OPAQUE)
    assert request.reply[24:] == memcache_text.VERSION


def test_stat_lists_stats_then_an_empty_key():
    for data in (packet(STAT), packet(STAT, b"settings")):
        request = parse_one(data)
        assert request.route == ROUTE_LOCAL
        replies = packets(request.reply)
        assert len(replies) > 1
        for raw in replies:
            magic, opcode, keylen, extlen, _, status, bodylen, opaque, cas = header(raw)
            assert (magic, opcode, extlen, status, opaque, cas) == (0x81, STAT, 0, 0, OPAQUE, 0)
        assert all(header(raw)[2] > 0 for raw in replies[:-1])
        assert replies[-1] == reply_packet(STAT)
        assert reply_packet(STAT, key=b"version", value=memcache_text.VERSION) in replies


def test_quit_answers_then_closes():
    parser = codec.request_parser(pool_config())
    requests = parser.feed(packet(GET, b"a") + packet(QUIT) + packet(GET, b"b"))
    assert [r.command for r in requests] == [b"get", b"quit"]
    assert requests[1].reply == reply_packet(QUIT)
    assert requests[1].close_after
    assert parser.feed(packet(NOOP)) == []


def test_quitq_closes_silently():
    request = parse_one(packet(QUITQ))
    assert (request.route, request.reply, request.close_after) == (ROUTE_LOCAL, b"", True)


# -- flush -----------------------------------------------------------------------


@pytest.mark.parametrize("extras", [b"", struct.pack(">I", 0), struct.pack(">I", 30)])
def test_flush_goes_to_every_server(extras):
    data = packet(FLUSH, extras=extras)
    request = parse_one(data)
    assert (request.route, request.frame, request.filter) == (ROUTE_ALL, data, False)
    ok = reply_packet(FLUSH)
    assert codec.merge(request, [Fragment(ok), Fragment(ok)]) == ok
    failed = reply_packet(FLUSH, status=0x84, value=b"oops")
    assert codec.merge(request, [Fragment(ok), Fragment(failed)]) == failed


def test_flushq_hides_success():
    data = packet(FLUSHQ)
    request = parse_one(data)
    assert (request.route, request.frame, request.filter) == (ROUTE_ALL, data[:1] + bytes((FLUSH,)) + data[2:], True)
    merged = codec.merge(request, [Fragment(reply_packet(FLUSH))] * 2)
    assert codec.filter_reply(request, merged) == b""


# -- errors ----------------------------------------------------------------------


def test_unknown_opcode_keeps_framing():
    unknown = packet(0x55, b"key", b"ext", b"body", opaque=5)
    verbosity = packet(0x1B, extras=b"\0\0\0\1")
    requests = parse_binary(unknown + verbosity + packet(GET, b"a"))
    assert requests[0].route == ROUTE_LOCAL
    assert header(requests[0].reply)[1:8] == (0x55, 0, 0, 0, 0x81, len(b"Unknown command"), 5)
    assert header(requests[1].reply)[5] == 0x81  # verbosity: memcached 1.6 does not serve it
    assert requests[2].key == b"a"


@pytest.mark.parametrize(
    "data",
    [
        packet(GET),  # no key
        packet(GET, b"k", extras=b"xxxx"),  # extras on get
        packet(SET, b"k", b"abc", b"v"),  # short extras
        packet(INCR, b"k", store_extras()),  # wrong extras
        packet(NOOP, b"k"),  # noop takes nothing
        packet(VERSION, value=b"x"),
        packet(QUIT, b"k"),
        packet(FLUSH, extras=b"\0\0"),
        packet(TOUCH, b"k"),  # touch needs its exptime
        packet(GET, b"k" * 251),  # key too long
    ],
)
def test_malformed_packets_answer_invalid_arguments(data):
    requests = parse_binary(data + packet(NOOP))
    assert requests[0].route == ROUTE_LOCAL
    magic, opcode, _, _, _, status, _, opaque, cas = header(requests[0].reply)
    assert (magic, opcode, status, opaque, cas) == (0x81, data[1], 0x04, OPAQUE, 0)
    assert requests[0].reply[24:] == b"Invalid arguments"
    assert requests[1].command == b"noop"


def test_key_and_extras_longer_than_the_body():
    data = bytearray(packet(GET, b"abc"))
    data[8:12] = struct.pack(">I", 2)
    data = bytes(data[:26])
    request = parse_one(data)
    assert header(request.reply)[5] == 0x04


def test_bad_magic_loses_framing():
    parser = codec.request_parser(pool_config())
    with pytest.raises(ProtocolError) as caught:
        parser.feed(packet(GET, b"a") + b"get a\r\n" + b"\0" * 20)
    assert caught.value.reply == b""
    assert [r.key for r in caught.value.requests] == [b"a"]


def test_body_over_the_limit_loses_framing():
    parser = codec.request_parser(pool_config(max_request_bytes=100))
    with pytest.raises(ProtocolError) as caught:
        parser.feed(packet(NOOP) + packet(SET, b"k", store_extras(), b"v" * 100, opaque=3))
    assert header(caught.value.reply)[1:8] == (SET, 0, 0, 0, 0x03, len(b"Too large."), 3)
    assert [r.command for r in caught.value.requests] == [b"noop"]


def _printable(text: str) -> bool:
    return all(32 <= ord(c) < 127 for c in text)


def test_framing_errors_describe_the_packet_readably():
    parser = codec.request_parser(pool_config(max_request_bytes=100))
    with pytest.raises(ProtocolError) as caught:
        parser.feed(packet(SET, b"k\r\n", store_extras(), b"\x00\x01" * 100, opaque=3))
    message = str(caught.value)
    assert _printable(message), message
    assert message.startswith("request body over max_request_bytes (100): magic 0x80, opcode 0x01 (set), ")
    assert "key length 3, extras length 8, body length 211; header 80 01 00 03 08 " in message
    parser = codec.request_parser(pool_config())
    with pytest.raises(ProtocolError) as caught:
        parser.feed(packet(GET, b"a") + b"\x7f\x01get a\r\n" + b"\0" * 20)
    message = str(caught.value)
    assert _printable(message), message
    assert message.startswith("bad request magic: magic 0x7f, not a binary packet; first bytes 7f 01 67 65 74 ")
    reply_parser = codec.reply_parser()
    reply_parser.feed(b"\x00\x01\r\n" + b"\0" * 30)
    with pytest.raises(ProtocolError) as caught:
        reply_parser.next_reply(None)
    assert _printable(str(caught.value)) and "from backend: magic 0x00, not a binary packet" in str(caught.value)


def test_error_reply_carries_the_clients_opcode_and_opaque():
    request = parse_one(packet(GETKQ, b"k", opaque=77))
    raw = codec.error_reply(request, "timeout on 127.0.0.1:11211")
    magic, opcode, keylen, extlen, _, status, bodylen, opaque, cas = header(raw)
    assert (magic, opcode, keylen, extlen, status, opaque, cas) == (0x81, GETKQ, 0, 0, 0x86, 77, 0)
    assert raw[24:] == b"timeout on 127.0.0.1:11211"
    assert bodylen == len(raw) - 24
    plain = parse_one(packet(SET, b"k", store_extras(), b"v", opaque=78))
    assert header(codec.error_reply(plain, "down"))[1:8] == (SET, 0, 0, 0, 0x86, 4, 78)


def test_big_value_waits_unjoined():
    value = b"v" * 100000
    data = packet(SET, b"big", store_extras(), value)
    parser = codec.request_parser(pool_config())
    pieces = [data[i : i + 4096] for i in range(0, len(data), 4096)]
    for piece in pieces[:-1]:
        assert parser.feed(piece) == []
    assert len(parser._chunks) == len(pieces) - 1
    assert [r.frame for r in parser.feed(pieces[-1])] == [data]
    assert parser.buffered() == 0


# -- backend replies ---------------------------------------------------------------


def test_reply_framing():
    data = (
        reply_packet(GET, extras=b"\0\0\0\1", value=b"hello", cas=5)
        + reply_packet(SET, cas=6)
        + reply_packet(GETK, status=1, key=b"k", value=b"Not found")
        + reply_packet(INCR, value=struct.pack(">Q", 10), cas=7)
    )
    parser = codec.reply_parser()
    for i in range(len(data)):
        parser.feed(data[i : i + 1])
    got = []
    while True:
        reply = parser.next_reply(None)
        if reply is None:
            break
        got.append(reply)
    assert got == packets(data)
    assert parser.buffered() == 0


def test_reply_framing_byte_by_byte():
    data = reply_packet(GET, extras=b"\0\0\0\0", value=b"x" * 300) + reply_packet(NOOP)
    parser = codec.reply_parser()
    got = []
    for i in range(len(data)):
        parser.feed(data[i : i + 1])
        reply = parser.next_reply(None)
        if reply is not None:
            got.append(reply)
    assert got == packets(data)


def test_reply_with_bad_magic_is_garbage():
    parser = codec.reply_parser()
    parser.feed(packet(GET, b"a"))
    with pytest.raises(ProtocolError):
        parser.next_reply(None)


# -- the sniffing codec -----------------------------------------------------------


def test_memcache_codec_provides_the_interface():
    sniffing = memcache.codec
    assert verifyObject(ICodec, sniffing)
    assert verifyObject(IRequestParser, sniffing.request_parser(pool_config()))
    assert verifyObject(IReplyParser, sniffing.reply_parser())
    assert codec_for("memcache") is sniffing
    assert codecs_of(sniffing) == (memcache_text.codec, memcache_binary.codec)


def test_sniffing_picks_binary_on_the_request_magic():
    parser = memcache.codec.request_parser(pool_config())
    assert parser.codec is memcache_text.codec
    assert parser.feed(b"") == []
    requests = parser.feed(packet(GETK, b"a")[:10])
    assert requests == []
    assert parser.codec is memcache_binary.codec
    requests = parser.feed(packet(GETK, b"a")[10:] + packet(NOOP))
    assert [r.command for r in requests] == [b"getk", b"noop"]
    assert parser.codec is memcache_binary.codec


def test_sniffing_picks_text_otherwise():
    parser = memcache.codec.request_parser(pool_config())
    requests = parser.feed(b"g")
    assert requests == [] and parser.codec is memcache_text.codec
    requests = parser.feed(b"et a\r\nmn\r\n")
    assert [r.command for r in requests] == [b"get", b"mn"]


def test_sniffing_codec_delegates_by_frame():
    sniffing = memcache.codec
    text = memcache_text.codec.request_parser(pool_config()).feed(b"get a b\r\nset k 0 0 1 noreply\r\nx\r\n")
    assert sniffing.split(text[0], [[1], [0]]) == [b"get b\r\n", b"get a\r\n"]
    assert sniffing.merge(text[0], [Fragment(b"END\r\n"), Fragment(b"END\r\n")]) == b"END\r\n"
    assert sniffing.filter_reply(text[1], b"STORED\r\n") == b""
    assert sniffing.error_reply(text[0], "down") == b"SERVER_ERROR down\r\n"
    binary = codec.request_parser(pool_config()).feed(packet(GETQ, b"k"))
    assert sniffing.filter_reply(binary[0], reply_packet(GET, status=1)) == b""
    assert header(sniffing.error_reply(binary[0], "down"))[1] == GETQ
    assert sniffing.handshake(pool_config()) == []
    assert sniffing.handshake_error(b"") is None
