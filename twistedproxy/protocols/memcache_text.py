"""
The memcached text protocol (memcached 1.6 C{doc/protocol.txt}): the classic
commands and the meta commands (mg, ms, md, ma, mn, me), as an L{ICodec}.

Client side (L{TextRequestParser}): every command line is split into tokens once
and dispatched on the command word (the common get/gets/delete/set shapes are
framed inline first).  Frames are forwarded raw except where the
one-reply-per-frame rule needs a rewrite:

  - classic C{noreply}: stripped toward the backend, C{filter} set, and the
    client sees nothing at all for that request, errors included, exactly as
    memcached itself behaves (C{out_string} drops every reply of a noreply
    command) and as twemproxy does: a noreply client never reads, so any line
    sent to it would be taken as the reply to its next command;
  - meta C{q}: stripped toward the backend, C{filter} set, and only the codes
    memcached's quiet mode hides are dropped (mg: EN; ms: HD; md: HD; ma: HD and
    the VA of a successful C{v}); errors always reach the client.

Multi-key retrievals (get, gets, gat, gats) route ROUTE_KEYS: L{TextCodec.split}
builds one command per server and L{TextCodec.merge} re-emits the VALUE blocks
in the client's key order under a single END.  version, stats, quit, mn and all
malformed but well-framed commands are answered locally.

Backend side (L{TextReplyParser}): replies describe their own shape, so framing
does not depend on the request: VALUE blocks run until the line after the last
one (END or an error), a VA line carries one data block, the C{key=...} lines of
a metadump listing (the proxy's own request, L{METADUMP}) run until END,
anything else is one line.
"""

from __future__ import annotations

import binascii
import os
import time

from zope.interface import implementer

from twistedproxy._version import __version__
from twistedproxy.core.request import (
    REPLICA_FIRST,
    REPLICA_READ,
    REPLICA_WRITE,
    REPLY_FINAL,
    ROUTE_ALL,
    ROUTE_KEYS,
    WARM_ANSWER,
    WARM_NONE,
    WARM_REREAD,
    ProtocolError,
    Request,
    keys_of,
    local,
)
from twistedproxy.protocols import WARMUP_KEYS
from twistedproxy.protocols.interface import IClusterCodec, ICodec, IReplyParser, IRequestParser

# What `version` answers.  Clients parse "major.minor.micro" (libmemcached
# rejects a major of 0, memccapable switches to 1.6 rules on it), so the string
# leads with the memcached protocol level this proxy speaks, then says who we are.
VERSION = ("1.6.0-twistedproxy-" + __version__).encode("ascii")

MAX_KEY_LENGTH = 250
# A command line longer than this without its newline means framing is lost.
# Retrieval lines carry many keys and may grow up to the pool's max_request_bytes.
MAX_LINE_LENGTH = 8192
# A backend reply line (VALUE, VA, ME ...) longer than this means garbage.
MAX_REPLY_LINE_LENGTH = 65536

MAX_UINT32 = 0xFFFFFFFF
MAX_UINT64 = 0xFFFFFFFFFFFFFFFF
MIN_INT32 = -0x80000000
MAX_INT32 = 0x7FFFFFFF

# Bytes that may not appear in a command line (memcached: keys hold no control
# characters; tabs and the like would also change how a line splits).
_CONTROL_BYTES = bytes(range(32)) + b"\x7f"

_CRLF = b"\r\n"
_ERROR = b"ERROR\r\n"
_END = b"END\r\n"
_CRLF_END = _CRLF + _END
_OK = b"OK\r\n"
_MN = b"MN\r\n"
_RESET = b"RESET\r\n"
_NOREPLY = b"noreply"

_STARTED = time.time()

# `stats <group>` groups of memcached 1.6 that the proxy answers with an empty list.
_STATS_GROUPS = frozenset([b"settings", b"items", b"slabs", b"sizes", b"conns", b"extstore"])


def client_error(reason: bytes) -> bytes:
    return b"CLIENT_ERROR " + reason + _CRLF


def server_error(message: str) -> bytes:
    """A SERVER_ERROR line; the message is flattened to one line."""
    text = " ".join(message.split())
    return b"SERVER_ERROR " + text.encode("utf-8", "replace") + _CRLF


def stats_lines() -> list:
    """(name, value) pairs the proxy reports for memcached's C{stats} command."""
    now = time.time()
    return [
        (b"pid", str(os.getpid()).encode("ascii")),
        (b"uptime", str(int(now - _STARTED)).encode("ascii")),
        (b"time", str(int(now)).encode("ascii")),
        (b"version", VERSION),
        (b"pointer_size", b"64"),
    ]


def _is_uint(token: bytes, maximum: int) -> bool:
    return token.isdigit() and (len(token) < 10 or _in_range(token, 0, maximum))


def _is_int32(token: bytes) -> bool:
    digits = token[1:] if token[:1] == b"-" else token
    return digits.isdigit() and (len(digits) < 10 or _in_range(token, MIN_INT32, MAX_INT32))


def _in_range(token: bytes, low: int, high: int) -> bool:
    """
    Whether a token of digits (maybe after a minus) too long to judge by its
    length lies in [low, high].  Leading zeros count for nothing, as with
    memcached's strtoull; int() alone would refuse thousands of digits.
    """
    sign = token[:1] == b"-"
    digits = token[sign:].lstrip(b"0") or b"0"
    if len(digits) > 20:
        return False
    value = int(digits)
    return low <= (-value if sign else value) <= high


# Meta commands: the reply codes their q flag hides (memcached 1.6).
_META_QUIET_CODES = {
    b"mg": frozenset([b"EN"]),
    b"ms": frozenset([b"HD"]),
    b"md": frozenset([b"HD"]),
    b"ma": frozenset([b"HD", b"VA"]),
}
_BYTE_Q = ord("q")
_BYTE_B = ord("b")

