"""
The Redis wire protocol as an L{ICodec}: the module-level L{codec}.  Its
backend connections speak RESP2; clients that send C{HELLO 3} switch to its
RESP3 variant (L{twistedproxy.protocols.resp3}).

Requests are multibulk frames (C{*N\\r\\n$len\\r\\narg\\r\\n...}) or inline lines
(C{GET key\\r\\n}, as typed into telnet); inline commands are rewritten as
multibulk frames before they are forwarded.  Which commands are routed how is
L{twistedproxy.protocols.redis_commands}'s business.

Both parsers are resumable: a frame cut short remembers where its scan stopped
and how many bytes it needs before scanning again, and keeps the part already
scanned apart from the rest, so a value of tens of megabytes arriving in small
reads costs O(n), never O(n^2).
"""

from __future__ import annotations

import hmac

from zope.interface import implementer

from twistedproxy.core.logins import TOO_MANY_FAILURES_TEXT
from twistedproxy.core.request import REPLY_FINAL, REPLY_REDIRECT, REPLY_RETRY, ROUTE_ANY, ROUTE_KEYS, ProtocolError, Request, local, switching
from twistedproxy.protocols import WARMUP_KEYS, redis_commands as commands, redis_transactions as transactions, resp3
from twistedproxy.protocols.interface import ICodec, IReplyParser, IRequestParser, ISessionCodec

# Redis's own limit for an inline command and for the length line of a
# multibulk or bulk header (PROTO_INLINE_MAX_SIZE).
INLINE_MAX_BYTES = 64 * 1024
_MULTIBULK_MAX_ARGS = 2 ** 31 - 1

_OK = b"+OK\r\n"
_PONG = b"+PONG\r\n"
_NOAUTH = b"-NOAUTH Authentication required\r\n"
# Redis 7's words, where AUTH names users (a front whose tenants are chosen by user).
_NOAUTH_USERS = b"-NOAUTH Authentication required.\r\n"
_HELLO_NOAUTH_USERS = (b"-NOAUTH HELLO must be called with the client already authenticated, otherwise the"
                       b" HELLO AUTH <user> <pass> option can be used to authenticate the client and select"
                       b" the RESP protocol version at the same time\r\n")
_WRONGPASS = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n"
_TENANT_FULL = b"-ERR max number of clients reached for tenant '%s'\r\n"
_INVALID_PASSWORD = b"-ERR invalid password\r\n"
_NO_PASSWORD = b"-ERR Client sent AUTH, but no password is set\r\n"
# A login from an address with too many failed ones (core/logins.py): not checked.  Under
# Redis's own prefix for a refused login, so clients take it for one (redis-py raises its
# AuthenticationError for WRONGPASS, a plain ResponseError for -ERR).
_TOO_MANY_FAILURES = b"-WRONGPASS " + TOO_MANY_FAILURES_TEXT.encode("ascii") + b"\r\n"
_NOT_AN_INTEGER = b"-ERR value is not an integer or out of range\r\n"
_NEGATIVE_KEYS = b"-ERR Number of keys can't be negative\r\n"
_TOO_MANY_KEYS = b"-ERR Number of keys can't be greater than number of args\r\n"
_BAD_BACKEND_REPLY = b"-ERR unexpected reply from the server\r\n"
# Redis 7's words for a key outside the user's ACL key patterns (a tenant's routes).
_NOPERM = b"-NOPERM this user has no permissions to access one of the keys used as arguments\r\n"
# Redis 7's words for a command outside the user's ACL (a read-only user's write).
_NOPERM_COMMAND = b"-NOPERM this user has no permissions to run the '%s' command\r\n"
_NOPROTO = b"-NOPROTO unsupported protocol version\r\n"  # Redis 7's words
_BAD_PROTOVER = b"-ERR Protocol version is not an integer or out of range\r\n"
# Between a refused MULTI and its EXEC or DISCARD (see RedisRequestParser._refused).
_IN_REFUSED_MULTI = b"-ERR MULTI is not supported by the proxy: command refused inside the refused transaction\r\n"
_EXECABORT = b"-EXECABORT Transaction discarded because of previous errors.\r\n"
# HELLO's reply per protocol version: RESP2's flat array, RESP3's map.
_HELLO_REPLIES = {protocol: resp3.hello_reply(protocol) for protocol in resp3.PROTOCOLS}

_KEY = commands.KEY
_MULTI = commands.MULTI
_MSET = commands.MSET
_EVAL = commands.EVAL
_PING = commands.PING
_ECHO = commands.ECHO
_QUIT = commands.QUIT
_AUTH = commands.AUTH
_HELLO = commands.HELLO
_UNSUPPORTED = commands.UNSUPPORTED
_TRANSACTION = commands.TRANSACTION
_WRITE = commands.WRITE


def _protocol_error(message: bytes, requests: list) -> ProtocolError:
    return ProtocolError(b"-ERR Protocol error: " + message + b"\r\n", requests)


def _too_large(max_bytes: int, requests: list) -> ProtocolError:
    return _protocol_error(b"request larger than %d bytes" % max_bytes, requests)


