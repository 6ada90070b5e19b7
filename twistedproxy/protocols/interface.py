"""
The small interface every wire protocol implements.

A protocol is one module that provides an L{ICodec}.  The core (client side,
server pool, routing, stats) only ever talks to these three interfaces, so adding
a protocol means adding a module and naming it in L{twistedproxy.protocols}.

Contract in one paragraph: a per-client L{IRequestParser} turns client bytes into
L{twistedproxy.core.request.Request} objects (raw frame, command, key(s), route).
The core picks servers, writes frames, and for each frame written expects exactly
one reply frame, which a per-server-connection L{IReplyParser} cuts out of the
backend's bytes.  Requests with several keys are split with L{ICodec.split} and
their fragment replies joined with L{ICodec.merge} (and, for requests sent in
slices, the slices' replies with L{ICodec.join}).  Failures become
L{ICodec.error_reply}.  A route that may resend a request asks
L{ICodec.classify_reply} what its reply means (final, redirect, retry).  All methods are synchronous and called on the hot path:
parse with C{bytes.find} and slices, never decode and re-encode payloads.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IRequestParser(Interface):
    """Frames one client connection's byte stream into requests."""

    codec = Attribute(
        "The ICodec that framed the requests.  A sniffing parser (memcached text or "
        "binary on one port) sets it once the first byte has been seen; the core reads "
        "it after each feed(): it framed the batch's first request.  A parser whose "
        "client changes protocol mid-stream (Redis HELLO 3) returns a switching request "
        "(twistedproxy.core.request.switching) whose switch_to frames the requests after "
        "it, and starts its next batch with that codec."
    )

    def feed(data: bytes) -> list:
        """
        Add bytes received from the client; return the requests now complete, in
        order (possibly none).  Keeps any partial frame buffered.

        Requests the proxy answers itself (PING, errors for unsupported or malformed
        but well-framed commands, ...) come back with route ROUTE_LOCAL and their
        reply set, so replies stay in order.

        @raise twistedproxy.core.request.ProtocolError: framing is lost or a frame
            is larger than allowed; the error carries the requests framed before it.
        """


    def state() -> dict:
        """
        The connection's own state (e.g. Redis AUTH done, memcached text or
        binary), JSON-safe, for L{restore} by a parser of another worker when a
        reload or an upgrade hands the client over.  Not the buffered bytes.
        """

    def restore(state: dict) -> None:
        """Go on from a L{state} taken in another process (names it does not know are ignored)."""

    def unparsed() -> bytes:
        """The bytes received and not framed yet, from the start of their frame."""


class IReplyParser(Interface):
    """Frames one backend connection's byte stream into replies."""

    def feed(data: bytes) -> None:
        """Add bytes received from the backend."""

    def next_reply(request) -> bytes | None:
        """
        Cut the reply to C{request} (the oldest request in flight on this
        connection) out of the buffered bytes; return it as raw bytes, or None if
        it is not complete yet.  Some protocols need the request to know the shape
        of its reply (memcached text: C{get} ends with END, C{set} is one line).

        @raise twistedproxy.core.request.ProtocolError: the backend sent garbage;
            the core closes the connection and fails its requests.
        """

    def buffered() -> int:
        """How many bytes are buffered and not yet returned as replies."""