# The command words of TextRequestParser.feed's fast paths.
_GET = b"get"
_GETS = b"gets"
_DELETE = b"delete"
_SET = b"set"

# Commands followed by a data block, and which token holds its length; a
# malformed line of these still skips the block when that token is readable.
_DATA_LENGTH_TOKEN = {
    b"set": 4,
    b"add": 4,
    b"replace": 4,
    b"append": 4,
    b"prepend": 4,
    b"cas": 4,
    b"ms": 2,
}
# Classic commands that take a trailing noreply.
_NOREPLY_COMMANDS = frozenset(
    [
        b"set",
        b"add",
        b"replace",
        b"append",
        b"prepend",
        b"cas",
        b"delete",
        b"incr",
        b"decr",
        b"touch",
        b"flush_all",
        b"verbosity",
    ]
)


class StreamBuffer(object):
    """
    Bytes received but not framed yet.

    Kept as a list of chunks that is joined only once at least C{_need} bytes
    are there, so a large frame arriving in many reads is copied once instead
    of once per read.
    """

    __slots__ = ("_chunks", "_size", "_need")

    def __init__(self):
        self._chunks = []
        self._size = 0
        self._need = 1

    def buffered(self) -> int:
        return self._size

    def _gather(self, data: bytes):
        """
        Add C{data}; return every buffered byte (and forget them) once C{_need}
        are there, else None.
        """
        chunks = self._chunks
        if not chunks:
            return data
        chunks.append(data)
        self._size += len(data)
        if self._size < self._need:
            return None
        self._chunks = []
        self._size = 0
        return b"".join(chunks)

    def _keep(self, buf: bytes, pos: int, need: int) -> None:
        """Keep the incomplete frame C{buf[pos:]}; it needs C{need} bytes in all."""
        self._chunks = [buf[pos:] if pos else buf]
        self._size = len(buf) - pos
        self._need = need


class ReplyBuffer(StreamBuffer):
    """A L{StreamBuffer} that hands out one reply at a time from a read position."""

    __slots__ = ("_buf", "_pos")

    def __init__(self):
        StreamBuffer.__init__(self)
        self._buf = b""
        self._pos = 0

    def feed(self, data: bytes) -> None:
        if self._size or self._chunks:
            self._chunks.append(data)
        else:  # every earlier byte is consumed: read from data itself, no copy
            self._buf = data
            self._pos = 0
        self._size += len(data)

    def _ready(self):
        """The buffer (the next reply starts at C{_pos}) or None while C{_need} bytes are missing."""
        if self._size < self._need:
            return None
        chunks = self._chunks
        if chunks:
            rest = self._buf[self._pos :]
            if rest:
                chunks.insert(0, rest)
            self._buf = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            self._pos = 0
            self._chunks = []
        return self._buf

    def _cut(self, end: int) -> bytes:
        """Return the reply that ends at C{end} and move past it."""
        pos = self._pos
        self._pos = end
        self._size -= end - pos
        self._need = 1
        return self._buf[pos:end]


class ClientStreamParser(StreamBuffer):
    """
    What the memcached request parsers share: their codec, the pool's request
    size limit, and being closed (after quit or lost framing nothing more is read).
    """

    __slots__ = ("codec", "_max_request", "_closed")

    def __init__(self, codec, pool_config):
        StreamBuffer.__init__(self)
        self.codec = codec
        self._max_request = pool_config.max_request_bytes
        self._closed = False

    def state(self) -> dict:
        """This connection's state for another worker: only its bytes (L{unparsed})."""
        return {}

    def restore(self, state: dict) -> None:
        """Go on from L{state} taken in another worker."""

    def unparsed(self) -> bytes:
        """The bytes received and not framed yet (they start a frame)."""
        return b"".join(self._chunks)

    def _take(self, data: bytes):
        """The buffered bytes to frame now, or None (closed, or not enough yet)."""
        if self._closed:
            return None
        return self._gather(data)


