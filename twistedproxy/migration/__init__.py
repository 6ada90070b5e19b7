"""
Online migration of hash pools, as the coordinating process runs it (the
master, or the single process, or an embedded L{twistedproxy.api.Proxy}):

  - L{coordinator}: the phases of each pool's migration, its record (what
    C{cacheproxyctl migration} prints), pause, resume, abort, a reload's
    checks, the state kept across restarts;
  - L{mover}: lists every key of the pool's servers and moves those not on
    their target server, at C{migrate_rate} keys a second;
  - L{state}: the state files (C{cacheproxy-migration-POOL.json} in C{state_dir}).

The workers' side (holding and moving on access) is the route
L{twistedproxy.routes.migrate}; the plan both sides share is
L{twistedproxy.config.migration}.
"""
