"""
Statistics under a master: the worker's answers to the stats commands, and the
master's sources (see L{twistedproxy.stats.server}) that ask every live worker
over its AMP channel and merge the answers.
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
        def merged(answers):
            result = snapshots.merge([json.loads(a["stats"]) for a in answers])
            # Uptime is the master's: workers come and go.
            result["started"] = self.master.started_at or result["started"]
            result["time"] = self.master.reactor.seconds()
            return result

        return self._ask(channel.Stats).addCallback(merged)

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