@implementer(IRequestParser)
class TextRequestParser(ClientStreamParser):
    """Frames one text-protocol client connection (classic and meta commands)."""

    __slots__ = ()

    def feed(self, data: bytes) -> list:
        buf = self._take(data)
        if buf is None:
            return []
        requests = []
        append = requests.append
        end = len(buf)
        pos = 0
        while pos < end:
            eol = buf.find(b"\n", pos)
            if eol < 0:
                self._check_line(buf, pos, end - pos, requests)
                self._keep(buf, pos, end - pos + 1)
                return requests
            if eol - pos > MAX_LINE_LENGTH:  # refused the same when it arrives whole
                self._check_line(buf, pos, eol - pos, requests)
            after = eol + 1
            line_end = eol - 1 if eol > pos and buf[eol - 1] == 13 else eol
            # Fast paths for the shapes nearly all traffic has ("get|gets|delete
            # <key>", "set <key> <flags> <exptime> <bytes>" with its block
            # complete): they accept exactly what the handlers below would accept
            # and frame it the same way; anything else (noreply, errors, a block
            # still arriving) goes on to the handlers.  A one-key line is cut at
            # its command word, not split: on PyPy that saves the line, its token
            # list and copies per request (a key with no space and a printable
            # latin-1 text has no control byte; a few high bytes are not
            # "printable" and just take the handlers' exact check).  A set line
            # is split, which CPython does fastest.
            first = buf[pos]
            if first == 103 or first == 100:  # "g", "d"
                start = line_end  # not a fast path
                if first == 103 and buf[pos + 1] == 101 and buf[pos + 2] == 116:  # "get"
                    if buf[pos + 3] == 32:
                        start = pos + 4
                        command = _GET
                    elif buf[pos + 3] == 115 and buf[pos + 4] == 32:
                        start = pos + 5
                        command = _GETS
                elif buf.startswith(b"delete ", pos):
                    start = pos + 7
                    command = _DELETE
                if 0 < line_end - start <= MAX_KEY_LENGTH:
                    key = buf[start:line_end]
                    if (
                        32 not in key
                        and key.decode("latin-1").isprintable()
                        and (command is not _DELETE or key != _NOREPLY)
                    ):
                        append(Request(buf[pos:after], command, key))
                        pos = after
                        continue
            line = buf[pos:line_end]
            tokens = line.split()
            if len(tokens) == 5 and first == 115 and tokens[0] == _SET:
                key = tokens[1]
                flags = tokens[2]
                exptime = tokens[3]
                length = tokens[4]
                if (
                    len(key) <= MAX_KEY_LENGTH
                    and len(flags) < 10
                    and flags.isdigit()
                    and len(exptime) < 10
                    and exptime.isdigit()
                    and length.isdigit()
                    and len(length) < 20
                    and line.decode("latin-1").isprintable()
                ):
                    size = int(length)
                    block_end = after + size + 2
                    if (
                        block_end <= end
                        and size <= self._max_request
                        and buf[block_end - 2] == 13
                        and buf[block_end - 1] == 10
                    ):
                        append(Request(buf[pos:block_end], _SET, key))
                        pos = block_end
                        continue
            if not tokens:
                append(local(b"unknown", _ERROR))
                pos = after
                continue
            command = tokens[0]
            handler = self._handlers.get(command)
            if handler is None:
                append(local(b"unknown", _ERROR))
                pos = after
                continue
            if len(line.translate(None, _CONTROL_BYTES)) != len(line):
                after = self._reject(tokens, buf, pos, after, b"control characters in command line", requests)
            else:
                after = handler(self, tokens, buf, pos, after, requests)
            if after is None:  # a data block is still arriving; _need was set
                self._keep(buf, pos, self._need)
                return requests
            if self._closed:
                break
            pos = after
        return requests

    def _check_line(self, buf: bytes, pos: int, size: int, requests: list) -> None:
        """Refuse the command line at C{pos} if its first C{size} bytes are already too long."""
        if size <= MAX_LINE_LENGTH:
            return
        if buf.startswith(b"get", pos) or buf.startswith(b"gat", pos):
            if size <= self._max_request:
                return
        raise ProtocolError(client_error(b"line too long"), requests)

    def _reject(self, tokens: list, buf: bytes, pos: int, after: int, reason: bytes, requests: list):
        """
        Answer a malformed command with CLIENT_ERROR, skipping its data block when
        its length is readable so the next command still frames.  A classic
        command that asked for noreply gets nothing, as memcached does.
        """
        command = tokens[0]
        index = _DATA_LENGTH_TOKEN.get(command)
        if index is not None and len(tokens) > index and tokens[index].isdigit():
            block_end = after + self._data_length(tokens[index], requests) + 2
            if block_end > len(buf):
                self._need = block_end - pos
                return None
            after = block_end
        if tokens[-1] == _NOREPLY and command in _NOREPLY_COMMANDS:
            requests.append(local(command, b""))
        else:
            requests.append(local(command, client_error(reason)))
        return after

    @staticmethod
    def _error(tokens, after, requests):
        """
        Answer ERROR: memcached's reply to a command word it knows with a token
        count it does not accept (no data block is skipped, as memcached skips none).
        """
        requests.append(local(tokens[0], _ERROR))
        return after

    def _data_length(self, token: bytes, requests: list) -> int:
        """The length of a data block; one over max_request_bytes loses framing."""
        if len(token) > 19:  # leading zeros count for nothing; int() refuses thousands of digits
            token = token.lstrip(b"0") or b"0"
        length = int(token) if len(token) <= 19 else self._max_request + 1
        if length > self._max_request:
            raise ProtocolError(b"SERVER_ERROR object too large for cache\r\n", requests)
        return length

    # -- classic commands ---------------------------------------------------

    def _retrieval(self, tokens, buf, pos, after, requests):
        """get|gets <key>*"""
        if len(tokens) == 2:
            key = tokens[1]
            if len(key) > MAX_KEY_LENGTH:
                return self._reject(tokens, buf, pos, after, b"key too long", requests)
            requests.append(Request(buf[pos:after], tokens[0], key))
            return after
        if len(tokens) < 2:
            return self._error(tokens, after, requests)
        return self._multi_key(tokens, tokens[1:], tokens[0] + b" ", buf, pos, after, requests)

    def _get_and_touch(self, tokens, buf, pos, after, requests):
        """gat|gats <exptime> <key>*"""
        if len(tokens) < 2:
            return self._error(tokens, after, requests)
        if not _is_int32(tokens[1]):
            return self._reject(tokens, buf, pos, after, b"invalid exptime argument", requests)
        if len(tokens) == 2:  # no key: memcached touches nothing and answers END
            requests.append(local(tokens[0], _END))
            return after
        if len(tokens) == 3:
            key = tokens[2]
            if len(key) > MAX_KEY_LENGTH:
                return self._reject(tokens, buf, pos, after, b"key too long", requests)
            requests.append(Request(buf[pos:after], tokens[0], key))
            return after
        prefix = tokens[0] + b" " + tokens[1] + b" "
        return self._multi_key(tokens, tokens[2:], prefix, buf, pos, after, requests)

    def _multi_key(self, tokens, keys, prefix, buf, pos, after, requests):
        if max(map(len, keys)) > MAX_KEY_LENGTH:
            return self._reject(tokens, buf, pos, after, b"key too long", requests)
        requests.append(Request(buf[pos:after], tokens[0], route=ROUTE_KEYS, keys=keys, data=prefix))
        return after

    def _storage(self, tokens, buf, pos, after, requests):
        """set|add|replace|append|prepend <key> <flags> <exptime> <bytes> [noreply], cas ... <cas unique> [noreply]"""
        command = tokens[0]
        noreply = tokens[-1] == _NOREPLY
        if len(tokens) < 5:  # no length token, so no data block to skip
            return self._error(tokens, after, requests)
        if len(tokens) != 5 + (command == b"cas") + noreply:
            return self._reject(tokens, buf, pos, after, b"bad command line format", requests)
        key = tokens[1]
        if len(key) > MAX_KEY_LENGTH:
            return self._reject(tokens, buf, pos, after, b"key too long", requests)
        if not (
            _is_uint(tokens[2], MAX_UINT32)
            and _is_int32(tokens[3])
            and tokens[4].isdigit()
            and (command != b"cas" or _is_uint(tokens[5], MAX_UINT64))
        ):
            return self._reject(tokens, buf, pos, after, b"bad command line format", requests)
        end = after + self._data_length(tokens[4], requests) + 2
        if end > len(buf):
            self._need = end - pos
            return None
        if buf[end - 2 : end] != _CRLF:
            return self._reject(tokens, buf, pos, after, b"bad data chunk", requests)
        if noreply:
            frame = b" ".join(tokens[:-1]) + _CRLF + buf[after:end]
            requests.append(Request(frame, command, key, filter=True))
        else:
            requests.append(Request(buf[pos:end], command, key))
        return end

    def _delete(self, tokens, buf, pos, after, requests):
        """delete <key> [0] [noreply] (the legacy hold time must be 0)"""
        if not 2 <= len(tokens) <= 4:
            return self._error(tokens, after, requests)
        noreply = tokens[-1] == _NOREPLY
        count = len(tokens) - noreply
        if not (count == 2 or (count == 3 and tokens[2] == b"0")):
            return self._reject(
                tokens, buf, pos, after, b"bad command line format.  Usage: delete <key> [noreply]", requests
            )
        return self._keyed(tokens, buf, pos, after, requests, noreply)

    def _arithmetic(self, tokens, buf, pos, after, requests):
        """incr|decr <key> <value> [noreply]"""
        if len(tokens) not in (3, 4):
            return self._error(tokens, after, requests)
        noreply = tokens[-1] == _NOREPLY
        if len(tokens) - noreply != 3:
            return self._reject(tokens, buf, pos, after, b"bad command line format", requests)
        if not _is_uint(tokens[2], MAX_UINT64):
            return self._reject(tokens, buf, pos, after, b"invalid numeric delta argument", requests)
        return self._keyed(tokens, buf, pos, after, requests, noreply)

    def _touch(self, tokens, buf, pos, after, requests):
        """touch <key> <exptime> [noreply]"""
        if len(tokens) not in (3, 4):
            return self._error(tokens, after, requests)
        noreply = tokens[-1] == _NOREPLY
        if len(tokens) - noreply != 3:
            return self._reject(tokens, buf, pos, after, b"bad command line format", requests)
        if not _is_int32(tokens[2]):
            return self._reject(tokens, buf, pos, after, b"invalid exptime argument", requests)
        return self._keyed(tokens, buf, pos, after, requests, noreply)

    def _keyed(self, tokens, buf, pos, after, requests, noreply):
        """Emit a one-line command on tokens[1], stripping noreply toward the backend."""
        key = tokens[1]
        if len(key) > MAX_KEY_LENGTH:
            return self._reject(tokens, buf, pos, after, b"key too long", requests)
        if noreply:
            requests.append(Request(b" ".join(tokens[:-1]) + _CRLF, tokens[0], key, filter=True))
        else:
            requests.append(Request(buf[pos:after], tokens[0], key))
        return after

    def _verbosity(self, tokens, buf, pos, after, requests):
        """verbosity <level> [noreply]: every server, one OK."""
        if len(tokens) not in (2, 3):
            return self._error(tokens, after, requests)
        if not _is_uint(tokens[1], MAX_UINT32):
            return self._reject(tokens, buf, pos, after, b"bad command line format", requests)
        return self._broadcast(tokens, buf, pos, after, requests)

    def _flush_all(self, tokens, buf, pos, after, requests):
        """flush_all [delay] [noreply]: every server, one reply."""
        if len(tokens) > 3:
            return self._error(tokens, after, requests)
        noreply = tokens[-1] == _NOREPLY
        count = len(tokens) - noreply
        if count > 2:
            return self._reject(tokens, buf, pos, after, b"bad command line format", requests)
        if count == 2 and not _is_int32(tokens[1]):
            return self._reject(tokens, buf, pos, after, b"invalid exptime argument", requests)
        return self._broadcast(tokens, buf, pos, after, requests)

    def _broadcast(self, tokens, buf, pos, after, requests):
        if tokens[-1] == _NOREPLY:
            frame = b" ".join(tokens[:-1]) + _CRLF
            requests.append(Request(frame, tokens[0], route=ROUTE_ALL, filter=True))
        else:
            requests.append(Request(buf[pos:after], tokens[0], route=ROUTE_ALL))
        return after

    def _version(self, tokens, buf, pos, after, requests):
        """version: answered by the proxy (extra tokens ignored, as memcached 1.6 does)."""
        requests.append(local(b"version", b"VERSION " + VERSION + _CRLF))
        return after

    def _stats(self, tokens, buf, pos, after, requests):
        """
        stats [group]: answered by the proxy; per-server stats are on the stats port.
        The groups memcached knows list nothing here; any other argument (noreply
        included) is an ERROR, as memcached answers an unknown group.
        """
        if len(tokens) == 2 and tokens[1] == b"reset":
            requests.append(local(b"stats", _RESET))
            return after
        if len(tokens) > 1:
            known = len(tokens) == 2 and tokens[1] in _STATS_GROUPS
            requests.append(local(b"stats", _END if known else _ERROR))
            return after
        lines = [b"STAT %s %s\r\n" % pair for pair in stats_lines()]
        lines.append(_END)
        requests.append(local(b"stats", b"".join(lines)))
        return after

    def _quit(self, tokens, buf, pos, after, requests):
        """quit: close the connection; nothing after it is read."""
        requests.append(local(b"quit", b"", close_after=True))
        self._closed = True
        return after

    # -- meta commands ------------------------------------------------------

    def _meta(self, tokens, buf, pos, after, requests):
        """mg|md|ma|me <key> <flags>*"""
        return self._meta_request(tokens, 2, buf, pos, after, after, requests)

    def _meta_set(self, tokens, buf, pos, after, requests):
        """ms <key> <datalen> <flags>*, then the data block."""
        if len(tokens) < 2:
            return self._error(tokens, after, requests)
        if len(tokens) < 3 or not tokens[2].isdigit():
            return self._reject(tokens, buf, pos, after, b"bad command line format", requests)
        end = after + self._data_length(tokens[2], requests) + 2
        if end > len(buf):
            self._need = end - pos
            return None
        if buf[end - 2 : end] != _CRLF:
            return self._reject(tokens, buf, pos, after, b"bad data chunk", requests)
        return self._meta_request(tokens, 3, buf, pos, after, end, requests)

    def _meta_request(self, tokens, first_flag, buf, pos, after, end, requests):
        """
        Emit a meta command whose flags start at C{tokens[first_flag]} and whose
        frame ends at C{end}.  The routing key is base64-decoded under the b flag
        so it lands where the plain key would; a q flag is stripped toward the
        backend and its quiet codes are filtered here instead.
        """
        command = tokens[0]
        if len(tokens) < 2:
            return self._error(tokens, after, requests)
        key = tokens[1]
        if len(key) > MAX_KEY_LENGTH:
            return self._reject(tokens, buf, pos, after, b"key too long", requests)
        quiet = False
        for flag in tokens[first_flag:]:
            letter = flag[0]
            if letter == _BYTE_Q:
                quiet = True
            elif letter == _BYTE_B:
                try:
                    key = binascii.a2b_base64(key) if _is_base64(key) else None
                except binascii.Error:
                    key = None
                if not key:
                    return self._reject(tokens, buf, pos, after, b"error decoding key", requests)
        codes = _META_QUIET_CODES.get(command) if quiet else None
        if codes is None:
            requests.append(Request(buf[pos:end], command, key))
            return end
        kept = tokens[:first_flag] + [flag for flag in tokens[first_flag:] if flag[0] != _BYTE_Q]
        frame = b" ".join(kept) + _CRLF + buf[after:end]
        requests.append(Request(frame, command, key, filter=True, data=codes))
        return end

    def _meta_noop(self, tokens, buf, pos, after, requests):
        """mn: answered by the proxy; replies leave in request order, so it still
        comes after every earlier reply, whichever servers they came from."""
        requests.append(local(b"mn", _MN))
        return after

    # The command word -> its handler(self, tokens, buf, pos, after, requests):
    # tokens is the split command line, which spans buf[pos:after]; a handler
    # appends its request(s) and returns where the next command starts, or None
    # (with _need set) while a data block is still arriving.
    _handlers = {
        b"get": _retrieval,
        b"gets": _retrieval,
        b"gat": _get_and_touch,
        b"gats": _get_and_touch,
        b"set": _storage,
        b"add": _storage,
        b"replace": _storage,
        b"append": _storage,
        b"prepend": _storage,
        b"cas": _storage,
        b"delete": _delete,
        b"incr": _arithmetic,
        b"decr": _arithmetic,
        b"touch": _touch,
        b"mg": _meta,
        b"md": _meta,
        b"ma": _meta,
        b"me": _meta,
        b"ms": _meta_set,
        b"mn": _meta_noop,
        b"version": _version,
        b"verbosity": _verbosity,
        b"flush_all": _flush_all,
        b"stats": _stats,
        b"quit": _quit,
    }


_BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="


def _is_base64(token: bytes) -> bool:
    """True for a well-formed, padded base64 string (a2b_base64 alone skips junk)."""
    return len(token) % 4 == 0 and not token.translate(None, _BASE64_ALPHABET)


@implementer(IReplyParser)
class TextReplyParser(ReplyBuffer):
    """Frames one backend connection's text-protocol replies (classic and meta)."""

    __slots__ = ("_resume",)

    def __init__(self):
        ReplyBuffer.__init__(self)
        self._resume = 0  # how far into the current reply complete VALUE blocks reach

    def next_reply(self, request):
        buf = self._ready()
        if buf is None:
            return None
        start = self._pos
        cur = start + self._resume
        while True:
            eol = buf.find(b"\n", cur)
            if eol < 0:
                if len(buf) - cur > MAX_REPLY_LINE_LENGTH:
                    raise ProtocolError(b"", [], "backend reply line too long")
                self._resume = cur - start
                self._need = len(buf) - start + 1
                return None
            # Only VALUE and VA lines are followed by data; every other reply
            # (END after VALUE blocks, STORED, HD ...) ends with its line.
            length_index = 0
            if buf[cur] == 86:  # "V": one byte rules out the rest without a call
                if buf.startswith(b"VALUE ", cur):
                    length_index = 3
                elif buf.startswith(b"VA ", cur):
                    length_index = 1
            if not length_index:
                if buf[cur] == 107 and buf.startswith(b"key=", cur):
                    cur = eol + 1  # a line of a metadump listing (METADUMP): its reply ends with END
                    continue
                end = eol + 1
                break
            parts = buf[cur:eol].split()
            if len(parts) <= length_index or not parts[length_index].isdigit() or len(parts[length_index]) > 20:
                raise ProtocolError(b"", [], "bad value line from backend: %r" % (buf[cur:eol][:80],))
            end = eol + 3 + int(parts[length_index])  # the line's LF, the block, its CRLF
            if end > len(buf):
                self._resume = cur - start
                self._need = end - start
                return None
            if length_index == 3 and buf.startswith(_CRLF_END, end - 2):
                end += 5  # the usual hit: one block, then END (no need to look for its line)
                break
            if buf[end - 2 : end] != _CRLF:
                raise ProtocolError(b"", [], "bad data block from backend")
            if length_index == 1:  # a meta VA reply holds one block
                break
            cur = end
        self._resume = 0
        return self._cut(end)


