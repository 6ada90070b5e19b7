"""
memcached client logins, as memcached itself asks for them: SASL PLAIN on the
binary protocol (C{memcached -S}) and the text protocol's login (C{memcached
-Y}), against the users of a pool (C{users:}) or of a front whose tenants are
chosen by user.

A client's L{twistedproxy.protocols.memcache.SniffingRequestParser} holds the
connection's login (L{Login}: its user, its tenant, whether it is still
locked) and, once it has seen the first byte, hands the bytes to one of the
parsers here instead of the plain ones:

  - L{TextLoginParser}: before a login every command line gets C{CLIENT_ERROR
    unauthenticated} (the connection stays open) except C{set <any key> <flags>
    <exptime> <bytes>}, whose data block is C{user password}: answered
    C{STORED}, or C{CLIENT_ERROR authentication failure} (C{noreply} is
    ignored, as memcached ignores it there).  After it the plain text parser
    frames everything, and a C{set} is a C{set} again.
  - L{BinaryLoginParser}: SASL list mechanisms (0x20) answers C{PLAIN}, SASL
    auth (0x21) with C{PLAIN} and C{authzid NUL user NUL password} answers
    status 0 C{Authenticated} or status 0x20 C{Auth failure.}, SASL step
    (0x22) always fails.  Before a login every other opcode but version gets
    status 0x20 C{Auth failure.} and the connection closes, as memcached does;
    a failed login after a successful one logs the connection out.

Failed logins go through the connection's C{login_guard} (the failed-login
limiter of L{twistedproxy.core.logins}): a blocked address's logins are
refused without being checked.  Nothing here runs once the client is logged in
but one test per binary request (the text parser is handed the bytes whole).
"""

from __future__ import annotations

from zope.interface import implementer

from twistedproxy.core.logins import TOO_MANY_FAILURES_TEXT
from twistedproxy.core.request import ProtocolError, local
from twistedproxy.protocols.interface import IRequestParser
from twistedproxy.protocols.memcache_binary import (
    SASL_AUTH,
    SASL_LIST_MECHS,
    SASL_STEP,
    STATUS_AUTH_ERROR,
    STATUS_INVALID_ARGUMENTS,
    VERSION_OPCODE,
    BinaryRequestParser,
    response,
)
from twistedproxy.protocols.memcache_text import MAX_LINE_LENGTH, StreamBuffer, client_error

# What a login comes to (the users' directory answers the first three).
LOGIN_OK = "ok"
LOGIN_WRONGPASS = "wrongpass"
LOGIN_FULL = "full"  # the user's tenant has max_client_connections connections already
LOGIN_BLOCKED = "blocked"  # the client's address failed too often: not checked

# memcached -Y's words.
_STORED = b"STORED\r\n"
_UNAUTHENTICATED = client_error(b"unauthenticated")
_AUTH_FAILURE = client_error(b"authentication failure")
_BAD_TOKEN_FORMAT = client_error(b"bad authentication token format")
_BAD_TERMINATION = client_error(b"bad command line termination")
_BLOCKED_TEXT = client_error(TOO_MANY_FAILURES_TEXT.encode("ascii"))
_FULL_TEXT = b"max number of clients reached for tenant '%s'"

# memcached -S's words.
MECHANISMS = b"PLAIN"
_AUTHENTICATED = b"Authenticated"
_AUTH_FAILED = b"Auth failure."


class Login:
    """
    One client connection's login.  C{users} is the directory its logins are
    checked against (L{twistedproxy.routes.tenants.UserDirectory}: its
    C{login(self, user, password)} sets C{user} and C{tenant} here); C{login_guard}
    the failed-login limiter's view of the connection (None: no limit).
    """

    users = None
    user = None  # the name it logged in as (bytes)
    tenant = None  # its user's tenant, on a front whose tenants are chosen by user
    login_guard = None
    locked = False  # True until a login succeeds

    def use_users(self, users, locked: bool = True) -> None:
        """Logins are checked against C{users} (None: no login needed); C{locked}: not logged in yet."""
        self.users = users
        self.locked = locked and users is not None

    def log_in(self, user: bytes, password: bytes):
        """Check C{user}'s C{password}: one of the C{LOGIN_*} outcomes, and the tenant's name for L{LOGIN_FULL}."""
        guard = self.login_guard
        if guard is not None and guard.refused():
            return LOGIN_BLOCKED, None
        result, tenant = self.users.login(self, user, password)
        if result == LOGIN_OK:
            self.locked = False
        elif result == LOGIN_WRONGPASS and guard is not None:
            guard.failed(user + b"\0" + password)
        return result, tenant

    def failed(self, attempt: bytes) -> None:
        """A login that names no user and password (a malformed one, C{attempt}): counted as a failure."""
        guard = self.login_guard
        if guard is not None:
            guard.failed(attempt)

    def log_out(self) -> None:
        """A failed login after a successful one (binary, as memcached): locked again."""
        if self.users is not None:
            self.users.logout(self)
        self.user = None
        self.locked = True

    def login_state(self) -> dict:
        """The login for a hand-off to another worker (JSON-safe)."""
        return {} if self.user is None else {"user": self.user.decode("latin-1")}

    def restore_login(self, state: dict) -> None:
        """Go on from L{login_state} taken in another worker."""
        if self.users is None:
            return
        user = state.get("user")
        self.locked = not (user and self.users.resume(self, user.encode("latin-1")))


