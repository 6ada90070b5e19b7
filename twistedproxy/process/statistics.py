"""
Stats aggregation: the master's statistics room.  It asks every live worker
for its counters over the channel (L{collect}), keeps them past the workers'
exits (L{twistedproxy.stats.workers.Totals}), and serves the stats endpoints
(nutcracker's stats port, C{global.stats_http}, the read-only
C{global.metrics_http}) from the merge (L{WorkerSources}): on its own sockets,
passed on to the new master of an upgrade, moved when a reload changes
C{stats_http} or C{metrics_http}.

A new master of an upgrade serves the stats only once the old master's
counters came (L{MasterStats.inherit}), so no counter goes backwards.
"""

from __future__ import annotations

import json

from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from twistedproxy import logs
from twistedproxy.config.settings import TuningError, parse as parse_settings
from twistedproxy.process import channel
from twistedproxy.stats import commands, server as stats_server, snapshots
from twistedproxy.stats.workers import Totals

log = Logger()

INHERIT_WAIT = 3.0  # seconds a new master waits for the old one's counters before serving stats


def collect(supervisor, totals, workers=None):
    """
    Ask C{workers} (default: every live worker of C{supervisor}) for their
    snapshots and record them in C{totals}; a Deferred firing with
    {worker: snapshot} of those that answered.
    """

    def answered(results):
        found = {}
        for worker, ok, answer in results:
            if ok:
                snap = found[worker] = json.loads(answer["stats"])
                if worker.state != "gone":  # else it has been retired already
                    totals.record(worker.pid, snap)
        return found

    return supervisor.broadcast(channel.Stats, workers).addCallback(answered)


class WorkerSources:
    """
    The stats endpoints' sources (L{twistedproxy.stats.server}) in the master:
    every live worker, merged.  C{master} gives C{supervisor}, C{stats},
    C{config}, C{started_at}, C{reactor} and C{status()}.
    """

    def __init__(self, master):
        self.master = master

    def stats(self):
        master = self.master
        supervisor = master.supervisor

        def merged(_):
            pools = {pool.name for pool in master.config.pools}
            result = master.stats.totals.merged([w.pid for w in supervisor.live_workers()], pools)
            # Uptime is the master's: workers come and go.
            result["started"] = master.started_at or result["started"]
            result["time"] = master.reactor.seconds()
            result["master"] = master.status()  # the worker table of /status and /metrics
            result["migrations"] = master.coordinator.records()
            return result

        return master.stats.collect().addCallback(merged)

    def slowlog(self, limit=None):
        def merged(results):
            return snapshots.merge_slowlogs([json.loads(a["entries"]) for _, ok, a in results if ok], limit or None)

        return self.master.supervisor.broadcast(commands.SlowLog).addCallback(merged)

    def tune(self, changes, pool=None):
        """Check C{changes} here first (a bad value changes nothing anywhere), then apply everywhere."""
        try:
            parsed = parse_settings(changes)
        except TuningError as e:
            return defer.fail(e)
        if "log_level" in parsed:
            logs.set_level(parsed["log_level"])  # the master logs too
        kwargs = {"changes": json.dumps(changes)}
        if pool:
            kwargs["pool"] = pool

        def report(results):
            out = {"workers": []}
            for worker, ok, answer in results:
                if ok:
                    settings = json.loads(answer["settings"])
                    settings["pid"] = worker.pid
                    out["workers"].append(settings)
                else:
                    out["workers"].append({"pid": worker.pid, "error": answer.getErrorMessage()})
            return out

        return self.master.supervisor.broadcast(commands.Tune, **kwargs).addCallback(report)

    def admin_token(self):
        return stats_server.admin_token(self.master.config.global_)


class MasterStats:
    """
    The master's statistics: L{Totals}, the stats endpoints (their sockets,
    which an upgrade passes on, and ports), the C{-i} collection loop.
    """

    def __init__(self, master, reactor):
        self.master = master
        self.reactor = reactor
        self.totals = Totals()
        self.sources = WorkerSources(master)
        self.endpoints = {}  # kind -> ListenSpec (stats_server.endpoints)
        self.sockets = {}  # stats_key -> listening socket, passed on upgrade too
        self.ports = []  # the ports serving them
        self.loop = None  # collects the workers' stats every -i milliseconds
        self.waiting = None  # a new master: the call that serves stats if no counters came

    def _endpoints(self, config) -> dict:
        opts = self.master.options
        return stats_server.endpoints(config.global_, opts.get("stats-port"), opts.get("stats-addr", "0.0.0.0"))

    def bind(self, config, inherited: dict) -> None:
        """Bind (or take from C{inherited}, consumed) the endpoints' sockets; before privileges are dropped."""
        self.endpoints = self._endpoints(config)
        self.sockets = stats_server.bind(self.endpoints, inherited)

    def collect(self, workers=None):
        """Record the counters of C{workers} (default: every live one); see L{collect}."""
        return collect(self.master.supervisor, self.totals, workers)

    def collect_in_turn(self):
        """
        Record the counters of every live worker, asking one only once the one
        before it answered: a worker pauses its traffic while it takes its
        snapshot, and asked together, all of them would pause at once, each
        also competing with the others and the master for the cores.
        """
        d = defer.succeed(None)
        for worker in self.master.supervisor.live_workers():
            d.addCallback(lambda _, worker=worker: self.collect([worker]))
        return d

    def start_loop(self, interval: float) -> None:
        """Collect every C{interval} seconds (C{-i}), so a dying worker takes little with it."""
        if interval > 0:
            self.loop = LoopingCall(self.collect_in_turn)
            self.loop.clock = self.reactor
            self.loop.start(interval, now=False)

    def serve(self) -> None:
        self.ports = stats_server.adopt(self.reactor, self.sources, self.endpoints, self.sockets)

    def stop_serving(self) -> None:
        for port in self.ports:
            port.stopListening()
        self.ports = []

    def move(self, config, close) -> None:
        """
        Serve the stats endpoints where C{config} puts them (a reload changed
        C{stats_http} or C{metrics_http}): sockets that stay are kept, a new address is bound (or
        logged and skipped, as at start), a dropped one is closed (C{close}).
        Connections already accepted finish where they are.
        """
        endpoints = self._endpoints(config)
        sockets = stats_server.bind(endpoints, dict(self.sockets))
        serving = bool(self.ports)
        self.stop_serving()
        for key, sock in self.sockets.items():
            if key not in sockets:
                close(sock)
        self.endpoints, self.sockets = endpoints, sockets
        if serving:  # else an upgrade still waits for its workers: they start serving then
            self.serve()
        log.info("stats endpoints: {where}",
                 where=", ".join("%s %s" % (kind, spec) for kind, spec in endpoints.items()) or "none")

    def wait_for_inheritance(self) -> None:
        """A new master of an upgrade serves: the stats follow once the old master's counters are in."""
        self.waiting = self.reactor.callLater(INHERIT_WAIT, self.inherit, None)

    def inherit(self, snap) -> None:
        """The old master's counters arrived (C{snap}), or will not (None): serve stats if waiting."""
        if snap is not None:
            self.totals.inherited = snap
        waiting, self.waiting = self.waiting, None
        if waiting is not None:
            if waiting.active():
                waiting.cancel()
            self.serve()

    def close(self, close) -> None:
        """Stop everything; C{close} closes each socket."""
        if self.loop is not None and self.loop.running:
            self.loop.stop()
        self.stop_serving()
        for sock in self.sockets.values():
            close(sock)
        self.sockets = {}
