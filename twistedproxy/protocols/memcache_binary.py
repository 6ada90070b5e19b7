"""
The memcached binary protocol (as memcached 1.6 serves it to clients) as an
L{ICodec}.

Every packet starts with a 24-byte header::

    request:  magic 0x80, opcode, key length (2), extras length, data type,
              vbucket (2), total body length (4), opaque (4), CAS (8)
    response: magic 0x81, opcode, key length (2), extras length, data type,
              status (2), total body length (4), opaque (4), CAS (8)

followed by extras, key and value.  Frames go to the backend untouched, so the
client's opaque and CAS travel there and back.

Quiet opcodes would break the one-reply-per-frame rule, so their opcode byte is
rewritten to the replying form and L{BinaryCodec.filter_reply} drops what quiet
mode hides (a miss for getq/getkq/gatq/gatkq, success for the quiet mutations
and flushq) and puts the client's quiet opcode back in the replies it keeps, as
memcached echoes the opcode it was sent.  noop, version, stat and quit(q) are
answered by the proxy, so a getkq pipeline closed by noop across many servers
answers exactly like one server would.  Unknown opcodes get status 0x0081 and
malformed packets 0x0004, framing kept.

Backend failures (timeout, connection lost, server ejected) answer with status
0x0086 "temporary failure": the request may well succeed when retried.
"""

from __future__ import annotations

import struct

from zope.interface import implementer

from twistedproxy.core.request import (
    REPLICA_FIRST,
    REPLICA_READ,
    REPLICA_WRITE,
    REPLY_FINAL,
    ROUTE_ALL,
    WARM_NONE,
    WARM_REREAD,
    ProtocolError,
    Request,
    local,
)
from twistedproxy.protocols import WARMUP_KEYS, memcache_text
from twistedproxy.protocols.interface import IClusterCodec, ICodec, IReplyParser, IRequestParser
from twistedproxy.protocols.memcache_text import MAX_KEY_LENGTH, VERSION, ClientStreamParser, ReplyBuffer, stats_lines

HEADER_LENGTH = 24
REQUEST_MAGIC = 0x80
RESPONSE_MAGIC = 0x81

# Opcodes.
GET = 0x00
SET = 0x01
ADD = 0x02
REPLACE = 0x03
DELETE = 0x04
INCREMENT = 0x05
DECREMENT = 0x06
QUIT = 0x07
FLUSH = 0x08
GETQ = 0x09
NOOP = 0x0A
VERSION_OPCODE = 0x0B
GETK = 0x0C
GETKQ = 0x0D
APPEND = 0x0E
PREPEND = 0x0F
STAT = 0x10
SETQ = 0x11
ADDQ = 0x12
REPLACEQ = 0x13
DELETEQ = 0x14
INCREMENTQ = 0x15
DECREMENTQ = 0x16
QUITQ = 0x17
FLUSHQ = 0x18
APPENDQ = 0x19
PREPENDQ = 0x1A
TOUCH = 0x1C
GAT = 0x1D
GATQ = 0x1E
GATK = 0x23
GATKQ = 0x24
SASL_LIST_MECHS = 0x20
SASL_AUTH = 0x21
SASL_STEP = 0x22

# Response statuses.
STATUS_OK = 0x0000
STATUS_KEY_NOT_FOUND = 0x0001
STATUS_KEY_EXISTS = 0x0002
STATUS_TOO_LARGE = 0x0003
STATUS_INVALID_ARGUMENTS = 0x0004
STATUS_NOT_STORED = 0x0005
STATUS_AUTH_ERROR = 0x0020
STATUS_AUTH_CONTINUE = 0x0021
STATUS_UNKNOWN_COMMAND = 0x0081
STATUS_OUT_OF_MEMORY = 0x0082
STATUS_INTERNAL_ERROR = 0x0084
STATUS_TEMPORARY_FAILURE = 0x0086

# magic, opcode, key length, extras length, (data type, vbucket skipped), body length
_REQUEST_HEADER = struct.Struct(">BBHB3xI")
# magic, opcode, key length, extras length, data type, status, body length
_RESPONSE_HEADER = struct.Struct(">BBHBBHI")
_BODY_LENGTH = struct.Struct(">I")
_KEY_LENGTH = struct.Struct(">H")
_STATUS = struct.Struct(">H")
_ZERO_CAS = bytes(8)


def response(opcode: int, opaque: bytes, status: int = STATUS_OK, key: bytes = b"", value: bytes = b"") -> bytes:
    """A response packet without extras or CAS; C{opaque} is the request's 4 raw bytes."""
    return (
        _RESPONSE_HEADER.pack(RESPONSE_MAGIC, opcode, len(key), 0, 0, status, len(key) + len(value))
        + opaque
        + _ZERO_CAS
        + key
        + value
    )


