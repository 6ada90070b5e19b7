"""
Run-time settings, changed without a restart and applied in place to one
process (the master sends the same change to every worker and collects each
one's report).

Settings (names as in C{cacheproxyctl set NAME VALUE}):
  - slowlog_threshold: seconds (float >= 0);
  - slowlog_max_len: slow requests kept per process (0 .. 100000);
  - slowlog_log: true/false, also write slow requests to the log;
  - log_level: nutcracker's C{-v} number 0 .. 11, or a level name
    (critical, error, warn, info, debug);
  - client_max_pending: requests in flight per client before reading pauses
    (1 .. 1000000), applied to live clients at once;
  - max_request_bytes: the largest request accepted (1 KiB .. 1 GiB), for
    connections made from now on;
  - timeout: server timeout in ms, 0 = none, applied to live connections from
    their next request on.

Every value is bounded, so no setting can make memory grow without limit.  A
pool-level setting may be limited to one pool (C{pool=NAME}).  A reload applies
the configuration file again: the file's values (or the defaults) replace these,
all but log_level, which comes from C{-v}.
"""

from __future__ import annotations

import dataclasses

from twisted.logger import LogLevel

from twistedproxy import logs
from twistedproxy.stats.recorder import SLOWLOG_MAX_LEN_LIMIT

POOL_SETTINGS = ("client_max_pending", "max_request_bytes", "timeout")
PROCESS_SETTINGS = ("slowlog_threshold", "slowlog_max_len", "slowlog_log", "log_level")
SETTINGS = PROCESS_SETTINGS + POOL_SETTINGS

_LEVEL_NAMES = ("critical", "error", "warn", "info", "debug")


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
    text = str(value).lower()
    if text in _LEVEL_NAMES:
        return LogLevel.levelWithName(text)
    verbosity = _number("log_level", value, int, 0, 11)
    return logs.level_for_verbosity(verbosity)


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


def apply(proxy, changes: dict, pool=None) -> dict:
    """
    Apply C{changes} to this process (every pool, or only pool C{pool}) and
    return L{current} settings.  Nothing changes unless every value is valid.
    """
    parsed = parse(changes)
    pools = list(proxy.pools.values())
    if pool is not None:
        pools = [p for p in pools if p.name == pool]
        if not pools:
            raise TuningError("no pool named %r" % (pool,))
    registry = proxy.stats
    registry.set_slowlog(
        threshold=parsed.get("slowlog_threshold"),
        max_len=parsed.get("slowlog_max_len"),
        to_log=parsed.get("slowlog_log"),
    )
    if "log_level" in parsed:
        logs.set_level(parsed["log_level"])
    pool_changes = {name: parsed[name] for name in POOL_SETTINGS if name in parsed}
    if pool_changes:
        for server_pool in pools:
            _apply_to_pool(server_pool, pool_changes)
    return current(proxy)


def _apply_to_pool(pool, changes: dict) -> None:
    # The pool's config is what new clients and connections read; live ones
    # follow it (ServerPool.use_config).
    replace = dict(changes)
    if "timeout" in replace:
        replace["timeout"] = replace["timeout"] or None
    pool.use_config(dataclasses.replace(pool.config, **replace))


def current(proxy) -> dict:
    """The settings in force in this process; pool settings per pool."""
    registry = proxy.stats
    level = logs.current_level()
    return {
        "slowlog_threshold": registry.slowlog_threshold,
        "slowlog_max_len": registry.slowlog.max_len,
        "slowlog_log": registry.slowlog.to_log,
        "log_level": level.name if level is not None else None,
        "pools": {
            name: {
                "client_max_pending": pool.config.client_max_pending,
                "max_request_bytes": pool.config.max_request_bytes,
                "timeout": pool.config.timeout or 0,
            }
            for name, pool in proxy.pools.items()
        },
    }
