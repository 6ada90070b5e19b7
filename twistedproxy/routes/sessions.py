"""
Sessions: a client pinned to one backend connection of its own, from a
transaction's first WATCH or MULTI to its EXEC, DISCARD or UNWATCH (Redis
transactions; the parser's side is L{twistedproxy.protocols.redis_transactions}).

A route that serves sessions (L{ISessionRoute}: the hash route, and a cluster
route the same way) holds one L{Sessions} and hands it every ROUTE_SESSION
request (L{twistedproxy.core.request}); nothing else pays for them.  The route
says where a key goes with C{session_group(key)}: C{(group, server)}, where the
group is what every key of one transaction must share (a server for the hash
route, a slot for a cluster) and the server (L{twistedproxy.core.servers.Server})
is where the pinned connection goes.  So:

  - The first keyed request of a session (WATCH's keys, or the first command
    after MULTI with a key) picks the group; the client then gets a connection
    of its own to its server (C{Server.pin}, at most C{transaction_connections}
    per server; past it the request gets an error).  MULTI and keyless
    commands before it are answered by the proxy (+OK, +QUEUED) and sent
    first, once the connection is there; an EXEC with no keyed command before
    it goes to any server.
  - A command whose keys are in another group (or span groups) is refused:
    between MULTI and EXEC it gets the route's error (C{session_conflict}) and
    the transaction is aborted: later commands are answered +QUEUED and never
    sent, EXEC answers EXECABORT and the pinned connection is closed, which
    makes Redis drop what was queued on it.  Nothing is applied.  Between WATCH
    and MULTI such a command is simply routed as usual (it runs at once either
    way); a WATCH of keys elsewhere (or past the limit) is refused and aborts
    the transaction to come (a watch that does not hold must not let EXEC
    succeed), unless it was the first: a WATCH then starts afresh.
  - Replies keep request order (the client's order queue does it); a backend
    failure or timeout on the pinned connection fails exactly the requests it
    affects, the connection is closed (never handed to another client) and the
    rest of the transaction is aborted.
  - When the session ends cleanly (EXEC, DISCARD or UNWATCH answered) the
    connection goes back to its server for the next transaction; when the
    client leaves in the middle, or the session ended aborted, it is closed
    (once what is in flight on it is answered), so no WATCH or MULTI state
    reaches another client.
  - A session request with no session (the client's session began in another
    worker or before a reload moved the client to a new pool) is treated as a
    session whose connection was lost: EXEC answers EXECABORT.  A WATCH in a
    lost session starts afresh once the client was told (a request got the
    error; else this WATCH gets it, and the next starts afresh).
"""

from __future__ import annotations

from zope.interface import Attribute, Interface

from twistedproxy.core.completion import REFUSED, fail, refuse
from twistedproxy.core.request import (
    SESSION_EXEC,
    SESSION_MULTI,
    SESSION_MULTI_WATCHED,
    SESSION_QUEUED,
    SESSION_REFUSED,
    SESSION_WATCH,
    SESSION_WATCHING,
    Request,
)

LIMIT = "transaction_connections limit reached on the transaction's server"
LOST = "transaction aborted: its server connection was lost"
REFUSED_INSIDE = "refused inside a transaction"


class ISessionRoute(Interface):
    """What L{Sessions} asks of the route that holds it."""

    sessions = Attribute("Its L{Sessions}; the route hands it ROUTE_SESSION requests and closing clients.")
    name = Attribute("A name for error texts and logs (the pool's name).")

    def dispatch(request, codec, now: float, touched: list, dirty: list) -> bool:
        """The route's own dispatch (L{twistedproxy.routes.interface.IRoute}), for requests outside the session."""

    def session_group(key):
        """
        C{(group, server)} for C{key}: what all keys of a transaction must share
        (a hashable) and the Server whose connection it is pinned to; for None,
        those of any server; C{(None, None)} when no server can take it.
        """

    def session_room() -> bool:
        """Whether some server could pin a connection now (MULTI checks it before any key is known)."""

    def session_conflict(request, codec) -> bytes:
        """The error reply for C{request}, whose keys are in another group than its session's, or span groups."""


