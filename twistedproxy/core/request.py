"""
The protocol-agnostic request object that travels from a client connection to a
server connection and back, plus the routing kinds and the framing error.

A codec (see L{twistedproxy.protocols.interface}) creates L{Request} objects out of
client bytes; the core routes, forwards, times and completes them.  The core never
looks inside C{frame} or C{reply}: they are opaque wire bytes.

The invariant that keeps pipelining simple: every frame the core writes to a
backend is answered by exactly one reply frame.  Codecs rewrite requests whose
wire form would break that (memcached C{noreply}, quiet binary opcodes, the meta
C{q} flag) and use L{Request.filter} to hide the reply from the client again.
"""

from __future__ import annotations

# Routing kinds (Request.route).
ROUTE_KEY = 0  # one backend, chosen by request.key
ROUTE_KEYS = 1  # several keys: split per server (codec.split), merged (codec.merge)
ROUTE_ALL = 2  # every server of the pool gets request.frame; replies merged (codec.merge)
ROUTE_LOCAL = 3  # the proxy answers itself: request.reply is already set
ROUTE_ANY = 4  # no key, but a backend must answer: any one live server
# Part of a client's session (a Redis transaction: WATCH ... MULTI ... EXEC):
# the route's sessions (L{twistedproxy.routes.sessions}) pin it to one backend
# connection of the client's own.  C{request.data} is C{(op, route, data)}: one
# of the SESSION_* operations below, and the route and data the request had
# outside a session (keys stay in C{key} / C{keys}).
ROUTE_SESSION = 5

# Session operations (the first item of a ROUTE_SESSION request's data).
SESSION_WATCH = 0  # watch request.keys: pins the session to their server (or slot)
SESSION_MULTI = 1  # start queueing, no watch before
SESSION_MULTI_WATCHED = 2  # start queueing after watching: the watch must still hold
SESSION_QUEUED = 3  # a command between MULTI and EXEC: sent to the pinned connection
SESSION_REFUSED = 4  # a command between MULTI and EXEC the proxy refused itself (request.reply): aborts it
SESSION_WATCHING = 5  # a command between WATCH and MULTI: pinned if its keys are there, else routed as usual
SESSION_EXEC = 6  # ends the session: run what was queued
SESSION_DISCARD = 7  # ends the session: drop what was queued
SESSION_UNWATCH = 8  # ends a session that only watched

# What a backend reply means for its request (ICodec.classify_reply).  Only a
# route that set Request.resume asks; for every other request a reply is final.
REPLY_FINAL = 0  # the reply goes to the client
REPLY_REDIRECT = 1  # the key lives elsewhere (Redis Cluster MOVED/ASK): resend there
REPLY_RETRY = 2  # the server cannot answer now (Redis TRYAGAIN ...): resend, here or elsewhere

# How a replicate route sends a request (ICodec.replication; memcached only).
REPLICA_READ = 0  # the first (authoritative) route only: gets, mg ...
REPLICA_WRITE = 1  # every route at once; the client gets the first route's reply
REPLICA_FIRST = 2  # the first route; on success a copy (ICodec.replica_copy) goes to the others

# What a warm-up route does with a miss on its cold route (ICodec.warm_lookup; memcached only).
WARM_NONE = 0  # nothing: not a lookup
WARM_ANSWER = 1  # look the missed keys up in the warm route and answer with its values (text get)
WARM_REREAD = 2  # look them up, fill the cold route, then read again there (CAS tokens are the cold server's)


class ProtocolError(Exception):
    """
    Framing is lost: the core writes C{reply} to the peer (if any) and closes.

    @ivar reply: the bytes to send before closing (may be empty).
    @ivar requests: the complete requests framed before the error in the same
        batch; they are still served, in order, before the error reply.
    """

    def __init__(self, reply: bytes, requests: list | None = None, message: str = ""):
        Exception.__init__(self, message or reply.decode("latin-1").strip())
        self.reply = reply
        self.requests = requests if requests is not None else []