def _printable(name: bytes) -> bytes:
    """A client-supplied name made safe to quote in a one-line error reply."""
    return name[:128].replace(b"\r", b" ").replace(b"\n", b" ")


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def multibulk(args) -> bytes:
    """The multibulk request frame for C{args} (a sequence of bytes)."""
    return b"*%d\r\n" % len(args) + b"".join([b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in args])


_ESCAPES = {ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t", ord("b"): b"\b", ord("a"): b"\a"}
_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
_SPACES = frozenset(b" \n\r\t\0")


def _strip_args(frame: bytes, indices, prefix: bytes):
    """
    C{frame} (a multibulk request) with C{prefix} cut from the front of the
    arguments at C{indices} that start with it, and its first three
    arguments (EVAL's numkeys is the third).
    Only the bulk headers are walked: values are sliced, never parsed.  A
    C{prefix} of None strips nothing.
    """
    cut = len(prefix) if prefix is not None else 0
    last_index = max(indices) if indices else None
    nl = frame.find(b"\r\n")
    count = int(frame[1:nl])
    pos = nl + 2
    out = []
    args = []
    kept = 0  # frame[kept:pos] is copied as is
    for index in range(count):
        nl = frame.find(b"\r\n", pos)
        start = nl + 2
        end = start + int(frame[pos + 1 : nl])
        if index < 3:
            args.append(frame[start:end])
        if prefix is not None and index in indices and frame.startswith(prefix, start, end):
            out.append(frame[kept:pos])
            out.append(b"$%d\r\n" % (end - start - cut))
            kept = start + cut
        pos = end + 2
        if last_index is not None and index >= last_index:
            break
    if not out:
        return frame, args
    out.append(frame[kept:])
    return b"".join(out), args


def split_quoted(line: bytes):
    """
    Split an inline command the way Redis does (its C{sdssplitargs}): words
    separated by blanks, C{"double quoted"} with C{\\n \\r \\t \\b \\a \\xHH} and
    C{\\"} escapes, C{'single quoted'} with C{\\'} only.  Return the list of
    arguments, or None when quotes are unbalanced or a closing quote is not
    followed by a blank.
    """
    args = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i] in _SPACES:
            i += 1
        if i == n:
            return args
        current = bytearray()
        quote = 0  # the open quote character, 0 outside quotes
        while True:
            if i == n:
                if quote:
                    return None
                break
            c = line[i]
            if quote == 34:  # '"'
                if (
                    c == 92
                    and i + 3 < n
                    and line[i + 1] == 120
                    and line[i + 2] in _HEX_DIGITS
                    and line[i + 3] in _HEX_DIGITS
                ):  # \xHH
                    current.append(int(line[i + 2 : i + 4], 16))
                    i += 3
                elif c == 92 and i + 1 < n:
                    i += 1
                    current += _ESCAPES.get(line[i], line[i : i + 1])
                elif c == 34:
                    if i + 1 < n and line[i + 1] not in _SPACES:
                        return None
                    quote = 0
                    i += 1
                    break
                else:
                    current.append(c)
            elif quote == 39:  # "'"
                if c == 92 and i + 1 < n and line[i + 1] == 39:
                    current.append(39)
                    i += 1
                elif c == 39:
                    if i + 1 < n and line[i + 1] not in _SPACES:
                        return None
                    quote = 0
                    i += 1
                    break
                else:
                    current.append(c)
            elif c in _SPACES:
                break
            elif c == 34 or c == 39:
                quote = c
            else:
                current.append(c)
            i += 1
        args.append(bytes(current))