# Replicate routes (IClusterCodec.replication), by command: reads go to the
# first route only; cas, incr, decr and ma, whose CAS tokens and counters are
# per server, too (then copied); other writes to every route.  ms and md with a
# C (compare CAS) flag are decided per request.
_REPLICATION = {
    b"get": REPLICA_READ,
    b"gets": REPLICA_READ,
    b"gat": REPLICA_READ,
    b"gats": REPLICA_READ,
    b"mg": REPLICA_READ,
    b"me": REPLICA_READ,
    b"cas": REPLICA_FIRST,
    b"incr": REPLICA_FIRST,
    b"decr": REPLICA_FIRST,
    b"ma": REPLICA_FIRST,
}
_META_WRITES = (b"ms", b"md")
_ERROR_REPLIES = (b"SERVER_ERROR", b"CLIENT_ERROR", b"ERROR")
# memcached reads an expiration time over 30 days as a Unix time.
_RELATIVE_TTL_MAX = 60 * 60 * 24 * 30
_KEY_UNSAFE = _CONTROL_BYTES + b" "


def _command_line(frame: bytes):
    """The tokens of a frame's command line and where the rest (a data block) starts."""
    eol = frame.find(b"\n")
    return frame[:eol].split(), eol + 1


def _meta_flags_from(command: bytes) -> int:
    """The index of a meta command's first flag token (ms has its data length first)."""
    return 3 if command == b"ms" else 2


