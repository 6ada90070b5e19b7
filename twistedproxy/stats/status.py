"""
The status page for people: one self-contained HTML page (no scripts) with the
workers, pools and servers, their health, request rates and a latency chart
drawn as inline SVG.  It refreshes itself every few seconds.
"""

from __future__ import annotations

import math
import time
from html import escape

from twistedproxy._version import __version__
from twistedproxy.stats.histogram import EMPTY, PERCENTILE_NAMES, summarize

REFRESH_SECONDS = 5

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .2em} h2{font-size:1.15em;margin:1.4em 0 .4em}
table{border-collapse:collapse;margin:.4em 0 1em;background:#fff}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#eee} td.name,th.name{text-align:left}
.up{color:#176f2c;font-weight:bold} .down{color:#b00020;font-weight:bold}
.meta{color:#555} svg{background:#fff;border:1px solid #ddd}
"""

_BAR_COLORS = ("#4e79a7", "#59a14f", "#edc948", "#f28e2b", "#e15759", "#b07aa1", "#76b7b2")


def _fmt_ms(value: float) -> str:
    return "%.3f" % value if value < 10 else "%.1f" % value


def _rate(merged, previous, path) -> float:
    """Per-second rate of the counter at C{path}, against the previous snapshot if any."""

    def get(snapshot):
        node = snapshot
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                return None
        return node

    now_value = get(merged) or 0
    if previous is not None:
        dt = merged["time"] - previous["time"]
        before = get(previous)
        if dt > 0 and before is not None and before <= now_value:
            return (now_value - before) / dt
    elapsed = merged["time"] - (merged.get("started") or merged["time"])
    return now_value / elapsed if elapsed > 0 else 0.0


def latency_chart(rows, width=640) -> str:
    """
    An SVG bar chart: one group of bars per row (label, summary in ms), one bar
    per percentile and the max, on a log scale so 0.1 ms and 1 s both show.
    """
    names = list(PERCENTILE_NAMES) + ["max"]
    bar_h, gap, left, top = 10, 8, 150, 24
    group_h = bar_h * len(names) + gap
    height = top + group_h * max(len(rows), 1) + 30
    values = [s[n] for _, s in rows for n in names if s[n] > 0]
    low = 0.01  # ms: the left edge of the scale
    high = max(values + [1.0])
    span = math.log10(high / low) or 1.0
    plot_w = width - left - 70

    def x_of(ms):
        if ms <= low:
            return 0.0
        return plot_w * math.log10(ms / low) / span

    parts = [
        '<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" role="img" '
        'aria-label="latency percentiles">' % (width, height)
    ]
    for i, name in enumerate(names):  # legend
        parts.append('<rect x="%d" y="4" width="10" height="10" fill="%s"/>' % (left + i * 62, _BAR_COLORS[i]))
        parts.append('<text x="%d" y="13" font-size="11">%s</text>' % (left + i * 62 + 13, escape(name)))
    for g, (label, summary) in enumerate(rows):
        y0 = top + g * group_h
        parts.append('<text x="4" y="%d" font-size="12">%s</text>' % (y0 + group_h // 2, escape(label)))
        if not summary["count"]:
            parts.append('<text x="%d" y="%d" font-size="11" fill="#777">no requests yet</text>'
                         % (left + 4, y0 + group_h // 2))
            continue
        for i, name in enumerate(names):
            ms = summary[name]
            y = y0 + i * bar_h
            w = max(x_of(ms), 1.0) if ms > 0 else 0.0
            parts.append(
                '<rect class="bar" x="%d" y="%d" width="%.1f" height="%d" fill="%s"><title>%s %s: %s ms</title></rect>'
                % (left, y, w, bar_h - 1, _BAR_COLORS[i], escape(label), name, _fmt_ms(ms))
            )
            parts.append('<text x="%.1f" y="%d" font-size="9">%s</text>' % (left + w + 3, y + bar_h - 2, _fmt_ms(ms)))
    axis_y = height - 18
    decade = low
    while decade <= high * 1.0001:
        x = left + x_of(decade)
        parts.append('<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#bbb"/>' % (x, top, x, axis_y))
        parts.append('<text x="%.1f" y="%d" font-size="10" text-anchor="middle">%s ms</text>'
                     % (x, axis_y + 12, ("%g" % decade)))
        decade *= 10
    parts.append("</svg>")
    return "".join(parts)


def _duration(seconds: float) -> str:
    """C{seconds} as people read an uptime: 45s, 12m 5s, 3h 20m, 2d 4h."""
    seconds = int(max(seconds, 0))
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if seconds >= size:
            return "%d%s %d%s" % (seconds // size, unit, seconds % size // sub_size, sub)
    return "%ds" % (seconds,)


def _server_name(label: str, server: dict) -> str:
    """A server's cell: its label, and for a cluster node its role and slot ranges."""
    if "role" not in server:
        return escape(label)
    return '%s<br><small>%s %s</small>' % (escape(label), escape(server["role"]), escape(server.get("slots", "")))


def workers_table(merged: dict, now: float) -> str:
    """
    The workers: slot, pid, state, uptime, restarts and how the slot's last
    worker ended, from the master's status (C{merged["master"]}); a single
    process (no master) is one row.
    """
    out = ['<h2>Workers</h2><table id="workers"><tr><th>slot</th><th>pid</th><th class="name">state</th>'
           '<th>uptime</th><th>restarts</th><th class="name">last exit</th></tr>']
    master = merged.get("master")
    if master is None:
        pids = merged.get("pids") or ["?"]
        started = merged.get("started") or now
        rows = [("&ndash;", pid, "single process", now - started, "&ndash;", "") for pid in pids]
    else:
        rows = []
        for worker in master.get("workers", []) + master.get("retiring", []):
            last = worker.get("last_exit")
            rows.append((worker["slot"], worker["pid"], worker["state"], worker["uptime"], worker.get("restarts", 0),
                         escape("pid %s %s" % (last["pid"], last["reason"])) if last else ""))
    for slot, pid, state, uptime, restarts, last in rows:
        out.append('<tr class="worker"><td>%s</td><td>%s</td><td class="name">%s</td><td>%s</td><td>%s</td>'
                   '<td class="name">%s</td></tr>'
                   % (slot, escape(str(pid)), escape(state), _duration(uptime), restarts, last))
    out.append("</table>")
    return "\n".join(out)


LINKS = ("/stats.json", "/metrics", "/slowlog")  # the stats HTTP endpoint's other pages


def migrations_table(records: dict) -> str:
    """The online migrations (pool -> record, as C{cacheproxyctl migration} prints them); empty without any."""
    if not records:
        return ""
    out = ['<h2>Migrations</h2><table id="migrations"><tr><th class="name">pool</th><th>state</th><th>servers</th>'
           "<th>scanned</th><th>moved</th><th>skipped</th><th>failed</th><th>MB</th><th>keys/s</th>"
           "<th>eta s</th><th>drained</th><th>error</th></tr>"]
    for name, record in sorted(records.items()):
        eta = record.get("eta_seconds")
        out.append(
            '<tr><td class="name">%s</td><td>%s%s</td><td>%d &rarr; %d</td><td>%d</td><td>%d</td><td>%d</td>'
            "<td>%d</td><td>%.1f</td><td>%.1f</td><td>%s</td><td>%s</td><td>%s</td></tr>"
            % (escape(name), escape(record["state"]), " (abort)" if record.get("aborting") else "",
               len(record["source"]), len(record["target"]), record["scanned"], record["moved"], record["skipped"],
               record["failed"], record["bytes"] / 1e6, record.get("rate") or 0.0,
               "-" if eta is None else "%.0f" % eta, escape(", ".join(record.get("drained", ()))),
               escape(record.get("error") or ""))
        )
    out.append("</table>")
    return "\n".join(out)


def render(merged: dict, previous=None, now=None, links=LINKS) -> str:
    """
    The status page for a merged snapshot (C{previous}: the one before, for
    rates); its footer links to C{links}, the other pages of its address.
    """
    now = time.time() if now is None else now
    started = merged.get("started") or now
    out = [
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\">",
        '<meta http-equiv="refresh" content="%d">' % (REFRESH_SECONDS,),
        "<title>twistedproxy status</title><style>%s</style></head><body>" % (_STYLE,),
        "<h1>twistedproxy %s</h1>" % (escape(__version__),),
        '<p class="meta">%d worker%s (pid %s) &middot; up %ds &middot; %d connections open, %d made'
        " &middot; %s</p>"
        % (
            merged.get("workers", 1), "" if merged.get("workers", 1) == 1 else "s",
            escape(", ".join(str(p) for p in merged.get("pids", []))), int(now - started),
            merged["curr_connections"], merged["total_connections"],
            escape(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))),
        ),
    ]
    settings = merged.get("settings") or {}
    if settings:
        out.append('<p class="meta">slow log: requests &ge; %s ms (%d kept per worker), %d seen'
                   " &middot; log level %s</p>"
                   % (_fmt_ms(settings.get("slowlog_threshold", 0) * 1000.0), settings.get("slowlog_max_len", 0),
                      merged.get("slowlog_seen", 0), escape(str(settings.get("log_level")))))
    out.append(workers_table(merged, now))
    out.append('<h2>Pools</h2><table id="pools"><tr><th class="name">pool</th><th>clients</th><th>req/s</th>'
               "<th>requests</th><th>forward errors</th><th>servers up</th>"
               + "".join("<th>%s ms</th>" % n for n in ("avg",) + PERCENTILE_NAMES + ("max",)) + "</tr>")
    chart_rows = []
    for name, pool in merged["pools"].items():
        total = summarize(pool.get("latency", {}).get("total", EMPTY))
        chart_rows.append((name, total))
        servers = pool["servers"]
        up = sum(1 for s in servers.values() if not s.get("ejected"))
        out.append(
            '<tr><td class="name">%s</td><td>%d</td><td>%.1f</td><td>%d</td><td>%d</td><td>%d/%d</td>%s</tr>'
            % (
                escape(name), pool.get("client_connections", 0),
                _rate(merged, previous, ("pools", name, "latency", "total", "count")),
                total["count"], pool.get("forward_error", 0), up, len(servers),
                "".join("<td>%s</td>" % _fmt_ms(total[n]) for n in ("avg",) + PERCENTILE_NAMES + ("max",)),
            )
        )
    out.append("</table>")
    out.append("<h2>Latency</h2>")
    out.append(latency_chart(chart_rows))
    for name, pool in merged["pools"].items():
        out.append('<h2>Servers of %s</h2><table class="servers"><tr><th class="name">server</th><th>health</th>'
                   "<th>connections</th><th>req/s</th><th>requests</th><th>responses</th><th>timeouts</th>"
                   "<th>errors</th><th>eof</th><th>p50 ms</th><th>p99 ms</th><th>max ms</th></tr>"
                   % (escape(name),))
        for label, server in pool["servers"].items():
            s = summarize(server.get("latency", EMPTY))
            healthy = not server.get("ejected")
            out.append(
                '<tr><td class="name">%s</td><td class="%s">%s</td><td>%d</td><td>%.1f</td><td>%d</td><td>%d</td>'
                "<td>%d</td><td>%d</td><td>%d</td><td>%s</td><td>%s</td><td>%s</td></tr>"
                % (
                    _server_name(label, server), "up" if healthy else "down", "up" if healthy else "ejected",
                    server.get("server_connections", 0),
                    _rate(merged, previous, ("pools", name, "servers", label, "requests")),
                    server.get("requests", 0), server.get("responses", 0), server.get("server_timedout", 0),
                    server.get("server_err", 0), server.get("server_eof", 0),
                    _fmt_ms(s["p50"]), _fmt_ms(s["p99"]), _fmt_ms(s["max"]),
                )
            )
        out.append("</table>")
        tenants = pool.get("tenants", {})
        if tenants:
            out.append('<table class="tenants"><tr><th class="name">tenant</th><th>connections</th><th>req/s</th>'
                       "<th>requests</th><th>errors</th><th>rate limited</th><th>p50 ms</th><th>p99 ms</th>"
                       "<th>max ms</th></tr>")
            for tenant, values in sorted(tenants.items()):
                t = summarize(values.get("latency", EMPTY))
                out.append(
                    '<tr><td class="name">%s</td><td>%d</td><td>%.1f</td><td>%d</td><td>%d</td><td>%d</td>'
                    "<td>%s</td><td>%s</td><td>%s</td></tr>"
                    % (
                        escape(tenant), values.get("connections", 0),
                        _rate(merged, previous, ("pools", name, "tenants", tenant, "requests")),
                        values.get("requests", 0), values.get("errors", 0), values.get("rate_limited", 0),
                        _fmt_ms(t["p50"]), _fmt_ms(t["p99"]), _fmt_ms(t["max"]),
                    )
                )
            out.append("</table>")
        commands = pool.get("commands", {})
        if commands:
            out.append('<table class="commands"><tr><th class="name">command</th><th>count</th><th>avg ms</th>'
                       "<th>p50 ms</th><th>p99 ms</th><th>backend p99 ms</th><th>max ms</th></tr>")
            for command, c in sorted(commands.items()):
                s = summarize(c.get("total", EMPTY))
                b = summarize(c.get("backend", EMPTY))
                out.append(
                    ('<tr><td class="name">%s</td><td>%d</td>' + "<td>%s</td>" * 5 + "</tr>")
                    % (escape(command or "(none)"), s["count"], _fmt_ms(s["avg"]), _fmt_ms(s["p50"]),
                       _fmt_ms(s["p99"]), _fmt_ms(b["p99"]), _fmt_ms(s["max"]))
                )
            out.append("</table>")
    out.append(migrations_table(merged.get("migrations") or {}))
    out.append('<p class="meta">Also: %s</p></body></html>'
               % (" &middot; ".join('<a href="%s">%s</a>' % (link, link) for link in links),))
    return "\n".join(out)