# Packet shapes memcached accepts, per opcode family (key, extras, body lengths).
def _shape_store(keylen, extlen, bodylen):
    return extlen == 8 and keylen > 0 and bodylen >= keylen + 8


def _shape_key_only(keylen, extlen, bodylen):
    return extlen == 0 and keylen > 0 and bodylen == keylen


def _shape_arithmetic(keylen, extlen, bodylen):
    return extlen == 20 and keylen > 0 and bodylen == keylen + 20


def _shape_concat(keylen, extlen, bodylen):
    return extlen == 0 and keylen > 0


def _shape_touch(keylen, extlen, bodylen):
    return extlen == 4 and keylen > 0


def _shape_empty(keylen, extlen, bodylen):
    return keylen == 0 and extlen == 0 and bodylen == 0


def _shape_flush(keylen, extlen, bodylen):
    return keylen == 0 and bodylen == extlen and extlen in (0, 4)


def _shape_stat(keylen, extlen, bodylen):
    return extlen == 0


# How the proxy handles an opcode.
_KEYED = 0  # routed by key
_FLUSH = 1  # every server
_NOOP = 2
_VERSION = 3
_STAT = 4
_QUIT = 5

_MISS = _STATUS.pack(STATUS_KEY_NOT_FOUND)
_SUCCESS = _STATUS.pack(STATUS_OK)


class _Command(object):
    """What the proxy knows of one opcode."""

    __slots__ = ("name", "kind", "shape", "replying", "hides")

    def __init__(self, name, kind, shape, replying=None, hides=None):
        self.name = name
        self.kind = kind
        self.shape = shape
        self.replying = replying  # a quiet opcode's replying form, as one byte
        self.hides = hides  # the status (2 raw bytes) quiet mode does not send


def _quiet(name, kind, shape, replying, hides):
    return _Command(name, kind, shape, bytes((replying,)), hides)


COMMANDS = {
    GET: _Command(b"get", _KEYED, _shape_key_only),
    GETK: _Command(b"getk", _KEYED, _shape_key_only),
    GETQ: _quiet(b"getq", _KEYED, _shape_key_only, GET, _MISS),
    GETKQ: _quiet(b"getkq", _KEYED, _shape_key_only, GETK, _MISS),
    GAT: _Command(b"gat", _KEYED, _shape_touch),
    GATK: _Command(b"gatk", _KEYED, _shape_touch),
    GATQ: _quiet(b"gatq", _KEYED, _shape_touch, GAT, _MISS),
    GATKQ: _quiet(b"gatkq", _KEYED, _shape_touch, GATK, _MISS),
    TOUCH: _Command(b"touch", _KEYED, _shape_touch),
    SET: _Command(b"set", _KEYED, _shape_store),
    ADD: _Command(b"add", _KEYED, _shape_store),
    REPLACE: _Command(b"replace", _KEYED, _shape_store),
    SETQ: _quiet(b"setq", _KEYED, _shape_store, SET, _SUCCESS),
    ADDQ: _quiet(b"addq", _KEYED, _shape_store, ADD, _SUCCESS),
    REPLACEQ: _quiet(b"replaceq", _KEYED, _shape_store, REPLACE, _SUCCESS),
    APPEND: _Command(b"append", _KEYED, _shape_concat),
    PREPEND: _Command(b"prepend", _KEYED, _shape_concat),
    APPENDQ: _quiet(b"appendq", _KEYED, _shape_concat, APPEND, _SUCCESS),
    PREPENDQ: _quiet(b"prependq", _KEYED, _shape_concat, PREPEND, _SUCCESS),
    DELETE: _Command(b"delete", _KEYED, _shape_key_only),
    DELETEQ: _quiet(b"deleteq", _KEYED, _shape_key_only, DELETE, _SUCCESS),
    INCREMENT: _Command(b"incr", _KEYED, _shape_arithmetic),
    DECREMENT: _Command(b"decr", _KEYED, _shape_arithmetic),
    INCREMENTQ: _quiet(b"incrq", _KEYED, _shape_arithmetic, INCREMENT, _SUCCESS),
    DECREMENTQ: _quiet(b"decrq", _KEYED, _shape_arithmetic, DECREMENT, _SUCCESS),
    FLUSH: _Command(b"flush", _FLUSH, _shape_flush),
    FLUSHQ: _quiet(b"flushq", _FLUSH, _shape_flush, FLUSH, _SUCCESS),
    NOOP: _Command(b"noop", _NOOP, _shape_empty),
    VERSION_OPCODE: _Command(b"version", _VERSION, _shape_empty),
    STAT: _Command(b"stat", _STAT, _shape_stat),
    QUIT: _Command(b"quit", _QUIT, _shape_empty),
    QUITQ: _Command(b"quitq", _QUIT, _shape_empty),
}