def _meta_key(key: bytes):
    """A key as a meta command writes it: itself, or base64 and the b flag (a binary protocol key)."""
    if 0 < len(key) <= MAX_KEY_LENGTH and len(key.translate(None, _KEY_UNSAFE)) == len(key):
        return key, b""
    return binascii.b2a_base64(key, newline=False), b" b"


def _value_blocks(reply: bytes):
    """The VALUE blocks of a get-style reply as (key, block) pairs, and what follows them (END or an error)."""
    blocks = []
    pos = 0
    while reply.startswith(b"VALUE ", pos):
        eol = reply.find(b"\n", pos)
        parts = reply[pos:eol].split()
        end = eol + 1 + int(parts[3]) + 2
        blocks.append((parts[1], reply[pos:end]))
        pos = end
    return blocks, reply[pos:]


# -- meta requests the proxy makes itself (warm-up route, online migration) ------------


def meta_get(key: bytes, cas: bool = False) -> Request:
    """C{mg KEY v f t}: the value, client flags and remaining TTL of C{key} (C{cas}: its CAS too)."""
    token, b64 = _meta_key(key)
    return Request(b"mg " + token + (b" v f t c" if cas else b" v f t") + b64 + _CRLF, b"mg", key)


def meta_item(raw: bytes):
    """
    C{(flags, ttl, data, cas)} from a hit of L{meta_get} (C{ttl} -1: no expiry;
    C{cas} None unless asked for), or None for any other reply.
    """
    if not raw.startswith(b"VA "):
        return None
    eol = raw.find(b"\n")
    tokens = raw[:eol].split()
    flags = b"0"
    ttl = -1
    cas = None
    for token in tokens[2:]:
        if token[:1] == b"f":
            flags = token[1:]
        elif token[:1] == b"t":
            ttl = int(token[1:])
        elif token[:1] == b"c":
            cas = token[1:]
    return flags, ttl, raw[eol + 1 : eol + 1 + int(tokens[1])], cas


def meta_add(key: bytes, value, cas: bool = False):
    """
    C{ms KEY LEN F<flags> T<ttl> ME}: add C{value} (L{meta_item}'s first three)
    unless the server has the key (mode E: a value written there since is never
    overwritten); C{cas}: the reply gives the new item's CAS (L{meta_cas}).
    None for an item that expires within the second (not worth copying).
    """
    flags, ttl, data = value[:3]
    if ttl == 0:
        return None  # expires within the second
    if ttl < 0:
        expiry = b""
    elif ttl <= _RELATIVE_TTL_MAX:
        expiry = b" T%d" % (ttl,)
    else:
        expiry = b" T%d" % (int(time.time()) + ttl,)  # an absolute time, as memcached reads longer ones
    token, b64 = _meta_key(key)
    line = b"ms %s %d F%s%s ME%s%s\r\n" % (token, len(data), flags, expiry, b" c" if cas else b"", b64)
    return Request(line + data + _CRLF, b"ms", key)


def meta_cas(raw: bytes):
    """The CAS token (bytes) a meta reply carries (its C{c} flag), or None."""
    eol = raw.find(b"\n")
    for token in raw[:eol].split()[1:]:
        if token[:1] == b"c":
            return token[1:]
    return None


