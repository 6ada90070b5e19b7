"""
Statistics under a master: the worker's answers to the stats commands, and the
master's memory of every worker's counters (L{Totals}).  The master's side that
asks the workers over their channels is L{twistedproxy.process.statistics}.

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

from twistedproxy.config.settings import TuningError
from twistedproxy.stats import snapshots
from twistedproxy.stats.histogram import Latency


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


SNAPSHOT_WARM_ROUNDS = 5  # on PyPy the fifth cold answer took about 1 ms, as later ones do


def warm_up_answers(answer, rounds: int = SNAPSHOT_WARM_ROUNDS) -> None:
    """
    Make the worker's answer to C{Stats} (C{answer()}, the snapshot dict it
    sends) C{rounds} times, with a histogram that holds values beside its own
    (still empty) ones, and throw it away: run before the worker serves, so
    that the master's first collection (C{-i}, 30 s after the start by default)
    finds that code compiled.  On PyPy a worker's first answers took 8-18 ms
    while it compiled it, a pause in its traffic (bench/README.md, "Measured in
    the fourteenth #10 session").
    """
    sample = Latency()
    for us in range(50, 60000, 29):  # values across most of the buckets a cache's latencies fill
        sample.record_us(us)
    for _ in range(rounds):
        snapshot = answer()
        snapshot["warm-up"] = sample.export()
        json.dumps(snapshot)


def worker_slowlog(proxy) -> dict:
    return {"entries": json.dumps(snapshots.slowlog(proxy) if proxy is not None else [])}


def worker_tune(proxy, changes: str, pool=None) -> dict:
    if proxy is None:
        raise TuningError("this worker is not configured yet")
    return {"settings": json.dumps(proxy.tune(json.loads(changes), pool or None))}


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
