"""
Snapshots of one process's statistics, their merge across workers, and the
documents built from a merged snapshot.

  - L{snapshot}C{(proxy)}: one worker's counters, gauges and exported HDR
    histograms, as a JSON-able dict (what a worker sends its master).
  - L{merge}C{([snapshots])}: one dict of the same shape: counters and gauges
    summed, histograms added bucket by bucket.
  - L{twemproxy_document}: exactly the JSON nutcracker 0.5.0 serves on its stats
    port, so its dashboards and exporters keep working.
  - L{report}: that document plus our own data under the C{"twistedproxy"} key
    (latency summaries, settings): what C{/stats.json} serves.
"""

from __future__ import annotations

import os
import socket
import time

from twistedproxy._version import __version__
from twistedproxy.stats.histogram import EMPTY, Latency, merge_hist, summarize

# twemproxy 0.5.0's fields, in its order (src/nc_stats.h).
POOL_FIELDS = ("client_eof", "client_err", "client_connections", "server_ejects", "forward_error", "fragments")
SERVER_FIELDS = (
    "server_eof", "server_err", "server_timedout", "server_connections", "server_ejected_at",
    "requests", "request_bytes", "responses", "response_bytes",
    "in_queue", "in_queue_bytes", "out_queue", "out_queue_bytes",
)
# The counters of a front's routes and a pool's logins (twistedproxy's, in the
# entry of a pool that has them only), and what they count.
ROUTE_FIELDS = (
    ("failovers", "Requests (or parts of one) a failover route sent on to its next route."),
    ("replica_copies", "Copies a replicate route sent to its other replicas."),
    ("replica_failures", "Copies to other replicas that failed (no reply, timeout, error reply)."),
    ("shadow_sent", "Sampled copies a shadow route sent."),
    ("shadow_dropped", "Sampled copies a shadow route dropped: its queue was full."),
    ("shadow_failed", "Shadow copies that failed (no reply, timeout, error reply)."),
    ("shadow_queue", "Shadow copies waiting for their reply now."),
    ("warmup_hits", "Keys a warm-up route missed in its cold route and found in its warm one."),
    ("warmup_misses", "Keys missed in both routes of a warm-up route."),
    ("warmup_fills", "Values a warm-up route added to its cold route."),
    ("warmup_fill_failures", "Values not added (a client wrote the key meanwhile, or an error)."),
    ("cluster_redirects", "MOVED and ASK redirects a Redis Cluster pool followed (the client saw none)."),
    ("cluster_retries", "Requests a Redis Cluster pool resent after TRYAGAIN or CLUSTERDOWN."),
    ("cluster_map_reads", "Times a Redis Cluster pool read its cluster's slot map."),
    ("auth_failures", "Failed logins of the pool's clients (a wrong user or password)."),
    ("auth_blocked", "Logins refused unchecked: their client address had too many failed logins"
                     " (auth_failures_limit)."),
)
# What a cluster pool's servers (its nodes) carry besides counters: the last
# slot map's view, "master"/"replica"/"unknown" and Redis-style slot ranges.
NODE_FIELDS = ("role", "slots")
# Summed across workers, except these (the latest one wins).
_MAX_FIELDS = ("server_ejected_at",)
# Gauges: what is now, not a count so far; an exited worker's are dropped (L{counters_only}).
PROCESS_GAUGES = ("curr_connections",)
POOL_GAUGES = ("client_connections", "shadow_queue")
TENANT_FIELDS = ("requests", "errors", "rate_limited", "connections")
TENANT_GAUGES = ("connections",)
SERVER_GAUGES = ("server_connections", "in_queue", "in_queue_bytes", "out_queue", "out_queue_bytes", "ejected")


def _sum_latency(latencies) -> Latency:
    """One L{Latency} holding every value of C{latencies} (cheap: list additions)."""
    total = Latency()
    counts = total.counts
    for latency in latencies:
        if not latency.count:
            continue
        for index, n in enumerate(latency.counts):
            if n:
                counts[index] += n
        total.count += latency.count
        total.sum += latency.sum
        if latency.max > total.max:
            total.max = latency.max
    return total


def _queues(server) -> dict:
    """twemproxy's queue gauges: frames not yet written (in) and written, awaiting a reply (out)."""
    in_queue = in_bytes = out_queue = out_bytes = connected = 0
    for conns in server.connections.values():
        for conn in conns:
            waiting = len(conn.inflight)
            waiting_bytes = sum(len(request.frame) for request in conn.inflight)
            if conn.connected:
                connected += 1
                unsent = len(conn.outbuf)
                unsent_bytes = sum(len(frame) for frame in conn.outbuf)
            else:
                unsent, unsent_bytes = waiting, waiting_bytes
            in_queue += unsent
            in_bytes += unsent_bytes
            out_queue += waiting - unsent
            out_bytes += waiting_bytes - unsent_bytes
    return {
        "server_connections": connected,
        "in_queue": in_queue,
        "in_queue_bytes": in_bytes,
        "out_queue": out_queue,
        "out_queue_bytes": out_bytes,
    }