def meta_delete(key: bytes, cas: bytes = None, invalidate: bool = False) -> Request:
    """
    C{md KEY [C<cas>] [I]}: delete C{key} (only while its CAS is still C{cas},
    if given: HD deleted, NF none, EX changed), or with C{invalidate} mark it
    stale instead (its CAS changes; a meta get still reads it, flagged C{X}).
    """
    token, b64 = _meta_key(key)
    flags = (b" C" + cas if cas is not None else b"") + (b" I" if invalidate else b"")
    return Request(b"md " + token + flags + b64 + _CRLF, b"md", key)


# The listing of every item of a server (online migration): one reply of
# "key=<url-encoded> exp=.. la=.. cas=.. fetch=.. cls=.. size=.." lines, then
# END.  Never a client's request: clients still get the usual refusal.
METADUMP = b"lru_crawler metadump all\r\n"
METADUMP_COMMAND = b"lru_crawler"


@implementer(ICodec, IClusterCodec)
class TextCodec(object):
    """The memcached text protocol, classic and meta commands."""

    name = "memcache_text"

    def request_parser(self, pool_config):
        return TextRequestParser(self, pool_config)

    def reply_parser(self):
        return TextReplyParser()

    def split(self, request, groups, strips=None):
        keys = request.keys
        prefix = request.data
        if strips is None:
            return [prefix + b" ".join([keys[i] for i in group]) + _CRLF for group in groups]
        return [
            prefix + b" ".join([keys[i][cut:] for i in group]) + _CRLF for group, cut in zip(groups, strips)
        ]

    def strip_keys(self, request, prefix):
        cut = len(prefix)
        if request.keys is not None:  # get|gets|gat|gats with several keys: one line from the keys
            request.keys = [key[cut:] if key.startswith(prefix) else key for key in request.keys]
            request.frame = request.data + b" ".join(request.keys) + _CRLF
            return
        key = request.key
        if not key.startswith(prefix):
            return
        frame = request.frame
        eol = frame.find(b"\n")
        line_end = eol - 1 if eol > 0 and frame[eol - 1] == 13 else eol
        tokens = frame[:line_end].split()
        at = 2 if tokens[0] in (b"gat", b"gats") else 1
        if tokens[0] in _META_COMMANDS and b"b" in tokens[2:]:  # a base64 key stays base64
            tokens[at] = binascii.b2a_base64(key[cut:], newline=False)
        else:
            tokens[at] = tokens[at][cut:]
        request.frame = b" ".join(tokens) + frame[line_end:]
        request.key = key[cut:]

    def restore_keys(self, request, raw, prefix):
        if raw.startswith(b"VALUE "):
            return _prefix_values(raw, prefix)
        if request.command in _META_COMMANDS and raw[:2] in _META_CODES:
            return _prefix_meta_key(raw, prefix)
        return raw

    def denied_reply(self, request):
        return self.error_reply(request, "key not permitted")

    def part_data(self, request, keys):
        return request.data  # the command and its arguments before the keys

    def merge(self, request, fragments):
        if request.route == ROUTE_KEYS:
            return _merge_values(request.keys, fragments)
        # A broadcast (flush_all, verbosity): OK from all, else the first other answer.
        for fragment in fragments:
            if fragment.reply != _OK:
                return fragment.reply
        return _OK

    def join(self, request, replies):
        # Each slice's reply is its VALUE blocks then END, or an error line.
        out = []
        for reply in replies:
            if reply == _END:
                continue
            if not reply.startswith(b"VALUE ") or not reply.endswith(_END):
                return reply
            out.append(reply[: -len(_END)])
        out.append(_END)
        return b"".join(out)

    def filter_reply(self, request, raw):
        codes = request.data
        if codes is None:  # classic noreply: the client reads nothing
            return b""
        if raw[:2] in codes and raw[2:3] in (b" ", b"\r"):
            return b""
        return raw

    def error_reply(self, request, message):
        if request.filter and request.data is None:
            return b""  # classic noreply: an unread line would answer the next command
        return server_error(message)

    def classify_reply(self, request, raw):
        return REPLY_FINAL  # memcached has no redirects; failover routes act on failures

    def reply_failed(self, raw):
        return raw.startswith(_ERROR_REPLIES)

    # -- replicate and warm-up routes (IClusterCodec) ----------------------------

    @property
    def warm_codec(self):
        return self

    def replication(self, request):
        command = request.command
        if command in _META_WRITES:
            tokens, _ = _command_line(request.frame)
            if any(flag[:1] == b"C" for flag in tokens[_meta_flags_from(command):]):
                return REPLICA_FIRST  # a compare-and-set: the CAS is the first route's
            return REPLICA_WRITE
        return _REPLICATION.get(command, REPLICA_WRITE)

    def replica_copy(self, request, raw):
        command = request.command
        frame = request.frame
        if command == b"cas":
            if raw != b"STORED\r\n":
                return None
            tokens, rest = _command_line(frame)
            return b"set " + b" ".join(tokens[1:5]) + _CRLF + frame[rest:]  # the same item, without the CAS
        if command in (b"incr", b"decr"):
            return frame if raw[:1].isdigit() else None
        if not raw.startswith((b"HD", b"VA")):  # ms, md, ma: not stored, not found, exists ...
            return None
        tokens, rest = _command_line(frame)
        first = _meta_flags_from(command)
        kept = tokens[:first] + [flag for flag in tokens[first:] if flag[:1] != b"C"]
        return b" ".join(kept) + _CRLF + frame[rest:]

    def warm_lookup(self, request):
        command = request.command
        if command == b"get":
            return WARM_ANSWER
        if command == b"gets" or command == b"mg":
            return WARM_REREAD
        return WARM_NONE

    def warm_misses(self, request, raw):
        if request.command == b"mg":
            return [request.key] if raw.startswith(b"EN") else []
        if raw == _END:
            return keys_of(request)
        if not raw.startswith(b"VALUE "):
            return []  # an error
        blocks, _ = _value_blocks(raw)
        found = set(key for key, _ in blocks)
        return [key for key in keys_of(request) if key not in found]

    def warm_fetch(self, key):
        return meta_get(key)

    def warm_value(self, raw):
        item = meta_item(raw)
        return None if item is None else item[:3]

    def warm_fill(self, key, value):
        return meta_add(key, value)

    def warm_stored(self, raw):
        return raw.startswith(b"HD")

    def warm_reply(self, request, raw, found):
        blocks = [
            b"VALUE %s %s %d\r\n%s\r\n" % (key, found[key][0], len(found[key][2]), found[key][2])
            for key in keys_of(request)
            if key in found
        ]
        return raw[: -len(_END)] + b"".join(blocks) + _END

    def handshake(self, pool_config):
        user = pool_config.memcache_auth_user
        if not user:
            return []
        # memcached -Y's login: a set whose data is "user password"; a refused
        # one closes the connection (close_after): memcached answers the commands
        # read with it out of step.
        credentials = user.encode("utf-8") + b" " + pool_config.memcache_auth_password.encode("utf-8")
        frame = b"set auth 0 0 %d\r\n%s\r\n" % (len(credentials), credentials)
        return [Request(frame, b"set", b"auth", close_after=True)]

    def handshake_error(self, raw):
        if raw.startswith(_ERROR_REPLIES):
            return raw.rstrip(b"\r\n").decode("utf-8", "replace")
        return None

    def probe_request(self):
        return Request(b"version\r\n", b"version")

    def warmup_samples(self, pool_config):
        return [(_WARMUP_READS, _warmup_answer)]