class ICodec(Interface):
    """A wire protocol: parsers, multi-key split/merge and error replies."""

    name = Attribute("Short protocol name, e.g. 'redis', 'memcache'.")

    def request_parser(pool_config) -> IRequestParser:
        """
        A new parser for one client connection of a pool (C{pool_config} is a
        L{twistedproxy.config.PoolConfig}: auth, database, limits).
        """

    def reply_parser() -> IReplyParser:
        """A new parser for one backend connection."""

    def split(request, groups: list, strips: list | None = None) -> list:
        """
        Split a ROUTE_KEYS request: C{groups} is a list of lists of indices into
        C{request.keys}, one list per server (indices in client order).  Return one
        frame (bytes) per group, in the same order.  C{strips}, when given, holds
        per group how many leading bytes of each of its keys the backend must
        not see (a tenant's stripped prefix; 0 keeps the keys whole).
        """

    def strip_keys(request, prefix: bytes) -> None:
        """
        Rewrite C{request} so the backend sees its key(s) without C{prefix}:
        the frame (Redis bulk lengths, memcached command lines, binary key and
        body lengths), C{key}, C{keys} and whatever C{data} split needs.  Keys
        that do not start with C{prefix} are left whole.  Only tenant fronts
        call it (L{twistedproxy.routes.tenants}).
        """

    def restore_keys(request, raw: bytes, prefix: bytes) -> bytes:
        """
        Put C{prefix} back in front of the keys a backend reply to C{request}
        carries (memcached C{VALUE key} lines, meta C{k} flags, binary GETK
        keys); other replies come back unchanged.  The core calls it only for
        requests whose keys were stripped (C{request.prefix} set).
        """

    def denied_reply(request) -> bytes:
        """
        The reply to a request that uses a key its connection's user may not
        reach (Redis 7's C{-NOPERM} words).
        """

    def merge(request, fragments: list) -> bytes:
        """
        Join the replies of a split (ROUTE_KEYS) or broadcast (ROUTE_ALL) request
        into the one reply the client expects.  Each fragment has C{.reply} (the raw
        backend reply) and C{.key_indices} (the indices of C{request.keys} it
        carried; None for a broadcast).  Only called when every fragment succeeded.
        """

    def part_data(request, keys: list):
        """
        The codec data (L{twistedproxy.core.request.Request.data}) that a
        request made of C{keys}, some of C{request}'s, needs to be split on
        its own: what a route gives a part of a split request it resends
        elsewhere, where the part is split again (MSET's values for those keys;
        memcached's command words as they are).
        """

    def join(request, replies: list) -> bytes:
        """
        Join the replies of consecutive slices of a ROUTE_KEYS request into the
        one reply the client expects.  The core sends a request with very many
        keys in slices of its keys, in order; each slice's reply is what
        L{merge} gave for that slice's keys (or its only fragment's reply), so
        C{replies} hold every key's answer in client order.  Must not cost
        more than a pass over the slices (no parsing of every key's value).
        """

    def filter_reply(request, raw: bytes) -> bytes:
        """
        Called for requests with C{filter} set: turn the backend reply into what
        the client must see (b"" to send nothing, e.g. a quiet-mode miss).
        """

    def error_reply(request, message: str) -> bytes:
        """
        The reply the client sees when the backend failed for this request (timeout,
        connection lost, server ejected).  Must be sent even for quiet requests.
        """

    def classify_reply(request, raw: bytes) -> int:
        """
        What the backend reply C{raw} means for C{request}: REPLY_FINAL (it goes
        to the client), REPLY_REDIRECT (the key lives elsewhere: Redis Cluster's
        MOVED and ASK) or REPLY_RETRY (the server cannot answer now: Redis's
        TRYAGAIN), constants of L{twistedproxy.core.request}.  Only asked by a
        route that may resend the request (L{twistedproxy.routes.interface});
        a codec with nothing to resend returns REPLY_FINAL.
        """

    def reply_failed(raw: bytes) -> bool:
        """
        Whether the backend reply C{raw} reports an error (memcached
        SERVER_ERROR, a binary error status, a Redis error): how routes count
        the failures of their own copies, whose replies no client reads.
        """

    def handshake(pool_config) -> list:
        """
        Requests sent first on every new backend connection (Redis AUTH and SELECT,
        memcached logins); their replies are checked with L{handshake_error} and
        never reach a client.  One with C{close_after} set closes the connection
        when refused, failing its requests with the refusal.
        """

    def handshake_error(raw: bytes) -> str | None:
        """An error message if a handshake reply reports failure, else None."""

    def probe_request():
        """
        A request that checks an ejected server answers (Redis PING, memcached
        version), sent after the handshake on a new connection before the server
        gets traffic again; its reply goes through L{handshake_error} and never
        reaches a client.
        """

    def warmup_samples(pool_config) -> list:
        """
        Sample traffic that warms the hot path before a process serves
        (L{twistedproxy.core.warmup}), for a pool configured by C{pool_config}:
        a list of conversations, each a pair C{(reads, answer)}.  C{reads} are
        the byte strings one client of the pool sends, one read each, and
        again every round (one or more complete requests: the common commands,
        single and pipelined, multi-key ones too; an AUTH where the pool asks
        for one); C{answer(frame)} is the reply a backend sends to one frame
        the proxy writes to it (a request's frame, a fragment of a split one,
        a rewrite, a handshake request).  A codec that sniffs its clients'
        protocol gives one conversation per protocol it may choose.
        """


class IClusterCodec(Interface):
    """
    What memcached's replicate and warm-up routes ask of a protocol
    (L{twistedproxy.routes.replicate}, L{twistedproxy.routes.warmup}); the
    codecs of memcached's text and binary protocols provide it.  The
    constants are L{twistedproxy.core.request}'s REPLICA_* and WARM_*.
    """

    warm_codec = Attribute(
        "The codec of the warm-up route's own requests (memcached text: meta mg and ms, which carry the TTL)."
    )

    def replication(request) -> int:
        """How a replicate route sends C{request}: REPLICA_READ, REPLICA_WRITE or REPLICA_FIRST."""

    def replica_copy(request, raw: bytes) -> bytes | None:
        """
        For a REPLICA_FIRST request the first route answered C{raw}: the frame
        the other routes get (a cas that succeeded becomes a set), or None (it
        failed: nothing to copy).
        """

    def warm_lookup(request) -> int:
        """What a warm-up route does with a miss of C{request}: WARM_NONE, WARM_ANSWER or WARM_REREAD."""

    def warm_misses(request, raw: bytes) -> list:
        """The keys of C{request} (or of a part of a split one) that its reply C{raw} missed."""

    def warm_fetch(key: bytes):
        """(warm_codec) The request that reads C{key}'s value, flags and remaining TTL."""

    def warm_value(raw: bytes):
        """(warm_codec) The reply to L{warm_fetch}: None for a miss, else C{(flags, ttl, data)} (ttl -1: none)."""

    def warm_fill(key: bytes, value):
        """(warm_codec) The request that adds C{key} with C{value} (never replaces), or None when it expires now."""

    def warm_stored(raw: bytes) -> bool:
        """(warm_codec) Whether the reply to L{warm_fill} says it was stored."""

    def warm_reply(request, raw: bytes, found: dict) -> bytes:
        """
        For a WARM_ANSWER request: its reply C{raw} from the cold route with the
        values C{found} in the warm route (key -> L{warm_value}) added.
        """