@implementer(IRequestParser)
class TextLoginParser(StreamBuffer):
    """
    A text client of a pool that asks for a login: L{Login}'s gate in front of
    the plain text parser (C{text}), as memcached -Y.
    """

    __slots__ = ("codec", "login", "text", "_pool_config", "_max_request")

    def __init__(self, codec, pool_config, login: Login):
        StreamBuffer.__init__(self)
        self.codec = codec
        self.login = login
        self.text = codec.request_parser(pool_config)
        self._pool_config = pool_config
        self._max_request = pool_config.max_request_bytes

    def feed(self, data: bytes) -> list:
        if not self.login.locked:
            return self.text.feed(data)
        rest = self.text.unparsed()
        if rest:  # logged out meanwhile (a reload removed the user): its half a command is ours now
            self.text = self.codec.request_parser(self._pool_config)
            data = rest + data
        buf = self._gather(data)
        if buf is None:
            return []
        requests = []
        end = len(buf)
        pos = 0
        while pos < end:
            eol = buf.find(b"\n", pos)
            if eol < 0:
                if end - pos > MAX_LINE_LENGTH:
                    raise ProtocolError(client_error(b"line too long"), requests)
                self._keep(buf, pos, end - pos + 1)
                return requests
            after = eol + 1
            tokens = buf[pos:eol].split()
            if len(tokens) < 5 or tokens[0] != b"set" or not tokens[4].isdigit():
                requests.append(local(b"unauthenticated", _UNAUTHENTICATED))
                pos = after
                continue
            length = int(tokens[4]) if len(tokens[4]) <= 19 else self._max_request + 1
            if length > self._max_request:
                raise ProtocolError(b"SERVER_ERROR object too large for cache\r\n", requests)
            block_end = after + length + 2
            if block_end > end:
                self._keep(buf, pos, block_end - pos)
                return requests
            requests.append(local(b"login", self._log_in(buf[after:block_end])))
            pos = block_end
            if not self.login.locked:
                if pos < end:
                    try:
                        requests.extend(self.text.feed(buf[pos:]))
                    except ProtocolError as e:
                        e.requests[:0] = requests  # the login's reply goes out before the error
                        raise
                break
        return requests

    def _log_in(self, block: bytes) -> bytes:
        """The reply to a login whose data block (its CRLF included) is C{block}."""
        if block[-2:] != b"\r\n":
            self.login.failed(block)
            return _BAD_TERMINATION
        credentials = block[:-2].split()
        if len(credentials) < 2:
            self.login.failed(block)
            return _BAD_TOKEN_FORMAT
        result, tenant = self.login.log_in(credentials[0], credentials[1])
        if result == LOGIN_OK:
            return _STORED
        if result == LOGIN_BLOCKED:
            return _BLOCKED_TEXT
        if result == LOGIN_FULL:
            return client_error(_FULL_TEXT % tenant.encode("utf-8"))
        return _AUTH_FAILURE

    def state(self) -> dict:
        return self.text.state()

    def restore(self, state: dict) -> None:
        self.text.restore(state)

    def unparsed(self) -> bytes:
        return b"".join(self._chunks) + self.text.unparsed()


@implementer(IRequestParser)
class BinaryLoginParser(BinaryRequestParser):
    """A binary client of a pool that asks for a login: SASL PLAIN, as memcached -S."""

    __slots__ = ("login",)

    def __init__(self, codec, pool_config, login: Login):
        BinaryRequestParser.__init__(self, codec, pool_config)
        self.login = login

    def _request(self, frame, opcode, keylen, extlen, bodylen):
        if SASL_LIST_MECHS <= opcode <= SASL_STEP:
            return self._sasl(frame, opcode, keylen, extlen, bodylen)
        if self.login.locked and opcode != VERSION_OPCODE:
            self._closed = True  # memcached closes the connection after it
            return local(b"unauthenticated", response(opcode, frame[12:16], STATUS_AUTH_ERROR, value=_AUTH_FAILED),
                         close_after=True)
        return BinaryRequestParser._request(self, frame, opcode, keylen, extlen, bodylen)

    def _sasl(self, frame, opcode, keylen, extlen, bodylen):
        opaque = frame[12:16]
        if opcode == SASL_LIST_MECHS:
            if keylen or extlen or bodylen:
                return local(b"sasl_list_mechs", response(opcode, opaque, STATUS_INVALID_ARGUMENTS,
                                                          value=b"Invalid arguments"))
            return local(b"sasl_list_mechs", response(opcode, opaque, value=MECHANISMS))
        if extlen or not keylen or keylen > bodylen:
            return local(b"sasl_auth", response(opcode, opaque, STATUS_INVALID_ARGUMENTS, value=b"Invalid arguments"))
        name = b"sasl_auth" if opcode == SASL_AUTH else b"sasl_step"
        if opcode == SASL_STEP or frame[24 : 24 + keylen] != MECHANISMS:
            return local(name, response(opcode, opaque, STATUS_AUTH_ERROR, value=_AUTH_FAILED))
        status, text = self._log_in(frame[24 + keylen :])
        return local(name, response(opcode, opaque, status, value=text))

    def _log_in(self, message: bytes):
        """SASL PLAIN's C{authzid NUL authcid NUL password}: the status and text of the reply."""
        login = self.login
        parts = message.split(b"\0")
        if len(parts) != 3 or (parts[0] and parts[0] != parts[1]):
            login.failed(message)
            result = LOGIN_WRONGPASS
        else:
            result, tenant = login.log_in(parts[1], parts[2])
        if result == LOGIN_OK:
            return 0, _AUTHENTICATED
        if not login.locked:
            login.log_out()
        if result == LOGIN_BLOCKED:
            return STATUS_AUTH_ERROR, TOO_MANY_FAILURES_TEXT.encode("ascii")
        if result == LOGIN_FULL:
            return STATUS_AUTH_ERROR, _FULL_TEXT % tenant.encode("utf-8")
        return STATUS_AUTH_ERROR, _AUTH_FAILED
