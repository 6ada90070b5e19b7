"""
Prometheus text exposition of a merged snapshot, through C{prometheus_client}
with a custom collector and a registry made per scrape (no global state).

Every metric is named C{cacheproxy_*} and labelled by C{pool} (and C{server},
C{command}): twemproxy's counters and gauges, latency histograms (buckets from
the HDR histograms), HDR percentiles as summaries (C{quantile} label, C{_sum},
C{_count}; over every request since start), the build (C{cacheproxy_build_info})
and, under a master, worker restarts per slot.
"""

from __future__ import annotations

import platform

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from twistedproxy._version import __version__

from twistedproxy.stats.histogram import EMPTY, PERCENTILE_NAMES, PERCENTILES, cumulative_counts, summarize
from twistedproxy.stats.snapshots import POOL_GAUGES, ROUTE_FIELDS

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Histogram bucket bounds, seconds.
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BUCKETS_US = [int(round(b * 1000000)) for b in BUCKETS]

_POOL_COUNTERS = (
    ("client_eof", "Client connections closed by the client."),
    ("client_err", "Client connections closed on an error."),
    ("server_ejects", "Times a server was ejected from the pool."),
    ("forward_error", "Client requests answered with an error because forwarding failed."),
    ("fragments", "Sub-requests made by splitting multi-key requests."),
)
_SERVER_COUNTERS = (
    ("server_eof", "Server connections closed by the server."),
    ("server_err", "Server connections lost on an error."),
    ("server_timedout", "Server timeout events."),
    ("requests", "Requests written to the server."),
    ("request_bytes", "Request bytes written to the server."),
    ("responses", "Replies read from the server."),
    ("response_bytes", "Reply bytes read from the server."),
)
_SERVER_GAUGES = (
    ("server_connections", "Open connections to the server."),
    ("in_queue", "Requests waiting to be written to the server."),
    ("in_queue_bytes", "Bytes of requests waiting to be written to the server."),
    ("out_queue", "Requests written, waiting for the server's reply."),
    ("out_queue_bytes", "Bytes of requests written, waiting for the server's reply."),
    ("ejected", "Workers in which the server is ejected now."),
)


def _histogram(family, labels, hist):
    hist = hist or EMPTY
    counts = cumulative_counts(hist, _BUCKETS_US)
    buckets = [(repr(bound), n) for bound, n in zip(BUCKETS, counts)]
    buckets.append(("+Inf", hist["count"]))
    family.add_metric(labels, buckets, hist["sum"] / 1000000.0)


class _QuantileSummary(Metric):
    """
    A summary with quantiles (prometheus_client's C{SummaryMetricFamily} has
    only C{_count} and C{_sum}): the HDR percentiles of every request since
    start, NaN before the first, as Prometheus clients report an empty one.
    """

    def __init__(self, name, documentation, labels):
        Metric.__init__(self, name, documentation, "summary")
        self.label_names = labels

    def add_metric(self, values, hist):
        hist = hist or EMPTY
        labels = dict(zip(self.label_names, values))
        summary = summarize(hist)
        for p, name in zip(PERCENTILES, PERCENTILE_NAMES):
            value = summary[name] / 1000.0 if hist["count"] else float("nan")
            self.add_sample(self.name, dict(labels, quantile="%g" % (p / 100.0,)), value)
        self.add_sample(self.name + "_count", labels, hist["count"])
        self.add_sample(self.name + "_sum", labels, hist["sum"] / 1000000.0)