class ISlotCluster(Interface):
    """
    What a cluster route (L{twistedproxy.routes.cluster}) asks of a protocol
    whose servers form a cluster that places keys by hash slot and redirects
    requests for slots a node does not serve (Redis Cluster:
    L{twistedproxy.protocols.redis_cluster}).  Addresses are C{(host, port)}
    with C{host} a str.
    """

    slots = Attribute("How many hash slots the cluster has (slots are 0 .. slots - 1).")

    def slot(key: bytes) -> int:
        """The hash slot of C{key}."""

    def map_request(fallback: bool):
        """The internal request that reads the slot map (C{fallback}: the older form, for older servers)."""

    def parse_map(raw: bytes, host: str) -> list | None:
        """
        The slot map in a reply to L{map_request} from a node at C{host} (which
        a node that does not know its own address leaves out): a list of
        C{(first slot, last slot, master address, replica addresses)}, the
        replicas that are not failed; or None when the reply is an error.
        """

    def map_unsupported(raw: bytes) -> bool:
        """Whether C{raw}, a reply to L{map_request}, says the server does not know that form (try the fallback)."""

    def redirect(raw: bytes):
        """
        For a reply the codec classified REPLY_REDIRECT: C{(moved, slot,
        address)}; C{moved} True when the slot now lives there (update the map),
        False for a one-time redirect (send L{asking_request} first).  None when
        it cannot be read.
        """

    def asking_request():
        """The internal request that lets the next request of a connection reach a slot being imported."""

    def readonly_request():
        """The internal request that lets a replica connection serve reads (sent on every new connection)."""

    def cross_slot_reply(request) -> bytes:
        """The cluster's own error reply to C{request}, whose keys (in a transaction) span slots."""

    def is_read(request) -> bool:
        """Whether C{request} only reads (a replica may answer it)."""


class ISessionCodec(Interface):
    """
    What a route's sessions (L{twistedproxy.routes.sessions}: transactions on a
    connection of the client's own) ask of a protocol whose parser makes
    ROUTE_SESSION requests; Redis's codec provides it.
    """

    def session_reply(request) -> bytes:
        """
        The reply the proxy gives itself to the ROUTE_SESSION C{request} when it
        does not send it (L{twistedproxy.core.request}'s SESSION_* operation in
        its data): MULTI's +OK before the server is known, +QUEUED for a
        command queued in a transaction already refused, EXECABORT for the EXEC
        of such a transaction, +OK for a DISCARD or UNWATCH with nothing to undo.
        """


class IKeyMigration(Interface):
    """
    What online migration asks of a protocol (L{twistedproxy.routes.migrate},
    L{twistedproxy.migration}): how the keys on one backend are listed, and
    how keys are moved from one backend to another.  Found with
    L{twistedproxy.protocols.migration_for}.

    Requests made here are L{twistedproxy.core.request.Request}s sent as
    internal requests (never a client's) on connections of L{codec}; their
    replies are framed by that codec's reply parser.
    """

    codec = Attribute(
        "The ICodec whose server connections carry these requests (Redis: the RESP2 codec;"
        " memcached: the meta protocol's codec)."
    )

    def list_request(cursor, match, count: int):
        """
        The request that lists the next keys on one server: from the start for
        C{cursor} None, else from the cursor L{list_reply} gave; C{match} a
        glob pattern (bytes) or None; C{count} a hint of how many per reply.
        """

    def list_reply(raw: bytes, match=None):
        """
        C{(cursor, keys)} from the reply to L{list_request}: the cursor to go
        on from, or None once the listing is complete; the keys in this reply
        (those C{match}, the pattern given to L{list_request}, selects: a
        listing that cannot filter on the server filters here).  Raises
        ValueError with the reason for a reply that is no listing (an error).
        """

    def move(keys: list, source, target, pool_config):
        """
        A generator that moves C{keys} (one or more) from server C{source} to
        server C{target} (L{twistedproxy.config.model.ServerSpec}s of a pool
        configured by C{pool_config}: its db, auth, timeout), one request at a
        time: it yields C{(side, request)} with side C{"source"} or
        C{"target"}, is sent C{(raw, error)} back (C{raw} None when the
        request failed, with C{error} the failure's text) and returns a
        L{twistedproxy.core.moves.MoveResult}.  After it returns, none of
        C{keys} is on C{source} any more unless the result counts it failed;
        a key that already sits on C{target} is never overwritten by an older
        value from C{source}.
        """