def snapshot(proxy, settings=True) -> dict:
    """This process's statistics for C{proxy} (a L{twistedproxy.api.Proxy}), JSON-able."""
    registry = proxy.stats
    now = proxy.reactor.seconds()
    pools = {}
    accepted = made = current = 0
    for name, pool in proxy.pools.items():
        stats = pool.stats
        accepted += stats.clients_accepted
        clients = len(pool.clients)
        current += clients
        servers = {}
        node_role = getattr(pool, "node_role", None)  # a cluster pool's nodes
        for server in pool.servers:
            sstats = server.stats
            made += sstats.connections_made
            entry = {
                "server_eof": sstats.server_eof,
                "server_err": sstats.server_err,
                "server_timedout": sstats.server_timedout,
                "server_ejected_at": sstats.server_ejected_at,
                "requests": sstats.requests,
                "request_bytes": sstats.request_bytes,
                "responses": sstats.responses,
                "response_bytes": sstats.response_bytes,
            }
            entry.update(_queues(server))
            current += entry["server_connections"]
            entry["ejected"] = 1 if server.ejected else 0
            entry["latency"] = sstats.latency.export()
            if node_role is not None:
                entry["role"], entry["slots"] = node_role(server)
            servers[server.label] = entry
        commands = {}
        for command, cstats in stats.commands.items():
            commands[command.decode("latin-1")] = {
                "total": cstats.total.export(),
                "backend": cstats.backend.export(),
            }
        pools[name] = {
            "client_eof": stats.client_eof,
            "client_err": stats.client_err,
            "client_connections": clients,
            "server_ejects": stats.server_ejects,
            "forward_error": stats.forward_error,
            "fragments": stats.fragments,
            "latency": {
                "total": _sum_latency(c.total for c in stats.commands.values()).export(),
                "backend": _sum_latency(c.backend for c in stats.commands.values()).export(),
                "proxy": stats.proxy.export(),
            },
            "commands": commands,
            "servers": servers,
        }
        if stats.auth_failures or stats.auth_blocked or pool.config.authenticates:
            pools[name]["auth_failures"] = stats.auth_failures
            pools[name]["auth_blocked"] = stats.auth_blocked
        route_counters = getattr(pool, "route_counters", None)  # a front's routes, a cluster pool
        if route_counters is not None:
            pools[name].update(route_counters())
        if stats.tenants:
            pools[name]["tenants"] = {
                tenant: {
                    "requests": tstats.requests,
                    "errors": tstats.errors,
                    "rate_limited": tstats.rate_limited,
                    "connections": tstats.connections,
                    "latency": tstats.latency.export(),
                }
                for tenant, tstats in stats.tenants.items()
            }
    listening = len(proxy.ports)
    result = {
        "pids": [os.getpid()],
        "workers": 1,
        "started": registry.started,
        "time": now,
        "total_connections": accepted + made + listening,
        "curr_connections": current + listening,
        "slowlog_seen": registry.slowlog.seen,
        "pools": pools,
    }
    if settings:
        result["settings"] = proxy.settings()
    return result


def _merge_counters(into: dict, entry: dict, skip=()) -> None:
    for key, value in entry.items():
        if key in skip or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if key in _MAX_FIELDS:
            into[key] = max(into.get(key, 0), value)
        else:
            into[key] = into.get(key, 0) + value


def _merge_hists(into: dict, entry: dict, keys) -> None:
    for key in keys:
        into.setdefault(key, []).append(entry.get(key))


def merge(snapshots) -> dict:
    """One snapshot out of several workers' (counters summed, histograms added)."""
    snapshots = [s for s in snapshots if s]
    merged = {
        "pids": [],
        "workers": 0,
        "started": min((s["started"] for s in snapshots), default=0.0),
        "time": max((s["time"] for s in snapshots), default=0.0),
        "total_connections": 0,
        "curr_connections": 0,
        "slowlog_seen": 0,
        "pools": {},
    }
    pending = {}  # (pool, part...) -> list of histograms to add
    for snap in snapshots:
        merged["pids"].extend(snap.get("pids", ()))
        merged["workers"] += snap.get("workers", 1)
        for key in ("total_connections", "curr_connections", "slowlog_seen"):
            merged[key] += snap.get(key, 0)
        if "settings" in snap and "settings" not in merged:
            merged["settings"] = snap["settings"]
        for name, pool in snap["pools"].items():
            mpool = merged["pools"].get(name)
            if mpool is None:
                mpool = merged["pools"][name] = {"latency": {}, "commands": {}, "servers": {}}
            _merge_counters(mpool, pool)
            for part in ("total", "backend", "proxy"):
                pending.setdefault((name, "latency", part), []).append(pool["latency"].get(part))
            for command, cstats in pool.get("commands", {}).items():
                mpool["commands"].setdefault(command, {})
                for part in ("total", "backend"):
                    pending.setdefault((name, "commands", command, part), []).append(cstats.get(part))
            for label, server in pool["servers"].items():
                mserver = mpool["servers"].get(label)
                if mserver is None:
                    mserver = mpool["servers"][label] = {}
                _merge_counters(mserver, server)
                mserver.update((field, server[field]) for field in NODE_FIELDS if field in server)
                pending.setdefault((name, "servers", label, "latency"), []).append(server.get("latency"))
            for tenant, entry in pool.get("tenants", {}).items():
                mtenant = mpool.setdefault("tenants", {}).setdefault(tenant, {})
                _merge_counters(mtenant, entry)
                pending.setdefault((name, "tenants", tenant, "latency"), []).append(entry.get("latency"))
    for path, hists in pending.items():
        node = merged["pools"][path[0]]
        for part in path[1:-1]:
            node = node[part]
        node[path[-1]] = merge_hist(hists)
    return merged


