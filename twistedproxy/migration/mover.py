"""
The mover: the background half of a migration, run by the coordinating
process.  It lists every key on every server of a plan (C{plan.servers}, one
server after the other, from the saved listing cursors) and moves each key
that is not on its target owner there, with the protocol's move
(L{twistedproxy.protocols.interface.IKeyMigration}) run by
L{twistedproxy.core.moves.run_move} over a servers layer of its own.

Keys go in batches of L{BATCH}; a batch's keys are grouped by target server
and each group is one move (one Redis MIGRATE ... KEYS).  A listing cursor is
saved only once every key of the batch it gave is dealt with, so a resume
after a failure lists the failed batch again.  At most C{migrate_rate} keys a
second: one timer between batches, none per key.

What it tells its owner (C{events}): C{progress(scanned, moved, skipped,
failed, bytes)} after each batch, C{failed(error)} when a backend fails (it
stops; L{resume} goes on), C{finished()} after one complete listing of every
server with every moving key moved.
"""

from __future__ import annotations

from dataclasses import replace

from twistedproxy.core.moves import run_move
from twistedproxy.core.servers import ServerSet
from twistedproxy.hashing import hash_function, hash_tag_key, make_distribution
from twistedproxy.protocols import migration_for

BATCH = 100  # keys listed per request and moved per turn of the mover
DONE = "done"  # the cursor of a server whose listing is complete


def placement(pool_config, servers):
    """
    C{key -> ServerSpec}: the owner of a key among C{servers} by C{pool_config}'s
    hash, hash tag and distribution (the hash route's placement, with every server in).
    """
    servers = tuple(servers)
    index = make_distribution(pool_config.distribution, [(s.ketama_name, s.weight) for s in servers]).index
    hashed = hash_function(pool_config.hash)
    tag = pool_config.hash_tag
    if tag is None:
        return lambda key: servers[index(hashed(key))]
    return lambda key: servers[index(hashed(hash_tag_key(key, tag)))]


