"""
Statistics under a master: the worker's answers to the stats commands, and the
master's sources (see L{twistedproxy.stats.server}) that ask every live worker
over its AMP channel and merge the answers.

Counters merged over live workers alone would drop whenever a worker exits
(respawn, rollover, fewer workers), which Prometheus reads as a counter reset
and twemproxy exporters as a negative rate.  So the master keeps each worker's
last snapshot (L{Totals}): an exited worker's counters and histograms, as of
its last collection, stay in every later merge.  The master collects on every
request for stats, every C{-i/--stats-interval} milliseconds and before a
graceful worker stop, so little is lost when a worker dies.
"""

from __future__ import annotations

import json
import os

from twisted.internet import defer

from twistedproxy import logs
from twistedproxy.process import channel
from twistedproxy.stats import commands, snapshots, tuning


# -- in the worker --------------------------------------------------------------


def worker_snapshot(proxy, slot) -> dict:
    """The worker's answer to C{Stats}: its snapshot, with its slot."""
    if proxy is None:  # not configured yet
        result = {"pids": [os.getpid()], "workers": 1, "started": 0.0, "time": 0.0, "total_connections": 0,
                  "curr_connections": 0, "slowlog_seen": 0, "pools": {}}
    else:
        result = snapshots.snapshot(proxy)
    result["slot"] = slot
    return result


def worker_slowlog(proxy) -> dict:
    return {"entries": json.dumps(snapshots.slowlog(proxy) if proxy is not None else [])}


def worker_tune(proxy, changes: str, pool=None) -> dict:
    if proxy is None:
        raise tuning.TuningError("this worker is not configured yet")
    return {"settings": json.dumps(tuning.apply(proxy, json.loads(changes), pool or None))}


# -- in the master ----------------------------------------------------------------


class Totals:
    """
    The master's memory of its workers' statistics.

    @ivar last: pid -> the latest snapshot of each live worker.
    @ivar retired: the counters and histograms of every exited worker
        (L{snapshots.counters_only}, merged), or None.
    @ivar inherited: what the old master of an upgrade served (its own
        L{counters}, replaced by each update it sends), or None.
    """

    def __init__(self):
        self.last = {}
        self.retired = None
        self.inherited = None

    def counters(self) -> dict:
        """Every counter and histogram this master knows of, merged (what an upgrade hands on)."""
        return snapshots.counters_only(
            snapshots.merge(list(self.last.values()) + [self.retired, self.inherited]))

    def record(self, pid: int, snap: dict) -> None:
        self.last[pid] = snap

    def retire(self, pid: int) -> None:
        """Worker C{pid} exited: fold its last counters into the retired total."""
        snap = self.last.pop(pid, None)
        if snap is not None:
            self.retired = snapshots.merge([self.retired, snapshots.counters_only(snap)])

    def merged(self, pids, pools=None) -> dict:
        """
        The merged snapshot of the live workers C{pids} (their latest snapshots)
        and the retired total, limited to the pool names C{pools} (the ones
        configured: a pool removed by a reload leaves the statistics).
        """
        kept = [self.retired, self.inherited]
        if pools is not None:
            kept = [dict(k, pools={n: p for n, p in k["pools"].items() if n in pools}) if k else k for k in kept]
        return snapshots.merge([self.last[pid] for pid in pids if pid in self.last] + kept)


def collect(master, workers=None):
    """
    Ask C{workers} (default: every live worker of C{master}) for their
    snapshots and record them in C{master.stats_totals}; a Deferred firing with
    {worker: snapshot} of those that answered.
    """
    workers = master.live_workers() if workers is None else workers

    def answered(answer, worker):
        snap = json.loads(answer["stats"])
        if worker.state != "gone":  # else it has been retired already
            master.stats_totals.record(worker.pid, snap)
        return snap

    calls = [w.channel.callRemote(channel.Stats).addCallback(answered, w) for w in workers]
    d = defer.DeferredList(calls, consumeErrors=True)
    return d.addCallback(lambda results: {w: snap for w, (ok, snap) in zip(workers, results) if ok})


class WorkerSources:
    """The stats endpoints' sources in the master: every live worker, merged."""

    def __init__(self, master):
        self.master = master

    def _ask(self, command, **kwargs):
        """A Deferred firing with the answers of every live worker that answered."""
        workers = self.master.live_workers()
        calls = [w.channel.callRemote(command, **kwargs) for w in workers]
        d = defer.DeferredList(calls, consumeErrors=True)
        return d.addCallback(lambda results: [answer for ok, answer in results if ok])

    def stats(self):
        master = self.master

        def merged(_):
            pools = {pool.name for pool in master.config.pools}
            result = master.stats_totals.merged([w.pid for w in master.live_workers()], pools)
            # Uptime is the master's: workers come and go.
            result["started"] = master.started_at or result["started"]
            result["time"] = master.reactor.seconds()
            result["master"] = master.status()  # the worker table of /status and /metrics
            return result

        return collect(master).addCallback(merged)

    def slowlog(self, limit=None):
        def merged(answers):
            return snapshots.merge_slowlogs([json.loads(a["entries"]) for a in answers], limit or None)

        return self._ask(commands.SlowLog).addCallback(merged)

    def tune(self, changes, pool=None):
        """Check C{changes} here first (a bad value changes nothing anywhere), then apply everywhere."""
        try:
            parsed = tuning.parse(changes)
        except tuning.TuningError as e:
            return defer.fail(e)
        if "log_level" in parsed:
            logs.set_level(parsed["log_level"])  # the master logs too
        kwargs = {"changes": json.dumps(changes)}
        if pool:
            kwargs["pool"] = pool
        workers = self.master.live_workers()
        calls = [w.channel.callRemote(commands.Tune, **kwargs) for w in workers]
        d = defer.DeferredList(calls, consumeErrors=True)

        def report(results):
            out = {"workers": []}
            for worker, (ok, answer) in zip(workers, results):
                if ok:
                    settings = json.loads(answer["settings"])
                    settings["pid"] = worker.pid
                    out["workers"].append(settings)
                else:
                    out["workers"].append({"pid": worker.pid, "error": answer.getErrorMessage()})
            return out

        return d.addCallback(report)

    def admin_token(self):
        from twistedproxy.stats.server import admin_token

        return admin_token(self.master.config.global_)
