"""
Redis transactions as a client's parser sees them: MULTI, EXEC, DISCARD,
WATCH, UNWATCH, and the commands between them.

The parser keeps where its client is (C{parser._txn}: 0, L{WATCHING} or
L{IN_MULTI}) and, while it is in a transaction, turns every request into a
ROUTE_SESSION request (L{twistedproxy.core.request}) whose data names what it
is for the transaction (a SESSION_* operation); the route's sessions
(L{twistedproxy.routes.sessions}) pin the client to a backend connection of its
own and send them there.  Redis's own rules are followed here, as Redis 7
applies them:

  - MULTI inside MULTI answers C{-ERR MULTI calls can not be nested}, WATCH
    inside MULTI C{-ERR WATCH inside MULTI is not allowed}; EXEC and DISCARD
    outside MULTI C{-ERR EXEC without MULTI} / C{-ERR DISCARD without MULTI};
    UNWATCH outside a transaction C{+OK}.  None of these changes the transaction.
  - A command between MULTI and EXEC that the proxy refuses itself (an
    unsupported command, a wrong number of arguments) gets its error and
    aborts the transaction: EXEC answers EXECABORT, as Redis does when a
    command could not be queued.
  - PING and ECHO between MULTI and EXEC are queued on the backend like any
    command (their replies are part of EXEC's); elsewhere the proxy answers
    them itself.  AUTH, HELLO and QUIT are the proxy's as always.
"""

from __future__ import annotations

from twistedproxy.core.request import (
    ROUTE_ANY,
    ROUTE_LOCAL,
    ROUTE_SESSION,
    SESSION_DISCARD,
    SESSION_EXEC,
    SESSION_MULTI,
    SESSION_MULTI_WATCHED,
    SESSION_QUEUED,
    SESSION_REFUSED,
    SESSION_UNWATCH,
    SESSION_WATCH,
    SESSION_WATCHING,
    Request,
    local,
)
from twistedproxy.protocols import redis_commands as commands

WATCHING = 1  # after WATCH, before MULTI
IN_MULTI = 2  # after MULTI, before EXEC or DISCARD

_OK = b"+OK\r\n"
_QUEUED = b"+QUEUED\r\n"
_EXECABORT = b"-EXECABORT Transaction discarded because of previous errors.\r\n"
_NESTED = b"-ERR MULTI calls can not be nested\r\n"
_WATCH_IN_MULTI = b"-ERR WATCH inside MULTI is not allowed\r\n"
_EXEC_WITHOUT = b"-ERR EXEC without MULTI\r\n"
_DISCARD_WITHOUT = b"-ERR DISCARD without MULTI\r\n"

_TRANSACTION = commands.TRANSACTION
_PING = commands.PING
_ECHO = commands.ECHO

# What the proxy answers itself to a session request it does not send (ISessionCodec.session_reply).
_SESSION_REPLIES = {
    SESSION_WATCH: _OK,
    SESSION_MULTI: _OK,
    SESSION_MULTI_WATCHED: _OK,
    SESSION_QUEUED: _QUEUED,
    SESSION_WATCHING: _OK,
    SESSION_EXEC: _EXECABORT,
    SESSION_DISCARD: _OK,
    SESSION_UNWATCH: _OK,
}


def session_reply(request) -> bytes:
    """See L{twistedproxy.protocols.interface.ISessionCodec.session_reply}."""
    return _SESSION_REPLIES[request.data[0]]


def _session(request, op: int):
    """C{request} made part of its client's session as C{op} (its route and data kept)."""
    request.data = (op, request.route, request.data)
    request.route = ROUTE_SESSION
    return request


def request(parser, entry, args, nargs: int, frame: bytes):
    """
    The request for one command of a client in a transaction, or of a
    transaction command (C{frame}: its multibulk frame); see the module.
    """
    name, kind, min_args, max_args = entry[:4]
    state = parser._txn
    if kind == _TRANSACTION:
        if parser._locked:
            request = local(name, parser._noauth)
        elif not min_args <= nargs <= max_args:
            request = local(name, b"-ERR wrong number of arguments for '%s' command\r\n" % name)
        else:
            return _control(parser, state, name, args, frame)
    elif state == IN_MULTI and (kind == _PING or kind == _ECHO) and not parser._locked:
        request = Request(frame, name, route=ROUTE_ANY)  # queued: answered in EXEC's reply
    else:
        request = parser._dispatch(entry, args, nargs, frame, True)
    if request.route != ROUTE_LOCAL:
        return _session(request, SESSION_QUEUED if state == IN_MULTI else SESSION_WATCHING)
    if state == IN_MULTI and request.reply[:1] == b"-" and not request.close_after:
        refused = Request(b"", name, route=ROUTE_SESSION, reply=request.reply)
        refused.data = (SESSION_REFUSED, ROUTE_LOCAL, None)
        return refused
    return request


def _control(parser, state: int, name: bytes, args, frame: bytes):
    """MULTI, EXEC, DISCARD, WATCH or UNWATCH with the right number of arguments."""
    if name == b"watch":
        if state == IN_MULTI:
            return local(name, _WATCH_IN_MULTI)
        parser._txn = WATCHING
        return _session(Request(frame, name, keys=args[1:]), SESSION_WATCH)
    if name == b"multi":
        if state == IN_MULTI:
            return local(name, _NESTED)
        parser._txn = IN_MULTI
        return _session(Request(frame, name, route=ROUTE_ANY), SESSION_MULTI_WATCHED if state else SESSION_MULTI)
    if name == b"unwatch":
        if state == IN_MULTI:
            return _session(Request(frame, name, route=ROUTE_ANY), SESSION_QUEUED)
        if not state:
            return local(name, _OK)
        parser._txn = 0
        return _session(Request(frame, name, route=ROUTE_ANY), SESSION_UNWATCH)
    if state != IN_MULTI:
        return local(name, _EXEC_WITHOUT if name == b"exec" else _DISCARD_WITHOUT)
    parser._txn = 0
    return _session(Request(frame, name, route=ROUTE_ANY), SESSION_EXEC if name == b"exec" else SESSION_DISCARD)