class Mover:
    """
    Moves the keys of one plan.  C{cursors}: server address -> the listing
    cursor to go on from (None: from the start; L{DONE} once complete), as
    text (the protocol's bytes, latin-1), saved by the coordinator.
    """

    def __init__(self, reactor, plan, pool_config, events, cursors=None, migration=None):
        self.reactor = reactor
        self.plan = plan
        self.pool_config = pool_config
        self.events = events
        self.migration = migration if migration is not None else migration_for(pool_config.protocol)
        self.codec = self.migration.codec
        # Its own connections: health decisions, ejection and preconnect are the workers'.
        config = replace(pool_config, servers=plan.servers, auto_eject_hosts=False, preconnect=False)
        self.server_set = ServerSet(config, reactor, (self.codec,))
        # A backend is its address (a re-weighted or renamed server is one backend under two specs).
        self.by_address = {server.spec.address: server for server in self.server_set.servers}
        self.owner = placement(pool_config, plan.target)
        self.match = pool_config.migrate_match.encode("utf-8") if pool_config.migrate_match else None
        self.rate = pool_config.migrate_rate
        self.cursors = {spec.address: None for spec in plan.servers}
        self.cursors.update(cursors or {})
        self.running = False
        self._busy = False  # a listing or a batch of moves is on its way
        self._timer = None
        self._listing = None  # (server, cursor after this listing reply, keys not yet dealt with)
        self._started_at = None
        self._keys_since = 0  # keys moved since _started_at (the rate limit's count)

    @property
    def fraction(self) -> float:
        """The part of the servers whose listing is complete (0 to 1)."""
        return sum(1 for c in self.cursors.values() if c == DONE) / float(len(self.cursors) or 1)

    # -- control ---------------------------------------------------------------

    def start(self) -> None:
        """Start, or go on after L{pause} or a failure (from the saved cursors)."""
        if self.running:
            return
        self.running = True
        self._started_at = self.reactor.seconds()
        self._keys_since = 0
        if not self._busy:
            self._soon(0)

    def pause(self) -> None:
        """Stop after what is on its way (its outcome is still counted)."""
        self.running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def stop(self) -> None:
        """Pause and close the connections."""
        self.pause()
        self.server_set.stop()

    # -- the loop ----------------------------------------------------------------

    def _soon(self, delay: float) -> None:
        self._timer = self.reactor.callLater(delay, self._step)

    def _step(self) -> None:
        self._timer = None
        if not self.running or self._busy:
            return
        if self._listing is not None:
            self._move_batch()
            return
        for spec in self.plan.servers:
            cursor = self.cursors[spec.address]
            if cursor != DONE:
                self._list(self.by_address[spec.address], cursor)
                return
        self.running = False
        self.events.finished()

    def _list(self, server, cursor) -> None:
        self._busy = True

        def listed(raw, error):
            self._busy = False
            if raw is None:
                self._fail("listing the keys of %s failed: %s" % (server.spec.address, error))
                return
            try:
                next_cursor, keys = self.migration.list_reply(raw, self.match)
            except Exception as e:
                self._fail("listing the keys of %s failed: %s" % (server.spec.address, e))
                return
            # Kept as text (the state file is JSON): a protocol's cursor is bytes.
            kept = DONE if next_cursor is None else next_cursor.decode("latin-1")
            self._listing = (server, kept, list(keys))
            self.events.progress(scanned=len(keys))
            if self.running:
                self._step()

        cursor = None if cursor is None else cursor.encode("latin-1")
        send(server, self.migration.list_request(cursor, self.match, BATCH), self.codec, self.reactor, listed)

    def _move_batch(self) -> None:
        server, next_cursor, keys = self._listing
        batch, rest = keys[:BATCH], keys[BATCH:]
        groups = {}
        for key in batch:
            owner = self.owner(key)
            if owner.address != server.spec.address:
                groups.setdefault(owner, []).append(key)
        if not groups:
            self._batch_done(server, next_cursor, rest, [])
            return
        self._busy = True
        results = []

        def moved(result, dirty):
            results.append(result)
            if len(results) == len(groups):
                self._busy = False
                self._keys_since += sum(len(group) for group in groups.values())
                self._batch_done(server, next_cursor, rest, results)

        for target, group in groups.items():
            steps = self.migration.move(group, server.spec, target, self.pool_config)
            run_move(steps, server, self.by_address[target.address], self.codec, self.reactor, self.server_set.flusher, moved)

    def _batch_done(self, server, next_cursor, rest, results) -> None:
        errors = [result.error for result in results if result.failed]
        self.events.progress(moved=sum(r.moved for r in results), skipped=sum(r.missing for r in results),
                             failed=sum(r.failed for r in results), bytes=sum(r.bytes for r in results))
        if errors:
            # The cursor stays where it was: a resume lists this batch again.
            self._listing = None
            self._fail("moving keys from %s failed: %s" % (server.spec.address, errors[0]))
            return
        if rest:
            self._listing = (server, next_cursor, rest)
        else:
            self._listing = None
            self.cursors[server.spec.address] = next_cursor
        if not self.running:
            return
        delay = 0.0
        if self.rate:
            # The keys moved since the start may not have taken less than keys / rate seconds.
            delay = self._started_at + self._keys_since / float(self.rate) - self.reactor.seconds()
        self._soon(max(delay, 0.0))

    def _fail(self, error: str) -> None:
        self.running = False
        self.events.failed(error)

    # -- the drain check ------------------------------------------------------------

    def count_keys(self, spec, done) -> None:
        """List C{spec}'s keys (those C{migrate_match} selects) once: C{done(count, None)} or C{done(None, error)}."""
        server = self.by_address[spec.address]
        counted = [0]

        def listed(raw, error):
            if raw is None:
                done(None, error)
                return
            try:
                cursor, keys = self.migration.list_reply(raw, self.match)
            except Exception as e:
                done(None, str(e))
                return
            counted[0] += len(keys)
            if cursor is None:
                done(counted[0], None)
            else:
                send(server, self.migration.list_request(cursor, self.match, BATCH * 10), self.codec, self.reactor,
                     listed)

        send(server, self.migration.list_request(None, self.match, BATCH * 10), self.codec, self.reactor, listed)


def send(server, request, codec, reactor, answered) -> None:
    """Send C{request} to C{server} as an internal request; C{answered(raw, error)} gets its outcome."""

    def resume(request, raw, error, codec, dirty):
        answered(raw, error)
        return True

    request.resume = resume
    now = reactor.seconds()
    if not server.available(now):
        answered(None, server.last_error or "the server is backing off after a failure")
        return
    touched = []
    server.connection(codec).enqueue_internal(request, now, touched)
    server.pool.flusher.add(touched)