@implementer(IRequestParser)
class BinaryRequestParser(ClientStreamParser):
    """Frames one binary-protocol client connection."""

    __slots__ = ()

    def feed(self, data: bytes) -> list:
        buf = self._take(data)
        if buf is None:
            return []
        requests = []
        end = len(buf)
        pos = 0
        need = HEADER_LENGTH  # bytes the unframed rest needs before it frames
        while end - pos >= HEADER_LENGTH:
            magic, opcode, keylen, extlen, bodylen = _REQUEST_HEADER.unpack_from(buf, pos)
            if magic != REQUEST_MAGIC:
                raise ProtocolError(b"", requests, "bad request magic: %s" % (describe(buf[pos : pos + HEADER_LENGTH]),))
            if bodylen > self._max_request:
                opaque = buf[pos + 12 : pos + 16]
                raise ProtocolError(
                    response(opcode, opaque, STATUS_TOO_LARGE, value=b"Too large."),
                    requests,
                    "request body over max_request_bytes (%d): %s"
                    % (self._max_request, describe(buf[pos : pos + HEADER_LENGTH])),
                )
            frame_end = pos + HEADER_LENGTH + bodylen
            if frame_end > end:
                need += bodylen
                break
            requests.append(self._request(buf[pos:frame_end], opcode, keylen, extlen, bodylen))
            pos = frame_end
            if self._closed:
                return requests
        if pos < end:
            self._keep(buf, pos, need)
        return requests

    def _request(self, frame, opcode, keylen, extlen, bodylen):
        command = COMMANDS.get(opcode)
        if command is None:
            return local(b"unknown", response(opcode, frame[12:16], STATUS_UNKNOWN_COMMAND, value=b"Unknown command"))
        if keylen + extlen > bodylen or keylen > MAX_KEY_LENGTH or not command.shape(keylen, extlen, bodylen):
            reply = response(opcode, frame[12:16], STATUS_INVALID_ARGUMENTS, value=b"Invalid arguments")
            return local(command.name, reply)
        kind = command.kind
        if kind == _KEYED:
            key = frame[HEADER_LENGTH + extlen : HEADER_LENGTH + extlen + keylen]
            if command.replying is None:
                return Request(frame, command.name, key)
            return Request(
                frame[:1] + command.replying + frame[2:], command.name, key, filter=True, data=(opcode, command.hides)
            )
        if kind == _FLUSH:
            if command.replying is None:
                return Request(frame, command.name, route=ROUTE_ALL)
            return Request(
                frame[:1] + command.replying + frame[2:],
                command.name,
                route=ROUTE_ALL,
                filter=True,
                data=(opcode, command.hides),
            )
        opaque = frame[12:16]
        if kind == _NOOP:
            return local(b"noop", response(NOOP, opaque))
        if kind == _VERSION:
            return local(b"version", response(VERSION_OPCODE, opaque, value=VERSION))
        if kind == _STAT:
            packets = [response(STAT, opaque, key=name, value=value) for name, value in stats_lines()]
            packets.append(response(STAT, opaque))  # the empty key ends the list
            return local(b"stat", b"".join(packets))
        self._closed = True  # quit: nothing after it is read
        return local(command.name, response(QUIT, opaque) if opcode == QUIT else b"", close_after=True)


@implementer(IReplyParser)
class BinaryReplyParser(ReplyBuffer):
    """Frames one backend connection's binary-protocol responses."""

    __slots__ = ()

    def next_reply(self, request):
        buf = self._ready()
        if buf is None:
            return None
        pos = self._pos
        if len(buf) - pos < HEADER_LENGTH:
            self._need = HEADER_LENGTH
            return None
        if buf[pos] != RESPONSE_MAGIC:
            raise ProtocolError(b"", [], "bad response magic from backend: %s" % (describe(buf[pos : pos + HEADER_LENGTH]),))
        end = pos + HEADER_LENGTH + _BODY_LENGTH.unpack_from(buf, pos + 8)[0]
        if end > len(buf):
            self._need = end - pos
            return None
        return self._cut(end)