class Request:
    """
    One client request (or one fragment of a split multi-key request).

    Fields set by the codec:
      - frame: the bytes to send to a backend (the raw client frame, or a rewrite).
      - command: the command name, lower case bytes (for stats, logs and errors).
      - key: the routing key for ROUTE_KEY (the whole key; hash tags are the core's job).
      - keys: the list of keys for ROUTE_KEYS, in client order.
      - route: one of the ROUTE_* constants.
      - reply: for ROUTE_LOCAL, the reply bytes; the core fills it for the others.
      - filter: when true the core passes the backend reply through
        C{codec.filter_reply(request, raw)} (which may return b"" to send nothing).
      - close_after: close the client connection once this reply is written;
        on a handshake request, close the server connection (failing its
        requests) when the handshake is refused (a memcached login).
      - data: codec-private state (parsed arguments for split/merge, opaque ...).

    Fields owned by the core: done, client, parent, fragments, pending,
    key_indices, received_at, sent_at, replied_at, expired, server, failed.

    Fields owned by routes:
      - resume: None, or a callable a route set before sending the request:
        C{resume(request, raw, error, codec, dirty) -> bool} is called with the
        backend reply (C{raw}, C{error} None) or the failure (C{raw} None,
        C{error} the failure text) before the client sees it, and returns True
        when it sent the request on again (see L{twistedproxy.routes.interface}).
      - internal: the proxy issued it itself (handshake, probe, later ASKING or a
        migration command): its reply never reaches a client, and no
        client-facing or server request counter counts it; a C{resume} hook, if
        set, gets its reply or failure.
      - prefix: None, or the key prefix a tenant front stripped before sending
        (the codec's C{strip_keys} or C{split}); the completion path hands the
        final reply to C{codec.restore_keys} to put it back in replies that
        carry keys.
      - tenant: None, or the tenant the request counts for (its recorder;
        L{twistedproxy.routes.tenants}).
    """

    __slots__ = (
        "frame",
        "command",
        "key",
        "keys",
        "route",
        "reply",
        "filter",
        "close_after",
        "data",
        # core-owned
        "done",
        "client",
        "parent",
        "fragments",
        "pending",
        "key_indices",
        "received_at",
        "sent_at",
        "replied_at",
        "expired",
        "server",
        "failed",
        # route-owned
        "resume",
        "internal",
        "prefix",
        "tenant",
    )

    # Set on the requests L{switching} makes: the codec that frames the
    # client's requests after this one.  A class attribute, so plain requests
    # pay nothing for it.
    switch_to = None

    def __init__(
        self,
        frame: bytes,
        command: bytes,
        key: bytes | None = None,
        route: int = ROUTE_KEY,
        keys: list | None = None,
        reply: bytes | None = None,
        filter: bool = False,
        close_after: bool = False,
        data: object = None,
    ):
        self.frame = frame
        self.command = command
        self.key = key
        self.keys = keys
        self.route = route
        self.reply = reply
        self.filter = filter
        self.close_after = close_after
        self.data = data
        self.done = route == ROUTE_LOCAL
        self.client = None
        self.parent = None
        self.fragments = None
        self.pending = 0
        self.key_indices = None
        self.received_at = 0.0
        self.sent_at = 0.0
        self.replied_at = 0.0  # when the (last) backend reply was read; 0.0 = none
        self.expired = False
        self.server = None
        self.failed = None
        self.resume = None
        self.internal = False
        self.prefix = None
        self.tenant = None

    def __repr__(self) -> str:
        return "<Request %s route=%d key=%r done=%r>" % (
            self.command.decode("latin-1"),
            self.route,
            self.key if self.key is not None else self.keys,
            self.done,
        )


def stand_in(request) -> Request:
    """
    A copy of C{request} that takes its place in a backend's pipeline when the
    request itself moves on (a timed-out request a route resends): internal and
    expired, it only swallows the late reply.
    """
    copy = Request(request.frame, request.command, request.key, request.route, request.keys, None, request.filter)
    copy.data = request.data
    copy.sent_at = request.sent_at
    copy.internal = True
    copy.expired = True
    return copy


def local(command: bytes, reply: bytes, close_after: bool = False) -> Request:
    """A request the proxy answers itself with C{reply}."""
    return Request(b"", command, route=ROUTE_LOCAL, reply=reply, close_after=close_after)


class _Switch(Request):
    __slots__ = ("switch_to",)


def switching(command: bytes, reply: bytes, codec) -> Request:
    """
    A request the proxy answers itself with C{reply}, after which its client's
    requests speak C{codec} (Redis C{HELLO 3}).  The requests before it keep
    the codec they were framed with, even when they wait to be sent.
    """
    request = _Switch(b"", command, route=ROUTE_LOCAL, reply=reply)
    request.switch_to = codec
    return request


def keys_of(request) -> list:
    """The keys a request or a fragment of one carries, in client order."""
    if request.route == ROUTE_KEYS:
        return request.keys
    parent = request.parent
    if parent is not None and request.key_indices is not None:
        keys = parent.keys
        return [keys[i] for i in request.key_indices]
    return [request.key] if request.key is not None else []