_SPANS = object()  # a request's keys are in several groups


class Session:
    """One client's transaction: its group, server and pinned connection, and how far it got."""

    __slots__ = ("group", "server", "conn", "waiting", "inflight", "aborted", "lost", "told", "ended", "replied")

    def __init__(self):
        self.group = None
        self.server = None
        self.conn = None
        self.waiting = None  # (frame, command) answered by the proxy, sent once pinned: MULTI, keyless commands
        self.inflight = 0  # requests of the session on its connection, not answered yet
        self.aborted = False  # EXEC must answer EXECABORT
        self.lost = False  # the connection (or the watch) is gone: nothing more is sent
        self.told = False  # a request of the client got an error for the loss
        self.ended = False  # left its client: give the connection back once nothing is in flight
        self.replied = self._replied  # the resume hook of every request sent on the connection

    def _replied(self, request, raw, error, codec, dirty) -> bool:
        self.inflight -= 1
        if error is not None and not self.lost:
            # What the backend holds for the client is unknown now: never reuse it.
            self.lost = self.aborted = self.told = True  # this request gets the error
            self.conn.close()
        if self.ended and not self.inflight:
            self.server.unpin(self.conn, not (self.lost or self.aborted))
        return False  # the reply or the error stands

    def end(self) -> None:
        """
        The client is done with it: the connection goes back once nothing is in
        flight, or is closed (at once when it was lost or the client left).
        """
        self.ended = True
        if self.conn is not None and (not self.inflight or self.lost):
            self.server.unpin(self.conn, not (self.lost or self.aborted))