# Warm-up traffic (ICodec.warmup_samples): classic and meta commands one at a
# time, pipelined, and a multi-key get split over servers.
_WARMUP_VALUE = b"v" * 32
_WARMUP_SET = b"set %s 0 0 32\r\n" + _WARMUP_VALUE + _CRLF
_WARMUP_READS = [
    b"get %s\r\n" % WARMUP_KEYS[0],
    _WARMUP_SET % WARMUP_KEYS[1],
    b"".join([b"get %s\r\n" % key for key in WARMUP_KEYS[:8]]
             + [_WARMUP_SET % key for key in WARMUP_KEYS[:8]]),
    b"get " + b" ".join(WARMUP_KEYS) + _CRLF,
    b"mg %s v f\r\n" % WARMUP_KEYS[2],
    b"ms %s 32\r\n" % WARMUP_KEYS[3] + _WARMUP_VALUE + _CRLF,
    b"delete %s\r\n" % WARMUP_KEYS[4],
    b"incr %s 1\r\n" % WARMUP_KEYS[5],
]
_WARMUP_BLOCK = b" 0 32\r\n" + _WARMUP_VALUE + _CRLF


def _warmup_answer(frame: bytes) -> bytes:
    """What memcached answers to a forwarded warm-up frame."""
    tokens = frame[: frame.find(_CRLF)].split()
    name = tokens[0]
    if name == b"get":
        return b"".join([b"VALUE " + key + _WARMUP_BLOCK for key in tokens[1:]]) + _END
    if name == b"mg":
        return b"VA 32 f0\r\n" + _WARMUP_VALUE + _CRLF
    if name in (b"ms", b"md"):
        return b"HD\r\n"
    if name == b"delete":
        return b"DELETED\r\n"
    if name in (b"incr", b"decr"):
        return b"1\r\n"
    if name == b"version":
        return b"VERSION " + VERSION + _CRLF
    return b"STORED\r\n"


_META_COMMANDS = frozenset((b"mg", b"ms", b"md", b"ma"))
_META_CODES = frozenset((b"HD", b"VA", b"EN", b"NF", b"NS", b"EX"))


def _prefix_values(raw: bytes, prefix: bytes) -> bytes:
    """A get-style reply with C{prefix} put back in front of each VALUE line's key."""
    out = []
    pos = 0
    while raw.startswith(b"VALUE ", pos):
        eol = raw.find(b"\n", pos)
        length = int(raw[pos:eol].split()[3])
        end = eol + 1 + length + 2
        out.append(b"VALUE ")
        out.append(prefix)
        out.append(raw[pos + 6 : end])
        pos = end
    out.append(raw[pos:])
    return b"".join(out)


def _prefix_meta_key(raw: bytes, prefix: bytes) -> bytes:
    """A meta reply with C{prefix} put back in its C{k} flag (base64 under the C{b} flag)."""
    eol = raw.find(b"\r\n")
    tokens = raw[:eol].split(b" ")
    for index, token in enumerate(tokens):
        if index and token[:1] == b"k":
            if b"b" in tokens:
                key = prefix + binascii.a2b_base64(token[1:])
                tokens[index] = b"k" + binascii.b2a_base64(key, newline=False)
            else:
                tokens[index] = b"k" + prefix + token[1:]
            return b" ".join(tokens) + raw[eol:]
    return raw


def _merge_values(keys: list, fragments: list) -> bytes:
    """
    Join get-style fragment replies: every VALUE block once per asked key, in the
    client's key order, then one END.  A fragment that answered with an error
    line makes that line the whole reply, as one server's error would.
    """
    blocks = {}
    for fragment in fragments:
        found, rest = _value_blocks(fragment.reply)
        blocks.update(found)
        if rest != _END:
            return rest
    if not blocks:
        return _END
    out = [blocks[key] for key in keys if key in blocks]
    out.append(_END)
    return b"".join(out)


codec = TextCodec()
