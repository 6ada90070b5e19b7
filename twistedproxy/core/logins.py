"""
Failed logins, counted and limited per client address across the whole proxy.

A protocol that authenticates its clients (Redis AUTH and HELLO AUTH,
memcached SASL and text logins) asks its connection's L{LoginGuard} before
checking a password and tells it about each failure:

    guard = parser.login_guard      # set by the ProxyFactory; None: no limit
    if guard is not None and guard.refused():
        reply TOO_MANY_FAILURES_TEXT (the password is not even checked)
    elif password is wrong:
        if guard is not None:
            guard.failed(user + b"\0" + password)   # what was tried: repeats count once
        reply the protocol's own "wrong password" error

Behind the guard is an L{IAuthLimiter}: L{LocalAuthLimiter} in a single
process, or a worker's L{RemoteAuthLimiter}, which reports each failure to the
master (L{twistedproxy.process.logins}) and refuses the addresses the master
said are blocked.  Both count with one L{FailureCounter}: the single process
for its own failures, the master for every worker's, a worker only to hold
the blocks it was told of.

An address is blocked for C{auth_block_seconds} once it failed
C{auth_failures_limit} times within a minute (global keys; a limit of 0 counts
but never blocks).  A failure that repeats one the address made within the
minute (the same user and password: a client library retrying a refused login
by itself, as redis-py 8 does ten times) is counted in the stats but not
towards the limit, which is there against guessing; each process knows the
attempts made to it (as a salted hash), so with N workers a repeat counts at
most N times.  Nothing here runs per request: only logins do.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque

from twisted.logger import Logger
from zope.interface import Interface, implementer

log = Logger()

# The window failures are counted in, seconds.
WINDOW = 60.0

# Distinct failed attempts remembered per address (the oldest half goes past it).
MAX_ATTEMPTS_KEPT = 256

# What a blocked address's login attempts are answered (each protocol wraps it in its error form).
TOO_MANY_FAILURES_TEXT = "too many failed authentication attempts from this address; try again later"


class IAuthLimiter(Interface):
    """Failed logins per client address, for the whole proxy."""

    def blocked(address):
        """True while logins from C{address} (a str) are refused without being checked."""

    def failed(address, attempt):
        """
        A login from C{address} failed (a wrong user or password); C{attempt}
        (bytes) is what was tried: a repeat within the minute is not counted again.
        """


class FailureCounter:
    """
    Failed logins per address in a sliding window of L{WINDOW} seconds, and the
    addresses blocked until a time.  Times are given by the caller (its
    reactor's clock).  Addresses whose failures are all older than the window
    are forgotten in sweeps, so many addresses failing once cost no memory.
    """

    def __init__(self, limit: int = 10, block_seconds: float = 60.0):
        self.limit = limit
        self.block_seconds = block_seconds
        self._failures = {}  # address -> deque of failure times (at most limit of them)
        self._blocked = {}  # address -> until
        self._sweep_at = 1024

    def configure(self, limit: int, block_seconds: float) -> None:
        """New settings (a reload); counts and blocks made so far stay."""
        self.limit = limit
        self.block_seconds = block_seconds

    def failed(self, address: str, now: float) -> bool:
        """Count a failure; True when it blocks C{address} (from C{now} for C{block_seconds})."""
        if len(self._failures) >= self._sweep_at:
            self._sweep(now)
        times = self._failures.get(address)
        if times is None:
            times = self._failures[address] = deque()
        times.append(now)
        while times and times[0] <= now - WINDOW:
            times.popleft()
        limit = self.limit
        if limit <= 0:
            while len(times) > 1:  # counted in the stats, never blocked: keep nothing
                times.popleft()
            return False
        while len(times) > limit:
            times.popleft()
        if len(times) < limit or self.blocked(address, now):
            return False
        del self._failures[address]  # counted afresh once the block ends
        self._blocked[address] = now + self.block_seconds
        return True

    def block(self, address: str, until: float) -> None:
        """Block C{address} until C{until} (what the master said, in a worker)."""
        self._blocked[address] = max(until, self._blocked.get(address, until))

    def blocked(self, address: str, now: float) -> bool:
        until = self._blocked.get(address)
        if until is None:
            return False
        if until <= now:
            del self._blocked[address]
            return False
        return True

    def blocks(self, now: float) -> dict:
        """The addresses blocked now -> seconds left."""
        for address in [a for a, until in self._blocked.items() if until <= now]:
            del self._blocked[address]
        return {address: until - now for address, until in self._blocked.items()}

    def _sweep(self, now: float) -> None:
        stale = now - WINDOW
        for address in [a for a, times in self._failures.items() if not times or times[-1] <= stale]:
            del self._failures[address]
        self.blocks(now)
        self._sweep_at = max(1024, 2 * len(self._failures))


class RecentAttempts:
    """
    The failed attempts each address made within the last L{WINDOW} seconds,
    kept as hashes salted with a secret of the process's own (never the
    password), so that a repeat is told from a new guess.
    """

    def __init__(self):
        self._salt = os.urandom(16)
        self._seen = {}  # address -> {digest: time}
        self._sweep_at = 1024

    def first(self, address: str, attempt: bytes, now: float) -> bool:
        """True unless C{address} tried C{attempt} within the window (then only its time is renewed)."""
        if len(self._seen) >= self._sweep_at:
            self._sweep(now)
        digest = hashlib.sha256(self._salt + attempt).digest()
        seen = self._seen.get(address)
        if seen is None:
            seen = self._seen[address] = {}
        elif len(seen) >= MAX_ATTEMPTS_KEPT:  # an address guessing without a limit to stop it
            for old in sorted(seen, key=seen.get)[:len(seen) // 2]:
                del seen[old]
        when = seen.get(digest)
        seen[digest] = now
        return when is None or when <= now - WINDOW

    def _sweep(self, now: float) -> None:
        stale = now - WINDOW
        for address, seen in list(self._seen.items()):
            for digest in [d for d, when in seen.items() if when <= stale]:
                del seen[digest]
            if not seen:
                del self._seen[address]
        self._sweep_at = max(1024, 2 * len(self._seen))


def log_block(address: str, seconds: float, limit: int) -> None:
    log.warn("authentication: {limit} failed logins from {address} within a minute; its logins are refused"
             " for {seconds:g} s", address=address, limit=limit, seconds=seconds)


@implementer(IAuthLimiter)
class LocalAuthLimiter:
    """A single process's limiter: it counts its own failures."""

    def __init__(self, reactor, limit: int = 10, block_seconds: float = 60.0):
        self.reactor = reactor
        self.counter = FailureCounter(limit, block_seconds)
        self.recent = RecentAttempts()

    def configure(self, limit: int, block_seconds: float) -> None:
        self.counter.configure(limit, block_seconds)

    def blocked(self, address: str) -> bool:
        return self.counter.blocked(address, self.reactor.seconds())

    def failed(self, address: str, attempt: bytes) -> None:
        now = self.reactor.seconds()
        counter = self.counter
        if self.recent.first(address, attempt, now) and counter.failed(address, now):
            log_block(address, counter.block_seconds, counter.limit)


