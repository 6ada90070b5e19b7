"""
Open-file limits: the soft C{nofile} limit raised at start to what the
configured connections need (as redis-server does; C{global.worker_rlimit_nofile}
sets it outright, as nginx's key does), and one rate-limited log line when the
ceiling is reached and new clients are refused.

At the ceiling Twisted's listening ports already refuse: they free a reserved
descriptor, accept what waits and close it at once.  They log three lines per
round, one per client; those lines are replaced by L{RefusalLog}'s (the log's
filter, L{twistedproxy.logs.quiet_refusals}, keeps them out).
"""

from __future__ import annotations

import resource

from twisted.logger import Logger, globalLogPublisher

from twistedproxy.logs import REFUSED_FORMAT, is_refusal_event

log = Logger()

# Descriptors beyond the connections: listening sockets, the master's channel,
# log files, stats clients, the interpreter's own.
MARGIN = 64
NR_OPEN_PATH = "/proc/sys/fs/nr_open"  # the kernel's cap on any nofile limit
NR_OPEN_DEFAULT = 1 << 20

def needed_files(config):
    """Descriptors C{config}'s connections can take at once, or None when a pool's clients are unlimited."""
    total = MARGIN
    for pool in config.pools:
        if not pool.client_connections:
            return None
        # A memcached pool may hold text and binary connections to each server,
        # a Redis pool RESP2 and RESP3 ones.
        codecs = 2
        total += 1 + pool.client_connections + len(pool.servers) * pool.server_connections * codecs
    return total


def _nr_open() -> int:
    try:
        with open(NR_OPEN_PATH) as f:
            return int(f.read())
    except (OSError, ValueError):
        return NR_OPEN_DEFAULT


def raise_open_files(config) -> int:
    """
    Raise the soft C{nofile} limit for C{config} (never lower it, never past the
    hard limit, except C{worker_rlimit_nofile}, which may raise the hard limit
    when allowed); log the ceiling and return it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    cap = _nr_open() if hard == resource.RLIM_INFINITY else hard
    wanted = config.global_.worker_rlimit_nofile
    before = soft
    if wanted:
        new_hard = hard if hard == resource.RLIM_INFINITY or hard >= wanted else wanted
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, new_hard))
        except (ValueError, OSError) as e:
            log.warn("worker_rlimit_nofile {wanted}: {error}; using the hard limit {hard}",
                     wanted=wanted, error=str(e), hard=cap)
            wanted = min(wanted, cap)
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = wanted
    else:
        need = needed_files(config)
        target = cap if need is None else min(need, cap)
        if target > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (ValueError, OSError) as e:
                log.warn("cannot raise the open files limit to {target}: {error}", target=target, error=str(e))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    log.info("open files limit {soft} (was {before}, hard limit {hard}); at the limit new clients are refused",
             soft=soft, before=before, hard="unlimited" if hard == resource.RLIM_INFINITY else hard)
    return soft


class RefusalLog:
    """
    Counts clients refused for want of a descriptor and logs them at most once
    a second: C{start()} observes the global log, C{stop()} stops.
    """

    INTERVAL = 1.0

    def __init__(self, reactor):
        self.reactor = reactor
        self.refused = 0
        self.rounds = 0
        self.call = None

    def start(self) -> None:
        globalLogPublisher.addObserver(self)

    def stop(self) -> None:
        globalLogPublisher.removeObserver(self)
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.call = None

    def __call__(self, event) -> None:
        if not is_refusal_event(event):
            return
        if event.get("log_format") == REFUSED_FORMAT:
            self.refused += 1
        else:
            self.rounds += 1
        if self.call is None:
            # Not from inside the log publisher: the line is written on the next turn.
            self.call = self.reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        if not (self.refused or self.rounds):
            self.call = None
            return
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if self.refused:
            log.warn("open files limit {limit} reached: {count} new client(s) refused",
                     limit=soft, count=self.refused)
        else:
            log.warn("open files limit {limit} reached: cannot accept new clients", limit=soft)
        self.refused = self.rounds = 0
        self.call = self.reactor.callLater(self.INTERVAL, self._flush)
