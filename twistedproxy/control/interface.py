"""
What the control endpoint drives: L{IProxyControl}.  The master
(L{twistedproxy.process.master.MasterService}) and the single process
(L{twistedproxy.tap.ProxyService}) provide it; the endpoint knows nothing else
of them, so the doors point one way: process and tap import control, never
the other way round.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IProxyControl(Interface):
    """A running proxy as C{cacheproxyctl} sees it."""

    reactor = Attribute("The reactor it runs on (a stop is answered first, then done on the next turn).")

    def status():
        """A JSON-able dict: pid, uptime, configuration and its digest, workers, last reload, log level ..."""

    def collect_stats():
        """A Deferred firing with {pid (text): that process's statistics snapshot}."""

    def reload():
        """Apply the configuration file again; a Deferred firing with (ok, error text)."""

    def start_upgrade():
        """Start a new master from the current code on the same sockets; (ok, error text)."""

    def stop(graceful):
        """Stop (C{graceful}: let in-flight requests finish)."""

    def set_workers(count):
        """Run C{count} workers from now on; (ok, error text)."""

    def set_log_level(level):
        """Log at C{level} (a twisted.logger.LogLevel) from now on, every process of the proxy."""

    def slowlog(limit):
        """A Deferred firing with the slow log (a list, most recent first; C{limit} 0 or None: all kept)."""

    def tune(changes, pool):
        """
        Change run-time settings (L{twistedproxy.config.settings}) everywhere;
        a Deferred firing with {"workers": [each process's settings]}, or failing
        with TuningError (then nothing changed).
        """

    def migration(action, pool):
        """
        C{cacheproxyctl migration}: C{action} (status, pause, resume, abort) on
        the online migration of pool C{pool} (None: every pool with a migration
        record); (ok, {pool: record}) or (False, the reason it was refused).
        """
