"""
The memcached meta commands (mg, ms, md, ma, mn, me) in the text codec: flags
passed through, base64 keys routed like plain keys, quiet mode rewritten into a
replying request whose quiet codes are filtered, and meta reply framing.
Quiet-mode rules are memcached 1.6's (checked against memcached 1.6.18).
"""

from __future__ import annotations

import base64

import pytest

from tests.test_memcache_text import parse, parse_one, pool_config, replies
from twistedproxy.core.request import ROUTE_KEY, ROUTE_LOCAL, ProtocolError
from twistedproxy.protocols.memcache_text import codec


def test_mg_passes_flags_through():
    request = parse_one(b"mg foo v k f t c s Oopaque123\r\n")
    assert request.route == ROUTE_KEY
    assert request.command == b"mg"
    assert request.key == b"foo"
    assert request.frame == b"mg foo v k f t c s Oopaque123\r\n"
    assert not request.filter


def test_mg_without_flags():
    request = parse_one(b"mg foo\r\n")
    assert (request.key, request.frame) == (b"foo", b"mg foo\r\n")


def test_mg_quiet_is_stripped_and_only_a_miss_is_hidden():
    request = parse_one(b"mg foo q v k Oab\r\n")
    assert request.frame == b"mg foo v k Oab\r\n"
    assert request.filter
    assert codec.filter_reply(request, b"EN\r\n") == b""
    assert codec.filter_reply(request, b"EN Oab kfoo\r\n") == b""
    assert codec.filter_reply(request, b"VA 2 kfoo Oab\r\nhi\r\n") == b"VA 2 kfoo Oab\r\nhi\r\n"
    assert codec.filter_reply(request, b"HD kfoo Oab\r\n") == b"HD kfoo Oab\r\n"
    assert codec.filter_reply(request, b"CLIENT_ERROR bad command line format\r\n") == (
        b"CLIENT_ERROR bad command line format\r\n"
    )


def test_ms_frames_its_data_block():
    data = b"ms foo 5 T90 F3 c\r\nhe\r\nl\r\n"
    request = parse_one(data)
    assert (request.route, request.command, request.key, request.frame) == (ROUTE_KEY, b"ms", b"foo", data)


def test_ms_quiet_hides_stored_only():
    request = parse_one(b"ms foo 2 q MA c\r\nhi\r\n")
    assert request.frame == b"ms foo 2 MA c\r\nhi\r\n"
    assert request.filter
    assert codec.filter_reply(request, b"HD\r\n") == b""
    assert codec.filter_reply(request, b"HD c12\r\n") == b""
    for kept in (b"NS\r\n", b"EX\r\n", b"NF\r\n", b"SERVER_ERROR out of memory storing object\r\n"):
        assert codec.filter_reply(request, kept) == kept


def test_ms_bad_data_chunk_is_reported_even_when_quiet():
    requests = parse(b"ms foo 1 q\r\nxyz\r\nmn\r\n")
    assert requests[0].reply == b"CLIENT_ERROR bad data chunk\r\n"
    assert requests[-1].reply == b"MN\r\n"


@pytest.mark.parametrize("line", [b"ms foo\r\n", b"ms foo S2\r\n", b"ms foo -1\r\n", b"ms\r\n"])
def test_ms_without_a_readable_length(line):
    requests = parse(line + b"mn\r\n")
    assert requests[0].route == ROUTE_LOCAL
    assert requests[0].reply == (b"ERROR\r\n" if line == b"ms\r\n" else b"CLIENT_ERROR bad command line format\r\n")
    assert requests[1].reply == b"MN\r\n"


def test_ms_with_a_long_key_skips_its_data_block():
    requests = parse(b"ms " + b"k" * 251 + b" 2 q\r\nhi\r\nmn\r\n")
    assert requests[0].reply == b"CLIENT_ERROR key too long\r\n"
    assert requests[1].reply == b"MN\r\n"


def test_md_quiet_hides_deleted_but_not_a_miss():
    request = parse_one(b"md foo q Oxy\r\n")
    assert request.frame == b"md foo Oxy\r\n"
    assert codec.filter_reply(request, b"HD Oxy\r\n") == b""
    # memcached's md q hides HD only: NF and EX still come back
    assert codec.filter_reply(request, b"NF Oxy\r\n") == b"NF Oxy\r\n"
    assert codec.filter_reply(request, b"EX\r\n") == b"EX\r\n"


