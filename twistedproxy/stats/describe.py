"""
What C{cacheproxy -D} prints: every field of the stats port's document with
its meaning, in nutcracker 0.5.0's words and layout (C{nutcracker -D}).
"""

from __future__ import annotations

from twistedproxy.stats.snapshots import POOL_FIELDS, SERVER_FIELDS

# nutcracker 0.5.0's descriptions (src/nc_stats.h), for the fields of snapshots.py.
DESCRIPTIONS = {
    "client_eof": "# eof on client connections",
    "client_err": "# errors on client connections",
    "client_connections": "# active client connections",
    "server_ejects": "# times backend server was ejected",
    "forward_error": "# times we encountered a forwarding error",
    "fragments": "# fragments created from a multi-vector request",
    "server_eof": "# eof on server connections",
    "server_err": "# errors on server connections",
    "server_timedout": "# timeouts on server connections",
    "server_connections": "# active server connections",
    "server_ejected_at": "timestamp when server was ejected in usec since epoch",
    "requests": "# requests",
    "request_bytes": "total request bytes",
    "responses": "# responses",
    "response_bytes": "total response bytes",
    "in_queue": "# requests in incoming queue",
    "in_queue_bytes": "current request bytes in incoming queue",
    "out_queue": "# requests in outgoing queue",
    "out_queue_bytes": "current request bytes in outgoing queue",
}


def describe_stats() -> str:
    """The pool and server fields and their descriptions, laid out as C{nutcracker -D} does."""
    lines = ["", "pool stats:"]
    lines += ['  %-20s"%s"' % (name, DESCRIPTIONS[name]) for name in POOL_FIELDS]
    lines += ["", "server stats:"]
    lines += ['  %-20s"%s"' % (name, DESCRIPTIONS[name]) for name in SERVER_FIELDS]
    return "\n".join(lines) + "\n"