@implementer(IAuthLimiter)
class RemoteAuthLimiter:
    """
    A worker's limiter: C{report(address)} tells the master of each failure;
    the master's verdicts come back through L{block}.
    """

    def __init__(self, reactor, report):
        self.reactor = reactor
        self.report = report
        self.counter = FailureCounter()  # only its blocks are used
        self.recent = RecentAttempts()

    def configure(self, limit: int, block_seconds: float) -> None:
        pass  # the master counts

    def blocked(self, address: str) -> bool:
        return self.counter.blocked(address, self.reactor.seconds())

    def failed(self, address: str, attempt: bytes) -> None:
        if self.recent.first(address, attempt, self.reactor.seconds()):
            self.report(address)

    def block(self, address: str, seconds: float) -> None:
        """The master blocked C{address} for C{seconds} more."""
        self.counter.block(address, self.reactor.seconds() + seconds)


class LoginGuard:
    """
    One client connection's view of the limiter: its address (read from the
    connection's transport when first needed) and its pool's counters
    (C{auth_failures}, C{auth_blocked} of L{twistedproxy.stats.recorder.PoolStats}).
    """

    __slots__ = ("limiter", "client", "stats", "_address")

    def __init__(self, limiter, client, stats):
        self.limiter = limiter
        self.client = client
        self.stats = stats
        self._address = None

    @property
    def address(self) -> str:
        """The client's host; UNIX-socket clients count as one address per socket path."""
        if self._address is None:
            self._address = client_address(self.client.transport)
        return self._address

    def refused(self) -> bool:
        """True when this login must be refused unchecked (its address is blocked); counted."""
        if self.limiter.blocked(self.address):
            self.stats.auth_blocked += 1
            return True
        return False

    def failed(self, attempt: bytes) -> None:
        """The login failed (wrong user or password: C{attempt}); counted, and reported to the limiter."""
        self.stats.auth_failures += 1
        self.limiter.failed(self.address, attempt)


def client_address(transport) -> str:
    """What failures are counted by: the peer's host, or C{unix:PATH} for a UNIX socket's clients."""
    try:
        peer = transport.getPeer()
    except Exception:
        return "?"
    host = getattr(peer, "host", None)
    if host is not None:
        return host
    try:
        name = transport.getHost().name
    except Exception:
        name = None
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    return "unix:%s" % (name or "?",)