class SnapshotCollector:
    """A Prometheus collector rendering one merged snapshot."""

    def __init__(self, merged: dict, now: float):
        self.merged = merged
        self.now = now

    def collect(self):
        merged = self.merged
        pools = merged["pools"]
        build = GaugeMetricFamily("cacheproxy_build_info", "The running version and Python; always 1.",
                                  labels=["version", "python", "implementation"])
        build.add_metric([__version__, platform.python_version(), platform.python_implementation()], 1)
        yield build
        master = merged.get("master")
        if master is not None:
            restarts = CounterMetricFamily("cacheproxy_worker_restarts",
                                           "Times a worker slot's process died unasked and was respawned.",
                                           labels=["slot"])
            for slot, count in sorted(master.get("restarts", {}).items()):
                restarts.add_metric([slot], count)
            yield restarts
        yield GaugeMetricFamily("cacheproxy_workers", "Worker processes reporting.", value=merged.get("workers", 1))
        started = merged.get("started") or self.now
        yield GaugeMetricFamily("cacheproxy_uptime_seconds", "Seconds since start.", value=self.now - started)
        yield CounterMetricFamily("cacheproxy_connections", "Connections ever made (clients, servers, listeners).",
                                  value=merged["total_connections"])
        yield GaugeMetricFamily("cacheproxy_current_connections", "Connections open now.",
                                value=merged["curr_connections"])
        yield CounterMetricFamily("cacheproxy_slow_requests", "Requests that went to the slow log.",
                                  value=merged.get("slowlog_seen", 0))

        clients = GaugeMetricFamily("cacheproxy_client_connections", "Open client connections.", labels=["pool"])
        for name, pool in pools.items():
            clients.add_metric([name], pool.get("client_connections", 0))
        yield clients
        for field, doc in _POOL_COUNTERS:
            family = CounterMetricFamily("cacheproxy_" + field, doc, labels=["pool"])
            for name, pool in pools.items():
                family.add_metric([name], pool.get(field, 0))
            yield family
        for field, doc in ROUTE_FIELDS:
            fronts = [(name, pool[field]) for name, pool in pools.items() if field in pool]
            if fronts:
                family = (GaugeMetricFamily if field in POOL_GAUGES else CounterMetricFamily)(
                    "cacheproxy_" + field, doc, labels=["pool"])
                for name, value in fronts:
                    family.add_metric([name], value)
                yield family
        for family_class, fields in ((CounterMetricFamily, _SERVER_COUNTERS), (GaugeMetricFamily, _SERVER_GAUGES)):
            for field, doc in fields:
                family = family_class("cacheproxy_server_" + field.replace("server_", ""), doc,
                                      labels=["pool", "server"])
                for name, pool in pools.items():
                    for label, server in pool["servers"].items():
                        family.add_metric([name, label], server.get(field, 0))
                yield family

        request = HistogramMetricFamily("cacheproxy_request_duration_seconds",
                                        "Time from reading a request to writing its reply.",
                                        labels=["pool", "command"])
        backend = HistogramMetricFamily("cacheproxy_backend_duration_seconds",
                                        "Part of a request's time spent waiting on backends.",
                                        labels=["pool", "command"])
        proxy = HistogramMetricFamily("cacheproxy_proxy_duration_seconds",
                                      "Part of a request's time spent in the proxy.", labels=["pool"])
        server_hist = HistogramMetricFamily("cacheproxy_server_duration_seconds",
                                            "Time from writing a request to a server to reading its reply.",
                                            labels=["pool", "server"])
        quantiles = _QuantileSummary("cacheproxy_latency_seconds",
                                     "Latency percentiles since start (HDR histograms merged across workers).",
                                     ["pool", "kind"])
        server_quantiles = _QuantileSummary("cacheproxy_server_latency_seconds",
                                            "Server latency percentiles since start (HDR, merged across workers).",
                                            ["pool", "server"])
        for name, pool in pools.items():
            for command, c in sorted(pool.get("commands", {}).items()):
                _histogram(request, [name, command], c.get("total"))
                _histogram(backend, [name, command], c.get("backend"))
            latency = pool.get("latency", {})
            _histogram(proxy, [name], latency.get("proxy"))
            for kind in ("total", "backend", "proxy"):
                quantiles.add_metric([name, kind], latency.get(kind))
            for label, server in pool["servers"].items():
                _histogram(server_hist, [name, label], server.get("latency"))
                server_quantiles.add_metric([name, label], server.get("latency"))
        yield request
        yield backend
        yield proxy
        yield server_hist
        yield quantiles
        yield server_quantiles
        yield from _tenant_families(pools)
        yield from _migration_families(merged.get("migrations") or {}, pools)


def _tenant_families(pools: dict):
    """The tenants of fronts: counters, open connections (tenants chosen by user) and latency."""
    tenants = [(name, tenant, values) for name, pool in pools.items()
               for tenant, values in sorted(pool.get("tenants", {}).items())]
    for field, doc in _TENANT_COUNTERS:
        family = CounterMetricFamily("cacheproxy_tenant_" + field, doc, labels=["pool", "tenant"])
        for name, tenant, values in tenants:
            family.add_metric([name, tenant], values.get(field, 0))
        yield family
    connections = GaugeMetricFamily("cacheproxy_tenant_client_connections",
                                    "Open client connections of a tenant chosen by AUTH user.",
                                    labels=["pool", "tenant"])
    duration = HistogramMetricFamily("cacheproxy_tenant_request_duration_seconds",
                                     "Time from reading a tenant's request to writing its reply.",
                                     labels=["pool", "tenant"])
    for name, tenant, values in tenants:
        connections.add_metric([name, tenant], values.get("connections", 0))
        _histogram(duration, [name, tenant], values.get("latency"))
    yield connections
    yield duration


_TENANT_COUNTERS = (
    ("requests", "Requests of a tenant of a front."),
    ("errors", "A tenant's requests answered with an error (backend failures and the proxy's refusals)."),
    ("rate_limited", "A tenant's requests refused by its rate limit."),
)


_MIGRATION_STATES = ("holding", "moving", "paused", "done", "aborted")


def _migration_families(records: dict, pools: dict):
    """Online migrations (pool -> record) and the workers' counters of migrating pools."""
    if records:
        keys = CounterMetricFamily("twistedproxy_migration_keys", "Keys of a pool's migration: scanned by the"
                                   " mover, moved, skipped (nothing to move), failed.", labels=["pool", "what"])
        moved_bytes = CounterMetricFamily("twistedproxy_migration_bytes", "Bytes of values a migration moved.",
                                          labels=["pool"])
        state = GaugeMetricFamily("twistedproxy_migration_state", "1 for the state a pool's migration is in.",
                                  labels=["pool", "state"])
        eta = GaugeMetricFamily("twistedproxy_migration_eta_seconds", "Estimated seconds until a migration"
                                " ends (NaN: unknown).", labels=["pool"])
        for name, record in sorted(records.items()):
            for what in ("scanned", "moved", "skipped", "failed"):
                keys.add_metric([name, what], record.get(what, 0))
            moved_bytes.add_metric([name], record.get("bytes", 0))
            for one in _MIGRATION_STATES:
                state.add_metric([name, one], 1 if record.get("state") == one else 0)
            value = record.get("eta_seconds")
            eta.add_metric([name], float("nan") if value is None else value)
        yield keys
        yield moved_bytes
        yield state
        yield eta
    for field, doc in (("migrate_on_access", "Keys a migrating pool's workers moved for clients' requests."),
                       ("migrate_held", "Requests a migrating pool's workers held while the workers switched.")):
        counted = [(name, pool[field]) for name, pool in pools.items() if field in pool]
        if counted:
            family = CounterMetricFamily("twistedproxy_" + field, doc, labels=["pool"])
            for name, value in counted:
                family.add_metric([name], value)
            yield family


def render(merged: dict, now: float) -> bytes:
    """The Prometheus text format of a merged snapshot."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(merged, now))
    return generate_latest(registry)