@implementer(IRequestParser)
class RedisRequestParser:
    """
    Frames one client connection's requests.  Also holds the connection's
    state the proxy answers for itself: AUTH, and where it is in a transaction.

    Transactions (L{twistedproxy.protocols.redis_transactions}) make session
    requests while the client is inside one.  Where they are off
    (C{transaction_connections: 0}, a front), a client that sends MULTI and
    then commands still expects none of them to run unless EXEC succeeds.  So
    a refused MULTI leaves the connection refusing: every command up to EXEC
    or DISCARD gets an error and reaches no backend; EXEC answers EXECABORT
    (what Redis says when a queued command failed), DISCARD answers +OK.
    """

    def __init__(self, pool_config, codec):
        # `codec` frames the requests of the last batch fed from its first one
        # on; a HELLO that changes the protocol is a switching request and
        # the next batch starts with the new codec (_speaking).
        self.codec = self._speaking = codec
        self._codecs = {2: codec, 3: resp3.resp3_of(codec)}
        self._max_request_bytes = pool_config.max_request_bytes
        self._commands = commands.CLUSTER_COMMANDS if getattr(pool_config, "redis_cluster", False) else commands.COMMANDS
        password = pool_config.redis_auth
        self._password = password.encode("utf-8") if password else None
        # The user names AUTH accepts with it: default, and the pool's backend ACL user.
        user = getattr(pool_config, "redis_auth_user", None)
        self._password_users = (b"default", user.encode("utf-8")) if user else (b"default",)
        self._locked = self._password is not None  # until a successful AUTH
        self._noauth = self._hello_noauth = _NOAUTH
        # A front whose tenants are chosen by AUTH user (use_users): the users, and
        # this connection's user and tenant once it logged in.
        self._users = None
        self.user = None
        self.tenant = None
        self.read_only = False  # logged in as a read-only user: writes get NOPERM
        # The connection's LoginGuard (core/logins.py), set by the ProxyFactory: failed
        # logins are counted per client address, and refused unchecked past the limit.
        self.login_guard = None
        self._closed = False  # after QUIT: ignore whatever follows
        self._refusing = False  # after a refused MULTI, until EXEC or DISCARD
        # Transactions pin a client to a connection of its own (redis_transactions):
        # whether this pool has them, and where this client is (WATCHING, IN_MULTI, or 0).
        self._transactions = pool_config.transaction_connections > 0 and not pool_config.is_front
        self._txn = 0
        # Bytes not parsed yet: the first starts at a frame boundary, or inside a
        # frame at an argument boundary when _partial is set.
        self._chunks = []
        self._size = 0
        self._need = 0  # _size must reach this before a new scan can progress
        # A multibulk frame cut short: (nargs, next arg index, kept args, entry,
        # how many args to keep, list of the frame's bytes already scanned, their length)
        self._partial = None

    def feed(self, data: bytes) -> list:
        if self._closed:
            return []
        self.codec = self._speaking
        if self._chunks:
            self._chunks.append(data)
            self._size += len(data)
            if self._size < self._need:
                return []
            buf = b"".join(self._chunks)
        else:
            buf = data
        out = []
        try:
            pos = self._parse(buf, out)
        except ProtocolError:
            self._chunks = []
            self._size = self._need = 0
            self._partial = None
            self._closed = True
            raise
        if self._closed:
            self._chunks = []
            self._size = self._need = 0
        elif pos < len(buf) or self._partial is not None:
            self._chunks = [buf[pos:]] if pos else [buf]
            self._size = len(buf) - pos
        else:
            self._chunks = []
            self._size = self._need = 0
        return out

    # The connection's own state that a hand-off to another worker carries
    # (attribute names; the values are JSON-safe): AUTH done, inside a refused MULTI,
    # inside a transaction (whose connection stays behind: the new worker aborts it).
    _CARRIED = ("_locked", "_refusing", "_txn")

    def use_users(self, users, locked: bool = True) -> None:
        """
        AUTH names users of C{users} (a L{twistedproxy.routes.tenants.UserDirectory}),
        as Redis 7 ACL users: nothing but AUTH, HELLO and QUIT before a login
        (C{locked}: not logged in yet).
        """
        self._users = users
        self._locked = locked
        self._noauth = _NOAUTH_USERS
        self._hello_noauth = _HELLO_NOAUTH_USERS

    def state(self) -> dict:
        """This connection's state, for L{restore} in another worker."""
        state = {name: getattr(self, name) for name in self._CARRIED if hasattr(self, name)}
        state["protocol"] = self._speaking.protocol
        if self.user is not None:
            state["user"] = self.user.decode("latin-1")
        return state

    def restore(self, state: dict) -> None:
        """Go on from L{state} taken in another worker (unknown names are ignored)."""
        for name in self._CARRIED:
            if name in state:
                setattr(self, name, state[name])
        self.codec = self._speaking = self._codecs.get(state.get("protocol"), self._speaking)
        if self._users is not None:
            user = state.get("user")
            self._locked = not (user and self._users.resume(self, user.encode("latin-1")))
        elif self._password is None:
            self._locked = False  # the new configuration has no password

    def unparsed(self) -> bytes:
        """The bytes received and not framed yet, from the start of their frame."""
        scanned = self._partial[5] if self._partial is not None else None
        return b"".join((scanned or []) + self._chunks)

    def _parse(self, buf: bytes, out: list) -> int:
        """
        Append the complete requests in C{buf} to C{out}; return the offset of
        the first byte not consumed (and set C{_need}, C{_partial} for the rest).
        """
        pos = 0
        blen = len(buf)
        find = buf.find
        lookup = self._commands.get
        max_bytes = self._max_request_bytes
        key_kind = _KEY
        locked = self._locked or self._refusing or self._txn or self.read_only  # every command goes through _dispatch
        partial = self._partial
        self._partial = None
        while True:
            if partial is None:
                if pos >= blen:
                    return pos
                if buf[pos] != 42:  # not '*': an inline command
                    nl = find(b"\n", pos)
                    if nl < 0:
                        if blen - pos > INLINE_MAX_BYTES:
                            raise _protocol_error(b"too big inline request", out)
                        self._need = blen - pos + 1
                        return pos
                    if nl - pos > INLINE_MAX_BYTES:  # refused the same when it arrives whole
                        raise _protocol_error(b"too big inline request", out)
                    request = self._inline(buf[pos:nl], out)
                    pos = nl + 1
                    if request is not None:
                        out.append(request)
                        if request.close_after:
                            self._closed = True
                            return pos
                        locked = self._locked or self._refusing or self._txn or self.read_only
                    continue
                if pos + 4 <= blen and buf[pos + 2] == 13 and buf[pos + 3] == 10 and 49 <= buf[pos + 1] <= 57:
                    nargs = buf[pos + 1] - 48  # fast path: *N\r\n
                    p = pos + 4
                else:
                    nl = find(b"\r\n", pos + 1)
                    if nl < 0:
                        if blen - pos > INLINE_MAX_BYTES:
                            raise _protocol_error(b"too big mbulk count string", out)
                        self._need = blen - pos + 1
                        return pos
                    count = buf[pos + 1 : nl]
                    # Strict digits: a frame is forwarded as is and must not make the
                    # backend (shared by many clients) see a protocol error.  Over 10
                    # digits is past Redis's limit (and int() has one of its own).
                    if not count.isdigit() or (count[0] == 48 and nl - pos > 2) or nl - pos > 11:
                        if nl - pos >= INLINE_MAX_BYTES:  # as when it arrives in several reads
                            raise _protocol_error(b"too big mbulk count string", out)
                        if count[:1] == b"-" and count[1:].isdigit():
                            pos = nl + 2  # an empty multibulk: Redis skips it
                            continue
                        raise _protocol_error(b"invalid multibulk length", out)
                    nargs = int(count)
                    p = nl + 2
                    if nargs == 0:
                        pos = p
                        continue
                    if nargs > _MULTIBULK_MAX_ARGS:
                        raise _protocol_error(b"invalid multibulk length", out)
                start = pos
                i = 0
                args = []
                entry = None
                collect = 1
                scanned = None
                scanned_bytes = 0
            else:
                nargs, i, args, entry, collect, scanned, scanned_bytes = partial
                partial = None
                start = p = 0
            while i < nargs:
                # Fast path: a complete one or two digit length header ($N\r\n, $NN\r\n).
                if p + 5 <= blen and buf[p] == 36 and 48 <= buf[p + 1] <= 57:
                    digit = buf[p + 2]
                    if digit == 13 and buf[p + 3] == 10:
                        value_start = p + 4
                        end = value_start + buf[p + 1] - 48
                    elif 48 <= digit <= 57 and buf[p + 3] == 13 and buf[p + 4] == 10 and buf[p + 1] != 48:
                        value_start = p + 5
                        end = value_start + buf[p + 1] * 10 + digit - 528  # 528 = 48 * 11
                    else:
                        value_start = -1
                else:
                    value_start = -1
                if value_start < 0:
                    if p >= blen:
                        need = 1
                        break
                    if buf[p] != 36:  # '$'
                        raise _protocol_error(b"expected '$', got '%s'" % _printable(buf[p : p + 1]), out)
                    nl = find(b"\r\n", p + 1)
                    if nl < 0:
                        if blen - p > INLINE_MAX_BYTES:
                            raise _protocol_error(b"too big bulk count string", out)
                        need = blen - p + 1
                        break
                    length = buf[p + 1 : nl]
                    # Over 19 digits is past a long long, as Redis's string2ll sees it.
                    if not length.isdigit() or (length[0] == 48 and nl - p > 2) or nl - p > 20:
                        if nl - p >= INLINE_MAX_BYTES:  # as when it arrives in several reads
                            raise _protocol_error(b"too big bulk count string", out)
                        raise _protocol_error(b"invalid bulk length", out)
                    value_start = nl + 2
                    end = value_start + int(length)
                if end + 2 > blen:
                    need = end + 2 - p
                    break
                if buf[end] != 13 or buf[end + 1] != 10:
                    raise _protocol_error(b"expected CRLF after bulk data", out)
                if i < collect:
                    args.append(buf[value_start:end])
                    if i == 0:
                        name = args[0]
                        entry = lookup(name) or lookup(name.lower()) or commands.UNKNOWN
                        collect = entry[5]
                i += 1
                p = end + 2
            else:
                if scanned_bytes + p - start > max_bytes:
                    raise _too_large(max_bytes, out)
                if scanned is None:
                    frame = buf[start:p]
                else:
                    scanned.append(buf[start:p])
                    frame = b"".join(scanned)
                pos = p
                # The common case inline; everything else in _dispatch.
                if entry[1] == key_kind and entry[2] <= nargs <= entry[3] and not locked:
                    out.append(Request(frame, entry[0], args[entry[4]]))
                    continue
                request = self._dispatch(entry, args, nargs, frame)
                out.append(request)
                if request.close_after:
                    self._closed = True
                    return pos
                locked = self._locked or self._refusing or self._txn or self.read_only
                continue
            # Cut short inside the frame: keep what was scanned, wait for `need` bytes
            # (refused at once when the frame would outgrow the limit).
            if scanned_bytes + p - start + need > max_bytes:
                raise _too_large(max_bytes, out)
            if scanned is None:
                scanned = []
            if p > start:
                scanned.append(buf[start:p])
                scanned_bytes += p - start
            self._partial = (nargs, i, args, entry, collect, scanned, scanned_bytes)
            self._need = need
            return p

    def _inline(self, line: bytes, out: list):
        """The request for one inline command line, or None for a blank line."""
        if line[-1:] == b"\r":
            line = line[:-1]
        if b'"' in line or b"'" in line:
            args = split_quoted(line)
            if args is None:
                raise _protocol_error(b"unbalanced quotes in request", out)
        else:
            args = line.split()
        if not args:
            return None
        name = args[0]
        lookup = self._commands.get
        entry = lookup(name) or lookup(name.lower()) or commands.UNKNOWN
        return self._dispatch(entry, args, len(args), None)

    def _dispatch(self, entry, args, nargs, frame, plain=False):
        """
        The request for one complete command: C{args} holds at least the first
        C{entry}'s collect arguments, C{frame} is the raw frame (None for an
        inline command: built here if the command is forwarded).  Inside a
        transaction it is L{transactions.request}'s to make, which asks for the
        C{plain} request (the one outside a transaction) here.
        """
        name, kind, min_args, max_args, key_index = entry[:5]
        if self._refusing and kind != _QUIT:
            return self._refused(name)
        if (self._txn or kind == _TRANSACTION) and not plain:
            if self._txn or self._transactions:  # the transaction's own path (redis_transactions)
                return transactions.request(self, entry, args, nargs, frame if frame is not None else multibulk(args))
            kind = _UNSUPPORTED  # transactions off: refused as before
        if kind == _UNSUPPORTED:
            if name == b"multi" and nargs == 1:
                self._refusing = True
            return local(name, b"-ERR unsupported command '%s'\r\n" % _printable(args[0]))
        if not min_args <= nargs <= max_args:
            return local(name, b"-ERR wrong number of arguments for '%s' command\r\n" % name)
        if kind == _AUTH:
            return local(name, self._auth(args))
        if kind == _QUIT:
            return local(name, _OK, close_after=True)
        if kind == _HELLO:
            return self._hello(name, args)
        if self._locked:
            return local(name, self._noauth)
        if self.read_only and entry[_WRITE]:
            return local(name, _NOPERM_COMMAND % name)
        if kind == _PING:
            return local(name, _PONG if nargs == 1 else _bulk(args[1]))
        if kind == _ECHO:
            return local(name, _bulk(args[1]))
        if frame is None:
            frame = multibulk(args)
        if kind == _KEY:
            return Request(frame, name, args[key_index])
        if kind == _MULTI:
            if nargs == 2:
                return Request(frame, name, args[1])
            return Request(frame, name, route=ROUTE_KEYS, keys=args[1:])
        if kind == _MSET:
            if nargs % 2 == 0:
                return local(name, b"-ERR wrong number of arguments for '%s' command\r\n" % name)
            if nargs == 3:
                return Request(frame, name, args[1])
            return Request(frame, name, route=ROUTE_KEYS, keys=args[1::2], data=args[2::2])
        if kind == _EVAL:
            numkeys = args[2]
            if not numkeys.isdigit():
                if numkeys[:1] == b"-" and numkeys[1:].isdigit():
                    return local(name, _NEGATIVE_KEYS)
                return local(name, _NOT_AN_INTEGER)
            if len(numkeys) > 19:  # past a long long (int() would also refuse thousands of digits)
                return local(name, _NOT_AN_INTEGER)
            numkeys = int(numkeys)
            if numkeys > nargs - 3:
                return local(name, _TOO_MANY_KEYS)
            if numkeys == 0:
                return local(
                    name,
                    b"-ERR '%s' without keys is not supported: scripts are routed by their first key\r\n"
                    % name,
                )
            return Request(frame, name, args[3])
        return Request(frame, name, route=ROUTE_ANY)  # commands.ANY

    def _refused(self, name: bytes):
        """The answer to C{name} inside a refused transaction; EXEC and DISCARD end it."""
        if name == b"exec":
            self._refusing = False
            return local(name, _EXECABORT)
        if name == b"discard":
            self._refusing = False
            return local(name, _OK)
        return local(name, _IN_REFUSED_MULTI)

    def _hello(self, name, args):
        """
        C{HELLO [protover [AUTH user pass] [SETNAME name]]}: Redis's server
        map, in the protocol asked for (2 or 3, else NOPROTO) or, without a
        version, in the connection's own.  A change of protocol is a
        switching request: the requests after it speak the other codec
        (L{twistedproxy.protocols.resp3}).  A HELLO that fails changes nothing.
        """
        protocol = self._speaking.protocol
        if len(args) > 1:
            version = args[1]
            if not version.isdigit() or len(version) > 19:  # past a long long, as in Redis
                return local(name, _BAD_PROTOVER)
            protocol = int(version)
            if protocol not in self._codecs:
                return local(name, _NOPROTO)
        # The options in order, as Redis 7 reads them: each AUTH logs in there and then.
        at = 2
        while at < len(args):
            option = args[at].lower()
            more = len(args) - 1 - at
            if option == b"auth" and more >= 2:
                reply = self._auth([b"auth", args[at + 1], args[at + 2]])
                if reply != _OK:
                    return local(name, reply)
                at += 3
            elif option == b"setname" and more:
                at += 2  # the proxy's backend connections are shared: the name is not passed on
            else:
                return local(name, b"-ERR Syntax error in HELLO option '%s'\r\n" % _printable(args[at]))
        if self._locked:
            return local(name, self._hello_noauth)
        if protocol == self._speaking.protocol:
            return local(name, _HELLO_REPLIES[protocol])
        self._speaking = self._codecs[protocol]
        return switching(name, _HELLO_REPLIES[protocol], self._speaking)

    def _auth(self, args) -> bytes:
        """
        Check an AUTH C{[username] password} and (un)lock the connection (as
        twemproxy); from an address with too many failed logins, refuse it
        unchecked (L{twistedproxy.core.logins}).
        """
        if self._users is None and self._password is None:
            return _NO_PASSWORD
        guard = self.login_guard
        if guard is not None and guard.refused():
            return _TOO_MANY_FAILURES
        if len(args) == 2:
            username, password = b"default", args[1]
        else:
            username, password = args[1], args[2]
        if self._users is not None:
            reply = self._login(username, password)
        elif username in self._password_users and hmac.compare_digest(password, self._password):
            self._locked = False
            return _OK
        else:
            self._locked = True
            reply = _INVALID_PASSWORD
        if guard is not None and (reply is _WRONGPASS or reply is _INVALID_PASSWORD):
            guard.failed(username + b"\0" + password)
        return reply

    def _login(self, username: bytes, password: bytes) -> bytes:
        """AUTH against the front's users, as Redis 7 (a failed AUTH leaves the connection as it was)."""
        result, tenant = self._users.login(self, username, password)
        if result == "ok":
            self._locked = False
            return _OK
        if result == "full":
            return _TENANT_FULL % tenant.encode("utf-8")
        return _WRONGPASS


