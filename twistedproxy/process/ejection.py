"""
Ejection with workers: the master counts each backend's failures across every
worker and tells all of them to eject it, and later to readmit it, together.

Workers report failures and, once the master has said a server has failures
counted (C{suspect}), their first reply from it; never one message per request.
An ejected server is probed by one worker after C{server_retry_timeout} and
readmitted everywhere only once the probe answered; a failed probe keeps it
ejected for another period.  Without a master a pool counts by itself
(L{twistedproxy.core.servers.Server}).
"""

from __future__ import annotations

from twisted.logger import Logger

from twistedproxy.process import channel

log = Logger()


# A verdict: ejected, but another worker counts the ejection in server_ejects.
EJECTED_UNCOUNTED = "ejected-uncounted"


class _Entry:
    """What the master knows of one server with failures: the count, or its ejection."""

    __slots__ = ("failures", "ejected", "call")

    def __init__(self):
        self.failures = 0
        self.ejected = False
        self.call = None


class Ejections:
    """The master's side: counts per (pool, server) and the verdicts sent to every worker."""

    def __init__(self, master):
        self.master = master
        self.entries = {}  # (pool name, server label) -> _Entry

    def _pool(self, name):
        for pool in self.master.config.pools:
            if pool.name == name:
                return pool
        return None

    def failed(self, pool_name: str, server: str) -> None:
        """A worker saw C{server} fail."""
        pool = self._pool(pool_name)
        if pool is None or not pool.auto_eject_hosts:
            return
        key = (pool_name, server)
        entry = self.entries.get(key)
        if entry is None:
            entry = self.entries[key] = _Entry()
        if entry.ejected:
            return  # late failures of requests sent before the ejection
        entry.failures += 1
        if entry.failures >= pool.server_failure_limit:
            log.warn("pool {pool}: server {server} failed {n} times across workers; ejecting it in every worker",
                     pool=pool_name, server=server, n=entry.failures)
            entry.ejected = True
            self._broadcast(key, "ejected", counted_once=True)
            self._retry_later(key, pool)
        elif entry.failures == 1:
            self._broadcast(key, "suspect")

    def recovered(self, pool_name: str, server: str) -> None:
        """A worker got a reply from C{server}: its failures no longer count."""
        entry = self.entries.get((pool_name, server))
        if entry is not None and not entry.ejected:
            del self.entries[(pool_name, server)]

    def _retry_later(self, key, pool) -> None:
        entry = self.entries[key]
        entry.call = self.master.reactor.callLater(pool.server_retry_timeout / 1000.0, self._probe, key)

    def _probe(self, key) -> None:
        entry = self.entries.get(key)
        if entry is None:
            return
        entry.call = None
        pool = self._pool(key[0])
        if pool is None or not pool.auto_eject_hosts:
            self._readmit(key)
            return
        workers = [w for w in self.master.live_workers() if w.state == "ready"]
        if not workers:
            self._retry_later(key, pool)
            return
        d = workers[0].channel.callRemote(channel.ProbeServer, pool=key[0], server=key[1])
        d.addCallback(lambda answer: answer["ok"])
        d.addErrback(lambda _: False)
        d.addCallback(self._probed, key)

    def _probed(self, ok: bool, key) -> None:
        entry = self.entries.get(key)
        if entry is None or entry.call is not None:
            return  # forgotten meanwhile (a reload), or already rescheduled
        pool = self._pool(key[0])
        if ok or pool is None:
            self._readmit(key)
            return
        log.info("pool {pool}: server {server} did not answer the probe; ejected for {seconds}s more",
                 pool=key[0], server=key[1], seconds=pool.server_retry_timeout / 1000.0)
        self._retry_later(key, pool)

    def _readmit(self, key) -> None:
        entry = self.entries.pop(key, None)
        if entry is not None and entry.call is not None and entry.call.active():
            entry.call.cancel()
        log.info("pool {pool}: server {server} answered; readmitted in every worker", pool=key[0], server=key[1])
        self._broadcast(key, "readmitted")

    def _broadcast(self, key, state: str, counted_once: bool = False) -> None:
        """
        Tell every live worker; with C{counted_once}, only the first counts the
        ejection in its stats (the others get L{EJECTED_UNCOUNTED}), so the
        summed C{server_ejects} counts it once, as nutcracker's one process does.
        """
        for i, worker in enumerate(self.master.live_workers()):
            self._tell(worker, key, EJECTED_UNCOUNTED if counted_once and i else state)

    @staticmethod
    def _tell(worker, key, state: str) -> None:
        try:
            worker.channel.callRemote(channel.ServerHealth, pool=key[0], server=key[1], state=state)
        except Exception:
            pass  # the channel is closing: the worker is on its way out

    def welcome(self, worker) -> None:
        """A worker (new, or with new pools after a reload) learns which servers are ejected."""
        for key, entry in self.entries.items():
            if entry.ejected:
                self._tell(worker, key, EJECTED_UNCOUNTED)  # counted when it happened

    def configure(self, config) -> None:
        """A new configuration: forget the servers it no longer has (they are readmitted by it)."""
        names = {(pool.name, spec.label) for pool in config.pools for spec in pool.servers}
        for key in [key for key in self.entries if key not in names]:
            entry = self.entries.pop(key)
            if entry.call is not None and entry.call.active():
                entry.call.cancel()

    def stop(self) -> None:
        for entry in self.entries.values():
            if entry.call is not None and entry.call.active():
                entry.call.cancel()
        self.entries = {}


class WorkerHealth:
    """A worker's side, set as C{pool.health}: reports to the master instead of counting."""

    def __init__(self, remote):
        self.remote = remote  # the worker's AMP channel

    def failed(self, server) -> None:
        self._send(channel.ServerFailed, server)

    def recovered(self, server) -> None:
        self._send(channel.ServerRecovered, server)

    def _send(self, command, server) -> None:
        try:
            self.remote.callRemote(command, pool=server.pool.name, server=server.label)
        except Exception:
            pass  # the master's channel is gone: the worker stops anyway


def find_server(proxy, pool_name: str, label: str):
    """The L{Server} named C{label} in C{proxy}'s pool C{pool_name}, or None."""
    pool = proxy.pools.get(pool_name) if proxy is not None else None
    if pool is None:
        return None
    for server in pool.servers:
        if server.label == label:
            return server
    return None


def apply_verdict(server, state: str) -> None:
    """What the master decided for C{server} (L{channel.ServerHealth}), applied in this worker."""
    if state == "suspect":
        server.suspect()
    elif state == "ejected":
        server.eject()
    elif state == EJECTED_UNCOUNTED:
        server.eject(counted=False)
    elif state == "readmitted" and server.ejected:
        server.readmit()
