"""
The AMP commands spoken between the master and each worker, over a socketpair
the master passes to the worker as a descriptor.

Worker -> master: L{Hello} (answered with the configuration), L{Ready},
L{ServerFailed}, L{ServerRecovered}, L{AuthFailed}.
Master -> worker: L{Reconfigure}, L{Stats}, L{Ping}, L{Stop}, L{SetLogLevel},
L{WorkerCount}, L{ServerHealth}, L{ProbeServer}, L{AuthBlocked}, L{ApplyMigrations}.
Old master -> new master, during an upgrade: L{InheritTotals}.

A spare worker's channel carries one line before AMP: the layout of the slot
it takes, with the slot's sockets (L{twistedproxy.process.spare}).
"""

from __future__ import annotations

from twisted.protocols import amp

from twistedproxy.net.channels import BigUnicode

class Hello(amp.Command):
    """
    A worker is up; the answer is the configuration it must run, the
    client addresses whose logins are blocked now (JSON: address -> seconds
    left) and the L{twistedproxy.config.migration.MigrationState} (JSON) it
    routes by.
    """

    arguments = [(b"pid", amp.Integer()), (b"slot", amp.Integer())]
    response = [(b"config", BigUnicode()), (b"source", amp.Unicode()), (b"blocked", BigUnicode()),
                (b"migrations", BigUnicode(optional=True))]


class Ready(amp.Command):
    """The worker serves: pools built, listening descriptors adopted."""

    arguments = []
    response = []


class Reconfigure(amp.Command):
    """Apply this configuration text between requests (same listen addresses), with the migrations' state."""

    arguments = [(b"config", BigUnicode()), (b"source", amp.Unicode()),
                 (b"migrations", BigUnicode(optional=True))]
    response = [(b"ok", amp.Boolean()), (b"error", amp.Unicode())]


class Stats(amp.Command):
    """The worker's counters, as a JSON object."""

    arguments = []
    response = [(b"stats", BigUnicode())]


class Ping(amp.Command):
    arguments = []
    response = [(b"pid", amp.Integer())]


class Stop(amp.Command):
    """Stop: C{graceful} finishes in-flight requests first (bounded by the shutdown timeout)."""

    arguments = [(b"graceful", amp.Boolean())]
    response = []


class SetLogLevel(amp.Command):
    arguments = [(b"level", amp.Unicode())]
    response = []


class InheritTotals(amp.Command):
    """
    The counters and histograms an old master's workers served (a JSON
    snapshot, L{twistedproxy.stats.snapshots.counters_only}), sent to the new
    master of an upgrade, again whenever they grow, until the old master exits.
    """

    arguments = [(b"stats", BigUnicode())]
    response = []


class WorkerCount(amp.Command):
    """The master now runs C{count} workers (per-worker shares of C{client_connections})."""

    arguments = [(b"count", amp.Integer())]
    response = []


# Ejection with workers: each worker reports a failure of a backend, and its
# first success after the master said the server has failures counted; the
# master counts across workers and tells every worker to eject or readmit it.
# Never one message per request.


class ServerFailed(amp.Command):
    """A request to (or a connection with) C{server} of C{pool} failed in this worker."""

    arguments = [(b"pool", amp.Unicode()), (b"server", amp.Unicode())]
    requiresAnswer = False


class ServerRecovered(amp.Command):
    """C{server} answered this worker after failures were counted: the count starts over."""

    arguments = [(b"pool", amp.Unicode()), (b"server", amp.Unicode())]
    requiresAnswer = False


class ServerHealth(amp.Command):
    """
    The master's verdict on C{server}: C{state} is C{suspect} (failures are
    counted: report the next success), C{ejected} (out of the placement until
    told otherwise), C{ejected-uncounted} (the same, counted in C{server_ejects}
    by another worker) or C{readmitted}.
    """

    arguments = [(b"pool", amp.Unicode()), (b"server", amp.Unicode()), (b"state", amp.Unicode())]
    requiresAnswer = False


class ProbeServer(amp.Command):
    """Probe the ejected C{server} (connect and the codec's probe request); C{ok} if it answered."""

    arguments = [(b"pool", amp.Unicode()), (b"server", amp.Unicode())]
    response = [(b"ok", amp.Boolean())]


# Failed logins with workers (process/logins.py): each failure is reported, the
# master counts per client address and tells every worker of a block.


class AuthFailed(amp.Command):
    """A login from client address C{address} failed in this worker."""

    arguments = [(b"address", amp.Unicode())]
    requiresAnswer = False


class AuthBlocked(amp.Command):
    """Refuse logins from C{address} unchecked for C{seconds}."""

    arguments = [(b"address", amp.Unicode()), (b"seconds", amp.Float())]
    requiresAnswer = False


class ApplyMigrations(amp.Command):
    """
    Route by this L{twistedproxy.config.migration.MigrationState} (JSON) from
    now on: a pool's migration starts, changes phase or ends.  Answered once
    applied, which is what the master's coordinator waits for.
    """

    arguments = [(b"migrations", BigUnicode())]
    response = []