# Reply type bytes: one line; a length line then that many bytes; a count line
# then that many nested replies (maps: twice that many).  The RESP3 types are
# accepted too: an attribute's pairs are framed with the reply they precede
# (2N + 1 nested replies).  A push answers no request: on a shared connection
# it breaks the one-reply-per-request order, so it is a protocol error (the
# commands that ask for pushes are refused: see twistedproxy.protocols.resp3).
_LINE_TYPES = frozenset(b"+-:_,#(")
_BULK_TYPES = frozenset(b"$=!")
_AGGREGATE_TYPES = frozenset(b"*~")
_MAP = ord("%")
_ATTRIBUTE = ord("|")
_PUSH = ord(">")


@implementer(IReplyParser)
class RedisReplyParser:
    """Cuts one backend connection's byte stream into replies."""

    def __init__(self):
        self._buf = b""
        self._pos = 0  # where the unconsumed bytes of _buf start
        self._pending = []  # bytes received while a cut-short reply waits for _need
        self._pending_size = 0
        self._need = 0  # bytes needed from _pos on before scanning again
        # A reply cut short inside an array: the remaining element count of each
        # open array (outermost first), and the reply's bytes scanned so far.
        self._stack = None
        self._scanned = []
        self._scanned_size = 0

    def feed(self, data: bytes) -> None:
        if self._pos < len(self._buf) or self._pending or self._stack is not None:
            self._pending.append(data)
            self._pending_size += len(data)
        else:
            self._buf = data
            self._pos = 0

    def buffered(self) -> int:
        return len(self._buf) - self._pos + self._pending_size + self._scanned_size

    def next_reply(self, request=None):
        buf = self._buf
        pos = self._pos
        if self._pending:
            if len(buf) - pos + self._pending_size < self._need:
                return None
            self._pending.insert(0, buf[pos:])
            buf = self._buf = b"".join(self._pending)
            pos = self._pos = 0
            self._pending = []
            self._pending_size = 0
            self._need = 0
        blen = len(buf)
        if pos >= blen:
            return None
        if self._stack is None:
            # Fast path: a top-level status, error, integer or bulk reply.
            kind = buf[pos]
            if kind == 36 or kind == 43 or kind == 45 or kind == 58:  # $ + - :
                nl = buf.find(b"\r\n", pos + 1)
                if nl < 0:
                    self._need = blen - pos + 1
                    return None
                end = nl + 2
                if kind == 36:
                    try:
                        length = int(buf[pos + 1 : nl])
                    except ValueError:
                        raise ProtocolError(b"", message="bad bulk length from backend") from None
                    if length >= 0:
                        end += length + 2
                        if end > blen:
                            self._need = end - pos
                            return None
                        if buf[end - 2] != 13 or buf[end - 1] != 10:
                            raise ProtocolError(b"", message="missing CRLF after bulk from backend")
                    elif length != -1:
                        raise ProtocolError(b"", message="bad bulk length from backend")
                self._pos = end
                return buf[pos:end]
            stack = []
        else:
            stack = self._stack
            self._stack = None
        return self._scan(buf, pos, blen, stack)

    def _scan(self, buf, start, blen, stack):
        """The general case: nested arrays and RESP3 types, resumable anywhere."""
        find = buf.find
        p = start
        try:
            while True:
                if p >= blen:
                    need = 1
                    break
                kind = buf[p]
                nl = find(b"\r\n", p + 1)
                if nl < 0:
                    need = blen - p + 1
                    break
                if kind in _LINE_TYPES:
                    p = nl + 2
                elif kind in _BULK_TYPES:
                    length = int(buf[p + 1 : nl])
                    if length >= 0:
                        end = nl + 2 + length
                        if end + 2 > blen:
                            need = end + 2 - p
                            break
                        if buf[end] != 13 or buf[end + 1] != 10:
                            raise ProtocolError(b"", message="missing CRLF after bulk from backend")
                        p = end + 2
                    elif length == -1:
                        p = nl + 2
                    else:
                        raise ProtocolError(b"", message="bad bulk length from backend")
                elif kind in _AGGREGATE_TYPES or kind == _MAP or kind == _ATTRIBUTE:
                    count = int(buf[p + 1 : nl])
                    p = nl + 2
                    if kind == _ATTRIBUTE and count >= 0:
                        stack.append(count * 2 + 1)  # its pairs, then the reply it is about
                        continue
                    if count > 0:
                        stack.append(count * 2 if kind == _MAP else count)
                        continue
                    if count < -1 or kind == _ATTRIBUTE:
                        raise ProtocolError(b"", message="bad array length from backend")
                elif kind == _PUSH:
                    raise ProtocolError(b"", message="push reply from backend (pushes are not supported)")
                else:
                    raise ProtocolError(b"", message="unknown reply type %r from backend" % (bytes([kind]),))
                # One element complete: close the arrays it completes.
                while stack:
                    stack[-1] -= 1
                    if stack[-1]:
                        break
                    stack.pop()
                else:
                    self._pos = p
                    if self._scanned:
                        self._scanned.append(buf[start:p])
                        reply = b"".join(self._scanned)
                        self._scanned = []
                        self._scanned_size = 0
                        return reply
                    return buf[start:p]
        except ValueError:
            raise ProtocolError(b"", message="bad length from backend") from None
        # Cut short: keep the scanned part aside, wait for `need` more bytes.
        if p > start:
            self._scanned.append(buf[start:p])
            self._scanned_size += p - start
        self._stack = stack
        self._pos = p
        self._need = need
        return None


