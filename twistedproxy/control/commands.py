"""
The AMP commands of the master's control socket (C{global.control}).

Structured answers (status, stats) are JSON text, so clients need no AMP types
beyond strings and the shape can grow without a protocol change.
"""

from __future__ import annotations

from twisted.protocols import amp

from twistedproxy.net.channels import BigUnicode


class Status(amp.Command):
    """The master's pid and uptime, its workers, the configuration digest, the last reload."""

    arguments = []
    response = [(b"status", BigUnicode())]


class Stats(amp.Command):
    """Every live worker's counters: a JSON object, worker pid -> counters."""

    arguments = []
    response = [(b"stats", BigUnicode())]


class Reload(amp.Command):
    """Re-read the configuration file (SIGHUP); C{error} says why an invalid one was refused."""

    arguments = []
    response = [(b"ok", amp.Boolean()), (b"error", amp.Unicode())]


class Upgrade(amp.Command):
    """Start a new master from the current code on the same sockets (SIGUSR2)."""

    arguments = []
    response = [(b"ok", amp.Boolean()), (b"error", amp.Unicode())]


class Stop(amp.Command):
    """Stop the master and its workers; C{graceful} lets in-flight requests finish."""

    arguments = [(b"graceful", amp.Boolean())]
    response = []


class SetWorkers(amp.Command):
    """Run this many workers from now on (until the next reload)."""

    arguments = [(b"count", amp.Integer())]
    response = [(b"ok", amp.Boolean()), (b"error", amp.Unicode())]


class SetLogLevel(amp.Command):
    """Set the log level of the master and every worker: a name or a nutcracker -v number."""

    arguments = [(b"level", amp.Unicode())]
    response = [(b"level", amp.Unicode())]
    errors = {ValueError: b"BAD_LEVEL"}


class Migration(amp.Command):
    """
    An online migration's records, or an action on it (pause, resume, abort):
    C{records} is JSON, pool -> record; C{error} says why it was refused.
    """

    arguments = [(b"action", amp.Unicode()), (b"pool", amp.Unicode(optional=True))]
    response = [(b"ok", amp.Boolean()), (b"error", amp.Unicode()), (b"records", BigUnicode())]
