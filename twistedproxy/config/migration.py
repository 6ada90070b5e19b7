"""
A pool's migration plan: moving a hash pool's keys from one server list (the
source placement) to another (the target placement) while it serves.  The
plan is plain data: the master (or a single process) keeps it, stores it in
its state directory, and hands it to every worker (over AMP, as JSON) with the
phase in force; a worker's pool routes by it (L{twistedproxy.routes.migrate}).

Phases, in order:
  - C{hold}: requests on keys whose owner differs between the placements wait
    in the worker (every other request is served), until every worker holds:
    then no worker routes by the source placement alone any more;
  - C{move}: such a key is moved to its target owner before any request on it
    runs there (migrate on access), while the mover moves every key in the
    background;
  - after the last key is moved the pool is an ordinary pool of the target
    list (no plan).
An abort is a plan the other way round (source and target swapped,
C{aborting} set), run through the same phases.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple

from twistedproxy.config.model import ServerSpec

HOLD = "hold"
MOVE = "move"
PHASES = (HOLD, MOVE)


@dataclass(frozen=True)
class MigrationPlan:
    """
    @ivar pool: the pool's name.
    @ivar source: the servers keys are moved from (their placement in force before).
    @ivar target: the servers keys are moved to (the placement in force after).
    @ivar phase: L{HOLD} or L{MOVE}.
    @ivar id: tells one migration of a pool from the next (logs, state file).
    @ivar aborting: this plan undoes an aborted one (target is the list in force before it).
    """

    pool: str
    source: Tuple[ServerSpec, ...]
    target: Tuple[ServerSpec, ...]
    phase: str = HOLD
    id: str = ""
    aborting: bool = False

    @property
    def servers(self) -> Tuple[ServerSpec, ...]:
        """
        Every backend of either placement, once each: the target's, then those
        only the source has.  A backend is its address: a server re-weighted or
        renamed is one backend under two specs (the target's is kept), and a
        key whose two owners are one backend does not move.
        """
        addresses = set(s.address for s in self.target)
        return self.target + tuple(s for s in self.source if s.address not in addresses)

    @property
    def removed(self) -> Tuple[ServerSpec, ...]:
        """The backends only the source placement has (drained, then no longer the pool's)."""
        addresses = set(s.address for s in self.target)
        return tuple(s for s in self.source if s.address not in addresses)

    def to_dict(self) -> dict:
        """JSON-safe (the AMP channel's and the state file's form)."""
        return {"pool": self.pool, "source": [_server_dict(s) for s in self.source],
                "target": [_server_dict(s) for s in self.target], "phase": self.phase, "id": self.id,
                "aborting": self.aborting}

    @classmethod
    def from_dict(cls, data: dict) -> "MigrationPlan":
        return cls(pool=data["pool"], source=tuple(ServerSpec(**s) for s in data["source"]),
                   target=tuple(ServerSpec(**s) for s in data["target"]), phase=data.get("phase", HOLD),
                   id=data.get("id", ""), aborting=bool(data.get("aborting", False)))


def _server_dict(spec: ServerSpec) -> dict:
    return {"host": spec.host, "port": spec.port, "weight": spec.weight, "name": spec.name, "path": spec.path}


def find_plan(plans, pool: str) -> Optional[MigrationPlan]:
    """The plan of pool C{pool} among C{plans}, or None."""
    for plan in plans:
        if plan.pool == pool:
            return plan
    return None


@dataclass(frozen=True)
class MigrationState:
    """
    What every process of a proxy must route by besides its configuration:
    the plans of the pools being migrated, and the server lists in force
    instead of the file's for pools whose migration was aborted (until the
    file's list for that pool changes).

    @ivar plans: the L{MigrationPlan}s in force, one per pool at most.
    @ivar servers: C{(pool, servers)} pairs: the list a pool runs on instead of its file's.
    """

    plans: Tuple[MigrationPlan, ...] = ()
    servers: Tuple[Tuple[str, Tuple[ServerSpec, ...]], ...] = ()

    def plan_of(self, pool: str) -> Optional[MigrationPlan]:
        return find_plan(self.plans, pool)

    def apply(self, config):
        """C{config} (a ProxyConfig) with the server lists in force instead of the file's."""
        if not self.servers:
            return config
        lists = dict(self.servers)
        return replace(config, pools=tuple(replace(pool, servers=lists[pool.name]) if pool.name in lists else pool
                                           for pool in config.pools))

    def to_dict(self) -> dict:
        return {"plans": [plan.to_dict() for plan in self.plans],
                "servers": {pool: [_server_dict(s) for s in servers] for pool, servers in self.servers}}

    @classmethod
    def from_dict(cls, data: dict) -> "MigrationState":
        return cls(plans=tuple(MigrationPlan.from_dict(p) for p in data.get("plans", ())),
                   servers=tuple((pool, tuple(ServerSpec(**s) for s in servers))
                                 for pool, servers in sorted(data.get("servers", {}).items())))