def _integer(reply: bytes):
    if reply[:1] != b":":
        return None
    try:
        return int(reply[1:-2])
    except ValueError:
        return None


def _array_items(reply: bytes):
    """The raw elements of an array reply, or None if C{reply} is not an array."""
    nl = reply.find(b"\r\n")
    if reply[:1] != b"*" or nl < 0:
        return None
    try:
        count = int(reply[1:nl])
    except ValueError:
        return None
    parser = RedisReplyParser()
    parser.feed(reply[nl + 2 :])
    items = []
    for _ in range(count):
        item = parser.next_reply()
        if item is None:
            return None
        items.append(item)
    return items


@implementer(ICodec, ISessionCodec)
class RedisCodec:
    """The Redis protocol: parsers, MGET/MSET/DEL/UNLINK/TOUCH/EXISTS split and merge."""

    name = "redis"
    protocol = 2  # what its backend connections speak (resp3.resp3_of: 3)

    def request_parser(self, pool_config) -> RedisRequestParser:
        return RedisRequestParser(pool_config, self)

    def reply_parser(self) -> RedisReplyParser:
        return RedisReplyParser()

    def split(self, request, groups: list, strips=None) -> list:
        if strips is None and len(groups) == 1 and len(groups[0]) == len(request.keys):
            return [request.frame]  # one group holds every key, in client order
        keys = request.keys
        values = request.data  # MSET's values, else None
        head = _bulk(request.command)
        frames = []
        for number, group in enumerate(groups):
            cut = strips[number] if strips is not None else 0
            args = [head]
            for i in group:
                args.append(_bulk(keys[i][cut:]))
                if values is not None:
                    args.append(_bulk(values[i]))
            frames.append(b"*%d\r\n" % (len(args)) + b"".join(args))
        return frames

    def part_data(self, request, keys: list):
        values = request.data
        if values is None:
            return None
        by_key = dict(zip(request.keys, values))  # a key given twice: its last value, as MSET keeps
        return [by_key[key] for key in keys]

    def strip_keys(self, request, prefix: bytes) -> None:
        cut = len(prefix)
        if request.keys is not None:  # MGET, DEL, MSET ... with several keys: one frame from the keys
            request.keys = [key[cut:] if key.startswith(prefix) else key for key in request.keys]
            request.frame = self.split(request, [range(len(request.keys))], [0])[0]
            return
        entry = commands.COMMANDS.get(request.command)
        kind = entry[commands.KIND] if entry is not None else _KEY
        if kind == _EVAL:
            _, args = _strip_args(request.frame, (2,), None)  # reads numkeys
            numkeys = int(args[2])
            indices = range(3, 3 + numkeys)
        elif kind == _KEY:
            indices = (entry[commands.KEY_INDEX],)
        else:  # MGET k, MSET k v ...: one key, the first argument
            indices = (1,)
        request.frame, _ = _strip_args(request.frame, indices, prefix)
        if request.key.startswith(prefix):
            request.key = request.key[cut:]

    def restore_keys(self, request, raw: bytes, prefix: bytes) -> bytes:
        return raw  # no reply of a forwarded command carries its key

    def denied_reply(self, request) -> bytes:
        return _NOPERM

    def merge(self, request, fragments: list) -> bytes:
        for fragment in fragments:
            if fragment.reply[:1] == b"-":
                return fragment.reply
        if len(fragments) == 1:
            return fragments[0].reply
        command = request.command
        if command == b"mget":
            values = [None] * len(request.keys)
            for fragment in fragments:
                items = _array_items(fragment.reply)
                indices = fragment.key_indices
                if items is None or len(items) != len(indices):
                    return _BAD_BACKEND_REPLY
                for index, item in zip(indices, items):
                    values[index] = item
            return b"*%d\r\n" % len(values) + b"".join(values)
        if command == b"mset":
            return _OK
        total = 0  # del, unlink, touch, exists: how many keys each server counted
        for fragment in fragments:
            count = _integer(fragment.reply)
            if count is None:
                return _BAD_BACKEND_REPLY
            total += count
        return b":%d\r\n" % total

    def join(self, request, replies: list) -> bytes:
        for reply in replies:
            if reply[:1] == b"-":
                return reply
        command = request.command
        if command == b"mget":
            bodies = []
            for reply in replies:
                nl = reply.find(b"\r\n")
                if reply[:1] != b"*" or nl < 0:
                    return _BAD_BACKEND_REPLY
                bodies.append(reply[nl + 2 :])
            return b"*%d\r\n" % len(request.keys) + b"".join(bodies)
        if command == b"mset":
            return _OK
        total = 0
        for reply in replies:
            count = _integer(reply)
            if count is None:
                return _BAD_BACKEND_REPLY
            total += count
        return b":%d\r\n" % total

    def filter_reply(self, request, raw: bytes) -> bytes:
        return raw

    def error_reply(self, request, message) -> bytes:
        if not isinstance(message, bytes):
            message = message.encode("utf-8", "replace")
        return b"-ERR " + message.replace(b"\r", b" ").replace(b"\n", b" ") + b"\r\n"

    def session_reply(self, request) -> bytes:
        return transactions.session_reply(request)

    def classify_reply(self, request, raw: bytes) -> int:
        if raw[:1] != b"-":
            return REPLY_FINAL
        if raw.startswith(b"-MOVED ") or raw.startswith(b"-ASK "):
            return REPLY_REDIRECT
        if raw.startswith(b"-TRYAGAIN") or raw.startswith(b"-CLUSTERDOWN"):  # a slot moving; a cluster failing over
            return REPLY_RETRY
        return REPLY_FINAL

    def reply_failed(self, raw: bytes) -> bool:
        return raw[:1] == b"-"

    def handshake(self, pool_config) -> list:
        requests = []
        if pool_config.redis_auth:
            password = pool_config.redis_auth.encode("utf-8")
            user = getattr(pool_config, "redis_auth_user", None)  # a Redis ACL user
            login = (b"AUTH", user.encode("utf-8"), password) if user else (b"AUTH", password)
            requests.append(Request(multibulk(login), b"auth"))
        if pool_config.redis_db:
            requests.append(Request(multibulk((b"SELECT", b"%d" % pool_config.redis_db)), b"select"))
        return requests

    def handshake_error(self, raw: bytes):
        if raw[:1] == b"-":
            return raw[1:].rstrip(b"\r\n").decode("utf-8", "replace")
        return None

    def probe_request(self):
        return Request(multibulk((b"PING",)), b"ping")

    def warmup_samples(self, pool_config) -> list:
        if not pool_config.redis_auth:
            return [(_WARMUP_READS, _warmup_answer)]
        # Clients of a pool with a password AUTH first (the proxy answers it).
        auth = multibulk((b"AUTH", pool_config.redis_auth.encode("utf-8")))
        return [([auth + _WARMUP_READS[0]] + _WARMUP_READS[1:], _warmup_answer)]