def describe(header: bytes) -> str:
    """
    A packet's header told for the log, which must never get the raw bytes
    (control characters): its fields when the magic is a binary one, and its
    first bytes in hex.
    """
    shown = header[:HEADER_LENGTH].hex(" ")
    if len(header) < HEADER_LENGTH or header[0] not in (REQUEST_MAGIC, RESPONSE_MAGIC):
        return "magic 0x%02x, not a binary packet; first bytes %s" % (header[0], shown)
    magic, opcode, keylen, extlen, bodylen = _REQUEST_HEADER.unpack_from(header)
    command = COMMANDS.get(opcode)
    return "magic 0x%02x, opcode 0x%02x (%s), key length %d, extras length %d, body length %d; header %s" % (
        magic,
        opcode,
        command.name.decode("ascii") if command is not None else "unknown",
        keylen,
        extlen,
        bodylen,
        shown,
    )


def _cut_key(frame: bytes, cut: int) -> bytes:
    """A request packet whose key loses its first C{cut} bytes (key and body lengths follow)."""
    keylen = _KEY_LENGTH.unpack_from(frame, 2)[0]
    extlen = frame[4]
    start = HEADER_LENGTH + extlen
    return b"".join((
        frame[:2],
        _KEY_LENGTH.pack(keylen - cut),
        frame[4:8],
        _BODY_LENGTH.pack(_BODY_LENGTH.unpack_from(frame, 8)[0] - cut),
        frame[12:start],
        frame[start + cut :],
    ))


def _put_key_prefix(packet: bytes, prefix: bytes) -> bytes:
    """A response packet with C{prefix} put in front of its key (key and body lengths follow)."""
    keylen = _KEY_LENGTH.unpack_from(packet, 2)[0]
    start = HEADER_LENGTH + packet[4]
    return b"".join((
        packet[:2],
        _KEY_LENGTH.pack(keylen + len(prefix)),
        packet[4:8],
        _BODY_LENGTH.pack(_BODY_LENGTH.unpack_from(packet, 8)[0] + len(prefix)),
        packet[12:start],
        prefix,
        packet[start:],
    ))


def _status(raw: bytes) -> int:
    return _STATUS.unpack_from(raw, 6)[0]


# Replicate routes (IClusterCodec.replication), by the opcode sent (a quiet
# opcode's replying form): reads go to the first route only; incr/decr, whose
# counters are per server, too (then copied); writes with a CAS likewise.
_REPLICATION = {
    GET: REPLICA_READ,
    GETK: REPLICA_READ,
    GAT: REPLICA_READ,
    GATK: REPLICA_READ,
    INCREMENT: REPLICA_FIRST,
    DECREMENT: REPLICA_FIRST,
}
_CAS_WRITES = frozenset([SET, ADD, REPLACE, APPEND, PREPEND, DELETE])
# Statuses that are outcomes, not failures (a miss, a CAS mismatch, not stored).
_OUTCOMES = frozenset([STATUS_OK, STATUS_KEY_NOT_FOUND, STATUS_KEY_EXISTS, STATUS_NOT_STORED])


