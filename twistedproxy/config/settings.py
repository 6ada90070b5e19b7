"""
Run-time settings: the names C{cacheproxyctl set NAME=VALUE} and the stats
endpoint's C{POST /tune} accept, their bounds, and how a value given as text
is read.  Applying them is the running proxy's business
(L{twistedproxy.api.Proxy.tune}, the pools' part L{twistedproxy.core.tuning}).

Settings:
  - slowlog_threshold: seconds (float >= 0);
  - slowlog_max_len: slow requests kept per process (0 .. 100000);
  - slowlog_log: true/false, also write slow requests to the log;
  - log_level: nutcracker's C{-v} number 0 .. 11, or a level name
    (L{twistedproxy.logs.parse_level});
  - client_max_pending: requests in flight per client before reading pauses
    (1 .. 1000000), applied to live clients at once;
  - max_request_bytes: the largest request accepted (1 KiB .. 1 GiB), for
    connections made from now on;
  - timeout: server timeout in ms, 0 = none, applied to live connections from
    their next request on.

Every value is bounded, so no setting can make memory grow without limit.  A
pool-level setting may be limited to one pool.  A reload applies the
configuration file again: the file's values (or the defaults) replace these,
all but log_level, which comes from C{-v}.
"""

from __future__ import annotations

from twistedproxy import logs

POOL_SETTINGS = ("client_max_pending", "max_request_bytes", "timeout")
PROCESS_SETTINGS = ("slowlog_threshold", "slowlog_max_len", "slowlog_log", "log_level")
SETTINGS = PROCESS_SETTINGS + POOL_SETTINGS

SLOWLOG_MAX_LEN_LIMIT = 100000  # run-time changes cannot grow the slow log's ring past this


class TuningError(ValueError):
    """A setting name or value was refused; nothing was changed."""


def _number(name, value, kind, low, high):
    try:
        if isinstance(value, bool):
            raise ValueError
        number = kind(value)
    except (TypeError, ValueError):
        raise TuningError("%s: expected a number, got %r" % (name, value))
    if number != number or number < low or number > high:
        raise TuningError("%s: must be between %s and %s (got %s)" % (name, low, high, value))
    return number


def _boolean(name, value):
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise TuningError("%s: expected true or false, got %r" % (name, value))


def _level(value):
    if isinstance(value, bool):
        raise TuningError("log_level: expected a level name or 0..11, got %r" % (value,))
    try:
        return logs.parse_level(value)
    except ValueError as e:
        raise TuningError("log_level: %s" % (e,))


def parse(changes: dict) -> dict:
    """Check and convert C{changes} (values may be strings); raise L{TuningError}."""
    parsed = {}
    for name, value in changes.items():
        if name == "slowlog_threshold":
            parsed[name] = _number(name, value, float, 0.0, 3600.0)
        elif name == "slowlog_max_len":
            parsed[name] = _number(name, value, int, 0, SLOWLOG_MAX_LEN_LIMIT)
        elif name == "slowlog_log":
            parsed[name] = _boolean(name, value)
        elif name == "log_level":
            parsed[name] = _level(value)
        elif name == "client_max_pending":
            parsed[name] = _number(name, value, int, 1, 1000000)
        elif name == "max_request_bytes":
            parsed[name] = _number(name, value, int, 1024, 1024 ** 3)
        elif name == "timeout":
            parsed[name] = _number(name, value, int, 0, 24 * 3600 * 1000)
        else:
            raise TuningError("unknown setting %r (known: %s)" % (name, ", ".join(SETTINGS)))
    return parsed