def test_ma_quiet_hides_success_in_both_forms():
    request = parse_one(b"ma counter q v N0 J10 D2\r\n")
    assert request.frame == b"ma counter v N0 J10 D2\r\n"
    assert codec.filter_reply(request, b"HD\r\n") == b""
    assert codec.filter_reply(request, b"VA 2\r\n12\r\n") == b""
    for kept in (b"NF\r\n", b"NS\r\n", b"EX\r\n", b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"):
        assert codec.filter_reply(request, kept) == kept


def test_quiet_request_failures_are_never_hidden():
    request = parse_one(b"mg foo q v\r\n")
    assert codec.error_reply(request, "timeout") == b"SERVER_ERROR timeout\r\n"


def test_a_key_starting_with_q_is_not_a_flag():
    request = parse_one(b"mg quux v\r\n")
    assert (request.key, request.frame, request.filter) == (b"quux", b"mg quux v\r\n", False)
    request = parse_one(b"mg quux q Oq1\r\n")
    assert (request.key, request.frame) == (b"quux", b"mg quux Oq1\r\n")


def test_base64_key_is_decoded_for_routing_only():
    binary_key = b"\x00\xffkey with spaces\r\n"
    encoded = base64.b64encode(binary_key)
    request = parse_one(b"mg " + encoded + b" b v k\r\n")
    assert request.key == binary_key
    assert request.frame == b"mg " + encoded + b" b v k\r\n"
    # a plain key and its base64 form route the same way
    assert parse_one(b"mg Zm9v b v\r\n").key == parse_one(b"get foo\r\n").key


def test_base64_key_on_ms_md_ma_me():
    for line in (b"ms Zm9v 1 b\r\nx\r\n", b"md Zm9v b q\r\n", b"ma Zm9v b\r\n", b"me Zm9v b\r\n"):
        assert parse_one(line).key == b"foo"


@pytest.mark.parametrize("key", [b"not*base64", b"abc", b"===="])
def test_bad_base64_key(key):
    request = parse_one(b"mg " + key + b" b v\r\n")
    assert request.route == ROUTE_LOCAL
    assert request.reply == b"CLIENT_ERROR error decoding key\r\n"


def test_mn_is_answered_locally_in_order():
    requests = parse(b"mg a q v\r\nmg b q v\r\nmg c q v\r\nmn\r\n")
    assert [r.route for r in requests] == [ROUTE_KEY, ROUTE_KEY, ROUTE_KEY, ROUTE_LOCAL]
    assert requests[-1].reply == b"MN\r\n"


def test_me_routes_by_key():
    request = parse_one(b"me foo\r\n")
    assert (request.route, request.command, request.key, request.frame) == (ROUTE_KEY, b"me", b"foo", b"me foo\r\n")


@pytest.mark.parametrize("command", [b"mg", b"md", b"ma", b"me"])
def test_meta_without_key(command):
    request = parse_one(command + b"\r\n")
    assert request.reply == b"ERROR\r\n"  # as memcached 1.6 answers


@pytest.mark.parametrize("command", [b"mg", b"md", b"ma", b"me"])
def test_meta_key_too_long(command):
    assert parse_one(command + b" " + b"k" * 251 + b" v\r\n").reply == b"CLIENT_ERROR key too long\r\n"


def test_meta_and_classic_commands_mix():
    requests = parse(b"set a 0 0 1\r\n1\r\nmg a v\r\nget a\r\nms b 1 q\r\n2\r\nmn\r\n")
    assert [r.command for r in requests] == [b"set", b"mg", b"get", b"ms", b"mn"]


def test_meta_reply_framing():
    data = (
        b"VA 5 kfoo Oab f0\r\nhe\r\nl\r\n"
        b"HD kfoo c123\r\n"
        b"EN\r\n"
        b"NF Oab\r\n"
        b"NS\r\n"
        b"EX\r\n"
        b"MN\r\n"
        b"ME foo exp=-1 la=3 cas=2 fetch=no cls=1 size=63\r\n"
        b"VA 0\r\n\r\n"
        b"CLIENT_ERROR bad command line format\r\n"
    )
    assert replies(data) == [
        b"VA 5 kfoo Oab f0\r\nhe\r\nl\r\n",
        b"HD kfoo c123\r\n",
        b"EN\r\n",
        b"NF Oab\r\n",
        b"NS\r\n",
        b"EX\r\n",
        b"MN\r\n",
        b"ME foo exp=-1 la=3 cas=2 fetch=no cls=1 size=63\r\n",
        b"VA 0\r\n\r\n",
        b"CLIENT_ERROR bad command line format\r\n",
    ]


def test_meta_reply_with_bad_length_is_garbage():
    parser = codec.reply_parser()
    parser.feed(b"VA big\r\n")
    with pytest.raises(ProtocolError):
        parser.next_reply(None)


def test_data_block_over_the_limit():
    parser = codec.request_parser(pool_config(max_request_bytes=10))
    with pytest.raises(ProtocolError):
        parser.feed(b"ms foo 11\r\n")
