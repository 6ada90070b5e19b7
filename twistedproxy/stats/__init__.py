"""
Statistics: recorders fed by the core (L{recorder}), per-process snapshots and
their merge across workers (L{snapshots}), and the endpoints serving them
(L{server}): nutcracker's stats port, Prometheus C{/metrics}, C{/status},
C{/stats.json} and the slow log.

The process model uses four functions, re-exported here:

  - C{snapshot(proxy) -> dict}: this worker's statistics, JSON-able;
  - C{merge([snapshot, ...]) -> dict}: the whole proxy's (counters summed,
    HDR histograms added);
  - C{slowlog(proxy) -> list} and C{merge_slowlogs([list, ...]) -> list}.

Nothing here imports the core: the core records into L{recorder}'s objects,
and the rest reads a proxy (L{twistedproxy.api.Proxy}) by its attributes.
"""

__all__ = ["snapshot", "merge", "slowlog", "merge_slowlogs"]


def __getattr__(name):
    # Lazy: the core imports the recorders, which need none of this.
    if name in __all__:
        from twistedproxy.stats import snapshots

        return getattr(snapshots, name)
    raise AttributeError(name)