def counters_only(snap: dict) -> dict:
    """
    C{snap} (one worker's, or merged) without its gauges, settings and process
    identity: what an exited worker leaves to the totals, so that L{merge}
    with it adds its counters and histograms and nothing else.
    """
    pools = {}
    for name, pool in snap["pools"].items():
        entry = {k: v for k, v in pool.items() if k not in POOL_GAUGES and k not in ("servers", "tenants")}
        entry["servers"] = {
            label: {k: v for k, v in server.items() if k not in SERVER_GAUGES and k not in NODE_FIELDS}
            for label, server in pool["servers"].items()
        }
        if "tenants" in pool:
            entry["tenants"] = {
                tenant: {k: v for k, v in values.items() if k not in TENANT_GAUGES}
                for tenant, values in pool["tenants"].items()
            }
        pools[name] = entry
    result = {k: v for k, v in snap.items() if k not in PROCESS_GAUGES and k not in ("settings", "pools")}
    result.update({"pids": [], "workers": 0, "pools": pools})
    return result


def twemproxy_document(merged: dict, now=None, source=None) -> dict:
    """The JSON document nutcracker 0.5.0 serves on its stats port, from a merged snapshot."""
    now = time.time() if now is None else now
    doc = {
        "service": "nutcracker",
        "source": source or socket.gethostname(),
        "version": __version__,
        "uptime": int(now - merged["started"]) if merged.get("started") else 0,
        "timestamp": int(now),
        "total_connections": merged["total_connections"],
        "curr_connections": merged["curr_connections"],
    }
    for name, pool in merged["pools"].items():
        entry = {field: pool.get(field, 0) for field in POOL_FIELDS}
        entry.update((field, pool[field]) for field, _ in ROUTE_FIELDS if field in pool)  # a front's routes
        # A front's tenants as plain numbers ("tenant:NAME:FIELD"): nutcracker's readers
        # take every mapping inside a pool for a server.
        for tenant, values in pool.get("tenants", {}).items():
            for field in TENANT_FIELDS:
                entry["tenant:%s:%s" % (tenant, field)] = values.get(field, 0)
        for label, server in pool["servers"].items():
            entry[label] = {field: server.get(field, 0) for field in SERVER_FIELDS}
        doc[name] = entry
    return doc


def report(merged: dict, now=None, source=None) -> dict:
    """
    L{twemproxy_document} plus our own data under C{"twistedproxy"}: latency
    summaries in milliseconds (count, avg, p50 .. p99.9, max) per pool, per
    command and per server, the settings and the worker count.
    """
    doc = twemproxy_document(merged, now, source)
    pools = {}
    for name, pool in merged["pools"].items():
        latency = pool.get("latency", {})
        pools[name] = {
            "latency": {part: summarize(latency.get(part, EMPTY)) for part in ("total", "backend", "proxy")},
            "commands": {
                command: {part: summarize(c.get(part, EMPTY)) for part in ("total", "backend")}
                for command, c in sorted(pool.get("commands", {}).items())
            },
            "servers": {
                label: dict(
                    {"ejected": bool(server.get("ejected")), "latency": summarize(server.get("latency", EMPTY))},
                    **{field: server[field] for field in NODE_FIELDS if field in server}
                )
                for label, server in pool["servers"].items()
            },
        }
        if "tenants" in pool:
            pools[name]["tenants"] = {
                tenant: dict({field: values.get(field, 0) for field in TENANT_FIELDS},
                             latency=summarize(values.get("latency", EMPTY)))
                for tenant, values in pool["tenants"].items()
            }
    doc["twistedproxy"] = {
        "version": __version__,
        "workers": merged.get("workers", 1),
        "pids": merged.get("pids", []),
        "slowlog_seen": merged.get("slowlog_seen", 0),
        "settings": merged.get("settings", {}),
        "pools": pools,
    }
    return doc


def slowlog(proxy) -> list:
    """This process's slow log entries (oldest first), each tagged with the pid."""
    pid = os.getpid()
    entries = proxy.stats.slowlog.export()
    for entry in entries:
        entry["pid"] = pid
    return entries


def merge_slowlogs(lists, limit=None) -> list:
    """Several workers' slow logs as one list, most recent first (at most C{limit})."""
    entries = [entry for entries in lists if entries for entry in entries]
    entries.sort(key=lambda entry: entry["time"], reverse=True)
    return entries[:limit] if limit is not None else entries