class Sessions:
    """The sessions of one route's clients (see the module)."""

    def __init__(self, route):
        self.route = route
        self.by_client = {}

    def dispatch(self, request, codec, now: float, touched: list, dirty: list) -> bool:
        """Send or answer the ROUTE_SESSION C{request}; True as the route's dispatch says (slices)."""
        op, route, data = request.data
        client = request.client
        session = self.by_client.get(client)
        if op == SESSION_WATCHING:
            if session is not None and session.conn is not None and not session.lost:
                placed = self._place(request)
                if placed is not None and placed is not _SPANS and placed[0] == session.group:
                    self._send(session, request, codec, now, touched, dirty)
                    return False
            request.route = route  # runs at once, wherever the route sends it
            request.data = data
            return self.route.dispatch(request, codec, now, touched, dirty)
        if session is None:
            session = self.by_client[client] = Session()
            if op != SESSION_WATCH and op != SESSION_MULTI:
                session.lost = session.aborted = True  # begun elsewhere: its connection is not here
        if op == SESSION_QUEUED:
            self._queue(session, request, codec, now, touched, dirty)
        elif op == SESSION_WATCH:
            self._watch(session, request, codec, now, touched, dirty)
        elif op == SESSION_MULTI or op == SESSION_MULTI_WATCHED:
            self._multi(session, request, codec, now, touched, dirty)
        elif op == SESSION_REFUSED:
            session.aborted = True
            refuse(request, request.reply, REFUSED_INSIDE, dirty)
        else:  # EXEC, DISCARD, UNWATCH: the session ends here
            del self.by_client[client]
            self._end(session, op, request, codec, now, touched, dirty)
        return False

    def client_gone(self, client) -> None:
        """C{client} closed: close its pinned connection now (Redis forgets its WATCH and MULTI with it)."""
        session = self.by_client.pop(client, None)
        if session is not None:
            session.lost = True
            session.end()

    # -- the operations ----------------------------------------------------------

    def _watch(self, session, request, codec, now, touched, dirty) -> None:
        if session.lost:
            # Once the client was told (an error), a WATCH starts afresh: a client
            # such as redis-py sends no UNWATCH after a request that failed.
            del self.by_client[request.client]
            session.end()
            if not session.told:
                self._lost(request, codec, dirty)
                return
            session = self.by_client[request.client] = Session()
        if session.conn is None:
            # Nothing watched yet: a WATCH refused before (its error was the client's
            # notice) does not keep this one from starting the session afresh.
            session.aborted = False
        if not self._pinned(session, self._place(request), request, codec, now, touched, dirty):
            session.aborted = True  # the watch does not hold: EXEC must not succeed
            return
        self._send(session, request, codec, now, touched, dirty)

    def _multi(self, session, request, codec, now, touched, dirty) -> None:
        if session.lost:
            session.aborted = True
            refuse(request, codec.session_reply(request), None, dirty)  # +OK; EXEC will say EXECABORT
        elif session.conn is not None:
            self._send(session, request, codec, now, touched, dirty)
        elif not self.route.session_room():
            session.aborted = True
            refuse(request, codec.error_reply(request, LIMIT), LIMIT, dirty)
        else:
            session.waiting = [(request.frame, request.command)]
            refuse(request, codec.session_reply(request), None, dirty)

    def _queue(self, session, request, codec, now, touched, dirty) -> None:
        if session.aborted:
            refuse(request, codec.session_reply(request), None, dirty)  # +QUEUED, never sent
            return
        placed = self._place(request)
        if placed is None and session.conn is None:  # no key, and no server yet: sent once there is one
            session.waiting.append((request.frame, request.command))
            refuse(request, codec.session_reply(request), None, dirty)
            return
        if placed is not None and not self._pinned(session, placed, request, codec, now, touched, dirty):
            session.aborted = True
            return
        self._send(session, request, codec, now, touched, dirty)

    def _end(self, session, op, request, codec, now, touched, dirty) -> None:
        if op == SESSION_EXEC and not session.aborted and session.conn is None:
            # MULTI [keyless commands] EXEC: any server runs it, as Redis would.
            if not self._pinned(session, self.route.session_group(None), request, codec, now, touched, dirty):
                session.aborted = True
                session.end()
                return
        if session.aborted or session.lost or session.conn is None:
            refuse(request, codec.session_reply(request), None, dirty)  # EXECABORT, or +OK: nothing to undo
        else:
            self._send(session, request, codec, now, touched, dirty)
        session.end()

    # -- helpers --------------------------------------------------------------------

    def _place(self, request):
        """C{(group, server)} of the request's keys; None without keys; L{_SPANS} when they span groups."""
        keys = request.keys
        group_of = self.route.session_group
        if keys is None:
            return group_of(request.key) if request.key is not None else None
        placed = group_of(keys[0])
        for i in range(1, len(keys)):
            if group_of(keys[i])[0] != placed[0]:
                return _SPANS
        return placed

    def _pinned(self, session, placed, request, codec, now, touched, dirty) -> bool:
        """
        Make sure C{session} is pinned to the group C{placed} (pinning it if it
        is not pinned yet); else answer C{request} with the reason and return False.
        """
        if placed is _SPANS or (session.conn is not None and placed[0] != session.group):
            refuse(request, self.route.session_conflict(request, codec), "keys of a transaction in several places", dirty)
            return False
        if session.conn is not None:
            return True
        group, server = placed
        if server is None:
            fail(request, REFUSED, "no server in pool %s" % (self.route.name,), codec, dirty)
            return False
        if not server.available(now):
            fail(request, server.last_error or REFUSED, server.label, codec, dirty)
            return False
        conn = server.pin(codec)
        if conn is None:
            refuse(request, codec.error_reply(request, LIMIT), LIMIT, dirty)
            return False
        session.group = group
        session.server = server
        session.conn = conn
        waiting = session.waiting
        session.waiting = None
        if waiting:
            for frame, command in waiting:
                earlier = Request(frame, command)
                earlier.resume = session.replied
                session.inflight += 1
                conn.enqueue_internal(earlier, now, touched)
        return True

    def _send(self, session, request, codec, now, touched, dirty) -> None:
        conn = session.conn
        if conn.closed:  # closed under it (the pool was retired, the server ejected ...)
            session.lost = session.aborted = session.told = True
            self._lost(request, codec, dirty)
            return
        request.resume = session.replied
        session.inflight += 1
        conn.enqueue(request, now, touched)

    @staticmethod
    def _lost(request, codec, dirty) -> None:
        refuse(request, codec.error_reply(request, LOST), LOST, dirty)