@implementer(ICodec, IClusterCodec)
class BinaryCodec(object):
    """The memcached binary protocol."""

    name = "memcache_binary"
    warm_codec = memcache_text.codec  # a warm-up route reads and fills with meta commands (they carry the TTL)

    def request_parser(self, pool_config):
        return BinaryRequestParser(self, pool_config)

    def reply_parser(self):
        return BinaryReplyParser()

    def split(self, request, groups, strips=None):
        raise NotImplementedError("binary requests carry one key; nothing is split")

    def part_data(self, request, keys):
        return request.data

    def strip_keys(self, request, prefix):
        key = request.key
        if key is None or not key.startswith(prefix):
            return
        request.frame = _cut_key(request.frame, len(prefix))
        request.key = key[len(prefix) :]

    def restore_keys(self, request, raw, prefix):
        if raw[2:4] == b"\0\0":  # no key in the reply (only GETK and GATK replies carry one)
            return raw
        return _put_key_prefix(raw, prefix)

    def denied_reply(self, request):
        return self.error_reply(request, "key not permitted")

    def join(self, request, replies):
        raise NotImplementedError("binary requests carry one key; nothing is sliced")

    def merge(self, request, fragments):
        # A broadcast (flush): success from all, else the first failure.
        for fragment in fragments:
            if _status(fragment.reply) != STATUS_OK:
                return fragment.reply
        return fragments[0].reply

    def filter_reply(self, request, raw):
        opcode, hides = request.data
        if raw[6:8] == hides:
            return b""
        return raw[:1] + bytes((opcode,)) + raw[2:]

    def error_reply(self, request, message):
        frame = request.frame
        opcode = request.data[0] if request.filter else frame[1]
        return response(opcode, frame[12:16], STATUS_TEMPORARY_FAILURE, value=message.encode("utf-8", "replace"))

    def classify_reply(self, request, raw):
        return REPLY_FINAL  # memcached has no redirects; failover routes act on failures

    def reply_failed(self, raw):
        return _status(raw) not in _OUTCOMES

    # -- replicate and warm-up routes (IClusterCodec) ----------------------------

    def replication(self, request):
        opcode = request.frame[1]
        policy = _REPLICATION.get(opcode)
        if policy is not None:
            return policy
        if opcode in _CAS_WRITES and request.frame[16:24] != _ZERO_CAS:
            return REPLICA_FIRST  # the CAS is the first route's: the others get the write without it
        return REPLICA_WRITE

    def replica_copy(self, request, raw):
        if _status(raw) != STATUS_OK:
            return None
        frame = request.frame
        if frame[1] in (INCREMENT, DECREMENT):
            return frame
        return frame[:16] + _ZERO_CAS + frame[24:]

    def warm_lookup(self, request):
        return WARM_REREAD if request.frame[1] in (GET, GETK) else WARM_NONE

    def warm_misses(self, request, raw):
        return [request.key] if _status(raw) == STATUS_KEY_NOT_FOUND else []

    def handshake(self, pool_config):
        user = pool_config.memcache_auth_user
        if not user:
            return []
        # SASL PLAIN (authzid, authcid, password); a refused login closes the
        # connection (close_after), as memcached fails what comes after it anyway.
        plain = b"\0" + user.encode("utf-8") + b"\0" + pool_config.memcache_auth_password.encode("utf-8")
        return [Request(_packet(SASL_AUTH, b"PLAIN", value=plain), b"sasl_auth", close_after=True)]

    def handshake_error(self, raw):
        status = _status(raw)
        if status == STATUS_OK:
            return None
        text = raw[HEADER_LENGTH + raw[4] + _KEY_LENGTH.unpack_from(raw, 2)[0] :]
        return "status 0x%04x (%s)" % (status, text.decode("utf-8", "replace")) if text else "status 0x%04x" % (status,)

    def probe_request(self):
        return Request(_REQUEST_HEADER.pack(REQUEST_MAGIC, VERSION_OPCODE, 0, 0, 0) + bytes(12), b"version")

    def warmup_samples(self, pool_config):
        return [(_WARMUP_READS, _warmup_answer)]


def _packet(opcode: int, key: bytes, extras: bytes = b"", value: bytes = b"") -> bytes:
    """A request packet (opaque and CAS zero)."""
    header = _REQUEST_HEADER.pack(REQUEST_MAGIC, opcode, len(key), len(extras), len(extras) + len(key) + len(value))
    return header + bytes(12) + extras + key + value


# Warm-up traffic (ICodec.warmup_samples): gets and sets one at a time,
# pipelined, and quiet ones.
_WARMUP_VALUE = b"v" * 32
_WARMUP_STORE = bytes(8)  # flags and expiry
_WARMUP_READS = [
    _packet(GET, WARMUP_KEYS[0]),
    _packet(SET, WARMUP_KEYS[1], _WARMUP_STORE, _WARMUP_VALUE),
    b"".join([_packet(GET, key) for key in WARMUP_KEYS[:8]]
             + [_packet(SET, key, _WARMUP_STORE, _WARMUP_VALUE) for key in WARMUP_KEYS[:8]]),
    b"".join([_packet(GETKQ, key) for key in WARMUP_KEYS[:8]]) + _packet(NOOP, b""),
    _packet(SETQ, WARMUP_KEYS[2], _WARMUP_STORE, _WARMUP_VALUE) + _packet(NOOP, b""),
    _packet(DELETE, WARMUP_KEYS[3]),
]


def _warmup_answer(frame: bytes) -> bytes:
    """What memcached answers to a forwarded warm-up packet (a hit for every get)."""
    opcode = frame[1]
    opaque = frame[12:16]
    if opcode in (GET, GETK):
        key = frame[HEADER_LENGTH : HEADER_LENGTH + _REQUEST_HEADER.unpack_from(frame)[2]] if opcode == GETK else b""
        body = 4 + len(key) + len(_WARMUP_VALUE)  # flags, key, value
        header = _RESPONSE_HEADER.pack(RESPONSE_MAGIC, opcode, len(key), 4, 0, STATUS_OK, body)
        return header + opaque + _ZERO_CAS + bytes(4) + key + _WARMUP_VALUE
    return response(opcode, opaque)


codec = BinaryCodec()