# Warm-up traffic (ICodec.warmup_samples): the common commands one at a time,
# pipelined, and split over servers.
_WARMUP_VALUE = b"v" * 32
_WARMUP_READS = [
    multibulk((b"GET", WARMUP_KEYS[0])),
    multibulk((b"SET", WARMUP_KEYS[1], _WARMUP_VALUE)),
    b"".join([multibulk((b"GET", key)) for key in WARMUP_KEYS[:8]]
             + [multibulk((b"SET", key, _WARMUP_VALUE)) for key in WARMUP_KEYS[:8]]),
    multibulk([b"MGET"] + WARMUP_KEYS),
    multibulk((b"DEL", WARMUP_KEYS[2], WARMUP_KEYS[3])),
    multibulk((b"INCR", WARMUP_KEYS[4])),
    multibulk((b"EXPIRE", WARMUP_KEYS[5], b"60")),
]
_WARMUP_KEY_COUNTS = frozenset((b"DEL", b"UNLINK", b"EXISTS", b"TOUCH"))  # answered with how many keys


def _warmup_answer(frame: bytes) -> bytes:
    """What a Redis server answers to a forwarded warm-up frame (a multibulk)."""
    nl = frame.find(b"\r\n")
    args = int(frame[1:nl])
    size_end = frame.find(b"\r\n", nl + 2)
    start = size_end + 2
    name = frame[start : start + int(frame[nl + 3 : size_end])].upper()
    if name == b"GET":
        return _bulk(_WARMUP_VALUE)
    if name == b"MGET":
        return b"*%d\r\n" % (args - 1) + _bulk(_WARMUP_VALUE) * (args - 1)
    if name in _WARMUP_KEY_COUNTS:
        return b":%d\r\n" % (args - 1)
    if name in (b"INCR", b"EXPIRE"):
        return b":1\r\n"
    if name == b"PING":
        return _PONG
    return _OK


codec = RedisCodec()
